//! One session step, ns per ACK: the client's ACK for the newest block goes
//! in, the DATA it opens comes out (`handle_datagram`, then `poll_transmit`
//! until `None`, then `poll_timeout` to re-arm, as the shard does).
//! Lock-step (windowsize 1: one DATA per ACK) and windowed (windowsize 16:
//! sixteen DATA per ACK; the throughput line counts blocks, so ns per block
//! is the time divided by 16). Measured on a bare `Transfer` and through
//! `Endpoint` (slab lookup and peer check added), blksize 1468.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringtftpd::endpoint::{DatagramOutcome, Endpoint, EndpointConfig, RequestOutcome, SessionId};
use ringtftpd::files::{OpenError, Sink, Source};
use ringtftpd::policy::Settings;
use ringtftpd::proto::{Mode, Options, Packet, Request};
use ringtftpd::session::{self, Limits, Transfer, Transmit};

/// 1 PiB: about 7.7e11 blocks of 1468 bytes, so no transfer ends however
/// many iterations criterion runs (4 GiB would end after ~2.9M steps).
const CONTENT_LEN: u64 = 1 << 50;
const BLKSIZE: u32 = 1468;
const CLIENT: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), 40000);
const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

fn limits() -> Limits {
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

fn options(windowsize: u32) -> Options {
    Options {
        blksize: Some(BLKSIZE),
        timeout: None,
        tsize: Some(0),
        windowsize: Some(windowsize),
        ..Options::default()
    }
}

fn ack(block: u16) -> [u8; 4] {
    let [hi, lo] = block.to_be_bytes();
    [0, 4, hi, lo]
}

/// The block number of the DATA header at the start of `buf`.
fn data_block(buf: &[u8]) -> u16 {
    u16::from_be_bytes([buf[2], buf[3]])
}

/// The client's side of the exchange: the newest block it received, and
/// counters to check afterwards that every step sent a full window.
struct Driver {
    last_block: u16,
    steps: u64,
    blocks: u64,
}

/// Setup access to a session, bare or behind the endpoint.
trait Link {
    fn receive(&mut self, now: Instant, datagram: &[u8]);
    fn transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit>;
}

impl Link for Transfer {
    fn receive(&mut self, now: Instant, datagram: &[u8]) {
        self.handle_datagram(now, datagram);
    }
    fn transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        self.poll_transmit(now, buf)
    }
}

impl Link for (&mut Endpoint<()>, SessionId) {
    fn receive(&mut self, now: Instant, datagram: &[u8]) {
        let mut reply = [0u8; 516];
        let outcome = self
            .0
            .handle_datagram(now, self.1, CLIENT, datagram, &mut reply);
        assert_eq!(outcome, DatagramOutcome::Delivered);
    }
    fn transmit(&mut self, now: Instant, buf: &mut [u8]) -> Option<Transmit> {
        self.0.poll_transmit(now, self.1, buf)
    }
}

/// Sends the OACK, takes ACK 0 and sends the first window, checking each
/// packet, and returns the client's state for the bench loop.
fn start(link: &mut impl Link, now: Instant, buf: &mut [u8], windowsize: u16) -> Driver {
    let tx = link.transmit(now, buf).expect("an OACK");
    let Ok(Packet::Oack(oack)) = Packet::parse(&buf[..tx.header_len()]) else {
        panic!("expected an OACK first");
    };
    // A window of one is lock-step, left out of the OACK (as tftpd-hpa 7.3).
    let expected = (windowsize > 1).then_some(u32::from(windowsize));
    assert_eq!(oack.windowsize, expected);
    assert!(link.transmit(now, buf).is_none(), "one OACK only");
    link.receive(now, &ack(0));
    let mut last_block = 0;
    let mut sent = 0;
    while let Some(tx) = link.transmit(now, buf) {
        let payload = tx.payload().expect("DATA carries a file range");
        assert_eq!(payload.len, BLKSIZE as usize);
        last_block = data_block(buf);
        sent += 1;
    }
    assert_eq!(sent, windowsize, "first window");
    assert_eq!(last_block, windowsize);
    Driver {
        last_block,
        steps: 0,
        blocks: 0,
    }
}

