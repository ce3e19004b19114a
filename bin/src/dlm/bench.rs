//! `concord dlm bench`: lock latency and throughput between in-process lockd nodes
//! talking real QUIC with mutual TLS on loopback, through the same client API (unix
//! socket) that `concord dlm` and mount processes use. Every figure is measured in
//! the same run as the raw QUIC round trip between the same peers.
//!
//! * `local_lock_us_p50`: lock EX + unlock of a resource this node masters (its
//!   directory is this node too), through the client socket. The run also checks that
//!   the node sent no peer message meanwhile (`local_peer_messages`).
//! * `local_lock_posted_unlock_us_p50`: the same, but the unlock is
//!   `unlock_posted` (sent, its AST not awaited): the time from the lock request to
//!   the grant seen plus the unlock handed to the socket. Not a completed unlock; the
//!   next iteration's lock is applied after it (same connection, in order).
//! * `remote_lock_us_p50`: one EX lock of a resource mastered on another node (one
//!   round trip: request, AST); `remote_lock_unlock_us_p50` adds the unlock (a second
//!   round trip, as in the Linux DLM).
//! * `pingpong_us_p50`: an EX lock bouncing between two nodes as glocks use it: each
//!   holds it until a BAST says the other wants it, then unlocks and asks again; the
//!   time between consecutive grants (the master is a third node when there is one).
//! * `throughput_ops_per_s`: lock and unlock operations (each counts one) per second
//!   over many resources from every node at once, many requests in flight per client.
//! * `quic_rtt_us_p50`: `Endpoint::rtt_probe` between the nodes of the remote test.
//! * `unix_rtt_us_p50`: the floor of one request/answer over a unix socket: a 64-byte
//!   ping-pong between two threads with blocking I/O on a socket pair (no runtime, no
//!   encoding). `unix_rtt_tokio_us_p50`: the same ping-pong between two tasks of the
//!   bench's own tokio runtime (the client's runtime).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use concord_lockd::client::{Client, JoinKind, LockspaceHandle};
use concord_lockd::core::{directory_node, Flags, Mode, Status};
use concord_lockd::node::{Node, NodeOptions};
use concord_lockd::transport::testing::LocalCluster;

#[derive(Args)]
pub struct BenchArgs {
    /// Number of nodes (at least 2).
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// Iterations of each latency test.
    #[arg(long, default_value_t = 5000)]
    iterations: usize,
    /// Seconds of the throughput test.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Concurrent lock loops per node in the throughput test.
    #[arg(long, default_value_t = 64)]
    workers: usize,
    /// Measure against the running lockd of every node of --config (real processes)
    /// instead of starting in-process nodes.
    #[arg(long)]
    pub lockd: bool,
    /// Run all nodes and clients on one thread (tokio current-thread runtime): no
    /// cross-thread wake-ups, one core.
    #[arg(long)]
    pub one_thread: bool,
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// A name whose directory node is `node` among `members`.
fn name_on(members: &[u32], node: u32, tag: &str) -> Vec<u8> {
    (0..)
        .map(|i| format!("{tag}/{i}").into_bytes())
        .find(|n| directory_node(members, n) == node)
        .expect("some name hashes to every member")
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    let rt = if a.one_thread {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()?
    };
    rt.block_on(bench(a))
}

/// Bytes of one floor ping-pong message (about a lock request frame).
const FLOOR_MSG: usize = 64;

/// Round trips over a unix socket pair between two threads, blocking I/O.
fn unix_rtt_blocking(iters: usize) -> Result<Lat> {
    use std::io::{Read, Write};
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf = [0u8; FLOOR_MSG];
        loop {
            match b.read_exact(&mut buf) {
                Ok(()) => b.write_all(&buf)?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut buf = [0u8; FLOOR_MSG];
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        a.write_all(&buf)?;
        a.read_exact(&mut buf)?;
        v.push(us(t.elapsed()));
    }
    drop(a);
    echo.join().map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    Ok(lat(v))
}

/// Round trips over a unix socket pair between two tasks of the current runtime.
async fn unix_rtt_tokio(iters: usize) -> Result<Lat> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut a, mut b) = tokio::net::UnixStream::pair()?;
    let echo = tokio::spawn(async move {
        let mut buf = [0u8; FLOOR_MSG];
        while b.read_exact(&mut buf).await.is_ok() {
            if b.write_all(&buf).await.is_err() {
                break;
            }
        }
    });
    let mut buf = [0u8; FLOOR_MSG];
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        a.write_all(&buf).await?;
        a.read_exact(&mut buf).await?;
        v.push(us(t.elapsed()));
    }
    drop(a);
    let _ = echo.await;
    Ok(lat(v))
}

