//! Run-wide statistics: counters and latency histograms fed by finished transfers, and the
//! report (human table and one JSON line) computed from them with wall and CPU time.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::{Value, json};

use crate::client::{Outcome, TransferView};

/// Failure lines printed verbatim; beyond this only the counts by kind are shown.
pub const MAX_FAILURE_LINES: usize = 20;

/// What a run counts; kept by [`Stats`] and copied into the [`Report`].
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub launched: u64,
    pub completed: u64,
    pub failed: u64,
    pub failures: BTreeMap<&'static str, u64>,
    pub retransmits: u64,
    pub blocks: u64,
    pub payload_bytes: u64,
    pub out_of_order: u64,
    pub resync_acks: u64,
    pub foreign_tid: u64,
    /// Sends that hit a full socket buffer (EAGAIN/ENOBUFS); handled as lost datagrams.
    pub send_drops: u64,
    /// Datagrams dropped on purpose by `--loss`.
    pub injected_drops: u64,
    /// The run was cut short by `--stall` (the server went silent).
    pub stalled: bool,
    /// Transfers answered with an OACK / with DATA 1 (options ignored).
    pub oack: u64,
    pub no_oack: u64,
    pub blksize_granted: Option<(u16, u16)>,
    pub windowsize_granted: Option<(u16, u16)>,
    /// Completed transfers whose OACK carried tsize / timeout.
    pub tsize_granted: u64,
    pub timeout_granted: u64,
}

#[derive(Debug)]
pub struct Stats {
    pub counts: Counts,
    /// First failures, as "transfer #i (name): kind: detail".
    pub failure_lines: Vec<String>,
    /// Microseconds, completed transfers only.
    pub first_data_us: Histogram<u64>,
    pub total_us: Histogram<u64>,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 1 h at 3 significant digits; auto-resize keeps a longer outlier rather than dropping it.
    let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 3)
        .expect("constant histogram bounds are valid");
    h.auto(true);
    h
}

fn widen(r: &mut Option<(u16, u16)>, v: u16) {
    *r = Some(match *r {
        None => (v, v),
        Some((lo, hi)) => (lo.min(v), hi.max(v)),
    });
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            counts: Counts::default(),
            failure_lines: Vec::new(),
            first_data_us: histogram(),
            total_us: histogram(),
        }
    }

    /// Adds one finished transfer. Returns the failure line if it failed.
    pub fn record(&mut self, t: &impl TransferView) -> Option<String> {
        let c = t.counters();
        let n = &mut self.counts;
        n.retransmits += c.retransmits;
        n.blocks += c.blocks;
        n.payload_bytes += c.bytes;
        n.out_of_order += c.out_of_order;
        n.resync_acks += c.resync_acks;
        n.foreign_tid += c.foreign_tid;
        match t.outcome() {
            Some(Outcome::Done) => {
                n.completed += 1;
                let g = t.granted();
                if g.oack {
                    n.oack += 1;
                } else {
                    n.no_oack += 1;
                }
                widen(
                    &mut n.blksize_granted,
                    g.blksize.unwrap_or(crate::client::DEFAULT_BLKSIZE as u16),
                );
                widen(&mut n.windowsize_granted, g.windowsize.unwrap_or(1));
                n.tsize_granted += u64::from(g.tsize.is_some());
                n.timeout_granted += u64::from(g.timeout.is_some());
                if let Some(d) = t.time_to_first_data() {
                    self.first_data_us.saturating_record(micros(d));
                }
                if let Some(d) = t.total_time() {
                    self.total_us.saturating_record(micros(d));
                }
                None
            }
            Some(Outcome::Failed(f)) => {
                n.failed += 1;
                *n.failures.entry(f.kind.as_str()).or_insert(0) += 1;
                let line = format!(
                    "transfer #{} ({}): {}: {}",
                    t.id(),
                    t.name(),
                    f.kind.as_str(),
                    f.detail
                );
                if self.failure_lines.len() < MAX_FAILURE_LINES {
                    self.failure_lines.push(line.clone());
                }
                Some(line)
            }
            None => None,
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// What the run was asked to do; echoed in the report.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub server: String,
    pub files: Vec<String>,
    /// Expected length of each file, same order.
    pub file_sizes: Vec<u64>,
    pub n: u64,
    pub concurrency: usize,
    pub blksize: Option<u16>,
    pub windowsize: Option<u16>,
    pub tsize: bool,
    pub timeout_s: f64,
    pub retries: u32,
    pub backoff: bool,
    /// Simulated loss probability (`--loss`).
    pub loss: f64,
    /// Uploads (WRQ) instead of downloads.
    pub put: bool,
    /// `--client-style`: "batched" (one epoll thread) or "independent" (thread per client).
    pub client_style: &'static str,
}

/// Client CPU over the run (getrusage RUSAGE_SELF deltas).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub user: Duration,
    pub sys: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

fn percentiles_ms(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        p50: h.value_at_quantile(0.5) as f64 / 1000.0,
        p99: h.value_at_quantile(0.99) as f64 / 1000.0,
        max: h.max() as f64 / 1000.0,
    }
}

