//! Uploads off the shard thread. A write request's file is begun on the
//! shard (a confined directory open, an `O_TMPFILE` open and an fchmod: a
//! few metadata calls), then handed to a writer thread; the shard sends it
//! each accepted block and, after the last, a commit (fsync, link into
//! place), and hears back on a channel, woken through its eventfd, when
//! the commit is done or a write failed. A slow disk thus slows uploads,
//! never the reads that share the shard.
//!
//! Each upload stays on one writer (its jobs run in order); uploads are
//! spread over `WRITERS` of them. Bytes queued and not yet written are
//! bounded per shard: past `MAX_QUEUED_BYTES` the shard drops incoming
//! DATA of uploads, and their senders retransmit once the disk caught up.

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use crossbeam::channel::{self, Receiver, Sender};
use nix::sys::eventfd::EventFd;
use nix::sys::stat::fstat;

use crate::files::netascii::NetasciiDecoder;
use crate::files::upload::{self, Upload, UploadError, UploadRules};
use crate::files::{FileData, FileRoot};
use crate::files::{OpenError, Sink, Source};
use crate::proto::Mode;
use crate::refusal::Abort;

/// Writer threads per shard.
const WRITERS: usize = 2;

/// Bytes of accepted DATA a shard may have queued for its writers.
pub(super) const MAX_QUEUED_BYTES: u64 = 64 << 20;

/// Directories swept for leftovers that a writer remembers before it
/// starts afresh (sweeping again is harmless).
const SWEPT_CAPACITY: usize = 4096;

/// What a session holds: a file to send, or an upload by its key.
#[derive(Debug, Clone)]
pub(super) enum Held {
    Read(FileData),
    Write(u64),
}

/// One job for a writer, in the order the shard sent them.
enum Job {
    Start {
        key: u64,
        upload: Upload,
        netascii: bool,
        /// The directory, to sweep for a killed process's leftovers the
        /// first time this writer sees it.
        dir: OwnedFd,
    },
    Write {
        key: u64,
        offset: u64,
        bytes: Vec<u8>,
    },
    Commit {
        key: u64,
    },
    Cancel {
        key: u64,
    },
}

/// What a writer reports back.
#[derive(Debug)]
pub(super) enum Done {
    /// A write failed; later writes of it are skipped.
    Failed { key: u64, why: Abort },
    /// The file is in place (`None`), or could not be stored.
    Committed { key: u64, failed: Option<Abort> },
}

/// The ERROR an upload failure ends the transfer with.
fn abort_of(error: &UploadError) -> Abort {
    match error {
        UploadError::TooLarge => Abort::TooLarge,
        UploadError::DiskFull => Abort::DiskFull,
        _ => Abort::WriteFailed,
    }
}

/// The refusal of a write request that could not begin.
fn refusal_of(error: &UploadError) -> OpenError {
    match error {
        UploadError::NotFound => OpenError::NotFound,
        UploadError::Denied => OpenError::NotReadable,
        UploadError::TooLarge => OpenError::TooLarge,
        UploadError::DiskFull => OpenError::DiskFull,
        UploadError::Io(e) => match e.raw_os_error().map(nix::errno::Errno::from_raw) {
            Some(errno) if crate::files::is_transient(errno) => {
                OpenError::Transient(crate::files::TRANSIENT)
            }
            _ => OpenError::Unservable("cannot create file"),
        },
    }
}

/// A shard's uploads: its writers and what they report.
pub(super) struct UploadDesk {
    rules: UploadRules,
    writers: Vec<Sender<Job>>,
    done: Receiver<Done>,
    queued: Arc<AtomicU64>,
    next_key: u64,
    /// Live uploads' sessions, by key.
    pub sessions: HashMap<u64, crate::endpoint::SessionId>,
}

impl UploadDesk {
    /// Starts the writers; they wake the shard through `wake`.
    pub fn new(rules: UploadRules, wake: Arc<EventFd>) -> std::io::Result<Self> {
        let (done_tx, done) = channel::unbounded();
        let queued = Arc::new(AtomicU64::new(0));
        let mut writers = Vec::with_capacity(WRITERS);
        for i in 0..WRITERS {
            let (tx, rx) = channel::unbounded();
            let (done_tx, wake, queued) = (done_tx.clone(), wake.clone(), queued.clone());
            thread::Builder::new()
                .name(format!("ringtftpd-writer-{i}"))
                .spawn(move || write_loop(rx, done_tx, wake, queued))?;
            writers.push(tx);
        }
        Ok(UploadDesk {
            rules,
            writers,
            done,
            queued,
            next_key: 0,
            sessions: HashMap::new(),
        })
    }

    /// Too many bytes wait for the disk: drop uploads' DATA for now.
    pub fn is_backlogged(&self) -> bool {
        self.queued.load(Ordering::Relaxed) > MAX_QUEUED_BYTES
    }

    fn send(&self, key: u64, job: Job) {
        // A writer gone (it panicked) reports nothing: the session times
        // out and its upload, unnamed, vanishes.
        let _ = self.writers[(key % WRITERS as u64) as usize].send(job);
    }

    fn begin(
        &mut self,
        root: &FileRoot,
        filename: &[u8],
        mode: Mode,
        tsize: Option<u64>,
    ) -> Result<u64, OpenError> {
        let (dir, name): (OwnedFd, CString) = root.open_upload_dir(filename)?;
        let upload = Upload::begin(&dir, &name, &self.rules, tsize).map_err(|e| refusal_of(&e))?;
        let key = self.next_key;
        self.next_key += 1;
        let netascii = mode == Mode::Netascii;
        self.send(
            key,
            Job::Start {
                key,
                upload,
                netascii,
                dir,
            },
        );
        Ok(key)
    }

