//! Delay and reordering, in user space (this kernel has no netem): a UDP
//! proxy on loopback between the clients and the server holds every
//! datagram 0-2 ms, and one in ten 2-6 ms more, so datagrams overtake each
//! other in both directions. Transfers at windowsize 1 and 16 must arrive
//! byte for byte, and reordering alone (no loss) must not set off a storm
//! of lock-step resends (RFC 1123 4.2.3.1: no Sorcerer's Apprentice).
//! Windowed transfers resend much more under reordering (each reported
//! gap restarts the window): measured here, and bounded only loosely.
//!
//! The proxy keeps TFTP's TIDs apart: each client gets an upstream socket
//! of its own, and each server TID a downstream socket, so a client sees a
//! new port per transfer as it would from the server itself. Everything is
//! bounded: sockets, queued datagrams, and every wait.

mod common;

use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

/// Sockets the proxy may open, at most.
const MAX_SOCKETS: usize = 512;
/// Datagrams held at once, at most (more are dropped: none expected).
const MAX_HELD: usize = 10_000;

/// A datagram due out of `socket` (an index) to `to` at `due`.
struct Held {
    due: Instant,
    seq: u64,
    socket: usize,
    to: SocketAddr,
    bytes: Vec<u8>,
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Held {}
impl PartialOrd for Held {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Held {
    // Earliest first out of a max-heap.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.due, other.seq).cmp(&(self.due, self.seq))
    }
}

/// What a proxy socket is for.
#[derive(Clone, Copy)]
enum Role {
    /// Where clients send requests.
    Listen,
    /// Toward the server, for this client.
    Up(SocketAddr),
    /// Toward this client, standing for this server TID.
    Down {
        client: SocketAddr,
        server: SocketAddr,
    },
}

struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Datagrams that arrived after one sent later (both directions).
    overtaken: Arc<AtomicU64>,
    /// DATA packets the server sent toward the clients.
    data_to_clients: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(server: SocketAddr, seed: u64) -> Proxy {
        let listen = UdpSocket::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listen.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let overtaken = Arc::new(AtomicU64::new(0));
        let data_to_clients = Arc::new(AtomicU64::new(0));
        let counts = (overtaken.clone(), data_to_clients.clone());
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || run(listen, server, seed, &stop2, &counts));
        Proxy {
            addr,
            stop,
            overtaken,
            data_to_clients,
            thread: Some(thread),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    listen: UdpSocket,
    server: SocketAddr,
    seed: u64,
    stop: &AtomicBool,
    (overtaken, data_to_clients): &(Arc<AtomicU64>, Arc<AtomicU64>),
) {
    let mut rng = Rng(seed | 1);
    let mut sockets: Vec<(UdpSocket, Role)> = vec![(listen, Role::Listen)];
    let mut up: HashMap<SocketAddr, usize> = HashMap::new();
    let mut down: HashMap<(SocketAddr, SocketAddr), usize> = HashMap::new();
    let mut held = BinaryHeap::new();
    let mut seq = 0u64;
    // The last sequence number delivered per direction, to count overtakes.
    let mut delivered_seq: HashMap<(usize, SocketAddr), u64> = HashMap::new();
    let mut buf = vec![0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(300);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let now = Instant::now();
        while held.peek().is_some_and(|h: &Held| h.due <= now) {
            let h = held.pop().expect("peeked");
            let key = (h.socket, h.to);
            if delivered_seq.get(&key).is_some_and(|&last| last > h.seq) {
                overtaken.fetch_add(1, Ordering::Relaxed);
            }
            delivered_seq.insert(
                key,
                h.seq.max(delivered_seq.get(&key).copied().unwrap_or(0)),
            );
            let _ = sockets[h.socket].0.send_to(&h.bytes, h.to);
        }
        let wait = held
            .peek()
            .map(|h: &Held| h.due.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_millis(20))
            .min(Duration::from_millis(20));
        let ready: Vec<usize> = {
            let mut fds: Vec<PollFd> = sockets
                .iter()
                .map(|(s, _)| PollFd::new(s.as_fd(), PollFlags::POLLIN))
                .collect();
            let ms = u16::try_from(wait.as_millis().max(1)).unwrap_or(20);
            if poll(&mut fds, PollTimeout::from(ms)).unwrap_or(0) <= 0 {
                continue;
            }
            fds.iter()
                .enumerate()
                .filter(|(_, f)| f.revents().is_some_and(|r| r.contains(PollFlags::POLLIN)))
                .map(|(i, _)| i)
                .collect()
        };
        for i in ready {
            let Ok((n, from)) = sockets[i].0.recv_from(&mut buf) else {
                continue;
            };
            let role = sockets[i].1;
            let (out, to) = match role {
                Role::Listen => {
                    let u = match up.get(&from) {
                        Some(&u) => u,
                        None if sockets.len() < MAX_SOCKETS => {
                            let s = UdpSocket::bind("127.0.0.1:0").expect("bind upstream");
                            sockets.push((s, Role::Up(from)));
                            up.insert(from, sockets.len() - 1);
                            sockets.len() - 1
                        }
                        None => continue,
                    };
                    (u, server)
                }
                Role::Up(client) if from == server => (0, client),
                Role::Up(client) => {
                    if buf[..n].starts_with(&[0, 3]) {
                        data_to_clients.fetch_add(1, Ordering::Relaxed);
                    }
                    let d = match down.get(&(client, from)) {
                        Some(&d) => d,
                        None if sockets.len() < MAX_SOCKETS => {
                            let s = UdpSocket::bind("127.0.0.1:0").expect("bind downstream");
                            sockets.push((
                                s,
                                Role::Down {
                                    client,
                                    server: from,
                                },
                            ));
                            down.insert((client, from), sockets.len() - 1);
                            sockets.len() - 1
                        }
                        None => continue,
                    };
                    (d, client)
                }
                Role::Down { client, server } if from == client => match up.get(&client) {
                    Some(&u) => (u, server),
                    None => continue,
                },
                Role::Down { .. } => continue,
            };
            if held.len() >= MAX_HELD {
                continue;
            }
            // 0-2 ms, and one in ten 2-6 ms more: datagrams overtake.
            let mut delay = rng.below(2000);
            if rng.below(10) == 0 {
                delay += 2000 + rng.below(4000);
            }
            seq += 1;
            held.push(Held {
                due: Instant::now() + Duration::from_micros(delay),
                seq,
                socket: out,
                to,
                bytes: buf[..n].to_vec(),
            });
        }
    }
}

/// Sum of `retransmits=` over the server's transfer lines at `windowsize`.
fn server_retransmits(log: &str, windowsize: u16) -> u64 {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split(&format!(" {name}="))
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    log.lines()
        .filter(|l| l.starts_with("transfer ") && !l.contains("probe.txt"))
        .filter(|l| field(l, "windowsize") == Some(u64::from(windowsize)))
        .filter_map(|l| field(l, "retransmits"))
        .sum()
}

#[test]
fn delayed_and_reordered_datagrams_lose_no_byte_and_start_no_resend_storm() {
    if server_kind() != ServerKind::Ringtftpd {
        return; // counts ringtftpd's own resends from its log
    }
    let s = Server::start();
    let proxy = Proxy::start(s.addr(), 0x5eed);
    let files = ["b513.bin", "sub/nested.bin", "mib.bin"];
    let mut blocks = [0u64; 2];
    for (w, windowsize) in [1u16, 16].into_iter().enumerate() {
        let ws = windowsize.to_string();
        for round in 0..2 {
            let threads: Vec<_> = files
                .iter()
                .map(|&name| {
                    let expected = s.source(name);
                    let proxy_addr = proxy.addr;
                    let ws = ws.clone();
                    std::thread::spawn(move || {
                        let c = RawClient::new(proxy_addr);
                        let got = raw_get(
                            &c,
                            name,
                            "octet",
                            &[("blksize", "1024"), ("windowsize", &ws)],
                            |_, _| {},
                        )
                        .unwrap_or_else(|e| panic!("{name} ws {ws} round {round}: {e}"));
                        assert!(got.data == expected, "{name} ws {ws}: bytes differ");
                        expected.len() as u64 / 1024 + 1
                    })
                })
                .collect();
            for t in threads {
                blocks[w] += t.join().expect("client");
            }
        }
    }
    // tftp-hpa's lock-step client through the same proxy, too.
    let dest = s.dest("through-proxy");
    let args = [
        "-m".to_string(),
        "octet".into(),
        "127.0.0.1".into(),
        proxy.addr.port().to_string(),
        "-c".into(),
        "get".into(),
        "mib.bin".into(),
        dest.to_string_lossy().into_owned(),
    ];
    let out = run_client("tftp", &args);
    assert_download(
        "tftp-hpa through the proxy",
        &out,
        &dest,
        &s.source("mib.bin"),
    );
    let overtaken = proxy.overtaken.load(Ordering::Relaxed);
    drop(proxy);
    assert!(
        overtaken > 50,
        "the proxy reordered only {overtaken} datagrams"
    );
    // Each transfer's line is written once it ends: wait for all of them.
    let transfers = 2 * 2 * files.len() + 1;
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.log().lines().filter(|l| l.contains("file=\"")).count() < transfers + 1
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = s.log();
    let (lockstep, windowed) = (server_retransmits(&log, 1), server_retransmits(&log, 16));
    eprintln!(
        "reorder: {overtaken} datagrams overtaken; server resent {lockstep} of {} blocks \
         lock-step, {windowed} of {} windowed",
        blocks[0], blocks[1]
    );
    // Lock-step: reordering is no loss, a few resends where a late ACK
    // looked lost are fine, a resend per block (an apprentice's storm) is
    // not.
    assert!(
        lockstep * 10 <= blocks[0],
        "{lockstep} lock-step resends for {} blocks:\n{log}",
        blocks[0]
    );
    // Windowed: each gap the client reports restarts the window (RFC 7440
    // §4; a TFTP client keeps no block out of order), so reordering costs
    // resends (measured: about 10 per block at windowsize 16 here;
    // docs/robustness.md, open in issue 9). This bound only catches a
    // storm worse than that.
    assert!(
        windowed <= 15 * blocks[1],
        "{windowed} windowed resends for {} blocks:\n{log}",
        blocks[1]
    );
}

/// One windowed download of `name` through a fresh proxy to `s`: how long
/// it took (None: not within 60 s) and the DATA packets the server sent.
fn windowed_through_proxy(s: &Server, name: &str) -> (Option<Duration>, u64) {
    let proxy = Proxy::start(s.addr(), 0x5eed);
    let expected = s.source(name);
    let c = RawClient::new(proxy.addr);
    let started = Instant::now();
    let got = raw_get(
        &c,
        name,
        "octet",
        &[("blksize", "1024"), ("windowsize", "16")],
        |_, _| {},
    );
    let took = match got {
        Ok(got) => {
            assert!(got.data == expected, "{:?}: bytes differ", s.kind);
            Some(started.elapsed())
        }
        Err(e) => {
            eprintln!("{:?}: {e}", s.kind);
            None
        }
    };
    (took, proxy.data_to_clients.load(Ordering::Relaxed))
}

/// The same reordering against tftpd-hpa 7.3, which takes windowsize: one
/// 1 MiB download at windowsize 16 from each, its time and the DATA sent.
/// ringtftpd must finish, and not later than 7.3. Long (7.3 may take the
/// client's whole 60 s): `cargo test --test reorder -- --ignored --nocapture`.
#[test]
#[ignore = "long: tftpd-hpa 7.3 may need the client's whole 60 s"]
fn windowed_transfers_under_reordering_against_tftpd_hpa_7() {
    if hpa7_command().is_none() {
        eprintln!("tftpd-hpa 7.x unavailable: skipped");
        return;
    }
    let ours = Server::start_with(ServerOpts {
        kind: Some(ServerKind::Ringtftpd),
        ..ServerOpts::default()
    });
    let theirs = Server::start_with(ServerOpts {
        kind: Some(ServerKind::Hpa7),
        ..ServerOpts::default()
    });
    let blocks = ours.source("mib.bin").len() / 1024 + 1;
    let (our_time, our_data) = windowed_through_proxy(&ours, "mib.bin");
    let (their_time, their_data) = windowed_through_proxy(&theirs, "mib.bin");
    eprintln!(
        "reorder, windowsize 16, {blocks} blocks: ringtftpd {our_time:?} with {our_data} DATA; \
         tftpd-hpa 7.3 {their_time:?} with {their_data} DATA"
    );
    let our_time = our_time.expect("ringtftpd finishes");
    if let Some(their_time) = their_time {
        assert!(
            our_time <= their_time,
            "ringtftpd {our_time:?}, 7.3 {their_time:?}"
        );
    }
}
