//! A request flood against the built `ringtftpd` on loopback: datagrams
//! from many source ports on several client addresses (127.0.0.2-6), at
//! the highest rate the sending threads reach, mixing requests for missing
//! files, requests for real files that are never (or only once) ACKed,
//! WRQs, malformed requests and oversized datagrams (4000 and 65000 bytes).
//!
//! Meanwhile a legitimate client on its own address (127.0.0.9) downloads
//! files over and over: every one must complete byte-exact, within a
//! generous latency bound; its p50 and max latency are printed. The server's
//! RSS and open descriptors are sampled throughout and must stay under sane
//! ceilings, fall back once the flood's sessions have given up, and the
//! server must still serve afterwards.
//!
//! Bounded: a datagram count and a deadline; loopback only.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Flooding client addresses: 127.0.0.2 ..= 127.0.0.6.
const FLOOD_ADDRS: u8 = 5;
/// Source sockets (ports) per flooding address.
const SOCKS_PER_ADDR: usize = 100;
/// The legitimate client's own address.
const LEGIT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 9);
/// No flood runs longer than this, whatever its count.
const FLOOD_DEADLINE: Duration = Duration::from_secs(20);
/// Longest wait for the flood's abandoned sessions to give up.
const SETTLE_LIMIT: Duration = Duration::from_secs(30);
/// Shortest wait: twice the give-up time of a session that never hears
/// back under the server flags `flood` uses (0.2 + 0.4 + 3 x 0.8 s, and
/// the last wait).
const SETTLE_MIN: Duration = Duration::from_secs(8);

/// Ceilings, far above what a healthy server needs (see the figures in
/// docs/robustness/churn-flood-soak.md) and far below a leak of one
/// descriptor or one buffer per datagram. Without a per-client session cap
/// every never-ACKed RRQ holds a socket: the 50,000 flood then needs ~12,000.
const MAX_RSS_KIB: u64 = 256 * 1024;
const MAX_FDS: usize = 4096;
/// Legitimate transfers: the slowest may take this long (RRQ retries
/// included), half of them a tenth of it.
const MAX_LEGIT_LATENCY: Duration = Duration::from_secs(10);
const MAX_LEGIT_P50: Duration = Duration::from_secs(1);

/// Kinds of flood datagram, counted separately.
const KINDS: [&str; 7] = [
    "missing",
    "real, never ACKed",
    "real, ACKed once",
    "WRQ",
    "malformed",
    "oversized 4000",
    "oversized 65000",
];

fn real_request(rng: &mut Rng) -> Vec<u8> {
    let name = ["b513.bin", "mib.bin", "sub/nested.bin", "text.txt"][rng.below(4) as usize];
    let mode = if name == "text.txt" {
        "netascii"
    } else {
        "octet"
    };
    match rng.below(3) {
        0 => rrq(name, mode, &[]),
        1 => rrq(name, mode, &[("blksize", "1428"), ("tsize", "0")]),
        _ => rrq(name, mode, &[("blksize", "1024"), ("windowsize", "16")]),
    }
}

/// A datagram of kind `kind` (an index into `KINDS`).
fn flood_datagram(rng: &mut Rng, kind: usize) -> Vec<u8> {
    match kind {
        0 => rrq(&format!("missing/{}.bin", rng.next()), "octet", &[]),
        1 | 2 => real_request(rng),
        3 => wrq("upload.bin", "octet", &[]),
        4 => match rng.below(5) {
            0 => {
                let len = 1 + rng.below(600) as usize;
                rng.bytes(len)
            }
            1 => b"\x00\x01b513.bin\x00octet".to_vec(), // mode not NUL-terminated
            2 => request(OP_RRQ, "b513.bin", "morse", &[]),
            3 => ack(rng.below(65536) as u16),
            _ => vec![0, 9, 1, 2, 3],
        },
        // Oversized: a valid RRQ for a real file, padded, or random bytes.
        5 | 6 => {
            let len = if kind == 5 { 4000 } else { 65000 };
            let mut p = if rng.below(2) == 0 {
                rrq("b513.bin", "octet", &[])
            } else {
                rng.bytes(16)
            };
            p.resize(len, b'x');
            p
        }
        _ => unreachable!("kind {kind}"),
    }
}