    /// Accepted bytes of upload `key`; after the `last`, its commit.
    pub fn store(&self, key: u64, offset: u64, bytes: &[u8], last: bool) {
        if !bytes.is_empty() {
            self.queued.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            let bytes = bytes.to_vec();
            self.send(key, Job::Write { key, offset, bytes });
        }
        if last {
            self.send(key, Job::Commit { key });
        }
    }

    /// The session of upload `key` is gone: an upload not committed by
    /// now is dropped, and leaves nothing behind.
    pub fn cancel(&mut self, key: u64) {
        self.sessions.remove(&key);
        self.send(key, Job::Cancel { key });
    }

    /// A report, if one came.
    pub fn poll_done(&self) -> Option<Done> {
        self.done.try_recv().ok()
    }
}

/// An upload on its writer.
struct Open {
    upload: Upload,
    netascii: Option<NetasciiDecoder>,
    failed: bool,
}

fn write_loop(jobs: Receiver<Job>, done: Sender<Done>, wake: Arc<EventFd>, queued: Arc<AtomicU64>) {
    let mut open: HashMap<u64, Open> = HashMap::new();
    let mut swept: HashSet<(u64, u64)> = HashSet::new();
    let mut text = Vec::new();
    let report = |d: Done| {
        let _ = done.send(d);
        let _ = wake.write(1);
    };
    for job in jobs {
        match job {
            Job::Start {
                key,
                upload,
                netascii,
                dir,
            } => {
                if let Ok(st) = fstat(&dir)
                    && swept.insert((st.st_dev, st.st_ino))
                {
                    if swept.len() > SWEPT_CAPACITY {
                        swept.clear();
                    }
                    let _ = upload::remove_leftovers(&dir);
                }
                let netascii = netascii.then(NetasciiDecoder::default);
                open.insert(
                    key,
                    Open {
                        upload,
                        netascii,
                        failed: false,
                    },
                );
            }
            Job::Write { key, offset, bytes } => {
                queued.fetch_sub(bytes.len() as u64, Ordering::Relaxed);
                let Some(o) = open.get_mut(&key).filter(|o| !o.failed) else {
                    continue;
                };
                let written = match &mut o.netascii {
                    // Blocks come in order, once each: append the text.
                    Some(decoder) => {
                        text.clear();
                        decoder.decode(&bytes, &mut text);
                        let at = o.upload.len();
                        o.upload.write_at(at, &text)
                    }
                    None => o.upload.write_at(offset, &bytes),
                };
                if let Err(e) = written {
                    o.failed = true;
                    report(Done::Failed {
                        key,
                        why: abort_of(&e),
                    });
                }
            }
            Job::Commit { key } => {
                let Some(mut o) = open.remove(&key) else {
                    continue;
                };
                if o.failed {
                    continue; // already reported
                }
                let mut result = Ok(());
                if let Some(decoder) = &mut o.netascii {
                    text.clear();
                    decoder.finish(&mut text);
                    let at = o.upload.len();
                    result = o.upload.write_at(at, &text);
                }
                let failed = result
                    .and_then(|()| o.upload.commit().map(|_| ()))
                    .err()
                    .map(|e| abort_of(&e));
                report(Done::Committed { key, failed });
            }
            Job::Cancel { key } => {
                open.remove(&key);
            }
        }
    }
}

/// The shard's files: the root to read from and, if uploads are on, the
/// desk that writes.
pub(super) struct ShardFiles {
    pub root: FileRoot,
    /// Directories 1.. of several ([`crate::policy::Grant::root`]).
    pub more_roots: Vec<FileRoot>,
    pub uploads: Option<UploadDesk>,
}

impl ShardFiles {
    /// Directory `index` (0: `root`); NotFound past the last.
    fn root_at(&self, index: usize) -> Result<&FileRoot, OpenError> {
        match index {
            0 => Ok(&self.root),
            _ => self.more_roots.get(index - 1).ok_or(OpenError::NotFound),
        }
    }
}

impl Source for ShardFiles {
    type Handle = Held;

    fn open_read(&mut self, filename: &[u8], mode: Mode) -> Result<(Held, u64), OpenError> {
        self.open_read_in(0, filename, mode)
    }

    fn open_read_in(
        &mut self,
        root: usize,
        filename: &[u8],
        mode: Mode,
    ) -> Result<(Held, u64), OpenError> {
        let (data, len) = self.root_at(root)?.open_file(filename, mode)?;
        Ok((Held::Read(data), len))
    }

    fn held_bytes(handle: &Held, _len: u64) -> u64 {
        match handle {
            Held::Read(data) => data.held_bytes(),
            Held::Write(_) => 0,
        }
    }
}

impl Sink for ShardFiles {
    fn open_write(
        &mut self,
        filename: &[u8],
        mode: Mode,
        tsize: Option<u64>,
    ) -> Result<Held, OpenError> {
        self.open_write_in(0, filename, mode, tsize)
    }

    fn open_write_in(
        &mut self,
        root: usize,
        filename: &[u8],
        mode: Mode,
        tsize: Option<u64>,
    ) -> Result<Held, OpenError> {
        let root = match root {
            0 => &self.root,
            _ => self.more_roots.get(root - 1).ok_or(OpenError::NotFound)?,
        };
        let Some(desk) = &mut self.uploads else {
            return Err(OpenError::Denied("uploads are disabled"));
        };
        desk.begin(root, filename, mode, tsize).map(Held::Write)
    }
}
