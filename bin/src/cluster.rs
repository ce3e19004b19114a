//! `concord cluster`: a cluster of N nodes on this machine in one command.
//!
//! `concord cluster up` makes everything a cluster needs in one folder (the cluster
//! directory, `./concord-cluster` by default) and starts it:
//!
//! ```text
//! DIR/cluster.toml      the cluster configuration (loopback ports, or namespace addresses)
//! DIR/local.json        what `up` was asked for (nodes, size, timing, --netns)
//! DIR/tls/              the cluster CA and one certificate per node
//! DIR/disk.img          the shared disk: mkfs -j N -p lock_dlm -t local:fs
//! DIR/mnt/<id>/         node <id>'s mount point
//! DIR/log/              lockd-<id>.log, mount-<id>.log, fence.log (appended across restarts)
//! DIR/run/              lockd sockets and the pid files of the processes `up` started
//! DIR/state/            each lockd's membership state
//! ```
//!
//! Every node is two processes, as on a real machine: `concord lockd` (its DLM peer)
//! and `concord mount --daemon` (its FUSE mount). They run detached from the terminal
//! (own session), so that `up` returns once every mount is ready and the cluster runs
//! until `concord cluster down`. The other subcommands find the processes through
//! their pid files, checked against `/proc/<pid>/cmdline` so that a pid reused by an
//! unrelated process is never signalled.
//!
//! With `--netns` each node's lockd runs in its own network namespace
//! (`concord-<tag>-n<id>`, address 10.237.0.<id>/24) joined to the others through a
//! bridge in one more namespace (`concord-<tag>-br`), so that `partition` cuts a real
//! link; the host's own interfaces are never touched. Only lockd enters the namespace:
//! the mount talks to its lockd through a unix socket and stays in the host's mount
//! namespace, where its mount point is visible to everyone.

