//! A registered provided-buffer ring (`IORING_REGISTER_PBUF_RING`, 5.19).
//!
//! One anonymous mapping holds the ring of `io_uring_buf` entries (page
//! aligned, as the kernel requires) followed by the buffers. The kernel picks
//! a buffer for each multishot receive and names it in the CQE
//! (`cqueue::buffer_select`); [`BufRing::take`] turns that into a
//! [`RecvBuf`] guard that hands the buffer back to the kernel when dropped.
//!
//! The tail is a `u16` that wraps; the mask applies only to the index. It is
//! published with a Release store so the kernel sees the entry before the
//! tail that covers it (model: `FixedSizeBufRing` in io-uring's tests).

use std::cell::Cell;
use std::io;
use std::ops::Deref;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::Submitter;

/// `struct io_uring_buf`: the ring entry. `resv` of entry 0 is the tail.
#[repr(C)]
struct RawBuf {
    addr: u64,
    len: u32,
    bid: u16,
    resv: u16,
}

const _: () =
    assert!(std::mem::size_of::<RawBuf>() == std::mem::size_of::<io_uring::types::BufRingEntry>());
const TAIL_OFFSET: usize = 14;

/// A provided-buffer ring of `entries` buffers of `buf_size` bytes.
pub struct BufRing {
    base: NonNull<u8>,
    map_len: usize,
    ring_bytes: usize,
    entries: u16,
    buf_size: usize,
    bgid: u16,
    /// Our tail: entries handed to the kernel so far, wrapping.
    tail: Cell<u16>,
    /// Which buffers user space holds right now (taken, not yet recycled).
    held: Box<[Cell<bool>]>,
}

impl BufRing {
    /// Maps the ring and its buffers and fills the ring with every buffer.
    /// `entries` must be a power of two in 1..=32768; `buf_size` > 0.
    pub fn new(entries: u16, buf_size: usize, bgid: u16) -> io::Result<Self> {
        if !entries.is_power_of_two()
            || entries > 32768
            || buf_size == 0
            || buf_size > u32::MAX as usize
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad buffer ring geometry",
            ));
        }
        let page = page_size();
        let ring_bytes =
            (usize::from(entries) * std::mem::size_of::<RawBuf>()).next_multiple_of(page);
        let map_len = usize::from(entries)
            .checked_mul(buf_size)
            .and_then(|b| b.checked_add(ring_bytes))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: an anonymous private mapping with no fixed address has no
        // preconditions; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let ring = BufRing {
            base,
            map_len,
            ring_bytes,
            entries,
            buf_size,
            bgid,
            tail: Cell::new(0),
            held: (0..entries).map(|_| Cell::new(true)).collect(),
        };
        for bid in 0..entries {
            ring.recycle(bid);
        }
        Ok(ring)
    }

    /// Registers the ring with `submitter`'s io_uring under group `bgid`.
    pub fn register(&self, submitter: &Submitter<'_>) -> io::Result<()> {
        // SAFETY: the ring memory is page aligned, holds `entries` entries and
        // lives until self is dropped; the owner of the ring either
        // unregisters it or closes the io_uring before that (see Shard).
        unsafe {
            submitter.register_buf_ring_with_flags(
                self.base.as_ptr() as u64,
                self.entries,
                self.bgid,
                0,
            )
        }
    }

    pub fn unregister(&self, submitter: &Submitter<'_>) -> io::Result<()> {
        submitter.unregister_buf_ring(self.bgid)
    }

    /// Buffers user space holds now (for tests and leak checks).
    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.iter().filter(|h| h.get()).count()
    }

    /// Takes buffer `bid`, which a CQE said holds `len` bytes. `None` if the
    /// id is out of range or already held (never hand out one buffer twice).
    pub fn take(&self, bid: u16, len: usize) -> Option<RecvBuf<'_>> {
        let held = self.held.get(usize::from(bid))?;
        if held.replace(true) {
            return None;
        }
        Some(RecvBuf {
            ring: self,
            bid,
            len: len.min(self.buf_size),
        })
    }

    /// Gives buffer `bid` back to the kernel.
    fn recycle(&self, bid: u16) {
        let Some(held) = self.held.get(usize::from(bid)) else {
            return;
        };
        if !held.replace(false) {
            return;
        }
        let tail = self.tail.get();
        let index = usize::from(tail & (self.entries - 1));
        // SAFETY: index < entries, so the entry lies inside the ring area of
        // the mapping. The slot at `tail` is not visible to the kernel (the
        // published tail is `tail`), and at most `entries` buffers are ever
        // out, so the kernel has consumed whatever was there. Fields are
        // written one by one through raw pointers so the `resv` of entry 0
        // (the shared tail) is never written here.
        unsafe {
            let entry = self.base.as_ptr().cast::<RawBuf>().add(index);
            ptr::addr_of_mut!((*entry).addr).write(self.buf_ptr(bid) as u64);
            ptr::addr_of_mut!((*entry).len).write(self.buf_size as u32);
            ptr::addr_of_mut!((*entry).bid).write(bid);
        }
        let tail = tail.wrapping_add(1);
        self.tail.set(tail);
        // SAFETY: TAIL_OFFSET is inside entry 0 (`resv`), 2-byte aligned
        // within the page-aligned mapping; the kernel only reads it, with an
        // acquire load, so it is accessed atomically on both sides.
        let shared_tail = unsafe { &*self.base.as_ptr().add(TAIL_OFFSET).cast::<AtomicU16>() };
        // Release: the entry writes above are visible before the new tail.
        shared_tail.store(tail, Ordering::Release);
    }

    fn buf_ptr(&self, bid: u16) -> *mut u8 {
        // SAFETY: bid < entries, so the offset stays inside the mapping.
        unsafe {
            self.base
                .as_ptr()
                .add(self.ring_bytes + usize::from(bid) * self.buf_size)
        }
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: base/map_len are the mapping made in new(). The kernel pins
        // the ring pages while registered, and the shard closes the io_uring
        // (ending every receive that could write a buffer) before this runs.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_len) };
    }
}

