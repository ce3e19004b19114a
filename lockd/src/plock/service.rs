//! One node's plock state in one lockspace, without I/O: the holder side (this
//! node's own granted locks and its operations in flight), the master side (the
//! [`Table`] when this node is the lockspace's plock master) and recovery.
//!
//! # Order of calls
//!
//! 1. [`PlockService::begin_view`] for every agreed view of the lockspace in which
//!    this node is a member (before anything else: until then no operation is sent).
//! 2. [`request`](PlockService::request), [`cancel`](PlockService::cancel),
//!    [`thaw`](PlockService::thaw) for local calls;
//!    [`handle_message`](PlockService::handle_message) for every [`PlockMsg`] from a
//!    peer, with the generation it was sent in.
//! 3. After each of these, drain [`poll_transmit`](PlockService::poll_transmit)
//!    (messages to peers, each to be sent with its generation; per-peer FIFO) and
//!    [`poll_answer`](PlockService::poll_answer) (the answers to local operations).
//!
//! Messages between this node and itself (when it is the master) never leave the
//! service: they go through an internal FIFO, processed before each call returns.
//!
//! # Invariant
//!
//! The master answers the operations of one holder in the order it applies them,
//! and links are FIFO, so a holder that applies each answer to its own copy as it
//! arrives (Granted: set the lock; Unlocked: remove it) has exactly the master's
//! view of its locks. Recovery relies on it: a new master is rebuilt from the
//! holders' copies.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::range::{eff_end, Range, RangeSet};
use super::table::{ResKey, Table};
use super::{PlockOp, PlockResult, PlockSpace};
use crate::core::NodeId;

/// Most locks in one [`PlockMsg::Report`]: each is at most ~45 bytes encoded, so a
/// report stays far below the transport's `MAX_PAYLOAD` (1 MiB).
pub const REPORT_CHUNK: usize = 4096;

/// Most messages of a later generation kept until this node enters it.
pub const MAX_FUTURE: usize = 64 * 1024;

/// What plock peers send each other, inside `PeerMsg::Plock` (which carries the
/// lockspace name and the sender's generation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PlockMsg {
    /// Holder → master: apply operation `id` (the holder's id, unique on the holder).
    Op { id: u64, space: PlockSpace, number: u64, op: PlockOp },
    /// Holder → master: cancel waiting operation `id`.
    Cancel { id: u64 },
    /// Master → holder: the answer to operation `id`.
    Reply { id: u64, result: PlockResult },
    /// Holder → new master (recovery): some of the holder's granted locks.
    Report { locks: Vec<ReportedLock> },
    /// Holder → new master: the report is complete.
    ReportDone,
}

/// One granted lock in a recovery report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedLock {
    pub space: PlockSpace,
    pub number: u64,
    pub owner: u64,
    pub pid: u32,
    pub start: u64,
    pub end: u64,
    pub write: bool,
}

#[derive(Clone, Debug)]
struct Pending {
    res: ResKey,
    op: PlockOp,
    /// The generation it was last sent in (None: not sent in any).
    sent: Option<u64>,
    /// The caller cancelled it while it was at the master.
    cancel: bool,
}

impl Pending {
    fn is_waiting_lock(&self) -> bool {
        matches!(self.op, PlockOp::Lock { .. })
    }
}

/// A granted lock of this node, for dumps and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeldLock {
    pub space: PlockSpace,
    pub number: u64,
    pub owner: u64,
    pub range: Range,
}

/// One node's plock state in one lockspace. See the [module docs](self).
#[derive(Debug)]
pub struct PlockService {
    node: NodeId,
    generation: u64,
    members: BTreeSet<NodeId>,
    master: Option<NodeId>,
    /// This node's granted locks (its copy of the master's view of them).
    held: BTreeMap<(ResKey, u64), RangeSet>,
    /// Operations not answered yet, by id (= the order they were asked in).
    pending: BTreeMap<u64, Pending>,
    next_id: u64,
    /// Operations are held since the view of this generation (members departed).
    frozen: Option<u64>,
    /// Master side, when this node is the master.
    table: Option<Table>,
    /// Members whose recovery report the master still waits for.
    reports_missing: BTreeSet<NodeId>,
    /// Operations that reached the master before every report did.
    backlog: VecDeque<(NodeId, PlockMsg)>,
    /// Messages of generations this node has not entered yet.
    future: Vec<(NodeId, u64, PlockMsg)>,
    /// Messages from this node to itself.
    local: VecDeque<PlockMsg>,
    transmit: VecDeque<(NodeId, u64, PlockMsg)>,
    answers: VecDeque<(u64, PlockResult)>,
}

