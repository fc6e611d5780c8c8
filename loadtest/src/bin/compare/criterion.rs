//! Criterion's results for the micro-benchmarks in benches/*.rs, which scripts/compare.sh
//! runs just before starting `compare`. Criterion leaves one directory per benchmark under
//! target/criterion, holding `new/benchmark.json` (its name) and `new/estimates.json` (its
//! statistics, in ns per iteration); older runs' directories stay there, so only files written
//! since the benches started count.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::Value;

/// Criterion's throughput setting: what one iteration processes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Throughput {
    Elements(u64),
    Bytes(u64),
}

/// One benchmark's figures, in ns per iteration.
#[derive(Debug, Clone, PartialEq)]
pub struct Bench {
    /// Criterion's `full_id`, e.g. "session_step/transfer/16".
    pub id: String,
    pub median_ns: f64,
    pub lower_ns: f64,
    pub upper_ns: f64,
    /// Of the confidence interval (criterion's default 0.95).
    pub level: f64,
    pub throughput: Option<Throughput>,
}

/// What the docs say about the micro-benchmarks of this invocation.
#[derive(Debug, Clone, Default)]
pub struct Run {
    /// The bench command line as run.
    pub command: String,
    /// Results written during this invocation, in `DESCRIPTIONS` order.
    pub benches: Vec<Bench>,
    /// Seconds the benches took (from their start to this program's).
    pub seconds: Option<f64>,
    /// Why the bench command failed, if it did.
    pub error: Option<String>,
}

/// What one iteration of each benchmark does, from benches/*.rs; also the table's order.
const DESCRIPTIONS: &[(&str, &str)] = &[
    (
        "proto_parse/rrq_3_options",
        "`Packet::parse` of a 53-byte RRQ (pxelinux.0, octet, options tsize, blksize, windowsize)",
    ),
    ("proto_parse/ack", "`Packet::parse` of a 4-byte ACK"),
    (
        "proto_parse/data_1468",
        "`Packet::parse` of a DATA packet with 1468 bytes of payload (borrowed, not copied)",
    ),
    (
        "proto_emit/data_header",
        "`emit_data_header`: the 4-byte header of the next DATA block",
    ),
    (
        "proto_emit/oack_3_options",
        "`Packet::Oack(..).emit` of an OACK with blksize 1468, tsize 26828, windowsize 4",
    ),
    (
        "proto_emit/error",
        "`emit_error`: ERROR File not found, message \"file not found\"",
    ),
    (
        "session_step/transfer/1",
        "one step of a bare `Transfer`, windowsize 1, blksize 1468: `handle_datagram` of the ACK of \
         the newest block, `poll_transmit` until `None` (1 DATA), `poll_timeout`",
    ),
    (
        "session_step/endpoint/1",
        "the same step through `Endpoint` (slab lookup and peer check added), windowsize 1",
    ),
    (
        "session_step/transfer/16",
        "one step of a bare `Transfer`, windowsize 16: one ACK in, 16 DATA out, `poll_timeout`",
    ),
    (
        "session_step/endpoint/16",
        "the same step through `Endpoint`, windowsize 16: one ACK in, 16 DATA out",
    ),
    (
        "timer_100k/rearm",
        "`TimerWheel::arm` of an armed key to another deadline (100k timers armed)",
    ),
    (
        "timer_100k/cancel_then_arm",
        "`cancel` of an armed key, then `arm` it again (100k armed)",
    ),
    (
        "timer_100k/cancel",
        "`cancel` of one armed key (100k armed; re-arming not timed)",
    ),
    (
        "timer_100k/expire_per_timer",
        "one timer returned by `expire` while 100k timers due within 5 s are drained in 1 ms \
         steps (refill not timed)",
    ),
    (
        "timer_100k/expire_idle_step",
        "one `expire` call for a 100 µs step with nothing due (100k armed, 10 days out)",
    ),
    (
        "files/open_read_cached_octet",
        "`FileRoot::open_read` of a 64 KiB file already in the mapping cache: openat2, fstat, \
         cache lookup under its lock, close",
    ),
    (
        "files/netascii_encode/1MiB_text",
        "`netascii_encode` of 1 MiB of text (LF line ends, an occasional CR)",
    ),
    (
        "files/netascii_encode/1MiB_random",
        "`netascii_encode` of 1 MiB of pseudo-random bytes",
    ),
];

