//! The io_uring driver: one thread per pinned core, thin around the sans-IO
//! [`Endpoint`]. It owns one io_uring, its listening sockets (one
//! `SO_REUSEPORT` socket per `--address`), the transfer sockets of its
//! sessions, a timer wheel and two provided-buffer rings; nothing is shared
//! mutably with other shards.
//!
//! One loop turn:
//! 1. submit everything queued and wait (one `io_uring_enter`) for a
//!    completion or the wheel's next deadline;
//! 2. handle completions: requests on listeners (`handle_request`),
//!    datagrams on transfer sockets (`handle_datagram`), finished sends,
//!    the shutdown eventfd; every receive buffer goes back to its ring as
//!    soon as its datagram was handled;
//! 3. expire timers (`handle_timeout`);
//! 4. for every session touched this turn, and those waiting for a send
//!    slot: drain `poll_transmit` into `SendMsg` SQEs, re-arm its timer with
//!    `poll_timeout`, and remove it once `is_finished`;
//! 5. re-arm multishot receives that ended (e.g. `-ENOBUFS` when a ring ran
//!    dry), now that buffers are back.
//!
//! Lifetimes the kernel relies on: a send's msghdr, iovecs and header live in
//! a boxed send slot until its CQE; its payload points into the session's
//! file mapping, which is kept alive (lingering) after the session is
//! removed until its last send completed; a transfer socket is closed only
//! after its multishot receive ended and after an `io_uring_enter` consumed
//! every SQE that names it. The shard counts the operations the kernel holds
//! (each SQE +1, each final CQE -1); at exit it cancels them all and reaps
//! until none is left before it frees buffer rings, send slots or mappings,
//! and if the kernel does not finish in time it leaks those instead
//! (`teardown`, `abandon`): closing the ring does not wait for them.
//!
//! Transfer sockets are pooled: when a transfer ends, its socket (still
//! bound, its multishot receive still armed) waits idle for the next
//! transfer on the same local address, and is never handed to the client
//! that used it last, so each transfer of a client still gets a new TID.
//! That saves a socket, a setsockopt, a bind, a close and a receive re-arm
//! per transfer. The next port must not be guessable (a spoofer could
//! forge ACK 0 from a victim): an idle socket is drawn at random, and only
//! from a pool of at least `ports::MIN_IDLE_CHOICE` candidates; below that
//! a fresh socket gets a port of the kernel's choosing. Payload pointers are never read in user space:
//! a file truncated under us makes the kernel's copy fail with `EFAULT`
//! (and the session is aborted) instead of raising SIGBUS here.

mod bufring;
#[cfg(test)]
mod e2e;
mod gso;
mod log;
pub mod net;
mod ports;
mod send;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::endpoint::{
    DatagramOutcome, Endpoint, EndpointConfig, RequestOutcome, SessionId, SessionView,
};
use crate::files::{FileData, FileRoot};
use crate::refusal::Abort;
use crate::timer::TimerWheel;
use bufring::BufRing;
use gso::NoGsoPaths;
use ports::Idle;
use rand::SeedableRng;
use rand::rngs::StdRng;
use send::{HEADER_CAP, MAX_SEGMENTS, Owner, SendPool};

/// What one shard needs; the server builds one per core.
pub struct ShardConfig {
    pub index: usize,
    /// Core to pin the thread to (`None`: not pinned).
    pub cpu: Option<usize>,
    /// Listening sockets from [`net::bind_listener`], one per `--address`.
    pub listeners: Vec<UdpSocket>,
    pub endpoint: EndpointConfig,
    pub files: FileRoot,
    /// Print each finished transfer's log line to stderr.
    pub log_transfers: bool,
    /// How long live transfers may run on after shutdown was asked for.
    pub shutdown_grace: Duration,
}

/// Sizes of the ring, buffer rings and send pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    pub sq_entries: u32,
    pub cq_entries: u32,
    /// Listener buffers (requests): count (power of two) and size.
    pub listen_bufs: (u16, usize),
    /// Transfer-socket buffers (ACK/ERROR; longer datagrams are truncated).
    pub session_bufs: (u16, usize),
    pub send_slots: usize,
    /// Idle sockets a local address must offer before one is reused.
    pub min_idle_choice: usize,
    /// After the grace period (or once idle): how long to wait for the last
    /// sends, cancels and closes before tearing down anyway.
    pub final_drain: Duration,
    /// At teardown: how long to wait for cancelled operations to complete
    /// before leaking the memory they may still use.
    pub reap_bound: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            sq_entries: 4096,
            cq_entries: 16384,
            listen_bufs: (2048, 2048),
            session_bufs: (4096, 1024),
            send_slots: 2048,
            min_idle_choice: ports::MIN_IDLE_CHOICE,
            final_drain: FINAL_DRAIN,
            reap_bound: REAP_BOUND,
        }
    }
}

/// How a shard ended, for tests and the last log line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ExitReport {
    pub counters: Counters,
    /// Ring operations outstanding when teardown began (then cancelled).
    pub outstanding_at_teardown: u64,
    /// Ring operations outstanding when memory was freed (or leaked).
    pub outstanding_at_free: u64,
    /// The kernel did not finish in time: send slots, mappings and buffer
    /// rings were leaked rather than freed.
    pub leaked: bool,
}

/// A running shard thread.
pub struct ShardHandle {
    wake: Arc<EventFd>,
    thread: JoinHandle<io::Result<ExitReport>>,
}

impl ShardHandle {
    /// Asks the shard to stop: it stops listening, lets live transfers run
    /// for up to `shutdown_grace`, aborts the rest and returns.
    pub fn shut_down(&self) {
        // The counter only grows; a full counter (EAGAIN) is already a wake-up.
        let _ = self.wake.write(1);
    }

    /// Waits for the shard thread to end.
    pub fn join(self) -> io::Result<()> {
        self.join_report().map(|_| ())
    }

    /// Waits for the shard thread to end; how it ended.
    pub(crate) fn join_report(self) -> io::Result<ExitReport> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("shard thread panicked")))
    }
}

#[cfg(test)]
pub(crate) fn spawn_tuned(config: ShardConfig, tuning: Tuning) -> io::Result<ShardHandle> {
    prepare_tuned(config, tuning)?.spawn()
}

/// A shard whose io_uring exists but is not enabled yet: made by the
/// starting thread, possibly before it drops privileges, and run by the
/// shard thread, which becomes its only submitter.
pub struct PreparedShard {
    config: ShardConfig,
    tuning: Tuning,
    ring: IoUring,
}

/// Creates a shard's io_uring (disabled) in the calling thread. A ring made
/// by root is not charged to RLIMIT_MEMLOCK, so shards prepared before
/// `--user` takes effect do not depend on that user's locked-memory limit.
pub fn prepare(config: ShardConfig) -> io::Result<PreparedShard> {
    prepare_tuned(config, Tuning::default())
}

fn prepare_tuned(config: ShardConfig, tuning: Tuning) -> io::Result<PreparedShard> {
    let ring = build_ring(&tuning)?;
    Ok(PreparedShard {
        config,
        tuning,
        ring,
    })
}

impl PreparedShard {
    /// Starts the shard thread. Returns once its io_uring is enabled and its
    /// listeners are receiving, or with the set-up error.
    pub fn spawn(self) -> io::Result<ShardHandle> {
        let PreparedShard {
            config,
            tuning,
            ring,
        } = self;
        let wake = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
        let thread_wake = Arc::clone(&wake);
        let index = config.index;
        let name = format!("shard-{index}");
        let panic_hook = test_panic_hook(index);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let mut shard = match Shard::new(config, tuning, ring, thread_wake) {
                Ok(shard) => {
                    let _ = tx.send(Ok(()));
                    shard
                }
                Err(e) => {
                    let kind = e.kind();
                    let _ = tx.send(Err(e));
                    return Err(io::Error::new(kind, "shard set-up failed"));
                }
            };
            if panic_hook {
                TEST_PANIC_SHARD.store(index + 1, std::sync::atomic::Ordering::Relaxed);
            }
            // `run` returns Ok only after a requested shutdown; an error or
            // a panic leaves this thread serving nothing: report it.
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.run())) {
                Ok(Ok(())) => Ok(shard.free()),
                Ok(Err(e)) => {
                    report_death(index, &e.to_string());
                    shard.free();
                    Err(e)
                }
                Err(payload) => {
                    // Its operations were neither cancelled nor reaped.
                    shard.abandon();
                    let why = payload
                        .downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    report_death(index, &format!("panicked: {why}"));
                    std::panic::resume_unwind(payload)
                }
            }
        })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(ShardHandle { wake, thread }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other("shard thread died during set-up"))
            }
        }
    }
}

