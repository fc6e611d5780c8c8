//! Session-level replays of what real boot firmware sent ringtftpd in the
//! qemu boot test (`scripts/boot-test.sh`), byte for byte as captured on the
//! test bridge: Debian's iPXE ROM, pxelinux 6.04 and OVMF's own PXE client.
//! Each test feeds the firmware's datagrams to an `Endpoint` in the order
//! and from the ports the firmware used, and checks every reply against
//! what the firmware needs to go on. docs/clients.md has the captures.

mod sim;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringtftpd::endpoint::{DatagramOutcome, Endpoint, RequestOutcome, SessionId};
use ringtftpd::proto::{ErrorCode, Options, Packet};
use ringtftpd::session::Outcome;
use sim::{MemFiles, config, content};

/// The server's address on the test bridge, whose MTU is 1500.
const SERVER: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
const MTU: Option<u32> = Some(1500);

fn client(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, 101)), port)
}

/// What the client saw in answer to a request.
#[derive(Debug)]
enum Answer {
    /// A transfer started; its first datagrams (the OACK, or DATA 1).
    Started(SessionId, Vec<Vec<u8>>),
    /// A reply from the listening port (port 69), e.g. ERROR 1.
    Listener(Vec<u8>),
    Ignored,
}

/// The server side of one machine's boot: an endpoint with in-memory
/// files, a fake clock and the transfer log lines.
struct Wire {
    endpoint: Endpoint<Arc<Vec<u8>>>,
    files: MemFiles,
    now: Instant,
    buf: Vec<u8>,
    log: Vec<String>,
    outcomes: Vec<Outcome>,
}

impl Wire {
    fn new(files: &[(&str, &[u8])]) -> Self {
        let mut mem = MemFiles::default();
        for (name, data) in files {
            mem.files
                .insert(name.as_bytes().to_vec(), Arc::new(data.to_vec()));
        }
        Self {
            endpoint: Endpoint::new(config()),
            files: mem,
            now: Instant::now(),
            buf: vec![0u8; 2048],
            log: Vec::new(),
            outcomes: Vec::new(),
        }
    }

    /// The firmware's turnaround between packets, as seen on the bridge.
    fn tick(&mut self) {
        self.now += Duration::from_micros(100);
    }

    fn request(&mut self, from: SocketAddr, rrq: &[u8]) -> Answer {
        self.tick();
        let mut reply = [0u8; 600];
        match self.endpoint.handle_request(
            self.now,
            from,
            SERVER,
            MTU,
            rrq,
            &mut self.files,
            &mut reply,
        ) {
            RequestOutcome::Started(id) => Answer::Started(id, self.drain(id)),
            RequestOutcome::Reply(n) => Answer::Listener(reply[..n].to_vec()),
            RequestOutcome::Ignored => Answer::Ignored,
        }
    }

    /// A datagram from the firmware to the transfer's port; the replies.
    fn send(&mut self, id: SessionId, from: SocketAddr, datagram: &[u8]) -> Vec<Vec<u8>> {
        self.tick();
        let mut reply = [0u8; 600];
        let outcome = self
            .endpoint
            .handle_datagram(self.now, id, from, datagram, &mut reply);
        assert_eq!(outcome, DatagramOutcome::Delivered);
        self.drain(id)
    }

    fn drain(&mut self, id: SessionId) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(t) = self.endpoint.poll_transmit(self.now, id, &mut self.buf) {
            let mut datagram = self.buf[..t.header_len()].to_vec();
            if let Some(p) = t.payload() {
                let data = self
                    .endpoint
                    .session(id)
                    .expect("live session")
                    .handle
                    .clone();
                let start = p.offset as usize;
                datagram.extend_from_slice(&data[start..start + p.len]);
            }
            out.push(datagram);
        }
        if let Some(finished) = self.endpoint.poll_event(id) {
            self.outcomes.push(finished.outcome);
            self.log.push(finished.to_string());
        }
        out
    }

    fn live(&self) -> usize {
        self.endpoint.len()
    }
}

fn oack(datagram: &[u8]) -> Options {
    match Packet::parse(datagram) {
        Ok(Packet::Oack(options)) => options,
        other => panic!("expected OACK, got {other:?}"),
    }
}

fn data(datagram: &[u8]) -> (u16, &[u8]) {
    match Packet::parse(datagram) {
        Ok(Packet::Data { block, payload }) => (block, payload),
        other => panic!("expected DATA, got {other:?}"),
    }
}

fn error_code(datagram: &[u8]) -> ErrorCode {
    match Packet::parse(datagram) {
        Ok(Packet::Error { code, .. }) => code,
        other => panic!("expected ERROR, got {other:?}"),
    }
}

