#!/bin/bash
# fsbench's randread_4k_cold job alone, on several mounts, alternating.
#
# Usage: bench/randread_cold.sh ROUNDS MOUNTPOINT...   (as root: it drops the caches)
#
# Every round and mount: write a fresh 1 GiB file (so that no cache of the mount holds
# it: Concord's own data cache survives drop_caches), sync, drop the kernel's caches,
# then 10 s of 4 KiB buffered random reads with fsbench's fio options. Prints the IOPS.
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,9p' "$0"; exit 2; }
rounds=$1; shift
opts=(--ioengine=psync --iodepth=1 --fallocate=none)
for r in $(seq "$rounds"); do
  for m in "$@"; do
    f=$m/randread_cold.file
    rm -f "$f"
    fio --name=w --filename="$f" --rw=write --bs=1m --size=1g --end_fsync=1 "${opts[@]}" >/dev/null
    sync; echo 3 > /proc/sys/vm/drop_caches
    iops=$(fio --name=rr --filename="$f" --rw=randread --bs=4k --size=1g --time_based --runtime=10 \
        --norandommap --randrepeat=1 "${opts[@]}" --output-format=json |
      python3 -c 'import json, sys; print(round(json.load(sys.stdin)["jobs"][0]["read"]["iops"]))')
    echo "round $r $m $iops IOPS"
    rm -f "$f"
  done
done
