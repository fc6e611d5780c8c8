//! The per-shard demultiplexer above sessions, sans-IO (like quinn-proto's
//! `Endpoint`). It admits or refuses requests, routes datagrams to sessions
//! by [`SessionId`], and answers strangers. Sessions live in a slab and are
//! addressed by index plus generation, never by pointer.
#![forbid(unsafe_code)]

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::files::{OpenError, Sink, Source};
use crate::policy::{Decision, Grant, Incoming, Settings};
use crate::proto::{self, ErrorCode, Packet, Request};
use crate::refusal::{Abort, Malformed, Refusal, RefusalKind};
use crate::session::{self, Outcome, PathMetrics, Received, Stats, Transfer, Transmit};

/// What sizes one shard's endpoint for its life, and the settings it
/// starts with.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Most concurrent sessions on this shard; slab indices are below it.
    pub max_sessions: usize,
    /// Largest blksize granted to a write request: what the driver's
    /// receive buffers hold.
    pub max_upload_blksize: u16,
    /// `--single-port`: every session runs on the listening port, and
    /// datagrams at the listener are told apart by peer (see [`Route`]).
    pub single_port: bool,
    pub settings: Settings,
}

impl Default for EndpointConfig {
    /// The command line's defaults for a one-shard server.
    fn default() -> Self {
        EndpointConfig {
            max_sessions: 20_000,
            max_upload_blksize: proto::MAX_BLKSIZE,
            single_port: false,
            settings: Settings::default(),
        }
    }
}

/// Refusals by reason, and ERROR replies the rate limits held back.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefusalCounts {
    pub by_reason: [u64; RefusalKind::ALL.len()],
    /// ERROR replies not sent because a token bucket was empty.
    pub replies_suppressed: u64,
    /// Requests refused for lack of capacity (session limit, no transfer
    /// socket) and met with silence, so that the client's retransmission
    /// asks again; `by_reason[Busy]` counts those answered ERROR 0 busy.
    pub busy_deferred: u64,
}

impl RefusalCounts {
    pub fn get(&self, kind: RefusalKind) -> u64 {
        self.by_reason[kind as usize]
    }
}

impl std::fmt::Display for RefusalCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for kind in RefusalKind::ALL {
            write!(f, "refused_{}={} ", kind.as_str(), self.get(kind))?;
        }
        write!(
            f,
            "replies_suppressed={} busy_deferred={}",
            self.replies_suppressed, self.busy_deferred
        )
    }
}

/// Most client addresses the per-client request buckets track before idle
/// ones are forgotten (a forgotten bucket is a full one: no harm done).
const CLIENT_BUCKETS_CAPACITY: usize = 65_536;

/// Most bytes of content the open cache may keep alive (netascii copies
/// are heap memory; mappings of deleted files pin disk space).
const OPEN_CACHE_MAX_BYTES: u64 = 1 << 30;

/// Most names the open cache holds before it starts afresh.
const OPEN_CACHE_CAPACITY: usize = 4096;

/// Client addresses whose path estimate the endpoint keeps (per shard).
const PATH_CACHE_CAPACITY: usize = 4096;

/// How long a client address's path estimate is used for new transfers
/// (a PXE client fetches its next file within seconds).
const PATH_CACHE_TTL: Duration = Duration::from_secs(600);

/// The newest path estimate of one client address, and when it was learned.
#[derive(Debug, Clone, Copy)]
struct CachedPath {
    metrics: PathMetrics,
    learned_at: Instant,
}

/// An earlier open of a name, reused while fresh.
#[derive(Debug)]
struct CachedOpen<H> {
    result: Result<(H, u64), OpenError>,
    /// What it is charged against the byte bound.
    bytes: u64,
    opened_at: Instant,
}

/// A session's address in the slab: index plus generation, so a stale id
/// never reaches a newer session that reuses the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId {
    pub index: u32,
    pub generation: u32,
}

/// What to do with a datagram that arrived at a listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// A new transfer: open its socket, then drain `poll_transmit`.
    Started(SessionId),
    /// Send the first `n` bytes of the reply buffer to the requester, from
    /// the listening socket and the address the request was sent to.
    Reply(usize),
    /// Drop it (e.g. a duplicate request, or a rate-limited error).
    Ignored,
}

/// `--single-port`: where a datagram at the listener belongs, by its
/// source address and port (the client's TID; the server's is the
/// listening port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// To the peer's live session: [`Endpoint::handle_datagram`].
    Session(SessionId),
    /// A request, or a stranger's datagram: [`Endpoint::handle_request`].
    /// `live` is the peer's running session, which a new request ends:
    /// serve it afterwards (`poll_event`) as after any other call.
    Request { live: Option<SessionId> },
}

/// What to do with a datagram that arrived at a transfer socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatagramOutcome<'a> {
    /// Given to the session: drain `poll_transmit`, re-arm its timer.
    Delivered,
    /// Given to an upload's session, which accepted these bytes: store
    /// them, then as for `Delivered`. After the `last` ones, store the
    /// file and call [`Endpoint::commit_done`] (or `abort`).
    Received(Received<'a>),
    /// Send the first `n` bytes of the reply buffer back to the sender
    /// (ERROR 5 to a stranger), from the transfer socket.
    Reply(usize),
    Ignored,
}

/// A session's addressing and file, for the driver.
#[derive(Debug)]
pub struct SessionView<'a, H> {
    pub peer: SocketAddr,
    pub local: IpAddr,
    pub handle: &'a H,
    pub blksize: u16,
    pub windowsize: u16,
}

/// A live session as `ringtftpd top` shows it: read-only, borrowed from
/// the endpoint (see [`Endpoint::live_transfers`]).
#[derive(Debug, Clone, Copy)]
pub struct LiveTransfer<'a> {
    pub id: SessionId,
    pub peer: SocketAddr,
    /// The name as asked, raw bytes (escape before showing).
    pub filename: &'a [u8],
    /// An upload (WRQ).
    pub write: bool,
    /// Payload bytes acknowledged so far (downloads) or accepted (uploads).
    pub bytes: u64,
    /// The whole content, if known: a download's length, an upload's tsize.
    pub total: Option<u64>,
    pub retransmits: u64,
    pub blksize: u16,
    pub windowsize: u16,
    pub started: Instant,
}

