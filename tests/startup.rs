//! The binary at start-up and when a shard dies: bad flags are refused
//! with a message naming the flag, and a dead shard takes the process down
//! with a non-zero status, so a service manager restarts it. Every wait is
//! bounded.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

mod common;

use common::wait_exit;

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ringtftpd"))
}

/// Starts `cmd` with stderr piped (read it, or let `stderr_lines` do).
fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringtftpd")
}

/// Runs the binary with `args` and `root`, which must exit within 5 s:
/// its status and stderr.
#[track_caller]
fn run_to_exit(args: &[&str], root: &std::path::Path) -> (ExitStatus, String) {
    let mut child = spawn(binary().args(args).arg(root));
    let status = wait_exit(&mut child, Duration::from_secs(5));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    (status, stderr)
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
        let mut all = args.to_vec();
        all.extend(["--address", "127.0.0.1:0"]);
        // Before the fix some of these started serving: bounded wait.
        let (status, stderr) = run_to_exit(&all, dir.path());
        assert!(!status.success(), "{args:?}: exited {status}");
        assert_eq!(status.code(), Some(2), "{args:?}: clap's usage status");
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

/// Forwards `child`'s stderr lines to a channel (and to the test's stderr).
/// It reads to the end even once the receiver is gone, so a test that drops
/// it never leaves the server writing into a closed pipe (SIGPIPE).
fn stderr_lines(child: &mut Child) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("stderr piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("server: {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// The address in the "serving DIR on ADDR with N thread(s)" line.
fn serving_address(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>) -> SocketAddr {
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = lines.recv_timeout(left) else {
            break;
        };
        seen.push(line.clone());
        if !line.contains("serving") {
            continue;
        }
        if let Some(rest) = line.split(" on ").nth(1)
            && let Some(addr) = rest.split(' ').next()
            && let Ok(addr) = addr.trim_end_matches(',').parse()
        {
            return addr;
        }
    }
    panic!("no 'serving' line: {seen:?}");
}

/// A server started on an ephemeral loopback port, one thread, with its
/// stderr lines forwarded.
struct Serving {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    addr: SocketAddr,
}

fn serve(mut cmd: Command, root: &std::path::Path) -> Serving {
    cmd.args(["--address", "127.0.0.1:0"]);
    serve_at(cmd, root)
}

/// As `serve`, on the addresses `cmd` already names.
fn serve_at(mut cmd: Command, root: &std::path::Path) -> Serving {
    let mut child = spawn(cmd.args(["--threads", "1", "--permissive"]).arg(root));
    let lines = stderr_lines(&mut child);
    let mut seen = Vec::new();
    let addr = serving_address(&lines, &mut seen);
    Serving {
        child,
        lines,
        seen,
        addr,
    }
}

/// Collects the lines left after the child exited (the reader thread ends
/// with the pipe).
fn drain(lines: &mpsc::Receiver<String>, seen: &mut Vec<String>) {
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(2)) {
        seen.push(line);
    }
}

#[test]
fn a_dead_shard_is_logged_and_the_process_exits_non_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("boot.img"), vec![7u8; 4000]).expect("write");
    let mut cmd = binary();
    cmd.env("RINGTFTPD_TEST_PANIC_SHARD", "0")
        .args(["--shutdown-grace", "1"]);
    let Serving {
        mut child,
        lines,
        mut seen,
        addr,
    } = serve(cmd, dir.path());
    // The first transfer makes shard 0 panic (the hook).
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .send_to(b"\0\x01boot.img\0octet\0", addr)
        .expect("send RRQ");
    let asked = Instant::now();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    let took = asked.elapsed();
    drain(&lines, &mut seen);
    assert!(!status.success(), "exited {status}: {seen:?}");
    assert_eq!(status.code(), Some(1), "{seen:?}");
    assert!(
        took < Duration::from_secs(5),
        "took {took:?} to exit after the shard died"
    );
    assert!(
        seen.iter()
            .any(|l| l.contains("shard 0 died: panicked: RINGTFTPD_TEST_PANIC_SHARD=0")),
        "{seen:?}"
    );
    assert!(
        seen.last().is_some_and(|l| l.contains("shard 0 died")),
        "the last word names the dead shard: {seen:?}"
    );
}

