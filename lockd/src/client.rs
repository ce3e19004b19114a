//! The client API of a node's lockd: async Rust over the lockd's unix socket.
//!
//! This is how local users reach the DLM: `concord dlm`, and the filesystem's mount
//! processes. A [`Client`] is one connection to `concord lockd` (its socket is
//! [`ClusterConfig::lockd_socket_path`](crate::config::ClusterConfig::lockd_socket_path));
//! [`Client::join`] joins a lockspace and gives a [`LockspaceHandle`] for lock
//! operations.
//!
//! * **Pipelined.** Every call sends one request and waits for its own answer; calls
//!   from many tasks (or `join_all` of many futures) share the connection, with many
//!   requests in flight, matched to their answers by request id. A background task
//!   writes whatever is queued in one write and another reads.
//! * **ASTs.** [`LockspaceHandle::lock`], [`convert`](LockspaceHandle::convert) and
//!   [`unlock`](LockspaceHandle::unlock) resolve with the completion [`Ast`] (status,
//!   sb flags, granted mode, LVB) — the lksb of the Linux DLM. A refused call (bad
//!   flags, unknown lock, operation in progress) is an `Err` and no AST follows, as when
//!   `dlm_lock` returns an error.
//! * **Posted unlock.** [`LockspaceHandle::unlock_posted`] sends an unlock without
//!   waiting for its AST (one socket round trip saved per lock/unlock pair); later
//!   requests on the connection are applied after it.
//! * **BASTs** are pushed by lockd and read from [`LockspaceHandle::basts`].
//! * **Recovery callbacks** (recover_prep, recover_slot, recover_done, and a stop
//!   when this node is fenced or leaves) are pushed to clients that joined with
//!   [`JoinKind::WithRecovery`] and read from [`LockspaceHandle::recovery`].
//! * **Two kinds of users** ([`JoinKind`]): a [`JoinKind::Plain`] client that
//!   disconnects (or dies) loses its locks. A [`JoinKind::WithRecovery`] client — a
//!   filesystem — leaves uncleanly when it disconnects: its locks are kept for lockspace
//!   recovery (the next issue; for now they simply stay held).
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), concord_lockd::client::ClientError> {
//! use concord_lockd::client::{Client, JoinKind};
//! use concord_lockd::core::{Flags, Mode, Status};
//!
//! let client = Client::connect("/run/concord/lockd-1.sock").await?;
//! let ls = client.join("fs1", JoinKind::Plain).await?;
//!
//! // EX with the LVB: read on grant, written back on unlock.
//! let ast = ls.lock(b"inode/42", Mode::EX, Flags::VALBLK, None).await?;
//! assert_eq!(ast.status, Status::Granted);
//! let mut lvb = ast.lvb.unwrap_or_default();
//! lvb[0] += 1;
//! ls.unlock(ast.lkid, Some(lvb)).await?;
//!
//! // Try once, without waiting: -EAGAIN if another node holds it.
//! let ast = ls.lock(b"inode/43", Mode::PR, Flags::NOQUEUE, None).await?;
//! if ast.status == Status::Again {
//!     println!("busy");
//! }
//!
//! // Several requests in flight at once on one connection.
//! let (a, b) = tokio::join!(
//!     ls.lock(b"rgrp/1", Mode::PR, Flags::empty(), None),
//!     ls.lock(b"rgrp/2", Mode::PR, Flags::empty(), None),
//! );
//! ls.unlock(a?.lkid, None).await?;
//! ls.unlock(b?.lkid, None).await?;
//!
//! // BASTs: another node wants a mode our lock blocks.
//! let mut basts = ls.basts();
//! while let Some(b) = basts.recv().await {
//!     println!("lock {} blocks a request for {}", b.lkid, b.mode);
//! #   break;
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::core::{Flags, LkId, Lvb, Mode, NodeId};
pub use crate::node::proto::{
    Ast, Bast, ErrorKind, JoinKind, LockInfo, LockspaceDump, LockspaceStatus, NodeStatus, RecoveryEvent, RecoveryStat,
    RemoteError, ResourceInfo,
};
use crate::node::proto::{
    ClientFrame, ClientRequest, LsId, Reply, ServerMsg, CLIENT_PROTOCOL_VERSION, MAX_CLIENT_FRAME,
};
use crate::plock::{PlockOp, PlockResult, PlockSpace};
use crate::transport::frame::{Frame, FrameError, FrameKind};
use crate::uds::Uds;

/// Bytes of requests buffered while the socket is full; callers wait (backpressure)
/// beyond this.
const WRITE_BUFFER_BYTES: usize = 4 << 20;

/// Errors of client calls.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Cannot reach lockd.
    #[error("connecting to lockd at {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The socket's mode does not let this process connect (EACCES).
    #[error(
        "permission denied connecting to {path}: lockd accepts root and the members of its [runtime] client_group only"
    )]
    PermissionDenied { path: String },
    /// lockd refused this client (its user is not root and not in the client group);
    /// the message says why.
    #[error("{0}")]
    AccessDenied(String),
    /// lockd refused the request; no AST follows.
    #[error("lockd refused the request: {0}")]
    Refused(#[from] RemoteError),
    /// The connection to lockd is gone (lockd stopped, or sent something invalid).
    #[error("connection to lockd lost")]
    Disconnected,
    /// A request does not fit in a frame (e.g. an over-long name).
    #[error("request does not encode: {0}")]
    Encode(#[from] FrameError),
    /// lockd answered with something this client did not expect.
    #[error("unexpected answer from lockd: {0}")]
    Protocol(String),
}

/// What a waiting call gets back.
enum Answer {
    Ast(Ast),
    Reply(Reply),
}

struct Waiter {
    /// For a lock: told the lock id once accepted.
    accepted: Option<oneshot::Sender<LkId>>,
    /// None for an unlock posted with [`LockspaceHandle::unlock_posted`]: nobody
    /// waits; a refusal is logged.
    done: Option<oneshot::Sender<Result<Answer, RemoteError>>>,
    /// The lock of a posted unlock (for the log).
    posted: Option<LkId>,
    /// Dump parts gathered so far.
    parts: Vec<LockspaceDump>,
}

struct Inner {
    next_id: AtomicU64,
    waiters: Mutex<HashMap<u64, Waiter>>,
    basts: Mutex<HashMap<LsId, mpsc::UnboundedSender<Bast>>>,
    recovery: Mutex<HashMap<LsId, mpsc::UnboundedSender<RecoveryEvent>>>,
    /// Recovery hooks: called in the reader, in order with every other message of the
    /// connection, before the event is queued (see [`LockspaceHandle::set_recovery_hook`]).
    hooks: Mutex<HashMap<LsId, RecoveryHook>>,
    /// Receivers made by the reader when a join is answered (before any event for
    /// the lockspace can be dispatched), taken by `join`.
    fresh: Mutex<HashMap<LsId, (mpsc::UnboundedReceiver<Bast>, mpsc::UnboundedReceiver<RecoveryEvent>)>>,
    /// Requests not yet written. A caller writes its request straight to the socket
    /// when nothing is buffered (no task hop on the fast path); otherwise it appends
    /// here and the writer task flushes in order.
    out: Mutex<OutBuf>,
    /// The connection (registered for reads only: see `crate::uds`).
    sock: Uds,
    /// Wakes the writer task when `flushing` turns true.
    flush: Notify,
    /// Wakes callers waiting for buffer space.
    drained: Notify,
    closed: watch::Sender<bool>,
    is_closed: AtomicBool,
    node: NodeId,
    cluster: String,
}

#[derive(Default)]
struct OutBuf {
    buf: Vec<u8>,
    /// The writer task owns the socket's write side until `buf` is empty.
    flushing: bool,
}

impl Inner {
    fn out(&self) -> std::sync::MutexGuard<'_, OutBuf> {
        // No code panics while holding this lock.
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes `bytes` after everything sent before, without waiting for the socket.
    async fn write(&self, bytes: &[u8]) -> Result<(), ClientError> {
        loop {
            let drained = self.drained.notified();
            {
                let mut o = self.out();
                if self.is_closed.load(Ordering::SeqCst) {
                    return Err(ClientError::Disconnected);
                }
                if !o.flushing {
                    let n = match self.sock.try_write(bytes) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
                        Err(_) => {
                            drop(o);
                            self.fail_all();
                            return Err(ClientError::Disconnected);
                        }
                    };
                    if n < bytes.len() {
                        o.buf.extend_from_slice(&bytes[n..]);
                        o.flushing = true;
                        self.flush.notify_one();
                    }
                    return Ok(());
                }
                if o.buf.len() < WRITE_BUFFER_BYTES {
                    o.buf.extend_from_slice(bytes);
                    return Ok(());
                }
            }
            drained.await;
        }
    }

    fn waiters(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        // No code panics while holding this lock.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail_all(&self) {
        self.is_closed.store(true, Ordering::SeqCst);
        self.waiters().clear();
        self.basts.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.recovery.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.closed.send_replace(true);
        self.drained.notify_waiters();
    }
}

