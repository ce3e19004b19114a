//! The plock master's table: for every resource of one lockspace, the granted locks
//! of every owner on every node and the FIFO queue of waiting requests; conflicts,
//! grants on release, F_GETLK and deadlock detection (`fs/locks.c`'s
//! `posix_lock_inode`, `posix_test_lock`, `posix_locks_deadlock` and
//! `flock_lock_inode`, for the whole cluster at once).
//!
//! Operations come in tagged with the holder's node and its operation id; answers go
//! out through [`Table::poll_reply`] in the order the table applied them, which is
//! what lets every holder keep an exact copy of its own locks (see `service.rs`).
//!
//! Rules:
//! * a lock of the same owner never conflicts; read/read never conflicts;
//! * the conflict reported (F_GETLK) and the one a waiter waits on is the first
//!   conflicting lock by (start, node, owner);
//! * a new lock is granted as soon as it conflicts with no granted lock, even when
//!   older requests wait (as in Linux, there is no fairness between waiters and new
//!   requests); after locks are removed or shrunk, waiters are re-examined in FIFO
//!   order and every one that no longer conflicts is granted, possibly past an older
//!   one that still does;
//! * POSIX space: a waiting request whose wait would close a cycle of owners waiting
//!   for each other is refused with `Deadlock` (owner X waits on the owner Y of its
//!   first conflicting lock; Y's oldest waiting request waits on Z; ... ; reaching X
//!   again is a deadlock), across resources and nodes;
//! * flock space: a lock by an owner already holding one of the same type is granted
//!   as is; of the other type, the old lock is dropped first and the new one then
//!   acquired as a new lock (not atomic, as flock(2) says of Linux); no deadlock
//!   detection (Linux has none for flock).

use std::collections::{BTreeMap, VecDeque};

use super::range::{eff_end, overlaps, Range, RangeSet};
use super::{PlockConflict, PlockOp, PlockResult, PlockSpace};
use crate::core::NodeId;

/// A plock resource: its space and number.
pub type ResKey = (PlockSpace, u64);

/// An owner: the node and the owner id on that node.
pub type OwnerKey = (NodeId, u64);

/// How far the deadlock detector follows a chain of waiting owners. Linux stops at
/// 10 (`MAX_DEADLK_ITERATIONS`); one master sees the whole cluster, so chains can be
/// longer, and a cycle that does not contain the requester must not loop forever.
pub const MAX_DEADLOCK_STEPS: usize = 1024;

#[derive(Clone, Debug)]
struct Waiter {
    node: NodeId,
    op: u64,
    owner: u64,
    pid: u32,
    start: u64,
    end: u64,
    write: bool,
    /// Order of arrival (the key of the blocked index).
    seq: u64,
}

impl Waiter {
    fn owner_key(&self) -> OwnerKey {
        (self.node, self.owner)
    }
}

#[derive(Debug, Default)]
struct Resource {
    owners: BTreeMap<OwnerKey, RangeSet>,
    waiters: VecDeque<Waiter>,
}

impl Resource {
    fn is_idle(&self) -> bool {
        self.owners.is_empty() && self.waiters.is_empty()
    }

    /// The first granted lock of another owner conflicting with a `write` (or read)
    /// lock of `who` on `start..=end`, by (start, node, owner).
    fn first_conflict(&self, who: OwnerKey, start: u64, end: u64, write: bool) -> Option<(OwnerKey, Range)> {
        let mut best: Option<(OwnerKey, Range)> = None;
        for (o, set) in &self.owners {
            if *o == who {
                continue;
            }
            for r in set.overlapping(start, end) {
                if !(write || r.write) {
                    continue;
                }
                if best.as_ref().is_none_or(|(bo, br)| (r.start, *o) < (br.start, *bo)) {
                    best = Some((*o, *r));
                }
                // Later ranges of this owner start further on.
                break;
            }
        }
        best
    }

    fn remove_empty(&mut self, who: OwnerKey) {
        if self.owners.get(&who).is_some_and(RangeSet::is_empty) {
            self.owners.remove(&who);
        }
    }
}

/// One granted lock, for dumps and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableLock {
    pub space: PlockSpace,
    pub number: u64,
    pub node: NodeId,
    pub owner: u64,
    pub range: Range,
}

/// One waiting request, for dumps and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableWaiter {
    pub space: PlockSpace,
    pub number: u64,
    pub node: NodeId,
    pub op: u64,
    pub owner: u64,
    pub start: u64,
    pub end: u64,
    pub write: bool,
    /// The owner it waits on.
    pub blocker: OwnerKey,
}

