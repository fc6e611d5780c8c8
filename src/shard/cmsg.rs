//! Control messages, built and parsed in one place: `IP_PKTINFO` and
//! `IPV6_PKTINFO` (where a request was sent to; the address a reply leaves
//! from) and `UDP_SEGMENT` (a GSO send's segment size).

use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Bytes `msg_controllen` must have for one `IPV6_PKTINFO` plus one
/// `IP_PKTINFO` (a dual-stack socket may deliver both for IPv4 traffic),
/// with room to spare.
pub const RECV_CONTROL_LEN: usize = 128;

/// `SOL_UDP` / `UDP_SEGMENT` (linux/udp.h; not in the libc crate for glibc).
pub(super) const SOL_UDP: libc::c_int = 17;
pub(super) const UDP_SEGMENT: libc::c_int = 103;

/// CMSG_ALIGN(len): cmsg data is aligned to size_t.
const fn cmsg_align(len: usize) -> usize {
    let a = mem::size_of::<usize>();
    (len + a - 1) & !(a - 1)
}

/// CMSG_LEN(0): where a control message's data starts.
const CMSG_HDR: usize = cmsg_align(mem::size_of::<libc::cmsghdr>());

/// CMSG_SPACE(len).
const fn cmsg_space(len: usize) -> usize {
    CMSG_HDR + cmsg_align(len)
}

/// Writes one control message (`level`, `kind`, `data`) at the start of
/// `buf`, zeroing the rest, and returns its CMSG_SPACE. `buf` must hold it.
fn write_cmsg(buf: &mut [u8], level: libc::c_int, kind: libc::c_int, data: &[u8]) -> usize {
    let space = cmsg_space(data.len());
    assert!(buf.len() >= space, "control buffer too small");
    buf.fill(0);
    // SAFETY: cmsghdr is plain old data; all-zero is a valid value.
    let mut hdr: libc::cmsghdr = unsafe { mem::zeroed() };
    hdr.cmsg_len = (CMSG_HDR + data.len()) as _;
    hdr.cmsg_level = level;
    hdr.cmsg_type = kind;
    // SAFETY: buf holds at least CMSG_HDR >= size_of::<cmsghdr>() bytes
    // (asserted above), and write_unaligned has no alignment requirement.
    unsafe {
        buf.as_mut_ptr()
            .cast::<libc::cmsghdr>()
            .write_unaligned(hdr)
    };
    buf[CMSG_HDR..CMSG_HDR + data.len()].copy_from_slice(data);
    space
}

/// Where a datagram was sent to: the local address to answer from and the
/// interface it came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Canonical (v4-mapped addresses become IPv4).
    pub local: IpAddr,
    pub ifindex: u32,
}

/// Finds the destination address and interface in received control data.
/// `IP_PKTINFO` wins over `IPV6_PKTINFO` (both come for IPv4 traffic on a
/// dual-stack socket) because its `ipi_spec_dst` is the local address to
/// answer from even when the request was a broadcast.
pub fn parse_pktinfo(control: &[u8]) -> Option<PacketInfo> {
    let mut v6 = None;
    let mut offset = 0usize;
    while offset.checked_add(CMSG_HDR)? <= control.len() {
        let hdr_bytes = &control[offset..offset + mem::size_of::<libc::cmsghdr>()];
        // SAFETY: hdr_bytes holds size_of::<cmsghdr>() initialised bytes
        // (checked above) and cmsghdr is plain old data, so an unaligned
        // read of it is sound.
        let hdr: libc::cmsghdr =
            unsafe { hdr_bytes.as_ptr().cast::<libc::cmsghdr>().read_unaligned() };
        let len = hdr.cmsg_len as usize;
        if len < CMSG_HDR || offset.checked_add(len)? > control.len() {
            break;
        }
        let data = &control[offset + CMSG_HDR..offset + len];
        match (hdr.cmsg_level, hdr.cmsg_type) {
            (libc::IPPROTO_IP, libc::IP_PKTINFO) if data.len() >= 12 => {
                let ifindex = i32::from_ne_bytes(data[0..4].try_into().ok()?);
                let spec_dst: [u8; 4] = data[4..8].try_into().ok()?;
                return Some(PacketInfo {
                    local: IpAddr::V4(Ipv4Addr::from(spec_dst)),
                    ifindex: u32::try_from(ifindex).unwrap_or(0),
                });
            }
            (libc::IPPROTO_IPV6, libc::IPV6_PKTINFO) if data.len() >= 20 => {
                let ip: [u8; 16] = data[0..16].try_into().ok()?;
                let ifindex = u32::from_ne_bytes(data[16..20].try_into().ok()?);
                v6 = Some(PacketInfo {
                    local: Ipv6Addr::from(ip).to_canonical(),
                    ifindex,
                });
            }
            _ => {}
        }
        offset = offset.checked_add(cmsg_align(len))?;
    }
    v6
}

