//! Fuzz harnesses for ringtftpd's sans-IO core, written as plain
//! functions so that libFuzzer (fuzz_targets/) and the stable `cargo test`
//! replay (tests/replay.rs) run the same code. Each harness decodes its
//! input into a sequence of operations and panics when an invariant breaks.
#![forbid(unsafe_code)]

pub mod endpoint;
pub mod input;
pub mod packet;
pub mod receive;
pub mod seeds;
pub mod transfer;

use std::time::Duration;

use ringtftpd::proto::Options;
use ringtftpd::session::Limits;

use input::{Encoder, Input};

/// The one place that builds `Limits` from fuzz input: a field added to
/// `Limits` is added here.
pub fn limits(input: &mut Input) -> Limits {
    Limits {
        max_blksize: input.u16(),
        max_windowsize: if input.bool() {
            1 + u16::from(input.u8() % 64)
        } else {
            input.u16()
        },
        mtu_clamp: input.bool(),
        initial_rto: Duration::from_millis(u64::from(input.u16() % 5001)),
        rto_min: Duration::from_millis(u64::from(input.u16() % 1001)),
        rto_max: Duration::from_millis(u64::from(input.u16())),
        retries: u32::from(input.u8() % 11),
        max_stall: Duration::from_millis(1 + u64::from(input.u16()) * 10),
        // Derived, not read: the seed corpus keeps its meaning.
        min_give_up: Duration::from_secs(15),
        mtu_slack: 0,
        max_window_bytes: ringtftpd::session::DEFAULT_MAX_WINDOW_BYTES,
    }
}

/// Encodes, for `limits`, server-like limits the seeds share: blksize
/// 65464, windowsize 64, MTU clamp, RTO 1 s / 20 ms / 2 s, 5 retries,
/// 60 s stall.
pub fn encode_server_limits(e: &mut Encoder) {
    e.u16(65464)
        .u8(1)
        .u8(63)
        .u8(1)
        .u16(1000)
        .u16(20)
        .u16(2000)
        .u8(5)
        .u16(6000);
}

/// Requested options: absent, typical or extreme values per field.
pub fn options(input: &mut Input) -> Options {
    let flags = input.u8();
    let pick = |input: &mut Input, shift: u8| -> Option<u32> {
        match (flags >> shift) & 3 {
            0 => None,
            1 => Some(u32::from(input.u8())),
            2 => Some(u32::from(input.u16())),
            _ => Some(input.u32()),
        }
    };
    let blksize = pick(input, 0);
    let timeout = pick(input, 2);
    let windowsize = pick(input, 4);
    let tsize = match flags >> 6 {
        0 => None,
        1 => Some(0),
        _ => Some(input.u64()),
    };
    Options {
        blksize,
        timeout,
        tsize,
        windowsize,
        ..Options::default()
    }
}

/// The MTU of the interface a request arrived on.
pub fn mtu(input: &mut Input) -> Option<u32> {
    match input.u8() % 6 {
        0 => None,
        1 => Some(1500),
        2 => Some(576),
        3 => Some(9000),
        4 => Some(65535),
        _ => Some(u32::from(input.u16())),
    }
}
