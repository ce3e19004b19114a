//! The local protocol between `concord lockd` and its clients on the unix socket.
//!
//! Every message is one [`frame`](crate::transport::frame) of kind `Message` whose
//! payload is bincode 2 of a [`ClientFrame`] (client → lockd) or a [`ServerMsg`]
//! (lockd → client). Client frames are limited to [`MAX_CLIENT_FRAME`] bytes; a frame
//! that fails validation closes that client's connection and nothing else. A client
//! that [`crate::access`] refuses gets one [`ServerMsg::Error`] with id 0 and
//! [`ErrorKind::AccessDenied`] instead of any answer, and is disconnected.
//!
//! Requests carry a client-chosen id; lockd answers each with exactly one final
//! message naming that id: [`ServerMsg::Ast`] for an accepted lock, convert or unlock,
//! [`ServerMsg::Error`] for a refused request, [`ServerMsg::Reply`] for everything else.
//! A lock request may also get [`ServerMsg::Accepted`] first (its lock id, so that it
//! can be cancelled while it waits). BASTs are pushed as [`ServerMsg::Bast`] without an
//! id. Many requests may be in flight on one connection.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::core::{Flags, LkId, Lvb, Mode, NodeId, Queue, SbFlags, Status};
use crate::plock::{PlockOp, PlockResult, PlockSpace};

/// Version of this protocol, checked by [`ClientRequest::Hello`].
pub const CLIENT_PROTOCOL_VERSION: u16 = 1;

/// Largest client → lockd frame payload, in bytes.
pub const MAX_CLIENT_FRAME: usize = 64 * 1024;

/// Longest lockspace name, in bytes.
pub const MAX_LOCKSPACE_NAME: usize = 64;

/// Checks a lockspace name: 1 to 64 bytes of ASCII letters, digits, `-`, `_`, `.`, `:`.
pub fn check_lockspace_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_LOCKSPACE_NAME {
        return Err(format!("lockspace name of {} bytes (must be 1..={MAX_LOCKSPACE_NAME})", name.len()));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)) {
        return Err(format!("lockspace name {name:?} may hold only letters, digits, '-', '_', '.', ':'"));
    }
    Ok(())
}

/// How a client takes part in a lockspace; decides what its disconnect means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JoinKind {
    /// A plain user such as `concord dlm exec`: if it disconnects, lockd unlocks its
    /// locks (cancelling requests in progress first).
    Plain,
    /// A user with recovery callbacks, such as a filesystem mount: it gets
    /// [`RecoveryEvent`]s, and its disconnect is an unclean leave of the lockspace:
    /// this node leaves it, and the other members recover its locks and its slot
    /// (recover_prep, recover_slot, recover_done) as for a dead node.
    WithRecovery,
}

impl JoinKind {
    /// `plain` or `with-recovery`.
    pub fn as_str(self) -> &'static str {
        match self {
            JoinKind::Plain => "plain",
            JoinKind::WithRecovery => "with-recovery",
        }
    }
}

/// A client request with its id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Chosen by the client; echoed in the answer.
    pub id: u64,
    /// The request.
    pub req: ClientRequest,
}

/// Lockspace handle number, given by [`Reply::Joined`], valid on that connection.
pub type LsId = u32;

/// What a client asks of lockd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// First request on a connection (optional): protocol version and the client's name
    /// for logs.
    Hello { version: u16, name: String },
    /// Joins (creating it on this node if needed) the lockspace `name`.
    Join { name: String, kind: JoinKind },
    /// Leaves a lockspace cleanly: its locks are unlocked.
    Leave { ls: LsId },
    /// A new lock.
    Lock { ls: LsId, name: Vec<u8>, mode: Mode, flags: Flags, lvb: Option<Lvb> },
    /// Converts a granted lock.
    Convert { ls: LsId, lkid: LkId, mode: Mode, flags: Flags, lvb: Option<Lvb> },
    /// Unlocks a granted lock.
    Unlock { ls: LsId, lkid: LkId, lvb: Option<Lvb> },
    /// Cancels the request or conversion in progress on a lock.
    Cancel { ls: LsId, lkid: LkId },
    /// Lock dump of one lockspace, or of all.
    Dump { lockspace: Option<String> },
    /// Node status.
    Status,
    /// Fault switch for partition tests: drop every message to and from these
    /// peers (empty: heal). Answered with `Done`.
    Fault { cut: Vec<NodeId> },
    /// A plock operation on resource (`space`, `number`); answered with
    /// [`Reply::Plock`]. `token` (chosen by the client, unique among its plock
    /// operations in flight in this lockspace) names it for [`ClientRequest::PlockCancel`].
    Plock { ls: LsId, token: u64, space: PlockSpace, number: u64, op: PlockOp },
    /// Cancels the waiting plock operation `token`: it is answered
    /// [`PlockResult::Cancelled`] and leaves nothing behind (or, if it was granted
    /// first, with its grant). Answered with `Done` (also when nothing waits).
    PlockCancel { ls: LsId, token: u64 },
    /// The client (a filesystem joined with recovery) has finished its own recovery
    /// for `generation` (its journal replays): plock operations held since a member
    /// departed may go on. Answered with `Done`.
    PlockThaw { ls: LsId, generation: u64 },
}

