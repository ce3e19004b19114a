//! The messages lockspace peers exchange (the remote half of `fs/dlm/lock.c`'s
//! `DLM_MSG_*`). One [`Message`] is one frame's payload for one lockspace; the
//! transport names the lockspace and the sending node.
//!
//! Every message is checked on receipt: a message that does not fit the receiver's
//! state (unknown lock, wrong sender, wrong state) is logged and dropped, never a
//! panic.

use serde::{Deserialize, Serialize};

use super::types::{Flags, LkId, Lvb, Mode, NodeId, SbFlags, Status};

/// A lockspace protocol message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Holder → directory node: who masters `name`? If nobody does, the sender
    /// becomes master.
    Lookup {
        /// Resource name.
        name: Vec<u8>,
    },
    /// Directory node → holder: `master` masters `name`.
    LookupReply {
        /// Resource name.
        name: Vec<u8>,
        /// The master (possibly the asking node itself).
        master: NodeId,
    },
    /// Holder → master: a new lock request. `lkid` is the holder's id for the lock.
    Request {
        /// Resource name.
        name: Vec<u8>,
        /// The holder's lock id.
        lkid: LkId,
        /// Requested mode.
        mode: Mode,
        /// Request flags.
        flags: Flags,
        /// The holder's LVB buffer, with VALBLK.
        lvb: Option<Lvb>,
    },
    /// Holder → master: convert a granted lock.
    Convert {
        /// Resource name.
        name: Vec<u8>,
        /// The holder's lock id.
        lkid: LkId,
        /// Requested mode.
        mode: Mode,
        /// Conversion flags.
        flags: Flags,
        /// The value to write, with VALBLK on a conversion down from PW/EX.
        lvb: Option<Lvb>,
    },
    /// Holder → master: unlock a granted lock; with `lvb`, write it (VALBLK) if the
    /// lock is held in PW or EX.
    Unlock {
        /// Resource name.
        name: Vec<u8>,
        /// The holder's lock id.
        lkid: LkId,
        /// Value to write.
        lvb: Option<Lvb>,
    },
    /// Holder → master: cancel the request or conversion in progress on the lock.
    Cancel {
        /// Resource name.
        name: Vec<u8>,
        /// The holder's lock id.
        lkid: LkId,
    },
    /// Master → holder: I do not master `name` (any more); look it up again and
    /// resend request `lkid`.
    NotMaster {
        /// Resource name.
        name: Vec<u8>,
        /// The holder's lock id.
        lkid: LkId,
    },
    /// Master → holder: completion of the operation in progress on `lkid`.
    Ast {
        /// The holder's lock id.
        lkid: LkId,
        /// Completion status.
        status: Status,
        /// Granted mode after the operation; None if the lock is gone.
        mode: Option<Mode>,
        /// Status flags.
        sb_flags: SbFlags,
        /// The lock's LVB, for a granted operation with VALBLK.
        lvb: Option<Lvb>,
    },
    /// Master → holder: another lock is blocked waiting for `mode`.
    Bast {
        /// The holder's lock id.
        lkid: LkId,
        /// The blocked mode.
        mode: Mode,
    },
    /// Master → directory node: I no longer master `name` (it had no locks for the
    /// idle time); forget it.
    Remove {
        /// Resource name.
        name: Vec<u8>,
    },
    /// Recovery, surviving master → new directory node: I master `name`.
    RecDirEntry {
        /// Resource name.
        name: Vec<u8>,
    },
    /// Recovery, to every member: all my directory entries have been sent (the
    /// per-link FIFO puts them before this). A directory node answers recovery
    /// lookups only once it has this from every member.
    RecDirDone,
    /// Recovery, holder → directory node: who masters `name` now? The first asker
    /// of a name with no surviving master becomes its master.
    RecLookup {
        /// Resource name.
        name: Vec<u8>,
    },
    /// Recovery, directory node → holder: `master` masters `name`.
    RecLookupReply {
        /// Resource name.
        name: Vec<u8>,
        /// The master.
        master: NodeId,
    },
    /// Recovery, holder → master: the holder's locks on `name`, as it sees them.
    RecLocks {
        /// Resource name.
        name: Vec<u8>,
        /// The holder's locks.
        locks: Vec<RecLock>,
        /// The directory named the receiver master in this generation (else
        /// the holder knows it from before recovery).
        directory: bool,
    },
    /// Recovery, master → holder: answer to [`Message::RecLocks`]. `truths` is
    /// None from a master that rebuilt the resource from the holders' reports, and
    /// one entry per reported lock from a master that kept it.
    RecLocksReply {
        /// Resource name.
        name: Vec<u8>,
        /// What the master knows of each reported lock.
        truths: Option<Vec<LockTruth>>,
    },
    /// Recovery, node → holder: I do not master `name`; look it up again.
    RecNotMaster {
        /// Resource name.
        name: Vec<u8>,
    },
    /// Recovery, to every member: I have reconciled all my locks with their
    /// masters. A node finishes recovery once it has this from every member.
    RecDone,
}