impl PlockService {
    pub fn new(node: NodeId) -> PlockService {
        PlockService {
            node,
            generation: 0,
            members: BTreeSet::new(),
            master: None,
            held: BTreeMap::new(),
            pending: BTreeMap::new(),
            next_id: 1,
            frozen: None,
            table: None,
            reports_missing: BTreeSet::new(),
            backlog: VecDeque::new(),
            future: Vec::new(),
            local: VecDeque::new(),
            transmit: VecDeque::new(),
            answers: VecDeque::new(),
        }
    }

    /// This node's id.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// The generation of the last view entered (0: none).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The plock master of the current view: the lowest member.
    pub fn master(&self) -> Option<NodeId> {
        self.master
    }

    /// The generation whose view froze operations, if they are held.
    pub fn frozen(&self) -> Option<u64> {
        self.frozen
    }

    /// True while this node is the master and waits for members' reports.
    pub fn is_rebuilding(&self) -> bool {
        self.table.is_some() && !self.reports_missing.is_empty()
    }

    /// Enters the agreed view `generation` with `members` (this node among them).
    /// With `freeze` (members departed since the last completed recovery),
    /// operations are held until [`thaw`](Self::thaw) with this generation or a later one.
    ///
    /// Messages of older generations are dropped from now on; the master's table is
    /// thrown away; this node reports its granted locks to the (new) master and sends
    /// again, in order, every operation not answered yet.
    pub fn begin_view(&mut self, generation: u64, members: &[NodeId], freeze: bool) {
        if generation <= self.generation {
            debug!(node = self.node, generation, current = self.generation, "plock: stale view ignored");
            return;
        }
        self.generation = generation;
        self.members = members.iter().copied().collect();
        self.master = self.members.first().copied();
        self.backlog.clear();
        self.local.clear();
        if self.master == Some(self.node) {
            self.table = Some(Table::new());
            self.reports_missing = self.members.clone();
        } else {
            self.table = None;
            self.reports_missing.clear();
        }
        if freeze {
            self.frozen = Some(generation);
        }
        for p in self.pending.values_mut() {
            p.sent = None;
        }
        self.report();
        self.flush();
        let future = std::mem::take(&mut self.future);
        for (from, g, msg) in future {
            if g == generation {
                self.dispatch(from, msg);
            } else if g > generation {
                self.future.push((from, g, msg));
            }
        }
        self.run_local();
    }

    /// Sends this node's granted locks to the master, in chunks, then `ReportDone`.
    fn report(&mut self) {
        let Some(master) = self.master else { return };
        let mut chunk = Vec::new();
        let mut chunks = Vec::new();
        for (((space, number), owner), set) in &self.held {
            for r in set.iter() {
                chunk.push(ReportedLock {
                    space: *space,
                    number: *number,
                    owner: *owner,
                    pid: r.pid,
                    start: r.start,
                    end: r.end,
                    write: r.write,
                });
                if chunk.len() == REPORT_CHUNK {
                    chunks.push(std::mem::take(&mut chunk));
                }
            }
        }
        if !chunk.is_empty() {
            chunks.push(chunk);
        }
        for locks in chunks {
            self.send(master, PlockMsg::Report { locks });
        }
        self.send(master, PlockMsg::ReportDone);
    }

    fn send(&mut self, to: NodeId, msg: PlockMsg) {
        if to == self.node {
            self.local.push_back(msg);
        } else {
            self.transmit.push_back((to, self.generation, msg));
        }
    }

