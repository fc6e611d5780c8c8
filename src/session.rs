//! One TFTP transfer as a sans-IO state machine (in the manner of
//! quinn-proto's `Connection`). No sockets, clocks or threads: time is
//! always an argument.
//!
//! Call order, after construction and after every input:
//! 1. `handle_datagram(now, bytes)` for each datagram from the peer, or
//!    `handle_timeout(now)` when the deadline from `poll_timeout` passed
//!    (a spurious call is a no-op);
//! 2. `poll_transmit(now, buf)` until it returns `None` (drains a window);
//! 3. `poll_timeout()` to learn the one next deadline;
//! 4. `poll_event()`: `Some` once, when the transfer has ended.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use crate::proto::{self, ErrorCode, Options, Packet, Rollover};
use crate::receive::{DataVerdict, Receiving};
use crate::refusal::Abort;

/// Server-wide limits and timer policy for transfers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest blksize granted (`--max-blksize`).
    pub max_blksize: u16,
    /// Largest windowsize granted (`--max-windowsize`).
    pub max_windowsize: u16,
    /// Clamp blksize to the ingress interface's MTU.
    pub mtu_clamp: bool,
    /// Bytes below the MTU the clamp leaves unused (tftpd-hpa 7.x's
    /// `-B mtu-SLACK`).
    pub mtu_slack: u32,
    /// Most bytes in one window, blksize × windowsize (tftpd-hpa 7.x's
    /// `--window-bytes`). A limit under two blocks means lockstep, with no
    /// windowsize in the OACK; 0 is such a limit, as tftpd-hpa 7.3 has it.
    pub max_window_bytes: u64,
    /// RTO before the first RTT sample (RFC 6298 §2.1).
    pub initial_rto: Duration,
    /// Floor and ceiling of the adaptive RTO.
    pub rto_min: Duration,
    pub rto_max: Duration,
    /// Retransmissions of one packet before giving up.
    pub retries: u32,
    /// Longest a transfer may go without progress (a newly acknowledged
    /// block) before it is given up, whatever its timers say.
    pub max_stall: Duration,
    /// Shortest a transfer whose peer has answered keeps trying after its
    /// last progress, even once `retries` are spent: with a fast RTT the
    /// retries alone last ~2.5 s, and a client pausing longer (a flash
    /// write, a paused VM, U-Boot's 5 s window timer) would be dropped.
    /// At most [`MAX_PATIENT_RETRIES`] more resends; a peer never heard
    /// from (perhaps spoofed) gets none.
    pub min_give_up: Duration,
}

/// Resends past `retries` that [`Limits::min_give_up`] may add.
pub const MAX_PATIENT_RETRIES: u32 = 16;

impl Default for Limits {
    /// The command line's defaults.
    fn default() -> Self {
        Limits {
            max_blksize: proto::MAX_BLKSIZE,
            max_windowsize: 64,
            mtu_clamp: true,
            mtu_slack: 0,
            max_window_bytes: DEFAULT_MAX_WINDOW_BYTES,
            initial_rto: Duration::from_millis(1000),
            rto_min: Duration::from_millis(DEFAULT_RTO_MIN_MS),
            rto_max: Duration::from_millis(3000),
            retries: 8,
            max_stall: Duration::from_secs(60),
            min_give_up: Duration::from_secs(15),
        }
    }
}

/// tftpd-hpa 7.x's compile-time `--window-bytes` (4 MiB), in effect in
/// Debian's build.
pub const DEFAULT_MAX_WINDOW_BYTES: u64 = 4 << 20;

/// Default starting floor of each session's RTO, in milliseconds. Low, so
/// that a loss on a LAN costs milliseconds; a session whose client proves
/// slower (a spurious retransmission) raises its own floor.
pub const DEFAULT_RTO_MIN_MS: u64 = 2;

/// Shortest wait before an OACK is resent, whatever the path's RTO (but
/// never above `--rto-max-ms`): the
/// answer needs the client to act on the options, which a busy host can
/// take milliseconds to do, and some clients (atftp: "unexpected OACK")
/// abort on a duplicate OACK where a duplicate DATA is harmless.
pub const OACK_RTO_FLOOR: Duration = Duration::from_millis(100);

/// Recent timeout resends a transfer remembers, to tell spurious ones.
const SPURIOUS_PROBES: usize = 4;

/// RTT samples of DATA before the smallest one is trusted as a lower bound
/// for the Eifel timing check: on a LAN the round trip varies several-fold
/// (20 to 200 µs on a loaded veth), so one or two samples are no minimum.
const EIFEL_MIN_SAMPLES: u32 = 8;

/// What one transfer learned about the path to its client, to start the
/// next transfer to the same address with (see `Transfer::seed_from_path`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathMetrics {
    pub srtt: Duration,
    pub rttvar: Duration,
    /// The session's RTO floor, raised by resends proven spurious.
    pub rto_floor: Duration,
}

/// See `Sending::spurious_probes`.
#[derive(Debug, Clone, Copy)]
struct SpuriousProbe {
    block: u64,
    sent_before: Instant,
    first_ack: Instant,
}

/// What a DATA transmit carries besides its header: a byte range of the
/// file, for the driver to send from the mapping without copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    pub offset: u64,
    pub len: usize,
}

