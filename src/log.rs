//! Log lines, written by one logger thread to where the command line says
//! (tftpd-hpa 7.x's `--stderr`, `--stdout`, `--logfile`, `--syslog`). A
//! shard never writes itself: a full stderr pipe (a stalled journal, a
//! reader that went away) would stall every transfer on that shard. Lines
//! go through a bounded queue instead; when it is full the line is dropped
//! and counted, and the logger reports the count ("N log lines dropped")
//! once it catches up. Each shard also counts its own drops for its
//! counters line at exit.
//!
//! The front end is `tracing`: call sites emit events with typed fields
//! ([`events`] holds the transfer and refusal ones), and [`layer::Queue`],
//! a `tracing_subscriber` layer, copies each enabled event into a
//! [`Record`] and queues it; the logger thread dresses it as text or JSON.
//! The level filter (`-v`) is checked by tracing's macros before any field
//! is looked at, so a disabled event costs a comparison.
//!
//! [`configure`] installs the subscriber and picks the target, once,
//! before the first line; until then (and in unit tests) events go
//! nowhere.

pub mod events;
pub mod layer;

use std::cell::Cell;
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

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
    /// As written: `ringtftpd: warning: ...`, `transfer client=...`; a
    /// log file's lines start with the time (RFC 3339, UTC).
    #[default]
    Human,
    /// Prefixed with the priority as `<N>` (sd-daemon(3)), which journald
    /// reads from a service's standard error.
    Tag,
    /// One JSON object a line: `time` (RFC 3339, UTC), `level`, then an
    /// event's fields (`event`: `transfer`, `refused`...) and `msg`.
    Json,
}

/// A line's priority: tracing's levels, with syslog(3)'s names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Info => "info",
            Level::Debug => "debug",
            Level::Trace => "trace",
        }
    }

    /// syslog(3)'s priority.
    fn priority(self) -> libc::c_int {
        match self {
            Level::Error => libc::LOG_ERR,
            Level::Warning => libc::LOG_WARNING,
            Level::Info => libc::LOG_INFO,
            Level::Debug | Level::Trace => libc::LOG_DEBUG,
        }
    }
}

impl From<tracing::Level> for Level {
    fn from(level: tracing::Level) -> Self {
        match level {
            tracing::Level::ERROR => Level::Error,
            tracing::Level::WARN => Level::Warning,
            tracing::Level::INFO => Level::Info,
            tracing::Level::DEBUG => Level::Debug,
            tracing::Level::TRACE => Level::Trace,
        }
    }
}

static TARGET: OnceLock<(Target, Format)> = OnceLock::new();
/// Set by [`reopen`]; the logger reopens a log file before its next line.
static REOPEN: AtomicBool = AtomicBool::new(false);

