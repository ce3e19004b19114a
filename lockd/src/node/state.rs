//! The node's state behind one mutex: its lockspaces (one sans-IO
//! [`Lockspace`](crate::core::Lockspace) each), the owner of every lock, the local
//! client sessions, and the routing of core outputs (messages to peers, ASTs and BASTs
//! to sessions).
//!
//! Every entry point takes `&mut self` and returns after draining the core it touched,
//! so that no output is ever left queued in a core between calls.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, Notify};
use tracing::{debug, info, warn};

use super::proto::{
    check_lockspace_name, Ast, Bast, ClientFrame, ClientRequest, ClientStatus, ErrorKind, JoinKind, LockInfo,
    LockspaceDump, LockspaceStatus, LsId, NodeStatus, PeerStatus, RemoteError, Reply, ResourceInfo, ServerMsg,
    CLIENT_PROTOCOL_VERSION,
};
use super::PeerMsg;
use crate::config::ClusterConfig;
use crate::core::{Event, LkId, LockError, LockRequest, Lockspace, NodeId};
use crate::transport::Endpoint;

/// Most locks and resources in one [`Reply::Dump`] part, to stay far below the frame
/// size limit.
const DUMP_PART_ITEMS: usize = 2048;

/// Most lockspaces one node takes part in; a peer message naming a new lockspace
/// beyond this is dropped.
const MAX_LOCKSPACES: usize = 4096;

/// Identifies a client connection.
pub(crate) type SessionId = u64;

/// Who holds a lock of this node.
#[derive(Debug)]
struct Owner {
    /// The client; None for a lock kept after an unclean leave (orphan).
    session: Option<SessionId>,
    /// Request id of the operation whose AST is awaited.
    op: Option<u64>,
    /// The client is gone and the lock is being unlocked by lockd.
    reaping: bool,
}

struct LsEntry {
    core: Lockspace,
    owners: HashMap<LkId, Owner>,
    /// Local sessions joined, and how.
    clients: BTreeMap<SessionId, JoinKind>,
    unclean_leaves: u64,
}

impl LsEntry {
    fn orphaned(&self) -> usize {
        self.owners.values().filter(|o| o.session.is_none()).count()
    }
}

/// A connected local client.
pub(crate) struct Session {
    tx: mpsc::Sender<ServerMsg>,
    pid: Option<i32>,
    name: String,
    joined: BTreeMap<LsId, JoinKind>,
    /// Set when the session's outgoing queue overflowed; the session task closes it.
    overflowed: Arc<AtomicBool>,
}

/// Timer wake-up shared with the node task.
pub(crate) struct TimerArm {
    /// Earliest armed deadline (ms since start), `u64::MAX` when none.
    pub(crate) deadline: AtomicU64,
    pub(crate) notify: Notify,
}

pub(crate) struct NodeState {
    node: NodeId,
    cluster: String,
    members: Vec<NodeId>,
    peers: Vec<(NodeId, String, String)>,
    start: Instant,
    seed_base: u64,
    lockspaces: Vec<LsEntry>,
    by_name: BTreeMap<String, LsId>,
    sessions: HashMap<SessionId, Session>,
    next_session: SessionId,
    ep: Arc<Endpoint<PeerMsg>>,
    timer: Arc<TimerArm>,
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

impl NodeState {
    pub(crate) fn new(cfg: &ClusterConfig, node: NodeId, ep: Arc<Endpoint<PeerMsg>>, timer: Arc<TimerArm>) -> Self {
        let mut members: Vec<NodeId> = cfg.node_ids().collect();
        members.sort_unstable();
        let peers =
            cfg.nodes.iter().filter(|n| n.id != node).map(|n| (n.id, n.name.clone(), n.addr.to_string())).collect();
        NodeState {
            node,
            cluster: cfg.cluster_name.clone(),
            members,
            peers,
            start: Instant::now(),
            seed_base: rand::random(),
            lockspaces: Vec::new(),
            by_name: BTreeMap::new(),
            sessions: HashMap::new(),
            next_session: 1,
            ep,
            timer,
        }
    }

    /// Milliseconds since the node started: the cores' clock.
    pub(crate) fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Registers a client connection; the flag turns true if it stops reading.
    pub(crate) fn add_session(
        &mut self,
        tx: mpsc::Sender<ServerMsg>,
        pid: Option<i32>,
        overflowed: Arc<AtomicBool>,
    ) -> SessionId {
        let id = self.next_session;
        self.next_session += 1;
        self.sessions.insert(id, Session { tx, pid, name: String::new(), joined: BTreeMap::new(), overflowed });
        id
    }