/// The figures of one run.
#[derive(Debug, Clone)]
pub struct Report {
    pub info: RunInfo,
    pub elapsed: Duration,
    pub counts: Counts,
    pub transfers_per_s: f64,
    pub mb_per_s: f64,
    pub first_data_ms: Percentiles,
    pub total_ms: Percentiles,
    pub cpu: Cpu,
    /// Client CPU / wall, in percent.
    pub cpu_pct: f64,
    /// Client user+sys CPU per in-order block, in microseconds.
    pub cpu_us_per_block: f64,
}

impl Report {
    pub fn new(info: RunInfo, stats: &Stats, elapsed: Duration, cpu: Cpu) -> Self {
        let secs = elapsed.as_secs_f64();
        let per_s = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
        let cpu_s = (cpu.user + cpu.sys).as_secs_f64();
        let n = &stats.counts;
        Report {
            info,
            elapsed,
            counts: n.clone(),
            transfers_per_s: per_s(n.completed as f64),
            mb_per_s: per_s(n.payload_bytes as f64 / 1e6),
            first_data_ms: percentiles_ms(&stats.first_data_us),
            total_ms: percentiles_ms(&stats.total_us),
            cpu,
            cpu_pct: per_s(cpu_s) * 100.0,
            cpu_us_per_block: if n.blocks > 0 {
                cpu_s * 1e6 / n.blocks as f64
            } else {
                0.0
            },
        }
    }

    pub fn success(&self) -> bool {
        self.counts.failed == 0
            && self.counts.completed == self.info.n
            && self.counts.launched == self.info.n
    }

    pub fn to_json(&self) -> Value {
        let pct = |p: &Percentiles| json!({"p50": round3(p.p50), "p99": round3(p.p99), "max": round3(p.max)});
        let range = |r: Option<(u16, u16)>| match r {
            Some((lo, hi)) => json!([lo, hi]),
            None => Value::Null,
        };
        let mut v = json!({
            "server": self.info.server,
            "files": self.info.files,
            "file_sizes": self.info.file_sizes,
            "n": self.info.n,
            "concurrency": self.info.concurrency,
            "blksize": self.info.blksize,
            "windowsize": self.info.windowsize,
            "tsize": self.info.tsize,
            "timeout_s": self.info.timeout_s,
            "retries": self.info.retries,
            "backoff": self.info.backoff,
            "loss": self.info.loss,
            "ok": self.success(),
            "launched": self.counts.launched,
            "completed": self.counts.completed,
            "failed": self.counts.failed,
            "failures": self.counts.failures,
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
            "transfers_per_s": round3(self.transfers_per_s),
            "mb_per_s": round3(self.mb_per_s),
            "payload_bytes": self.counts.payload_bytes,
            "blocks": self.counts.blocks,
            "client_retransmits": self.counts.retransmits,
            "out_of_order": self.counts.out_of_order,
            "resync_acks": self.counts.resync_acks,
            "foreign_tid": self.counts.foreign_tid,
            "send_drops": self.counts.send_drops,
            "injected_drops": self.counts.injected_drops,
            "stalled": self.counts.stalled,
            "oack": self.counts.oack,
            "no_oack": self.counts.no_oack,
            "blksize_granted": range(self.counts.blksize_granted),
            "windowsize_granted": range(self.counts.windowsize_granted),
            "tsize_granted": self.counts.tsize_granted,
            "timeout_granted": self.counts.timeout_granted,
            "first_data_ms": pct(&self.first_data_ms),
            "total_ms": pct(&self.total_ms),
            "cpu_user_s": round3(self.cpu.user.as_secs_f64()),
            "cpu_sys_s": round3(self.cpu.sys.as_secs_f64()),
            "cpu_pct": round3(self.cpu_pct),
            "cpu_us_per_block": round3(self.cpu_us_per_block),
        });
        v["client_style"] = json!(self.info.client_style);
        v["direction"] = json!(if self.info.put { "put" } else { "get" });
        v
    }

