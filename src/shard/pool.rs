//! The pool of idle transfer sockets, as plain indices: which idle socket a
//! new transfer gets, how many are kept, and when to give them all up.
//! The shard owns the sockets themselves (`sockets.rs`).
//!
//! The port a client sees
//! must not tell anyone the port of the next transfer: a spoofer who could
//! guess it would forge "ACK 0" from a victim's address and have a window
//! streamed at the victim. So a pooled socket is drawn uniformly at random
//! (ChaCha, seeded from the OS) from a pool large enough that a guess
//! rarely hits, and a fresh socket (a port the kernel picks at random) is
//! made while the pool is smaller than that.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};

use rand::Rng;
use rand::rngs::StdRng;

/// Most idle transfer sockets a shard keeps for reuse.
pub const MAX_IDLE: usize = 1024;

/// Fewest candidates the pool of one local address must offer before a
/// transfer reuses one: a blind guess then hits at most 1 time in 32.
pub const MIN_IDLE_CHOICE: usize = 32;

/// An idle pooled socket: its index in the shard's table and the peer of
/// its last transfer (never handed to that peer again, so each transfer of
/// a client has a new TID, RFC 1350).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idle {
    pub sock: u32,
    pub last_peer: SocketAddr,
}

/// The position in `pool` of the socket to give `peer`: uniform over the
/// sockets `peer` did not use last, or `None` (make a fresh socket) if
/// fewer than `min` (and at least one) qualify.
pub fn pick_idle<R: Rng + ?Sized>(
    pool: &[Idle],
    peer: SocketAddr,
    min: usize,
    rng: &mut R,
) -> Option<usize> {
    let eligible = pool.iter().filter(|i| i.last_peer != peer).count();
    if eligible == 0 || eligible < min {
        return None;
    }
    let k = rng.random_range(0..eligible);
    pool.iter()
        .enumerate()
        .filter(|(_, i)| i.last_peer != peer)
        .nth(k)
        .map(|(pos, _)| pos)
}

/// A local address and, for an IPv6 link-local one, its scope: sockets
/// are pooled by what they are bound to.
pub type Local = (IpAddr, u32);

/// Idle sockets (indices into the shard's socket table) by local address.
pub struct IdlePool {
    lists: HashMap<Local, Vec<Idle>>,
    len: usize,
    cap: usize,
    min_choice: usize,
    rng: StdRng,
}

impl IdlePool {
    /// Keeps up to `cap` sockets; reuses one only from `min_choice` or more
    /// candidates; `rng` picks among them (ports must not be guessable).
    pub fn new(cap: usize, min_choice: usize, rng: StdRng) -> Self {
        IdlePool {
            lists: HashMap::new(),
            len: 0,
            cap,
            min_choice,
            rng,
        }
    }

    /// Idle sockets held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Takes an idle socket bound to `local` for `peer` (see [`pick_idle`]),
    /// or `None`: make a fresh one.
    pub fn take(&mut self, local: Local, peer: SocketAddr) -> Option<u32> {
        let list = self.lists.get_mut(&local)?;
        let pos = pick_idle(list, peer, self.min_choice, &mut self.rng)?;
        self.len -= 1;
        Some(list.swap_remove(pos).sock)
    }

    /// Keeps `sock` after a transfer to `peer` ended; false (close it) when
    /// the pool is full.
    pub fn put(&mut self, local: Local, sock: u32, peer: SocketAddr) -> bool {
        if self.len >= self.cap {
            return false;
        }
        self.lists.entry(local).or_default().push(Idle {
            sock,
            last_peer: peer,
        });
        self.len += 1;
        true
    }

    /// Forgets idle socket `sock`; false if it was not here.
    pub fn remove(&mut self, local: Local, sock: u32) -> bool {
        let Some(list) = self.lists.get_mut(&local) else {
            return false;
        };
        let Some(pos) = list.iter().position(|x| x.sock == sock) else {
            return false;
        };
        list.swap_remove(pos);
        self.len -= 1;
        true
    }

    /// Empties the pool; the sockets it held.
    pub fn drain(&mut self) -> Vec<u32> {
        self.len = 0;
        self.lists
            .drain()
            .flat_map(|(_, list)| list.into_iter().map(|i| i.sock))
            .collect()
    }
}

/// Random ports tried before the sweep, for a socket in a `--port-range`.
const RANDOM_TRIES: usize = 32;

/// Ranges up to this size are swept whole when the random tries all
/// found their port taken; a larger one that is that full gets "busy".
const SWEEP_MAX: usize = 1024;

/// Transfer ports confined to `--port-range LOW:HIGH`: which ports a new
/// socket tries, in an order nobody can guess. Shards and other processes
/// share the range through the kernel: a bind to a port in use fails and
/// the next is tried.
pub struct PortRange {
    low: u16,
    high: u16,
    rng: StdRng,
}

impl PortRange {
    pub fn new(low: u16, high: u16, rng: StdRng) -> Self {
        debug_assert!(low <= high);
        PortRange { low, high, rng }
    }

