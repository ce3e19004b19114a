#!/usr/bin/env bash
# bench/recovery.sh
#
# Recovery times after a kill, by hand, as root, after `cargo build --release -p concord`:
# a three-node Concord cluster on this machine (three `concord lockd`, three `concord
# mount --config` of one image). Each round, node 2 makes a directory, writes FILES
# files in it, each fsync'd, and fsyncs the directory (so node 2 holds the directory's
# glock EX and its journal is dirty); a second later comes `kill -9` of node 2's mount
# process alone (kind "mount": its lockd lives and leaves the lockspace for it) or of
# node 2's lockd and mount at once (kind "node": the survivors' lockds must wait out
# its lease, declare it dead and fence it). Measured from the kill, on node 1, by two
# threads started at the kill:
#   create  the first successful create (O_CREAT|O_EXCL, write, close) in that
#           directory;
#   read    reading node 2's last fsync'd file with the exact bytes written.
# Then node 2 comes back (its lockd started again for "node", its dead FUSE mount
# detached, mounted again) and the next round starts.
#
# The steps between come from the logs (UTC timestamps of the lockd and mount logs,
# lockds run with RUST_LOG=warn,concord_lockd=info), as milliseconds after the kill:
#   gone     node 2's lockd: "client with recovery callbacks left uncleanly" (mount)
#            or the first survivor lockd's "peer down" (node: QUIC idle timeout);
#   fence    "fencing node before recovering it" (node: the quorum suspects it);
#   dead     "node declared dead" (node: the fence command succeeded; proposed);
#   view     first survivor lockd's "membership view: lock recovery starts";
#   locks    last survivor lockd's "lock recovery done" (node 2's locks dropped,
#            the survivors' locks rebuilt);
#   asked    first survivor mount's "recover generation G jid J" (lock_dlm's
#            control work, after recover_done);
#   replayed "journal recovered jid=J" (the replay, on the survivor that won the
#            journal's glock);
#   done     last survivor mount's "recover generation G done" (locks unblocked).
# Prints one line per round (with "by": the survivor that replayed the journal; the
# other one got the journal's glock busy and looks again after lock_dlm's GAVEUP
# retry, 50 ms doubling up to 1 s, keeping its locks blocked until then) and p50/max
# per kind and timing, and per kind, timing and "by".
#
# TIMINGS picks the lockd timings: "default" (no [timing] section: heartbeat 200 ms,
# lease 2000 ms, dead after 2500 ms) and "loopback" (heartbeat 50 ms, lease 250 ms,
# dead after 350 ms, docs/config.md's values for nodes on one machine).
# The fence command is `true`, so that its step shows in the log.
#
# Env: CONCORD (binary, default target/release/concord), ROUNDS (10 per kind and
#      timing), KINDS ("mount node"), TIMINGS ("default loopback"), FILES (20),
#      FILE_KIB (16), SIZE (image, 1G), DIR (work dir, default a fresh one under
#      /var/tmp, removed at the end unless KEEP=1).
# Everything it starts it stops.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
CONCORD=${CONCORD:-$here/target/release/concord}
ROUNDS=${ROUNDS:-10}
KINDS=${KINDS:-"mount node"}
TIMINGS=${TIMINGS:-"default loopback"}
FILES=${FILES:-20}
FILE_KIB=${FILE_KIB:-16}
SIZE=${SIZE:-1G}
KEEP=${KEEP:-0}
made_dir=0
if [ -z "${DIR:-}" ]; then
    DIR=$(mktemp -d /var/tmp/concord-recovery-bench.XXXXXX)
    made_dir=1
fi
mkdir -p "$DIR"
[ -x "$CONCORD" ] || { echo "build it first: cargo build --release -p concord" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "run it as root (FUSE mounts, kill of the mounts)" >&2; exit 2; }
export NO_COLOR=1

declare -A lockd_pid mount_pid
c=""   # the current cluster's folder

