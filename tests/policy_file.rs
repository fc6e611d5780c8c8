//! The policy file through the real binary: `--check-config` says "ok" or
//! names the error and its line (the remap file's too); a start with a bad file fails the same
//! way; and, in two network namespaces of our own joined by a veth pair,
//! tftp-hpa fetching through the server over IPv4 and IPv6 gets the file
//! under its MAC's prefix (found in the server's neighbour table), while a client
//! with no MAC known gets the shared one.
//!
//! SIGHUP re-reads the file: new requests see the new rules (a `deny`
//! lifted, its message sent until then), a transfer running keeps its
//! grant, and a file that no longer parses keeps the last good rules with
//! one log line naming the file and the line.
//!
//! The namespace test needs root and `ip netns`; without them it prints
//! `SKIP` and returns, unless RINGTFTPD_REQUIRE_NETNS=1 (then it fails).
//! Its traffic stays between 10.98.0.1 and 10.98.0.2 (fd00:98::1 and
//! fd00:98::2) inside the two namespaces (and loopback inside the server's), which a Drop guard
//! deletes on every path. Every wait is bounded.

mod common;

use common::wait_exit;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringtftpd"))
}

/// Runs the binary with `args`, which must exit within 5 s: its status,
/// stdout and stderr.
#[track_caller]
fn run_to_exit(args: &[&str]) -> (ExitStatus, String, String) {
    let mut child = binary()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringtftpd");
    let status = wait_exit(&mut child, Duration::from_secs(5));
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (status, out, err)
}

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
        fs::set_permissions(parent, fs::Permissions::from_mode(0o755)).expect("chmod dir");
    }
    fs::write(path, text).expect("write");
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).expect("chmod");
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

const GOOD: &str = "\
# Every client: no windows above 16.
[[rule]]
max_windowsize = 16

# QEMU's UEFI ROM breaks above blksize 1024.
[[rule]]
mac = \"52:54:00:*\"
max_blksize = 1024
";

const BAD: &str = "\
[[rule]]
max_windowsize = 16

[[rule]]
cidr = \"10.0.0.0/33\"
";