/// Room for one outgoing control message of `N` bytes of CMSG_SPACE,
/// aligned for `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct CmsgBuf<const N: usize>([u8; N]);

impl<const N: usize> CmsgBuf<N> {
    pub fn new() -> Self {
        CmsgBuf([0; N])
    }

    pub fn as_mut_ptr(&mut self) -> *mut libc::c_void {
        self.0.as_mut_ptr().cast()
    }
}

/// Room for one outgoing `IP_PKTINFO` or `IPV6_PKTINFO`.
pub type PktinfoCmsg = CmsgBuf<{ cmsg_space(mem::size_of::<libc::in6_pktinfo>()) }>;

/// Room for one `UDP_SEGMENT` (a u16) and, for a send from a listener
/// (`--single-port`), a pktinfo after it.
pub type GsoCmsg = CmsgBuf<{ cmsg_space(2) + cmsg_space(mem::size_of::<libc::in6_pktinfo>()) }>;

impl PktinfoCmsg {
    /// Writes a pktinfo that makes the kernel send from `local`, for a socket
    /// of family v6 (`true`) or v4, and returns the `msg_controllen`. On an
    /// IPv6 socket an IPv4 `local` goes v4-mapped in an `IPV6_PKTINFO`, which
    /// the kernel accepts for v4-mapped destinations. `ifindex` only matters
    /// for IPv6 (link-local); IPv4 lets routing pick the interface.
    pub fn set(&mut self, local: IpAddr, ifindex: u32, v6_socket: bool) -> Option<usize> {
        write_pktinfo(&mut self.0, local, ifindex, v6_socket)
    }
}

