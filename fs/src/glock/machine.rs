//! The glock state machine: GFS2's glock.c (`may_grant`, `do_promote`, `run_queue`,
//! `do_xmote`, `finish_xmote`, `gfs2_glock_cb`) without threads, work queues or clocks.
//!
//! Every input is a method call carrying `now_ms`; every output is an [`Action`] drained
//! with [`Glocks::poll_action`]. See the module docs ([`crate::glock`]) for the order of
//! calls and docs/internals/glocks.md for the design.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;

use super::stats::GlockStats;
use super::types::{dlm_mode, make_flags, DlmFlags, DlmMode, GlFlags, GlState, GlockName, GlockType, HolderFlags};

/// One local request for a glock, from [`Glocks::acquire`] or [`Glocks::try_cached`]
/// until [`Glocks::release`] (or until it fails).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HolderId(pub u64);

impl fmt::Display for HolderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a holder was not granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum GlockError {
    /// A TRY request met a conflicting lock, here or on another node (GFS2's
    /// `GLR_TRYFAILED`).
    TryAgain,
    /// The DLM failed the request (GFS2's `LM_OUT_ERROR`, reported as `-EIO`).
    Io,
}

impl fmt::Display for GlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GlockError::TryAgain => "TryAgain",
            GlockError::Io => "Io",
        })
    }
}

impl std::error::Error for GlockError {}

/// The immediate outcome of [`Glocks::acquire`]. When `Pending`, exactly one
/// [`Action::Granted`] or [`Action::Failed`] for the holder follows later, unless the
/// holder is released first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// Held now, in this state (the requested one, or another that serves it: SH or DF
    /// under a cached EX, the other of SH/DF for ANY).
    Granted(GlState),
    Failed(GlockError),
    Pending,
}

/// What the DLM answered to the request in flight ([`Action::Dlm`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AstResult {
    /// Granted in this mode (the requested one, or its alternate after ALTPR/ALTCW).
    Granted(DlmMode),
    /// A NOQUEUE request met a conflict (`-EAGAIN`); the lock keeps its mode.
    TryFailed,
    /// The request was cancelled ([`Action::Cancel`]); the lock keeps its mode.
    Cancelled,
    /// A conversion deadlock (`-EDEADLK`); the lock keeps its mode. The glock unlocks
    /// to NL and asks again.
    Deadlock,
    /// Anything else; waiting holders fail with [`GlockError::Io`].
    Error,
}

/// A DLM request for one glock's lock: convert `from` → `to` (a first request, without
/// `CONVERT` in `flags`, creates the lock, its `from` is NL).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DlmRequest {
    pub from: DlmMode,
    pub to: DlmMode,
    pub flags: DlmFlags,
}

/// Work for the caller. See the module docs for what the runtime does with each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this request to the DLM; answer with [`Glocks::handle_ast`]. At most one is
    /// outstanding per glock.
    Dlm { name: GlockName, req: DlmRequest },
    /// Cancel the outstanding request (its AST then reports `Cancelled`, or `Granted`
    /// if the cancel came too late).
    Cancel { name: GlockName },
    /// Unlock the DLM lock and forget it: the glock is gone. No AST is expected.
    Unlock { name: GlockName },
    /// Make the object durable before others see it: commit the journal, log revokes,
    /// write back dirty data and metadata, wait for direct I/O. Answer with
    /// [`Glocks::sync_done`].
    Sync { name: GlockName },
    /// Drop cached copies (own caches and the kernel's, by FUSE notifications): data
    /// pages, and when `metadata` also attributes, entries and metadata. Answer with
    /// [`Glocks::inval_done`] once the kernel confirmed, or with
    /// [`Glocks::inval_unconfirmed`] when it did not in time.
    Invalidate { name: GlockName, metadata: bool },
    /// A queued holder is granted, in `state`.
    Granted { holder: HolderId, state: GlState },
    /// A queued holder failed; it is gone (releasing it is a no-op).
    Failed { holder: HolderId, error: GlockError },
}

/// Minimum hold time tunables (GFS2's `GL_GLOCK_*_HOLD`, at HZ=1000).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tunables {
    /// Starting value of every glock's minimum hold time.
    pub hold_time_default_ms: u64,
    /// Floor.
    pub hold_time_min_ms: u64,
    /// Ceiling (GFS2's maximum equals its default: growth only wins back what
    /// shrinking took).
    pub hold_time_max_ms: u64,
    /// Growth when a local holder waited longer than `long_wait_ms`.
    pub hold_time_incr_ms: u64,
    /// Shrink when a reply leaves the glock in a state other than the one it aimed for.
    pub hold_time_decr_ms: u64,
    pub long_wait_ms: u64,
    /// How many times one demote may lend the glock back to local waiters while its
    /// kernel invalidation is unconfirmed ([`Glocks::inval_unconfirmed`]) before it
    /// converts anyway.
    pub lend_rounds_max: u32,
    /// How long one such loan lasts at most (it ends sooner when no holder is left).
    pub lend_ms: u64,
}

impl Default for Tunables {
    fn default() -> Tunables {
        Tunables {
            hold_time_default_ms: 200,
            hold_time_min_ms: 10,
            hold_time_max_ms: 200,
            hold_time_incr_ms: 50,
            hold_time_decr_ms: 25,
            long_wait_ms: 1000,
            lend_rounds_max: 3,
            lend_ms: 300,
        }
    }
}

/// One glock as `concord top` shows it ([`Glocks::top`]).
#[derive(Clone, Copy, Debug)]
pub struct GlockTop {
    pub name: GlockName,
    pub state: GlState,
    /// Granted holders.
    pub holders: usize,
    /// Holders waiting, and the longest any of them has waited.
    pub waiters: usize,
    pub wait_ms: u64,
    pub stats: GlockStats,
}

#[derive(Clone, Copy, Debug)]
struct Holder {
    id: HolderId,
    /// Requested state.
    state: GlState,
    flags: HolderFlags,
    /// The state it holds, once granted.
    granted: Option<GlState>,
    queued_ms: u64,
}

