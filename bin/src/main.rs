//! `concord`: the one command line of the Concord clustered filesystem.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use concord_fs::format::Superblock;
use concord_journal::nbd_proto::NbdUrl;
use concord_journal::{BlockDevice, FileDevice, NbdDevice, NbdOptions, OpenOptions};

/// The mount allocates many small objects from several FUSE threads, where mimalloc is
/// several times faster than glibc's malloc (docs/ARCHITECTURE.md, "Dependencies").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod ca;
mod cluster;
mod control;
mod dlm;
mod live;
mod lockd;
mod mount;
mod mount_helper;
mod progress;
mod stress;

#[derive(Parser)]
#[command(name = "concord", version, about = "Concord: a clustered filesystem over a shared block device")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Make a filesystem on a device or image file.
    Mkfs(MkfsArgs),
    /// Check (and with -y repair) an unmounted filesystem. Exit codes: 0 clean,
    /// 1 errors fixed, 4 errors left, 8 operational error.
    Fsck(FsckArgs),
    /// Show each journal's size, state and head sequence.
    Jinfo(DevArgs),
    /// Mount a filesystem through FUSE (foreground; --daemon to detach).
    Mount(mount::MountArgs),
    /// Run this node's DLM peer (lockd) in the foreground.
    Lockd(lockd::LockdArgs),
    /// Talk to this node's lockd: status, lockdump, exec; or run the DLM benchmark.
    Dlm(dlm::DlmArgs),
    /// Make the cluster CA and node certificates.
    Ca(ca::CaArgs),
    /// A cluster of several nodes on this machine: up, status, kill, restart,
    /// partition, heal, down.
    Cluster(cluster::ClusterArgs),
    /// A cluster mount's node, jid, state, lockspace generation and members.
    Status(ControlArgs),
    /// A cluster mount's glocks: state, holders, demotes, hold times, statistics.
    Glocks(ControlArgs),
    /// Live view of the cluster mounts on this machine: busiest glocks, DLM requests per
    /// second, journal recoveries; refreshes in place, q quits.
    Top(live::TopArgs),
    /// A checked fsstress-style workload on one or more mount points, optionally
    /// killing nodes of a local cluster (docs/guide/stress.md).
    Stress(stress::StressArgs),
}

#[derive(clap::Args)]
struct ControlArgs {
    /// Mount point of a cluster mount on this machine.
    mountpoint: PathBuf,
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct DevArgs {
    /// Block device, image file, or NBD export (nbd://HOST[:PORT]/EXPORT).
    pub device: PathBuf,
    /// Open without O_DIRECT (only for filesystems that refuse it, such as tmpfs).
    #[arg(long)]
    pub no_direct: bool,
}

#[derive(clap::Args)]
struct MkfsArgs {
    /// Number of journals (one per node that will mount).
    #[arg(short = 'j', default_value_t = 1)]
    journals: u32,
    /// Journal size in MiB (default 64, smaller on small devices; minimum 8).
    #[arg(short = 'J')]
    journal_mib: Option<u32>,
    /// Lock table, cluster:fsname.
    #[arg(short = 't', default_value = "concord:fs")]
    locktable: String,
    /// Lock protocol: lock_dlm (cluster) or lock_nolock (one node).
    #[arg(short = 'p', default_value = "lock_nolock")]
    lockproto: String,
    /// Overwrite an existing filesystem.
    #[arg(long)]
    force: bool,
    /// Create (or extend) an image file of this size, e.g. 1G, 512M.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    #[command(flatten)]
    dev: DevArgs,
}

#[derive(clap::Args)]
struct FsckArgs {
    /// Check only; write nothing.
    #[arg(short = 'n', conflicts_with = "yes")]
    no: bool,
    /// Repair what can be repaired, replay dirty journals.
    #[arg(short = 'y')]
    yes: bool,
    #[command(flatten)]
    dev: DevArgs,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let m = match s[i..].to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1u64 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                other => return Err(format!("unknown size suffix {other:?}")),
            };
            (&s[..i], m)
        }
        None => (s, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("bad size {s:?}"))?;
    n.checked_mul(mul).ok_or_else(|| format!("size {s:?} too large"))
}

