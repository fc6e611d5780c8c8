//! tftpd-hpa's option handling, side by side: the same requests to
//! ringtftpd, tftpd-hpa 5.2 and 7.3 on loopback, under the same flags, and
//! the first answers compared (the OACK's names, spellings, values and
//! order; or DATA 1; or the ERROR code). tests/hpa_options.rs holds the
//! same answers sans-IO; this is where they are checked against the
//! binaries. 7.3 is the reference (5.2 has no windowsize and no cookie);
//! 5.2 is compared on the options it knows.

mod common;

use std::time::Duration;

use common::*;

/// The first answer to a request, reduced to what the peers must agree on.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Oack(Vec<(String, String)>),
    /// DATA 1 with this many bytes.
    Data(usize),
    Error(u16),
    Silence,
}

/// A request's options, as (name, value) in wire order.
type Ask = Vec<(String, String)>;

fn ask(list: &[(&str, &str)]) -> Ask {
    list.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Sends `options` for `name` and reduces the first answer; then ends the
/// transfer with an ERROR so no server keeps resending.
fn first_answer(s: &Server, name: &str, options: &Ask) -> Answer {
    let c = RawClient::new(s.addr());
    let opts: Vec<(&str, &str)> = options
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    c.send_to_server(&rrq(name, "octet", &opts));
    let Some((pkt, tid)) = c.recv(Duration::from_secs(3)) else {
        return Answer::Silence;
    };
    let answer = match pkt {
        Packet::Oack(pairs) => Answer::Oack(pairs),
        Packet::Data { block: 1, data } => Answer::Data(data.len()),
        Packet::Error { code, .. } => return Answer::Error(code),
        other => panic!("{:?}: unexpected first answer {other:?}", s.kind),
    };
    c.send(&error(0, "enough"), tid);
    answer
}

/// Each peer's server under `args` (tftpd-hpa's spelling), ringtftpd first.
fn servers(args: &[&str], with_hpa5: bool) -> Vec<Server> {
    let opts = |kind| ServerOpts {
        shared_args: args.iter().map(|a| a.to_string()).collect(),
        kind: Some(kind),
        ..ServerOpts::default()
    };
    let mut servers = vec![Server::start_with(opts(ServerKind::Ringtftpd))];
    if hpa7_command().is_some() {
        servers.push(Server::start_with(opts(ServerKind::Hpa7)));
    }
    if with_hpa5 && have_hpa() {
        servers.push(Server::start_with(opts(ServerKind::Hpa)));
    }
    servers
}

/// Asks every case of every server and fails with the whole table of
/// disagreements (each against ringtftpd's answer).
fn agree(args: &[&str], with_hpa5: bool, cases: &[Ask]) {
    let servers = servers(args, with_hpa5);
    if servers.len() == 1 {
        eprintln!("no tftpd-hpa to compare with: skipped");
        return;
    }
    let mut disagreements = Vec::new();
    for case in cases {
        let ours = first_answer(&servers[0], "mib.bin", case);
        for peer in &servers[1..] {
            let theirs = first_answer(peer, "mib.bin", case);
            if theirs != ours {
                disagreements.push(format!(
                    "{args:?} {case:?}:\n  ringtftpd {ours:?}\n  {:?} {theirs:?}",
                    peer.kind
                ));
            }
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} disagreement(s):\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
}

/// Where 5.2 and 7.3 answer alike (blksize, blksize2, tsize, timeout,
/// utimeout and rollover within range).
fn shared_cases() -> Vec<Ask> {
    let long = "1".repeat(40);
    [
        &[("blksize", "1024")][..],
        &[("blksize", "8")],
        &[("blksize", "65464")],
        &[("blksize", "65465")],
        &[("blksize", "abc")],
        &[("blksize", &long)],
        &[("BlkSize", "1000")],
        &[("tsize", "0")],
        &[("TSIZE", "0")],
        &[("timeout", "1")],
        &[("timeout", "3")],
        &[("rollover", "0")],
        &[("rollover", "1")],
        &[("rollover", "01")],
        &[("utimeout", "500000")],
        &[("utimeout", "10000")],
        &[("blksize2", "1000")],
        &[("blksize2", "8")],
        &[("blksize2", "9")],
        &[("blksize2", "65464")],
        &[("blksize", "1024"), ("blksize2", "1024")],
        &[("blksize", "1024"), ("blksize", "abc")],
        &[("foo", "bar")],
        &[("foo", "bar"), ("tsize", "0")],
    ]
    .iter()
    .map(|c| ask(c))
    .collect()
}

/// Where 7.3 changed 5.2's answer, and ringtftpd answers as 7.3: a value
/// out of range is left out instead of refused with ERROR 8; a nonzero
/// tsize in a read request is ignored instead of echoed; of blksize and
/// blksize2, of timeout and utimeout, and of repeated names, one answer;
/// and the OACK's order is 7.3's.
fn changed_in_7_cases() -> Vec<Ask> {
    [
        &[("blksize", "7")][..],
        &[("blksize", "0")],
        &[("tsize", "5")],
        &[("timeout", "0")],
        &[("timeout", "256")],
        &[("rollover", "2")],
        &[("rollover", "1"), ("rollover", "2")],
        &[("rollover", "2"), ("rollover", "1")],
        &[("utimeout", "9999")],
        &[("utimeout", "0")],
        &[("timeout", "2"), ("utimeout", "20000")],
        &[("utimeout", "20000"), ("timeout", "2")],
        &[("timeout", "2"), ("utimeout", "5")],
        &[("blksize2", "7")],
        &[("blksize", "1000"), ("blksize2", "1024")],
        &[("blksize", "1000"), ("blksize2", "512")],
        &[("blksize", "7"), ("blksize2", "64")],
        &[("blksize", "1024"), ("tsize", "0"), ("timeout", "2")],
        &[
            ("UTimeout", "20000"),
            ("TSize", "0"),
            ("timeout", "2"),
            ("ROLLOVER", "1"),
            ("blksize2", "1024"),
            ("BlkSize", "1000"),
        ],
    ]
    .iter()
    .map(|c| ask(c))
    .collect()
}

/// What only 7.x knows: windowsize and cookie.
fn hpa7_cases() -> Vec<Ask> {
    let (c255, c256) = ("x".repeat(255), "x".repeat(256));
    [
        &[("windowsize", "1")][..],
        &[("windowsize", "4")],
        &[("windowsize", "16")],
        &[("windowsize", "0")],
        &[("WindowSize", "8"), ("blksize", "1024")],
        &[("cookie", "abc")],
        &[("cookie", "")],
        &[("cookie", &c255)],
        &[("cookie", &c256)],
        &[("cookie", "abc"), ("cookie", "")],
        &[("cookie", "a"), ("cookie", "b")],
        &[
            ("WindowSize", "4"),
            ("UTimeout", "20000"),
            ("TSize", "0"),
            ("timeout", "2"),
            ("ROLLOVER", "1"),
            ("Cookie", "c"),
            ("blksize2", "1024"),
            ("BlkSize", "1000"),
        ],
    ]
    .iter()
    .map(|c| ask(c))
    .collect()
}

/// Every option at once, for the `-r` cases.
fn everything() -> Vec<Ask> {
    vec![ask(&[
        ("blksize", "1000"),
        ("blksize2", "1024"),
        ("cookie", "c"),
        ("rollover", "1"),
        ("timeout", "2"),
        ("tsize", "0"),
        ("utimeout", "20000"),
        ("windowsize", "4"),
    ])]
}

#[test]
fn options_tftpd_hpa_5_knows_are_answered_as_5_2_and_7_3_answer() {
    agree(&[], true, &shared_cases());
}

#[test]
fn where_7_3_changed_5_2s_answer_ringtftpd_answers_as_7_3() {
    agree(&[], false, &changed_in_7_cases());
}

#[test]
fn windowsize_and_cookie_are_answered_as_7_3_answers() {
    agree(&[], false, &hpa7_cases());
}

#[test]
fn each_refused_option_is_left_out_as_7_3_leaves_it() {
    for option in [
        "blksize", "blksize2", "cookie", "rollover", "timeout", "tsize", "utimeout", "BLKSIZE",
    ] {
        agree(&["-r", option], false, &everything());
    }
}

#[test]
fn a_blocksize_limit_caps_blksize_and_blksize2_as_both_peers_do() {
    let cases: Vec<Ask> = [
        &[("blksize", "1468")][..],
        &[("blksize", "1024")],
        &[("blksize2", "2048")],
    ]
    .iter()
    .map(|c| ask(c))
    .collect();
    agree(&["-B", "1024"], true, &cases);
    // 5.2 answers both; 7.3 the one that grants more.
    agree(
        &["-B", "1024"],
        false,
        &[ask(&[("blksize", "1000"), ("blksize2", "2048")])],
    );
}

#[test]
fn window_bytes_bound_the_window_as_7_3_bounds_it() {
    let cases: Vec<Ask> = [
        &[("windowsize", "8")][..],
        &[("windowsize", "8"), ("blksize", "1000")],
        &[("windowsize", "16"), ("blksize2", "1024")],
    ]
    .iter()
    .map(|c| ask(c))
    .collect();
    for bytes in ["1024", "1023", "2000", "3000"] {
        agree(&["--window-bytes", bytes], false, &cases);
    }
}

/// Where ringtftpd answers otherwise on purpose (docs/migrating.md): a
/// client's timeout or utimeout above `--rto-max-ms` (3 s) is declined,
/// since it would hold a session slot for minutes; 7.3 takes up to 255 s.
/// These pin the difference down, so a change on either side shows.
#[test]
fn a_timeout_above_the_rto_ceiling_is_declined_where_7_3_takes_it() {
    let servers = servers(&[], false);
    let Some(hpa7) = servers.get(1) else {
        eprintln!("tftpd-hpa 7.x unavailable: skipped");
        return;
    };
    for (name, value) in [("timeout", "5"), ("utimeout", "5000000")] {
        let case = ask(&[(name, value), ("tsize", "0")]);
        let size = (1 << 20).to_string();
        assert_eq!(
            first_answer(&servers[0], "mib.bin", &case),
            Answer::Oack(ask(&[("tsize", &size)])),
            "ringtftpd {case:?}"
        );
        // 7.3 answers in the order of its option table (alphabetical).
        let mut theirs = ask(&[("tsize", &size), (name, value)]);
        theirs.sort();
        assert_eq!(
            first_answer(hpa7, "mib.bin", &case),
            Answer::Oack(theirs),
            "tftpd-hpa 7.3 {case:?}"
        );
    }
}

/// Lock-step download of `big.bin` (65,537 blocks of 512) asking
/// `rollover`: the bytes, and the DATA numbers that follow block 65535.
fn download_across_the_wrap(s: &Server, rollover: &str) -> (Vec<u8>, Vec<u16>) {
    let c = RawClient::new(s.addr());
    c.send_to_server(&rrq(BIG_NAME, "octet", &[("rollover", rollover)]));
    let (first, tid) = c.recv(Duration::from_secs(3)).expect("an answer");
    assert_eq!(
        first,
        Packet::Oack(ask(&[("rollover", rollover)])),
        "{:?}",
        s.kind
    );
    let one = rollover == "1";
    let wire = |n: u64| -> u16 {
        match (one, n) {
            (_, 0) => 0,
            (true, n) => ((n - 1) % 65535 + 1) as u16,
            (false, n) => n as u16,
        }
    };
    let (mut data, mut after) = (Vec::new(), Vec::new());
    let mut next = 1u64;
    c.send(&ack(0), tid);
    // Bounded: the blocks, and a few resends each.
    for _ in 0..4 * 65_540 {
        match c.recv(Duration::from_secs(2)) {
            Some((Packet::Data { block, data: bytes }, from)) if from == tid => {
                if next > 65_535 && after.len() < 2 {
                    after.push(block);
                }
                if block == wire(next) {
                    data.extend_from_slice(&bytes);
                    next += 1;
                }
                c.send(&ack(block), tid);
                if block == wire(next - 1) && bytes.len() < 512 {
                    break;
                }
            }
            Some(_) => {}
            None => panic!("{:?}: silence at block {next}", s.kind),
        }
    }
    (data, after)
}

#[test]
fn rollover_numbers_blocks_past_65535_as_both_peers_do() {
    let opts = |kind| ServerOpts {
        big: true,
        kind: Some(kind),
        ..ServerOpts::default()
    };
    let mut servers = vec![Server::start_with(opts(ServerKind::Ringtftpd))];
    if hpa7_command().is_some() {
        servers.push(Server::start_with(opts(ServerKind::Hpa7)));
    }
    if have_hpa() {
        servers.push(Server::start_with(opts(ServerKind::Hpa)));
    }
    let whole = servers[0].source(BIG_NAME);
    for (rollover, follows) in [("1", [1, 2]), ("0", [0, 1])] {
        for s in &servers {
            let (data, after) = download_across_the_wrap(s, rollover);
            assert_eq!(after, follows, "{:?} rollover={rollover}", s.kind);
            assert!(
                data == whole,
                "{:?} rollover={rollover}: bytes differ",
                s.kind
            );
        }
    }
}

/// tftpd(8): `--refuse-all` "disables all TFTP options": DATA 1 at once.
/// ringtftpd does that. 7.3's binary under `--refuse-all` answers no
/// request at all, not even one without options (it cannot pass the
/// start-up probe), so 5.2 with every option refused is the reference.
#[test]
fn refuse_all_answers_with_data_1_as_5_2_does() {
    let case = everything();
    let ours = Server::start_with(ServerOpts {
        shared_args: vec!["--refuse-all".into()],
        ..ServerOpts::default()
    });
    assert_eq!(first_answer(&ours, "mib.bin", &case[0]), Answer::Data(512));
    if have_hpa() {
        // 5.2 has no --refuse-all: every -r instead.
        let mut args = Vec::new();
        for o in [
            "blksize", "blksize2", "rollover", "timeout", "tsize", "utimeout",
        ] {
            args.extend(["-r".to_string(), o.to_string()]);
        }
        let hpa = Server::start_with(ServerOpts {
            shared_args: args,
            kind: Some(ServerKind::Hpa),
            ..ServerOpts::default()
        });
        assert_eq!(first_answer(&hpa, "mib.bin", &case[0]), Answer::Data(512));
    }
}
