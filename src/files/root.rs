//! Confined opening under the root and the shared content cache.
//!
//! [`FileRoot`] holds the root directory and a cache shared by every shard
//! (clone it once per shard; clones share everything). Its
//! [`Source::open_read`] confines the request to the root in the kernel
//! (`openat2` with `RESOLVE_IN_ROOT`: the root is `/` for the whole lookup,
//! symlinks included, as under tftpd-hpa's chroot), checks that the file is regular and,
//! unless permissive, world-readable (as tftpd-hpa does), and returns a
//! [`FileData`]: the bytes to send.
//!
//! Octet content is cached by file identity (device, inode, size, mtime,
//! ctime), never by name, behind a `Weak`: 10,000 sessions reading one file
//! share one mapping, which goes away when the last [`FileData`] drops. A
//! replaced or modified file gets a new key, so a new mapping; sessions
//! already reading the old one keep theirs. The cache is touched on the open
//! path only.
//!
//! SIGBUS design: an octet file is a read-only shared mapping that this
//! crate never reads in user space. [`FileData::range_ptr`] hands the driver
//! a raw pointer for an iovec; if the file was truncated after mapping, the
//! kernel's copy in `sendmsg` fails with `EFAULT` instead of the process
//! taking SIGBUS, and the shard ends that one transfer with an ERROR.
//! Netascii content is read with `pread` (never through a mapping) and
//! translated in memory as it is sent, one bounded chunk at a time
//! ([`FileData::block`]), so opening a large text file does not stall the
//! shard; its length is known only once the source is exhausted.
//!
//! A file rewritten in place (`cp new old`: truncate, then write) changes
//! the pages under a mapping, so a transfer may have sent a mix of old and
//! new bytes. A mapped content keeps its file open and what fstat said at
//! open; [`FileData::block`] compares before the final block of a transfer
//! (netascii too, which reads the file as it goes), so such a transfer ends
//! with an ERROR instead of completing. Replacing by rename leaves the old inode's
//! bytes alone: those transfers go on.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::ptr::NonNull;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use memmap2::{Advice, MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};

use super::netascii::Netascii;
use super::{OpenError, Sink, Source};
use crate::proto::{MAX_FILENAME_LEN, Mode};
use crate::refusal::Abort;
use crate::session::LEN_UNKNOWN;

/// Largest source file served in netascii mode: its translation is held in
/// memory (up to twice this size, reserved at open, filled as sent).
pub const MAX_NETASCII_SOURCE: u64 = 64 * 1024 * 1024;

/// How much of a newly mapped file the kernel is asked to read ahead at
/// once (`MADV_WILLNEED`), so the first clients of a cold file fault less
/// on the shard thread. Bounded: the advice itself allocates and submits
/// the reads, and the kernel's own readahead follows the clients after it.
pub const PREFETCH_BYTES: usize = 16 * 1024 * 1024;

/// Fewest cache entries before a prune pass is considered.
const MIN_PRUNE_AT: usize = 64;

/// How often an `openat2` that raced with a rename (`EAGAIN`) or a signal
/// (`EINTR`) is retried before giving up.
const OPEN_RETRIES: usize = 4;

/// The root directory, its options and the content cache. Cheap to clone:
/// clones share the directory descriptor and the cache.
#[derive(Clone)]
pub struct FileRoot {
    inner: Arc<RootInner>,
}

struct RootInner {
    dir: OwnedFd,
    permissive: bool,
    cache: Mutex<Cache>,
    mapped: Arc<MappedCounts>,
}

/// The mappings alive under one root, for `--metrics`: moved when a
/// mapping is made or its last [`FileData`] drops (once per file, never
/// per packet), read by scrapes without the cache's lock.
#[derive(Debug, Default)]
pub struct MappedCounts {
    files: AtomicU64,
    bytes: AtomicU64,
}

impl MappedCounts {
    /// Mappings alive and the bytes they span.
    pub fn read(&self) -> (u64, u64) {
        (
            self.files.load(Ordering::Relaxed),
            self.bytes.load(Ordering::Relaxed),
        )
    }
}

/// What identifies one version of one file's content. ctime is
/// included because it cannot be set by users, unlike mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

struct Cache {
    map: HashMap<Key, Weak<Mapped>>,
    /// Prune dead entries when the map reaches this size (amortised O(1)).
    prune_at: usize,
}

impl Cache {
    fn get(&self, key: &Key) -> Option<Arc<Mapped>> {
        self.map.get(key).and_then(Weak::upgrade)
    }

    fn insert(&mut self, key: Key, content: &Arc<Mapped>) {
        if self.map.len() >= self.prune_at {
            self.map.retain(|_, w| w.strong_count() > 0);
            self.prune_at = (self.map.len() * 2).max(MIN_PRUNE_AT);
        }
        self.map.insert(key, Arc::downgrade(content));
    }
}

/// Octet content: a read-only shared mapping, never read in user space,
/// with the file (to fstat it again) and what fstat said when it was mapped.
struct Mapped {
    map: MmapRaw,
    file: File,
    stamp: Stamp,
    counts: Arc<MappedCounts>,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        self.counts.files.fetch_sub(1, Ordering::Relaxed);
        let len = self.map.len() as u64;
        self.counts.bytes.fetch_sub(len, Ordering::Relaxed);
    }
}

/// Why a block cannot be sent; the shard ends the transfer with ERROR 0
/// and this message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockError {
    /// Rewritten, truncated or grown since open: the blocks sent may mix
    /// two versions.
    Changed,
    /// pread failed.
    Read,
}

impl BlockError {
    /// How the transfer ends.
    pub fn abort(self) -> Abort {
        match self {
            BlockError::Changed => Abort::FileChanged,
            BlockError::Read => Abort::ReadFailed,
        }
    }
}

/// One resolved block: a pointer for an iovec and the content's length if
/// known now.
#[derive(Debug, Clone, Copy)]
pub struct Block {
    pub ptr: *const u8,
    /// The payload length: the asked one, or less in the final block.
    pub len: usize,
    /// The content's whole length, once the source is exhausted (always
    /// for octet).
    pub end: Option<u64>,
}

/// What fstat says about a file's content, to tell whether it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    nlink: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            nlink: meta.nlink(),
        }
    }

    /// Whether `now` may show different bytes than `self` did. Any write
    /// moves mtime (and a truncate the size); ctime catches a write whose
    /// mtime was set back (`cp -p`), but it also moves when the last link
    /// goes (unlink, or a rename over the name), which leaves the bytes
    /// alone: so ctime counts only while the link count is unchanged.
    fn differs(&self, now: &Stamp) -> bool {
        self.size != now.size
            || self.mtime != now.mtime
            || (self.nlink == now.nlink && self.ctime != now.ctime)
    }

    /// Whether `file` may have changed since this stamp; one fstat.
    pub(super) fn changed(&self, file: &File) -> bool {
        match file.metadata() {
            Ok(meta) => self.differs(&Stamp::of(&meta)),
            // Cannot tell: do not let a client accept what may be mixed.
            Err(_) => true,
        }
    }
}

/// The content of one opened file, as sent. Cheap to clone; the content
/// stays valid while any clone lives. Octet content is shared by every
/// shard; netascii content by the clones on one thread (it is not `Send`).
#[derive(Clone)]
pub struct FileData {
    content: Content,
}

#[derive(Clone)]
enum Content {
    /// Nothing to map or translate: a consistent snapshot whatever happens.
    Empty,
    Mapped(Arc<Mapped>),
    Netascii(Rc<Netascii>),
}