struct Lat {
    p50: f64,
    p99: f64,
}

fn lat(mut v: Vec<f64>) -> Lat {
    Lat { p50: pct(&mut v, 0.5), p99: pct(&mut v, 0.99) }
}

async fn bench(a: BenchArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("concord-dlm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let r = bench_in(&dir, a).await;
    let _ = std::fs::remove_dir_all(&dir);
    r
}

async fn bench_in(dir: &std::path::Path, a: BenchArgs) -> Result<()> {
    let mut lc = LocalCluster::create(dir, "bench", a.nodes).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut nodes = Vec::new();
    for id in 1..=a.nodes {
        let opts = NodeOptions::local(&mut lc, id);
        nodes.push(Node::start(&lc.config, id, opts).await?);
    }
    for n in &nodes {
        if !n.wait_peers_up(Duration::from_secs(10)).await {
            bail!("node {} did not connect to its peers", n.id());
        }
    }
    let members: Vec<u32> = (1..=a.nodes).collect();
    let mut handles: Vec<LockspaceHandle> = Vec::new();
    for n in &nodes {
        let c = Client::connect_named(n.socket_path(), "bench").await?;
        handles.push(c.join("bench", JoinKind::Plain).await?);
    }
    // QUIC floor, node 2 → node 1.
    let mut rtt = Vec::with_capacity(a.iterations);
    for _ in 0..a.iterations.min(2000) {
        rtt.push(us(nodes[1].endpoint().rtt_probe(1).await?));
    }
    let what = format!("{} nodes in one process, real QUIC+mTLS on loopback", a.nodes);
    let r = measure(&a, &what, &members, handles, Some(lat(rtt))).await;
    for n in nodes {
        n.shutdown().await;
    }
    r
}

/// `concord dlm --config FILE bench --lockd`: against the running lockd of every
/// configured node (real processes); no QUIC probe from outside.
pub async fn against_lockds(a: BenchArgs, cfg: &concord_lockd::config::ClusterConfig) -> Result<()> {
    let mut members: Vec<u32> = cfg.node_ids().collect();
    members.sort_unstable();
    if members.len() < 2 {
        bail!("the cluster needs at least 2 nodes");
    }
    let mut handles = Vec::new();
    for id in &members {
        let path = cfg.lockd_socket_path(*id);
        let c = Client::connect_named(&path, "bench").await.with_context(|| format!("lockd of node {id}"))?;
        handles.push(c.join("bench", JoinKind::Plain).await?);
    }
    let what = format!("{} running lockd processes of cluster {}", members.len(), cfg.cluster_name);
    measure(&a, &what, &members, handles, None).await
}

async fn sent(h: &LockspaceHandle) -> Result<u64> {
    Ok(h.client().status().await?.lock_messages_sent)
}

/// Runs every measurement through `handles` (one per node of `members`, in order).
async fn measure(
    a: &BenchArgs,
    what: &str,
    members: &[u32],
    handles: Vec<LockspaceHandle>,
    rtt: Option<Lat>,
) -> Result<()> {
    let (n1, nodes) = (members[0], members.len());
    let iters = a.iterations;
    let ex = Flags::empty();

    // The floor of one socket round trip, measured in this run beside the rest.
    let unix_rtt = unix_rtt_blocking(iters.min(5000))?;
    let unix_rtt_tokio = unix_rtt_tokio(iters.min(5000)).await?;

    // The floor of the local case: the lockspace core alone, no runtime, no socket.
    let core_local = {
        let mut core = concord_lockd::core::Lockspace::new("floor", n1, members.to_vec(), 1);
        let name = name_on(members, n1, "floor");
        let req = || concord_lockd::core::LockRequest { name: name.clone(), mode: Mode::EX, flags: ex, lvb: None };
        let t = Instant::now();
        let n = iters * 20;
        for _ in 0..n {
            let lkid = core.request(0, req())?;
            while core.poll_event().is_some() {}
            core.unlock(0, lkid, None)?;
            while core.poll_event().is_some() {}
        }
        if core.poll_transmit().is_some() {
            bail!("a locally mastered lock sent a message");
        }
        us(t.elapsed()) / n as f64
    };

    // Local: node 1, resource whose directory (and so master) is node 1.
    let local_name = name_on(members, n1, "local");
    let h1 = &handles[0];
    for _ in 0..100 {
        let ast = h1.lock(&local_name, Mode::EX, ex, None).await?;
        h1.unlock(ast.lkid, None).await?;
    }
    let sent_before = sent(h1).await?;
    let mut local = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let ast = h1.lock(&local_name, Mode::EX, ex, None).await?;
        h1.unlock(ast.lkid, None).await?;
        local.push(us(t.elapsed()));
    }
    let mut posted = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        let ast = h1.lock(&local_name, Mode::EX, ex, None).await?;
        if ast.status != Status::Granted {
            bail!("local lock ended with {}", ast.status);
        }
        h1.unlock_posted(ast.lkid, None).await?;
        posted.push(us(t.elapsed()));
    }
    let local_msgs = sent(h1).await? - sent_before;
    let (local, posted) = (lat(local), lat(posted));

    // Remote: node 2 locks a resource node 1 masters.
    let remote_name = name_on(members, n1, "remote");
    let ast = h1.lock(&remote_name, Mode::EX, ex, None).await?;
    h1.unlock(ast.lkid, None).await?;
    let h2 = &handles[1];
    for _ in 0..100 {
        let ast = h2.lock(&remote_name, Mode::EX, ex, None).await?;
        h2.unlock(ast.lkid, None).await?;
    }
    let (mut rl, mut rlu) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
    for _ in 0..iters {
        let t = Instant::now();
        let ast = h2.lock(&remote_name, Mode::EX, ex, None).await?;
        let locked = t.elapsed();
        h2.unlock(ast.lkid, None).await?;
        rl.push(us(locked));
        rlu.push(us(t.elapsed()));
    }
    let (remote, remote_lu) = (lat(rl), lat(rlu));

    // Ping-pong between nodes 1 and 2, master on node 3 if there is one.
    let pp_master = if nodes >= 3 { members[2] } else { n1 };
    let pp_name = name_on(members, pp_master, "pingpong");
    let pp_handles = if nodes >= 3 {
        let ast = handles[2].lock(&pp_name, Mode::NL, ex, None).await?;
        handles[2].unlock(ast.lkid, None).await?;
        vec![handles[0].clone(), handles[1].clone()]
    } else {
        vec![handles[0].clone(), handles[1].clone()]
    };
    let pingpong = lat(pingpong(pp_handles, pp_name, iters.min(3000)).await?);

    // Throughput: every node, many workers, distinct resources.
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for (ni, h) in handles.iter().enumerate() {
        for w in 0..a.workers {
            let (h, stop, ops) = (h.clone(), stop.clone(), ops.clone());
            set.spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let name = format!("tp/{ni}/{w}/{}", i % 16);
                    i += 1;
                    let ast = h.lock(name.as_bytes(), Mode::EX, Flags::empty(), None).await?;
                    if ast.status != Status::Granted {
                        bail!("throughput lock ended with {}", ast.status);
                    }
                    h.unlock(ast.lkid, None).await?;
                    ops.fetch_add(2, Ordering::Relaxed);
                }
                Ok(())
            });
        }
    }
    // Warm-up (lookups of new names), then the measured window.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (o0, t0) = (ops.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(a.seconds)).await;
    let (o1, t1) = (ops.load(Ordering::Relaxed), t0.elapsed());
    stop.store(true, Ordering::Relaxed);
    while let Some(r) = set.join_next().await {
        r??;
    }
    let tput = (o1 - o0) as f64 / t1.as_secs_f64();

    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if a.json {
        let v = serde_json::json!({
            "nodes": nodes,
            "setup": what,
            "cpus": cpus,
            "iterations": iters,
            "local_lock_us_p50": local.p50,
            "local_lock_us_p99": local.p99,
            "local_lock_posted_unlock_us_p50": posted.p50,
            "local_lock_posted_unlock_us_p99": posted.p99,
            "local_peer_messages": local_msgs,
            "core_local_lock_us_mean": core_local,
            "remote_lock_us_p50": remote.p50,
            "remote_lock_us_p99": remote.p99,
            "remote_lock_unlock_us_p50": remote_lu.p50,
            "pingpong_us_p50": pingpong.p50,
            "pingpong_us_p99": pingpong.p99,
            "throughput_ops_per_s": tput.round(),
            "throughput_workers_per_node": a.workers,
            "quic_rtt_us_p50": rtt.as_ref().map(|r| r.p50),
            "quic_rtt_us_p99": rtt.as_ref().map(|r| r.p99),
            "unix_rtt_us_p50": unix_rtt.p50,
            "unix_rtt_us_p99": unix_rtt.p99,
            "unix_rtt_tokio_us_p50": unix_rtt_tokio.p50,
            "unix_rtt_tokio_us_p99": unix_rtt_tokio.p99,
        });
        println!("{v}");
    } else {
        println!("concord dlm bench: {what}, {cpus} CPUs");
        match &rtt {
            Some(rtt) => println!("  raw QUIC round trip         p50 {:8.1} us   p99 {:8.1} us", rtt.p50, rtt.p99),
            None => println!("  raw QUIC round trip         (not measured against running lockds)"),
        }
        println!(
            "  unix socket round trip      p50 {:8.1} us   p99 {:8.1} us   (two threads, blocking I/O)",
            unix_rtt.p50, unix_rtt.p99
        );
        println!(
            "  unix socket round trip      p50 {:8.1} us   p99 {:8.1} us   (two tasks of this runtime)",
            unix_rtt_tokio.p50, unix_rtt_tokio.p99
        );
        println!(
            "  local lock+unlock           p50 {:8.1} us   p99 {:8.1} us   ({local_msgs} peer messages)",
            local.p50, local.p99
        );
        println!(
            "  local lock+posted unlock    p50 {:8.1} us   p99 {:8.1} us   (unlock sent, its AST not awaited)",
            posted.p50, posted.p99
        );
        println!("  local lock+unlock, core     mean {core_local:8.2} us   (the lockspace state machine alone)");
        println!("  remote lock (1 round trip)  p50 {:8.1} us   p99 {:8.1} us", remote.p50, remote.p99);
        println!("  remote lock+unlock          p50 {:8.1} us   p99 {:8.1} us", remote_lu.p50, remote_lu.p99);
        println!("  EX ping-pong per handoff    p50 {:8.1} us   p99 {:8.1} us", pingpong.p50, pingpong.p99);
        println!(
            "  throughput                  {:.0} ops/s (lock and unlock each count; {} nodes x {} workers)",
            tput, nodes, a.workers
        );
    }
    Ok(())
}

