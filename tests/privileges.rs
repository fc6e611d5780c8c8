//! `--user`: the server binds its listening sockets (a privileged port
//! included) as root, then runs as the named user for good, and still
//! serves. Needs root; elsewhere the tests print SKIP.

mod common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::unistd::{Uid, User};

/// The `Uid:`/`Gid:`/`Groups:` values of a process, from /proc.
fn ids(pid: u32) -> (String, String, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

/// A port below 1024 nobody holds on 127.0.0.1, if there is one.
fn free_privileged_port() -> Option<u16> {
    (900..1000).find(|&p| UdpSocket::bind((Ipv4Addr::LOCALHOST, p)).is_ok())
}

#[test]
fn user_flag_binds_a_privileged_port_then_runs_as_that_user() {
    if server_kind() != ServerKind::Ringtftpd || !Uid::effective().is_root() {
        eprintln!("SKIP: needs ringtftpd started by root");
        return;
    }
    let nobody = User::from_name("nobody")
        .expect("getpwnam")
        .expect("a user 'nobody'");
    let Some(port) = free_privileged_port() else {
        eprintln!("SKIP: no free UDP port in 900..1000 on 127.0.0.1");
        return;
    };
    let privileged = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // More shards than CPUs: each one's io_uring counts against the
    // user's locked-memory limit once the server is no longer root.
    let mut s = Server::start_with(ServerOpts {
        extra_args: vec![
            "--user".into(),
            "nobody".into(),
            "--address".into(),
            privileged.to_string(),
            "--threads".into(),
            "16".into(),
        ],
        ..ServerOpts::default()
    });
    let (uid, gid, groups) = ids(s.pid());
    let u = nobody.uid.as_raw();
    let g = nobody.gid.as_raw();
    assert_eq!(
        uid,
        format!("{u} {u} {u} {u}"),
        "real, effective, saved, fs uid"
    );
    assert_eq!(
        gid,
        format!("{g} {g} {g} {g}"),
        "real, effective, saved, fs gid"
    );
    assert_eq!(groups, g.to_string(), "supplementary groups");
    for addr in [s.addr(), privileged] {
        let c = RawClient::new(addr);
        let got = raw_get(&c, "mib.bin", "octet", &[("blksize", "1468")], |_, _| {})
            .unwrap_or_else(|e| panic!("download from {addr} as nobody: {e}"));
        assert!(got.data == s.source("mib.bin"), "content from {addr}");
    }
    s.assert_running();
}

/// Runs ringtftpd with `args` and the root `dir`; it must exit with a
/// failure within 10 s. Returns its stderr.
fn start_fails(args: &[&str], dir: &std::path::Path) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringtftpd"))
        .args(args)
        .args(["--address", "127.0.0.1:0"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringtftpd");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("ringtftpd {args:?} kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("stderr");
    assert!(!status.success(), "{args:?}: exit status {status}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn unknown_user_is_a_clear_start_up_error() {
    if server_kind() != ServerKind::Ringtftpd {
        eprintln!("SKIP: ringtftpd's flag");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let stderr = start_fails(&["--user", "no-such-user-4711"], dir.path());
    assert!(
        stderr.contains("no user 'no-such-user-4711'"),
        "stderr: {stderr}"
    );
}

/// A root the user may not search would refuse every request: start-up
/// says so instead.
#[test]
fn root_the_user_cannot_search_is_a_start_up_error() {
    if server_kind() != ServerKind::Ringtftpd || !Uid::effective().is_root() {
        eprintln!("SKIP: needs ringtftpd started by root");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("f"), b"x").expect("write");
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .expect("chmod 700");
    let stderr = start_fails(&["--user", "nobody"], dir.path());
    assert!(
        stderr.contains("as user 'nobody'") && stderr.contains("ermission denied"),
        "stderr: {stderr}"
    );
}
