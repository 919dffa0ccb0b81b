//! Unit tests of the simulation's link sharing.

use super::*;

/// Peer 0 serves piece 5 to peers 1 (asked first, holds 3 pieces) and 2 (asked later,
/// holds 1); uplinks 10, downlinks 100. Returns the rates of the two flows.
fn rates(upload_first: usize, per_piece: bool, poorest: bool) -> Vec<f64> {
    let links = Links {
        up: 10.0,
        down: 100.0,
    };
    let mut sim = Sim::new(Params {
        size: 8 * 1024,
        piece_length: 1024,
        hosts: vec![links; 3],
        placement: Vec::new(),
        origin_rate: 10.0,
        seed_rate: 10.0,
        daemon: None,
        step: 0.05,
        arrival: 0.0,
        window: 1,
        max_time: 10.0,
        seed: 1,
        random_pieces: false,
        upload_first,
        upload_queue: false,
        upload_per_piece: per_piece,
        upload_poorest: poorest,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    sim.count[1] = 3;
    sim.count[2] = 1;
    for (child, started) in [(1usize, 0.0), (2, 1.0)] {
        sim.conns[child].push(Conn {
            piece: Some(5),
            remaining: 1024.0,
            started,
            ..Conn::to(0)
        });
    }
    let total = sim.n + 1;
    let flows = vec![(0, (total + 1) as u32), (0, (total + 2) as u32)];
    let refs = vec![(1, 0), (2, 0)];
    let mut capacity: Vec<f64> = sim.links.iter().map(|l| l.up).collect();
    capacity.extend(sim.links.iter().map(|l| l.down));
    capacity.push(sim.p.origin_rate);
    let mut solver = Solver::default();
    let mut out = Vec::new();
    if upload_first == 0 {
        solver.solve(&capacity, &flows, &mut out);
    } else {
        sim.solve_ordered(&mut solver, &capacity, &flows, &refs, &mut out);
    }
    out
}

#[test]
fn upload_ordering() {
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9);
    // Max-min fair: the uplink is split.
    let r = rates(0, false, false);
    assert!(close(&r, &[5.0, 5.0]), "{r:?}");
    // Oldest request first: peer 1 gets the whole uplink.
    let r = rates(1, true, false);
    assert!(close(&r, &[10.0, 0.0]), "{r:?}");
    // Poorest child first: peer 2.
    let r = rates(1, true, true);
    assert!(close(&r, &[0.0, 10.0]), "{r:?}");
    // Two at a time: both at full share again.
    let r = rates(2, true, true);
    assert!(close(&r, &[5.0, 5.0]), "{r:?}");
}
