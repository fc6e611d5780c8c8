//! Scenario tests of a read transfer through `Endpoint` and `Transfer`,
//! over the simulated link in `sim`.

mod sim;

use std::time::Duration;

use ringtftpd::proto::{ErrorCode, Options, Packet};
use ringtftpd::session::{self, Outcome, Payload, Transmit};
use sim::*;

/// A link that does `fate` to the first packet matching `hit` and delivers
/// everything else.
fn first(
    fate: Fate,
    mut hit: impl FnMut(Dir, &Packet<'_>) -> bool,
) -> impl FnMut(Dir, &Packet<'_>, usize) -> Fate {
    let mut done = false;
    move |dir, p, _| {
        if !done && hit(dir, p) {
            done = true;
            fate
        } else {
            Fate::Deliver
        }
    }
}

/// A link that drops the first `count` packets matching `hit`.
fn drop_n(
    count: u32,
    mut hit: impl FnMut(Dir, &Packet<'_>) -> bool,
) -> impl FnMut(Dir, &Packet<'_>, usize) -> Fate {
    let mut dropped = 0;
    move |dir, p, _| {
        if dropped < count && hit(dir, p) {
            dropped += 1;
            Fate::Drop
        } else {
            Fate::Deliver
        }
    }
}

fn assert_complete(sim: &Sim, file: &[u8]) {
    assert_eq!(
        sim.outcome,
        Some(Outcome::Completed),
        "log: {:?}",
        sim.log_line
    );
    assert_eq!(sim.client.received.len(), file.len());
    assert!(sim.client.received == file, "content differs");
    assert_eq!(sim.endpoint.len(), 0);
}

#[test]
fn lock_step_sizes_around_block_boundaries() {
    for len in [0usize, 1, 511, 512, 513, 1024, 5000] {
        let file = content(len, len as u64);
        let mut sim = Sim::new(&file, &[]);
        sim.drive();
        assert_complete(&sim, &file);
        // Exactly one DATA per block, the last one short (possibly empty).
        assert_eq!(sim.data_sent(), len / 512 + 1, "len {len}");
        assert_eq!(sim.client.retransmits, 0);
    }
}

#[test]
fn lost_data_is_resent_after_timeout_only() {
    let file = content(10 * 512 + 7, 1);
    let mut sim = Sim::new(&file, &[]).link(first(Fate::Drop, |dir, p| {
        dir == Dir::ToClient && is_data(p, 3)
    }));
    sim.drive();
    assert_complete(&sim, &file);
    assert_eq!(sim.data_sent(), 11 + 1);
}

#[test]
fn lost_ack_is_recovered_by_server_timeout() {
    let file = content(4 * 512, 2);
    let mut sim = Sim::new(&file, &[]).link(first(Fate::Drop, |dir, p| {
        dir == Dir::ToServer && is_ack(p, 2)
    }));
    sim.drive();
    assert_complete(&sim, &file);
    // DATA 2 sent twice; the client re-ACKs the duplicate.
    assert_eq!(sim.data_sent(), 5 + 1);
}

#[test]
fn duplicate_acks_never_trigger_resends() {
    // Every ACK arrives twice: a naive server would answer each duplicate
    // with a duplicate DATA (Sorcerer's Apprentice, RFC 1123 §4.2.3.1).
    let file = content(50 * 512 + 3, 3);
    let mut sim = Sim::new(&file, &[]).link(|dir, _, _| {
        if dir == Dir::ToServer {
            Fate::Duplicate
        } else {
            Fate::Deliver
        }
    });
    sim.drive();
    assert_complete(&sim, &file);
    assert_eq!(sim.data_sent(), 51);
}

#[test]
fn delayed_data_does_not_start_the_sorcerers_apprentice() {
    // DATA 2 is delayed to arrive just before the server's resend of it (the
    // RTO sits at its 20 ms floor after DATA 1's sample): the client ACKs
    // both copies, and the duplicate ACK 2 reaches the server after it sent
    // DATA 3. A naive server would resend DATA 3, and every later block
    // would then go out twice.
    let file = content(20 * 512 + 1, 4);
    let mut sim = Sim::new(&file, &[]).link(first(
        Fate::Delay(Duration::from_micros(19_950)),
        |dir, p| dir == Dir::ToClient && is_data(p, 2),
    ));
    sim.drive();
    assert_complete(&sim, &file);
    // The client did see DATA 2 twice and ACKed it twice...
    let acks_of_2 = sim
        .client_sent
        .iter()
        .filter(|d| matches!(Packet::parse(d), Ok(Packet::Ack { block: 2 })))
        .count();
    assert_eq!(acks_of_2, 2);
    // ...yet one resend of DATA 2 (the timer's) is all the extra the server sent.
    assert_eq!(sim.data_sent(), 21 + 1);
}

#[test]
fn reordered_acks_are_harmless() {
    let file = content(64 * 1024, 5);
    // Windowed, with ACKs delayed by varying amounts so they arrive out of order.
    let mut sim = Sim::new(&file, &[("blksize", "1024"), ("windowsize", "4")]).link(|dir, _, i| {
        if dir == Dir::ToServer && i % 3 == 1 {
            Fate::Delay(Duration::from_micros(350))
        } else {
            Fate::Deliver
        }
    });
    sim.drive();
    assert_complete(&sim, &file);
}

#[test]
fn windowed_transfer_sends_windows_and_completes() {
    let file = content(100 * 1468 + 5, 6);
    let mut sim = Sim::new(&file, &[("blksize", "1468"), ("windowsize", "16")]);
    sim.drive();
    assert_complete(&sim, &file);
    assert_eq!(sim.data_sent(), 101);
    let oack = sim.client.oack.expect("OACK");
    assert_eq!(oack.windowsize, Some(16));
    assert_eq!(oack.blksize, Some(1468));
}

#[test]
fn ack_in_the_middle_of_a_window_resumes_after_it() {
    // Lose DATA 6 (first window is 1..=8): the client ACKs 5 when 7 arrives
    // out of order; the server resumes at 6 without waiting for a timeout.
    let file = content(32 * 512, 7);
    let mut sim = Sim::new(&file, &[("windowsize", "8")]).link(first(Fate::Drop, |dir, p| {
        dir == Dir::ToClient && is_data(p, 6)
    }));
    sim.drive();
    assert_complete(&sim, &file);
    // No timeout was needed: a timeout would cost at least the 20 ms RTO floor.
    assert!(
        sim.elapsed() < Duration::from_millis(10),
        "took {:?}",
        sim.elapsed()
    );
    // The first DATA 6 and its resend; 7 and 8 resent once too.
    assert!(sim.data_sent() <= 33 + 3 + 8, "sent {}", sim.data_sent());
}

#[test]
fn lost_window_ack_and_data_under_random_loss() {
    for seed in 1..40u64 {
        for window in [1u32, 3, 8] {
            let file = content(40 * 512 + (seed as usize * 37) % 512, seed);
            let mut rng = seed;
            let window_s = window.to_string();
            let mut sim = Sim::new(&file, &[("windowsize", &window_s)]).link(move |_, _, _| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                match rng % 10 {
                    0 => Fate::Drop,
                    1 => Fate::Duplicate,
                    2 => Fate::Delay(Duration::from_millis(3)),
                    _ => Fate::Deliver,
                }
            });
            sim.client.timeout = Duration::from_millis(300);
            sim.drive();
            // Either complete and exact, or (rarely) timed out: never wrong bytes.
            match sim.outcome {
                Some(Outcome::Completed) => assert_complete(&sim, &file),
                other => panic!("seed {seed} window {window}: {other:?}"),
            }
        }
    }
}

#[test]
fn client_that_vanishes_is_given_up_after_retries() {
    let file = content(100 * 512, 8);
    let mut sim = Sim::new(&file, &[]);
    // The client goes silent after receiving DATA 3.
    let mut sim_steps = 0;
    while sim.client.expected_block < 4 && sim_steps < 1000 {
        sim.step();
        sim_steps += 1;
    }
    sim.client.vanished = true;
    sim.drive();
    assert_eq!(sim.outcome, Some(Outcome::TimedOut));
    assert_eq!(sim.endpoint.len(), 0);
    // retries = 5: the last block sent 1 + 5 times, then an ERROR.
    let last = sim.server_sent.last().unwrap();
    assert!(matches!(
        Packet::parse(&last.1),
        Ok(Packet::Error {
            code: ErrorCode::NotDefined,
            ..
        })
    ));
    // Backoff: gaps between resends grow.
    let resend_times: Vec<_> = sim
        .server_sent
        .iter()
        .rev()
        .skip(1)
        .take(6)
        .map(|(t, _)| *t)
        .collect();
    let gaps: Vec<_> = resend_times.windows(2).map(|w| w[0] - w[1]).collect();
    assert!(gaps.windows(2).all(|g| g[0] >= g[1]), "gaps {gaps:?}");
    assert!(sim.log_line.as_ref().unwrap().contains("outcome=timed-out"));
}

#[test]
fn block_numbers_roll_over_past_65535() {
    let file = content(65536 * 8 + 3, 9);
    let mut sim = Sim::new(&file, &[("blksize", "8")]);
    sim.drive();
    assert_complete(&sim, &file);
    assert_eq!(sim.data_sent(), 65536 + 1);
    // Block 65535 is followed by block 0.
    let blocks: Vec<u16> = sim
        .server_sent
        .iter()
        .filter_map(|(_, d)| match Packet::parse(d) {
            Ok(Packet::Data { block, .. }) => Some(block),
            _ => None,
        })
        .collect();
    let pos = blocks.iter().position(|&b| b == 65535).unwrap();
    assert_eq!(blocks[pos + 1], 0);
    assert_eq!(blocks[pos + 2], 1);
}

#[test]
fn rollover_with_windows_and_loss_around_the_wrap() {
    let file = content(70000 * 8, 10);
    let mut sim =
        Sim::new(&file, &[("blksize", "8"), ("windowsize", "16")]).link(drop_n(4, |dir, p| {
            (dir == Dir::ToClient && (is_data(p, 65535) || is_data(p, 0) || is_data(p, 3)))
                || (dir == Dir::ToServer && is_ack(p, 65535))
        }));
    sim.drive();
    assert_complete(&sim, &file);
}

#[test]
fn tsize_reports_the_true_size() {
    let file = content(123_457, 11);
    let mut sim = Sim::new(&file, &[("tsize", "0"), ("blksize", "1468")]);
    sim.drive();
    assert_complete(&sim, &file);
    assert_eq!(sim.client.oack.unwrap().tsize, Some(123_457));
}

#[test]
fn error_8_in_answer_to_oack_ends_cleanly() {
    let file = content(5000, 12);
    let mut sim = Sim::new(&file, &[("tsize", "0")]);
    sim.client.decline_oack = true;
    sim.drive();
    assert_eq!(sim.outcome, Some(Outcome::OptionsDeclined));
    assert_eq!(sim.data_sent(), 0);
    assert_eq!(sim.endpoint.len(), 0);
}

#[test]
fn options_at_and_past_their_limits() {
    let l = limits();
    let n = |o: Options| session::negotiate(&o, 1000, None, false, &l);
    let o = |b: Option<u32>, t: Option<u32>, w: Option<u32>| Options {
        blksize: b,
        timeout: t,
        tsize: None,
        windowsize: w,
        ..Options::default()
    };
    // blksize: 8 and 65464 granted; below 8 ignored; above capped.
    assert_eq!(n(o(Some(8), None, None)).blksize, 8);
    assert_eq!(n(o(Some(65464), None, None)).blksize, 65464);
    assert_eq!(n(o(Some(65465), None, None)).blksize, 65464);
    assert_eq!(n(o(Some(u32::MAX), None, None)).blksize, 65464);
    let below = n(o(Some(7), None, None));
    assert_eq!((below.blksize, below.oack), (512, None));
    // timeout: 1 up to the RTO ceiling (2 s here) accepted; 0, 256, and
    // anything above the ceiling declined (RFC 2349 allows no lower value).
    let secs = |s| Some(Duration::from_secs(s));
    assert_eq!(n(o(None, Some(1), None)).timeout, secs(1));
    assert_eq!(n(o(None, Some(2), None)).timeout, secs(2));
    assert_eq!(n(o(None, Some(3), None)).oack, None);
    assert_eq!(n(o(None, Some(255), None)).oack, None);
    assert_eq!(n(o(None, Some(0), None)).oack, None);
    assert_eq!(n(o(None, Some(256), None)).oack, None);
    let patient = ringtftpd::session::Limits {
        rto_max: Duration::from_secs(255),
        ..limits()
    };
    assert_eq!(
        session::negotiate(&o(None, Some(255), None), 0, None, false, &patient).timeout,
        secs(255)
    );
    // windowsize: 1 is lockstep, left out of the OACK as tftpd-hpa 7.x
    // does; 0 ignored; above the limit capped.
    let one = n(o(None, None, Some(1)));
    assert_eq!((one.windowsize, one.oack), (1, None));
    assert_eq!(n(o(None, None, Some(0))).oack, None);
    let capped = n(o(None, None, Some(65535)));
    assert_eq!(capped.windowsize, 64);
    assert_eq!(capped.oack.unwrap().windowsize, Some(64));
    // --max-blksize caps too.
    let small = ringtftpd::session::Limits {
        max_blksize: 1024,
        ..limits()
    };
    assert_eq!(
        session::negotiate(&o(Some(4096), None, None), 0, None, false, &small).blksize,
        1024
    );
}

#[test]
fn blksize_is_clamped_to_the_interface_mtu() {
    let l = limits();
    let o = Options {
        blksize: Some(65464),
        ..Options::default()
    };
    assert_eq!(
        session::negotiate(&o, 0, Some(1500), false, &l).blksize,
        1468
    );
    assert_eq!(
        session::negotiate(&o, 0, Some(1500), true, &l).blksize,
        1448
    );
    assert_eq!(
        session::negotiate(&o, 0, Some(9000), false, &l).blksize,
        8968
    );
    let unclamped = ringtftpd::session::Limits {
        mtu_clamp: false,
        ..limits()
    };
    assert_eq!(
        session::negotiate(&o, 0, Some(1500), false, &unclamped).blksize,
        65464
    );
    // End to end: the OACK carries the clamped value.
    let file = content(10_000, 13);
    let mut sim = Sim::new(&file, &[("blksize", "8192")]);
    sim.drive();
    assert_complete(&sim, &file);
    assert_eq!(sim.client.oack.unwrap().blksize, Some(1468));
}

#[test]
fn negotiated_timeout_fixes_the_retransmission_interval() {
    let file = content(3 * 512, 14);
    let mut sim = Sim::new(&file, &[("timeout", "2")]).link(first(Fate::Drop, |dir, p| {
        dir == Dir::ToClient && is_data(p, 2)
    }));
    sim.client.timeout = Duration::from_secs(10);
    sim.drive();
    assert_complete(&sim, &file);
    let times: Vec<_> = sim
        .server_sent
        .iter()
        .filter(|(_, d)| matches!(Packet::parse(d), Ok(Packet::Data { block: 2, .. })))
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(times.len(), 2);
    assert_eq!(times[1] - times[0], Duration::from_secs(2));
}

#[test]
fn adaptive_rto_makes_a_lan_loss_cost_milliseconds() {
    // RTT 0.2 ms: after a few samples the RTO sits at its 20 ms floor, so a
    // lost DATA late in the transfer costs ~20 ms, not a second.
    let file = content(200 * 512, 15);
    let mut sim = Sim::new(&file, &[]).link(first(Fate::Drop, |dir, p| {
        dir == Dir::ToClient && is_data(p, 150)
    }));
    sim.drive();
    assert_complete(&sim, &file);
    let resend_gap = {
        let t: Vec<_> = sim
            .server_sent
            .iter()
            .filter(|(_, d)| matches!(Packet::parse(d), Ok(Packet::Data { block: 150, .. })))
            .map(|(t, _)| *t)
            .collect();
        t[1] - t[0]
    };
    assert!(
        resend_gap >= Duration::from_millis(20) && resend_gap < Duration::from_millis(25),
        "{resend_gap:?}"
    );
}

#[test]
fn lost_oack_is_resent_and_lost_final_ack_is_recovered() {
    let file = content(700, 16);
    let mut sim = Sim::new(&file, &[("blksize", "512")]).link(drop_n(2, |dir, p| {
        (dir == Dir::ToClient && matches!(p, Packet::Oack(_)))
            || (dir == Dir::ToServer && is_ack(p, 2))
    }));
    sim.drive();
    assert_complete(&sim, &file);
}

#[test]
fn lost_first_reply_retransmitted_rrq_does_not_start_a_second_transfer() {
    let file = content(2000, 17);
    let mut sim = Sim::new(&file, &[("blksize", "1024")]).link(first(Fate::Drop, |dir, p| {
        dir == Dir::ToClient && matches!(p, Packet::Oack(_))
    }));
    // The client's RRQ retransmit comes before the server's OACK resend.
    sim.client.timeout = Duration::from_millis(300);
    sim.drive();
    assert_complete(&sim, &file);
}

#[test]
fn missing_file_gets_error_1() {
    let mut sim = Sim::new(b"x", &[]);
    sim.files.files.clear();
    sim.drive();
    assert_eq!(sim.client.error, Some(ErrorCode::FileNotFound));
    assert_eq!(sim.endpoint.len(), 0);
}

#[test]
fn the_log_line_names_what_happened() {
    let file = content(3000, 18);
    let mut sim = Sim::new(&file, &[("blksize", "1000"), ("windowsize", "2")]);
    sim.drive();
    let line = sim.log_line.clone().unwrap();
    for part in [
        "client=127.0.0.2:40000",
        "file=\"file\"",
        "bytes=3000",
        "blksize=1000",
        "windowsize=2",
        "retransmits=0",
        "outcome=completed",
        "duration_ms=",
    ] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
}

/// The command line's default limits (a 5 ms starting RTO floor).
fn default_config() -> ringtftpd::endpoint::EndpointConfig {
    ringtftpd::endpoint::EndpointConfig {
        settings: Settings {
            limits: session::Limits::default(),
            ..settings()
        },
        ..config()
    }
}

/// A link that drops each packet with probability `percent`/100 and
/// duplicates 1 %, both ways (seeded, so a failure replays).
fn lossy(seed: u64, percent: u64) -> impl FnMut(Dir, &Packet<'_>, usize) -> Fate {
    let mut rng = seed * 2 + 1;
    move |_, _, _| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        match rng % 100 {
            r if r < percent => Fate::Drop,
            // And 1 % duplicated, as on the real lossy link of tests/lossy.rs:
            // a copied ACK must not pass for proof of a spurious resend.
            r if r == percent => Fate::Duplicate,
            _ => Fate::Deliver,
        }
    }
}

