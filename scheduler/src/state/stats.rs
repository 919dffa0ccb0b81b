//! Measured piece costs of one parent host: bandwidth estimate and bad-parent detection.

use std::collections::VecDeque;

use crate::config::BadParentConfig;

/// One mebibyte: costs are normalised to microseconds per MiB so that a short last piece
/// does not look fast.
const MIB: f64 = 1_048_576.0;

/// A sliding window of the normalised piece costs a parent host achieved, with running sums
/// for O(1) mean and standard deviation.
#[derive(Debug, Clone, Default)]
pub(crate) struct CostWindow {
    samples: VecDeque<f64>,
    sum: f64,
    sum_sq: f64,
    /// Whether the latest sample was an outlier against the window before it.
    slow: bool,
}

impl CostWindow {
    /// Records a piece of `length` bytes that took `cost_us`; returns whether that sample
    /// marks the parent as bad (see [`is_outlier`]). Zero lengths or costs are ignored.
    pub(crate) fn record(&mut self, length: u64, cost_us: u64, cfg: &BadParentConfig) -> bool {
        if length == 0 || cost_us == 0 || cfg.window == 0 {
            return self.slow;
        }
        let cost = cost_us as f64 * MIB / length as f64;
        self.slow = is_outlier(cost, self.samples.len(), self.sum, self.sum_sq, cfg);
        if self.samples.len() >= cfg.window {
            if let Some(old) = self.samples.pop_front() {
                self.sum -= old;
                self.sum_sq -= old * old;
            }
        }
        self.samples.push_back(cost);
        self.sum += cost;
        self.sum_sq += cost * cost;
        self.slow
    }

    /// Whether the latest sample was an outlier.
    pub(crate) fn is_slow(&self) -> bool {
        self.slow
    }

    /// Mean measured rate in bytes per second, if any sample was recorded.
    pub(crate) fn rate(&self) -> Option<f64> {
        if self.samples.is_empty() || self.sum <= 0.0 {
            return None;
        }
        let mean_us_per_mib = self.sum / self.samples.len() as f64;
        Some(MIB * 1e6 / mean_us_per_mib)
    }

    /// Number of samples in the window.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.samples.len()
    }
}

/// Dragonfly's rule: with fewer than `min_samples` earlier samples, a cost above
/// `small_window_multiple` × their mean is bad; after that, a cost above
/// mean + `sigma` × standard deviation. No earlier sample: never bad.
pub(crate) fn is_outlier(
    cost: f64,
    n: usize,
    sum: f64,
    sum_sq: f64,
    cfg: &BadParentConfig,
) -> bool {
    if n == 0 {
        return false;
    }
    let nf = n as f64;
    let mean = sum / nf;
    if n < cfg.min_samples {
        return cost > mean * cfg.small_window_multiple;
    }
    let variance = (sum_sq / nf - mean * mean).max(0.0);
    cost > mean + cfg.sigma * variance.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BadParentConfig {
        BadParentConfig {
            window: 100,
            min_samples: 30,
            small_window_multiple: 20.0,
            sigma: 3.0,
        }
    }

    #[test]
    fn small_window_uses_a_multiple_of_the_mean() {
        let c = cfg();
        let mut w = CostWindow::default();
        assert!(!w.record(1 << 20, 1000, &c), "first sample is never bad");
        assert!(!w.record(1 << 20, 1100, &c));
        // 10x the mean: slow, but within 20x while the window is small.
        assert!(!w.record(1 << 20, 10_000, &c));
        // Over 20x the mean (~4033 us): bad.
        assert!(w.record(1 << 20, 100_000, &c));
        assert!(w.is_slow());
        // A normal piece clears the flag.
        assert!(!w.record(1 << 20, 1000, &c));
    }

    #[test]
    fn full_window_uses_mean_plus_three_sigma() {
        let c = cfg();
        let mut w = CostWindow::default();
        for i in 0..60u64 {
            // Costs 900..1100 us: mean 1000, sigma ~58.
            w.record(1 << 20, 900 + (i % 3) * 100, &c);
        }
        assert!(!w.record(1 << 20, 1200, &c), "within 3 sigma");
        assert!(w.record(1 << 20, 2000, &c), "beyond 3 sigma, far below 20x");
    }

    #[test]
    fn costs_are_normalised_by_length_and_the_window_slides() {
        let c = BadParentConfig { window: 4, ..cfg() };
        let mut w = CostWindow::default();
        for _ in 0..10 {
            w.record(1 << 20, 1000, &c);
        }
        assert_eq!(w.len(), 4);
        // A quarter-size piece in a quarter of the time is the same speed.
        assert!(!w.record(1 << 18, 250, &c));
        let rate = w.rate().unwrap_or(0.0);
        assert!((rate - 1_048_576_000.0).abs() < 1.0, "{rate}");
        // Zero-length reports change nothing.
        assert!(!w.record(0, 5, &c));
        assert_eq!(w.len(), 4);
    }
}
