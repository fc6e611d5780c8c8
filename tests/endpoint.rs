//! `Endpoint` admission, routing and refusals, sans-IO.

mod sim;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringtftpd::endpoint::{DatagramOutcome, Endpoint, EndpointConfig, RequestOutcome, SessionId};
use ringtftpd::proto::{ErrorCode, Packet};
use sim::*;

fn peer(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), port)
}

fn rrq(name: &str, mode: &str, options: &[(&str, &str)]) -> Vec<u8> {
    request(1, name, mode, options)
}

type Fixture = Desk<MemFiles>;

/// An endpoint serving `boot.img` (10,000 bytes).
fn fixture(config: EndpointConfig) -> Fixture {
    let mut files = MemFiles::default();
    files.insert("boot.img", content(10_000, 1));
    Desk::new(config, files)
}

/// Requests `name` (octet, no options) from `from`; it must start.
#[track_caller]
fn start(f: &mut Fixture, from: SocketAddr, name: &str) {
    f.started(from, &rrq(name, "octet", &[]));
}

#[test]
fn refusals_carry_the_right_error_codes() {
    let mut f = fixture(config());
    assert_eq!(
        f.refused(peer(1), &rrq("nope", "octet", &[])).0,
        ErrorCode::FileNotFound
    );
    let (code, message) = f.refused(peer(2), &[0, 2, b'a', 0, b'o', b'c', b't', b'e', b't', 0]);
    assert_eq!(code, ErrorCode::AccessViolation);
    assert!(message.contains("uploads are disabled"), "{message}");
    assert_eq!(
        f.refused(peer(3), &rrq("boot.img", "mail", &[])).0,
        ErrorCode::IllegalOperation
    );
    assert_eq!(
        f.refused(peer(4), &rrq("boot.img", "bogus", &[])).0,
        ErrorCode::IllegalOperation
    );
    assert_eq!(
        f.refused(peer(5), &[0, 9, 1, 2]).0,
        ErrorCode::IllegalOperation
    );
    assert_eq!(f.refused(peer(6), b"\x00").0, ErrorCode::IllegalOperation);
    // Over-long filename: refused, not served.
    let long = "a".repeat(5000);
    assert_eq!(
        f.refused(peer(7), &rrq(&long, "octet", &[])).0,
        ErrorCode::AccessViolation
    );
    assert!(f.endpoint.is_empty());
}

#[test]
fn mode_names_are_case_insensitive() {
    let mut f = fixture(config());
    assert!(matches!(
        f.request(peer(1), &rrq("boot.img", "OcTeT", &[])),
        RequestOutcome::Started(_)
    ));
    assert!(matches!(
        f.request(peer(2), &rrq("boot.img", "NETASCII", &[])),
        RequestOutcome::Started(_)
    ));
}

#[test]
fn absurd_options_are_refused_without_panic() {
    let mut f = fixture(config());
    let many: Vec<(String, String)> = (0..5000)
        .map(|i| (format!("opt{i}"), "1".to_string()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    let (code, _) = f.refused(peer(1), &rrq("boot.img", "octet", &many));
    assert_eq!(code, ErrorCode::IllegalOperation);
    // Unparseable, overflowing (past 64 bits: tftpd-hpa's strtoumax says
    // ERANGE) or unknown values are ignored, not refused, as tftpd-hpa
    // 5.2 and 7.3 do.
    let long_value = "9".repeat(10_000);
    for (i, options) in [
        &[("blksize", long_value.as_str())][..],
        &[("blksize", "lots"), ("foo", "bar")],
        &[("foo", long_value.as_str())],
    ]
    .into_iter()
    .enumerate()
    {
        let started = f.request(peer(2 + i as u16), &rrq("boot.img", "octet", options));
        assert!(matches!(started, RequestOutcome::Started(_)), "{i}");
    }
}

#[test]
fn option_names_are_case_insensitive_and_oack_lists_only_accepted() {
    let mut f = fixture(config());
    let request = rrq(
        "boot.img",
        "octet",
        &[
            ("BlkSize", "1468"),
            ("TSIZE", "0"),
            ("foo", "1"),
            ("timeout", "0"),
        ],
    );
    let RequestOutcome::Started(id) = f.request(peer(1), &request) else {
        panic!()
    };
    let mut buf = [0u8; 600];
    let t = f.endpoint.poll_transmit(f.now, id, &mut buf).unwrap();
    let Ok(Packet::Oack(options)) = Packet::parse(&buf[..t.header_len()]) else {
        panic!()
    };
    assert_eq!(options.blksize, Some(1468));
    assert_eq!(options.tsize, Some(10_000));
    assert_eq!(options.timeout, None);
    assert_eq!(options.windowsize, None);
}

#[test]
fn strangers_get_error_5_and_the_transfer_goes_on() {
    let mut f = fixture(config());
    let RequestOutcome::Started(id) = f.request(peer(1), &rrq("boot.img", "octet", &[])) else {
        panic!()
    };
    let mut buf = [0u8; 600];
    let t = f.endpoint.poll_transmit(f.now, id, &mut buf).unwrap();
    assert!(t.payload().is_some());
    let stranger = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)), 999);
    let mut reply = [0u8; 600];
    match f
        .endpoint
        .handle_datagram(f.now, id, stranger, &[0, 4, 0, 1], &mut reply)
    {
        DatagramOutcome::Reply(n) => {
            assert!(matches!(
                Packet::parse(&reply[..n]),
                Ok(Packet::Error {
                    code: ErrorCode::UnknownTid,
                    ..
                })
            ))
        }
        other => panic!("{other:?}"),
    }
    // The same port from another host is a stranger too.
    let other_host = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), 1);
    assert!(matches!(
        f.endpoint
            .handle_datagram(f.now, id, other_host, &[0, 4, 0, 1], &mut reply),
        DatagramOutcome::Reply(_)
    ));
    // The real client's ACK still moves the transfer on.
    assert_eq!(
        f.endpoint
            .handle_datagram(f.now, id, peer(1), &[0, 4, 0, 1], &mut reply),
        DatagramOutcome::Delivered
    );
    let t = f.endpoint.poll_transmit(f.now, id, &mut buf).unwrap();
    assert_eq!(&buf[..4], &[0, 3, 0, 2]);
    assert_eq!(t.payload().unwrap().offset, 512);
    // A stranger's ERROR is never answered (no ping-pong of errors).
    assert_eq!(
        f.endpoint
            .handle_datagram(f.now, id, stranger, &[0, 5, 0, 5, 0], &mut reply),
        DatagramOutcome::Ignored
    );
}

