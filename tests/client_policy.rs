//! The policy file through the `Endpoint`, sans-IO: a `ClientPolicy` built
//! from TOML text decides each request (caps in the OACK, refusals with
//! their ERROR, uploads per client, a per-client session cap, per-MAC and
//! per-IP prefixes) exactly as the server's shards would.

mod sim;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ringtftpd::clients::{ClientPolicy, ClientRules};
use ringtftpd::endpoint::{EndpointConfig, RequestOutcome, SessionId};
use ringtftpd::files::{OpenError, Sink, Source};
use ringtftpd::policy::{Policy, RemapPolicy};
use ringtftpd::proto::Rollover;
use ringtftpd::proto::{ErrorCode, Mode, Options, Packet};
use ringtftpd::refusal::RefusalKind;
use ringtftpd::remap::RemapRules;
use ringtftpd::session::Transmit;
use sim::*;

fn peer(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().unwrap(), port)
}

fn rrq(name: &str, options: &[(&str, &str)]) -> Vec<u8> {
    request(1, name, "octet", options)
}

fn wrq(name: &str) -> Vec<u8> {
    request(2, name, "octet", &[])
}

/// Files in memory for reads; uploads are recorded by name and accepted.
#[derive(Default)]
struct Files {
    mem: MemFiles,
    writes: Vec<Vec<u8>>,
}

impl Source for Files {
    type Handle = Arc<Vec<u8>>;

    fn open_read(&mut self, name: &[u8], mode: Mode) -> Result<(Self::Handle, u64), OpenError> {
        self.mem.open_read(name, mode)
    }
}

impl Sink for Files {
    fn open_write(
        &mut self,
        name: &[u8],
        _mode: Mode,
        _tsize: Option<u64>,
    ) -> Result<Self::Handle, OpenError> {
        self.writes.push(name.to_vec());
        Ok(Arc::new(Vec::new()))
    }
}

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];

/// A desk whose settings have uploads on, decided by the rules in `toml`.
fn desk(toml: &str) -> Desk<Files> {
    desk_with(toml, None)
}

/// The same, with tftpd-hpa remap rules in front when `remap` is given.
fn desk_with(toml: &str, remap: Option<&str>) -> Desk<Files> {
    let rules = ClientRules::parse(toml).unwrap_or_else(|e| panic!("{e}"));
    let lookup_mac = rules.needs_mac();
    let mut policy: Arc<dyn Policy> = Arc::new(ClientPolicy::new(Arc::new(rules), 1));
    if let Some(remap) = remap {
        policy = Arc::new(RemapPolicy {
            rules: RemapRules::parse(remap).expect("remap rules"),
            max_steps: 64,
            probe: None,
            inner: policy,
        });
    }
    let mut files = Files::default();
    for (name, len) in [
        ("boot.img", 100_000),
        ("52-54-00-ab-cd-ef/boot.img", 3000),
        ("10.0.0.7/boot.img", 2000),
    ] {
        files.mem.insert(name, content(len, len as u64));
    }
    let config = EndpointConfig {
        settings: Settings {
            uploads: true,
            lookup_mac,
            policy,
            ..settings()
        },
        ..config()
    };
    Desk::new(config, files)
}

/// The options of `id`'s first transmit, if it is an OACK.
fn oack(f: &mut Desk<Files>, id: SessionId) -> Option<Options> {
    let t = f.endpoint.poll_transmit(f.now, id, &mut f.buf).unwrap();
    match (t, Packet::parse(&f.buf[..t.header_len()])) {
        (Transmit::Oack { .. }, Ok(Packet::Oack(options))) => Some(options),
        _ => None,
    }
}

/// Length of the file `id` serves.
fn served_len(f: &Desk<Files>, id: SessionId) -> usize {
    f.endpoint.session(id).unwrap().handle.len()
}

fn with_mac(f: &mut Desk<Files>, from: SocketAddr, mac: [u8; 6], datagram: &[u8]) -> SessionId {
    match f.endpoint.handle_request_with_mac(
        f.now,
        from,
        Some(mac),
        LOCAL,
        f.mtu,
        datagram,
        &mut f.files,
        &mut f.buf,
    ) {
        RequestOutcome::Started(id) => id,
        other => panic!("{from}: expected a start, got {other:?}"),
    }
}

