#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# The 2025 and 2026 API forms against an installed libvfio-user:
#
#   api2025.c, api2026.c  the test device in each form (device_common.h),
#                         built as C and as C++ in several language modes
#                         with -Wall -Wextra -Werror, linked with the client
#                         side (driver.c and ../device/client.c) and run;
#   abi2025.c             a binary making the 2025 3-argument call of the
#                         exported vfu_setup_device_dma: it must be refused
#                         with EINVAL, and the 4-argument calls must work.
#
# usage: run.sh PREFIX [shared|static]
#
#   PREFIX  holds include/vfio-user/libvfio-user.h and, in its lib/ or in
#           LIBDIR, the library (libvfio-user.so, or libvfio-user.a)
#   shared  link -lvfio-user against the .so (default)
#   static  link the .a with exactly "-lvfio-user -pthread -ldl -lm -lrt"
#           (plus -ljson-c where it is installed, as SPDK's link line has)
#
# Environment: CC (cc), CXX (c++), LIBDIR (PREFIX/lib), KEEP_WORK=1,
# VFU_TEST_LOG=1 (the library's log on stderr).
# Prints one PASS/FAIL line per build, then "N passed, M failed".

set -u

if [[ $# -lt 1 || $# -gt 2 ]]; then
    echo "usage: $0 PREFIX [shared|static]" >&2
    exit 2
fi
PREFIX=$(cd "$1" && pwd) || exit 2
MODE=${2:-shared}
LIBDIR=${LIBDIR:-$PREFIX/lib}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CC=${CC:-cc}
CXX=${CXX:-c++}
STRICT=(-Wall -Wextra -Werror -g)
INC=(-I"$PREFIX/include" -I"$HERE" -I"$HERE/../device")

case $MODE in
shared)
    LIBS=(-L"$LIBDIR" -lvfio-user)
    [[ -e $LIBDIR/libvfio-user.so ]] || { echo "$LIBDIR/libvfio-user.so not found" >&2; exit 2; }
    ;;
static)
    # The directory must hold the archive only, or -lvfio-user would take
    # the .so.
    [[ -e $LIBDIR/libvfio-user.a ]] || { echo "$LIBDIR/libvfio-user.a not found" >&2; exit 2; }
    [[ ! -e $LIBDIR/libvfio-user.so ]] ||
        { echo "$LIBDIR has a libvfio-user.so; a static test needs the archive alone" >&2; exit 2; }
    LIBS=(-L"$LIBDIR" -lvfio-user -pthread -ldl -lm -lrt)
    if printf 'int main(void){return 0;}\n' | "$CC" -x c - -ljson-c -o /dev/null 2>/dev/null; then
        LIBS+=(-ljson-c)
    fi
    ;;
*)
    echo "unknown mode $MODE" >&2
    exit 2
    ;;
esac

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vfu-api-compat.XXXXXX") || exit 2
if [[ ${KEEP_WORK:-0} == 1 ]]; then
    echo "work directory: $WORK" >&2
else
    trap 'rm -rf "$WORK"' EXIT
fi

pass=0
fail=0
result() {
    if [[ $1 == 0 ]]; then
        echo "PASS $2"
        pass=$((pass + 1))
    else
        echo "FAIL $2"
        sed 's/^/    | /' "$WORK/$2.log" | tail -n 30
        fail=$((fail + 1))
    fi
}

# The client side, always C.
if ! { "$CC" -std=gnu11 "${STRICT[@]}" "${INC[@]}" -c "$HERE/driver.c" -o "$WORK/driver.o" &&
    "$CC" -std=gnu11 "${STRICT[@]}" "${INC[@]}" -c "$HERE/../device/client.c" -o "$WORK/client.o"; } \
    >"$WORK/client.log" 2>&1; then
    result 1 client
    echo "$pass passed, $fail failed"
    exit 1
fi

# run_form NAME COMPILER STD [EXTRA...]: builds the device of form NAME
# (api2025/api2026) with the given compiler and language mode, links and
# runs it.
run_form() {
    local form=$1 comp=$2 std=$3
    shift 3
    local tag="$form-$std${1:+-${1#-D}}-$MODE" lang=()
    [[ $comp == "$CXX" ]] && lang=(-x c++)
    if {
        "$comp" "${lang[@]}" -std="$std" "${STRICT[@]}" "$@" "${INC[@]}" \
            -c "$HERE/$form.c" -o "$WORK/$tag.o" &&
            "$comp" "$WORK/$tag.o" "$WORK/driver.o" "$WORK/client.o" -o "$WORK/$tag" "${LIBS[@]}" &&
            LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" timeout 60 "$WORK/$tag"
    } >"$WORK/$tag.log" 2>&1; then
        result 0 "$tag"
    else
        result 1 "$tag"
    fi
}

for form in api2025 api2026; do
    run_form "$form" "$CC" gnu99
    run_form "$form" "$CC" c11 -D_GNU_SOURCE
    run_form "$form" "$CC" gnu17 -DVFU_API_QUOTED_INCLUDE -I"$PREFIX/include/vfio-user"
    run_form "$form" "$CXX" c++11
    run_form "$form" "$CXX" gnu++17 -DVFU_API_QUOTED_INCLUDE -I"$PREFIX/include/vfio-user"
done

tag=abi2025-$MODE
if {
    "$CC" -std=gnu11 "${STRICT[@]}" -c "$HERE/abi2025.c" -o "$WORK/$tag.o" &&
        "$CC" "$WORK/$tag.o" -o "$WORK/$tag" "${LIBS[@]}" &&
        LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" timeout 60 "$WORK/$tag"
} >"$WORK/$tag.log" 2>&1; then
    result 0 "$tag"
else
    result 1 "$tag"
fi

echo "$pass passed, $fail failed"
[[ $fail -eq 0 ]]
