//! `ringtftpd top` against the real server: slow lock-step downloads keep
//! three transfers live, the viewer runs inside a private tmux server
//! (`tmux -L`, its own socket), and `capture-pane -p` must show the live
//! files, the totals and the refusal by reason, in progress order, then in
//! file order once `f` is typed; `q` ends it. Everything started here is
//! stopped by its handle: the client threads by a flag, the tmux server by
//! its socket name, the TFTP server by its PID (common::Server's drop).
//!
//! Also: `ringtftpd top --address ...` still serves a directory named
//! `top` (the viewer is only `top` with nothing but its own options), and
//! sans-IO, what `Endpoint::live_transfers` tells of a running download.
//!
//! Without tmux this prints `SKIP: tmux not installed`, or fails when
//! RINGTFTPD_REQUIRE_CLIENTS=1 (scripts/test.sh installs it).

mod common;
mod sim;

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;

/// The files the slow clients fetch: the same pace, so the smallest is the
/// furthest along.
const FILES: [(&str, usize); 3] = [
    ("storm/alpha.img", 8 << 20),
    ("storm/bravo.img", 2 << 20),
    ("storm/charlie.img", 1 << 20),
];
/// Each client ACKs a block this long after it came.
const PACE: Duration = Duration::from_millis(15);

fn free_tcp_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    l.local_addr().expect("local_addr")
}

/// A lock-step download that ACKs every `PACE`, until the file ends, `stop`
/// is set or `deadline` passes (then it sends ERROR 0 so the transfer ends
/// at once). Returns the bytes received.
fn slow_download(server: SocketAddr, name: &str, stop: &AtomicBool, deadline: Instant) -> usize {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind client");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    sock.send_to(&rrq(name, "octet", &[]), server).expect("RRQ");
    let mut buf = [0u8; 1024];
    let mut next: u16 = 1;
    let mut got = 0usize;
    let mut tid = None;
    // Bounded by the deadline; each pass waits at most 500 ms.
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if n < 4 || buf[..2] != [0, 3] {
            break; // an ERROR, or anything but DATA
        }
        tid = Some(from);
        let block = u16::from_be_bytes([buf[2], buf[3]]);
        if block == next {
            got += n - 4;
            next = next.wrapping_add(1);
            std::thread::sleep(PACE);
        }
        let _ = sock.send_to(&ack(block), from);
        if block.wrapping_add(1) == next && n - 4 < 512 {
            return got;
        }
    }
    if let Some(tid) = tid {
        let _ = sock.send_to(&error(0, "test over"), tid);
    }
    got
}

/// The viewer in a tmux server of its own; killed by its socket name.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.arg("-L").arg(&self.socket);
        c.stdin(Stdio::null()).stderr(Stdio::null());
        c
    }

    fn start(command: &str) -> Tmux {
        Tmux::start_sized(command, "top", 40)
    }

    /// In a pane `lines` high; `name` tells the tests' tmux servers apart.
    fn start_sized(command: &str, name: &str, lines: u16) -> Tmux {
        let tmux = Tmux {
            socket: format!("ringtftpd-{name}-test-{}", std::process::id()),
        };
        let lines = lines.to_string();
        let status = tmux
            .cmd()
            .args(["new-session", "-d", "-s", "top", "-x", "160", "-y", &lines])
            .arg(command)
            .status()
            .expect("run tmux");
        assert!(status.success(), "tmux new-session failed");
        tmux
    }

    fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        let status = self
            .cmd()
            .args(["send-keys", "-t", "top", keys])
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }

    fn alive(&self) -> bool {
        self.cmd()
            .args(["has-session", "-t", "top"])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").stdout(Stdio::null()).status();
    }
}

