#!/usr/bin/env python3
"""Cold `ls -f DIR | wc -l` of one large directory on several mounts, alternating.

Usage: bench/ls_cold.py MOUNTPOINT... ROUNDS   (as root: it drops the kernel's caches)

Makes DIR = MOUNTPOINT/ls_cold with N files (FSB_META_N, default 20,000, as fsbench's
meta_ls_cold) unless it is there already, then for every round and mount (the order
alternates between rounds): sync, drop the caches, time the pipeline fsbench times.
Prints the median, quartiles and minimum per mount. Listing one directory many times
shows the spread of the row, which in fsbench is one sample per round.
"""
import os
import statistics
import subprocess
import sys
import time

if len(sys.argv) < 3:
    sys.exit(__doc__)
mounts, rounds = sys.argv[1:-1], int(sys.argv[-1])
n = int(os.environ.get("FSB_META_N", "20000"))
dirs = []
for m in mounts:
    d = os.path.join(m, "ls_cold")
    if not os.path.isdir(d):
        os.mkdir(d)
        for i in range(n):
            os.close(os.open(os.path.join(d, f"f{i:06d}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    dirs.append(d)
times = {d: [] for d in dirs}
for k in range(rounds):
    for d in dirs if k % 2 == 0 else dirs[::-1]:
        os.sync()
        time.sleep(0.3)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        t = time.perf_counter()
        r = subprocess.run(f"ls -f '{d}' | wc -l", shell=True, capture_output=True, text=True, check=True)
        e = time.perf_counter() - t
        if int(r.stdout) != n + 2:
            sys.exit(f"{d}: ls counted {r.stdout.strip()} entries, expected {n + 2}")
        times[d].append(e * 1e3)
for d, v in times.items():
    v = sorted(v)
    med = statistics.median(v)
    print(f"{d}: median {med:.1f} ms, quartiles {v[len(v) // 4]:.1f}-{v[3 * len(v) // 4]:.1f}, "
          f"min {v[0]:.1f} ({(n + 2) / med * 1e3:,.0f} entries/s)")
