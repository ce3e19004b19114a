//! The glock runtime: drives one mount's [`Glocks`] with lockd, a timer and a demote
//! thread (docs/internals/glocks.md, "The runtime").
//!
//! * One [`Glocks`] behind one mutex (`Inner`), held only for calls into the machine
//!   and for carrying out the actions it returns: never across an await, a DLM wait
//!   or a call into the filesystem ([`GlockOps`]).
//! * DLM requests, conversions, cancels and unlocks are tokio tasks on the runtime
//!   handle given to [`GlockRuntime::start`]; their ASTs come back into the machine
//!   through `handle_ast`. Another task reads the lockspace's BASTs, a third sleeps
//!   until the machine's next deadline.
//! * `Sync` and `Invalidate` go to one OS thread (`glock-demote`), which calls
//!   [`GlockOps`] and then answers the machine. Never a FUSE request thread, never a
//!   tokio worker.
//! * [`GlockRuntime::acquire`] blocks its (ordinary OS) thread on a condition variable
//!   until the machine grants or fails the holder.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Weak};
use std::time::{Duration, Instant};

use concord_lockd::client::{Ast, ClientError, ErrorKind, LockspaceHandle};
use concord_lockd::core::{Flags, LkId, Mode, Status};
use parking_lot::{Condvar, Mutex};
use tokio::sync::{watch, Notify};

use super::machine::{Action, AstResult, DlmRequest, GlockError, GlockTop, Glocks, HolderId, Poll, Tunables};
use super::types::{DlmFlags, DlmMode, GlState, GlockName, HolderFlags};

/// What a demote asks of the filesystem. Called on the runtime's demote thread: never
/// on a tokio thread, never on a FUSE request thread, never with a runtime lock held.
pub trait GlockOps: Send + Sync {
    /// Write back everything covered by `name` (leaving EX or DF): journal commit,
    /// revokes, dirty data and metadata, direct I/O. `Err` makes the runtime withdraw:
    /// the glock is never released to another node.
    fn sync(&self, name: GlockName) -> Result<(), String>;
    /// Drop Concord's and the kernel's caches of what `name` covers: pages, and when
    /// `metadata` also attributes, entries and metadata (as [`Action::Invalidate`]).
    /// True when the kernel confirmed its part; false when it did not in time (its
    /// notifications stay queued, and are waited for again by the next call for
    /// `name`): the machine then lends the glock to local waiters, which may hold the
    /// kernel locks the notifications wait for, and the demote starts over
    /// ([`Glocks::inval_unconfirmed`]). Give up early (a few milliseconds) only while
    /// [`GlockRuntime::has_waiters`] says local requests wait for `name`.
    fn invalidate(&self, name: GlockName, metadata: bool) -> bool;
}

/// How long [`GlockRuntime::shutdown`] waits for lockd's answers.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// A cancel that reaches lockd before the conversion it cancels (they travel in
/// different tasks) is refused with "nothing to cancel"; it is sent again while the
/// conversion is still outstanding, at this interval, this many times.
const CANCEL_RETRY: Duration = Duration::from_millis(20);
const CANCEL_RETRIES: u32 = 50;
/// A glock whose DLM requests fail this many times in a row withdraws the runtime
/// (a failed demote is retried at once by the machine: this bounds the loop).
const MAX_CONSECUTIVE_ERRORS: u32 = 3;
/// BASTs for lock ids not known yet (a BAST can overtake the answer that tells the
/// runtime its lock id); beyond this many, the oldest guesses are dropped.
const MAX_EARLY_BASTS: usize = 4096;

/// The DLM resource name of a glock: GFS2's `"%8x%16llx"` of type and number (24
/// bytes, space-padded), as lock_dlm's `gdlm_lock` builds it.
pub fn dlm_resource_name(name: GlockName) -> Vec<u8> {
    dlm_resource_name_bytes(name).to_vec()
}

/// [`dlm_resource_name`] on the stack, for hot paths (the allocator checks one per
/// candidate block, `LocalDirectory::is_local`).
pub fn dlm_resource_name_bytes(name: GlockName) -> [u8; 24] {
    let mut b = [b' '; 24];
    // Written by hand rather than with `write!`: the formatting machinery was a few
    // per cent of a cluster create's CPU (the allocator asks for one per candidate).
    hex_right(&mut b[..8], u64::from(name.ty.code()));
    hex_right(&mut b[8..], name.number);
    b
}

/// `v` in lowercase hex, right-aligned in `out` (at least one digit), as `{:Nx}`
/// with N = `out.len()` writes a value that fits.
fn hex_right(out: &mut [u8], mut v: u64) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(v & 0xf) as usize];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
}

