//! File cache benchmarks: an `open_read` that hits the shared mapping cache
//! (openat2 + fstat + lookup + close), netascii translation of 1 MiB, and
//! the worst single step a netascii download costs its shard: opening a
//! fresh 64 MiB text file and resolving its first block (page cache warm,
//! so this is the CPU of pread and translation, not the disk).

use std::hint::black_box;

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringtftpd::files::netascii::netascii_encode;
use ringtftpd::files::{FileRoot, Source};
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
    let src = text(1 << 20);
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

/// Lines of 63 characters and a LF, with an occasional CR.
fn text(len: usize) -> Vec<u8> {
    let mut src = Vec::with_capacity(len);
    let mut i = 0u32;
    while src.len() < len {
        src.push(b'a' + (i % 26) as u8);
        i = i.wrapping_add(1);
        if i % 64 == 0 {
            src.push(b'\n');
        }
        if i % 4096 == 0 {
            src.push(b'\r');
        }
    }
    src.truncate(len);
    src
}

fn netascii_first_block(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("big.txt"), text(64 << 20)).expect("write");
    // No open cache here: each open is a fresh translation.
    let mut root = FileRoot::open(dir.path(), true).expect("root");
    let mut g = c.benchmark_group("files/netascii_first_block");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function("64MiB_text", |b| {
        b.iter(|| {
            let (d, _) = root
                .open_read(black_box(b"big.txt"), Mode::Netascii)
                .expect("open");
            black_box(d.block(0, 512).expect("block 1").len);
        })
    });
    g.finish();
}

criterion_group!(benches, open_cached, netascii, netascii_first_block);
criterion_main!(benches);
