//! Uploads (WRQ) to the built `ringtftpd` on loopback from real clients
//! (tftp-hpa `put`, atftp `--put`, curl `-T`, busybox `tftp -p`) and a raw
//! client for what no client does: stopping half way, racing another
//! upload, overrunning a limit. Every stored file is compared byte for
//! byte with what was sent.
//!
//! `RINGTFTPD_TEST_SERVER=hpa` runs the tests that tftpd-hpa's `-c`
//! defines against tftpd-hpa too; the rest are ringtftpd's own.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn uploads(extra: &[&str]) -> Server {
    Server::start_with(ServerOpts {
        uploads: true,
        extra_args: extra.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

fn ringtftpd_only() -> bool {
    if server_kind() == ServerKind::Hpa {
        eprintln!("SKIP: ringtftpd's own upload rules");
        return false;
    }
    true
}

/// A local file holding `bytes`, to upload.
fn local(s: &Server, tag: &str, bytes: &[u8]) -> PathBuf {
    let path = s.dest(tag);
    fs::write(&path, bytes).expect("write upload source");
    path
}

fn sized(len: usize, seed: u64) -> Vec<u8> {
    random_bytes(seed, len)
}

const SIZES: [usize; 6] = [0, 1, 511, 512, 513, 1 << 20];

#[track_caller]
fn assert_stored(what: &str, out: &Output, s: &Server, remote: &str, expected: &[u8]) {
    let said = format!(
        "{what}: exit {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "client failed: {said}");
    assert!(!said.contains("Error code"), "server error: {said}");
    let stored = fs::read(s.root().join(remote)).unwrap_or_else(|e| panic!("{said}\n{e}"));
    assert!(
        stored == expected,
        "{what}: stored {} bytes, sent {}",
        stored.len(),
        expected.len()
    );
}

fn atftp_put(s: &Server, from: &Path, remote: &str, opts: &[String]) -> Output {
    let mut args: Vec<String> = ["--put", "-l"].map(String::from).to_vec();
    args.push(from.to_string_lossy().into_owned());
    args.extend(["-r".to_string(), remote.to_string()]);
    for o in opts {
        args.push("--option".into());
        args.push(o.clone());
    }
    args.push(s.host());
    args.push(s.port().to_string());
    run_client("atftp", &args)
}

fn curl_put(s: &Server, from: &Path, remote: &str, blksize: Option<u32>) -> Output {
    let mut args: Vec<String> = ["-s", "-S", "-T"].map(String::from).to_vec();
    args.push(from.to_string_lossy().into_owned());
    if let Some(b) = blksize {
        args.push("--tftp-blksize".into());
        args.push(b.to_string());
    }
    args.push(format!("{}/{remote}", s.url_base()));
    run_client("curl", &args)
}

fn busybox_put(s: &Server, from: &Path, remote: &str, blksize: Option<u32>) -> Output {
    let mut args: Vec<String> = ["tftp", "-p", "-l"].map(String::from).to_vec();
    args.push(from.to_string_lossy().into_owned());
    args.extend(["-r".to_string(), remote.to_string()]);
    if let Some(b) = blksize {
        args.push("-b".into());
        args.push(b.to_string());
    }
    args.push(s.host());
    args.push(s.port().to_string());
    run_client("busybox", &args)
}

// ---------------------------------------------------------------- clients

#[test]
fn tftp_hpa_put_every_size() {
    if !have_tftp_hpa() {
        return;
    }
    let s = uploads(&[]);
    for (i, &len) in SIZES.iter().enumerate() {
        let bytes = sized(len, 100 + i as u64);
        let remote = format!("hpa-{len}.bin");
        let out = tftp_hpa_put(&s, &local(&s, &remote, &bytes), &remote, "octet");
        assert_stored(&remote, &out, &s, &remote, &bytes);
    }
    if server_kind() == ServerKind::Ringtftpd {
        // Logged once its session ends: after the dally that answers a
        // repeat of the final DATA (about the initial RTO).
        let line = "file=\"hpa-513.bin\" direction=write bytes=513";
        let logged = (0..50).any(|_| {
            std::thread::sleep(Duration::from_millis(100));
            s.log().contains(line)
        });
        assert!(logged, "no line with {line:?}:\n{}", s.log());
    }
}

#[test]
fn tftp_hpa_put_netascii_is_stored_as_local_text() {
    if !have_tftp_hpa() {
        return;
    }
    let s = uploads(&[]);
    // The client sends LF as CR LF and CR as CR NUL; the file gets the text.
    let text = text_fixture();
    let out = tftp_hpa_put(&s, &local(&s, "text", &text), "text-up.txt", "netascii");
    assert_stored("netascii put", &out, &s, "text-up.txt", &text);
}

#[test]
fn atftp_put_blksize_and_windowsize_sweep() {
    if !have_atftp() {
        return;
    }
    let s = uploads(&[]);
    let big = sized(1 << 20, 7);
    let small = sized(1500, 8);
    // 8192 is above what ringtftpd grants uploads: the OACK lowers it.
    for (blksize, windowsize) in [(512, 1), (1024, 4), (1428, 16), (1468, 64), (8192, 8)] {
        for (tag, bytes) in [("big", &big), ("small", &small)] {
            let remote = format!("atftp-{blksize}-{windowsize}-{tag}.bin");
            let opts = [
                format!("blksize {blksize}"),
                format!("windowsize {windowsize}"),
            ];
            let out = atftp_put(&s, &local(&s, &remote, bytes), &remote, &opts);
            assert_stored(&remote, &out, &s, &remote, bytes);
        }
    }
}

#[test]
fn curl_put_sizes_and_blksizes() {
    if !have_curl_tftp() {
        return;
    }
    let s = uploads(&[]);
    for (i, &len) in SIZES.iter().enumerate() {
        let bytes = sized(len, 200 + i as u64);
        let remote = format!("curl-{len}.bin");
        let out = curl_put(&s, &local(&s, &remote, &bytes), &remote, None);
        assert_stored(&remote, &out, &s, &remote, &bytes);
    }
    let bytes = sized(1 << 20, 210);
    let out = curl_put(&s, &local(&s, "c1400", &bytes), "curl-1400.bin", Some(1400));
    assert_stored("curl blksize 1400", &out, &s, "curl-1400.bin", &bytes);
}

#[test]
fn busybox_put_sizes_and_blksize() {
    if !have_busybox_tftp() {
        return;
    }
    let s = uploads(&[]);
    for (i, &len) in SIZES.iter().enumerate() {
        let bytes = sized(len, 300 + i as u64);
        let remote = format!("bb-{len}.bin");
        let out = busybox_put(&s, &local(&s, &remote, &bytes), &remote, None);
        assert_stored(&remote, &out, &s, &remote, &bytes);
    }
    let bytes = sized(1 << 20, 310);
    let out = busybox_put(&s, &local(&s, "bb1024", &bytes), "bb-1024.bin", Some(1024));
    assert_stored("busybox -b 1024", &out, &s, "bb-1024.bin", &bytes);
}

#[test]
fn an_upload_past_65535_blocks_rolls_the_block_number_over() {
    if !have_tftp_hpa() {
        return;
    }
    let s = uploads(&[]);
    // 65537 blocks of 512 without options: block 65535 is followed by 0.
    let bytes = sized(BIG_SIZE, 400);
    let out = tftp_hpa_put(&s, &local(&s, "big", &bytes), "big-up.bin", "octet");
    assert_stored("rollover put", &out, &s, "big-up.bin", &bytes);
}

#[test]
fn uploads_over_ipv6() {
    if !ipv6_loopback_available() {
        eprintln!("SKIP: no IPv6 loopback");
        return;
    }
    let s = Server::start_with(ServerOpts {
        ipv6: true,
        uploads: true,
        ..Default::default()
    });
    let bytes = sized(100_000, 500);
    if have_tftp_hpa() {
        let out = tftp_hpa_put(&s, &local(&s, "v6", &bytes), "v6-hpa.bin", "octet");
        assert_stored("tftp-hpa over IPv6", &out, &s, "v6-hpa.bin", &bytes);
    }
    if have_curl_tftp() {
        let out = curl_put(&s, &local(&s, "v6c", &bytes), "v6-curl.bin", Some(1400));
        assert_stored("curl over IPv6", &out, &s, "v6-curl.bin", &bytes);
    }
    if have_atftp() {
        let opts = ["blksize 1428".to_string(), "windowsize 8".to_string()];
        let out = atftp_put(&s, &local(&s, "v6a", &bytes), "v6-atftp.bin", &opts);
        assert_stored("atftp over IPv6", &out, &s, "v6-atftp.bin", &bytes);
    }
}

// ---------------------------------------------------------------- rules

fn put(s: &Server, name: &str, data: &[u8]) -> Result<(), (u16, String)> {
    raw_put(&RawClient::new(s.addr()), name, "octet", &[], data, None)
}

fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// tftpd-hpa's `-c`: new files are created; an existing file is replaced
/// only if world-writable, and keeps its mode.
#[test]
fn with_create_new_files_are_made_and_only_world_writable_ones_replaced() {
    let s = uploads(&[]);
    let root = s.root();
    put(&s, "new.cfg", b"fresh").expect("a new file");
    assert_eq!(fs::read(root.join("new.cfg")).unwrap(), b"fresh");
    // Without -U the mode is 0666 (tftpd-hpa's default umask 0).
    assert_eq!(mode_of(&root.join("new.cfg")), 0o666);

    // b511.bin is 0644: refused, untouched.
    let before = s.source("b511.bin");
    let (code, msg) = put(&s, "b511.bin", b"over").expect_err("not world-writable");
    // tftpd-hpa, writing as nobody, answers its open's EACCES as ERROR 0.
    let hpa = server_kind() == ServerKind::Hpa;
    assert!(code == 2 || (hpa && code == 0), "ERROR {code} {msg}");
    assert_eq!(s.source("b511.bin"), before);

    // World-writable: replaced whole, mode kept.
    chmod(&root.join("b512.bin"), 0o646);
    put(&s, "b512.bin", b"replaced").expect("world-writable");
    assert_eq!(s.source("b512.bin"), b"replaced");
    assert_eq!(mode_of(&root.join("b512.bin")), 0o646);
    assert_eq!(
        strays(&root, &[])
            .iter()
            .filter(|n| n.starts_with('.'))
            .count(),
        0
    );
}

#[test]
fn overwrite_replaces_any_existing_file_but_creates_none_without_create() {
    if !ringtftpd_only() {
        return;
    }
    let s = Server::start_with(ServerOpts {
        extra_args: vec!["--overwrite".into()],
        ..Default::default()
    });
    put(&s, "b511.bin", b"replaced").expect("--overwrite replaces 0644");
    assert_eq!(s.source("b511.bin"), b"replaced");
    assert_eq!(mode_of(&s.root().join("b511.bin")), 0o644);
    let (code, msg) = put(&s, "brand-new.bin", b"x").expect_err("no --create");
    assert_eq!(code, 1, "{msg}");
    assert!(!s.root().join("brand-new.bin").exists());
}

#[test]
fn read_only_refuses_every_write_even_with_create() {
    if !ringtftpd_only() {
        return;
    }
    for flag in ["--ro", "--read-only"] {
        let s = uploads(&[flag]);
        let (code, msg) = put(&s, "new.cfg", b"x").expect_err(flag);
        assert_eq!(code, 2, "{flag}: {msg}");
        assert!(msg.contains("uploads are disabled"), "{msg}");
        assert!(!s.root().join("new.cfg").exists());
    }
}

#[test]
fn umask_sets_the_mode_of_new_files() {
    if !ringtftpd_only() {
        return;
    }
    let s = uploads(&["-U", "027"]);
    put(&s, "masked.bin", b"x").expect("upload");
    assert_eq!(mode_of(&s.root().join("masked.bin")), 0o640);
}

#[test]
fn max_upload_refuses_by_tsize_and_ends_an_overrun_with_error_3() {
    if !ringtftpd_only() {
        return;
    }
    let s = uploads(&["--max-upload", "1000"]);
    let c = RawClient::new(s.addr());
    // Announced too big: ERROR 3 before any data moves.
    let (code, msg) = c.expect_error(&wrq("big.cfg", "octet", &[("tsize", "2000")]));
    assert_eq!(code, 3, "{msg}");
    // Not announced, sent anyway: ERROR 3 at the block that crosses.
    let err = put(&s, "big.cfg", &sized(1500, 1)).expect_err("over the limit");
    assert_eq!(err.0, 3, "{err:?}");
    // More than its own tsize: the same.
    let err = raw_put(
        &c,
        "liar.cfg",
        "octet",
        &[("tsize", "600")],
        &sized(900, 2),
        None,
    )
    .expect_err("more than announced");
    assert_eq!(err.0, 3, "{err:?}");
    assert!(!s.root().join("big.cfg").exists());
    assert!(!s.root().join("liar.cfg").exists());
    // At the limit: stored.
    put(&s, "fits.cfg", &sized(1000, 3)).expect("at the limit");
    assert_eq!(s.source("fits.cfg"), sized(1000, 3));
    if have_curl_tftp() {
        // curl announces its size (tsize) and hears ERROR 3 at once.
        let from = local(&s, "curl-big", &sized(5000, 4));
        let out = curl_put(&s, &from, "curl-big.cfg", None);
        assert!(!out.status.success(), "curl was let through");
        assert!(!s.root().join("curl-big.cfg").exists());
    }
}

#[test]
fn uploads_stay_in_the_root_and_make_no_directories() {
    let s = uploads(&[]);
    let (code, msg) = put(&s, "nodir/x.bin", b"x").expect_err("missing directory");
    assert!(code == 1 || code == 2, "ERROR {code} {msg}");
    assert!(!s.root().join("nodir").exists());
    // ringtftpd refuses `..` outright; tftpd-hpa's chroot (-s) keeps it
    // inside. Either way nothing lands outside the root.
    match put(&s, "../escape.bin", b"x") {
        Err((code, msg)) => assert_eq!(code, 2, "{msg}"),
        Ok(()) => assert_eq!(server_kind(), ServerKind::Hpa, "`..` was taken"),
    }
    assert!(!s.root().parent().unwrap().join("escape.bin").exists());
    // An existing directory takes uploads (tftpd-hpa writes as nobody).
    chmod(&s.root().join("sub"), 0o777);
    put(&s, "sub/up.bin", b"nested").expect("into an existing directory");
    assert_eq!(s.source("sub/up.bin"), b"nested");
}

// ---------------------------------------------------------------- nothing partial

#[test]
fn a_client_that_vanishes_leaves_nothing_under_the_name() {
    if !ringtftpd_only() {
        return;
    }
    let s = uploads(&["--overwrite"]);
    let before = s.source("mib.bin");
    let c = RawClient::new(s.addr());
    let err = raw_put(&c, "gone.bin", "octet", &[], &sized(100_000, 9), Some(50));
    assert!(err.is_err());
    let err = raw_put(&c, "mib.bin", "octet", &[], &sized(100_000, 9), Some(50));
    assert!(err.is_err());
    // Half an upload is nowhere: not under its name, not under another.
    assert!(!s.root().join("gone.bin").exists());
    assert_eq!(s.source("mib.bin"), before, "the old file is intact");
    assert_eq!(
        strays(&s.root(), &[])
            .iter()
            .filter(|n| n.starts_with('.'))
            .count(),
        0
    );
}

#[test]
fn a_killed_server_leaves_the_old_file_and_no_partial_one() {
    if !ringtftpd_only() {
        return;
    }
    let mut s = uploads(&["--overwrite"]);
    let before = s.source("mib.bin");
    let names_before = strays(&s.root(), &[]);
    let c = RawClient::new(s.addr());
    let _ = raw_put(&c, "mib.bin", "octet", &[], &sized(200_000, 10), Some(100));
    let _ = raw_put(&c, "half.bin", "octet", &[], &sized(200_000, 11), Some(100));
    s.kill();
    assert_eq!(s.source("mib.bin"), before, "the old file is intact");
    assert!(!s.root().join("half.bin").exists());
    assert_eq!(strays(&s.root(), &[]), names_before, "nothing left behind");
}

#[test]
fn two_uploads_of_one_name_the_last_to_finish_wins_whole() {
    if !ringtftpd_only() {
        return;
    }
    let s = uploads(&[]);
    let (a, b) = (sized(5000, 12), sized(3000, 13));
    let first = RawClient::new(s.addr());
    first.send_to_server(&wrq("race.bin", "octet", &[]));
    let (answer, tid) = first.recv(Duration::from_secs(5)).expect("ACK 0");
    assert!(matches!(answer, Packet::Ack(0)), "{answer:?}");
    let data = |block: u16, chunk: &[u8]| {
        let mut p = vec![0, OP_DATA as u8];
        p.extend_from_slice(&block.to_be_bytes());
        p.extend_from_slice(chunk);
        p
    };
    // The first sends half, then the second uploads whole.
    for (i, chunk) in a.chunks(512).take(5).enumerate() {
        first.send(&data(i as u16 + 1, chunk), tid);
        let ack = first.recv(Duration::from_secs(5)).expect("ACK");
        assert!(
            matches!(ack.0, Packet::Ack(n) if n == i as u16 + 1),
            "{ack:?}"
        );
    }
    put(&s, "race.bin", &b).expect("the second upload");
    assert_eq!(s.source("race.bin"), b);
    // The first finishes last: its file replaces the second's, whole.
    for (i, chunk) in a.chunks(512).enumerate().skip(5) {
        first.send(&data(i as u16 + 1, chunk), tid);
        let ack = first.recv(Duration::from_secs(5)).expect("ACK");
        assert!(
            matches!(ack.0, Packet::Ack(n) if n == i as u16 + 1),
            "{ack:?}"
        );
    }
    assert_eq!(s.source("race.bin"), a);
}

/// A tmpfs mounted on a directory of the root, unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: PathBuf, size: &str) -> Option<SmallDisk> {
        fs::create_dir(&dir).expect("mkdir");
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0777"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .is_ok_and(|st| st.success());
        ok.then_some(SmallDisk(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_ends_the_upload_with_error_3_and_leaves_nothing() {
    if !ringtftpd_only() {
        return;
    }
    let s = uploads(&[]);
    let Some(disk) = SmallDisk::mount(s.root().join("small"), "256k") else {
        eprintln!("SKIP: cannot mount a tmpfs (needs root)");
        return;
    };
    let err = put(&s, "small/too-big.bin", &sized(1 << 20, 14)).expect_err("disk full");
    assert_eq!(err.0, 3, "{err:?}");
    assert_eq!(strays(&disk.0, &[]), Vec::<String>::new(), "nothing left");
    // The space comes back once the writer dropped the failed upload
    // (its queue may still hold that upload's skipped writes): a small
    // upload fits again within a second.
    let fits = (0..20).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        put(&s, "small/fits.bin", &sized(10_000, 15)).is_ok()
    });
    assert!(fits, "the space of the failed upload was not freed");
    assert_eq!(s.source("small/fits.bin"), sized(10_000, 15));
}