/// What a command claims of the device it opens (see [`claim_device`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Claim {
    /// Reads a few blocks and writes nothing (jinfo): runs beside a mount.
    Nothing,
    /// Reads the whole filesystem and writes nothing (fsck -n, a read-only mount).
    Shared,
    /// One node of a cluster mount (lock_dlm): writes its own journal and, under
    /// glocks, the rest, beside the other nodes' mount processes.
    Cluster,
    /// Writes (mkfs, fsck -y, a single-node mount).
    Exclusive,
}

pub(crate) fn open_device(
    a: &DevArgs,
    read_only: bool,
    create_size: Option<u64>,
    claim: Claim,
) -> Result<Arc<dyn BlockDevice>> {
    if let Some(url) = a.device.to_str().filter(|d| NbdUrl::is_nbd(d)) {
        // An NBD export through Concord's own client. No claim: a flock means nothing
        // to a server on another machine, which decides alone whom it serves.
        if create_size.is_some() {
            bail!("{url}: --size makes an image file; an NBD export has the size its server gives it");
        }
        let opts = NbdOptions { read_only, ..NbdOptions::default() };
        let dev = NbdDevice::open(url, &opts).with_context(|| format!("opening {url}"))?;
        return Ok(Arc::new(dev));
    }
    if create_size.is_none() && !a.device.exists() {
        bail!("{}: no such device or file (use --size to create an image file)", a.device.display());
    }
    let opts = OpenOptions { direct: !a.no_direct, read_only, create_size };
    let dev = FileDevice::open(&a.device, &opts).with_context(|| format!("opening {}", a.device.display()))?;
    claim_device(&dev, &a.device, claim)?;
    Ok(Arc::new(dev))
}

/// How long a command waits for another Concord process to let go of its device.
const CLAIM_WAIT: Duration = Duration::from_secs(10);

/// Claims the device (`flock`, see `FileDevice::try_claim`), so that two Concord
/// processes on this machine never write one device under each other: a second
/// single-node mount of an image, or mkfs or `fsck -y` under a mount, would each
/// corrupt it. A claim that conflicts is waited for, up to [`CLAIM_WAIT`]
/// (`CONCORD_CLAIM_WAIT_SECS` overrides it), because `umount` returns before the
/// mount's process has written its last blocks and exited, and `umount && mount` is
/// what people type.
///
/// Writers that work alone (mkfs, `fsck -y`, a single-node mount) take the `flock`
/// exclusively; readers (`fsck -n`, a read-only mount) and the nodes of a cluster
/// mount take it shared, so that the nodes of one machine share the device with each
/// other and none of them with a lone writer. Readers and cluster nodes must not meet
/// either (a reader would see the nodes' writes half done), which one shared `flock`
/// cannot say: each of the two kinds also holds a read lock on its own byte of the
/// device (an OFD byte-range lock, which Linux keeps apart from `flock`), taken before
/// it looks for a lock on the other kind's byte and let go if it finds one. Of two
/// processes of different kinds that start at once, the later lock sees the earlier
/// (at worst both back off and retry), so the two kinds never hold the device together.
fn claim_device(dev: &FileDevice, path: &Path, claim: Claim) -> Result<()> {
    let (exclusive, kind) = match claim {
        Claim::Nothing => return Ok(()),
        Claim::Shared => (false, Some(ClaimKind::Reader)),
        Claim::Cluster => (false, Some(ClaimKind::Cluster)),
        Claim::Exclusive => (true, None),
    };
    let wait = std::env::var("CONCORD_CLAIM_WAIT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(CLAIM_WAIT, Duration::from_secs);
    let deadline = Instant::now() + wait;
    let mut told = false;
    // Different sleeps for processes that retry together (see above).
    let pause = Duration::from_millis(40 + u64::from(std::process::id() % 40));
    loop {
        if dev.try_claim(exclusive).with_context(|| format!("locking {}", path.display()))? {
            let Some(kind) = kind else { return Ok(()) };
            if let Some(f) = claim_kind(path, kind).with_context(|| format!("locking {}", path.display()))? {
                // Held for the life of the process, as the flock is (every command keeps
                // its device open until it exits).
                std::mem::forget(f);
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "{}: in use by another Concord process on this machine (a mount, mkfs or fsck); \
                 nothing was written",
                path.display()
            );
        }
        if !told {
            eprintln!(
                "concord: {} is in use by another Concord process; waiting up to {} s for it to finish",
                path.display(),
                wait.as_secs()
            );
            told = true;
        }
        std::thread::sleep(pause);
    }
}

/// The two kinds of shared claim (see [`claim_device`]); the value is the byte each
/// kind read-locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimKind {
    Reader = 0,
    Cluster = 1,
}

