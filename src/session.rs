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

use crate::proto::{self, ErrorCode, Options, Packet};

/// Server-wide limits and timer policy for transfers.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest blksize granted (`--max-blksize`).
    pub max_blksize: u16,
    /// Largest windowsize granted (`--max-windowsize`).
    pub max_windowsize: u16,
    /// Clamp blksize to the ingress interface's MTU.
    pub mtu_clamp: bool,
    /// RTO before the first RTT sample (RFC 6298 §2.1).
    pub initial_rto: Duration,
    /// Floor and ceiling of the adaptive RTO.
    pub rto_min: Duration,
    pub rto_max: Duration,
    /// Retransmissions of one packet before giving up.
    pub retries: u32,
}

/// What a DATA transmit carries besides its header: a byte range of the
/// file, for the driver to send from the mapping without copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    pub offset: u64,
    pub len: usize,
}

/// One datagram to send to the peer: the first `header_len` bytes of the
/// caller's buffer, followed by `payload` from the file if present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub header_len: usize,
    pub payload: Option<Payload>,
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
    /// DATA and OACK packets sent again.
    pub retransmits: u64,
    pub blksize: u16,
    pub windowsize: u16,
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
    /// The client's `timeout` in seconds, if accepted: a fixed RTO.
    pub timeout: Option<u8>,
    /// The options to acknowledge in an OACK, or None to start with DATA 1.
    pub oack: Option<Options>,
}

/// Decides which requested options to accept (RFC 2347/2348/2349/7440).
/// Out-of-range values are ignored (left out of the OACK), except blksize
/// and windowsize above our limits, which are lowered.
pub fn negotiate(
    requested: &Options,
    content_len: u64,
    mtu: Option<u32>,
    ipv6: bool,
    limits: &Limits,
) -> Negotiated {
    let mut oack = Options::default();
    let mut blksize = proto::DEFAULT_BLKSIZE;
    if let Some(asked) = requested
        .blksize
        .filter(|&b| b >= u32::from(proto::MIN_BLKSIZE))
    {
        let mut cap = u32::from(limits.max_blksize.min(proto::MAX_BLKSIZE));
        if limits.mtu_clamp {
            if let Some(mtu) = mtu {
                // Like dnsmasq: many PXE ROMs cannot take fragments.
                cap = cap.min(mtu.saturating_sub(overhead(ipv6)));
            }
        }
        let granted = asked.min(cap).max(u32::from(proto::MIN_BLKSIZE));
        blksize = u16::try_from(granted).unwrap_or(proto::MAX_BLKSIZE);
        oack.blksize = Some(u32::from(blksize));
    }
    let timeout = requested
        .timeout
        .filter(|t| (1..=255).contains(t))
        .and_then(|t| u8::try_from(t).ok());
    oack.timeout = timeout.map(u32::from);
    // RFC 2349: in a read request the client sends 0 and we answer the size.
    oack.tsize = requested.tsize.map(|_| content_len);
    let mut windowsize = 1;
    if let Some(asked) = requested.windowsize.filter(|&w| w >= 1) {
        let cap = limits.max_windowsize.clamp(1, MAX_WINDOWSIZE);
        windowsize = u16::try_from(asked.min(u32::from(cap))).unwrap_or(cap);
        oack.windowsize = Some(u32::from(windowsize));
    }
    Negotiated {
        blksize,
        windowsize,
        timeout,
        oack: (!oack.is_empty()).then_some(oack),
    }
}

/// Smoothed RTT and retransmission timeout (RFC 6298).
#[derive(Debug, Clone, Copy)]
struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
    rto: Duration,
    min: Duration,
    max: Duration,
    /// A client-negotiated timeout: fixed, neither adapted nor backed off.
    fixed: bool,
}

impl RttEstimator {
    fn new(limits: &Limits, fixed: Option<Duration>) -> Self {
        Self {
            srtt: None,
            rttvar: Duration::ZERO,
            rto: fixed.unwrap_or(limits.initial_rto),
            min: limits.rto_min,
            max: limits.rto_max.max(limits.rto_min),
            fixed: fixed.is_some(),
        }
    }

