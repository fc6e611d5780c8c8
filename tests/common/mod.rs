//! Shared harness for integration tests against the built `ringtftpd` binary.
//!
//! `Server` starts the binary on a loopback port with a fresh root of test
//! files and kills it by PID on drop. `RawClient` speaks TFTP over a std
//! `UdpSocket` for the cases no external client can produce. Every wait is
//! bounded in time and count.
//!
//! `RINGTFTPD_TEST_SERVER=hpa` runs `/usr/sbin/in.tftpd` (tftpd-hpa) instead,
//! to validate the tests themselves against a reference server.

#![allow(dead_code)] // Each test crate uses a different part of this module.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Fixtures of random bytes: (name, size, seed).
pub const RANDOM_FILES: &[(&str, usize, u64)] = &[
    ("empty.bin", 0, 1),
    ("one.bin", 1, 2),
    ("b511.bin", 511, 3),
    ("b512.bin", 512, 4),
    ("b513.bin", 513, 5),
    ("mib.bin", 1 << 20, 6),
    ("sub/nested.bin", 3000, 7),
];

/// One past 65535 blocks at blksize 512, so a transfer must roll the block
/// number over (RFC 1350 has 16-bit block numbers).
pub const BIG_NAME: &str = "big.bin";
pub const BIG_SIZE: usize = 65536 * 512 + 100;
const BIG_SEED: u64 = 0x5eed_0b16;

/// A text file for netascii tests; its CRLF and CR NUL pairs straddle block
/// boundaries at blksize 512 (see `text_fixture`).
pub const TEXT_NAME: &str = "text.txt";

/// Answered by every server instance with a token unique to it, so the
/// readiness probe knows it reached *this* server.
const PROBE_NAME: &str = "probe.txt";

pub const CLIENT_TIMEOUT_SECS: u64 = 60;

pub const OP_RRQ: u16 = 1;
pub const OP_WRQ: u16 = 2;
pub const OP_DATA: u16 = 3;
pub const OP_ACK: u16 = 4;
pub const OP_ERROR: u16 = 5;
pub const OP_OACK: u16 = 6;

/// Which server binary the tests drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Ringtftpd,
    /// tftpd-hpa, for validating the tests against a reference server.
    Hpa,
    /// tftpd-hpa 7.x from Debian unstable (scripts/peer-hpa7.sh), for
    /// differential tests of what 5.2 lacks.
    Hpa7,
}

/// The command prefix that runs tftpd-hpa 7.x's in.tftpd, fetched once
/// per test process; None when RINGTFTPD_SKIP_PEER_HPA7=1.
pub fn hpa7_command() -> Option<Vec<String>> {
    static PREFIX: std::sync::OnceLock<Option<Vec<String>>> = std::sync::OnceLock::new();
    PREFIX
        .get_or_init(|| {
            if std::env::var("RINGTFTPD_SKIP_PEER_HPA7").as_deref() == Ok("1") {
                eprintln!("tftpd-hpa 7.x: skipped (RINGTFTPD_SKIP_PEER_HPA7=1)");
                return None;
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/peer-hpa7.sh");
            let out = Command::new("bash")
                .arg(script)
                .output()
                .expect("run scripts/peer-hpa7.sh");
            assert!(
                out.status.success(),
                "scripts/peer-hpa7.sh could not provide tftpd-hpa 7.x (set RINGTFTPD_SKIP_PEER_HPA7=1 to skip):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = String::from_utf8(out.stdout).expect("prefix is text");
            Some(line.split_whitespace().map(str::to_owned).collect())
        })
        .clone()
}

/// Whether tftpd-hpa 5.2 (Debian's /usr/sbin/in.tftpd) can be run;
/// scripts/test.sh installs it.
pub fn have_hpa() -> bool {
    client_available(
        "tftpd-hpa (/usr/sbin/in.tftpd)",
        Path::new(HPA_SERVER).exists(),
    )
}

const HPA_SERVER: &str = "/usr/sbin/in.tftpd";

pub fn server_kind() -> ServerKind {
    match std::env::var("RINGTFTPD_TEST_SERVER").as_deref() {
        Ok("hpa") => ServerKind::Hpa,
        Ok("") | Ok("ringtftpd") | Err(_) => ServerKind::Ringtftpd,
        Ok(other) => panic!("RINGTFTPD_TEST_SERVER={other}: expected `hpa` or `ringtftpd`"),
    }
}

/// xorshift64: deterministic, fast, good enough for test payloads.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    out
}

/// A small deterministic generator (xorshift64*), so a failing flood or
/// fuzz-like test replays from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// Random bytes, fewer than `max` of them.
    pub fn bytes_below(&mut self, max: u64) -> Vec<u8> {
        let len = self.below(max) as usize;
        self.bytes(len)
    }
}

