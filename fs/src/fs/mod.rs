//! The filesystem API: what the FUSE adapter and most tests call.
//!
//! Every metadata change is one journal transaction ([`Tx`]). Operations hold the
//! filesystem lock while they run (one writer at a time in this version), and every
//! access to an inode or rgrp first takes a lock handle from the mount's lock module.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap as HashMap;

use concord_journal::{BlockDevice, Journal, LogRegion};
use parking_lot::Mutex;

use crate::cache::{DataCache, Listing};
use crate::core::{Core, RgrpInfo, Tx};
use crate::format::*;
use crate::lock::{LockMode, LockModule, LockName, NoLock};
use crate::{bmap, dir, xattr, FsError, Result};

/// Mount-time choices.
#[derive(Debug, Clone)]
pub struct MountOptions {
    pub read_only: bool,
    /// Bytes of file data Concord caches itself (0: no data cache).
    pub data_cache_bytes: usize,
    /// Journal to use (single node: 0).
    pub jid: u32,
    /// Mount a `lock_dlm` filesystem with lock_nolock (`-o lockproto=lock_nolock`).
    pub force_nolock: bool,
    /// Metadata blocks Concord caches (4 KiB each, decoded forms beside them).
    pub meta_cache_blocks: usize,
    /// A `lock_dlm` mount among other nodes ([`crate::cluster`]): journals are
    /// replayed by the lock_dlm protocol (the first mounter, or the survivors of a dead
    /// node), not here; caches live only under glocks; unlinked inodes are freed by
    /// the next first mounter (iopen glocks, which would tell that no node has one
    /// open, are not built yet).
    pub cluster: bool,
}

/// The data cache of a mount that does not choose: 64 MiB.
pub const DEFAULT_DATA_CACHE: usize = 64 << 20;

impl Default for MountOptions {
    fn default() -> MountOptions {
        MountOptions {
            read_only: false,
            data_cache_bytes: DEFAULT_DATA_CACHE,
            jid: 0,
            force_nolock: false,
            meta_cache_blocks: crate::core::CACHE_MAX,
            cluster: false,
        }
    }
}

/// What the kernel caches above the filesystem (the FUSE adapter implements it with
/// fuser's notifier): [`Filesystem::drop_caches`] tells it to forget an inode.
pub trait KernelCache: Send + Sync {
    /// Forgets the attributes and cached pages of `ino`.
    fn inval_inode(&self, ino: u64);
    /// Forgets the name `name` in directory `parent`.
    fn inval_entry(&self, parent: u64, name: &[u8]);
}

/// File attributes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// 4 KiB blocks allocated, the dinode included.
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub rdev: u32,
    pub generation: u64,
}

/// A time to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetTime {
    Now,
    At(Time),
}

/// What `setattr` changes.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// rename(2) flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RenameFlags {
    pub noreplace: bool,
    pub exchange: bool,
}

/// setxattr(2) flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrSet {
    Any,
    Create,
    Replace,
}

/// One readdir entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirItem {
    pub name: Vec<u8>,
    pub ino: u64,
    pub dtype: u8,
    /// Pass back as `after` to continue after this entry.
    pub cookie: u64,
}

/// statfs(2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
}

/// A mounted filesystem.
#[derive(Debug)]
pub struct Filesystem {
    core: Mutex<Core>,
    journal: Option<Arc<Journal>>,
    locks: Arc<dyn LockModule>,
    withdrawn: AtomicBool,
    sb: Superblock,
    read_only: bool,
    /// The device, for file data I/O done outside the filesystem lock.
    dev: Arc<dyn BlockDevice>,
    /// Byte ranges of files whose data writes are in flight after the inode lock was
    /// released: overlapping readers and writers, and truncates, wait for them.
    inflight: parking_lot::Mutex<HashMap<u64, Vec<(u64, u64)>>>,
    inflight_cv: parking_lot::Condvar,
    /// File data cached per inode (also reachable from the core).
    data: Arc<DataCache>,
    /// The kernel's caches above us, once the FUSE session is up.
    kernel: std::sync::OnceLock<Arc<dyn KernelCache>>,
    /// Cluster mounts: the iopen glocks held for inodes this node has referenced.
    /// `None` while one thread is taking it: the others wait for that one
    /// ([`Filesystem::hold_iopen`]).
    iopen: parking_lot::Mutex<HashMap<u64, Option<crate::lock::LockHold>>>,
    iopen_cv: parking_lot::Condvar,
    /// Cluster mounts: the fuse-notify thread's queue.
    notify: std::sync::OnceLock<parking_lot::Mutex<std::sync::mpsc::Sender<(Notice, Option<std::sync::mpsc::Sender<()>>)>>>,
    /// Cluster mounts: the names the kernel may have cached per directory since the
    /// directory's glock last left this node ([`Filesystem::note_entries`]).
    kernel_names: parking_lot::Mutex<KernelNames>,
    /// Cluster mounts: told once, when the filesystem withdraws, so that the node
    /// stops writing and leaves its lockspace ([`Filesystem::set_on_withdraw`]).
    on_withdraw: std::sync::OnceLock<WithdrawHook>,
    /// Cluster mounts: iopen glocks this node no longer holds but keeps cached (shared),
    /// oldest first; past [`IOPEN_IDLE_MAX`] the oldest are given back to the DLM.
    iopen_idle: parking_lot::Mutex<std::collections::VecDeque<u64>>,
    /// Cluster mounts: the reclaim thread's queue (unlinked inodes whose exclusive
    /// iopen try failed, tried again later: [`Filesystem::start_reclaim`]).
    reclaim: std::sync::OnceLock<parking_lot::Mutex<std::sync::mpsc::Sender<u64>>>,
}

/// [`Filesystem::set_on_withdraw`]'s function.
struct WithdrawHook(Box<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for WithdrawHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WithdrawHook")
    }
}

/// What the fuse-notify thread tells the kernel.
#[derive(Debug)]
enum Notice {
    /// Forget an inode's attributes and pages (`inval_inode`).
    Inode(u64),
    /// Forget a name in a directory, positive or negative (`inval_entry`).
    Entry(u64, Box<[u8]>),
}

/// Per directory: how many times its glock left this node (its epoch), and the names
/// the kernel was given since (and may keep for the entry TTL).
#[derive(Debug, Default)]
struct KernelNames {
    epoch: HashMap<u64, u64>,
    names: HashMap<u64, std::collections::HashSet<Box<[u8]>>>,
}

/// Idle iopen glocks a cluster node keeps cached (each costs a little memory here
/// and in lockd; giving one back costs two DLM requests, taking it again one).
const IOPEN_IDLE_MAX: usize = 16_384;

/// When the reclaim thread tries again to free an unlinked inode whose exclusive iopen
/// try failed, after the failure before: another node that only had the glock cached
/// gave it back on the BAST the try sent (TRY_1CB); one that has the inode open keeps
/// it, and frees the inode at its own last close.
const RECLAIM_RETRY: [Duration; 5] = [
    Duration::from_millis(5),
    Duration::from_millis(20),
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1500),
];

impl std::fmt::Debug for dyn KernelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCache")
    }
}

/// A registered in-flight data range; dropping it wakes the waiters.
struct DataRange<'a> {
    fs: &'a Filesystem,
    ino: u64,
    range: (u64, u64),
}

impl Drop for DataRange<'_> {
    fn drop(&mut self) {
        let mut m = self.fs.inflight.lock();
        if let Some(v) = m.get_mut(&self.ino) {
            if let Some(i) = v.iter().position(|r| *r == self.range) {
                v.swap_remove(i);
            }
            if v.is_empty() {
                m.remove(&self.ino);
            }
        }
        self.fs.inflight_cv.notify_all();
    }
}

/// How long a demote waits for the kernel to drop an inode's attributes and pages.
const KERNEL_INVAL_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// Locks one operation may find it needs inside the filesystem lock before it gives up.
const MAX_NEEDED_LOCKS: usize = 64;

pub(crate) fn now() -> Time {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Time { sec: d.as_secs() as i64, nsec: d.subsec_nanos() }
}

/// Reads and checks the primary superblock.
pub fn read_superblock(dev: &dyn BlockDevice) -> Result<Superblock> {
    let blocks = dev.len() / BLOCK_SIZE as u64;
    if blocks <= SB_ADDR {
        return Err(FsError::Invalid("device too small to hold a Concord filesystem".into()));
    }
    let mut b = [0u8; BLOCK_SIZE];
    concord_journal::read_block(dev, SB_ADDR, &mut b)?;
    if get_u32(&b, 0) != META_MAGIC {
        return Err(FsError::Invalid("not a Concord filesystem (no superblock at 64 KiB)".into()));
    }
    Ok(Superblock::decode(&b, SB_ADDR, blocks)?)
}

/// The log region of journal `jid`.
pub fn journal_region(sb: &Superblock, jid: u32) -> LogRegion {
    LogRegion { start: sb.journal_addr(jid), blocks: u64::from(sb.journal_blocks) }
}

/// Replays every dirty journal; returns the jids replayed.
pub fn replay_all(dev: &dyn BlockDevice, sb: &Superblock) -> Result<Vec<u32>> {
    let mut done = Vec::new();
    for jid in 0..sb.journals {
        if replay_journal(dev, sb, jid)? {
            done.push(jid);
        }
    }
    Ok(done)
}

/// Replays journal `jid` if it is dirty (the first mounter's job for every journal,
/// and a survivor's for a dead node's); true when it was. The caller holds that
/// journal's glock, so that no live node writes to it meanwhile.
pub fn replay_journal(dev: &dyn BlockDevice, sb: &Superblock, jid: u32) -> Result<bool> {
    let region = journal_region(sb, jid);
    let nonce = sb.journal_nonce(jid);
    let plan = concord_journal::scan(dev, region, nonce)?;
    if plan.clean {
        return Ok(false);
    }
    tracing::info!(jid, head = plan.head_seq, tail = plan.tail_seq, blocks = plan.writes.len(), "replaying journal");
    concord_journal::apply(dev, region, nonce, &plan)?;
    Ok(true)
}

fn attr_of(ino: u64, d: &Dinode) -> Attr {
    Attr {
        ino,
        mode: d.mode,
        nlink: d.nlink,
        uid: d.uid,
        gid: d.gid,
        size: d.size,
        blocks: d.blocks + 1 + u64::from(d.xattr != 0),
        atime: d.atime,
        mtime: d.mtime,
        ctime: d.ctime,
        rdev: d.rdev,
        generation: d.generation,
    }
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if !valid_name(name) {
        return Err(FsError::Invalid(format!("bad name {:?}", String::from_utf8_lossy(name))));
    }
    Ok(())
}

const S_ISGID: u32 = 0o2000;
const MAX_LINKS: u32 = 65000;

/// A mount that goes away (unmounted, or dropped as a crash test's power cut does)
/// leaves no thread of its own writing to the device.
impl Drop for Filesystem {
    fn drop(&mut self) {
        if let Some(j) = &self.journal {
            j.stop_background();
        }
    }
}

impl Filesystem {
    /// Mounts `dev` with lock_nolock. Replays dirty journals first (as the first and only mounter).
    pub fn mount(dev: Arc<dyn BlockDevice>, opts: &MountOptions) -> Result<Filesystem> {
        Filesystem::mount_with(dev, opts, Arc::new(NoLock::default()))
    }

