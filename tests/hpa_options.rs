//! tftpd-hpa's nonstandard options (blksize2, utimeout, rollover, cookie),
//! `-B mtu[-SLACK]` and `--window-bytes`, sans-IO: what the OACK says and
//! how the transfer then numbers its blocks. The expected answers are
//! tftpd-hpa 7.3's, as measured (tests/hpa_options_diff.rs compares
//! against the binaries themselves).

mod sim;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;

use ringtftpd::endpoint::{EndpointConfig, RequestOutcome};
use ringtftpd::policy::RefusedOptions;
use ringtftpd::proto::{Options, Packet, Rollover};
use ringtftpd::session::{self, Outcome, Transmit};
use sim::*;

fn peer(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), port)
}

/// An endpoint serving `boot.img` (10,000 bytes) under `config`.
fn desk(config: EndpointConfig) -> Desk<MemFiles> {
    let mut files = MemFiles::default();
    files.insert("boot.img", content(10_000, 1));
    Desk::new(config, files)
}

fn config_with(edit: impl FnOnce(&mut ringtftpd::policy::Settings)) -> EndpointConfig {
    let mut config = config();
    edit(&mut config.settings);
    config
}

/// The OACK's (name, value) pairs in wire order, or None if the transfer
/// starts with DATA 1.
fn oack_of(
    d: &mut Desk<MemFiles>,
    port: u16,
    options: &[(&str, &str)],
) -> Option<Vec<(String, String)>> {
    let id = d.started(peer(port), &request(1, "boot.img", "octet", options));
    let mut buf = [0u8; 2048];
    let t = d
        .endpoint
        .poll_transmit(d.now, id, &mut buf)
        .expect("a first transmit");
    match t {
        Transmit::Oack { len } => {
            let body = &buf[2..len];
            let fields: Vec<String> = body
                .split(|&b| b == 0)
                .map(|f| String::from_utf8_lossy(f).into_owned())
                .collect();
            let pairs = fields[..fields.len() - 1]
                .chunks(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect();
            Some(pairs)
        }
        Transmit::Data { block: 1, .. } => None,
        other => panic!("{options:?}: first transmit {other:?}"),
    }
}

/// An OACK's pairs, or None for none.
type Pairs = Option<Vec<(String, String)>>;

fn pairs(list: &[(&str, &str)]) -> Pairs {
    Some(
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

#[test]
fn the_oack_answers_as_tftpd_hpa_7_does() {
    let cookie255 = "x".repeat(255);
    let cookie256 = "x".repeat(256);
    // The endpoint's MTU is 1500: blksize at most 1468, blksize2 1024.
    #[rustfmt::skip]
    let cases: &[(&[(&str, &str)], Pairs)] = &[
        (&[("rollover", "0")], pairs(&[("rollover", "0")])),
        (&[("rollover", "1")], pairs(&[("rollover", "1")])),
        (&[("rollover", "01")], pairs(&[("rollover", "1")])),
        (&[("rollover", "2")], None),
        (&[("rollover", "1"), ("rollover", "2")], None),
        (&[("rollover", "2"), ("rollover", "1")], pairs(&[("rollover", "1")])),
        (&[("utimeout", "500000")], pairs(&[("utimeout", "500000")])),
        (&[("utimeout", "10000")], pairs(&[("utimeout", "10000")])),
        (&[("utimeout", "9999")], None),
        (&[("utimeout", "0")], None),
        (&[("timeout", "2"), ("utimeout", "20000")], pairs(&[("utimeout", "20000")])),
        (&[("utimeout", "20000"), ("timeout", "2")], pairs(&[("utimeout", "20000")])),
        (&[("timeout", "2"), ("utimeout", "5")], pairs(&[("timeout", "2")])),
        (&[("blksize2", "1000")], pairs(&[("blksize2", "512")])),
        (&[("blksize2", "8")], pairs(&[("blksize2", "8")])),
        (&[("blksize2", "9")], pairs(&[("blksize2", "8")])),
        (&[("blksize2", "7")], None),
        (&[("blksize2", "65464")], pairs(&[("blksize2", "1024")])),
        (&[("blksize", "1000"), ("blksize2", "1024")], pairs(&[("blksize2", "1024")])),
        (&[("blksize", "1000"), ("blksize2", "512")], pairs(&[("blksize", "1000")])),
        (&[("blksize", "1024"), ("blksize2", "1024")], pairs(&[("blksize", "1024"), ("blksize2", "1024")])),
        (&[("blksize", "7"), ("blksize2", "64")], pairs(&[("blksize2", "64")])),
        (&[("cookie", "abc")], pairs(&[("cookie", "abc")])),
        (&[("cookie", "")], None),
        (&[("cookie", &cookie255)], pairs(&[("cookie", &cookie255)])),
        (&[("cookie", &cookie256)], None),
        (&[("cookie", "abc"), ("cookie", "")], pairs(&[("cookie", "abc")])),
        (&[("cookie", "abc"), ("cookie", &cookie256)], None),
        (&[("cookie", "a"), ("cookie", "b")], pairs(&[("cookie", "b")])),
        (&[("windowsize", "1")], None),
        // A read request asks tsize with 0; another value is ignored.
        (&[("tsize", "5")], None),
        (&[("tsize", "0")], pairs(&[("tsize", "10000")])),
        // Names as spelled; order as tftpd-hpa 7.3's, not the request's.
        (
            &[("WindowSize", "4"), ("UTimeout", "20000"), ("TSize", "0"), ("timeout", "2"),
              ("ROLLOVER", "1"), ("Cookie", "c"), ("blksize2", "1024"), ("BlkSize", "1000")],
            pairs(&[("blksize2", "1024"), ("Cookie", "c"), ("ROLLOVER", "1"), ("TSize", "10000"),
                    ("UTimeout", "20000"), ("WindowSize", "4")]),
        ),
    ];
    for (options, want) in cases {
        let mut d = desk(config());
        assert_eq!(&oack_of(&mut d, 1, options), want, "{options:?}");
    }
}

#[test]
fn refusing_an_option_leaves_its_sibling() {
    let all = [
        ("blksize", "1000"),
        ("blksize2", "1024"),
        ("cookie", "c"),
        ("rollover", "1"),
        ("timeout", "2"),
        ("tsize", "0"),
        ("utimeout", "20000"),
        ("windowsize", "4"),
    ];
    for (name, left) in [
        (
            "utimeout",
            &[
                ("blksize2", "1024"),
                ("cookie", "c"),
                ("rollover", "1"),
                ("timeout", "2"),
                ("tsize", "10000"),
                ("windowsize", "4"),
            ][..],
        ),
        (
            "rollover",
            &[
                ("blksize2", "1024"),
                ("cookie", "c"),
                ("tsize", "10000"),
                ("utimeout", "20000"),
                ("windowsize", "4"),
            ],
        ),
        (
            "blksize2",
            &[
                ("blksize", "1000"),
                ("cookie", "c"),
                ("rollover", "1"),
                ("tsize", "10000"),
                ("utimeout", "20000"),
                ("windowsize", "4"),
            ],
        ),
        (
            "cookie",
            &[
                ("blksize2", "1024"),
                ("rollover", "1"),
                ("tsize", "10000"),
                ("utimeout", "20000"),
                ("windowsize", "4"),
            ],
        ),
        (
            "BLKSIZE",
            &[
                ("blksize2", "1024"),
                ("cookie", "c"),
                ("rollover", "1"),
                ("tsize", "10000"),
                ("utimeout", "20000"),
                ("windowsize", "4"),
            ],
        ),
    ] {
        let mut refused = RefusedOptions::default();
        assert!(refused.add(name), "{name}");
        let mut d = desk(config_with(|s| s.refused_options = refused));
        assert_eq!(oack_of(&mut d, 1, &all), pairs(left), "-r {name}");
    }
    // --refuse-all: DATA 1 at once, as tftpd(8) says. (tftpd-hpa 7.3's
    // binary does not answer at all: see tests/hpa_options_diff.rs.)
    let mut d = desk(config_with(|s| s.refused_options = RefusedOptions::ALL));
    assert_eq!(oack_of(&mut d, 1, &all), None);
    assert!(!RefusedOptions::default().add("bogus"));
}

#[test]
fn blocksize_mtu_less_slack_caps_blksize_never_below_512() {
    for (slack, asked, want) in [
        (0, ("blksize", "65464"), ("blksize", "1468")),
        (28, ("blksize", "65464"), ("blksize", "1440")),
        (100, ("blksize", "1400"), ("blksize", "1368")),
        (2000, ("blksize", "65464"), ("blksize", "512")),
        (1472, ("blksize", "1000"), ("blksize", "512")),
        (28, ("blksize2", "65464"), ("blksize2", "1024")),
        (2000, ("blksize2", "65464"), ("blksize2", "512")),
    ] {
        let mut d = desk(config_with(|s| s.limits.mtu_slack = slack));
        assert_eq!(
            oack_of(&mut d, 1, &[asked]),
            pairs(&[want]),
            "mtu-{slack} {asked:?}"
        );
    }
}

#[test]
fn window_bytes_limit_the_window_and_under_two_blocks_mean_lockstep() {
    // As tftpd-hpa 7.3 answers with --window-bytes N (and -W 256).
    for (bytes, asked, want) in [
        (1024, &[("windowsize", "8")][..], &[("windowsize", "2")][..]),
        (1023, &[("windowsize", "8")], &[]),
        (0, &[("windowsize", "8")], &[]),
        (
            2000,
            &[("windowsize", "8"), ("blksize", "1000")],
            &[("blksize", "1000"), ("windowsize", "2")],
        ),
        (
            1000,
            &[("windowsize", "8"), ("blksize", "1000")],
            &[("blksize", "1000")],
        ),
        (
            3000,
            &[("windowsize", "300"), ("blksize2", "1024")],
            &[("blksize2", "1024"), ("windowsize", "2")],
        ),
        (4 << 20, &[("windowsize", "8")], &[("windowsize", "8")]),
    ] {
        let mut d = desk(config_with(|s| {
            s.limits.max_window_bytes = bytes;
            s.limits.max_windowsize = 256;
            s.first_contact_windowsize = 0;
        }));
        let want = (!want.is_empty()).then(|| pairs(want).unwrap());
        assert_eq!(
            oack_of(&mut d, 1, asked),
            want,
            "--window-bytes {bytes} {asked:?}"
        );
    }
    // The default is tftpd-hpa 7.3's: 4 MiB, so 64 blocks of 65464.
    let limits = session::Limits {
        max_windowsize: 256,
        mtu_clamp: false,
        ..session::Limits::default()
    };
    let asked = Options {
        blksize: Some(65464),
        windowsize: Some(4000),
        ..Options::default()
    };
    assert_eq!(
        session::negotiate(&asked, 0, None, false, &limits).windowsize,
        64
    );
}

/// Blocks of 8 bytes, so 65537 of them and a short one cross 65535.
fn wrapping_file() -> Vec<u8> {
    content(65_537 * 8 + 3, 7)
}

/// The DATA block numbers the server sent, first copies only, in order.
fn data_numbers(sim: &Sim) -> Vec<u16> {
    let mut seen = Vec::new();
    for (_, bytes) in &sim.server_sent {
        if let Ok(Packet::Data { block, .. }) = Packet::parse(bytes) {
            seen.push(block);
        }
    }
    seen
}

#[test]
fn a_download_with_rollover_1_follows_65535_with_1() {
    let file = wrapping_file();
    let mut sim = Sim::new(&file, &[("blksize", "8"), ("rollover", "1")]);
    sim.drive();
    assert_eq!(sim.outcome, Some(Outcome::Completed));
    assert!(sim.client.received == file, "bytes differ");
    let numbers = data_numbers(&sim);
    assert_eq!(numbers.len(), 65_538, "no resends on a clean link");
    assert_eq!(&numbers[65_533..], &[65_534, 65_535, 1, 2, 3]);
    assert!(!numbers.contains(&0), "block 0 is never sent");
}

#[test]
fn a_download_with_rollover_0_follows_65535_with_0() {
    let file = wrapping_file();
    let mut sim = Sim::new(&file, &[("blksize", "8"), ("rollover", "0")]);
    sim.drive();
    assert_eq!(sim.outcome, Some(Outcome::Completed));
    assert!(sim.client.received == file, "bytes differ");
    assert_eq!(&data_numbers(&sim)[65_533..], &[65_534, 65_535, 0, 1, 2]);
}

#[test]
fn a_windowed_download_with_rollover_1_recovers_a_loss_across_the_wrap() {
    let file = wrapping_file();
    let mut dropped = false;
    let mut sim = Sim::new(
        &file,
        &[("blksize", "8"), ("windowsize", "4"), ("rollover", "1")],
    )
    .link(move |dir, p, n| {
        // The first block after 65535 (wire 1 again), once.
        if dir == Dir::ToClient && n > 60_000 && is_data(p, 1) && !dropped {
            dropped = true;
            return Fate::Drop;
        }
        Fate::Deliver
    });
    sim.drive();
    assert_eq!(sim.outcome, Some(Outcome::Completed));
    assert!(sim.client.received == file, "bytes differ");
    let numbers = data_numbers(&sim);
    assert!(numbers.len() > 65_538, "the lost block was resent");
    assert!(!numbers.contains(&0), "block 0 is never sent");
}

#[test]
fn an_upload_with_rollover_1_expects_1_after_65535() {
    let limits = session::Limits::default();
    let asked = Options {
        blksize: Some(8),
        rollover: Some(1),
        ..Options::default()
    };
    let negotiated = session::negotiate(&asked, session::LEN_UNKNOWN, None, false, &limits);
    assert_eq!(negotiated.rollover, Some(Rollover::One));
    let oack = negotiated.oack.expect("an OACK");
    assert_eq!((oack.blksize, oack.rollover), (Some(8), Some(1)));
    let now = Instant::now();
    let mut t = session::Transfer::new_write(now, &negotiated, None, &limits);
    let mut buf = [0u8; 600];
    assert!(matches!(
        t.poll_transmit(now, &mut buf),
        Some(Transmit::Oack { .. })
    ));
    let mut stored = 0u64;
    let data = |block: u16, len: usize| {
        let mut d = vec![0, 3];
        d.extend_from_slice(&block.to_be_bytes());
        d.extend(std::iter::repeat_n(0xa5, len));
        d
    };
    let mut send = |t: &mut session::Transfer, block: u16, len: usize| -> Option<u16> {
        if let Some(r) = t.handle_datagram(now, &data(block, len)) {
            stored += r.bytes.len() as u64;
            if r.last {
                t.commit_done(now);
            }
        }
        match t.poll_transmit(now, &mut buf) {
            Some(Transmit::Ack { block }) => Some(block),
            None => None,
            other => panic!("{other:?}"),
        }
    };
    for n in 1..=65_535u32 {
        assert_eq!(send(&mut t, n as u16, 8), Some(n as u16), "block {n}");
    }
    // Block 0 is not the next block: ignored, never acknowledged.
    assert_eq!(send(&mut t, 0, 8), None);
    assert_eq!(send(&mut t, 1, 8), Some(1), "block 65536 is numbered 1");
    assert_eq!(send(&mut t, 2, 3), Some(2), "the final block");
    assert_eq!(t.stats().bytes_acked, 65_536 * 8 + 3);
    assert_eq!(stored, 65_536 * 8 + 3);
}

#[test]
fn a_cookie_survives_the_oack_resend() {
    let mut d = desk(config());
    let id = d.started(
        peer(1),
        &request(1, "boot.img", "octet", &[("cookie", "c00kie\u{7f}")]),
    );
    let mut first = [0u8; 600];
    let Some(Transmit::Oack { len }) = d.endpoint.poll_transmit(d.now, id, &mut first) else {
        panic!("no OACK")
    };
    let deadline = d.endpoint.poll_timeout(id).expect("armed");
    d.endpoint.handle_timeout(deadline, id);
    let mut again = [0u8; 600];
    let Some(Transmit::Oack { len: len2 }) = d.endpoint.poll_transmit(deadline, id, &mut again)
    else {
        panic!("no OACK resend")
    };
    assert_eq!(&first[..len], &again[..len2]);
    assert_eq!(&first[..len], b"\x00\x06cookie\x00c00kie\x7f\x00");
    // A retransmitted request (same cookie) is no new transfer.
    let same = d.request(
        peer(1),
        &request(1, "boot.img", "octet", &[("cookie", "c00kie\u{7f}")]),
    );
    assert!(matches!(same, RequestOutcome::Ignored), "{same:?}");
}
