//! Clients' hardware addresses, from the kernel's neighbour table, for the
//! policy file's `mac` rules and `{mac}` prefix (see `crate::clients`).
//! Only a directly attached client has an entry (its ARP request or IPv6
//! neighbour solicitation for our address made one before its first
//! datagram); a routed client's MAC is not visible, and its lookup is
//! `None`.
//!
//! One [`Neighbours`] per shard, asked while handling a request: a small
//! bounded cache with a TTL in front of one rtnetlink `RTM_GETNEIGH` get
//! per address (Linux 5.0+; one round trip, no table dump, so a boot storm
//! of thousands of new clients costs one query each, not one read of a
//! growing table each). Where that fails (an older kernel, no ingress
//! interface known) IPv4 falls back to `/proc/net/arp`.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, recv, sendto, socket,
};

/// How long a found MAC is reused (an address handed to another machine
/// is seen within this).
pub const FOUND_TTL: Duration = Duration::from_secs(10);
/// How long "no entry" is reused: short, so a client the kernel learns a
/// moment later is found on its retry.
pub const MISSING_TTL: Duration = Duration::from_secs(1);
/// Addresses a cache holds; when full, expired ones go, then all.
pub const CACHE_CAPACITY: usize = 4096;

const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const NDMSG_LEN: usize = 12;
/// NUD_PERMANENT | NOARP | REACHABLE | PROBE | STALE | DELAY: the entry's
/// link-layer address is usable (not INCOMPLETE or FAILED).
const NUD_VALID: u16 = 0x80 | 0x40 | 0x02 | 0x10 | 0x04 | 0x08;
/// Replies read per query before giving up (stale ones are skipped).
const MAX_REPLIES: usize = 4;

#[derive(Debug, Clone, Copy)]
struct Cached {
    mac: Option<[u8; 6]>,
    at: Instant,
}

/// The rtnetlink socket, opened at the first lookup.
#[derive(Debug)]
enum Netlink {
    Unopened,
    Open(OwnedFd),
    /// It could not be opened, or the kernel has no single-entry get.
    Unavailable,
}

/// What one query learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Found([u8; 6]),
    /// No usable entry: definitive.
    Missing,
    /// The kernel refused the query with this errno: try another way.
    Failed(i32),
}

/// A shard's view of the neighbour table (see the module doc).
#[derive(Debug)]
pub struct Neighbours {
    cache: HashMap<(IpAddr, u32), Cached>,
    netlink: Netlink,
    seq: u32,
    buf: Vec<u8>,
    /// Queries sent to the kernel (netlink or /proc), for tests and metrics.
    pub queries: u64,
}

impl Default for Neighbours {
    fn default() -> Self {
        Self::new()
    }
}

impl Neighbours {
    pub fn new() -> Self {
        Neighbours {
            cache: HashMap::new(),
            netlink: Netlink::Unopened,
            seq: 0,
            buf: Vec::new(),
            queries: 0,
        }
    }

    /// The MAC of `ip`, a client reached through interface `ifindex` (0:
    /// not known), if the neighbour table has one.
    pub fn lookup(&mut self, now: Instant, ip: IpAddr, ifindex: u32) -> Option<[u8; 6]> {
        let ip = ip.to_canonical();
        if ip.is_loopback() || ip.is_unspecified() {
            return None;
        }
        let key = (ip, ifindex);
        if let Some(c) = self.cache.get(&key) {
            let ttl = if c.mac.is_some() {
                FOUND_TTL
            } else {
                MISSING_TTL
            };
            if now.saturating_duration_since(c.at) < ttl {
                return c.mac;
            }
        }
        self.queries += 1;
        let mac = self.query(ip, ifindex);
        if self.cache.len() >= CACHE_CAPACITY && !self.cache.contains_key(&key) {
            self.cache
                .retain(|_, c| now.saturating_duration_since(c.at) < FOUND_TTL.max(MISSING_TTL));
            if self.cache.len() >= CACHE_CAPACITY {
                self.cache.clear();
            }
        }
        self.cache.insert(key, Cached { mac, at: now });
        mac
    }

