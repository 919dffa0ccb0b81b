//! Tests of the swarm state machine, driven without any network.

#![allow(clippy::unwrap_used)]

use super::*;
use proptest::prelude::*;
use wire::proto::scheduler::announce_peer_request::Request;
use wire::proto::scheduler::{
    host_command, AnnounceTaskRequest, PeerFailed, PeerFinished, PieceDigests, PieceFailed,
    PieceFinished, RegisterPeer, RescheduleRequest,
};

const TASK: &str = "task-1";

fn host(id: &str, seed: bool) -> Host {
    Host {
        id: id.to_owned(),
        hostname: id.to_owned(),
        ip: format!("10.0.0.{}", id.len()),
        data_port: 4005,
        r#type: if seed {
            HostType::Seed as i32
        } else {
            HostType::Normal as i32
        },
        ..Host::default()
    }
}

fn metadata(content_length: u64) -> TaskMetadata {
    TaskMetadata {
        content_length,
        piece_length: 1 << 20,
    }
}

/// A state plus key counters and helpers to read outputs.
struct Sim {
    st: SchedulerState,
    next: u64,
}

impl Sim {
    fn new() -> Self {
        Self::with(SchedulingConfig::default())
    }

    fn with(config: SchedulingConfig) -> Self {
        Self {
            st: SchedulerState::with_seed(config, 7),
            next: 0,
        }
    }

    fn key(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn announce(&mut self, id: &str, seed: bool) -> HostKey {
        let k = HostKey(self.key());
        self.st.host_announced(k, host(id, seed)).unwrap();
        k
    }

    fn register_task(
        &mut self,
        task: &str,
        peer_id: &str,
        host_id: &str,
        seed: bool,
        bts: bool,
    ) -> (PeerKey, Vec<Output>) {
        let k = PeerKey(self.key());
        let out = self
            .st
            .register_peer(
                k,
                RegisterPeer {
                    task_id: task.to_owned(),
                    peer_id: peer_id.to_owned(),
                    host: Some(host(host_id, seed)),
                    source: Some(TaskSource {
                        url: "http://origin/file".to_owned(),
                        headers: vec![],
                        digest: String::new(),
                    }),
                    piece_length: 0,
                    back_to_source: bts,
                    priority: 0,
                    resume: None,
                },
            )
            .unwrap();
        (k, out)
    }

    fn register(&mut self, peer_id: &str, host_id: &str, bts: bool) -> (PeerKey, Vec<Output>) {
        self.register_task(TASK, peer_id, host_id, false, bts)
    }

    fn register_seed_peer(&mut self, peer_id: &str, host_id: &str) -> (PeerKey, Vec<Output>) {
        self.register_task(TASK, peer_id, host_id, true, true)
    }

    fn send(&mut self, k: PeerKey, r: Request) -> Vec<Output> {
        self.st.peer_request(k, r)
    }

    fn piece(&mut self, k: PeerKey, number: u32) -> Vec<Output> {
        self.send(
            k,
            Request::PieceFinished(PieceFinished {
                number,
                ..PieceFinished::default()
            }),
        )
    }

    fn meta(&mut self, k: PeerKey, content_length: u64) -> Vec<Output> {
        self.send(k, Request::TaskMetadata(metadata(content_length)))
    }
}

/// Host ids of the parents sent to `peer` in `out` (all CandidateParents messages, in order).
fn parents_to(out: &[Output], peer: PeerKey) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            Output::Peer {
                peer: p,
                response:
                    AnnouncePeerResponse {
                        response: Some(announce_peer_response::Response::CandidateParents(c)),
                    },
            } if *p == peer => {
                assert!(c.metadata.is_some(), "CandidateParents without metadata");
                Some(
                    c.parents
                        .iter()
                        .map(|x| x.host_id.clone())
                        .collect::<Vec<_>>(),
                )
            }
            _ => None,
        })
        .flatten()
        .collect()
}

fn back_to_source(out: &[Output], peer: PeerKey) -> Option<String> {
    out.iter().find_map(|o| match o {
        Output::Peer {
            peer: p,
            response:
                AnnouncePeerResponse {
                    response: Some(announce_peer_response::Response::NeedBackToSource(n)),
                },
        } if *p == peer => Some(n.reason.clone()),
        _ => None,
    })
}

