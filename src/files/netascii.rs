//! Netascii (RFC 764, as RFC 1350 uses it) both ways: local text to the
//! wire as a download is sent ([`netascii_encode`], and `Netascii`, a
//! file translated one bounded chunk at a time), and the wire back to
//! local text as an upload arrives ([`NetasciiDecoder`]).

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::OpenError;
use super::root::{Block, BlockError, Stamp, TRANSIENT};

/// Netascii content, translated as it is sent: resolving a block reads and
/// translates at most one chunk of source ([`NETASCII_CHUNK`]), so a fresh
/// 64 MiB file costs a shard one chunk's work per step, not the whole file
/// at open. Single-threaded (`Rc`/`RefCell`): a shard's sessions share one
/// through the endpoint's open cache; other shards build their own.
pub(super) struct Netascii {
    pub(super) file: File,
    /// What fstat said at open: the source length to translate, and the
    /// change check before the final block.
    pub(super) stamp: Stamp,
    pub(super) state: RefCell<Translation>,
}

pub(super) struct Translation {
    /// The translation so far. Its capacity (twice the source, the most it
    /// can need) is reserved at open and never exceeded, so it never moves:
    /// pointers handed to sends in flight stay valid. Reserved, not touched,
    /// so memory grows with the translation.
    pub(super) out: Vec<u8>,
    /// Source bytes translated.
    pub(super) src_done: u64,
    /// One chunk of source, reused.
    pub(super) chunk: Vec<u8>,
    /// Set once a read fails or the file shrank: every later block fails.
    pub(super) failed: Option<BlockError>,
    /// preads issued and source bytes read (the test seam that bounds the
    /// work per block).
    pub(super) preads: u64,
    pub(super) read_bytes: u64,
}

/// Source bytes read and translated per step of a netascii translation.
/// One block needs at most one step (a step yields at least this much
/// output, more than the largest block).
pub const NETASCII_CHUNK: usize = 256 * 1024;

impl Netascii {
    pub(super) fn new(file: File, stamp: Stamp) -> Result<Netascii, OpenError> {
        let cap = usize::try_from(stamp.size.saturating_mul(2))
            .map_err(|_| OpenError::Unservable("file too large"))?;
        let mut out = Vec::new();
        out.try_reserve_exact(cap)
            .map_err(|_| OpenError::Transient(TRANSIENT))?;
        Ok(Netascii {
            file,
            stamp,
            state: RefCell::new(Translation {
                out,
                src_done: 0,
                chunk: Vec::new(),
                failed: None,
                preads: 0,
                read_bytes: 0,
            }),
        })
    }

    /// Translates until `need` bytes exist or the source is exhausted; a
    /// block asks for at most its own end, so this is one step at most.
    pub(super) fn resolve(&self, offset: u64, len: usize) -> Result<Block, BlockError> {
        let mut t = self.state.borrow_mut();
        let need = offset.checked_add(len as u64).ok_or(BlockError::Changed)?;
        while (t.out.len() as u64) < need && t.src_done < self.stamp.size {
            t.step(&self.file, self.stamp.size)?;
        }
        if let Some(e) = t.failed {
            return Err(e);
        }
        let have = t.out.len() as u64;
        let end = (t.src_done == self.stamp.size).then_some(have);
        // Past the end: the session was told the length too late (a bug),
        // or asked beyond it; never hand out a pointer outside.
        let start = usize::try_from(offset)
            .ok()
            .filter(|&s| s as u64 <= have)
            .ok_or(BlockError::Changed)?;
        let n = (have.min(need) - offset) as usize;
        Ok(Block {
            // wrapping_add: no dereference here; `start <= len` keeps it in
            // (or one past) the allocation.
            ptr: t.out.as_ptr().wrapping_add(start),
            len: n,
            end,
        })
    }
}

impl Translation {
    /// Reads one chunk of source with pread (never through a mapping) and
    /// appends its translation.
    fn step(&mut self, file: &File, size: u64) -> Result<(), BlockError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let want = (size - self.src_done).min(NETASCII_CHUNK as u64) as usize;
        self.chunk.resize(want, 0);
        let mut got = 0;
        while got < want {
            self.preads += 1;
            match file.read_at(&mut self.chunk[got..], self.src_done + got as u64) {
                Ok(0) => {
                    // Shorter than at open: truncated under the transfer.
                    self.failed = Some(BlockError::Changed);
                    return Err(BlockError::Changed);
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.failed = Some(BlockError::Read);
                    return Err(BlockError::Read);
                }
            }
        }
        self.read_bytes += want as u64;
        self.src_done += want as u64;
        // Each source byte yields one or two: within the reserved capacity.
        debug_assert!(self.out.len() + 2 * want <= self.out.capacity());
        netascii_encode_into(&self.chunk, &mut self.out);
        Ok(())
    }
}

/// RFC 764 / RFC 1350 netascii: LF → CR LF, CR → CR NUL; other bytes as is.
pub fn netascii_encode(src: &[u8]) -> Vec<u8> {
    // Exact size first (a cheap vectorised pass), so no regrowth.
    let specials = src.iter().filter(|&&b| is_special(b)).count();
    let mut out = Vec::with_capacity(src.len() + specials);
    netascii_encode_into(src, &mut out);
    out
}

