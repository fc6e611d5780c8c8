//! How a session's window becomes sends, as plain arithmetic over block
//! lengths: how many DATA packets one UDP GSO send may carry on a path
//! ([`segments`]), and which of the transmits polled one after another go
//! out together ([`Batch`]). The driver (`serve.rs`) adds the send slots,
//! the budget and the pointers.

use super::send::MAX_SEGMENTS;

/// Bytes one GSO send may carry in all (the kernel's limit is 64 KiB of
/// UDP payload; this leaves room for headers).
const GSO_BYTES: u32 = 65_000;

/// How many DATA packets of a window one send may carry: UDP GSO cuts one
/// send into packets of blksize + 4 bytes, which must fit the interface MTU
/// unfragmented (IP and UDP headers included), and the whole send 64 KiB.
/// 1 (one packet per send) without a window, without a known MTU, or where
/// the path refused GSO lately (`gso_allowed` false).
pub fn segments(
    blksize: u16,
    windowsize: u16,
    v6: bool,
    mtu: Option<u32>,
    gso_allowed: bool,
) -> u16 {
    let ip_udp = if v6 { 48 } else { 28 };
    let packet = u32::from(blksize) + 4;
    match mtu {
        Some(mtu) if gso_allowed && windowsize > 1 && packet + ip_udp <= mtu => {
            let fit = GSO_BYTES / packet;
            fit.min(MAX_SEGMENTS as u32).min(u32::from(windowsize)) as u16
        }
        _ => 1,
    }
}

/// The transmits gathered into one send so far. A transmit is described
/// by its header length and its payload length (`None`: OACK or ERROR).
#[derive(Debug, Clone, Copy)]
pub struct Batch {
    blksize: usize,
    max: usize,
    /// DATA packets in the send; 0: a single transmit that takes no others.
    count: usize,
    /// A short block joined: it is the last of the file.
    closed: bool,
}

/// What to do with a transmit offered to a [`Batch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    /// It joins the send, as packet `count() - 1`.
    Joined,
    /// It does not fit: it starts the next send.
    Carry,
}

impl Batch {
    /// A send that starts with the transmit (`header_len`, `payload`), for
    /// a session of `blksize` that may put `max_segments` packets in one send.
    /// Only a full DATA block opens a batch: a shorter one is the last.
    pub fn start(
        blksize: usize,
        max_segments: usize,
        header_len: usize,
        payload: Option<usize>,
    ) -> Self {
        let opens = max_segments > 1 && header_len == 4 && payload == Some(blksize);
        Batch {
            blksize,
            max: max_segments,
            count: usize::from(opens),
            closed: false,
        }
    }

    /// Whether another transmit may join.
    pub fn wants_more(&self) -> bool {
        self.count > 0 && self.count < self.max && !self.closed
    }

    /// Offers the next polled transmit: a DATA block no longer than blksize
    /// joins (a shorter one closes the batch); anything else is carried.
    pub fn offer(&mut self, header_len: usize, payload: Option<usize>) -> Offer {
        match payload {
            Some(len) if self.wants_more() && header_len == 4 && len <= self.blksize => {
                self.count += 1;
                self.closed = len < self.blksize;
                Offer::Joined
            }
            _ => Offer::Carry,
        }
    }

