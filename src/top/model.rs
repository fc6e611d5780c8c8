//! The pure parts of `ringtftpd top`: the Prometheus text it reads,
//! counter rates between two polls, per-transfer rates, percentiles and
//! the table's sort. No terminal, no network, no clock: times are
//! arguments.

use std::collections::HashMap;
use std::time::Duration;

use clap::ValueEnum;
use hdrhistogram::Histogram;

use super::live::{TransferRow, Transfers};

/// One sample of the text format: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Whether every `(key, value)` of `filter` is among its labels.
    fn matches(&self, filter: &[(&str, &str)]) -> bool {
        filter.iter().all(|(k, v)| self.label(k) == Some(v))
    }
}

/// A parsed `/metrics` answer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

/// Parses one sample line (not a comment); None if it is not one.
pub fn parse_sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            // A label name up to '=', or the closing brace.
            let mut key = String::new();
            loop {
                let (i, c) = chars.next()?;
                match c {
                    '}' => {
                        rest = &inner[i + 1..];
                        break;
                    }
                    '=' => break,
                    ',' | ' ' if key.is_empty() => {}
                    c => key.push(c),
                }
            }
            if key.is_empty() {
                break; // the closing brace
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        c => value.push(c),
                    },
                    c => value.push(c),
                }
            }
            labels.push((key, value));
        }
    }
    // The value; a timestamp may follow.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        Metrics {
            samples: text.lines().filter_map(parse_sample).collect(),
        }
    }

    /// The sum of the samples of `name` whose labels include `filter`.
    pub fn sum(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name && s.matches(filter))
            // Not `sum`: an empty f64 sum is -0, shown as "-0".
            .fold(0.0, |sum, s| sum + s.value)
    }

    /// Whether any sample of `name` is there.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// The sums of `name` by the values of `label`, in first-seen order.
    pub fn by_label(&self, name: &str, label: &str) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = Vec::new();
        for s in self.samples.iter().filter(|s| s.name == name) {
            let Some(v) = s.label(label) else { continue };
            match out.iter_mut().find(|(k, _)| k == v) {
                Some((_, sum)) => *sum += s.value,
                None => out.push((v.to_string(), s.value)),
            }
        }
        out
    }
}

/// A counter's rate between two polls `dt` apart: per second, never
/// negative (a restarted server's counters start again at 0).
pub fn rate(before: f64, after: f64, dt: Duration) -> f64 {
    let secs = dt.as_secs_f64();
    if secs <= 0.0 || after < before {
        return 0.0;
    }
    (after - before) / secs
}

/// Two polls of `/metrics`: totals now, rates since the one before.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    pub now: Metrics,
    pub before: Option<(Metrics, Duration)>,
}

impl Counters {
    /// `name`'s total now (summed over `filter`).
    pub fn total(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        self.now.sum(name, filter)
    }

    /// `name`'s rate per second since the poll before (0 on the first).
    pub fn rate(&self, name: &str, filter: &[(&str, &str)]) -> f64 {
        match &self.before {
            Some((before, dt)) => rate(before.sum(name, filter), self.now.sum(name, filter), *dt),
            None => 0.0,
        }
    }

    /// Takes a new poll, `dt` after the current one.
    pub fn push(&mut self, metrics: Metrics, dt: Duration) {
        let old = std::mem::replace(&mut self.now, metrics);
        self.before = Some((old, dt));
    }
}

/// The table's sort columns (keys in brackets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    /// [p] share of the file done
    Progress,
    /// [r] bytes per second over the last poll
    Rate,
    /// [t] retransmitted packets
    Retransmits,
    /// [b] bytes done
    Bytes,
    /// [e] time since the request
    Elapsed,
    /// [f] file name
    File,
    /// [c] client address
    Client,
    /// [s] shard
    Shard,
}

impl SortKey {
    pub const ALL: [SortKey; 8] = [
        SortKey::Progress,
        SortKey::Rate,
        SortKey::Retransmits,
        SortKey::Bytes,
        SortKey::Elapsed,
        SortKey::File,
        SortKey::Client,
        SortKey::Shard,
    ];

    /// The key that picks it.
    pub fn key(self) -> char {
        match self {
            SortKey::Progress => 'p',
            SortKey::Rate => 'r',
            SortKey::Retransmits => 't',
            SortKey::Bytes => 'b',
            SortKey::Elapsed => 'e',
            SortKey::File => 'f',
            SortKey::Client => 'c',
            SortKey::Shard => 's',
        }
    }

