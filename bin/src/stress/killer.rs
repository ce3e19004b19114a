//! The kill loop of `concord stress --cluster DIR --kill-every SECS`: every SECS (with
//! jitter from the seed) one node of the local cluster, never the last live one, is
//! killed as `concord cluster kill` does, and the run checks that the survivors
//! recover it and that everything its workers made durable is there.
//!
//! One cycle: pause the victim's workers (their models are final), mark the node dead
//! (no coherence check reads its mount from then on), `concord cluster kill ID
//! [--mount-only]`, poll the survivors' control sockets until every one of them is
//! `up` in a newer lockspace generation without the victim (the recovery time is
//! from the kill to then), check each paused worker's durable model from a survivor
//! and rebuild its model from what is there, `concord cluster restart ID`, mark the
//! node live and let its workers go on in the same directories.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::worker::Worker;
use super::{verify, Ctx, Rng};

/// How long the survivors may take to recover a killed node.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// What is killed: a node (lockd and mount) or its mount process alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KillMode {
    Node,
    Mount,
}

/// A local cluster (`concord cluster`'s folder) and the node id of each mount point.
pub struct LocalCluster {
    pub dir: PathBuf,
    /// Node id per mount index.
    pub ids: Vec<u32>,
}

impl LocalCluster {
    /// `concord cluster ARGS --dir DIR`, output collected.
    pub fn cmd(&self, args: &[&str]) -> Result<Output> {
        let exe = std::env::current_exe().context("finding the concord binary")?;
        Command::new(exe)
            .arg("cluster")
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running concord cluster {}", args.join(" ")))
    }

    /// [`LocalCluster::cmd`], which must succeed.
    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let o = self.cmd(args)?;
        if !o.status.success() {
            bail!(
                "concord cluster {} failed ({}): {}{}",
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stdout).trim(),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// The live nodes of the lockds' newest view (`concord cluster status --json`).
    pub fn live_nodes(&self) -> Option<Vec<u32>> {
        let o = self.cmd(&["status", "--json"]).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        Some(v["live_nodes"].as_array()?.iter().filter_map(|n| n.as_u64().map(|n| n as u32)).collect())
    }

    /// The mount points of the cluster's nodes, in node order, and their ids.
    pub fn mounts(dir: &Path) -> Result<Vec<(u32, PathBuf)>> {
        let mut v = Vec::new();
        for e in std::fs::read_dir(dir.join("mnt")).with_context(|| format!("{}: no mnt/ folder", dir.display()))? {
            let e = e?;
            if let Some(id) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                v.push((id, e.path()));
            }
        }
        v.sort();
        Ok(v)
    }
}

/// (state, generation, members) of the cluster mount on `mnt`, from its control socket.
fn mount_view(mnt: &Path) -> Option<(String, u64, Vec<u32>)> {
    let s = crate::control::query(mnt, "status", true).ok()?;
    let v: serde_json::Value = serde_json::from_str(&s).ok()?;
    let members = v["members"].as_array()?.iter().filter_map(|m| m.as_u64().map(|m| m as u32)).collect();
    Some((v["state"].as_str()?.to_string(), v["generation"].as_u64()?, members))
}

/// What the kill loop did.
#[derive(Default)]
pub struct KillStats {
    pub kills: u32,
    pub recoveries: Vec<Duration>,
}