    /// Sends, in order, every operation not sent in this generation, unless frozen.
    fn flush(&mut self) {
        let Some(master) = self.master else { return };
        if self.frozen.is_some() {
            return;
        }
        let generation = self.generation;
        let ids: Vec<u64> =
            self.pending.iter().filter(|(_, p)| p.sent != Some(generation)).map(|(id, _)| *id).collect();
        for id in ids {
            // Listed just above.
            let p = self.pending.get_mut(&id).expect("pending op listed above");
            if p.cancel {
                self.pending.remove(&id);
                self.answers.push_back((id, PlockResult::Cancelled));
                continue;
            }
            p.sent = Some(generation);
            let msg = PlockMsg::Op { id, space: p.res.0, number: p.res.1, op: p.op.clone() };
            self.send(master, msg);
        }
    }

    /// Starts operation `op` on resource (`space`, `number`); returns its id, which
    /// its answer from [`poll_answer`](Self::poll_answer) carries. The caller checks
    /// ranges (`start <= end`).
    pub fn request(&mut self, space: PlockSpace, number: u64, op: PlockOp) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.pending.insert(id, Pending { res: (space, number), op, sent: None, cancel: false });
        if self.generation > 0 {
            self.flush();
        }
        self.run_local();
        id
    }

    /// Cancels operation `id`: a lock held here (frozen) is answered `Cancelled` at
    /// once; a lock at the master is cancelled there if it still waits (else its
    /// grant is the answer). Unlocks and gets are not cancelled. Returns false if
    /// no such operation is in flight.
    pub fn cancel(&mut self, id: u64) -> bool {
        let generation = self.generation;
        let Some(p) = self.pending.get_mut(&id) else { return false };
        if !p.is_waiting_lock() {
            return true;
        }
        if p.sent == Some(generation) {
            if !p.cancel {
                p.cancel = true;
                if let Some(master) = self.master {
                    self.send(master, PlockMsg::Cancel { id });
                }
            }
        } else {
            self.pending.remove(&id);
            self.answers.push_back((id, PlockResult::Cancelled));
        }
        self.run_local();
        true
    }

    /// The recovery of `generation` is done on this node: operations held since a
    /// view of that generation or an earlier one go on. Returns true if this thawed.
    pub fn thaw(&mut self, generation: u64) -> bool {
        match self.frozen {
            Some(f) if generation >= f => {
                self.frozen = None;
                self.flush();
                self.run_local();
                true
            }
            _ => false,
        }
    }

    /// A message from peer `from`, sent in `generation`.
    pub fn handle_message(&mut self, from: NodeId, generation: u64, msg: PlockMsg) {
        if generation < self.generation {
            debug!(
                node = self.node,
                from,
                generation,
                current = self.generation,
                "plock: message of an old generation dropped"
            );
            return;
        }
        if generation > self.generation {
            if self.future.len() >= MAX_FUTURE {
                warn!(node = self.node, from, generation, "plock: too many messages of a later generation: dropped");
            } else {
                self.future.push((from, generation, msg));
            }
            return;
        }
        if from == self.node || !self.members.contains(&from) {
            warn!(node = self.node, from, generation, "plock: message from a node outside the view dropped");
            return;
        }
        self.dispatch(from, msg);
        self.run_local();
    }

    fn run_local(&mut self) {
        while let Some(msg) = self.local.pop_front() {
            self.dispatch(self.node, msg);
        }
    }

    /// Routes a message of the current generation from a member.
    fn dispatch(&mut self, from: NodeId, msg: PlockMsg) {
        match msg {
            PlockMsg::Reply { id, result } => {
                if self.master != Some(from) {
                    warn!(node = self.node, from, id, "plock: reply from a node that is not the master dropped");
                    return;
                }
                self.on_reply(id, result);
            }
            msg => {
                let Some(table) = self.table.as_mut() else {
                    warn!(node = self.node, from, "plock: master message to a node that is not the master dropped");
                    return;
                };
                match msg {
                    PlockMsg::Report { locks } => {
                        if !self.reports_missing.contains(&from) {
                            warn!(node = self.node, from, "plock: report after its end dropped");
                            return;
                        }
                        for l in locks {
                            let range = Range { start: l.start, end: l.end, write: l.write, pid: l.pid };
                            table.insert_reported(from, (l.space, l.number), l.owner, range);
                        }
                    }
                    PlockMsg::ReportDone => {
                        self.reports_missing.remove(&from);
                        if self.reports_missing.is_empty() {
                            debug!(
                                node = self.node,
                                generation = self.generation,
                                locks = table.locks().len(),
                                "plock: master rebuilt from every member's report"
                            );
                            let backlog = std::mem::take(&mut self.backlog);
                            for (from, msg) in backlog {
                                self.master_apply(from, msg);
                            }
                        }
                    }
                    msg if !self.reports_missing.is_empty() => self.backlog.push_back((from, msg)),
                    msg => self.master_apply(from, msg),
                }
            }
        }
    }

    /// Master: applies an operation or a cancel and sends the answers it produced.
    fn master_apply(&mut self, from: NodeId, msg: PlockMsg) {
        let Some(table) = self.table.as_mut() else { return };
        match msg {
            PlockMsg::Op { id, space, number, op } => table.apply(from, id, (space, number), op),
            PlockMsg::Cancel { id } => {
                table.cancel(from, id);
            }
            _ => {}
        }
        while let Some((to, id, result)) = self.table.as_mut().and_then(Table::poll_reply) {
            self.send(to, PlockMsg::Reply { id, result });
        }
    }

    /// Holder: the master's answer to operation `id`: applied to this node's copy
    /// of its locks, then given to the caller.
    fn on_reply(&mut self, id: u64, result: PlockResult) {
        let generation = self.generation;
        match self.pending.get(&id) {
            Some(p) if p.sent == Some(generation) => {}
            _ => {
                debug!(node = self.node, id, "plock: reply to an operation not in flight dropped");
                return;
            }
        }
        // Checked just above.
        let p = self.pending.remove(&id).expect("pending op checked above");
        let res = p.res;
        match (&p.op, &result) {
            (PlockOp::Lock { owner, pid, start, end, write, .. }, PlockResult::Granted) => {
                self.held.entry((res, *owner)).or_default().set(*start, *end, *write, *pid);
            }
            (PlockOp::Lock { owner, .. }, _) if res.0 == PlockSpace::Flock => {
                // A flock conversion that was not granted lost the old lock (see table.rs).
                self.held.remove(&(res, *owner));
            }
            (PlockOp::Unlock { owner, start, end }, PlockResult::Unlocked) => {
                if let Some(set) = self.held.get_mut(&(res, *owner)) {
                    set.unlock(*start, *end);
                    if set.is_empty() {
                        self.held.remove(&(res, *owner));
                    }
                }
            }
            (PlockOp::UnlockOwner { owner }, PlockResult::Unlocked) => {
                self.held.remove(&(res, *owner));
            }
            _ => {}
        }
        self.answers.push_back((id, result));
    }

    /// The next message to send: (peer, generation, message).
    pub fn poll_transmit(&mut self) -> Option<(NodeId, u64, PlockMsg)> {
        self.transmit.pop_front()
    }

    /// The next answer to a local operation: (its id, result).
    pub fn poll_answer(&mut self) -> Option<(u64, PlockResult)> {
        self.answers.pop_front()
    }

    /// This node's granted locks.
    pub fn held(&self) -> Vec<HeldLock> {
        self.held
            .iter()
            .flat_map(|(((space, number), owner), set)| {
                set.iter().map(|r| HeldLock { space: *space, number: *number, owner: *owner, range: *r })
            })
            .collect()
    }

    /// Operations not answered yet.
    pub fn pending_count(&self) -> usize {
        self.pending.len()
    }

    /// The master's table, when this node is the master.
    pub fn table(&self) -> Option<&Table> {
        self.table.as_ref()
    }

    /// True if `start..=end` is a range a lock may name.
    pub fn valid_range(start: u64, end: u64) -> bool {
        start <= eff_end(end)
    }
}