/// ASCII text with LF, CRLF and lone CR. The first line puts the CR of its
/// netascii CRLF as the last byte of block 1 (512-byte blocks) and the next
/// puts a lone CR's CR NUL across blocks 2 and 3.
pub fn text_fixture() -> Vec<u8> {
    let mut t = Vec::new();
    t.extend(std::iter::repeat_n(b'a', 511));
    t.push(b'\n'); // netascii CR at offset 511, LF at 512
    t.extend(std::iter::repeat_n(b'b', 510));
    t.push(b'\r'); // netascii CR at offset 1023, NUL at 1024
    t.push(b'x');
    let noise = random_bytes(99, 4000);
    for (i, &r) in noise.iter().enumerate() {
        t.push(match r % 16 {
            0 => b'\n',
            1 if i % 3 == 0 => b'\r',
            2 => b'\r',
            _ => b' ' + (r % 95),
        });
        if r % 16 == 2 {
            t.push(b'\n'); // CRLF in the file itself
        }
    }
    t.extend_from_slice(b"last line\n");
    t
}

/// RFC 764 / RFC 1350 netascii: LF becomes CR LF, CR becomes CR NUL.
pub fn netascii_encode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 8);
    for &b in raw {
        match b {
            b'\n' => out.extend_from_slice(b"\r\n"),
            b'\r' => out.extend_from_slice(b"\r\0"),
            _ => out.push(b),
        }
    }
    out
}

/// Shared scratch space: the target's tmp dir, so hard links to the big file
/// stay on one filesystem.
fn scratch_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

/// The big file, shared by every server root that needs it (hard links).
/// Deterministic, so a copy of the right size left by an earlier run is
/// reused; tests compare downloads with the file on disk either way.
fn big_file() -> &'static Path {
    static BIG: OnceLock<PathBuf> = OnceLock::new();
    BIG.get_or_init(|| {
        let dir = scratch_dir();
        fs::create_dir_all(&dir).expect("create CARGO_TARGET_TMPDIR");
        let path = dir.join("ringtftpd-big-v1.bin");
        let fits = fs::metadata(&path).is_ok_and(|m| m.len() == BIG_SIZE as u64);
        if !fits {
            // Write aside and rename, so a concurrent run never sees half a file.
            let tmp = dir.join(format!("ringtftpd-big-v1.{}.tmp", std::process::id()));
            fs::write(&tmp, random_bytes(BIG_SEED, BIG_SIZE)).expect("write big file");
            fs::rename(&tmp, &path).expect("rename big file");
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod big file");
        path
    })
}

/// Options for starting a server.
#[derive(Clone, Debug, Default)]
pub struct ServerOpts {
    /// Listen on `[::1]` instead of 127.0.0.1.
    pub ipv6: bool,
    /// Also listen on the other family (a second `--address`).
    pub dual: bool,
    /// Link the 32 MiB rollover file into the root.
    pub big: bool,
    /// `--max-blksize N` (tftpd-hpa: `-B N`).
    pub max_blksize: Option<u32>,
    /// Extra arguments, passed to ringtftpd only.
    pub extra_args: Vec<String>,
    /// Arguments both servers take with the same meaning (tftpd-hpa's
    /// spelling), before the root.
    pub shared_args: Vec<String>,
    /// Take uploads: `-c` (both servers), and a root anyone may write to
    /// (tftpd-hpa writes as nobody).
    pub uploads: bool,
    /// This server rather than RINGTFTPD_TEST_SERVER's.
    pub kind: Option<ServerKind>,
}

/// A running server on loopback with its own root; killed on drop.
pub struct Server {
    child: Child,
    /// Holds root/, dl/ and server.log.
    dir: TempDir,
    /// Listening addresses; the first is the primary.
    pub addrs: Vec<SocketAddr>,
    pub kind: ServerKind,
}

static TOKEN_COUNTER: AtomicU64 = AtomicU64::new(0);