fn triggers(out: &[Output]) -> Vec<(HostKey, String)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Host {
                host,
                command:
                    HostCommand {
                        command: Some(host_command::Command::DownloadTask(d)),
                    },
            } => Some((*host, d.task_id.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn waiting_peers_get_parents_when_metadata_arrives() {
    let mut sim = Sim::new();
    let seed = sim.announce("seed-a", true);
    let (a, out) = sim.register("peer-a", "host-a", false);
    assert_eq!(triggers(&out), vec![(seed, TASK.to_owned())]);
    assert!(parents_to(&out, a).is_empty());

    // A second peer waits too; the trigger is outstanding, so no second trigger.
    let (b, out) = sim.register("peer-b", "host-b", false);
    assert!(out.is_empty(), "{out:?}");

    // The seed registers as a source peer: nothing is sent yet.
    let (s, out) = sim.register_seed_peer("seed-peer", "seed-a");
    assert!(out.is_empty(), "{out:?}");

    // Metadata: a (first in line) gets the seed; b gets the seed and a (a fetches now, so
    // it can serve b as soon as it has pieces); a is then offered b as well.
    let out = sim.meta(s, 10 << 20);
    assert_eq!(parents_to(&out, a), vec!["seed-a", "host-b"]);
    let mut got_b = parents_to(&out, b);
    got_b.sort();
    assert_eq!(got_b, vec!["host-a", "seed-a"]);
    assert!(parents_to(&out, s).is_empty());

    // A later peer is answered at once, with the seed (running, preferred) first, and
    // `candidate_parent_limit` (2) parents.
    let (c, out) = sim.register("peer-c", "host-c", false);
    let got = parents_to(&out, c);
    assert_eq!(got.first().map(String::as_str), Some("seed-a"), "{got:?}");
    assert_eq!(got.len(), 2);

    let info = sim.st.stat_task(TASK).unwrap();
    assert_eq!(info.piece_count, 10);
    assert_eq!(info.metadata, Some(metadata(10 << 20)));
    assert_eq!(info.peers.len(), 4);
}

#[test]
fn source_peer_is_among_parents_when_metadata_arrives() {
    let mut sim = Sim::with(SchedulingConfig {
        candidate_parent_limit: 1,
        ..SchedulingConfig::default()
    });
    let (src, _) = sim.register("src", "host-src", true);
    // A done seed peer of the same task outranks a fresh source peer, but the peer that just
    // brought the metadata must still be offered to those who waited for it.
    let (done, _) = sim.register_seed_peer("seed-peer", "seed-a");
    let (w, out) = sim.register("w", "host-w", false);
    assert!(out.is_empty());
    sim.send(
        done,
        Request::Finished(PeerFinished {
            content_length: 1 << 20,
        }),
    );
    let out = sim.meta(src, 1 << 20);
    assert_eq!(parents_to(&out, w), vec!["host-src"]);
}

#[test]
fn seed_trigger_is_consistent_and_moves_on_when_the_seed_fails() {
    // Rendezvous hashing: the same seed is chosen whatever the announce order.
    let pick = |order: &[&str]| {
        let mut sim = Sim::new();
        let keys: Vec<(HostKey, String)> = order
            .iter()
            .map(|id| (sim.announce(id, true), id.to_string()))
            .collect();
        let (_, out) = sim.register("peer-a", "host-a", false);
        let t = triggers(&out);
        assert_eq!(t.len(), 1);
        keys.into_iter().find(|(k, _)| *k == t[0].0).unwrap().1
    };
    let first = pick(&["s1", "s2", "s3"]);
    assert_eq!(first, pick(&["s3", "s1", "s2"]));

    let mut sim = Sim::new();
    let hosts: Vec<(HostKey, &str)> = ["s1", "s2", "s3"]
        .iter()
        .map(|id| (sim.announce(id, true), *id))
        .collect();
    sim.announce("normal", false);
    let name = |k: HostKey| hosts.iter().find(|(h, _)| *h == k).unwrap().1;
    let (a, out) = sim.register("peer-a", "host-a", false);
    let t1 = triggers(&out)[0].0;
    assert_eq!(name(t1), first);

    // The triggered seed registers, then fails before learning the size: next seed.
    let (s, _) = sim.register_task(TASK, "seed-peer-1", name(t1), true, true);
    let out = sim.send(
        s,
        Request::Failed(PeerFailed {
            reason: "origin 500".to_owned(),
        }),
    );
    let t2 = triggers(&out);
    assert_eq!(t2.len(), 1);
    assert_ne!(t2[0].0, t1);

    // The second seed's stream disappears before it registered: the third one is triggered.
    let out = sim.st.host_left(t2[0].0);
    let t3 = triggers(&out);
    assert_eq!(t3.len(), 1);
    assert!(t3[0].0 != t1 && t3[0].0 != t2[0].0);
    assert!(back_to_source(&out, a).is_none());

    // The third seed goes away too: no seed left, the waiting peer goes back to source.
    let out = sim.st.host_left(t3[0].0);
    assert!(triggers(&out).is_empty());
    assert_eq!(back_to_source(&out, a).as_deref(), Some(REASON_NO_SEED));
}

#[test]
fn failed_seed_is_skipped_even_when_it_comes_back() {
    let mut sim = Sim::new();
    let s1 = sim.announce("s1", true);
    let (a, out) = sim.register("peer-a", "host-a", false);
    assert_eq!(triggers(&out), vec![(s1, TASK.to_owned())]);
    let out = sim.st.host_left(s1);
    assert_eq!(back_to_source(&out, a).as_deref(), Some(REASON_NO_SEED));
    // s1 comes back; peer-b waits for peer-a, which fetches from the origin.
    let s1_again = sim.announce("s1", true);
    let (b, out) = sim.register("peer-b", "host-b", false);
    assert!(out.is_empty(), "{out:?}");
    // peer-a leaves before the size is known: somebody must fetch the task again. s1 is a
    // live seed host, but it failed this task, so it is not asked again: peer-b goes to the
    // origin itself.
    let out = sim.st.peer_left(a);
    assert!(
        triggers(&out).is_empty(),
        "the seed that failed this task was triggered again: {out:?}"
    );
    assert_eq!(back_to_source(&out, b).as_deref(), Some(REASON_NO_SEED));
    // For another task s1 is a seed like any other.
    let (_, out) = sim.register_task("task-2", "peer-c", "host-c", false, false);
    assert_eq!(triggers(&out), vec![(s1_again, "task-2".to_owned())]);
}

#[test]
fn no_seed_means_back_to_source_and_others_wait_for_it() {
    let mut sim = Sim::new();
    sim.announce("normal", false);
    let (a, out) = sim.register("peer-a", "host-a", false);
    assert_eq!(back_to_source(&out, a).as_deref(), Some(REASON_NO_SEED));
    assert!(triggers(&out).is_empty());

    let (b, out) = sim.register("peer-b", "host-b", false);
    assert!(out.is_empty(), "{out:?}");
    let out = sim.meta(a, 4 << 20);
    assert_eq!(parents_to(&out, b), vec!["host-a"]);
    assert!(parents_to(&out, a).is_empty());
}

#[test]
fn source_leaving_before_metadata_hands_over() {
    let mut sim = Sim::new();
    let (a, _) = sim.register("peer-a", "host-a", false);
    let (b, _) = sim.register("peer-b", "host-b", false);
    // a went back to source (no seed); it leaves before knowing the size.
    let out = sim.st.peer_left(a);
    assert_eq!(back_to_source(&out, b).as_deref(), Some(REASON_NO_SEED));
}

#[test]
fn parents_are_serving_peers_on_other_hosts() {
    let mut sim = Sim::new();
    let (src, _) = sim.register("src", "host-src", true);
    sim.meta(src, 8 << 20);
    // Registered after the metadata: gets the source peer only.
    let (a, out) = sim.register("a", "host-a", false);
    assert_eq!(parents_to(&out, a), vec!["host-src"]);
    // A peer on the same host as the only other servers' hosts... has a as a parent.
    let (same_host, out) = sim.register("same", "host-src", false);
    assert_eq!(parents_to(&out, same_host), vec!["host-a"]);
    // A peer alone with peers of its own host: back to source.
    let (lonely, out) = sim.register_task("t2", "x", "host-x", false, true);
    sim.meta(lonely, 1 << 20);
    let (y, out2) = sim.register_task("t2", "y", "host-x", false, false);
    assert!(out.is_empty());
    assert_eq!(back_to_source(&out2, y).as_deref(), Some(REASON_NO_PARENT));
}

#[test]
fn new_peers_are_pushed_to_peers_short_of_parents() {
    let mut sim = Sim::with(SchedulingConfig {
        candidate_parent_limit: 2,
        parent_limit: 2,
        ..SchedulingConfig::default()
    });
    let (src, _) = sim.register("src", "host-src", true);
    sim.meta(src, 8 << 20);
    let (a, out) = sim.register("a", "host-a", false);
    assert_eq!(parents_to(&out, a), vec!["host-src"]);
    // b takes src and a; b is pushed to a (which had one parent of two).
    let (b, out) = sim.register("b", "host-b", false);
    assert_eq!(parents_to(&out, b).len(), 2);
    assert_eq!(parents_to(&out, a), vec!["host-b"]);
    // Everyone has parent_limit parents now: c is pushed to nobody.
    let (c, out) = sim.register("c", "host-c", false);
    assert_eq!(parents_to(&out, c).len(), 2);
    assert!(out
        .iter()
        .all(|o| matches!(o, Output::Peer { peer, .. } if *peer == c)));
}

#[test]
fn a_peer_gets_several_parents_best_first() {
    // Only the pieces-ahead term counts, so that "best" is plain: more pieces is better.
    let mut sim = Sim::with(SchedulingConfig {
        candidate_parent_limit: 3,
        parent_limit: 8,
        filter_parent_limit: 16,
        normal_upload_slots: 16,
        weights: crate::config::EvaluatorWeights {
            load: 0.0,
            idc: 0.0,
            location: 0.0,
            host_type: 0.0,
            bandwidth: 0.0,
            pieces: 1.0,
        },
        ..SchedulingConfig::default()
    });
    let (src, _) = sim.register("src", "host-src", true);
    sim.meta(src, 16 << 20);
    // Four serving peers holding 1, 4, 8 and 16 of the 16 pieces, registered worst first.
    for n in 0..16 {
        sim.piece(src, n);
    }
    for (name, pieces) in [("one", 1), ("four", 4), ("eight", 8)] {
        let (k, _) = sim.register(name, &format!("host-{name}"), false);
        for n in 0..pieces {
            sim.piece(k, n);
        }
    }
    let (x, out) = sim.register("x", "host-x", false);
    // Several parents at once (candidate_parent_limit), the best first.
    assert_eq!(
        parents_to(&out, x),
        vec!["host-src", "host-eight", "host-four"],
        "{out:?}"
    );
}

#[test]
fn upload_slots_are_never_exceeded() {
    let mut sim = Sim::with(SchedulingConfig {
        normal_upload_slots: 2,
        seed_upload_slots: 3,
        ..SchedulingConfig::default()
    });
    let (src, _) = sim.register_seed_peer("src", "seed");
    sim.meta(src, 16 << 20);
    for i in 0..30 {
        sim.register(&format!("p{i}"), &format!("h{i}"), false);
    }
    for p in sim.st.peers.values() {
        let slots = if is_seed(&p.host) { 3 } else { 2 };
        assert!(
            p.children.len() <= slots,
            "{} has {}",
            p.host.id,
            p.children.len()
        );
    }
}

#[test]
fn failed_pieces_block_the_parent_for_that_peer_only() {
    let mut sim = Sim::new();
    let (src, _) = sim.register("src", "host-src", true);
    sim.meta(src, 8 << 20);
    let (a, _) = sim.register("a", "host-a", false);
    let (b, out) = sim.register("b", "host-b", false);
    assert!(parents_to(&out, b).contains(&"host-src".to_owned()));
    sim.send(
        b,
        Request::PieceFailed(PieceFailed {
            number: 0,
            parent_host_id: "host-src".to_owned(),
            reason: "corrupt".to_owned(),
        }),
    );
    assert!(!sim.st.peers[&b].parents.contains(&src));
    assert!(sim.st.peers[&a].parents.contains(&src));
    // A reschedule never brings the blocked parent back.
    let out = sim.send(b, Request::Reschedule(RescheduleRequest::default()));
    assert!(!parents_to(&out, b).contains(&"host-src".to_owned()));
}

#[test]
fn slow_parents_are_not_offered() {
    let mut sim = Sim::new();
    let (src, _) = sim.register("src", "host-src", true);
    sim.meta(src, 64 << 20);
    let (a, _) = sim.register("a", "host-a", false);
    for n in 0..5 {
        sim.send(
            a,
            Request::PieceFinished(PieceFinished {
                number: n,
                length: 1 << 20,
                parent_host_id: "host-src".to_owned(),
                cost_us: 1000,
                digest: Vec::new(),
                ..PieceFinished::default()
            }),
        );
    }
    let (b, out) = sim.register("b", "host-b", false);
    assert!(parents_to(&out, b).contains(&"host-src".to_owned()));
    // 100x slower than its mean: bad while the window is small.
    sim.send(
        a,
        Request::PieceFinished(PieceFinished {
            number: 9,
            length: 1 << 20,
            parent_host_id: "host-src".to_owned(),
            cost_us: 100_000,
            digest: Vec::new(),
            ..PieceFinished::default()
        }),
    );
    let (c, out) = sim.register("c", "host-c", false);
    assert!(!parents_to(&out, c).contains(&"host-src".to_owned()));
}

#[test]
fn reschedule_limit_sends_back_to_source() {
    let mut sim = Sim::with(SchedulingConfig {
        retry_limit: 2,
        ..SchedulingConfig::default()
    });
    let (src, _) = sim.register("src", "host-src", true);
    sim.meta(src, 8 << 20);
    let (a, _) = sim.register("a", "host-a", false);
    for _ in 0..2 {
        let out = sim.send(a, Request::Reschedule(RescheduleRequest::default()));
        assert!(back_to_source(&out, a).is_none());
        assert!(!parents_to(&out, a).is_empty());
    }
    let out = sim.send(a, Request::Reschedule(RescheduleRequest::default()));
    assert_eq!(back_to_source(&out, a).as_deref(), Some(REASON_RETRY_LIMIT));
}

#[test]
fn announced_task_serves_peers_and_shows_in_stat() {
    let mut sim = Sim::new();
    let host_key = sim.announce("cache-host", false);
    // A peer waits for the task (no seed: it would go back to source... so announce first).
    let k = PeerKey(sim.key());
    let req = AnnounceTaskRequest {
        task_id: TASK.to_owned(),
        peer_id: "imported".to_owned(),
        host: Some(host("cache-host", false)),
        metadata: Some(metadata(3 << 20)),
        piece_count: 3,
        piece_digests: Vec::new(),
        piece_crcs: Vec::new(),
    };
    let bad = AnnounceTaskRequest {
        piece_count: 4,
        piece_digests: Vec::new(),
        piece_crcs: Vec::new(),
        ..req.clone()
    };
    assert!(matches!(
        sim.st.announce_task(PeerKey(999), bad),
        Err(InvalidRequest::InvalidMetadata(_))
    ));
    assert!(sim.st.announce_task(k, req).unwrap().is_empty());
    let info = sim.st.stat_task(TASK).unwrap();
    assert_eq!(info.piece_count, 3);
    assert_eq!(info.peers.len(), 1);
    assert!(info.peers[0].done);
    assert_eq!(info.peers[0].finished_pieces, 3);
    // A one-piece-or-more task is served P2P in one round trip.
    let (a, out) = sim.register("a", "host-a", false);
    assert_eq!(parents_to(&out, a), vec!["cache-host"]);
    // Conflicting metadata is refused.
    let conflict = AnnounceTaskRequest {
        task_id: TASK.to_owned(),
        peer_id: "other".to_owned(),
        host: Some(host("h2", false)),
        metadata: Some(metadata(5 << 20)),
        piece_count: 5,
        piece_digests: Vec::new(),
        piece_crcs: Vec::new(),
    };
    assert_eq!(
        sim.st.announce_task(PeerKey(1000), conflict),
        Err(InvalidRequest::ConflictingMetadata)
    );
    // The host leaves: the announced peer is withdrawn.
    sim.st.host_left(host_key);
    let info = sim.st.stat_task(TASK).unwrap();
    assert_eq!(info.peers.len(), 1);
    assert_eq!(info.peers[0].peer_id, "a");
}

#[test]
fn announced_task_wakes_waiting_peers() {
    let mut sim = Sim::new();
    let _seed = sim.announce("seed-a", true);
    let (a, _) = sim.register("a", "host-a", false);
    let out = sim
        .st
        .announce_task(
            PeerKey(500),
            AnnounceTaskRequest {
                task_id: TASK.to_owned(),
                peer_id: "imported".to_owned(),
                host: Some(host("cache-host", false)),
                metadata: Some(metadata(1 << 20)),
                piece_count: 1,
                piece_digests: Vec::new(),
                piece_crcs: Vec::new(),
            },
        )
        .unwrap();
    assert_eq!(parents_to(&out, a), vec!["cache-host"]);
}

#[test]
fn reschedule_excludes_bad_parents_and_prefers_new_ones() {
    let mut sim = Sim::with(SchedulingConfig {
        candidate_parent_limit: 2,
        ..SchedulingConfig::default()
    });
    let (src, _) = sim.register("src", "host-src", true);
    sim.meta(src, 8 << 20);
    for i in 0..3 {
        let (k, _) = sim.register(&format!("p{i}"), &format!("h{i}"), false);
        for n in 0..(3 - i) {
            sim.piece(k, n);
        }
    }
    let (c, out) = sim.register("child", "h-child", false);
    let first = parents_to(&out, c);
    assert_eq!(first.len(), 2);
    let out = sim.send(
        c,
        Request::Reschedule(RescheduleRequest {
            bad_parent_host_ids: vec![first[0].clone()],
            reason: "slow".to_owned(),
        }),
    );
    let second = parents_to(&out, c);
    assert_eq!(second.len(), 2, "{second:?}");
    assert!(!second.contains(&first[0]), "{second:?}");
    // A fresh parent comes before the one already given.
    assert!(!first.contains(&second[0]), "{first:?} then {second:?}");

    // Everyone bad: back to source (within budget).
    let all: Vec<String> = ["host-src", "h0", "h1", "h2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = sim.send(
        c,
        Request::Reschedule(RescheduleRequest {
            bad_parent_host_ids: all,
            reason: "all bad".to_owned(),
        }),
    );
    assert!(parents_to(&out, c).is_empty());
    assert_eq!(back_to_source(&out, c).as_deref(), Some(REASON_NO_PARENT));
}

#[test]
fn back_to_source_budget_then_wait_for_a_parent() {
    let mut sim = Sim::with(SchedulingConfig {
        back_to_source_limit: 1,
        ..SchedulingConfig::default()
    });
    let (src, _) = sim.register("src", "shared", true);
    sim.meta(src, 8 << 20);
    // Same host as the only holder: no parent; the first goes back to source...
    let (b, out) = sim.register("b", "shared", false);
    assert_eq!(back_to_source(&out, b).as_deref(), Some(REASON_NO_PARENT));
    // ...the second waits (budget spent).
    let (c, out) = sim.register("c", "shared", false);
    assert!(out.is_empty(), "{out:?}");
    // A peer elsewhere is scheduled: it can serve, so c gets it at once.
    let (d, out) = sim.register("d", "other", false);
    // src and b (a source peer now): both on "shared".
    assert_eq!(parents_to(&out, d)[..2], ["shared", "shared"]);
    assert_eq!(parents_to(&out, c), vec!["other"]);
}

#[test]
fn out_of_range_piece_numbers_are_ignored() {
    let mut sim = Sim::new();
    let (src, _) = sim.register("src", "host-src", true);
    // Before the size is known, only absurd numbers are refused.
    assert!(sim.piece(src, u32::MAX).is_empty());
    sim.piece(src, 5);
    sim.meta(src, 4 << 20); // 4 pieces: piece 5 is dropped.
    assert_eq!(sim.st.stat_task(TASK).unwrap().peers[0].finished_pieces, 0);
    for n in [4, 5, u32::MAX] {
        assert!(sim.piece(src, n).is_empty());
    }
    sim.piece(src, 3);
    let info = sim.st.stat_task(TASK).unwrap();
    assert_eq!(info.piece_count, 4);
    assert_eq!(info.peers[0].finished_pieces, 1);
}

#[test]
fn invalid_metadata_is_ignored_and_first_metadata_wins() {
    let mut sim = Sim::new();
    let (src, _) = sim.register("src", "host-src", true);
    let (w, _) = sim.register("w", "host-w", false);
    let out = sim.send(
        src,
        Request::TaskMetadata(TaskMetadata {
            content_length: 10,
            piece_length: 0,
        }),
    );
    assert!(out.is_empty());
    assert!(sim.st.stat_task(TASK).unwrap().metadata.is_none());
    let out = sim.meta(src, 2 << 20);
    assert_eq!(parents_to(&out, w), vec!["host-src"]);
    assert!(sim.meta(src, 9 << 20).is_empty());
    assert_eq!(sim.st.stat_task(TASK).unwrap().piece_count, 2);
}

#[test]
fn register_validation_and_replacement() {
    let mut sim = Sim::new();
    let bad = |task: &str, peer: &str, host: Option<Host>| RegisterPeer {
        task_id: task.to_owned(),
        peer_id: peer.to_owned(),
        host,
        ..RegisterPeer::default()
    };
    let k = PeerKey(1000);
    assert_eq!(
        sim.st
            .register_peer(k, bad("", "p", Some(host("h", false)))),
        Err(InvalidRequest::MissingTaskId)
    );
    assert_eq!(
        sim.st
            .register_peer(k, bad("t", "", Some(host("h", false)))),
        Err(InvalidRequest::MissingPeerId)
    );
    assert_eq!(
        sim.st.register_peer(k, bad("t", "p", None)),
        Err(InvalidRequest::MissingHost)
    );
    assert_eq!(
        sim.st
            .register_peer(k, bad("t", "p", Some(host("", false)))),
        Err(InvalidRequest::MissingHost)
    );
    assert_eq!(sim.st.peer_count(), 0);
    assert!(sim.st.host_announced(HostKey(1), host("", true)).is_err());

    let (old, _) = sim.register("same", "host-a", true);
    let (new, out) = sim.register("same", "host-a", true);
    assert!(out.contains(&Output::ClosePeer {
        peer: old,
        reason: "replaced by a newer registration of the same peer".to_owned()
    }));
    assert!(!sim.st.has_peer(old) && sim.st.has_peer(new));
    assert_eq!(sim.st.stat_task(TASK).unwrap().peers.len(), 1);
}

#[test]
fn tasks_are_forgotten_when_their_last_peer_leaves() {
    let mut sim = Sim::new();
    let (a, _) = sim.register("a", "host-a", true);
    let (b, _) = sim.register_task("other", "b", "host-b", false, true);
    sim.send(a, Request::Finished(PeerFinished::default()));
    assert_eq!(sim.st.task_count(), 2);
    sim.st.peer_left(a);
    assert!(sim.st.stat_task(TASK).is_none());
    sim.send(
        b,
        Request::Failed(PeerFailed {
            reason: "x".to_owned(),
        }),
    );
    assert_eq!(sim.st.task_count(), 0);
    assert_eq!(sim.st.peer_count(), 0);
    // Messages for forgotten peers are ignored.
    assert!(sim.piece(b, 0).is_empty());
    assert!(sim.st.peer_left(b).is_empty());
}

#[test]
fn leaving_parents_free_slots_for_new_children() {
    let mut sim = Sim::with(SchedulingConfig {
        seed_upload_slots: 1,
        normal_upload_slots: 1,
        candidate_parent_limit: 1,
        ..SchedulingConfig::default()
    });
    let (src, _) = sim.register_seed_peer("src", "seed");
    sim.meta(src, 8 << 20);
    let (a, out) = sim.register("a", "host-a", false);
    assert_eq!(parents_to(&out, a), vec!["seed"]);
    let (b, out) = sim.register("b", "host-b", false);
    assert_eq!(parents_to(&out, b), vec!["host-a"], "seed is full");
    // a finishes: the seed's slot is free again.
    sim.send(a, Request::Finished(PeerFinished::default()));
    assert!(sim.st.peers[&src].children.is_empty());
    let (c, out) = sim.register("c", "host-c", false);
    assert_eq!(parents_to(&out, c), vec!["seed"]);
    // b's parent a leaves: a's children lose the edge.
    sim.st.peer_left(a);
    assert!(!sim.st.peers[&b].parents.contains(&a));
    assert!(sim.st.peers.values().all(|p| !p.children.contains(&a)));
}

/// Whether the parent edges over all peers form a DAG (Kahn's algorithm).
fn acyclic(st: &SchedulerState) -> bool {
    let mut indegree: HashMap<PeerKey, usize> = st
        .peers
        .iter()
        .map(|(k, p)| (*k, p.parents.len()))
        .collect();
    let mut ready: Vec<PeerKey> = indegree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(k, _)| *k)
        .collect();
    let mut seen = 0;
    while let Some(k) = ready.pop() {
        seen += 1;
        for c in &st.peers[&k].children {
            if let Some(d) = indegree.get_mut(c) {
                *d -= 1;
                if *d == 0 {
                    ready.push(*c);
                }
            }
        }
    }
    seen == st.peers.len()
}

/// One step of the random walk below.
#[derive(Debug, Clone)]
enum Op {
    Announce(u8, bool),
    HostLeft(u8),
    Register(u8, u8, bool),
    Piece(u8, u32),
    Meta(u8, u64, u64),
    Reschedule(u8, u8),
    Finished(u8),
    Failed(u8),
    Left(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4, any::<bool>()).prop_map(|(h, s)| Op::Announce(h, s)),
        (0u8..8).prop_map(Op::HostLeft),
        (0u8..6, 0u8..4, any::<bool>()).prop_map(|(p, h, b)| Op::Register(p, h, b)),
        (0u8..16, prop_oneof![0u32..12, any::<u32>()]).prop_map(|(p, n)| Op::Piece(p, n)),
        (
            0u8..16,
            0u64..(64 << 20),
            prop_oneof![Just(1u64 << 20), any::<u64>()]
        )
            .prop_map(|(p, c, l)| Op::Meta(p, c, l)),
        (0u8..16, 0u8..4).prop_map(|(p, h)| Op::Reschedule(p, h)),
        (0u8..16).prop_map(Op::Finished),
        (0u8..16).prop_map(Op::Failed),
        (0u8..16).prop_map(Op::Left),
    ]
}

