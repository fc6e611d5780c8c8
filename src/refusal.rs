//! Every reason the server refuses a request or ends a transfer itself,
//! with the TFTP ERROR it sends: the one place for codes and texts, and
//! the kinds that counters (and metrics) count by.

#![forbid(unsafe_code)]

use std::sync::Arc;

use crate::files::OpenError;
use crate::proto::{ErrorCode, ParseError};

/// Why a request (or a stray datagram) was refused or dropped. Not
/// `Copy`: a policy file's message is owned ([`Refusal::DeniedBy`]), so
/// that re-reading the file on SIGHUP frees the old messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotFound,
    /// Access violation, with what was wrong (`..`, a symlink loop...).
    Denied(&'static str),
    /// Access violation by a policy file's `deny` rule, with its message
    /// (shared with the rules it was read from).
    DeniedBy(Arc<str>),
    /// Not world-readable (without `--permissive`) or unreadable.
    NotReadable,
    NotRegular,
    /// The file cannot be served as asked (e.g. too large for netascii).
    Unservable(&'static str),
    /// Out of descriptors or memory for now; the client may retry.
    Transient(&'static str),
    /// Every session slot is taken, or no transfer socket could be had.
    Busy,
    PerClientCap,
    /// Over the per-address request rate: dropped, never answered.
    RateLimited,
    UploadsDisabled,
    /// An upload over `--max-upload` (by its tsize) (ERROR 3).
    TooLarge,
    /// No room for an upload (ERROR 3).
    DiskFull,
    /// Not a request the listener can take.
    Malformed(Malformed),
    /// A remap rule (`a`) refused the name.
    RemapDenied,
    /// The remap rules failed on the name (step limit, a missing label):
    /// tftpd-hpa's "Remap table failure".
    RemapFailed,
    ShuttingDown,
    /// A datagram at a transfer's port from another TID (RFC 1350 §4).
    UnknownTid,
}

/// What was wrong with a datagram at the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    Parse(ParseError),
    /// A valid packet, but not RRQ or WRQ.
    NotARequest,
    /// Longer than the receive buffer (MSG_TRUNC): never parsed cut short.
    Oversized,
}

/// The counted kinds of [`Refusal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    NotFound,
    Denied,
    Busy,
    PerClientCap,
    RateLimited,
    UploadsDisabled,
    TooLarge,
    DiskFull,
    Malformed,
    ShuttingDown,
    Stranger,
    /// Refused or failed by the remap rules.
    Remap,
}

impl RefusalKind {
    pub const ALL: [RefusalKind; 12] = [
        RefusalKind::NotFound,
        RefusalKind::Denied,
        RefusalKind::Busy,
        RefusalKind::PerClientCap,
        RefusalKind::RateLimited,
        RefusalKind::UploadsDisabled,
        RefusalKind::TooLarge,
        RefusalKind::DiskFull,
        RefusalKind::Malformed,
        RefusalKind::ShuttingDown,
        RefusalKind::Stranger,
        RefusalKind::Remap,
    ];

    /// The name in log lines and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::NotFound => "not_found",
            RefusalKind::Denied => "denied",
            RefusalKind::Busy => "busy",
            RefusalKind::PerClientCap => "per_client_cap",
            RefusalKind::RateLimited => "rate_limited",
            RefusalKind::UploadsDisabled => "uploads_disabled",
            RefusalKind::TooLarge => "too_large",
            RefusalKind::DiskFull => "disk_full",
            RefusalKind::Malformed => "malformed",
            RefusalKind::ShuttingDown => "shutting_down",
            RefusalKind::Stranger => "stranger",
            RefusalKind::Remap => "remap",
        }
    }
}

impl Refusal {
    pub fn kind(&self) -> RefusalKind {
        match self {
            Refusal::NotFound => RefusalKind::NotFound,
            Refusal::Denied(_)
            | Refusal::DeniedBy(_)
            | Refusal::NotReadable
            | Refusal::NotRegular
            | Refusal::Unservable(_) => RefusalKind::Denied,
            Refusal::Transient(_) | Refusal::Busy => RefusalKind::Busy,
            Refusal::PerClientCap => RefusalKind::PerClientCap,
            Refusal::RateLimited => RefusalKind::RateLimited,
            Refusal::UploadsDisabled => RefusalKind::UploadsDisabled,
            Refusal::TooLarge => RefusalKind::TooLarge,
            Refusal::DiskFull => RefusalKind::DiskFull,
            Refusal::Malformed(_) => RefusalKind::Malformed,
            Refusal::ShuttingDown => RefusalKind::ShuttingDown,
            Refusal::UnknownTid => RefusalKind::Stranger,
            Refusal::RemapDenied | Refusal::RemapFailed => RefusalKind::Remap,
        }
    }

    /// Input that may be forged (garbage, strangers): its replies go
    /// through the stricter limit for unconfirmed sources.
    pub fn may_be_forged(&self) -> bool {
        matches!(self, Refusal::Malformed(_) | Refusal::UnknownTid)
    }

