#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# QEMU interoperability test: a real QEMU (`-device vfio-user-pci`, which
# needs QEMU >= 10.1) drives the C sample devices (c-tests/samples) built
# against this repository's libvfio-user.so.0.
#
# QEMU comes from Debian sid, installed into a minimal chroot that is built
# once with debootstrap and cached outside the repository. The devices run
# on the host; their sockets, QEMU's QMP/qtest sockets and the logs live in
# a scratch directory inside the chroot, so that QEMU (chrooted) and the
# host see the same files. QEMU runs in a private mount namespace in which
# /dev and /proc are mounted into the chroot: those mounts exist only for
# it and disappear with it, however the run ends. The checks themselves are
# in vfu_qemu.py (QMP, human monitor and qtest clients).
#
# Usage: tests/qemu/run.sh [SCENARIO...]     (scenarios: gpio migdev; default all)
# Must run as root (debootstrap, chroot, mount namespaces).
#
# Output: one `PASS: ...`/`FAIL: ...` line per check, then `N passed, M failed`;
# the exit status is 0 iff M is 0. When the environment cannot provide QEMU
# (no network for debootstrap/apt, not root, ...) it prints `SKIP: reason`
# and `0 passed, 0 failed` and exits 0.
#
# Environment:
#   VFU_QEMU_CACHE    cache directory (default /var/cache/vfu-qemu); the
#                     chroot is $VFU_QEMU_CACHE/sid-chroot
#   VFU_QEMU_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   VFU_QEMU_REBUILD=1  rebuild the cached chroot
#   VFU_QEMU          path of a host qemu-system-x86_64 (>= 10.1) to use
#                     instead of the chroot
#   VFU_QEMU_PREFIX   an existing `make install` prefix to use instead of
#                     building and installing the library afresh
#   VFU_QEMU_KEEP=1   keep the scratch directory (logs) even on success;
#                     it is always kept when a check fails

set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
CACHE=${VFU_QEMU_CACHE:-/var/cache/vfu-qemu}
CHROOT=$CACHE/sid-chroot
MARKER=.vfu-qemu-complete
MIRROR=${VFU_QEMU_MIRROR:-http://deb.debian.org/debian}
QEMU_BIN=qemu-system-x86_64

PASSED=0
FAILED=0
BUILD_DIR=
WORK=

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
note() { echo "# $*"; }
pass() { PASSED=$((PASSED + 1)); echo "PASS: $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL: $*"; }
summary() { echo "$PASSED passed, $FAILED failed"; }

skip() {
    echo "SKIP: $*"
    echo "0 passed, 0 failed"
    exit 0
}

cleanup() {
    if [[ -n $BUILD_DIR && -d $BUILD_DIR ]]; then
        rm -rf -- "$BUILD_DIR"
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ $FAILED -ne 0 || ${VFU_QEMU_KEEP:-0} == 1 ]]; then
            note "logs kept in $WORK"
        else
            rm -rf -- "$WORK"
        fi
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# True if anything is mounted at or below directory $1.
mounted_under() {
    local d
    d=$(realpath -m -- "$1")
    awk -v d="$d" '$5 == d || index($5, d "/") == 1 { found = 1 } END { exit !found }' \
        /proc/self/mountinfo
}

# Removes a (partial) chroot, refusing to if anything is still mounted in
# it: `rm -rf` through a bind mount of /dev would wreck the host.
remove_tree() {
    local d=$1
    [[ -e $d ]] || return 0
    if mounted_under "$d"; then
        awk -v d="$(realpath -m -- "$d")" '$5 == d || index($5, d "/") == 1 { print $5 }' \
            /proc/self/mountinfo | sort -r |
            while read -r m; do umount -l -- "$m" 2>/dev/null; done
    fi
    if mounted_under "$d"; then
        echo "refusing to remove $d: something is still mounted in it" >&2
        return 1
    fi
    rm -rf -- "$d"
}

