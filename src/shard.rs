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
//! from a pool of at least `pool::MIN_IDLE_CHOICE` candidates; below that
//! a fresh socket gets a port of the kernel's choosing. Payload pointers are never read in user space:
//! a file truncated under us makes the kernel's copy fail with `EFAULT`
//! (and the session is aborted) instead of raising SIGBUS here.

mod batch;
mod bufring;
mod cmsg;
#[cfg(test)]
mod e2e;
mod gso;
mod log;
pub mod net;
mod pool;
mod recv;
mod send;
mod serve;
mod sockets;
mod sqe;
mod token;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use io_uring::{IoUring, cqueue, types};
use nix::sys::eventfd::{EfdFlags, EventFd};

use crate::endpoint::{Endpoint, EndpointConfig, SessionId};
use crate::files::{FileData, FileRoot};
use crate::proto::ErrorCode;
use crate::timer::TimerWheel;
use bufring::BufRing;
use gso::NoGsoPaths;
use pool::IdlePool;
use rand::SeedableRng;
use rand::rngs::StdRng;
use recv::Rearm;
use send::{HEADER_CAP, SendPool};
use serve::ServeWork;
use sockets::TransferSock;
use sqe::Ring;
use token::Token;

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
            min_idle_choice: pool::MIN_IDLE_CHOICE,
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
/// From this many live sessions on, each wait lingers up to `BATCH_WAIT`
/// for `BATCH_COMPLETIONS` completions (kernel min-wait, 6.12+).
const BATCH_SESSIONS: usize = 64;
const BATCH_WAIT: Duration = Duration::from_micros(50);
const BATCH_COMPLETIONS: usize = 32;
/// Longest a shard waits at exit for its log lines to be written.
const LOG_FLUSH: Duration = Duration::from_millis(500);
/// Size of the reply buffer given to the endpoint; fits in a send slot.
const REPLY_CAP: usize = HEADER_CAP;

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

struct Shard {
    ring: Ring,
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
    idle: IdlePool,
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
            ring: Ring::new(ring),
            listen_bufs,
            session_bufs,
            listen_msghdr: recv_msghdr(cmsg::RECV_CONTROL_LEN),
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
            idle: IdlePool::new(
                pool::MAX_IDLE,
                tuning.min_idle_choice,
                StdRng::from_os_rng(),
            ),
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
            mtu_cache: HashMap::new(),
            reply: Box::new([0; REPLY_CAP]),
            cqes: Vec::with_capacity(tuning.cq_entries as usize),
            expired: Vec::new(),
            sends_queued: 0,
            gso_probe_queued: false,
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
            self.ring.flush_backlog();
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
            match self.ring.submit_and_wait(want, &args) {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(e) => return Err(e),
            }
            if self.ring.all_consumed() {
                // Every SQE naming these sockets was consumed by that enter.
                self.to_close.clear();
            }
            let now = Instant::now();
            self.counters.turns += 1;
            let mut cqes = mem::take(&mut self.cqes);
            self.ring.reap(&mut cqes);
            for cqe in cqes.drain(..) {
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

    fn arm_wake(&mut self) {
        let fd = self.wake.as_fd().as_raw_fd();
        self.ring.push(sqe::read_wake(fd, &mut self.wake_buf));
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
                self.ring.push(sqe::cancel(token));
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
                self.endpoint
                    .abort(now, id, ErrorCode::NotDefined, "server shutting down");
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
            && self.ring.backlog_is_empty()
            && self.listeners.iter().all(|l| !l.recv_armed);
        quiet || now >= deadline
    }

    /// Cancels every operation still in the kernel and reaps completions
    /// until none is left (bounded by `reap_bound`); only then may buffer
    /// rings, send slots and mappings be freed (`free`). Past the bound they
    /// are marked for leaking instead.
    fn teardown(&mut self) {
        // Never reached the kernel: nothing to wait for.
        self.ring.clear_backlog();
        self.exit.outstanding_at_teardown = self.ring.outstanding();
        if self.ring.outstanding() > 0 {
            self.ring.push(sqe::cancel_all());
        }
        let deadline = Instant::now() + self.reap_bound;
        let mut cqes = mem::take(&mut self.cqes);
        for _ in 0..REAP_TURNS {
            let now = Instant::now();
            if self.ring.outstanding() == 0 || now >= deadline {
                break;
            }
            self.ring.flush_backlog();
            let ts = types::Timespec::from(deadline - now);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submit_and_wait(1, &args) {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(_) => break,
            }
            self.ring.reap(&mut cqes);
            cqes.clear();
        }
        self.cqes = cqes;
        self.exit.outstanding_at_free = self.ring.outstanding();
        if self.ring.outstanding() == 0 {
            let submitter = self.ring.submitter();
            let _ = self.listen_bufs.unregister(&submitter);
            let _ = self.session_bufs.unregister(&submitter);
        } else {
            self.exit.leaked = true;
            self.log(format!(
                "shard {}: {} ring operations still outstanding {:?} after cancelling them; \
                 leaking send slots, file mappings and buffer rings",
                self.index,
                self.ring.outstanding(),
                self.reap_bound
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