#[test]
fn error_replies_to_strangers_are_rate_limited() {
    let mut f = fixture(config()); // 10/s, burst 5
    let RequestOutcome::Started(id) = f.request(peer(1), &rrq("boot.img", "octet", &[])) else {
        panic!()
    };
    let stranger = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)), 999);
    let mut reply = [0u8; 600];
    let mut answered = 0;
    for _ in 0..1000 {
        if let DatagramOutcome::Reply(_) =
            f.endpoint
                .handle_datagram(f.now, id, stranger, &[0, 4, 0, 1], &mut reply)
        {
            answered += 1;
        }
    }
    assert_eq!(answered, 5);
    // One second later, ten more tokens (capped at the burst of 5).
    let later = f.now + Duration::from_secs(1);
    let mut answered = 0;
    for _ in 0..1000 {
        if let DatagramOutcome::Reply(_) =
            f.endpoint
                .handle_datagram(later, id, stranger, &[0, 4, 0, 1], &mut reply)
        {
            answered += 1;
        }
    }
    assert_eq!(answered, 5);
    // Garbage sent to the listener shares the same budget.
    assert_eq!(
        f.endpoint.handle_request(
            later,
            peer(2),
            LOCAL,
            None,
            &[0, 9],
            &mut f.files,
            &mut reply
        ),
        RequestOutcome::Ignored
    );
}

#[test]
fn beyond_max_sessions_without_patience_the_server_says_it_is_busy() {
    let mut f = fixture(EndpointConfig {
        max_sessions: 3,
        settings: Settings {
            busy_patience: Duration::ZERO,
            ..settings()
        },
        ..config()
    });
    for port in 1..=3 {
        start(&mut f, peer(port), "boot.img");
    }
    let (code, message) = f.refused(peer(4), &rrq("boot.img", "octet", &[]));
    assert_eq!(code, ErrorCode::NotDefined);
    assert!(message.contains("busy"), "{message}");
    assert_eq!(f.endpoint.len(), 3);
}

#[test]
fn stale_session_ids_reach_nothing() {
    let mut f = fixture(config());
    let RequestOutcome::Started(id) = f.request(peer(1), &rrq("boot.img", "octet", &[])) else {
        panic!()
    };
    f.endpoint
        .abort(f.now, id, ringtftpd::refusal::Abort::ShuttingDown);
    let mut buf = [0u8; 600];
    assert!(f.endpoint.poll_transmit(f.now, id, &mut buf).is_some()); // the ERROR
    let finished = f.endpoint.poll_event(id).expect("ended after its ERROR");
    assert!(finished.to_string().contains("outcome=aborted"));
    // The slot is reused with a new generation; the old id is dead.
    let RequestOutcome::Started(new) = f.request(peer(2), &rrq("boot.img", "octet", &[])) else {
        panic!()
    };
    assert_eq!(new.index, id.index);
    assert_ne!(new.generation, id.generation);
    let stale = SessionId { ..id };
    assert!(f.endpoint.poll_transmit(f.now, stale, &mut buf).is_none());
    assert!(f.endpoint.remove(stale).is_none());
    assert!(f.endpoint.poll_event(stale).is_none());
    assert!(f.endpoint.session(new).is_some());
}