fn ack(block: u16) -> [u8; 4] {
    let b = block.to_be_bytes();
    [0, 4, b[0], b[1]]
}

/// A lock-step download as iPXE and pxelinux do it: ACK each DATA at once.
/// Returns the bytes received and the number of DATA packets.
fn lock_step(
    wire: &mut Wire,
    id: SessionId,
    from: SocketAddr,
    first: Vec<Vec<u8>>,
    blksize: usize,
) -> (Vec<u8>, usize) {
    let mut received = Vec::new();
    let mut packets = first;
    let mut expect = 1u16;
    let mut count = 0;
    for _ in 0..1_000_000 {
        assert_eq!(packets.len(), 1, "lock-step: one DATA per ACK");
        let (block, payload) = data(&packets[0]);
        assert_eq!(block, expect);
        received.extend_from_slice(payload);
        count += 1;
        let last = payload.len() < blksize;
        packets = wire.send(id, from, &ack(block));
        if last {
            assert!(packets.is_empty(), "nothing after the final ACK");
            return (received, count);
        }
        expect = expect.wrapping_add(1);
    }
    panic!("transfer did not end");
}

// ------------------------------------------------------------------ iPXE

/// Debian's ipxe-qemu ROM (1.0.0+git-20190125.36a4c85): `chain
/// ${mac:hexhyp}.ipxe || chain default.ipxe` for a machine without a
/// per-MAC script, then the kernel. Every RRQ asks blksize=1432 and tsize=0;
/// ERROR 1 from port 69 makes `chain` fail over to the default.
#[test]
fn ipxe_per_mac_miss_then_default_then_kernel() {
    let script = b"#!ipxe\nchain ${mac:hexhyp}.ipxe || chain default.ipxe\n";
    let default = content(134, 1);
    let kernel = content(8_247_232 / 64, 2); // the same shape, 1/64 of the size
    let mut wire = Wire::new(&[
        ("boot.ipxe", script),
        ("default.ipxe", &default),
        ("vmlinuz", &kernel),
    ]);

    // Captured: 0001 "boot.ipxe" 00 "octet" 00 "blksize" 00 "1432" 00 "tsize" 00 "0" 00
    let rrq = b"\x00\x01boot.ipxe\x00octet\x00blksize\x001432\x00tsize\x000\x00";
    let Answer::Started(id, first) = wire.request(client(48203), rrq) else {
        panic!("boot.ipxe not started");
    };
    assert_eq!(first.len(), 1);
    let granted = oack(&first[0]);
    assert_eq!(granted.blksize, Some(1432));
    assert_eq!(granted.tsize, Some(script.len() as u64));
    assert_eq!(granted.windowsize, None, "not asked, not granted");
    let reply = wire.send(id, client(48203), &ack(0));
    let (got, n) = lock_step(&mut wire, id, client(48203), reply, 1432);
    assert_eq!((got.as_slice(), n), (&script[..], 1));

    // The per-MAC script is missing: ERROR 1 straight from the listener,
    // no session left behind.
    let rrq = b"\x00\x0152-54-00-5e-ed-01.ipxe\x00octet\x00blksize\x001432\x00tsize\x000\x00";
    let Answer::Listener(reply) = wire.request(client(42121), rrq) else {
        panic!("a missing file must be refused at once");
    };
    assert_eq!(error_code(&reply), ErrorCode::FileNotFound);
    assert_eq!(wire.live(), 0);

    for (name, file, port) in [
        ("default.ipxe", &default, 60660u16),
        ("vmlinuz", &kernel, 26274),
    ] {
        let mut rrq = b"\x00\x01".to_vec();
        rrq.extend_from_slice(name.as_bytes());
        rrq.extend_from_slice(b"\x00octet\x00blksize\x001432\x00tsize\x000\x00");
        let Answer::Started(id, first) = wire.request(client(port), &rrq) else {
            panic!("{name} not started");
        };
        assert_eq!(oack(&first[0]).tsize, Some(file.len() as u64));
        let reply = wire.send(id, client(port), &ack(0));
        let (got, n) = lock_step(&mut wire, id, client(port), reply, 1432);
        assert!(got == **file, "{name}: content differs");
        assert_eq!(n, file.len() / 1432 + 1);
    }
    assert_eq!(wire.live(), 0);
    assert_eq!(wire.outcomes, vec![Outcome::Completed; 3]);
    assert!(
        wire.log
            .iter()
            .all(|l| l.contains("blksize=1432 windowsize=1"))
    );
}

// ------------------------------------------------------------------ pxelinux

