//! Which idle transfer socket a new transfer gets. The port a client sees
//! must not tell anyone the port of the next transfer: a spoofer who could
//! guess it would forge "ACK 0" from a victim's address and have a window
//! streamed at the victim. So a pooled socket is drawn uniformly at random
//! (ChaCha, seeded from the OS) from a pool large enough that a guess
//! rarely hits, and a fresh socket (a port the kernel picks at random) is
//! made while the pool is smaller than that.

use std::net::SocketAddr;

use rand::Rng;

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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
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
}
