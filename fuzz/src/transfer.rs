//! `transfer`: one `session::Transfer` (a read of a file that is never
//! materialized: only offsets are checked) fed datagrams and timeouts,
//! with `poll_transmit` drained after every input. Invariants, at every
//! step:
//! - negotiation grants only what was asked, within the limits;
//! - an OACK (exactly the negotiated one) comes first when negotiated, and
//!   no DATA before its ACK 0;
//! - a DATA payload is the block's own byte range of the file: offset a
//!   multiple of blksize, offset + len <= content_len, len = blksize except
//!   for the last block, and the wire block number is that block's;
//! - a DATA block is above the acknowledged block and at most windowsize
//!   beyond it;
//! - while not ended there is a deadline, never more than the largest RTO
//!   away; each expiry retransmits; at most `retries + 1` expiries in a
//!   row without progress end the transfer, or for a peer that made
//!   progress once, up to `MAX_PATIENT_RETRIES` more while `min_give_up`
//!   has not passed since that progress (so it always ends within a
//!   bounded count of max RTOs of its last progress);
//! - `poll_event` is `Some` exactly once, right after the transfer ended
//!   and its last packet was drained, and its outcome fits the input that
//!   ended it; nothing is sent after it.

use std::time::{Duration, Instant};

use ringtftpd::proto::{self, ErrorCode, Options, Packet};
use ringtftpd::refusal::Abort;
use ringtftpd::session::{self, Limits, Negotiated, Outcome, Transfer, Transmit};

use crate::input::{Encoder, Input};

/// The documented minimum `poll_transmit` buffer.
const BUF_LEN: usize = 516;

/// Most DATA a single drain may yield: a window (plus slack for an OACK
/// or ERROR).
fn drain_bound(window: u64) -> usize {
    usize::try_from(window)
        .unwrap_or(usize::MAX)
        .saturating_add(2)
}

pub fn run(data: &[u8]) {
    play(data, true);
}

/// How the transfer stood after the input, before the expiries that end
/// it (for checking that a seed does what it says).
pub fn outcome_of(data: &[u8]) -> Option<Outcome> {
    play(data, false)
}

fn play(data: &[u8], finish: bool) -> Option<Outcome> {
    let mut input = Input::new(data);
    let limits = crate::limits(&mut input);
    let requested = crate::options(&mut input);
    let mtu = crate::mtu(&mut input);
    let ipv6 = input.bool();
    // blksize does not depend on the length, so a length can be drawn
    // relative to it (exact multiples end with an empty block).
    let blksize = session::negotiate(&requested, 0, mtu, ipv6, &limits).blksize;
    let content_len = content_len(&mut input, blksize);
    let negotiated = session::negotiate(&requested, content_len, mtu, ipv6, &limits);
    check_negotiated(&requested, &negotiated, content_len, mtu, ipv6, &limits);

    let mut h = Harness::new(negotiated, content_len, limits);
    h.drain();
    while !input.is_empty() {
        h.step(&mut input);
    }
    if finish {
        h.time_out();
    }
    h.outcome
}

fn content_len(input: &mut Input, blksize: u16) -> u64 {
    let blksize = u64::from(blksize);
    match input.u8() % 5 {
        0 => u64::from(input.u8()),
        1 => u64::from(input.u16()),
        // Up to 16 MiB: past 65536 blocks at small blksizes (rollover).
        2 => u64::from(input.u32() & 0xff_ffff),
        3 => u64::from(input.u16()) * blksize,
        _ => (u64::from(input.u16()) * blksize).saturating_sub(1),
    }
}