#[test]
fn sigusr1_from_outside_is_ignored_and_sigterm_still_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("f"), vec![1u8; 100]).expect("write");
    let Serving {
        mut child,
        lines,
        mut seen,
        addr,
    } = serve(binary(), dir.path());
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Not queued by the server itself: no shard died.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGUSR1).expect("SIGUSR1");
    std::thread::sleep(Duration::from_millis(100));
    assert!(child.try_wait().expect("try_wait").is_none(), "{seen:?}");
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    client.send_to(b"\0\x01f\0octet\0", addr).expect("send RRQ");
    let mut buf = [0u8; 600];
    let (n, tid) = client.recv_from(&mut buf).expect("DATA 1");
    assert_eq!(&buf[..4], &[0, 3, 0, 1], "{:?}", &buf[..n]);
    client.send_to(&[0, 4, 0, 1], tid).expect("ACK 1");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    drain(&lines, &mut seen);
    assert!(status.success(), "exited {status}: {seen:?}");
    assert!(
        seen.iter().any(|l| l.contains("SIGUSR1 from pid")),
        "{seen:?}"
    );
    assert!(!seen.iter().any(|l| l.contains("died")), "{seen:?}");
    assert!(
        seen.last().is_some_and(|l| l.contains("stopped")),
        "{seen:?}"
    );
}

/// Starts the binary on `addr` and expects it to refuse at once: its
/// stderr.
#[track_caller]
fn refused_start(addr: SocketAddr, root: &std::path::Path) -> String {
    let addr = addr.to_string();
    let args = ["--address", &addr, "--threads", "1", "--permissive"];
    let (status, stderr) = run_to_exit(&args, root);
    assert_eq!(status.code(), Some(1), "{addr}: exited {status}: {stderr}");
    stderr
}

#[test]
fn a_second_server_on_a_taken_port_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("f"), vec![1u8; 100]).expect("write");
    let Serving {
        mut child, addr, ..
    } = serve(binary(), dir.path());
    // Another ringtftpd: SO_REUSEPORT alone would have let it share the port.
    let stderr = refused_start(addr, dir.path());
    assert!(
        stderr.contains(&format!("cannot listen on {addr}: address in use")),
        "{stderr}"
    );
    // The first one still serves.
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    client.send_to(b"\0\x01f\0octet\0", addr).expect("send RRQ");
    let mut buf = [0u8; 600];
    let (n, _) = client
        .recv_from(&mut buf)
        .expect("DATA 1 from the first server");
    assert_eq!(&buf[..4], [0, 3, 0, 1]);
    assert_eq!(n, 4 + 100);
    stop_child(&mut child);
    // Any other holder of the port too (a plain socket, as tftpd-hpa's).
    let holder = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let stderr = refused_start(holder.local_addr().expect("addr"), dir.path());
    assert!(stderr.contains("address in use"), "{stderr}");
}

#[test]
fn the_pidfile_holds_the_pid_while_serving_and_goes_at_a_clean_exit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    let pidfile = dir.path().join("ringtftpd.pid");
    let mut cmd = binary();
    cmd.arg("-P").arg(&pidfile);
    let Serving { mut child, .. } = serve(cmd, &root);
    // Written before the "serving" line.
    let written = std::fs::read_to_string(&pidfile).expect("pidfile");
    assert_eq!(written, format!("{}\n", child.id()));
    stop_child(&mut child);
    assert!(!pidfile.exists(), "pidfile left behind");
}

/// `args` (which name the address) served with no shutdown grace.
fn serve_args(args: &[&str], root: &std::path::Path) -> Serving {
    let mut cmd = binary();
    cmd.args(args).args(["--shutdown-grace", "0"]);
    serve_at(cmd, root)
}

