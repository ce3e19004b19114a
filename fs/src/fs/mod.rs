//! The filesystem API: what the FUSE adapter and most tests call.
//!
//! Every metadata change is one journal transaction ([`Tx`]). Operations take their
//! inode locks from the mount's lock module first, then run their metadata work under
//! the filesystem mutex ([`Filesystem::run`]); file data I/O runs outside that mutex,
//! under the inode lock only. docs/internals/fs.md describes the caches, transactions
//! and lock order.
//!
//! This module holds the [`Filesystem`] itself (mounting, unmounting, `run`, the lock
//! helpers, withdraw, fsync) and the small public types of the API; each concern has a
//! file of its own, each an `impl Filesystem` block:
//!
//! * `names`: lookup, create/mknod/mkdir/symlink, readlink, link, unlink/rmdir, rename,
//!   readdir and listings.
//! * `data`: read, write, fallocate, seek, truncate and punch, the in-flight data ranges,
//!   and the device I/O of file data outside the mutex.
//! * `attrs`: getattr, setattr, statfs, extended attributes.
//! * `inode`: an inode's life after its last name: references (open, the kernel's
//!   lookups), iopen glocks, freeing unlinked inodes (at last close, by the reclaim
//!   thread, at unmount, orphans at mount).
//! * `glops`: what a glock demote and journal recovery ask of the filesystem (sync,
//!   invalidate, forget everything, withdraw), as GFS2's glops.c.
//! * `kernel`: the kernel's caches above the mount: invalidations through the
//!   fuse-notify threads, and the names the kernel was given per directory.

mod attrs;
mod data;
mod glops;
mod inode;
mod kernel;
mod names;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

use concord_journal::{BlockDevice, Journal, LogRegion};
use parking_lot::Mutex;

use crate::cache::DataCache;
use crate::core::{Core, RgrpInfo, Tx};
use crate::format::*;
use crate::lock::{LockMode, LockModule, LockName, NoLock};
use crate::{dir, FsError, Result};

use data::read_mapped;
use kernel::{KernelNames, NotifyQueue, Outstanding};

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
    /// Writes back, then forgets, the cached pages of `ino` that hold bytes
    /// `start..=end` (`end` at or past `i64::MAX`: to the end of the file), and its
    /// attributes. Dirty pages of a shared mapping reach the filesystem only this way.
    fn write_back_range(&self, ino: u64, start: u64, end: u64) {
        let _ = (start, end);
        self.inval_inode(ino);
    }
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
    core: CoreMutex,
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
    /// Cluster mounts: the fuse-notify threads' queue.
    notify: std::sync::OnceLock<NotifyQueue>,
    /// Cluster mounts: the notifications the kernel has not confirmed yet, per inode.
    outstanding: Arc<Outstanding>,
    /// Cluster mounts: the names the kernel may have cached per directory since the
    /// directory's glock last left this node ([`Filesystem::note_entries`]).
    kernel_names: parking_lot::Mutex<KernelNames>,
    /// Cluster mounts: told once, when the filesystem withdraws, so that the node
    /// stops writing and leaves its lockspace ([`Filesystem::set_on_withdraw`]).
    on_withdraw: std::sync::OnceLock<WithdrawHook>,
    /// Cluster mounts: iopen glocks this node no longer holds but keeps cached (shared),
    /// oldest first; past [`inode::IOPEN_IDLE_MAX`] the oldest are given back to the DLM.
    iopen_idle: parking_lot::Mutex<std::collections::VecDeque<u64>>,
    /// Cluster mounts: inodes made on this node whose glock has not left it (EX since
    /// their create, no sync since): no other node can have one, so freeing one needs
    /// no iopen glock ([`Filesystem::free_if_unused`]).
    born_here: parking_lot::Mutex<std::collections::HashSet<u64>>,
    /// Cluster mounts: the reclaim thread's queue (unlinked inodes whose exclusive
    /// iopen try failed, tried again later: [`Filesystem::start_reclaim`]).
    reclaim: std::sync::OnceLock<parking_lot::Mutex<std::sync::mpsc::Sender<inode::Reclaim>>>,
    /// Serializes [`Filesystem::statfs_sync`]; true once unmount made its last one.
    statfs_closed: parking_lot::Mutex<bool>,
}

