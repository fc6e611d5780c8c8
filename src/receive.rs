//! The receive half of a transfer (WRQ): which DATA blocks to accept, when
//! to ACK, and when the upload is whole. Pure bookkeeping over block
//! numbers; the timer, RTT and retries stay with [`crate::session`]'s
//! `Transfer`, whose `Direction::Receive` this becomes.
//!
//! Rules:
//! - Only the next block in order is accepted; a block ahead of a gap is
//!   dropped and answered, once per gap, with an ACK of the last block in
//!   order (RFC 7440: the sender resends from there).
//! - A repeat of the last block accepted is answered with an ACK (its ACK
//!   was lost; RFC 1350 senders resend and wait). Other repeats are not:
//!   a window sent again would otherwise draw one ACK per block.
//! - A window is acknowledged when it is full, or at the final block.
//! - The final block (shorter than blksize) is acknowledged only after the
//!   owner said the file is safely in place ([`Receiving::commit_done`]),
//!   so a client never sees success for bytes that were lost.
//! - Block numbers wrap past 65535, to 0 or (tftpd-hpa's `rollover=1`)
//!   to 1; counts are 64-bit.

#![forbid(unsafe_code)]

use crate::proto::Rollover;

/// What to do with one DATA packet.
#[derive(Debug, PartialEq, Eq)]
pub enum DataVerdict<'a> {
    /// New bytes in order: write `bytes` at `offset`. `last`: the final
    /// block; commit the file, then call [`Receiving::commit_done`].
    Accept {
        offset: u64,
        bytes: &'a [u8],
        last: bool,
    },
    /// A repeat, a block past a gap, or after the end: nothing to write
    /// (an ACK may be due: see [`Receiving::poll_ack`]).
    Ignore,
    /// The upload would exceed its limit (`--max-upload` or its own
    /// tsize): end the transfer with ERROR 3.
    TooLarge,
    /// A payload longer than the negotiated blksize: end with ERROR 4.
    Oversized,
}

/// The receive state of one upload.
#[derive(Debug, Clone)]
pub struct Receiving {
    blksize: u16,
    windowsize: u16,
    limit: Option<u64>,
    /// Blocks accepted in order; the next expected is this + 1.
    accepted: u64,
    /// Bytes accepted.
    len: u64,
    /// The highest block acknowledged, once an ACK went out.
    acked: Option<u64>,
    ack_due: bool,
    /// The current gap was already answered.
    gap_answered: bool,
    /// The final block was accepted.
    finished: bool,
    /// The file is in place: the final block may be acknowledged.
    committed: bool,
    rollover: Rollover,
}

impl Receiving {
    /// `ack_zero`: the transfer starts with ACK 0 (no OACK was sent).
    /// `limit`: the most bytes this upload may bring.
    pub fn new(blksize: u16, windowsize: u16, limit: Option<u64>, ack_zero: bool) -> Self {
        Receiving {
            blksize: blksize.max(1),
            windowsize: windowsize.max(1),
            limit,
            accepted: 0,
            len: 0,
            acked: None,
            ack_due: ack_zero,
            gap_answered: false,
            finished: false,
            committed: false,
            rollover: Rollover::Zero,
        }
    }

    /// Block numbers past 65535 go on from `rollover` (default 0).
    pub fn set_rollover(&mut self, rollover: Rollover) {
        self.rollover = rollover;
    }

    /// Bytes accepted so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks accepted in order.
    pub fn blocks(&self) -> u64 {
        self.accepted
    }

    /// The final block arrived (the file may still await its commit).
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The final block arrived and its ACK may go out.
    pub fn is_complete(&self) -> bool {
        self.finished && self.committed
    }

