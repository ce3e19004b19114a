//! `concord stress`: an fsstress-style workload that checks what it reads, on one or
//! several mount points (nodes of one cluster filesystem) at once, optionally killing
//! nodes of a local cluster as it runs (docs/guide/stress.md).
//!
//! - [`pattern`]: the self-describing data every write puts down, and its decoder;
//! - [`model`]: per worker, what must be visible and what must survive a crash;
//! - [`worker`]: the operations, drawn from a seeded mix, each checked as it goes;
//! - [`verify`]: whole-worker checks (exact, durable) and the model rebuilt after a kill;
//! - [`killer`]: the kill loop against a `concord cluster` folder;
//! - [`sys`]: the system calls std lacks.
//!
//! Layout under each mount point (one filesystem seen through every node):
//!
//! ```text
//! stress-<seed>/w<N>/...            worker N's private tree (files, links, symlinks, d<k>/)
//! stress-<seed>/shared/w<N>-<k>     worker N's names in the shared directory
//! stress-<seed>/shared/counter-*    the lock counters (flock, OFD)
//! ```

mod killer;
mod model;
mod pattern;
mod sys;
mod verify;
mod worker;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use killer::{KillMode, KillStats, LocalCluster};
use model::Model;
use worker::Worker;

/// The counter incremented under flock(LOCK_EX).
pub const COUNTER_FLOCK: &str = "shared/counter-flock";
/// The counter incremented under an OFD write lock.
pub const COUNTER_OFD: &str = "shared/counter-ofd";
/// --ops without --ops or --duration.
const DEFAULT_OPS: u64 = 10_000;
/// How often progress goes to stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

#[derive(clap::Args)]
pub struct StressArgs {
    /// Mount points of one filesystem (the nodes of a cluster, or one mount); with
    /// --cluster, all of its nodes' mount points when none is given.
    mountpoints: Vec<PathBuf>,
    /// Operations in all, over all workers (default 10000, or no limit with
    /// --duration).
    #[arg(long)]
    ops: Option<u64>,
    /// Workers (threads), spread round-robin over the mount points.
    #[arg(long, default_value_t = 4)]
    procs: u32,
    /// The seed of every choice (a new one from the clock if not given; printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Stop after this many seconds, even if --ops are not done.
    #[arg(long)]
    duration: Option<f64>,
    /// A `concord cluster` folder: its mounts by default; unmounted (`cluster down`)
    /// and checked with `concord fsck -n` at the end.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Kill a node of --cluster about every SECS seconds (jitter from the seed).
    #[arg(long, value_name = "SECS", requires = "cluster")]
    kill_every: Option<f64>,
    /// What a kill is: the node's lockd and mount, or the mount process alone.
    #[arg(long, value_enum, default_value = "node")]
    kill_mode: KillMode,
    /// Kill at most this many times.
    #[arg(long, requires = "kill_every")]
    max_kills: Option<u32>,
    /// Leave out the lock counters (flock and OFD locks are not yet cluster-wide).
    #[arg(long)]
    no_locks: bool,
    /// Name of the top directory (default stress-<seed>, or stress-<seed>.N if taken).
    #[arg(long)]
    dir: Option<String>,
    /// Count, instead of failing on, a name or file another node shows wrong at first
    /// and right within this many milliseconds (a late kernel invalidation: see
    /// docs/guide/stress.md). 0: strict.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    coherence_grace_ms: u64,
    /// Print every operation.
    #[arg(long)]
    verbose: bool,
}

/// A failed check of a worker: where, and what differed.
#[derive(Debug)]
pub struct Fail {
    pub path: PathBuf,
    pub what: String,
}

/// The seeded generator of every choice (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.below(hi - lo + 1)
    }

    /// In [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// One of `v` (not empty).
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