use std::io::{IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use concord_lockd::client::{Client, NodeStatus};
use concord_lockd::config::ClusterConfig;

#[derive(Args)]
pub struct ClusterArgs {
    /// The cluster directory: configuration, certificates, disk image, mount points,
    /// logs.
    #[arg(long, global = true, default_value = "concord-cluster")]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: ClusterCmd,
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Make (the first time) and start a local cluster; print each node's mount point.
    Up(UpArgs),
    /// Each node's state, processes and journal; the cluster's generation and quorum.
    Status {
        /// One JSON object (keys in docs/guide/local-cluster.md).
        #[arg(long, conflicts_with = "watch")]
        json: bool,
        /// Refresh in place every second on a terminal; q quits.
        #[arg(long)]
        watch: bool,
    },
    /// kill -9 of a node's lockd and mount (a node crash), or of its mount alone.
    Kill {
        /// Node id.
        id: u32,
        /// Kill only the mount process (a mount crash; the node stays in the cluster).
        #[arg(long)]
        mount_only: bool,
    },
    /// Start a node's lockd and mount again (whichever is not running).
    Restart {
        /// Node id.
        id: u32,
    },
    /// Cut a node off from the others (lockd's fault switch, or its namespace's link
    /// with --netns).
    Partition {
        /// Node id.
        id: u32,
    },
    /// Undo `partition`.
    Heal {
        /// Node id.
        id: u32,
    },
    /// Unmount every node and stop every process; the disk and the logs are kept.
    Down,
}

#[derive(Args)]
struct UpArgs {
    /// Number of nodes (the first time; 1 to 16).
    #[arg(long)]
    nodes: Option<u32>,
    /// Size of the disk image (the first time), e.g. 4G, 512M.
    #[arg(long, value_parser = crate::parse_size)]
    size: Option<u64>,
    /// Lockd timings: `default` (heartbeat 200 ms, lease 2 s; as between machines) or
    /// `loopback` (50 ms, 250 ms: a dead node is noticed in about 0.4 s).
    #[arg(long, value_enum)]
    timing: Option<TimingPreset>,
    /// Each node in its own network namespace, so that a partition is a real one.
    #[arg(long)]
    netns: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
enum TimingPreset {
    Default,
    Loopback,
}

/// `DIR/local.json`: what the cluster was made with.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Settings {
    nodes: u32,
    size: u64,
    timing: TimingPreset,
    netns: bool,
}

const DEFAULT_NODES: u32 = 3;
const DEFAULT_SIZE: u64 = 4 << 30;
const MAX_NODES: u32 = 16;
/// The cluster name of a local cluster, and the first half of its lock table.
const CLUSTER_NAME: &str = "local";
/// How long `up` and `restart` wait for the lockds' quorum and for each mount.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `down` waits for a mount to write everything back and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// The private subnet of `--netns` (10.237.0.<id>/24; the bridge itself has no address).
const NETNS_PREFIX: &str = "10.237.0";
/// The port every lockd listens on inside its own namespace.
const NETNS_PORT: u16 = 7400;

pub fn run(a: ClusterArgs) -> Result<()> {
    let dir = std::path::absolute(&a.dir).with_context(|| format!("resolving {}", a.dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root && matches!(a.cmd, ClusterCmd::Up(_) | ClusterCmd::Restart { .. }) {
        bail!(
            "concord cluster needs root: each node is a FUSE mount (other users' processes \
             reach it) with its control socket under /run/concord"
        );
    }
    match a.cmd {
        ClusterCmd::Up(u) => up(&dir, u),
        ClusterCmd::Status { json, watch } => {
            let c = Local::open(&dir)?;
            if watch {
                return crate::live::watch(Duration::from_secs(1), || c.status().to_text());
            }
            let st = c.status();
            if json {
                println!("{}", st.to_json());
            } else {
                print!("{}", st.to_text());
            }
            Ok(())
        }
        ClusterCmd::Kill { id, mount_only } => Local::open(&dir)?.kill(id, mount_only),
        ClusterCmd::Restart { id } => {
            let c = Local::open(&dir)?;
            c.node_cfg(id)?;
            c.stop_stopped_mount(id)?;
            c.start(&[id])?;
            println!("node {id}: {}", c.mnt(id).display());
            Ok(())
        }
        ClusterCmd::Partition { id } => Local::open(&dir)?.partition(id, true),
        ClusterCmd::Heal { id } => Local::open(&dir)?.partition(id, false),
        ClusterCmd::Down => Local::open(&dir)?.down(),
    }
}

fn up(dir: &Path, u: UpArgs) -> Result<()> {
    let c = if dir.join("cluster.toml").exists() {
        let c = Local::open(dir)?;
        let s = &c.settings;
        let differs = |what: &str, asked: String, has: String| -> Result<()> {
            if asked != has {
                bail!(
                    "{}: this cluster was made with {what} {has}, not {asked}; to make a new one: \
                     concord cluster down --dir {0} && rm -r {0}",
                    dir.display()
                );
            }
            Ok(())
        };
        if let Some(n) = u.nodes {
            differs("--nodes", n.to_string(), s.nodes.to_string())?;
        }
        if let Some(z) = u.size {
            differs("--size", z.to_string(), s.size.to_string())?;
        }
        if let Some(t) = u.timing {
            differs("--timing", format!("{t:?}"), format!("{:?}", s.timing))?;
        }
        if u.netns {
            differs("--netns", "true".into(), s.netns.to_string())?;
        }
        let ids = c.ids();
        if ids.iter().all(|&id| c.lockd_pid(id).is_some() && c.mount_pid(id).is_some()) {
            println!("the cluster in {} is up already ({} nodes):", dir.display(), ids.len());
            c.print_mountpoints();
            return Ok(());
        }
        c
    } else {
        let settings = Settings {
            nodes: u.nodes.unwrap_or(DEFAULT_NODES),
            size: u.size.unwrap_or(DEFAULT_SIZE),
            timing: u.timing.unwrap_or(TimingPreset::Default),
            netns: u.netns,
        };
        make(dir, &settings)?
    };
    let ids = c.ids();
    c.start(&ids)?;
    println!("the cluster in {} is up ({} nodes):", dir.display(), ids.len());
    c.print_mountpoints();
    Ok(())
}

/// Makes a new cluster directory: certificates, configuration, disk image.
fn make(dir: &Path, s: &Settings) -> Result<Local> {
    if !(1..=MAX_NODES).contains(&s.nodes) {
        bail!("--nodes must be from 1 to {MAX_NODES}");
    }
    if s.netns {
        netns::check()?;
    }
    // A unix socket path holds at most 107 bytes: DIR/run/lockd-16.sock must fit.
    let longest = dir.join("run").join(format!("lockd-{}.sock", s.nodes));
    if longest.as_os_str().len() > 100 {
        bail!("{}: the path is too long for lockd's unix sockets; use a shorter --dir", dir.display());
    }
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{}: the folder is not empty and holds no cluster.toml; pick another --dir", dir.display());
    }
    for sub in ["tls", "log", "run", "state", "mnt"] {
        std::fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    eprintln!("concord cluster: making a {}-node cluster in {}", s.nodes, dir.display());
    let tls = dir.join("tls");
    concord_lockd::tls::ca_init(&tls, CLUSTER_NAME, false).context("creating the cluster CA")?;
    let mut toml =
        format!("# Made by `concord cluster up`.\n[cluster]\nname = \"{CLUSTER_NAME}\"\n\n[tls]\ndir = \"tls\"\n\n");
    if s.timing == TimingPreset::Loopback {
        toml.push_str("[timing]\nheartbeat_ms = 50\nlease_ms = 250\n\n");
    }
    // Not a real fence (nothing can cut a process of this machine off the image): the
    // lease already stops a cut-off node's writes. The record shows when it ran.
    let fence_log = dir.join("log").join("fence.log");
    toml.push_str(&format!(
        "[fence]\ncmd = \"echo \\\"$(date '+%F %T') fenced node {{id}} ({{name}})\\\" >> '{}'\"\n\n",
        fence_log.display()
    ));
    toml.push_str("[runtime]\ndir = \"run\"\nstate_dir = \"state\"\n");
    let ports = free_ports(s.nodes as usize)?;
    for id in 1..=s.nodes {
        concord_lockd::tls::ca_issue(&tls, id, false).with_context(|| format!("issuing node {id}'s certificate"))?;
        let addr = if s.netns {
            format!("{NETNS_PREFIX}.{id}:{NETNS_PORT}")
        } else {
            format!("127.0.0.1:{}", ports[id as usize - 1])
        };
        toml.push_str(&format!("\n[[node]]\nid = {id}\nname = \"n{id}\"\naddr = \"{addr}\"\n"));
        std::fs::create_dir_all(dir.join("mnt").join(id.to_string()))?;
    }
    std::fs::write(dir.join("cluster.toml"), toml)?;
    let image = dir.join("disk.img");
    let st = Command::new(std::env::current_exe()?)
        .args(["mkfs", "-j", &s.nodes.to_string(), "-p", "lock_dlm", "-t", &format!("{CLUSTER_NAME}:fs")])
        .args(["--size", &s.size.to_string()])
        .arg(&image)
        .stdout(Stdio::null())
        .status()
        .context("running concord mkfs")?;
    if !st.success() {
        bail!("concord mkfs of {} failed ({st})", image.display());
    }
    std::fs::write(dir.join("local.json"), serde_json::to_string_pretty(s)?)?;
    Local::open(dir)
}

/// `n` distinct free UDP ports on loopback.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    // Held together until all are picked, so that none is handed out twice.
    let socks: Vec<std::net::UdpSocket> =
        (0..n).map(|_| std::net::UdpSocket::bind("127.0.0.1:0")).collect::<std::io::Result<_>>()?;
    socks.iter().map(|s| Ok(s.local_addr()?.port())).collect()
}

/// An existing cluster directory.
struct Local {
    dir: PathBuf,
    cfg: ClusterConfig,
    settings: Settings,
}

/// The two processes of a node.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Lockd,
    Mount,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Lockd => "lockd",
            Kind::Mount => "mount",
        }
    }
}