    pub fn from_key(c: char) -> Option<SortKey> {
        SortKey::ALL.into_iter().find(|k| k.key() == c)
    }

    /// Numbers sort largest first; names and addresses A to Z.
    pub fn descending(self) -> bool {
        !matches!(self, SortKey::File | SortKey::Client | SortKey::Shard)
    }

    pub fn name(self) -> &'static str {
        match self {
            SortKey::Progress => "progress",
            SortKey::Rate => "rate",
            SortKey::Retransmits => "retransmits",
            SortKey::Bytes => "bytes",
            SortKey::Elapsed => "elapsed",
            SortKey::File => "file",
            SortKey::Client => "client",
            SortKey::Shard => "shard",
        }
    }
}

/// A live transfer with what the viewer worked out.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewRow {
    pub row: TransferRow,
    /// Bytes per second between the last two polls (or since its start,
    /// on its first).
    pub rate: f64,
}

/// Per-transfer rates from one `/transfers` to the next, by row id.
#[derive(Debug, Default)]
pub struct RowRates {
    /// id -> (bytes, elapsed ms at its shard's publish, rate).
    last: HashMap<u64, (u64, u64, f64)>,
}

impl RowRates {
    /// The rows of `transfers` with their rates; forgets the ended ones.
    pub fn update(&mut self, transfers: &Transfers) -> Vec<ViewRow> {
        let mut next = HashMap::with_capacity(transfers.transfers.len());
        let rows = transfers
            .transfers
            .iter()
            .map(|row| {
                let rate = match self.last.get(&row.id) {
                    // The same publish seen again: keep its rate.
                    Some(&(_, ms, r)) if row.elapsed_ms <= ms => r,
                    Some(&(bytes, ms, _)) => rate(
                        bytes as f64,
                        row.bytes as f64,
                        Duration::from_millis(row.elapsed_ms - ms),
                    ),
                    None => rate(0.0, row.bytes as f64, Duration::from_millis(row.elapsed_ms)),
                };
                next.insert(row.id, (row.bytes, row.elapsed_ms, rate));
                ViewRow {
                    row: row.clone(),
                    rate,
                }
            })
            .collect();
        self.last = next;
        rows
    }
}

/// Sorts `rows` by `key` (its natural direction, flipped by `reversed`),
/// ties by id so that the order does not flicker.
pub fn sort_rows(rows: &mut [ViewRow], key: SortKey, reversed: bool) {
    use std::cmp::Ordering;
    let natural = |a: &ViewRow, b: &ViewRow| -> Ordering {
        let (x, y) = (&a.row, &b.row);
        match key {
            SortKey::Progress => x
                .progress()
                .unwrap_or(-1.0)
                .total_cmp(&y.progress().unwrap_or(-1.0)),
            SortKey::Rate => a.rate.total_cmp(&b.rate),
            SortKey::Retransmits => x.retransmits.cmp(&y.retransmits),
            SortKey::Bytes => x.bytes.cmp(&y.bytes),
            SortKey::Elapsed => x.elapsed_ms.cmp(&y.elapsed_ms),
            SortKey::File => x.file.cmp(&y.file),
            SortKey::Client => {
                (x.client.ip(), x.client.port()).cmp(&(y.client.ip(), y.client.port()))
            }
            SortKey::Shard => x.shard.cmp(&y.shard),
        }
    };
    let flip = key.descending() != reversed;
    rows.sort_by(|a, b| {
        let order = natural(a, b);
        let order = if flip { order.reverse() } else { order };
        order.then(a.row.id.cmp(&b.row.id))
    });
}

/// The largest value `percentiles` tells apart (1 TiB/s as a rate).
const PERCENTILE_MAX: u64 = 1 << 40;

/// p50, p90 and p99 of `values` (hdrhistogram, 3 significant digits,
/// values from 1 to `PERCENTILE_MAX`, larger ones counted as that);
/// None when there are none.
pub fn percentiles(values: impl Iterator<Item = f64>) -> Option<[f64; 3]> {
    // Fixed bounds: an auto-resizing histogram's saturating record clamps
    // to its first, tiny, range.
    let mut h = Histogram::<u64>::new_with_bounds(1, PERCENTILE_MAX, 3).ok()?;
    for v in values {
        if v.is_finite() && v >= 0.0 {
            h.saturating_record(v.round() as u64);
        }
    }
    if h.is_empty() {
        return None;
    }
    Some([0.5, 0.9, 0.99].map(|q| h.value_at_quantile(q) as f64))
}

