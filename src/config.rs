//! The command line. Flags follow tftpd-hpa's where they overlap
//! (`-a/--address`, the directory last, `-B`, `-p`), so that ringtftpd can
//! stand in for it.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{CommandFactory, Parser};

use crate::clients::{ClientPolicy, ClientRules};
use crate::endpoint::EndpointConfig;
use crate::files::upload::UploadRules;
use crate::log;
use crate::paths::{Normalize, PathPolicy, PathRules, canonical_directory};
use crate::policy::{DefaultPolicy, NameProbe, Policy, RefusedOptions, RemapPolicy, Settings};
use crate::proto;
use crate::remap::{self, RemapRules};
use crate::session::{self, Limits, MAX_WINDOWSIZE};

/// The TFTP port.
pub const DEFAULT_PORT: u16 = 69;

// Upper bounds of the numeric flags: every time stays far from overflowing
// an `Instant` (retries × RTO ceiling is at most 100 min), every size from
// overflowing the kernel's `int`.
/// Largest `--rto-min-ms`, `--rto-max-ms` and `--initial-rto-ms`.
pub const MAX_RTO_MS: u64 = 60_000;
/// Largest `--retries`.
pub const MAX_RETRIES: u32 = 100;
/// Largest `--shutdown-grace`, in seconds.
pub const MAX_SHUTDOWN_GRACE_SECS: u64 = 3600;
/// Largest `--open-cache-ms`.
pub const MAX_OPEN_CACHE_MS: u64 = 3_600_000;
/// Largest `--max-sessions` (each holds a socket).
pub const MAX_SESSIONS: u32 = 1 << 20;
/// Largest `--threads`.
pub const MAX_THREADS: u16 = 1024;
/// Largest `--rcvbuf`, in bytes.
pub const MAX_RCVBUF: u64 = 1 << 30;
/// Largest `-t/--timeout`, in seconds (a week).
pub const MAX_IDLE_TIMEOUT_SECS: u64 = 7 * 24 * 3600;
/// tftpd-hpa's idle exit under inetd or systemd, in seconds.
pub const INHERITED_IDLE_SECS: u64 = 900;
/// Largest `--map-steps`.
pub const MAX_MAP_STEPS: u32 = 1_000_000;
/// Most directories served (each request is tried against them in turn).
pub const MAX_DIRECTORIES: usize = 256;
/// Largest `--error-rate`, per second and thread.
pub const MAX_ERROR_RATE: u32 = 1_000_000;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "ringtftpd",
    version,
    about = "A high-performance TFTP server on io_uring",
    after_help = "The live view of a running server (started with --metrics): \
                  ringtftpd top [ADDR]; see ringtftpd top --help."
)]
pub struct Config {
    /// Directory to serve; a leading '/' in requests means this root.
    #[arg(default_value = "/srv/tftp")]
    pub directory: PathBuf,

    /// More directories, as tftpd-hpa takes (not with -s or -j): a name
    /// must then be absolute and inside one of them.
    #[arg(value_name = "DIRECTORY")]
    pub more_directories: Vec<PathBuf>,

    /// Address to listen on, `ADDR[:PORT]`, `[V6ADDR][:PORT]`,
    /// `HOST[:PORT]` (every address it has) or `:PORT`, PORT a number or a
    /// service name; repeatable. Default: every address (dual-stack).
    #[arg(short = 'a', long = "address", value_name = "[ADDR][:PORT]", value_parser = parse_listen_address)]
    pub addresses: Vec<ListenSpec>,

