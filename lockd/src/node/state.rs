//! The node's state behind one mutex: its lockspaces (one sans-IO
//! [`Lockspace`](crate::core::Lockspace) each while this node is a member), the
//! membership (the [`RaftNode`] log of views and the [`Liveness`] failure
//! detector), the owner of every lock, the local client sessions, and the routing
//! of outputs (messages to peers, ASTs, BASTs and recovery callbacks to sessions).
//!
//! Every entry point takes `&mut self` and returns after draining what it touched,
//! so that no output is ever left queued in a core or in the raft node between
//! calls.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::Notify;
use tracing::{debug, info, warn};

use super::proto::{
    check_lockspace_name, Ast, Bast, ClientFrame, ClientRequest, ClientStatus, ErrorKind, JoinKind, LockInfo,
    LockspaceDump, LockspaceStatus, LsId, NodeStatus, PeerStatus, RecoveryEvent, RecoveryStat, RemoteError, Reply,
    ResourceInfo, ServerMsg, CLIENT_PROTOCOL_VERSION,
};
use super::PeerMsg;
use crate::config::ClusterConfig;
use crate::core::{Event, LkId, LockError, LockRequest, Lockspace, Message, NodeId};
use crate::membership::{Command, Liveness, LivenessTiming, LsView, RaftNode};
use crate::plock::{PlockOp, PlockService, PlockSpace};
use crate::transport::Endpoint;

/// Most locks and resources in one [`Reply::Dump`] part, to stay far below the frame
/// size limit.
const DUMP_PART_ITEMS: usize = 2048;

/// Most lockspaces one node takes part in; a peer message naming a new lockspace
/// beyond this is dropped.
const MAX_LOCKSPACES: usize = 4096;

/// Messages kept for a lockspace this node is joining but whose view it has not
/// applied yet.
const MAX_EARLY: usize = 64 * 1024;

/// How long a proposal waits to be seen applied before it is made again (a
/// proposal can be lost with a leader change; applying one twice is harmless).
const REPROPOSE_MS: u64 = 400;

/// How long a fence command that failed waits before it is run again.
const FENCE_RETRY_MS: u64 = 1000;

/// Identifies a client connection.
pub(crate) type SessionId = u64;

/// Who holds a lock of this node.
#[derive(Debug)]
struct Owner {
    /// The client.
    session: SessionId,
    /// Request id of the operation whose AST is awaited.
    op: Option<u64>,
    /// The client is gone and the lock is being unlocked by lockd.
    reaping: bool,
}

/// Who asked a plock operation of this node.
#[derive(Debug)]
struct PlockOrigin {
    /// The client, or None for lockd's own unlocks after a client left (and for
    /// operations whose client left): the answer goes nowhere.
    session: Option<SessionId>,
    /// The request id to answer.
    id: u64,
    /// The client's token (for its cancel).
    token: u64,
}

struct LsEntry {
    name: String,
    /// Cluster-wide POSIX and flock locks of this lockspace (the holder side, and
    /// the master's table when this node is the lowest member).
    plock: PlockService,
    /// Plock operations in flight, by the service's operation id.
    plock_ops: HashMap<u64, PlockOrigin>,
    /// (session, token) -> the service's operation id, for cancels.
    plock_tokens: HashMap<(SessionId, u64), u64>,
    /// The plock owners each local session has locked with, per resource: unlocked
    /// by lockd when a plain client leaves or disconnects.
    plock_owners: HashMap<SessionId, BTreeSet<(PlockSpace, u64, u64)>>,
    /// The lockspace core, while this node is a member of the agreed view.
    core: Option<Lockspace>,
    owners: HashMap<LkId, Owner>,
    /// Local sessions joined, and how.
    clients: BTreeMap<SessionId, JoinKind>,
    /// Joins waiting for this node to be a member and recovered: (session, request id).
    joins: Vec<(SessionId, u64)>,
    /// This node wants to be a member (it has clients, or had them less than the
    /// linger time ago).
    want: bool,
    /// When to stop wanting membership once the last client left.
    leave_at: Option<u64>,
    /// The core was dropped because the recovery client left uncleanly: the
    /// leave is unclean (the others recover our slot).
    unclean: bool,
    /// The last agreed view applied.
    view: LsView,
    /// When lock recovery of the current view started here.
    recovery_started: Option<u64>,
    last_recovery: Option<RecoveryStat>,
    unclean_leaves: u64,
    /// Messages of peers for a view this node has not applied yet.
    early: Vec<(NodeId, u64, Message)>,
}

impl LsEntry {
    fn new(name: &str, node: NodeId) -> LsEntry {
        LsEntry {
            name: name.to_string(),
            plock: PlockService::new(node),
            plock_ops: HashMap::new(),
            plock_tokens: HashMap::new(),
            plock_owners: HashMap::new(),
            core: None,
            owners: HashMap::new(),
            clients: BTreeMap::new(),
            joins: Vec::new(),
            want: false,
            leave_at: None,
            unclean: false,
            view: LsView::default(),
            recovery_started: None,
            last_recovery: None,
            unclean_leaves: 0,
            early: Vec::new(),
        }
    }

    fn ready(&self) -> bool {
        self.core.as_ref().is_some_and(|c| !c.is_recovering())
    }
}

/// A connected local client.
pub(crate) struct Session {
    /// Messages for the client not yet taken by its session task (see
    /// [`NodeState::take_out`]); at most [`SESSION_QUEUE`].
    out: Vec<ServerMsg>,
    /// Wakes the session task when another task queued something for it.
    wake: Arc<Notify>,
    pid: Option<i32>,
    name: String,
    joined: BTreeMap<LsId, JoinKind>,
    /// Set when the outgoing queue overflowed; the session task closes the connection.
    overflowed: bool,
}

/// Messages queued for one client before it counts as not reading (and is dropped).
/// Each accepted request gets one AST and each lock at most one BAST per mode, so a
/// client that reads its answers stays far below this.
const SESSION_QUEUE: usize = 256 * 1024;

/// The client's outgoing queue overflowed (it does not read its answers).
#[derive(Debug)]
pub(crate) struct Overflowed;

/// Timer wake-up shared with the node task.
pub(crate) struct TimerArm {
    /// Earliest armed deadline (ms since start), `u64::MAX` when none.
    pub(crate) deadline: AtomicU64,
    pub(crate) notify: Notify,
}

/// A fence command's fate.
#[derive(Clone, Debug)]
enum Fence {
    Running,
    Done,
    Failed(u64),
}

/// Results of fence commands, written by their tasks.
pub(crate) type FenceResults = Arc<Mutex<Vec<((NodeId, u64), Result<(), String>)>>>;

