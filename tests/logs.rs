//! The log through the built binary on loopback: `-v` levels, the JSON
//! events' documented fields, and drops counted (not waited for) when
//! nobody reads standard error. Every loop is bounded in count and time.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn start(extra: &[&str]) -> Server {
    Server::start_with(ServerOpts {
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        kind: Some(ServerKind::Ringtftpd),
        ..ServerOpts::default()
    })
}

/// Waits up to 5 s for a log line containing every one of `parts`.
fn wait_line(s: &Server, parts: &[&str]) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = s.log();
        if let Some(line) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return Some(line.to_string());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `-v` adds the debug events (here a transfer's start); without it the
/// same transfer logs only its info line.
#[test]
fn v_adds_debug_events_and_their_absence_is_the_default() {
    for (args, want_debug) in [(&[][..], false), (&["-v"][..], true)] {
        let s = start(args);
        let c = RawClient::new(s.addr());
        raw_get(&c, "b513.bin", "octet", &[], |_, _| {}).expect("download");
        let client = c.sock.local_addr().expect("addr").to_string();
        let client_field = format!("client={client}");
        let done = wait_line(&s, &["transfer ", &client_field, "outcome=completed"]);
        assert!(
            done.is_some(),
            "{args:?}: no transfer line in:\n{}",
            s.log()
        );
        let started = s
            .log()
            .lines()
            .any(|l| l.contains("transfer started") && l.contains(&client_field));
        assert_eq!(started, want_debug, "{args:?}:\n{}", s.log());
    }
}

/// `--log-format json`: each line parses, and the transfer and refusal
/// events carry the fields docs/operations.md lists, with their types.
#[test]
fn json_events_carry_the_documented_fields() {
    let s = start(&["--log-format", "json", "-v"]);
    let c = RawClient::new(s.addr());
    raw_get(&c, "b513.bin", "octet", &[("blksize", "1024")], |_, _| {}).expect("download");
    let (code, _) = c.expect_error(&rrq("no/such.cfg", "octet", &[]));
    assert_eq!(code, 1);
    let client = c.sock.local_addr().expect("addr").to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut transfer, mut refused, mut debug) = (None, None, None);
    while (transfer.is_none() || refused.is_none() || debug.is_none()) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
        for line in s.log().lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(v["time"].is_string(), "{line}");
            match (v["event"].as_str(), v["level"].as_str()) {
                (Some("transfer"), _) if v["client"] == client.as_str() => transfer = Some(v),
                (Some("refused"), _) if v["client"] == client.as_str() => refused = Some(v),
                (None, Some("debug")) if v["client"] == client.as_str() => debug = Some(v),
                _ => {}
            }
        }
    }
    let t = transfer.expect("a transfer event");
    assert_eq!(t["level"], "info");
    assert_eq!(t["local"], "127.0.0.1");
    assert_eq!(t["file"], "b513.bin");
    assert_eq!(t["direction"], "read");
    assert_eq!(t["bytes"], 513);
    assert_eq!(t["blocks"], 1, "513 bytes at blksize 1024");
    assert_eq!(t["mode"], "octet");
    assert!(
        t["options"]
            .as_str()
            .is_some_and(|o| o.contains("blksize=1024")),
        "{t}"
    );
    assert_eq!(t["blksize"], 1024);
    assert_eq!(t["windowsize"], 1);
    assert_eq!(t["retransmits"], 0);
    assert_eq!(t["outcome"], "completed");
    for number in ["duration_ms", "srtt_ms", "rto_floor_ms"] {
        assert!(t[number].is_f64(), "{number}: {t}");
    }
    let r = refused.expect("a refused event");
    assert_eq!(r["level"], "info");
    assert_eq!(r["file"], "no/such.cfg");
    assert_eq!(r["direction"], "read");
    assert_eq!(r["reason"], "not_found");
    assert_eq!(r["error_code"], 1);
    assert!(r["error"].is_string(), "{r}");
    let d = debug.expect("a debug event with -v");
    assert_eq!(d["msg"], "transfer started");
    assert_eq!(d["blksize"], 1024);
}

/// A loopback TCP port free a moment ago, for `--metrics`.
fn free_tcp_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    l.local_addr().expect("local_addr")
}

fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The value of the series starting with `name`, if scraped.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// With -vv every lock-step turn logs a trace line; nobody reads stderr,
/// so the pipe (64 KiB) and then the queue (8192 lines) fill: the
/// transfers go on at full speed and the shard counts what it dropped in
/// `ringtftpd_log_lines_dropped`.
#[test]
fn a_blocked_stderr_drops_lines_counts_them_and_never_stalls_a_transfer() {
    const TRANSFERS: usize = 8;
    let dir = tempfile::tempdir().expect("tempdir");
    let body = random_bytes(9, 1 << 20);
    std::fs::write(dir.path().join("big"), &body).expect("write fixture");
    let metrics = free_tcp_addr();
    let tftp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = tftp.local_addr().expect("addr");
    drop(tftp);
    let child = Command::new(env!("CARGO_BIN_EXE_ringtftpd"))
        .args(["-vv", "--threads", "1", "--request-rate", "0"])
        .arg("--address")
        .arg(addr.to_string())
        .arg("--metrics")
        .arg(metrics.to_string())
        .arg(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Held open and never read.
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringtftpd");
    let _server = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http_get(metrics, "/readyz").is_some_and(|t| t.starts_with("HTTP/1.0 200")) {
        assert!(Instant::now() < deadline, "server not ready in 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut slowest = Duration::ZERO;
    for i in 0..TRANSFERS {
        let t = Instant::now();
        let c = RawClient::new(addr);
        let dl = raw_get(&c, "big", "octet", &[], |_, _| {})
            .unwrap_or_else(|e| panic!("transfer {i}: {e}"));
        assert!(dl.data == body, "transfer {i}: wrong bytes");
        slowest = slowest.max(t.elapsed());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let dropped = loop {
        let text = http_get(metrics, "/metrics").expect("scrape");
        let dropped = metric(&text, "ringtftpd_log_lines_dropped").unwrap_or(0.0);
        if dropped > 0.0 || Instant::now() >= deadline {
            break dropped;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("{TRANSFERS} transfers of 1 MiB, slowest {slowest:?}, {dropped} lines dropped");
    // 2,048 trace lines a transfer against 8,192 queued and a full pipe.
    assert!(dropped >= 1000.0, "only {dropped} lines counted as dropped");
    assert!(
        slowest < Duration::from_secs(10),
        "a transfer took {slowest:?}: the shard waited for the log"
    );
}
