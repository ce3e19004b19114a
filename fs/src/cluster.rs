//! Cluster mounts (`lock_dlm`): several nodes mount one device, each through its own
//! lockd, and see one filesystem.
//!
//! [`mount_cluster`] joins the pieces:
//!
//! * the lockspace handle (joined with recovery callbacks by the caller) gives the
//!   node's slot, and jid = slot − 1;
//! * the [`GlockRuntime`] carries every inode, rgrp, journal and rename lock to the
//!   DLM; [`DlmLocks`] is the filesystem's [`LockModule`] over it;
//! * the [`LockDlm`] core (the seed's mount and recovery control) is driven here: its
//!   control_lock and mounted_lock requests go to lockd, lockd's recovery callbacks go
//!   to it, and its actions come back as glock blocking, journal recoveries and the
//!   mount's go-ahead;
//! * the filesystem is mounted on journal `jid` with the journal glock held EX (the
//!   first mounter replays every journal first), and answers demotes as
//!   [`GlockOps`]: sync (write back) and invalidate (drop its caches and the kernel's).
//!
//! docs/internals/glocks.md and docs/internals/lock_dlm.md describe both protocols;
//! docs/internals/cluster.md this glue.

use std::cell::RefCell;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use concord_journal::{BlockDevice, DeviceError};
use concord_lockd::client::{LockspaceHandle, RecoveryEvent};
use concord_lockd::core::{Flags, LkId, Mode, Status};
use parking_lot::{Condvar, Mutex};

use crate::format::{Superblock, LOCKPROTO_DLM};
use crate::glock::{GlState, GlockHold, GlockName, GlockOps, GlockRuntime, GlockType, HolderFlags, Tunables};
use crate::lock::{LocalDirectory, LockHold, LockMode, LockModule, LockName};
use crate::lock_dlm::{self, LockDlm, NondiskLock, RecoveryResult};
use crate::plock::{PlockFuture, PlockOp, PlockSpace, Plocks};
use crate::{read_superblock, replay_all, replay_journal, Filesystem, FsError, MountOptions, Result};

/// How long a mount waits for lock_dlm's go-ahead (a first mounter replaying every
/// journal, or a recovery in progress, can take a while).
const MOUNT_WAIT: Duration = Duration::from_secs(300);

/// GFS2's nondisk glock number of the rename lock.
const RENAME_LOCK: u64 = 3;

/// The glock of a filesystem lock name.
pub fn glock_of(name: LockName) -> GlockName {
    match name {
        LockName::Inode(n) => GlockName { ty: GlockType::Inode, number: n },
        LockName::Rgrp(a) => GlockName { ty: GlockType::Rgrp, number: a },
        LockName::Rename => GlockName { ty: GlockType::Nondisk, number: RENAME_LOCK },
        LockName::Iopen(n) => GlockName { ty: GlockType::Iopen, number: n },
        LockName::Journal(j) => GlockName { ty: GlockType::Journal, number: u64::from(j) },
    }
}

/// The filesystem lock name of a glock, for those the filesystem takes.
pub fn lock_of(g: GlockName) -> Option<LockName> {
    match g.ty {
        GlockType::Inode => Some(LockName::Inode(g.number)),
        GlockType::Rgrp => Some(LockName::Rgrp(g.number)),
        GlockType::Nondisk if g.number == RENAME_LOCK => Some(LockName::Rename),
        GlockType::Iopen => Some(LockName::Iopen(g.number)),
        GlockType::Journal => u32::try_from(g.number).ok().map(LockName::Journal),
        _ => None,
    }
}

fn state_of(mode: LockMode) -> GlState {
    match mode {
        LockMode::Shared => GlState::Sh,
        LockMode::Exclusive => GlState::Ex,
    }
}

thread_local! {
    /// The glocks this thread holds through a [`DlmLocks`] (by its id) for the
    /// operation it runs: a lock the thread already holds is not asked for again, which
    /// would queue behind itself. Iopen holds, which outlive operations and are dropped
    /// on other threads, are not marked.
    static HELD: RefCell<Vec<(u64, LockName, LockMode)>> = const { RefCell::new(Vec::new()) };
}

static NEXT_MODULE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Marks a lock held by this thread until dropped.
struct ThreadMark(u64, LockName, LockMode);

impl ThreadMark {
    fn new(id: u64, name: LockName, mode: LockMode) -> ThreadMark {
        HELD.with(|h| h.borrow_mut().push((id, name, mode)));
        ThreadMark(id, name, mode)
    }
}

impl Drop for ThreadMark {
    fn drop(&mut self) {
        HELD.with(|h| {
            let mut h = h.borrow_mut();
            if let Some(i) = h.iter().rposition(|e| *e == (self.0, self.1, self.2)) {
                h.swap_remove(i);
            }
        });
    }
}

/// Whether this thread holds `name` in `mode` or stronger through module `id`;
/// `Some(false)` when it holds it only shared and asks exclusive.
fn thread_holds(id: u64, name: LockName, mode: LockMode) -> Option<bool> {
    if matches!(name, LockName::Iopen(_)) {
        return None;
    }
    HELD.with(|h| {
        let h = h.borrow();
        let mut any = None;
        for &(i, n, m) in h.iter() {
            if i == id && n == name {
                if m == LockMode::Exclusive || mode == LockMode::Shared {
                    return Some(true);
                }
                any = Some(false);
            }
        }
        any
    })
}