/// What the workers and the kill loop share.
pub struct Ctx {
    pub seed: u64,
    pub seed32: u32,
    /// The top directory's name, under every mount point.
    pub top: String,
    pub mounts: Vec<PathBuf>,
    /// Which mount points are up (a killed node's is not, until restarted).
    pub live: RwLock<Vec<bool>>,
    /// Set when the run must end (a failure).
    pub stop: AtomicBool,
    pub ops_started: AtomicU64,
    pub ops_limit: u64,
    pub deadline: Instant,
    /// The failure lines, in order.
    pub failures: Mutex<Vec<String>>,
    /// Operations the filesystem does not do (EOPNOTSUPP), left out of the mix.
    pub disabled: Mutex<BTreeSet<&'static str>>,
    pub locks: bool,
    pub verbose: bool,
    /// --coherence-grace-ms.
    pub grace: Duration,
    /// Late coherence checks within the grace: how many, and the longest wait.
    pub late: Mutex<(u64, Duration)>,
}

impl Ctx {
    /// Where model key `key` is on mount `node`.
    pub fn path(&self, node: usize, key: &str) -> PathBuf {
        worker::key_path(&self.mounts[node], &self.top, key)
    }

    /// Records a failure and ends the run.
    pub fn fail(&self, line: String) {
        println!("stress: MISMATCH {line}");
        self.failures.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Leaves `op` out of the mix from now on (the filesystem refused it).
    pub fn disable(&self, op: &'static str) {
        if self.disabled.lock().unwrap_or_else(|e| e.into_inner()).insert(op) {
            eprintln!("stress: the filesystem does not do {op} (EOPNOTSUPP); left out of the mix");
        }
    }

    /// Counts a coherence check that was right only `after` its first try.
    pub fn late(&self, after: Duration) {
        let mut l = self.late.lock().unwrap_or_else(|e| e.into_inner());
        l.0 += 1;
        l.1 = l.1.max(after);
    }

    /// Whether the workers are to stop (failure, time, or every operation started).
    pub fn ended(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
            || Instant::now() >= self.deadline
            || self.ops_started.load(Ordering::SeqCst) >= self.ops_limit
    }
}

/// `concord stress`: exit 0 with no mismatch (and a clean fsck with --cluster), 1 with
/// any, 2 if it could not run.
pub fn run(a: StressArgs) -> ExitCode {
    match run_checked(a) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("concord stress: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The mount points and, with --cluster, the cluster and the node id of each.
fn mountpoints(a: &StressArgs) -> Result<(Vec<PathBuf>, Option<LocalCluster>)> {
    let Some(dir) = &a.cluster else {
        if a.mountpoints.is_empty() {
            bail!("no mount point given (or --cluster DIR)");
        }
        return Ok((a.mountpoints.clone(), None));
    };
    let dir = std::path::absolute(dir)?;
    let all = LocalCluster::mounts(&dir)?;
    if all.is_empty() {
        bail!("{}: no node mount points under mnt/", dir.display());
    }
    let chosen: Vec<(u32, PathBuf)> = if a.mountpoints.is_empty() {
        all
    } else {
        let mut v = Vec::new();
        for m in &a.mountpoints {
            let c = m.canonicalize().with_context(|| format!("{}", m.display()))?;
            let Some(found) = all.iter().find(|(_, p)| p.canonicalize().is_ok_and(|p| p == c)) else {
                bail!("{} is not a mount point of the cluster in {}", m.display(), dir.display());
            };
            v.push(found.clone());
        }
        v
    };
    let ids = chosen.iter().map(|(id, _)| *id).collect();
    let mounts = chosen.into_iter().map(|(_, p)| p).collect();
    Ok((mounts, Some(LocalCluster { dir, ids })))
}

/// Makes the top directory, the shared one, the counters and each worker's private
/// directory through the first mount point; checks that every other mount point sees
/// them (one filesystem); commits them (fsync) so that a kill cannot take them.
fn setup(mounts: &[PathBuf], top: &str, procs: u32) -> Result<()> {
    let t = mounts[0].join(top);
    std::fs::create_dir(&t).with_context(|| format!("creating {}", t.display()))?;
    std::fs::create_dir(t.join("shared"))?;
    for c in [COUNTER_FLOCK, COUNTER_OFD] {
        std::fs::File::create(t.join(c)).with_context(|| format!("creating {}", t.join(c).display()))?;
    }
    for w in 0..procs {
        std::fs::create_dir(t.join(format!("w{w}")))?;
    }
    std::fs::File::open(t.join(COUNTER_OFD))?.sync_all().context("fsync of the counters")?;
    for m in &mounts[1..] {
        let p = m.join(top).join(format!("w{}", procs - 1));
        if !p.is_dir() {
            bail!(
                "{} does not show {}: the mount points are not one filesystem",
                m.display(),
                mounts[0].join(top).display()
            );
        }
    }
    Ok(())
}

/// The first free top directory name for `seed`.
fn top_name(mount: &Path, seed: u64, asked: Option<&str>) -> Result<String> {
    if let Some(d) = asked {
        if mount.join(d).exists() {
            bail!("{} exists already; remove it or pick another --dir", mount.join(d).display());
        }
        return Ok(d.to_string());
    }
    let base = format!("stress-{seed}");
    if !mount.join(&base).exists() {
        return Ok(base);
    }
    (1..1000).map(|i| format!("{base}.{i}")).find(|n| !mount.join(n).exists()).context("no free stress-<seed>.N name")
}

fn run_checked(a: StressArgs) -> Result<bool> {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000)
    });
    let (mounts, cluster) = mountpoints(&a)?;
    if a.procs == 0 {
        bail!("--procs must be at least 1");
    }
    for m in &mounts {
        if !m.is_dir() {
            bail!("{}: not a directory", m.display());
        }
    }
    let top = top_name(&mounts[0], seed, a.dir.as_deref())?;
    setup(&mounts, &top, a.procs)?;
    let nodes = mounts.len();
    eprintln!(
        "stress: seed {seed} (--seed {seed} repeats it), {} workers on {nodes} mount point(s), in {}",
        a.procs,
        mounts[0].join(&top).display()
    );
    let start = Instant::now();
    let duration = a.duration.map_or(Duration::from_secs(365 * 24 * 3600), Duration::from_secs_f64);
    let ctx = Arc::new(Ctx {
        seed,
        seed32: pattern::seed32(seed),
        top,
        mounts: mounts.clone(),
        live: RwLock::new(vec![true; nodes]),
        stop: AtomicBool::new(false),
        ops_started: AtomicU64::new(0),
        ops_limit: a.ops.unwrap_or(if a.duration.is_some() { u64::MAX } else { DEFAULT_OPS }),
        deadline: start + duration,
        failures: Mutex::new(Vec::new()),
        disabled: Mutex::new(BTreeSet::new()),
        locks: !a.no_locks,
        verbose: a.verbose,
        grace: Duration::from_millis(a.coherence_grace_ms),
        late: Mutex::new((0, Duration::ZERO)),
    });
    let workers: Vec<Arc<Worker>> = (0..a.procs)
        .map(|id| {
            let mut m = Model::new(id, ctx.seed32);
            m.snapshot();
            Arc::new(Worker {
                id,
                node: id as usize % nodes,
                model: Arc::new(Mutex::new(m)),
                ctl: Arc::default(),
                ops: Arc::default(),
            })
        })
        .collect();
    let threads: Vec<std::thread::JoinHandle<()>> = workers
        .iter()
        .map(|w| {
            let (ctx, w) = (ctx.clone(), w.clone());
            std::thread::spawn(move || worker::run(ctx, w))
        })
        .collect();
    let stats = Arc::new(Mutex::new(KillStats::default()));
    let cluster = cluster.map(Arc::new);
    let killer = match (&cluster, a.kill_every) {
        (Some(c), Some(every)) => {
            let (ctx, c, ws, stats) = (ctx.clone(), c.clone(), workers.clone(), stats.clone());
            let (mode, max) = (a.kill_mode, a.max_kills);
            Some(std::thread::spawn(move || {
                killer::run(&ctx, &c, &ws, Duration::from_secs_f64(every), mode, max, &stats)
            }))
        }
        _ => None,
    };
    // Progress until every worker is done.
    let ops = || workers.iter().map(|w| w.ops.load(Ordering::Relaxed)).sum::<u64>();
    let mut last = Instant::now();
    while !threads.iter().all(|t| t.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        if last.elapsed() >= PROGRESS_EVERY {
            last = Instant::now();
            let t = start.elapsed().as_secs_f64();
            let kills = stats.lock().unwrap_or_else(|e| e.into_inner()).kills;
            eprintln!("stress: {t:.0} s: {} ops ({:.0} ops/s), {kills} kills", ops(), ops() as f64 / t);
        }
    }
    ctx.stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    if let Some(k) = killer {
        let _ = k.join();
    }
    let elapsed = start.elapsed();
    let total = ops();

