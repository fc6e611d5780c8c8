//! The built `ringtftpd` on loopback against real clients (tftp-hpa, atftp,
//! curl, busybox) and a raw std-socket client for what no client sends.
//! Every download is compared byte for byte with its source.
//!
//! A missing client prints `SKIP: <client> not installed`, or fails when
//! `RINGTFTPD_REQUIRE_CLIENTS=1` (scripts/test.sh sets it).
//! `RINGTFTPD_TEST_SERVER=hpa` runs the same tests against tftpd-hpa.

mod common;

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------- helpers

/// `opts` are atftp `--option` strings such as "blksize 1468".
fn atftp_get(s: &Server, name: &str, opts: &[String]) -> (Output, PathBuf) {
    let dest = s.dest(name);
    let mut args: Vec<String> = ["--get", "-r", name, "-l"].map(String::from).to_vec();
    args.push(dest.to_string_lossy().into_owned());
    for o in opts {
        args.push("--option".into());
        args.push(o.clone());
    }
    args.push(s.host());
    args.push(s.port().to_string());
    (run_client("atftp", &args), dest)
}

/// How curl negotiates: `--tftp-no-options`, its defaults (tsize, blksize 512,
/// timeout), or `--tftp-blksize N`.
#[derive(Clone, Copy, Debug)]
enum CurlOpts {
    NoOptions,
    Default,
    Blksize(u32),
}

fn curl_get(s: &Server, name: &str, how: CurlOpts) -> (Output, PathBuf) {
    let dest = s.dest(name);
    let mut args: Vec<String> = ["-s", "-S", "-o"].map(String::from).to_vec();
    args.push(dest.to_string_lossy().into_owned());
    match how {
        CurlOpts::NoOptions => args.push("--tftp-no-options".into()),
        CurlOpts::Default => {}
        CurlOpts::Blksize(b) => {
            args.push("--tftp-blksize".into());
            args.push(b.to_string());
        }
    }
    args.push(format!("{}/{name}", s.url_base()));
    (run_client("curl", &args), dest)
}

fn busybox_get(s: &Server, name: &str, blksize: Option<u32>) -> (Output, PathBuf) {
    let dest = s.dest(name);
    let mut args: Vec<String> = ["tftp", "-g", "-r", name, "-l"].map(String::from).to_vec();
    args.push(dest.to_string_lossy().into_owned());
    if let Some(b) = blksize {
        args.push("-b".into());
        args.push(b.to_string());
    }
    args.push(s.host());
    args.push(s.port().to_string());
    (run_client("busybox", &args), dest)
}

fn check(s: &Server, what: &str, name: &str, (out, dest): (Output, PathBuf)) {
    assert_download(what, &out, &dest, &s.source(name));
}

/// Every served test file: the random fixtures and the text file.
fn all_files() -> Vec<&'static str> {
    let mut v: Vec<&str> = RANDOM_FILES.iter().map(|(n, _, _)| *n).collect();
    v.push(TEXT_NAME);
    v
}

/// Fixtures that a sweep fetches at blksize `b`: everything at 512 and up,
/// only the small ones at tiny block sizes (1 MiB at 8 bytes is 131072 blocks).
fn sweep_files(blksize: u32) -> Vec<&'static str> {
    let mut v = small_files();
    if blksize >= 512 {
        v.push("mib.bin");
    }
    v
}

fn raw_download(s: &Server, name: &str, opts: &[(&str, &str)]) -> RawDownload {
    raw_download_mode(s, name, "octet", opts)
}

// ---------------------------------------------------------------- tftp-hpa

#[test]
fn tftp_hpa_binary_every_size() {
    if !have_tftp_hpa() {
        return;
    }
    let s = Server::start();
    for name in all_files() {
        check(
            &s,
            &format!("tftp-hpa binary {name}"),
            name,
            tftp_hpa_get(&s, name, "binary"),
        );
    }
}

#[test]
fn tftp_hpa_netascii_round_trips_text() {
    if !have_tftp_hpa() {
        return;
    }
    let s = Server::start();
    // The client decodes netascii back to local text, so the file must equal
    // the original, CRs, CRLFs and block-straddling pairs included.
    check(
        &s,
        "tftp-hpa ascii",
        TEXT_NAME,
        tftp_hpa_get(&s, TEXT_NAME, "ascii"),
    );
}

