//! Log lines, written by one logger thread to where the command line says
//! (tftpd-hpa 7.x's `--stderr`, `--stdout`, `--logfile`, `--syslog`). A
//! shard never writes itself: a full stderr pipe (a stalled journal, a
//! reader that went away) would stall every transfer on that shard. Lines
//! go through a bounded queue instead; when it is full the line is dropped
//! and counted, and the logger reports the count ("N log lines dropped")
//! once it catches up. Each shard also counts its own drops for its
//! counters line at exit.
//!
//! [`configure`] picks the target once, before the first line; until then
//! (and in tests) lines go to standard error, human-readable.

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crossbeam::channel::{self, Receiver, Sender, TrySendError};

/// Where log lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stderr,
    Stdout,
    /// Appended to, created 0644; reopened on [`reopen`] (SIGHUP), for
    /// log rotation.
    File(PathBuf),
    /// The system log (facility daemon), as tftpd-hpa logs by default.
    Syslog,
}

/// How a line is dressed (tftpd-hpa 7.x's `--logformat`); syslog adds its
/// own priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// As written: `ringtftpd: warning: ...`, `transfer client=...`.
    #[default]
    Human,
    /// Prefixed with the priority as `<N>` (sd-daemon(3)), which journald
    /// reads from a service's standard error.
    Tag,
    /// One JSON object a line: `time` (RFC 3339, UTC), `level`, then an
    /// event's fields (`event`: `transfer`, `refused`...) or `msg`.
    Json,
}

/// A structured log event (a finished transfer, a refused request): the
/// logger thread, not the shard, dresses it as text or JSON.
pub trait Event: Send {
    /// `event` in JSON.
    fn name(&self) -> &'static str;
    /// The line in the text formats.
    fn text(&self) -> String;
    /// Its fields in JSON.
    fn fields(&self) -> serde_json::Map<String, serde_json::Value>;
}

/// A line's priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warning,
    Notice,
    Info,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Notice => "notice",
            Level::Info => "info",
        }
    }

    /// syslog(3)'s priority.
    fn priority(self) -> libc::c_int {
        match self {
            Level::Error => libc::LOG_ERR,
            Level::Warning => libc::LOG_WARNING,
            Level::Notice => libc::LOG_NOTICE,
            Level::Info => libc::LOG_INFO,
        }
    }
}

static TARGET: OnceLock<(Target, Format)> = OnceLock::new();
/// Set by [`reopen`]; the logger reopens a log file before its next line.
static REOPEN: AtomicBool = AtomicBool::new(false);