/// One datagram for the peer, written to the caller's buffer by
/// `poll_transmit`: all of it but a DATA's payload, `header_len()` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transmit {
    /// DATA `block` (counting on past 65535): the 4-byte header, then
    /// `payload` from the file. `last` is the final block as far as the
    /// transfer knows; a netascii source learns its end only as this
    /// block is translated (see [`Transfer::set_content_len`]).
    Data {
        block: u64,
        payload: Payload,
        last: bool,
    },
    /// ACK `block`, as on the wire.
    Ack { block: u16 },
    /// OACK of `len` bytes.
    Oack { len: usize },
    /// ERROR `code` of `len` bytes; the transfer has ended.
    Error { code: ErrorCode, len: usize },
}

impl Transmit {
    /// Bytes of the datagram in the caller's buffer.
    pub fn header_len(&self) -> usize {
        match *self {
            Self::Data { .. } | Self::Ack { .. } => 4,
            Self::Oack { len } | Self::Error { len, .. } => len,
        }
    }

    /// The file range that follows the header (DATA only).
    pub fn payload(&self) -> Option<Payload> {
        match *self {
            Self::Data { payload, .. } => Some(payload),
            _ => None,
        }
    }
}

/// Bytes a receiving transfer accepted, in order: store them at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received<'a> {
    pub offset: u64,
    pub bytes: &'a [u8],
    /// The final block: store the file, then [`Transfer::commit_done`].
    pub last: bool,
}

/// How a transfer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every block was acknowledged.
    Completed,
    /// The client answered our OACK with ERROR 8 (e.g. a tsize probe).
    OptionsDeclined,
    /// The client sent an ERROR.
    PeerError(ErrorCode),
    /// No answer after the last retransmission.
    TimedOut,
    /// Ended by the server (file error, shutdown); an ERROR was sent.
    Aborted(ErrorCode),
}

/// Counters of one transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub started: Instant,
    pub ended: Option<Instant>,
    /// Payload bytes the peer acknowledged.
    pub bytes_acked: u64,
    /// DATA blocks acknowledged (read) or accepted in order (write).
    pub blocks: u64,
    /// The message of the ERROR this side sent, if it ended the transfer.
    pub error: Option<&'static str>,
    /// DATA and OACK packets sent again.
    pub retransmits: u64,
    pub blksize: u16,
    pub windowsize: u16,
    /// Smoothed RTT and this transfer's RTO floor when it ended.
    pub srtt: Option<Duration>,
    pub rto_floor: Duration,
}

/// Hard cap on windowsize, whatever the configuration says: the window
/// must stay well below 65536 blocks so that a 16-bit ACK number maps to
/// exactly one block of it.
pub const MAX_WINDOWSIZE: u16 = 32768;

/// IP + UDP + TFTP DATA header bytes below the MTU.
fn overhead(ipv6: bool) -> u32 {
    (if ipv6 { 40 } else { 20 }) + 8 + 4
}

/// What was granted for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    /// The client's `timeout` or `utimeout`, if accepted: a fixed RTO.
    pub timeout: Option<Duration>,
    /// The block number after 65535, if the client asked (tftpd-hpa's
    /// `rollover` option).
    pub rollover: Option<Rollover>,
    /// The options to acknowledge in an OACK, or None to start with DATA 1.
    pub oack: Option<Options>,
}

/// tftpd-hpa's bounds on `utimeout`, in microseconds (10 ms to 255 s).
const UTIMEOUT_US: std::ops::RangeInclusive<u64> = 10_000..=255_000_000;

/// A content length learnt only while sending (netascii, translated as it
/// goes): pass it to [`negotiate`] and [`Transfer::new_read`], then give the
/// length to [`Transfer::set_content_len`] once the source is exhausted.
pub const LEN_UNKNOWN: u64 = u64::MAX;