#[test]
fn check_config_says_ok_with_a_summary_and_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.toml");
    write(&file, GOOD);
    let (status, out, err) = run_to_exit(&[
        "--check-config",
        "--policy-file",
        s(&file),
        "-a",
        "127.0.0.1:0",
        s(dir.path()),
    ]);
    assert!(status.success(), "{status}: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(lines[0].starts_with("ringtftpd: ok: "), "{out}");
    assert!(lines[0].contains("2 rule(s)"), "{out}");
    // Nothing was bound or served.
    assert!(!err.contains("serving"), "{err}");
    // The remap file is checked too.
    let map = dir.path().join("map.rules");
    write(&map, "r ^a b\nri ^C d\n");
    let (status, out, err) = run_to_exit(&[
        "--check-config",
        "--map-file",
        s(&map),
        "--policy-file",
        s(&file),
        s(dir.path()),
    ]);
    assert!(status.success(), "{status}: {err}");
    assert!(
        out.contains("map.rules: 2 rule(s)") && out.contains("policy.toml: 2 rule(s)"),
        "{out}"
    );
    write(&map, "r ^a b\nzq ^a b\n");
    let (status, out, err) = run_to_exit(&["--check-config", "--map-file", s(&map), s(dir.path())]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(err.contains("map.rules") && err.contains("line 2"), "{err}");
    // Without a policy file it checks the command line and the directory.
    let (status, out, _) = run_to_exit(&["--check-config", s(dir.path())]);
    assert!(
        status.success() && out.starts_with("ringtftpd: ok: "),
        "{out}"
    );
    let (status, _, err) = run_to_exit(&["--check-config", s(&dir.path().join("missing"))]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("is not a directory"), "{err}");
}

#[test]
fn check_config_names_the_error_its_rule_and_line_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.toml");
    write(&file, BAD);
    let (status, out, err) =
        run_to_exit(&["--check-config", "--policy-file", s(&file), s(dir.path())]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    let line = err.trim();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(line.contains(s(&file)), "{line}");
    assert!(line.contains("rule 2, line 5"), "{line}");
    assert!(line.contains("cidr: '10.0.0.0/33'"), "{line}");
    // One too long, and one that is not there.
    let long = dir.path().join("long.toml");
    write(&long, &"# padding\n".repeat(110_000));
    let (status, _, err) =
        run_to_exit(&["--check-config", "--policy-file", s(&long), s(dir.path())]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("long.toml: longer than 1048576 bytes"),
        "{err}"
    );
    let missing = dir.path().join("nope.toml");
    let (status, _, err) = run_to_exit(&[
        "--check-config",
        "--policy-file",
        s(&missing),
        s(dir.path()),
    ]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("nope.toml") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn a_start_with_a_bad_policy_file_fails_with_the_same_message() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.toml");
    write(&file, BAD);
    let (_, _, checked) =
        run_to_exit(&["--check-config", "--policy-file", s(&file), s(dir.path())]);
    let (status, _, started) = run_to_exit(&[
        "--policy-file",
        s(&file),
        "-a",
        "127.0.0.1:0",
        s(dir.path()),
    ]);
    assert_eq!(status.code(), Some(1), "{started}");
    assert_eq!(started, checked);
    assert!(!started.contains("serving"), "{started}");
}

// --- The MAC, found in a namespace of our own ---

const SERVER_IP: &str = "10.98.0.1";
const CLIENT_IP: &str = "10.98.0.2";
const SERVER_IP6: &str = "fd00:98::1";
const CLIENT_IP6: &str = "fd00:98::2";
const CLIENT_MAC: &str = "52:54:00:ab:cd:ef";

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Why the namespaces cannot be made here, if they cannot.
fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    for prog in ["ip", "tftp"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()));
        if !found {
            return Some(format!("no `{prog}` on PATH (Debian: iproute2, tftp-hpa)"));
        }
    }
    None
}

/// Two namespaces, `NAME-s` (server) and `NAME-c` (client), joined by a
/// veth pair; deleted on drop.
struct Link {
    name: String,
}

impl Link {
    fn up() -> Result<Link, String> {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "p{:x}{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed) % 100
        );
        let link = Link { name };
        link.down(); // left over from a killed run with the same PID
        let (sv, cl) = (link.ns('s'), link.ns('c'));
        ip(&["netns", "add", &sv])?;
        ip(&["netns", "add", &cl])?;
        ip(&[
            "link", "add", &sv, "netns", &sv, "type", "veth", "peer", "name", &cl, "netns", &cl,
        ])?;
        ip(&["-n", &cl, "link", "set", "dev", &cl, "address", CLIENT_MAC])?;
        for ns in [&sv, &cl] {
            ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", "dev", ns, "up"])?;
        }
        // IPv6 without duplicate address detection: usable at once.
        for (ns, addr) in [
            (&sv, format!("{SERVER_IP}/24")),
            (&cl, format!("{CLIENT_IP}/24")),
            (&sv, format!("{SERVER_IP6}/64")),
            (&cl, format!("{CLIENT_IP6}/64")),
        ] {
            ip(&["-n", ns, "addr", "add", &addr, "dev", ns, "nodad"])?;
        }
        Ok(link)
    }

    fn ns(&self, side: char) -> String {
        format!("{}-{side}", self.name)
    }

    fn down(&self) {
        for side in ['s', 'c'] {
            let ns = self.ns(side);
            if Path::new("/run/netns").join(&ns).exists() {
                if let Err(e) = ip(&["netns", "del", &ns]) {
                    eprintln!("{e}");
                }
            }
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.down();
    }
}