/// One lock as its holder reports it to the master during recovery.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecLock {
    /// The holder's lock id.
    pub lkid: LkId,
    /// The mode the holder holds (None: a request that was never granted).
    pub granted: Option<Mode>,
    /// A conversion in progress to a departed master that may have left the
    /// lock in a mode weaker in some way than `granted` (a PR↔CW conversion, or
    /// one with ALTPR/ALTCW whose alternate mode allows what `granted` forbids):
    /// its requested mode. The granted mode is unknown to the new master, which
    /// settles it (as Linux's `recover_conversion` does for PR↔CW).
    pub middle: Option<Mode>,
    /// With `middle`: the alternate mode (ALTPR/ALTCW) the departed master may
    /// have granted instead.
    #[serde(default)]
    pub alt: Option<Mode>,
    /// The holder's LVB buffer, if its last grant read it (VALBLK).
    pub lvb: Option<Lvb>,
    /// Completions the holder has heard of for this lock.
    pub seq: u32,
}

/// What a surviving master knows of one reported lock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockTruth {
    /// The holder's lock id.
    pub lkid: LkId,
    /// None if the master has no such lock.
    pub state: Option<TruthState>,
}

/// A lock as its master holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TruthState {
    /// Granted mode (None for a waiting request).
    pub granted: Option<Mode>,
    /// Mode of the request or conversion waiting on a queue.
    pub requested: Option<Mode>,
    /// Status flags of the lock's last grant.
    pub sb_flags: SbFlags,
    /// The lock's LVB buffer (what it read on its last grant).
    pub lvb: Lvb,
    /// Operations the master completed on the lock, and the status of the last:
    /// more than the holder heard of means its operation in progress is done.
    pub seq: u32,
    /// Status of the last completed operation.
    pub last: Status,
}

impl Message {
    /// Whether this is a lock recovery message (handled while the lockspace is
    /// stopped; every other message waits until recovery is over).
    pub fn is_recovery(&self) -> bool {
        matches!(
            self,
            Message::RecDirEntry { .. }
                | Message::RecDirDone
                | Message::RecLookup { .. }
                | Message::RecLookupReply { .. }
                | Message::RecLocks { .. }
                | Message::RecLocksReply { .. }
                | Message::RecNotMaster { .. }
                | Message::RecDone
        )
    }

    /// Short name of the message kind, for logs and scenario files.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Lookup { .. } => "lookup",
            Message::LookupReply { .. } => "lookup-reply",
            Message::Request { .. } => "request",
            Message::Convert { .. } => "convert",
            Message::Unlock { .. } => "unlock",
            Message::Cancel { .. } => "cancel",
            Message::NotMaster { .. } => "not-master",
            Message::Ast { .. } => "ast",
            Message::Bast { .. } => "bast",
            Message::Remove { .. } => "remove",
            Message::RecDirEntry { .. } => "rec-dir-entry",
            Message::RecDirDone => "rec-dir-done",
            Message::RecLookup { .. } => "rec-lookup",
            Message::RecLookupReply { .. } => "rec-lookup-reply",
            Message::RecLocks { .. } => "rec-locks",
            Message::RecLocksReply { .. } => "rec-locks-reply",
            Message::RecNotMaster { .. } => "rec-not-master",
            Message::RecDone => "rec-done",
        }
    }
}