/// The master's table of one lockspace. See the [module docs](self).
#[derive(Debug, Default)]
pub struct Table {
    resources: BTreeMap<ResKey, Resource>,
    /// POSIX waiters by (owner, seq) -> (resource, the owner they wait on): the
    /// wait-for graph.
    blocked: BTreeMap<(OwnerKey, u64), (ResKey, OwnerKey)>,
    next_seq: u64,
    replies: VecDeque<(NodeId, u64, PlockResult)>,
}

impl Table {
    pub fn new() -> Table {
        Table::default()
    }

    /// Applies operation `op` (id `id` of holder `node`) on resource `res`. Its
    /// answer, and the grants it causes, are queued for [`poll_reply`](Self::poll_reply)
    /// (a waiting lock is answered later).
    pub fn apply(&mut self, node: NodeId, id: u64, res: ResKey, op: PlockOp) {
        match op {
            PlockOp::Lock { owner, pid, start, end, write, wait } => {
                self.lock(node, id, res, Waiter { node, op: id, owner, pid, start, end, write, seq: 0 }, wait)
            }
            PlockOp::Unlock { owner, start, end } => {
                let changed = match self.resources.get_mut(&res) {
                    Some(r) => {
                        let c = r.owners.get_mut(&(node, owner)).is_some_and(|s| s.unlock(start, end));
                        r.remove_empty((node, owner));
                        c
                    }
                    None => false,
                };
                self.replies.push_back((node, id, PlockResult::Unlocked));
                if changed {
                    self.wake(res);
                }
            }
            PlockOp::UnlockOwner { owner } => {
                let changed = self.resources.get_mut(&res).is_some_and(|r| r.owners.remove(&(node, owner)).is_some());
                self.replies.push_back((node, id, PlockResult::Unlocked));
                if changed {
                    self.wake(res);
                }
            }
            PlockOp::Get { owner, start, end, write } => {
                let result = match self.resources.get(&res) {
                    _ if start > eff_end(end) => PlockResult::Free,
                    Some(r) => match r.first_conflict((node, owner), start, end, write) {
                        Some(((cn, co), l)) => PlockResult::Conflict(PlockConflict {
                            node: cn,
                            owner: co,
                            pid: l.pid,
                            start: l.start,
                            end: l.end,
                            write: l.write,
                        }),
                        None => PlockResult::Free,
                    },
                    None => PlockResult::Free,
                };
                self.replies.push_back((node, id, result));
            }
        }
        self.forget_if_idle(res);
    }

    fn lock(&mut self, node: NodeId, id: u64, res: ResKey, mut w: Waiter, wait: bool) {
        let who = w.owner_key();
        if w.start > eff_end(w.end) {
            // The holder checks ranges; a peer's bad range gets a refusal, not a lock.
            self.replies.push_back((node, id, PlockResult::Again));
            return;
        }
        let r = self.resources.entry(res).or_default();
        let mut dropped = false;
        if res.0 == PlockSpace::Flock {
            if let Some(set) = r.owners.get(&who) {
                if set.covers(w.start, w.end, w.write) {
                    self.replies.push_back((node, id, PlockResult::Granted));
                    return;
                }
                // flock_lock_inode: the old lock goes first (conversion is not atomic).
                r.owners.remove(&who);
                dropped = true;
            }
        }
        match r.first_conflict(who, w.start, w.end, w.write) {
            None => {
                let set = r.owners.entry(who).or_default();
                let shrinks = set.overlapping(w.start, w.end).any(|l| l.write && !w.write);
                set.set(w.start, w.end, w.write, w.pid);
                self.replies.push_back((node, id, PlockResult::Granted));
                if shrinks || dropped {
                    self.wake(res);
                }
            }
            Some(_) if !wait => {
                self.replies.push_back((node, id, PlockResult::Again));
                if dropped {
                    self.wake(res);
                }
            }
            Some((blocker, _)) => {
                if res.0 == PlockSpace::Posix && self.deadlock(who, blocker) {
                    self.replies.push_back((node, id, PlockResult::Deadlock));
                    return;
                }
                w.seq = self.next_seq;
                self.next_seq += 1;
                if res.0 == PlockSpace::Posix {
                    self.blocked.insert((who, w.seq), (res, blocker));
                }
                // The entry was made above and nothing removed it since.
                self.resources.entry(res).or_default().waiters.push_back(w);
                if dropped {
                    self.wake(res);
                }
            }
        }
    }

    /// True if `requester` waiting on `blocker` closes a cycle.
    fn deadlock(&self, requester: OwnerKey, blocker: OwnerKey) -> bool {
        let mut y = blocker;
        for _ in 0..MAX_DEADLOCK_STEPS {
            // What y's oldest waiting request waits on.
            let Some((_, (_, z))) = self.blocked.range((y, 0)..=(y, u64::MAX)).next() else { return false };
            if *z == requester {
                return true;
            }
            y = *z;
        }
        false
    }