/// A child killed (by its PID) on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// tftp-hpa in namespace `ns` fetching `name` from `host` into `dest`;
/// at most 20 s. The file's content, if it came.
fn tftp_get(ns: &str, host: &str, name: &str, dest: &Path) -> Option<String> {
    let _ = fs::remove_file(dest);
    let child = Command::new("ip")
        .args(["netns", "exec", ns, "tftp", host, "-c", "get", name])
        .arg(dest)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn tftp");
    let mut child = Killed(child);
    wait_exit(&mut child.0, Duration::from_secs(20));
    fs::read_to_string(dest).ok()
}

#[test]
fn tftp_hpa_gets_the_file_under_its_macs_prefix_in_a_namespace() {
    const TEST: &str = "tftp_hpa_gets_the_file_under_its_macs_prefix_in_a_namespace";
    if let Some(why) = unavailable() {
        if std::env::var("RINGTFTPD_REQUIRE_NETNS").as_deref() == Ok("1") {
            panic!("{TEST}: RINGTFTPD_REQUIRE_NETNS=1: {why}");
        }
        let _ = writeln!(std::io::stderr(), "SKIP {TEST}: {why}");
        return;
    }
    let link = match Link::up() {
        Ok(link) => link,
        Err(why) => {
            if std::env::var("RINGTFTPD_REQUIRE_NETNS").as_deref() == Ok("1") {
                panic!("{TEST}: {why}");
            }
            let _ = writeln!(
                std::io::stderr(),
                "SKIP {TEST}: namespaces unavailable: {why}"
            );
            return;
        }
    };
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&base).expect("CARGO_TARGET_TMPDIR");
    let dir = tempfile::Builder::new()
        .prefix("ringtftpd-policy-")
        .tempdir_in(base)
        .expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let root = dir.path().join("root");
    write(&root.join("boot.txt"), "shared\n");
    write(&root.join("52-54-00-ab-cd-ef/boot.txt"), "mine\n");
    let policy = dir.path().join("policy.toml");
    write(
        &policy,
        "[[rule]]\nmac = \"52:54:00:*\"\nprefix = \"{mac}/\"\n",
    );
    let log = dir.path().join("server.log");
    let server = Command::new("ip")
        .args(["netns", "exec", &link.ns('s')])
        .arg(env!("CARGO_BIN_EXE_ringtftpd"))
        .args(["--policy-file", s(&policy)])
        .args(["-a", &format!("{SERVER_IP}:69"), "-a", "127.0.0.1:69"])
        .args(["-a", &format!("[{SERVER_IP6}]:69")])
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn server");
    let mut server = Killed(server);
    let server_log = || fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server_log().contains("serving") {
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("server exited: {status}\n{}", server_log());
        }
        assert!(Instant::now() < deadline, "not serving:\n{}", server_log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let dest = dir.path().join("got");
    // The client on the veth: its MAC is in the server's neighbour table.
    let got = tftp_get(&link.ns('c'), SERVER_IP, "boot.txt", &dest);
    assert_eq!(got.as_deref(), Some("mine\n"), "{}", server_log());
    // Over IPv6 the neighbour table has it too.
    let got = tftp_get(&link.ns('c'), SERVER_IP6, "boot.txt", &dest);
    assert_eq!(got.as_deref(), Some("mine\n"), "IPv6\n{}", server_log());
    // From loopback no MAC is known: the shared file.
    let got = tftp_get(&link.ns('s'), "127.0.0.1", "boot.txt", &dest);
    assert_eq!(got.as_deref(), Some("shared\n"), "{}", server_log());
    drop(server);
    drop(link);
}

/// One RRQ of `name`, lock-step at 512-byte blocks (at most 4096):
/// the file's bytes, or the ERROR's code and text.
fn fetch(server: &common::Server, name: &str) -> Result<Vec<u8>, (u16, String)> {
    let client = common::RawClient::new(server.addr());
    client.send_to_server(&common::rrq(name, "octet", &[]));
    let mut data = Vec::new();
    for expected in 1..=4096u16 {
        match client.recv(Duration::from_secs(5)) {
            Some((common::Packet::Data { block, data: chunk }, from)) if block == expected => {
                data.extend_from_slice(&chunk);
                client.send(&common::ack(block), from);
                if chunk.len() < 512 {
                    return Ok(data);
                }
            }
            Some((common::Packet::Error { code, msg }, _)) => return Err((code, msg)),
            other => panic!("{name}: block {expected}: {other:?}"),
        }
    }
    panic!("{name}: longer than 4096 blocks")
}