    /// Addresses cached now.
    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    fn query(&mut self, ip: IpAddr, ifindex: u32) -> Option<[u8; 6]> {
        if ifindex != 0 {
            match self.netlink_get(ip, ifindex) {
                Answer::Found(mac) => return Some(mac),
                Answer::Missing => return None,
                Answer::Failed(_) => {}
            }
        }
        match ip {
            IpAddr::V4(v4) => {
                let text = std::fs::read_to_string("/proc/net/arp").ok()?;
                let index_of = |dev: &str| nix::net::if_::if_nametoindex(dev).ok();
                parse_proc_arp(&text, v4, ifindex, index_of)
            }
            IpAddr::V6(_) => None,
        }
    }

    fn netlink_get(&mut self, ip: IpAddr, ifindex: u32) -> Answer {
        if let Netlink::Unopened = self.netlink {
            self.netlink = match socket(
                AddressFamily::Netlink,
                SockType::Raw,
                SockFlag::SOCK_CLOEXEC,
                SockProtocol::NetlinkRoute,
            ) {
                Ok(fd) => Netlink::Open(fd),
                Err(_) => Netlink::Unavailable,
            };
        }
        let Netlink::Open(fd) = &self.netlink else {
            return Answer::Failed(libc::ENOTSOCK);
        };
        self.seq = self.seq.wrapping_add(1);
        let request = get_request(ip, ifindex, self.seq);
        let kernel = NetlinkAddr::new(0, 0);
        if let Err(e) = sendto(fd.as_raw_fd(), &request, &kernel, MsgFlags::empty()) {
            return Answer::Failed(e as i32);
        }
        self.buf.resize(8192, 0);
        // rtnetlink answers inside sendto: the reply is queued by now, so
        // never block the shard waiting for one.
        for _ in 0..MAX_REPLIES {
            let Ok(n) = recv(fd.as_raw_fd(), &mut self.buf, MsgFlags::MSG_DONTWAIT) else {
                break;
            };
            if let Some(answer) = parse_reply(&self.buf[..n], self.seq) {
                // Before Linux 5.0 RTM_GETNEIGH has no single-entry get:
                // stop asking.
                if answer == Answer::Failed(libc::EOPNOTSUPP) {
                    self.netlink = Netlink::Unavailable;
                }
                return answer;
            }
        }
        Answer::Failed(libc::EAGAIN)
    }
}

/// An `RTM_GETNEIGH` request for one entry: `ip` on `ifindex`.
fn get_request(ip: IpAddr, ifindex: u32, seq: u32) -> Vec<u8> {
    let (family, addr): (u8, Vec<u8>) = match ip {
        IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
    };
    let attr_len = 4 + addr.len();
    let len = NLMSG_HDRLEN + NDMSG_LEN + attr_len.next_multiple_of(4);
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETNEIGH.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // struct ndmsg: family, pad1, pad2, ifindex, state, flags, type.
    m.extend_from_slice(&[family, 0, 0, 0]);
    m.extend_from_slice(&ifindex.to_ne_bytes());
    m.extend_from_slice(&[0, 0, 0, 0]);
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&NDA_DST.to_ne_bytes());
    m.extend_from_slice(&addr);
    m.resize(len, 0);
    m
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The answer to request `seq` in one datagram of netlink messages, or
/// None if it holds none (a stale reply to an earlier query).
fn parse_reply(datagram: &[u8], seq: u32) -> Option<Answer> {
    let mut rest = datagram;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32_at(rest, 0)? as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return None;
        }
        let (kind, msg_seq) = (u16_at(rest, 4)?, u32_at(rest, 8)?);
        let body = &rest[NLMSG_HDRLEN..len];
        if msg_seq == seq {
            match kind {
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(body.get(0..4)?.try_into().ok()?);
                    return Some(match errno.wrapping_neg() {
                        0 | libc::ENOENT => Answer::Missing,
                        // No device by that index (it went away): nothing
                        // to find, but the kernel does answer gets.
                        libc::ENODEV => Answer::Missing,
                        e => Answer::Failed(e),
                    });
                }
                RTM_NEWNEIGH => {
                    return Some(neigh_mac(body).map_or(Answer::Missing, Answer::Found));
                }
                _ => {}
            }
        }
        rest = rest.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    None
}