/// What the DLM said, as `finish_xmote` sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    /// The lock is now in this state (granted, or unchanged after TRY failure or
    /// deadlock).
    State(GlState),
    Cancelled,
    Error,
}

/// The state change in progress (GFS2's `GLF_LOCK` is "not Idle").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    /// Waiting for [`Glocks::sync_done`].
    Sync,
    /// Waiting for [`Glocks::inval_done`].
    Inval,
    /// Waiting for the AST.
    Dlm,
    /// The AST arrived while recovery blocks locking; kept until unblocked (GFS2's
    /// `GLF_FROZEN` / `GLF_HAVE_FROZEN_REPLY`).
    Frozen(Reply),
}

#[derive(Debug)]
struct Glock {
    name: GlockName,
    state: GlState,
    /// The state the glock is moving to.
    target: GlState,
    /// Where a requested demote goes (`None`: no demote requested; GFS2 writes EX).
    demote_state: Option<GlState>,
    demote_time_ms: u64,
    flags: GlFlags,
    phase: Phase,
    /// The state of the current DLM step (may differ from `target`: SH → UN before
    /// retrying a failed conversion).
    xmote_to: GlState,
    xmote_flags: HolderFlags,
    /// Granted holders, all in one compatible state.
    granted: Vec<Holder>,
    /// Waiting holders in grant order.
    waiters: VecDeque<Holder>,
    hold_time_ms: u64,
    /// How many times the demote under way lent the glock back to local waiters.
    lend_rounds: u32,
    /// While lent: when the loan ends (the demote is pending until then).
    lend_until_ms: Option<u64>,
    /// The kernel confirmed an earlier unconfirmed invalidation while this one runs
    /// ([`Glocks::inval_confirmed`] during `Phase::Inval`).
    confirmed_in_inval: bool,
    /// Time of the last state change (GFS2's `gl_tchange`).
    tchange_ms: u64,
    /// Time the last DLM request was sent (GFS2's `gl_dstamp`).
    dstamp_ms: u64,
    stats: GlockStats,
}

/// State shared by all glocks: the outgoing actions, the holder index, tunables and
/// the recovery block.
#[derive(Debug)]
struct Ctx {
    actions: VecDeque<Action>,
    index: HashMap<HolderId, GlockName>,
    tun: Tunables,
    blocked: bool,
    /// The holder being acquired: its outcome is returned, not queued as an action.
    capture: Option<(HolderId, Option<Poll>)>,
    /// Mount-wide totals of the glocks' `lends` and `late_invals` (kept when a glock
    /// is evicted).
    lends: u64,
    late_invals: u64,
}

impl Ctx {
    fn complete(&mut self, holder: HolderId, result: Result<GlState, GlockError>) {
        if let Some((id, slot)) = &mut self.capture {
            if *id == holder {
                *slot = Some(match result {
                    Ok(s) => Poll::Granted(s),
                    Err(e) => Poll::Failed(e),
                });
                return;
            }
        }
        self.actions.push_back(match result {
            Ok(state) => Action::Granted { holder, state },
            Err(error) => Action::Failed { holder, error },
        });
    }
}

const TRY_ANY: HolderFlags = HolderFlags(HolderFlags::TRY.0 | HolderFlags::TRY_1CB.0);

impl Glock {
    fn new(name: GlockName, now_ms: u64, tun: &Tunables) -> Glock {
        Glock {
            name,
            state: GlState::Un,
            target: GlState::Un,
            demote_state: None,
            demote_time_ms: 0,
            flags: GlFlags::NONE,
            phase: Phase::Idle,
            xmote_to: GlState::Un,
            xmote_flags: HolderFlags::NONE,
            granted: Vec::new(),
            waiters: VecDeque::new(),
            hold_time_ms: tun.hold_time_default_ms,
            lend_rounds: 0,
            lend_until_ms: None,
            confirmed_in_inval: false,
            tchange_ms: now_ms,
            dstamp_ms: 0,
            stats: GlockStats::default(),
        }
    }

    fn locked(&self) -> bool {
        self.phase != Phase::Idle
    }

    fn has_holders(&self) -> bool {
        !self.granted.is_empty() || !self.waiters.is_empty()
    }

    /// GFS2's `may_grant`: the state `h` would hold if granted now, or `None`.
    ///
    /// With holders granted, a new one must match their state (SH with SH, DF with DF;
    /// EX is never shared), and an EXACT one also the cached state. Without, the cached
    /// state must be the requested one, or EX serving SH or DF (unless EXACT), or any
    /// state but UN for ANY.
    ///
    /// GFS2's may_grant lets an EXACT SH request share with an SH holder granted under
    /// a cached EX; Concord does not: the EXACT holder would then hold SH under EX, and
    /// an iopen glock's holder, held for as long as the inode is open, kept another
    /// node's SH request waiting on the demote for good (exact-beside-shared.txt).
    fn may_grant(&self, h: &Holder) -> Option<GlState> {
        if let Some(cur) = self.granted.first() {
            // Invariant: granted holders always have `granted` set.
            let cur = cur.granted.expect("granted holder without a state");
            if h.flags.contains(HolderFlags::EXACT) && self.state != h.state {
                return None;
            }
            return (cur != GlState::Ex && h.state == cur).then_some(cur);
        }
        if self.state == h.state {
            return Some(h.state);
        }
        if h.flags.contains(HolderFlags::EXACT) {
            return None;
        }
        if self.state == GlState::Ex {
            return matches!(h.state, GlState::Sh | GlState::Df).then_some(h.state);
        }
        if h.flags.contains(HolderFlags::ANY)
            && matches!(h.state, GlState::Sh | GlState::Df)
            && self.state != GlState::Un
        {
            return Some(self.state);
        }
        None
    }

    /// GFS2's `gfs2_should_queue_trylock`: a TRY request fails at once when a granted
    /// holder is in its way or a non-TRY waiter is ahead of it.
    fn should_queue_trylock(&self, h: &Holder) -> bool {
        if !self.granted.is_empty() && self.may_grant(h).is_none() {
            return false;
        }
        self.waiters.iter().all(|w| w.flags.intersects(TRY_ANY))
    }