proptest! {
    /// Whatever peers do, the state never panics, never offers a peer a parent on its own
    /// host or one it called bad, never exceeds the limits, and sends metadata with parents.
    #[test]
    fn random_swarms_keep_invariants(ops in proptest::collection::vec(op(), 1..80), dag in any::<bool>()) {
        let config = SchedulingConfig { candidate_parent_limit: 2, parent_limit: 3, back_to_source_limit: 2, dag, ..SchedulingConfig::default() };
        let mut sim = Sim::with(config.clone());
        let mut hosts: Vec<HostKey> = Vec::new();
        let mut peers: Vec<PeerKey> = Vec::new();
        let mut bad: HashMap<PeerKey, HashSet<String>> = HashMap::default();
        let mut host_of: HashMap<PeerKey, String> = HashMap::default();
        let pick = |v: &Vec<PeerKey>, i: u8| v.get(usize::from(i) % v.len().max(1)).copied();
        for op in ops {
            let out = match op {
                Op::Announce(h, seed) => { hosts.push(sim.announce(&format!("h{h}"), seed)); vec![] }
                Op::HostLeft(i) => match hosts.get(usize::from(i) % hosts.len().max(1)) {
                    Some(k) => sim.st.host_left(*k),
                    None => vec![],
                },
                Op::Register(p, h, bts) => {
                    let (k, out) = sim.register(&format!("p{p}"), &format!("h{h}"), bts);
                    peers.push(k);
                    host_of.insert(k, format!("h{h}"));
                    out
                }
                Op::Piece(i, n) => match pick(&peers, i) { Some(k) => sim.piece(k, n), None => vec![] },
                Op::Meta(i, c, l) => match pick(&peers, i) {
                    Some(k) => sim.send(k, Request::TaskMetadata(TaskMetadata { content_length: c, piece_length: l })),
                    None => vec![],
                },
                Op::Reschedule(i, h) => match pick(&peers, i) {
                    Some(k) => {
                        bad.entry(k).or_default().insert(format!("h{h}"));
                        sim.send(k, Request::Reschedule(RescheduleRequest { bad_parent_host_ids: vec![format!("h{h}")], reason: String::new() }))
                    }
                    None => vec![],
                },
                Op::Finished(i) => match pick(&peers, i) { Some(k) => sim.send(k, Request::Finished(PeerFinished::default())), None => vec![] },
                Op::Failed(i) => match pick(&peers, i) { Some(k) => sim.send(k, Request::Failed(PeerFailed::default())), None => vec![] },
                Op::Left(i) => match pick(&peers, i) { Some(k) => sim.st.peer_left(k), None => vec![] },
            };
            for o in &out {
                if let Output::Peer { peer, response: AnnouncePeerResponse { response: Some(announce_peer_response::Response::CandidateParents(c)) } } = o {
                    prop_assert!(c.metadata.is_some());
                    prop_assert!(!c.parents.is_empty());
                    prop_assert!(c.parents.len() <= config.candidate_parent_limit.max(config.parent_limit));
                    for p in &c.parents {
                        prop_assert_ne!(Some(&p.host_id), host_of.get(peer));
                        prop_assert!(!bad.get(peer).is_some_and(|b| b.contains(&p.host_id)));
                    }
                }
            }
            for (k, p) in &sim.st.peers {
                prop_assert!(p.parents.len() <= config.parent_limit.max(config.candidate_parent_limit) + config.candidate_parent_limit);
                prop_assert!(p.children.len() <= sim.st.slots(p));
                for c in &p.children {
                    prop_assert!(sim.st.peers[c].parents.contains(k), "edge bookkeeping");
                }
                for q in &p.parents {
                    prop_assert!(sim.st.peers[q].children.contains(k), "edge bookkeeping");
                }
            }
            if dag {
                prop_assert!(acyclic(&sim.st), "a parent edge closed a cycle");
            }
            for t in sim.st.tasks.values() {
                prop_assert!(!t.peers.is_empty());
                prop_assert!(t.peers.iter().all(|k| sim.st.peers.contains_key(k)));
            }
        }
    }
}