stop_cluster() {
    [ -n "$c" ] || return 0
    for i in 3 2 1; do
        if [ -n "${mount_pid[$i]:-}" ]; then
            umount "$c/mnt$i" 2>/dev/null || umount -l "$c/mnt$i" 2>/dev/null || true
        fi
    done
    for i in 3 2 1; do
        p=${mount_pid[$i]:-}
        [ -n "$p" ] || continue
        for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
        mount_pid[$i]=""
    done
    for i in 1 2 3; do
        mountpoint -q "$c/mnt$i" 2>/dev/null && umount -l "$c/mnt$i" 2>/dev/null || true
        p=${lockd_pid[$i]:-}
        [ -n "$p" ] && kill -9 "$p" 2>/dev/null || true
        lockd_pid[$i]=""
    done
}
cleanup() {
    stop_cluster
    if [ "$made_dir" = 1 ] && [ "$KEEP" != 1 ]; then rm -rf "$DIR"; else echo "kept $DIR" >&2; fi
}
trap cleanup EXIT
# A signal's default action would end the shell without the EXIT trap: exit instead.
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_lockd N: node N's lockd in the background, logging to lockd-N.log (appended).
start_lockd() {
    RUST_LOG=warn,concord_lockd=info "$CONCORD" lockd --config "$c/cluster.toml" --node "$1" >>"$c/lockd-$1.log" 2>&1 &
    lockd_pid[$1]=$!
    disown "$!" # no "Killed" notice from the shell when the round kills it
}

# wait_gone PID: waits (up to 30 s) until process PID has exited.
wait_gone() {
    for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    echo "process $1 did not exit" >&2; return 1
}

# quorate: every lockd is quorate and sees all three nodes live.
quorate() {
    for i in 1 2 3; do
        "$CONCORD" dlm --config "$c/cluster.toml" --node "$i" status --json 2>/dev/null |
            python3 -c 'import json,sys; v=json.load(sys.stdin); sys.exit(0 if v["quorate"] and len(v["live_nodes"]) == 3 else 1)' \
                2>/dev/null || return 1
    done
}
wait_quorate() {
    for _ in $(seq 600); do quorate && return 0; sleep 0.1; done
    echo "the lockds did not reach a quorum" >&2; return 1
}

# mount_node N: node N's mount in the background (its ready line to mount-N.out), and
# waits for the ready line.
mount_node() {
    : >"$c/mount-$1.out"
    "$CONCORD" mount --config "$c/cluster.toml" --node "$1" "$c/shared.img" "$c/mnt$1" \
        >"$c/mount-$1.out" 2>>"$c/mount-$1.log" &
    mount_pid[$1]=$!
    disown "$!"
    for _ in $(seq 600); do
        grep -q "mounted on" "$c/mount-$1.out" && return 0
        kill -0 "${mount_pid[$1]}" 2>/dev/null || break
        sleep 0.1
    done
    echo "node $1 did not mount: $(tail -5 "$c/mount-$1.log")" >&2; return 1
}