/// Decides which requested options to accept (RFC 2347/2348/2349/7440,
/// and tftpd-hpa's blksize2, utimeout, rollover and cookie as tftpd-hpa
/// 7.3 negotiates them). Out-of-range values are ignored (left out of the
/// OACK), except blksize and windowsize above our limits, which are lowered.
/// The OACK spells each name as the request did.
pub fn negotiate(
    requested: &Options,
    content_len: u64,
    mtu: Option<u32>,
    ipv6: bool,
    limits: &Limits,
) -> Negotiated {
    let mut oack = Options {
        case: requested.case,
        ..Options::default()
    };
    let mut cap = u32::from(limits.max_blksize.min(proto::MAX_BLKSIZE));
    if limits.mtu_clamp {
        if let Some(mtu) = mtu {
            // Like dnsmasq: many PXE ROMs cannot take fragments. Never
            // below 512, as tftpd-hpa 7.x's `-B mtu-SLACK`.
            let fits = mtu.saturating_sub(overhead(ipv6) + limits.mtu_slack);
            cap = cap.min(fits.max(u32::from(proto::DEFAULT_BLKSIZE)));
        }
    }
    let min = u32::from(proto::MIN_BLKSIZE);
    // A limit under the smallest block (a policy's, say) still grants 8.
    let cap = cap.max(min);
    let plain = requested.blksize.filter(|&b| b >= min).map(|b| b.min(cap));
    // tftpd(8): blksize2 grants the largest power of 2 within both limits.
    let power = requested
        .blksize2
        .filter(|&b| b >= min)
        .map(|b| b.min(cap).min(u32::from(proto::MAX_BLKSIZE2)))
        .map(|b| 1 << b.ilog2());
    // Both asked: tftpd-hpa 7.3 answers the one granting more (both, when
    // they grant the same).
    let granted = plain.max(power);
    oack.blksize = plain.filter(|&b| Some(b) == granted);
    oack.blksize2 = power.filter(|&b| Some(b) == granted);
    let blksize = granted.map_or(proto::DEFAULT_BLKSIZE, |b| {
        u16::try_from(b.max(min)).unwrap_or(proto::MAX_BLKSIZE)
    });
    // RFC 2349 lets us accept the client's value or decline it, not lower
    // it; one above the RTO ceiling (timeout=255 would hold a slot for
    // 38 minutes) is declined, and the adaptive RTO serves instead. A valid
    // utimeout wins over timeout and leaves it out (tftpd-hpa 7.3).
    let within = |rto: &Duration| *rto <= limits.rto_max;
    oack.utimeout = requested
        .utimeout
        .filter(|us| UTIMEOUT_US.contains(us))
        .filter(|&us| within(&Duration::from_micros(us)));
    oack.timeout = requested
        .timeout
        .filter(|t| (1..=255).contains(t))
        .filter(|&t| within(&Duration::from_secs(u64::from(t))))
        .filter(|_| oack.utimeout.is_none());
    let timeout = oack
        .utimeout
        .map(Duration::from_micros)
        .or(oack.timeout.map(|t| Duration::from_secs(u64::from(t))));
    // RFC 2349: in a read request the client sends 0 and we answer the size;
    // one not known yet (netascii) is declined, as tftpd-hpa does.
    oack.tsize = requested
        .tsize
        .filter(|_| content_len != LEN_UNKNOWN)
        .map(|_| content_len);
    // tftpd(8): "only accepts 0 and 1 as valid rollover values".
    oack.rollover = requested.rollover.filter(|&r| r <= 1);
    let rollover = oack.rollover.map(|r| match r {
        1 => Rollover::One,
        _ => Rollover::Zero,
    });
    oack.cookie = requested.cookie;
    let mut windowsize = 1;
    if let Some(asked) = requested.windowsize.filter(|&w| w >= 1) {
        let cap = limits.max_windowsize.clamp(1, MAX_WINDOWSIZE);
        let by_bytes = limits.max_window_bytes / u64::from(blksize);
        let cap = u16::try_from(by_bytes).map_or(cap, |b| cap.min(b));
        windowsize = u16::try_from(asked.min(u32::from(cap))).unwrap_or(cap);
        // tftpd(8): a window of one block is lockstep, without the option
        // (and a limit of none, too: `--window-bytes` under one block).
        windowsize = windowsize.max(1);
        if windowsize > 1 {
            oack.windowsize = Some(u32::from(windowsize));
        }
    }
    Negotiated {
        blksize,
        windowsize,
        timeout,
        rollover,
        oack: (!oack.is_empty()).then_some(oack),
    }
}

/// Smoothed RTT and retransmission timeout (RFC 6298), with a floor of its
/// own per session: it starts at `--rto-min-ms` and rises when a
/// retransmission proves spurious (a slow client, not a loss).
#[derive(Debug, Clone, Copy)]
struct RttEstimator {
    srtt: Option<Duration>,
    /// `srtt` is the handshake's (OACK to ACK 0) only: that measures the
    /// client's option processing, or its own retransmission of a lost
    /// ACK 0, as much as the path; the first DATA sample replaces it.
    provisional: bool,
    /// The smallest DATA sample: no answer to a packet comes back faster.
    min_rtt: Option<Duration>,
    /// DATA samples taken.
    samples: u32,
    rttvar: Duration,
    rto: Duration,
    min: Duration,
    /// The floor `--rto-min-ms` gives, and the one this transfer started
    /// with (higher when seeded from an earlier transfer).
    base_min: Duration,
    start_min: Duration,
    max: Duration,
    /// A client-negotiated timeout: fixed, neither adapted nor backed off.
    fixed: bool,
}

impl RttEstimator {
    fn new(limits: &Limits, fixed: Option<Duration>) -> Self {
        let max = limits.rto_max.max(limits.rto_min);
        Self {
            srtt: None,
            provisional: false,
            min_rtt: None,
            samples: 0,
            rttvar: Duration::ZERO,
            rto: fixed.unwrap_or(limits.initial_rto.min(max)),
            min: limits.rto_min,
            base_min: limits.rto_min,
            start_min: limits.rto_min,
            max,
            fixed: fixed.is_some(),
        }
    }