pub(crate) struct NodeState {
    node: NodeId,
    cluster: String,
    voters: Vec<NodeId>,
    peers: Vec<(NodeId, String, String)>,
    start: Instant,
    seed_base: u64,
    lockspaces: Vec<LsEntry>,
    by_name: BTreeMap<String, LsId>,
    sessions: HashMap<SessionId, Session>,
    next_session: SessionId,
    ep: Arc<Endpoint<PeerMsg>>,
    timer: Arc<TimerArm>,
    // Membership.
    raft: RaftNode,
    live: Liveness,
    timing: LivenessTiming,
    linger_ms: u64,
    incarnation: u64,
    /// Our `Alive` for this incarnation is applied.
    alive_seen: bool,
    /// We held a lease in this incarnation (losing it then fences us).
    had_lease: bool,
    fenced: bool,
    fence_count: u64,
    last_fence: Option<String>,
    proposed: HashMap<String, u64>,
    fence_cmd: Option<String>,
    fences: BTreeMap<(NodeId, u64), Fence>,
    fence_results: FenceResults,
    lock_messages_sent: u64,
    /// Lockspaces (and the generation) in which messages may have been lost.
    resync: BTreeMap<LsId, u64>,
    /// The session whose own task is applying its frames now (its messages are
    /// taken by that task, no wake-up needed).
    serving: Option<SessionId>,
}

fn lock_error(e: LockError) -> RemoteError {
    let kind = match e {
        LockError::BadName { .. } => ErrorKind::BadName,
        LockError::InvalidFlags(_) => ErrorKind::InvalidFlags,
        LockError::UnknownLock(_) => ErrorKind::UnknownLock,
        LockError::Busy(_) => ErrorKind::Busy,
        LockError::NothingToCancel(_) => ErrorKind::NothingToCancel,
    };
    RemoteError { kind, message: e.to_string() }
}

fn err(kind: ErrorKind, message: impl Into<String>) -> RemoteError {
    RemoteError { kind, message: message.into() }
}

/// The members of a view with the generation in which each joined, as the core
/// wants them.
fn view_members(v: &LsView) -> Vec<(NodeId, u64)> {
    v.members.keys().map(|n| (*n, v.joined.get(n).copied().unwrap_or(0))).collect()
}

impl NodeState {
    pub(crate) fn new(
        cfg: &ClusterConfig,
        node: NodeId,
        ep: Arc<Endpoint<PeerMsg>>,
        timer: Arc<TimerArm>,
        raft: RaftNode,
        linger_ms: u64,
    ) -> Self {
        let mut voters: Vec<NodeId> = cfg.node_ids().collect();
        voters.sort_unstable();
        let peers =
            cfg.nodes.iter().filter(|n| n.id != node).map(|n| (n.id, n.name.clone(), n.addr.to_string())).collect();
        let timing = LivenessTiming {
            heartbeat_ms: cfg.timing.heartbeat_ms,
            lease_ms: cfg.timing.lease_ms,
            dead_after_ms: cfg.timing.dead_after_ms,
        };
        let incarnation = rand::random::<u64>() | 1;
        let live = Liveness::new(node, &voters, incarnation, timing, 0);
        let mut st = NodeState {
            node,
            cluster: cfg.cluster_name.clone(),
            voters,
            peers,
            start: Instant::now(),
            seed_base: rand::random(),
            lockspaces: Vec::new(),
            by_name: BTreeMap::new(),
            sessions: HashMap::new(),
            next_session: 1,
            ep,
            timer,
            raft,
            live,
            timing,
            linger_ms,
            incarnation,
            alive_seen: false,
            had_lease: false,
            fenced: false,
            fence_count: 0,
            last_fence: None,
            proposed: HashMap::new(),
            fence_cmd: cfg.fence_cmd.clone(),
            fences: BTreeMap::new(),
            fence_results: Arc::new(Mutex::new(Vec::new())),
            lock_messages_sent: 0,
            resync: BTreeMap::new(),
            serving: None,
        };
        st.forget_dead();
        info!(node, incarnation = format_args!("{incarnation:016x}"), "membership: new incarnation");
        st
    }

    /// Dead incarnations the log already knows are never acked again by a fresh
    /// failure detector.
    fn forget_dead(&mut self) {
        for (n, l) in self.raft.state().nodes.iter().filter(|(_, l)| !l.alive) {
            self.live.forget(*n, l.incarnation);
        }
    }

    /// Proposes `cmd` unless the same proposal was made less than [`REPROPOSE_MS`]
    /// ago; true if it was proposed now.
    fn propose_once(&mut self, now: u64, cmd: Command) -> bool {
        let key = format!("{cmd:?}");
        if self.proposed.get(&key).is_some_and(|t| now < t + REPROPOSE_MS) {
            return false;
        }
        match self.raft.propose(cmd) {
            Ok(()) => {
                self.proposed.insert(key, now);
                true
            }
            Err(e) => {
                debug!(node = self.node, error = %e, "proposal not made (waiting for quorum)");
                false
            }
        }
    }

    /// Milliseconds since the node started: the clock of the cores, raft and liveness.
    pub(crate) fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Registers a client connection; `wake` is notified when a task other than the
    /// session's own queues a message for it.
    pub(crate) fn add_session(&mut self, wake: Arc<Notify>, pid: Option<i32>) -> SessionId {
        let id = self.next_session;
        self.next_session += 1;
        let s = Session { out: Vec::new(), wake, pid, name: String::new(), joined: BTreeMap::new(), overflowed: false };
        self.sessions.insert(id, s);
        id
    }

    /// Handles frames read by session `sid`'s own task, then moves what is queued for
    /// that client (answers, ASTs, and whatever else was queued) to the end of `into`.
    /// What the frames produce for that client is queued without waking its task:
    /// the task is the caller.
    pub(crate) fn serve(
        &mut self,
        sid: SessionId,
        frames: impl IntoIterator<Item = ClientFrame>,
        into: &mut Vec<ServerMsg>,
    ) -> Result<(), Overflowed> {
        self.serving = Some(sid);
        for f in frames {
            self.handle_client(sid, f);
        }
        self.serving = None;
        self.take_out(sid, into)
    }

    /// Moves the messages queued for session `sid` to the end of `into`.
    pub(crate) fn take_out(&mut self, sid: SessionId, into: &mut Vec<ServerMsg>) -> Result<(), Overflowed> {
        let Some(s) = self.sessions.get_mut(&sid) else { return Ok(()) };
        if s.overflowed {
            return Err(Overflowed);
        }
        if into.is_empty() {
            std::mem::swap(into, &mut s.out);
        } else {
            into.append(&mut s.out);
        }
        Ok(())
    }

    /// A client connection ended: a plain client's locks are unlocked; a client with
    /// recovery callbacks leaves uncleanly: this node leaves the lockspace at once
    /// (its locks go with it) and the others recover its slot.
    pub(crate) fn remove_session(&mut self, sid: SessionId) {
        let Some(s) = self.sessions.remove(&sid) else { return };
        for (ls, kind) in s.joined {
            let locks = self.lockspaces[ls as usize].owners.values().filter(|o| o.session == sid).count();
            match kind {
                JoinKind::Plain => {
                    if locks > 0 {
                        info!(node = self.node, ls = %self.lockspaces[ls as usize].name, client = sid,
                            pid = ?s.pid, locks, "plain client disconnected: unlocking its locks");
                    }
                    self.leave(ls, sid);
                }
                JoinKind::WithRecovery => {
                    let e = &mut self.lockspaces[ls as usize];
                    e.unclean_leaves += 1;
                    warn!(node = self.node, ls = %e.name, client = sid, pid = ?s.pid, locks,
                        "client with recovery callbacks left uncleanly: leaving the lockspace; the other members \
                         recover its locks and its slot");
                    e.clients.remove(&sid);
                    self.stop_lockspace(ls, "the recovery client of this node left uncleanly", true);
                }
            }
        }
        self.pump();
    }