# The measurement of one round: kills, times the create and the read on node 1,
# waits for the survivors' "recover generation G done", and reads the logs' steps.
# Prints "kind timing round by jblocks create_ms read_ms gone fence dead view locks
# asked replayed done" (by: the node that replayed node 2's journal; jblocks: the
# blocks in use in node 2's journal just before the kill, as `concord jinfo` reads
# them; steps in ms after the kill, "-" when the log has no such line).
measure() {
    python3 - "$@" <<'EOF'
import os, sys, time, threading, re, datetime, signal
c, kind, timing, rnd, dirname, lastname, expect_path, pids, jblocks = sys.argv[1:10]
pids = [int(p) for p in pids.split(",")]
marks = {}
logs = {f"lockd-{i}": f"{c}/lockd-{i}.log" for i in (1, 2, 3)}
logs.update({f"mount-{i}": f"{c}/mount-{i}.log" for i in (1, 2, 3)})
for k, p in logs.items():
    marks[k] = os.path.getsize(p) if os.path.exists(p) else 0
expect = open(expect_path, "rb").read()
res = {}
t0 = time.time()
for p in pids:
    os.kill(p, signal.SIGKILL)
def create():
    path = f"{c}/mnt1/{dirname}/after-kill"
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.write(fd, b"node 1 after the kill\n")
            os.close(fd)
            res["create"] = time.time() - t0
            return
        except OSError as e:
            res.setdefault("create_errors", []).append(str(e))
            time.sleep(0.005)
def read():
    path = f"{c}/mnt1/{dirname}/{lastname}"
    while True:
        try:
            with open(path, "rb") as f:
                got = f.read()
            if got == expect:
                res["read"] = time.time() - t0
                return
            res.setdefault("read_errors", []).append(f"{len(got)} bytes differ")
        except OSError as e:
            res.setdefault("read_errors", []).append(str(e))
        time.sleep(0.005)
ts = [threading.Thread(target=create), threading.Thread(target=read)]
for t in ts: t.start()
for t in ts: t.join(120)
if "create" not in res or "read" not in res:
    print(f"round {rnd}: no create or read in 120 s: {res}", file=sys.stderr); sys.exit(1)
for k in ("create_errors", "read_errors"):
    if k in res:
        print(f"round {rnd}: {k}: {sorted(set(res[k]))[:3]} ({len(res[k])})", file=sys.stderr)
def lines(k):
    try:
        with open(logs[k], "rb") as f:
            f.seek(marks[k]); return f.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return []
def at(line):
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z", line)
    if not m: return None
    return datetime.datetime.fromisoformat(m.group(1)[:26]).replace(tzinfo=datetime.timezone.utc).timestamp() - t0
def first(keys, *needles, last=False):
    ts = [at(l) for k in keys for l in lines(k) if all(n in l for n in needles)]
    ts = [t for t in ts if t is not None]
    if not ts: return None
    return max(ts) if last else min(ts)
# The survivors' "recover generation G done" for the generation that recovered node 2.
deadline = time.time() + 60
gen = None
while time.time() < deadline:
    asked = [l for k in ("mount-1", "mount-3") for l in lines(k) if re.search(r"recover generation \d+ jid \d+ ", l)]
    if asked:
        gen = re.search(r"recover generation (\d+) jid", asked[0]).group(1)
        if all(any(f"recover generation {gen} done" in l for l in lines(k)) for k in ("mount-1", "mount-3")):
            break
    time.sleep(0.05)
surv_lockd = ("lockd-1", "lockd-3")
if kind == "mount":
    gone = first(("lockd-2",), "left uncleanly")
else:
    gone = first(surv_lockd, "peer down", "peer=2")
steps = [
    gone,
    first(surv_lockd, "fencing node before recovering it", "target=2"),
    first(surv_lockd, "node declared dead", "target=2"),
    first(surv_lockd, "membership view: lock recovery starts"),
    first(surv_lockd, "lock recovery done", last=True),
    first(("mount-1", "mount-3"), f"recover generation {gen} jid") if gen else None,
    first(("mount-1", "mount-3"), "journal recovered", "replayed=true"),
    first(("mount-1", "mount-3"), f"recover generation {gen} done", last=True) if gen else None,
]
ms = lambda t: "-" if t is None else str(round(t * 1000))
by = [k[-1] for k in ("mount-1", "mount-3") if any("journal recovered" in l and "replayed=true" in l for l in lines(k))]
print(kind, timing, rnd, ",".join(by) or "-", jblocks, ms(res["create"]), ms(res["read"]), *[ms(t) for t in steps])
EOF
}

# A round's files on node 2: FILES files of FILE_KIB KiB in directory $1, each
# fsync'd, the directory fsync'd; the last file's bytes also go to $2.
node2_writes() {
    python3 - "$c/mnt2/$1" "$2" "$FILES" "$FILE_KIB" <<'EOF'
import os, sys
d, expect, n, kib = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
os.mkdir(d)
for i in range(n):
    data = (f"{d} file {i} ".encode() * (kib * 1024))[: kib * 1024]
    fd = os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    os.write(fd, data); os.fsync(fd); os.close(fd)
dfd = os.open(d, os.O_RDONLY); os.fsync(dfd); os.close(dfd)
open(expect, "wb").write(data)
EOF
}

