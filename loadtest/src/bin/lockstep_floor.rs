//! `lockstep-floor`: the least a lock-step TFTP server can do, as a server `compare` runs
//! beside the real ones ("floor"), so that a server's CPU per block is read against the
//! real cost of a lock-step block (an ACK in, the next DATA out) and not against a one-way
//! blast (`floor`).
//!
//! It speaks just enough TFTP for `loadtest`'s client: an RRQ (octet or netascii, served
//! as octet) for a file of ROOT, read wholly into memory at start, is answered from the one
//! transfer socket (never the listening one) with an OACK granting `blksize` (and `tsize`,
//! when asked; `windowsize` is ignored: lock-step only) or, without options, DATA 1; ACK n
//! is answered with DATA n+1 (block numbers roll over), the ACK of the short final block
//! ends the transfer, anything else is ignored.
//!
//! Two system calls per wake-up, whatever the client pattern: the main thread sleeps in a
//! blocking `recvmmsg(MSG_WAITFORONE)` on the transfer socket, which returns every ACK
//! queued (up to `--batch`), and answers them all with one `sendmmsg` (each DATA is its
//! 4-byte header and a slice of the file in memory: no copy; the `mmsghdr` arrays are kept
//! across calls). Requests are taken by a second thread blocked on the listening socket,
//! which adds the transfer to the shared table (a mutex, uncontended in practice) and sends
//! the first reply from the transfer socket. All transfers share that socket, told apart by
//! the client's address and port: that is where it is cheaper than RFC 1350 asks (one fresh
//! port per transfer), and why it is a floor, not a server. No policy, no logging, no
//! retransmission timer worth the name (the block in flight is resent after 1 s of silence,
//! a transfer forgotten after 10 s), IPv4 only.
//!
//! Every wait is bounded (200 ms receive timeouts); ends on SIGTERM/SIGINT (the default
//! action) or after `--max-seconds`. Loopback only.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sys::socket::{
    MsgFlags, MultiHeaders, SockaddrIn, recvmmsg, sendmmsg, setsockopt, sockopt,
};

#[derive(Parser, Debug)]
#[command(
    name = "lockstep-floor",
    version,
    about = "Minimal lock-step TFTP read server (recvmmsg/sendmmsg over N sockets): the floor for CPU per block"
)]
struct Args {
    /// Listening address (IPv4; loopback).
    #[arg(long, default_value = "127.0.0.1:6969")]
    address: SocketAddrV4,
    /// Datagrams per recvmmsg/sendmmsg call at most.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    batch: u16,
    /// Exit after this many seconds whatever happens (a bound on the loop).
    #[arg(long, default_value_t = 3600.0)]
    max_seconds: f64,
    /// Directory whose regular files (top level, at most 1 GiB in all) are served.
    root: PathBuf,
}

/// Largest DATA payload granted (what `loadtest` may ask, within a 64 KiB datagram).
const MAX_BLKSIZE: usize = 65464;
/// The block in flight is resent after this much silence from its client.
const RESEND: Duration = Duration::from_secs(1);
/// A transfer whose client is silent this long is forgotten.
const FORGET: Duration = Duration::from_secs(10);
const RCVBUF: usize = 8 << 20;

struct Xfer {
    file: Arc<[u8]>,
    blksize: usize,
    /// Block last sent: 0 = the OACK.
    cur: u64,
    /// The OACK's bytes (only while `cur == 0`).
    oack: Option<Vec<u8>>,
    /// When the client was last heard from, and when this side last sent.
    last: Instant,
    tx: Instant,
}

impl Xfer {
    fn range(&self, block: u64) -> (usize, usize) {
        let lo = ((block - 1) as usize)
            .saturating_mul(self.blksize)
            .min(self.file.len());
        (lo, (lo + self.blksize).min(self.file.len()))
    }
    /// Whether `cur` is the final (short) block.
    fn at_end(&self) -> bool {
        let (lo, hi) = self.range(self.cur.max(1));
        self.cur > 0 && hi - lo < self.blksize
    }
}

