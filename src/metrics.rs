//! `--metrics ADDR`: Prometheus text format on `/metrics`, `/healthz` and
//! `/readyz`, served by a thread of its own, never by a shard.
//!
//! The contract with the shards: each keeps a [`Tally`] of plain `u64`s
//! (no atomics, no lock on the hot path) and copies it into its
//! [`Published`] atomics with relaxed stores once per loop turn
//! ([`Published::publish`]): the counters that move per packet every turn,
//! the rest (requests, refusals, finished transfers, the histograms) when
//! one of them moved this turn or every [`COLD_EVERY`]. A scrape loads every shard's atomics and sums them
//! ([`Snapshot`]); it never waits for a shard and a shard never waits for
//! it. Every label set is bounded (kinds, reasons, directions, outcomes,
//! ERROR codes, shard indexes): no file names, no client addresses.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::proto::ErrorCode;
use crate::refusal::RefusalKind;
use crate::session::{Outcome, Stats};

/// How stale the rarely moving counters may get on a quiet shard.
pub const COLD_EVERY: Duration = Duration::from_millis(100);

/// A fixed-bucket histogram by direction, kept in a [`Tally`]'s slots
/// from `base`: per direction the bucket counts (not cumulative, +Inf
/// last), then the sum in units of `1 / scale`.
#[derive(Debug)]
struct Histogram {
    name: &'static str,
    help: &'static str,
    /// Upper bounds of the buckets; +Inf follows.
    bounds: &'static [f64],
    /// The sum's unit per observed unit (1e6: microseconds of seconds).
    scale: f64,
    base: usize,
}

impl Histogram {
    /// Slots one histogram takes: buckets, +Inf and the sum, per direction.
    const fn slots(bounds: &[f64]) -> usize {
        2 * (bounds.len() + 2)
    }

    fn start(&self, direction: Direction) -> usize {
        self.base + direction as usize * (self.bounds.len() + 2)
    }

    /// Where an observation of `value` goes: its bucket's slot, the
    /// sum's slot and what to add to the sum.
    fn locate(&self, direction: Direction, value: f64) -> (usize, usize, u64) {
        let start = self.start(direction);
        let bucket = self
            .bounds
            .iter()
            .position(|&le| value <= le)
            .unwrap_or(self.bounds.len());
        // `as` saturates: a huge or NaN value cannot wrap the sum.
        let add = (value * self.scale) as u64;
        (start + bucket, start + self.bounds.len() + 1, add)
    }

    fn observe(&self, v: &mut [u64], direction: Direction, value: f64) {
        let (bucket, sum, add) = self.locate(direction, value);
        v[bucket] += 1;
        v[sum] = v[sum].saturating_add(add);
    }

    /// The buckets with their bounds (not cumulative), the count and the
    /// sum, as the encoder takes them.
    fn read(&self, v: &[u64], direction: Direction) -> (Vec<(f64, u64)>, u64, f64) {
        let start = self.start(direction);
        let counts = &v[start..start + self.bounds.len() + 1];
        let buckets = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(counts.iter().copied())
            .collect();
        let sum = v[start + self.bounds.len() + 1] as f64 / self.scale;
        (buckets, counts.iter().sum(), sum)
    }
}

/// Upper bounds (seconds) of the transfer-duration buckets.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Upper bounds (seconds) of the smoothed-RTT buckets.
pub const SRTT_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Upper bounds (bytes per second) of the throughput buckets.
pub const THROUGHPUT_BUCKETS: [f64; 12] = [
    1e4, 1e5, 5e5, 1e6, 5e6, 1e7, 2.5e7, 5e7, 1e8, 2.5e8, 5e8, 1e9,
];

const DURATION: Histogram = Histogram {
    name: "ringtftpd_transfer_duration_seconds",
    help: "Time from request to end of finished transfers, by direction",
    bounds: &DURATION_BUCKETS,
    scale: 1e6,
    base: slot::DURATION,
};
const SRTT: Histogram = Histogram {
    name: "ringtftpd_transfer_srtt_seconds",
    help: "Smoothed round-trip time of finished transfers when they ended (those with an RTT sample), by direction",
    bounds: &SRTT_BUCKETS,
    scale: 1e9,
    base: slot::SRTT,
};
const FIRST_DATA: Histogram = Histogram {
    name: "ringtftpd_time_to_first_data_seconds",
    help: "Time from a download's request to its DATA 1 queued for sending (an OACK's round trip included), by direction (downloads only)",
    bounds: &SRTT_BUCKETS,
    scale: 1e9,
    base: slot::FIRST_DATA,
};
const THROUGHPUT: Histogram = Histogram {
    name: "ringtftpd_transfer_throughput_bytes_per_second",
    help: "Payload bytes per second of completed transfers, from request to end, by direction",
    bounds: &THROUGHPUT_BUCKETS,
    scale: 1.0,
    base: slot::THROUGHPUT,
};

/// What a datagram at a listener asked for, by its opcode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    Rrq,
    Wrq,
    /// Neither (garbage, a stray ACK): refused as malformed or ignored.
    Other,
}

impl RequestKind {
    pub const ALL: [RequestKind; 3] = [RequestKind::Rrq, RequestKind::Wrq, RequestKind::Other];

    /// The kind of `datagram` by its first two bytes.
    pub fn of(datagram: &[u8]) -> Self {
        match datagram.get(..2) {
            Some([0, 1]) => RequestKind::Rrq,
            Some([0, 2]) => RequestKind::Wrq,
            _ => RequestKind::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Rrq => "rrq",
            RequestKind::Wrq => "wrq",
            RequestKind::Other => "other",
        }
    }
}

/// What became of a request taken at a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// A transfer began (its socket was ready).
    Started,
    /// Refused, answered or not (every `ringtftpd_refusals_total` reason).
    Refused,
    /// Dropped without a refusal: a retransmitted request whose transfer
    /// already runs, an ERROR sent to the listening port.
    Ignored,
}

impl Admission {
    pub const ALL: [Admission; 3] = [Admission::Started, Admission::Refused, Admission::Ignored];

    pub fn as_str(self) -> &'static str {
        match self {
            Admission::Started => "started",
            Admission::Refused => "refused",
            Admission::Ignored => "ignored",
        }
    }

    /// What the endpoint's answer to a request was, `refused` telling a
    /// silent refusal (rate-limited, its reply suppressed) from a plain
    /// drop: whether a refusal was counted meanwhile (see
    /// [`refusals_so_far`]). None for a start: counted once its socket is
    /// ready ([`Tally::started`]) or it is refused busy
    /// ([`Tally::start_refused`]).
    pub fn of(outcome: &crate::endpoint::RequestOutcome, refused: bool) -> Option<Self> {
        use crate::endpoint::RequestOutcome;
        match outcome {
            RequestOutcome::Started(_) => None,
            RequestOutcome::Reply(_) => Some(Admission::Refused),
            RequestOutcome::Ignored if refused => Some(Admission::Refused),
            RequestOutcome::Ignored => Some(Admission::Ignored),
        }
    }
}

/// Every refusal the endpoint counted so far: compared around a request
/// to tell whether it was refused.
pub fn refusals_so_far(refusals: &crate::endpoint::RefusalCounts) -> u64 {
    refusals.by_reason.iter().sum()
}