#[test]
fn a_new_request_from_the_same_port_after_a_probe_starts_a_new_transfer() {
    // OVMF: RRQ tsize → OACK → ERROR 8, then RRQ blksize+windowsize from
    // the same port, possibly before the probe session was reaped.
    let mut f = fixture(config());
    let RequestOutcome::Started(probe) =
        f.request(peer(1), &rrq("boot.img", "octet", &[("tsize", "0")]))
    else {
        panic!()
    };
    let fetch = rrq(
        "boot.img",
        "octet",
        &[("blksize", "1468"), ("windowsize", "4")],
    );
    let RequestOutcome::Started(real) = f.request(peer(1), &fetch) else {
        panic!()
    };
    assert_ne!(probe, real);
    // But the very same request again is a retransmission.
    assert_eq!(f.request(peer(1), &fetch), RequestOutcome::Ignored);
}

#[test]
fn shutting_down_refuses_new_requests() {
    let mut f = fixture(config());
    f.endpoint.shut_down();
    let (code, message) = f.refused(peer(1), &rrq("boot.img", "octet", &[]));
    assert_eq!(code, ErrorCode::NotDefined);
    assert!(message.contains("shutting down"));
}

#[test]
fn opens_are_reused_for_the_cache_ttl_then_redone() {
    let ttl = Duration::from_secs(1);
    let mut f = fixture(EndpointConfig {
        settings: Settings {
            open_cache_ttl: ttl,
            ..settings()
        },
        ..config()
    });
    // A missing name is refused, and the refusal is remembered...
    assert_eq!(
        f.refused(peer(1), &rrq("late.cfg", "octet", &[])).0,
        ErrorCode::FileNotFound
    );
    f.files
        .files
        .insert(b"late.cfg".to_vec(), Arc::new(b"hello".to_vec()));
    assert_eq!(
        f.refused(peer(2), &rrq("late.cfg", "octet", &[])).0,
        ErrorCode::FileNotFound
    );
    // ...until the TTL has passed.
    f.now += ttl;
    let RequestOutcome::Started(id) = f.request(peer(3), &rrq("late.cfg", "octet", &[])) else {
        panic!()
    };
    assert_eq!(**f.endpoint.session(id).unwrap().handle, b"hello".to_vec());
    // A replaced file is picked up after the TTL too.
    f.files
        .files
        .insert(b"late.cfg".to_vec(), Arc::new(b"bye".to_vec()));
    let RequestOutcome::Started(id) = f.request(peer(4), &rrq("late.cfg", "octet", &[])) else {
        panic!()
    };
    assert_eq!(**f.endpoint.session(id).unwrap().handle, b"hello".to_vec());
    f.now += ttl;
    let RequestOutcome::Started(id) = f.request(peer(5), &rrq("late.cfg", "octet", &[])) else {
        panic!()
    };
    assert_eq!(**f.endpoint.session(id).unwrap().handle, b"bye".to_vec());
    // Modes are cached apart.
    f.files.files.remove(b"late.cfg".as_slice());
    assert!(matches!(
        f.refused(peer(6), &rrq("late.cfg", "netascii", &[])).0,
        ErrorCode::FileNotFound
    ));
}

fn other_peer(last_octet: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last_octet)), port)
}

#[test]
fn one_address_cannot_take_every_slot() {
    // Fill the per-client cap from one address: it is refused, while a
    // second address is still served at once.
    let mut f = fixture(EndpointConfig {
        max_sessions: 16,
        settings: Settings {
            max_sessions_per_client: 4,
            ..settings()
        },
        ..config()
    });
    for port in 1..=4 {
        start(&mut f, peer(port), "boot.img");
    }
    let (code, message) = f.refused(peer(5), &rrq("boot.img", "octet", &[]));
    assert_eq!(code, ErrorCode::NotDefined);
    assert!(message.contains("too many transfers"), "{message}");
    start(&mut f, other_peer(3, 1), "boot.img");
    let counts = *f.endpoint.refusals();
    assert_eq!(counts.get(ringtftpd::refusal::RefusalKind::PerClientCap), 1);
    // A finished session frees its client's slot.
    let ids: Vec<SessionId> = f.endpoint.session_ids().collect();
    f.endpoint.remove(ids[0]).unwrap();
    start(&mut f, peer(6), "boot.img");
}

