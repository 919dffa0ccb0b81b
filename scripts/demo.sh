#!/usr/bin/env bash
# Local cluster demo: builds the release binaries, then starts a built-in HTTP origin, the
# manager (SQLite), the scheduler, one seed peer and N peers on loopback, downloads one generated file on every
# peer at once, verifies every copy and prints timings, origin bytes and the seed's upload copies.
# Flags go to the demo binary: --size 256MiB --peers 4 --threads 1 --keep
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release --workspace --bins
exec target/release/demo "$@"
