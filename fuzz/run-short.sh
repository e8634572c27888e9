#!/bin/sh
# Short fuzzing run for CI: builds the fuzz targets (libFuzzer + ASan, via
# cargo-fuzz) and runs each one for a fixed time, starting from the seed
# corpus in fuzz/corpus/<target>/ (new inputs go to a scratch directory, so
# the committed corpus is left alone). Prints one summary line per target
# and exits non-zero when a target crashed, leaked, hung or failed to build;
# the crashing input is then in fuzz/artifacts/<target>/.
#
#   fuzz/run-short.sh [SECONDS] [TARGET...]
#
# SECONDS defaults to 60 per target; TARGET defaults to all of them. Needs
# `cargo install cargo-fuzz`. On a stable toolchain RUSTC_BOOTSTRAP=1 is set
# for the -Z flags cargo-fuzz passes.
#
# Memory is judged by what is used, not by what is asked for: a client may
# legitimately make the server allocate a dirty bitmap of up to 1/8 of a
# DMA region (8 TiB at most) when it asks for byte-sized logging pages;
# the zeroed pages cost nothing until the device dirties guest memory, and
# an allocation that fails must become ENOMEM (allocator_may_return_null
# lets the library see the failure; a Rust allocation that aborts instead
# shows as a crash). So single allocations are only limited to 1 TiB
# (-malloc_limit_mb), while the resident size is limited to 4 GiB
# (-rss_limit_mb).

set -u

here=$(cd "$(dirname "$0")" && pwd)
cd "$here" || exit 2

secs=${1:-60}
[ $# -gt 0 ] && shift
targets=${*:-parse session migration}

export RUSTC_BOOTSTRAP=${RUSTC_BOOTSTRAP:-1}
export ASAN_OPTIONS=${ASAN_OPTIONS:-allocator_may_return_null=1}

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run-short: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 2
fi

# cargo fuzz build takes one target at a time.
for t in $targets; do
    if ! cargo fuzz build "$t"; then
        echo "run-short: build of $t failed" >&2
        exit 1
    fi
done

scratch=$(mktemp -d "${TMPDIR:-/tmp}/vfu-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT INT TERM

status=0
for t in $targets; do
    mkdir -p "$scratch/$t" "corpus/$t"
    log="$scratch/$t.log"
    start=$(date +%s)
    cargo fuzz run "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=30 -max_len=8192 \
        -malloc_limit_mb=1048576 -rss_limit_mb=4096 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    took=$(($(date +%s) - start))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    cov=$(sed -n 's/.*DONE *cov: \([0-9]*\) .*/\1/p' "$log" | tail -n 1)
    if [ "$rc" -eq 0 ]; then
        echo "fuzz $t: ok, ${runs:-?} runs in ${took}s, coverage ${cov:-?} edges"
    else
        echo "fuzz $t: FAILED (exit $rc) after ${runs:-?} runs in ${took}s; artifacts in $here/artifacts/$t/"
        grep -E 'panicked at|ERROR: |SUMMARY|SIGPIPE|assertion|left:|right:' "$log" | head -n 20
        tail -n 40 "$log" | grep -E 'Test unit written|Base64' || true
        status=1
    fi
done
exit $status
