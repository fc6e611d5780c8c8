//! The binary at start-up and when a shard dies: bad flags are refused
//! with a message naming the flag, and a dead shard takes the process down
//! with a non-zero status, so a service manager restarts it. Every wait is
//! bounded.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringtftpd"))
}

/// Waits up to `limit` for `child` to exit; kills it (by its PID) and
/// fails if it does not.
#[track_caller]
fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn out_of_range_and_inconsistent_flags_exit_non_zero_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&[&str], &str)] = &[
        (
            &["--shutdown-grace", "18446744073709551615"],
            "--shutdown-grace",
        ),
        (&["--initial-rto-ms", "99999999999999"], "--initial-rto-ms"),
        (&["--rto-max-ms", "60001"], "--rto-max-ms"),
        (&["--retries", "1000"], "--retries"),
        (
            &["--open-cache-ms", "18446744073709551615"],
            "--open-cache-ms",
        ),
        (
            &["--rto-min-ms", "500", "--rto-max-ms", "400"],
            "--rto-min-ms",
        ),
    ];
    for (args, flag) in cases {
        let mut child = binary()
            .args(*args)
            .args(["--address", "127.0.0.1:0"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringtftpd");
        // Before the fix some of these started serving: bounded wait.
        let status = wait_exit(&mut child, Duration::from_secs(5));
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut stderr)
            .expect("read stderr");
        assert!(!status.success(), "{args:?}: exited {status}");
        assert_eq!(status.code(), Some(2), "{args:?}: clap's usage status");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}
