//! From raw run records to figures: medians per (server, scenario), the targets of issue 5
//! and the Markdown of docs/benchmarks.md.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde_json::Value;

use crate::scenario::Scenario;

pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// Figures of one server in one scenario over its repetitions.
#[derive(Debug, Clone, Default)]
pub struct Agg {
    pub server: String,
    pub scenario: String,
    pub reps: usize,
    /// Runs that could not even start (server failed to come up).
    pub errors: Vec<String>,
    pub launched: u64,
    pub completed: u64,
    /// Transfers asked for over all repetitions.
    pub asked: u64,
    pub failures: BTreeMap<String, u64>,
    /// Transfers that never got a single reply (timed out waiting for the first one).
    pub transfers_per_s: Option<f64>,
    pub mb_per_s: Option<f64>,
    pub total_p50: Option<f64>,
    pub total_p99: Option<f64>,
    pub total_max: Option<f64>,
    pub first_p50: Option<f64>,
    pub first_p99: Option<f64>,
    pub server_cpu_s: Option<f64>,
    pub cpu_s_per_gb: Option<f64>,
    pub cpu_us_per_block: Option<f64>,
    pub client_cpu_pct: Option<f64>,
    pub client_us_per_block: Option<f64>,
    pub client_retransmits: Option<f64>,
    pub listen_drops: Option<u64>,
    pub rcvbuf_errors: Option<u64>,
    pub mem_peak_cgroup: Option<u64>,
    pub rss_peak: Option<u64>,
    pub anon_peak: Option<u64>,
    pub fds_peak: Option<u64>,
    pub procs_peak: Option<u64>,
    /// CPUs' worth of work not done by the server or the load generator (median).
    pub other_load: Option<f64>,
    /// (anon peak − anon idle) / concurrency, median over repetitions.
    pub anon_per_session: Option<f64>,
    pub options: String,
}

impl Agg {
    pub fn all_completed(&self) -> bool {
        self.errors.is_empty() && self.asked > 0 && self.completed == self.asked
    }
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn med(runs: &[&Value], get: impl Fn(&Value) -> Option<f64>) -> Option<f64> {
    median(runs.iter().filter_map(|r| get(r)).collect())
}

fn sum_u(runs: &[&Value], key: &str) -> Option<u64> {
    let v: Vec<u64> = runs.iter().filter_map(|r| r[key].as_u64()).collect();
    (!v.is_empty()).then(|| v.iter().sum())
}

fn max_u(runs: &[&Value], key: &str) -> Option<u64> {
    runs.iter().filter_map(|r| r[key].as_u64()).max()
}

/// Aggregates the `kind: run` records of one server and scenario.
pub fn aggregate(server: &str, sc: &Scenario, records: &[Value]) -> Agg {
    let mine: Vec<&Value> = records
        .iter()
        .filter(|r| r["kind"] == "run" && r["server"] == server && r["scenario"] == sc.id)
        .collect();
    let mut a = Agg {
        server: server.into(),
        scenario: sc.id.into(),
        reps: mine.len(),
        ..Agg::default()
    };
    let runs: Vec<&Value> = mine
        .iter()
        .copied()
        .filter(|r| r["loadtest"].is_object())
        .collect();
    for r in &mine {
        if let Some(e) = r["error"].as_str() {
            a.errors.push(e.to_string());
        }
    }
    a.asked = sc.n * mine.len() as u64;
    for r in &runs {
        let lt = &r["loadtest"];
        a.launched += lt["launched"].as_u64().unwrap_or(0);
        a.completed += lt["completed"].as_u64().unwrap_or(0);
        if let Some(m) = lt["failures"].as_object() {
            for (k, v) in m {
                *a.failures.entry(k.clone()).or_insert(0) += v.as_u64().unwrap_or(0);
            }
        }
    }
    a.transfers_per_s = med(&runs, |r| f(&r["loadtest"]["transfers_per_s"]));
    a.mb_per_s = med(&runs, |r| f(&r["loadtest"]["mb_per_s"]));
    a.total_p50 = med(&runs, |r| f(&r["loadtest"]["total_ms"]["p50"]));
    a.total_p99 = med(&runs, |r| f(&r["loadtest"]["total_ms"]["p99"]));
    a.total_max = med(&runs, |r| f(&r["loadtest"]["total_ms"]["max"]));
    a.first_p50 = med(&runs, |r| f(&r["loadtest"]["first_data_ms"]["p50"]));
    a.first_p99 = med(&runs, |r| f(&r["loadtest"]["first_data_ms"]["p99"]));
    a.server_cpu_s = med(&runs, |r| f(&r["server_cpu_s"]));
    a.cpu_s_per_gb = med(&runs, |r| f(&r["cpu_s_per_gb"]));
    a.cpu_us_per_block = med(&runs, |r| f(&r["cpu_us_per_block"]));
    a.client_cpu_pct = med(&runs, |r| f(&r["loadtest"]["cpu_pct"]));
    a.client_us_per_block = med(&runs, |r| f(&r["loadtest"]["cpu_us_per_block"]));
    a.client_retransmits = med(&runs, |r| f(&r["loadtest"]["client_retransmits"]));
    a.listen_drops = sum_u(&runs, "listen_drops");
    a.rcvbuf_errors = sum_u(&runs, "rcvbuf_errors");
    a.mem_peak_cgroup = max_u(&runs, "mem_peak_cgroup_bytes");
    a.rss_peak = max_u(&runs, "rss_peak_bytes");
    a.anon_peak = max_u(&runs, "anon_peak_bytes");
    a.fds_peak = max_u(&runs, "fds_peak");
    a.procs_peak = max_u(&runs, "procs_peak");
    a.other_load = med(&runs, |r| f(&r["other_load_cpus"]));
    a.anon_per_session = med(&runs, |r| {
        let peak = r["anon_peak_bytes"].as_f64()?;
        let idle = r["anon_idle_bytes"].as_f64().unwrap_or(0.0);
        Some((peak - idle).max(0.0) / sc.c.max(1) as f64)
    });
    a.options = runs
        .first()
        .map(|r| options_granted(&r["loadtest"], sc))
        .unwrap_or_default();
    a
}

/// "blksize 1468, windowsize 16", or what the server ignored.
fn options_granted(lt: &Value, sc: &Scenario) -> String {
    if sc.blksize.is_none() && sc.windowsize.is_none() {
        return "(none asked)".into();
    }
    if lt["oack"].as_u64().unwrap_or(0) == 0 && lt["completed"].as_u64().unwrap_or(0) > 0 {
        return "**all ignored**".into();
    }
    let range = |v: &Value| match v.as_array().map(|a| (a[0].as_u64(), a[1].as_u64())) {
        Some((Some(lo), Some(hi))) if lo == hi => lo.to_string(),
        Some((Some(lo), Some(hi))) => format!("{lo}..{hi}"),
        _ => "?".into(),
    };
    let mut s = format!("blksize {}", range(&lt["blksize_granted"]));
    if let Some(w) = sc.windowsize {
        let got = range(&lt["windowsize_granted"]);
        if got == "1" {
            s.push_str(&format!(", **windowsize {w} ignored**"));
        } else {
            s.push_str(&format!(", windowsize {got}"));
        }
    }
    s
}

pub fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(x) => format!("{x:.digits$}"),
        None => "–".into(),
    }
}