# Runs "$@" up to three times, with a pause between attempts.
retry() {
    local i
    for i in 1 2 3; do
        "$@" && return 0
        [[ $i -lt 3 ]] && { note "attempt $i of: $* failed, retrying"; sleep 3; }
    done
    return 1
}

# Runs a command chrooted into $1 with /dev and /proc mounted, in a private
# mount namespace (the mounts vanish when the command ends).
in_chroot() {
    local root=$1
    shift
    # shellcheck disable=SC2016 # expanded by the inner sh
    unshare --mount --propagation private -- sh -c \
        'set -e; r=$1; shift; mount --bind /dev "$r/dev"; mount -t proc proc "$r/proc"; exec chroot "$r" "$@"' \
        sh "$root" "$@"
}

debootstrap_into() {
    local dir=$1 log=$2
    remove_tree "$dir" || return 1
    # A private mount namespace here too: debootstrap mounts /proc and /sys
    # in the target and may leave them behind if it fails.
    unshare --mount --propagation private -- \
        debootstrap --variant=minbase sid "$dir" "$MIRROR" >>"$log" 2>&1
}

apt_into() {
    local dir=$1 log=$2
    in_chroot "$dir" env DEBIAN_FRONTEND=noninteractive \
        apt-get -q -o Acquire::Check-Valid-Until=false update >>"$log" 2>&1 &&
        in_chroot "$dir" env DEBIAN_FRONTEND=noninteractive \
            apt-get -q -y --no-install-recommends install qemu-system-x86 >>"$log" 2>&1
}

# Builds the chroot into $CHROOT.partial and renames it to $CHROOT once
# QEMU is installed in it, so that $CHROOT is always complete.
build_chroot() {
    local partial=$CHROOT.partial log=$CACHE/build.log
    : >"$log"
    if ! command -v debootstrap >/dev/null 2>&1; then
        note "installing debootstrap"
        if ! { retry apt-get -q update >>"$log" 2>&1 &&
               retry env DEBIAN_FRONTEND=noninteractive apt-get -q -y install debootstrap \
                   >>"$log" 2>&1; }; then
            tail -n 5 "$log" | sed 's/^/  /'
            return 2
        fi
    fi
    note "building the Debian sid chroot in $partial (log: $log)"
    if ! retry debootstrap_into "$partial" "$log"; then
        tail -n 10 "$log" | sed 's/^/  /'
        return 2
    fi
    if ! retry apt_into "$partial" "$log"; then
        tail -n 10 "$log" | sed 's/^/  /'
        return 2
    fi
    in_chroot "$partial" apt-get clean >>"$log" 2>&1
    in_chroot "$partial" "$QEMU_BIN" --version | head -n 1 >"$partial/$MARKER" || return 1
    remove_tree "$CHROOT" || return 1
    mv -- "$partial" "$CHROOT"
}

# ---------------------------------------------------------------------------

if [[ $(id -u) -ne 0 ]]; then
    skip "must run as root (debootstrap, chroot and mount namespaces)"
fi
for tool in python3 unshare chroot mount; do
    command -v "$tool" >/dev/null 2>&1 || skip "$tool not found"
done

T0=$(now)
if [[ -n ${VFU_QEMU:-} ]]; then
    [[ -x $VFU_QEMU ]] || skip "VFU_QEMU=$VFU_QEMU is not executable"
    ROOT=
    QEMU_CMD=$VFU_QEMU
    QEMU_VERSION=$("$VFU_QEMU" --version | head -n 1)
    HELP=$("$VFU_QEMU" -device help 2>&1)