    /// Mounts `dev` taking every inode and rgrp lock through `locks`.
    pub fn mount_with(
        dev: Arc<dyn BlockDevice>,
        opts: &MountOptions,
        locks: Arc<dyn LockModule>,
    ) -> Result<Filesystem> {
        let sb = read_superblock(dev.as_ref())?;
        if opts.cluster != locks.is_cluster() {
            return Err(FsError::Invalid("a cluster mount needs a cluster lock module, and only it".into()));
        }
        if sb.lockproto == LOCKPROTO_DLM && !opts.force_nolock && !opts.cluster {
            return Err(FsError::NotSupported(
                "this filesystem uses lock_dlm: mounting it needs a cluster config (or -o lockproto=lock_nolock for a single node)".into(),
            ));
        }
        if opts.jid >= sb.journals {
            return Err(FsError::Invalid(format!("journal {} does not exist ({} journals)", opts.jid, sb.journals)));
        }
        if opts.read_only {
            for jid in 0..sb.journals {
                let info = concord_journal::info(dev.as_ref(), journal_region(&sb, jid), sb.journal_nonce(jid))?;
                if !info.clean {
                    return Err(FsError::ReadOnly);
                }
            }
        } else if !opts.cluster {
            replay_all(dev.as_ref(), &sb)?;
        }
        let journal = if opts.read_only {
            None
        } else {
            let j = Arc::new(Journal::open(
                dev.clone(),
                journal_region(&sb, opts.jid),
                sb.journal_nonce(opts.jid),
                opts.jid,
            )?);
            // Big batches are written by the journal's own thread, not by the
            // operation that happens to fill them while holding the core lock.
            if let Err(e) = j.commit_in_background() {
                tracing::warn!(error = %e, "no background commit thread: big batches commit in the adding thread");
            }
            Some(j)
        };
        let device_blocks = dev.len() / BLOCK_SIZE as u64;
        let data = Arc::new(DataCache::new(opts.data_cache_bytes));
        let mut core = Core {
            owned: HashMap::default(),
            dirs: HashMap::default(),
            dir_entries: 0,
            data: data.clone(),
            data_seq: HashMap::default(),
            dev: dev.clone(),
            sb: sb.clone(),
            journal: journal.clone(),
            cache: HashMap::default(),
            cache_max: opts.meta_cache_blocks.max(8),
            next_evict_class: 0,
            parsed: HashMap::default(),
            rgrps: Vec::new(),
            pending_free: Default::default(),
            pruned_at: 0,
            rgrp_hint: 0,
            refs: HashMap::default(),
            unlinked: Default::default(),
            last_seq: 0,
            device_blocks,
            locks: locks.clone(),
            held: Vec::new(),
        };
        load_rgrps(&mut core)?;
        let fs = Filesystem {
            core: Mutex::new(core),
            journal,
            locks,
            withdrawn: AtomicBool::new(false),
            sb,
            read_only: opts.read_only,
            dev,
            inflight: Default::default(),
            inflight_cv: Default::default(),
            data,
            kernel: Default::default(),
            iopen: Default::default(),
            iopen_cv: Default::default(),
            notify: Default::default(),
            kernel_names: Default::default(),
            on_withdraw: Default::default(),
            iopen_idle: Default::default(),
            reclaim: Default::default(),
        };
        if opts.cluster {
            // Read without glocks (the rgrp headers): nothing may stay cached.
            fs.core.lock().drop_all();
        }
        if !opts.read_only && !opts.cluster {
            let freed = fs.free_orphans()?;
            if freed > 0 {
                tracing::info!(freed, "freed unlinked inodes left by a crash");
            }
        }
        Ok(fs)
    }

    /// Commits, checkpoints and marks the journal clean.
    pub fn unmount(&self) -> Result<()> {
        if self.journal.is_some() && !self.is_withdrawn() {
            if let Err(e) = self.free_unlinked_at_unmount() {
                tracing::warn!(error = %e, "freeing unlinked inodes at unmount");
            }
        }
        if let Some(j) = &self.journal {
            j.stop_background();
            j.shutdown()?;
        }
        Ok(())
    }

    /// At unmount the kernel's references are gone (it sends no FORGET for the inodes
    /// it still had): inodes unlinked while referenced are freed now rather than left
    /// for the next mount's orphan scan. In a cluster this node also gives back its
    /// iopen glocks, and frees an unlinked inode only if no other node has it (the
    /// last node to have it does, at its own close or unmount).
    fn free_unlinked_at_unmount(&self) -> Result<()> {
        let referenced: Vec<u64> = {
            let mut c = self.core.lock();
            let v = c.refs.keys().copied().collect();
            c.refs.clear();
            v
        };
        if !self.locks.is_cluster() {
            let unlinked: Vec<u64> = self.core.lock().unlinked.iter().copied().collect();
            for ino in unlinked {
                self.free_unlinked(ino)?;
            }
            return Ok(());
        }
        // This node's iopen glocks go back first (holders, then the DLM locks): two
        // nodes unmounting at once, each still holding the other's shared lock,
        // would each refuse the other's exclusive try and leave the inode behind.
        let held: Vec<LockName> =
            self.iopen.lock().drain().filter(|(_, h)| h.is_some()).map(|(ino, _)| LockName::Iopen(ino)).collect();
        self.locks.uncache_all(&held);
        let mut cands: Vec<u64> = self.core.lock().unlinked.iter().copied().collect();
        for ino in referenced {
            match self.getattr(ino) {
                Ok(a) if a.nlink == 0 => cands.push(ino),
                _ => {}
            }
        }
        cands.sort_unstable();
        cands.dedup();
        for ino in cands {
            if !self.free_if_unused(ino)? {
                // Open on another node, which frees it at its own last close.
                self.core.lock().unlinked.remove(&ino);
            }
        }
        Ok(())
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// The root directory's inode number.
    pub fn root(&self) -> u64 {
        self.sb.root_dinode
    }

    pub fn is_withdrawn(&self) -> bool {
        self.withdrawn.load(Ordering::Relaxed)
    }

    /// Runs `f` under the filesystem lock, withdrawing on fatal errors.
    ///
    /// No lock is waited for under the filesystem lock: a lock `f` finds it needs and
    /// cannot take at once ([`FsError::NeedLock`]: an rgrp whose glock is not cached, an
    /// inode another thread holds) ends the attempt; the lock is then taken outside,
    /// with every other lock the earlier attempts needed, in lock order, and `f` runs
    /// again with them held ([`Core::held`]). An attempt that ends so changed nothing:
    /// a transaction is an overlay until its commit.
    fn run<T>(&self, write: bool, mut f: impl FnMut(&mut Core) -> Result<T>) -> Result<T> {
        if self.is_withdrawn() {
            return Err(FsError::Withdrawn);
        }
        if write && self.read_only {
            return Err(FsError::ReadOnly);
        }
        let mut needed: Vec<(LockName, LockMode)> = Vec::new();
        let mut holds: Vec<crate::lock::LockHold> = Vec::new();
        loop {
            let mut core = self.core.lock();
            core.held = std::mem::take(&mut holds);
            let r = f(&mut core);
            holds = std::mem::take(&mut core.held);
            drop(core);
            match r {
                Err(FsError::NeedLock(name, mode)) if needed.len() < MAX_NEEDED_LOCKS => {
                    drop(std::mem::take(&mut holds));
                    match needed.iter_mut().find(|(n, _)| *n == name) {
                        Some((_, m)) if mode == LockMode::Exclusive => *m = mode,
                        Some(_) => {}
                        None => needed.push((name, mode)),
                    }
                    needed.sort_by_key(|(n, _)| *n);
                    for &(n, m) in &needed {
                        holds.push(self.locks.acquire(n, m)?);
                    }
                }
                Err(FsError::NeedLock(name, _)) => {
                    return Err(FsError::Lock(format!(
                        "an operation needed more than {MAX_NEEDED_LOCKS} locks ({name:?})"
                    )));
                }
                r => {
                    if let Err(e) = &r {
                        if e.is_fatal() {
                            self.withdraw(e);
                        }
                    }
                    return r;
                }
            }
        }
    }

    /// Waits until no data write to `[from, to)` of `ino` is in flight.
    fn wait_data(&self, ino: u64, from: u64, to: u64) {
        let mut m = self.inflight.lock();
        while m.get(&ino).is_some_and(|v| v.iter().any(|&(a, b)| a < to && from < b)) {
            self.inflight_cv.wait(&mut m);
        }
    }

    /// Registers a data write to `[from, to)` of `ino` (call with the inode lock held).
    fn begin_data(&self, ino: u64, from: u64, to: u64) -> DataRange<'_> {
        self.inflight.lock().entry(ino).or_default().push((from, to));
        DataRange { fs: self, ino, range: (from, to) }
    }

