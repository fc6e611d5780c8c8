//! Confined opening under the root and the shared content cache.
//!
//! [`FileRoot`] holds the root directory and a cache shared by every shard
//! (clone it once per shard; clones share everything). Its
//! [`FileSource::open_read`] confines the request to the root in the kernel
//! (`openat2` with `RESOLVE_IN_ROOT`: the root is `/` for the whole lookup,
//! symlinks included, as under tftpd-hpa's chroot), checks that the file is regular and,
//! unless permissive, world-readable (as tftpd-hpa does), and returns a
//! [`FileData`]: the bytes to send.
//!
//! Content is cached by file identity (device, inode, size, mtime, ctime),
//! never by name, behind a `Weak`: 10,000 sessions reading one file share one
//! mapping, which goes away when the last [`FileData`] drops. A replaced or
//! modified file gets a new key, so a new mapping; sessions already reading
//! the old one keep theirs. The cache is touched on the open path only.
//!
//! SIGBUS design: an octet file is a read-only shared mapping that this
//! crate never reads in user space. [`FileData::range_ptr`] hands the driver
//! a raw pointer for an iovec; if the file was truncated after mapping, the
//! kernel's copy in `sendmsg` fails with `EFAULT` instead of the process
//! taking SIGBUS, and the shard ends that one transfer with an ERROR.
//! Netascii content is read with `pread` (never through a mapping) and
//! translated in memory.
//!
//! A file rewritten in place (`cp new old`: truncate, then write) changes
//! the pages under a mapping, so a transfer may have sent a mix of old and
//! new bytes. A mapped content keeps its file open and what fstat said at
//! open; [`FileData::changed_since_open`] compares, and the shard asks it
//! before the final block of a transfer, so such a transfer ends with an
//! ERROR instead of completing. Replacing by rename leaves the old inode's
//! bytes alone: those transfers go on.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use memmap2::{Advice, MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};

use crate::endpoint::{FileSource, OpenError};
use crate::proto::{MAX_FILENAME_LEN, Mode};

/// Largest source file served in netascii mode: its translation is held in
/// memory (up to twice this size).
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
}

/// What identifies one version of one file's content in one mode. ctime is
/// included because it cannot be set by users, unlike mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    netascii: bool,
}

struct Cache {
    map: HashMap<Key, Weak<Content>>,
    /// Prune dead entries when the map reaches this size (amortised O(1)).
    prune_at: usize,
}

impl Cache {
    fn get(&self, key: &Key) -> Option<Arc<Content>> {
        self.map.get(key).and_then(Weak::upgrade)
    }

    fn insert(&mut self, key: Key, content: &Arc<Content>) {
        if self.map.len() >= self.prune_at {
            self.map.retain(|_, w| w.strong_count() > 0);
            self.prune_at = (self.map.len() * 2).max(MIN_PRUNE_AT);
        }
        self.map.insert(key, Arc::downgrade(content));
    }
}

/// The bytes of a file as sent: shared, immutable.
enum Content {
    /// Nothing to map: a consistent snapshot whatever happens later.
    Empty,
    /// Octet: a read-only shared mapping, never read in user space, with
    /// the file (to fstat it again) and what fstat said when it was mapped.
    Mapped {
        map: MmapRaw,
        file: File,
        stamp: Stamp,
    },
    /// Netascii: the translated bytes, a snapshot in memory.
    Owned(Box<[u8]>),
}

/// What fstat says about a file's content, to tell whether it changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
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
}

/// The content of one opened file, as sent. Cheap to clone (an `Arc`); the
/// content stays valid while any clone lives. A mapped content holds its
/// file's descriptor (one per live mapping, shared by all its clones).
#[derive(Clone)]
pub struct FileData {
    content: Arc<Content>,
}

impl std::fmt::Debug for FileData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &*self.content {
            Content::Empty => "empty",
            Content::Mapped { .. } => "mapped",
            Content::Owned(_) => "owned",
        };
        f.debug_struct("FileData")
            .field("kind", &kind)
            .field("len", &self.len())
            .finish()
    }
}

impl FileData {
    /// Length of the content to send (for netascii, after translation).
    pub fn len(&self) -> u64 {
        let n = match &*self.content {
            Content::Empty => 0,
            Content::Mapped { map, .. } => map.len(),
            Content::Owned(b) => b.len(),
        };
        n as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A pointer and length covering `len` bytes at `offset`, for an iovec;
    /// `None` if the range is not inside the content. A zero-length range
    /// at or before the end is valid (the final empty DATA block).
    ///
    /// The caller must not dereference the pointer in user space: for a
    /// mapped file truncated after mapping that raises SIGBUS, whereas the
    /// kernel's copy in `sendmsg` just fails with `EFAULT`. The pointer stays
    /// valid while this `FileData` (or a clone) lives.
    pub fn range_ptr(&self, offset: u64, len: usize) -> Option<(*const u8, usize)> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        let base = match &*self.content {
            Content::Empty => NonNull::<u8>::dangling().as_ptr().cast_const(),
            Content::Mapped { map, .. } => map.as_ptr(),
            Content::Owned(b) => b.as_ptr(),
        };
        let total = self.len() as usize;
        if end > total {
            return None;
        }
        // wrapping_add: no dereference, and `start <= total` keeps it in
        // (or one past) the allocation anyway.
        Some((base.wrapping_add(start), len))
    }