/// What lockd sends a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerMsg {
    /// A lock request was accepted and waits; its AST follows.
    Accepted { id: u64, lkid: LkId },
    /// The completion AST of request `id`.
    Ast { id: u64, ast: Ast },
    /// A blocking AST for one of the client's locks.
    Bast { ls: LsId, bast: Bast },
    /// A recovery callback or a stop, for a joined lockspace.
    Recovery { ls: LsId, event: RecoveryEvent },
    /// Final answer to a request that is neither lock, convert nor unlock.
    Reply { id: u64, reply: Reply },
    /// Request `id` was refused.
    Error { id: u64, error: RemoteError },
}

/// A completion AST as the client sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ast {
    /// The lock.
    pub lkid: LkId,
    /// Completion status (0, -EAGAIN, -DLM_EUNLOCK, -DLM_ECANCEL, -EDEADLK).
    pub status: Status,
    /// Status flags (ALTMODE, VALNOTVALID).
    pub sb_flags: SbFlags,
    /// Granted mode after the operation; None if the lock no longer exists.
    pub mode: Option<Mode>,
    /// The LVB after a granted operation with VALBLK.
    pub lvb: Option<Lvb>,
}

/// Lockspace recovery as its user sees it (the callbacks of the seed's lock_dlm:
/// `gdlm_recover_prep`, `gdlm_recover_slot`, `gdlm_recover_done`). Clients joined
/// with [`JoinKind::WithRecovery`] get all of them; every client gets `Stopped`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecoveryEvent {
    /// The membership changed: lock recovery for `generation` starts. Locking
    /// goes on (requests wait inside lockd until recovery is over).
    Prep { generation: u64 },
    /// A member left uncleanly or died: its slot (journal `slot - 1`) must be
    /// recovered before the slot is used again.
    Slot { node: NodeId, slot: u32 },
    /// Lock recovery for `generation` is complete on this node: the members and
    /// their slots, and ours.
    Done { generation: u64, slots: BTreeMap<NodeId, u32>, our_slot: u32 },
    /// This node is no longer a member (fenced: cut off from a quorum for its
    /// lease; or declared dead; or its recovery client left): the lockspace
    /// handle is dead, its locks are gone. Join again to go on.
    Stopped { reason: String },
}

/// A blocking AST: another lock waits for `mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bast {
    /// The lock that blocks.
    pub lkid: LkId,
    /// The blocked mode.
    pub mode: Mode,
}

/// Final answers that are not ASTs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Hello accepted.
    Hello { node: NodeId, cluster: String },
    /// Joined; use `ls` in later requests. `slot` is this node's slot in the
    /// lockspace (jid = slot - 1).
    Joined { ls: LsId, members: Vec<NodeId>, generation: u64, slot: u32 },
    /// Left; or a cancel was accepted.
    Done,
    /// A part of a lock dump; `last` on the final part.
    Dump { lockspaces: Vec<LockspaceDump>, last: bool },
    /// Node status.
    Status(NodeStatus),
    /// The answer to a plock operation.
    Plock(PlockResult),
}

/// Why a request was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct RemoteError {
    /// The kind of error, for programs.
    pub kind: ErrorKind,
    /// The error, for people.
    pub message: String,
}

/// Kinds of [`RemoteError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad resource name (-EINVAL).
    BadName,
    /// Flags not accepted by this call (-EINVAL).
    InvalidFlags,
    /// No live lock of this client has this id (-ENOENT).
    UnknownLock,
    /// An operation is in progress on the lock (-EBUSY).
    Busy,
    /// Nothing to cancel (-EBUSY).
    NothingToCancel,
    /// The lockspace handle is not joined on this connection, or the name is bad.
    NotJoined,
    /// Join refused (bad name, or the lockspace cannot be joined now).
    JoinRefused,
    /// Protocol version mismatch.
    Version,
    /// The request could not be served (e.g. a send queue to a peer is full).
    Internal,
    /// The client may not use this lockd (not root, not in `[runtime] client_group`):
    /// sent with id 0 right after the connection is accepted, then lockd closes it.
    AccessDenied,
}

/// One lock in a dump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// Holder node.
    pub node: NodeId,
    /// The holder's lock id.
    pub lkid: LkId,
    /// Granted mode.
    pub granted: Option<Mode>,
    /// Requested mode of a request or conversion in progress.
    pub requested: Option<Mode>,
    /// Queue.
    pub queue: Queue,
    /// For this node's own locks: the local client holding it (pid, if known), or
    /// `orphan` for a lock kept after an unclean leave.
    pub owner: Option<String>,
}