    fn lock(&self, names: &[u64], mode: LockMode) -> Result<Vec<crate::lock::LockHold>> {
        let mut v: Vec<LockName> = names.iter().map(|&i| LockName::Inode(i)).collect();
        crate::lock::acquire_ordered(self.locks.as_ref(), &mut v, mode)
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let _l = self.lock(&[ino], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dinode_shared(ino)?;
            Ok(attr_of(ino, &d))
        })
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let _l = self.lock(&[parent], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let pd = tx.dir(parent)?;
            if name == b"." {
                return Ok(attr_of(parent, &pd));
            }
            if name == b".." {
                let pp = if pd.parent == 0 { parent } else { pd.parent };
                let d = tx.dinode_shared(pp)?;
                return Ok(attr_of(pp, &d));
            }
            let e = dir::lookup(&mut tx, parent, &pd, name)?.ok_or(FsError::NotFound)?;
            let d = tx.dinode_shared(e.ino)?;
            Ok(attr_of(e.ino, &d))
        })
    }

    /// Creates a regular file, device node, fifo or socket (the type is in `mode`).
    pub fn mknod(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, uid: u32, gid: u32) -> Result<Attr> {
        let t = mode & S_IFMT;
        let mode = if t == 0 { mode | S_IFREG } else { mode };
        if ![S_IFREG, S_IFIFO, S_IFSOCK, S_IFCHR, S_IFBLK].contains(&(mode & S_IFMT)) {
            return Err(FsError::Invalid("mknod of this file type".into()));
        }
        self.create_node(parent, name, mode, rdev, uid, gid, None)
    }

    pub fn create(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        self.create_node(parent, name, S_IFREG | (mode & 0o7777), 0, uid, gid, None)
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        self.create_node(parent, name, S_IFDIR | (mode & 0o7777), 0, uid, gid, None)
    }

    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8], uid: u32, gid: u32) -> Result<Attr> {
        if target.is_empty() || target.len() > SYMLINK_MAX {
            return Err(if target.is_empty() {
                FsError::Invalid("empty symlink".into())
            } else {
                FsError::NameTooLong
            });
        }
        self.create_node(parent, name, S_IFLNK | 0o777, 0, uid, gid, Some(target))
    }

    fn create_node(
        &self,
        parent: u64,
        name: &[u8],
        mut mode: u32,
        rdev: u32,
        uid: u32,
        mut gid: u32,
        target: Option<&[u8]>,
    ) -> Result<Attr> {
        check_name(name)?;
        let _l = self.lock(&[parent], LockMode::Exclusive)?;
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut pd = tx.dir(parent)?;
            if pd.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if dir::lookup(&mut tx, parent, &pd, name)?.is_some() {
                return Err(FsError::Exists(String::from_utf8_lossy(name).into_owned()));
            }
            let is_dir = mode & S_IFMT == S_IFDIR;
            if is_dir && pd.nlink >= MAX_LINKS {
                return Err(FsError::TooManyLinks);
            }
            if pd.mode & S_ISGID != 0 {
                gid = pd.gid;
                if is_dir {
                    mode |= S_ISGID;
                }
            }
            let ino = tx.alloc(parent, BlockState::Dinode)?;
            // The reply's reference takes its iopen glock: asked for now, it travels
            // beside the inode glock's request rather than after it.
            tx.core.locks.prefetch(LockName::Iopen(ino), LockMode::Shared);
            tx.lock_inode_ex(ino)?;
            let g = tx.next_generation(ino)?;
            let t = now();
            let mut d = Dinode::new(mode, uid, gid, t, g);
            d.rdev = rdev;
            if is_dir {
                d.nlink = 2;
                d.parent = parent;
                pd.nlink += 1;
                tx.new_listing(ino);
            }
            if let Some(target) = target {
                if target.len() <= STUFFED_MAX {
                    d.payload[..target.len()].copy_from_slice(target);
                } else {
                    // A long target gets a data block of its own, written before the
                    // commit that makes the dinode point at it (ordered).
                    let a = tx.alloc(ino, BlockState::Used)?;
                    let mut b = vec![0u8; BLOCK_SIZE];
                    b[..target.len()].copy_from_slice(target);
                    tx.core.dev.write_at(a * BLOCK_SIZE as u64, &b)?;
                    tx.ordered = true;
                    d.height = 1;
                    d.set_ptr(0, a);
                    d.blocks = 1;
                }
                d.size = target.len() as u64;
            }
            dir::add(&mut tx, parent, &mut pd, DirEntry::new(name, ino, dtype_of(mode)))?;
            pd.mtime = t;
            pd.ctime = t;
            tx.put_dinode(parent, &pd);
            tx.put_dinode(ino, &d);
            tx.commit()?;
            Ok(attr_of(ino, &d))
        })
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let _l = self.lock(&[ino], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dinode_shared(ino)?;
            if !d.is_symlink() {
                return Err(FsError::Invalid("not a symlink".into()));
            }
            let len = d.size as usize;
            if d.height == 0 {
                return Ok(d.payload[..len].to_vec());
            }
            let a = d.ptr(0);
            if a == 0 || len > BLOCK_SIZE {
                return Err(FsError::Corrupt(bad(ino, "symlink", "long target without its block")));
            }
            let mut b = vec![0u8; BLOCK_SIZE];
            tx.core.dev.read_at(a * BLOCK_SIZE as u64, &mut b)?;
            b.truncate(len);
            Ok(b)
        })
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr> {
        check_name(name)?;
        let _l = self.lock(&[parent, ino], LockMode::Exclusive)?;
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut pd = tx.dir(parent)?;
            let mut d = tx.dinode(ino)?;
            if d.is_dir() {
                return Err(FsError::NotSupported("hard links to directories".into()));
            }
            if d.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if d.nlink >= MAX_LINKS {
                return Err(FsError::TooManyLinks);
            }
            if dir::lookup(&mut tx, parent, &pd, name)?.is_some() {
                return Err(FsError::Exists(String::from_utf8_lossy(name).into_owned()));
            }
            let t = now();
            dir::add(&mut tx, parent, &mut pd, DirEntry::new(name, ino, dtype_of(d.mode)))?;
            d.nlink += 1;
            d.ctime = t;
            pd.mtime = t;
            pd.ctime = t;
            tx.put_dinode(parent, &pd);
            tx.put_dinode(ino, &d);
            tx.commit()?;
            Ok(attr_of(ino, &d))
        })
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &[u8], want_dir: bool) -> Result<()> {
        if name == b"." || name == b".." {
            return Err(if want_dir { FsError::Invalid("rmdir of . or ..".into()) } else { FsError::IsDir });
        }
        let _l = self.lock(&[parent], LockMode::Exclusive)?;
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut pd = tx.dir(parent)?;
            let e = dir::lookup(&mut tx, parent, &pd, name)?.ok_or(FsError::NotFound)?;
            tx.lock_inode_ex(e.ino)?;
            let mut d = tx.dinode(e.ino)?;
            if want_dir && !d.is_dir() {
                return Err(FsError::NotDir);
            }
            if !want_dir && d.is_dir() {
                return Err(FsError::IsDir);
            }
            if want_dir && d.dir_entries != 0 {
                return Err(FsError::NotEmpty);
            }
            dir::remove(&mut tx, parent, &mut pd, name)?;
            let t = now();
            pd.mtime = t;
            pd.ctime = t;
            if want_dir {
                pd.nlink -= 1;
            }
            tx.put_dinode(parent, &pd);
            drop_link(&mut tx, e.ino, &mut d, t)?;
            tx.commit()?;
            Ok(())
        })?;
        self.free_unlinked_now()
    }

    pub fn rename(&self, p1: u64, n1: &[u8], p2: u64, n2: &[u8], flags: RenameFlags) -> Result<()> {
        check_name(n2)?;
        check_name(n1)?;
        if flags.exchange && flags.noreplace {
            return Err(FsError::Invalid("RENAME_EXCHANGE with RENAME_NOREPLACE".into()));
        }
        let _r = self.locks.acquire(LockName::Rename, LockMode::Exclusive)?;
        let _l = self.lock(&[p1, p2], LockMode::Exclusive)?;
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            rename_tx(&mut tx, p1, n1, p2, n2, flags)?;
            tx.commit()?;
            Ok(())
        })?;
        self.free_unlinked_now()
    }

    /// Notes an open handle (unlinked inodes stay until the last release).
    pub fn open(&self, ino: u64) -> Result<Attr> {
        let a = self.getattr(ino)?;
        *self.core.lock().refs.entry(ino).or_insert(0) += 1;
        self.hold_iopen(ino)?;
        Ok(a)
    }

    /// Drops an open handle; frees the inode when it was the last and it is unlinked.
    pub fn release(&self, ino: u64) -> Result<()> {
        self.unref(ino, 1)
    }

    /// Takes `n` references to an inode without opening it (the kernel's lookup
    /// count, through FUSE): an unlinked inode lives until every reference is gone.
    pub fn reference(&self, ino: u64, n: u64) {
        *self.core.lock().refs.entry(ino).or_insert(0) += n as u32;
        if let Err(e) = self.hold_iopen(ino) {
            tracing::warn!(ino, error = %e, "iopen glock not taken: another node's last close may free this inode");
        }
    }

    /// Drops `n` references (FUSE forget); frees the inode when none is left and it is
    /// unlinked.
    pub fn forget(&self, ino: u64, n: u64) -> Result<()> {
        self.unref(ino, n)
    }

    fn unref(&self, ino: u64, n: u64) -> Result<()> {
        if !self.locks.is_cluster() {
            if drop_refs(&mut self.core.lock(), ino, n) {
                self.free_unlinked(ino)?;
            }
            return Ok(());
        }
        let last = {
            let mut c = self.core.lock();
            drop_refs(&mut c, ino, n);
            !c.refs.contains_key(&ino)
        };
        if last {
            // This node no longer has the inode: its iopen glock goes, and if its last
            // link went (here or on another node) and no node has it any more, it is
            // freed here.
            // The holder goes; the glock stays cached shared, so that the inode's next
            // lookup here costs no DLM request. Another node's exclusive try (TRY_1CB)
            // makes this node give it back at once.
            {
                let mut m = self.iopen.lock();
                // A thread still taking it sees the references gone and drops it.
                if m.get(&ino).is_some_and(Option::is_some) {
                    drop(m.remove(&ino));
                }
            }
            self.iopen_went_idle(ino);
            let unlinked = match self.getattr(ino) {
                Ok(a) => a.nlink == 0,
                Err(FsError::NotFound | FsError::Stale(_)) => false,
                Err(e) => return Err(e),
            };
            if unlinked && !self.free_if_unused(ino)? {
                self.free_later(ino);
            }
        }
        Ok(())
    }

    /// Notes that this node's iopen glock of `ino` has no holder left; gives the
    /// oldest idle ones back to the DLM past [`IOPEN_IDLE_MAX`].
    fn iopen_went_idle(&self, ino: u64) {
        let old: Vec<u64> = {
            let mut q = self.iopen_idle.lock();
            q.push_back(ino);
            let over = q.len().saturating_sub(IOPEN_IDLE_MAX);
            q.drain(..over).collect()
        };
        for ino in old {
            // Does nothing while the inode is held again.
            self.locks.uncache_soon(LockName::Iopen(ino));
        }
    }

    /// Cluster mounts: starts the reclaim thread, which tries again to free unlinked
    /// inodes whose exclusive iopen try failed ([`RECLAIM_RETRY`]). It holds the
    /// filesystem weakly and ends with it.
    pub fn start_reclaim(self: &Arc<Self>) {
        if !self.locks.is_cluster() || self.reclaim.get().is_some() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("reclaim".into()).spawn(move || {
            use std::cmp::Reverse;
            let mut due: std::collections::BinaryHeap<Reverse<(Instant, u64, usize)>> = Default::default();
            loop {
                let wait = due.peek().map_or(Duration::from_secs(3600), |Reverse((t, _, _))| {
                    t.saturating_duration_since(Instant::now())
                });
                match rx.recv_timeout(wait) {
                    Ok(ino) => due.push(Reverse((Instant::now() + RECLAIM_RETRY[0], ino, 0))),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                while due.peek().is_some_and(|Reverse((t, _, _))| *t <= Instant::now()) {
                    let Some(Reverse((_, ino, attempt))) = due.pop() else { break };
                    let Some(fs) = weak.upgrade() else { return };
                    if fs.is_withdrawn() {
                        return;
                    }
                    match fs.free_if_unused(ino) {
                        Ok(true) => {}
                        Ok(false) if attempt + 1 < RECLAIM_RETRY.len() => {
                            due.push(Reverse((Instant::now() + RECLAIM_RETRY[attempt + 1], ino, attempt + 1)));
                        }
                        Ok(false) => {
                            tracing::debug!(ino, "unlinked inode still open on another node: freed there");
                            fs.core.lock().unlinked.remove(&ino);
                        }
                        Err(e) => tracing::warn!(ino, error = %e, "freeing an unlinked inode failed"),
                    }
                }
            }
        });
        match spawned {
            Ok(_) => {
                let _ = self.reclaim.set(parking_lot::Mutex::new(tx));
            }
            Err(e) => tracing::warn!(error = %e, "no reclaim thread: unlinked inodes in use elsewhere are freed there"),
        }
    }

    /// An unlinked inode that could not be freed now: the reclaim thread tries again;
    /// without it, the node that has the inode open frees it.
    fn free_later(&self, ino: u64) {
        if let Some(tx) = self.reclaim.get() {
            if tx.lock().send(ino).is_ok() {
                return;
            }
        }
        self.core.lock().unlinked.remove(&ino);
    }

    /// Cluster mounts: holds inode `ino`'s iopen glock shared while this node has the
    /// inode open or referenced (GFS2's i_iopen_gh), so that another node's last close
    /// does not free it under us.
    fn hold_iopen(&self, ino: u64) -> Result<()> {
        if !self.locks.is_cluster() {
            return Ok(());
        }
        // One thread per inode asks for it: a second request queued on the glock
        // while another node's BAST has a demote pending (which waits for this node's
        // holder, kept as long as the kernel has the inode) would wait forever.
        {
            let mut m = self.iopen.lock();
            loop {
                match m.get(&ino) {
                    Some(Some(_)) => return Ok(()),
                    Some(None) => self.iopen_cv.wait(&mut m),
                    None => {
                        m.insert(ino, None);
                        break;
                    }
                }
            }
        }
        let r = self.locks.acquire(LockName::Iopen(ino), LockMode::Shared);
        let mut m = self.iopen.lock();
        let held = self.core.lock().refs.contains_key(&ino);
        let r = match r {
            Ok(h) if held => {
                m.insert(ino, Some(h));
                Ok(())
            }
            Ok(_) => {
                m.remove(&ino);
                Ok(())
            }
            Err(e) => {
                m.remove(&ino);
                Err(e)
            }
        };
        drop(m);
        self.iopen_cv.notify_all();
        r
    }

    /// Cluster mounts, after an unlink or a rename that took an inode's last link:
    /// frees it if no node has it (otherwise the last node to have it does).
    fn free_unlinked_now(&self) -> Result<()> {
        if !self.locks.is_cluster() {
            return Ok(());
        }
        let cands: Vec<u64> = {
            let c = self.core.lock();
            c.unlinked.iter().filter(|i| !c.refs.contains_key(i)).copied().collect()
        };
        for ino in cands {
            if !self.free_if_unused(ino)? {
                self.free_later(ino);
            }
        }
        Ok(())
    }

    /// Cluster mounts: frees unlinked inode `ino` if no node has it: this node has no
    /// reference and gets its iopen glock exclusive without waiting (a node that has it
    /// open holds it shared, and frees it at its own last close). False if another node
    /// holds the iopen glock (open there, or only cached: the try's BAST makes such a
    /// node give it back, so a later try may succeed); true when freed or when this
    /// node has the inode again (its own last close frees it).
    fn free_if_unused(&self, ino: u64) -> Result<bool> {
        if self.core.lock().refs.contains_key(&ino) {
            return Ok(true);
        }
        let Some(h) = self.locks.try_acquire(LockName::Iopen(ino), LockMode::Exclusive)? else {
            tracing::debug!(ino, "unlinked inode held on another node: not freed now");
            return Ok(false);
        };
        tracing::debug!(ino, "unlinked inode used nowhere: freeing it");
        // The glock stays cached exclusive: a node that makes an inode with this
        // number again takes it from here through the DLM.
        let r = self.free_unlinked(ino);
        drop(h);
        r.map(|()| true)
    }

    /// Frees inode `ino`, whose last reference just went, if its last link went too.
    fn free_unlinked(&self, ino: u64) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _l = self.lock(&[ino], LockMode::Exclusive)?;
        self.wait_data(ino, 0, u64::MAX);
        self.run(true, |c| {
            c.unlinked.remove(&ino);
            let mut tx = Tx::new(c);
            let d = match tx.dinode(ino) {
                Ok(d) => d,
                Err(FsError::Stale(_)) => return Ok(()),
                Err(e) => return Err(e),
            };
            if d.nlink != 0 {
                return Ok(());
            }
            if tx.core.locks.is_cluster() {
                // Under its rgrp's glock, the bitmap says whether another node freed
                // it already (dinode reads in a cluster do not look at the bitmap).
                let rg = tx.core.rgrp_of(ino).map(|ri| tx.core.rgrps[ri].e.addr).ok_or(FsError::Stale(ino))?;
                tx.lock_rgrp(rg)?;
                if tx.state_of(ino)? != BlockState::Unlinked {
                    return Ok(());
                }
            }
            free_inode(&mut tx, ino, d)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// Reads file bytes for a reader the kernel caches for (buffered I/O): served from
    /// Concord's data cache where it has the blocks. Only a read of one block is added to
    /// it: the kernel asks for more than that from sequential readers (readahead), whose
    /// data would only push everything else out, while a random reader's block is worth
    /// keeping after the kernel drops its page.
    pub fn read(&self, ino: u64, off: u64, len: usize) -> Result<Vec<u8>> {
        self.read_vec(ino, off, len, false)
    }

    /// Reads file bytes for a reader the kernel does not cache for (O_DIRECT): a small
    /// read (up to 128 KiB) is kept in Concord's data cache; a larger one is read from
    /// the device in pieces in parallel and not kept.
    pub fn read_direct(&self, ino: u64, off: u64, len: usize) -> Result<Vec<u8>> {
        self.read_vec(ino, off, len, true)
    }

    /// [`read_then`](Self::read_then) into a vector.
    fn read_vec(&self, ino: u64, off: u64, len: usize, direct: bool) -> Result<Vec<u8>> {
        let mut got = Err(FsError::Invalid("no answer".into()));
        self.read_then(ino, off, len, direct, |r| got = r.map(<[u8]>::to_vec));
        got
    }

    /// [`read`](Self::read) (or, with `direct`, [`read_direct`](Self::read_direct))
    /// that hands the bytes, or the error, to `answer`, called exactly once. The blocks
    /// worth keeping go into the data cache only after `answer` returned: a FUSE reader
    /// has its reply by then and sends its next request to another thread, while this
    /// one copies (in a cold random read, the fresh memory of a growing cache was the
    /// biggest cost after the device read).
    pub fn read_then(&self, ino: u64, off: u64, len: usize, direct: bool, answer: impl FnOnce(Result<&[u8]>)) {
        let _l = match self.lock(&[ino], LockMode::Shared) {
            Ok(l) => l,
            Err(e) => return answer(Err(e)),
        };
        match self.read_locked(ino, off, len) {
            Err(e) => answer(Err(e)),
            Ok((out, fetched, eof)) => {
                answer(Ok(&out));
                // Small O_DIRECT reads and single-block buffered ones are kept;
                // streaming ones would only push out everything else (and copying them
                // in halved their speed here). The inode lock is still held: no write
                // can change these blocks before they are in.
                let keep = if direct { len <= CACHE_READ_MAX } else { len as u64 <= BS };
                if keep && self.data.enabled() {
                    self.data.insert(ino, kept_blocks(&fetched, off, &out, eof));
                }
            }
        }
    }

    /// The read under the inode lock: the bytes, the runs of blocks read from the device
    /// (first logical block, count), and whether the read was cut at the end of the file.
    fn read_locked(&self, ino: u64, off: u64, len: usize) -> Result<(Vec<u8>, Vec<(u64, u64)>, bool)> {
        let want = off.saturating_add(len as u64);
        // In-flight writes to the range finish first, so that nothing stale enters the
        // cache.
        self.wait_data(ino, off / BS * BS, want.div_ceil(BS).saturating_mul(BS));
        let plan = self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dinode_shared(ino)?;
            if d.is_dir() {
                return Err(FsError::IsDir);
            }
            if off >= d.size {
                return Ok(ReadPlan::Bytes(Vec::new()));
            }
            let end = d.size.min(want);
            if d.height == 0 {
                return Ok(ReadPlan::Bytes(d.payload[off as usize..end as usize].to_vec()));
            }
            Ok(ReadPlan::Extents(end, extents(&mut tx, ino, &d, off, end)?))
        })?;
        // The device reads happen outside the filesystem lock; the inode lock keeps
        // the mapping valid meanwhile.
        match plan {
            ReadPlan::Bytes(v) => Ok((v, Vec::new(), true)),
            ReadPlan::Extents(end, ext) => {
                let mut out = vec![0u8; (end - off) as usize];
                let fetched = self.io(read_cached(&self.dev, &self.data, ino, &ext, off, &mut out))?;
                Ok((out, fetched, end < want))
            }
        }
    }

    /// Device I/O outside the filesystem lock: an error withdraws.
    fn io<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.withdraw(e);
        }
        r
    }

    /// Stops all writing after an I/O error or corruption, until remounted.
    fn withdraw(&self, e: &FsError) {
        if self.withdrawn.swap(true, Ordering::SeqCst) {
            return;
        }
        tracing::error!(error = %e, "withdrawing: the filesystem stops writing until remounted");
        if let Some(f) = self.on_withdraw.get() {
            (f.0)(&e.to_string());
        }
    }

    /// Cluster mounts: what a withdraw must also do (close the device gate, give up
    /// the node's glocks and journal so that the others recover it). Called once, on
    /// the withdrawing thread, perhaps with the metadata mutex held: it must not wait
    /// for the DLM.
    pub fn set_on_withdraw(&self, f: Box<dyn Fn(&str) + Send + Sync>) {
        let _ = self.on_withdraw.set(WithdrawHook(f));
    }

    pub fn write(&self, ino: u64, off: u64, data: &[u8]) -> Result<usize> {
        let l = self.lock(&[ino], LockMode::Exclusive)?;
        let end = off.checked_add(data.len() as u64).ok_or(FsError::TooBig)?;
        if end > max_file_size(MAX_HEIGHT) {
            return Err(FsError::TooBig);
        }
        // Whole blocks: two writes into one block must not interleave their
        // read-modify-write of it.
        self.wait_data(ino, off / BS * BS, end.div_ceil(BS) * BS);
        let planned = self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut d = tx.dinode(ino)?;
            if d.is_dir() {
                return Err(FsError::IsDir);
            }
            if data.is_empty() {
                return Ok(None);
            }
            let mut phys = Vec::new();
            let (old_size, was_stuffed) = (d.size, d.height == 0);
            if d.height == 0 && end <= STUFFED_MAX as u64 {
                d.payload[off as usize..end as usize].copy_from_slice(data);
            } else {
                unstuff(&mut tx, ino, &mut d)?;
                zero_gap(&mut tx, ino, &d, d.size, off)?;
                phys = map_for_write(&mut tx, ino, &mut d, off, end)?;
            }
            let t = now();
            d.size = d.size.max(end);
            d.mtime = t;
            d.ctime = t;
            tx.put_dinode(ino, &d);
            // Newly allocated blocks: the journal batch waits for their data
            // (ordered); overwrites may reach the disk before or after the inode.
            let fresh = phys.iter().any(|(_, f)| *f);
            // The cached copies of these blocks are stale from here on (readers wait
            // for the in-flight range before they cache anything again).
            tx.core.data.drop_range(ino, off / BS, end.div_ceil(BS));
            let (seq, guard) = if fresh { tx.commit_ordered()? } else { (tx.commit()?, None) };
            if fresh || was_stuffed || end > old_size {
                c.data_changed(ino, seq);
            }
            Ok(Some((phys, guard)))
        })?;
        let Some((phys, guard)) = planned else { return Ok(0) };
        if !phys.is_empty() {
            // The data I/O happens outside the filesystem lock and, once the range is
            // registered, outside the inode lock: other writes to this file proceed,
            // and readers and writers of these blocks wait for the range.
            let _range = self.begin_data(ino, off / BS * BS, end.div_ceil(BS) * BS);
            drop(l);
            let r = write_blocks(self.dev.as_ref(), &phys, off, data);
            if r.is_err() {
                if let Some(g) = guard {
                    g.failed();
                }
                return self.io(r).map(|_| 0);
            }
        }
        Ok(data.len())
    }

    pub fn setattr(&self, ino: u64, s: &SetAttr) -> Result<Attr> {
        let _l = self.lock(&[ino], LockMode::Exclusive)?;
        if s.size.is_some() {
            self.wait_data(ino, 0, u64::MAX);
        }
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut d = tx.dinode(ino)?;
            let t = now();
            if let Some(m) = s.mode {
                d.mode = (d.mode & S_IFMT) | (m & 0o7777);
            }
            if let Some(u) = s.uid {
                d.uid = u;
            }
            if let Some(g) = s.gid {
                d.gid = g;
            }
            if let Some(size) = s.size {
                if d.is_dir() {
                    return Err(FsError::IsDir);
                }
                if !d.is_reg() {
                    return Err(FsError::Invalid("truncate of a special file".into()));
                }
                truncate(&mut tx, ino, &mut d, size)?;
                d.mtime = t;
            }
            let pick = |st: SetTime| match st {
                SetTime::Now => t,
                SetTime::At(x) => x,
            };
            if let Some(a) = s.atime {
                d.atime = pick(a);
            }
            if let Some(m) = s.mtime {
                d.mtime = pick(m);
            }
            d.ctime = t;
            // The kernel's time flush after the last unlink of a regular file (in
            // writeback-cache mode the kernel owns a regular file's mtime and ctime and
            // writes them back with a SETATTR of the mtime after every unlink, rename and
            // link). Nobody can read these times again: the kernel keeps its own while it
            // holds the inode, and the inode is freed when it lets go (or at the next
            // mount). So no transaction for them.
            let times_only = s.mode.is_none() && s.uid.is_none() && s.gid.is_none() && s.size.is_none();
            if times_only && s.atime.is_none() && d.nlink == 0 && d.is_reg() {
                return Ok(attr_of(ino, &d));
            }
            tx.put_dinode(ino, &d);
            let seq = tx.commit()?;
            if s.size.is_some() {
                c.data_changed(ino, seq);
            }
            Ok(attr_of(ino, &d))
        })
    }

    /// fallocate(2): allocate (zeroed) blocks, or punch a hole (with `keep_size`).
    pub fn fallocate(&self, ino: u64, off: u64, len: u64, keep_size: bool, punch_hole: bool) -> Result<()> {
        if len == 0 {
            return Err(FsError::Invalid("fallocate of length 0".into()));
        }
        if punch_hole && !keep_size {
            return Err(FsError::NotSupported("PUNCH_HOLE without KEEP_SIZE".into()));
        }
        let end = off.checked_add(len).ok_or(FsError::TooBig)?;
        if end > max_file_size(MAX_HEIGHT) {
            return Err(FsError::TooBig);
        }
        let _l = self.lock(&[ino], LockMode::Exclusive)?;
        self.wait_data(ino, 0, u64::MAX);
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut d = tx.dinode(ino)?;
            if !d.is_reg() {
                return Err(if d.is_dir() {
                    FsError::IsDir
                } else {
                    FsError::Invalid("fallocate of a special file".into())
                });
            }
            let t = now();
            if punch_hole {
                let to = end.min(d.size);
                punch(&mut tx, ino, &mut d, off, to)?;
            } else {
                if d.height == 0 && end > STUFFED_MAX as u64 {
                    unstuff(&mut tx, ino, &mut d)?;
                }
                if !keep_size && end > d.size {
                    zero_gap(&mut tx, ino, &d, d.size, end)?;
                }
                if d.height > 0 {
                    allocate_zeroed(&mut tx, ino, &mut d, off, end)?;
                }
                if !keep_size && end > d.size {
                    d.size = end;
                }
            }
            d.ctime = t;
            d.mtime = t;
            tx.put_dinode(ino, &d);
            let seq = tx.commit()?;
            c.data_changed(ino, seq);
            Ok(())
        })
    }

    /// Next offset at or after `off` holding data (`data`) or a hole (`!data`), as
    /// SEEK_DATA / SEEK_HOLE; None past the end for SEEK_DATA.
    pub fn seek(&self, ino: u64, off: u64, data: bool) -> Result<Option<u64>> {
        let _l = self.lock(&[ino], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dinode_shared(ino)?;
            if off >= d.size {
                return Ok(None);
            }
            if d.height == 0 {
                return Ok(Some(if data { off } else { d.size }));
            }
            let mut lb = off / BLOCK_SIZE as u64;
            let last = d.size.div_ceil(BLOCK_SIZE as u64);
            while lb < last {
                let (p, n) = bmap::lookup_extent(&mut tx, ino, &d, lb, last - lb)?;
                if (p != 0) == data {
                    return Ok(Some((lb * BLOCK_SIZE as u64).max(off)));
                }
                lb += n;
            }
            Ok(if data { None } else { Some(d.size) })
        })
    }

    pub fn readdir(&self, ino: u64, after: u64, max: usize) -> Result<Vec<DirItem>> {
        let all = self.listing(ino)?;
        let mut out: Vec<DirItem> = Vec::new();
        // At least `max` entries, and never half of a run of equal cookies.
        for e in all.after(after) {
            if out.len() >= max.max(1) && out.last().is_some_and(|l| l.cookie != e.hash) {
                break;
            }
            out.push(DirItem { cookie: e.hash, name: e.name.to_vec(), ino: e.ino, dtype: e.dtype });
        }
        Ok(out)
    }

    /// Every entry of directory `ino` in cookie order (`DirEntry::hash`): a snapshot,
    /// cached until the directory changes.
    pub fn listing(&self, ino: u64) -> Result<Arc<Listing>> {
        let _l = self.lock(&[ino], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dir(ino)?;
            if let Some(l) = tx.core.dirs.get(&ino) {
                return Ok(l.clone());
            }
            let l = Arc::new(dir::list_all(&mut tx, ino, &d)?);
            tx.core.cache_listing(ino, l.clone());
            Ok(l)
        })
    }

    /// The parent of a directory (itself for the root).
    pub fn parent_of(&self, ino: u64) -> Result<u64> {
        self.run(false, |c| {
            let d = Tx::new(c).dinode_shared(ino)?;
            Ok(if d.parent == 0 { ino } else { d.parent })
        })
    }

    pub fn statfs(&self) -> Result<StatFs> {
        if self.is_cluster() {
            return self.statfs_cluster();
        }
        self.run(false, |c| {
            c.prune_pending();
            let blocks: u64 = c.rgrps.iter().map(|r| u64::from(r.e.data_blocks)).sum();
            let bfree: u64 =
                c.rgrps.iter().map(|r| u64::from(r.free)).sum::<u64>().saturating_sub(c.pending_free.len() as u64);
            Ok(StatFs {
                blocks,
                bfree,
                files: blocks,
                ffree: bfree,
                bsize: BLOCK_SIZE as u32,
                namelen: NAME_MAX as u32,
            })
        })
    }

    /// statfs in a cluster: other nodes allocate and free too, so the free count is
    /// the sum of the rgrp headers as the device has them (each node writes its
    /// headers home at every demote of an rgrp glock and at each checkpoint), and this
    /// node's own rgrps as it has them. Like GFS2's statfs without `statfs_slow`, it
    /// may lag what other nodes did since their last write-back. (GFS2 keeps per-node
    /// statfs change files for this; Concord's exist on disk and are not used yet.)
    fn statfs_cluster(&self) -> Result<StatFs> {
        let rgrps: Vec<(crate::format::RindexEntry, u32)> = {
            let c = self.core.lock();
            c.rgrps.iter().map(|r| (r.e, r.free)).collect()
        };
        let mut blocks = 0u64;
        let mut bfree = 0u64;
        let mut b = vec![0u8; BLOCK_SIZE];
        for (e, mine) in rgrps {
            blocks += u64::from(e.data_blocks);
            let held = self.locks.try_now(LockName::Rgrp(e.addr), LockMode::Shared).ok().flatten();
            if held.is_some() {
                bfree += u64::from(mine);
                continue;
            }
            self.dev.read_at(e.addr * BLOCK_SIZE as u64, &mut b)?;
            let block: &Block = b.as_slice().try_into().map_err(|_| FsError::Invalid("block size".into()))?;
            match RgrpHeader::decode(block, e.addr) {
                Ok(h) => bfree += u64::from(h.free),
                Err(_) => bfree += u64::from(mine),
            }
        }
        Ok(StatFs { blocks, bfree, files: blocks, ffree: bfree, bsize: BLOCK_SIZE as u32, namelen: NAME_MAX as u32 })
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let _l = self.lock(&[ino], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dinode_shared(ino)?;
            xattr::get(&mut tx, ino, &d, name)
        })
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>> {
        let _l = self.lock(&[ino], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dinode_shared(ino)?;
            Ok(xattr::all(&mut tx, ino, &d)?.into_iter().map(|(n, _)| n).collect())
        })
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], how: XattrSet) -> Result<()> {
        xattr::check_name(name)?;
        let _l = self.lock(&[ino], LockMode::Exclusive)?;
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut d = tx.dinode(ino)?;
            xattr::set(&mut tx, ino, &mut d, name, Some(value), how)?;
            d.ctime = now();
            tx.put_dinode(ino, &d);
            tx.commit()?;
            Ok(())
        })
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        let _l = self.lock(&[ino], LockMode::Exclusive)?;
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut d = tx.dinode(ino)?;
            xattr::set(&mut tx, ino, &mut d, name, None, XattrSet::Replace)?;
            d.ctime = now();
            tx.put_dinode(ino, &d);
            tx.commit()?;
            Ok(())
        })
    }

    /// Makes every change so far durable (fsync and syncfs: the log is shared).
    pub fn fsync(&self) -> Result<()> {
        if self.is_withdrawn() {
            return Err(FsError::Withdrawn);
        }
        let Some(j) = &self.journal else {
            return Ok(());
        };
        let seq = self.core.lock().last_seq;
        if let Err(e) = j.commit(seq) {
            let e = FsError::from(e);
            self.withdraw(&e);
            return Err(e);
        }
        Ok(())
    }

    /// fsync(2) or fdatasync(2) of one inode. The log is shared, so an fsync commits
    /// everything so far. An fdatasync commits only when the inode's size, block map or
    /// stuffed data changed since the last commit; otherwise its data, written in place
    /// before the request came, needs only a device flush.
    pub fn fsync_inode(&self, ino: u64, datasync: bool) -> Result<()> {
        if let (true, false, Some(j)) = (datasync, self.is_withdrawn(), &self.journal) {
            if self.core.lock().datasync_seq(ino) <= j.stats().committed_seq {
                return self.io(self.dev.flush().map_err(FsError::from));
            }
        }
        self.fsync()
    }

    /// Drops everything cached for `ino`: its metadata blocks, its file data and the
    /// kernel's attributes and pages (through [`KernelCache`]). The next access reads
    /// the device (or the journal). What a glock demote does in the cluster mode; call
    /// it while no operation on `ino` is running.
    pub fn drop_caches(&self, ino: u64) {
        self.core.lock().drop_inode(ino);
        if let Some(k) = self.kernel.get() {
            k.inval_inode(ino);
        }
    }

    /// Drops the kernel's cached lookup of `name` in `parent`, and what Concord caches
    /// for `parent`.
    pub fn drop_entry(&self, parent: u64, name: &[u8]) {
        self.core.lock().drop_inode(parent);
        if let Some(k) = self.kernel.get() {
            k.inval_entry(parent, name);
        }
    }

    /// Connects the kernel's caches (once, when the FUSE session is up).
    pub fn set_kernel_cache(&self, k: Arc<dyn KernelCache>) {
        if self.is_cluster() {
            // Demotes reach the kernel through one thread of their own: a notification
            // can wait on a page or inode lock that a FUSE request holds while it waits
            // for the glock being demoted (docs/internals/glocks.md).
            let (tx, rx) = std::sync::mpsc::channel::<(Notice, Option<std::sync::mpsc::Sender<()>>)>();
            let kc = k.clone();
            let spawned = std::thread::Builder::new().name("fuse-notify".into()).spawn(move || {
                for (notice, done) in rx {
                    match notice {
                        Notice::Inode(ino) => kc.inval_inode(ino),
                        Notice::Entry(dir, name) => kc.inval_entry(dir, &name),
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
            });
            match spawned {
                Ok(_) => {
                    let _ = self.notify.set(parking_lot::Mutex::new(tx));
                }
                Err(e) => tracing::warn!(error = %e, "no fuse-notify thread: kernel invalidations run inline"),
            }
        }
        let _ = self.kernel.set(k);
    }

    /// Tells the kernel to forget `names` (directory, name) and then inode `ino`'s
    /// attributes and pages, through the fuse-notify thread in a cluster, waiting for
    /// it (if `wait`) at most [`KERNEL_INVAL_WAIT`] (an invalidation can wait for a page or
    /// directory lock that a FUSE request holds while it waits for the glock being
    /// demoted: that request re-reads under the glock when it gets it, and the
    /// invalidation completes after it).
    fn kernel_invalidate(&self, names: Vec<(u64, Box<[u8]>)>, ino: u64, wait: bool) {
        if let Some(n) = self.notify.get() {
            let (done, done_rx) = std::sync::mpsc::channel();
            let sent = {
                let q = n.lock();
                names.into_iter().all(|(d, name)| q.send((Notice::Entry(d, name), None)).is_ok())
                    && q.send((Notice::Inode(ino), Some(done))).is_ok()
            };
            if sent && wait {
                let _ = done_rx.recv_timeout(KERNEL_INVAL_WAIT);
            }
            return;
        }
        if let Some(k) = self.kernel.get() {
            for (d, name) in names {
                k.inval_entry(d, &name);
            }
            k.inval_inode(ino);
        }
    }

    /// Cluster mounts: the epoch of directory `dir` (how many times its glock left
    /// this node), read before an operation that lets the kernel cache names in it,
    /// for [`note_entries`](Self::note_entries) after.
    pub fn entry_epoch(&self, dir: u64) -> u64 {
        if !self.is_cluster() {
            return 0;
        }
        self.kernel_names.lock().epoch.get(&dir).copied().unwrap_or(0)
    }

    /// Cluster mounts: the kernel is about to be given `names` in `dir` (positive or
    /// negative entries it keeps for the entry TTL). They are invalidated when the
    /// directory's glock next leaves this node; if it left since `epoch` (the reply's
    /// content may be stale already), they are invalidated now, after the reply (the
    /// kernel's invalidation waits for the directory lock the request holds).
    pub fn note_entries<'a>(&self, dir: u64, epoch: u64, names: impl IntoIterator<Item = &'a [u8]>) {
        if !self.is_cluster() {
            return;
        }
        let mut k = self.kernel_names.lock();
        if k.epoch.get(&dir).copied().unwrap_or(0) == epoch {
            let set = k.names.entry(dir).or_default();
            for n in names {
                if !set.contains(n) {
                    set.insert(n.into());
                }
            }
            return;
        }
        drop(k);
        match self.notify.get() {
            Some(q) => {
                let q = q.lock();
                for n in names {
                    let _ = q.send((Notice::Entry(dir, n.into()), None));
                }
            }
            None => {
                if let Some(k) = self.kernel.get() {
                    for n in names {
                        k.inval_entry(dir, n);
                    }
                }
            }
        }
    }

    /// Inodes with references: looked up by the kernel (and not yet forgotten) or open.
    pub fn referenced_inodes(&self) -> usize {
        self.core.lock().refs.len()
    }

    /// Blocks of file data in Concord's own cache.
    pub fn cached_data_blocks(&self) -> usize {
        self.data.len()
    }

    /// Metadata blocks in Concord's block cache.
    pub fn cached_meta_blocks(&self) -> usize {
        self.core.lock().cache.len()
    }

    /// Writes the log home and advances the tail.
    pub fn checkpoint(&self) -> Result<()> {
        if let Some(j) = &self.journal {
            j.commit(u64::MAX)?;
            j.checkpoint()?;
        }
        Ok(())
    }

    // ---- cluster: what glock demotes and journal recovery ask of the filesystem -------

    /// Whether this is a cluster (`lock_dlm`) mount.
    pub fn is_cluster(&self) -> bool {
        self.locks.is_cluster()
    }

    /// Before a glock held EX leaves this node: every change made under it reaches its
    /// home on the device, and this node's journal no longer holds it, so that a later
    /// replay of this journal can never overwrite what another node writes there next.
    ///
    /// Data writes of an inode in flight are waited for, then the journal commits and
    /// checkpoints whole (every logged block written in place, the tail advanced past
    /// it). GFS2 writes back only the glock's own blocks and logs revokes for them
    /// (`ail_empty_gl`); a whole checkpoint gives the same guarantee for every glock at
    /// once, at the cost of writing more per demote.
    pub fn sync_glock(&self, name: LockName) -> Result<()> {
        match name {
            LockName::Inode(ino) => self.wait_data(ino, 0, u64::MAX),
            LockName::Rgrp(_) => {}
            // They guard no block of their own: what changed under them changed
            // under inode and rgrp glocks too, which write it back when they go.
            LockName::Rename | LockName::Iopen(_) => return Ok(()),
        }
        if self.is_withdrawn() {
            return Err(FsError::Withdrawn);
        }
        let r = self.checkpoint();
        if let Err(e) = &r {
            self.withdraw(e);
        }
        r
    }

    /// Before a glock leaves this node (or goes down to a mode that may not cache):
    /// Concord's caches of what it protects go, and the kernel's. An inode's dinode,
    /// map and directory blocks, listing and cached data; an rgrp's header and bitmap
    /// blocks (its free count is re-read from the header when the lock comes back).
    /// The kernel is told on its own thread ([`Filesystem::set_kernel_cache`]'s
    /// implementation must not block on the kernel while a FUSE request waits for
    /// this glock: see docs/internals/glocks.md).
    pub fn invalidate_glock(&self, name: LockName) {
        match name {
            LockName::Inode(ino) => {
                self.core.lock().drop_inode(ino);
                // A directory's names the kernel was given go with it.
                let names: Vec<(u64, Box<[u8]>)> = {
                    let mut k = self.kernel_names.lock();
                    *k.epoch.entry(ino).or_insert(0) += 1;
                    k.names.remove(&ino).map_or_else(Vec::new, |set| set.into_iter().map(|n| (ino, n)).collect())
                };
                // Local requests waiting for this glock may hold the kernel's locks
                // that the invalidation needs (a create holds its directory's, a read
                // its page's): then the demote does not wait for the kernel at all.
                let wait = !self.locks.has_waiters(name);
                self.kernel_invalidate(names, ino, wait);
            }
            LockName::Rgrp(addr) => {
                let mut c = self.core.lock();
                if let Some(ri) = c.rgrp_of(addr) {
                    let e = c.rgrps[ri].e;
                    for a in addr..=addr + u64::from(e.bitmap_blocks) {
                        c.cache_remove(a);
                    }
                }
            }
            LockName::Rename | LockName::Iopen(_) => {}
        }
    }

    /// After another node's journal was replayed into the device: everything cached
    /// may be older than what the replay wrote, so all of it goes.
    pub fn forget_metadata(&self) {
        let mut c = self.core.lock();
        c.drop_all();
    }

    /// Stops every write (a fenced node, a lost lockd, a failed demote): further
    /// operations fail, nothing more reaches the journal.
    pub fn withdraw_cluster(&self, why: &str) {
        self.withdraw(&FsError::Lock(why.to_string()));
        if let Some(j) = &self.journal {
            j.stop_background();
        }
    }

    /// Cluster mounts: start allocating in the part of the device that belongs to
    /// journal `jid` of `journals`, so that nodes allocate from different rgrps (and
    /// their rgrp glocks stay where they are).
    pub fn spread_allocation(&self, jid: u32, journals: u32) {
        let mut c = self.core.lock();
        let n = c.rgrps.len();
        c.rgrp_hint = (jid as usize * n) / (journals.max(1) as usize);
    }

    /// The first mounter of a cluster frees what every earlier mount left unlinked
    /// (no node has anything open then).
    pub(crate) fn free_orphans_now(&self) -> Result<usize> {
        self.free_orphans()
    }

    /// Frees inodes left UNLINKED by a crash (nobody holds them open after a mount).
    fn free_orphans(&self) -> Result<usize> {
        let rgrps: Vec<RindexEntry> = self.core.lock().rgrps.iter().map(|r| r.e).collect();
        let mut freed = 0;
        let mut hb = vec![0u8; BLOCK_SIZE];
        for e in rgrps {
            // A first look at the header as the device has it, without its lock and
            // without caching it; only an rgrp that counts unlinked inodes is read
            // under its lock (in a cluster, a glock that is then kept cached).
            self.dev.read_at(e.addr * BLOCK_SIZE as u64, &mut hb)?;
            let block: &Block = hb.as_slice().try_into().map_err(|_| FsError::Invalid("block size".into()))?;
            if RgrpHeader::decode(block, e.addr)?.unlinked == 0 {
                continue;
            }
            let orphans = self.run(true, |c| {
                let mut tx = Tx::new(c);
                tx.lock_rgrp(e.addr)?;
                let mut orphans = Vec::new();
                for bi in 0..e.bitmap_blocks {
                    let baddr = e.addr + 1 + u64::from(bi);
                    let b = tx.read(baddr)?;
                    let bits = decode_bitmap(&b, baddr)?;
                    for (i, byte) in bits.iter().enumerate() {
                        for s in 0..4 {
                            if BlockState::from_bits(byte >> (2 * s)) == BlockState::Unlinked {
                                let k = u64::from(bi) * u64::from(BITMAP_BLOCKS_PER) + (i as u64) * 4 + s;
                                if k < u64::from(e.length) {
                                    orphans.push(e.addr + k);
                                }
                            }
                        }
                    }
                }
                Ok(orphans)
            })?;
            for ino in orphans {
                freed += self.run(true, |c| {
                    let mut tx = Tx::new(c);
                    tx.lock_inode_ex(ino)?;
                    let d = tx.dinode(ino)?;
                    if d.nlink != 0 {
                        return Ok(0);
                    }
                    free_inode(&mut tx, ino, d)?;
                    tx.commit()?;
                    Ok(1)
                })?;
            }
        }
        Ok(freed)
    }
}

