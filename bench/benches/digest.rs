//! Per-piece digests: crc32c (transport check), BLAKE3 and sha256 over one 1 MiB piece, to
//! pick the digest every peer checks (tuning.md, "Piece digests").

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sha2::Digest as _;
use std::hint::black_box;

fn digests(c: &mut Criterion) {
    let piece: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut g = c.benchmark_group("piece_digest_1MiB");
    g.throughput(Throughput::Bytes(piece.len() as u64));
    g.bench_function("crc32c", |b| b.iter(|| wire::piece_crc(black_box(&piece))));
    g.bench_function("blake3", |b| {
        b.iter(|| wire::piece_digest(black_box(&piece)))
    });
    // As the fetcher hashes: 64 KiB at a time (QUIC hands over packets, TCP 1 MiB chunks).
    g.bench_function("blake3_64KiB_parts", |b| {
        let mut h = wire::PieceHasher::new();
        b.iter(|| {
            h.reset();
            for part in black_box(&piece).chunks(64 << 10) {
                h.update(part);
            }
            h.finish()
        })
    });
    // QUIC hands over packet-sized parts: gathered to 64 KiB inside `PieceHasher`.
    g.bench_function("blake3_1200B_parts", |b| {
        let mut h = wire::PieceHasher::new();
        b.iter(|| {
            h.reset();
            for part in black_box(&piece).chunks(1200) {
                h.update(part);
            }
            h.finish()
        })
    });
    g.bench_function("sha256", |b| {
        b.iter(|| sha2::Sha256::digest(black_box(&piece)))
    });
    g.finish();
}

criterion_group!(benches, digests);
criterion_main!(benches);