/// Three significant figures, whatever the magnitude.
pub fn sig3(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(0.0) => "0".into(),
        Some(x) => {
            let mag = x.abs().log10().floor() as i32;
            let digits = (2 - mag).max(0) as usize;
            format!("{x:.digits$}")
        }
    }
}

pub fn mib(v: Option<u64>) -> String {
    v.map_or("–".into(), |b| {
        format!("{:.1}", b as f64 / (1 << 20) as f64)
    })
}

fn opt_u(v: Option<u64>) -> String {
    v.map_or("–".into(), |x| x.to_string())
}

/// One row of the targets table.
#[derive(Debug, Clone)]
pub struct Target {
    pub scenario: &'static str,
    pub target: String,
    pub measured: String,
    /// None: could not be judged (a peer or a figure is missing).
    pub met: Option<bool>,
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Evaluates issue 5's targets for ringtftpd against the peers of the same run.
pub fn targets(aggs: &[Agg], syscalls: Option<&Value>) -> Vec<Target> {
    let get = |server: &str, sc: &str| aggs.iter().find(|a| a.server == server && a.scenario == sc);
    let ring = |sc: &str| get("ringtftpd", sc);
    let mut out = Vec::new();
    let mut cmp = |scenario: &'static str,
                   what: &str,
                   peer: &str,
                   factor: f64,
                   ge: bool,
                   pick: &dyn Fn(&Agg) -> Option<f64>,
                   unit: &str| {
        let r = ring(scenario).and_then(pick);
        let p = get(peer, scenario).and_then(pick);
        let rel = ratio(r, p);
        let op = if ge { "≥" } else { "≤" };
        let factor_s = if factor == 1.0 {
            String::new()
        } else {
            format!("{} × ", sig3(Some(factor)))
        };
        let target = format!("{what} {op} {factor_s}{peer}'s");
        let measured = match (r, p) {
            (Some(r), Some(p)) => format!(
                "{} vs {} {unit} ({} × {peer})",
                sig3(Some(r)),
                sig3(Some(p)),
                fmt_opt(rel, 2)
            ),
            (Some(r), None) => format!("{} {unit} ({peer}: not measured)", sig3(Some(r))),
            _ => "not measured".into(),
        };
        let met = rel.map(|x| if ge { x >= factor } else { x <= factor });
        out.push(Target {
            scenario,
            target,
            measured,
            met,
        });
    };
    let tps = |a: &Agg| a.transfers_per_s;
    let mbs = |a: &Agg| a.mb_per_s;
    let cpu = |a: &Agg| a.cpu_s_per_gb;
    cmp("S1", "transfers/s", "dnsmasq", 1.0, true, &tps, "/s");
    cmp("S1", "CPU s/GB", "dnsmasq", 0.6, false, &cpu, "s/GB");
    cmp(
        "S1",
        "CPU s/GB",
        "tftpd-hpa",
        1.0 / 6.0,
        false,
        &cpu,
        "s/GB",
    );
    cmp("S2", "transfers/s", "dnsmasq", 1.0, true, &tps, "/s");
    cmp("S2", "CPU s/GB", "dnsmasq", 0.5, false, &cpu, "s/GB");
    cmp("S3", "MB/s", "dnsmasq", 1.0, true, &mbs, "MB/s");
    cmp("S3", "CPU s/GB", "dnsmasq", 0.7, false, &cpu, "s/GB");
    cmp("S4", "MB/s", "atftpd", 2.0, true, &mbs, "MB/s");
    cmp("S4", "CPU s/GB", "atftpd", 0.5, false, &cpu, "s/GB");

    if let Some(a) = ring("S5") {
        out.push(Target {
            scenario: "S5",
            target: "every transfer completes".into(),
            measured: format!("{}/{}", a.completed, a.asked),
            met: Some(a.all_completed()),
        });
        out.push(Target {
            scenario: "S5",
            target: "no listen-socket drops".into(),
            measured: match a.listen_drops {
                Some(d) => format!(
                    "{d} drops over {} runs (machine-wide RcvbufErrors {})",
                    a.reps,
                    opt_u(a.rcvbuf_errors)
                ),
                None => "not measured".into(),
            },
            met: a.listen_drops.map(|d| d == 0),
        });
    }
    if let Some(a) = ring("S6") {
        out.push(Target {
            scenario: "S6",
            target: "every transfer completes".into(),
            measured: format!("{}/{}", a.completed, a.asked),
            met: Some(a.all_completed()),
        });
        out.push(Target {
            scenario: "S6",
            target: "RSS without file mappings ≤ 8 KiB per session".into(),
            measured: match a.anon_per_session {
                Some(b) => format!(
                    "{:.2} KiB per session (peak RssAnon+RssShmem {} MiB, less idle, / sessions)",
                    b / 1024.0,
                    mib(a.anon_peak)
                ),
                None => "not measured".into(),
            },
            met: a.anon_per_session.map(|b| b <= 8192.0),
        });
    }
    if let Some(s) = syscalls {
        let u = s["io_uring_enter_per_block"].as_f64();
        let o = s["other_per_block"].as_f64();
        out.push(Target {
            scenario: "S1",
            target: "< 0.1 io_uring_enter per block served".into(),
            measured: fmt_opt(u, 4),
            met: u.map(|x| x < 0.1),
        });
        out.push(Target {
            scenario: "S1",
            target: "< 0.1 other syscalls per block served".into(),
            measured: fmt_opt(o, 4),
            met: o.map(|x| x < 0.1),
        });
    }
    out
}

fn met_s(m: Option<bool>) -> &'static str {
    match m {
        Some(true) => "yes",
        Some(false) => "**no**",
        None => "n/a",
    }
}

/// Everything the Markdown needs.
pub struct DocInput<'a> {
    pub command: &'a str,
    pub date: &'a str,
    pub machine: &'a crate::procfs::Machine,
    pub accounting: &'a str,
    pub pinning: &'a str,
    pub versions: &'a [(String, String)],
    pub scenarios: &'a [Scenario],
    pub reps: u32,
    pub aggs: &'a [Agg],
    pub skipped: &'a [(String, String)],
    pub floor_us: Option<f64>,
    pub floor_runs: &'a [Value],
    pub syscalls: &'a [Value],
    pub instructions: &'a [Value],
    pub profile: Option<&'a str>,
    /// Hand-written notes on the profiles (docs/benchmarks/profile-notes.md),
    /// copied in after the profile.
    pub profile_notes: Option<&'a str>,
    /// Hand-written notes on the instruments of issue 12 (docs/benchmarks/instruments.md:
    /// newest peers, S3a, the lock-step floor, independent clients), kept across runs.
    pub instrument_notes: Option<&'a str>,
    /// The criterion micro-benchmarks run for this invocation; None: not run.
    pub criterion: Option<&'a crate::criterion::Run>,
    pub charts: &'a [(String, String)],
    pub elapsed_s: f64,
    /// CPUs' worth of work the machine did in the second before the run started.
    pub busy_before: Option<f64>,
    /// The uploads section (markers included), placed after the server resources.
    pub uploads: Option<&'a str>,
}

