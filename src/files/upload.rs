//! The upload writer: a file received by WRQ becomes visible under its name
//! only whole. Bytes go to an unnamed file in the target's directory
//! (`O_TMPFILE`), which is fsync'd and then linked into place, so an
//! aborted, timed-out, disk-full or killed upload leaves nothing under the
//! final name (an unnamed file vanishes with its descriptor). Writing over
//! an existing file links the new one under a hidden name and renames it
//! over the old, so readers see the old bytes or the new, never a mix, and
//! of two uploads of one name the last to commit wins.
//!
//! Where the filesystem has no `O_TMPFILE` the bytes go to a hidden name
//! (`HIDDEN_PREFIX`), removed on drop; [`remove_leftovers`] clears what a
//! killed process left there.
//!
//! The calls block (writes, fsync); the shard runs them off its thread.
//! The directory comes confined by the caller (the root's openat2), and
//! `name` is one path component.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::fcntl::{AT_FDCWD, AtFlags, OFlag, openat, renameat};
use nix::sys::stat::{Mode, SFlag, fchmod, fstatat};
use nix::unistd::{UnlinkatFlags, fchown, fsync, linkat, unlinkat};

/// Names of not yet published uploads (the fallback without `O_TMPFILE`,
/// and the instant between link and rename when overwriting).
pub const HIDDEN_PREFIX: &str = ".ringtftpd-upload.";

/// What a WRQ may do, as tftpd-hpa's `-c`, `-U`, `-p` and `--max-upload`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadRules {
    /// Files that do not exist may be created (`-c`).
    pub create: bool,
    /// Existing files may be replaced even if not world-writable (ours;
    /// tftpd-hpa needs `o+w` on the old file).
    pub overwrite_any: bool,
    /// New files get mode `0o666 & !umask` (`-U`; tftpd-hpa's default 0).
    pub umask: u32,
    /// Largest upload in bytes (`--max-upload`); `None`: no limit.
    pub max_size: Option<u64>,
}

/// Why an upload cannot begin or go on; maps to a TFTP error code.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// No such file and creating is off (ERROR 1, as tftpd-hpa).
    #[error("file not found")]
    NotFound,
    /// The old file is not world-writable, or not a regular file (ERROR 2).
    #[error("permission denied")]
    Denied,
    /// Larger than `--max-upload` or than its own tsize (ERROR 3).
    #[error("file too large")]
    TooLarge,
    /// The filesystem is full or over quota (ERROR 3).
    #[error("disk full or allocation exceeded")]
    DiskFull,
    /// Anything else the kernel said (ERROR 0 with this text).
    #[error("{0}")]
    Io(io::Error),
}

impl UploadError {
    /// The TFTP error code (RFC 1350) this ends a transfer with.
    pub fn tftp_code(&self) -> u16 {
        match self {
            UploadError::NotFound => 1,
            UploadError::Denied => 2,
            UploadError::TooLarge | UploadError::DiskFull => 3,
            UploadError::Io(_) => 0,
        }
    }
}

impl From<Errno> for UploadError {
    fn from(e: Errno) -> Self {
        match e {
            Errno::ENOSPC | Errno::EDQUOT | Errno::EFBIG => UploadError::DiskFull,
            Errno::EACCES | Errno::EPERM | Errno::EROFS => UploadError::Denied,
            e => UploadError::Io(e.into()),
        }
    }
}

impl From<io::Error> for UploadError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(n) => Errno::from_raw(n).into(),
            None => UploadError::Io(e),
        }
    }
}

/// The old file an upload replaces: its mode and owner carry over.
#[derive(Clone, Copy, Debug)]
struct Replaced {
    mode: u32,
    uid: u32,
    gid: u32,
}

/// One upload in progress. Dropping it without [`Upload::commit`] leaves
/// the directory as it was.
#[derive(Debug)]
pub struct Upload {
    dir: OwnedFd,
    name: CString,
    file: File,
    /// The fallback's hidden name, unlinked on drop unless committed.
    hidden: Option<CString>,
    replaces: Option<Replaced>,
    limit: Option<u64>,
    len: u64,
}