/// The filesystem's lock module in a cluster: glocks.
pub struct DlmLocks {
    glocks: Arc<GlockRuntime>,
    /// Tells this module's holds from another's in [`HELD`] (tests run several nodes'
    /// filesystems in one process, on one thread).
    id: u64,
    /// File locks across the cluster (a real mount's lockspace; none in tests that
    /// build the module over a bare glock runtime).
    plocks: Option<Arc<dyn Plocks>>,
    /// This node and the lockspace's view (generation, members), for
    /// [`LockModule::local_directory`]; none over a bare glock runtime.
    directory: Option<(u32, Arc<Mutex<(u64, Vec<u32>)>>)>,
}

impl std::fmt::Debug for DlmLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DlmLocks")
    }
}

impl DlmLocks {
    pub fn new(glocks: Arc<GlockRuntime>) -> DlmLocks {
        DlmLocks {
            glocks,
            id: NEXT_MODULE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            plocks: None,
            directory: None,
        }
    }

    /// The module that knows which resources' directory entries node `me` keeps, from
    /// the lockspace's members in `view` (updated at each recover_done).
    pub fn with_directory(mut self, me: u32, view: Arc<Mutex<(u64, Vec<u32>)>>) -> DlmLocks {
        self.directory = Some((me, view));
        self
    }

    /// The module with file locks served by `plocks`.
    pub fn with_plocks(mut self, plocks: Arc<dyn Plocks>) -> DlmLocks {
        self.plocks = Some(plocks);
        self
    }

    fn hold(&self, name: LockName, mode: LockMode, g: GlockHold) -> LockHold {
        if matches!(name, LockName::Iopen(_)) {
            return LockHold::with_guard(name, mode, Box::new(g));
        }
        LockHold::with_guard(name, mode, Box::new((g, ThreadMark::new(self.id, name, mode))))
    }
}

impl LockModule for DlmLocks {
    fn acquire(&self, name: LockName, mode: LockMode) -> Result<LockHold> {
        match thread_holds(self.id, name, mode) {
            Some(true) => return Ok(LockHold::new(name, mode)),
            Some(false) => {
                return Err(FsError::Lock(format!("{name:?}: shared to exclusive while held (a lock order bug)")))
            }
            None => {}
        }
        // An iopen glock is held SH for as long as this node has the inode, so the hold
        // must put the glock in SH exactly (GFS2's GL_EXACT on i_iopen_gh): a glock left
        // cached EX (this node freed an inode with this number) would otherwise serve
        // it, and another node's SH would wait for a demote that this holder blocks.
        let flags = match (name, mode) {
            (LockName::Iopen(_), LockMode::Shared) => HolderFlags::EXACT,
            _ => HolderFlags::NONE,
        };
        let g = self
            .glocks
            .acquire(glock_of(name), state_of(mode), flags)
            .map_err(|e| FsError::Lock(format!("{} {}: {e}", glock_of(name), state_of(mode).as_str())))?;
        Ok(self.hold(name, mode, g))
    }

    fn try_now(&self, name: LockName, mode: LockMode) -> Result<Option<LockHold>> {
        match thread_holds(self.id, name, mode) {
            Some(true) => return Ok(Some(LockHold::new(name, mode))),
            Some(false) => return Ok(None),
            None => {}
        }
        if self.glocks.is_withdrawn() {
            return Err(FsError::Withdrawn);
        }
        Ok(self.glocks.try_cached(glock_of(name), state_of(mode)).map(|g| self.hold(name, mode, g)))
    }

    fn try_acquire(&self, name: LockName, mode: LockMode) -> Result<Option<LockHold>> {
        if thread_holds(self.id, name, mode).is_some() {
            return Ok(None);
        }
        // An iopen or rgrp try also sends its BAST to the nodes in the way (TRY_1CB):
        // one that only keeps the glock cached gives it back, and the caller's later
        // try works.
        let flags = if matches!(name, LockName::Iopen(_) | LockName::Rgrp(_)) {
            HolderFlags::TRY_1CB
        } else {
            HolderFlags::TRY
        };
        match self.glocks.acquire(glock_of(name), state_of(mode), flags) {
            Ok(g) => Ok(Some(self.hold(name, mode, g))),
            Err(crate::glock::GlockError::TryAgain) => Ok(None),
            Err(e) => Err(FsError::Lock(format!("{} {}: {e}", glock_of(name), state_of(mode).as_str()))),
        }
    }

    fn uncache(&self, name: LockName) {
        // Waits until the DLM lock is down to NL: the caller may ask for it EX next
        // (with TRY), and a node that still held it cached would refuse that.
        if !self.glocks.evict_wait(glock_of(name), std::time::Duration::from_secs(2)) {
            tracing::debug!(glock = %glock_of(name), "glock not given back within 2 s");
        }
    }

    fn has_waiters(&self, name: LockName) -> bool {
        self.glocks.has_waiters(glock_of(name))
    }

    fn demote_requested(&self, name: LockName) -> bool {
        self.glocks.demote_requested(glock_of(name))
    }

    fn kernel_confirmed(&self, name: LockName) {
        self.glocks.inval_confirmed(glock_of(name));
    }

    fn prefetch(&self, name: LockName, mode: LockMode) {
        if thread_holds(self.id, name, mode).is_none() {
            self.glocks.prefetch(glock_of(name), state_of(mode));
        }
    }

