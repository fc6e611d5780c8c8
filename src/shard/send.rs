//! A bounded pool of send slots. Each slot owns everything a `SendMsg` SQE
//! points at (header bytes, iovecs, destination address, pktinfo control,
//! msghdr) and lives in a slice allocated once, so it never moves while the kernel may read it: a
//! slot is only reused after its CQE came back.

use std::mem;
use std::net::{IpAddr, SocketAddr};

use super::cmsg::{GsoCmsg, PktinfoCmsg};
use super::net::RawAddr;
use crate::endpoint::SessionId;

/// Room for the header of any transmit: a DATA header, an OACK or an ERROR.
pub const HEADER_CAP: usize = 640;

/// Most DATA packets one segmented (UDP GSO) send carries.
pub const MAX_SEGMENTS: usize = 64;

/// Whom a send belongs to, so its completion reaches the right place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// A transmit of a live (or lingering) session.
    Session(SessionId),
    /// A reply that belongs to no session (from a listener, or to a stranger).
    Reply,
}

pub struct SendSlot {
    owner: Owner,
    pub header: [u8; HEADER_CAP],
    iov: [libc::iovec; 2 * MAX_SEGMENTS],
    addr: RawAddr,
    control: PktinfoCmsg,
    gso: GsoCmsg,
    /// DATA packets in this send (more than one: a GSO send).
    segments: u16,
    msg: libc::msghdr,
}

impl SendSlot {
    fn new() -> Self {
        SendSlot {
            owner: Owner::Reply,
            header: [0; HEADER_CAP],
            iov: [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2 * MAX_SEGMENTS],
            addr: RawAddr::new(),
            control: PktinfoCmsg::new(),
            gso: GsoCmsg::new(),
            segments: 1,
            // SAFETY: msghdr is plain old data; all-zero is a valid value.
            msg: unsafe { mem::zeroed() },
        }
    }

    pub fn owner(&self) -> Owner {
        self.owner
    }

    /// Fills the msghdr: `header[..header_len]`, then `payload` (a pointer
    /// into a file mapping, only ever read by the kernel), to `dest`, from
    /// `source` (local address and ifindex, as pktinfo) if given. Returns the
    /// msghdr to put in the SQE, or `None` if the address does not fit the
    /// socket family.
    pub fn prepare(
        &mut self,
        owner: Owner,
        header_len: usize,
        payload: Option<(*const u8, usize)>,
        dest: SocketAddr,
        v6_socket: bool,
        source: Option<(IpAddr, u32)>,
    ) -> Option<*const libc::msghdr> {
        self.owner = owner;
        self.segments = 1;
        let namelen = self.addr.set(dest, v6_socket)?;
        let controllen = match source {
            Some((local, ifindex)) if !local.is_unspecified() => {
                self.control.set(local, ifindex, v6_socket)?
            }
            _ => 0,
        };
        let header_len = header_len.min(HEADER_CAP);
        self.iov[0] = libc::iovec {
            iov_base: self.header.as_mut_ptr().cast(),
            iov_len: header_len,
        };
        let mut iovlen = 1;
        if let Some((ptr, len)) = payload.filter(|&(_, len)| len > 0) {
            // The kernel copies from the mapping; user space never reads it
            // (a truncated file would raise SIGBUS here, EFAULT there).
            self.iov[1] = libc::iovec {
                iov_base: ptr.cast_mut().cast(),
                iov_len: len,
            };
            iovlen = 2;
        }
        self.msg.msg_name = self.addr.as_ptr().cast_mut().cast();
        self.msg.msg_namelen = namelen;
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = iovlen;
        if controllen > 0 {
            self.msg.msg_control = self.control.as_mut_ptr();
            self.msg.msg_controllen = controllen as _;
        } else {
            self.msg.msg_control = std::ptr::null_mut();
            self.msg.msg_controllen = 0;
        }
        self.msg.msg_flags = 0;
        Some(&self.msg)
    }

