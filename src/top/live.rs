//! The live transfers a shard shows to `ringtftpd top`, through the
//! `--metrics` server's `/transfers`.
//!
//! The contract: each shard owns one [`Board`] (inside its
//! [`crate::metrics::Published`]). A reader (the HTTP thread) marks it
//! *asked* with one relaxed store and takes its Mutex to copy the rows
//! out. The shard looks only in the turns where it publishes its rarely
//! moving counters anyway (at most every `metrics::COLD_EVERY`, 100 ms):
//! one relaxed load of the asked mark; only while a reader asked within
//! [`WATCHED_FOR`], and at most every [`PUBLISH_EVERY`], does it walk its
//! sessions into a new `Vec` and swap it in under `try_lock` (a reader
//! holding the lock makes it skip one publish, never wait). Nobody
//! watching costs a shard one atomic load per 100 ms; nothing is taken
//! per packet, and the Mutex is only ever taken by its shard and readers.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::endpoint::LiveTransfer;

/// How often a watched shard publishes its rows.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(250);
/// How long after the last ask a shard keeps publishing.
pub const WATCHED_FOR: Duration = Duration::from_secs(5);
/// Rows one shard publishes at most (a boot storm of 10,000 clients on
/// a few shards still costs each one a bounded walk).
pub const MAX_ROWS_PER_SHARD: usize = 2048;
/// Rows `/transfers` returns at most, over every shard.
pub const MAX_ROWS: usize = 4096;
/// File names are shown escaped and cut to this many characters.
pub const MAX_FILE_CHARS: usize = 96;

/// One live transfer, as `/transfers` serves it (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransferRow {
    /// Stable while the transfer lives: shard, slab index, generation.
    pub id: u64,
    pub shard: u16,
    pub client: SocketAddr,
    /// The name as asked, escaped (`\xNN`), cut to `MAX_FILE_CHARS`.
    pub file: String,
    /// "download" or "upload".
    pub direction: String,
    /// Payload bytes acknowledged (downloads) or accepted (uploads).
    pub bytes: u64,
    /// The whole content if known (a download's length, an upload's tsize).
    pub total: Option<u64>,
    pub retransmits: u64,
    pub blksize: u16,
    pub windowsize: u16,
    /// Milliseconds from the request to its shard's publish of this row
    /// (that shard's `age_ms` ago).
    pub elapsed_ms: u64,
}

impl TransferRow {
    /// `t` on `shard`, `now` being the shard's clock.
    pub fn of(shard: usize, t: &LiveTransfer<'_>, now: Instant) -> Self {
        let mut file = t.filename.escape_ascii().to_string();
        if file.len() > MAX_FILE_CHARS {
            // Escaped text is ASCII: any byte index is a char boundary.
            file.truncate(MAX_FILE_CHARS - 1);
            file.push('~');
        }
        TransferRow {
            id: (shard as u64) << 48
                | u64::from(t.id.generation & 0xffff) << 32
                | u64::from(t.id.index),
            shard: shard as u16,
            client: t.peer,
            file,
            direction: if t.write { "upload" } else { "download" }.to_string(),
            bytes: t.bytes,
            total: t.total,
            retransmits: t.retransmits,
            blksize: t.blksize,
            windowsize: t.windowsize,
            elapsed_ms: now.saturating_duration_since(t.started).as_millis() as u64,
        }
    }

    /// Done, from 0 to 1; None when the total is unknown.
    pub fn progress(&self) -> Option<f64> {
        let total = self.total?;
        Some(if total == 0 {
            1.0
        } else {
            (self.bytes as f64 / total as f64).min(1.0)
        })
    }
}

/// `/transfers`: every shard's rows, merged, sorted by progress (most
/// advanced first, unknown totals last by bytes), capped at `MAX_ROWS`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Transfers {
    /// Per shard: how old its rows are (ms since its publish; None: never
    /// published yet) and how many it had.
    pub shards: Vec<ShardRows>,
    /// Rows left out by the caps.
    pub left_out: u64,
    pub transfers: Vec<TransferRow>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardRows {
    pub shard: u16,
    pub age_ms: Option<u64>,
    pub rows: u64,
    /// Sessions the shard had beyond `MAX_ROWS_PER_SHARD`.
    pub left_out: u64,
}

