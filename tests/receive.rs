//! Sans-IO tests of the receive direction (WRQ): a `Transfer` made by
//! `new_write` fed DATA from a scripted sender over a lossy link in
//! virtual time. The sender is RFC 1350 / RFC 7440: it sends a window,
//! waits for an ACK, restarts after the block acknowledged, and resends
//! the window when its own timer fires.

use std::time::{Duration, Instant};

use ringtftpd::proto::{ErrorCode, Options, Packet};
use ringtftpd::session::{Limits, Negotiated, Outcome, Transfer};

const SENDER_TIMEOUT: Duration = Duration::from_millis(300);
const LINK_DELAY: Duration = Duration::from_micros(200);

fn file(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn negotiated(blksize: u16, windowsize: u16, oack: bool) -> Negotiated {
    Negotiated {
        blksize,
        windowsize,
        timeout: None,
        rollover: Default::default(),
        oack: oack.then(|| Options {
            blksize: Some(u32::from(blksize)),
            windowsize: Some(u32::from(windowsize)),
            ..Options::default()
        }),
    }
}

fn data(block: u16, payload: &[u8]) -> Vec<u8> {
    let mut d = vec![0, 3];
    d.extend_from_slice(&block.to_be_bytes());
    d.extend_from_slice(payload);
    d
}

/// What the run saw.
#[derive(Debug, Default)]
struct Run {
    stored: Vec<u8>,
    /// Bytes written, repeats included: more than the file means a block
    /// was written twice.
    written: usize,
    acks: Vec<u16>,
    /// When each ACK reached the sender, from the start.
    acked_at: Vec<Duration>,
    error: Option<(ErrorCode, String)>,
    outcome: Option<Outcome>,
    /// ACKs sent before the commit that acknowledged the final block.
    early_final_ack: bool,
    data_sent: usize,
    elapsed: Duration,
}

/// Uploads `content` through `t`; `drop(to_server, n)` decides the fate
/// of the n-th datagram each way. The sender stops after `vanish_after`
/// DATA packets if given.
fn upload(
    mut t: Transfer,
    content: &[u8],
    blksize: usize,
    windowsize: usize,
    drop: impl FnMut(bool, usize) -> bool,
    vanish_after: Option<usize>,
) -> Run {
    // Shared by the sender's closure and the transfer's side of the loop.
    let drop = std::cell::RefCell::new(drop);
    let n_up = std::cell::Cell::new(0usize);
    let start = Instant::now();
    let mut now = start;
    let mut run = Run::default();
    let total_blocks = content.len() / blksize + 1;
    let payload = |b: usize| {
        let from = ((b - 1) * blksize).min(content.len());
        &content[from..(from + blksize).min(content.len())]
    };
    let mut acked = 0usize; // sender's view
    let mut started = false;
    let mut committed = false;
    let mut last_received = false;
    let mut n_down = 0;
    let mut buf = [0u8; 600];
    // In flight: (arrival, to_server, bytes).
    let mut wire: Vec<(Instant, bool, Vec<u8>)> = Vec::new();
    let mut sender_deadline: Option<Instant> = None;
    let send_window = |from: usize, now: Instant, wire: &mut Vec<_>, run: &mut Run| {
        for b in from..(from + windowsize).min(total_blocks + 1) {
            if vanish_after.is_some_and(|v| run.data_sent >= v) {
                return;
            }
            run.data_sent += 1;
            n_up.set(n_up.get() + 1);
            if !(drop.borrow_mut())(true, n_up.get()) {
                wire.push((now + LINK_DELAY, true, data(b as u16, payload(b))));
            }
        }
    };
    for _ in 0..2_000_000 {
        // Everything the transfer wants to send.
        while let Some(tx) = t.poll_transmit(now, &mut buf) {
            let bytes = buf[..tx.header_len()].to_vec();
            n_down += 1;
            if !(drop.borrow_mut())(false, n_down) {
                wire.push((now + LINK_DELAY, false, bytes));
            }
        }
        if let Some(outcome) = t.poll_event() {
            run.outcome = Some(outcome);
        }
        // The owner stores the file once the last block is in.
        if last_received && !committed {
            committed = true;
            t.commit_done(now);
            continue;
        }
        if run.outcome.is_some() {
            // Only what is on its way to the sender still matters.
            wire.retain(|w| !w.1);
            sender_deadline = None;
        }
        // The next event: a delivery, the transfer's timer, the sender's.
        let timer = t.poll_timeout().filter(|_| run.outcome.is_none());
        let next = wire
            .iter()
            .map(|w| w.0)
            .chain(timer)
            .chain(sender_deadline)
            .min();
        let Some(next) = next else { break };
        now = now.max(next);
        if let Some(i) = wire.iter().position(|w| w.0 <= now) {
            let (_, to_server, bytes) = wire.remove(i);
            if to_server {
                if let Some(r) = t.handle_datagram(now, &bytes) {
                    let end = r.offset as usize + r.bytes.len();
                    if run.stored.len() < end {
                        run.stored.resize(end, 0);
                    }
                    run.stored[r.offset as usize..end].copy_from_slice(r.bytes);
                    run.written += r.bytes.len();
                    last_received |= r.last;
                }
                continue;
            }
            match Packet::parse(&bytes) {
                Ok(Packet::Ack { block }) => {
                    run.acks.push(block);
                    run.acked_at.push(now - start);
                    if last_received && !committed && block as usize == total_blocks % 65536 {
                        run.early_final_ack = true;
                    }
                    let b = acked + usize::from(block.wrapping_sub(acked as u16));
                    if !started && block == 0 {
                        started = true;
                        send_window(1, now, &mut wire, &mut run);
                        sender_deadline = Some(now + SENDER_TIMEOUT);
                    } else if b > acked && b <= total_blocks {
                        acked = b;
                        if acked == total_blocks {
                            sender_deadline = None; // done; it may dally too
                        } else {
                            send_window(acked + 1, now, &mut wire, &mut run);
                            sender_deadline = Some(now + SENDER_TIMEOUT);
                        }
                    }
                }
                Ok(Packet::Oack(_)) if !started => {
                    started = true;
                    send_window(1, now, &mut wire, &mut run);
                    sender_deadline = Some(now + SENDER_TIMEOUT);
                }
                Ok(Packet::Error { code, message }) => {
                    run.error = Some((code, String::from_utf8_lossy(message).into_owned()));
                    sender_deadline = None;
                }
                _ => {}
            }
            continue;
        }
        if t.poll_timeout().is_some_and(|d| d <= now) {
            t.handle_timeout(now);
        }
        if sender_deadline.is_some_and(|d| d <= now) {
            send_window(acked + 1, now, &mut wire, &mut run);
            sender_deadline = if vanish_after.is_some_and(|v| run.data_sent >= v) {
                None
            } else {
                Some(now + SENDER_TIMEOUT)
            };
        }
    }
    run.elapsed = now - start;
    run
}

fn limits() -> Limits {
    Limits::default()
}

#[track_caller]
fn assert_stored(run: &Run, content: &[u8]) {
    assert_eq!(run.outcome, Some(Outcome::Completed), "{run:?}");
    assert!(run.stored == content, "stored bytes differ");
    assert!(!run.early_final_ack, "final ACK before the commit");
}

#[test]
fn lock_step_upload_sizes_around_block_boundaries() {
    for len in [0usize, 1, 511, 512, 513, 5000] {
        let content = file(len, 1);
        let t = Transfer::new_write(Instant::now(), &negotiated(512, 1, false), None, &limits());
        let run = upload(t, &content, 512, 1, |_, _| false, None);
        assert_stored(&run, &content);
        assert_eq!(run.acks.first(), Some(&0), "a plain WRQ starts with ACK 0");
        assert_eq!(run.acks.len(), len / 512 + 2, "len {len}: {:?}", run.acks);
        assert_eq!(run.written, len);
    }
}

#[test]
fn an_oack_is_answered_by_data_1_and_windows_are_acked_once() {
    let content = file(64 * 1024 + 100, 2);
    let t = Transfer::new_write(Instant::now(), &negotiated(1024, 8, true), None, &limits());
    let run = upload(t, &content, 1024, 8, |_, _| false, None);
    assert_stored(&run, &content);
    // 65 blocks: an ACK per full window of 8, and the final one.
    assert_eq!(run.acks, vec![8, 16, 24, 32, 40, 48, 56, 64, 65]);
}

#[test]
fn lost_data_and_lost_acks_are_recovered_and_nothing_is_written_twice() {
    for windowsize in [1usize, 4] {
        for seed in 0..8u64 {
            let content = file(40 * 512 + 7, 3);
            let mut rng = seed * 2 + 1;
            let lossy = move |_: bool, _: usize| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % 100 < 10
            };
            let t = Transfer::new_write(
                Instant::now(),
                &negotiated(512, windowsize as u16, windowsize > 1),
                None,
                &limits(),
            );
            let run = upload(t, &content, 512, windowsize, lossy, None);
            assert_stored(&run, &content);
            assert_eq!(run.written, content.len(), "ws {windowsize} seed {seed}");
        }
    }
}