/// One datagram to send from a transfer socket: to whom, and the block (0 = OACK).
struct Out {
    to: SocketAddrV4,
    block: u64,
}

fn load_root(root: &Path) -> Result<HashMap<Vec<u8>, Arc<[u8]>>, String> {
    let mut files = HashMap::new();
    let mut total = 0u64;
    for e in std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))? {
        let e = e.map_err(|e| e.to_string())?;
        if !e.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        let bytes =
            std::fs::read(e.path()).map_err(|err| format!("{}: {err}", e.path().display()))?;
        total += bytes.len() as u64;
        if total > 1 << 30 {
            return Err("the root holds more than 1 GiB".into());
        }
        files.insert(e.file_name().into_encoded_bytes(), Arc::from(bytes));
    }
    Ok(files)
}

fn socket(addr: SocketAddrV4) -> Result<UdpSocket, String> {
    let s = UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    s.set_nonblocking(true).map_err(|e| e.to_string())?;
    // FORCE needs root; the plain option is the fallback.
    if setsockopt(&s, sockopt::RcvBufForce, &RCVBUF).is_err() {
        let _ = setsockopt(&s, sockopt::RcvBuf, &RCVBUF);
    }
    // Room for a DATA in flight to each of thousands of clients.
    if setsockopt(&s, sockopt::SndBufForce, &RCVBUF).is_err() {
        let _ = setsockopt(&s, sockopt::SndBuf, &RCVBUF);
    }
    Ok(s)
}

