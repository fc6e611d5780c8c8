//! Files changing underneath running transfers, against the built
//! `ringtftpd` on loopback: truncate in place, rewrite in place at the same
//! length (`cp new old`: O_TRUNC, then write), replace by rename, delete.
//!
//! Each test pauses several raw clients (lock-step and windowed, early,
//! midway and just before the last block) by holding back an ACK, changes
//! the file, then lets them finish. Each paused transfer must end either
//! with the bytes of ONE version of the file (old or new, never a mix) or
//! with a TFTP ERROR; a bystander downloading other files throughout gets
//! them byte-exact; the server keeps running and serves the file as it now
//! is once its open cache (1 s by default) has expired.

mod common;

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// The file under churn: not a multiple of any block size used here.
const VICTIM: &str = "victim.bin";
const VICTIM_SIZE: usize = 300_000 + 77;
const OLD_SEED: u64 = 0x01d_f11e;
const NEW_SEED: u64 = 0x0e4_f11e;

/// The server's default `--open-cache-ms` plus margin: after this, a new
/// request opens the file afresh.
const OPEN_CACHE_EXPIRY: Duration = Duration::from_millis(1300);

/// How one paused transfer ended.
#[derive(Debug)]
enum Outcome {
    Done(Vec<u8>),
    Error(u16, String),
    /// Neither: a timeout or a protocol violation.
    Failed(String),
}

/// A raw RRQ client that can stop between blocks: it holds back the ACK of
/// the first window ending at or after block `hold_at`, so the server sends
/// nothing more until `resume`.
struct Stepper {
    label: String,
    client: RawClient,
    tid: Option<SocketAddr>,
    blksize: usize,
    window: u16,
    data: Vec<u8>,
    /// Next in-order block expected.
    next: u16,
    /// In-order blocks received since the last ACK.
    in_window: u16,
    /// Last block ACKed (0: OACK acknowledged, or nothing yet).
    last_acked: u16,
    hold_at: u16,
    /// An ACK held back while paused.
    held: Option<u16>,
    outcome: Option<Outcome>,
}

impl Stepper {
    fn start(
        label: &str,
        server: SocketAddr,
        name: &str,
        opts: &[(&str, &str)],
        hold_at: u16,
    ) -> Stepper {
        let client = RawClient::new(server);
        client.send_to_server(&rrq(name, "octet", opts));
        let mut s = Stepper {
            label: label.to_string(),
            client,
            tid: None,
            blksize: 512,
            window: 1,
            data: Vec::new(),
            next: 1,
            in_window: 0,
            last_acked: 0,
            hold_at,
            held: None,
            outcome: None,
        };
        match s.client.recv(Duration::from_secs(5)) {
            None => s.outcome = Some(Outcome::Failed("no answer to RRQ within 5 s".into())),
            Some((Packet::Oack(pairs), from)) => {
                s.tid = Some(from);
                let num =
                    |k: &str, d: usize| opt(&pairs, k).and_then(|v| v.parse().ok()).unwrap_or(d);
                s.blksize = num("blksize", 512);
                s.window = num("windowsize", 1).clamp(1, 65535) as u16;
                s.client.send(&ack(0), from);
            }
            Some((Packet::Data { block, data }, from)) => {
                s.tid = Some(from);
                s.on_data(block, data);
            }
            Some((Packet::Error { code, msg }, _)) => s.outcome = Some(Outcome::Error(code, msg)),
            Some((other, _)) => s.outcome = Some(Outcome::Failed(format!("first reply {other:?}"))),
        }
        s
    }

    fn blocks(&self) -> usize {
        usize::from(self.next) - 1
    }

    fn ack_now(&mut self, block: u16) {
        if let Some(tid) = self.tid {
            self.client.send(&ack(block), tid);
        }
        self.last_acked = block;
        self.in_window = 0;
    }

    fn on_data(&mut self, block: u16, data: Vec<u8>) {
        if block != self.next {
            // A gap ahead: ACK the last in-order block (RFC 7440 §4); an
            // old duplicate is ignored.
            let ahead = block.wrapping_sub(self.next);
            if ahead != 0 && ahead < 0x8000 && self.in_window > 0 {
                self.ack_now(self.next.wrapping_sub(1));
            }
            return;
        }
        if data.len() > self.blksize {
            self.outcome = Some(Outcome::Failed(format!(
                "DATA {block} has {} bytes > blksize {}",
                data.len(),
                self.blksize
            )));
            return;
        }
        let last = data.len() < self.blksize;
        self.data.extend_from_slice(&data);
        self.next = self.next.wrapping_add(1);
        self.in_window += 1;
        if last {
            self.ack_now(block);
            self.outcome = Some(Outcome::Done(std::mem::take(&mut self.data)));
        } else if self.in_window >= self.window {
            if self.held.is_none() && block >= self.hold_at && self.last_acked < self.hold_at {
                self.held = Some(block);
            } else {
                self.ack_now(block);
            }
        }
    }

