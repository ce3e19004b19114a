//! The vocabulary of the lock_dlm core: its two DLM locks, the requests it makes of
//! the DLM, the completions it is fed, and the actions it asks of its caller.

use std::fmt;
use std::ops::BitOr;

use super::lvb::{ControlLvb, Lvb, MAX_JIDS};

/// The two nondisk locks of the protocol (GFS2's `GFS2_CONTROL_LOCK` and
/// `GFS2_MOUNTED_LOCK`, glock type `LM_TYPE_NONDISK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NondiskLock {
    /// Blocks other mounters during first-mount recovery; its LVB holds the
    /// generation and the jids needing recovery.
    Control,
    /// Held PR by every mounted node: whoever gets it EX is the first mounter.
    Mounted,
}

impl NondiskLock {
    /// Both locks, in index order.
    pub const ALL: [NondiskLock; 2] = [NondiskLock::Control, NondiskLock::Mounted];

    /// GFS2's nondisk glock number (CONTROL 4, MOUNTED 5).
    pub const fn number(self) -> u64 {
        match self {
            NondiskLock::Control => 4,
            NondiskLock::Mounted => 5,
        }
    }

    pub(crate) const fn index(self) -> usize {
        match self {
            NondiskLock::Control => 0,
            NondiskLock::Mounted => 1,
        }
    }
}

impl fmt::Display for NondiskLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NondiskLock::Control => "control_lock",
            NondiskLock::Mounted => "mounted_lock",
        })
    }
}

/// The DLM modes this protocol uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Null.
    NL,
    /// Protected read.
    PR,
    /// Exclusive.
    EX,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// DLM request flags (`DLM_LKF_*`, with the Linux DLM's and lockd's values).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LkFlags(u32);

impl LkFlags {
    /// Answer "try failed" (-EAGAIN) instead of waiting.
    pub const NOQUEUE: LkFlags = LkFlags(0x0001);
    /// Convert an existing lock (set on every [`DlmOp::Convert`]).
    pub const CONVERT: LkFlags = LkFlags(0x0004);
    /// Read the LVB on grant, write it on a down-conversion from EX.
    pub const VALBLK: LkFlags = LkFlags(0x0008);

    /// No flags.
    pub const fn empty() -> LkFlags {
        LkFlags(0)
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: LkFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl BitOr for LkFlags {
    type Output = LkFlags;
    fn bitor(self, rhs: LkFlags) -> LkFlags {
        LkFlags(self.0 | rhs.0)
    }
}

impl fmt::Display for LkFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = [(LkFlags::CONVERT, "CONVERT"), (LkFlags::NOQUEUE, "NOQUEUE"), (LkFlags::VALBLK, "VALBLK")];
        let set: Vec<&str> = names.iter().filter(|(b, _)| self.contains(*b)).map(|(_, n)| *n).collect();
        if set.is_empty() {
            f.write_str("-")
        } else {
            f.write_str(&set.join("|"))
        }
    }
}

impl fmt::Debug for LkFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// One DLM operation on one of the two locks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DlmOp {
    /// A new lock (lockd `lock`); `flags` never holds CONVERT. Answer with
    /// [`LockDlm::dlm_ast`](super::LockDlm::dlm_ast).
    Lock { mode: Mode, flags: LkFlags },
    /// Convert the held lock (lockd `convert`); `flags` holds CONVERT. `lvb` is the
    /// LVB to write (set only on a down-conversion from EX with VALBLK). Answer with
    /// [`LockDlm::dlm_ast`](super::LockDlm::dlm_ast).
    Convert { mode: Mode, flags: LkFlags, lvb: Option<Lvb> },
    /// Unlock, fire and forget (only on a failed mount: the core expects no AST).
    Unlock,
}

/// A DLM request of the core.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DlmRequest {
    pub lock: NondiskLock,
    pub op: DlmOp,
}

impl fmt::Display for DlmRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.op {
            DlmOp::Lock { mode, flags } => write!(f, "{} lock {mode} {flags}", self.lock),
            DlmOp::Convert { mode, flags, lvb } => {
                write!(f, "{} convert {mode} {flags}", self.lock)?;
                if let Some(l) = lvb {
                    write!(f, " lvb=({})", ControlLvb::from_bytes(*l))?;
                }
                Ok(())
            }
            DlmOp::Unlock => write!(f, "{} unlock", self.lock),
        }
    }
}

