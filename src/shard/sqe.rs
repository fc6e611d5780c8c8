//! The one place that builds submission entries and hands them to the
//! kernel. An [`Sqe`] can only be made here, by a builder that states what
//! memory the operation uses and why that memory outlives it; [`Ring::push`]
//! is then the only `unsafe` push into the submission queue.
//!
//! [`Ring`] also counts the operations the kernel holds (each SQE +1, each
//! final CQE -1), which teardown waits on before it frees anything.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::token::Token;

/// A submission entry built by one of this module's builders.
pub(super) struct Sqe(squeue::Entry);

/// Reads the eventfd's 8-byte counter into `buf`.
pub(super) fn read_wake(fd: RawFd, buf: &mut [u8; 8]) -> Sqe {
    // SAFETY: `buf` is the shard's boxed wake buffer, dropped only after the
    // ring (or leaked by `abandon`), so it outlives the read.
    Sqe(opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), 8)
        .build()
        .user_data(Token::Wake.encode()))
}

/// A multishot receive into buffer group `bgid`, laid out by `msghdr`.
pub(super) fn recv_multi(fd: RawFd, msghdr: &libc::msghdr, bgid: u16, token: Token) -> Sqe {
    // SAFETY: `msghdr` is one of the shard's boxed receive msghdrs, dropped
    // only after the ring (or leaked); the buffers come from a registered
    // ring unregistered only once no operation is outstanding. A socket is
    // closed only after its receive's final CQE (`closing`).
    Sqe(opcode::RecvMsgMulti::new(types::Fd(fd), msghdr, bgid)
        .build()
        .user_data(token.encode()))
}

/// Sends the message `msg` of send slot `slot`.
pub(super) fn send_msg(fd: RawFd, msg: *const libc::msghdr, slot: u32) -> Sqe {
    // SAFETY: `msg` and everything it points at live in send slot `slot`
    // (a boxed slice never resized), not reused before this send's CQE; its
    // payload points into a file mapping kept by the session, then by
    // `lingering`, until that CQE.
    Sqe(opcode::SendMsg::new(types::Fd(fd), msg)
        .build()
        .user_data(Token::Send(slot).encode()))
}

/// Cancels the operation whose `user_data` is `target`.
pub(super) fn cancel(target: u64) -> Sqe {
    // SAFETY: names no memory; only a user_data to match.
    Sqe(opcode::AsyncCancel::new(target)
        .build()
        .user_data(Token::Cancel.encode()))
}

/// Cancels every operation the ring holds.
pub(super) fn cancel_all() -> Sqe {
    // SAFETY: names no memory.
    Sqe(opcode::AsyncCancel2::new(types::CancelBuilder::any())
        .build()
        .user_data(Token::Cancel.encode()))
}

/// The shard's io_uring, with SQEs that did not fit the SQ kept for the
/// next turn, and the count of operations the kernel holds.
pub(super) struct Ring {
    // Closing it does not wait for its operations: `teardown` does, and
    // `abandon` leaks what they may still touch.
    ring: IoUring,
    backlog: VecDeque<squeue::Entry>,
    /// SQEs put in the SQ whose final CQE (for a multishot receive, the one
    /// without `F_MORE`) was not reaped yet.
    outstanding: u64,
}

impl Ring {
    pub fn new(ring: IoUring) -> Self {
        Ring {
            ring,
            backlog: VecDeque::new(),
            outstanding: 0,
        }
    }

    /// Queues an SQE; if the SQ is full, submits to make room, else keeps it
    /// for the next turn.
    pub fn push(&mut self, sqe: Sqe) {
        if !self.backlog.is_empty() {
            self.backlog.push_back(sqe.0);
            return;
        }
        if self.try_push(&sqe.0) {
            return;
        }
        let _ = self.ring.submit();
        if !self.try_push(&sqe.0) {
            self.backlog.push_back(sqe.0);
        }
    }

    fn try_push(&mut self, sqe: &squeue::Entry) -> bool {
        // SAFETY: every entry here was built by this module's builders,
        // whose comments say why the memory it names outlives it.
        let ok = unsafe { self.ring.submission().push(sqe) }.is_ok();
        self.outstanding += u64::from(ok);
        ok
    }

    /// Moves backlogged SQEs into the SQ, submitting when it is full.
    pub fn flush_backlog(&mut self) {
        while let Some(sqe) = self.backlog.pop_front() {
            if self.try_push(&sqe) {
                continue;
            }
            let submitted = self.ring.submit().is_ok();
            self.backlog.push_front(sqe);
            if !submitted {
                break;
            }
        }
    }

    /// Forgets backlogged SQEs (they never reached the kernel).
    pub fn clear_backlog(&mut self) {
        self.backlog.clear();
    }

    /// Whether every queued SQE went to the kernel (so none names a socket
    /// that is about to close).
    pub fn all_consumed(&mut self) -> bool {
        self.backlog.is_empty() && self.ring.submission().is_empty()
    }

    pub fn backlog_is_empty(&self) -> bool {
        self.backlog.is_empty()
    }

    pub fn submit(&mut self) -> io::Result<usize> {
        self.ring.submit()
    }

    /// Submits and waits for `want` completions, bounded by `args`.
    pub fn submit_and_wait(&mut self, want: usize, args: &types::SubmitArgs) -> io::Result<usize> {
        self.ring.submitter().submit_with_args(want, args)
    }

    /// Moves every available CQE into `out`, counting finished operations.
    pub fn reap(&mut self, out: &mut Vec<cqueue::Entry>) {
        let start = out.len();
        out.extend(self.ring.completion());
        for cqe in &out[start..] {
            // A multishot receive goes on while its CQEs carry `F_MORE`.
            if !cqueue::more(cqe.flags()) {
                debug_assert!(self.outstanding > 0, "a CQE for no outstanding operation");
                self.outstanding = self.outstanding.saturating_sub(1);
            }
        }
    }

    pub fn outstanding(&self) -> u64 {
        self.outstanding
    }

    pub fn submitter(&self) -> io_uring::Submitter<'_> {
        self.ring.submitter()
    }
}