/// Takes `kind`'s byte lock on a second open file of `path`; returns that file (the lock
/// lasts while it is open), or None if a process of the other kind holds its byte.
fn claim_kind(path: &Path, kind: ClaimKind) -> std::io::Result<Option<std::fs::File>> {
    use std::os::fd::AsRawFd;
    let other = match kind {
        ClaimKind::Reader => ClaimKind::Cluster,
        ClaimKind::Cluster => ClaimKind::Reader,
    };
    let f = std::fs::File::open(path)?;
    let lock = |cmd: libc::c_int, ty: libc::c_int, byte: ClaimKind| -> std::io::Result<libc::flock> {
        // SAFETY: an all-zero flock is valid; l_pid must be 0 for OFD locks.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = ty as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = byte as libc::off_t;
        fl.l_len = 1;
        // SAFETY: fcntl with an OFD lock command on a descriptor we own and a valid flock.
        if unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fl)
    };
    // Nobody takes a write lock on these bytes, so this read lock is always granted.
    lock(libc::F_OFD_SETLK, libc::F_RDLCK, kind)?;
    let found = lock(libc::F_OFD_GETLK, libc::F_WRLCK, other)?;
    Ok((found.l_type == libc::F_UNLCK as libc::c_short).then_some(f))
}

fn human(bytes: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", U[i])
}

fn uuid_str(u: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*u).hyphenated().to_string()
}

fn mkfs(a: MkfsArgs) -> Result<()> {
    let dev = open_device(&a.dev, false, a.size, Claim::Exclusive)?;
    let opts = concord_fs::mkfs::MkfsOptions {
        journals: a.journals,
        journal_mib: a.journal_mib,
        lockproto: a.lockproto.clone(),
        locktable: a.locktable.clone(),
        force: a.force,
        ..Default::default()
    };
    let mut bar = progress::Bar::new("mkfs", dev.len() > (8 << 30));
    let r = concord_fs::mkfs::mkfs(&dev, &opts, &mut |done, total| bar.set(done, total))?;
    bar.finish();
    let sb = &r.sb;
    println!("Device:              {}", a.dev.device.display());
    println!("Block size:          4096");
    println!("Device size:         {} ({} blocks)", human(sb.total_blocks * 4096), sb.total_blocks);
    println!("Filesystem size:     {} ({} data blocks)", human(r.data_blocks * 4096), r.data_blocks);
    println!(
        "Journals:            {} of {} each ({} blocks)",
        sb.journals,
        human(u64::from(sb.journal_blocks) * 4096),
        sb.journal_blocks
    );
    println!("Resource groups:     {} of up to {}", sb.rgrp_count, human(u64::from(sb.rgrp_blocks) * 4096));
    println!("Locking protocol:    {}", sb.lockproto);
    println!("Lock table:          {}", sb.locktable);
    println!("UUID:                {}", uuid_str(&sb.uuid));
    Ok(())
}

