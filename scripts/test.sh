#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property and end-to-end tests (real processes
# on loopback). One dev-profile build (dependencies optimised) serves both the binaries and
# the tests; the release profile (LTO) is for the demo and the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
# Real parts the tests start themselves: a throwaway PostgreSQL cluster (manager store tests)
# and headless Chromium (manager status page); a registry, skopeo and containerd (registry
# mirror proxy, dfinit); Prometheus (dashboards); aria2 and opentracker (the burst lab's BitTorrent phase).
need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v docker-registry >/dev/null 2>&1 || need+=(docker-registry)
command -v skopeo >/dev/null 2>&1 || need+=(skopeo)
command -v containerd >/dev/null 2>&1 || need+=(containerd)
# Dashboards and alert rules run against a real Prometheus (e2e_prometheus).
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
# The burst lab test's BitTorrent phase (the lab would install them itself; here up front).
command -v aria2c >/dev/null 2>&1 || need+=(aria2)
command -v opentracker >/dev/null 2>&1 || need+=(opentracker)
# The burst lab (network namespaces, tc; curl for its HTTP baseline) and the full-disk test
# (mount of a tmpfs).
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v mount >/dev/null 2>&1 || need+=(mount)
# The HTTPS proxy test with a user's CA makes that CA with the openssl tool.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing ${need[*]} for the tests ..."
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
    else
        echo "note: ${need[*]} missing and cannot be installed here; the tests that need them will say SKIP" \
             "(or fail, with DAMSELFLY_STRICT=1 as in CI)" >&2
    fi
fi
# The object-storage test's S3 server, s3s-fs (crates.io), built once into a cache dir
# (0.14.1: the newest that builds with this toolchain).
tools="${DAMSELFLY_TOOLS:-$HOME/.cache/damselfly-tools}"
if [ ! -x "$tools/bin/s3s-fs" ] && ! command -v s3s-fs >/dev/null 2>&1; then
    echo "installing s3s-fs for the object-storage test into $tools ..."
    mkdir -p "$tools"
    if CARGO_TARGET_DIR="$tools/target" cargo install s3s-fs --version 0.14.1 --features binary \
        --locked --root "$tools" >"$tools/install.log" 2>&1; then
        rm -rf "$tools/target"
    else
        echo "note: cargo install s3s-fs failed (log: $tools/install.log); the S3 test will say SKIP" \
             "(or fail, with DAMSELFLY_STRICT=1)" >&2
    fi
fi
export PATH="$tools/bin:$PATH"
start=$(date +%s)
# Each test that needs a real part (Postgres, Chromium, a registry, namespaces, root) appends
# `real <test>` or `skip <test>` here (the `needs` crate); with DAMSELFLY_STRICT=1 a skip is a
# failure instead.
DAMSELFLY_REAL_PARTS_LOG=$(mktemp)
export DAMSELFLY_REAL_PARTS_LOG
trap 'rm -f "$DAMSELFLY_REAL_PARTS_LOG"' EXIT
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo build --workspace --bins
# Kubernetes manifests, systemd units, compose file (offline; flags checked against these binaries).
scripts/check-deploy.sh
cargo test --workspace
real=$(grep -c '^real ' "$DAMSELFLY_REAL_PARTS_LOG" || true)
skipped=$(grep -c '^skip ' "$DAMSELFLY_REAL_PARTS_LOG" || true)
echo "tests with real parts: $real ran with them, $skipped skipped (strict mode: ${DAMSELFLY_STRICT:-off})"
grep '^skip ' "$DAMSELFLY_REAL_PARTS_LOG" | sed 's/^skip /  skipped: /' || true
echo "test command took $(( $(date +%s) - start ))s"
