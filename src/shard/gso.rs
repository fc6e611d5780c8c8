//! When a UDP GSO send fails, and for which paths to stop segmenting.
//!
//! A segmented send can fail where a plain one to the same peer works: the
//! kernel checks GSO sends more strictly (`udp_send_skb`). Those errors mean
//! "not on this path", not "this peer is gone": the shard resends the same
//! packets one by one at once and remembers the path in [`NoGsoPaths`], a
//! small bounded map whose entries expire, so a repaired path gets GSO back
//! and other destinations keep it throughout.
//!
//! Prior art: quinn-udp turns GSO off for the whole socket on `EIO` and
//! leaves the lost batch to QUIC's loss recovery; here a path is one
//! (local address, peer address) pair and nothing waits for a timer.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long a path that refused GSO is sent to one packet per send.
pub const NO_GSO_TTL: Duration = Duration::from_secs(300);
/// Most paths remembered; past that the entry expiring soonest goes.
pub const NO_GSO_PATHS: usize = 256;

/// Whether a segmented send that failed with `errno` failed because of
/// segmentation, so that the same packets sent one by one may succeed.
/// From `udp_send_skb` / `udp_sendmsg` (Linux 6.x):
/// - `EMSGSIZE`: a segment exceeds the path MTU (a route or a learned PMTU
///   below the interface MTU); single datagrams are fragmented instead;
/// - `EIO`: the path cannot segment (IPsec/xfrm; before 6.11 also a device
///   without checksum offload);
/// - `EINVAL`: bad segment size or count, or `SO_NO_CHECK` on the socket;
/// - `EOPNOTSUPP`, `ENOPROTOOPT`: no UDP GSO here at all.
///
/// Everything else (`ECONNREFUSED`, `EAGAIN`, `ENOBUFS`, `EPERM` from a
/// firewall, `EFAULT` from a truncated file) would fail single sends too.
pub fn refuses_gso(errno: i32) -> bool {
    matches!(
        errno,
        libc::EMSGSIZE | libc::EIO | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOPROTOOPT
    )
}

/// Paths (local address, peer address) that refused GSO, each until it
/// expires. Bounded by `cap`; all operations are O(1) but an insert into a
/// full map, which scans it (rare: it follows a failed send).
pub struct NoGsoPaths {
    until: HashMap<(IpAddr, IpAddr), Instant>,
    cap: usize,
    ttl: Duration,
}

impl NoGsoPaths {
    pub fn new(cap: usize, ttl: Duration) -> Self {
        NoGsoPaths {
            until: HashMap::new(),
            cap: cap.max(1),
            ttl,
        }
    }

    /// Whether sends from `local` to `peer` may be segmented now; forgets
    /// the path once its entry expired.
    pub fn allows(&mut self, now: Instant, local: IpAddr, peer: IpAddr) -> bool {
        match self.until.get(&(local, peer)) {
            None => true,
            Some(&until) if now >= until => {
                self.until.remove(&(local, peer));
                true
            }
            Some(_) => false,
        }
    }

    /// Marks the path as refusing GSO until `now + ttl`. Returns true if it
    /// was not marked already (for logging once per path).
    pub fn refuse(&mut self, now: Instant, local: IpAddr, peer: IpAddr) -> bool {
        let key = (local, peer);
        let until = now + self.ttl;
        if let Some(u) = self.until.get_mut(&key) {
            let fresh = now >= *u;
            *u = until;
            return fresh;
        }
        if self.until.len() >= self.cap {
            self.until.retain(|_, u| now < *u);
        }
        if self.until.len() >= self.cap {
            // Losing a path only costs one more failed send and resend.
            let soonest = self.until.iter().min_by_key(|(_, u)| **u).map(|(k, _)| *k);
            if let Some(k) = soonest {
                self.until.remove(&k);
            }
        }
        self.until.insert(key, until);
        true
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.until.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_segmentation_errors_refuse_gso() {
        for e in [
            libc::EMSGSIZE,
            libc::EIO,
            libc::EINVAL,
            libc::EOPNOTSUPP,
            libc::ENOPROTOOPT,
        ] {
            assert!(refuses_gso(e), "{e}");
        }
        for e in [
            libc::EFAULT,
            libc::ECONNREFUSED,
            libc::EAGAIN,
            libc::ENOBUFS,
            libc::EPERM,
            libc::ENETUNREACH,
            libc::ECANCELED,
        ] {
            assert!(!refuses_gso(e), "{e}");
        }
    }

    #[test]
    fn a_refused_path_is_per_destination_and_expires() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(300);
        let mut paths = NoGsoPaths::new(8, ttl);
        let (local, a, b) = (ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3"));
        assert!(paths.allows(t0, local, a));
        assert!(paths.refuse(t0, local, a));
        // Logged once: a second failure on the path is not news.
        assert!(!paths.refuse(t0, local, a));
        assert!(!paths.allows(t0, local, a));
        // Another peer, or the same peer from another local address, keeps GSO.
        assert!(paths.allows(t0, local, b));
        assert!(paths.allows(t0, ip("127.0.0.1"), a));
        assert!(!paths.allows(t0 + ttl - Duration::from_millis(1), local, a));
        // Expired: GSO is tried again, and the entry is gone.
        assert!(paths.allows(t0 + ttl, local, a));
        assert_eq!(paths.len(), 0);
        // Refused again after expiry: news again.
        assert!(paths.refuse(t0 + ttl, local, a));
    }

    #[test]
    fn the_map_is_bounded_expired_first_then_soonest_expiring() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut paths = NoGsoPaths::new(3, ttl);
        let local = ip("10.0.0.1");
        let peer = |i: u8| IpAddr::from([10, 1, 0, i]);
        for i in 0..3 {
            paths.refuse(t0 + Duration::from_secs(u64::from(i)), local, peer(i));
        }
        // Full: the entry expiring soonest (peer 0) makes room.
        paths.refuse(t0 + Duration::from_secs(3), local, peer(3));
        assert_eq!(paths.len(), 3);
        let t = t0 + Duration::from_secs(3);
        assert!(paths.allows(t, local, peer(0)));
        assert!(!paths.allows(t, local, peer(1)));
        assert!(!paths.allows(t, local, peer(3)));
        // Full again, with two entries expired by now: both go, none else.
        let late = t0 + Duration::from_secs(12);
        paths.refuse(late, local, peer(4));
        assert_eq!(paths.len(), 2);
        assert!(!paths.allows(late, local, peer(3)));
        assert!(!paths.allows(late, local, peer(4)));
        for i in 0..1000u32 {
            paths.refuse(late, local, IpAddr::from(i.to_be_bytes()));
            assert!(paths.len() <= 3);
        }
    }
}
