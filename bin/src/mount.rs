//! `concord mount`: serve a filesystem through FUSE until unmounted.
//!
//! Runs in the foreground and prints one line when the mount is ready; `--daemon`
//! detaches (the parent waits for that line, then exits). SIGTERM, SIGINT and
//! `umount MOUNTPOINT` all unmount cleanly: journal committed, written back, marked clean.
//!
//! With `--config FILE --node N` it mounts a `lock_dlm` filesystem as node N of a
//! cluster, through that node's lockd.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use concord_fs::cluster::mount_cluster;
use concord_fs::format::LOCKPROTO_DLM;
use concord_fs::fuse::{ConcordFuse, FuseKernelCache};
use concord_fs::{Filesystem, MountOptions};
use concord_lockd::client::{Client, JoinKind};
use concord_lockd::config::ClusterConfig;

use crate::DevArgs;

#[derive(clap::Args)]
pub struct MountArgs {
    #[command(flatten)]
    pub dev: DevArgs,
    /// Where to mount.
    pub mountpoint: PathBuf,
    /// Mount options, comma separated: ro, lockproto=lock_nolock, commit=SECONDS,
    /// cache=SIZE (Concord's own file data cache, e.g. 256M or 0; default 1/16 of RAM
    /// between 64 MiB and 1 GiB), threads=N (FUSE request threads, 1 to 64; default 4).
    #[arg(short = 'o')]
    pub options: Option<String>,
    /// Detach once the mount is ready.
    #[arg(long)]
    pub daemon: bool,
    /// With --daemon: the file the background mount appends its messages to once it is
    /// ready (until then they go to this command's stderr). Default: discarded.
    #[arg(long)]
    pub log: Option<PathBuf>,
    /// Cluster configuration: mount a lock_dlm filesystem as one node of this cluster
    /// (with --node).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's id in the cluster configuration (its lockd must be running).
    #[arg(long)]
    pub node: Option<u32>,
}

struct Opts {
    read_only: bool,
    force_nolock: bool,
    commit_secs: u64,
    cache_bytes: usize,
    threads: usize,
}

/// FUSE request threads when `threads=` is not given.
const DEFAULT_THREADS: usize = 4;

/// The data cache when `cache=` is not given: 1/16 of RAM, from 64 MiB to 1 GiB.
fn default_cache_bytes() -> usize {
    // SAFETY: sysconf has no preconditions.
    let (pages, page) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    let ram = (pages.max(0) as u64).saturating_mul(page.max(0) as u64);
    (ram / 16).clamp(64 << 20, 1 << 30) as usize
}