/// Test hook, off unless the environment names a shard: with
/// `RINGTFTPD_TEST_PANIC_SHARD=N`, shard N panics when it first sends a
/// transfer's packet, so tests can check that a dead shard is noticed.
/// Holds N + 1 once armed (0: off); one relaxed load per polled transmit.
static TEST_PANIC_SHARD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether `RINGTFTPD_TEST_PANIC_SHARD` names shard `index`.
fn test_panic_hook(index: usize) -> bool {
    std::env::var("RINGTFTPD_TEST_PANIC_SHARD").is_ok_and(|v| v.trim().parse() == Ok(index))
}

/// Logs that shard `index` ended without being asked to, and tells
/// `server::run`: a SIGUSR1 queued to the process with the shard's index,
/// sent only where SIGUSR1 is blocked (run blocks it and waits for it), so
/// that a process not expecting it is not killed by it.
fn report_death(index: usize, why: &str) {
    eprintln!("ringtftpd: shard {index} died: {why}");
    let blocked = nix::sys::signal::SigSet::thread_get_mask()
        .is_ok_and(|m| m.contains(nix::sys::signal::Signal::SIGUSR1));
    if blocked {
        let value = libc::sigval {
            sival_ptr: index as *mut libc::c_void,
        };
        // SAFETY: plain syscall; the value is an integer, never dereferenced.
        unsafe { libc::sigqueue(libc::getpid(), libc::SIGUSR1, value) };
    }
}

const LISTEN_BGID: u16 = 0;
const SESSION_BGID: u16 = 1;
const TICK: Duration = Duration::from_millis(1);
const MAX_WAIT: Duration = Duration::from_secs(1);
/// After the grace period (or once idle): how long to wait for the last
/// sends, cancels and closes before returning anyway.
const FINAL_DRAIN: Duration = Duration::from_secs(2);
/// At teardown: how long cancelled operations may take to complete.
const REAP_BOUND: Duration = Duration::from_secs(1);
/// Most waits of one teardown (each up to the rest of `REAP_BOUND`).
const REAP_TURNS: u32 = 1000;
/// Most sends one session may queue per service, so one big window does
/// not starve the others.
const SERVE_BUDGET: usize = 256;
/// From this many live sessions on, each wait lingers up to `BATCH_WAIT`
/// for `BATCH_COMPLETIONS` completions (kernel min-wait, 6.12+).
const BATCH_SESSIONS: usize = 64;
const BATCH_WAIT: Duration = Duration::from_micros(50);
const BATCH_COMPLETIONS: usize = 32;
/// Longest a shard waits at exit for its log lines to be written.
const LOG_FLUSH: Duration = Duration::from_millis(500);
/// Size of the reply buffer given to the endpoint; fits in a send slot.
const REPLY_CAP: usize = HEADER_CAP;

/// Scratch space of `serve`: the packet just polled and the payloads of a
/// segmented send.
struct ServeWork {
    header: [u8; HEADER_CAP],
    payloads: [(*const u8, usize); MAX_SEGMENTS],
}

impl Default for ServeWork {
    fn default() -> Self {
        ServeWork {
            header: [0; HEADER_CAP],
            payloads: [(std::ptr::null(), 0); MAX_SEGMENTS],
        }
    }
}

/// What a CQE belongs to, packed into its `user_data`: kind in the top
/// byte, a 24-bit epoch (session receives), an index in the low 32 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    ListenerRecv(u32),
    /// `epoch` tells a receive from an earlier one on the same slot index.
    SessionRecv {
        index: u32,
        epoch: u32,
    },
    Send(u32),
    Cancel,
    Wake,
}

const EPOCH_MASK: u32 = 0x00ff_ffff;

impl Token {
    fn encode(self) -> u64 {
        let (kind, epoch, index) = match self {
            Token::ListenerRecv(i) => (1u64, 0u32, i),
            Token::SessionRecv { index, epoch } => (2, epoch & EPOCH_MASK, index),
            Token::Send(i) => (3, 0, i),
            Token::Cancel => (4, 0, 0),
            Token::Wake => (5, 0, 0),
        };
        kind << 56 | u64::from(epoch) << 32 | u64::from(index)
    }

    fn decode(v: u64) -> Option<Token> {
        let index = v as u32;
        let epoch = (v >> 32) as u32 & EPOCH_MASK;
        Some(match v >> 56 {
            1 => Token::ListenerRecv(index),
            2 => Token::SessionRecv { index, epoch },
            3 => Token::Send(index),
            4 => Token::Cancel,
            5 => Token::Wake,
            _ => return None,
        })
    }
}

/// Per-shard counters, plain fields.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Counters {
    /// Loop turns (one `io_uring_enter` each, barring a full SQ).
    turns: u64,
    requests: u64,
    /// Requests answered with an ERROR by the endpoint.
    refused: u64,
    ignored: u64,
    started: u64,
    /// Admitted but no transfer socket could be made ("server busy").
    busy: u64,
    finished: u64,
    datagrams_in: u64,
    sends: u64,
    send_errors: u64,
    /// Sends that failed with EFAULT (file changed under a transfer).
    send_faults: u64,
    /// Replies dropped because every send slot was busy.
    replies_dropped: u64,
    recv_errors: u64,
    /// Multishot receives that ended and were armed again.
    rearms: u64,
    /// Of those, how many ended because a buffer ring ran dry.
    ring_dry: u64,
    /// Log lines dropped because the logger's queue was full.
    log_dropped: u64,
    /// Times a transfer socket could not be made for lack of descriptors
    /// or memory and the idle pool was closed to make room.
    pool_flushes: u64,
    /// Session datagrams longer than a buffer, ignored.
    truncated: u64,
    /// Segmented (UDP GSO) sends completed.
    gso_sends: u64,
    /// Segmented sends refused by their path and resent one by one.
    gso_fallbacks: u64,
}

struct Listener {
    sock: UdpSocket,
    v6: bool,
    bound: SocketAddr,
    recv_armed: bool,
}

/// A transfer socket: owned by a live session, or idle in the pool.
struct TransferSock {
    fd: OwnedFd,
    v6: bool,
    /// The local address (and IPv6 link-local scope) it is bound to.
    key: (IpAddr, u32),
    /// The token of its armed multishot receive, if armed.
    recv: Option<u64>,
    owner: Option<SessionId>,
    /// A receive failed: close it rather than pool it.
    broken: bool,
}

/// Most idle transfer sockets a shard keeps for reuse.
const MAX_IDLE_SOCKS: usize = 1024;

/// A live session's driver state, at `SessionId::index`.
struct LiveSock {
    id: SessionId,
    /// Index of its socket in `Shard::tsocks`.
    sock: u32,
    peer: SocketAddr,
    /// The address its socket is bound to (with `peer`, the GSO path).
    local: IpAddr,
    v6: bool,
    blksize: u16,
    /// DATA packets one send may carry (UDP GSO); 1: one per send.
    segments: u16,
    /// A segmented send of this session has succeeded: its path takes GSO.
    gso_proven: bool,
    /// Sends of this session not yet completed.
    inflight: u32,
    touched: bool,
    queued: bool,
    faulted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Running,
    /// Listeners stopped; live transfers may finish until `deadline`.
    Draining {
        deadline: Instant,
    },
    /// Everything aborted or done; waiting for the kernel until `deadline`.
    Final {
        deadline: Instant,
    },
}