    /// Whether it is answered at all (a rate-limited request is not: the
    /// answer is what a reflection attack wants).
    pub fn is_answered(&self) -> bool {
        *self != Refusal::RateLimited
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::NotFound => ErrorCode::FileNotFound,
            Refusal::Denied(_)
            | Refusal::DeniedBy(_)
            | Refusal::NotReadable
            | Refusal::NotRegular
            | Refusal::UploadsDisabled
            | Refusal::RemapDenied
            | Refusal::RemapFailed => ErrorCode::AccessViolation,
            Refusal::Malformed(Malformed::Parse(ParseError::BadFilename)) => {
                ErrorCode::AccessViolation
            }
            Refusal::Malformed(_) => ErrorCode::IllegalOperation,
            Refusal::TooLarge | Refusal::DiskFull => ErrorCode::DiskFull,
            Refusal::UnknownTid => ErrorCode::UnknownTid,
            Refusal::Unservable(_)
            | Refusal::Transient(_)
            | Refusal::Busy
            | Refusal::PerClientCap
            | Refusal::RateLimited
            | Refusal::ShuttingDown => ErrorCode::NotDefined,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Refusal::NotFound => "file not found",
            Refusal::Denied(why) | Refusal::Unservable(why) | Refusal::Transient(why) => why,
            Refusal::DeniedBy(why) => why,
            Refusal::NotReadable => "permission denied",
            Refusal::NotRegular => "not a regular file",
            Refusal::Busy => "server busy, try again later",
            Refusal::PerClientCap => "too many transfers from this address, try again later",
            Refusal::RateLimited => "too many requests",
            Refusal::UploadsDisabled => "uploads are disabled",
            Refusal::TooLarge => "file too large",
            Refusal::DiskFull => "disk full or allocation exceeded",
            Refusal::Malformed(Malformed::Parse(e)) => match e {
                ParseError::UnknownMode => "unknown transfer mode",
                ParseError::BadFilename => "filename empty or too long",
                ParseError::BadOptions => "too many options",
                ParseError::UnknownOpcode(_) => "unknown opcode",
                _ => "malformed request",
            },
            Refusal::Malformed(Malformed::NotARequest) => "expected a read or write request",
            Refusal::Malformed(Malformed::Oversized) => "request too long",
            Refusal::ShuttingDown => "server shutting down",
            Refusal::UnknownTid => "unknown transfer ID",
            // tftpd-hpa 7.x tells the client no more than this for either.
            Refusal::RemapDenied | Refusal::RemapFailed => "access denied",
        }
    }
}

impl From<&OpenError> for Refusal {
    fn from(e: &OpenError) -> Self {
        match *e {
            OpenError::NotFound => Refusal::NotFound,
            OpenError::Denied(why) => Refusal::Denied(why),
            OpenError::NotReadable => Refusal::NotReadable,
            OpenError::NotRegular => Refusal::NotRegular,
            OpenError::Unservable(why) => Refusal::Unservable(why),
            OpenError::Transient(why) => Refusal::Transient(why),
            OpenError::TooLarge => Refusal::TooLarge,
            OpenError::DiskFull => Refusal::DiskFull,
        }
    }
}

/// Why the server ended a running transfer itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Abort {
    /// No progress within the retries or the stall bound.
    TimedOut,
    ShuttingDown,
    /// The file changed under the transfer (rewritten in place, shrank,
    /// or truncated under its mapping: EFAULT from the send).
    FileChanged,
    /// A read of the file failed (netascii's pread).
    ReadFailed,
    /// The transfer socket's receive failed.
    ReceiveFailed,
    /// An upload past `--max-upload` or its own tsize (ERROR 3).
    TooLarge,
    /// An upload's DATA longer than the negotiated blksize (ERROR 4).
    OversizedBlock,
    /// No room left for an upload (ERROR 3).
    DiskFull,
    /// An upload could not be written or stored (ERROR 0).
    WriteFailed,
}

impl Abort {
    pub const ALL: [Abort; 9] = [
        Abort::TimedOut,
        Abort::ShuttingDown,
        Abort::FileChanged,
        Abort::ReadFailed,
        Abort::ReceiveFailed,
        Abort::TooLarge,
        Abort::OversizedBlock,
        Abort::DiskFull,
        Abort::WriteFailed,
    ];

    pub fn code(self) -> ErrorCode {
        match self {
            Abort::TooLarge | Abort::DiskFull => ErrorCode::DiskFull,
            Abort::OversizedBlock => ErrorCode::IllegalOperation,
            _ => ErrorCode::NotDefined,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Abort::TimedOut => "timed out",
            Abort::ShuttingDown => "server shutting down",
            Abort::FileChanged => "file changed during transfer",
            Abort::ReadFailed => "cannot read file",
            Abort::ReceiveFailed => "receive failed",
            Abort::TooLarge => "file too large",
            Abort::OversizedBlock => "block larger than blksize",
            Abort::DiskFull => "disk full or allocation exceeded",
            Abort::WriteFailed => "cannot store file",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_listed_once_with_its_own_name() {
        let mut names: Vec<&str> = RefusalKind::ALL.iter().map(|k| k.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), RefusalKind::ALL.len());
        for (i, k) in RefusalKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "ALL is in declaration order");
        }
    }

    #[test]
    fn codes_follow_rfc_1350() {
        assert_eq!(Refusal::NotFound.code(), ErrorCode::FileNotFound);
        assert_eq!(Refusal::NotReadable.code(), ErrorCode::AccessViolation);
        assert_eq!(Refusal::UploadsDisabled.code(), ErrorCode::AccessViolation);
        assert_eq!(Refusal::UnknownTid.code(), ErrorCode::UnknownTid);
        assert_eq!(
            Refusal::Malformed(Malformed::Parse(ParseError::TooShort)).code(),
            ErrorCode::IllegalOperation
        );
        assert_eq!(Refusal::Busy.code(), ErrorCode::NotDefined);
        assert!(!Refusal::RateLimited.is_answered());
        assert!(Refusal::UnknownTid.may_be_forged() && !Refusal::Busy.may_be_forged());
    }
}
