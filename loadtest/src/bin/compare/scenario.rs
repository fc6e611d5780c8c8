//! The scenarios of issue 5 (S1–S6, downloads) and S8 (uploads) at full size, and the
//! scaled-down set of `--quick`.

/// One workload: N RRQs of one random-byte file with C in flight (or, with `put`, N uploads
/// of `size` bytes, each to a name of its own), and how clients behave.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    pub id: &'static str,
    pub title: &'static str,
    /// Remote file name; the file holds `size` random bytes.
    pub file: String,
    pub size: u64,
    pub n: u64,
    pub c: u64,
    pub blksize: Option<u16>,
    pub windowsize: Option<u16>,
    /// Client retransmit timeout in seconds (the first one with `backoff`).
    pub timeout_s: f64,
    pub retries: u32,
    /// PXE-ROM-like exponential backoff with jitter.
    pub backoff: bool,
    /// The load generator aborts what is in flight after this long.
    pub max_time_s: u64,
    /// ... or when nothing at all has come back from the server for this long (a hung server
    /// would otherwise hold the run until `max_time_s`).
    pub stall_s: u64,
    /// Uploads (WRQ): `file` is unused; the names and their checks come from the harness.
    pub put: bool,
    /// loadtest's `--client-style independent` (a blocking connected socket per client
    /// thread, one recv per wake-up) instead of its default epoll driver.
    pub independent: bool,
}

impl Scenario {
    /// Arguments for `loadtest` (server, expectation and output flags excluded).
    pub fn loadtest_args(&self) -> Vec<String> {
        let what = if self.put {
            vec![
                "--put".to_string(),
                "--put-size".into(),
                self.size.to_string(),
            ]
        } else {
            vec!["--file".to_string(), self.file.clone()]
        };
        let mut a = what;
        a.extend([
            "-n".into(),
            self.n.to_string(),
            "-c".into(),
            self.c.to_string(),
            "--timeout".into(),
            self.timeout_s.to_string(),
            "--retries".into(),
            self.retries.to_string(),
            "--max-time".into(),
            self.max_time_s.to_string(),
            "--stall".into(),
            self.stall_s.to_string(),
        ]);
        if let Some(b) = self.blksize {
            a.extend(["--blksize".into(), b.to_string()]);
        }
        if let Some(w) = self.windowsize {
            a.extend(["--windowsize".into(), w.to_string()]);
        }
        if self.backoff {
            a.push("--backoff".into());
        }
        if self.independent {
            a.extend(["--client-style".into(), "independent".into()]);
        }
        a
    }

    /// This scenario with independent clients, as `{id}i`; `None` where loadtest's
    /// independent style cannot run it (uploads; more than 4096 clients at once).
    pub fn with_independent_clients(&self) -> Option<Scenario> {
        if self.put || self.independent || self.c.min(self.n) > 4096 {
            return None;
        }
        Some(Scenario {
            id: Box::leak(format!("{}i", self.id).into_boxed_str()),
            title: Box::leak(format!("{}, independent clients", self.title).into_boxed_str()),
            independent: true,
            ..self.clone()
        })
    }

    /// A one-line description for the docs.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{}{} × {}, {} in flight, ",
            if self.put { "WRQ (upload), " } else { "" },
            self.n,
            human_size(self.size),
            self.c
        );
        match self.blksize {
            Some(b) => s.push_str(&format!("blksize {b}")),
            None => s.push_str("no options (512-byte blocks)"),
        }
        match self.windowsize {
            Some(w) => s.push_str(&format!(", windowsize {w}")),
            None if self.put => s.push_str(", lock-step"),
            None => {}
        }
        if self.backoff {
            s.push_str(&format!(
                "; clients back off {}s ×1, 2, 4, 8, 8… (+0–25 % jitter), {} retries",
                self.timeout_s, self.retries
            ));
        } else {
            s.push_str(&format!(
                "; clients retransmit every {}s, {} retries",
                self.timeout_s, self.retries
            ));
        }
        if self.independent {
            s.push_str(
                "; independent clients (a thread and a blocking socket each, connected to the \
                 server's TID, one recv per wake-up, ACK at once)",
            );
        }
        s.push_str(&format!(
            "; a run is cut after {} s, or after {} s without a datagram from the server",
            self.max_time_s, self.stall_s
        ));
        s
    }
}