impl std::fmt::Debug for FileData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.content {
            Content::Empty => "empty",
            Content::Mapped(_) => "mapped",
            Content::Netascii(_) => "netascii",
        };
        f.debug_struct("FileData")
            .field("kind", &kind)
            .field("len", &self.len())
            .finish()
    }
}

impl FileData {
    /// Length of the content to send, or [`LEN_UNKNOWN`] for a netascii
    /// content not yet translated to its end ([`FileData::block`] tells it).
    pub fn len(&self) -> u64 {
        match &self.content {
            Content::Empty => 0,
            Content::Mapped(m) => m.map.len() as u64,
            Content::Netascii(n) => {
                let t = n.state.borrow();
                if t.src_done == n.stamp.size {
                    t.out.len() as u64
                } else {
                    LEN_UNKNOWN
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most bytes this content may come to hold in memory or pin on
    /// disk: a netascii translation's bound, an octet file's length.
    pub fn held_bytes(&self) -> u64 {
        match &self.content {
            Content::Empty => 0,
            Content::Mapped(m) => m.map.len() as u64,
            Content::Netascii(n) => n.stamp.size.saturating_mul(2),
        }
    }

    /// A pointer and length covering `len` bytes at `offset`, for an iovec;
    /// `None` if the range is not inside the content (for netascii, the
    /// part translated so far). A zero-length range at or before the end
    /// is valid (the final empty DATA block).
    ///
    /// The caller must not dereference the pointer in user space: for a
    /// mapped file truncated after mapping that raises SIGBUS, whereas the
    /// kernel's copy in `sendmsg` just fails with `EFAULT`. The pointer stays
    /// valid while this `FileData` (or a clone) lives.
    pub fn range_ptr(&self, offset: u64, len: usize) -> Option<(*const u8, usize)> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        let (base, total) = match &self.content {
            Content::Empty => (NonNull::<u8>::dangling().as_ptr().cast_const(), 0),
            Content::Mapped(m) => (m.map.as_ptr(), m.map.len()),
            Content::Netascii(n) => {
                let t = n.state.borrow();
                (t.out.as_ptr(), t.out.len())
            }
        };
        if end > total {
            return None;
        }
        // wrapping_add: no dereference, and `start <= total` keeps it in
        // (or one past) the allocation anyway.
        Some((base.wrapping_add(start), len))
    }

    /// The payload of the DATA block of `len` bytes at `offset`, as the
    /// session named it, translating netascii as far as needed (one chunk at
    /// most). Before the final block (and each resend of it), a content read
    /// from the file is checked against the fstat taken at open: if it was
    /// rewritten in place, the blocks sent may mix two versions, so the
    /// client must not get the block that completes it. A netascii block
    /// may come back shorter than asked: it is the final one, and `end`
    /// says so.
    pub fn block(&self, offset: u64, len: usize) -> Result<Block, BlockError> {
        let (block, file, stamp) = match &self.content {
            Content::Netascii(n) => (n.resolve(offset, len)?, &n.file, &n.stamp),
            Content::Empty | Content::Mapped(_) => {
                let (ptr, n) = self.range_ptr(offset, len).ok_or(BlockError::Changed)?;
                let end = Some(self.len());
                let block = Block { ptr, len: n, end };
                match &self.content {
                    Content::Mapped(m) => (block, &m.file, &m.stamp),
                    _ => return Ok(block),
                }
            }
        };
        let last = block.end == offset.checked_add(block.len as u64);
        if last && stamp.changed(file) {
            return Err(BlockError::Changed);
        }
        Ok(block)
    }

    /// Whether the file may have changed since it was opened, so that the
    /// bytes sent may mix two versions: its size, mtime or (with the same
    /// link count) ctime differ now, or fstat fails. One fstat. Empty
    /// content is a snapshot: never changed.
    pub fn changed_since_open(&self) -> bool {
        match &self.content {
            Content::Mapped(m) => m.stamp.changed(&m.file),
            Content::Netascii(n) => n.stamp.changed(&n.file),
            Content::Empty => false,
        }
    }

    /// Whether two handles share one content (one mapping or translation).
    pub fn same_content(&self, other: &FileData) -> bool {
        match (&self.content, &other.content) {
            (Content::Mapped(a), Content::Mapped(b)) => Arc::ptr_eq(a, b),
            (Content::Netascii(a), Content::Netascii(b)) => Rc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Test-only: the whole content, read through the pointers (netascii
    /// translated to its end).
    #[cfg(test)]
    fn read_all_for_test(&self) -> Vec<u8> {
        if !matches!(self.content, Content::Netascii(_)) {
            let (p, n) = self.range_ptr(0, self.len() as usize).expect("range");
            // SAFETY: as below.
            return unsafe { std::slice::from_raw_parts(p, n) }.to_vec();
        }
        let mut all = Vec::new();
        let mut offset = 0;
        loop {
            let b = self.block(offset, 4096).expect("block");
            // SAFETY: `ptr..ptr+len` lies inside the live content (block
            // checked it, and `self` keeps it alive); tests never truncate a
            // file before reading it this way, so mapped pages are readable.
            all.extend_from_slice(unsafe { std::slice::from_raw_parts(b.ptr, b.len) });
            offset += b.len as u64;
            if b.len < 4096 {
                return all;
            }
        }
    }

    /// Test-only: preads issued and source bytes read by a netascii
    /// translation so far.
    #[cfg(test)]
    fn reads_for_test(&self) -> (u64, u64) {
        match &self.content {
            Content::Netascii(n) => {
                let t = n.state.borrow();
                (t.preads, t.read_bytes)
            }
            _ => (0, 0),
        }
    }
}
impl FileRoot {
    /// Opens `dir` as the root. Fails if the kernel lacks `openat2` (Linux
    /// 5.6+): without it confinement would be a weaker user-space walk, so
    /// we refuse to start rather than fall back.
    pub fn open(dir: &Path, permissive: bool) -> io::Result<FileRoot> {
        let dir = nix::fcntl::open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| {
            io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", dir.display()))
        })?;
        // Probe openat2 with the flags we will use.
        let probe = OpenHow::new()
            .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
            .resolve(resolve_flags());
        match openat2(dir.as_fd(), c".", probe) {
            Ok(_) => {}
            Err(Errno::ENOSYS) => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "openat2(2) is unavailable (Linux 5.6+ required, or blocked by seccomp); \
                     refusing to serve without kernel-enforced confinement",
                ));
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::Error::from(e).kind(),
                    format!("openat2(2) probe on the root failed: {e}"),
                ));
            }
        }
        Ok(FileRoot {
            inner: Arc::new(RootInner {
                dir,
                permissive,
                cache: Mutex::new(Cache {
                    map: HashMap::new(),
                    prune_at: MIN_PRUNE_AT,
                }),
                mapped: Arc::default(),
            }),
        })
    }

    /// The live mappings' counts (shared with every clone of this root).
    pub fn mapped(&self) -> Arc<MappedCounts> {
        self.inner.mapped.clone()
    }

    /// Number of cached contents still in use by some [`FileData`].
    pub fn live_contents(&self) -> usize {
        self.cache()
            .map
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    }

    fn cache(&self) -> MutexGuard<'_, Cache> {
        // A panic elsewhere while holding the lock leaves the map consistent
        // (each operation is a single insert or retain), so ignore poisoning.
        self.inner.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails unless the current (effective) user may look names up in the
    /// root: checked again after dropping privileges.
    pub fn check_searchable(&self) -> io::Result<()> {
        nix::unistd::faccessat(
            self.inner.dir.as_fd(),
            c".",
            nix::unistd::AccessFlags::X_OK,
            nix::fcntl::AtFlags::AT_EACCESS,
        )
        .map_err(io::Error::from)
    }