/// A few MiB of text, translated as it is sent (several translation
/// chunks, CR/LF at every kind of offset), arrive byte-exact.
#[test]
fn tftp_hpa_netascii_large_text_byte_exact() {
    if !have_tftp_hpa() {
        return;
    }
    let s = Server::start();
    let mut text = Vec::new();
    while text.len() < 3 << 20 {
        text.extend_from_slice(&text_fixture());
    }
    write_served(&s, "big.txt", &text);
    check(
        &s,
        "tftp-hpa ascii 3 MiB",
        "big.txt",
        tftp_hpa_get(&s, "big.txt", "ascii"),
    );
}

/// Netascii with options: tsize is declined (its translated length is
/// known only at the end; tftpd-hpa never sends one either), the wire
/// carries the translation, and a translation that is an exact multiple of
/// blksize ends with an empty block.
#[test]
fn netascii_declines_tsize_and_ends_exact_multiples_with_an_empty_block() {
    if server_kind() == ServerKind::Hpa {
        // tftpd-hpa 5.2 refuses netascii with tsize (ERROR 8) outright.
        eprintln!("SKIP: netascii tsize differs under tftpd-hpa");
        return;
    }
    let s = Server::start();
    // "abc\n" becomes 5 bytes: 587,200 of them are 2000 blocks of 1468.
    let text = b"abc\n".repeat(587_200);
    write_served(&s, "exact.txt", &text);
    let wire = netascii_encode(&text);
    assert_eq!(wire.len() % 1468, 0);
    for window in ["1", "4"] {
        let got = raw_download_mode(
            &s,
            "exact.txt",
            "netascii",
            &[("blksize", "1468"), ("tsize", "0"), ("windowsize", window)],
        );
        let oack = got.oack.as_ref().expect("an OACK");
        assert_eq!(opt(oack, "tsize"), None, "OACK {oack:?}");
        assert_eq!(opt(oack, "blksize"), Some("1468"));
        assert_same("netascii exact multiple", &got.data, &wire);
    }
}

/// Writes a world-readable file into the served root.
fn write_served(s: &Server, name: &str, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let path = s.root().join(name);
    std::fs::write(&path, bytes).expect("write");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
}

#[test]
fn tftp_hpa_block_number_rollover() {
    if !have_tftp_hpa() {
        return;
    }
    let s = Server::start_with(ServerOpts {
        big: true,
        ..Default::default()
    });
    // 65537 blocks of 512 without options: block 65535 is followed by 0.
    check(
        &s,
        "tftp-hpa big",
        BIG_NAME,
        tftp_hpa_get(&s, BIG_NAME, "binary"),
    );
}

// ---------------------------------------------------------------- atftp

fn atftp_sweep(windowsize: u32) {
    if !have_atftp() {
        return;
    }
    let s = Server::start();
    for blksize in [8u32, 512, 1428, 1468, 8192, 65464] {
        let opts = vec![
            format!("blksize {blksize}"),
            format!("windowsize {windowsize}"),
            "tsize 0".to_string(),
        ];
        for name in sweep_files(blksize) {
            let what = format!("atftp {name} blksize {blksize} windowsize {windowsize}");
            check(&s, &what, name, atftp_get(&s, name, &opts));
        }
    }
}

#[test]
fn atftp_windowsize_1_blksize_sweep() {
    atftp_sweep(1);
}

#[test]
fn atftp_windowsize_4_blksize_sweep() {
    atftp_sweep(4);
}

#[test]
fn atftp_windowsize_16_blksize_sweep() {
    atftp_sweep(16);
}

#[test]
fn atftp_without_options() {
    if !have_atftp() {
        return;
    }
    let s = Server::start();
    // atftp sends no options unless asked. (Its `--option "tsize disable"`
    // puts the word "disable" on the wire, so don't use that.)
    for name in all_files() {
        check(
            &s,
            &format!("atftp plain {name}"),
            name,
            atftp_get(&s, name, &[]),
        );
    }
}