    /// A DATA block's round trip (Karn's rule: never from a resent one).
    fn sample(&mut self, rtt: Duration) {
        if self.fixed {
            return;
        }
        self.min_rtt = Some(self.min_rtt.map_or(rtt, |m| m.min(rtt)));
        self.samples += 1;
        let first = self.provisional;
        self.provisional = false;
        let srtt = match self.srtt {
            Some(srtt) if !first => {
                let err = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + err) / 4;
                (srtt * 7 + rtt) / 8
            }
            // RFC 6298 §2.2: the first measurement (the handshake's aside).
            _ => {
                self.rttvar = rtt / 2;
                rtt
            }
        };
        self.srtt = Some(srtt);
        self.update();
    }

    /// OACK to ACK 0: a provisional first measurement (see `provisional`).
    fn sample_handshake(&mut self, rtt: Duration) {
        if self.fixed {
            return;
        }
        self.srtt = Some(rtt);
        self.rttvar = rtt / 2;
        self.provisional = true;
        self.update();
    }

    /// Whether an ACK that came `since_resend` after a resend is too quick
    /// to answer it (Eifel by timing, RFC 3522), once enough DATA samples
    /// make the minimum RTT a trustworthy lower bound.
    fn too_fast_for(&self, since_resend: Duration) -> bool {
        self.samples >= EIFEL_MIN_SAMPLES && self.min_rtt.is_some_and(|min| since_resend < min / 2)
    }

    fn update(&mut self) {
        if let Some(srtt) = self.srtt {
            // RFC 6298 §2.3, with a 1 ms clock granularity G.
            let rto = srtt + (self.rttvar * 4).max(Duration::from_millis(1));
            self.rto = rto.clamp(self.min, self.max);
        }
    }

    /// Starts from an earlier transfer's estimate of the same path: the
    /// RTO becomes its SRTT + 4 RTTVAR, within a floor never below the one
    /// it learned. SRTT itself stays unset, so this transfer's first sample
    /// is its first measurement (RFC 6298 §2.2): the seed is only a start.
    fn seed(&mut self, path: &PathMetrics) {
        if self.fixed {
            return;
        }
        self.min = self.min.max(path.rto_floor).min(self.max);
        self.start_min = self.min;
        let rto = path.srtt + (path.rttvar * 4).max(Duration::from_millis(1));
        self.rto = rto.clamp(self.min, self.max);
    }

    /// RFC 6298 §5.5: double on each expiry, up to the ceiling.
    fn back_off(&mut self) {
        if !self.fixed {
            self.rto = (self.rto * 2).min(self.max);
        }
    }

    /// A retransmission was spurious: the original's ACK took `observed`.
    /// Raise the floor above it (and at least double it), so this client's
    /// jitter stops causing resends, and undo the back-off (Eifel, RFC 4015).
    fn spurious(&mut self, observed: Duration) {
        if self.fixed {
            return;
        }
        self.min = (self.min * 2).max(observed * 5 / 4).min(self.max);
        self.sample(observed);
        self.rto = self.rto.max(self.min);
    }
}

/// Where a read transfer stands (the receiving side is
/// [`crate::receive::Receiving`]); the timer, retry and ending logic are
/// shared.
#[derive(Debug, Clone, Copy)]
struct Sending {
    content_len: u64,
    /// Blocks in the transfer: the last one is shorter than blksize
    /// (possibly empty). Block numbers here are absolute (1-based, u64);
    /// the wire carries them modulo 65536 (rollover to 0).
    total_blocks: u64,
    /// Highest block the peer acknowledged (0: none yet).
    acked: u64,
    /// Next block to send.
    next: u64,
    /// Highest block ever sent.
    sent_high: u64,
    /// Blocks allowed past `acked` now: the windowsize, except after a
    /// timeout before the peer acknowledged any DATA, when only the head
    /// block is resent. A forged ACK 0 (from someone who guessed the
    /// transfer port) then buys one window, not a window per retry.
    burst: u64,
    /// The peer acknowledged a DATA block.
    confirmed: bool,
    /// When block `acked + 1` was last sent, and when it was first sent.
    head_sent: Option<(Instant, Instant)>,
    /// `acked` when the head block was last resent on a duplicate ACK:
    /// one fast retransmit per step of progress.
    fast_resent_at: Option<u64>,
    /// The head block was resent on a timeout: `Some(when the copy before
    /// the resend was sent)` until an ACK answers it.
    timeout_resend: Option<Instant>,
    /// After an ACK that answered a timeout resend: that block, when the
    /// copy before the resend was sent, and when that first ACK came. A
    /// second ACK of it, clearly later (not a copy made by the network),
    /// means both copies reached the client: the resend was spurious. The
    /// last few are kept: a late ACK may arrive after later resends.
    spurious_probes: [Option<SpuriousProbe>; SPURIOUS_PROBES],
}

/// Which way the bytes go. The phases, timer, RTT, retries and endings
/// around it are shared.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // reads are the hot path: no box
enum Direction {
    /// A read (RRQ): we send DATA, the peer ACKs.
    Send(Sending),
    /// A write (WRQ): the peer sends DATA, we ACK.
    Receive(Receiving),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// The OACK is kept to resend (with its cookie, inline): a box would
// allocate per request, and a Transfer holds one Phase either way.
#[allow(clippy::large_enum_variant)]
enum Phase {
    /// OACK sent (or to send); waiting for ACK 0.
    Negotiating {
        oack: Options,
        oack_due: bool,
    },
    Transferring,
    /// Ended: `error` is still to be sent, then the event is delivered.
    Ended,
}

/// One transfer. See the module docs for the call order.
#[derive(Debug, Clone)]
pub struct Transfer {
    phase: Phase,
    blksize: u16,
    windowsize: u16,
    dir: Direction,
    /// Receiving: when the final ACK first went out; a repeat of the final
    /// DATA is answered again until the deadline, then the transfer ends.
    dallying: Option<Instant>,
    rtt: RttEstimator,
    /// Timeouts in a row without progress.
    tries: u32,
    max_retries: u32,
    /// The retransmission deadline, if armed.
    deadline: Option<Instant>,
    /// Last progress (start, ACK 0, a newly acknowledged block), and how
    /// long the transfer may go without it.
    progress_at: Instant,
    max_stall: Duration,
    min_give_up: Duration,
    /// The peer answered (ACK 0 of our OACK, or a DATA ACK): it may be
    /// waited for up to `min_give_up`.
    heard: bool,
    /// When the newest packet went out, and whether it was a resend
    /// (Karn's rule: no RTT sample from a retransmitted packet).
    last_send: Option<(Instant, bool)>,
    error_due: Option<(ErrorCode, &'static str)>,
    outcome: Option<Outcome>,
    event_delivered: bool,
    stats: Stats,
    rollover: Rollover,
}

impl Transfer {
    /// Block numbers past 65535 go on from `rollover` (default 0). Set it
    /// before the first `poll_transmit`/`handle_datagram`.
    pub fn set_rollover(&mut self, rollover: Rollover) {
        self.rollover = rollover;
        if let Direction::Receive(r) = &mut self.dir {
            r.set_rollover(rollover);
        }
    }

