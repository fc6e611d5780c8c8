//! `endpoint`: an `Endpoint` over in-memory files, fed requests (built
//! or raw) and datagrams from 64 source addresses (16 IPs, one of them
//! IPv6, x 4 ports), timeouts, aborts, removals and a shutdown, with every
//! session drained after each input as the shard driver does.
//! Invariants:
//! - no panic; live sessions never exceed `max_sessions`, and `len()`,
//!   `session_ids()` and the harness's own count agree;
//! - a started session has a fresh id below the capacity, the requester's
//!   address, and speaks first (an OACK or DATA 1); none starts after
//!   shutdown;
//! - every reply from the listener is a well-formed ERROR, every reply to a
//!   stranger on a transfer socket is ERROR 5; every transmit is an OACK,
//!   an ACK (uploads), an ERROR, or a DATA header whose payload is its
//!   block's range of the file, and says which (`Transmit`'s variant and
//!   fields match the bytes);
//! - `poll_event` reports a session's end once, right after its ERROR if
//!   it sent one, freeing it; a session is removable exactly once; a stale
//!   id reaches nothing; in the end only expiries finish and free every
//!   session.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use ringtftpd::endpoint::Finished;
use ringtftpd::endpoint::{DatagramOutcome, Endpoint, EndpointConfig, RequestOutcome, SessionId};
use ringtftpd::files::{OpenError, Sink, Source};
use ringtftpd::policy::Settings;
use ringtftpd::proto::{ErrorCode, Mode, Packet};
use ringtftpd::refusal::Abort;
use ringtftpd::session::{Outcome, Transmit};

use crate::input::{Encoder, Input};

const BUF_LEN: usize = 516;

/// Files by name: (name, length); some names are refused.
const FILES: &[(&[u8], u64)] = &[
    (b"boot.ipxe", 52),
    (b"default.ipxe", 134),
    (b"vmlinuz", 128_863),
    (b"ldlinux.c32", 119_524),
    (b"pxelinux.cfg/default", 60),
    (b"snponly.efi", 173_792),
    (b"empty", 0),
    (b"one", 1),
    (b"b512", 512),
    (b"b1432x2", 2864),
];

/// The handle of an upload's session.
const UPLOAD: u64 = u64::MAX;

/// The handle is the content length (or `UPLOAD`): the harness checks
/// ranges only.
struct MemFiles;

impl Source for MemFiles {
    type Handle = u64;
    fn open_read(&mut self, filename: &[u8], mode: Mode) -> Result<(u64, u64), OpenError> {
        match filename {
            b"denied" => return Err(OpenError::Denied("outside the root")),
            b"secret" => return Err(OpenError::NotReadable),
            b"dir" => return Err(OpenError::NotRegular),
            b"huge.txt" => return Err(OpenError::Unservable("netascii copy too large")),
            _ => {}
        }
        let &(_, len) = FILES
            .iter()
            .find(|(name, _)| *name == filename)
            .ok_or(OpenError::NotFound)?;
        // Netascii grows with CR insertion; any length will do here.
        let len = match mode {
            Mode::Octet => len,
            Mode::Netascii => len + len / 16,
        };
        Ok((len, len))
    }
}

impl Sink for MemFiles {
    fn open_write(
        &mut self,
        filename: &[u8],
        _mode: Mode,
        _tsize: Option<u64>,
    ) -> Result<u64, OpenError> {
        match filename {
            b"denied" => Err(OpenError::Denied("outside the root")),
            b"dir" => Err(OpenError::NotRegular),
            b"missing" => Err(OpenError::NotFound),
            _ => Ok(UPLOAD),
        }
    }
}

fn name(index: u8) -> &'static [u8] {
    const REFUSED: &[&[u8]] = &[b"denied", b"secret", b"dir", b"huge.txt", b"missing"];
    let i = usize::from(index) % (FILES.len() + REFUSED.len());
    match FILES.get(i) {
        Some((n, _)) => n,
        None => REFUSED[i - FILES.len()],
    }
}

/// One of 64 source addresses: the low 4 bits pick the IP, 2 more the port.
fn peer(b: u8) -> SocketAddr {
    let ip = b & 15;
    let port = 1567 + u16::from((b >> 4) & 3) * 10_000;
    let ip = if ip == 15 {
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 101))
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, 100 + ip))
    };
    SocketAddr::new(ip, port)
}

const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));

/// A session the harness started, live or removed (stale ids are kept to
/// be tried again).
struct Known {
    id: SessionId,
    peer: SocketAddr,
    live: bool,
    /// Highest DATA block number seen on the wire.
    high: u16,
    /// It sent an ERROR: its end is due at the next `poll_event`.
    error_sent: bool,
}

