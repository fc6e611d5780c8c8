//! One WRQ transfer (an upload) as the client sees it: a sans-IO state machine with the same
//! call order as [`crate::client::Transfer`] (queue, `poll_transmit`, `handle_datagram`,
//! `handle_timeout`, `outcome`).
//!
//! The content is the name's deterministic stream ([`crate::pattern`]), produced block by block
//! into the send buffer, so nothing of the file is held. Flow: WRQ (octet, the requested
//! options; `tsize` states the length); the server answers with an OACK (options checked as for
//! a read; a granted `tsize` must equal the length) or with ACK 0 (options ignored: 512-byte
//! blocks, lock-step); then DATA blocks, a window at a time (RFC 7440; a window of 1 is RFC 1350
//! lock-step), each window sent when the ACK of the previous one arrives. The transfer is
//! complete only when the ACK of the final (short, possibly empty) block arrives.
//!
//! Retransmission: on timeout, the WRQ or the unacknowledged window is sent again, `retries`
//! times without progress. A duplicate ACK never triggers a resend (RFC 1123 §4.2.3.1, no
//! Sorcerer's Apprentice); an ACK inside the window moves it (the server saw a gap and asks
//! from there on, RFC 7440 §4). A resent OACK before any DATA was acknowledged means DATA 1 was
//! lost: the window is resent once.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client::{
    Arrival, ClientConfig, Counters, DEFAULT_BLKSIZE, Expiry, Failure, FailureKind, Granted,
    MAX_PENDING_ERRORS, Outcome, Retransmit, TransferView, Transmit, arrival, validate_oack,
};
use crate::pattern;
use crate::wire::{self, Packet};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Wrq,
    /// Absolute block number (1-based, never wraps).
    Data(u64),
    UnknownTid(SocketAddr),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// WRQ sent, waiting for OACK, ACK 0 or ERROR.
    Requested,
    Sending,
    Finished,
}

#[derive(Debug)]
pub struct Upload {
    id: u64,
    name: Arc<str>,
    key: u64,
    size: u64,
    cfg: ClientConfig,
    server: SocketAddr,
    tid: Option<SocketAddr>,
    phase: Phase,
    blksize: usize,
    window: u16,
    /// Blocks in the whole transfer, the final short (maybe empty) one included.
    nblocks: u64,
    /// First block not yet acknowledged.
    base: u64,
    oack_resent: bool,
    timer: Retransmit,
    pending: VecDeque<Pending>,
    started: Instant,
    first_reply: Option<Duration>,
    total: Option<Duration>,
    granted: Granted,
    counters: Counters,
    outcome: Option<Outcome>,
}

impl Upload {
    /// Starts upload `id` of `size` bytes to `name`. Queues the WRQ.
    pub fn new(
        id: u64,
        name: Arc<str>,
        size: u64,
        cfg: ClientConfig,
        server: SocketAddr,
        seed: u64,
        now: Instant,
    ) -> Self {
        let key = pattern::key(&name);
        let timer = Retransmit::new(&cfg, seed, id, now);
        let mut u = Upload {
            id,
            name,
            key,
            size,
            cfg,
            server,
            tid: None,
            phase: Phase::Requested,
            blksize: DEFAULT_BLKSIZE,
            window: 1,
            nblocks: 0,
            base: 1,
            oack_resent: false,
            timer,
            pending: VecDeque::with_capacity(4),
            started: now,
            first_reply: None,
            total: None,
            granted: Granted::default(),
            counters: Counters::default(),
            outcome: None,
        };
        u.pending.push_back(Pending::Wrq);
        u
    }

