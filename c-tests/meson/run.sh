#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# The meson build of this tree (meson.build at the top), the ways SPDK and
# QEMU use it:
#
#   standalone-static   setup --buildtype debug -Ddefault_library=static
#                       -Dlibdir=/usr/local/lib (and the C library's option
#                       names), compile, install with DESTDIR; only the
#                       archive may land in libdir; the api-compat tests
#                       then link it with -lvfio-user -pthread -ldl -lm -lrt;
#                       the CMake package offers it as libvfio-user::libvfio-user
#   standalone-shared   the same with --buildtype release and
#                       default_library=shared: the
#                       .so -> .so.0 -> .so.VERSION chain with SONAME
#                       libvfio-user.so.0 and no archive; api-compat tests
#                       linked against it; CMake finds the .so
#   same-as-make-install  default_library=both installs exactly what
#                       `make install` installs, file for file
#   subproject-static,  a parent project (parent/, buildtype release) with
#   subproject-shared   this tree as subprojects/libvfio-user, both include
#                       forms, C and C++, built with -Werror and run
#
# usage: run.sh [CARGO_TARGET_DIR]
#
# The cargo target directory is handed to the meson builds
# (-Dcargo-target-dir) so that they reuse what cargo already built; without
# it, each build compiles the library in its own build directory.
# Environment: MESON (default meson), KEEP_WORK=1.
# Prints one PASS/FAIL line per check, then "N passed, M failed".

set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
HERE=$(dirname "$SCRIPT")
SRC=$(cd "$HERE/../.." && pwd)
MESON=${MESON:-meson}

CHECKS=(
    standalone-static
    standalone-shared
    same-as-make-install
    subproject-static
    subproject-shared
)

# The option names of the C library's meson build, with their defaults.
UPSTREAM_OPTS=(-Drpath=auto -Dtran-pipe=false -Ddebug-logs=auto
    -Dshadow-ioeventfd=false -Dclient-server-test=false -Ddebug-sgl=false)

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

target_opt() {
    if [[ -n $TARGET ]]; then
        printf '%s\n' "-Dcargo-target-dir=$TARGET"
    fi
}

# standalone KIND BUILDTYPE: SPDK's sequence; installs under
# $WORK/$NAME/dest.
standalone() {
    local kind=$1 buildtype=$2 build=$WORK/$NAME/build
    # shellcheck disable=SC2046 # target_opt prints zero or one word
    "$MESON" setup --buildtype "$buildtype" -Ddefault_library="$kind" -Dlibdir=/usr/local/lib \
        "${UPSTREAM_OPTS[@]}" $(target_opt) "$build" "$SRC"
    "$MESON" compile -C "$build"
    DESTDIR=$WORK/$NAME/dest "$MESON" install --quiet -C "$build"
    DEST=$WORK/$NAME/dest/usr/local
    log "installed:"
    (cd "$WORK/$NAME/dest" && find . | sort) >&2
}

# cmake_consumer TYPE: the installed CMake package, used from its DESTDIR
# location, gives libvfio-user::libvfio-user as TYPE; the consumer built
# with it runs.
cmake_consumer() {
    local type=$1 out
    cmake -S "$HERE/cmake" -B "$WORK/$NAME/cmake" -DCMAKE_BUILD_TYPE=Release \
        -DCMAKE_PREFIX_PATH="$DEST" -DVFU_EXPECT_TYPE="$type" \
        -DVFU_CONSUMER_C="$HERE/../consumers/consumer.c" >&2
    cmake --build "$WORK/$NAME/cmake" >&2
    out=$(LD_LIBRARY_PATH="$DEST/lib" "$WORK/$NAME/cmake/consumer" "$WORK/$NAME/consumer.sock")
    [[ $out == ok ]] || die "the CMake consumer printed '$out'"
}

check_common_files() {
    local f
    for f in libvfio-user.h vfio-user.h pci_defs.h pci_caps/common.h pci_caps/dsn.h \
        pci_caps/msi.h pci_caps/msix.h pci_caps/pm.h pci_caps/px.h; do
        [[ -f $DEST/include/vfio-user/$f ]] || die "missing include/vfio-user/$f"
    done
    for f in pkgconfig/libvfio-user.pc cmake/libvfio-user/libvfio-userConfig.cmake \
        cmake/libvfio-user/libvfio-userConfigVersion.cmake; do
        [[ -f $DEST/lib/$f ]] || die "missing lib/$f"
    done
    grep -qx 'prefix=/usr/local' "$DEST/lib/pkgconfig/libvfio-user.pc" ||
        die "the .pc file does not say prefix=/usr/local"
}

check_standalone_static() {
    standalone static debug
    check_common_files
    local libs
    libs=$(cd "$DEST/lib" && find . -maxdepth 1 ! -type d | sort | tr '\n' ' ')
    [[ $libs == './libvfio-user.a ' ]] || die "lib/ holds '$libs', expected only libvfio-user.a"
    cmake_consumer STATIC_LIBRARY
    "$HERE/../api-compat/run.sh" "$DEST" static
}

