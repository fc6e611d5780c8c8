//! `loadtest`: a TFTP load generator that verifies every byte.
//!
//! Runs N RRQ transfers (octet mode, each from its own UDP socket) with at most C in flight,
//! checks each against the expected file content and the OACK, and reports throughput,
//! latency percentiles and client CPU, as a table or one JSON line. With `--put` it runs N
//! uploads (WRQ) instead, each to its own name `PREFIX<i>`, of a deterministic pattern derived
//! from that name (`pattern`), so whoever can read the server's directory can check them (the
//! `compare` harness does); an upload counts as complete when the final ACK arrives. Exit
//! status: 0 when every transfer completed (and matched), 1 when any failed, 2 on a usage or
//! setup error.
//!
//! Layout: `wire` (client-side codec), `client` (one download, sans-IO), `upload` (one
//! upload, sans-IO), `pattern` (upload content), `driver` (the epoll loop, the default
//! "batched" client style), `independent` (`--client-style independent`: a blocking,
//! connected socket per client thread), `stats` (counters, histograms, report).
#![forbid(unsafe_code)]

mod client;
mod driver;
mod independent;
mod pattern;
mod stats;
mod upload;
mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage, setrlimit};
use nix::sys::time::TimeValLike;

use client::ClientConfig;
use driver::{FileSpec, PutSpec, RunConfig};
use stats::{Cpu, Report, RunInfo, Stats};
use wire::RequestOptions;

