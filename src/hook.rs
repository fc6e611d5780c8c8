//! `--on-transfer PROGRAM`: a program run after each finished transfer,
//! as dnsmasq's `--dhcp-script` is for its "tftp" action: with the
//! arguments `tftp BYTES CLIENT-ADDRESS PATH`, the record as `TFTP_*`
//! environment variables, and the record as one JSON line on standard
//! input. Shards hand records over a bounded queue without blocking; one
//! thread runs the program, one run at a time, each bounded in time. A
//! full queue drops records (counted, and logged at exit): a slow hook
//! never stalls serving.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam::channel::{Receiver, Sender, TrySendError, bounded};

use crate::endpoint::TransferRecord;

/// Records waiting for the program, at most.
pub const QUEUE: usize = 1024;
/// Longest one run may take before it is killed.
pub const RUN_LIMIT: Duration = Duration::from_secs(30);

/// The shards' end: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct HookSender {
    queue: Sender<TransferRecord>,
    dropped: Arc<AtomicU64>,
}

impl HookSender {
    /// Queues `record`; a full queue drops it (counted).
    pub fn offer(&self, record: TransferRecord) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.queue.try_send(record)
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The hook thread.
pub struct Hook {
    thread: JoinHandle<HookReport>,
    dropped: Arc<AtomicU64>,
}

/// What the hook did, for the exit log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HookReport {
    pub runs: u64,
    /// Runs that failed to start, exited non-zero or were killed.
    pub failed: u64,
}

impl Hook {
    /// Starts the thread running `program`; `root` prefixes the paths it
    /// is given (as dnsmasq passes the file's full path).
    pub fn spawn(program: PathBuf, root: PathBuf) -> std::io::Result<(Hook, HookSender)> {
        let (queue, records) = bounded(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let thread = std::thread::Builder::new()
            .name("on-transfer".into())
            .spawn(move || run_all(&program, &root, &records))?;
        Ok((
            Hook {
                thread,
                dropped: dropped.clone(),
            },
            HookSender { queue, dropped },
        ))
    }

    /// Records dropped so far for a full queue.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits up to `limit` for the queue to be run (every sender must be
    /// gone); after that the thread is left to the process's exit.
    pub fn finish(self, limit: Duration) -> Option<HookReport> {
        let deadline = Instant::now() + limit;
        while !self.thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if self.thread.is_finished() {
            self.thread.join().ok()
        } else {
            None
        }
    }
}

fn run_all(program: &Path, root: &Path, records: &Receiver<TransferRecord>) -> HookReport {
    let mut report = HookReport::default();
    for record in records {
        report.runs += 1;
        if !run_one(program, root, &record) {
            report.failed += 1;
        }
    }
    report
}

/// One run; false if it did not exit 0 within [`RUN_LIMIT`].
fn run_one(program: &Path, root: &Path, record: &TransferRecord) -> bool {
    let name = record.served.as_deref().unwrap_or(&record.file);
    let path = root.join(name.trim_start_matches('/'));
    let mut json = serde_json::to_vec(record).unwrap_or_default();
    json.push(b'\n');
    let mut command = Command::new(program);
    command
        .args([
            "tftp",
            &record.bytes.to_string(),
            &record.client.ip().to_string(),
        ])
        .arg(&path)
        .env("TFTP_CLIENT", record.client.to_string())
        .env("TFTP_FILE", &record.file)
        .env("TFTP_PATH", &path)
        .env("TFTP_DIRECTION", record.direction)
        .env("TFTP_BYTES", record.bytes.to_string())
        .env("TFTP_OUTCOME", record.outcome)
        .env("TFTP_DURATION_MS", format!("{:.3}", record.duration_ms))
        .env("TFTP_RETRANSMITS", record.retransmits.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(code) = record.error_code {
        command.env("TFTP_ERROR_CODE", code.to_string());
    }
    let Ok(mut child) = command.spawn() else {
        return false;
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A program that does not read its input is fine.
        let _ = stdin.write_all(&json);
    }
    let deadline = Instant::now() + RUN_LIMIT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}