/// Writes the pktinfo of [`PktinfoCmsg::set`] at the start of `buf`.
fn write_pktinfo(buf: &mut [u8], local: IpAddr, ifindex: u32, v6_socket: bool) -> Option<usize> {
    match (local, v6_socket) {
        (IpAddr::V4(ip), false) => {
            // in_pktinfo { ipi_ifindex = 0, ipi_spec_dst = local, ipi_addr = 0 }
            let mut d = [0u8; mem::size_of::<libc::in_pktinfo>()];
            d[4..8].copy_from_slice(&ip.octets());
            Some(write_cmsg(buf, libc::IPPROTO_IP, libc::IP_PKTINFO, &d))
        }
        (ip, true) => {
            let v6 = match ip {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            let ifindex = if v6.to_ipv4_mapped().is_some() {
                0
            } else {
                ifindex
            };
            // in6_pktinfo { ipi6_addr = local, ipi6_ifindex }
            let mut d = [0u8; mem::size_of::<libc::in6_pktinfo>()];
            d[0..16].copy_from_slice(&v6.octets());
            d[16..20].copy_from_slice(&ifindex.to_ne_bytes());
            Some(write_cmsg(buf, libc::IPPROTO_IPV6, libc::IPV6_PKTINFO, &d))
        }
        (IpAddr::V6(_), false) => None,
    }
}

impl GsoCmsg {
    /// Writes a `UDP_SEGMENT` of `segment` bytes; returns the `msg_controllen`.
    pub fn set(&mut self, segment: u16) -> usize {
        write_cmsg(&mut self.0, SOL_UDP, UDP_SEGMENT, &segment.to_ne_bytes())
    }

    /// The same, then a pktinfo that makes the kernel send from `local`
    /// (see [`PktinfoCmsg::set`]); `None` if `local` does not fit the socket.
    pub fn set_with_source(
        &mut self,
        segment: u16,
        local: IpAddr,
        ifindex: u32,
        v6_socket: bool,
    ) -> Option<usize> {
        let n = self.set(segment);
        Some(n + write_pktinfo(&mut self.0[n..], local, ifindex, v6_socket)?)
    }

    /// The segment size written last.
    #[cfg(test)]
    pub fn segment(&self) -> u16 {
        u16::from_ne_bytes([self.0[CMSG_HDR], self.0[CMSG_HDR + 1]])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pktinfo_written_then_parsed() {
        let mut c = PktinfoCmsg::new();
        let n = c.set("10.1.2.3".parse().unwrap(), 7, false).unwrap();
        assert_eq!(n, cmsg_space(12));
        assert_eq!(
            parse_pktinfo(&c.0[..n]),
            Some(PacketInfo {
                local: "10.1.2.3".parse().unwrap(),
                ifindex: 0
            })
        );
        let n = c.set("fd00::5".parse().unwrap(), 4, true).unwrap();
        assert_eq!(
            parse_pktinfo(&c.0[..n]),
            Some(PacketInfo {
                local: "fd00::5".parse().unwrap(),
                ifindex: 4
            })
        );
        // IPv4 local on an IPv6 socket: v4-mapped, parsed back canonical.
        let n = c.set("127.0.0.9".parse().unwrap(), 4, true).unwrap();
        assert_eq!(
            parse_pktinfo(&c.0[..n]),
            Some(PacketInfo {
                local: "127.0.0.9".parse().unwrap(),
                ifindex: 0
            })
        );
        assert!(c.set("::1".parse().unwrap(), 1, false).is_none());
    }

    #[test]
    fn pktinfo_parse_rejects_garbage_without_panicking() {
        assert_eq!(parse_pktinfo(&[]), None);
        assert_eq!(parse_pktinfo(&[0xff; 7]), None);
        assert_eq!(parse_pktinfo(&[0xff; 64]), None);
        // A header claiming more bytes than there are.
        let mut c = PktinfoCmsg::new();
        let n = c.set("10.0.0.1".parse().unwrap(), 0, false).unwrap();
        assert_eq!(parse_pktinfo(&c.0[..n - 5]), None);
        // cmsg_len of zero must not loop forever.
        let zero = [0u8; 48];
        assert_eq!(parse_pktinfo(&zero), None);
    }

    #[test]
    fn pktinfo_prefers_ip_pktinfo_over_ipv6() {
        let mut a = PktinfoCmsg::new();
        let n6 = a
            .set("::ffff:192.0.2.255".parse().unwrap(), 0, true)
            .unwrap();
        let mut b = PktinfoCmsg::new();
        let n4 = b.set("192.0.2.2".parse().unwrap(), 0, false).unwrap();
        let mut both = a.0[..n6].to_vec();
        both.extend_from_slice(&b.0[..n4]);
        assert_eq!(
            parse_pktinfo(&both).unwrap().local,
            "192.0.2.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn udp_segment_written() {
        let mut g = GsoCmsg::new();
        let n = g.set(1472);
        assert_eq!(n, cmsg_space(2));
        // SAFETY: the buffer starts with the cmsghdr just written.
        let hdr = unsafe { g.0.as_ptr().cast::<libc::cmsghdr>().read_unaligned() };
        assert_eq!((hdr.cmsg_level, hdr.cmsg_type), (SOL_UDP, UDP_SEGMENT));
        assert_eq!(g.segment(), 1472);
        // Not a pktinfo.
        assert_eq!(parse_pktinfo(&g.0[..n]), None);
    }
}