/// A connection to a node's lockd. Cheap to clone; all clones share the connection,
/// which closes when the last clone and the last [`LockspaceHandle`] are dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _tasks: Arc<TaskGuard>,
}

struct TaskGuard(Vec<tokio::task::JoinHandle<()>>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

impl Client {
    /// Connects to the lockd listening on `path` and checks its protocol version.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Self::connect_named(path, &std::env::args().next().unwrap_or_default()).await
    }

    /// Like [`Client::connect`], giving lockd a name for this client (shown in status).
    pub async fn connect_named(path: impl AsRef<Path>, name: &str) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let connect_err = |source: std::io::Error| match source.kind() {
            std::io::ErrorKind::PermissionDenied => ClientError::PermissionDenied { path: path.display().to_string() },
            _ => ClientError::Connect { path: path.display().to_string(), source },
        };
        let mut stream = UnixStream::connect(path).await.map_err(connect_err)?;
        let (closed, _) = watch::channel(false);
        // Hello before the tasks start sharing `inner`: done by hand on the stream.
        let (node, cluster) = hello(&mut stream, name).await?;
        let sock = stream.into_std().and_then(Uds::new).map_err(connect_err)?;
        let inner = Inner {
            next_id: AtomicU64::new(1),
            waiters: Mutex::new(HashMap::new()),
            basts: Mutex::new(HashMap::new()),
            recovery: Mutex::new(HashMap::new()),
            hooks: Mutex::new(HashMap::new()),
            fresh: Mutex::new(HashMap::new()),
            out: Mutex::new(OutBuf::default()),
            sock,
            flush: Notify::new(),
            drained: Notify::new(),
            closed,
            is_closed: AtomicBool::new(false),
            node,
            cluster,
        };
        let inner = Arc::new(inner);
        let w = tokio::spawn(writer(inner.clone()));
        let r = tokio::spawn(reader(inner.clone()));
        Ok(Client { inner, _tasks: Arc::new(TaskGuard(vec![w, r])) })
    }

    /// The node this lockd serves.
    pub fn node(&self) -> NodeId {
        self.inner.node
    }

    /// The cluster name.
    pub fn cluster(&self) -> &str {
        &self.inner.cluster
    }

    /// Drops the connection at once, as this process's death would: lockd takes every
    /// lockspace joined with recovery callbacks as left uncleanly (the other members
    /// recover this client's locks and its journal slot), and every later call fails
    /// with [`ClientError::Disconnected`]. For a filesystem that withdraws.
    pub fn abort(&self) {
        let _ = self.inner.sock.shutdown();
        self.inner.fail_all();
    }

    /// Resolves when the connection to lockd is lost.
    pub async fn closed(&self) {
        let mut rx = self.inner.closed.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }

    /// Joins lockspace `name` (1 to 64 bytes of letters, digits, `-_.:`).
    pub async fn join(&self, name: &str, kind: JoinKind) -> Result<LockspaceHandle, ClientError> {
        match self.call(ClientRequest::Join { name: name.to_string(), kind }, None).await? {
            Answer::Reply(Reply::Joined { ls, members, generation, slot }) => {
                let fresh = self.inner.fresh.lock().unwrap_or_else(|e| e.into_inner()).remove(&ls);
                let (basts, recovery) = fresh.ok_or_else(|| ClientError::Protocol("join: no channels".into()))?;
                Ok(LockspaceHandle {
                    client: self.clone(),
                    ls,
                    name: name.to_string(),
                    members,
                    generation,
                    slot,
                    basts: Arc::new(Mutex::new(Some(basts))),
                    recovery: Arc::new(Mutex::new(Some(recovery))),
                })
            }
            _ => Err(ClientError::Protocol("join: expected Joined".into())),
        }
    }

    /// The lock dump of one lockspace, or of all lockspaces this node takes part in.
    pub async fn dump(&self, lockspace: Option<&str>) -> Result<Vec<LockspaceDump>, ClientError> {
        let lockspace = lockspace.map(str::to_string);
        match self.call(ClientRequest::Dump { lockspace }, None).await? {
            Answer::Reply(Reply::Dump { lockspaces, .. }) => Ok(merge_dump(lockspaces)),
            _ => Err(ClientError::Protocol("dump: expected Dump".into())),
        }
    }

    /// The node's status.
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        match self.call(ClientRequest::Status, None).await? {
            Answer::Reply(Reply::Status(s)) => Ok(s),
            _ => Err(ClientError::Protocol("status: expected Status".into())),
        }
    }

    /// Fault switch (partition tests): lockd drops every message to and from
    /// `peers` until called again with an empty list.
    pub async fn set_fault_cut(&self, peers: Vec<NodeId>) -> Result<(), ClientError> {
        match self.call(ClientRequest::Fault { cut: peers }, None).await? {
            Answer::Reply(Reply::Done) => Ok(()),
            _ => Err(ClientError::Protocol("fault: expected Done".into())),
        }
    }

    /// Test hook: writes raw bytes on the connection, as a broken client would.
    #[doc(hidden)]
    pub async fn send_raw(&self, bytes: Vec<u8>) -> Result<(), ClientError> {
        self.inner.write(&bytes).await
    }

    async fn call(&self, req: ClientRequest, accepted: Option<oneshot::Sender<LkId>>) -> Result<Answer, ClientError> {
        let rx = self.send(req, accepted).await?;
        match rx.await {
            Ok(r) => Ok(r?),
            Err(_) => Err(ClientError::Disconnected),
        }
    }

    async fn send(
        &self,
        req: ClientRequest,
        accepted: Option<oneshot::Sender<LkId>>,
    ) -> Result<oneshot::Receiver<Result<Answer, RemoteError>>, ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = Frame::encode_value(FrameKind::Message, &ClientFrame { id, req })?;
        if bytes.len() > MAX_CLIENT_FRAME {
            return Err(ClientError::Encode(FrameError::TooLarge(bytes.len() as u64)));
        }
        let (done, rx) = oneshot::channel();
        self.send_as(id, &bytes, Waiter { accepted, done: Some(done), posted: None, parts: Vec::new() }).await?;
        Ok(rx)
    }

    /// Sends an unlock of `lkid` whose AST nobody awaits.
    async fn post_unlock(&self, ls: LsId, lkid: LkId, lvb: Option<Lvb>) -> Result<(), ClientError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes =
            Frame::encode_value(FrameKind::Message, &ClientFrame { id, req: ClientRequest::Unlock { ls, lkid, lvb } })?;
        self.send_as(id, &bytes, Waiter { accepted: None, done: None, posted: Some(lkid), parts: Vec::new() }).await
    }

    async fn send_as(&self, id: u64, bytes: &[u8], waiter: Waiter) -> Result<(), ClientError> {
        if self.inner.is_closed.load(Ordering::SeqCst) {
            return Err(ClientError::Disconnected);
        }
        self.inner.waiters().insert(id, waiter);
        if let Err(e) = self.inner.write(bytes).await {
            self.inner.waiters().remove(&id);
            return Err(e);
        }
        Ok(())
    }
}

