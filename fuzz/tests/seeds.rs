//! The seeds do what their names say, so the fuzzer starts from real
//! exchanges and not from inputs the harness reads as noise.

use ringtftpd::session::Outcome;
use ringtftpd_fuzz::seeds;

fn seed(target: &str, name: &str) -> Vec<u8> {
    let (_, inputs) = seeds::all()
        .into_iter()
        .find(|(t, _)| *t == target)
        .expect("a target");
    inputs
        .into_iter()
        .find(|(n, _)| n == name)
        .expect("a seed")
        .1
}

#[test]
fn transfer_seeds_reach_their_outcomes() {
    let outcome = |name| ringtftpd_fuzz::transfer::outcome_of(&seed("transfer", name));
    assert_eq!(outcome("ipxe"), Some(Outcome::Completed));
    assert_eq!(outcome("pxelinux"), Some(Outcome::Completed));
    assert_eq!(outcome("ovmf-fetch"), Some(Outcome::Completed));
    assert_eq!(outcome("ovmf-probe"), Some(Outcome::OptionsDeclined));
    assert_eq!(outcome("plain-loss"), None, "still running, after resends");
}

#[test]
fn endpoint_seeds_complete_their_small_files() {
    let completed = |name| ringtftpd_fuzz::endpoint::completed_by(&seed("endpoint", name));
    // boot.ipxe and default.ipxe (one block each); the kernel is cut short.
    assert_eq!(completed("ipxe"), 2);
    // pxelinux.cfg/default after the misses.
    assert_eq!(completed("pxelinux"), 1);
}