    /// The content's length, once known, for a transfer started with
    /// [`LEN_UNKNOWN`]; later calls are no-ops. Until then every DATA block
    /// is full, so the caller must learn the length no later than when it
    /// resolves the block that reaches it.
    pub fn set_content_len(&mut self, len: u64) {
        let Direction::Send(s) = &mut self.dir else {
            return;
        };
        if s.content_len != LEN_UNKNOWN {
            return;
        }
        s.content_len = len;
        s.total_blocks = len / u64::from(self.blksize) + 1;
        debug_assert!(s.sent_high <= s.total_blocks, "learnt the end too late");
    }

    /// A read transfer of `content_len` bytes, as negotiated.
    pub fn new_read(
        now: Instant,
        negotiated: &Negotiated,
        content_len: u64,
        limits: &Limits,
    ) -> Self {
        let blksize = negotiated.blksize.max(proto::MIN_BLKSIZE);
        let windowsize = negotiated.windowsize.max(1);
        let sending = Sending {
            content_len,
            total_blocks: content_len / u64::from(blksize) + 1,
            acked: 0,
            next: 1,
            sent_high: 0,
            burst: u64::from(windowsize),
            confirmed: false,
            head_sent: None,
            fast_resent_at: None,
            timeout_resend: None,
            spurious_probes: [None; SPURIOUS_PROBES],
        };
        Self::new(now, negotiated, Direction::Send(sending), limits)
    }

    /// A write transfer (WRQ), as negotiated, of at most `max_len` bytes
    /// (`--max-upload`, or the client's own tsize). It starts with the
    /// OACK, or with ACK 0 when no option was granted.
    ///
    /// Our ACK resends are a backup (the sender drives recovery), so the
    /// RTO floor is the initial RTO: a quick re-ACK would provoke senders
    /// that answer duplicate ACKs (the Sorcerer's Apprentice).
    pub fn new_write(
        now: Instant,
        negotiated: &Negotiated,
        max_len: Option<u64>,
        limits: &Limits,
    ) -> Self {
        let blksize = negotiated.blksize.max(proto::MIN_BLKSIZE);
        let windowsize = negotiated.windowsize.max(1);
        let receiving = Receiving::new(blksize, windowsize, max_len, negotiated.oack.is_none());
        let limits = Limits {
            rto_min: limits.initial_rto.max(limits.rto_min),
            ..limits.clone()
        };
        Self::new(now, negotiated, Direction::Receive(receiving), &limits)
    }

    fn new(now: Instant, negotiated: &Negotiated, dir: Direction, limits: &Limits) -> Self {
        let blksize = negotiated.blksize.max(proto::MIN_BLKSIZE);
        let windowsize = negotiated.windowsize.max(1);
        let fixed = negotiated.timeout;
        let phase = match negotiated.oack {
            Some(oack) => Phase::Negotiating {
                oack,
                oack_due: true,
            },
            None => Phase::Transferring,
        };
        let mut transfer = Self {
            phase,
            blksize,
            windowsize,
            dir,
            dallying: None,
            rtt: RttEstimator::new(limits, fixed),
            tries: 0,
            max_retries: limits.retries,
            deadline: None,
            progress_at: now,
            max_stall: limits.max_stall,
            min_give_up: limits.min_give_up,
            heard: false,
            last_send: None,
            error_due: None,
            outcome: None,
            event_delivered: false,
            stats: Stats {
                started: now,
                ended: None,
                bytes_acked: 0,
                blocks: 0,
                error: None,
                retransmits: 0,
                blksize,
                windowsize,
                srtt: None,
                rto_floor: limits.rto_min,
            },
            rollover: Rollover::Zero,
        };
        transfer.set_rollover(negotiated.rollover.unwrap_or_default());
        transfer
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A download's content length, once known (None for uploads, and
    /// for netascii until its end was read). Read-only, for the live view.
    pub fn content_len(&self) -> Option<u64> {
        match &self.dir {
            Direction::Send(s) if s.content_len != LEN_UNKNOWN => Some(s.content_len),
            _ => None,
        }
    }

    /// The current retransmission timeout.
    pub fn rto(&self) -> Duration {
        self.rtt.rto
    }

    /// This session's current RTO floor (raised by spurious resends).
    pub fn rto_floor(&self) -> Duration {
        self.rtt.min
    }

    /// The smoothed RTT, once measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.rtt.srtt
    }

    /// Starts the RTO from what an earlier transfer to the same client
    /// learned (the endpoint's path cache, as Linux's tcp_metrics): a lost
    /// OACK or ACK 0 then costs milliseconds, not the initial RTO. Call
    /// before the first `poll_transmit`; later calls, and a transfer with a
    /// negotiated (fixed) timeout, ignore it.
    pub fn seed_from_path(&mut self, path: &PathMetrics) {
        if self.last_send.is_none() {
            self.rtt.seed(path);
            self.stats.rto_floor = self.rtt.min;
        }
    }

