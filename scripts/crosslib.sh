#!/usr/bin/env bash
# Live migration between the C migdev sample on our libvfio-user.so.0 and
# the same program on another build of the library (upstream libvfio-user,
# built by you, outside this repo), both ways, with vfuctl.
#
# Usage: scripts/crosslib.sh OTHER_LIBDIR [BULK_KIB]
#   OTHER_LIBDIR  directory holding the other libvfio-user.so.0
#   BULK_KIB      extra device state in KiB (migdev --bulk-kib; default
#                 16384, i.e. 16 MiB)
# The migdev binary is built once, against our header; the "other" device
# is the same binary run with LD_LIBRARY_PATH=OTHER_LIBDIR (its RUNPATH
# gives way to LD_LIBRARY_PATH). docs/migration.md has a run's output.
set -euo pipefail
other=$(cd "${1:?usage: $0 OTHER_LIBDIR [BULK_KIB]}" && pwd)
bulk=${2:-16384}
[ -e "$other/libvfio-user.so.0" ] || { echo "$0: no libvfio-user.so.0 in $other" >&2; exit 2; }
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=$root/target/crosslib
prefix=$out/prefix
run=$out/run
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

cargo build --release --quiet
rm -rf "$prefix" "$run"
mkdir -p "$run"
make --no-print-directory --quiet install NO_BUILD=1 PREFIX="$prefix" >/dev/null
bash c-tests/samples/build.sh "$prefix" "$out/bin" >/dev/null
vfuctl=$prefix/bin/vfuctl

# start NAME LIBDIR: a migdev on the library in LIBDIR (empty: ours).
start() {
    local name=$1 lib=$2
    if [ -n "$lib" ]; then
        LD_LIBRARY_PATH=$lib "$out/bin/migdev" --persist --bulk-kib "$bulk" "$run/$name.sock" \
            >"$run/$name.log" 2>&1 &
    else
        "$out/bin/migdev" --persist --bulk-kib "$bulk" "$run/$name.sock" >"$run/$name.log" 2>&1 &
    fi
    pids+=($!)
    for _ in $(seq 100); do [ -S "$run/$name.sock" ] && break; sleep 0.05; done
    echo "$name: pid $! on $(grep -o '/[^ ]*libvfio-user.so[.0-9]*' /proc/$!/maps | sort -u)"
}

# migrate FROM TO: a live migration with the device DMA-writing, checked.
# COUNTER (0x08) and CHECKSUM (0x60) are not compared: they move on with
# every 5 ms tick once the destination runs, while the source stays
# stopped; the destination's log has the values it restored. (Its own
# checksum check of the guest buffer needs a tick while vfuctl, which owns
# the guest memory, is still connected, which is mostly not the case.)
migrate() {
    local sets=()
    for i in $(seq 0 15); do sets+=(--set "bar0:$((0x10 + 4 * i))=$((0x2000 * (i + 1) + i))"); done
    "$vfuctl" migrate --from "$run/$1.sock" --to "$run/$2.sock" --guest-mem-mib 16 \
        "${sets[@]}" --set bar0:0x50=0 --set bar0:0x54=0 --set bar0:0x58=0x400000 --set bar0:0x0c=1 \
        --verify --compare bar0:0x0c:4 --compare bar0:0x10:64 --compare bar0:0x50:12 "${@:3}"
}

start ours ""
start theirs "$other"
echo "== ours -> theirs"
migrate ours theirs
echo "== theirs -> ours (the state that just arrived, moved back)"
start ours2 ""
migrate theirs ours2
grep -h "bulk state" "$run"/*.log || true
echo "crosslib: both directions migrated"
