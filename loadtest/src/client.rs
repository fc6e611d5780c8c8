//! One RRQ transfer as the client sees it: a sans-IO state machine.
//!
//! Call order (the driver in `driver.rs` follows it; tests drive it with a fake clock):
//! 1. [`Transfer::new`] queues the RRQ and arms the first deadline.
//! 2. Drain [`Transfer::poll_transmit`] until `None` and send each datagram to its `dest`.
//! 3. Feed every datagram received on the transfer's socket to [`Transfer::handle_datagram`],
//!    and call [`Transfer::handle_timeout`] when [`Transfer::poll_timeout`] has passed
//!    (a spurious call is a no-op). After each, go to 2.
//! 4. Once [`Transfer::outcome`] is `Some`, drain transmits one last time (the final ACK) and
//!    drop the transfer; it ignores all later input.
//!
//! What it checks: every payload byte against the expected content, the total length, the OACK
//! (RFC 2347 §3: only requested options; RFC 2348/7440: blksize/windowsize at most what was
//! asked; RFC 2349: tsize equals the file length, timeout echoed), and the server TID.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::wire::{self, Packet, RequestOptions};

/// RFC 1350: the block size when no option was negotiated.
pub const DEFAULT_BLKSIZE: usize = 512;
/// Queued ERROR 5 replies beyond this are dropped: a flood from a stranger must not grow memory.
const MAX_PENDING: usize = 8;

/// Client behaviour shared by every transfer of a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientConfig {
    pub options: RequestOptions,
    /// Retransmit timeout (the first one, with `backoff`).
    pub timeout: Duration,
    /// Retransmissions without progress before the transfer fails with "timed out".
    pub retries: u32,
    /// iPXE-like exponential backoff with jitter: timeout × 1, 2, 4, 8, 8, … (+0–25 %).
    pub backoff: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            options: RequestOptions::default(),
            timeout: Duration::from_secs(1),
            retries: 5,
            backoff: false,
        }
    }
}

/// Why a transfer failed; the stats module counts failures by [`FailureKind::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FailureKind {
    /// No progress after `retries` retransmissions.
    Timeout,
    /// The server sent an ERROR packet.
    ServerError,
    /// The server sent ERROR 0 saying it is busy: a PXE ROM fails its boot on it.
    Busy,
    /// A payload byte differed from the expected content.
    Mismatch,
    /// Too much or too little data, or a block longer than blksize.
    Length,
    /// The OACK granted something it may not.
    BadOack,
    /// Malformed or unexpected packet from the server.
    Protocol,
    /// A local error (socket, send) or the run was aborted.
    Local,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Timeout => "timeout",
            FailureKind::ServerError => "server_error",
            FailureKind::Busy => "busy",
            FailureKind::Mismatch => "mismatch",
            FailureKind::Length => "length",
            FailureKind::BadOack => "bad_oack",
            FailureKind::Protocol => "protocol",
            FailureKind::Local => "local",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub kind: FailureKind,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Failed(Failure),
}

/// What the server granted. `oack == false` means it ignored all options (answered with DATA 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Granted {
    pub oack: bool,
    pub blksize: Option<u16>,
    pub windowsize: Option<u16>,
    pub tsize: Option<u64>,
    pub timeout: Option<u8>,
}

/// Per-transfer counters, added into the run's stats when the transfer ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Datagrams resent because a deadline passed.
    pub retransmits: u64,
    /// In-order DATA blocks accepted (the empty final block included); for an upload, DATA
    /// blocks the server acknowledged.
    pub blocks: u64,
    /// Payload bytes accepted in order (for an upload: acknowledged).
    pub bytes: u64,
    /// DATA (or OACK) that was a duplicate or out of order.
    pub out_of_order: u64,
    /// ACKs sent to resynchronise after out-of-order data (RFC 7440 §4).
    pub resync_acks: u64,
    /// Datagrams from a source other than the server TID (each answered by ERROR 5).
    pub foreign_tid: u64,
}

/// What the run's statistics read of a finished transfer, download or upload.
pub trait TransferView {
    fn id(&self) -> u64;
    fn name(&self) -> &str;
    fn outcome(&self) -> Option<&Outcome>;
    fn counters(&self) -> &Counters;
    fn granted(&self) -> &Granted;
    /// Request sent to the first DATA (a read) or the first reply (an upload).
    fn time_to_first_data(&self) -> Option<Duration>;
    /// Request sent to the last DATA (a read) or the final ACK (an upload); completed only.
    fn total_time(&self) -> Option<Duration>;
}

