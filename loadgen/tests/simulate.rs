//! `loadgen simulate` end to end with the debug binaries (`cargo build --workspace --bins`
//! first): a real scheduler process, a few hundred virtual peers over gRPC, the JSON report
//! read back. Checks what the simulator promises (every peer finishes, every registration is
//! answered and timed, every announcement reaches the scheduler, the origin sends about one
//! copy), not how fast: timings are for `loadgen simulate` runs by hand.

use std::path::PathBuf;
use std::process::Command;

fn loadgen() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_loadgen"))
}

/// Runs `loadgen simulate` with `args` and returns its JSON report.
fn simulate(name: &str, args: &[&str]) -> serde_json::Value {
    let scheduler = loadgen().with_file_name("scheduler");
    assert!(
        scheduler.is_file(),
        "{} missing: run `cargo build --workspace --bins` before this test",
        scheduler.display()
    );
    let dir = std::env::temp_dir().join(format!("loadgen-sim-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let json = dir.join("report.json");
    let out = Command::new(loadgen())
        .arg("simulate")
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap_or_else(|e| panic!("running loadgen: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loadgen simulate failed:\n{stderr}");
    let text = std::fs::read_to_string(&json).unwrap_or_else(|e| panic!("{}: {e}", json.display()));
    let _ = std::fs::remove_dir_all(&dir);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("report is not JSON ({e}): {text}"))
}

fn f(report: &serde_json::Value, path: &[&str]) -> f64 {
    let mut v = report;
    for key in path {
        v = &v[*key];
    }
    v.as_f64()
        .unwrap_or_else(|| panic!("{path:?} missing or not a number in {report}"))
}

/// Uniform 100 Mbit hosts: the swarm finishes, the numbers in the report add up.
#[test]
fn uniform_swarm_finishes_and_reports() {
    let peers = 300.0;
    let r = simulate(
        "uniform",
        &["--peers", "300", "--size-mib", "32", "--piece-mib", "1"],
    );
    assert_eq!(f(&r, &["peers"]), peers);
    assert_eq!(f(&r, &["unfinished"]), 0.0, "{r}");
    assert_eq!(f(&r, &["completion_s", "count"]), peers);
    // Every registration got its answer timed: those made before the task's size was known
    // were answered when the seed reported it, the rest are decisions.
    assert_eq!(
        f(&r, &["decision_latency_us", "count"]) + f(&r, &["woken_by_metadata_us", "count"]),
        peers,
        "{r}"
    );
    assert!(f(&r, &["decision_latency_us", "p99"]) > 0.0);
    // Every finished piece was announced (32 per peer plus the seed's) and processed.
    assert_eq!(f(&r, &["announcements"]), (peers + 1.0) * 32.0, "{r}");
    assert_eq!(
        f(&r, &["announcements_processed"]),
        f(&r, &["announcements"])
    );
    assert_eq!(f(&r, &["streams_failed"]), 0.0, "{r}");
    // The seed fetched the task once; peers fed each other.
    let origin = f(&r, &["origin_copies"]);
    assert!((1.0..=1.05).contains(&origin), "origin copies {origin}");
    // Nobody can beat the lower bound.
    assert!(
        f(&r, &["completion_s", "max"]) >= f(&r, &["t_star_s"]) * 0.999,
        "{r}"
    );
}

/// The mixed fleet (four host speeds, three IDCs), peers arriving over a few seconds.
#[test]
fn mixed_fleet_with_arrivals_finishes() {
    let r = simulate(
        "mixed",
        &[
            "--peers",
            "200",
            "--size-mib",
            "16",
            "--piece-mib",
            "1",
            "--mixed",
            "--arrival-s",
            "2",
        ],
    );
    assert_eq!(f(&r, &["unfinished"]), 0.0, "{r}");
    assert_eq!(f(&r, &["streams_failed"]), 0.0, "{r}");
    assert_eq!(
        f(&r, &["announcements_processed"]),
        f(&r, &["announcements"])
    );
    let origin = f(&r, &["origin_copies"]);
    assert!((1.0..=1.05).contains(&origin), "origin copies {origin}");
}

/// The daemon model reproduces the scarce-seed failure and its fix: with every link at
/// 100 Mbit, the fixed window of the old daemon makes the seed upload the file to nearly
/// every peer, while today's daemon (rate-sized windows, a super-seeding seed) has it
/// upload each piece about once and the swarm finishes several times sooner.
#[test]
fn daemon_model_shows_the_scarce_seed_failure_and_its_fix() {
    let args = |model: &'static str| {
        [
            "--peers",
            "10",
            "--size-mib",
            "16",
            "--host-mbit",
            "100",
            "--origin-mbit",
            "100",
            "--model",
            model,
        ]
    };
    let old = simulate("fixed-window", &args("fixed-window"));
    let new = simulate("daemon", &args("daemon"));
    for r in [&old, &new] {
        assert_eq!(f(r, &["unfinished"]), 0.0, "{r}");
        let origin = f(r, &["origin_copies"]);
        assert!((1.0..=1.05).contains(&origin), "origin copies {origin}");
    }
    let (old_copies, new_copies) = (f(&old, &["seed_copies"]), f(&new, &["seed_copies"]));
    assert!(
        old_copies >= 3.0 && old_copies >= 1.5 * new_copies,
        "fixed window: seed uploaded {old_copies} copies (daemon: {new_copies})"
    );
    assert!(
        new_copies <= 2.5,
        "daemon: seed uploaded {new_copies} copies"
    );
    let (old_p50, new_p50) = (
        f(&old, &["completion_s", "p50"]),
        f(&new, &["completion_s", "p50"]),
    );
    assert!(
        old_p50 > 1.5 * new_p50,
        "fixed window p50 {old_p50} s vs daemon {new_p50} s"
    );
}