/// The order in which the table's rows name `names`, or None while one
/// is not shown.
fn row_order(screen: &str, names: &[&str]) -> Option<Vec<usize>> {
    let table = &screen[screen.find("Active transfers")?..];
    let mut at: Vec<(usize, usize)> = names
        .iter()
        .enumerate()
        .map(|(i, n)| table.find(n).map(|pos| (pos, i)))
        .collect::<Option<_>>()?;
    at.sort();
    Some(at.into_iter().map(|(_, i)| i).collect())
}

/// The active transfers the totals show (the start-up probe's given-up
/// transfers may still be there besides the test's three).
fn active(screen: &str) -> u64 {
    screen
        .lines()
        .find_map(|l| {
            l.split_once("active ")
                .filter(|(_, r)| r.contains(" down, "))
        })
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The poll count the title line shows.
fn polls(screen: &str) -> u64 {
    screen
        .lines()
        .next()
        .and_then(|l| l.split_once(" poll "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Captures until `done(screen)` or `within` has passed; the last screen.
fn screen_until(tmux: &Tmux, within: Duration, done: impl Fn(&str) -> bool) -> (bool, String) {
    let deadline = Instant::now() + within;
    loop {
        let screen = tmux.screen();
        if done(&screen) {
            return (true, screen);
        }
        if Instant::now() >= deadline {
            return (false, screen);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn top_shows_live_transfers_totals_and_sorts() {
    if !client_available("tmux", which("tmux").is_some()) {
        return;
    }
    let metrics = free_tcp_addr();
    let server = Server::start_with(ServerOpts {
        extra_args: vec!["--metrics".into(), metrics.to_string()],
        kind: Some(ServerKind::Ringtftpd),
        ..ServerOpts::default()
    });
    let root = server.root();
    std::fs::create_dir_all(root.join("storm")).expect("mkdir storm");
    for (i, (name, len)) in FILES.iter().enumerate() {
        std::fs::write(root.join(name), random_bytes(i as u64 + 7, *len)).expect("write file");
    }
    // One refusal by reason.
    let (code, _) = RawClient::new(server.addr()).expect_error(&rrq(
        "pxelinux.cfg/01-aa-bb-cc-dd-ee-ff",
        "octet",
        &[],
    ));
    assert_eq!(code, 1);

    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(60);
    let clients: Vec<_> = FILES
        .iter()
        .map(|(name, _)| {
            let (stop, addr, name) = (stop.clone(), server.addr(), name.to_string());
            std::thread::spawn(move || slow_download(addr, &name, &stop, deadline))
        })
        .collect();

    let tmux = Tmux::start(&format!(
        "{} top --metrics {metrics} --interval 0.5",
        env!("CARGO_BIN_EXE_ringtftpd")
    ));
    let names: Vec<&str> = FILES.iter().map(|(n, _)| *n).collect();
    // By progress, most advanced first: the smallest file leads.
    // A few polls in, so that each transfer has made some progress.
    let (shown, screen) = screen_until(&tmux, Duration::from_secs(20), |s| {
        polls(s) >= 4
            && row_order(s, &names) == Some(vec![2, 1, 0])
            && active(s) >= 3
            && s.contains("not_found")
    });
    println!("--- by progress ---\n{screen}");
    assert!(shown, "the live transfers by progress:\n{screen}");
    assert!(screen.contains("Totals"), "{screen}");
    assert!(screen.contains("Shards"), "{screen}");
    assert!(screen.contains("sort: progress v"), "{screen}");
    let _ = std::fs::write(
        concat!(env!("CARGO_TARGET_TMPDIR"), "/top-screen.txt"),
        &screen,
    );

    tmux.keys("f");
    let (sorted, screen) = screen_until(&tmux, Duration::from_secs(10), |s| {
        row_order(s, &names) == Some(vec![0, 1, 2]) && s.contains("sort: file ^")
    });
    println!("--- by file ---\n{screen}");
    assert!(sorted, "f sorts by file name:\n{screen}");

    tmux.keys("q");
    let (quit, _) = screen_until(&tmux, Duration::from_secs(5), |_| !tmux.alive());
    assert!(quit, "q ends the viewer");

    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let got = c.join().expect("client thread");
        assert!(got > 0, "a slow client got nothing");
    }
    drop(tmux);
    drop(server);
}

#[test]
fn a_directory_named_top_is_still_served() {
    let dir = tempfile::tempdir().expect("tempdir");
    let top = dir.path().join("top");
    std::fs::create_dir(&top).expect("mkdir top");
    std::fs::write(top.join("hello.txt"), b"served from ./top\n").expect("write");
    // Bounded: a few ports, in case one is taken between probe and bind.
    for _ in 0..5 {
        let port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .expect("free port")
            .port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ringtftpd"))
            .args(["top", "--address", &addr.to_string()])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ringtftpd");
        let client = RawClient::new(addr);
        let mut got = None;
        for _ in 0..50 {
            if let Ok(d) = raw_get(&client, "hello.txt", "octet", &[], |_, _| {}) {
                got = Some(d.data);
                break;
            }
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        if let Some(data) = got {
            assert_eq!(data, b"served from ./top\n");
            return;
        }
    }
    panic!("`ringtftpd top --address ...` did not serve ./top");
}

#[test]
fn live_transfers_tell_bytes_acknowledged_and_the_size() {
    use ringtftpd::endpoint::DatagramOutcome;
    let mut files = sim::MemFiles::default();
    files.insert("pxe/boot.img", sim::content(10_000, 1));
    let mut desk = sim::Desk::new(sim::config(), files);
    let client: SocketAddr = "127.0.0.2:4000".parse().unwrap();
    let id = desk.started(client, &rrq("pxe/boot.img", "octet", &[]));
    assert!(desk.endpoint.live_transfers().all(|t| t.bytes == 0));
    let mut buf = [0u8; 600];
    assert!(
        desk.endpoint
            .poll_transmit(desk.now, id, &mut buf)
            .is_some()
    );
    let mut reply = [0u8; 600];
    let ack1 = ack(1);
    let delivered = desk
        .endpoint
        .handle_datagram(desk.now, id, client, &ack1, &mut reply);
    assert!(
        matches!(delivered, DatagramOutcome::Delivered),
        "{delivered:?}"
    );
    let live: Vec<_> = desk.endpoint.live_transfers().collect();
    assert_eq!(live.len(), 1);
    let t = &live[0];
    assert_eq!(
        (t.id, t.peer, t.filename),
        (id, client, &b"pxe/boot.img"[..])
    );
    assert_eq!((t.write, t.bytes, t.total), (false, 512, Some(10_000)));
    assert_eq!((t.blksize, t.windowsize, t.retransmits), (512, 1, 0));
    let row = ringtftpd::top::live::TransferRow::of(1, t, desk.now);
    assert_eq!(row.progress(), Some(512.0 / 10_000.0));
    assert_eq!((row.shard, row.file.as_str()), (1, "pxe/boot.img"));
}

/// A lock-step upload that sends a 512-byte block every `PACE` (never
/// the last), until `stop` or `deadline`; then ERROR 0 ends it.
fn slow_upload(server: SocketAddr, name: &str, stop: &AtomicBool, deadline: Instant) -> u16 {
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind client");
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    sock.send_to(&wrq(name, "octet", &[]), server).expect("WRQ");
    let mut buf = [0u8; 1024];
    let mut acked: u16 = 0;
    let mut tid = None;
    // Bounded by the deadline; each pass waits at most 500 ms.
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        if n < 4 || buf[..2] != [0, 4] {
            break; // an ERROR
        }
        tid = Some(from);
        acked = u16::from_be_bytes([buf[2], buf[3]]);
        std::thread::sleep(PACE);
        let mut data = vec![0, 3];
        data.extend_from_slice(&acked.wrapping_add(1).to_be_bytes());
        data.extend_from_slice(&[b'u'; 512]);
        let _ = sock.send_to(&data, from);
    }
    if let Some(tid) = tid {
        let _ = sock.send_to(&error(0, "test over"), tid);
    }
    acked
}

/// More transfers than the table holds, one of them an upload: it shows
/// as `up`, and End / Home scroll to the rows past the first screen and
/// back.
#[test]
fn top_shows_uploads_and_scrolls_past_the_first_screen() {
    if !client_available("tmux", which("tmux").is_some()) {
        return;
    }
    const DOWNLOADS: usize = 12;
    let metrics = free_tcp_addr();
    let server = Server::start_with(ServerOpts {
        uploads: true,
        extra_args: vec!["--metrics".into(), metrics.to_string()],
        kind: Some(ServerKind::Ringtftpd),
        ..ServerOpts::default()
    });
    let root = server.root();
    std::fs::create_dir_all(root.join("rows")).expect("mkdir rows");
    std::fs::create_dir_all(root.join("up")).expect("mkdir up");
    let names: Vec<String> = (0..DOWNLOADS)
        .map(|i| format!("rows/r{i:02}.img"))
        .collect();
    for (i, name) in names.iter().enumerate() {
        std::fs::write(root.join(name), random_bytes(i as u64, 4 << 20)).expect("write file");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut clients: Vec<_> = names
        .iter()
        .map(|name| {
            let (stop, addr, name) = (stop.clone(), server.addr(), name.clone());
            std::thread::spawn(move || slow_download(addr, &name, &stop, deadline) > 0)
        })
        .collect();
    {
        let (stop, addr) = (stop.clone(), server.addr());
        clients.push(std::thread::spawn(move || {
            slow_upload(addr, "up/slow.bin", &stop, deadline) > 0
        }));
    }
    // 24 lines: the table shows 7 rows of the 13.
    let tmux = Tmux::start_sized(
        &format!(
            "{} top --metrics {metrics} --interval 0.5 --sort file",
            env!("CARGO_BIN_EXE_ringtftpd")
        ),
        "scroll",
        24,
    );
    let first = &names[0];
    let (shown, screen) = screen_until(&tmux, Duration::from_secs(20), |s| {
        active(s) >= 13 && s.contains(first.as_str()) && s.contains("rows 1-7")
    });
    println!("--- first screen ---\n{screen}");
    assert!(shown, "the first rows by file name:\n{screen}");
    assert!(
        !screen.contains("up/slow.bin"),
        "past the first screen:\n{screen}"
    );
    assert!(screen.contains("PgUp/PgDn"), "the keys say so:\n{screen}");

    tmux.keys("End");
    let (scrolled, screen) = screen_until(&tmux, Duration::from_secs(10), |s| {
        s.contains("up/slow.bin") && !s.contains(first.as_str())
    });
    println!("--- End ---\n{screen}");
    assert!(scrolled, "End shows the last rows:\n{screen}");
    let upload = screen
        .lines()
        .find(|l| l.contains("up/slow.bin"))
        .unwrap_or_default();
    assert!(
        upload.split_whitespace().nth(2) == Some("up"),
        "the upload's row: {upload}"
    );
    assert!(screen.contains("rows 7-13"), "{screen}");

    tmux.keys("Home");
    let (back, screen) = screen_until(&tmux, Duration::from_secs(10), |s| {
        s.contains(first.as_str()) && !s.contains("up/slow.bin")
    });
    assert!(back, "Home shows the first rows again:\n{screen}");
    tmux.keys("PageDown");
    let (paged, screen) = screen_until(&tmux, Duration::from_secs(10), |s| {
        s.contains("rows 7-13") || s.contains("rows 8-13")
    });
    assert!(paged, "PgDn shows the next page:\n{screen}");

    tmux.keys("q");
    let (quit, _) = screen_until(&tmux, Duration::from_secs(5), |_| !tmux.alive());
    assert!(quit, "q ends the viewer");
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        assert!(
            c.join().expect("client thread"),
            "a slow client moved nothing"
        );
    }
    drop(tmux);
    drop(server);
}
