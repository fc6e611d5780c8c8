//! `receive`: one `session::Transfer` of an upload (`new_write`) fed DATA
//! near the expected block, arbitrary datagrams, timeouts and the owner's
//! commit, with `poll_transmit` drained after every input. Invariants, at
//! every step:
//! - bytes are handed on in order: each accepted range starts where the
//!   last ended, is at most blksize long, and the total never passes the
//!   limit; nothing is accepted after the final (short) block;
//! - the first packet is the OACK when negotiated, else ACK 0; every ACK
//!   acknowledges exactly the blocks accepted so far (mod 65536), and the
//!   final block's ACK never goes out before the commit;
//! - while not ended and not waiting for the commit there is a deadline;
//!   a bounded number of expiries without progress ends it;
//! - `poll_event` is `Some` exactly once, and nothing is sent after it.

use std::time::{Duration, Instant};

use ringtftpd::proto::{self, Packet};
use ringtftpd::session::{self, Negotiated, Outcome, Transfer, Transmit};

use crate::input::Input;

const BUF_LEN: usize = 516;

pub fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let limits = crate::limits(&mut input);
    // Small blocks, so that inputs reach rollover and window edges.
    let blksize = proto::MIN_BLKSIZE + u16::from(input.u8() % 64);
    let windowsize = 1 + u16::from(input.u8() % 8);
    let oack = input.bool().then(|| proto::Options {
        blksize: Some(u32::from(blksize)),
        windowsize: Some(u32::from(windowsize)),
        ..proto::Options::default()
    });
    let limit = input.bool().then(|| u64::from(input.u16()));
    let negotiated = Negotiated {
        blksize,
        windowsize,
        timeout: None,
        rollover: Default::default(),
        oack,
    };
    let mut h = Harness {
        t: Transfer::new_write(Instant::now(), &negotiated, limit, &limits),
        now: Instant::now(),
        blksize: usize::from(blksize),
        limit,
        expect_oack: oack.is_some(),
        first_sent: false,
        accepted_blocks: 0,
        accepted_bytes: 0,
        last: false,
        committed: false,
        expiries: 0,
        max_expiries: limits.retries + session::MAX_PATIENT_RETRIES + 1,
        ended: false,
    };
    h.drain();
    while !input.is_empty() && !h.ended {
        h.step(&mut input);
    }
    // Only timeouts (and the commit, if due) from here: it must end.
    for _ in 0..=h.max_expiries + 1 {
        if h.ended {
            return;
        }
        if h.last && !h.committed {
            h.commit();
            continue;
        }
        let Some(deadline) = h.t.poll_timeout() else {
            panic!("a live upload without a deadline");
        };
        h.timeout(deadline);
    }
    assert!(h.ended, "not ended after its expiries");
}

struct Harness {
    t: Transfer,
    now: Instant,
    blksize: usize,
    limit: Option<u64>,
    expect_oack: bool,
    first_sent: bool,
    accepted_blocks: u64,
    accepted_bytes: u64,
    last: bool,
    committed: bool,
    expiries: u32,
    max_expiries: u32,
    ended: bool,
}

impl Harness {
    fn step(&mut self, input: &mut Input) {
        match input.u8() % 8 {
            0 | 1 => {
                // The next block, full or short.
                let block = (self.accepted_blocks + 1) as u16;
                let len = if input.bool() {
                    self.blksize
                } else {
                    usize::from(input.u16()) % (self.blksize + 2)
                };
                self.data(block, len);
            }
            2 => {
                // A block near the expected one (repeats, gaps, wraps).
                let delta = i64::from(input.u8() as i8);
                let block = (self.accepted_blocks as i64 + 1 + delta) as u16;
                self.data(block, self.blksize);
            }
            3 => {
                let datagram = input.short_bytes().to_vec();
                self.deliver(&datagram);
            }
            4 => {
                if let Some(deadline) = self.t.poll_timeout() {
                    self.timeout(deadline);
                }
            }
            5 => self.now += Duration::from_millis(u64::from(input.u16())),
            6 => self.commit(),
            _ => {
                let code = u16::from(input.u8() % 9);
                let mut e = vec![0, 5];
                e.extend_from_slice(&code.to_be_bytes());
                e.extend_from_slice(b"client error\0");
                self.deliver(&e);
            }
        }
    }

    fn data(&mut self, block: u16, len: usize) {
        let mut d = vec![0, 3];
        d.extend_from_slice(&block.to_be_bytes());
        d.resize(4 + len, 0xab);
        self.deliver(&d);
    }