    /// A holder's wait ended: one that waited longer than `long_wait_ms` lengthens the
    /// minimum hold time (GFS2's `gfs2_glock_update_hold_time`).
    fn waited(&mut self, h: &Holder, ctx: &Ctx, now_ms: u64) {
        if now_ms.saturating_sub(h.queued_ms) > ctx.tun.long_wait_ms {
            self.hold_time_ms = (self.hold_time_ms + ctx.tun.hold_time_incr_ms).min(ctx.tun.hold_time_max_ms);
        }
    }

    /// GFS2's `do_error`: fail waiting holders, all of them for an error, the TRY ones
    /// otherwise.
    fn do_error(&mut self, ctx: &mut Ctx, error: GlockError, now_ms: u64) {
        let mut keep = VecDeque::with_capacity(self.waiters.len());
        while let Some(h) = self.waiters.pop_front() {
            if error == GlockError::Io || h.flags.intersects(TRY_ANY) {
                ctx.index.remove(&h.id);
                self.waited(&h, ctx, now_ms);
                ctx.complete(h.id, Err(error));
            } else {
                keep.push_back(h);
            }
        }
        self.waiters = keep;
    }

    /// GFS2's `do_promote`: grant waiters in order while compatible. Returns false when
    /// the first waiter is blocked with no holder granted (the glock must change
    /// state); when a later waiter is blocked, queued TRY requests fail.
    fn do_promote(&mut self, ctx: &mut Ctx, now_ms: u64) -> bool {
        while let Some(h) = self.waiters.front() {
            match self.may_grant(h) {
                Some(state) => {
                    // Invariant: the loop condition saw a front element.
                    let mut h = self.waiters.pop_front().expect("front waiter vanished");
                    h.granted = Some(state);
                    self.waited(&h, ctx, now_ms);
                    ctx.complete(h.id, Ok(state));
                    self.granted.push(h);
                }
                None => {
                    if self.granted.is_empty() {
                        return false;
                    }
                    self.do_error(ctx, GlockError::TryAgain, now_ms);
                    return true;
                }
            }
        }
        true
    }

    /// GFS2's `request_demote` (`handle_callback`): note a demote to `state`, due now or
    /// after the minimum hold time. Two different demotes combine into UN.
    fn request_demote(&mut self, state: GlState, pending: bool, now_ms: u64) {
        self.flags.insert(if pending { GlFlags::PENDING_DEMOTE } else { GlFlags::DEMOTE });
        match self.demote_state {
            None => {
                self.demote_state = Some(state);
                self.demote_time_ms = now_ms;
            }
            Some(d) if d != GlState::Un && d != state => self.demote_state = Some(GlState::Un),
            Some(_) => {}
        }
    }

    /// GFS2's `gfs2_demote_wake`: the demote is done (or no longer needed).
    fn demote_wake(&mut self) {
        self.demote_state = None;
        self.lend_rounds = 0;
        self.lend_until_ms = None;
        self.flags.remove(GlFlags::DEMOTE | GlFlags::PENDING_DEMOTE);
    }

    /// When a pending demote becomes due: the minimum hold time after the last state
    /// change for inode glocks, at once for the others. `None` while nothing can fire.
    fn pending_deadline(&self) -> Option<u64> {
        if !self.flags.contains(GlFlags::PENDING_DEMOTE) || self.demote_state.is_none() || self.state == GlState::Un {
            return None;
        }
        if let Some(until) = self.lend_until_ms {
            return Some(until);
        }
        Some(if self.name.ty == GlockType::Inode { self.tchange_ms + self.hold_time_ms } else { self.tchange_ms })
    }

    /// GFS2's `state_change`: a reply that misses the target shortens the minimum hold
    /// time.
    fn state_change(&mut self, new: GlState, ctx: &Ctx, now_ms: u64) {
        if new != self.target {
            self.hold_time_ms =
                self.hold_time_ms.saturating_sub(ctx.tun.hold_time_decr_ms).max(ctx.tun.hold_time_min_ms);
        }
        self.state = new;
        self.tchange_ms = now_ms;
    }

    /// GFS2's `glock_work_func`: turn a due pending demote into a demote, then
    /// `run_queue`.
    fn work(&mut self, ctx: &mut Ctx, now_ms: u64) {
        if let Some(deadline) = self.pending_deadline() {
            if now_ms >= deadline {
                self.flags.remove(GlFlags::PENDING_DEMOTE);
                self.flags.insert(GlFlags::DEMOTE);
            }
        }
        if self.flags.contains(GlFlags::DEMOTE) {
            self.lend_until_ms = None;
        }
        self.run_queue(ctx, now_ms);
    }

    /// GFS2's `run_queue`: start a due demote once no holder is granted; otherwise grant
    /// what the cached state allows and, when the first waiter needs more, change
    /// state for it.
    fn run_queue(&mut self, ctx: &mut Ctx, now_ms: u64) {
        if self.locked() {
            return;
        }
        debug_assert!(!self.flags.contains(GlFlags::DEMOTE_IN_PROGRESS));
        // A demote from UN is already done: NL conflicts with nothing (GFS2 would
        // convert "down" to the demote state, e.g. after a stale BAST).
        if self.flags.contains(GlFlags::DEMOTE) && self.state != GlState::Un && self.demote_state != Some(self.state) {
            if !self.granted.is_empty() {
                return;
            }
            // Invariant: DEMOTE is only set together with a demote state.
            let to = self.demote_state.expect("DEMOTE without a demote state");
            self.flags.insert(GlFlags::DEMOTE_IN_PROGRESS);
            self.target = to;
            self.xmote(ctx, HolderFlags::NONE, to, now_ms);
            return;
        }
        if self.flags.contains(GlFlags::DEMOTE) {
            self.demote_wake();
        }
        if self.do_promote(ctx, now_ms) {
            return;
        }
        // Invariant: do_promote returns false only with a blocked first waiter.
        let first = *self.waiters.front().expect("blocked without a waiter");
        self.target = first.state;
        if !first.flags.intersects(TRY_ANY) {
            // A blocking request goes out: TRY requests queued behind it would wait.
            self.do_error(ctx, GlockError::TryAgain, now_ms);
        }
        self.xmote(ctx, first.flags, first.state, now_ms);
    }

