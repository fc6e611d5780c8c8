//! Deterministic, sans-IO tests of `session` and `endpoint`: a fake clock,
//! a scripted lossy link and a simulated RFC 1350/7440 client. No sockets,
//! no sleeping: each scenario runs in microseconds.

// Shared by several test crates, each using a part of it.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringtftpd::endpoint::{
    DatagramOutcome, Endpoint, EndpointConfig, RequestOutcome, Route, SessionId,
};
use ringtftpd::files::Sink;
pub use ringtftpd::files::mem::MemFiles;
pub use ringtftpd::policy::Settings;
use ringtftpd::proto::{ErrorCode, Options, Packet, Rollover};
use ringtftpd::session::{Limits, Outcome};

pub fn limits() -> Limits {
    Limits {
        max_blksize: 65464,
        max_windowsize: 64,
        mtu_clamp: true,
        initial_rto: Duration::from_secs(1),
        rto_min: Duration::from_millis(20),
        rto_max: Duration::from_secs(2),
        retries: 5,
        max_stall: Duration::from_secs(60),
        // Retries alone decide when a silent peer is given up.
        min_give_up: Duration::ZERO,
        ..Limits::default()
    }
}

pub fn settings() -> Settings {
    Settings {
        limits: limits(),
        error_replies_per_sec: 10,
        error_reply_burst: 5,
        open_cache_ttl: Duration::ZERO,
        ..Settings::default()
    }
}

pub fn config() -> EndpointConfig {
    EndpointConfig {
        max_sessions: 16,
        settings: settings(),
        ..EndpointConfig::default()
    }
}

pub fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

pub const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 40000);
pub const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ToServer,
    ToClient,
}

/// What the link does with one datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Deliver,
    Drop,
    Duplicate,
    Delay(Duration),
}

/// A simulated client: RFC 1350 lock-step, or RFC 7440 windowed.
pub struct Client {
    pub received: Vec<u8>,
    pub expected_block: u64,
    pub blksize: usize,
    pub windowsize: usize,
    since_ack: usize,
    last_ack: u16,
    pub done: bool,
    pub vanished: bool,
    pub error: Option<ErrorCode>,
    pub oack: Option<Options>,
    pub timeout: Duration,
    deadline: Option<Instant>,
    /// Sent on a timeout: the RRQ before any reply, then the last ACK.
    last_sent: Vec<u8>,
    pub retransmits: u32,
    /// Answer an OACK with ERROR 8 (like OVMF's tsize probe).
    pub decline_oack: bool,
    /// The last in-order block was already re-ACKed for the current gap.
    gap_acked: bool,
    /// Do not re-ACK a duplicate DATA in lock-step (some firmware).
    pub ignore_duplicate_data: bool,
    /// The block number after 65535, as the OACK's `rollover` says.
    pub rollover: Rollover,
}

impl Client {
    fn new(request: &[u8], blksize: usize, windowsize: usize) -> Self {
        Self {
            received: Vec::new(),
            expected_block: 1,
            blksize,
            windowsize,
            since_ack: 0,
            last_ack: 0,
            done: false,
            vanished: false,
            error: None,
            oack: None,
            timeout: Duration::from_millis(500),
            deadline: None,
            last_sent: request.to_vec(),
            retransmits: 0,
            decline_oack: false,
            gap_acked: false,
            ignore_duplicate_data: false,
            rollover: Rollover::Zero,
        }
    }

    fn ack(&mut self, block: u16, now: Instant) -> Vec<u8> {
        self.last_ack = block;
        self.since_ack = 0;
        let mut buf = [0u8; 4];
        let n = Packet::Ack { block }.emit(&mut buf).unwrap();
        self.last_sent = buf[..n].to_vec();
        self.deadline = Some(now + self.timeout);
        self.last_sent.clone()
    }