impl Local {
    fn open(dir: &Path) -> Result<Local> {
        let path = dir.join("cluster.toml");
        if !path.exists() {
            bail!("{}: no local cluster there (make one with `concord cluster up --dir {0}`)", dir.display());
        }
        let cfg = ClusterConfig::load(&path)?;
        let settings: Settings = match std::fs::read(dir.join("local.json")) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| format!("reading {}/local.json", dir.display()))?,
            Err(e) => return Err(e).with_context(|| format!("reading {}/local.json", dir.display())),
        };
        Ok(Local { dir: dir.to_path_buf(), cfg, settings })
    }

    fn ids(&self) -> Vec<u32> {
        self.cfg.nodes.iter().map(|n| n.id).collect()
    }

    fn node_cfg(&self, id: u32) -> Result<&concord_lockd::config::NodeConfig> {
        Ok(self.cfg.node(id)?)
    }

    fn image(&self) -> PathBuf {
        self.dir.join("disk.img")
    }

    fn mnt(&self, id: u32) -> PathBuf {
        self.dir.join("mnt").join(id.to_string())
    }

    fn log(&self, kind: Kind, id: u32) -> PathBuf {
        self.dir.join("log").join(format!("{}-{id}.log", kind.name()))
    }

    fn pidfile(&self, kind: Kind, id: u32) -> PathBuf {
        self.dir.join("run").join(format!("{}-{id}.pid", kind.name()))
    }

    /// The pid of node `id`'s process of `kind`, if it runs.
    fn pid(&self, kind: Kind, id: u32) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pidfile(kind, id)).ok()?.trim().parse().ok()?;
        // Ours only if its command line is the one we started: concord <kind> ... --node id.
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let cfg = self.cfg.path.as_os_str().as_encoded_bytes();
        let id_s = id.to_string();
        let ours = args.get(1) == Some(&kind.name().as_bytes())
            && args.contains(&cfg)
            && args.windows(2).any(|w| w[0] == b"--node" && w[1] == id_s.as_bytes());
        (ours && !is_zombie(pid)).then_some(pid)
    }

    fn lockd_pid(&self, id: u32) -> Option<u32> {
        self.pid(Kind::Lockd, id)
    }

    fn mount_pid(&self, id: u32) -> Option<u32> {
        self.pid(Kind::Mount, id)
    }

    fn print_mountpoints(&self) {
        for id in self.ids() {
            println!("  node {id}: {}", self.mnt(id).display());
        }
    }

    /// Starts the lockds and mounts of `ids` that are not running, and waits until they
    /// are ready.
    fn start(&self, ids: &[u32]) -> Result<()> {
        let mut bar = Spinner::new();
        if self.settings.netns {
            netns::setup(self)?;
        }
        for &id in ids {
            if self.lockd_pid(id).is_none() {
                bar.say(&format!("starting node {id}'s lockd"));
                self.spawn_lockd(id)?;
            }
        }
        bar.say("waiting for the lockds' quorum");
        self.wait_quorum(ids)?;
        // A mount whose process died leaves its mount point dead (ENOTCONN) until detached.
        for &id in ids {
            if self.mount_pid(id).is_none() && is_mounted(&self.mnt(id)) {
                detach(&self.mnt(id));
            }
        }
        let todo: Vec<u32> = ids.iter().copied().filter(|&id| self.mount_pid(id).is_none()).collect();
        if !todo.is_empty() {
            bar.say(&format!("mounting node(s) {}", join(&todo)));
        }
        // All at once: the first to get the mount lock is the first mounter, and the
        // others wait for it (the lock_dlm mount protocol), as nodes that boot together do.
        let waits: Vec<(u32, std::thread::JoinHandle<Result<u32>>)> = todo
            .iter()
            .map(|&id| {
                let cmd = self.mount_cmd(id);
                (id, std::thread::spawn(move || spawn_mount(cmd)))
            })
            .collect();
        let mut failed = Vec::new();
        for (id, h) in waits {
            match h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the mount thread panicked"))) {
                Ok(pid) => std::fs::write(self.pidfile(Kind::Mount, id), format!("{pid}\n"))?,
                Err(e) => failed.push(format!("node {id}: {e:#} (log {})", self.log(Kind::Mount, id).display())),
            }
        }
        bar.done();
        if !failed.is_empty() {
            bail!("{}", failed.join("\n"));
        }
        Ok(())
    }

    fn spawn_lockd(&self, id: u32) -> Result<()> {
        let log = append(&self.log(Kind::Lockd, id))?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("lockd")
            .arg("--config")
            .arg(&self.cfg.path)
            .args(["--node", &id.to_string()])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let ns = self.settings.netns.then(|| netns::node_ns(self, id));
        // SAFETY: setsid and setns are async-signal-safe; the closure allocates nothing
        // (the namespace path is opened before the fork).
        let ns_fd = match &ns {
            Some(name) => Some(netns::open(name)?),
            None => None,
        };
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = &ns_fd {
                    use std::os::fd::AsRawFd;
                    if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let child = cmd.spawn().with_context(|| format!("starting node {id}'s lockd"))?;
        std::fs::write(self.pidfile(Kind::Lockd, id), format!("{}\n", child.id()))?;
        // Reaped by init once we exit; until then a zombie that `pid` does not count.
        std::mem::forget(child);
        Ok(())
    }

    fn mount_cmd(&self, id: u32) -> Command {
        let mut cmd = Command::new(std::env::current_exe().unwrap_or_else(|_| PathBuf::from("concord")));
        cmd.arg("mount")
            .arg("--config")
            .arg(&self.cfg.path)
            .args(["--node", &id.to_string()])
            .arg(self.image())
            .arg(self.mnt(id))
            .arg("--daemon")
            .arg("--log")
            .arg(self.log(Kind::Mount, id))
            .env("NO_COLOR", "1");
        cmd
    }

    /// Waits until the lockds of `ids` are quorate and see every running lockd live.
    fn wait_quorum(&self, ids: &[u32]) -> Result<()> {
        let start = Instant::now();
        loop {
            let running: Vec<u32> = self.ids().into_iter().filter(|&id| self.lockd_pid(id).is_some()).collect();
            for &id in ids {
                if !running.contains(&id) {
                    bail!(
                        "node {id}'s lockd exited; its log {}:\n{}",
                        self.log(Kind::Lockd, id).display(),
                        tail(&self.log(Kind::Lockd, id), 10)
                    );
                }
            }
            // The lockds started live, and no node that is not running still live (a
            // dead node not yet declared dead): a mount that joined now would find the
            // journals' slots taken by nodes whose recovery has not started.
            let ready = ids.iter().all(|&id| {
                lockd_status(&self.cfg, id).is_some_and(|st| {
                    st.quorate
                        && !st.fenced
                        && ids.iter().all(|r| st.members.contains(r))
                        && st.members.iter().all(|m| running.contains(m))
                })
            });
            if ready {
                return Ok(());
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!("the lockds did not reach a quorum in {READY_TIMEOUT:?}; see {}/log", self.dir.display());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn kill(&self, id: u32, mount_only: bool) -> Result<()> {
        self.node_cfg(id)?;
        let mut killed = Vec::new();
        if let Some(pid) = self.mount_pid(id) {
            kill_wait(pid, libc::SIGKILL, Duration::from_secs(10));
            killed.push(format!("mount (pid {pid})"));
        }
        if !mount_only {
            if let Some(pid) = self.lockd_pid(id) {
                kill_wait(pid, libc::SIGKILL, Duration::from_secs(10));
                killed.push(format!("lockd (pid {pid})"));
            }
        }
        // The kernel's end of a killed FUSE mount answers ENOTCONN until detached; its
        // control socket stays behind with nobody listening.
        if is_mounted(&self.mnt(id)) {
            detach(&self.mnt(id));
        }
        if self.mount_pid(id).is_none() {
            let _ = std::fs::remove_file(crate::control::socket_for(&self.mnt(id)));
        }
        if killed.is_empty() {
            bail!("node {id}: nothing of it was running");
        }
        println!("node {id}: killed {}", killed.join(" and "));
        Ok(())
    }

    /// A mount that stopped writing for good (fenced: its node was declared dead; or
    /// withdrawn) serves only errors until unmounted: unmounts it, so that `restart`
    /// mounts the node again as a new member.
    fn stop_stopped_mount(&self, id: u32) -> Result<()> {
        let Some(pid) = self.mount_pid(id) else { return Ok(()) };
        let state = crate::control::query(&self.mnt(id), "status", true)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["state"].as_str().map(str::to_string));
        if !matches!(state.as_deref(), Some("fenced" | "withdrawn")) {
            return Ok(());
        }
        eprintln!("concord cluster: node {id}'s mount is {}; unmounting it", state.unwrap_or_default());
        // SAFETY: kill(2) of our mount, checked a moment ago.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        if !wait_gone(pid, STOP_TIMEOUT) {
            kill_wait(pid, libc::SIGKILL, Duration::from_secs(10));
        }
        if is_mounted(&self.mnt(id)) {
            detach(&self.mnt(id));
        }
        Ok(())
    }

    fn partition(&self, id: u32, cut: bool) -> Result<()> {
        self.node_cfg(id)?;
        if self.settings.netns {
            netns::link(self, id, !cut)?;
        } else {
            let others: Vec<u32> = self.ids().into_iter().filter(|&o| o != id).collect();
            let sock = self.cfg.lockd_socket_path(id);
            if self.lockd_pid(id).is_none() {
                bail!("node {id}'s lockd is not running");
            }
            block_on(async {
                let client = Client::connect_named(&sock, "concord cluster").await?;
                client.set_fault_cut(if cut { others } else { Vec::new() }).await?;
                anyhow::Ok(())
            })
            .and_then(|r| r)
            .with_context(|| format!("setting node {id}'s fault switch"))?;
        }
        println!("node {id}: {}", if cut { "cut off from the others" } else { "healed" });
        Ok(())
    }

    fn down(&self) -> Result<()> {
        let ids = self.ids();
        let mut problems = Vec::new();
        // Mounts first (they leave their lockspace through their lockd), all at once.
        let mounts: Vec<(u32, u32)> = ids.iter().filter_map(|&id| self.mount_pid(id).map(|p| (id, p))).collect();
        for &(_, pid) in &mounts {
            // SAFETY: kill(2); the pid was checked to be our mount a moment ago.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        for &(id, pid) in &mounts {
            if !wait_gone(pid, STOP_TIMEOUT) {
                kill_wait(pid, libc::SIGKILL, Duration::from_secs(10));
                problems.push(format!("node {id}'s mount did not stop in {STOP_TIMEOUT:?} and was killed"));
            }
        }
        for &id in &ids {
            if is_mounted(&self.mnt(id)) {
                detach(&self.mnt(id));
            }
        }
        let lockds: Vec<(u32, u32)> = ids.iter().filter_map(|&id| self.lockd_pid(id).map(|p| (id, p))).collect();
        for &(_, pid) in &lockds {
            // SAFETY: as above, for our lockd.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        for &(id, pid) in &lockds {
            if !wait_gone(pid, Duration::from_secs(10)) {
                kill_wait(pid, libc::SIGKILL, Duration::from_secs(10));
                problems.push(format!("node {id}'s lockd did not stop on SIGTERM and was killed"));
            }
        }
        for &id in &ids {
            let _ = std::fs::remove_file(self.pidfile(Kind::Lockd, id));
            let _ = std::fs::remove_file(self.pidfile(Kind::Mount, id));
        }
        if self.settings.netns {
            netns::teardown(self);
        }
        if !problems.is_empty() {
            bail!("{}", problems.join("\n"));
        }
        println!(
            "the cluster in {} is down ({} mount(s), {} lockd(s) stopped); the disk {} is kept",
            self.dir.display(),
            mounts.len(),
            lockds.len(),
            self.image().display()
        );
        Ok(())
    }

    fn status(&self) -> Status {
        let mut nodes = Vec::new();
        let mut view: Option<NodeStatus> = None;
        for n in &self.cfg.nodes {
            let lockd_pid = self.lockd_pid(n.id);
            let mount_pid = self.mount_pid(n.id);
            let dlm = lockd_pid.and_then(|_| lockd_status(&self.cfg, n.id));
            let mount: Option<serde_json::Value> = mount_pid.and_then(|_| {
                crate::control::query(&self.mnt(n.id), "status", true).ok().and_then(|s| serde_json::from_str(&s).ok())
            });
            let state = match (&dlm, &mount) {
                (Some(d), _) if d.fenced => "fenced".to_string(),
                (_, Some(m)) => m["state"].as_str().unwrap_or("unknown").to_string(),
                (_, None) if mount_pid.is_some() => "starting".to_string(),
                (Some(_), None) => "unmounted".to_string(),
                (None, None) if lockd_pid.is_some() => "starting".to_string(),
                (None, None) => "down".to_string(),
            };
            if let Some(d) = &dlm {
                if !d.fenced && view.as_ref().is_none_or(|v| d.generation > v.generation) {
                    view = Some(d.clone());
                }
            }
            nodes.push(NodeRow {
                id: n.id,
                name: n.name.clone(),
                addr: n.addr.to_string(),
                state,
                jid: mount.as_ref().and_then(|m| m["jid"].as_u64()),
                lockd_pid,
                mount_pid,
                mountpoint: self.mnt(n.id),
                generation: mount.as_ref().and_then(|m| m["generation"].as_u64()),
                stopped: mount.as_ref().and_then(|m| m["stopped"].as_str().map(str::to_string)),
            });
        }
        Status {
            dir: self.dir.clone(),
            cluster: self.cfg.cluster_name.clone(),
            netns: self.settings.netns,
            generation: view.as_ref().map(|v| v.generation),
            quorate: view.as_ref().is_some_and(|v| v.quorate),
            live: view.map(|v| v.members).unwrap_or_default(),
            nodes,
        }
    }
}

struct NodeRow {
    id: u32,
    name: String,
    addr: String,
    state: String,
    jid: Option<u64>,
    lockd_pid: Option<u32>,
    mount_pid: Option<u32>,
    mountpoint: PathBuf,
    generation: Option<u64>,
    stopped: Option<String>,
}

struct Status {
    dir: PathBuf,
    cluster: String,
    netns: bool,
    generation: Option<u64>,
    quorate: bool,
    live: Vec<u32>,
    nodes: Vec<NodeRow>,
}

impl Status {
    fn to_json(&self) -> serde_json::Value {
        let nodes: Vec<serde_json::Value> = self
            .nodes
            .iter()
            .map(|n| {
                serde_json::json!({
                    "id": n.id,
                    "name": n.name,
                    "addr": n.addr,
                    "state": n.state,
                    "jid": n.jid,
                    "lockd_pid": n.lockd_pid,
                    "mount_pid": n.mount_pid,
                    "mountpoint": n.mountpoint.display().to_string(),
                    "lockspace_generation": n.generation,
                    "stopped": n.stopped,
                })
            })
            .collect();
        serde_json::json!({
            "dir": self.dir.display().to_string(),
            "cluster": self.cluster,
            "netns": self.netns,
            "generation": self.generation,
            "quorate": self.quorate,
            "live_nodes": self.live,
            "nodes": nodes,
        })
    }

    fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "cluster {} in {}: {}, generation {}, live nodes {}",
            self.cluster,
            self.dir.display(),
            if self.quorate { "quorate" } else { "NOT quorate" },
            self.generation.map_or("-".to_string(), |g| g.to_string()),
            if self.live.is_empty() { "none".to_string() } else { join(&self.live) }
        );
        let _ = writeln!(
            s,
            "{:<4} {:<8} {:<11} {:>3} {:>8} {:>8}  MOUNTPOINT",
            "NODE", "NAME", "STATE", "JID", "LOCKD", "MOUNT"
        );
        let opt = |v: Option<u32>| v.map_or("-".to_string(), |p| p.to_string());
        for n in &self.nodes {
            let _ = writeln!(
                s,
                "{:<4} {:<8} {:<11} {:>3} {:>8} {:>8}  {}{}",
                n.id,
                n.name,
                n.state,
                n.jid.map_or("-".to_string(), |j| j.to_string()),
                opt(n.lockd_pid),
                opt(n.mount_pid),
                n.mountpoint.display(),
                n.stopped.as_ref().map(|w| format!(" ({w})")).unwrap_or_default()
            );
        }
        s
    }
}

