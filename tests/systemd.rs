//! Running under systemd: the unit files in packaging/systemd pass
//! `systemd-analyze verify` and score well in `systemd-analyze security`,
//! their command line with Debian's stock settings is one ringtftpd takes,
//! and the binary speaks the notify protocol (READY, RELOADING, STOPPING,
//! and watchdog pings) on a NOTIFY_SOCKET of the test's own. systemd is
//! not PID 1 here, so the units are not started.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn packaging() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/systemd")
}

fn systemd_analyze() -> Option<&'static str> {
    let found = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert_ne!(
            std::env::var("RINGTFTPD_REQUIRE_CLIENTS").as_deref(),
            Ok("1"),
            "systemd-analyze is missing (RINGTFTPD_REQUIRE_CLIENTS=1)"
        );
        eprintln!("SKIP: systemd-analyze not installed");
        return None;
    }
    Some("systemd-analyze")
}

/// The units, copied with ExecStart naming the binary under test (verify
/// checks that it exists) and without the man page (the package ships it).
fn units_for_test(dir: &Path) {
    for unit in ["ringtftpd.service", "ringtftpd-activated.socket"] {
        let text = std::fs::read_to_string(packaging().join(unit)).expect("read unit");
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with("Documentation="))
            .map(|l| l.replace("/usr/sbin/ringtftpd", env!("CARGO_BIN_EXE_ringtftpd")) + "\n")
            .collect();
        std::fs::write(dir.join(unit), text).expect("write unit");
    }
}

#[test]
fn the_units_pass_systemd_analyze_verify_and_security() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    units_for_test(dir.path());
    let out = Command::new(analyze)
        .current_dir(dir.path())
        .args([
            "verify",
            "./ringtftpd.service",
            "./ringtftpd-activated.socket",
        ])
        .output()
        .expect("run systemd-analyze verify");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "verify: {said}");
    assert!(said.trim().is_empty(), "verify warned: {said}");
    let out = Command::new(analyze)
        .current_dir(dir.path())
        .args([
            "security",
            "--offline=true",
            "--no-pager",
            "./ringtftpd.service",
        ])
        .output()
        .expect("run systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in {text}"));
    let score: f64 = line
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no score in {line:?}"));
    eprintln!("{line}");
    // 0 is a fully locked-down unit, 10 an unprotected one; "OK" is < 2.5.
    // A network server cannot have PrivateNetwork, so ~1.7 is near its floor.
    assert!(score <= 2.0, "exposure {score}: {line}");
}

/// Debian's stock /etc/default/tftpd-hpa, as the unit's ExecStart expands
/// it, is a command line ringtftpd takes.
#[test]
fn the_units_command_line_takes_debians_stock_settings() {
    let unit = std::fs::read_to_string(packaging().join("ringtftpd.service")).expect("read");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart");
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_str().expect("utf-8 path");
    // What systemd substitutes: ${X} as one word, $X split on spaces.
    let args: Vec<String> = exec
        .split_whitespace()
        .skip(1)
        .flat_map(|word| match word {
            "${TFTP_ADDRESS}" => vec![":69".to_string()],
            "$TFTP_OPTIONS" => vec!["--secure".to_string()],
            "${TFTP_DIRECTORY}" => vec![root.to_string()],
            other => vec![other.to_string()],
        })
        .collect();
    let out = Command::new(env!("CARGO_BIN_EXE_ringtftpd"))
        .arg("--check-config")
        .args(&args)
        .output()
        .expect("run ringtftpd --check-config");
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads notify messages until one satisfies `want`, for up to `limit`.
fn wait_for(sock: &UnixDatagram, seen: &mut Vec<String>, limit: Duration, want: &str) {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let hit = msg.lines().any(|l| l == want);
            seen.push(msg);
            if hit {
                return;
            }
        }
    }
    panic!("no {want} within {limit:?}; saw {seen:?}");
}

#[test]
fn it_tells_systemd_when_ready_reloading_and_stopping_and_pings_the_watchdog() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify");
    let sock = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("root");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringtftpd"))
        .args(["--address", "127.0.0.1:0", "--foreground"])
        .arg(&root)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ringtftpd");
    let pid = Pid::from_raw(child.id() as i32);
    let mut seen = Vec::new();
    wait_for(&sock, &mut seen, Duration::from_secs(10), "READY=1");
    assert!(
        seen.iter().any(|m| m.contains("STATUS=serving")),
        "{seen:?}"
    );
    // A ping every 100 ms (half of WATCHDOG_USEC): several in a second.
    let start = seen.len();
    for _ in 0..3 {
        wait_for(&sock, &mut seen, Duration::from_secs(2), "WATCHDOG=1");
    }
    assert!(seen.len() - start >= 3, "{seen:?}");
    kill(pid, Signal::SIGHUP).expect("SIGHUP");
    wait_for(&sock, &mut seen, Duration::from_secs(5), "RELOADING=1");
    wait_for(&sock, &mut seen, Duration::from_secs(5), "READY=1");
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    wait_for(&sock, &mut seen, Duration::from_secs(5), "STOPPING=1");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no exit after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}