#[test]
fn a_flooding_address_is_rate_limited_and_others_are_not() {
    let mut f = fixture(EndpointConfig {
        settings: Settings {
            requests_per_sec_per_client: 10,
            request_burst_per_client: 20,
            ..settings()
        },
        ..config()
    });
    // 100 requests for a missing file from one address within a second:
    // the burst of 20 is answered, the rest dropped unanswered.
    let mut answered = 0;
    for port in 0..100 {
        if let RequestOutcome::Reply(_) = f.request(peer(1000 + port), &rrq("nope", "octet", &[])) {
            answered += 1;
        }
    }
    assert_eq!(answered, 20);
    let counts = *f.endpoint.refusals();
    assert_eq!(counts.get(ringtftpd::refusal::RefusalKind::RateLimited), 80);
    // Another address is served at once.
    let (code, _) = f.refused(other_peer(7, 1), &rrq("nope", "octet", &[]));
    assert_eq!(code, ErrorCode::FileNotFound);
    // The flooder's bucket refills: 10 per second.
    f.now += Duration::from_millis(500);
    let refilled = (0..10)
        .filter(|&p| {
            matches!(
                f.request(peer(3000 + p), &rrq("nope", "octet", &[])),
                RequestOutcome::Reply(_)
            )
        })
        .count();
    assert_eq!(refilled, 5);
}

#[test]
fn every_refusal_goes_through_a_token_bucket() {
    // Missing files, WRQs, the per-client cap, "busy" and "shutting down"
    // are all refused within one refusal limit, however many distinct
    // (possibly spoofed) addresses ask.
    let mut f = fixture(EndpointConfig {
        max_sessions: 3,
        settings: Settings {
            refusal_replies_per_sec: 10,
            max_sessions_per_client: 1,
            // Busy answered at once: the waiting ones are tested below.
            busy_patience: Duration::ZERO,
            ..settings()
        },
        ..config()
    });
    start(&mut f, other_peer(200, 1), "boot.img");
    let wrq = request(2, "up.bin", "octet", &[]);
    let mut replies = 0;
    let mut count_reply = |f: &mut Fixture, from, datagram: &[u8]| {
        if let RequestOutcome::Reply(_) = f.request(from, datagram) {
            replies += 1;
        }
    };
    for i in 0..80u16 {
        let from = other_peer(10 + (i % 80) as u8, 2000 + i);
        match i % 4 {
            0 => count_reply(&mut f, from, &rrq("nope", "octet", &[])),
            1 => count_reply(&mut f, from, &wrq),
            // The first of these takes a slot; the rest meet the cap.
            2 => count_reply(
                &mut f,
                other_peer(201, 2000 + i),
                &rrq("boot.img", "octet", &[]),
            ),
            _ => count_reply(
                &mut f,
                other_peer(200, 2000 + i),
                &rrq("boot.img", "octet", &[]),
            ),
        }
    }
    start(&mut f, other_peer(202, 1), "boot.img");
    for i in 0..20u16 {
        count_reply(
            &mut f,
            other_peer(100 + i as u8, 3000 + i),
            &rrq("boot.img", "octet", &[]),
        );
    }
    f.endpoint.shut_down();
    for i in 0..20u16 {
        count_reply(
            &mut f,
            other_peer(130 + i as u8, 4000 + i),
            &rrq("boot.img", "octet", &[]),
        );
    }
    use ringtftpd::refusal::RefusalKind as Refusal;
    let counts = *f.endpoint.refusals();
    assert_eq!(counts.get(Refusal::NotFound), 20);
    assert_eq!(counts.get(Refusal::UploadsDisabled), 20);
    assert_eq!(counts.get(Refusal::PerClientCap), 19 + 20);
    assert_eq!(counts.get(Refusal::Busy), 20);
    assert_eq!(counts.get(Refusal::ShuttingDown), 20);
    // 119 refusals, 10 answered (the bucket's burst), the rest held back.
    assert_eq!(replies, 10);
    assert_eq!(counts.replies_suppressed, 109);
}

/// Files whose opens fail transiently (out of descriptors) until told not to.
struct Flaky {
    inner: MemFiles,
    failing: bool,
    opens: usize,
}

impl ringtftpd::files::Source for Flaky {
    type Handle = Arc<Vec<u8>>;
    fn open_read(
        &mut self,
        filename: &[u8],
        mode: ringtftpd::proto::Mode,
    ) -> Result<(Self::Handle, u64), ringtftpd::files::OpenError> {
        self.opens += 1;
        if self.failing {
            return Err(ringtftpd::files::OpenError::Transient(
                "server busy, try again later",
            ));
        }
        self.inner.open_read(filename, mode)
    }
}

impl ringtftpd::files::Sink for Flaky {}