impl TransferView for Transfer {
    fn id(&self) -> u64 {
        self.id
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn outcome(&self) -> Option<&Outcome> {
        self.outcome.as_ref()
    }
    fn counters(&self) -> &Counters {
        &self.counters
    }
    fn granted(&self) -> &Granted {
        &self.granted
    }
    fn time_to_first_data(&self) -> Option<Duration> {
        self.first_data
    }
    fn total_time(&self) -> Option<Duration> {
        self.total
    }
}

/// A datagram to send: `len` bytes at the start of the buffer given to `poll_transmit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub dest: SocketAddr,
    pub len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// The request of the missing file asked first (`Transfer::with_probe`).
    Probe,
    Rrq,
    Ack(u16),
    UnknownTid(SocketAddr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The probe's RRQ sent, waiting for its ERROR 1 (file not found).
    Probing,
    /// RRQ sent, waiting for OACK, DATA 1 or ERROR.
    Requested,
    /// Receiving DATA.
    Receiving,
    Finished,
}

#[derive(Debug)]
pub struct Transfer {
    id: u64,
    name: Arc<str>,
    expected: Arc<[u8]>,
    cfg: ClientConfig,
    server: SocketAddr,
    tid: Option<SocketAddr>,
    /// A file that must be missing, asked for before `name` (as iPXE asks for
    /// `autoexec.ipxe` first).
    probe: Option<Arc<str>>,
    phase: Phase,
    blksize: usize,
    window: u16,
    /// Absolute number (1-based, never wraps) of the next in-order block.
    next: u64,
    /// In-order blocks received since the last ACK we sent.
    since_ack: u16,
    /// An ACK of the last in-order block was already sent for the current gap.
    resynced: bool,
    timer: Retransmit,
    pending: VecDeque<Pending>,
    started: Instant,
    first_data: Option<Duration>,
    total: Option<Duration>,
    granted: Granted,
    counters: Counters,
    outcome: Option<Outcome>,
}

impl Transfer {
    /// Starts transfer `id` of `name`, whose content must equal `expected`. Queues the RRQ.
    pub fn new(
        id: u64,
        name: Arc<str>,
        expected: Arc<[u8]>,
        cfg: ClientConfig,
        server: SocketAddr,
        seed: u64,
        now: Instant,
    ) -> Self {
        let timer = Retransmit::new(&cfg, seed, id, now);
        let mut t = Transfer {
            id,
            name,
            expected,
            cfg,
            server,
            tid: None,
            probe: None,
            phase: Phase::Requested,
            blksize: DEFAULT_BLKSIZE,
            window: 1,
            next: 1,
            since_ack: 0,
            resynced: false,
            timer,
            pending: VecDeque::with_capacity(2),
            started: now,
            first_data: None,
            total: None,
            granted: Granted::default(),
            counters: Counters::default(),
            outcome: None,
        };
        t.pending.push_back(Pending::Rrq);
        t
    }

    /// Asks for `missing` first and expects ERROR 1 for it, then requests the file (with
    /// the same options, from the same port). Its time to first DATA counts from the probe.
    pub fn with_probe(mut self, missing: Arc<str>) -> Self {
        self.probe = Some(missing);
        self.phase = Phase::Probing;
        self.pending.clear();
        self.pending.push_back(Pending::Probe);
        self
    }

    /// Whether `poll_transmit` has something to send.
    pub fn has_transmit(&self) -> bool {
        !self.pending.is_empty()
    }
    /// The one next deadline; `None` once finished.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timer.deadline()
    }

