//! One virtual step of the simulation: start idle connections, share every link among the
//! flows crossing it, move the bytes and finish the pieces that arrive.

use super::*;

impl Sim {
    /// One virtual step: start idle connections, share the links, move the bytes.
    pub(super) fn step(
        &mut self,
        solver: &mut Solver,
        flows: &mut Vec<(u32, u32)>,
        refs: &mut Vec<(u32, u32)>,
        rates: &mut Vec<f64>,
    ) {
        let total = self.n + 1;
        let origin_link = (2 * total) as u32;
        // Peers take turns from a random one on: the daemons' requests reach a parent in no
        // fixed order (with a fixed order, peer 0 would be the first to ask a super-seeding
        // seed for every new piece).
        let first = self.rng.random_range(0..total);
        for x in 0..total {
            let i = (first + x) % total;
            if !matches!(self.state[i], State::Active | State::Source) {
                continue;
            }
            for j in 0..self.conns[i].len() {
                if self.daemon.is_some() {
                    self.d_refill(i, j, self.t);
                } else if self.conns[i][j].piece.is_none() {
                    self.start_next(i, j, self.t);
                }
            }
        }
        flows.clear();
        refs.clear();
        for i in 0..total {
            for (j, c) in self.conns[i].iter().enumerate() {
                if c.piece.is_some() {
                    let up = if c.parent == ORIGIN {
                        origin_link
                    } else {
                        c.parent
                    };
                    flows.push((up, (total + i) as u32));
                    refs.push((i as u32, j as u32));
                }
            }
        }
        let mut capacity: Vec<f64> = Vec::with_capacity(2 * total + 1);
        capacity.extend(self.links.iter().map(|l| l.up));
        capacity.extend(self.links.iter().map(|l| l.down));
        capacity.push(self.p.origin_rate);
        if self.p.upload_first == 0 {
            solver.solve(&capacity, flows, rates);
        } else {
            self.solve_ordered(solver, &capacity, flows, refs, rates);
        }
        if std::env::var_os("LOADGEN_TRACE").is_some()
            && ((self.t / self.p.step).round() as u64) & 63 == 0
        {
            let total_rate: f64 = rates.iter().sum();
            let cap: f64 = self.links[..self.n].iter().map(|l| l.down).sum();
            let active = (0..self.n)
                .filter(|i| self.state[*i] == State::Active)
                .count();
            let idle_conns: usize = (0..self.n)
                .map(|i| self.conns[i].iter().filter(|c| c.piece.is_none()).count())
                .sum();
            eprintln!(
                "t={:.1} util={:.3} flows={} active_peers={} idle_conns={} done={}",
                self.t,
                total_rate / cap,
                flows.len(),
                active,
                idle_conns,
                self.normal_done()
            );
            if self.daemon.is_some() && std::env::var_os("LOADGEN_DUMP").is_some() {
                self.d_dump();
            }
            if ((self.t / self.p.step).round() as u64).is_multiple_of(640) {
                let mut kids = vec![0usize; total];
                for i in 0..total {
                    for c in &self.conns[i] {
                        if c.parent != ORIGIN {
                            kids[c.parent as usize] += 1;
                        }
                    }
                }
                let mut hist = [0usize; 24];
                for k in &kids[..self.n] {
                    hist[(*k).min(23)] += 1;
                }
                let mut phist = [0usize; 24];
                for i in 0..self.n {
                    phist[self.conns[i].len().min(23)] += 1;
                }
                eprintln!(
                    "  children histogram {hist:?} seed children {}",
                    kids[self.n]
                );
                eprintln!("  parents histogram  {phist:?}");
            }
            if self.n - self.normal_done() <= 3 {
                for i in (0..self.n).filter(|i| self.state[*i] == State::Active) {
                    let rate: f64 = refs
                        .iter()
                        .zip(rates.iter())
                        .filter(|((c, _), _)| *c as usize == i)
                        .map(|(_, r)| *r)
                        .sum();
                    let parents: Vec<String> = self.conns[i]
                        .iter()
                        .map(|c| {
                            let kids = (0..total)
                                .filter(|x| {
                                    self.conns[*x]
                                        .iter()
                                        .any(|cc| cc.parent == c.parent && cc.piece.is_some())
                                })
                                .count();
                            format!(
                                "{}:{}/{}",
                                c.parent,
                                self.count.get(c.parent as usize).copied().unwrap_or(0),
                                kids
                            )
                        })
                        .collect();
                    eprintln!(
                        "  straggler p{i}: {} pieces, {:.1} Mbit/s, parents (id:pieces/active children) {}",
                        self.count[i],
                        rate / 125_000.0,
                        parents.join(" ")
                    );
                }
            }
        }
        let dt = self.p.step;
        for f in 0..refs.len() {
            let (i, j) = (refs[f].0 as usize, refs[f].1 as usize);
            let rate = rates[f];
            if rate <= 0.0 {
                continue;
            }
            let mut budget = rate * dt;
            loop {
                let c = &mut self.conns[i][j];
                if c.piece.is_none() {
                    break;
                }
                if budget < c.remaining {
                    c.remaining -= budget;
                    break;
                }
                budget -= c.remaining;
                c.remaining = 0.0;
                let at = self.t + dt - budget / rate;
                if self.daemon.is_some() {
                    // The next queued request goes on the wire at once (and a pause after
                    // `Busy` ends the step for this connection).
                    self.d_finish(i, j, at);
                    if self.conns[i].get(j).is_none_or(|c| c.piece.is_none()) {
                        break;
                    }
                    continue;
                }
                let started = self.conns[i][j].started;
                self.complete(i, j, at, at - started);
                if !self.start_next(i, j, at) {
                    break;
                }
            }
        }
        self.t += dt;
    }

