#!/usr/bin/env bash
# Fuzzes every parser of untrusted input with libFuzzer (cargo-fuzz) on the stable toolchain.
#
#   scripts/fuzz.sh [TARGET|all] [SECONDS]     # default: all targets, 60 s each
#
# Targets run one after another, single process each; at the end a table gives the number of
# executions per target. Environment:
#   FUZZ_RUNS=N              also stop a target after N executions (whichever comes first)
#   FUZZ_SANITIZER=address   build with AddressSanitizer (needs -Z flags: sets RUSTC_BOOTSTRAP=1);
#                            default `none`, which needs nothing but stable rustc
# Inputs that crash are kept in fuzz/artifacts/TARGET/, new corpus entries in fuzz/corpus/TARGET/
# (seeds: fuzz/seeds/TARGET/), the full log in fuzz/logs/TARGET.log. Exit status 1 when any
# target failed. See fuzz/README.md.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
fuzz="$root/fuzz"
what="${1:-all}"
seconds="${2:-60}"
runs="${FUZZ_RUNS:-0}"
sanitizer="${FUZZ_SANITIZER:-none}"
# Memory: a process over 512 MB RSS fails the run; a single allocation over 32 MiB aborts it
# (CappedAlloc in fuzz/src/lib.rs; libFuzzer's own -malloc_limit_mb works only with ASan).
limits=(-rss_limit_mb=512 -malloc_limit_mb=32 -timeout=10 -max_len=4096)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz from crates.io" >&2
    cargo install cargo-fuzz --locked
fi
if ! command -v c++ >/dev/null 2>&1; then
    echo "libfuzzer-sys compiles libFuzzer: install a C++ compiler (apt-get install g++)" >&2
    exit 1
fi
build_flags=(--release --debug-assertions --sanitizer "$sanitizer")
if [[ "$sanitizer" != none ]]; then
    export RUSTC_BOOTSTRAP=1
fi

cd "$fuzz"
mapfile -t all < <(cargo fuzz list)
if [[ "$what" == all ]]; then
    targets=("${all[@]}")
elif printf '%s\n' "${all[@]}" | grep -qx "$what"; then
    targets=("$what")
else
    echo "unknown target $what; targets: ${all[*]}" >&2
    exit 2
fi

cargo fuzz build "${build_flags[@]}"
mkdir -p logs
declare -A execs took status
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "seeds/$t"
    echo "== $t: ${seconds}s$([[ $runs -gt 0 ]] && echo ", at most $runs executions")" >&2
    start=$(date +%s)
    if cargo fuzz run "${build_flags[@]}" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -runs="$((runs > 0 ? runs : -1))" -print_final_stats=1 \
        "${limits[@]}" >"logs/$t.log" 2>&1; then
        status[$t]=ok
    else
        status[$t]=FAILED
        tail -n 40 "logs/$t.log" >&2
    fi
    took[$t]=$(($(date +%s) - start))
    execs[$t]=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$t.log" | tail -n 1)
done

failed=0
printf '\n%-18s %14s %8s %12s  %s\n' target executions seconds exec/s result
for t in "${targets[@]}"; do
    n="${execs[$t]:-0}"
    printf '%-18s %14s %8s %12s  %s\n' "$t" "$n" "${took[$t]}" "$((n / (took[$t] > 0 ? took[$t] : 1)))" "${status[$t]}"
    [[ "${status[$t]}" == ok ]] || failed=1
done
exit "$failed"
