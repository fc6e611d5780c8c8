//! `floor`: what one UDP datagram costs on this machine's loopback, the yardstick for a
//! server's CPU per DATA block.
//!
//! A sender thread pinned to `--send-cpu` blasts datagrams of `--size` bytes with `sendmmsg`
//! in batches of `--batch` to a receiver thread pinned to `--recv-cpu` that drains them with
//! `recvmmsg`. On loopback the sender's system call also delivers each datagram into the
//! receiver's socket, so the sender's CPU time (its thread's `getrusage`) per datagram is the
//! least any server can pay to get one DATA block to a client. Prints a human line or one
//! JSON line. Traffic goes to 127.0.0.1 only.
#![forbid(unsafe_code)]

use std::io::IoSlice;
use std::io::IoSliceMut;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use nix::sched::{CpuSet, sched_setaffinity};
use nix::sys::resource::{UsageWho, getrusage};
use nix::sys::socket::{
    MsgFlags, MultiHeaders, SockaddrIn, recvmmsg, sendmmsg, setsockopt, sockopt,
};
use nix::sys::time::TimeValLike;
use nix::unistd::Pid;
use serde_json::json;

#[derive(Parser, Debug)]
#[command(
    name = "floor",
    about = "CPU cost of one batched sendmmsg datagram on loopback (the floor for a DATA block)"
)]
struct Args {
    /// CPU the sender is pinned to (the server's CPU in a comparison).
    #[arg(long, default_value_t = 1)]
    send_cpu: usize,
    /// CPU the receiver is pinned to (the load generator's CPU).
    #[arg(long, default_value_t = 0)]
    recv_cpu: usize,
    /// How long to send.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Datagram size in bytes (1472 = 4-byte TFTP header + 1468 payload).
    #[arg(long, default_value_t = 1472, value_parser = clap::value_parser!(u16).range(1..=65507))]
    size: u16,
    /// Datagrams per sendmmsg call.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    batch: u16,
    /// Print one JSON line instead of the human summary.
    #[arg(long)]
    json: bool,
}

/// The figures of one blast.
#[derive(Debug, Clone, Copy)]
struct Blast {
    sent: u64,
    received: u64,
    wall: Duration,
    send_cpu: Duration,
}

impl Blast {
    fn us_per_datagram(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        self.send_cpu.as_secs_f64() * 1e6 / self.sent as f64
    }
}

fn pin(cpu: usize) -> Result<(), String> {
    let mut set = CpuSet::new();
    set.set(cpu).map_err(|e| format!("CPU {cpu}: {e}"))?;
    // Pid 0 is the calling thread.
    sched_setaffinity(Pid::from_raw(0), &set).map_err(|e| format!("pin to CPU {cpu}: {e}"))
}

fn thread_cpu() -> Result<Duration, String> {
    let u = getrusage(UsageWho::RUSAGE_THREAD).map_err(|e| format!("getrusage: {e}"))?;
    let us = u.user_time().num_microseconds() + u.system_time().num_microseconds();
    Ok(Duration::from_micros(u64::try_from(us).unwrap_or(0)))
}

fn receive(sock: UdpSocket, cpu: usize, stop: Arc<AtomicBool>, got: Arc<AtomicU64>, size: usize) {
    if let Err(e) = pin(cpu) {
        eprintln!("floor: receiver: {e} (running unpinned)");
    }
    const BATCH: usize = 64;
    let mut bufs = vec![vec![0u8; size.max(1)]; BATCH];
    let fd = sock.as_raw_fd();
    loop {
        let mut slices: Vec<[IoSliceMut<'_>; 1]> =
            bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        let mut hdrs = MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
        // WAITFORONE: block for the first datagram only, then take what is queued.
        match recvmmsg(
            fd,
            &mut hdrs,
            slices.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        ) {
            Ok(r) => {
                got.fetch_add(r.count() as u64, Ordering::Relaxed);
            }
            // SO_RCVTIMEO expired: the sender may be done.
            Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
            }
            Err(e) => {
                eprintln!("floor: recvmmsg: {e}");
                return;
            }
        }
    }
}

