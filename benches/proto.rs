//! Codec micro-benchmarks, ns per packet: parse of the datagrams a server
//! receives (a PXE-style RRQ with options, ACK, DATA) and emit of what it
//! sends (DATA header, OACK, ERROR).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use ringtftpd::proto::{self, ErrorCode, Options, Packet};

/// What an iPXE/pxelinux client sends: three options after the mode.
const RRQ: &[u8] =
    b"\x00\x01pxelinux.0\x00octet\x00tsize\x000\x00blksize\x001468\x00windowsize\x004\x00";
const ACK: &[u8] = b"\x00\x04\x12\x34";
const BLKSIZE: usize = 1468;

fn data_packet() -> Vec<u8> {
    let mut buf = vec![0u8; 4 + BLKSIZE];
    let payload: Vec<u8> = (0..BLKSIZE).map(|i| i as u8).collect();
    let n = Packet::Data {
        block: 0x1234,
        payload: &payload,
    }
    .emit(&mut buf)
    .expect("buffer sized for the packet");
    assert_eq!(n, buf.len());
    buf
}

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("proto_parse");

    // Check once that each input parses as intended, so the benches time
    // the success path rather than an early error.
    let Ok(Packet::Rrq(r)) = Packet::parse(RRQ) else {
        panic!("RRQ fixture does not parse");
    };
    assert_eq!(r.options.windowsize, Some(4));
    g.bench_function("rrq_3_options", |b| {
        b.iter(|| Packet::parse(black_box(RRQ)))
    });

    assert_eq!(Packet::parse(ACK), Ok(Packet::Ack { block: 0x1234 }));
    g.bench_function("ack", |b| b.iter(|| Packet::parse(black_box(ACK))));

    let data = data_packet();
    assert!(matches!(
        Packet::parse(&data),
        Ok(Packet::Data { block: 0x1234, payload }) if payload.len() == BLKSIZE
    ));
    g.bench_function("data_1468", |b| b.iter(|| Packet::parse(black_box(&data))));
    g.finish();
}

fn emit(c: &mut Criterion) {
    let mut g = c.benchmark_group("proto_emit");
    let mut buf = [0u8; 1500];

    let mut block = 0u16;
    g.bench_function("data_header", |b| {
        b.iter(|| {
            block = block.wrapping_add(1);
            proto::emit_data_header(black_box(block), black_box(&mut buf[..]))
        })
    });

    // The OACK answering the RRQ above (tsize now the file's length).
    let oack = Options {
        blksize: Some(1468),
        timeout: None,
        tsize: Some(26_828),
        windowsize: Some(4),
        ..Options::default()
    };
    let n = Packet::Oack(oack).emit(&mut buf).expect("OACK fits");
    assert_eq!(Packet::parse(&buf[..n]), Ok(Packet::Oack(oack)));
    g.bench_function("oack_3_options", |b| {
        b.iter(|| Packet::Oack(black_box(oack)).emit(black_box(&mut buf[..])))
    });

    g.bench_function("error", |b| {
        b.iter(|| {
            proto::emit_error(
                black_box(ErrorCode::FileNotFound),
                black_box("file not found"),
                black_box(&mut buf[..]),
            )
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        // Plot rendering, not measuring, dominated the run time.
        .without_plots();
    targets = parse, emit
}
criterion_main!(benches);