pub fn ipv6_loopback_available() -> bool {
    UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

fn free_udp_port(ip: IpAddr) -> u16 {
    // The kernel picks a free port; dropping the socket frees it for the
    // server. A race with another bind is caught by the startup retry and the
    // per-server probe token.
    let s = UdpSocket::bind((ip, 0)).expect("bind loopback to find a free port");
    s.local_addr().expect("local_addr").port()
}

fn format_addr(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => v4.to_string(),
        SocketAddr::V6(v6) => format!("[{}]:{}", v6.ip(), v6.port()),
    }
}

fn write_file(root: &Path, name: &str, bytes: &[u8]) {
    let path = root.join(name);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create fixture dir");
        fs::set_permissions(parent, fs::Permissions::from_mode(0o755)).expect("chmod dir");
    }
    fs::write(&path, bytes).expect("write fixture");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod fixture");
}

impl Server {
    pub fn start() -> Server {
        Server::start_with(ServerOpts::default())
    }

    pub fn start_with(opts: ServerOpts) -> Server {
        let kind = opts.kind.unwrap_or_else(server_kind);
        let dir = tempfile::Builder::new()
            .prefix("ringtftpd-it-")
            .tempdir_in({
                let d = scratch_dir();
                fs::create_dir_all(&d).expect("create CARGO_TARGET_TMPDIR");
                d
            })
            .expect("create temp dir");
        // World-searchable so a server that drops privileges can still read.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let root = dir.path().join("root");
        fs::create_dir(&root).expect("create root");
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod root");
        fs::create_dir(dir.path().join("dl")).expect("create dl");

        for &(name, size, seed) in RANDOM_FILES {
            write_file(&root, name, &random_bytes(seed, size));
        }
        write_file(&root, TEXT_NAME, &text_fixture());
        let token = format!(
            "ringtftpd-test {} {} {:?}",
            std::process::id(),
            TOKEN_COUNTER.fetch_add(1, Ordering::Relaxed),
            Instant::now()
        );
        write_file(&root, PROBE_NAME, token.as_bytes());
        if opts.uploads {
            // After the fixtures, whose writing sets their directory's mode.
            fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).expect("chmod root");
        }
        if opts.big {
            let dst = root.join(BIG_NAME);
            if fs::hard_link(big_file(), &dst).is_err() {
                fs::copy(big_file(), &dst).expect("copy big file");
            }
        }

        let primary_ip: IpAddr = if opts.ipv6 {
            Ipv6Addr::LOCALHOST.into()
        } else {
            Ipv4Addr::LOCALHOST.into()
        };
        let secondary_ip: IpAddr = if opts.ipv6 {
            Ipv4Addr::LOCALHOST.into()
        } else {
            Ipv6Addr::LOCALHOST.into()
        };