/// A callback for recovery events, run in the client's reader
/// ([`LockspaceHandle::set_recovery_hook`]).
pub type RecoveryHook = Arc<dyn Fn(&RecoveryEvent) + Send + Sync>;

/// How a lock request started: accepted (its AST comes later), or answered at once.
enum Started {
    Accepted(LkId),
    Answered(Ast),
}

/// The answer channel of a request, as [`Client::send`] returns it.
type AnswerRx = oneshot::Receiver<Result<Answer, RemoteError>>;

/// Waits for lockd's Accepted of a lock request or, for one answered at once, its AST.
///
/// A request granted (or refused) at once gets its AST with no Accepted before it, and
/// the reader drops the request's accepted-sender right after sending the AST. So an
/// accepted channel closed without a lock id says only that the answer is in `rx` (or
/// that the connection is gone, which `rx` then says too): the AST may have come just
/// after `rx` was polled and just before `acc_rx` was. Taking that for a lost
/// connection made the glock runtime withdraw a healthy cluster mount.
async fn accepted_or_answered<R>(rx: &mut R, acc_rx: oneshot::Receiver<LkId>) -> Result<Started, ClientError>
where
    R: std::future::Future<Output = <AnswerRx as std::future::Future>::Output> + Unpin,
{
    let answered = |r: <AnswerRx as std::future::Future>::Output| match r {
        Ok(Ok(Answer::Ast(a))) => Ok(Started::Answered(a)),
        Ok(Ok(_)) => Err(ClientError::Protocol("lock: expected an AST".into())),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(ClientError::Disconnected),
    };
    tokio::select! {
        biased;
        r = &mut *rx => answered(r),
        a = acc_rx => match a {
            Ok(lkid) => Ok(Started::Accepted(lkid)),
            Err(_) => answered(rx.await),
        },
    }
}

