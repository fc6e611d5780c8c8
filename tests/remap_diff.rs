//! Differential test of `ringtftpd::remap` against the real tftpd-hpa 7.x
//! `--map-test`: for every `tests/remap/NAME.rules` with its `NAME.names`
//! (and, if present, `NAME.steps` for `--map-steps`), both sides map every
//! name as an IPv4 and an IPv6 client, for RRQ and WRQ (`--create`), and
//! their outputs must agree line for line: tftpd-hpa's `--map-test` and
//! our binary's, given the same arguments. Then seeded random single-rule
//! files over the regex subset we accept check the regex translation.
//!
//! The peer comes from `scripts/peer-hpa7.sh` (Debian unstable's package).
//! If it cannot be had the test fails, unless RINGTFTPD_SKIP_PEER_HPA7=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use ringtftpd::remap::{DEFAULT_MAX_STEPS, RemapContext, RemapRules, map_test_client};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The command prefix that runs in.tftpd, or None when told to skip.
fn peer() -> Option<Vec<String>> {
    let prefix = common::hpa7_command()?;
    assert!(prefix.len() >= 4, "unexpected prefix {prefix:?}");
    Some(prefix)
}

struct Case {
    ipv6: bool,
    write: bool,
}

const CASES: [Case; 4] = [
    Case {
        ipv6: false,
        write: false,
    },
    Case {
        ipv6: false,
        write: true,
    },
    Case {
        ipv6: true,
        write: false,
    },
    Case {
        ipv6: true,
        write: true,
    },
];