struct Harness {
    ep: Endpoint<u64>,
    files: MemFiles,
    now: Instant,
    buf: Vec<u8>,
    reply: Vec<u8>,
    max_sessions: usize,
    retries: u32,
    lazy_remove: bool,
    shut_down: bool,
    known: Vec<Known>,
    last_request: Option<(SocketAddr, Vec<u8>)>,
    completed: usize,
}

pub fn run(data: &[u8]) {
    play(data, true);
}

/// Sessions that completed during the input, before the closing
/// expiries (for checking that a seed does what it says).
pub fn completed_by(data: &[u8]) -> usize {
    play(data, false)
}

fn play(data: &[u8], finish: bool) -> usize {
    let mut input = Input::new(data);
    let limits = crate::limits(&mut input);
    let retries = limits.retries;
    let max_sessions = 1 + usize::from(input.u8() % 8);
    let config = EndpointConfig {
        max_sessions,
        // Derived, not read: the seed corpus keeps its meaning.
        max_upload_blksize: ringtftpd::proto::MAX_BLKSIZE,
        // Not read either: --single-port is not fuzzed here yet.
        single_port: false,
        settings: Settings {
            limits,
            error_replies_per_sec: u32::from(input.u8()),
            error_reply_burst: u32::from(input.u8() % 16),
            open_cache_ttl: Duration::from_millis(u64::from(input.u8()) * 10),
            max_sessions_per_client: 1 + usize::from(input.u8() % 8),
            requests_per_sec_per_client: u32::from(input.u8()),
            request_burst_per_client: u32::from(input.u8()),
            refusal_replies_per_sec: 1 + u32::from(input.u8()),
            first_contact_windowsize: 16,
            uploads: true,
            max_upload: Some(1 << 20),
            ..Settings::default()
        },
    };
    let mut h = Harness {
        ep: Endpoint::new(config),
        files: MemFiles,
        now: Instant::now(),
        buf: vec![0u8; BUF_LEN],
        reply: vec![0u8; BUF_LEN],
        max_sessions,
        retries,
        lazy_remove: input.bool(),
        shut_down: false,
        known: Vec::new(),
        last_request: None,
        completed: 0,
    };
    while !input.is_empty() {
        h.step(&mut input);
        h.check_counts();
    }
    let completed = h.completed;
    if finish {
        h.time_out();
    }
    completed
}

impl Harness {
    fn live(&self) -> usize {
        self.known.iter().filter(|k| k.live).count()
    }

    fn check_counts(&self) {
        let live = self.live();
        assert!(
            live <= self.max_sessions,
            "{live} sessions, max {}",
            self.max_sessions
        );
        assert_eq!(
            self.ep.len(),
            live,
            "len() vs sessions started and not removed"
        );
        assert_eq!(self.ep.session_ids().count(), live);
        assert_eq!(self.ep.is_empty(), live == 0);
        assert_eq!(self.ep.capacity(), self.max_sessions);
    }

    fn pick(&self, input: &mut Input) -> Option<usize> {
        let n = self.known.len();
        (n > 0).then(|| usize::from(input.u8()) % n)
    }

    fn request(&mut self, from: SocketAddr, mtu: Option<u32>, datagram: &[u8]) {
        self.last_request = Some((from, datagram.to_vec()));
        let outcome = self.ep.handle_request(
            self.now,
            from,
            LOCAL,
            mtu,
            datagram,
            &mut self.files,
            &mut self.reply,
        );
        match outcome {
            RequestOutcome::Started(id) => {
                assert!(!self.shut_down, "a session started after shutdown");
                assert!(
                    (id.index as usize) < self.max_sessions,
                    "index {} ",
                    id.index
                );
                assert!(
                    !self.known.iter().any(|k| k.id == id),
                    "id {id:?} handed out twice"
                );
                assert!(
                    matches!(Packet::parse(datagram), Ok(Packet::Rrq(_) | Packet::Wrq(_))),
                    "started from neither an RRQ nor a WRQ"
                );
                let view = self.ep.session(id).expect("a started session is live");
                assert_eq!((view.peer, view.local), (from, LOCAL));
                self.known.push(Known {
                    id,
                    peer: from,
                    live: true,
                    high: 0,
                    error_sent: false,
                });
                let sent = self.drain(self.known.len() - 1);
                assert!(sent > 0, "a new session sent nothing");
            }
            RequestOutcome::Reply(n) => {
                assert!(n <= self.reply.len());
                match Packet::parse(&self.reply[..n]) {
                    Ok(Packet::Error { .. }) => {}
                    other => panic!("listener replied {other:?}"),
                }
            }
            RequestOutcome::Ignored => {}
        }
    }

