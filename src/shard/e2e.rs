//! End-to-end tests of one shard over loopback: a real io_uring, real
//! sockets, the real endpoint and file root, and a small lock-step TFTP
//! client on a std `UdpSocket`. Every loop is bounded in count and time.

use std::fs;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{ShardConfig, ShardHandle, Tuning, net, spawn_tuned};
use crate::endpoint::EndpointConfig;
use crate::files::FileRoot;
use crate::policy::Settings;
use crate::session::Limits;

mod netns;

fn limits() -> Limits {
    Limits {
        max_blksize: 65464,
        max_windowsize: 64,
        mtu_clamp: true,
        initial_rto: Duration::from_millis(200),
        rto_min: Duration::from_millis(20),
        rto_max: Duration::from_secs(1),
        retries: 3,
        max_stall: Duration::from_secs(60),
        // Retries alone decide when a silent peer is given up.
        min_give_up: Duration::ZERO,
        ..Limits::default()
    }
}

fn small_tuning() -> Tuning {
    Tuning {
        sq_entries: 256,
        cq_entries: 1024,
        listen_bufs: (64, 2048),
        session_bufs: (64, 1024),
        send_slots: 64,
        min_idle_choice: super::pool::MIN_IDLE_CHOICE,
        ..Tuning::default()
    }
}

/// Spawns a shard serving `dir` on `addr`; `None` (test skipped) if this
/// machine has no io_uring or no such address family.
fn start(
    dir: &Path,
    addr: &str,
    grace: Duration,
    tuning: Tuning,
) -> Option<(ShardHandle, SocketAddr)> {
    start_with(dir, addr, grace, tuning, limits())
}

/// As `start`, with the sessions' `limits`.
fn start_with(
    dir: &Path,
    addr: &str,
    grace: Duration,
    tuning: Tuning,
    limits: Limits,
) -> Option<(ShardHandle, SocketAddr)> {
    start_ported(dir, addr, grace, tuning, limits, None)
}

/// As `start_with`, with transfer ports confined to `port_range`.
fn start_ported(
    dir: &Path,
    addr: &str,
    grace: Duration,
    tuning: Tuning,
    limits: Limits,
    port_range: Option<(u16, u16)>,
) -> Option<(ShardHandle, SocketAddr)> {
    start_adjusted(dir, addr, grace, tuning, limits, |c| {
        c.port_range = port_range
    })
}

/// As `start_with`, with the `--single-port` endpoint.
fn start_single_port(dir: &Path, addr: &str, grace: Duration) -> Option<(ShardHandle, SocketAddr)> {
    start_adjusted(dir, addr, grace, small_tuning(), limits(), |c| {
        c.endpoint.single_port = true
    })
}