/// Which way a transfer's file goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A read request: the server sends DATA.
    Download,
    /// A write request: the server receives DATA.
    Upload,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Download, Direction::Upload];

    pub fn of(write: bool) -> Self {
        if write {
            Direction::Upload
        } else {
            Direction::Download
        }
    }

    /// The request that starts a transfer this way.
    pub fn request_kind(self) -> RequestKind {
        match self {
            Direction::Download => RequestKind::Rrq,
            Direction::Upload => RequestKind::Wrq,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Download => "download",
            Direction::Upload => "upload",
        }
    }
}

/// The counted kinds of a transfer's [`Outcome`].
const OUTCOMES: [&str; 5] = [
    "completed",
    "options_declined",
    "client_error",
    "timed_out",
    "aborted",
];

fn outcome_index(outcome: &Outcome) -> usize {
    match outcome {
        Outcome::Completed => 0,
        Outcome::OptionsDeclined => 1,
        Outcome::PeerError(_) => 2,
        Outcome::TimedOut => 3,
        Outcome::Aborted(_) => 4,
    }
}

/// ERROR codes counted one by one (0..=8, RFC 1350 and RFC 2347), then
/// "other".
const CODES: usize = 10;

fn code_index(code: ErrorCode) -> usize {
    usize::from(code.to_u16()).min(CODES - 1)
}

fn code_label(index: usize) -> &'static str {
    ["0", "1", "2", "3", "4", "5", "6", "7", "8", "other"][index.min(CODES - 1)]
}

/// Where each counter lives in a [`Tally`]: the per-packet ones first
/// (published every turn), then the rest.
mod slot {
    use super::{
        CODES, DURATION_BUCKETS, Histogram, OUTCOMES, RefusalKind, SRTT_BUCKETS, THROUGHPUT_BUCKETS,
    };

    pub const DATAGRAMS_IN: usize = 0;
    pub const SEND_ERRORS: usize = 1;
    pub const GSO_FALLBACKS: usize = 2;
    pub const LOG_DROPPED: usize = 3;
    pub const TIMEOUTS: usize = 4;
    pub const BLOCKS_SENT: usize = 5;
    pub const BYTES_SENT: usize = 6;
    pub const BLOCKS_RECEIVED: usize = 7;
    pub const BYTES_RECEIVED: usize = 8;
    /// By direction.
    pub const LIVE: usize = 9;
    pub const POOLED: usize = LIVE + 2;
    /// End of the per-packet slots.
    pub const HOT: usize = POOLED + 1;

    /// By [`super::RequestKind`], then [`super::Admission`].
    pub const REQUESTS: usize = HOT;
    pub const REFUSALS: usize = REQUESTS + 3 * 3;
    pub const REPLIES_SUPPRESSED: usize = REFUSALS + RefusalKind::ALL.len();
    pub const BUSY_DEFERRED: usize = REPLIES_SUPPRESSED + 1;
    /// By direction.
    pub const STARTED: usize = BUSY_DEFERRED + 1;
    /// By direction, then outcome.
    pub const FINISHED: usize = STARTED + 2;
    pub const RETRANSMITS: usize = FINISHED + 2 * OUTCOMES.len();
    pub const ERRORS_SENT: usize = RETRANSMITS + 1;
    pub const ERRORS_RECEIVED: usize = ERRORS_SENT + CODES;
    /// The histograms (see `Histogram`).
    pub const DURATION: usize = ERRORS_RECEIVED + CODES;
    pub const SRTT: usize = DURATION + Histogram::slots(&DURATION_BUCKETS);
    pub const THROUGHPUT: usize = SRTT + Histogram::slots(&SRTT_BUCKETS);
    pub const FIRST_DATA: usize = THROUGHPUT + Histogram::slots(&THROUGHPUT_BUCKETS);
    pub const OPEN_CACHE_FILES: usize = FIRST_DATA + Histogram::slots(&SRTT_BUCKETS);
    pub const OPEN_CACHE_BYTES: usize = OPEN_CACHE_FILES + 1;
    pub const COUNT: usize = OPEN_CACHE_BYTES + 1;
}

/// One shard's counters, plain `u64`s bumped on the shard thread (or a
/// sum of several shards', for a scrape).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    v: [u64; slot::COUNT],
    /// A rarely moving counter moved since the last publish.
    cold_moved: bool,
    /// When the rarely moving counters are next published anyway.
    next_cold: Option<Instant>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            v: [0; slot::COUNT],
            cold_moved: false,
            next_cold: None,
        }
    }
}

impl std::fmt::Debug for Tally {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tally")
            .field("requests", &&self.v[slot::REQUESTS..slot::REFUSALS])
            .field("bytes_sent", &self.v[slot::BYTES_SENT])
            .field("bytes_received", &self.v[slot::BYTES_RECEIVED])
            .finish_non_exhaustive()
    }
}

impl Tally {
    /// A datagram at a listener, taken as a request of `kind`, and what
    /// became of it.
    pub fn request(&mut self, kind: RequestKind, admission: Admission) {
        self.v[slot::REQUESTS + kind as usize * 3 + admission as usize] += 1;
        self.cold_moved = true;
    }

    /// A transfer began (its socket is ready): its request counts as
    /// started.
    pub fn started(&mut self, direction: Direction) {
        self.request(direction.request_kind(), Admission::Started);
        self.v[slot::STARTED + direction as usize] += 1;
        self.v[slot::LIVE + direction as usize] += 1;
        self.cold_moved = true;
    }

    /// A transfer ended (`stats.ended`, or `now` when it was removed
    /// before its end).
    pub fn finished(
        &mut self,
        direction: Direction,
        outcome: &Outcome,
        stats: &Stats,
        now: Instant,
    ) {
        let d = direction as usize;
        self.v[slot::LIVE + d] = self.v[slot::LIVE + d].saturating_sub(1);
        self.v[slot::FINISHED + d * OUTCOMES.len() + outcome_index(outcome)] += 1;
        self.v[slot::RETRANSMITS] += stats.retransmits;
        match *outcome {
            Outcome::PeerError(code) => self.v[slot::ERRORS_RECEIVED + code_index(code)] += 1,
            // The client's ERROR 8 to our OACK.
            Outcome::OptionsDeclined => {
                self.v[slot::ERRORS_RECEIVED + code_index(ErrorCode::OptionRefused)] += 1
            }
            _ => {}
        }
        let took = stats
            .ended
            .unwrap_or(now)
            .saturating_duration_since(stats.started)
            .as_secs_f64();
        DURATION.observe(&mut self.v, direction, took);
        if let Some(srtt) = stats.srtt {
            SRTT.observe(&mut self.v, direction, srtt.as_secs_f64());
        }
        if *outcome == Outcome::Completed && took > 0.0 {
            THROUGHPUT.observe(&mut self.v, direction, stats.bytes_acked as f64 / took);
        }
        self.cold_moved = true;
    }

    /// An admitted request found no transfer socket and was refused busy.
    pub fn start_refused(&mut self, direction: Direction) {
        self.request(direction.request_kind(), Admission::Refused);
    }

    /// A download's DATA 1 was queued `waited` after its request.
    pub fn first_data(&mut self, waited: Duration) {
        FIRST_DATA.observe(&mut self.v, Direction::Download, waited.as_secs_f64());
        self.cold_moved = true;
    }