    /// DATA packets in the send (0 or 1: one transmit, not segmented).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether the send is a segmented (GSO) one.
    pub fn segmented(&self) -> bool {
        self.count > 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packets per send of a stream of transmits, as the driver groups
    /// them with slots and budget to spare: (header length, payload length).
    fn split(stream: &[(usize, Option<usize>)], blksize: usize, max: usize) -> Vec<usize> {
        let mut sends = Vec::new();
        let mut it = stream.iter().copied().peekable();
        while let Some((h, p)) = it.next() {
            let mut batch = Batch::start(blksize, max, h, p);
            while batch.wants_more() {
                let Some(&(h, p)) = it.peek() else { break };
                if batch.offer(h, p) == Offer::Carry {
                    break;
                }
                it.next();
            }
            sends.push(batch.count().max(1));
        }
        sends
    }

    /// A window of `n` DATA blocks of `blksize`, the last `last` bytes long.
    fn window(n: usize, blksize: usize, last: usize) -> Vec<(usize, Option<usize>)> {
        (0..n)
            .map(|k| (4, Some(if k + 1 == n { last } else { blksize })))
            .collect()
    }

    #[test]
    fn segments_fit_the_mtu_the_send_size_and_the_window() {
        // 1468 + 4 + 28 = 1500: fits an Ethernet MTU exactly, 44 per 64 KiB.
        assert_eq!(segments(1468, 64, false, Some(1500), true), 44);
        assert_eq!(segments(1468, 16, false, Some(1500), true), 16);
        // IPv6 headers are 20 bytes longer: no longer fits unfragmented.
        assert_eq!(segments(1468, 64, true, Some(1500), true), 1);
        assert_eq!(segments(1448, 64, true, Some(1500), true), 44);
        // Loopback: 8 KiB blocks, 7 to a send; 512-byte blocks, capped at 64.
        assert_eq!(segments(8192, 64, false, Some(65536), true), 7);
        assert_eq!(
            segments(512, 1000, false, Some(65536), true),
            MAX_SEGMENTS as u16
        );
        // No window, no known MTU, a block over the MTU, or GSO off for the
        // path: one packet per send.
        assert_eq!(segments(1468, 1, false, Some(1500), true), 1);
        assert_eq!(segments(1468, 64, false, None, true), 1);
        assert_eq!(segments(1469, 64, false, Some(1500), true), 1);
        assert_eq!(segments(1468, 64, false, Some(1500), false), 1);
    }

    #[test]
    fn a_window_splits_into_sends_of_at_most_s_packets() {
        // 16 blocks of 1468, S = 16: one send; S = 5: 5 + 5 + 5 + 1.
        assert_eq!(split(&window(16, 1468, 1468), 1468, 16), [16]);
        assert_eq!(split(&window(16, 1468, 1468), 1468, 5), [5, 5, 5, 1]);
        // With the MTU deciding S.
        let s = segments(1468, 100, false, Some(1500), true) as usize;
        assert_eq!(split(&window(100, 1468, 1468), 1468, s), [44, 44, 12]);
    }

    #[test]
    fn the_last_short_block_closes_its_send() {
        // A short (or empty) final block joins the send and ends it.
        assert_eq!(split(&window(4, 512, 100), 512, 16), [4]);
        assert_eq!(split(&window(4, 512, 0), 512, 16), [4]);
        // A window of one short block alone is one plain send.
        assert_eq!(split(&window(1, 512, 100), 512, 16), [1]);
        let mut b = Batch::start(512, 16, 4, Some(512));
        assert_eq!(b.offer(4, Some(100)), Offer::Joined);
        assert!(!b.wants_more());
        assert_eq!(b.offer(4, Some(512)), Offer::Carry);
        assert!(b.segmented());
    }

    #[test]
    fn gso_off_means_one_packet_per_send() {
        let s = segments(1468, 16, false, Some(1500), false) as usize;
        assert_eq!(split(&window(5, 1468, 7), 1468, s), [1, 1, 1, 1, 1]);
        let b = Batch::start(1468, 1, 4, Some(1468));
        assert!(!b.wants_more() && !b.segmented());
    }

    #[test]
    fn only_data_blocks_are_batched() {
        // An OACK (header only) goes alone; the DATA after it batches.
        let mut stream = vec![(30, None)];
        stream.extend(window(3, 512, 512));
        assert_eq!(split(&stream, 512, 16), [1, 3]);
        // An ERROR polled after DATA is carried into its own send.
        let mut stream = window(3, 512, 512);
        stream.push((20, None));
        assert_eq!(split(&stream, 512, 16), [3, 1]);
        // A block longer than blksize (never sent by a session) is not joined.
        assert_eq!(split(&[(4, Some(512)), (4, Some(513))], 512, 16), [1, 1]);
    }
}