/// Runs `cmd` (`concord mount ... --daemon`), which returns once the mount is ready;
/// the background mount's pid, from the line it prints.
fn spawn_mount(mut cmd: Command) -> Result<u32> {
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(READY_TIMEOUT) {
        Ok(o) => o?,
        Err(_) => {
            // SAFETY: kill(2) of our own child, not yet reaped (its waiter still waits).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            bail!("not ready in {READY_TIMEOUT:?}");
        }
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
    }
    stdout
        .split("as process ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no process id in the mount's output {stdout:?}"))
}

fn lockd_status(cfg: &ClusterConfig, id: u32) -> Option<NodeStatus> {
    let sock = cfg.lockd_socket_path(id);
    block_on(async {
        tokio::time::timeout(Duration::from_secs(2), async {
            let c = Client::connect_named(&sock, "concord cluster").await.ok()?;
            c.status().await.ok()
        })
        .await
        .ok()
        .flatten()
    })
    .ok()
    .flatten()
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    Ok(rt.block_on(f))
}

fn append(p: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new().create(true).append(true).open(p).with_context(|| format!("opening {}", p.display()))
}

/// The last `n` lines of a file.
fn tail(p: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn join(ids: &[u32]) -> String {
    ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",")
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(true)
}

/// Whether `pid` has exited (or is a zombie) within `timeout`.
fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if is_zombie(pid) {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill_wait(pid: u32, sig: i32, timeout: Duration) {
    // SAFETY: kill(2) of a pid the caller checked to be ours.
    unsafe { libc::kill(pid as i32, sig) };
    wait_gone(pid, timeout);
}

/// Whether something is mounted on `mnt` (from /proc/self/mountinfo).
fn is_mounted(mnt: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    let want = mnt.as_os_str().to_string_lossy();
    info.lines().any(|l| l.split(' ').nth(4).is_some_and(|m| m == want))
}

/// Detaches a (dead) mount: `umount -l`, or `fusermount3 -uz` for a user's mount.
fn detach(mnt: &Path) {
    let quiet = |c: &mut Command| c.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !quiet(Command::new("umount").arg("-l").arg(mnt)) {
        quiet(Command::new("fusermount3").arg("-uz").arg(mnt));
    }
}

/// A spinner with the current step on a terminal; plain lines otherwise.
struct Spinner(Option<indicatif::ProgressBar>);

impl Spinner {
    fn new() -> Spinner {
        if !std::io::stderr().is_terminal() {
            return Spinner(None);
        }
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(100));
        Spinner(Some(b))
    }

    fn say(&mut self, what: &str) {
        match &self.0 {
            Some(b) => b.set_message(what.to_string()),
            None => {
                let _ = writeln!(std::io::stderr(), "concord cluster: {what}");
            }
        }
    }

    fn done(&mut self) {
        if let Some(b) = self.0.take() {
            b.finish_and_clear();
        }
    }
}

