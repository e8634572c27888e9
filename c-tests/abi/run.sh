#!/bin/sh
# SPDX-License-Identifier: BSD-3-Clause
# Build and run the C/C++ ABI checks for the public headers.
#
# usage: run.sh INCLUDE_DIR [LIB_DIR]
#
#   INCLUDE_DIR  directory holding vfio-user/*.h (e.g. <repo>/include)
#   LIB_DIR      optional: directory with libvfio-user.so; when given,
#                abi_lib_test.c is also built against it and run
#
# Environment: CC (default gcc), CXX (default g++).

set -u

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 INCLUDE_DIR [LIB_DIR]" >&2
    exit 2
fi

here=$(cd "$(dirname "$0")" && pwd)
inc=$(cd "$1" && pwd) || exit 2
libdir=
if [ $# -eq 2 ]; then
    libdir=$(cd "$2" && pwd) || exit 2
fi

CC=${CC:-gcc}
CXX=${CXX:-g++}
CFLAGS="-std=gnu11 -Wall -Wextra -Werror"
CXXFLAGS="-x c++ -std=gnu++17 -Wall -Wextra -Werror"

work=$(mktemp -d "${TMPDIR:-/tmp}/vfu-abi.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT INT TERM

status=0

fail() {
    echo "FAILED: $*"
    status=1
}

# compile LANG SOURCE OUTPUT EXTRA_FLAGS...   (OUTPUT "-" means syntax only)
compile() {
    lang=$1; src=$2; out=$3; shift 3
    # Source goes before the extra flags so that -l comes after it.
    if [ "$lang" = c ]; then
        cmd=$CC; langflags=$CFLAGS
    else
        cmd=$CXX; langflags=$CXXFLAGS
    fi
    if [ "$out" = - ]; then
        $cmd $langflags "$src" "$@" -fsyntax-only
    else
        $cmd $langflags "$src" "$@" -o "$out"
    fi
}

# 1. Every header must compile on its own, in both languages and through
#    both include styles: <vfio-user/x.h> with -I INCLUDE_DIR, and "x.h"
#    with -I INCLUDE_DIR/vfio-user.
headers=$(cd "$inc/vfio-user" && find . -name '*.h' | sed 's|^\./||' | sort)
if [ -z "$headers" ]; then
    fail "no headers found under $inc/vfio-user"
fi
n_hdr=0
for h in $headers; do
    tu="$work/alone_$(echo "$h" | tr '/.' '__').c"
    printf '#include <vfio-user/%s>\n' "$h" > "$tu"
    printf 'int vfu_abi_alone_marker;\n' >> "$tu"
    qtu="$work/quoted_$(echo "$h" | tr '/.' '__').c"
    printf '#include "%s"\n' "$h" > "$qtu"
    printf 'int vfu_abi_alone_marker;\n' >> "$qtu"
    for lang in c cxx; do
        compile $lang "$tu" - -I"$inc" ||
            fail "$h alone ($lang, <vfio-user/$h>)"
        compile $lang "$qtu" - -I"$inc/vfio-user" ||
            fail "$h alone ($lang, \"$h\")"
    done
    n_hdr=$((n_hdr + 1))
done
echo "self-contained header checks done for $n_hdr headers"

# 2. All headers together, twice, in forward then reverse order (guards).
all="$work/all_twice.c"
: > "$all"
for h in $headers; do
    printf '#include <vfio-user/%s>\n' "$h" >> "$all"
done
for h in $(echo "$headers" | sort -r); do
    printf '#include <vfio-user/%s>\n' "$h" >> "$all"
done
printf 'int vfu_abi_all_marker;\n' >> "$all"
for lang in c cxx; do
    compile $lang "$all" - -I"$inc" || fail "all headers twice ($lang)"
done

# 3. The ABI test proper, as C and as C++.
for lang in c cxx; do
    if compile $lang "$here/abi_test.c" "$work/abi_test_$lang" -I"$inc"; then
        echo "== abi_test ($lang)"
        "$work/abi_test_$lang" || fail "abi_test ($lang)"
    else
        fail "building abi_test ($lang)"
    fi
done

# 4. Optionally, the library-level checks (need libvfio-user.h and the .so).
if [ -n "$libdir" ]; then
    for lang in c cxx; do
        if compile $lang "$here/abi_lib_test.c" "$work/abi_lib_test_$lang" \
                -I"$inc" -L"$libdir" -Wl,-rpath,"$libdir" -lvfio-user; then
            echo "== abi_lib_test ($lang)"
            LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
                "$work/abi_lib_test_$lang" || fail "abi_lib_test ($lang)"
        else
            fail "building abi_lib_test ($lang)"
        fi
    done
fi

if [ $status -eq 0 ]; then
    echo "ALL ABI CHECKS PASSED"
fi
exit $status
