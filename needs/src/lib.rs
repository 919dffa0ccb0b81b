//! `needs`: the one place that decides what a test does when a real part it needs is missing
//! (PostgreSQL, Chromium, `docker-registry`, `skopeo`, containerd, `ip netns`, curl, root for
//! a tmpfs mount, ...).
//!
//! * Normally the test prints `SKIP <test>: <what is missing>` and passes (so a developer
//!   without those parts can still run `cargo test`).
//! * With `DAMSELFLY_STRICT=1` (CI sets it in `.ci/run`) the test fails instead, naming what
//!   is missing: a green CI run means every test ran with its real parts.
//!
//! When `DAMSELFLY_REAL_PARTS_LOG` names a file, [`skip`] and [`found`] append one line each
//! (`skip <test>` or `real <test>`) so that `scripts/test.sh` can say in its summary how many
//! tests ran with their real parts and how many skipped.
//!
//! [`fuzz`] reads the fuzz targets' seed corpora for the replay tests (`tests/fuzz_corpus.rs`
//! in each fuzzed crate).
//!
//! No dependencies: every crate's tests may use it as a dev-dependency.

use std::io::Write as _;

pub mod fuzz;

/// Environment variable: when set to anything but empty or `0`, a missing real part fails the
/// test instead of skipping it.
pub const STRICT_VAR: &str = "DAMSELFLY_STRICT";

/// Environment variable: a file to which [`skip`] and [`found`] append one line each.
pub const LOG_VAR: &str = "DAMSELFLY_REAL_PARTS_LOG";

/// Whether strict mode is on ([`STRICT_VAR`] set, not empty, not `0`).
pub fn strict() -> bool {
    std::env::var(STRICT_VAR).is_ok_and(|v| !v.is_empty() && v != "0")
}

fn log(kind: &str, test: &str) {
    let Some(path) = std::env::var_os(LOG_VAR) else {
        return;
    };
    // One short write per line, in append mode: lines from parallel test processes do not
    // interleave. A log that cannot be written only costs the summary its count.
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = f.write_all(format!("{kind} {test}\n").as_bytes());
    }
}

/// `test` cannot run because `missing` (a sentence naming the part and how to get it) is
/// absent. In strict mode this panics with that message; otherwise it prints `SKIP` and
/// returns, and the caller returns too.
#[track_caller]
pub fn skip(test: &str, missing: &str) {
    if strict() {
        panic!(
            "{test}: {missing} ({STRICT_VAR} is set, so a missing part is a failure, not a SKIP)"
        );
    }
    eprintln!("SKIP {test}: {missing}");
    log("skip", test);
}

/// `test` found every real part it needs and runs with them (counted in the summary of
/// `scripts/test.sh`).
pub fn found(test: &str) {
    log("real", test);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strict_mode_turns_a_skip_into_a_failure() {
        // Only this test touches the variables of this process. Its own skips are not real
        // tests: keep them out of the test command's summary.
        std::env::remove_var(LOG_VAR);
        std::env::set_var(STRICT_VAR, "1");
        let failed = std::panic::catch_unwind(|| skip("t", "chromium not installed"));
        let message = failed
            .expect_err("a skip in strict mode panics")
            .downcast::<String>()
            .expect("a formatted message");
        assert!(message.contains("chromium not installed"), "{message}");
        std::env::set_var(STRICT_VAR, "0");
        assert!(std::panic::catch_unwind(|| skip("t", "x")).is_ok());
        std::env::remove_var(STRICT_VAR);
        assert!(!strict());
    }
}