/// A lockspace joined through a [`Client`]. Cheap to clone.
#[derive(Clone)]
pub struct LockspaceHandle {
    client: Client,
    ls: LsId,
    name: String,
    members: Vec<NodeId>,
    generation: u64,
    slot: u32,
    basts: Arc<Mutex<Option<mpsc::UnboundedReceiver<Bast>>>>,
    recovery: Arc<Mutex<Option<mpsc::UnboundedReceiver<RecoveryEvent>>>>,
}

/// A lock request accepted by lockd and still waiting; await [`PendingLock::ast`].
pub struct PendingLock {
    /// The new lock's id (for [`LockspaceHandle::cancel`]).
    pub lkid: LkId,
    rx: oneshot::Receiver<Result<Answer, RemoteError>>,
    early: Option<Ast>,
}

impl PendingLock {
    /// Waits for the request's completion AST.
    pub async fn ast(self) -> Result<Ast, ClientError> {
        if let Some(a) = self.early {
            return Ok(a);
        }
        match self.rx.await {
            Ok(Ok(Answer::Ast(a))) => Ok(a),
            Ok(Ok(_)) => Err(ClientError::Protocol("lock: expected an AST".into())),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(ClientError::Disconnected),
        }
    }
}

impl LockspaceHandle {
    /// The lockspace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Members when joined.
    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    /// Generation when joined.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The client this handle uses.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Requests a new lock on `name` in `mode` and waits for its completion AST
    /// (`dlm_lock` then the AST). Flags as [`Flags::REQUEST_ALLOWED`]; with VALBLK the
    /// AST carries the resource's LVB.
    pub async fn lock(&self, name: &[u8], mode: Mode, flags: Flags, lvb: Option<Lvb>) -> Result<Ast, ClientError> {
        let req = ClientRequest::Lock { ls: self.ls, name: name.to_vec(), mode, flags, lvb };
        match self.client.call(req, None).await? {
            Answer::Ast(a) => Ok(a),
            _ => Err(ClientError::Protocol("lock: expected an AST".into())),
        }
    }