    fn uncache_soon(&self, name: LockName) {
        self.glocks.evict(glock_of(name));
    }

    fn local_directory(&self) -> Option<LocalDirectory> {
        let (me, view) = self.directory.as_ref()?;
        Some(LocalDirectory::new(*me, view.lock().1.clone()))
    }

    fn uncache_all(&self, names: &[LockName]) {
        for n in names {
            self.glocks.evict(glock_of(*n));
        }
        for n in names {
            self.uncache(*n);
        }
    }

    fn proto(&self) -> &'static str {
        crate::format::LOCKPROTO_DLM
    }

    fn is_cluster(&self) -> bool {
        true
    }

    fn plocks(&self) -> Option<Arc<dyn Plocks>> {
        self.plocks.clone()
    }
}

// ---- file locks ------------------------------------------------------------------------

/// A cluster mount's flock and fcntl locks: lockd's plock service through the mount's
/// lockspace handle (docs/internals/file-locks.md). Once the node stops writing
/// (fenced, lockd lost, withdrawn: the device gate is closed) every operation fails:
/// the node's locks are no longer its own.
struct ClusterPlocks {
    ls: LockspaceHandle,
    rt: tokio::runtime::Handle,
    gate: Arc<GatedDevice>,
}

impl std::fmt::Debug for ClusterPlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterPlocks").field("ls", &self.ls.name()).finish()
    }
}

fn plock_error(e: impl std::fmt::Display) -> FsError {
    FsError::Lock(format!("file lock: {e}"))
}

impl Plocks for ClusterPlocks {
    fn op(&self, token: u64, space: PlockSpace, ino: u64, op: PlockOp) -> PlockFuture {
        let (ls, gate) = (self.ls.clone(), self.gate.clone());
        Box::pin(async move {
            if let Some(why) = gate.why() {
                return Err(plock_error(format!("this node stopped: {why}")));
            }
            ls.plock(token, space, ino, op).await.map_err(plock_error)
        })
    }

    fn cancel(&self, token: u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'static>> {
        let ls = self.ls.clone();
        Box::pin(async move { ls.plock_cancel(token).await.map_err(plock_error) })
    }

    fn spawn(&self, task: crate::plock::Task) {
        self.rt.spawn(task);
    }

    fn node(&self) -> u32 {
        self.ls.client().node()
    }
}

impl GlockOps for Filesystem {
    fn sync(&self, name: GlockName) -> std::result::Result<(), String> {
        match lock_of(name) {
            Some(n) => self.sync_glock(n).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }

    fn invalidate(&self, name: GlockName, _metadata: bool) -> bool {
        match lock_of(name) {
            Some(n) => self.invalidate_glock(n),
            None => true,
        }
    }
}

// ---- the device gate -------------------------------------------------------------------

/// The one gate every write and flush of a cluster mount passes on its way to the
/// shared device. Closed when the node is fenced, loses its lockd or withdraws: from
/// then on no write of this node reaches the device, also none that was already on its
/// way (closing waits for the writes in flight to finish, and the survivors replay
/// this node's journal only after lockd declared it dead, later still). Reads go on.
#[derive(Debug)]
pub struct GatedDevice {
    inner: Arc<dyn BlockDevice>,
    /// `Some(reason)` once closed. Writers hold the read side for the whole write.
    closed: parking_lot::RwLock<Option<String>>,
}

impl GatedDevice {
    pub fn new(inner: Arc<dyn BlockDevice>) -> GatedDevice {
        GatedDevice { inner, closed: parking_lot::RwLock::new(None) }
    }

    /// Closes the gate for good; returns once no write is in flight.
    pub fn close(&self, why: &str) {
        let mut g = self.closed.write();
        if g.is_none() {
            tracing::error!(target: "lock_dlm", "device gate closed: {why}; nothing more is written");
            *g = Some(why.to_string());
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.read().is_some()
    }

    /// Why the gate was closed, once it is.
    pub fn why(&self) -> Option<String> {
        self.closed.read().clone()
    }

    fn refused(op: &'static str, offset: u64, why: &str) -> DeviceError {
        let e = std::io::Error::other(format!("the device gate is closed ({why})"));
        DeviceError::Io { op, offset, source: e }
    }
}

impl BlockDevice for GatedDevice {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), DeviceError> {
        self.inner.read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> std::result::Result<(), DeviceError> {
        let g = self.closed.read();
        if let Some(why) = &*g {
            return Err(GatedDevice::refused("write", offset, why));
        }
        self.inner.write_at(offset, buf)
    }