fn data_times(sim: &Sim, block: u16) -> Vec<std::time::Instant> {
    sim.server_sent
        .iter()
        .filter(
            |(_, d)| matches!(Packet::parse(d), Ok(Packet::Data { block: b, .. }) if b == block),
        )
        .map(|(t, _)| *t)
        .collect()
}

#[test]
fn lost_window_head_is_resent_on_the_gap_ack_without_waiting_for_the_rto() {
    // Window 2 is blocks 9..=16; its head is lost. The client re-ACKs 8 when
    // 10 arrives (RFC 7440 §4); the server resends the window at once.
    let file = content(40 * 512, 21);
    let mut sim = Sim::with_config(&file, &[("windowsize", "8")], default_config())
        .link(first(Fate::Drop, |dir, p| {
            dir == Dir::ToClient && is_data(p, 9)
        }));
    sim.drive();
    assert_complete(&sim, &file);
    let resend = data_times(&sim, 9);
    assert_eq!(resend.len(), 2, "block 9 sent twice");
    // An RTO would be at least the 2 ms floor; the round trip is 0.2 ms.
    let gap = resend[1] - resend[0];
    assert!(gap < Duration::from_millis(1), "resent after {gap:?}");
    // One window resent, nothing more.
    assert_eq!(sim.data_sent(), 41 + 8);
}

