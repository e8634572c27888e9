#!/usr/bin/env bash
# The main job: build the library, vfuctl and the C sample devices, serve two
# migdev devices, look at one with `vfuctl info`, start its DMA workload and
# live-migrate it into the other while it runs, then show its state arrived.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=$root/target/demo
prefix=$out/prefix
run=$out/run
pids=()

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

step "Building libvfio-user.so.0, vfuctl and the sample devices"
cargo build --release --quiet
rm -rf "$prefix" "$run"
mkdir -p "$run"
make --no-print-directory --quiet install NO_BUILD=1 PREFIX="$prefix" >/dev/null
bash c-tests/samples/build.sh "$prefix" "$out/bin" >/dev/null
vfuctl=$prefix/bin/vfuctl
echo "installed into $prefix; samples in $out/bin"

step "Starting two migdev sample devices (C programs linked against our libvfio-user.so.0)"
"$out/bin/migdev" --persist "$run/src.sock" >"$run/src.log" 2>&1 &
pids+=($!)
"$out/bin/migdev" --persist "$run/dst.sock" >"$run/dst.log" 2>&1 &
pids+=($!)
for s in src dst; do
    for _ in $(seq 100); do [ -S "$run/$s.sock" ] && break; sleep 0.05; done
done
echo "source      $run/src.sock (pid ${pids[0]})"
echo "destination $run/dst.sock (pid ${pids[1]})"

step "vfuctl info (source)"
"$vfuctl" info "$run/src.sock"

step "Live migration: 16 MiB of guest memory, the device DMA-writing into it while pre-copy runs"
# Scratch registers get distinct values, the DMA window is 4 MiB at IOVA 0,
# and CTRL bit 0 starts the device writing one page per tick.
sets=()
for i in $(seq 0 15); do sets+=(--set "bar0:$((0x10 + 4 * i))=$((0x1000 * (i + 1) + i))"); done
"$vfuctl" migrate --from "$run/src.sock" --to "$run/dst.sock" --guest-mem-mib 16 \
    "${sets[@]}" --set bar0:0x50=0 --set bar0:0x54=0 --set bar0:0x58=0x400000 --set bar0:0x0c=1 \
    --verify --compare bar0:0x08:4 --compare bar0:0x10:64 --compare bar0:0x50:12 --compare bar0:0x60:4

step "Destination registers after the migration"
"$vfuctl" read "$run/dst.sock" bar0 0x0 0x64
echo
echo "demo finished: the device's registers and guest memory arrived intact"
