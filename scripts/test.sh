#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property and end-to-end tests (real processes
# on loopback). One release build serves both the binaries and the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
start=$(date +%s)
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo build --release --workspace --bins
cargo test --release --workspace
echo "test command took $(( $(date +%s) - start ))s"
