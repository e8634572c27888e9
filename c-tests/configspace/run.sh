#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Config space parity: builds cfgdump.c against an installed libvfio-user,
# runs it and compares its output with cfgdump.expected, the output of the
# same program run against the reference implementation's
# libvfio-user.so.0 (efd091b). See docs/parity.md for how it was captured.
#
# usage: run.sh PREFIX
#
#   PREFIX  an install prefix as made by `make install PREFIX=...`
#
# Environment: CC (default cc). Prints "1 passed, 0 failed" or the diff and
# "0 passed, 1 failed"; the exit status is 0 iff the outputs are identical.

set -u

if [[ $# -ne 1 ]]; then
    echo "usage: $0 PREFIX" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
prefix=$(cd "$1" && pwd) || exit 2
CC=${CC:-cc}

work=$(mktemp -d "${TMPDIR:-/tmp}/vfu-cfgdump.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT INT TERM

if ! "$CC" -std=gnu11 -Wall -Wextra -Werror -I"$prefix/include" \
        "$here/cfgdump.c" -L"$prefix/lib" -lvfio-user -o "$work/cfgdump"; then
    echo "FAIL cfgdump: does not build"
    echo "0 passed, 1 failed"
    exit 1
fi
if ! LD_LIBRARY_PATH="$prefix/lib" timeout 60 "$work/cfgdump" >"$work/out.txt"; then
    echo "FAIL cfgdump: exited with an error"
    cat "$work/out.txt"
    echo "0 passed, 1 failed"
    exit 1
fi
if ! diff -u "$here/cfgdump.expected" "$work/out.txt"; then
    echo "FAIL cfgdump: config space differs from the reference (- expected, + ours)"
    echo "0 passed, 1 failed"
    exit 1
fi
echo "ok cfgdump: $(grep -c '^== ' "$work/out.txt") config spaces identical to the reference"
echo "1 passed, 0 failed"