    /// This node stops taking part in `ls` at once: the core and all local locks
    /// are dropped, the remaining clients are told and detached. With `unclean`,
    /// the leave is proposed unclean (the others recover our slot).
    fn stop_lockspace(&mut self, ls: LsId, reason: &str, unclean: bool) {
        let e = &mut self.lockspaces[ls as usize];
        let was_member = e.core.is_some();
        e.core = None;
        // A lock operation waiting for its AST gets no AST any more: fail it, or its
        // client waits forever.
        let pending: Vec<(SessionId, u64)> =
            e.owners.drain().filter_map(|(_, o)| o.op.filter(|_| !o.reaping).map(|id| (o.session, id))).collect();
        e.early.clear();
        e.want = false;
        e.leave_at = None;
        e.recovery_started = None;
        e.unclean |= unclean && was_member;
        let clients: Vec<SessionId> = std::mem::take(&mut e.clients).into_keys().collect();
        let joins = std::mem::take(&mut e.joins);
        // Every plock of this node in the lockspace goes with it (the others drop
        // them when the view without this node comes); operations in flight fail.
        e.plock = PlockService::new(self.node);
        e.plock_tokens.clear();
        e.plock_owners.clear();
        let plock_ops: Vec<PlockOrigin> = e.plock_ops.drain().map(|(_, o)| o).collect();
        for o in plock_ops {
            if let Some(sid) = o.session {
                let error = err(ErrorKind::NotJoined, format!("plock operation failed: {reason}"));
                self.send(sid, ServerMsg::Error { id: o.id, error });
            }
        }
        for sid in clients {
            self.send(sid, ServerMsg::Recovery { ls, event: RecoveryEvent::Stopped { reason: reason.to_string() } });
            if let Some(s) = self.sessions.get_mut(&sid) {
                s.joined.remove(&ls);
            }
        }
        for (sid, id) in joins {
            self.send(sid, ServerMsg::Error { id, error: err(ErrorKind::JoinRefused, reason) });
        }
        for (sid, id) in pending {
            let error = err(ErrorKind::NotJoined, format!("lock operation failed: {reason}"));
            self.send(sid, ServerMsg::Error { id, error });
        }
    }

    /// Unlocks (or cancels, then unlocks) every lock of `sid` in `ls` and forgets the
    /// session's membership of it; the last client leaving makes this node leave the
    /// lockspace (after the linger time for plain clients).
    fn leave(&mut self, ls: LsId, sid: SessionId) {
        let now = self.now();
        let linger = self.linger_ms;
        let e = &mut self.lockspaces[ls as usize];
        let kind = e.clients.remove(&sid);
        e.joins.retain(|(s, _)| *s != sid);
        let mine: Vec<LkId> = e.owners.iter().filter(|(_, o)| o.session == sid).map(|(id, _)| *id).collect();
        if let Some(core) = e.core.as_mut() {
            for lkid in mine {
                if let Some(o) = e.owners.get_mut(&lkid) {
                    o.reaping = true;
                    o.op = None;
                }
                reap(core, now, lkid);
            }
        } else {
            e.owners.retain(|_, o| o.session != sid);
        }
        self.reap_plocks(ls, sid);
        let e = &mut self.lockspaces[ls as usize];
        if e.clients.is_empty() && e.want {
            e.leave_at = Some(if kind == Some(JoinKind::WithRecovery) { now } else { now + linger });
        }
        self.drain(ls);
    }