    /// Requests a new lock and returns once lockd accepted it, with its lock id, so that
    /// the request can be cancelled while it waits.
    pub async fn request(
        &self,
        name: &[u8],
        mode: Mode,
        flags: Flags,
        lvb: Option<Lvb>,
    ) -> Result<PendingLock, ClientError> {
        let (acc_tx, acc_rx) = oneshot::channel();
        let req = ClientRequest::Lock { ls: self.ls, name: name.to_vec(), mode, flags, lvb };
        let mut rx = self.client.send(req, Some(acc_tx)).await?;
        match accepted_or_answered(&mut rx, acc_rx).await? {
            Started::Accepted(lkid) => Ok(PendingLock { lkid, rx, early: None }),
            Started::Answered(a) => Ok(PendingLock { lkid: a.lkid, rx, early: Some(a) }),
        }
    }

    /// Converts granted lock `lkid` to `mode` and waits for the AST.
    pub async fn convert(&self, lkid: LkId, mode: Mode, flags: Flags, lvb: Option<Lvb>) -> Result<Ast, ClientError> {
        match self.client.call(ClientRequest::Convert { ls: self.ls, lkid, mode, flags, lvb }, None).await? {
            Answer::Ast(a) => Ok(a),
            _ => Err(ClientError::Protocol("convert: expected an AST".into())),
        }
    }

    /// Unlocks granted lock `lkid` (writing `lvb` if held in PW or EX) and waits for the
    /// AST (status -DLM_EUNLOCK).
    pub async fn unlock(&self, lkid: LkId, lvb: Option<Lvb>) -> Result<Ast, ClientError> {
        match self.client.call(ClientRequest::Unlock { ls: self.ls, lkid, lvb }, None).await? {
            Answer::Ast(a) => Ok(a),
            _ => Err(ClientError::Protocol("unlock: expected an AST".into())),
        }
    }

    /// Unlocks granted lock `lkid` (writing `lvb` if held in PW or EX) without waiting
    /// for its AST: returns once the request is handed to the connection (written to
    /// the socket, or buffered behind earlier requests).
    ///
    /// This is not [`unlock`](Self::unlock) made faster: the caller does not learn
    /// when the unlock completed, nor whether lockd refused it (a refusal — unknown
    /// lock, an operation in progress — is only logged). What it may rely on: lockd
    /// applies one connection's requests in the order they were sent, so any request
    /// made on this connection afterwards (a new lock of the same resource, a dump) is
    /// applied after the unlock; for a resource mastered on another node the unlock
    /// travels to the master ahead of any later request of this node (per-peer FIFO).
    /// The LVB written is seen by the next holder. If the connection is lost before
    /// lockd read the unlock, the lock goes as all locks of a departed client go
    /// (unlocked for a plain client, recovered for a client with recovery callbacks).
    pub async fn unlock_posted(&self, lkid: LkId, lvb: Option<Lvb>) -> Result<(), ClientError> {
        self.client.post_unlock(self.ls, lkid, lvb).await
    }