    /// What this transfer measured of the path, once it has a DATA sample
    /// (the handshake's alone may be the client's retransmission timeout).
    /// The floor is the one it raised to; if it raised none, half the one
    /// it started with (not below `--rto-min-ms`): otherwise floors would
    /// only ever rise for an address, and many clients behind one address
    /// (NAT, a test rig) would ratchet it to the ceiling.
    pub fn path_metrics(&self) -> Option<PathMetrics> {
        let r = &self.rtt;
        if r.fixed || r.samples == 0 || r.provisional {
            return None;
        }
        let rto_floor = if r.min > r.start_min {
            r.min
        } else {
            (r.min / 2).max(r.base_min)
        };
        Some(PathMetrics {
            srtt: r.srtt?,
            rttvar: r.rttvar,
            rto_floor,
        })
    }

    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    fn end(&mut self, now: Instant, outcome: Outcome, error: Option<(ErrorCode, &'static str)>) {
        self.phase = Phase::Ended;
        self.outcome = Some(outcome);
        self.error_due = error;
        self.stats.error = error.map(|(_, message)| message);
        self.deadline = None;
        self.stats.ended = Some(now);
        self.stats.srtt = self.rtt.srtt;
        self.stats.rto_floor = self.rtt.min;
    }

    /// Ends the transfer from the server side; the peer gets an ERROR.
    pub fn abort(&mut self, now: Instant, why: Abort) {
        if self.phase != Phase::Ended {
            let code = why.code();
            self.end(now, Outcome::Aborted(code), Some((code, why.message())));
        }
    }

    /// The peer began another transfer from the same address and port
    /// (`--single-port`): this one ends now without an ERROR, which the
    /// peer would take for the answer to its new request. An upload
    /// already stored and dallying is complete.
    pub fn supersede(&mut self, now: Instant) {
        if self.phase == Phase::Ended {
            return;
        }
        match self.dallying {
            Some(stored_at) => self.end(stored_at, Outcome::Completed, None),
            None => self.end(now, Outcome::Aborted(ErrorCode::NotDefined), None),
        }
    }

    /// A datagram from the peer (the endpoint has checked its source).
    /// A sender heeds ACK and ERROR, a receiver DATA and ERROR; a runt, a
    /// stray packet or a repeated request is ignored rather than allowed
    /// to end the transfer. A receiver returns the bytes to store: write
    /// them at `offset`; after the `last` block, store the file safely,
    /// then call [`Transfer::commit_done`].
    pub fn handle_datagram<'a>(
        &mut self,
        now: Instant,
        datagram: &'a [u8],
    ) -> Option<Received<'a>> {
        if self.phase == Phase::Ended {
            return None;
        }
        match Packet::parse(datagram) {
            Ok(Packet::Ack { block }) => self.handle_ack(now, block),
            Ok(Packet::Data { block, payload }) => return self.handle_data(now, block, payload),
            Ok(Packet::Error { code, .. }) => {
                let outcome = match (self.phase, code) {
                    // RFC 2347: the client declines our OACK.
                    (Phase::Negotiating { .. }, ErrorCode::OptionRefused) => {
                        Outcome::OptionsDeclined
                    }
                    _ => Outcome::PeerError(code),
                };
                self.end(now, outcome, None);
            }
            Ok(_) | Err(_) => {}
        }
        None
    }