/// The metadata mutex. It keeps count, per thread, of the guards it gave out, so that
/// a DLM wait with it held (a deadlock waiting to happen: the demote that the wait
/// needs takes this mutex) is caught by a debug assertion ([`core_mutex_held`]).
#[derive(Debug)]
struct CoreMutex<T = Core>(Mutex<T>);

thread_local! {
    static CORE_HELD: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Whether this thread holds the metadata mutex of any filesystem.
pub(crate) fn core_mutex_held() -> bool {
    CORE_HELD.with(|c| c.get() > 0)
}

impl<T> CoreMutex<T> {
    fn lock(&self) -> CoreGuard<'_, T> {
        let g = self.0.lock();
        CORE_HELD.with(|c| c.set(c.get() + 1));
        CoreGuard(g)
    }
}

/// A held metadata mutex ([`CoreMutex`]).
struct CoreGuard<'a, T = Core>(parking_lot::MutexGuard<'a, T>);

impl<T> Drop for CoreGuard<'_, T> {
    fn drop(&mut self) {
        CORE_HELD.with(|c| c.set(c.get().saturating_sub(1)));
    }
}

impl<T> std::ops::Deref for CoreGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> std::ops::DerefMut for CoreGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

/// How often a cluster node with statfs changes folds them into the master record
/// ([`Filesystem::statfs_sync`]): how far other nodes' `df` may lag its allocations.
/// GFS2's default `statfs_quantum` is 30 s; Concord's is shorter, the fold being one
/// small transaction.
pub const STATFS_QUANTUM: std::time::Duration = std::time::Duration::from_secs(5);

/// [`Filesystem::set_on_withdraw`]'s function.
struct WithdrawHook(Box<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for WithdrawHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WithdrawHook")
    }
}

impl std::fmt::Debug for dyn KernelCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCache")
    }
}

