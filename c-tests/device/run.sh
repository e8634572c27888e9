#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Builds and runs the device-core C tests against an installed libvfio-user.
#
# usage: run.sh PREFIX
#
#   PREFIX  an install prefix as made by `make install PREFIX=...`:
#           PREFIX/include/vfio-user/libvfio-user.h and
#           PREFIX/lib/libvfio-user.so must exist
#
# Environment:
#   CC            C compiler (default cc)
#   EXTRA_CFLAGS  more compiler and linker flags, e.g. for the sanitizers:
#                 "-fsanitize=address,undefined -fno-sanitize-recover=all".
#                 With any -fsanitize flag the tests do not run under
#                 valgrind (the two do not mix); ASan's leak checker takes
#                 its place.
#   VALGRIND=0    do not run the tests under valgrind even if it is installed
#   VFU_TEST_LOG  if set, the test servers print the library's log on stderr
#   KEEP_WORK=1   keep the temporary build directory
#
# Every test program prints "ok NAME" or "FAIL NAME: why" per check; a
# program that exits non-zero without printing a FAIL line (a crash, a
# memory error found by valgrind, a timeout) counts as one more failure.
# The last line is "N passed, M failed"; the exit status is 0 iff M is 0.

set -u

TESTS=(
    test_lifecycle
    test_negotiate
    test_info
    test_region
    test_reset
    test_errors
    test_fds
)

# Seconds one test program may run (valgrind included).
TIMEOUT=${TIMEOUT:-50}

if [[ $# -ne 1 ]]; then
    echo "usage: $0 PREFIX" >&2
    exit 2
fi
if [[ ! -f $1/include/vfio-user/libvfio-user.h ]]; then
    echo "$1/include/vfio-user/libvfio-user.h not found" >&2
    exit 2
fi
PREFIX=$(cd "$1" && pwd)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CC=${CC:-cc}
read -r -a EXTRA <<<"${EXTRA_CFLAGS:-}"
CFLAGS=(-Wall -Wextra -Werror -std=gnu11 -g "${EXTRA[@]}" -I"$PREFIX/include")
LIBS=(-L"$PREFIX/lib" -lvfio-user)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vfu-device-tests.XXXXXX") || exit 2
if [[ ${KEEP_WORK:-0} == 1 ]]; then
    echo "work directory: $WORK" >&2
else
    trap 'rm -rf "$WORK"' EXIT
fi

USE_VALGRIND=0
SANITIZED=0
[[ " ${EXTRA[*]} " == *" -fsanitize="* ]] && SANITIZED=1
if [[ $SANITIZED == 0 && ${VALGRIND:-1} != 0 ]] && command -v valgrind >/dev/null 2>&1; then
    USE_VALGRIND=1
fi
if [[ $SANITIZED == 1 ]]; then
    # Leak checking on (the default, made explicit); a UBSan finding is
    # fatal and comes with a stack.
    export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
    export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
    echo "sanitized build (${EXTRA[*]}), not under valgrind" >&2
fi

passed=0
failed=0

# fail_line NAME WHY: a failure not reported by a test program itself.
fail_line() {
    echo "FAIL $1: $2"
    failed=$((failed + 1))
}

# show FILE: indents the interesting part of a log file.
show() {
    [[ -s $1 ]] && tail -n 40 "$1" | sed 's/^/    | /'
}

# Shared helpers, compiled once.
helpers_ok=1
for src in client device; do
    if ! "$CC" "${CFLAGS[@]}" -c "$HERE/$src.c" -o "$WORK/$src.o" 2>"$WORK/$src.cc.log"; then
        fail_line "build/$src" "does not compile"
        show "$WORK/$src.cc.log"
        helpers_ok=0
    fi
done

for t in "${TESTS[@]}"; do
    name=${t#test_}
    bin=$WORK/$t
    if [[ $helpers_ok != 1 ]] ||
        ! "$CC" "${CFLAGS[@]}" "$HERE/$t.c" "$WORK/client.o" "$WORK/device.o" \
            -o "$bin" "${LIBS[@]}" 2>"$WORK/$t.cc.log"; then
        fail_line "$name" "does not build"
        show "$WORK/$t.cc.log"
        continue
    fi

    cmd=("$bin")
    if [[ $USE_VALGRIND == 1 ]]; then
        # Forked servers stay under valgrind, each with its own log.
        cmd=(valgrind --quiet --error-exitcode=1 --leak-check=full
             --show-leak-kinds=definite --errors-for-leak-kinds=definite
             --track-fds=no --log-file="$WORK/$t.vg.%p" "$bin")
    fi

    LD_LIBRARY_PATH="$PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        timeout -k 5 "$TIMEOUT" "${cmd[@]}" >"$WORK/$t.out" 2>"$WORK/$t.err" </dev/null
    status=$?

    # Pass the program's verdict lines through and count them.
    grep -E '^(ok|FAIL) ' "$WORK/$t.out"
    p=$(grep -c '^ok ' "$WORK/$t.out")
    f=$(grep -c '^FAIL ' "$WORK/$t.out")
    passed=$((passed + p))
    failed=$((failed + f))

    if [[ $status -ne 0 && $f -eq 0 ]]; then
        if [[ $status -eq 124 || $status -eq 137 ]]; then
            fail_line "$name" "timed out after ${TIMEOUT}s"
        else
            fail_line "$name" "exited with status $status"
        fi
    fi
    if [[ $status -ne 0 || $f -ne 0 ]]; then
        show "$WORK/$t.err"
        for vg in "$WORK/$t".vg.*; do
            [[ -s $vg ]] && { echo "    valgrind log ${vg##*.}:"; show "$vg"; }
        done
    fi
    if [[ $p -eq 0 && $f -eq 0 && $status -eq 0 ]]; then
        fail_line "$name" "ran no checks"
    fi
done

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