/// `bytes` in powers of 1024 with one decimal: `1.5M`, `820K`, `12B`.
pub fn human_bytes(bytes: f64) -> String {
    let units = ["B", "K", "M", "G", "T"];
    // Not `max`: it may keep -0.
    let mut v = if bytes > 0.0 { bytes } else { 0.0 };
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < units.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v >= 100.0 {
        format!("{v:.0}{}", units[unit])
    } else {
        format!("{v:.1}{}", units[unit])
    }
}

/// Seconds as `12.3s`, `4m05s` or `2h03m`.
pub fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{:.1}s", ms as f64 / 1000.0),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s / 60) % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP ringtftpd_requests Datagrams\n\
        # TYPE ringtftpd_requests counter\n\
        ringtftpd_requests_total{kind=\"rrq\"} 6\n\
        ringtftpd_requests_total{kind=\"wrq\"} 1\n\
        ringtftpd_refusals_total{reason=\"not_found\"} 3\n\
        ringtftpd_transfers_active{shard=\"0\",direction=\"download\"} 2\n\
        ringtftpd_transfers_active{shard=\"1\",direction=\"download\"} 1\n\
        ringtftpd_transfers_active{shard=\"1\",direction=\"upload\"} 4\n\
        ringtftpd_transfer_duration_seconds_bucket{direction=\"download\",le=\"+Inf\"} 5\n\
        odd{a=\"x\\\"y,z\\\\\",b=\"\"} 1.5e3 1700000000\n\
        process_cpu_seconds_total 0.25\n\
        # EOF\n";

    #[test]
    fn the_text_format_parses() {
        let m = Metrics::parse(TEXT);
        assert_eq!(m.samples.len(), 9);
        assert_eq!(m.sum("ringtftpd_requests_total", &[]), 7.0);
        assert_eq!(m.sum("ringtftpd_requests_total", &[("kind", "rrq")]), 6.0);
        assert_eq!(m.sum("ringtftpd_transfers_active", &[("shard", "1")]), 5.0);
        assert_eq!(
            m.by_label("ringtftpd_transfers_active", "shard"),
            [("0".to_string(), 2.0), ("1".to_string(), 5.0)]
        );
        let odd = m.samples.iter().find(|s| s.name == "odd").unwrap();
        assert_eq!(odd.label("a"), Some("x\"y,z\\"));
        assert_eq!(odd.label("b"), Some(""));
        assert_eq!(odd.value, 1500.0);
        let inf = &m.samples[6];
        assert_eq!(inf.label("le"), Some("+Inf"));
        assert_eq!(m.sum("process_cpu_seconds_total", &[]), 0.25);
        assert_eq!(format!("{:.0}", m.sum("absent", &[])), "0");
        assert!(parse_sample("garbage{").is_none());
        assert!(parse_sample("name{a=unquoted} 1").is_none());
        assert!(parse_sample("name notanumber").is_none());
    }

    #[test]
    fn rates_are_per_second_and_never_negative() {
        assert_eq!(rate(10.0, 30.0, Duration::from_millis(500)), 40.0);
        assert_eq!(rate(30.0, 10.0, Duration::from_secs(1)), 0.0, "a restart");
        assert_eq!(rate(0.0, 10.0, Duration::ZERO), 0.0);
        let mut c = Counters::default();
        c.push(
            Metrics::parse("x_total{k=\"a\"} 100\nx_total{k=\"b\"} 1\n"),
            Duration::ZERO,
        );
        assert_eq!(c.rate("x_total", &[]), 0.0, "no poll before yet");
        c.push(
            Metrics::parse("x_total{k=\"a\"} 300\nx_total{k=\"b\"} 2\n"),
            Duration::from_secs(2),
        );
        assert_eq!(c.rate("x_total", &[("k", "a")]), 100.0);
        assert_eq!(c.rate("x_total", &[]), 100.5);
        assert_eq!(c.total("x_total", &[]), 302.0);
    }

    fn row(id: u64, file: &str, bytes: u64, total: Option<u64>, elapsed_ms: u64) -> TransferRow {
        TransferRow {
            id,
            shard: (id % 2) as u16,
            client: format!("127.0.0.{}:{}", id + 1, 1000 + id).parse().unwrap(),
            file: file.to_string(),
            direction: "download".to_string(),
            bytes,
            total,
            retransmits: id * 3 % 5,
            blksize: 512,
            windowsize: 1,
            elapsed_ms,
        }
    }

    fn transfers(rows: Vec<TransferRow>) -> Transfers {
        Transfers {
            transfers: rows,
            ..Transfers::default()
        }
    }

    #[test]
    fn row_rates_follow_each_transfer() {
        let mut rates = RowRates::default();
        let first = rates.update(&transfers(vec![row(1, "a", 1000, None, 1000)]));
        assert_eq!(first[0].rate, 1000.0, "since its start");
        let same = rates.update(&transfers(vec![row(1, "a", 1000, None, 1000)]));
        assert_eq!(same[0].rate, 1000.0, "the same publish again");
        let later = rates.update(&transfers(vec![
            row(1, "a", 4000, None, 1500),
            row(2, "b", 10, None, 0),
        ]));
        assert_eq!(later[0].rate, 6000.0);
        assert_eq!(later[1].rate, 0.0);
        // An ended transfer is forgotten.
        rates.update(&transfers(vec![row(2, "b", 10, None, 10)]));
        assert!(!rates.last.contains_key(&1));
    }

    #[test]
    fn sorting_changes_the_order() {
        let mut rows: Vec<ViewRow> = [
            (row(0, "gamma", 900, Some(1000), 30), 10.0),
            (row(1, "alpha", 100, Some(1000), 20), 30.0),
            (row(2, "beta", 500, None, 10), 20.0),
        ]
        .into_iter()
        .map(|(row, rate)| ViewRow { row, rate })
        .collect();
        let files = |rows: &[ViewRow]| rows.iter().map(|r| r.row.file.clone()).collect::<Vec<_>>();
        sort_rows(&mut rows, SortKey::Progress, false);
        assert_eq!(
            files(&rows),
            ["gamma", "alpha", "beta"],
            "unknown total last"
        );
        sort_rows(&mut rows, SortKey::File, false);
        assert_eq!(files(&rows), ["alpha", "beta", "gamma"]);
        sort_rows(&mut rows, SortKey::File, true);
        assert_eq!(files(&rows), ["gamma", "beta", "alpha"]);
        sort_rows(&mut rows, SortKey::Rate, false);
        assert_eq!(files(&rows), ["alpha", "beta", "gamma"]);
        sort_rows(&mut rows, SortKey::Bytes, false);
        assert_eq!(files(&rows), ["gamma", "beta", "alpha"]);
        sort_rows(&mut rows, SortKey::Elapsed, true);
        assert_eq!(files(&rows), ["beta", "alpha", "gamma"]);
        sort_rows(&mut rows, SortKey::Client, false);
        assert_eq!(files(&rows), ["gamma", "alpha", "beta"]);
        for key in SortKey::ALL {
            assert_eq!(SortKey::from_key(key.key()), Some(key));
        }
        assert_eq!(SortKey::from_key('q'), None);
    }

    #[test]
    fn percentiles_and_units() {
        assert_eq!(percentiles(std::iter::empty()), None);
        let p = percentiles((1..=100).map(f64::from)).unwrap();
        assert_eq!(p, [50.0, 90.0, 99.0]);
        let p = percentiles([18_200.0, 13_500.0, 27_000.0, 1e15].into_iter()).unwrap();
        assert_eq!(p[0], 18_207.0, "3 significant digits: {p:?}");
        assert!(p[2] >= 0.999 * PERCENTILE_MAX as f64, "{p:?}");
        assert_eq!(human_bytes(12.0), "12B");
        assert_eq!(human_bytes(-0.0), "0B");
        assert_eq!(human_bytes(1536.0), "1.5K");
        assert_eq!(human_bytes(300.0 * 1024.0 * 1024.0), "300M");
        assert_eq!(human_duration(1234), "1.2s");
        assert_eq!(human_duration(65_000), "1m05s");
        assert_eq!(human_duration(3_726_000), "1h02m");
    }
}
