//! Frame codec: encode and decode of the frames on the hot path.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use wire::frame::{self, Frame, PieceHeader};
use wire::TaskId;

fn codec(c: &mut Criterion) {
    let task = TaskId([7; 32]);
    let req = Frame::PieceRequest { task, number: 42 };
    let hdr = Frame::Piece(PieceHeader {
        task,
        number: 42,
        offset: 42 << 20,
        length: 1 << 20,
        crc32c: 0xdead_beef,
    });
    let bitmap = Frame::Bitmap {
        task,
        content_length: 1 << 30,
        piece_length: 1 << 20,
        piece_count: 1024,
        bits: vec![0xaa; 128],
    };
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    for (name, f) in [
        ("piece_request", &req),
        ("piece_header", &hdr),
        ("bitmap_1024", &bitmap),
    ] {
        let mut buf = bytes::BytesMut::new();
        frame::encode(f, &mut buf);
        let encoded = buf.to_vec();
        g.bench_function(format!("encode/{name}"), |b| {
            let mut out = bytes::BytesMut::with_capacity(256);
            b.iter(|| {
                out.clear();
                frame::encode(black_box(f), &mut out);
            })
        });
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| frame::decode(black_box(&encoded)))
        });
    }
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
