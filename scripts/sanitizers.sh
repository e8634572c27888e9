#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# The sanitizers and checkers (see "Sanitizers" in README.md):
#
#   miri   the library's unit tests that Miri can execute (config space,
#          capabilities, protocol parsing, migration, IRQ bookkeeping, DMA
#          table and bitmap helpers...) under `cargo +nightly miri`
#   tsan   the DMA thread-safety stress test (tests/dma_threads.rs) and the
#          library's unit tests under ThreadSanitizer, std rebuilt with it
#   asan   the C device tests (c-tests/device) and the C sample devices
#          (c-tests/samples, driven by tests/samples_devices.rs and
#          tests/examples.rs) built with -fsanitize=address,undefined, leak
#          checking on
#
# usage: scripts/sanitizers.sh [miri] [tsan] [asan]     (default: all three)
#
# Each part prints its result and how long it took; the script exits non-zero
# if any part found something or failed. Miri and ThreadSanitizer need a
# nightly toolchain with the miri and rust-src components; when they cannot
# be had the part prints a "SKIPPED: ... because ..." line and does not fail
# (set SANITIZERS_STRICT=1 to make that an error). ASan needs only cc.
#
# Environment:
#   NIGHTLY            the nightly toolchain (default: nightly)
#   CARGO_TARGET_DIR   where the normal (stable) build lives (default:
#                      ./target); Miri and ThreadSanitizer build under
#                      $CARGO_TARGET_DIR/sanitizers/ so that they never
#                      invalidate it
#   SANITIZERS_STRICT  1: a part that cannot run fails instead of skipping

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
SRC=$PWD

NIGHTLY=${NIGHTLY:-nightly}
TARGET_DIR=${CARGO_TARGET_DIR:-$SRC/target}
export CARGO_TARGET_DIR=$TARGET_DIR
SAN_DIR=$TARGET_DIR/sanitizers
HOST=$(rustc -vV | sed -n 's/^host: //p')
SAN_CFLAGS="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"

