//! The event loop: one thread, one epoll instance, one nonblocking UDP socket per transfer
//! (a fresh client TID each, RFC 1350 §4), at most `concurrency` transfers in flight.
//!
//! Each loop turn: launch transfers up to the concurrency limit, wait in `epoll_wait` until a
//! socket is readable or the nearest retransmit deadline, drain readable sockets into their
//! [`Transfer`]s, fire due deadlines, and send whatever the transfers queued. A transfer that
//! finished is recorded in [`Stats`] and its socket closed (which also removes it from epoll).
//!
//! Deadlines live in a binary heap with at most one live entry per transfer: a transfer's
//! deadline only moves later on progress, so an entry is pushed only when the deadline moves
//! earlier than the queued one, and an entry popped early is simply re-queued.
#![forbid(unsafe_code)]

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use crate::client::{ClientConfig, Outcome, Transfer};
use crate::stats::Stats;
use crate::upload::Upload;

/// Datagrams read from one socket per readiness event before moving on (fairness).
const RECV_BURST: usize = 64;
/// epoll events fetched per wait.
const EVENTS: usize = 1024;
/// How long a finished transfer's socket stays open (unread, out of epoll) before it is
/// closed: its port is not handed to a new transfer meanwhile. A server may still send to
/// that port (a spurious or lost-ACK resend of the final DATA, or a transfer the client gave
/// up on); a new transfer on the same port would take such a stale DATA 1 for its own first
/// reply and lock onto the stale server TID (RFC 1350 §4 accepts the first reply from any
/// port). Seen once in a soak: a resent 1-byte DATA 1 of `f1` read as block 1 of `f64k`.
const QUARANTINE: Duration = Duration::from_secs(2);
/// Most sockets held in quarantine (descriptors); beyond it the oldest is closed early.
const QUARANTINE_MAX: usize = 8192;
/// Largest TFTP datagram: blksize 65464 + 4 header bytes, rounded up.
const BUF_LEN: usize = 65536;

/// One file of the run: the name requested and the content it must have.
#[derive(Debug, Clone)]
pub struct FileSpec {
    pub name: Arc<str>,
    pub content: Arc<[u8]>,
}

/// Uploads instead of downloads: transfer `i` writes `size` bytes of the name's pattern
/// (`crate::pattern`) to `{prefix}{i}`.
#[derive(Debug, Clone)]
pub struct PutSpec {
    pub prefix: Arc<str>,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub server: SocketAddr,
    /// Transfers to run; transfer `i` fetches `files[i % files.len()]` (or, with `put`,
    /// uploads to its own name).
    pub n: u64,
    pub concurrency: usize,
    pub client: ClientConfig,
    pub files: Vec<FileSpec>,
    pub seed: u64,
    /// Abort (fail the transfers in flight, launch no more) after this long.
    pub max_time: Option<Duration>,
    /// Probability of dropping each datagram sent or received (simulated loss, for testing
    /// retransmission on loopback). 0 disables.
    pub loss: f64,
    /// Abort (fail what is in flight, launch no more) when nothing at all has been received
    /// for this long while transfers are in flight: a server that hung.
    pub stall: Option<Duration>,
    /// Upload instead (then `files` is unused).
    pub put: Option<PutSpec>,
    /// Each download asks for this missing file first and expects ERROR 1 (iPXE's
    /// `autoexec.ipxe`).
    pub probe: Option<Arc<str>>,
}

/// A download or an upload; both follow the same sans-IO call order.
enum Xfer {
    Get(Transfer),
    Put(Upload),
}

macro_rules! each {
    ($x:expr, $t:ident => $e:expr) => {
        match $x {
            Xfer::Get($t) => $e,
            Xfer::Put($t) => $e,
        }
    };
}

