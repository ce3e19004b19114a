//! [`LockDlm`]: the seed's mount and recovery control as a sans-IO state machine.
//!
//! The seed runs `control_mount` and `control_first_done` on the mount thread and
//! `gfs2_control_func` on a workqueue, both calling the DLM synchronously
//! (`sync_lock`). Here each of them is a chain of steps: a step sends one DLM request
//! ([`Action::Dlm`]) and the next step runs when its AST comes back through
//! [`LockDlm::dlm_ast`]; sleeps and delayed work are timers ([`Action::Wake`],
//! [`LockDlm::handle_timeout`]). At most one request per lock is in flight, and the
//! control work never runs while a mount step waits for the DLM (the seed relies on
//! the two never overlapping; here it is enforced).

use std::collections::VecDeque;

use super::lvb::{ControlLvb, GENERATION_DISABLED, MAX_JIDS};
use super::mount::MountStep;
use super::types::{
    Action, AstResult, DlmOp, DlmRequest, Flags, Level, LkFlags, Mode, NondiskLock, RecoveryResult, RefuseReason,
};
use super::work::WorkStep;

/// The seed's `msleep_interruptible(500)` before every control_lock EX attempt of
/// `control_mount`.
pub const MOUNT_RETRY_MS: u64 = 500;

/// Delay of the control work after the first GAVEUP result since the last success or
/// recovery generation; each further GAVEUP in a row doubles it, up to
/// [`GAVEUP_RETRY_MS`]. The seed waits `HZ` every time; a survivor that lost the race
/// for a journal then held its locks blocked for a second after a replay that takes
/// tens of milliseconds. Each retry costs a control_lock EX/NL round and one TRY of
/// the journal glock, which fails at once while the replaying node holds it.
pub const GAVEUP_FIRST_RETRY_MS: u64 = 50;

/// Longest delay of the control work after a GAVEUP result (the seed's `HZ`): a
/// journal that cannot be recovered (a replay that fails again and again) is tried
/// once a second, as in the seed.
pub const GAVEUP_RETRY_MS: u64 = 1000;

/// The recover arrays grow by this many jids (`RECOVER_SIZE_INC`).
const RECOVER_SIZE_INC: usize = 16;

/// The core's timers, one table (STYLE 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Timer {
    /// `control_mount`'s sleep before the next control_lock EX attempt.
    MountRetry = 0,
    /// The delayed control work (`queue_delayed_work(gfs2_control_wq, ...)`).
    ControlWork = 1,
}

/// One mount's lock_dlm state: the seed's `lm_lockstruct` recovery fields and the
/// logic of `control_mount`, `control_first_done`, `gdlm_recover_prep/slot/done`,
/// `gdlm_recovery_result` and `gfs2_control_func`.
///
/// # Driving it
///
/// 1. Join the lockspace; give the Joined reply to [`recover_done`](Self::recover_done)
///    (its generation, our slot, `&[slot]`).
/// 2. [`control_mount`](Self::control_mount); then feed lockd's recovery events to
///    [`recover_prep`](Self::recover_prep), [`recover_slot`](Self::recover_slot) and
///    [`recover_done`](Self::recover_done) as they come, each AST of a request to
///    [`dlm_ast`](Self::dlm_ast), each journal recovery's outcome to
///    [`recovery_result`](Self::recovery_result), and call
///    [`handle_timeout`](Self::handle_timeout) when [`next_timeout`](Self::next_timeout)
///    (also announced as [`Action::Wake`]) is reached.
/// 3. After every call, drain [`poll_action`](Self::poll_action) until `None` and do
///    what each action says, in order.
/// 4. On [`Action::MountReady`] with `first`, replay every dirty journal, then call
///    [`first_done`](Self::first_done).
/// 5. On unmount (or lockd's `Stopped`: fenced), call [`unmount`](Self::unmount),
///    then leave the lockspace.
pub struct LockDlm {
    /// Journals of the filesystem (`mkfs -j`).
    pub(super) journals: u32,
    pub(super) flags: Flags,
    /// recover_start when the last recover_prep came (`ls_recover_block`).
    pub(super) recover_block: u32,
    /// Generation of the last recover_done (`ls_recover_start`).
    pub(super) recover_start: u32,
    /// Generation of our first recover_done (`ls_recover_mount`); 0 until then.
    pub(super) recover_mount: u32,
    /// Our jid: slot of our first recover_done, minus one.
    pub(super) jid: Option<u32>,
    /// Per jid: recover_block of the recover_slot that named it (0: none).
    pub(super) recover_submit: Vec<u32>,
    /// Per jid: the last journal recovery result not yet folded into the LVB.
    pub(super) recover_result: Vec<Option<RecoveryResult>>,
    /// The control_lock lksb's LVB buffer (`ls_control_lvb`).
    pub(super) control_lvb: ControlLvb,
    /// Working copy of the LVB (`ls_lvb_bits`).
    pub(super) lvb_bits: ControlLvb,
    /// Mode granted per lock (None: no lock).
    pub(super) held: [Option<Mode>; 2],
    /// Mode of the request in flight per lock.
    pub(super) pending: [Option<Mode>; 2],
    pub(super) mount: MountStep,
    pub(super) work: WorkStep,
    pub(super) timers: [Option<u64>; 2],
    /// The last Wake announced and not yet answered by `handle_timeout`.
    pub(super) announced: Option<u64>,
    /// control_lock EX attempts of control_mount so far.
    pub(super) retries: u32,
    /// We were the first mounter (`ls_first`).
    pub(super) first: bool,
    /// GAVEUP results in a row since the last success or recover_done: the next
    /// retry's delay doubles with each ([`GAVEUP_FIRST_RETRY_MS`]).
    pub(super) gaveups: u32,
    pub(super) actions: VecDeque<Action>,
}