    pub fn has_transmit(&self) -> bool {
        !self.pending.is_empty()
    }
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timer.deadline()
    }
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
                    Phase::Requested => "the first reply".to_string(),
                    _ => format!("the ACK of block {}", self.base),
                };
                let detail =
                    format!("timed out waiting for {waiting} after {attempts} retransmits");
                return self.fail(FailureKind::Timeout, detail);
            }
            Expiry::Resend => {}
        }
        self.counters.retransmits += 1;
        match self.phase {
            Phase::Requested => self.queue(Pending::Wrq),
            Phase::Sending => self.queue_window(),
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
        match packet {
            Packet::Error { code, message } => self.fail(
                FailureKind::ServerError,
                format!("server sent ERROR {code}: {message}"),
            ),
            Packet::Oack { options } => self.on_oack(now, from, options),
            Packet::Ack { block } => self.on_ack(now, from, block),
            Packet::Data { block, .. } => self.fail(
                FailureKind::Protocol,
                format!("server sent DATA {block} to a write request"),
            ),
            Packet::Other { opcode } => self.fail(
                FailureKind::Protocol,
                format!("server sent unexpected opcode {opcode}"),
            ),
        }
    }

    /// Writes the next queued datagram into `buf` (it must hold 4 + blksize bytes).
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        while let Some(p) = self.pending.pop_front() {
            let (dest, res) = match p {
                Pending::Wrq => (
                    self.server,
                    wire::encode_wrq(buf, &self.name, &self.cfg.options, self.size),
                ),
                Pending::Data(b) => {
                    let Some(tid) = self.tid else { continue };
                    let (off, len) = self.block_range(b);
                    if buf.len() < 4 + len {
                        self.fail_local(format!("send buffer too small: {} bytes", 4 + len));
                        continue;
                    }
                    // Block numbers roll over 65535 → 0 on the wire.
                    let res = wire::encode_data_header(buf, b as u16);
                    pattern::fill(self.key, off, &mut buf[4..4 + len]);
                    (tid, res.map(|h| h + len))
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

    /// Offset and length of block `b` (1-based).
    fn block_range(&self, b: u64) -> (u64, usize) {
        let off = (b - 1).saturating_mul(self.blksize as u64);
        let len = self.size.saturating_sub(off).min(self.blksize as u64) as usize;
        (off, len)
    }

    fn start_sending(&mut self, now: Instant) {
        self.first_reply = Some(now.saturating_duration_since(self.started));
        self.phase = Phase::Sending;
        // RFC 1350 §6: the final block is shorter than blksize, empty if need be.
        self.nblocks = self.size / self.blksize as u64 + 1;
        self.base = 1;
        self.queue_window();
        self.progress(now);
    }

    fn on_oack(&mut self, now: Instant, from: SocketAddr, options: &[u8]) {
        match self.phase {
            Phase::Requested => {}
            Phase::Sending => {
                self.counters.out_of_order += 1;
                // The server did not get DATA 1 and repeats its OACK: resend once.
                if self.base == 1 && !self.oack_resent {
                    self.oack_resent = true;
                    self.counters.resync_acks += 1;
                    self.queue_window();
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
        match validate_oack(&self.cfg.options, options, self.size) {
            Ok(granted) => {
                self.granted = granted;
                self.blksize = granted.blksize.map_or(DEFAULT_BLKSIZE, usize::from);
                self.window = granted.windowsize.unwrap_or(1);
                self.start_sending(now);
            }
            Err(detail) => self.fail(FailureKind::BadOack, detail),
        }
    }

    fn on_ack(&mut self, now: Instant, from: SocketAddr, block: u16) {
        match self.phase {
            Phase::Requested => {
                if block != 0 {
                    self.fail(
                        FailureKind::Protocol,
                        format!("first ACK was of block {block}, expected 0"),
                    );
                    return;
                }
                // No OACK: the server ignored every option (RFC 2347 §3), or none was asked.
                self.tid = Some(from);
                self.granted = Granted::default();
                self.start_sending(now);
            }
            Phase::Sending => {
                let acked = self.base - 1;
                let sent = (self.base + u64::from(self.window) - 1).min(self.nblocks);
                let delta = u64::from(block.wrapping_sub(acked as u16));
                if delta == 0 || delta > sent - acked {
                    // A duplicate (or stale) ACK: never answered (no Sorcerer's Apprentice).
                    self.counters.out_of_order += 1;
                    return;
                }
                let upto = acked + delta;
                for b in self.base..=upto {
                    self.counters.blocks += 1;
                    self.counters.bytes += self.block_range(b).1 as u64;
                }
                self.base = upto + 1;
                if upto == self.nblocks {
                    self.total = Some(now.saturating_duration_since(self.started));
                    self.phase = Phase::Finished;
                    self.timer.stop();
                    self.outcome = Some(Outcome::Done);
                    return;
                }
                self.queue_window();
                self.progress(now);
            }
            Phase::Finished => {}
        }
    }

    /// Queues the blocks of the current window (go-back-N from the first unacknowledged).
    fn queue_window(&mut self) {
        let end = (self.base + u64::from(self.window)).min(self.nblocks + 1);
        for b in self.base..end {
            self.pending.push_back(Pending::Data(b));
        }
    }

    fn queue(&mut self, p: Pending) {
        self.pending.push_back(p);
    }

    fn progress(&mut self, now: Instant) {
        self.timer.progress(now);
    }

    fn fail(&mut self, kind: FailureKind, detail: String) {
        if self.outcome.is_none() {
            self.outcome = Some(Outcome::Failed(Failure { kind, detail }));
        }
        self.phase = Phase::Finished;
        self.timer.stop();
        self.pending.retain(|p| matches!(p, Pending::UnknownTid(_)));
    }
}

impl TransferView for Upload {
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
        self.first_reply
    }
    fn total_time(&self) -> Option<Duration> {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::RequestOptions;
    use std::net::{IpAddr, Ipv4Addr};

    const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 69);
    const TID: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);
    const STRANGER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40001);

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

    fn drain(u: &mut Upload) -> Vec<(SocketAddr, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Some(tx) = u.poll_transmit(&mut buf) {
            out.push((tx.dest, buf[..tx.len].to_vec()));
        }
        out
    }

    fn ack(b: u16) -> Vec<u8> {
        let mut v = vec![0, 4];
        v.extend_from_slice(&b.to_be_bytes());
        v
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

    /// A lossless server: ACKs each window's last block (or the final one), collects the bytes.
    /// Returns (bytes received, DATA datagrams seen).
    fn serve(u: &mut Upload, now: Instant, window: usize, first: u16) -> (Vec<u8>, usize) {
        let mut got = Vec::new();
        let mut datagrams = 0;
        let mut expect: u16 = first;
        for _ in 0..1_000_000 {
            let sent = drain(u);
            if sent.is_empty() {
                break;
            }
            let mut last = None;
            for (dest, d) in &sent {
                assert_eq!(*dest, TID);
                let Ok(Packet::Data { block, payload }) = wire::parse(d) else {
                    panic!("not DATA: {d:?}");
                };
                datagrams += 1;
                assert_eq!(block, expect);
                got.extend_from_slice(payload);
                expect = expect.wrapping_add(1);
                last = Some((block, payload.len()));
            }
            let (block, _) = last.unwrap();
            assert!(sent.len() <= window);
            u.handle_datagram(now, TID, &ack(block));
        }
        (got, datagrams)
    }

    #[test]
    fn lock_step_after_oack_sends_the_names_stream_and_ends_on_the_final_ack() {
        for size in [0u64, 1, 1427, 1428, 1429, 1428 * 5, 100_000] {
            let now = Instant::now();
            let mut u = Upload::new(
                3,
                "up-x-3".into(),
                size,
                cfg(Some(1428), None, true),
                SERVER,
                1,
                now,
            );
            let wrq = drain(&mut u);
            let want = format!("\x00\x02up-x-3\0octet\0blksize\x001428\0tsize\0{size}\0");
            assert_eq!(wrq, vec![(SERVER, want.into_bytes())]);
            let sz = size.to_string();
            u.handle_datagram(now, TID, &oack(&[("blksize", "1428"), ("tsize", &sz)]));
            let (got, n) = serve(&mut u, now, 1, 1);
            assert_eq!(u.outcome(), Some(&Outcome::Done), "size {size}");
            assert_eq!(got.len() as u64, size);
            assert_eq!(
                pattern::first_mismatch(pattern::key("up-x-3"), 0, &got),
                None
            );
            assert_eq!(
                n as u64,
                size / 1428 + 1,
                "a final short (maybe empty) block"
            );
            assert_eq!(u.counters().bytes, size);
            assert_eq!(u.counters().blocks, n as u64);
            assert!(u.poll_timeout().is_none());
            assert_eq!(u.granted().tsize, Some(size));
        }
    }

    #[test]
    fn ack0_means_options_ignored_512_byte_lock_step() {
        let now = Instant::now();
        let mut u = Upload::new(
            0,
            "u".into(),
            1100,
            cfg(Some(1428), None, false),
            SERVER,
            1,
            now,
        );
        drain(&mut u);
        u.handle_datagram(now, TID, &ack(0));
        let (got, n) = serve(&mut u, now, 1, 1);
        assert_eq!(u.outcome(), Some(&Outcome::Done));
        assert_eq!((got.len(), n), (1100, 3));
        assert!(!u.granted().oack);
    }

    #[test]
    fn windowed_sends_a_window_per_ack_and_goes_back_on_a_mid_window_ack() {
        let now = Instant::now();
        let size = 512 * 10 + 7;
        let mut u = Upload::new(
            0,
            "w".into(),
            size,
            cfg(Some(512), Some(4), false),
            SERVER,
            1,
            now,
        );
        drain(&mut u);
        u.handle_datagram(now, TID, &oack(&[("blksize", "512"), ("windowsize", "4")]));
        let blocks = |s: &[(SocketAddr, Vec<u8>)]| -> Vec<u16> {
            s.iter()
                .map(|(_, d)| match wire::parse(d) {
                    Ok(Packet::Data { block, .. }) => block,
                    _ => panic!(),
                })
                .collect()
        };
        assert_eq!(blocks(&drain(&mut u)), [1, 2, 3, 4]);
        // The server lost 3: it ACKs 2, and the window restarts at 3.
        u.handle_datagram(now, TID, &ack(2));
        assert_eq!(blocks(&drain(&mut u)), [3, 4, 5, 6]);
        // A duplicate ACK is never answered.
        u.handle_datagram(now, TID, &ack(2));
        assert!(drain(&mut u).is_empty());
        u.handle_datagram(now, TID, &ack(6));
        let (got, _) = serve(&mut u, now, 4, 7);
        assert_eq!(u.outcome(), Some(&Outcome::Done));
        assert_eq!(got.len() as u64, size - 6 * 512);
        assert_eq!(u.counters().bytes, size);
    }

    #[test]
    fn timeouts_resend_then_fail_and_duplicate_oack_resends_once() {
        let t0 = Instant::now();
        let c = ClientConfig {
            retries: 2,
            ..cfg(Some(1024), None, false)
        };
        let mut u = Upload::new(0, "t".into(), 3000, c, SERVER, 1, t0);
        drain(&mut u);
        // The WRQ is resent to the server port.
        let d = u.poll_timeout().unwrap();
        u.handle_timeout(d);
        assert_eq!(drain(&mut u)[0].0, SERVER);
        u.handle_datagram(d, TID, &oack(&[("blksize", "1024")]));
        assert_eq!(drain(&mut u).len(), 1);
        // The OACK again: DATA 1 was lost; resent once only.
        u.handle_datagram(d, TID, &oack(&[("blksize", "1024")]));
        assert_eq!(drain(&mut u).len(), 1);
        u.handle_datagram(d, TID, &oack(&[("blksize", "1024")]));
        assert!(drain(&mut u).is_empty());
        // Timeouts resend DATA 1, then the upload fails.
        for _ in 0..2 {
            let d = u.poll_timeout().unwrap();
            u.handle_timeout(d);
            let s = drain(&mut u);
            assert_eq!(s.len(), 1);
            assert!(s[0].1.starts_with(b"\x00\x03\x00\x01"));
        }
        let d = u.poll_timeout().unwrap();
        u.handle_timeout(d);
        let Some(Outcome::Failed(f)) = u.outcome() else {
            panic!("{:?}", u.outcome());
        };
        assert_eq!(f.kind, FailureKind::Timeout);
        assert!(f.detail.contains("ACK of block 1"), "{}", f.detail);
    }

    #[test]
    fn errors_bad_oacks_and_strangers() {
        let now = Instant::now();
        let mut u = Upload::new(
            0,
            "e".into(),
            10,
            cfg(Some(1428), None, true),
            SERVER,
            1,
            now,
        );
        drain(&mut u);
        u.handle_datagram(now, TID, b"\x00\x05\x00\x03disk full\0");
        assert!(
            matches!(u.outcome(), Some(Outcome::Failed(f)) if f.kind == FailureKind::ServerError)
        );
        // tsize must echo our length.
        let mut u = Upload::new(
            0,
            "e".into(),
            10,
            cfg(Some(1428), None, true),
            SERVER,
            1,
            now,
        );
        drain(&mut u);
        u.handle_datagram(now, TID, &oack(&[("tsize", "11")]));
        assert!(matches!(u.outcome(), Some(Outcome::Failed(f)) if f.kind == FailureKind::BadOack));
        // A first ACK other than 0.
        let mut u = Upload::new(0, "e".into(), 10, cfg(None, None, false), SERVER, 1, now);
        drain(&mut u);
        u.handle_datagram(now, TID, &ack(1));
        assert!(matches!(u.outcome(), Some(Outcome::Failed(f)) if f.kind == FailureKind::Protocol));
        // A stranger gets ERROR 5; the upload goes on.
        let mut u = Upload::new(0, "e".into(), 10, cfg(None, None, false), SERVER, 1, now);
        drain(&mut u);
        u.handle_datagram(now, TID, &ack(0));
        drain(&mut u);
        u.handle_datagram(now, STRANGER, &ack(1));
        let s = drain(&mut u);
        assert_eq!(s[0].0, STRANGER);
        assert!(matches!(
            wire::parse(&s[0].1),
            Ok(Packet::Error { code: 5, .. })
        ));
        u.handle_datagram(now, TID, &ack(1));
        assert_eq!(u.outcome(), Some(&Outcome::Done));
    }

    #[test]
    fn block_numbers_roll_over() {
        let now = Instant::now();
        // 70,000 blocks of 8 bytes.
        let size = 8 * 70_000 + 3;
        let mut u = Upload::new(
            0,
            "r".into(),
            size,
            cfg(Some(8), None, false),
            SERVER,
            1,
            now,
        );
        drain(&mut u);
        u.handle_datagram(now, TID, &oack(&[("blksize", "8")]));
        let (got, n) = serve(&mut u, now, 1, 1);
        assert_eq!(u.outcome(), Some(&Outcome::Done));
        assert_eq!((got.len() as u64, n), (size, 70_001));
    }
}