pub fn markdown(d: &DocInput<'_>) -> String {
    let mut s = String::new();
    let m = d.machine;
    let _ = writeln!(
        s,
        "# Benchmarks: ringtftpd beside tftpd-hpa, atftpd and dnsmasq\n"
    );
    let _ = writeln!(
        s,
        "Generated by `{}` on {} in {:.0} s. Every figure is the **median of {} runs from this one \
         invocation** (one run per repetition, the server started afresh for each); counts of \
         completed transfers and drops are sums over the runs, peaks are maxima. Absolute figures on \
         this VM move by up to ±40 % between invocations (see \
         `/work/shared/research/peers-measured.md`); ratios within one invocation are stable, so \
         compare servers within this page only.\n",
        d.command, d.date, d.elapsed_s, d.reps
    );
    let _ = writeln!(
        s,
        "**Machine**: {} CPUs ({}), {:.0} GiB, Linux {}. **Pinning**: {}. **Server CPU accounting**: {}.\n",
        m.nproc, m.cpu_model, m.mem_total_gib, m.kernel, d.pinning, d.accounting
    );
    if let Some(b) = d.busy_before {
        let worst = d
            .aggs
            .iter()
            .filter_map(|a| a.other_load.map(|l| (l, a)))
            .max_by(|x, y| x.0.total_cmp(&y.0));
        let _ = write!(
            s,
            "**Other load**: {b:.2} CPUs busy in the second before the run"
        );
        match worst {
            Some((l, a)) if l > 0.2 => {
                let _ = writeln!(
                    s,
                    "; during the runs up to {l:.2} CPUs of other work (median, {} {}): \
                     **something else competed for the CPUs; treat those rows with caution**.\n",
                    a.server, a.scenario
                );
            }
            Some((l, _)) => {
                let _ = writeln!(
                    s,
                    "; at most {l:.2} CPUs of other work during the runs (median per row).\n"
                );
            }
            None => {
                let _ = writeln!(s, ".\n");
            }
        }
    }
    if !d.versions.is_empty() {
        // Version lines mostly name the program already; drop dnsmasq's copyright.
        let v: Vec<String> = d
            .versions
            .iter()
            .map(|(k, v)| {
                let v = v.split("  Copyright").next().unwrap_or(v).trim();
                format!("{k}: `{v}`")
            })
            .collect();
        let _ = writeln!(s, "**Servers**: {}.\n", v.join("; "));
    }
    for (who, why) in d.skipped {
        let _ = writeln!(s, "- **{who} skipped**: {why}");
    }
    if !d.skipped.is_empty() {
        s.push('\n');
    }

    let _ = writeln!(s, "## Scenarios\n");
    let _ = writeln!(
        s,
        "All RRQ, octet mode, on 127.0.0.1, each transfer from its own client socket; every byte, \
         the length and the OACK are checked against the file on disk (files of random bytes).\n"
    );
    for sc in d.scenarios {
        let _ = writeln!(s, "- **{} {}**: {}.", sc.id, sc.title, sc.describe());
    }
    s.push('\n');

    // Targets.
    let sys_ring = d
        .syscalls
        .iter()
        .find(|v| v["server"] == "ringtftpd" && v["ok"] == true);
    let t = targets(d.aggs, sys_ring);
    if !t.is_empty() {
        let _ = writeln!(s, "## Targets (issue 5)\n");
        let _ = writeln!(
            s,
            "| scenario | target | measured | met? |\n|---|---|---|---|"
        );
        for r in &t {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} |",
                r.scenario,
                r.target,
                r.measured,
                met_s(r.met)
            );
        }
        let met = t.iter().filter(|r| r.met == Some(true)).count();
        let _ = writeln!(s, "\n{met} of {} targets met.\n", t.len());
    }

    // Floor.
    let _ = writeln!(s, "## The floor\n");
    match d.floor_us {
        Some(us) => {
            let per_s = median(
                d.floor_runs
                    .iter()
                    .filter_map(|v| v["datagrams_per_s"].as_f64())
                    .collect(),
            );
            let _ = writeln!(
                s,
                "`floor` (in this crate) blasts 1472-byte datagrams (a 1468-byte DATA block) with \
                 `sendmmsg`, 64 per call, from the server's CPU to a receiver on the load generator's \
                 CPU. On loopback the sender also pays for delivery into the receiving socket, so its \
                 CPU per datagram is the least a server can spend to get one block to a client: \
                 **{us:.3} µs per datagram** ({} datagrams/s; median of {} runs of {} s spread over the \
                 invocation; receiver loss {} %). The column \"× floor\" below is the server's CPU per \
                 block served divided by it. (A lossy floor run means the receiver was starved and the \
                 figure is too low.) \"× lock-step floor\" divides it by the CPU per block of the \
                 `floor` server (loadtest's `lockstep-floor`: recvmmsg/sendmmsg, two calls per \
                 wake-up) in the same scenario, when that server ran.\n",
                sig3(per_s),
                d.floor_runs.len(),
                d.floor_runs
                    .first()
                    .and_then(|v| v["seconds"].as_f64())
                    .map_or("?".into(), |x| format!("{x:.0}")),
                fmt_opt(
                    median(
                        d.floor_runs
                            .iter()
                            .filter_map(|v| v["loss"].as_f64().map(|l| l * 100.0))
                            .collect()
                    ),
                    2
                ),
            );
        }
        None => {
            let _ = writeln!(s, "The floor could not be measured.\n");
        }
    }

    // Results.
    let _ = writeln!(s, "## Throughput and latency\n");
    let _ = writeln!(
        s,
        "MB = 10^6 bytes of payload. Latency is per transfer, from RRQ sent: \"first\" to the first \
         DATA, \"total\" to the last. \"client CPU\" is the load generator's CPU / wall: near 100 % the \
         figure is partly bound by the client, not the server.\n"
    );
    let _ = writeln!(
        s,
        "| scen. | server | transfers/s | MB/s | first p50 ms | first p99 ms | total p50 ms | total p99 ms | total max ms | completed/asked | failures | client CPU % | client retx | options granted |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for sc in d.scenarios {
        for a in d.aggs.iter().filter(|a| a.scenario == sc.id) {
            let fails: Vec<String> = a.failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
            let mut fails = fails.join(", ");
            if !a.errors.is_empty() {
                fails = format!("{} run(s) did not start: {}", a.errors.len(), a.errors[0]);
            }
            let bold = |x: String, ok: bool| if ok { x } else { format!("**{x}**") };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                sc.id,
                a.server,
                sig3(a.transfers_per_s),
                sig3(a.mb_per_s),
                sig3(a.first_p50),
                sig3(a.first_p99),
                sig3(a.total_p50),
                sig3(a.total_p99),
                sig3(a.total_max),
                bold(format!("{}/{}", a.completed, a.asked), a.all_completed()),
                if fails.is_empty() {
                    "–".into()
                } else {
                    fails
                },
                fmt_opt(a.client_cpu_pct, 0),
                fmt_opt(a.client_retransmits, 0),
                a.options
            );
        }
    }
    s.push('\n');

    let _ = writeln!(s, "## Server resources\n");
    let _ = writeln!(
        s,
        "\"CPU s\" is the server's CPU (user + system, all its processes and threads, from its cgroup) \
         while the load ran; \"s/GB\" per 10^9 payload bytes; \"µs/block\" per DATA block delivered in \
         order. Peak RSS is the largest sampled sum of VmRSS (or VmHWM) over the server's processes; \
         \"anon\" excludes file mappings (RssAnon + RssShmem); \"cgroup\" is the memory cgroup's peak. \
         \"listen drops\" is the drop counter of the server's listening socket(s) in /proc/net/udp, \
         \"RcvbufErrors\" the machine-wide count (client sockets included), both summed over the runs. \
         \"other load\" is the CPU the rest of the machine used meanwhile (busy time in /proc/stat less \
         the server's and the load generator's, per second of wall time): this harness's sampler is \
         a few hundredths; more means something else competed and the row is suspect.\n"
    );
    let _ = writeln!(
        s,
        "| scen. | server | CPU s | CPU s/GB | CPU µs/block | × floor | × lock-step floor | peak RSS MiB | peak anon MiB | cgroup peak MiB | peak fds | peak procs | listen drops | RcvbufErrors | other load |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for sc in d.scenarios {
        // The `floor` server (lockstep-floor) in the same scenario, when it ran.
        let lsfloor = d
            .aggs
            .iter()
            .find(|a| a.scenario == sc.id && a.server == "floor")
            .and_then(|f| f.cpu_us_per_block);
        for a in d.aggs.iter().filter(|a| a.scenario == sc.id) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                sc.id,
                a.server,
                sig3(a.server_cpu_s),
                sig3(a.cpu_s_per_gb),
                sig3(a.cpu_us_per_block),
                sig3(ratio(a.cpu_us_per_block, d.floor_us)),
                sig3(ratio(a.cpu_us_per_block, lsfloor)),
                mib(a.rss_peak),
                mib(a.anon_peak),
                mib(a.mem_peak_cgroup),
                opt_u(a.fds_peak),
                opt_u(a.procs_peak),
                opt_u(a.listen_drops),
                opt_u(a.rcvbuf_errors),
                fmt_opt(a.other_load, 2)
            );
        }
    }
    s.push('\n');

    if let Some(u) = d.uploads {
        let _ = writeln!(s, "{}\n", u.trim_end());
    }

    if !d.syscalls.is_empty() {
        let _ = writeln!(s, "## System calls per block (separate S1 run)\n");
        let _ = writeln!(
            s,
            "One more S1 run per server with `perf stat -e raw_syscalls:sys_enter -e syscalls:sys_enter_… -p <server pids>` \
             attached after start-up (children and threads inherit the counters); counts divided by the \
             DATA blocks the client received in order. Tracing slows forking servers: where not \
             every transfer completed, the per-block figures still hold for the blocks served.\n"
        );
        let _ = writeln!(
            s,
            "| server | completed | blocks | syscalls | per block | io_uring_enter per block | other per block | top syscalls per block |\n|---|---|---|---|---|---|---|---|"
        );
        for v in d.syscalls {
            if v["total"].as_u64().is_none() || v["blocks"].as_u64().unwrap_or(0) == 0 {
                let _ = writeln!(
                    s,
                    "| {} | – | – | – | – | – | – | {} |",
                    v["server"].as_str().unwrap_or("?"),
                    v["error"].as_str().unwrap_or("nothing counted")
                );
                continue;
            }
            let mut by: Vec<(String, u64)> = v["by_syscall"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, x)| (k.clone(), x.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default();
            by.sort_by_key(|b| std::cmp::Reverse(b.1));
            let blocks = v["blocks"].as_f64().unwrap_or(0.0).max(1.0);
            let top: Vec<String> = by
                .iter()
                .take(5)
                .map(|(k, c)| format!("{k} {:.3}", *c as f64 / blocks))
                .collect();
            let _ = writeln!(
                s,
                "| {} | {}/{} | {} | {} | {} | {} | {} | {} |",
                v["server"].as_str().unwrap_or("?"),
                v["completed"],
                v["launched"],
                v["blocks"],
                v["total"],
                fmt_opt(v["total_per_block"].as_f64(), 3),
                fmt_opt(v["io_uring_enter_per_block"].as_f64(), 4),
                fmt_opt(v["other_per_block"].as_f64(), 3),
                top.join(", ")
            );
        }
        s.push('\n');
    }

    if !d.instructions.is_empty() {
        let _ = writeln!(s, "## User-space instructions per block (noise-proof)\n");
        let _ = writeln!(
            s,
            "`perf stat -e instructions:u` needs a hardware PMU, which this VM does not expose \
             (`perf stat -e instructions:u true` prints `<not supported>`), so the count comes from \
             callgrind: the server runs under `valgrind --tool=callgrind` (children followed, one \
             output per process), serves a fixed S1-shaped workload twice with different transfer \
             counts, and the difference in instructions (Ir, user space only) over the difference in \
             blocks is the marginal cost of a block, without start-up and shutdown. The kernel's share \
             (system calls, loopback delivery) is not in this figure. Reproduce with e.g. \
             `valgrind --tool=callgrind --callgrind-out-file=cg.%p target/release/ringtftpd --address 127.0.0.1:6969 --threads 1 -q ROOT` \
             and `loadtest --server 127.0.0.1:6969 --file 64kib.bin --expect ROOT/64kib.bin -n 60 -c 10 --blksize 1468 --timeout 5`, \
             then the same with `-n 10`, and subtract the `summary:` lines.\n"
        );
        let _ = writeln!(
            s,
            "| server | instructions per block | run 1: transfers, blocks, Ir | run 2: transfers, blocks, Ir | note |\n|---|---|---|---|---|"
        );
        for v in d.instructions {
            let run = |i: usize| {
                let r = &v["runs"][i];
                format!("{}, {}, {}", r["transfers"], r["blocks"], r["instructions"])
            };
            let retx: u64 = (0..2)
                .filter_map(|i| v["runs"][i]["client_retransmits"].as_u64())
                .sum();
            let note = match v["error"].as_str() {
                Some(e) => e.to_string(),
                None if retx > 0 => format!("{retx} client retransmits (noise)"),
                None => "–".into(),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                v["server"].as_str().unwrap_or("?"),
                sig3(v["instructions_per_block"].as_f64()),
                if v["runs"].is_array() {
                    run(0)
                } else {
                    "–".into()
                },
                if v["runs"].is_array() {
                    run(1)
                } else {
                    "–".into()
                },
                note
            );
        }
        s.push('\n');
    }

    micro_benchmarks(&mut s, d.criterion);

    if let Some(p) = d.profile {
        let _ = writeln!(s, "## Where ringtftpd spends its CPU (S1)\n");
        let _ = writeln!(s, "```\n{}```\n", p);
    }
    if let Some(notes) = d.profile_notes {
        let _ = writeln!(s, "{}\n", notes.trim_end());
    }
    if let Some(notes) = d.instrument_notes {
        let _ = writeln!(s, "{}\n", notes.trim_end());
    }

    if !d.charts.is_empty() {
        let _ = writeln!(s, "## Charts\n");
        for (title, path) in d.charts {
            let _ = writeln!(s, "![{title}]({path})\n");
        }
    }

    let _ = writeln!(s, "## Method\n");
    let _ = writeln!(
        s,
        "- One command, `scripts/compare.sh`, builds the workspace (release), installs the peers from \
         Debian when absent (tftpd-hpa and dnsmasq-base with a `policy-rc.d` that keeps services from \
         starting; atftpd, which conflicts with tftpd-hpa as a package, is `apt-get download`ed and \
         unpacked under `target/peers/`), then runs `target/release/compare`, which writes this page, \
         `docs/benchmarks/*.png` and `docs/benchmarks/raw.jsonl` (every run's raw record: the load \
         generator's JSON report plus the server-side figures).\n\
         - Order: for each scenario, for each repetition, each server in turn, each started afresh in \
         a new cgroup (the starting shell joins the cgroup, raises its descriptor limit and `exec`s \
         `taskset -c <server CPU> <server>`), probed with one verified 4 KiB transfer (before that the harness \
         waits up to 60 s for the machine to be quiet, under 0.3 CPUs busy, since this machine is \
         shared; a run during which other work took more than 0.5 CPUs is run once more, the \
         disturbed record kept in raw.jsonl as `run-discarded`), loaded, then \
         stopped (SIGTERM, SIGKILL after 7 s). The load generator and this harness are pinned to the \
         other CPU.\n\
         - Server commands: `ringtftpd --address 127.0.0.1:PORT --threads 1 -q ROOT`; \
         `in.tftpd -L -s ROOT -a 127.0.0.1:PORT`; `atftpd --daemon --no-fork --port PORT \
         --bind-address 127.0.0.1 --user root.root --logfile /dev/null --verbose=0 --maxthread 20000 ROOT`; \
         `dnsmasq --no-daemon --conf-file=/dev/null --port=0 --enable-tftp --tftp-root=ROOT \
         --listen-address=127.0.0.1 --bind-interfaces --user=root --group=root --pid-file= \
         --tftp-max=20000 --quiet-tftp --log-facility=/dev/null` (TFTP on port 69 only; the run \
         checks that nothing else holds it).\n\
         - The load generator (`loadtest`, this crate): one nonblocking UDP socket per transfer (a \
         fresh client TID each), one epoll loop, retransmission of the last ACK/RRQ on timeout, \
         hdrhistogram latencies, its own CPU reported per block. A transfer fails on a wrong byte, a \
         wrong length, a bad OACK, an ERROR, or no progress after its retries.\n\
         - Syscall counts, instruction counts and the profile come from separate runs, since tracing \
         slows a server.\n\
         - Quick smoke test (correctness only, ringtftpd alone, tiny sizes, no timing asserted): \
         `scripts/compare.sh --quick`.\n"
    );
    s
}