fn jinfo(a: DevArgs) -> Result<()> {
    let dev = open_device(&a, true, None, Claim::Nothing)?;
    let sb: Superblock = concord_fs::read_superblock(dev.as_ref())?;
    println!("{}: {} journal(s), lock table {} ({})", a.device.display(), sb.journals, sb.locktable, sb.lockproto);
    for jid in 0..sb.journals {
        let region = concord_fs::journal_region(&sb, jid);
        match concord_journal::info(dev.as_ref(), region, sb.journal_nonce(jid)) {
            Ok(i) => println!(
                "journal{jid}: {} ({} blocks at {}), {}, head sequence {}, tail sequence {}, {} blocks in use",
                human(region.blocks * 4096),
                region.blocks,
                region.start,
                if i.clean { "clean" } else { "dirty" },
                i.head_seq,
                i.tail_seq,
                i.used_blocks
            ),
            Err(e) => println!("journal{jid}: unreadable: {e}"),
        }
    }
    Ok(())
}

fn fsck(a: FsckArgs) -> ExitCode {
    let run = || -> Result<i32> {
        let claim = if a.yes { Claim::Exclusive } else { Claim::Shared };
        let dev = open_device(&a.dev, !a.yes, None, claim)?;
        let mut bar = progress::Bar::new("fsck", dev.len() > (8 << 30));
        let opts = concord_fs::fsck::FsckOptions { repair: a.yes };
        let r = concord_fs::fsck::fsck(&dev, &opts, &mut |d, t| bar.set(d, t))?;
        bar.finish();
        for p in &r.problems {
            println!("block {}: {}{}", p.block, p.what, if p.fixed { " (fixed)" } else { "" });
        }
        for j in &r.replayed {
            println!("journal{j}: replayed");
        }
        println!(
            "{}: {} inodes, {} directories, {} blocks in use, {} problem(s)",
            a.dev.device.display(),
            r.inodes,
            r.dirs,
            r.used_blocks,
            r.problems.len()
        );
        Ok(r.exit_code())
    };
    match run() {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("concord fsck: {e:#}");
            ExitCode::from(8)
        }
    }
}

/// What is logged when `RUST_LOG` is not set: warnings, and the lock_dlm protocol's
/// mount and recovery lines (the seed's, which tell a cluster's operator what a mount
/// is doing).
const DEFAULT_LOG: &str = "warn,fuser=error,lock_dlm=info,concord_fs::cluster=info";

fn main() -> ExitCode {
    // Run as /sbin/mount.concord (a symlink) by mount(8).
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if Path::new(&argv0).file_name().is_some_and(|n| n == "mount.concord") {
        return mount_helper::main();
    }
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| DEFAULT_LOG.into()))
        // Colours only for a person at a terminal: a log file (`--log`, also of a
        // background mount whose stderr is still the terminal until it is ready; a
        // lockd's redirected stderr; journald) gets plain text.
        .with_ansi(
            std::io::stderr().is_terminal()
                && std::env::var_os("NO_COLOR").is_none()
                && std::env::var_os(mount::DETACH_ENV).is_none(),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Mkfs(a) => mkfs(a),
        Cmd::Fsck(a) => return fsck(a),
        Cmd::Jinfo(a) => jinfo(a),
        Cmd::Mount(a) => mount::run(a),
        Cmd::Lockd(a) => lockd::run(a),
        Cmd::Dlm(a) => return dlm::run(a),
        Cmd::Ca(a) => ca::run(a),
        Cmd::Cluster(a) => cluster::run(a),
        Cmd::Status(a) => control::query(&a.mountpoint, "status", a.json).and_then(|s| print_out(&s)),
        Cmd::Top(a) => live::top(a),
        Cmd::Stress(a) => return stress::run(a),
        Cmd::Glocks(a) => control::query(&a.mountpoint, "glocks", a.json).and_then(|s| print_out(&s)),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("concord: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `s` to stdout; a reader that went away (`concord glocks M | head`) is not an
/// error (Rust ignores SIGPIPE, so `print!` would panic there).
fn print_out(s: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}