/// What one iteration of `id` does; "–" for a benchmark this table does not know.
pub fn describe(id: &str) -> &'static str {
    DESCRIPTIONS
        .iter()
        .find(|(k, _)| *k == id)
        .map_or("–", |(_, v)| v)
}

/// What `read` found.
#[derive(Debug, Default)]
pub struct Found {
    pub benches: Vec<Bench>,
    /// Results older than `since`: from an earlier run, left out.
    pub stale: usize,
    /// Result directories that could not be read, with the reason.
    pub problems: Vec<String>,
}

/// Reads every `<bench>/new/{benchmark,estimates}.json` under `dir` whose estimates were
/// written at or after `since`.
pub fn read(dir: &Path, since: SystemTime) -> Result<Found, String> {
    let mut news = Vec::new();
    find_new_dirs(dir, &mut news).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut found = Found::default();
    for new in news {
        let est = new.join("estimates.json");
        let modified = match fs::metadata(&est).and_then(|m| m.modified()) {
            Ok(t) => t,
            Err(e) => {
                found.problems.push(format!("{}: {e}", est.display()));
                continue;
            }
        };
        if modified < since {
            found.stale += 1;
            continue;
        }
        match parse(&new) {
            Ok(b) => found.benches.push(b),
            Err(e) => found.problems.push(format!("{}: {e}", new.display())),
        }
    }
    found.benches.sort_by_key(|b| {
        let known = DESCRIPTIONS.iter().position(|(k, _)| *k == b.id);
        (known.unwrap_or(usize::MAX), b.id.clone())
    });
    Ok(found)
}

/// Collects the `new` directories holding a benchmark.json (group ids may contain '/',
/// so the depth varies).
fn find_new_dirs(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let e = e?;
        if !e.file_type()?.is_dir() {
            continue;
        }
        let p = e.path();
        if e.file_name() == "new" && p.join("benchmark.json").is_file() {
            out.push(p);
        } else if e.file_name() != "report" {
            find_new_dirs(&p, out)?;
        }
    }
    Ok(())
}

