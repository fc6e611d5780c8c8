//! One TFTP transfer as a sans-IO state machine (in the manner of
//! quinn-proto's `Connection`). No sockets, clocks or threads: time is
//! always an argument.
//!
//! Call order, after construction and after every input:
//! 1. `handle_datagram(now, bytes)` for each datagram from the peer, or
//!    `handle_timeout(now)` when the deadline from `poll_timeout` passed
//!    (a spurious call is a no-op);
//! 2. `poll_transmit(now, buf)` until it returns `None` (drains a window);
//! 3. `poll_timeout()` to learn the one next deadline;
//! 4. `poll_event()`: `Some` once, when the transfer has ended.
#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

use crate::proto::{ErrorCode, Mode, Options};

/// Server-wide limits and timer policy for transfers.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest blksize granted (`--max-blksize`).
    pub max_blksize: u16,
    /// Largest windowsize granted (`--max-windowsize`).
    pub max_windowsize: u16,
    /// Clamp blksize to the ingress interface's MTU.
    pub mtu_clamp: bool,
    /// RTO before the first RTT sample (RFC 6298 §2.1).
    pub initial_rto: Duration,
    /// Floor and ceiling of the adaptive RTO.
    pub rto_min: Duration,
    pub rto_max: Duration,
    /// Retransmissions of one packet before giving up.
    pub retries: u32,
}

/// What a DATA transmit carries besides its header: a byte range of the
/// file, for the driver to send from the mapping without copying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Payload {
    pub offset: u64,
    pub len: usize,
}

/// One datagram to send to the peer: the first `header_len` bytes of the
/// caller's buffer, followed by `payload` from the file if present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub header_len: usize,
    pub payload: Option<Payload>,
}
