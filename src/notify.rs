//! systemd's service protocol (`Type=notify`): readiness, reload and stop
//! notices, and the watchdog. Without `NOTIFY_SOCKET` each call is a no-op.
//! The watchdog is pinged only while every shard still turns its loop when
//! woken, so a hung shard gets the process restarted.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd the server is serving; `status` shows in `systemctl
/// status`.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A reload (SIGHUP) begins; [`ready`] ends it.
pub fn reloading() {
    let _ = sd_notify::notify(&[NotifyState::Reloading]);
}

/// Shutdown began: the transfers are draining.
pub fn stopping(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

/// The systemd watchdog: asks each shard for a turn every half period and
/// pings only when every shard turned since the last ask.
#[derive(Debug)]
pub struct Watchdog {
    every: Duration,
    /// Each shard's turn count when it was last woken.
    asked_at: Vec<u64>,
}

impl Watchdog {
    /// From `WATCHDOG_USEC` (and `WATCHDOG_PID`), if systemd asked for one.
    pub fn from_env(shards: usize) -> Option<Watchdog> {
        sd_notify::watchdog_enabled().map(|period| Watchdog::new(period, shards))
    }

    pub fn new(period: Duration, shards: usize) -> Watchdog {
        Watchdog {
            every: (period / 2).max(Duration::from_millis(10)),
            asked_at: vec![u64::MAX; shards],
        }
    }

    /// How often [`Watchdog::check`] must run.
    pub fn every(&self) -> Duration {
        self.every
    }

    /// Given each shard's turn count now (None: its thread ended), whether
    /// all are alive: each turned since it was last woken. The caller wakes
    /// every shard after this, pings if true, and withholds the ping if not.
    pub fn check(&mut self, turns: &[Option<u64>]) -> bool {
        let mut alive = true;
        for (asked, now) in self.asked_at.iter_mut().zip(turns) {
            match *now {
                // A first check has nothing to compare with.
                Some(now) => alive &= *asked == u64::MAX || now != *asked,
                None => alive = false,
            }
            *asked = now.unwrap_or(u64::MAX);
        }
        alive
    }

    /// Pings systemd's watchdog.
    pub fn ping(&self) {
        let _ = sd_notify::notify(&[NotifyState::Watchdog]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_that_does_not_turn_when_woken_stops_the_pings() {
        let mut w = Watchdog::new(Duration::from_secs(30), 2);
        assert_eq!(w.every(), Duration::from_secs(15));
        assert!(w.check(&[Some(5), Some(9)]), "the first check has no past");
        assert!(w.check(&[Some(6), Some(10)]), "both turned");
        assert!(!w.check(&[Some(7), Some(10)]), "shard 1 did not turn");
        assert!(w.check(&[Some(8), Some(11)]), "it turned again");
        assert!(!w.check(&[Some(9), None]), "shard 1's thread ended");
    }
}
