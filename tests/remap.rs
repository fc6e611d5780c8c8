//! `-m/--map-file` end to end: the rules real setups use, served by the
//! built binary and, side by side, by tftpd-hpa 5.2 and 7.x given the same
//! rule file, tree and requests; what each client gets (the file's bytes,
//! or an ERROR's code) must agree, and with 7.x the text of an access
//! violation too (5.2 sent an `a` rule's rewrite as the text; 7.x says
//! "access denied" for every refusal and failure of the rules).

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;

/// Files every server's root gets, beside the harness's own.
const TREE: &[(&str, &[u8])] = &[
    ("boot/pxelinux.0", b"pxelinux for everyone\n"),
    ("boot/ldlinux.c32", b"ldlinux\n"),
    ("127.0.0.1/host.cfg", b"config of 127.0.0.1 by \\i\n"),
    ("hex/7F000001.cfg", b"config of 7F000001 by \\x\n"),
    ("efi/grubx64.efi", b"grub\n"),
    ("efi/shim.efi.override", b"the override E finds\n"),
    ("kernels/vmlinuz", b"a kernel\n"),
];

/// Windows backslashes and drive letters, case folding, per-client files
/// by `\i` and `\x`, Ironic's `/tftpboot/` stripping, and refusals. All of
/// it tftpd-hpa 5.2 understands too (no `E`, labels or jumps).
const COMMON_RULES: &str = r"# as a site would write them
ri	^[a-z]:			# drop a drive letter
rg	\\		/	# backslashes to slashes
r	^/tftpboot/	/	# Ironic's prefix, stripped
ri	^/?BOOT/(.*)	boot/\L\1
r	^host\.cfg$	\i/host.cfg
r	^hex\.cfg$	hex/\x.cfg
a	\.secret$	no\ secrets\ for\ \i
a	^private/
";

/// 7.x only: `E`, labels and a jump.
const SEVEN_RULES: &str = r"rE	^(efi/.*)$	\1.override
j	^arch/	arch
e	^
:arch
r	^arch/x86/	kernels/
a	^arch/		unknown\ architecture
:loop
rg	loop$		loop
";

/// What one request got.
#[derive(Debug, PartialEq, Eq)]
enum Got {
    Data(Vec<u8>),
    Error(u16, String),
}

/// Whether `peer` answered as `ours` did, as far as `kind` defines it.
fn agrees(kind: ServerKind, ours: &Got, peer: &Got) -> bool {
    match (ours, peer) {
        (Got::Error(code, text), Got::Error(peer_code, peer_text)) => {
            // Texts are each server's own, but for 7.x's access violations.
            code == peer_code && (kind != ServerKind::Hpa7 || *code != 2 || text == peer_text)
        }
        _ => ours == peer,
    }
}