fn check_negotiated(
    requested: &Options,
    n: &Negotiated,
    content_len: u64,
    mtu: Option<u32>,
    ipv6: bool,
    limits: &Limits,
) {
    let oack = n.oack.unwrap_or_default();
    match requested
        .blksize
        .filter(|&b| b >= u32::from(proto::MIN_BLKSIZE))
    {
        Some(asked) => {
            let mut cap = u32::from(limits.max_blksize.min(proto::MAX_BLKSIZE));
            if limits.mtu_clamp
                && let Some(mtu) = mtu
            {
                let fits = mtu.saturating_sub(if ipv6 { 52 } else { 32 } + limits.mtu_slack);
                cap = cap.min(fits.max(u32::from(proto::DEFAULT_BLKSIZE)));
            }
            let cap = cap.max(u32::from(proto::MIN_BLKSIZE));
            assert!(
                u32::from(n.blksize) <= cap,
                "blksize {} over cap {cap}",
                n.blksize
            );
            assert!(u32::from(n.blksize) <= asked, "blksize above the request");
            assert!(n.blksize >= proto::MIN_BLKSIZE);
            assert_eq!(oack.blksize, Some(u32::from(n.blksize)));
        }
        None => {
            assert_eq!(n.blksize, proto::DEFAULT_BLKSIZE);
            assert_eq!(oack.blksize, None);
        }
    }
    match requested.windowsize.filter(|&w| w >= 1) {
        Some(asked) => {
            let cap = limits.max_windowsize.clamp(1, session::MAX_WINDOWSIZE);
            assert!(
                n.windowsize >= 1 && n.windowsize <= cap,
                "windowsize {}",
                n.windowsize
            );
            assert!(u32::from(n.windowsize) <= asked);
            // --window-bytes, unless that leaves under two blocks.
            let bytes = u64::from(n.windowsize) * u64::from(n.blksize);
            assert!(n.windowsize == 1 || bytes <= limits.max_window_bytes);
            // A window of one is lockstep, not acknowledged (tftpd-hpa 7.x).
            let acked = (n.windowsize > 1).then_some(u32::from(n.windowsize));
            assert_eq!(oack.windowsize, acked);
        }
        None => {
            assert_eq!(n.windowsize, 1);
            assert_eq!(oack.windowsize, None);
        }
    }
    match n.timeout {
        Some(t) => {
            let secs = u32::try_from(t.as_secs()).ok();
            assert!(t.as_secs() >= 1 && t.subsec_nanos() == 0);
            assert!(requested.timeout.is_some() && requested.timeout == secs);
            // Never above the RTO ceiling: a slot is not held for minutes.
            assert!(t <= limits.rto_max);
            assert_eq!(oack.timeout, secs);
        }
        None => {
            let acceptable = requested
                .timeout
                .filter(|t| (1..=255).contains(t))
                .is_some_and(|t| Duration::from_secs(u64::from(t)) <= limits.rto_max);
            assert!(!acceptable, "an acceptable timeout was declined");
            assert_eq!(oack.timeout, None);
        }
    }
    assert_eq!(oack.tsize, requested.tsize.map(|_| content_len));
    assert_eq!(n.oack.is_some(), !oack.is_empty());
}

/// What the last input was, to check that an outcome fits its cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cause {
    Start,
    Ack,
    PeerError(ErrorCode),
    /// A datagram that is neither an ACK nor an ERROR.
    Other,
    /// A deadline that had passed.
    Expiry,
    /// A timeout call before the deadline (must change nothing).
    Spurious,
    Abort(ErrorCode),
}

/// The transfer under test and what the harness knows independently.
pub struct Harness {
    t: Transfer,
    now: Instant,
    buf: Vec<u8>,
    negotiated: Negotiated,
    content_len: u64,
    blksize: u64,
    window: u64,
    total_blocks: u64,
    /// The longest interval a deadline may be set ahead.
    max_rto: Duration,
    retries: u32,
    oack_sent: bool,
    /// ACK 0 answered the OACK (or there was none).
    confirmed: bool,
    /// Highest block acknowledged, and highest sent (absolute, 1-based).
    acked: u64,
    sent_high: u64,
    /// Deadline expiries since the last progress, and when that was.
    expiries: u32,
    progress_at: Instant,
    /// When the latest expiry was handled.
    last_expiry: Option<Instant>,
    /// The peer made progress once: it may be waited for (`min_give_up`).
    heard: bool,
    min_give_up: Duration,
    cause: Cause,
    error_sent: bool,
    outcome: Option<Outcome>,
}