/// The usable link-layer address of one `RTM_NEWNEIGH` body (ndmsg, then
/// attributes).
fn neigh_mac(body: &[u8]) -> Option<[u8; 6]> {
    let state = u16_at(body, 8)?;
    if state & NUD_VALID == 0 {
        return None;
    }
    let mut attrs = body.get(NDMSG_LEN..)?;
    while attrs.len() >= 4 {
        let len = usize::from(u16_at(attrs, 0)?);
        if len < 4 || len > attrs.len() {
            return None;
        }
        if u16_at(attrs, 2)? & 0x3fff == NDA_LLADDR {
            let mac: [u8; 6] = attrs[4..len].try_into().ok()?;
            return (mac != [0; 6]).then_some(mac);
        }
        attrs = attrs.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    None
}

/// The MAC of `ip` in `/proc/net/arp`'s text: a complete entry (flag
/// ATF_COM), on `ifindex` when known (`index_of` maps a device name).
pub fn parse_proc_arp(
    text: &str,
    ip: Ipv4Addr,
    ifindex: u32,
    index_of: impl Fn(&str) -> Option<u32>,
) -> Option<[u8; 6]> {
    const ATF_COM: u32 = 0x2;
    for line in text.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [addr, _hw_type, flags, hw, _mask, device] = fields[..] else {
            continue;
        };
        if addr.parse::<Ipv4Addr>().ok() != Some(ip) {
            continue;
        }
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap_or(0);
        if flags & ATF_COM == 0 {
            continue;
        }
        if ifindex != 0 && index_of(device) != Some(ifindex) {
            continue;
        }
        if let Some(mac) = parse_mac(hw).filter(|m| *m != [0; 6]) {
            return Some(mac);
        }
    }
    None
}