#[test]
fn duplicated_acks_never_resend_a_window() {
    // Every ACK arrives twice: a plain duplicate must not be taken for a
    // gap (RFC 1123 §4.2.3.1), in lock-step or windowed.
    for window in ["1", "8"] {
        let file = content(64 * 512, 22);
        let mut sim = Sim::with_config(&file, &[("windowsize", window)], default_config()).link(
            |dir, p, _| {
                if dir == Dir::ToServer && matches!(p, Packet::Ack { .. }) {
                    Fate::Duplicate
                } else {
                    Fate::Deliver
                }
            },
        );
        sim.drive();
        assert_complete(&sim, &file);
        assert_eq!(sim.data_sent(), 65, "windowsize {window}");
    }
}

#[test]
fn echoes_of_a_fast_resend_do_not_cascade() {
    // The head of each window is lost once, and every ACK is duplicated:
    // each loss costs exactly one resent window, never a chain of them.
    let file = content(64 * 512, 23);
    let mut lost = std::collections::HashSet::new();
    let mut sim =
        Sim::with_config(&file, &[("windowsize", "8")], default_config()).link(move |dir, p, _| {
            match (dir, p) {
                (Dir::ToClient, Packet::Data { block, .. })
                    if block % 8 == 1 && lost.insert(*block) =>
                {
                    Fate::Drop
                }
                (Dir::ToServer, Packet::Ack { .. }) => Fate::Duplicate,
                _ => Fate::Deliver,
            }
        });
    sim.drive();
    assert_complete(&sim, &file);
    // 8 windows, each resent once (the last one: blocks 57..=65).
    assert_eq!(sim.data_sent(), 65 + 7 * 8 + 9);
}