    fn sample(&mut self, rtt: Duration) {
        if self.fixed {
            return;
        }
        let srtt = match self.srtt {
            None => {
                self.rttvar = rtt / 2;
                rtt
            }
            Some(srtt) => {
                let err = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + err) / 4;
                (srtt * 7 + rtt) / 8
            }
        };
        self.srtt = Some(srtt);
        // RFC 6298 §2.3, with a 1 ms clock granularity G.
        let rto = srtt + (self.rttvar * 4).max(Duration::from_millis(1));
        self.rto = rto.clamp(self.min, self.max);
    }

    /// RFC 6298 §5.5: double on each expiry, up to the ceiling.
    fn back_off(&mut self) {
        if !self.fixed {
            self.rto = (self.rto * 2).min(self.max);
        }
    }
}

/// Where a read transfer stands. Uploads (WRQ) will add a receiving
/// direction beside it; the timer, retry and ending logic are shared.
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    sending: Sending,
    rtt: RttEstimator,
    /// Timeouts in a row without progress.
    tries: u32,
    max_retries: u32,
    deadline: Option<Instant>,
    /// When the newest packet went out, and whether it was a resend
    /// (Karn's rule: no RTT sample from a retransmitted packet).
    last_send: Option<(Instant, bool)>,
    error_due: Option<(ErrorCode, &'static str)>,
    outcome: Option<Outcome>,
    event_delivered: bool,
    stats: Stats,
}

