#!/usr/bin/env bash
# bench/cluster.sh [fsbench.sh options via FSB_* env]
#
# Issue 15's comparison, by hand, as root: a three-node Concord cluster on this machine
# (three `concord lockd`, three `concord mount --config` of one image), fsbench.sh on
# node 1 while nodes 2 and 3 stay mounted and idle; then the same binary's lock_nolock
# mount of an image of the same size, and fuse2fs of an ext4 image, in the same run.
# Prints fsbench's lines (LABEL metric value unit) for the three, labelled
# concord-cluster, concord-nolock and fuse2fs. Everything it starts it stops.
#
# Env: CONCORD (binary, default target/release/concord), SIZE (image size, 4G),
#      DIR (work dir, default a fresh one under /var/tmp), ONLY (labels to run).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
CONCORD=${CONCORD:-$here/target/release/concord}
SIZE=${SIZE:-4G}
DIR=${DIR:-$(mktemp -d /var/tmp/concord-cluster-bench.XXXXXX)}
ONLY=${ONLY:-"concord-cluster concord-nolock fuse2fs"}
FSBENCH=${FSBENCH:-$here/../shared/bench/fsbench.sh}
[ -x "$CONCORD" ] || { echo "build it first: cargo build --release" >&2; exit 2; }
[ -r "$FSBENCH" ] || { echo "no fsbench.sh at $FSBENCH (set FSBENCH)" >&2; exit 2; }

pids=()
mnts=()
cleanup() {
    for m in "${mnts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
    sleep 1
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 1
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_mounted() {
    for _ in $(seq 600); do mountpoint -q "$1" && return 0; sleep 0.1; done
    echo "$1 did not mount" >&2; return 1
}

if [[ " $ONLY " == *" concord-cluster "* ]]; then
    c=$DIR/cluster
    mkdir -p "$c"
    "$CONCORD" ca init "$c/tls" >/dev/null
    {
        printf '[cluster]\nname = "bench"\n\n[tls]\ndir = "tls"\n\n[runtime]\ndir = "run"\nstate_dir = "state"\n'
        for i in 1 2 3; do
            "$CONCORD" ca issue "$c/tls" --node "$i" >/dev/null
            printf '\n[[node]]\nid = %d\nname = "n%d"\naddr = "127.0.0.1:%d"\n' "$i" "$i" "$(free_port)"
        done
    } >"$c/cluster.toml"
    for i in 1 2 3; do
        "$CONCORD" lockd --config "$c/cluster.toml" --node "$i" >"$c/lockd$i.log" 2>&1 &
        pids+=($!)
    done
    "$CONCORD" mkfs -j 3 -p lock_dlm -t bench:fs1 --size "$SIZE" "$c/shared.img" >/dev/null
    for i in 1 2 3; do
        mkdir -p "$c/mnt$i"
        CONCORD_CLUSTER_PREVIEW=1 "$CONCORD" mount --config "$c/cluster.toml" --node "$i" "$c/shared.img" "$c/mnt$i" \
            >"$c/mount$i.log" 2>&1 &
        pids+=($!)
        mnts+=("$c/mnt$i")
        wait_mounted "$c/mnt$i"
    done
    bash "$FSBENCH" "$c/mnt1" concord-cluster
    for i in 3 2 1; do umount "$c/mnt$i"; done
    sleep 2
    "$CONCORD" fsck -n "$c/shared.img" >&2 || echo "fsck after the cluster run: not clean" >&2
fi

if [[ " $ONLY " == *" concord-nolock "* ]]; then
    n=$DIR/nolock
    mkdir -p "$n/mnt"
    "$CONCORD" mkfs --size "$SIZE" "$n/img" >/dev/null
    "$CONCORD" mount "$n/img" "$n/mnt" --daemon >/dev/null
    mnts+=("$n/mnt")
    bash "$FSBENCH" "$n/mnt" concord-nolock
    umount "$n/mnt"
fi

if [[ " $ONLY " == *" fuse2fs "* ]]; then
    f=$DIR/fuse2fs
    mkdir -p "$f/mnt"
    truncate -s "$SIZE" "$f/img"
    mkfs.ext4 -q -F "$f/img"
    fuse2fs "$f/img" "$f/mnt" -o fakeroot
    mnts+=("$f/mnt")
    wait_mounted "$f/mnt"
    bash "$FSBENCH" "$f/mnt" fuse2fs
    umount "$f/mnt"
fi