    fn flush(&self) -> std::result::Result<(), DeviceError> {
        let g = self.closed.read();
        if let Some(why) = &*g {
            return Err(GatedDevice::refused("flush", 0, why));
        }
        self.inner.flush()
    }
}

// ---- the lock_dlm driver ---------------------------------------------------------------

/// Where a mount stands in lock_dlm's control_mount.
#[derive(Debug, Clone)]
enum Ready {
    Waiting,
    Go { jid: u32, first: bool },
    Refused(String),
}

/// Drives the [`LockDlm`] core: its DLM requests, timers and recovery events.
struct Control {
    dlm: Mutex<LockDlm>,
    ls: LockspaceHandle,
    rt: tokio::runtime::Handle,
    glocks: Arc<GlockRuntime>,
    lkids: Mutex<[Option<LkId>; 2]>,
    epoch: Instant,
    ready: Mutex<Ready>,
    ready_cv: Condvar,
    fs: Mutex<Weak<Filesystem>>,
    dev: Arc<dyn BlockDevice>,
    gate: Arc<GatedDevice>,
    sb: Superblock,
    /// Journal recoveries running here.
    recovering: Mutex<Recoveries>,
    /// Signalled when a journal recovery ends.
    recovered_cv: Condvar,
    /// Set by a clean unmount: the lockspace is left on purpose.
    leaving: std::sync::atomic::AtomicBool,
    /// The lockspace's generation and member nodes, as lockd last reported them.
    view: Arc<Mutex<(u64, Vec<u32>)>>,
    /// The last journal recoveries this node attempted, oldest first (for `concord top`).
    recoveries: Mutex<std::collections::VecDeque<Recovery>>,
}

/// One journal recovery this node attempted ([`ClusterMount::recoveries`]).
#[derive(Clone, Debug)]
pub struct Recovery {
    pub jid: u32,
    /// When it ended, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// How long it took, from asking for the journal glock to the end.
    pub ms: u64,
    /// "replayed", "clean: nothing to replay", "busy: another node holds the journal",
    /// or "failed: " and the error.
    pub outcome: String,
}

/// How many recoveries [`ClusterMount::recoveries`] keeps.
const RECOVERIES_KEPT: usize = 16;

/// The journal recoveries of one mount.
#[derive(Debug, Default)]
struct Recoveries {
    /// Jids being recovered (a jid is not queued twice).
    jids: Vec<u32>,
    /// Unmounting: no new recovery starts (GFS2's SDF_NORECOVERY).
    closed: bool,
}

fn resource(lock: NondiskLock) -> Vec<u8> {
    format!("{:8x}{:16x}", GlockType::Nondisk.code(), lock.number()).into_bytes()
}

fn mode(m: lock_dlm::Mode) -> Mode {
    match m {
        lock_dlm::Mode::NL => Mode::NL,
        lock_dlm::Mode::PR => Mode::PR,
        lock_dlm::Mode::EX => Mode::EX,
    }
}

fn flags(f: lock_dlm::LkFlags) -> Flags {
    let mut out = Flags::empty();
    if f.contains(lock_dlm::LkFlags::NOQUEUE) {
        out |= Flags::NOQUEUE;
    }
    if f.contains(lock_dlm::LkFlags::VALBLK) {
        out |= Flags::VALBLK;
    }
    out
}

impl Control {
    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Runs `f` on the core, then carries out every action it produced.
    fn step(self: &Arc<Self>, f: impl FnOnce(&mut LockDlm, u64)) {
        let (actions, generation): (Vec<lock_dlm::Action>, u32) = {
            let mut d = self.dlm.lock();
            f(&mut d, self.now());
            (std::iter::from_fn(|| d.poll_action()).collect(), d.generations().1)
        };
        for a in actions {
            self.act(a, generation);
        }
    }

    /// Carries out action `a`; `generation`: the last recover_done the core had
    /// processed when it produced `a`.
    fn act(self: &Arc<Self>, a: lock_dlm::Action, generation: u32) {
        use lock_dlm::Action as A;
        match a {
            A::Dlm(req) => self.dlm_request(req),
            A::RecoverJournal { jid } => {
                {
                    let mut r = self.recovering.lock();
                    if r.closed || r.jids.contains(&jid) {
                        return;
                    }
                    r.jids.push(jid);
                }
                let me = self.clone();
                self.rt.spawn_blocking(move || {
                    let result = me.recover_journal(jid);
                    // The result first, then the jid leaves `recovering`: a control
                    // work run in between would otherwise find neither and start a
                    // second recovery of the journal just recovered.
                    me.step(|d, now| d.recovery_result(now, jid, result));
                    me.recovering.lock().jids.retain(|j| *j != jid);
                    me.recovered_cv.notify_all();
                });
            }
            A::BlockLocks => self.glocks.set_blocked(true),
            A::UnblockLocks => {
                self.glocks.set_blocked(false);
                self.thaw_plocks(generation);
            }
            A::MountReady { jid, first } => {
                *self.ready.lock() = Ready::Go { jid, first };
                self.ready_cv.notify_all();
            }
            A::MountRefused(reason) => {
                *self.ready.lock() = Ready::Refused(reason.to_string());
                self.ready_cv.notify_all();
            }
            A::Wake { at_ms } => {
                let me = self.clone();
                let wait = Duration::from_millis(at_ms.saturating_sub(self.now()));
                self.rt.spawn(async move {
                    tokio::time::sleep(wait).await;
                    me.step(|d, now| d.handle_timeout(now));
                });
            }
            A::Log { level: lock_dlm::Level::Info, msg } => {
                tracing::info!(target: "lock_dlm", ls = self.ls.name(), "{msg}")
            }
            A::Log { level: lock_dlm::Level::Error, msg } => {
                tracing::error!(target: "lock_dlm", ls = self.ls.name(), "{msg}")
            }
        }
    }

