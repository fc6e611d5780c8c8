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
    let port = free_privileged_port().expect("a free UDP port in 900..1000");
    let privileged = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut s = Server::start_with(ServerOpts {
        extra_args: vec![
            "--user".into(),
            "nobody".into(),
            "--address".into(),
            privileged.to_string(),
        ],
        // World-searchable, so that 'nobody' reaches the files wherever
        // the checkout lives.
        scratch: Some(std::env::temp_dir()),
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

#[test]
fn unknown_user_is_a_clear_start_up_error() {
    if server_kind() != ServerKind::Ringtftpd {
        eprintln!("SKIP: ringtftpd's flag");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringtftpd"))
        .args(["--user", "no-such-user-4711", "--address", "127.0.0.1:0"])
        .arg(dir.path())
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
            panic!("ringtftpd kept running with an unknown --user");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().expect("stderr");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains("no user 'no-such-user-4711'"),
        "stderr: {stderr}"
    );
}
