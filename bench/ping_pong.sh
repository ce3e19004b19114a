#!/usr/bin/env bash
# bench/ping_pong.sh: fcntl lock contention as CTDB's ping_pong measures it, by hand, as
# root, after `cargo build --release -p concord -p concord-tests`.
#
# Rows (each SECONDS long, locks per second of one copy, as ping_pong prints):
#   cluster-2nodes      one copy on node 1 and one on node 2 of a three-node cluster
#   cluster-1node       two copies on node 1 of the same cluster
#   ext4                two copies on an ext4 image on a loop device (the kernel's locks)
# each plain, with -rw (the locked byte read and incremented) and with -rw -m (through
# a shared mmap). The copies chase each other round NUM_LOCKS = 3 bytes.
# Everything it starts it stops (cluster-lib.sh's EXIT trap).
#
# Env: CONCORD, PING_PONG (binaries, default target/release/...), SECONDS_EACH (10),
#      SIZE (image size, 1G), DIR (work dir, default a fresh one under /var/tmp).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
CONCORD=${CONCORD:-$here/target/release/concord}
PING_PONG=${PING_PONG:-$here/target/release/ping_pong}
SECONDS_EACH=${SECONDS_EACH:-10}
SIZE=${SIZE:-1G}
DIR=${DIR:-$(mktemp -d /var/tmp/concord-ping-pong.XXXXXX)}
[ -x "$CONCORD" ] && [ -x "$PING_PONG" ] || {
    echo "build first: cargo build --release -p concord -p concord-tests" >&2; exit 2; }

. "$here/bench/cluster-lib.sh"

loopdev=
ext4_cleanup() {
    umount "$DIR/ext4" 2>/dev/null || true
    [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null || true
    cleanup
}
trap ext4_cleanup EXIT

# pair LABEL FILE_A FILE_B [ping_pong options]: one copy on each file path, together;
# prints the slower copy's rate.
pair() {
    local label=$1 a=$2 b=$3; shift 3
    local out_a out_b
    out_a=$(mktemp) out_b=$(mktemp)
    "$PING_PONG" "$@" --seconds "$SECONDS_EACH" "$a" 3 >"$out_a" 2>/dev/null &
    local pa=$!
    "$PING_PONG" "$@" --seconds "$SECONDS_EACH" "$b" 3 >"$out_b" 2>/dev/null &
    local pb=$!
    wait "$pa" "$pb"
    local ra rb
    ra=$(sed -n 's/.*locks_per_s=\([0-9]*\).*/\1/p' "$out_a")
    rb=$(sed -n 's/.*locks_per_s=\([0-9]*\).*/\1/p' "$out_b")
    printf '%-16s %-8s %8s locks/s  (copies: %s, %s)\n' "$label" "${*:-plain}" \
        "$(( ra < rb ? ra : rb ))" "$(cat "$out_a")" "$(cat "$out_b")"
    rm -f "$out_a" "$out_b"
}

rows() {
    local label=$1 a=$2 b=$3
    pair "$label" "$a" "$b"
    pair "$label" "$a" "$b" -rw
    pair "$label" "$a" "$b" -rw -m
}

c=$DIR/cluster
cluster_up "$c"
rows cluster-2nodes "$c/mnt1/pp" "$c/mnt2/pp"
rows cluster-1node "$c/mnt1/pp1" "$c/mnt1/pp1"

mkdir -p "$DIR/ext4"
truncate -s "$SIZE" "$DIR/ext4.img"
mkfs.ext4 -q "$DIR/ext4.img"
loopdev=$(losetup -f --show "$DIR/ext4.img")
mount "$loopdev" "$DIR/ext4"
rows ext4 "$DIR/ext4/pp" "$DIR/ext4/pp"
