#!/usr/bin/env bash
#
# Builds and runs small C consumers of libvfio-user against an install tree
# (as produced by `make install PREFIX=...`), the ways real projects consume it:
# plain pkg-config, CMake find_package(CONFIG), CMake through pkg-config and
# meson, plus checks of the installed tree itself.
#
# Usage: run.sh PREFIX
#
# Needs: cc, c++, pkg-config, cmake, meson, ninja, readelf, nm, ldd.
# Everything is built under a fresh temporary directory (removed afterwards
# unless KEEP_WORK=1). Prints one PASS/FAIL line per check, then
# "N passed, M failed"; exits 0 iff nothing failed.

set -euo pipefail

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
HERE=$(dirname "$SCRIPT")

CONSUMERS=(
    install-layout
    headers-standalone
    exports
    pkgconfig-angle
    pkgconfig-quoted
    pkgconfig-cxx
    pkgconfig-static
    cmake-config
    cmake-config-quoted
    cmake-config-static
    cmake-config-relocated
    cmake-version
    cmake-pkgconfig
    meson
)

CFLAGS_STRICT=(-Wall -Wextra -Werror)

log() { printf '%s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need() {
    local tool
    for tool in "$@"; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found in PATH"
    done
}

pc() {
    PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}" \
        pkg-config "$@"
}

# check_pc_prefix: the pkg-config module found must be the one in $PREFIX.
check_pc_prefix() {
    local got
    got=$(pc --variable=prefix libvfio-user)
    [[ $got == "$PREFIX" ]] || die "pkg-config found libvfio-user with prefix $got, not $PREFIX"
}