/// The lockd mode of a glock DLM mode.
#[doc(hidden)] // also the cluster simulator's (fs/tests/cluster_sim)
pub fn lockd_mode(mode: DlmMode) -> Mode {
    match mode {
        DlmMode::Nl => Mode::NL,
        DlmMode::Pr => Mode::PR,
        DlmMode::Cw => Mode::CW,
        DlmMode::Ex => Mode::EX,
    }
}

/// The glock DLM mode of a granted lockd mode (CR and PW are never asked for).
#[doc(hidden)] // also the cluster simulator's (fs/tests/cluster_sim)
pub fn glock_mode(mode: Mode) -> Option<DlmMode> {
    match mode {
        Mode::NL => Some(DlmMode::Nl),
        Mode::PR => Some(DlmMode::Pr),
        Mode::CW => Some(DlmMode::Cw),
        Mode::EX => Some(DlmMode::Ex),
        Mode::CR | Mode::PW => None,
    }
}

/// The mode a BAST reports, as the glock mode that asks for the same demote: CR
/// conflicts only with EX (as PR does for a glock: demote to SH), PW with everything
/// but NL and CR (as EX: demote to UN).
#[doc(hidden)] // also the cluster simulator's (fs/tests/cluster_sim)
pub fn bast_mode(mode: Mode) -> DlmMode {
    match mode {
        Mode::NL => DlmMode::Nl,
        Mode::CR | Mode::PR => DlmMode::Pr,
        Mode::CW => DlmMode::Cw,
        Mode::PW | Mode::EX => DlmMode::Ex,
    }
}

/// The lockd flags of a glock request. `CONVERT` is not passed: `convert` implies it.
/// Every other flag the machine emits exists in lockd with the Linux DLM's meaning.
#[doc(hidden)] // also the cluster simulator's (fs/tests/cluster_sim)
pub fn lockd_flags(f: DlmFlags) -> Flags {
    const MAP: [(DlmFlags, Flags); 8] = [
        (DlmFlags::NOQUEUE, Flags::NOQUEUE),
        (DlmFlags::NOQUEUEBAST, Flags::NOQUEUEBAST),
        (DlmFlags::NOORDER, Flags::NOORDER),
        (DlmFlags::HEADQUE, Flags::HEADQUE),
        (DlmFlags::ALTPR, Flags::ALTPR),
        (DlmFlags::ALTCW, Flags::ALTCW),
        (DlmFlags::QUECVT, Flags::QUECVT),
        (DlmFlags::VALBLK, Flags::VALBLK),
    ];
    let mut out = Flags::empty();
    for (g, l) in MAP {
        if f.contains(g) {
            out |= l;
        }
    }
    out
}

/// The machine's view of an AST.
fn ast_result(ast: &Ast) -> AstResult {
    match ast.status {
        Status::Granted => match ast.mode.and_then(glock_mode) {
            Some(m) => AstResult::Granted(m),
            None => AstResult::Error,
        },
        Status::Again => AstResult::TryFailed,
        Status::Canceled => AstResult::Cancelled,
        Status::Deadlock => AstResult::Deadlock,
        Status::Unlocked => AstResult::Error,
    }
}

/// Work for the demote thread.
enum Work {
    Sync(GlockName),
    Invalidate(GlockName, bool),
}

/// The DLM operation outstanding on a glock (at most one: the machine's rule).
struct InFlight {
    /// Tells this operation's answers from a later one's.
    seq: u64,
    /// lockd knows the lock id (a conversion; or a new request once accepted).
    accepted: bool,
    /// A cancel was asked for (sent once `accepted`).
    cancel: bool,
}

struct Inner {
    glocks: Glocks,
    lkids: HashMap<GlockName, LkId>,
    by_lkid: HashMap<LkId, GlockName>,
    /// Holders an `acquire` waits for: `None` until granted or failed.
    waiters: HashMap<HolderId, Option<Result<GlState, GlockError>>>,
    /// Holders of [`GlockRuntime::prefetch`]: released as soon as they are granted.
    prefetched: std::collections::HashSet<HolderId>,
    inflight: HashMap<GlockName, InFlight>,
    /// BASTs that arrived before their lock id was known.
    early_basts: HashMap<LkId, Mode>,
    /// Consecutive failed DLM answers per glock.
    errors: HashMap<GlockName, u32>,
    /// The machine's next deadline, as the timer task knows it.
    deadline: Option<u64>,
    next_seq: u64,
    /// Withdrawn or shut down: no DLM requests, no demote work, acquires fail.
    stopped: bool,
    shut_down: bool,
    demote: mpsc::Sender<Work>,
}