/// Receives up to `bufs.len()` datagrams: (length, source) each, bytes in `bufs`.
/// `hdrs` is kept across calls (no allocation per call), sized for `bufs`.
fn recv_batch(
    sock: &UdpSocket,
    bufs: &mut [Vec<u8>],
    hdrs: &mut MultiHeaders<SockaddrIn>,
    flags: MsgFlags,
) -> Vec<(usize, Option<SocketAddrV4>)> {
    let mut slices: Vec<[IoSliceMut<'_>; 1]> =
        bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
    match recvmmsg(sock.as_raw_fd(), hdrs, slices.iter_mut(), flags, None) {
        Ok(r) => r
            .map(|m| {
                (
                    m.bytes,
                    m.address.map(|a| SocketAddrV4::new(a.ip(), a.port())),
                )
            })
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Sends `out` from `sock` in batches of `batch`: each DATA is its header and a slice of
/// the file, the OACK its bytes. Datagrams the kernel refuses are lost, as on a network.
fn send_batch(
    sock: &UdpSocket,
    out: &[Out],
    xfers: &HashMap<SocketAddrV4, Xfer>,
    batch: usize,
    hdrs: &mut MultiHeaders<SockaddrIn>,
) {
    for chunk in out.chunks(batch) {
        let heads: Vec<[u8; 4]> = chunk
            .iter()
            .map(|o| {
                let b = (o.block as u16).to_be_bytes();
                [0, 3, b[0], b[1]]
            })
            .collect();
        let mut slices: Vec<[IoSlice<'_>; 2]> = Vec::with_capacity(chunk.len());
        let mut addrs: Vec<Option<SockaddrIn>> = Vec::with_capacity(chunk.len());
        for (o, h) in chunk.iter().zip(&heads) {
            let Some(x) = xfers.get(&o.to) else { continue };
            if o.block == 0 {
                let Some(oack) = x.oack.as_deref() else {
                    continue;
                };
                slices.push([IoSlice::new(oack), IoSlice::new(&[])]);
            } else {
                let (lo, hi) = x.range(o.block);
                slices.push([IoSlice::new(h), IoSlice::new(&x.file[lo..hi])]);
            }
            addrs.push(Some(SockaddrIn::from(o.to)));
        }
        let mut sent = 0;
        // Bounded: each pass sends at least one datagram or gives up.
        while sent < slices.len() {
            match sendmmsg(
                sock.as_raw_fd(),
                &mut *hdrs,
                &slices[sent..],
                &addrs[sent..],
                [],
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(r) => {
                    let n = r.count();
                    if n == 0 {
                        break;
                    }
                    sent += n;
                }
                Err(nix::errno::Errno::EINTR) => {}
                // EAGAIN/ENOBUFS: drop this datagram (the client retransmits its ACK).
                Err(_) => sent += 1,
            }
        }
    }
}

/// Parses an RRQ: (file name, blksize asked, tsize asked).
fn parse_rrq(p: &[u8]) -> Option<(&[u8], Option<usize>, bool)> {
    if p.len() < 4 || p[..2] != [0, 1] {
        return None;
    }
    let mut fields = p[2..].split(|&b| b == 0);
    let name = fields.next()?;
    let _mode = fields.next()?;
    let (mut blksize, mut tsize) = (None, false);
    while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
        if k.eq_ignore_ascii_case(b"blksize") {
            blksize = std::str::from_utf8(v)
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .filter(|b| *b >= 8)
                .map(|b| b.min(MAX_BLKSIZE));
        } else if k.eq_ignore_ascii_case(b"tsize") {
            tsize = true;
        }
    }
    Some((name, blksize, tsize))
}

fn error(code: u16, msg: &str) -> Vec<u8> {
    let mut v = vec![0, 5, (code >> 8) as u8, code as u8];
    v.extend_from_slice(msg.as_bytes());
    v.push(0);
    v
}

/// The first reply to a new transfer: its OACK, or DATA 1 when no option was asked.
fn first_reply(x: &Xfer) -> Vec<u8> {
    match &x.oack {
        Some(o) => o.clone(),
        None => {
            let (lo, hi) = x.range(1);
            let mut v = vec![0, 3, 0, 1];
            v.extend_from_slice(&x.file[lo..hi]);
            v
        }
    }
}

/// The listener thread: each RRQ becomes a transfer on the transfer socket, whose first
/// reply leaves from it (a new TID for the client, not the listening port).
fn listen(
    listener: &UdpSocket,
    xsock: &UdpSocket,
    files: &HashMap<Vec<u8>, Arc<[u8]>>,
    xfers: &Mutex<HashMap<SocketAddrV4, Xfer>>,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        // SO_RCVTIMEO (200 ms) bounds the wait, so `stop` is seen.
        let Ok((len, std::net::SocketAddr::V4(from))) = listener.recv_from(&mut buf) else {
            continue;
        };
        let Some((name, blksize, tsize)) = parse_rrq(&buf[..len]) else {
            continue;
        };
        let Some(file) = files.get(name) else {
            let _ = listener.send_to(&error(1, "File not found"), from);
            continue;
        };
        let oack = (blksize.is_some() || tsize).then(|| {
            let mut o = vec![0u8, 6];
            if let Some(b) = blksize {
                o.extend_from_slice(format!("blksize\0{b}\0").as_bytes());
            }
            if tsize {
                o.extend_from_slice(format!("tsize\0{}\0", file.len()).as_bytes());
            }
            o
        });
        let now = Instant::now();
        let x = Xfer {
            file: file.clone(),
            blksize: blksize.unwrap_or(512),
            cur: u64::from(oack.is_none()),
            oack,
            last: now,
            tx: now,
        };
        let first = first_reply(&x);
        if let Ok(mut m) = xfers.lock() {
            m.insert(from, x);
        }
        let _ = xsock.send_to(&first, from);
    }
}

fn serve(a: &Args) -> Result<(), String> {
    if !a.max_seconds.is_finite() || a.max_seconds <= 0.0 {
        return Err("--max-seconds must be positive".into());
    }
    let files = load_root(&a.root)?;
    let listener = socket(a.address)?;
    let xsock = socket(SocketAddrV4::new(*a.address.ip(), 0))?;
    for s in [&listener, &xsock] {
        // Blocking, with a bound: each wait ends within 200 ms to see the deadline.
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|e| e.to_string())?;
    }
    let xfers: Mutex<HashMap<SocketAddrV4, Xfer>> = Mutex::new(HashMap::new());
    let stop = AtomicBool::new(false);
    let batch = usize::from(a.batch);
    let deadline = Duration::from_secs_f64(a.max_seconds);
    std::thread::scope(|sc| {
        sc.spawn(|| listen(&listener, &xsock, &files, &xfers, &stop));
        let mut bufs = vec![vec![0u8; 2048]; batch];
        let mut rhdrs = MultiHeaders::<SockaddrIn>::preallocate(batch, None);
        let mut shdrs = MultiHeaders::<SockaddrIn>::preallocate(batch, None);
        let mut out: Vec<Out> = Vec::with_capacity(batch);
        let start = Instant::now();
        let mut last_sweep = start;
        while start.elapsed() < deadline {
            // Sleeps until one ACK is there, then takes every one queued (MSG_WAITFORONE).
            let got = recv_batch(&xsock, &mut bufs, &mut rhdrs, MsgFlags::MSG_WAITFORONE);
            let now = Instant::now();
            let Ok(mut m) = xfers.lock() else { break };
            for (i, (len, from)) in got.into_iter().enumerate() {
                let (Some(from), p) = (from, &bufs[i][..len]) else {
                    continue;
                };
                if p.len() < 4 || p[0] != 0 {
                    continue;
                }
                let Some(x) = m.get_mut(&from) else { continue };
                match p[1] {
                    4 if u16::from_be_bytes([p[2], p[3]]) == x.cur as u16 => {
                        if x.at_end() {
                            m.remove(&from);
                            continue;
                        }
                        x.cur += 1;
                        x.oack = None;
                        x.last = now;
                        x.tx = now;
                        out.push(Out {
                            to: from,
                            block: x.cur,
                        });
                    }
                    5 => {
                        m.remove(&from);
                    }
                    // A duplicate ACK is not answered (RFC 1123 §4.2.3.1).
                    _ => {}
                }
            }
            if now.duration_since(last_sweep) >= Duration::from_millis(200) {
                last_sweep = now;
                m.retain(|_, x| now.duration_since(x.last) < FORGET);
                for (to, x) in m.iter_mut() {
                    if now.duration_since(x.tx) >= RESEND {
                        x.tx = now;
                        out.push(Out {
                            to: *to,
                            block: x.cur,
                        });
                    }
                }
            }
            if !out.is_empty() {
                send_batch(&xsock, &out, &m, batch, &mut shdrs);
                out.clear();
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    Ok(())
}

fn main() -> ExitCode {
    let a = Args::parse();
    match serve(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockstep-floor: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse() {
        assert_eq!(
            parse_rrq(b"\0\x01f\0octet\0blksize\x001468\0tsize\x000\0"),
            Some((&b"f"[..], Some(1468), true))
        );
        assert_eq!(
            parse_rrq(b"\0\x01f\0octet\0"),
            Some((&b"f"[..], None, false))
        );
        assert_eq!(parse_rrq(b"\0\x02f\0octet\0"), None);
        assert_eq!(
            parse_rrq(b"\0\x01f\0octet\0BLKSIZE\x0099999\0"),
            Some((&b"f"[..], Some(MAX_BLKSIZE), false))
        );
    }

    #[test]
    fn the_last_block_is_the_short_one() {
        let now = Instant::now();
        let x = |len: usize, cur: u64| Xfer {
            file: Arc::from(vec![0u8; len]),
            blksize: 512,
            cur,
            oack: None,
            last: now,
            tx: now,
        };
        assert!(!x(1024, 0).at_end(), "the OACK is not the end");
        assert!(
            !x(1024, 2).at_end() && x(1024, 3).at_end(),
            "an empty block 3 ends 1024 B"
        );
        assert_eq!(x(1000, 2).range(2), (512, 1000));
        assert!(x(1000, 2).at_end());
        assert!(x(0, 1).at_end());
    }
}
