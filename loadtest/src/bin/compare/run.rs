//! Running things: a server in its own cgroup pinned to the server CPU, the load generator
//! pinned to the other, the samplers, and the separate traced runs (syscalls, instruction
//! counts, profile) and the loopback floor. Every wait is bounded.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::cgroup::Tracker;
use crate::procfs;
use crate::scenario::Scenario;
use crate::server::Server;

/// Everything a run needs to know about this machine and this invocation.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub loadtest: PathBuf,
    pub floor: PathBuf,
    /// The directory served (random-byte files, world-readable: tftpd-hpa runs as nobody).
    pub root: PathBuf,
    /// The directory served to upload scenarios: world-writable (tftpd-hpa writes as nobody),
    /// holding only the probe file between runs.
    pub upload_root: PathBuf,
    /// Server logs and traced-run output.
    pub work: PathBuf,
    /// CPU the server is pinned to (with taskset), if pinning is possible.
    pub server_cpu: Option<usize>,
    pub client_cpu: Option<usize>,
    pub verbose: bool,
}

/// Name of the small file every start-up probe fetches.
pub const PROBE_FILE: &str = "probe.bin";

pub fn log(msg: &str) {
    eprintln!("compare: {msg}");
}

/// Writes `size` bytes from /dev/urandom to `root/name`, world-readable.
pub fn make_file(root: &Path, name: &str, size: u64) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let path = root.join(name);
    if fs::metadata(&path).is_ok_and(|m| m.len() == size) {
        return Ok(());
    }
    let mut src = File::open("/dev/urandom").map_err(|e| format!("/dev/urandom: {e}"))?;
    let mut dst = File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut left = size;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        src.read_exact(&mut buf[..n]).map_err(|e| e.to_string())?;
        dst.write_all(&buf[..n]).map_err(|e| e.to_string())?;
        left -= n as u64;
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(|e| e.to_string())
}

fn free_port() -> Result<u16, String> {
    // The kernel picks a free ephemeral port; it stays free for the moment we need it.
    let s = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind: {e}"))?;
    Ok(s.local_addr().map_err(|e| e.to_string())?.port())
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Waits for `child` up to `limit`; kills it (it is ours) when the limit passes.
/// Returns its exit code (`None` when it was killed or died by a signal).
fn wait_bounded(child: &mut Child, limit: Duration) -> Option<i32> {
    let t0 = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.code(),
            Ok(None) if t0.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig);
}