    /// Tells lockd that this node's recovery for `generation` is over (departed nodes'
    /// journals replayed, glocks unblocked): file locks held back since a member
    /// departed may go on, so that a dead node's plocks pass to others only once the
    /// data they protected is back on the device. Spawned: the step does not wait.
    fn thaw_plocks(&self, generation: u32) {
        let ls = self.ls.clone();
        self.rt.spawn(async move {
            if let Err(e) = ls.plock_thaw(u64::from(generation)).await {
                tracing::warn!(target: "lock_dlm", generation, error = %e, "file locks: thaw");
            }
        });
    }

    fn dlm_request(self: &Arc<Self>, req: lock_dlm::DlmRequest) {
        let me = self.clone();
        let lock = req.lock;
        self.rt.spawn(async move {
            let name = resource(lock);
            let lkid = me.lkids.lock()[lock as usize];
            let r = match (req.op, lkid) {
                (lock_dlm::DlmOp::Lock { mode: m, flags: f }, _) => me.ls.lock(&name, mode(m), flags(f), None).await,
                (lock_dlm::DlmOp::Convert { mode: m, flags: f, lvb }, Some(id)) => {
                    me.ls.convert(id, mode(m), flags(f) | Flags::CONVERT, lvb).await
                }
                (lock_dlm::DlmOp::Unlock, Some(id)) => {
                    me.lkids.lock()[lock as usize] = None;
                    if let Err(e) = me.ls.unlock_posted(id, None).await {
                        tracing::warn!(target: "lock_dlm", error = %e, "{lock} unlock");
                    }
                    return;
                }
                (op, None) => {
                    let what = format!("{op:?} of {lock} before it was locked");
                    me.step(|d, now| d.dlm_ast(now, lock, lock_dlm::AstResult::Error(what)));
                    return;
                }
            };
            let result = match r {
                Ok(ast) => {
                    if ast.status == Status::Granted {
                        me.lkids.lock()[lock as usize] = Some(ast.lkid);
                        lock_dlm::AstResult::Granted { lvb: ast.lvb }
                    } else if ast.status == Status::Again {
                        lock_dlm::AstResult::TryFailed
                    } else {
                        lock_dlm::AstResult::Error(format!("{:?}", ast.status))
                    }
                }
                Err(e) => lock_dlm::AstResult::Error(e.to_string()),
            };
            me.step(|d, now| d.dlm_ast(now, lock, result));
        });
    }

    /// Replays journal `jid` of a departed node: its journal glock EX with TRY (a live
    /// owner or another node recovering it holds it: busy), the replay, and every
    /// cached block dropped (the replay wrote under them).
    fn recover_journal(&self, jid: u32) -> RecoveryResult {
        let start = Instant::now();
        let (result, outcome) = self.try_recover_journal(jid);
        let mut kept = self.recoveries.lock();
        if kept.len() == RECOVERIES_KEPT {
            kept.pop_front();
        }
        let at_unix_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        kept.push_back(Recovery { jid, at_unix_ms, ms: start.elapsed().as_millis() as u64, outcome });
        result
    }

    fn try_recover_journal(&self, jid: u32) -> (RecoveryResult, String) {
        let name = GlockName { ty: GlockType::Journal, number: u64::from(jid) };
        let hold = match self.glocks.acquire(name, GlState::Ex, HolderFlags::TRY | HolderFlags::NOEXP) {
            Ok(h) => h,
            Err(e) => {
                tracing::info!(target: "lock_dlm", jid, error = %e, "journal glock busy: not recovering it here");
                return (RecoveryResult::GaveUp, "busy: another node holds the journal".into());
            }
        };
        let r = replay_journal(self.dev.as_ref(), &self.sb, jid);
        if let Some(fs) = self.fs.lock().upgrade() {
            fs.forget_metadata();
        }
        drop(hold);
        match r {
            Ok(replayed) => {
                tracing::info!(target: "lock_dlm", jid, replayed, "journal recovered");
                if let Some(fs) = self.fs.lock().upgrade() {
                    fs.scan_orphans_later();
                    fs.fold_statfs_later(jid);
                }
                let outcome = if replayed { "replayed" } else { "clean: nothing to replay" };
                (RecoveryResult::Success, outcome.to_string())
            }
            Err(e) => {
                tracing::error!(target: "lock_dlm", jid, error = %e, "journal recovery failed");
                (RecoveryResult::GaveUp, format!("failed: {e}"))
            }
        }
    }

    fn on_recovery_event(self: &Arc<Self>, ev: RecoveryEvent) -> bool {
        match ev {
            RecoveryEvent::Prep { .. } => self.step(|d, _| d.recover_prep()),
            RecoveryEvent::Slot { slot, .. } => self.step(|d, _| d.recover_slot(slot)),
            RecoveryEvent::Done { generation, slots, our_slot } => {
                *self.view.lock() = (generation, slots.keys().copied().collect());
                let slots: Vec<u32> = slots.values().copied().collect();
                self.step(|d, now| d.recover_done(now, generation, our_slot, &slots));
            }
            RecoveryEvent::Stopped { .. } if self.leaving.load(std::sync::atomic::Ordering::SeqCst) => return false,
            RecoveryEvent::Stopped { reason } => {
                let why = format!("this node left the lockspace: {reason}");
                self.stop(&why);
                return false;
            }
        }
        true
    }

