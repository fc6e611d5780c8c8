//! `compare`: runs scenarios S1–S6 (downloads), S7 (the boot storm, `storm.rs`) and S8 (uploads) against ringtftpd,
//! tftpd-hpa, atftpd and dnsmasq on loopback, one server at a time, and writes
//! docs/benchmarks.md, its PNG charts and the raw JSON lines. `--quick` runs ringtftpd alone
//! (as it is and with `--single-port`) at tiny sizes and checks correctness only (uploads byte for byte on disk). A run of S8
//! alone rewrites only the uploads section of the page and `benchmarks/uploads-raw.jsonl`.
//!
//! Normally started by `scripts/compare.sh`, which builds the binaries and installs the
//! peers. Each server runs pinned to one CPU inside a cgroup of its own; this process and the
//! load generator are pinned to another. Exit status: 0 when the run finished (in `--quick`:
//! and every transfer completed byte-exact), 1 otherwise, 2 on a usage error.
#![forbid(unsafe_code)]

mod cgroup;
mod chart;
mod criterion;
#[path = "../../pattern.rs"]
mod pattern;
mod procfs;
mod report;
mod run;
mod scenario;
mod server;
mod storm;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use serde_json::{Value, json};

use report::{Agg, sig3};
use run::{Ctx, log};
use scenario::Scenario;
use server::{Kind, Server};

#[derive(Parser, Debug)]
#[command(
    name = "compare",
    about = "Benchmark ringtftpd beside tftpd-hpa, atftpd and dnsmasq (stable and newest) and a lock-step floor on loopback"
)]
struct Args {
    /// Tiny sizes, ringtftpd only (both ways), one repetition, no docs: a correctness smoke test.
    #[arg(long)]
    quick: bool,
    /// Servers to run, comma-separated (default: ringtftpd, tftpd-hpa, atftpd, dnsmasq,
    /// tftpd-hpa-7, dnsmasq-2.93, atftpd-0.8.1 and floor, the newest peers skipped unless
    /// given with --peer; with --quick: ringtftpd, ringtftpd-single-port and floor); also
    /// ringtftpd-single-port and dnsmasq-single-port (every transfer on the listening port).
    #[arg(long, value_delimiter = ',')]
    servers: Vec<String>,
    /// Scenarios to run, comma-separated (default: S1, S2, S3, S3a, S4..S6, S8; with --quick also a 1,000-client S7 boot storm; the full S7 only when named).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Client pattern: batched (loadtest's epoll driver, the default), independent (each
    /// scenario as `{id}i`: a thread and a blocking connected socket per client, one recv
    /// per wake-up; see loadtest/src/independent.rs) or both (each scenario both ways).
    /// Scenarios independent clients cannot run (S6: 10,000 threads; S8 uploads, S7 storm) stay batched.
    #[arg(long, value_parser = ["batched", "independent", "both"], default_value = "batched")]
    client_style: String,
    /// Repetitions per scenario and server (default 3; 1 with --quick).
    #[arg(long)]
    reps: Option<u32>,
    /// Directory holding the built `loadtest`, `floor` and `ringtftpd` (default: this binary's).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    #[arg(long)]
    ringtftpd: Option<PathBuf>,
    #[arg(long, default_value = "/usr/sbin/in.tftpd")]
    tftpd_hpa: PathBuf,
    /// atftpd binary (scripts/compare.sh unpacks Debian's under target/peers/).
    #[arg(long)]
    atftpd: Option<PathBuf>,
    #[arg(long, default_value = "/usr/sbin/dnsmasq")]
    dnsmasq: PathBuf,
    /// A newest-release peer and the command that runs it, as `KIND=COMMAND`, e.g.
    /// `tftpd-hpa-7="$(scripts/peer-hpa7.sh)"` (also dnsmasq-2.93, atftpd-0.8.1; the
    /// command is the loader, `--library-path DIR` and the binary). Repeatable; a peer
    /// named in --servers without one is skipped.
    #[arg(long)]
    peer: Vec<String>,
    /// valgrind able to run the servers (3.21+ for openat2); without it no instruction counts.
    #[arg(long)]
    valgrind: Option<PathBuf>,
    /// Where benchmarks.md and benchmarks/ are written.
    #[arg(long, default_value = "docs")]
    docs: PathBuf,
    /// Do not write the docs (the summary still goes to stdout).
    #[arg(long)]
    no_docs: bool,
    /// Skip the traced runs (syscalls, instructions, profile).
    #[arg(long)]
    no_extras: bool,
    /// CPU for the servers (default 1 when there are two or more).
    #[arg(long)]
    server_cpu: Option<usize>,
    /// CPU for the load generator and this harness (default 0).
    #[arg(long)]
    client_cpu: Option<usize>,
    /// Stop launching measured runs after this many seconds (the rest are recorded as skipped).
    #[arg(long, default_value_t = 2700)]
    budget: u64,
    /// Before each measured run, wait up to this many seconds for the machine to go quiet
    /// (less than 0.3 CPUs busy): other people's jobs on a shared machine skew every figure.
    #[arg(long, default_value_t = 60)]
    quiet_wait: u64,
    /// Total seconds of such waiting allowed (not counted in --budget).
    #[arg(long, default_value_t = 420)]
    wait_budget: u64,
    /// The command line stated in the docs.
    #[arg(long, default_value = "scripts/compare.sh")]
    command: String,
    /// criterion's output directory (target/criterion) after the benches ran for this
    /// invocation; its results go into the docs.
    #[arg(long, requires = "criterion_since")]
    criterion_dir: Option<PathBuf>,
    /// Unix time (s) the benches started: results written earlier are stale and left out.
    #[arg(long)]
    criterion_since: Option<u64>,
    /// The bench command line, stated in the docs.
    #[arg(long, default_value = "cargo bench")]
    criterion_command: String,
    /// Why the bench command failed, if it did (the results it wrote are still shown).
    #[arg(long)]
    criterion_error: Option<String>,
    #[arg(long, short)]
    verbose: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("compare: {e}");
            ExitCode::from(2)
        }
    }
}

