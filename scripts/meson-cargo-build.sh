#!/bin/sh
# SPDX-License-Identifier: BSD-3-Clause
#
# Called by meson.build (a custom target that always runs): builds the
# library with cargo into a target directory outside the source tree, then
# puts the artefacts into the meson build directory under their installed
# names. cargo itself decides what needs rebuilding; files whose content did
# not change keep their time stamps.
#
# usage: meson-cargo-build.sh CARGO SRCDIR TARGET_DIR PROFILE OUTDIR REALNAME
#            VFUCTL [CARGO_ARG...]
#
#   PROFILE   debug or release
#   REALNAME  file name of the shared library, e.g. libvfio-user.so.0.2.0
#   VFUCTL    1 to build the vfuctl program too, 0 for the library only
#
# OUTDIR receives REALNAME, the libvfio-user.so.0 and libvfio-user.so
# symlinks, libvfio-user.a and, when VFUCTL is 1, vfuctl.

set -eu

if [ $# -lt 7 ]; then
    echo "usage: $0 CARGO SRCDIR TARGET_DIR PROFILE OUTDIR REALNAME VFUCTL [CARGO_ARG...]" >&2
    exit 2
fi
cargo=$1 src=$2 target=$3 profile=$4 out=$5 realname=$6 vfuctl=$7
shift 7

case $profile in
debug) profile_arg= ;;
release) profile_arg=--release ;;
*)
    echo "$0: unknown profile '$profile'" >&2
    exit 2
    ;;
esac
case $vfuctl in
1) what="--lib --bin vfuctl" ;;
0) what=--lib ;;
*)
    echo "$0: VFUCTL must be 0 or 1" >&2
    exit 2
    ;;
esac

# The physical path: a tree reached through a symlink (a subprojects/ link)
# then shares cargo's fingerprints with the same tree reached directly.
src=$(cd "$src" && pwd -P)

# Never let build.rs write the generated header back into the source tree.
unset VFU_UPDATE_HEADER

# shellcheck disable=SC2086 # $profile_arg and $what are lists of words
"$cargo" build --manifest-path "$src/Cargo.toml" --target-dir "$target" \
    --locked $profile_arg $what "$@"

# copy FROM TO: replaces TO only when its content differs.
copy() {
    if ! cmp -s "$1" "$2"; then
        rm -f "$2.tmp"
        cp "$1" "$2.tmp"
        mv -f "$2.tmp" "$2"
    fi
}

dir=$target/$profile
copy "$dir/libvfio_user.so" "$out/$realname"
chmod 0755 "$out/$realname"
copy "$dir/libvfio_user.a" "$out/libvfio-user.a"
chmod 0644 "$out/libvfio-user.a"
ln -sfn "$realname" "$out/libvfio-user.so.0"
ln -sfn libvfio-user.so.0 "$out/libvfio-user.so"
if [ "$vfuctl" = 1 ]; then
    copy "$dir/vfuctl" "$out/vfuctl"
    chmod 0755 "$out/vfuctl"
fi