#[test]
fn loss_on_a_fast_link_costs_milliseconds() {
    // 0.2 ms round trip, 5 % loss and 1 % duplication each way, lock-step: the per-session RTO
    // starts at its 2 ms floor, so the lossy transfer keeps well over 10 %
    // of the loss-free rate (a 100 ms floor would give ~2 %).
    let file = content(2000 * 512, 24);
    let mut clean = Sim::with_config(&file, &[], default_config());
    clean.drive();
    assert_complete(&clean, &file);
    for seed in [1, 2, 3] {
        let mut sim = Sim::with_config(&file, &[], default_config()).link(lossy(seed, 5));
        sim.client.timeout = Duration::from_secs(1);
        sim.drive();
        assert_complete(&sim, &file);
        let ratio = clean.elapsed().as_secs_f64() / sim.elapsed().as_secs_f64();
        println!(
            "seed {seed}: lossy {:?} clean {:?} ratio {ratio:.3}",
            sim.elapsed(),
            clean.elapsed()
        );
        assert!(
            ratio > 0.10,
            "seed {seed}: lossy {:?} vs clean {:?} ({:.1} %)",
            sim.elapsed(),
            clean.elapsed(),
            ratio * 100.0
        );
    }
}

/// A lock-step client whose every 50th ACK is 40 ms late (a PXE guest
/// descheduled by its hypervisor), with a 1 s timeout of its own.
fn jittery_slow_client(file: &[u8]) -> Sim {
    let mut sim = Sim::with_config(file, &[], default_config()).link(every_50th_ack_late());
    sim.client.timeout = Duration::from_secs(1);
    sim
}