    /// Whether the file may have changed since it was mapped, so that the
    /// bytes sent from the mapping may mix two versions: its size, mtime or
    /// (with the same link count) ctime differ now, or fstat fails. One
    /// fstat; the shard asks before a transfer's final block. Netascii and
    /// empty contents are snapshots in memory: never changed.
    pub fn changed_since_open(&self) -> bool {
        match &*self.content {
            Content::Mapped { file, stamp, .. } => match file.metadata() {
                Ok(meta) => stamp.differs(&Stamp::of(&meta)),
                // Cannot tell: do not let a client accept what may be mixed.
                Err(_) => true,
            },
            Content::Empty | Content::Owned(_) => false,
        }
    }

    /// Whether two handles share one cached content (one mapping).
    pub fn same_content(&self, other: &FileData) -> bool {
        Arc::ptr_eq(&self.content, &other.content)
    }

    /// Test-only: the content, read through the pointer.
    #[cfg(test)]
    fn read_all_for_test(&self) -> Vec<u8> {
        let Some((p, n)) = self.range_ptr(0, self.len() as usize) else {
            return Vec::new();
        };
        // SAFETY: `p..p+n` lies inside the live content (range_ptr checked
        // it, and `self` keeps it alive); tests never truncate a file
        // before reading it this way, so the mapped pages are readable.
        unsafe { std::slice::from_raw_parts(p, n) }.to_vec()
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
            }),
        })
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

/// RFC 764 / RFC 1350 netascii: LF → CR LF, CR → CR NUL; other bytes as is.
pub fn netascii_encode(src: &[u8]) -> Vec<u8> {
    // Exact size first (a cheap vectorised pass), so no regrowth and no
    // reallocation in `into_boxed_slice`.
    let specials = src.iter().filter(|&&b| is_special(b)).count();
    let mut out = Vec::with_capacity(src.len() + specials);
    let mut run = 0; // start of the bytes not yet copied
    let mut emit = |p: usize, out: &mut Vec<u8>| {
        out.extend_from_slice(&src[run..p]);
        out.extend_from_slice(if src[p] == b'\n' { b"\r\n" } else { b"\r\0" });
        run = p + 1;
    };
    if specials > 0 {
        // A 16-bit mask of specials per 16 bytes (the compiler vectorises
        // the compare); copy the runs between them whole.
        let mut chunks = src.chunks_exact(16);
        let mut base = 0;
        for chunk in &mut chunks {
            let mut mask: u16 = 0;
            for (k, &b) in chunk.iter().enumerate() {
                mask |= u16::from(is_special(b)) << k;
            }
            while mask != 0 {
                emit(base + mask.trailing_zeros() as usize, &mut out);
                mask &= mask - 1;
            }
            base += 16;
        }
        for (k, &b) in chunks.remainder().iter().enumerate() {
            if is_special(b) {
                emit(base + k, &mut out);
            }
        }
    }
    out.extend_from_slice(&src[run..]);
    out
}

fn is_special(b: u8) -> bool {
    b == b'\n' || b == b'\r'
}