fn bare_transfer(now: Instant, windowsize: u16, buf: &mut [u8]) -> (Transfer, Driver) {
    let limits = limits();
    let negotiated = session::negotiate(
        &options(u32::from(windowsize)),
        CONTENT_LEN,
        None,
        false,
        &limits,
    );
    assert_eq!(negotiated.windowsize, windowsize);
    assert_eq!(u32::from(negotiated.blksize), BLKSIZE);
    let mut t = Transfer::new_read(now, &negotiated, CONTENT_LEN, &limits);
    let driver = start(&mut t, now, buf, windowsize);
    (t, driver)
}

/// A file source with one endless file and no bytes behind it: the step
/// never touches the payload, only its range.
struct Endless;

impl Source for Endless {
    type Handle = ();
    fn open_read(&mut self, _filename: &[u8], _mode: Mode) -> Result<((), u64), OpenError> {
        Ok(((), CONTENT_LEN))
    }
}

impl Sink for Endless {}

fn endpoint_session(
    now: Instant,
    windowsize: u16,
    buf: &mut [u8],
) -> (Endpoint<()>, SessionId, Driver) {
    let mut ep = Endpoint::new(EndpointConfig {
        max_sessions: 1024,
        settings: Settings {
            limits: limits(),
            error_replies_per_sec: 10,
            error_reply_burst: 5,
            open_cache_ttl: Duration::ZERO,
            ..Settings::default()
        },
        ..EndpointConfig::default()
    });
    let mut rrq = [0u8; 128];
    let n = Packet::Rrq(Request {
        filename: b"pxelinux.0",
        mode: Mode::Octet,
        options: options(u32::from(windowsize)),
    })
    .emit(&mut rrq)
    .expect("RRQ fits");
    let mut reply = [0u8; 516];
    let outcome = ep.handle_request(
        now,
        CLIENT,
        LOCAL,
        None,
        &rrq[..n],
        &mut Endless,
        &mut reply,
    );
    let RequestOutcome::Started(id) = outcome else {
        panic!("request not admitted: {outcome:?}");
    };
    let driver = start(&mut (&mut ep, id), now, buf, windowsize);
    (ep, id, driver)
}

fn step(c: &mut Criterion) {
    let mut g = c.benchmark_group("session_step");
    let now = Instant::now();
    let mut buf = [0u8; 2048];

    for windowsize in [1u16, 16] {
        g.throughput(Throughput::Elements(u64::from(windowsize)));

        let (mut t, mut d) = bare_transfer(now, windowsize, &mut buf);
        g.bench_function(BenchmarkId::new("transfer", windowsize), |b| {
            b.iter(|| {
                t.handle_datagram(now, black_box(&ack(d.last_block)));
                while let Some(tx) = t.poll_transmit(now, black_box(&mut buf[..])) {
                    black_box(tx);
                    d.last_block = data_block(&buf);
                    d.blocks += 1;
                }
                d.steps += 1;
                black_box(t.poll_timeout())
            })
        });
        assert!(!t.is_ended(), "transfer ended during the bench");
        assert_eq!(d.blocks, d.steps * u64::from(windowsize), "short window");
        assert_eq!(t.stats().retransmits, 0);

        let (mut ep, id, mut d) = endpoint_session(now, windowsize, &mut buf);
        let mut reply = [0u8; 516];
        g.bench_function(BenchmarkId::new("endpoint", windowsize), |b| {
            b.iter(|| {
                let acked = ack(d.last_block);
                let outcome = ep.handle_datagram(
                    now,
                    black_box(id),
                    black_box(CLIENT),
                    black_box(&acked),
                    &mut reply,
                );
                black_box(outcome);
                while let Some(tx) = ep.poll_transmit(now, id, black_box(&mut buf[..])) {
                    black_box(tx);
                    d.last_block = data_block(&buf);
                    d.blocks += 1;
                }
                d.steps += 1;
                black_box(ep.poll_timeout(id))
            })
        });
        assert!(
            ep.poll_event(id).is_none(),
            "session ended during the bench"
        );
        assert_eq!(d.blocks, d.steps * u64::from(windowsize), "short window");
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        // Plot rendering, not measuring, dominated the run time.
        .without_plots();
    targets = step
}
criterion_main!(benches);