fn every_50th_ack_late() -> impl FnMut(Dir, &Packet<'_>, usize) -> Fate {
    |dir, p, i| {
        if dir == Dir::ToServer && matches!(p, Packet::Ack { .. }) && i % 50 == 25 {
            Fate::Delay(Duration::from_millis(40))
        } else {
            Fate::Deliver
        }
    }
}

#[test]
fn a_jittery_slow_client_raises_its_own_rto_floor() {
    // Every 50th ACK is 40 ms late (a PXE guest descheduled). A late ACK
    // costs a spurious resend until the first late original arrives after
    // its echo (the client re-ACKs the duplicate DATA): that proves the
    // resend spurious and the session's floor rises above the jitter. The
    // late ACKs of the first 40 ms (4 of them, 10 ms apart) cost a resend
    // each; the other 36 cost nothing.
    let file = content(2000 * 512, 25);
    let mut sim = jittery_slow_client(&file);
    sim.drive();
    assert_complete(&sim, &file);
    let resent = sim.data_sent() - 2001;
    assert!(resent <= 4, "{resent} spurious resends for 40 late ACKs");
    assert!(resent >= 1, "the first late ACK should have caused one");
}

#[test]
fn without_the_floor_rise_jitter_would_resend_every_time() {
    // The control for the test above: a client that never re-ACKs a
    // duplicate DATA gives no proof of a spurious resend, so the floor
    // stays low and each late ACK costs a resend.
    let file = content(2000 * 512, 25);
    let mut sim = jittery_slow_client(&file);
    sim.client.ignore_duplicate_data = true;
    sim.drive();
    assert_complete(&sim, &file);
    assert!(sim.data_sent() - 2001 >= 30, "{}", sim.data_sent());
}

#[test]
fn a_transfer_without_progress_ends_at_the_stall_limit() {
    // Generous retries and a long fixed timeout would keep a vanished
    // client's slot for minutes; the stall limit ends it.
    let file = content(100 * 512, 26);
    let mut config = default_config();
    config.settings.limits.retries = 1000;
    config.settings.limits.rto_max = Duration::from_secs(60);
    config.settings.limits.max_stall = Duration::from_secs(20);
    let mut sim = Sim::with_config(&file, &[("timeout", "7")], config).link(|dir, p, _| {
        if dir == Dir::ToServer && matches!(p, Packet::Ack { block } if *block >= 3) {
            Fate::Drop
        } else {
            Fate::Deliver
        }
    });
    sim.client.timeout = Duration::from_secs(1000);
    sim.drive();
    assert_eq!(sim.outcome, Some(Outcome::TimedOut));
    let elapsed = sim.elapsed();
    assert!(
        elapsed >= Duration::from_secs(20) && elapsed < Duration::from_secs(21),
        "{elapsed:?}"
    );
}

#[test]
fn runts_and_stray_packets_from_the_peer_are_ignored() {
    let file = content(10 * 512, 27);
    let limits = session::Limits::default();
    let negotiated =
        session::negotiate(&Options::default(), file.len() as u64, None, false, &limits);
    let now = std::time::Instant::now();
    let mut t = session::Transfer::new_read(now, &negotiated, file.len() as u64, &limits);
    let mut buf = [0u8; 600];
    for block in 1..=11u16 {
        let sent = t.poll_transmit(now, &mut buf).expect("DATA");
        assert_eq!(&buf[..4], &[0, 3, 0, block as u8]);
        assert!(sent.payload().is_some());
        assert!(t.poll_transmit(now, &mut buf).is_none());
        // Garbage between the blocks: a runt, a DATA, a stray RRQ, an OACK.
        for junk in [
            &b"\x00"[..],
            b"\x00\x03\x00\x01xyz",
            b"\x00\x01f\x00octet\x00",
            b"\x00\x06",
        ] {
            t.handle_datagram(now, junk);
            assert!(!t.is_ended(), "{junk:?} ended the transfer");
        }
        t.handle_datagram(now, &[0, 4, 0, block as u8]);
    }
    assert_eq!(t.poll_event(), Some(Outcome::Completed));
}