/// Appends the netascii translation of `src` to `out`. Each byte is
/// translated on its own, so `src` may be cut anywhere (a CR at the end of
/// one chunk and the LF at the start of the next come out as from one).
pub(super) fn netascii_encode_into(src: &[u8], out: &mut Vec<u8>) {
    let mut run = 0; // start of the bytes not yet copied
    let mut emit = |p: usize, out: &mut Vec<u8>| {
        out.extend_from_slice(&src[run..p]);
        out.extend_from_slice(if src[p] == b'\n' { b"\r\n" } else { b"\r\0" });
        run = p + 1;
    };
    // A 16-bit mask of specials per 16 bytes (the compiler vectorises the
    // compare); copy the runs between them whole.
    let mut chunks = src.chunks_exact(16);
    let mut base = 0;
    for chunk in &mut chunks {
        let mut mask: u16 = 0;
        for (k, &b) in chunk.iter().enumerate() {
            mask |= u16::from(is_special(b)) << k;
        }
        while mask != 0 {
            emit(base + mask.trailing_zeros() as usize, out);
            mask &= mask - 1;
        }
        base += 16;
    }
    for (k, &b) in chunks.remainder().iter().enumerate() {
        if is_special(b) {
            emit(base + k, out);
        }
    }
    out.extend_from_slice(&src[run..]);
}

fn is_special(b: u8) -> bool {
    b == b'\n' || b == b'\r'
}

/// Netascii back to local text, as blocks arrive in order (RFC 764):
/// CR LF becomes LF, CR NUL becomes CR, a CR before anything else is kept;
/// a CR that ends a block waits for the next one.
#[derive(Debug, Default)]
pub struct NetasciiDecoder {
    pending_cr: bool,
}

impl NetasciiDecoder {
    /// Appends the local text of `input` to `out`.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &b in input {
            if std::mem::take(&mut self.pending_cr) {
                match b {
                    b'\n' => {
                        out.push(b'\n');
                        continue;
                    }
                    0 => {
                        out.push(b'\r');
                        continue;
                    }
                    _ => out.push(b'\r'),
                }
            }
            if b == b'\r' {
                self.pending_cr = true;
            } else {
                out.push(b);
            }
        }
    }

    /// The end of the input: a CR still waiting is kept.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.pending_cr) {
            out.push(b'\r');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netascii_encoding_rules() {
        assert_eq!(netascii_encode(b""), b"");
        assert_eq!(netascii_encode(b"abc"), b"abc");
        assert_eq!(netascii_encode(b"a\nb"), b"a\r\nb");
        assert_eq!(netascii_encode(b"a\rb"), b"a\r\0b");
        assert_eq!(netascii_encode(b"a\r\nb"), b"a\r\0\r\nb");
        assert_eq!(netascii_encode(b"end\r"), b"end\r\0");
        assert_eq!(netascii_encode(b"\n\n"), b"\r\n\r\n");
        // Specials in both the word loop and the tail, at every offset.
        for n in 0..40usize {
            for pos in 0..n {
                let mut src = vec![b'x'; n];
                src[pos] = b'\n';
                let mut want = vec![b'x'; n + 1];
                want[pos] = b'\r';
                want[pos + 1] = b'\n';
                assert_eq!(netascii_encode(&src), want, "n={n} pos={pos}");
            }
        }
    }

    fn naive_netascii(src: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for &b in src {
            match b {
                b'\n' => out.extend_from_slice(b"\r\n"),
                b'\r' => out.extend_from_slice(b"\r\0"),
                _ => out.push(b),
            }
        }
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn netascii_matches_naive(src in proptest::collection::vec(
            proptest::prop_oneof![proptest::prelude::Just(b'\n'), proptest::prelude::Just(b'\r'), proptest::prelude::any::<u8>()],
            0..200,
        )) {
            proptest::prop_assert_eq!(netascii_encode(&src), naive_netascii(&src));
        }
    }

    fn decode_in_pieces(wire: &[u8], cuts: &[usize]) -> Vec<u8> {
        let mut dec = NetasciiDecoder::default();
        let mut out = Vec::new();
        let mut at = 0;
        for &cut in cuts {
            let cut = cut.min(wire.len()).max(at);
            dec.decode(&wire[at..cut], &mut out);
            at = cut;
        }
        dec.decode(&wire[at..], &mut out);
        dec.finish(&mut out);
        out
    }

    #[test]
    fn netascii_decoding_rules() {
        assert_eq!(decode_in_pieces(b"a\r\nb\r\0c", &[]), b"a\nb\rc");
        // A CR at a block's end waits for its partner in the next block.
        assert_eq!(decode_in_pieces(b"a\r\nb", &[2]), b"a\nb");
        assert_eq!(decode_in_pieces(b"x\r\0", &[2]), b"x\r");
        // Lenient: a bare CR (before another byte, or at the end) is kept.
        assert_eq!(decode_in_pieces(b"a\rb\r", &[]), b"a\rb\r");
        assert_eq!(decode_in_pieces(b"\r\r\n", &[1]), b"\r\n");
    }

    proptest::proptest! {
        #[test]
        fn netascii_decode_inverts_encode_at_any_block_cuts(
            src in proptest::collection::vec(proptest::sample::select(vec![b'a', b'\r', b'\n', 0u8]), 0..300),
            mut cuts in proptest::collection::vec(0usize..700, 0..6),
        ) {
            cuts.sort_unstable();
            let wire = netascii_encode(&src);
            proptest::prop_assert_eq!(decode_in_pieces(&wire, &cuts), src);
        }
    }
}