    /// GFS2's `do_xmote`: change the lock to `to`. Leaving EX or DF syncs first;
    /// going to UN or DF from a cached state invalidates next; then the DLM is asked.
    fn xmote(&mut self, ctx: &mut Ctx, flags: HolderFlags, to: GlState, now_ms: u64) {
        debug_assert_ne!(self.state, to, "{}: xmote to the current state", self.name);
        self.xmote_to = to;
        self.xmote_flags = flags & (TRY_ANY | HolderFlags::NOEXP | HolderFlags::PRIORITY | HolderFlags::ANY);
        let blocking = !(to == GlState::Un || self.state == GlState::Ex || flags.intersects(TRY_ANY));
        self.flags.set(GlFlags::BLOCKING, blocking);
        if matches!(self.state, GlState::Ex | GlState::Df) {
            self.phase = Phase::Sync;
            ctx.actions.push_back(Action::Sync { name: self.name });
        } else {
            self.after_sync(ctx, now_ms);
        }
    }

    fn needs_inval(&self) -> bool {
        self.state != GlState::Un && matches!(self.xmote_to, GlState::Un | GlState::Df)
    }

    fn after_sync(&mut self, ctx: &mut Ctx, now_ms: u64) {
        // A demote to UN arrived while a demote to SH or DF was syncing: go to UN now
        // rather than after another round trip (GFS2 only notices after the reply).
        if self.flags.contains(GlFlags::DEMOTE_IN_PROGRESS)
            && self.demote_state == Some(GlState::Un)
            && self.xmote_to != GlState::Un
        {
            self.xmote_to = GlState::Un;
            self.target = GlState::Un;
            self.flags.remove(GlFlags::BLOCKING);
        }
        if self.needs_inval() {
            self.phase = Phase::Inval;
            self.confirmed_in_inval = false;
            ctx.actions.push_back(Action::Invalidate { name: self.name, metadata: self.xmote_to == GlState::Un });
        } else {
            self.send_dlm(ctx, now_ms);
        }
    }

    /// The invalidation was not confirmed by the kernel in time: a notification may
    /// wait for a kernel lock (a directory's i_rwsem, a page lock) held by a FUSE
    /// request that itself waits for this glock. During a demote whose first waiter
    /// the state still held serves, and fewer than `lend_rounds_max` times per demote,
    /// the glock is lent to local holders under that state (the DLM lock has not
    /// moved: nothing is given away): the demote becomes pending again, for at most
    /// `lend_ms`, and holders are granted as under a minimum hold time, so that the
    /// kernel's queued invalidation gets its locks between their requests. When the
    /// kernel confirms ([`Glocks::inval_confirmed`]), or at the deadline, the demote
    /// is due again and starts over (sync, invalidate, convert) once the granted
    /// holders left. Otherwise the conversion goes out anyway and the glock counts a
    /// late invalidation.
    fn inval_unconfirmed(&mut self, ctx: &mut Ctx, now_ms: u64) {
        if self.confirmed_in_inval {
            // The confirmation overtook this report: the kernel is clean.
            self.send_dlm(ctx, now_ms);
            return;
        }
        let lend = self.flags.contains(GlFlags::DEMOTE_IN_PROGRESS)
            && self.lend_rounds < ctx.tun.lend_rounds_max
            && self.waiters.front().is_some_and(|w| self.may_grant(w).is_some());
        if !lend {
            self.stats.late_invals += 1;
            ctx.late_invals += 1;
            self.send_dlm(ctx, now_ms);
            return;
        }
        self.lend_rounds += 1;
        self.stats.lends += 1;
        ctx.lends += 1;
        self.phase = Phase::Idle;
        self.flags.remove(GlFlags::DEMOTE_IN_PROGRESS | GlFlags::BLOCKING | GlFlags::DEMOTE);
        self.flags.insert(GlFlags::PENDING_DEMOTE);
        self.lend_until_ms = Some(now_ms + ctx.tun.lend_ms);
        self.target = self.state;
        // The first waiter fits (checked above): it is granted now, and the demote
        // restarts when the last holder leaves or at the deadline (work).
        self.do_promote(ctx, now_ms);
    }

    /// lock_dlm's `gdlm_lock`.
    fn send_dlm(&mut self, ctx: &mut Ctx, now_ms: u64) {
        self.stats.dcount += 1;
        if self.flags.contains(GlFlags::INITIAL) {
            self.stats.request(now_ms.saturating_sub(self.dstamp_ms));
        }
        self.dstamp_ms = now_ms;
        let to = dlm_mode(self.xmote_to);
        let flags = make_flags(
            self.name.ty.has_lvb(),
            self.xmote_flags,
            to,
            self.flags.contains(GlFlags::INITIAL),
            self.flags.contains(GlFlags::BLOCKING),
        );
        self.phase = Phase::Dlm;
        ctx.actions
            .push_back(Action::Dlm { name: self.name, req: DlmRequest { from: dlm_mode(self.state), to, flags } });
    }

    /// GFS2's `gfs2_should_freeze`: while recovery blocks locking, a reply is kept
    /// unless it is an error, the lock is going to UN, or a NOEXP holder waits.
    fn should_freeze(&self, reply: Reply) -> bool {
        matches!(reply, Reply::State(_))
            && self.target != GlState::Un
            && !self.waiters.iter().any(|w| w.flags.contains(HolderFlags::NOEXP))
    }