#[test]
fn atftp_block_number_rollover_windowed() {
    if !have_atftp() {
        return;
    }
    let s = Server::start_with(ServerOpts {
        big: true,
        ..Default::default()
    });
    // blksize 512 so the block number wraps mid-window.
    let opts = ["blksize 512", "windowsize 16", "tsize 0"].map(String::from);
    check(
        &s,
        "atftp big window 16",
        BIG_NAME,
        atftp_get(&s, BIG_NAME, &opts),
    );
}

// ---------------------------------------------------------------- curl

#[test]
fn curl_default_and_blksizes() {
    if !have_curl_tftp() {
        return;
    }
    let s = Server::start();
    for how in [
        CurlOpts::NoOptions,
        CurlOpts::Default,
        CurlOpts::Blksize(1468),
        CurlOpts::Blksize(8192),
    ] {
        for name in sweep_files(512) {
            // curl (7.88 at least) rejects the RFC 2349 answer `tsize 0` in an
            // OACK as "invalid tsize", so an empty file only works without
            // options.
            if name == "empty.bin" && !matches!(how, CurlOpts::NoOptions) {
                continue;
            }
            let what = format!("curl {name} {how:?}");
            check(&s, &what, name, curl_get(&s, name, how));
        }
    }
}

// ---------------------------------------------------------------- busybox

#[test]
fn busybox_default_and_blksize() {
    if !have_busybox_tftp() {
        return;
    }
    let s = Server::start();
    for blksize in [None, Some(1468)] {
        for name in sweep_files(512) {
            let what = format!("busybox {name} blksize {blksize:?}");
            check(&s, &what, name, busybox_get(&s, name, blksize));
        }
    }
}

// ---------------------------------------------------------------- IPv6

#[test]
fn ipv6_loopback_clients() {
    if !require_ipv6() {
        return;
    }
    let s = Server::start_with(ServerOpts {
        ipv6: true,
        ..Default::default()
    });
    let got = raw_download(&s, "mib.bin", &[("blksize", "1468")]);
    assert_same("raw over ::1", &got.data, &s.source("mib.bin"));
    if have_curl_tftp() {
        for name in ["b513.bin", "mib.bin"] {
            check(
                &s,
                &format!("curl ::1 {name}"),
                name,
                curl_get(&s, name, CurlOpts::Blksize(1468)),
            );
        }
    }
    if have_atftp() {
        let opts = ["blksize 1468", "windowsize 4", "tsize 0"].map(String::from);
        for name in ["empty.bin", "b513.bin", "mib.bin"] {
            check(
                &s,
                &format!("atftp ::1 {name}"),
                name,
                atftp_get(&s, name, &opts),
            );
        }
    }
}

/// ringtftpd-only: tftpd-hpa takes a single `-a`.
#[test]
fn serves_every_address_given() {
    if !require_ipv6() {
        return;
    }
    let s = Server::start_with(ServerOpts {
        dual: true,
        ..Default::default()
    });
    for &addr in &s.addrs {
        let c = RawClient::new(addr);
        let got = raw_get(&c, "b513.bin", "octet", &[], |_, _| {})
            .unwrap_or_else(|e| panic!("download via {addr}: {e}"));
        assert_same(&format!("via {addr}"), &got.data, &s.source("b513.bin"));
        assert_eq!(
            got.tid.ip(),
            addr.ip(),
            "transfer answered from another address"
        );
    }
}

// ---------------------------------------------------------------- raw: errors

#[test]
fn missing_file_is_error_1() {
    let mut s = Server::start();
    let c = RawClient::new(s.addr());
    let (code, msg) = c.expect_error(&rrq("no-such-file.bin", "octet", &[]));
    assert_eq!(code, 1, "missing file: ERROR {code} {msg:?}");
    s.assert_running();
}

#[test]
fn path_escaping_root_is_error_2() {
    let mut s = Server::start();
    let c = RawClient::new(s.addr());
    for name in ["../etc/passwd", "sub/../../etc/passwd"] {
        let (code, msg) = c.expect_error(&rrq(name, "octet", &[]));
        assert_eq!(code, 2, "{name}: ERROR {code} {msg:?}");
    }
    s.assert_running();
}