/// pxelinux 6.04 (Debian's pxelinux + syslinux-common), loaded by iPXE:
/// its own TFTP client puts tsize before blksize, asks blksize=1408, uses
/// local ports counting up from 49152, and walks the config search path
/// (01-<mac>, the IP in hex shortened digit by digit, default), each miss
/// answered with ERROR 1.
#[test]
fn pxelinux_config_search_then_default() {
    let ldlinux = content(119_524, 3);
    let cfg = b"DEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL vmlinuz\n";
    let mut wire = Wire::new(&[("ldlinux.c32", &ldlinux), ("pxelinux.cfg/default", cfg)]);

    // Captured: 0001 "ldlinux.c32" 00 "octet" 00 "tsize" 00 "0" 00 "blksize" 00 "1408" 00
    let rrq = b"\x00\x01ldlinux.c32\x00octet\x00tsize\x000\x00blksize\x001408\x00";
    let Answer::Started(id, first) = wire.request(client(49152), rrq) else {
        panic!("ldlinux.c32 not started");
    };
    let granted = oack(&first[0]);
    assert_eq!(
        (granted.blksize, granted.tsize),
        (Some(1408), Some(119_524))
    );
    let reply = wire.send(id, client(49152), &ack(0));
    let (got, n) = lock_step(&mut wire, id, client(49152), reply, 1408);
    assert!(got == ldlinux);
    assert_eq!(n, 85);

    let mut port = 49153u16;
    let mut misses = vec!["pxelinux.cfg/01-52-54-00-5e-ed-01".to_string()];
    let hex = "C6120065"; // 198.18.0.101
    misses.extend(
        (1..=hex.len())
            .rev()
            .map(|k| format!("pxelinux.cfg/{}", &hex[..k])),
    );
    for name in &misses {
        let mut rrq = b"\x00\x01".to_vec();
        rrq.extend_from_slice(name.as_bytes());
        rrq.extend_from_slice(b"\x00octet\x00tsize\x000\x00blksize\x001408\x00");
        let Answer::Listener(reply) = wire.request(client(port), &rrq) else {
            panic!("{name}: a missing file must be refused at once");
        };
        assert_eq!(error_code(&reply), ErrorCode::FileNotFound, "{name}");
        port += 1;
    }
    assert_eq!(port, 49162, "nine misses, as captured");
    assert_eq!(wire.live(), 0);

    let rrq = b"\x00\x01pxelinux.cfg/default\x00octet\x00tsize\x000\x00blksize\x001408\x00";
    let Answer::Started(id, first) = wire.request(client(port), rrq) else {
        panic!("default not started");
    };
    assert_eq!(oack(&first[0]).tsize, Some(cfg.len() as u64));
    let reply = wire.send(id, client(port), &ack(0));
    let (got, _) = lock_step(&mut wire, id, client(port), reply, 1408);
    assert_eq!(got, cfg);
    assert_eq!(wire.outcomes, vec![Outcome::Completed; 2]);
}

// ------------------------------------------------------------------ OVMF

/// OVMF (Debian's ovmf 2022.11) PXE-loading snponly.efi: first a size probe
/// (tsize=0 blksize=1468 windowsize=4) that it aborts with ERROR 8 as soon
/// as the OACK arrives, then from the next local port the real fetch with
/// blksize=1468 windowsize=4, ACKing every fourth block and the last one.
#[test]
fn ovmf_tsize_probe_abort_then_windowed_fetch() {
    let efi = content(173_792, 4);
    let mut wire = Wire::new(&[("snponly.efi", &efi)]);

    // Captured from port 1567:
    // 0001 "snponly.efi" 00 "octet" 00 "tsize" 00 "0" 00 "blksize" 00 "1468" 00 "windowsize" 00 "4" 00
    let probe =
        b"\x00\x01snponly.efi\x00octet\x00tsize\x000\x00blksize\x001468\x00windowsize\x004\x00";
    let Answer::Started(id, first) = wire.request(client(1567), probe) else {
        panic!("probe not started");
    };
    assert_eq!(first.len(), 1);
    let granted = oack(&first[0]);
    assert_eq!(granted.tsize, Some(173_792));
    assert_eq!(granted.blksize, Some(1468));
    assert_eq!(granted.windowsize, Some(4));
    // Captured: 0005 0008 "User aborted the transfer" 00
    let abort = b"\x00\x05\x00\x08User aborted the transfer\x00";
    let after = wire.send(id, client(1567), abort);
    assert!(
        after.is_empty(),
        "no DATA (and no ERROR) after the client's ERROR 8"
    );
    assert_eq!(wire.outcomes, vec![Outcome::OptionsDeclined]);
    assert_eq!(wire.live(), 0);

    // Captured from port 1568:
    // 0001 "snponly.efi" 00 "octet" 00 "blksize" 00 "1468" 00 "windowsize" 00 "4" 00
    let fetch = b"\x00\x01snponly.efi\x00octet\x00blksize\x001468\x00windowsize\x004\x00";
    let Answer::Started(id, first) = wire.request(client(1568), fetch) else {
        panic!("fetch not started");
    };
    let granted = oack(&first[0]);
    assert_eq!(
        (granted.blksize, granted.windowsize, granted.tsize),
        (Some(1468), Some(4), None)
    );

    // OVMF ACKs 0, then 4, 8, ..., 116, then 119 (the short last block).
    let mut received = Vec::new();
    let mut acked = 0u16;
    let mut window = wire.send(id, client(1568), &ack(0));
    for _ in 0..100 {
        if window.is_empty() {
            break;
        }
        assert!(window.len() <= 4, "window of {} DATA", window.len());
        for (i, d) in window.iter().enumerate() {
            let (block, payload) = data(d);
            assert_eq!(block, acked + 1 + i as u16, "DATA out of order");
            received.extend_from_slice(payload);
        }
        let (last, payload) = data(window.last().expect("non-empty"));
        if window.len() < 4 {
            assert!(payload.len() < 1468, "a short window must end the file");
        }
        acked = last;
        window = wire.send(id, client(1568), &ack(acked));
    }
    assert_eq!(acked, 119);
    assert!(received == efi, "content differs");
    assert_eq!(
        wire.outcomes,
        vec![Outcome::OptionsDeclined, Outcome::Completed]
    );
    let line = wire.log.last().expect("a log line");
    assert!(
        line.contains("bytes=173792 blksize=1468 windowsize=4") && line.contains("retransmits=0"),
        "{line}"
    );
}

