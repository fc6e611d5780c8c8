//! A hashed hierarchical timing wheel for the shard loop.
//!
//! Modelled on the Linux kernel's timer wheel (kernel/time/timer.c since the
//! 2016 rewrite): [`LEVELS`] levels of 64 slots, each level 8 times coarser
//! than the one below, one `u64` occupancy bitmap per level, and **no
//! cascading**. A timer stays in the level chosen when it was armed and fires
//! when the wheel reaches its slot, so it may be late by less than that level's
//! granularity, never early. That trade suits TFTP: nearly every retransmit
//! timer is cancelled by an ACK long before it is due, so moving timers down
//! the levels would be wasted work.
//!
//! # Contract
//! - Keys are dense `u32` session indices below the capacity given to
//!   [`TimerWheel::new`]. Each key has at most one deadline; arming again
//!   replaces it. Nodes live in one preallocated `Vec` indexed by key and are
//!   linked into per-slot lists by index, so [`arm`](TimerWheel::arm),
//!   re-arm and [`cancel`](TimerWheel::cancel) are O(1) and never allocate.
//! - Time is always an argument; this module never reads the clock.
//! - [`expire`](TimerWheel::expire) never returns a key before its deadline.
//!   A key armed `delay` ahead of the wheel's time (the latest `now` given to
//!   `expire`) is returned by the first `expire(now)` with
//!   `now >= deadline + max(tick, 8/63 * (delay + tick))`: under one tick
//!   late below 64 ticks, at worst about 12.7% of the delay above. (A level
//!   is used only when the one below cannot hold the deadline within 63 of its
//!   slots, so its granularity is below 8/63 of the delay: the kernel's
//!   layout, whose "12.5%" is this bound rounded.)
//! - Deadlines beyond the top level's range (64 * 8^8 ticks, about 12.4 days
//!   with 1 ms ticks) are parked in the top level's farthest slot and quietly
//!   re-armed when it comes round, so they too never fire early. The only cost
//!   is that [`next_expiry`](TimerWheel::next_expiry) may name that earlier
//!   slot: a spurious wake-up for the caller, nothing more.
//!
//! # Call order in the shard loop
//! 1. wait on the ring with a timeout of [`next_expiry`](TimerWheel::next_expiry);
//! 2. [`expire`](TimerWheel::expire)`(now, &mut out)` and call
//!    `handle_timeout(now)` on each returned session;
//! 3. after every `handle_*`, [`arm`](TimerWheel::arm) the session with its
//!    `poll_timeout()`, or [`cancel`](TimerWheel::cancel) it when that is `None`.
//!
//! The session's own deadline stays the truth: a timeout delivered for a
//! session that has since moved on is a no-op (`handle_timeout` is spurious-safe).

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};

/// Bits of slot index per level: 64 slots.
const LVL_BITS: u32 = 6;
const LVL_SIZE: u64 = 1 << LVL_BITS;
const LVL_MASK: u64 = LVL_SIZE - 1;
/// Each level is 2^3 = 8 times coarser than the one below (kernel `LVL_CLK_SHIFT`).
const LVL_CLK_SHIFT: u32 = 3;
/// Number of levels, as the kernel uses for HZ=1000: with 1 ms ticks the top
/// level has 4.66 h slots and a 12.4 day range.
pub const LEVELS: usize = 9;
/// Index of the list holding timers armed with a deadline already reached;
/// the wheel's slot lists come before it.
const PENDING: usize = LEVELS * LVL_SIZE as usize;
const LISTS: usize = PENDING + 1;
/// List id of a key that is not armed.
const UNARMED: u16 = u16::MAX;
/// End of a list.
const NIL: u32 = u32::MAX;
/// Tick counts saturate here so that rounding up never overflows a `u64`.
const MAX_TICK: u64 = 1 << 60;

/// Shift of level `lvl`'s granularity, in ticks.
const fn lvl_shift(lvl: usize) -> u32 {
    lvl as u32 * LVL_CLK_SHIFT
}