    /// GFS2's `finish_xmote`: the DLM replied.
    fn finish_xmote(&mut self, ctx: &mut Ctx, reply: Reply, now_ms: u64) {
        self.phase = Phase::Idle;
        let demoting = self.flags.contains(GlFlags::DEMOTE_IN_PROGRESS);
        if let Reply::State(s) = reply {
            // An ANY request granted in the alternate mode got what it asked for.
            if !demoting
                && matches!((s, self.target), (GlState::Sh, GlState::Df) | (GlState::Df, GlState::Sh))
                && self.waiters.front().is_some_and(|w| w.flags.contains(HolderFlags::ANY) && w.state == self.target)
            {
                self.target = s;
            }
            self.state_change(s, ctx, now_ms);
        }
        // A demote to UN arrived during a demote to SH or DF.
        if demoting && self.state != GlState::Un && self.demote_state == Some(GlState::Un) {
            self.target = GlState::Un;
        }
        if self.state != self.target {
            let first = self.waiters.front().map(|w| w.flags);
            if !demoting {
                let Some(first) = first else {
                    // Nobody waits any more (released or cancelled): settle here.
                    self.target = self.state;
                    return;
                };
                match reply {
                    Reply::Cancelled => {
                        self.target = self.state;
                        return;
                    }
                    Reply::Error => {
                        self.target = self.state;
                        self.do_error(ctx, GlockError::Io, now_ms);
                        return;
                    }
                    Reply::State(_) if first.intersects(TRY_ANY) => {
                        self.target = self.state;
                        self.do_error(ctx, GlockError::TryAgain, now_ms);
                        return;
                    }
                    Reply::State(_) => {}
                }
            }
            let flags = if demoting { HolderFlags::NONE } else { first.unwrap_or(HolderFlags::NONE) };
            match self.state {
                // Unlocked after a conversion deadlock: ask again.
                GlState::Un => self.xmote(ctx, flags, self.target, now_ms),
                // A conversion failed: unlock, then ask again.
                GlState::Sh | GlState::Df => self.xmote(ctx, flags, GlState::Un, now_ms),
                // A demote from EX failed (error or cancel): DEMOTE stays set and
                // run_queue starts it again.
                GlState::Ex => {
                    self.flags.remove(GlFlags::DEMOTE_IN_PROGRESS);
                    self.target = self.state;
                }
            }
            return;
        }
        if demoting {
            self.flags.remove(GlFlags::DEMOTE_IN_PROGRESS);
            self.demote_wake();
        }
        if self.state != GlState::Un {
            self.do_promote(ctx, now_ms);
        }
    }

    /// The letters of GFS2's glock dump `f:` field, plus Concord's own (see
    /// docs/internals/glocks.md).
    fn flag_letters(&self) -> String {
        let f = self.flags;
        let mut s = String::new();
        let mut add = |on: bool, c: char| {
            if on {
                s.push(c);
            }
        };
        add(self.locked(), 'l');
        add(f.contains(GlFlags::DEMOTE), 'D');
        add(f.contains(GlFlags::PENDING_DEMOTE), 'd');
        add(f.contains(GlFlags::DEMOTE_IN_PROGRESS), 'p');
        add(self.phase == Phase::Sync, 'S');
        add(self.phase == Phase::Inval, 'i');
        add(self.phase == Phase::Dlm, 'R');
        add(f.contains(GlFlags::INITIAL), 'a');
        add(matches!(self.phase, Phase::Frozen(_)), 'F');
        add(self.has_holders(), 'q');
        add(f.contains(GlFlags::BLOCKING), 'b');
        add(f.contains(GlFlags::CANCELING), 'C');
        add(f.contains(GlFlags::EVICT), 'v');
        add(self.lend_rounds > 0, 'L');
        s
    }
}

fn holder_letters(h: &Holder) -> String {
    let mut s = String::new();
    for (flag, c) in [
        (HolderFlags::TRY, 't'),
        (HolderFlags::TRY_1CB, 'T'),
        (HolderFlags::NOEXP, 'e'),
        (HolderFlags::ANY, 'A'),
        (HolderFlags::EXACT, 'E'),
        (HolderFlags::PRIORITY, 'p'),
    ] {
        if h.flags.contains(flag) {
            s.push(c);
        }
    }
    s.push(if h.granted.is_some() { 'H' } else { 'W' });
    s
}

/// All glocks of one mount.
#[derive(Debug)]
pub struct Glocks {
    /// Ordered, so that anything done for several glocks at once (unblocking,
    /// timeouts) happens in the same order on every run.
    glocks: BTreeMap<GlockName, Glock>,
    /// Glocks with a pending demote (the timer table).
    pending: BTreeSet<GlockName>,
    ctx: Ctx,
    next_holder: u64,
}

impl Glocks {
    pub fn new(tunables: Tunables) -> Glocks {
        Glocks {
            glocks: BTreeMap::new(),
            pending: BTreeSet::new(),
            ctx: Ctx {
                actions: VecDeque::new(),
                index: HashMap::new(),
                tun: tunables,
                blocked: false,
                capture: None,
                lends: 0,
                late_invals: 0,
            },
            next_holder: 1,
        }
    }

    pub fn tunables(&self) -> Tunables {
        self.ctx.tun
    }

    /// Asks for `name` in `state` (SH, DF or EX). Granted at once when the cached state
    /// serves it (GFS2's `may_grant`) and no demote is due; a TRY request fails at once
    /// when a local holder is in its way; otherwise it waits and, if the glock is idle,
    /// a DLM request (or the sync and invalidate before it) goes out.
    pub fn acquire(&mut self, name: GlockName, state: GlState, flags: HolderFlags, now_ms: u64) -> (HolderId, Poll) {
        assert_ne!(state, GlState::Un, "{name}: a holder asks for SH, DF or EX");
        let id = HolderId(self.next_holder);
        self.next_holder += 1;
        let ctx = &mut self.ctx;
        let gl = self.glocks.entry(name).or_insert_with(|| Glock::new(name, now_ms, &ctx.tun));
        let h = Holder { id, state, flags, granted: None, queued_ms: now_ms };
        if flags.intersects(TRY_ANY) && !gl.should_queue_trylock(&h) {
            return (id, Poll::Failed(GlockError::TryAgain));
        }
        gl.flags.remove(GlFlags::EVICT);
        gl.stats.qcount += 1;
        ctx.index.insert(id, name);
        if flags.contains(HolderFlags::PRIORITY) {
            gl.waiters.push_front(h);
        } else {
            gl.waiters.push_back(h);
        }
        ctx.capture = Some((id, None));
        if let (true, Phase::Frozen(reply)) = (flags.contains(HolderFlags::NOEXP), gl.phase) {
            // A NOEXP holder needs the reply recovery is holding back.
            gl.finish_xmote(ctx, reply, now_ms);
        }
        gl.work(ctx, now_ms);
        let poll = ctx.capture.take().and_then(|(_, p)| p).unwrap_or(Poll::Pending);
        self.settle(name);
        (id, poll)
    }