    /// Opens `rel` (already checked) with the kernel treating the root as
    /// `/`: an absolute symlink resolves inside the root and `..` stops at
    /// it, so no lookup leaves the tree.
    fn open_in_root(&self, rel: &[u8]) -> Result<File, OpenError> {
        // O_NONBLOCK: a FIFO must not block the shard; O_NOCTTY: a tty in
        // the tree must not become our controlling terminal.
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK | OFlag::O_NOCTTY)
            .resolve(resolve_flags());
        let mut tries = 0;
        loop {
            match openat2(self.inner.dir.as_fd(), rel, how) {
                Ok(fd) => return Ok(File::from(fd)),
                // EAGAIN: a concurrent rename kept the kernel from proving
                // that `..` stayed inside; openat2(2) says retry.
                Err(Errno::EAGAIN | Errno::EINTR) if tries < OPEN_RETRIES => tries += 1,
                Err(e) => return Err(map_open_errno(e)),
            }
        }
    }
}

impl FileRoot {
    /// Whether `filename` names a regular file that a read request could
    /// open (world-readable unless permissive): what a remap rule's `E`
    /// asks. Nothing is mapped or cached.
    pub fn has_file(&self, filename: &[u8]) -> bool {
        let Ok(rel) = relative_name(filename) else {
            return false;
        };
        if rel.is_empty() {
            return false;
        }
        let Ok(file) = self.open_in_root(rel) else {
            return false;
        };
        file.metadata().is_ok_and(|meta| {
            meta.mode() & libc::S_IFMT == libc::S_IFREG
                && (self.inner.permissive || meta.mode() & libc::S_IROTH != 0)
        })
    }

    /// For a write request: the directory `filename` goes in (opened with
    /// the same confinement as reads, so it can be fsync'd) and the name
    /// inside it. A missing directory is not created: ERROR 1.
    pub fn open_upload_dir(&self, filename: &[u8]) -> Result<(OwnedFd, CString), OpenError> {
        let rel = relative_name(filename)?;
        let (parent, name) = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => (&rel[..i], &rel[i + 1..]),
            None => (&b""[..], rel),
        };
        if name.is_empty() || name == b"." {
            return Err(OpenError::NotRegular); // names a directory
        }
        let name = CString::new(name).map_err(|_| OpenError::Denied("NUL in filename"))?;
        let parent: &[u8] = if parent.is_empty() { b"." } else { parent };
        let how = OpenHow::new()
            .flags(OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC)
            .resolve(resolve_flags());
        let mut tries = 0;
        loop {
            match openat2(self.inner.dir.as_fd(), parent, how) {
                Ok(dir) => return Ok((dir, name)),
                Err(Errno::EAGAIN | Errno::EINTR) if tries < OPEN_RETRIES => tries += 1,
                Err(e) => return Err(map_open_errno(e)),
            }
        }
    }
}

fn resolve_flags() -> ResolveFlag {
    ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS
}

fn map_open_errno(e: Errno) -> OpenError {
    match e {
        // EXDEV: the kernel saw an escape (a race); ELOOP: a symlink loop or
        // a magic link.
        Errno::EXDEV => OpenError::Denied("outside the root"),
        Errno::ELOOP => OpenError::Denied("symlink loop or magic link"),
        Errno::ENOENT | Errno::ENOTDIR => OpenError::NotFound,
        Errno::EACCES | Errno::EPERM => OpenError::NotReadable,
        Errno::ENAMETOOLONG => OpenError::Denied("filename too long"),
        // A socket, or a device without a driver.
        Errno::ENXIO | Errno::ENODEV => OpenError::NotRegular,
        e if is_transient(e) => OpenError::Transient(TRANSIENT),
        _ => OpenError::Unservable("cannot open file"),
    }
}

/// The refusal sent for a transient failure (see [`is_transient`]).
pub const TRANSIENT: &str = "server busy, try again later";

/// Errors that say nothing about the file, only about this moment: out of
/// descriptors (EMFILE, ENFILE) or memory (ENOMEM), a signal (EINTR), a
/// race or a lock (EAGAIN, after retrying). A refusal for one of these must
/// not be remembered by an open cache: the same request may succeed a
/// moment later. They are refused as `Transient(TRANSIENT)` (ERROR 0, never cached),
/// and the message is what tells them apart from lasting refusals.
pub fn is_transient(e: Errno) -> bool {
    matches!(
        e,
        Errno::EMFILE | Errno::ENFILE | Errno::ENOMEM | Errno::EINTR | Errno::EAGAIN
    )
}

/// Maps a failure after opening (fstat, mmap, pread): transient as above,
/// otherwise `Unservable(what)`.
fn map_resource_error(what: &'static str) -> impl Fn(io::Error) -> OpenError {
    move |e| match e.raw_os_error().map(Errno::from_raw) {
        Some(errno) if is_transient(errno) => OpenError::Transient(TRANSIENT),
        _ => OpenError::Unservable(what),
    }
}

/// Checks the raw request name and returns it relative to the root.
fn relative_name(filename: &[u8]) -> Result<&[u8], OpenError> {
    if filename.is_empty() {
        return Err(OpenError::Denied("empty filename"));
    }
    if filename.len() > MAX_FILENAME_LEN {
        return Err(OpenError::Denied("filename too long"));
    }
    if filename.contains(&0) {
        return Err(OpenError::Denied("NUL in filename"));
    }
    // Leading slashes name the root, as with tftpd-hpa -s.
    let start = filename
        .iter()
        .position(|&b| b != b'/')
        .unwrap_or(filename.len());
    let rel = &filename[start..];
    // `..` is refused outright, although the kernel would only stop it at
    // the root (stricter than tftpd-hpa -s, which relies on its chroot).
    if rel.split(|&b| b == b'/').any(|c| c == b"..") {
        return Err(OpenError::Denied("'..' in filename"));
    }
    Ok(rel)
}

fn build_mapped(file: File, stamp: Stamp, counts: &Arc<MappedCounts>) -> Result<Mapped, OpenError> {
    let len = usize::try_from(stamp.size).map_err(|_| OpenError::Unservable("file too large"))?;
    // map_raw_read_only never hands out references, so no unsafe: we only
    // ever pass raw pointers to the kernel.
    let map = MmapOptions::new()
        .len(len)
        .map_raw_read_only(&file)
        .map_err(map_resource_error("cannot map file"))?;
    // Start reading the head of a cold file now, asynchronously, rather
    // than one page fault at a time in the shard's sends. No
    // MADV_SEQUENTIAL: it lets the kernel drop pages behind the reader, and
    // a boot file is read by thousands of clients. A failed advice costs
    // only speed.
    let _ = map.advise_range(Advice::WillNeed, 0, len.min(PREFETCH_BYTES));
    counts.files.fetch_add(1, Ordering::Relaxed);
    counts.bytes.fetch_add(map.len() as u64, Ordering::Relaxed);
    Ok(Mapped {
        map,
        file,
        stamp,
        counts: counts.clone(),
    })
}

impl Source for FileRoot {
    type Handle = FileData;

    fn open_read(&mut self, filename: &[u8], mode: Mode) -> Result<(FileData, u64), OpenError> {
        self.open_file(filename, mode)
    }

    fn held_bytes(handle: &FileData, _len: u64) -> u64 {
        handle.held_bytes()
    }
}