    /// The port (number or service name) of an --address without one, as
    /// tftpd-hpa's -S/--service/--port. Default: 69.
    #[arg(
        short = 'S',
        long = "port",
        visible_alias = "service",
        value_name = "PORT"
    )]
    pub service: Option<String>,

    /// Largest blksize granted (RFC 2348: 8..=65464), or `mtu` / `mtu-SLACK`
    /// (any case): the ingress interface's MTU, less SLACK bytes, decides
    /// (never below 512), as tftpd-hpa 7.x's `-B`; `--blocksize` as in
    /// tftpd-hpa.
    #[arg(short = 'B', long = "max-blksize", visible_alias = "blocksize", default_value = "65464",
          value_parser = parse_max_blksize)]
    pub max_blksize: MaxBlksize,

    /// Largest windowsize granted (RFC 7440); `-W`/`--windowsize` as in
    /// tftpd-hpa 7.x.
    #[arg(short = 'W', long, visible_alias = "windowsize", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_WINDOWSIZE)))]
    pub max_windowsize: u16,

    /// Most bytes in one window (blksize × windowsize), with a K, M or G
    /// suffix; a limit under two blocks means lockstep, without a
    /// windowsize option. tftpd-hpa 7.x's `--window-bytes`; its 4 MiB
    /// default too, and 0 means no window as in tftpd-hpa 7.3 (whose man
    /// page says 0 disables the limit; its binary does not).
    #[arg(long = "window-bytes", value_name = "BYTES", default_value = "4M", value_parser = parse_size)]
    pub window_bytes: u64,

    /// Do not clamp blksize to the MTU of the interface a request came in on.
    #[arg(long)]
    pub no_mtu_clamp: bool,

    /// Serve files that are not world-readable too.
    #[arg(short = 'p', long)]
    pub permissive: bool,

    /// Retransmissions of one packet before a transfer is given up
    /// (0..=100).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_RETRIES)))]
    pub retries: u32,

    /// Starting floor of each transfer's adaptive retransmission timeout,
    /// in milliseconds (1..=60000). Low, so a loss on a LAN costs
    /// milliseconds; a transfer raises its own floor when a resend proves
    /// spurious (slow firmware's ACK jitter).
    #[arg(long, default_value_t = session::DEFAULT_RTO_MIN_MS, value_parser = clap::value_parser!(u64).range(1..=MAX_RTO_MS))]
    pub rto_min_ms: u64,

    /// Seconds a transfer may go without progress before it is given up,
    /// whatever its retries and timeouts say (1..=3600).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub max_stall_secs: u64,

    /// Most concurrent transfers from one client address (approximate
    /// across threads: each thread allows its share), 1..=1048576.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SESSIONS)))]
    pub max_per_client: u32,

    /// Largest windowsize granted to a client address this thread has not
    /// seen finish a transfer in the last 10 minutes (a spoofed request's
    /// victim, usually): a forged ACK 0 then buys at most this many blocks.
    /// Known clients get up to --max-windowsize. 0: no separate cap.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(0..=i64::from(MAX_WINDOWSIZE)))]
    pub first_contact_windowsize: u16,

    /// Requests per second accepted from one client address, per thread;
    /// beyond it (after a burst of four times as many) requests are dropped
    /// unanswered, and the client's own retry brings them back. 0: no limit.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub request_rate: u32,

    /// ERROR replies per second and thread refusing well-formed requests
    /// (missing file, denied, busy), 1..=1000000: high enough for a boot
    /// storm's probes of missing per-MAC configs.
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub refusal_rate: u32,

    /// Milliseconds a request refused for lack of capacity (session limit,
    /// no transfer socket) goes unanswered, so that the client's own
    /// retransmission asks again, before it is answered ERROR 0 busy
    /// (0..=120000; 0 answers at once). A PXE ROM fails its boot on ERROR 0.
    #[arg(long, default_value_t = crate::policy::DEFAULT_BUSY_PATIENCE_MS, value_parser = clap::value_parser!(u64).range(0..=120_000))]
    pub busy_patience_ms: u64,

    /// Ceiling of the adaptive retransmission timeout, in milliseconds
    /// (1..=60000, not below --rto-min-ms).
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=MAX_RTO_MS))]
    pub rto_max_ms: u64,

    /// Retransmission timeout before the first RTT sample, in milliseconds
    /// (1..=60000; clamped to --rto-min-ms..=--rto-max-ms).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=MAX_RTO_MS))]
    pub initial_rto_ms: u64,

    /// The same in microseconds, as tftpd-hpa's -T (rounded up to whole
    /// milliseconds; replaces --initial-rto-ms).
    #[arg(short = 'T', long = "retransmit", value_name = "USEC", conflicts_with = "initial_rto_ms",
          value_parser = clap::value_parser!(u64).range(1..=MAX_RTO_MS * 1000))]
    pub retransmit_us: Option<u64>,

    /// Most concurrent transfers, across all threads (1..=1048576).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SESSIONS)))]
    pub max_sessions: u32,

    /// Worker threads (shards), 1..=1024; default: one per CPU this process
    /// may run on.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=i64::from(MAX_THREADS)))]
    pub threads: Option<u16>,

    /// Receive buffer of each listening socket, in bytes (absorbs bursts
    /// of requests); 0 keeps the system default, at most 1 GiB.
    #[arg(long, default_value_t = 16 << 20,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=MAX_RCVBUF))]
    pub rcvbuf: usize,

    /// ERROR replies per second and thread to strangers and malformed
    /// packets (a bound on reflected traffic), 0..=1000000.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_ERROR_RATE)))]
    pub error_rate: u32,

    /// Milliseconds for which the result of opening a file name (the
    /// file, or its refusal) is reused; 0 opens the file for every request
    /// (at most 3600000, an hour).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=MAX_OPEN_CACHE_MS))]
    pub open_cache_ms: u64,

    /// Run PROGRAM after each finished transfer, as dnsmasq's --dhcp-script
    /// for "tftp": arguments `tftp BYTES CLIENT-ADDRESS PATH`, the record
    /// in TFTP_* variables and as a JSON line on standard input; one run at
    /// a time from a bounded queue (a slow program never stalls serving;
    /// records beyond the queue are dropped and counted).
    #[arg(long, value_name = "PROGRAM")]
    pub on_transfer: Option<PathBuf>,

    /// Seconds that running transfers may take to finish after SIGINT or
    /// SIGTERM (at most 3600); new requests meanwhile get ERROR 0 "server
    /// shutting down", and a second signal exits at once.
    #[arg(long, visible_alias = "drain-timeout", value_name = "SECS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(0..=MAX_SHUTDOWN_GRACE_SECS))]
    pub shutdown_grace: u64,

    /// Let write requests (uploads) create files that do not exist yet,
    /// as tftpd-hpa's -c; also lets them replace world-writable files.
    /// Without this or --overwrite every write request is refused.
    #[arg(short = 'c', long)]
    pub create: bool,

    /// Let write requests replace existing files even if they are not
    /// world-writable (tftpd-hpa needs o+w); new files still need --create.
    #[arg(long)]
    pub overwrite: bool,

    /// Refuse every write request with ERROR 2, whatever --create and
    /// --overwrite say (the default when neither is given).
    #[arg(long = "read-only", visible_alias = "ro")]
    pub read_only: bool,

    /// Mode of new uploaded files: 0666 without these bits (octal, as
    /// tftpd-hpa's -U; default 0: anyone can read and write them).
    #[arg(short = 'U', long, default_value = "0", value_parser = parse_umask)]
    pub umask: u32,

    /// Write the process ID to FILE once the ports are bound (before
    /// dropping privileges), as tftpd-hpa's -P; removed at a clean exit.
    #[arg(short = 'P', long = "pidfile", value_name = "FILE")]
    pub pidfile: Option<PathBuf>,

    /// Serve Prometheus metrics over HTTP on ADDR (e.g. 127.0.0.1:9469):
    /// /metrics, /healthz and /readyz, from a thread of their own (see
    /// docs/operations.md). Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// With --metrics: also count finished transfers by file, for the
    /// first N normalised names to finish one (the rest as file="other";
    /// see docs/operations.md). At most 256; default 0: no file labels.
    #[arg(long = "metrics-file-labels", value_name = "N", default_value_t = 0,
          requires = "metrics", value_parser = clap::value_parser!(u16).range(0..=256))]
    pub metrics_file_labels: u16,

    /// Never negotiate this option (as tftpd-hpa's -r): blksize, tsize,
    /// timeout, windowsize, or tftpd-hpa's blksize2, utimeout, rollover
    /// and cookie. Repeatable.
    #[arg(short = 'r', long = "refuse", visible_alias = "reject", value_name = "OPTION", value_parser = parse_refused_option)]
    pub refuse: Vec<String>,

    /// Negotiate no options at all (RFC 1350 only), as tftpd-hpa 7.x.
    #[arg(long = "refuse-all", visible_alias = "reject-all")]
    pub refuse_all: bool,

    /// Transfer ports LOW:HIGH (as tftpd-hpa's -R): every transfer's port
    /// is drawn at random from the range, shared with the other threads
    /// and processes; none free gets ERROR 0 "server busy". Default: any
    /// port the kernel picks.
    #[arg(short = 'R', long = "port-range", visible_alias = "ports", value_name = "LOW:HIGH", value_parser = parse_port_range)]
    pub port_range: Option<(u16, u16)>,

    /// Run every transfer on the listening port (as dnsmasq's
    /// --tftp-single-port): replies and DATA leave from it and ACKs come
    /// back to it, told apart by client address and port. For NAT,
    /// Kubernetes Services and containers that forward one port; the
    /// server's TID is then no secret (see docs/single-port.md).
    #[arg(long, conflicts_with = "port_range")]
    pub single_port: bool,

    /// Largest upload, in bytes, or with a K, M or G suffix (powers of
    /// 1024). A write request announcing more by its tsize is refused with
    /// ERROR 3 before any data moves; one that sends more is ended so.
    #[arg(long, visible_alias = "max-size", value_name = "SIZE", value_parser = parse_size)]
    pub max_upload: Option<u64>,

    /// Filename remap rules (tftpd-hpa 7.x's language): each requested
    /// name is rewritten or refused by them before it is opened. An error
    /// in the file fails start-up with its line; SIGHUP re-reads it.
    #[arg(short = 'm', long = "map-file", value_name = "FILE")]
    pub map_file: Option<PathBuf>,

    /// Most remap rules run on one name before the mapping fails
    /// (1..=1000000; each is a regex search of the name).
    #[arg(long = "map-steps", value_name = "STEPS", default_value_t = remap::DEFAULT_MAX_STEPS as u32,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_MAP_STEPS)))]
    pub map_steps: u32,

    /// Print what the remap rules make of each line of FILE (`-` for
    /// standard input) and exit, as tftpd-hpa 7.x: -6 asks as an IPv6
    /// client, --create as a write request.
    #[arg(long = "map-test", value_name = "FILE")]
    pub map_test: Option<PathBuf>,

    /// Log to the system log (facility daemon): the default once detached
    /// (-l without -L) or under inetd, as tftpd-hpa.
    #[arg(long, group = "log_target")]
    pub syslog: bool,

    /// Log to standard error (the default in the foreground), optionally
    /// as `--stderr=FORMAT` (see --logformat).
    #[arg(long, group = "log_target", value_name = "FORMAT", num_args = 0..=1,
          require_equals = true, default_missing_value = "", value_parser = parse_log_format_or_empty)]
    pub stderr: Option<FormatIfGiven>,

    /// Log to standard output, optionally as `--stdout=FORMAT`.
    #[arg(long, group = "log_target", value_name = "FORMAT", num_args = 0..=1,
          require_equals = true, default_missing_value = "", value_parser = parse_log_format_or_empty)]
    pub stdout: Option<FormatIfGiven>,

    /// Log to FILE (appended to, created 0644), reopened on SIGHUP for
    /// rotation.
    #[arg(long, group = "log_target", value_name = "FILE")]
    pub logfile: Option<PathBuf>,

    /// How log lines are dressed: `human` or `text` (the default), `tag`
    /// (`<N>` priority prefixes, which journald reads), or `json` (one
    /// object a line: time, level, and the event's fields or msg).
    #[arg(long, visible_alias = "log-format", value_name = "FORMAT", value_parser = parse_log_format)]
    pub logformat: Option<log::Format>,

    /// No log line per finished transfer.
    #[arg(short = 'q', long)]
    pub quiet: bool,

    /// Once the listening sockets are bound, switch to this user and its
    /// primary group (as tftpd-hpa's -u); needs root. Default: stay.
    #[arg(short = 'u', long = "user", value_name = "USER")]
    pub user: Option<String>,

    /// IPv4 only (as tftpd-hpa's -4): `[::]` becomes `0.0.0.0`.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,

    /// IPv6 only (as tftpd-hpa's -6): `[::]` takes no IPv4 traffic.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,

    /// More detail in the log, as tftpd-hpa's -v: once for debug events
    /// (a transfer's start, timeouts), twice for trace. Default: info
    /// (transfers, refusals, start-up, reload).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// The log level as a number, as tftpd-hpa's: 0 info, 1 debug, 2 or
    /// more trace; the higher of this and -v counts.
    #[arg(long = "verbosity", value_name = "N")]
    pub verbosity: Option<u32>,

    /// Exit after SECS without a request and with no transfer running, as
    /// tftpd-hpa's -t (0: never). Default: never when standalone, 900
    /// under inetd or --systemd (which start it again on the next request).
    #[arg(short = 't', long = "timeout", value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(0..=MAX_IDLE_TIMEOUT_SECS))]
    pub idle_timeout: Option<u64>,

    /// Take the listening sockets from systemd socket activation
    /// (LISTEN_FDS), as tftpd-hpa 7.x; --address is then ignored.
    #[arg(long)]
    pub systemd: bool,

    /// Standalone, detached once the ports are bound (as tftpd-hpa's -l
    /// without -L): the command returns, the server runs on.
    #[arg(short = 'l', long = "listen")]
    pub listen: bool,

    /// Stay in the foreground (the default; with -l, as tftpd-hpa's -L).
    #[arg(short = 'L', long = "foreground")]
    pub foreground: bool,

    /// Names are relative to the directory, as under tftpd-hpa's -s
    /// (chroot): always so, by openat2. Without -s or -j, a name carrying
    /// the directory's absolute path (tftpd-hpa's form then) is served from
    /// inside it too.
    #[arg(short = 's', long = "secure", visible_alias = "chroot", hide = true)]
    pub secure: bool,

    /// tftpd-hpa 7.x's path validation after remapping: names must be
    /// absolute, without `.`, `..` or control characters (and, without -s
    /// or -j, inside the directory), repeated slashes dropped.
    #[arg(long)]
    pub validate: bool,

    /// `root` adds a leading '/' to each name, `path` (the default of a
    /// bare --normalize) also drops `//` and `.`, and `..` with the part
    /// before it, after remapping (tftpd-hpa 7.x).
    #[arg(long, value_name = "MODE", num_args = 0..=1, require_equals = true,
          default_missing_value = "path", value_parser = parse_normalize)]
    pub normalize: Option<Normalize>,

    /// Serve PREFIX joined with the directory (tftpd-hpa 7.x's
    /// --path-prefix under -s or -j: `--path-prefix /var/lib /tftpboot`
    /// serves /var/lib/tftpboot).
    #[arg(long, value_name = "PREFIX")]
    pub path_prefix: Option<PathBuf>,

    /// As tftpd-hpa 7.x's --jail, always on: names resolve under the
    /// directory with openat2 (RESOLVE_IN_ROOT), so no root is needed.
    #[arg(short = 'j', long = "jail", hide = true)]
    pub jail: bool,

    /// Per-client rules (TOML; see docs/policy-file.md): by client CIDR,
    /// MAC or requested name, a path prefix, lower blksize and windowsize
    /// caps, refused options, a session cap, uploads allowed or not.
    #[arg(long = "policy-file", value_name = "FILE")]
    pub policy_file: Option<PathBuf>,

    /// Check the command line and the files it names (the remap and
    /// policy files), print a one-line summary and exit: 0 if all is
    /// well, 1 with the error (and its line) if not.
    #[arg(long = "check-config")]
    pub check_config: bool,

    /// The policy file's rules, once `check_files` has read them.
    #[arg(skip)]
    pub client_rules: Option<Arc<ClientRules>>,
}