fn load_rgrps(core: &mut Core) -> Result<()> {
    let sb = core.sb.clone();
    let mut tx = Tx::new(core);
    let m = tx.dinode_unchecked(sb.master_dinode)?;
    let e = dir::lookup(&mut tx, sb.master_dinode, &m, b"rindex")?
        .ok_or_else(|| FsError::Corrupt(bad(sb.master_dinode, "master directory", "no rindex")))?;
    let rd = tx.dinode_unchecked(e.ino)?;
    let mut bytes = vec![0u8; rd.size as usize];
    if rd.height == 0 {
        bytes.copy_from_slice(&rd.payload[..rd.size as usize]);
    } else {
        read_mapped(&mut tx, e.ino, &rd, 0, &mut bytes)?;
    }
    let entries = RindexEntry::decode_all(&bytes, e.ino)?;
    if entries.len() != sb.rgrp_count as usize {
        return Err(FsError::Corrupt(bad(e.ino, "rindex", "record count differs from the superblock")));
    }
    let mut infos = Vec::with_capacity(entries.len());
    for (i, r) in entries.into_iter().enumerate() {
        let (start, len) = sb.rgrp_extent(i as u32);
        if r.addr != start || r.length != len {
            return Err(FsError::Corrupt(bad(e.ino, "rindex", format!("record {i} disagrees with the superblock"))));
        }
        let h = RgrpHeader::decode(&*tx.read(r.addr)?, r.addr)?;
        infos.push(RgrpInfo { e: r, free: h.free });
    }
    drop(tx);
    core.rgrps = infos;
    Ok(())
}