    pub fn to_human(&self) -> String {
        use std::fmt::Write;
        let i = &self.info;
        let opt = |o: Option<u16>| o.map_or("-".to_string(), |v| v.to_string());
        let range = |r: Option<(u16, u16)>| match r {
            Some((lo, hi)) if lo == hi => lo.to_string(),
            Some((lo, hi)) => format!("{lo}..{hi}"),
            None => "-".to_string(),
        };
        let files = if i.files.len() == 1 {
            format!(
                "{} ({} B)",
                i.files[0],
                i.file_sizes.first().copied().unwrap_or(0)
            )
        } else {
            format!("{} files", i.files.len())
        };
        let mut s = String::new();
        let _ = writeln!(
            s,
            "loadtest {}{}  {}  n={} c={} blksize={} windowsize={} tsize={} timeout={}s retries={}{} client-style={}",
            if i.put { "put " } else { "" },
            i.server,
            files,
            i.n,
            i.concurrency,
            opt(i.blksize),
            opt(i.windowsize),
            if i.tsize { "yes" } else { "no" },
            i.timeout_s,
            i.retries,
            if i.backoff { " backoff" } else { "" },
            i.client_style
        );
        if i.loss > 0.0 {
            let _ = writeln!(s, "  simulated loss       {} per datagram", i.loss);
        }
        let status = if self.success() { "OK" } else { "FAILED" };
        let _ = writeln!(s, "  result               {status}");
        if self.counts.stalled {
            let _ = writeln!(
                s,
                "  stalled              the server went silent; the run was cut short"
            );
        }
        let _ = writeln!(
            s,
            "  completed/launched   {}/{} of {}  (failed {})",
            self.counts.completed, self.counts.launched, i.n, self.counts.failed
        );
        if !self.counts.failures.is_empty() {
            let kinds: Vec<String> = self
                .counts
                .failures
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = writeln!(s, "  failures by kind     {}", kinds.join(", "));
        }
        let _ = writeln!(
            s,
            "  elapsed              {:.3} s",
            self.elapsed.as_secs_f64()
        );
        let _ = writeln!(s, "  transfers/s          {:.1}", self.transfers_per_s);
        let _ = writeln!(
            s,
            "  MB/s (payload)       {:.2}   ({} bytes in {} blocks)",
            self.mb_per_s, self.counts.payload_bytes, self.counts.blocks
        );
        let _ = writeln!(
            s,
            "  client retransmits   {}   (out-of-order/dup DATA {}, resync ACKs {}, foreign TID {}, send drops {})",
            self.counts.retransmits,
            self.counts.out_of_order,
            self.counts.resync_acks,
            self.counts.foreign_tid,
            self.counts.send_drops
        );
        let _ = writeln!(
            s,
            "  options              OACK {}, ignored {}; blksize {}, windowsize {}, tsize {}, timeout {}",
            self.counts.oack,
            self.counts.no_oack,
            range(self.counts.blksize_granted),
            range(self.counts.windowsize_granted),
            self.counts.tsize_granted,
            self.counts.timeout_granted
        );
        let _ = writeln!(s, "  latency (ms)              p50        p99        max");
        for (name, p) in [
            ("first DATA", &self.first_data_ms),
            ("total", &self.total_ms),
        ] {
            let _ = writeln!(
                s,
                "    {name:<18} {:>9.3}  {:>9.3}  {:>9.3}",
                p.p50, p.p99, p.max
            );
        }
        let _ = writeln!(
            s,
            "  client CPU           {:.3} s user + {:.3} s sys = {:.0} % of wall, {:.2} us/block",
            self.cpu.user.as_secs_f64(),
            self.cpu.sys.as_secs_f64(),
            self.cpu_pct,
            self.cpu_us_per_block
        );
        s
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ClientConfig, Transfer};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Instant;

    fn info(n: u64) -> RunInfo {
        RunInfo {
            server: "127.0.0.1:69".into(),
            files: vec!["f".into()],
            file_sizes: vec![100],
            n,
            concurrency: 1,
            blksize: None,
            windowsize: None,
            tsize: false,
            timeout_s: 1.0,
            retries: 5,
            backoff: false,
            loss: 0.0,
            put: false,
            client_style: "batched",
        }
    }

    #[test]
    fn records_success_and_failure_and_reports() {
        let server: SocketAddr = "127.0.0.1:69".parse().unwrap();
        let tid: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let file: Arc<[u8]> = vec![7u8; 100].into();
        let t0 = Instant::now();
        let mut stats = Stats::new();
        stats.counts.launched = 2;

        let mut ok = Transfer::new(
            0,
            "f".into(),
            file.clone(),
            ClientConfig::default(),
            server,
            1,
            t0,
        );
        let mut pkt = vec![0, 3, 0, 1];
        pkt.extend_from_slice(&file);
        ok.handle_datagram(t0 + Duration::from_millis(4), tid, &pkt);
        assert_eq!(stats.record(&ok), None);

        let mut bad = Transfer::new(1, "f".into(), file, ClientConfig::default(), server, 1, t0);
        bad.handle_datagram(t0, tid, b"\x00\x05\x00\x02denied\0");
        let line = stats.record(&bad).unwrap();
        assert!(
            line.starts_with("transfer #1 (f): server_error: "),
            "{line}"
        );

        let r = Report::new(info(2), &stats, Duration::from_secs(2), Cpu::default());
        assert!(!r.success());
        assert_eq!(r.counts.completed, 1);
        assert_eq!(r.counts.failures.get("server_error"), Some(&1));
        assert!((r.transfers_per_s - 0.5).abs() < 1e-9);
        assert!((r.total_ms.p50 - 4.0).abs() < 0.01, "{:?}", r.total_ms);
        let j = r.to_json();
        assert_eq!(j["failures"]["server_error"], 1);
        assert_eq!(j["completed"], 1);
        assert_eq!(j["ok"], false);
        assert_eq!(j["payload_bytes"], 100);
        // One line, parseable.
        let line = j.to_string();
        assert!(!line.contains('\n'));
        let back: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["total_ms"]["p50"], j["total_ms"]["p50"]);
        let h = r.to_human();
        assert!(h.contains("FAILED") && h.contains("server_error 1"), "{h}");
    }
}