/// As `start_with`, with the shard's configuration changed by `adjust`.
fn start_adjusted(
    dir: &Path,
    addr: &str,
    grace: Duration,
    tuning: Tuning,
    limits: Limits,
    adjust: impl FnOnce(&mut ShardConfig),
) -> Option<(ShardHandle, SocketAddr)> {
    let listener = match net::bind_listener(addr.parse().unwrap(), 1 << 20) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("skipping: cannot bind {addr}: {e}");
            return None;
        }
    };
    let local = listener.local_addr().unwrap();
    let config = ShardConfig {
        index: 0,
        cpu: None,
        listeners: vec![listener],
        endpoint: EndpointConfig {
            max_sessions: 32,
            settings: Settings {
                limits,
                error_replies_per_sec: 100,
                error_reply_burst: 100,
                open_cache_ttl: Duration::from_secs(1),
                ..Settings::default()
            },
            ..EndpointConfig::default()
        },
        files: FileRoot::open(dir, true).unwrap(),
        more_files: Vec::new(),
        uploads: None,
        log_transfers: true,
        hook: None,
        shutdown_grace: grace,
        port_range: None,
        shards: 1,
        file_labels: None,
    };
    let mut config = config;
    adjust(&mut config);
    match spawn_tuned(config, tuning) {
        Ok(h) => Some((h, local)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
            eprintln!("skipping: io_uring unavailable ({e})");
            None
        }
        Err(e) => panic!("spawn: {e}"),
    }
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut p = vec![0, 1];
    p.extend_from_slice(name.as_bytes());
    p.push(0);
    p.extend_from_slice(b"octet\0");
    for (k, v) in options {
        p.extend_from_slice(k.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

/// A read that ran to the final DATA block.
#[derive(Debug)]
struct Download {
    data: Vec<u8>,
    /// The server's transfer address (its TID).
    tid: SocketAddr,
    oack: Vec<(String, String)>,
}

/// An ERROR packet that ended a read.
#[derive(Debug)]
struct Refusal {
    code: u16,
    message: String,
    from: SocketAddr,
}

#[derive(Debug)]
enum Fetch {
    Done(Download),
    Error(Refusal),
}

impl Fetch {
    #[track_caller]
    fn expect_done(self) -> Download {
        match self {
            Fetch::Done(d) => d,
            other => panic!("{other:?}"),
        }
    }

    /// The download, checked to be exactly `want`.
    #[track_caller]
    fn expect_body(self, want: &[u8]) -> Download {
        let got = self.expect_done();
        assert!(
            got.data == want,
            "content differs ({} vs {} bytes)",
            got.data.len(),
            want.len()
        );
        got
    }

    /// The ERROR, checked to carry `code`.
    #[track_caller]
    fn expect_error(self, code: u16) -> Refusal {
        match self {
            Fetch::Error(e) => {
                assert_eq!(e.code, code, "{e:?}");
                e
            }
            other => panic!("expected an ERROR, got {other:?}"),
        }
    }
}

/// A temporary file root holding `files` (name, content).
fn root_with(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in files {
        fs::write(dir.path().join(name), body).unwrap();
    }
    dir
}

/// A shard and the temporary root it serves (kept until the test ends).
struct Served {
    root: tempfile::TempDir,
    handle: ShardHandle,
    addr: SocketAddr,
}

/// `files` served with the usual settings: IPv4 loopback, 1 s grace, small
/// rings; `None` as for `start`.
fn serve(files: &[(&str, &[u8])]) -> Option<Served> {
    let root = root_with(files);
    let (handle, addr) = start(
        root.path(),
        "127.0.0.1:0",
        Duration::from_secs(1),
        small_tuning(),
    )?;
    Some(Served { root, handle, addr })
}

impl Served {
    fn stop(self) {
        stop(self.handle);
    }
}

fn client_for(server: SocketAddr) -> UdpSocket {
    let bind = if server.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let sock = UdpSocket::bind(bind).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    sock
}

/// A lock-step (or windowed, RFC 7440) read of `name`.
fn fetch(server: SocketAddr, name: &str, options: &[(&str, &str)]) -> Fetch {
    fetch_with(server, name, options, |_, _| {})
}

/// As `fetch`, calling `on_block(tid, block)` after each in-order DATA,
/// before it is acknowledged.
fn fetch_with(
    server: SocketAddr,
    name: &str,
    options: &[(&str, &str)],
    on_block: impl FnMut(SocketAddr, u16),
) -> Fetch {
    fetch_from(&client_for(server), server, name, options, on_block)
}

/// Checks that `name` is refused with ERROR `code`, sent from `server`
/// itself (the listener), not from a transfer socket.
#[track_caller]
fn assert_refused(server: SocketAddr, name: &str, code: u16) {
    let e = fetch(server, name, &[]).expect_error(code);
    assert_eq!(
        e.from, server,
        "ERROR from the address the request was sent to"
    );
}

/// Sends ACK `block` to `dest`, keeping it for retransmission.
fn send_ack(sock: &UdpSocket, dest: SocketAddr, block: u16, last_sent: &mut Vec<u8>) {
    *last_sent = ack(block).to_vec();
    sock.send_to(last_sent, dest).unwrap();
}

/// The lower-cased name/value pairs of an OACK's option fields.
fn parse_oack(fields: &[u8]) -> Vec<(String, String)> {
    let fields: Vec<&[u8]> = fields.split(|&b| b == 0).collect();
    fields
        .chunks(2)
        .map(|kv| {
            let k = String::from_utf8_lossy(kv[0]).to_ascii_lowercase();
            let v = String::from_utf8_lossy(kv.get(1).copied().unwrap_or(b"")).into_owned();
            (k, v)
        })
        .collect()
}

/// As `fetch_with`, from the client socket `sock`.
fn fetch_from(
    sock: &UdpSocket,
    server: SocketAddr,
    name: &str,
    options: &[(&str, &str)],
    mut on_block: impl FnMut(SocketAddr, u16),
) -> Fetch {
    let request = rrq(name, options);
    sock.send_to(&request, server).unwrap();
    let mut last_sent = request;
    let mut dest = server;
    let mut tid: Option<SocketAddr> = None;
    let mut blksize = 512usize;
    let mut window = 1u16;
    let mut expected = 1u16;
    let mut data = Vec::new();
    let mut oack = Vec::new();
    let mut timeouts = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut buf = vec![0u8; 70_000];
    while Instant::now() < deadline {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                timeouts += 1;
                assert!(timeouts < 10, "server went silent");
                sock.send_to(&last_sent, dest).unwrap();
                continue;
            }
            // A ring built by this thread and closed since (a shard of an
            // earlier step) queues its exit work here with a signal-like
            // notification, which cuts a blocking receive short: retry
            // (bounded by the deadline).
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("recv: {e}"),
        };
        let p = &buf[..n];
        assert!(n >= 4, "runt datagram {p:?}");
        let opcode = u16::from_be_bytes([p[0], p[1]]);
        if opcode == 5 {
            return Fetch::Error(Refusal {
                code: u16::from_be_bytes([p[2], p[3]]),
                message: String::from_utf8_lossy(&p[4..n - 1]).into_owned(),
                from,
            });
        }
        match tid {
            None => {
                tid = Some(from);
                dest = from;
            }
            Some(t) if t != from => continue,
            Some(_) => {}
        }
        match opcode {
            6 => {
                for (k, v) in parse_oack(&p[2..n - 1]) {
                    match k.as_str() {
                        "blksize" => blksize = v.parse().unwrap(),
                        "windowsize" => window = v.parse().unwrap(),
                        _ => {}
                    }
                    oack.push((k, v));
                }
                send_ack(sock, dest, 0, &mut last_sent);
            }
            3 => {
                let block = u16::from_be_bytes([p[2], p[3]]);
                let payload = &p[4..];
                if block != expected {
                    // Out of order or a duplicate: ack what we have (RFC 7440 §4).
                    send_ack(sock, dest, expected.wrapping_sub(1), &mut last_sent);
                    continue;
                }
                data.extend_from_slice(payload);
                on_block(dest, block);
                expected = expected.wrapping_add(1);
                let last = payload.len() < blksize;
                if last || block % window == 0 {
                    send_ack(sock, dest, block, &mut last_sent);
                }
                if last {
                    return Fetch::Done(Download {
                        data,
                        tid: dest,
                        oack,
                    });
                }
            }
            other => panic!("unexpected opcode {other}"),
        }
    }
    panic!("transfer did not finish in time");
}

