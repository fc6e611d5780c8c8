//! Sessions' transmits into sends: each session touched this turn (or
//! waiting for a send slot) drains `poll_transmit` into `SendMsg` SQEs,
//! a window's full DATA blocks batched into UDP GSO sends (`batch.rs`);
//! replies that belong to no session; send completions, and the resend
//! one packet per send of a GSO send its path refused.

use std::io;
use std::mem;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

use super::batch::{Batch, Offer};
use super::send::{HEADER_CAP, MAX_SEGMENTS, Owner};
use super::{Held, REPLY_CAP, Shard, Via, gso, sqe};
use crate::endpoint::{Finished, SessionId};
use crate::log;
use crate::metrics::Direction;
use crate::refusal::Abort;
use crate::session::Transmit;

/// Most sends one session may queue per service, so one big window does
/// not starve the others.
const SERVE_BUDGET: usize = 256;

/// Scratch space of `serve`: the packet just polled and the payloads of a
/// segmented send.
pub(super) struct ServeWork {
    header: [u8; HEADER_CAP],
    payloads: [(*const u8, usize); MAX_SEGMENTS],
}

impl Default for ServeWork {
    fn default() -> Self {
        ServeWork {
            header: [0; HEADER_CAP],
            payloads: [(std::ptr::null(), 0); MAX_SEGMENTS],
        }
    }
}

impl Shard {
    pub(super) fn serve_ready(&mut self, now: Instant) {
        // Bounded: a session served here may queue itself again.
        let mut rounds = self.ready.len();
        while rounds > 0 && self.sends.has_free() {
            rounds -= 1;
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(live) = self.live_mut(id) else {
                continue;
            };
            live.queued = false;
            self.serve(now, id);
        }
    }

    pub(super) fn serve_touched(&mut self, now: Instant) {
        let mut list = mem::take(&mut self.touched);
        for &id in &list {
            if let Some(live) = self.live_mut(id) {
                live.touched = false;
                self.serve(now, id);
            }
        }
        list.clear();
        if self.touched.is_empty() {
            self.touched = list;
        }
    }

    /// The session's next transmit, its header in `buf`, its payload
    /// resolved to a pointer into the file (None for OACK and ERROR).
    pub(super) fn poll_one(
        &mut self,
        now: Instant,
        id: SessionId,
        buf: &mut [u8],
    ) -> Option<(usize, Option<(*const u8, usize)>)> {
        if self.panic_on_send {
            panic!("RINGTFTPD_TEST_PANIC_SHARD={}", self.index);
        }
        loop {
            let t = self.endpoint.poll_transmit(now, id, buf)?;
            let Transmit::Data {
                payload: p,
                block: number,
                ..
            } = t
            else {
                if let Transmit::Error { code, .. } = t {
                    self.counters.metrics.error_sent(code);
                }
                return Some((t.header_len(), None));
            };
            // Translates netascii as far as this block, and checks the file
            // against its open-time fstat before the final block (see
            // FileData::block). Only a read sends DATA.
            let block = match self.endpoint.session(id)?.handle {
                Held::Read(data) => data.block(p.offset, p.len),
                Held::Write(_) => return None,
            };
            match block {
                Ok(b) => {
                    // A netascii length is learnt at its end; the session
                    // then stops after this (possibly short) block.
                    if let Some(end) = b.end {
                        self.endpoint.set_content_len(id, end);
                    }
                    self.counters.metrics.data_sent(b.len);
                    if number == 1
                        && let Some(live) = self.live_mut(id)
                        && !live.sent_first_data
                    {
                        live.sent_first_data = true;
                        let waited = now.saturating_duration_since(live.started);
                        self.counters.metrics.first_data(waited);
                    }
                    return Some((t.header_len(), Some((b.ptr, b.len))));
                }
                // The file changed before its final block, shrank, or a read
                // failed: send the ERROR instead.
                Err(e) => self.endpoint.abort(now, id, e.abort()),
            }
        }
    }

