//! `--client-style independent`: the load as a plain TFTP client program makes it (tftp-hpa,
//! atftp, curl, a PXE ROM), the pattern that flatters a server least. Issue 12: an
//! independent client measured ringtftpd's lock-step CPU per GB at dnsmasq's level where
//! the epoll driver (`driver`, the default "batched" style) showed 0.70–0.90×.
//!
//! What it does differently from the default driver:
//! - **One blocking socket per client thread**, `concurrency` threads in all, instead of one
//!   thread with epoll over every socket. Each thread runs its transfers one after another.
//! - **One `recv` per wake-up**: the thread sleeps in a blocking receive and is woken for
//!   each datagram, so the kernel must schedule a client per DATA; the default driver takes
//!   the DATA of every ready socket in one `epoll_wait` turn, so under load its ACKs leave
//!   in bursts, which lets a batching server take several in one receive.
//! - **ACK at once**: each ACK is sent the moment its DATA is checked, from that thread, so
//!   ACKs reach the server spread out in time (one per client wake-up), not grouped per loop
//!   turn.
//! - **Connected sockets**: after the first reply the socket is `connect(2)`ed to the
//!   server's TID (as tftp-hpa's client does), so the kernel filters other senders and
//!   sends use `send` without an address; the server sees a connected 4-tuple.
//! - **A fresh source port per transfer** (a new socket, bound by the kernel), closed one
//!   transfer later (the thread keeps only its previous socket), with no shared
//!   quarantine pool.
//!
//! Same verification and the same [`Stats`] as the default driver (each finished transfer
//! is recorded under a lock, once). Downloads only; no `--loss`; at most [`MAX_THREADS`]
//! clients. Every wait is bounded: a receive wakes at least at the transfer's retransmit
//! deadline, `--max-time` and `--stall` are checked on every wake-up.
#![forbid(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::client::Transfer;
use crate::driver::RunConfig;
use crate::stats::Stats;

/// Most client threads (each is a client program of its own).
pub const MAX_THREADS: usize = 4096;
const BUF_LEN: usize = 65536;

/// State shared by the client threads.
struct Shared<'a> {
    cfg: &'a RunConfig,
    start: Instant,
    next: AtomicU64,
    aborted: AtomicBool,
    /// Microseconds after `start` of the last datagram received by any client.
    last_rx_us: AtomicU64,
    send_drops: AtomicU64,
    stats: Mutex<&'a mut Stats>,
    abort_reason: Mutex<Option<(String, bool)>>,
}

/// Runs the whole load with one thread per client; returns the wall time.
pub fn run(cfg: &RunConfig, stats: &mut Stats) -> io::Result<Duration> {
    if cfg.files.is_empty() || cfg.put.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--client-style independent runs downloads only",
        ));
    }
    if cfg.probe.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--probe-missing is not supported with --client-style independent",
        ));
    }
    if cfg.loss > 0.0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--loss is not supported with --client-style independent",
        ));
    }
    let threads = cfg.concurrency.min(cfg.n as usize).max(1);
    if threads > MAX_THREADS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("--client-style independent runs at most {MAX_THREADS} clients at once"),
        ));
    }
    let sh = Shared {
        cfg,
        start: Instant::now(),
        next: AtomicU64::new(0),
        aborted: AtomicBool::new(false),
        last_rx_us: AtomicU64::new(0),
        send_drops: AtomicU64::new(0),
        stats: Mutex::new(stats),
        abort_reason: Mutex::new(None),
    };
    let spawned = std::thread::scope(|s| -> io::Result<()> {
        for i in 0..threads {
            let sh = &sh;
            std::thread::Builder::new()
                .name(format!("client-{i}"))
                .stack_size(256 << 10)
                .spawn_scoped(s, move || client_thread(sh))?;
        }
        Ok(())
    });
    let elapsed = sh.start.elapsed();
    spawned?;
    let launched = sh.next.load(Ordering::Relaxed).min(cfg.n);
    let drops = sh.send_drops.load(Ordering::Relaxed);
    let stalled = sh
        .abort_reason
        .lock()
        .ok()
        .and_then(|r| r.as_ref().map(|(_, s)| *s))
        .unwrap_or(false);
    let stats = sh
        .stats
        .into_inner()
        .map_err(|_| io::Error::other("a client thread panicked"))?;
    stats.counts.launched = launched;
    stats.counts.send_drops += drops;
    stats.counts.stalled |= stalled;
    Ok(elapsed)
}