        let log_path = dir.path().join("server.log");
        let mut last_failure = String::new();
        for attempt in 0..5 {
            let mut addrs = vec![SocketAddr::new(primary_ip, free_udp_port(primary_ip))];
            if opts.dual {
                addrs.push(SocketAddr::new(secondary_ip, free_udp_port(secondary_ip)));
            }
            let log = fs::File::create(&log_path).expect("create server log");
            let mut cmd = match kind {
                ServerKind::Ringtftpd => {
                    let mut c = Command::new(env!("CARGO_BIN_EXE_ringtftpd"));
                    for a in &addrs {
                        c.arg("--address").arg(format_addr(*a));
                    }
                    if let Some(b) = opts.max_blksize {
                        c.arg("--max-blksize").arg(b.to_string());
                    }
                    if opts.uploads {
                        c.arg("--create");
                    }
                    c.args(&opts.extra_args);
                    c.args(&opts.shared_args);
                    c.arg(&root);
                    c
                }
                ServerKind::Hpa | ServerKind::Hpa7 => {
                    assert!(
                        !opts.dual,
                        "tftpd-hpa listens on one address only (-a); this test is ringtftpd-only"
                    );
                    let mut c = if kind == ServerKind::Hpa7 {
                        let prefix = hpa7_command().expect("tftpd-hpa 7.x was asked for");
                        let mut c = Command::new(&prefix[0]);
                        c.args(&prefix[1..]);
                        c
                    } else {
                        Command::new(HPA_SERVER)
                    };
                    c.arg("-L").arg("-s").arg(&root);
                    c.arg("-a").arg(format_addr(addrs[0]));
                    if let Some(b) = opts.max_blksize {
                        c.arg("-B").arg(b.to_string());
                    }
                    if opts.uploads {
                        c.arg("-c");
                    }
                    c.args(&opts.shared_args);
                    c
                }
            };
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("spawn server {cmd:?}: {e}"));
            match wait_ready(&mut child, &addrs, &token) {
                Ok(()) => {
                    return Server {
                        child,
                        dir,
                        addrs,
                        kind,
                    };
                }
                Err(not_ready) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let log = fs::read(&log_path).unwrap_or_default();
                    let (why, retry) = match not_ready {
                        NotReady::Retry(w) => (w, true),
                        NotReady::Fatal(w) => (w, false),
                    };
                    last_failure = format!(
                        "attempt {attempt}: {cmd:?}: {why}\n--- server log ---\n{}",
                        String::from_utf8_lossy(&log)
                    );
                    if !retry {
                        break;
                    }
                }
            }
        }
        panic!("server did not come up: {last_failure}");
    }

    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn port(&self) -> u16 {
        self.addrs[0].port()
    }

    /// Host as a client takes it on its command line.
    pub fn host(&self) -> String {
        self.addrs[0].ip().to_string()
    }

    /// `tftp://host:port` with IPv6 brackets.
    pub fn url_base(&self) -> String {
        format!("tftp://{}", format_addr(self.addrs[0]))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A fresh path for a download, named after `tag`.
    pub fn dest(&self, tag: &str) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let safe: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        self.dir
            .path()
            .join("dl")
            .join(format!("{}-{safe}", N.fetch_add(1, Ordering::Relaxed)))
    }

    /// The source bytes of a file served from the root.
    pub fn source(&self, name: &str) -> Vec<u8> {
        fs::read(self.root().join(name)).unwrap_or_else(|e| panic!("read source {name}: {e}"))
    }

    pub fn log(&self) -> String {
        let text = fs::read(self.dir.path().join("server.log")).unwrap_or_default();
        let tail = text.len().saturating_sub(64 * 1024);
        String::from_utf8_lossy(&text[tail..]).into_owned()
    }

    /// SIGKILL, as a crash or the OOM killer would; drop does nothing more.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Panics if the server process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "server exited: {status}\n--- server log ---\n{}",
                self.log()
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL to this child's PID only.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- {:?} server log ({}) ---\n{}",
                self.kind,
                self.addrs
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.log()
            );
        }
    }
}

/// Why a server did not come up.
enum NotReady {
    /// Exited (likely lost a race for the port) or another server answered:
    /// worth another try on a new port.
    Retry(String),
    /// Running but not answering properly: another port will not help.
    Fatal(String),
}