/// `512M`, `1G`, `65536K` or a number of bytes.
fn parse_size(v: &str) -> Result<usize> {
    let (num, mul) = match v.char_indices().last() {
        Some((i, 'K' | 'k')) => (&v[..i], 1usize << 10),
        Some((i, 'M' | 'm')) => (&v[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&v[..i], 1 << 30),
        _ => (v, 1),
    };
    let n: usize = num.parse().with_context(|| format!("bad size {v:?} (examples: 256M, 1G, 0)"))?;
    n.checked_mul(mul).with_context(|| format!("size {v:?} is too large"))
}

fn parse_opts(s: Option<&str>) -> Result<Opts> {
    let mut o = Opts {
        read_only: false,
        force_nolock: false,
        commit_secs: 5,
        cache_bytes: default_cache_bytes(),
        threads: DEFAULT_THREADS,
    };
    for opt in s.unwrap_or("").split(',').filter(|x| !x.is_empty()) {
        match opt.split_once('=') {
            None if opt == "ro" => o.read_only = true,
            None if opt == "rw" => o.read_only = false,
            Some(("lockproto", "lock_nolock")) => o.force_nolock = true,
            Some(("lockproto", "lock_dlm")) => o.force_nolock = false,
            Some(("commit", v)) => {
                o.commit_secs = v.parse().with_context(|| format!("bad commit interval {v:?}"))?;
                if o.commit_secs == 0 {
                    bail!("commit interval must be at least 1 second");
                }
            }
            Some(("cache", v)) => o.cache_bytes = parse_size(v)?,
            Some(("threads", v)) => {
                o.threads = v.parse().with_context(|| format!("bad thread count {v:?}"))?;
                if !(1..=64).contains(&o.threads) {
                    bail!("threads must be from 1 to 64");
                }
            }
            _ => {
                bail!("unknown mount option {opt:?} (known: ro, rw, lockproto=lock_nolock, commit=SECONDS, cache=SIZE, threads=N)")
            }
        }
    }
    Ok(o)
}

/// Runs this program again with `args` (the mount in the foreground) in its own
/// session and returns once the child says the mount is ready. `quiet` (the
/// `mount.concord` helper: mount(8) says nothing on success) prints nothing then, and
/// keeps the child's messages until it is ready: they are shown if it fails, and
/// otherwise go to the log (the start of the story, before the child writes there).
fn daemonize(args: &[OsString], log: Option<&Path>, quiet: bool) -> Result<()> {
    let exe = std::env::current_exe()?;
    let log = match log {
        Some(p) => {
            // Opened here first so that a log that cannot be written is refused before
            // anything is mounted.
            open_log(p)?;
            std::path::absolute(p)?
        }
        None => PathBuf::from("/dev/null"),
    };
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(exe)
        .args(args)
        .env(DETACH_ENV, &log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if quiet { Stdio::piped() } else { Stdio::inherit() })
        .process_group(0)
        .spawn()?;
    // The child's messages until it detaches (its stderr pipe then closes).
    let early = child.stderr.take().map(|mut e| {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = std::io::Read::read_to_end(&mut e, &mut v);
            let _ = tx.send(v);
        });
        rx
    });
    let early_text = |wait| early.as_ref().and_then(|rx| rx.recv_timeout(wait).ok()).unwrap_or_default();
    let out = child.stdout.take().context("child stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.is_empty() {
        let status = child.wait()?;
        use std::io::Write;
        let _ = std::io::stderr().write_all(&early_text(Duration::from_secs(5)));
        bail!("mount failed ({status})");
    }
    if quiet {
        let text = early_text(Duration::from_secs(10));
        if !text.is_empty() {
            use std::io::Write;
            if let Err(e) = open_log(&log).and_then(|mut f| Ok(f.write_all(&text)?)) {
                tracing::warn!(error = %format!("{e:#}"), "the mount's first messages are lost");
            }
        }
    } else {
        print!("{line}");
        println!("concord: running in the background as process {}; messages: {}", child.id(), log.display());
    }
    Ok(())
}

/// Set by [`daemonize`] for the background mount: where its stdout and stderr go once
/// the mount is ready, so that it holds no pipe of the command that started it (a
/// caller reading `concord mount --daemon`'s output to its end would wait forever).
pub(crate) const DETACH_ENV: &str = "CONCORD_MOUNT_DETACH_TO";

fn open_log(p: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(p)
        .with_context(|| format!("opening the log file {}", p.display()))
}

/// Points stdout and stderr at the file named by [`DETACH_ENV`], if set.
fn detach_stdio() -> Result<()> {
    let Some(p) = std::env::var_os(DETACH_ENV) else { return Ok(()) };
    let f = open_log(Path::new(&p))?;
    use std::os::fd::AsRawFd;
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: dup2 of an open file onto a standard descriptor this process owns.
        if unsafe { libc::dup2(f.as_raw_fd(), fd) } < 0 {
            return Err(std::io::Error::last_os_error()).context("redirecting output to the log");
        }
    }
    Ok(())
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local, initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Waits up to `ms` for one of the blocked signals.
fn wait_signal(set: &libc::sigset_t, ms: u64) -> Option<i32> {
    let ts = libc::timespec { tv_sec: (ms / 1000) as libc::time_t, tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long };
    // SAFETY: `set` is a valid signal set; a null siginfo pointer is allowed.
    let r = unsafe { libc::sigtimedwait(set, std::ptr::null_mut(), &ts) };
    (r > 0).then_some(r)
}

/// How long a cluster mount waits for lockd to let it join the lockspace (lockd waits
/// for a quorum of nodes first).
const JOIN_WAIT: Duration = Duration::from_secs(120);

