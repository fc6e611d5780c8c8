//! `--metrics`: the built binary on loopback, real clients (tftp-hpa for
//! downloads, the raw client for an upload and a silent download), and
//! scrapes of `/metrics`, `/healthz` and `/readyz` with a plain std
//! `TcpStream` GET. The counters must match what the clients did, as
//! differences from a scrape taken before (the start-up probe's own
//! request is in the first one). `promtool check metrics` (Debian's
//! prometheus package) must accept the output.
//!
//! A missing client prints `SKIP: <client> not installed`, or fails when
//! `RINGTFTPD_REQUIRE_CLIENTS=1` (scripts/test.sh sets it).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A loopback TCP port free a moment ago, for `--metrics`.
fn free_tcp_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a TCP port");
    l.local_addr().expect("local_addr")
}

/// `GET path` over HTTP/1.0: the status and the body.
fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8(raw).map_err(|e| format!("not UTF-8: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no header end in {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// The samples of a scrape, by their full name with labels as printed.
#[derive(Debug, Clone)]
struct Scrape {
    text: String,
}

impl Scrape {
    fn take(addr: SocketAddr) -> Scrape {
        let (status, text) = http_get(addr, "/metrics").expect("scrape /metrics");
        assert_eq!(status, 200, "/metrics answered {status}: {text}");
        Scrape { text }
    }

    /// The value of `series` (e.g. `ringtftpd_requests_total{kind="rrq"}`);
    /// 0 when absent.
    fn get(&self, series: &str) -> f64 {
        self.text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                (name == series).then(|| value.parse::<f64>().ok())?
            })
            .unwrap_or(0.0)
    }

    /// The sum of every series whose name starts with `prefix`.
    fn sum(&self, prefix: &str) -> f64 {
        self.text
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }
}

