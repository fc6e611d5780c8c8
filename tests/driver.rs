//! The io_uring driver under hostile conditions, through the built binary:
//! a stderr pipe nobody reads, and a descriptor limit that idle pooled
//! sockets would exhaust. Every loop is bounded in count and time.

mod common;

use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::time::{Duration, Instant};

use common::{RawClient, raw_get};

/// The server process, killed by PID on drop.
struct Proc {
    child: Child,
    addr: SocketAddr,
    /// The read end of its stderr pipe, when piped (kept open, never read).
    stderr: Option<ChildStderr>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
    s.local_addr().expect("local_addr").port()
}

/// Starts one shard serving `root` on a free loopback port, stderr piped
/// (and never read) or discarded, with RLIMIT_NOFILE `nofile` if given;
/// waits until it answers.
fn spawn(root: &Path, pipe_stderr: bool, nofile: Option<u64>) -> Proc {
    fs::write(root.join("ready"), b"ok").expect("write probe");
    for _ in 0..5 {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringtftpd"));
        cmd.arg("--address")
            .arg(addr.to_string())
            .args(["--threads", "1"])
            // Thousands of transfers a second from one address: past the
            // per-address request limit, which is not under test here.
            .args(["--request-rate", "0"])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if pipe_stderr {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        if let Some(n) = nofile {
            // SAFETY: the closure only calls setrlimit, which is
            // async-signal-safe, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                })
            };
        }
        let mut child = cmd.spawn().expect("spawn ringtftpd");
        let stderr = child.stderr.take();
        let mut p = Proc {
            child,
            addr,
            stderr,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = p.child.try_wait() {
                break; // lost the port race: try another
            }
            // One short probe: raw_get would wait 5 s for a first answer.
            let c = RawClient::new(addr);
            c.send_to_server(&common::rrq("ready", "octet", &[]));
            if let Some((common::Packet::Data { block: 1, data }, tid)) =
                c.recv(Duration::from_millis(200))
                && data == b"ok"
            {
                c.send(&common::ack(1), tid);
                return p;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        drop(p.stderr.take());
    }
    panic!("server did not come up");
}

/// Bytes waiting in a pipe (FIONREAD).
fn pipe_bytes(stderr: &ChildStderr) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int to the live `n`.
    let r = unsafe { libc::ioctl(stderr.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    usize::try_from(n).unwrap_or(0)
}

/// A full stderr pipe must not stall transfers: the shard hands its log
/// lines to a logger thread through a bounded queue and drops them when
/// that is full. About 4.7 MB of log lines (390 B each) against a 64 KiB
/// pipe and a queue of 8192 lines, one transfer at a time.
#[test]
fn a_full_stderr_pipe_does_not_stall_transfers() {
    const TRANSFERS: usize = 12_000;
    let dir = tempfile::tempdir().expect("tempdir");
    // A long name makes a long log line (about 390 B with the rest).
    let name = "n".repeat(240);
    let body = b"tiny file".to_vec();
    fs::write(dir.path().join(&name), &body).expect("write fixture");
    let server = spawn(dir.path(), true, None);
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for i in 0..TRANSFERS {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "only {i} transfers in 120 s"
        );
        let t = Instant::now();
        let c = RawClient::new(server.addr);
        let dl = raw_get(&c, &name, "octet", &[], |_, _| {})
            .unwrap_or_else(|e| panic!("transfer {i} failed after {:?}: {e}", t.elapsed()));
        assert_eq!(dl.data, body);
        slowest = slowest.max(t.elapsed());
    }
    let total = started.elapsed();
    let waiting = pipe_bytes(server.stderr.as_ref().expect("piped"));
    eprintln!(
        "{TRANSFERS} transfers in {total:?}, slowest {slowest:?}; {waiting} bytes stuck in the pipe"
    );
    // Filled: a pipe fills by 4 KiB pages, each holding whole lines
    // (under PIPE_BUF a write is atomic), so up to a line a page stays free.
    assert!(
        waiting >= 56 * 1024,
        "the pipe never filled ({waiting} bytes)"
    );
    assert!(
        slowest < Duration::from_millis(900),
        "a transfer took {slowest:?}: it waited for a retransmission"
    );
}

/// Idle pooled sockets hold descriptors: when a new transfer socket cannot
/// be made (EMFILE), the shard closes them and tries again instead of
/// answering "server busy". A limit of 14 descriptors leaves room for
/// about six sockets beside the ring, eventfd, listener and root.
#[test]
fn descriptor_shortage_closes_idle_sockets_and_serves() {
    const TRANSFERS: usize = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("f"), b"some bytes").expect("write fixture");
    let server = spawn(dir.path(), false, Some(14));
    for i in 0..TRANSFERS {
        // A new client each time, so no idle socket is its own last one;
        // the pool stays below the reuse threshold, so each transfer
        // needs a fresh socket and the pool only grows.
        let c = RawClient::new(server.addr);
        match raw_get(&c, "f", "octet", &[], |_, _| {}) {
            Ok(dl) => assert_eq!(dl.data, b"some bytes"),
            Err(e) => panic!("transfer {i} of {TRANSFERS}: {e}"),
        }
        // Let the shard see the final ACK and pool the socket.
        std::thread::sleep(Duration::from_millis(5));
    }
}