// ------------------------------------------------------------------ reboots

/// iPXE under OVMF (snponly.efi) picks its client ports from a nearly
/// fixed sequence (boot.ipxe from 5234 and vmlinuz from 44437 in 6 of 9
/// boots): a machine reset in the middle of the kernel comes back from the same address and
/// port with the same request while the old transfer is still retrying.
/// The new request must start a fresh transfer at once (an OACK), not be
/// taken for a retransmission of the old one, and both must end on their
/// own: the new one completed, the old one given up.
#[test]
fn ipxe_reboot_mid_transfer_from_the_same_port_starts_afresh() {
    let kernel = content(200 * 1432 + 7, 5);
    let mut wire = Wire::new(&[("vmlinuz", &kernel)]);
    let rrq = b"\x00\x01vmlinuz\x00octet\x00blksize\x001432\x00tsize\x000\x00";
    let port = client(44437);

    let Answer::Started(old, first) = wire.request(port, rrq) else {
        panic!("first boot: not started");
    };
    assert_eq!(oack(&first[0]).blksize, Some(1432));
    let mut packets = wire.send(old, port, &ack(0));
    for block in 1..=50u16 {
        assert_eq!(data(&packets[0]).0, block);
        packets = wire.send(old, port, &ack(block));
    }
    // Reset: DATA 51 is never acknowledged. The machine boots again and,
    // a few seconds later, asks for the kernel from the same port.
    wire.now += Duration::from_secs(5);
    let Answer::Started(new, first) = wire.request(port, rrq) else {
        panic!("second boot: the request was not served");
    };
    assert_ne!(new, old);
    assert_eq!(first.len(), 1);
    assert_eq!(oack(&first[0]).tsize, Some(kernel.len() as u64));
    let reply = wire.send(new, port, &ack(0));
    let (got, _) = lock_step(&mut wire, new, port, reply, 1432);
    assert!(got == kernel, "second boot: content differs");
    assert_eq!(wire.outcomes, vec![Outcome::Completed]);

    // The old transfer retries on its own timer and gives up with an
    // ERROR, all from its own port, which iPXE ignores: it takes the port
    // of the first reply to a request as the transfer's and drops the rest.
    let mut stray = Vec::new();
    for _ in 0..100 {
        let Some(deadline) = wire.endpoint.poll_timeout(old) else {
            break;
        };
        wire.now = wire.now.max(deadline);
        wire.endpoint.handle_timeout(wire.now, old);
        stray.extend(wire.drain(old));
    }
    let (last, resends) = stray.split_last().expect("the old transfer retried");
    assert!(!resends.is_empty());
    for d in resends {
        assert_eq!(data(d).0, 51, "the old transfer only resends DATA 51");
    }
    assert_eq!(error_code(last), ErrorCode::NotDefined);
    assert_eq!(wire.outcomes, vec![Outcome::Completed, Outcome::TimedOut]);
    assert_eq!(wire.live(), 0);
}