fn client_thread(sh: &Shared<'_>) {
    let mut recvbuf = vec![0u8; BUF_LEN];
    let mut sendbuf = vec![0u8; BUF_LEN];
    // The previous transfer's socket, closed when the next transfer ends (its port is not
    // handed out again meanwhile; a late resend from the server finds it, not a new one).
    let mut previous: Option<UdpSocket> = None;
    loop {
        if sh.aborted.load(Ordering::Relaxed) {
            return;
        }
        let i = sh.next.fetch_add(1, Ordering::Relaxed);
        if i >= sh.cfg.n {
            return;
        }
        let file = &sh.cfg.files[(i % sh.cfg.files.len() as u64) as usize];
        let mut t = Transfer::new(
            i,
            file.name.clone(),
            file.content.clone(),
            sh.cfg.client,
            sh.cfg.server,
            sh.cfg.seed,
            Instant::now(),
        );
        match open_socket(sh.cfg.server) {
            Ok(sock) => {
                one_transfer(sh, &sock, &mut t, &mut recvbuf, &mut sendbuf);
                previous = Some(sock);
            }
            Err(e) => t.fail_local(format!("cannot open a client socket: {e}")),
        }
        let _ = &previous;
        if let Ok(mut st) = sh.stats.lock() {
            st.record(&t);
        }
    }
}

fn open_socket(server: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    UdpSocket::bind(any)
}

fn abort(sh: &Shared<'_>, why: String, stalled: bool) {
    if !sh.aborted.swap(true, Ordering::Relaxed)
        && let Ok(mut r) = sh.abort_reason.lock()
    {
        *r = Some((why, stalled));
    }
}