else
    mkdir -p -- "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9
    if [[ ${VFU_QEMU_REBUILD:-0} == 1 || ! -f $CHROOT/$MARKER ]]; then
        build_chroot
        rc=$?
        if [[ $rc -eq 2 ]]; then
            skip "could not provide QEMU from Debian sid (debootstrap/apt failed, see $CACHE/build.log)"
        elif [[ $rc -ne 0 ]]; then
            fail "building the QEMU chroot in $CHROOT"
            summary
            exit 1
        fi
        note "chroot built in $(since "$T0") s"
    else
        note "reusing the cached chroot $CHROOT"
    fi
    flock -u 9
    ROOT=$CHROOT
    QEMU_CMD=$QEMU_BIN
    QEMU_VERSION=$(cat "$CHROOT/$MARKER")
    HELP=$(in_chroot "$CHROOT" "$QEMU_BIN" -device help 2>&1)
fi
note "QEMU: $QEMU_VERSION"
if ! grep -q '"vfio-user-pci"' <<<"$HELP"; then
    skip "$QEMU_VERSION has no vfio-user-pci device (QEMU >= 10.1 needed)"
fi

# The library, freshly installed into a scratch prefix, and the samples.
T1=$(now)
BUILD_DIR=$(mktemp -d /tmp/vfu-qemu-build.XXXXXX)
if [[ -n ${VFU_QEMU_PREFIX:-} ]]; then
    PREFIX=$VFU_QEMU_PREFIX
    note "using the installed prefix $PREFIX"
else
    PREFIX=$BUILD_DIR/prefix
    if make -C "$REPO" install PREFIX="$PREFIX" >"$BUILD_DIR/make.log" 2>&1; then
        pass "make install PREFIX=$PREFIX"
    else
        fail "make install PREFIX=$PREFIX"
        tail -n 30 "$BUILD_DIR/make.log" | sed 's/^/  /'
        summary
        exit 1
    fi
fi
if "$REPO/c-tests/samples/build.sh" "$PREFIX" "$BUILD_DIR/bin" >"$BUILD_DIR/samples.log" 2>&1; then
    pass "sample devices build against the installed library"
else
    fail "sample devices build against the installed library"
    sed 's/^/  /' "$BUILD_DIR/samples.log"
    summary
    exit 1
fi
note "library and samples built in $(since "$T1") s"

# Scratch directory for sockets and logs, where QEMU sees it too.
T2=$(now)
if [[ -n $ROOT ]]; then
    # Logs of earlier failed runs are kept; drop those older than a day.
    find "$ROOT/tmp" -maxdepth 1 -name 'vfu-qemu.*' -type d -mmin +1440 \
        -exec rm -rf -- {} + 2>/dev/null
    WORK=$(mktemp -d "$ROOT/tmp/vfu-qemu.XXXXXX")
else
    WORK=$(mktemp -d /tmp/vfu-qemu.XXXXXX)
fi
# sun_path holds 108 bytes; the longest socket is $WORK/migdev/qtest.sock.
if [[ ${#WORK} -gt 80 ]]; then
    fail "scratch directory path $WORK is too long for UNIX sockets"
    summary
    exit 1
fi

OUT=$BUILD_DIR/checks.out
python3 "$HERE/vfu_qemu.py" --root "$ROOT" --qemu "$QEMU_CMD" \
    --bindir "$BUILD_DIR/bin" --workdir "$WORK" "$@" | tee "$OUT"
rc=${PIPESTATUS[0]}
p=$(grep -c '^PASS:' "$OUT")
f=$(grep -c '^FAIL:' "$OUT")
PASSED=$((PASSED + p))
FAILED=$((FAILED + f))
if [[ $rc -ne 0 && $f -eq 0 ]]; then
    fail "vfu_qemu.py exited with status $rc"
fi
if [[ -n $ROOT ]]; then
    # QEMU's /dev and /proc mounts lived in its own mount namespace.
    if mounted_under "$ROOT"; then
        fail "nothing left mounted in $ROOT"
    else
        pass "nothing left mounted in $ROOT"
    fi
fi
note "QEMU checks ran in $(since "$T2") s; total $(since "$T0") s"
summary
[[ $FAILED -eq 0 ]]
