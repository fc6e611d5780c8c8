//! Timer wheel micro-benchmarks with 100k timers armed, as a busy shard has:
//! re-arm (the shard's commonest call: after every `handle_*`), cancel plus
//! arm, and expire (cost per timer returned while stepping 1 ms at a time).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use ringtftpd::timer::TimerWheel;

const N: u32 = 100_000;
const TICK: Duration = Duration::from_millis(1);

/// Deterministic deadline offsets spread over `0..max_us` µs (xorshift).
fn offsets(max_us: u64) -> Vec<Duration> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..N)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Duration::from_micros(1 + x % max_us)
        })
        .collect()
}

/// A wheel with every key armed at `t0 + offsets[k]`.
fn full_wheel(t0: Instant, offsets: &[Duration]) -> TimerWheel {
    let mut w = TimerWheel::new(N as usize, TICK, t0);
    for (k, &off) in offsets.iter().enumerate() {
        w.arm(k as u32, t0 + off);
    }
    w
}

fn bench_timer(c: &mut Criterion) {
    let t0 = Instant::now();
    // Retransmit-like timeouts: up to 5 s.
    let offs = offsets(5_000_000);
    let mut g = c.benchmark_group("timer_100k");

    g.bench_function("rearm", |b| {
        let mut w = full_wheel(t0, &offs);
        let mut k = 0u32;
        b.iter(|| {
            k = (k + 1) % N;
            // Move each key to its neighbour's deadline so it changes slot.
            let other = offs[((k + 1) % N) as usize];
            w.arm(black_box(k), t0 + other);
        });
        assert_eq!(w.len(), N as usize);
    });

    g.bench_function("cancel_then_arm", |b| {
        let mut w = full_wheel(t0, &offs);
        let mut k = 0u32;
        b.iter(|| {
            k = (k + 1) % N;
            w.cancel(black_box(k));
            w.arm(k, t0 + offs[k as usize]);
        });
        assert_eq!(w.len(), N as usize);
    });

    g.bench_function("cancel", |b| {
        // Time only the cancels; refill the wheel outside the timed part.
        b.iter_custom(|iters| {
            let mut w = full_wheel(t0, &offs);
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let batch = (iters - done).min(u64::from(N)) as u32;
                let t = Instant::now();
                for k in 0..batch {
                    w.cancel(black_box(k));
                }
                total += t.elapsed();
                for k in 0..batch {
                    w.arm(k, t0 + offs[k as usize]);
                }
                done += u64::from(batch);
            }
            total
        });
    });

    g.bench_function("expire_per_timer", |b| {
        // Each iteration is one timer returned; the wheel is drained by 1 ms
        // steps (5000 `expire` calls for 100k timers), refilled untimed.
        b.iter_custom(|iters| {
            let mut out = Vec::with_capacity(N as usize);
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let mut w = full_wheel(t0, &offs);
                let mut now = t0;
                let t = Instant::now();
                while !w.is_empty() {
                    now += TICK;
                    out.clear();
                    w.expire(black_box(now), &mut out);
                    done += out.len() as u64;
                }
                total += t.elapsed();
            }
            // Scale to exactly `iters` timers (the last drain may overshoot).
            total.mul_f64(iters as f64 / done as f64)
        });
    });

    g.bench_function("expire_idle_step", |b| {
        // A 100 µs step where nothing is due: the shard's wake-up overhead.
        let far = offsets(5_000_000);
        let mut w = TimerWheel::new(N as usize, TICK, t0);
        let base = t0 + Duration::from_secs(10 * 86_400);
        for (k, &off) in far.iter().enumerate() {
            w.arm(k as u32, base + off);
        }
        let mut out = Vec::new();
        let mut now = t0;
        b.iter(|| {
            // 8.6e9 steps before `base`: nothing ever fires.
            now += Duration::from_micros(100);
            w.expire(black_box(now), &mut out);
        });
        assert!(out.is_empty());
    });

    g.finish();
}

criterion_group!(benches, bench_timer);
criterion_main!(benches);