/// A removed session: everything the transfer log line needs.
#[derive(Debug)]
pub struct Finished<H> {
    pub peer: SocketAddr,
    pub filename: String,
    /// The path opened instead (escaped), where a remap or per-client rule
    /// rewrote the name.
    pub served: Option<String>,
    /// An upload (WRQ).
    pub write: bool,
    pub mode: proto::Mode,
    /// The options as the client asked them.
    pub asked: proto::Options,
    pub handle: H,
    pub outcome: Outcome,
    pub stats: Stats,
}

/// A refused request, for its log line: the main signal when a PXE client
/// does not boot ("pxelinux.cfg/01-aa-bb-... not found").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub peer: SocketAddr,
    /// The name as asked, escaped.
    pub filename: String,
    pub write: bool,
    pub kind: RefusalKind,
    pub code: ErrorCode,
    pub message: String,
}

/// What [`Endpoint::poll_refused`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefusalNote {
    Refused(Refused),
    /// Lines left out over [`REFUSAL_LOG_PER_SEC`] (a flood), in the last
    /// second or so: their refusals are counted all the same.
    Suppressed {
        lines: u64,
    },
}

/// Refused requests logged per second and shard, after a burst of
/// [`REFUSAL_LOG_BURST`]; the rest are summed into one line a second.
pub const REFUSAL_LOG_PER_SEC: u32 = 100;
pub const REFUSAL_LOG_BURST: u32 = 200;
/// Notes queued for the driver at most (it drains them every turn).
const REFUSAL_NOTES: usize = 256;

impl std::fmt::Display for RefusalNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefusalNote::Refused(r) => write!(
                f,
                "refused client={} file=\"{}\" direction={} reason={} error_code={} error=\"{}\"",
                r.peer,
                r.filename,
                if r.write { "write" } else { "read" },
                r.kind.as_str(),
                r.code.to_u16(),
                r.message.escape_default(),
            ),
            RefusalNote::Suppressed { lines } => write!(
                f,
                "refused: {lines} more refused requests not logged (over {REFUSAL_LOG_PER_SEC}/s); counted by reason at exit"
            ),
        }
    }
}

/// A token bucket, so that ERROR replies to strangers and garbage cannot
/// be used to reflect traffic.
#[derive(Debug, Clone)]
struct TokenBucket {
    per_sec: u64,
    burst: u64,
    /// Tokens scaled by 10^9 (token-nanoseconds) to stay in integers.
    level: u64,
    last: Option<Instant>,
}

impl TokenBucket {
    const SCALE: u64 = 1_000_000_000;

    fn new(per_sec: u32, burst: u32) -> Self {
        let burst = u64::from(burst.max(1));
        Self {
            per_sec: u64::from(per_sec),
            burst,
            level: burst * Self::SCALE,
            last: None,
        }
    }

    /// Would be full by `now`: as good as a fresh one, so it may be dropped.
    fn refilled_by(&self, now: Instant) -> bool {
        let Some(last) = self.last else { return true };
        let missing = self.burst * Self::SCALE - self.level.min(self.burst * Self::SCALE);
        let nanos =
            u64::try_from(now.saturating_duration_since(last).as_nanos()).unwrap_or(u64::MAX);
        nanos.saturating_mul(self.per_sec) >= missing
    }

    fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last);
            let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
            let refill = nanos.saturating_mul(self.per_sec);
            self.level = self
                .level
                .saturating_add(refill)
                .min(self.burst * Self::SCALE);
        }
        self.last = Some(now);
        if self.level >= Self::SCALE {
            self.level -= Self::SCALE;
            true
        } else {
            false
        }
    }
}

/// What identifies a retransmitted request: the same peer asking for the
/// same thing while its first answer is still unacknowledged.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RequestKey {
    write: bool,
    filename: Box<[u8]>,
    mode: proto::Mode,
    options: proto::Options,
}

impl RequestKey {
    fn of(request: &Request<'_>, write: bool) -> Self {
        Self {
            write,
            filename: request.filename.into(),
            mode: request.mode,
            options: request.options,
        }
    }
}

/// Most requests one shard keeps waiting for capacity (see [`Waiting`]);
/// beyond it a refused request is answered "busy" at once, as before.
const WAITING_CAPACITY: usize = 65_536;

/// Requests refused for lack of capacity and not answered yet, by peer
/// (address and port): when each was first refused. A PXE ROM that gets
/// ERROR 0 fails its boot, but one that hears nothing retransmits; so a
/// busy request is met with silence until its client has waited longer
/// than `--busy-patience-ms`, and only then answered. An admitted request
/// keeps its entry: the driver may still fail to get it a socket, and that
/// refusal counts from the first. Bounded, and each entry forgotten after
/// twice the patience (the client gave up, or was served).
#[derive(Debug, Default)]
struct Waiting {
    by_peer: HashMap<SocketAddr, (RequestKey, Instant)>,
    /// Peers in the order of their first refusal, to expire from the
    /// front; holds stale peers too (removed or re-inserted), skipped.
    order: VecDeque<(SocketAddr, Instant)>,
}

/// What to do with a request refused for lack of capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Stay silent: the client's retransmission asks again.
    Defer,
    /// Answer ERROR 0 busy: it waited past the patience (or no room to
    /// remember it).
    Answer,
}

impl Waiting {
    /// Decides a refused `request` of `peer` at `now`.
    fn refused(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        request: &RequestKey,
        patience: Duration,
    ) -> Wait {
        if patience.is_zero() {
            return Wait::Answer;
        }
        self.expire(now, patience);
        match self.by_peer.get(&peer) {
            Some((key, first)) if key == request => {
                if now.saturating_duration_since(*first) > patience {
                    self.by_peer.remove(&peer);
                    Wait::Answer
                } else {
                    Wait::Defer
                }
            }
            // A new request of this peer (or of a new peer): its wait
            // starts now.
            known => {
                if known.is_none() && self.by_peer.len() >= WAITING_CAPACITY {
                    return Wait::Answer;
                }
                self.by_peer.insert(peer, (request.clone(), now));
                self.order.push_back((peer, now));
                // Stale entries of `order` are skipped by `expire`; past
                // twice the map's bound it is rebuilt from the map.
                if self.order.len() > 2 * WAITING_CAPACITY {
                    let mut live: Vec<_> =
                        self.by_peer.iter().map(|(p, (_, t))| (*p, *t)).collect();
                    live.sort_by_key(|&(_, t)| t);
                    self.order = live.into();
                }
                Wait::Defer
            }
        }
    }