fn source() -> TaskSource {
    TaskSource {
        url: "http://origin/preheat".to_owned(),
        headers: vec![],
        digest: String::new(),
    }
}

#[test]
fn preheat_triggers_a_seed_and_is_done_when_the_seed_finished() {
    let mut sim = Sim::new();
    let seed = sim.announce("seed-a", true);
    sim.announce("normal", false);
    let (status, out) = sim.st.preheat(TASK, source(), 0).unwrap();
    assert_eq!(status, PreheatStatus::Pending);
    assert_eq!(triggers(&out), vec![(seed, TASK.to_owned())]);
    // The trigger carries the preheat's source.
    let url = out.iter().find_map(|o| match o {
        Output::Host {
            command:
                HostCommand {
                    command: Some(host_command::Command::DownloadTask(d)),
                },
            ..
        } => d.source.as_ref().map(|s| s.url.clone()),
        _ => None,
    });
    assert_eq!(url.as_deref(), Some("http://origin/preheat"));
    // A second preheat of the same task does not trigger again.
    let (status, out) = sim.st.preheat(TASK, source(), 0).unwrap();
    assert_eq!(status, PreheatStatus::Pending);
    assert!(triggers(&out).is_empty());

    let (s, _) = sim.register_seed_peer("seed-peer", "seed-a");
    assert_eq!(sim.st.preheat_status(TASK), PreheatStatus::Pending);
    sim.meta(s, 3 << 20);
    for n in 0..3 {
        sim.piece(s, n);
    }
    assert_eq!(sim.st.preheat_status(TASK), PreheatStatus::Pending);
    sim.send(
        s,
        Request::Finished(PeerFinished {
            content_length: 3 << 20,
        }),
    );
    assert_eq!(sim.st.preheat_status(TASK), PreheatStatus::Done);
    sim.st.preheat_finished(TASK);
    sim.st.preheat_finished(TASK);
    // The seed's peer keeps the task; a peer asking now gets the seed at once.
    let info = sim.st.stat_task(TASK).unwrap();
    assert!(info.peers.iter().any(|p| p.done && p.host_id == "seed-a"));
    let (a, out) = sim.register("peer-a", "host-a", false);
    assert_eq!(parents_to(&out, a), vec!["seed-a"]);
    assert!(triggers(&out).is_empty());
}

#[test]
fn preheat_without_a_seed_fails_and_leaves_nothing_behind() {
    let mut sim = Sim::new();
    sim.announce("normal", false);
    let (status, out) = sim.st.preheat(TASK, source(), 0).unwrap();
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(status, PreheatStatus::Failed(REASON_NO_SEED.to_owned()));
    sim.st.preheat_finished(TASK);
    assert!(sim.st.stat_task(TASK).is_none());
    assert_eq!(sim.st.task_count(), 0);
    assert!(sim.st.preheat(String::new().as_str(), source(), 0).is_err());
}

#[test]
fn preheat_moves_to_the_next_seed_and_fails_when_none_is_left() {
    let mut sim = Sim::new();
    let hosts: Vec<(HostKey, &str)> = ["s1", "s2"]
        .iter()
        .map(|id| (sim.announce(id, true), *id))
        .collect();
    let name = |k: HostKey| hosts.iter().find(|(h, _)| *h == k).unwrap().1;
    let (_, out) = sim.st.preheat(TASK, source(), 0).unwrap();
    let first = triggers(&out)[0].0;
    // The first seed registers and fails: the task (without any other peer) is kept and the
    // other seed is triggered.
    let (s, _) = sim.register_task(TASK, "seed-peer-1", name(first), true, true);
    let out = sim.send(
        s,
        Request::Failed(PeerFailed {
            reason: "origin said no".into(),
        }),
    );
    let second = triggers(&out);
    assert_eq!(second.len(), 1);
    assert_ne!(second[0].0, first);
    assert_eq!(sim.st.preheat_status(TASK), PreheatStatus::Pending);
    // The second seed's host leaves before registering: nobody is left.
    let out = sim.st.host_left(second[0].0);
    assert!(triggers(&out).is_empty());
    assert!(matches!(
        sim.st.preheat_status(TASK),
        PreheatStatus::Failed(_)
    ));
    sim.st.preheat_finished(TASK);
    assert_eq!(sim.st.task_count(), 0);
}