/// Picks a kind by weight: mostly requests, some junk, few ACKed ones.
fn pick_kind(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..30 => 0,
        30..55 => 1,
        55 => 2,
        56..61 => 3,
        61..85 => 4,
        85..95 => 5,
        _ => 6,
    }
}

#[derive(Default)]
struct FloodStats {
    sent: [AtomicU64; 7],
    send_errors: AtomicU64,
}

/// One flooding address: `count` datagrams round-robin over its sockets as
/// fast as it can, until the deadline. "ACKed once" requests wait briefly
/// for the first reply and ACK it, then abandon the transfer.
fn flood_address(
    ip: IpAddr,
    server: SocketAddr,
    count: u64,
    seed: u64,
    stats: &FloodStats,
    deadline: Instant,
) {
    let socks: Vec<RawClient> = (0..SOCKS_PER_ADDR)
        .map(|_| raw_client_on(ip, server))
        .collect();
    let acker = raw_client_on(ip, server);
    let mut rng = Rng(seed | 1);
    for i in 0..count {
        if Instant::now() > deadline {
            break;
        }
        let kind = pick_kind(&mut rng);
        let pkt = flood_datagram(&mut rng, kind);
        stats.sent[kind].fetch_add(1, Ordering::Relaxed);
        if kind == 2 {
            let _ = acker.sock.send_to(&pkt, server);
            match acker.recv(Duration::from_millis(50)) {
                Some((Packet::Oack(_), tid)) => acker.send(&ack(0), tid),
                Some((Packet::Data { block, .. }, tid)) => acker.send(&ack(block), tid),
                _ => {}
            }
            continue;
        }
        let sock = &socks[(i % SOCKS_PER_ADDR as u64) as usize];
        if sock.sock.send_to(&pkt, server).is_err() {
            stats.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
    // The sockets stay open until here, so replies to them are dropped by
    // full buffers, not answered with ICMP.
    drop(socks);
}

/// Peak RSS and descriptors seen by the sampler.
#[derive(Clone, Copy, Debug, Default)]
struct Peak {
    rss_kib: u64,
    fds: usize,
    samples: usize,
}

fn sample_into(pid: u32, peak: &Mutex<Peak>) {
    let rss = proc_status_kib(pid, "VmRSS").unwrap_or(0);
    let fds = proc_fd_count(pid).unwrap_or(0);
    let mut p = peak.lock().expect("peak lock");
    p.rss_kib = p.rss_kib.max(rss);
    p.fds = p.fds.max(fds);
    p.samples += 1;
}

/// One download from `ip` with up to 3 RRQs (a real client retries);
/// returns the content and the number of RRQs it took.
fn get_from(
    ip: IpAddr,
    server: SocketAddr,
    name: &str,
    opts: &[(&str, &str)],
) -> Result<(Vec<u8>, u32), String> {
    let mut last = String::new();
    for attempt in 1..=3 {
        let c = raw_client_on(ip, server);
        match raw_get(&c, name, "octet", opts, |_, _| {}) {
            Ok(dl) => return Ok((dl.data, attempt)),
            Err(e) if e.starts_with("no answer to RRQ") => last = e,
            Err(e) => return Err(format!("{name} (attempt {attempt}): {e}")),
        }
    }
    Err(format!("{name}: 3 RRQs unanswered: {last}"))
}

struct LegitRun {
    /// Transfers started while the flood ran.
    during: Vec<Duration>,
    /// Transfers started after it (up to `min` in all).
    after: Vec<Duration>,
    retried: u32,
    /// "name options latency" of each transfer, in order.
    log: Vec<String>,
}

/// Downloads files from `LEGIT_IP` until `stop` (at least `min` of them);
/// every one byte-exact. Bounded by count and time.
fn legit_client(
    server: SocketAddr,
    files: Vec<(&'static str, Vec<u8>)>,
    stop: Arc<AtomicBool>,
    min: usize,
    ready: Arc<Barrier>,
) -> Result<LegitRun, String> {
    // The flood starts only once this thread runs, so its first transfer
    // overlaps the flood however threads are scheduled.
    ready.wait();
    let start = Instant::now();
    let mut run = LegitRun {
        during: Vec::new(),
        after: Vec::new(),
        retried: 0,
        log: Vec::new(),
    };
    for i in 0..10_000 {
        let flooding = !stop.load(Ordering::Relaxed);
        if (!flooding && i >= min) || start.elapsed() > Duration::from_secs(120) {
            break;
        }
        let (name, want) = &files[i % files.len()];
        let opts: &[(&str, &str)] = match i % 3 {
            0 => &[],
            1 => &[("blksize", "1428")],
            _ => &[("blksize", "1428"), ("windowsize", "8")],
        };
        let t = Instant::now();
        let (got, rrqs) = get_from(LEGIT_IP.into(), server, name, opts)?;
        let took = t.elapsed();
        let when = if flooding { "during" } else { "after" };
        run.log.push(format!("{name} {opts:?} {took:.2?} ({when})"));
        if flooding {
            run.during.push(t.elapsed());
        } else {
            run.after.push(t.elapsed());
        }
        run.retried += rrqs - 1;
        if got != *want {
            return Err(format!(
                "{name}: {} bytes, not the {} of the file",
                got.len(),
                want.len()
            ));
        }
    }
    Ok(run)
}

/// What one flood round measured.
struct Round {
    sent: Vec<u64>,
    send_errors: u64,
    flood_time: Duration,
    legit: LegitRun,
    peak: Peak,
    /// After the flood's sessions gave up.
    settled_fds: usize,
    settled_rss_kib: u64,
    settle_time: Duration,
}

/// Lines of the server log naming a finished transfer.
fn finished_transfers(s: &Server) -> usize {
    let log = s.root().with_file_name("server.log");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("transfer "))
        .count()
}

/// Floods `total` datagrams while the legitimate client downloads, then
/// waits (bounded) until the flood's sessions have ended: `SETTLE_MIN`
/// passed and no transfer has finished in the log for 2 s.
fn flood_round(s: &Server, files: &[(&'static str, Vec<u8>)], total: u64, seed: u64) -> Round {
    let (addr, pid) = (s.addr(), s.pid());
    let stop = Arc::new(AtomicBool::new(false));
    let peak = Arc::new(Mutex::new(Peak::default()));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        thread::spawn(move || {
            // Bounded: until the flood ends, at most 2 minutes.
            for _ in 0..2400 {
                sample_into(pid, &peak);
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let ready = Arc::new(Barrier::new(2));
    let legit = {
        let (stop, ready) = (stop.clone(), ready.clone());
        let files = files.to_vec();
        thread::spawn(move || legit_client(addr, files, stop, 5, ready))
    };
    ready.wait();

    let stats = Arc::new(FloodStats::default());
    let started = Instant::now();
    let deadline = started + FLOOD_DEADLINE;
    let floods: Vec<_> = (0..FLOOD_ADDRS)
        .map(|k| {
            let ip = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + k));
            let stats = stats.clone();
            let share = total / u64::from(FLOOD_ADDRS);
            let seed = seed + u64::from(k);
            thread::spawn(move || flood_address(ip, addr, share, seed, &stats, deadline))
        })
        .collect();
    for f in floods {
        f.join().expect("flood thread");
    }
    let flood_time = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let legit = legit
        .join()
        .expect("legit thread")
        .unwrap_or_else(|e| panic!("legitimate client during the flood: {e}"));
    sampler.join().expect("sampler thread");

    let settle = Instant::now();
    let (mut seen, mut quiet_since) = (finished_transfers(s), Instant::now());
    while settle.elapsed() < SETTLE_LIMIT
        && (settle.elapsed() < SETTLE_MIN || quiet_since.elapsed() < Duration::from_secs(2))
    {
        thread::sleep(Duration::from_millis(200));
        sample_into(pid, &peak);
        let now = finished_transfers(s);
        if now != seen {
            (seen, quiet_since) = (now, Instant::now());
        }
    }
    let peak = *peak.lock().expect("peak lock");
    Round {
        sent: stats
            .sent
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect(),
        send_errors: stats.send_errors.load(Ordering::Relaxed),
        flood_time,
        legit,
        peak,
        settled_fds: proc_fd_count(pid).expect("read /proc/PID/fd"),
        settled_rss_kib: proc_status_kib(pid, "VmRSS").expect("read VmRSS"),
        settle_time: settle.elapsed(),
    }
}

fn report(n: usize, r: &Round) {
    let total: u64 = r.sent.iter().sum();
    eprintln!(
        "flood round {n}: {total} datagrams from {FLOOD_ADDRS} addresses x {SOCKS_PER_ADDR} ports in {:.2?} ({:.0}/s), {} send errors",
        r.flood_time,
        total as f64 / r.flood_time.as_secs_f64(),
        r.send_errors
    );
    let kinds: Vec<String> = KINDS
        .iter()
        .zip(&r.sent)
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    eprintln!("flood round {n}:   {}", kinds.join(", "));
    let mut during = r.legit.during.clone();
    during.sort();
    let mut all = [&r.legit.during[..], &r.legit.after[..]].concat();
    all.sort();
    eprintln!(
        "flood round {n}: legitimate client: {} transfers during the flood (p50 {:.2?}, max {:.2?}), {} after; all: p50 {:.2?}, max {:.2?}; {} RRQ retries",
        during.len(),
        quantile(&during, 0.5),
        quantile(&during, 1.0),
        r.legit.after.len(),
        quantile(&all, 0.5),
        quantile(&all, 1.0),
        r.legit.retried
    );
    eprintln!(
        "flood round {n}: legitimate transfers: {}",
        r.legit.log.join("; ")
    );
    eprintln!(
        "flood round {n}: server peak RSS {} KiB, peak fds {} ({} samples); {:.1?} later: fds {}, RSS {} KiB",
        r.peak.rss_kib, r.peak.fds, r.peak.samples, r.settle_time, r.settled_fds, r.settled_rss_kib
    );
}

fn check_round(n: usize, total: u64, r: &Round) {
    let sent: u64 = r.sent.iter().sum();
    assert!(
        sent >= total * 9 / 10,
        "round {n}: flood sent only {sent} of {total} datagrams within {FLOOD_DEADLINE:?}"
    );
    assert!(
        !r.legit.during.is_empty(),
        "round {n}: no legitimate transfer started during the flood"
    );
    let mut all = [&r.legit.during[..], &r.legit.after[..]].concat();
    all.sort();
    let (p50, max) = (quantile(&all, 0.5), quantile(&all, 1.0));
    assert!(
        max <= MAX_LEGIT_LATENCY && p50 <= MAX_LEGIT_P50,
        "round {n}: legitimate client latency: p50 {p50:?}, max {max:?} (bounds {MAX_LEGIT_P50:?}, {MAX_LEGIT_LATENCY:?})"
    );
    assert!(
        r.peak.rss_kib <= MAX_RSS_KIB,
        "round {n}: server RSS peaked at {} KiB (ceiling {MAX_RSS_KIB})",
        r.peak.rss_kib
    );
    assert!(
        r.peak.fds <= MAX_FDS,
        "round {n}: server held {} descriptors (ceiling {MAX_FDS})",
        r.peak.fds
    );
    assert!(
        r.settle_time < SETTLE_LIMIT,
        "round {n}: transfers still finishing {SETTLE_LIMIT:?} after the flood"
    );
}

fn flood(total: u64) {
    if server_kind() != ServerKind::Ringtftpd {
        eprintln!("SKIP: the flood samples ringtftpd's /proc entries");
        return;
    }
    // Short retransmission bounds, so abandoned sessions give up in
    // seconds and the rounds can be compared.
    let mut s = Server::start_with(ServerOpts {
        extra_args: [
            "--initial-rto-ms",
            "200",
            "--rto-max-ms",
            "800",
            "--retries",
            "4",
        ]
        .map(String::from)
        .to_vec(),
        ..ServerOpts::default()
    });
    let addr = s.addr();
    let pid = s.pid();
    let files: Vec<(&'static str, Vec<u8>)> = ["b513.bin", "sub/nested.bin", "b512.bin", "mib.bin"]
        .into_iter()
        .map(|n| (n, s.source(n)))
        .collect();

    // Warm up (mappings, pooled sockets), then take the baseline.
    let mut quiet = Vec::new();
    for round in 0..2 {
        for (name, want) in &files {
            let t = Instant::now();
            let (got, _) = get_from(LEGIT_IP.into(), addr, name, &[])
                .unwrap_or_else(|e| panic!("before the flood: {e}"));
            assert_same(&format!("{name} before the flood"), &got, want);
            if round == 1 {
                quiet.push(format!("{name} {:.2?}", t.elapsed()));
            }
        }
    }
    eprintln!("flood: lock-step without a flood: {}", quiet.join("; "));
    let base_rss = proc_status_kib(pid, "VmRSS").expect("read VmRSS");
    let base_fds = proc_fd_count(pid).expect("read /proc/PID/fd");
    eprintln!("flood: server before: RSS {base_rss} KiB, {base_fds} fds");

    // Two identical rounds: the second must not need more than the first
    // (a leak per datagram or per session would show as growth).
    let one = flood_round(&s, &files, total, 0xf100d);
    report(1, &one);
    s.assert_running();
    check_round(1, total, &one);
    let two = flood_round(&s, &files, total, 0xf100d);
    report(2, &two);
    s.assert_running();
    check_round(2, total, &two);
    eprintln!(
        "flood: server VmHWM {} KiB; {} finished transfers logged",
        proc_status_kib(pid, "VmHWM").unwrap_or(0),
        finished_transfers(&s)
    );
    assert!(
        two.peak.fds <= one.peak.fds + (one.peak.fds / 10).max(64),
        "descriptors grew across identical rounds: peak {} then {}",
        one.peak.fds,
        two.peak.fds
    );
    assert!(
        two.settled_rss_kib <= one.settled_rss_kib + 16 * 1024,
        "RSS grew across identical rounds: {} KiB then {} KiB",
        one.settled_rss_kib,
        two.settled_rss_kib
    );

    // Still serving, byte-exact, to the legitimate address and to a
    // flooding one (with RRQ retries, as its rate limit may still bite).
    for (i, &(name, _, _)) in RANDOM_FILES.iter().enumerate() {
        let ip = if i % 2 == 0 {
            IpAddr::V4(LEGIT_IP)
        } else {
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))
        };
        let (got, _) = get_from(ip, addr, name, &[])
            .unwrap_or_else(|e| panic!("{name} from {ip} after the flood: {e}"));
        assert_same(
            &format!("{name} from {ip} after the flood"),
            &got,
            &s.source(name),
        );
    }
    s.assert_running();
}

/// The scaled-down flood of the default suite: two rounds of 10,000
/// datagrams.
#[test]
fn flood_of_10k_datagrams_leaves_a_legitimate_client_served_and_resources_bounded() {
    flood(10_000);
}

/// The full flood of issue #9: two rounds of 50,000 datagrams.
/// `cargo test --test flood -- --ignored`.
#[test]
#[ignore = "long: 50,000 datagrams a round; run with --ignored"]
fn flood_of_50k_datagrams_leaves_a_legitimate_client_served_and_resources_bounded() {
    flood(50_000);
}
