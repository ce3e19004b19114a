#!/usr/bin/env bash
# bench/nbd.sh [RUNS]: a single-node Concord mount of one image file, directly
# (O_DIRECT on the file) and through Concord's NBD client to qemu-nbd serving the same
# file on loopback, under ../shared/bench/fsbench.sh, alternating, RUNS (2) times each.
# As root, after `cargo build --release`. SIZE (4G) the image size; FSB_* pass through.
# Prints fsbench's lines labelled "direct" and "nbd"; stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-2}
SIZE=${SIZE:-4G}
BIN=$PWD/target/release/concord
FSB=${FSB:-$PWD/../shared/bench/fsbench.sh}
[ -x "$FSB" ] || FSB=/work/shared/bench/fsbench.sh
W=$(mktemp -d /var/tmp/concord-nbd-bench.XXXXXX)
IMG=$W/img
MNT=$W/mnt
PORT=${PORT:-10977}
QPID=
cleanup() {
    mountpoint -q "$MNT" && { umount "$MNT" || umount -l "$MNT"; }
    [ -n "$QPID" ] && kill "$QPID" 2>/dev/null && wait "$QPID" 2>/dev/null
    rm -rf "$W"
}
trap cleanup EXIT
# A signal's default action would end the shell without the EXIT trap: exit instead.
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP
mkdir -p "$MNT"
"$BIN" mkfs --size "$SIZE" "$IMG" >/dev/null
qemu-nbd -f raw --persistent --shared=8 --cache=writeback -b 127.0.0.1 -p "$PORT" -x bench "$IMG" \
    2>"$W/qemu-nbd.log" &
QPID=$!
sleep 1
run() { # LABEL DEVICE
    "$BIN" mount "$2" "$MNT" --daemon --log "$W/mount.log" >/dev/null
    bash "$FSB" "$MNT" "$1"
    umount "$MNT"
    while pgrep -f "concord mount $2 $MNT" >/dev/null; do sleep 0.2; done
}
for _ in $(seq "$RUNS"); do
    run direct "$IMG"
    run nbd "nbd://127.0.0.1:$PORT/bench"
done
