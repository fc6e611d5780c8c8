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

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};

use crate::endpoint::{FileSource, OpenError};
use crate::proto::{MAX_FILENAME_LEN, Mode};

/// Largest source file served in netascii mode: its translation is held in
/// memory (up to twice this size).
pub const MAX_NETASCII_SOURCE: u64 = 64 * 1024 * 1024;

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
    Empty,
    /// Octet: a read-only shared mapping, never read in user space.
    Mapped(MmapRaw),
    /// Netascii: the translated bytes.
    Owned(Box<[u8]>),
}

/// The content of one opened file, as sent. Cheap to clone (an `Arc`); the
/// content stays valid while any clone lives. Holds no file descriptor.
#[derive(Clone)]
pub struct FileData {
    content: Arc<Content>,
}

impl std::fmt::Debug for FileData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &*self.content {
            Content::Empty => "empty",
            Content::Mapped(_) => "mapped",
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
            Content::Mapped(m) => m.len(),
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
            Content::Mapped(m) => m.as_ptr(),
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
        Errno::EMFILE | Errno::ENFILE | Errno::ENOMEM => {
            OpenError::Unservable("server out of resources")
        }
        _ => OpenError::Unservable("cannot open file"),
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

fn build_content(file: &File, size: u64, mode: Mode) -> Result<(Content, bool), OpenError> {
    if size == 0 {
        return Ok((Content::Empty, true));
    }
    let len = usize::try_from(size).map_err(|_| OpenError::Unservable("file too large"))?;
    match mode {
        Mode::Octet => {
            // map_raw_read_only never hands out references, so no unsafe:
            // we only ever pass raw pointers to the kernel.
            let map = MmapOptions::new()
                .len(len)
                .map_raw_read_only(file)
                .map_err(|_| OpenError::Unservable("cannot map file"))?;
            // No MADV_SEQUENTIAL: it lets the kernel drop pages behind the
            // reader, and a boot file is read by thousands of clients.
            Ok((Content::Mapped(map), true))
        }
        Mode::Netascii => {
            let raw = read_exact_size(file, len)
                .map_err(|_| OpenError::Unservable("cannot read file"))?;
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
            .map_err(|_| OpenError::Unservable("cannot stat file"))?;
        if meta.mode() & libc::S_IFMT != libc::S_IFREG {
            return Err(OpenError::NotRegular);
        }
        if !self.inner.permissive && meta.mode() & libc::S_IROTH == 0 {
            return Err(OpenError::NotReadable);
        }
        let size = meta.size();
        let netascii = mode == Mode::Netascii;
        if netascii && size > MAX_NETASCII_SOURCE {
            return Err(OpenError::Unservable("file too large for netascii"));
        }
        let key = Key {
            dev: meta.dev(),
            ino: meta.ino(),
            size,
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            netascii,
        };
        if let Some(content) = self.cache().get(&key) {
            let data = FileData { content };
            let len = data.len();
            return Ok((data, len));
        }
        // Build outside the lock: a netascii read may take a while and
        // must not stall other shards' opens.
        let (content, cacheable) = build_content(&file, size, mode)?;
        drop(file); // the mapping or the copy is enough from here on
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
}