fn start(kind: ServerKind, rules: &Path) -> Server {
    let s = Server::start_with(ServerOpts {
        shared_args: vec!["-m".into(), rules.display().to_string()],
        kind: Some(kind),
        ..ServerOpts::default()
    });
    for (name, body) in TREE {
        let path = s.root().join(name);
        let dir = path.parent().expect("a parent");
        fs::create_dir_all(dir).expect("mkdir");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod dir");
        fs::write(&path, body).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    s
}

/// An RRQ for `name`: the file, or the ERROR.
fn fetch(s: &Server, name: &str) -> Got {
    let client = RawClient::new(s.addr());
    client.send_to_server(&rrq(name, "octet", &[]));
    let (first, tid) = client
        .recv(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{:?}: no answer for {name:?}", s.kind));
    let mut data = Vec::new();
    let mut packet = first;
    // Lock-step at blksize 512; every file here is one or two blocks.
    for _ in 0..16 {
        match packet {
            Packet::Data { block, data: chunk } => {
                let last = chunk.len() < 512;
                data.extend_from_slice(&chunk);
                client.send(&ack(block), tid);
                if last {
                    return Got::Data(data);
                }
            }
            Packet::Error { code, msg } => return Got::Error(code, msg),
            other => panic!("{:?}: {name:?} got {other:?}", s.kind),
        }
        packet = client
            .recv(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{:?}: {name:?} stalled", s.kind))
            .0;
    }
    panic!("{:?}: {name:?} is longer than expected", s.kind)
}

fn rules_file(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("rules");
    fs::write(&path, text).expect("write rules");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
    path
}

/// Requests `names` from ringtftpd and each peer; all must agree, and
/// ringtftpd must give what `expected` says where it says anything.
fn differential(rules: &str, peers: &[ServerKind], names: &[&str], expected: &[(&str, Got)]) {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    let rules = rules_file(dir.path(), rules);
    let ours = start(ServerKind::Ringtftpd, &rules);
    let mine: Vec<Got> = names.iter().map(|n| fetch(&ours, n)).collect();
    for (name, want) in expected {
        let at = names
            .iter()
            .position(|n| n == name)
            .expect("expected names are asked");
        assert_eq!(&mine[at], want, "ringtftpd for {name:?}");
    }
    for &kind in peers {
        let peer = start(kind, &rules);
        for (name, got) in names.iter().zip(&mine) {
            let theirs = fetch(&peer, name);
            assert!(
                agrees(kind, got, &theirs),
                "{name:?}: ringtftpd got {got:?}, {kind:?} {theirs:?}"
            );
        }
    }
}

fn data(bytes: &[u8]) -> Got {
    Got::Data(bytes.to_vec())
}

fn denied() -> Got {
    Got::Error(2, "access denied".into())
}

#[test]
fn site_rules_map_as_tftpd_hpa_5_and_7_map_them() {
    let mut peers = Vec::new();
    if have_hpa() {
        peers.push(ServerKind::Hpa);
    }
    if hpa7_command().is_some() {
        peers.push(ServerKind::Hpa7);
    }
    let names = [
        r"C:\boot\PXELINUX.0",
        r"boot\ldlinux.c32",
        "/tftpboot/boot/pxelinux.0",
        "BOOT/LDLINUX.C32",
        "host.cfg",
        "hex.cfg",
        "keys.secret",
        "private/key",
        "missing.bin",
        "b513.bin",
    ];
    let expected = [
        (r"C:\boot\PXELINUX.0", data(b"pxelinux for everyone\n")),
        (
            "/tftpboot/boot/pxelinux.0",
            data(b"pxelinux for everyone\n"),
        ),
        ("host.cfg", data(b"config of 127.0.0.1 by \\i\n")),
        ("hex.cfg", data(b"config of 7F000001 by \\x\n")),
        ("keys.secret", denied()),
        ("private/key", denied()),
        ("missing.bin", Got::Error(1, "file not found".into())),
    ];
    differential(COMMON_RULES, &peers, &names, &expected);
}

#[test]
fn files_jumps_and_failures_map_as_tftpd_hpa_7_maps_them() {
    let peers: Vec<ServerKind> = hpa7_command()
        .map(|_| ServerKind::Hpa7)
        .into_iter()
        .collect();
    let names = [
        "efi/shim.efi",
        "efi/grubx64.efi",
        "arch/x86/vmlinuz",
        "arch/arm/vmlinuz",
        "kernels/vmlinuz",
        "arch/x86/loop",
    ];
    let expected = [
        ("efi/shim.efi", data(b"the override E finds\n")),
        ("efi/grubx64.efi", data(b"grub\n")),
        ("arch/x86/vmlinuz", data(b"a kernel\n")),
        ("arch/arm/vmlinuz", denied()),
        ("kernels/vmlinuz", data(b"a kernel\n")),
        // Runs into --map-steps: a failure, told as a refusal.
        ("arch/x86/loop", denied()),
    ];
    differential(SEVEN_RULES, &peers, &names, &expected);
}