/// First and last line of the uploads section of docs/benchmarks.md. A run of upload
/// scenarios alone replaces only what lies between them; a run with downloads rewrites the
/// page and keeps the old section when it ran no upload scenario.
pub const UPLOADS_BEGIN: &str =
    "<!-- uploads: written by compare; a run of S8 alone replaces only this section -->";
pub const UPLOADS_END: &str = "<!-- end of uploads -->";

/// The uploads section of an existing page, markers included.
pub fn uploads_section_of(page: &str) -> Option<&str> {
    let a = page.find(UPLOADS_BEGIN)?;
    let b = a + page[a..].find(UPLOADS_END)? + UPLOADS_END.len();
    Some(&page[a..b])
}

/// `page` with its uploads section replaced by `section`; without one, `section` goes before
/// "## Method" (or at the end).
pub fn splice_uploads(page: &str, section: &str) -> String {
    let section = section.trim_end();
    if let Some(old) = uploads_section_of(page) {
        return page.replacen(old, section, 1);
    }
    match page.find("\n## Method\n") {
        Some(i) => format!("{}\n{section}\n{}", &page[..=i], &page[i + 1..]),
        None => format!("{}\n\n{section}\n", page.trim_end()),
    }
}

/// Everything the uploads section needs.
pub struct UploadDoc<'a> {
    pub command: &'a str,
    pub date: &'a str,
    pub reps: u32,
    pub scenarios: &'a [Scenario],
    pub aggs: &'a [Agg],
    /// The `kind: run` records of these scenarios (for the on-disk checks and thread CPU).
    pub records: &'a [Value],
    /// (scenario, server, why) for servers that cannot take uploads.
    pub skipped: &'a [(String, String, String)],
    /// The server commands, as run (with the upload flags).
    pub commands: &'a [(String, String)],
    pub busy_before: Option<f64>,
    /// Hand-written notes (docs/benchmarks/upload-notes.md).
    pub notes: Option<&'a str>,
}