#[test]
fn preheat_of_a_task_a_peer_holds_is_done_at_once() {
    let mut sim = Sim::new();
    let (src, _) = sim.register("src", "host-src", true);
    sim.meta(src, 1 << 20);
    sim.send(
        src,
        Request::Finished(PeerFinished {
            content_length: 1 << 20,
        }),
    );
    let (status, out) = sim.st.preheat(TASK, source(), 0).unwrap();
    assert_eq!(status, PreheatStatus::Done);
    assert!(out.is_empty());
    sim.st.preheat_finished(TASK);
    assert!(sim.st.stat_task(TASK).is_some());
}

#[test]
fn set_config_changes_later_decisions() {
    let mut sim = Sim::new();
    let (src, _) = sim.register("src", "host-src", true);
    sim.meta(src, 4 << 20);
    let mut config = sim.st.config().clone();
    config.candidate_parent_limit = 1;
    config.back_to_source_limit = 1;
    sim.st.set_config(config.clone());
    assert_eq!(sim.st.config(), &config);
    let (a, out) = sim.register("a", "host-a", false);
    assert_eq!(parents_to(&out, a).len(), 1);
    let (b, out) = sim.register("b", "host-b", false);
    assert_eq!(parents_to(&out, b).len(), 1);
}

#[test]
fn a_triggered_seed_holding_the_task_announces_it() {
    let mut sim = Sim::new();
    let seed = sim.announce("seed-a", true);
    let (status, out) = sim.st.preheat(TASK, source(), 0).unwrap();
    assert_eq!(status, PreheatStatus::Pending);
    assert_eq!(triggers(&out), vec![(seed, TASK.to_owned())]);
    let k = PeerKey(sim.key());
    sim.st
        .announce_task(
            k,
            AnnounceTaskRequest {
                task_id: TASK.to_owned(),
                peer_id: "seed-held".to_owned(),
                host: Some(host("seed-a", true)),
                metadata: Some(metadata(2 << 20)),
                piece_count: 2,
                piece_digests: Vec::new(),
                piece_crcs: Vec::new(),
            },
        )
        .unwrap();
    assert_eq!(sim.st.preheat_status(TASK), PreheatStatus::Done);
    sim.st.preheat_finished(TASK);
    // The trigger is answered: when the seed's host leaves, nobody is triggered again.
    let out = sim.st.host_left(seed);
    assert!(triggers(&out).is_empty(), "{out:?}");
}

#[test]
fn a_slow_parent_is_offered_when_nobody_else_can_serve() {
    let mut sim = Sim::new();
    let (src, _) = sim.register("src", "host-src", true);
    sim.meta(src, 64 << 20);
    sim.send(
        src,
        Request::Finished(PeerFinished {
            content_length: 64 << 20,
        }),
    );
    let (a, _) = sim.register("a", "host-a", false);
    for (n, cost_us) in [(0, 1000), (1, 1000), (2, 100_000)] {
        sim.send(
            a,
            Request::PieceFinished(PieceFinished {
                number: n,
                length: 1 << 20,
                parent_host_id: "host-src".to_owned(),
                cost_us,
                digest: Vec::new(),
                ..PieceFinished::default()
            }),
        );
    }
    sim.send(a, Request::Failed(PeerFailed::default()));
    // host-src is flagged slow, but it is the only holder: better than the origin.
    let (b, out) = sim.register("b", "host-b", false);
    assert_eq!(parents_to(&out, b), vec!["host-src"]);
    assert!(back_to_source(&out, b).is_none());
}

#[test]
fn a_short_last_piece_does_not_flag_its_parent_slow() {
    let mut sim = Sim::new();
    let (src, _) = sim.register("src", "host-src", true);
    sim.meta(src, (3 << 20) + 333);
    let (a, _) = sim.register("a", "host-a", false);
    for (n, length, cost_us) in [(0, 1 << 20, 200), (1, 1 << 20, 200), (3, 333, 300)] {
        sim.send(
            a,
            Request::PieceFinished(PieceFinished {
                number: n,
                length,
                parent_host_id: "host-src".to_owned(),
                cost_us,
                digest: Vec::new(),
                ..PieceFinished::default()
            }),
        );
    }
    let (b, out) = sim.register("b", "host-b", false);
    assert!(parents_to(&out, b).contains(&"host-src".to_owned()));
    let stats = sim
        .st
        .host_stats
        .by_id("host-src")
        .expect("host-src has measurements");
    assert!(!stats.costs.is_slow());
}

#[test]
fn peers_short_of_parents_are_topped_up_as_they_progress() {
    let limit = EAGER_TOP_UP_BELOW + 2;
    let mut sim = Sim::with(SchedulingConfig {
        candidate_parent_limit: 1,
        parent_limit: limit,
        ..SchedulingConfig::default()
    });
    let (src, _) = sim.register("src", "host-src", true);
    sim.meta(src, 64 << 20);
    for i in 0..limit + 2 {
        sim.register(&format!("s{i}"), &format!("host-s{i}"), true);
    }
    // a registers last: nobody is left to push to it, so it starts with one parent.
    let (a, out) = sim.register("a", "host-a", false);
    let mut got = parents_to(&out, a);
    assert_eq!(got.len(), 1);
    // Below EAGER_TOP_UP_BELOW parents, every piece brings one more.
    let mut n = 0;
    while got.len() < EAGER_TOP_UP_BELOW {
        let new = parents_to(&sim.piece(a, n), a);
        assert_eq!(
            new.len(),
            1,
            "piece {n} with {} parents: {new:?}",
            got.len()
        );
        assert!(!got.contains(&new[0]));
        got.extend(new);
        n += 1;
    }
    // From there, one more every TOP_UP_EVERY pieces.
    while !(n + 1).is_multiple_of(TOP_UP_EVERY) {
        let out = sim.piece(a, n);
        assert!(parents_to(&out, a).is_empty(), "top-up at piece {n}");
        n += 1;
    }
    let second = parents_to(&sim.piece(a, n), a);
    assert_eq!(second.len(), 1, "topped up at piece {n}");
    assert!(!got.contains(&second[0]));
    got.extend(second);
    n += 1;
    for _ in 0..TOP_UP_EVERY {
        got.extend(parents_to(&sim.piece(a, n), a));
        n += 1;
    }
    assert_eq!(got.len(), limit);
    // At parent_limit it is not topped up any more.
    let mut more = Vec::new();
    for _ in 0..2 * TOP_UP_EVERY {
        more.extend(parents_to(&sim.piece(a, n), a));
        n += 1;
    }
    assert!(more.is_empty(), "{more:?}");
}

/// Interned hosts: one entry per live id, shared by its references, gone (measurements
/// included) with the last one; a freed index is reused by the next new host.
#[test]
fn host_table_counts_references_and_reuses_slots() {
    let mut t = HostTable::default();
    let a = t.acquire("a");
    assert_eq!(t.acquire("a"), a);
    let b = t.acquire("b");
    assert_ne!(a, b);
    if let Some(s) = t.by_id_mut("a") {
        s.costs
            .record(1 << 20, 1, &crate::config::BadParentConfig::default());
    }
    assert!(t.get(a).is_some_and(|s| s.costs.rate().is_some()));
    t.release(a);
    assert!(t.by_id("a").is_some_and(|s| s.refs == 1));
    t.release(a);
    assert!(t.by_id("a").is_none());
    assert!(t.get(a).is_none());
    let c = t.acquire("c");
    assert_eq!(c, a, "the freed slot is reused");
    assert!(t
        .get(c)
        .is_some_and(|s| s.id == "c" && s.costs.rate().is_none()));
    assert!(t.by_id("b").is_some_and(|s| s.refs == 1));
}

/// Pieces of the partial `NeedBackToSource` messages sent to `peer` in `out`.
fn origin_pieces_to(out: &[Output], peer: PeerKey) -> Vec<u32> {
    out.iter()
        .filter_map(|o| match o {
            Output::Peer {
                peer: p,
                response:
                    AnnouncePeerResponse {
                        response: Some(announce_peer_response::Response::NeedBackToSource(n)),
                    },
            } if *p == peer => {
                assert_eq!(n.reason, REASON_PIECES_LOST);
                assert!(
                    !n.pieces.is_empty(),
                    "a full back-to-source where pieces were expected"
                );
                Some(n.pieces.clone())
            }
            _ => None,
        })
        .flatten()
        .collect()
}

/// A seed fetching an 8-piece task has pieces 0..=3, a has 0 and 1, b has 2; then the seed
/// host dies (its host stream and its peer stream close).
fn swarm_losing_its_seed(sim: &mut Sim, second_seed: bool) -> (PeerKey, PeerKey, Vec<Output>) {
    let seed = sim.announce("seed-a", true);
    let (a, _) = sim.register("peer-a", "host-a", false);
    let (b, _) = sim.register("peer-b", "host-b", false);
    let (s, _) = sim.register_seed_peer("seed-peer", "seed-a");
    sim.meta(s, 8 << 20);
    for n in 0..4 {
        sim.piece(s, n);
    }
    sim.piece(a, 0);
    sim.piece(a, 1);
    sim.piece(b, 2);
    if second_seed {
        sim.announce("seed-b", true);
    }
    let mut out = sim.st.host_left(seed);
    out.extend(sim.st.peer_left(s));
    (a, b, out)
}

#[test]
fn lost_pieces_go_to_peers_when_the_seed_peer_stream_closes_before_its_host_stream() {
    // A killed seed: its peer stream may close first (the seed host still looks live and is
    // triggered again), then its host stream.
    let mut sim = Sim::new();
    let seed = sim.announce("seed-a", true);
    let (a, _) = sim.register("peer-a", "host-a", false);
    let (s, _) = sim.register_seed_peer("seed-peer", "seed-a");
    sim.meta(s, 4 << 20);
    for n in 0..4 {
        sim.piece(s, n);
    }
    sim.send(
        s,
        Request::Finished(PeerFinished {
            content_length: 4 << 20,
        }),
    );
    sim.piece(a, 0);
    let out = sim.st.peer_left(s);
    assert_eq!(triggers(&out), vec![(seed, TASK.to_owned())]);
    let out = sim.st.host_left(seed);
    assert_eq!(origin_pieces_to(&out, a), vec![1, 2, 3]);
}