fn stop(handle: ShardHandle) {
    handle.shut_down();
    let started = Instant::now();
    handle.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        started.elapsed()
    );
}

#[test]
fn lock_step_download_matches_the_file() {
    let body = content(100_000, 1);
    let Some(shard) = serve(&[("boot.img", &body)]) else {
        return;
    };
    let got = fetch(shard.addr, "boot.img", &[]).expect_body(&body);
    // RFC 1350 §4: a new TID, from the address the request went to.
    assert_ne!(got.tid.port(), shard.addr.port());
    assert_eq!(got.tid.ip(), shard.addr.ip());
    shard.stop();
}

#[test]
fn windowed_download_with_options_and_exact_multiple_of_blksize() {
    // A multiple of the block size: ends with an empty DATA block.
    let body = content(1024 * 40, 2);
    let big = content(300_000, 3);
    let Some(shard) = serve(&[("k", &body), ("big", &big)]) else {
        return;
    };
    let options = [("blksize", "1024"), ("windowsize", "8"), ("tsize", "0")];
    let oack = fetch(shard.addr, "k", &options).expect_body(&body).oack;
    let tsize = ("tsize".into(), body.len().to_string());
    let windowsize = ("windowsize".into(), "8".into());
    assert!(
        oack.contains(&tsize) && oack.contains(&windowsize),
        "{oack:?}"
    );
    // Windows bigger than the send pool (64 slots): the ready queue serves
    // the rest as slots come back; big blocks over loopback (MTU 65536).
    let options = [("blksize", "8192"), ("windowsize", "64")];
    fetch(shard.addr, "big", &options).expect_body(&big);
    shard.stop();
}