    /// Handles one client frame. Answers and ASTs go to the session's queue.
    fn handle_client(&mut self, sid: SessionId, frame: ClientFrame) {
        let id = frame.id;
        let now = self.now();
        let result: Result<Option<Reply>, RemoteError> = match frame.req {
            ClientRequest::Hello { version, name } => {
                if version != CLIENT_PROTOCOL_VERSION {
                    Err(err(
                        ErrorKind::Version,
                        format!("client protocol {version}, lockd speaks {CLIENT_PROTOCOL_VERSION}"),
                    ))
                } else {
                    if let Some(s) = self.sessions.get_mut(&sid) {
                        s.name = name.chars().take(64).collect();
                    }
                    Ok(Some(Reply::Hello { node: self.node, cluster: self.cluster.clone() }))
                }
            }
            ClientRequest::Join { name, kind } => self.join(sid, id, name, kind),
            ClientRequest::Leave { ls } => self.joined(sid, ls).map(|_| {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.joined.remove(&ls);
                }
                self.leave(ls, sid);
                Some(Reply::Done)
            }),
            ClientRequest::Lock { ls, name, mode, flags, lvb } => self.joined(sid, ls).and_then(|_| {
                let e = &mut self.lockspaces[ls as usize];
                let core = e.core.as_mut().ok_or_else(|| err(ErrorKind::NotJoined, "not a member any more"))?;
                let lkid = core.request(now, LockRequest { name, mode, flags, lvb }).map_err(lock_error)?;
                e.owners.insert(lkid, Owner { session: sid, op: Some(id), reaping: false });
                self.drain(ls);
                let e = &self.lockspaces[ls as usize];
                if e.owners.get(&lkid).is_some_and(|o| o.op == Some(id)) {
                    self.send(sid, ServerMsg::Accepted { id, lkid });
                }
                Ok(None)
            }),
            ClientRequest::Convert { ls, lkid, mode, flags, lvb } => {
                match self
                    .owned(sid, ls, lkid)
                    .and_then(|core| core.convert(now, lkid, mode, flags, lvb).map_err(lock_error))
                {
                    Ok(()) => {
                        self.set_op(ls, lkid, id);
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }
            ClientRequest::Unlock { ls, lkid, lvb } => {
                match self.owned(sid, ls, lkid).and_then(|core| core.unlock(now, lkid, lvb).map_err(lock_error)) {
                    Ok(()) => {
                        self.set_op(ls, lkid, id);
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }
            ClientRequest::Cancel { ls, lkid } => {
                match self.owned(sid, ls, lkid).and_then(|core| core.cancel(now, lkid).map_err(lock_error)) {
                    Ok(()) => {
                        self.send(sid, ServerMsg::Reply { id, reply: Reply::Done });
                        self.drain(ls);
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }
            ClientRequest::Dump { lockspace } => match self.dump(lockspace.as_deref()) {
                Ok(parts) => {
                    let n = parts.len();
                    for (i, lockspaces) in parts.into_iter().enumerate() {
                        self.send(sid, ServerMsg::Reply { id, reply: Reply::Dump { lockspaces, last: i + 1 == n } });
                    }
                    Ok(None)
                }
                Err(e) => Err(e),
            },
            ClientRequest::Status => Ok(Some(Reply::Status(self.status()))),
            ClientRequest::Fault { cut } => {
                let old = self.ep.cut();
                let new: std::collections::BTreeSet<NodeId> = cut.into_iter().filter(|p| *p != self.node).collect();
                self.ep.set_cut(new.clone());
                // Healing is a reconnection: what was dropped meanwhile is resynced.
                for p in old.difference(&new) {
                    self.peer_reconnected(*p);
                }
                Ok(Some(Reply::Done))
            }
            ClientRequest::Plock { ls, token, space, number, op } => {
                self.plock_request(sid, id, ls, token, space, number, op).map(|()| None)
            }
            ClientRequest::PlockCancel { ls, token } => self.joined(sid, ls).map(|_| {
                let e = &mut self.lockspaces[ls as usize];
                if let Some(op) = e.plock_tokens.get(&(sid, token)).copied() {
                    e.plock.cancel(op);
                    self.drain_plock(ls);
                }
                Some(Reply::Done)
            }),
            ClientRequest::PlockThaw { ls, generation } => self.joined(sid, ls).and_then(|_| {
                let e = &mut self.lockspaces[ls as usize];
                if e.clients.get(&sid) != Some(&JoinKind::WithRecovery) {
                    return Err(err(ErrorKind::InvalidFlags, "only the client joined with recovery thaws plocks"));
                }
                if e.plock.thaw(generation) {
                    info!(node = self.node, ls = %e.name, generation, "plocks thawed by the recovery client");
                    self.drain_plock(ls);
                }
                Ok(Some(Reply::Done))
            }),
        };
        match result {
            Ok(Some(reply)) => self.send(sid, ServerMsg::Reply { id, reply }),
            Ok(None) => {}
            Err(error) => self.send(sid, ServerMsg::Error { id, error }),
        }
        self.pump();
    }

    /// A client's plock operation: checked, recorded, given to the service.
    fn plock_request(
        &mut self,
        sid: SessionId,
        id: u64,
        ls: LsId,
        token: u64,
        space: PlockSpace,
        number: u64,
        op: PlockOp,
    ) -> Result<(), RemoteError> {
        self.joined(sid, ls)?;
        let e = &mut self.lockspaces[ls as usize];
        if e.core.is_none() {
            return Err(err(ErrorKind::NotJoined, "not a member any more"));
        }
        let range = match op {
            PlockOp::Lock { start, end, .. } | PlockOp::Unlock { start, end, .. } | PlockOp::Get { start, end, .. } => {
                Some((start, end))
            }
            PlockOp::UnlockOwner { .. } => None,
        };
        if let Some((start, end)) = range {
            if !PlockService::valid_range(start, end) {
                return Err(err(ErrorKind::InvalidFlags, format!("plock range {start}..={end} is empty")));
            }
        }
        if e.plock_tokens.contains_key(&(sid, token)) {
            return Err(err(ErrorKind::Busy, format!("plock token {token} is already in flight")));
        }
        match op {
            PlockOp::Lock { owner, .. } => {
                e.plock_owners.entry(sid).or_default().insert((space, number, owner));
            }
            PlockOp::UnlockOwner { owner } => {
                if let Some(set) = e.plock_owners.get_mut(&sid) {
                    set.remove(&(space, number, owner));
                }
            }
            _ => {}
        }
        let op_id = e.plock.request(space, number, op);
        e.plock_ops.insert(op_id, PlockOrigin { session: Some(sid), id, token });
        e.plock_tokens.insert((sid, token), op_id);
        self.drain_plock(ls);
        Ok(())
    }

    /// A client left `ls` (or disconnected): its waiting plock operations are
    /// cancelled and every owner it locked with is unlocked, on every resource it
    /// used. Answers to its operations still in flight go nowhere.
    fn reap_plocks(&mut self, ls: LsId, sid: SessionId) {
        let e = &mut self.lockspaces[ls as usize];
        let owners = e.plock_owners.remove(&sid).unwrap_or_default();
        let mine: Vec<u64> = e.plock_ops.iter().filter(|(_, o)| o.session == Some(sid)).map(|(op, _)| *op).collect();
        e.plock_tokens.retain(|(s, _), _| *s != sid);
        if owners.is_empty() && mine.is_empty() {
            return;
        }
        info!(node = self.node, ls = %e.name, client = sid, owners = owners.len(), in_flight = mine.len(),
            "client left: cancelling its plock operations and unlocking its plocks");
        for op in mine {
            if let Some(o) = e.plock_ops.get_mut(&op) {
                o.session = None;
            }
            e.plock.cancel(op);
        }
        if e.core.is_some() {
            for (space, number, owner) in owners {
                let op = e.plock.request(space, number, PlockOp::UnlockOwner { owner });
                e.plock_ops.insert(op, PlockOrigin { session: None, id: 0, token: 0 });
            }
        }
        self.drain_plock(ls);
    }

    /// Plock operations held since a departure go on once lock recovery of
    /// `generation` is done, when no local client takes care of recovery (a
    /// recovery client thaws them itself once its journal recovery is done).
    fn thaw_plocks_unless_recovery_client(&mut self, ls: LsId, generation: u64) {
        let e = &mut self.lockspaces[ls as usize];
        if e.clients.values().any(|k| *k == JoinKind::WithRecovery) {
            return;
        }
        if e.plock.thaw(generation) {
            info!(node = self.node, ls = %e.name, generation, "plocks thawed (no recovery client on this node)");
            self.drain_plock(ls);
        }
    }

    /// Moves the plock service's outputs: messages to peers, answers to clients.
    fn drain_plock(&mut self, ls: LsId) {
        let e = &mut self.lockspaces[ls as usize];
        while let Some((to, generation, msg)) = e.plock.poll_transmit() {
            self.lock_messages_sent += 1;
            if let Err(error) = self.ep.send(to, PeerMsg::Plock { ls: e.name.clone(), generation, msg }) {
                // The next generation reports again and resends what is in flight.
                warn!(node = self.node, ls = %e.name, to, %error, "plock message to peer dropped: resync of the lockspace");
                self.resync.insert(ls, e.view.generation);
            }
        }
        let mut out: Vec<(SessionId, ServerMsg)> = Vec::new();
        while let Some((op, result)) = e.plock.poll_answer() {
            let Some(o) = e.plock_ops.remove(&op) else {
                debug!(node = self.node, op, "plock answer without origin");
                continue;
            };
            let Some(sid) = o.session else { continue };
            e.plock_tokens.remove(&(sid, o.token));
            out.push((sid, ServerMsg::Reply { id: o.id, reply: Reply::Plock(result) }));
        }
        for (sid, msg) in out {
            self.send(sid, msg);
        }
    }

    fn set_op(&mut self, ls: LsId, lkid: LkId, id: u64) {
        if let Some(o) = self.lockspaces[ls as usize].owners.get_mut(&lkid) {
            o.op = Some(id);
        }
        self.drain(ls);
    }

    fn joined(&self, sid: SessionId, ls: LsId) -> Result<(), RemoteError> {
        match self.sessions.get(&sid) {
            Some(s) if s.joined.contains_key(&ls) => Ok(()),
            _ => Err(err(ErrorKind::NotJoined, format!("lockspace handle {ls} is not joined on this connection"))),
        }
    }

    fn owned(&mut self, sid: SessionId, ls: LsId, lkid: LkId) -> Result<&mut Lockspace, RemoteError> {
        self.joined(sid, ls)?;
        let e = &mut self.lockspaces[ls as usize];
        match e.owners.get(&lkid) {
            Some(o) if o.session == sid && !o.reaping => {}
            _ => return Err(err(ErrorKind::UnknownLock, format!("no lock {lkid} of this client"))),
        }
        e.core.as_mut().ok_or_else(|| err(ErrorKind::NotJoined, "not a member any more"))
    }

    fn join(&mut self, sid: SessionId, id: u64, name: String, kind: JoinKind) -> Result<Option<Reply>, RemoteError> {
        check_lockspace_name(&name).map_err(|m| err(ErrorKind::JoinRefused, m))?;
        if self.lockspaces.len() >= MAX_LOCKSPACES && !self.by_name.contains_key(&name) {
            return Err(err(ErrorKind::JoinRefused, format!("this node already has {MAX_LOCKSPACES} lockspaces")));
        }
        let ls = self.lockspace(&name);
        if self.sessions.get(&sid).is_some_and(|s| s.joined.contains_key(&ls)) {
            return Err(err(ErrorKind::JoinRefused, format!("lockspace {name} is already joined on this connection")));
        }
        let e = &mut self.lockspaces[ls as usize];
        if kind == JoinKind::WithRecovery && e.clients.values().any(|k| *k == JoinKind::WithRecovery) {
            return Err(err(
                ErrorKind::JoinRefused,
                format!("lockspace {name} already has a client with recovery callbacks on this node"),
            ));
        }
        e.clients.insert(sid, kind);
        e.want = true;
        e.leave_at = None;
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.joined.insert(ls, kind);
            info!(node = self.node, ls = %name, client = sid, pid = ?s.pid, kind = kind.as_str(), "client joined");
        }
        let e = &mut self.lockspaces[ls as usize];
        if e.ready() && !e.unclean {
            return Ok(Some(self.joined_reply(ls)));
        }
        e.joins.push((sid, id));
        let now = self.now();
        self.reconcile(now);
        Ok(None)
    }

    fn joined_reply(&self, ls: LsId) -> Reply {
        let e = &self.lockspaces[ls as usize];
        Reply::Joined {
            ls,
            members: e.view.members.keys().copied().collect(),
            generation: e.view.generation,
            slot: e.view.members.get(&self.node).copied().unwrap_or(0),
        }
    }

    /// The entry of lockspace `name`, created if this node does not know it yet.
    fn lockspace(&mut self, name: &str) -> LsId {
        if let Some(ls) = self.by_name.get(name) {
            return *ls;
        }
        let ls = self.lockspaces.len() as LsId;
        let mut e = LsEntry::new(name, self.node);
        if let Some(v) = self.raft.state().lockspaces.get(name) {
            e.view.generation = v.generation;
        }
        self.lockspaces.push(e);
        self.by_name.insert(name.to_string(), ls);
        ls
    }

    /// A message from peer `from`.
    pub(crate) fn handle_peer(&mut self, from: NodeId, msg: PeerMsg) {
        let now = self.now();
        match msg {
            PeerMsg::Ls { ls: name, generation, msg } => {
                if check_lockspace_name(&name).is_err() {
                    warn!(node = self.node, from, "message for a badly named lockspace dropped");
                    return;
                }
                let Some(&ls) = self.by_name.get(&name) else {
                    debug!(node = self.node, from, ls = %name, "message for a lockspace this node is not in");
                    return;
                };
                let e = &mut self.lockspaces[ls as usize];
                match e.core.as_mut() {
                    Some(core) => {
                        core.handle_message(now, from, generation, msg);
                        self.drain(ls);
                    }
                    // Joining: the others may have applied our view before us.
                    None if e.want && generation > e.view.generation && e.early.len() < MAX_EARLY => {
                        e.early.push((from, generation, msg))
                    }
                    None => {}
                }
            }
            PeerMsg::Plock { ls: name, generation, msg } => {
                if check_lockspace_name(&name).is_err() {
                    warn!(node = self.node, from, "plock message for a badly named lockspace dropped");
                    return;
                }
                let Some(&ls) = self.by_name.get(&name) else {
                    debug!(node = self.node, from, ls = %name, "plock message for a lockspace this node is not in");
                    return;
                };
                let e = &mut self.lockspaces[ls as usize];
                // A joining node keeps messages of its future view (the service holds them).
                if e.core.is_some() || e.want {
                    e.plock.handle_message(from, generation, msg);
                    self.drain_plock(ls);
                }
            }
            PeerMsg::Raft(bytes) => {
                self.raft.step(from, &bytes);
                self.pump();
            }
            PeerMsg::Heartbeat(hb) => {
                if let Some(ack) = self.live.on_heartbeat(now, from, &hb) {
                    self.peer_send(from, PeerMsg::Ack(ack));
                }
            }
            PeerMsg::Ack(ack) => {
                self.live.on_ack(now, from, &ack);
                if self.live.has_lease(now) {
                    self.had_lease = true;
                }
            }
        }
    }

    fn peer_send(&self, to: NodeId, msg: PeerMsg) {
        if let Err(e) = self.ep.send(to, msg) {
            debug!(node = self.node, to, %e, "message to peer dropped");
        }
    }

    /// Periodic work: raft ticks, heartbeats, the lease, proposals, the leader's
    /// duty of declaring dead nodes dead, and the cores' timers. Returns the next
    /// core deadline.
    pub(crate) fn tick(&mut self) -> Option<u64> {
        let now = self.now();
        self.raft.tick(now);
        let alive: Vec<(NodeId, u64)> =
            self.raft.state().nodes.iter().filter(|(_, l)| l.alive).map(|(n, l)| (*n, l.incarnation)).collect();
        for (node, inc) in alive {
            self.live.watch(now, node, inc);
        }
        for (to, hb) in self.live.poll_heartbeats(now) {
            self.peer_send(to, PeerMsg::Heartbeat(hb));
        }
        if self.live.has_lease(now) {
            self.had_lease = true;
        } else if self.had_lease || self.alive_seen {
            self.fence(now, "cut off from a quorum of nodes for the lease time".to_string());
        }
        let results = std::mem::take(&mut *self.fence_results.lock().unwrap_or_else(|e| e.into_inner()));
        for (key, r) in results {
            match r {
                Ok(()) => {
                    info!(node = self.node, target = key.0, "fence command succeeded");
                    self.fences.insert(key, Fence::Done);
                }
                Err(e) => {
                    warn!(node = self.node, target = key.0, error = %e,
                        "fence command failed: recovery of that node waits; retrying in {FENCE_RETRY_MS} ms");
                    self.fences.insert(key, Fence::Failed(now));
                }
            }
        }
        for ls in 0..self.lockspaces.len() {
            let e = &mut self.lockspaces[ls];
            if e.leave_at.is_some_and(|t| t <= now) && e.clients.is_empty() {
                e.leave_at = None;
                e.want = false;
            }
        }
        self.reconcile(now);
        if self.raft.is_leader() {
            self.declare_dead(now);
        }
        self.pump();
        self.handle_timeouts()
    }

    /// Milliseconds until [`tick`](Self::tick) should run again.
    pub(crate) fn tick_ms(&self) -> u64 {
        (self.timing.heartbeat_ms / 4).clamp(5, 100)
    }

    /// This node lost its lease (or was declared dead): it stops every lockspace at
    /// once, tells the clients, and starts over as a new incarnation that must
    /// rejoin.
    fn fence(&mut self, now: u64, reason: String) {
        warn!(node = self.node, reason = %reason, "fenced: stopping every lockspace; rejoining as a new incarnation");
        for ls in 0..self.lockspaces.len() as LsId {
            if self.lockspaces[ls as usize].core.is_some() || !self.lockspaces[ls as usize].clients.is_empty() {
                self.stop_lockspace(ls, &format!("fenced: {reason}"), false);
            }
            self.lockspaces[ls as usize].unclean = false;
        }
        self.fenced = true;
        self.fence_count += 1;
        self.last_fence = Some(reason);
        self.incarnation = rand::random::<u64>() | 1;
        self.live = Liveness::new(self.node, &self.voters, self.incarnation, self.timing, now);
        self.forget_dead();
        self.alive_seen = false;
        self.had_lease = false;
        self.proposed.clear();
        info!(node = self.node, incarnation = format_args!("{:016x}", self.incarnation), "membership: new incarnation");
    }

    /// A connection to `peer` came back after it was lost: lock messages to or from
    /// it may have been lost with it, so every lockspace both are in is resynced.
    pub(crate) fn peer_reconnected(&mut self, peer: NodeId) {
        for (ls, e) in self.lockspaces.iter().enumerate() {
            if e.core.is_some() && e.view.members.contains_key(&peer) {
                info!(node = self.node, ls = %e.name, peer, "peer reconnected: resync of the lockspace");
                self.resync.insert(ls as LsId, e.view.generation);
            }
        }
    }

    /// Proposes what this node needs and does not see applied yet.
    fn reconcile(&mut self, now: u64) {
        let (node, inc) = (self.node, self.incarnation);
        let mut want: Vec<Command> = Vec::new();
        // Resyncs of a generation that is already past are done.
        self.resync.retain(|ls, g| self.lockspaces[*ls as usize].view.generation == *g);
        for (ls, g) in &self.resync {
            let e = &self.lockspaces[*ls as usize];
            if e.core.is_some() {
                want.push(Command::Resync { ls: e.name.clone(), node, incarnation: inc, generation: *g });
            }
        }
        if !self.raft.state().is_alive(node, inc) {
            // Alive only with a lease: a node serves locks only while it holds one,
            // and only the loss of a lease it held fences it. Before this rule a
            // node that came up inside its peers' start-up quiet period served
            // locks without ever holding a lease, and when cut off it never
            // fenced itself while the majority gave its locks away.
            if self.live.has_lease(now) {
                want.push(Command::Alive { node, incarnation: inc });
            }
        } else {
            for e in &self.lockspaces {
                let member = e.view.members.contains_key(&node);
                if member && (!e.want || e.core.is_none() && e.unclean) {
                    want.push(Command::Leave { ls: e.name.clone(), node, incarnation: inc, clean: !e.unclean });
                } else if !member && e.want && !e.unclean {
                    want.push(Command::Join { ls: e.name.clone(), node, incarnation: inc });
                } else if member && e.want {
                    let done =
                        e.core.as_ref().is_some_and(|c| !c.is_recovering() && c.generation() == e.view.generation);
                    if done && e.view.recovering && !e.view.done.contains(&node) {
                        want.push(Command::RecoveryDone { ls: e.name.clone(), generation: e.view.generation, node });
                    }
                }
            }
        }
        for cmd in want {
            self.propose_once(now, cmd);
        }
    }

    /// Leader: declares dead the nodes whose lease has surely run out, after the
    /// fence command (if any) succeeded.
    fn declare_dead(&mut self, now: u64) {
        for (x, inc) in self.live.dead_candidates(now) {
            if !self.raft.state().is_alive(x, inc) {
                continue;
            }
            if let Some(cmd) = self.fence_cmd.clone() {
                match self.fences.get(&(x, inc)) {
                    Some(Fence::Done) => {}
                    Some(Fence::Running) => continue,
                    Some(Fence::Failed(at)) if now < at + FENCE_RETRY_MS => continue,
                    _ => {
                        self.fences.insert((x, inc), Fence::Running);
                        let (name, addr) = self
                            .peers
                            .iter()
                            .find(|p| p.0 == x)
                            .map(|p| (p.1.clone(), p.2.clone()))
                            .unwrap_or_default();
                        let line =
                            cmd.replace("{id}", &x.to_string()).replace("{name}", &name).replace("{addr}", &addr);
                        warn!(node = self.node, target = x, cmd = %line, "fencing node before recovering it");
                        let results = self.fence_results.clone();
                        tokio::spawn(async move {
                            let r = run_fence(&line).await;
                            results.lock().unwrap_or_else(|e| e.into_inner()).push(((x, inc), r));
                        });
                        continue;
                    }
                }
            }
            if self.propose_once(now, Command::Dead { node: x, incarnation: inc }) {
                warn!(node = self.node, target = x, "node declared dead: its lease has run out");
            }
        }
    }

    /// Moves raft's outputs: messages to peers, applied commands to the views.
    fn pump(&mut self) {
        while let Some((to, bytes)) = self.raft.poll_transmit() {
            self.peer_send(to, PeerMsg::Raft(bytes));
        }
        let mut changed: Vec<String> = Vec::new();
        let mut all = self.raft.poll_snapshot().is_some();
        while let Some((_, cmd)) = self.raft.poll_applied() {
            match &cmd {
                Command::Dead { node, incarnation } => {
                    self.live.forget(*node, *incarnation);
                    self.fences.remove(&(*node, *incarnation));
                    all = true;
                    if *node == self.node && *incarnation == self.incarnation {
                        let now = self.now();
                        self.fence(now, "declared dead by the cluster".to_string());
                    }
                }
                Command::Alive { .. } => all = true,
                Command::Join { ls, .. }
                | Command::Leave { ls, .. }
                | Command::RecoveryDone { ls, .. }
                | Command::Resync { ls, .. } => changed.push(ls.clone()),
            }
        }
        if !self.alive_seen && self.raft.state().is_alive(self.node, self.incarnation) {
            self.alive_seen = true;
            self.fenced = false;
            info!(node = self.node, "membership: this incarnation is up in the cluster");
        }
        if all {
            changed = self.raft.state().lockspaces.keys().cloned().collect();
        }
        changed.sort();
        changed.dedup();
        for name in changed {
            self.apply_view(&name);
        }
    }

    /// Brings lockspace `name` to the agreed view.
    fn apply_view(&mut self, name: &str) {
        let Some(view) = self.raft.state().lockspaces.get(name).cloned() else { return };
        let now = self.now();
        let us = self.node;
        let Some(&ls) = self.by_name.get(name) else {
            // Not known here: nothing of ours to recover.
            return;
        };
        let e = &mut self.lockspaces[ls as usize];
        let new_gen = view.generation != e.view.generation;
        e.view = view.clone();
        if !new_gen {
            return;
        }
        let member = view.members.contains_key(&us);
        if !member {
            e.unclean = false;
            if e.core.is_some() {
                // Our leave (or our death) is applied.
                info!(node = us, ls = %name, generation = view.generation, "left the lockspace");
                self.stop_lockspace(ls, "this node left the lockspace", false);
            }
            return;
        }
        if e.unclean || (e.core.is_none() && !e.want) {
            // A stale join, or one we no longer want: the leave follows.
            return;
        }
        let members = view_members(&view);
        info!(node = us, ls = %name, generation = view.generation, members = ?view.members, departed = ?view.departed,
            "membership view: lock recovery starts");
        e.recovery_started = Some(now);
        match e.core.as_mut() {
            Some(core) => core.begin_recovery(now, view.generation, members),
            None => {
                let seed = self.seed_base ^ u64::from(ls).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ view.generation;
                let mut core = Lockspace::new_in_view(name, us, view.generation, members, seed);
                for (from, g, m) in std::mem::take(&mut e.early) {
                    core.handle_message(now, from, g, m);
                }
                e.core = Some(core);
            }
        }
        // Plocks: the table is rebuilt at the (new) master from every member's report;
        // with members departed, this node's plock operations are held until thawed.
        let ids: Vec<NodeId> = view.members.keys().copied().collect();
        let freeze = !view.departed.is_empty();
        if freeze {
            info!(node = us, ls = %name, generation = view.generation, "plock operations held until recovery is done");
        }
        e.plock.begin_view(view.generation, &ids, freeze);
        let prep: Vec<SessionId> =
            e.clients.iter().filter(|(_, k)| **k == JoinKind::WithRecovery).map(|(s, _)| *s).collect();
        for sid in prep {
            self.send(sid, ServerMsg::Recovery { ls, event: RecoveryEvent::Prep { generation: view.generation } });
        }
        self.drain(ls);
    }

    /// Lock recovery of `generation` finished here: recover_slot for each departed
    /// member, recover_done, waiting joins answered, RecoveryDone proposed.
    fn recovered(&mut self, ls: LsId, generation: u64) {
        let now = self.now();
        let e = &mut self.lockspaces[ls as usize];
        let ms = e.recovery_started.take().map_or(0, |t| now.saturating_sub(t));
        let departed = e.view.departed.clone();
        info!(node = self.node, ls = %e.name, generation, ms, ?departed, "lock recovery done");
        e.last_recovery = Some(RecoveryStat { generation, departed: departed.clone(), ms, at_ms: now });
        let our_slot = e.view.members.get(&self.node).copied().unwrap_or(0);
        let slots = e.view.members.clone();
        let rec: Vec<SessionId> =
            e.clients.iter().filter(|(_, k)| **k == JoinKind::WithRecovery).map(|(s, _)| *s).collect();
        let joins = std::mem::take(&mut e.joins);
        for sid in rec {
            for (node, slot) in &departed {
                self.send(sid, ServerMsg::Recovery { ls, event: RecoveryEvent::Slot { node: *node, slot: *slot } });
            }
            let event = RecoveryEvent::Done { generation, slots: slots.clone(), our_slot };
            self.send(sid, ServerMsg::Recovery { ls, event });
        }
        let reply = self.joined_reply(ls);
        for (sid, id) in joins {
            self.send(sid, ServerMsg::Reply { id, reply: reply.clone() });
        }
        self.thaw_plocks_unless_recovery_client(ls, generation);
        // RecoveryDone is proposed by the next tick's reconcile.
    }

    /// Runs due core timers of every lockspace; returns the next deadline.
    fn handle_timeouts(&mut self) -> Option<u64> {
        let now = self.now();
        let mut next: Option<u64> = None;
        for ls in 0..self.lockspaces.len() {
            let Some(core) = self.lockspaces[ls].core.as_mut() else { continue };
            if core.poll_timeout().is_some_and(|t| t <= now) {
                core.handle_timeout(now);
                self.drain(ls as LsId);
            }
            if let Some(t) = self.lockspaces[ls].core.as_ref().and_then(|c| c.poll_timeout()) {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        next
    }

    /// Moves every output of lockspace `ls`'s core to where it goes, until it has none.
    fn drain(&mut self, ls: LsId) {
        self.drain_plock(ls);
        let now = self.now();
        loop {
            let e = &mut self.lockspaces[ls as usize];
            let Some(core) = e.core.as_mut() else { return };
            let mut moved = false;
            while let Some((to, generation, msg)) = core.poll_transmit() {
                moved = true;
                self.lock_messages_sent += 1;
                if let Err(err) = self.ep.send(to, PeerMsg::Ls { ls: e.name.clone(), generation, msg }) {
                    // A new generation reconciles what the message would have done.
                    warn!(node = self.node, ls = %e.name, to, %err, "message to peer dropped: resync of the lockspace");
                    self.resync.insert(ls, e.view.generation);
                }
            }
            let mut out: Vec<(SessionId, ServerMsg)> = Vec::new();
            let mut recovered = None;
            while let Some(ev) = core.poll_event() {
                moved = true;
                match ev {
                    Event::Ast { lkid, status, flags, mode, lvb } => {
                        let Some(o) = e.owners.get_mut(&lkid) else {
                            debug!(node = self.node, %lkid, "AST for a lock without owner");
                            continue;
                        };
                        if o.reaping {
                            if mode.is_some() {
                                reap(core, now, lkid);
                            } else {
                                e.owners.remove(&lkid);
                            }
                            continue;
                        }
                        let to = o.op.take().map(|id| (o.session, id));
                        if mode.is_none() {
                            e.owners.remove(&lkid);
                        }
                        if let Some((sid, id)) = to {
                            let ast = Ast { lkid, status, sb_flags: flags, mode, lvb };
                            out.push((sid, ServerMsg::Ast { id, ast }));
                        }
                    }
                    Event::Bast { lkid, mode } => match e.owners.get(&lkid) {
                        Some(Owner { session, reaping: false, .. }) => {
                            out.push((*session, ServerMsg::Bast { ls, bast: Bast { lkid, mode } }))
                        }
                        _ => debug!(node = self.node, %lkid, %mode, "BAST for a lock without a client"),
                    },
                    Event::Recovered { generation } => recovered = Some(generation),
                }
            }
            if let Some(t) = core.poll_timeout() {
                if t < self.timer.deadline.fetch_min(t, Ordering::Relaxed) {
                    self.timer.notify.notify_one();
                }
            }
            for (sid, msg) in out {
                self.send(sid, msg);
            }
            if let Some(g) = recovered {
                self.recovered(ls, g);
            }
            if !moved {
                return;
            }
        }
    }

    /// Queues `msg` for session `sid`. The session's task is woken unless it is the
    /// one serving now (it takes its queue before letting go of the state): a request
    /// answered at once costs no task wake-up.
    fn send(&mut self, sid: SessionId, msg: ServerMsg) {
        let Some(s) = self.sessions.get_mut(&sid) else { return };
        if s.overflowed {
            return;
        }
        if s.out.len() >= SESSION_QUEUE {
            warn!(node = self.node, client = sid, pid = ?s.pid, "client does not read its answers: disconnecting it");
            s.overflowed = true;
            s.out = Vec::new();
            s.wake.notify_one();
            return;
        }
        let was_empty = s.out.is_empty();
        s.out.push(msg);
        if was_empty && self.serving != Some(sid) {
            s.wake.notify_one();
        }
    }

    /// Lock dump, in parts.
    fn dump(&self, only: Option<&str>) -> Result<Vec<Vec<LockspaceDump>>, RemoteError> {
        let selected: Vec<&LsEntry> = match only {
            Some(name) => match self.by_name.get(name) {
                Some(ls) => vec![&self.lockspaces[*ls as usize]],
                None => return Err(err(ErrorKind::NotJoined, format!("no lockspace {name} on this node"))),
            },
            None => self.lockspaces.iter().collect(),
        };
        let mut parts: Vec<Vec<LockspaceDump>> = vec![Vec::new()];
        let mut items = 0;
        for e in selected {
            let head = |resources| LockspaceDump {
                name: e.name.clone(),
                members: e.view.members.keys().copied().collect(),
                generation: e.view.generation,
                resources,
            };
            // Every lockspace appears at least once, even without resources.
            // parts is never empty: it starts with one part and only grows.
            parts.last_mut().expect("parts is never empty").push(head(Vec::new()));
            let Some(core) = e.core.as_ref() else { continue };
            for r in core.dump() {
                if items >= DUMP_PART_ITEMS {
                    parts.push(vec![head(Vec::new())]);
                    items = 0;
                }
                items += 1 + r.locks.len();
                let locks = r
                    .locks
                    .iter()
                    .map(|l| LockInfo {
                        node: l.node,
                        lkid: l.lkid,
                        granted: l.granted,
                        requested: l.requested,
                        queue: l.queue,
                        owner: (l.node == self.node).then(|| self.owner_name(e, l.lkid)),
                    })
                    .collect();
                let info = ResourceInfo {
                    directory: core.directory_node(&r.name),
                    name: r.name,
                    master: r.master,
                    lvb: r.lvb,
                    locks,
                };
                let part = parts.last_mut().expect("parts is never empty");
                part.last_mut().expect("the part holds this lockspace").resources.push(info);
            }
        }
        Ok(parts)
    }

    fn owner_name(&self, e: &LsEntry, lkid: LkId) -> String {
        match e.owners.get(&lkid) {
            None => "lockd".into(),
            Some(Owner { reaping: true, .. }) => "lockd (unlocking for a departed client)".into(),
            Some(Owner { session: sid, .. }) => match self.sessions.get(sid).and_then(|s| s.pid) {
                Some(pid) => format!("client {sid} pid {pid}"),
                None => format!("client {sid}"),
            },
        }
    }

    pub(crate) fn status(&self) -> NodeStatus {
        let now = self.now();
        let stats = self.ep.stats();
        let mut clients: Vec<ClientStatus> = self
            .sessions
            .iter()
            .map(|(id, s)| ClientStatus {
                id: *id,
                pid: s.pid,
                name: s.name.clone(),
                joined: s.joined.iter().map(|(ls, k)| (self.lockspaces[*ls as usize].name.clone(), *k)).collect(),
                locks: self.lockspaces.iter().map(|e| e.owners.values().filter(|o| o.session == *id).count()).sum(),
            })
            .collect();
        clients.sort_by_key(|c| c.id);
        let state = self.raft.state();
        let lease = self.live.lease_until().filter(|t| *t > now).map(|t| t - now);
        let leader = self.raft.leader();
        let quorum_reason = if lease.is_none() {
            Some(format!(
                "no lease: fewer than {} of the {} configured nodes answer heartbeats",
                self.live.quorum(),
                self.voters.len()
            ))
        } else if leader.is_none() {
            Some("no membership leader elected yet".to_string())
        } else if !state.is_alive(self.node, self.incarnation) {
            Some("this incarnation is not yet up in the cluster".to_string())
        } else {
            None
        };
        NodeStatus {
            node: self.node,
            cluster: self.cluster.clone(),
            members: state.nodes.iter().filter(|(_, l)| l.alive).map(|(n, _)| *n).collect(),
            generation: state.generation,
            incarnation: self.incarnation,
            quorate: quorum_reason.is_none(),
            quorum_reason,
            fenced: self.fenced,
            fence_count: self.fence_count,
            last_fence: self.last_fence.clone(),
            leader,
            term: self.raft.term(),
            lease_left_ms: lease,
            heartbeat_ms: self.timing.heartbeat_ms,
            lease_ms: self.timing.lease_ms,
            dead_after_ms: self.timing.dead_after_ms,
            peers: self
                .peers
                .iter()
                .map(|(id, name, addr)| PeerStatus {
                    id: *id,
                    name: name.clone(),
                    addr: addr.clone(),
                    up: self.ep.is_up(*id),
                })
                .collect(),
            lockspaces: self
                .lockspaces
                .iter()
                .map(|e| LockspaceStatus {
                    name: e.name.clone(),
                    generation: e.view.generation,
                    members: e.view.members.keys().copied().collect(),
                    slots: e.view.members.clone(),
                    member: e.core.is_some(),
                    recovering: e.core.as_ref().is_some_and(|c| c.is_recovering()),
                    unrecovered: e.view.unrecovered.iter().copied().collect(),
                    last_recovery: e.last_recovery.clone(),
                    locks: e.core.as_ref().map_or(0, |c| c.lock_count()),
                    resources: e.core.as_ref().map_or(0, |c| c.resource_count()),
                    directory: e.core.as_ref().map_or(0, |c| c.directory_len()),
                    clients: e.clients.iter().map(|(s, k)| (*s, *k)).collect(),
                    unclean_leaves: e.unclean_leaves,
                })
                .collect(),
            clients,
            connections_refused: stats.connections_refused,
            malformed_frames: stats.malformed_frames,
            frames_sent: stats.frames_sent,
            lock_messages_sent: self.lock_messages_sent,
            cut: self.ep.cut().into_iter().collect(),
            uptime_ms: now,
        }
    }
}

/// Runs a fence command line with `sh -c`; success is exit status 0.
async fn run_fence(line: &str) -> Result<(), String> {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(line)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("cannot run `{line}`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(format!("`{line}` exited with {}: {}", out.status, stderr.trim()))
    }
}

/// Unlocks `lkid` for a departed client, or cancels its operation in progress (the
/// unlock then follows its AST, see `drain`).
fn reap(core: &mut Lockspace, now: u64, lkid: LkId) {
    match core.unlock(now, lkid, None) {
        Ok(()) => {}
        Err(LockError::Busy(_)) => {
            // A request or conversion in progress: cancel it; an unlock in progress: wait.
            let _ = core.cancel(now, lkid);
        }
        Err(e) => debug!(%lkid, %e, "lock of a departed client already gone"),
    }
}
