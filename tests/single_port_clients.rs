//! `--single-port` with the built binary and real clients (tftp-hpa, atftp,
//! curl, busybox) on loopback, downloading and uploading through a
//! one-port forwarder, as a Kubernetes Service or a NAT port forward
//! would: the forwarder sends everything from a client to the listening
//! port and records the source of every datagram the server sends back,
//! which must all be the listening address.
//!
//! A missing client prints `SKIP: <client> not installed`, or fails when
//! `RINGTFTPD_REQUIRE_CLIENTS=1`.

mod common;

use std::collections::HashMap;
use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// Most clients (source addresses) a forwarder keeps an upstream socket for.
const RELAY_CLIENTS: usize = 256;
/// Longest a forwarder runs.
const RELAY_LIFETIME: Duration = Duration::from_secs(300);

/// A forwarder from one front port to one server address, in a thread.
struct Relay {
    front: SocketAddr,
    stop: Arc<AtomicBool>,
    /// Sources of the server's datagrams, with how many came from each.
    sources: Arc<Mutex<HashMap<SocketAddr, u64>>>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(server: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind relay");
        front.set_nonblocking(true).unwrap();
        let addr = front.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let sources = Arc::new(Mutex::new(HashMap::new()));
        let (stop2, sources2) = (stop.clone(), sources.clone());
        let thread = std::thread::spawn(move || relay_loop(front, server, &stop2, &sources2));
        Relay {
            front: addr,
            stop,
            sources,
            thread: Some(thread),
        }
    }