    /// Drains a session's transmits into sends, re-arms its timer, and
    /// removes it once finished. Consecutive DATA packets of a window go
    /// out as one UDP GSO send where the session allows it.
    pub(super) fn serve(&mut self, now: Instant, id: SessionId) {
        let Some(live) = self.live_mut(id) else {
            return;
        };
        let (sock, peer, v6, gso_proven) = (live.sock, live.peer, live.v6, live.gso_proven);
        let (blksize, max_segments) = (usize::from(live.blksize), usize::from(live.segments));
        let local = live.local;
        let Some((fd, source)) = self.via_fd(sock, local) else {
            return;
        };
        // Reused across calls: zeroing 1.7 KiB per call was about 7 % of the
        // user-space instructions per block.
        let mut work = self.serve_work.take().unwrap_or_default();
        let ServeWork {
            header: scratch,
            payloads,
        } = &mut *work;
        // A transmit polled into `scratch` that did not fit the last send.
        let mut carried: Option<(usize, Option<(*const u8, usize)>)> = None;
        let mut sent = 0u32;
        let mut budget = SERVE_BUDGET;
        loop {
            if carried.is_none() && budget == 0 {
                self.enqueue_ready(id);
                break;
            }
            let Some(si) = self.sends.alloc() else {
                self.enqueue_ready(id);
                break;
            };
            let first = match carried.take() {
                Some(first) => first,
                None => {
                    budget -= 1;
                    match self.poll_one(now, id, scratch) {
                        Some(first) => first,
                        None => {
                            self.sends.release(si);
                            break;
                        }
                    }
                }
            };
            let (header_len, payload) = first;
            let Some(slot) = self.sends.slot_mut(si) else {
                break;
            };
            slot.header[..header_len].copy_from_slice(&scratch[..header_len]);
            let mut batch = Batch::start(blksize, max_segments, header_len, payload.map(|p| p.1));
            if let Some(p) = payload {
                payloads[0] = p;
            }
            // Keep a slot free for a transmit that does not fit.
            while batch.wants_more() && budget > 0 && self.sends.has_free() {
                budget -= 1;
                let Some(next) = self.poll_one(now, id, scratch) else {
                    break;
                };
                if batch.offer(next.0, next.1.map(|p| p.1)) == Offer::Carry {
                    carried = Some(next);
                    break;
                }
                let k = batch.count() - 1;
                if let Some(slot) = self.sends.slot_mut(si) {
                    slot.header[4 * k..4 * k + 4].copy_from_slice(&scratch[..4]);
                }
                payloads[k] = next.1.unwrap_or((std::ptr::null(), 0));
            }
            let Some(slot) = self.sends.slot_mut(si) else {
                break;
            };
            let msg = if batch.segmented() {
                slot.prepare_segments(
                    Owner::Session(id),
                    &payloads[..batch.count()],
                    (blksize + 4) as u16,
                    peer,
                    v6,
                    source,
                )
            } else {
                slot.prepare(Owner::Session(id), header_len, payload, peer, v6, source)
            };
            match msg {
                Some(msg) => {
                    self.ring.push(sqe::send_msg(fd, msg, si));
                    self.sends_queued += 1;
                    self.gso_probe_queued |= batch.segmented() && !gso_proven;
                    sent += 1;
                }
                None => {
                    self.sends.release(si);
                    break;
                }
            }
        }
        self.serve_work = Some(work);
        if let Some(live) = self.live_mut(id) {
            live.inflight += sent;
        }
        // Per session and turn: only with -vv.
        tracing::trace!(shard = self.index, session = id.index, sent, "sends queued");
        match self.endpoint.poll_timeout(id) {
            Some(deadline) => self.wheel.arm(id.index, deadline),
            None => self.wheel.cancel(id.index),
        }
        if let Some(finished) = self.endpoint.poll_event(id) {
            self.finish(now, id, finished);
        }
    }

    fn finish(&mut self, now: Instant, id: SessionId, finished: Finished<Held>) {
        self.wheel.cancel(id.index);
        self.counters.finished += 1;
        let Some(live) = self
            .socks
            .get_mut(id.index as usize)
            .and_then(|s| s.take_if(|l| l.id == id))
        else {
            return;
        };
        self.live -= 1;
        let direction = Direction::of(finished.write);
        let (outcome, stats) = (&finished.outcome, &finished.stats);
        self.counters
            .metrics
            .finished(direction, outcome, stats, now);
        if let Some(labels) = &self.file_labels {
            labels.finished(&finished.filename, direction, outcome, stats, now);
        }
        if let Via::Transfer(si) = live.sock {
            self.release_sock(si, live.peer);
        }
        if let (Held::Write(key), Some(desk)) = (&finished.handle, &mut self.files.uploads) {
            desk.cancel(*key);
        }
        if self.log_transfers || self.hook.is_some() {
            let record = finished.record();
            if let Some(hook) = &self.hook {
                hook.offer(record.clone());
            }
            if self.log_transfers {
                log::events::transfer(&record, live.local);
                self.counters.log_dropped += log::take_local_drops();
            }
        }
        if live.inflight > 0 {
            self.lingering.insert(id, (finished.handle, live.inflight));
        }
    }

    pub(super) fn reply_from_listener(
        &mut self,
        li: u32,
        n: usize,
        peer: SocketAddr,
        local: IpAddr,
        ifindex: u32,
    ) {
        let Some(l) = self.listeners.get(li as usize) else {
            return;
        };
        let (fd, v6) = (l.sock.as_raw_fd(), l.v6);
        self.send_reply(fd, v6, n, peer, Some((local, ifindex)));
    }

