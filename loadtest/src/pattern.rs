//! The content of an uploaded file: a deterministic pseudo-random byte stream derived from the
//! file's name alone, so the load generator can produce any block without holding the file and
//! the `compare` harness can check what landed on disk without a copy of what was sent. A file
//! stored under the wrong name, shifted, truncated or with a block from another upload differs.
//!
//! Byte `j` of the file named `n` is byte `j % 8` (little-endian) of
//! `splitmix64(key(n) + (j / 8 + 1) × 0x9e3779b97f4a7c15)`, where `key` is FNV-1a 64 of the name.
//! Shared by `loadtest` and `compare` (included by path: they are separate binaries).
#![forbid(unsafe_code)]

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// The stream key of a file name (FNV-1a, 64 bits).
pub fn key(name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn word(key: u64, w: u64) -> [u8; 8] {
    let mut x = key.wrapping_add(w.wrapping_add(1).wrapping_mul(GOLDEN));
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)).to_le_bytes()
}

/// Writes bytes `offset .. offset + out.len()` of the stream `key` into `out`.
pub fn fill(key: u64, offset: u64, out: &mut [u8]) {
    let mut i = 0;
    let mut pos = offset;
    while i < out.len() {
        let w = word(key, pos / 8);
        let from = (pos % 8) as usize;
        let n = (8 - from).min(out.len() - i);
        out[i..i + n].copy_from_slice(&w[from..from + n]);
        i += n;
        pos += n as u64;
    }
}

/// The first offset (relative to `offset`) where `got` differs from the stream, if any.
/// (`compare` checks uploaded files with it; `loadtest` itself only in tests.)
#[allow(dead_code)]
pub fn first_mismatch(key: u64, offset: u64, got: &[u8]) -> Option<usize> {
    let mut want = [0u8; 4096];
    let mut done = 0;
    while done < got.len() {
        let n = (got.len() - done).min(want.len());
        fill(key, offset + done as u64, &mut want[..n]);
        if let Some(i) = want[..n]
            .iter()
            .zip(&got[done..done + n])
            .position(|(a, b)| a != b)
        {
            return Some(done + i);
        }
        done += n;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_slice_equals_the_same_part_of_the_whole() {
        let k = key("up-S7r1-ringtftpd-17");
        let mut whole = vec![0u8; 1000];
        fill(k, 0, &mut whole);
        for (off, len) in [
            (0usize, 1usize),
            (3, 5),
            (7, 9),
            (8, 8),
            (13, 400),
            (999, 1),
        ] {
            let mut part = vec![0u8; len];
            fill(k, off as u64, &mut part);
            assert_eq!(part, whole[off..off + len], "offset {off} len {len}");
        }
        assert_eq!(first_mismatch(k, 0, &whole), None);
        let mut bad = whole.clone();
        bad[517] ^= 1;
        assert_eq!(first_mismatch(k, 0, &bad), Some(517));
        assert_eq!(first_mismatch(k, 5, &whole[5..]), None);
        // Shifted by one byte: differs at once.
        assert_eq!(first_mismatch(k, 1, &whole[..100]), Some(0));
    }

    #[test]
    fn names_give_different_streams() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        fill(key("up-1"), 0, &mut a);
        fill(key("up-2"), 0, &mut b);
        assert_ne!(a, b);
        assert_ne!(key(""), key("a"));
    }
}