/// Whether an RRQ for `f` sent to `to` from `from` gets DATA 1 within 1 s.
fn answers(from: &str, to: SocketAddr) -> bool {
    let client = UdpSocket::bind(from).expect("bind");
    client
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    client.send_to(b"\0\x01f\0octet\0", to).expect("send RRQ");
    let mut buf = [0u8; 600];
    matches!(client.recv_from(&mut buf), Ok((n, _)) if n >= 4 && buf[..4] == [0, 3, 0, 1])
}

fn stop_child(child: &mut Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    assert!(wait_exit(child, Duration::from_secs(10)).success());
}

#[test]
fn ipv4_only_and_ipv6_only_listen_as_in_tftpd_hpa() {
    if UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("skipping: no IPv6 loopback");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("f"), vec![1u8; 10]).expect("write");
    // -4: `[::]` means 0.0.0.0.
    let Serving {
        mut child, addr, ..
    } = serve_args(&["-4", "--address", "[::]:0"], dir.path());
    assert_eq!(addr.ip().to_string(), "0.0.0.0");
    assert!(answers(
        "127.0.0.1:0",
        SocketAddr::new([127, 0, 0, 1].into(), addr.port())
    ));
    stop_child(&mut child);
    // -6: `[::]` takes IPv6 only; without it, IPv4 too (dual stack).
    for (flags, v4_served) in [(&["-6"][..], false), (&[][..], true)] {
        let mut args = flags.to_vec();
        args.extend(["--address", "[::]:0"]);
        let Serving {
            mut child, addr, ..
        } = serve_args(&args, dir.path());
        let port = addr.port();
        assert!(answers(
            "[::1]:0",
            SocketAddr::new("::1".parse().unwrap(), port)
        ));
        assert_eq!(
            answers("127.0.0.1:0", SocketAddr::new([127, 0, 0, 1].into(), port)),
            v4_served,
            "{flags:?}"
        );
        stop_child(&mut child);
    }
}

