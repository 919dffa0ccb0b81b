//! Rate shaping: lock-free token buckets (GCRA) shared by every data-plane thread.
//!
//! A [`RateLimiter`] keeps one atomic "theoretical arrival time" (TAT). Reserving `n` bytes
//! moves it forward by `n / rate` and returns how long the caller must wait before sending:
//! until the TAT of its last byte, less the burst. So the bytes of all callers together never
//! exceed `rate × t + burst` over any interval `t`, whatever the size of one reservation, and
//! a caller that keeps reserving gets exactly `rate` in the long run.
//!
//! The wait covers the reservation's own bytes ("pay before sending"), not only the bytes
//! reserved before it: an earlier version let each reservation go as soon as the previous
//! ones were paid, so an idle bucket let a whole piece (plus the burst) through at once, and
//! the only slack left for a late caller was that one piece. The burst also is the slack a
//! caller has to come back late (timer overshoot, a descheduled thread, a slow write) before
//! the time it lost is lost for good: a stall shorter than the burst is caught up. It is ours rather
//! than `governor`'s because a reservation here is a whole piece (up to 64 MiB, far above any
//! sensible burst) and must work from both monoio and tokio threads without a lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Burst allowed on top of the rate: this much time's worth of bytes. Also the lateness a
/// steady caller can make up for (see the module docs).
pub const BURST: Duration = Duration::from_millis(50);

/// Where limiters read the time: the system's monotonic clock, or a [`VirtualClock`] (tests
/// that check what a limit did without depending on how fast the machine is).
#[derive(Debug, Clone)]
pub enum Clock {
    /// Time since the `Instant` the clock was made at.
    System(Instant),
    /// Virtual time.
    Virtual(Arc<VirtualClock>),
}

impl Clock {
    /// The system's monotonic clock, from now.
    pub fn system() -> Self {
        Self::System(Instant::now())
    }

    /// Time since the clock's start.
    pub fn now(&self) -> Duration {
        match self {
            Self::System(epoch) => epoch.elapsed(),
            Self::Virtual(v) => v.now(),
        }
    }

    /// Lets a wait a limiter asked for pass, and returns how long the caller must really
    /// sleep: `wait` on the system clock; nothing on a virtual clock, which moves forward by
    /// `wait` instead.
    pub fn pass(&self, wait: Duration) -> Duration {
        match self {
            Self::System(_) => wait,
            Self::Virtual(v) => {
                v.advance(wait);
                Duration::ZERO
            }
        }
    }
}

/// Virtual time for [`Clock::Virtual`]: it moves only when a caller lets a wait pass
/// ([`Clock::pass`]) or a test calls [`VirtualClock::advance`]. A shaped transfer then runs
/// at full speed, and the time the limits made it take is read off the clock. The waits of
/// concurrent callers add up, so it models one shaped caller at a time.
#[derive(Debug, Default)]
pub struct VirtualClock {
    nanos: AtomicU64,
}

impl VirtualClock {
    /// A virtual clock at zero.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Virtual time elapsed.
    pub fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos.load(Ordering::Acquire))
    }

    /// Moves the clock forward by `d`.
    pub fn advance(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.nanos.fetch_add(ns, Ordering::AcqRel);
    }
}

/// A byte-rate limiter; `rate == 0` means unlimited.
#[derive(Debug)]
pub struct RateLimiter {
    rate: AtomicU64,
    /// Theoretical arrival time, in nanoseconds of `clock`.
    tat: AtomicU64,
    clock: Clock,
}

impl RateLimiter {
    /// A limiter of `rate` bytes per second (0: unlimited) on the system clock.
    pub fn new(rate: u64) -> Self {
        Self::with_clock(rate, Clock::system())
    }

    /// A limiter of `rate` bytes per second (0: unlimited) reading the time from `clock`.
    pub fn with_clock(rate: u64, clock: Clock) -> Self {
        Self {
            rate: AtomicU64::new(rate),
            tat: AtomicU64::new(0),
            clock,
        }
    }