    fn deliver(&mut self, datagram: &[u8]) {
        if let Some(r) = self.t.handle_datagram(self.now, datagram) {
            assert!(!self.ended, "bytes handed on after the end");
            assert!(!self.last, "bytes accepted after the final block");
            assert_eq!(r.offset, self.accepted_bytes, "out of order");
            assert!(r.bytes.len() <= self.blksize, "longer than blksize");
            assert_eq!(r.last, r.bytes.len() < self.blksize);
            self.accepted_blocks += 1;
            self.accepted_bytes += r.bytes.len() as u64;
            if let Some(limit) = self.limit {
                assert!(self.accepted_bytes <= limit, "past the limit");
            }
            self.last = r.last;
            self.expiries = 0;
        }
        self.drain();
    }

    fn commit(&mut self) {
        if self.last && !self.committed {
            self.committed = true;
            self.expiries = 0;
            self.t.commit_done(self.now);
        }
        self.drain();
    }

    fn timeout(&mut self, at: Instant) {
        self.now = self.now.max(at);
        let expired = self.t.poll_timeout().is_some_and(|d| self.now >= d);
        self.t.handle_timeout(self.now);
        if expired {
            self.expiries += 1;
            assert!(
                self.expiries <= self.max_expiries,
                "{} expiries did not end it",
                self.expiries
            );
        }
        self.drain();
    }

    fn drain(&mut self) {
        let mut buf = [0u8; BUF_LEN];
        for _ in 0..4 {
            let Some(tx) = self.t.poll_transmit(self.now, &mut buf) else {
                break;
            };
            assert!(!self.ended, "sent after the end");
            assert!(
                !matches!(tx, Transmit::Data { .. }),
                "a receiver sends no DATA"
            );
            let packet = Packet::parse(&buf[..tx.header_len()]).expect("a valid packet");
            let first = !self.first_sent;
            self.first_sent = true;
            match packet {
                Packet::Oack(_) => {
                    assert!(matches!(tx, Transmit::Oack { .. }));
                    assert!(self.expect_oack, "an OACK nobody negotiated");
                }
                Packet::Ack { block } => {
                    assert_eq!(tx, Transmit::Ack { block });
                    if first {
                        assert!(!self.expect_oack, "ACK before the OACK");
                    }
                    assert_eq!(
                        block, self.accepted_blocks as u16,
                        "ACK of a block not accepted"
                    );
                    assert!(!self.last || self.committed, "final ACK before the commit");
                }
                Packet::Error { code, .. } => {
                    assert!(matches!(tx, Transmit::Error { code: c, .. } if c == code));
                }
                other => panic!("a receiver sent {other:?}"),
            }
        }
        if let Some(outcome) = self.t.poll_event() {
            assert!(!self.ended, "two events");
            self.ended = true;
            if outcome == Outcome::Completed {
                assert!(self.last && self.committed, "completed without the file");
            }
        } else if !self.t.is_ended() && !(self.last && !self.committed) {
            assert!(self.t.poll_timeout().is_some(), "live without a deadline");
        }
    }
}

// ------------------------------------------------------------------ seeds

/// Server-like limits, blksize 64 (8 + 56), `windowsize`, an OACK or
/// not, no size limit.
fn setup(e: &mut crate::input::Encoder, windowsize: u8, oack: bool) {
    crate::encode_server_limits(e);
    e.u8(56).u8(windowsize - 1).u8(u8::from(oack)).u8(0);
}

/// The next block, full (`true`) or of `len` bytes.
fn next_block(e: &mut crate::input::Encoder, full: bool, len: u16) {
    e.u8(0).u8(u8::from(full));
    if !full {
        e.u16(len);
    }
}

pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use crate::input::Encoder;
    let mut out = Vec::new();
    // Lock-step: three full blocks, a short one, the commit, the dally.
    let mut e = Encoder::default();
    setup(&mut e, 1, false);
    for _ in 0..3 {
        next_block(&mut e, true, 0);
    }
    next_block(&mut e, false, 10);
    e.u8(6).u8(4);
    out.push(("lock-step".to_string(), e.0));
    // Windowed with an OACK: a gap (block 3 skipped), the resend, a
    // repeat, then the end.
    let mut e = Encoder::default();
    setup(&mut e, 4, true);
    next_block(&mut e, true, 0);
    e.u8(2).u8(1); // block 3 before 2
    next_block(&mut e, true, 0);
    next_block(&mut e, true, 0);
    e.u8(2).u8(0xfe); // a repeat of the previous block
    next_block(&mut e, false, 0);
    e.u8(6);
    out.push(("window-gap".to_string(), e.0));
    out
}