/// How long a mount whose slot is past the journals waits before it joins again, and
/// how long it goes on trying (a recovery of a departed node's journal takes well under
/// a second once the node is known dead).
const JOIN_RETRY: Duration = Duration::from_millis(200);
const SLOT_WAIT: Duration = Duration::from_secs(20);

pub fn run(a: MountArgs) -> Result<()> {
    let again: Vec<OsString> = std::env::args_os().skip(1).filter(|a| a != "--daemon").collect();
    run_with(a, &again, How::default())
}

/// How [`run_with`] runs a mount.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct How {
    /// With `--daemon`: print nothing once the background mount is ready.
    pub quiet: bool,
    /// Check the arguments, options and cluster configuration, and stop there
    /// (mount(8)'s `-f`).
    pub fake: bool,
}

/// [`run`], where `again` are the arguments that run this same mount in the
/// foreground (for `--daemon`).
pub(crate) fn run_with(a: MountArgs, again: &[OsString], how: How) -> Result<()> {
    let cluster = match (&a.config, a.node) {
        (None, None) => None,
        (Some(c), Some(n)) => Some((c.clone(), n)),
        _ => bail!("--config FILE and --node N go together: a cluster mount needs both"),
    };
    let o = parse_opts(a.options.as_deref())?;
    if cluster.is_some() {
        if o.force_nolock {
            bail!("-o lockproto=lock_nolock mounts on one node only: leave out --config and --node");
        }
        if o.read_only {
            bail!("read-only cluster mounts are not supported: mount without -o ro, or on one node with -o ro,lockproto=lock_nolock");
        }
    }
    if how.fake {
        if let Some((config, node)) = &cluster {
            ClusterConfig::load(config)?.node(*node)?;
        }
        if !a.mountpoint.is_dir() {
            bail!("{}: mount point is not a directory", a.mountpoint.display());
        }
        return Ok(());
    }
    if a.daemon {
        return daemonize(again, a.log.as_deref(), how.quiet);
    }
    // The background mount started by `daemonize` is given `--log` too; it uses
    // DETACH_ENV instead.
    if a.log.is_some() && std::env::var_os(DETACH_ENV).is_none() {
        bail!("--log goes with --daemon (a mount in the foreground writes to its stderr)");
    }
    if !a.mountpoint.is_dir() {
        bail!("{}: mount point is not a directory", a.mountpoint.display());
    }
    // Before any thread starts (the filesystem's, tokio's), so that every thread
    // inherits the mask and the signals reach only the wait in `serve`.
    let sigs = block_signals();
    if let Some((config, node)) = cluster {
        return run_cluster(&a, &o, &config, node, &sigs);
    }
    let claim = if o.read_only { crate::Claim::Shared } else { crate::Claim::Exclusive };
    let dev = crate::open_device(&a.dev, o.read_only, None, claim)?;
    let opts = MountOptions {
        read_only: o.read_only,
        data_cache_bytes: o.cache_bytes,
        jid: 0,
        force_nolock: o.force_nolock,
        ..Default::default()
    };
    let fs = match Filesystem::mount(dev, &opts) {
        Ok(fs) => Arc::new(fs),
        Err(concord_fs::FsError::ReadOnly) => {
            bail!("{}: the journal is dirty; a read-only mount cannot replay it (mount read-write once, or run concord fsck -y)", a.dev.device.display())
        }
        Err(e) => return Err(e).with_context(|| format!("mounting {}", a.dev.device.display())),
    };
    serve(&a, &o, fs.clone(), &sigs)?;
    fs.unmount().context("unmounting: writing the journal back")?;
    eprintln!("concord: {} unmounted cleanly", a.mountpoint.display());
    Ok(())
}