    /// Fills the msghdr for one UDP GSO send of `payloads.len()` DATA
    /// packets: packet `i` is `header[4 * i..4 * i + 4]` then `payloads[i]`
    /// (pointers into a file mapping, only read by the kernel), each
    /// `segment` bytes long but the last, which may be shorter. The kernel
    /// cuts the send into those packets (`UDP_SEGMENT`). From `source`, if
    /// given, as for [`SendSlot::prepare`].
    pub fn prepare_segments(
        &mut self,
        owner: Owner,
        payloads: &[(*const u8, usize)],
        segment: u16,
        dest: SocketAddr,
        v6_socket: bool,
        source: Option<(IpAddr, u32)>,
    ) -> Option<*const libc::msghdr> {
        if payloads.is_empty() || payloads.len() > MAX_SEGMENTS {
            return None;
        }
        self.owner = owner;
        self.segments = payloads.len() as u16;
        let namelen = self.addr.set(dest, v6_socket)?;
        let mut iovlen = 0;
        for (i, &(ptr, len)) in payloads.iter().enumerate() {
            self.iov[iovlen] = libc::iovec {
                iov_base: self.header[4 * i..].as_mut_ptr().cast(),
                iov_len: 4,
            };
            iovlen += 1;
            if len > 0 {
                self.iov[iovlen] = libc::iovec {
                    iov_base: ptr.cast_mut().cast(),
                    iov_len: len,
                };
                iovlen += 1;
            }
        }
        let controllen = match source {
            Some((local, ifindex)) if !local.is_unspecified() => self
                .gso
                .set_with_source(segment, local, ifindex, v6_socket)?,
            _ => self.gso.set(segment),
        };
        self.msg.msg_name = self.addr.as_ptr().cast_mut().cast();
        self.msg.msg_namelen = namelen;
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = iovlen as _;
        self.msg.msg_control = self.gso.as_mut_ptr();
        self.msg.msg_controllen = controllen as _;
        self.msg.msg_flags = 0;
        Some(&self.msg)
    }

    /// DATA packets in the prepared send.
    pub fn segments(&self) -> u16 {
        self.segments
    }

    /// The packets of a segmented send, to send them one by one: packet `k`
    /// gets its 4-byte header in `headers[4 * k..]` and its payload in
    /// `payloads[k]` (null and 0 for an empty final block). Returns the
    /// number of packets.
    pub fn unsegment(&self, headers: &mut [u8], payloads: &mut [(*const u8, usize)]) -> usize {
        // msg_iovlen is size_t on glibc, int on musl.
        #[allow(clippy::useless_conversion)]
        let iovlen = usize::try_from(self.msg.msg_iovlen)
            .unwrap_or(0)
            .min(2 * MAX_SEGMENTS);
        let n = usize::from(self.segments)
            .min(payloads.len())
            .min(headers.len() / 4);
        let is_header = |j: usize, k: usize| {
            self.iov[j].iov_base as usize == self.header.as_ptr() as usize + 4 * k
        };
        let (mut k, mut j) = (0, 0);
        while k < n && j < iovlen && is_header(j, k) {
            headers[4 * k..4 * k + 4].copy_from_slice(&self.header[4 * k..4 * k + 4]);
            j += 1;
            payloads[k] = if j < iovlen && !is_header(j, k + 1) {
                j += 1;
                (
                    self.iov[j - 1].iov_base.cast_const().cast(),
                    self.iov[j - 1].iov_len,
                )
            } else {
                (std::ptr::null(), 0)
            };
            k += 1;
        }
        k
    }

    /// Bytes this send puts on the wire (header plus payload).
    #[cfg(test)]
    pub fn wire_len(&self) -> usize {
        // msg_iovlen is size_t on glibc, int on musl.
        #[allow(clippy::useless_conversion)]
        let n = usize::try_from(self.msg.msg_iovlen)
            .unwrap_or(0)
            .min(2 * MAX_SEGMENTS);
        self.iov[..n].iter().map(|v| v.iov_len).sum()
    }
}

/// A fixed set of slots and a free list. The slice is allocated once and
/// never resized, so a slot's address is stable while the kernel reads it.
pub struct SendPool {
    slots: Box<[SendSlot]>,
    free: Vec<u32>,
}