/// A received datagram's buffer, held by user space until dropped.
pub struct RecvBuf<'a> {
    ring: &'a BufRing,
    bid: u16,
    len: usize,
}

impl Deref for RecvBuf<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the buffer is held (taken from a CQE, not yet recycled), so
        // the kernel does not write it; len <= buf_size keeps the slice inside
        // the buffer; the mapping outlives the borrow of the ring.
        unsafe { std::slice::from_raw_parts(self.ring.buf_ptr(self.bid), self.len) }
    }
}

impl Drop for RecvBuf<'_> {
    fn drop(&mut self) {
        self.ring.recycle(self.bid);
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p)
        .ok()
        .filter(|p| p.is_power_of_two())
        .unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::{cmsg, net};
    use io_uring::{IoUring, cqueue, opcode, types};
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    fn msghdr_for(control_len: usize) -> Box<libc::msghdr> {
        // SAFETY: msghdr is plain old data.
        let mut m: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        m.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as _;
        m.msg_controllen = control_len as _;
        m
    }

    /// Reaps CQEs until `want` arrived or 2 s passed.
    fn reap(ring: &mut IoUring, want: usize) -> Vec<cqueue::Entry> {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(2);
        while out.len() < want && Instant::now() < deadline {
            let ts = types::Timespec::new().nsec(50_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::ETIME)
                        || e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => panic!("enter: {e}"),
            }
            out.extend(ring.completion());
        }
        out
    }

    #[test]
    fn rejects_bad_geometry() {
        assert!(BufRing::new(3, 64, 0).is_err());
        assert!(BufRing::new(0, 64, 0).is_err());
        assert!(BufRing::new(4, 0, 0).is_err());
    }

    #[test]
    fn take_and_recycle_without_kernel() {
        let ring = BufRing::new(4, 128, 0).unwrap();
        assert_eq!(ring.held(), 0);
        assert_eq!(ring.tail.get(), 4);
        // Not handed out by the kernel yet, but take() only guards double use.
        let a = ring.take(1, 500).unwrap();
        assert_eq!(a.len(), 128, "clamped to the buffer size");
        assert!(
            ring.take(1, 10).is_none(),
            "a held buffer is never handed out twice"
        );
        assert!(ring.take(4, 10).is_none(), "out of range");
        assert_eq!(ring.held(), 1);
        drop(a);
        assert_eq!(ring.held(), 0);
        assert_eq!(ring.tail.get(), 5, "recycling advanced the tail");
        // The entry at index 0 (tail 4 & 3) now names buffer 1.
        // SAFETY: entry 0 lies in the ring area.
        let bid0 = unsafe { ptr::addr_of!((*ring.base.as_ptr().cast::<RawBuf>()).bid).read() };
        assert_eq!(bid0, 1);
        // SAFETY: the tail lies in entry 0.
        let shared = unsafe { ptr::addr_of!((*ring.base.as_ptr().cast::<RawBuf>()).resv).read() };
        assert_eq!(shared, 5);
    }

    #[test]
    fn tail_wraps_past_u16() {
        let ring = BufRing::new(2, 16, 0).unwrap();
        for _ in 0..70_000u32 {
            drop(ring.take(0, 1).unwrap());
        }
        assert_eq!(ring.tail.get(), (2u32 + 70_000) as u16);
    }

    /// Multishot recvmsg on a real ring over loopback: buffers come back and
    /// the receive re-arms after the ring ran dry (-ENOBUFS).
    #[test]
    fn multishot_recv_recycles_and_rearms_after_enobufs() {
        let mut uring = match IoUring::new(64) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipping: io_uring unavailable ({e})");
                return;
            }
        };
        let bufs = BufRing::new(4, 256, 7).unwrap();
        if let Err(e) = bufs.register(&uring.submitter()) {
            eprintln!("skipping: PBUF_RING unsupported ({e})");
            return;
        }
        let sock = net::bind_listener("127.0.0.1:0".parse().unwrap(), 0).unwrap();
        let addr = sock.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let msghdr = msghdr_for(cmsg::RECV_CONTROL_LEN);
        let arm = |uring: &mut IoUring| {
            let sqe = opcode::RecvMsgMulti::new(types::Fd(sock.as_raw_fd()), &*msghdr, 7)
                .build()
                .user_data(42);
            // SAFETY: msghdr is boxed and outlives the operation.
            unsafe { uring.submission().push(&sqe).unwrap() };
        };
        arm(&mut uring);
        uring.submit().unwrap();

        // Round 1: 3 datagrams, each recycled as processed.
        for i in 0..3u8 {
            client.send_to(&[i; 10], addr).unwrap();
        }
        let cqes = reap(&mut uring, 3);
        assert_eq!(cqes.len(), 3);
        for (i, cqe) in cqes.iter().enumerate() {
            assert!(cqe.result() > 0, "result {}", cqe.result());
            assert!(cqueue::more(cqe.flags()));
            let bid = cqueue::buffer_select(cqe.flags()).unwrap();
            let buf = bufs.take(bid, cqe.result() as usize).unwrap();
            let out = types::RecvMsgOut::parse(&buf, &msghdr).unwrap();
            assert_eq!(out.payload_data(), &[i as u8; 10]);
            let from = net::parse_sockaddr(out.name_data()).unwrap();
            assert_eq!(from, client.local_addr().unwrap());
            let info = cmsg::parse_pktinfo(out.control_data()).unwrap();
            assert_eq!(info.local, addr.ip());
        }
        assert_eq!(bufs.held(), 0, "all recycled");

        // Round 2: hold every buffer, then one more datagram: ENOBUFS ends it.
        for i in 0..5u8 {
            client.send_to(&[i; 3], addr).unwrap();
        }
        let cqes = reap(&mut uring, 5);
        let mut held = Vec::new();
        let mut ended = false;
        for cqe in &cqes {
            if cqe.result() == -libc::ENOBUFS {
                assert!(!cqueue::more(cqe.flags()));
                ended = true;
            } else {
                let bid = cqueue::buffer_select(cqe.flags()).unwrap();
                held.push(bufs.take(bid, cqe.result() as usize).unwrap());
            }
        }
        assert_eq!(held.len(), 4, "four buffers, four datagrams");
        assert!(ended, "the fifth datagram found the ring dry: {:?}", cqes);
        drop(held);
        assert_eq!(bufs.held(), 0);

        // Re-arm: the datagram waiting in the socket comes through.
        arm(&mut uring);
        let cqes = reap(&mut uring, 1);
        assert_eq!(cqes.len(), 1);
        let cqe = &cqes[0];
        assert!(cqe.result() > 0);
        let bid = cqueue::buffer_select(cqe.flags()).unwrap();
        let buf = bufs.take(bid, cqe.result() as usize).unwrap();
        let out = types::RecvMsgOut::parse(&buf, &msghdr).unwrap();
        assert_eq!(out.payload_data(), &[4u8; 3]);
        drop(buf);

        // Many more than the ring holds, recycled as they come: none lost.
        let mut seen = 0;
        for round in 0..5u8 {
            for _ in 0..3 {
                client.send_to(&[round; 20], addr).unwrap();
            }
            for cqe in reap(&mut uring, 3) {
                let bid = cqueue::buffer_select(cqe.flags()).unwrap();
                drop(bufs.take(bid, cqe.result() as usize).unwrap());
                seen += 1;
            }
        }
        assert_eq!(seen, 15);
        bufs.unregister(&uring.submitter()).unwrap();
        drop(uring);
    }
}