/// A `lock_dlm` mount as node `node` of the cluster that `config` describes: joins the
/// lock table's lockspace through the node's lockd, mounts with glocks
/// ([`concord_fs::cluster::mount_cluster`]), serves FUSE, and on the way out unmounts
/// cleanly and leaves the lockspace.
fn run_cluster(a: &MountArgs, o: &Opts, config: &Path, node: u32, sigs: &libc::sigset_t) -> Result<()> {
    let cfg = ClusterConfig::load(config)?;
    cfg.node(node)?;
    // Who may use the control socket; checked before anything is mounted.
    let access = concord_lockd::access::Access::new(cfg.client_group.as_deref())?;
    let device = a.dev.device.display();
    // Shared with the other nodes' mount processes on this machine, never with a
    // single-node mount, mkfs, fsck (see `claim_device`).
    let dev = crate::open_device(&a.dev, false, None, crate::Claim::Cluster)?;
    let sb = concord_fs::read_superblock(dev.as_ref()).with_context(|| format!("reading {device}"))?;
    if sb.lockproto != LOCKPROTO_DLM {
        bail!(
            "{device}: this filesystem uses {}: it mounts on one node only, without --config and --node",
            sb.lockproto
        );
    }
    let (table_cluster, fsname) = sb.table_parts();
    if table_cluster != cfg.cluster_name {
        bail!(
            "{device}: its lock table {:?} belongs to cluster {table_cluster:?}, but {} configures cluster {:?}: \
             not mounted, nothing written",
            sb.locktable,
            config.display(),
            cfg.cluster_name
        );
    }
    let fsname = fsname.to_string();
    let socket = cfg.lockd_socket_path(node);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("concord-rt")
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let client_name = format!("concord mount {}", a.mountpoint.display());
    let ls = rt.block_on(async {
        let client = match Client::connect_named(&socket, &client_name).await {
            Ok(c) => c,
            Err(e) => {
                let down = format!(
                    "lockd is not running for node {node} (socket {}): start it with `concord lockd --config {} --node {node}`",
                    socket.display(),
                    config.display()
                );
                if socket.exists() {
                    return Err(anyhow::Error::new(e).context(down));
                }
                bail!(down);
            }
        };
        let deadline = tokio::time::Instant::now() + JOIN_WAIT;
        let slot_deadline = tokio::time::Instant::now() + SLOT_WAIT;
        let mut told = false;
        loop {
            let ls = match tokio::time::timeout_at(deadline, client.join(&fsname, JoinKind::WithRecovery)).await {
                Ok(r) => r.with_context(|| format!("joining lockspace {fsname} through the lockd of node {node}"))?,
                Err(_) => bail!(
                    "joining lockspace {fsname} through the lockd of node {node}: no answer in {} s (is a quorum of the cluster's lockds running? see `concord dlm --config {} --node {node} status`)",
                    JOIN_WAIT.as_secs(),
                    config.display()
                ),
            };
            // The slots of departed nodes stay taken until their journals are recovered:
            // a node that joins while that recovery runs (its own mount just crashed)
            // may get a slot past the journals. It leaves and asks again until the
            // recovery has freed one, for up to SLOT_WAIT; after that (more nodes than
            // journals) mount_cluster says what is wrong.
            if ls.slot() <= sb.journals || tokio::time::Instant::now() >= slot_deadline {
                return Ok(ls);
            }
            if !told {
                eprintln!(
                    "concord: slot {} is past the filesystem's {} journals while departed nodes' journals are \
                     recovered; waiting for a free one",
                    ls.slot(),
                    sb.journals
                );
                told = true;
            }
            ls.leave().await.with_context(|| format!("leaving lockspace {fsname} to join again"))?;
            tokio::time::sleep(JOIN_RETRY).await;
        }
    })?;
    let opts = MountOptions { data_cache_bytes: o.cache_bytes, ..Default::default() };
    // Outside the runtime: mount_cluster blocks on the lockspace's answers.
    let cm = mount_cluster(dev, ls, rt.handle().clone(), &opts)
        .with_context(|| format!("mounting {device} as node {node} of cluster {}", cfg.cluster_name))?;
    let cm = Arc::new(cm);
    // `concord status` and `concord glocks` reach the mount here (root and the client
    // group only).
    let control = crate::control::serve(
        crate::control::Info {
            mount: cm.clone(),
            node,
            cluster: cfg.cluster_name.clone(),
            lockspace: fsname.clone(),
            device: device.to_string(),
            mountpoint: a.mountpoint.clone(),
        },
        access,
    );
    let control = match control {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "no control socket: concord status and glocks will not answer");
            None
        }
    };
    let served = serve(a, o, cm.fs.clone(), sigs);
    drop(control);
    let unmounted = cm.unmount();
    drop(cm);
    rt.shutdown_timeout(Duration::from_secs(5));
    served?;
    unmounted.context("unmounting: writing the journal back")?;
    eprintln!("concord: {} unmounted cleanly", a.mountpoint.display());
    Ok(())
}