    /// Forgets requests first refused more than twice `patience` ago.
    fn expire(&mut self, now: Instant, patience: Duration) {
        let horizon = patience.saturating_mul(2);
        while let Some(&(peer, first)) = self.order.front() {
            if now.saturating_duration_since(first) <= horizon {
                break;
            }
            self.order.pop_front();
            if self.by_peer.get(&peer).is_some_and(|(_, t)| *t == first) {
                self.by_peer.remove(&peer);
            }
        }
        if self.by_peer.is_empty() {
            self.order.clear();
        }
    }

    fn len(&self) -> usize {
        self.by_peer.len()
    }
}

#[derive(Debug)]
struct Entry<H> {
    transfer: Transfer,
    peer: SocketAddr,
    local: IpAddr,
    handle: H,
    /// The path opened, where the policy rewrote the name asked.
    served: Option<Box<[u8]>>,
    request: RequestKey,
}

#[derive(Debug)]
struct Slot<H> {
    generation: u32,
    entry: Option<Entry<H>>,
}

/// The per-shard endpoint. `H` is the [`Source::Handle`].
///
/// Driver call order for a session: after `handle_request` returned
/// `Started`, and after every `handle_datagram`/`handle_timeout`/`abort`:
/// drain `poll_transmit`, then re-arm with `poll_timeout`, then
/// `poll_event`: `Some` once the session has ended, with its record.
#[derive(Debug)]
pub struct Endpoint<H> {
    max_sessions: usize,
    max_upload_blksize: u16,
    single_port: bool,
    /// For new requests; swapped by `set_settings`.
    settings: Arc<Settings>,
    slots: Vec<Slot<H>>,
    free: Vec<u32>,
    live: usize,
    /// The newest session of each peer address, to spot retransmitted
    /// requests; with `single_port`, the only one, and the demultiplexer
    /// of the listener (kept in step with the slab by `start` and `take`,
    /// so bounded by `max_sessions`).
    by_peer: HashMap<SocketAddr, SessionId>,
    error_replies: TokenBucket,
    refusal_replies: TokenBucket,
    /// Request buckets by client address (bounded: see `admit_datagram`).
    client_buckets: HashMap<IpAddr, TokenBucket>,
    /// Live sessions by client address.
    per_client: HashMap<IpAddr, usize>,
    /// Recent opens by resolved path, one map per mode (octet, netascii).
    open_cache: [HashMap<Box<[u8]>, CachedOpen<H>>; 2],
    /// Content bytes held by the open cache, and when it was last swept.
    open_cache_bytes: u64,
    open_cache_swept: Option<Instant>,
    refusals: RefusalCounts,
    /// Busy requests kept waiting for a retransmission.
    waiting: Waiting,
    /// The refusal of the request being handled, for its log line.
    last_refusal: Option<Refusal>,
    refusal_notes: VecDeque<RefusalNote>,
    refusal_log: TokenBucket,
    /// Lines left out since `suppressed_since`.
    refusals_unlogged: u64,
    suppressed_since: Option<Instant>,
    shutting_down: bool,
    /// What recent transfers learned of each client's path, to start the
    /// next one from (bounded, expiring: like Linux's tcp_metrics).
    paths: HashMap<IpAddr, CachedPath>,
}

impl<H: Clone> Endpoint<H> {
    pub fn new(config: EndpointConfig) -> Self {
        let settings = Arc::new(config.settings);
        let (error_replies, refusal_replies) = Self::reply_buckets(&settings);
        Self {
            max_sessions: config.max_sessions,
            max_upload_blksize: config.max_upload_blksize,
            single_port: config.single_port,
            settings,
            slots: Vec::new(),
            free: Vec::new(),
            live: 0,
            by_peer: HashMap::new(),
            error_replies,
            refusal_replies,
            client_buckets: HashMap::new(),
            per_client: HashMap::new(),
            open_cache: [HashMap::new(), HashMap::new()],
            open_cache_bytes: 0,
            open_cache_swept: None,
            refusals: RefusalCounts::default(),
            waiting: Waiting::default(),
            last_refusal: None,
            refusal_notes: VecDeque::new(),
            refusal_log: TokenBucket::new(REFUSAL_LOG_PER_SEC, REFUSAL_LOG_BURST),
            refusals_unlogged: 0,
            suppressed_since: None,
            shutting_down: false,
            paths: HashMap::new(),
        }
    }

    fn reply_buckets(settings: &Settings) -> (TokenBucket, TokenBucket) {
        (
            TokenBucket::new(settings.error_replies_per_sec, settings.error_reply_burst),
            TokenBucket::new(
                settings.refusal_replies_per_sec,
                settings.refusal_replies_per_sec,
            ),
        )
    }

    /// New requests are decided under `settings` from now on; running
    /// sessions keep what they were granted. Rate buckets start full at
    /// the new rates, and the open cache starts afresh (the policy may
    /// resolve names differently).
    pub fn set_settings(&mut self, settings: Arc<Settings>) {
        (self.error_replies, self.refusal_replies) = Self::reply_buckets(&settings);
        self.client_buckets.clear();
        for cache in &mut self.open_cache {
            cache.clear();
        }
        self.open_cache_bytes = 0;
        self.settings = settings;
    }

    /// The settings new requests are decided under.
    pub fn settings(&self) -> &Arc<Settings> {
        &self.settings
    }

    /// Refusals so far, by reason.
    pub fn refusals(&self) -> &RefusalCounts {
        &self.refusals
    }