/// `--normalize`'s modes, as tftpd-hpa 7.x.
fn parse_normalize(mode: &str) -> Result<Normalize, String> {
    match mode {
        "none" => Ok(Normalize::None),
        "root" => Ok(Normalize::Root),
        "path" => Ok(Normalize::Path),
        _ => Err(format!("'{mode}' is not a mode: none, root or path")),
    }
}

/// `--logformat`'s names, as tftpd-hpa 7.x, and ours: `text` (the same as
/// `human`) and `json`.
fn parse_log_format(name: &str) -> Result<log::Format, String> {
    match name {
        "human" | "text" => Ok(log::Format::Human),
        "tag" => Ok(log::Format::Tag),
        "json" => Ok(log::Format::Json),
        _ => Err(format!(
            "'{name}' is not a log format: human (text), tag or json"
        )),
    }
}

/// `--stderr=FORMAT`'s format; None for `--stderr` alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FormatIfGiven(pub Option<log::Format>);

fn parse_log_format_or_empty(name: &str) -> Result<FormatIfGiven, String> {
    match name {
        "" => Ok(FormatIfGiven(None)),
        name => parse_log_format(name).map(|f| FormatIfGiven(Some(f))),
    }
}

/// An option name `-r` knows.
fn parse_refused_option(name: &str) -> Result<String, String> {
    if RefusedOptions::default().add(name) {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(format!(
            "'{name}' is not an option: blksize, blksize2, cookie, rollover, timeout, tsize, utimeout or windowsize"
        ))
    }
}

/// `LOW:HIGH`, 1 <= LOW <= HIGH.
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (low, high) = s
        .split_once(':')
        .ok_or_else(|| format!("'{s}' is not LOW:HIGH"))?;
    let port = |p: &str| {
        p.trim()
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| format!("'{p}' is not a port (1..=65535)"))
    };
    let (low, high) = (port(low)?, port(high)?);
    if low > high {
        return Err(format!("{low} is above {high}"));
    }
    Ok((low, high))
}

/// An octal umask, at most 0777.
fn parse_umask(text: &str) -> Result<u32, String> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{text:?} is not an octal umask (0..=0777)")),
    }
}

/// `-B/--blocksize`: a number of bytes, or the MTU less some slack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxBlksize {
    Bytes(u16),
    Mtu { slack: u32 },
}

impl MaxBlksize {
    /// The byte limit (the MTU's is applied per request).
    pub fn bytes(self) -> u16 {
        match self {
            MaxBlksize::Bytes(n) => n,
            MaxBlksize::Mtu { .. } => proto::MAX_BLKSIZE,
        }
    }
}

/// `N` (8..=65464), `mtu` or `mtu-SLACK`, as tftpd-hpa 7.3 spells them (it
/// refuses `mtu28`, `mtu-` and `mtu+5`).
fn parse_max_blksize(text: &str) -> Result<MaxBlksize, String> {
    let range = proto::MIN_BLKSIZE..=proto::MAX_BLKSIZE;
    let bad = || {
        format!(
            "{text:?} is not a block size ({}..={}), `mtu` or `mtu-SLACK`",
            range.start(),
            range.end()
        )
    };
    if text.len() >= 3 && text[..3].eq_ignore_ascii_case("mtu") {
        let slack = match &text[3..] {
            "" => 0,
            rest => {
                let digits = rest.strip_prefix('-').ok_or_else(bad)?;
                if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad());
                }
                digits.parse().map_err(|_| bad())?
            }
        };
        return Ok(MaxBlksize::Mtu { slack });
    }
    match text.parse::<u16>() {
        Ok(n) if range.contains(&n) => Ok(MaxBlksize::Bytes(n)),
        _ => Err(bad()),
    }
}