impl LockDlm {
    /// A core for a filesystem with `journals` journals, before the lockspace join.
    pub fn new(journals: u32) -> LockDlm {
        let mut s = LockDlm {
            journals,
            flags: Flags::default(),
            recover_block: 0,
            recover_start: 0,
            recover_mount: 0,
            jid: None,
            recover_submit: Vec::new(),
            recover_result: Vec::new(),
            control_lvb: ControlLvb::zeroed(),
            lvb_bits: ControlLvb::zeroed(),
            held: [None; 2],
            pending: [None; 2],
            mount: MountStep::Idle,
            work: WorkStep::Idle,
            timers: [None; 2],
            announced: None,
            retries: 0,
            first: false,
            gaveups: 0,
            actions: VecDeque::new(),
        };
        s.set_recover_size(journals.min(MAX_JIDS) as usize);
        s
    }

    // ---- queries ----

    /// The next action to carry out, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) has something to do: the earliest
    /// timer that can run (the control work waits while a DLM request is in flight).
    pub fn next_timeout(&self) -> Option<u64> {
        let mut next = self.timers[Timer::MountRetry as usize];
        if self.control_work_runnable() {
            if let Some(t) = self.timers[Timer::ControlWork as usize] {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        next
    }

    /// Our jid, once the first recover_done gave our slot.
    pub fn jid(&self) -> Option<u32> {
        self.jid
    }

    /// The `DFL_*` flags.
    pub fn flags(&self) -> Flags {
        self.flags
    }

    /// Whether normal glock requests must wait (DFL_BLOCK_LOCKS).
    pub fn block_locks(&self) -> bool {
        self.flags.contains(Flags::BLOCK_LOCKS)
    }

    /// Whether this node mounted as first mounter (`ls_first`).
    pub fn first(&self) -> bool {
        self.first
    }

    /// (recover_block, recover_start, recover_mount).
    pub fn generations(&self) -> (u32, u32, u32) {
        (self.recover_block, self.recover_start, self.recover_mount)
    }

    /// The control_lock LVB as last read or written by this node.
    pub fn control_lvb(&self) -> ControlLvb {
        self.control_lvb
    }

    /// Jids named by recover_slot and not yet put in the LVB (jid, generation).
    pub fn recover_submit(&self) -> Vec<(u32, u32)> {
        let it = self.recover_submit.iter().enumerate();
        it.filter(|(_, g)| **g != 0).map(|(j, g)| (j as u32, *g)).collect()
    }

    /// Journal recovery results not yet folded into the LVB.
    pub fn recover_result(&self) -> Vec<(u32, RecoveryResult)> {
        let it = self.recover_result.iter().enumerate();
        it.filter_map(|(j, r)| r.map(|r| (j as u32, r))).collect()
    }

    /// control_lock EX attempts made by `control_mount`.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    // ---- inputs: mount ----

    /// `control_mount`: find out whether we are the first mounter, else wait until
    /// every recovery before our mount is done. Ends with [`Action::MountReady`] or
    /// [`Action::MountRefused`]. Call after the first [`recover_done`](Self::recover_done).
    pub fn control_mount(&mut self) {
        if self.flags.contains(Flags::UNMOUNT) {
            self.refuse(RefuseReason::BadState("called after unmount".into()));
            return;
        }
        if self.mount != MountStep::Idle || self.flags.contains(Flags::MOUNT_DONE) {
            self.log(Level::Error, "control_mount: already mounting or mounted; ignored".into());
            return;
        }
        let Some(jid) = self.jid else {
            self.refuse(RefuseReason::NotJoined);
            return;
        };
        if jid >= self.journals || jid >= MAX_JIDS {
            let last = self.journals.saturating_sub(1);
            self.log(
                Level::Error,
                format!("can't mount journal #{jid}: there are only {} journals (0 - {last})", self.journals),
            );
            self.refuse(RefuseReason::SlotBeyondJournals { slot: jid + 1, journals: self.journals });
            return;
        }
        self.retries = 0;
        self.control_lvb = ControlLvb::zeroed();
        self.set_block_locks(true);
        self.request(NondiskLock::Control, DlmOp::Lock { mode: Mode::NL, flags: LkFlags::VALBLK });
        self.mount = MountStep::ControlNl;
        self.announce();
    }

    /// `gdlm_first_done` / `control_first_done`: the first mounter has replayed every
    /// journal; let others mount (mounted_lock -> PR, control_lock -> NL writing the
    /// generation with no jid bits). Waits for a DLM recovery in progress to end first.
    pub fn first_done(&mut self) {
        if self.flags.contains(Flags::UNMOUNT) {
            return;
        }
        self.first_done_step();
        self.announce();
    }

    /// `gdlm_unmount`: no more control work. Then leave the lockspace (lockd drops
    /// both locks). A mount in progress ends with [`RefuseReason::Unmounted`].
    pub fn unmount(&mut self) {
        self.flags.set(Flags::UNMOUNT);
        self.timers = [None; 2];
        self.work = WorkStep::Idle;
        let mounting = self.mount.is_mounting();
        self.mount = MountStep::Idle;
        self.pending = [None; 2];
        if mounting {
            self.actions.push_back(Action::MountRefused(RefuseReason::Unmounted));
        }
    }

    // ---- inputs: lockd recovery callbacks ----

    /// `gdlm_recover_prep` (lockd `RecoveryEvent::Prep`): lock recovery starts.
    pub fn recover_prep(&mut self) {
        self.recover_block = self.recover_start;
        self.flags.set(Flags::DLM_RECOVERY);
        if !self.flags.contains(Flags::MOUNT_DONE) || self.flags.contains(Flags::FIRST_MOUNT) {
            return;
        }
        self.set_block_locks(true);
    }

    /// `gdlm_recover_slot` (lockd `RecoveryEvent::Slot`): the member with `slot` left
    /// uncleanly or died; its journal (slot - 1) needs recovery.
    pub fn recover_slot(&mut self, slot: u32) {
        let Some(jid) = slot.checked_sub(1) else {
            self.log(Level::Error, "recover_slot slot 0 ignored".into());
            return;
        };
        let size = self.recover_submit.len();
        if jid as usize >= size {
            self.log(Level::Error, format!("recover_slot jid {jid} gen {} short size {size}", self.recover_block));
            return;
        }
        if jid >= self.journals {
            // Such a node was refused at mount: it never wrote a journal.
            self.log(
                Level::Info,
                format!(
                    "recover_slot jid {jid} gen {} has no journal ({} journals)",
                    self.recover_block, self.journals
                ),
            );
            return;
        }
        let prev = self.recover_submit[jid as usize];
        if prev != 0 {
            self.log(Level::Info, format!("recover_slot jid {jid} gen {} prev {prev}", self.recover_block));
        }
        self.recover_submit[jid as usize] = self.recover_block;
    }

    /// `gdlm_recover_done` (lockd `RecoveryEvent::Done`, and the Joined reply as our
    /// first one): lock recovery of `generation` is over; `slots` are the members'
    /// slots. Queues the control work.
    pub fn recover_done(&mut self, now_ms: u64, generation: u64, our_slot: u32, slots: &[u32]) {
        let generation = match u32::try_from(generation) {
            Ok(g) if g != 0 && g != GENERATION_DISABLED => g,
            _ => {
                // The LVB has 32 bits; 0 and 0xFFFFFFFF mean something else there.
                self.log(
                    Level::Error,
                    format!("recover_done generation {generation} does not fit the control_lock LVB"),
                );
                return;
            }
        };
        let max_slot = slots.iter().copied().chain([our_slot]).max().unwrap_or(0);
        self.set_recover_size(max_slot as usize);
        self.recover_start = generation;
        self.gaveups = 0;
        if self.recover_mount == 0 {
            self.recover_mount = generation;
            self.jid = our_slot.checked_sub(1);
            if self.jid.is_none() {
                self.log(Level::Error, "recover_done: our slot is 0".into());
            }
        }
        if !self.flags.contains(Flags::UNMOUNT) {
            self.queue_control_work(now_ms, 0);
        }
        self.flags.clear(Flags::DLM_RECOVERY);
        if self.mount == MountStep::FirstDoneWait {
            self.mount = MountStep::Idle;
            self.first_done_step();
        }
        self.announce();
    }

    // ---- inputs: the filesystem and the DLM ----

    /// `gdlm_recovery_result`: the filesystem's outcome of an
    /// [`Action::RecoverJournal`] (or of replaying our own journal, which is ignored).
    pub fn recovery_result(&mut self, now_ms: u64, jid: u32, result: RecoveryResult) {
        if self.jid == Some(jid) || self.flags.contains(Flags::FIRST_MOUNT) {
            return;
        }
        let size = self.recover_result.len();
        if jid as usize >= size {
            self.log(Level::Error, format!("recovery_result jid {jid} short size {size}"));
            return;
        }
        self.log(Level::Info, format!("recover jid {jid} result {result}"));
        self.recover_result[jid as usize] = Some(result);
        let delay = match result {
            RecoveryResult::GaveUp => {
                self.gaveups = self.gaveups.saturating_add(1);
                gaveup_delay_ms(self.gaveups)
            }
            RecoveryResult::Success => {
                self.gaveups = 0;
                0
            }
        };
        if !self.flags.contains(Flags::UNMOUNT) {
            self.queue_control_work(now_ms, delay);
        }
        self.announce();
    }

    /// The AST of the request in flight on `lock`.
    pub fn dlm_ast(&mut self, now_ms: u64, lock: NondiskLock, result: AstResult) {
        if self.flags.contains(Flags::UNMOUNT) {
            return;
        }
        let Some(mode) = self.pending[lock.index()].take() else {
            self.log(Level::Error, format!("{lock} AST with no request in flight: {result}"));
            return;
        };
        if matches!(result, AstResult::Granted { .. }) {
            self.held[lock.index()] = Some(mode);
        }
        if self.mount.waits_for() == Some(lock) {
            self.mount_ast(now_ms, result);
        } else if self.work.waits_for() == Some(lock) {
            self.work_ast(result);
        } else {
            // `pending` is only set by a step that waits for it.
            debug_assert!(false, "{lock} AST for no step");
        }
        self.announce();
    }

    /// Runs what is due at `now_ms`: the next control_lock attempt of a mount, the
    /// control work.
    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.announced = None;
        if self.timers[Timer::MountRetry as usize].is_some_and(|t| t <= now_ms) {
            self.timers[Timer::MountRetry as usize] = None;
            if self.mount == MountStep::Delay {
                let flags = LkFlags::CONVERT | LkFlags::NOQUEUE | LkFlags::VALBLK;
                self.request(NondiskLock::Control, DlmOp::Convert { mode: Mode::EX, flags, lvb: None });
                self.mount = MountStep::ControlEx;
            }
        }
        if self.control_work_runnable() && self.timers[Timer::ControlWork as usize].is_some_and(|t| t <= now_ms) {
            self.timers[Timer::ControlWork as usize] = None;
            self.control_work();
        }
        self.announce();
    }

    // ---- helpers ----

    pub(super) fn request(&mut self, lock: NondiskLock, op: DlmOp) {
        let i = lock.index();
        match &op {
            DlmOp::Lock { mode, .. } | DlmOp::Convert { mode, .. } => {
                debug_assert!(self.pending[i].is_none(), "two requests in flight on {lock}");
                self.pending[i] = Some(*mode);
            }
            DlmOp::Unlock => {
                self.held[i] = None;
                self.pending[i] = None;
            }
        }
        self.actions.push_back(Action::Dlm(DlmRequest { lock, op }));
    }

    pub(super) fn set_block_locks(&mut self, on: bool) {
        if self.flags.contains(Flags::BLOCK_LOCKS) == on {
            return;
        }
        if on {
            self.flags.set(Flags::BLOCK_LOCKS);
            self.actions.push_back(Action::BlockLocks);
        } else {
            self.flags.clear(Flags::BLOCK_LOCKS);
            self.actions.push_back(Action::UnblockLocks);
        }
    }

    pub(super) fn clear_recover_arrays(&mut self) {
        self.recover_submit.iter_mut().for_each(|g| *g = 0);
        self.recover_result.iter_mut().for_each(|r| *r = None);
    }

    /// `set_recover_size`: the arrays cover jids below `slots` (slot numbers start at
    /// 1), in steps of RECOVER_SIZE_INC, never beyond the LVB's bitmap.
    fn set_recover_size(&mut self, slots: usize) {
        let want = slots.min(MAX_JIDS as usize);
        let mut size = self.recover_submit.len();
        while size < want {
            size += RECOVER_SIZE_INC;
        }
        let size = size.min(MAX_JIDS as usize);
        self.recover_submit.resize(size, 0);
        self.recover_result.resize(size, None);
    }

    pub(super) fn log(&mut self, level: Level, msg: String) {
        self.actions.push_back(Action::Log { level, msg });
    }

    /// Announces the next timer if it changed since the last announcement.
    pub(super) fn announce(&mut self) {
        let next = self.next_timeout();
        if next.is_some() && next != self.announced {
            self.actions.push_back(Action::Wake { at_ms: next.unwrap_or_default() });
        }
        self.announced = next;
    }
}

/// Delay of the control work after the `n`th GAVEUP in a row (n >= 1): 50, 100, 200,
/// 400, 800 ms, then 1 s.
pub(super) fn gaveup_delay_ms(n: u32) -> u64 {
    let doublings = n.saturating_sub(1).min(16);
    (GAVEUP_FIRST_RETRY_MS << doublings).min(GAVEUP_RETRY_MS)
}

/// An AST result as the seed prints errors (`-EAGAIN` for a failed try).
pub(super) fn error_text(result: &AstResult) -> String {
    match result {
        AstResult::Granted { .. } => "0".into(),
        AstResult::TryFailed => "-EAGAIN".into(),
        AstResult::Error(e) => e.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(c: &mut LockDlm) -> Vec<String> {
        std::iter::from_fn(|| c.poll_action()).map(|a| a.to_string()).collect()
    }

    /// A core joined with slot 1 in generation 1, its mount at the control_lock EX try.
    fn at_ex_try() -> LockDlm {
        let mut c = LockDlm::new(3);
        c.recover_done(0, 1, 1, &[1]);
        c.control_mount();
        c.dlm_ast(0, NondiskLock::Control, AstResult::Granted { lvb: Some([0; 32]) });
        c.dlm_ast(0, NondiskLock::Mounted, AstResult::Granted { lvb: None });
        assert_eq!(c.next_timeout(), Some(0), "the control work queued by recover_done");
        c.handle_timeout(0);
        assert_eq!(c.next_timeout(), Some(MOUNT_RETRY_MS));
        c.handle_timeout(MOUNT_RETRY_MS);
        drain(&mut c);
        c
    }

    #[test]
    fn control_mount_before_join_is_refused() {
        let mut c = LockDlm::new(3);
        c.control_mount();
        assert_eq!(drain(&mut c), ["mount refused: control_mount before the lockspace join (no recover_done yet)"]);
    }

    #[test]
    fn generation_beyond_32_bits_is_ignored() {
        let mut c = LockDlm::new(3);
        c.recover_done(0, 1 << 32, 1, &[1]);
        assert_eq!(c.jid(), None);
        assert_eq!(drain(&mut c), ["err: recover_done generation 4294967296 does not fit the control_lock LVB"]);
        c.recover_done(0, u64::from(GENERATION_DISABLED), 1, &[1]);
        assert_eq!(c.jid(), None);
    }

    #[test]
    fn dlm_error_refuses_the_mount_and_unlocks_both_locks() {
        let mut c = at_ex_try();
        c.dlm_ast(MOUNT_RETRY_MS, NondiskLock::Control, AstResult::Error("-EINVAL".into()));
        assert_eq!(
            drain(&mut c),
            [
                "err: control_mount control_lock EX error -EINVAL",
                "mounted_lock unlock",
                "control_lock unlock",
                "mount refused: control_lock EX error -EINVAL",
            ]
        );
        assert!(c.block_locks());
        assert_eq!(c.next_timeout(), None);
    }

    #[test]
    fn mounted_pr_try_failure_refuses_the_mount() {
        let mut c = at_ex_try();
        c.dlm_ast(MOUNT_RETRY_MS, NondiskLock::Control, AstResult::Granted { lvb: Some([0; 32]) });
        c.dlm_ast(MOUNT_RETRY_MS, NondiskLock::Mounted, AstResult::TryFailed);
        c.dlm_ast(MOUNT_RETRY_MS, NondiskLock::Mounted, AstResult::TryFailed);
        let out = drain(&mut c);
        assert_eq!(out.last().map(String::as_str), Some("mount refused: mounted_lock PR error -EAGAIN"));
    }

    #[test]
    fn unmount_while_mounting_ends_the_mount() {
        let mut c = at_ex_try();
        c.unmount();
        assert_eq!(drain(&mut c), ["mount refused: unmounted while mounting"]);
        // A late AST is dropped; no timer is left.
        c.dlm_ast(MOUNT_RETRY_MS, NondiskLock::Control, AstResult::Granted { lvb: None });
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.next_timeout(), None);
    }

    #[test]
    fn first_done_before_mount_is_a_sanity_error() {
        let mut c = LockDlm::new(3);
        c.recover_done(0, 1, 1, &[1]);
        drain(&mut c);
        c.first_done();
        assert_eq!(drain(&mut c), ["err: control_first_done start 1 block 0 flags 0"]);
    }

    #[test]
    fn ast_without_a_request_is_logged_and_dropped() {
        let mut c = LockDlm::new(3);
        c.dlm_ast(0, NondiskLock::Mounted, AstResult::TryFailed);
        assert_eq!(drain(&mut c), ["err: mounted_lock AST with no request in flight: try-failed"]);
    }

    #[test]
    fn gaveup_delays_the_control_work_and_success_does_not() {
        let mut c = LockDlm::new(3);
        c.recover_done(0, 1, 1, &[1, 2]);
        c.handle_timeout(0);
        drain(&mut c);
        c.recovery_result(100, 1, RecoveryResult::GaveUp);
        assert_eq!(drain(&mut c), ["log: recover jid 1 result busy", "wake at=150"]);
        // An earlier request wins (the work runs at most once per queueing).
        c.recovery_result(120, 1, RecoveryResult::Success);
        assert_eq!(drain(&mut c), ["log: recover jid 1 result success", "wake at=120"]);
        // Our own journal's result is not the control work's business.
        c.recovery_result(300, 0, RecoveryResult::Success);
        assert!(drain(&mut c).is_empty());
    }

    #[test]
    fn gaveup_retries_back_off_to_the_seeds_second_and_start_over_after_a_success() {
        let delays: Vec<u64> = (1..=8).map(gaveup_delay_ms).collect();
        assert_eq!(delays, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(gaveup_delay_ms(u32::MAX), GAVEUP_RETRY_MS);
        let mut c = LockDlm::new(3);
        c.recover_done(0, 1, 1, &[1, 2]);
        c.handle_timeout(0);
        drain(&mut c);
        let mut now = 0;
        for want in [50, 100, 200, 400, 800, 1000, 1000] {
            c.recovery_result(now, 1, RecoveryResult::GaveUp);
            assert_eq!(c.next_timeout(), Some(now + want), "after {} GAVEUPs", c.gaveups);
            now += want;
            c.handle_timeout(now);
        }
        c.recovery_result(now, 1, RecoveryResult::Success);
        c.handle_timeout(now);
        c.recovery_result(now, 1, RecoveryResult::GaveUp);
        assert_eq!(c.next_timeout(), Some(now + GAVEUP_FIRST_RETRY_MS), "a success starts the delays over");
        c.recovery_result(now, 1, RecoveryResult::GaveUp);
        c.recover_done(now, 2, 1, &[1]);
        assert_eq!(c.gaveups, 0, "a new recovery generation starts the delays over");
    }

    #[test]
    fn recover_arrays_grow_by_16_up_to_the_lvb_bitmap() {
        let mut c = LockDlm::new(3);
        assert_eq!(c.recover_submit.len(), 16);
        c.recover_done(0, 1, 1, &[1, 40]);
        assert_eq!(c.recover_submit.len(), 48);
        c.recover_done(0, 2, 1, &[1, 1000]);
        assert_eq!(c.recover_submit.len(), MAX_JIDS as usize);
    }
}