/// Drops one link of `d` (already removed from its directory): frees the inode when no
/// link is left and nobody has it open, else marks it UNLINKED until the last close.
fn drop_link(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, t: Time) -> Result<()> {
    d.ctime = t;
    if d.is_dir() {
        d.nlink = 0;
    } else {
        d.nlink = d.nlink.saturating_sub(1);
    }
    if d.nlink > 0 {
        tx.put_dinode(ino, d);
        return Ok(());
    }
    // In a cluster another node may have it open: it is marked unlinked here and freed
    // after the transaction by whichever node is last to have it (iopen glocks).
    if tx.core.refs.get(&ino).copied().unwrap_or(0) > 0 || tx.core.locks.is_cluster() {
        tx.core.unlinked.insert(ino);
        tx.set_state(ino, BlockState::Unlinked)?;
        tx.put_dinode(ino, d);
        return Ok(());
    }
    free_inode(tx, ino, d.clone())
}

/// Drops `n` of inode `ino`'s references; true when that was the last one of an inode
/// whose last link went while it was referenced (it must be freed now).
fn drop_refs(c: &mut Core, ino: u64, n: u64) -> bool {
    match c.refs.get_mut(&ino) {
        Some(k) if u64::from(*k) > n => {
            *k -= n as u32;
            false
        }
        Some(_) => {
            c.refs.remove(&ino);
            c.unlinked.contains(&ino)
        }
        None => false,
    }
}