/// `--map-test` of the server that `prefix` runs (tftpd-hpa, or ours).
fn run_map_test(
    prefix: &[String],
    rules: &Path,
    names: &Path,
    steps: Option<usize>,
    case: &Case,
) -> Vec<u8> {
    let mut cmd = Command::new(&prefix[0]);
    cmd.args(&prefix[1..])
        .arg("--map-file")
        .arg(rules)
        .arg(if case.ipv6 { "-6" } else { "-4" })
        // The C locale: what src/remap.rs matches (see its docs).
        .env("LC_ALL", "C")
        .env_remove("LANG");
    if case.write {
        cmd.arg("--create");
    }
    if let Some(n) = steps {
        cmd.arg("--map-steps").arg(n.to_string());
    }
    cmd.arg("--map-test").arg(names);
    let out = cmd.output().expect("run --map-test");
    assert!(
        out.status.success(),
        "{} --map-test {} failed: {}",
        prefix[prefix.len() - 1],
        rules.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The library's answer (the random rules skip the process per rule).
fn ours(rules: &RemapRules, names: &[u8], steps: usize, case: &Case) -> Vec<u8> {
    let ctx = RemapContext::new(map_test_client(case.ipv6), case.write);
    rules.map_test(names, &ctx, steps)
}

/// Compares line by line, naming the first difference.
fn compare(what: &str, input: &[u8], theirs: &[u8], mine: &[u8]) {
    if theirs == mine {
        return;
    }
    let t: Vec<_> = theirs.split(|&b| b == b'\n').collect();
    let m: Vec<_> = mine.split(|&b| b == b'\n').collect();
    let inputs: Vec<_> = input.split(|&b| b == b'\n').collect();
    for i in 0..t.len().max(m.len()) {
        let (a, b) = (t.get(i), m.get(i));
        if a != b {
            panic!(
                "{what}: line {} differs (input {:?}):\n  tftpd-hpa: {:?}\n  ringtftpd: {:?}",
                i + 1,
                inputs.get(i).map(|l| String::from_utf8_lossy(l)),
                a.map(|l| String::from_utf8_lossy(l)),
                b.map(|l| String::from_utf8_lossy(l)),
            );
        }
    }
}

#[test]
fn fixtures_match_tftpd_hpa_map_test() {
    let Some(prefix) = peer() else { return };
    let dir = root().join("tests/remap");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/remap")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "rules"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no rule files in {}", dir.display());
    let (mut lines, mut runs) = (0, 0);
    for rules_path in &files {
        let names_path = rules_path.with_extension("names");
        let steps = std::fs::read_to_string(rules_path.with_extension("steps"))
            .ok()
            .map(|s| {
                s.trim()
                    .parse::<usize>()
                    .expect("a .steps file holds a number")
            });
        let text = std::fs::read(rules_path).expect("read rules");
        let names = std::fs::read(&names_path).expect("each .rules has its .names");
        let rules = RemapRules::parse_bytes(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", rules_path.display()));
        let binary = [env!("CARGO_BIN_EXE_ringtftpd").to_owned()];
        for case in &CASES {
            let theirs = run_map_test(&prefix, rules_path, &names_path, steps, case);
            // Our binary's --map-test, with the very same arguments.
            let mine = run_map_test(&binary, rules_path, &names_path, steps, case);
            let library = ours(&rules, &names, steps.unwrap_or(DEFAULT_MAX_STEPS), case);
            assert_eq!(mine, library, "the binary prints what the library maps");
            let what = format!(
                "{} ({}, {})",
                rules_path.display(),
                if case.ipv6 { "IPv6" } else { "IPv4" },
                if case.write { "WRQ" } else { "RRQ" }
            );
            compare(&what, &names, &theirs, &mine);
            lines += theirs.split(|&b| b == b'\n').count() - 1;
            runs += 1;
        }
    }
    eprintln!(
        "remap_diff: {} rule files, {runs} runs, {lines} lines identical",
        files.len()
    );
}

/// xorshift64*: a seeded, dependency-free generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// A random ERE from the subset src/remap.rs accepts.
fn random_ere(rng: &mut Rng, depth: u32) -> String {
    let mut s = String::new();
    if rng.next() % 4 == 0 {
        s.push('^');
    }
    for _ in 0..1 + rng.next() % 4 {
        match rng.next() % 8 {
            0 if depth < 2 => {
                s.push('(');
                s.push_str(&random_ere(rng, depth + 1));
                s.push(')');
            }
            1 => s.push_str(rng.pick(&["(ab|ba)", "(a|b)", "(abc|b|ca)", "(aa|b)"])),
            _ => {
                s.push_str(rng.pick(&["a", "b", "c", ".", "[ab]", "[^a]", "[a-b]"]));
                s.push_str(rng.pick(&["", "", "*", "+", "?", "{1,2}", "{2}"]));
            }
        }
    }
    if rng.next() % 4 == 0 {
        s.push('$');
    }
    s
}

#[test]
fn random_regexes_match_tftpd_hpa() {
    let Some(prefix) = peer() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(0x5eed_2026_0001);
    let mut names = Vec::new();
    for _ in 0..24 {
        let len = rng.next() % 7;
        for _ in 0..len {
            names.push(b"abc"[(rng.next() % 3) as usize]);
        }
        names.push(b'\n');
    }
    let names_path = dir.path().join("names");
    std::fs::write(&names_path, &names).expect("write names");
    let case = &CASES[0];
    let mut checked = 0;
    for i in 0..150 {
        // One substitution each: g and gg loops on empty matches run to
        // the step limit with names growing each round (slow on both sides).
        let op = rng.pick(&["r", "ri"]);
        let text = format!("{op} {} <\\0|\\1|\\2|\\3>\n", random_ere(&mut rng, 0));
        let rules = RemapRules::parse(&text).unwrap_or_else(|e| panic!("generated {text:?}: {e}"));
        let path = dir.path().join(format!("r{i}.rules"));
        std::fs::write(&path, &text).expect("write rules");
        let theirs = run_map_test(&prefix, &path, &names_path, None, case);
        let mine = ours(&rules, &names, DEFAULT_MAX_STEPS, case);
        compare(&format!("random rule {text:?}"), &names, &theirs, &mine);
        checked += 1;
    }
    eprintln!("remap_diff: {checked} random rules x 24 names identical");
}

#[test]
fn normalized_names_match_tftpd_hpa_map_test() {
    let Some(prefix) = peer() else { return };
    let names = root().join("tests/remap/normalize.names.txt");
    let rules = root().join("tests/remap/windows.rules");
    let binary = env!("CARGO_BIN_EXE_ringtftpd");
    for mode in [
        "--normalize",
        "--normalize=root",
        "--normalize=path",
        "--normalize=none",
    ] {
        let run = |program: &[String]| {
            let out = Command::new(&program[0])
                .args(&program[1..])
                .arg("-m")
                .arg(&rules)
                .arg(mode)
                .arg("--map-test")
                .arg(&names)
                .env("LC_ALL", "C")
                .output()
                .expect("run --map-test");
            assert!(out.status.success(), "{program:?} {mode}");
            out.stdout
        };
        let theirs = run(&prefix);
        let mine = run(&[binary.to_owned()]);
        compare(mode, &std::fs::read(&names).unwrap(), &theirs, &mine);
    }
}