#[test]
fn listen_without_foreground_detaches_once_bound_as_tftpd_hpa() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(root.join("f"), vec![1u8; 10]).expect("write");
    let pidfile = dir.path().join("pid");
    let detached = |address: &str, logs: &[&str]| {
        let mut child = spawn(
            binary()
                .arg("-l")
                .args(logs)
                .arg("-P")
                .arg(&pidfile)
                .args([
                    "--address",
                    address,
                    "--threads",
                    "1",
                    "--shutdown-grace",
                    "0",
                ])
                .arg(&root),
        );
        let lines = stderr_lines(&mut child);
        // The command itself returns once the daemon is bound.
        let status = wait_exit(&mut child, Duration::from_secs(10));
        (child.id(), status, lines)
    };
    let stop = |daemon: nix::unistd::Pid| {
        nix::sys::signal::kill(daemon, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = Instant::now() + Duration::from_secs(10);
        while nix::sys::signal::kill(daemon, None).is_ok() && pidfile.exists() {
            assert!(Instant::now() < deadline, "the daemon did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let daemon_pid = || -> nix::unistd::Pid {
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pidfile")
            .trim()
            .parse()
            .expect("a pid");
        nix::unistd::Pid::from_raw(pid)
    };
    // With --stderr the daemon keeps logging there.
    let (parent, status, lines) = detached("127.0.0.1:0", &["--stderr"]);
    assert!(status.success(), "exited {status}");
    let daemon = daemon_pid();
    assert_ne!(daemon.as_raw() as u32, parent);
    let addr = serving_address(&lines, &mut Vec::new());
    assert!(answers("127.0.0.1:0", addr), "the daemon serves");
    stop(daemon);
    // By default it logs to syslog, as tftpd-hpa, and lets go of the
    // caller's stderr: a caller reading it to its end is not held.
    let (_, status, lines) = detached("127.0.0.1:0", &[]);
    assert!(status.success(), "exited {status}");
    let daemon = daemon_pid();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match lines.recv_timeout(Duration::from_millis(100)) {
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            _ => assert!(Instant::now() < deadline, "stderr still held by the daemon"),
        }
    }
    assert!(
        nix::sys::signal::kill(daemon, None).is_ok(),
        "the daemon runs on"
    );
    stop(daemon);
    // A daemon that cannot bind makes the command fail, not succeed.
    let holder = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let taken = holder.local_addr().expect("addr").to_string();
    let (_, status, _) = detached(&taken, &[]);
    assert_eq!(status.code(), Some(1), "exited {status}");
}

/// What an RRQ for `name` to `to` gets first: DATA 1's payload, or the
/// ERROR's text (prefixed "ERROR ").
fn first_answer(name: &str, to: SocketAddr) -> String {
    let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
    client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let rrq = [&b"\0\x01"[..], name.as_bytes(), b"\0octet\0"].concat();
    client.send_to(&rrq, to).expect("send RRQ");
    let mut buf = [0u8; 600];
    let (n, from) = client.recv_from(&mut buf).expect("an answer");
    match buf[..4] {
        [0, 3, 0, 1] => {
            client.send_to(&[0, 4, 0, 1], from).expect("ACK");
            String::from_utf8_lossy(&buf[4..n]).into_owned()
        }
        [0, 5, ..] => format!("ERROR {}", String::from_utf8_lossy(&buf[4..n - 1])),
        _ => panic!("unexpected answer {:?}", &buf[..n]),
    }
}

#[test]
fn a_bad_remap_file_fails_start_up_naming_its_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rules = dir.path().join("rules");
    std::fs::write(&rules, "# fine so far\nr ^a b\nrQ ^x y\n").expect("write");
    let rules = rules.to_str().expect("utf-8 path");
    let (status, stderr) = run_to_exit(&["-a", "127.0.0.1:0", "-m", rules], dir.path());
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("rules: remap: line 3:"), "{stderr}");
    let (status, stderr) = run_to_exit(
        &["-a", "127.0.0.1:0", "-m", "/nonexistent/rules"],
        dir.path(),
    );
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/rules: No such file"),
        "{stderr}"
    );
}

#[test]
fn sighup_rereads_the_remap_file_and_a_bad_one_keeps_the_rules_in_force() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    for (name, body) in [("a", "file a"), ("b", "file b"), ("c", "file c")] {
        std::fs::write(root.join(name), body).expect("write");
    }
    let rules = dir.path().join("rules");
    std::fs::write(&rules, "r ^x$ a\n").expect("write");
    let mut cmd = binary();
    cmd.arg("-m").arg(&rules);
    let mut s = serve(cmd, &root);
    assert_eq!(first_answer("x", s.addr), "file a");
    let hup = |s: &Serving| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(s.child.id() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .expect("SIGHUP");
    };
    let wait_line = |s: &mut Serving, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = s.lines.recv_timeout(left) else {
                break;
            };
            s.seen.push(line.clone());
            if line.contains(what) {
                return;
            }
        }
        panic!("no line with {what:?}: {:?}", s.seen);
    };
    std::fs::write(&rules, "r ^x$ b\n").expect("write");
    hup(&s);
    wait_line(&mut s, "SIGHUP: reloaded");
    assert_eq!(
        first_answer("x", s.addr),
        "file b",
        "new rules for new requests"
    );
    std::fs::write(&rules, "r ^x$ c\nQ broken line\n").expect("write");
    hup(&s);
    wait_line(&mut s, "line 2:");
    assert_eq!(
        first_answer("x", s.addr),
        "file b",
        "a bad file changes nothing"
    );
    assert!(
        s.seen
            .iter()
            .any(|l| l.contains("keeping the rules in force")),
        "{:?}",
        s.seen
    );
    stop_child(&mut s.child);
}

