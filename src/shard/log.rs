//! Log lines of the shards, written by one logger thread. A shard never
//! writes stderr itself: a full stderr pipe (a stalled journal, a reader
//! that went away) would stall every transfer on that shard. Lines go
//! through a bounded queue instead; when it is full the line is dropped
//! and counted, and the logger reports the count ("N log lines dropped")
//! once it catches up. Each shard also counts its own drops for its
//! counters line at exit.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crossbeam::channel::{self, Receiver, Sender, TrySendError};

/// Lines the queue holds (about 1 MiB of transfer lines).
pub const QUEUE_LINES: usize = 8192;

enum Msg {
    Line(String),
    /// Answered once every line queued before it was written.
    Flush(Sender<()>),
}

struct Logger {
    tx: Sender<Msg>,
}

static LOGGER: OnceLock<Option<Logger>> = OnceLock::new();
/// Lines dropped since the logger last reported them.
static DROPPED: AtomicU64 = AtomicU64::new(0);

fn logger() -> Option<&'static Logger> {
    LOGGER
        .get_or_init(|| {
            let (tx, rx) = channel::bounded(QUEUE_LINES);
            // Started from a shard thread: it inherits the blocked signals.
            std::thread::Builder::new()
                .name("log".into())
                .spawn(move || write_lines(&rx))
                .ok()
                .map(|_| Logger { tx })
        })
        .as_ref()
}

fn write_lines(rx: &Receiver<Msg>) {
    let stderr = std::io::stderr();
    for msg in rx.iter() {
        match msg {
            Msg::Line(line) => write_line(&stderr, &line),
            Msg::Flush(done) => {
                let _ = done.send(());
            }
        }
        if rx.is_empty() {
            let n = DROPPED.swap(0, Ordering::Relaxed);
            if n > 0 {
                write_line(&stderr, &format!("ringtftpd: {n} log lines dropped"));
            }
        }
    }
}

fn write_line(stderr: &std::io::Stderr, line: &str) {
    // Blocks while stderr is full: only this thread waits. Errors (the
    // reader went away) lose the line, as nothing else could be done.
    #[cfg(test)]
    {
        // Through the test harness's capture, not the terminal.
        let _ = stderr;
        eprintln!("{line}");
    }
    #[cfg(not(test))]
    {
        use std::io::Write;
        let mut out = stderr.lock();
        let _ = out
            .write_all(line.as_bytes())
            .and_then(|()| out.write_all(b"\n"));
    }
}

/// Queues `line` for stderr without ever blocking. Returns false if it
/// was dropped (queue full, or no logger thread).
pub fn line(line: String) -> bool {
    let sent = match logger() {
        Some(l) => match l.tx.try_send(Msg::Line(line)) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        },
        None => false,
    };
    if !sent {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
    sent
}

/// Waits up to `timeout` until the lines queued so far were written (at
/// shard exit, so the last lines are not lost when the process ends).
pub fn flush(timeout: Duration) -> bool {
    let Some(l) = logger() else {
        return false;
    };
    let (done_tx, done_rx) = channel::bounded(1);
    if l.tx.send_timeout(Msg::Flush(done_tx), timeout).is_err() {
        return false;
    }
    done_rx.recv_timeout(timeout).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_written_and_flush_returns() {
        assert!(line("log test: one line".into()));
        assert!(flush(Duration::from_secs(5)));
    }
}