#[test]
fn new_settings_reach_new_requests_and_running_transfers_keep_theirs() {
    let body = content(200_000, 9);
    let Some(shard) = serve(&[("k", &body)]) else {
        return;
    };
    let smaller = Settings {
        limits: Limits {
            max_blksize: 512,
            ..limits()
        },
        ..Settings::default()
    };
    let mut sent = Some(super::Command::Settings(Arc::new(smaller)));
    let options = [("blksize", "1024")];
    // Sent while the transfer runs: it goes on with its 1024-byte blocks.
    let running = fetch_with(shard.addr, "k", &options, |_, block| {
        if block == 2 {
            assert!(shard.handle.send(sent.take().expect("sent once")));
        }
    })
    .expect_body(&body);
    assert!(sent.is_none());
    assert!(running.oack.contains(&("blksize".into(), "1024".into())));
    let next = fetch(shard.addr, "k", &options).expect_body(&body);
    assert!(
        next.oack.contains(&("blksize".into(), "512".into())),
        "{:?}",
        next.oack
    );
    shard.stop();
}

/// `n` consecutive loopback UDP ports free now, found by binding them.
fn free_port_run(n: u16) -> (u16, u16) {
    for base in (42_000u16..60_000).step_by(97) {
        let held: Vec<_> = (base..base + n)
            .map_while(|p| UdpSocket::bind(("127.0.0.1", p)).ok())
            .collect();
        if held.len() == usize::from(n) {
            return (base, base + n - 1);
        }
    }
    panic!("no {n} free consecutive ports");
}

#[test]
fn transfer_ports_stay_in_the_range_and_a_full_range_is_busy() {
    let body = content(3000, 5);
    let root = root_with(&[("f", &body)]);
    let (low, high) = free_port_run(4);
    let grace = Duration::from_secs(1);
    // No patience: busy is answered at once (by default the endpoint first
    // stays silent for the client's own retry; tests/metrics.rs has that).
    let Some((handle, addr)) = start_adjusted(
        root.path(),
        "127.0.0.1:0",
        grace,
        small_tuning(),
        limits(),
        |c| {
            c.port_range = Some((low, high));
            c.endpoint.settings.busy_patience = Duration::ZERO;
        },
    ) else {
        return;
    };
    for _ in 0..8 {
        let got = fetch(addr, "f", &[]).expect_body(&body);
        assert!((low..=high).contains(&got.tid.port()), "TID {}", got.tid);
    }
    // Every port of the range taken by others: refused, from the listener,
    // with ERROR 0 "server busy", not a hang.
    let mut held = Vec::new();
    for port in low..=high {
        let deadline = Instant::now() + Duration::from_secs(5);
        // A port the last transfers used is free once their sockets close.
        loop {
            match UdpSocket::bind(("127.0.0.1", port)) {
                Ok(sock) => break held.push(sock),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("port {port} stays taken: {e}"),
            }
        }
    }
    let refused = fetch(addr, "f", &[]).expect_error(0);
    assert_eq!(refused.from, addr);
    assert!(refused.message.contains("busy"), "{}", refused.message);
    drop(held);
    fetch(addr, "f", &[]).expect_body(&body);
    stop(handle);
}

#[test]
fn concurrent_downloads_with_a_tiny_buffer_ring() {
    let body = content(64 * 1024, 4);
    let dir = root_with(&[("f", &body)]);
    // Four session buffers for eight clients: the transfer sockets' receives
    // run dry (-ENOBUFS) and must be re-armed.
    let tuning = Tuning {
        session_bufs: (4, 256),
        send_slots: 8,
        ..small_tuning()
    };
    let Some((handle, addr)) = start(dir.path(), "127.0.0.1:0", Duration::from_secs(1), tuning)
    else {
        return;
    };
    // All eight run at once; a panic in any fails the scope.
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| fetch(addr, "f", &[("windowsize", "4")]).expect_body(&body));
        }
    });
    stop(handle);
}

#[test]
fn errors_come_from_the_listener_address() {
    let Some(shard) = serve(&[]) else {
        return;
    };
    assert_refused(shard.addr, "missing", 1);
    assert_refused(shard.addr, "../etc/passwd", 2);
    shard.stop();
}