    /// Fails the transfer for a reason outside the protocol (socket error, run aborted).
    pub fn fail_local(&mut self, detail: String) {
        self.fail(FailureKind::Local, detail);
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.outcome.is_some() {
            return;
        }
        match self.timer.expire(now) {
            Expiry::NotDue => return,
            Expiry::GiveUp(attempts) => {
                let waiting = match self.phase {
                    Phase::Probing => "the probe's ERROR 1".to_string(),
                    Phase::Requested => "the first reply".to_string(),
                    _ => format!("DATA block {}", self.next),
                };
                let detail =
                    format!("timed out waiting for {waiting} after {attempts} retransmits");
                return self.fail(FailureKind::Timeout, detail);
            }
            Expiry::Resend => {}
        }
        self.counters.retransmits += 1;
        match self.phase {
            Phase::Probing => self.queue(Pending::Probe),
            Phase::Requested => self.queue(Pending::Rrq),
            Phase::Receiving => {
                // Re-ACK the last in-order block: in lock-step that resends the lost ACK;
                // with a window it tells the server where to restart (RFC 7440 §4).
                self.queue(Pending::Ack(self.last_in_order()));
                self.since_ack = 0;
                self.resynced = true;
            }
            Phase::Finished => {}
        }
    }

    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if self.outcome.is_some() {
            return;
        }
        let packet = match arrival(self.server, self.tid, from, bytes) {
            Arrival::Packet(p) => p,
            Arrival::Stranger => {
                self.counters.foreign_tid += 1;
                if self.pending.len() < MAX_PENDING_ERRORS {
                    self.queue(Pending::UnknownTid(from));
                }
                return;
            }
            Arrival::Garbage(why) => return self.fail(FailureKind::Protocol, why),
        };
        if self.phase == Phase::Probing {
            match packet {
                Packet::Error { code: 1, .. } => {
                    // Missing, as expected: now the real request.
                    self.phase = Phase::Requested;
                    self.queue(Pending::Rrq);
                    self.progress(now);
                    return;
                }
                Packet::Error { .. } => {}
                _ => {
                    let probe = self.probe.as_deref().unwrap_or("");
                    return self.fail(
                        FailureKind::Protocol,
                        format!("the probe of missing {probe} was answered with no ERROR 1"),
                    );
                }
            }
        }
        // A second ERROR 1 for a retransmitted probe, late: not the file's answer.
        if self.probe.is_some()
            && self.phase == Phase::Requested
            && matches!(packet, Packet::Error { code: 1, .. })
        {
            self.counters.out_of_order += 1;
            return;
        }
        match packet {
            Packet::Error { code, message } => self.fail(
                if code == 0 && message.contains("busy") {
                    FailureKind::Busy
                } else {
                    FailureKind::ServerError
                },
                format!("server sent ERROR {code}: {message}"),
            ),
            Packet::Oack { options } => self.on_oack(now, from, options),
            Packet::Data { block, payload } => {
                if self.phase == Phase::Requested {
                    if block != 1 {
                        self.fail(
                            FailureKind::Protocol,
                            format!("first DATA was block {block}, expected 1"),
                        );
                        return;
                    }
                    // The server ignored our options (RFC 2347 §3): RFC 1350 defaults apply.
                    self.tid = Some(from);
                    self.phase = Phase::Receiving;
                    self.granted = Granted::default();
                }
                self.on_data(now, block, payload);
            }
            Packet::Ack { .. } => self.fail(
                FailureKind::Protocol,
                "server sent an ACK to a read request".to_string(),
            ),
            Packet::Other { opcode } => self.fail(
                FailureKind::Protocol,
                format!("server sent unexpected opcode {opcode}"),
            ),
        }
    }

    /// Writes the next queued datagram into `buf`.
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        while let Some(p) = self.pending.pop_front() {
            let (dest, res) = match p {
                Pending::Probe => (
                    self.server,
                    wire::encode_rrq(buf, self.probe.as_deref().unwrap_or(""), &self.cfg.options),
                ),
                Pending::Rrq => (
                    self.server,
                    wire::encode_rrq(buf, &self.name, &self.cfg.options),
                ),
                Pending::Ack(block) => {
                    let Some(tid) = self.tid else { continue };
                    (tid, wire::encode_ack(buf, block))
                }
                Pending::UnknownTid(to) => (
                    to,
                    wire::encode_error(buf, wire::ERR_UNKNOWN_TID, "Unknown transfer ID"),
                ),
            };
            match res {
                Ok(len) => return Some(Transmit { dest, len }),
                Err(e) => {
                    self.fail_local(format!("send buffer too small: {} bytes needed", e.needed));
                }
            }
        }
        None
    }

    fn on_oack(&mut self, now: Instant, from: SocketAddr, options: &[u8]) {
        match self.phase {
            Phase::Requested => {}
            Phase::Probing => return,
            Phase::Receiving => {
                // Our ACK 0 was lost and the server resent its OACK: ACK 0 again, once.
                // After DATA 1 a late duplicate is harmless and ignored.
                self.counters.out_of_order += 1;
                if self.next == 1 {
                    self.resync();
                }
                return;
            }
            Phase::Finished => return,
        }
        self.tid = Some(from);
        if !self.cfg.options.any() {
            self.fail(
                FailureKind::BadOack,
                "OACK in answer to a request without options".to_string(),
            );
            return;
        }
        match validate_oack(&self.cfg.options, options, self.expected.len() as u64) {
            Ok(granted) => {
                self.granted = granted;
                self.blksize = granted.blksize.map_or(DEFAULT_BLKSIZE, usize::from);
                self.window = granted.windowsize.unwrap_or(1);
                self.phase = Phase::Receiving;
                // RFC 2347 §3: a reading client acknowledges the OACK with ACK 0.
                self.queue(Pending::Ack(0));
                self.progress(now);
            }
            Err(detail) => self.fail(FailureKind::BadOack, detail),
        }
    }

    fn on_data(&mut self, now: Instant, block: u16, payload: &[u8]) {
        // Block numbers roll over 65535 → 0, so compare modulo 2^16.
        if block != self.next as u16 {
            // Duplicate or out of order: RFC 7440 §4, ACK the last in-order block (once per gap).
            self.counters.out_of_order += 1;
            self.resync();
            return;
        }
        let len = payload.len();
        let offset = (self.next - 1).saturating_mul(self.blksize as u64);
        if len > self.blksize {
            self.fail(
                FailureKind::Length,
                format!(
                    "DATA block {} carried {len} bytes, blksize is {}",
                    self.next, self.blksize
                ),
            );
            return;
        }
        let total = self.expected.len() as u64;
        let end = offset + len as u64;
        if end > total {
            self.fail(
                FailureKind::Length,
                format!(
                    "server sent more than the expected {total} bytes (block {}, up to byte {end})",
                    self.next
                ),
            );
            return;
        }
        // `end <= total` and `total` is an in-memory length, so these fit in usize.
        let want = &self.expected[offset as usize..end as usize];
        if want != payload {
            let i = want
                .iter()
                .zip(payload)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            self.fail(
                FailureKind::Mismatch,
                format!(
                    "byte {} (block {}, offset {i}) is 0x{:02x}, expected 0x{:02x}",
                    offset + i as u64,
                    self.next,
                    payload[i],
                    want[i]
                ),
            );
            return;
        }
        if self.first_data.is_none() {
            self.first_data = Some(now.saturating_duration_since(self.started));
        }
        self.counters.blocks += 1;
        self.counters.bytes += len as u64;
        if len < self.blksize {
            // RFC 1350 §6: a short block ends the transfer.
            if end != total {
                self.fail(
                    FailureKind::Length,
                    format!("transfer ended after {end} bytes, expected {total}"),
                );
                return;
            }
            self.queue(Pending::Ack(block));
            self.total = Some(now.saturating_duration_since(self.started));
            self.phase = Phase::Finished;
            self.timer.stop();
            self.outcome = Some(Outcome::Done);
            return;
        }
        self.next += 1;
        self.since_ack += 1;
        self.resynced = false;
        // RFC 7440 §4: ACK once per window (lock-step is a window of 1).
        if self.since_ack >= self.window {
            self.queue(Pending::Ack(block));
            self.since_ack = 0;
        }
        self.progress(now);
    }

    fn resync(&mut self) {
        // Lock-step: every duplicate DATA is ACKed again, as RFC 1350
        // clients (tftp-hpa, iPXE) do; a lost re-ACK then costs the
        // server's RTO, not this client's timeout. In a window, once per gap
        // (no ACK storm).
        if !self.resynced || self.window == 1 {
            self.counters.resync_acks += 1;
            self.queue(Pending::Ack(self.last_in_order()));
            self.resynced = true;
            self.since_ack = 0;
        }
    }

    fn last_in_order(&self) -> u16 {
        (self.next - 1) as u16
    }

    fn progress(&mut self, now: Instant) {
        self.timer.progress(now);
    }

    fn queue(&mut self, p: Pending) {
        if matches!(p, Pending::UnknownTid(_)) && self.pending.len() >= MAX_PENDING {
            return;
        }
        self.pending.push_back(p);
    }

    fn fail(&mut self, kind: FailureKind, detail: String) {
        if self.outcome.is_none() {
            self.outcome = Some(Outcome::Failed(Failure { kind, detail }));
        }
        self.phase = Phase::Finished;
        self.timer.stop();
        // Only ERROR 5 replies may still go out; a failed transfer sends nothing else.
        self.pending.retain(|p| matches!(p, Pending::UnknownTid(_)));
    }
}

