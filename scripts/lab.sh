#!/usr/bin/env bash
# Burst lab (needs root): builds the release binaries, then runs `loadgen cluster`: an origin,
# a scheduler, a seed peer and N dfdaemons in network namespaces on tc-shaped links; all N
# dfget at once, then a BitTorrent swarm on the same links (opentracker, aria2c seeding from
# the seed peer's host; both installed with apt-get when missing; --no-bittorrent skips it),
# then the same N hosts with plain HTTP (--no-baseline skips it); prints the table against T*
# with the origin's and the seed host's upload copies.
# The seed peer's link runs at the peers' --rate unless --seed-rate says otherwise
# (--seed-rate 1gbit: the generous seed).
# Example: scripts/lab.sh --hosts 20 --size 256MiB --rate 100mbit --origin-rate 1gbit \
#              --json lab.json --svg lab.svg
# Every flag goes to `loadgen cluster` (see `target/release/loadgen cluster --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
cargo build --release -p damselfly-cli -p damselfly-scheduler -p damselfly-loadgen
exec target/release/loadgen cluster "$@"
