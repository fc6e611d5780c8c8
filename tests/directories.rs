//! Several directories (`in.tftpd [options] directory...` without `-s`/`-j`),
//! side by side with tftpd-hpa 5.2 and 7.x on one tree: two directories
//! and, beside them, one outside both and one whose name extends the
//! first's (`d1x`). Each server gets the same directories and the same
//! names; what each client gets (the file's bytes, or an ERROR's code)
//! must agree. Where 5.2 and 7.x disagree with each other, ringtftpd
//! follows the one the case names (docs/migrating.md has the table).
//!
//! tftpd-hpa 7.x comes from scripts/peer-hpa7.sh; with
//! RINGTFTPD_SKIP_PEER_HPA7=1 its cases are skipped with a message, and
//! without /usr/sbin/in.tftpd 5.2's are. Every server is started by this
//! test and killed by its PID; every wait is bounded.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// What one request got: the bytes, or the ERROR's code.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Data(Vec<u8>),
    Error(u16),
}

/// Which peers a case's answer is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Like {
    /// 5.2 and 7.x agree, and so must ringtftpd.
    Both,
    /// 7.x only (5.2 differs: its plain string prefix test, say).
    Seven,
    /// 5.2 only (7.x always validates without -s and refuses `.`).
    Five,
}

struct Running {
    child: Child,
    port: u16,
    what: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        // The server this test started, by its PID.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write(path: &Path, body: &str) {
    let dir = path.parent().expect("a parent");
    fs::create_dir_all(dir).expect("mkdir");
    fs::write(path, body).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).expect("chmod");
}

/// The tree: `t/d1`, `t/d2` served; `t/out` and `t/d1x` not.
fn tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let t = dir.path().join("t");
    write(&t.join("d1/a.txt"), "d1 a\n");
    write(&t.join("d1/sub/b.txt"), "d1 sub b\n");
    write(&t.join("d2/c.txt"), "d2 c\n");
    write(&t.join("d2/a.txt"), "d2 a\n");
    write(&t.join("d1x/x.txt"), "d1x x\n");
    write(&t.join("out/o.txt"), "outside\n");
    write(&t.join("d1/probe.txt"), "probe\n");
    write(&t.join("d2/c.txt.override"), "d2 c override\n");
    write(&dir.path().join("rules"), "rE\t^(.*)$\t\\1.override\n");
    // tftpd-hpa drops to nobody: every directory must be searchable.
    for d in ["", "t", "t/d1", "t/d1/sub", "t/d2", "t/d1x", "t/out"] {
        fs::set_permissions(dir.path().join(d), fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
    }
    dir
}

fn free_port() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("addr").port()
}

