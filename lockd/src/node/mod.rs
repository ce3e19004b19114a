//! The node runtime: one node's lockd, the I/O around the sans-IO lockspace cores.
//!
//! A [`Node`] owns the QUIC [`Endpoint`] to its peers, one
//! [`core::Lockspace`](crate::core::Lockspace) per named lockspace (created when a
//! local client joins it, or when a peer first sends a message for it), and a unix
//! socket on which local clients ([`crate::client::Client`]) talk to it with the
//! protocol of [`proto`].
//!
//! # Tasks
//!
//! * **The node task** receives peer messages (batching whatever is ready), runs the
//!   cores' timers and logs peer events.
//! * **One task per client connection** reads its frames, applies each request to the
//!   cores at once, and writes the answers, ASTs and BASTs queued for that client in
//!   one write.
//!
//! Both work on one [`state::NodeState`] behind a mutex that is held only for
//! CPU work, never across an await. A request on a resource this node masters is thus
//! served entirely in the client's task: the core grants it, the AST is queued and
//! written back with no message to a peer and no hop to another task. After every
//! input the core is drained: messages go to [`Endpoint::send`] (an enqueue; per-peer
//! FIFO as the core needs), ASTs and BASTs to the owning client's queue, and the
//! earliest core deadline wakes the node task.
//!
//! # Membership
//!
//! Which nodes are up, and which are members of which lockspace with which slot,
//! is agreed through the [`membership`](crate::membership) log (raft among the
//! configured nodes, over the same QUIC connections); heartbeats give each node a
//! lease while it reaches a quorum. A client's join makes this node propose `Join`
//! for the lockspace; the join is answered once the view with this node is applied
//! and its lock recovery is done. Every applied view starts lock recovery in the
//! core (recover_prep to recovery clients), and its end delivers recover_slot for
//! each departed member and recover_done. The leader declares a node dead once a
//! quorum suspects it (its lease has surely run out), after the fence command if
//! one is configured. A node that loses its lease is fenced: every lockspace stops,
//! clients are told, and it rejoins as a new incarnation.
//!
//! # Who may connect
//!
//! The socket is mode 0600, or 0660 owned by `[runtime] client_group` when that is
//! set; at accept the peer's credentials are checked as well ([`crate::access`]): root,
//! the user lockd runs as and the group's members are served, anyone else gets one
//! `AccessDenied` error and is disconnected (at most [`MAX_REFUSING`] such connections
//! are answered at once; more are closed without a word).
//!
//! # Client disconnects
//!
//! A [`JoinKind::Plain`] client that disconnects loses its locks: lockd cancels its
//! requests in progress and unlocks what it holds. A [`JoinKind::WithRecovery`]
//! client's disconnect is an unclean leave: this node drops the lockspace at once
//! and proposes an unclean `Leave`, so the others recover its locks and its slot
//! while this node stays in its other lockspaces.

pub mod proto;
mod session;
pub(crate) mod state;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::{info, warn, Instrument};

use crate::access::{Access, AccessError, Peer};
use crate::config::{ClusterConfig, ConfigError};
use crate::core::{Message, NodeId};
use crate::membership::{Heartbeat, HeartbeatAck, MemStore, MembershipError, RaftNode, RaftTiming, SledStore, Store};
use crate::plock::PlockMsg;
use crate::transport::{Endpoint, EndpointOptions, PeerEvent, TransportError};
pub use proto::{JoinKind, NodeStatus};
use state::{NodeState, TimerArm};

/// What peers send each other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMsg {
    /// One lockspace message, named by its lockspace.
    Ls {
        /// Lockspace name.
        ls: String,
        /// Generation of the lockspace view the message belongs to.
        generation: u64,
        /// The core's message.
        msg: Message,
    },
    /// A membership log (raft) message, protobuf-encoded.
    Raft(Vec<u8>),
    /// A liveness heartbeat.
    Heartbeat(Heartbeat),
    /// The answer to a heartbeat.
    Ack(HeartbeatAck),
    /// One plock message (cluster-wide POSIX and flock locks), named by its
    /// lockspace; see [`crate::plock::service`].
    Plock {
        /// Lockspace name.
        ls: String,
        /// Generation of the sender's view of the lockspace.
        generation: u64,
        /// The plock service's message.
        msg: PlockMsg,
    },
}

/// Largest batch of peer messages handled under one lock of the state.
const PEER_BATCH: usize = 256;

/// Most refused connections told why at once (each is kept for a moment, see
/// `session::refuse`); more are closed at once.
pub const MAX_REFUSING: usize = 64;