/// Scrapes until `done(scrape)` or 5 s have passed (shards publish their
/// counters once per loop turn; a finished transfer shows a moment after
/// the client's last ACK).
fn scrape_until(addr: SocketAddr, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = Scrape::take(addr);
        if done(&s) || Instant::now() >= deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn start(metrics: SocketAddr, extra: &[&str]) -> Server {
    let mut extra_args: Vec<String> = vec!["--metrics".into(), metrics.to_string()];
    extra_args.extend(extra.iter().map(|s| s.to_string()));
    let server = Server::start_with(ServerOpts {
        uploads: true,
        extra_args,
        kind: Some(ServerKind::Ringtftpd),
        ..ServerOpts::default()
    });
    // The TFTP port answers (the start-up probe); the metrics port is
    // served by then as well (bound before the shards start).
    let (status, body) = http_get(metrics, "/readyz").expect("GET /readyz");
    assert_eq!(status, 200, "/readyz: {body}");
    // The probe that was answered has finished before a test takes its
    // first scrape. (A probe sent before the server was up, given up by
    // its client, may still be retransmitted to for a while: the tests
    // allow for such a stray transfer in the gauges and the histogram.)
    let probe = "ringtftpd_transfers_finished_total{direction=\"download\",outcome=\"completed\"}";
    let settled = scrape_until(metrics, |now| now.get(probe) >= 1.0);
    assert!(settled.get(probe) >= 1.0, "{}", settled.text);
    server
}

/// Downloads finished, whatever their outcome.
fn downloads_finished(s: &Scrape) -> f64 {
    s.sum("ringtftpd_transfers_finished_total{direction=\"download\",")
}

fn active(s: &Scrape) -> f64 {
    s.sum("ringtftpd_transfers_active{")
}

#[test]
fn counters_match_what_the_clients_did() {
    if !have_tftp_hpa() {
        return;
    }
    let metrics = free_tcp_addr();
    let mut s = start(metrics, &[]);
    let (status, body) = http_get(metrics, "/healthz").expect("GET /healthz");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let before = Scrape::take(metrics);

    let files = ["b513.bin", "mib.bin", "sub/nested.bin"];
    let mut sizes = 0usize;
    let mut min_blocks = 0usize;
    for name in files {
        let (out, dest) = tftp_hpa_get(&s, name, "octet");
        let expected = s.source(name);
        assert_download(name, &out, &dest, &expected);
        sizes += expected.len();
        min_blocks += expected.len() / 512 + 1;
    }
    // Refused: ERROR 1 from the listener.
    let (out, _) = tftp_hpa_get(&s, "no-such-file.bin", "octet");
    let said = String::from_utf8_lossy(&[&out.stdout[..], &out.stderr[..]].concat()).into_owned();
    assert!(said.contains("Error code 1"), "tftp said: {said}");
    // One upload: 5 full blocks and a short one.
    let upload = random_bytes(99, 3000);
    let client = RawClient::new(s.addr());
    raw_put(&client, "up.bin", "octet", &[], &upload, None).expect("upload");

    let delta = |after: &Scrape, series: &str| after.get(series) - before.get(series);
    let after = scrape_until(metrics, |now| {
        now.get("ringtftpd_transfers_finished_total{direction=\"download\",outcome=\"completed\"}")
            - before.get(
                "ringtftpd_transfers_finished_total{direction=\"download\",outcome=\"completed\"}",
            )
            >= 3.0
            && now.get(
                "ringtftpd_transfers_finished_total{direction=\"upload\",outcome=\"completed\"}",
            ) >= 1.0
    });
    let d = |series: &str| delta(&after, series);
    let report = || format!("before:\n{}\nafter:\n{}", before.text, after.text);

    let requests = |kind: &str, outcome: &str| {
        d(&format!(
            "ringtftpd_requests_total{{kind=\"{kind}\",outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(requests("rrq", "started"), 3.0, "{}", report());
    assert_eq!(requests("rrq", "refused"), 1.0, "{}", report());
    assert_eq!(requests("wrq", "started"), 1.0, "{}", report());
    assert_eq!(requests("wrq", "refused"), 0.0, "{}", report());
    assert_eq!(
        d("ringtftpd_refusals_total{reason=\"not_found\"}"),
        1.0,
        "{}",
        report()
    );
    // tftp-hpa answers the ERROR 1 with an ACK 1 to the listening port,
    // which is no request: refused as malformed, with ERROR 4.
    assert_eq!(requests("other", "refused"), 1.0, "{}", report());
    let ignored = after.sum("ringtftpd_requests_total{kind=\"")
        - before.sum("ringtftpd_requests_total{kind=\"")
        - 6.0;
    assert_eq!(ignored, 0.0, "nothing else came: {}", report());
    assert_eq!(
        d("ringtftpd_refusals_total{reason=\"malformed\"}"),
        1.0,
        "{}",
        report()
    );
    let refusals = after.sum("ringtftpd_refusals_total{") - before.sum("ringtftpd_refusals_total{");
    assert_eq!(refusals, 2.0, "nothing else was refused: {}", report());
    assert_eq!(
        d("ringtftpd_errors_sent_total{code=\"1\"}"),
        1.0,
        "{}",
        report()
    );
    assert_eq!(
        d("ringtftpd_errors_sent_total{code=\"4\"}"),
        1.0,
        "{}",
        report()
    );
    assert_eq!(
        d("ringtftpd_transfers_started_total{direction=\"download\"}"),
        3.0,
        "{}",
        report()
    );
    assert_eq!(
        d("ringtftpd_transfers_finished_total{direction=\"download\",outcome=\"completed\"}"),
        3.0,
        "{}",
        report()
    );
    assert_eq!(
        d("ringtftpd_transfers_started_total{direction=\"upload\"}"),
        1.0,
        "{}",
        report()
    );
    assert_eq!(
        d("ringtftpd_transfers_finished_total{direction=\"upload\",outcome=\"completed\"}"),
        1.0,
        "{}",
        report()
    );
    let bytes_sent = d("ringtftpd_data_bytes_total{direction=\"sent\"}");
    assert!(
        bytes_sent >= sizes as f64,
        "{bytes_sent} < {sizes}: {}",
        report()
    );
    let blocks_sent = d("ringtftpd_data_blocks_total{direction=\"sent\"}");
    assert!(
        blocks_sent >= min_blocks as f64,
        "{blocks_sent} < {min_blocks}: {}",
        report()
    );
    assert_eq!(
        d("ringtftpd_data_bytes_total{direction=\"received\"}"),
        3000.0,
        "{}",
        report()
    );
    assert_eq!(
        d("ringtftpd_data_blocks_total{direction=\"received\"}"),
        6.0,
        "{}",
        report()
    );
    // Every DATA block was ACKed (and the upload's DATA came in).
    assert!(
        d("ringtftpd_datagrams_received_total") >= (min_blocks + 6) as f64,
        "{}",
        report()
    );
    // One observation per finished download: ours, and a stray probe's
    // if one ended meanwhile.
    let finished = downloads_finished(&after) - downloads_finished(&before);
    assert!(finished >= 3.0, "{}", report());
    assert_eq!(
        d("ringtftpd_transfer_duration_seconds_count{direction=\"download\"}"),
        finished,
        "{}",
        report()
    );
    assert_eq!(
        d("ringtftpd_transfer_duration_seconds_bucket{direction=\"download\",le=\"+Inf\"}"),
        finished,
        "{}",
        report()
    );
    assert!(d("ringtftpd_transfer_duration_seconds_sum{direction=\"download\"}") > 0.0);
    assert_eq!(
        d("ringtftpd_transfer_throughput_bytes_per_second_count{direction=\"download\"}"),
        3.0,
        "{}",
        report()
    );
    assert_eq!(
        d("ringtftpd_transfer_throughput_bytes_per_second_count{direction=\"upload\"}"),
        1.0,
        "{}",
        report()
    );
    assert_eq!(
        d("ringtftpd_time_to_first_data_seconds_count{direction=\"download\"}"),
        3.0,
        "{}",
        report()
    );
    // Each download that took an RTT sample reports its final SRTT once.
    let srtt = d("ringtftpd_transfer_srtt_seconds_count{direction=\"download\"}");
    assert!((1.0..=3.0).contains(&srtt), "{srtt}: {}", report());
    assert!(
        active(&after) <= active(&before),
        "none of ours runs now: {}",
        report()
    );
    // The process as the kernel sees it: a socket per pooled transfer,
    // the listeners, the ring...
    assert!(after.get("process_open_fds") >= 3.0, "{}", report());
    assert!(
        after.get("process_resident_memory_bytes") > 0.0,
        "{}",
        report()
    );
    // Read from the kernel's tables at each scrape (no drops expected).
    assert!(
        after
            .text
            .lines()
            .any(|l| l.starts_with("ringtftpd_listener_drops_total ")),
        "{}",
        report()
    );
    // One gauge per shard and direction.
    let shards = after
        .text
        .lines()
        .filter(|l| l.starts_with("ringtftpd_transfers_active{"))
        .count();
    assert!(shards >= 2 && shards % 2 == 0, "{}", report());
    s.assert_running();
}

/// Every counter series of a scrape (`*_total` and histogram parts).
fn monotone_series(s: &Scrape) -> Vec<(String, f64)> {
    s.text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            let base = name.split('{').next()?;
            let counted = base.ends_with("_total")
                || base.ends_with("_bucket")
                || base.ends_with("_count")
                || base.ends_with("_sum");
            counted.then(|| Some((name.to_string(), value.parse().ok()?)))?
        })
        .collect()
}

#[test]
fn scrapes_during_a_load_only_grow_and_add_up() {
    const CLIENTS: usize = 8;
    const EACH: usize = 4;
    let metrics = free_tcp_addr();
    let s = start(metrics, &[]);
    let before = Scrape::take(metrics);
    let size = s.source("mib.bin").len();
    let addr = s.addr();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..EACH {
                    // A port of its own per download, as real clients do
                    // (a late DATA of the last one is no answer to this).
                    let client = RawClient::new(addr);
                    let got = raw_get(
                        &client,
                        "mib.bin",
                        "octet",
                        &[("blksize", "1428"), ("windowsize", "4")],
                        |_, _| {},
                    )
                    .expect("download under load");
                    assert_eq!(got.data.len(), size);
                }
            })
        })
        .collect();
    let mut last = before.clone();
    let mut peak_active = 0.0f64;
    let mut scrapes = 0;
    while !clients.iter().all(|c| c.is_finished()) {
        let now = Scrape::take(metrics);
        scrapes += 1;
        let earlier: std::collections::HashMap<String, f64> =
            monotone_series(&last).into_iter().collect();
        for (series, value) in monotone_series(&now) {
            let was = earlier.get(&series).copied().unwrap_or(0.0);
            assert!(value >= was, "{series} went from {was} to {value}");
        }
        let running = active(&now) - active(&before);
        // A client may start its next download before the server has
        // taken the last ACK of its previous one (on another thread): at
        // most two sessions per client.
        assert!(
            running <= 2.0 * CLIENTS as f64,
            "{running} active: {}",
            now.text
        );
        peak_active = peak_active.max(running);
        last = now;
        std::thread::sleep(Duration::from_millis(10));
    }
    for c in clients {
        c.join().expect("client thread");
    }
    let n = (CLIENTS * EACH) as f64;
    let done = "ringtftpd_transfers_finished_total{direction=\"download\",outcome=\"completed\"}";
    let after = scrape_until(metrics, |now| now.get(done) - before.get(done) >= n);
    let d = |series: &str| after.get(series) - before.get(series);
    let report = || format!("{scrapes} scrapes during the load; after:\n{}", after.text);
    assert!(scrapes >= 2, "{}", report());
    assert!(
        peak_active >= 1.0,
        "no scrape saw a transfer running: {}",
        report()
    );
    assert_eq!(
        d("ringtftpd_requests_total{kind=\"rrq\",outcome=\"started\"}"),
        n,
        "{}",
        report()
    );
    assert_eq!(
        d("ringtftpd_transfers_started_total{direction=\"download\"}"),
        n,
        "{}",
        report()
    );
    assert_eq!(d(done), n, "{}", report());
    assert_eq!(
        d("ringtftpd_transfer_duration_seconds_count{direction=\"download\"}"),
        downloads_finished(&after) - downloads_finished(&before),
        "{}",
        report()
    );
    let bytes = d("ringtftpd_data_bytes_total{direction=\"sent\"}");
    assert!(bytes >= n * size as f64, "{bytes}: {}", report());
    assert!(active(&after) <= active(&before), "{}", report());
}