    pub fn on_data<'a>(&mut self, block: u16, payload: &'a [u8]) -> DataVerdict<'a> {
        let expected = self.rollover.wire(self.accepted + 1);
        if block != expected || self.finished {
            // How far past the expected block this one is, if ahead at all.
            let ahead = self
                .rollover
                .at_or_after(self.accepted + 1, block)
                .map(|b| b - (self.accepted + 1));
            if block == self.rollover.wire(self.accepted) && self.accepted > 0 {
                // Its ACK was lost (or, at the end, is being waited for).
                self.ack_due = !self.finished || self.committed;
            } else if !self.finished && ahead.is_some_and(|d| d < 0x8000) && !self.gap_answered {
                self.gap_answered = true;
                self.ack_due = true;
            }
            return DataVerdict::Ignore;
        }
        if payload.len() > usize::from(self.blksize) {
            return DataVerdict::Oversized;
        }
        let offset = self.len;
        let end = offset + payload.len() as u64;
        if self.limit.is_some_and(|limit| end > limit) {
            return DataVerdict::TooLarge;
        }
        self.accepted += 1;
        self.len = end;
        self.gap_answered = false;
        let last = payload.len() < usize::from(self.blksize);
        if last {
            self.finished = true;
        } else if self.accepted - self.acked.unwrap_or(0) >= u64::from(self.windowsize) {
            self.ack_due = true;
        }
        DataVerdict::Accept {
            offset,
            bytes: payload,
            last,
        }
    }

    /// The file is in place: the final block's ACK is due.
    pub fn commit_done(&mut self) {
        if self.finished {
            self.committed = true;
            self.ack_due = true;
        }
    }

    /// Nothing arrived for a retransmission timeout: acknowledge again what
    /// we have (the sender's resends cover the rest). Not before the commit:
    /// the final ACK means the file is safe.
    pub fn on_timeout(&mut self) {
        self.ack_due = !self.finished || self.committed;
    }

    /// The block number to acknowledge now, if an ACK is due, and whether
    /// it repeats the last ACK sent.
    pub fn poll_ack(&mut self) -> Option<(u16, bool)> {
        // An ACK due from before the final block arrived would now
        // acknowledge it: only the commit may.
        if !self.ack_due || (self.finished && !self.committed) {
            return None;
        }
        self.ack_due = false;
        let repeat = self.acked == Some(self.accepted);
        self.acked = Some(self.accepted);
        Some((self.rollover.wire(self.accepted), repeat))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block of the ACK due now, if any.
    fn next_ack(r: &mut Receiving) -> Option<u16> {
        r.poll_ack().map(|(block, _)| block)
    }

    fn block(n: u8, len: usize) -> Vec<u8> {
        vec![n; len]
    }

    /// Feeds `payload` as block `b`, expecting it to be accepted.
    #[track_caller]
    fn accept(r: &mut Receiving, b: u16, payload: &[u8]) -> (u64, bool) {
        match r.on_data(b, payload) {
            DataVerdict::Accept {
                offset,
                bytes,
                last,
            } => {
                assert_eq!(bytes, payload);
                (offset, last)
            }
            other => panic!("block {b}: {other:?}"),
        }
    }

    #[test]
    fn lock_step_acks_every_block_and_the_last_only_after_commit() {
        let mut r = Receiving::new(512, 1, None, true);
        assert_eq!(next_ack(&mut r), Some(0), "ACK 0 starts a plain WRQ");
        assert_eq!(next_ack(&mut r), None);
        assert_eq!(accept(&mut r, 1, &block(1, 512)), (0, false));
        assert_eq!(next_ack(&mut r), Some(1));
        assert_eq!(accept(&mut r, 2, &block(2, 100)), (512, true));
        assert!(r.is_finished() && !r.is_complete());
        assert_eq!(next_ack(&mut r), None, "no final ACK before the commit");
        r.on_timeout();
        assert_eq!(next_ack(&mut r), None, "nor on a timeout");
        assert_eq!(r.on_data(2, &block(2, 100)), DataVerdict::Ignore);
        assert_eq!(next_ack(&mut r), None, "nor for a repeat");
        r.commit_done();
        assert_eq!(next_ack(&mut r), Some(2));
        assert_eq!(r.len(), 612);
        // Dallying: the final block repeated (our ACK lost) is answered.
        assert_eq!(r.on_data(2, &block(2, 100)), DataVerdict::Ignore);
        assert_eq!(next_ack(&mut r), Some(2));
    }

    #[test]
    fn an_ack_still_due_when_the_final_block_arrives_waits_for_the_commit() {
        let mut r = Receiving::new(512, 2, None, false);
        accept(&mut r, 1, &block(1, 512));
        accept(&mut r, 2, &block(2, 512)); // window full: ACK 2 due...
        accept(&mut r, 3, &block(3, 7)); // ...but not polled before the end
        assert_eq!(next_ack(&mut r), None, "it would acknowledge block 3");
        r.commit_done();
        assert_eq!(next_ack(&mut r), Some(3));
    }

    #[test]
    fn a_lost_ack_repeat_is_answered_each_time_in_lock_step() {
        let mut r = Receiving::new(512, 1, None, false);
        accept(&mut r, 1, &block(1, 512));
        assert_eq!(next_ack(&mut r), Some(1));
        // ACK 1 lost twice: each resent DATA 1 gets an ACK (a repeat, so
        // no RTT sample from what follows it), nothing written.
        for _ in 0..2 {
            assert_eq!(r.on_data(1, &block(1, 512)), DataVerdict::Ignore);
            assert_eq!(r.poll_ack(), Some((1, true)));
        }
        accept(&mut r, 2, &block(2, 512));
        assert_eq!(
            r.poll_ack(),
            Some((2, false)),
            "a new block's ACK is no repeat"
        );
        assert_eq!(r.len(), 1024, "the repeats wrote nothing");
    }

    #[test]
    fn a_lost_data_block_is_answered_once_and_recovered_on_resend() {
        let mut r = Receiving::new(512, 4, None, false);
        accept(&mut r, 1, &block(1, 512));
        // Block 2 lost: 3 and 4 arrive past the gap.
        assert_eq!(r.on_data(3, &block(3, 512)), DataVerdict::Ignore);
        assert_eq!(next_ack(&mut r), Some(1), "the gap is answered at once");
        assert_eq!(r.on_data(4, &block(4, 512)), DataVerdict::Ignore);
        assert_eq!(next_ack(&mut r), None, "once per gap");
        // The sender goes back to 2.
        for b in 2..=4u16 {
            accept(&mut r, b, &block(b as u8, 512));
        }
        assert_eq!(
            next_ack(&mut r),
            None,
            "window not full: 3 of 4 since ACK 1"
        );
        accept(&mut r, 5, &block(5, 512));
        assert_eq!(next_ack(&mut r), Some(5));
        assert_eq!(r.len(), 5 * 512);
    }

    #[test]
    fn a_window_sent_again_draws_one_ack_not_one_per_block() {
        let mut r = Receiving::new(512, 4, None, false);
        for b in 1..=4u16 {
            accept(&mut r, b, &block(b as u8, 512));
        }
        assert_eq!(next_ack(&mut r), Some(4));
        // ACK 4 lost: the whole window comes again.
        let mut acks = 0;
        for b in 1..=4u16 {
            assert_eq!(r.on_data(b, &block(b as u8, 512)), DataVerdict::Ignore);
            acks += usize::from(next_ack(&mut r).is_some());
        }
        assert_eq!(acks, 1, "only the window's last block is answered");
        assert_eq!(r.len(), 4 * 512, "no byte written twice");
    }

    #[test]
    fn reordered_blocks_inside_a_window_are_not_written_out_of_order() {
        let mut r = Receiving::new(8, 8, None, false);
        let mut file = Vec::new();
        // Arrival order 1 3 2 4 5 6 7 8, then resends of 3..8.
        let arrivals = [1u16, 3, 2, 4, 5, 6, 7, 8, 3, 4, 5, 6, 7, 8];
        for b in arrivals {
            if let DataVerdict::Accept { offset, bytes, .. } = r.on_data(b, &block(b as u8, 8)) {
                assert_eq!(offset, file.len() as u64);
                file.extend_from_slice(bytes);
            }
            let _ = next_ack(&mut r);
        }
        let want: Vec<u8> = (1..=8u8).flat_map(|b| block(b, 8)).collect();
        assert_eq!(file, want);
    }

    #[test]
    fn block_numbers_roll_over_past_65535() {
        let mut r = Receiving::new(1, 1, None, false);
        let total = 70_000u64;
        for n in 1..=total {
            let b = n as u16;
            accept(&mut r, b, &[n as u8]);
            assert_eq!(next_ack(&mut r), Some(b));
            // After the wrap a repeat of the previous block is still a
            // repeat, never taken for new data.
            if n == 65_537 {
                assert_eq!(r.on_data(b, &[0]), DataVerdict::Ignore);
                assert_eq!(next_ack(&mut r), Some(b));
            }
        }
        assert_eq!(r.blocks(), total);
        assert_eq!(r.len(), total);
        assert_eq!(accept(&mut r, (total + 1) as u16, &[]), (total, true));
    }

    #[test]
    fn rollover_1_follows_block_65535_with_1() {
        let mut r = Receiving::new(1, 1, None, false);
        r.set_rollover(Rollover::One);
        for n in 1..=65_535u64 {
            accept(&mut r, n as u16, &[n as u8]);
            assert_eq!(next_ack(&mut r), Some(n as u16));
        }
        // Block 0 is no block here: not taken, and no ACK of it.
        assert_eq!(r.on_data(0, &[0]), DataVerdict::Ignore);
        assert_eq!(r.blocks(), 65_535);
        let _ = next_ack(&mut r);
        assert_eq!(accept(&mut r, 1, &[7]), (65_535, false));
        assert_eq!(next_ack(&mut r), Some(1));
        // A repeat of it is a repeat, answered with its ACK.
        assert_eq!(r.on_data(1, &[7]), DataVerdict::Ignore);
        assert_eq!(next_ack(&mut r), Some(1));
        assert_eq!(accept(&mut r, 2, &[]), (65_536, true));
        r.commit_done();
        assert_eq!(next_ack(&mut r), Some(2));
        assert_eq!(r.blocks(), 65_537);
    }

    #[test]
    fn an_upload_past_its_limit_is_refused_at_the_block_that_crosses_it() {
        let mut r = Receiving::new(512, 1, Some(1000), false);
        accept(&mut r, 1, &block(1, 512));
        assert_eq!(r.on_data(2, &block(2, 512)), DataVerdict::TooLarge);
        assert_eq!(r.len(), 512);
        // Exactly the limit is fine.
        let mut r = Receiving::new(500, 1, Some(1000), false);
        accept(&mut r, 1, &block(1, 500));
        accept(&mut r, 2, &block(2, 500));
        assert_eq!(accept(&mut r, 3, &[]), (1000, true));
    }

    #[test]
    fn an_empty_upload_and_an_oversized_block() {
        let mut r = Receiving::new(512, 1, None, true);
        assert_eq!(next_ack(&mut r), Some(0));
        assert_eq!(accept(&mut r, 1, &[]), (0, true));
        r.commit_done();
        assert_eq!(next_ack(&mut r), Some(1));
        let mut r = Receiving::new(512, 1, None, false);
        assert_eq!(r.on_data(1, &block(1, 513)), DataVerdict::Oversized);
        assert_eq!(r.blocks(), 0);
    }

    #[test]
    fn a_client_that_vanishes_gets_its_last_ack_again_on_each_timeout() {
        let mut r = Receiving::new(512, 2, None, false);
        accept(&mut r, 1, &block(1, 512));
        assert_eq!(next_ack(&mut r), None, "half a window");
        r.on_timeout();
        assert_eq!(
            next_ack(&mut r),
            Some(1),
            "what we have, so the sender resends from 2"
        );
        r.on_timeout();
        assert_eq!(next_ack(&mut r), Some(1));
    }
}