/// Frees an inode and every block it owns (its listing, cached or taken, goes too).
fn free_inode(tx: &mut Tx<'_>, ino: u64, mut d: Dinode) -> Result<()> {
    tx.core.drop_inode(ino);
    tx.forget_listing(ino);
    if d.is_dir() {
        dir::free_all(tx, ino, &mut d)?;
    } else if d.flags & DIF_JOURNAL == 0 {
        bmap::free_range(tx, ino, &mut d, 0, u64::MAX, false)?;
    }
    if d.xattr != 0 {
        tx.free_block(d.xattr, true)?;
    }
    tx.free_block(ino, true)
}

/// A directory may not move below itself: walks up from `target_parent` to the root.
fn not_below(tx: &mut Tx<'_>, dir: u64, target_parent: u64) -> Result<()> {
    let mut a = target_parent;
    // Bounded by the tree's depth; the bound guards against a corrupt parent loop.
    for _ in 0..100_000 {
        if a == dir {
            return Err(FsError::Invalid("rename of a directory into itself".into()));
        }
        let ad = tx.dinode(a)?;
        if ad.parent == 0 || ad.parent == a {
            return Ok(());
        }
        a = ad.parent;
    }
    Err(FsError::Corrupt(bad(target_parent, "parent", "loop in the directory tree")))
}