#[test]
fn transient_open_errors_are_not_cached_and_expired_opens_are_released() {
    let mut files = Flaky {
        inner: MemFiles::default(),
        failing: true,
        opens: 0,
    };
    let data = Arc::new(content(5000, 3));
    files.inner.files.insert(b"f".to_vec(), data.clone());
    let mut endpoint = Endpoint::new(EndpointConfig {
        settings: Settings {
            open_cache_ttl: Duration::from_secs(1),
            ..settings()
        },
        ..config()
    });
    let now = Instant::now();
    let mut reply = [0u8; 600];
    let mut ask = |endpoint: &mut Endpoint<_>, files: &mut Flaky, now, port| {
        endpoint.handle_request(
            now,
            peer(port),
            LOCAL,
            None,
            &rrq("f", "octet", &[]),
            files,
            &mut reply,
        )
    };
    assert!(matches!(
        ask(&mut endpoint, &mut files, now, 1),
        RequestOutcome::Reply(_)
    ));
    files.failing = false;
    // Within the TTL, but the failure was transient: opened again, served.
    let started = ask(&mut endpoint, &mut files, now, 2);
    assert!(matches!(started, RequestOutcome::Started(_)), "{started:?}");
    assert_eq!(files.opens, 2);
    let RequestOutcome::Started(id) = started else {
        unreachable!()
    };
    endpoint.remove(id).unwrap();
    // The cache holds the file (one reference here, one in the cache)...
    assert_eq!(Arc::strong_count(&data), 3); // MemFiles, the cache, `data`
    assert_eq!(endpoint.open_cache_usage(), (1, 5000));
    // ...until it expires: any later request sweeps it out.
    let later = now + Duration::from_secs(2);
    assert!(matches!(
        endpoint.handle_request(
            later,
            peer(3),
            LOCAL,
            None,
            &rrq("missing", "octet", &[]),
            &mut files,
            &mut [0u8; 600]
        ),
        RequestOutcome::Reply(_)
    ));
    assert_eq!(Arc::strong_count(&data), 2);
    assert_eq!(endpoint.open_cache_usage(), (1, 0)); // the refusal of "missing"
}

/// Files that say they hold `charge` bytes each (as a huge ISO would).
struct Charged {
    inner: MemFiles,
    opens: usize,
}

impl ringtftpd::files::Source for Charged {
    type Handle = Arc<Vec<u8>>;
    fn open_read(
        &mut self,
        filename: &[u8],
        mode: ringtftpd::proto::Mode,
    ) -> Result<(Self::Handle, u64), ringtftpd::files::OpenError> {
        self.opens += 1;
        self.inner.open_read(filename, mode)
    }

    fn held_bytes(handle: &Self::Handle, _len: u64) -> u64 {
        // The first byte says how many hundred MiB the file "holds".
        (u64::from(handle.first().copied().unwrap_or(0)) * 100) << 20
    }
}

impl ringtftpd::files::Sink for Charged {}

#[test]
fn a_huge_file_is_not_cached_and_does_not_flush_the_others() {
    let mut files = Charged {
        inner: MemFiles::default(),
        opens: 0,
    };
    files
        .inner
        .files
        .insert(b"small".to_vec(), Arc::new(vec![1u8; 100]));
    files
        .inner
        .files
        .insert(b"iso".to_vec(), Arc::new(vec![9u8; 100]));
    let mut endpoint = Endpoint::new(EndpointConfig {
        max_sessions: 64,
        settings: Settings {
            open_cache_ttl: Duration::from_secs(10),
            ..settings()
        },
        ..config()
    });
    let now = Instant::now();
    let mut reply = [0u8; 600];
    for (port, name) in [(1, "small"), (2, "iso"), (3, "iso"), (4, "small")] {
        let outcome = endpoint.handle_request(
            now,
            peer(port),
            LOCAL,
            None,
            &rrq(name, "octet", &[]),
            &mut files,
            &mut reply,
        );
        assert!(matches!(outcome, RequestOutcome::Started(_)), "{outcome:?}");
    }
    // "small" opened once and kept; the 900 MiB "iso" opened each time.
    assert_eq!(files.opens, 3);
    assert_eq!(endpoint.open_cache_usage(), (1, 100 << 20));
}

#[test]
fn a_quiet_server_still_releases_expired_opens() {
    let data = Arc::new(content(5000, 4));
    let mut files = MemFiles::default();
    files.files.insert(b"f".to_vec(), data.clone());
    let mut endpoint = Endpoint::new(EndpointConfig {
        settings: Settings {
            open_cache_ttl: Duration::from_secs(1),
            ..settings()
        },
        ..config()
    });
    let now = Instant::now();
    let outcome = endpoint.handle_request(
        now,
        peer(1),
        LOCAL,
        None,
        &rrq("f", "octet", &[]),
        &mut files,
        &mut [0u8; 600],
    );
    let RequestOutcome::Started(id) = outcome else {
        panic!("{outcome:?}")
    };
    endpoint.remove(id).unwrap();
    assert_eq!(endpoint.open_cache_usage(), (1, 5000));
    endpoint.housekeeping(now + Duration::from_millis(500));
    assert_eq!(endpoint.open_cache_usage(), (1, 5000), "not yet expired");
    // No request comes; the driver's housekeeping lets it go.
    endpoint.housekeeping(now + Duration::from_secs(2));
    assert_eq!(endpoint.open_cache_usage(), (0, 0));
    assert_eq!(Arc::strong_count(&data), 2); // MemFiles and `data`
}

