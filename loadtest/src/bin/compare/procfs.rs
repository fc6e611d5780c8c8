//! Readers for the /proc files the comparison samples. Each parser takes the file's text so
//! it is testable; the `read_*` wrappers return `None` when the file is missing or odd.

use std::collections::HashMap;
use std::fs;

/// `Udp: RcvbufErrors` from /proc/net/snmp plus `Udp6RcvbufErrors` from /proc/net/snmp6:
/// datagrams dropped machine-wide because a socket's receive buffer was full.
pub fn read_rcvbuf_errors() -> Option<u64> {
    let v4 = parse_snmp(
        &fs::read_to_string("/proc/net/snmp").ok()?,
        "Udp",
        "RcvbufErrors",
    )?;
    let v6 = fs::read_to_string("/proc/net/snmp6")
        .ok()
        .and_then(|t| parse_snmp6(&t, "Udp6RcvbufErrors"))
        .unwrap_or(0);
    Some(v4 + v6)
}

/// /proc/net/snmp holds pairs of lines, "Proto: names…" then "Proto: values…".
pub fn parse_snmp(text: &str, proto: &str, field: &str) -> Option<u64> {
    let prefix = format!("{proto}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let names = lines.next()?;
    let values = lines.next()?;
    let i = names.split_whitespace().position(|n| n == field)?;
    values.split_whitespace().nth(i)?.parse().ok()
}

pub fn parse_snmp6(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == field).then(|| it.next()?.parse().ok())?
    })
}

/// One row of /proc/net/udp{,6}.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSocketRow {
    pub local_port: u16,
    pub remote_port: u16,
    pub rx_queue: u64,
    pub drops: u64,
}

pub fn parse_udp_table(text: &str) -> Vec<UdpSocketRow> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            if f.len() < 13 {
                return None;
            }
            let port = |a: &str| u16::from_str_radix(a.rsplit(':').next()?, 16).ok();
            let rx = f[4].split(':').nth(1)?;
            Some(UdpSocketRow {
                local_port: port(f[1])?,
                remote_port: port(f[2])?,
                rx_queue: u64::from_str_radix(rx, 16).ok()?,
                drops: f[12].parse().ok()?,
            })
        })
        .collect()
}

fn udp_rows() -> Vec<UdpSocketRow> {
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .flat_map(|t| parse_udp_table(&t))
        .collect()
}

/// Drops counted on the unconnected sockets bound to `port`: the server's listening
/// sockets (several with SO_REUSEPORT). The counter lives and dies with the socket, so read
/// it while the server runs.
pub fn read_listen_drops(port: u16) -> Option<u64> {
    let rows: Vec<_> = udp_rows()
        .into_iter()
        .filter(|r| r.local_port == port && r.remote_port == 0)
        .collect();
    (!rows.is_empty()).then(|| rows.iter().map(|r| r.drops).sum())
}

pub fn port_in_use(port: u16) -> bool {
    udp_rows().iter().any(|r| r.local_port == port)
}

/// Memory figures of one process from /proc/PID/status, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mem {
    pub rss: u64,
    pub anon: u64,
    pub file: u64,
    pub shmem: u64,
    pub hwm: u64,
}

pub fn parse_status(text: &str) -> Mem {
    let mut m = Mem::default();
    for l in text.lines() {
        let mut it = l.split_whitespace();
        let (Some(k), Some(v)) = (it.next(), it.next()) else {
            continue;
        };
        let Ok(kb) = v.parse::<u64>() else { continue };
        let b = kb * 1024;
        match k {
            "VmRSS:" => m.rss = b,
            "RssAnon:" => m.anon = b,
            "RssFile:" => m.file = b,
            "RssShmem:" => m.shmem = b,
            "VmHWM:" => m.hwm = b,
            _ => {}
        }
    }
    m
}

pub fn read_mem(pid: i32) -> Option<Mem> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .map(|t| parse_status(&t))
}