    /// Takes a token from the client's request bucket. The map is bounded:
    /// when full, buckets that have refilled (equal to fresh ones) go.
    fn admit_datagram(&mut self, now: Instant, client: IpAddr) -> bool {
        let (rate, burst) = (
            self.settings.requests_per_sec_per_client,
            self.settings.request_burst_per_client,
        );
        if rate == 0 {
            return true;
        }
        if self.client_buckets.len() >= CLIENT_BUCKETS_CAPACITY
            && !self.client_buckets.contains_key(&client)
        {
            self.client_buckets.retain(|_, b| !b.refilled_by(now));
            if self.client_buckets.len() >= CLIENT_BUCKETS_CAPACITY {
                // Every tracked address is mid-burst: a flood of spoofed
                // sources. Start afresh rather than grow.
                self.client_buckets.clear();
            }
        }
        self.client_buckets
            .entry(client)
            .or_insert_with(|| TokenBucket::new(rate, burst))
            .take(now)
    }

    /// Counts `refusal` and answers it with its ERROR, within the limit
    /// that fits it: the stricter one for input that may be forged.
    fn refuse(&mut self, now: Instant, refusal: Refusal, reply: &mut [u8]) -> RequestOutcome {
        self.refusals.by_reason[refusal.kind() as usize] += 1;
        self.last_refusal = Some(refusal.clone());
        if !refusal.is_answered() {
            return RequestOutcome::Ignored;
        }
        let bucket = if refusal.may_be_forged() {
            &mut self.error_replies
        } else {
            &mut self.refusal_replies
        };
        if bucket.take(now) {
            Self::error_reply(refusal.code(), refusal.message(), reply)
        } else {
            self.refusals.replies_suppressed += 1;
            RequestOutcome::Ignored
        }
    }

    /// For the driver: an admitted request could not get a transfer socket.
    /// Its session is removed and the client told to retry, within limits.
    /// Like the session limit, it is met with silence until the client
    /// has waited past the patience (see [`Waiting`]).
    pub fn refuse_busy(&mut self, now: Instant, id: SessionId, reply: &mut [u8]) -> RequestOutcome {
        let asked = self.entry_mut(id).map(|e| (e.peer, e.request.clone()));
        let _ = self.remove(id);
        match asked {
            Some((peer, request)) => self.refuse_full(now, peer, &request, reply),
            None => self.refuse(now, Refusal::Busy, reply),
        }
    }

    /// A request refused for lack of capacity: silence while its client
    /// is within the patience, ERROR 0 busy once past it.
    fn refuse_full(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        request: &RequestKey,
        reply: &mut [u8],
    ) -> RequestOutcome {
        let patience = self.settings.busy_patience;
        match self.waiting.refused(now, peer, request, patience) {
            Wait::Defer => {
                self.refusals.busy_deferred += 1;
                RequestOutcome::Ignored
            }
            Wait::Answer => self.refuse(now, Refusal::Busy, reply),
        }
    }

    /// Requests refused for lack of capacity and remembered (bounded).
    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// For the driver: a datagram at the listener longer than its buffer
    /// (MSG_TRUNC). Refused as malformed, never parsed cut short.
    pub fn refuse_oversized(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        reply: &mut [u8],
    ) -> RequestOutcome {
        let refusal = if self.admit_datagram(now, peer.ip()) {
            Refusal::Malformed(Malformed::Oversized)
        } else {
            Refusal::RateLimited
        };
        self.refuse(now, refusal, reply)
    }

    /// Slab capacity: every `SessionId::index` is below it.
    pub fn capacity(&self) -> usize {
        self.max_sessions
    }

    /// Live sessions.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    fn entry(&self, id: SessionId) -> Option<&Entry<H>> {
        let slot = self.slots.get(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.entry.as_ref()
    }