/// Two holders bounce an EX lock: each holds it until a BAST, then unlocks and asks
/// again. Returns the intervals between consecutive grants, in µs.
async fn pingpong(handles: Vec<LockspaceHandle>, name: Vec<u8>, grants_each: usize) -> Result<Vec<f64>> {
    let start = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut set = tokio::task::JoinSet::new();
    for h in handles {
        let (name, done) = (name.clone(), done.clone());
        set.spawn(async move {
            let mut basts = h.basts();
            let mut stamps = Vec::with_capacity(grants_each);
            for _ in 0..grants_each {
                let ast = h.lock(&name, Mode::EX, Flags::empty(), None).await?;
                stamps.push(start.elapsed());
                // Hold until the other side wants it (or has finished).
                loop {
                    if done.load(Ordering::Relaxed) > 0 {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_millis(50), basts.recv()).await {
                        Ok(Some(b)) if b.lkid == ast.lkid => break,
                        Ok(Some(_)) => continue,
                        Ok(None) => bail!("BAST stream closed"),
                        Err(_) => continue,
                    }
                }
                h.unlock(ast.lkid, None).await?;
            }
            done.fetch_add(1, Ordering::Relaxed);
            Ok::<_, anyhow::Error>(stamps)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        all.extend(r??);
    }
    all.sort();
    Ok(all.windows(2).map(|w| us(w[1] - w[0])).collect())
}