/// One resource in a dump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceInfo {
    /// Resource name.
    pub name: Vec<u8>,
    /// Master node; None while looked up.
    pub master: Option<NodeId>,
    /// Directory node of the name.
    pub directory: NodeId,
    /// LVB and its write sequence (on the master only).
    pub lvb: Option<(Lvb, u64)>,
    /// Locks: all on the master, this node's own elsewhere.
    pub locks: Vec<LockInfo>,
}

/// One lockspace in a dump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockspaceDump {
    /// Lockspace name.
    pub name: String,
    /// Members.
    pub members: Vec<NodeId>,
    /// Generation.
    pub generation: u64,
    /// Resources (possibly a part of them, see [`Reply::Dump`]).
    pub resources: Vec<ResourceInfo>,
}

/// Status of a node's lockd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// This node.
    pub node: NodeId,
    /// Cluster name.
    pub cluster: String,
    /// Live nodes of the cluster (agreed through the membership log).
    pub members: Vec<NodeId>,
    /// Cluster generation: +1 on every node life change (a node up or dead).
    pub generation: u64,
    /// This node's incarnation (a new one at each start and after a fence).
    pub incarnation: u64,
    /// A quorum of the configured nodes is reachable (this node holds a lease)
    /// and the membership log has a leader.
    pub quorate: bool,
    /// Why not quorate, when not.
    pub quorum_reason: Option<String>,
    /// This node was fenced (lost its lease or was declared dead) and has not
    /// rejoined the cluster yet.
    pub fenced: bool,
    /// Times this node was fenced since start, and the last reason.
    pub fence_count: u64,
    pub last_fence: Option<String>,
    /// Membership log leader and term.
    pub leader: Option<NodeId>,
    pub term: u64,
    /// Milliseconds of lease left (None: no lease).
    pub lease_left_ms: Option<u64>,
    /// Timing in use.
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    pub dead_after_ms: u64,
    /// Peers and whether an authenticated connection to each is up.
    pub peers: Vec<PeerStatus>,
    /// Lockspaces this node takes part in.
    pub lockspaces: Vec<LockspaceStatus>,
    /// Connected local clients.
    pub clients: Vec<ClientStatus>,
    /// Transport counters.
    pub connections_refused: u64,
    /// Transport counters.
    pub malformed_frames: u64,
    /// Messages sent to peers since start (all kinds: locking, membership, heartbeats).
    pub frames_sent: u64,
    /// Lockspace (locking and lock recovery) messages sent to peers since start.
    pub lock_messages_sent: u64,
    /// Peers cut off by the fault switch (tests).
    pub cut: Vec<NodeId>,
    /// Milliseconds since lockd started.
    pub uptime_ms: u64,
}

/// A peer in [`NodeStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Node id.
    pub id: NodeId,
    /// Node name.
    pub name: String,
    /// QUIC address.
    pub addr: String,
    /// Whether the connection is up.
    pub up: bool,
}

/// A lockspace in [`NodeStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockspaceStatus {
    /// Name.
    pub name: String,
    /// Generation of the agreed view (0: never had members).
    pub generation: u64,
    /// Members of the agreed view.
    pub members: Vec<NodeId>,
    /// Slot of each member.
    pub slots: BTreeMap<NodeId, u32>,
    /// This node is a member.
    pub member: bool,
    /// Lock recovery in progress here.
    pub recovering: bool,
    /// Slots of departed members not yet recovered by every member.
    pub unrecovered: Vec<u32>,
    /// The last lock recovery here: generation, members who departed (node,
    /// slot), and how long it took.
    pub last_recovery: Option<RecoveryStat>,
    /// Locks held or requested by this node's clients.
    pub locks: usize,
    /// Resources known here.
    pub resources: usize,
    /// Directory entries kept here.
    pub directory: usize,
    /// Local clients joined, with their kinds.
    pub clients: Vec<(u64, JoinKind)>,
    /// Unclean leaves of this node's recovery client so far.
    pub unclean_leaves: u64,
}

/// One lock recovery, in [`LockspaceStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryStat {
    /// Generation recovered.
    pub generation: u64,
    /// Members that departed uncleanly, with their slots.
    pub departed: BTreeMap<NodeId, u32>,
    /// Milliseconds from entering the view to lock recovery done here.
    pub ms: u64,
    /// Milliseconds since lockd started, when it finished.
    pub at_ms: u64,
}

/// A local client in [`NodeStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientStatus {
    /// Connection id.
    pub id: u64,
    /// Process id from the socket's credentials, if known.
    pub pid: Option<i32>,
    /// Name given in hello.
    pub name: String,
    /// Joined lockspaces and how.
    pub joined: Vec<(String, JoinKind)>,
    /// Locks it holds or requests.
    pub locks: usize,
}