/// The network namespaces of `--netns`.
mod netns {
    use super::*;

    /// A short tag of the cluster directory that names its namespaces (interface names
    /// hold 15 bytes: `c<tag6>n<id>` fits).
    pub(super) fn tag(dir: &Path) -> String {
        let mut h: u32 = 0x811c_9dc5;
        for b in dir.as_os_str().as_encoded_bytes() {
            h ^= u32::from(*b);
            h = h.wrapping_mul(0x0100_0193);
        }
        format!("{:06x}", h & 0xff_ffff)
    }

    pub(super) fn check() -> Result<()> {
        if !Command::new("ip").arg("-V").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
        {
            bail!("--netns needs the `ip` command (iproute2)");
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("--netns needs root (it makes network namespaces)");
        }
        Ok(())
    }

    pub(super) fn node_ns(c: &Local, id: u32) -> String {
        format!("concord-{}-n{id}", tag(&c.dir))
    }

    fn bridge_ns(c: &Local) -> String {
        format!("concord-{}-br", tag(&c.dir))
    }

    pub(super) fn open(name: &str) -> Result<std::fs::File> {
        let p = Path::new("/run/netns").join(name);
        std::fs::File::open(&p).with_context(|| format!("opening network namespace {}", p.display()))
    }

    fn ip(args: &[&str]) -> Result<()> {
        let out = Command::new("ip").args(args).output().context("running ip")?;
        if !out.status.success() {
            bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    fn exists(name: &str) -> bool {
        Path::new("/run/netns").join(name).exists()
    }

    /// Makes what is missing: the bridge namespace with its bridge, and per node a
    /// namespace with a veth pair to the bridge and its address.
    pub(super) fn setup(c: &Local) -> Result<()> {
        let br = bridge_ns(c);
        if !exists(&br) {
            ip(&["netns", "add", &br])?;
            ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &br, "link", "set", "br0", "up"])?;
            ip(&["-n", &br, "link", "set", "lo", "up"])?;
        }
        for id in c.ids() {
            let ns = node_ns(c, id);
            if exists(&ns) {
                continue;
            }
            let (outer, inner) = (format!("v{id}"), "eth0".to_string());
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &br, "link", "add", &outer, "type", "veth", "peer", "name", &inner, "netns", &ns])?;
            ip(&["-n", &br, "link", "set", &outer, "master", "br0"])?;
            ip(&["-n", &br, "link", "set", &outer, "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{NETNS_PREFIX}.{id}/24"), "dev", &inner])?;
            ip(&["-n", &ns, "link", "set", &inner, "up"])?;
        }
        Ok(())
    }

    /// Sets node `id`'s link to the bridge up or down.
    pub(super) fn link(c: &Local, id: u32, up: bool) -> Result<()> {
        ip(&["-n", &bridge_ns(c), "link", "set", &format!("v{id}"), if up { "up" } else { "down" }])
    }

    pub(super) fn teardown(c: &Local) {
        for id in c.ids() {
            let _ = ip(&["netns", "del", &node_ns(c, id)]);
        }
        let _ = ip(&["netns", "del", &bridge_ns(c)]);
    }
}