#[derive(Debug, Default)]
struct Rows {
    rows: Vec<TransferRow>,
    left_out: u64,
    at: Option<Instant>,
}

/// One shard's slot; see the module docs.
#[derive(Debug)]
pub struct Board {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last ask, plus 1 (0: never).
    asked: AtomicU64,
    /// Milliseconds after `epoch` of the shard's last publish (written by
    /// the shard only).
    published: AtomicU64,
    rows: Mutex<Rows>,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            epoch: Instant::now(),
            asked: AtomicU64::new(0),
            published: AtomicU64::new(0),
            rows: Mutex::new(Rows::default()),
        }
    }
}

impl Board {
    fn millis(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// A reader wants rows: the shard publishes for `WATCHED_FOR` more.
    /// Whether it was watched already (publishing) before this ask.
    pub fn ask(&self, now: Instant) -> bool {
        let watched = self.watched(now);
        self.asked.store(self.millis(now), Ordering::Relaxed);
        watched
    }

    /// Whether a reader asked within `WATCHED_FOR` of `now`.
    pub fn watched(&self, now: Instant) -> bool {
        let asked = self.asked.load(Ordering::Relaxed);
        asked != 0 && self.millis(now).saturating_sub(asked) < WATCHED_FOR.as_millis() as u64
    }

    /// The shard's side, in a turn it publishes its rarely moving
    /// counters: whether to publish rows now (watched, and not within
    /// `PUBLISH_EVERY` of the last time). One relaxed load when unwatched.
    pub fn due(&self, now: Instant) -> bool {
        if !self.watched(now) {
            return false;
        }
        let at = self.millis(now);
        let last = self.published.load(Ordering::Relaxed);
        if last != 0 && at.saturating_sub(last) < PUBLISH_EVERY.as_millis() as u64 {
            return false;
        }
        self.published.store(at, Ordering::Relaxed);
        true
    }

    /// The shard's side: publishes `live` (at most `MAX_ROWS_PER_SHARD`
    /// of them; the rows are built before the lock is tried). Never
    /// waits: false if a reader holds the lock.
    pub fn publish<'a>(
        &self,
        shard: usize,
        live: impl Iterator<Item = LiveTransfer<'a>>,
        now: Instant,
    ) -> bool {
        let mut fresh = Vec::new();
        let mut left_out = 0u64;
        for t in live {
            if fresh.len() < MAX_ROWS_PER_SHARD {
                fresh.push(TransferRow::of(shard, &t, now));
            } else {
                left_out += 1;
            }
        }
        let Ok(mut rows) = self.rows.try_lock() else {
            return false;
        };
        std::mem::swap(&mut rows.rows, &mut fresh);
        rows.left_out = left_out;
        rows.at = Some(now);
        drop(rows);
        // The old rows are freed after the lock is let go.
        drop(fresh);
        true
    }

    /// When the rows were last published.
    fn published_at(&self) -> Option<Instant> {
        match self.rows.lock() {
            Ok(rows) => rows.at,
            Err(poisoned) => poisoned.into_inner().at,
        }
    }

    /// The reader's side: a copy of the rows (their times as of their
    /// publish), and when they were published.
    fn read(&self) -> (Vec<TransferRow>, u64, Option<Instant>) {
        let rows = match self.rows.lock() {
            Ok(rows) => rows,
            // A shard that panicked while holding it left whole rows.
            Err(poisoned) => poisoned.into_inner(),
        };
        (rows.rows.clone(), rows.left_out, rows.at)
    }
}

/// Orders rows by progress, most advanced first; rows of unknown total
/// after them, by bytes; then by id, so the order is stable.
pub fn by_progress(a: &TransferRow, b: &TransferRow) -> std::cmp::Ordering {
    match (a.progress(), b.progress()) {
        (Some(x), Some(y)) => y.total_cmp(&x),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => b.bytes.cmp(&a.bytes),
    }
    .then(a.id.cmp(&b.id))
}