    /// The filesystem withdrew for its own reason (an I/O error or corruption on the
    /// shared device): nothing more of this node is written, and it leaves the
    /// lockspace as a crash would, so that the other nodes recover its locks and its
    /// journal instead of waiting for glocks a withdrawn node would never give back.
    /// Called on the withdrawing thread: waits for no DLM answer.
    fn withdraw_fs(&self, why: &str) {
        tracing::error!(
            target: "lock_dlm",
            ls = self.ls.name(),
            "withdraw: {why}; leaving the lockspace uncleanly so that the other nodes recover this node's journal"
        );
        self.halt(why);
        self.ls.client().abort();
    }

    /// Fenced, or the lockspace lost: nothing more may be written.
    fn stop(&self, why: &str) {
        tracing::error!(target: "lock_dlm", ls = self.ls.name(), "{why}; withdrawing");
        self.gate.close(why);
        if let Some(fs) = self.fs.lock().upgrade() {
            fs.withdraw_cluster(why);
        }
        self.halt(why);
    }

    /// Unmounting: starts no more journal recovery and waits for those running to end,
    /// as GFS2's unmount does (SDF_NORECOVERY, then a wait on each JDF_RECOVERY): a
    /// replay still writing once this node has given back its locks and left the
    /// lockspace could write a dead node's old blocks over what another node wrote
    /// after recovering that journal itself.
    fn end_recoveries(&self) {
        let mut r = self.recovering.lock();
        r.closed = true;
        if !r.jids.is_empty() {
            tracing::info!(target: "lock_dlm", jids = ?r.jids, "unmount waits for the journal recoveries running here");
        }
        self.recovered_cv.wait_while(&mut r, |r| !r.jids.is_empty());
    }

    /// What every stop shares: the device gate closed (again, harmlessly, after
    /// `stop`'s own close), no more DLM requests, a mount still waiting refused.
    fn halt(&self, why: &str) {
        self.gate.close(why);
        self.glocks.withdraw(why);
        *self.ready.lock() = Ready::Refused(why.to_string());
        self.ready_cv.notify_all();
    }
}

/// A mounted cluster filesystem.
pub struct ClusterMount {
    pub fs: Arc<Filesystem>,
    pub glocks: Arc<GlockRuntime>,
    pub jid: u32,
    /// Whether this node was the first mounter (and replayed every journal).
    pub first: bool,
    control: Arc<Control>,
    journal: Mutex<Option<GlockHold>>,
}

impl std::fmt::Debug for ClusterMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterMount").field("jid", &self.jid).field("first", &self.first).finish()
    }
}