/// Options of [`Node::start`].
#[derive(Debug)]
pub struct NodeOptions {
    /// Where to listen for local clients (default `cfg.lockd_socket_path(node)`).
    pub socket_path: PathBuf,
    /// Transport options.
    pub endpoint: EndpointOptions,
    /// Where the membership log is kept (default `<state_dir>/node-<id>/raft`);
    /// None keeps it in memory (tests, benchmarks: a restart forgets it).
    pub raft_dir: Option<PathBuf>,
    /// How long this node stays in a lockspace after its last plain client left
    /// (so that a loop of short `dlm exec` runs does not change the view each time).
    pub linger_ms: u64,
}

/// Default [`NodeOptions::linger_ms`].
pub const DEFAULT_LINGER_MS: u64 = 5000;

impl NodeOptions {
    /// Defaults from the configuration.
    pub fn from_config(cfg: &ClusterConfig, node: NodeId) -> NodeOptions {
        NodeOptions {
            socket_path: cfg.lockd_socket_path(node),
            endpoint: EndpointOptions::from_config(cfg),
            raft_dir: Some(cfg.state_dir.join(format!("node-{node}")).join("raft")),
            linger_ms: DEFAULT_LINGER_MS,
        }
    }

    /// For a node of a [`LocalCluster`](crate::transport::testing::LocalCluster):
    /// its pre-bound socket, quick redials, the membership log in memory.
    pub fn local(lc: &mut crate::transport::testing::LocalCluster, node: NodeId) -> NodeOptions {
        NodeOptions {
            socket_path: lc.config.lockd_socket_path(node),
            endpoint: lc.options(node),
            raft_dir: None,
            linger_ms: DEFAULT_LINGER_MS,
        }
    }
}

/// Errors of [`Node::start`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("{path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: another lockd is already listening there")]
    AlreadyRunning(PathBuf),
    #[error("membership log: {0}")]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Access(#[from] AccessError),
}

pub(crate) struct Shared {
    pub(crate) state: Mutex<NodeState>,
    pub(crate) node: NodeId,
}

impl Shared {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, NodeState> {
        // A panic while holding the state is a bug of ours; the state is still
        // consistent enough to serve status and shut down.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running lockd. See the [module docs](self).
pub struct Node {
    shared: Arc<Shared>,
    ep: Arc<Endpoint<PeerMsg>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    socket_path: PathBuf,
}

impl Node {
    /// Binds the node's QUIC endpoint and its client socket (mode 0600, or 0660 for
    /// `[runtime] client_group`; its folder is created), and starts serving. Must be
    /// called inside a tokio runtime.
    pub async fn start(cfg: &ClusterConfig, node: NodeId, opts: NodeOptions) -> Result<Node, NodeError> {
        cfg.node(node)?;
        let access = Access::new(cfg.client_group.as_deref())?;
        let store: Box<dyn Store> = match &opts.raft_dir {
            Some(dir) => Box::new(SledStore::open(dir)?),
            None => Box::new(MemStore::new()),
        };
        let voters: Vec<NodeId> = cfg.node_ids().collect();
        let hb = cfg.timing.heartbeat_ms.max(10);
        let raft_timing = RaftTiming { tick_ms: hb / 2, election_ticks: 10, heartbeat_ticks: 2 };
        let raft = RaftNode::new(node, &voters, store, raft_timing, rand::random())?;
        let listener = bind_socket(&opts.socket_path, &access).await?;
        let ep = Arc::new(Endpoint::<PeerMsg>::bind_with(cfg, node, opts.endpoint)?);
        let timer = Arc::new(TimerArm { deadline: AtomicU64::new(u64::MAX), notify: Notify::new() });
        let state = NodeState::new(cfg, node, ep.clone(), timer.clone(), raft, opts.linger_ms);
        let shared = Arc::new(Shared { state: Mutex::new(state), node });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let span = tracing::info_span!("lockd", node);
        let t1 =
            tokio::spawn(node_task(shared.clone(), ep.clone(), timer, shutdown_rx.clone()).instrument(span.clone()));
        info!(node, socket = %opts.socket_path.display(), clients = %access.who(), peers = ?ep.peers(), "lockd started");
        let t2 = tokio::spawn(accept_task(shared.clone(), listener, access, shutdown_rx).instrument(span));
        Ok(Node { shared, ep, shutdown, tasks: vec![t1, t2], socket_path: opts.socket_path })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.shared.node
    }

    /// The client socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The node's status, as `concord dlm status` shows it.
    pub fn status(&self) -> NodeStatus {
        self.shared.lock().status()
    }

    /// The transport endpoint (for probes and tests).
    pub fn endpoint(&self) -> &Endpoint<PeerMsg> {
        &self.ep
    }

    /// Waits until every peer is connected, or `timeout` passes; true if all are up.
    pub async fn wait_peers_up(&self, timeout: Duration) -> bool {
        let all = async {
            for p in self.ep.peers() {
                let _ = self.ep.wait_up(p).await;
            }
        };
        tokio::time::timeout(timeout, all).await.is_ok()
    }