/// Picks where lines go; only the first call counts, and only before the
/// first line. Opens a log file now, so that an unwritable one fails start.
pub fn configure(target: Target, format: Format) -> std::io::Result<()> {
    if let Target::File(path) = &target {
        open_log_file(path)?;
    }
    if target == Target::Syslog {
        // SAFETY: the identifier is a static C string that outlives every
        // later syslog call, as openlog(3) requires.
        unsafe { libc::openlog(c"ringtftpd".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
    }
    let _ = TARGET.set((target, format));
    Ok(())
}

/// Whether lines go somewhere else than standard error.
pub fn is_elsewhere() -> bool {
    TARGET
        .get()
        .is_some_and(|(target, _)| *target != Target::Stderr)
}

/// Asks the logger to reopen its log file (after rotation).
pub fn reopen() {
    REOPEN.store(true, Ordering::Relaxed);
}

fn open_log_file(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o644)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Lines the queue holds (about 1 MiB of transfer lines).
pub const QUEUE_LINES: usize = 8192;

enum Msg {
    Line(Level, String),
    Event(Level, Box<dyn Event>),
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
    let mut writer = Writer::new();
    for msg in rx.iter() {
        match msg {
            Msg::Line(level, line) => writer.write(level, &line),
            Msg::Event(level, event) => writer.write_event(level, event.as_ref()),
            Msg::Flush(done) => {
                let _ = done.send(());
            }
        }
        if rx.is_empty() {
            let n = DROPPED.swap(0, Ordering::Relaxed);
            if n > 0 {
                writer.write(Level::Warning, &format!("ringtftpd: {n} log lines dropped"));
            }
        }
    }
}

/// The logger thread's end of the target.
struct Writer {
    target: Target,
    format: Format,
    file: Option<File>,
}

impl Writer {
    fn new() -> Self {
        let (target, format) = TARGET
            .get()
            .cloned()
            .unwrap_or((Target::Stderr, Format::Human));
        let file = match &target {
            Target::File(path) => open_log_file(path).ok(),
            _ => None,
        };
        Writer {
            target,
            format,
            file,
        }
    }

    /// Blocks while the target is full: only this thread waits. Errors
    /// (the reader went away, a full disk) lose the line, as nothing else
    /// could be done.
    fn write(&mut self, level: Level, line: &str) {
        if self.format == Format::Json {
            let mut fields = serde_json::Map::new();
            fields.insert("msg".into(), line.into());
            return self.write_json(level, fields);
        }
        self.write_dressed(level, line);
    }

    fn write_event(&mut self, level: Level, event: &dyn Event) {
        if self.format == Format::Json {
            let mut fields = serde_json::Map::new();
            fields.insert("event".into(), event.name().into());
            fields.extend(event.fields());
            return self.write_json(level, fields);
        }
        self.write_dressed(level, &event.text());
    }

    fn write_json(&mut self, level: Level, fields: serde_json::Map<String, serde_json::Value>) {
        let mut object = serde_json::Map::new();
        let now = humantime::format_rfc3339_millis(std::time::SystemTime::now());
        object.insert("time".into(), now.to_string().into());
        object.insert("level".into(), level.name().into());
        object.extend(fields);
        let line = serde_json::Value::Object(object).to_string();
        self.write_dressed(level, &line);
    }

    fn write_dressed(&mut self, level: Level, line: &str) {
        let dressed = match self.format {
            Format::Human | Format::Json => format!("{line}\n"),
            Format::Tag => format!("<{}>{line}\n", level.priority()),
        };
        match &self.target {
            #[cfg(test)]
            // Through the test harness's capture, not the terminal.
            Target::Stderr => eprint!("{dressed}"),
            #[cfg(not(test))]
            Target::Stderr => {
                let _ = std::io::stderr().lock().write_all(dressed.as_bytes());
            }
            Target::Stdout => {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(dressed.as_bytes()).and_then(|()| out.flush());
            }
            Target::File(path) => {
                if REOPEN.swap(false, Ordering::Relaxed) {
                    // A file that cannot be reopened keeps the old one.
                    if let Ok(file) = open_log_file(path) {
                        self.file = Some(file);
                    }
                }
                if let Some(file) = &mut self.file {
                    let _ = file.write_all(dressed.as_bytes());
                }
            }
            Target::Syslog => {
                // NUL bytes cannot reach syslog(3); file names are escaped
                // before they get here, so none is expected.
                let text = CString::new(line.replace('\0', "\\0")).unwrap_or_default();
                // SAFETY: a constant "%s" format with one valid C string.
                unsafe { libc::syslog(level.priority(), c"%s".as_ptr(), text.as_ptr()) };
            }
        }
    }
}

/// Queues `line` (at info level) without ever blocking. Returns false if
/// it was dropped (queue full, or no logger thread).
pub fn line(line: String) -> bool {
    line_at(Level::Info, line)
}

/// Queues `line` at `level` without ever blocking; false if dropped.
pub fn line_at(level: Level, line: String) -> bool {
    send(Msg::Line(level, line))
}

/// Queues a structured event (at info level) without ever blocking; false
/// if dropped.
pub fn event(event: Box<dyn Event>) -> bool {
    send(Msg::Event(Level::Info, event))
}

fn send(msg: Msg) -> bool {
    let sent = match logger() {
        Some(l) => match l.tx.try_send(msg) {
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

impl Event for crate::endpoint::TransferRecord {
    fn name(&self) -> &'static str {
        "transfer"
    }

    fn text(&self) -> String {
        self.to_string()
    }

    fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(fields)) => fields,
            _ => serde_json::Map::new(),
        }
    }
}

impl Event for crate::endpoint::RefusalNote {
    fn name(&self) -> &'static str {
        "refused"
    }

    fn text(&self) -> String {
        self.to_string()
    }

    fn fields(&self) -> serde_json::Map<String, serde_json::Value> {
        use crate::endpoint::RefusalNote;
        let value = match self {
            RefusalNote::Refused(r) => serde_json::json!({
                "client": r.peer.to_string(),
                "file": r.filename,
                "direction": if r.write { "write" } else { "read" },
                "reason": r.kind.as_str(),
                "error_code": r.code.to_u16(),
                "error": r.message,
            }),
            RefusalNote::Suppressed { lines } => serde_json::json!({ "suppressed": lines }),
        };
        match value {
            serde_json::Value::Object(fields) => fields,
            _ => serde_json::Map::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_written_and_flush_returns() {
        assert!(line("log test: one line".into()));
        assert!(flush(Duration::from_secs(5)));
    }

    #[test]
    fn a_log_file_gets_dressed_lines_and_is_reopened_after_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let mut writer = Writer {
            target: Target::File(path.clone()),
            format: Format::Tag,
            file: Some(open_log_file(&path).expect("open")),
        };
        writer.write(Level::Warning, "before");
        std::fs::rename(&path, dir.path().join("log.1")).expect("rotate");
        reopen();
        writer.write(Level::Info, "after");
        let rotated = std::fs::read_to_string(dir.path().join("log.1")).expect("read");
        assert_eq!(rotated, "<4>before\n");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "<6>after\n");
    }
}