#[derive(Parser, Debug)]
#[command(
    name = "loadtest",
    about = "TFTP load generator: N verified RRQ transfers, at most C in flight",
    after_help = "Examples:\n  loadtest --server 127.0.0.1:6969 --file f64k --expect /srv/tftp/f64k -n 1000 -c 200 --blksize 1468\n  loadtest --server 127.0.0.1:6969 --put --put-size 1M --put-prefix up-1- -n 200 -c 50 --blksize 1428"
)]
struct Args {
    /// Server address (its listening port).
    #[arg(long)]
    server: SocketAddr,
    /// Upload instead: transfer i writes --put-size bytes to PREFIX<i> (see --put-prefix).
    #[arg(long, requires = "put_size", conflicts_with_all = ["file", "files", "expect", "expect_dir"])]
    put: bool,
    /// Bytes per upload, with an optional K, M or G suffix (powers of 1024).
    #[arg(long, value_parser = parse_size)]
    put_size: Option<u64>,
    /// Remote name of upload i: this prefix followed by i. Pick one per run so that no
    /// upload replaces another's file.
    #[arg(long, default_value = "up-")]
    put_prefix: String,
    /// Remote file name to fetch.
    #[arg(long, conflicts_with = "files")]
    file: Option<String>,
    /// Several remote files, comma-separated; transfer i fetches file i % k.
    #[arg(long, value_delimiter = ',')]
    files: Vec<String>,
    /// Local copy of the expected content (with --file).
    #[arg(long, conflicts_with = "expect_dir")]
    expect: Option<PathBuf>,
    /// Directory holding the expected content of each file under the same name.
    #[arg(long)]
    expect_dir: Option<PathBuf>,
    /// Number of transfers.
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    n: u64,
    /// Transfers in flight at once.
    #[arg(short = 'c', long = "concurrency", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    concurrency: u64,
    /// Request this blksize (RFC 2348).
    #[arg(long, value_parser = clap::value_parser!(u16).range(8..=65464))]
    blksize: Option<u16>,
    /// Request this windowsize (RFC 7440).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    windowsize: Option<u16>,
    /// Request tsize (RFC 2349); the granted value must equal the file length.
    #[arg(long)]
    tsize: bool,
    /// Client retransmit timeout in seconds (the first one, with --backoff).
    #[arg(long, default_value_t = 1.0)]
    timeout: f64,
    /// Retransmissions without progress before a transfer fails with "timed out".
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// Exponential backoff with jitter: timeout × 1, 2, 4, 8, 8, … (like PXE ROMs).
    #[arg(long)]
    backoff: bool,
    /// Ask the server for this retransmit timeout via the RFC 2349 `timeout` option.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..))]
    opt_timeout: Option<u8>,
    /// Print one JSON line instead of the table.
    #[arg(long)]
    json: bool,
    /// Seed for the retransmit jitter.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Abort the run (failing what is in flight) after this many seconds.
    #[arg(long)]
    max_time: Option<f64>,
    /// Abort the run (failing what is in flight, launching no more) when nothing at all has
    /// been received for this many seconds: a server that hung.
    #[arg(long)]
    stall: Option<f64>,
    /// Drop each datagram sent or received with this probability (0..1), to exercise
    /// retransmission on a lossless loopback.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// How the clients behave. batched: one thread, epoll over every socket, the DATA of
    /// all ready sockets taken per wake-up and their ACKs sent together. independent: one
    /// thread per client (at most 4096) with a blocking socket, connect(2)ed to the server's
    /// TID after its first reply, one recv per wake-up, each ACK sent at once, a fresh port
    /// per transfer; downloads only, no --loss (see src/independent.rs).
    #[arg(long, value_enum, default_value_t = ClientStyle::Batched)]
    client_style: ClientStyle,
    /// Each download first asks for this file, which must be missing (ERROR 1), then for
    /// its own, from the same port, as iPXE asks for autoexec.ipxe (batched style only).
    #[arg(long, conflicts_with = "put")]
    probe_missing: Option<String>,
    /// Adds the recorded time-to-first-DATA histogram to the JSON report
    /// (`first_data_us_hist`: [microseconds, count] pairs), so that runs split over several
    /// processes can be merged.
    #[arg(long, requires = "json")]
    first_data_hist: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ClientStyle {
    Batched,
    Independent,
}

impl ClientStyle {
    fn name(self) -> &'static str {
        match self {
            ClientStyle::Batched => "batched",
            ClientStyle::Independent => "independent",
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::from(2)
        }
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (digits, mult) = match s.as_bytes().last() {
        Some(b'K' | b'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&s[..s.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(mult))
        .ok_or_else(|| format!("bad size {s:?} (bytes, or with a K, M or G suffix)"))
}

fn seconds(what: &str, s: f64) -> Result<Duration, String> {
    if !s.is_finite() || s <= 0.0 || s > 1e6 {
        return Err(format!(
            "{what} must be a positive number of seconds, got {s}"
        ));
    }
    Ok(Duration::from_secs_f64(s))
}

fn read_expected(path: &Path) -> Result<Arc<[u8]>, String> {
    std::fs::read(path)
        .map(Arc::from)
        .map_err(|e| format!("cannot read expected content {}: {e}", path.display()))
}

fn load_files(args: &Args) -> Result<Vec<FileSpec>, String> {
    let names: Vec<String> = match &args.file {
        Some(f) => vec![f.clone()],
        None => args.files.clone(),
    };
    if names.is_empty() {
        return Err("give --file NAME or --files A,B,C".into());
    }
    for n in &names {
        if n.is_empty() || n.contains('\0') || n.len() > 400 {
            return Err(format!("bad remote file name {n:?}"));
        }
    }
    match (&args.expect, &args.expect_dir) {
        (Some(p), None) => {
            if names.len() != 1 {
                return Err("--expect takes one file; use --expect-dir with --files".into());
            }
            Ok(vec![FileSpec {
                name: names[0].as_str().into(),
                content: read_expected(p)?,
            }])
        }
        (None, Some(dir)) => names
            .iter()
            .map(|n| {
                Ok(FileSpec {
                    name: n.as_str().into(),
                    content: read_expected(&dir.join(n))?,
                })
            })
            .collect(),
        _ => Err("give --expect PATH or --expect-dir DIR: every byte is checked".into()),
    }
}

/// Lifts the soft descriptor limit to the hard one: each transfer holds a socket.
fn raise_nofile(needed: u64) -> Result<(), String> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("getrlimit: {e}"))?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(|e| format!("setrlimit: {e}"))?;
    }
    if hard < needed {
        eprintln!(
            "loadtest: warning: descriptor limit {hard} is below the {needed} needed; \
             transfers beyond it fail as 'local'"
        );
    }
    Ok(())
}