fn rename_tx(tx: &mut Tx<'_>, p1: u64, n1: &[u8], p2: u64, n2: &[u8], flags: RenameFlags) -> Result<()> {
    let mut pd1 = tx.dir(p1)?;
    let mut pd2 = if p1 == p2 { pd1.clone() } else { tx.dir(p2)? };
    let src = dir::lookup(tx, p1, &pd1, n1)?.ok_or(FsError::NotFound)?;
    let dst = dir::lookup(tx, p2, &pd2, n2)?;
    if flags.exchange && dst.is_none() {
        return Err(FsError::NotFound);
    }
    if flags.noreplace && dst.is_some() {
        return Err(FsError::Exists(String::from_utf8_lossy(n2).into_owned()));
    }
    if let Some(dst) = &dst {
        if dst.ino == src.ino {
            return Ok(()); // same inode: rename(2) does nothing
        }
    }
    tx.lock_inode_ex(src.ino)?;
    if let Some(dst) = &dst {
        tx.lock_inode_ex(dst.ino)?;
    }
    let mut sd = tx.dinode(src.ino)?;
    let t = now();
    if sd.is_dir() && p1 != p2 {
        not_below(tx, src.ino, p2)?;
    }
    if flags.exchange {
        let dst = dst.expect("checked above: exchange needs a target");
        let mut dd = tx.dinode(dst.ino)?;
        if dd.is_dir() && p1 != p2 {
            not_below(tx, dst.ino, p1)?;
        }
        dir::remove(tx, p1, &mut pd1, n1)?;
        if p1 == p2 {
            dir::remove(tx, p1, &mut pd1, n2)?;
            dir::add(tx, p1, &mut pd1, DirEntry::new(n1, dst.ino, dst.dtype))?;
            dir::add(tx, p1, &mut pd1, DirEntry::new(n2, src.ino, src.dtype))?;
        } else {
            dir::remove(tx, p2, &mut pd2, n2)?;
            dir::add(tx, p1, &mut pd1, DirEntry::new(n1, dst.ino, dst.dtype))?;
            dir::add(tx, p2, &mut pd2, DirEntry::new(n2, src.ino, src.dtype))?;
            if sd.is_dir() {
                sd.parent = p2;
                pd1.nlink -= 1;
                pd2.nlink += 1;
            }
            if dd.is_dir() {
                dd.parent = p1;
                pd2.nlink -= 1;
                pd1.nlink += 1;
            }
        }
        sd.ctime = t;
        dd.ctime = t;
        tx.put_dinode(src.ino, &sd);
        tx.put_dinode(dst.ino, &dd);
    } else {
        if let Some(dst) = &dst {
            let mut dd = tx.dinode(dst.ino)?;
            if dd.is_dir() && !sd.is_dir() {
                return Err(FsError::IsDir);
            }
            if !dd.is_dir() && sd.is_dir() {
                return Err(FsError::NotDir);
            }
            if dd.is_dir() && dd.dir_entries != 0 {
                return Err(FsError::NotEmpty);
            }
            let target_pd = if p1 == p2 { &mut pd1 } else { &mut pd2 };
            dir::remove(tx, p2, target_pd, n2)?;
            if dd.is_dir() {
                target_pd.nlink -= 1;
            }
            drop_link(tx, dst.ino, &mut dd, t)?;
        }
        dir::remove(tx, p1, &mut pd1, n1)?;
        if p1 == p2 {
            dir::add(tx, p1, &mut pd1, DirEntry::new(n2, src.ino, src.dtype))?;
        } else {
            dir::add(tx, p2, &mut pd2, DirEntry::new(n2, src.ino, src.dtype))?;
            if sd.is_dir() {
                sd.parent = p2;
                pd1.nlink -= 1;
                pd2.nlink += 1;
            }
        }
        sd.ctime = t;
        tx.put_dinode(src.ino, &sd);
    }
    pd1.mtime = t;
    pd1.ctime = t;
    tx.put_dinode(p1, &pd1);
    if p1 != p2 {
        pd2.mtime = t;
        pd2.ctime = t;
        tx.put_dinode(p2, &pd2);
    }
    Ok(())
}

/// Moves a stuffed file's bytes to a data block and starts its block map.
fn unstuff(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode) -> Result<()> {
    if d.height > 0 {
        return Ok(());
    }
    let old = d.size.min(STUFFED_MAX as u64) as usize;
    let mut first = None;
    if old > 0 {
        let a = tx.alloc(ino, BlockState::Used)?;
        let mut b = vec![0u8; BLOCK_SIZE];
        b[..old].copy_from_slice(&d.payload[..old]);
        tx.core.dev.write_at(a * BLOCK_SIZE as u64, &b)?;
        tx.ordered = true;
        first = Some(a);
    }
    d.payload.fill(0);
    d.height = 1;
    if let Some(a) = first {
        d.set_ptr(0, a);
        d.blocks += 1;
    }
    Ok(())
}

const BS: u64 = BLOCK_SIZE as u64;

/// What a read needs once the filesystem lock is released.
enum ReadPlan {
    Bytes(Vec<u8>),
    /// End of the read (clamped to the size) and the extents covering it.
    Extents(u64, Vec<(u64, u64, u64)>),
}

/// (logical block, device block or 0 for a hole, block count) covering `[off, end)`.
fn extents(tx: &mut Tx<'_>, ino: u64, d: &Dinode, off: u64, end: u64) -> Result<Vec<(u64, u64, u64)>> {
    let mut out = Vec::new();
    let mut lb = off / BS;
    let last = end.div_ceil(BS);
    while lb < last {
        let (p, n) = bmap::lookup_extent(tx, ino, d, lb, last - lb)?;
        out.push((lb, p, n));
        lb += n;
    }
    Ok(out)
}

/// Device reads of at most this many blocks each; a larger read runs its pieces in
/// parallel (the device serves several requests at once faster than one after another).
const READ_CHUNK: u64 = 32;
/// Reader threads, for device reads in flight at once.
const READ_PARALLEL: usize = 8;
/// O_DIRECT reads up to this size go into the data cache.
const CACHE_READ_MAX: usize = 128 << 10;

/// Reads file bytes `[off, off + out.len())` through `ext` (from [`extents`]), serving
/// blocks from `cache` where it has them; returns the runs read from the device (first
/// logical block, count), for the caller to cache. Device reads go in pieces of
/// [`READ_CHUNK`] blocks, several at once.
fn read_cached(
    dev: &Arc<dyn BlockDevice>,
    cache: &DataCache,
    ino: u64,
    ext: &[(u64, u64, u64)],
    off: u64,
    out: &mut [u8],
) -> Result<Vec<(u64, u64)>> {
    let end = off + out.len() as u64;
    let Some(&(first, _, _)) = ext.first() else { return Ok(Vec::new()) };
    let last = ext.last().map_or(first, |&(lb, _, n)| lb + n);
    let cached = cache.get_range(ino, first, last - first);
    // Copies block `lb`'s bytes that the caller asked for into `out`.
    let mut put = |lb: u64, b: &[u8]| {
        let (s, e) = ((lb * BS).max(off), ((lb + 1) * BS).min(end));
        if s < e {
            out[(s - off) as usize..(e - off) as usize]
                .copy_from_slice(&b[(s - lb * BS) as usize..(e - lb * BS) as usize]);
        }
    };
    // Runs of missing blocks: (first logical block, first device block, count).
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    for &(lb, p, n) in ext {
        if p == 0 {
            continue; // a hole: `out` is zeroed already
        }
        for i in 0..n {
            let b = lb + i;
            match &cached[(b - first) as usize] {
                Some(c) => put(b, &c[..]),
                None => match runs.last_mut() {
                    Some(r) if r.0 + r.2 == b && r.1 + r.2 == p + i && r.2 < READ_CHUNK => r.2 += 1,
                    _ => runs.push((b, p + i, 1)),
                },
            }
        }
    }
    // Copies a run read from the device into `out`.
    let mut take = |r: &(u64, u64, u64), buf: &[u8]| {
        for (i, chunk) in buf.chunks_exact(BLOCK_SIZE).enumerate() {
            put(r.0 + i as u64, chunk);
        }
    };
    let fetched = runs.iter().map(|&(lb, _, n)| (lb, n)).collect();
    let Some((first_run, rest)) = runs.split_first() else { return Ok(fetched) };
    // Runs after the first go to the reader threads, so that several device reads are
    // in flight at once (the device serves them much faster together than one after
    // the other); this thread reads the first meanwhile, in its own buffer.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for (i, &(_, p, n)) in rest.iter().enumerate() {
        let (dev, done) = (dev.clone(), done_tx.clone());
        readers().spawn(Box::new(move || {
            let mut buf = vec![0u8; (n * BS) as usize];
            let r = dev.read_at(p * BS, &mut buf).map(|_| buf).map_err(FsError::from);
            let _ = done.send((i, r));
        }));
    }
    drop(done_tx);
    let mine = with_scratch((first_run.2 * BS) as usize, |buf| -> Result<()> {
        dev.read_at(first_run.1 * BS, buf)?;
        take(first_run, buf);
        Ok(())
    });
    let mut bufs: Vec<Option<Result<Vec<u8>>>> = rest.iter().map(|_| None).collect();
    for (i, r) in done_rx {
        bufs[i] = Some(r);
    }
    mine?;
    for (r, b) in rest.iter().zip(bufs) {
        let buf = b.unwrap_or_else(|| Err(FsError::Invalid("a device read was lost".into())))?;
        take(r, &buf);
    }
    Ok(fetched)
}