    /// A client connection ended: a plain client's locks are unlocked; a client with
    /// recovery callbacks leaves uncleanly and its locks stay held.
    pub(crate) fn remove_session(&mut self, sid: SessionId) {
        let Some(s) = self.sessions.remove(&sid) else { return };
        for (ls, kind) in s.joined {
            let locks = self.lockspaces[ls as usize].owners.values().filter(|o| o.session == Some(sid)).count();
            match kind {
                JoinKind::Plain => {
                    if locks > 0 {
                        info!(node = self.node, ls = %self.lockspaces[ls as usize].core.name(), client = sid,
                            pid = ?s.pid, locks, "plain client disconnected: unlocking its locks");
                    }
                    self.leave(ls, sid);
                }
                JoinKind::WithRecovery => {
                    let e = &mut self.lockspaces[ls as usize];
                    e.clients.remove(&sid);
                    e.unclean_leaves += 1;
                    for o in e.owners.values_mut().filter(|o| o.session == Some(sid)) {
                        o.session = None;
                        o.op = None;
                    }
                    warn!(node = self.node, ls = %e.core.name(), client = sid, pid = ?s.pid, locks,
                        "client with recovery callbacks left uncleanly: lockspace recovery is not yet implemented; \
                         its locks stay held");
                }
            }
        }
    }

    /// Unlocks (or cancels, then unlocks) every lock of `sid` in `ls` and forgets the
    /// session's membership of it.
    fn leave(&mut self, ls: LsId, sid: SessionId) {
        let now = self.now();
        let e = &mut self.lockspaces[ls as usize];
        e.clients.remove(&sid);
        let mine: Vec<LkId> = e.owners.iter().filter(|(_, o)| o.session == Some(sid)).map(|(id, _)| *id).collect();
        for lkid in mine {
            if let Some(o) = e.owners.get_mut(&lkid) {
                o.reaping = true;
                o.op = None;
            }
            reap(&mut e.core, now, lkid);
        }
        self.drain(ls);
    }