    /// One datagram (or a timeout); false once the transfer has ended or is
    /// paused.
    fn step(&mut self, timeouts: &mut u32) -> bool {
        if self.outcome.is_some() || self.held.is_some() {
            return false;
        }
        let Some((pkt, from)) = self.client.recv(Duration::from_millis(500)) else {
            *timeouts += 1;
            if *timeouts > 10 {
                self.outcome = Some(Outcome::Failed(format!(
                    "10 timeouts in a row at block {}",
                    self.next
                )));
                return false;
            }
            // Ask for a resend from the last in-order block, or hold it.
            let good = self.next.wrapping_sub(1);
            if self.held.is_none() && good >= self.hold_at && self.last_acked < self.hold_at {
                self.held = Some(good);
                return false;
            }
            self.ack_now(good);
            return true;
        };
        if Some(from) != self.tid {
            return true; // not this transfer
        }
        *timeouts = 0;
        match pkt {
            Packet::Data { block, data } => self.on_data(block, data),
            Packet::Oack(_) if self.next == 1 => self.ack_now(0),
            Packet::Error { code, msg } => self.outcome = Some(Outcome::Error(code, msg)),
            other => {
                self.outcome = Some(Outcome::Failed(format!(
                    "unexpected {other:?} at block {}",
                    self.next
                )))
            }
        }
        self.outcome.is_none() && self.held.is_none()
    }

    /// Runs until paused (the ACK of the window at `hold_at` held back) or
    /// ended. Bounded: 30 s and a packet budget.
    fn run_to_pause(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut timeouts = 0;
        for _ in 0..200_000 {
            if Instant::now() > deadline {
                self.outcome = Some(Outcome::Failed("no pause within 30 s".into()));
                return;
            }
            if !self.step(&mut timeouts) {
                return;
            }
        }
        self.outcome = Some(Outcome::Failed("packet budget exhausted".into()));
    }

    /// Sends the held ACK and runs to the end; returns how it ended.
    fn finish(mut self) -> (String, Outcome) {
        if let Some(block) = self.held.take() {
            self.ack_now(block);
        }
        self.hold_at = u16::MAX; // no second pause
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut timeouts = 0;
        for _ in 0..200_000 {
            if self.outcome.is_some() || Instant::now() > deadline {
                break;
            }
            self.step(&mut timeouts);
        }
        let outcome = self
            .outcome
            .unwrap_or_else(|| Outcome::Failed("did not end within 30 s".into()));
        (self.label, outcome)
    }
}

/// Blocks in `size` bytes at `blksize` (a final short or empty block).
fn block_count(size: usize, blksize: usize) -> u16 {
    u16::try_from(size / blksize + 1).expect("test file fits in 65535 blocks")
}

/// A paused client: label, request options, block to hold the ACK at.
type Pause = (&'static str, &'static [(&'static str, &'static str)], u16);

/// The paused clients: lock-step and windowed, at different points, the
/// last one just before the final block.
fn start_paused(server: SocketAddr) -> Vec<Stepper> {
    let n512 = block_count(VICTIM_SIZE, 512);
    let n1024 = block_count(VICTIM_SIZE, 1024);
    let n1428 = block_count(VICTIM_SIZE, 1428);
    let plans: [Pause; 5] = [
        ("lock-step 512, early", &[], 3),
        ("lock-step 1024, midway", &[("blksize", "1024")], n1024 / 2),
        ("lock-step 512, before the last block", &[], n512 - 1),
        (
            "window 8 x 512, three quarters",
            &[("windowsize", "8")],
            n512 * 3 / 4,
        ),
        (
            "window 16 x 1428, last window",
            &[("blksize", "1428"), ("windowsize", "16")],
            n1428 - 16,
        ),
    ];
    let mut steppers = Vec::new();
    for (label, opts, hold_at) in plans {
        let mut s = Stepper::start(label, server, VICTIM, opts, hold_at);
        s.run_to_pause();
        steppers.push(s);
    }
    for s in &steppers {
        assert!(
            s.held.is_some(),
            "{}: not paused before the change: {:?} after {} blocks",
            s.label,
            s.outcome,
            s.blocks()
        );
    }
    steppers
}