    fn entry_mut(&mut self, id: SessionId) -> Option<&mut Entry<H>> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        slot.entry.as_mut()
    }

    fn insert(&mut self, entry: Entry<H>) -> Option<SessionId> {
        if self.live >= self.max_sessions {
            return None;
        }
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = u32::try_from(self.slots.len()).ok()?;
                self.slots.push(Slot {
                    generation: 0,
                    entry: None,
                });
                index
            }
        };
        *self.per_client.entry(entry.peer.ip()).or_default() += 1;
        let slot = &mut self.slots[index as usize];
        slot.entry = Some(entry);
        self.live += 1;
        Some(SessionId {
            index,
            generation: slot.generation,
        })
    }

    /// An ERROR reply in `reply`, unconditionally.
    fn error_reply(code: ErrorCode, message: &str, reply: &mut [u8]) -> RequestOutcome {
        match proto::emit_error(code, message, reply) {
            Ok(n) => RequestOutcome::Reply(n),
            Err(_) => RequestOutcome::Ignored,
        }
    }

    /// Whether sessions run on the listening port (`--single-port`).
    pub fn single_port(&self) -> bool {
        self.single_port
    }

    /// `--single-port`: where a datagram from `peer` at the listener
    /// goes. Anything but a request from the peer of a live session is
    /// that session's (its ACKs, its DATA, its ERROR); a request goes to
    /// `handle_request`, which decides whether it repeats or replaces the
    /// running one. Without `single_port` everything is a request.
    pub fn route(&self, peer: SocketAddr, datagram: &[u8]) -> Route {
        let live = if self.single_port {
            self.by_peer
                .get(&peer)
                .copied()
                .filter(|&id| self.entry(id).is_some())
        } else {
            None
        };
        let request = matches!(datagram, [0, 1 | 2, ..]);
        match live {
            Some(id) if !request => Route::Session(id),
            live => Route::Request { live },
        }
    }

    /// A datagram on a listening socket from `peer`, sent to `local`,
    /// arriving on an interface with `mtu` (None if unknown).
    #[allow(clippy::too_many_arguments)]
    pub fn handle_request<F: Sink<Handle = H>>(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        local: IpAddr,
        mtu: Option<u32>,
        datagram: &[u8],
        files: &mut F,
        reply: &mut [u8],
    ) -> RequestOutcome {
        self.handle_request_with_mac(now, peer, None, local, mtu, datagram, files, reply)
    }

    /// As `handle_request`, with the peer's MAC when the driver looked it
    /// up (see [`Settings::lookup_mac`]).
    #[allow(clippy::too_many_arguments)]
    pub fn handle_request_with_mac<F: Sink<Handle = H>>(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        mac: Option<[u8; 6]>,
        local: IpAddr,
        mtu: Option<u32>,
        datagram: &[u8],
        files: &mut F,
        reply: &mut [u8],
    ) -> RequestOutcome {
        self.last_refusal = None;
        let outcome = self.decide_request(now, peer, mac, local, mtu, datagram, files, reply);
        // Dropped ones (rate-limited) would flood the log: counted only.
        if let Some(refusal) = self.last_refusal.take().filter(|r| r.is_answered()) {
            match Packet::parse(datagram) {
                Ok(Packet::Rrq(r)) => self.note_refused(now, peer, r.filename, false, refusal),
                Ok(Packet::Wrq(r)) => self.note_refused(now, peer, r.filename, true, refusal),
                _ => {}
            }
        }
        outcome
    }

    /// Queues a refused request's log line, within the log's rate.
    fn note_refused(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        filename: &[u8],
        write: bool,
        refusal: Refusal,
    ) {
        if !self.refusal_log.take(now) || self.refusal_notes.len() >= REFUSAL_NOTES {
            self.refusals_unlogged += 1;
            self.suppressed_since.get_or_insert(now);
            return;
        }
        self.refusal_notes.push_back(RefusalNote::Refused(Refused {
            peer,
            filename: filename.escape_ascii().to_string(),
            write,
            kind: refusal.kind(),
            code: refusal.code(),
            message: refusal.message().to_string(),
        }));
    }

    /// The next refused request to log (or a count of those left out).
    /// Drain after `handle_request` and `housekeeping`.
    pub fn poll_refused(&mut self) -> Option<RefusalNote> {
        self.refusal_notes.pop_front()
    }

    #[allow(clippy::too_many_arguments)]
    fn decide_request<F: Sink<Handle = H>>(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        mac: Option<[u8; 6]>,
        local: IpAddr,
        mtu: Option<u32>,
        datagram: &[u8],
        files: &mut F,
        reply: &mut [u8],
    ) -> RequestOutcome {
        if !self.admit_datagram(now, peer.ip()) {
            return self.refuse(now, Refusal::RateLimited, reply);
        }
        let (request, write) = match Packet::parse(datagram) {
            Ok(Packet::Rrq(request)) => (request, false),
            Ok(Packet::Wrq(request)) => (request, true),
            // Never answer an ERROR with an ERROR.
            Ok(Packet::Error { .. }) => return RequestOutcome::Ignored,
            // Single port: an ACK or DATA of no live session has an unknown
            // TID (RFC 1350 §4), most often a late one of a finished transfer.
            Ok(_) if self.single_port => return self.refuse(now, Refusal::UnknownTid, reply),
            Ok(_) => return self.refuse(now, Refusal::Malformed(Malformed::NotARequest), reply),
            Err(error) => {
                return self.refuse(now, Refusal::Malformed(Malformed::Parse(error)), reply);
            }
        };
        if self.shutting_down {
            return self.refuse(now, Refusal::ShuttingDown, reply);
        }
        let key = RequestKey::of(&request, write);
        let single_port = self.single_port;
        if let Some(&previous) = self.by_peer.get(&peer) {
            if let Some(entry) = self.entry_mut(previous) {
                // The same request again before any progress: the client
                // retransmitted; the session's own timer answers it. On a
                // single port a late copy must not restart a running
                // transfer either: the same request is always a repeat.
                if entry.request == key && (single_port || entry.transfer.awaiting_first_ack()) {
                    return RequestOutcome::Ignored;
                }
                // Single port: one transfer per client address and port (the
                // client tells transfers apart by our TID, now always the
                // same). A new request means it gave up the old one, which
                // ends at once, silently (as dnsmasq --tftp-single-port does).
                if single_port {
                    entry.transfer.supersede(now);
                }
            }
        }
        if self.live >= self.max_sessions {
            return self.refuse_full(now, peer, &key, reply);
        }
        let client_sessions = self.per_client.get(&peer.ip()).copied().unwrap_or(0);
        if client_sessions >= self.settings.max_sessions_per_client {
            return self.refuse(now, Refusal::PerClientCap, reply);
        }
        let incoming = Incoming {
            now,
            peer,
            local,
            mtu,
            write,
            request: &request,
            mac,
            client_sessions,
        };
        let grant = match self.settings.policy.decide(&incoming, &self.settings) {
            Decision::Serve(grant) => grant,
            Decision::Refuse(refusal) => return self.refuse(now, refusal, reply),
        };
        if write {
            return self.start_write(now, incoming, grant, key, files, reply);
        }
        let opened = self.open(now, files, grant.root, &grant.path, request.mode);
        let (handle, content_len) = match opened {
            Ok(opened) => opened,
            Err(error) => return self.refuse(now, Refusal::from(&error), reply),
        };
        let ipv6 = matches!(peer, SocketAddr::V6(_));
        let path = self.recent_path(now, peer.ip());
        let mut limits = grant.limits;
        let first_window = self.settings.first_contact_windowsize;
        if path.is_none() && first_window > 0 {
            limits.max_windowsize = limits.max_windowsize.min(first_window);
        }
        let mut asked = grant.refused.strip(&request.options);
        // RFC 2349: a read request asks with 0; tftpd-hpa 7.3 ignores any
        // other value rather than answer it.
        asked.tsize = asked.tsize.filter(|&t| t == 0);
        let negotiated = session::negotiate(&asked, content_len, mtu, ipv6, &limits);
        let mut transfer = Transfer::new_read(now, &negotiated, content_len, &limits);
        // The client's own rollover option wins over the policy's default.
        transfer.set_rollover(negotiated.rollover.unwrap_or(grant.rollover));
        // A client seen recently starts from what its last transfer
        // measured; a first contact keeps the conservative initial RTO.
        if let Some(path) = path {
            transfer.seed_from_path(&path);
        }
        self.start(&incoming, &grant.path, transfer, handle, key, reply)
    }

    fn start(
        &mut self,
        incoming: &Incoming<'_>,
        path: &[u8],
        transfer: Transfer,
        handle: H,
        request: RequestKey,
        reply: &mut [u8],
    ) -> RequestOutcome {
        // A write request's policy may have taken a while: checked again.
        if self.live >= self.max_sessions {
            return self.refuse_full(incoming.now, incoming.peer, &request, reply);
        }
        let entry = Entry {
            transfer,
            peer: incoming.peer,
            local: incoming.local,
            handle,
            served: (path != incoming.request.filename).then(|| path.into()),
            request,
        };
        match self.insert(entry) {
            Some(id) => {
                self.by_peer.insert(incoming.peer, id);
                RequestOutcome::Started(id)
            }
            None => self.refuse(incoming.now, Refusal::Busy, reply),
        }
    }

    /// A write request the policy granted: begun by `files` (which
    /// applies the create and overwrite rules), and held to the smaller of
    /// its announced size and the grant's limit. Never cached: each upload
    /// is its own file.
    fn start_write<F: Sink<Handle = H>>(
        &mut self,
        now: Instant,
        incoming: Incoming<'_>,
        grant: Grant<'_>,
        key: RequestKey,
        files: &mut F,
        reply: &mut [u8],
    ) -> RequestOutcome {
        let Incoming {
            peer, mtu, request, ..
        } = incoming;
        // RFC 2349: the client announces its size. Zero is read as "not
        // known" (some clients send it so), not as a limit.
        let tsize = request.options.tsize.filter(|&t| t > 0);
        let max_len = match (grant.max_upload, tsize) {
            (Some(max), Some(t)) if t > max => return self.refuse(now, Refusal::TooLarge, reply),
            (Some(max), Some(t)) => Some(max.min(t)),
            (max, t) => max.or(t),
        };
        let handle = match files.open_write_in(grant.root, &grant.path, request.mode, tsize) {
            Ok(handle) => handle,
            Err(error) => return self.refuse(now, Refusal::from(&error), reply),
        };
        let mut limits = grant.limits;
        limits.max_blksize = limits.max_blksize.min(self.max_upload_blksize);
        let ipv6 = matches!(peer, SocketAddr::V6(_));
        // The OACK echoes the client's tsize (as tftpd-hpa does).
        let echoed = request.options.tsize.unwrap_or(session::LEN_UNKNOWN);
        // A refused tsize still bounds the upload above; it is just not
        // acknowledged.
        let asked = grant.refused.strip(&request.options);
        let negotiated = session::negotiate(&asked, echoed, mtu, ipv6, &limits);
        let mut transfer = Transfer::new_write(now, &negotiated, max_len, &limits);
        transfer.set_rollover(negotiated.rollover.unwrap_or(grant.rollover));
        self.start(&incoming, &grant.path, transfer, handle, key, reply)
    }

    /// Opens `filename`, or reuses an open of it younger than the TTL: a
    /// fleet asks for the same few files (and probes the same missing
    /// ones) thousands of times a second. `root`: which of several
    /// directories (the grant's).
    fn open<F: Source<Handle = H>>(
        &mut self,
        now: Instant,
        files: &mut F,
        root: usize,
        filename: &[u8],
        mode: proto::Mode,
    ) -> Result<(H, u64), OpenError> {
        let ttl = self.settings.open_cache_ttl;
        if ttl.is_zero() {
            return files.open_read_in(root, filename, mode);
        }
        // The same name in another directory is another file: its key
        // carries the directory, after a NUL (which no name holds).
        let key: std::borrow::Cow<'_, [u8]> = match root {
            0 => filename.into(),
            _ => [filename, &[0], &(root as u64).to_be_bytes()]
                .concat()
                .into(),
        };
        self.sweep_open_cache(now);
        let cache = &mut self.open_cache[mode as usize];
        if let Some(cached) = cache.get(&*key)
            && now.saturating_duration_since(cached.opened_at) < ttl
        {
            return cached.result.clone();
        }
        let result = files.open_read_in(root, filename, mode);
        if matches!(result, Err(OpenError::Transient(_))) {
            return result;
        }
        let bytes = result
            .as_ref()
            .map_or(0, |(handle, len)| F::held_bytes(handle, *len));
        // One huge file (an ISO) would otherwise flush every other entry on
        // each insert; it is opened afresh each time (its mapping is still
        // shared by file identity).
        if bytes > OPEN_CACHE_MAX_BYTES / 4 {
            return result;
        }
        if cache.len() >= OPEN_CACHE_CAPACITY
            || self.open_cache_bytes.saturating_add(bytes) > OPEN_CACHE_MAX_BYTES
        {
            for cache in &mut self.open_cache {
                cache.clear();
            }
            self.open_cache_bytes = 0;
        }
        let cache = &mut self.open_cache[mode as usize];
        let old = cache.insert(
            Box::from(&*key),
            CachedOpen {
                result: result.clone(),
                bytes,
                opened_at: now,
            },
        );
        self.open_cache_bytes += bytes;
        self.open_cache_bytes -= old.map_or(0, |o| Self::cached_bytes(&o));
        result
    }

    fn cached_bytes(cached: &CachedOpen<H>) -> u64 {
        cached.bytes
    }

    /// For the driver, now and then (each loop turn is fine: it is one
    /// comparison until a TTL passed): expired open-cache entries go even
    /// when no request comes, so a deleted file's mapping or a netascii
    /// translation is not pinned by a quiet server.
    pub fn housekeeping(&mut self, now: Instant) {
        if !self.settings.open_cache_ttl.is_zero() {
            self.sweep_open_cache(now);
        }
        // One line a second sums the refusals a flood kept out of the log.
        if let Some(since) = self.suppressed_since
            && now.saturating_duration_since(since) >= Duration::from_secs(1)
            && self.refusal_notes.len() < REFUSAL_NOTES
        {
            self.refusal_notes.push_back(RefusalNote::Suppressed {
                lines: std::mem::take(&mut self.refusals_unlogged),
            });
            self.suppressed_since = None;
        }
    }

    /// Drops expired entries once per TTL, so the cache never keeps a
    /// netascii copy or a deleted file's mapping alive much past it.
    fn sweep_open_cache(&mut self, now: Instant) {
        let ttl = self.settings.open_cache_ttl;
        if self
            .open_cache_swept
            .is_some_and(|at| now.saturating_duration_since(at) < ttl)
        {
            return;
        }
        self.open_cache_swept = Some(now);
        let mut freed = 0;
        for cache in &mut self.open_cache {
            cache.retain(|_, c| {
                let fresh = now.saturating_duration_since(c.opened_at) < ttl;
                if !fresh {
                    freed += Self::cached_bytes(c);
                }
                fresh
            });
        }
        self.open_cache_bytes -= freed;
    }

    /// Entries and content bytes the open cache holds now.
    pub fn open_cache_usage(&self) -> (usize, u64) {
        (
            self.open_cache.iter().map(HashMap::len).sum(),
            self.open_cache_bytes,
        )
    }

    /// A datagram on session `id`'s socket from `from`.
    pub fn handle_datagram<'a>(
        &mut self,
        now: Instant,
        id: SessionId,
        from: SocketAddr,
        datagram: &'a [u8],
        reply: &mut [u8],
    ) -> DatagramOutcome<'a> {
        let Some(entry) = self.entry_mut(id) else {
            return DatagramOutcome::Ignored;
        };
        if entry.peer == from {
            return match entry.transfer.handle_datagram(now, datagram) {
                Some(received) => DatagramOutcome::Received(received),
                None => DatagramOutcome::Delivered,
            };
        }
        // RFC 1350 §4: a packet from another TID gets ERROR 5, and the
        // transfer goes on undisturbed.
        if matches!(Packet::parse(datagram), Ok(Packet::Error { .. })) {
            return DatagramOutcome::Ignored;
        }
        match self.refuse(now, Refusal::UnknownTid, reply) {
            RequestOutcome::Reply(n) => DatagramOutcome::Reply(n),
            _ => DatagramOutcome::Ignored,
        }
    }

    /// Session `id`'s deadline passed (spurious calls are no-ops).
    pub fn handle_timeout(&mut self, now: Instant, id: SessionId) {
        if let Some(entry) = self.entry_mut(id) {
            entry.transfer.handle_timeout(now);
        }
    }

    /// The next datagram for session `id`'s peer (see [`Transmit`]).
    pub fn poll_transmit(
        &mut self,
        now: Instant,
        id: SessionId,
        buf: &mut [u8],
    ) -> Option<Transmit> {
        self.entry_mut(id)?.transfer.poll_transmit(now, buf)
    }

    /// Session `id`'s next deadline.
    pub fn poll_timeout(&self, id: SessionId) -> Option<Instant> {
        self.entry(id)?.transfer.poll_timeout()
    }

    /// `Some` once, when session `id` has ended and its last packet was
    /// drained: the session is freed and this is its record.
    pub fn poll_event(&mut self, id: SessionId) -> Option<Finished<H>> {
        let outcome = self.entry_mut(id)?.transfer.poll_event()?;
        self.take(id, outcome)
    }

    pub fn session(&self, id: SessionId) -> Option<SessionView<'_, H>> {
        self.entry(id).map(|e| SessionView {
            peer: e.peer,
            local: e.local,
            handle: &e.handle,
            blksize: e.transfer.stats().blksize,
            windowsize: e.transfer.stats().windowsize,
        })
    }

    /// Every live session, in slab order, for the live view: a read-only
    /// walk (the driver calls it a few times a second, and only while a
    /// viewer watches).
    pub fn live_transfers(&self) -> impl Iterator<Item = LiveTransfer<'_>> + '_ {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            let e = slot.entry.as_ref()?;
            let stats = e.transfer.stats();
            let total = match e.request.write {
                false => e.transfer.content_len(),
                true => e.request.options.tsize.filter(|&t| t > 0),
            };
            Some(LiveTransfer {
                id: SessionId {
                    index: index as u32,
                    generation: slot.generation,
                },
                peer: e.peer,
                filename: &e.request.filename,
                write: e.request.write,
                bytes: stats.bytes_acked,
                total,
                retransmits: stats.retransmits,
                blksize: stats.blksize,
                windowsize: stats.windowsize,
                started: stats.started,
            })
        })
    }

    /// Session `id`'s content length, learnt while sending (see
    /// [`session::LEN_UNKNOWN`]).
    pub fn set_content_len(&mut self, id: SessionId, len: u64) {
        if let Some(entry) = self.entry_mut(id) {
            entry.transfer.set_content_len(len);
        }
    }

    /// Upload `id` is stored under its name: its final ACK goes out.
    pub fn commit_done(&mut self, now: Instant, id: SessionId) {
        if let Some(entry) = self.entry_mut(id) {
            entry.transfer.commit_done(now);
        }
    }

    /// Ends session `id` from the server side: its ERROR is queued for the
    /// peer.
    pub fn abort(&mut self, now: Instant, id: SessionId, why: Abort) {
        if let Some(entry) = self.entry_mut(id) {
            entry.transfer.abort(now, why);
        }
    }

    /// Frees session `id` now, ended or not (the driver gave up on it);
    /// one removed before its end counts as aborted.
    pub fn remove(&mut self, id: SessionId) -> Option<Finished<H>> {
        let outcome = self.entry_mut(id)?.transfer.poll_event();
        self.take(
            id,
            outcome.unwrap_or(Outcome::Aborted(ErrorCode::NotDefined)),
        )
    }

    fn take(&mut self, id: SessionId, outcome: Outcome) -> Option<Finished<H>> {
        let slot = self.slots.get_mut(id.index as usize)?;
        if slot.generation != id.generation {
            return None;
        }
        let entry = slot.entry.take()?;
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(id.index);
        self.live -= 1;
        if self.by_peer.get(&entry.peer) == Some(&id) {
            self.by_peer.remove(&entry.peer);
        }
        if let Some(count) = self.per_client.get_mut(&entry.peer.ip()) {
            *count -= 1;
            if *count == 0 {
                self.per_client.remove(&entry.peer.ip());
            }
        }
        let stats = *entry.transfer.stats();
        if let Some(metrics) = entry.transfer.path_metrics() {
            let at = stats.ended.unwrap_or(stats.started);
            self.remember_path(at, entry.peer.ip(), metrics);
        }
        Some(Finished {
            peer: entry.peer,
            write: entry.request.write,
            mode: entry.request.mode,
            asked: entry.request.options,
            filename: entry.request.filename.escape_ascii().to_string(),
            served: entry.served.map(|path| path.escape_ascii().to_string()),
            handle: entry.handle,
            outcome,
            stats,
        })
    }

    /// The path estimate of `client` from a transfer that ended within the
    /// TTL, if any.
    fn recent_path(&mut self, now: Instant, client: IpAddr) -> Option<PathMetrics> {
        let cached = *self.paths.get(&client)?;
        if now.saturating_duration_since(cached.learned_at) >= PATH_CACHE_TTL {
            self.paths.remove(&client);
            return None;
        }
        Some(cached.metrics)
    }

    /// Keeps what a finished transfer learned of its client's path (the
    /// newest transfer's word replaces the last; see `path_metrics` for
    /// how its floor falls again when it proved unneeded).
    fn remember_path(&mut self, now: Instant, client: IpAddr, metrics: PathMetrics) {
        if self.recent_path(now, client).is_none() && self.paths.len() >= PATH_CACHE_CAPACITY {
            self.paths
                .retain(|_, p| now.saturating_duration_since(p.learned_at) < PATH_CACHE_TTL);
            if self.paths.len() >= PATH_CACHE_CAPACITY {
                // All fresh: forget the oldest.
                let oldest = self
                    .paths
                    .iter()
                    .min_by_key(|(_, p)| p.learned_at)
                    .map(|(ip, _)| *ip);
                if let Some(ip) = oldest {
                    self.paths.remove(&ip);
                }
            }
        }
        self.paths.insert(
            client,
            CachedPath {
                metrics,
                learned_at: now,
            },
        );
    }

    /// Client addresses with a path estimate held (expired ones included
    /// until they are looked up or swept).
    pub fn path_cache_len(&self) -> usize {
        self.paths.len()
    }

    /// Stops admitting: later requests get an ERROR saying so.
    pub fn shut_down(&mut self) {
        self.shutting_down = true;
    }

    /// Ids of all live sessions (for shutdown).
    pub fn session_ids(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.slots.iter().enumerate().filter_map(|(index, slot)| {
            slot.entry.as_ref().map(|_| SessionId {
                index: index as u32,
                generation: slot.generation,
            })
        })
    }
}