    fn handle_data<'a>(
        &mut self,
        now: Instant,
        block: u16,
        payload: &'a [u8],
    ) -> Option<Received<'a>> {
        let Direction::Receive(r) = &mut self.dir else {
            return None; // DATA means nothing to a sender
        };
        if let Phase::Negotiating { .. } = self.phase {
            // DATA 1 acknowledges our OACK (RFC 2347); nothing else does.
            if block != 1 {
                return None;
            }
            self.phase = Phase::Transferring;
        }
        match r.on_data(block, payload) {
            DataVerdict::Accept {
                offset,
                bytes,
                last,
            } => {
                self.stats.bytes_acked = r.len();
                self.stats.blocks += 1;
                // The first DATA after our ACK (or OACK) answers it.
                if let Some(rtt) = self.rtt_sample(now) {
                    self.rtt.sample(rtt);
                    self.last_send = None;
                }
                self.progress(now);
                if !last {
                    // The sender may stall mid-window: re-ACK on a timeout.
                    self.arm_deadline(now);
                }
                Some(Received {
                    offset,
                    bytes,
                    last,
                })
            }
            DataVerdict::Ignore => None,
            DataVerdict::TooLarge => {
                self.abort(now, Abort::TooLarge);
                None
            }
            DataVerdict::Oversized => {
                self.abort(now, Abort::OversizedBlock);
                None
            }
        }
    }

    /// Receiving: the file is stored under its name; the final ACK goes
    /// out. Without this call the sender never hears that it succeeded.
    pub fn commit_done(&mut self, now: Instant) {
        if let Direction::Receive(r) = &mut self.dir
            && r.is_finished()
            && self.phase != Phase::Ended
        {
            r.commit_done();
            self.progress(now);
        }
    }

    /// The round trip of the newest packet, if it may be measured: not a
    /// resend (Karn's rule), and not answered only after its retransmission
    /// deadline passed. Such an ACK may answer the client's own resend (its
    /// timer ran out as ours did, say 1 s for both before any sample): the
    /// sample would be the client's timeout, not the path.
    fn rtt_sample(&self, now: Instant) -> Option<Duration> {
        match self.last_send {
            Some((sent_at, false)) if self.deadline.is_none_or(|d| now < d) => {
                Some(now.saturating_duration_since(sent_at))
            }
            _ => None,
        }
    }

    fn take_rtt_sample(&mut self, now: Instant) {
        if let Some(rtt) = self.rtt_sample(now) {
            self.rtt.sample(rtt);
        }
    }

    fn progress(&mut self, now: Instant) {
        self.heard = true;
        self.tries = 0;
        self.deadline = None;
        self.progress_at = now;
    }

    fn handle_ack(&mut self, now: Instant, block: u16) {
        let Direction::Send(s) = &self.dir else {
            return; // an ACK means nothing to a receiver, not even ACK 0
        };
        let (prev, sent_high) = (s.acked, s.sent_high);
        if let Phase::Negotiating { .. } = self.phase {
            if block == 0 {
                if let Some(rtt) = self.rtt_sample(now) {
                    self.rtt.sample_handshake(rtt);
                }
                self.phase = Phase::Transferring;
                self.progress(now);
            }
            return;
        }
        // The one block in acked..=sent_high whose number is `block`.
        let Some(acked) = self.rollover.at_or_after(prev, block) else {
            return; // ACK 0 once blocks roll over to 1: never sent
        };
        if (acked > sent_high || acked == prev) && self.proves_resend_spurious(now, block) {
            return;
        }
        let Direction::Send(s) = &mut self.dir else {
            return;
        };
        if acked > s.sent_high {
            return; // stale (from before the window) or never sent
        }
        if acked == s.acked {
            self.handle_duplicate_ack(now);
            return;
        }
        if acked == s.sent_high {
            self.take_rtt_sample(now);
        }
        let Direction::Send(s) = &mut self.dir else {
            return;
        };
        if let Some(sent_before) = s.timeout_resend.take() {
            let resent_at = s.head_sent.map_or(now, |(last, _)| last);
            if self
                .rtt
                .too_fast_for(now.saturating_duration_since(resent_at))
            {
                // Eifel (RFC 3522) by timing: no answer to the resend could
                // come back this soon, so this ACK answers the original.
                self.rtt
                    .spurious(now.saturating_duration_since(sent_before));
            } else {
                s.spurious_probes.rotate_right(1);
                s.spurious_probes[0] = Some(SpuriousProbe {
                    block: acked,
                    sent_before,
                    first_ack: now,
                });
            }
        }
        let Direction::Send(s) = &mut self.dir else {
            return;
        };
        // RFC 7440 receivers ACK only after a full window: never send less.
        s.burst = u64::from(self.windowsize);
        s.confirmed = true;
        s.acked = acked;
        // RFC 7440 §4: an ACK inside the window restarts it after that block.
        s.next = acked + 1;
        s.head_sent = None;
        s.fast_resent_at = None;
        self.stats.bytes_acked = (acked * u64::from(self.blksize)).min(s.content_len);
        self.stats.blocks = acked;
        let done = acked == s.total_blocks;
        self.progress(now);
        if done {
            self.end(now, Outcome::Completed, None);
        }
    }

    /// An ACK of the block already acknowledged. RFC 1123 §4.2.3.1: a
    /// plain duplicate never triggers a resend (Sorcerer's Apprentice).
    /// In a window, though, it is also the client's ACK of its last
    /// in-order block, sent when the head of our window went missing
    /// (RFC 7440 §4): resend the window at once, not after an RTO, but only
    /// once per step of progress and only if the ACK came late enough (half
    /// an SRTT after the head left) to answer this window rather than be a
    /// copy of the ACK that opened it. Copies and echoes of our resends
    /// therefore never cascade.
    fn handle_duplicate_ack(&mut self, now: Instant) {
        let Direction::Send(s) = &mut self.dir else {
            return;
        };
        if self.windowsize == 1 || s.sent_high <= s.acked || s.fast_resent_at == Some(s.acked) {
            return;
        }
        let (Some((head_at, _)), Some(srtt)) = (s.head_sent, self.rtt.srtt) else {
            return;
        };
        if now.saturating_duration_since(head_at) < srtt / 2 {
            return;
        }
        s.fast_resent_at = Some(s.acked);
        s.next = s.acked + 1;
    }

    /// A second ACK of the block that answered our last timeout resend
    /// (now a duplicate, or stale once the transfer moved on): both copies
    /// reached the client, so the resend was spurious. Whichever copy this
    /// ACK answers, the client took at least this long to answer the
    /// original: the session's RTO floor rises above that.
    fn proves_resend_spurious(&mut self, now: Instant, block: u16) -> bool {
        let Direction::Send(s) = &mut self.dir else {
            return false;
        };
        let (acked, rollover) = (s.acked, self.rollover);
        // A copy the network made comes within microseconds of the first.
        let apart = self.rtt.srtt.map_or(Duration::from_millis(1), |srtt| {
            (srtt / 2).max(Duration::from_millis(1))
        });
        // Half the block-number space: beyond it a number is ambiguous.
        let hit = s.spurious_probes.iter_mut().find(|p| {
            p.is_some_and(|p| {
                rollover.wire(p.block) == block
                    && acked - p.block < 0x8000
                    && now.saturating_duration_since(p.first_ack) >= apart
            })
        });
        let Some(probe) = hit.and_then(|p| p.take()) else {
            return false;
        };
        self.rtt
            .spurious(now.saturating_duration_since(probe.sent_before));
        true
    }

    /// The deadline passed (spurious calls are no-ops): resend, or give up
    /// after `--retries` or once the transfer made no progress for too long.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.deadline {
            Some(deadline) if now >= deadline => {}
            _ => return,
        }
        self.deadline = None;
        if let Some(stored_at) = self.dallying {
            // No repeat of the final DATA came: our last ACK arrived. The
            // transfer took until the file was stored, not the dally.
            self.end(stored_at, Outcome::Completed, None);
            return;
        }
        self.tries += 1;
        let since_progress = now.saturating_duration_since(self.progress_at);
        let stalled = since_progress >= self.max_stall;
        let patient = self.heard
            && since_progress < self.min_give_up
            && self.tries <= self.max_retries + MAX_PATIENT_RETRIES;
        if stalled || (self.tries > self.max_retries && !patient) {
            let why = Abort::TimedOut;
            self.end(now, Outcome::TimedOut, Some((why.code(), why.message())));
            return;
        }
        self.rtt.back_off();
        match &mut self.phase {
            Phase::Negotiating { oack_due, .. } => *oack_due = true,
            Phase::Transferring => {
                let s = match &mut self.dir {
                    Direction::Send(s) => s,
                    Direction::Receive(r) => {
                        r.on_timeout();
                        return;
                    }
                };
                s.next = s.acked + 1;
                if !s.confirmed {
                    s.burst = 1;
                }
                // Only a single resend can be proven spurious: two ACKs
                // then mean both copies arrived. After several resends two
                // ACKs may answer two of the resends.
                s.timeout_resend = if self.tries == 1 {
                    s.head_sent.map(|(last, _)| last)
                } else {
                    None
                };
            }
            Phase::Ended => {}
        }
    }

    /// The next datagram to send, written to `buf` (at least 516 bytes:
    /// an OACK or ERROR fits). Call until `None`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        match self.phase {
            Phase::Ended => {
                let (code, message) = self.error_due.take()?;
                let len = proto::emit_error(code, message, buf).ok()?;
                Some(Transmit::Error { code, len })
            }
            Phase::Negotiating { oack, oack_due } => {
                if !oack_due {
                    return None;
                }
                let len = Packet::Oack(oack).emit(buf).ok()?;
                let resend = self.last_send.is_some();
                self.phase = Phase::Negotiating {
                    oack,
                    oack_due: false,
                };
                self.note_send(now, resend);
                Some(Transmit::Oack { len })
            }
            Phase::Transferring => {
                let s = match &mut self.dir {
                    Direction::Send(s) => s,
                    Direction::Receive(r) => {
                        let (block, repeat) = r.poll_ack()?;
                        Packet::Ack { block }.emit(buf).ok()?;
                        let complete = r.is_complete();
                        // Karn: no RTT sample from the DATA after a re-ACK.
                        self.note_send(now, repeat);
                        if complete {
                            // RFC 1350 §6: dally, answering a repeat of the
                            // final DATA, rather than leave the sender in
                            // doubt about a file already safely stored.
                            self.dallying.get_or_insert(now);
                        }
                        return Some(Transmit::Ack { block });
                    }
                };
                if s.next > s.total_blocks || s.next > s.acked + s.burst {
                    return None;
                }
                let block = s.next;
                proto::emit_data_header(self.rollover.wire(block), buf).ok()?;
                let offset = (block - 1) * u64::from(self.blksize);
                let len = (s.content_len - offset).min(u64::from(self.blksize)) as usize;
                let resend = block <= s.sent_high;
                if block == s.acked + 1 {
                    let first = s.head_sent.map_or(now, |(_, first)| first);
                    s.head_sent = Some((now, first));
                }
                let last = block == s.total_blocks;
                s.next += 1;
                s.sent_high = s.sent_high.max(block);
                self.note_send(now, resend);
                Some(Transmit::Data {
                    block,
                    payload: Payload { offset, len },
                    last,
                })
            }
        }
    }

    fn note_send(&mut self, now: Instant, resend: bool) {
        if resend {
            self.stats.retransmits += 1;
        }
        self.last_send = Some((now, resend));
        self.arm_deadline(now);
    }

    fn arm_deadline(&mut self, now: Instant) {
        let stall_deadline = self.progress_at + self.max_stall;
        let mut rto = self.rtt.rto;
        if matches!(self.phase, Phase::Negotiating { .. }) && !self.rtt.fixed {
            // Never past the operator's ceiling (--rto-max-ms).
            rto = rto.max(OACK_RTO_FLOOR.min(self.rtt.max));
        }
        self.deadline = Some((now + rto).min(stall_deadline));
    }

    /// The one next deadline, if any.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// How the transfer ended: `Some` once, after its last packet (an
    /// ERROR, if any) was drained by `poll_transmit`.
    pub fn poll_event(&mut self) -> Option<Outcome> {
        if self.phase != Phase::Ended || self.error_due.is_some() || self.event_delivered {
            return None;
        }
        self.event_delivered = true;
        self.outcome
    }
}

impl Transfer {
    /// True until the peer acknowledged anything: a repeated request from
    /// it is then a retransmission, not a new transfer.
    pub fn awaiting_first_ack(&self) -> bool {
        match self.phase {
            Phase::Negotiating { .. } => true,
            Phase::Transferring => match &self.dir {
                Direction::Send(s) => s.acked == 0,
                Direction::Receive(r) => r.blocks() == 0,
            },
            Phase::Ended => false,
        }
    }
}