fn hup(server: &common::Server) {
    // The server this test started, by its PID.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
}

/// Waits up to 5 s for the `n`th log line containing `what`.
#[track_caller]
fn wait_log(server: &common::Server, what: &str, n: usize) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = server.log();
        if let Some(line) = log.lines().filter(|l| l.contains(what)).nth(n - 1) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no log line {n} with {what:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_rereads_the_policy_file_and_keeps_the_last_good_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.toml");
    write(
        &file,
        "[[rule]]\nname = \"secret.txt\"\ndeny = \"not this file, not today\"\n",
    );
    let server = common::Server::start_with(common::ServerOpts {
        kind: Some(common::ServerKind::Ringtftpd),
        extra_args: vec!["--policy-file".into(), s(&file).into()],
        ..common::ServerOpts::default()
    });
    let secret = b"the secret\n".to_vec();
    write(&server.root().join("secret.txt"), "the secret\n");
    assert_eq!(
        fetch(&server, "secret.txt"),
        Err((2, "not this file, not today".to_string()))
    );

    // A transfer running across the reload keeps what it was granted.
    let client = common::RawClient::new(server.addr());
    client.send_to_server(&common::rrq("mib.bin", "octet", &[]));
    let (first, tid) = client.recv(Duration::from_secs(5)).expect("DATA 1");
    assert!(
        matches!(first, common::Packet::Data { block: 1, .. }),
        "{first:?}"
    );

    // Allow secret.txt, deny mib.bin to new requests.
    write(&file, "[[rule]]\nname = \"mib.bin\"\ndeny = true\n");
    hup(&server);
    wait_log(&server, "SIGHUP: reloaded", 1);
    assert_eq!(fetch(&server, "secret.txt"), Ok(secret.clone()));
    assert_eq!(
        fetch(&server, "mib.bin"),
        Err((2, "access denied by policy".to_string()))
    );
    // The old transfer goes on to its end.
    let mut got = match first {
        common::Packet::Data { data, .. } => data,
        _ => unreachable!(),
    };
    client.send(&common::ack(1), tid);
    let mut block = 2u16;
    for _ in 0..8192 {
        match client.recv(Duration::from_secs(5)) {
            // Retransmitted while this test was busy with other requests.
            Some((common::Packet::Data { block: b, .. }, _)) if b < block => continue,
            Some((common::Packet::Data { block: b, data }, from)) if b == block && from == tid => {
                let last = data.len() < 512;
                got.extend_from_slice(&data);
                client.send(&common::ack(block), tid);
                if last {
                    break;
                }
                block += 1;
            }
            other => panic!("block {block}: {other:?}"),
        }
    }
    assert!(
        got == server.source("mib.bin"),
        "the running transfer completed"
    );

    // A broken file: the last good rules stay, and one line says where.
    write(
        &file,
        "[[rule]]\nname = \"secret.txt\"\n\n[[rule]]\ncidr = \"10.0.0.0/33\"\n",
    );
    hup(&server);
    let line = wait_log(&server, "SIGHUP: policy file", 1);
    assert!(
        line.contains(s(&file)) && line.contains("rule 2, line 5") && line.contains("keeping"),
        "{line}"
    );
    assert_eq!(fetch(&server, "secret.txt"), Ok(secret));
    assert_eq!(
        fetch(&server, "mib.bin"),
        Err((2, "access denied by policy".to_string()))
    );
    assert_eq!(
        server.log().matches("SIGHUP: reloaded").count(),
        1,
        "the broken file reloaded nothing"
    );
}