/// Bytes on the wire (IP + UDP headers included) that one spoofed RRQ
/// makes the server send to its victim, who never answers; with `forged_ack0`,
/// the spoofer also guessed the transfer port and forged one ACK 0.
fn reflected_bytes(options: &[(&str, &str)], forged_ack0: bool) -> (usize, usize) {
    let mut files = MemFiles::default();
    files
        .files
        .insert(b"big".to_vec(), Arc::new(content(4 << 20, 9)));
    let mut endpoint = Endpoint::new(EndpointConfig {
        settings: Settings {
            limits: ringtftpd::session::Limits::default(),
            ..settings()
        },
        ..config()
    });
    let request = rrq("big", "octet", options);
    let mut now = Instant::now();
    let mut reply = [0u8; 600];
    let RequestOutcome::Started(id) = endpoint.handle_request(
        now,
        peer(9),
        LOCAL,
        Some(1500),
        &request,
        &mut files,
        &mut reply,
    ) else {
        panic!("not started");
    };
    let mut buf = [0u8; 600];
    let (mut bytes, mut packets) = (0, 0);
    let mut acked = false;
    for _ in 0..10_000 {
        while let Some(t) = endpoint.poll_transmit(now, id, &mut buf) {
            bytes += 28 + t.header_len() + t.payload().map_or(0, |p| p.len);
            packets += 1;
            if forged_ack0
                && !acked
                && matches!(Packet::parse(&buf[..t.header_len()]), Ok(Packet::Oack(_)))
            {
                acked = true;
                endpoint.handle_datagram(now, id, peer(9), &[0, 4, 0, 0], &mut reply);
            }
        }
        if endpoint.poll_event(id).is_some() {
            let request_bytes = 28 + request.len();
            return (bytes / request_bytes, packets);
        }
        now = endpoint.poll_timeout(id).expect("a deadline");
        endpoint.handle_timeout(now, id);
    }
    panic!("never ended");
}

#[test]
fn amplification_of_one_spoofed_request_is_bounded() {
    // Figures for docs/robustness.md: run with --nocapture.
    let (plain, plain_packets) = reflected_bytes(&[], false);
    let (oack, _) = reflected_bytes(&[("blksize", "1468"), ("windowsize", "64")], false);
    let (ack0, ack0_packets) = reflected_bytes(&[("blksize", "1468"), ("windowsize", "64")], true);
    let (ack0_ws1, _) = reflected_bytes(&[("blksize", "1468")], true);
    println!(
        "amplification (bytes out / bytes in, one spoofed RRQ, defaults): no options {plain}x \
         ({plain_packets} packets); blksize 1468 windowsize 64: {oack}x without a forged ACK, \
         {ack0}x with a forged ACK 0 ({ack0_packets} packets); blksize 1468 windowsize 1 with a \
         forged ACK 0: {ack0_ws1}x"
    );
    // Without an answer, the first packet is sent 1 + retries (8) times.
    assert_eq!(plain_packets, 9 + 1, "DATA 1 nine times, then the ERROR");
    // The victim is a first contact: windowsize 64 is granted as 16. A
    // forged ACK 0 buys that one window, then the head block per retry
    // (not the window per retry). Taken for an answering peer, it is
    // waited for 15 s after the 8 retries (spent in ~0.5 s at the 2 ms
    // floor): 6 more resends, backing off to the 3 s RTO ceiling.
    assert_eq!(
        ack0_packets,
        1 + 16 + 8 + 6 + 1,
        "OACK, a window of 16, 8 head resends, 6 patient ones, ERROR"
    );
    assert!(ack0 < 700, "{ack0}x");
}