fn read_json(p: &Path) -> Result<Value, String> {
    let text = fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

/// One benchmark from its `new` directory.
fn parse(new: &Path) -> Result<Bench, String> {
    let meta = read_json(&new.join("benchmark.json"))?;
    let est = read_json(&new.join("estimates.json"))?;
    let id = meta["full_id"]
        .as_str()
        .ok_or("benchmark.json has no full_id")?
        .to_string();
    let m = &est["median"];
    let ci = &m["confidence_interval"];
    let num = |v: &Value, what: &str| {
        v.as_f64()
            .ok_or_else(|| format!("estimates.json has no {what}"))
    };
    let throughput = match &meta["throughput"] {
        Value::Object(t) => t
            .get("Elements")
            .and_then(Value::as_u64)
            .map(Throughput::Elements)
            .or_else(|| {
                t.get("Bytes")
                    .and_then(Value::as_u64)
                    .map(Throughput::Bytes)
            }),
        _ => None,
    };
    Ok(Bench {
        id,
        median_ns: num(&m["point_estimate"], "median.point_estimate")?,
        lower_ns: num(&ci["lower_bound"], "median.confidence_interval.lower_bound")?,
        upper_ns: num(&ci["upper_bound"], "median.confidence_interval.upper_bound")?,
        level: ci["confidence_level"].as_f64().unwrap_or(0.95),
        throughput,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let p = std::env::temp_dir()
                .join(format!("compare-criterion-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// Writes a benchmark's `new` directory the way criterion 0.8 does.
    fn write_bench(
        root: &Path,
        dir: &str,
        full_id: &str,
        median: f64,
        ci: (f64, f64),
        throughput: &str,
    ) -> PathBuf {
        let new = root.join(dir).join("new");
        fs::create_dir_all(&new).unwrap();
        fs::write(
            new.join("benchmark.json"),
            format!(
                r#"{{"group_id":"g","function_id":null,"value_str":null,"throughput":{throughput},"full_id":"{full_id}","directory_name":"{dir}","title":"{full_id}"}}"#
            ),
        )
        .unwrap();
        let est = |p: f64, lo: f64, hi: f64| {
            format!(
                r#"{{"confidence_interval":{{"confidence_level":0.95,"lower_bound":{lo},"upper_bound":{hi}}},"point_estimate":{p},"standard_error":1.0}}"#
            )
        };
        fs::write(
            new.join("estimates.json"),
            format!(
                r#"{{"mean":{},"median":{},"median_abs_dev":{},"slope":{},"std_dev":{}}}"#,
                est(median * 1.1, 1.0, 2.0),
                est(median, ci.0, ci.1),
                est(3.0, 1.0, 4.0),
                est(median * 1.2, 1.0, 2.0),
                est(5.0, 4.0, 6.0)
            ),
        )
        .unwrap();
        new
    }

    #[test]
    fn reads_fresh_results_and_ignores_stale_ones() {
        let t = TempDir::new("read");
        let root = &t.0;
        write_bench(
            root,
            "session_step/transfer/16",
            "session_step/transfer/16",
            314.1,
            (297.8, 335.0),
            r#"{"Elements":16}"#,
        );
        write_bench(
            root,
            "files_netascii_encode/1MiB_text",
            "files/netascii_encode/1MiB_text",
            1.5e6,
            (1.4e6, 1.6e6),
            r#"{"Bytes":1048576}"#,
        );
        write_bench(root, "zzz_unknown", "zzz/unknown", 2.0, (1.0, 3.0), "null");
        write_bench(
            root,
            "proto_parse/ack",
            "proto_parse/ack",
            7.6,
            (7.5, 7.7),
            "null",
        );
        // An earlier run's result, an hour old.
        let old = write_bench(
            root,
            "timer_100k/rearm",
            "timer_100k/rearm",
            25.0,
            (24.0, 26.0),
            "null",
        );
        let hour_ago = SystemTime::now() - Duration::from_secs(3600);
        fs::File::options()
            .write(true)
            .open(old.join("estimates.json"))
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
        // Criterion's reports and baselines are not results of this run.
        fs::create_dir_all(root.join("proto_parse/ack/report")).unwrap();
        fs::create_dir_all(root.join("proto_parse/ack/base")).unwrap();
        // A broken result is reported, not fatal.
        let bad = root.join("broken/new");
        fs::create_dir_all(&bad).unwrap();
        fs::write(bad.join("benchmark.json"), "{").unwrap();
        fs::write(bad.join("estimates.json"), "{}").unwrap();

        let since = SystemTime::now() - Duration::from_secs(60);
        let f = read(root, since).unwrap();
        assert_eq!(f.stale, 1);
        assert_eq!(f.problems.len(), 1, "{:?}", f.problems);
        let ids: Vec<&str> = f.benches.iter().map(|b| b.id.as_str()).collect();
        // Known ones in the table's order, unknown ones last.
        assert_eq!(
            ids,
            [
                "proto_parse/ack",
                "session_step/transfer/16",
                "files/netascii_encode/1MiB_text",
                "zzz/unknown"
            ]
        );
        assert_eq!(
            f.benches[1],
            Bench {
                id: "session_step/transfer/16".into(),
                median_ns: 314.1,
                lower_ns: 297.8,
                upper_ns: 335.0,
                level: 0.95,
                throughput: Some(Throughput::Elements(16)),
            }
        );
        assert_eq!(f.benches[2].throughput, Some(Throughput::Bytes(1 << 20)));
        assert_eq!(f.benches[0].throughput, None);

        // With an older start, the earlier run's result counts too.
        let f = read(root, hour_ago - Duration::from_secs(1)).unwrap();
        assert_eq!((f.stale, f.benches.len()), (0, 5));
        assert!(read(&root.join("absent"), since).is_err());
    }

    #[test]
    fn descriptions_lookup() {
        assert_eq!(
            describe("proto_parse/ack"),
            "`Packet::parse` of a 4-byte ACK"
        );
        assert_eq!(describe("nope"), "–");
        // No id twice.
        for (i, (k, _)) in DESCRIPTIONS.iter().enumerate() {
            assert!(DESCRIPTIONS[i + 1..].iter().all(|(o, _)| o != k), "{k}");
        }
    }
}
