//! Sockets for the shard: listeners, per-transfer sockets, socket addresses
//! to and from their C layout, and interface MTUs.
//!
//! Addresses handed to the endpoint are canonical: a v4-mapped IPv6 address
//! (what a dual-stack `[::]` listener reports for IPv4 traffic) becomes plain
//! IPv4. [`RawAddr::set`] maps back when a datagram leaves an IPv6 socket.

use std::ffi::CStr;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// A `sockaddr_in` or `sockaddr_in6`, to point a `msghdr` at.
#[repr(C)]
#[derive(Clone, Copy)]
pub union RawAddr {
    v4: libc::sockaddr_in,
    v6: libc::sockaddr_in6,
}

impl RawAddr {
    pub fn new() -> Self {
        RawAddr {
            v6: zeroed_sockaddr_in6(),
        }
    }

    /// Stores `addr` in the layout of a socket of family v6 (`true`) or v4,
    /// and returns the length to put in `msg_namelen`. An IPv4 address on an
    /// IPv6 socket becomes v4-mapped; an IPv6 address cannot go out of an
    /// IPv4 socket (`None`).
    pub fn set(&mut self, addr: SocketAddr, v6_socket: bool) -> Option<libc::socklen_t> {
        match (addr, v6_socket) {
            (SocketAddr::V4(a), false) => {
                let mut sin = zeroed_sockaddr_in();
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = a.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
                self.v4 = sin;
                Some(mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
            }
            (SocketAddr::V4(a), true) => {
                let mapped = SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0);
                self.set(SocketAddr::V6(mapped), true)
            }
            (SocketAddr::V6(a), true) => {
                let mut sin6 = zeroed_sockaddr_in6();
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = a.port().to_be();
                sin6.sin6_flowinfo = a.flowinfo();
                sin6.sin6_addr.s6_addr = a.ip().octets();
                sin6.sin6_scope_id = a.scope_id();
                self.v6 = sin6;
                Some(mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
            }
            (SocketAddr::V6(_), false) => None,
        }
    }

    pub fn as_ptr(&self) -> *const libc::sockaddr {
        (self as *const RawAddr).cast()
    }
}

impl Default for RawAddr {
    fn default() -> Self {
        Self::new()
    }
}

fn zeroed_sockaddr_in() -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    unsafe { mem::zeroed() }
}

fn zeroed_sockaddr_in6() -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain old data; all-zero is a valid value.
    unsafe { mem::zeroed() }
}

/// Maps a v4-mapped IPv6 address to IPv4; leaves others alone.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, a.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}

/// Parses the source address the kernel wrote into a `msg_name` field.
pub fn parse_sockaddr(name: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(name.get(0..2)?.try_into().ok()?);
    match i32::from(family) {
        libc::AF_INET if name.len() >= mem::size_of::<libc::sockaddr_in>() => {
            let port = u16::from_be_bytes(name[2..4].try_into().ok()?);
            let ip: [u8; 4] = name[4..8].try_into().ok()?;
            Some(SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port)))
        }
        libc::AF_INET6 if name.len() >= mem::size_of::<libc::sockaddr_in6>() => {
            let port = u16::from_be_bytes(name[2..4].try_into().ok()?);
            let flowinfo = u32::from_ne_bytes(name[4..8].try_into().ok()?);
            let ip: [u8; 16] = name[8..24].try_into().ok()?;
            let scope = u32::from_ne_bytes(name[24..28].try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flowinfo,
                scope,
            )))
        }
        _ => None,
    }
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: value is a live c_int and the length passed is its size.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// Reads an `int` socket option.
pub fn get_int_opt(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are live and len holds value's size.
    cvt(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    })?;
    Ok(value)
}

fn udp_socket(v6: bool) -> io::Result<OwnedFd> {
    let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: socket() has no memory preconditions.
    let fd = cvt(unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })?;
    // SAFETY: fd was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bind(fd: RawFd, addr: SocketAddr) -> io::Result<()> {
    let mut raw = RawAddr::new();
    let len = raw
        .set(addr, addr.is_ipv6())
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: raw holds a sockaddr of `len` bytes and outlives the call.
    cvt(unsafe { libc::bind(fd, raw.as_ptr(), len) }).map(drop)
}

/// Makes a listening socket for one `--address`: `SO_REUSEADDR` and
/// `SO_REUSEPORT` (one socket per shard), dual-stack for `[::]`, pktinfo on
/// (to answer from the address a request was sent to), a large receive
/// buffer (`SO_RCVBUFFORCE`, else `SO_RCVBUF` capped by `rmem_max`; 0 keeps
/// the default), nonblocking and close-on-exec.
pub fn bind_listener(addr: SocketAddr, rcvbuf: usize) -> io::Result<UdpSocket> {
    bind_listener_family(addr, rcvbuf, false)
}