impl Outcome {
    /// A short word for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::OptionsDeclined => "options-declined",
            Outcome::PeerError(_) => "client-error",
            Outcome::TimedOut => "timed-out",
            Outcome::Aborted(_) => "aborted",
        }
    }
}

/// A finished transfer as data: for `--on-transfer` hooks (as JSON) and
/// structured logs. Names and durations as in the log line.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TransferRecord {
    pub client: SocketAddr,
    /// The name as asked, escaped.
    pub file: String,
    /// The path opened, if a rule rewrote the name (escaped).
    pub served: Option<String>,
    /// "read" or "write".
    pub direction: &'static str,
    /// "octet" or "netascii".
    pub mode: &'static str,
    /// The options the client asked for, `name=value` separated by
    /// spaces (empty: none).
    pub options: String,
    pub bytes: u64,
    /// DATA blocks acknowledged (read) or accepted (write).
    pub blocks: u64,
    pub blksize: u16,
    pub windowsize: u16,
    pub duration_ms: f64,
    pub retransmits: u64,
    pub srtt_ms: Option<f64>,
    pub rto_floor_ms: f64,
    pub outcome: &'static str,
    pub error_code: Option<u16>,
    /// The message of the ERROR the server sent, if it ended the transfer.
    pub error: Option<&'static str>,
}