    /// Sends `reply[..n]`, owned by no session.
    pub(super) fn send_reply(
        &mut self,
        fd: RawFd,
        v6: bool,
        n: usize,
        dest: SocketAddr,
        source: Option<(IpAddr, u32)>,
    ) {
        let n = n.min(REPLY_CAP);
        if n == 0 {
            return;
        }
        let Some(si) = self.sends.alloc() else {
            self.counters.replies_dropped += 1;
            return;
        };
        let Some(slot) = self.sends.slot_mut(si) else {
            return;
        };
        slot.header[..n].copy_from_slice(&self.reply[..n]);
        match slot.prepare(Owner::Reply, n, None, dest, v6, source) {
            Some(msg) => {
                self.ring.push(sqe::send_msg(fd, msg, si));
                self.sends_queued += 1;
                self.counters.metrics.reply_sent(&self.reply[..n]);
            }
            None => {
                self.sends.release(si);
            }
        }
    }

    pub(super) fn on_send(&mut self, now: Instant, si: u32, res: i32) {
        let segmented = self.sends.slot_mut(si).is_some_and(|s| s.segments() > 1);
        if segmented && res < 0 && gso::refuses_gso(-res) && self.resend_unsegmented(now, si, -res)
        {
            return;
        }
        let Some(owner) = self.sends.release(si) else {
            return;
        };
        if res >= 0 {
            self.counters.sends += 1;
            if segmented {
                self.counters.gso_sends += 1;
                if let Owner::Session(id) = owner
                    && let Some(live) = self.live_mut(id)
                {
                    live.gso_proven = true;
                }
            }
        } else {
            // ECONNREFUSED (ICMP), EAGAIN...: the retransmit timer covers it.
            self.counters.send_errors += 1;
        }
        let Owner::Session(id) = owner else { return };
        if let Some(live) = self.live_mut(id) {
            live.inflight = live.inflight.saturating_sub(1);
            if res == -libc::EFAULT && !live.faulted {
                live.faulted = true;
                self.counters.send_faults += 1;
                self.endpoint.abort(now, id, Abort::FileChanged);
                self.touch(id);
            }
        } else if let Some(entry) = self.lingering.get_mut(&id) {
            entry.1 = entry.1.saturating_sub(1);
            if entry.1 == 0 {
                self.lingering.remove(&id);
            }
        }
    }

    /// A segmented send in slot `si` failed with `errno`, which its path
    /// gives GSO sends only: remember the path, stop segmenting for every
    /// live session on it, and send the same packets one per send now, so
    /// the window does not wait for a retransmit timeout. Returns false
    /// (slot untouched) when its session is gone: nothing to resend.
    pub(super) fn resend_unsegmented(&mut self, now: Instant, si: u32, errno: i32) -> bool {
        let Some(Owner::Session(id)) = self.sends.slot_mut(si).map(|s| s.owner()) else {
            return false;
        };
        let Some(live) = self.live_mut(id) else {
            return false;
        };
        let (local, peer, sock, v6) = (live.local, live.peer, live.sock, live.v6);
        let Some((fd, source)) = self.via_fd(sock, local) else {
            return false;
        };
        self.counters.gso_fallbacks += 1;
        if self.no_gso.refuse(now, local, peer.ip()) {
            tracing::warn!(
                shard = self.index,
                client = %peer.ip(),
                %local,
                error = %io::Error::from_raw_os_error(errno),
                "UDP GSO failed: one packet per send to this client for {} s",
                gso::NO_GSO_TTL.as_secs()
            );
        }
        for l in self.socks.iter_mut().flatten() {
            if l.local == local && l.peer.ip() == peer.ip() {
                l.segments = 1;
            }
        }
        let mut work = self.serve_work.take().unwrap_or_default();
        let ServeWork { header, payloads } = &mut *work;
        let n = self
            .sends
            .slot_mut(si)
            .map_or(0, |s| s.unsegment(header, payloads));
        // Packet 0 reuses the failed send's slot (its header is in place);
        // packets without a free slot are left to the retransmit timer.
        let mut queued = 0u32;
        for k in 0..n {
            let slot_index = if k == 0 { Some(si) } else { self.sends.alloc() };
            let Some(sj) = slot_index else { break };
            let Some(slot) = self.sends.slot_mut(sj) else {
                break;
            };
            slot.header[..4].copy_from_slice(&header[4 * k..4 * k + 4]);
            let payload = Some(payloads[k]).filter(|p| p.1 > 0);
            match slot.prepare(Owner::Session(id), 4, payload, peer, v6, source) {
                Some(msg) => {
                    self.ring.push(sqe::send_msg(fd, msg, sj));
                    self.sends_queued += 1;
                    queued += 1;
                }
                None => {
                    self.sends.release(sj);
                    break;
                }
            }
        }
        self.serve_work = Some(work);
        if queued == 0 {
            // Nothing went out in its place: complete it as a failed send.
            return false;
        }
        if let Some(live) = self.live_mut(id) {
            // The failed send's completion is replaced by `queued` sends.
            live.inflight += queued - 1;
        }
        true
    }
}