    fn datagram(&mut self, k: usize, from: SocketAddr, datagram: &[u8]) {
        let id = self.known[k].id;
        let outcome = self
            .ep
            .handle_datagram(self.now, id, from, datagram, &mut self.reply);
        let live = self.known[k].live;
        match outcome {
            DatagramOutcome::Delivered | DatagramOutcome::Received(_) => {
                assert!(
                    live && from == self.known[k].peer,
                    "delivered to {id:?} from {from}"
                );
            }
            DatagramOutcome::Reply(n) => {
                assert!(live, "a stale id answered");
                assert_ne!(from, self.known[k].peer, "the peer got ERROR 5");
                match Packet::parse(&self.reply[..n]) {
                    Ok(Packet::Error {
                        code: ErrorCode::UnknownTid,
                        ..
                    }) => {}
                    other => panic!("stranger got {other:?}"),
                }
            }
            DatagramOutcome::Ignored => {}
        }
        if live {
            self.drain(k);
        }
    }

    /// Drains session `k` and removes it when finished (unless removals
    /// are left to the input).
    fn drain(&mut self, k: usize) -> usize {
        let id = self.known[k].id;
        let Some(view) = self.ep.session(id) else {
            panic!("drain of a session that is gone: {id:?}");
        };
        let (len, blksize, window) = (*view.handle, view.blksize, view.windowsize);
        let blksize = u64::from(blksize);
        let mut sent = 0usize;
        let mut error = false;
        while let Some(t) = self.ep.poll_transmit(self.now, id, &mut self.buf) {
            sent += 1;
            assert!(
                sent <= usize::from(window) + 2,
                "poll_transmit does not stop"
            );
            assert!(!error, "sent after an ERROR");
            match (Packet::parse(&self.buf[..t.header_len()]), t) {
                (Ok(Packet::Oack(_)), Transmit::Oack { .. }) => {}
                (Ok(Packet::Ack { block }), Transmit::Ack { block: said }) => {
                    assert_eq!(block, said);
                    assert_eq!(len, UPLOAD, "a read's session sent an ACK");
                }
                (Ok(Packet::Error { code, .. }), Transmit::Error { code: said, .. }) => {
                    assert_eq!(code, said);
                    error = true;
                }
                (
                    Ok(Packet::Data { block, payload: [] }),
                    Transmit::Data {
                        block: abs,
                        payload: p,
                        last,
                    },
                ) => {
                    assert_ne!(len, UPLOAD, "an upload's session sent DATA");
                    assert_eq!(p.offset % blksize, 0);
                    assert_eq!(abs, p.offset / blksize + 1);
                    assert_eq!(block, abs as u16);
                    assert!(p.len as u64 <= blksize);
                    assert_eq!(last, (p.len as u64) < blksize, "last is the short block");
                    assert!(
                        p.offset + p.len as u64 <= len,
                        "payload {p:?} beyond the file ({len} bytes)"
                    );
                    let known = &mut self.known[k];
                    if block.wrapping_sub(known.high) < 0x8000 {
                        known.high = block;
                    }
                }
                (other, t) => panic!("session sent {other:?} as {t:?}"),
            }
        }
        self.known[k].error_sent |= error;
        if !self.lazy_remove {
            self.poll_end(k);
        }
        sent
    }

    /// Asks `poll_event` whether session `k` ended; true if it did.
    fn poll_end(&mut self, k: usize) -> bool {
        let id = self.known[k].id;
        match self.ep.poll_event(id) {
            Some(finished) => {
                self.gone(k, finished);
                assert!(self.ep.poll_event(id).is_none(), "an end reported twice");
                true
            }
            None => {
                assert!(
                    !self.known[k].error_sent,
                    "an ERROR was sent but no end was reported"
                );
                false
            }
        }
    }

    /// The driver gives up on session `k`, ended or not.
    fn remove(&mut self, k: usize) {
        let id = self.known[k].id;
        let was_live = self.known[k].live;
        match self.ep.remove(id) {
            Some(finished) => {
                assert!(was_live, "a stale id removed something");
                self.gone(k, finished);
            }
            None => assert!(!was_live, "a live session was not removable"),
        }
        assert!(self.ep.remove(id).is_none(), "removed twice");
    }

    fn gone(&mut self, k: usize, finished: Finished<u64>) {
        let id = self.known[k].id;
        assert!(self.known[k].live, "a stale id reported an end");
        assert_eq!(finished.peer, self.known[k].peer);
        self.known[k].live = false;
        if finished.outcome == Outcome::Completed {
            self.completed += 1;
        }
        assert!(self.ep.session(id).is_none());
        assert!(self.ep.poll_event(id).is_none());
    }