/// The completion (AST) of a [`DlmOp::Lock`] or [`DlmOp::Convert`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AstResult {
    /// Granted (status 0). `lvb`: the resource's LVB when the request had VALBLK,
    /// passed as lockd returned it (like the seed's `sync_lock`, the core does not
    /// zero it on VALNOTVALID).
    Granted { lvb: Option<Lvb> },
    /// A NOQUEUE request could not be granted at once (-EAGAIN).
    TryFailed,
    /// Anything else: a refused call (no AST will follow), -EDEADLK, a lost lockd.
    Error(String),
}

impl fmt::Display for AstResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AstResult::Granted { lvb: Some(l) } => write!(f, "granted lvb=({})", ControlLvb::from_bytes(*l)),
            AstResult::Granted { lvb: None } => f.write_str("granted"),
            AstResult::TryFailed => f.write_str("try-failed"),
            AstResult::Error(e) => write!(f, "error {e}"),
        }
    }
}

/// The filesystem's answer to [`Action::RecoverJournal`] (`LM_RD_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryResult {
    /// Replayed, or found clean (`LM_RD_SUCCESS`).
    Success,
    /// Not done: another node holds the journal (its glock TRY failed) or replay
    /// failed (`LM_RD_GAVEUP`). The control work tries again after
    /// [`GAVEUP_FIRST_RETRY_MS`](super::GAVEUP_FIRST_RETRY_MS), doubling with each
    /// GAVEUP in a row up to [`GAVEUP_RETRY_MS`](super::GAVEUP_RETRY_MS).
    GaveUp,
}

impl fmt::Display for RecoveryResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The seed's words in "recover jid %d result %s".
        f.write_str(match self {
            RecoveryResult::Success => "success",
            RecoveryResult::GaveUp => "busy",
        })
    }
}

/// Why a mount was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefuseReason {
    /// The control_lock LVB holds generation 0xFFFFFFFF.
    Disabled,
    /// Our slot has no journal.
    SlotBeyondJournals { slot: u32, journals: u32 },
    /// `control_mount` before the lockspace join gave a slot (`recover_done`).
    NotJoined,
    /// `control_mount` called twice, or after `unmount`.
    BadState(String),
    /// A DLM request failed.
    Dlm { lock: NondiskLock, what: String, error: String },
    /// `unmount` while mounting.
    Unmounted,
}

impl fmt::Display for RefuseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RefuseReason::Disabled => {
                f.write_str("control_lock disabled: its LVB generation is 0xFFFFFFFF, which refuses every mount")
            }
            RefuseReason::SlotBeyondJournals { slot, journals } => {
                let last = if *journals > MAX_JIDS {
                    format!("; a control_lock LVB tracks at most {MAX_JIDS} journals")
                } else {
                    String::new()
                };
                write!(
                    f,
                    "this node's slot {slot} needs journal {} but the filesystem has {journals} journals \
                     (0 - {}): make it with more (mkfs -j) or mount on fewer nodes{last}",
                    slot - 1,
                    journals.saturating_sub(1)
                )
            }
            RefuseReason::NotJoined => f.write_str("control_mount before the lockspace join (no recover_done yet)"),
            RefuseReason::BadState(s) => write!(f, "control_mount: {s}"),
            RefuseReason::Dlm { lock, what, error } => write!(f, "{lock} {what} error {error}"),
            RefuseReason::Unmounted => f.write_str("unmounted while mounting"),
        }
    }
}

/// Severity of a [`Action::Log`] line (the seed's `fs_info` / `fs_err`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Info,
    Error,
}