#[derive(Debug, Clone, Copy)]
enum Rearm {
    Listener(u32),
    Sock(u32),
}

struct Shard {
    // Closing it does not wait for its operations: `teardown` does, and
    // `abandon` leaks what they may still touch.
    ring: IoUring,
    listen_bufs: BufRing,
    session_bufs: BufRing,
    listen_msghdr: Box<libc::msghdr>,
    session_msghdr: Box<libc::msghdr>,
    wake: Arc<EventFd>,
    wake_buf: Box<[u8; 8]>,
    listeners: Vec<Listener>,
    endpoint: Endpoint<FileData>,
    files: FileRoot,
    wheel: TimerWheel,
    socks: Vec<Option<LiveSock>>,
    /// Transfer sockets, live and idle; receive tokens carry their index.
    tsocks: Vec<Option<TransferSock>>,
    tsocks_free: Vec<u32>,
    /// Idle sockets by bound address, reused by new transfers: a socket,
    /// its options, its bind, its close and its receive re-arm saved.
    idle: HashMap<(IpAddr, u32), Vec<Idle>>,
    idle_count: usize,
    min_idle_choice: usize,
    /// Picks idle sockets (ports must not be guessable).
    rng: StdRng,
    live: usize,
    /// `serve`'s scratch space, kept between calls (None while in use).
    serve_work: Option<Box<ServeWork>>,
    next_epoch: u32,
    sends: SendPool,
    /// Removed sessions' sockets whose receive is being cancelled, by token.
    closing: HashMap<u64, OwnedFd>,
    /// Sockets to close once the SQEs naming them were submitted.
    to_close: Vec<OwnedFd>,
    /// Removed sessions' files, kept while their sends are in flight.
    lingering: HashMap<SessionId, (FileData, u32)>,
    ready: VecDeque<SessionId>,
    touched: Vec<SessionId>,
    rearm: Vec<Rearm>,
    backlog: VecDeque<squeue::Entry>,
    /// Interface MTUs by ifindex, with when they were read.
    mtu_cache: HashMap<u32, (Option<u32>, Instant)>,
    reply: Box<[u8; REPLY_CAP]>,
    cqes: Vec<cqueue::Entry>,
    expired: Vec<u32>,
    /// SendMsg SQEs queued since the last enter.
    sends_queued: u32,
    /// Of those, a segmented send on a path not yet proven to take GSO: its
    /// completion must be seen at once (a refusal means a resend now).
    gso_probe_queued: bool,
    /// Operations the kernel holds: SQEs put in the SQ whose final CQE
    /// (for a multishot receive, the one without `F_MORE`) was not reaped.
    outstanding: u64,
    final_drain: Duration,
    reap_bound: Duration,
    exit: ExitReport,
    /// Paths that refused a GSO send lately: one packet per send there.
    no_gso: NoGsoPaths,
    counters: Counters,
    phase: Phase,
    index: usize,
    log_transfers: bool,
    shutdown_grace: Duration,
}

/// Flags to ask for, best first: SINGLE_ISSUER + DEFER_TASKRUN (6.1+),
/// then COOP_TASKRUN + TASKRUN_FLAG (5.19+), then none.
#[derive(Clone, Copy)]
enum RingFlags {
    DeferTaskrun,
    CoopTaskrun,
    Plain,
}