/// Probes every address with an RRQ for the probe file until the answer
/// carries this server's token; bounded to ~10 s per address.
fn wait_ready(child: &mut Child, addrs: &[SocketAddr], token: &str) -> Result<(), NotReady> {
    for &addr in addrs {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut tries = 0;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(NotReady::Retry(format!("server exited early: {status}")));
            }
            tries += 1;
            match probe(addr) {
                Some(Ok(bytes)) if bytes == token.as_bytes() => break,
                Some(Ok(_)) => {
                    return Err(NotReady::Retry(format!("another server answers on {addr}")));
                }
                Some(Err(pkt)) => {
                    return Err(NotReady::Fatal(format!("probe of {addr} got {pkt:?}")));
                }
                None if Instant::now() > deadline || tries > 100 => {
                    return Err(NotReady::Fatal(format!(
                        "no answer on {addr} after {tries} probes"
                    )));
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    Ok(())
}

/// One lock-step RRQ for the probe file: None if unanswered in time,
/// Some(Ok(contents)) for DATA 1, Some(Err(packet)) for anything else.
fn probe(addr: SocketAddr) -> Option<Result<Vec<u8>, Packet>> {
    let client = RawClient::new(addr);
    // Before the server binds its port, the kernel may hand that very port
    // to the probe: it would send its RRQ to itself. Try again.
    if client.sock.local_addr().ok() == Some(addr) {
        return None;
    }
    client.send_to_server(&rrq(PROBE_NAME, "octet", &[]));
    let (pkt, from) = client.recv(Duration::from_millis(200))?;
    match pkt {
        Packet::Data { block: 1, data } => {
            client.send(&ack(1), from);
            Some(Ok(data))
        }
        other => Some(Err(other)),
    }
}

// ---------------------------------------------------------------- packets

pub fn request(op: u16, name: &str, mode: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    let mut p = op.to_be_bytes().to_vec();
    for s in [name, mode] {
        p.extend_from_slice(s.as_bytes());
        p.push(0);
    }
    for (k, v) in opts {
        p.extend_from_slice(k.as_bytes());
        p.push(0);
        p.extend_from_slice(v.as_bytes());
        p.push(0);
    }
    p
}

pub fn rrq(name: &str, mode: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    request(OP_RRQ, name, mode, opts)
}

pub fn wrq(name: &str, mode: &str, opts: &[(&str, &str)]) -> Vec<u8> {
    request(OP_WRQ, name, mode, opts)
}

pub fn ack(block: u16) -> Vec<u8> {
    let mut p = OP_ACK.to_be_bytes().to_vec();
    p.extend_from_slice(&block.to_be_bytes());
    p
}

pub fn error(code: u16, msg: &str) -> Vec<u8> {
    let mut p = OP_ERROR.to_be_bytes().to_vec();
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p.push(0);
    p
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Data { block: u16, data: Vec<u8> },
    Ack(u16),
    Error { code: u16, msg: String },
    Oack(Vec<(String, String)>),
    Other(Vec<u8>),
}

pub fn parse(buf: &[u8]) -> Packet {
    if buf.len() < 2 {
        return Packet::Other(buf.to_vec());
    }
    let op = u16::from_be_bytes([buf[0], buf[1]]);
    let num = || (buf.len() >= 4).then(|| u16::from_be_bytes([buf[2], buf[3]]));
    match op {
        OP_DATA => match num() {
            Some(block) => Packet::Data {
                block,
                data: buf[4..].to_vec(),
            },
            None => Packet::Other(buf.to_vec()),
        },
        OP_ACK if buf.len() == 4 => Packet::Ack(u16::from_be_bytes([buf[2], buf[3]])),
        OP_ERROR => match num() {
            Some(code) => {
                let text = &buf[4..];
                let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
                Packet::Error {
                    code,
                    msg: String::from_utf8_lossy(&text[..end]).into_owned(),
                }
            }
            None => Packet::Other(buf.to_vec()),
        },
        OP_OACK => {
            let body = &buf[2..];
            let fields: Vec<String> = body
                .split(|&b| b == 0)
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect();
            // A well-formed OACK ends in NUL, so the last split piece is empty.
            if body.last() != Some(&0) || fields.len() % 2 != 1 {
                return Packet::Other(buf.to_vec());
            }
            let pairs = fields[..fields.len() - 1]
                .chunks(2)
                .map(|kv| (kv[0].clone(), kv[1].clone()))
                .collect();
            Packet::Oack(pairs)
        }
        _ => Packet::Other(buf.to_vec()),
    }
}

// ---------------------------------------------------------------- raw client

/// A TFTP client over a std UdpSocket bound to the loopback of the server's
/// family.
pub struct RawClient {
    pub sock: UdpSocket,
    pub server: SocketAddr,
}

impl RawClient {
    pub fn new(server: SocketAddr) -> RawClient {
        let ip: IpAddr = match server {
            SocketAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
        };
        let sock = UdpSocket::bind((ip, 0)).expect("bind client socket");
        RawClient { sock, server }
    }

    pub fn send_to_server(&self, pkt: &[u8]) {
        self.send(pkt, self.server);
    }

    pub fn send(&self, pkt: &[u8], to: SocketAddr) {
        self.sock.send_to(pkt, to).expect("send_to");
    }

    /// Next datagram within `timeout`, or None.
    pub fn recv(&self, timeout: Duration) -> Option<(Packet, SocketAddr)> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        // Bounded: each pass either returns or waits out the remaining time.
        for _ in 0..1000 {
            let left = deadline.checked_duration_since(Instant::now())?;
            if left.is_zero() {
                return None;
            }
            self.sock
                .set_read_timeout(Some(left))
                .expect("set_read_timeout");
            match self.sock.recv_from(&mut buf) {
                Ok((n, from)) => return Some((parse(&buf[..n]), from)),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // WouldBlock / TimedOut; ECONNREFUSED after an ICMP is also a miss.
                Err(_) => return None,
            }
        }
        None
    }

    /// Sends `pkt` to the server and expects an ERROR; returns (code, msg).
    pub fn expect_error(&self, pkt: &[u8]) -> (u16, String) {
        self.send_to_server(pkt);
        match self.recv(Duration::from_secs(3)) {
            Some((Packet::Error { code, msg }, _)) => (code, msg),
            other => panic!("expected ERROR, got {other:?}"),
        }
    }
}

/// Uploads `data` as `name` lock-step, answering an OACK's blksize, and
/// stops after `stop_after` DATA blocks if given (a client that vanishes).
/// `Ok` once the final ACK came; `Err((code, message))` on an ERROR, or
/// `Err((u16::MAX, why))` when the server went quiet. Bounded: five tries
/// of 500 ms per block.
pub fn raw_put(
    client: &RawClient,
    name: &str,
    mode: &str,
    opts: &[(&str, &str)],
    data: &[u8],
    stop_after: Option<usize>,
) -> Result<(), (u16, String)> {
    let quiet = |what: &str| Err((u16::MAX, what.to_string()));
    client.send_to_server(&wrq(name, mode, opts));
    let (first, tid) = match client.recv(Duration::from_secs(5)) {
        Some(answer) => answer,
        None => return quiet("no answer to the WRQ"),
    };
    let mut blksize = 512;
    match first {
        Packet::Oack(pairs) => {
            if let Some(b) = opt(&pairs, "blksize") {
                blksize = b.parse().expect("numeric blksize");
            }
        }
        Packet::Ack(0) => {}
        Packet::Error { code, msg } => return Err((code, msg)),
        other => panic!("unexpected answer to a WRQ: {other:?}"),
    }
    let blocks = data.len() / blksize + 1;
    for i in 0..blocks {
        if stop_after == Some(i) {
            return quiet("stopped as asked");
        }
        let block = (i + 1) as u16;
        let chunk = &data[i * blksize..((i + 1) * blksize).min(data.len())];
        let mut pkt = vec![0, OP_DATA as u8];
        pkt.extend_from_slice(&block.to_be_bytes());
        pkt.extend_from_slice(chunk);
        let mut acked = false;
        'tries: for _ in 0..5 {
            client.send(&pkt, tid);
            let until = Instant::now() + Duration::from_millis(500);
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                match client.recv(left) {
                    Some((Packet::Ack(b), from)) if from == tid && b == block => {
                        acked = true;
                        break 'tries;
                    }
                    Some((Packet::Error { code, msg }, _)) => return Err((code, msg)),
                    Some(_) => {}
                    None => break,
                }
            }
        }
        if !acked {
            return quiet("no ACK after five tries");
        }
    }
    Ok(())
}