#[test]
fn a_gap_in_a_window_is_answered_at_once() {
    // DATA 2 (the second datagram up) is lost: the ACK of block 1 comes
    // when block 3 arrives, not after the sender's 300 ms timer.
    let content = file(16 * 512 + 1, 4);
    let t = Transfer::new_write(Instant::now(), &negotiated(512, 8, true), None, &limits());
    let run = upload(t, &content, 512, 8, |up, n| up && n == 2, None);
    assert_stored(&run, &content);
    assert_eq!(run.acks[0], 1, "{:?}", run.acks);
    let done = *run.acked_at.last().unwrap();
    assert!(done < SENDER_TIMEOUT, "the final ACK after {done:?}");
}

#[test]
fn block_numbers_roll_over_past_65535() {
    let content = file(70_000 * 8 + 3, 5);
    let t = Transfer::new_write(Instant::now(), &negotiated(8, 16, true), None, &limits());
    let run = upload(t, &content, 8, 16, |_, _| false, None);
    assert_stored(&run, &content);
}

#[test]
fn an_upload_over_its_limit_ends_with_error_3_at_the_crossing_block() {
    let content = file(10 * 512, 6);
    let t = Transfer::new_write(
        Instant::now(),
        &negotiated(512, 1, false),
        Some(4 * 512 + 10),
        &limits(),
    );
    let run = upload(t, &content, 512, 1, |_, _| false, None);
    assert!(matches!(
        run.outcome,
        Some(Outcome::Aborted(ErrorCode::DiskFull))
    ));
    let (code, message) = run.error.expect("an ERROR");
    assert_eq!(code, ErrorCode::DiskFull);
    assert_eq!(message, "file too large");
    assert_eq!(run.written, 4 * 512, "nothing past the limit is handed on");
}