    let clean_run = ctx.failures.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
    if clean_run {
        final_check(&ctx, &workers);
    }
    let fsck = cluster.as_deref().map(down_and_fsck);

    let failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner()).len();
    let st = stats.lock().unwrap_or_else(|e| e.into_inner());
    let recoveries: Vec<String> = st.recoveries.iter().map(|d| format!("{:.1} s", d.as_secs_f64())).collect();
    let secs = elapsed.as_secs_f64();
    let mut line = format!(
        "stress: {total} ops in {secs:.1} s ({:.0} ops/s), {nodes} nodes, {} kills, {} recoveries{}",
        total as f64 / secs.max(0.001),
        st.kills,
        st.recoveries.len(),
        if recoveries.is_empty() { String::new() } else { format!(" ({})", recoveries.join(", ")) },
    );
    if !ctx.grace.is_zero() {
        let (n, max) = *ctx.late.lock().unwrap_or_else(|e| e.into_inner());
        line.push_str(&format!(", {n} late invalidations (max {} ms)", max.as_millis()));
    }
    line.push_str(&format!(", {failures} mismatches"));
    let mut ok = failures == 0;
    if let Some(f) = &fsck {
        match f {
            Ok(()) => line.push_str(", fsck clean"),
            Err(e) => {
                ok = false;
                println!("stress: {e:#}");
                line.push_str(", fsck FAILED");
            }
        }
    }
    line.push_str(&format!(", seed {seed}"));
    println!("{line}");
    Ok(ok)
}