/// Makes hidden names unique within the process; the PID makes them unique
/// across processes.
static NEXT_HIDDEN: AtomicU64 = AtomicU64::new(0);

fn hidden_name() -> CString {
    let n = NEXT_HIDDEN.fetch_add(1, Ordering::Relaxed);
    CString::new(format!("{HIDDEN_PREFIX}{}.{n}", std::process::id()))
        .expect("no NUL in a formatted name")
}

fn is_one_component(name: &CStr) -> bool {
    let b = name.to_bytes();
    !b.is_empty() && b != b"." && b != b".." && !b.contains(&b'/')
}

impl Upload {
    /// Begins an upload of `name` in `dir`, under `rules`, announced as
    /// `tsize` bytes (RFC 2349) if the client said so.
    pub fn begin(
        dir: &OwnedFd,
        name: &CStr,
        rules: &UploadRules,
        tsize: Option<u64>,
    ) -> Result<Upload, UploadError> {
        Self::begin_with(dir, name, rules, tsize, true)
    }

    fn begin_with(
        dir: &OwnedFd,
        name: &CStr,
        rules: &UploadRules,
        tsize: Option<u64>,
        try_tmpfile: bool,
    ) -> Result<Upload, UploadError> {
        if !is_one_component(name) || name.to_bytes().starts_with(HIDDEN_PREFIX.as_bytes()) {
            return Err(UploadError::Denied);
        }
        // A tsize over the limit is refused before any data moves.
        if let (Some(max), Some(t)) = (rules.max_size, tsize)
            && t > max
        {
            return Err(UploadError::TooLarge);
        }
        let replaces = match fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => {
                let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
                let world_writable = st.st_mode & 0o002 != 0;
                if kind != SFlag::S_IFREG || !(world_writable || rules.overwrite_any) {
                    return Err(UploadError::Denied);
                }
                Some(Replaced {
                    mode: st.st_mode & 0o777,
                    uid: st.st_uid,
                    gid: st.st_gid,
                })
            }
            Err(Errno::ENOENT) if rules.create => None,
            Err(Errno::ENOENT) => return Err(UploadError::NotFound),
            Err(e) => return Err(e.into()),
        };
        let dir = dir.try_clone()?;
        let flags = OFlag::O_WRONLY | OFlag::O_CLOEXEC;
        let tmpfile = if try_tmpfile {
            match openat(
                &dir,
                ".",
                flags | OFlag::O_TMPFILE,
                Mode::from_bits_truncate(0o600),
            ) {
                Ok(fd) => Some(fd),
                // No O_TMPFILE on this filesystem (or kernel): fall back.
                Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => None,
                Err(e) => return Err(e.into()),
            }
        } else {
            None
        };
        let (fd, hidden) = match tmpfile {
            Some(fd) => (fd, None),
            None => {
                let hidden = hidden_name();
                let fd = openat(
                    &dir,
                    hidden.as_c_str(),
                    flags | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
                    Mode::from_bits_truncate(0o600),
                )?;
                (fd, Some(hidden))
            }
        };
        let limit = match (rules.max_size, tsize) {
            (Some(max), Some(t)) => Some(max.min(t)),
            (max, t) => max.or(t),
        };
        let upload = Upload {
            dir,
            name: name.to_owned(),
            file: File::from(fd),
            hidden,
            replaces,
            limit,
            len: 0,
        };
        // The final mode now, exactly (the process umask applied at open).
        let mode = match replaces {
            Some(r) => r.mode,
            None => 0o666 & !rules.umask,
        };
        fchmod(upload.file.as_fd(), Mode::from_bits_truncate(mode))?;
        Ok(upload)
    }

    /// Bytes received so far (the end of the furthest write).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes `bytes` at `offset`; past the limit (or the announced tsize)
    /// it fails and the caller ends the transfer with ERROR 3.
    pub fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<(), UploadError> {
        let end = offset
            .checked_add(bytes.len() as u64)
            .ok_or(UploadError::TooLarge)?;
        if self.limit.is_some_and(|limit| end > limit) {
            return Err(UploadError::TooLarge);
        }
        self.file.write_all_at(bytes, offset)?;
        self.len = self.len.max(end);
        Ok(())
    }

    /// Makes the upload visible under its name: fsync the data, link or
    /// rename it into place, fsync the directory. Returns the length.
    pub fn commit(mut self) -> Result<u64, UploadError> {
        if let Some(r) = self.replaces {
            // Owner carries over where we may set it (as root); a failure
            // leaves ours, as a new file would have.
            let _ = fchown(self.file.as_fd(), Some(r.uid.into()), Some(r.gid.into()));
        }
        fsync(self.file.as_fd())?;
        match self.hidden.take() {
            Some(hidden) => {
                // Renamed away: nothing hidden is left for drop to unlink.
                renameat(
                    &self.dir,
                    hidden.as_c_str(),
                    &self.dir,
                    self.name.as_c_str(),
                )?;
            }
            None => self.publish_unnamed()?,
        }
        fsync(self.dir.as_fd())?;
        Ok(self.len)
    }

    /// Links the `O_TMPFILE` file under its name: straight there when the
    /// name is free, else under a hidden name renamed over the old file.
    fn publish_unnamed(&self) -> Result<(), UploadError> {
        // /proc/self/fd with AT_SYMLINK_FOLLOW links an O_TMPFILE without
        // CAP_DAC_READ_SEARCH (which AT_EMPTY_PATH needs).
        let proc_path = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        let link = |to: &CStr| {
            linkat(
                AT_FDCWD,
                proc_path.as_str(),
                &self.dir,
                to,
                AtFlags::AT_SYMLINK_FOLLOW,
            )
        };
        match link(self.name.as_c_str()) {
            Ok(()) => Ok(()),
            Err(Errno::EEXIST) => {
                let hidden = hidden_name();
                link(hidden.as_c_str())?;
                renameat(
                    &self.dir,
                    hidden.as_c_str(),
                    &self.dir,
                    self.name.as_c_str(),
                )
                .map_err(|e| {
                    let _ = unlinkat(&self.dir, hidden.as_c_str(), UnlinkatFlags::NoRemoveDir);
                    UploadError::from(e)
                })
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(hidden) = &self.hidden {
            let _ = unlinkat(&self.dir, hidden.as_c_str(), UnlinkatFlags::NoRemoveDir);
        }
    }
}

/// The process that made a hidden name, if the name says.
fn hidden_owner(name: &[u8]) -> Option<u32> {
    let rest = name.strip_prefix(HIDDEN_PREFIX.as_bytes())?;
    let pid = rest.split(|&b| b == b'.').next()?;
    std::str::from_utf8(pid).ok()?.parse().ok()
}

/// Removes hidden upload files in `dir` that a killed process left, and
/// returns how many. Those of this process, and of any other process
/// still alive (another server on the same tree), are kept.
pub fn remove_leftovers(dir: &OwnedFd) -> io::Result<usize> {
    let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
    let mut removed = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let name = entry.file_name();
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str());
        if !bytes.starts_with(HIDDEN_PREFIX.as_bytes()) {
            continue;
        }
        if let Some(pid) = hidden_owner(bytes)
            && (pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists())
        {
            continue;
        }
        let Ok(name) = CString::new(bytes) else {
            continue;
        };
        let st = fstatat(dir, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFREG {
            unlinkat(dir, name.as_c_str(), UnlinkatFlags::NoRemoveDir)?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    fn open_dir(path: &Path) -> OwnedFd {
        File::open(path).expect("open dir").into()
    }

    fn c(name: &str) -> CString {
        CString::new(name).unwrap()
    }

    fn names(path: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    const CREATE: UploadRules = UploadRules {
        create: true,
        overwrite_any: false,
        umask: 0o022,
        max_size: None,
    };

    /// Both ways of holding the bytes: O_TMPFILE, and the hidden name.
    fn both_ways(test: impl Fn(bool)) {
        test(true);
        test(false);
    }

    #[test]
    fn a_new_file_appears_only_on_commit_with_the_umask_mode() {
        both_ways(|tmpfile| {
            let d = tempfile::tempdir().unwrap();
            let dir = open_dir(d.path());
            let mut up = Upload::begin_with(&dir, &c("cfg.bak"), &CREATE, None, tmpfile).unwrap();
            assert_eq!(
                up.hidden.is_none(),
                tmpfile,
                "the way asked for is the way taken"
            );
            up.write_at(0, b"hello ").unwrap();
            up.write_at(6, b"world").unwrap();
            assert!(!d.path().join("cfg.bak").exists(), "visible before commit");
            assert_eq!(up.commit().unwrap(), 11);
            assert_eq!(
                std::fs::read(d.path().join("cfg.bak")).unwrap(),
                b"hello world"
            );
            let mode = std::fs::metadata(d.path().join("cfg.bak"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o644, "tmpfile={tmpfile}");
            assert_eq!(names(d.path()), ["cfg.bak"], "tmpfile={tmpfile}");
        });
    }

    #[test]
    fn an_abandoned_upload_leaves_nothing() {
        both_ways(|tmpfile| {
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join("keep"), b"old").unwrap();
            std::fs::set_permissions(d.path().join("keep"), PermissionsExt::from_mode(0o666))
                .unwrap();
            let dir = open_dir(d.path());
            for name in ["new.bin", "keep"] {
                let mut up = Upload::begin_with(&dir, &c(name), &CREATE, None, tmpfile).unwrap();
                up.write_at(0, &[9u8; 5000]).unwrap();
                drop(up);
            }
            assert_eq!(names(d.path()), ["keep"], "tmpfile={tmpfile}");
            assert_eq!(std::fs::read(d.path().join("keep")).unwrap(), b"old");
        });
    }

    #[test]
    fn without_create_a_missing_file_is_not_found() {
        let d = tempfile::tempdir().unwrap();
        let dir = open_dir(d.path());
        let err = Upload::begin(&dir, &c("x"), &UploadRules::default(), None).unwrap_err();
        assert!(matches!(err, UploadError::NotFound), "{err:?}");
        assert_eq!(err.tftp_code(), 1);
    }

    #[test]
    fn overwriting_needs_a_world_writable_file_unless_allowed() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("f");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, PermissionsExt::from_mode(0o644)).unwrap();
        let dir = open_dir(d.path());
        let err = Upload::begin(&dir, &c("f"), &CREATE, None).unwrap_err();
        assert!(matches!(err, UploadError::Denied), "{err:?}");
        assert_eq!(err.tftp_code(), 2);
        let any = UploadRules {
            overwrite_any: true,
            ..CREATE
        };
        let mut up = Upload::begin(&dir, &c("f"), &any, None).unwrap();
        up.write_at(0, b"new").unwrap();
        up.commit().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644, "the old file's mode carries over");
    }

    #[test]
    fn a_reader_of_the_old_file_keeps_the_old_bytes() {
        both_ways(|tmpfile| {
            let d = tempfile::tempdir().unwrap();
            let path = d.path().join("f");
            std::fs::write(&path, [1u8; 4096]).unwrap();
            std::fs::set_permissions(&path, PermissionsExt::from_mode(0o666)).unwrap();
            let reader = File::open(&path).unwrap();
            let dir = open_dir(d.path());
            let mut up = Upload::begin_with(&dir, &c("f"), &CREATE, None, tmpfile).unwrap();
            up.write_at(0, &[2u8; 100]).unwrap();
            up.commit().unwrap();
            let mut old = vec![0u8; 4096];
            reader.read_exact_at(&mut old, 0).unwrap();
            assert!(old.iter().all(|&b| b == 1), "the old inode was written");
            assert_eq!(std::fs::read(&path).unwrap(), [2u8; 100]);
            assert_eq!(names(d.path()), ["f"]);
        });
    }

    #[test]
    fn two_uploads_of_one_name_the_last_commit_wins_whole() {
        both_ways(|tmpfile| {
            let d = tempfile::tempdir().unwrap();
            let dir = open_dir(d.path());
            let mut a = Upload::begin_with(&dir, &c("f"), &CREATE, None, tmpfile).unwrap();
            let mut b = Upload::begin_with(&dir, &c("f"), &CREATE, None, tmpfile).unwrap();
            a.write_at(0, &[b'a'; 3000]).unwrap();
            b.write_at(0, &[b'b'; 1000]).unwrap();
            b.commit().unwrap();
            assert_eq!(std::fs::read(d.path().join("f")).unwrap(), [b'b'; 1000]);
            a.commit().unwrap();
            assert_eq!(std::fs::read(d.path().join("f")).unwrap(), [b'a'; 3000]);
            assert_eq!(names(d.path()), ["f"], "tmpfile={tmpfile}");
        });
    }

    #[test]
    fn the_size_limit_and_the_announced_tsize_bound_an_upload() {
        let d = tempfile::tempdir().unwrap();
        let dir = open_dir(d.path());
        let small = UploadRules {
            max_size: Some(1000),
            ..CREATE
        };
        // Announced too big: refused before any data.
        let err = Upload::begin(&dir, &c("f"), &small, Some(1001)).unwrap_err();
        assert!(matches!(err, UploadError::TooLarge), "{err:?}");
        assert_eq!(err.tftp_code(), 3);
        // Exactly the limit is fine; one byte more is not.
        let mut up = Upload::begin(&dir, &c("f"), &small, None).unwrap();
        up.write_at(0, &[0u8; 1000]).unwrap();
        assert!(matches!(
            up.write_at(1000, b"x"),
            Err(UploadError::TooLarge)
        ));
        // More than its own tsize, under the limit.
        let mut up = Upload::begin(&dir, &c("g"), &small, Some(10)).unwrap();
        up.write_at(0, &[0u8; 10]).unwrap();
        assert!(matches!(up.write_at(10, b"x"), Err(UploadError::TooLarge)));
        assert!(matches!(
            up.write_at(u64::MAX, b"x"),
            Err(UploadError::TooLarge)
        ));
        drop(up);
        assert!(names(d.path()).is_empty());
    }

    #[test]
    fn names_that_are_not_one_plain_component_are_denied() {
        let d = tempfile::tempdir().unwrap();
        let dir = open_dir(d.path());
        let hidden = format!("{HIDDEN_PREFIX}1.2");
        for name in ["", ".", "..", "a/b", hidden.as_str()] {
            let err = Upload::begin(&dir, &c(name), &CREATE, None).unwrap_err();
            assert!(matches!(err, UploadError::Denied), "{name:?}: {err:?}");
        }
        std::fs::create_dir(d.path().join("sub")).unwrap();
        let any = UploadRules {
            overwrite_any: true,
            ..CREATE
        };
        let err = Upload::begin(&dir, &c("sub"), &any, None).unwrap_err();
        assert!(matches!(err, UploadError::Denied), "a directory: {err:?}");
    }

    #[test]
    fn leftovers_of_a_killed_process_are_removed() {
        let d = tempfile::tempdir().unwrap();
        // Above any pid_max (2^22): that process is surely gone.
        std::fs::write(
            d.path().join(format!("{HIDDEN_PREFIX}99999999.0")),
            b"partial",
        )
        .unwrap();
        // This process's own upload in progress stays.
        let ours = format!("{HIDDEN_PREFIX}{}.5", std::process::id());
        std::fs::write(d.path().join(&ours), b"in progress").unwrap();
        std::fs::write(d.path().join("real.bin"), b"keep").unwrap();
        let dir = open_dir(d.path());
        assert_eq!(remove_leftovers(&dir).unwrap(), 1);
        assert_eq!(names(d.path()), [ours, "real.bin".to_string()]);
    }
}