/// One mount's glocks, driven: see the module docs. Shared as `Arc<GlockRuntime>`.
pub struct GlockRuntime {
    me: Weak<GlockRuntime>,
    inner: Mutex<Inner>,
    /// Wakes `acquire` callers when a waiter's entry is filled (or on withdraw).
    cond: Condvar,
    ls: LockspaceHandle,
    rt: tokio::runtime::Handle,
    epoch: Instant,
    ops: Mutex<Option<Weak<dyn GlockOps>>>,
    withdrawn: AtomicBool,
    requests: AtomicU64,
    /// Wakes the timer task when the machine's deadline changes.
    timer: Arc<Notify>,
    /// Stops the BAST and timer tasks (also when dropped).
    stop: watch::Sender<bool>,
}

/// A granted holder. Dropping it releases it ([`Glocks::release`]); the glock stays
/// cached unless a demote waits.
pub struct GlockHold {
    rt: Arc<GlockRuntime>,
    id: HolderId,
    name: GlockName,
    state: GlState,
}

impl GlockHold {
    pub fn name(&self) -> GlockName {
        self.name
    }

    /// The state held: the one asked for, or for ANY the other of SH/DF.
    pub fn state(&self) -> GlState {
        self.state
    }
}

impl fmt::Debug for GlockHold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GlockHold({} {} p:{})", self.name, self.state, self.id)
    }
}

impl Drop for GlockHold {
    fn drop(&mut self) {
        let mut g = self.rt.inner.lock();
        let now = self.rt.now_ms();
        g.glocks.release(self.id, now);
        self.rt.drain(&mut g);
    }
}

impl GlockRuntime {
    /// Starts the runtime on `ls` (a lockspace joined with `JoinKind::WithRecovery`):
    /// its BAST reader and timer as tasks on `rt`, and one OS thread for demote work.
    /// Takes the handle's BAST receiver.
    pub fn start(ls: LockspaceHandle, rt: tokio::runtime::Handle, tunables: Tunables) -> Arc<GlockRuntime> {
        let (demote, work) = mpsc::channel();
        let (stop, stop_rx) = watch::channel(false);
        let timer = Arc::new(Notify::new());
        let basts = ls.basts();
        let this = Arc::new_cyclic(|me| GlockRuntime {
            me: me.clone(),
            inner: Mutex::new(Inner {
                glocks: Glocks::new(tunables),
                lkids: HashMap::new(),
                by_lkid: HashMap::new(),
                waiters: HashMap::new(),
                prefetched: Default::default(),
                inflight: HashMap::new(),
                early_basts: HashMap::new(),
                errors: HashMap::new(),
                deadline: None,
                next_seq: 1,
                stopped: false,
                shut_down: false,
                demote,
            }),
            cond: Condvar::new(),
            ls,
            rt: rt.clone(),
            epoch: Instant::now(),
            ops: Mutex::new(None),
            withdrawn: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            timer: timer.clone(),
            stop,
        });
        rt.spawn(bast_task(Arc::downgrade(&this), basts, stop_rx.clone()));
        rt.spawn(timer_task(Arc::downgrade(&this), timer, stop_rx));
        let weak = Arc::downgrade(&this);
        // Failing to start a thread at mount time leaves nothing to run on.
        std::thread::Builder::new()
            .name("glock-demote".into())
            .spawn(move || demote_thread(weak, work))
            .expect("cannot start the glock demote thread");
        this
    }

    /// Sets the filesystem's side of demotes. Until set, `Sync` and `Invalidate` are
    /// answered at once.
    pub fn set_ops(&self, ops: Weak<dyn GlockOps>) {
        *self.ops.lock() = Some(ops);
    }

    /// Takes `name` in `state`, waiting for the DLM if needed. Blocks the calling
    /// thread: call it from ordinary OS threads (FUSE request threads, the mount's own
    /// threads, `spawn_blocking`), never on a tokio worker, never with the
    /// filesystem's metadata mutex held. `state` is SH, DF or EX. Fails with
    /// [`GlockError::TryAgain`] for a TRY request that would wait, [`GlockError::Io`]
    /// on a DLM error or once withdrawn.
    pub fn acquire(
        self: &Arc<Self>,
        name: GlockName,
        state: GlState,
        flags: HolderFlags,
    ) -> Result<GlockHold, GlockError> {
        let mut g = self.inner.lock();
        if g.stopped {
            return Err(GlockError::Io);
        }
        let (id, poll) = g.glocks.acquire(name, state, flags, self.now_ms());
        let hold = |state| GlockHold { rt: self.clone(), id, name, state };
        match poll {
            Poll::Granted(s) => {
                self.drain(&mut g);
                return Ok(hold(s));
            }
            Poll::Failed(e) => {
                self.drain(&mut g);
                return Err(e);
            }
            Poll::Pending => {}
        }
        // The wait may need a demote of this node's own glocks, whose sync and
        // invalidate take the metadata mutex: waiting with it held would deadlock.
        debug_assert!(!crate::fs::core_mutex_held(), "a DLM wait for {name} with the metadata mutex held");
        g.waiters.insert(id, None);
        self.drain(&mut g);
        loop {
            if let Some(Some(r)) = g.waiters.get(&id) {
                let r = *r;
                g.waiters.remove(&id);
                return match r {
                    Ok(s) => Ok(hold(s)),
                    Err(e) => {
                        // After a withdraw the machine still queues the holder.
                        let now = self.now_ms();
                        g.glocks.release(id, now);
                        self.drain(&mut g);
                        Err(e)
                    }
                };
            }
            self.cond.wait(&mut g);
        }
    }