    pub fn len(&self) -> usize {
        usize::from(self.high - self.low) + 1
    }

    /// Ports to try for one socket, at most `RANDOM_TRIES + SWEEP_MAX`:
    /// random ones, then (for a small range) every port from a random
    /// start.
    pub fn candidates(&mut self) -> Vec<u16> {
        let len = self.len();
        let (low, high) = (self.low, self.high);
        let mut ports: Vec<u16> = (0..RANDOM_TRIES.min(len))
            .map(|_| self.rng.random_range(low..=high))
            .collect();
        if len <= SWEEP_MAX {
            let start = self.rng.random_range(0..len);
            ports.extend((0..len).map(|k| low + ((start + k) % len) as u16));
        }
        ports
    }

    /// Idle sockets one of `shards` shards may keep: a quarter of its
    /// share of the range, so pools never starve the others; 0 (no
    /// pooling) where that is too few to pick from at random.
    pub fn idle_cap(&self, shards: usize, min_choice: usize) -> usize {
        let cap = self.len() / (4 * shards.max(1));
        if cap < min_choice {
            0
        } else {
            cap.min(MAX_IDLE)
        }
    }
}

/// Whether a socket that could not be made with `err` is worth one more
/// try after closing the `idle` pooled sockets: they hold descriptors,
/// socket memory and ports, which is what these errors lack (EADDRINUSE
/// from a kernel-chosen port: the ephemeral range is used up, as when a
/// boot storm's clients share the server's host).
pub fn close_idle_and_retry(err: &io::Error, idle: usize) -> bool {
    idle > 0
        && matches!(
            err.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRINUSE)
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn port_range_candidates_stay_inside_and_a_small_range_is_swept_whole() {
        let mut r = PortRange::new(40_000, 40_009, StdRng::seed_from_u64(5));
        let c = r.candidates();
        assert!(c.iter().all(|p| (40_000..=40_009).contains(p)), "{c:?}");
        // 10 random tries, then each of the 10 ports once.
        assert_eq!(c.len(), 20);
        let mut swept = c[10..].to_vec();
        swept.sort_unstable();
        assert_eq!(swept, (40_000..=40_009).collect::<Vec<_>>());
        // One port: that port.
        let mut one = PortRange::new(7, 7, StdRng::seed_from_u64(6));
        assert_eq!(one.candidates(), [7, 7]);
        // A large range is not swept: random tries only, spread over it.
        let mut big = PortRange::new(1, 65_535, StdRng::seed_from_u64(7));
        let c = big.candidates();
        assert_eq!(c.len(), RANDOM_TRIES);
        let distinct: std::collections::HashSet<_> = c.iter().collect();
        assert!(distinct.len() > RANDOM_TRIES / 2, "{c:?}");
    }

    #[test]
    fn port_range_pools_leave_ports_for_the_other_shards() {
        let r = |low, high| PortRange::new(low, high, StdRng::seed_from_u64(8));
        // 101 ports on 2 shards: 12 each would be too few to pick from.
        assert_eq!(r(40_000, 40_100).idle_cap(2, MIN_IDLE_CHOICE), 0);
        assert_eq!(r(40_000, 43_999).idle_cap(2, MIN_IDLE_CHOICE), 500);
        assert_eq!(r(1, 65_535).idle_cap(1, MIN_IDLE_CHOICE), MAX_IDLE);
    }

    #[test]
    fn small_pool_means_a_fresh_socket() {
        let mut rng = StdRng::seed_from_u64(1);
        let pool: Vec<Idle> = (0..31)
            .map(|s| Idle {
                sock: s,
                last_peer: addr(1000 + s as u16),
            })
            .collect();
        assert_eq!(pick_idle(&pool, addr(9), MIN_IDLE_CHOICE, &mut rng), None);
        assert_eq!(pick_idle(&[], addr(9), 0, &mut rng), None);
        // 32 sockets, but one was the peer's own last: 31 candidates.
        let mut pool = pool;
        pool.push(Idle {
            sock: 31,
            last_peer: addr(9),
        });
        assert_eq!(pick_idle(&pool, addr(9), MIN_IDLE_CHOICE, &mut rng), None);
        assert!(pick_idle(&pool, addr(8), MIN_IDLE_CHOICE, &mut rng).is_some());
    }

    #[test]
    fn never_the_socket_the_peer_used_last() {
        let mut rng = StdRng::seed_from_u64(2);
        let me = addr(7);
        let pool: Vec<Idle> = (0..64)
            .map(|s| Idle {
                sock: s,
                last_peer: if s % 2 == 0 {
                    me
                } else {
                    addr(2000 + s as u16)
                },
            })
            .collect();
        for _ in 0..2000 {
            let pos = pick_idle(&pool, me, MIN_IDLE_CHOICE, &mut rng).unwrap();
            assert_ne!(pool[pos].last_peer, me);
        }
    }

    /// A stable pool of 64 (each transfer takes one socket and gives it
    /// back when it ends, as the newest entry): every socket is chosen about
    /// as often, and the one just released, the port the last client saw,
    /// no more often than the others.
    #[test]
    fn choice_is_spread_and_the_just_released_socket_is_not_favoured() {
        const N: usize = 64;
        const ROUNDS: usize = 64_000;
        let mut rng = StdRng::from_os_rng();
        let mut pool: Vec<Idle> = (0..N as u32)
            .map(|s| Idle {
                sock: s,
                last_peer: addr(3000 + s as u16),
            })
            .collect();
        let mut chosen = [0usize; N];
        let mut just_released = 0;
        let mut last: Option<u32> = None;
        for round in 0..ROUNDS {
            // A new client each time (port 10000 + round % 50000).
            let peer = addr(10_000 + (round % 50_000) as u16);
            let pos = pick_idle(&pool, peer, MIN_IDLE_CHOICE, &mut rng).unwrap();
            let got = pool.swap_remove(pos);
            chosen[got.sock as usize] += 1;
            if Some(got.sock) == last {
                just_released += 1;
            }
            // Its transfer ends: back into the pool, newest.
            pool.push(Idle {
                sock: got.sock,
                last_peer: peer,
            });
            last = Some(got.sock);
        }
        let expected = ROUNDS / N;
        let (min, max) = (chosen.iter().min().unwrap(), chosen.iter().max().unwrap());
        assert!(
            *min > expected * 3 / 4 && *max < expected * 5 / 4,
            "spread {min}..{max} around {expected}"
        );
        assert!(
            just_released < 2 * ROUNDS / N,
            "the just-released socket came back {just_released} times in {ROUNDS}"
        );
    }

    fn local() -> Local {
        ("127.0.0.1".parse().unwrap(), 0)
    }

    fn pool_of(n: u32, cap: usize, min: usize) -> IdlePool {
        let mut pool = IdlePool::new(cap, min, StdRng::seed_from_u64(3));
        for s in 0..n {
            assert!(pool.put(local(), s, addr(4000 + s as u16)));
        }
        pool
    }

    #[test]
    fn pool_is_bounded_and_counts_what_it_holds() {
        let mut pool = pool_of(4, 4, 1);
        assert_eq!(pool.len(), 4);
        assert!(!pool.put(local(), 9, addr(1)), "a full pool refuses");
        assert!(pool.remove(local(), 2));
        assert!(!pool.remove(local(), 2));
        assert!(!pool.remove(("::1".parse().unwrap(), 0), 1));
        assert_eq!(pool.len(), 3);
        let mut all = pool.drain();
        all.sort();
        assert_eq!(all, [0, 1, 3]);
        assert_eq!(pool.len(), 0);
        assert_eq!(pool.take(local(), addr(1)), None);
    }

    #[test]
    fn take_draws_only_from_the_same_local_address_and_enough_candidates() {
        let mut pool = pool_of(MIN_IDLE_CHOICE as u32, MAX_IDLE, MIN_IDLE_CHOICE);
        let other: Local = ("127.0.0.2".parse().unwrap(), 0);
        assert_eq!(pool.take(other, addr(1)), None);
        let got = pool.take(local(), addr(1)).unwrap();
        assert!(got < MIN_IDLE_CHOICE as u32);
        assert_eq!(pool.len(), MIN_IDLE_CHOICE - 1);
        // One fewer than the minimum: a fresh socket from now on.
        assert_eq!(pool.take(local(), addr(1)), None);
        assert!(pool.put(local(), got, addr(1)));
        // The peer that used `got` last is offered only the other 31.
        assert_eq!(pool.take(local(), addr(1)), None);
        assert!(pool.take(local(), addr(2)).is_some());
    }

    /// Over many draws from a pool of 64, every socket comes out, within
    /// the bounds of the table, and each about as often.
    #[test]
    fn take_spreads_over_the_pool() {
        let mut pool = pool_of(64, MAX_IDLE, MIN_IDLE_CHOICE);
        let mut seen = [0u32; 64];
        for round in 0..6400u32 {
            let peer = addr(20_000 + (round % 1000) as u16);
            let s = pool.take(local(), peer).unwrap();
            seen[s as usize] += 1;
            assert!(pool.put(local(), s, peer));
        }
        assert!(seen.iter().all(|&n| (50..=150).contains(&n)), "{seen:?}");
    }

    #[test]
    fn only_descriptor_memory_or_port_shortage_closes_the_pool() {
        for errno in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRINUSE,
        ] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(close_idle_and_retry(&e, 1), "errno {errno}");
            // Nothing idle to close: no retry.
            assert!(!close_idle_and_retry(&e, 0));
        }
        for errno in [libc::EADDRNOTAVAIL, libc::EACCES, libc::EINVAL] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(!close_idle_and_retry(&e, 100), "errno {errno}");
        }
        assert!(!close_idle_and_retry(&io::Error::other("x"), 100));
    }
}