#[test]
fn a_client_in_the_cidr_gets_blksize_capped_in_the_oack_and_another_does_not() {
    let mut f = desk("[[rule]]\ncidr = \"10.0.1.0/24\"\nmax_blksize = 1024\n");
    let ask = rrq("boot.img", &[("blksize", "1468")]);
    let capped = f.started(peer("10.0.1.20", 1000), &ask);
    assert_eq!(oack(&mut f, capped).unwrap().blksize, Some(1024));
    let other = f.started(peer("10.0.2.20", 1000), &ask);
    assert_eq!(oack(&mut f, other).unwrap().blksize, Some(1468));
    // IPv4-mapped IPv6 (a dual-stack listener's view) is the same client.
    let mapped = f.started(peer("::ffff:10.0.1.21", 1000), &ask);
    assert_eq!(oack(&mut f, mapped).unwrap().blksize, Some(1024));
}

#[test]
fn a_denied_client_gets_the_rules_error_before_any_open() {
    let mut f = desk(
        "[[rule]]\ncidr = \"192.0.2.0/24\"\ndeny = \"not on this network\"\n\
         [[rule]]\nname = \"secret/**\"\ndeny = true\n",
    );
    assert_eq!(
        f.refused(peer("192.0.2.9", 1000), &rrq("boot.img", &[])),
        (
            ErrorCode::AccessViolation,
            "not on this network".to_string()
        )
    );
    assert_eq!(
        f.refused(peer("10.0.0.9", 1000), &rrq("/secret/keys/a", &[])),
        (
            ErrorCode::AccessViolation,
            "access denied by policy".to_string()
        )
    );
    assert!(f.files.mem.opens.is_empty(), "{:?}", f.files.mem.opens);
    assert_eq!(f.endpoint.refusals().get(RefusalKind::Denied), 2);
    f.started(peer("10.0.0.9", 1001), &rrq("boot.img", &[]));
}

#[test]
fn uploads_are_allowed_per_client() {
    let mut f = desk(
        "[[rule]]\nuploads = false\n\
         [[rule]]\ncidr = [\"10.0.5.0/24\", \"fd00:5::/64\"]\nuploads = true\n",
    );
    assert_eq!(
        f.refused(peer("10.0.6.1", 1000), &wrq("up.bin")),
        (
            ErrorCode::AccessViolation,
            "uploads are disabled".to_string()
        )
    );
    assert_eq!(f.endpoint.refusals().get(RefusalKind::UploadsDisabled), 1);
    f.started(peer("10.0.5.1", 1000), &wrq("up.bin"));
    f.started(peer("fd00:5::1", 1000), &wrq("up6.bin"));
    assert_eq!(f.files.writes, [b"up.bin".to_vec(), b"up6.bin".to_vec()]);
    // Reads are untouched by `uploads`.
    f.started(peer("10.0.6.1", 1001), &rrq("boot.img", &[]));
}

#[test]
fn a_per_client_cap_is_checked_before_the_session_starts() {
    let mut f = desk("[[rule]]\ncidr = \"10.0.7.0/24\"\nmax_sessions = 2\n");
    let ask = rrq("boot.img", &[]);
    f.started(peer("10.0.7.1", 1000), &ask);
    f.started(peer("10.0.7.1", 1001), &ask);
    assert_eq!(
        f.refused(peer("10.0.7.1", 1002), &ask).0,
        ErrorCode::NotDefined
    );
    assert_eq!(f.endpoint.refusals().get(RefusalKind::PerClientCap), 1);
    assert_eq!(f.endpoint.len(), 2, "no session was started for it");
    // Another address in the block has its own count; one outside has
    // only the command line's cap.
    f.started(peer("10.0.7.2", 1000), &ask);
    for port in 0..5 {
        f.started(peer("10.0.8.1", 2000 + port), &ask);
    }
}