/// Copies for the data cache of the blocks of `fetched` (runs: first logical block,
/// count) that `out`, the bytes of the file from `off`, holds whole; with `eof` (`out`
/// ends at the end of the file) the last block counts as whole, zero-filled past the
/// end: no read serves bytes past the end, and a write that extends the file drops
/// the blocks it zeroes from the cache. One allocation per block, not zeroed first.
fn kept_blocks(fetched: &[(u64, u64)], off: u64, out: &[u8], eof: bool) -> Vec<(u64, Arc<Block>)> {
    let end = off + out.len() as u64;
    let mut kept = Vec::new();
    for &(first, n) in fetched {
        for lb in first..first + n {
            let (s, e) = (lb * BS, (lb + 1) * BS);
            if s < off || s >= end || (e > end && !eof) {
                continue;
            }
            let have = &out[(s - off) as usize..(e.min(end) - off) as usize];
            let b = match <&Block>::try_from(have) {
                Ok(whole) => Arc::new(*whole),
                Err(_) => {
                    let mut tail = [0u8; BLOCK_SIZE];
                    tail[..have.len()].copy_from_slice(have);
                    Arc::new(tail)
                }
            };
            kept.push((lb, b));
        }
    }
    kept
}

/// Threads that run device reads for [`read_cached`].
struct Readers {
    jobs: parking_lot::Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
}

impl Readers {
    fn spawn(&self, job: Box<dyn FnOnce() + Send>) {
        // The workers live as long as the process: a send cannot fail.
        let _ = self.jobs.lock().send(job);
    }
}

/// The process's reader threads ([`READ_PARALLEL`] of them), started on first use.
fn readers() -> &'static Readers {
    static READERS: std::sync::OnceLock<Readers> = std::sync::OnceLock::new();
    READERS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let rx = Arc::new(parking_lot::Mutex::new(rx));
        for i in 0..READ_PARALLEL {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new().name(format!("concord-read-{i}")).spawn(move || loop {
                let job = rx.lock().recv();
                match job {
                    Ok(job) => job(),
                    Err(_) => break,
                }
            });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "starting a reader thread");
            }
        }
        Readers { jobs: parking_lot::Mutex::new(tx) }
    })
}

/// Reads mapped file bytes inside a transaction (system files at mount).
fn read_mapped(tx: &mut Tx<'_>, ino: u64, d: &Dinode, off: u64, out: &mut [u8]) -> Result<()> {
    let ext = extents(tx, ino, d, off, off + out.len() as u64)?;
    read_cached(&tx.core.dev, &tx.core.data, ino, &ext, off, out).map(drop)
}

/// Maps (allocating where needed) the blocks of `[off, end)`: one (device block,
/// newly allocated) per logical block. Marks the transaction ordered when any is new.
fn map_for_write(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, off: u64, end: u64) -> Result<Vec<(u64, bool)>> {
    let (first, last) = (off / BS, end.div_ceil(BS));
    let mut phys = Vec::with_capacity((last - first) as usize);
    let mut goal = ino;
    for lb in first..last {
        let (p, fresh) = bmap::map_alloc(tx, ino, d, lb, goal)?;
        goal = p + 1;
        tx.ordered |= fresh;
        phys.push((p, fresh));
    }
    Ok(phys)
}

/// Writes `data` at file offset `off` into the mapped blocks `phys` (from
/// [`map_for_write`]), a run of contiguous device blocks at a time. Partial head and
/// tail blocks keep their old bytes, or zeros when newly allocated.
fn write_blocks(dev: &dyn BlockDevice, phys: &[(u64, bool)], off: u64, data: &[u8]) -> Result<()> {
    let end = off + data.len() as u64;
    let first = off / BS;
    let mut i = 0usize;
    while i < phys.len() {
        let mut j = i + 1;
        while j < phys.len() && phys[j].0 == phys[j - 1].0 + 1 {
            j += 1;
        }
        let run_start = (first + i as u64) * BS;
        let run_end = (first + j as u64) * BS;
        with_scratch((run_end - run_start) as usize, |buf| -> Result<()> {
            let head_partial = off > run_start;
            let tail_partial = end < run_end;
            // Bytes of partial first and last blocks outside the write keep what the
            // block held (zeros for a new block).
            if head_partial {
                buf[..BLOCK_SIZE].fill(0);
                if !phys[i].1 {
                    dev.read_at(phys[i].0 * BS, &mut buf[..BLOCK_SIZE])?;
                }
            }
            if tail_partial && (j - 1 != i || !head_partial) {
                let k = buf.len() - BLOCK_SIZE;
                buf[k..].fill(0);
                if !phys[j - 1].1 {
                    dev.read_at(phys[j - 1].0 * BS, &mut buf[k..])?;
                }
            }
            let ds = off.max(run_start);
            let de = end.min(run_end);
            buf[(ds - run_start) as usize..(de - run_start) as usize]
                .copy_from_slice(&data[(ds - off) as usize..(de - off) as usize]);
            dev.write_at(phys[i].0 * BS, buf)?;
            Ok(())
        })?;
        i = j;
    }
    Ok(())
}

/// Runs `f` on a 4 KiB-aligned buffer of `len` bytes (contents undefined). Buffers up
/// to [`SCRATCH_MAX`] are kept per thread and reused: O_DIRECT needs aligned buffers
/// (an unaligned one costs the device a bounce copy), and a fresh megabyte costs a page
/// fault per page.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    thread_local!(static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) });
    let run = |v: &mut Vec<u8>| {
        if v.len() < len + BLOCK_SIZE {
            *v = vec![0u8; len + BLOCK_SIZE];
        }
        let a = v.as_ptr().align_offset(BLOCK_SIZE);
        f(&mut v[a..a + len])
    };
    if len > SCRATCH_MAX {
        return run(&mut Vec::new());
    }
    SCRATCH.with(|s| run(&mut s.borrow_mut()))
}

/// Largest scratch buffer a thread keeps.
const SCRATCH_MAX: usize = 1 << 20;

/// Zeroes bytes `[from, to)` of the file's mapped blocks in place, skipping holes.
fn zero_range(tx: &mut Tx<'_>, ino: u64, d: &Dinode, from: u64, to: u64) -> Result<()> {
    tx.core.data.drop_range(ino, from / BS, to.div_ceil(BS));
    let mut pos = from;
    while pos < to {
        let lb = pos / BS;
        let last = to.div_ceil(BS);
        let (p, n) = bmap::lookup_extent(tx, ino, d, lb, last - lb)?;
        let ext_end = ((lb + n) * BS).min(to);
        if p != 0 {
            let mut buf = vec![0u8; ((lb + n) * BS - lb * BS) as usize];
            let head = (pos - lb * BS) as usize;
            let tail = (ext_end - lb * BS) as usize;
            // Keep the bytes outside [pos, ext_end) of the first and last blocks.
            if head > 0 {
                tx.core.dev.read_at(p * BS, &mut buf[..BLOCK_SIZE])?;
            }
            if tail < buf.len() {
                let k = buf.len() - BLOCK_SIZE;
                tx.core.dev.read_at((p + n - 1) * BS, &mut buf[k..])?;
            }
            buf[head..tail].fill(0);
            tx.core.dev.write_at(p * BS, &buf)?;
        }
        pos = ext_end;
    }
    Ok(())
}

/// Before a file grows from `old` to `new`: bytes past the old end may hold what an
/// uncommitted write left there before a crash; they must read as zeros.
fn zero_gap(tx: &mut Tx<'_>, ino: u64, d: &Dinode, old: u64, new: u64) -> Result<()> {
    if d.height > 0 && new > old {
        zero_range(tx, ino, d, old, new)?;
    }
    Ok(())
}

fn truncate(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, size: u64) -> Result<()> {
    tx.core.data.drop_range(ino, size / BS, u64::MAX);
    if size > max_file_size(MAX_HEIGHT) {
        return Err(FsError::TooBig);
    }
    if d.height == 0 {
        if size > STUFFED_MAX as u64 {
            unstuff(tx, ino, d)?;
        } else {
            if size < d.size {
                d.payload[size as usize..].fill(0);
            }
            d.size = size;
            return Ok(());
        }
    }
    zero_gap(tx, ino, d, d.size, size)?;
    bmap::grow_for_size(tx, ino, d, size)?;
    if size < d.size {
        let keep = size.div_ceil(BS);
        bmap::free_range(tx, ino, d, keep, u64::MAX, false)?;
        if !size.is_multiple_of(BS) {
            zero_range(tx, ino, d, size, keep * BS)?;
        }
        if size == 0 {
            d.height = 0;
            d.payload.fill(0);
        }
    }
    d.size = size;
    Ok(())
}

fn punch(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, from: u64, to: u64) -> Result<()> {
    tx.core.data.drop_range(ino, from / BS, to.div_ceil(BS));
    if from >= to {
        return Ok(());
    }
    if d.height == 0 {
        d.payload[from as usize..to as usize].fill(0);
        return Ok(());
    }
    let first_full = from.div_ceil(BS);
    let last_full = to / BS;
    if first_full < last_full {
        bmap::free_range(tx, ino, d, first_full, last_full, false)?;
        zero_range(tx, ino, d, from, first_full * BS)?;
        zero_range(tx, ino, d, last_full * BS, to)?;
    } else {
        zero_range(tx, ino, d, from, to)?;
    }
    Ok(())
}

fn allocate_zeroed(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, from: u64, to: u64) -> Result<()> {
    const RUN: u64 = 256; // zero up to 1 MiB per write
    let zero = vec![0u8; (RUN * BS) as usize];
    let mut goal = ino;
    let mut run: Option<(u64, u64)> = None; // (first device block, blocks)
    for lb in from / BS..to.div_ceil(BS) {
        let (p, fresh) = bmap::map_alloc(tx, ino, d, lb, goal)?;
        goal = p + 1;
        if !fresh {
            continue;
        }
        tx.ordered = true;
        run = match run {
            Some((s, n)) if s + n == p && n < RUN => Some((s, n + 1)),
            Some((s, n)) => {
                tx.core.dev.write_at(s * BS, &zero[..(n * BS) as usize])?;
                Some((p, 1))
            }
            None => Some((p, 1)),
        };
    }
    if let Some((s, n)) = run {
        tx.core.dev.write_at(s * BS, &zero[..(n * BS) as usize])?;
    }
    Ok(())
}