/// Each refused request gives one log note naming the client, the file as
/// asked and the reason; a malformed datagram (no file) gives none.
#[test]
fn a_refused_request_is_noted_for_the_log_with_its_file_and_reason() {
    use ringtftpd::endpoint::RefusalNote;
    let mut f = fixture(config());
    let name = "pxelinux.cfg/01-52-54-00-12-34-56";
    f.refused(peer(1), &rrq(name, "octet", &[]));
    let Some(RefusalNote::Refused(r)) = f.endpoint.poll_refused() else {
        panic!("no note of the refusal");
    };
    assert_eq!(
        (r.peer, r.filename.as_str(), r.write),
        (peer(1), name, false)
    );
    assert_eq!(r.kind.as_str(), "not_found");
    assert_eq!(r.code, ErrorCode::FileNotFound);
    let line = RefusalNote::Refused(r).to_string();
    assert_eq!(
        line,
        format!(
            "refused client=127.0.0.2:1 file=\"{name}\" direction=read reason=not_found error_code=1 error=\"file not found\""
        )
    );
    // An upload while uploads are off; a name with a quote and a newline
    // stays on one line.
    f.refused(peer(2), &request(2, "a\"b\nc", "octet", &[]));
    let line = f.endpoint.poll_refused().expect("a note").to_string();
    assert!(line.contains("file=\"a\\\"b\\nc\""), "{line}");
    assert!(
        line.contains("direction=write reason=uploads_disabled"),
        "{line}"
    );
    f.refused(peer(3), &[0, 9, 1, 2]);
    assert_eq!(f.endpoint.poll_refused(), None, "no file, no note");
    // A served request is not a refusal.
    start(&mut f, peer(4), "boot.img");
    assert_eq!(f.endpoint.poll_refused(), None);
}

/// A flood of refusals logs a burst, then one line a second with how many
/// were left out; every one is still counted.
#[test]
fn a_flood_of_refusals_is_logged_at_a_bounded_rate_with_a_count() {
    use ringtftpd::endpoint::{REFUSAL_LOG_BURST, RefusalNote};
    let mut f = fixture(config());
    let flood = 1000u16;
    let mut noted = 0u64;
    for port in 0..flood {
        let from = SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(10, 0, (port >> 8) as u8, port as u8)),
            1,
        );
        f.refused(from, &rrq("missing", "octet", &[]));
        while let Some(note) = f.endpoint.poll_refused() {
            assert!(matches!(note, RefusalNote::Refused(_)), "{note:?}");
            noted += 1;
        }
    }
    assert_eq!(
        noted,
        u64::from(REFUSAL_LOG_BURST),
        "the burst, all at one instant"
    );
    f.endpoint.housekeeping(f.now);
    assert_eq!(
        f.endpoint.poll_refused(),
        None,
        "the summary waits a second"
    );
    f.now += Duration::from_secs(1);
    f.endpoint.housekeeping(f.now);
    assert_eq!(
        f.endpoint.poll_refused(),
        Some(RefusalNote::Suppressed {
            lines: u64::from(flood) - noted
        })
    );
    assert_eq!(
        f.endpoint
            .refusals()
            .get(ringtftpd::refusal::RefusalKind::NotFound),
        u64::from(flood)
    );
    // After the flood, refusals are logged again.
    f.refused(peer(9), &rrq("missing", "octet", &[]));
    assert!(matches!(
        f.endpoint.poll_refused(),
        Some(RefusalNote::Refused(_))
    ));
}

/// iPXE's request times: 0, 0.25, 0.75, 1.75, 3.75 and 7.75 s (its retry
/// timer starts at 1/4 s and doubles; past 10 s it gives up).
const IPXE_RETRIES_MS: [u64; 6] = [0, 250, 750, 1750, 3750, 7750];

/// An endpoint with `max` session slots, all taken, and busy patience
/// `patience`.
fn full(max: usize, patience: Duration) -> Fixture {
    let mut f = fixture(EndpointConfig {
        max_sessions: max,
        settings: Settings {
            busy_patience: patience,
            ..settings()
        },
        ..config()
    });
    for port in 1..=max as u16 {
        start(&mut f, peer(port), "boot.img");
    }
    f
}

#[test]
fn a_busy_request_is_met_with_silence_until_the_client_waited_past_the_patience() {
    use ringtftpd::refusal::RefusalKind as Refusal;
    let mut f = full(3, Duration::from_secs(7));
    let t0 = f.now;
    let asked = rrq("boot.img", "octet", &[]);
    // Each retransmission within the 7 s is dropped: the client tries again.
    for ms in &IPXE_RETRIES_MS[..5] {
        f.now = t0 + Duration::from_millis(*ms);
        assert_eq!(
            f.request(peer(9), &asked),
            RequestOutcome::Ignored,
            "at {ms} ms"
        );
    }
    assert_eq!(f.endpoint.waiting_len(), 1);
    // Its last one (7.75 s) is past the patience: answered, so it fails
    // with a reason rather than at its timeout.
    f.now = t0 + Duration::from_millis(IPXE_RETRIES_MS[5]);
    let (code, message) = f.refused(peer(9), &asked);
    assert_eq!(code, ErrorCode::NotDefined);
    assert!(message.contains("busy"), "{message}");
    let counts = *f.endpoint.refusals();
    assert_eq!(counts.busy_deferred, 5);
    assert_eq!(counts.get(Refusal::Busy), 1);
    assert_eq!(f.endpoint.waiting_len(), 0);
    assert_eq!(f.endpoint.len(), 3);
}