    /// Cancels the request or conversion in progress on `lkid`. Returns once lockd
    /// accepted the cancel; the operation's own AST then says -DLM_ECANCEL (or 0 if it
    /// was granted first).
    pub async fn cancel(&self, lkid: LkId) -> Result<(), ClientError> {
        match self.client.call(ClientRequest::Cancel { ls: self.ls, lkid }, None).await? {
            Answer::Reply(Reply::Done) => Ok(()),
            _ => Err(ClientError::Protocol("cancel: expected Done".into())),
        }
    }

    /// Runs plock operation `op` on resource (`space`, `number`) and waits for its
    /// answer; a waiting lock ([`PlockOp::Lock`] with `wait`) returns once granted,
    /// refused with [`PlockResult::Deadlock`], or cancelled. `token` names the
    /// operation for [`plock_cancel`](Self::plock_cancel); it must be unique among
    /// this handle's plock operations in flight.
    pub async fn plock(
        &self,
        token: u64,
        space: PlockSpace,
        number: u64,
        op: PlockOp,
    ) -> Result<PlockResult, ClientError> {
        match self.client.call(ClientRequest::Plock { ls: self.ls, token, space, number, op }, None).await? {
            Answer::Reply(Reply::Plock(r)) => Ok(r),
            _ => Err(ClientError::Protocol("plock: expected a plock result".into())),
        }
    }

    /// Cancels the waiting plock operation `token` (a signal interrupted F_SETLKW):
    /// its own answer then says [`PlockResult::Cancelled`], or `Granted` if the grant
    /// came first. Returns once lockd has the cancel.
    pub async fn plock_cancel(&self, token: u64) -> Result<(), ClientError> {
        match self.client.call(ClientRequest::PlockCancel { ls: self.ls, token }, None).await? {
            Answer::Reply(Reply::Done) => Ok(()),
            _ => Err(ClientError::Protocol("plock cancel: expected Done".into())),
        }
    }

    /// Says that this client's own recovery for `generation` is over (journals of
    /// departed nodes replayed): plock operations, held on this node since a member
    /// departed, may go on.
    pub async fn plock_thaw(&self, generation: u64) -> Result<(), ClientError> {
        match self.client.call(ClientRequest::PlockThaw { ls: self.ls, generation }, None).await? {
            Answer::Reply(Reply::Done) => Ok(()),
            _ => Err(ClientError::Protocol("plock thaw: expected Done".into())),
        }
    }

    /// The BASTs for this handle's locks. The receiver can be taken once; later calls
    /// get a receiver that yields nothing.
    pub fn basts(&self) -> mpsc::UnboundedReceiver<Bast> {
        let mut g = self.basts.lock().unwrap_or_else(|e| e.into_inner());
        g.take().unwrap_or_else(|| mpsc::unbounded_channel().1)
    }

    /// The recovery callbacks of this lockspace (for a [`JoinKind::WithRecovery`]
    /// join; a plain join only ever gets [`RecoveryEvent::Stopped`]). The receiver
    /// can be taken once.
    pub fn recovery(&self) -> mpsc::UnboundedReceiver<RecoveryEvent> {
        let mut g = self.recovery.lock().unwrap_or_else(|e| e.into_inner());
        g.take().unwrap_or_else(|| mpsc::unbounded_channel().1)
    }

    /// Calls `hook` with every recovery event of this lockspace, in the connection's
    /// reader, before the event is queued for [`recovery`](Self::recovery) and before
    /// any message lockd sent after it is handled: an AST that follows a recover_prep
    /// is delivered only after the hook saw the prep. A filesystem sets its "block
    /// locks" flag here, as GFS2's lock_dlm does in the DLM's recover_prep callback,
    /// so that no grant of a dead node's lock slips through before recovery. The hook
    /// must not block.
    pub fn set_recovery_hook(&self, hook: RecoveryHook) {
        self.client.inner.hooks.lock().unwrap_or_else(|e| e.into_inner()).insert(self.ls, hook);
    }