    /// An ERROR with `code` queued for sending (a refusal, an abort).
    pub fn error_sent(&mut self, code: ErrorCode) {
        self.v[slot::ERRORS_SENT + code_index(code)] += 1;
        self.cold_moved = true;
    }

    /// An ERROR reply in `datagram` (by its header) queued for sending.
    pub fn reply_sent(&mut self, datagram: &[u8]) {
        if let Some(&[0, 5, hi, lo]) = datagram.get(..4) {
            self.error_sent(ErrorCode::from_u16(u16::from_be_bytes([hi, lo])));
        }
    }

    /// A datagram at a listener that belongs to no session, once the
    /// endpoint answered it (see [`Admission::of`]): counted by its
    /// opcode and admission (a start later, by [`Tally::started`]), and by
    /// its code if it is an ERROR (a client giving up on a refused
    /// request; the endpoint ignores those).
    pub fn listener_datagram(&mut self, datagram: &[u8], admission: Option<Admission>) {
        if let Some(admission) = admission {
            self.request(RequestKind::of(datagram), admission);
        }
        if let Some(&[0, 5, hi, lo]) = datagram.get(..4) {
            let code = ErrorCode::from_u16(u16::from_be_bytes([hi, lo]));
            self.v[slot::ERRORS_RECEIVED + code_index(code)] += 1;
        }
    }

    /// A DATA block of `bytes` payload queued for sending (a
    /// retransmission too).
    pub fn data_sent(&mut self, bytes: usize) {
        self.v[slot::BLOCKS_SENT] += 1;
        self.v[slot::BYTES_SENT] += bytes as u64;
    }

    /// An upload's DATA block of `bytes` payload accepted.
    pub fn data_received(&mut self, bytes: usize) {
        self.v[slot::BLOCKS_RECEIVED] += 1;
        self.v[slot::BYTES_RECEIVED] += bytes as u64;
    }

    /// A session's retransmission timer fired.
    pub fn timeout(&mut self) {
        self.v[slot::TIMEOUTS] += 1;
    }

    /// Counters the shard keeps elsewhere, copied in before a publish.
    pub fn set_driver(
        &mut self,
        datagrams_in: u64,
        send_errors: u64,
        gso_fallbacks: u64,
        log_dropped: u64,
        pooled: usize,
    ) {
        self.v[slot::DATAGRAMS_IN] = datagrams_in;
        self.v[slot::SEND_ERRORS] = send_errors;
        self.v[slot::GSO_FALLBACKS] = gso_fallbacks;
        self.v[slot::LOG_DROPPED] = log_dropped;
        self.v[slot::POOLED] = pooled as u64;
    }

    /// The endpoint's refusal counts and open cache, copied in before a
    /// cold publish.
    pub fn set_endpoint(
        &mut self,
        refusals: &crate::endpoint::RefusalCounts,
        open_cache: (usize, u64),
    ) {
        self.v[slot::REFUSALS..slot::REFUSALS + RefusalKind::ALL.len()]
            .copy_from_slice(&refusals.by_reason);
        self.v[slot::REPLIES_SUPPRESSED] = refusals.replies_suppressed;
        self.v[slot::BUSY_DEFERRED] = refusals.busy_deferred;
        self.v[slot::OPEN_CACHE_FILES] = open_cache.0 as u64;
        self.v[slot::OPEN_CACHE_BYTES] = open_cache.1;
    }

    /// Whether the rarely moving counters are due by `now` (then next
    /// due `COLD_EVERY` later).
    pub fn cold_due(&mut self, now: Instant) -> bool {
        if self.next_cold.is_some_and(|due| now < due) {
            return false;
        }
        self.next_cold = Some(now + COLD_EVERY);
        true
    }

    /// Whether a rarely moving counter moved since the last publish.
    pub fn cold_moved(&self) -> bool {
        self.cold_moved
    }

    /// Adds `other` in, slot by slot (a scrape's sum over the shards).
    pub fn add(&mut self, other: &Tally) {
        for (a, b) in self.v.iter_mut().zip(other.v.iter()) {
            *a = a.saturating_add(*b);
        }
    }

    /// Requests of `kind`, whatever became of them.
    pub fn requests(&self, kind: RequestKind) -> u64 {
        Admission::ALL.iter().map(|&a| self.admitted(kind, a)).sum()
    }

    pub fn admitted(&self, kind: RequestKind, admission: Admission) -> u64 {
        self.v[slot::REQUESTS + kind as usize * 3 + admission as usize]
    }

    pub fn refusals(&self, kind: RefusalKind) -> u64 {
        self.v[slot::REFUSALS + kind as usize]
    }

    pub fn live(&self, direction: Direction) -> u64 {
        self.v[slot::LIVE + direction as usize]
    }

    pub fn bytes_sent(&self) -> u64 {
        self.v[slot::BYTES_SENT]
    }

    pub fn bytes_received(&self) -> u64 {
        self.v[slot::BYTES_RECEIVED]
    }

    fn finished_count(&self, direction: Direction, outcome: usize) -> u64 {
        self.v[slot::FINISHED + direction as usize * OUTCOMES.len() + outcome]
    }

    /// Transfers of `direction` that ended `Completed`.
    pub fn completed(&self, direction: Direction) -> u64 {
        self.finished_count(direction, 0)
    }
}

/// `--metrics-file-labels N`: finished transfers counted by file, for
/// the first `N` normalised names ([`normalise_file`]) to finish one; the
/// rest go to `file="other"`. Names are taken for the life of the process,
/// so every series only grows. Shared by every shard: a transfer's end
/// costs a scan of at most `N` names and a few relaxed atomic adds (never
/// anything per packet); the lock below is taken only to add a name, so
/// at most `N` times.
#[derive(Debug)]
pub struct FileLabels {
    names: Box<[std::sync::OnceLock<Box<str>>]>,
    /// Names set so far (each `names[i]` below it is set).
    taken: std::sync::atomic::AtomicUsize,
    adding: std::sync::Mutex<()>,
    /// Per name, then `other`: a row of [`file_slot`] counters.
    counts: Box<[AtomicU64]>,
}

/// Where each counter lives in a [`FileLabels`] row.
mod file_slot {
    use super::{DURATION_BUCKETS, Histogram, OUTCOMES};

    /// By direction, then outcome.
    pub const FINISHED: usize = 0;
    /// Payload bytes of finished transfers, by direction.
    pub const BYTES: usize = FINISHED + 2 * OUTCOMES.len();
    pub const DURATION: usize = BYTES + 2;
    pub const ROW: usize = DURATION + Histogram::slots(&DURATION_BUCKETS);
}

const FILE_DURATION: Histogram = Histogram {
    name: "ringtftpd_file_transfer_duration_seconds",
    help: "Time from request to end of finished transfers, by normalised file name (--metrics-file-labels) and direction",
    bounds: &DURATION_BUCKETS,
    scale: 1e6,
    base: file_slot::DURATION,
};

/// The label for a transfer's file: the name as asked (escaped, as in
/// the log), with backslashes as slashes, no leading or doubled slashes,
/// and a component that is a MAC address (pxelinux's `01-aa-bb-cc-dd-ee-ff`,
/// `aa:bb:..`) or a UUID written as `<mac>` or `<uuid>`, so one name per
/// machine does not take a label each.
pub fn normalise_file(escaped: &str) -> String {
    let slashed = escaped.replace("\\\\", "/");
    let parts: Vec<&str> = slashed
        .split('/')
        .filter(|c| !c.is_empty())
        .map(|c| {
            if is_mac(c) {
                "<mac>"
            } else if is_uuid(c) {
                "<uuid>"
            } else {
                c
            }
        })
        .collect();
    let name = parts.join("/");
    // A file named `other` must not pass for the overflow.
    if name == "other" {
        return "/other".to_string();
    }
    name
}

