#!/usr/bin/env bash
# bench/cluster-cross.sh
#
# Measurements across nodes, by hand, as root, on a three-node Concord cluster
# on this machine (three `concord lockd`, three `concord mount --config` of one image):
#   create_1node      files/s created by one node alone in its own directory
#   create_3own       files/s created by three nodes at once, each in its own directory
#   create_3shared    files/s created by three nodes at once in one shared directory
#   lsl_same / lsl_other   `ls -l` of N entries on the node that made them, and on
#                     another node right after (its first look: every name, every
#                     inode's glock, every dinode comes from the DLM and the device)
#   write_read        p50/p99 of: 4 bytes written on node 1 (pwrite returned), then
#                     read on node 2 (its pread returns the new bytes): node 1's EX
#                     demote (commit, write-back of its blocks, invalidate), node 2's grant and read
# Prints "concord-cluster METRIC VALUE UNIT" lines. Everything it starts it stops.
#
# Env: CONCORD (binary, default target/release/concord), SIZE (image size, 4G),
#      DIR (work dir, default a fresh one under /var/tmp), N (files per node, 5000),
#      LS_N (entries for ls -l, 20000), ROUNDS (write/read rounds, 500).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
CONCORD=${CONCORD:-$here/target/release/concord}
SIZE=${SIZE:-4G}
DIR=${DIR:-$(mktemp -d /var/tmp/concord-cross-bench.XXXXXX)}
N=${N:-5000}
LS_N=${LS_N:-20000}
ROUNDS=${ROUNDS:-500}
[ -x "$CONCORD" ] || { echo "build it first: cargo build --release" >&2; exit 2; }

. "$here/bench/cluster-lib.sh"

c=$DIR/cluster
cluster_up "$c"

python3 - "$c" "$N" "$LS_N" "$ROUNDS" <<'EOF'
import os, sys, time, subprocess, threading
c, n, ls_n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
m = {i: f"{c}/mnt{i}" for i in (1, 2, 3)}
pc = time.perf_counter
FL = os.O_CREAT | os.O_EXCL | os.O_WRONLY
def emit(metric, value, unit): print(f"concord-cluster {metric} {value} {unit}", flush=True)
def creates(d, prefix, count):
    for k in range(count): os.close(os.open(f"{d}/{prefix}{k:06d}", FL, 0o644))
def at_once(jobs):
    ts = [threading.Thread(target=creates, args=j) for j in jobs]
    t = pc()
    for th in ts: th.start()
    for th in ts: th.join()
    return pc() - t
# One node alone.
os.mkdir(f"{m[1]}/alone")
e = at_once([(f"{m[1]}/alone", "f", n)])
emit("create_1node", f"{n/e:.0f}", "files/s")
# Three nodes, own directories (made by their own node).
for i in (1, 2, 3): os.mkdir(f"{m[i]}/own{i}")
e = at_once([(f"{m[i]}/own{i}", "f", n) for i in (1, 2, 3)])
emit("create_3own", f"{3*n/e:.0f}", "files/s")
# Three nodes, one shared directory.
os.mkdir(f"{m[1]}/shared")
e = at_once([(f"{m[i]}/shared", f"n{i}_", n) for i in (1, 2, 3)])
emit("create_3shared", f"{3*n/e:.0f}", "files/s")
for i in (1, 2, 3):
    got = len(os.listdir(f"{m[i]}/shared"))
    if got != 3 * n: print(f"cluster-cross: WARNING node {i} lists {got} of {3*n} in shared", file=sys.stderr)
# ls -l of LS_N entries: on the maker, then on another node.
os.mkdir(f"{m[1]}/big")
creates(f"{m[1]}/big", "e", ls_n)
def lsl(path):
    t = pc()
    r = subprocess.run(f"ls -l '{path}' | wc -l", shell=True, capture_output=True, text=True)
    e = pc() - t
    if int(r.stdout.strip() or 0) != ls_n + 1: print(f"cluster-cross: WARNING ls -l {path}: {r.stdout.strip()} lines", file=sys.stderr)
    return e
emit("lsl_same", f"{lsl(m[1] + '/big'):.2f}", "s")
emit("lsl_other", f"{lsl(m[2] + '/big'):.2f}", "s")
emit("lsl_other_again", f"{lsl(m[2] + '/big'):.2f}", "s")
# Write on node 1, read on node 2.
with open(f"{m[1]}/wr", "wb") as f: f.write(b"0000")
a = os.open(f"{m[1]}/wr", os.O_WRONLY); b = os.open(f"{m[2]}/wr", os.O_RDONLY)
lat = []
for k in range(rounds):
    v = f"{k % 10000:04d}".encode()
    t = pc()
    os.pwrite(a, v, 0)
    got = os.pread(b, 4, 0)
    lat.append(pc() - t)
    if got != v: print(f"cluster-cross: MISMATCH round {k}: wrote {v}, read {got}", file=sys.stderr); sys.exit(1)
lat.sort()
emit("write_read_p50", f"{lat[len(lat)//2]*1e6:.0f}", "us")
emit("write_read_p99", f"{lat[int(len(lat)*0.99)]*1e6:.0f}", "us")
EOF
for i in 3 2 1; do umount "$c/mnt$i"; done
sleep 2
"$CONCORD" fsck -n "$c/shared.img" >&2 || echo "fsck after the run: not clean" >&2