/// Serves `fs` through FUSE on the mount point: prints the ready line, commits every
/// `commit=` seconds, and returns once the kernel unmounted it (`umount`) or a signal
/// (SIGTERM, SIGINT, SIGHUP) asked for it. The caller unmounts `fs` afterwards.
fn serve(a: &MountArgs, o: &Opts, fs: Arc<Filesystem>, sigs: &libc::sigset_t) -> Result<()> {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(a.dev.device.display().to_string()),
        fuser::MountOption::Subtype("concord".into()),
        fuser::MountOption::DefaultPermissions,
        if o.read_only { fuser::MountOption::RO } else { fuser::MountOption::RW },
    ];
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        cfg.acl = fuser::SessionACL::All;
        cfg.mount_options.push(fuser::MountOption::Dev);
        cfg.mount_options.push(fuser::MountOption::Suid);
    }
    cfg.n_threads = Some(o.threads);
    let mut session = fuser::Session::new(ConcordFuse::new(fs.clone()), &a.mountpoint, &cfg)
        .with_context(|| format!("mounting on {}", a.mountpoint.display()))?;
    fs.set_kernel_cache(Arc::new(FuseKernelCache::new(session.notifier(), fs.root())));
    let mut unmounter = session.unmount_callable();
    let (done_tx, done_rx) = mpsc::channel();
    let serve = std::thread::Builder::new().name("fuse".into()).spawn(move || {
        let r = session.run();
        let _ = done_tx.send(());
        r
    })?;
    let stop = Arc::new(AtomicBool::new(false));
    let commit_secs = o.commit_secs;
    let committer = {
        let (fs, stop) = (fs.clone(), stop.clone());
        std::thread::Builder::new().name("commit".into()).spawn(move || {
            let mut waited = 0u64;
            // Said once: a withdrawn filesystem fails every commit until unmounted.
            let mut failing = false;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                waited += 100;
                if waited >= commit_secs * 1000 {
                    waited = 0;
                    match fs.fsync() {
                        Ok(()) => failing = false,
                        Err(e) if !failing => {
                            tracing::error!(error = %e, "periodic commit failed");
                            failing = true;
                        }
                        Err(_) => {}
                    }
                }
            }
        })?
    };
    println!("concord: {} mounted on {}", a.dev.device.display(), a.mountpoint.display());
    use std::io::Write;
    std::io::stdout().flush()?;
    if let Err(e) = detach_stdio() {
        tracing::warn!(error = %e, "background mount keeps its caller's stdout and stderr");
    }
    loop {
        if let Some(sig) = wait_signal(sigs, 200) {
            tracing::info!(sig, "signal: unmounting");
            if let Err(e) = unmounter.unmount() {
                tracing::warn!(error = %e, "unmount");
            }
            let _ = done_rx.recv_timeout(Duration::from_secs(30));
            break;
        }
        if done_rx.try_recv().is_ok() {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = committer.join();
    match serve.join() {
        Ok(Err(e)) => tracing::warn!(error = %e, "FUSE session ended with an error"),
        Err(_) => tracing::error!("FUSE session thread panicked"),
        Ok(Ok(())) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_options_parse_and_refuse_what_they_do_not_know() {
        let o = parse_opts(Some("ro,commit=2,cache=256M,threads=2,lockproto=lock_nolock")).unwrap();
        assert!(o.read_only && o.force_nolock);
        assert_eq!((o.commit_secs, o.cache_bytes, o.threads), (2, 256 << 20, 2));
        let d = parse_opts(None).unwrap();
        assert_eq!((d.read_only, d.commit_secs, d.threads), (false, 5, DEFAULT_THREADS));
        for bad in ["threads=0", "threads=65", "threads=x", "cache=12Q", "commit=0", "noatime", "lockproto=other"] {
            let e = parse_opts(Some(bad)).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(!e.is_empty(), "{bad} was accepted");
        }
    }
}