/// Downloads other files in a loop until `stop`; every one byte-exact.
fn bystander(server: &Server, stop: Arc<AtomicBool>) -> thread::JoinHandle<Result<usize, String>> {
    let addr = server.addr();
    let files: Vec<(&str, Vec<u8>)> = ["mib.bin", "b513.bin", "sub/nested.bin"]
        .into_iter()
        .map(|n| (n, server.source(n)))
        .collect();
    thread::spawn(move || {
        let start = Instant::now();
        let mut done = 0;
        // Bounded in count and time; at least one full round.
        for i in 0..300 {
            if (stop.load(Ordering::Relaxed) && i >= files.len())
                || start.elapsed() > Duration::from_secs(60)
            {
                break;
            }
            let (name, want) = &files[i % files.len()];
            let opts: &[(&str, &str)] = if i % 2 == 0 {
                &[]
            } else {
                &[("windowsize", "4"), ("blksize", "1428")]
            };
            let c = RawClient::new(addr);
            let got =
                raw_get(&c, name, "octet", opts, |_, _| {}).map_err(|e| format!("{name}: {e}"))?;
            if got.data != *want {
                return Err(format!(
                    "{name}: {} bytes, not the {} of the file",
                    got.data.len(),
                    want.len()
                ));
            }
            done += 1;
        }
        Ok(done)
    })
}

fn write_mode(path: &Path, bytes: &[u8]) {
    fs::write(path, bytes).expect("write file");
    fs::set_permissions(path, fs::Permissions::from_mode(0o644)).expect("chmod");
}

/// One way to change the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    TruncateTo(usize),
    /// `cp new old`: open with O_TRUNC, then write the same length.
    RewriteInPlace,
    Rename,
    Delete,
}

impl Change {
    /// Applies the change; returns the file's content afterwards (None:
    /// deleted).
    fn apply(self, path: &Path) -> Option<Vec<u8>> {
        match self {
            Change::TruncateTo(len) => {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .expect("open for truncate");
                f.set_len(len as u64).expect("truncate");
                Some(random_bytes(OLD_SEED, VICTIM_SIZE)[..len].to_vec())
            }
            Change::RewriteInPlace => {
                let new = random_bytes(NEW_SEED, VICTIM_SIZE);
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(path)
                    .expect("open O_TRUNC");
                f.write_all(&new).expect("rewrite");
                Some(new)
            }
            Change::Rename => {
                let new = random_bytes(NEW_SEED, VICTIM_SIZE);
                let tmp = path.with_extension("tmp");
                write_mode(&tmp, &new);
                fs::rename(&tmp, path).expect("rename over");
                Some(new)
            }
            Change::Delete => {
                fs::remove_file(path).expect("delete");
                None
            }
        }
    }
}

/// Whether `got` is exactly one of the versions; else where it departs.
fn consistency(got: &[u8], old: &[u8], new: Option<&[u8]>) -> Result<&'static str, String> {
    if got == old {
        return Ok("old");
    }
    if new == Some(got) {
        return Ok("new");
    }
    let diff = |v: &[u8]| {
        got.iter()
            .zip(v)
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(v.len()))
    };
    Err(format!(
        "completed with {} bytes matching neither version (old {} bytes: first difference at {}; new {}: first difference at {})",
        got.len(),
        old.len(),
        diff(old),
        new.map_or("none".into(), |n| n.len().to_string()),
        new.map_or("-".into(), |n| diff(n).to_string()),
    ))
}

/// What one churn run saw: each paused transfer's end, by label.
struct ChurnRun {
    outcomes: Vec<(String, Outcome)>,
    old: Vec<u8>,
    new: Option<Vec<u8>>,
}