/// Most ERROR 5 replies to strangers queued at once: a flood of them must
/// not grow the queue.
pub(crate) const MAX_PENDING_ERRORS: usize = 8;

/// What a datagram is to a transfer with `server` and, once known, `tid`.
pub(crate) enum Arrival<'a> {
    Packet(Packet<'a>),
    /// From another TID (RFC 1350 §4): answer ERROR 5, go on undisturbed.
    Stranger,
    /// From the server but unparseable: why.
    Garbage(String),
}

pub(crate) fn arrival<'a>(
    server: SocketAddr,
    tid: Option<SocketAddr>,
    from: SocketAddr,
    bytes: &'a [u8],
) -> Arrival<'a> {
    let known = match tid {
        Some(tid) => from == tid,
        // RFC 1350 §4: the server picks a new port; the first reply's source becomes the TID.
        None => from.ip() == server.ip(),
    };
    if !known {
        return Arrival::Stranger;
    }
    match wire::parse(bytes) {
        Ok(p) => Arrival::Packet(p),
        Err(e) => Arrival::Garbage(format!("{e} from server ({} bytes)", bytes.len())),
    }
}

/// The retransmission timer of one client transfer (read or upload): its
/// one deadline, the resends since the last progress, and the back-off's
/// jitter.
#[derive(Debug)]
pub(crate) struct Retransmit {
    timeout: Duration,
    backoff: bool,
    retries: u32,
    deadline: Option<Instant>,
    attempt: u32,
    rng: u64,
}

/// What a deadline check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expiry {
    NotDue,
    /// Resend what is outstanding; the timer is armed again.
    Resend,
    /// Out of retries after this many resends.
    GiveUp(u32),
}