/// Mounts `dev` as one node of a cluster through `ls`, a lockspace joined with
/// recovery callbacks (JoinKind::WithRecovery) whose name is the lock table's fs name.
/// Blocks (call it outside the tokio runtime `rt`).
pub fn mount_cluster(
    dev: Arc<dyn BlockDevice>,
    ls: LockspaceHandle,
    rt: tokio::runtime::Handle,
    opts: &MountOptions,
) -> Result<ClusterMount> {
    let sb = read_superblock(dev.as_ref())?;
    if sb.lockproto != LOCKPROTO_DLM {
        return Err(FsError::Invalid(format!(
            "this filesystem uses {}: it mounts on one node only (make it with -p lock_dlm for a cluster)",
            sb.lockproto
        )));
    }
    let slot = ls.slot();
    if slot == 0 || slot > sb.journals {
        return Err(FsError::Invalid(format!(
            "this node's slot {slot} needs journal {} but the filesystem has {} journals: make it with more \
             (mkfs -j) or mount on fewer nodes",
            slot.saturating_sub(1),
            sb.journals
        )));
    }
    let gate = Arc::new(GatedDevice::new(dev));
    let dev: Arc<dyn BlockDevice> = gate.clone();
    let glocks = GlockRuntime::start(ls.clone(), rt.clone(), Tunables::default());
    let control = Arc::new(Control {
        dlm: Mutex::new(LockDlm::new(sb.journals)),
        ls: ls.clone(),
        rt: rt.clone(),
        glocks: glocks.clone(),
        lkids: Mutex::new([None, None]),
        epoch: Instant::now(),
        ready: Mutex::new(Ready::Waiting),
        ready_cv: Condvar::new(),
        fs: Mutex::new(Weak::new()),
        dev: dev.clone(),
        gate: gate.clone(),
        sb: sb.clone(),
        recovering: Mutex::new(Recoveries::default()),
        recovered_cv: Condvar::new(),
        leaving: std::sync::atomic::AtomicBool::new(false),
        view: Arc::new(Mutex::new((ls.generation(), ls.members().to_vec()))),
        recoveries: Mutex::new(std::collections::VecDeque::new()),
    });
    // lockd's Joined reply is the join's recover_done.
    let generation = ls.generation();
    control.step(|d, now| {
        d.recover_done(now, generation, slot, &[slot]);
        d.control_mount();
    });
    // recover_prep blocks glock grants at once, in lockd's reader, before any AST
    // that follows it (the grant of a dead node's lock) reaches the glocks; the
    // lock_dlm core sees the event a moment later from the queue.
    let g = glocks.clone();
    ls.set_recovery_hook(Arc::new(move |ev: &RecoveryEvent| {
        if matches!(ev, RecoveryEvent::Prep { .. }) {
            g.set_blocked(true);
        }
    }));
    let mut events = ls.recovery();
    let c = control.clone();
    rt.spawn(async move {
        loop {
            match events.recv().await {
                Some(ev) => {
                    if !c.on_recovery_event(ev) {
                        break;
                    }
                }
                None => {
                    if !c.leaving.load(std::sync::atomic::Ordering::SeqCst) {
                        c.stop("the connection to lockd is lost");
                    }
                    break;
                }
            }
        }
    });
    let fail = |e: FsError| {
        control.stop("the mount failed");
        glocks.shutdown();
        e
    };
    let (jid, first) = {
        let deadline = Instant::now() + MOUNT_WAIT;
        let mut r = control.ready.lock();
        loop {
            match &*r {
                Ready::Go { jid, first } => break (*jid, *first),
                Ready::Refused(why) => {
                    let why = why.clone();
                    drop(r);
                    return Err(fail(FsError::Invalid(format!("mount refused: {why}"))));
                }
                Ready::Waiting => {
                    if control.ready_cv.wait_until(&mut r, deadline).timed_out() {
                        drop(r);
                        return Err(fail(FsError::Lock("lock_dlm control_mount did not finish in time".into())));
                    }
                }
            }
        }
    };
    // Our own journal: held EX for as long as we are mounted (another node takes it
    // only to recover it after our death).
    let jname = GlockName { ty: GlockType::Journal, number: u64::from(jid) };
    let journal = glocks
        .acquire(jname, GlState::Ex, HolderFlags::NOEXP)
        .map_err(|e| fail(FsError::Lock(format!("journal {jid} glock: {e}"))))?;
    let replayed = if first {
        replay_all(dev.as_ref(), &sb).map_err(fail)?
    } else {
        replay_journal(dev.as_ref(), &sb, jid).map_err(fail)?.then_some(vec![jid]).unwrap_or_default()
    };
    if !replayed.is_empty() {
        tracing::info!(target: "lock_dlm", ?replayed, first, "journals replayed at mount");
    }
    let mut o = opts.clone();
    o.jid = jid;
    o.cluster = true;
    let plocks = Arc::new(ClusterPlocks { ls: ls.clone(), rt: rt.clone(), gate: gate.clone() });
    let locks: Arc<dyn LockModule> = Arc::new(
        DlmLocks::new(glocks.clone()).with_plocks(plocks).with_directory(ls.client().node(), control.view.clone()),
    );
    let fs = Arc::new(Filesystem::mount_with(dev, &o, locks).map_err(fail)?);
    fs.start_reclaim();
    let ops: Weak<dyn GlockOps> = Arc::downgrade(&fs) as Weak<dyn GlockOps>;
    glocks.set_ops(ops);
    *control.fs.lock() = Arc::downgrade(&fs);
    let wc = Arc::downgrade(&control);
    fs.set_on_withdraw(Box::new(move |why| {
        if let Some(c) = wc.upgrade() {
            c.withdraw_fs(why);
        }
    }));
    fs.spread_allocation(jid, sb.journals);
    if first {
        // Every other journal is unowned now: what their last owners allocated and
        // freed since their last statfs sync goes into the master record.
        for j in (0..sb.journals).filter(|&j| j != jid) {
            fs.fold_statfs_later(j);
        }
        let freed = fs.free_orphans_now().map_err(fail)?;
        if freed > 0 {
            tracing::info!(freed, "freed unlinked inodes no node has open");
        }
        control.step(|d, _| d.first_done());
    }
    spawn_lease_watch(&control, &rt);
    tracing::info!(target: "lock_dlm", jid, first, ls = ls.name(), "mounted");
    Ok(ClusterMount { fs, glocks, jid, first, control, journal: Mutex::new(Some(journal)) })
}

/// What the lease watch concludes after one question to lockd.
#[derive(Debug, PartialEq, Eq)]
enum LeaseCheck {
    /// The lease is confirmed until later: ask again after a while.
    Held,
    /// The lease's end, as last confirmed, has passed, but this watch itself did not
    /// run for longer than it meant to wait: the process was stopped (SIGSTOP, a paused
    /// machine) or starved, and lockd may well have renewed the lease meanwhile. Ask
    /// again at once; only a second such verdict counts.
    AskAgain,
    /// The lease may have run out: stop writing.
    Lost,
}

/// The lease watch's verdict at `now` on a question asked at `asked` that was to wait
/// at most `every`, with the lease confirmed `until`; `rechecked`: the previous verdict
/// was [`LeaseCheck::AskAgain`].
fn lease_check(now: Instant, asked: Instant, every: Duration, until: Option<Instant>, rechecked: bool) -> LeaseCheck {
    if until.is_none_or(|t| now < t) {
        return LeaseCheck::Held;
    }
    // The question waits at most `every`; twice that means this task did not run.
    if !rechecked && now.saturating_duration_since(asked) > every * 2 {
        return LeaseCheck::AskAgain;
    }
    LeaseCheck::Lost
}