/// The options as asked, for the transfer record.
fn asked_options(o: &proto::Options) -> String {
    let numbers = [
        ("blksize", o.blksize.map(u64::from)),
        ("blksize2", o.blksize2.map(u64::from)),
        ("timeout", o.timeout.map(u64::from)),
        ("utimeout", o.utimeout),
        ("tsize", o.tsize),
        ("windowsize", o.windowsize.map(u64::from)),
        ("rollover", o.rollover.map(u64::from)),
    ];
    let numbers = numbers
        .into_iter()
        .filter_map(|(name, value)| Some(format!("{name}={}", value?)));
    let cookie = o
        .cookie
        .map(|c| format!("cookie={}", c.as_bytes().escape_ascii()));
    numbers.chain(cookie).collect::<Vec<_>>().join(" ")
}

/// Milliseconds to the microsecond, for records.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl<H> Finished<H> {
    pub fn record(&self) -> TransferRecord {
        let duration = self
            .stats
            .ended
            .map(|end| end.saturating_duration_since(self.stats.started))
            .unwrap_or(Duration::ZERO);
        TransferRecord {
            client: self.peer,
            file: self.filename.clone(),
            served: self.served.clone(),
            direction: if self.write { "write" } else { "read" },
            mode: self.mode.as_str(),
            options: asked_options(&self.asked),
            bytes: self.stats.bytes_acked,
            blocks: self.stats.blocks,
            blksize: self.stats.blksize,
            windowsize: self.stats.windowsize,
            duration_ms: millis(duration),
            retransmits: self.stats.retransmits,
            srtt_ms: self.stats.srtt.map(millis),
            rto_floor_ms: millis(self.stats.rto_floor),
            outcome: self.outcome.as_str(),
            error_code: match self.outcome {
                Outcome::PeerError(code) | Outcome::Aborted(code) => Some(code.to_u16()),
                _ => None,
            },
            error: self.stats.error,
        }
    }
}

