# bench/cluster-lib.sh: sourced by bench/cluster.sh and bench/cluster-cross.sh.
# cluster_up DIR starts a three-node Concord cluster on this machine under DIR (CA and
# node certificates, cluster.toml on free loopback ports, three `concord lockd`, a
# `mkfs -j 3 -p lock_dlm` image of $SIZE, three `concord mount --config`), each mount
# at DIR/mnt1..3. Everything started is recorded in `pids` and `mnts`, and stopped by
# the EXIT trap set here. Needs $CONCORD and $SIZE.

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
# A signal's default action would end the shell without the EXIT trap: exit instead
# (after the command running in the foreground, if any, returns).
trap 'exit 143' TERM
trap 'exit 130' INT
trap 'exit 129' HUP

free_port() { python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

wait_mounted() {
    for _ in $(seq 600); do mountpoint -q "$1" && return 0; sleep 0.1; done
    echo "$1 did not mount" >&2; return 1
}

cluster_up() {
    local c=$1 i
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
        "$CONCORD" mount --config "$c/cluster.toml" --node "$i" "$c/shared.img" "$c/mnt$i" \
            >"$c/mount$i.log" 2>&1 &
        pids+=($!)
        mnts+=("$c/mnt$i")
        wait_mounted "$c/mnt$i"
    done
}