/// Names in `dir` other than `keep`: what an upload may have left.
pub fn strays(dir: &Path, keep: &[&str]) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    names.sort();
    names
}

/// What a raw download saw.
#[derive(Debug)]
pub struct RawDownload {
    pub data: Vec<u8>,
    pub oack: Option<Vec<(String, String)>>,
    pub tid: SocketAddr,
    pub blksize: usize,
    pub windowsize: u16,
}

/// Looks up an option case-insensitively (RFC 2347: names are case-insensitive).
pub fn opt<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Downloads `name` with `opts`, acknowledging per the negotiated window
/// (RFC 7440: ACK the last block of each window, or the last in-order block
/// on a gap or timeout). `hook(block, tid)` runs after each in-order block.
/// Bounded to 60 s and a packet budget.
pub fn raw_get(
    client: &RawClient,
    name: &str,
    mode: &str,
    opts: &[(&str, &str)],
    mut hook: impl FnMut(u16, SocketAddr),
) -> Result<RawDownload, String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    client.send_to_server(&rrq(name, mode, opts));
    let (first, tid) = client
        .recv(Duration::from_secs(5))
        .ok_or("no answer to RRQ within 5 s")?;
    let mut dl = RawDownload {
        data: Vec::new(),
        oack: None,
        tid,
        blksize: 512,
        windowsize: 1,
    };
    if tid.port() == client.server.port() {
        return Err(format!(
            "reply came from the listening port {tid}, not a new TID"
        ));
    }
    let mut pending: Option<Packet> = None;
    match first {
        Packet::Oack(pairs) => {
            if let Some(b) = opt(&pairs, "blksize") {
                dl.blksize = b.parse().map_err(|_| format!("bad blksize {b}"))?;
            }
            if let Some(w) = opt(&pairs, "windowsize") {
                dl.windowsize = w.parse().map_err(|_| format!("bad windowsize {w}"))?;
            }
            dl.oack = Some(pairs);
            client.send(&ack(0), tid);
        }
        d @ Packet::Data { .. } => pending = Some(d),
        other => return Err(format!("unexpected first reply {other:?}")),
    }

    let mut expected: u16 = 1;
    let mut in_window: u16 = 0;
    let mut timeouts = 0;
    let budget = 4 * (200_000_000 / dl.blksize.max(8)) + 10_000;
    for _ in 0..budget {
        if Instant::now() > deadline {
            return Err(format!("timed out after 60 s at block {expected}"));
        }
        let (pkt, from) = match pending.take() {
            Some(p) => (p, tid),
            None => match client.recv(Duration::from_millis(1000)) {
                Some(x) => x,
                None => {
                    timeouts += 1;
                    if timeouts > 10 {
                        return Err(format!("10 timeouts in a row at block {expected}"));
                    }
                    // Re-ACK the last in-order block so the server resends
                    // from the next (RFC 7440 §4), not the last ACK sent:
                    // blocks may have come in since, short of a window.
                    client.send(&ack(expected.wrapping_sub(1)), tid);
                    in_window = 0;
                    continue;
                }
            },
        };
        if from != tid {
            continue; // not our transfer
        }
        timeouts = 0;
        match pkt {
            Packet::Data { block, data } if block == expected => {
                if data.len() > dl.blksize {
                    return Err(format!("DATA {block} has {} > blksize bytes", data.len()));
                }
                let last = data.len() < dl.blksize;
                dl.data.extend_from_slice(&data);
                hook(block, tid);
                in_window += 1;
                if last || in_window >= dl.windowsize {
                    client.send(&ack(block), tid);
                    in_window = 0;
                }
                if last {
                    return Ok(dl);
                }
                expected = expected.wrapping_add(1);
            }
            Packet::Data { block, .. } => {
                // A gap ahead: ACK the last good block (RFC 7440 §4).
                // An old duplicate: ignore; the timeout path re-ACKs.
                let ahead = block.wrapping_sub(expected);
                if ahead != 0 && ahead < 0x8000 && in_window > 0 {
                    let good = expected.wrapping_sub(1);
                    client.send(&ack(good), tid);
                    in_window = 0;
                }
            }
            Packet::Oack(_) if expected == 1 => client.send(&ack(0), tid),
            Packet::Error { code, msg } => return Err(format!("ERROR {code}: {msg}")),
            other => return Err(format!("unexpected packet {other:?} at block {expected}")),
        }
    }
    Err("packet budget exhausted".into())
}

