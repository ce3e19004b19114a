#!/usr/bin/env bash
# bench/cluster.sh [fsbench.sh options via FSB_* env]
#
# A cluster node against lock_nolock and fuse2fs, by hand, as root: a three-node Concord cluster on this machine
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

. "$here/bench/cluster-lib.sh"

if [[ " $ONLY " == *" concord-cluster "* ]]; then
    c=$DIR/cluster
    cluster_up "$c"
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