fn executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| executable(p))
}

/// The first non-empty line `argv` (program first) and `arg` print.
fn first_line(argv: &[String], arg: &str) -> Option<String> {
    let (cmd, pre) = argv.split_first()?;
    let out = Command::new(cmd)
        .args(pre)
        .arg(arg)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

fn pin_self(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        // This thread only; threads and children created later inherit it.
        if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
            log(&format!("cannot pin to CPU {cpu}: {e}"));
        }
    }
}

fn now_utc() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn real_main(a: &Args) -> Result<bool, String> {
    let started = Instant::now();
    let machine = procfs::machine();
    let micro = criterion_run(a)?;
    let bin_dir = match &a.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .parent()
            .map(Path::to_path_buf)
            .ok_or("cannot locate the binary directory")?,
    };
    let loadtest = bin_dir.join("loadtest");
    let floor = bin_dir.join("floor");
    for p in [&loadtest, &floor] {
        if !executable(p) {
            return Err(format!(
                "{} is not built (cargo build -p loadtest)",
                p.display()
            ));
        }
    }

    // Scenarios.
    let all = if a.quick {
        scenario::quick()
    } else {
        scenario::full()
    };
    // S7, the boot storm, runs apart from the others (storm.rs): in --quick scaled down
    // by default, at full size only when named.
    let is_storm = |id: &String| id.eq_ignore_ascii_case("S7");
    let storm_named = a.scenarios.iter().any(is_storm);
    let storm = if storm_named && !a.quick {
        Some(storm::full(15_000))
    } else if a.quick && (storm_named || a.scenarios.is_empty()) {
        Some(storm::quick())
    } else {
        None
    };
    let named: Vec<&String> = a.scenarios.iter().filter(|id| !is_storm(id)).collect();
    let scenarios: Vec<Scenario> = if a.scenarios.is_empty() {
        all
    } else {
        let mut v = Vec::new();
        for id in named {
            let s = all
                .iter()
                .find(|s| s.id.eq_ignore_ascii_case(id))
                .ok_or_else(|| format!("unknown scenario {id} (S1..S8, S3a)"))?;
            v.push(s.clone());
        }
        v
    };
    let scenarios: Vec<Scenario> = match a.client_style.as_str() {
        // The smoke test also runs S1 with independent clients: that driver is checked too.
        "batched" if a.quick && a.scenarios.is_empty() => {
            let extra = scenarios
                .iter()
                .find(|s| s.id == "S1")
                .and_then(Scenario::with_independent_clients);
            scenarios.into_iter().chain(extra).collect()
        }
        "batched" => scenarios,
        style => {
            let mut v = Vec::new();
            for sc in scenarios {
                let ind = sc.with_independent_clients();
                if ind.is_none() {
                    log(&format!(
                        "{}: independent clients cannot run it (uploads, or over 4096 clients): batched only",
                        sc.id
                    ));
                }
                if style == "both" || ind.is_none() {
                    v.push(sc);
                }
                v.extend(ind);
            }
            v
        }
    };
    let reps = a.reps.unwrap_or(if a.quick { 1 } else { 3 }).max(1);

    // Servers.
    let wanted: Vec<Kind> = if a.servers.is_empty() {
        if a.quick {
            // Both ways of running: single port shares none of the socket pool's code paths;
            // and the lock-step floor, built with them, so the instrument is checked too.
            vec![Kind::Ringtftpd, Kind::RingtftpdSinglePort, Kind::Floor]
        } else {
            server::ALL.to_vec()
        }
    } else {
        a.servers
            .iter()
            .map(|s| Kind::parse(s).ok_or_else(|| format!("unknown server {s}")))
            .collect::<Result<_, _>>()?
    };
    let mut servers: Vec<Server> = Vec::new();
    let mut skipped: Vec<(String, String)> = Vec::new();
    let mut versions: Vec<(String, String)> = Vec::new();
    for k in wanted {
        // A newest peer comes as the command prefix its fetch script printed: the loader,
        // `--library-path DIR` and the binary last.
        let mut prefix: Vec<String> = Vec::new();
        let bin = if k.is_newest_peer() {
            let given = a
                .peer
                .iter()
                .find_map(|p| p.strip_prefix(k.name()).and_then(|r| r.strip_prefix('=')));
            let Some(cmd) = given else {
                skipped.push((
                    k.name().into(),
                    "not fetched: no --peer for it (scripts/compare.sh passes what \
                     scripts/peer-hpa7.sh, peer-dnsmasq.sh and peer-atftpd.sh print)"
                        .into(),
                ));
                continue;
            };
            prefix = cmd.split_whitespace().map(String::from).collect();
            PathBuf::from(prefix.pop().unwrap_or_default())
        } else {
            match k.base() {
                Kind::Ringtftpd => a
                    .ringtftpd
                    .clone()
                    .unwrap_or_else(|| bin_dir.join("ringtftpd")),
                Kind::TftpdHpa => a.tftpd_hpa.clone(),
                Kind::Atftpd => a
                    .atftpd
                    .clone()
                    .or_else(|| which("atftpd"))
                    .unwrap_or_else(|| PathBuf::from("atftpd")),
                Kind::Dnsmasq => a.dnsmasq.clone(),
                Kind::Floor => bin_dir.join("lockstep-floor"),
                _ => unreachable!("base() is one of the five programs"),
            }
        };
        if !executable(&bin) || prefix.first().is_some_and(|l| !executable(Path::new(l))) {
            skipped.push((
                k.name().into(),
                format!("{} not found or not executable", bin.display()),
            ));
            continue;
        }
        if k.base() == Kind::Dnsmasq && procfs::port_in_use(69) {
            skipped.push((
                k.name().into(),
                "UDP port 69 is in use by another program; dnsmasq serves TFTP on 69 only".into(),
            ));
            continue;
        }
        let mut argv: Vec<String> = prefix.clone();
        argv.push(bin.display().to_string());
        let v = match k.base() {
            Kind::TftpdHpa => first_line(&argv, "-V"),
            Kind::Atftpd => {
                first_line(&argv, "--version").or_else(|| Some("(version not reported)".into()))
            }
            _ => first_line(&argv, "--version"),
        };
        versions.push((k.name().into(), v.unwrap_or_default()));
        servers.push(Server {
            kind: k,
            binary: bin,
            prefix,
        });
    }
    for (who, why) in &skipped {
        log(&format!("SKIP {who}: {why}"));
    }
    if servers.is_empty() {
        return Err("no server to run".into());
    }
    if a.quick && !servers.iter().any(|s| s.kind.base() == Kind::Ringtftpd) && a.servers.is_empty()
    {
        return Err("ringtftpd is not built".into());
    }

    // Pinning: server on one CPU, everything of ours on another.
    let two = machine.nproc >= 2 && which("taskset").is_some();
    let server_cpu = a.server_cpu.or(two.then_some(1));
    let client_cpu = a.client_cpu.or(two.then_some(0));
    let pinning = match (server_cpu, client_cpu) {
        (Some(s), Some(c)) => {
            pin_self(c);
            format!("server on CPU {s} (taskset), load generator and harness on CPU {c}")
        }
        _ => "none (fewer than 2 CPUs or no taskset)".to_string(),
    };

    // The served tree.
    let tmp = std::env::temp_dir().join(format!("ringtftpd-compare-{}", std::process::id()));
    let root = tmp.join("root");
    let upload_root = tmp.join("uploads");
    let work = tmp.join("work");
    for d in [&root, &upload_root, &work] {
        fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        for d in [&tmp, &root] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        }
        // tftpd-hpa writes as nobody.
        fs::set_permissions(&upload_root, fs::Permissions::from_mode(0o777))
            .map_err(|e| e.to_string())?;
    }
    let _cleanup = RemoveOnDrop(tmp.clone());
    run::make_file(&root, run::PROBE_FILE, 4096)?;
    run::make_file(&upload_root, run::PROBE_FILE, 4096)?;
    for sc in scenarios.iter().filter(|s| !s.put) {
        run::make_file(&root, &sc.file, sc.size)?;
    }
    // Servers that cannot take uploads sit out the upload scenarios.
    let mut scenario_skips: Vec<(String, String, String)> = Vec::new();
    for sc in scenarios.iter().filter(|s| s.put) {
        for s in &servers {
            if let Err(why) = s.kind.uploads() {
                log(&format!("SKIP {} in {}: {why}", s.kind.name(), sc.id));
                scenario_skips.push((sc.id.into(), s.kind.name().into(), why.into()));
            }
        }
    }
    let runs_in = |sc: &Scenario, s: &Server| !sc.put || s.kind.uploads().is_ok();
    let ctx = Ctx {
        loadtest,
        floor,
        upload_root: upload_root.clone(),
        root: root.clone(),
        work,
        server_cpu,
        client_cpu,
        verbose: a.verbose,
    };

    // Other work on the machine skews every figure: measure it before starting.
    let busy_before = busy_cpus(Duration::from_secs(1));
    if let Some(b) = busy_before.filter(|b| *b > 0.2) {
        log(&format!(
            "WARNING: the machine was already busy ({b:.2} CPUs) before the run: figures will be noisy"
        ));
    }
    let accounting =
        cgroup::Tracker::new(&format!("compare-probe-{}", std::process::id())).describe();
    log(&format!(
        "{} scenario(s) × {reps} rep(s) × {} server(s); {pinning}; accounting: {accounting}",
        scenarios.len(),
        servers.len()
    ));

    let mut records: Vec<Value> = Vec::new();
    let mut floors: Vec<Value> = Vec::new();
    let budget = Duration::from_secs(a.budget);
    // Waiting for a quiet machine does not count against the budget, up to this much.
    let wait_budget = Duration::from_secs(a.wait_budget);
    let mut waited_total = Duration::ZERO;
    for sc in &scenarios {
        // The floor before each scenario, so a VM that slows down shows in it too.
        if floors.is_empty() || !a.quick {
            let f = ctx.floor(if a.quick { 0.2 } else { 2.0 });
            log(&format!(
                "floor: {} us per datagram",
                sig3(f["cpu_us_per_datagram"].as_f64())
            ));
            floors.push(f);
        }
        for rep in 1..=reps {
            for s in servers.iter().filter(|s| runs_in(sc, s)) {
                if measured(&started, waited_total) > budget {
                    records.push(
                        json!({"kind": "run", "server": s.kind.name(), "scenario": sc.id,
                        "rep": rep, "ok": false, "error": "skipped: time budget exhausted"}),
                    );
                    continue;
                }
                // A run that other work disturbed is run again once, after waiting for quiet;
                // the disturbed record is kept in the raw file, marked as discarded.
                let mut rec = Value::Null;
                for attempt in 1..=2 {
                    let wait_left = wait_budget.saturating_sub(waited_total);
                    let (waited, busy) = if a.quick {
                        (0.0, None)
                    } else {
                        wait_quiet(Duration::from_secs(a.quiet_wait).min(wait_left))
                    };
                    waited_total += Duration::from_secs_f64(waited);
                    if busy.is_some_and(|b| b >= QUIET) {
                        log(&format!(
                            "machine still busy ({} CPUs) after waiting {waited:.0} s; running anyway",
                            sig3(busy)
                        ));
                    }
                    rec = run::with(
                        ctx.measure(s, sc, rep),
                        json!({"quiet_wait_s": waited, "busy_before_cpus": busy, "attempt": attempt}),
                    );
                    let disturbed = rec["other_load_cpus"].as_f64().is_some_and(|l| l > 0.5);
                    if a.quick
                        || !disturbed
                        || attempt == 2
                        || measured(&started, waited_total) > budget
                    {
                        break;
                    }
                    log(&format!(
                        "{} {} rep {rep}: disturbed ({} CPUs of other work); running it again",
                        s.kind.name(),
                        sc.id,
                        sig3(rec["other_load_cpus"].as_f64())
                    ));
                    let mut old = rec.clone();
                    old["kind"] = json!("run-discarded");
                    records.push(old);
                }
                log(&progress_line(&rec));
                records.push(rec);
            }
        }
    }

    // The boot storm, once per server (the lock-step floor serves no RRQ of a missing file).
    let mut storms: Vec<Value> = Vec::new();
    if let Some(st) = storm {
        for s in servers.iter().filter(|s| s.kind != Kind::Floor) {
            // The single-port server is asked for twice the clients (issue 12).
            let st = match s.kind {
                Kind::RingtftpdSinglePort if !a.quick => storm::full(2 * st.clients),
                _ => st,
            };
            log(&format!(
                "S7 boot storm: {} × {} clients",
                s.kind.name(),
                st.clients
            ));
            let v = storm::run(&ctx, s, &st);
            log(&format!("S7 {}: {v}", s.kind.name()));
            storms.push(v);
        }
        println!("{}", storm::table(&storms));
        let raw: String = storms.iter().map(|v| format!("{v}\n")).collect();
        let path = ctx.work.join("storm-raw.jsonl");
        if fs::write(&path, raw).is_ok() {
            log(&format!("storm records: {}", path.display()));
        }
        if scenarios.is_empty() {
            return Ok(storms.iter().all(|v| v["ok"] == true));
        }
    }

    // Traced runs.
    let mut syscalls: Vec<Value> = Vec::new();
    let mut instructions: Vec<Value> = Vec::new();
    let mut profile: Option<String> = None;
    if !a.quick
        && !a.no_extras
        && let Some(s1) = scenario::full().into_iter().find(|s| s.id == "S1")
    {
        run::make_file(&root, &s1.file, s1.size)?;
        if which("perf").is_some() {
            for s in &servers {
                if measured(&started, waited_total) > budget + Duration::from_secs(300) {
                    log("time budget exhausted: no more syscall counts");
                    break;
                }
                let v = ctx.syscalls(s, &s1);
                log(&format!(
                    "syscalls {}: {} per block ({} io_uring_enter) {}",
                    s.kind.name(),
                    sig3(v["total_per_block"].as_f64()),
                    sig3(v["io_uring_enter_per_block"].as_f64()),
                    v["error"].as_str().unwrap_or("")
                ));
                syscalls.push(v);
            }
            if let Some(r) = servers.iter().find(|s| s.kind == Kind::Ringtftpd) {
                // Ten times S1's count, so the profile holds a few seconds of samples.
                let mut long = s1.clone();
                long.n *= 10;
                long.max_time_s = 120;
                match ctx.profile(r, &long) {
                    Ok(p) => profile = Some(p),
                    Err(e) => log(&format!("profile: {e}")),
                }
            }
        } else {
            log("perf not found: no syscall counts or profile");
        }
        match &a.valgrind {
            Some(vg) if executable(vg) => {
                let mut w = s1.clone();
                w.c = 10;
                w.timeout_s = 5.0;
                w.max_time_s = 120;
                for s in &servers {
                    if measured(&started, waited_total) > budget + Duration::from_secs(300) {
                        log("time budget exhausted: no more instruction counts");
                        break;
                    }
                    let v = ctx.instructions(s, vg, &w, 10, 60);
                    log(&format!(
                        "instructions {}: {} per block {}",
                        s.kind.name(),
                        sig3(v["instructions_per_block"].as_f64()),
                        v["error"].as_str().unwrap_or("")
                    ));
                    instructions.push(v);
                }
            }
            _ => log("no usable valgrind given (--valgrind): no instruction counts"),
        }
    }

    // Aggregate and report.
    let aggs: Vec<Agg> = scenarios
        .iter()
        .flat_map(|sc| {
            servers
                .iter()
                .filter(|s| runs_in(sc, s))
                .map(|s| report::aggregate(s.kind.name(), sc, &records))
        })
        .collect();
    let floor_us = report::median(
        floors
            .iter()
            .filter_map(|f| f["cpu_us_per_datagram"].as_f64())
            .collect(),
    );
    println!("{}", summary_text(&scenarios, &aggs, floor_us));

    if a.quick {
        let bad: Vec<&Value> = records
            .iter()
            .chain(&storms)
            .filter(|r| r["ok"] != true)
            .collect();
        let floor_ok = floors
            .iter()
            .all(|f| f["received"].as_u64().unwrap_or(0) > 0);
        for r in &bad {
            eprintln!(
                "compare --quick: FAILED {} {}: {} {}",
                r["server"].as_str().unwrap_or("?"),
                r["scenario"].as_str().unwrap_or("?"),
                r["error"].as_str().unwrap_or(""),
                r["loadtest_stderr"]
                    .as_array()
                    .map(|v| v
                        .iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(" | "))
                    .unwrap_or_default()
            );
        }
        if !floor_ok {
            eprintln!("compare --quick: FAILED the loopback floor tool moved no datagram");
        }
        let passed = records.len() + storms.len() - bad.len();
        println!(
            "compare --quick: {passed} passed, {} failed",
            bad.len() + usize::from(!floor_ok)
        );
        return Ok(bad.is_empty() && floor_ok);
    }

    if !a.no_docs {
        let dir = a.docs.join("benchmarks");
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let is_put = |r: &Value| {
            r["scenario"]
                .as_str()
                .is_some_and(|id| scenarios.iter().any(|s| s.put && s.id == id))
        };
        let (reads, puts): (Vec<Scenario>, Vec<Scenario>) =
            scenarios.iter().cloned().partition(|s| !s.put);
        let out = a.docs.join("benchmarks.md");
        let old_page = fs::read_to_string(&out).ok();
        let date = now_utc();
        let uploads = (!puts.is_empty()).then(|| {
            let mut raw = String::new();
            for v in floors.iter().chain(records.iter().filter(|r| is_put(r))) {
                raw.push_str(&v.to_string());
                raw.push('\n');
            }
            if let Err(e) = fs::write(dir.join("uploads-raw.jsonl"), raw) {
                log(&format!("uploads-raw.jsonl: {e}"));
            }
            let commands: Vec<(String, String)> = servers
                .iter()
                .filter(|s| s.kind.uploads().is_ok())
                .map(|s| {
                    let cmd = s
                        .command(Path::new("ROOT"), 0, true)
                        .join(" ")
                        .replace(&s.binary.display().to_string(), &short_bin(s))
                        .replace("127.0.0.1:0", "127.0.0.1:PORT")
                        .replace("--port 0 ", "--port PORT ");
                    (s.kind.name().to_string(), cmd)
                })
                .collect();
            let notes = fs::read_to_string(dir.join("upload-notes.md")).ok();
            let put_recs: Vec<Value> = records.iter().filter(|r| is_put(r)).cloned().collect();
            report::uploads_markdown(&report::UploadDoc {
                command: &a.command,
                date: &date,
                reps,
                scenarios: &puts,
                aggs: &aggs
                    .iter()
                    .filter(|g| puts.iter().any(|p| p.id == g.scenario))
                    .cloned()
                    .collect::<Vec<_>>(),
                records: &put_recs,
                skipped: &scenario_skips,
                commands: &commands,
                busy_before,
                notes: notes.as_deref(),
            })
        });
        if reads.is_empty() {
            // Uploads alone: the rest of the page (and raw.jsonl, the charts) stay as they are.
            if let Some(u) = &uploads {
                let page = match &old_page {
                    Some(p) => report::splice_uploads(p, u),
                    None => format!("# Benchmarks\n\n{u}"),
                };
                fs::write(&out, page).map_err(|e| format!("{}: {e}", out.display()))?;
                log(&format!(
                    "updated the uploads section of {} and wrote {}/uploads-raw.jsonl",
                    out.display(),
                    dir.display()
                ));
            }
            log(&format!("done in {:.0} s", started.elapsed().as_secs_f64()));
            return Ok(true);
        }
        // Without an upload scenario in this run, the page keeps the uploads section it had.
        let uploads_md = uploads.or_else(|| {
            old_page
                .as_deref()
                .and_then(report::uploads_section_of)
                .map(str::to_string)
        });
        let read_aggs: Vec<Agg> = aggs
            .iter()
            .filter(|g| reads.iter().any(|r| r.id == g.scenario))
            .cloned()
            .collect();
        let mut raw = String::new();
        for v in floors
            .iter()
            .chain(records.iter().filter(|r| !is_put(r)))
            .chain(&syscalls)
            .chain(&instructions)
        {
            raw.push_str(&v.to_string());
            raw.push('\n');
        }
        fs::write(dir.join("raw.jsonl"), raw).map_err(|e| e.to_string())?;
        let (scenarios, aggs) = (reads, read_aggs);
        let charts = draw_charts(&dir, &scenarios, &servers, &aggs, floor_us);
        if let Some(p) = &profile {
            let _ = fs::write(dir.join("ringtftpd-s1-profile.txt"), p);
        }
        let instrument_notes =
            std::fs::read_to_string(a.docs.join("benchmarks/instruments.md")).ok();
        let profile_notes =
            std::fs::read_to_string(a.docs.join("benchmarks/profile-notes.md")).ok();
        let md = report::markdown(&report::DocInput {
            command: &a.command,
            date: &date,
            machine: &machine,
            accounting: &accounting,
            pinning: &pinning,
            versions: &versions,
            scenarios: &scenarios,
            reps,
            aggs: &aggs,
            skipped: &skipped,
            floor_us,
            floor_runs: &floors,
            syscalls: &syscalls,
            instructions: &instructions,
            profile: profile.as_deref(),
            profile_notes: profile_notes.as_deref(),
            instrument_notes: instrument_notes.as_deref(),
            criterion: micro.as_ref(),
            charts: &charts,
            elapsed_s: started.elapsed().as_secs_f64(),
            busy_before,
            uploads: uploads_md.as_deref(),
        });
        fs::write(&out, md).map_err(|e| format!("{}: {e}", out.display()))?;
        log(&format!("wrote {} and {}/", out.display(), dir.display()));
    }
    log(&format!("done in {:.0} s", started.elapsed().as_secs_f64()));
    Ok(true)
}