/// Watches this node's lease as its lockd reports it, apart from lockd's own fencing:
/// a lockd that hangs or is stopped (SIGSTOP, a paused process) neither renews its
/// lease nor tells its mounts, while the other nodes declare this node dead once the
/// lease has surely run out and replay its journal. So the mount asks lockd for the
/// lease left every quarter lease, counts it from when it asked (never later than
/// lockd's own count), and closes its device gate when that time passes without a
/// newer answer: before any survivor can start a replay (dead_after_ms exceeds the
/// lease, docs/internals/membership.md). A mount process that was itself stopped
/// while a question was out finds, when it goes on, an answer older than the pause:
/// it asks once more before it concludes ([`lease_check`]). Once it stops, it drops
/// its lockd connection as a withdraw does: if lockd is alive after all, the other
/// members recover this node's journal instead of waiting for its locks.
fn spawn_lease_watch(control: &Arc<Control>, rt: &tokio::runtime::Handle) {
    let weak = Arc::downgrade(control);
    let client = control.ls.client().clone();
    rt.spawn(async move {
        let mut until: Option<Instant> = None;
        let mut every = Duration::from_millis(100);
        let mut rechecked = false;
        loop {
            let asked = Instant::now();
            let waited = every;
            let answer = tokio::time::timeout(every, client.status()).await;
            let Some(c) = weak.upgrade() else { return };
            if c.leaving.load(std::sync::atomic::Ordering::SeqCst) || c.gate.is_closed() {
                return;
            }
            match answer {
                Ok(Ok(st)) => {
                    every = Duration::from_millis((st.lease_ms / 4).max(10));
                    if st.fenced {
                        c.stop("lockd says this node was fenced");
                        return;
                    }
                    if let Some(left) = st.lease_left_ms {
                        until = Some(asked + Duration::from_millis(left));
                    }
                }
                // The connection is gone: the recovery event task stops the mount.
                Ok(Err(_)) => return,
                // No answer in time: the lease counts down meanwhile.
                Err(_) => {}
            }
            match lease_check(Instant::now(), asked, waited, until, rechecked) {
                LeaseCheck::Held => rechecked = false,
                LeaseCheck::AskAgain => {
                    tracing::info!(
                        target: "lock_dlm",
                        "the lease watch did not run for {} ms (process stopped or starved): asking lockd again",
                        asked.elapsed().as_millis()
                    );
                    rechecked = true;
                    continue;
                }
                LeaseCheck::Lost => {
                    c.stop("this node's lease was not confirmed by its lockd in time (lockd hung or stopped)");
                    c.ls.client().abort();
                    return;
                }
            }
            drop(c);
            tokio::time::sleep(every.min(until.map_or(every, |t| t.saturating_duration_since(Instant::now())))).await;
        }
    });
}

impl ClusterMount {
    /// Clean unmount: write back, commit, mark the journal clean, release every lock and
    /// leave the lockspace. Blocks (call it outside the tokio runtime).
    pub fn unmount(&self) -> Result<()> {
        self.control.leaving.store(true, std::sync::atomic::Ordering::SeqCst);
        let r = self.fs.unmount();
        drop(self.journal.lock().take());
        self.control.step(|d, _| d.unmount());
        self.control.end_recoveries();
        self.glocks.shutdown();
        let ls = self.control.ls.clone();
        let left = self.control.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), ls.leave()).await });
        match left {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "leaving the lockspace"),
            Err(_) => tracing::warn!("leaving the lockspace timed out"),
        }
        r
    }

    /// The lockspace's generation and member node ids, as lockd last reported them.
    pub fn lockspace_view(&self) -> (u64, Vec<u32>) {
        self.control.view.lock().clone()
    }

    /// Whether this node's device gate is closed (fenced, lockd lost, withdrawn).
    pub fn fenced(&self) -> bool {
        self.control.gate.is_closed()
    }

    /// Why this node stopped writing (fenced, lockd lost, lease not confirmed,
    /// withdrawn), once it has.
    pub fn stopped_why(&self) -> Option<String> {
        self.control.gate.why()
    }

    /// The last journal recoveries this node attempted, oldest first.
    pub fn recoveries(&self) -> Vec<Recovery> {
        self.control.recoveries.lock().iter().cloned().collect()
    }

    /// Whether lock_dlm has this node's locks blocked (a recovery in progress).
    pub fn recovering(&self) -> bool {
        self.control.dlm.lock().block_locks()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVERY: Duration = Duration::from_millis(625);

    #[test]
    fn a_lease_confirmed_until_later_is_held() {
        let t0 = Instant::now();
        let until = Some(t0 + Duration::from_millis(2500));
        assert_eq!(lease_check(t0 + EVERY, t0, EVERY, until, false), LeaseCheck::Held);
        assert_eq!(lease_check(t0, t0, EVERY, None, false), LeaseCheck::Held);
    }

    #[test]
    fn a_lease_that_ran_out_while_the_watch_ran_is_lost() {
        // lockd did not answer within `every`, again and again, until the lease ran out.
        let t0 = Instant::now();
        let asked = t0 + Duration::from_millis(2000);
        let until = Some(t0 + Duration::from_millis(2500));
        assert_eq!(lease_check(asked + EVERY, asked, EVERY, until, false), LeaseCheck::Lost);
    }

    #[test]
    fn a_watch_that_was_stopped_asks_again_once_before_it_concludes() {
        // The process was stopped for 4 s while a question was out: the answer (or
        // its absence) is older than the pause.
        let t0 = Instant::now();
        let until = Some(t0 + Duration::from_millis(2500));
        let now = t0 + Duration::from_millis(4000);
        assert_eq!(lease_check(now, t0, EVERY, until, false), LeaseCheck::AskAgain);
        // The question asked again got no newer answer within `every`: lost.
        assert_eq!(lease_check(now + EVERY, now, EVERY, until, true), LeaseCheck::Lost);
        // A second late verdict in a row is not given a second chance.
        assert_eq!(lease_check(now + 4 * EVERY, now, EVERY, until, true), LeaseCheck::Lost);
    }
}