pub fn human_size(b: u64) -> String {
    if b >= 1 << 20 && b.is_multiple_of(1 << 20) {
        format!("{} MiB", b >> 20)
    } else if b >= 1 << 10 && b.is_multiple_of(1 << 10) {
        format!("{} KiB", b >> 10)
    } else {
        format!("{b} B")
    }
}

#[allow(clippy::too_many_arguments)]
fn s(
    id: &'static str,
    title: &'static str,
    size: u64,
    n: u64,
    c: u64,
    blksize: Option<u16>,
    windowsize: Option<u16>,
    backoff: bool,
    max_time_s: u64,
) -> Scenario {
    Scenario {
        id,
        title,
        file: format!("{}.bin", human_size(size).replace(' ', "").to_lowercase()),
        size,
        n,
        c,
        blksize,
        windowsize,
        timeout_s: 1.0,
        // Patient PXE-like clients retry longer (iPXE keeps trying for about a minute).
        retries: if backoff { 8 } else { 5 },
        backoff,
        max_time_s,
        // Patient clients may wait 8 s between tries; allow several such gaps.
        stall_s: if backoff { 30 } else { 15 },
        put: false,
        independent: false,
    }
}

/// An upload scenario: N × `size` bytes, C in flight, lock-step at `blksize`.
fn put(size: u64, n: u64, c: u64, blksize: u16, max_time_s: u64) -> Scenario {
    Scenario {
        file: String::new(),
        put: true,
        ..s(
            "S8",
            "uploads",
            size,
            n,
            c,
            Some(blksize),
            None,
            false,
            max_time_s,
        )
    }
}

/// Uploads are lock-step at blksize 1428: ringtftpd grants at most 2000 to a WRQ (its
/// receive buffers), and 1428 keeps a DATA datagram within a 1500-byte MTU as the reads'
/// 1468 does (with room for IPv6).
pub const PUT_BLKSIZE: u16 = 1428;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// The issue's scenarios at full size.
pub fn full() -> Vec<Scenario> {
    vec![
        s(
            "S1",
            "PXE storm",
            64 * KIB,
            1000,
            200,
            Some(1468),
            None,
            false,
            60,
        ),
        s(
            "S2",
            "small files, defaults",
            4 * KIB,
            2000,
            100,
            None,
            None,
            false,
            60,
        ),
        s(
            "S3",
            "bulk lock-step",
            64 * MIB,
            4,
            4,
            Some(1468),
            None,
            false,
            60,
        ),
        // Issue 12: one client alone, the everyday pxelinux/GRUB case, where the time from
        // an ACK's arrival to the next DATA leaving is all there is.
        s(
            "S3a",
            "bulk lock-step, one client",
            64 * MIB,
            1,
            1,
            Some(1468),
            None,
            false,
            60,
        ),
        s(
            "S4",
            "bulk windowed",
            64 * MIB,
            4,
            4,
            Some(1468),
            Some(16),
            false,
            60,
        ),
        s(
            "S5",
            "burst of 2000",
            2 * MIB,
            2000,
            2000,
            Some(1468),
            None,
            false,
            60,
        ),
        s(
            "S6",
            "10,000 sessions",
            256 * KIB,
            10_000,
            10_000,
            Some(1468),
            None,
            true,
            90,
        ),
        put(MIB, 200, 50, PUT_BLKSIZE, 60),
    ]
}