impl SendPool {
    pub fn new(size: usize) -> Self {
        let size = size.clamp(1, u32::MAX as usize);
        SendPool {
            slots: (0..size).map(|_| SendSlot::new()).collect(),
            free: (0..size as u32).rev().collect(),
        }
    }

    /// A free slot's index, if any.
    pub fn alloc(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Returns slot `index` to the pool (after its CQE, or unused).
    pub fn release(&mut self, index: u32) -> Option<Owner> {
        let slot = self.slots.get_mut(index as usize)?;
        let owner = slot.owner;
        slot.owner = Owner::Reply;
        self.free.push(index);
        Some(owner)
    }

    pub fn slot_mut(&mut self, index: u32) -> Option<&mut SendSlot> {
        self.slots.get_mut(index as usize)
    }

    pub fn has_free(&self) -> bool {
        !self.free.is_empty()
    }

    /// Slots the kernel (or the SQ) holds now.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_allocates_each_slot_once() {
        let mut pool = SendPool::new(3);
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        let c = pool.alloc().unwrap();
        assert!(pool.alloc().is_none());
        assert_eq!(pool.in_flight(), 3);
        let mut seen = [a, b, c];
        seen.sort();
        assert_eq!(seen, [0, 1, 2]);
        assert_eq!(pool.release(b), Some(Owner::Reply));
        assert_eq!(pool.alloc(), Some(b));
        assert_eq!(pool.release(99), None);
    }

    #[test]
    fn prepare_builds_header_and_payload_iovecs() {
        let mut pool = SendPool::new(1);
        let i = pool.alloc().unwrap();
        let data = [7u8; 100];
        let id = SessionId {
            index: 3,
            generation: 9,
        };
        let slot = pool.slot_mut(i).unwrap();
        slot.header[..4].copy_from_slice(&[0, 3, 0, 1]);
        let msg = slot
            .prepare(
                Owner::Session(id),
                4,
                Some((data.as_ptr(), 100)),
                "127.0.0.1:9".parse().unwrap(),
                false,
                None,
            )
            .unwrap();
        // SAFETY: msg points into the live slot.
        let m = unsafe { &*msg };
        assert_eq!(m.msg_iovlen, 2);
        assert_eq!(m.msg_controllen, 0);
        assert_eq!(slot.wire_len(), 104);
        assert_eq!(slot.owner(), Owner::Session(id));
        // Zero-length payload: header only.
        slot.prepare(
            Owner::Reply,
            4,
            Some((data.as_ptr(), 0)),
            "127.0.0.1:9".parse().unwrap(),
            false,
            None,
        )
        .unwrap();
        assert_eq!(slot.wire_len(), 4);
        // IPv6 destination on an IPv4 socket is refused.
        assert!(
            slot.prepare(
                Owner::Reply,
                4,
                None,
                "[::1]:9".parse().unwrap(),
                false,
                None
            )
            .is_none()
        );
        // With a source address: a control message.
        let msg = slot
            .prepare(
                Owner::Reply,
                4,
                None,
                "127.0.0.1:9".parse().unwrap(),
                true,
                Some(("127.0.0.1".parse().unwrap(), 1)),
            )
            .unwrap();
        // SAFETY: msg points into the live slot.
        assert!(unsafe { (*msg).msg_controllen } > 0);
    }

