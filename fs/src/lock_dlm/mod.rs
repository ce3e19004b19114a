//! lock_dlm: who may mount a shared filesystem, and when, and the control of journal
//! recovery after a node dies — GFS2's `fs/gfs2/lock_dlm.c` mount and recovery
//! protocol (../shared/seed/lock_dlm.c.txt), ported as a sans-IO core.
//!
//! * Two nondisk DLM locks: **mounted_lock**, held PR by every mounted node (whoever
//!   gets it EX with NOQUEUE is the first mounter), and **control_lock**, whose LVB
//!   ([`ControlLvb`]) holds the latest lockspace generation whose failures are
//!   accounted for and a bitmap of jids that need recovery.
//! * The **first mounter** gets both EX, replays every dirty journal, then
//!   ([`LockDlm::first_done`]) writes the generation, demotes mounted_lock to PR and
//!   control_lock to NL. **Later mounters** retry (every [`MOUNT_RETRY_MS`]) until
//!   the LVB generation reaches their mount generation and the latest recovery
//!   generation, with no jid bit set and no DLM recovery in progress (the seed's
//!   wait1/wait2/wait3).
//! * **Recovery**: lockd's recover_prep / recover_slot / recover_done set
//!   BLOCK_LOCKS, record the departed jid, and queue the control work; the control
//!   work takes control_lock EX, writes the new generation and jid bits (only the
//!   first node to get there writes; the others find it done), asks the filesystem
//!   to recover each set jid, clears the bits of recovered jids, and unblocks locks
//!   when none is left — unless a new recover_prep came meanwhile (recover_block vs
//!   recover_start).
//!
//! [`LockDlm`] is fed events (lockd callbacks, DLM ASTs, recovery results, timeouts)
//! and drained for [`Action`]s; it does no I/O, keeps no clock and spawns nothing.
//! docs/internals/lock_dlm.md maps every seed function to its Rust counterpart and
//! says what the caller does with each action.

mod control;
mod lvb;
mod mount;
mod types;
mod work;

#[cfg(test)]
mod scenario;
#[cfg(test)]
mod sim;

pub use control::{LockDlm, GAVEUP_FIRST_RETRY_MS, GAVEUP_RETRY_MS, MOUNT_RETRY_MS};
pub use lvb::{ControlLvb, Lvb, GENERATION_DISABLED, JID_BITMAP_OFFSET, LVB_LEN, MAX_JIDS};
pub use types::{
    Action, AstResult, DlmOp, DlmRequest, Flags, Level, LkFlags, Mode, NondiskLock, RecoveryResult, RefuseReason,
};