#[test]
fn stranger_gets_error_5_and_transfer_goes_on() {
    let body = content(5000, 5);
    let Some(shard) = serve(&[("f", &body)]) else {
        return;
    };
    let stranger = client_for(shard.addr);
    let mut poked = false;
    fetch_with(shard.addr, "f", &[], |tid, block| {
        if block == 2 && !poked {
            poked = true;
            stranger.send_to(&ack(2), tid).unwrap();
            let mut buf = [0u8; 600];
            let (n, from) = stranger.recv_from(&mut buf).unwrap();
            assert_eq!(from, tid);
            assert_eq!(&buf[..4], &[0, 5, 0, 5], "ERROR 5: {:?}", &buf[..n]);
        }
    })
    .expect_body(&body);
    assert!(poked);
    shard.stop();
}

#[test]
fn ipv6_and_dual_stack_downloads() {
    let body = content(3000, 6);
    let dir = root_with(&[("f", &body)]);
    let grace = Duration::from_secs(1);
    if let Some((handle, addr)) = start(dir.path(), "[::1]:0", grace, small_tuning()) {
        let got = fetch(addr, "f", &[("blksize", "1400")]).expect_body(&body);
        assert_eq!(got.tid.ip(), addr.ip());
        stop(handle);
    }
    // [::] serves IPv4 clients too (v4-mapped), answering from plain IPv4.
    if let Some((handle, addr)) = start(dir.path(), "[::]:0", grace, small_tuning()) {
        let v4: SocketAddr = SocketAddr::from(([127, 0, 0, 1], addr.port()));
        let got = fetch(v4, "f", &[]).expect_body(&body);
        assert_eq!(got.tid.ip(), v4.ip());
        assert_refused(v4, "nope", 1);
        stop(handle);
    }
}

#[test]
fn single_port_downloads_leave_from_the_listening_address() {
    let body = content(300_000, 21);
    let dir = root_with(&[("f", &body)]);
    let grace = Duration::from_secs(1);
    // A wildcard listener: the address each request was sent to is the
    // one its transfer leaves from (pktinfo), 127.0.0.2 included.
    let Some((handle, addr)) = start_single_port(dir.path(), "0.0.0.0:0", grace) else {
        return;
    };
    for ip in [[127, 0, 0, 1], [127, 0, 0, 2]] {
        let server = SocketAddr::from((ip, addr.port()));
        let got = fetch(server, "f", &[]).expect_body(&body);
        assert_eq!(got.tid, server, "lock step: every DATA from the listener");
        // Windows of 8 KiB blocks: UDP GSO sends with the source address.
        let opts = [("blksize", "8192"), ("windowsize", "16")];
        let got = fetch(server, "f", &opts).expect_body(&body);
        assert_eq!(got.tid, server, "windowed");
    }
    // Several clients of one address at once, told apart by their ports.
    let server = SocketAddr::from(([127, 0, 0, 1], addr.port()));
    std::thread::scope(|s| {
        for _ in 0..6 {
            s.spawn(|| {
                let got = fetch(server, "f", &[("windowsize", "4")]).expect_body(&body);
                assert_eq!(got.tid, server);
            });
        }
    });
    handle.shut_down();
    let c = handle.join_report().unwrap().counters;
    assert!(c.gso_sends > 0, "no segmented send from the listener");
    assert_eq!((c.gso_fallbacks, c.send_errors), (0, 0));
    // A dual-stack listener answers IPv4 clients from their plain IPv4
    // address (v4-mapped pktinfo, with and without GSO).
    if let Some((handle, addr)) = start_single_port(dir.path(), "[::]:0", grace) {
        let v4 = SocketAddr::from(([127, 0, 0, 1], addr.port()));
        let got = fetch(v4, "f", &[("blksize", "1400"), ("windowsize", "8")]).expect_body(&body);
        assert_eq!(got.tid, v4);
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, addr.port()));
        let got = fetch(v6, "f", &[]).expect_body(&body);
        assert_eq!(got.tid, v6);
        stop(handle);
    }
}