/// A symlink in the root resolves as under tftpd-hpa's `-s` chroot: an
/// absolute target names a file of the root, and a link pointing out of
/// the root finds nothing (never the outside file).
#[test]
fn symlinks_resolve_inside_the_root() {
    let mut s = Server::start();
    let root = s.root();
    std::os::unix::fs::symlink("/b513.bin", root.join("abs-link")).expect("symlink");
    std::os::unix::fs::symlink("/etc/hostname", root.join("out-link")).expect("symlink");
    let c = RawClient::new(s.addr());
    let got = raw_get(&c, "abs-link", "octet", &[], |_, _| {})
        .unwrap_or_else(|e| panic!("abs-link: {e}"));
    assert!(got.data == s.source("b513.bin"), "abs-link content");
    let (code, msg) = c.expect_error(&rrq("out-link", "octet", &[]));
    assert_eq!(code, 1, "out-link: ERROR {code} {msg:?}");
    s.assert_running();
}

/// ringtftpd-specific message (tftpd-hpa without -c answers ERROR 1 or 2
/// with its own text).
#[test]
fn wrq_is_refused_with_error_2() {
    let mut s = Server::start();
    let c = RawClient::new(s.addr());
    for name in ["new-file.bin", "b513.bin"] {
        let (code, msg) = c.expect_error(&wrq(name, "octet", &[]));
        assert_eq!(code, 2, "WRQ {name}: ERROR {code} {msg:?}");
        assert!(
            msg.to_ascii_lowercase().contains("upload"),
            "WRQ refusal should say uploads are disabled: {msg:?}"
        );
    }
    // Nothing was written.
    assert!(!s.root().join("new-file.bin").exists());
    s.assert_running();
}

#[test]
fn mail_mode_is_error_4() {
    let mut s = Server::start();
    let c = RawClient::new(s.addr());
    let (code, msg) = c.expect_error(&rrq("b513.bin", "mail", &[]));
    assert_eq!(code, 4, "mode mail: ERROR {code} {msg:?}");
    s.assert_running();
}

#[test]
fn garbage_is_error_4() {
    let mut s = Server::start();
    let c = RawClient::new(s.addr());
    // Unknown opcode, and an RRQ whose strings are not NUL-terminated.
    for pkt in [
        b"\x12\x34garbage\x00".to_vec(),
        b"\x00\x01b513.bin\x00octet".to_vec(),
    ] {
        let (code, msg) = c.expect_error(&pkt);
        assert_eq!(code, 4, "garbage {pkt:?}: ERROR {code} {msg:?}");
    }
    s.assert_running();
}

/// RFC 1350 §4: a packet from a stranger to a transfer's port gets ERROR 5
/// and does not disturb the transfer. (tftpd-hpa connect()s its transfer
/// socket, so the kernel drops the stranger silently there.)
#[test]
fn stranger_gets_error_5_and_transfer_completes() {
    let mut s = Server::start();
    let c = RawClient::new(s.addr());
    let stranger = RawClient::new(s.addr());
    let mut stranger_reply = None;
    let got = raw_get(&c, "mib.bin", "octet", &[], |block, tid| {
        if block == 1 {
            stranger.send(&ack(1), tid);
            stranger_reply = Some(stranger.recv(Duration::from_secs(2)));
        }
    })
    .unwrap_or_else(|e| panic!("transfer with a stranger: {e}"));
    match stranger_reply {
        Some(Some((Packet::Error { code: 5, .. }, from))) => {
            assert_eq!(from, got.tid, "ERROR 5 must come from the transfer's port");
        }
        other => panic!("stranger expected ERROR 5, got {other:?}"),
    }
    assert_same("transfer with a stranger", &got.data, &s.source("mib.bin"));
    s.assert_running();
}

// ---------------------------------------------------------------- raw: options