/// As [`bind_listener`]; `ipv6_only` keeps `[::]` from taking IPv4 (`-6`).
pub fn bind_listener_family(
    addr: SocketAddr,
    rcvbuf: usize,
    ipv6_only: bool,
) -> io::Result<UdpSocket> {
    let fd = udp_socket(addr.is_ipv6())?;
    let raw = fd.as_raw_fd();
    set_int_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    set_int_opt(raw, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        let v6only = i32::from(ipv6_only);
        set_int_opt(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, v6only)?;
    }
    set_listener_options(raw, addr.is_ipv6(), rcvbuf)?;
    bind(raw, addr)?;
    Ok(UdpSocket::from(fd))
}

/// What every listener needs, bound here or inherited: the address each
/// request was sent to (PKTINFO), and a large receive buffer.
fn set_listener_options(raw: RawFd, v6: bool, rcvbuf: usize) -> io::Result<()> {
    if v6 {
        set_int_opt(raw, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)?;
        // For IPv4 traffic on a dual-stack socket: gives ipi_spec_dst. Not
        // fatal if refused, IPV6_PKTINFO still comes.
        let _ = set_int_opt(raw, libc::IPPROTO_IP, libc::IP_PKTINFO, 1);
    } else {
        set_int_opt(raw, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)?;
    }
    if rcvbuf > 0 {
        let size = libc::c_int::try_from(rcvbuf).unwrap_or(libc::c_int::MAX / 2);
        if set_int_opt(raw, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, size).is_err() {
            set_int_opt(raw, libc::SOL_SOCKET, libc::SO_RCVBUF, size)?;
        }
    }
    Ok(())
}

/// A listening socket handed over already bound (inetd's standard input,
/// systemd's LISTEN_FDS), made ready as ours are. Fails unless it is a
/// bound UDP socket of IPv4 or IPv6.
pub fn adopt_listener(socket: UdpSocket, rcvbuf: usize) -> io::Result<UdpSocket> {
    let raw = socket.as_raw_fd();
    if get_int_opt(socket.as_fd(), libc::SOL_SOCKET, libc::SO_TYPE)? != libc::SOCK_DGRAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a datagram socket",
        ));
    }
    let bound = socket.local_addr()?;
    set_listener_options(raw, bound.is_ipv6(), rcvbuf)?;
    // The shard's multishot receive must never block the thread.
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// Fails if anything already listens on `addr` (port 0 always passes).
/// Listeners share their port through SO_REUSEPORT, which would just as
/// silently let a second ringtftpd (same user) split the requests with a
/// first: a plain bind, without it, is refused while any socket holds the
/// port. Checked just before the real binds; two servers started within
/// the same microseconds could still both pass.
pub fn check_port_free(addr: SocketAddr, ipv6_only: bool) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let fd = udp_socket(addr.is_ipv6())?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        let v6only = i32::from(ipv6_only);
        set_int_opt(
            fd.as_raw_fd(),
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            v6only,
        )?;
    }
    bind(fd.as_raw_fd(), addr).map_err(|e| {
        if e.raw_os_error() == Some(libc::EADDRINUSE) {
            io::Error::new(
                e.kind(),
                "address in use: another TFTP server (or another ringtftpd) \
                 listens there; stop it first",
            )
        } else {
            e
        }
    })
}