    /// Grants `state` on `name` only if that needs no DLM request, no wait and no
    /// queueing: the glock is cached in a state that serves it, nothing waits, no demote
    /// is due or under way. For hot paths (GFS2's `GL_NOBLOCK`, stricter: never during
    /// a demote).
    pub fn try_cached(&mut self, name: GlockName, state: GlState) -> Option<HolderId> {
        let gl = self.glocks.get_mut(&name)?;
        if state == GlState::Un
            || !gl.waiters.is_empty()
            || gl.locked()
            || gl.flags.intersects(GlFlags::DEMOTE | GlFlags::DEMOTE_IN_PROGRESS)
        {
            return None;
        }
        let id = HolderId(self.next_holder);
        let mut h = Holder { id, state, flags: HolderFlags::NONE, granted: None, queued_ms: 0 };
        h.granted = Some(gl.may_grant(&h)?);
        self.next_holder += 1;
        gl.flags.remove(GlFlags::EVICT);
        gl.granted.push(h);
        self.ctx.index.insert(id, name);
        Some(id)
    }

    /// Releases a granted holder, or withdraws a waiting one. The DLM lock stays cached
    /// when the last holder leaves, unless a demote is due, which then starts. Releasing
    /// an unknown (or failed) holder does nothing.
    pub fn release(&mut self, holder: HolderId, now_ms: u64) {
        let Some(name) = self.ctx.index.remove(&holder) else { return };
        // Invariant: the index only names existing glocks.
        let gl = self.glocks.get_mut(&name).expect("holder index names a missing glock");
        if let Some(pos) = gl.granted.iter().position(|h| h.id == holder) {
            gl.granted.remove(pos);
        } else if let Some(pos) = gl.waiters.iter().position(|h| h.id == holder) {
            gl.waiters.remove(pos);
            // The request in flight was for this holder and serves nobody else now.
            if pos == 0
                && gl.granted.is_empty()
                && gl.waiters.is_empty()
                && gl.phase == Phase::Dlm
                && !gl.flags.intersects(GlFlags::DEMOTE_IN_PROGRESS | GlFlags::CANCELING)
                && gl.xmote_to == gl.target
            {
                gl.flags.insert(GlFlags::CANCELING);
                self.ctx.actions.push_back(Action::Cancel { name });
            }
        }
        gl.work(&mut self.ctx, now_ms);
        self.settle(name);
    }

    /// The DLM answered the request in flight for `name`. Ignored when none is.
    pub fn handle_ast(&mut self, name: GlockName, result: AstResult, now_ms: u64) {
        let Some(gl) = self.glocks.get_mut(&name) else { return };
        if gl.phase != Phase::Dlm {
            return;
        }
        gl.stats.reply(now_ms.saturating_sub(gl.dstamp_ms), gl.flags.contains(GlFlags::BLOCKING));
        gl.flags.remove(GlFlags::CANCELING | GlFlags::BLOCKING);
        let reply = match result {
            AstResult::Granted(mode) => {
                gl.flags.insert(GlFlags::INITIAL);
                Reply::State(GlState::from_dlm(mode))
            }
            AstResult::TryFailed | AstResult::Deadlock => Reply::State(gl.state),
            AstResult::Cancelled => Reply::Cancelled,
            AstResult::Error => Reply::Error,
        };
        if self.ctx.blocked && gl.should_freeze(reply) {
            gl.phase = Phase::Frozen(reply);
        } else {
            gl.finish_xmote(&mut self.ctx, reply, now_ms);
            gl.work(&mut self.ctx, now_ms);
        }
        self.settle(name);
    }

    /// A BAST: another node waits for `mode`. Asks for a demote to the state compatible
    /// with it (EX → UN, CW → DF, PR → SH). An inode glock with holders queued keeps its
    /// state until the minimum hold time since its last state change has passed (a
    /// pending demote, see [`Glocks::next_deadline`]); other glocks demote as soon as
    /// their holders leave.
    pub fn handle_bast(&mut self, name: GlockName, mode: DlmMode, now_ms: u64) {
        let Some(gl) = self.glocks.get_mut(&name) else { return };
        let Some(to) = GlState::demote_for(mode) else { return };
        gl.stats.bcount += 1;
        // A glock on loan stays on loan until its deadline.
        let pending = gl.lend_until_ms.is_some()
            || (gl.name.ty == GlockType::Inode && gl.has_holders() && now_ms < gl.tchange_ms + gl.hold_time_ms);
        gl.request_demote(to, pending, now_ms);
        gl.work(&mut self.ctx, now_ms);
        self.settle(name);
    }

    /// The [`Action::Sync`] for `name` is done.
    pub fn sync_done(&mut self, name: GlockName, now_ms: u64) {
        let Some(gl) = self.glocks.get_mut(&name) else { return };
        if gl.phase == Phase::Sync {
            gl.after_sync(&mut self.ctx, now_ms);
        }
        self.settle(name);
    }

    /// The [`Action::Invalidate`] for `name` is done: the kernel confirmed it.
    pub fn inval_done(&mut self, name: GlockName, now_ms: u64) {
        let Some(gl) = self.glocks.get_mut(&name) else { return };
        if gl.phase == Phase::Inval {
            gl.send_dlm(&mut self.ctx, now_ms);
        }
        self.settle(name);
    }

    /// The [`Action::Invalidate`] for `name` ran, but the kernel did not confirm it in
    /// time (its notifications are still queued). During a demote with local waiters
    /// that the state still held serves, they are granted first and the demote starts
    /// over when they are done (at most [`Tunables::lend_rounds_max`] times per
    /// demote); otherwise the conversion goes out anyway and the glock counts a late
    /// invalidation (`late:` in the dump).
    pub fn inval_unconfirmed(&mut self, name: GlockName, now_ms: u64) {
        let Some(gl) = self.glocks.get_mut(&name) else { return };
        if gl.phase == Phase::Inval {
            gl.inval_unconfirmed(&mut self.ctx, now_ms);
        }
        self.settle(name);
    }