    fn drain_all(&mut self) {
        for k in 0..self.known.len() {
            if self.known[k].live {
                self.drain(k);
            }
        }
    }

    fn step(&mut self, input: &mut Input) {
        let op = input.u8();
        self.now += Duration::from_micros(u64::from(input.u8()) * 100);
        match op % 11 {
            0 => {
                let from = peer(input.u8());
                let mtu = crate::mtu(input);
                let d = build_rrq(input);
                self.request(from, mtu, &d);
            }
            1 => {
                let from = peer(input.u8());
                let mtu = crate::mtu(input);
                let d = input.long_bytes(1500).to_vec();
                self.request(from, mtu, &d);
            }
            2 => {
                // The same request again (a client's retransmission).
                if let Some((from, d)) = self.last_request.clone() {
                    self.request(from, None, &d);
                }
            }
            3 => {
                let Some(k) = self.pick(input) else { return };
                let sel = input.u8();
                let from = if sel & 0x80 == 0 {
                    self.known[k].peer
                } else {
                    peer(sel)
                };
                let d: Vec<u8> = match sel & 3 {
                    0 => crate::seeds::ack(self.known[k].high).to_vec(),
                    1 => crate::seeds::ack(input.u16()).to_vec(),
                    2 => {
                        let mut d = vec![0, 5];
                        d.extend_from_slice(&input.u16().to_be_bytes());
                        d.extend_from_slice(input.short_bytes());
                        d
                    }
                    _ => input.short_bytes().to_vec(),
                };
                self.datagram(k, from, &d);
            }
            4 => {
                let Some(k) = self.pick(input) else { return };
                self.now += Duration::from_millis(u64::from(input.u16()));
                self.ep.handle_timeout(self.now, self.known[k].id);
                if self.known[k].live {
                    self.drain(k);
                }
            }
            5 => {
                self.expire_earliest();
            }
            6 => self.now += Duration::from_millis(u64::from(input.u16())),
            7 => {
                let Some(k) = self.pick(input) else { return };
                let why = Abort::ALL[usize::from(input.u8()) % Abort::ALL.len()];
                self.ep.abort(self.now, self.known[k].id, why);
                if self.known[k].live {
                    self.drain(k);
                }
            }
            8 => {
                // The driver removes a finished session, or one at exit.
                let Some(k) = self.pick(input) else { return };
                if input.bool() || !self.known[k].live {
                    self.remove(k);
                } else {
                    self.poll_end(k);
                }
            }
            9 => {
                if input.u8() == 0x5d {
                    self.ep.shut_down();
                    self.shut_down = true;
                }
            }
            _ => self.drain_all(),
        }
    }

    /// Fires the earliest deadline of all live sessions; false if none.
    fn expire_earliest(&mut self) -> bool {
        let earliest = self
            .known
            .iter()
            .filter(|k| k.live)
            .filter_map(|k| self.ep.poll_timeout(k.id))
            .min();
        let Some(at) = earliest else { return false };
        self.now = self.now.max(at);
        for k in 0..self.known.len() {
            let id = self.known[k].id;
            if self.known[k].live && self.ep.poll_timeout(id).is_some_and(|d| d <= self.now) {
                self.ep.handle_timeout(self.now, id);
                self.drain(k);
            }
        }
        true
    }

    /// Only expiries from here on: every session finishes and is freed.
    fn time_out(&mut self) {
        self.lazy_remove = false;
        // A session whose peer answered may be waited for a few resends
        // past its retries (Limits::min_give_up).
        let per_session = self.retries + ringtftpd::session::MAX_PATIENT_RETRIES + 2;
        let bound = per_session as usize * (self.known.len() + 1);
        for _ in 0..bound {
            for k in 0..self.known.len() {
                if self.known[k].live {
                    self.poll_end(k);
                }
            }
            if self.live() == 0 {
                break;
            }
            if !self.expire_earliest() {
                let stuck: Vec<_> = self.known.iter().filter(|k| k.live).map(|k| k.id).collect();
                panic!("live sessions without a deadline: {stuck:?}");
            }
        }
        self.check_counts();
        assert!(
            self.ep.is_empty(),
            "sessions left after every bound expired"
        );
    }
}