#[test]
fn a_mac_prefix_serves_the_clients_own_file_and_an_ip_prefix_too() {
    let mut f = desk(
        "[[rule]]\nmac = \"52:54:00:*\"\nprefix = \"{mac}/\"\nmax_blksize = 1024\n\
         [[rule]]\ncidr = \"10.0.0.7\"\nprefix = \"{ip}/\"\n",
    );
    assert!(f.endpoint.settings().lookup_mac);
    // A leading `/` names the root: the prefix goes before the rest.
    let slash = rrq("/boot.img", &[("blksize", "1468")]);
    let id = with_mac(&mut f, peer("10.0.0.5", 1000), MAC, &slash);
    assert_eq!(served_len(&f, id), 3000);
    assert_eq!(oack(&mut f, id).unwrap().blksize, Some(1024));
    // No MAC known (a routed client): the shared file, no MAC rule.
    let ask = rrq("boot.img", &[("blksize", "1468")]);
    let shared = f.started(peer("10.0.0.6", 1000), &ask);
    assert_eq!(served_len(&f, shared), 100_000);
    assert_eq!(oack(&mut f, shared).unwrap().blksize, Some(1468));
    let by_ip = f.started(peer("10.0.0.7", 1000), &ask);
    assert_eq!(served_len(&f, by_ip), 2000);
    // The open cache is keyed on the prefixed path, so clients never get
    // each other's files.
    assert_eq!(
        f.files.mem.opens,
        [
            b"52-54-00-ab-cd-ef/boot.img".to_vec(),
            b"boot.img".to_vec(),
            b"10.0.0.7/boot.img".to_vec()
        ]
    );
}

#[test]
fn names_are_matched_after_remap_rewrote_them() {
    // The remap turns `EFI\BOOT.IMG` into `efi/boot.img`; the rule on
    // `efi/**` then caps it, and its prefix goes before the rewritten name.
    let mut f = desk_with(
        "[[rule]]\nname = \"efi/**\"\nmax_blksize = 1024\nprefix = \"{ip}/\"\n",
        Some("rg \\\\ /\nr ^EFI/BOOT.IMG$ efi/boot.img\n"),
    );
    f.files
        .mem
        .insert("10.0.0.3/efi/boot.img", content(5000, 5));
    let ask = rrq("EFI\\BOOT.IMG", &[("blksize", "1468")]);
    let id = f.started(peer("10.0.0.3", 1000), &ask);
    assert_eq!(served_len(&f, id), 5000);
    assert_eq!(oack(&mut f, id).unwrap().blksize, Some(1024));
    assert_eq!(f.files.mem.opens, [b"10.0.0.3/efi/boot.img".to_vec()]);
    // A name the remap leaves alone is matched as asked: no rule here.
    let plain = f.started(
        peer("10.0.0.3", 1001),
        &rrq("boot.img", &[("blksize", "1468")]),
    );
    assert_eq!(oack(&mut f, plain).unwrap().blksize, Some(1468));
}

/// Every transmit of `id` now: (wire block, payload bytes) for DATA, and
/// the ACK numbers sent.
fn drain(f: &mut Desk<Files>, id: SessionId, content: &[u8]) -> (Vec<(u16, Vec<u8>)>, Vec<u16>) {
    let (mut data, mut acks) = (Vec::new(), Vec::new());
    while let Some(t) = f.endpoint.poll_transmit(f.now, id, &mut f.buf) {
        match (t, Packet::parse(&f.buf[..t.header_len()])) {
            (Transmit::Data { payload, .. }, _) => {
                let block = u16::from_be_bytes([f.buf[2], f.buf[3]]);
                let start = payload.offset as usize;
                data.push((block, content[start..start + payload.len].to_vec()));
            }
            (Transmit::Ack { block }, _) => acks.push(block),
            (Transmit::Oack { .. }, Ok(Packet::Oack(_))) => {}
            other => panic!("{other:?}"),
        }
    }
    (data, acks)
}

fn ack(block: u16) -> Vec<u8> {
    let mut a = vec![0, 4];
    a.extend_from_slice(&block.to_be_bytes());
    a
}

