//! Start-up: a shard's io_uring made (disabled) by the starting thread,
//! then the shard thread that enables it, pins itself, registers its buffer
//! rings, arms its listeners and runs until told to stop; a shard that
//! dies is reported to `server::run`.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::mem;
use std::net::UdpSocket;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::IoUring;
use nix::sys::eventfd::{EfdFlags, EventFd};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::bufring::BufRing;
use super::command::{Activity, Commands, ShardHandle};
use super::gso::{self, NoGsoPaths};
use super::pool::{self, IdlePool, PortRange};
use super::send::SendPool;
use super::sqe::Ring;
use super::uploads::{ShardFiles, UploadDesk};
use super::{
    Counters, ExitReport, FINAL_DRAIN, LISTEN_BGID, Listener, Phase, REAP_BOUND, REPLY_CAP,
    SESSION_BGID, Shard, TICK, cmsg, net,
};
use crate::endpoint::{Endpoint, EndpointConfig};
use crate::files::FileRoot;
use crate::files::upload::UploadRules;
use crate::timer::TimerWheel;

/// `struct io_uring_recvmsg_out` (four u32) at the head of each buffer a
/// multishot receive fills.
const RECVMSG_OUT_HEADER: usize = 16;

/// What one shard needs; the server builds one per core.
pub struct ShardConfig {
    pub index: usize,
    /// Core to pin the thread to (`None`: not pinned).
    pub cpu: Option<usize>,
    /// Listening sockets from [`net::bind_listener`], one per `--address`.
    pub listeners: Vec<UdpSocket>,
    pub endpoint: EndpointConfig,
    pub files: FileRoot,
    /// The second and later directories (tftpd-hpa's several), each its
    /// own root: a grant names the one it opens under.
    pub more_files: Vec<FileRoot>,
    /// What write requests may do; `None`: they are refused.
    pub uploads: Option<UploadRules>,
    /// Print each finished transfer's log line to stderr.
    pub log_transfers: bool,
    /// `--on-transfer`: where finished transfers' records go.
    pub hook: Option<crate::hook::HookSender>,
    /// How long live transfers may run on after shutdown was asked for.
    pub shutdown_grace: Duration,
    /// `--port-range`: transfer ports confined to LOW..=HIGH, shared with
    /// `shards` shards in all.
    pub port_range: Option<(u16, u16)>,
    pub shards: usize,
    /// `--metrics-file-labels`: finished transfers counted by file.
    pub file_labels: Option<Arc<crate::metrics::FileLabels>>,
}

