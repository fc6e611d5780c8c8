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
//!    the wake-up eventfd (then the [`Command`]s sent); every receive buffer
//!    goes back to its ring as soon as its datagram was handled;
//! 3. expire timers (`handle_timeout`);
//! 4. for every session touched this turn, and those waiting for a send
//!    slot: drain `poll_transmit` into `SendMsg` SQEs, re-arm its timer with
//!    `poll_timeout`, and let it go once `poll_event` reports its end;
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
//! a fresh socket gets a port of the kernel's choosing. Payload pointers are
//! never read in user space: a file truncated under us makes the kernel's
//! copy fail with `EFAULT` (and the session is aborted) instead of raising
//! SIGBUS here.
//!
//! With `--single-port` there are no transfer sockets: a session sends from
//! the listener its request came to (naming the request's destination as
//! its source, as the listener's own replies do), and the listener's
//! receive hands a datagram to the session of its source address and port
//! (`Endpoint::route`) before anything is parsed as a request; the
//! listeners then keep receiving through the drain.
//!
//! The rooms: `setup` (start-up, ring set-up), `command` (commands to a
//! shard), `sqe` (every submission entry and its `unsafe`), `token` (CQE
//! `user_data`), `recv` (receive path), `serve` (transmits into sends),
//! `batch` (which blocks share a GSO send, pure), `send` (send slots),
//! `sockets` (transfer sockets), `pool` (idle-socket choice, pure), `cmsg`
//! (control messages), `net` (socket set-up), `gso` (paths without GSO),
//! `bufring` (provided buffers), `shutdown` (drain and teardown), `log`,
//! `uploads` (write requests' files, written off the shard thread).

mod batch;
mod bufring;
mod cmsg;
mod command;
#[cfg(test)]
mod e2e;
mod gso;
pub mod net;
mod pool;
mod recv;
mod send;
mod serve;
mod setup;
mod shutdown;
mod sockets;
mod sqe;
mod token;
mod uploads;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use io_uring::{cqueue, types};
use nix::sys::eventfd::EventFd;

use crate::endpoint::{Endpoint, SessionId};
use crate::log;
use crate::timer::TimerWheel;
use bufring::BufRing;
use command::Commands;
pub use command::{Activity, Command, ShardHandle};
use gso::NoGsoPaths;
use pool::{IdlePool, PortRange};
use recv::Rearm;
use send::{HEADER_CAP, SendPool};
use serve::ServeWork;
#[cfg(test)]
pub(crate) use setup::Tuning;
#[cfg(test)]
pub(crate) use setup::spawn_tuned;
pub use setup::{PreparedShard, ShardConfig, prepare};
pub(crate) use shutdown::ExitReport;
use sockets::TransferSock;
use sqe::Ring;
use token::Token;
use uploads::{Held, ShardFiles};

const LISTEN_BGID: u16 = 0;
const SESSION_BGID: u16 = 1;
const TICK: Duration = Duration::from_millis(1);
const MAX_WAIT: Duration = Duration::from_secs(1);
/// After the grace period (or once idle): how long to wait for the last
/// sends, cancels and closes before returning anyway.
const FINAL_DRAIN: Duration = Duration::from_secs(2);
/// At teardown: how long cancelled operations may take to complete.
const REAP_BOUND: Duration = Duration::from_secs(1);
/// From this many live sessions on, each wait lingers up to `BATCH_WAIT`
/// for `BATCH_COMPLETIONS` completions (kernel min-wait, 6.12+).
const BATCH_SESSIONS: usize = 64;
const BATCH_WAIT: Duration = Duration::from_micros(50);
const BATCH_COMPLETIONS: usize = 32;
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
    /// Uploads' DATA dropped while their writers were backlogged.
    upload_backlog_drops: u64,
    /// What `--metrics` shows (see `crate::metrics`).
    metrics: crate::metrics::Tally,
}

struct Listener {
    sock: UdpSocket,
    v6: bool,
    bound: SocketAddr,
    recv_armed: bool,
}

/// Where a session's datagrams come and go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Its own transfer socket, at this index of `Shard::tsocks`.
    Transfer(u32),
    /// `--single-port`: the listener it was requested on, at this index of
    /// `Shard::listeners`; sends name their source address (pktinfo).
    Listener { index: u32, ifindex: u32 },
}