/// Starts a server, pauses the clients, applies `change`, finishes them;
/// checks the bystander, a transfer right after the change, one after the
/// open cache expired, and that the server is still running.
fn churn(change: Change) -> ChurnRun {
    let mut s = Server::start();
    let path = s.root().join(VICTIM);
    let old = random_bytes(OLD_SEED, VICTIM_SIZE);
    write_mode(&path, &old);

    let stop = Arc::new(AtomicBool::new(false));
    let by = bystander(&s, stop.clone());

    let steppers = start_paused(s.addr());
    let new = change.apply(&path);
    let finishers: Vec<_> = steppers
        .into_iter()
        .map(|st| thread::spawn(move || st.finish()))
        .collect();
    let outcomes: Vec<(String, Outcome)> = finishers
        .into_iter()
        .map(|h| h.join().expect("finisher thread"))
        .collect();

    // A request right after the change may still get the cached open, or,
    // once that expired (a slow machine), see the file as it is now.
    let after = Stepper::start("right after the change", s.addr(), VICTIM, &[], u16::MAX).finish();
    match (&new, &after.1) {
        (None, Outcome::Error(1, _)) => {}
        _ => check_one(change, &after, &old, new.as_deref()),
    }
    eprintln!(
        "{change:?}: {}: {}",
        after.0,
        describe(&after.1, &old, new.as_deref())
    );

    thread::sleep(OPEN_CACHE_EXPIRY);
    let (_, fresh) = Stepper::start(
        "after the open cache expired",
        s.addr(),
        VICTIM,
        &[],
        u16::MAX,
    )
    .finish();
    match (&new, fresh) {
        (Some(want), Outcome::Done(got)) => assert_same(
            &format!("{change:?}: a new transfer after the open cache expired"),
            &got,
            want,
        ),
        (None, Outcome::Error(code, _)) => {
            assert_eq!(
                code, 1,
                "{change:?}: after delete, expected ERROR 1 (file not found)"
            )
        }
        (_, other) => panic!(
            "{change:?}: a new transfer after the open cache expired: {}",
            describe(&other, &old, new.as_deref())
        ),
    }

    stop.store(true, Ordering::Relaxed);
    let served = by
        .join()
        .expect("bystander thread")
        .unwrap_or_else(|e| panic!("{change:?}: bystander transfer of another file: {e}"));
    assert!(
        served >= 3,
        "{change:?}: bystander completed only {served} transfers"
    );
    s.assert_running();
    eprintln!("{change:?}: bystander completed {served} transfers of other files, byte-exact");
    for (label, o) in &outcomes {
        eprintln!("{change:?}: {label}: {}", describe(o, &old, new.as_deref()));
    }
    ChurnRun { outcomes, old, new }
}

fn describe(o: &Outcome, old: &[u8], new: Option<&[u8]>) -> String {
    match o {
        Outcome::Done(got) => match consistency(got, old, new) {
            Ok(v) => format!("completed, {v} version"),
            Err(e) => format!("MIXED: {e}"),
        },
        Outcome::Error(code, msg) => format!("ERROR {code} {msg:?}"),
        Outcome::Failed(why) => format!("FAILED: {why}"),
    }
}

/// The rule for every affected transfer: one consistent version or an ERROR.
fn check_one(change: Change, (label, o): &(String, Outcome), old: &[u8], new: Option<&[u8]>) {
    match o {
        Outcome::Done(got) => {
            if let Err(e) = consistency(got, old, new) {
                panic!("{change:?}: {label}: {e}");
            }
        }
        // The one ERROR a change may cause; any other is a server fault.
        Outcome::Error(code, msg) => assert!(
            *code == 0 && msg == "file changed during transfer",
            "{change:?}: {label}: ERROR {code} {msg:?}"
        ),
        Outcome::Failed(why) => panic!("{change:?}: {label}: neither content nor an ERROR: {why}"),
    }
}

fn check_all(change: Change, run: &ChurnRun) {
    for o in &run.outcomes {
        check_one(change, o, &run.old, run.new.as_deref());
    }
}

#[test]
fn truncate_to_zero_under_running_transfers() {
    let change = Change::TruncateTo(0);
    let run = churn(change);
    check_all(change, &run);
}

/// Truncated to a length that is neither block- nor page-aligned: pages
/// before it still hold the old bytes, the rest of its page reads zeros.
#[test]
fn truncate_to_half_under_running_transfers() {
    let change = Change::TruncateTo(VICTIM_SIZE / 2 + 123);
    let run = churn(change);
    check_all(change, &run);
}

/// `cp new old` at the same length: the mapping shows the new bytes from
/// the next block on, so without change detection a paused transfer
/// completes old-then-new. It must end with an ERROR instead.
#[test]
fn rewrite_in_place_same_length_never_completes_mixed() {
    let change = Change::RewriteInPlace;
    let run = churn(change);
    check_all(change, &run);
}

#[test]
fn replace_by_rename_under_running_transfers() {
    let change = Change::Rename;
    let run = churn(change);
    check_all(change, &run);
}

/// Stricter than the rule: a file replaced by rename is a new inode, so
/// transfers that opened the old one serve that snapshot to the end
/// (issue #9: "Replacing by rename keeps serving the old snapshot").
#[test]
fn rename_keeps_serving_the_old_snapshot() {
    let run = churn(Change::Rename);
    for (label, o) in &run.outcomes {
        match o {
            Outcome::Done(got) => assert_same(&format!("rename: {label}"), got, &run.old),
            other => panic!(
                "rename: {label}: expected the old snapshot, got {}",
                describe(other, &run.old, run.new.as_deref())
            ),
        }
    }
}

#[test]
fn delete_under_running_transfers() {
    let change = Change::Delete;
    let run = churn(change);
    check_all(change, &run);
}
