//! File cache benchmarks: an `open_read` that hits the shared mapping cache
//! (openat2 + fstat + lookup + close), and netascii translation of 1 MiB.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringtftpd::endpoint::FileSource;
use ringtftpd::files::{FileRoot, netascii_encode};
use ringtftpd::proto::Mode;

fn open_cached(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pxelinux.0"), vec![0x5au8; 64 * 1024]).expect("write");
    let mut root = FileRoot::open(dir.path(), true).expect("root");
    // Keep one handle alive so every open below is a cache hit.
    let (keep, _) = root.open_read(b"pxelinux.0", Mode::Octet).expect("open");
    c.bench_function("files/open_read_cached_octet", |b| {
        b.iter(|| {
            let (d, len) = root
                .open_read(black_box(b"pxelinux.0"), Mode::Octet)
                .expect("open");
            black_box((&d, len));
        })
    });
    drop(keep);
}

fn netascii(c: &mut Criterion) {
    // Text-like: lines of 63 characters and a LF, with an occasional CR.
    let mut src = Vec::with_capacity(1 << 20);
    let mut i = 0u32;
    while src.len() < 1 << 20 {
        src.push(b'a' + (i % 26) as u8);
        i = i.wrapping_add(1);
        if i % 64 == 0 {
            src.push(b'\n');
        }
        if i % 4096 == 0 {
            src.push(b'\r');
        }
    }
    src.truncate(1 << 20);
    let mut g = c.benchmark_group("files/netascii_encode");
    g.throughput(Throughput::Bytes(src.len() as u64));
    g.bench_function("1MiB_text", |b| {
        b.iter(|| black_box(netascii_encode(black_box(&src))))
    });
    let binary: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    g.bench_function("1MiB_random", |b| {
        b.iter(|| black_box(netascii_encode(black_box(&binary))))
    });
    g.finish();
}

criterion_group!(benches, open_cached, netascii);
criterion_main!(benches);
