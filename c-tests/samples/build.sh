#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Builds the sample devices (nulldev, gpio, migdev) against an installed
# libvfio-user, found with pkg-config under PREFIX (as installed by
# `make install PREFIX=...`). The programs get an rpath to PREFIX's library
# directory so that they run without LD_LIBRARY_PATH.
#
# Usage: build.sh PREFIX OUTDIR
# Environment: CC (default cc), CFLAGS (extra flags, appended).

set -euo pipefail

if [[ $# -ne 2 ]]; then
    echo "usage: $0 PREFIX OUTDIR" >&2
    exit 2
fi

PREFIX=$1
OUTDIR=$2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CC=${CC:-cc}

for tool in "$CC" pkg-config; do
    command -v "$tool" >/dev/null 2>&1 || { echo "$0: $tool not found" >&2; exit 1; }
done

export PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"
pkg-config --exists libvfio-user ||
    { echo "$0: libvfio-user.pc not found under $PREFIX/lib/pkgconfig" >&2; exit 1; }

read -r -a PC_CFLAGS <<<"$(pkg-config --cflags libvfio-user)"
read -r -a PC_LIBS <<<"$(pkg-config --libs libvfio-user)"
LIBDIR=$(pkg-config --variable=libdir libvfio-user)
read -r -a EXTRA <<<"${CFLAGS:-}"

mkdir -p "$OUTDIR"
for prog in nulldev gpio migdev; do
    "$CC" -Wall -Wextra -Werror -std=gnu11 -O2 -g "${EXTRA[@]}" "${PC_CFLAGS[@]}" \
        -o "$OUTDIR/$prog" "$HERE/$prog.c" "${PC_LIBS[@]}" -Wl,-rpath,"$LIBDIR"
done