impl Retransmit {
    /// Armed from `now`; its jitter is seeded per transfer, so a run is
    /// reproducible with --seed.
    pub(crate) fn new(cfg: &ClientConfig, seed: u64, id: u64, now: Instant) -> Self {
        let mut timer = Retransmit {
            timeout: cfg.timeout,
            backoff: cfg.backoff,
            retries: cfg.retries,
            deadline: None,
            attempt: 0,
            rng: splitmix64(seed ^ id.wrapping_mul(0x9e37_79b9_7f4a_7c15)) | 1,
        };
        timer.arm(now);
        timer
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// The transfer moved on: the count of resends starts again.
    pub(crate) fn progress(&mut self, now: Instant) {
        self.attempt = 0;
        self.arm(now);
    }

    pub(crate) fn stop(&mut self) {
        self.deadline = None;
    }

    pub(crate) fn expire(&mut self, now: Instant) -> Expiry {
        if self.deadline.is_none_or(|d| now < d) {
            return Expiry::NotDue;
        }
        if self.attempt >= self.retries {
            return Expiry::GiveUp(self.attempt);
        }
        self.attempt += 1;
        self.arm(now);
        Expiry::Resend
    }

    fn arm(&mut self, now: Instant) {
        let mut wait = self.timeout;
        if self.backoff {
            wait *= 1u32 << self.attempt.min(3);
            // Up to +25 % jitter so retransmits of a burst of clients do not stay in step.
            let r = (self.next_random() >> 11) as f64 / (1u64 << 53) as f64;
            wait += wait.mul_f64(0.25 * r);
        }
        self.deadline = Some(now + wait);
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: cheap.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Checks an OACK against what was requested; returns what was granted or why it is illegal.
pub fn validate_oack(
    asked: &RequestOptions,
    options: &[u8],
    file_len: u64,
) -> Result<Granted, String> {
    let mut g = Granted {
        oack: true,
        ..Granted::default()
    };
    let mut seen_tsize = false;
    for (name, value) in wire::oack_options(options) {
        let v: u64 = parse_decimal(value)
            .ok_or_else(|| format!("OACK option {name} has a bad value {value:?}"))?;
        let dup = || format!("OACK repeats option {name}");
        // RFC 2347 §2: option names are case-insensitive.
        if name.eq_ignore_ascii_case("blksize") {
            let Some(req) = asked.blksize else {
                return Err("OACK grants blksize, which was not requested".into());
            };
            if g.blksize.is_some() {
                return Err(dup());
            }
            // RFC 2348: the server may lower blksize but not raise it, and not below 8.
            if v < 8 || v > u64::from(req) {
                return Err(format!(
                    "OACK blksize {v}, requested {req} (allowed 8..={req})"
                ));
            }
            g.blksize = Some(v as u16);
        } else if name.eq_ignore_ascii_case("windowsize") {
            let Some(req) = asked.windowsize else {
                return Err("OACK grants windowsize, which was not requested".into());
            };
            if g.windowsize.is_some() {
                return Err(dup());
            }
            // RFC 7440 §3: at most what was requested, at least 1.
            if v < 1 || v > u64::from(req) {
                return Err(format!(
                    "OACK windowsize {v}, requested {req} (allowed 1..={req})"
                ));
            }
            g.windowsize = Some(v as u16);
        } else if name.eq_ignore_ascii_case("tsize") {
            if !asked.tsize {
                return Err("OACK grants tsize, which was not requested".into());
            }
            if seen_tsize {
                return Err(dup());
            }
            seen_tsize = true;
            // RFC 2349: on a read the server answers with the file's size.
            if v != file_len {
                return Err(format!("OACK tsize {v}, but the file has {file_len} bytes"));
            }
            g.tsize = Some(v);
        } else if name.eq_ignore_ascii_case("timeout") {
            let Some(req) = asked.timeout else {
                return Err("OACK grants timeout, which was not requested".into());
            };
            if g.timeout.is_some() {
                return Err(dup());
            }
            // RFC 2349: the server echoes the requested timeout or leaves it out.
            if v != u64::from(req) {
                return Err(format!("OACK timeout {v}, requested {req}"));
            }
            g.timeout = Some(req);
        } else {
            // RFC 2347 §3: the server must not include options the client did not request.
            return Err(format!("OACK contains unrequested option {name:?}"));
        }
    }
    Ok(g)
}

fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || s.len() > 19 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 69);
    const TID: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);
    const STRANGER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40001);

    fn content(len: usize) -> Arc<[u8]> {
        (0..len)
            .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
            .collect()
    }

    fn cfg(blksize: Option<u16>, windowsize: Option<u16>, tsize: bool) -> ClientConfig {
        ClientConfig {
            options: RequestOptions {
                blksize,
                windowsize,
                tsize,
                timeout: None,
            },
            ..ClientConfig::default()
        }
    }

    /// A plain RFC 1350 request: no options.
    fn no_options() -> ClientConfig {
        cfg(None, None, false)
    }

    /// Transfer 1 of "f" expecting `file`. The id only seeds the backoff jitter.
    fn start(file: &Arc<[u8]>, c: ClientConfig, now: Instant) -> Transfer {
        Transfer::new(1, "f".into(), file.clone(), c, SERVER, 7, now)
    }

    /// Starts a transfer, drops its RRQ and feeds it the server's OACK of `pairs`.
    /// The reply to the OACK (ACK 0 or nothing) is left queued for the test to check.
    fn after_oack(
        file: &Arc<[u8]>,
        c: ClientConfig,
        pairs: &[(&str, &str)],
        now: Instant,
    ) -> Transfer {
        let mut t = start(file, c, now);
        drain(&mut t);
        t.handle_datagram(now, TID, &oack(pairs));
        t
    }

    /// Drains transmits as (dest, raw datagram).
    fn drain(t: &mut Transfer) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while let Some(tx) = t.poll_transmit(&mut buf) {
            out.push((tx.dest, buf[..tx.len].to_vec()));
        }
        out
    }

    fn acks(sent: &[(SocketAddr, Vec<u8>)]) -> Vec<u16> {
        sent.iter()
            .filter_map(|(_, b)| match wire::parse(b) {
                Ok(Packet::Ack { block }) => Some(block),
                _ => None,
            })
            .collect()
    }

    fn data(block: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 3];
        v.extend_from_slice(&block.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// DATA block `n` (1-based, wrapping on the wire) of `file` cut into `blksize` pieces.
    fn block(file: &[u8], blksize: usize, n: usize) -> Vec<u8> {
        let lo = (n - 1) * blksize;
        data(n as u16, &file[lo..(lo + blksize).min(file.len())])
    }

    /// Sends blocks `ns` of `file` from the server TID; returns the ACKs sent in reply.
    fn feed(
        t: &mut Transfer,
        file: &[u8],
        blksize: usize,
        ns: impl IntoIterator<Item = usize>,
        now: Instant,
    ) -> Vec<u16> {
        for n in ns {
            t.handle_datagram(now, TID, &block(file, blksize, n));
        }
        acks(&drain(t))
    }

    fn oack(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut v = vec![0, 6];
        for (k, val) in pairs {
            v.extend_from_slice(k.as_bytes());
            v.push(0);
            v.extend_from_slice(val.as_bytes());
            v.push(0);
        }
        v
    }

    /// The failure `t` ended with; panics unless it failed with `kind`.
    #[track_caller]
    fn failure(t: &Transfer, kind: FailureKind) -> &Failure {
        match t.outcome() {
            Some(Outcome::Failed(f)) if f.kind == kind => f,
            o => panic!("expected a {kind:?} failure, got {o:?}"),
        }
    }

    /// A well-behaved lossless server: sends `file` in windows; returns the ACKs the client sent.
    fn serve(t: &mut Transfer, file: &[u8], blksize: usize, window: u16, now: Instant) -> Vec<u16> {
        let mut all_acks = acks(&drain(t));
        let nblocks = file.len() / blksize + 1;
        let mut next = 1usize;
        let mut steps = 0;
        while t.outcome().is_none() && next <= nblocks {
            steps += 1;
            assert!(steps < 10_000_000, "runaway");
            let end = (next + usize::from(window)).min(nblocks + 1);
            all_acks.extend(feed(t, file, blksize, next..end, now));
            next = end;
        }
        all_acks
    }

    fn error(code: u16, message: &str) -> Vec<u8> {
        let mut v = vec![0, 5];
        v.extend_from_slice(&code.to_be_bytes());
        v.extend_from_slice(message.as_bytes());
        v.push(0);
        v
    }

    /// The RRQ file names sent, in order.
    fn rrqs(sent: &[(SocketAddr, Vec<u8>)]) -> Vec<String> {
        sent.iter()
            .filter(|(_, b)| b.starts_with(&[0, 1]))
            .map(|(_, b)| {
                let end = b[2..].iter().position(|&c| c == 0).unwrap();
                String::from_utf8_lossy(&b[2..2 + end]).into_owned()
            })
            .collect()
    }

    #[test]
    fn a_probe_of_a_missing_file_comes_first_then_the_file() {
        let file = content(3000);
        let now = Instant::now();
        let mut t = start(&file, no_options(), now).with_probe("autoexec.ipxe".into());
        assert_eq!(rrqs(&drain(&mut t)), ["autoexec.ipxe"]);
        // Unanswered: the probe is resent, not the file's request.
        t.handle_timeout(now + Duration::from_secs(2));
        assert_eq!(rrqs(&drain(&mut t)), ["autoexec.ipxe"]);
        t.handle_datagram(now, SERVER, &error(1, "File not found"));
        assert_eq!(rrqs(&drain(&mut t)), [t.name().to_string()]);
        // The retransmitted probe's own ERROR 1, late: ignored.
        t.handle_datagram(now, SERVER, &error(1, "File not found"));
        assert!(t.outcome().is_none());
        serve(&mut t, &file, DEFAULT_BLKSIZE, 1, now);
        assert_eq!(t.outcome(), Some(&Outcome::Done));
    }

    #[test]
    fn a_probe_answered_with_data_or_busy_fails() {
        let file = content(100);
        let now = Instant::now();
        let mut t = start(&file, no_options(), now).with_probe("autoexec.ipxe".into());
        drain(&mut t);
        t.handle_datagram(now, TID, &block(&file, DEFAULT_BLKSIZE, 1));
        failure(&t, FailureKind::Protocol);
        let mut t = start(&file, no_options(), now).with_probe("autoexec.ipxe".into());
        drain(&mut t);
        t.handle_datagram(now, SERVER, &error(0, "server busy, try again later"));
        failure(&t, FailureKind::Busy);
    }

    #[test]
    fn strangers_get_error_5_and_a_flood_of_them_queues_a_bounded_number() {
        let file = content(100);
        let now = Instant::now();
        let mut t = start(&file, no_options(), now);
        drain(&mut t);
        for port in 0..20 {
            let stranger = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)), 1000 + port);
            t.handle_datagram(now, stranger, b"\x00\x03\x00\x01x");
        }
        let sent = drain(&mut t);
        assert_eq!(sent.len(), MAX_PENDING_ERRORS);
        assert!(sent.iter().all(|(_, p)| p.starts_with(b"\x00\x05\x00\x05")));
        assert_eq!(t.counters().foreign_tid, 20);
        assert!(t.outcome().is_none(), "the transfer goes on");
    }

    #[test]
    fn lock_step_without_options_all_edge_sizes() {
        for len in [0usize, 1, 511, 512, 513, 1024, 5000] {
            let now = Instant::now();
            let file = content(len);
            let mut t = start(&file, no_options(), now);
            assert_eq!(
                drain(&mut t),
                vec![(SERVER, b"\x00\x01f\0octet\0".to_vec())]
            );
            let acks = serve(&mut t, &file, 512, 1, now);
            assert_eq!(t.outcome(), Some(&Outcome::Done), "len {len}");
            let n = len / 512 + 1;
            assert_eq!(acks, (1..=n as u16).collect::<Vec<_>>(), "len {len}");
            assert_eq!(t.counters().bytes, len as u64);
            assert_eq!(t.counters().blocks, n as u64);
            assert!(!t.granted().oack);
            assert!(t.poll_timeout().is_none());
        }
    }

    #[test]
    fn oack_then_ack0_and_data_at_granted_blksize() {
        let now = Instant::now();
        let file = content(3000);
        // Server lowers blksize to 1024: legal.
        let pairs = [("blksize", "1024"), ("tsize", "3000")];
        let mut t = after_oack(&file, cfg(Some(1468), None, true), &pairs, now);
        assert_eq!(drain(&mut t), vec![(TID, b"\x00\x04\x00\x00".to_vec())]);
        assert_eq!(serve(&mut t, &file, 1024, 1, now), vec![1, 2, 3]);
        assert_eq!(t.outcome(), Some(&Outcome::Done));
        assert_eq!(t.granted().blksize, Some(1024));
        assert_eq!(t.granted().tsize, Some(3000));
    }

    #[test]
    fn server_ignoring_options_means_512_lock_step() {
        let now = Instant::now();
        let file = content(1500);
        let mut t = start(&file, cfg(Some(1468), Some(8), true), now);
        assert_eq!(serve(&mut t, &file, 512, 1, now), vec![1, 2, 3]);
        assert_eq!(t.outcome(), Some(&Outcome::Done));
        // A 1468-byte block would now be too long.
        let mut t = start(&file, cfg(Some(1468), None, false), now);
        t.handle_datagram(now, TID, &data(1, &file[..1468]));
        failure(&t, FailureKind::Length);
    }

    #[test]
    fn windowed_acks_every_window_and_the_last() {
        let now = Instant::now();
        let file = content(512 * 10 + 100);
        let pairs = [("blksize", "512"), ("windowsize", "4")];
        let mut t = after_oack(&file, cfg(Some(512), Some(4), false), &pairs, now);
        assert_eq!(serve(&mut t, &file, 512, 4, now), vec![0, 4, 8, 11]);
        assert_eq!(t.outcome(), Some(&Outcome::Done));
    }

    #[test]
    fn windowed_gap_acks_last_in_order_once() {
        let now = Instant::now();
        let file = content(512 * 8 + 10);
        let pairs = [("blksize", "512"), ("windowsize", "4")];
        let mut t = after_oack(&file, cfg(Some(512), Some(4), false), &pairs, now);
        drain(&mut t);
        // Block 2 is lost; 3 and 4 arrive out of order.
        assert_eq!(feed(&mut t, &file, 512, [1, 3, 4], now), vec![1]);
        assert_eq!(t.counters().out_of_order, 2);
        // Server restarts the window at 2.
        assert_eq!(feed(&mut t, &file, 512, 2..=5, now), vec![5]);
        assert_eq!(feed(&mut t, &file, 512, 6..=9, now), vec![9]);
        assert_eq!(t.outcome(), Some(&Outcome::Done));
    }

    #[test]
    fn block_numbers_roll_over_to_zero() {
        let now = Instant::now();
        // 70,000 blocks of 8 bytes: past 65535 and back through 0.
        let file = content(8 * 70_000 + 3);
        let len = file.len().to_string();
        let pairs = [("blksize", "8"), ("tsize", len.as_str())];
        let mut t = after_oack(&file, cfg(Some(8), None, true), &pairs, now);
        let acks = serve(&mut t, &file, 8, 1, now);
        assert_eq!(t.outcome(), Some(&Outcome::Done));
        assert_eq!(acks.len(), 70_002);
        assert_eq!(acks[65_535..65_538], [65_535, 0, 1]);
        assert_eq!(t.counters().bytes, file.len() as u64);
    }

    #[test]
    fn duplicate_data_in_lock_step_is_reacked() {
        let now = Instant::now();
        let file = content(1500);
        let mut t = start(&file, no_options(), now);
        drain(&mut t);
        assert_eq!(feed(&mut t, &file, 512, [1], now), vec![1]);
        assert_eq!(feed(&mut t, &file, 512, [1], now), vec![1]);
        // Every duplicate is ACKed again in lock-step (RFC 1350 clients do;
        // the server never answers a duplicate ACK, so no storm follows).
        t.handle_datagram(now, TID, &block(&file, 512, 1));
        assert_eq!(drain(&mut t).len(), 1);
        assert_eq!(t.outcome(), None);
    }

    #[test]
    fn mismatch_names_the_byte() {
        let now = Instant::now();
        let file = content(1000);
        let mut t = start(&file, no_options(), now);
        t.handle_datagram(now, TID, &data(1, &file[..512]));
        let mut bad = file[512..].to_vec();
        bad[17] ^= 0xff;
        t.handle_datagram(now, TID, &data(2, &bad));
        let f = failure(&t, FailureKind::Mismatch);
        assert!(f.detail.contains("byte 529"), "{}", f.detail);
    }

    #[test]
    fn length_errors() {
        let now = Instant::now();
        let file = content(600);
        // Ends early: a short block at 100 bytes.
        let mut t = start(&file, no_options(), now);
        t.handle_datagram(now, TID, &data(1, &file[..100]));
        failure(&t, FailureKind::Length);
        // Too much: the file is exactly 512 bytes but the server sends a full second block.
        let file = content(512);
        let mut t = start(&file, no_options(), now);
        t.handle_datagram(now, TID, &data(1, &file));
        t.handle_datagram(now, TID, &data(2, &[0u8; 10]));
        failure(&t, FailureKind::Length);
    }

    #[test]
    fn bad_oacks_fail() {
        let cases: &[(ClientConfig, Vec<u8>)] = &[
            (cfg(Some(1024), None, false), oack(&[("blksize", "2048")])),
            (cfg(Some(1024), None, false), oack(&[("blksize", "4")])),
            (cfg(Some(1024), None, true), oack(&[("tsize", "99")])),
            (cfg(Some(1024), None, false), oack(&[("tsize", "600")])),
            (
                cfg(Some(1024), None, false),
                oack(&[("blksize", "512"), ("BLKSIZE", "512")]),
            ),
            (
                cfg(Some(1024), Some(4), false),
                oack(&[("windowsize", "8")]),
            ),
            (cfg(Some(1024), None, false), oack(&[("foo", "1")])),
            (cfg(Some(1024), None, false), oack(&[("blksize", "x")])),
            (no_options(), oack(&[])),
        ];
        for (c, pkt) in cases {
            let now = Instant::now();
            let mut t = start(&content(600), *c, now);
            t.handle_datagram(now, TID, pkt);
            assert!(
                matches!(t.outcome(), Some(Outcome::Failed(f)) if f.kind == FailureKind::BadOack),
                "{pkt:?} gave {:?}",
                t.outcome()
            );
            // A failed transfer sends nothing more.
            assert!(drain(&mut t).is_empty());
        }
    }

    #[test]
    fn good_oack_variants() {
        let g = validate_oack(
            &RequestOptions {
                blksize: Some(1468),
                windowsize: Some(16),
                tsize: true,
                timeout: Some(2),
            },
            &oack(&[
                ("BlkSize", "1400"),
                ("windowsize", "8"),
                ("tsize", "600"),
                ("timeout", "2"),
            ])[2..],
            600,
        )
        .unwrap();
        assert_eq!(
            g,
            Granted {
                oack: true,
                blksize: Some(1400),
                windowsize: Some(8),
                tsize: Some(600),
                timeout: Some(2)
            }
        );
        // Options left out are simply not granted.
        let g = validate_oack(
            &RequestOptions {
                blksize: Some(1468),
                windowsize: Some(16),
                tsize: true,
                timeout: None,
            },
            &oack(&[("blksize", "1468")])[2..],
            600,
        )
        .unwrap();
        assert_eq!(g.windowsize, None);
        assert_eq!(g.tsize, None);
    }

    #[test]
    fn foreign_tid_gets_error5_and_transfer_continues() {
        let now = Instant::now();
        let file = content(700);
        let mut t = start(&file, no_options(), now);
        drain(&mut t);
        feed(&mut t, &file, 512, [1], now);
        t.handle_datagram(now, STRANGER, &block(&file, 512, 2));
        let sent = drain(&mut t);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, STRANGER);
        assert!(matches!(
            wire::parse(&sent[0].1),
            Ok(Packet::Error { code: 5, .. })
        ));
        assert_eq!(t.outcome(), None);
        t.handle_datagram(now, TID, &block(&file, 512, 2));
        assert_eq!(t.outcome(), Some(&Outcome::Done));
        assert_eq!(t.counters().foreign_tid, 1);
        // Before the TID is known, only the server's address may answer.
        let other_ip: SocketAddr = "127.0.0.2:69".parse().unwrap();
        let mut t = start(&file, no_options(), now);
        drain(&mut t);
        t.handle_datagram(now, other_ip, &data(1, &[0u8; 512]));
        assert_eq!(drain(&mut t)[0].0, other_ip);
        assert_eq!(t.outcome(), None);
    }

    #[test]
    fn server_error_fails_with_message() {
        let now = Instant::now();
        let mut t = start(&content(10), no_options(), now);
        t.handle_datagram(now, TID, b"\x00\x05\x00\x01File not found\0");
        let f = failure(&t, FailureKind::ServerError);
        assert!(f.detail.contains("ERROR 1: File not found"));
    }

    #[test]
    fn fixed_timeout_retransmits_then_fails() {
        let t0 = Instant::now();
        let c = ClientConfig {
            retries: 3,
            ..no_options()
        };
        let mut t = start(&content(10), c, t0);
        drain(&mut t);
        // A spurious early call does nothing.
        t.handle_timeout(t0 + Duration::from_millis(500));
        assert!(drain(&mut t).is_empty());
        let mut now = t0;
        for i in 1..=3 {
            now = t.poll_timeout().unwrap();
            assert_eq!(now - t0, Duration::from_secs(i));
            t.handle_timeout(now);
            let sent = drain(&mut t);
            assert_eq!(sent.len(), 1);
            assert_eq!(sent[0].0, SERVER, "RRQ is resent to the server port");
        }
        t.handle_timeout(t.poll_timeout().unwrap());
        failure(&t, FailureKind::Timeout);
        assert_eq!(t.counters().retransmits, 3);
        assert!(now > t0);
    }

    #[test]
    fn backoff_doubles_with_bounded_jitter_and_resets_on_progress() {
        let t0 = Instant::now();
        let c = ClientConfig {
            retries: 6,
            backoff: true,
            ..no_options()
        };
        let file = content(2000);
        let mut t = start(&file, c, t0);
        drain(&mut t);
        let mut prev = t0;
        let mut gaps = Vec::new();
        for _ in 0..5 {
            let d = t.poll_timeout().unwrap();
            gaps.push(d - prev);
            prev = d;
            t.handle_timeout(d);
            drain(&mut t);
        }
        for (g, base) in gaps.iter().zip([1u64, 2, 4, 8, 8]) {
            let base = Duration::from_secs(base);
            assert!(
                *g >= base && *g <= base + base / 4,
                "gap {g:?} base {base:?}"
            );
        }
        // Progress resets the backoff and the retry budget; the next timeout re-ACKs block 1.
        feed(&mut t, &file, 512, [1], prev);
        let d = t.poll_timeout().unwrap();
        assert!(d - prev <= Duration::from_millis(1250));
        t.handle_timeout(d);
        assert_eq!(acks(&drain(&mut t)), vec![1]);
    }

    #[test]
    fn lost_ack0_is_resent_on_duplicate_oack() {
        let now = Instant::now();
        let file = content(100);
        let pairs = [("blksize", "1024")];
        let mut t = after_oack(&file, cfg(Some(1024), None, false), &pairs, now);
        assert_eq!(acks(&drain(&mut t)), vec![0]);
        t.handle_datagram(now, TID, &oack(&pairs));
        assert_eq!(acks(&drain(&mut t)), vec![0]);
        t.handle_datagram(now, TID, &data(1, &file));
        assert_eq!(t.outcome(), Some(&Outcome::Done));
    }
}