/// Reads `big.bin` (past block 65535) as a windowed client that numbers
/// blocks with `rollover`: the bytes received and the DATA numbers seen.
fn read_past_the_wrap(
    rule: &str,
    from: SocketAddr,
    rollover: Rollover,
    window: u16,
    option: Option<&str>,
) -> (Vec<u8>, Vec<u16>) {
    let mut f = desk(rule);
    let file = content(65537 * 8 + 3, 7);
    f.files.mem.insert("big.bin", file.clone());
    let window = window.to_string();
    let mut options = vec![("blksize", "8"), ("windowsize", window.as_str())];
    options.extend(option.map(|o| ("rollover", o)));
    let ask = rrq("big.bin", &options);
    let id = f.started(from, &ask);
    let (mut got, mut seen) = (Vec::new(), Vec::new());
    let mut next = 1u64;
    f.endpoint
        .handle_datagram(f.now, id, from, &ack(0), &mut vec![0; 600]);
    // One window per turn; 4200 turns cover 65,538 blocks at 16 a window.
    for _ in 0..70_000 {
        let (data, _) = drain(&mut f, id, &file);
        if data.is_empty() {
            break;
        }
        for (block, payload) in &data {
            seen.push(*block);
            if *block == rollover.wire(next) {
                got.extend_from_slice(payload);
                next += 1;
            }
        }
        f.now += std::time::Duration::from_millis(1);
        let acked = rollover.wire(next - 1);
        f.endpoint
            .handle_datagram(f.now, id, from, &ack(acked), &mut vec![0; 600]);
    }
    (got, seen)
}

#[test]
fn a_rules_rollover_numbers_blocks_past_65535_from_1_or_0() {
    let rule = "[[rule]]\ncidr = \"10.0.9.0/24\"\nrollover = 1\n";
    let file = content(65537 * 8 + 3, 7);
    for window in [1, 16] {
        let (got, seen) =
            read_past_the_wrap(rule, peer("10.0.9.1", 1000), Rollover::One, window, None);
        assert_eq!(got, file, "windowsize {window}");
        let at = seen.iter().position(|&b| b == 65535).unwrap();
        assert_eq!(&seen[at..at + 3], [65535, 1, 2], "windowsize {window}");
        assert!(!seen.contains(&0), "no DATA 0 with rollover 1");
        // Another client keeps the default: 65535, then 0.
        let (got, seen) =
            read_past_the_wrap(rule, peer("10.0.8.1", 1000), Rollover::Zero, window, None);
        assert_eq!(got, file);
        let at = seen.iter().position(|&b| b == 65535).unwrap();
        assert_eq!(&seen[at..at + 3], [65535, 0, 1]);
    }
}

#[test]
fn a_clients_rollover_option_wins_over_the_rules_default() {
    let file = content(65537 * 8 + 3, 7);
    for (rule, asked, rollover, after) in [
        ("[[rule]]\nrollover = 1\n", "0", Rollover::Zero, 0),
        ("[[rule]]\nrollover = 0\n", "1", Rollover::One, 1),
    ] {
        let (got, seen) =
            read_past_the_wrap(rule, peer("10.0.9.1", 1000), rollover, 4, Some(asked));
        assert_eq!(got, file, "rule {rule:?}, asked {asked}");
        let at = seen.iter().position(|&b| b == 65535).unwrap();
        assert_eq!(seen[at + 1], after, "rule {rule:?}, asked {asked}");
    }
}

#[test]
fn an_upload_past_65535_blocks_is_acknowledged_with_the_rules_rollover() {
    let mut f = desk("[[rule]]\nrollover = 1\n");
    let from = peer("10.0.9.2", 1000);
    let id = f.started(from, &request(2, "up.bin", "octet", &[("blksize", "8")]));
    let (_, acks) = drain(&mut f, id, &[]);
    let mut last_acks = acks;
    let mut stored = 0u64;
    let total = 65537u64;
    for b in 1..=total {
        let wire = Rollover::One.wire(b);
        let mut d = vec![0, 3];
        d.extend_from_slice(&wire.to_be_bytes());
        d.extend_from_slice(if b == total {
            &[1, 2, 3][..]
        } else {
            &[9; 8][..]
        });
        match f
            .endpoint
            .handle_datagram(f.now, id, from, &d, &mut vec![0; 600])
        {
            ringtftpd::endpoint::DatagramOutcome::Received(r) => {
                assert_eq!(r.offset, stored, "block {b} ({wire})");
                stored += r.bytes.len() as u64;
            }
            other => panic!("block {b} ({wire}): {other:?}"),
        }
        if b == total {
            f.endpoint.commit_done(f.now, id);
        }
        last_acks = drain(&mut f, id, &[]).1;
        assert_eq!(last_acks, [wire], "block {b}");
    }
    assert_eq!(stored, (total - 1) * 8 + 3);
    assert_eq!(last_acks, [Rollover::One.wire(total)]);
    assert_eq!(Rollover::One.wire(total), 2);
}