/// The binary's name as the docs show it: `ringtftpd`, `in.tftpd`, `atftpd`, `dnsmasq`.
fn short_bin(s: &Server) -> String {
    s.binary.file_name().map_or_else(
        || s.kind.name().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
}

/// The micro-benchmarks compare.sh ran just before: None when it ran none.
fn criterion_run(a: &Args) -> Result<Option<criterion::Run>, String> {
    let mut run = criterion::Run {
        command: a.criterion_command.clone(),
        error: a.criterion_error.clone(),
        ..criterion::Run::default()
    };
    match (&a.criterion_dir, a.criterion_since) {
        (Some(dir), Some(since)) => {
            let since = SystemTime::UNIX_EPOCH + Duration::from_secs(since);
            run.seconds = SystemTime::now()
                .duration_since(since)
                .ok()
                .map(|d| d.as_secs_f64());
            // An unreadable directory (the benches failed before writing
            // anything) must not stop the scenarios: the docs say why.
            let found = match criterion::read(dir, since) {
                Ok(found) => found,
                Err(e) => {
                    log(&format!("criterion: {e}"));
                    run.error.get_or_insert(e);
                    return Ok(Some(run));
                }
            };
            for p in &found.problems {
                log(&format!("criterion: {p}"));
            }
            log(&format!(
                "criterion: {} result(s) from this invocation in {}, {} older one(s) left out",
                found.benches.len(),
                dir.display(),
                found.stale
            ));
            run.benches = found.benches;
            Ok(Some(run))
        }
        // The benches failed to build: say so in the docs.
        _ if run.error.is_some() => Ok(Some(run)),
        _ => Ok(None),
    }
}

/// Machine-wide load below which the machine counts as quiet, in CPUs.
const QUIET: f64 = 0.3;

/// Time spent measuring: wall time less the waiting for a quiet machine.
fn measured(started: &Instant, waited: Duration) -> Duration {
    started.elapsed().saturating_sub(waited)
}

/// CPUs busy machine-wide over `window`.
fn busy_cpus(window: Duration) -> Option<f64> {
    let a = procfs::read_cpu_ticks()?;
    std::thread::sleep(window);
    let b = procfs::read_cpu_ticks()?;
    Some(b.0.saturating_sub(a.0) as f64 / 100.0 / window.as_secs_f64())
}

/// Waits (up to `max`) until less than 0.3 CPUs are busy; returns the seconds waited and
/// the last load seen.
fn wait_quiet(max: Duration) -> (f64, Option<f64>) {
    let t0 = Instant::now();
    loop {
        let b = busy_cpus(Duration::from_millis(500));
        if b.is_none_or(|b| b < QUIET) || t0.elapsed() >= max {
            return (t0.elapsed().as_secs_f64(), b);
        }
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn progress_line(r: &Value) -> String {
    let lt = &r["loadtest"];
    format!(
        "{} {} rep {}: {} transfers/s, {} MB/s, {}/{} completed, server CPU {} s/GB{}{}",
        r["server"].as_str().unwrap_or("?"),
        r["scenario"].as_str().unwrap_or("?"),
        r["rep"],
        sig3(lt["transfers_per_s"].as_f64()),
        sig3(lt["mb_per_s"].as_f64()),
        lt["completed"].as_u64().unwrap_or(0),
        lt["launched"].as_u64().unwrap_or(0),
        sig3(r["cpu_s_per_gb"].as_f64()),
        r["listen_drops"]
            .as_u64()
            .filter(|d| *d > 0)
            .map(|d| format!(", {d} listen drops"))
            .unwrap_or_default(),
        r["error"]
            .as_str()
            .map(|e| format!(" ERROR {e}"))
            .unwrap_or_default(),
    )
}

/// The summary table: medians, with ratios to tftpd-hpa 5.2 (the incumbent) and to the
/// lock-step floor ("floor" server) measured in the same scenario of the same run.
fn summary_text(scenarios: &[Scenario], aggs: &[Agg], floor_us: Option<f64>) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<4} {:<21} {:>11} {:>8} {:>9} {:>9} {:>13} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8} {:>7}",
        "scen",
        "server",
        "transfers/s",
        "MB/s",
        "p50 ms",
        "p99 ms",
        "completed",
        "CPU s/GB",
        "us/block",
        "×blast",
        "×lsfloor",
        "MB/s×hpa",
        "CPU×hpa",
        "drops"
    );
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    for sc in scenarios {
        let of = |name: &str| {
            aggs.iter()
                .find(|a| a.scenario == sc.id && a.server == name)
        };
        let hpa = of("tftpd-hpa");
        let lsfloor = of("floor");
        for a in aggs.iter().filter(|a| a.scenario == sc.id) {
            let _ = writeln!(
                s,
                "{:<4} {:<21} {:>11} {:>8} {:>9} {:>9} {:>13} {:>9} {:>9} {:>7} {:>8} {:>8} {:>8} {:>7}",
                sc.id,
                a.server,
                sig3(a.transfers_per_s),
                sig3(a.mb_per_s),
                sig3(a.total_p50),
                sig3(a.total_p99),
                format!("{}/{}", a.completed, a.asked),
                sig3(a.cpu_s_per_gb),
                sig3(a.cpu_us_per_block),
                sig3(ratio(a.cpu_us_per_block, floor_us)),
                sig3(ratio(
                    a.cpu_us_per_block,
                    lsfloor.and_then(|f| f.cpu_us_per_block)
                )),
                sig3(ratio(a.mb_per_s, hpa.and_then(|h| h.mb_per_s))),
                sig3(ratio(a.cpu_s_per_gb, hpa.and_then(|h| h.cpu_s_per_gb))),
                a.listen_drops.map_or("–".into(), |d| d.to_string()),
            );
        }
    }
    if let Some(f) = floor_us {
        let _ = writeln!(
            s,
            "×blast: CPU per block over the blast floor, {f:.3} us CPU per 1472-byte datagram \
             (`floor`: one-way sendmmsg, loopback)"
        );
    }
    let _ = writeln!(
        s,
        "×lsfloor: CPU per block over the \"floor\" server's in the same scenario (lockstep-floor: \
         recvmmsg/sendmmsg, the least a lock-step server does per block); ×hpa: over tftpd-hpa 5.2's \
         median in the same run (MB/s: higher is better; CPU: lower is better)"
    );
    s
}