// ---------------------------------------------------------------- clients

/// Returns the path of `prog` on PATH.
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|d| d.join(prog))
        .find(|p| {
            fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Returns `present`; when false, prints `SKIP: <what> not installed`, or
/// panics if RINGTFTPD_REQUIRE_CLIENTS=1 (as scripts/test.sh sets).
pub fn client_available(what: &str, present: bool) -> bool {
    if present {
        return true;
    }
    let msg = format!("SKIP: {what} not installed");
    if std::env::var("RINGTFTPD_REQUIRE_CLIENTS").as_deref() == Ok("1") {
        panic!("{msg} (RINGTFTPD_REQUIRE_CLIENTS=1)");
    }
    println!("{msg}");
    let _ = std::io::stdout().flush();
    false
}

/// Skips (returns false) unless IPv6 loopback works on this machine.
pub fn require_ipv6() -> bool {
    if ipv6_loopback_available() {
        return true;
    }
    println!("SKIP: IPv6 loopback (::1) unavailable");
    false
}

pub fn have_tftp_hpa() -> bool {
    // Other `tftp` clients (netkit) take different arguments.
    let ok = which("tftp").is_some()
        && Command::new("tftp")
            .arg("-V")
            .stdin(Stdio::null())
            .output()
            .map(|o| {
                let text = [&o.stdout[..], &o.stderr[..]].concat();
                String::from_utf8_lossy(&text).contains("tftp-hpa")
            })
            .unwrap_or(false);
    client_available("tftp (tftp-hpa)", ok)
}

pub fn have_atftp() -> bool {
    client_available("atftp", which("atftp").is_some())
}

pub fn have_curl_tftp() -> bool {
    let ok = which("curl").is_some()
        && Command::new("curl")
            .arg("-V")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).lines().any(|l| {
                    l.starts_with("Protocols:") && l.split_whitespace().any(|p| p == "tftp")
                })
            })
            .unwrap_or(false);
    client_available("curl (with tftp protocol)", ok)
}