    #[test]
    fn prepare_segments_interleaves_headers_and_sets_udp_segment() {
        let mut pool = SendPool::new(1);
        let i = pool.alloc().unwrap();
        let data = [9u8; 3 * 1468 + 100];
        let slot = pool.slot_mut(i).unwrap();
        for (k, block) in [5u16, 6, 7, 8].iter().enumerate() {
            let b = block.to_be_bytes();
            slot.header[4 * k..4 * k + 4].copy_from_slice(&[0, 3, b[0], b[1]]);
        }
        let base = data.as_ptr();
        // SAFETY: the offsets stay inside `data`.
        let payloads = unsafe {
            [
                (base, 1468),
                (base.add(1468), 1468),
                (base.add(2936), 1468),
                (base.add(4404), 100),
            ]
        };
        let msg = slot
            .prepare_segments(
                Owner::Reply,
                &payloads,
                1472,
                "127.0.0.1:9".parse().unwrap(),
                false,
                None,
            )
            .unwrap();
        // SAFETY: msg points into the live slot.
        let m = unsafe { &*msg };
        assert_eq!(m.msg_iovlen, 8);
        assert_eq!(slot.segments(), 4);
        assert_eq!(slot.wire_len(), 3 * 1472 + 104);
        // SAFETY: msg_control points at the slot's cmsg buffer.
        let cmsg = unsafe { &*(m.msg_control as *const libc::cmsghdr) };
        assert_eq!(
            (cmsg.cmsg_level, cmsg.cmsg_type),
            (super::super::cmsg::SOL_UDP, super::super::cmsg::UDP_SEGMENT)
        );
        assert_eq!(slot.gso.segment(), 1472);
        // The iovecs alternate header (4 bytes) and payload.
        // SAFETY: msg_iov points at the slot's iovec array of msg_iovlen entries.
        let iov = unsafe { std::slice::from_raw_parts(m.msg_iov, 8) };
        let lens: Vec<usize> = iov.iter().map(|v| v.iov_len).collect();
        assert_eq!(lens, [4, 1468, 4, 1468, 4, 1468, 4, 100]);
        // Taken apart again for single sends: the same headers and payloads.
        let mut headers = [0u8; 4 * MAX_SEGMENTS];
        let mut parts = [(std::ptr::null(), 0); MAX_SEGMENTS];
        assert_eq!(slot.unsegment(&mut headers, &mut parts), 4);
        assert_eq!(&headers[..16], &slot.header[..16]);
        assert_eq!(parts[..4], payloads);
        // An empty final block has no payload iovec.
        let short = [payloads[0], payloads[1], (base, 0)];
        slot.prepare_segments(
            Owner::Reply,
            &short,
            1472,
            "127.0.0.1:9".parse().unwrap(),
            false,
            None,
        )
        .unwrap();
        assert_eq!(slot.unsegment(&mut headers, &mut parts), 3);
        assert_eq!(parts[..2], payloads[..2]);
        assert_eq!(parts[2], (std::ptr::null(), 0));
        // A plain send afterwards is one packet again.
        slot.prepare(
            Owner::Reply,
            4,
            None,
            "127.0.0.1:9".parse().unwrap(),
            false,
            None,
        )
        .unwrap();
        assert_eq!(slot.segments(), 1);
    }
    #[test]
    fn segments_from_a_listener_carry_udp_segment_then_pktinfo() {
        let mut pool = SendPool::new(1);
        let i = pool.alloc().unwrap();
        let data = [1u8; 2 * 512];
        let slot = pool.slot_mut(i).unwrap();
        let payloads = [(data.as_ptr(), 512), (data[512..].as_ptr(), 512)];
        let msg = slot
            .prepare_segments(
                Owner::Reply,
                &payloads,
                516,
                "[::ffff:127.0.0.1]:9".parse().unwrap(),
                true,
                Some(("127.0.0.2".parse().unwrap(), 1)),
            )
            .unwrap();
        // SAFETY: msg points into the live slot.
        let m = unsafe { &*msg };
        let control = m.msg_control as *const u8;
        // msg_controllen is size_t on glibc, socklen_t on musl.
        #[allow(clippy::useless_conversion)]
        let len = usize::try_from(m.msg_controllen).unwrap();
        // SAFETY: msg_control points at msg_controllen bytes of the slot.
        let bytes = unsafe { std::slice::from_raw_parts(control, len) };
        assert_eq!(slot.gso.segment(), 516);
        // The pktinfo after the UDP_SEGMENT names the source address.
        let info = super::super::cmsg::parse_pktinfo(bytes).expect("a pktinfo");
        assert_eq!(info.local, "127.0.0.2".parse::<IpAddr>().unwrap());
        // A v6 source on a v4 socket does not fit.
        assert!(
            slot.prepare_segments(
                Owner::Reply,
                &payloads,
                516,
                "127.0.0.1:9".parse().unwrap(),
                false,
                Some(("::1".parse().unwrap(), 1)),
            )
            .is_none()
        );
    }
}