#[test]
fn a_sender_that_vanishes_is_given_up_with_an_error() {
    let content = file(50 * 512, 7);
    let t = Transfer::new_write(Instant::now(), &negotiated(512, 1, false), None, &limits());
    let run = upload(t, &content, 512, 1, |_, _| false, Some(10));
    assert_eq!(run.outcome, Some(Outcome::TimedOut), "{run:?}");
    assert!(matches!(run.error, Some((ErrorCode::NotDefined, _))));
    // Re-ACKs of block 10 at our (1 s floor) timer, then the end, within
    // the patient give-up bound.
    let reacks = run.acks.iter().filter(|&&b| b == 10).count();
    assert!(reacks > 1, "{:?}", run.acks);
    assert!(run.elapsed >= Duration::from_secs(15), "{:?}", run.elapsed);
    assert!(run.elapsed < Duration::from_secs(60), "{:?}", run.elapsed);
}

#[test]
fn a_lost_final_ack_is_answered_again_while_dallying() {
    // The final ACK (the 7th datagram down: ACK 0..5, then 6) is lost;
    // the sender resends DATA 6 and gets it again.
    let content = file(5 * 512 + 9, 8);
    let t = Transfer::new_write(Instant::now(), &negotiated(512, 1, false), None, &limits());
    let run = upload(t, &content, 512, 1, |up, n| !up && n == 7, None);
    assert_stored(&run, &content);
    assert_eq!(
        run.acks.iter().filter(|&&b| b == 6).count(),
        1,
        "{:?}",
        run.acks
    );
    assert_eq!(run.data_sent, 7, "DATA 1..6 and one resend of DATA 6");
}

#[test]
fn an_ack_sent_to_a_receiver_is_ignored_and_its_timer_kept() {
    // Found by the receive fuzz target: ACK 0 after our OACK took the
    // sender's path, ended the negotiation and cleared the timer.
    let now = Instant::now();
    let mut t = Transfer::new_write(now, &negotiated(512, 4, true), None, &limits());
    let mut buf = [0u8; 600];
    let oack = t.poll_transmit(now, &mut buf).expect("the OACK");
    assert!(matches!(
        Packet::parse(&buf[..oack.header_len()]),
        Ok(Packet::Oack(_))
    ));
    assert!(t.handle_datagram(now, &[0, 4, 0, 0]).is_none());
    let deadline = t.poll_timeout().expect("the OACK's timer survives");
    t.handle_timeout(deadline);
    let again = t.poll_transmit(deadline, &mut buf).expect("the OACK again");
    assert!(matches!(
        Packet::parse(&buf[..again.header_len()]),
        Ok(Packet::Oack(_))
    ));
}