impl Xfer {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        each!(self, t => t.handle_datagram(now, from, bytes))
    }
    fn handle_timeout(&mut self, now: Instant) {
        each!(self, t => t.handle_timeout(now))
    }
    fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<crate::client::Transmit> {
        each!(self, t => t.poll_transmit(buf))
    }
    fn poll_timeout(&self) -> Option<Instant> {
        each!(self, t => t.poll_timeout())
    }
    fn has_transmit(&self) -> bool {
        each!(self, t => t.has_transmit())
    }
    fn fail_local(&mut self, detail: String) {
        each!(self, t => t.fail_local(detail))
    }
    fn outcome(&self) -> Option<&Outcome> {
        each!(self, t => crate::client::TransferView::outcome(t))
    }
    fn record(&self, stats: &mut Stats) {
        each!(self, t => { stats.record(t); })
    }
}

struct Session {
    sock: UdpSocket,
    xfer: Xfer,
    /// Deadline of this session's live heap entry, if any.
    queued: Option<Instant>,
}

struct Slot {
    generation: u32,
    session: Option<Session>,
}

struct Driver<'a> {
    cfg: &'a RunConfig,
    epoll: Epoll,
    slots: Vec<Slot>,
    free: Vec<u32>,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    in_flight: usize,
    sendbuf: Vec<u8>,
    loss: Loss,
    /// When a datagram last arrived (or the run started).
    last_rx: Instant,
    /// Finished transfers' sockets and when to close them (see `QUARANTINE`).
    quarantine: VecDeque<(Instant, UdpSocket)>,
}

/// Seeded coin for simulated loss.
struct Loss {
    p: f64,
    state: u64,
}

impl Loss {
    fn drop(&mut self) -> bool {
        if self.p <= 0.0 {
            return false;
        }
        // xorshift64*
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        let r = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
        r < self.p
    }
}

fn token(idx: u32, generation: u32) -> u64 {
    (u64::from(generation) << 32) | u64::from(idx)
}

/// Runs the whole load and returns its wall time (first launch to last finish).
pub fn run(cfg: &RunConfig, stats: &mut Stats) -> io::Result<Duration> {
    if (cfg.files.is_empty() && cfg.put.is_none()) || cfg.concurrency == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "need at least one file and a concurrency of at least 1",
        ));
    }
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let mut d = Driver {
        cfg,
        epoll,
        slots: Vec::with_capacity(cfg.concurrency),
        free: Vec::new(),
        timers: BinaryHeap::with_capacity(cfg.concurrency * 2),
        in_flight: 0,
        sendbuf: vec![0u8; BUF_LEN],
        loss: Loss {
            p: cfg.loss,
            state: cfg.seed | 1,
        },
        last_rx: Instant::now(),
        quarantine: VecDeque::new(),
    };
    let mut recvbuf = vec![0u8; BUF_LEN];
    let mut events = vec![EpollEvent::empty(); EVENTS];
    let start = Instant::now();
    let mut launched: u64 = 0;
    let mut aborted = false;

    loop {
        while !aborted && d.in_flight < cfg.concurrency && launched < cfg.n {
            d.launch(launched, stats);
            launched += 1;
            stats.counts.launched = launched;
        }
        if d.in_flight == 0 && (launched >= cfg.n || aborted) {
            break;
        }
        let now = Instant::now();
        if let Some(max) = cfg.max_time
            && !aborted
            && now.duration_since(start) >= max
        {
            aborted = true;
            d.abort_all(&format!("run aborted after --max-time {max:?}"), stats);
            continue;
        }
        if let Some(stall) = cfg.stall
            && !aborted
            && d.in_flight > 0
            && now.duration_since(d.last_rx) >= stall
        {
            aborted = true;
            stats.counts.stalled = true;
            d.abort_all(
                &format!("run aborted: nothing received from the server for {stall:?} (--stall)"),
                stats,
            );
            continue;
        }

        let n = match d.epoll.wait(&mut events, d.wait_timeout(now, start)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            let t = ev.data();
            d.on_readable(t as u32, (t >> 32) as u32, &mut recvbuf, stats);
        }
        d.fire_timers(Instant::now(), stats);
        d.release_quarantine(Instant::now());
    }
    Ok(start.elapsed())
}