#[test]
fn single_port_stranger_gets_error_5_from_the_listener_and_the_transfer_goes_on() {
    let body = content(5000, 22);
    let dir = root_with(&[("f", &body)]);
    let Some((handle, addr)) = start_single_port(dir.path(), "127.0.0.1:0", Duration::from_secs(1))
    else {
        return;
    };
    let stranger = client_for(addr);
    let mut poked = false;
    let got = fetch_with(addr, "f", &[], |tid, block| {
        if block == 2 && !poked {
            poked = true;
            assert_eq!(tid, addr);
            stranger.send_to(&ack(2), tid).unwrap();
            let mut buf = [0u8; 600];
            let (n, from) = stranger.recv_from(&mut buf).unwrap();
            assert_eq!(from, addr);
            assert_eq!(&buf[..4], &[0, 5, 0, 5], "ERROR 5: {:?}", &buf[..n]);
        }
    })
    .expect_body(&body);
    assert!(poked);
    assert_eq!(got.tid, addr);
    stop(handle);
}

#[test]
fn single_port_transfer_finishes_within_the_shutdown_grace() {
    // Its ACKs come to the listener, which must keep receiving while the
    // shard drains.
    let body = content(20_000, 23);
    let dir = root_with(&[("f", &body)]);
    let Some((handle, addr)) = start_single_port(dir.path(), "127.0.0.1:0", Duration::from_secs(3))
    else {
        return;
    };
    let mut handle = Some(handle);
    let got = fetch_with(addr, "f", &[], |_, block| {
        if block == 3
            && let Some(h) = handle.as_ref()
        {
            h.shut_down();
        }
    });
    assert!(
        got.expect_done().data == body,
        "completed despite the shutdown"
    );
    // New requests meanwhile are told why they are refused.
    let started = Instant::now();
    handle.take().unwrap().join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "returned once idle, not at the grace deadline"
    );
}

#[test]
fn truncated_file_aborts_the_transfer_without_sigbus() {
    let Some(shard) = serve(&[("shrinks", &content(256 * 1024, 7))]) else {
        return;
    };
    let path = shard.root.path().join("shrinks");
    let got = fetch_with(shard.addr, "shrinks", &[], |_, block| {
        if block == 1 {
            // Truncate the mapped file under the transfer.
            fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(0)
                .unwrap();
        }
    });
    assert_eq!(got.expect_error(0).message, "file changed during transfer");
    // The shard is still alive and serving.
    fs::write(shard.root.path().join("ok"), b"fine").unwrap();
    fetch(shard.addr, "ok", &[]).expect_body(b"fine");
    shard.stop();
}

#[test]
fn shutdown_aborts_live_transfers_after_the_grace_period() {
    let dir = root_with(&[("f", &content(50_000, 8))]);
    let grace = Duration::from_millis(300);
    let Some((handle, addr)) = start(dir.path(), "127.0.0.1:0", grace, small_tuning()) else {
        return;
    };
    let client = client_for(addr);
    client.send_to(&rrq("f", &[]), addr).unwrap();
    let mut buf = [0u8; 1024];
    let (_, tid) = client.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..4], &[0, 3, 0, 1]);
    let asked = Instant::now();
    handle.shut_down();
    // New requests are no longer served.
    let late = client_for(addr);
    late.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    late.send_to(&rrq("f", &[]), addr).unwrap();
    // The live transfer never ACKs: after the grace it gets ERROR 0.
    let mut got_error = false;
    for _ in 0..50 {
        match client.recv_from(&mut buf) {
            Ok((n, from)) if from == tid && buf[..2] == [0, 5] => {
                assert_eq!(&buf[4..n - 1], b"server shutting down");
                got_error = true;
                break;
            }
            Ok(_) => continue, // retransmitted DATA 1
            Err(_) => continue,
        }
    }
    assert!(got_error, "no ERROR after shutdown");
    assert!(
        asked.elapsed() >= Duration::from_millis(250),
        "aborted before the grace period"
    );
    handle.join().unwrap();
    assert!(asked.elapsed() < Duration::from_secs(5));
    // The listener is closed or no longer read: no DATA for the late request.
    let mut lbuf = [0u8; 600];
    if let Ok((n, _)) = late.recv_from(&mut lbuf) {
        assert_ne!(
            &lbuf[..2],
            &[0, 3],
            "late request was served: {:?}",
            &lbuf[..n]
        );
    }
}