/// Asks every board; when one was not watched until now (its rows are
/// old or missing), waits up to `wait` for every shard's next publish
/// (an idle shard may not turn for a second: then its old rows are
/// served); then merges them (see [`Transfers`]).
pub fn collect<'a>(boards: impl Iterator<Item = &'a Board> + Clone, wait: Duration) -> Transfers {
    let start = Instant::now();
    let mut watched = true;
    for board in boards.clone() {
        watched &= board.ask(start);
    }
    let fresh = |board: &Board| board.published_at().is_some_and(|at| at >= start);
    // Bounded: at most `wait`, in 10 ms steps.
    while !watched && start.elapsed() < wait && !boards.clone().all(fresh) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let now = Instant::now();
    let mut out = Transfers::default();
    for (shard, board) in boards.enumerate() {
        let (rows, left_out, at) = board.read();
        out.shards.push(ShardRows {
            shard: shard as u16,
            age_ms: at.map(|at| now.saturating_duration_since(at).as_millis() as u64),
            rows: rows.len() as u64,
            left_out,
        });
        out.left_out += left_out;
        out.transfers.extend(rows);
    }
    out.transfers.sort_by(by_progress);
    if out.transfers.len() > MAX_ROWS {
        out.left_out += (out.transfers.len() - MAX_ROWS) as u64;
        out.transfers.truncate(MAX_ROWS);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::SessionId;

    fn live(
        name: &'static [u8],
        bytes: u64,
        total: Option<u64>,
        index: u32,
    ) -> LiveTransfer<'static> {
        LiveTransfer {
            id: SessionId {
                index,
                generation: 1,
            },
            peer: "127.0.0.1:4000".parse().unwrap(),
            filename: name,
            write: false,
            bytes,
            total,
            retransmits: 0,
            blksize: 512,
            windowsize: 1,
            started: Instant::now(),
        }
    }

    #[test]
    fn nobody_watching_publishes_nothing() {
        let board = Board::default();
        let now = Instant::now();
        assert!(!board.due(now));
        board.ask(now);
        assert!(board.due(now));
        // Not again within PUBLISH_EVERY.
        assert!(!board.due(now + Duration::from_millis(10)));
        assert!(board.due(now + PUBLISH_EVERY));
        // The ask lapses.
        assert!(!board.due(now + WATCHED_FOR + PUBLISH_EVERY * 2));
    }

    #[test]
    fn rows_are_escaped_capped_and_sorted_by_progress() {
        let boards: Vec<Board> = (0..2).map(|_| Board::default()).collect();
        let long = Box::leak(vec![b'x'; 300].into_boxed_slice());
        let now = Instant::now();
        boards[0].publish(
            0,
            [live(b"a\x01b", 10, Some(100), 1), live(long, 5, None, 2)].into_iter(),
            now,
        );
        boards[1].publish(
            1,
            [live(b"c", 90, Some(100), 1), live(b"e", 0, Some(0), 3)].into_iter(),
            now,
        );
        let t = collect(boards.iter(), Duration::ZERO);
        let files: Vec<&str> = t.transfers.iter().map(|r| r.file.as_str()).collect();
        assert_eq!(files[..3], ["e", "c", "a\\x01b"]);
        assert_eq!(files[3].len(), MAX_FILE_CHARS);
        assert!(files[3].ends_with('~'));
        assert_eq!(t.shards.len(), 2);
        assert!(t.shards.iter().all(|s| s.rows == 2 && s.age_ms.is_some()));
        assert_ne!(t.transfers[1].id, t.transfers[2].id);
        let json = serde_json::to_string(&t).unwrap();
        let back: Transfers = serde_json::from_str(&json).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn a_shard_caps_its_rows() {
        let board = Board::default();
        let many = (0..MAX_ROWS_PER_SHARD as u32 + 5).map(|i| live(b"f", 1, None, i));
        assert!(board.publish(0, many, Instant::now()));
        let t = collect([&board].into_iter(), Duration::ZERO);
        assert_eq!(t.transfers.len(), MAX_ROWS_PER_SHARD);
        assert_eq!(t.left_out, 5);
    }
}