pub fn have_busybox_tftp() -> bool {
    let ok = which("busybox").is_some()
        && Command::new("busybox")
            .arg("--list")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l == "tftp")
            })
            .unwrap_or(false);
    client_available("busybox (with tftp applet)", ok)
}

/// Runs a client under `timeout` so a hung transfer cannot hang the suite.
pub fn run_client(program: &str, args: &[String]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("-k")
        .arg("5")
        .arg(CLIENT_TIMEOUT_SECS.to_string())
        .arg(program)
        .args(args)
        .stdin(Stdio::null());
    cmd.output()
        .unwrap_or_else(|e| panic!("run {program} {args:?}: {e}"))
}

/// Asserts that the client succeeded and `dest` holds exactly `expected`.
pub fn assert_download(what: &str, out: &Output, dest: &Path, expected: &[u8]) {
    let detail = || {
        format!(
            "{what}: exit {:?}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    assert!(out.status.success(), "client failed: {}", detail());
    // tftp-hpa 5.2 exits 0 and leaves an empty local file when the server
    // answers ERROR, printing only "Error code N: ...". (It exits 69 on a
    // timeout; the other clients exit non-zero on any failure.)
    let said = [&out.stdout[..], &out.stderr[..]].concat();
    assert!(
        !String::from_utf8_lossy(&said).contains("Error code"),
        "client reported a server error: {}",
        detail()
    );
    let got =
        fs::read(dest).unwrap_or_else(|e| panic!("read {}: {e}; {}", dest.display(), detail()));
    assert_same(what, &got, expected);
}

/// Byte-for-byte comparison with a short diagnostic instead of a huge dump.
pub fn assert_same(what: &str, got: &[u8], expected: &[u8]) {
    if got == expected {
        return;
    }
    let first_diff = got
        .iter()
        .zip(expected)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(expected.len()));
    panic!(
        "{what}: content differs: got {} bytes, expected {}; first difference at offset {first_diff}",
        got.len(),
        expected.len()
    );
}

/// Names of every random fixture small enough for slow parameter sweeps.
pub fn small_files() -> Vec<&'static str> {
    RANDOM_FILES
        .iter()
        .filter(|(_, size, _)| *size <= 4096)
        .map(|(n, _, _)| *n)
        .collect()
}

// ------------------------------------------- churn, flood and soak helpers
// (tests/churn.rs, tests/flood.rs; issue #9)

/// A raw client bound to `ip` (any 127.0.0.0/8 address is loopback on
/// Linux), so a test can speak from several client addresses.
pub fn raw_client_on(ip: IpAddr, server: SocketAddr) -> RawClient {
    let sock = UdpSocket::bind((ip, 0)).unwrap_or_else(|e| panic!("bind {ip}: {e}"));
    RawClient { sock, server }
}

/// A `kB` field of /proc/PID/status (VmRSS, VmHWM, ...), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.split(':').next() == Some(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Open descriptors of process `pid` (entries of /proc/PID/fd).
pub fn proc_fd_count(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The `p`-quantile (0..=1) of `sorted`, nearest rank; zero when empty.
pub fn quantile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// tftp-hpa's `-c COMMAND FIRST SECOND` against `s` in `mode`.
fn tftp_hpa(s: &Server, mode: &str, command: &str, first: &str, second: &str) -> Output {
    let args = [
        mode,
        &s.host(),
        &s.port().to_string(),
        command,
        first,
        second,
    ];
    let [mode, host, port, command, first, second] = args.map(String::from);
    let args = [
        "-m".into(),
        mode,
        host,
        port,
        "-c".into(),
        command,
        first,
        second,
    ];
    run_client("tftp", &args)
}

/// tftp-hpa's `get` of `name` from `s` in `mode` into `s.dest(name)`.
pub fn tftp_hpa_get(s: &Server, name: &str, mode: &str) -> (Output, PathBuf) {
    let dest = s.dest(name);
    (
        tftp_hpa(s, mode, "get", name, &dest.to_string_lossy()),
        dest,
    )
}

/// tftp-hpa's `put` of the local file `from` to `remote` on `s` in `mode`.
pub fn tftp_hpa_put(s: &Server, from: &std::path::Path, remote: &str, mode: &str) -> Output {
    tftp_hpa(s, mode, "put", &from.to_string_lossy(), remote)
}

/// Waits up to `limit` for `child` to exit; kills it (by its PID) and
/// fails if it does not.
#[track_caller]
pub fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