#[test]
fn shutdown_waits_for_a_transfer_that_finishes_within_the_grace() {
    let body = content(20_000, 9);
    let dir = root_with(&[("f", &body)]);
    let grace = Duration::from_secs(3);
    let Some((handle, addr)) = start(dir.path(), "127.0.0.1:0", grace, small_tuning()) else {
        return;
    };
    let mut handle = Some(handle);
    let got = fetch_with(addr, "f", &[], |_, block| {
        if block == 3
            && let Some(h) = handle.as_ref()
        {
            h.shut_down();
        }
    });
    assert!(
        got.expect_done().data == body,
        "the transfer completed despite the shutdown"
    );
    let started = Instant::now();
    handle.take().unwrap().join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "returned once idle, not at the grace deadline"
    );
}

#[test]
fn transfer_sockets_are_reused_but_never_for_the_same_client() {
    let body = content(3000, 7);
    let dir = root_with(&[("f", &body)]);
    // Reuse from a pool of one, so the test can tell which socket it got.
    let tuning = Tuning {
        min_idle_choice: 1,
        ..small_tuning()
    };
    let Some((handle, addr)) = start(dir.path(), "127.0.0.1:0", Duration::from_secs(1), tuning)
    else {
        return;
    };
    let tid_of = |sock: &UdpSocket| {
        fetch_from(sock, addr, "f", &[], |_, _| {})
            .expect_body(&body)
            .tid
    };
    let a = client_for(addr);
    let b = client_for(addr);
    let first = tid_of(&a);
    // Let the shard see the final ACK and pool the socket.
    std::thread::sleep(Duration::from_millis(50));
    // Another client gets the pooled socket: same port, a new TID for it.
    let second = tid_of(&b);
    assert_eq!(second, first, "the idle socket was not reused");
    std::thread::sleep(Duration::from_millis(50));
    // The client that used it last gets another one (RFC 1350: new TID).
    let third = tid_of(&b);
    assert_ne!(third, second);
    stop(handle);
}

/// A small pool is not drawn from: each of these consecutive clients gets a
/// port of the kernel's choosing, never the one the client before saw (a
/// spoofer who learnt it could forge ACK 0 from a victim).
#[test]
fn consecutive_transfers_do_not_reuse_the_previous_port() {
    let body = content(700, 8);
    let Some(shard) = serve(&[("f", &body)]) else {
        return;
    };
    let mut tids = Vec::new();
    for _ in 0..12 {
        tids.push(fetch(shard.addr, "f", &[]).expect_body(&body).tid);
        // Let the shard see the final ACK and pool the socket.
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut distinct = tids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), tids.len(), "a port came back: {tids:?}");
    shard.stop();
}

/// A datagram longer than a session buffer arrives cut (MSG_TRUNC): it is
/// ignored, not read as the ACK its first bytes look like.
#[test]
fn truncated_session_datagram_is_ignored() {
    let body = content(2000, 10);
    let Some(shard) = serve(&[("f", &body)]) else {
        return;
    };
    let client = client_for(shard.addr);
    client.send_to(&rrq("f", &[]), shard.addr).unwrap();
    let mut buf = [0u8; 1024];
    let (_, tid) = client.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..4], &[0, 3, 0, 1]);
    // "ACK 1" padded to 2000 bytes: more than the 1024-byte session buffer.
    let mut long = ack(1).to_vec();
    long.resize(2000, 0);
    client.send_to(&long, tid).unwrap();
    // Not taken as ACK 1: DATA 1 comes again (retransmission), not DATA 2.
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!(from, tid);
    assert_eq!(&buf[..4], &[0, 3, 0, 1], "{:?}", &buf[..n.min(8)]);
    // A whole ACK 1 goes on as usual.
    client.send_to(&ack(1), tid).unwrap();
    let (_, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!((from, &buf[..4]), (tid, &[0u8, 3, 0, 2][..]));
    shard.stop();
}

#[test]
fn file_rewritten_in_place_ends_the_transfer_with_an_error_not_the_final_block() {
    // 10 blocks; same length after the rewrite, so no fault and no short
    // mapping: only the change check can stop it.
    let old = content(5000, 10);
    let new = content(5000, 11);
    assert_ne!(old, new);
    let Some(shard) = serve(&[("boot.img", &old)]) else {
        return;
    };
    let path = shard.root.path().join("boot.img");
    let got = fetch_with(shard.addr, "boot.img", &[], |_, block| {
        if block == 2 {
            // Paused mid-file (block 2 not yet acknowledged): rewrite in
            // place as `cp new old` does, a tick after the open so the
            // timestamps can move even where they are coarse.
            std::thread::sleep(Duration::from_millis(20));
            fs::write(&path, &new).unwrap();
        }
    });
    assert_eq!(got.expect_error(0).message, "file changed during transfer");
    // The shard goes on, and serves the new version whole.
    std::thread::sleep(Duration::from_millis(1100)); // past the open cache
    fetch(shard.addr, "boot.img", &[]).expect_body(&new);
    shard.stop();
}