/// Every worker's model, exactly, from one live mount point; and the counters.
fn final_check(ctx: &Ctx, workers: &[Arc<Worker>]) {
    let node = {
        let l = ctx.live.read().unwrap_or_else(|e| e.into_inner());
        (0..l.len()).find(|&i| l[i]).unwrap_or(0)
    };
    let top = verify::top_on(&ctx.mounts[node], &ctx.top);
    let (mut flock, mut ofd) = (0, 0);
    for w in workers {
        let m = w.model.lock().unwrap_or_else(|e| e.into_inner());
        flock += m.incs_flock;
        ofd += m.incs_ofd;
        if let Err(f) = verify::exact(&top, &m) {
            ctx.fail(format!(
                "seed {} worker {} op {} (final check) {}: {}",
                ctx.seed,
                w.id,
                m.ops,
                f.path.display(),
                f.what
            ));
        }
    }
    if !ctx.locks {
        return;
    }
    for (key, want) in [(COUNTER_FLOCK, flock), (COUNTER_OFD, ofd)] {
        let p = top.join(key);
        let found = std::fs::File::open(&p).map_err(|e| e.to_string()).and_then(|f| worker::read_counter(&f));
        match found {
            Ok(n) if n == want => {}
            Ok(n) => ctx.fail(format!(
                "seed {} (final check) {}: expected {want} increments, found {n} (an update lost: the lock did not exclude)",
                ctx.seed,
                p.display()
            )),
            Err(e) => ctx.fail(format!("seed {} (final check) {}: {e}", ctx.seed, p.display())),
        }
    }
}

/// `concord cluster down`, then `concord fsck -n` of the cluster's disk.
fn down_and_fsck(c: &LocalCluster) -> Result<()> {
    c.ok(&["down"])?;
    let disk = c.dir.join("disk.img");
    let o = std::process::Command::new(std::env::current_exe()?)
        .arg("fsck")
        .arg("-n")
        .arg(&disk)
        .output()
        .context("running concord fsck")?;
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    eprint!("{out}");
    if !o.status.success() {
        bail!("concord fsck -n {}: {} ({})", disk.display(), o.status, out.lines().last().unwrap_or(""));
    }
    Ok(())
}