/// The uploads section (S8), markers included.
pub fn uploads_markdown(d: &UploadDoc<'_>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{UPLOADS_BEGIN}\n");
    let _ = writeln!(s, "## Uploads (S8)\n");
    let _ = writeln!(
        s,
        "Measured by `{}` on {}: every figure is the **median of {} runs** of this one invocation \
         (the server started afresh for each run), ratios are against tftpd-hpa **in the same \
         invocation**; counts are sums over the runs. This section is rewritten only by a run that \
         includes S8, so its date may differ from the rest of the page.\n",
        d.command, d.date, d.reps
    );
    for sc in d.scenarios {
        let _ = writeln!(s, "- **{} {}**: {}.", sc.id, sc.title, sc.describe());
    }
    let _ = writeln!(
        s,
        "- Each upload goes to a name of its own (`up-<server>-<scenario>-r<rep>-<i>`), so none \
         replaces another; its content is a pseudo-random stream derived from the name \
         (`loadtest/src/pattern.rs`). An upload counts as completed when the ACK of its final, \
         short block arrives. After each run, while the server still runs, the harness reads \
         every file back and checks its size and every byte (waiting up to 5 s for files the \
         client saw acknowledged but not yet whole on disk), counts any other file left in the \
         directory (\"stray\", e.g. a temporary), then deletes them all before the next run.\n\
         - Upload directory: a fresh directory on the same ext4 file system as the read root, \
         mode 0777 (tftpd-hpa writes as `nobody`). ringtftpd `fsync`s each upload before its \
         final ACK (README); tftpd-hpa and atftpd do not, so their data may still be only in the \
         page cache when they acknowledge.\n"
    );
    if !d.commands.is_empty() {
        let c: Vec<String> = d
            .commands
            .iter()
            .map(|(k, v)| format!("{k}: `{v}`"))
            .collect();
        let _ = writeln!(s, "**Server commands**: {}.\n", c.join("; "));
    }
    for (sc, who, why) in d.skipped {
        let _ = writeln!(s, "- **{who} not run in {sc}**: {why}.");
    }
    if !d.skipped.is_empty() {
        s.push('\n');
    }
    // Background load.
    let worst = d
        .aggs
        .iter()
        .filter_map(|a| a.other_load.map(|l| (l, a)))
        .max_by(|x, y| x.0.total_cmp(&y.0));
    let _ = write!(s, "**Other load**: ");
    match d.busy_before {
        Some(b) => {
            let _ = write!(s, "{b:.2} CPUs busy in the second before the invocation");
        }
        None => {
            let _ = write!(s, "not measured before the invocation");
        }
    }
    match worst {
        Some((l, a)) if l > 0.2 => {
            let _ = writeln!(
                s,
                "; up to {l:.2} CPUs of other work during the runs (median, {}): **something else \
                 competed; treat that row with caution**.\n",
                a.server
            );
        }
        Some((l, _)) => {
            let _ = writeln!(
                s,
                "; at most {l:.2} CPUs of other work during the runs (median per row; this harness's \
                 sampler is a few hundredths).\n"
            );
        }
        None => {
            let _ = writeln!(s, ".\n");
        }
    }
    let _ = writeln!(
        s,
        "MB = 10^6 bytes of payload acknowledged; \"CPU s\" is the server's (all its processes and \
         threads, from its cgroup) while the load ran, \"µs/block\" per DATA block acknowledged; \
         \"× hpa\" is the ratio to tftpd-hpa's median (for CPU, below 1 is better); latency from \
         WRQ sent to final ACK received. \"whole on disk\" counts files of exactly the bytes sent.\n"
    );
    let _ = writeln!(
        s,
        "| scen. | server | transfers/s | MB/s | MB/s × hpa | CPU s | CPU s/GB | CPU s/GB × hpa | CPU µs/block | total p50 ms | total p99 ms | completed/asked | whole on disk | stray files | client CPU % | client retx | other load |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for sc in d.scenarios {
        let hpa = d
            .aggs
            .iter()
            .find(|a| a.scenario == sc.id && a.server == "tftpd-hpa");
        for a in d.aggs.iter().filter(|a| a.scenario == sc.id) {
            let mine: Vec<&Value> = d
                .records
                .iter()
                .filter(|r| {
                    r["kind"] == "run" && r["server"] == a.server.as_str() && r["scenario"] == sc.id
                })
                .collect();
            let up =
                |k: &str| -> u64 { mine.iter().filter_map(|r| r["uploads"][k].as_u64()).sum() };
            let checked = mine.iter().any(|r| r["uploads"].is_object());
            let whole = if checked {
                format!("{}/{}", up("whole"), up("asked"))
            } else {
                "–".into()
            };
            let late = up("whole").saturating_sub(up("whole_at_first_check"));
            let whole = if late > 0 {
                format!("{whole} ({late} only after the final ACK)")
            } else {
                whole
            };
            let bold = |x: String, ok: bool| if ok { x } else { format!("**{x}**") };
            let mut completed = bold(format!("{}/{}", a.completed, a.asked), a.all_completed());
            if !a.errors.is_empty() {
                completed = format!(
                    "{completed} ({} run(s) did not start: {})",
                    a.errors.len(),
                    a.errors[0]
                );
            } else if !a.failures.is_empty() {
                let f: Vec<String> = a.failures.iter().map(|(k, v)| format!("{k} {v}")).collect();
                completed = format!("{completed} ({})", f.join(", "));
            }
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                sc.id,
                a.server,
                sig3(a.transfers_per_s),
                sig3(a.mb_per_s),
                fmt_opt(ratio(a.mb_per_s, hpa.and_then(|h| h.mb_per_s)), 2),
                sig3(a.server_cpu_s),
                sig3(a.cpu_s_per_gb),
                fmt_opt(ratio(a.cpu_s_per_gb, hpa.and_then(|h| h.cpu_s_per_gb)), 2),
                sig3(a.cpu_us_per_block),
                sig3(a.total_p50),
                sig3(a.total_p99),
                completed,
                bold(whole, !checked || up("whole") == up("asked")),
                if checked {
                    up("stray").to_string()
                } else {
                    "–".into()
                },
                fmt_opt(a.client_cpu_pct, 0),
                fmt_opt(a.client_retransmits, 0),
                fmt_opt(a.other_load, 2),
            );
        }
    }
    s.push('\n');
    // Where the CPU went, by thread, for servers with long-lived threads.
    for sc in d.scenarios {
        let mine: Vec<&Value> = d
            .records
            .iter()
            .filter(|r| r["kind"] == "run" && r["server"] == "ringtftpd" && r["scenario"] == sc.id)
            .collect();
        let mut names: Vec<String> = mine
            .iter()
            .filter_map(|r| r["thread_cpu_s"].as_object())
            .flat_map(|m| m.keys().cloned())
            .collect();
        names.sort();
        names.dedup();
        if names.is_empty() {
            continue;
        }
        let parts: Vec<String> = names
            .iter()
            .map(|n| {
                let m = median(
                    mine.iter()
                        .map(|r| r["thread_cpu_s"][n.as_str()].as_f64().unwrap_or(0.0))
                        .collect(),
                );
                format!("`{n}` {} s", sig3(m))
            })
            .collect();
        let _ = writeln!(
            s,
            "**ringtftpd's CPU by thread in {}** (utime + stime from `/proc/PID/task/*/stat` over the \
             load, 10 ms ticks, median of the runs; `shard` serves the protocol, `ringtftpd-write` \
             are the writer threads, `iou-wrk` the kernel's io_uring workers): {}.\n",
            sc.id,
            parts.join(", ")
        );
    }
    if let Some(n) = d.notes {
        let _ = writeln!(s, "{}\n", n.trim_end());
    }
    let _ = writeln!(
        s,
        "Raw records: `docs/benchmarks/uploads-raw.jsonl`. Reproduce: `{}`.\n",
        d.command
    );
    let _ = writeln!(s, "{UPLOADS_END}");
    s
}

