//! `concord mount`: serve a filesystem through FUSE until unmounted.
//!
//! Runs in the foreground and prints one line when the mount is ready; `--daemon`
//! detaches (the parent waits for that line, then exits). SIGTERM, SIGINT and
//! `umount MOUNTPOINT` all unmount cleanly: journal committed, written back, marked clean.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use concord_fs::fuse::{ConcordFuse, FuseKernelCache};
use concord_fs::{Filesystem, MountOptions};

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
    /// Cluster configuration (lock_dlm mounts; not yet supported).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This node's id in the cluster configuration.
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

/// Re-runs this command without `--daemon` in its own session and returns once the
/// child says the mount is ready.
fn daemonize(log: Option<&Path>) -> Result<()> {
    let exe = std::env::current_exe()?;
    let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--daemon").collect();
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
        .args(&args)
        .env(DETACH_ENV, &log)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()?;
    let out = child.stdout.take().context("child stdout")?;
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    if line.is_empty() {
        let status = child.wait()?;
        bail!("mount failed ({status})");
    }
    print!("{line}");
    println!("concord: running in the background as process {}; messages: {}", child.id(), log.display());
    Ok(())
}

/// Set by [`daemonize`] for the background mount: where its stdout and stderr go once
/// the mount is ready, so that it holds no pipe of the command that started it (a
/// caller reading `concord mount --daemon`'s output to its end would wait forever).
const DETACH_ENV: &str = "CONCORD_MOUNT_DETACH_TO";

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

pub fn run(a: MountArgs) -> Result<()> {
    if a.config.is_some() || a.node.is_some() {
        bail!("cluster mounts (--config/--node) are not yet supported: use -o lockproto=lock_nolock on one node");
    }
    let o = parse_opts(a.options.as_deref())?;
    if a.daemon {
        return daemonize(a.log.as_deref());
    }
    // The background mount started by `daemonize` is given `--log` too; it uses
    // DETACH_ENV instead.
    if a.log.is_some() && std::env::var_os(DETACH_ENV).is_none() {
        bail!("--log goes with --daemon (a mount in the foreground writes to its stderr)");
    }
    if !a.mountpoint.is_dir() {
        bail!("{}: mount point is not a directory", a.mountpoint.display());
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
    let sigs = block_signals();
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
    let committer = {
        let (fs, stop) = (fs.clone(), stop.clone());
        std::thread::Builder::new().name("commit".into()).spawn(move || {
            let mut waited = 0u64;
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                waited += 100;
                if waited >= o.commit_secs * 1000 {
                    waited = 0;
                    if let Err(e) = fs.fsync() {
                        tracing::error!(error = %e, "periodic commit failed");
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
        if let Some(sig) = wait_signal(&sigs, 200) {
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
    fs.unmount().context("unmounting: writing the journal back")?;
    eprintln!("concord: {} unmounted cleanly", a.mountpoint.display());
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
