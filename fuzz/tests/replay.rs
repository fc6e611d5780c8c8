//! Replays every checked-in input (seed corpus and crash regressions)
//! through the harnesses on stable `cargo test`, without libFuzzer.

use std::fs;
use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut count = 0;
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        paths.sort();
        for path in paths {
            let data = fs::read(&path).expect("readable input");
            eprintln!("{}", path.display());
            run(&data);
            count += 1;
        }
    }
    assert!(count > 0, "no inputs for {target}");
}

#[test]
fn packet_inputs() {
    replay("packet", ringtftpd_fuzz::packet::run);
}

#[test]
fn transfer_inputs() {
    replay("transfer", ringtftpd_fuzz::transfer::run);
}

#[test]
fn endpoint_inputs() {
    replay("endpoint", ringtftpd_fuzz::endpoint::run);
}

/// The checked-in seeds are what `cargo run --example seeds` writes.
#[test]
fn seeds_are_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, inputs) in ringtftpd_fuzz::seeds::all() {
        for (name, bytes) in inputs {
            let path = root.join(target).join(format!("seed-{name}"));
            let stored = fs::read(&path).unwrap_or_default();
            assert!(
                stored == bytes,
                "{} is stale: run `cargo run --example seeds`",
                path.display()
            );
        }
    }
}

#[test]
fn receive_inputs() {
    replay("receive", ringtftpd_fuzz::receive::run);
}