pub fn fd_count(pid: i32) -> Option<u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

/// Fields of /proc/PID/stat after the command name: (ppid, utime+stime, cutime+cstime) in
/// clock ticks; `None` for a zombie (it is gone but for its exit status).
pub fn parse_stat(text: &str) -> Option<(i32, u64, u64)> {
    // The command name may hold spaces and parentheses: cut after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is the state (field 3); ppid is field 4, utime 14, stime 15, cutime 16, cstime 17.
    let at = |field: usize| f.get(field - 3).and_then(|v| v.parse::<u64>().ok());
    if *f.first()? == "Z" {
        return None;
    }
    let ppid = f.get(1)?.parse().ok()?;
    Some((ppid, at(14)? + at(15)?, at(16)? + at(17)?))
}

/// Every live process whose ancestry reaches `root`, `root` included (the fallback when no
/// cgroup can be made).
pub fn descendants(root: i32) -> Vec<i32> {
    let mut parent: HashMap<i32, i32> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some((ppid, _, _)) = fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|t| parse_stat(&t))
            {
                parent.insert(pid, ppid);
            }
        }
    }
    let mut out: Vec<i32> = parent
        .keys()
        .copied()
        .filter(|&p| {
            let mut cur = p;
            // Bounded walk: a pid chain is never longer than the process count.
            for _ in 0..=parent.len() {
                if cur == root {
                    return true;
                }
                match parent.get(&cur) {
                    Some(&pp) if pp > 0 && pp != cur => cur = pp,
                    _ => return false,
                }
            }
            false
        })
        .collect();
    out.sort_unstable();
    out
}

/// A thread's name without its trailing number: "ringtftpd-writer-3" (the kernel keeps 15
/// bytes: "ringtftpd-write") and "iou-wrk-1234" group as "ringtftpd-write" and "iou-wrk".
pub fn thread_group(comm: &str) -> String {
    let t = comm.trim_end_matches(|c: char| c.is_ascii_digit());
    let t = t.strip_suffix('-').unwrap_or(t);
    if t.is_empty() { comm } else { t }.to_string()
}

/// The name (comm) of a /proc/PID/task/TID/stat line and its utime+stime in clock ticks.
pub fn parse_task_stat(text: &str) -> Option<(String, u64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let at = |field: usize| f.get(field - 3).and_then(|v| v.parse::<u64>().ok());
    Some((comm, at(14)? + at(15)?))
}

/// CPU ticks (utime+stime, USER_HZ) of every live thread of `pids`, summed by
/// [`thread_group`]. Threads (or processes) that exited are not counted.
pub fn thread_ticks(pids: &[i32]) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for pid in pids {
        let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for e in dir.flatten() {
            if let Some((comm, ticks)) = fs::read_to_string(e.path().join("stat"))
                .ok()
                .and_then(|t| parse_task_stat(&t))
            {
                *out.entry(thread_group(&comm)).or_insert(0) += ticks;
            }
        }
    }
    out
}

/// CPU ticks of a process tree: its live members plus the children the root reaped.
pub fn tree_cpu_ticks(root: i32) -> u64 {
    descendants(root)
        .iter()
        .filter_map(|p| {
            fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|t| parse_stat(&t))
                .map(|(_, own, reaped)| own + reaped)
        })
        .sum()
}

/// Machine-wide CPU time from /proc/stat's "cpu" line, in clock ticks: (busy, steal).
/// Busy is user + nice + system + irq + softirq + steal; idle and iowait are not.
pub fn parse_cpu_line(text: &str) -> Option<(u64, u64)> {
    let l = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = l
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let steal = at(7);
    Some((at(0) + at(1) + at(2) + at(5) + at(6) + steal, steal))
}

pub fn read_cpu_ticks() -> Option<(u64, u64)> {
    parse_cpu_line(&fs::read_to_string("/proc/stat").ok()?)
}