/// RFC 2347/2348/2349/7440: the OACK lists exactly the accepted options and
/// tsize carries the size. (tftpd-hpa 5.2 knows no windowsize.)
#[test]
fn oack_lists_exactly_the_requested_options() {
    let mut s = Server::start();
    let size = s.source("mib.bin").len();
    let got = raw_download(
        &s,
        "mib.bin",
        &[("blksize", "1468"), ("tsize", "0"), ("windowsize", "4")],
    );
    let oack = got.oack.as_ref().expect("an OACK");
    let mut keys: Vec<String> = oack.iter().map(|(k, _)| k.to_ascii_lowercase()).collect();
    keys.sort();
    assert_eq!(keys, ["blksize", "tsize", "windowsize"], "OACK {oack:?}");
    assert_eq!(opt(oack, "blksize"), Some("1468"));
    assert_eq!(opt(oack, "tsize"), Some(size.to_string().as_str()));
    assert_eq!(opt(oack, "windowsize"), Some("4"));
    assert_same("windowed raw download", &got.data, &s.source("mib.bin"));
    s.assert_running();
}

/// tftpd-hpa's `-r OPTION`: that option is not negotiated, the others are.
#[test]
fn a_refused_option_is_left_out_of_the_oack() {
    let mut s = Server::start_with(ServerOpts {
        shared_args: ["-r", "blksize"].map(String::from).to_vec(),
        ..ServerOpts::default()
    });
    let size = s.source("mib.bin").len();
    let got = raw_download(&s, "mib.bin", &[("blksize", "1468"), ("tsize", "0")]);
    let oack = got.oack.as_ref().expect("an OACK for tsize");
    let keys: Vec<String> = oack.iter().map(|(k, _)| k.to_ascii_lowercase()).collect();
    assert_eq!(keys, ["tsize"], "OACK {oack:?}");
    assert_eq!(opt(oack, "tsize"), Some(size.to_string().as_str()));
    assert_eq!(got.blksize, 512, "blocks of the default size");
    assert_same(
        "download with blksize refused",
        &got.data,
        &s.source("mib.bin"),
    );
    s.assert_running();
}

#[test]
fn mode_and_option_names_are_case_insensitive() {
    let s = Server::start();
    let got = raw_download_mode(&s, "b513.bin", "OcTeT", &[("BlkSize", "1024")]);
    assert_eq!(got.blksize, 1024, "OACK {:?}", got.oack);
    assert_same("mixed-case request", &got.data, &s.source("b513.bin"));
}

fn raw_download_mode(s: &Server, name: &str, mode: &str, opts: &[(&str, &str)]) -> RawDownload {
    let c = RawClient::new(s.addr());
    raw_get(&c, name, mode, opts, |_, _| {})
        .unwrap_or_else(|e| panic!("raw download of {name} mode {mode} {opts:?}: {e}"))
}

#[test]
fn unknown_option_alone_gets_data_not_oack() {
    let s = Server::start();
    let c = RawClient::new(s.addr());
    c.send_to_server(&rrq("b511.bin", "octet", &[("foo", "bar")]));
    let (pkt, tid) = c.recv(Duration::from_secs(3)).expect("an answer");
    match pkt {
        Packet::Data { block: 1, data } => {
            assert_same("DATA 1 after unknown option", &data, &s.source("b511.bin"));
            c.send(&ack(1), tid);
        }
        other => panic!("RRQ with only `foo` should get DATA 1, got {other:?}"),
    }
}

/// RFC 2347: a client may refuse the OACK with ERROR 8; the server must stop
/// that transfer and go on serving.
#[test]
fn error_8_in_answer_to_oack_ends_the_transfer() {
    let mut s = Server::start();
    let c = RawClient::new(s.addr());
    c.send_to_server(&rrq("mib.bin", "octet", &[("blksize", "1024")]));
    let (pkt, tid) = c.recv(Duration::from_secs(3)).expect("an answer");
    assert!(matches!(pkt, Packet::Oack(_)), "expected OACK, got {pkt:?}");
    c.send(&error(8, "options refused"), tid);
    // Only a retransmitted OACK may still arrive; never DATA.
    let until = Instant::now() + Duration::from_millis(1500);
    for _ in 0..100 {
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            break;
        };
        match c.recv(left) {
            None => break,
            Some((Packet::Oack(_), _)) => {}
            Some(other) => panic!("after ERROR 8 the server sent {other:?}"),
        }
    }
    s.assert_running();
    let got = raw_download(&s, "b513.bin", &[("blksize", "1024")]);
    assert_same(
        "next request after ERROR 8",
        &got.data,
        &s.source("b513.bin"),
    );
}