fn one_transfer(
    sh: &Shared<'_>,
    sock: &UdpSocket,
    t: &mut Transfer,
    recvbuf: &mut [u8],
    sendbuf: &mut [u8],
) {
    let mut peer: Option<SocketAddr> = None;
    let mut rcvtimeo: Option<Duration> = None;
    loop {
        // Send what is due: the RRQ, the ACK of the block just checked, a retransmit.
        while let Some(tx) = t.poll_transmit(sendbuf) {
            let r = match peer {
                Some(p) if p == tx.dest => sock.send(&sendbuf[..tx.len]),
                _ => sock.send_to(&sendbuf[..tx.len], tx.dest),
            };
            match r {
                Ok(_) => {}
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.raw_os_error() == Some(nix::libc::ENOBUFS) =>
                {
                    sh.send_drops.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => t.fail_local(format!("send to {}: {e}", tx.dest)),
            }
        }
        if crate::client::TransferView::outcome(t).is_some() {
            return;
        }
        let now = Instant::now();
        if let Some(max) = sh.cfg.max_time
            && now.duration_since(sh.start) >= max
        {
            let why = format!("run aborted after --max-time {max:?}");
            abort(sh, why.clone(), false);
            t.fail_local(why);
            continue;
        }
        if let Some(stall) = sh.cfg.stall {
            let last = Duration::from_micros(sh.last_rx_us.load(Ordering::Relaxed));
            if now.duration_since(sh.start).saturating_sub(last) >= stall {
                let why = format!(
                    "run aborted: nothing received from the server for {stall:?} (--stall)"
                );
                abort(sh, why.clone(), true);
                t.fail_local(why);
                continue;
            }
        }
        if sh.aborted.load(Ordering::Relaxed) {
            let why = sh
                .abort_reason
                .lock()
                .ok()
                .and_then(|r| r.as_ref().map(|(w, _)| w.clone()))
                .unwrap_or_else(|| "run aborted".into());
            t.fail_local(why);
            continue;
        }
        let Some(deadline) = t.poll_timeout() else {
            t.fail_local("no retransmit deadline".into());
            continue;
        };
        if deadline <= now {
            t.handle_timeout(now);
            continue;
        }
        // Sleep until a datagram or the deadline; SO_RCVTIMEO is only reset when the
        // deadline moved a lot (in lock-step it stays one timeout ahead: no extra syscall
        // per block). Bounded by a second so --max-time and --stall are seen.
        let want = (deadline - now).min(Duration::from_secs(1));
        if rcvtimeo.is_none_or(|c| want < c / 2 || want > c) {
            let want = want.max(Duration::from_millis(1));
            if let Err(e) = sock.set_read_timeout(Some(want)) {
                t.fail_local(format!("SO_RCVTIMEO: {e}"));
                continue;
            }
            rcvtimeo = Some(want);
        }
        let got = match peer {
            Some(p) => sock.recv(recvbuf).map(|n| (n, p)),
            None => sock.recv_from(recvbuf),
        };
        match got {
            Ok((len, from)) => {
                let now = Instant::now();
                sh.last_rx_us.fetch_max(
                    now.duration_since(sh.start).as_micros() as u64,
                    Ordering::Relaxed,
                );
                t.handle_datagram(now, from, &recvbuf[..len]);
                // The first reply names the server's TID: connect to it, as tftp-hpa does.
                if peer.is_none() && crate::client::TransferView::outcome(t).is_none() {
                    if let Err(e) = sock.connect(from) {
                        t.fail_local(format!("connect {from}: {e}"));
                        continue;
                    }
                    peer = Some(from);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            // A connected UDP socket reports an ICMP unreachable as ECONNREFUSED: the server
            // TID went away; the retransmit timer decides.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => t.fail_local(format!("recv: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientConfig;
    use crate::driver::FileSpec;
    use crate::wire::{self, Packet, RequestOptions};
    use std::sync::Arc;
    use std::thread;

    /// A lock-step server, a thread and a fresh socket per RRQ, no options; records
    /// whether each client's ACKs came from the port its RRQ came from.
    fn toy_server(content: Arc<[u8]>) -> (SocketAddr, Arc<AtomicBool>) {
        let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
        listener
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((_, peer)) = listener.recv_from(&mut buf) else {
                    continue;
                };
                let content = content.clone();
                thread::spawn(move || {
                    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
                    sock.set_read_timeout(Some(Duration::from_millis(500)))
                        .unwrap();
                    let mut b = [0u8; 64];
                    for blk in 1..=content.len() / 512 + 1 {
                        let lo = (blk - 1) * 512;
                        let mut pkt = vec![0, 3, (blk >> 8) as u8, blk as u8];
                        pkt.extend_from_slice(&content[lo..(lo + 512).min(content.len())]);
                        sock.send_to(&pkt, peer).unwrap();
                        match sock.recv_from(&mut b) {
                            Ok((n, from)) if from == peer => {
                                assert!(matches!(wire::parse(&b[..n]), Ok(Packet::Ack { .. })));
                            }
                            _ => return,
                        }
                    }
                });
            }
        });
        (addr, stop)
    }

    #[test]
    fn independent_clients_complete_and_verify() {
        let content: Arc<[u8]> = (0..5000u32).map(|i| (i * 11) as u8).collect();
        let (addr, stop) = toy_server(content.clone());
        let cfg = RunConfig {
            server: addr,
            n: 20,
            concurrency: 6,
            client: ClientConfig {
                options: RequestOptions::default(),
                timeout: Duration::from_millis(300),
                retries: 3,
                backoff: false,
            },
            files: vec![FileSpec {
                name: "f".into(),
                content,
            }],
            seed: 1,
            max_time: Some(Duration::from_secs(20)),
            loss: 0.0,
            stall: Some(Duration::from_secs(5)),
            put: None,
            probe: None,
        };
        let mut stats = Stats::new();
        run(&cfg, &mut stats).unwrap();
        stop.store(true, Ordering::Relaxed);
        assert_eq!(stats.counts.completed, 20, "{:?}", stats.failure_lines);
        assert_eq!(stats.counts.launched, 20);
        assert_eq!(stats.counts.payload_bytes, 20 * 5000);
        assert_eq!(stats.counts.blocks, 20 * 10);
    }

    #[test]
    fn a_silent_server_times_out_within_bounds() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let cfg = RunConfig {
            server: silent.local_addr().unwrap(),
            n: 3,
            concurrency: 3,
            client: ClientConfig {
                options: RequestOptions::default(),
                timeout: Duration::from_millis(50),
                retries: 2,
                backoff: false,
            },
            files: vec![FileSpec {
                name: "f".into(),
                content: Arc::from(&b"x"[..]),
            }],
            seed: 1,
            max_time: Some(Duration::from_secs(10)),
            loss: 0.0,
            stall: None,
            put: None,
            probe: None,
        };
        let mut stats = Stats::new();
        let elapsed = run(&cfg, &mut stats).unwrap();
        assert_eq!(stats.counts.failures.get("timeout"), Some(&3));
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    }
}