/// A byte count, optionally with a K, M or G suffix (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a size (bytes, or a number with K, M or G)");
    let (digits, shift) = match text.char_indices().last() {
        Some((i, 'k' | 'K')) => (&text[..i], 10),
        Some((i, 'm' | 'M')) => (&text[..i], 20),
        Some((i, 'g' | 'G')) => (&text[..i], 30),
        _ => (text, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// One `-a/--address` as given (tftpd-hpa's `[address][:port]`): an
/// address or a host name, and a port number or a service name, each of
/// which may be left out. Names are looked up at start
/// ([`ListenSpec::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// None: every address (dual-stack `[::]`, `0.0.0.0` under -4).
    pub host: Option<String>,
    /// None: `-S/--port`'s, else 69.
    pub port: Option<String>,
}

impl std::fmt::Display for ListenSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.host {
            Some(host) if host.contains(':') => write!(f, "[{host}]")?,
            Some(host) => f.write_str(host)?,
            None => {}
        }
        match &self.port {
            Some(port) => write!(f, ":{port}"),
            None => Ok(()),
        }
    }
}

impl ListenSpec {
    /// The socket addresses to bind: every address `host` resolves to, on
    /// the port (or service) given, else on `default_port`.
    pub fn resolve(&self, default_port: Option<&str>) -> Result<Vec<SocketAddr>, String> {
        let port = match self.port.as_deref().or(default_port) {
            None => DEFAULT_PORT,
            Some(port) => resolve_port(port)?,
        };
        let Some(host) = &self.host else {
            return Ok(vec![SocketAddr::new(
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                port,
            )]);
        };
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let hints = dns_lookup::AddrInfoHints {
            socktype: libc::SOCK_DGRAM,
            ..dns_lookup::AddrInfoHints::default()
        };
        let found = dns_lookup::getaddrinfo(Some(host), None, Some(hints))
            .map_err(|e| format!("cannot resolve the host name '{host}': {e:?}"))?;
        let mut addresses = Vec::new();
        for info in found {
            let ip = info
                .map_err(|e| format!("cannot resolve the host name '{host}': {e}"))?
                .sockaddr
                .ip();
            let addr = SocketAddr::new(ip, port);
            if !addresses.contains(&addr) {
                addresses.push(addr);
            }
        }
        if addresses.is_empty() {
            return Err(format!("the host name '{host}' has no address"));
        }
        Ok(addresses)
    }
}

/// A port number, or a UDP service name from services(5).
fn resolve_port(port: &str) -> Result<u16, String> {
    if let Ok(number) = port.parse::<u16>() {
        return Ok(number);
    }
    let hints = dns_lookup::AddrInfoHints {
        socktype: libc::SOCK_DGRAM,
        flags: libc::AI_PASSIVE,
        ..dns_lookup::AddrInfoHints::default()
    };
    let unknown = || format!("'{port}' is neither a port number nor a UDP service name");
    dns_lookup::getaddrinfo(None, Some(port), Some(hints))
        .map_err(|_| unknown())?
        .filter_map(Result::ok)
        .map(|info| info.sockaddr.port())
        .next()
        .ok_or_else(unknown)
}

/// Parses tftpd-hpa style listen addresses: `1.2.3.4`, `1.2.3.4:69`,
/// `[::1]`, `[::1]:69`, `::1`, `:6969` (all addresses, dual-stack),
/// `host`, `host:tftp`. Numbers are checked now, names at start.
pub fn parse_listen_address(text: &str) -> Result<ListenSpec, String> {
    let bad = || {
        format!(
            "'{text}' is not an address: use ADDR[:PORT], [V6ADDR][:PORT], HOST[:PORT] or :PORT \
             (PORT a number or a service name)"
        )
    };
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or_else(bad)?;
        inner.parse::<Ipv6Addr>().map_err(|_| bad())?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(bad)?),
        };
        (Some(inner), port)
    } else if text.parse::<Ipv6Addr>().is_ok() {
        // An unbracketed IPv6 address has no port.
        (Some(text), None)
    } else {
        match text.split_once(':') {
            Some((host, port)) => ((!host.is_empty()).then_some(host), Some(port)),
            None => (Some(text), None),
        }
    };
    if port.is_some_and(|p| p.is_empty() || p.contains(':'))
        || host.is_some_and(|h| h.is_empty() || h.contains(char::is_whitespace))
    {
        return Err(bad());
    }
    // A number must fit; a name is looked up at start.
    if let Some(port) = port
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_err()
    {
        return Err(bad());
    }
    Ok(ListenSpec {
        host: host.map(str::to_owned),
        port: port.map(str::to_owned),
    })
}

impl Config {
    /// Parses the command line and checks it, or prints clap's usage error
    /// and exits with status 2; then reads the files it names, or prints
    /// the error and exits with status 1. With `--check-config`, prints
    /// "ok" and what was checked, and exits 0.
    pub fn parse_checked() -> Config {
        let mut config = Config::parse();
        if let Err(e) = config.check() {
            e.exit();
        }
        match config.check_files() {
            Err(e) => {
                eprintln!("ringtftpd: {e}");
                std::process::exit(1);
            }
            Ok(summary) if config.check_config => {
                println!("ringtftpd: ok: {summary}");
                std::process::exit(0);
            }
            Ok(_) => {}
        }
        config
    }

    /// Reads and checks the files the command line names, keeping what
    /// they parse to: a one-line summary, or the error naming the file and
    /// line. The remap file is only checked: the server reads it at start
    /// and on SIGHUP; the policy file is read here (and again on SIGHUP:
    /// [`Config::reread_policy_file`]).
    pub fn check_files(&mut self) -> Result<String, String> {
        let directories = self.root_directories();
        let shown: Vec<String> = directories
            .iter()
            .map(|d| d.display().to_string())
            .collect();
        let mut checked = vec![format!(
            "command line; director{} {}",
            if shown.len() > 1 { "ies" } else { "y" },
            shown.join(" ")
        )];
        for directory in directories {
            if self.check_config && !directory.is_dir() {
                return Err(format!("{} is not a directory", directory.display()));
            }
        }
        if let Some(path) = &self.map_file {
            let rules = self.remap_rules()?.unwrap_or_default();
            checked.push(format!(
                "map file {}: {} rule(s)",
                path.display(),
                rules.len()
            ));
        }
        if let Some(path) = &self.policy_file {
            let rules = ClientRules::load(path)?;
            checked.push(format!(
                "policy file {}: {} rule(s)",
                path.display(),
                rules.len()
            ));
            self.client_rules = Some(Arc::new(rules));
        }
        Ok(checked.join("; "))
    }