parts=("$@")
[[ ${#parts[@]} -gt 0 ]] || parts=(miri tsan asan)
for p in "${parts[@]}"; do
    case $p in
    miri | tsan | asan) ;;
    *)
        echo "usage: $0 [miri] [tsan] [asan]" >&2
        exit 2
        ;;
    esac
done

declare -a summary=()
failed=0

note() { printf '\n=== %s\n' "$*"; }

# skip PART WHY: a part that cannot run here.
skip() {
    echo "SKIPPED: $1 because $2"
    summary+=("$1: SKIPPED ($2)")
    if [[ ${SANITIZERS_STRICT:-0} == 1 ]]; then
        failed=1
    fi
}

# nightly_with COMPONENT...: the nightly toolchain has these components
# (installing them when missing); prints why not otherwise.
nightly_with() {
    local c
    if ! rustup run "$NIGHTLY" rustc --version >/dev/null 2>&1; then
        rustup toolchain install --profile minimal "$NIGHTLY" >/dev/null 2>&1 || {
            echo "no $NIGHTLY toolchain and 'rustup toolchain install $NIGHTLY' failed"
            return 1
        }
    fi
    for c in "$@"; do
        if ! rustup component list --installed --toolchain "$NIGHTLY" 2>/dev/null |
            grep "^$c" >/dev/null; then
            rustup component add "$c" --toolchain "$NIGHTLY" >/dev/null 2>&1 || {
                echo "'rustup component add $c --toolchain $NIGHTLY' failed"
                return 1
            }
        fi
    done
}

# ---- Miri ---------------------------------------------------------------------
#
# Miri cannot run what needs memfd_create, file-backed mmap, sendmsg/recvmsg,
# poll or AF_UNIX sockets. Tests that need them carry
# #[cfg_attr(miri, ignore = "...")] in the files this script may rely on;
# the modules below run whole. In the DMA controller's files (src/device/dma/
# mod.rs, controller.rs, translate.rs, tlb.rs, dirty.rs, region.rs, guest.rs)
# and src/transport/
# (where nearly every test maps memfds or talks over sockets) the few pure
# tests are listed by name instead; src/device/mod.rs's tests all open
# sockets and are not run.
MIRI_MODULES=(
    protocol::
    client::
    ffi::boundary::
    device::dma_msg::
    device::dma::snap::
    device::dma::table::
    device::irq::
    device::migration::
    device::pci::
    device::pci_caps::
    device::dma::rcu::
    device::region::
)
MIRI_NAMED=(
    device::dma::translate::tests::addr_to_sgl_need_more
    device::dma::dirty::tests::bitmap_helpers
    device::dma::tlb::tests::hint_is_per_controller
    device::dma::tests::layouts_match_upstream
    device::dma::controller::tests::max_regions
    device::dma::controller::tests::message_region_info
    device::dma::controller::tests::size_limits
    device::dma::translate::tests::small_table_copy_without_fds
    transport::fds::tests::garbage_lengths_end_the_truncated_walk
    transport::read_ahead::tests::last_message_start_walks_whole_and_partial_messages
)

# The model-checked churn of the DMA region table takes Miri about as long
# as all the rest together, so it runs in a second Miri process alongside
# (each Miri process keeps one core busy).
MIRI_ALONGSIDE=device::dma::table::tests::churn_matches_a_model

# miri_tests LOG FILTER...: one Miri run of the unit tests.
miri_tests() {
    local log=$1
    shift
    MIRIFLAGS=$MIRI_FLAGS CARGO_TARGET_DIR=$SAN_DIR/miri \
        cargo "+$NIGHTLY" miri test --lib -- "$@" >"$log" 2>&1
}

run_miri() {
    local why log log1 log2 rc1 rc2 passed ignored pid
    if ! why=$(nightly_with miri rust-src); then
        skip miri "$why"
        return
    fi
    mkdir -p "$SAN_DIR"
    # Isolation off: the IRQ tests fstat eventfds (Miri emulates eventfd,
    # but fstat only with isolation off). Permissive provenance: the C ABI
    # keeps IOVAs in pointer-typed fields (dma_sg_t.dma_addr, iovec.iov_base
    # of a DMA_MAP record); they are never dereferenced, and Miri's warning
    # about those integer-to-pointer casts would bury the output.
    MIRI_FLAGS="-Zmiri-disable-isolation -Zmiri-permissive-provenance ${MIRIFLAGS:-}"
    log1=$SAN_DIR/miri.log
    log2=$SAN_DIR/miri-alongside.log
    # Build once (also sets up Miri's sysroot), then the two runs.
    MIRIFLAGS=$MIRI_FLAGS CARGO_TARGET_DIR=$SAN_DIR/miri \
        cargo "+$NIGHTLY" miri test --lib --no-run >"$log1" 2>&1 || {
        echo "miri: the build FAILED; full log: $log1"
        tail -n 30 "$log1" | sed 's/^/    | /'
        summary+=("miri: FAILED (build)")
        failed=1
        return
    }
    miri_tests "$log2" "$MIRI_ALONGSIDE" --exact &
    pid=$!
    miri_tests "$log1" "${MIRI_MODULES[@]}" "${MIRI_NAMED[@]}" --skip "$MIRI_ALONGSIDE"
    rc1=$?
    wait "$pid"
    rc2=$?
    grep -h '^test result' "$log1" "$log2"
    passed=$(sed -n 's/^test result: .* \([0-9]*\) passed;.*/\1/p' "$log1" "$log2" |
        awk '{ s += $1 } END { print s + 0 }')
    ignored=$(sed -n 's/^test result: .* \([0-9]*\) ignored;.*/\1/p' "$log1" | tail -n 1)
    if [[ $rc1 -ne 0 || $rc2 -ne 0 ]]; then
        for log in "$log1" "$log2"; do
            grep -q '^test result: ok' "$log" && continue
            echo "miri FAILED; full log: $log"
            # Miri's report starts on the line of the test it stopped in.
            grep -E -m1 -A25 'error: |panicked' "$log" | sed 's/^/    | /'
        done
        summary+=("miri: FAILED")
        failed=1
    elif [[ $passed -lt 2 ]]; then
        echo "miri ran no tests"
        summary+=("miri: FAILED (no tests ran)")
        failed=1
    else
        summary+=("miri: ${passed} unit tests clean (${ignored:-0} ignored: they need fds or sockets)")
    fi
}

# ---- ThreadSanitizer ------------------------------------------------------------
#
# std is rebuilt with the sanitizer (-Zbuild-std) so that its own
# synchronization is visible to it. Skipped test:
#   report_64gib_is_fast  a timing bound that TSan's slowdown breaks
run_tsan() {
    local why log rc n
    if ! why=$(nightly_with rust-src); then
        skip tsan "$why"
        return
    fi
    log=$SAN_DIR/tsan.log
    mkdir -p "$SAN_DIR"
    RUSTFLAGS="-Zsanitizer=thread" RUSTDOCFLAGS="-Zsanitizer=thread" \
        TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1 ${TSAN_OPTIONS:-}" \
        CARGO_TARGET_DIR=$SAN_DIR/tsan \
        cargo "+$NIGHTLY" test -Zbuild-std --target "$HOST" --lib --test dma_threads -- \
        --skip report_64gib_is_fast \
        2>&1 | tee "$log" | grep -E '^(test result|SUMMARY|WARNING: ThreadSanitizer|thread .* panicked)'
    rc=${PIPESTATUS[0]}
    n=$(sed -n 's/^test result: .* \([0-9]*\) passed;.*/\1/p' "$log" | awk '{ s += $1 } END { print s + 0 }')
    if [[ $rc -ne 0 ]] || grep -q 'WARNING: ThreadSanitizer' "$log"; then
        echo "tsan FAILED (exit $rc); full log: $log"
        grep -A30 -m1 'WARNING: ThreadSanitizer' "$log" | sed 's/^/    | /'
        summary+=("tsan: FAILED")
        failed=1
    elif ! grep -q '^test sgl_users_race_with_map_unmap_and_dirty_reports \.\.\. ok' "$log"; then
        echo "tsan: the DMA stress test did not run"
        summary+=("tsan: FAILED (stress test did not run)")
        failed=1
    else
        summary+=("tsan: ${n:-0} tests clean (library unit tests + tests/dma_threads.rs)")
    fi
}

# ---- ASan + UBSan on the C side ----------------------------------------------------
#
# The library stays as built (it is Rust); the C programs are instrumented,
# and ASan's allocator sees every malloc, the library's included, so the
# leak checker covers both. Not under valgrind.
run_asan() {
    local prefix=$TARGET_DIR/asan-prefix rc=0 s1 s2 log bin
    if ! command -v cc >/dev/null; then
        skip asan "there is no cc"
        return
    fi
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

    # Device tests against an install tree of the release library.
    log=$TARGET_DIR/asan-device.log
    if make -s -C "$SRC" build >"$log" 2>&1 && rm -rf "$prefix" &&
        make -s -C "$SRC" install NO_BUILD=1 PREFIX="$prefix" DESTDIR= >>"$log" 2>&1; then
        EXTRA_CFLAGS=$SAN_CFLAGS bash "$SRC/c-tests/device/run.sh" "$prefix" >"$log" 2>&1 || rc=1
        grep -v '^ok ' "$log"
    else
        rc=1
        echo "building or installing the library failed:"
        tail -n 30 "$log" | sed 's/^/    | /'
    fi
    s1=$(tail -n 1 "$log")

    # Sample devices through the Rust tests that drive them; they link the
    # debug cdylib, which `cargo test` alone does not build.
    log=$TARGET_DIR/asan-samples.log
    if cargo build -q >"$log" 2>&1 && VFU_SAMPLES_CFLAGS=$SAN_CFLAGS \
        cargo test --no-fail-fast --test samples_devices --test examples >>"$log" 2>&1; then
        grep '^test result' "$log"
    else
        rc=1
        grep -E '^(test result|thread .* panicked)|Sanitizer|runtime error' "$log"
        echo "full log: $log"
    fi
    # The tests skip (and pass) when the samples cannot be built: make sure
    # they were, and with the sanitizers.
    for bin in "$TARGET_DIR"/tmp/samples/bin/{nulldev,gpio,migdev} \
        "$TARGET_DIR"/tmp/samples-examples/bin/migdev; do
        # (grep reads all of nm's output: with -q, nm could die of SIGPIPE.)
        if ! nm "$bin" 2>/dev/null | grep '__asan_init' >/dev/null; then
            echo "$bin missing or not built with ASan"
            rc=1
        fi
    done
    s2=$(sed -n 's/^test result: .* \([0-9]*\) passed;.*/\1/p' "$log" | awk '{ s += $1 } END { print s + 0 }')
    if [[ $rc -ne 0 ]]; then
        summary+=("asan: FAILED")
        failed=1
    else
        summary+=("asan: C device tests ${s1}; ${s2} sample-device tests passed")
    fi
}

total_start=$SECONDS
for p in "${parts[@]}"; do
    note "$p"
    t0=$SECONDS
    case $p in
    miri) run_miri ;;
    tsan) run_tsan ;;
    asan) run_asan ;;
    esac
    summary[${#summary[@]} - 1]+=" [$((SECONDS - t0))s]"
done

note "sanitizers summary ($((SECONDS - total_start))s)"
printf '%s\n' "${summary[@]}"
exit "$failed"