impl FileRoot {
    /// [`Source::open_read`] through a shared reference (a shard holding
    /// several roots picks one).
    pub fn open_file(&self, filename: &[u8], mode: Mode) -> Result<(FileData, u64), OpenError> {
        let rel = relative_name(filename)?;
        if rel.is_empty() {
            return Err(OpenError::NotRegular); // the root directory itself
        }
        let file = self.open_in_root(rel)?;
        let meta = file
            .metadata()
            .map_err(map_resource_error("cannot stat file"))?;
        if meta.mode() & libc::S_IFMT != libc::S_IFREG {
            return Err(OpenError::NotRegular);
        }
        if !self.inner.permissive && meta.mode() & libc::S_IROTH == 0 {
            return Err(OpenError::NotReadable);
        }
        let stamp = Stamp::of(&meta);
        if stamp.size == 0 {
            return Ok((
                FileData {
                    content: Content::Empty,
                },
                0,
            ));
        }
        if mode == Mode::Netascii {
            if stamp.size > MAX_NETASCII_SOURCE {
                return Err(OpenError::Unservable("file too large for netascii"));
            }
            // Translated as it is sent: nothing read yet, length unknown.
            let content = Content::Netascii(Rc::new(Netascii::new(file, stamp)?));
            return Ok((FileData { content }, LEN_UNKNOWN));
        }
        let key = Key {
            dev: meta.dev(),
            ino: meta.ino(),
            size: stamp.size,
            mtime: stamp.mtime,
            ctime: stamp.ctime,
        };
        // Bound first: a guard in the match scrutinee would live through
        // the arms, which lock again.
        let cached = self.cache().get(&key);
        let mapped = match cached {
            Some(mapped) => mapped,
            None => {
                // Mapped outside the lock; another shard may have mapped the
                // same file meanwhile: share that one.
                let mapped = Arc::new(build_mapped(file, stamp, &self.inner.mapped)?);
                let mut cache = self.cache();
                match cache.get(&key) {
                    Some(existing) => existing,
                    None => {
                        cache.insert(key, &mapped);
                        mapped
                    }
                }
            }
        };
        let data = FileData {
            content: Content::Mapped(mapped),
        };
        let len = data.len();
        Ok((data, len))
    }
}

impl Sink for FileRoot {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::netascii::{NETASCII_CHUNK, netascii_encode};
    use std::fs;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::time::Duration;

    struct Fixture {
        _outer: tempfile::TempDir,
        root_dir: std::path::PathBuf,
        outside: std::path::PathBuf,
    }

    /// `outer/root` is the served root; `outer/secret` lies outside it.
    fn fixture() -> Fixture {
        let outer = tempfile::tempdir().expect("tempdir");
        let root_dir = outer.path().join("root");
        fs::create_dir(&root_dir).expect("mkdir root");
        let outside = outer.path().join("secret");
        write_file(&outside, b"secret\n");
        Fixture {
            _outer: outer,
            root_dir,
            outside,
        }
    }

    fn write_file(path: &Path, bytes: &[u8]) {
        fs::write(path, bytes).expect("write");
        fs::set_permissions(path, fs::Permissions::from_mode(0o644)).expect("chmod");
    }

    fn root(f: &Fixture, permissive: bool) -> FileRoot {
        FileRoot::open(&f.root_dir, permissive).expect("open root")
    }

    fn open(r: &mut FileRoot, name: &[u8], mode: Mode) -> Result<FileData, OpenError> {
        r.open_read(name, mode).map(|(d, len)| {
            assert_eq!(len, d.len(), "returned length matches the handle");
            d
        })
    }

    #[test]
    fn has_file_answers_what_a_read_could_open() {
        let f = fixture();
        write_file(&f.root_dir.join("a.bin"), b"a");
        fs::create_dir(f.root_dir.join("dir")).expect("mkdir");
        let private = f.root_dir.join("private");
        write_file(&private, b"p");
        fs::set_permissions(&private, fs::Permissions::from_mode(0o600)).expect("chmod");
        symlink(&f.outside, f.root_dir.join("escape")).expect("symlink");
        let r = root(&f, false);
        assert!(r.has_file(b"a.bin"));
        assert!(r.has_file(b"/a.bin"), "a leading slash names the root");
        for name in [
            &b"missing"[..],
            b"dir",
            b"",
            b"/",
            b"private",
            b"escape",
            b"../secret",
        ] {
            assert!(!r.has_file(name), "{:?}", String::from_utf8_lossy(name));
        }
        assert!(root(&f, true).has_file(b"private"), "permissive serves it");
    }

    #[test]
    fn octet_open_gives_len_and_pointers_over_the_content() {
        let f = fixture();
        let body: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        write_file(&f.root_dir.join("a.bin"), &body);
        let mut r = root(&f, false);
        let d = open(&mut r, b"a.bin", Mode::Octet).expect("open");
        assert_eq!(d.len(), body.len() as u64);
        assert!(!d.is_empty());
        assert_eq!(d.read_all_for_test(), body);
        let (p0, n0) = d.range_ptr(0, 512).expect("first block");
        let (p1, n1) = d.range_ptr(512, 512).expect("second block");
        assert_eq!((n0, n1), (512, 512));
        assert_eq!(p1 as usize - p0 as usize, 512);
        // SAFETY: inside the live mapping; the file is not truncated.
        let block = unsafe { std::slice::from_raw_parts(p1, n1) };
        assert_eq!(block, &body[512..1024]);
        assert!(d.range_ptr(9_999, 1).is_some());
        assert_eq!(d.range_ptr(10_000, 0).map(|(_, n)| n), Some(0));
        assert!(d.range_ptr(9_999, 2).is_none());
        assert!(d.range_ptr(10_001, 0).is_none());
        assert!(d.range_ptr(u64::MAX, 1).is_none());
        assert!(d.range_ptr(1, usize::MAX).is_none());
    }

    #[test]
    fn netascii_open_translates_and_reports_translated_len() {
        let f = fixture();
        write_file(&f.root_dir.join("t.txt"), b"one\ntwo\r\nthree\r");
        write_file(&f.root_dir.join("empty.txt"), b"");
        let mut r = root(&f, false);
        let d = open(&mut r, b"t.txt", Mode::Netascii).expect("open");
        let want = b"one\r\ntwo\r\0\r\nthree\r\0";
        // Translated as sent: the length is known at the end only.
        assert_eq!(d.len(), LEN_UNKNOWN);
        assert_eq!(d.read_all_for_test(), want);
        assert_eq!(d.len(), want.len() as u64);
        // The octet view of the same file is the raw bytes, a separate entry.
        let o = open(&mut r, b"t.txt", Mode::Octet).expect("open octet");
        assert_eq!(o.read_all_for_test(), b"one\ntwo\r\nthree\r");
        assert!(!o.same_content(&d));
        let e = open(&mut r, b"empty.txt", Mode::Netascii).expect("open empty");
        assert_eq!(e.len(), 0);
        assert!(e.is_empty());
    }

    /// The open cache charges a translation the most it can grow to, not
    /// the nothing it holds at open.
    #[test]
    fn netascii_is_charged_its_bound() {
        let f = fixture();
        write_file(&f.root_dir.join("t.txt"), &[b'\n'; 1000]);
        let mut r = root(&f, false);
        let (d, len) = r.open_read(b"t.txt", Mode::Netascii).expect("open");
        assert_eq!(FileRoot::held_bytes(&d, len), 2000);
        let (o, len) = r.open_read(b"t.txt", Mode::Octet).expect("open");
        assert_eq!(FileRoot::held_bytes(&o, len), 1000);
    }

