//! How many piece requests a child keeps outstanding at one parent.
//!
//! A parent answers a connection's requests in order, so every request queued there waits
//! for the ones before it, and a piece requested from one parent is fetched from no other
//! until it arrives. A fixed window (8 × 1 MiB) fills a fast link, but at a parent whose
//! uplink is shared by many children it parks seconds of pieces in one queue. [`RequestWindow`]
//! sizes the window from the rate this connection actually delivers: the piece on the wire,
//! plus what arrives in [`RequestWindow::queue_time`] at that rate (enough to cover the request
//! turnaround), within the configured `max_pieces` and `max_bytes`. It starts at
//! [`INITIAL_WINDOW`] pieces and follows the measured rate. No I/O, no clock reads: the
//! caller passes `now`.

use std::time::{Duration, Instant};

/// Window before the first rate sample: one piece on the wire and one queued.
pub const INITIAL_WINDOW: usize = 2;

/// Weight of a new rate sample in the moving average.
const RATE_GAIN: f64 = 0.3;

/// Per-connection request window (see the module documentation).
#[derive(Debug, Clone)]
pub struct RequestWindow {
    max_pieces: usize,
    max_bytes: u64,
    queue_time: Duration,
    /// Bytes per second delivered by this connection (moving average); `None` before the
    /// first sample.
    rate: Option<f64>,
    /// When the previous piece arrived while more were outstanding (the link stayed busy
    /// from then on, so the gap to the next arrival is pure transfer time).
    last_busy_arrival: Option<Instant>,
}

impl RequestWindow {
    /// A window of at most `max_pieces` pieces and `max_bytes` bytes (one piece always fits)
    /// that covers `queue_time` of this connection's rate. A zero `queue_time` keeps the
    /// window at `max_pieces` (the fixed window).
    pub fn new(max_pieces: usize, max_bytes: u64, queue_time: Duration) -> Self {
        Self {
            max_pieces: max_pieces.max(1),
            max_bytes: max_bytes.max(1),
            queue_time,
            rate: None,
            last_busy_arrival: None,
        }
    }

    /// Time of delivery the window covers beyond the piece on the wire.
    pub fn queue_time(&self) -> Duration {
        self.queue_time
    }

    /// Bytes per second measured so far.
    pub fn rate(&self) -> Option<f64> {
        self.rate
    }

    /// A piece of `bytes` arrived at `now`, requested at `requested`; `more_outstanding`:
    /// other requests were still outstanding behind it. Returns the time the parent spent on
    /// this piece: from its request or, when it queued behind the previous piece, from that
    /// piece's arrival (the wait in the parent's queue is not the parent being slow).
    pub fn on_piece(
        &mut self,
        bytes: u64,
        requested: Instant,
        now: Instant,
        more_outstanding: bool,
    ) -> Duration {
        // Back to back arrivals measure the link; a piece that came alone measures the link
        // plus one turnaround (a low estimate, corrected as soon as the window holds two).
        let since = match self.last_busy_arrival {
            Some(prev) if prev > requested => prev,
            _ => requested,
        };
        let took = now.saturating_duration_since(since);
        let secs = took.as_secs_f64();
        if secs > 0.0 {
            let sample = bytes as f64 / secs;
            self.rate = Some(match self.rate {
                Some(r) => r + RATE_GAIN * (sample - r),
                None => sample,
            });
        }
        self.last_busy_arrival = more_outstanding.then_some(now);
        took
    }

    /// Pieces of `piece_length` bytes to keep outstanding now.
    pub fn limit(&self, piece_length: u64) -> usize {
        let piece_length = piece_length.max(1);
        let by_bytes = usize::try_from(self.max_bytes / piece_length)
            .unwrap_or(usize::MAX)
            .max(1);
        let cap = self.max_pieces.min(by_bytes);
        if self.queue_time.is_zero() {
            return cap;
        }
        let want = match self.rate {
            None => INITIAL_WINDOW,
            Some(rate) => {
                let ahead = rate * self.queue_time.as_secs_f64() / piece_length as f64;
                1 + (ahead.ceil() as usize).max(1)
            }
        };
        want.clamp(1, cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Feeds `count` pieces arriving back to back at `rate` bytes/s.
    fn feed(w: &mut RequestWindow, start: Instant, rate: f64, count: u32) -> Instant {
        let per = Duration::from_secs_f64(MIB as f64 / rate);
        let mut now = start;
        for _ in 0..count {
            let requested = now;
            now += per;
            w.on_piece(MIB, requested, now, true);
        }
        now
    }

    #[test]
    fn starts_at_two_pieces() {
        let w = RequestWindow::new(8, 16 * MIB, Duration::from_millis(20));
        assert_eq!(w.limit(MIB), INITIAL_WINDOW);
    }

    #[test]
    fn a_100_mbit_parent_gets_two_pieces_and_a_loopback_one_the_cap() {
        let t0 = Instant::now();
        let mut slow = RequestWindow::new(8, 16 * MIB, Duration::from_millis(20));
        feed(&mut slow, t0, 12.5e6, 10);
        let r = slow.rate().unwrap_or(0.0);
        assert!((r - 12.5e6).abs() / 12.5e6 < 0.01, "rate {r}");
        assert_eq!(slow.limit(MIB), 2);

        let mut fast = RequestWindow::new(8, 16 * MIB, Duration::from_millis(20));
        feed(&mut fast, t0, 2e9, 10);
        assert_eq!(fast.limit(MIB), 8, "capped by max_pieces");
        assert_eq!(fast.limit(4 * MIB), 4, "capped by max_bytes");

        let mut gbit = RequestWindow::new(8, 16 * MIB, Duration::from_millis(20));
        feed(&mut gbit, t0, 125e6, 10);
        // 125 MB/s × 20 ms = 2.5 MB ahead: 3 pieces queued, one on the wire.
        assert_eq!(gbit.limit(MIB), 4);
    }

    #[test]
    fn the_window_follows_the_rate_down_when_a_parent_gets_busier() {
        let t0 = Instant::now();
        let mut w = RequestWindow::new(16, 64 * MIB, Duration::from_millis(50));
        let t1 = feed(&mut w, t0, 500e6, 10);
        let before = w.limit(MIB);
        feed(&mut w, t1, 10e6, 20);
        let after = w.limit(MIB);
        assert!(before > 10, "{before}");
        assert_eq!(after, 2);
    }

    #[test]
    fn a_piece_that_came_alone_counts_its_turnaround() {
        let t0 = Instant::now();
        let mut w = RequestWindow::new(8, 16 * MIB, Duration::from_millis(20));
        // Requested at t0, arrived 100 ms later with nothing behind it: 10 MiB/s at most.
        w.on_piece(MIB, t0, t0 + Duration::from_millis(100), false);
        let r = w.rate().unwrap_or(0.0);
        assert!((r - MIB as f64 * 10.0).abs() < 1.0, "rate {r}");
    }

    #[test]
    fn zero_queue_time_is_the_fixed_window() {
        let mut w = RequestWindow::new(8, 16 * MIB, Duration::ZERO);
        assert_eq!(w.limit(MIB), 8);
        feed(&mut w, Instant::now(), 1e6, 5);
        assert_eq!(w.limit(MIB), 8);
    }
}
