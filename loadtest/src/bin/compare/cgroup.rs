//! Accounting for a server and everything it forks: a cgroup of its own (v2, or v1
//! `cpuacct` + `memory`, whichever this machine has), else a walk of its /proc process tree.
//!
//! The server is started by a shell that first writes its own PID into the cgroup's
//! `cgroup.procs` and then `exec`s the server, so every fork and thread is counted from the
//! first instruction (tftpd-hpa reaps its children itself: `getrusage` on it misses their CPU).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::procfs;

/// Where the server's figures come from.
#[derive(Debug)]
enum Source {
    /// cgroup v2: one directory with `cpu.stat` (always there) and `memory.peak` (when the
    /// memory controller is enabled for it).
    V2 { dir: PathBuf },
    /// cgroup v1: `cpuacct.usage` (ns) and `memory.max_usage_in_bytes` in two hierarchies.
    V1 {
        cpuacct: PathBuf,
        memory: Option<PathBuf>,
    },
    /// No cgroup could be made: walk the process tree under the root PID.
    Proc { root: Option<i32> },
}

#[derive(Debug)]
pub struct Tracker {
    source: Source,
}

/// cgroupfs directories show mode 0555 even where root may create children, so only the
/// user is checked here; `create_dir` has the last word.
fn writable_dir(p: &Path) -> bool {
    p.is_dir() && nix::unistd::Uid::effective().is_root()
}

impl Tracker {
    /// Makes a fresh cgroup named `name` or falls back to the /proc walk.
    pub fn new(name: &str) -> Tracker {
        let root = Path::new("/sys/fs/cgroup");
        // Pure v2 (unified hierarchy mounted at the root).
        if root.join("cgroup.controllers").exists() && writable_dir(root) {
            let parent = root.join("ringtftpd-compare");
            let _ = fs::create_dir(&parent);
            // Best effort: memory.peak needs the memory controller delegated to the child.
            let _ = fs::write(root.join("cgroup.subtree_control"), "+memory");
            let _ = fs::write(parent.join("cgroup.subtree_control"), "+memory");
            let dir = parent.join(name);
            if fs::create_dir(&dir).is_ok() {
                return Tracker {
                    source: Source::V2 { dir },
                };
            }
        }
        // v1 with cpuacct (and memory if mounted).
        let cpuacct = root.join("cpuacct");
        if cpuacct.join("cpuacct.usage").exists() && writable_dir(&cpuacct) {
            let dir = cpuacct.join(name);
            if fs::create_dir(&dir).is_ok() {
                let mem = root.join("memory").join(name);
                let memory = (root.join("memory/memory.max_usage_in_bytes").exists()
                    && fs::create_dir(&mem).is_ok())
                .then_some(mem);
                return Tracker {
                    source: Source::V1 {
                        cpuacct: dir,
                        memory,
                    },
                };
            }
        }
        // A v2 hierarchy mounted beside v1 (hybrid): cpu.stat works without controllers.
        let unified = root.join("unified");
        if unified.join("cgroup.procs").exists() && writable_dir(&unified) {
            let dir = unified.join(name);
            if fs::create_dir(&dir).is_ok() && dir.join("cpu.stat").exists() {
                return Tracker {
                    source: Source::V2 { dir },
                };
            }
            let _ = fs::remove_dir(&dir);
        }
        Tracker {
            source: Source::Proc { root: None },
        }
    }

    pub fn describe(&self) -> String {
        match &self.source {
            Source::V2 { dir } => format!(
                "cgroup v2 (cpu.stat usage_usec{})",
                if dir.join("memory.peak").exists() {
                    ", memory.peak"
                } else {
                    ""
                }
            ),
            Source::V1 { memory, .. } => format!(
                "cgroup v1 (cpuacct.usage{})",
                if memory.is_some() {
                    ", memory.max_usage_in_bytes"
                } else {
                    ""
                }
            ),
            Source::Proc { .. } => "process tree in /proc (no cgroup)".into(),
        }
    }

