//! The shard's transfer sockets: a table of them (receive tokens carry
//! their index), live or idle in the pool (`pool.rs` decides which idle one
//! a transfer gets), and their closing, which waits until the kernel is
//! done with them.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::pool::{self, Local};
use super::{Phase, Rearm, Shard, Via, net, sqe};
use crate::endpoint::SessionId;

/// A transfer socket: owned by a live session, or idle in the pool.
pub(super) struct TransferSock {
    pub(super) fd: OwnedFd,
    pub(super) v6: bool,
    /// The local address (and IPv6 link-local scope) it is bound to.
    pub(super) key: Local,
    /// The token of its armed multishot receive, if armed.
    pub(super) recv: Option<u64>,
    pub(super) owner: Option<SessionId>,
    /// A receive failed: close it rather than pool it.
    pub(super) broken: bool,
}

impl Shard {
    pub(super) fn tsock_fd(&self, si: u32) -> Option<RawFd> {
        let ts = self.tsocks.get(si as usize)?.as_ref()?;
        Some(ts.fd.as_raw_fd())
    }

    /// The socket a session sends from, and the source address its sends
    /// must name: a listener may be bound to a wildcard address, so a
    /// single-port session's datagrams carry the address its request was
    /// sent to (as the listener's own replies do).
    pub(super) fn via_fd(&self, via: Via, local: IpAddr) -> Option<(RawFd, Option<(IpAddr, u32)>)> {
        match via {
            Via::Transfer(si) => Some((self.tsock_fd(si)?, None)),
            Via::Listener { index, ifindex } => {
                let l = self.listeners.get(index as usize)?;
                Some((l.sock.as_raw_fd(), Some((local, ifindex))))
            }
        }
    }

    /// A transfer socket bound to `local` for `peer`: an idle one drawn at
    /// random from the pool if it offers enough (never the one `peer` used
    /// last), else a new one.
    pub(super) fn acquire_sock(
        &mut self,
        id: SessionId,
        local: IpAddr,
        ifindex: u32,
        peer: SocketAddr,
    ) -> io::Result<u32> {
        let scope = match local {
            IpAddr::V6(ip) if ip.is_unicast_link_local() => ifindex,
            _ => 0,
        };
        let key = (local, scope);
        if let Some(si) = self.idle.take(key, peer)
            && let Some(ts) = self.tsocks.get_mut(si as usize).and_then(|t| t.as_mut())
        {
            ts.owner = Some(id);
            if ts.recv.is_none() {
                self.rearm.push(Rearm::Sock(si));
            }
            return Ok(si);
        }
        let ports = match &mut self.ports {
            Some(range) => range.candidates(),
            None => Vec::new(),
        };
        // No range: port 0, the kernel's (random) choice.
        let ports = if ports.is_empty() { &[0][..] } else { &ports };
        let fd = match net::transfer_socket(local, ifindex, ports) {
            Ok(fd) => fd,
            // Out of descriptors or socket memory: idle pooled sockets hold
            // both; give them up and try once more.
            Err(e) if pool::close_idle_and_retry(&e, self.idle.len()) => {
                self.counters.pool_flushes += 1;
                self.close_idle_now();
                net::transfer_socket(local, ifindex, ports)?
            }
            Err(e) => return Err(e),
        };
        let ts = TransferSock {
            fd,
            v6: local.is_ipv6(),
            key,
            recv: None,
            owner: Some(id),
            broken: false,
        };
        let si = match self.tsocks_free.pop() {
            Some(si) => {
                self.tsocks[si as usize] = Some(ts);
                si
            }
            None => {
                self.tsocks.push(Some(ts));
                (self.tsocks.len() - 1) as u32
            }
        };
        self.arm_sock_recv(si);
        Ok(si)
    }

    /// Closes every idle pooled socket, at once if possible so that their
    /// descriptors are free for the caller: once an enter consumed every
    /// queued SQE, no SQE names them any more, and an armed receive holds
    /// its own reference to the socket until its cancel ends it.
    pub(super) fn close_idle_now(&mut self) {
        self.ring.flush_backlog();
        let _ = self.ring.submit();
        let consumed = self.ring.all_consumed();
        for si in self.idle.drain() {
            self.close_sock(si);
        }
        if consumed {
            // Sockets only waiting for their receive's final CQE (that CQE
            // finds no entry and is ignored) or for the SQ to drain.
            self.closing.clear();
            self.to_close.clear();
        }
    }

    /// Takes socket `si` out of the table and closes it once the kernel is
    /// done with it.
    pub(super) fn close_sock(&mut self, si: u32) {
        let Some(ts) = self.tsocks.get_mut(si as usize).and_then(|t| t.take()) else {
            return;
        };
        self.tsocks_free.push(si);
        match ts.recv {
            Some(token) => {
                self.ring.push(sqe::cancel(token));
                self.closing.insert(token, ts.fd);
            }
            None => self.to_close.push(ts.fd),
        }
    }

    /// Returns socket `si` to the pool after its transfer, or closes it.
    pub(super) fn release_sock(&mut self, si: u32, peer: SocketAddr) {
        let poolable = self.phase == Phase::Running
            && self
                .tsocks
                .get(si as usize)
                .and_then(|t| t.as_ref())
                .is_some_and(|t| !t.broken && t.recv.is_some());
        if !poolable {
            self.close_sock(si);
            return;
        }
        let Some(ts) = self.tsocks.get_mut(si as usize).and_then(|t| t.as_mut()) else {
            return;
        };
        ts.owner = None;
        if !self.idle.put(ts.key, si, peer) {
            self.close_sock(si);
        }
    }

    /// Closes an idle socket that can no longer receive.
    pub(super) fn drop_idle(&mut self, si: u32) {
        let Some(key) = self
            .tsocks
            .get(si as usize)
            .and_then(|t| t.as_ref())
            .map(|t| t.key)
        else {
            return;
        };
        self.idle.remove(key, si);
        self.close_sock(si);
    }
}
