//! How closely a sleeping loop on a monoio runtime follows a `RateLimiter`: reserves 4 MiB at a
//! time at 200 MB/s and prints the achieved rate.

use dataplane::shaper::RateLimiter;
use std::time::Instant;

fn main() {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let l = RateLimiter::new(200_000_000);
        let piece = 4u64 << 20;
        let n = 64;
        let t0 = Instant::now();
        let mut overshoot = std::time::Duration::ZERO;
        for _ in 0..n {
            let w = l.reserve(piece);
            let s = Instant::now();
            monoio::time::sleep(w).await;
            overshoot += s.elapsed().saturating_sub(w);
        }
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{} x {} B in {secs:.3}s = {:.1} MB/s (limit 200), total sleep overshoot {:?}",
            n,
            piece,
            (n * piece) as f64 / secs / 1e6,
            overshoot
        );
    });
}