/// Draws the charts; returns (title, path relative to the docs dir) of those drawn.
fn draw_charts(
    dir: &Path,
    scenarios: &[Scenario],
    servers: &[Server],
    aggs: &[Agg],
    floor_us: Option<f64>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let series =
        |ids: &[&str], pick: &dyn Fn(&Agg) -> Option<f64>| -> (Vec<String>, Vec<chart::Series>) {
            let cats: Vec<String> = ids
                .iter()
                .filter(|id| scenarios.iter().any(|s| s.id == **id))
                .map(|s| s.to_string())
                .collect();
            let ser = servers
                .iter()
                .map(|sv| chart::Series {
                    name: sv.kind.name().into(),
                    values: cats
                        .iter()
                        .map(|c| {
                            aggs.iter()
                                .find(|a| a.server == sv.kind.name() && a.scenario == *c)
                                .and_then(pick)
                        })
                        .collect(),
                })
                .collect();
            (cats, ser)
        };
    struct Spec {
        file: &'static str,
        title: &'static str,
        y: &'static str,
        ids: &'static [&'static str],
        pick: fn(&Agg) -> Option<f64>,
        log: bool,
    }
    const ALL: &[&str] = &["S1", "S2", "S3", "S3a", "S4", "S5", "S6"];
    let specs = [
        Spec {
            file: "transfers.png",
            title: "Small transfers: transfers per second (higher is better)",
            y: "transfers/s",
            ids: &["S1", "S2"],
            pick: |a| a.transfers_per_s,
            log: false,
        },
        Spec {
            file: "throughput.png",
            title: "Bulk and crowds: MB/s of payload (higher is better)",
            y: "MB/s",
            ids: &["S3", "S3a", "S4", "S5", "S6"],
            pick: |a| a.mb_per_s,
            log: false,
        },
        Spec {
            file: "cpu-per-gb.png",
            title: "Server CPU seconds per GB served (lower is better, log scale)",
            y: "CPU s/GB",
            ids: ALL,
            pick: |a| a.cpu_s_per_gb,
            log: true,
        },
        Spec {
            file: "latency-p99.png",
            title: "p99 time per transfer, ms (lower is better, log scale)",
            y: "ms",
            ids: ALL,
            pick: |a| a.total_p99,
            log: true,
        },
    ];
    for sp in specs {
        let (cats, ser) = series(sp.ids, &sp.pick);
        if cats.is_empty() {
            continue;
        }
        match chart::grouped_bars(&dir.join(sp.file), sp.title, sp.y, &cats, &ser, sp.log) {
            Ok(()) => out.push((sp.title.to_string(), format!("benchmarks/{}", sp.file))),
            Err(e) => log(&format!("chart {}: {e}", sp.file)),
        }
    }
    if let Some(f) = floor_us {
        let (cats, ser) = series(ALL, &|a: &Agg| a.cpu_us_per_block.map(|x| x / f));
        if !cats.is_empty() {
            let title = "Server CPU per block as a multiple of the sendmmsg floor (lower is better, log scale)";
            if chart::grouped_bars(
                &dir.join("cpu-vs-floor.png"),
                title,
                "× floor",
                &cats,
                &ser,
                true,
            )
            .is_ok()
            {
                out.push((title.to_string(), "benchmarks/cpu-vs-floor.png".into()));
            }
        }
    }
    out
}