    /// Clones (the endpoint's open cache hands them to the sessions of a
    /// shard) share one translation: what one translated, the other reuses.
    #[test]
    fn netascii_clones_share_one_translation() {
        let f = fixture();
        write_file(&f.root_dir.join("t.txt"), &b"a\nb\n".repeat(100_000));
        let mut r = root(&f, false);
        let a = open(&mut r, b"t.txt", Mode::Netascii).expect("open");
        let b = a.clone();
        assert!(a.same_content(&b));
        let all = a.read_all_for_test();
        let reads = a.reads_for_test();
        assert_eq!(b.read_all_for_test(), all);
        assert_eq!(b.reads_for_test(), reads, "the clone read nothing again");
        assert_eq!(b.len(), all.len() as u64);
        // A fresh open is a translation of its own.
        let c = open(&mut r, b"t.txt", Mode::Netascii).expect("open");
        assert!(!c.same_content(&a));
    }

    #[test]
    fn netascii_over_cap_is_unservable() {
        let f = fixture();
        let path = f.root_dir.join("big.txt");
        write_file(&path, b"");
        // Sparse: no 64 MiB written.
        File::options()
            .write(true)
            .open(&path)
            .and_then(|h| h.set_len(MAX_NETASCII_SOURCE + 1))
            .expect("extend");
        let mut r = root(&f, false);
        assert_eq!(
            open(&mut r, b"big.txt", Mode::Netascii).err(),
            Some(OpenError::Unservable("file too large for netascii"))
        );
        // Octet is not capped.
        let d = open(&mut r, b"big.txt", Mode::Octet).expect("octet");
        assert_eq!(d.len(), MAX_NETASCII_SOURCE + 1);
    }

    #[test]
    fn missing_and_non_regular() {
        let f = fixture();
        fs::create_dir(f.root_dir.join("sub")).expect("mkdir");
        write_file(&f.root_dir.join("sub/file"), b"x");
        let mut r = root(&f, false);
        assert_eq!(
            open(&mut r, b"nope", Mode::Octet).err(),
            Some(OpenError::NotFound)
        );
        assert_eq!(
            open(&mut r, b"sub/nope", Mode::Octet).err(),
            Some(OpenError::NotFound)
        );
        // A file used as a directory: ENOTDIR.
        assert_eq!(
            open(&mut r, b"sub/file/x", Mode::Octet).err(),
            Some(OpenError::NotFound)
        );
        assert_eq!(
            open(&mut r, b"sub", Mode::Octet).err(),
            Some(OpenError::NotRegular)
        );
        assert_eq!(
            open(&mut r, b"/", Mode::Octet).err(),
            Some(OpenError::NotRegular)
        );
    }