#[test]
fn readyz_fails_while_draining_and_healthz_holds() {
    let metrics = free_tcp_addr();
    let mut s = start(metrics, &["--shutdown-grace", "10"]);
    let before = active(&Scrape::take(metrics));
    // A download whose client never ACKs: it keeps the drain going.
    let client = RawClient::new(s.addr());
    client.send_to_server(&rrq("mib.bin", "octet", &[]));
    let (first, _) = client
        .recv(Duration::from_secs(5))
        .expect("DATA 1 for the silent download");
    assert!(matches!(first, Packet::Data { block: 1, .. }), "{first:?}");
    let live = scrape_until(metrics, |now| active(now) >= before + 1.0);
    assert!(active(&live) >= before + 1.0, "{}", live.text);
    let pid = nix::unistd::Pid::from_raw(s.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut readyz = (0, String::new());
    while Instant::now() < deadline {
        readyz = http_get(metrics, "/readyz").expect("GET /readyz while draining");
        if readyz.0 == 503 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(readyz.0, 503, "/readyz while draining: {}", readyz.1);
    let (status, _) = http_get(metrics, "/healthz").expect("GET /healthz while draining");
    assert_eq!(status, 200);
    // Still draining: the silent transfer holds it (the grace is 10 s).
    let draining = Scrape::take(metrics);
    assert!(active(&draining) >= 1.0, "{}", draining.text);
    s.assert_running();
    s.kill();
}

#[test]
fn promtool_accepts_the_output() {
    let promtool = which("promtool");
    if !client_available("promtool (Debian's prometheus package)", promtool.is_some()) {
        return;
    }
    let metrics = free_tcp_addr();
    let s = start(metrics, &[]);
    // Something in every family: a download, a refusal, an upload.
    let client = RawClient::new(s.addr());
    raw_get(&client, "b513.bin", "octet", &[], |_, _| {}).expect("download");
    let _ = client.expect_error(&rrq("missing.bin", "octet", &[]));
    raw_put(&client, "up.bin", "octet", &[], b"hello", None).expect("upload");
    let scrape = scrape_until(metrics, |now| {
        now.get("ringtftpd_transfers_finished_total{direction=\"upload\",outcome=\"completed\"}")
            >= 1.0
    });
    let mut child = Command::new(promtool.expect("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(scrape.text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    assert!(
        out.status.success(),
        "promtool check metrics: {}\n{}{}\n--- scrape ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        scrape.text
    );
}

/// The example alert rules of docs/operations.md (the YAML block after
/// its `<!-- alert-rules -->` marker) pass `promtool check rules`.
#[test]
fn promtool_accepts_the_documented_alert_rules() {
    let promtool = which("promtool");
    if !client_available("promtool (Debian's prometheus package)", promtool.is_some()) {
        return;
    }
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/operations.md"))
        .expect("read docs/operations.md");
    let (_, after) = doc
        .split_once("<!-- alert-rules -->")
        .expect("docs/operations.md has an <!-- alert-rules --> marker");
    let block = after
        .split_once("```yaml\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(yaml, _)| yaml)
        .expect("a ```yaml block after the marker");
    assert!(block.contains("ringtftpd_"), "{block}");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ringtftpd-rules.yml");
    std::fs::write(&path, block).expect("write the rules");
    let out = Command::new(promtool.expect("promtool"))
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check rules: {}\n{}{}\n--- rules ---\n{block}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_taken_metrics_port_fails_start_up_naming_the_flag() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("local_addr");
    let root = tempfile::tempdir().expect("tempdir");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringtftpd"))
        .args(["-L", "--address", "127.0.0.1:0", "--metrics"])
        .arg(addr.to_string())
        .arg(root.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringtftpd");
    // It must not keep running with its metrics port taken.
    let status = wait_exit(&mut child, Duration::from_secs(5));
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "{status}: {stderr}");
    assert!(stderr.contains("--metrics"), "{stderr}");
    drop(taken);
}

/// docs/grafana/ringtftpd.json: every query is valid PromQL (`promtool
/// check rules`, each as a recording rule, Grafana's `$job` as `.*`) and
/// every metric it names is in a real scrape.
#[test]
fn the_grafana_dashboard_queries_what_the_server_exports() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/grafana/ringtftpd.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("read the dashboard"))
            .expect("the dashboard is JSON");
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(|e| e.replace("$job", ".*")))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let metrics = free_tcp_addr();
    let s = start(metrics, &[]);
    let client = RawClient::new(s.addr());
    raw_get(&client, "b513.bin", "octet", &[], |_, _| {}).expect("download");
    let _ = client.expect_error(&rrq("missing.bin", "octet", &[]));
    let scrape = scrape_until(metrics, |now| downloads_finished(now) >= 1.0);
    for expr in &exprs {
        for name in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("ringtftpd_") || w.starts_with("process_"))
        {
            let family = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            assert!(
                scrape.text.contains(&format!("\n{name}"))
                    || scrape.text.contains(&format!("# TYPE {family} ")),
                "the dashboard's {name} is not exported:\n{}",
                scrape.text
            );
        }
    }
    let promtool = which("promtool");
    if !client_available("promtool (Debian's prometheus package)", promtool.is_some()) {
        return;
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query{i}\n        expr: '{}'\n",
            expr.replace('\'', "''")
        ));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, &rules).expect("write rules");
    let out = Command::new(promtool.expect("promtool"))
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("run promtool");
    assert!(
        out.status.success(),
        "promtool check rules: {}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `ringtftpd_requests_total{outcome="ignored"}` (a retransmitted RRQ),
/// the live-mapping gauges, and `--metrics-file-labels 3`: the start-up
/// probe's `probe.txt` and the first two of our names get labels of their
/// own, the third is counted as `file="other"`.
#[test]
fn ignored_requests_mappings_and_file_labels() {
    let metrics = free_tcp_addr();
    let s = start(metrics, &["--metrics-file-labels", "3"]);
    let before = Scrape::take(metrics);
    let d = |after: &Scrape, series: &str| after.get(series) - before.get(series);

    // A download held at DATA 1 while its RRQ comes again: ignored.
    let client = RawClient::new(s.addr());
    let request = rrq("mib.bin", "octet", &[]);
    client.send_to_server(&request);
    let (first, tid) = client.recv(Duration::from_secs(5)).expect("DATA 1");
    assert!(matches!(first, Packet::Data { block: 1, .. }), "{first:?}");
    client.send_to_server(&request);
    let held = scrape_until(metrics, |now| {
        d(
            now,
            "ringtftpd_requests_total{kind=\"rrq\",outcome=\"ignored\"}",
        ) >= 1.0
    });
    let report = |x: &Scrape| format!("before:\n{}\nnow:\n{}", before.text, x.text);
    assert_eq!(
        d(
            &held,
            "ringtftpd_requests_total{kind=\"rrq\",outcome=\"ignored\"}"
        ),
        1.0,
        "{}",
        report(&held)
    );
    assert_eq!(
        d(
            &held,
            "ringtftpd_requests_total{kind=\"rrq\",outcome=\"started\"}"
        ),
        1.0,
        "{}",
        report(&held)
    );
    // mib.bin is mapped while its transfer holds it (the probe's
    // probe.txt may still be, in the open cache).
    let size = s.source("mib.bin").len() as f64;
    assert!(
        held.get("ringtftpd_mapped_files") >= 1.0,
        "{}",
        report(&held)
    );
    assert!(
        held.get("ringtftpd_mapped_bytes") >= size,
        "{}",
        report(&held)
    );
    // The client leaves; the server gives the transfer up in time. An
    // ERROR ends it at once instead.
    client.send(&[0, 5, 0, 0, b'b', b'y', b'e', 0], tid);

    for name in ["b513.bin", "sub/nested.bin", "b513.bin"] {
        let c = RawClient::new(s.addr());
        raw_get(&c, name, "octet", &[], |_, _| {}).expect("download");
    }
    let file = |name: &str, outcome: &str| {
        format!(
            "ringtftpd_file_transfers_finished_total{{file=\"{name}\",direction=\"download\",outcome=\"{outcome}\"}}"
        )
    };
    let after = scrape_until(metrics, |now| {
        now.get(&file("b513.bin", "completed")) >= 2.0
            && now.get(&file("other", "completed")) >= 1.0
    });
    let r = report(&after);
    assert!(after.get(&file("probe.txt", "completed")) >= 1.0, "{r}");
    assert_eq!(after.get(&file("mib.bin", "client_error")), 1.0, "{r}");
    assert_eq!(after.get(&file("b513.bin", "completed")), 2.0, "{r}");
    // The third name is past the limit.
    assert_eq!(after.get(&file("sub/nested.bin", "completed")), 0.0, "{r}");
    assert_eq!(after.get(&file("other", "completed")), 1.0, "{r}");
    assert_eq!(
        after.get("ringtftpd_file_transfer_bytes_total{file=\"b513.bin\",direction=\"download\"}"),
        2.0 * 513.0,
        "{r}"
    );
    assert_eq!(
        after.get("ringtftpd_file_transfer_bytes_total{file=\"other\",direction=\"download\"}"),
        3000.0,
        "{r}"
    );
    assert_eq!(
        after.get("ringtftpd_file_transfer_duration_seconds_count{file=\"b513.bin\",direction=\"download\"}"),
        2.0,
        "{r}"
    );
    let names: std::collections::BTreeSet<&str> = after
        .text
        .lines()
        .filter(|l| l.starts_with("ringtftpd_file_transfers_finished_total{file=\""))
        .filter_map(|l| l.split('"').nth(1))
        .collect();
    assert_eq!(names.len(), 4, "3 names and other: {names:?}");
    // Every transfer ended and the open cache's TTL (1 s) passed: no
    // mapping is left.
    std::thread::sleep(Duration::from_millis(1200));
    let idle = scrape_until(metrics, |now| now.get("ringtftpd_mapped_files") == 0.0);
    assert_eq!(idle.get("ringtftpd_mapped_files"), 0.0, "{}", report(&idle));
    assert_eq!(idle.get("ringtftpd_mapped_bytes"), 0.0, "{}", report(&idle));
}

#[test]
fn file_labels_need_metrics() {
    let root = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_ringtftpd"))
        .args([
            "-L",
            "--address",
            "127.0.0.1:0",
            "--metrics-file-labels",
            "4",
        ])
        .arg(root.path())
        .stdin(Stdio::null())
        .output()
        .expect("run ringtftpd");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("--metrics"), "{said}");
}