    /// Whether local holders wait for `name` (during its demote: FUSE requests that may
    /// hold kernel locks an invalidation needs).
    pub fn has_waiters(&self, name: GlockName) -> bool {
        self.inner.lock().glocks.has_waiters(name)
    }

    /// The kernel confirmed an invalidation of `name` reported unconfirmed before
    /// ([`Glocks::inval_confirmed`]): a loan of the glock to local holders ends.
    pub fn inval_confirmed(&self, name: GlockName) {
        let mut g = self.inner.lock();
        if g.stopped {
            return;
        }
        let now = self.now_ms();
        g.glocks.inval_confirmed(name, now);
        self.drain(&mut g);
    }

    /// Whether another node asked for `name` and it has not gone yet
    /// ([`Glocks::demote_requested`]).
    pub fn demote_requested(&self, name: GlockName) -> bool {
        self.inner.lock().glocks.demote_requested(name)
    }

    /// Starts taking `name` in `state` and returns at once: the holder is released as
    /// soon as it is granted, leaving the glock cached, so that an `acquire` that comes
    /// soon after waits for the same DLM request rather than starting its own (GFS2's
    /// asynchronous glock requests). Two locks an operation will need then cost one
    /// round trip, not two. Never blocks: callable with the metadata mutex held.
    pub fn prefetch(self: &Arc<Self>, name: GlockName, state: GlState) {
        let mut g = self.inner.lock();
        if g.stopped {
            return;
        }
        let now = self.now_ms();
        let (id, poll) = g.glocks.acquire(name, state, HolderFlags::NONE, now);
        match poll {
            Poll::Granted(_) | Poll::Failed(_) => g.glocks.release(id, now),
            Poll::Pending => {
                g.prefetched.insert(id);
            }
        }
        self.drain(&mut g);
    }

    /// Takes `name` in `state` only if the cached state serves it with no DLM message
    /// and no wait ([`Glocks::try_cached`]).
    pub fn try_cached(self: &Arc<Self>, name: GlockName, state: GlState) -> Option<GlockHold> {
        let mut g = self.inner.lock();
        if g.stopped {
            return None;
        }
        let id = g.glocks.try_cached(name, state)?;
        let held = g.glocks.holder(id).and_then(|(_, s)| s).unwrap_or(state);
        Some(GlockHold { rt: self.clone(), id, name, state: held })
    }

    /// Gives up the cached DLM lock of `name` once no holder is left
    /// ([`Glocks::evict`]; GFS2's GL_NOCACHE): iopen glocks, which another node must be
    /// able to take EX as soon as this node closed the inode. False while holders
    /// remain.
    pub fn evict(&self, name: GlockName) -> bool {
        let mut g = self.inner.lock();
        if g.stopped {
            return false;
        }
        let now = self.now_ms();
        let done = g.glocks.evict(name, now);
        self.drain(&mut g);
        done
    }