fn build_ring(t: &Tuning) -> io::Result<IoUring> {
    let mut last = None;
    for flags in [
        RingFlags::DeferTaskrun,
        RingFlags::CoopTaskrun,
        RingFlags::Plain,
    ] {
        let mut b = IoUring::builder();
        // Enabled by the shard thread (PreparedShard::spawn).
        b.setup_cqsize(t.cq_entries).setup_r_disabled();
        match flags {
            RingFlags::DeferTaskrun => {
                b.setup_submit_all()
                    .setup_single_issuer()
                    .setup_defer_taskrun();
            }
            RingFlags::CoopTaskrun => {
                b.setup_submit_all()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag();
            }
            RingFlags::Plain => {}
        }
        match b.build(t.sq_entries) {
            Ok(ring) => return Ok(ring),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no io_uring set-up worked")))
}

fn recv_msghdr(control_len: usize) -> Box<libc::msghdr> {
    // SAFETY: msghdr is plain old data; all-zero is a valid value.
    let mut m: Box<libc::msghdr> = Box::new(unsafe { mem::zeroed() });
    // Only the lengths matter for a multishot receive: they fix the layout
    // of name and control in each buffer (io_uring_recvmsg_out).
    m.msg_namelen = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
    m.msg_controllen = control_len as _;
    m
}

fn pin_to(cpu: usize) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

/// How long a looked-up interface MTU is trusted (MTUs change rarely).
const MTU_TTL: Duration = Duration::from_secs(30);

/// MTU of the interface a request came in on, cached per ifindex.
fn lookup_mtu(
    cache: &mut HashMap<u32, (Option<u32>, Instant)>,
    listeners: &[Listener],
    li: u32,
    ifindex: u32,
    now: Instant,
) -> Option<u32> {
    if ifindex == 0 {
        return None;
    }
    if let Some(&(mtu, read_at)) = cache.get(&ifindex)
        && now.saturating_duration_since(read_at) < MTU_TTL
    {
        return mtu;
    }
    let l = listeners.get(li as usize)?;
    let mtu = net::interface_mtu(l.sock.as_fd(), ifindex).ok();
    if cache.len() >= 4096 {
        cache.clear();
    }
    cache.insert(ifindex, (mtu, now));
    mtu
}

/// How many DATA packets of a window one send may carry: UDP GSO cuts one
/// send into packets of blksize + 4 bytes, which must fit the interface MTU
/// unfragmented, and the whole send 64 KiB.
fn gso_segments(view: &SessionView<'_, FileData>, mtu: Option<u32>) -> u16 {
    let ip_udp = if view.local.is_ipv6() { 48 } else { 28 };
    let packet = u32::from(view.blksize) + 4;
    match mtu {
        Some(mtu) if view.windowsize > 1 && packet + ip_udp <= mtu => {
            let fit = 65_000 / packet;
            fit.min(MAX_SEGMENTS as u32).min(u32::from(view.windowsize)) as u16
        }
        _ => 1,
    }
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// Errors of socket creation that closing idle sockets can relieve.
fn is_resource_shortage(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
    )
}

impl Shard {
    fn new(
        config: ShardConfig,
        tuning: Tuning,
        ring: IoUring,
        wake: Arc<EventFd>,
    ) -> io::Result<Self> {
        // This thread becomes the ring's only submitter.
        ring.submitter().register_enable_rings()?;
        if let Some(cpu) = config.cpu
            && let Err(e) = pin_to(cpu)
        {
            log::line(format!(
                "shard {}: cannot pin to cpu {cpu}: {e}; running unpinned",
                config.index
            ));
        }
        let listen_bufs = BufRing::new(tuning.listen_bufs.0, tuning.listen_bufs.1, LISTEN_BGID)?;
        let session_bufs =
            BufRing::new(tuning.session_bufs.0, tuning.session_bufs.1, SESSION_BGID)?;
        listen_bufs.register(&ring.submitter())?;
        session_bufs.register(&ring.submitter())?;
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for sock in config.listeners {
            let v6 = net::is_v6_socket(sock.as_fd())?;
            let bound = net::local_addr(sock.as_fd())?;
            listeners.push(Listener {
                sock,
                v6,
                bound,
                recv_armed: false,
            });
        }
        let endpoint = Endpoint::new(config.endpoint);
        let capacity = endpoint.capacity();
        let now = Instant::now();
        let mut shard = Shard {
            ring,
            listen_bufs,
            session_bufs,
            listen_msghdr: recv_msghdr(net::RECV_CONTROL_LEN),
            session_msghdr: recv_msghdr(0),
            wake,
            wake_buf: Box::new([0; 8]),
            listeners,
            endpoint,
            files: config.files,
            wheel: TimerWheel::new(capacity, TICK, now),
            socks: (0..capacity).map(|_| None).collect(),
            tsocks: Vec::new(),
            tsocks_free: Vec::new(),
            idle: HashMap::new(),
            idle_count: 0,
            min_idle_choice: tuning.min_idle_choice,
            rng: StdRng::from_os_rng(),
            live: 0,
            serve_work: Some(Box::default()),
            next_epoch: 0,
            sends: SendPool::new(tuning.send_slots),
            closing: HashMap::new(),
            to_close: Vec::new(),
            lingering: HashMap::new(),
            ready: VecDeque::new(),
            touched: Vec::new(),
            rearm: Vec::new(),
            backlog: VecDeque::new(),
            mtu_cache: HashMap::new(),
            reply: Box::new([0; REPLY_CAP]),
            cqes: Vec::with_capacity(tuning.cq_entries as usize),
            expired: Vec::new(),
            sends_queued: 0,
            gso_probe_queued: false,
            outstanding: 0,
            final_drain: tuning.final_drain,
            reap_bound: tuning.reap_bound,
            exit: ExitReport::default(),
            no_gso: NoGsoPaths::new(gso::NO_GSO_PATHS, gso::NO_GSO_TTL),
            counters: Counters::default(),
            phase: Phase::Running,
            index: config.index,
            log_transfers: config.log_transfers,
            shutdown_grace: config.shutdown_grace,
        };
        shard.arm_wake();
        for i in 0..shard.listeners.len() {
            shard.arm_listener(i as u32);
        }
        shard.ring.submit()?;
        Ok(shard)
    }

    fn run(&mut self) -> io::Result<()> {
        let served = self.serve_loop();
        self.teardown();
        served
    }

    fn serve_loop(&mut self) -> io::Result<()> {
        loop {
            self.flush_backlog();
            let timeout = self.wait_timeout(Instant::now());
            let ts = types::Timespec::from(timeout);
            // Sends on UDP usually complete inside this very enter; wait for
            // completions beyond them, so that a lock-step block costs one
            // enter, not two (the send's CQE would wake us at once). With
            // many sessions, linger up to BATCH_WAIT for a batch of them:
            // a few tens of µs of latency buys far fewer enters per block.
            let sends = mem::take(&mut self.sends_queued) as usize;
            let (want, args) = if mem::take(&mut self.gso_probe_queued) {
                // Only the sends' own completions, which come inside this
                // enter: a refused GSO send is resent in this very turn.
                (sends, types::SubmitArgs::new().timespec(&ts))
            } else if self.live >= BATCH_SESSIONS {
                let args = types::SubmitArgs::new()
                    .timespec(&ts)
                    .min_wait_usec(BATCH_WAIT.as_micros() as u32);
                (sends + BATCH_COMPLETIONS, args)
            } else {
                (sends + 1, types::SubmitArgs::new().timespec(&ts))
            };
            match self.ring.submitter().submit_with_args(want, &args) {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(e) => return Err(e),
            }
            if self.backlog.is_empty() && self.ring.submission().is_empty() {
                // Every SQE naming these sockets was consumed by that enter.
                self.to_close.clear();
            }
            let now = Instant::now();
            self.counters.turns += 1;
            let mut cqes = mem::take(&mut self.cqes);
            cqes.extend(self.ring.completion());
            for cqe in cqes.drain(..) {
                self.account(&cqe);
                self.on_cqe(now, &cqe);
            }
            self.cqes = cqes;
            self.expire_timers(now);
            self.advance_shutdown(now);
            self.serve_ready(now);
            self.serve_touched(now);
            self.rearm_recvs();
            if self.should_exit(now) {
                return Ok(());
            }
        }
    }

    /// One operation fewer in the kernel if `cqe` is its last: a multishot
    /// receive goes on while its CQEs carry `IORING_CQE_F_MORE`.
    fn account(&mut self, cqe: &cqueue::Entry) {
        if !cqueue::more(cqe.flags()) {
            debug_assert!(self.outstanding > 0, "a CQE for no outstanding operation");
            self.outstanding = self.outstanding.saturating_sub(1);
        }
    }

    fn wait_timeout(&self, now: Instant) -> Duration {
        if !self.ready.is_empty() && self.sends.has_free() {
            // A session left work for lack of budget, not of slots.
            return Duration::ZERO;
        }
        let mut deadline = self.wheel.next_expiry();
        let phase_deadline = match self.phase {
            Phase::Running => None,
            Phase::Draining { deadline } | Phase::Final { deadline } => Some(deadline),
        };
        if let Some(p) = phase_deadline {
            deadline = Some(deadline.map_or(p, |d| d.min(p)));
        }
        deadline.map_or(MAX_WAIT, |d| d.saturating_duration_since(now).min(MAX_WAIT))
    }

    /// Queues an SQE; if the SQ is full, submits to make room, else keeps it
    /// for the next turn.
    fn push(&mut self, sqe: squeue::Entry) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(sqe);
            return;
        }
        // SAFETY: every SQE built by this shard points only at memory that
        // outlives its operation: the boxed receive msghdrs and wake buffer
        // (fields of self, dropped after the ring), send slots (boxed, not
        // reused before their CQE) and file mappings (kept by the session,
        // then by `lingering`, until the send's CQE).
        if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
            self.outstanding += 1;
            return;
        }
        let _ = self.ring.submit();
        // SAFETY: as above.
        if unsafe { self.ring.submission().push(&sqe) }.is_ok() {
            self.outstanding += 1;
        } else {
            self.backlog.push_back(sqe);
        }
    }

    fn flush_backlog(&mut self) {
        while let Some(sqe) = self.backlog.front() {
            // SAFETY: as in push(); backlogged SQEs keep their memory alive
            // the same way.
            if unsafe { self.ring.submission().push(sqe) }.is_err() {
                if self.ring.submit().is_err() {
                    break;
                }
                continue;
            }
            self.outstanding += 1;
            self.backlog.pop_front();
        }
    }

    fn arm_wake(&mut self) {
        let sqe = opcode::Read::new(
            types::Fd(self.wake.as_fd().as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(Token::Wake.encode());
        self.push(sqe);
    }

    fn arm_listener(&mut self, index: u32) {
        let Some(l) = self.listeners.get_mut(index as usize) else {
            return;
        };
        let sqe = opcode::RecvMsgMulti::new(
            types::Fd(l.sock.as_raw_fd()),
            &*self.listen_msghdr,
            LISTEN_BGID,
        )
        .build()
        .user_data(Token::ListenerRecv(index).encode());
        l.recv_armed = true;
        self.push(sqe);
    }

    fn arm_sock_recv(&mut self, si: u32) {
        let epoch = self.next_epoch;
        self.next_epoch = self.next_epoch.wrapping_add(1) & EPOCH_MASK;
        let token = Token::SessionRecv { index: si, epoch }.encode();
        let Some(ts) = self.tsocks.get_mut(si as usize).and_then(|t| t.as_mut()) else {
            return;
        };
        let fd = ts.fd.as_raw_fd();
        ts.recv = Some(token);
        let sqe = opcode::RecvMsgMulti::new(types::Fd(fd), &*self.session_msghdr, SESSION_BGID)
            .build()
            .user_data(token);
        self.push(sqe);
    }

    fn tsock_fd(&self, si: u32) -> Option<RawFd> {
        let ts = self.tsocks.get(si as usize)?.as_ref()?;
        Some(ts.fd.as_raw_fd())
    }

    /// A transfer socket bound to `local` for `peer`: an idle one drawn at
    /// random from the pool if it offers enough (never the one `peer` used
    /// last), else a new one.
    fn acquire_sock(
        &mut self,
        id: SessionId,
        local: IpAddr,
        ifindex: u32,
        peer: SocketAddr,
    ) -> io::Result<u32> {
        let scope = match local {
            IpAddr::V6(ip) if ip.is_unicast_link_local() => ifindex,
            _ => 0,
        };
        let key = (local, scope);
        if let Some(list) = self.idle.get_mut(&key) {
            let usable = ports::pick_idle(list, peer, self.min_idle_choice, &mut self.rng);
            if let Some(pos) = usable {
                let si = list.swap_remove(pos).sock;
                self.idle_count -= 1;
                if let Some(ts) = self.tsocks.get_mut(si as usize).and_then(|t| t.as_mut()) {
                    ts.owner = Some(id);
                    if ts.recv.is_none() {
                        self.rearm.push(Rearm::Sock(si));
                    }
                    return Ok(si);
                }
            }
        }
        let fd = match net::transfer_socket(local, ifindex) {
            Ok(fd) => fd,
            // Out of descriptors or socket memory: idle pooled sockets hold
            // both; give them up and try once more.
            Err(e) if is_resource_shortage(&e) && self.idle_count > 0 => {
                self.counters.pool_flushes += 1;
                self.close_idle_now();
                net::transfer_socket(local, ifindex)?
            }
            Err(e) => return Err(e),
        };
        let ts = TransferSock {
            fd,
            v6: local.is_ipv6(),
            key,
            recv: None,
            owner: Some(id),
            broken: false,
        };
        let si = match self.tsocks_free.pop() {
            Some(si) => {
                self.tsocks[si as usize] = Some(ts);
                si
            }
            None => {
                self.tsocks.push(Some(ts));
                (self.tsocks.len() - 1) as u32
            }
        };
        self.arm_sock_recv(si);
        Ok(si)
    }

    /// Closes every idle pooled socket, at once if possible so that their
    /// descriptors are free for the caller: once an enter consumed every
    /// queued SQE, no SQE names them any more, and an armed receive holds
    /// its own reference to the socket until its cancel ends it.
    fn close_idle_now(&mut self) {
        self.flush_backlog();
        let _ = self.ring.submit();
        let consumed = self.backlog.is_empty() && self.ring.submission().is_empty();
        let idle: Vec<u32> = self
            .idle
            .drain()
            .flat_map(|(_, list)| list.into_iter().map(|i| i.sock))
            .collect();
        self.idle_count = 0;
        for si in idle {
            self.close_sock(si);
        }
        if consumed {
            // Sockets only waiting for their receive's final CQE (that CQE
            // finds no entry and is ignored) or for the SQ to drain.
            self.closing.clear();
            self.to_close.clear();
        }
    }

    /// Takes socket `si` out of the table and closes it once the kernel is
    /// done with it.
    fn close_sock(&mut self, si: u32) {
        let Some(ts) = self.tsocks.get_mut(si as usize).and_then(|t| t.take()) else {
            return;
        };
        self.tsocks_free.push(si);
        match ts.recv {
            Some(token) => {
                let sqe = opcode::AsyncCancel::new(token)
                    .build()
                    .user_data(Token::Cancel.encode());
                self.push(sqe);
                self.closing.insert(token, ts.fd);
            }
            None => self.to_close.push(ts.fd),
        }
    }

    /// Returns socket `si` to the pool after its transfer, or closes it.
    fn release_sock(&mut self, si: u32, peer: SocketAddr) {
        let poolable = self.phase == Phase::Running
            && self.idle_count < MAX_IDLE_SOCKS
            && self
                .tsocks
                .get(si as usize)
                .and_then(|t| t.as_ref())
                .is_some_and(|t| !t.broken && t.recv.is_some());
        if !poolable {
            self.close_sock(si);
            return;
        }
        if let Some(ts) = self.tsocks.get_mut(si as usize).and_then(|t| t.as_mut()) {
            ts.owner = None;
            self.idle.entry(ts.key).or_default().push(Idle {
                sock: si,
                last_peer: peer,
            });
            self.idle_count += 1;
        }
    }

    fn live_mut(&mut self, id: SessionId) -> Option<&mut LiveSock> {
        self.socks
            .get_mut(id.index as usize)?
            .as_mut()
            .filter(|l| l.id == id)
    }

    fn on_cqe(&mut self, now: Instant, cqe: &cqueue::Entry) {
        let (ud, res, flags) = (cqe.user_data(), cqe.result(), cqe.flags());
        match Token::decode(ud) {
            Some(Token::ListenerRecv(i)) => self.on_listener_recv(now, i, res, flags),
            Some(Token::SessionRecv { index, .. }) => {
                self.on_session_recv(now, ud, index, res, flags)
            }
            Some(Token::Send(i)) => self.on_send(now, i, res),
            Some(Token::Wake) => {
                if res >= 0 {
                    self.begin_shutdown(now);
                } else if self.phase == Phase::Running {
                    self.arm_wake();
                }
            }
            // ENOENT/EALREADY: the receive had ended by itself; its own final
            // CQE does the cleanup either way.
            Some(Token::Cancel) | None => {}
        }
    }

    fn on_listener_recv(&mut self, now: Instant, li: u32, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let Some(l) = self.listeners.get_mut(li as usize) else {
            drop(bid.and_then(|b| self.listen_bufs.take(b, 0)));
            return;
        };
        let bound = l.bound;
        if !cqueue::more(flags) {
            l.recv_armed = false;
            if self.phase == Phase::Running {
                self.rearm.push(Rearm::Listener(li));
                self.counters.rearms += 1;
            }
        }
        if res < 0 {
            drop(bid.and_then(|b| self.listen_bufs.take(b, 0)));
            match -res {
                libc::ENOBUFS => self.counters.ring_dry += 1,
                libc::ECANCELED => {}
                _ => self.counters.recv_errors += 1,
            }
            return;
        }
        // The guard lives in this block only: the buffer goes back to the
        // ring on every path, right after the endpoint has seen it.
        let (outcome, peer, local, ifindex, mtu) = {
            let Some(buf) = bid.and_then(|b| self.listen_bufs.take(b, res as usize)) else {
                return;
            };
            if self.phase != Phase::Running {
                return;
            }
            self.counters.datagrams_in += 1;
            let Ok(out) = types::RecvMsgOut::parse(&buf, &self.listen_msghdr) else {
                return;
            };
            let Some(peer) = net::parse_sockaddr(out.name_data()).map(net::canonical) else {
                return;
            };
            let oversized = out.is_payload_truncated();
            let (mut local, ifindex) = match net::parse_pktinfo(out.control_data()) {
                Some(info) => (info.local, info.ifindex),
                None => (net::canonical(bound).ip(), 0),
            };
            if local.is_ipv4() != peer.is_ipv4() {
                local = unspecified_like(peer.ip());
            }
            let mtu = lookup_mtu(&mut self.mtu_cache, &self.listeners, li, ifindex, now);
            self.counters.requests += 1;
            let outcome = if oversized {
                self.counters.truncated += 1;
                self.endpoint
                    .refuse_oversized(now, peer, &mut self.reply[..])
            } else {
                self.endpoint.handle_request(
                    now,
                    peer,
                    local,
                    mtu,
                    out.payload_data(),
                    &mut self.files,
                    &mut self.reply[..],
                )
            };
            (outcome, peer, local, ifindex, mtu)
        };
        match outcome {
            RequestOutcome::Started(id) => self.start_session(now, id, li, ifindex, mtu),
            RequestOutcome::Reply(n) => {
                self.counters.refused += 1;
                self.reply_from_listener(li, n, peer, local, ifindex);
            }
            RequestOutcome::Ignored => self.counters.ignored += 1,
        }
    }

    fn start_session(
        &mut self,
        now: Instant,
        id: SessionId,
        li: u32,
        ifindex: u32,
        mtu: Option<u32>,
    ) {
        let Some(view) = self.endpoint.session(id) else {
            return;
        };
        let (peer, local) = (view.peer, view.local);
        let mut segments = gso_segments(&view, mtu);
        let blksize = view.blksize;
        if segments > 1 && !self.no_gso.allows(now, local, peer.ip()) {
            segments = 1;
        }
        let slot_free = self
            .socks
            .get(id.index as usize)
            .is_some_and(|s| s.is_none());
        let sock = if !slot_free || local.is_ipv4() != peer.is_ipv4() {
            Err(io::Error::from(io::ErrorKind::InvalidInput))
        } else {
            self.acquire_sock(id, local, ifindex, peer)
        };
        match sock {
            Ok(si) => {
                if let Some(slot) = self.socks.get_mut(id.index as usize) {
                    *slot = Some(LiveSock {
                        id,
                        sock: si,
                        peer,
                        local,
                        v6: local.is_ipv6(),
                        blksize,
                        segments,
                        gso_proven: false,
                        inflight: 0,
                        touched: false,
                        queued: false,
                        faulted: false,
                    });
                    self.live += 1;
                }
                self.counters.started += 1;
                self.touch(id);
            }
            Err(_) => {
                // EMFILE and friends: refuse from the listener, within the
                // endpoint's refusal limit.
                self.counters.busy += 1;
                if let RequestOutcome::Reply(n) =
                    self.endpoint.refuse_busy(now, id, &mut self.reply[..])
                {
                    self.reply_from_listener(li, n, peer, local, ifindex);
                }
            }
        }
    }

    fn reply_from_listener(
        &mut self,
        li: u32,
        n: usize,
        peer: SocketAddr,
        local: IpAddr,
        ifindex: u32,
    ) {
        let Some(l) = self.listeners.get(li as usize) else {
            return;
        };
        let (fd, v6) = (l.sock.as_raw_fd(), l.v6);
        self.send_reply(fd, v6, n, peer, Some((local, ifindex)));
    }

    /// Sends `reply[..n]`, owned by no session.
    fn send_reply(
        &mut self,
        fd: RawFd,
        v6: bool,
        n: usize,
        dest: SocketAddr,
        source: Option<(IpAddr, u32)>,
    ) {
        let n = n.min(REPLY_CAP);
        if n == 0 {
            return;
        }
        let Some(si) = self.sends.alloc() else {
            self.counters.replies_dropped += 1;
            return;
        };
        let Some(slot) = self.sends.slot_mut(si) else {
            return;
        };
        slot.header[..n].copy_from_slice(&self.reply[..n]);
        match slot.prepare(Owner::Reply, n, None, dest, v6, source) {
            Some(msg) => {
                let sqe = opcode::SendMsg::new(types::Fd(fd), msg)
                    .build()
                    .user_data(Token::Send(si).encode());
                self.push(sqe);
                self.sends_queued += 1;
            }
            None => {
                self.sends.release(si);
            }
        }
    }

    fn on_session_recv(&mut self, now: Instant, token: u64, si: u32, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let ts = self
            .tsocks
            .get_mut(si as usize)
            .and_then(|s| s.as_mut())
            .filter(|t| t.recv == Some(token));
        let Some(ts) = ts else {
            drop(bid.and_then(|b| self.session_bufs.take(b, 0)));
            // A closed socket's receive: its final CQE lets the socket close.
            if !cqueue::more(flags)
                && let Some(fd) = self.closing.remove(&token)
            {
                self.to_close.push(fd);
            }
            return;
        };
        let owner = ts.owner;
        let (fd, v6) = (ts.fd.as_raw_fd(), ts.v6);
        if !cqueue::more(flags) {
            ts.recv = None;
            if res >= 0 || res == -libc::ENOBUFS {
                self.rearm.push(Rearm::Sock(si));
                self.counters.rearms += 1;
            }
        }
        if res < 0 {
            drop(bid.and_then(|b| self.session_bufs.take(b, 0)));
            match -res {
                libc::ENOBUFS => self.counters.ring_dry += 1,
                libc::ECANCELED => {}
                _ => {
                    // The socket cannot receive: end its transfer rather
                    // than spin re-arming, and never pool it again.
                    self.counters.recv_errors += 1;
                    if !cqueue::more(flags) {
                        ts.broken = true;
                        match owner {
                            Some(id) => {
                                self.endpoint.abort(now, id, Abort::ReceiveFailed);
                                self.touch(id);
                            }
                            None => self.drop_idle(si),
                        }
                    }
                }
            }
            return;
        }
        let (outcome, from, id) = {
            let Some(buf) = bid.and_then(|b| self.session_bufs.take(b, res as usize)) else {
                return;
            };
            self.counters.datagrams_in += 1;
            // An idle pooled socket: a late packet of a finished transfer.
            let Some(id) = owner else {
                return;
            };
            let Ok(out) = types::RecvMsgOut::parse(&buf, &self.session_msghdr) else {
                return;
            };
            // Longer than a session buffer (MSG_TRUNC): no ACK or ERROR is
            // that long, and a cut datagram must not be read as whole.
            if out.is_payload_truncated() {
                self.counters.truncated += 1;
                return;
            }
            let Some(from) = net::parse_sockaddr(out.name_data()).map(net::canonical) else {
                return;
            };
            (
                self.endpoint.handle_datagram(
                    now,
                    id,
                    from,
                    out.payload_data(),
                    &mut self.reply[..],
                ),
                from,
                id,
            )
        };
        match outcome {
            DatagramOutcome::Delivered => self.touch(id),
            DatagramOutcome::Reply(n) => self.send_reply(fd, v6, n, from, None),
            DatagramOutcome::Ignored => {}
        }
    }

    /// Closes an idle socket that can no longer receive.
    fn drop_idle(&mut self, si: u32) {
        let Some(key) = self
            .tsocks
            .get(si as usize)
            .and_then(|t| t.as_ref())
            .map(|t| t.key)
        else {
            return;
        };
        if let Some(list) = self.idle.get_mut(&key)
            && let Some(pos) = list.iter().position(|x| x.sock == si)
        {
            list.swap_remove(pos);
            self.idle_count -= 1;
        }
        self.close_sock(si);
    }

    fn on_send(&mut self, now: Instant, si: u32, res: i32) {
        let segmented = self.sends.slot_mut(si).is_some_and(|s| s.segments() > 1);
        if segmented && res < 0 && gso::refuses_gso(-res) && self.resend_unsegmented(now, si, -res)
        {
            return;
        }
        let Some(owner) = self.sends.release(si) else {
            return;
        };
        if res >= 0 {
            self.counters.sends += 1;
            if segmented {
                self.counters.gso_sends += 1;
                if let Owner::Session(id) = owner
                    && let Some(live) = self.live_mut(id)
                {
                    live.gso_proven = true;
                }
            }
        } else {
            // ECONNREFUSED (ICMP), EAGAIN...: the retransmit timer covers it.
            self.counters.send_errors += 1;
        }
        let Owner::Session(id) = owner else { return };
        if let Some(live) = self.live_mut(id) {
            live.inflight = live.inflight.saturating_sub(1);
            if res == -libc::EFAULT && !live.faulted {
                live.faulted = true;
                self.counters.send_faults += 1;
                self.endpoint.abort(now, id, Abort::FileChanged);
                self.touch(id);
            }
        } else if let Some(entry) = self.lingering.get_mut(&id) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                self.lingering.remove(&id);
            }
        }
    }

    /// A segmented send in slot `si` failed with `errno`, which its path
    /// gives GSO sends only: remember the path, stop segmenting for every
    /// live session on it, and send the same packets one per send now, so
    /// the window does not wait for a retransmit timeout. Returns false
    /// (slot untouched) when its session is gone: nothing to resend.
    fn resend_unsegmented(&mut self, now: Instant, si: u32, errno: i32) -> bool {
        let Some(Owner::Session(id)) = self.sends.slot_mut(si).map(|s| s.owner()) else {
            return false;
        };
        let Some(live) = self.live_mut(id) else {
            return false;
        };
        let (local, peer, sock, v6) = (live.local, live.peer, live.sock, live.v6);
        let Some(fd) = self.tsock_fd(sock) else {
            return false;
        };
        self.counters.gso_fallbacks += 1;
        if self.no_gso.refuse(now, local, peer.ip()) {
            self.log(format!(
                "shard {}: UDP GSO to {} from {local} failed ({}); one packet per send there for {} s",
                self.index,
                peer.ip(),
                io::Error::from_raw_os_error(errno),
                gso::NO_GSO_TTL.as_secs()
            ));
        }
        for l in self.socks.iter_mut().flatten() {
            if l.local == local && l.peer.ip() == peer.ip() {
                l.segments = 1;
            }
        }
        let mut work = self.serve_work.take().unwrap_or_default();
        let ServeWork { header, payloads } = &mut *work;
        let n = self
            .sends
            .slot_mut(si)
            .map_or(0, |s| s.unsegment(header, payloads));
        // Packet 0 reuses the failed send's slot (its header is in place);
        // packets without a free slot are left to the retransmit timer.
        let mut queued = 0u32;
        for k in 0..n {
            let slot_index = if k == 0 { Some(si) } else { self.sends.alloc() };
            let Some(sj) = slot_index else { break };
            let Some(slot) = self.sends.slot_mut(sj) else {
                break;
            };
            slot.header[..4].copy_from_slice(&header[4 * k..4 * k + 4]);
            let payload = Some(payloads[k]).filter(|p| p.1 > 0);
            match slot.prepare(Owner::Session(id), 4, payload, peer, v6, None) {
                Some(msg) => {
                    let sqe = opcode::SendMsg::new(types::Fd(fd), msg)
                        .build()
                        .user_data(Token::Send(sj).encode());
                    self.push(sqe);
                    self.sends_queued += 1;
                    queued += 1;
                }
                None => {
                    self.sends.release(sj);
                    break;
                }
            }
        }
        self.serve_work = Some(work);
        if queued == 0 {
            // Nothing went out in its place: complete it as a failed send.
            return false;
        }
        if let Some(live) = self.live_mut(id) {
            // The failed send's completion is replaced by `queued` sends.
            live.inflight += queued - 1;
        }
        true
    }

    /// Queues a log line; never blocks (see `log`).
    fn log(&mut self, line: String) {
        if !log::line(line) {
            self.counters.log_dropped += 1;
        }
    }

    fn touch(&mut self, id: SessionId) {
        if let Some(live) = self.live_mut(id)
            && !live.touched
        {
            live.touched = true;
            self.touched.push(id);
        }
    }

    fn enqueue_ready(&mut self, id: SessionId) {
        if let Some(live) = self.live_mut(id)
            && !live.queued
        {
            live.queued = true;
            self.ready.push_back(id);
        }
    }

    fn expire_timers(&mut self, now: Instant) {
        let mut expired = mem::take(&mut self.expired);
        expired.clear();
        self.wheel.expire(now, &mut expired);
        for &key in &expired {
            let Some(id) = self
                .socks
                .get(key as usize)
                .and_then(|s| s.as_ref())
                .map(|l| l.id)
            else {
                continue;
            };
            self.endpoint.handle_timeout(now, id);
            self.touch(id);
        }
        self.expired = expired;
    }

    fn serve_ready(&mut self, now: Instant) {
        // Bounded: a session served here may queue itself again.
        let mut rounds = self.ready.len();
        while rounds > 0 && self.sends.has_free() {
            rounds -= 1;
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(live) = self.live_mut(id) else {
                continue;
            };
            live.queued = false;
            self.serve(now, id);
        }
    }

    fn serve_touched(&mut self, now: Instant) {
        let mut list = mem::take(&mut self.touched);
        for &id in &list {
            if let Some(live) = self.live_mut(id) {
                live.touched = false;
                self.serve(now, id);
            }
        }
        list.clear();
        if self.touched.is_empty() {
            self.touched = list;
        }
    }

    /// The session's next transmit, its header in `buf`, its payload
    /// resolved to a pointer into the file (None for OACK and ERROR).
    fn poll_one(
        &mut self,
        now: Instant,
        id: SessionId,
        buf: &mut [u8],
    ) -> Option<(usize, Option<(*const u8, usize)>)> {
        if TEST_PANIC_SHARD.load(std::sync::atomic::Ordering::Relaxed) == self.index + 1 {
            panic!("RINGTFTPD_TEST_PANIC_SHARD={}", self.index);
        }
        loop {
            let t = self.endpoint.poll_transmit(now, id, buf)?;
            let Some(p) = t.payload else {
                return Some((t.header_len, None));
            };
            // Translates netascii as far as this block, and checks the file
            // against its open-time fstat before the final block (see
            // FileData::block).
            let block = self
                .endpoint
                .session(id)
                .map(|v| v.handle.block(p.offset, p.len))?;
            match block {
                Ok(b) => {
                    // A netascii length is learnt at its end; the session
                    // then stops after this (possibly short) block.
                    if let Some(end) = b.end {
                        self.endpoint.set_content_len(id, end);
                    }
                    return Some((t.header_len, Some((b.ptr, b.len))));
                }
                // The file changed before its final block, shrank, or a read
                // failed: send the ERROR instead.
                Err(e) => self.endpoint.abort(now, id, e.abort()),
            }
        }
    }

    /// Drains a session's transmits into sends, re-arms its timer, and
    /// removes it once finished. Consecutive DATA packets of a window go
    /// out as one UDP GSO send where the session allows it.
    fn serve(&mut self, now: Instant, id: SessionId) {
        let Some(live) = self.live_mut(id) else {
            return;
        };
        let (sock, peer, v6, gso_proven) = (live.sock, live.peer, live.v6, live.gso_proven);
        let (blksize, max_segments) = (usize::from(live.blksize), usize::from(live.segments));
        let Some(fd) = self.tsock_fd(sock) else {
            return;
        };
        // Reused across calls: zeroing 1.7 KiB per call was about 7 % of the
        // user-space instructions per block.
        let mut work = self.serve_work.take().unwrap_or_default();
        let ServeWork {
            header: scratch,
            payloads,
        } = &mut *work;
        // A transmit polled into `scratch` that did not fit the last send.
        let mut carried: Option<(usize, Option<(*const u8, usize)>)> = None;
        let mut sent = 0u32;
        let mut budget = SERVE_BUDGET;
        loop {
            if carried.is_none() && budget == 0 {
                self.enqueue_ready(id);
                break;
            }
            let Some(si) = self.sends.alloc() else {
                self.enqueue_ready(id);
                break;
            };
            let first = match carried.take() {
                Some(first) => first,
                None => {
                    budget -= 1;
                    match self.poll_one(now, id, scratch) {
                        Some(first) => first,
                        None => {
                            self.sends.release(si);
                            break;
                        }
                    }
                }
            };
            let (header_len, payload) = first;
            let Some(slot) = self.sends.slot_mut(si) else {
                break;
            };
            slot.header[..header_len].copy_from_slice(&scratch[..header_len]);
            // Batch only from a full DATA block: a shorter one is the last.
            let mut count = 0;
            if let Some(p) =
                payload.filter(|p| max_segments > 1 && header_len == 4 && p.1 == blksize)
            {
                payloads[0] = p;
                count = 1;
                // Keep a slot free for a transmit that does not fit.
                while count < max_segments && budget > 0 && self.sends.has_free() {
                    budget -= 1;
                    match self.poll_one(now, id, scratch) {
                        None => break,
                        Some((4, Some(p))) if p.1 <= blksize => {
                            if let Some(slot) = self.sends.slot_mut(si) {
                                slot.header[4 * count..4 * count + 4]
                                    .copy_from_slice(&scratch[..4]);
                            }
                            payloads[count] = p;
                            count += 1;
                            if p.1 < blksize {
                                break;
                            }
                        }
                        Some(other) => {
                            carried = Some(other);
                            break;
                        }
                    }
                }
            }
            let Some(slot) = self.sends.slot_mut(si) else {
                break;
            };
            let msg = if count > 1 {
                slot.prepare_segments(
                    Owner::Session(id),
                    &payloads[..count],
                    (blksize + 4) as u16,
                    peer,
                    v6,
                )
            } else {
                slot.prepare(Owner::Session(id), header_len, payload, peer, v6, None)
            };
            match msg {
                Some(msg) => {
                    let sqe = opcode::SendMsg::new(types::Fd(fd), msg)
                        .build()
                        .user_data(Token::Send(si).encode());
                    self.push(sqe);
                    self.sends_queued += 1;
                    self.gso_probe_queued |= count > 1 && !gso_proven;
                    sent += 1;
                }
                None => {
                    self.sends.release(si);
                    break;
                }
            }
        }
        self.serve_work = Some(work);
        if let Some(live) = self.live_mut(id) {
            live.inflight += sent;
        }
        match self.endpoint.poll_timeout(id) {
            Some(deadline) => self.wheel.arm(id.index, deadline),
            None => self.wheel.cancel(id.index),
        }
        if self.endpoint.is_finished(id) {
            self.finish(id);
        }
    }

    fn finish(&mut self, id: SessionId) {
        let finished = self.endpoint.remove(id);
        self.wheel.cancel(id.index);
        self.counters.finished += 1;
        let Some(live) = self
            .socks
            .get_mut(id.index as usize)
            .and_then(|s| s.take_if(|l| l.id == id))
        else {
            return;
        };
        self.live -= 1;
        self.release_sock(live.sock, live.peer);
        if let Some(f) = finished {
            if self.log_transfers {
                self.log(f.to_string());
            }
            if live.inflight > 0 {
                self.lingering.insert(id, (f.handle, live.inflight));
            }
        }
    }

    fn rearm_recvs(&mut self) {
        let mut list = mem::take(&mut self.rearm);
        for r in list.drain(..) {
            match r {
                Rearm::Listener(i) => {
                    let armed = self.listeners.get(i as usize).is_none_or(|l| l.recv_armed);
                    if self.phase == Phase::Running && !armed {
                        self.arm_listener(i);
                    }
                }
                Rearm::Sock(si) => {
                    let unarmed = self
                        .tsocks
                        .get(si as usize)
                        .and_then(|t| t.as_ref())
                        .is_some_and(|t| t.recv.is_none());
                    if unarmed {
                        self.arm_sock_recv(si);
                    }
                }
            }
        }
        self.rearm = list;
    }

    fn begin_shutdown(&mut self, now: Instant) {
        if self.phase != Phase::Running {
            return;
        }
        self.phase = Phase::Draining {
            deadline: now + self.shutdown_grace,
        };
        for i in 0..self.listeners.len() {
            if self.listeners[i].recv_armed {
                let token = Token::ListenerRecv(i as u32).encode();
                self.push(
                    opcode::AsyncCancel::new(token)
                        .build()
                        .user_data(Token::Cancel.encode()),
                );
            }
        }
        self.endpoint.shut_down();
    }

    fn advance_shutdown(&mut self, now: Instant) {
        let Phase::Draining { deadline } = self.phase else {
            return;
        };
        if self.live == 0 {
            self.phase = Phase::Final {
                deadline: now + self.final_drain,
            };
        } else if now >= deadline {
            let ids: Vec<SessionId> = self.socks.iter().flatten().map(|l| l.id).collect();
            for id in ids {
                self.endpoint.abort(now, id, Abort::ShuttingDown);
                self.touch(id);
            }
            self.phase = Phase::Final {
                deadline: now + self.final_drain,
            };
        }
    }

    fn should_exit(&self, now: Instant) -> bool {
        let Phase::Final { deadline } = self.phase else {
            return false;
        };
        let quiet = self.live == 0
            && self.sends.in_flight() == 0
            && self.closing.is_empty()
            && self.lingering.is_empty()
            && self.backlog.is_empty()
            && self.listeners.iter().all(|l| !l.recv_armed);
        quiet || now >= deadline
    }

    /// Cancels every operation still in the kernel and reaps completions
    /// until none is left (bounded by `reap_bound`); only then may buffer
    /// rings, send slots and mappings be freed (`free`). Past the bound they
    /// are marked for leaking instead.
    fn teardown(&mut self) {
        // Never reached the kernel: nothing to wait for.
        self.backlog.clear();
        self.exit.outstanding_at_teardown = self.outstanding;
        if self.outstanding > 0 {
            self.push(
                opcode::AsyncCancel2::new(types::CancelBuilder::any())
                    .build()
                    .user_data(Token::Cancel.encode()),
            );
        }
        let deadline = Instant::now() + self.reap_bound;
        let mut cqes = mem::take(&mut self.cqes);
        for _ in 0..REAP_TURNS {
            let now = Instant::now();
            if self.outstanding == 0 || now >= deadline {
                break;
            }
            self.flush_backlog();
            let ts = types::Timespec::from(deadline - now);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(_) => break,
            }
            cqes.extend(self.ring.completion());
            for cqe in cqes.drain(..) {
                self.account(&cqe);
            }
        }
        self.cqes = cqes;
        self.exit.outstanding_at_free = self.outstanding;
        if self.outstanding == 0 {
            let submitter = self.ring.submitter();
            let _ = self.listen_bufs.unregister(&submitter);
            let _ = self.session_bufs.unregister(&submitter);
        } else {
            self.exit.leaked = true;
            self.log(format!(
                "shard {}: {} ring operations still outstanding {:?} after cancelling them; \
                 leaking send slots, file mappings and buffer rings",
                self.index, self.outstanding, self.reap_bound
            ));
        }
        self.exit.counters = self.counters;
        if self.log_transfers {
            let c = self.counters;
            self.log(format!(
                "shard {}: turns={} requests={} refused={} ignored={} started={} busy={} finished={} datagrams_in={} \
                 sends={} send_errors={} send_faults={} replies_dropped={} recv_errors={} rearms={} ring_dry={} \
                 log_dropped={} pool_flushes={} truncated={} gso_sends={} gso_fallbacks={} \
                 cancelled_at_exit={} outstanding_at_free={} {}",
                self.index,
                c.turns,
                c.requests,
                c.refused,
                c.ignored,
                c.started,
                c.busy,
                c.finished,
                c.datagrams_in,
                c.sends,
                c.send_errors,
                c.send_faults,
                c.replies_dropped,
                c.recv_errors,
                c.rearms,
                c.ring_dry,
                c.log_dropped,
                c.pool_flushes,
                c.truncated,
                c.gso_sends,
                c.gso_fallbacks,
                self.exit.outstanding_at_teardown,
                self.exit.outstanding_at_free,
                self.endpoint.refusals()
            ));
        }
        if self.log_transfers || self.exit.leaked {
            // The last lines out before the process may end; bounded, as
            // stderr may be stuck.
            log::flush(LOG_FLUSH);
        }
    }

    /// Drops the shard after `teardown`, or `abandon`s it if the kernel may
    /// still use its memory.
    fn free(self) -> ExitReport {
        let report = self.exit;
        if report.leaked {
            self.abandon();
        }
        report
    }

    /// Frees nothing the kernel may still read or write: buffer rings, send
    /// slots (msghdrs, iovecs, headers), the mappings their iovecs point
    /// into (live and lingering sessions'), the receive msghdrs and the wake
    /// buffer are leaked; the ring and the sockets are closed (the kernel
    /// holds its own references to files it is using).
    fn abandon(self) {
        let Shard {
            ring,
            listen_bufs,
            session_bufs,
            listen_msghdr,
            session_msghdr,
            wake_buf,
            endpoint,
            sends,
            lingering,
            ..
        } = self;
        mem::forget((
            listen_bufs,
            session_bufs,
            listen_msghdr,
            session_msghdr,
            wake_buf,
            endpoint,
            sends,
            lingering,
        ));
        drop(ring);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip() {
        for t in [
            Token::ListenerRecv(0),
            Token::ListenerRecv(u32::MAX),
            Token::SessionRecv { index: 7, epoch: 0 },
            Token::SessionRecv {
                index: u32::MAX,
                epoch: EPOCH_MASK,
            },
            Token::Send(12345),
            Token::Cancel,
            Token::Wake,
        ] {
            assert_eq!(Token::decode(t.encode()), Some(t));
        }
        assert_eq!(Token::decode(0), None);
        assert_eq!(Token::decode(u64::MAX), None);
        // Epochs are 24 bits: a wrapped epoch is the masked value.
        let t = Token::SessionRecv {
            index: 1,
            epoch: EPOCH_MASK + 5,
        }
        .encode();
        assert_eq!(
            Token::decode(t),
            Some(Token::SessionRecv { index: 1, epoch: 4 })
        );
    }
}