/// A client for shutdown tests: reads `name` windowed from `server`,
/// acknowledging each window, until an ERROR, `stop`, or 5 s; counts the
/// DATA blocks it got in `blocks`. Never panics on silence.
fn drive(
    server: SocketAddr,
    name: &str,
    options: &[(&str, &str)],
    window: u16,
    blocks: &std::sync::atomic::AtomicUsize,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    let sock = client_for(server);
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    sock.send_to(&rrq(name, options), server).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = vec![0u8; 70_000];
    let mut next = 1u16;
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        match (n >= 4).then(|| u16::from_be_bytes([buf[0], buf[1]])) {
            Some(6) => {
                sock.send_to(&ack(0), from).unwrap();
            }
            Some(3) => {
                let block = u16::from_be_bytes([buf[2], buf[3]]);
                blocks.fetch_add(1, Ordering::Relaxed);
                if block == next {
                    next = next.wrapping_add(1);
                    if block % window == 0 {
                        sock.send_to(&ack(block), from).unwrap();
                    }
                } else {
                    // A gap (a full receive buffer): ask from the last in order.
                    sock.send_to(&ack(next.wrapping_sub(1)), from).unwrap();
                }
            }
            _ => return,
        }
    }
}

#[test]
fn shutdown_mid_window_reaps_every_operation_before_freeing() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let body = content(4 << 20, 31);
    let dir = root_with(&[("big", &body)]);
    // No grace and no final drain: the shard tears down in the turn that
    // aborts the transfers, with their ERRORs, cancels and receives, and
    // windows bigger than the send pool, still in the kernel.
    let tuning = Tuning {
        final_drain: Duration::ZERO,
        ..small_tuning()
    };
    let Some((handle, addr)) = start(dir.path(), "127.0.0.1:0", Duration::ZERO, tuning) else {
        return;
    };
    let options = [("blksize", "8192"), ("windowsize", "64")];
    let stop = AtomicBool::new(false);
    let blocks: Vec<AtomicUsize> = (0..4).map(|_| AtomicUsize::new(0)).collect();
    let report = std::thread::scope(|s| {
        for b in &blocks {
            let stop = &stop;
            s.spawn(move || drive(addr, "big", &options, 64, b, stop));
        }
        let t0 = Instant::now();
        while blocks.iter().any(|b| b.load(Ordering::Relaxed) < 100) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "transfers did not get going"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        handle.shut_down();
        let report = handle.join_report().unwrap();
        stop.store(true, Ordering::Relaxed);
        report
    });
    assert_eq!(report.counters.started, 4, "{report:?}");
    assert!(report.outstanding_at_teardown > 0, "{report:?}");
    assert_eq!(report.outstanding_at_free, 0, "{report:?}");
    assert!(!report.leaked, "{report:?}");
}

#[test]
fn teardown_past_its_bound_leaks_instead_of_freeing() {
    let body = content(3000, 32);
    let dir = root_with(&[("f", &body)]);
    // No time for cancelled operations to complete: the pooled socket's
    // multishot receive (still armed after the transfer) is outstanding.
    let tuning = Tuning {
        reap_bound: Duration::ZERO,
        ..small_tuning()
    };
    let Some((handle, addr)) = start(dir.path(), "127.0.0.1:0", Duration::ZERO, tuning) else {
        return;
    };
    fetch(addr, "f", &[]).expect_body(&body);
    handle.shut_down();
    let report = handle.join_report().unwrap();
    assert!(report.outstanding_at_teardown > 0, "{report:?}");
    // The cancel itself is outstanding too.
    assert_eq!(
        report.outstanding_at_free,
        report.outstanding_at_teardown + 1,
        "{report:?}"
    );
    assert!(report.leaked, "{report:?}");
}