impl Harness {
    pub fn new(negotiated: Negotiated, content_len: u64, limits: Limits) -> Self {
        let now = Instant::now();
        let t = Transfer::new_read(now, &negotiated, content_len, &limits);
        let blksize = u64::from(negotiated.blksize.max(proto::MIN_BLKSIZE));
        let fixed = negotiated.timeout.unwrap_or(Duration::ZERO);
        Self {
            t,
            now,
            buf: vec![0u8; BUF_LEN],
            negotiated,
            content_len,
            blksize,
            window: u64::from(negotiated.windowsize.max(1)),
            total_blocks: content_len / blksize + 1,
            max_rto: limits
                .initial_rto
                .max(limits.rto_max)
                .max(limits.rto_min)
                .max(fixed),
            retries: limits.retries,
            oack_sent: false,
            confirmed: negotiated.oack.is_none(),
            acked: 0,
            sent_high: 0,
            expiries: 0,
            progress_at: now,
            last_expiry: None,
            heard: false,
            min_give_up: limits.min_give_up,
            cause: Cause::Start,
            error_sent: false,
            outcome: None,
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
    }

    fn datagram(&mut self, datagram: &[u8]) {
        self.cause = match Packet::parse(datagram) {
            Ok(Packet::Ack { block }) => {
                self.model_ack(block);
                Cause::Ack
            }
            Ok(Packet::Error { code, .. }) => Cause::PeerError(code),
            _ => Cause::Other,
        };
        self.t.handle_datagram(self.now, datagram);
        self.drain();
    }

    /// RFC 1350/7440 ACK semantics: ACK n acknowledges the one block in
    /// acked..=sent_high numbered n (mod 65536); anything else is stale.
    fn model_ack(&mut self, block: u16) {
        if self.outcome.is_some() || self.t.is_ended() {
            return;
        }
        if !self.confirmed {
            if block == 0 && self.oack_sent {
                self.confirmed = true;
                self.progress();
            }
            return;
        }
        let delta = u64::from(block.wrapping_sub(self.acked as u16));
        let acked = self.acked + delta;
        if acked > self.acked && acked <= self.sent_high {
            self.acked = acked;
            self.progress();
        }
    }

    fn progress(&mut self) {
        self.expiries = 0;
        self.progress_at = self.now;
        self.heard = true;
    }

    /// Expiries without progress the transfer may survive: `retries`, and
    /// for a peer that answered, a bounded few more while `min_give_up`
    /// had not passed since its last progress at the latest expiry (the
    /// transfer decides at its expiries, not as time passes between them).
    fn expiries_allowed(&self) -> u32 {
        let at = self.last_expiry.unwrap_or(self.now);
        let patient =
            self.heard && at.saturating_duration_since(self.progress_at) < self.min_give_up;
        if patient {
            self.retries + session::MAX_PATIENT_RETRIES
        } else {
            self.retries
        }
    }

    fn timeout(&mut self, at: Instant) {
        self.now = self.now.max(at);
        let expired = self.t.poll_timeout().is_some_and(|d| self.now >= d);
        self.cause = if expired {
            self.expiries += 1;
            self.last_expiry = Some(self.now);
            Cause::Expiry
        } else {
            Cause::Spurious
        };
        self.t.handle_timeout(self.now);
        let sent = self.drain();
        if expired && !self.t.is_ended() {
            assert!(
                sent > 0,
                "an expiry that did not end the transfer sent nothing"
            );
        }
        if !expired {
            assert_eq!(sent, 0, "a spurious timeout call sent something");
        }
    }

    /// Drains `poll_transmit`, checking each datagram and the state after.
    fn drain(&mut self) -> usize {
        let mut sent = 0;
        while let Some(transmit) = self.t.poll_transmit(self.now, &mut self.buf) {
            sent += 1;
            assert!(
                sent <= drain_bound(self.window),
                "poll_transmit does not stop ({sent} datagrams, window {})",
                self.window
            );
            self.check_transmit(transmit);
        }
        self.after_drain();
        sent
    }

    fn check_transmit(&mut self, transmit: Transmit) {
        assert!(
            self.outcome.is_none() && !self.error_sent,
            "sent after the end: {transmit:?}"
        );
        assert!(transmit.header_len() <= self.buf.len());
        let header = &self.buf[..transmit.header_len()];
        match Packet::parse(header) {
            Ok(Packet::Oack(options)) => {
                assert_eq!(transmit, Transmit::Oack { len: header.len() });
                assert!(
                    !self.confirmed,
                    "OACK after ACK 0 or without one negotiated"
                );
                assert_eq!(Some(options), self.negotiated.oack, "OACK differs");
                self.oack_sent = true;
            }
            Ok(Packet::Data { block, payload }) => {
                assert!(payload.is_empty() && transmit.header_len() == 4);
                assert!(self.confirmed, "DATA before the OACK was acknowledged");
                let Transmit::Data {
                    block: said,
                    payload: p,
                    last,
                } = transmit
                else {
                    panic!("DATA sent as {transmit:?}");
                };
                let len = p.len as u64;
                assert!(
                    p.offset % self.blksize == 0,
                    "offset {} not on a block",
                    p.offset
                );
                let abs = p.offset / self.blksize + 1;
                assert_eq!(block, abs as u16, "wire block vs offset {}", p.offset);
                assert_eq!(said, abs, "Transmit's block vs offset {}", p.offset);
                assert_eq!(last, abs == self.total_blocks, "last vs block {abs}");
                assert!(abs <= self.total_blocks, "block {abs} beyond the file");
                assert!(
                    p.offset
                        .checked_add(len)
                        .is_some_and(|end| end <= self.content_len),
                    "payload {p:?} beyond the file ({} bytes)",
                    self.content_len
                );
                assert_eq!(
                    len,
                    (self.content_len - p.offset).min(self.blksize),
                    "short payload inside the file"
                );
                assert!(abs > self.acked, "block {abs} was already acknowledged");
                assert!(
                    abs <= self.acked + self.window,
                    "block {abs} beyond ACK {} + window {}",
                    self.acked,
                    self.window
                );
                self.sent_high = self.sent_high.max(abs);
            }
            Ok(Packet::Error { code, .. }) => {
                assert_eq!(
                    transmit,
                    Transmit::Error {
                        code,
                        len: header.len()
                    }
                );
                assert!(self.t.is_ended(), "ERROR sent by a live transfer");
                self.error_sent = true;
            }
            other => panic!("sent {other:?}"),
        }
    }

    fn after_drain(&mut self) {
        let event = self.t.poll_event();
        if let Some(outcome) = event {
            assert!(self.outcome.is_none(), "second event {outcome:?}");
            self.outcome = Some(outcome);
            self.check_outcome(outcome);
        }
        assert_eq!(self.t.poll_event(), None, "poll_event repeated");
        if self.t.is_ended() {
            assert!(self.outcome.is_some(), "ended and drained but no event");
            return;
        }
        assert!(self.outcome.is_none(), "event while not ended");
        if self.confirmed && self.acked == self.total_blocks {
            panic!("every block acknowledged but the transfer goes on");
        }
        match self.t.poll_timeout() {
            None => panic!("a live transfer without a deadline"),
            Some(deadline) => assert!(
                deadline <= self.now + self.max_rto,
                "deadline {:?} ahead, max RTO {:?}",
                deadline.saturating_duration_since(self.now),
                self.max_rto
            ),
        }
        assert!(
            self.expiries <= self.expiries_allowed(),
            "{} expiries without progress did not end it (retries {})",
            self.expiries,
            self.retries
        );
    }

    fn check_outcome(&self, outcome: Outcome) {
        match outcome {
            Outcome::Completed => {
                assert_eq!(self.cause, Cause::Ack);
                assert_eq!(self.acked, self.total_blocks, "completed early");
            }
            Outcome::OptionsDeclined => {
                assert_eq!(self.cause, Cause::PeerError(ErrorCode::OptionRefused));
                assert!(!self.confirmed);
            }
            Outcome::PeerError(code) => assert_eq!(self.cause, Cause::PeerError(code)),
            Outcome::TimedOut => assert_eq!(self.cause, Cause::Expiry),
            Outcome::Aborted(code) => assert!(
                matches!(self.cause, Cause::Other) || self.cause == Cause::Abort(code),
                "aborted with {code:?} after {:?}",
                self.cause
            ),
        }
    }

    /// One operation decoded from the input.
    fn step(&mut self, input: &mut Input) {
        let op = input.u8();
        // Every datagram arrives a little later (so RTTs vary).
        let delay = Duration::from_micros(u64::from(input.u8()) * 50);
        match op % 12 {
            0 => {
                self.advance(delay);
                self.datagram(&crate::seeds::ack(self.sent_high as u16));
            }
            1 => {
                self.advance(delay);
                let block = input.u16();
                self.datagram(&crate::seeds::ack(block));
            }
            2 => {
                self.advance(delay);
                let rel = i64::from(input.u8() as i8);
                let block = (self.acked as i64).wrapping_add(rel) as u16;
                self.datagram(&crate::seeds::ack(block));
            }
            3 => {
                self.advance(delay);
                self.datagram(&crate::seeds::ack(0));
            }
            4 => {
                // An ACK padded with junk, as some ROMs send.
                self.advance(delay);
                let mut d = crate::seeds::ack(self.sent_high as u16).to_vec();
                d.extend_from_slice(input.short_bytes());
                self.datagram(&d);
            }
            5 => {
                self.advance(delay);
                let mut d = vec![0, 5];
                d.extend_from_slice(&input.u16().to_be_bytes());
                d.extend_from_slice(input.short_bytes());
                self.datagram(&d);
            }
            6 => {
                self.advance(delay);
                let d = input.short_bytes().to_vec();
                self.datagram(&d);
            }
            7 => {
                // Another well-formed packet where an ACK belongs.
                self.advance(delay);
                let d: &[u8] = match input.u8() % 4 {
                    0 => b"\x00\x03\x00\x01data",
                    1 => b"\x00\x01boot.img\x00octet\x00",
                    2 => b"\x00\x06blksize\x00512\x00",
                    _ => b"\x00\x02f\x00octet\x00",
                };
                self.datagram(d);
            }
            8 => {
                // Exactly at the deadline (or now, if there is none).
                let at = self.t.poll_timeout().unwrap_or(self.now);
                self.timeout(at);
            }
            9 => {
                let at = self.now + Duration::from_millis(u64::from(input.u16()));
                self.timeout(at);
            }
            10 => self.advance(Duration::from_millis(u64::from(input.u16()))),
            _ => {
                let why = Abort::ALL[usize::from(input.u8()) % Abort::ALL.len()];
                self.cause = Cause::Abort(why.code());
                self.t.abort(self.now, why);
                self.drain();
            }
        }
    }

    /// Only expiries from here on: the transfer must end within its bound.
    fn time_out(&mut self) {
        for _ in 0..=self.retries + session::MAX_PATIENT_RETRIES + 1 {
            if self.outcome.is_some() {
                return;
            }
            let Some(deadline) = self.t.poll_timeout() else {
                panic!("a live transfer without a deadline");
            };
            self.timeout(deadline);
        }
        assert!(
            self.outcome.is_some(),
            "not ended after retries + patient retries + 1 expiries"
        );
    }
}

// ------------------------------------------------------------------ seeds

/// Encodes a transfer set-up: server-like limits, the options, MTU 1500
/// over IPv4, and an exact content length.
fn setup(e: &mut Encoder, options: &Options, content_len: u16) {
    crate::encode_server_limits(e);
    let mut flags = 0u8;
    let mut values = Encoder::default();
    for (shift, v) in [
        (0, options.blksize),
        (2, options.timeout),
        (4, options.windowsize),
    ] {
        if let Some(v) = v {
            flags |= 2 << shift;
            values.u16(v as u16);
        }
    }
    if options.tsize.is_some() {
        flags |= 1 << 6;
    }
    e.u8(flags);
    e.0.extend_from_slice(&values.0);
    e.u8(1).u8(0); // MTU 1500, IPv4
    e.u8(1).u16(content_len);
}

pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let opts = |blksize, windowsize, tsize: bool| Options {
        blksize,
        timeout: None,
        tsize: tsize.then_some(0),
        windowsize,
        ..Options::default()
    };
    // iPXE / pxelinux: lock-step, ACK 0 then each block.
    for (name, blksize, len) in [("ipxe", 1432, 40 * 1432 + 7), ("pxelinux", 1408, 60)] {
        let mut e = Encoder::default();
        setup(&mut e, &opts(Some(blksize), None, true), len);
        e.u8(3).u8(2);
        for _ in 0..60 {
            e.u8(0).u8(2);
        }
        out.push((name.to_string(), e.0));
    }
    // OVMF: the probe declined with ERROR 8; the windowed fetch.
    let mut e = Encoder::default();
    setup(&mut e, &opts(Some(1468), Some(4), true), 60_000);
    e.u8(5)
        .u8(2)
        .u16(8)
        .short_bytes(b"User aborted the transfer\0");
    out.push(("ovmf-probe".to_string(), e.0));
    let mut e = Encoder::default();
    setup(&mut e, &opts(Some(1468), Some(4), false), 60_000);
    e.u8(3).u8(2);
    for _ in 0..12 {
        e.u8(0).u8(2);
    }
    out.push(("ovmf-fetch".to_string(), e.0));
    // RFC 1350 plain; losses recovered by expiries; a client that vanishes.
    let mut e = Encoder::default();
    setup(&mut e, &Options::default(), 2000);
    e.u8(0)
        .u8(1)
        .u8(8)
        .u8(0)
        .u8(0)
        .u8(1)
        .u8(8)
        .u8(0)
        .u8(8)
        .u8(0)
        .u8(0)
        .u8(1);
    out.push(("plain-loss".to_string(), e.0));
    let mut e = Encoder::default();
    setup(&mut e, &opts(Some(512), Some(16), true), 30_000);
    e.u8(3).u8(1).u8(1).u8(3).u16(5).u8(8).u8(0).u8(0).u8(1);
    out.push(("window-loss".to_string(), e.0));
    out
}