impl Transfer {
    /// A read transfer of `content_len` bytes, as negotiated.
    pub fn new_read(
        now: Instant,
        negotiated: &Negotiated,
        content_len: u64,
        limits: &Limits,
    ) -> Self {
        let blksize = negotiated.blksize.max(proto::MIN_BLKSIZE);
        let fixed = negotiated
            .timeout
            .map(|t| Duration::from_secs(u64::from(t)));
        let phase = match negotiated.oack {
            Some(oack) => Phase::Negotiating {
                oack,
                oack_due: true,
            },
            None => Phase::Transferring,
        };
        Self {
            phase,
            blksize,
            windowsize: negotiated.windowsize.max(1),
            sending: Sending {
                content_len,
                total_blocks: content_len / u64::from(blksize) + 1,
                acked: 0,
                next: 1,
                sent_high: 0,
            },
            rtt: RttEstimator::new(limits, fixed),
            tries: 0,
            max_retries: limits.retries,
            deadline: None,
            last_send: None,
            error_due: None,
            outcome: None,
            event_delivered: false,
            stats: Stats {
                started: now,
                ended: None,
                bytes_acked: 0,
                retransmits: 0,
                blksize,
                windowsize: negotiated.windowsize.max(1),
            },
        }
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The current retransmission timeout.
    pub fn rto(&self) -> Duration {
        self.rtt.rto
    }

    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    fn end(&mut self, now: Instant, outcome: Outcome, error: Option<(ErrorCode, &'static str)>) {
        self.phase = Phase::Ended;
        self.outcome = Some(outcome);
        self.error_due = error;
        self.deadline = None;
        self.stats.ended = Some(now);
    }

    /// Ends the transfer from the server side; the peer gets an ERROR.
    pub fn abort(&mut self, now: Instant, code: ErrorCode, message: &'static str) {
        if self.phase != Phase::Ended {
            self.end(now, Outcome::Aborted(code), Some((code, message)));
        }
    }

    /// A datagram from the peer (the endpoint has checked its source).
    pub fn handle_datagram(&mut self, now: Instant, datagram: &[u8]) {
        if self.phase == Phase::Ended {
            return;
        }
        match Packet::parse(datagram) {
            Ok(Packet::Ack { block }) => self.handle_ack(now, block),
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
            Ok(_) | Err(_) => {
                let code = ErrorCode::IllegalOperation;
                self.end(
                    now,
                    Outcome::Aborted(code),
                    Some((code, "illegal TFTP operation")),
                );
            }
        }
    }

    fn take_rtt_sample(&mut self, now: Instant) {
        if let Some((sent_at, false)) = self.last_send {
            self.rtt.sample(now.saturating_duration_since(sent_at));
        }
    }

    fn handle_ack(&mut self, now: Instant, block: u16) {
        if let Phase::Negotiating { .. } = self.phase {
            if block == 0 {
                self.take_rtt_sample(now);
                self.phase = Phase::Transferring;
                self.tries = 0;
                self.deadline = None;
            }
            return;
        }
        let s = &mut self.sending;
        // The one block in acked..=sent_high whose number is `block`.
        let delta = u64::from(block.wrapping_sub(s.acked as u16));
        let acked = s.acked + delta;
        if acked > s.sent_high {
            return; // stale (from before the window) or never sent
        }
        if acked == s.acked {
            // RFC 1123 §4.2.3.1: never resend on a duplicate ACK (Sorcerer's
            // Apprentice); the retransmission timer recovers real losses.
            return;
        }
        if acked == s.sent_high {
            self.take_rtt_sample(now);
        }
        let s = &mut self.sending;
        s.acked = acked;
        // RFC 7440 §4: an ACK inside the window restarts it after that block.
        s.next = acked + 1;
        self.stats.bytes_acked = (acked * u64::from(self.blksize)).min(s.content_len);
        self.tries = 0;
        self.deadline = None;
        if acked == s.total_blocks {
            self.end(now, Outcome::Completed, None);
        }
    }

    /// The retransmission deadline passed (spurious calls are no-ops).
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.deadline {
            Some(deadline) if now >= deadline => {}
            _ => return,
        }
        self.deadline = None;
        self.tries += 1;
        if self.tries > self.max_retries {
            self.end(
                now,
                Outcome::TimedOut,
                Some((ErrorCode::NotDefined, "timed out")),
            );
            return;
        }
        self.rtt.back_off();
        match &mut self.phase {
            Phase::Negotiating { oack_due, .. } => *oack_due = true,
            Phase::Transferring => self.sending.next = self.sending.acked + 1,
            Phase::Ended => {}
        }
    }

    /// The next datagram to send, written to `buf` (at least 516 bytes:
    /// an OACK or ERROR fits). Call until `None`.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        match self.phase {
            Phase::Ended => {
                let (code, message) = self.error_due.take()?;
                let header_len = proto::emit_error(code, message, buf).ok()?;
                Some(Transmit {
                    header_len,
                    payload: None,
                })
            }
            Phase::Negotiating { oack, oack_due } => {
                if !oack_due {
                    return None;
                }
                let header_len = Packet::Oack(oack).emit(buf).ok()?;
                let resend = self.last_send.is_some();
                self.phase = Phase::Negotiating {
                    oack,
                    oack_due: false,
                };
                self.note_send(now, resend);
                Some(Transmit {
                    header_len,
                    payload: None,
                })
            }
            Phase::Transferring => {
                let s = &mut self.sending;
                if s.next > s.total_blocks || s.next > s.acked + u64::from(self.windowsize) {
                    return None;
                }
                let block = s.next;
                let header_len = proto::emit_data_header(block as u16, buf).ok()?;
                let offset = (block - 1) * u64::from(self.blksize);
                let len = (s.content_len - offset).min(u64::from(self.blksize)) as usize;
                let resend = block <= s.sent_high;
                s.next += 1;
                s.sent_high = s.sent_high.max(block);
                self.note_send(now, resend);
                Some(Transmit {
                    header_len,
                    payload: Some(Payload { offset, len }),
                })
            }
        }
    }

    fn note_send(&mut self, now: Instant, resend: bool) {
        if resend {
            self.stats.retransmits += 1;
        }
        self.last_send = Some((now, resend));
        self.deadline = Some(now + self.rtt.rto);
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

    /// The outcome, once ended.
    pub fn outcome(&self) -> Option<Outcome> {
        self.outcome
    }
}

impl Transfer {
    /// True until the peer acknowledged anything: a repeated request from
    /// it is then a retransmission, not a new transfer.
    pub fn awaiting_first_ack(&self) -> bool {
        match self.phase {
            Phase::Negotiating { .. } => true,
            Phase::Transferring => self.sending.acked == 0,
            Phase::Ended => false,
        }
    }

    /// Ended, with nothing left to transmit.
    pub fn is_drained(&self) -> bool {
        self.phase == Phase::Ended && self.error_due.is_none()
    }
}
