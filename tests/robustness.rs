//! Hostile and malformed input against the built `ringtftpd` on loopback: a
//! bounded flood of garbage at the listener and at a live transfer's port,
//! strangers' ACKs and ERRORs, and out-of-range option values. The server
//! must answer with rate-limited TFTP ERRORs, keep the transfer it is
//! serving intact, never exit, and go on serving byte-exact afterwards.
//!
//! Every flood is bounded in count and time and goes to 127.0.0.1 only.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

/// `--error-rate` given to the server under test (also its burst).
const ERROR_RATE: u32 = 40;

/// One malformed datagram for a listening port: every kind the parser must
/// refuse (unknown opcode, truncation, missing NULs, unknown mode, empty
/// name, too many options, DATA/ACK/OACK at the listener, random bytes).
fn malformed_request(rng: &mut Rng) -> Vec<u8> {
    match rng.below(9) {
        0 => {
            let mut p = rng.bytes_below(600);
            if p.len() >= 2 {
                p[0] = 0;
                p[1] = 7 + rng.below(200) as u8; // no such opcode
            }
            p
        }
        1 => rng.bytes_below(4), // shorter than any packet
        2 => b"\x00\x01b513.bin\x00octet".to_vec(), // mode not NUL-terminated
        3 => b"\x00\x01b513.bin".to_vec(), // no mode at all
        4 => request(1, "b513.bin", "morse", &[]),
        5 => request(1, "", "octet", &[]),
        6 => {
            let names: Vec<String> = (0..400).map(|i| format!("opt{i}")).collect();
            let opts: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
            request(1, "b513.bin", "octet", &opts)
        }
        7 => ack(rng.below(65536) as u16), // an ACK at the listener
        _ => {
            let mut p = vec![0, 3]; // DATA at the listener
            p.extend(rng.bytes_below(520));
            p
        }
    }
}

/// What a stranger might throw at a transfer's port.
fn stray_datagram(rng: &mut Rng) -> Vec<u8> {
    match rng.below(5) {
        0 => ack(rng.below(65536) as u16),
        1 => error(rng.below(9) as u16, "stray error"),
        2 => rng.bytes_below(600),
        3 => rrq("mib.bin", "octet", &[]),
        _ => {
            let mut p = vec![0, 3];
            p.extend(rng.bytes_below(1500));
            p
        }
    }
}

/// Receives whatever arrives on `c` for `window`; returns the ERROR codes.
fn collect_errors(c: &RawClient, window: Duration) -> Result<Vec<u16>, String> {
    let deadline = Instant::now() + window;
    let mut codes = Vec::new();
    // Bounded: each pass returns a datagram or waits out the window.
    for _ in 0..100_000 {
        let left = match deadline.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => left,
            _ => break,
        };
        match c.recv(left) {
            Some((Packet::Error { code, .. }, _)) => codes.push(code),
            Some((other, from)) => return Err(format!("{other:?} from {from} to garbage")),
            None => break,
        }
    }
    Ok(codes)
}

/// Most ERROR replies a token bucket of `ERROR_RATE`/s with an equal burst
/// may send over `elapsed` (one shard), plus one token of rounding.
fn error_budget(elapsed: Duration) -> usize {
    let rate = f64::from(ERROR_RATE);
    (rate + rate * elapsed.as_secs_f64()).ceil() as usize + 1
}

/// A ringtftpd with one shard and `ERROR_RATE`; None (a SKIP) for tftpd-hpa.
fn start_limited() -> Option<Server> {
    if server_kind() != ServerKind::Ringtftpd {
        eprintln!("SKIP: --error-rate is ringtftpd's");
        return None;
    }
    Some(Server::start_with(ServerOpts {
        extra_args: vec![
            "--threads".into(),
            "1".into(),
            "--error-rate".into(),
            ERROR_RATE.to_string(),
        ],
        ..ServerOpts::default()
    }))
}

/// The ERRORs a flood of `sent` datagrams drew within `elapsed`: at least
/// one, each with a code in `allowed`, and within the token bucket.
fn check_flood_errors(what: &str, sent: usize, elapsed: Duration, codes: &[u16], allowed: &[u16]) {
    eprintln!("{what}: {sent} sent, {} ERRORs in {elapsed:?}", codes.len());
    assert!(!codes.is_empty(), "{what}: {sent} datagrams drew no ERROR");
    assert!(
        codes.iter().all(|c| allowed.contains(c)),
        "{what}: ERROR codes {codes:?}, expected only {allowed:?}"
    );
    assert!(
        codes.len() <= error_budget(elapsed),
        "{what}: {} ERRORs in {elapsed:?} exceed --error-rate {ERROR_RATE} (budget {})",
        codes.len(),
        error_budget(elapsed)
    );
}