    /// This node's slot in the lockspace when it joined (jid = slot - 1).
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The lock dump of this lockspace on this node.
    pub async fn dump(&self) -> Result<Option<LockspaceDump>, ClientError> {
        Ok(self.client.dump(Some(&self.name)).await?.into_iter().next())
    }

    /// Leaves the lockspace cleanly: lockd unlocks this handle's locks.
    pub async fn leave(self) -> Result<(), ClientError> {
        self.client.call(ClientRequest::Leave { ls: self.ls }, None).await?;
        self.client.inner.basts.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.ls);
        self.client.inner.recovery.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.ls);
        self.client.inner.hooks.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.ls);
        Ok(())
    }
}

fn merge_dump(parts: Vec<LockspaceDump>) -> Vec<LockspaceDump> {
    let mut out: Vec<LockspaceDump> = Vec::new();
    for p in parts {
        match out.last_mut() {
            Some(last) if last.name == p.name => last.resources.extend(p.resources),
            _ => out.push(p),
        }
    }
    out
}

async fn hello(stream: &mut UnixStream, name: &str) -> Result<(NodeId, String), ClientError> {
    let req = ClientRequest::Hello { version: CLIENT_PROTOCOL_VERSION, name: name.chars().take(64).collect() };
    let bytes = Frame::encode_value(FrameKind::Message, &ClientFrame { id: 0, req })?;
    stream.write_all(&bytes).await.map_err(|_| ClientError::Disconnected)?;
    let mut buf = Vec::with_capacity(4096);
    loop {
        if stream.read_buf(&mut buf).await.map_err(|_| ClientError::Disconnected)? == 0 {
            return Err(ClientError::Disconnected);
        }
        match Frame::decode(&buf) {
            Err(FrameError::Incomplete { .. }) => continue,
            Err(e) => return Err(ClientError::Protocol(e.to_string())),
            Ok((f, used)) => {
                if used != buf.len() {
                    return Err(ClientError::Protocol("unexpected bytes after hello".into()));
                }
                return match f.value_of::<ServerMsg>(FrameKind::Message)? {
                    ServerMsg::Reply { reply: Reply::Hello { node, cluster }, .. } => Ok((node, cluster)),
                    ServerMsg::Error { error, .. } if error.kind == ErrorKind::AccessDenied => {
                        Err(ClientError::AccessDenied(error.message))
                    }
                    ServerMsg::Error { error, .. } => Err(error.into()),
                    other => Err(ClientError::Protocol(format!("hello answered with {other:?}"))),
                };
            }
        }
    }
}

/// Flushes the buffered requests whenever a caller found the socket full.
async fn writer(inner: Arc<Inner>) {
    loop {
        inner.flush.notified().await;
        loop {
            let chunk = {
                let mut o = inner.out();
                if o.buf.is_empty() {
                    o.flushing = false;
                    break;
                }
                std::mem::take(&mut o.buf)
            };
            inner.drained.notify_waiters();
            let mut at = 0;
            while at < chunk.len() {
                match inner.sock.try_write(&chunk[at..]) {
                    Ok(n) => at += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if inner.sock.writable().await.is_err() {
                            inner.fail_all();
                            return;
                        }
                    }
                    Err(_) => {
                        inner.fail_all();
                        return;
                    }
                }
            }
        }
    }
}

async fn reader(inner: Arc<Inner>) {
    let mut scratch = vec![0u8; 64 * 1024];
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    'conn: loop {
        match inner.sock.read_into(&mut scratch, &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let mut used = 0;
        loop {
            match Frame::decode(&buf[used..]) {
                Err(FrameError::Incomplete { .. }) => break,
                Err(e) => {
                    tracing::warn!(%e, "malformed frame from lockd; closing the connection");
                    break 'conn;
                }
                Ok((f, n)) => {
                    used += n;
                    match f.value_of::<ServerMsg>(FrameKind::Message) {
                        Ok(m) => dispatch(&inner, m),
                        Err(e) => {
                            tracing::warn!(%e, "undecodable message from lockd; closing the connection");
                            break 'conn;
                        }
                    }
                }
            }
        }
        buf.drain(..used);
    }
    inner.fail_all();
}