/// What the caller must do; drained with [`LockDlm::poll_action`](super::LockDlm::poll_action).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this request to lockd; feed its AST back with `dlm_ast` (not for Unlock).
    Dlm(DlmRequest),
    /// Replay journal `jid` (take its journal glock EX with TRY; if a live node holds
    /// it, give up), then report with `recovery_result`. A request for a jid already
    /// being recovered is ignored, as `gfs2_recover_set` does.
    RecoverJournal { jid: u32 },
    /// Hold back every normal glock request from now on (journal and control locks,
    /// NOEXP, still go through).
    BlockLocks,
    /// Let normal glock requests go (gfs2_glock_thaw).
    UnblockLocks,
    /// `control_mount` succeeded with this jid. `first`: this node is the first
    /// mounter: replay every dirty journal (results may be reported with
    /// `recovery_result`; they are ignored until `first_done`), then call
    /// `first_done`. Otherwise replay only our own journal if dirty.
    MountReady { jid: u32, first: bool },
    /// `control_mount` failed: leave the lockspace, fail the mount with this reason.
    MountRefused(RefuseReason),
    /// Call `handle_timeout` at (or after) `at_ms`. Supersedes earlier Wakes.
    Wake { at_ms: u64 },
    /// A line for the log (the seed's messages).
    Log { level: Level, msg: String },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Dlm(r) => write!(f, "{r}"),
            Action::RecoverJournal { jid } => write!(f, "recover journal {jid}"),
            Action::BlockLocks => f.write_str("block locks"),
            Action::UnblockLocks => f.write_str("unblock locks"),
            Action::MountReady { jid, first: true } => write!(f, "mount ready jid={jid} first"),
            Action::MountReady { jid, first: false } => write!(f, "mount ready jid={jid}"),
            Action::MountRefused(r) => write!(f, "mount refused: {r}"),
            Action::Wake { at_ms } => write!(f, "wake at={at_ms}"),
            Action::Log { level: Level::Info, msg } => write!(f, "log: {msg}"),
            Action::Log { level: Level::Error, msg } => write!(f, "err: {msg}"),
        }
    }
}

/// The seed's `ls_recover_flags` (`DFL_*`, same bit numbers as GFS2's incore.h so
/// that "flags %lx" in the logs reads the same).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(u32);

impl Flags {
    /// Normal glock requests are held back.
    pub const BLOCK_LOCKS: Flags = Flags(1 << 0);
    /// Never set: lockd always delivers recovery callbacks (kept for the bit layout).
    pub const NO_DLM_OPS: Flags = Flags(1 << 1);
    /// This node is the first mounter and has not called `first_done` yet.
    pub const FIRST_MOUNT: Flags = Flags(1 << 2);
    /// `first_done` finished.
    pub const FIRST_MOUNT_DONE: Flags = Flags(1 << 3);
    /// `control_mount` succeeded; the control work owns BLOCK_LOCKS from now on.
    pub const MOUNT_DONE: Flags = Flags(1 << 4);
    /// Unmounting: no more control work.
    pub const UNMOUNT: Flags = Flags(1 << 5);
    /// Between recover_prep and recover_done.
    pub const DLM_RECOVERY: Flags = Flags(1 << 6);

    const NAMES: [(Flags, &'static str); 7] = [
        (Flags::BLOCK_LOCKS, "BLOCK_LOCKS"),
        (Flags::NO_DLM_OPS, "NO_DLM_OPS"),
        (Flags::FIRST_MOUNT, "FIRST_MOUNT"),
        (Flags::FIRST_MOUNT_DONE, "FIRST_MOUNT_DONE"),
        (Flags::MOUNT_DONE, "MOUNT_DONE"),
        (Flags::UNMOUNT, "UNMOUNT"),
        (Flags::DLM_RECOVERY, "DLM_RECOVERY"),
    ];

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    pub(crate) fn set(&mut self, f: Flags) {
        self.0 |= f.0;
    }

    pub(crate) fn clear(&mut self, f: Flags) {
        self.0 &= !f.0;
    }

    /// Names of the set flags, `|`-separated (`-` for none).
    pub fn names(self) -> String {
        let set: Vec<&str> = Self::NAMES.iter().filter(|(b, _)| self.contains(*b)).map(|(_, n)| *n).collect();
        if set.is_empty() {
            "-".to_string()
        } else {
            set.join("|")
        }
    }
}

impl fmt::Debug for Flags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x} ({})", self.0, self.names())
    }
}