#[test]
fn each_transmit_says_what_it_carries() {
    // 65537 blocks of 8 bytes plus a short one: DATA past the rollover
    // keeps its absolute number; only the final block is `last`.
    let blocks = 65_537u64;
    let len = blocks * 8 + 3;
    let limits = session::Limits::default();
    let asked = Options {
        blksize: Some(8),
        ..Options::default()
    };
    let negotiated = session::negotiate(&asked, len, None, false, &limits);
    let now = std::time::Instant::now();
    let mut t = session::Transfer::new_read(now, &negotiated, len, &limits);
    let mut buf = [0u8; 600];
    let oack = t.poll_transmit(now, &mut buf).expect("OACK");
    let Transmit::Oack { len: oack_len } = oack else {
        panic!("{oack:?}")
    };
    assert!(matches!(
        Packet::parse(&buf[..oack_len]),
        Ok(Packet::Oack(_))
    ));
    assert_eq!((oack.header_len(), oack.payload()), (oack_len, None));
    t.handle_datagram(now, &[0, 4, 0, 0]);
    for block in 1..=blocks + 1 {
        let sent = t.poll_transmit(now, &mut buf).expect("DATA");
        let expected = Transmit::Data {
            block,
            payload: Payload {
                offset: (block - 1) * 8,
                len: if block > blocks { 3 } else { 8 },
            },
            last: block > blocks,
        };
        assert_eq!(sent, expected);
        assert_eq!(sent.header_len(), 4);
        assert_eq!(buf[2..4], (block as u16).to_be_bytes());
        let wire = (block as u16).to_be_bytes();
        t.handle_datagram(now, &[0, 4, wire[0], wire[1]]);
    }
    assert_eq!(t.poll_event(), Some(Outcome::Completed));
    // An abort's ERROR names its code.
    let mut t = session::Transfer::new_read(now, &negotiated, len, &limits);
    while t.poll_transmit(now, &mut buf).is_some() {}
    t.abort(now, ringtftpd::refusal::Abort::ShuttingDown);
    let error = t.poll_transmit(now, &mut buf).expect("ERROR");
    let Transmit::Error { code, len } = error else {
        panic!("{error:?}")
    };
    assert!(matches!(
        Packet::parse(&buf[..len]),
        Ok(Packet::Error { code: c, .. }) if c == code
    ));
    assert_eq!(t.poll_transmit(now, &mut buf), None);
    assert!(matches!(t.poll_event(), Some(Outcome::Aborted(c)) if c == code));
    assert_eq!(t.poll_event(), None, "the end is reported once");
}

/// When the `n`th copy of DATA `block` (1-based) was sent, after the one before it.
fn resend_gap(sim: &Sim, block: u16, n: usize) -> Duration {
    let times = data_times(sim, block);
    assert!(times.len() > n, "DATA {block} sent {} times", times.len());
    times[n] - times[n - 1]
}

fn oack_times(sim: &Sim) -> Vec<std::time::Instant> {
    sim.server_sent
        .iter()
        .filter(|(_, d)| matches!(Packet::parse(d), Ok(Packet::Oack(_))))
        .map(|(t, _)| *t)
        .collect()
}

#[test]
fn a_client_resent_ack0_is_not_taken_for_the_round_trip() {
    // ACK 0 is lost; the client's own timer (500 ms, shorter than our 1 s
    // initial RTO) resends it. Taken as the OACK's round trip, that 500 ms
    // would set the RTO to about 1.5 s and a later loss would cost a
    // second. The handshake's sample is only provisional: the first DATA
    // sample (0.2 ms) replaces it, so losing DATA 3 costs the 2 ms floor.
    let file = content(20 * 512, 30);
    let mut acks0 = 0;
    let mut data3 = 0;
    let mut sim =
        Sim::with_config(&file, &[("blksize", "512")], default_config()).link(move |dir, p, _| {
            match (dir, p) {
                (Dir::ToServer, Packet::Ack { block: 0 }) if acks0 == 0 => {
                    acks0 += 1;
                    Fate::Drop
                }
                (Dir::ToClient, Packet::Data { block: 3, .. }) if data3 == 0 => {
                    data3 += 1;
                    Fate::Drop
                }
                _ => Fate::Deliver,
            }
        });
    sim.drive();
    assert_complete(&sim, &file);
    assert_eq!(sim.client.retransmits, 1, "the client resent ACK 0 once");
    let gap = resend_gap(&sim, 3, 1);
    assert!(
        gap < Duration::from_millis(10),
        "DATA 3 resent after {gap:?}"
    );
}

#[test]
fn an_ack_after_its_deadline_is_no_rtt_sample() {
    // The timer wheel may run a little late: an ACK 0 that arrives after
    // the OACK's 1 s deadline, before the timeout was handled, may be the
    // client's own 1 s retransmission. It is no round-trip sample.
    let limits = session::Limits::default();
    let options = Options {
        blksize: Some(512),
        ..Options::default()
    };
    let negotiated = session::negotiate(&options, 5000, None, false, &limits);
    let t0 = std::time::Instant::now();
    let mut t = session::Transfer::new_read(t0, &negotiated, 5000, &limits);
    let mut buf = [0u8; 600];
    assert!(t.poll_transmit(t0, &mut buf).is_some(), "OACK");
    let deadline = t.poll_timeout().expect("armed");
    assert_eq!(deadline - t0, limits.initial_rto);
    t.handle_datagram(deadline + Duration::from_micros(400), &[0, 4, 0, 0]);
    assert_eq!(t.srtt(), None);
    assert_eq!(t.rto(), limits.initial_rto);
    // An ACK 0 in time is one.
    let mut t = session::Transfer::new_read(t0, &negotiated, 5000, &limits);
    t.poll_transmit(t0, &mut buf);
    t.handle_datagram(t0 + Duration::from_millis(3), &[0, 4, 0, 0]);
    assert_eq!(t.srtt(), Some(Duration::from_millis(3)));
}

