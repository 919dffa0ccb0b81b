//! Scheduler state: what one registration costs the decision logic alone (no gRPC), in a
//! swarm of 10,000 peers of one task whose size is known, so every registration is scheduled
//! at once (sampling, filtering and scoring candidate parents, recording the edges). Each
//! iteration registers a peer on a new host and removes the oldest, so the swarm stays at
//! 10,000 scheduled peers, each with the parents it got when it registered.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use scheduler::state::{PeerKey, SchedulerState};
use scheduler::SchedulingConfig;
use wire::proto::scheduler::{
    AnnounceTaskRequest, Host, HostType, RegisterPeer, TaskMetadata, TaskSource,
};

const SWARM: u64 = 10_000;
const TASK: &str = "0000000000000000000000000000000000000000000000000000000000000001";

fn host(i: u64, seed: bool) -> Host {
    Host {
        id: format!("host-{i}"),
        hostname: format!("h{i}"),
        ip: "10.0.0.1".to_owned(),
        data_port: 4000,
        r#type: if seed {
            HostType::Seed as i32
        } else {
            HostType::Normal as i32
        },
        idc: format!("idc-{}", i % 3),
        location: "cn|hz".to_owned(),
        upload_rate_limit: 12_500_000,
        quic_port: 0,
    }
}

fn register(state: &mut SchedulerState, i: u64) -> usize {
    let outputs = state
        .register_peer(
            PeerKey(i),
            RegisterPeer {
                task_id: TASK.to_owned(),
                peer_id: format!("peer-{i}"),
                host: Some(host(i, false)),
                source: Some(TaskSource {
                    url: "http://origin/blob".to_owned(),
                    headers: vec![],
                    digest: String::new(),
                }),
                piece_length: 1 << 20,
                back_to_source: false,
                priority: 0,
                resume: None,
            },
        )
        .expect("valid registration");
    outputs.len()
}

fn registration(c: &mut Criterion) {
    let mut state = SchedulerState::new(SchedulingConfig::default());
    state
        .announce_task(
            PeerKey(u64::MAX),
            AnnounceTaskRequest {
                task_id: TASK.to_owned(),
                peer_id: "seed-peer".to_owned(),
                host: Some(host(u64::MAX, true)),
                metadata: Some(TaskMetadata {
                    content_length: 1 << 30,
                    piece_length: 1 << 20,
                }),
                piece_count: 1024,
                piece_digests: Vec::new(),
                piece_crcs: Vec::new(),
            },
        )
        .expect("valid announcement");
    let mut live: VecDeque<u64> = VecDeque::new();
    for i in 0..SWARM {
        register(&mut state, i);
        live.push_back(i);
    }
    let mut next = SWARM;
    let mut g = c.benchmark_group("scheduler");
    g.bench_function("register_in_swarm_of_10000", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                std::hint::black_box(register(&mut state, next));
                spent += t.elapsed();
                live.push_back(next);
                next += 1;
                if let Some(old) = live.pop_front() {
                    state.peer_left(PeerKey(old));
                }
            }
            spent
        })
    });
    g.finish();
}

criterion_group!(benches, registration);
criterion_main!(benches);