fn tail(path: &Path, lines: usize) -> Vec<String> {
    let t = fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = t.lines().collect();
    v[v.len().saturating_sub(lines)..]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// A server started in its own cgroup.
pub struct Running {
    pub port: u16,
    pub child: Child,
    pub tracker: Tracker,
    pub log: PathBuf,
}

impl Running {
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops every process of the server and reaps the one we spawned.
    pub fn stop(mut self) {
        // ringtftpd drains running transfers on SIGTERM for up to 5 s by default.
        self.tracker.stop_all(Duration::from_secs(7));
        wait_bounded(&mut self.child, Duration::from_secs(3));
        self.tracker.remove();
    }
}

impl Ctx {
    /// Starts `server` serving the root, wrapped by `wrap` (e.g. valgrind; empty for none),
    /// pinned to the server CPU, inside a fresh cgroup, and waits until it answers a probe.
    pub fn start(
        &self,
        server: &Server,
        tag: &str,
        wrap: &[String],
        uploads: bool,
    ) -> Result<Running, String> {
        let root = if uploads {
            &self.upload_root
        } else {
            &self.root
        };
        let port = match server.kind.fixed_port() {
            Some(p) => {
                if procfs::port_in_use(p) {
                    return Err(format!(
                        "UDP port {p} is already in use on this machine; {} needs it",
                        server.kind.name()
                    ));
                }
                p
            }
            None => free_port()?,
        };
        let name = format!("compare-{}-{tag}", std::process::id());
        let mut tracker = Tracker::new(&name);
        let mut script = String::new();
        for f in tracker.procs_files() {
            // Joining the cgroup before exec: every later fork and thread is counted.
            script.push_str(&format!(
                "echo $$ > {} || exit 97\n",
                sh_quote(&f.display().to_string())
            ));
        }
        // 10,000 sessions need 10,000+ descriptors in the server.
        script.push_str("ulimit -n 65536 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"\n");
        match self.server_cpu {
            Some(cpu) => script.push_str(&format!("exec taskset -c {cpu} \"$@\"\n")),
            None => script.push_str("exec \"$@\"\n"),
        }
        let mut argv: Vec<String> = wrap.to_vec();
        argv.extend(server.command(root, port, uploads));
        let log = self.work.join(format!("{}-{tag}.log", server.kind.name()));
        let out = File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new("sh")
            .arg("-c")
            .arg(&script)
            .arg("sh")
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", server.kind.name()))?;
        tracker.set_root(child.id() as i32);
        let mut r = Running {
            port,
            child,
            tracker,
            log,
        };
        if self.verbose {
            log_cmd(&argv);
        }
        // Valgrind takes seconds to start a program.
        let limit = if wrap.is_empty() { 10 } else { 30 };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = r.child.try_wait() {
                let why = tail(&r.log, 5).join(" | ");
                r.stop();
                return Err(format!("exited at start-up ({st}): {why}"));
            }
            if self.probe(&r.addr(), root) {
                return Ok(r);
            }
            if t0.elapsed() > Duration::from_secs(limit) {
                let why = tail(&r.log, 5).join(" | ");
                r.stop();
                return Err(format!(
                    "did not serve {PROBE_FILE} within {limit} s: {why}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// One 4 KiB transfer, verified, with short timeouts.
    fn probe(&self, addr: &str, root: &Path) -> bool {
        let args: Vec<String> = [
            "--server",
            addr,
            "--file",
            PROBE_FILE,
            "-n",
            "1",
            "--timeout",
            "0.3",
            "--retries",
            "3",
            "--max-time",
            "3",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([
            "--expect".to_string(),
            root.join(PROBE_FILE).display().to_string(),
        ])
        .collect();
        let Ok(mut c) = Command::new(&self.loadtest)
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        else {
            return false;
        };
        wait_bounded(&mut c, Duration::from_secs(6)) == Some(0)
    }

    /// Runs the load generator for `sc` against `addr`; returns its JSON report, its exit
    /// status and the first lines of its stderr (the failures it describes). Uploads go to
    /// [`upload_prefix`]`(tag)` followed by the transfer's index.
    pub fn loadtest(&self, sc: &Scenario, addr: &str, tag: &str) -> LoadResult {
        let errf = self.work.join(format!("loadtest-{tag}.err"));
        let mut cmd = Command::new(&self.loadtest);
        cmd.args(["--server", addr, "--json"]);
        if sc.put {
            cmd.args(["--put-prefix", &upload_prefix(tag)]);
        } else {
            cmd.arg("--expect").arg(self.root.join(&sc.file));
        }
        cmd.args(sc.loadtest_args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        if let Ok(f) = File::create(&errf) {
            cmd.stderr(f);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                return LoadResult {
                    report: None,
                    exit: None,
                    stderr_head: vec![format!("cannot start loadtest: {e}")],
                };
            }
        };
        // The pipe holds one JSON line, far below its capacity: reading after exit is safe.
        let exit = wait_bounded(&mut child, Duration::from_secs(sc.max_time_s + 30));
        let mut out = String::new();
        if let Some(mut so) = child.stdout.take() {
            let _ = so.read_to_string(&mut out);
        }
        let report = out
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok());
        let head: Vec<String> = fs::read_to_string(&errf)
            .unwrap_or_default()
            .lines()
            .take(8)
            .map(String::from)
            .collect();
        LoadResult {
            report,
            exit,
            stderr_head: head,
        }
    }

    /// One measured run: fresh server, load, server-side figures. Returns the raw record.
    pub fn measure(&self, server: &Server, sc: &Scenario, rep: u32) -> Value {
        let tag = format!("{}-r{rep}", sc.id);
        let base = json!({
            "kind": "run",
            "server": server.kind.name(),
            "scenario": sc.id,
            "rep": rep,
        });
        let r = match self.start(server, &tag, &[], sc.put) {
            Ok(r) => r,
            Err(e) => return with(base, json!({"ok": false, "error": e})),
        };
        let idle = sample(&r.tracker);
        let threads0 = procfs::thread_ticks(&r.tracker.pids());
        let cpu0 = r.tracker.cpu();
        let snmp0 = procfs::read_rcvbuf_errors();
        let drops0 = procfs::read_listen_drops(r.port);
        let ticks0 = procfs::read_cpu_ticks();

        let stop = AtomicBool::new(false);
        let peaks = Mutex::new(Peaks::default());
        let t0 = Instant::now();
        let lt_tag = format!("{}-{tag}", server.kind.name());
        let lr = std::thread::scope(|s| {
            s.spawn(|| sampler(&r.tracker, &stop, &peaks));
            let lr = self.loadtest(sc, &r.addr(), &lt_tag);
            stop.store(true, Ordering::Relaxed);
            lr
        });
        let wall = t0.elapsed();
        let cpu1 = r.tracker.cpu();
        let threads1 = procfs::thread_ticks(&r.tracker.pids());
        let snmp1 = procfs::read_rcvbuf_errors();
        let drops1 = procfs::read_listen_drops(r.port);
        let ticks1 = procfs::read_cpu_ticks();
        let mem_peak = r.tracker.mem_peak();
        let accounting = r.tracker.describe();
        let peaks = peaks.into_inner().unwrap_or_default();
        // Uploads are checked on disk while the server still runs (a server may finish
        // writing after its final ACK), then removed.
        let completed = lr
            .report
            .as_ref()
            .and_then(|v| v["completed"].as_u64())
            .unwrap_or(0);
        let uploads = sc.put.then(|| {
            let v = verify_uploads(
                &self.upload_root,
                &upload_prefix(&lt_tag),
                sc.n,
                sc.size,
                completed,
            );
            let removed = clear_uploads(&self.upload_root);
            with(v, json!({"removed": removed}))
        });
        r.stop();
        // Whatever a killed server still left behind goes too.
        if sc.put {
            clear_uploads(&self.upload_root);
        }
        let threads: serde_json::Map<String, Value> = threads1
            .iter()
            .map(|(k, t1)| {
                let d = t1.saturating_sub(threads0.get(k).copied().unwrap_or(0));
                (k.clone(), json!(d as f64 / 100.0))
            })
            .filter(|(_, v)| v.as_f64().is_some_and(|x| x > 0.0))
            .collect();

        let server_cpu = match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a).as_secs_f64()),
            _ => None,
        };
        let lt = lr.report.clone().unwrap_or(Value::Null);
        let payload = lt["payload_bytes"].as_u64().unwrap_or(0);
        let blocks = lt["blocks"].as_u64().unwrap_or(0);
        let ok = lr.exit == Some(0)
            && lt["ok"].as_bool() == Some(true)
            && uploads.as_ref().is_none_or(|u| u["ok"] == true);
        // Everything else the machine did meanwhile: this harness, other users' processes,
        // the hypervisor taking CPUs away (steal). USER_HZ = 100.
        let (busy_s, steal_s) = match (ticks0, ticks1) {
            (Some(a), Some(b)) => (
                Some(b.0.saturating_sub(a.0) as f64 / 100.0),
                Some(b.1.saturating_sub(a.1) as f64 / 100.0),
            ),
            _ => (None, None),
        };
        let client_s =
            lt["cpu_user_s"].as_f64().unwrap_or(0.0) + lt["cpu_sys_s"].as_f64().unwrap_or(0.0);
        let other_cpus = match (busy_s, server_cpu) {
            (Some(b), Some(c)) if wall.as_secs_f64() > 0.0 => {
                Some(((b - c - client_s) / wall.as_secs_f64()).max(0.0))
            }
            _ => None,
        };
        with(
            base,
            json!({
                "ok": ok,
                "loadtest_exit": lr.exit,
                "loadtest": lt,
                "loadtest_stderr": lr.stderr_head,
                "wall_s": wall.as_secs_f64(),
                "server_cpu_s": server_cpu,
                "cpu_s_per_gb": server_cpu.filter(|_| payload > 0).map(|c| c / (payload as f64 / 1e9)),
                "cpu_us_per_block": server_cpu.filter(|_| blocks > 0).map(|c| c * 1e6 / blocks as f64),
                "accounting": accounting,
                "mem_peak_cgroup_bytes": mem_peak,
                "rss_peak_bytes": peaks.rss.max(peaks.hwm),
                "anon_peak_bytes": peaks.anon,
                "anon_idle_bytes": idle.anon,
                "fds_peak": peaks.fds,
                "procs_peak": peaks.procs,
                "samples": peaks.samples,
                "listen_drops": match (drops0, drops1) { (Some(a), Some(b)) => Some(b.saturating_sub(a)), _ => None },
                "machine_busy_s": busy_s,
                "steal_s": steal_s,
                "other_load_cpus": other_cpus,
                "rcvbuf_errors": match (snmp0, snmp1) { (Some(a), Some(b)) => Some(b.saturating_sub(a)), _ => None },
                "thread_cpu_s": threads,
                "uploads": uploads,
            }),
        )
    }

    /// A separate S1 run with the server's system calls counted by `perf stat` on its
    /// processes (children included). Returns the raw record.
    pub fn syscalls(&self, server: &Server, sc: &Scenario) -> Value {
        let base = json!({"kind": "syscalls", "server": server.kind.name(), "scenario": sc.id});
        let events = syscall_events();
        if events.is_empty() {
            return with(
                base,
                json!({"ok": false, "error": "no syscall tracepoints (perf) on this machine"}),
            );
        }
        let r = match self.start(server, &format!("{}-syscalls", sc.id), &[], false) {
            Ok(r) => r,
            Err(e) => return with(base, json!({"ok": false, "error": e})),
        };
        let pids: Vec<String> = r.tracker.pids().iter().map(|p| p.to_string()).collect();
        let out = self
            .work
            .join(format!("{}-syscalls.csv", server.kind.name()));
        let ev: Vec<String> = events
            .iter()
            .map(|e| format!("syscalls:sys_enter_{e}"))
            .collect();
        let perf = Command::new("perf")
            .args(["stat", "-x", ",", "-o"])
            .arg(&out)
            .args([
                "-e",
                "raw_syscalls:sys_enter",
                "-e",
                &ev.join(","),
                "-p",
                &pids.join(","),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut perf = match perf {
            Ok(p) => p,
            Err(e) => {
                r.stop();
                return with(base, json!({"ok": false, "error": format!("perf: {e}")}));
            }
        };
        // perf needs a moment to attach to every process.
        std::thread::sleep(Duration::from_millis(500));
        let lr = self.loadtest(
            sc,
            &r.addr(),
            &format!("{}-{}-syscalls", server.kind.name(), sc.id),
        );
        signal(&perf, nix::sys::signal::Signal::SIGINT);
        wait_bounded(&mut perf, Duration::from_secs(10));
        r.stop();
        let counts = parse_perf_stat(&fs::read_to_string(&out).unwrap_or_default());
        let lt = lr.report.unwrap_or(Value::Null);
        let blocks = lt["blocks"].as_u64().unwrap_or(0);
        let total = counts.get("raw_syscalls:sys_enter").copied();
        let uring = counts
            .get("syscalls:sys_enter_io_uring_enter")
            .copied()
            .unwrap_or(0);
        let per_block = |x: u64| (blocks > 0).then(|| x as f64 / blocks as f64);
        let by: serde_json::Map<String, Value> = counts
            .iter()
            .filter(|(k, v)| k.starts_with("syscalls:") && **v > 0)
            .map(|(k, v)| {
                (
                    k.trim_start_matches("syscalls:sys_enter_").to_string(),
                    json!(v),
                )
            })
            .collect();
        with(
            base,
            json!({
                "ok": total.is_some() && lt["ok"].as_bool() == Some(true),
                "tool": "perf stat -e raw_syscalls:sys_enter,syscalls:sys_enter_* -p PIDS",
                "blocks": blocks,
                "completed": lt["completed"],
                "launched": lt["launched"],
                "total": total,
                "io_uring_enter": uring,
                "other": total.map(|t| t.saturating_sub(uring)),
                "total_per_block": total.and_then(per_block),
                "io_uring_enter_per_block": per_block(uring),
                "other_per_block": total.and_then(|t| per_block(t.saturating_sub(uring))),
                "by_syscall": by,
            }),
        )
    }

    /// User-space instructions per block with callgrind, for a fixed workload run twice
    /// (`small` and `large` transfer counts); the difference cancels start-up and shutdown.
    pub fn instructions(
        &self,
        server: &Server,
        valgrind: &Path,
        sc: &Scenario,
        small: u64,
        large: u64,
    ) -> Value {
        let base = json!({
            "kind": "instructions",
            "server": server.kind.name(),
            "tool": "valgrind --tool=callgrind (Ir)",
            "workload": format!("{} x {}, c={}, blksize {:?}", "N", sc.file, sc.c, sc.blksize),
        });
        let mut runs = Vec::new();
        for n in [small, large] {
            let dir = self
                .work
                .join(format!("callgrind-{}-{n}", server.kind.name()));
            // tftpd-hpa's children chroot into the served root and run as nobody before they
            // exit and write their output: give them the same path inside the root, writable.
            let mirror = self.root.join(dir.strip_prefix("/").unwrap_or(&dir));
            for d in [&dir, &mirror] {
                let _ = fs::remove_dir_all(d);
                if let Err(e) = fs::create_dir_all(d) {
                    return with(
                        base,
                        json!({"ok": false, "error": format!("{}: {e}", d.display())}),
                    );
                }
            }
            {
                use std::os::unix::fs::PermissionsExt;
                let _ = fs::set_permissions(&mirror, fs::Permissions::from_mode(0o777));
            }
            let wrap = vec![
                valgrind.display().to_string(),
                "--tool=callgrind".into(),
                format!("--callgrind-out-file={}/cg.%p", dir.display()),
            ];
            let r = match self.start(server, &format!("callgrind-{n}"), &wrap, false) {
                Ok(r) => r,
                Err(e) => return with(base, json!({"ok": false, "error": e})),
            };
            let mut s = sc.clone();
            s.n = n;
            let lr = self.loadtest(
                &s,
                &r.addr(),
                &format!("{}-callgrind-{n}", server.kind.name()),
            );
            r.stop();
            let lt = lr.report.unwrap_or(Value::Null);
            let ir = match (callgrind_total(&dir), callgrind_total(&mirror)) {
                (Some(a), b) => Some(a + b.unwrap_or(0)),
                (None, b) => b,
            };
            // Only the leaf: its empty parents stay in the temporary root.
            let _ = fs::remove_dir_all(&mirror);
            runs.push((
                n,
                lt["blocks"].as_u64().unwrap_or(0),
                ir,
                lt["ok"].as_bool() == Some(true),
                lt["client_retransmits"].as_u64().unwrap_or(0),
            ));
        }
        let (n1, b1, i1, ok1, rt1) = runs[0];
        let (n2, b2, i2, ok2, rt2) = runs[1];
        let per_block = match (i1, i2) {
            (Some(a), Some(b)) if b2 > b1 && b > a => Some((b - a) as f64 / (b2 - b1) as f64),
            _ => None,
        };
        with(
            base,
            json!({
                "ok": ok1 && ok2 && per_block.is_some(),
                "runs": [
                    {"transfers": n1, "blocks": b1, "instructions": i1, "client_retransmits": rt1},
                    {"transfers": n2, "blocks": b2, "instructions": i2, "client_retransmits": rt2},
                ],
                "instructions_per_block": per_block,
            }),
        )
    }

    /// `perf record -g` on a running server under `sc`; returns the top of `perf report`.
    pub fn profile(&self, server: &Server, sc: &Scenario) -> Result<String, String> {
        let r = self.start(server, &format!("{}-profile", sc.id), &[], false)?;
        let data = self
            .work
            .join(format!("{}-{}.perf.data", server.kind.name(), sc.id));
        let pids: Vec<String> = r.tracker.pids().iter().map(|p| p.to_string()).collect();
        let mut perf = Command::new("perf")
            .args(["record", "-g", "-q", "-o"])
            .arg(&data)
            .args(["-p", &pids.join(",")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("perf record: {e}"))?;
        std::thread::sleep(Duration::from_millis(500));
        let lr = self.loadtest(
            sc,
            &r.addr(),
            &format!("{}-{}-profile", server.kind.name(), sc.id),
        );
        signal(&perf, nix::sys::signal::Signal::SIGINT);
        wait_bounded(&mut perf, Duration::from_secs(20));
        r.stop();
        let report = |sort: &str, limit: &str, take: usize| -> Result<String, String> {
            let out = Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "-g",
                    "none",
                    "--percent-limit",
                    limit,
                    "--sort",
                    sort,
                    "-i",
                ])
                .arg(&data)
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .output()
                .map_err(|e| format!("perf report: {e}"))?;
            let text = String::from_utf8_lossy(&out.stdout);
            Ok(text
                .lines()
                .filter(|l| !l.trim().is_empty() && (!l.starts_with('#') || l.contains("Samples")))
                .map(|l| l.trim_end().trim_end_matches(['-', ' ']))
                .take(take)
                .collect::<Vec<_>>()
                .join("\n"))
        };
        let by_dso = report("dso", "0.5", 12)?;
        let by_sym = report("dso,symbol", "0.8", 40)?;
        let lt = lr.report.unwrap_or(Value::Null);
        Ok(format!(
            "perf record -g -p <pid> during {} × {}, {} in flight, blksize {} \
             (transfers completed {}/{}, {} transfers/s).\n\n\
             By binary (`perf report --no-children --sort dso`):\n{}\n\n\
             Top symbols (`perf report --no-children --sort dso,symbol`):\n{}\n",
            sc.n,
            crate::scenario::human_size(sc.size),
            sc.c,
            sc.blksize
                .map_or("512 (none asked)".to_string(), |b| b.to_string()),
            lt["completed"],
            lt["launched"],
            lt["transfers_per_s"],
            by_dso,
            by_sym
        ))
    }

    /// The loopback floor: CPU µs per 1472-byte datagram sent with sendmmsg from the server CPU.
    pub fn floor(&self, seconds: f64) -> Value {
        let mut cmd = Command::new(&self.floor);
        cmd.args(["--json", "--seconds", &seconds.to_string()]);
        if let (Some(s), Some(c)) = (self.server_cpu, self.client_cpu) {
            cmd.args(["--send-cpu", &s.to_string(), "--recv-cpu", &c.to_string()]);
        }
        let out = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output();
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| serde_json::from_str::<Value>(l).ok())
                .unwrap_or_else(|| json!({"kind": "floor", "ok": false, "error": format!("exit {:?}", o.status.code())})),
            Err(e) => json!({"kind": "floor", "ok": false, "error": e.to_string()}),
        }
    }
}

/// Name prefix of the uploads of the load generator run tagged `tag`; upload `i` is
/// `{prefix}{i}`, so no two uploads of an invocation share a name.
pub fn upload_prefix(tag: &str) -> String {
    format!("up-{tag}-")
}

/// How long uploads the client saw acknowledged may take to appear whole on disk.
const UPLOAD_SETTLE: Duration = Duration::from_secs(5);

/// One uploaded file against what was sent: `Ok` or what is wrong with it.
fn check_upload(path: &Path, name: &str, size: u64) -> Result<(), String> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("missing".into()),
        Err(e) => return Err(format!("unreadable: {e}")),
    };
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    if len != size {
        return Err(format!("size {len}, sent {size}"));
    }
    let key = crate::pattern::key(name);
    let mut buf = vec![0u8; 1 << 16];
    let mut off = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        if let Some(i) = crate::pattern::first_mismatch(key, off, &buf[..n]) {
            return Err(format!("content differs at byte {}", off + i as u64));
        }
        off += n as u64;
    }
    if off != size {
        return Err(format!("read {off} bytes, sent {size}"));
    }
    Ok(())
}