/// What the docs say about the machine.
#[derive(Debug, Clone, Default)]
pub struct Machine {
    pub nproc: usize,
    pub kernel: String,
    pub cpu_model: String,
    pub mem_total_gib: f64,
}

pub fn machine() -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == "model name").then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem_total_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                let rest = l.strip_prefix("MemTotal:")?;
                rest.split_whitespace().next()?.parse::<f64>().ok()
            })
        })
        .map_or(0.0, |kb| kb / (1024.0 * 1024.0));
    Machine {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cpu_model,
        mem_total_gib,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snmp_fields() {
        let t = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                 Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors\n\
                 Udp: 100 2 7 90 5 0\nUdpLite: InDatagrams RcvbufErrors\nUdpLite: 0 9\n";
        assert_eq!(parse_snmp(t, "Udp", "RcvbufErrors"), Some(5));
        assert_eq!(parse_snmp(t, "UdpLite", "RcvbufErrors"), Some(9));
        assert_eq!(parse_snmp(t, "Udp", "Nope"), None);
        assert_eq!(
            parse_snmp6("Udp6InErrors 3\nUdp6RcvbufErrors 11\n", "Udp6RcvbufErrors"),
            Some(11)
        );
    }

    #[test]
    fn udp_table_rows() {
        let t = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  1: 0100007F:0045 00000000:0000 07 00000000:00000200 00:00000000 00000000     0        0 123 2 0000000000000000 17\n\
  2: 0100007F:9C40 0100007F:0045 01 00000000:00000000 00:00000000 00000000     0        0 124 2 0000000000000000 0\n";
        let rows = parse_udp_table(t);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0],
            UdpSocketRow {
                local_port: 69,
                remote_port: 0,
                rx_queue: 0x200,
                drops: 17
            }
        );
        assert_eq!(rows[1].local_port, 0x9c40);
        assert_eq!(rows[1].remote_port, 69);
    }

    #[test]
    fn status_and_stat() {
        let m = parse_status(
            "Name:\tx\nVmHWM:\t  2000 kB\nVmRSS:\t  1500 kB\nRssAnon:\t 500 kB\nRssFile:\t 900 kB\nRssShmem:\t 100 kB\n",
        );
        assert_eq!(
            m,
            Mem {
                rss: 1500 * 1024,
                anon: 500 * 1024,
                file: 900 * 1024,
                shmem: 100 * 1024,
                hwm: 2000 * 1024
            }
        );
        let s = "42 (a b) c)) S 7 42 42 0 -1 4194304 100 0 0 0 11 22 33 44 20 0 1 0 5 0 0";
        assert_eq!(parse_stat(s), Some((7, 33, 77)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(
            parse_stat("9 (z) Z 7 42 42 0 -1 4194304 100 0 0 0 11 22 33 44"),
            None
        );
    }

    #[test]
    fn cpu_line() {
        let t = "cpu  100 5 50 1000 7 3 2 11 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(parse_cpu_line(t), Some((100 + 5 + 50 + 3 + 2 + 11, 11)));
        assert!(read_cpu_ticks().is_some());
    }

    #[test]
    fn this_process_is_its_own_descendant() {
        let me = std::process::id() as i32;
        assert!(descendants(me).contains(&me));
        assert!(read_mem(me).is_some_and(|m| m.rss > 0));
        assert!(fd_count(me).is_some_and(|n| n >= 3));
        let m = machine();
        assert!(m.nproc >= 1 && !m.kernel.is_empty());
    }

    #[test]
    fn thread_names_and_ticks() {
        assert_eq!(thread_group("ringtftpd-write"), "ringtftpd-write");
        assert_eq!(thread_group("shard-0"), "shard");
        assert_eq!(thread_group("iou-wrk-1234"), "iou-wrk");
        assert_eq!(thread_group("123"), "123");
        let line = "42 (shard-0) S 1 42 42 0 -1 4194560 100 0 0 0 250 130 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_task_stat(line), Some(("shard-0".into(), 380)));
    }
}