fn dispatch(inner: &Inner, m: ServerMsg) {
    let finish = |id: u64, r: Result<Answer, RemoteError>| {
        let Some(w) = inner.waiters().remove(&id) else { return };
        match (w.done, r) {
            (Some(done), r) => {
                let _ = done.send(r);
            }
            (None, Err(e)) => {
                tracing::warn!(lkid = ?w.posted, error = %e, "posted unlock refused by lockd");
            }
            (None, Ok(_)) => {}
        }
    };
    match m {
        ServerMsg::Accepted { id, lkid } => {
            if let Some(w) = inner.waiters().get_mut(&id) {
                if let Some(tx) = w.accepted.take() {
                    let _ = tx.send(lkid);
                }
            }
        }
        ServerMsg::Ast { id, ast } => finish(id, Ok(Answer::Ast(ast))),
        ServerMsg::Bast { ls, bast } => {
            if let Some(tx) = inner.basts.lock().unwrap_or_else(|e| e.into_inner()).get(&ls) {
                let _ = tx.send(bast);
            }
        }
        ServerMsg::Reply { id, reply: Reply::Dump { lockspaces, last } } => {
            let mut ws = inner.waiters();
            if last {
                if let Some(mut w) = ws.remove(&id) {
                    w.parts.extend(lockspaces);
                    if let Some(done) = w.done {
                        let _ = done.send(Ok(Answer::Reply(Reply::Dump { lockspaces: w.parts, last })));
                    }
                }
            } else if let Some(w) = ws.get_mut(&id) {
                w.parts.extend(lockspaces);
            }
        }
        ServerMsg::Recovery { ls, event } => {
            let hook = inner.hooks.lock().unwrap_or_else(|e| e.into_inner()).get(&ls).cloned();
            if let Some(hook) = hook {
                hook(&event);
            }
            if let Some(tx) = inner.recovery.lock().unwrap_or_else(|e| e.into_inner()).get(&ls) {
                let _ = tx.send(event);
            }
        }
        ServerMsg::Reply { id, reply: reply @ Reply::Joined { .. } } => {
            if let Reply::Joined { ls, .. } = &reply {
                let (btx, brx) = mpsc::unbounded_channel();
                let (rtx, rrx) = mpsc::unbounded_channel();
                inner.basts.lock().unwrap_or_else(|e| e.into_inner()).insert(*ls, btx);
                inner.recovery.lock().unwrap_or_else(|e| e.into_inner()).insert(*ls, rtx);
                inner.fresh.lock().unwrap_or_else(|e| e.into_inner()).insert(*ls, (brx, rrx));
            }
            finish(id, Ok(Answer::Reply(reply)))
        }
        ServerMsg::Reply { id, reply } => finish(id, Ok(Answer::Reply(reply))),
        ServerMsg::Error { id, error } => finish(id, Err(error)),
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use super::*;
    use crate::core::{SbFlags, Status};

    /// The answer channel, with the reader's work of a request answered at once (send
    /// the AST, drop the accepted-sender) done right after the channel is first found
    /// empty: the interleaving that a busy machine makes now and then.
    struct AnsweredJustAfterPoll {
        rx: AnswerRx,
        reader: Option<Box<dyn FnOnce() + Send>>,
    }

    impl Future for AnsweredJustAfterPoll {
        type Output = <AnswerRx as Future>::Output;
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
            let r = Pin::new(&mut self.rx).poll(cx);
            if r.is_pending() {
                if let Some(reader) = self.reader.take() {
                    reader();
                }
            }
            r
        }
    }

    #[tokio::test]
    async fn an_ast_that_comes_between_the_two_polls_is_not_a_lost_connection() {
        let (done, rx) = oneshot::channel();
        let (accepted, acc_rx) = oneshot::channel::<LkId>();
        let ast =
            Ast { lkid: LkId(7), status: Status::Granted, sb_flags: SbFlags::empty(), mode: Some(Mode::EX), lvb: None };
        let reader = Box::new(move || {
            let _ = done.send(Ok(Answer::Ast(ast)));
            drop(accepted);
        });
        let mut rx = AnsweredJustAfterPoll { rx, reader: Some(reader) };
        match accepted_or_answered(&mut rx, acc_rx).await {
            Ok(Started::Answered(a)) => assert_eq!(a, ast),
            Ok(Started::Accepted(_)) => panic!("accepted without an Accepted"),
            Err(e) => panic!("the AST was taken for: {e}"),
        }
        // A connection that is really gone is still said so.
        let (done, rx) = oneshot::channel::<Result<Answer, RemoteError>>();
        let (accepted, acc_rx) = oneshot::channel::<LkId>();
        drop((done, accepted));
        let mut rx = rx;
        assert!(matches!(accepted_or_answered(&mut rx, acc_rx).await, Err(ClientError::Disconnected)));
    }
}
