//! Cluster-wide POSIX byte-range locks and flock(2) locks ("plocks"), served by
//! lockd beside the DLM.
//!
//! This module holds the types a client sees ([`PlockSpace`], [`PlockOp`],
//! [`PlockResult`], [`PlockConflict`]) and the service, as sans-IO parts:
//!
//! * [`range`]: the POSIX range algebra of one owner's locks (set with split and
//!   merge, unlock with split), with "to EOF" ends;
//! * [`table`]: the plock master's table of a lockspace: granted locks of every node,
//!   FIFO waiters, grants on release, F_GETLK, deadlock detection across resources
//!   and nodes;
//! * [`service`]: one node's plock state in one lockspace: its own locks and
//!   operations in flight (holder side), the table when it is the master, recovery
//!   on every new view, freeze and thaw. The node runtime (`node/state.rs`) moves its
//!   messages inside `PeerMsg::Plock` and its answers to the clients.
//!
//! One master per lockspace (its lowest member) sees every lock and every waiter,
//! so its deadlock detection is complete; see docs/internals/plocks.md.
//!
//! A plock resource is named by its lockspace, a [`PlockSpace`] (POSIX locks and
//! flock locks never conflict with each other, as in Linux) and a number (the inode
//! number). An owner is the client's 64-bit owner id (FUSE's `lock_owner`: the
//! `files_struct` of a POSIX lock, the open file description of an OFD or flock lock)
//! qualified by the node, so that equal ids on two nodes are two owners.
//!
//! Ranges are inclusive: `start..=end`, with `end == u64::MAX` (or FUSE's
//! `OFFSET_MAX`, `i64::MAX`) meaning "to the end of the file, however far it grows".

use serde::{Deserialize, Serialize};

use crate::core::NodeId;

pub mod range;
pub mod service;
pub mod table;

#[cfg(test)]
mod scenario;

pub use service::{PlockMsg, PlockService, ReportedLock};

/// Which family of locks a resource belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PlockSpace {
    /// fcntl(2) locks: F_SETLK, F_SETLKW, F_GETLK and the OFD variants.
    Posix,
    /// flock(2) locks: whole-file, owned by an open file description.
    Flock,
}

/// One operation on a plock resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlockOp {
    /// Sets a read (`write == false`) or write lock on `start..=end` for `owner`,
    /// replacing, splitting and merging the owner's own locks as POSIX requires.
    /// With `wait`, waits until no other owner's lock conflicts (F_SETLKW, flock
    /// without LOCK_NB); without, answers [`PlockResult::Again`] at once.
    Lock { owner: u64, pid: u32, start: u64, end: u64, write: bool, wait: bool },
    /// Removes `owner`'s locks on `start..=end` (splitting a lock that straddles it).
    Unlock { owner: u64, start: u64, end: u64 },
    /// Removes every lock of `owner` on the resource (close, release, process death).
    UnlockOwner { owner: u64 },
    /// F_GETLK: the first lock of another owner that conflicts with a `write` (or
    /// read) lock of `owner` on `start..=end`.
    Get { owner: u64, start: u64, end: u64, write: bool },
}

/// The answer to a [`PlockOp`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlockResult {
    /// The lock is set.
    Granted,
    /// A conflicting lock is held and the request does not wait (EAGAIN / EWOULDBLOCK).
    Again,
    /// Waiting would close a cycle of owners waiting for each other (EDEADLK).
    Deadlock,
    /// The waiting request was cancelled ([`crate::client::LockspaceHandle::plock_cancel`]):
    /// nothing of it is left (EINTR for the caller).
    Cancelled,
    /// An unlock is done.
    Unlocked,
    /// F_GETLK: nothing conflicts (F_UNLCK).
    Free,
    /// F_GETLK: this lock conflicts.
    Conflict(PlockConflict),
}

/// A lock that conflicts, as F_GETLK reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlockConflict {
    /// The node holding it.
    pub node: NodeId,
    /// The holder's owner id (on that node).
    pub owner: u64,
    /// The pid the holder gave when it set the lock (meaningful on `node` only).
    pub pid: u32,
    /// First byte.
    pub start: u64,
    /// Last byte (inclusive).
    pub end: u64,
    /// A write lock (else a read lock).
    pub write: bool,
}