impl<H> std::fmt::Display for Finished<H> {
    /// The one log line of a finished transfer.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.record().fmt(f)
    }
}

impl std::fmt::Display for TransferRecord {
    /// The one log line of a finished transfer.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "transfer client={} file=\"{}\" direction={} bytes={} blksize={} windowsize={} duration_ms={:.3} retransmits={} srtt_ms={:.3} rto_floor_ms={:.1} outcome={}",
            self.client,
            self.file,
            self.direction,
            self.bytes,
            self.blksize,
            self.windowsize,
            self.duration_ms,
            self.retransmits,
            self.srtt_ms.unwrap_or(0.0),
            self.rto_floor_ms,
            self.outcome,
        )?;
        if let Some(served) = &self.served {
            write!(f, " served=\"{served}\"")?;
        }
        match self.error_code {
            Some(code) => write!(f, " error_code={code}"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asked_options_lists_what_the_client_sent_in_order() {
        assert_eq!(asked_options(&proto::Options::default()), "");
        let asked = proto::Options {
            blksize: Some(1468),
            tsize: Some(0),
            windowsize: Some(16),
            cookie: proto::Cookie::new(b"a\x01"),
            ..proto::Options::default()
        };
        assert_eq!(
            asked_options(&asked),
            "blksize=1468 tsize=0 windowsize=16 cookie=a\\x01"
        );
    }
}