/// `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for octet in &mut mac {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 2 {
            return None;
        }
        *octet = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARP: &str = "\
IP address       HW type     Flags       HW address            Mask     Device
10.0.0.1         0x1         0x2         52:54:00:12:34:56     *        veth0
10.0.0.2         0x1         0x0         00:00:00:00:00:00     *        veth0
10.0.0.3         0x1         0x2         aa:bb:cc:dd:ee:0f     *        eth1
10.0.0.3         0x1         0x2         aa:bb:cc:dd:ee:10     *        eth2
garbage line
10.0.0.4         0x1         0x6         02:00:00:00:00:04     *        veth0
10.0.0.5         0x1         0x2         02:00:00:00:00        *        veth0
";

    fn index_of(dev: &str) -> Option<u32> {
        match dev {
            "veth0" => Some(7),
            "eth1" => Some(8),
            "eth2" => Some(9),
            _ => None,
        }
    }

    #[test]
    fn proc_net_arp_gives_complete_entries_only() {
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let find = |s: &str, ifindex| parse_proc_arp(ARP, ip(s), ifindex, index_of);
        assert_eq!(find("10.0.0.1", 0), Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(find("10.0.0.1", 7), Some([0x52, 0x54, 0, 0x12, 0x34, 0x56]));
        assert_eq!(find("10.0.0.1", 8), None, "on another interface");
        assert_eq!(find("10.0.0.2", 0), None, "incomplete");
        assert_eq!(
            find("10.0.0.3", 9),
            Some([0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x10])
        );
        assert_eq!(find("10.0.0.4", 0), Some([2, 0, 0, 0, 0, 4]), "permanent");
        assert_eq!(find("10.0.0.5", 0), None, "a short address");
        assert_eq!(find("10.0.0.9", 0), None);
        assert_eq!(parse_proc_arp("", ip("10.0.0.1"), 0, index_of), None);
    }

    /// A kernel reply: RTM_NEWNEIGH with `state` and these attributes.
    fn newneigh(seq: u32, state: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![libc::AF_INET as u8, 0, 0, 0, 7, 0, 0, 0];
        body.extend_from_slice(&state.to_ne_bytes());
        body.extend_from_slice(&[0, 0]);
        for (kind, data) in attrs {
            let len = 4 + data.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(data);
            body.resize(body.len().next_multiple_of(4), 0);
        }
        message(RTM_NEWNEIGH, seq, &body)
    }

    fn message(kind: u16, seq: u32, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(body);
        m.resize(m.len().next_multiple_of(4), 0);
        m
    }

    #[test]
    fn netlink_replies_parse_and_garbage_never_panics() {
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        let dst: &[u8] = &[10, 0, 0, 1];
        let stale = newneigh(5, 0x04, &[(NDA_DST, dst), (NDA_LLADDR, &mac)]);
        assert_eq!(parse_reply(&stale, 5), Some(Answer::Found(mac)));
        // Another query's answer is skipped.
        assert_eq!(parse_reply(&stale, 6), None);
        let incomplete = newneigh(5, 0x01, &[(NDA_DST, dst)]);
        assert_eq!(parse_reply(&incomplete, 5), Some(Answer::Missing));
        let failed = newneigh(5, 0x20, &[(NDA_DST, dst), (NDA_LLADDR, &mac)]);
        assert_eq!(parse_reply(&failed, 5), Some(Answer::Missing));
        let noarp = newneigh(5, 0x40, &[(NDA_LLADDR, &[0; 6])]);
        assert_eq!(parse_reply(&noarp, 5), Some(Answer::Missing));
        let enoent = message(NLMSG_ERROR, 5, &(-libc::ENOENT).to_ne_bytes());
        assert_eq!(parse_reply(&enoent, 5), Some(Answer::Missing));
        let einval = message(NLMSG_ERROR, 5, &(-libc::EINVAL).to_ne_bytes());
        assert_eq!(parse_reply(&einval, 5), Some(Answer::Failed(libc::EINVAL)));
        let old_kernel = message(NLMSG_ERROR, 5, &(-libc::EOPNOTSUPP).to_ne_bytes());
        assert_eq!(
            parse_reply(&old_kernel, 5),
            Some(Answer::Failed(libc::EOPNOTSUPP))
        );
        // Two messages in one datagram: the stale one, then ours.
        let mut both = newneigh(4, 0x02, &[(NDA_LLADDR, &[1; 6])]);
        both.extend(newneigh(5, 0x02, &[(NDA_LLADDR, &mac)]));
        assert_eq!(parse_reply(&both, 5), Some(Answer::Found(mac)));
        // Every truncation of a valid reply, and lying lengths.
        for cut in 0..stale.len() {
            let _ = parse_reply(&stale[..cut], 5);
        }
        let min = message(NLMSG_ERROR, 5, &i32::MIN.to_ne_bytes());
        assert_eq!(parse_reply(&min, 5), Some(Answer::Failed(i32::MIN)));
        let mut liar = stale.clone();
        liar[0] = 0xff;
        assert_eq!(parse_reply(&liar, 5), None);
        let mut bad_attr = stale.clone();
        bad_attr[NLMSG_HDRLEN + NDMSG_LEN] = 0xff;
        assert_eq!(parse_reply(&bad_attr, 5), Some(Answer::Missing));
    }

    #[test]
    fn a_get_request_is_laid_out_as_the_kernel_reads_it() {
        let m = get_request("10.0.0.1".parse().unwrap(), 7, 9);
        assert_eq!(m.len(), 36);
        assert_eq!(u32_at(&m, 0), Some(36));
        assert_eq!(u16_at(&m, 4), Some(RTM_GETNEIGH));
        assert_eq!(u16_at(&m, 6), Some(NLM_F_REQUEST));
        assert_eq!(u32_at(&m, 8), Some(9));
        assert_eq!(m[16], libc::AF_INET as u8);
        assert_eq!(u32_at(&m, 20), Some(7));
        assert_eq!((u16_at(&m, 28), u16_at(&m, 30)), (Some(8), Some(NDA_DST)));
        assert_eq!(&m[32..36], &[10, 0, 0, 1]);
        let m = get_request("fd00::1".parse().unwrap(), 7, 9);
        assert_eq!((m.len(), u16_at(&m, 28)), (48, Some(20)));
    }

    #[test]
    fn the_cache_is_bounded_and_answers_within_its_ttl() {
        let mut n = Neighbours::new();
        let now = Instant::now();
        // Loopback never asks the kernel.
        assert_eq!(n.lookup(now, "127.0.0.1".parse().unwrap(), 1), None);
        assert_eq!(n.queries, 0);
        // A documentation address has no entry: asked once, then cached.
        let ip: IpAddr = "192.0.2.77".parse().unwrap();
        assert_eq!(n.lookup(now, ip, 0), None);
        assert_eq!(n.lookup(now + MISSING_TTL / 2, ip, 0), None);
        assert_eq!(n.queries, 1);
        assert_eq!(n.lookup(now + MISSING_TTL, ip, 0), None);
        assert_eq!(n.queries, 2);
        for i in 0..(CACHE_CAPACITY as u32 + 10) {
            let ip = IpAddr::V6(std::net::Ipv6Addr::from(
                0x2001_0db8_u128 << 96 | u128::from(i),
            ));
            n.lookup(now, ip, 0);
            assert!(n.cached() <= CACHE_CAPACITY);
        }
    }
}