fn cpu_now() -> Result<Cpu, String> {
    let u = getrusage(UsageWho::RUSAGE_SELF).map_err(|e| format!("getrusage: {e}"))?;
    let d = |tv: nix::sys::time::TimeVal| {
        Duration::from_micros(u64::try_from(tv.num_microseconds()).unwrap_or(0))
    };
    Ok(Cpu {
        user: d(u.user_time()),
        sys: d(u.system_time()),
    })
}

fn run(args: &Args) -> Result<bool, String> {
    let put = match (args.put, args.put_size) {
        (true, Some(size)) => {
            let p = &args.put_prefix;
            if p.contains('\0') || p.len() > 300 {
                return Err(format!("bad --put-prefix {p:?}"));
            }
            Some(PutSpec {
                prefix: p.as_str().into(),
                size,
            })
        }
        (true, None) => return Err("--put needs --put-size".into()),
        (false, _) => None,
    };
    let files = if put.is_some() {
        Vec::new()
    } else {
        load_files(args)?
    };
    let timeout = seconds("--timeout", args.timeout)?;
    let max_time = args
        .max_time
        .map(|s| seconds("--max-time", s))
        .transpose()?;
    let stall = args.stall.map(|s| seconds("--stall", s)).transpose()?;
    if !(0.0..1.0).contains(&args.loss) {
        return Err(format!("--loss must be in [0, 1), got {}", args.loss));
    }
    let concurrency = usize::try_from(args.concurrency).map_err(|e| e.to_string())?;
    raise_nofile(args.concurrency.min(args.n) + 64)?;

    let options = RequestOptions {
        blksize: args.blksize,
        windowsize: args.windowsize,
        tsize: args.tsize,
        timeout: args.opt_timeout,
    };
    let cfg = RunConfig {
        server: args.server,
        n: args.n,
        concurrency,
        client: ClientConfig {
            options,
            timeout,
            retries: args.retries,
            backoff: args.backoff,
        },
        files: files.clone(),
        seed: args.seed,
        max_time,
        loss: args.loss,
        stall,
        put: put.clone(),
        probe: args.probe_missing.as_deref().map(Arc::from),
    };
    let (names, sizes) = match &put {
        Some(p) => (vec![format!("{}<i>", p.prefix)], vec![p.size]),
        None => (
            files.iter().map(|f| f.name.to_string()).collect(),
            files.iter().map(|f| f.content.len() as u64).collect(),
        ),
    };
    let info = RunInfo {
        server: args.server.to_string(),
        files: names,
        file_sizes: sizes,
        n: args.n,
        concurrency,
        blksize: args.blksize,
        windowsize: args.windowsize,
        tsize: args.tsize,
        timeout_s: args.timeout,
        retries: args.retries,
        backoff: args.backoff,
        loss: args.loss,
        put: put.is_some(),
        client_style: args.client_style.name(),
    };

    let mut stats = Stats::new();
    let cpu0 = cpu_now()?;
    let elapsed = match args.client_style {
        ClientStyle::Batched => {
            driver::run(&cfg, &mut stats).map_err(|e| format!("event loop: {e}"))?
        }
        ClientStyle::Independent => {
            independent::run(&cfg, &mut stats).map_err(|e| format!("independent clients: {e}"))?
        }
    };
    let cpu1 = cpu_now()?;
    let cpu = Cpu {
        user: cpu1.user.saturating_sub(cpu0.user),
        sys: cpu1.sys.saturating_sub(cpu0.sys),
    };

    for line in &stats.failure_lines {
        eprintln!("FAIL {line}");
    }
    let unshown = stats
        .counts
        .failed
        .saturating_sub(stats.failure_lines.len() as u64);
    if unshown > 0 {
        eprintln!("... and {unshown} more failed transfers (counts by kind in the report)");
    }
    let report = Report::new(info, &stats, elapsed, cpu);
    if args.json {
        let mut v = report.to_json();
        if args.first_data_hist {
            let pairs: Vec<[u64; 2]> = stats
                .first_data_us
                .iter_recorded()
                .map(|x| [x.value_iterated_to(), x.count_at_value()])
                .collect();
            v["first_data_us_hist"] = serde_json::json!(pairs);
        }
        println!("{v}");
    } else {
        print!("{}", report.to_human());
    }
    Ok(report.success())
}