/// Checks the uploads `{prefix}0 .. {prefix}{n-1}` in `root`: each must hold exactly the
/// `size` bytes of its name's pattern. Waits (up to [`UPLOAD_SETTLE`]) while fewer than the
/// `completed` the client counted are whole. Returns the record: counts, the first problems,
/// files in `root` that are none of these (temporaries left behind), and `ok` (all `n` whole
/// and nothing stray).
pub fn verify_uploads(root: &Path, prefix: &str, n: u64, size: u64, completed: u64) -> Value {
    let t0 = Instant::now();
    let mut bad: std::collections::BTreeMap<u64, String> =
        (0..n).map(|i| (i, String::new())).collect();
    let mut first_pass_whole = None;
    // Bounded: at most UPLOAD_SETTLE / 50 ms passes, each over the files still wrong.
    loop {
        bad.retain(|i, why| {
            let name = format!("{prefix}{i}");
            match check_upload(&root.join(&name), &name, size) {
                Ok(()) => false,
                Err(e) => {
                    *why = e;
                    true
                }
            }
        });
        let whole = n - bad.len() as u64;
        first_pass_whole.get_or_insert(whole);
        if whole >= completed || t0.elapsed() >= UPLOAD_SETTLE {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let whole = n - bad.len() as u64;
    let names: std::collections::HashSet<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let stray: Vec<String> = fs::read_dir(root)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|f| f != PROBE_FILE && !names.contains(f))
                .collect()
        })
        .unwrap_or_default();
    let mut kinds: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    for why in bad.values() {
        let k = why.split([' ', ':']).next().unwrap_or("").to_string();
        *kinds.entry(k).or_insert(0) += 1;
    }
    json!({
        "ok": whole == n && stray.is_empty(),
        "asked": n,
        "client_completed": completed,
        "whole": whole,
        "whole_at_first_check": first_pass_whole,
        "settle_s": t0.elapsed().as_secs_f64(),
        "bad_by_kind": kinds,
        "bad_first": bad.iter().take(5).map(|(i, w)| format!("{prefix}{i}: {w}")).collect::<Vec<_>>(),
        "stray": stray.len(),
        "stray_first": stray.iter().take(5).collect::<Vec<_>>(),
    })
}