/// A live session's driver state, at `SessionId::index`.
struct LiveSock {
    id: SessionId,
    sock: Via,
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
    /// When its request was taken, and whether DATA 1 went out since
    /// (the time to first DATA of `--metrics`).
    started: Instant,
    sent_first_data: bool,
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
    /// Written after each command, only to wake the ring.
    wake: Arc<EventFd>,
    wake_buf: Box<[u8; 8]>,
    commands: Commands,
    /// `RINGTFTPD_TEST_PANIC_SHARD` names this shard (see `setup`).
    panic_on_send: bool,
    listeners: Vec<Listener>,
    endpoint: Endpoint<Held>,
    files: ShardFiles,
    wheel: TimerWheel,
    socks: Vec<Option<LiveSock>>,
    /// Transfer sockets, live and idle; receive tokens carry their index.
    tsocks: Vec<Option<TransferSock>>,
    tsocks_free: Vec<u32>,
    /// Idle sockets by bound address, reused by new transfers: a socket,
    /// its options, its bind, its close and its receive re-arm saved.
    idle: IdlePool,
    /// `--port-range`: where fresh transfer sockets bind (None: anywhere).
    ports: Option<PortRange>,
    /// `--single-port`: sessions run on their listener, no transfer sockets.
    single_port: bool,
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
    lingering: HashMap<SessionId, (Held, u32)>,
    ready: VecDeque<SessionId>,
    touched: Vec<SessionId>,
    rearm: Vec<Rearm>,
    /// Interface MTUs by ifindex, with when they were read.
    mtu_cache: HashMap<u32, (Option<u32>, Instant)>,
    /// Clients' MACs, asked only while the policy matches on them.
    neigh: crate::neigh::Neighbours,
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
    activity: Arc<Activity>,
    phase: Phase,
    index: usize,
    log_transfers: bool,
    hook: Option<crate::hook::HookSender>,
    file_labels: Option<Arc<crate::metrics::FileLabels>>,
    shutdown_grace: Duration,
}

fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
    )
}

impl Shard {
    fn run(&mut self) -> io::Result<()> {
        let served = self.serve_loop();
        self.activity.metrics.set_serving(false);
        self.teardown();
        served
    }

    fn serve_loop(&mut self) -> io::Result<()> {
        self.activity
            .metrics
            .set_serving(self.phase == Phase::Running);
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
            self.on_uploads_done(now);
            self.expire_timers(now);
            // Expires opens on a quiet shard too (one comparison a turn).
            self.endpoint.housekeeping(now);
            while let Some(note) = self.endpoint.poll_refused() {
                if self.log_transfers {
                    log::events::refusal(&note);
                }
            }
            // Lines this turn could not queue, for the counters and metrics.
            self.counters.log_dropped += log::take_local_drops();
            self.advance_shutdown(now);
            self.serve_ready(now);
            self.serve_touched(now);
            self.rearm_recvs();
            self.activity
                .requests
                .store(self.counters.requests, Ordering::Relaxed);
            self.activity.live.store(self.live, Ordering::Relaxed);
            self.activity
                .turns
                .store(self.counters.turns, Ordering::Relaxed);
            self.publish_metrics(now);
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
            Some(Token::Wake) => self.on_wake(now, res),
            // ENOENT/EALREADY: the receive had ended by itself; its own final
            // CQE does the cleanup either way.
            Some(Token::Cancel) | None => {}
        }
    }

    /// Copies the counters out for `--metrics` (relaxed stores, once a
    /// turn): the per-packet ones always, the rest when they moved or
    /// every `metrics::COLD_EVERY`.
    fn publish_metrics(&mut self, now: Instant) {
        let c = &mut self.counters;
        c.metrics.set_driver(
            c.datagrams_in,
            c.send_errors,
            c.gso_fallbacks,
            c.log_dropped,
            self.idle.len(),
        );
        let cold = c.metrics.cold_due(now);
        if cold || c.metrics.cold_moved() {
            c.metrics
                .set_endpoint(self.endpoint.refusals(), self.endpoint.open_cache_usage());
        }
        self.activity.metrics.publish(&mut c.metrics, cold);
        // `ringtftpd top`: only in a cold turn, and only while watched.
        let board = &self.activity.metrics.transfers;
        if cold && board.due(now) {
            board.publish(self.index, self.endpoint.live_transfers(), now);
        }
        self.activity
            .metrics
            .set_serving(self.phase == Phase::Running);
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
            let Some((id, peer)) = self
                .socks
                .get(key as usize)
                .and_then(|s| s.as_ref())
                .map(|l| (l.id, l.peer))
            else {
                continue;
            };
            self.endpoint.handle_timeout(now, id);
            self.counters.metrics.timeout();
            // Fields are evaluated only when debug is on (-v).
            tracing::debug!(
                target: "ringtftpd::timeout",
                shard = self.index,
                client = %peer,
                next_timeout_ms = self
                    .endpoint
                    .poll_timeout(id)
                    .map(|t| t.saturating_duration_since(now).as_secs_f64() * 1e3),
                "timed out waiting for the client"
            );
            self.touch(id);
        }
        self.expired = expired;
    }
}