/// Hex digit groups of `lens`, separated by `sep`.
fn hex_groups(s: &str, sep: char, lens: &[usize]) -> bool {
    let groups: Vec<&str> = s.split(sep).collect();
    groups.len() == lens.len()
        && groups
            .iter()
            .zip(lens)
            .all(|(g, &n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn is_mac(c: &str) -> bool {
    let c = c.strip_prefix("01-").filter(|r| r.len() == 17).unwrap_or(c);
    hex_groups(c, '-', &[2; 6]) || hex_groups(c, ':', &[2; 6])
}

fn is_uuid(c: &str) -> bool {
    hex_groups(c, '-', &[8, 4, 4, 4, 12])
}

impl FileLabels {
    /// Most names one may ask for.
    pub const MAX: usize = 256;

    /// A table for `n` names (at most [`FileLabels::MAX`]).
    pub fn new(n: usize) -> Self {
        let n = n.min(Self::MAX);
        FileLabels {
            names: (0..n).map(|_| std::sync::OnceLock::new()).collect(),
            taken: Default::default(),
            adding: Default::default(),
            counts: (0..(n + 1) * file_slot::ROW)
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn taken(&self) -> usize {
        self.taken.load(Ordering::Acquire).min(self.names.len())
    }

    fn find(&self, name: &str, taken: usize) -> Option<usize> {
        self.names[..taken]
            .iter()
            .position(|n| n.get().is_some_and(|n| **n == *name))
    }

    /// The row of `name` (already normalised): its own, a new one while
    /// there is room, else `other`'s.
    fn row(&self, name: &str) -> usize {
        let other = self.names.len();
        let taken = self.taken();
        if let Some(i) = self.find(name, taken) {
            return i;
        }
        if taken == other {
            return other;
        }
        // A poisoned lock guards nothing broken (the names are set once).
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        let taken = self.taken();
        if let Some(i) = self.find(name, taken) {
            return i;
        }
        if taken == other || self.names[taken].set(name.into()).is_err() {
            return other;
        }
        self.taken.store(taken + 1, Ordering::Release);
        taken
    }

    /// A finished transfer of the file asked as `filename` (escaped).
    pub fn finished(
        &self,
        filename: &str,
        direction: Direction,
        outcome: &Outcome,
        stats: &Stats,
        now: Instant,
    ) {
        let base = self.row(&normalise_file(filename)) * file_slot::ROW;
        let add = |slot: usize, n: u64| {
            self.counts[base + slot].fetch_add(n, Ordering::Relaxed);
        };
        let d = direction as usize;
        add(
            file_slot::FINISHED + d * OUTCOMES.len() + outcome_index(outcome),
            1,
        );
        add(file_slot::BYTES + d, stats.bytes_acked);
        let took = stats
            .ended
            .unwrap_or(now)
            .saturating_duration_since(stats.started)
            .as_secs_f64();
        let (bucket, sum, micros) = FILE_DURATION.locate(direction, took);
        add(bucket, 1);
        add(sum, micros);
    }

    /// Each taken name's counters, then `other`'s.
    fn read(&self) -> Vec<(String, Vec<u64>)> {
        let taken = self.taken();
        let names = self.names[..taken]
            .iter()
            .map(|n| n.get().map_or_else(String::new, |n| n.to_string()))
            .chain(["other".to_string()]);
        names
            .enumerate()
            .map(|(i, name)| {
                let row = if i == taken { self.names.len() } else { i };
                let counts = self.counts[row * file_slot::ROW..(row + 1) * file_slot::ROW]
                    .iter()
                    .map(|a| a.load(Ordering::Relaxed))
                    .collect();
                (name, counts)
            })
            .collect()
    }
}

/// One shard's published counters: written by the shard only, read by
/// scrapes.
#[derive(Debug)]
pub struct Published {
    v: Box<[AtomicU64]>,
    /// The shard is running and taking requests (cleared on drain and exit).
    serving: AtomicBool,
    /// Its live transfers, for `/transfers` (`ringtftpd top`).
    pub transfers: crate::top::live::Board,
}

impl Default for Published {
    fn default() -> Self {
        Published {
            v: (0..slot::COUNT).map(|_| AtomicU64::new(0)).collect(),
            serving: AtomicBool::new(false),
            transfers: Default::default(),
        }
    }
}

impl Published {
    /// Copies `tally` out: its per-packet counters, and the rest too when
    /// `cold` (or when one of them moved). Relaxed stores, once a turn.
    pub fn publish(&self, tally: &mut Tally, cold: bool) {
        let end = if cold || tally.cold_moved {
            tally.cold_moved = false;
            slot::COUNT
        } else {
            slot::HOT
        };
        for (a, &v) in self.v[..end].iter().zip(&tally.v[..end]) {
            a.store(v, Ordering::Relaxed);
        }
    }

    pub fn set_serving(&self, serving: bool) {
        self.serving.store(serving, Ordering::Relaxed);
    }

    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// What the shard published last.
    pub fn read(&self) -> Tally {
        let mut tally = Tally::default();
        for (t, a) in tally.v.iter_mut().zip(self.v.iter()) {
            *t = a.load(Ordering::Relaxed);
        }
        tally
    }
}

/// A scrape: every shard's tally and their sum, and what the kernel says.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub shards: Vec<Tally>,
    pub total: Tally,
    /// Datagrams the kernel dropped at the listening sockets (None: its
    /// tables could not be read).
    pub listener_drops: Option<u64>,
    /// The process as the kernel sees it (None: not read).
    pub process: Option<Process>,
    /// SIGHUP reloads: (taken, refused for a bad file).
    pub reloads: (u64, u64),
    /// Live file mappings and the bytes they span, every root.
    pub mapped: (u64, u64),
    /// `--metrics-file-labels`: each name's counters (see [`FileLabels`]).
    pub files: Option<Vec<(String, Vec<u64>)>>,
}

/// The standard `process_*` figures, read at a scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Process {
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub resident_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
}

impl Process {
    /// Reads /proc/self and the process's limits and usage.
    pub fn read() -> Process {
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|dir| dir.count() as u64);
        let max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| soft);
        let resident_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            });
        let cpu_seconds = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
            .ok()
            .map(|u| {
                let secs =
                    |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
                secs(u.user_time()) + secs(u.system_time())
            });
        Process {
            open_fds,
            max_fds,
            resident_bytes,
            cpu_seconds,
        }
    }
}

impl Snapshot {
    pub fn take(shards: &[Arc<Published>]) -> Self {
        let shards: Vec<Tally> = shards.iter().map(|s| s.read()).collect();
        let mut total = Tally::default();
        for s in &shards {
            total.add(s);
        }
        Snapshot {
            shards,
            total,
            listener_drops: None,
            process: None,
            reloads: (0, 0),
            mapped: (0, 0),
            files: None,
        }
    }

    /// The Prometheus text format (version 0.0.4) of this snapshot.
    pub fn encode(&self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Encoded(self.clone())));
        let mut out = String::new();
        // Writing to a String does not fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        out
    }
}