#[test]
fn a_waiting_client_is_admitted_by_its_retransmission_once_a_slot_frees() {
    let mut f = full(2, Duration::from_secs(7));
    let t0 = f.now;
    let asked = rrq("boot.img", "octet", &[]);
    assert_eq!(f.request(peer(9), &asked), RequestOutcome::Ignored);
    // Another client's transfer ends.
    let ids: Vec<SessionId> = f.endpoint.session_ids().collect();
    assert!(f.endpoint.remove(ids[0]).is_some());
    f.now = t0 + Duration::from_millis(250);
    f.started(peer(9), &asked);
    assert_eq!(f.endpoint.refusals().busy_deferred, 1);
    use ringtftpd::refusal::RefusalKind as Refusal;
    assert_eq!(f.endpoint.refusals().get(Refusal::Busy), 0);
}

#[test]
fn a_new_request_of_a_waiting_peer_starts_its_wait_afresh() {
    let mut f = full(1, Duration::from_secs(2));
    let t0 = f.now;
    assert_eq!(
        f.request(peer(9), &rrq("boot.img", "octet", &[])),
        RequestOutcome::Ignored
    );
    // Past the patience, but another request (another name): a new wait.
    f.now = t0 + Duration::from_millis(2500);
    let other = rrq("boot.img", "octet", &[("blksize", "1432")]);
    assert_eq!(f.request(peer(9), &other), RequestOutcome::Ignored);
    f.now = t0 + Duration::from_millis(4000);
    assert_eq!(f.request(peer(9), &other), RequestOutcome::Ignored);
    f.now = t0 + Duration::from_millis(4600);
    assert_eq!(f.refused(peer(9), &other).0, ErrorCode::NotDefined);
    // Another port of the same address is another client.
    assert_eq!(f.request(peer(10), &other), RequestOutcome::Ignored);
}

#[test]
fn waiting_requests_are_bounded_and_forgotten() {
    const CAPACITY: u16 = 65_535; // the map holds 65,536: one more below
    let mut f = full(1, Duration::from_secs(7));
    let t0 = f.now;
    let asked = rrq("boot.img", "octet", &[]);
    let many = |i: u32| {
        let [_, a, b, c] = i.to_be_bytes();
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, a, b, c)), 1000)
    };
    // Spoofed or real, 65,536 waiting requests are remembered...
    for i in 0..=u32::from(CAPACITY) {
        assert_eq!(f.request(many(i), &asked), RequestOutcome::Ignored, "{i}");
    }
    assert_eq!(f.endpoint.waiting_len(), 65_536);
    // ...and one more is answered at once, as without patience.
    assert_eq!(f.refused(many(70_000), &asked).0, ErrorCode::NotDefined);
    assert_eq!(f.endpoint.waiting_len(), 65_536);
    // After twice the patience they are forgotten, and the wait of a
    // client seen that long ago starts afresh.
    f.now = t0 + Duration::from_millis(14_001);
    assert_eq!(f.request(many(1), &asked), RequestOutcome::Ignored);
    assert_eq!(f.endpoint.waiting_len(), 1);
}

#[test]
fn no_transfer_socket_is_met_with_silence_too_until_the_patience() {
    use ringtftpd::refusal::RefusalKind as Refusal;
    let mut f = fixture(EndpointConfig {
        settings: Settings {
            busy_patience: Duration::from_secs(7),
            ..settings()
        },
        ..config()
    });
    let t0 = f.now;
    let asked = rrq("boot.img", "octet", &[]);
    // The driver could not make a socket (EMFILE): the session goes, and
    // the client is not told.
    let id = f.started(peer(9), &asked);
    let mut reply = vec![0; 600];
    assert_eq!(
        f.endpoint.refuse_busy(f.now, id, &mut reply),
        RequestOutcome::Ignored
    );
    assert!(f.endpoint.is_empty());
    // Its retransmissions are admitted and fail the same way: their wait
    // counts from the first.
    f.now = t0 + Duration::from_secs(4);
    let id = f.started(peer(9), &asked);
    assert_eq!(
        f.endpoint.refuse_busy(f.now, id, &mut reply),
        RequestOutcome::Ignored
    );
    f.now = t0 + Duration::from_millis(7750);
    let id = f.started(peer(9), &asked);
    let RequestOutcome::Reply(n) = f.endpoint.refuse_busy(f.now, id, &mut reply) else {
        panic!("past the patience: answered");
    };
    assert!(matches!(
        Packet::parse(&reply[..n]),
        Ok(Packet::Error {
            code: ErrorCode::NotDefined,
            ..
        })
    ));
    let counts = *f.endpoint.refusals();
    assert_eq!((counts.busy_deferred, counts.get(Refusal::Busy)), (2, 1));
}