#[derive(Clone, Copy, Debug)]
struct Node {
    prev: u32,
    next: u32,
    /// Which list the node is in (`level * 64 + slot` or `PENDING`), or `UNARMED`.
    list: u16,
    /// Deadline beyond the wheel's range, kept in `far` (12-byte nodes keep
    /// 100k timers in about 1 MB of cache).
    parked: bool,
}

const EMPTY_NODE: Node = Node {
    prev: NIL,
    next: NIL,
    list: UNARMED,
    parked: false,
};

/// A hierarchical timing wheel over keys `0..capacity`. See the module docs.
#[derive(Debug)]
pub struct TimerWheel {
    nodes: Vec<Node>,
    /// Deadline in ticks of each parked key; other entries are stale.
    far: Vec<u64>,
    /// Head of each slot list, then the pending list.
    heads: Box<[u32; LISTS]>,
    /// Bit `s` of `occupied[l]` is set when slot `s` of level `l` is non-empty.
    occupied: [u64; LEVELS],
    armed: usize,
    start: Instant,
    tick: Duration,
    tick_nanos: u64,
    /// The latest `now` seen by `expire` (or `start`).
    now: Instant,
    /// The first tick not yet processed: always `floor_ticks(now) + 1`.
    /// A timer in the wheel is due at its slot's tick, which is `>= clk`.
    clk: u64,
}

impl TimerWheel {
    /// Creates an empty wheel for keys `0..capacity`.
    ///
    /// `tick` is the granularity of level 0 (the shard uses 1 ms); a zero tick
    /// is taken as 1 ns. `start` is the wheel's time zero; deadlines before it
    /// count as already due. Keys are `u32`, so a capacity above `u32::MAX`
    /// is clamped to it.
    pub fn new(capacity: usize, tick: Duration, start: Instant) -> Self {
        let capacity = capacity.min(u32::MAX as usize);
        let tick_nanos = u64::try_from(tick.as_nanos()).unwrap_or(u64::MAX).max(1);
        TimerWheel {
            nodes: vec![EMPTY_NODE; capacity],
            far: vec![0; capacity],
            heads: Box::new([NIL; LISTS]),
            occupied: [0; LEVELS],
            armed: 0,
            start,
            tick: Duration::from_nanos(tick_nanos),
            tick_nanos,
            now: start,
            // As if `expire(start)` had run: tick 0 is in the past.
            clk: 1,
        }
    }

    /// Number of keys the wheel was built for.
    pub fn capacity(&self) -> usize {
        self.nodes.len()
    }

    /// The granularity of level 0.
    pub fn tick(&self) -> Duration {
        self.tick
    }

    /// Arms (or re-arms, replacing any earlier deadline of) `key`. A deadline
    /// in the past fires at the next `expire`.
    ///
    /// # Panics
    /// If `key >= capacity`: keys are the caller's own slab indices, so this
    /// is a bug in the caller, and a timer silently dropped would leak a session.
    pub fn arm(&mut self, key: u32, deadline: Instant) {
        assert!(
            (key as usize) < self.nodes.len(),
            "timer key {key} out of range (capacity {})",
            self.nodes.len()
        );
        if !self.unlink(key) {
            self.armed += 1;
        }
        if deadline <= self.now {
            self.link(key, PENDING);
            return;
        }
        // deadline > now, so this is >= clk; the max guards saturation only.
        let expires = self.ceil_ticks(deadline).max(self.clk);
        self.place(key, expires);
    }

    /// Cancels `key` if armed; a no-op otherwise (also for keys out of range).
    pub fn cancel(&mut self, key: u32) {
        if (key as usize) < self.nodes.len() && self.unlink(key) {
            self.armed -= 1;
        }
    }

    /// Whether `key` is armed (false for keys out of range).
    pub fn is_armed(&self, key: u32) -> bool {
        self.nodes
            .get(key as usize)
            .is_some_and(|n| n.list != UNARMED)
    }

    /// Number of armed timers.
    pub fn len(&self) -> usize {
        self.armed
    }

    pub fn is_empty(&self) -> bool {
        self.armed == 0
    }