/// The section on criterion's micro-benchmarks (benches/*.rs).
fn micro_benchmarks(s: &mut String, run: Option<&crate::criterion::Run>) {
    use crate::criterion::{Throughput, describe};
    let _ = writeln!(s, "## Micro-benchmarks (criterion)\n");
    let Some(r) = run else {
        let _ = writeln!(
            s,
            "Not run in this invocation (`COMPARE_CRITERION=0`, or `compare` started without \
             `--criterion-dir`). Run them with `cargo bench` (benches/proto.rs, session.rs, \
             timer.rs, files.rs); criterion prints ns per iteration and keeps the figures under \
             `target/criterion/`.\n"
        );
        return;
    };
    // compare.sh pins the benches with `taskset -c <server CPU>` when it pins the servers.
    let pinned = r
        .command
        .strip_prefix("taskset -c ")
        .and_then(|rest| rest.split_whitespace().next())
        .map_or("unpinned".to_string(), |cpu| {
            format!("pinned to CPU {cpu}, the servers' CPU")
        });
    let took = r
        .seconds
        .map_or(String::new(), |x| format!(", in {x:.0} s"));
    let _ = write!(
        s,
        "`{}`, run by `scripts/compare.sh` in this invocation just before the scenarios ({pinned}{took}).",
        r.command
    );
    match (&r.error, r.benches.is_empty()) {
        (Some(e), false) => {
            let _ = write!(
                s,
                " **It failed ({e})**: only the benchmarks that finished are listed."
            );
        }
        (Some(e), true) => {
            let _ = writeln!(
                s,
                " **It failed ({e})** before any result. Run them with `cargo bench`.\n"
            );
            return;
        }
        (None, true) => {
            let _ = writeln!(s, " It wrote no result. Run them with `cargo bench`.\n");
            return;
        }
        (None, false) => {}
    }
    let _ = writeln!(
        s,
        " Each figure is criterion's **median time per iteration** with its 95 % confidence \
         interval (bootstrap over the samples), for the benchmarks whose results were written \
         during this invocation; the short warm-up and measurement times make the intervals wider \
         than a plain `cargo bench`. Where an iteration handles several blocks or many bytes, the \
         description gives the time per block or the rate.\n"
    );
    let _ = writeln!(
        s,
        "| benchmark | what one iteration does | median ns | 95 % CI ns |\n|---|---|---|---|"
    );
    for b in &r.benches {
        let mut what = describe(&b.id).to_string();
        match b.throughput {
            Some(Throughput::Elements(n)) if n > 1 => {
                let _ = write!(
                    what,
                    "; {} ns per block",
                    sig3(Some(b.median_ns / n as f64))
                );
            }
            Some(Throughput::Bytes(n)) if b.median_ns > 0.0 => {
                let _ = write!(what, "; {} GB/s", sig3(Some(n as f64 / b.median_ns)));
            }
            _ => {}
        }
        let level = if (b.level - 0.95).abs() > 1e-9 {
            format!(" ({:.0} % CI)", b.level * 100.0)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "| `{}` | {what} | {} | {}–{}{level} |",
            b.id,
            sig3(Some(b.median_ns)),
            sig3(Some(b.lower_ns)),
            sig3(Some(b.upper_ns))
        );
    }
    s.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario;
    use serde_json::json;

    fn run(server: &str, sc: &str, tps: f64, cpu_gb: f64, completed: u64) -> Value {
        json!({
            "kind": "run", "server": server, "scenario": sc, "rep": 1, "ok": true,
            "loadtest": {
                "launched": 1000, "completed": completed, "failures": {},
                "transfers_per_s": tps, "mb_per_s": tps * 0.0655,
                "total_ms": {"p50": 10.0, "p99": 20.0, "max": 30.0},
                "first_data_ms": {"p50": 1.0, "p99": 2.0, "max": 3.0},
                "oack": completed, "blksize_granted": [1468, 1468], "windowsize_granted": [1, 1],
                "cpu_pct": 50.0, "cpu_us_per_block": 3.0, "client_retransmits": 0,
            },
            "server_cpu_s": 1.0, "cpu_s_per_gb": cpu_gb, "cpu_us_per_block": 2.0,
            "listen_drops": 0, "rcvbuf_errors": 0, "anon_peak_bytes": 3_000_000u64,
            "anon_idle_bytes": 1_000_000u64, "rss_peak_bytes": 5_000_000u64, "fds_peak": 10,
        })
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![f64::NAN, 5.0]), Some(5.0));
    }

    #[test]
    fn aggregates_over_repetitions() {
        let sc = &scenario::full()[0];
        let recs = vec![
            run("ringtftpd", "S1", 100.0, 5.0, 1000),
            run("ringtftpd", "S1", 300.0, 7.0, 1000),
            run("ringtftpd", "S1", 200.0, 6.0, 999),
            run("dnsmasq", "S1", 50.0, 10.0, 1000),
        ];
        let a = aggregate("ringtftpd", sc, &recs);
        assert_eq!(a.reps, 3);
        assert_eq!(a.transfers_per_s, Some(200.0));
        assert_eq!(a.cpu_s_per_gb, Some(6.0));
        assert_eq!((a.completed, a.asked), (2999, 3000));
        assert!(!a.all_completed());
        assert_eq!(a.anon_per_session, Some(2_000_000.0 / 200.0));
        assert_eq!(a.options, "blksize 1468");
    }

    #[test]
    fn targets_compare_with_peers_of_the_same_run() {
        let full = scenario::full();
        let recs = vec![
            run("ringtftpd", "S1", 300.0, 2.0, 1000),
            run("dnsmasq", "S1", 200.0, 5.0, 1000),
            run("tftpd-hpa", "S1", 50.0, 30.0, 1000),
        ];
        let aggs: Vec<Agg> = ["ringtftpd", "dnsmasq", "tftpd-hpa"]
            .iter()
            .map(|s| aggregate(s, &full[0], &recs))
            .collect();
        let t = targets(
            &aggs,
            Some(&json!({"io_uring_enter_per_block": 0.2, "other_per_block": 0.01})),
        );
        let find = |txt: &str| t.iter().find(|r| r.target.contains(txt)).unwrap();
        assert_eq!(find("transfers/s ≥ dnsmasq").met, Some(true));
        // 2/5 = 0.4 ≤ 0.6.
        assert_eq!(find("0.600 × dnsmasq").met, Some(true));
        // 2/30 = 0.067 ≤ 0.167.
        assert_eq!(find("tftpd-hpa").met, Some(true));
        assert_eq!(find("io_uring_enter").met, Some(false));
        assert_eq!(find("other syscalls").met, Some(true));
        // S2 peers absent: not judged.
        assert!(
            t.iter()
                .filter(|r| r.scenario == "S2")
                .all(|r| r.met.is_none())
        );
        // Worse than the peer: not met.
        let recs = vec![
            run("ringtftpd", "S1", 100.0, 4.0, 1000),
            run("dnsmasq", "S1", 200.0, 5.0, 1000),
        ];
        let aggs: Vec<Agg> = ["ringtftpd", "dnsmasq"]
            .iter()
            .map(|s| aggregate(s, &full[0], &recs))
            .collect();
        let t = targets(&aggs, None);
        assert_eq!(t[0].met, Some(false));
        assert_eq!(t[1].met, Some(false), "4/5 = 0.8 > 0.6");
    }

    #[test]
    fn markdown_has_the_tables_and_judges_targets() {
        let full = scenario::full();
        let recs = vec![
            run("ringtftpd", "S1", 300.0, 2.0, 1000),
            run("dnsmasq", "S1", 200.0, 5.0, 1000),
        ];
        let aggs: Vec<Agg> = ["ringtftpd", "dnsmasq"]
            .iter()
            .map(|s| aggregate(s, &full[0], &recs))
            .collect();
        let machine = crate::procfs::Machine {
            nproc: 2,
            kernel: "6.1".into(),
            cpu_model: "Test CPU".into(),
            mem_total_gib: 4.0,
        };
        let floor = vec![
            json!({"kind": "floor", "cpu_us_per_datagram": 1.5, "datagrams_per_s": 5e5, "seconds": 2.0, "loss": 0.0}),
        ];
        let md = markdown(&DocInput {
            command: "scripts/compare.sh",
            date: "today",
            machine: &machine,
            accounting: "cgroup v1",
            pinning: "server on CPU 1",
            versions: &[],
            scenarios: &full[..1],
            reps: 3,
            aggs: &aggs,
            skipped: &[("atftpd".into(), "not installed".into())],
            floor_us: Some(1.5),
            floor_runs: &floor,
            syscalls: &[],
            instructions: &[],
            profile: None,
            profile_notes: Some("## What the profiles changed\n\nnotes\n"),
            instrument_notes: None,
            criterion: None,
            charts: &[("c".into(), "benchmarks/c.png".into())],
            elapsed_s: 60.0,
            busy_before: Some(0.05),
            uploads: None,
        });
        assert!(
            md.contains("`scripts/compare.sh`")
                && md.contains("Test CPU")
                && md.contains("Linux 6.1")
        );
        assert!(md.contains("median of 3 runs"));
        assert!(md.contains("**atftpd skipped**: not installed"));
        assert!(
            md.contains("| S1 | transfers/s ≥ dnsmasq's | 300 vs 200 /s (1.50 × dnsmasq) | yes |"),
            "{md}"
        );
        // 2 µs per block over a 1.5 µs floor.
        assert!(
            md.contains("| S1 | ringtftpd | 1.00 | 2.00 | 2.00 | 1.33 |"),
            "{md}"
        );
        assert!(md.contains("**1.500 µs per datagram**"));
        assert!(md.contains("![c](benchmarks/c.png)"));
        assert!(
            md.contains("## Micro-benchmarks (criterion)\n\nNot run in this invocation")
                && md.contains("`cargo bench`")
                && !md.contains("| benchmark | what one iteration does |"),
            "{md}"
        );
        assert!(
            md.contains("## What the profiles changed\n\nnotes\n\n## Charts"),
            "the notes follow the profile section: {md}"
        );
    }

    #[test]
    fn markdown_lists_the_micro_benchmarks_of_this_run() {
        use crate::criterion::{Bench, Run, Throughput};
        let bench = |id: &str, median: f64, t: Option<Throughput>| Bench {
            id: id.into(),
            median_ns: median,
            lower_ns: median * 0.9,
            upper_ns: median * 1.1,
            level: 0.95,
            throughput: t,
        };
        let run = Run {
            command: "taskset -c 1 cargo bench --bench proto -- --noplot".into(),
            benches: vec![
                bench("proto_parse/ack", 7.58, None),
                bench(
                    "session_step/transfer/16",
                    320.0,
                    Some(Throughput::Elements(16)),
                ),
                bench(
                    "files/netascii_encode/1MiB_text",
                    1.5e6,
                    Some(Throughput::Bytes(1 << 20)),
                ),
                bench("new/thing", 1234.4, None),
            ],
            seconds: Some(91.0),
            error: None,
        };
        let machine = crate::procfs::Machine {
            nproc: 2,
            kernel: "6.1".into(),
            cpu_model: "Test CPU".into(),
            mem_total_gib: 4.0,
        };
        let instructions = vec![json!({"server": "ringtftpd", "instructions_per_block": 1000.0})];
        let doc = |c: Option<&Run>| {
            markdown(&DocInput {
                command: "scripts/compare.sh",
                date: "today",
                machine: &machine,
                accounting: "cgroup v2",
                pinning: "server on CPU 1",
                versions: &[],
                scenarios: &[],
                reps: 1,
                aggs: &[],
                skipped: &[],
                floor_us: None,
                floor_runs: &[],
                syscalls: &[],
                instructions: &instructions,
                profile: Some("profile\n"),
                profile_notes: None,
                instrument_notes: None,
                criterion: c,
                charts: &[],
                elapsed_s: 1.0,
                busy_before: None,
                uploads: None,
            })
        };
        let md = doc(Some(&run));
        let at = |t: &str| md.find(t).unwrap_or_else(|| panic!("no {t} in {md}"));
        assert!(at("## User-space instructions") < at("## Micro-benchmarks (criterion)"));
        assert!(at("## Micro-benchmarks (criterion)") < at("## Where ringtftpd spends"));
        assert!(md.contains(
            "`taskset -c 1 cargo bench --bench proto -- --noplot`, run by `scripts/compare.sh` in \
             this invocation just before the scenarios (pinned to CPU 1, the servers' CPU, in 91 s)"
        ));
        assert!(md.contains("**median time per iteration** with its 95 % confidence interval"));
        assert!(md.contains(
            "| benchmark | what one iteration does | median ns | 95 % CI ns |\n|---|---|---|---|\n\
             | `proto_parse/ack` | `Packet::parse` of a 4-byte ACK | 7.58 | 6.82–8.34 |\n"
        ));
        assert!(md.contains("16 DATA out, `poll_timeout`; 20.0 ns per block | 320 | 288–352 |"));
        assert!(md.contains("an occasional CR); 0.699 GB/s | 1500000 | 1350000–1650000 |"));
        assert!(md.contains("| `new/thing` | – | 1234 | 1111–1358 |"));
        assert!(!md.contains("failed"));

        // A failed bench command: what finished is shown, and the failure said.
        let failed = Run {
            error: Some("exit status 101".into()),
            benches: run.benches[..1].to_vec(),
            ..run.clone()
        };
        let md = doc(Some(&failed));
        assert!(md.contains(
            "(pinned to CPU 1, the servers' CPU, in 91 s). **It failed (exit status 101)**: only \
             the benchmarks that finished are listed. Each figure"
        ));
        assert!(md.contains("| `proto_parse/ack` |"));
        // Nothing written during this invocation: no table.
        let empty = Run {
            benches: vec![],
            ..run.clone()
        };
        let md = doc(Some(&empty));
        assert!(
            md.contains("in 91 s). It wrote no result. Run them with `cargo bench`.\n\n## Where")
        );
        assert!(!md.contains("| benchmark |"));
        let unbuilt = Run {
            benches: vec![],
            error: Some("they did not build".into()),
            seconds: None,
            ..run.clone()
        };
        assert!(doc(Some(&unbuilt)).contains(
            "(pinned to CPU 1, the servers' CPU). **It failed (they did not build)** before any \
             result. Run them with `cargo bench`.\n\n## Where"
        ));
        // Unpinned.
        let unpinned = Run {
            command: "cargo bench".into(),
            seconds: None,
            ..run
        };
        assert!(doc(Some(&unpinned)).contains("before the scenarios (unpinned). Each figure"));
    }

    #[test]
    fn number_formats() {
        assert_eq!(sig3(Some(1234.4)), "1234");
        assert_eq!(sig3(Some(12.345)), "12.3");
        assert_eq!(sig3(Some(0.012345)), "0.0123");
        assert_eq!(sig3(None), "–");
        assert_eq!(mib(Some(3 << 20)), "3.0");
    }
}