    /// Every source the server sent from, and how many datagrams in all.
    fn seen(&self) -> (Vec<SocketAddr>, u64) {
        let s = self.sources.lock().unwrap();
        (s.keys().copied().collect(), s.values().sum())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn relay_loop(
    front: UdpSocket,
    server: SocketAddr,
    stop: &AtomicBool,
    sources: &Mutex<HashMap<SocketAddr, u64>>,
) {
    // Client address -> its upstream socket.
    let mut upstream: Vec<(SocketAddr, UdpSocket)> = Vec::new();
    let mut buf = vec![0u8; 65536];
    let until = Instant::now() + RELAY_LIFETIME;
    while !stop.load(Ordering::Relaxed) && Instant::now() < until {
        let mut idle = true;
        // Bounded bursts each way, so neither direction starves the other.
        for _ in 0..64 {
            let Ok((n, client)) = front.recv_from(&mut buf) else {
                break;
            };
            idle = false;
            let up = match upstream.iter().position(|(c, _)| *c == client) {
                Some(i) => &upstream[i].1,
                None if upstream.len() < RELAY_CLIENTS => {
                    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind upstream");
                    sock.set_nonblocking(true).unwrap();
                    upstream.push((client, sock));
                    &upstream[upstream.len() - 1].1
                }
                None => continue,
            };
            let _ = up.send_to(&buf[..n], server);
        }
        for (client, up) in &upstream {
            for _ in 0..64 {
                let Ok((n, from)) = up.recv_from(&mut buf) else {
                    break;
                };
                idle = false;
                *sources.lock().unwrap().entry(from).or_default() += 1;
                let _ = front.send_to(&buf[..n], client);
            }
        }
        if idle {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

fn single_port_server(uploads: bool) -> Server {
    Server::start_with(ServerOpts {
        extra_args: vec!["--single-port".into()],
        uploads,
        ..ServerOpts::default()
    })
}

/// Checks that the server sent something, all of it from its listening
/// address.
#[track_caller]
fn assert_all_from(relay: &Relay, server: &Server) {
    let (sources, count) = relay.seen();
    assert!(count > 0, "the server sent nothing through the relay");
    assert_eq!(
        sources,
        vec![server.addr()],
        "every datagram from the listening address ({count} seen)"
    );
}

fn tftp_hpa(relay: &Relay, mode: &str, command: &str, a: &Path, b: &str) -> Output {
    let args = [
        "-m",
        mode,
        &relay.front.ip().to_string(),
        &relay.front.port().to_string(),
        "-c",
        command,
        &a.to_string_lossy(),
        b,
    ]
    .map(String::from);
    run_client("tftp", &args)
}

fn atftp(relay: &Relay, put: bool, local: &Path, remote: &str, options: &[&str]) -> Output {
    let mut args: Vec<String> = vec![if put { "--put" } else { "--get" }.into()];
    args.extend(["-r".into(), remote.into(), "-l".into()]);
    args.push(local.to_string_lossy().into_owned());
    for o in options {
        args.push("--option".into());
        args.push((*o).into());
    }
    args.push(relay.front.ip().to_string());
    args.push(relay.front.port().to_string());
    run_client("atftp", &args)
}

fn curl(relay: &Relay, put: Option<&Path>, remote: &str, dest: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<String> = ["-s", "-S"].map(String::from).to_vec();
    match put {
        Some(local) => {
            args.push("-T".into());
            args.push(local.to_string_lossy().into_owned());
        }
        None => {
            args.push("-o".into());
            args.push(dest.to_string_lossy().into_owned());
        }
    }
    args.extend(extra.iter().map(|e| (*e).to_string()));
    args.push(format!("tftp://{}/{remote}", relay.front));
    run_client("curl", &args)
}

fn busybox(relay: &Relay, put: bool, local: &Path, remote: &str, blksize: Option<u32>) -> Output {
    let mut args: Vec<String> = vec!["tftp".into(), if put { "-p" } else { "-g" }.into()];
    args.extend(["-r".into(), remote.into(), "-l".into()]);
    args.push(local.to_string_lossy().into_owned());
    if let Some(b) = blksize {
        args.push("-b".into());
        args.push(b.to_string());
    }
    args.push(relay.front.ip().to_string());
    args.push(relay.front.port().to_string());
    run_client("busybox", &args)
}

#[track_caller]
fn assert_ok(what: &str, out: &Output) {
    let said = [&out.stdout[..], &out.stderr[..]].concat();
    let said = String::from_utf8_lossy(&said);
    assert!(
        out.status.success() && !said.contains("Error code"),
        "{what}: exit {:?}: {said}",
        out.status
    );
}

/// Polls until `path` holds `want` (an upload is renamed into place once
/// stored, just before its final ACK); bounded to 5 s.
#[track_caller]
fn assert_stored(what: &str, path: &Path, want: &[u8]) {
    for _ in 0..100 {
        if fs::read(path).is_ok_and(|got| got == want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let got = fs::read(path).unwrap_or_default();
    assert_same(what, &got, want);
}

#[test]
fn downloads_through_a_one_port_forward_with_every_client() {
    let s = single_port_server(false);
    let relay = Relay::start(s.addr());
    let want = s.source("mib.bin");
    if have_tftp_hpa() {
        for name in ["b512.bin", "mib.bin"] {
            let dest = s.dest(name);
            let out = tftp_hpa(
                &relay,
                "binary",
                "get",
                Path::new(name),
                &dest.to_string_lossy(),
            );
            // tftp-hpa's get takes the remote name first, then the local one.
            assert_download("tftp-hpa", &out, &dest, &s.source(name));
        }
    }
    if have_atftp() {
        for options in [&[][..], &["blksize 1468", "windowsize 16"][..]] {
            let dest = s.dest("atftp");
            let out = atftp(&relay, false, &dest, "mib.bin", options);
            assert_download(&format!("atftp {options:?}"), &out, &dest, &want);
        }
    }
    if have_curl_tftp() {
        for extra in [&[][..], &["--tftp-blksize", "8192"][..]] {
            let dest = s.dest("curl");
            let out = curl(&relay, None, "mib.bin", &dest, extra);
            assert_download(&format!("curl {extra:?}"), &out, &dest, &want);
        }
    }
    if have_busybox_tftp() {
        let dest = s.dest("busybox");
        let out = busybox(&relay, false, &dest, "mib.bin", Some(1468));
        assert_download("busybox", &out, &dest, &want);
    }
    assert_all_from(&relay, &s);
}

#[test]
fn uploads_through_a_one_port_forward_with_every_client() {
    let s = single_port_server(true);
    let relay = Relay::start(s.addr());
    let local = s.dest("upload-source");
    let body = random_bytes(77, 300_000);
    fs::write(&local, &body).unwrap();
    if have_tftp_hpa() {
        let out = tftp_hpa(&relay, "binary", "put", &local, "up-hpa.bin");
        assert_ok("tftp-hpa put", &out);
        assert_stored("tftp-hpa put", &s.root().join("up-hpa.bin"), &body);
    }
    if have_atftp() {
        let out = atftp(&relay, true, &local, "up-atftp.bin", &["blksize 1468"]);
        assert_ok("atftp put", &out);
        assert_stored("atftp put", &s.root().join("up-atftp.bin"), &body);
    }
    if have_curl_tftp() {
        let out = curl(&relay, Some(&local), "up-curl.bin", &local, &[]);
        assert_ok("curl -T", &out);
        assert_stored("curl -T", &s.root().join("up-curl.bin"), &body);
    }
    if have_busybox_tftp() {
        let out = busybox(&relay, true, &local, "up-busybox.bin", None);
        assert_ok("busybox put", &out);
        assert_stored("busybox put", &s.root().join("up-busybox.bin"), &body);
    }
    assert_all_from(&relay, &s);
}

/// The forward is what single port is for: with a port per transfer the
/// client's ACKs reach the listener, which cannot take them.
#[test]
fn without_single_port_a_one_port_forward_fails() {
    if !have_curl_tftp() {
        return;
    }
    let s = Server::start();
    let relay = Relay::start(s.addr());
    let dest = s.dest("curl");
    let out = curl(&relay, None, "b513.bin", &dest, &[]);
    assert!(
        !out.status.success(),
        "a download through the forward worked"
    );
    let (sources, _) = relay.seen();
    assert!(
        sources.iter().any(|a| a.port() != s.port()),
        "DATA came from a transfer port: {sources:?}"
    );
}

/// A raw upload and a raw stranger, straight to the listener: the answers
/// come from it, and the stranger's ACK gets ERROR 5.
#[test]
fn raw_upload_and_stranger_at_the_listening_port() {
    let s = single_port_server(true);
    let client = RawClient::new(s.addr());
    let body = random_bytes(78, 5000);
    client.send_to_server(&wrq("raw.bin", "octet", &[]));
    let (first, from) = client.recv(Duration::from_secs(5)).expect("ACK 0");
    assert_eq!((first, from), (Packet::Ack(0), s.addr()));
    for (i, chunk) in body.chunks(512).enumerate() {
        let block = (i + 1) as u16;
        let mut d = vec![0, OP_DATA as u8];
        d.extend_from_slice(&block.to_be_bytes());
        d.extend_from_slice(chunk);
        client.send_to_server(&d);
        let (answer, from) = client.recv(Duration::from_secs(5)).expect("an ACK");
        assert_eq!((answer, from), (Packet::Ack(block), s.addr()));
    }
    // 5000 is not a multiple of 512: the last chunk ended it.
    assert_stored("raw put", &s.root().join("raw.bin"), &body);
    let stranger = RawClient::new(s.addr());
    stranger.send_to_server(&ack(4));
    match stranger.recv(Duration::from_secs(3)) {
        Some((Packet::Error { code: 5, .. }, from)) => assert_eq!(from, s.addr()),
        other => panic!("expected ERROR 5, got {other:?}"),
    }
}

/// An upload's DATA comes to a listener's buffers, which also hold the
/// request's control messages: the blksize granted fits them, and the
/// upload goes through at it.
#[test]
fn upload_blksize_fits_the_listeners_buffers() {
    let s = single_port_server(true);
    let client = RawClient::new(s.addr());
    client.send_to_server(&wrq("probe-size.bin", "octet", &[("blksize", "8192")]));
    let granted = match client.recv(Duration::from_secs(5)) {
        Some((Packet::Oack(pairs), from)) => {
            assert_eq!(from, s.addr());
            let b: usize = opt(&pairs, "blksize").expect("blksize").parse().unwrap();
            b
        }
        other => panic!("expected an OACK, got {other:?}"),
    };
    // 2048-byte buffers less the kernel's header, the address and 128
    // bytes of control messages.
    assert!((512..=1872).contains(&granted), "blksize {granted}");
    client.send_to_server(&error(0, "done"));
    let body = random_bytes(79, 5 * granted + 7);
    let blksize = granted.to_string();
    let put = RawClient::new(s.addr());
    raw_put(
        &put,
        "big-blocks.bin",
        "octet",
        &[("blksize", &blksize)],
        &body,
        None,
    )
    .expect("upload at the granted blksize");
    assert_stored("raw put", &s.root().join("big-blocks.bin"), &body);
}
