//! The parent evaluator: a weighted score of how good a candidate parent is for a child.
//!
//! `score = load·free_slots + idc·same_idc + location·shared_location_prefix
//!        + host_type·type_score + bandwidth·measured_bandwidth`, every term in `[0, 1]`:
//!
//! * free slots: `1 - children / upload_slots` of the candidate;
//! * IDC: 1 when both hosts announce the same non-empty IDC;
//! * location: share of the longest common prefix of `|`-separated location elements
//!   (at most [`MAX_LOCATION_ELEMENTS`]), as in Dragonfly;
//! * host type: a seed peer scores 1 while it is still fetching the task from the origin
//!   (early in a task, so that the first pieces leave it at once) and 0 afterwards; a normal
//!   peer 0.5 (Dragonfly's rule);
//! * pieces ahead: share of the task's pieces the candidate holds beyond the child's,
//!   `(parent − child) / total` clamped to `[0, 1]` (Dragonfly's finished-piece score), so
//!   that a full parent beats an empty peer that was merely scheduled;
//! * bandwidth: the parent host's measured rate (from `PieceFinished.cost_us`), or else its
//!   announced upload limit, over `bandwidth_reference`, capped at 1; 0.5 when neither is
//!   known.

use wire::proto::scheduler::{Host, HostType};

use crate::config::EvaluatorWeights;

/// Location elements compared (`country|province|city|zone|rack`).
pub const MAX_LOCATION_ELEMENTS: usize = 5;

/// What the evaluator needs to know of a candidate parent.
#[derive(Debug, Clone, Copy)]
pub struct ParentView<'a> {
    /// The candidate's host.
    pub host: &'a Host,
    /// Children that currently download from it.
    pub children: usize,
    /// Its upload slot limit (children it may serve at once).
    pub slots: usize,
    /// Whether it still fetches the task from the origin (a running seed or source peer).
    pub fetching_from_origin: bool,
    /// Measured upload rate of its host, bytes per second.
    pub measured_rate: Option<f64>,
    /// Pieces it holds beyond the child's, over the task's piece count, in `[0, 1]`.
    pub pieces_ahead: f64,
}

/// `(parent − child) / total`, clamped to `[0, 1]`; 0 when the piece count is unknown.
pub fn pieces_ahead_score(parent: u32, child: u32, total: u32) -> f64 {
    if total == 0 || parent <= child {
        return 0.0;
    }
    (f64::from(parent - child) / f64::from(total)).min(1.0)
}

/// `1 - children / slots`, 0 when full.
pub fn free_slot_score(children: usize, slots: usize) -> f64 {
    if slots == 0 || children >= slots {
        return 0.0;
    }
    1.0 - children as f64 / slots as f64
}

/// 1 when both IDCs are equal and non-empty.
pub fn idc_score(child: &str, parent: &str) -> f64 {
    if !child.is_empty() && child == parent {
        1.0
    } else {
        0.0
    }
}

/// Common prefix of `|`-separated elements over [`MAX_LOCATION_ELEMENTS`].
pub fn location_score(child: &str, parent: &str) -> f64 {
    if child.is_empty() || parent.is_empty() {
        return 0.0;
    }
    let shared = child
        .split('|')
        .zip(parent.split('|'))
        .take(MAX_LOCATION_ELEMENTS)
        .take_while(|(a, b)| a == b)
        .count();
    shared as f64 / MAX_LOCATION_ELEMENTS as f64
}

/// Seed peers are preferred while they fetch from the origin, avoided after; normal 0.5.
pub fn host_type_score(host: &Host, fetching_from_origin: bool) -> f64 {
    if host.r#type() == HostType::Seed {
        if fetching_from_origin {
            1.0
        } else {
            0.0
        }
    } else {
        0.5
    }
}

/// Measured (else announced) rate over the reference, capped at 1; 0.5 when unknown.
pub fn bandwidth_score(measured: Option<f64>, announced: u64, reference: u64) -> f64 {
    let rate = match measured {
        Some(r) => r,
        None if announced > 0 => announced as f64,
        None => return 0.5,
    };
    if reference == 0 {
        return 0.5;
    }
    (rate / reference as f64).clamp(0.0, 1.0)
}