/// A read request put together from the input: a known or refused name
/// (or raw bytes), a mode spelled in any case, and options by name.
fn build_rrq(input: &mut Input) -> Vec<u8> {
    let flags = input.u8();
    let mut d = vec![0, if flags & 0x80 == 0 { 1 } else { 2 }];
    if flags & 0x40 == 0 {
        d.extend_from_slice(name(input.u8()));
    } else {
        d.extend_from_slice(input.short_bytes());
    }
    d.push(0);
    let mode: &[u8] = match flags & 3 {
        0 => b"octet",
        1 => b"netascii",
        2 => b"OcTeT",
        _ => input.short_bytes(),
    };
    d.extend_from_slice(mode);
    d.push(0);
    for _ in 0..(flags >> 2) & 7 {
        let o = input.u8();
        let opt: &[u8] = match o & 7 {
            0 => b"blksize",
            1 => b"tsize",
            2 => b"timeout",
            3 => b"windowsize",
            4 => b"BLKSIZE",
            5 => b"",
            6 => b"multicast",
            _ => input.short_bytes(),
        };
        d.extend_from_slice(opt);
        d.push(0);
        if o & 8 == 0 {
            d.extend_from_slice(input.u32().to_string().as_bytes());
        } else {
            d.extend_from_slice(input.short_bytes());
        }
        d.push(0);
    }
    d
}

// ------------------------------------------------------------------ seeds

/// Server-like limits and config; `lazy` leaves removals to the input.
fn setup(e: &mut Encoder, max_sessions: u8, lazy: bool) {
    crate::encode_server_limits(e);
    // Sessions, error rate and burst, no open cache, 8 per client, no
    // per-address request limit, 256 refusals a second.
    e.u8(max_sessions - 1)
        .u8(10)
        .u8(5)
        .u8(0)
        .u8(7)
        .u8(0)
        .u8(0)
        .u8(255);
    e.u8(u8::from(lazy));
}

/// A raw request from peer byte `from` over an MTU of 1500.
fn raw_request(e: &mut Encoder, from: u8, datagram: &[u8]) {
    e.u8(1).u8(1).u8(from).u8(1).long_bytes(datagram);
}

/// The `which`-th started session's own peer sends `datagram`.
fn send(e: &mut Encoder, which: u8, datagram: &[u8]) {
    e.u8(3).u8(1).u8(which).u8(3).short_bytes(datagram);
}

/// The `which`-th session's peer ACKs the highest DATA it saw, `n` times.
fn ack_high(e: &mut Encoder, which: u8, n: usize) {
    for _ in 0..n {
        e.u8(3).u8(1).u8(which).u8(0);
    }
}

pub fn seeds() -> Vec<(String, Vec<u8>)> {
    use crate::seeds::*;
    let mut out = Vec::new();
    // iPXE: boot.ipxe, the per-MAC miss, default.ipxe, the kernel's start.
    let mut e = Encoder::default();
    setup(&mut e, 16, false);
    for (i, rrq) in IPXE_RRQS.iter().enumerate() {
        let which = [0, 0, 1, 2][i];
        raw_request(&mut e, 1 | ((i as u8) << 4), rrq);
        send(&mut e, which, &ack(0));
        ack_high(&mut e, which, 4);
    }
    out.push(("ipxe".to_string(), e.0));
    // pxelinux: ldlinux.c32, the config search misses, the default.
    let mut e = Encoder::default();
    setup(&mut e, 16, false);
    for (i, rrq) in PXELINUX_RRQS.iter().enumerate() {
        let which = [0, 0, 0, 0, 1][i];
        raw_request(&mut e, 2 | ((i as u8) << 4), rrq);
        send(&mut e, which, &ack(0));
        ack_high(&mut e, which, 3);
    }
    out.push(("pxelinux".to_string(), e.0));
    // OVMF: the probe declined with ERROR 8, then the windowed fetch.
    let mut e = Encoder::default();
    setup(&mut e, 16, true);
    raw_request(&mut e, 3, OVMF_PROBE);
    send(&mut e, 0, OVMF_ABORT);
    e.u8(8).u8(0).u8(0).u8(0); // remove the finished probe
    raw_request(&mut e, 3 | 0x10, OVMF_FETCH);
    send(&mut e, 1, &ack(0));
    ack_high(&mut e, 1, 8);
    out.push(("ovmf".to_string(), e.0));
    // A boot storm on a small endpoint: more requesters than slots, a
    // retransmitted request, a stranger, expiries.
    let mut e = Encoder::default();
    setup(&mut e, 4, false);
    for from in 0..8u8 {
        raw_request(&mut e, from * 2, IPXE_RRQS[3]);
    }
    e.u8(2).u8(1);
    e.u8(3).u8(1).u8(0).u8(0x85).u16(1);
    e.u8(5).u8(0).u8(5).u8(0);
    out.push(("storm".to_string(), e.0));
    out
}