/// Sizes of the ring, buffer rings and send pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    pub sq_entries: u32,
    pub cq_entries: u32,
    /// Listener buffers (requests): count (power of two) and size.
    pub listen_bufs: (u16, usize),
    /// Transfer-socket buffers (ACK, ERROR, an upload's DATA: they bound
    /// the blksize granted to uploads; longer datagrams are truncated).
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
            session_bufs: (4096, 2048),
            send_slots: 2048,
            min_idle_choice: pool::MIN_IDLE_CHOICE,
            final_drain: FINAL_DRAIN,
            reap_bound: REAP_BOUND,
        }
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
        let (commands, thread_commands) = crossbeam::channel::unbounded();
        let index = config.index;
        let name = format!("shard-{index}");
        let panic_hook = test_panic_hook(index);
        let activity = Arc::new(Activity::default());
        let published = activity.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            let mut shard = match Shard::new(config, tuning, ring, thread_wake, thread_commands) {
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
            // Armed only now, so that set-up itself never trips it.
            shard.panic_on_send = panic_hook;
            shard.activity = published;
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
            Ok(Ok(())) => Ok(ShardHandle::new(commands, wake, activity, thread)),
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
/// Read once at start into `Shard::panic_on_send`, a plain bool.
fn test_panic_hook(index: usize) -> bool {
    std::env::var("RINGTFTPD_TEST_PANIC_SHARD").is_ok_and(|v| v.trim().parse() == Ok(index))
}

/// Logs that shard `index` ended without being asked to, and tells
/// `server::run`: a SIGUSR1 queued to the process with the shard's index,
/// sent only where SIGUSR1 is blocked (run blocks it and waits for it), so
/// that a process not expecting it is not killed by it.
fn report_death(index: usize, why: &str) {
    tracing::error!("shard {index} died: {why}");
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

impl Shard {
    pub(super) fn new(
        config: ShardConfig,
        tuning: Tuning,
        ring: IoUring,
        wake: Arc<EventFd>,
        commands: Commands,
    ) -> io::Result<Self> {
        // This thread becomes the ring's only submitter.
        ring.submitter().register_enable_rings()?;
        if let Some(cpu) = config.cpu
            && let Err(e) = pin_to(cpu)
        {
            tracing::warn!(
                shard = config.index,
                cpu,
                error = %e,
                "cannot pin to the cpu; running unpinned"
            );
        }
        let single_port = config.endpoint.single_port;
        // Single port: every session's ACKs (and uploads' DATA) come to the
        // listeners, so their ring gets the sessions' share too.
        let listen_count = if single_port {
            tuning.listen_bufs.0.max(tuning.session_bufs.0)
        } else {
            tuning.listen_bufs.0
        };
        let listen_bufs = BufRing::new(listen_count, tuning.listen_bufs.1, LISTEN_BGID)?;
        // ... and no transfer socket uses the sessions' ring: a token one.
        let session_count = if single_port {
            1
        } else {
            tuning.session_bufs.0
        };
        let session_bufs = BufRing::new(session_count, tuning.session_bufs.1, SESSION_BGID)?;
        listen_bufs.register(&ring.submitter())?;
        session_bufs.register(&ring.submitter())?;
        let mut listeners = Vec::with_capacity(config.listeners.len());
        for sock in config.listeners {
            let v6 = net::is_v6_socket(sock.as_fd())?;
            let bound = net::local_addr(sock.as_fd())?;
            if single_port {
                // DATA leaves from here now: no DF bit, as on transfer sockets.
                net::no_pmtu_discovery(sock.as_fd(), v6)?;
            }
            listeners.push(Listener {
                sock,
                v6,
                bound,
                recv_armed: false,
            });
        }
        let mut endpoint_config = config.endpoint;
        // A DATA packet must fit a session buffer whole, after the kernel's
        // io_uring_recvmsg_out header and the peer's address.
        let mut room =
            tuning.session_bufs.1 - RECVMSG_OUT_HEADER - mem::size_of::<libc::sockaddr_in6>() - 4;
        if single_port {
            // ... a listener's buffer, after its control messages too.
            room = room.min(
                tuning.listen_bufs.1
                    - RECVMSG_OUT_HEADER
                    - mem::size_of::<libc::sockaddr_in6>()
                    - cmsg::RECV_CONTROL_LEN
                    - 4,
            );
        }
        endpoint_config.max_upload_blksize = endpoint_config
            .max_upload_blksize
            .min(u16::try_from(room).unwrap_or(u16::MAX));
        let endpoint = Endpoint::new(endpoint_config);
        let uploads = match config.uploads {
            Some(rules) => Some(UploadDesk::new(rules, wake.clone())?),
            None => None,
        };
        let capacity = endpoint.capacity();
        let ports = config
            .port_range
            .map(|(low, high)| PortRange::new(low, high, StdRng::from_os_rng()));
        let idle_cap = ports.as_ref().map_or(pool::MAX_IDLE, |r| {
            r.idle_cap(config.shards, tuning.min_idle_choice)
        });
        let now = Instant::now();
        let mut shard = Shard {
            ring: Ring::new(ring),
            listen_bufs,
            session_bufs,
            listen_msghdr: recv_msghdr(cmsg::RECV_CONTROL_LEN),
            session_msghdr: recv_msghdr(0),
            wake,
            wake_buf: Box::new([0; 8]),
            commands,
            panic_on_send: false,
            listeners,
            endpoint,
            files: ShardFiles {
                root: config.files,
                more_roots: config.more_files,
                uploads,
            },
            wheel: TimerWheel::new(capacity, TICK, now),
            socks: (0..capacity).map(|_| None).collect(),
            tsocks: Vec::new(),
            tsocks_free: Vec::new(),
            idle: IdlePool::new(idle_cap, tuning.min_idle_choice, StdRng::from_os_rng()),
            ports,
            single_port,
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
            neigh: crate::neigh::Neighbours::new(),
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
            activity: Arc::default(),
            phase: Phase::Running,
            index: config.index,
            log_transfers: config.log_transfers,
            hook: config.hook,
            file_labels: config.file_labels,
            shutdown_grace: config.shutdown_grace,
        };
        shard.arm_wake();
        for i in 0..shard.listeners.len() {
            shard.arm_listener(i as u32);
        }
        shard.ring.submit()?;
        Ok(shard)
    }
}