fn blast(args: &Args) -> Result<Blast, String> {
    if !args.seconds.is_finite() || args.seconds <= 0.0 || args.seconds > 600.0 {
        return Err(format!(
            "--seconds must be in (0, 600], got {}",
            args.seconds
        ));
    }
    let size = usize::from(args.size);
    let rx = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind receiver: {e}"))?;
    // A deep receive buffer so the receiver's scheduling hiccups do not turn into drops;
    // FORCE needs root, the plain option is the fallback.
    let want = 16 << 20;
    if setsockopt(&rx, sockopt::RcvBufForce, &want).is_err() {
        let _ = setsockopt(&rx, sockopt::RcvBuf, &want);
    }
    rx.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    let to = rx.local_addr().map_err(|e| e.to_string())?;
    let tx = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("bind sender: {e}"))?;
    tx.connect(to).map_err(|e| format!("connect: {e}"))?;

    let stop = Arc::new(AtomicBool::new(false));
    let got = Arc::new(AtomicU64::new(0));
    let receiver = {
        let (stop, got) = (stop.clone(), got.clone());
        let cpu = args.recv_cpu;
        thread::spawn(move || receive(rx, cpu, stop, got, size))
    };

    let (send_cpu, batch, seconds) = (args.send_cpu, usize::from(args.batch), args.seconds);
    let sender = thread::spawn(move || -> Result<(u64, Duration, Duration), String> {
        if let Err(e) = pin(send_cpu) {
            eprintln!("floor: sender: {e} (running unpinned)");
        }
        let payload = vec![0x5au8; size];
        let slices: Vec<[IoSlice<'_>; 1]> = (0..batch).map(|_| [IoSlice::new(&payload)]).collect();
        // The socket is connected: no per-message address.
        let addrs: Vec<Option<SockaddrIn>> = vec![None; batch];
        let fd = tx.as_raw_fd();
        let run = Duration::from_secs_f64(seconds);
        let cpu0 = thread_cpu()?;
        let t0 = Instant::now();
        let mut sent = 0u64;
        let mut hdrs = MultiHeaders::<SockaddrIn>::preallocate(batch, None);
        while t0.elapsed() < run {
            match sendmmsg(fd, &mut hdrs, &slices, &addrs, [], MsgFlags::empty()) {
                Ok(r) => sent += r.count() as u64,
                // Loopback never blocks a blocking socket for long, but a full queue may
                // report ENOBUFS: try again.
                Err(nix::errno::Errno::ENOBUFS) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("sendmmsg: {e}")),
            }
        }
        let wall = t0.elapsed();
        let cpu = thread_cpu()?.saturating_sub(cpu0);
        Ok((sent, wall, cpu))
    });
    let res = sender
        .join()
        .map_err(|_| "sender thread panicked".to_string());
    stop.store(true, Ordering::Relaxed);
    let _ = receiver.join();
    let (sent, wall, send_cpu) = res??;
    Ok(Blast {
        sent,
        received: got.load(Ordering::Relaxed),
        wall,
        send_cpu,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    match blast(&args) {
        Ok(b) => {
            let secs = b.wall.as_secs_f64().max(1e-9);
            let per_s = b.sent as f64 / secs;
            let loss = if b.sent > 0 {
                1.0 - (b.received.min(b.sent) as f64 / b.sent as f64)
            } else {
                0.0
            };
            if args.json {
                let j = json!({
                    "kind": "floor",
                    "size": args.size,
                    "batch": args.batch,
                    "send_cpu": args.send_cpu,
                    "recv_cpu": args.recv_cpu,
                    "seconds": secs,
                    "sent": b.sent,
                    "received": b.received,
                    "loss": loss,
                    "datagrams_per_s": per_s,
                    "gbit_per_s": per_s * f64::from(args.size) * 8.0 / 1e9,
                    "sender_cpu_s": b.send_cpu.as_secs_f64(),
                    "sender_cpu_pct": b.send_cpu.as_secs_f64() / secs * 100.0,
                    "cpu_us_per_datagram": b.us_per_datagram(),
                });
                println!("{j}");
            } else {
                println!(
                    "floor: {} datagrams of {} B in {:.2} s ({:.0}/s, {:.2} Gbit/s), received {} \
                     (loss {:.2} %), sender CPU {:.3} s = {:.3} us per datagram",
                    b.sent,
                    args.size,
                    secs,
                    per_s,
                    per_s * f64::from(args.size) * 8.0 / 1e9,
                    b.received,
                    loss * 100.0,
                    b.send_cpu.as_secs_f64(),
                    b.us_per_datagram()
                );
            }
            if b.sent == 0 || b.received == 0 {
                eprintln!("floor: nothing went through loopback");
                return ExitCode::from(1);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("floor: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_blast_goes_through_and_costs_something() {
        let args = Args {
            send_cpu: 0,
            recv_cpu: 0,
            seconds: 0.1,
            size: 1472,
            batch: 16,
            json: true,
        };
        let b = blast(&args).unwrap();
        assert!(b.sent > 0);
        assert!(b.received > 0 && b.received <= b.sent);
        assert!(b.wall >= Duration::from_millis(100));
        assert!(b.us_per_datagram() > 0.0);
    }

    #[test]
    fn bad_durations_are_refused() {
        for s in [0.0, -1.0, f64::NAN, 1e9] {
            let args = Args {
                send_cpu: 0,
                recv_cpu: 0,
                seconds: s,
                size: 100,
                batch: 1,
                json: false,
            };
            assert!(blast(&args).is_err(), "{s}");
        }
    }
}