/// Locks one operation may find it needs inside the filesystem lock before it gives up.
const MAX_NEEDED_LOCKS: usize = 64;
/// Locks one operation tries for without queueing ([`FsError::TryLock`]) at most.
const MAX_TRIED_LOCKS: usize = 4;

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
        let mut core = Core::new(
            dev.clone(),
            sb.clone(),
            journal.clone(),
            data.clone(),
            opts.meta_cache_blocks,
            device_blocks,
            locks.clone(),
        );
        load_rgrps(&mut core)?;
        if journal.is_some() {
            load_statfs(&mut core, opts.jid)?;
        }
        let fs = Filesystem {
            core: CoreMutex(Mutex::new(core)),
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
            outstanding: Default::default(),
            kernel_names: Default::default(),
            on_withdraw: Default::default(),
            iopen_idle: Default::default(),
            born_here: Default::default(),
            reclaim: Default::default(),
            statfs_closed: Default::default(),
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
        if self.journal.is_some() && !self.is_withdrawn() {
            // The change file folded into the master record: a clean image's master
            // is whole (for `df` on the next mount and for fsck's check).
            let mut closed = self.statfs_closed.lock();
            if let Err(e) = self.statfs_sync_locked() {
                tracing::warn!(error = %e, "folding the statfs change file at unmount");
            }
            *closed = true;
        }
        if let Some(j) = &self.journal {
            j.stop_background();
            if self.is_withdrawn() {
                // A withdrawn node writes nothing more, not even a clean journal
                // header: the next mount (or, in a cluster, another node) replays
                // what it committed.
                tracing::warn!("unmount after a withdraw: the journal is left for replay");
                return Err(FsError::Withdrawn);
            }
            j.shutdown()?;
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
        let mut tries = 0;
        loop {
            let mut core = self.core.lock();
            core.held = std::mem::take(&mut holds);
            core.may_try_locks = tries < MAX_TRIED_LOCKS;
            let r = f(&mut core);
            core.may_try_locks = false;
            holds = std::mem::take(&mut core.held);
            drop(core);
            match r {
                Err(FsError::TryLock(name, mode)) if tries < MAX_TRIED_LOCKS => {
                    tries += 1;
                    // No queueing, so no lock order to keep: the holds stay.
                    match self.locks.try_acquire(name, mode)? {
                        Some(h) => {
                            holds.push(h);
                            // A later NeedLock takes every needed lock again, in order;
                            // this one is cached here by then.
                            needed.push((name, mode));
                            needed.sort_by_key(|(n, _)| *n);
                        }
                        None => self.core.lock().lock_busy(name),
                    }
                }
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

    fn lock(&self, names: &[u64], mode: LockMode) -> Result<Vec<crate::lock::LockHold>> {
        let mut v: Vec<LockName> = names.iter().map(|&i| LockName::Inode(i)).collect();
        crate::lock::acquire_ordered(self.locks.as_ref(), &mut v, mode)
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

    /// Inodes with references: looked up by the kernel (and not yet forgotten) or open.
    pub fn referenced_inodes(&self) -> usize {
        self.core.lock().refs.len()
    }

    /// Blocks of file data in Concord's own cache.
    pub fn cached_data_blocks(&self) -> usize {
        self.data.len()
    }

    /// Blocks the allocator's searches have examined since mount (for tests: a
    /// search must not walk again over what earlier ones passed).
    pub fn alloc_blocks_scanned(&self) -> u64 {
        self.core.lock().alloc_scanned
    }

    /// Metadata blocks in Concord's block cache.
    pub fn cached_meta_blocks(&self) -> usize {
        self.core.lock().cached_blocks()
    }

    /// Whether every transaction handed to the journal so far is committed (true for a
    /// read-only mount). For the cluster simulator's model of durable points.
    #[doc(hidden)]
    pub fn all_committed(&self) -> bool {
        let last = self.core.lock().last_seq;
        self.journal.as_ref().is_none_or(|j| j.stats().committed_seq >= last)
    }

    /// This node's journal counters (none for a read-only mount).
    pub fn journal_stats(&self) -> Option<concord_journal::JournalStats> {
        self.journal.as_ref().map(|j| j.stats())
    }

    /// Writes the log home and advances the tail.
    pub fn checkpoint(&self) -> Result<()> {
        if let Some(j) = &self.journal {
            j.commit(u64::MAX)?;
            j.checkpoint()?;
        }
        Ok(())
    }

    /// Whether this is a cluster (`lock_dlm`) mount.
    pub fn is_cluster(&self) -> bool {
        self.locks.is_cluster()
    }

    /// The cluster's file lock service, for a cluster mount (none for lock_nolock).
    pub fn plocks(&self) -> Option<Arc<dyn crate::plock::Plocks>> {
        self.locks.plocks()
    }

    /// For the cluster simulator (fs/tests/cluster_sim), which runs every node on one
    /// thread and must decide itself when I/O happens: batches grown past a quarter of
    /// the log are committed by the adding operation, as without the thread.
    #[doc(hidden)]
    pub fn stop_background_commits(&self) {
        if let Some(j) = &self.journal {
            j.stop_background();
        }
    }
}

/// Finds the master statfs record and journal `jid`'s change file, and takes what
/// the change file holds as this mount's change (a node that died with changes not
/// folded left them there; they are folded at this mount's first sync).
fn load_statfs(core: &mut Core, jid: u32) -> Result<()> {
    let sb = core.sb.clone();
    let mut tx = Tx::new(core);
    let m = tx.dinode_unchecked(sb.master_dinode)?;
    let mut find = |name: &str| -> Result<u64> {
        let missing = || FsError::Corrupt(bad(sb.master_dinode, "master directory", format!("no {name}")));
        Ok(dir::lookup(&mut tx, sb.master_dinode, &m, name.as_bytes())?.ok_or_else(missing)?.ino)
    };
    let master = find("statfs")?;
    let change = find(&format!("statfs_change{jid}"))?;
    StatfsMaster::decode(&tx.dinode_unchecked(master)?, master)?;
    let local = StatfsChange::decode(&tx.dinode_unchecked(change)?, change)?;
    drop(tx);
    if !local.is_zero() {
        tracing::info!(
            jid,
            free = local.free,
            dinodes = local.dinodes,
            "statfs changes left in this journal's change file"
        );
    }
    core.statfs = Some(crate::core::StatfsFiles { master, change, local });
    Ok(())
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
    core.set_rgrps(infos);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metadata_mutex_knows_when_this_thread_holds_it() {
        let m = CoreMutex(Mutex::new(0u32));
        assert!(!core_mutex_held());
        let g = m.lock();
        assert!(core_mutex_held(), "held after lock");
        let other = std::thread::spawn(core_mutex_held).join().unwrap();
        assert!(!other, "another thread does not hold it");
        drop(g);
        assert!(!core_mutex_held(), "not held after the guard went");
    }
}