/// Makes the socket of one transfer (its own TID, RFC 1350 §4): bound to
/// `(local, 0)` so replies leave from the address the request was sent to,
/// with path-MTU discovery off so no DF bit is set (a large block must get
/// through fragmented rather than vanish into a PMTU black hole).
/// `scope_id` is used for an IPv6 link-local `local`. The port is the first
/// of `ports` free to bind (0: the kernel's choice); if all are taken, the
/// last `EADDRINUSE`.
pub fn transfer_socket(local: IpAddr, scope_id: u32, ports: &[u16]) -> io::Result<OwnedFd> {
    let v6 = local.is_ipv6();
    let fd = udp_socket(v6)?;
    let raw = fd.as_raw_fd();
    if v6 {
        set_int_opt(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    no_pmtu_discovery(fd.as_fd(), v6)?;
    let addr = |port| match local {
        IpAddr::V4(ip) => SocketAddr::V4(SocketAddrV4::new(ip, port)),
        IpAddr::V6(ip) => {
            let scope = if ip.is_unicast_link_local() {
                scope_id
            } else {
                0
            };
            SocketAddr::V6(SocketAddrV6::new(ip, port, 0, scope))
        }
    };
    let mut last = io::Error::from_raw_os_error(libc::EADDRINUSE);
    for &port in ports {
        // A failed bind leaves the socket unbound: try the next port on it.
        match bind(raw, addr(port)) {
            Ok(()) => return Ok(fd),
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Turns path-MTU discovery off on a socket that sends DATA (no DF bit:
/// a large block gets through fragmented rather than vanish into a PMTU
/// black hole). On a dual-stack IPv6 socket its IPv4 traffic too, where
/// the kernel takes that option.
pub fn no_pmtu_discovery(fd: BorrowedFd<'_>, v6: bool) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    let v4 = set_int_opt(
        raw,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DONT,
    );
    if !v6 {
        return v4;
    }
    set_int_opt(
        raw,
        libc::IPPROTO_IPV6,
        libc::IPV6_MTU_DISCOVER,
        libc::IPV6_PMTUDISC_DONT,
    )
}

/// True if `fd` is an IPv6 socket.
pub fn is_v6_socket(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(get_int_opt(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)? == libc::AF_INET6)
}

/// The local address a socket is bound to.
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    let mut buf = [0u8; mem::size_of::<libc::sockaddr_in6>()];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: buf is writable for len bytes; the kernel writes at most len.
    cvt(unsafe { libc::getsockname(fd.as_raw_fd(), buf.as_mut_ptr().cast(), &mut len) })?;
    let len = (len as usize).min(buf.len());
    parse_sockaddr(&buf[..len]).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))
}

/// The MTU of interface `ifindex` (`SIOCGIFMTU`); `fd` is any socket.
pub fn interface_mtu(fd: BorrowedFd<'_>, ifindex: u32) -> io::Result<u32> {
    let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
    // SAFETY: name has IFNAMSIZ bytes, the most if_indextoname writes.
    let ret = unsafe { libc::if_indextoname(ifindex, name.as_mut_ptr()) };
    if ret.is_null() {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { mem::zeroed() };
    req.ifr_name = name;
    // SAFETY: SIOCGIFMTU reads ifr_name and writes ifr_mtu of the live ifreq.
    cvt(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SIOCGIFMTU as _,
            &mut req as *mut libc::ifreq,
        )
    })?;
    // SAFETY: SIOCGIFMTU succeeded, so the kernel filled ifru_mtu.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    u32::try_from(mtu).map_err(|_| io::Error::from(io::ErrorKind::InvalidData))
}

/// The index of interface `name` (e.g. `c"lo"`).
pub fn interface_index(name: &CStr) -> io::Result<u32> {
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn sockaddr_round_trip_v4_and_v6() {
        let mut raw = RawAddr::new();
        let a: SocketAddr = "127.0.0.1:6969".parse().unwrap();
        let len = raw.set(a, false).unwrap() as usize;
        // SAFETY: RawAddr is at least `len` bytes of initialised data.
        let bytes = unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), len) };
        assert_eq!(parse_sockaddr(bytes), Some(a));

        let len = raw.set(a, true).unwrap() as usize;
        // SAFETY: as above.
        let bytes = unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), len) };
        let mapped = parse_sockaddr(bytes).unwrap();
        assert_eq!(
            mapped,
            "[::ffff:127.0.0.1]:6969".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(canonical(mapped), a);

        let b: SocketAddr = "[fe80::1%3]:70".parse().unwrap();
        let len = raw.set(b, true).unwrap() as usize;
        // SAFETY: as above.
        let bytes = unsafe { std::slice::from_raw_parts(raw.as_ptr().cast::<u8>(), len) };
        assert_eq!(parse_sockaddr(bytes), Some(b));
        assert!(raw.set(b, false).is_none());
        assert_eq!(parse_sockaddr(&[2, 0, 1]), None);
        assert_eq!(parse_sockaddr(&[]), None);
    }

    #[test]
    fn listener_has_reuseport_pktinfo_and_rcvbuf() {
        let sock = bind_listener("127.0.0.1:0".parse().unwrap(), 1 << 20).unwrap();
        let fd = sock.as_fd();
        assert_eq!(
            get_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT).unwrap(),
            1
        );
        assert_eq!(
            get_int_opt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR).unwrap(),
            1
        );
        assert_eq!(
            get_int_opt(fd, libc::IPPROTO_IP, libc::IP_PKTINFO).unwrap(),
            1
        );
        // The kernel doubles the value it was given. Without CAP_NET_ADMIN
        // (no SO_RCVBUFFORCE) it is capped at rmem_max.
        let rcv = get_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap();
        let rmem_max: i32 = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        assert!(rcv >= (1 << 20).min(rmem_max), "SO_RCVBUF {rcv}");
        assert!(
            rcv > 212_992 || rmem_max <= 212_992,
            "SO_RCVBUF {rcv} left at the default"
        );
        // SAFETY: fcntl F_GETFL on a live fd.
        let fl = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&sock), libc::F_GETFL) };
        assert_ne!(fl & libc::O_NONBLOCK, 0);

        // A second listener on the same port is allowed (one per shard).
        let port = sock.local_addr().unwrap().port();
        let again = bind_listener(SocketAddr::from(([127, 0, 0, 1], port)), 0).unwrap();
        assert_eq!(again.local_addr().unwrap().port(), port);
    }

    #[test]
    fn dual_stack_listener_is_not_v6only() {
        let sock = match bind_listener("[::]:0".parse().unwrap(), 0) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("skipping: no IPv6 ({e})");
                return;
            }
        };
        let fd = sock.as_fd();
        assert_eq!(
            get_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY).unwrap(),
            0
        );
        assert_eq!(
            get_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO).unwrap(),
            1
        );
        assert!(is_v6_socket(fd).unwrap());
    }

    #[test]
    fn transfer_socket_has_pmtudisc_dont_and_is_bound() {
        let fd = transfer_socket("127.0.0.1".parse().unwrap(), 0, &[0]).unwrap();
        assert_eq!(
            get_int_opt(fd.as_fd(), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER).unwrap(),
            libc::IP_PMTUDISC_DONT
        );
        let local = local_addr(fd.as_fd()).unwrap();
        assert_eq!(local.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_ne!(local.port(), 0);
        assert!(!is_v6_socket(fd.as_fd()).unwrap());

        if let Ok(fd6) = transfer_socket("::1".parse().unwrap(), 0, &[0]) {
            assert_eq!(
                get_int_opt(fd6.as_fd(), libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER).unwrap(),
                libc::IPV6_PMTUDISC_DONT
            );
            assert!(is_v6_socket(fd6.as_fd()).unwrap());
        }
    }

    #[test]
    fn no_pmtu_discovery_on_a_dual_stack_listener_covers_both_families() {
        let Ok(sock) = bind_listener("[::]:0".parse().unwrap(), 0) else {
            eprintln!("skipping: no IPv6");
            return;
        };
        no_pmtu_discovery(sock.as_fd(), true).unwrap();
        let fd = sock.as_fd();
        assert_eq!(
            get_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER).unwrap(),
            libc::IPV6_PMTUDISC_DONT
        );
        assert_eq!(
            get_int_opt(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER).unwrap(),
            libc::IP_PMTUDISC_DONT
        );
    }

    #[test]
    fn loopback_mtu() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let lo = interface_index(c"lo").unwrap();
        assert_eq!(interface_mtu(sock.as_fd(), lo).unwrap(), 65536);
        assert!(interface_mtu(sock.as_fd(), 0x7fff_fff0).is_err());
    }

    #[test]
    fn received_pktinfo_names_the_destination() {
        let sock = bind_listener("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        let dest = sock.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"hello", dest).unwrap();
        let (payload, control) = recvmsg_blocking(&sock);
        assert_eq!(payload, b"hello");
        let info = super::super::cmsg::parse_pktinfo(&control).unwrap();
        assert_eq!(info.local, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(info.ifindex, interface_index(c"lo").unwrap());
    }

    #[test]
    fn dual_stack_pktinfo_for_ipv4_traffic_is_canonical() {
        let Ok(sock) = bind_listener("[::]:0".parse().unwrap(), 0) else {
            eprintln!("skipping: no IPv6");
            return;
        };
        let port = sock.local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"x", ("127.0.0.3", port)).unwrap();
        let (_, control) = recvmsg_blocking(&sock);
        let info = super::super::cmsg::parse_pktinfo(&control).unwrap();
        assert_eq!(info.local, "127.0.0.3".parse::<IpAddr>().unwrap());
    }

    /// Plain recvmsg with a control buffer, polling for up to 2 s.
    fn recvmsg_blocking(sock: &UdpSocket) -> (Vec<u8>, Vec<u8>) {
        let mut payload = [0u8; 64];
        const LEN: usize = super::super::cmsg::RECV_CONTROL_LEN;
        #[repr(C, align(8))]
        struct Ctl([u8; LEN]);
        let mut control = Ctl([0; LEN]);
        let mut name = RawAddr::new();
        for _ in 0..200 {
            let mut iov = libc::iovec {
                iov_base: payload.as_mut_ptr().cast(),
                iov_len: payload.len(),
            };
            // SAFETY: msghdr is plain old data.
            let mut msg: libc::msghdr = unsafe { mem::zeroed() };
            msg.msg_name = (&mut name as *mut RawAddr).cast();
            msg.msg_namelen = mem::size_of::<RawAddr>() as _;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.0.as_mut_ptr().cast();
            msg.msg_controllen = LEN as _;
            // SAFETY: every pointer in msg refers to live buffers of the stated sizes.
            let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
            if n >= 0 {
                return (
                    payload[..n as usize].to_vec(),
                    control.0[..msg.msg_controllen as usize].to_vec(),
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("no datagram within 2 s");
    }
}
