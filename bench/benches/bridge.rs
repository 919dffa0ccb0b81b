//! Plane bridge: events from a producer thread to a consumer through the lock-free queue.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use dataplane::{Bridge, Event};
use std::sync::Arc;
use wire::TaskId;

const BATCH: u64 = 100_000;

fn bridge(c: &mut Criterion) {
    let mut g = c.benchmark_group("bridge");
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function("events_across_threads", |b| {
        b.iter(|| {
            let bridge = Arc::new(Bridge::new(1, 4096));
            let p = bridge.clone();
            let producer = std::thread::spawn(move || {
                for n in 0..BATCH {
                    let mut ev = Event::DownloadFinished {
                        task: TaskId([(n % 251) as u8; 32]),
                    };
                    loop {
                        match p.emit(ev) {
                            Ok(()) => break,
                            Err(dataplane::bridge::Full(e)) => {
                                ev = e;
                                std::hint::spin_loop();
                            }
                        }
                    }
                }
            });
            futures::executor::block_on(async {
                for _ in 0..BATCH {
                    bridge.next_event().await;
                }
            });
            let _ = producer.join();
        })
    });
    g.finish();
}

criterion_group!(benches, bridge);
criterion_main!(benches);
