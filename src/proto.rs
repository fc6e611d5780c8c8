//! The TFTP wire format (RFC 1350, 2347, 2348, 2349, 7440).
//!
//! [`Packet::parse`] borrows from the datagram and never allocates; every
//! malformed input is a [`ParseError`], never a panic. [`Packet::emit`] writes
//! into a caller-owned buffer and reports the size it needs when that is too
//! small. Options parse into the fixed [`Options`] struct, not a map.
#![forbid(unsafe_code)]

/// Largest block size RFC 2348 allows.
pub const MAX_BLKSIZE: u16 = 65464;
/// Smallest block size RFC 2348 allows.
pub const MIN_BLKSIZE: u16 = 8;
/// The RFC 1350 block size.
pub const DEFAULT_BLKSIZE: u16 = 512;
/// Longest filename we accept, in bytes.
pub const MAX_FILENAME_LEN: usize = 1024;
/// Most options (known or not) a request may carry before it is refused.
pub const MAX_OPTIONS: usize = 32;
/// Longest option name or value we accept, in bytes.
pub const MAX_OPTION_LEN: usize = 64;

/// Transfer mode of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Octet,
    Netascii,
}

/// TFTP error codes (RFC 1350 §5, RFC 2347 for 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTid,
    FileExists,
    NoSuchUser,
    OptionRefused,
    /// A code outside 0..=8, kept as received.
    Other(u16),
}

/// Options as a client requested them (RFC 2347). Values are kept as sent,
/// saturated to the field's width; negotiation decides what to accept.
/// `None` means absent or unparseable (an unparseable value is ignored, as
/// an unknown option is).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    pub blksize: Option<u32>,
    pub timeout: Option<u32>,
    pub tsize: Option<u64>,
    pub windowsize: Option<u32>,
}

/// A read or write request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request<'a> {
    /// Raw filename bytes, without the terminating NUL.
    pub filename: &'a [u8],
    pub mode: Mode,
    pub options: Options,
}

/// One parsed TFTP packet, borrowing from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    Rrq(Request<'a>),
    Wrq(Request<'a>),
    Data { block: u16, payload: &'a [u8] },
    Ack { block: u16 },
    Error { code: ErrorCode, message: &'a [u8] },
    Oack(Options),
}

/// Why a datagram is not a valid TFTP packet. Each maps to ERROR 4, except
/// [`ParseError::UnknownMode`] (also 4, with its own message).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("packet too short")]
    TooShort,
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("missing NUL terminator")]
    Unterminated,
    #[error("unknown transfer mode")]
    UnknownMode,
    #[error("filename too long or empty")]
    BadFilename,
    #[error("too many or over-long options")]
    BadOptions,
    #[error("trailing bytes after packet")]
    Trailing,
}

/// The buffer given to `emit` is too small; `required` is the size needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("buffer too small: {required} bytes needed")]
pub struct BufferTooSmall {
    pub required: usize,
}