    /// Rates when every parent serves its `upload_first` oldest requests first: those flows
    /// share the links max-min fairly; the rest get what they leave (or nothing, `queue`).
    pub(super) fn solve_ordered(
        &mut self,
        solver: &mut Solver,
        capacity: &[f64],
        flows: &[(u32, u32)],
        refs: &[(u32, u32)],
        rates: &mut Vec<f64>,
    ) {
        // Flows sorted by their queue (uplink, and with `per_piece` the piece), then by
        // preference (fewest pieces held with `poorest`, then request time); the first
        // `upload_first` of each queue are the head class. Keys are computed once: sorting
        // 80,000 flows every step must stay cheap.
        let mut keys: Vec<(u64, u32, u64, u32)> = Vec::with_capacity(flows.len());
        for (f, &(up, _)) in flows.iter().enumerate() {
            let (i, j) = refs[f];
            let c = &self.conns[i as usize][j as usize];
            let piece = if self.p.upload_per_piece {
                c.piece.unwrap_or(u32::MAX)
            } else {
                0
            };
            let holds = if self.p.upload_poorest {
                self.count[i as usize]
            } else {
                0
            };
            // Start times are non-negative, so their bit patterns order like the values.
            keys.push((
                (u64::from(up) << 32) | u64::from(piece),
                holds,
                c.started.max(0.0).to_bits(),
                f as u32,
            ));
        }
        keys.sort_unstable();
        let mut head = vec![false; flows.len()];
        let mut run = 0usize;
        for x in 0..keys.len() {
            if x > 0 && keys[x - 1].0 == keys[x].0 {
                run += 1;
            } else {
                run = 0;
            }
            head[keys[x].3 as usize] = run < self.p.upload_first;
        }
        let split = |want: bool| -> (Vec<u32>, Vec<(u32, u32)>) {
            let idx: Vec<u32> = (0..flows.len() as u32)
                .filter(|f| head[*f as usize] == want)
                .collect();
            let fl = idx.iter().map(|f| flows[*f as usize]).collect();
            (idx, fl)
        };
        let (head_idx, head_flows) = split(true);
        let (tail_idx, tail_flows) = split(false);
        rates.clear();
        rates.resize(flows.len(), 0.0);
        let mut sub = Vec::new();
        solver.solve(capacity, &head_flows, &mut sub);
        let mut residual = capacity.to_vec();
        for (f, r) in head_idx.iter().zip(&sub) {
            rates[*f as usize] = *r;
            let (a, b) = flows[*f as usize];
            residual[a as usize] -= r;
            residual[b as usize] -= r;
        }
        if self.p.upload_queue || tail_flows.is_empty() {
            return;
        }
        for r in &mut residual {
            *r = r.max(0.0);
        }
        solver.solve(&residual, &tail_flows, &mut sub);
        for (f, r) in tail_idx.iter().zip(&sub) {
            rates[*f as usize] = *r;
        }
    }
}