/// Starts `kind` with `args` (options, then the directories) on a free
/// loopback port and waits until `probe` is served; None if it exits
/// (its status and stderr in the panic otherwise).
fn start(kind: ServerKind, args: &[String], probe: &str) -> Running {
    let mut last = String::new();
    for _ in 0..3 {
        let port = free_port();
        let mut cmd = match kind {
            ServerKind::Ringtftpd => {
                let mut c = Command::new(env!("CARGO_BIN_EXE_ringtftpd"));
                c.args(["-q", "-a", &format!("127.0.0.1:{port}")]);
                c
            }
            ServerKind::Hpa | ServerKind::Hpa7 => {
                let mut c = if kind == ServerKind::Hpa7 {
                    let prefix = hpa7_command().expect("7.x was asked for");
                    let mut c = Command::new(&prefix[0]);
                    c.args(&prefix[1..]);
                    c
                } else {
                    Command::new("/usr/sbin/in.tftpd")
                };
                c.args(["-L", "-a", &format!("127.0.0.1:{port}")]);
                c
            }
        };
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        let mut running = Running {
            child,
            port,
            what: format!("{kind:?} {}", args.join(" ")),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = running.child.try_wait() {
                last = format!("{cmd:?} exited: {status}");
                break;
            }
            if fetch(&running, probe) == Some(Got::Data(b"probe\n".to_vec())) {
                return running;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if last.is_empty() {
            last = format!("{cmd:?}: {probe} not served within 10 s");
        }
    }
    panic!("server did not come up: {last}")
}

/// One RRQ, lock-step; None if unanswered within 1 s.
fn fetch(server: &Running, name: &str) -> Option<Got> {
    let client = RawClient::new(([127, 0, 0, 1], server.port).into());
    client.send_to_server(&rrq(name, "octet", &[]));
    let mut data = Vec::new();
    for expected in 1..=16u16 {
        match client.recv(Duration::from_secs(1))? {
            (Packet::Data { block, data: chunk }, from) if block == expected => {
                data.extend_from_slice(&chunk);
                client.send(&ack(block), from);
                if chunk.len() < 512 {
                    return Some(Got::Data(data));
                }
            }
            (Packet::Error { code, .. }, _) => return Some(Got::Error(code)),
            other => panic!("{}: {name}: {other:?}", server.what),
        }
    }
    panic!("{}: {name}: longer than expected", server.what)
}

/// The peers to compare with: 5.2 if installed, 7.x if fetched.
fn peers(options_of_7x_only: bool) -> Vec<ServerKind> {
    let mut kinds = Vec::new();
    if !options_of_7x_only && have_hpa() {
        kinds.push(ServerKind::Hpa);
    }
    match hpa7_command() {
        Some(_) => kinds.push(ServerKind::Hpa7),
        None => eprintln!("SKIP tftpd-hpa 7.x cases (RINGTFTPD_SKIP_PEER_HPA7=1)"),
    }
    kinds
}

/// Runs `cases` against ringtftpd and each peer, all given `args`.
fn compare(args: &[String], probe: &str, cases: &[(String, Like)], seven_only: bool) {
    let ours = start(ServerKind::Ringtftpd, args, probe);
    let ours_got: Vec<Got> = cases
        .iter()
        .map(|(name, _)| fetch(&ours, name).unwrap_or_else(|| panic!("ours: {name}: no answer")))
        .collect();
    for kind in peers(seven_only) {
        let peer = start(kind, args, probe);
        let mut compared = 0;
        for ((name, like), ours) in cases.iter().zip(&ours_got) {
            let applies = match like {
                Like::Both => true,
                Like::Seven => kind == ServerKind::Hpa7,
                Like::Five => kind == ServerKind::Hpa,
            };
            if !applies {
                continue;
            }
            let theirs = fetch(&peer, name).unwrap_or_else(|| panic!("{kind:?}: {name}: none"));
            assert_eq!(
                ours, &theirs,
                "{name}: ringtftpd and {kind:?} differ ({})",
                peer.what
            );
            compared += 1;
        }
        eprintln!("{}: {compared} names agree", peer.what);
    }
}

#[test]
fn names_inside_one_of_several_directories_as_tftpd_hpa() {
    let dir = tree();
    let t = dir.path().join("t");
    let t = t.to_str().expect("utf-8");
    let dirs = vec![format!("{t}/d1"), format!("{t}/d2")];
    let p = |s: &str| s.replace("T", t);
    let cases: Vec<(String, Like)> = [
        ("T/d1/a.txt", Like::Both),
        ("T/d1/sub/b.txt", Like::Both),
        ("T/d2/c.txt", Like::Both),
        ("T/d2/a.txt", Like::Both),
        ("T/d1//a.txt", Like::Both),
        ("T/d1/nope.txt", Like::Both),
        ("T/out/o.txt", Like::Both),
        ("/a.txt", Like::Both),
        ("/c.txt", Like::Both),
        ("a.txt", Like::Both),
        ("sub/b.txt", Like::Both),
        ("../a.txt", Like::Both),
        ("T/d1/../d2/c.txt", Like::Both),
        ("T/d1/../out/o.txt", Like::Both),
        ("T/d2/../d1/a.txt", Like::Both),
        // 5.2 compares strings: `d1x` starts with `d1` and is served.
        ("T/d1x/x.txt", Like::Seven),
        // 7.x validates without -s and refuses `.`; 5.2 serves it.
        ("T/d1/./a.txt", Like::Five),
        // The directory itself: ERROR 0 from both.
        ("T/d1", Like::Both),
        ("T/d1/", Like::Both),
    ]
    .iter()
    .map(|(n, l)| (p(n), *l))
    .collect();
    let probe = format!("{t}/d1/probe.txt");
    compare(&dirs, &probe, &cases, false);

    // 7.x's --validate and --normalize (path), after which the directory
    // test runs on the normalized name.
    let validate: Vec<(String, Like)> = [
        "T/d1/a.txt",
        "T/d2/c.txt",
        "T/d1//a.txt",
        "T/d1/./a.txt",
        "T/d1/../d2/c.txt",
        "T/d1x/x.txt",
        "a.txt",
        "/a.txt",
        "T/out/o.txt",
    ]
    .iter()
    .map(|n| (p(n), Like::Seven))
    .collect();
    let with = |flag: &str| [vec![flag.to_string()], dirs.clone()].concat();
    compare(&with("--validate"), &probe, &validate, true);
    let normalize: Vec<(String, Like)> = [
        "T/d1/./a.txt",
        "T/d1/../d2/c.txt",
        "T/d2/../d1/a.txt",
        "T/d1/../out/o.txt",
        "a.txt",
    ]
    .iter()
    .map(|n| (p(n), Like::Seven))
    // Relative, made absolute by --normalize.
    .chain([(format!("{}/d1/a.txt", &t[1..]), Like::Seven)])
    .collect();
    compare(&with("--normalize"), &probe, &normalize, true);

    // A remap rule's `E` looks for the file in the directory it is in.
    let rules = dir.path().join("rules").display().to_string();
    let remapped: Vec<(String, Like)> = ["T/d2/c.txt", "T/d1/a.txt", "T/out/o.txt"]
        .iter()
        .map(|n| (p(n), Like::Seven))
        .collect();
    let with_rules = [vec!["-m".to_string(), rules], dirs.clone()].concat();
    compare(&with_rules, &probe, &remapped, true);

    // --path-prefix: the directories are named without it, and so are
    // the files.
    let prefixed = [
        vec!["--path-prefix".to_string(), t.to_string()],
        vec!["/d1".into(), "/d2".into()],
    ]
    .concat();
    let names: Vec<(String, Like)> = [
        "/d1/a.txt",
        "/d2/c.txt",
        "/out/o.txt",
        "d1/a.txt",
        "/d1/../d2/c.txt",
    ]
    .iter()
    .map(|n| (n.to_string(), Like::Seven))
    .chain([(format!("{t}/d1/a.txt"), Like::Seven)])
    .collect();
    compare(&prefixed, "/d1/probe.txt", &names, true);
}

#[test]
fn several_directories_with_secure_or_jail_fail_to_start_as_in_tftpd_hpa() {
    let dir = tree();
    let t = dir.path().join("t");
    let t = t.to_str().expect("utf-8");
    let run = |mut cmd: Command| {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{cmd:?} kept running");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for flag in ["-s", "-j"] {
        let dirs = [format!("{t}/d1"), format!("{t}/d2")];
        let port = format!("127.0.0.1:{}", free_port());
        let mut ours = Command::new(env!("CARGO_BIN_EXE_ringtftpd"));
        ours.args(["-a", &port, flag]).args(&dirs);
        assert_eq!(run(ours).code(), Some(2), "ringtftpd {flag} with two");
        let mut peers = Vec::new();
        if flag == "-s" && have_hpa() {
            peers.push(vec!["/usr/sbin/in.tftpd".to_string()]);
        }
        if let Some(prefix) = hpa7_command() {
            peers.push(prefix);
        }
        for prefix in peers {
            let mut cmd = Command::new(&prefix[0]);
            cmd.args(&prefix[1..])
                .args(["-L", "-a", &port, flag])
                .args(&dirs);
            // EX_USAGE
            assert_eq!(run(cmd).code(), Some(64), "{prefix:?} {flag} with two");
        }
    }
    // A relative directory among several: 7.x refuses it too (EX_DATAERR).
    let mut ours = Command::new(env!("CARGO_BIN_EXE_ringtftpd"));
    ours.args(["-a", "127.0.0.1:0", "relative/d1", &format!("{t}/d2")]);
    assert_eq!(run(ours).code(), Some(2));
}

#[test]
fn an_upload_goes_to_the_directory_its_name_is_in() {
    let dir = tree();
    let t = dir.path().join("t");
    let ts = t.to_str().expect("utf-8");
    for d in ["d1", "d2"] {
        fs::set_permissions(t.join(d), fs::Permissions::from_mode(0o777)).expect("chmod");
    }
    let args = vec!["--create".into(), format!("{ts}/d1"), format!("{ts}/d2")];
    let ours = start(ServerKind::Ringtftpd, &args, &format!("{ts}/d1/probe.txt"));
    let client = RawClient::new(([127, 0, 0, 1], ours.port).into());
    let put = |name: &str| raw_put(&client, name, "octet", &[], b"uploaded\n", None);
    assert_eq!(put(&format!("{ts}/d2/new.txt")), Ok(()));
    assert_eq!(
        fs::read(t.join("d2/new.txt")).expect("in d2"),
        b"uploaded\n"
    );
    assert!(!t.join("d1/new.txt").exists());
    assert_eq!(
        fetch(&ours, &format!("{ts}/d2/new.txt")),
        Some(Got::Data(b"uploaded\n".to_vec()))
    );
    // Outside both, and relative: refused (ERROR 2), nothing written.
    assert_eq!(put(&format!("{ts}/out/new.txt")).map_err(|e| e.0), Err(2));
    assert_eq!(put("new2.txt").map_err(|e| e.0), Err(2));
    assert!(!t.join("out/new.txt").exists());
}
