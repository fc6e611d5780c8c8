//! Commands to a running shard: sent on a crossbeam channel, with the
//! shard's eventfd written after each send only to wake its ring. The shard
//! drains the channel when that eventfd read completes, never per packet,
//! so its hot path takes no lock.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam::channel::{Receiver, Sender};
use nix::sys::eventfd::EventFd;

use super::uploads::Done;
use super::{ExitReport, Phase, Shard};
use crate::policy::Settings;

/// What a shard can be told to do.
#[derive(Debug, Clone)]
pub enum Command {
    /// Stop listening, let live transfers run for up to `shutdown_grace`,
    /// abort the rest and return.
    Shutdown,
    /// Decide new requests under these settings; running transfers keep
    /// theirs.
    Settings(Arc<Settings>),
}

/// What a shard publishes once per loop turn (relaxed stores, never per
/// packet) for the process to read: enough to tell an idle server.
#[derive(Debug, Default)]
pub struct Activity {
    /// Requests seen at the listeners so far.
    pub requests: AtomicU64,
    /// Live sessions.
    pub live: AtomicUsize,
    /// Loop turns so far: a shard that is woken and does not turn is hung
    /// (the systemd watchdog's test).
    pub turns: AtomicU64,
    /// Every counter of `--metrics`, and whether the shard is serving.
    pub metrics: Arc<crate::metrics::Published>,
}

/// A running shard thread.
pub struct ShardHandle {
    commands: Sender<Command>,
    wake: Arc<EventFd>,
    activity: Arc<Activity>,
    thread: JoinHandle<io::Result<ExitReport>>,
}

impl ShardHandle {
    pub(super) fn new(
        commands: Sender<Command>,
        wake: Arc<EventFd>,
        activity: Arc<Activity>,
        thread: JoinHandle<io::Result<ExitReport>>,
    ) -> Self {
        ShardHandle {
            commands,
            wake,
            activity,
            thread,
        }
    }

    /// What the shard last published.
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// The shard's published counters, for a metrics exporter.
    pub fn published(&self) -> Arc<crate::metrics::Published> {
        self.activity.metrics.clone()
    }

    /// Sends `command` and wakes the shard; false if the shard is gone.
    pub fn send(&self, command: Command) -> bool {
        let sent = self.commands.send(command).is_ok();
        // The counter only grows; a full counter (EAGAIN) is already a wake-up.
        let _ = self.wake.write(1);
        sent
    }

    /// Wakes the shard for one loop turn, with nothing to do.
    pub fn poke(&self) {
        let _ = self.wake.write(1);
    }

    /// Whether the shard thread is still running.
    pub fn is_running(&self) -> bool {
        !self.thread.is_finished()
    }

    /// Asks the shard to stop ([`Command::Shutdown`]).
    pub fn shut_down(&self) {
        self.send(Command::Shutdown);
    }

    /// Waits for the shard thread to end.
    pub fn join(self) -> io::Result<()> {
        self.join_report().map(|_| ())
    }

    /// Waits for the shard thread to end; how it ended.
    pub(crate) fn join_report(self) -> io::Result<ExitReport> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("shard thread panicked")))
    }
}

impl Shard {
    /// What the upload writers finished: a stored file gets its final
    /// ACK, a failed one its ERROR. Cheap when nothing came (one atomic
    /// load), so it runs every loop turn.
    pub(super) fn on_uploads_done(&mut self, now: Instant) {
        loop {
            let Some(desk) = &self.files.uploads else {
                return;
            };
            let Some(done) = desk.poll_done() else {
                return;
            };
            let (key, failed) = match done {
                Done::Failed { key, why } => (key, Some(why)),
                Done::Committed { key, failed } => (key, failed),
            };
            let Some(&id) = desk.sessions.get(&key) else {
                continue; // its session is gone
            };
            match failed {
                None => self.endpoint.commit_done(now, id),
                Some(why) => self.endpoint.abort(now, id, why),
            }
            self.touch(id);
        }
    }
}

/// The shard's end of the command channel.
pub(super) type Commands = Receiver<Command>;

impl Shard {
    /// The eventfd read completed (`res` its result): carry out every
    /// command sent so far, and read again while the shard runs.
    pub(super) fn on_wake(&mut self, now: Instant, res: i32) {
        if res >= 0 {
            while let Ok(command) = self.commands.try_recv() {
                match command {
                    Command::Shutdown => self.begin_shutdown(now),
                    Command::Settings(settings) => self.endpoint.set_settings(settings),
                }
            }
        }
        if self.phase == Phase::Running {
            self.arm_wake();
        }
    }
}
