//! End-to-end: real (qemu) machines PXE-boot from the built `ringtftpd`
//! inside a network namespace, via `scripts/boot-test.sh`, which builds the
//! namespace, bridge, taps, dnsmasq (DHCP only) and the VMs, and prints one
//! `BOOT vm=..` line per machine and a closing `RESULT pass|fail` line.
//!
//! The default run boots one iPXE machine and one OVMF machine (about 15 s
//! and 20 s under TCG, one after the other). The fleet, pxelinux and
//! installer-sized runs are `#[ignore]`d (up to minutes each): `cargo test
//! --test boot -- --ignored`, or the script directly (docs/clients.md).
//! The script exits 77 after printing `SKIP: <reason>` only where qemu cannot
//! run at all (not root, no qemu and no way to install it, no /dev/net/tun);
//! anything else that goes wrong fails the test.

use std::process::Command;
use std::sync::Mutex;

const SKIPPED: i32 = 77;

/// One boot at a time: the guests are CPU-bound under TCG and the machine
/// has two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs the boot script against the test build of `ringtftpd`; returns its
/// stdout, or `None` if it skipped.
fn boot(args: &[&str]) -> Option<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/boot-test.sh");
    // A test that failed while holding the lock poisons it; the next boot
    // is still independent.
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let output = Command::new("bash")
        .arg(script)
        .args(["--binary", env!("CARGO_BIN_EXE_ringtftpd")])
        .args(args)
        .output()
        .expect("run scripts/boot-test.sh");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Shown by `cargo test -- --nocapture`, and on failure.
    println!("{stdout}");
    eprintln!("{stderr}");
    if output.status.code() == Some(SKIPPED) {
        let reason = stdout.lines().find(|l| l.starts_with("SKIP:"));
        assert!(reason.is_some(), "exit 77 without a SKIP line");
        eprintln!("boot test skipped: {}", reason.unwrap_or_default());
        return None;
    }
    assert!(
        output.status.success(),
        "boot-test.sh {args:?} failed ({}); see the output above",
        output.status
    );
    Some(stdout)
}

/// Checks the per-VM lines: every machine reached its marker with its own
/// MAC and the config it should have got (per-MAC file or the default).
fn assert_booted(stdout: &str, vms: usize) {
    let result = stdout
        .lines()
        .find(|l| l.starts_with("RESULT "))
        .expect("no RESULT line");
    assert!(result.starts_with("RESULT pass "), "{result}");
    assert!(
        result.contains(&format!(" booted={vms}/{vms} ")),
        "{result}"
    );
    let boots: Vec<&str> = stdout.lines().filter(|l| l.starts_with("BOOT ")).collect();
    assert_eq!(boots.len(), vms, "one BOOT line per VM");
    for (i, line) in boots.iter().enumerate() {
        let vm = i + 1;
        let mac = format!("52:54:00:5e:ed:{vm:02x}");
        let cfg = if vm % 2 == 0 { "permac" } else { "default" };
        assert!(line.contains(" status=ok "), "{line}");
        assert!(line.contains(&format!(" nic={mac} ")), "{line}");
        assert!(line.contains(&format!(" cfg={cfg} ")), "{line}");
    }
    // Every VM's TFTP phase was seen on the wire.
    let tftp = stdout.lines().filter(|l| l.starts_with("TFTP ")).count();
    assert_eq!(tftp, vms);
    assert!(!stdout.contains("tftp_s=none"), "a VM with no TFTP traffic");
}

#[test]
fn one_vm_ipxe_boots_with_per_mac_fallback() {
    let Some(stdout) = boot(&["--vms", "1"]) else {
        return;
    };
    assert_booted(&stdout, 1);
    // The lone VM has no per-MAC script: iPXE asked for it, got ERROR 1,
    // and chained default.ipxe.
    assert!(
        stdout.contains(r#"file="52-54-00-5e-ed-01.ipxe""#) && stdout.contains("ERROR 1 "),
        "no per-MAC miss before the fallback"
    );
    assert!(stdout.contains(r#"file="default.ipxe""#));
    assert!(stdout.contains(r#"file="vmlinuz""#));
}

#[test]
#[ignore = "8 VMs under TCG: about a minute"]
fn eight_vms_ipxe_boot_concurrently() {
    if let Some(stdout) = boot(&["--vms", "8"]) {
        assert_booted(&stdout, 8);
    }
}

#[test]
#[ignore = "pxelinux boot: about 30 s"]
fn pxelinux_boots_two_vms() {
    if let Some(stdout) = boot(&["--pxelinux", "--vms", "2"]) {
        assert_booted(&stdout, 2);
        assert!(stdout.contains(r#"file="ldlinux.c32""#));
        assert!(stdout.contains(r#"file="pxelinux.cfg/default""#));
    }
}

/// OVMF's own PXE client probes with tsize, aborts with ERROR 8, then
/// fetches with blksize=1468 windowsize=4: the OACK must grant the window.
fn uefi_boots(vms: usize) {
    let n = vms.to_string();
    let Some(stdout) = boot(&["--uefi", "--vms", &n]) else {
        return;
    };
    assert_booted(&stdout, vms);
    // The OACK of every OVMF fetch granted windowsize=4 (the script also
    // checks the server log for completed windowsize=4 transfers).
    let fetches: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("WINDOWSIZE ") && l.contains("kind=fetch"))
        .collect();
    assert_eq!(fetches.len(), vms, "one OVMF fetch per VM");
    assert!(
        fetches.iter().all(|l| l.ends_with("granted=4")),
        "{fetches:?}"
    );
    assert!(stdout.contains(r#"ERROR 8 "User aborted the transfer" from client"#));
}

#[test]
fn one_vm_uefi_pxe_is_granted_windowsize_4() {
    uefi_boots(1);
}

#[test]
#[ignore = "8 OVMF VMs under TCG: about 90 s"]
fn eight_vms_uefi_pxe() {
    uefi_boots(8);
}

#[test]
#[ignore = "a 64 MiB initramfs: a few minutes under TCG"]
fn installer_sized_initramfs_arrives_intact() {
    if let Some(stdout) = boot(&["--pad", "64M", "--vms", "1"]) {
        // The guest checksums the padding; the script compares it.
        assert_booted(&stdout, 1);
    }
}
