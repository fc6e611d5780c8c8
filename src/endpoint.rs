//! The per-shard demultiplexer above sessions, sans-IO (like quinn-proto's
//! `Endpoint`). It admits or refuses requests, routes datagrams to sessions
//! by [`SessionId`], and answers strangers. Sessions live in a slab and are
//! addressed by index plus generation, never by pointer.
#![forbid(unsafe_code)]

use crate::proto::Mode;

/// Why a requested file cannot be served. Mapped to TFTP error codes in
/// one place ([`OpenError::error_code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// ERROR 1.
    #[error("file not found")]
    NotFound,
    /// ERROR 2: outside the root, `..`, an escaping symlink, a bad name.
    #[error("access violation: {0}")]
    Denied(&'static str),
    /// ERROR 2: not world-readable (without `--permissive`) or unreadable.
    #[error("permission denied")]
    NotReadable,
    /// ERROR 2: a directory, device, FIFO or socket.
    #[error("not a regular file")]
    NotRegular,
    /// ERROR 0: e.g. a netascii translation over its size cap.
    #[error("{0}")]
    Unservable(&'static str),
}

/// Where files come from. The shard gives the real confined file cache;
/// tests give an in-memory map.
pub trait FileSource {
    /// What a session keeps to reach the file's bytes (e.g. a shared mapping).
    type Handle;
    /// Opens `filename` (raw request bytes) for reading in `mode`, and
    /// returns the handle and the length of the content to send (for
    /// netascii, the translated length).
    fn open_read(&mut self, filename: &[u8], mode: Mode) -> Result<(Self::Handle, u64), OpenError>;
}
