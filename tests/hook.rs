//! `--on-transfer PROGRAM` with the real binary: the program gets each
//! finished transfer (dnsmasq's arguments, TFTP_* variables and a JSON
//! line on stdin), and a program that takes seconds never slows serving.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

/// A shell script at `dir/name` with `body`, executable.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn hooked(program: &Path) -> Server {
    Server::start_with(ServerOpts {
        extra_args: vec!["--on-transfer".into(), program.display().to_string()],
        kind: Some(ServerKind::Ringtftpd),
        ..ServerOpts::default()
    })
}

/// The JSON records the hook wrote for `file`, waiting up to 5 s for `n`.
fn records_for(out: &Path, file: &str, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(out).unwrap_or_default();
        let found: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("JSON "))
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["file"] == file)
            .collect();
        if found.len() >= n || Instant::now() > deadline {
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_program_gets_each_finished_transfer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out");
    let program = script(
        dir.path(),
        "hook",
        &format!(
            "{{ echo \"ARGS $*\"; echo \"ENV $TFTP_CLIENT $TFTP_DIRECTION $TFTP_OUTCOME $TFTP_BYTES\"; printf 'JSON '; cat; }} >> {}",
            out.display()
        ),
    );
    let s = hooked(&program);
    let c = RawClient::new(s.addr());
    for _ in 0..3 {
        let got = raw_get(&c, "mib.bin", "octet", &[("blksize", "1428")], |_, _| {})
            .expect("download mib.bin");
        assert_eq!(got.data.len(), 1 << 20);
    }
    let records = records_for(&out, "mib.bin", 3);
    assert_eq!(
        records.len(),
        3,
        "{}",
        std::fs::read_to_string(&out).unwrap_or_default()
    );
    let client = c.sock.local_addr().expect("addr").to_string();
    for r in &records {
        assert_eq!(r["client"], client.as_str());
        assert_eq!(r["direction"], "read");
        assert_eq!(r["bytes"], 1 << 20);
        assert_eq!(r["blksize"], 1428);
        assert_eq!(r["outcome"], "completed");
    }
    let text = std::fs::read_to_string(&out).expect("hook output");
    let path = s.root().join("mib.bin");
    assert!(
        text.contains(&format!("ARGS tftp 1048576 127.0.0.1 {}", path.display())),
        "{text}"
    );
    assert!(
        text.contains(&format!("ENV {client} read completed 1048576")),
        "{text}"
    );
    // A refused request is no transfer: no run for it.
    let (code, _) = c.expect_error(&rrq("missing.bin", "octet", &[]));
    assert_eq!(code, 1);
    std::thread::sleep(Duration::from_millis(200));
    assert!(records_for(&out, "missing.bin", 1).is_empty());
}

#[test]
fn a_slow_program_never_slows_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let program = script(dir.path(), "slow", "sleep 3");
    let s = hooked(&program);
    let c = RawClient::new(s.addr());
    let started = Instant::now();
    for _ in 0..20 {
        let got = raw_get(&c, "b513.bin", "octet", &[], |_, _| {}).expect("download");
        assert_eq!(got.data.len(), 513);
    }
    // 20 runs of the program would take a minute; serving took no part.
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "20 small downloads took {:?} behind a 3 s hook",
        started.elapsed()
    );
}