results=$DIR/results.txt
: >"$results"
for timing in $TIMINGS; do
    case $timing in
        default) timing_toml="" ;;
        loopback) timing_toml=$'[timing]\nheartbeat_ms = 50\nlease_ms = 250\n' ;;
        *) echo "TIMINGS: unknown timing $timing (default, loopback)" >&2; exit 2 ;;
    esac
    c=$DIR/$timing
    mkdir -p "$c"
    "$CONCORD" ca init "$c/tls" --cluster rb >/dev/null
    {
        printf '[cluster]\nname = "rb"\n\n[tls]\ndir = "tls"\n\n%s\n[fence]\ncmd = "true"\n\n' "$timing_toml"
        printf '[runtime]\ndir = "run"\nstate_dir = "state"\n'
        for i in 1 2 3; do
            "$CONCORD" ca issue "$c/tls" --node "$i" >/dev/null
            printf '\n[[node]]\nid = %d\nname = "n%d"\naddr = "127.0.0.1:%d"\n' "$i" "$i" "$(free_port)"
        done
    } >"$c/cluster.toml"
    "$CONCORD" mkfs -j 3 -p lock_dlm -t rb:fs1 --size "$SIZE" "$c/shared.img" >/dev/null
    for i in 1 2 3; do start_lockd "$i"; done
    wait_quorate
    for i in 1 2 3; do mkdir -p "$c/mnt$i"; mount_node "$i"; done
    for kind in $KINDS; do
        for r in $(seq "$ROUNDS"); do
            d="$kind-$r"
            node2_writes "$d" "$c/expect"
            sleep 1
            jid2=$("$CONCORD" status "$c/mnt2" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["jid"])')
            jblocks=$("$CONCORD" jinfo "$c/shared.img" | sed -n "s/^journal$jid2: .*, \([0-9]*\) blocks in use.*/\1/p")
            # The lockd first: killed after its mount, it could see the mount go and
            # leave the lockspace for it, as in a "mount" round, before it dies.
            pids=${mount_pid[2]}
            [ "$kind" = node ] && pids="${lockd_pid[2]},$pids"
            measure "$c" "$kind" "$timing" "$r" "$d" "f$((FILES - 1))" "$c/expect" "$pids" "${jblocks:--}" | tee -a "$results"
            wait_gone "${mount_pid[2]}"
            mount_pid[2]=""
            umount -l "$c/mnt2" 2>/dev/null || true
            if [ "$kind" = node ]; then
                wait_gone "${lockd_pid[2]}"
                start_lockd 2
                wait_quorate
            fi
            mount_node 2
        done
    done
    for i in 3 2 1; do umount "$c/mnt$i"; done
    for i in 3 2 1; do
        for _ in $(seq 300); do kill -0 "${mount_pid[$i]}" 2>/dev/null || break; sleep 0.1; done
        mount_pid[$i]=""
    done
    if "$CONCORD" fsck -n "$c/shared.img" >"$c/fsck.txt" 2>&1; then
        echo "# $timing: fsck -n clean after all unmounted"
    else
        echo "# $timing: fsck -n NOT clean: $c/fsck.txt" | tee -a "$results"
    fi
    for i in 1 2 3; do kill "${lockd_pid[$i]}" 2>/dev/null || true; done
    for i in 1 2 3; do
        for _ in $(seq 50); do kill -0 "${lockd_pid[$i]}" 2>/dev/null || break; sleep 0.1; done
        kill -9 "${lockd_pid[$i]}" 2>/dev/null || true
        lockd_pid[$i]=""
    done
    c=""
done

echo "# kind timing [replayed by]: p50/max (ms after the kill) of create, read, and the logs' steps"
python3 - "$results" <<'EOF'
import sys, collections
rows = collections.defaultdict(list)
for l in open(sys.argv[1]):
    f = l.split()
    if not f or f[0].startswith("#"): continue
    rows[(f[0], f[1])].append(f[4:])
    rows[(f[0], f[1], "replayed by node " + f[3])].append(f[4:])
names = "jblocks create read gone fence dead view locks asked replayed done".split()
for key, rs in rows.items():
    out = []
    for i, n in enumerate(names):
        v = sorted(int(r[i]) for r in rs if r[i] != "-")
        out.append(f"{n} {v[(len(v) - 1) // 2]}/{v[-1]}" if v else f"{n} -")
    print(f"{' '.join(key)} (n={len(rs)}): " + ", ".join(out))
EOF