/// The weighted score of `parent` for a child on `child`; higher is better.
pub fn score(
    weights: &EvaluatorWeights,
    bandwidth_reference: u64,
    child: &Host,
    parent: &ParentView<'_>,
) -> f64 {
    weights.load * free_slot_score(parent.children, parent.slots)
        + weights.idc * idc_score(&child.idc, &parent.host.idc)
        + weights.location * location_score(&child.location, &parent.host.location)
        + weights.host_type * host_type_score(parent.host, parent.fetching_from_origin)
        + weights.pieces * parent.pieces_ahead
        + weights.bandwidth
            * bandwidth_score(
                parent.measured_rate,
                parent.host.upload_rate_limit,
                bandwidth_reference,
            )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, idc: &str, location: &str, seed: bool) -> Host {
        Host {
            id: id.to_owned(),
            idc: idc.to_owned(),
            location: location.to_owned(),
            r#type: if seed {
                HostType::Seed as i32
            } else {
                HostType::Normal as i32
            },
            ..Host::default()
        }
    }

    fn view(host: &Host, children: usize) -> ParentView<'_> {
        ParentView {
            host,
            children,
            slots: 20,
            fetching_from_origin: false,
            measured_rate: None,
            pieces_ahead: 0.0,
        }
    }

    #[test]
    fn terms() {
        assert_eq!(free_slot_score(0, 20), 1.0);
        assert_eq!(free_slot_score(5, 20), 0.75);
        assert_eq!(free_slot_score(20, 20), 0.0);
        assert_eq!(free_slot_score(1, 0), 0.0);
        assert_eq!(idc_score("a", "a"), 1.0);
        assert_eq!(idc_score("", ""), 0.0);
        assert_eq!(location_score("cn|zj|hz|z1|r1", "cn|zj|hz|z2|r1"), 0.6);
        assert_eq!(location_score("cn|zj", "us|zj"), 0.0);
        assert_eq!(location_score("", "cn"), 0.0);
        assert_eq!(bandwidth_score(None, 0, 100), 0.5);
        assert_eq!(bandwidth_score(None, 50, 100), 0.5);
        assert_eq!(bandwidth_score(Some(200.0), 50, 100), 1.0);
        assert_eq!(bandwidth_score(Some(25.0), 50, 100), 0.25);
        let seed = host("s", "", "", true);
        assert_eq!(host_type_score(&seed, true), 1.0);
        assert_eq!(host_type_score(&seed, false), 0.0);
        assert_eq!(host_type_score(&host("n", "", "", false), true), 0.5);
        assert_eq!(pieces_ahead_score(10, 4, 12), 0.5);
        assert_eq!(pieces_ahead_score(3, 4, 12), 0.0);
        assert_eq!(pieces_ahead_score(3, 0, 0), 0.0);
    }

    /// A parent holding the whole task beats an equally loaded one that holds nothing yet
    /// (a peer that was only scheduled), so early children go to where the pieces are.
    #[test]
    fn pieces_ahead_prefers_full_parents() {
        let w = EvaluatorWeights::default();
        let child = host("c", "", "", false);
        let peer = host("p", "", "", false);
        let empty = view(&peer, 2);
        let full = ParentView {
            pieces_ahead: pieces_ahead_score(64, 0, 64),
            ..view(&peer, 2)
        };
        assert!(score(&w, 125_000_000, &child, &full) > score(&w, 125_000_000, &child, &empty));
        // A finished seed with a few children still beats an idle empty peer.
        let seed = host("s", "", "", true);
        let finished_seed = ParentView {
            slots: 40,
            pieces_ahead: 1.0,
            ..view(&seed, 8)
        };
        assert!(
            score(&w, 125_000_000, &child, &finished_seed)
                > score(&w, 125_000_000, &child, &view(&peer, 0))
        );
    }

    /// With Dragonfly's weights, the ordering follows load first, then IDC, then location.
    #[test]
    fn ordering() {
        let w = EvaluatorWeights::default();
        let child = host("c", "idc-1", "cn|zj|hz", false);
        let same_idc = host("a", "idc-1", "", false);
        let same_city = host("b", "idc-2", "cn|zj|hz", false);
        let far = host("d", "idc-3", "us|ca", false);
        let s = |h: &Host, children: usize| score(&w, 125_000_000, &child, &view(h, children));
        // Equal load: IDC beats location, location beats nothing.
        assert!(s(&same_idc, 2) > s(&same_city, 2));
        assert!(s(&same_city, 2) > s(&far, 2));
        // Load dominates: a far idle parent beats a same-IDC parent that is nearly full.
        assert!(s(&far, 0) > s(&same_idc, 19));
        // A full parent scores no load term at all.
        assert!(s(&far, 20) < s(&far, 19));
        // Measured bandwidth breaks ties.
        let fast = ParentView {
            measured_rate: Some(125e6),
            ..view(&far, 2)
        };
        let slow = ParentView {
            measured_rate: Some(1e6),
            ..view(&far, 2)
        };
        assert!(score(&w, 125_000_000, &child, &fast) > score(&w, 125_000_000, &child, &slow));
        // A seed fetching from the origin beats an equally loaded normal peer; a finished
        // seed does not.
        let seed = host("s", "", "", true);
        let running = ParentView {
            fetching_from_origin: true,
            ..view(&seed, 2)
        };
        assert!(score(&w, 125_000_000, &child, &running) > s(&far, 2));
        assert!(score(&w, 125_000_000, &child, &view(&seed, 2)) < s(&far, 2));
    }
}