/// Thousands of malformed datagrams at the listener: answered only with
/// ERRORs (code 4 or 2), no more than the `--error-rate` bucket allows, and
/// afterwards every file still downloads byte-exact.
#[test]
fn garbage_flood_at_the_listener_gets_rate_limited_errors() {
    let Some(mut s) = start_limited() else {
        return;
    };
    let attacker = RawClient::new(s.addr());
    let mut rng = Rng(0x5eed_f100d);
    let start = Instant::now();
    let mut sent = 0;
    while sent < 5000 && start.elapsed() < Duration::from_secs(3) {
        attacker.send_to_server(&malformed_request(&mut rng));
        sent += 1;
    }
    let codes = collect_errors(&attacker, Duration::from_millis(1500))
        .unwrap_or_else(|e| panic!("listener flood: {e}"));
    check_flood_errors("listener flood", sent, start.elapsed(), &codes, &[2, 4]);
    s.assert_running();
    for &(name, _, _) in RANDOM_FILES {
        let c = RawClient::new(s.addr());
        let got = raw_get(&c, name, "octet", &[], |_, _| {})
            .unwrap_or_else(|e| panic!("{name} after the flood: {e}"));
        assert!(
            got.data == s.source(name),
            "{name} after the flood: content differs"
        );
    }
    s.assert_running();
}

/// A stranger floods a live transfer's port with ACKs, ERRORs, requests and
/// random bytes: it gets rate-limited ERROR 5s (RFC 1350 §4), and the
/// transfer it did not own completes byte-exact.
#[test]
fn stranger_flood_at_a_transfer_port_leaves_the_transfer_intact() {
    let Some(mut s) = start_limited() else {
        return;
    };
    let client = RawClient::new(s.addr());
    let stranger = RawClient::new(s.addr());
    let mut rng = Rng(0xbad_cafe);
    let mut flood: Option<(usize, Duration, Vec<u16>)> = None;
    let got = raw_get(
        &client,
        "mib.bin",
        "octet",
        &[],
        |block, tid: SocketAddr| {
            // Mid-transfer, between two ACKs of the real client.
            if block == 100 && flood.is_none() {
                let start = Instant::now();
                let mut sent = 0;
                while sent < 3000 && start.elapsed() < Duration::from_secs(2) {
                    stranger.send(&stray_datagram(&mut rng), tid);
                    sent += 1;
                }
                let codes = collect_errors(&stranger, Duration::from_millis(500))
                    .unwrap_or_else(|e| panic!("stranger flood: {e}"));
                flood = Some((sent, start.elapsed(), codes));
            }
        },
    )
    .unwrap_or_else(|e| panic!("transfer under a stranger's flood: {e}"));
    let want = s.source("mib.bin");
    assert!(
        got.data == want,
        "transfer under a flood: {} bytes received, not the {} of the file",
        got.data.len(),
        want.len()
    );
    let (sent, elapsed, codes) = flood.expect("the flood ran at block 100");
    check_flood_errors("stranger flood", sent, elapsed, &codes, &[5]);
    s.assert_running();
}

/// Option values outside every RFC range, or not numbers at all, are
/// ignored or clamped (the transfer runs byte-exact, with a blksize and
/// windowsize inside the RFC 2348 / RFC 7440 ranges) or refused with a clean
/// ERROR 8 (what tftpd-hpa does for some); never a hang or another error.
#[test]
fn out_of_range_option_values_get_a_sane_transfer_or_error_8() {
    let mut s = Server::start();
    let cases: &[&[(&str, &str)]] = &[
        &[("blksize", "0")],
        &[("blksize", "7")],
        &[("blksize", "65465")],
        &[("blksize", "99999999999999999999999999")],
        &[("blksize", "-512")],
        &[("blksize", "1e3")],
        &[("blksize", "")],
        &[("windowsize", "0")],
        &[("windowsize", "65536")],
        &[("tsize", "-1")],
        &[("tsize", "abc")],
        &[("timeout", "0")],
        &[("timeout", "256")],
        &[("BlKsIzE", "1024"), ("WINDOWSIZE", "3"), ("x-unknown", "1")],
    ];
    let mut served = 0;
    for opts in cases {
        let c = RawClient::new(s.addr());
        let got = match raw_get(&c, "mib.bin", "octet", opts, |_, _| {}) {
            Ok(got) => got,
            Err(e) if e.starts_with("unexpected first reply Error { code: 8") => continue,
            Err(e) => panic!("options {opts:?}: {e}"),
        };
        served += 1;
        let want = s.source("mib.bin");
        assert!(
            got.data == want,
            "options {opts:?}: {} bytes received, not the {} of the file",
            got.data.len(),
            want.len()
        );
        assert!(
            (8..=65464).contains(&got.blksize),
            "options {opts:?}: blksize {} outside 8..=65464",
            got.blksize
        );
        assert!(
            (1..=65535).contains(&got.windowsize),
            "options {opts:?}: windowsize {}",
            got.windowsize
        );
        // Any option the OACK grants must carry a legal value.
        let granted = got.oack.as_deref().unwrap_or_default();
        if let Some(t) = opt(granted, "timeout") {
            assert!(
                t.parse::<u8>().is_ok_and(|t| t >= 1),
                "options {opts:?}: OACK timeout {t}"
            );
        }
        if let Some(t) = opt(granted, "tsize") {
            assert_eq!(t, want.len().to_string(), "options {opts:?}: OACK tsize");
        }
    }
    eprintln!(
        "{served} of {} option sets served, the rest refused with ERROR 8",
        cases.len()
    );
    s.assert_running();
}