    /// Handles one client frame. Answers and ASTs go to the session's queue.
    pub(crate) fn handle_client(&mut self, sid: SessionId, frame: ClientFrame) {
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
            ClientRequest::Join { name, kind } => self.join(sid, name, kind).map(Some),
            ClientRequest::Leave { ls } => self.joined(sid, ls).map(|_| {
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.joined.remove(&ls);
                }
                self.leave(ls, sid);
                Some(Reply::Done)
            }),
            ClientRequest::Lock { ls, name, mode, flags, lvb } => self.joined(sid, ls).and_then(|_| {
                let e = &mut self.lockspaces[ls as usize];
                let lkid = e.core.request(now, LockRequest { name, mode, flags, lvb }).map_err(lock_error)?;
                e.owners.insert(lkid, Owner { session: Some(sid), op: Some(id), reaping: false });
                self.drain(ls);
                let e = &self.lockspaces[ls as usize];
                if e.owners.get(&lkid).is_some_and(|o| o.op == Some(id)) {
                    self.send(sid, ServerMsg::Accepted { id, lkid });
                }
                Ok(None)
            }),
            ClientRequest::Convert { ls, lkid, mode, flags, lvb } => self.owned(sid, ls, lkid).and_then(|_| {
                let e = &mut self.lockspaces[ls as usize];
                e.core.convert(now, lkid, mode, flags, lvb).map_err(lock_error)?;
                self.set_op(ls, lkid, id);
                Ok(None)
            }),
            ClientRequest::Unlock { ls, lkid, lvb } => self.owned(sid, ls, lkid).and_then(|_| {
                let e = &mut self.lockspaces[ls as usize];
                e.core.unlock(now, lkid, lvb).map_err(lock_error)?;
                self.set_op(ls, lkid, id);
                Ok(None)
            }),
            ClientRequest::Cancel { ls, lkid } => self.owned(sid, ls, lkid).and_then(|_| {
                let e = &mut self.lockspaces[ls as usize];
                e.core.cancel(now, lkid).map_err(lock_error)?;
                self.send(sid, ServerMsg::Reply { id, reply: Reply::Done });
                self.drain(ls);
                Ok(None)
            }),
            ClientRequest::Dump { lockspace } => {
                let parts = self.dump(lockspace.as_deref());
                match parts {
                    Ok(parts) => {
                        let n = parts.len();
                        for (i, lockspaces) in parts.into_iter().enumerate() {
                            self.send(
                                sid,
                                ServerMsg::Reply { id, reply: Reply::Dump { lockspaces, last: i + 1 == n } },
                            );
                        }
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            }
            ClientRequest::Status => Ok(Some(Reply::Status(self.status()))),
        };
        match result {
            Ok(Some(reply)) => self.send(sid, ServerMsg::Reply { id, reply }),
            Ok(None) => {}
            Err(error) => self.send(sid, ServerMsg::Error { id, error }),
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

    fn owned(&self, sid: SessionId, ls: LsId, lkid: LkId) -> Result<(), RemoteError> {
        self.joined(sid, ls)?;
        match self.lockspaces[ls as usize].owners.get(&lkid) {
            Some(o) if o.session == Some(sid) && !o.reaping => Ok(()),
            _ => Err(err(ErrorKind::UnknownLock, format!("no lock {lkid} of this client"))),
        }
    }

    fn join(&mut self, sid: SessionId, name: String, kind: JoinKind) -> Result<Reply, RemoteError> {
        check_lockspace_name(&name).map_err(|m| err(ErrorKind::JoinRefused, m))?;
        if self.lockspaces.len() >= MAX_LOCKSPACES && !self.by_name.contains_key(&name) {
            return Err(err(ErrorKind::JoinRefused, format!("this node already has {MAX_LOCKSPACES} lockspaces")));
        }
        let ls = self.lockspace(&name);
        let e = &mut self.lockspaces[ls as usize];
        if self.sessions.get(&sid).is_some_and(|s| s.joined.contains_key(&ls)) {
            return Err(err(ErrorKind::JoinRefused, format!("lockspace {name} is already joined on this connection")));
        }
        if kind == JoinKind::WithRecovery {
            if e.clients.values().any(|k| *k == JoinKind::WithRecovery) {
                return Err(err(
                    ErrorKind::JoinRefused,
                    format!("lockspace {name} already has a client with recovery callbacks on this node"),
                ));
            }
            let orphans = e.orphaned();
            if orphans > 0 {
                return Err(err(
                    ErrorKind::JoinRefused,
                    format!(
                        "lockspace {name} still holds {orphans} lock(s) of a client that left uncleanly; lockspace \
                         recovery is not yet implemented: restart this node's lockd"
                    ),
                ));
            }
        }
        e.clients.insert(sid, kind);
        let reply = Reply::Joined { ls, members: e.core.members().to_vec(), generation: e.core.generation() };
        if let Some(s) = self.sessions.get_mut(&sid) {
            s.joined.insert(ls, kind);
            info!(node = self.node, ls = %name, client = sid, pid = ?s.pid, kind = kind.as_str(), "client joined");
        }
        Ok(reply)
    }

    /// The lockspace `name`, created with the configured members if this node does not
    /// take part in it yet. Membership is static in this version: every configured node
    /// is a member of every lockspace.
    fn lockspace(&mut self, name: &str) -> LsId {
        if let Some(ls) = self.by_name.get(name) {
            return *ls;
        }
        let ls = self.lockspaces.len() as LsId;
        let seed = self.seed_base ^ u64::from(ls).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let core = Lockspace::new(name, self.node, self.members.clone(), seed);
        info!(node = self.node, ls = %name, members = ?self.members, "lockspace created");
        self.lockspaces.push(LsEntry { core, owners: HashMap::new(), clients: BTreeMap::new(), unclean_leaves: 0 });
        self.by_name.insert(name.to_string(), ls);
        ls
    }

    /// A message from peer `from`.
    pub(crate) fn handle_peer(&mut self, from: NodeId, msg: PeerMsg) {
        if check_lockspace_name(&msg.ls).is_err() {
            warn!(node = self.node, from, "message for a badly named lockspace dropped");
            return;
        }
        if self.lockspaces.len() >= MAX_LOCKSPACES && !self.by_name.contains_key(&msg.ls) {
            warn!(node = self.node, from, ls = %msg.ls, "message for a new lockspace beyond the limit dropped");
            return;
        }
        let now = self.now();
        let ls = self.lockspace(&msg.ls);
        self.lockspaces[ls as usize].core.handle_message(now, from, msg.generation, msg.msg);
        self.drain(ls);
    }

    /// Runs due timers of every lockspace; returns the next deadline.
    pub(crate) fn handle_timeouts(&mut self) -> Option<u64> {
        let now = self.now();
        let mut next: Option<u64> = None;
        for ls in 0..self.lockspaces.len() {
            let due = self.lockspaces[ls].core.poll_timeout().is_some_and(|t| t <= now);
            if due {
                self.lockspaces[ls].core.handle_timeout(now);
                self.drain(ls as LsId);
            }
            if let Some(t) = self.lockspaces[ls].core.poll_timeout() {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        next
    }

    /// Moves every output of lockspace `ls`'s core to where it goes, until it has none.
    fn drain(&mut self, ls: LsId) {
        let now = self.now();
        loop {
            let e = &mut self.lockspaces[ls as usize];
            let mut moved = false;
            while let Some((to, generation, msg)) = e.core.poll_transmit() {
                moved = true;
                if let Err(err) = self.ep.send(to, PeerMsg { ls: e.core.name().to_string(), generation, msg }) {
                    // next issue: a peer whose queue overflows is treated as failed.
                    warn!(node = self.node, ls = %e.core.name(), to, %err, "message to peer dropped");
                }
            }
            let mut out: Vec<(SessionId, ServerMsg)> = Vec::new();
            while let Some(ev) = e.core.poll_event() {
                moved = true;
                match ev {
                    Event::Ast { lkid, status, flags, mode, lvb } => {
                        let Some(o) = e.owners.get_mut(&lkid) else {
                            debug!(node = self.node, %lkid, "AST for a lock without owner");
                            continue;
                        };
                        if o.reaping {
                            if mode.is_some() {
                                reap(&mut e.core, now, lkid);
                            } else {
                                e.owners.remove(&lkid);
                            }
                            continue;
                        }
                        let to = o.session.zip(o.op.take());
                        if mode.is_none() {
                            e.owners.remove(&lkid);
                        }
                        if let Some((sid, id)) = to {
                            let ast = Ast { lkid, status, sb_flags: flags, mode, lvb };
                            out.push((sid, ServerMsg::Ast { id, ast }));
                        }
                    }
                    Event::Recovered { generation } => {
                        info!(node = self.node, ls = %e.core.name(), generation, "lock recovery done");
                    }
                    Event::Bast { lkid, mode } => match e.owners.get(&lkid) {
                        Some(Owner { session: Some(sid), reaping: false, .. }) => {
                            out.push((*sid, ServerMsg::Bast { ls, bast: Bast { lkid, mode } }))
                        }
                        _ => debug!(node = self.node, %lkid, %mode, "BAST for a lock without a client"),
                    },
                }
            }
            if let Some(t) = e.core.poll_timeout() {
                if t < self.timer.deadline.fetch_min(t, Ordering::Relaxed) {
                    self.timer.notify.notify_one();
                }
            }
            for (sid, msg) in out {
                self.send(sid, msg);
            }
            if !moved {
                return;
            }
        }
    }

    fn send(&mut self, sid: SessionId, msg: ServerMsg) {
        let Some(s) = self.sessions.get_mut(&sid) else { return };
        if s.overflowed.load(Ordering::Relaxed) {
            return;
        }
        if s.tx.try_send(msg).is_err() {
            warn!(node = self.node, client = sid, pid = ?s.pid, "client does not read its answers: disconnecting it");
            s.overflowed.store(true, Ordering::Relaxed);
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
                name: e.core.name().to_string(),
                members: e.core.members().to_vec(),
                generation: e.core.generation(),
                resources,
            };
            // Every lockspace appears at least once, even without resources.
            // parts is never empty: it starts with one part and only grows.
            parts.last_mut().expect("parts is never empty").push(head(Vec::new()));
            for r in e.core.dump() {
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
                    directory: e.core.directory_node(&r.name),
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
            Some(Owner { session: None, .. }) => "orphan (unclean leave)".into(),
            Some(Owner { session: Some(sid), .. }) => match self.sessions.get(sid) {
                Some(s) => match s.pid {
                    Some(pid) => format!("client {sid} pid {pid}"),
                    None => format!("client {sid}"),
                },
                None => format!("client {sid}"),
            },
        }
    }

    pub(crate) fn status(&self) -> NodeStatus {
        let stats = self.ep.stats();
        let mut clients: Vec<ClientStatus> = self
            .sessions
            .iter()
            .map(|(id, s)| ClientStatus {
                id: *id,
                pid: s.pid,
                name: s.name.clone(),
                joined: s
                    .joined
                    .iter()
                    .map(|(ls, k)| (self.lockspaces[*ls as usize].core.name().to_string(), *k))
                    .collect(),
                locks: self
                    .lockspaces
                    .iter()
                    .map(|e| e.owners.values().filter(|o| o.session == Some(*id)).count())
                    .sum(),
            })
            .collect();
        clients.sort_by_key(|c| c.id);
        NodeStatus {
            node: self.node,
            cluster: self.cluster.clone(),
            members: self.members.clone(),
            generation: 1,
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
                    name: e.core.name().to_string(),
                    generation: e.core.generation(),
                    members: e.core.members().to_vec(),
                    locks: e.core.lock_count(),
                    resources: e.core.resource_count(),
                    directory: e.core.directory_len(),
                    clients: e.clients.iter().map(|(s, k)| (*s, *k)).collect(),
                    orphaned_locks: e.orphaned(),
                    unclean_leaves: e.unclean_leaves,
                })
                .collect(),
            clients,
            connections_refused: stats.connections_refused,
            malformed_frames: stats.malformed_frames,
            frames_sent: stats.frames_sent,
            uptime_ms: self.now(),
        }
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
