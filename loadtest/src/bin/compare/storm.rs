//! S7, the boot storm of issue 12: thousands of iPXE-like clients at once, each asking for
//! a missing `autoexec.ipxe` (ERROR 1 expected), then for a 1 MiB file at blksize 1432,
//! retransmitting with iPXE's back-off. One process may hold at most 20,000 descriptors
//! here, so the clients are spread over several `loadtest` processes started together;
//! their time-to-first-DATA histograms are merged.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::procfs;
use crate::run::{self, Ctx, Peaks};
use crate::server::Server;

/// The file every storm client fetches, and the one it asks for first (never created).
pub const FILE: &str = "storm-1m.bin";
pub const MISSING: &str = "autoexec.ipxe";

#[derive(Debug, Clone, Copy)]
pub struct Storm {
    pub clients: u64,
    /// Clients per loadtest process (each a socket of its own).
    pub per_process: u64,
    pub size: u64,
    pub max_time_s: u64,
}

/// The storm users report: 15,000 clients (30,000 asks the single-port server for as many).
pub fn full(clients: u64) -> Storm {
    Storm {
        clients,
        per_process: 5000,
        size: 1 << 20,
        max_time_s: 300,
    }
}

/// The scaled-down storm of `--quick`: correctness only (256 KiB each keeps it short).
pub fn quick() -> Storm {
    Storm {
        clients: 1000,
        per_process: 500,
        size: 256 << 10,
        max_time_s: 120,
    }
}

/// iPXE's retry timer starts at 1/4 s and doubles (loadtest caps the doubling at 8×, +0–25 %
/// jitter); 10 resends without progress is about iPXE's 15.75 s before it gives up.
const CLIENT: [&str; 8] = [
    "--blksize",
    "1432",
    "--timeout",
    "0.25",
    "--backoff",
    "--retries",
    "10",
    "--first-data-hist",
];