/// Removes everything in the upload root but the probe file; returns how many entries went.
pub fn clear_uploads(root: &Path) -> u64 {
    let mut n = 0;
    if let Ok(d) = fs::read_dir(root) {
        for e in d.flatten() {
            if e.file_name() == PROBE_FILE {
                continue;
            }
            let p = e.path();
            let gone = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
            n += u64::from(gone.is_ok());
        }
    }
    n
}

fn log_cmd(argv: &[String]) {
    log(&format!("starting: {}", argv.join(" ")));
}

pub struct LoadResult {
    pub report: Option<Value>,
    pub exit: Option<i32>,
    pub stderr_head: Vec<String>,
}

/// Merges the fields of `extra` into `base` (both objects).
pub fn with(mut base: Value, extra: Value) -> Value {
    if let (Some(b), Value::Object(e)) = (base.as_object_mut(), extra) {
        b.extend(e);
    }
    base
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Peaks {
    pub(crate) rss: u64,
    hwm: u64,
    anon: u64,
    pub(crate) fds: u64,
    procs: u64,
    pub(crate) samples: u64,
}

/// Sums over the server's live processes.
fn sample(t: &Tracker) -> Peaks {
    let mut p = Peaks::default();
    for pid in t.pids() {
        if let Some(m) = procfs::read_mem(pid) {
            p.rss += m.rss;
            p.hwm += m.hwm;
            // File-backed pages (the served files' mappings, the binary) are excluded.
            p.anon += m.anon + m.shmem;
        }
        p.fds += procfs::fd_count(pid).unwrap_or(0);
        p.procs += 1;
    }
    p
}

/// Samples until `stop`, keeping the peaks. The interval stretches when sampling many
/// processes gets slow, so the sampler (on the load generator's CPU) stays cheap.
pub(crate) fn sampler(t: &Tracker, stop: &AtomicBool, peaks: &Mutex<Peaks>) {
    let mut interval = Duration::from_millis(50);
    while !stop.load(Ordering::Relaxed) {
        let t0 = Instant::now();
        let s = sample(t);
        let cost = t0.elapsed();
        interval = interval.max(cost * 5).min(Duration::from_secs(1));
        if let Ok(mut p) = peaks.lock() {
            p.rss = p.rss.max(s.rss);
            p.hwm = p.hwm.max(s.hwm);
            p.anon = p.anon.max(s.anon);
            p.fds = p.fds.max(s.fds);
            p.procs = p.procs.max(s.procs);
            p.samples += 1;
        }
        let until = Instant::now() + interval;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Syscalls broken out in the report; only those with a tracepoint here are asked for.
const SYSCALLS: &[&str] = &[
    "io_uring_enter",
    "recvfrom",
    "recvmsg",
    "recvmmsg",
    "sendto",
    "sendmsg",
    "sendmmsg",
    "read",
    "pread64",
    "write",
    "openat",
    "openat2",
    "close",
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "epoll_wait",
    "epoll_pwait",
    "clone",
    "clone3",
    "wait4",
    "socket",
    "bind",
    "setsockopt",
    "mmap",
    "munmap",
    "futex",
    "alarm",
    "setitimer",
    "rt_sigaction",
    "rt_sigprocmask",
    "newfstatat",
    "fstat",
    "fcntl",
    "lseek",
];

fn syscall_events() -> Vec<&'static str> {
    let dirs = [
        "/sys/kernel/tracing/events/syscalls",
        "/sys/kernel/debug/tracing/events/syscalls",
    ];
    let Some(dir) = dirs.iter().map(Path::new).find(|d| d.is_dir()) else {
        return Vec::new();
    };
    SYSCALLS
        .iter()
        .copied()
        .filter(|s| dir.join(format!("sys_enter_{s}")).exists())
        .collect()
}

/// `perf stat -x,` lines: "value,unit,event,…"; "<not counted>" values are skipped.
pub fn parse_perf_stat(text: &str) -> std::collections::BTreeMap<String, u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let v = f.first()?.trim().parse::<u64>().ok()?;
            Some((f.get(2)?.trim().to_string(), v))
        })
        .collect()
}

