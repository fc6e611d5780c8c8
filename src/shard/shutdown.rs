//! Stopping: listeners cancelled, live transfers given `--shutdown-grace`
//! then aborted, and at exit every operation still in the kernel cancelled
//! and reaped before the memory it may use is freed, or leaked if the
//! kernel does not finish in time.

use std::mem;
use std::time::{Duration, Instant};

use io_uring::types;

use super::token::Token;
use super::{Counters, Phase, Shard, is_transient, sqe};
use crate::endpoint::SessionId;
use crate::log;
use crate::refusal::Abort;

/// How a shard ended, for tests and the last log line.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ExitReport {
    pub counters: Counters,
    /// Ring operations outstanding when teardown began (then cancelled).
    pub outstanding_at_teardown: u64,
    /// Ring operations outstanding when memory was freed (or leaked).
    pub outstanding_at_free: u64,
    /// The kernel did not finish in time: send slots, mappings and buffer
    /// rings were leaked rather than freed.
    pub leaked: bool,
}

/// Most waits of one teardown (each up to the rest of `REAP_BOUND`).
const REAP_TURNS: u32 = 1000;

/// Longest a shard waits at exit for its log lines to be written.
const LOG_FLUSH: Duration = Duration::from_millis(500);

impl Shard {
    pub(super) fn begin_shutdown(&mut self, now: Instant) {
        if self.phase != Phase::Running {
            return;
        }
        self.phase = Phase::Draining {
            deadline: now + self.shutdown_grace,
        };
        // On a single port the live sessions' ACKs still come to the
        // listeners: they stop only once the drain is over.
        if !self.single_port {
            self.cancel_listeners();
        }
        self.endpoint.shut_down();
    }

    fn cancel_listeners(&mut self) {
        for i in 0..self.listeners.len() {
            if self.listeners[i].recv_armed {
                let token = Token::ListenerRecv(i as u32).encode();
                self.ring.push(sqe::cancel(token));
            }
        }
    }

    pub(super) fn advance_shutdown(&mut self, now: Instant) {
        let Phase::Draining { deadline } = self.phase else {
            return;
        };
        if self.single_port && (self.live == 0 || now >= deadline) {
            self.cancel_listeners();
        }
        if self.live == 0 {
            self.phase = Phase::Final {
                deadline: now + self.final_drain,
            };
        } else if now >= deadline {
            let ids: Vec<SessionId> = self.socks.iter().flatten().map(|l| l.id).collect();
            for id in ids {
                self.endpoint.abort(now, id, Abort::ShuttingDown);
                self.touch(id);
            }
            self.phase = Phase::Final {
                deadline: now + self.final_drain,
            };
        }
    }

    pub(super) fn should_exit(&self, now: Instant) -> bool {
        let Phase::Final { deadline } = self.phase else {
            return false;
        };
        let quiet = self.live == 0
            && self.sends.in_flight() == 0
            && self.closing.is_empty()
            && self.lingering.is_empty()
            && self.ring.backlog_is_empty()
            && self.listeners.iter().all(|l| !l.recv_armed);
        quiet || now >= deadline
    }

    /// Cancels every operation still in the kernel and reaps completions
    /// until none is left (bounded by `reap_bound`); only then may buffer
    /// rings, send slots and mappings be freed (`free`). Past the bound they
    /// are marked for leaking instead.
    pub(super) fn teardown(&mut self) {
        // Never reached the kernel: nothing to wait for.
        self.ring.clear_backlog();
        self.exit.outstanding_at_teardown = self.ring.outstanding();
        if self.ring.outstanding() > 0 {
            self.ring.push(sqe::cancel_all());
        }
        let deadline = Instant::now() + self.reap_bound;
        let mut cqes = mem::take(&mut self.cqes);
        for _ in 0..REAP_TURNS {
            let now = Instant::now();
            if self.ring.outstanding() == 0 || now >= deadline {
                break;
            }
            self.ring.flush_backlog();
            let ts = types::Timespec::from(deadline - now);
            let args = types::SubmitArgs::new().timespec(&ts);
            match self.ring.submit_and_wait(1, &args) {
                Ok(_) => {}
                Err(e) if is_transient(&e) => {}
                Err(_) => break,
            }
            self.ring.reap(&mut cqes);
            cqes.clear();
        }
        self.cqes = cqes;
        self.exit.outstanding_at_free = self.ring.outstanding();
        if self.ring.outstanding() == 0 {
            let submitter = self.ring.submitter();
            let _ = self.listen_bufs.unregister(&submitter);
            let _ = self.session_bufs.unregister(&submitter);
        } else {
            self.exit.leaked = true;
            tracing::error!(
                shard = self.index,
                outstanding = self.ring.outstanding(),
                "ring operations still outstanding {:?} after cancelling them; \
                 leaking send slots, file mappings and buffer rings",
                self.reap_bound
            );
        }
        self.exit.counters = self.counters;
        self.counters.log_dropped += log::take_local_drops();
        self.exit.counters = self.counters;
        if self.log_transfers {
            let c = self.counters;
            tracing::info!(
                target: "ringtftpd::shard",
                event = "shard_exit",
                shard = self.index,
                turns = c.turns,
                requests = c.requests,
                refused = c.refused,
                ignored = c.ignored,
                started = c.started,
                busy = c.busy,
                finished = c.finished,
                datagrams_in = c.datagrams_in,
                sends = c.sends,
                send_errors = c.send_errors,
                send_faults = c.send_faults,
                replies_dropped = c.replies_dropped,
                recv_errors = c.recv_errors,
                rearms = c.rearms,
                ring_dry = c.ring_dry,
                log_dropped = c.log_dropped,
                pool_flushes = c.pool_flushes,
                truncated = c.truncated,
                gso_sends = c.gso_sends,
                gso_fallbacks = c.gso_fallbacks,
                upload_backlog_drops = c.upload_backlog_drops,
                cancelled_at_exit = self.exit.outstanding_at_teardown,
                outstanding_at_free = self.exit.outstanding_at_free,
                // The counts by reason, as `refused_REASON=N ...`.
                "{}",
                self.endpoint.refusals()
            );
        }
        if self.log_transfers || self.exit.leaked {
            // The last lines out before the process may end; bounded, as
            // stderr may be stuck.
            log::flush(LOG_FLUSH);
        }
    }

    /// Drops the shard after `teardown`, or `abandon`s it if the kernel may
    /// still use its memory.
    pub(super) fn free(self) -> ExitReport {
        let report = self.exit;
        if report.leaked {
            self.abandon();
        }
        report
    }

    /// Frees nothing the kernel may still read or write: buffer rings, send
    /// slots (msghdrs, iovecs, headers), the mappings their iovecs point
    /// into (live and lingering sessions'), the receive msghdrs and the wake
    /// buffer are leaked; the ring and the sockets are closed (the kernel
    /// holds its own references to files it is using).
    pub(super) fn abandon(self) {
        let Shard {
            ring,
            listen_bufs,
            session_bufs,
            listen_msghdr,
            session_msghdr,
            wake_buf,
            endpoint,
            sends,
            lingering,
            ..
        } = self;
        mem::forget((
            listen_bufs,
            session_bufs,
            listen_msghdr,
            session_msghdr,
            wake_buf,
            endpoint,
            sends,
            lingering,
        ));
        drop(ring);
    }
}