#[test]
fn lost_pieces_are_fetched_from_the_origin_once_when_no_seed_is_left() {
    let mut sim = Sim::new();
    let (a, b, out) = swarm_losing_its_seed(&mut sim, false);
    assert!(triggers(&out).is_empty());
    let got_a = origin_pieces_to(&out, a);
    let got_b = origin_pieces_to(&out, b);
    // Only the pieces no live peer has, each to one peer only.
    let mut all: Vec<u32> = got_a.iter().chain(&got_b).copied().collect();
    all.sort();
    assert_eq!(all, vec![3, 4, 5, 6, 7], "a: {got_a:?}, b: {got_b:?}");
    assert!(!got_a.is_empty() && !got_b.is_empty());

    // Nothing new is lost: a third peer leaving without pieces sends nobody to the origin.
    let (c, _) = sim.register("peer-c", "host-c", false);
    let out = sim.st.peer_left(c);
    assert!(origin_pieces_to(&out, a).is_empty() && origin_pieces_to(&out, b).is_empty());

    // a leaves before fetching its run: its run and the pieces only it held go to b.
    let out = sim.st.peer_left(a);
    let mut again = origin_pieces_to(&out, b);
    again.sort();
    let mut expected: Vec<u32> = got_a.iter().copied().chain([0, 1]).collect();
    expected.sort();
    assert_eq!(again, expected);
}

#[test]
fn lost_pieces_trigger_another_live_seed_first() {
    let mut sim = Sim::new();
    let (a, b, out) = swarm_losing_its_seed(&mut sim, true);
    assert_eq!(triggers(&out).len(), 1, "{out:?}");
    assert!(back_to_source(&out, a).is_none() && back_to_source(&out, b).is_none());
}

#[test]
fn nothing_is_fetched_again_while_live_peers_hold_every_piece() {
    let mut sim = Sim::new();
    let seed = sim.announce("seed-a", true);
    let (a, _) = sim.register("peer-a", "host-a", false);
    let (s, _) = sim.register_seed_peer("seed-peer", "seed-a");
    sim.meta(s, 2 << 20);
    sim.piece(s, 0);
    sim.piece(s, 1);
    sim.piece(a, 0);
    sim.piece(a, 1);
    let mut out = sim.st.host_left(seed);
    out.extend(sim.st.peer_left(s));
    assert!(back_to_source(&out, a).is_none(), "{out:?}");
    assert!(triggers(&out).is_empty());
}

#[test]
fn a_running_download_registered_again_is_not_a_new_request_for_a_source() {
    // A restarted scheduler: a seed host is live, and the first thing it hears of the task
    // is a running download registering again with the task's size.
    let mut sim = Sim::new();
    sim.announce("seed-a", true);
    let a = PeerKey(sim.key());
    let out = sim
        .st
        .register_peer(
            a,
            RegisterPeer {
                task_id: TASK.to_owned(),
                peer_id: "peer-a".to_owned(),
                host: Some(host("host-a", false)),
                resume: Some(metadata(10 << 20)),
                ..RegisterPeer::default()
            },
        )
        .unwrap();
    assert!(triggers(&out).is_empty(), "seed triggered: {out:?}");
    assert_eq!(back_to_source(&out, a), None, "sent to the origin: {out:?}");
    for n in 0..4 {
        sim.piece(a, n);
    }
    // It serves at once: a new peer gets it as a parent (the size came with the
    // registration), and still nobody is sent to a source.
    let (b, out) = sim.register("peer-b", "host-b", false);
    assert_eq!(parents_to(&out, b), vec!["host-a"]);
    assert!(triggers(&out).is_empty(), "seed triggered: {out:?}");
}