fn spawn(
    ctx: &Ctx,
    server: &str,
    addr: &str,
    n: u64,
    seed: usize,
    st: &Storm,
) -> Result<Child, String> {
    // Per server: the storms of one invocation must not overwrite each other's.
    let err = ctx.work.join(format!("storm-{server}-{seed}.err"));
    let err = File::create(&err).map_err(|e| format!("{}: {e}", err.display()))?;
    Command::new(&ctx.loadtest)
        .args([
            "--server",
            addr,
            "--json",
            "--file",
            FILE,
            "--probe-missing",
            MISSING,
        ])
        .arg("--expect")
        .arg(ctx.root.join(FILE))
        .args(["-n", &n.to_string(), "-c", &n.to_string()])
        .args(CLIENT)
        .args(["--max-time", &st.max_time_s.to_string(), "--stall", "60"])
        .args(["--seed", &(seed + 1).to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .map_err(|e| format!("spawn loadtest: {e}"))
}

/// The `q` quantile (0..1) of merged [microseconds, count] pairs, in ms.
fn quantile_ms(hist: &BTreeMap<u64, u64>, q: f64) -> Option<f64> {
    let total: u64 = hist.values().sum();
    if total == 0 {
        return None;
    }
    let want = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (&us, &c) in hist {
        seen += c;
        if seen >= want {
            return Some(us as f64 / 1000.0);
        }
    }
    None
}

/// One storm against `server`, started afresh: the raw record.
pub fn run(ctx: &Ctx, server: &Server, st: &Storm) -> Value {
    let base = json!({
        "kind": "storm",
        "scenario": "S7",
        "server": server.kind.name(),
        "clients": st.clients,
        "processes": st.clients.div_ceil(st.per_process),
        "size": st.size,
    });
    if let Err(e) = run::make_file(&ctx.root, FILE, st.size) {
        return run::with(base, json!({"ok": false, "error": e}));
    }
    let r = match ctx.start(server, "S7", &[], false) {
        Ok(r) => r,
        Err(e) => return run::with(base, json!({"ok": false, "error": e})),
    };
    let addr = r.addr();
    let drops0 = procfs::read_listen_drops(r.port);
    let stop = Arc::new(AtomicBool::new(false));
    let peaks = Arc::new(Mutex::new(Peaks::default()));
    let t0 = Instant::now();
    let mut children = Vec::new();
    let mut error = None;
    let mut left = st.clients;
    let mut seed = 0;
    std::thread::scope(|scope| {
        scope.spawn(|| run::sampler(&r.tracker, &stop, &peaks));
        while left > 0 {
            let n = left.min(st.per_process);
            match spawn(ctx, server.kind.name(), &addr, n, seed, st) {
                Ok(c) => children.push(c),
                Err(e) => error = Some(e),
            }
            left -= n;
            seed += 1;
        }
        let limit = Duration::from_secs(st.max_time_s + 30);
        for c in &mut children {
            let waited = loop {
                match c.try_wait() {
                    Ok(Some(_)) => break true,
                    _ if t0.elapsed() > limit => break false,
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            };
            if !waited {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let duration = t0.elapsed();
    let drops1 = procfs::read_listen_drops(r.port);
    r.stop();
    let mut completed = 0;
    let mut failed = 0;
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    let mut hist: BTreeMap<u64, u64> = BTreeMap::new();
    let mut reports = 0;
    for c in &mut children {
        let mut out = String::new();
        if let Some(mut so) = c.stdout.take() {
            let _ = so.read_to_string(&mut out);
        }
        let Some(v) = out
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
        else {
            continue;
        };
        reports += 1;
        completed += v["completed"].as_u64().unwrap_or(0);
        failed += v["failed"].as_u64().unwrap_or(0);
        if let Some(m) = v["failures"].as_object() {
            for (k, n) in m {
                *failures.entry(k.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
        }
        for pair in v["first_data_us_hist"].as_array().into_iter().flatten() {
            if let (Some(us), Some(n)) = (pair[0].as_u64(), pair[1].as_u64()) {
                *hist.entry(us).or_default() += n;
            }
        }
    }
    let p = peaks.lock().map(|p| *p).unwrap_or_default();
    let ok = error.is_none() && reports == children.len() && completed == st.clients;
    run::with(
        base,
        json!({
            "ok": ok,
            "error": error,
            "completed": completed,
            "failed": failed,
            "failures": failures,
            "busy": failures.get("busy").copied().unwrap_or(0),
            "first_data_ms_p50": quantile_ms(&hist, 0.5),
            "first_data_ms_p99": quantile_ms(&hist, 0.99),
            "duration_s": (duration.as_secs_f64() * 1000.0).round() / 1000.0,
            "listen_drops": match (drops0, drops1) {
                (Some(a), Some(b)) => Some(b.saturating_sub(a)),
                _ => None,
            },
            "server_peak_rss_mib": (p.rss as f64 / 1048576.0 * 10.0).round() / 10.0,
            "server_peak_fds": p.fds,
            "samples": p.samples,
        }),
    )
}

/// A markdown table of storm records.
pub fn table(records: &[Value]) -> String {
    let mut s = String::from(
        "| server | clients | completed | ERROR busy | other failures | first DATA p50 ms | p99 ms | storm s | listener drops | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in records {
        let f = |k: &str| match &r[k] {
            Value::Null => "–".to_string(),
            v => v.to_string(),
        };
        let other = r["failed"].as_u64().unwrap_or(0) - r["busy"].as_u64().unwrap_or(0);
        s.push_str(&format!(
            "| {} | {} | {} | {} | {other} | {} | {} | {} | {} | {} |\n",
            r["server"].as_str().unwrap_or("?"),
            f("clients"),
            f("completed"),
            f("busy"),
            f("first_data_ms_p50"),
            f("first_data_ms_p99"),
            f("duration_s"),
            f("listen_drops"),
            f("server_peak_rss_mib"),
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_quantiles() {
        let h: BTreeMap<u64, u64> = [(1000, 50), (2000, 49), (9000, 1)].into_iter().collect();
        assert_eq!(quantile_ms(&h, 0.5), Some(1.0));
        assert_eq!(quantile_ms(&h, 0.99), Some(2.0));
        assert_eq!(quantile_ms(&h, 1.0), Some(9.0));
        assert_eq!(quantile_ms(&BTreeMap::new(), 0.5), None);
    }
}