/// Waits for a "serving" line and checks it names `addr`.
fn serving_on(s: &mut (mpsc::Receiver<String>, Vec<String>), addr: SocketAddr) {
    let seen = serving_address(&s.0, &mut s.1);
    assert_eq!(seen, addr, "{:?}", s.1);
}

#[test]
fn under_inetd_it_serves_the_socket_on_stdin_and_exits_when_idle() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("f"), vec![7u8; 10]).expect("write");
    // What inetd (wait) hands over: the bound socket as standard input.
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = socket.local_addr().expect("addr");
    let mut child = binary()
        .args(["-t", "2", "--stderr", "--threads", "1", "--permissive"])
        .arg(dir.path())
        .stdin(std::os::fd::OwnedFd::from(socket))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = (stderr_lines(&mut child), Vec::new());
    serving_on(&mut lines, addr);
    assert_eq!(
        first_answer("f", addr),
        "\x07".repeat(10),
        "the file, from the inherited socket"
    );
    let started = Instant::now();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "left before going idle"
    );
    drain(&lines.0, &mut lines.1);
    assert!(
        lines.1.iter().any(|l| l.contains("idle for 2 s")),
        "{:?}",
        lines.1
    );
}

#[test]
fn with_systemd_it_serves_the_activated_socket() {
    let Ok(activate) = which("systemd-socket-activate") else {
        assert_ne!(
            std::env::var("RINGTFTPD_REQUIRE_CLIENTS").as_deref(),
            Ok("1"),
            "systemd-socket-activate is missing (RINGTFTPD_REQUIRE_CLIENTS=1)"
        );
        eprintln!("SKIP: systemd-socket-activate not installed");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("f"), vec![7u8; 10]).expect("write");
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("a free port")
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = spawn(
        Command::new(&activate)
            .args(["--datagram", "-l", &addr.to_string()])
            .arg(env!("CARGO_BIN_EXE_ringtftpd"))
            .args(["--systemd", "-t", "0", "--threads", "2", "--permissive"])
            .arg(dir.path()),
    );
    let mut lines = (stderr_lines(&mut child), Vec::new());
    // systemd-socket-activate starts the server at the first datagram.
    activated(&child, addr);
    serving_on(&mut lines, addr);
    for _ in 0..4 {
        assert!(
            answers("127.0.0.1:0", addr),
            "no DATA from the activated socket"
        );
    }
    stop_child(&mut child);
    // Single-port routing on one shared socket: one thread takes it all.
    let mut child = spawn(
        Command::new(&activate)
            .args(["--datagram", "-l", &addr.to_string()])
            .arg(env!("CARGO_BIN_EXE_ringtftpd"))
            .args([
                "--systemd",
                "--single-port",
                "--threads",
                "2",
                "--permissive",
            ])
            .arg(dir.path()),
    );
    let mut lines = (stderr_lines(&mut child), Vec::new());
    activated(&child, addr);
    serving_on(&mut lines, addr);
    assert!(
        lines.1.iter().any(|l| l.contains("with 1 thread(s)")),
        "{:?}",
        lines.1
    );
    for _ in 0..4 {
        assert_eq!(first_answer("f", addr), "\x07".repeat(10));
    }
    stop_child(&mut child);
    // A .socket unit's sockets are taken without --systemd too (one unit
    // file serves both ways); --address is then ignored.
    let mut child = spawn(
        Command::new(&activate)
            .args(["--datagram", "-l", &addr.to_string()])
            .arg(env!("CARGO_BIN_EXE_ringtftpd"))
            .args(["--address", "127.0.0.1:1", "-t", "0", "--permissive"])
            .arg(dir.path()),
    );
    let mut lines = (stderr_lines(&mut child), Vec::new());
    activated(&child, addr);
    serving_on(&mut lines, addr);
    assert_eq!(first_answer("f", addr), "\x07".repeat(10));
    stop_child(&mut child);
    // Without sockets, --systemd refuses to start.
    let (status, stderr) = run_to_exit(&["--systemd"], dir.path());
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("--systemd: no sockets were passed"),
        "{stderr}"
    );
}