#[test]
fn pieces_only_a_bad_parent_holds_are_fetched_from_the_origin_after_a_reschedule() {
    // The seed holds everything and stalls without closing (still live here); peer-b
    // holds piece 5. peer-a reports the seed bad: it is sent to the origin for the pieces
    // nobody else has, not for piece 5 and not for those it holds.
    let mut sim = Sim::new();
    sim.announce("seed-a", true);
    let (a, _) = sim.register("peer-a", "host-a", false);
    let (s, _) = sim.register_seed_peer("seed-peer", "seed-a");
    sim.meta(s, 8 << 20);
    let (b, _) = sim.register("peer-b", "host-b", false);
    for n in 0..8 {
        sim.piece(s, n);
    }
    for n in 0..3 {
        sim.piece(a, n);
    }
    sim.piece(b, 5);
    let out = sim.send(
        a,
        Request::Reschedule(RescheduleRequest {
            bad_parent_host_ids: vec!["seed-a".to_owned()],
            reason: "no piece for 30s".to_owned(),
        }),
    );
    let sent_to = |who: PeerKey| -> Vec<u32> {
        out.iter()
            .filter_map(|o| match o {
                Output::Peer {
                    peer,
                    response:
                        AnnouncePeerResponse {
                            response: Some(announce_peer_response::Response::NeedBackToSource(n)),
                        },
                } if *peer == who => Some(n.pieces.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    };
    // Split between the reporting peer (first) and the other downloading peer.
    assert_eq!(sent_to(a), vec![3, 4], "{out:?}");
    assert_eq!(sent_to(b), vec![6, 7], "{out:?}");
    // Asking again does not send them twice.
    let out = sim.send(
        a,
        Request::Reschedule(RescheduleRequest {
            bad_parent_host_ids: vec!["seed-a".to_owned()],
            reason: "again".to_owned(),
        }),
    );
    assert_eq!(back_to_source(&out, a), None, "{out:?}");
    assert_eq!(back_to_source(&out, b), None, "{out:?}");
}

#[test]
fn scoped_preheat_picks_hosts_and_sends_the_others_to_peers() {
    let mut sim = Sim::new();
    // IPs follow the id's length: s1/s2 10.0.0.2, p-a .3, p-bb .4, p-ccc .5.
    let keys: Vec<(HostKey, &str)> = [
        ("s1", true),
        ("s2", true),
        ("p-a", false),
        ("p-bb", false),
        ("p-ccc", false),
    ]
    .iter()
    .map(|(id, seed)| (sim.announce(id, *seed), *id))
    .collect();
    let (_, out) = sim.st.preheat(TASK, source(), 0).unwrap();
    let trigger = triggers(&out)[0].0;
    let holder = keys.iter().find(|(k, _)| *k == trigger).unwrap().1;
    let (k, _) = sim.register_task(TASK, "seed-peer", holder, true, true);
    sim.meta(k, 1 << 20);
    sim.send(
        k,
        Request::Finished(PeerFinished {
            content_length: 1 << 20,
        }),
    );
    assert_eq!(sim.st.preheat_status(TASK), PreheatStatus::Done);
    assert!(sim.st.host_holds(TASK, holder));
    assert!(!sim.st.host_holds(TASK, "p-a"));
    let ids = |hosts: Vec<Host>| hosts.into_iter().map(|h| h.id).collect::<Vec<_>>();
    let other_seed = if holder == "s1" { "s2" } else { "s1" };
    // Holders first, then by host id.
    assert_eq!(
        ids(sim.st.preheat_hosts(TASK, true, &[], 0, 0)),
        [holder, other_seed]
    );
    let all = ids(sim.st.preheat_hosts(TASK, false, &[], 0, 0));
    assert_eq!(all.len(), 5);
    assert_eq!(all[0], holder);
    assert_eq!(ids(sim.st.preheat_hosts(TASK, false, &[], 2, 0)), all[..2]);
    // 50 % of 5 rounds up to 3; 1 % is still one host; count wins over percentage.
    assert_eq!(sim.st.preheat_hosts(TASK, false, &[], 0, 50).len(), 3);
    assert_eq!(sim.st.preheat_hosts(TASK, false, &[], 0, 1).len(), 1);
    assert_eq!(sim.st.preheat_hosts(TASK, false, &[], 4, 1).len(), 4);
    // IPs pick exactly their hosts, before count.
    assert_eq!(
        ids(sim
            .st
            .preheat_hosts(TASK, false, &["10.0.0.4".into()], 1, 0)),
        ["p-bb"]
    );
    assert!(sim
        .st
        .preheat_hosts(TASK, true, &["10.0.0.4".into()], 0, 0)
        .is_empty());
    // Every chosen host but the holder is sent the task, to fetch from peers.
    let (asked, out) = sim.st.preheat_on_hosts(TASK, &all);
    assert_eq!(asked, all[1..]);
    let sent: Vec<HostKey> = out
        .iter()
        .filter_map(|o| match o {
            Output::Host {
                host,
                command:
                    HostCommand {
                        command: Some(host_command::Command::DownloadTask(d)),
                    },
            } if d.from_peers && d.task_id == TASK => Some(*host),
            _ => None,
        })
        .collect();
    assert_eq!(sent.len(), 4);
    assert!(!sent.contains(&trigger));
}

/// The e2e `a_seed_killed_mid_transfer_is_replaced_and_the_download_finishes` in the state
/// machine: two seeds, peer-1 downloading from the triggered one, which is killed (its peer
/// stream and host stream end, in either order) while peer-1 asks for parents again
/// (before or after the other seed registers). In every order peer-1 is handed the other
/// seed or sent to the origin, never left with neither. The e2e test's 60 s flake was not
/// here (it passes before and after that fix): the other seed was handed over, and its
/// super-seeding plan showed peer-1 only pieces peer-1 held (dataplane
/// `a_child_holding_the_first_pieces_gets_the_rest_from_a_super_seed`).
#[test]
fn a_killed_serving_seed_is_replaced_in_every_event_order() {
    for host_first in [false, true] {
        for reschedule_early in [false, true] {
            let case =
                format!("host stream first: {host_first}, early reschedule: {reschedule_early}");
            let mut sim = Sim::new();
            let h1 = sim.announce("seed-1", true);
            let h2 = sim.announce("seed-2", true);
            let name = |k: HostKey| if k == h1 { "seed-1" } else { "seed-2" };
            let (p, out) = sim.register("peer-1", "host-p", false);
            let t = triggers(&out);
            assert_eq!(t.len(), 1, "{case}");
            let (victim, other) = if t[0].0 == h1 { (h1, h2) } else { (h2, h1) };
            let (s, _) = sim.register_task(TASK, "seed-peer-victim", name(victim), true, true);
            let out = sim.meta(s, 24 << 20);
            assert_eq!(parents_to(&out, p), vec![name(victim)], "{case}");
            for n in 0..24 {
                sim.piece(s, n);
            }
            sim.send(
                s,
                Request::Finished(PeerFinished {
                    content_length: 24 << 20,
                }),
            );
            for n in 0..5 {
                sim.piece(p, n);
            }
            let mut all = Vec::new();
            if host_first {
                all.extend(sim.st.host_left(victim));
                all.extend(sim.st.peer_left(s));
            } else {
                all.extend(sim.st.peer_left(s));
                all.extend(sim.st.host_left(victim));
            }
            let reschedule = Request::Reschedule(RescheduleRequest {
                bad_parent_host_ids: vec![name(victim).to_owned()],
                reason: "every parent failed or has nothing left for us".to_owned(),
            });
            if reschedule_early {
                all.extend(sim.send(p, reschedule.clone()));
            }
            if triggers(&all).iter().any(|(h, _)| *h == other) {
                let (s2, out) = sim.register_task(TASK, "seed-peer-other", name(other), true, true);
                all.extend(out);
                if !reschedule_early {
                    all.extend(sim.send(p, reschedule.clone()));
                }
                for n in 0..24 {
                    all.extend(sim.piece(s2, n));
                }
            } else if !reschedule_early {
                all.extend(sim.send(p, reschedule.clone()));
            }
            let got_other = parents_to(&all, p).iter().any(|h| h == name(other));
            let to_origin = back_to_source(&all, p).is_some();
            assert!(
                got_other || to_origin,
                "{case}: peer-1 got neither the other seed nor the origin: {all:?}"
            );
        }
    }
}

/// Digests the `PieceDigests` pushes in `out` carry to `peer`, as (number, digest) pairs.
fn digests_pushed_to(out: &[Output], peer: PeerKey) -> Vec<(u32, wire::PieceDigest)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Peer {
                peer: p,
                response:
                    AnnouncePeerResponse {
                        response: Some(announce_peer_response::Response::PieceDigests(d)),
                    },
            } if *p == peer => wire::split_piece_digests(&d.numbers, &d.digests),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Only a peer that fetches from the origin supplies digests; the first one of a piece
/// wins; a peer's first parents carry every digest known, later ones come batched.
#[test]
fn piece_digests_come_only_from_source_peers_and_the_first_wins() {
    let mut s = Sim::new();
    s.announce("seed", true);
    s.announce("a", false);
    let (seed, _) = s.register_seed_peer("seed-peer", "seed");
    s.meta(seed, 3 << 20);
    let d = |x: &[u8]| wire::piece_digest(x);
    let report = |s: &mut Sim, k, number, digest: wire::PieceDigest| {
        s.send(
            k,
            Request::PieceFinished(PieceFinished {
                number,
                length: 1 << 20,
                digest: digest.to_vec(),
                ..PieceFinished::default()
            }),
        )
    };
    report(&mut s, seed, 0, d(b"zero"));
    let (a, out) = s.register("peer-a", "a", false);
    let first = out
        .iter()
        .find_map(|o| match o {
            Output::Peer {
                peer,
                response:
                    AnnouncePeerResponse {
                        response: Some(announce_peer_response::Response::CandidateParents(c)),
                    },
            } if *peer == a => c.digests.clone(),
            _ => None,
        })
        .expect("the first parents carry the digests (the task has a source)");
    assert_eq!(
        wire::split_piece_digests(&first.numbers, &first.digests),
        Some(vec![(0, d(b"zero"))])
    );
    // A peer that did not fetch from the origin: its digest is ignored.
    report(&mut s, a, 1, d(b"forged"));
    // (Piece 0's digest, recorded before peer-a was scheduled, may be pushed again: harmless.)
    assert!(digests_pushed_to(&s.st.flush_digests(), a)
        .iter()
        .all(|(n, _)| *n != 1));
    // The source's digest of piece 1 is pushed at the next flush; a second, different one
    // for the same piece is not.
    report(&mut s, seed, 1, d(b"one"));
    report(&mut s, seed, 1, d(b"other"));
    assert_eq!(
        digests_pushed_to(&s.st.flush_digests(), a),
        vec![(1, d(b"one"))]
    );
    assert!(s.st.flush_digests().is_empty());
}

/// The crc32c a source peer reports with a piece's digest goes with the digest: in a
/// peer's first parents and in the later batches; so do the crcs of an import.
#[test]
fn piece_crcs_reach_peers_with_the_digests() {
    let crcs_of = |m: &PieceDigests| wire::split_piece_crcs(m.numbers.len(), &m.crcs);
    let mut s = Sim::new();
    s.announce("seed", true);
    s.announce("a", false);
    let (seed, _) = s.register_seed_peer("seed-peer", "seed");
    s.meta(seed, 3 << 20);
    let report = |s: &mut Sim, number: u32, crc32c: u32| {
        s.send(
            seed,
            Request::PieceFinished(PieceFinished {
                number,
                crc32c,
                length: 1 << 20,
                digest: wire::piece_digest(&number.to_le_bytes()).to_vec(),
                ..PieceFinished::default()
            }),
        )
    };
    report(&mut s, 0, 0xc0);
    let (a, out) = s.register("peer-a", "a", false);
    let first = out
        .iter()
        .find_map(|o| match o {
            Output::Peer {
                peer,
                response:
                    AnnouncePeerResponse {
                        response: Some(announce_peer_response::Response::CandidateParents(c)),
                    },
            } if *peer == a => c.digests.clone(),
            _ => None,
        })
        .expect("the first parents carry the digests");
    assert_eq!(first.numbers, vec![0]);
    assert_eq!(crcs_of(&first), Some(vec![0xc0]));
    report(&mut s, 1, 0xc1);
    report(&mut s, 2, 0xc2);
    let batches: Vec<PieceDigests> =
        s.st.flush_digests()
            .into_iter()
            .filter_map(|o| match o {
                Output::Peer {
                    peer,
                    response:
                        AnnouncePeerResponse {
                            response: Some(announce_peer_response::Response::PieceDigests(d)),
                        },
                } if peer == a => Some(d),
                _ => None,
            })
            .collect();
    let got: Vec<(u32, u32)> = batches
        .iter()
        .flat_map(|m| {
            let crcs = crcs_of(m).expect("every batch carries crcs");
            m.numbers.iter().copied().zip(crcs)
        })
        .filter(|(n, _)| *n != 0)
        .collect();
    assert_eq!(got, vec![(1, 0xc1), (2, 0xc2)]);

    // An import: its crcs reach the next peer with its digests.
    let mut sim = Sim::new();
    sim.announce("seed", true);
    let k = PeerKey(sim.key());
    let d = |n: u32| wire::piece_digest(&n.to_le_bytes());
    sim.st
        .announce_task(
            k,
            AnnounceTaskRequest {
                task_id: TASK.to_owned(),
                peer_id: "seed-cache".to_owned(),
                host: Some(host("seed", true)),
                metadata: Some(metadata(2 << 20)),
                piece_count: 2,
                piece_digests: [d(0), d(1)].concat(),
                piece_crcs: [7u32.to_le_bytes(), 8u32.to_le_bytes()].concat(),
            },
        )
        .unwrap();
    let (b, out) = sim.register("peer-b", "b", false);
    let first = out
        .iter()
        .find_map(|o| match o {
            Output::Peer {
                peer,
                response:
                    AnnouncePeerResponse {
                        response: Some(announce_peer_response::Response::CandidateParents(c)),
                    },
            } if *peer == b => c.digests.clone(),
            _ => None,
        })
        .expect("the import's digests come with the first parents");
    assert_eq!(first.numbers, vec![0, 1]);
    assert_eq!(crcs_of(&first), Some(vec![7, 8]));
}

/// A restarted scheduler: five running downloads register again (resumed) and are handed
/// each other (most with four parents: no top-up due) while the task has no trusted source; then the seed, which was fetching from the
/// origin, registers again as a source and reports its digests. Both peers get every digest
/// known (they required digests before the restart and hold pieces waiting for them), though
/// no new parents came after the task had a source. Before, digests went only to peers whose
/// parents came after the task was trusted, and these waited for their stall watchdog
/// (lab, `restart-scheduler@2s`: 6x the no-fault time).
#[test]
fn peers_scheduled_before_the_source_returns_get_every_digest_known() {
    let mut sim = Sim::new();
    sim.announce("seed", true);
    let resumed = |sim: &mut Sim, peer: &str, host_id: &str| {
        let k = PeerKey(sim.key());
        sim.st
            .register_peer(
                k,
                RegisterPeer {
                    task_id: TASK.to_owned(),
                    peer_id: peer.to_owned(),
                    host: Some(host(host_id, false)),
                    resume: Some(metadata(8 << 20)),
                    ..RegisterPeer::default()
                },
            )
            .unwrap();
        k
    };
    let peers: Vec<PeerKey> = (0..5)
        .map(|i| resumed(&mut sim, &format!("peer-{i}"), &format!("host-{i}")))
        .collect();
    let a = peers[0];
    for (i, &k) in peers.iter().enumerate() {
        sim.piece(k, i as u32);
    }
    assert!(sim.st.flush_digests().is_empty(), "no source, no digests");
    let (seed, out) = sim.register_seed_peer("seed-peer", "seed");
    // The peers with four parents are not handed the seed (no new parents, no snapshot).
    let unsynced = peers
        .iter()
        .filter(|&&k| parents_to(&out, k).is_empty())
        .count();
    assert!(unsynced >= 2, "every peer was handed the seed: {out:?}");
    let d = |n: u32| wire::piece_digest(&n.to_le_bytes());
    for n in 0..4 {
        sim.send(
            seed,
            Request::PieceFinished(PieceFinished {
                number: n,
                length: 1 << 20,
                digest: d(n).to_vec(),
                ..PieceFinished::default()
            }),
        );
    }
    let out = sim.st.flush_digests();
    let all: Vec<(u32, wire::PieceDigest)> = (0..4).map(|n| (n, d(n))).collect();
    for &k in &peers {
        let mut got = digests_pushed_to(&out, k);
        got.sort_by_key(|(n, _)| *n);
        assert_eq!(got, all, "digests pushed to {k:?}");
    }
    // Synced now: later digests come as batches, not again in full.
    sim.send(
        seed,
        Request::PieceFinished(PieceFinished {
            number: 4,
            length: 1 << 20,
            digest: d(4).to_vec(),
            ..PieceFinished::default()
        }),
    );
    let out = sim.st.flush_digests();
    assert_eq!(digests_pushed_to(&out, a), vec![(4, d(4))]);
}

#[test]
fn peers_at_their_parent_limit_get_the_taker_of_lost_pieces_as_a_parent() {
    // The lab's generous stall-parent fault: every peer holds `parent_limit` parents, the
    // seed among them; the seed stalls; peer-a reports it and is the one sent to the origin
    // for what only the seed held. The other peers' parents all lack those pieces, and a
    // peer at its parent limit gets no new parent from a reschedule: unless they are given
    // peer-a, they wait for pieces only peer-a will have (30 s, until their watchdogs).
    let mut sim = Sim::with(SchedulingConfig {
        parent_limit: 1,
        candidate_parent_limit: 1,
        back_to_source_limit: 1,
        ..SchedulingConfig::default()
    });
    sim.announce("seed-a", true);
    let (s, _) = sim.register_seed_peer("seed-peer", "seed-a");
    sim.meta(s, 8 << 20);
    for n in 0..8 {
        sim.piece(s, n);
    }
    let others: Vec<(PeerKey, &str)> = ["host-bb", "host-ccc", "host-dddd"]
        .into_iter()
        .map(|h| (sim.register(&format!("peer-{h}"), h, false).0, h))
        .collect();
    let (a, out) = sim.register("peer-a", "host-a", false);
    assert_eq!(parents_to(&out, a), vec!["seed-a"], "{out:?}");
    let out = sim.send(
        a,
        Request::Reschedule(RescheduleRequest {
            bad_parent_host_ids: vec!["seed-a".to_owned()],
            reason: "parent seed-a stalled".to_owned(),
        }),
    );
    assert_eq!(origin_pieces_to(&out, a), (0..8).collect::<Vec<u32>>());
    for (k, h) in &others {
        assert!(
            parents_to(&out, *k).contains(&"host-a".to_owned()),
            "{h} was not given the peer fetching the lost pieces: {out:?}"
        );
    }
}

/// The digests the first `CandidateParents` to `peer` in `out` carries (`None`: the task had
/// no trusted source, so the peer is not told to require digests).
fn first_digests(out: &[Output], peer: PeerKey) -> Option<Vec<(u32, wire::PieceDigest)>> {
    out.iter().find_map(|o| match o {
        Output::Peer {
            peer: p,
            response:
                AnnouncePeerResponse {
                    response: Some(announce_peer_response::Response::CandidateParents(c)),
                },
        } if *p == peer => c
            .digests
            .as_ref()
            .and_then(|d| wire::split_piece_digests(&d.numbers, &d.digests)),
        _ => None,
    })
}

/// `k` reports piece `number` as fetched from the origin, with `digest`.
fn report_origin_piece(sim: &mut Sim, k: PeerKey, number: u32, digest: wire::PieceDigest) {
    sim.send(
        k,
        Request::PieceFinished(PieceFinished {
            number,
            length: 1 << 20,
            digest: digest.to_vec(),
            ..PieceFinished::default()
        }),
    );
}

fn with_digest_sources(digest_sources: crate::config::DigestSources) -> Sim {
    Sim::with(SchedulingConfig {
        digest_sources,
        ..SchedulingConfig::default()
    })
}

/// A normal host that registers as back-to-source on its own (anyone can) does not give
/// trusted digests by default: its forged digest is not recorded, the task is not marked as
/// having a trusted source, and the next peer is not told to require digests. With
/// `digest_sources: any` (the old rule) the same report is handed out.
#[test]
fn a_self_declared_back_to_source_peer_gives_no_digests_by_default() {
    use crate::config::DigestSources;
    let forged = wire::piece_digest(b"forged");
    for (sources, handed_out) in [
        (DigestSources::Scheduled, false),
        (DigestSources::SeedPeers, false),
        (DigestSources::Any, true),
    ] {
        let mut sim = with_digest_sources(sources);
        sim.announce("mallory", false);
        sim.announce("a", false);
        let (m, _) = sim.register("mallory-peer", "mallory", true);
        sim.meta(m, 3 << 20);
        report_origin_piece(&mut sim, m, 0, forged);
        let (a, out) = sim.register("peer-a", "a", false);
        assert_eq!(parents_to(&out, a), vec!["mallory"], "{sources:?}");
        let got = first_digests(&out, a);
        if handed_out {
            assert_eq!(got, Some(vec![(0, forged)]), "{sources:?}");
        } else {
            assert_eq!(
                got, None,
                "{sources:?}: a self-declared source's digest was trusted"
            );
            report_origin_piece(&mut sim, m, 1, forged);
            assert!(sim.st.flush_digests().is_empty(), "{sources:?}");
        }
    }
}

/// A seed peer's digests are used under every setting; a peer the scheduler itself sent to
/// the origin (no seed host: `NeedBackToSource`) gives them by default and with `any`, not
/// with `seed_peers`.
#[test]
fn seed_peers_and_peers_sent_to_the_origin_give_digests() {
    use crate::config::DigestSources;
    let d0 = wire::piece_digest(b"zero");
    for sources in [
        DigestSources::SeedPeers,
        DigestSources::Scheduled,
        DigestSources::Any,
    ] {
        let mut sim = with_digest_sources(sources);
        sim.announce("seed", true);
        sim.announce("a", false);
        let (seed, _) = sim.register_seed_peer("seed-peer", "seed");
        sim.meta(seed, 3 << 20);
        report_origin_piece(&mut sim, seed, 0, d0);
        let (a, out) = sim.register("peer-a", "a", false);
        assert_eq!(first_digests(&out, a), Some(vec![(0, d0)]), "{sources:?}");
    }
    for (sources, trusted) in [
        (DigestSources::SeedPeers, false),
        (DigestSources::Scheduled, true),
        (DigestSources::Any, true),
    ] {
        let mut sim = with_digest_sources(sources);
        sim.announce("t", false);
        sim.announce("b", false);
        let (t, out) = sim.register("taker", "t", false);
        assert_eq!(back_to_source(&out, t).as_deref(), Some(REASON_NO_SEED));
        sim.meta(t, 3 << 20);
        report_origin_piece(&mut sim, t, 0, d0);
        let (b, out) = sim.register("peer-b", "b", false);
        assert_eq!(parents_to(&out, b), vec!["t"], "{sources:?}");
        let want = trusted.then(|| vec![(0, d0)]);
        assert_eq!(first_digests(&out, b), want, "{sources:?}");
    }
}

/// A normal host's import (`AnnounceTask` with digests) counts by default only for a task
/// with no origin known (a dfcache task), and those digests are dropped when a registration
/// brings the task's origin; for a task with an origin it does not count. A seed host's
/// import always counts.
#[test]
fn imports_from_normal_hosts_count_only_without_an_origin() {
    let d = |n: u32| wire::piece_digest(&n.to_le_bytes());
    let import = |sim: &mut Sim, host_id: &str, seed: bool| {
        let k = PeerKey(sim.key());
        sim.st
            .announce_task(
                k,
                AnnounceTaskRequest {
                    task_id: TASK.to_owned(),
                    peer_id: format!("{host_id}-cache"),
                    host: Some(host(host_id, seed)),
                    metadata: Some(metadata(2 << 20)),
                    piece_count: 2,
                    piece_digests: [d(0), d(1)].concat(),
                    piece_crcs: Vec::new(),
                },
            )
            .unwrap();
    };
    let export = |sim: &mut Sim, peer_id: &str, host_id: &str| {
        let k = PeerKey(sim.key());
        let out = sim
            .st
            .register_peer(
                k,
                RegisterPeer {
                    task_id: TASK.to_owned(),
                    peer_id: peer_id.to_owned(),
                    host: Some(host(host_id, false)),
                    ..RegisterPeer::default()
                },
            )
            .unwrap();
        (k, out)
    };
    let all = Some(vec![(0, d(0)), (1, d(1))]);

    // dfcache: no origin; a normal host's import is the content's definition.
    let mut sim = Sim::new();
    sim.announce("importer", false);
    import(&mut sim, "importer", false);
    let (a, out) = export(&mut sim, "peer-a", "a");
    assert_eq!(first_digests(&out, a), all);
    // A registration with an origin: the import's digests are dropped.
    let (b, out) = sim.register("peer-b", "b", false);
    assert!(parents_to(&out, b).contains(&"importer".to_string()));
    assert_eq!(first_digests(&out, b), None);

    // A task with an origin: a normal host's digests do not count, a seed host's do.
    let mut sim = Sim::new();
    sim.announce("seed", true);
    let (a, _) = sim.register("peer-a", "a", false);
    import(&mut sim, "mallory", false);
    let (b, out) = sim.register("peer-b", "b", false);
    assert_eq!(
        first_digests(&out, b),
        None,
        "a normal host's import was trusted"
    );
    let _ = a;
    import(&mut sim, "seed", true);
    let (c, out) = sim.register("peer-c", "c", false);
    assert_eq!(first_digests(&out, c), all);
}
