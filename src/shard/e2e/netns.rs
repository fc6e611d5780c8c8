//! End-to-end tests that need a path of their own: two network namespaces
//! joined by a veth pair, made and deleted by the test. Needs root and
//! `ip`; without them the test prints SKIP, unless
//! RINGTFTPD_REQUIRE_NETNS=1 (then it fails). All traffic stays inside the
//! two namespaces (10.97.0.1, the server, and 10.97.0.2) and their loopback.

use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};

use super::{content, fetch_from, root_with, small_tuning, start_with};
use crate::session::Limits;

const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 2);

/// Why namespaces cannot be made here, if they cannot.
fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("not root (network namespaces need CAP_SYS_ADMIN)".into());
    }
    match Command::new("ip").arg("-V").output() {
        Ok(o) if o.status.success() => None,
        _ => Some("no `ip` on PATH (Debian: iproute2)".into()),
    }
}

/// True when the test should go on; prints SKIP (or panics if required).
fn usable(test: &str) -> bool {
    let Some(why) = unavailable() else {
        return true;
    };
    if std::env::var("RINGTFTPD_REQUIRE_NETNS").as_deref() == Ok("1") {
        panic!("{test}: namespaces unavailable and RINGTFTPD_REQUIRE_NETNS=1: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
    false
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {args:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// NAME-s (the server, SERVER_IP) and NAME-c (CLIENT_IP) joined by a veth
/// pair; both deleted on drop.
struct Pair {
    name: String,
}

impl Pair {
    fn up() -> Pair {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "g{:x}{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed) % 100
        );
        let pair = Pair { name };
        // Left over from a killed run with the same PID.
        pair.down();
        let (s, c) = (pair.ns('s'), pair.ns('c'));
        let setup = || -> Result<(), String> {
            ip(&["netns", "add", &s])?;
            ip(&["netns", "add", &c])?;
            ip(&[
                "link", "add", &s, "netns", &s, "type", "veth", "peer", "name", &c, "netns", &c,
            ])?;
            ip(&[
                "-n",
                &s,
                "addr",
                "add",
                &format!("{SERVER_IP}/24"),
                "dev",
                &s,
            ])?;
            ip(&[
                "-n",
                &c,
                "addr",
                "add",
                &format!("{CLIENT_IP}/24"),
                "dev",
                &c,
            ])?;
            for ns in [&s, &c] {
                ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
                ip(&["-n", ns, "link", "set", "dev", ns, "up"])?;
            }
            Ok(())
        };
        if let Err(e) = setup() {
            panic!("{e}");
        }
        pair
    }

    fn ns(&self, side: char) -> String {
        format!("{}-{side}", self.name)
    }

    fn down(&self) {
        for side in ['s', 'c'] {
            let ns = self.ns(side);
            if fs::exists(format!("/run/netns/{ns}")).unwrap_or(false)
                && let Err(e) = ip(&["netns", "del", &ns])
            {
                eprintln!("{e}");
            }
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.down();
    }
}

/// Moves the calling thread (only) into the named network namespace.
fn enter(ns: &str) {
    let f = fs::File::open(format!("/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("open /run/netns/{ns}: {e}"));
    setns(&f, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {ns}: {e}"));
}

/// Runs `f` on a thread of its own inside namespace `ns`: sockets it makes,
/// and threads it spawns, live there.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns);
            f()
        })
        .join()
        .expect("namespace thread panicked")
    })
}

/// A path whose route MTU (1200, locked) is below its interface MTU (1500):
/// the server grants blksize 1468 from the interface MTU and segments its
/// windows, and Linux refuses each such GSO send (6.18: `EMSGSIZE` from
/// `udp_send_skb`, the segment exceeds the path MTU) while single
/// datagrams go out fragmented. A learned PMTU does the same. (`ethtool -K
/// tx off`, `EIO` before 6.11, no longer fails: the kernel checksums GSO
/// segments in software.) The transfers there must complete promptly and
/// byte-exact, and loopback, served by the same shard, must keep GSO.
#[test]
fn gso_refused_by_one_path_falls_back_there_at_once_and_only_there() {
    let test = "gso_refused_by_one_path_falls_back_there_at_once_and_only_there";
    if !usable(test) {
        return;
    }
    let pair = Pair::up();
    let (s, c) = (pair.ns('s'), pair.ns('c'));
    ip(&[
        "-n",
        &s,
        "route",
        "add",
        &format!("{CLIENT_IP}/32"),
        "dev",
        &s,
        "mtu",
        "lock",
        "1200",
    ])
    .unwrap();
    let body = content(300_000, 21);
    let root = root_with(&[("f", &body)]);
    // An RTO no faster path hides: a window left to the timer costs 1 s.
    let limits = Limits {
        initial_rto: Duration::from_secs(1),
        rto_min: Duration::from_secs(1),
        rto_max: Duration::from_secs(2),
        ..super::limits()
    };
    let grace = Duration::from_secs(1);
    let (handle, addr) = in_ns(&s, || {
        start_with(root.path(), "0.0.0.0:0", grace, small_tuning(), limits)
    })
    .expect("shard in the server namespace");
    let options = [("blksize", "1468"), ("windowsize", "16")];
    let to_peer = SocketAddr::from((SERVER_IP, addr.port()));
    for round in 0..2 {
        let elapsed = in_ns(&c, || {
            let sock = UdpSocket::bind((CLIENT_IP, 0)).unwrap();
            // Slower than the server's RTO: neither timer may hide a stall.
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let t0 = Instant::now();
            let got = fetch_from(&sock, to_peer, "f", &options, |_, _| {}).expect_body(&body);
            let blksize = ("blksize".to_string(), "1468".to_string());
            assert!(got.oack.contains(&blksize), "{:?}", got.oack);
            t0.elapsed()
        });
        assert!(
            elapsed < Duration::from_millis(500),
            "transfer {round} over the GSO-refusing path took {elapsed:?}: a window waited for a timer"
        );
    }
    in_ns(&s, || {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let lo = SocketAddr::from(([127, 0, 0, 1], addr.port()));
        fetch_from(&sock, lo, "f", &options, |_, _| {}).expect_body(&body);
    });
    handle.shut_down();
    let report = handle.join_report().unwrap();
    let c = report.counters;
    // One refused send: the second transfer on that path began without GSO.
    assert_eq!(c.gso_fallbacks, 1, "{c:?}");
    // Loopback, after the failure, still went out segmented.
    assert!(c.gso_sends > 0, "{c:?}");
    assert_eq!(c.finished, 3, "{c:?}");
    drop(pair);
}