/// Reads up to `size` bytes with pread (never through a mapping).
fn read_exact_size(file: &File, size: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let mut got = 0;
    while got < size {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break, // truncated meanwhile: serve what is there
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

fn build_content(file: File, stamp: Stamp, mode: Mode) -> Result<(Content, bool), OpenError> {
    if stamp.size == 0 {
        return Ok((Content::Empty, true));
    }
    let len = usize::try_from(stamp.size).map_err(|_| OpenError::Unservable("file too large"))?;
    match mode {
        Mode::Octet => {
            // map_raw_read_only never hands out references, so no unsafe:
            // we only ever pass raw pointers to the kernel.
            let map = MmapOptions::new()
                .len(len)
                .map_raw_read_only(&file)
                .map_err(map_resource_error("cannot map file"))?;
            // Start reading the head of a cold file now, asynchronously,
            // rather than one page fault at a time in the shard's sends. No
            // MADV_SEQUENTIAL: it lets the kernel drop pages behind the
            // reader, and a boot file is read by thousands of clients. A
            // failed advice costs only speed.
            let _ = map.advise_range(Advice::WillNeed, 0, len.min(PREFETCH_BYTES));
            Ok((Content::Mapped { map, file, stamp }, true))
        }
        Mode::Netascii => {
            let raw =
                read_exact_size(&file, len).map_err(map_resource_error("cannot read file"))?;
            // A short read means the file changed under us: serve it, but do
            // not cache it under the old key.
            let complete = raw.len() == len;
            Ok((
                Content::Owned(netascii_encode(&raw).into_boxed_slice()),
                complete,
            ))
        }
    }
}

impl FileSource for FileRoot {
    type Handle = FileData;

    fn open_read(&mut self, filename: &[u8], mode: Mode) -> Result<(FileData, u64), OpenError> {
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
        let netascii = mode == Mode::Netascii;
        if netascii && stamp.size > MAX_NETASCII_SOURCE {
            return Err(OpenError::Unservable("file too large for netascii"));
        }
        let key = Key {
            dev: meta.dev(),
            ino: meta.ino(),
            size: stamp.size,
            mtime: stamp.mtime,
            ctime: stamp.ctime,
            netascii,
        };
        if let Some(content) = self.cache().get(&key) {
            let data = FileData { content };
            let len = data.len();
            return Ok((data, len));
        }
        // Build outside the lock: a netascii read may take a while and
        // must not stall other shards' opens.
        // A mapping keeps the file open (to fstat it later); a copy drops it.
        let (content, cacheable) = build_content(file, stamp, mode)?;
        let mut content = Arc::new(content);
        if cacheable {
            let mut cache = self.cache();
            // Another shard may have built the same content meanwhile: share it.
            match cache.get(&key) {
                Some(existing) => content = existing,
                None => cache.insert(key, &content),
            }
        }
        let data = FileData { content };
        let len = data.len();
        Ok((data, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn netascii_encoding_rules() {
        assert_eq!(netascii_encode(b""), b"");
        assert_eq!(netascii_encode(b"abc"), b"abc");
        assert_eq!(netascii_encode(b"a\nb"), b"a\r\nb");
        assert_eq!(netascii_encode(b"a\rb"), b"a\r\0b");
        assert_eq!(netascii_encode(b"a\r\nb"), b"a\r\0\r\nb");
        assert_eq!(netascii_encode(b"end\r"), b"end\r\0");
        assert_eq!(netascii_encode(b"\n\n"), b"\r\n\r\n");
        // Specials in both the word loop and the tail, at every offset.
        for n in 0..40usize {
            for pos in 0..n {
                let mut src = vec![b'x'; n];
                src[pos] = b'\n';
                let mut want = vec![b'x'; n + 1];
                want[pos] = b'\r';
                want[pos + 1] = b'\n';
                assert_eq!(netascii_encode(&src), want, "n={n} pos={pos}");
            }
        }
    }

    fn naive_netascii(src: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in src {
            match b {
                b'\n' => out.extend_from_slice(b"\r\n"),
                b'\r' => out.extend_from_slice(b"\r\0"),
                _ => out.push(b),
            }
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn netascii_matches_naive(src in proptest::collection::vec(
            proptest::prop_oneof![proptest::prelude::Just(b'\n'), proptest::prelude::Just(b'\r'), proptest::prelude::any::<u8>()],
            0..200,
        )) {
            proptest::prop_assert_eq!(netascii_encode(&src), naive_netascii(&src));
        }
    }

    #[test]
    fn netascii_open_translates_and_reports_translated_len() {
        let f = fixture();
        write_file(&f.root_dir.join("t.txt"), b"one\ntwo\r\nthree\r");
        write_file(&f.root_dir.join("empty.txt"), b"");
        let mut r = root(&f, false);
        let d = open(&mut r, b"t.txt", Mode::Netascii).expect("open");
        let want = b"one\r\ntwo\r\0\r\nthree\r\0";
        assert_eq!(d.len(), want.len() as u64);
        assert_eq!(d.read_all_for_test(), want);
        // The octet view of the same file is the raw bytes, a separate entry.
        let o = open(&mut r, b"t.txt", Mode::Octet).expect("open octet");
        assert_eq!(o.read_all_for_test(), b"one\ntwo\r\nthree\r");
        assert!(!o.same_content(&d));
        let e = open(&mut r, b"empty.txt", Mode::Netascii).expect("open empty");
        assert_eq!(e.len(), 0);
        assert!(e.is_empty());
    }

    #[test]
    fn netascii_cache_is_shared() {
        let f = fixture();
        write_file(&f.root_dir.join("t.txt"), b"a\nb\n");
        let mut r = root(&f, false);
        let a = open(&mut r, b"t.txt", Mode::Netascii).expect("open");
        let b = open(&mut r, b"t.txt", Mode::Netascii).expect("open");
        assert!(a.same_content(&b));
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
        let c = b.clone();
        drop(a);
        drop(b);
        assert_eq!(r.live_contents(), 1);
        drop(c);
        assert_eq!(r.live_contents(), 0);
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
        // The netascii copy is a snapshot: still the old bytes.
        assert!(!text.changed_since_open());
        assert_eq!(text.read_all_for_test(), vec![1u8; 5000]);

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
        let Content::Mapped { map, .. } = &*d.content else {
            panic!("not mapped");
        };
        // Readahead is asynchronous: give it a moment.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut resident = resident_pages(map, pages);
        while resident < pages && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            resident = resident_pages(map, pages);
        }
        assert_eq!(resident, pages, "pages resident after open, of {pages}");
    }
}