    /// `cgroup.procs` files the starting shell must write its PID to.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        match &self.source {
            Source::V2 { dir } => vec![dir.join("cgroup.procs")],
            Source::V1 { cpuacct, memory } => {
                let mut v = vec![cpuacct.join("cgroup.procs")];
                if let Some(m) = memory {
                    v.push(m.join("cgroup.procs"));
                }
                v
            }
            Source::Proc { .. } => Vec::new(),
        }
    }

    /// For the /proc fallback: the PID the tree hangs from.
    pub fn set_root(&mut self, pid: i32) {
        if let Source::Proc { root } = &mut self.source {
            *root = Some(pid);
        }
    }

    /// Cumulative CPU time of the server and all its descendants (reaped ones included).
    pub fn cpu(&self) -> Option<Duration> {
        match &self.source {
            Source::V2 { dir } => {
                let t = fs::read_to_string(dir.join("cpu.stat")).ok()?;
                let us = t.lines().find_map(|l| {
                    let v = l.strip_prefix("usage_usec ")?;
                    v.trim().parse::<u64>().ok()
                })?;
                Some(Duration::from_micros(us))
            }
            Source::V1 { cpuacct, .. } => {
                let ns = fs::read_to_string(cpuacct.join("cpuacct.usage")).ok()?;
                Some(Duration::from_nanos(ns.trim().parse().ok()?))
            }
            Source::Proc { root } => {
                let ticks = procfs::tree_cpu_ticks((*root)?);
                // USER_HZ is 100 on every Linux architecture that matters here.
                Some(Duration::from_micros(ticks * 10_000))
            }
        }
    }

    /// Peak memory charged to the cgroup over its life (anonymous and kernel memory; page
    /// cache the files brought in before the server started is charged elsewhere).
    pub fn mem_peak(&self) -> Option<u64> {
        let p = match &self.source {
            Source::V2 { dir } => dir.join("memory.peak"),
            Source::V1 {
                memory: Some(m), ..
            } => m.join("memory.max_usage_in_bytes"),
            _ => return None,
        };
        fs::read_to_string(p).ok()?.trim().parse().ok()
    }

    /// Live processes of the server.
    pub fn pids(&self) -> Vec<i32> {
        let procs = match &self.source {
            Source::V2 { dir } => dir.join("cgroup.procs"),
            Source::V1 { cpuacct, .. } => cpuacct.join("cgroup.procs"),
            Source::Proc { root } => return root.map(procfs::descendants).unwrap_or_default(),
        };
        fs::read_to_string(procs)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// SIGTERM to every process, up to `grace` to go, then SIGKILL; finally removes the
    /// cgroup. Only processes of this tracker (all started by us) are signalled.
    pub fn stop_all(&self, grace: Duration) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        for p in self.pids() {
            let _ = kill(Pid::from_raw(p), Signal::SIGTERM);
        }
        let t0 = Instant::now();
        while !self.pids().is_empty() && t0.elapsed() < grace {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Bounded: a process in D state may take a moment to go even after SIGKILL.
        for _ in 0..100 {
            let left = self.pids();
            if left.is_empty() {
                break;
            }
            for p in left {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Removes the cgroup directories (they must be empty: call `stop_all` first).
    pub fn remove(&self) {
        let dirs: Vec<PathBuf> = match &self.source {
            Source::V2 { dir } => vec![dir.clone()],
            Source::V1 { cpuacct, memory } => {
                let mut v = vec![cpuacct.clone()];
                v.extend(memory.clone());
                v
            }
            Source::Proc { .. } => return,
        };
        for d in dirs {
            // A cgroup whose last process just died can stay busy for a moment.
            for _ in 0..50 {
                if fs::remove_dir(&d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.stop_all(Duration::from_secs(2));
        self.remove();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn tracks_a_forking_shell_and_cleans_up() {
        let mut t = Tracker::new(&format!("compare-test-{}", std::process::id()));
        let mut script = String::new();
        for f in t.procs_files() {
            script.push_str(&format!("echo $$ > '{}' || exit 97; ", f.display()));
        }
        // A parent that forks a busy child, so the child's CPU must be counted too.
        script.push_str("( i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done ) & sleep 30");
        let mut child = Command::new("sh").args(["-c", &script]).spawn().unwrap();
        t.set_root(child.id() as i32);
        let t0 = Instant::now();
        while t.pids().len() < 2 && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(t.pids().len() >= 2, "{}: {:?}", t.describe(), t.pids());
        assert!(t.pids().contains(&(child.id() as i32)));
        std::thread::sleep(Duration::from_millis(300));
        let cpu = t.cpu().unwrap();
        assert!(cpu > Duration::ZERO, "{}", t.describe());
        t.stop_all(Duration::from_secs(2));
        assert!(t.pids().is_empty());
        let _ = child.wait();
    }
}