#[test]
fn a_full_server_leaves_a_request_unanswered_and_counts_it_deferred() {
    let metrics = free_tcp_addr();
    let s = start(metrics, &["--threads", "1", "--max-sessions", "1"]);
    let idle = scrape_until(metrics, |now| active(now) == 0.0);
    assert_eq!(active(&idle), 0.0, "{}", idle.text);
    let before = Scrape::take(metrics);
    let d = |after: &Scrape, series: &str| after.get(series) - before.get(series);

    // The one slot, held at DATA 1.
    let holder = RawClient::new(s.addr());
    holder.send_to_server(&rrq("mib.bin", "octet", &[]));
    let (first, tid) = holder.recv(Duration::from_secs(5)).expect("DATA 1");
    assert!(matches!(first, Packet::Data { block: 1, .. }), "{first:?}");

    // A second client gets no answer at all (not ERROR busy): its own
    // retransmission is the retry.
    let waiting = RawClient::new(s.addr());
    let request = rrq("b513.bin", "octet", &[]);
    waiting.send_to_server(&request);
    assert_eq!(
        waiting.recv(Duration::from_millis(500)),
        None,
        "answered while full"
    );
    let full = scrape_until(metrics, |now| {
        d(now, "ringtftpd_busy_deferred_total") >= 1.0
    });
    assert_eq!(
        d(&full, "ringtftpd_busy_deferred_total"),
        1.0,
        "{}",
        full.text
    );
    assert_eq!(
        d(&full, "ringtftpd_refusals_total{reason=\"busy\"}"),
        0.0,
        "{}",
        full.text
    );

    // The slot frees; the client's retransmitted request is served.
    holder.send(&[0, 5, 0, 0, b'b', b'y', b'e', 0], tid);
    scrape_until(metrics, |now| active(now) == 0.0);
    waiting.send_to_server(&request);
    let (data, _) = waiting
        .recv(Duration::from_secs(5))
        .expect("served on retry");
    assert!(matches!(data, Packet::Data { block: 1, .. }), "{data:?}");
}