    /// The earliest instant at which some armed timer may be due (its slot's
    /// time), or `None` when nothing is armed. Never later than the first
    /// `now` at which [`expire`](Self::expire) would return a key, so it is
    /// safe as the ring's wait timeout. It may be earlier: a deadline already
    /// reached reports the wheel's current time, and a deadline beyond the
    /// wheel's range reports the slot where it is parked.
    pub fn next_expiry(&self) -> Option<Instant> {
        if self.heads[PENDING] != NIL {
            return Some(self.now);
        }
        let tick = self.next_slot_tick()?;
        let nanos = u128::from(tick) * u128::from(self.tick_nanos);
        let secs = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
        let offset = Duration::new(secs, (nanos % 1_000_000_000) as u32);
        // Unrepresentable only for absurd ticks; `now` is then a safe (early) answer.
        Some(self.start.checked_add(offset).unwrap_or(self.now))
    }

    /// Moves the wheel to `now` and appends every key whose (tick-rounded)
    /// deadline has been reached to `out`, disarming them. Never returns a key
    /// before its deadline; see the module docs for how late it may be.
    ///
    /// A `now` earlier than the latest one seen is treated as that one. Long
    /// gaps cost nothing extra: the wheel jumps from one occupied slot to the
    /// next using the bitmaps instead of walking every tick. Allocation-free
    /// as long as `out` has room.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<u32>) {
        if now > self.now {
            self.now = now;
        }
        self.drain_pending(out);
        let target = self.floor_ticks(self.now);
        while let Some(tick) = self.next_slot_tick() {
            if tick > target {
                break;
            }
            // Timers parked beyond the range are re-placed relative to this.
            self.clk = tick + 1;
            self.collect(tick, target, out);
        }
        // No occupied slot is due in (clk, target], so skipping there is safe.
        self.clk = self.clk.max(target + 1);
    }

    /// Places an armed, unlinked `key` in the level whose slots are as fine as
    /// possible while the slot is less than one revolution ahead of `clk`.
    fn place(&mut self, key: u32, expires: u64) {
        let mut list = PENDING;
        for lvl in 0..LEVELS {
            let shift = lvl_shift(lvl);
            let gran = 1u64 << shift;
            // Round up so a coarse slot never fires before the deadline.
            let bucket = (expires + gran - 1) >> shift;
            let next = (self.clk + gran - 1) >> shift;
            if bucket - next < LVL_SIZE {
                list = lvl * LVL_SIZE as usize + (bucket & LVL_MASK) as usize;
                break;
            }
        }
        if list == PENDING {
            // Beyond the range: park in the top level's farthest slot; `collect`
            // re-places it from there (the only cascading this wheel does).
            let shift = lvl_shift(LEVELS - 1);
            let next = (self.clk + (1u64 << shift) - 1) >> shift;
            let bucket = next + LVL_MASK;
            list = (LEVELS - 1) * LVL_SIZE as usize + (bucket & LVL_MASK) as usize;
            self.far[key as usize] = expires;
            self.link(key, list);
            self.nodes[key as usize].parked = true;
            return;
        }
        self.link(key, list);
    }

    /// Pushes `key` onto the front of `list` and marks the slot occupied.
    fn link(&mut self, key: u32, list: usize) {
        let head = self.heads[list];
        if head != NIL {
            self.nodes[head as usize].prev = key;
        }
        let node = &mut self.nodes[key as usize];
        node.prev = NIL;
        node.next = head;
        node.list = list as u16;
        self.heads[list] = key;
        if list < PENDING {
            self.occupied[list >> LVL_BITS] |= 1 << (list as u64 & LVL_MASK);
        }
    }

    /// Removes `key` from its list; returns whether it was armed.
    fn unlink(&mut self, key: u32) -> bool {
        let Node {
            prev, next, list, ..
        } = self.nodes[key as usize];
        if list == UNARMED {
            return false;
        }
        let list = list as usize;
        if prev == NIL {
            self.heads[list] = next;
            if next == NIL && list < PENDING {
                self.occupied[list >> LVL_BITS] &= !(1 << (list as u64 & LVL_MASK));
            }
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next != NIL {
            self.nodes[next as usize].prev = prev;
        }
        self.nodes[key as usize] = EMPTY_NODE;
        true
    }

    /// Returns every pending key (deadline already reached when armed).
    fn drain_pending(&mut self, out: &mut Vec<u32>) {
        let mut key = std::mem::replace(&mut self.heads[PENDING], NIL);
        while key != NIL {
            let node = &mut self.nodes[key as usize];
            let next = node.next;
            *node = EMPTY_NODE;
            self.armed -= 1;
            out.push(key);
            key = next;
        }
    }

    /// The earliest tick `>= clk` at which an occupied slot is due, if any.
    fn next_slot_tick(&self) -> Option<u64> {
        let mut best: Option<u64> = None;
        for (lvl, &bits) in self.occupied.iter().enumerate() {
            if bits == 0 {
                continue;
            }
            let shift = lvl_shift(lvl);
            let next = (self.clk + (1u64 << shift) - 1) >> shift;
            // Rotate so bit 0 is the next slot to come round at this level.
            let ahead = bits.rotate_right((next & LVL_MASK) as u32).trailing_zeros();
            let tick = (next + u64::from(ahead)) << shift;
            best = Some(best.map_or(tick, |b| b.min(tick)));
        }
        best
    }

    /// Empties every slot due at `tick` into `out`; `target` is the tick of
    /// the `now` being expired to, used to re-place parked far timers.
    fn collect(&mut self, tick: u64, target: u64, out: &mut Vec<u32>) {
        for lvl in 0..LEVELS {
            let shift = lvl_shift(lvl);
            // A level's slots come round only on multiples of its granularity,
            // and those of the levels above are multiples of these.
            if tick & ((1u64 << shift) - 1) != 0 {
                break;
            }
            let slot = (tick >> shift) & LVL_MASK;
            if self.occupied[lvl] & (1 << slot) == 0 {
                continue;
            }
            self.occupied[lvl] &= !(1 << slot);
            let list = lvl * LVL_SIZE as usize + slot as usize;
            let mut key = std::mem::replace(&mut self.heads[list], NIL);
            while key != NIL {
                let node = &mut self.nodes[key as usize];
                let next = node.next;
                let parked = node.parked;
                *node = EMPTY_NODE;
                if parked && self.far[key as usize] > target {
                    // Parked beyond the range and still not due: place again.
                    self.place(key, self.far[key as usize]);
                } else {
                    self.armed -= 1;
                    out.push(key);
                }
                key = next;
            }
        }
    }

    /// Nanoseconds from `start` to `t`, saturating at 584 years: `u64`
    /// arithmetic, since a `u128` division costs more than the rest of `arm`.
    fn nanos_since_start(&self, t: Instant) -> u64 {
        let d = t.saturating_duration_since(self.start);
        d.as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()))
    }

    /// Whole ticks from `start` to `t`, rounded down.
    fn floor_ticks(&self, t: Instant) -> u64 {
        (self.nanos_since_start(t) / self.tick_nanos).min(MAX_TICK)
    }

    /// Whole ticks from `start` to `t`, rounded up (so never early).
    fn ceil_ticks(&self, t: Instant) -> u64 {
        self.nanos_since_start(t)
            .div_ceil(self.tick_nanos)
            .min(MAX_TICK)
    }

    /// The level `key` sits in (`LEVELS` for the pending list), for tests.
    #[cfg(test)]
    fn level_of(&self, key: u32) -> Option<usize> {
        let list = self.nodes.get(key as usize)?.list;
        (list != UNARMED).then_some(list as usize >> LVL_BITS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    const MS: Duration = Duration::from_millis(1);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn expire(w: &mut TimerWheel, now: Instant) -> Vec<u32> {
        let mut out = Vec::new();
        w.expire(now, &mut out);
        out.sort_unstable();
        out
    }

    /// Upper bound on how late a timer armed `delay` ahead may fire.
    fn allowed_lateness(delay: Duration, tick: Duration) -> Duration {
        tick.max((delay + tick) * 8 / 63)
    }

    #[test]
    fn arm_cancel_rearm() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(8, MS, t0);
        assert!(w.is_empty());
        assert_eq!(w.next_expiry(), None);

        w.arm(3, t0 + ms(10));
        w.arm(5, t0 + ms(20));
        assert_eq!(w.len(), 2);
        assert!(w.is_armed(3) && w.is_armed(5) && !w.is_armed(4));
        assert_eq!(w.next_expiry(), Some(t0 + ms(10)));

        w.cancel(3);
        w.cancel(3); // cancelling twice is a no-op
        w.cancel(4); // never armed
        assert_eq!(w.len(), 1);
        assert!(!w.is_armed(3));
        assert_eq!(w.next_expiry(), Some(t0 + ms(20)));

        // Re-arming replaces the deadline rather than adding a second one.
        w.arm(5, t0 + ms(7));
        w.arm(5, t0 + ms(30));
        assert_eq!(w.len(), 1);
        assert_eq!(expire(&mut w, t0 + ms(29)), Vec::<u32>::new());
        assert_eq!(expire(&mut w, t0 + ms(30)), vec![5]);
        assert!(w.is_empty());
        assert!(!w.is_armed(5));
        assert_eq!(expire(&mut w, t0 + ms(100)), Vec::<u32>::new());

        // A key that fired can be armed again.
        w.arm(5, t0 + ms(101));
        assert_eq!(expire(&mut w, t0 + ms(101)), vec![5]);
    }

    #[test]
    fn level_zero_is_exact_to_the_tick() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(70, MS, t0);
        for k in 1..64u32 {
            w.arm(k, t0 + ms(u64::from(k)));
        }
        for k in 1..64u32 {
            assert_eq!(w.level_of(k), Some(0));
        }
        for k in 1..64u32 {
            let now = t0 + ms(u64::from(k));
            assert_eq!(
                expire(&mut w, now - Duration::from_nanos(1)),
                Vec::<u32>::new()
            );
            assert_eq!(expire(&mut w, now), vec![k]);
        }
        assert!(w.is_empty());
    }

    #[test]
    fn sub_tick_deadlines_round_up() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(2, MS, t0);
        let d = t0 + Duration::from_micros(2_300);
        w.arm(0, d);
        assert_eq!(w.next_expiry(), Some(t0 + ms(3)));
        assert_eq!(
            expire(&mut w, t0 + Duration::from_micros(2_999)),
            Vec::<u32>::new()
        );
        assert_eq!(expire(&mut w, t0 + ms(3)), vec![0]);
    }

    #[test]
    fn past_deadlines_fire_at_the_next_expire() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(4, MS, t0);
        let now = t0 + Duration::from_micros(5_500);
        assert_eq!(expire(&mut w, now), Vec::<u32>::new());
        w.arm(0, t0); // long past
        w.arm(1, now); // exactly now
        w.arm(2, now - Duration::from_micros(200)); // within the current tick
        w.arm(3, now + Duration::from_micros(1)); // future, same tick
        assert_eq!(w.len(), 4);
        assert_eq!(w.next_expiry(), Some(now));
        // Same `now` again: the past ones fire, the future one does not.
        assert_eq!(expire(&mut w, now), vec![0, 1, 2]);
        assert_eq!(w.next_expiry(), Some(t0 + ms(6)));
        assert_eq!(expire(&mut w, t0 + ms(6)), vec![3]);
        // A deadline before the wheel's start counts as past too.
        let mut w = TimerWheel::new(1, MS, now);
        w.arm(0, t0);
        assert_eq!(expire(&mut w, now), vec![0]);
    }

    #[test]
    fn time_never_runs_backwards() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(2, MS, t0);
        w.arm(0, t0 + ms(50));
        assert_eq!(expire(&mut w, t0 + ms(40)), Vec::<u32>::new());
        // An older `now` is treated as the latest one, so nothing fires and a
        // deadline between the two counts as past.
        assert_eq!(expire(&mut w, t0 + ms(10)), Vec::<u32>::new());
        w.arm(1, t0 + ms(20));
        assert_eq!(expire(&mut w, t0 + ms(10)), vec![1]);
        assert_eq!(expire(&mut w, t0 + ms(50)), vec![0]);
    }

    #[test]
    fn lateness_is_bounded_by_the_level_granularity() {
        let t0 = Instant::now();
        // Delays at and around every level boundary up to the second level above 255 s.
        let delays_ms: Vec<u64> = [
            1u64, 62, 63, 64, 65, 100, 503, 504, 505, 511, 512, 513, 4031, 4032, 4096, 10_000,
            32_255, 32_256, 100_000, 255_000, 258_047, 258_048, 600_000,
        ]
        .to_vec();
        let mut w = TimerWheel::new(delays_ms.len(), MS, t0);
        // Start from an unaligned clock so slot rounding is exercised.
        let base = t0 + ms(12_345) + Duration::from_micros(678);
        w.expire(base, &mut Vec::new());
        for (k, &d) in delays_ms.iter().enumerate() {
            w.arm(k as u32, base + ms(d));
        }
        let mut fired = vec![None; delays_ms.len()];
        let mut out = Vec::new();
        let mut now = base;
        // Walk in 1 ms steps (bounded: ~700k steps) and record each firing time.
        for _ in 0..700_000 {
            now += MS;
            out.clear();
            w.expire(now, &mut out);
            for &k in &out {
                assert!(
                    fired[k as usize].replace(now).is_none(),
                    "key {k} fired twice"
                );
            }
            if w.is_empty() {
                break;
            }
        }
        assert!(w.is_empty());
        let mut saw_late = false;
        for (k, &d) in delays_ms.iter().enumerate() {
            let deadline = base + ms(d);
            let at = fired[k].expect("every timer fires");
            assert!(at >= deadline, "delay {d} ms fired early");
            let late = at - deadline;
            assert!(
                late <= allowed_lateness(ms(d), MS),
                "delay {d} ms fired {late:?} late"
            );
            saw_late |= late > ms(2);
        }
        // The coarse levels really are coarse: some timer was rounded up.
        assert!(saw_late);
    }

    #[test]
    fn rearm_moves_a_key_between_levels() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(1, MS, t0);
        w.arm(0, t0 + Duration::from_secs(100));
        let far = w.level_of(0).expect("armed");
        assert!(far >= 3, "100 s sits in a coarse level, got {far}");
        w.arm(0, t0 + ms(5));
        assert_eq!(w.level_of(0), Some(0));
        assert_eq!(w.next_expiry(), Some(t0 + ms(5)));
        assert_eq!(expire(&mut w, t0 + ms(5)), vec![0]);
        // It fires once, at the new deadline, and not again at the old one.
        assert_eq!(
            expire(&mut w, t0 + Duration::from_secs(200)),
            Vec::<u32>::new()
        );

        // And the other way: near to far.
        let t1 = t0 + Duration::from_secs(200);
        w.arm(0, t1 + ms(5));
        assert_eq!(w.level_of(0), Some(0));
        w.arm(0, t1 + Duration::from_secs(100));
        assert_eq!(w.level_of(0), Some(far));
        assert_eq!(expire(&mut w, t1 + ms(50)), Vec::<u32>::new());
        assert!(w.next_expiry().expect("armed") >= t1 + Duration::from_secs(100));
        assert_eq!(expire(&mut w, t1 + Duration::from_secs(120)), vec![0]);
    }

    #[test]
    fn capacity_edges() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(0, MS, t0);
        assert_eq!(w.capacity(), 0);
        w.cancel(0);
        assert!(!w.is_armed(0));
        assert_eq!(expire(&mut w, t0 + ms(10)), Vec::<u32>::new());

        let mut w = TimerWheel::new(3, MS, t0);
        w.arm(2, t0 + ms(1)); // the highest key
        assert!(w.is_armed(2));
        w.cancel(3);
        w.cancel(u32::MAX);
        assert!(!w.is_armed(3) && !w.is_armed(u32::MAX));
        assert_eq!(w.len(), 1);
        assert_eq!(expire(&mut w, t0 + ms(1)), vec![2]);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn arming_a_key_out_of_range_panics() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(3, MS, t0);
        w.arm(3, t0 + ms(1));
    }

    #[test]
    fn zero_tick_is_one_nanosecond() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(1, Duration::ZERO, t0);
        assert_eq!(w.tick(), Duration::from_nanos(1));
        w.arm(0, t0 + Duration::from_nanos(10));
        assert_eq!(
            expire(&mut w, t0 + Duration::from_nanos(9)),
            Vec::<u32>::new()
        );
        assert_eq!(expire(&mut w, t0 + Duration::from_nanos(10)), vec![0]);
    }

    #[test]
    fn long_gaps_jump_instead_of_walking() {
        // 1 ns ticks: an hour is 3.6e12 ticks, which a tick-by-tick walk could
        // not finish; jumping by the bitmaps takes a handful of steps.
        let t0 = Instant::now();
        let ns = Duration::from_nanos;
        let mut w = TimerWheel::new(4, ns(1), t0);
        assert_eq!(
            expire(&mut w, t0 + Duration::from_secs(3600)),
            Vec::<u32>::new()
        );
        let t1 = t0 + Duration::from_secs(3600);
        w.arm(0, t1 + ns(10));
        w.arm(1, t1 + Duration::from_millis(300));
        w.arm(2, t1 + Duration::from_secs(5));
        w.arm(3, t1 + Duration::from_secs(7200));
        assert_eq!(expire(&mut w, t1 + Duration::from_secs(6)), vec![0, 1, 2]);
        assert_eq!(
            expire(&mut w, t1 + Duration::from_secs(7199)),
            Vec::<u32>::new()
        );
        assert_eq!(expire(&mut w, t1 + Duration::from_secs(8000)), vec![3]);
    }

    #[test]
    fn deadlines_beyond_the_range_never_fire_early() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(2, MS, t0);
        let range = ms(LVL_SIZE << lvl_shift(LEVELS - 1));
        assert!(
            range > Duration::from_secs(3600 * 24 * 12),
            "covers 12 days"
        );
        let far = t0 + range * 3 + ms(7);
        w.arm(0, far);
        w.arm(1, t0 + range / 2);
        assert_eq!(w.level_of(0), Some(LEVELS - 1));
        // next_expiry may name the parking slot; expiring there is spurious.
        let mut now = t0;
        let mut fired_at = None;
        for _ in 0..64 {
            let Some(next) = w.next_expiry() else { break };
            // Rounded up to its slot, but never past the lateness bound.
            let bound = far + allowed_lateness(far - t0, MS);
            assert!(fired_at.is_some() || next <= bound);
            now = now.max(next);
            let out = expire(&mut w, now);
            if out.contains(&0) {
                fired_at = Some(now);
            }
            if out.contains(&1) {
                assert!(now >= t0 + range / 2);
            }
        }
        let at = fired_at.expect("the far timer fires");
        assert!(at >= far && at - far <= allowed_lateness(far - t0, MS));
        assert!(w.is_empty());
    }

    #[test]
    fn next_expiry_is_never_later_than_the_first_expiry() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(3, MS, t0);
        w.arm(0, t0 + Duration::from_secs(30));
        w.arm(1, t0 + ms(700));
        w.arm(2, t0 + Duration::from_secs(3));
        let mut now = t0;
        let mut fired = 0;
        // Sleep exactly until next_expiry each time, as the shard does.
        for _ in 0..100 {
            let Some(next) = w.next_expiry() else { break };
            // Nothing fires just before the reported instant...
            if next > now + Duration::from_nanos(1) {
                assert_eq!(
                    expire(&mut w, next - Duration::from_nanos(1)),
                    Vec::<u32>::new()
                );
            }
            now = next;
            fired += expire(&mut w, now).len();
        }
        assert_eq!(fired, 3);
        assert!(w.is_empty());
    }

    #[test]
    fn many_timers_cancel_most_expire_the_rest() {
        const N: u32 = 100_000;
        let t0 = Instant::now();
        let mut w = TimerWheel::new(N as usize, MS, t0);
        // Deterministic pseudo-random deadlines up to 300 s (xorshift).
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut deadlines = Vec::with_capacity(N as usize);
        for k in 0..N {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let d = t0 + Duration::from_micros(1 + x % 300_000_000);
            deadlines.push(d);
            w.arm(k, d);
        }
        assert_eq!(w.len(), N as usize);
        for k in (0..N).filter(|k| k % 10 != 0) {
            w.cancel(k);
        }
        assert_eq!(w.len(), N as usize / 10);

        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        let mut now = t0;
        for _ in 0..200_000 {
            let Some(next) = w.next_expiry() else { break };
            now = now.max(next);
            out.clear();
            w.expire(now, &mut out);
            for &k in &out {
                assert!(deadlines[k as usize] <= now, "key {k} fired early");
                assert!(seen.insert(k), "key {k} fired twice");
            }
        }
        assert!(w.is_empty());
        let expected: BTreeSet<u32> = (0..N).filter(|k| k % 10 == 0).collect();
        assert_eq!(seen, expected);
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Arm `key` at the wheel's time plus `offset` µs (negative: in the past).
        Arm(u32, i64),
        Cancel(u32),
        /// Expire at the latest time plus this many µs.
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        const KEYS: u32 = 16;
        let offset = prop_oneof![
            4 => -50_000i64..2_000_000,                 // near, some past
            3 => 0i64..300_000_000,                     // up to 300 s
            1 => 0i64..3_000_000_000_000,               // beyond the 12-day range
        ];
        let step = prop_oneof![
            4 => 0u64..5_000,
            3 => 0u64..20_000_000,
            1 => 0u64..4_000_000_000_000,               // jumps of weeks
        ];
        prop_oneof![
            4 => (0..KEYS, offset).prop_map(|(k, o)| Op::Arm(k, o)),
            1 => (0..KEYS).prop_map(Op::Cancel),
            3 => step.prop_map(Op::Advance),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Against a model: never early, never too late, next_expiry a lower bound.
        #[test]
        fn matches_a_model(
            tick_us in prop_oneof![Just(1_000u64), 1u64..5_000],
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            let tick = Duration::from_micros(tick_us);
            let t0 = Instant::now();
            let mut w = TimerWheel::new(16, tick, t0);
            // key -> (deadline, allowed lateness)
            let mut model: BTreeMap<u32, (Instant, Duration)> = BTreeMap::new();
            let mut now = t0;
            let mut out = Vec::new();
            for op in ops {
                match op {
                    Op::Arm(k, off) => {
                        let d = if off >= 0 {
                            now + Duration::from_micros(off as u64)
                        } else {
                            now.checked_sub(Duration::from_micros(off.unsigned_abs())).unwrap_or(t0)
                        };
                        w.arm(k, d);
                        let delay = d.saturating_duration_since(now);
                        model.insert(k, (d, allowed_lateness(delay, tick)));
                    }
                    Op::Cancel(k) => {
                        w.cancel(k);
                        model.remove(&k);
                    }
                    Op::Advance(step) => {
                        let next = w.next_expiry();
                        prop_assert_eq!(next.is_none(), model.is_empty());
                        now += Duration::from_micros(step);
                        out.clear();
                        w.expire(now, &mut out);
                        if !out.is_empty() {
                            prop_assert!(next.is_some_and(|n| n <= now), "next_expiry later than a firing");
                        }
                        for &k in &out {
                            let entry = model.remove(&k);
                            prop_assert!(entry.is_some(), "key {} fired but not armed", k);
                            let (d, _) = entry.unwrap_or((now, Duration::ZERO));
                            prop_assert!(d <= now, "key {} fired early", k);
                        }
                        for (&k, &(d, late)) in &model {
                            prop_assert!(now < d + late, "key {} overdue: deadline {:?} ago", k, now - d);
                        }
                    }
                }
                prop_assert_eq!(w.len(), model.len());
                for k in 0..16 {
                    prop_assert_eq!(w.is_armed(k), model.contains_key(&k));
                }
            }
        }
    }
}
