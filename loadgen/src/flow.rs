//! Max-min fair rates of flows over capacity-limited links (progressive filling).
//!
//! Every flow crosses exactly two links (the sender's uplink, the receiver's downlink). The
//! link whose fair share (remaining capacity / unfrozen flows) is smallest is saturated first:
//! its flows freeze at that share and release the capacity on their other link. Repeating
//! gives the max-min fair allocation, the usual model of TCP flows sharing access links.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A link's fair share, ordered smallest first in a max-heap.
#[derive(Debug, Clone, Copy)]
struct Share {
    share: f64,
    link: u32,
    version: u32,
}

impl PartialEq for Share {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Share {}
impl PartialOrd for Share {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Share {
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .share
            .total_cmp(&self.share)
            .then(other.link.cmp(&self.link))
    }
}

/// Reusable buffers for [`Solver::solve`].
#[derive(Debug, Default)]
pub struct Solver {
    remaining: Vec<f64>,
    count: Vec<u32>,
    version: Vec<u32>,
    offsets: Vec<u32>,
    members: Vec<u32>,
    frozen: Vec<bool>,
    heap: BinaryHeap<Share>,
}

impl Solver {
    /// Fills `rates[i]` for each flow `flows[i] = (link_a, link_b)` given link `capacity`.
    pub fn solve(&mut self, capacity: &[f64], flows: &[(u32, u32)], rates: &mut Vec<f64>) {
        let links = capacity.len();
        rates.clear();
        rates.resize(flows.len(), 0.0);
        self.remaining.clear();
        self.remaining.extend_from_slice(capacity);
        self.count.clear();
        self.count.resize(links, 0);
        self.version.clear();
        self.version.resize(links, 0);
        for &(a, b) in flows {
            self.count[a as usize] += 1;
            self.count[b as usize] += 1;
        }
        // Flows of each link, CSR style.
        self.offsets.clear();
        self.offsets.resize(links + 1, 0);
        for l in 0..links {
            self.offsets[l + 1] = self.offsets[l] + self.count[l];
        }
        self.members.clear();
        self.members.resize(self.offsets[links] as usize, 0);
        let mut fill: Vec<u32> = self.offsets[..links].to_vec();
        for (i, &(a, b)) in flows.iter().enumerate() {
            for l in [a, b] {
                self.members[fill[l as usize] as usize] = i as u32;
                fill[l as usize] += 1;
            }
        }
        self.frozen.clear();
        self.frozen.resize(flows.len(), false);
        self.heap.clear();
        for l in 0..links {
            if self.count[l] > 0 {
                self.heap.push(Share {
                    share: self.remaining[l] / f64::from(self.count[l]),
                    link: l as u32,
                    version: 0,
                });
            }
        }
        while let Some(top) = self.heap.pop() {
            let l = top.link as usize;
            if top.version != self.version[l] || self.count[l] == 0 {
                continue;
            }
            let share = top.share.max(0.0);
            let (start, end) = (self.offsets[l] as usize, self.offsets[l + 1] as usize);
            for m in start..end {
                let f = self.members[m] as usize;
                if self.frozen[f] {
                    continue;
                }
                self.frozen[f] = true;
                rates[f] = share;
                let (a, b) = flows[f];
                let other = if a as usize == l { b } else { a } as usize;
                self.remaining[other] -= share;
                self.count[other] -= 1;
                self.version[other] += 1;
                if self.count[other] > 0 {
                    self.heap.push(Share {
                        share: self.remaining[other] / f64::from(self.count[other]),
                        link: other as u32,
                        version: self.version[other],
                    });
                }
            }
            self.count[l] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_min_fair() {
        // Links: 0 = up A (10), 1 = up B (10), 2 = down C (4), 3 = down D (100).
        // Flows: A->C, A->D, B->D. C's downlink limits A->C to 4; A->D gets 6; B->D 10.
        let mut s = Solver::default();
        let mut rates = Vec::new();
        s.solve(
            &[10.0, 10.0, 4.0, 100.0],
            &[(0, 2), (0, 3), (1, 3)],
            &mut rates,
        );
        assert!((rates[0] - 4.0).abs() < 1e-9, "{rates:?}");
        assert!((rates[1] - 6.0).abs() < 1e-9, "{rates:?}");
        assert!((rates[2] - 10.0).abs() < 1e-9, "{rates:?}");
    }

    #[test]
    fn equal_split() {
        let mut s = Solver::default();
        let mut rates = Vec::new();
        // One uplink of 9 shared by three receivers with big downlinks.
        s.solve(
            &[9.0, 100.0, 100.0, 100.0],
            &[(0, 1), (0, 2), (0, 3)],
            &mut rates,
        );
        assert!(rates.iter().all(|r| (r - 3.0).abs() < 1e-9), "{rates:?}");
    }
}
