//! Storage: verifying and writing a piece into a task file (page cache).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dataplane::Storage;
use wire::{PieceLayout, TaskId};

fn storage(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let storage = Storage::open(dir.path()).expect("storage");
    let piece = 1u64 << 20;
    let count = 64u64;
    let data: Vec<u8> = (0..piece).map(|i| (i % 251) as u8).collect();
    let crc = wire::piece_crc(&data);
    let mut g = c.benchmark_group("storage");
    g.throughput(Throughput::Bytes(piece * count));
    g.bench_function("write_64_pieces_of_1MiB", |b| {
        let mut round = 0u8;
        b.iter(|| {
            round = round.wrapping_add(1);
            let id = TaskId([round; 32]);
            let layout = PieceLayout::new(piece * count, piece).expect("layout");
            let store = storage.create(id, layout).expect("create");
            for n in 0..count as u32 {
                store.write_piece(n, &data, crc).expect("write");
            }
            storage.remove(&id).expect("remove");
        })
    });
    g.bench_function("crc32c_1MiB", |b| {
        b.iter(|| wire::piece_crc(std::hint::black_box(&data)))
    });
    g.finish();
}

criterion_group!(benches, storage);
criterion_main!(benches);