    /// Re-examines the waiters of `res` in FIFO order; grants every one that no
    /// longer conflicts, until a pass grants nothing (a grant that turns a write
    /// lock into a read lock can free an earlier waiter).
    fn wake(&mut self, res: ResKey) {
        let Some(r) = self.resources.get_mut(&res) else { return };
        loop {
            let mut granted = false;
            let mut i = 0;
            while i < r.waiters.len() {
                let w = &r.waiters[i];
                let who = w.owner_key();
                match r.first_conflict(who, w.start, w.end, w.write) {
                    Some((blocker, _)) => {
                        if let Some(b) = self.blocked.get_mut(&(who, w.seq)) {
                            b.1 = blocker;
                        }
                        i += 1;
                    }
                    None => {
                        // i < len, checked by the loop.
                        let w = r.waiters.remove(i).expect("waiter index in range");
                        self.blocked.remove(&(who, w.seq));
                        r.owners.entry(who).or_default().set(w.start, w.end, w.write, w.pid);
                        self.replies.push_back((w.node, w.op, PlockResult::Granted));
                        granted = true;
                    }
                }
            }
            if !granted {
                return;
            }
        }
    }

    /// Cancels waiting operation `id` of `node`: answered `Cancelled` and gone. An
    /// operation that does not wait (already answered) is left alone; returns
    /// whether one was cancelled.
    pub fn cancel(&mut self, node: NodeId, id: u64) -> bool {
        let found = self
            .resources
            .iter()
            .find_map(|(k, r)| r.waiters.iter().position(|w| w.node == node && w.op == id).map(|i| (*k, i)));
        let Some((res, i)) = found else { return false };
        // Found just above.
        let r = self.resources.get_mut(&res).expect("resource found above");
        let w = r.waiters.remove(i).expect("waiter found above");
        self.blocked.remove(&(w.owner_key(), w.seq));
        self.replies.push_back((node, id, PlockResult::Cancelled));
        // A flock conversion dropped its old lock when it started waiting: nothing
        // more to wake now. A POSIX waiter holds nothing of its own request.
        self.forget_if_idle(res);
        true
    }

    /// Adds a lock reported by its holder during recovery, as it was granted (no
    /// conflict check: the holders' copies are what the old master granted).
    pub fn insert_reported(&mut self, node: NodeId, res: ResKey, owner: u64, r: Range) {
        if r.start > eff_end(r.end) {
            return;
        }
        self.resources
            .entry(res)
            .or_default()
            .owners
            .entry((node, owner))
            .or_default()
            .set(r.start, r.end, r.write, r.pid);
    }

    /// The next answer: (holder node, its operation id, result), in the order the
    /// table applied them.
    pub fn poll_reply(&mut self) -> Option<(NodeId, u64, PlockResult)> {
        self.replies.pop_front()
    }

    fn forget_if_idle(&mut self, res: ResKey) {
        if self.resources.get(&res).is_some_and(Resource::is_idle) {
            self.resources.remove(&res);
        }
    }

    /// Every granted lock, by resource, node, owner and start.
    pub fn locks(&self) -> Vec<TableLock> {
        let mut out = Vec::new();
        for ((space, number), r) in &self.resources {
            for ((node, owner), set) in &r.owners {
                for range in set.iter() {
                    out.push(TableLock { space: *space, number: *number, node: *node, owner: *owner, range: *range });
                }
            }
        }
        out
    }

    /// Every waiting request, by resource, in queue order.
    pub fn waiters(&self) -> Vec<TableWaiter> {
        let mut out = Vec::new();
        for ((space, number), r) in &self.resources {
            for w in &r.waiters {
                let blocker = self.blocked.get(&(w.owner_key(), w.seq)).map_or_else(
                    || r.first_conflict(w.owner_key(), w.start, w.end, w.write).map_or((0, 0), |c| c.0),
                    |b| b.1,
                );
                out.push(TableWaiter {
                    space: *space,
                    number: *number,
                    node: w.node,
                    op: w.op,
                    owner: w.owner,
                    start: w.start,
                    end: w.end,
                    write: w.write,
                    blocker,
                });
            }
        }
        out
    }

    /// Number of resources with locks or waiters.
    pub fn resource_count(&self) -> usize {
        self.resources.len()
    }

    /// Overlapping granted locks of different owners where one is a write lock: must
    /// never happen outside recovery (tests).
    pub fn conflicting_grants(&self) -> Vec<(TableLock, TableLock)> {
        let all = self.locks();
        let mut out = Vec::new();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                if (a.space, a.number) == (b.space, b.number)
                    && (a.node, a.owner) != (b.node, b.owner)
                    && (a.range.write || b.range.write)
                    && overlaps(a.range.start, a.range.end, b.range.start, b.range.end)
                {
                    out.push((*a, *b));
                }
            }
        }
        out
    }
}