/// Picks where lines go and the most detailed level written, and installs
/// the `tracing` subscriber; only the first call counts, and only before
/// the first line. Opens a log file now, so that an unwritable one fails
/// start.
pub fn configure(target: Target, format: Format, level: tracing::Level) -> std::io::Result<()> {
    if let Target::File(path) = &target {
        open_log_file(path)?;
    }
    if target == Target::Syslog {
        // SAFETY: the identifier is a static C string that outlives every
        // later syslog call, as openlog(3) requires.
        unsafe { libc::openlog(c"ringtftpd".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
    }
    if TARGET.set((target, format)).is_ok()
        && let Some(l) = logger()
    {
        let _ = tracing::subscriber::set_global_default(layer::subscriber(l.tx.clone(), level));
    }
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

/// One field's value as the emitting thread handed it over.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A `&str` field: quoted in text (`file="..."`).
    Str(String),
    /// A `%` (Display) or `?` (Debug) field: bare in text (`client=1.2.3.4:5`).
    Bare(String),
    U64(u64),
    I64(i64),
    /// Shown to the microsecond in text (`duration_ms=1.500`).
    F64(f64),
    Bool(bool),
}

impl Value {
    fn json(&self) -> serde_json::Value {
        match self {
            Value::Str(s) | Value::Bare(s) => s.as_str().into(),
            Value::U64(n) => (*n).into(),
            Value::I64(n) => (*n).into(),
            Value::F64(x) => (*x).into(),
            Value::Bool(b) => (*b).into(),
        }
    }

    fn write_text(&self, out: &mut String) {
        use std::fmt::Write as _;
        let _ = match self {
            Value::Str(s) => {
                out.push('"');
                push_one_line(out, s);
                out.push('"');
                Ok(())
            }
            Value::Bare(s) => {
                push_one_line(out, s);
                Ok(())
            }
            Value::U64(n) => write!(out, "{n}"),
            Value::I64(n) => write!(out, "{n}"),
            Value::F64(x) => write!(out, "{x:.3}"),
            Value::Bool(b) => write!(out, "{b}"),
        };
    }
}

/// Appends `s` with control characters escaped, so that one event stays
/// one line. Names from the wire arrive escaped already (`escape_ascii`).
fn push_one_line(out: &mut String, s: &str) {
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
}

/// An event as the logger thread gets it: everything owned.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub time: SystemTime,
    pub level: Level,
    /// The event's `event` field (`transfer`, `refused`), if it has one.
    pub event: Option<String>,
    pub message: Option<String>,
    /// The other fields, in the order the call site gave them.
    pub fields: Vec<(&'static str, Value)>,
}

impl Record {
    /// The text line: `transfer client=... file="..."`, or for a message
    /// of the server's own `ringtftpd: [warning: ]text [key=value...]`.
    pub fn text(&self) -> String {
        let mut out = String::with_capacity(160);
        match &self.event {
            Some(event) => {
                out.push_str(event);
                if let Some(message) = &self.message {
                    out.push_str(": ");
                    push_one_line(&mut out, message);
                }
            }
            None => {
                out.push_str("ringtftpd: ");
                if self.level == Level::Warning {
                    out.push_str("warning: ");
                }
                if let Some(message) = &self.message {
                    push_one_line(&mut out, message);
                }
            }
        }
        for (name, value) in &self.fields {
            out.push(' ');
            out.push_str(name);
            out.push('=');
            value.write_text(&mut out);
        }
        out
    }

    /// The JSON object: `time`, `level`, `event`, the fields, `msg`.
    pub fn json(&self) -> serde_json::Value {
        let mut object = serde_json::Map::new();
        let time = humantime::format_rfc3339_millis(self.time).to_string();
        object.insert("time".into(), time.into());
        object.insert("level".into(), self.level.name().into());
        if let Some(event) = &self.event {
            object.insert("event".into(), event.as_str().into());
        }
        for (name, value) in &self.fields {
            object.insert((*name).into(), value.json());
        }
        if let Some(message) = &self.message {
            object.insert("msg".into(), message.as_str().into());
        }
        serde_json::Value::Object(object)
    }
}

enum Msg {
    Record(Record),
    /// Answered once every line queued before it was written.
    Flush(Sender<()>),
}

struct Logger {
    tx: Sender<Msg>,
}

static LOGGER: OnceLock<Option<Logger>> = OnceLock::new();
/// Lines dropped since the logger last reported them.
static DROPPED: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Lines this thread dropped since it last asked ([`take_local_drops`]):
    /// a shard's share, for its counters and metrics.
    static LOCAL_DROPPED: Cell<u64> = const { Cell::new(0) };
}

/// Lines the calling thread dropped since its last call.
pub fn take_local_drops() -> u64 {
    LOCAL_DROPPED.with(|n| n.replace(0))
}

fn logger() -> Option<&'static Logger> {
    LOGGER
        .get_or_init(|| {
            let (tx, rx) = channel::bounded(QUEUE_LINES);
            // Started from the main thread before the shards, with the
            // signals blocked: it inherits the mask.
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
            Msg::Record(record) => writer.write(&record),
            Msg::Flush(done) => {
                let _ = done.send(());
            }
        }
        if rx.is_empty() {
            let n = DROPPED.swap(0, Ordering::Relaxed);
            if n > 0 {
                writer.write(&Record {
                    time: SystemTime::now(),
                    level: Level::Warning,
                    event: None,
                    message: Some(format!("{n} log lines dropped")),
                    fields: Vec::new(),
                });
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
    fn write(&mut self, record: &Record) {
        let line = match self.format {
            Format::Json => record.json().to_string(),
            Format::Human | Format::Tag => record.text(),
        };
        let level = record.level;
        let tag = match self.format {
            Format::Tag => format!("<{}>", level.priority()),
            Format::Human | Format::Json => String::new(),
        };
        // A file has no other clock (journald and syslog add their own).
        let time = match (&self.target, self.format) {
            (Target::File(_), Format::Human | Format::Tag) => {
                format!("{} ", humantime::format_rfc3339_millis(record.time))
            }
            _ => String::new(),
        };
        let dressed = format!("{tag}{time}{line}\n");
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
                // NUL bytes cannot reach syslog(3); text values have their
                // control characters escaped, so none is expected.
                let text = CString::new(line.replace('\0', "\\0")).unwrap_or_default();
                // SAFETY: a constant "%s" format with one valid C string.
                unsafe { libc::syslog(level.priority(), c"%s".as_ptr(), text.as_ptr()) };
            }
        }
    }
}

/// Queues `msg` on `tx` without ever blocking; counts it as dropped
/// (globally and for this thread) when the queue is full.
fn send(tx: &Sender<Msg>, msg: Msg) -> bool {
    let sent = match tx.try_send(msg) {
        Ok(()) => true,
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
    };
    if !sent {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        LOCAL_DROPPED.with(|n| n.set(n.get() + 1));
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
    use crate::endpoint::TransferRecord;

    /// Runs `emit` under our subscriber at `level` with a queue of `cap`
    /// nobody drains, and returns what was queued.
    fn capture(level: tracing::Level, cap: usize, emit: impl FnOnce()) -> Vec<Record> {
        let (tx, rx) = channel::bounded(cap);
        tracing::subscriber::with_default(layer::subscriber(tx, level), emit);
        rx.try_iter()
            .filter_map(|m| match m {
                Msg::Record(r) => Some(r),
                Msg::Flush(_) => None,
            })
            .collect()
    }

    fn record() -> TransferRecord {
        TransferRecord {
            client: "192.0.2.7:2001".parse().expect("addr"),
            file: "pxelinux.cfg/01-aa".into(),
            served: Some("pxelinux.cfg/default".into()),
            direction: "read",
            mode: "octet",
            options: "blksize=512 tsize=0".into(),
            bytes: 513,
            blocks: 2,
            blksize: 512,
            windowsize: 1,
            duration_ms: 1.5,
            retransmits: 2,
            srtt_ms: Some(0.25),
            rto_floor_ms: 200.0,
            outcome: "completed",
            error_code: None,
            error: None,
        }
    }

    #[test]
    fn a_transfer_event_keeps_the_text_line_with_typed_fields() {
        let local: std::net::IpAddr = "192.0.2.1".parse().expect("ip");
        let got = capture(tracing::Level::INFO, 8, || {
            events::transfer(&record(), local)
        });
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].level, Level::Info);
        assert_eq!(
            got[0].text(),
            "transfer client=192.0.2.7:2001 local=192.0.2.1 file=\"pxelinux.cfg/01-aa\" \
             direction=read bytes=513 blksize=512 windowsize=1 duration_ms=1.500 retransmits=2 \
             srtt_ms=0.250 rto_floor_ms=200.000 outcome=completed mode=octet blocks=2 \
             options=\"blksize=512 tsize=0\" served=\"pxelinux.cfg/default\""
        );
        let json = got[0].json();
        assert_eq!(json["event"], "transfer");
        assert_eq!(json["level"], "info");
        assert!(
            json["time"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{json}"
        );
        assert_eq!(json["bytes"], 513);
        assert_eq!(json["blocks"], 2);
        assert_eq!(json["mode"], "octet");
        assert_eq!(json["options"], "blksize=512 tsize=0");
        assert_eq!(json["duration_ms"], 1.5);
        assert_eq!(json["local"], "192.0.2.1");
        assert_eq!(json["served"], "pxelinux.cfg/default");
        // Unknown values are left out, not made up.
        assert!(json.get("error_code").is_none(), "{json}");
    }

    #[test]
    fn a_refusal_event_has_its_reason_and_a_control_character_stays_escaped() {
        use crate::endpoint::{RefusalNote, Refused};
        use crate::proto::ErrorCode;
        use crate::refusal::RefusalKind;
        let note = RefusalNote::Refused(Refused {
            peer: "192.0.2.7:2001".parse().expect("addr"),
            filename: "a\nb".into(),
            write: false,
            kind: RefusalKind::NotFound,
            code: ErrorCode::FileNotFound,
            message: "file not found".into(),
        });
        let got = capture(tracing::Level::INFO, 8, || events::refusal(&note));
        assert_eq!(
            got[0].text(),
            "refused client=192.0.2.7:2001 file=\"a\\nb\" direction=read reason=not_found \
             error_code=1 error=\"file not found\""
        );
        assert_eq!(got[0].json()["file"], "a\nb");
    }

    #[test]
    fn debug_events_appear_only_at_debug_level() {
        let emit = || {
            tracing::debug!(shard = 0usize, "detail");
            tracing::info!("headline");
        };
        let info = capture(tracing::Level::INFO, 8, emit);
        assert_eq!(info.len(), 1);
        assert_eq!(info[0].text(), "ringtftpd: headline");
        let debug = capture(tracing::Level::DEBUG, 8, emit);
        assert_eq!(debug.len(), 2);
        assert_eq!(debug[0].text(), "ringtftpd: detail shard=0");
        assert_eq!(debug[0].json()["level"], "debug");
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        take_local_drops();
        let started = std::time::Instant::now();
        let got = capture(tracing::Level::INFO, 2, || {
            for i in 0..10u32 {
                tracing::warn!(i, "line");
            }
        });
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(got.len(), 2);
        assert_eq!(take_local_drops(), 8);
        assert_eq!(take_local_drops(), 0);
    }

    /// What a disabled event costs at its call site (a figure, not a
    /// check: timings vary with the machine). `cargo test --release --lib
    /// disabled_events -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn disabled_events_cost_a_comparison() {
        const N: u32 = 10_000_000;
        let (tx, _rx) = channel::bounded(1);
        let peer: std::net::SocketAddr = "192.0.2.7:2001".parse().expect("addr");
        tracing::subscriber::with_default(layer::subscriber(tx, tracing::Level::INFO), || {
            let started = std::time::Instant::now();
            for i in 0..N {
                tracing::trace!(shard = 0usize, session = i, client = %peer, "sends queued");
            }
            let per = started.elapsed().as_secs_f64() * 1e9 / f64::from(N);
            let started = std::time::Instant::now();
            for i in 0..N {
                std::hint::black_box(i);
            }
            let bare = started.elapsed().as_secs_f64() * 1e9 / f64::from(N);
            eprintln!("{N} disabled trace events: {per:.2} ns each (the bare loop: {bare:.2} ns)");
        });
    }

    #[test]
    fn flush_returns_once_the_logger_caught_up() {
        assert!(flush(Duration::from_secs(5)));
    }

    #[test]
    fn a_log_file_gets_dressed_timed_lines_and_is_reopened_after_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("log");
        let mut writer = Writer {
            target: Target::File(path.clone()),
            format: Format::Tag,
            file: Some(open_log_file(&path).expect("open")),
        };
        let line = |level, text: &str| Record {
            time: SystemTime::UNIX_EPOCH,
            level,
            event: None,
            message: Some(text.into()),
            fields: Vec::new(),
        };
        writer.write(&line(Level::Warning, "before"));
        std::fs::rename(&path, dir.path().join("log.1")).expect("rotate");
        reopen();
        writer.write(&line(Level::Info, "after"));
        let rotated = std::fs::read_to_string(dir.path().join("log.1")).expect("read");
        assert_eq!(
            rotated,
            "<4>1970-01-01T00:00:00.000Z ringtftpd: warning: before\n"
        );
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "<6>1970-01-01T00:00:00.000Z ringtftpd: after\n"
        );
    }
}
