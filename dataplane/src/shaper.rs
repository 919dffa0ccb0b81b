//! Rate shaping: lock-free token buckets (GCRA) shared by every data-plane thread.
//!
//! A [`RateLimiter`] keeps one atomic "theoretical arrival time". Reserving `n` bytes moves it
//! forward by `n / rate` and returns how long the caller must wait before sending, so the
//! bytes of all callers together never exceed `rate` beyond a small burst. It is ours rather
//! than `governor`'s because a reservation here is a whole piece (up to 64 MiB, far above any
//! sensible burst) and must work from both monoio and tokio threads without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Burst allowed on top of the rate: this much time's worth of bytes.
const BURST: Duration = Duration::from_millis(20);

/// A byte-rate limiter; `rate == 0` means unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    rate: AtomicU64,
    /// Theoretical arrival time, in nanoseconds since `epoch`.
    tat: AtomicU64,
    epoch: Instant,
}

impl RateLimiter {
    /// A limiter of `rate` bytes per second (0: unlimited).
    pub fn new(rate: u64) -> Self {
        Self {
            rate: AtomicU64::new(rate),
            tat: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// A shared limiter, or `None` when unlimited.
    pub fn shared(rate: u64) -> Option<Arc<Self>> {
        (rate > 0).then(|| Arc::new(Self::new(rate)))
    }

    /// Current rate in bytes per second (0: unlimited).
    pub fn rate(&self) -> u64 {
        self.rate.load(Ordering::Relaxed)
    }

    /// Changes the rate (takes effect for the next reservation).
    pub fn set_rate(&self, rate: u64) {
        self.rate.store(rate, Ordering::Relaxed);
    }

    /// Reserves `n` bytes; returns how long to wait before sending them.
    pub fn reserve(&self, n: u64) -> Duration {
        self.reserve_at(n, self.epoch.elapsed())
    }

    fn reserve_at(&self, n: u64, now: Duration) -> Duration {
        let rate = self.rate();
        if rate == 0 || n == 0 {
            return Duration::ZERO;
        }
        let now_ns = u64::try_from(now.as_nanos()).unwrap_or(u64::MAX);
        let cost_ns =
            u64::try_from(u128::from(n) * 1_000_000_000 / u128::from(rate)).unwrap_or(u64::MAX);
        let burst_ns = u64::try_from(BURST.as_nanos()).unwrap_or(0);
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let start = tat.max(now_ns);
            let new_tat = start.saturating_add(cost_ns);
            match self
                .tat
                .compare_exchange_weak(tat, new_tat, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    // Allowed once the bucket's debt, minus this reservation, is within the
                    // burst: the bytes go out at `start`, less the burst allowance.
                    let wait = start.saturating_sub(now_ns).saturating_sub(burst_ns);
                    return Duration::from_nanos(wait);
                }
                Err(actual) => tat = actual,
            }
        }
    }
}

/// Longest wait among several limiters for the same `n` bytes (each is charged).
pub fn reserve_all(limiters: &[Option<&RateLimiter>], n: u64) -> Duration {
    limiters
        .iter()
        .flatten()
        .map(|l| l.reserve(n))
        .max()
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let l = RateLimiter::new(0);
        assert_eq!(l.reserve(1 << 30), Duration::ZERO);
    }

    #[test]
    fn waits_add_up_to_the_rate() {
        // 1 MB/s, ten reservations of 100 KB at t=0: the last may go after ~0.9 s (first is
        // free, minus the burst).
        let l = RateLimiter::new(1_000_000);
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            last = l.reserve_at(100_000, Duration::ZERO);
        }
        let expect = Duration::from_millis(900) - BURST;
        assert_eq!(last, expect);
    }

    #[test]
    fn idle_time_is_not_banked_beyond_the_burst() {
        let l = RateLimiter::new(1_000_000);
        assert_eq!(
            l.reserve_at(1_000_000, Duration::from_secs(10)),
            Duration::ZERO
        );
        // The next megabyte must wait a full second (less the burst), whatever came before.
        let w = l.reserve_at(1_000_000, Duration::from_secs(10));
        assert_eq!(w, Duration::from_secs(1) - BURST);
    }

    #[test]
    fn rate_change_applies() {
        let l = RateLimiter::new(1);
        l.set_rate(0);
        assert_eq!(l.reserve(1000), Duration::ZERO);
    }
}

/// Rate limits (and the other knobs the manager may change) of one daemon, shared by both
/// planes; they can change while running.
#[derive(Debug)]
pub struct Shaping {
    /// Every upload of this daemon together.
    pub upload: RateLimiter,
    /// Every download of this daemon together (peers and origin).
    pub download: RateLimiter,
    per_peer_upload: AtomicU64,
    per_peer_download: AtomicU64,
    /// Pieces in flight per parent set at run time (0: the static config's value).
    pieces_in_flight: AtomicU64,
}

/// Rates in bytes per second; 0 means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShapingConfig {
    /// Total upload rate.
    pub upload: u64,
    /// Total download rate.
    pub download: u64,
    /// Upload rate of each peer connection.
    pub per_peer_upload: u64,
    /// Download rate from each parent connection.
    pub per_peer_download: u64,
}

impl Shaping {
    /// Limiters for `cfg`.
    pub fn new(cfg: ShapingConfig) -> Self {
        Self {
            upload: RateLimiter::new(cfg.upload),
            download: RateLimiter::new(cfg.download),
            per_peer_upload: AtomicU64::new(cfg.per_peer_upload),
            per_peer_download: AtomicU64::new(cfg.per_peer_download),
            pieces_in_flight: AtomicU64::new(0),
        }
    }

    /// Applies new rates (new connections get the new per-peer rates).
    pub fn update(&self, cfg: ShapingConfig) {
        self.upload.set_rate(cfg.upload);
        self.download.set_rate(cfg.download);
        self.per_peer_upload
            .store(cfg.per_peer_upload, Ordering::Relaxed);
        self.per_peer_download
            .store(cfg.per_peer_download, Ordering::Relaxed);
    }

    /// Overrides the pieces in flight per parent connection (0: back to the static value).
    pub fn set_pieces_in_flight(&self, n: usize) {
        self.pieces_in_flight.store(n as u64, Ordering::Relaxed);
    }

    /// The run-time override of pieces in flight, if any.
    pub fn pieces_in_flight(&self) -> Option<usize> {
        match self.pieces_in_flight.load(Ordering::Relaxed) {
            0 => None,
            n => usize::try_from(n).ok(),
        }
    }

    /// The rates in force.
    pub fn config(&self) -> ShapingConfig {
        ShapingConfig {
            upload: self.upload.rate(),
            download: self.download.rate(),
            per_peer_upload: self.per_peer_upload.load(Ordering::Relaxed),
            per_peer_download: self.per_peer_download.load(Ordering::Relaxed),
        }
    }
}