/// `--rto-min-ms`'s default, as the transfer log line prints it.
const DEFAULT_FLOOR_MS: f64 = session::DEFAULT_RTO_MIN_MS as f64;

#[test]
fn a_fast_ack_proves_nothing_before_the_minimum_rtt_is_known() {
    // The first round trips are slow (ACK 0, 1 and 2 each 1 ms late: the
    // client opening its file, a loaded host), then the path is fast. The
    // ACK of block 3 is lost; the ACK answering its resend comes 0.2 ms
    // later, which is under half the smallest RTT seen so far (1.2 ms).
    // With that few samples this is no proof (Eifel by timing) that the
    // resend was spurious: the floor must stay at the default.
    let file = content(200 * 512, 31);
    let mut ack3 = 0;
    let mut sim =
        Sim::with_config(&file, &[("blksize", "512")], default_config()).link(move |dir, p, _| {
            match (dir, p) {
                (Dir::ToServer, Packet::Ack { block }) if *block <= 2 => {
                    Fate::Delay(Duration::from_millis(1))
                }
                (Dir::ToServer, Packet::Ack { block: 3 }) if ack3 == 0 => {
                    ack3 += 1;
                    Fate::Drop
                }
                _ => Fate::Deliver,
            }
        });
    sim.client.timeout = Duration::from_secs(1);
    sim.drive();
    assert_complete(&sim, &file);
    assert_eq!(data_times(&sim, 3).len(), 2);
    assert_eq!(
        logged_floor_ms(&sim),
        DEFAULT_FLOOR_MS,
        "{:?}",
        sim.log_line
    );
}

#[test]
fn a_lost_oack_to_a_known_client_costs_the_oack_floor_not_a_second() {
    // First contact: nothing is known of the client, so a lost OACK costs
    // the conservative initial RTO (1 s).
    let file = content(50 * 512, 32);
    let drop_first_oack = || {
        first(Fate::Drop, |dir, p| {
            dir == Dir::ToClient && matches!(p, Packet::Oack(_))
        })
    };
    let mut sim =
        Sim::with_config(&file, &[("blksize", "512")], default_config()).link(drop_first_oack());
    sim.client.timeout = Duration::from_secs(5);
    sim.drive();
    assert_complete(&sim, &file);
    let oacks = oack_times(&sim);
    assert_eq!(oacks.len(), 2);
    assert!(oacks[1] - oacks[0] >= Duration::from_secs(1));
    // The next transfer from that address starts from what this one
    // measured (0.2 ms round trips): its lost OACK costs the OACK floor
    // (a duplicate OACK aborts atftp, so it is never resent sooner), not
    // the initial RTO.
    sim.next_transfer(&file, &[("blksize", "512")]);
    sim.set_link(drop_first_oack());
    sim.drive();
    assert_complete(&sim, &file);
    let oacks = oack_times(&sim);
    assert_eq!(oacks.len(), 2);
    let gap = oacks[1] - oacks[0];
    assert!(
        gap >= session::OACK_RTO_FLOOR && gap < session::OACK_RTO_FLOOR + Duration::from_millis(10),
        "OACK resent after {gap:?}"
    );
    // After the estimate expires, a lost OACK is a first contact's again.
    sim.now += Duration::from_secs(601);
    sim.next_transfer(&file, &[("blksize", "512")]);
    sim.set_link(drop_first_oack());
    sim.drive();
    assert_complete(&sim, &file);
    let oacks = oack_times(&sim);
    assert!(oacks[1] - oacks[0] >= Duration::from_secs(1));
}

#[test]
fn a_known_slow_client_starts_at_the_floor_it_proved() {
    // The jittery slow client of a_jittery_slow_client_raises_its_own_rto_floor
    // fetches a second file: that transfer starts at the floor the first
    // one learned, so its late ACKs cost no spurious resend at all (the
    // first transfer paid a few before its floor rose).
    let file = content(2000 * 512, 33);
    let mut sim = jittery_slow_client(&file);
    sim.drive();
    assert_complete(&sim, &file);
    assert!(
        sim.data_sent() > 2001,
        "the first transfer paid for its lesson"
    );
    let learned = logged_floor_ms(&sim);
    assert!(learned > 40.0, "floor {learned} ms");
    sim.next_transfer(&file, &[]);
    sim.set_link(every_50th_ack_late());
    sim.drive();
    assert_complete(&sim, &file);
    assert_eq!(
        sim.data_sent(),
        2001,
        "spurious resends in the second transfer"
    );
    assert!(logged_floor_ms(&sim) >= learned);
}