/// Scaled down so the whole set runs in seconds; only correctness is checked.
pub fn quick() -> Vec<Scenario> {
    vec![
        s(
            "S1",
            "PXE storm",
            64 * KIB,
            100,
            50,
            Some(1468),
            None,
            false,
            20,
        ),
        s(
            "S2",
            "small files, defaults",
            4 * KIB,
            200,
            50,
            None,
            None,
            false,
            20,
        ),
        s(
            "S3",
            "bulk lock-step",
            4 * MIB,
            2,
            2,
            Some(1468),
            None,
            false,
            20,
        ),
        s(
            "S3a",
            "bulk lock-step, one client",
            4 * MIB,
            1,
            1,
            Some(1468),
            None,
            false,
            20,
        ),
        s(
            "S4",
            "bulk windowed",
            4 * MIB,
            2,
            2,
            Some(1468),
            Some(16),
            false,
            20,
        ),
        s(
            "S5",
            "burst",
            256 * KIB,
            300,
            300,
            Some(1468),
            None,
            false,
            30,
        ),
        s(
            "S6",
            "many sessions",
            64 * KIB,
            1000,
            1000,
            Some(1468),
            None,
            true,
            40,
        ),
        // 40 full blocks, then the empty final DATA 41 (the full S8's 1 MiB ends short).
        put(40 * PUT_BLKSIZE as u64, 20, 10, PUT_BLKSIZE, 20),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_set_matches_the_issue() {
        let f = full();
        let ids: Vec<_> = f.iter().map(|s| s.id).collect();
        assert_eq!(ids, ["S1", "S2", "S3", "S3a", "S4", "S5", "S6", "S8"]);
        let u = f[7].clone();
        assert!(u.put && !f[..7].iter().any(|s| s.put));
        assert_eq!((f[3].n, f[3].c, f[3].size), (1, 1, 64 * MIB));
        assert_eq!(f[3].windowsize, None);
        let f: Vec<Scenario> = f.into_iter().filter(|s| s.id != "S3a").collect();
        assert_eq!((u.n, u.c, u.size, u.blksize), (200, 50, MIB, Some(1428)));
        assert_eq!(u.windowsize, None);
        assert_eq!(
            (f[0].n, f[0].c, f[0].size, f[0].blksize),
            (1000, 200, 65536, Some(1468))
        );
        assert_eq!(
            (f[1].n, f[1].c, f[1].size, f[1].blksize),
            (2000, 100, 4096, None)
        );
        assert_eq!(f[3].windowsize, Some(16));
        assert_eq!(f[2].windowsize, None);
        assert_eq!((f[4].n, f[4].c), (2000, 2000));
        assert!(f[5].backoff && f[5].n == 10_000 && f[5].c == 10_000);
        assert_eq!(f[5].size, 256 * 1024);
    }

    #[test]
    fn loadtest_arguments() {
        let a = full()[4].loadtest_args().join(" ");
        assert!(a.contains("--file 64mib.bin"), "{a}");
        assert!(a.contains("-n 4 -c 4"), "{a}");
        assert!(a.contains("--blksize 1468 --windowsize 16"), "{a}");
        assert!(!a.contains("--backoff"));
        let a = full()[1].loadtest_args().join(" ");
        assert!(!a.contains("--blksize"), "{a}");
        assert!(full()[6].loadtest_args().contains(&"--backoff".to_string()));
        let a = full()[7].loadtest_args().join(" ");
        assert!(
            a.starts_with("--put --put-size 1048576 -n 200 -c 50") && !a.contains("--file"),
            "{a}"
        );
        assert!(
            a.contains("--blksize 1428") && !a.contains("--windowsize"),
            "{a}"
        );
        let d = full()[7].describe();
        assert!(
            d.starts_with("WRQ (upload), 200 × 1 MiB, 50 in flight, blksize 1428, lock-step;"),
            "{d}"
        );
        let q = quick();
        assert_eq!(q.len(), 8);
        assert!(
            q[7].put && q[7].size.is_multiple_of(1428),
            "the quick S8 ends on an empty block"
        );
    }

    #[test]
    fn independent_variants() {
        let f = full();
        let i = f[0].with_independent_clients().unwrap();
        assert_eq!((i.id, i.n, i.c), ("S1i", 1000, 200));
        assert!(
            i.loadtest_args()
                .join(" ")
                .ends_with("--client-style independent")
        );
        assert!(i.describe().contains("independent clients"));
        assert!(
            f[6].with_independent_clients().is_none(),
            "S6: 10,000 threads"
        );
        assert!(f[7].with_independent_clients().is_none(), "S8: uploads");
        assert!(i.with_independent_clients().is_none());
    }

    #[test]
    fn sizes_print_in_binary_units() {
        assert_eq!(human_size(65536), "64 KiB");
        assert_eq!(human_size(2 << 20), "2 MiB");
        assert_eq!(human_size(1000), "1000 B");
    }
}
