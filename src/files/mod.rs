//! Where files come from and where uploads go.
//!
//! - [`Source`] and [`Sink`]: what the endpoint opens files through, for
//!   reading and for an upload; [`OpenError`] is why it could not.
//! - `root` ([`FileRoot`]): the real, confined root (openat2) and the
//!   mapping cache shared by every shard.
//! - [`netascii`]: the translation both ways.
//! - [`upload`]: the writer that makes an upload visible only whole.
//! - [`mem`]: files in memory, for tests and benchmarks.

use crate::proto::Mode;

pub mod mem;
pub mod netascii;
mod root;
pub mod upload;

pub use root::{
    Block, BlockError, FileData, FileRoot, MAX_NETASCII_SOURCE, MappedCounts, PREFETCH_BYTES,
    TRANSIENT, is_transient,
};

/// Why a requested file cannot be served. Mapped to TFTP error codes in
/// one place ([`crate::refusal::Refusal`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// ERROR 1.
    #[error("file not found")]
    NotFound,
    /// ERROR 2: `..`, a magic link or symlink loop, a bad name.
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
    /// ERROR 0: out of descriptors or memory for now (EMFILE, ENFILE,
    /// ENOMEM...). Never cached: the next request may well succeed.
    #[error("{0}")]
    Transient(&'static str),
    /// ERROR 3: an upload's announced size is over `--max-upload`.
    #[error("file too large")]
    TooLarge,
    /// ERROR 3: no room for an upload.
    #[error("disk full or allocation exceeded")]
    DiskFull,
}

/// Files to read. The shard gives the confined [`FileRoot`]; tests give
/// [`mem::MemFiles`].
pub trait Source {
    /// What a session keeps to reach the file's bytes (e.g. a shared mapping).
    type Handle;
    /// Opens `filename` (raw request bytes, or the path a policy granted)
    /// for reading in `mode`, and returns the handle and the length of the
    /// content to send, or [`crate::session::LEN_UNKNOWN`] if it is learnt
    /// while sending.
    fn open_read(&mut self, filename: &[u8], mode: Mode) -> Result<(Self::Handle, u64), OpenError>;

    /// As `open_read`, under directory `root` of several (0 is the one
    /// `open_read` uses; a source of one directory has no other).
    fn open_read_in(
        &mut self,
        root: usize,
        filename: &[u8],
        mode: Mode,
    ) -> Result<(Self::Handle, u64), OpenError> {
        match root {
            0 => self.open_read(filename, mode),
            _ => Err(OpenError::NotFound),
        }
    }

    /// The most bytes `handle` may come to hold (it may grow, as a netascii
    /// translation does), charged to the open cache's byte bound.
    fn held_bytes(handle: &Self::Handle, len: u64) -> u64 {
        let _ = handle;
        len
    }
}

/// Where uploads go; its handles are the source's, so one session slab
/// holds both. A read-only source takes the default, which refuses.
pub trait Sink: Source {
    /// Begins storing `filename` for a write request announced as `tsize`
    /// bytes (RFC 2349), if the client said; its bytes go to the handle's
    /// upload, which becomes visible only once whole.
    fn open_write(
        &mut self,
        filename: &[u8],
        mode: Mode,
        tsize: Option<u64>,
    ) -> Result<Self::Handle, OpenError> {
        let _ = (filename, mode, tsize);
        Err(OpenError::Denied("uploads are disabled"))
    }

    /// As `open_write`, under directory `root` of several (see
    /// [`Source::open_read_in`]).
    fn open_write_in(
        &mut self,
        root: usize,
        filename: &[u8],
        mode: Mode,
        tsize: Option<u64>,
    ) -> Result<Self::Handle, OpenError> {
        match root {
            0 => self.open_write(filename, mode, tsize),
            _ => Err(OpenError::NotFound),
        }
    }
}