#[test]
fn the_path_cache_is_bounded() {
    // 5000 clients, each completing a one-block transfer: the endpoint
    // keeps at most 4096 path estimates.
    let mut endpoint = ringtftpd::endpoint::Endpoint::new(default_config());
    let mut files = MemFiles::default();
    files
        .files
        .insert(b"f".to_vec(), std::sync::Arc::new(vec![7u8; 10]));
    let mut now = std::time::Instant::now();
    let mut buf = [0u8; 600];
    for i in 0u32..5000 {
        let peer =
            std::net::SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 1000));
        let local = std::net::IpAddr::from([10, 255, 255, 254]);
        let outcome = endpoint.handle_request(
            now,
            peer,
            local,
            None,
            b"\x00\x01f\x00octet\x00",
            &mut files,
            &mut buf,
        );
        let ringtftpd::endpoint::RequestOutcome::Started(id) = outcome else {
            panic!("{outcome:?}");
        };
        while endpoint.poll_transmit(now, id, &mut buf).is_some() {}
        now += Duration::from_micros(100);
        endpoint.handle_datagram(now, id, peer, &[0, 4, 0, 1], &mut buf);
        while endpoint.poll_transmit(now, id, &mut buf).is_some() {}
        assert!(endpoint.poll_event(id).is_some(), "one-block file not done");
        assert!(endpoint.path_cache_len() <= 4096);
    }
    assert_eq!(endpoint.path_cache_len(), 4096);
}

#[test]
fn an_addresss_floor_falls_again_when_it_proved_unneeded() {
    // Floors learned for one address must not only ever rise (many
    // clients behind one NAT address would ratchet it to the ceiling): a
    // seeded transfer that proves no resend spurious hands on half its
    // floor, never below the default.
    let file = content(2000 * 512, 34);
    let mut sim = jittery_slow_client(&file);
    sim.drive();
    assert_complete(&sim, &file);
    let learned = logged_floor_ms(&sim);
    let mut floors = Vec::new();
    for _ in 0..12 {
        sim.next_transfer(&file, &[]);
        sim.drive();
        assert_complete(&sim, &file);
        floors.push(logged_floor_ms(&sim));
    }
    assert_eq!(
        floors[0], learned,
        "the first clean transfer starts at the learned floor"
    );
    assert!(floors[1] <= learned / 2.0 + 0.1, "{floors:?}");
    assert_eq!(*floors.last().unwrap(), DEFAULT_FLOOR_MS, "{floors:?}");
}

/// Runs a lock-step transfer on a fast link whose client goes silent for
/// `pause` after DATA 3, under `min_give_up`.
fn pause_after_block_3(pause: Duration, min_give_up: Duration) -> Sim {
    let file = content(20 * 512, 31);
    let mut config = default_config();
    config.settings.limits.min_give_up = min_give_up;
    let mut sim = Sim::with_config(&file, &[], config);
    for _ in 0..10_000 {
        if sim.client.expected_block >= 4 {
            break;
        }
        sim.step();
    }
    sim.client.vanished = true;
    let until = sim.elapsed() + pause;
    for _ in 0..100_000 {
        if sim.elapsed() >= until || sim.outcome.is_some() || !sim.step() {
            break;
        }
    }
    sim.client.vanished = false;
    sim.drive();
    sim
}

#[test]
fn a_client_that_pauses_for_seconds_is_waited_for() {
    // A fast link: the RTO sits at its 2 ms floor, so the 8 retries alone
    // are spent in ~1 s.
    let sim = pause_after_block_3(Duration::from_secs(5), Duration::ZERO);
    assert_eq!(sim.outcome, Some(Outcome::TimedOut), "the contrast");
    let sim = pause_after_block_3(
        Duration::from_secs(5),
        session::Limits::default().min_give_up,
    );
    assert_eq!(sim.outcome, Some(Outcome::Completed), "{:?}", sim.log_line);
    assert_eq!(sim.client.received, content(20 * 512, 31));
    // Bounded: a longer silence still ends it.
    let sim = pause_after_block_3(Duration::from_secs(60), Duration::from_secs(15));
    assert_eq!(sim.outcome, Some(Outcome::TimedOut));
    let resends = sim.data_sent() - 4;
    assert!(
        resends <= (8 + session::MAX_PATIENT_RETRIES + 1) as usize,
        "{resends} resends of DATA 4"
    );
}

#[test]
fn a_peer_never_heard_from_gets_only_its_retries() {
    // A spoofed request: nobody answers DATA 1. Waiting longer would only
    // send more at the victim.
    let file = content(20 * 512, 32);
    let mut sim = Sim::with_config(&file, &[], default_config());
    sim.client.vanished = true;
    sim.drive();
    assert_eq!(sim.outcome, Some(Outcome::TimedOut));
    assert_eq!(sim.data_sent(), 1 + 8, "DATA 1 and its 8 resends");
}

#[test]
fn a_first_contact_gets_a_small_window_and_a_known_client_the_full_one() {
    // A spoofed request's victim is a first contact: a forged ACK 0 buys
    // at most 16 blocks. The same client, once it finished a transfer,
    // gets the windowsize it asks for.
    let file = content(200 * 512, 33);
    let options = [("blksize", "512"), ("windowsize", "64")];
    let mut sim = Sim::with_config(&file, &options, default_config());
    sim.drive();
    assert_complete(&sim, &file);
    assert_eq!(sim.client.oack.and_then(|o| o.windowsize), Some(16));
    sim.next_transfer(&file, &options);
    sim.drive();
    assert_complete(&sim, &file);
    assert_eq!(sim.client.oack.and_then(|o| o.windowsize), Some(64));
    // Off: the first contact gets 64 at once.
    let mut config = default_config();
    config.settings.first_contact_windowsize = 0;
    let mut sim = Sim::with_config(&file, &options, config);
    sim.drive();
    assert_complete(&sim, &file);
    assert_eq!(sim.client.oack.and_then(|o| o.windowsize), Some(64));
}
