//! The receive path: multishot receives on listeners (requests, which may
//! start sessions) and on transfer sockets (ACKs and ERRORs for sessions),
//! each buffer back in its ring as soon as its datagram was handled, and
//! the re-arming of receives that ended.

use std::collections::HashMap;
use std::io;
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use io_uring::{cqueue, types};

use super::token::{EPOCH_MASK, Token};
use super::{
    Counters, Held, LISTEN_BGID, Listener, LiveSock, Phase, SESSION_BGID, Shard, ShardFiles, Via,
    batch, cmsg, net, sqe,
};
use crate::endpoint::{DatagramOutcome, Endpoint, RequestOutcome, Route, SessionId};
use crate::metrics::{self, Admission, Direction};
use crate::refusal::Abort;

#[derive(Debug, Clone, Copy)]
pub(super) enum Rearm {
    Listener(u32),
    Sock(u32),
}

/// How long a looked-up interface MTU is trusted (MTUs change rarely).
const MTU_TTL: Duration = Duration::from_secs(30);

/// MTU of the interface a request came in on, cached per ifindex.
fn lookup_mtu(
    cache: &mut HashMap<u32, (Option<u32>, Instant)>,
    listeners: &[Listener],
    li: u32,
    ifindex: u32,
    now: Instant,
) -> Option<u32> {
    if ifindex == 0 {
        return None;
    }
    if let Some(&(mtu, read_at)) = cache.get(&ifindex)
        && now.saturating_duration_since(read_at) < MTU_TTL
    {
        return mtu;
    }
    let l = listeners.get(li as usize)?;
    let mtu = net::interface_mtu(l.sock.as_fd(), ifindex).ok();
    if cache.len() >= 4096 {
        cache.clear();
    }
    cache.insert(ifindex, (mtu, now));
    mtu
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// What a datagram at a listener turned out to be.
enum Arrived {
    /// A single-port session's, handled.
    Session(SessionId, DatagramOutcome<'static>),
    /// A request (or a stranger's datagram), with the peer's live session
    /// it may have ended and the ingress MTU.
    Request(RequestOutcome, Option<SessionId>, Option<u32>),
}

/// Gives session `id` a datagram from `from`, and an upload's accepted
/// bytes to its writer. An upload's DATA is dropped while the writers are
/// backlogged: the sender retransmits it later. What is returned borrows
/// nothing (accepted bytes come back as `Delivered`).
#[allow(clippy::too_many_arguments)]
fn deliver(
    endpoint: &mut Endpoint<Held>,
    files: &mut ShardFiles,
    counters: &mut Counters,
    reply: &mut [u8],
    now: Instant,
    id: SessionId,
    from: SocketAddr,
    datagram: &[u8],
) -> DatagramOutcome<'static> {
    let upload = match endpoint.session(id).map(|v| v.handle) {
        Some(Held::Write(key)) => Some(*key),
        _ => None,
    };
    if upload.is_some() && files.uploads.as_ref().is_some_and(|d| d.is_backlogged()) {
        counters.upload_backlog_drops += 1;
        return DatagramOutcome::Ignored;
    }
    let outcome = endpoint.handle_datagram(now, id, from, datagram, reply);
    if let (DatagramOutcome::Received(r), Some(key), Some(desk)) = (outcome, upload, &files.uploads)
    {
        counters.metrics.data_received(r.bytes.len());
        desk.store(key, r.offset, r.bytes, r.last);
    }
    match outcome {
        DatagramOutcome::Reply(n) => DatagramOutcome::Reply(n),
        DatagramOutcome::Ignored => DatagramOutcome::Ignored,
        _ => DatagramOutcome::Delivered,
    }
}

impl Shard {
    pub(super) fn arm_listener(&mut self, index: u32) {
        let Some(l) = self.listeners.get_mut(index as usize) else {
            return;
        };
        let sqe = sqe::recv_multi(
            l.sock.as_raw_fd(),
            &self.listen_msghdr,
            LISTEN_BGID,
            Token::ListenerRecv(index),
        );
        l.recv_armed = true;
        self.ring.push(sqe);
    }

    pub(super) fn arm_sock_recv(&mut self, si: u32) {
        let epoch = self.next_epoch;
        self.next_epoch = self.next_epoch.wrapping_add(1) & EPOCH_MASK;
        let token = Token::SessionRecv { index: si, epoch };
        let Some(ts) = self.tsocks.get_mut(si as usize).and_then(|t| t.as_mut()) else {
            return;
        };
        let fd = ts.fd.as_raw_fd();
        ts.recv = Some(token.encode());
        let sqe = sqe::recv_multi(fd, &self.session_msghdr, SESSION_BGID, token);
        self.ring.push(sqe);
    }

    pub(super) fn on_listener_recv(&mut self, now: Instant, li: u32, res: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let listening = self.listening();
        let Some(l) = self.listeners.get_mut(li as usize) else {
            drop(bid.and_then(|b| self.listen_bufs.take(b, 0)));
            return;
        };
        let bound = l.bound;
        if !cqueue::more(flags) {
            l.recv_armed = false;
            if listening {
                self.rearm.push(Rearm::Listener(li));
                self.counters.rearms += 1;
            }
        }
        if res < 0 {
            drop(bid.and_then(|b| self.listen_bufs.take(b, 0)));
            match -res {
                libc::ENOBUFS => self.counters.ring_dry += 1,
                libc::ECANCELED => {}
                _ => self.counters.recv_errors += 1,
            }
            return;
        }
        // The guard lives in this block only: the buffer goes back to the
        // ring on every path, right after the endpoint has seen it.
        let (arrived, peer, local, ifindex) = {
            let Some(buf) = bid.and_then(|b| self.listen_bufs.take(b, res as usize)) else {
                return;
            };
            if !listening {
                return;
            }
            self.counters.datagrams_in += 1;
            let Ok(out) = types::RecvMsgOut::parse(&buf, &self.listen_msghdr) else {
                return;
            };
            let Some(peer) = net::parse_sockaddr(out.name_data()).map(net::canonical) else {
                return;
            };
            let oversized = out.is_payload_truncated();
            let (mut local, ifindex) = match cmsg::parse_pktinfo(out.control_data()) {
                Some(info) => (info.local, info.ifindex),
                None => (net::canonical(bound).ip(), 0),
            };
            if local.is_ipv4() != peer.is_ipv4() {
                local = unspecified_like(peer.ip());
            }
            // Single port: a live session's ACKs and DATA come here. With
            // SO_REUSEPORT the kernel picks a shard's listener by a hash of
            // the 4-tuple, and a client sends its ACKs from the address and
            // port of its request to the address and port our replies left
            // from (the request's, by pktinfo): the same 4-tuple, so they
            // reach the shard holding its session as long as the group of
            // listeners is unchanged (every shard's lives until exit). One
            // that strayed all the same finds no session here and is
            // answered as a stranger.
            let route = self.endpoint.route(peer, out.payload_data());
            let arrived = match route {
                Route::Session(_) if oversized => {
                    // No ACK is that long, and a cut DATA must not be read
                    // as whole.
                    self.counters.truncated += 1;
                    return;
                }
                Route::Session(id) => Arrived::Session(
                    id,
                    deliver(
                        &mut self.endpoint,
                        &mut self.files,
                        &mut self.counters,
                        &mut self.reply[..],
                        now,
                        id,
                        peer,
                        out.payload_data(),
                    ),
                ),
                Route::Request { live } => {
                    let mtu = lookup_mtu(&mut self.mtu_cache, &self.listeners, li, ifindex, now);
                    self.counters.requests += 1;
                    let refused_before = metrics::refusals_so_far(self.endpoint.refusals());
                    let outcome = if oversized {
                        self.counters.truncated += 1;
                        self.endpoint
                            .refuse_oversized(now, peer, &mut self.reply[..])
                    } else {
                        // Only for what may be a request (RRQ, WRQ): garbage
                        // and strays never cost a neighbour query.
                        let request = matches!(out.payload_data().get(..2), Some([0, 1] | [0, 2]));
                        let mac = if request && self.endpoint.settings().lookup_mac {
                            self.neigh.lookup(now, peer.ip(), ifindex)
                        } else {
                            None
                        };
                        self.endpoint.handle_request_with_mac(
                            now,
                            peer,
                            mac,
                            local,
                            mtu,
                            out.payload_data(),
                            &mut self.files,
                            &mut self.reply[..],
                        )
                    };
                    let refused =
                        metrics::refusals_so_far(self.endpoint.refusals()) > refused_before;
                    self.counters
                        .metrics
                        .listener_datagram(out.payload_data(), Admission::of(&outcome, refused));
                    Arrived::Request(outcome, live, mtu)
                }
            };
            (arrived, peer, local, ifindex)
        };
        match arrived {
            Arrived::Session(id, outcome) => match outcome {
                DatagramOutcome::Reply(n) => self.reply_from_listener(li, n, peer, local, ifindex),
                DatagramOutcome::Ignored => {}
                _ => self.touch(id),
            },
            Arrived::Request(outcome, live, mtu) => {
                // A new request may have ended the peer's running session:
                // serving it lets it go.
                if let Some(old) = live {
                    self.touch(old);
                }
                match outcome {
                    RequestOutcome::Started(id) => self.start_session(now, id, li, ifindex, mtu),
                    RequestOutcome::Reply(n) => {
                        self.counters.refused += 1;
                        self.reply_from_listener(li, n, peer, local, ifindex);
                    }
                    RequestOutcome::Ignored => self.counters.ignored += 1,
                }
            }
        }
    }

    /// Listeners take datagrams while running, and on a single port also
    /// while draining: the live sessions' ACKs come to them.
    pub(super) fn listening(&self) -> bool {
        match self.phase {
            Phase::Running => true,
            Phase::Draining { .. } => self.single_port,
            Phase::Final { .. } => false,
        }
    }

    pub(super) fn start_session(
        &mut self,
        now: Instant,
        id: SessionId,
        li: u32,
        ifindex: u32,
        mtu: Option<u32>,
    ) {
        let Some(view) = self.endpoint.session(id) else {
            return;
        };
        let (peer, local) = (view.peer, view.local);
        let gso_allowed = self.no_gso.allows(now, local, peer.ip());
        let segments = batch::segments(
            view.blksize,
            view.windowsize,
            local.is_ipv6(),
            mtu,
            gso_allowed,
        );
        let (blksize, windowsize) = (view.blksize, view.windowsize);
        let write = matches!(view.handle, Held::Write(_));
        let slot_free = self
            .socks
            .get(id.index as usize)
            .is_some_and(|s| s.is_none());
        let listener_v6 = self.listeners.get(li as usize).map(|l| l.v6);
        let sock = if !slot_free || local.is_ipv4() != peer.is_ipv4() {
            Err(io::Error::from(io::ErrorKind::InvalidInput))
        } else if self.single_port {
            // No socket of its own: it runs on the listener it came to.
            listener_v6
                .map(|v6| (Via::Listener { index: li, ifindex }, v6))
                .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        } else {
            self.acquire_sock(id, local, ifindex, peer)
                .map(|si| (Via::Transfer(si), local.is_ipv6()))
        };
        match sock {
            Ok((via, v6)) => {
                if let Some(slot) = self.socks.get_mut(id.index as usize) {
                    *slot = Some(LiveSock {
                        id,
                        sock: via,
                        peer,
                        local,
                        v6,
                        blksize,
                        segments,
                        gso_proven: false,
                        inflight: 0,
                        touched: false,
                        queued: false,
                        faulted: false,
                        started: now,
                        sent_first_data: false,
                    });
                    self.live += 1;
                    self.counters.metrics.started(Direction::of(write));
                }
                if let (Some(Held::Write(key)), Some(desk)) = (
                    self.endpoint.session(id).map(|v| v.handle),
                    &mut self.files.uploads,
                ) {
                    desk.sessions.insert(*key, id);
                }
                self.counters.started += 1;
                tracing::debug!(
                    shard = self.index,
                    client = %peer,
                    %local,
                    direction = %(if write { "write" } else { "read" }),
                    blksize,
                    windowsize,
                    segments,
                    "transfer started"
                );
                self.touch(id);
            }
            Err(_) => {
                // EMFILE and friends: the endpoint stays silent (the
                // client retransmits) until its patience, then answers busy.
                self.counters.busy += 1;
                self.counters.metrics.start_refused(Direction::of(write));
                if let RequestOutcome::Reply(n) =
                    self.endpoint.refuse_busy(now, id, &mut self.reply[..])
                {
                    self.reply_from_listener(li, n, peer, local, ifindex);
                }
            }
        }
    }

    pub(super) fn on_session_recv(
        &mut self,
        now: Instant,
        token: u64,
        si: u32,
        res: i32,
        flags: u32,
    ) {
        let bid = cqueue::buffer_select(flags);
        let ts = self
            .tsocks
            .get_mut(si as usize)
            .and_then(|s| s.as_mut())
            .filter(|t| t.recv == Some(token));
        let Some(ts) = ts else {
            drop(bid.and_then(|b| self.session_bufs.take(b, 0)));
            // A closed socket's receive: its final CQE lets the socket close.
            if !cqueue::more(flags)
                && let Some(fd) = self.closing.remove(&token)
            {
                self.to_close.push(fd);
            }
            return;
        };
        let owner = ts.owner;
        let (fd, v6) = (ts.fd.as_raw_fd(), ts.v6);
        if !cqueue::more(flags) {
            ts.recv = None;
            if res >= 0 || res == -libc::ENOBUFS {
                self.rearm.push(Rearm::Sock(si));
                self.counters.rearms += 1;
            }
        }
        if res < 0 {
            drop(bid.and_then(|b| self.session_bufs.take(b, 0)));
            match -res {
                libc::ENOBUFS => self.counters.ring_dry += 1,
                libc::ECANCELED => {}
                _ => {
                    // The socket cannot receive: end its transfer rather
                    // than spin re-arming, and never pool it again.
                    self.counters.recv_errors += 1;
                    if !cqueue::more(flags) {
                        ts.broken = true;
                        match owner {
                            Some(id) => {
                                self.endpoint.abort(now, id, Abort::ReceiveFailed);
                                self.touch(id);
                            }
                            None => self.drop_idle(si),
                        }
                    }
                }
            }
            return;
        }
        let (outcome, from, id) = {
            let Some(buf) = bid.and_then(|b| self.session_bufs.take(b, res as usize)) else {
                return;
            };
            self.counters.datagrams_in += 1;
            // An idle pooled socket: a late packet of a finished transfer.
            let Some(id) = owner else {
                return;
            };
            let Ok(out) = types::RecvMsgOut::parse(&buf, &self.session_msghdr) else {
                return;
            };
            // Longer than a session buffer (MSG_TRUNC): no ACK or ERROR is
            // that long, and a cut datagram must not be read as whole.
            if out.is_payload_truncated() {
                self.counters.truncated += 1;
                return;
            }
            let Some(from) = net::parse_sockaddr(out.name_data()).map(net::canonical) else {
                return;
            };
            let outcome = deliver(
                &mut self.endpoint,
                &mut self.files,
                &mut self.counters,
                &mut self.reply[..],
                now,
                id,
                from,
                out.payload_data(),
            );
            (outcome, from, id)
        };
        match outcome {
            DatagramOutcome::Delivered | DatagramOutcome::Received(_) => self.touch(id),
            DatagramOutcome::Reply(n) => self.send_reply(fd, v6, n, from, None),
            DatagramOutcome::Ignored => {}
        }
    }

    pub(super) fn rearm_recvs(&mut self) {
        let mut list = mem::take(&mut self.rearm);
        for r in list.drain(..) {
            match r {
                Rearm::Listener(i) => {
                    let armed = self.listeners.get(i as usize).is_none_or(|l| l.recv_armed);
                    if self.listening() && !armed {
                        self.arm_listener(i);
                    }
                }
                Rearm::Sock(si) => {
                    let unarmed = self
                        .tsocks
                        .get(si as usize)
                        .and_then(|t| t.as_ref())
                        .is_some_and(|t| t.recv.is_none());
                    if unarmed {
                        self.arm_sock_recv(si);
                    }
                }
            }
        }
        self.rearm = list;
    }
}