/// The kill loop; returns when the run ends (a cycle that started is finished first).
pub fn run(
    ctx: &Arc<Ctx>,
    cluster: &LocalCluster,
    workers: &[Arc<Worker>],
    every: Duration,
    mode: KillMode,
    max_kills: Option<u32>,
    stats: &std::sync::Mutex<KillStats>,
) {
    let mut rng = Rng::new(ctx.seed ^ 0x6b69_6c6c);
    let mut n = 0u32;
    loop {
        if max_kills.is_some_and(|m| n >= m) {
            return;
        }
        let wait = every.mul_f64(0.5 + rng.unit());
        let start = Instant::now();
        while start.elapsed() < wait {
            if ctx.ended() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if ctx.ended() {
            return;
        }
        let live: Vec<usize> = {
            let l = ctx.live.read().unwrap_or_else(|e| e.into_inner());
            (0..l.len()).filter(|&i| l[i]).collect()
        };
        if live.len() < 2 {
            continue;
        }
        let victim = *rng.pick(&live);
        n += 1;
        match cycle(ctx, cluster, workers, victim, mode, n, stats) {
            Ok(()) => {}
            Err(e) => {
                ctx.fail(format!("seed {} kill {n} of node {}: {e:#}", ctx.seed, cluster.ids[victim]));
                // Its workers end (the run is stopping) instead of waiting for ever.
                for w in workers.iter().filter(|w| w.node == victim) {
                    w.ctl.resume();
                }
                return;
            }
        }
    }
}

fn cycle(
    ctx: &Arc<Ctx>,
    cluster: &LocalCluster,
    workers: &[Arc<Worker>],
    victim: usize,
    mode: KillMode,
    n: u32,
    stats: &std::sync::Mutex<KillStats>,
) -> Result<()> {
    let id = cluster.ids[victim];
    let survivors: Vec<usize> = {
        let l = ctx.live.read().unwrap_or_else(|e| e.into_inner());
        (0..l.len()).filter(|&i| l[i] && i != victim).collect()
    };
    let before: Vec<u64> = survivors.iter().map(|&s| mount_view(&ctx.mounts[s]).map_or(0, |v| v.1)).collect();
    let mine: Vec<&Arc<Worker>> = workers.iter().filter(|w| w.node == victim).collect();
    for w in &mine {
        w.ctl.pause();
    }
    ctx.live.write().unwrap_or_else(|e| e.into_inner())[victim] = false;
    let what = if mode == KillMode::Mount { "mount" } else { "node" };
    eprintln!("stress: kill {n}: {what} {id}");
    let t0 = Instant::now();
    let id_s = id.to_string();
    let mut args = vec!["kill", id_s.as_str()];
    if mode == KillMode::Mount {
        args.push("--mount-only");
    }
    let killed = cluster.ok(&args);
    // Whatever happens next, the node is counted as killed.
    stats.lock().unwrap_or_else(|e| e.into_inner()).kills += 1;
    killed?;
    // Recovered: every survivor up, in a newer generation, without the victim; for a
    // node, also the lockds' view without it (a mount that dies first leaves the
    // lockspace at once, its lockd's death is noticed only after the lease).
    loop {
        let views: Vec<Option<(String, u64, Vec<u32>)>> =
            survivors.iter().map(|&s| mount_view(&ctx.mounts[s])).collect();
        let mut done = views.iter().zip(&before).all(|(v, b)| {
            v.as_ref()
                .is_some_and(|(state, generation, members)| state == "up" && generation > b && !members.contains(&id))
        });
        if done && mode == KillMode::Node {
            done = cluster.live_nodes().is_some_and(|live| !live.is_empty() && !live.contains(&id));
        }
        if done {
            break;
        }
        if t0.elapsed() > RECOVERY_TIMEOUT {
            bail!("the survivors did not recover node {id} in {RECOVERY_TIMEOUT:?}: their views {views:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let took = t0.elapsed();
    stats.lock().unwrap_or_else(|e| e.into_inner()).recoveries.push(took);
    eprintln!("stress: kill {n}: node {id} recovered in {:.1} s", took.as_secs_f64());
    // What the dead node's workers made durable, seen from a survivor.
    let top = verify::top_on(&ctx.mounts[survivors[0]], &ctx.top);
    for w in &mine {
        let mut m = w.model.lock().unwrap_or_else(|e| e.into_inner());
        let r = verify::durable(&top, &m).and_then(|()| verify::rebuild(&top, &mut m));
        if let Err(f) = r {
            ctx.fail(format!(
                "seed {} worker {} op {} (check after kill {n} of node {id}) {}: {}",
                ctx.seed,
                w.id,
                m.ops,
                f.path.display(),
                f.what
            ));
            ctx.stop.store(true, Ordering::SeqCst);
        }
    }
    cluster.ok(&["restart", &id_s])?;
    ctx.live.write().unwrap_or_else(|e| e.into_inner())[victim] = true;
    for w in &mine {
        w.ctl.resume();
    }
    Ok(())
}