# run_binary BIN: runs a consumer binary, which must print exactly "ok".
run_binary() {
    local bin=$1 out
    out=$(LD_LIBRARY_PATH="$PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        timeout 60 "$bin" "$WORK/$NAME.sock") || die "$bin exited with status $?"
    log "output: $out"
    [[ $out == ok ]] || die "$bin printed '$out', expected 'ok'"
}

# check_dynamic BIN: BIN needs libvfio-user.so.0 (not an unversioned or
# cargo-named library) and resolves it from $PREFIX/lib; then runs it.
check_dynamic() {
    local bin=$1 needed resolved
    needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')
    log "NEEDED: ${needed//$'\n'/ }"
    grep -qx 'libvfio-user\.so\.0' <<<"$needed" ||
        die "$bin has no NEEDED entry libvfio-user.so.0"
    local entry
    while IFS= read -r entry; do
        if [[ $entry == *vfio[-_]user* && $entry != libvfio-user.so.0 ]]; then
            die "$bin has an unexpected NEEDED entry $entry"
        fi
    done <<<"$needed"
    resolved=$(LD_LIBRARY_PATH="$PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$bin" |
        sed -n 's/^[[:space:]]*libvfio-user\.so\.0 => \([^ ]*\).*/\1/p')
    log "libvfio-user.so.0 => $resolved"
    [[ $resolved == "$PREFIX/lib/libvfio-user.so.0" ]] ||
        die "libvfio-user.so.0 resolves to '$resolved', not $PREFIX/lib/libvfio-user.so.0"
    run_binary "$bin"
}

# check_static BIN: BIN must not need any vfio-user shared library.
check_static() {
    local bin=$1
    if readelf -d "$bin" | grep NEEDED | grep -E 'vfio[-_]user'; then
        die "$bin was supposed to be linked statically"
    fi
    run_binary "$bin"
}

# cmake_build DIR SOURCE ARGS...: configure and build a CMake project.
cmake_build() {
    local build=$1 source=$2
    shift 2
    need cmake
    cmake -S "$source" -B "$build" -DCMAKE_BUILD_TYPE=Release "$@"
    cmake --build "$build" --verbose
}

## The checks. Each runs in its own process with errexit on, and fails by
## exiting non-zero.

consumer_install_layout() {
    need readelf nm ar pkg-config
    local lib="$PREFIX/lib" version soname f n
    version=$(pc --modversion libvfio-user)
    log "version: $version"
    [[ $version =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "odd version '$version'"
    [[ -f $lib/libvfio-user.so.$version && ! -L $lib/libvfio-user.so.$version ]] ||
        die "$lib/libvfio-user.so.$version is not a regular file"
    [[ $(readlink "$lib/libvfio-user.so.0") == "libvfio-user.so.$version" ]] ||
        die "libvfio-user.so.0 does not point to libvfio-user.so.$version"
    [[ $(readlink "$lib/libvfio-user.so") == libvfio-user.so.0 ]] ||
        die "libvfio-user.so does not point to libvfio-user.so.0"
    soname=$(readelf -d "$lib/libvfio-user.so.$version" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
    [[ $soname == libvfio-user.so.0 ]] || die "SONAME is '$soname', not libvfio-user.so.0"
    ar t "$lib/libvfio-user.a" >/dev/null || die "libvfio-user.a is not an archive"
    # (grep -c, not grep -q: an early exit would SIGPIPE nm under pipefail.)
    n=$(nm --defined-only "$lib/libvfio-user.a" 2>/dev/null | grep -c ' T vfu_create_ctx$' || true)
    [[ $n -ge 1 ]] || die "libvfio-user.a does not define vfu_create_ctx"
    for f in libvfio-user.h vfio-user.h pci_defs.h \
        pci_caps/common.h pci_caps/dsn.h pci_caps/msi.h pci_caps/msix.h \
        pci_caps/pm.h pci_caps/px.h; do
        [[ -f $PREFIX/include/vfio-user/$f ]] || die "missing header include/vfio-user/$f"
    done
    for f in pkgconfig/libvfio-user.pc cmake/libvfio-user/libvfio-userConfig.cmake \
        cmake/libvfio-user/libvfio-userConfigVersion.cmake; do
        [[ -f $lib/$f ]] || die "missing lib/$f"
    done
    [[ $(pc --libs libvfio-user) == *-lvfio-user* ]] || die "pkg-config --libs lacks -lvfio-user"
    log "layout ok"
}

# Every installed header must compile on its own, as C and as C++.
consumer_headers_standalone() {
    need cc c++
    local h src n=0
    while IFS= read -r h; do
        src="$WORK/$NAME/$(tr '/.' '__' <<<"$h").c"
        mkdir -p "$WORK/$NAME"
        printf '#include <vfio-user/%s>\nint vfu_header_check_%d;\n' "$h" "$n" >"$src"
        log "checking <vfio-user/$h>"
        cc -std=gnu11 "${CFLAGS_STRICT[@]}" -I"$PREFIX/include" -c "$src" -o "$src.o"
        c++ -x c++ "${CFLAGS_STRICT[@]}" -I"$PREFIX/include" -c "$src" -o "$src.cxx.o"
        n=$((n + 1))
    done < <(cd "$PREFIX/include/vfio-user" && find . -name '*.h' | sed 's|^\./||' | sort)
    [[ $n -gt 0 ]] || die "no headers found"
    log "$n headers ok"
}

# Every function declared in the installed headers is exported by the shared
# library. The declarations are found in the preprocessed libvfio-user.h,
# keeping only the lines that come from include/vfio-user/ (not from system
# headers), splitting at ';', '{' and '}', dropping typedefs, static inline
# definitions and function-pointer members, and taking the identifier in
# front of the first '('.
consumer_exports() {
    need cc nm awk
    local dir="$PREFIX/include/vfio-user" names missing=() fn exported
    # shellcheck disable=SC2020 # tr maps one character per set member
    names=$(cc -E -I"$PREFIX/include" -I"$dir" "$dir/libvfio-user.h" |
        awk -v dir="$dir/" '/^# [0-9]+ "/ { f = $3; gsub(/"/, "", f); keep = (index(f, dir) == 1); next } keep' |
        tr '\n;{}' ' \n\n\n' |
        grep -Ev '(^|[^A-Za-z0-9_])(typedef|static|return)([^A-Za-z0-9_]|$)' |
        sed -nE 's/^[^(]*[^A-Za-z0-9_]([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*\([[:space:]]*[^*[:space:]].*/\1/p
                 s/^([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*\([[:space:]]*[^*[:space:]].*/\1/p' |
        grep -Evx '_.*|.*_t|void|char|short|int|long|float|double|signed|unsigned|bool|const|volatile|struct|union|enum|sizeof|alignof|static_assert|typeof|if|while|for|switch|asm|inline|restrict' |
        sort -u) || true
    [[ -n $names ]] || die "found no function declarations in $dir/libvfio-user.h"
    exported=$(nm -D --defined-only "$PREFIX/lib/libvfio-user.so.0" | awk '{ print $NF }')
    for fn in $names; do
        grep -qx "$fn" <<<"$exported" || missing+=("$fn")
    done
    log "declared: ${names//$'\n'/ }"
    if [[ ${#missing[@]} -gt 0 ]]; then
        die "declared but not exported by libvfio-user.so.0: ${missing[*]}"
    fi
    log "$(wc -w <<<"$names") declared functions, all exported"
}

pkgconfig_build() {
    local compiler=$1
    shift
    need pkg-config "$compiler"
    check_pc_prefix
    local cflags libs
    cflags=$(pc --cflags libvfio-user)
    libs=$(pc --libs libvfio-user)
    mkdir -p "$WORK/$NAME"
    log "cflags: $cflags"
    log "libs: $libs"
    # shellcheck disable=SC2086 # pkg-config output is meant to be split
    "$compiler" "${CFLAGS_STRICT[@]}" "$@" $cflags "$HERE/consumer.c" \
        -o "$WORK/$NAME/consumer" $libs
}

consumer_pkgconfig_angle() {
    pkgconfig_build cc
    check_dynamic "$WORK/$NAME/consumer"
}

consumer_pkgconfig_quoted() {
    pkgconfig_build cc -DVFU_CONSUMER_QUOTED_INCLUDE
    check_dynamic "$WORK/$NAME/consumer"
}

consumer_pkgconfig_cxx() {
    pkgconfig_build c++ -x c++
    check_dynamic "$WORK/$NAME/consumer"
}

# Static link: pkg-config --static adds Libs.private; -l:libvfio-user.a makes
# the linker take the archive even though the .so sits next to it.
consumer_pkgconfig_static() {
    need pkg-config cc
    check_pc_prefix
    local cflags libs
    cflags=$(pc --cflags libvfio-user)
    libs=$(pc --static --libs libvfio-user)
    log "static libs: $libs"
    libs=${libs//-lvfio-user/-l:libvfio-user.a}
    mkdir -p "$WORK/$NAME"
    # shellcheck disable=SC2086
    cc "${CFLAGS_STRICT[@]}" $cflags "$HERE/consumer.c" -o "$WORK/$NAME/consumer" $libs
    check_static "$WORK/$NAME/consumer"
}

consumer_cmake_config() {
    cmake_build "$WORK/$NAME" "$HERE" -DVFU_FIND=config \
        -DCMAKE_PREFIX_PATH="$PREFIX" -DVFU_EXPECT_PREFIX="$PREFIX"
    check_dynamic "$WORK/$NAME/consumer"
}

consumer_cmake_config_quoted() {
    cmake_build "$WORK/$NAME" "$HERE" -DVFU_FIND=config -DVFU_QUOTED_INCLUDE=ON \
        -DCMAKE_PREFIX_PATH="$PREFIX" -DVFU_EXPECT_PREFIX="$PREFIX"
    check_dynamic "$WORK/$NAME/consumer"
}

consumer_cmake_config_static() {
    cmake_build "$WORK/$NAME" "$HERE" -DVFU_FIND=config -DVFU_STATIC=ON \
        -DCMAKE_PREFIX_PATH="$PREFIX" -DVFU_EXPECT_PREFIX="$PREFIX"
    check_static "$WORK/$NAME/consumer"
}

# A copy of the install tree at another place must be usable through CMake,
# with every path pointing into the copy.
consumer_cmake_config_relocated() {
    local moved="$WORK/$NAME/moved-prefix"
    mkdir -p "$WORK/$NAME"
    cp -a "$PREFIX" "$moved"
    cmake_build "$WORK/$NAME/build" "$HERE" -DVFU_FIND=config \
        -DCMAKE_PREFIX_PATH="$moved" -DVFU_EXPECT_PREFIX="$moved"
    PREFIX=$moved check_dynamic "$WORK/$NAME/build/consumer"
}

consumer_cmake_version() {
    need cmake pkg-config
    local version major minor patch n=0 req want
    version=$(pc --modversion libvfio-user)
    IFS=. read -r major minor patch <<<"$version"
    local -a cases=(
        "|ON"
        "$major|ON"
        "$major.$minor|ON"
        "$version|ON"
        "$version;EXACT|ON"
        "$major.$minor.$((patch + 1));EXACT|OFF"
        "$((major + 1))|OFF"
        "$major.$((minor + 1))|OFF"
        "$major.$minor.$((patch + 1))|OFF"
    )
    if [[ $major -gt 0 ]]; then
        cases+=("$((major - 1))|OFF")
    fi
    # Version ranges need CMake 3.19.
    local cmv
    cmv=$(cmake --version | sed -n '1s/^cmake version \([0-9]*\.[0-9]*\).*/\1/p')
    if [[ $(printf '%s\n' 3.19 "$cmv" | sort -V | sed -n 1p) == 3.19 ]]; then
        cases+=(
            "$major.$minor...$((major + 1)).0|ON"
            "$major.$minor...$version|ON"
            "$major.$((minor + 1))...$((major + 1)).0|OFF"
        )
        if [[ $minor -gt 0 || $patch -gt 0 ]]; then
            cases+=("$major...<$version|OFF")
        fi
    fi
    for c in "${cases[@]}"; do
        req=${c%|*}
        want=${c##*|}
        log "find_package(libvfio-user $req) expecting found=$want"
        cmake -S "$HERE/cmake-version" -B "$WORK/$NAME/$n" \
            -DCMAKE_PREFIX_PATH="$PREFIX" -DVFU_REQUEST="$req" -DVFU_EXPECT_FOUND="$want" >&2
        n=$((n + 1))
    done
}

consumer_cmake_pkgconfig() {
    need pkg-config
    check_pc_prefix
    PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}" \
        cmake_build "$WORK/$NAME" "$HERE" -DVFU_FIND=pkgconfig \
        -DVFU_EXPECT_PREFIX="$PREFIX"
    check_dynamic "$WORK/$NAME/consumer"
}

consumer_meson() {
    need meson ninja pkg-config
    check_pc_prefix
    PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}" \
        meson setup "$WORK/$NAME" "$HERE"
    meson compile -C "$WORK/$NAME" -v
    check_dynamic "$WORK/$NAME/consumer"
}

## Driver.

if [[ ${1-} == --one ]]; then
    # Internal: run one check in this process (called by the loop below).
    [[ $# -eq 4 ]] || die "usage: $0 --one NAME PREFIX WORKDIR"
    NAME=$2 PREFIX=$3 WORK=$4
    "consumer_${NAME//-/_}"
    exit 0
fi

[[ $# -eq 1 ]] || {
    log "usage: $0 PREFIX"
    exit 2
}
[[ -d $1 ]] || {
    log "$1: no such directory"
    exit 2
}
PREFIX=$(cd "$1" && pwd)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vfu-consumers.XXXXXX")
if [[ ${KEEP_WORK:-0} == 1 ]]; then
    log "work directory: $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi

pass=0
fail=0
for name in "${CONSUMERS[@]}"; do
    if bash "$SCRIPT" --one "$name" "$PREFIX" "$WORK" >"$WORK/$name.log" 2>&1; then
        echo "PASS $name"
        pass=$((pass + 1))
    else
        echo "FAIL $name"
        tail -n 25 "$WORK/$name.log" | sed 's/^/    | /'
        fail=$((fail + 1))
    fi
done

echo "$pass passed, $fail failed"
[[ $fail -eq 0 ]]