/// Sum of the `summary:`/`totals:` Ir of every callgrind output in `dir` (one per process).
fn callgrind_total(dir: &Path) -> Option<u64> {
    let mut total = None;
    for e in fs::read_dir(dir).ok()?.flatten() {
        let t = fs::read_to_string(e.path()).unwrap_or_default();
        let v = t.lines().find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        });
        if let Some(v) = v {
            total = Some(total.unwrap_or(0) + v);
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_stat_csv() {
        let t = "# started on x\n\n1234,,raw_syscalls:sys_enter,100,100.00,,\n\
                 56,,syscalls:sys_enter_io_uring_enter,100,100.00,,\n\
                 <not counted>,,syscalls:sys_enter_read,0,100.00,,\n";
        let m = parse_perf_stat(t);
        assert_eq!(m.get("raw_syscalls:sys_enter"), Some(&1234));
        assert_eq!(m.get("syscalls:sys_enter_io_uring_enter"), Some(&56));
        assert!(!m.contains_key("syscalls:sys_enter_read"));
    }

    #[test]
    fn callgrind_totals_add_up_over_processes() {
        let dir = std::env::temp_dir().join(format!("cg-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(
            dir.join("cg.1"),
            "events: Ir\nsummary: 1000\ntotals: 1000\n",
        )
        .unwrap();
        fs::write(dir.join("cg.2"), "events: Ir\ntotals: 234\n").unwrap();
        assert_eq!(callgrind_total(&dir), Some(1234));
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(callgrind_total(Path::new("/nonexistent-dir")), None);
    }

    #[test]
    fn merging_and_quoting() {
        let v = with(json!({"a": 1}), json!({"b": 2}));
        assert_eq!(v, json!({"a": 1, "b": 2}));
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
    }

    #[test]
    fn uploads_are_checked_byte_for_byte_and_cleared() {
        let root = std::env::temp_dir().join(format!("up-verify-{}", std::process::id()));
        fs::create_dir_all(&root).unwrap();
        make_file(&root, PROBE_FILE, 10).unwrap();
        let put = |name: &str, len: usize, flip: Option<usize>| {
            let mut b = vec![0u8; len];
            crate::pattern::fill(crate::pattern::key(name), 0, &mut b);
            if let Some(i) = flip {
                b[i] ^= 1;
            }
            fs::write(root.join(name), b).unwrap();
        };
        for i in 0..3 {
            put(&format!("up-t-{i}"), 100_000, None);
        }
        let v = verify_uploads(&root, "up-t-", 3, 100_000, 3);
        assert_eq!(
            (v["ok"].clone(), v["whole"].clone()),
            (json!(true), json!(3)),
            "{v}"
        );
        put("up-t-1", 100_000, Some(77_777));
        put("up-t-2", 99_999, None);
        fs::write(root.join(".tmp-left"), b"x").unwrap();
        // As many whole as the client completed: no waiting; the rest is reported.
        let v = verify_uploads(&root, "up-t-", 4, 100_000, 1);
        assert_eq!(v["ok"], false);
        assert_eq!(v["whole"], 1);
        assert_eq!(v["stray"], 1);
        assert_eq!(
            v["bad_by_kind"],
            json!({"content": 1, "missing": 1, "size": 1}),
            "{v}"
        );
        assert!(
            v["bad_first"][0].as_str().unwrap().contains("byte 77777"),
            "{v}"
        );
        assert_eq!(clear_uploads(&root), 4);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 1, "the probe stays");
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bounded_wait_kills_a_sleeper() {
        let mut c = Command::new("sleep").arg("30").spawn().unwrap();
        let t0 = Instant::now();
        assert_eq!(wait_bounded(&mut c, Duration::from_millis(100)), None);
        assert!(t0.elapsed() < Duration::from_secs(5));
        let mut c = Command::new("true").spawn().unwrap();
        assert_eq!(wait_bounded(&mut c, Duration::from_secs(5)), Some(0));
    }
}