    /// [`evict`](Self::evict), then waits (at most `timeout`) until the glock has gone
    /// down to UN (the DLM lock at NL, compatible with anything another node asks,
    /// and being unlocked). True once it has.
    pub fn evict_wait(&self, name: GlockName, timeout: std::time::Duration) -> bool {
        if !self.evict(name) {
            return false;
        }
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if matches!(self.inner.lock().glocks.state(name), None | Some(GlState::Un)) {
                return true;
            }
            if std::time::Instant::now() >= deadline || self.is_withdrawn() {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// lock_dlm's BLOCK_LOCKS ([`Glocks::set_blocked`]).
    pub fn set_blocked(&self, blocked: bool) {
        let mut g = self.inner.lock();
        let now = self.now_ms();
        g.glocks.set_blocked(blocked, now);
        self.drain(&mut g);
    }

    /// Stops for good: every waiting and later `acquire` fails with
    /// [`GlockError::Io`], no DLM request and no demote work is started any more, and
    /// the DLM locks are kept (a later [`shutdown`](Self::shutdown) does not unlock
    /// them: what this node held must go through lockspace recovery). Idempotent.
    pub fn withdraw(&self, reason: &str) {
        let mut g = self.inner.lock();
        self.withdraw_locked(&mut g, reason);
    }

    pub fn is_withdrawn(&self) -> bool {
        self.withdrawn.load(Ordering::SeqCst)
    }

    /// Since the start: demote rounds that lent a glock back to local waiters while
    /// the kernel had not confirmed an invalidation, and late invalidations
    /// (conversions sent before the kernel confirmed): [`Glocks::lends_and_late_invals`].
    pub fn lends_and_late_invals(&self) -> (u64, u64) {
        self.inner.lock().glocks.lends_and_late_invals()
    }

    /// DLM requests sent so far: locks, conversions, cancels and unlocks.
    pub fn dlm_requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Every glock's dump ([`Glocks::dump_all`]), for `concord glocks`.
    pub fn dump(&self) -> Vec<String> {
        let g = self.inner.lock();
        g.glocks.dump_all(self.now_ms())
    }

    /// The busy and contended glocks ([`Glocks::top`]), for `concord top`.
    pub fn top(&self) -> Vec<GlockTop> {
        let g = self.inner.lock();
        g.glocks.top(self.now_ms())
    }

    /// For unmount, before leaving the lockspace: fails waiting and later acquires as
    /// [`withdraw`](Self::withdraw) does, cancels requests in flight, unlocks every DLM
    /// lock and waits for lockd's answers (up to 10 s). Nothing is synced or
    /// invalidated: the filesystem has written everything back before. Does nothing
    /// after a withdraw. Blocks: call it from an ordinary thread.
    pub fn shutdown(&self) {
        {
            let mut g = self.inner.lock();
            if self.is_withdrawn() {
                tracing::warn!("glock runtime withdrawn: DLM locks kept for recovery");
                return;
            }
            if g.shut_down {
                return;
            }
            g.shut_down = true;
            self.stop_locked(&mut g);
        }
        let _ = self.stop.send(true);
        let Some(me) = self.me.upgrade() else { return };
        let (tx, rx) = mpsc::channel();
        self.rt.spawn(async move {
            me.unlock_all().await;
            let _ = tx.send(());
        });
        match rx.recv_timeout(SHUTDOWN_WAIT + Duration::from_secs(1)) {
            Ok(()) => tracing::debug!("glock runtime shut down"),
            Err(_) => tracing::warn!("glock runtime shutdown: lockd did not answer every unlock"),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn stop_locked(&self, g: &mut Inner) {
        g.stopped = true;
        for slot in g.waiters.values_mut() {
            if slot.is_none() {
                *slot = Some(Err(GlockError::Io));
            }
        }
        self.cond.notify_all();
    }

    /// A client error other than a refusal: the connection to lockd is gone (or
    /// speaks nonsense). Withdraws unless already stopped.
    fn lost(&self, e: &ClientError) {
        let mut g = self.inner.lock();
        if !g.stopped {
            self.withdraw_locked(&mut g, &format!("lockd: {e}"));
        }
    }

    fn withdraw_locked(&self, g: &mut Inner, reason: &str) {
        if !self.withdrawn.swap(true, Ordering::SeqCst) {
            tracing::error!(reason, "glock runtime withdrawn: no more DLM requests, every acquire fails");
        }
        self.stop_locked(g);
    }

    /// Carries out the machine's actions, then re-arms the timer. Called after every
    /// input, with the lock held; starts tasks and queues work but waits for nothing.
    fn drain(&self, g: &mut Inner) {
        let me = self.me.upgrade();
        while let Some(action) = g.glocks.poll_action() {
            match action {
                Action::Granted { holder, state } => self.complete(g, holder, Ok(state)),
                Action::Failed { holder, error } => self.complete(g, holder, Err(error)),
                action if g.stopped => tracing::debug!(?action, "glock runtime stopped: action dropped"),
                Action::Dlm { name, req } => match &me {
                    Some(me) => me.send_dlm(g, name, req),
                    None => tracing::debug!(%name, "glock runtime dropped: request not sent"),
                },
                Action::Cancel { name } => match &me {
                    Some(me) => me.send_cancel(g, name),
                    None => tracing::debug!(%name, "glock runtime dropped: cancel not sent"),
                },
                Action::Unlock { name } => self.send_unlock(g, name),
                Action::Sync { name } => {
                    let _ = g.demote.send(Work::Sync(name));
                }
                Action::Invalidate { name, metadata } => {
                    let _ = g.demote.send(Work::Invalidate(name, metadata));
                }
            }
        }
        let deadline = g.glocks.next_deadline();
        if deadline != g.deadline {
            g.deadline = deadline;
            self.timer.notify_one();
        }
    }

    fn complete(&self, g: &mut Inner, holder: HolderId, result: Result<GlState, GlockError>) {
        if g.prefetched.remove(&holder) {
            let now = self.now_ms();
            g.glocks.release(holder, now);
            return;
        }
        match g.waiters.get_mut(&holder) {
            Some(slot) => {
                *slot = Some(result);
                self.cond.notify_all();
            }
            None => {
                // Nobody waits for it (cannot happen through this API): do not leave
                // a holder granted forever.
                tracing::warn!(%holder, "glock grant for a holder nobody waits for; released");
                let now = self.now_ms();
                g.glocks.release(holder, now);
            }
        }
    }

    fn send_dlm(self: &Arc<Self>, g: &mut Inner, name: GlockName, req: DlmRequest) {
        let mode = lockd_mode(req.to);
        let flags = lockd_flags(req.flags);
        let seq = g.next_seq;
        g.next_seq += 1;
        let ls = self.ls.clone();
        let me = self.clone();
        if req.flags.contains(DlmFlags::CONVERT) {
            let Some(&lkid) = g.lkids.get(&name) else {
                self.withdraw_locked(g, &format!("{name}: conversion of a lock lockd does not know"));
                return;
            };
            g.inflight.insert(name, InFlight { seq, accepted: true, cancel: false });
            self.requests.fetch_add(1, Ordering::SeqCst);
            tracing::trace!(%name, %lkid, from = %req.from, to = %req.to, %flags, "dlm convert");
            self.rt.spawn(async move {
                let r = ls.convert(lkid, mode, flags, None).await;
                me.on_ast(name, seq, r);
            });
        } else {
            if let Some(old) = g.lkids.remove(&name) {
                tracing::warn!(%name, lkid = %old, "new DLM request while a lock id is known; forgetting it");
                g.by_lkid.remove(&old);
            }
            g.inflight.insert(name, InFlight { seq, accepted: false, cancel: false });
            self.requests.fetch_add(1, Ordering::SeqCst);
            tracing::trace!(%name, to = %req.to, %flags, "dlm request");
            self.rt.spawn(async move {
                match ls.request(&dlm_resource_name(name), mode, flags, None).await {
                    Ok(pending) => {
                        me.on_accepted(name, seq, pending.lkid);
                        let r = pending.ast().await;
                        me.on_ast(name, seq, r);
                    }
                    Err(e) => me.on_ast(name, seq, Err(e)),
                }
            });
        }
    }

    fn send_cancel(self: &Arc<Self>, g: &mut Inner, name: GlockName) {
        let Some(f) = g.inflight.get_mut(&name) else { return };
        if f.cancel {
            return;
        }
        f.cancel = true;
        let seq = f.seq;
        if f.accepted {
            if let Some(&lkid) = g.lkids.get(&name) {
                self.spawn_cancel(name, lkid, seq);
            }
        }
    }

    fn spawn_cancel(self: &Arc<Self>, name: GlockName, lkid: LkId, seq: u64) {
        self.requests.fetch_add(1, Ordering::SeqCst);
        let ls = self.ls.clone();
        let me = self.clone();
        self.rt.spawn(async move {
            for _ in 0..CANCEL_RETRIES {
                match ls.cancel(lkid).await {
                    Ok(()) => return,
                    Err(ClientError::Refused(e)) if e.kind == ErrorKind::NothingToCancel => {
                        // Too late (the AST is on its way), or the conversion has not
                        // reached lockd yet: ask again while it is outstanding.
                        if me.inner.lock().inflight.get(&name).is_none_or(|f| f.seq != seq) {
                            return;
                        }
                        tokio::time::sleep(CANCEL_RETRY).await;
                    }
                    Err(ClientError::Refused(e)) => {
                        tracing::warn!(%name, %lkid, error = %e, "cancel refused by lockd");
                        return;
                    }
                    Err(e) => {
                        me.lost(&e);
                        return;
                    }
                }
            }
        });
    }

    fn send_unlock(&self, g: &mut Inner, name: GlockName) {
        let Some(lkid) = g.lkids.remove(&name) else { return };
        g.by_lkid.remove(&lkid);
        g.errors.remove(&name);
        self.requests.fetch_add(1, Ordering::SeqCst);
        let ls = self.ls.clone();
        let me = self.me.clone();
        self.rt.spawn(async move {
            match ls.unlock(lkid, None).await {
                Ok(_) => {}
                Err(ClientError::Refused(e)) => tracing::warn!(%name, %lkid, error = %e, "unlock refused by lockd"),
                Err(e) => {
                    if let Some(me) = me.upgrade() {
                        me.lost(&e);
                    }
                }
            }
        });
    }

    /// lockd accepted a new request: its lock id is known from now on.
    fn on_accepted(self: &Arc<Self>, name: GlockName, seq: u64, lkid: LkId) {
        let mut g = self.inner.lock();
        g.lkids.insert(name, lkid);
        g.by_lkid.insert(lkid, name);
        if let Some(f) = g.inflight.get_mut(&name).filter(|f| f.seq == seq) {
            f.accepted = true;
            if f.cancel {
                self.spawn_cancel(name, lkid, seq);
            }
        }
        if let Some(mode) = g.early_basts.remove(&lkid) {
            if !g.stopped {
                let now = self.now_ms();
                g.glocks.handle_bast(name, bast_mode(mode), now);
                self.drain(&mut g);
            }
        }
    }

    /// The answer to the DLM operation `seq` on `name`.
    fn on_ast(&self, name: GlockName, seq: u64, r: Result<Ast, ClientError>) {
        let mut g = self.inner.lock();
        if g.inflight.get(&name).is_some_and(|f| f.seq == seq) {
            g.inflight.remove(&name);
        }
        let result = match r {
            Ok(ast) => {
                if ast.mode.is_none() {
                    // The lock is gone (a refused or cancelled new request).
                    if g.lkids.get(&name) == Some(&ast.lkid) {
                        g.lkids.remove(&name);
                    }
                    g.by_lkid.remove(&ast.lkid);
                } else {
                    let inner = &mut *g;
                    if let Entry::Vacant(e) = inner.lkids.entry(name) {
                        e.insert(ast.lkid);
                        inner.by_lkid.insert(ast.lkid, name);
                    }
                }
                tracing::trace!(%name, status = %ast.status, mode = ?ast.mode, "dlm ast");
                ast_result(&ast)
            }
            Err(ClientError::Refused(e)) => {
                tracing::warn!(%name, error = %e, "DLM request refused by lockd");
                AstResult::Error
            }
            Err(e) => {
                if !g.stopped {
                    self.withdraw_locked(&mut g, &format!("lockd: {e}"));
                }
                return;
            }
        };
        if g.stopped {
            return;
        }
        if result == AstResult::Error {
            let n = g.errors.entry(name).or_insert(0);
            *n += 1;
            if *n >= MAX_CONSECUTIVE_ERRORS {
                self.withdraw_locked(&mut g, &format!("{name}: {MAX_CONSECUTIVE_ERRORS} DLM requests failed in a row"));
                return;
            }
        } else {
            g.errors.remove(&name);
        }
        let now = self.now_ms();
        g.glocks.handle_ast(name, result, now);
        self.drain(&mut g);
    }

    fn on_bast(&self, lkid: LkId, mode: Mode) {
        let mut g = self.inner.lock();
        if g.stopped {
            return;
        }
        match g.by_lkid.get(&lkid) {
            Some(&name) => {
                tracing::trace!(%name, %lkid, %mode, "dlm bast");
                let now = self.now_ms();
                g.glocks.handle_bast(name, bast_mode(mode), now);
                self.drain(&mut g);
            }
            None => {
                if g.early_basts.len() >= MAX_EARLY_BASTS {
                    g.early_basts.clear();
                }
                g.early_basts.insert(lkid, mode);
            }
        }
    }

    fn on_timer(&self) {
        let mut g = self.inner.lock();
        if g.stopped {
            return;
        }
        let now = self.now_ms();
        g.glocks.handle_timeout(now);
        self.drain(&mut g);
    }

    fn on_work(&self, work: Work) {
        if self.inner.lock().stopped {
            return;
        }
        let ops = self.ops.lock().as_ref().and_then(Weak::upgrade);
        match work {
            Work::Sync(name) => {
                if let Some(ops) = ops {
                    if let Err(e) = ops.sync(name) {
                        self.withdraw(&format!("{name}: sync failed: {e}"));
                        return;
                    }
                }
                let mut g = self.inner.lock();
                let now = self.now_ms();
                g.glocks.sync_done(name, now);
                self.drain(&mut g);
            }
            Work::Invalidate(name, metadata) => {
                let confirmed = ops.is_none_or(|ops| ops.invalidate(name, metadata));
                let mut g = self.inner.lock();
                let now = self.now_ms();
                if confirmed {
                    g.glocks.inval_done(name, now);
                } else {
                    let late = g.glocks.lends_and_late_invals().1;
                    g.glocks.inval_unconfirmed(name, now);
                    if g.glocks.lends_and_late_invals().1 > late {
                        let dump = g.glocks.dump(name, now).unwrap_or_default();
                        tracing::debug!(%name, ?dump, "late kernel invalidation: converting with the kernel's invalidation still queued");
                    } else {
                        tracing::debug!(%name, "kernel invalidation unconfirmed: glock lent to local waiters");
                    }
                }
                self.drain(&mut g);
            }
        }
    }

    /// The shutdown's DLM side: cancel what is in flight, wait for those answers, then
    /// unlock every lock and wait for lockd's answers.
    async fn unlock_all(self: Arc<Self>) {
        let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
        loop {
            {
                let mut g = self.inner.lock();
                if g.inflight.is_empty() {
                    break;
                }
                let names: Vec<GlockName> = g.inflight.keys().copied().collect();
                for name in names {
                    self.send_cancel(&mut g, name);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("glock runtime shutdown: DLM requests still in flight");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let locks: Vec<(GlockName, LkId)> = {
            let mut g = self.inner.lock();
            g.by_lkid.clear();
            g.lkids.drain().collect()
        };
        let mut set = tokio::task::JoinSet::new();
        for (name, lkid) in locks {
            self.requests.fetch_add(1, Ordering::SeqCst);
            let ls = self.ls.clone();
            set.spawn(async move { (name, ls.unlock(lkid, None).await) });
        }
        while let Ok(Some(joined)) = tokio::time::timeout_at(deadline, set.join_next()).await {
            if let Ok((name, Err(e))) = joined {
                tracing::warn!(%name, error = %e, "unlock at shutdown failed");
            }
        }
    }
}

async fn bast_task(
    rt: Weak<GlockRuntime>,
    mut basts: tokio::sync::mpsc::UnboundedReceiver<concord_lockd::client::Bast>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let bast = tokio::select! {
            _ = stop.changed() => return,
            b = basts.recv() => b,
        };
        let Some(rt) = rt.upgrade() else { return };
        match bast {
            Some(b) => rt.on_bast(b.lkid, b.mode),
            None => {
                // The connection to lockd is gone (or the lockspace was left).
                if !rt.inner.lock().stopped {
                    rt.withdraw("lockd connection lost (BAST stream ended)");
                }
                return;
            }
        }
    }
}

async fn timer_task(rt: Weak<GlockRuntime>, notify: Arc<Notify>, mut stop: watch::Receiver<bool>) {
    // A deadline that fired and did not move: wait a little before firing it again.
    let mut fired: Option<u64> = None;
    loop {
        let (deadline, at) = {
            let Some(rt) = rt.upgrade() else { return };
            let deadline = rt.inner.lock().deadline;
            let at = deadline.map(|d| {
                let d = if fired == Some(d) { d.max(rt.now_ms() + 10) } else { d };
                tokio::time::Instant::from_std(rt.epoch + Duration::from_millis(d))
            });
            (deadline, at)
        };
        tokio::select! {
            _ = stop.changed() => return,
            _ = notify.notified() => {}
            _ = async {
                match at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let Some(rt) = rt.upgrade() else { return };
                fired = deadline;
                rt.on_timer();
            }
        }
    }
}

fn demote_thread(rt: Weak<GlockRuntime>, work: mpsc::Receiver<Work>) {
    // Ends when the runtime (which holds the sender) is dropped.
    while let Ok(w) = work.recv() {
        let Some(rt) = rt.upgrade() else { return };
        rt.on_work(w);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::glock::GlockType;

    #[test]
    fn resource_names_are_gfs2s() {
        let n = GlockName::new(GlockType::Inode, 0x1a);
        assert_eq!(dlm_resource_name(n), b"       2              1a".to_vec());
        assert_eq!(dlm_resource_name(GlockName::new(GlockType::Rgrp, u64::MAX)).len(), 24);
        // The hand-written hex is `format!("{:8x}{:16x}")`, digit for digit.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut numbers = vec![0, 1, 0xf, 0x10, u64::MAX, 1 << 63];
        for _ in 0..1000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            numbers.push(x >> (x % 64));
        }
        for ty in [GlockType::Inode, GlockType::Rgrp, GlockType::Iopen, GlockType::Nondisk] {
            for &n in &numbers {
                let want = format!("{:8x}{:16x}", ty.code(), n);
                assert_eq!(dlm_resource_name_bytes(GlockName::new(ty, n)), want.as_bytes(), "{ty:?} {n:#x}");
            }
        }
    }

    #[test]
    fn flags_map_to_lockd_and_are_accepted() {
        let all = DlmFlags(0x1ff);
        let f = lockd_flags(all);
        assert_eq!(f.to_string(), "NOQUEUE|VALBLK|QUECVT|NOQUEUEBAST|HEADQUE|NOORDER|ALTPR|ALTCW");
        assert!(Flags::CONVERT_ALLOWED.contains(f));
        assert!(
            Flags::REQUEST_ALLOWED.contains(lockd_flags(all & DlmFlags(!(DlmFlags::QUECVT.0 | DlmFlags::CONVERT.0))))
        );
        assert_eq!(lockd_flags(DlmFlags::CONVERT), Flags::empty());
    }

    #[test]
    fn modes_round_trip() {
        for m in [DlmMode::Nl, DlmMode::Pr, DlmMode::Cw, DlmMode::Ex] {
            assert_eq!(glock_mode(lockd_mode(m)), Some(m));
            assert_eq!(bast_mode(lockd_mode(m)), m);
        }
        assert_eq!(bast_mode(Mode::CR), DlmMode::Pr);
        assert_eq!(bast_mode(Mode::PW), DlmMode::Ex);
    }
}