/// A snapshot as a collector, for the registry to encode.
#[derive(Debug)]
struct Encoded(Snapshot);

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = ConstGauge::new(value as i64);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

/// A counter family: one sample per label set of `samples`.
fn counters<'l, const N: usize>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = ([(&'l str, &'l str); N], u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in samples {
        ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for Encoded {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let t = &self.0.total;
        let v = |slot: usize| t.v[slot];
        let requests = RequestKind::ALL.into_iter().flat_map(|k| {
            Admission::ALL.map(|a| {
                (
                    [("kind", k.as_str()), ("outcome", a.as_str())],
                    t.admitted(k, a),
                )
            })
        });
        counters(
            &mut e,
            "ringtftpd_requests",
            "Datagrams taken at the listeners as requests, by opcode (other: neither RRQ nor WRQ) and outcome (started, refused, ignored)",
            requests,
        )?;
        counters(
            &mut e,
            "ringtftpd_refusals",
            "Requests and stray datagrams refused, by reason (rate_limited ones get no reply)",
            RefusalKind::ALL.map(|k| ([("reason", k.as_str())], t.refusals(k))),
        )?;
        counter(
            &mut e,
            "ringtftpd_refusal_replies_suppressed",
            "ERROR replies to refusals held back by the reply rate limits",
            v(slot::REPLIES_SUPPRESSED),
        )?;
        counter(
            &mut e,
            "ringtftpd_busy_deferred",
            "Requests left unanswered while the server was full, for the client's own retry \
             (--busy-patience-ms); those that waited longer got ERROR busy, counted in \
             ringtftpd_refusals{reason=\"busy\"}",
            v(slot::BUSY_DEFERRED),
        )?;
        counters(
            &mut e,
            "ringtftpd_transfers_started",
            "Transfers admitted and started, by direction",
            Direction::ALL.map(|d| ([("direction", d.as_str())], v(slot::STARTED + d as usize))),
        )?;
        let finished = Direction::ALL.into_iter().flat_map(|d| {
            OUTCOMES.iter().enumerate().map(move |(i, o)| {
                (
                    [("direction", d.as_str()), ("outcome", *o)],
                    t.finished_count(d, i),
                )
            })
        });
        counters(
            &mut e,
            "ringtftpd_transfers_finished",
            "Transfers ended, by direction and outcome",
            finished,
        )?;
        counters(
            &mut e,
            "ringtftpd_data_bytes",
            "DATA payload bytes: sent (queued, retransmissions included) and received (uploads, accepted)",
            [
                ([("direction", "sent")], v(slot::BYTES_SENT)),
                ([("direction", "received")], v(slot::BYTES_RECEIVED)),
            ],
        )?;
        counters(
            &mut e,
            "ringtftpd_data_blocks",
            "DATA packets: sent (queued, retransmissions included) and received (uploads, accepted)",
            [
                ([("direction", "sent")], v(slot::BLOCKS_SENT)),
                ([("direction", "received")], v(slot::BLOCKS_RECEIVED)),
            ],
        )?;
        counter(
            &mut e,
            "ringtftpd_retransmissions",
            "DATA and OACK packets sent again, counted as each transfer ends",
            v(slot::RETRANSMITS),
        )?;
        counter(
            &mut e,
            "ringtftpd_timeouts",
            "Retransmission timers of sessions that fired",
            v(slot::TIMEOUTS),
        )?;
        counters(
            &mut e,
            "ringtftpd_errors_sent",
            "ERROR packets queued for sending, by TFTP error code",
            (0..CODES).map(|i| ([("code", code_label(i))], v(slot::ERRORS_SENT + i))),
        )?;
        counters(
            &mut e,
            "ringtftpd_errors_received",
            "ERROR packets from clients, by TFTP error code: those that ended a transfer, and those sent to a listening port",
            (0..CODES).map(|i| ([("code", code_label(i))], v(slot::ERRORS_RECEIVED + i))),
        )?;
        counter(
            &mut e,
            "ringtftpd_datagrams_received",
            "Datagrams received, at listeners and transfer sockets",
            v(slot::DATAGRAMS_IN),
        )?;
        counter(
            &mut e,
            "ringtftpd_send_errors",
            "Sends that failed (ICMP unreachable, EAGAIN...); retransmission covers them",
            v(slot::SEND_ERRORS),
        )?;
        counter(
            &mut e,
            "ringtftpd_gso_fallbacks",
            "Segmented (UDP GSO) sends refused by their path and resent one packet per send",
            v(slot::GSO_FALLBACKS),
        )?;
        if let Some(drops) = self.0.listener_drops {
            counter(
                &mut e,
                "ringtftpd_listener_drops",
                "Datagrams the kernel dropped at the listening sockets (receive buffer full), from /proc/net/udp and udp6",
                drops,
            )?;
        }
        let (taken, refused) = self.0.reloads;
        counters(
            &mut e,
            "ringtftpd_reloads",
            "SIGHUP reloads, by result (failed: a file did not parse and the old rules stayed)",
            [
                ([("result", "ok")], taken),
                ([("result", "failed")], refused),
            ],
        )?;
        counter(
            &mut e,
            "ringtftpd_log_lines_dropped",
            "Shards' log lines dropped because the logger's queue was full",
            v(slot::LOG_DROPPED),
        )?;
        {
            let mut family = e.encode_descriptor(
                "ringtftpd_transfers_active",
                "Transfers running, by shard and direction",
                None,
                MetricType::Gauge,
            )?;
            for (index, shard) in self.0.shards.iter().enumerate() {
                let index = index.to_string();
                for d in Direction::ALL {
                    let labels = [("shard", index.as_str()), ("direction", d.as_str())];
                    ConstGauge::new(shard.live(d) as i64).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        gauge(
            &mut e,
            "ringtftpd_pooled_sockets",
            "Idle transfer sockets kept for reuse",
            v(slot::POOLED),
        )?;
        gauge(
            &mut e,
            "ringtftpd_open_cache_files",
            "Opened files (mappings, netascii copies, failures) the open cache keeps",
            v(slot::OPEN_CACHE_FILES),
        )?;
        gauge(
            &mut e,
            "ringtftpd_open_cache_bytes",
            "Bytes of content the open cache keeps alive",
            v(slot::OPEN_CACHE_BYTES),
        )?;
        gauge(
            &mut e,
            "ringtftpd_mapped_files",
            "File contents mapped now (octet downloads), each once however many transfers and shards read it",
            self.0.mapped.0,
        )?;
        gauge(
            &mut e,
            "ringtftpd_mapped_bytes",
            "Bytes the live file mappings span (address space, not resident memory)",
            self.0.mapped.1,
        )?;
        if let Some(files) = &self.0.files {
            encode_files(&mut e, files)?;
        }
        let process = self.0.process.unwrap_or_default();
        if let Some(cpu) = process.cpu_seconds {
            let metric = ConstCounter::new(cpu);
            metric.encode(e.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time of the whole process, in seconds",
                None,
                metric.metric_type(),
            )?)?;
        }
        for (name, help, value) in [
            (
                "process_open_fds",
                "Open file descriptors (every transfer holds a socket)",
                process.open_fds,
            ),
            (
                "process_max_fds",
                "The open-file limit (RLIMIT_NOFILE, raised to the hard limit at start)",
                process.max_fds,
            ),
            (
                "process_resident_memory_bytes",
                "Resident memory of the process (VmRSS; file mappings included)",
                process.resident_bytes,
            ),
        ] {
            if let Some(value) = value {
                gauge(&mut e, name, help, value)?;
            }
        }
        for histogram in [&DURATION, &SRTT, &THROUGHPUT, &FIRST_DATA] {
            let mut family =
                e.encode_descriptor(histogram.name, histogram.help, None, MetricType::Histogram)?;
            for d in Direction::ALL {
                let (buckets, count, sum) = histogram.read(&t.v, d);
                let labels = [("direction", d.as_str())];
                family
                    .encode_family(&labels)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        Ok(())
    }
}

/// `--metrics-file-labels`: the counters by file.
fn encode_files(
    e: &mut DescriptorEncoder,
    files: &[(String, Vec<u64>)],
) -> Result<(), std::fmt::Error> {
    let finished = files.iter().flat_map(|(name, row)| {
        Direction::ALL.into_iter().flat_map(move |d| {
            OUTCOMES.iter().enumerate().map(move |(i, o)| {
                (
                    [
                        ("file", name.as_str()),
                        ("direction", d.as_str()),
                        ("outcome", *o),
                    ],
                    row[file_slot::FINISHED + d as usize * OUTCOMES.len() + i],
                )
            })
        })
    });
    counters(
        e,
        "ringtftpd_file_transfers_finished",
        "Transfers ended, by normalised file name (--metrics-file-labels; file=\"other\": the names past the limit), direction and outcome",
        finished,
    )?;
    let bytes = files.iter().flat_map(|(name, row)| {
        Direction::ALL.map(|d| {
            (
                [("file", name.as_str()), ("direction", d.as_str())],
                row[file_slot::BYTES + d as usize],
            )
        })
    });
    counters(
        e,
        "ringtftpd_file_transfer_bytes",
        "Payload bytes of finished transfers (acknowledged or accepted), by normalised file name and direction",
        bytes,
    )?;
    let mut family = e.encode_descriptor(
        FILE_DURATION.name,
        FILE_DURATION.help,
        None,
        MetricType::Histogram,
    )?;
    for (name, row) in files {
        for d in Direction::ALL {
            let (buckets, count, sum) = FILE_DURATION.read(row, d);
            let labels = [("file", name.as_str()), ("direction", d.as_str())];
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
    }
    Ok(())
}

/// The exporter's view of the server: every shard's counters, and
/// whether the server is stopping.
#[derive(Debug, Clone)]
pub struct Exporter {
    shards: Arc<[Arc<Published>]>,
    stopping: Arc<AtomicBool>,
    /// A shard did not turn its loop when woken (the watchdog's check).
    hung: Arc<AtomicBool>,
    reloads_ok: Arc<AtomicU64>,
    reloads_failed: Arc<AtomicU64>,
    /// The listening addresses, whose kernel drop counts a scrape reads.
    listeners: Arc<[SocketAddr]>,
    /// Every root's live mappings.
    mapped: Arc<[Arc<crate::files::MappedCounts>]>,
    file_labels: Option<Arc<FileLabels>>,
}

impl Exporter {
    pub fn new(shards: Vec<Arc<Published>>, listeners: &[SocketAddr]) -> Self {
        Exporter {
            shards: shards.into(),
            stopping: Arc::new(AtomicBool::new(false)),
            hung: Arc::new(AtomicBool::new(false)),
            reloads_ok: Arc::default(),
            reloads_failed: Arc::default(),
            listeners: listeners.into(),
            mapped: Arc::new([]),
            file_labels: None,
        }
    }

    /// Also reads every root's live mappings and, with
    /// `--metrics-file-labels`, the counters by file.
    pub fn with_files(
        mut self,
        mapped: Vec<Arc<crate::files::MappedCounts>>,
        file_labels: Option<Arc<FileLabels>>,
    ) -> Self {
        self.mapped = mapped.into();
        self.file_labels = file_labels;
        self
    }

    /// From now on `/readyz` answers 503 (drain, shutdown).
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Counts a SIGHUP reload, taken or refused.
    pub fn record_reload(&self, ok: bool) {
        let counter = if ok {
            &self.reloads_ok
        } else {
            &self.reloads_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a shard was found hung (`/readyz` answers 503 meanwhile).
    pub fn set_hung(&self, hung: bool) {
        self.hung.store(hung, Ordering::Relaxed);
    }

    /// Every shard runs, takes requests and turns when woken, and no stop
    /// was asked.
    pub fn ready(&self) -> bool {
        !self.stopping.load(Ordering::Relaxed)
            && !self.hung.load(Ordering::Relaxed)
            && self.shards.iter().all(|s| s.serving())
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut snapshot = Snapshot::take(&self.shards);
        snapshot.listener_drops = listener_drops(&self.listeners);
        snapshot.process = Some(Process::read());
        snapshot.reloads = (
            self.reloads_ok.load(Ordering::Relaxed),
            self.reloads_failed.load(Ordering::Relaxed),
        );
        snapshot.mapped = self.mapped.iter().fold((0, 0), |(files, bytes), m| {
            let (f, b) = m.read();
            (files + f, bytes + b)
        });
        snapshot.files = self.file_labels.as_ref().map(|f| f.read());
        snapshot
    }

    /// Every shard's live transfers (see `crate::top::live`): asking
    /// starts their publishing, so the first answer after a quiet spell
    /// waits up to 300 ms for it.
    pub fn transfers(&self) -> crate::top::live::Transfers {
        crate::top::live::collect(
            self.shards.iter().map(|s| &s.transfers),
            Duration::from_millis(300),
        )
    }

    /// The status and body for `GET path`.
    pub fn answer(&self, path: &str) -> (u16, &'static str, String) {
        const TEXT: &str = "text/plain; charset=utf-8";
        let path = path.split('?').next().unwrap_or(path);
        match path {
            "/metrics" => (
                200,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                self.snapshot().encode(),
            ),
            "/transfers" => (
                200,
                "application/json",
                serde_json::to_string(&self.transfers()).unwrap_or_default(),
            ),
            "/healthz" => (200, TEXT, "ok\n".to_string()),
            "/readyz" if self.ready() => (200, TEXT, "ready\n".to_string()),
            "/readyz" => (503, TEXT, "not ready\n".to_string()),
            _ => (
                404,
                TEXT,
                "not found: try /metrics, /transfers, /healthz or /readyz\n".to_string(),
            ),
        }
    }

    /// Serves `listening` on a thread of its own, for the life of the
    /// process.
    pub fn serve(&self, listening: Listening) -> io::Result<()> {
        let server = listening.server;
        let exporter = self.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                for request in server.incoming_requests() {
                    let (status, content_type, body) = match request.method() {
                        tiny_http::Method::Get | tiny_http::Method::Head => {
                            exporter.answer(request.url())
                        }
                        _ => (405, "text/plain; charset=utf-8", "GET only\n".to_string()),
                    };
                    let mut response =
                        tiny_http::Response::from_string(body).with_status_code(status);
                    if let Ok(header) =
                        tiny_http::Header::from_bytes("Content-Type", content_type.as_bytes())
                    {
                        response.add_header(header);
                    }
                    // A scraper that went away is its own problem.
                    let _ = request.respond(response);
                }
            })?;
        Ok(())
    }
}

/// Datagrams the kernel dropped on UDP sockets bound to one of `addrs`
/// (every shard's `SO_REUSEPORT` listener of an address), read from this
/// network namespace's /proc/net/udp and udp6: the last column, `drops`.
/// None if neither table can be read.
fn listener_drops(addrs: &[SocketAddr]) -> Option<u64> {
    let v4 = std::fs::read_to_string("/proc/net/udp").ok();
    let v6 = std::fs::read_to_string("/proc/net/udp6").ok();
    if v4.is_none() && v6.is_none() {
        return None;
    }
    let drops = |table: Option<String>| table.map_or(0, |t| udp_table_drops(&t, addrs));
    Some(drops(v4).saturating_add(drops(v6)))
}

/// The `drops` of the rows of a /proc/net/udp{,6} `table` whose local
/// address is one of `addrs`.
fn udp_table_drops(table: &str, addrs: &[SocketAddr]) -> u64 {
    table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let fields: Vec<&str> = row.split_whitespace().collect();
            let local = parse_proc_addr(fields.get(1)?)?;
            let drops = fields.last()?.parse::<u64>().ok()?;
            addrs
                .iter()
                .any(|a| crate::shard::net::canonical(*a) == local || *a == local)
                .then_some(drops)
        })
        .sum()
}

/// `0100007F:0045` (IPv4) or 32 hex digits and a port (IPv6), as the
/// kernel prints them: each 32-bit word of the address as it lies in
/// memory, shown as a host-order number; the port in host order.
fn parse_proc_addr(field: &str) -> Option<SocketAddr> {
    let (ip, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| {
        ip.get(8 * i..8 * i + 8)
            .and_then(|w| u32::from_str_radix(w, 16).ok())
            .map(u32::to_ne_bytes)
    };
    let ip: std::net::IpAddr = match ip.len() {
        8 => std::net::Ipv4Addr::from(word(0)?).into(),
        32 => {
            let mut octets = [0u8; 16];
            for i in 0..4 {
                octets[4 * i..4 * i + 4].copy_from_slice(&word(i)?);
            }
            std::net::Ipv6Addr::from(octets).into()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// The metrics port, bound (before the shards start and privileges are
/// dropped) and not yet served.
pub struct Listening {
    server: tiny_http::Server,
    pub addr: SocketAddr,
}

impl Listening {
    pub fn bind(addr: SocketAddr) -> io::Result<Listening> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| io::Error::other(format!("cannot serve --metrics on {addr}: {e}")))?;
        let addr = server
            .server_addr()
            .to_ip()
            .ok_or_else(|| io::Error::other(format!("--metrics {addr}: not an IP address")))?;
        Ok(Listening { server, addr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(started: Instant, secs: f64, retransmits: u64) -> Stats {
        Stats {
            started,
            ended: Some(started + Duration::from_secs_f64(secs)),
            bytes_acked: 1000,
            blocks: 2,
            error: None,
            retransmits,
            blksize: 512,
            windowsize: 1,
            srtt: Some(Duration::from_micros(400)),
            rto_floor: Duration::ZERO,
        }
    }

    #[test]
    fn publish_then_read_sums_over_shards() {
        let now = Instant::now();
        let shards: Vec<Arc<Published>> = (0..2).map(|_| Arc::default()).collect();
        for (i, shard) in shards.iter().enumerate() {
            let mut t = Tally::default();
            t.started(Direction::Download);
            t.data_sent(512);
            t.data_sent(100 + i);
            t.finished(
                Direction::Download,
                &Outcome::Completed,
                &stats(now, 0.2, 1),
                now,
            );
            t.started(Direction::Upload);
            shard.publish(&mut t, false);
            assert!(!t.cold_moved());
        }
        let snap = Snapshot::take(&shards);
        assert_eq!(snap.total.requests(RequestKind::Rrq), 2);
        assert_eq!(snap.total.requests(RequestKind::Wrq), 2);
        assert_eq!(snap.total.admitted(RequestKind::Rrq, Admission::Started), 2);
        assert_eq!(snap.total.bytes_sent(), 2 * 612 + 1);
        assert_eq!(snap.total.completed(Direction::Download), 2);
        assert_eq!(snap.total.live(Direction::Download), 0);
        assert_eq!(snap.shards[1].live(Direction::Upload), 1);
        let (buckets, count, sum) = DURATION.read(&snap.total.v, Direction::Download);
        assert_eq!(count, 2);
        assert_eq!(buckets.iter().find(|b| b.0 == 0.25), Some(&(0.25, 2)));
        assert!((sum - 0.4).abs() < 1e-6);
        // 1000 payload bytes in 0.2 s each.
        let (buckets, count, _) = THROUGHPUT.read(&snap.total.v, Direction::Download);
        assert_eq!((count, buckets[0]), (2, (1e4, 2)));
        let (buckets, count, sum) = SRTT.read(&snap.total.v, Direction::Download);
        assert_eq!((count, buckets[2]), (2, (0.0005, 2)));
        assert!((sum - 0.0008).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn hot_publish_leaves_cold_counters_until_they_move() {
        let shard = Published::default();
        let mut t = Tally::default();
        t.request(RequestKind::Rrq, Admission::Refused);
        shard.publish(&mut t, false);
        // Copied in without moving a cold counter: not published yet.
        let mut refusals = crate::endpoint::RefusalCounts::default();
        refusals.by_reason[RefusalKind::NotFound as usize] = 3;
        t.set_endpoint(&refusals, (0, 0));
        t.data_sent(7);
        shard.publish(&mut t, false);
        assert_eq!(shard.read().refusals(RefusalKind::NotFound), 0);
        assert_eq!(shard.read().bytes_sent(), 7);
        shard.publish(&mut t, true);
        assert_eq!(shard.read().refusals(RefusalKind::NotFound), 3);
    }

    #[test]
    fn error_replies_are_counted_by_code() {
        let mut t = Tally::default();
        t.reply_sent(&[0, 5, 0, 1, b'x', 0]);
        t.reply_sent(&[0, 5, 0, 99, 0]);
        t.reply_sent(&[0, 6, 0, 1]); // an OACK: not an ERROR
        t.listener_datagram(&[0, 5, 0, 8, 0], Some(Admission::Ignored));
        t.listener_datagram(&[0, 4, 0, 1], Some(Admission::Refused));
        assert_eq!(t.v[slot::ERRORS_RECEIVED + 8], 1);
        assert_eq!(t.requests(RequestKind::Other), 2);
        assert_eq!(t.admitted(RequestKind::Other, Admission::Ignored), 1);
        assert_eq!(t.v[slot::ERRORS_SENT + 1], 1);
        assert_eq!(t.v[slot::ERRORS_SENT + CODES - 1], 1);
        assert_eq!(
            t.v[slot::ERRORS_SENT..slot::ERRORS_SENT + CODES]
                .iter()
                .sum::<u64>(),
            2
        );
    }

    #[test]
    fn encoding_names_every_label_set() {
        let shards: Vec<Arc<Published>> = (0..2).map(|_| Arc::default()).collect();
        let text = Snapshot::take(&shards).encode();
        for kind in RefusalKind::ALL {
            let line = format!(
                "ringtftpd_refusals_total{{reason=\"{}\"}} 0\n",
                kind.as_str()
            );
            assert!(text.contains(&line), "{line} missing in\n{text}");
        }
        for kind in ["rrq", "wrq", "other"] {
            for outcome in ["started", "refused", "ignored"] {
                let line = format!(
                    "ringtftpd_requests_total{{kind=\"{kind}\",outcome=\"{outcome}\"}} 0\n"
                );
                assert!(text.contains(&line), "{line} missing in\n{text}");
            }
        }
        assert!(text.contains("ringtftpd_transfers_active{shard=\"1\",direction=\"upload\"} 0\n"));
        assert!(text.contains(
            "ringtftpd_transfer_duration_seconds_bucket{direction=\"download\",le=\"+Inf\"} 0\n"
        ));
        assert!(text.contains("# TYPE ringtftpd_transfer_duration_seconds histogram\n"));
    }

    #[test]
    fn file_names_are_normalised_to_few_labels() {
        assert_eq!(normalise_file("/boot//vmlinuz"), "boot/vmlinuz");
        assert_eq!(normalise_file("boot\\\\pxe.0"), "boot/pxe.0");
        assert_eq!(
            normalise_file("pxelinux.cfg/01-aa-bb-cc-dd-ee-0f"),
            "pxelinux.cfg/<mac>"
        );
        assert_eq!(normalise_file("aa:bb:cc:dd:ee:ff/x"), "<mac>/x");
        assert_eq!(
            normalise_file("pxelinux.cfg/12345678-9abc-def0-1234-56789abcdef0"),
            "pxelinux.cfg/<uuid>"
        );
        assert_eq!(
            normalise_file("pxelinux.cfg/01-aa-bb"),
            "pxelinux.cfg/01-aa-bb"
        );
        assert_eq!(normalise_file("/other"), "/other");
    }

    #[test]
    fn file_labels_keep_the_first_names_and_fold_the_rest() {
        let now = Instant::now();
        let labels = FileLabels::new(2);
        let done = stats(now, 0.2, 0);
        for name in ["a", "/a", "b", "c", "d", "b"] {
            labels.finished(name, Direction::Download, &Outcome::Completed, &done, now);
        }
        labels.finished("c", Direction::Upload, &Outcome::TimedOut, &done, now);
        let rows = labels.read();
        let names: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b", "other"]);
        let completed = |row: &[u64]| row[file_slot::FINISHED + outcome_index(&Outcome::Completed)];
        assert_eq!(completed(&rows[0].1), 2);
        assert_eq!(completed(&rows[1].1), 2);
        assert_eq!(completed(&rows[2].1), 2);
        assert_eq!(rows[2].1[file_slot::FINISHED + OUTCOMES.len() + 3], 1);
        assert_eq!(rows[0].1[file_slot::BYTES], 2000);
        let (_, count, sum) = FILE_DURATION.read(&rows[2].1, Direction::Download);
        assert_eq!(count, 2);
        assert!((sum - 0.4).abs() < 1e-6);
        let mut snapshot = Snapshot::take(&[]);
        snapshot.files = Some(rows);
        let text = snapshot.encode();
        assert!(text.contains(
            "ringtftpd_file_transfers_finished_total{file=\"other\",direction=\"upload\",outcome=\"timed_out\"} 1\n"
        ), "{text}");
        assert!(text.contains(
            "ringtftpd_file_transfer_bytes_total{file=\"a\",direction=\"download\"} 2000\n"
        ));
    }

    #[test]
    fn kernel_drops_are_read_for_the_listening_addresses() {
        let v4 = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                  \x20 1: 0100007F:0045 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 7\n\
                  \x20 2: 0100007F:0045 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 5\n\
                  \x20 3: 0100007F:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0000000000000000 100\n";
        let listener: SocketAddr = "127.0.0.1:69".parse().unwrap();
        assert_eq!(udp_table_drops(v4, &[listener]), 12);
        let any6: SocketAddr = "[::]:69".parse().unwrap();
        assert_eq!(udp_table_drops(v4, &[any6]), 0);
        let v6 = "  sl  local_address remote_address st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                  \x20 1: 00000000000000000000000001000000:0045 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 1 2 0000000000000000 3\n\
                  \x20 2: 00000000000000000000000000000000:0045 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 1 2 0000000000000000 4\n";
        let lo6: SocketAddr = "[::1]:69".parse().unwrap();
        assert_eq!(udp_table_drops(v6, &[lo6]), 3);
        assert_eq!(udp_table_drops(v6, &[any6]), 4);
        assert_eq!(udp_table_drops("garbage\nmore garbage 1\n", &[lo6]), 0);
        // This machine's own tables parse.
        assert!(listener_drops(&[listener]).is_some());
    }

    #[test]
    fn histograms_have_slots_of_their_own() {
        let mut ranges: Vec<(usize, usize)> = [&DURATION, &SRTT, &THROUGHPUT, &FIRST_DATA]
            .iter()
            .map(|h| (h.base, h.base + Histogram::slots(h.bounds)))
            .collect();
        ranges.sort();
        for pair in ranges.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "{ranges:?} overlap");
        }
        assert!(ranges[0].0 >= slot::HOT);
        assert!(ranges.last().unwrap().1 <= slot::OPEN_CACHE_FILES);
    }

    #[test]
    fn the_process_is_read_and_encoded() {
        let process = Process::read();
        assert!(process.open_fds.is_some_and(|n| n >= 3), "{process:?}");
        assert!(process.max_fds.is_some() && process.resident_bytes.is_some());
        let mut snapshot = Snapshot::take(&[]);
        snapshot.process = Some(process);
        let text = snapshot.encode();
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{text}"
        );
        assert!(text.contains("\nprocess_open_fds "), "{text}");
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
    }

    #[test]
    fn reloads_are_counted_by_result() {
        let exporter = Exporter::new(Vec::new(), &[]);
        exporter.record_reload(true);
        exporter.record_reload(false);
        exporter.record_reload(true);
        let text = exporter.snapshot().encode();
        assert!(
            text.contains("ringtftpd_reloads_total{result=\"ok\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("ringtftpd_reloads_total{result=\"failed\"} 1\n"),
            "{text}"
        );
    }

    #[test]
    fn endpoints_answer() {
        let shards: Vec<Arc<Published>> = (0..2).map(|_| Arc::default()).collect();
        let exporter = Exporter::new(shards.clone(), &[]);
        assert_eq!(exporter.answer("/healthz").0, 200);
        assert_eq!(exporter.answer("/readyz").0, 503);
        shards.iter().for_each(|s| s.set_serving(true));
        assert_eq!(exporter.answer("/readyz").0, 200);
        exporter.set_hung(true);
        assert_eq!(exporter.answer("/readyz").0, 503, "a hung shard");
        exporter.set_hung(false);
        assert_eq!(exporter.answer("/readyz").0, 200);
        exporter.set_stopping();
        assert_eq!(exporter.answer("/readyz").0, 503);
        assert_eq!(exporter.answer("/metrics?x=1").0, 200);
        assert_eq!(exporter.answer("/nope").0, 404);
        // Nothing published yet: no rows, and each shard says so.
        let (status, kind, body) = exporter.answer("/transfers");
        assert_eq!((status, kind), (200, "application/json"));
        let t: crate::top::live::Transfers = serde_json::from_str(&body).unwrap();
        assert!(t.transfers.is_empty() && t.shards.len() == 2, "{body}");
        assert!(shards.iter().all(|s| s.transfers.watched(Instant::now())));
    }
}