    /// This configuration with its files read: itself if `check_files`
    /// ran (as `parse_checked` does), else a copy that read them.
    pub fn with_files(&self) -> Result<std::borrow::Cow<'_, Config>, String> {
        if self.policy_file.is_none() || self.client_rules.is_some() {
            return Ok(std::borrow::Cow::Borrowed(self));
        }
        let mut loaded = self.clone();
        loaded.check_files()?;
        Ok(std::borrow::Cow::Owned(loaded))
    }

    /// This configuration with the policy file read again (SIGHUP); the
    /// error names the file and the line, and changes nothing.
    pub fn reread_policy_file(&self) -> Result<std::borrow::Cow<'_, Config>, String> {
        let Some(path) = &self.policy_file else {
            return Ok(std::borrow::Cow::Borrowed(self));
        };
        let mut fresh = self.clone();
        fresh.client_rules = Some(Arc::new(ClientRules::load(path)?));
        Ok(std::borrow::Cow::Owned(fresh))
    }

    /// The innermost policy: the policy file's rules over the command
    /// line's, or the command line's alone.
    fn client_policy(&self, shards: usize) -> Arc<dyn Policy> {
        match &self.client_rules {
            Some(rules) => Arc::new(ClientPolicy::new(rules.clone(), shards)),
            None => Arc::new(DefaultPolicy),
        }
    }

    /// Rejects combinations of flags that are each in range but do not fit
    /// together (single values are bounded by their parsers).
    pub fn check(&self) -> Result<(), clap::Error> {
        let invalid =
            |why: String| Self::command().error(clap::error::ErrorKind::ValueValidation, why);
        let addresses = if self.systemd {
            Vec::new()
        } else {
            self.requested_addresses().map_err(invalid)?
        };
        let family =
            |flag: &str, want_v6: bool| match addresses.iter().find(|a| a.is_ipv6() != want_v6) {
                Some(a) => Err(Self::command().error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("{flag} with the address {a}"),
                )),
                None => Ok(()),
            };
        if self.ipv4 {
            // `[::]` (the default) means "every address": 0.0.0.0 under -4.
            let unspecified_v6 = |a: &SocketAddr| a.is_ipv6() && a.ip().is_unspecified();
            if let Some(a) = addresses.iter().find(|a| a.is_ipv6() && !unspecified_v6(a)) {
                return Err(Self::command().error(
                    clap::error::ErrorKind::ArgumentConflict,
                    format!("--ipv4 with the address {a}"),
                ));
            }
        }
        if self.ipv6 {
            family("--ipv6", true)?;
        }
        if let Some(why) = self.directories_problem() {
            return Err(Self::command().error(clap::error::ErrorKind::ValueValidation, why));
        }
        if self.rto_min_ms > self.rto_max_ms {
            return Err(Self::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                format!(
                    "--rto-min-ms ({}) is above --rto-max-ms ({})",
                    self.rto_min_ms, self.rto_max_ms
                ),
            ));
        }
        Ok(())
    }

    /// Why the directories cannot be served as given, if they cannot:
    /// several with -s/-j (tftpd-hpa refuses them too), or several of which
    /// one is not absolute (clients name files by their absolute path;
    /// tftpd-hpa 7.x refuses it too). `check` and the server ask.
    pub fn directories_problem(&self) -> Option<String> {
        use std::os::unix::ffi::OsStrExt;
        let extra = self.more_directories.first()?;
        if self.more_directories.len() >= MAX_DIRECTORIES {
            return Some(format!("more than {MAX_DIRECTORIES} directories"));
        }
        if self.secure || self.jail {
            return Some(format!(
                "several directories ({} and {}) with -s/-j: it takes one, as tftpd-hpa's",
                self.directory.display(),
                extra.display()
            ));
        }
        let every = std::iter::once(&self.directory).chain(&self.more_directories);
        every
            .filter(|dir| canonical_directory(dir.as_os_str().as_bytes()).is_none())
            .map(|dir| {
                format!(
                    "several directories: '{}' is not absolute (clients name files by \
                     their absolute path)",
                    dir.display()
                )
            })
            .next()
    }

    /// What tftpd-hpa flags given here do not do in ringtftpd, one line
    /// each, for start-up to print.
    pub fn compat_warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.systemd && !self.addresses.is_empty() {
            warnings.push(
                "--address: ignored under --systemd: the sockets come from the socket unit"
                    .to_string(),
            );
        }
        warnings
    }

    /// The most detailed level logged: info, debug with -v or
    /// `--verbosity 1`, trace with -vv or `--verbosity 2` and up.
    pub fn log_level(&self) -> tracing::Level {
        match u32::from(self.verbose).max(self.verbosity.unwrap_or(0)) {
            0 => tracing::Level::INFO,
            1 => tracing::Level::DEBUG,
            _ => tracing::Level::TRACE,
        }
    }

    /// Where log lines go and how: `background` says the server runs
    /// detached or under inetd, with no terminal to write to.
    pub fn log_target(&self, background: bool) -> (log::Target, log::Format) {
        let (target, format) = if let Some(FormatIfGiven(format)) = self.stderr {
            (log::Target::Stderr, format)
        } else if let Some(FormatIfGiven(format)) = self.stdout {
            (log::Target::Stdout, format)
        } else if let Some(path) = &self.logfile {
            (log::Target::File(path.clone()), None)
        } else if self.syslog || background {
            (log::Target::Syslog, None)
        } else {
            (log::Target::Stderr, None)
        };
        (target, format.or(self.logformat).unwrap_or_default())
    }

    /// How long the server may go idle before it exits (None: never);
    /// `inherited`: its sockets came from inetd or systemd.
    pub fn idle_exit(&self, inherited: bool) -> Option<Duration> {
        let secs = self
            .idle_timeout
            .unwrap_or(if inherited { INHERITED_IDLE_SECS } else { 0 });
        (secs > 0).then(|| Duration::from_secs(secs))
    }

    /// The addresses to listen on, after -4: `[::]:p` is `0.0.0.0:p`.
    pub fn listen_addresses(&self) -> Result<Vec<SocketAddr>, String> {
        Ok(self
            .requested_addresses()?
            .into_iter()
            .map(|a| match a {
                SocketAddr::V6(v6) if self.ipv4 && v6.ip().is_unspecified() => {
                    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), a.port())
                }
                _ => a,
            })
            .collect())
    }

    /// Every `--address` resolved (host and service names looked up).
    fn requested_addresses(&self) -> Result<Vec<SocketAddr>, String> {
        let every = [ListenSpec {
            host: None,
            port: None,
        }];
        let specs = if self.addresses.is_empty() {
            &every[..]
        } else {
            &self.addresses
        };
        let mut addresses = Vec::new();
        for spec in specs {
            for addr in spec.resolve(self.service.as_deref())? {
                if !addresses.contains(&addr) {
                    addresses.push(addr);
                }
            }
        }
        Ok(addresses)
    }

    pub fn limits(&self) -> Limits {
        let rto_min = Duration::from_millis(self.rto_min_ms);
        let rto_max = Duration::from_millis(self.rto_max_ms).max(rto_min);
        Limits {
            max_blksize: self.max_blksize.bytes(),
            max_windowsize: self.max_windowsize,
            // `-B mtu` asks for the clamp whatever --no-mtu-clamp says.
            mtu_clamp: !self.no_mtu_clamp || matches!(self.max_blksize, MaxBlksize::Mtu { .. }),
            mtu_slack: match self.max_blksize {
                MaxBlksize::Mtu { slack } => slack,
                MaxBlksize::Bytes(_) => 0,
            },
            max_window_bytes: self.window_bytes,
            initial_rto: Duration::from_millis(self.initial_rto_ms()).clamp(rto_min, rto_max),
            rto_min,
            rto_max,
            retries: self.retries,
            max_stall: Duration::from_secs(self.max_stall_secs),
            min_give_up: Limits::default().min_give_up,
        }
    }

    /// What write requests may do; `None`: none is taken.
    pub fn upload_rules(&self) -> Option<UploadRules> {
        if self.read_only || !(self.create || self.overwrite) {
            return None;
        }
        Some(UploadRules {
            create: self.create,
            overwrite_any: self.overwrite,
            umask: self.umask,
            max_size: self.max_upload,
        })
    }

    /// The settings in force, in one line for the start-up log (flags as
    /// they are spelled, values as they are used).
    pub fn effective(&self) -> String {
        let limits = self.limits();
        let blksize = match self.max_blksize {
            MaxBlksize::Bytes(n) => n.to_string(),
            MaxBlksize::Mtu { slack: 0 } => "mtu".to_string(),
            MaxBlksize::Mtu { slack } => format!("mtu-{slack}"),
        };
        let uploads = match self.upload_rules() {
            None => "off".to_string(),
            Some(u) => format!(
                "{}{} umask={:03o} max-upload={}",
                if u.create { "create" } else { "existing" },
                if u.overwrite_any { ",overwrite" } else { "" },
                u.umask,
                u.max_size.map_or("none".to_string(), |n| n.to_string()),
            ),
        };
        let refused = if self.refuse_all {
            "all".to_string()
        } else if self.refuse.is_empty() {
            "none".to_string()
        } else {
            self.refuse.join(",")
        };
        let file = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or("none".into(), |p| p.display().to_string())
        };
        format!(
            "config: max-blksize={blksize} mtu-clamp={} max-windowsize={} first-contact-windowsize={} \
             window-bytes={} retries={} rto-ms={}..{} initial-rto-ms={} max-stall-secs={} \
             max-sessions={} busy-patience-ms={} max-per-client={} request-rate={} refusal-rate={} \
             uploads={uploads} \
             refuse={refused} port-range={} single-port={} map-file={} policy-file={} \
             permissive={} shutdown-grace={}",
            !self.no_mtu_clamp,
            self.max_windowsize,
            self.first_contact_windowsize,
            self.window_bytes,
            limits.retries,
            limits.rto_min.as_millis(),
            limits.rto_max.as_millis(),
            limits.initial_rto.as_millis(),
            self.max_stall_secs,
            self.max_sessions,
            self.busy_patience_ms,
            self.max_per_client,
            self.request_rate,
            self.refusal_rate,
            self.port_range
                .map_or("any".to_string(), |(lo, hi)| format!("{lo}:{hi}")),
            self.single_port,
            file(&self.map_file),
            file(&self.policy_file),
            self.permissive,
            self.shutdown_grace,
        )
    }

    /// `--initial-rto-ms`, or `-T` in whole milliseconds.
    fn initial_rto_ms(&self) -> u64 {
        self.retransmit_us
            .map_or(self.initial_rto_ms, |us| us.div_ceil(1000))
    }

    /// `-r` and `--refuse-all` together.
    pub fn refused_options(&self) -> RefusedOptions {
        if self.refuse_all {
            return RefusedOptions::ALL;
        }
        let mut refused = RefusedOptions::default();
        for name in &self.refuse {
            refused.add(name);
        }
        refused
    }

    /// The remap rules of `--map-file`, read and parsed now (at start and
    /// on SIGHUP); the error names the file and the line.
    pub fn remap_rules(&self) -> Result<Option<RemapRules>, String> {
        let Some(path) = &self.map_file else {
            return Ok(None);
        };
        let text = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        RemapRules::parse_bytes(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The directory served: `--path-prefix` joined with the directory.
    pub fn root_directory(&self) -> PathBuf {
        self.prefixed(&self.directory)
    }

    /// Every directory served, the first first, each joined to
    /// `--path-prefix` (tftpd-hpa 7.x prepends it after validation).
    pub fn root_directories(&self) -> Vec<PathBuf> {
        std::iter::once(&self.directory)
            .chain(&self.more_directories)
            .map(|d| self.prefixed(d))
            .collect()
    }

    fn prefixed(&self, directory: &Path) -> PathBuf {
        match &self.path_prefix {
            // Joined as strings, as tftpd-hpa does: the directory is
            // absolute, and must not replace the prefix.
            Some(prefix) => {
                let mut joined = prefix.clone().into_os_string();
                joined.push(directory.as_os_str());
                PathBuf::from(joined)
            }
            None => directory.to_path_buf(),
        }
    }

    /// What happens to a name between the remap rules and the open.
    pub fn path_rules(&self) -> PathRules {
        use std::os::unix::ffi::OsStrExt;
        PathRules {
            normalize: self.normalize.unwrap_or_default(),
            validate: self.validate,
            directory: if self.secure || self.jail {
                None
            } else {
                canonical_directory(self.directory.as_os_str().as_bytes())
            },
            // `directories_problem` refuses -s/-j and relative names with
            // several, so each keeps its index (the first is index 0).
            more_directories: self
                .more_directories
                .iter()
                .filter(|_| !(self.secure || self.jail))
                .filter_map(|d| canonical_directory(d.as_os_str().as_bytes()))
                .collect(),
        }
    }

    /// The policy chain: remap rules (asking `probe` for `E` rules), then
    /// the path rules, then the policy file's rules over the command
    /// line's ([`DefaultPolicy`] without one): the policy file matches the
    /// name as rewritten and normalized.
    pub fn policy(
        &self,
        shards: usize,
        rules: Option<RemapRules>,
        probe: Arc<NameProbe>,
    ) -> Arc<dyn Policy> {
        let mut inner = self.client_policy(shards);
        let path_rules = self.path_rules();
        if path_rules.is_active() {
            inner = Arc::new(PathPolicy {
                rules: path_rules,
                inner,
            });
        }
        match rules {
            Some(rules) => Arc::new(RemapPolicy {
                rules,
                max_steps: self.map_steps as usize,
                probe: Some(probe),
                inner,
            }),
            None => inner,
        }
    }

    /// The settings of one of `shards` shards, with no remap rules (the
    /// policy file's, once `check_files` read it).
    pub fn settings(&self, shards: usize) -> Settings {
        self.settings_with(shards, self.client_policy(shards))
    }

    /// The settings of one of `shards` shards under `policy`: what a
    /// reload may change.
    pub fn settings_with(&self, shards: usize, policy: Arc<dyn Policy>) -> Settings {
        let shards = shards.max(1) as u32;
        Settings {
            limits: self.limits(),
            error_replies_per_sec: self.error_rate,
            error_reply_burst: self.error_rate.max(1),
            open_cache_ttl: Duration::from_millis(self.open_cache_ms),
            max_sessions_per_client: self.max_per_client.div_ceil(shards) as usize,
            requests_per_sec_per_client: self.request_rate,
            request_burst_per_client: self.request_rate.saturating_mul(4),
            refusal_replies_per_sec: self.refusal_rate,
            busy_patience: Duration::from_millis(self.busy_patience_ms),
            first_contact_windowsize: self.first_contact_windowsize,
            uploads: self.upload_rules().is_some(),
            max_upload: self.max_upload,
            refused_options: self.refused_options(),
            // Derived from the chain: whichever policy reads MACs says so.
            lookup_mac: policy.needs_mac(),
            policy,
        }
    }

    /// The endpoint configuration of one of `shards` shards.
    pub fn endpoint(&self, shards: usize, settings: Settings) -> EndpointConfig {
        EndpointConfig {
            max_sessions: self.max_sessions.div_ceil(shards.max(1) as u32) as usize,
            // The driver lowers it to what its receive buffers hold.
            max_upload_blksize: self.max_blksize.bytes(),
            single_port: self.single_port,
            settings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse_like_tftpd_hpa() {
        let p = |s, port| {
            let spec = parse_listen_address(s).unwrap();
            let addrs = spec.resolve(port).unwrap();
            addrs
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(p("127.0.0.1:6969", None), "127.0.0.1:6969");
        assert_eq!(p("127.0.0.1", None), "127.0.0.1:69");
        assert_eq!(p("127.0.0.1", Some("7000")), "127.0.0.1:7000");
        assert_eq!(p("127.0.0.1:6969", Some("7000")), "127.0.0.1:6969");
        assert_eq!(p("[::1]:6969", None), "[::1]:6969");
        assert_eq!(p("[::1]", None), "[::1]:69");
        assert_eq!(p("::1", None), "[::1]:69");
        assert_eq!(p(":6969", None), "[::]:6969");
        // Names, from /etc/hosts and /etc/services as tftpd-hpa looks them up
        // (no name here may need DNS: tests stay off the network).
        assert!(p("localhost:6969", None).contains("127.0.0.1:6969"));
        if std::fs::read_to_string("/etc/services").is_ok_and(|s| s.contains("tftp")) {
            assert_eq!(p("127.0.0.1:tftp", None), "127.0.0.1:69");
            assert_eq!(p(":tftp", None), "[::]:69");
        }
        assert!(
            parse_listen_address("127.0.0.1:no-such-service")
                .unwrap()
                .resolve(None)
                .is_err()
        );
        for bad in [
            "1.2.3.4:99999",
            "[::1",
            "[nonsense]:69",
            "a:",
            "a b",
            "[::1]x",
            "",
        ] {
            assert!(parse_listen_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_effective_configuration_names_what_the_flags_changed() {
        let line = Config::parse_from(["ringtftpd", "/tmp"]).effective();
        for part in [
            "max-blksize=65464 ",
            "uploads=off ",
            "refuse=none ",
            "port-range=any ",
        ] {
            assert!(line.contains(part), "{part} in {line}");
        }
        let line = Config::parse_from([
            "ringtftpd",
            "-B",
            "mtu-28",
            "-c",
            "-U",
            "022",
            "--max-upload",
            "1M",
            "-r",
            "tsize",
            "-R",
            "4000:4010",
            "/tmp",
        ])
        .effective();
        for part in [
            "max-blksize=mtu-28 ",
            "uploads=create umask=022 max-upload=1048576 ",
            "refuse=tsize ",
            "port-range=4000:4010 ",
        ] {
            assert!(line.contains(part), "{part} in {line}");
        }
    }

    #[test]
    fn refused_options_are_named_as_in_tftpd_hpa() {
        let c = parse(&["-r", "blksize", "--refuse", "TSIZE", "--reject", "rollover"]).unwrap();
        let r = c.refused_options();
        assert!(r.blksize && r.tsize && r.rollover && !r.timeout && !r.windowsize);
        assert!(!r.blksize2 && !r.utimeout && !r.cookie);
        let hpa = parse(&["-r", "utimeout", "-r", "Cookie", "-r", "blksize2"])
            .unwrap()
            .refused_options();
        assert!(hpa.utimeout && hpa.cookie && hpa.blksize2 && !hpa.blksize && !hpa.timeout);
        assert!(parse(&["-r", "bogus"]).is_err());
        assert_eq!(c.settings(1).refused_options, r);
        assert_eq!(
            parse(&["--refuse-all"]).unwrap().refused_options(),
            RefusedOptions::ALL
        );
        assert_eq!(
            parse(&[]).unwrap().refused_options(),
            RefusedOptions::default()
        );
        assert!(parse(&["-r", "nonsense"]).is_err());
    }

    #[test]
    fn ipv4_and_ipv6_only_as_in_tftpd_hpa() {
        let c = parse(&["-4"]).unwrap();
        assert_eq!(
            c.listen_addresses().unwrap(),
            ["0.0.0.0:69".parse().unwrap()]
        );
        let c = parse(&["--ipv4", "-a", ":6969", "-a", "127.0.0.1:70"]).unwrap();
        assert_eq!(
            c.listen_addresses().unwrap(),
            [
                "0.0.0.0:6969".parse().unwrap(),
                "127.0.0.1:70".parse().unwrap()
            ]
        );
        assert!(parse(&["-4", "-a", "[::1]:69"]).is_err());
        let c = parse(&["-6"]).unwrap();
        assert_eq!(c.listen_addresses().unwrap(), ["[::]:69".parse().unwrap()]);
        let c = parse(&["-S", "7000", "-a", "127.0.0.1", "-a", ":7001"]).unwrap();
        assert_eq!(
            c.listen_addresses().unwrap(),
            [
                "127.0.0.1:7000".parse().unwrap(),
                "[::]:7001".parse().unwrap()
            ]
        );
        assert!(parse(&["-6", "-a", "127.0.0.1"]).is_err());
        assert!(parse(&["-4", "-6"]).is_err());
    }

    #[test]
    fn flags_ringtftpd_cannot_honour_are_accepted_with_a_warning() {
        assert!(parse(&[]).unwrap().compat_warnings().is_empty());
        let c = parse(&["-vvv", "--systemd", "-a", "127.0.0.1:69"]).unwrap();
        let w = c.compat_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("--address: ignored"));
        assert!(parse(&["--systemd"]).unwrap().compat_warnings().is_empty());
        assert!(parse(&["-v"]).unwrap().compat_warnings().is_empty());
        assert!(parse(&["-l"]).unwrap().compat_warnings().is_empty());
    }

    #[test]
    fn v_and_verbosity_raise_the_log_level_as_tftpd_hpa() {
        use tracing::Level;
        let level = |args: &[&str]| parse(args).unwrap().log_level();
        assert_eq!(level(&[]), Level::INFO);
        assert_eq!(level(&["-v"]), Level::DEBUG);
        assert_eq!(level(&["-vv"]), Level::TRACE);
        assert_eq!(level(&["-v", "-v", "-v"]), Level::TRACE);
        assert_eq!(level(&["--verbosity", "0"]), Level::INFO);
        assert_eq!(level(&["--verbosity", "1"]), Level::DEBUG);
        assert_eq!(level(&["--verbosity", "7"]), Level::TRACE);
        assert_eq!(level(&["-v", "--verbosity", "0"]), Level::DEBUG);
    }

    #[test]
    fn port_ranges_parse_like_tftpd_hpa() {
        assert_eq!(parse_port_range("40000:40100"), Ok((40000, 40100)));
        assert_eq!(parse_port_range("69:69"), Ok((69, 69)));
        for bad in ["40100:40000", "0:10", "1:65536", "40000", "a:b", ":"] {
            assert!(parse_port_range(bad).is_err(), "{bad}");
        }
        let c = Config::try_parse_from(["ringtftpd", "-R", "5000:5010", "/tmp"]).unwrap();
        assert_eq!(c.port_range, Some((5000, 5010)));
        let c = Config::try_parse_from(["ringtftpd", "--port-range", "1:2", "/tmp"]).unwrap();
        assert_eq!(c.port_range, Some((1, 2)));
        assert!(Config::try_parse_from(["ringtftpd", "-R", "9:8", "/tmp"]).is_err());
    }

    #[test]
    fn single_port_conflicts_with_a_port_range() {
        let c = parse(&["--single-port"]).unwrap();
        assert!(c.single_port && c.endpoint(2, c.settings(2)).single_port);
        assert!(!{
            let c = parse(&[]).unwrap();
            c.endpoint(1, c.settings(1)).single_port
        });
        rejected(&["--single-port", "-R", "5000:5010"], "--single-port");
    }

    #[test]
    fn defaults_and_repeated_addresses() {
        let c = Config::parse_from(["ringtftpd", "/tmp"]);
        assert_eq!(c.listen_addresses().unwrap(), ["[::]:69".parse().unwrap()]);
        let c = Config::parse_from([
            "ringtftpd",
            "-a",
            "127.0.0.1:1",
            "--address",
            "[::1]:2",
            "-l",
            "-s",
            "/tmp",
        ]);
        assert_eq!(c.addresses.len(), 2);
        assert_eq!(c.directory, PathBuf::from("/tmp"));
        assert!(Config::try_parse_from(["ringtftpd", "--max-blksize", "7", "/tmp"]).is_err());
        assert!(Config::try_parse_from(["ringtftpd", "--max-windowsize", "0", "/tmp"]).is_err());
        assert_eq!(c.endpoint(3, c.settings(3)).max_sessions, 6667);
    }

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        let mut argv = vec!["ringtftpd"];
        argv.extend_from_slice(args);
        argv.push("/tmp");
        let c = Config::try_parse_from(argv)?;
        c.check()?;
        Ok(c)
    }

    /// The message of a rejected command line, checked to name `flag`.
    #[track_caller]
    fn rejected(args: &[&str], flag: &str) {
        match parse(args) {
            Ok(c) => panic!("{args:?} accepted: {c:?}"),
            Err(e) => {
                let text = e.to_string();
                assert!(text.contains(flag), "{args:?}: {text}");
            }
        }
    }

    #[test]
    fn log_targets_as_in_tftpd_hpa() {
        use log::{Format, Target};
        let t = |args: &[&str], background| parse(args).unwrap().log_target(background);
        assert_eq!(t(&[], false), (Target::Stderr, Format::Human));
        assert_eq!(t(&[], true), (Target::Syslog, Format::Human));
        assert_eq!(t(&["--stderr"], true), (Target::Stderr, Format::Human));
        assert_eq!(t(&["--stderr=tag"], true), (Target::Stderr, Format::Tag));
        assert_eq!(
            t(&["--stdout", "--logformat", "tag"], false),
            (Target::Stdout, Format::Tag)
        );
        assert_eq!(
            t(&["--logfile", "/var/log/x"], false),
            (Target::File("/var/log/x".into()), Format::Human)
        );
        assert_eq!(t(&["--syslog"], false), (Target::Syslog, Format::Human));
        assert!(parse(&["--syslog", "--stderr"]).is_err(), "one target");
        assert_eq!(
            t(&["--log-format", "json"], false),
            (Target::Stderr, Format::Json)
        );
        assert_eq!(t(&["--stderr=json"], true), (Target::Stderr, Format::Json));
        assert!(parse(&["--stderr=xml"]).is_err());
    }

    #[test]
    fn idle_exit_defaults_as_in_tftpd_hpa() {
        let standalone = parse(&[]).unwrap();
        assert_eq!(standalone.idle_exit(false), None);
        assert_eq!(standalone.idle_exit(true), Some(Duration::from_secs(900)));
        let t = parse(&["-t", "30"]).unwrap();
        assert_eq!(t.idle_exit(false), Some(Duration::from_secs(30)));
        assert_eq!(parse(&["-t", "0"]).unwrap().idle_exit(true), None);
        assert!(parse(&["-t", "99999999"]).is_err());
    }

    #[test]
    fn numeric_flags_are_bounded() {
        // Each at its maximum is accepted ...
        let c = parse(&[
            "--rto-min-ms",
            "60000",
            "--rto-max-ms",
            "60000",
            "--initial-rto-ms",
            "60000",
            "--retries",
            "100",
            "--shutdown-grace",
            "3600",
            "--open-cache-ms",
            "3600000",
            "--max-sessions",
            "1048576",
            "--threads",
            "1024",
            "--rcvbuf",
            "1073741824",
            "--error-rate",
            "1000000",
        ])
        .expect("maxima accepted");
        // ... and builds durations that an Instant can take.
        let l = c.limits();
        let now = std::time::Instant::now();
        let _ = now + l.initial_rto * (l.retries + 1) + l.rto_max * (l.retries + 1);
        let _ = now + c.settings(1).open_cache_ttl + Duration::from_secs(c.shutdown_grace);
        // ... one past it is refused, naming the flag.
        for (flag, value) in [
            ("--rto-min-ms", "60001"),
            ("--rto-max-ms", "60001"),
            ("--initial-rto-ms", "18446744073709551615"),
            ("--initial-rto-ms", "0"),
            ("--retries", "101"),
            ("--shutdown-grace", "3601"),
            ("--shutdown-grace", "18446744073709551615"),
            ("--open-cache-ms", "3600001"),
            ("--max-sessions", "1048577"),
            ("--max-sessions", "0"),
            ("--threads", "1025"),
            ("--threads", "0"),
            ("--rcvbuf", "1073741825"),
            ("--error-rate", "1000001"),
        ] {
            rejected(&[flag, value], flag);
        }
        rejected(&["--retries=-1"], "--retries");
    }

    #[test]
    fn blocksize_takes_bytes_or_mtu_less_slack_as_tftpd_hpa_7() {
        let limits = |args: &[&str]| parse(args).unwrap().limits();
        let l = limits(&["-B", "1468"]);
        assert_eq!((l.max_blksize, l.mtu_clamp, l.mtu_slack), (1468, true, 0));
        for (arg, slack) in [
            ("mtu", 0),
            ("MTU", 0),
            ("mtu-28", 28),
            ("mtu-0", 0),
            ("mtu-2000", 2000),
        ] {
            let l = limits(&["--blocksize", arg, "--no-mtu-clamp"]);
            assert_eq!(
                (l.max_blksize, l.mtu_clamp, l.mtu_slack),
                (65464, true, slack),
                "{arg}"
            );
        }
        // The spellings tftpd-hpa 7.3 refuses.
        for bad in ["mtu28", "mtu-", "mtu+5", "mtu-x", "7", "65465", "-1"] {
            assert!(parse(&["-B", bad]).is_err(), "{bad}");
        }
        assert!(!limits(&["--no-mtu-clamp"]).mtu_clamp);
    }

    #[test]
    fn window_bytes_default_to_4_mib_and_take_suffixes() {
        let bytes = |args: &[&str]| parse(args).unwrap().limits().max_window_bytes;
        assert_eq!(bytes(&[]), 4 << 20);
        assert_eq!(bytes(&["--window-bytes", "0"]), 0);
        assert_eq!(bytes(&["--window-bytes", "1k"]), 1024);
        assert_eq!(bytes(&["--window-bytes", "2M"]), 2 << 20);
        assert!(parse(&["--window-bytes", "-1"]).is_err());
        assert!(parse(&["--window-bytes", "1kb"]).is_err());
    }

    #[test]
    fn upload_flags_turn_uploads_on_and_read_only_wins() {
        assert_eq!(parse(&[]).unwrap().upload_rules(), None, "off by default");
        let r = parse(&["-c", "-U", "022", "--max-upload", "2M"])
            .unwrap()
            .upload_rules()
            .expect("on with -c");
        assert!(r.create && !r.overwrite_any);
        assert_eq!((r.umask, r.max_size), (0o022, Some(2 << 20)));
        let r = parse(&["--overwrite"]).unwrap().upload_rules().unwrap();
        assert!(!r.create && r.overwrite_any);
        assert_eq!(parse(&["-c", "--ro"]).unwrap().upload_rules(), None);
        assert_eq!(parse(&["-c", "--read-only"]).unwrap().upload_rules(), None);
        let c = parse(&["--max-size", "1000", "-c"]).unwrap();
        assert_eq!(c.max_upload, Some(1000));
        assert_eq!(c.settings(1).max_upload, Some(1000));
        assert!(c.settings(1).uploads);
        rejected(&["-U", "999"], "umask");
        rejected(&["--max-upload", "12Q"], "--max-upload");
        rejected(&["--max-upload", "99999999999G"], "--max-upload");
    }

    #[test]
    fn a_policy_file_is_read_by_check_files_and_becomes_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(
            &file,
            "[[rule]]\nmac = \"52:54:00:*\"\nmax_blksize = 1024\n",
        )
        .unwrap();
        let mut c = parse(&["--policy-file", file.to_str().unwrap()]).unwrap();
        // Not read before check_files: no rules, no MAC lookups.
        assert!(c.client_rules.is_none() && !c.settings(1).lookup_mac);
        let summary = c.check_files().unwrap();
        assert!(summary.ends_with("p.toml: 1 rule(s)"), "{summary}");
        assert!(c.settings(2).lookup_mac);
        assert!(format!("{:?}", c.settings(2).policy).starts_with("ClientPolicy"));
        // Without the file: the command line's policy, no lookups.
        let mut plain = parse(&[]).unwrap();
        plain.check_files().unwrap();
        assert!(!plain.settings(1).lookup_mac);
        assert_eq!(format!("{:?}", plain.settings(1).policy), "DefaultPolicy");
        std::fs::write(&file, "[[rule]]\nmac = \"52:54\"\n").unwrap();
        let mut bad = parse(&["--policy-file", file.to_str().unwrap()]).unwrap();
        let e = bad.check_files().unwrap_err();
        assert!(e.contains("p.toml: rule 1, line 2, column 7: mac:"), "{e}");
    }

    #[test]
    fn inconsistent_rto_bounds_are_refused() {
        rejected(
            &["--rto-min-ms", "500", "--rto-max-ms", "400"],
            "--rto-min-ms",
        );
        rejected(&["--rto-max-ms", "1"], "--rto-max-ms"); // default floor 2
        let c = parse(&["--rto-min-ms", "400", "--rto-max-ms", "400"]).expect("equal bounds");
        assert_eq!(c.limits().rto_min, c.limits().rto_max);
        // An initial RTO outside the bounds is clamped into them.
        let c = parse(&["--rto-min-ms", "2000"]).expect("floor above the initial RTO");
        assert_eq!(c.limits().initial_rto, Duration::from_millis(2000));
        let c = parse(&["--rto-max-ms", "500"]).expect("ceiling below the initial RTO");
        assert_eq!(c.limits().initial_rto, Duration::from_millis(500));
        let d = parse(&[]).expect("defaults");
        assert_eq!(d.limits().initial_rto, Duration::from_millis(1000));
        // tftpd-hpa's -T, in microseconds.
        let t = parse(&["-T", "250000"]).expect("-T");
        assert_eq!(t.limits().initial_rto, Duration::from_millis(250));
        let t = parse(&["--retransmit", "1500"]).expect("--retransmit");
        assert_eq!(t.limits().initial_rto, Duration::from_millis(2)); // 1.5 ms, raised to the floor
        assert!(parse(&["-T", "1000", "--initial-rto-ms", "5"]).is_err());
        assert_eq!(parse(&["-W", "8"]).unwrap().max_windowsize, 8);
        assert_eq!(parse(&["--windowsize", "9"]).unwrap().max_windowsize, 9);
    }
}