    #[test]
    fn world_readable_required_unless_permissive() {
        let f = fixture();
        let path = f.root_dir.join("private");
        write_file(&path, b"private");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).expect("chmod");
        let mut strict = root(&f, false);
        assert_eq!(
            open(&mut strict, b"private", Mode::Octet).err(),
            Some(OpenError::NotReadable)
        );
        let mut permissive = root(&f, true);
        let d = open(&mut permissive, b"private", Mode::Octet).expect("permissive");
        assert_eq!(d.read_all_for_test(), b"private");
    }

    #[test]
    fn bad_names_are_denied() {
        let f = fixture();
        write_file(&f.root_dir.join("ok"), b"ok");
        let mut r = root(&f, false);
        let denied = |r: &mut FileRoot, name: &[u8]| {
            matches!(open(r, name, Mode::Octet), Err(OpenError::Denied(_)))
        };
        assert!(denied(&mut r, b""));
        assert!(denied(&mut r, b"ok\0"));
        assert!(denied(&mut r, b"../secret"));
        assert!(denied(&mut r, b"/../secret"));
        assert!(denied(&mut r, b"a/../ok"));
        assert!(denied(&mut r, b".."));
        let long = vec![b'a'; MAX_FILENAME_LEN + 1];
        assert!(denied(&mut r, &long));
        // One component over NAME_MAX: the kernel's ENAMETOOLONG.
        let long_component = vec![b'a'; 300];
        assert!(denied(&mut r, &long_component));
        // `...` and `..x` are ordinary names.
        assert_eq!(
            open(&mut r, b"...", Mode::Octet).err(),
            Some(OpenError::NotFound)
        );
        assert_eq!(
            open(&mut r, b"..x", Mode::Octet).err(),
            Some(OpenError::NotFound)
        );
    }

    #[test]
    fn leading_slashes_name_the_root() {
        let f = fixture();
        fs::create_dir(f.root_dir.join("boot")).expect("mkdir");
        write_file(&f.root_dir.join("boot/pxelinux.0"), b"pxe");
        let mut r = root(&f, false);
        for name in [
            &b"/boot/pxelinux.0"[..],
            b"///boot//pxelinux.0",
            b"./boot/pxelinux.0",
        ] {
            let d = open(&mut r, name, Mode::Octet).expect("served");
            assert_eq!(d.read_all_for_test(), b"pxe");
        }
    }

    #[test]
    fn symlinks_resolve_inside_the_root_as_under_chroot() {
        let f = fixture();
        write_file(&f.root_dir.join("real"), b"real");
        fs::create_dir(f.root_dir.join("d")).expect("mkdir");
        symlink(&f.outside, f.root_dir.join("abs")).expect("symlink");
        symlink("../secret", f.root_dir.join("rel")).expect("symlink");
        symlink("../../secret", f.root_dir.join("d/deep")).expect("symlink");
        symlink("/proc/self/root/etc/passwd", f.root_dir.join("magic")).expect("symlink");
        symlink("../real", f.root_dir.join("d/inside")).expect("symlink");
        symlink("d", f.root_dir.join("dirlink")).expect("symlink");
        // Absolute as seen from inside the root, as tftpd-hpa -s resolves it.
        symlink("/real", f.root_dir.join("chroot_abs")).expect("symlink");
        symlink("/d/inside", f.root_dir.join("d/chained")).expect("symlink");
        let mut r = root(&f, false);
        // Every way out lands inside the root, where there is no such file:
        // the outside file is never reached.
        for name in [&b"abs"[..], b"rel", b"d/deep", b"magic"] {
            assert_eq!(
                open(&mut r, name, Mode::Octet).err(),
                Some(OpenError::NotFound),
                "{}",
                String::from_utf8_lossy(name)
            );
        }
        for name in [
            &b"d/inside"[..],
            b"dirlink/inside",
            b"chroot_abs",
            b"d/chained",
        ] {
            let d = open(&mut r, name, Mode::Octet)
                .unwrap_or_else(|e| panic!("{}: {e:?}", String::from_utf8_lossy(name)));
            assert_eq!(d.read_all_for_test(), b"real");
        }
        // With a `secret` inside the root too, the escaping links find that
        // one: `..` stops at the root.
        write_file(&f.root_dir.join("secret"), b"inside\n");
        let mut r = root(&f, false);
        for name in [&b"rel"[..], b"d/deep"] {
            let d = open(&mut r, name, Mode::Octet).expect("inside");
            assert_eq!(d.read_all_for_test(), b"inside\n");
        }
    }

    /// Magic links (/proc/<pid>/root, fd links) are refused even where
    /// the root contains /proc: here the root is `/` itself.
    #[test]
    fn magic_links_are_refused() {
        let mut r = FileRoot::open(Path::new("/"), true).expect("open /");
        for name in [&b"proc/self/root/etc/hostname"[..], b"proc/self/exe"] {
            assert_eq!(
                open(&mut r, name, Mode::Octet).err(),
                Some(OpenError::Denied("symlink loop or magic link")),
                "{}",
                String::from_utf8_lossy(name)
            );
        }
    }

    #[test]
    fn fifo_is_not_regular_and_does_not_block() {
        let f = fixture();
        nix::unistd::mkfifo(
            &f.root_dir.join("fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .expect("mkfifo");
        let mut r = root(&f, false);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(open(&mut r, b"fifo", Mode::Octet).err());
        });
        let got = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("open of a FIFO blocked");
        assert_eq!(got, Some(OpenError::NotRegular));
    }

    #[test]
    fn same_file_shares_one_mapping_until_dropped() {
        let f = fixture();
        write_file(&f.root_dir.join("pxelinux.0"), &[7u8; 4096]);
        let mut r = root(&f, false);
        let mut r2 = r.clone(); // another shard
        let a = open(&mut r, b"pxelinux.0", Mode::Octet).expect("open");
        let b = open(&mut r2, b"/pxelinux.0", Mode::Octet).expect("open");
        assert!(a.same_content(&b));
        assert_eq!(r.live_contents(), 1);
        // The metrics' gauges: one mapping, counted once for both shards.
        assert_eq!(r2.mapped().read(), (1, 4096));
        let c = b.clone();
        drop(a);
        drop(b);
        assert_eq!(r.live_contents(), 1);
        drop(c);
        assert_eq!(r.live_contents(), 0);
        assert_eq!(r.mapped().read(), (0, 0));
        // Reopening builds a fresh mapping with the same bytes.
        let d = open(&mut r, b"pxelinux.0", Mode::Octet).expect("reopen");
        assert_eq!(d.read_all_for_test(), vec![7u8; 4096]);
        assert_eq!(r.live_contents(), 1);
    }

    #[test]
    fn modified_or_replaced_file_gets_a_new_mapping() {
        let f = fixture();
        let path = f.root_dir.join("f");
        write_file(&path, b"version one");
        let mut r = root(&f, false);
        let old = open(&mut r, b"f", Mode::Octet).expect("open");
        // Grow in place: new size, so a new key.
        {
            use std::io::Write;
            let mut h = File::options().append(true).open(&path).expect("append");
            h.write_all(b" plus").expect("write");
        }
        let grown = open(&mut r, b"f", Mode::Octet).expect("reopen");
        assert!(!grown.same_content(&old));
        assert_eq!(grown.read_all_for_test(), b"version one plus");
        assert_eq!(old.len(), 11);
        assert_eq!(old.read_all_for_test(), b"version one");
        // Replace by rename: new inode; the old mapping keeps the old bytes.
        let tmp = f.root_dir.join(".f.tmp");
        write_file(&tmp, b"version two, longer");
        fs::rename(&tmp, &path).expect("rename");
        let replaced = open(&mut r, b"f", Mode::Octet).expect("reopen");
        assert!(!replaced.same_content(&grown));
        assert_eq!(replaced.read_all_for_test(), b"version two, longer");
        assert_eq!(grown.read_all_for_test(), b"version one plus");
    }

    #[test]
    fn zero_length_file() {
        let f = fixture();
        write_file(&f.root_dir.join("empty"), b"");
        let mut r = root(&f, false);
        let d = open(&mut r, b"empty", Mode::Octet).expect("open");
        assert_eq!(d.len(), 0);
        assert!(d.is_empty());
        assert_eq!(d.range_ptr(0, 0).map(|(_, n)| n), Some(0));
        assert!(d.range_ptr(0, 1).is_none());
        assert!(d.read_all_for_test().is_empty());
    }

    #[test]
    fn truncated_mapping_fails_the_kernel_copy_without_sigbus() {
        let f = fixture();
        let path = f.root_dir.join("shrinks");
        write_file(&path, &[1u8; 8192]);
        let mut r = root(&f, false);
        let d = open(&mut r, b"shrinks", Mode::Octet).expect("open");
        File::options()
            .write(true)
            .open(&path)
            .and_then(|h| h.set_len(0))
            .expect("truncate");
        let (p, n) = d.range_ptr(4096, 4096).expect("range");
        let (rd, wr) = nix::unistd::pipe().expect("pipe");
        // SAFETY: `p..p+n` is inside our live mapping; write(2) only reads it
        // in the kernel, where a fault beyond EOF becomes EFAULT, not SIGBUS.
        let rc = unsafe { libc::write(std::os::fd::AsRawFd::as_raw_fd(&wr), p.cast(), n) };
        assert_eq!(rc, -1);
        assert_eq!(Errno::last(), Errno::EFAULT);
        drop((rd, wr));
    }

    #[test]
    fn cache_prunes_dead_entries() {
        let f = fixture();
        let mut r = root(&f, false);
        for i in 0..(MIN_PRUNE_AT * 3) {
            let name = format!("f{i}");
            write_file(&f.root_dir.join(&name), b"x");
            let _ = open(&mut r, name.as_bytes(), Mode::Octet).expect("open");
        }
        let entries = r.cache().map.len();
        assert!(entries <= MIN_PRUNE_AT, "cache kept {entries} dead entries");
        assert_eq!(r.live_contents(), 0);
    }

    #[test]
    fn missing_root_is_an_error() {
        let f = fixture();
        assert!(FileRoot::open(&f.root_dir.join("nope"), false).is_err());
        assert!(
            FileRoot::open(&f.outside, false).is_err(),
            "a file is not a root"
        );
    }

    /// Rewrites `path` in place as `cp` does: truncate, then write.
    fn rewrite_in_place(path: &Path, bytes: &[u8]) {
        use std::io::Write;
        let mut h = File::options()
            .write(true)
            .truncate(true)
            .open(path)
            .expect("open for rewrite");
        h.write_all(bytes).expect("rewrite");
    }

    /// Timestamps may be as coarse as a kernel tick (before multigrain
    /// timestamps): let one pass, so a change shows in mtime and ctime.
    fn next_tick() {
        std::thread::sleep(Duration::from_millis(20));
    }

    #[test]
    fn rewrite_in_place_is_a_change_but_replacing_by_rename_is_not() {
        let f = fixture();
        let path = f.root_dir.join("boot.img");
        write_file(&path, &[1u8; 5000]);
        let mut r = root(&f, false);
        let d = open(&mut r, b"boot.img", Mode::Octet).expect("open");
        let text = open(&mut r, b"boot.img", Mode::Netascii).expect("open netascii");
        assert!(!d.changed_since_open());
        // A hard link moves ctime, not the bytes.
        next_tick();
        fs::hard_link(&path, f.root_dir.join("link")).expect("link");
        assert!(!d.changed_since_open(), "a new link is no change");
        // Same length, other bytes: caught by mtime (the size is the same).
        next_tick();
        rewrite_in_place(&path, &[2u8; 5000]);
        assert!(d.changed_since_open(), "rewritten in place");
        // Netascii reads the file as it goes: the same check applies.
        assert!(text.changed_since_open());
        assert_eq!(text.block(0, 5000).err(), Some(BlockError::Changed));

        // `cp -p`: rewritten, then the old mtime set back; ctime shows it.
        let p2 = f.root_dir.join("kernel");
        write_file(&p2, &[3u8; 4096]);
        let mtime = fs::metadata(&p2).and_then(|m| m.modified()).expect("mtime");
        let k = open(&mut r, b"kernel", Mode::Octet).expect("open");
        next_tick();
        rewrite_in_place(&p2, &[4u8; 4096]);
        File::options()
            .write(true)
            .open(&p2)
            .and_then(|h| h.set_modified(mtime))
            .expect("set mtime back");
        assert_eq!(
            fs::metadata(&p2).and_then(|m| m.modified()).ok(),
            Some(mtime)
        );
        assert!(k.changed_since_open(), "mtime restored, ctime moved");

        // Truncated: the size differs.
        let p3 = f.root_dir.join("initrd");
        write_file(&p3, &[5u8; 4096]);
        let t = open(&mut r, b"initrd", Mode::Octet).expect("open");
        File::options()
            .write(true)
            .open(&p3)
            .and_then(|h| h.set_len(100))
            .expect("truncate");
        assert!(t.changed_since_open(), "truncated");

        // Replaced by rename, or deleted: the old inode's bytes stay, and
        // so does its snapshot (its ctime moves with its last link).
        let p4 = f.root_dir.join("pxelinux.0");
        write_file(&p4, &[6u8; 3000]);
        let old = open(&mut r, b"pxelinux.0", Mode::Octet).expect("open");
        next_tick();
        let tmp = f.root_dir.join(".pxelinux.0.new");
        write_file(&tmp, &[7u8; 3000]);
        fs::rename(&tmp, &p4).expect("rename");
        assert!(!old.changed_since_open(), "replaced by rename");
        assert_eq!(old.read_all_for_test(), vec![6u8; 3000]);
        let new = open(&mut r, b"pxelinux.0", Mode::Octet).expect("reopen");
        assert_eq!(new.read_all_for_test(), vec![7u8; 3000]);
        next_tick();
        fs::remove_file(&p4).expect("unlink");
        assert!(!new.changed_since_open(), "deleted");

        // An empty file has nothing mapped: a snapshot too.
        let p5 = f.root_dir.join("empty");
        write_file(&p5, b"");
        let e = open(&mut r, b"empty", Mode::Octet).expect("open");
        next_tick();
        rewrite_in_place(&p5, b"now with bytes");
        assert!(!e.changed_since_open());
    }

    #[test]
    fn transient_errors_are_told_apart_from_refusals() {
        for e in [
            Errno::EMFILE,
            Errno::ENFILE,
            Errno::ENOMEM,
            Errno::EINTR,
            Errno::EAGAIN,
        ] {
            assert!(is_transient(e), "{e}");
            assert_eq!(map_open_errno(e), OpenError::Transient(TRANSIENT), "{e}");
            let io = io::Error::from_raw_os_error(e as i32);
            assert_eq!(
                map_resource_error("cannot map file")(io),
                OpenError::Transient(TRANSIENT)
            );
        }
        for e in [Errno::ENOENT, Errno::EACCES, Errno::EIO, Errno::ELOOP] {
            assert!(!is_transient(e), "{e}");
            assert_ne!(map_open_errno(e), OpenError::Transient(TRANSIENT), "{e}");
        }
        assert_eq!(
            map_resource_error("cannot map file")(io::Error::from_raw_os_error(libc::ENODEV)),
            OpenError::Unservable("cannot map file")
        );
    }

    /// How many of the first `pages` pages of `map` are in the page cache.
    fn resident_pages(map: &MmapRaw, pages: usize) -> usize {
        let mut vec = vec![0u8; pages];
        // SAFETY: the range is inside the live mapping (page-aligned start);
        // mincore only reads the page tables and writes `pages` bytes.
        let rc = unsafe { libc::mincore(map.as_mut_ptr().cast(), pages * 4096, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    #[test]
    fn a_new_mapping_is_prefetched() {
        let f = fixture();
        let path = f.root_dir.join("cold.img");
        let len = 4 << 20;
        write_file(&path, &vec![9u8; len]);
        // Make it cold: written back, then its pages dropped.
        let h = File::open(&path).expect("open");
        h.sync_all().expect("fsync");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&h);
        // SAFETY: plain syscall on our own descriptor.
        let rc = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        let pages = len / 4096;
        // A mapping of our own, never advised nor touched: is the file cold?
        let probe = MmapOptions::new()
            .len(len)
            .map_raw_read_only(&h)
            .expect("probe map");
        if resident_pages(&probe, pages) > pages / 8 {
            eprintln!("SKIP: the page cache keeps this file (tmpfs?)");
            return;
        }
        let mut r = root(&f, false);
        let d = open(&mut r, b"cold.img", Mode::Octet).expect("open");
        let Content::Mapped(m) = &d.content else {
            panic!("not mapped");
        };
        let map = &m.map;
        // Readahead is asynchronous: give it a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut resident = resident_pages(map, pages);
        while resident < pages && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            resident = resident_pages(map, pages);
        }
        assert_eq!(resident, pages, "pages resident after open, of {pages}");
    }

    /// Text-like bytes with many LF and CR (`seed` varies the mix).
    fn text(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                match x % 16 {
                    0 => b'\n',
                    1 => b'\r',
                    _ => b'a' + (x % 26) as u8,
                }
            })
            .collect()
    }

    /// Reads `d` block by block as the shard does for a session, checking
    /// that the end is known by the block that reaches it; returns the bytes
    /// and the number of blocks (the last one short, possibly empty).
    fn read_blocks(d: &FileData, blksize: usize) -> (Vec<u8>, u64) {
        let mut all = Vec::new();
        let mut blocks = 0;
        loop {
            let offset = all.len() as u64;
            let b = d.block(offset, blksize).expect("block");
            blocks += 1;
            // SAFETY: inside the live translation (block checked it).
            all.extend_from_slice(unsafe { std::slice::from_raw_parts(b.ptr, b.len) });
            if b.len < blksize {
                assert_eq!(b.end, Some(all.len() as u64), "a short block is the last");
                return (all, blocks);
            }
            if b.end == Some(all.len() as u64) {
                // Full and reaching the end: an empty block follows.
                assert_eq!(d.len(), all.len() as u64);
            } else if b.end.is_none() {
                assert_eq!(d.len(), LEN_UNKNOWN);
            }
        }
    }

    #[test]
    fn lazy_netascii_equals_netascii_encode_for_many_sizes_and_blksizes() {
        let f = fixture();
        let mut r = root(&f, false);
        let c = NETASCII_CHUNK;
        let sizes = [
            1,
            7,
            511,
            512,
            513,
            4096,
            c - 1,
            c,
            c + 1,
            2 * c + 333,
            3 * c,
        ];
        for (i, &size) in sizes.iter().enumerate() {
            let src = text(size, i as u32);
            let want = netascii_encode(&src);
            write_file(&f.root_dir.join("t"), &src);
            for blksize in [8, 512, 1428, 8192, 65464] {
                let d = open(&mut r, b"t", Mode::Netascii).expect("open");
                let (got, blocks) = read_blocks(&d, blksize);
                assert!(got == want, "size {size} blksize {blksize}");
                assert_eq!(blocks, want.len() as u64 / blksize as u64 + 1);
            }
        }
    }

    /// Translated lengths that are exact multiples of blksize end with an
    /// empty block, which the reader learns is the last.
    #[test]
    fn lazy_netascii_exact_multiple_of_blksize_ends_with_an_empty_block() {
        let f = fixture();
        let mut r = root(&f, false);
        // 'x' and "\n" (2 bytes out): translated lengths of k × blksize,
        // below, at and across chunk boundaries.
        for (src, blksize) in [
            (b"x".repeat(512), 512),
            (b"\n".repeat(256), 512),
            (b"abc\n".repeat(NETASCII_CHUNK / 4 * 3), 1280),
            (b"x".repeat(NETASCII_CHUNK * 2), 512),
            (b"\r".repeat(NETASCII_CHUNK), 65_536),
        ] {
            let want = netascii_encode(&src);
            assert_eq!(want.len() % blksize, 0);
            write_file(&f.root_dir.join("m"), &src);
            let d = open(&mut r, b"m", Mode::Netascii).expect("open");
            let (got, blocks) = read_blocks(&d, blksize);
            assert!(got == want);
            assert_eq!(
                blocks,
                (want.len() / blksize) as u64 + 1,
                "empty last block"
            );
            let last = d.block(want.len() as u64, blksize).expect("empty block");
            assert_eq!((last.len, last.end), (0, Some(want.len() as u64)));
        }
    }

    #[test]
    fn lazy_netascii_cr_and_lf_at_chunk_boundaries() {
        let f = fixture();
        let mut r = root(&f, false);
        let c = NETASCII_CHUNK;
        let mut src = vec![b'y'; 3 * c + 10];
        // CR LF split across the first boundary, a lone CR ending the
        // second chunk, LF starting the third, CR as the last byte.
        src[c - 1] = b'\r';
        src[c] = b'\n';
        src[2 * c - 1] = b'\r';
        src[2 * c] = b'\n';
        src[2 * c + 1] = b'\r';
        *src.last_mut().expect("bytes") = b'\r';
        write_file(&f.root_dir.join("crlf"), &src);
        for blksize in [512, 1000, 65464] {
            let d = open(&mut r, b"crlf", Mode::Netascii).expect("open");
            assert!(read_blocks(&d, blksize).0 == netascii_encode(&src));
        }
    }

    /// The work bound: opening reads nothing, and no block reads more than
    /// one chunk of source in one pread.
    #[test]
    fn lazy_netascii_reads_at_most_one_chunk_per_block() {
        let f = fixture();
        let mut r = root(&f, false);
        let src = text(4 << 20, 9);
        write_file(&f.root_dir.join("big.txt"), &src);
        for blksize in [512, 65464] {
            let d = open(&mut r, b"big.txt", Mode::Netascii).expect("open");
            assert_eq!(d.reads_for_test(), (0, 0), "open reads nothing");
            let first = d.block(0, blksize).expect("block 1");
            let mut offset = 0u64;
            let mut before = (0, 0);
            let mut steps = 0;
            loop {
                let b = d.block(offset, blksize).expect("block");
                // The translation never moves: sends in flight keep pointing
                // into it.
                assert_eq!(b.ptr, first.ptr.wrapping_add(offset as usize));
                let now = d.reads_for_test();
                let (calls, bytes) = (now.0 - before.0, now.1 - before.1);
                assert!(calls <= 1, "block at {offset}: {calls} preads");
                assert!(
                    bytes <= NETASCII_CHUNK as u64,
                    "block at {offset}: {bytes} bytes read"
                );
                steps += u64::from(calls > 0);
                before = now;
                offset += b.len as u64;
                if b.len < blksize {
                    break;
                }
            }
            assert_eq!(before.1, src.len() as u64, "each byte read once");
            assert_eq!(steps, (src.len() as u64).div_ceil(NETASCII_CHUNK as u64));
        }
    }

    #[test]
    fn lazy_netascii_file_changed_under_the_transfer_fails_its_last_block() {
        let f = fixture();
        let path = f.root_dir.join("notes.txt");
        let src = text(3 * NETASCII_CHUNK, 4);
        let mut r = root(&f, false);
        // Rewritten in place, same length: the final block is refused.
        write_file(&path, &src);
        let d = open(&mut r, b"notes.txt", Mode::Netascii).expect("open");
        d.block(0, 512).expect("first block");
        next_tick();
        rewrite_in_place(&path, &text(src.len(), 5));
        let mut offset = 0;
        let err = loop {
            match d.block(offset, 512) {
                Ok(b) if b.len == 512 => offset += 512,
                Ok(b) => panic!("final block of {} bytes served", b.len),
                Err(e) => break e,
            }
        };
        assert_eq!(err, BlockError::Changed);
        // Truncated: the translation runs out of source early.
        write_file(&path, &src);
        let d = open(&mut r, b"notes.txt", Mode::Netascii).expect("open");
        d.block(0, 512).expect("first block");
        File::options()
            .write(true)
            .open(&path)
            .and_then(|h| h.set_len(NETASCII_CHUNK as u64 + 10))
            .expect("truncate");
        let at = 2 * NETASCII_CHUNK as u64;
        assert_eq!(d.block(at, 512).err(), Some(BlockError::Changed));
        assert_eq!(d.block(at, 512).err(), Some(BlockError::Changed), "sticky");
    }

    #[test]
    fn lazy_netascii_read_error_fails_the_block() {
        let f = fixture();
        write_file(&f.root_dir.join("t"), b"x");
        let meta = fs::metadata(f.root_dir.join("t")).expect("stat");
        // pread on a directory fails (EISDIR): a read error mid-transfer.
        let dir = File::open(&f.root_dir).expect("open dir");
        let n = Netascii::new(dir, Stamp::of(&meta)).expect("netascii");
        let d = FileData {
            content: Content::Netascii(Rc::new(n)),
        };
        assert_eq!(d.block(0, 512).err(), Some(BlockError::Read));
        assert_eq!(d.block(0, 512).err(), Some(BlockError::Read), "sticky");
    }

    /// A transfer started without knowing the length learns it from the
    /// blocks, as the shard tells it, and ends after the right block,
    /// the empty one included.
    #[test]
    fn session_learns_the_netascii_end_from_the_blocks() {
        use crate::proto::{Options, Packet};
        use crate::session::{self, Limits, Outcome, Transfer};
        let f = fixture();
        let mut r = root(&f, false);
        let limits = Limits::default();
        for (src, blksize, window) in [
            (text(700_000, 3), 512u16, 1u16),
            (b"x".repeat(512 * 3), 512, 1),
            (b"line\n".repeat(100_000), 1024, 4),
            (b"\n".repeat(NETASCII_CHUNK), 8192, 8),
        ] {
            write_file(&f.root_dir.join("s"), &src);
            let (d, len) = r.open_read(b"s", Mode::Netascii).expect("open");
            assert_eq!(len, LEN_UNKNOWN);
            let asked = Options {
                blksize: Some(u32::from(blksize)),
                windowsize: Some(u32::from(window)),
                tsize: Some(0),
                ..Options::default()
            };
            let mut max = limits.clone();
            max.max_windowsize = window;
            let neg = session::negotiate(&asked, len, None, false, &max);
            let oack = neg.oack.expect("oack");
            assert_eq!(oack.tsize, None, "no tsize for netascii (as tftpd-hpa)");
            let now = std::time::Instant::now();
            let mut t = Transfer::new_read(now, &neg, len, &max);
            let mut buf = vec![0u8; 70_000];
            let mut ack = [0u8; 4];
            let _ = t.poll_transmit(now, &mut buf).expect("OACK");
            let n = Packet::Ack { block: 0 }.emit(&mut ack).expect("emit");
            t.handle_datagram(now, &ack[..n]);
            let mut got = Vec::new();
            let mut block = 0u64;
            let outcome = loop {
                if let Some(outcome) = t.poll_event() {
                    break outcome;
                }
                let mut last = None;
                while let Some(tx) = t.poll_transmit(now, &mut buf) {
                    let p = tx.payload().expect("DATA");
                    let b = d.block(p.offset, p.len).expect("block");
                    if let Some(end) = b.end {
                        t.set_content_len(end);
                    }
                    if p.offset == got.len() as u64 {
                        // SAFETY: inside the live translation.
                        got.extend_from_slice(unsafe { std::slice::from_raw_parts(b.ptr, b.len) });
                        block += 1;
                    }
                    last = Some(block);
                }
                let n = Packet::Ack {
                    block: last.expect("a window") as u16,
                }
                .emit(&mut ack)
                .expect("emit");
                t.handle_datagram(now, &ack[..n]);
            };
            assert_eq!(outcome, Outcome::Completed);
            let want = netascii_encode(&src);
            assert!(got == want, "blksize {blksize}");
            assert_eq!(block, want.len() as u64 / u64::from(blksize) + 1);
            assert_eq!(t.stats().bytes_acked, want.len() as u64);
        }
    }
}