impl Driver<'_> {
    fn launch(&mut self, i: u64, stats: &mut Stats) {
        let now = Instant::now();
        let xfer = match &self.cfg.put {
            Some(p) => Xfer::Put(Upload::new(
                i,
                format!("{}{i}", p.prefix).into(),
                p.size,
                self.cfg.client,
                self.cfg.server,
                self.cfg.seed,
                now,
            )),
            None => {
                let file = &self.cfg.files[(i % self.cfg.files.len() as u64) as usize];
                let t = Transfer::new(
                    i,
                    file.name.clone(),
                    file.content.clone(),
                    self.cfg.client,
                    self.cfg.server,
                    self.cfg.seed,
                    now,
                );
                Xfer::Get(match &self.cfg.probe {
                    Some(missing) => t.with_probe(missing.clone()),
                    None => t,
                })
            }
        };
        let sock = match self.open_socket() {
            Ok(s) => s,
            Err(e) => {
                let mut xfer = xfer;
                xfer.fail_local(format!("cannot open a client socket: {e}"));
                xfer.record(stats);
                return;
            }
        };
        let idx = match self.free.pop() {
            Some(idx) => idx,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    session: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[idx as usize];
        let ev = EpollEvent::new(EpollFlags::EPOLLIN, token(idx, slot.generation));
        if let Err(e) = self.epoll.add(&sock, ev) {
            let mut xfer = xfer;
            xfer.fail_local(format!("epoll_ctl(ADD): {e}"));
            xfer.record(stats);
            self.free.push(idx);
            return;
        }
        slot.session = Some(Session {
            sock,
            xfer,
            queued: None,
        });
        self.in_flight += 1;
        self.flush(idx, stats);
    }

    fn open_socket(&self) -> io::Result<UdpSocket> {
        // Bound explicitly so the kernel picks the ephemeral port (the client TID) now.
        let any: SocketAddr = if self.cfg.server.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(any)?;
        sock.set_nonblocking(true)?;
        Ok(sock)
    }

    fn wait_timeout(&self, now: Instant, start: Instant) -> EpollTimeout {
        let mut next = self.timers.peek().map(|Reverse((t, _, _))| *t);
        if let Some(max) = self.cfg.max_time {
            let stop = start + max;
            next = Some(next.map_or(stop, |t| t.min(stop)));
        }
        if let Some(stall) = self.cfg.stall {
            let stop = self.last_rx + stall;
            next = Some(next.map_or(stop, |t| t.min(stop)));
        }
        let ms = match next {
            None => 1000,
            Some(t) if t <= now => 0,
            // Round up so a wait never ends just before the deadline and spins.
            Some(t) => (t - now).as_micros().div_ceil(1000).min(1000) as u16,
        };
        EpollTimeout::from(ms)
    }

    fn on_readable(&mut self, idx: u32, generation: u32, buf: &mut [u8], stats: &mut Stats) {
        let Some(slot) = self.slots.get_mut(idx as usize) else {
            return;
        };
        if slot.generation != generation {
            return; // an event for a socket closed earlier in this batch
        }
        let Some(s) = slot.session.as_mut() else {
            return;
        };
        for _ in 0..RECV_BURST {
            match s.sock.recv_from(buf) {
                Ok((len, from)) => {
                    self.last_rx = Instant::now();
                    if self.loss.drop() {
                        stats.counts.injected_drops += 1;
                        continue;
                    }
                    s.xfer.handle_datagram(Instant::now(), from, &buf[..len]);
                    // Once the transfer has an ACK to send, nothing more is due until the
                    // server sees it (always so in lock-step): stop here rather than pay a
                    // recvfrom that returns EAGAIN. Epoll is level-triggered, so anything
                    // already queued is reported again.
                    if s.xfer.outcome().is_some() || s.xfer.has_transmit() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    s.xfer.fail_local(format!("recvfrom: {e}"));
                    break;
                }
            }
        }
        self.flush(idx, stats);
    }

    fn fire_timers(&mut self, now: Instant, stats: &mut Stats) {
        while let Some(&Reverse((t, idx, generation))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let Some(slot) = self.slots.get_mut(idx as usize) else {
                continue;
            };
            if slot.generation != generation {
                continue;
            }
            let Some(s) = slot.session.as_mut() else {
                continue;
            };
            if s.queued != Some(t) {
                continue; // superseded by an earlier entry
            }
            s.queued = None;
            s.xfer.handle_timeout(now);
            self.flush(idx, stats);
        }
    }

    /// Sends what the transfer queued, then re-arms its deadline or retires it.
    fn flush(&mut self, idx: u32, stats: &mut Stats) {
        let slot = &mut self.slots[idx as usize];
        let Some(s) = slot.session.as_mut() else {
            return;
        };
        while let Some(tx) = s.xfer.poll_transmit(&mut self.sendbuf) {
            if self.loss.drop() {
                stats.counts.injected_drops += 1;
                continue;
            }
            match s.sock.send_to(&self.sendbuf[..tx.len], tx.dest) {
                Ok(_) => {}
                // A full socket buffer loses the datagram, as the network would; the
                // retransmit timer recovers.
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.raw_os_error() == Some(nix::libc::ENOBUFS) =>
                {
                    stats.counts.send_drops += 1;
                }
                Err(e) => s.xfer.fail_local(format!("sendto {}: {e}", tx.dest)),
            }
        }
        if s.xfer.outcome().is_some() {
            if let Some(s) = slot.session.take() {
                s.xfer.record(stats);
                // Out of the epoll set now; the socket (its port) is closed later.
                let _ = self.epoll.delete(&s.sock);
                if self.quarantine.len() >= QUARANTINE_MAX {
                    self.quarantine.pop_front();
                }
                self.quarantine
                    .push_back((Instant::now() + QUARANTINE, s.sock));
            }
            slot.generation = slot.generation.wrapping_add(1);
            self.free.push(idx);
            self.in_flight -= 1;
            return;
        }
        if let Some(d) = s.xfer.poll_timeout()
            && s.queued.is_none_or(|q| d < q)
        {
            s.queued = Some(d);
            self.timers.push(Reverse((d, idx, slot.generation)));
        }
    }

    /// Closes the quarantined sockets whose time is up.
    fn release_quarantine(&mut self, now: Instant) {
        while self.quarantine.front().is_some_and(|(t, _)| *t <= now) {
            self.quarantine.pop_front();
        }
    }

    fn abort_all(&mut self, why: &str, stats: &mut Stats) {
        for idx in 0..self.slots.len() as u32 {
            if let Some(s) = self.slots[idx as usize].session.as_mut() {
                s.xfer.fail_local(why.to_string());
                self.flush(idx, stats);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{self, Packet, RequestOptions};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread;

    /// A loopback socket for a toy server, polled every 50 ms, its address, and the flag that
    /// stops its loop.
    fn toy_listener() -> (UdpSocket, SocketAddr, Arc<AtomicBool>) {
        let listener = UdpSocket::bind("127.0.0.1:0").unwrap();
        listener
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr, Arc::new(AtomicBool::new(false)))
    }

    /// A toy server on a loopback socket: each request datagram goes to `serve` (with the
    /// requester's address) on a thread of its own, until the returned flag is set.
    fn toy_accept(
        serve: impl Fn(Vec<u8>, SocketAddr) + Clone + Send + 'static,
    ) -> (SocketAddr, Arc<AtomicBool>) {
        let (listener, addr, stop) = toy_listener();
        let stop2 = stop.clone();
        thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((len, peer)) = listener.recv_from(&mut buf) else {
                    continue;
                };
                let (req, serve) = (buf[..len].to_vec(), serve.clone());
                thread::spawn(move || serve(req, peer));
            }
        });
        (addr, stop)
    }

    /// A minimal lock-step TFTP server on loopback, one thread per transfer, for driving the
    /// event loop with real sockets. `corrupt` flips one byte of every transfer's block 2.
    fn toy_server(content: Arc<[u8]>, corrupt: bool) -> (SocketAddr, Arc<AtomicBool>) {
        // Expects "\0\1name\0octet\0[blksize\0N\0]".
        toy_accept(move |req, peer| serve_one(&req, peer, &content, corrupt))
    }

    fn serve_one(req: &[u8], peer: SocketAddr, content: &[u8], corrupt: bool) {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let fields: Vec<&[u8]> = req[2..].split(|&b| b == 0).collect();
        let mut blksize = 512usize;
        let mut buf = [0u8; 2048];
        if fields.len() >= 4 && fields[2] == b"blksize" {
            blksize = std::str::from_utf8(fields[3]).unwrap().parse().unwrap();
            let mut o = b"\x00\x06blksize\0".to_vec();
            o.extend_from_slice(fields[3]);
            o.push(0);
            sock.send_to(&o, peer).unwrap();
            let Ok((n, _)) = sock.recv_from(&mut buf) else {
                return;
            };
            assert_eq!(&buf[..n], b"\x00\x04\x00\x00");
        }
        let nblocks = content.len() / blksize + 1;
        for b in 1..=nblocks {
            let lo = (b - 1) * blksize;
            let hi = (lo + blksize).min(content.len());
            let mut pkt = vec![0, 3];
            pkt.extend_from_slice(&(b as u16).to_be_bytes());
            pkt.extend_from_slice(&content[lo..hi]);
            if corrupt && b == 2 && pkt.len() > 4 {
                pkt[4] ^= 1;
            }
            // Lock-step with up to 5 resends of this block.
            let mut acked = false;
            for _ in 0..5 {
                sock.send_to(&pkt, peer).unwrap();
                if let Ok((n, _)) = sock.recv_from(&mut buf)
                    && let Ok(Packet::Ack { block }) = wire::parse(&buf[..n])
                    && block == b as u16
                {
                    acked = true;
                    break;
                }
            }
            if !acked {
                return;
            }
        }
    }

    fn run_against(
        addr: SocketAddr,
        content: Arc<[u8]>,
        n: u64,
        c: usize,
        blksize: Option<u16>,
    ) -> Stats {
        run_lossy(addr, content, n, c, blksize, 0.0, 3)
    }

    fn run_lossy(
        addr: SocketAddr,
        content: Arc<[u8]>,
        n: u64,
        c: usize,
        blksize: Option<u16>,
        loss: f64,
        retries: u32,
    ) -> Stats {
        let cfg = RunConfig {
            server: addr,
            n,
            concurrency: c,
            client: ClientConfig {
                options: RequestOptions {
                    blksize,
                    ..RequestOptions::default()
                },
                timeout: Duration::from_millis(300),
                retries,
                backoff: false,
            },
            files: vec![FileSpec {
                name: "f".into(),
                content,
            }],
            seed: 1,
            max_time: Some(Duration::from_secs(20)),
            loss,
            stall: None,
            put: None,
            probe: None,
        };
        let mut stats = Stats::new();
        let elapsed = run(&cfg, &mut stats).unwrap();
        assert!(elapsed < Duration::from_secs(20));
        stats
    }

    /// A finished transfer's port is not reused by a new transfer within `QUARANTINE`: a
    /// resend of the old transfer's final DATA 1 must not reach a new transfer's socket. The
    /// server answers every RRQ with a 1-byte DATA 1 from its own port and records when each
    /// client port asked; 1500 random ephemeral ports repeat (birthday) unless held.
    #[test]
    fn a_finished_transfers_port_is_not_reused_at_once() {
        let (listener, addr, stop) = toy_listener();
        let stop2 = stop.clone();
        let server = thread::spawn(move || {
            let mut asked: Vec<(Instant, u16)> = Vec::new();
            let mut buf = [0u8; 1500];
            while !stop2.load(Ordering::Relaxed) {
                let Ok((len, peer)) = listener.recv_from(&mut buf) else {
                    continue;
                };
                if buf[..len].starts_with(b"\x00\x01") {
                    asked.push((Instant::now(), peer.port()));
                    listener.send_to(b"\x00\x03\x00\x01x", peer).unwrap();
                }
            }
            asked
        });
        let stats = run_against(addr, Arc::from(&b"x"[..]), 1500, 20, None);
        stop.store(true, Ordering::Relaxed);
        let mut asked = server.join().unwrap();
        assert_eq!(stats.counts.completed, 1500, "{:?}", stats.failure_lines);
        asked.sort_by_key(|&(t, port)| (port, t));
        let reused: Vec<_> = asked
            .windows(2)
            .filter(|w| {
                w[0].1 == w[1].1 && w[1].0 - w[0].0 < QUARANTINE - Duration::from_millis(100)
            })
            .map(|w| w[0].1)
            .collect();
        assert!(
            reused.is_empty(),
            "ports reused within the quarantine: {reused:?}"
        );
    }

    /// Files a toy upload server received, by name.
    type Received = Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>;

    /// A minimal lock-step upload server: answers a WRQ with an OACK of its blksize (or ACK 0
    /// without options; neither is resent), ACKs each DATA, and keeps each finished file by
    /// name.
    fn toy_upload_server() -> (SocketAddr, Arc<AtomicBool>, Received) {
        let files: Received = Arc::default();
        let kept = files.clone();
        let (addr, stop) = toy_accept(move |req, peer| {
            assert!(req.starts_with(b"\x00\x02"), "{req:?}");
            let f: Vec<&[u8]> = req[2..].split(|&b| b == 0).collect();
            let name = String::from_utf8(f[0].to_vec()).unwrap();
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            // Longer than a few client retransmit timeouts in a row.
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut blksize = 512;
            if f.len() >= 4 && f[2] == b"blksize" {
                blksize = std::str::from_utf8(f[3]).unwrap().parse().unwrap();
                let mut o = b"\x00\x06blksize\0".to_vec();
                o.extend_from_slice(f[3]);
                o.push(0);
                sock.send_to(&o, peer).unwrap();
            } else {
                sock.send_to(b"\x00\x04\x00\x00", peer).unwrap();
            }
            let mut content = Vec::new();
            let mut next: u16 = 1;
            let mut buf = [0u8; 2048];
            while let Ok((n, _)) = sock.recv_from(&mut buf) {
                let Ok(Packet::Data { block, payload }) = wire::parse(&buf[..n]) else {
                    return;
                };
                if block == next {
                    content.extend_from_slice(payload);
                    next = next.wrapping_add(1);
                }
                // Stored before the final ACK leaves (the client counts the upload
                // done on it); then stays (dallies) until the client is quiet, to
                // re-ACK a final block whose ACK was lost.
                if block == next.wrapping_sub(1) && payload.len() < blksize {
                    kept.lock()
                        .unwrap()
                        .entry(name.clone())
                        .or_insert_with(|| content.clone());
                }
                sock.send_to(&[0, 4, (block >> 8) as u8, block as u8], peer)
                    .unwrap();
            }
        });
        (addr, stop, files)
    }

    #[test]
    fn uploads_land_whole_under_their_own_names() {
        let (addr, stop, files) = toy_upload_server();
        for (blksize, size) in [(Some(1024u16), 10_000u64), (None, 1024), (Some(1000), 0)] {
            files.lock().unwrap().clear();
            let cfg = RunConfig {
                server: addr,
                n: 12,
                concurrency: 5,
                client: ClientConfig {
                    options: RequestOptions {
                        blksize,
                        ..RequestOptions::default()
                    },
                    timeout: Duration::from_millis(300),
                    retries: 3,
                    backoff: false,
                },
                files: Vec::new(),
                seed: 1,
                max_time: Some(Duration::from_secs(20)),
                loss: 0.05,
                stall: None,
                put: Some(PutSpec {
                    prefix: "up-t-".into(),
                    size,
                }),
                probe: None,
            };
            let mut stats = Stats::new();
            run(&cfg, &mut stats).unwrap();
            assert_eq!(stats.counts.completed, 12, "{:?}", stats.failure_lines);
            assert_eq!(stats.counts.payload_bytes, 12 * size);
            let got = files.lock().unwrap();
            for i in 0..12 {
                let name = format!("up-t-{i}");
                let f = got.get(&name).unwrap_or_else(|| panic!("{name} missing"));
                assert_eq!(f.len() as u64, size);
                assert_eq!(
                    crate::pattern::first_mismatch(crate::pattern::key(&name), 0, f),
                    None
                );
            }
        }
        stop.store(true, Ordering::Relaxed);
    }

    #[test]
    fn drives_many_transfers_over_loopback() {
        let content: Arc<[u8]> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let (addr, stop) = toy_server(content.clone(), false);
        let stats = run_against(addr, content.clone(), 30, 8, Some(1024));
        stop.store(true, Ordering::Relaxed);
        assert_eq!(stats.counts.launched, 30);
        assert_eq!(
            stats.counts.completed, 30,
            "failures: {:?}",
            stats.failure_lines
        );
        assert_eq!(stats.counts.failed, 0);
        assert_eq!(stats.counts.payload_bytes, 30 * 10_000);
        assert_eq!(stats.counts.blocks, 30 * 10);
        assert_eq!(stats.counts.oack, 30);
        assert_eq!(stats.total_us.len(), 30);
    }

    #[test]
    fn simulated_loss_is_recovered_by_retransmission() {
        let content: Arc<[u8]> = (0..5000u32).map(|i| (i * 3) as u8).collect();
        let (addr, stop) = toy_server(content.clone(), false);
        // Generous retries: a transfer fails only after 9 losses in a row on one block.
        let stats = run_lossy(addr, content, 10, 10, None, 0.1, 8);
        stop.store(true, Ordering::Relaxed);
        assert_eq!(
            stats.counts.completed, 10,
            "failures: {:?}",
            stats.failure_lines
        );
        assert!(stats.counts.injected_drops > 0);
        assert!(stats.counts.retransmits > 0 || stats.counts.resync_acks > 0);
        assert_eq!(stats.counts.payload_bytes, 10 * 5000);
    }

    #[test]
    fn corrupted_data_fails_the_run() {
        let content: Arc<[u8]> = (0..2000u32).map(|i| (i * 13) as u8).collect();
        let (addr, stop) = toy_server(content.clone(), true);
        let stats = run_against(addr, content, 5, 5, None);
        stop.store(true, Ordering::Relaxed);
        assert_eq!(stats.counts.completed, 0);
        assert_eq!(stats.counts.failures.get("mismatch"), Some(&5));
        assert!(
            stats.failure_lines[0].contains("byte 512 (block 2"),
            "{:?}",
            stats.failure_lines
        );
    }

    #[test]
    fn a_silent_server_stalls_the_run_early() {
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let cfg = RunConfig {
            server: silent.local_addr().unwrap(),
            n: 10,
            concurrency: 4,
            client: ClientConfig {
                options: RequestOptions::default(),
                timeout: Duration::from_secs(5),
                retries: 5,
                backoff: false,
            },
            files: vec![FileSpec {
                name: "f".into(),
                content: Arc::from(&b"x"[..]),
            }],
            seed: 1,
            max_time: Some(Duration::from_secs(20)),
            loss: 0.0,
            stall: Some(Duration::from_millis(200)),
            put: None,
            probe: None,
        };
        let mut stats = Stats::new();
        let elapsed = run(&cfg, &mut stats).unwrap();
        // Well before the first 5 s retransmit timeout: the stall ended it.
        assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
        assert!(stats.counts.stalled);
        assert_eq!(stats.counts.launched, 4, "no launches after the stall");
        assert_eq!(stats.counts.failures.get("local"), Some(&4));
        assert!(
            stats.failure_lines[0].contains("--stall"),
            "{:?}",
            stats.failure_lines
        );
    }

    #[test]
    fn silent_server_times_out() {
        // A bound socket that never answers.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let cfg = RunConfig {
            server: addr,
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
        assert_eq!(stats.counts.retransmits, 6);
        // 3 timeouts of 50 ms each, not much more.
        assert!(
            elapsed >= Duration::from_millis(150) && elapsed < Duration::from_secs(2),
            "{elapsed:?}"
        );
        // Every RRQ and retransmit reached the server port: 3 × (1 + 2).
        silent.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let mut got = 0;
        while silent.recv_from(&mut buf).is_ok() {
            got += 1;
        }
        assert_eq!(got, 9);
    }
}