    /// The clock this limiter reads.
    pub fn clock(&self) -> &Clock {
        &self.clock
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
        self.reserve_at(n, self.clock.now())
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
                    // Allowed once the bucket's debt, including this reservation, is within
                    // the burst: at `new_tat`, less the burst allowance.
                    let wait = new_tat.saturating_sub(now_ns).saturating_sub(burst_ns);
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
        // 1 MB/s, ten reservations of 100 KB at t=0: the last may go once all 1 MB is paid
        // for (1 s), less the burst.
        let l = RateLimiter::new(1_000_000);
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            last = l.reserve_at(100_000, Duration::ZERO);
        }
        assert_eq!(last, Duration::from_secs(1) - BURST);
    }

    #[test]
    fn idle_time_is_not_banked_beyond_the_burst() {
        let l = RateLimiter::new(1_000_000);
        // After 10 s idle, a megabyte still waits its own second, less the burst.
        let w = l.reserve_at(1_000_000, Duration::from_secs(10));
        assert_eq!(w, Duration::from_secs(1) - BURST);
        let w = l.reserve_at(1_000_000, Duration::from_secs(10));
        assert_eq!(w, Duration::from_secs(2) - BURST);
    }

    /// A caller on a virtual clock: reserves `piece` bytes, sleeps the wait plus `late`
    /// (timer overshoot, scheduling, the time to write what it received), repeats. Returns
    /// the achieved rate over the whole run, bytes per second, counted from the first
    /// reservation to the moment the last bytes may be sent.
    fn simulate(rate: u64, piece: u64, pieces: u64, late: impl Fn(u64) -> Duration) -> f64 {
        let l = RateLimiter::new(rate);
        let t0 = Duration::from_secs(3);
        let mut now = t0;
        for i in 0..pieces {
            now += l.reserve_at(piece, now);
            // The bytes go out now; the caller comes back for the next piece late.
            if i + 1 < pieces {
                now += late(i);
            }
        }
        (piece * pieces) as f64 / (now - t0).as_secs_f64()
    }

    #[test]
    fn long_run_rate_matches_the_limit() {
        // 4 MiB pieces at 50, 200 and 500 MB/s for 20 s of virtual time; the caller comes
        // back 1–3 ms late every time (monoio's millisecond timer rounds up). The achieved
        // rate is the limit within the burst's share of the run (50 ms of 20 s = 0.25 %).
        for rate in [50_000_000u64, 200_000_000, 500_000_000] {
            let piece = 4u64 << 20;
            let pieces = rate * 20 / piece;
            let got = simulate(rate, piece, pieces, |i| Duration::from_millis(1 + i % 3));
            let err = got / rate as f64 - 1.0;
            assert!(
                (0.0..0.005).contains(&err),
                "rate {rate}: achieved {got:.0} B/s ({:+.3} %)",
                err * 100.0
            );
        }
    }

    #[test]
    fn a_late_caller_within_the_burst_loses_nothing() {
        // Every tenth piece the caller is 40 ms late (a descheduled thread, a write held up by
        // dirty-page writeback): shorter than the burst, so the rate is still the limit.
        let rate = 200_000_000u64;
        let piece = 1u64 << 20;
        let pieces = rate * 10 / piece;
        let late = |i: u64| Duration::from_millis(if i % 10 == 9 { 40 } else { 1 });
        let got = simulate(rate, piece, pieces, late);
        let err = got / rate as f64 - 1.0;
        assert!((0.0..0.01).contains(&err), "achieved {got:.0} B/s");
        // Stalls longer than the burst are lost (the limiter does not bank idle time).
        let late = |i: u64| Duration::from_millis(if i % 10 == 9 { 150 } else { 1 });
        let got = simulate(rate, piece, pieces, late);
        assert!(got < rate as f64 * 0.95, "achieved {got:.0} B/s");
    }

    #[test]
    fn one_reservation_never_exceeds_rate_plus_burst() {
        // A whole 64 MiB piece on an idle 100 MB/s bucket waits for its bytes.
        let l = RateLimiter::new(100_000_000);
        let w = l.reserve_at(64 << 20, Duration::from_secs(5));
        let own = Duration::from_nanos((64u64 << 20) * 10);
        assert_eq!(w, own - BURST);
    }

    #[test]
    fn a_virtual_clock_drives_the_decisions() {
        // 1 MB/s on a virtual clock: 100 KB reservations, each wait let pass on the clock.
        // The first ones fit in the burst (50 KB worth) only partly; from then on each waits
        // exactly its own 100 ms, and after 1 MB the clock reads 1 s less the burst.
        let clock = VirtualClock::new();
        let l = RateLimiter::with_clock(1_000_000, Clock::Virtual(clock.clone()));
        let mut waits = Vec::new();
        for _ in 0..10 {
            let w = l.reserve(100_000);
            assert_eq!(l.clock().pass(w), Duration::ZERO, "a virtual wait sleeps");
            waits.push(w.as_millis());
        }
        assert_eq!(waits, [50, 100, 100, 100, 100, 100, 100, 100, 100, 100]);
        assert_eq!(clock.now(), Duration::from_secs(1) - BURST);
        // Idle virtual time is not banked beyond the burst.
        clock.advance(Duration::from_secs(10));
        assert_eq!(l.reserve(1_000_000), Duration::from_secs(1) - BURST);
        // The system clock's waits are real.
        assert_eq!(Clock::system().pass(BURST), BURST);
    }

    #[test]
    fn rate_change_applies() {
        let l = RateLimiter::new(1);
        l.set_rate(0);
        assert_eq!(l.reserve(1000), Duration::ZERO);
    }
}

/// Rate limits (and the other knobs the manager may change) of one daemon, shared by both
/// planes; they can change while running. Every limiter of the daemon reads one [`Clock`].
#[derive(Debug)]
pub struct Shaping {
    clock: Clock,
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
    /// Limiters for `cfg` on the system clock.
    pub fn new(cfg: ShapingConfig) -> Self {
        Self::with_clock(cfg, Clock::system())
    }

    /// Limiters for `cfg` reading `clock` (a [`VirtualClock`] in tests).
    pub fn with_clock(cfg: ShapingConfig, clock: Clock) -> Self {
        Self {
            upload: RateLimiter::with_clock(cfg.upload, clock.clone()),
            download: RateLimiter::with_clock(cfg.download, clock.clone()),
            clock,
            per_peer_upload: AtomicU64::new(cfg.per_peer_upload),
            per_peer_download: AtomicU64::new(cfg.per_peer_download),
            pieces_in_flight: AtomicU64::new(0),
        }
    }

    /// The clock of every limiter of this daemon.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// A new limiter of `rate` bytes per second (0: unlimited) on this daemon's clock (for
    /// one connection or one download).
    pub fn limiter(&self, rate: u64) -> RateLimiter {
        RateLimiter::with_clock(rate, self.clock.clone())
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