check_standalone_shared() {
    standalone shared release
    check_common_files
    local libs version soname
    version=$("$MESON" introspect --projectinfo "$WORK/$NAME/build" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')
    libs=$(cd "$DEST/lib" && find . -maxdepth 1 ! -type d | sort | tr '\n' ' ')
    [[ $libs == "./libvfio-user.so ./libvfio-user.so.0 ./libvfio-user.so.$version " ]] ||
        die "lib/ holds '$libs', expected the libvfio-user.so chain only"
    [[ $(readlink "$DEST/lib/libvfio-user.so") == libvfio-user.so.0 ]] || die "bad libvfio-user.so link"
    [[ $(readlink "$DEST/lib/libvfio-user.so.0") == "libvfio-user.so.$version" ]] ||
        die "bad libvfio-user.so.0 link"
    [[ -f $DEST/lib/libvfio-user.so.$version && ! -L $DEST/lib/libvfio-user.so.$version ]] ||
        die "libvfio-user.so.$version is not a file"
    soname=$(readelf -d "$DEST/lib/libvfio-user.so.$version" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
    [[ $soname == libvfio-user.so.0 ]] || die "SONAME is '$soname'"
    cmake_consumer SHARED_LIBRARY
    "$HERE/../api-compat/run.sh" "$DEST" shared
}

check_same_as_make_install() {
    standalone both release
    local build=$WORK/$NAME/build version
    version=$("$MESON" introspect --projectinfo "$build" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["version"])')
    make -s -f "$SRC/Makefile" install NO_BUILD=1 DESTDIR="$WORK/$NAME/make-dest" \
        PREFIX=/usr/local LIB_SO="$build/libvfio-user.so.$version" LIB_A="$build/libvfio-user.a" \
        VFUCTL="$build/vfuctl" >&2
    diff -r "$WORK/$NAME/make-dest" "$WORK/$NAME/dest" >&2 ||
        die "meson install and make install differ"
    log "same files, same contents"
}

# subproject KIND: builds parent/ with this tree as its subproject.
subproject() {
    local kind=$1 parent=$WORK/$NAME/parent bin
    mkdir -p "$parent/subprojects"
    cp "$HERE"/parent/* "$parent/"
    cp "$HERE"/../api-compat/{api_device.h,device_common.h,api2025.c,api2026.c,driver.c} "$parent/"
    cp "$HERE"/../device/{client.c,client.h} "$parent/"
    ln -s "$SRC" "$parent/subprojects/libvfio-user"
    local opts=(-Dlibvfio-user:default_library="$kind")
    if [[ -n $TARGET ]]; then
        opts+=(-Dlibvfio-user:cargo-target-dir="$TARGET")
    fi
    "$MESON" setup --buildtype release "${opts[@]}" "$WORK/$NAME/build" "$parent"
    "$MESON" compile -C "$WORK/$NAME/build" -v
    for bin in api2025-quoted api2026-angle-cxx; do
        if [[ $kind == static ]]; then
            ! readelf -d "$WORK/$NAME/build/$bin" | grep NEEDED | grep -q vfio ||
                die "$bin needs a shared libvfio-user"
        else
            readelf -d "$WORK/$NAME/build/$bin" | grep NEEDED | grep -q 'libvfio-user\.so\.0' ||
                die "$bin does not need libvfio-user.so.0"
        fi
        (cd "$WORK" && timeout 60 "$WORK/$NAME/build/$bin") >&2 || die "$bin failed"
    done
}

check_subproject_static() { subproject static; }
check_subproject_shared() { subproject shared; }

## Driver.

if [[ ${1-} == --one ]]; then
    NAME=$2 WORK=$3 TARGET=$4
    "check_${NAME//-/_}"
    exit 0
fi

[[ $# -le 1 ]] || { log "usage: $0 [CARGO_TARGET_DIR]"; exit 2; }
TARGET=
if [[ $# -eq 1 ]]; then
    mkdir -p "$1"
    TARGET=$(cd "$1" && pwd)
fi
for tool in "$MESON" ninja cargo readelf cc c++ python3 cmake make; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found"
done
log "meson $("$MESON" --version)"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vfu-meson.XXXXXX")
if [[ ${KEEP_WORK:-0} == 1 ]]; then
    log "work directory: $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi

pass=0
fail=0
for name in "${CHECKS[@]}"; do
    start=$SECONDS
    if bash "$SCRIPT" --one "$name" "$WORK" "$TARGET" >"$WORK/$name.log" 2>&1; then
        echo "PASS $name ($((SECONDS - start)) s)"
        pass=$((pass + 1))
    else
        echo "FAIL $name"
        tail -n 30 "$WORK/$name.log" | sed 's/^/    | /'
        fail=$((fail + 1))
    fi
done
echo "$pass passed, $fail failed"
[[ $fail -eq 0 ]]