#[test]
fn max_blksize_caps_the_negotiated_size() {
    let s = Server::start_with(ServerOpts {
        max_blksize: Some(1024),
        ..Default::default()
    });
    // RFC 2348: the server may answer a smaller blksize than requested.
    let got = raw_download(&s, "mib.bin", &[("blksize", "8192")]);
    assert_eq!(got.blksize, 1024, "OACK {:?}", got.oack);
    assert_same("capped blksize", &got.data, &s.source("mib.bin"));
}

#[test]
fn netascii_wire_encoding() {
    let s = Server::start();
    let c = RawClient::new(s.addr());
    let got = raw_get(&c, TEXT_NAME, "netascii", &[], |_, _| {})
        .unwrap_or_else(|e| panic!("netascii download: {e}"));
    // LF -> CR LF, CR -> CR NUL on the wire (RFC 1350, RFC 764).
    assert_same(
        "netascii wire bytes",
        &got.data,
        &netascii_encode(&s.source(TEXT_NAME)),
    );
}

#[test]
fn fixtures_are_well_formed() {
    // The netascii fixture must put CR pairs across block boundaries, or the
    // netascii tests lose their hardest case.
    let wire = netascii_encode(&text_fixture());
    assert_eq!(&wire[511..513], b"\r\n");
    assert_eq!(&wire[1023..1025], b"\r\0");
    assert_eq!(random_bytes(6, 1 << 20), random_bytes(6, 1 << 20));
    assert_ne!(random_bytes(6, 64), random_bytes(7, 64));
    assert_eq!(
        BIG_SIZE / 512,
        65536,
        "big file needs the block counter to wrap"
    );
    let names: std::collections::HashSet<_> = all_files().into_iter().collect();
    assert_eq!(names.len(), all_files().len(), "duplicate fixture names");
}

/// A refused request is logged with the client, the file as asked and the
/// reason: what an operator greps when a PXE client does not boot.
#[test]
fn a_refused_request_is_logged_with_its_file_and_reason() {
    if server_kind() != ServerKind::Ringtftpd {
        return; // ringtftpd's log line
    }
    let s = Server::start();
    let c = RawClient::new(s.addr());
    let name = "pxelinux.cfg/01-52-54-00-12-34-56";
    let (code, _) = c.expect_error(&rrq(name, "octet", &[]));
    assert_eq!(code, 1);
    let client = c.sock.local_addr().expect("local addr");
    let line = format!(
        "refused client={client} file=\"{name}\" direction=read reason=not_found error_code=1"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !s.log().contains(&line) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s.log().contains(&line), "no {line:?} in:\n{}", s.log());
}

/// `--log-format json`: every line is one JSON object with a time and a
/// level; a transfer and a refusal carry their fields.
#[test]
fn json_logs_are_one_object_a_line_with_the_events_fields() {
    if server_kind() != ServerKind::Ringtftpd {
        return; // ringtftpd's log
    }
    let s = Server::start_with(ServerOpts {
        extra_args: vec!["--log-format".into(), "json".into()],
        ..ServerOpts::default()
    });
    let c = RawClient::new(s.addr());
    raw_get(&c, "b513.bin", "octet", &[], |_, _| {}).expect("download");
    let (code, _) = c.expect_error(&rrq("no/such.cfg", "octet", &[]));
    assert_eq!(code, 1);
    let client = c.sock.local_addr().expect("addr").to_string();
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut transfer, mut refused) = (None, None);
    while (transfer.is_none() || refused.is_none()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        for line in s.log().lines() {
            let v: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(v["time"].is_string() && v["level"].is_string(), "{line}");
            match v["event"].as_str() {
                Some("transfer") if v["client"] == client.as_str() => transfer = Some(v),
                Some("refused") => refused = Some(v),
                _ => {}
            }
        }
    }
    let transfer = transfer.expect("a transfer event");
    assert_eq!(transfer["file"], "b513.bin");
    assert_eq!(transfer["bytes"], 513);
    assert_eq!(transfer["outcome"], "completed");
    let refused = refused.expect("a refused event");
    assert_eq!(refused["file"], "no/such.cfg");
    assert_eq!(refused["reason"], "not_found");
    assert_eq!(refused["error_code"], 1);
}