    /// The kernel confirmed the invalidation of `name` that was reported unconfirmed
    /// ([`Glocks::inval_unconfirmed`]): a loan ends now (holders that come wait for
    /// the demote, which starts over once the granted ones left). A confirmation
    /// that overtakes the report it answers counts as the invalidation's own; one
    /// that comes at any other time does nothing.
    pub fn inval_confirmed(&mut self, name: GlockName, now_ms: u64) {
        let Some(gl) = self.glocks.get_mut(&name) else { return };
        if gl.phase == Phase::Inval {
            gl.confirmed_in_inval = true;
        } else if gl.lend_until_ms.is_some() {
            gl.flags.remove(GlFlags::PENDING_DEMOTE);
            gl.flags.insert(GlFlags::DEMOTE);
            gl.work(&mut self.ctx, now_ms);
        }
        self.settle(name);
    }

    /// Since the start, over every glock: demote rounds that lent a glock back to
    /// local waiters, and late invalidations (conversions sent while the kernel had
    /// not confirmed the invalidation before them).
    pub fn lends_and_late_invals(&self) -> (u64, u64) {
        (self.ctx.lends, self.ctx.late_invals)
    }

    /// Fires due pending demotes.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        let due: Vec<GlockName> = self
            .pending
            .iter()
            .filter(|n| self.glocks.get(n).and_then(Glock::pending_deadline).is_some_and(|d| d <= now_ms))
            .copied()
            .collect();
        for name in due {
            if let Some(gl) = self.glocks.get_mut(&name) {
                gl.work(&mut self.ctx, now_ms);
            }
            self.settle(name);
        }
    }

    /// When [`Glocks::handle_timeout`] must next be called, if ever. Call after every
    /// batch of inputs: any input can move it.
    pub fn next_deadline(&self) -> Option<u64> {
        self.pending.iter().filter_map(|n| self.glocks.get(n).and_then(Glock::pending_deadline)).min()
    }

    /// Lock recovery's BLOCK_LOCKS (lock_dlm's `DFL_BLOCK_LOCKS`). While set, DLM
    /// replies that would give the glock a new state are held back (GFS2's frozen
    /// replies) unless a NOEXP holder waits for them; replies that fail, unlock or
    /// serve NOEXP holders go through, and holders served by cached states are still
    /// granted. Clearing it processes the held replies, in name order.
    pub fn set_blocked(&mut self, blocked: bool, now_ms: u64) {
        self.ctx.blocked = blocked;
        if blocked {
            return;
        }
        let frozen: Vec<GlockName> =
            self.glocks.iter().filter(|(_, g)| matches!(g.phase, Phase::Frozen(_))).map(|(n, _)| *n).collect();
        for name in frozen {
            if let Some(gl) = self.glocks.get_mut(&name) {
                if let Phase::Frozen(reply) = gl.phase {
                    gl.finish_xmote(&mut self.ctx, reply, now_ms);
                    gl.work(&mut self.ctx, now_ms);
                }
            }
            self.settle(name);
        }
    }

    pub fn blocked(&self) -> bool {
        self.ctx.blocked
    }

    /// Drops an unused glock: demotes it to UN (syncing and invalidating as any demote),
    /// then emits [`Action::Unlock`] (if the DLM knows the lock) and forgets it. Returns
    /// false, doing nothing, while holders are queued. A later `acquire` calls the
    /// eviction off.
    pub fn evict(&mut self, name: GlockName, now_ms: u64) -> bool {
        let Some(gl) = self.glocks.get_mut(&name) else { return true };
        if gl.has_holders() {
            return false;
        }
        gl.flags.insert(GlFlags::EVICT);
        if gl.state != GlState::Un {
            gl.request_demote(GlState::Un, false, now_ms);
        }
        gl.work(&mut self.ctx, now_ms);
        self.settle(name);
        true
    }

    /// The next action for the caller.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.ctx.actions.pop_front()
    }

    /// After every input on `name`: keep the timer table in step and finish an eviction.
    fn settle(&mut self, name: GlockName) {
        let Some(gl) = self.glocks.get(&name) else {
            self.pending.remove(&name);
            return;
        };
        if gl.flags.contains(GlFlags::PENDING_DEMOTE) && gl.demote_state.is_some() {
            self.pending.insert(name);
        } else {
            self.pending.remove(&name);
        }
        if gl.flags.contains(GlFlags::EVICT) && !gl.locked() && !gl.has_holders() && gl.state == GlState::Un {
            if gl.flags.contains(GlFlags::INITIAL) {
                self.ctx.actions.push_back(Action::Unlock { name });
            }
            self.glocks.remove(&name);
            self.pending.remove(&name);
        }
    }

    /// The cached state of `name` (`None` if the glock is not known).
    pub fn state(&self, name: GlockName) -> Option<GlState> {
        self.glocks.get(&name).map(|g| g.state)
    }

    /// Whether local holders wait on `name` (queued, not granted).
    pub fn has_waiters(&self, name: GlockName) -> bool {
        self.glocks.get(&name).is_some_and(|g| !g.waiters.is_empty())
    }

    /// Whether a demote of `name` that drops cached data (to UN or DF) was asked for
    /// and is not done: due, pending (the minimum hold time, or a loan to local
    /// waiters: [`Glocks::inval_unconfirmed`]) or under way.
    pub fn demote_requested(&self, name: GlockName) -> bool {
        self.glocks
            .get(&name)
            .is_some_and(|g| g.state != GlState::Un && matches!(g.demote_state, Some(GlState::Un | GlState::Df)))
    }

    /// The glock's flags (DEMOTE, PENDING_DEMOTE, ...).
    pub fn flags(&self, name: GlockName) -> Option<GlFlags> {
        self.glocks.get(&name).map(|g| g.flags)
    }

    /// The current minimum hold time of `name`.
    pub fn hold_time_ms(&self, name: GlockName) -> Option<u64> {
        self.glocks.get(&name).map(|g| g.hold_time_ms)
    }

    pub fn stats(&self, name: GlockName) -> Option<GlockStats> {
        self.glocks.get(&name).map(|g| g.stats)
    }

    /// The glock a holder belongs to, and the state it holds (`None` while waiting).
    pub fn holder(&self, holder: HolderId) -> Option<(GlockName, Option<GlState>)> {
        let name = *self.ctx.index.get(&holder)?;
        let gl = self.glocks.get(&name)?;
        let h = gl.granted.iter().chain(gl.waiters.iter()).find(|h| h.id == holder)?;
        Some((name, h.granted))
    }

    pub fn names(&self) -> impl Iterator<Item = GlockName> + '_ {
        self.glocks.keys().copied()
    }

    /// GFS2's glock dump for one glock: a `G:` line, then one ` H:` line per holder
    /// (granted first, then waiters in order).
    ///
    /// `G:  s:<state> n:<type/number> f:<flags> t:<target> d:<demote state>/<ms since
    /// the demote request> m:<min hold ms>`; ` H: s:<state> f:<flags> p:<holder id>`.
    pub fn dump(&self, name: GlockName, now_ms: u64) -> Option<Vec<String>> {
        let gl = self.glocks.get(&name)?;
        let (d, dtime) = match gl.demote_state {
            Some(d) => (d.as_str(), now_ms.saturating_sub(gl.demote_time_ms)),
            None => ("-", 0),
        };
        let mut line = format!(
            "G:  s:{} n:{} f:{} t:{} d:{}/{} m:{}",
            gl.state,
            gl.name,
            gl.flag_letters(),
            gl.target,
            d,
            dtime,
            gl.hold_time_ms
        );
        if gl.stats.lends > 0 || gl.stats.late_invals > 0 {
            line.push_str(&format!(" lent:{} late:{}", gl.stats.lends, gl.stats.late_invals));
        }
        let mut out = vec![line];
        for h in gl.granted.iter().chain(gl.waiters.iter()) {
            out.push(format!(" H: s:{} f:{} p:{}", h.granted.unwrap_or(h.state), holder_letters(h), h.id));
        }
        Some(out)
    }

    /// What `concord top` shows of every glock that is busy (holders waiting) or was
    /// ever asked for by another node: one [`GlockTop`] each, unsorted.
    pub fn top(&self, now_ms: u64) -> Vec<GlockTop> {
        self.glocks
            .values()
            .filter(|gl| !gl.waiters.is_empty() || gl.stats.bcount > 0)
            .map(|gl| GlockTop {
                name: gl.name,
                state: gl.state,
                holders: gl.granted.len(),
                waiters: gl.waiters.len(),
                wait_ms: gl.waiters.iter().map(|h| now_ms.saturating_sub(h.queued_ms)).max().unwrap_or(0),
                stats: gl.stats,
            })
            .collect()
    }

    /// Every glock's dump, in name order.
    pub fn dump_all(&self, now_ms: u64) -> Vec<String> {
        self.glocks.keys().filter_map(|n| self.dump(*n, now_ms)).flatten().collect()
    }

    /// GFS2's `glstats` line: `G: n:<name> rtt:<srtt>/<var> rttb:<srttb>/<var>
    /// irt:<sirt>/<var> dcnt: <n> qcnt: <n>` (times in ns).
    pub fn glstats(&self, name: GlockName) -> Option<String> {
        let s = self.glocks.get(&name)?.stats;
        Some(format!(
            "G: n:{} rtt:{}/{} rttb:{}/{} irt:{}/{} dcnt: {} qcnt: {}",
            name, s.srtt_ns, s.srttvar_ns, s.srttb_ns, s.srttvarb_ns, s.sirt_ns, s.sirtvar_ns, s.dcount, s.qcount
        ))
    }

    /// Checks the state machine's invariants (for tests and the simulator): granted
    /// holders compatible with each other and served by the glock's state; none while a
    /// demote is under way; the holder index and the timer table in step.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = 0;
        for (name, gl) in &self.glocks {
            if let Some(first) = gl.granted.first() {
                let held = first.granted.ok_or(format!("{name}: granted holder without state"))?;
                if gl.granted.len() > 1 && gl.granted.iter().any(|h| h.granted != Some(held) || held == GlState::Ex) {
                    return Err(format!("{name}: granted holders are incompatible"));
                }
                if !(held == gl.state || (gl.state == GlState::Ex && held != GlState::Un)) {
                    return Err(format!("{name}: holder in {held} under glock state {}", gl.state));
                }
                if gl.flags.contains(GlFlags::DEMOTE_IN_PROGRESS) {
                    return Err(format!("{name}: holder granted while a demote is in progress"));
                }
                if gl.granted.iter().any(|h| h.flags.contains(HolderFlags::EXACT) && h.granted != Some(gl.state)) {
                    return Err(format!("{name}: EXACT holder granted under glock state {}", gl.state));
                }
            }
            if gl.flags.contains(GlFlags::DEMOTE_IN_PROGRESS) && !gl.locked() {
                return Err(format!("{name}: demote in progress but not locked"));
            }
            if gl.flags.contains(GlFlags::DEMOTE) && gl.demote_state.is_none() {
                return Err(format!("{name}: DEMOTE without a demote state"));
            }
            if gl.waiters.iter().any(|h| h.granted.is_some()) || gl.granted.iter().any(|h| h.granted.is_none()) {
                return Err(format!("{name}: holder queues mixed up"));
            }
            for h in gl.granted.iter().chain(gl.waiters.iter()) {
                seen += 1;
                if self.ctx.index.get(&h.id) != Some(name) {
                    return Err(format!("{name}: holder {} missing from the index", h.id));
                }
            }
            let pending = gl.flags.contains(GlFlags::PENDING_DEMOTE) && gl.demote_state.is_some();
            if pending != self.pending.contains(name) {
                return Err(format!("{name}: timer table out of step"));
            }
        }
        if seen != self.ctx.index.len() {
            return Err(format!("holder index has {} entries, queues {seen}", self.ctx.index.len()));
        }
        Ok(())
    }
}