    /// Stops at once, as a crash would (tests): no clean close of anything; the
    /// client socket is removed.
    pub fn abort(self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.socket_path);
        warn!(node = self.shared.node, "lockd aborted");
    }

    /// Stops serving: closes client connections and peer connections, removes the
    /// socket.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        if let Err(e) = std::fs::remove_file(&self.socket_path) {
            warn!(socket = %self.socket_path.display(), %e, "cannot remove the client socket");
        }
        let node = self.shared.node;
        // The tasks (and with them every session) are gone: the state, which holds the
        // other reference to the endpoint, can go too, and the endpoint be closed.
        drop(self.shared);
        match Arc::try_unwrap(self.ep) {
            Ok(ep) => ep.close().await,
            Err(_) => warn!(node, "endpoint still in use at shutdown; dropped without a clean close"),
        }
        info!(node, "lockd stopped");
    }
}

async fn bind_socket(path: &Path, access: &Access) -> Result<UnixListener, NodeError> {
    let sock_err = |source| NodeError::Socket { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(sock_err)?;
        if access.group_can_pass(dir) == Some(false) {
            warn!(dir = %dir.display(), group = access.group().map(|g| g.name.as_str()),
                "the members of the client group cannot reach the socket: this folder lets neither them nor \
                 others through (chmod o+x, or chgrp the folder to the group and chmod g+x)");
        }
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(NodeError::AlreadyRunning(path.to_path_buf()));
        }
        // A socket left by a lockd that died.
        std::fs::remove_file(path).map_err(sock_err)?;
    }
    let listener = UnixListener::bind(path).map_err(sock_err)?;
    access.secure_socket(path).map_err(sock_err)?;
    Ok(listener)
}

async fn node_task(
    shared: Arc<Shared>,
    ep: Arc<Endpoint<PeerMsg>>,
    timer: Arc<TimerArm>,
    mut shutdown: watch::Receiver<bool>,
) {
    let start = tokio::time::Instant::now();
    let tick_ms = shared.lock().tick_ms();
    let mut next_tick = start;
    // Peers whose connection was lost (messages to them may have gone with it).
    let mut lost = std::collections::BTreeSet::new();
    loop {
        let deadline = timer.deadline.load(Ordering::Relaxed);
        // The state's clock started a moment before ours: waking a little late is fine.
        let core_at = if deadline == u64::MAX { next_tick } else { start + Duration::from_millis(deadline) };
        let sleep_until = core_at.min(next_tick);
        tokio::select! {
            m = ep.recv() => {
                let Some((from, msg)) = m else { return };
                let mut st = shared.lock();
                st.handle_peer(from, msg);
                for _ in 1..PEER_BATCH {
                    match ep.try_recv() {
                        Some((from, msg)) => st.handle_peer(from, msg),
                        None => break,
                    }
                }
            }
            ev = ep.next_event() => match ev {
                Some(PeerEvent::Up(p)) => {
                    info!(peer = p, "peer up");
                    if lost.remove(&p) {
                        shared.lock().peer_reconnected(p);
                    }
                }
                Some(PeerEvent::Down(p)) => {
                    warn!(peer = p, "peer down");
                    lost.insert(p);
                }
                None => return,
            },
            _ = tokio::time::sleep_until(sleep_until) => {
                timer.deadline.store(u64::MAX, Ordering::Relaxed);
                let next = shared.lock().tick();
                next_tick = tokio::time::Instant::now() + Duration::from_millis(tick_ms);
                if let Some(t) = next {
                    timer.deadline.fetch_min(t, Ordering::Relaxed);
                }
            }
            _ = timer.notify.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn accept_task(shared: Arc<Shared>, listener: UnixListener, access: Access, mut shutdown: watch::Receiver<bool>) {
    let mut sessions = tokio::task::JoinSet::new();
    let mut refusing = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let refusal = match Peer::of(&stream) {
                        Ok(peer) => access.check(&peer).err().map(|r| r.to_string()),
                        Err(e) => Some(format!("its credentials cannot be read: {e}")),
                    };
                    match refusal {
                        None => {
                            sessions.spawn(session::run(shared.clone(), stream, shutdown.clone()).in_current_span());
                        }
                        Some(why) => {
                            let pid = stream.peer_cred().ok().and_then(|c| c.pid());
                            warn!(?pid, why, "refused a client on the socket");
                            if refusing.len() < MAX_REFUSING {
                                refusing.spawn(session::refuse(stream, format!("lockd refused this client: {why}")));
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(%e, "accept on the client socket failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
            Some(_) = refusing.join_next(), if !refusing.is_empty() => {}
            _ = shutdown.changed() => break,
        }
    }
    while sessions.join_next().await.is_some() {}
}