    /// Handles a datagram from the server; returns replies.
    fn receive(&mut self, now: Instant, bytes: &[u8]) -> Vec<Vec<u8>> {
        if self.vanished || self.done {
            // After the final ACK, a repeated last DATA is re-ACKed (dally).
            if self.done && !self.vanished {
                if let Ok(Packet::Data { block, .. }) = Packet::parse(bytes) {
                    if block == self.last_ack {
                        return vec![self.ack(block, now)];
                    }
                }
            }
            return vec![];
        }
        match Packet::parse(bytes).expect("server sent a malformed packet") {
            Packet::Oack(options) => {
                if self.decline_oack {
                    self.done = true;
                    self.deadline = None;
                    let mut buf = [0u8; 64];
                    let message = b"no thanks";
                    let n = Packet::Error {
                        code: ErrorCode::OptionRefused,
                        message,
                    }
                    .emit(&mut buf)
                    .unwrap();
                    return vec![buf[..n].to_vec()];
                }
                if self.oack.is_none() {
                    self.oack = Some(options);
                    if let Some(b) = options.blksize {
                        self.blksize = b as usize;
                    }
                    self.windowsize = options.windowsize.map_or(1, |w| w as usize);
                    if options.rollover == Some(1) {
                        self.rollover = Rollover::One;
                    }
                }
                if self.expected_block == 1 {
                    vec![self.ack(0, now)]
                } else {
                    vec![]
                }
            }
            Packet::Data { block, payload } => {
                if self.oack.is_none() && self.expected_block == 1 {
                    // No OACK: options were not taken.
                    self.blksize = 512;
                    self.windowsize = 1;
                }
                if block == self.rollover.wire(self.expected_block) {
                    self.received.extend_from_slice(payload);
                    self.expected_block += 1;
                    self.gap_acked = false;
                    self.since_ack += 1;
                    let last = payload.len() < self.blksize;
                    if last {
                        self.done = true;
                    }
                    if last || self.since_ack >= self.windowsize {
                        let reply = self.ack(block, now);
                        if self.done {
                            self.deadline = None;
                        }
                        return vec![reply];
                    }
                    vec![]
                } else if self.windowsize == 1
                    && block == self.last_ack
                    && !self.ignore_duplicate_data
                {
                    // RFC 1350: a duplicate DATA is ACKed again; this is what
                    // feeds the Sorcerer's Apprentice in a naive server.
                    vec![self.ack(block, now)]
                } else if self.windowsize > 1 && !self.gap_acked {
                    // RFC 7440 §4: out of order (or an old block again); ACK
                    // the last in-order block, once per gap.
                    self.gap_acked = true;
                    let last_good = self.rollover.wire(self.expected_block - 1);
                    vec![self.ack(last_good, now)]
                } else {
                    vec![]
                }
            }
            Packet::Error { code, .. } => {
                self.error = Some(code);
                self.done = true;
                self.deadline = None;
                vec![]
            }
            other => panic!("server sent {other:?}"),
        }
    }

    fn handle_timeout(&mut self, now: Instant) -> Vec<Vec<u8>> {
        match self.deadline {
            Some(d) if now >= d && !self.vanished && !self.done => {
                self.retransmits += 1;
                self.deadline = Some(now + self.timeout);
                vec![self.last_sent.clone()]
            }
            Some(d) if now >= d => {
                // Done or vanished: nothing more to send.
                self.deadline = None;
                vec![]
            }
            _ => vec![],
        }
    }
}