/// Sends requests until one is answered (the first starts the server).
fn activated(child: &Child, addr: SocketAddr) {
    for _ in 0..10 {
        if answers("127.0.0.1:0", addr) {
            return;
        }
    }
    panic!("pid {}: no answer on {addr}", child.id());
}

fn which(program: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(program))
        .find(|path| path.is_file())
        .ok_or(())
}

#[test]
fn logfile_gets_the_lines_and_sighup_reopens_it_for_rotation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(root.join("f"), "file f").expect("write");
    let log = dir.path().join("tftpd.log");
    let mut child = spawn(
        binary()
            .arg("--logfile")
            .arg(&log)
            .args(["--logformat", "tag", "-a", "127.0.0.1:0", "--threads", "1"])
            .args(["--permissive", "--shutdown-grace", "0"])
            .arg(&root),
    );
    let read = |path: &std::path::Path, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.contains(want) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "no {want:?} in {}: {text:?}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let text = read(&log, "serving");
    let addr: SocketAddr = text
        .split(" on ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|a| a.parse().ok())
        .expect("the address in the serving line");
    assert!(text.starts_with("<"), "tag format: {text:?}");
    assert_eq!(first_answer("f", addr), "file f");
    read(&log, "file=\"f\"");
    let rotated = dir.path().join("tftpd.log.1");
    std::fs::rename(&log, &rotated).expect("rotate");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .expect("SIGHUP");
    read(&log, "SIGHUP: reloaded");
    assert_eq!(first_answer("f", addr), "file f");
    stop_child(&mut child);
    let after = read(&log, "stopped");
    assert!(
        after.contains("file=\"f\""),
        "the new file has the new transfer: {after:?}"
    );
    assert!(!read(&rotated, "serving").contains("reloaded"));
}

#[test]
fn path_flags_act_as_in_tftpd_hpa_after_remapping() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("root");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::write(root.join("f"), "file f").expect("write");
    let abs = format!("{}/f", root.display());
    let denied = |text: &str| text.starts_with("ERROR ");
    // Without -s: tftpd-hpa's absolute names are served from inside too.
    let mut s = serve(binary(), &root);
    assert_eq!(first_answer(&abs, s.addr), "file f");
    assert_eq!(first_answer("f", s.addr), "file f");
    stop_child(&mut s.child);
    // --validate without -s: absolute names inside the directory only.
    let mut cmd = binary();
    cmd.arg("--validate");
    let mut s = serve(cmd, &root);
    assert_eq!(first_answer(&abs, s.addr), "file f");
    assert_eq!(
        first_answer(&format!("{}//f", root.display()), s.addr),
        "file f"
    );
    for bad in [
        "f".to_owned(),
        format!("{}/../root/f", root.display()),
        "/etc/passwd".into(),
    ] {
        assert!(denied(&first_answer(&bad, s.addr)), "{bad}");
    }
    stop_child(&mut s.child);
    // -s --validate: absolute names under the root; --normalize=root
    // makes relative ones absolute first.
    let mut cmd = binary();
    cmd.args(["-s", "--validate", "--normalize=root"]);
    let mut s = serve(cmd, &root);
    assert_eq!(first_answer("/f", s.addr), "file f");
    assert_eq!(first_answer("f", s.addr), "file f");
    assert!(denied(&first_answer("/./f", s.addr)));
    stop_child(&mut s.child);
    // --path-prefix P DIR serves P joined with DIR.
    let mut cmd = binary();
    cmd.arg("--path-prefix").arg(dir.path());
    let mut s = serve(cmd, std::path::Path::new("/root"));
    assert_eq!(first_answer("f", s.addr), "file f");
    stop_child(&mut s.child);
    // Several directories with -s are refused with a message, as tftpd-hpa
    // refuses them (tests/directories.rs serves them without -s).
    let (status, stderr) = run_to_exit(&["-s", dir.path().to_str().unwrap()], &root);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("several directories"), "{stderr}");
}
