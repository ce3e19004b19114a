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
}

impl Message {
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
        }
    }
}