type Rule = Box<dyn FnMut(Dir, &Packet<'_>, usize) -> Fate>;

pub struct Sim {
    /// The client's address and port (a new port for each transfer).
    pub peer: SocketAddr,
    pub now: Instant,
    pub start: Instant,
    pub endpoint: Endpoint<Arc<Vec<u8>>>,
    pub files: MemFiles,
    pub client: Client,
    pub session: Option<SessionId>,
    pub latency: Duration,
    pub mtu: Option<u32>,
    in_flight: Vec<(Instant, Dir, Vec<u8>)>,
    rule: Rule,
    /// Every datagram the server sent, with the time it was sent.
    pub server_sent: Vec<(Instant, Vec<u8>)>,
    /// Every datagram the client sent.
    pub client_sent: Vec<Vec<u8>>,
    /// How many datagrams of each direction passed the link so far.
    counts: [usize; 2],
    pub outcome: Option<Outcome>,
    pub log_line: Option<String>,
    buf: Vec<u8>,
}

impl Sim {
    pub fn new(file: &[u8], options: &[(&str, &str)]) -> Self {
        Self::with_config(file, options, config())
    }

    pub fn with_config(file: &[u8], options: &[(&str, &str)], config: EndpointConfig) -> Self {
        let mut files = MemFiles::default();
        files.insert("file", file.to_vec());
        let rrq = rrq(options);
        let start = Instant::now();
        Self {
            peer: CLIENT,
            now: start,
            start,
            endpoint: Endpoint::new(config),
            files,
            client: Client::new(&rrq, 512, 1),
            session: None,
            latency: Duration::from_micros(100),
            mtu: Some(1500),
            in_flight: vec![(start, Dir::ToServer, rrq)],
            rule: Box::new(|_, _, _| Fate::Deliver),
            server_sent: Vec::new(),
            client_sent: Vec::new(),
            counts: [0, 0],
            outcome: None,
            log_line: None,
            buf: vec![0u8; 1024],
        }
    }

    /// Starts a new transfer of `file` from the same client address (a
    /// new port: a new TID) on the same endpoint and clock, once the last
    /// one ended, so what the endpoint learned of the address carries
    /// over. The link rule, the counts it sees and the records start
    /// afresh; the client keeps its timeout.
    pub fn next_transfer(&mut self, file: &[u8], options: &[(&str, &str)]) -> &mut Self {
        assert!(self.session.is_none(), "the last transfer is still running");
        self.files.insert("file", file.to_vec());
        let rrq = rrq(options);
        let timeout = self.client.timeout;
        self.client = Client::new(&rrq, 512, 1);
        self.client.timeout = timeout;
        self.peer.set_port(self.peer.port().wrapping_add(1));
        // Leftovers of the old client die with its socket.
        self.in_flight.clear();
        self.in_flight.push((self.now, Dir::ToServer, rrq));
        self.start = self.now;
        self.rule = Box::new(|_, _, _| Fate::Deliver);
        self.server_sent.clear();
        self.client_sent.clear();
        self.counts = [0, 0];
        self.outcome = None;
        self.log_line = None;
        self
    }

    /// Sets the link's behaviour for the transfer under way (after
    /// `next_transfer`, for the new one).
    pub fn set_link(&mut self, rule: impl FnMut(Dir, &Packet<'_>, usize) -> Fate + 'static) {
        self.rule = Box::new(rule);
    }

    /// Sets the link's behaviour: called for each datagram with its
    /// direction, parsed packet and index among that direction's packets.
    pub fn link(mut self, rule: impl FnMut(Dir, &Packet<'_>, usize) -> Fate + 'static) -> Self {
        self.rule = Box::new(rule);
        self
    }

    fn send(&mut self, dir: Dir, bytes: Vec<u8>) {
        if dir == Dir::ToServer {
            self.client_sent.push(bytes.clone());
        }
        let index = self.counts[dir as usize];
        self.counts[dir as usize] += 1;
        let fate = match Packet::parse(&bytes) {
            Ok(packet) => (self.rule)(dir, &packet, index),
            Err(_) => Fate::Deliver,
        };
        let at = self.now + self.latency;
        match fate {
            Fate::Deliver => self.in_flight.push((at, dir, bytes)),
            Fate::Drop => {}
            Fate::Duplicate => {
                self.in_flight.push((at, dir, bytes.clone()));
                self.in_flight
                    .push((at + Duration::from_micros(1), dir, bytes));
            }
            Fate::Delay(d) => self.in_flight.push((at + d, dir, bytes)),
        }
    }

    fn drain_server(&mut self) {
        let Some(id) = self.session else { return };
        while let Some(t) = self.endpoint.poll_transmit(self.now, id, &mut self.buf) {
            let mut datagram = self.buf[..t.header_len()].to_vec();
            if let Some(p) = t.payload() {
                let data = self.endpoint.session(id).unwrap().handle.clone();
                datagram.extend_from_slice(&data[p.offset as usize..p.offset as usize + p.len]);
            }
            self.server_sent.push((self.now, datagram.clone()));
            self.send(Dir::ToClient, datagram);
        }
        if let Some(finished) = self.endpoint.poll_event(id) {
            self.outcome = Some(finished.outcome);
            self.log_line = Some(finished.to_string());
            self.session = None;
        }
    }

    /// The client's datagram to the listening port.
    fn request(&mut self, bytes: &[u8], reply: &mut [u8]) -> RequestOutcome {
        self.endpoint.handle_request(
            self.now,
            self.peer,
            LOCAL,
            self.mtu,
            bytes,
            &mut self.files,
            reply,
        )
    }

    fn deliver(&mut self, dir: Dir, bytes: Vec<u8>) {
        match dir {
            Dir::ToServer => {
                let mut reply = [0u8; 600];
                match self.session {
                    None if self.outcome.is_none() => match self.request(&bytes, &mut reply) {
                        RequestOutcome::Started(id) => self.session = Some(id),
                        RequestOutcome::Reply(n) => self.send(Dir::ToClient, reply[..n].to_vec()),
                        RequestOutcome::Ignored => {}
                    },
                    None => {}
                    Some(id) => {
                        let is_rrq = matches!(Packet::parse(&bytes), Ok(Packet::Rrq(_)));
                        if self.endpoint.single_port() {
                            // Everything comes to the listener: the route
                            // must tell the session's datagrams from requests.
                            let want = if is_rrq {
                                Route::Request { live: Some(id) }
                            } else {
                                Route::Session(id)
                            };
                            assert_eq!(self.endpoint.route(self.peer, &bytes), want);
                        }
                        // Before any reply the client still sends RRQs to
                        // the listener, not to the transfer port.
                        if is_rrq {
                            let outcome = self.request(&bytes, &mut reply);
                            assert_eq!(
                                outcome,
                                RequestOutcome::Ignored,
                                "retransmitted RRQ started a second transfer"
                            );
                        } else {
                            let outcome = self
                                .endpoint
                                .handle_datagram(self.now, id, self.peer, &bytes, &mut reply);
                            assert_eq!(outcome, DatagramOutcome::Delivered);
                        }
                    }
                }
                self.drain_server();
            }
            Dir::ToClient => {
                for reply in self.client.receive(self.now, &bytes) {
                    self.send(Dir::ToServer, reply);
                }
            }
        }
    }

    /// Advances to the next event. False when nothing is left to happen.
    pub fn step(&mut self) -> bool {
        let server_deadline = self.session.and_then(|id| self.endpoint.poll_timeout(id));
        let next_delivery = self.in_flight.iter().map(|(at, _, _)| *at).min();
        let next = [server_deadline, self.client.deadline, next_delivery]
            .into_iter()
            .flatten()
            .min();
        let Some(next) = next else { return false };
        self.now = self.now.max(next);
        if let Some(pos) = self.in_flight.iter().position(|(at, _, _)| *at <= self.now) {
            let (_, dir, bytes) = self.in_flight.remove(pos);
            self.deliver(dir, bytes);
            return true;
        }
        if server_deadline.is_some_and(|d| d <= self.now) {
            let id = self.session.unwrap();
            self.endpoint.handle_timeout(self.now, id);
            self.drain_server();
        }
        if self.client.deadline.is_some_and(|d| d <= self.now) {
            for datagram in self.client.handle_timeout(self.now) {
                self.send(Dir::ToServer, datagram);
            }
        }
        true
    }

    /// Runs until nothing is left to happen, or panics after `max_steps`.
    pub fn drive(&mut self) -> &mut Self {
        for _ in 0..5_000_000 {
            if !self.step() {
                return self;
            }
        }
        panic!("simulation did not settle");
    }

    pub fn data_sent(&self) -> usize {
        self.server_sent
            .iter()
            .filter(|(_, d)| matches!(Packet::parse(d), Ok(Packet::Data { .. })))
            .count()
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }
}

/// An endpoint and its files at a fake clock, fed datagrams as a driver
/// would from the listener (at `LOCAL`, from an interface of `mtu`).
pub struct Desk<F: Sink> {
    pub now: Instant,
    pub endpoint: Endpoint<F::Handle>,
    pub files: F,
    /// Replies and transmits are written here.
    pub buf: Vec<u8>,
    pub mtu: Option<u32>,
}

impl<F: Sink> Desk<F>
where
    F::Handle: Clone,
{
    pub fn new(config: EndpointConfig, files: F) -> Self {
        Desk {
            now: Instant::now(),
            endpoint: Endpoint::new(config),
            files,
            buf: vec![0; 70_000],
            mtu: Some(1500),
        }
    }

    pub fn request(&mut self, from: SocketAddr, datagram: &[u8]) -> RequestOutcome {
        self.endpoint.handle_request(
            self.now,
            from,
            LOCAL,
            self.mtu,
            datagram,
            &mut self.files,
            &mut self.buf,
        )
    }

    /// The request must start a session.
    #[track_caller]
    pub fn started(&mut self, from: SocketAddr, datagram: &[u8]) -> SessionId {
        match self.request(from, datagram) {
            RequestOutcome::Started(id) => id,
            other => panic!("{from}: expected a start, got {other:?}"),
        }
    }

    /// The request must be refused: its ERROR's code and text.
    #[track_caller]
    pub fn refused(&mut self, from: SocketAddr, datagram: &[u8]) -> (ErrorCode, String) {
        match self.request(from, datagram) {
            RequestOutcome::Reply(n) => match Packet::parse(&self.buf[..n]) {
                Ok(Packet::Error { code, message }) => {
                    (code, String::from_utf8_lossy(message).into_owned())
                }
                other => panic!("not an ERROR: {other:?}"),
            },
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}

/// A request datagram: `opcode` (1 RRQ, 2 WRQ), then the name, the mode
/// and the options as NUL-terminated strings, unchecked (so tests can send
/// unknown or absurd ones).
pub fn request(opcode: u8, name: &str, mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    let mut p = vec![0, opcode];
    for field in [name, mode] {
        p.extend_from_slice(field.as_bytes());
        p.push(0);
    }
    for (n, v) in options {
        p.extend_from_slice(n.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

/// An octet RRQ of "file" with `options`.
fn rrq(options: &[(&str, &str)]) -> Vec<u8> {
    request(1, "file", "octet", options)
}

/// The RTO floor a finished transfer's log line reports.
pub fn logged_floor_ms(sim: &Sim) -> f64 {
    let line = sim.log_line.as_deref().expect("no log line");
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("rto_floor_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rto_floor_ms in {line}"))
}

pub fn is_data(p: &Packet<'_>, n: u16) -> bool {
    matches!(p, Packet::Data { block, .. } if *block == n)
}

pub fn is_ack(p: &Packet<'_>, n: u16) -> bool {
    matches!(p, Packet::Ack { block } if *block == n)
}
