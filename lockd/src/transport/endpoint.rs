//! [`Endpoint`]: one node's QUIC endpoint, its per-peer tasks and queues.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn, Instrument};

use super::conn::{self, Counters, DialError, Established, Local};
use super::frame::{Frame, FrameKind};
use super::{
    EndpointOptions, PeerEvent, SendError, TransportError, TransportStats, Wire, CLOSE_DISCONNECT, CLOSE_REPLACED,
    CLOSE_SHUTDOWN,
};
use crate::config::ClusterConfig;
use crate::tls::{self, NodeIdentity};

/// Largest batch of queued frames written to a stream in one call.
const WRITE_BATCH_BYTES: usize = 256 * 1024;
/// Handshakes of incoming connections in progress at once; more are refused.
const MAX_PENDING_HANDSHAKES: usize = 64;
/// Longest wait in [`Endpoint::close`] for connections to finish closing.
const CLOSE_LINGER: Duration = Duration::from_millis(200);
/// A connection that lasted this long resets the redial backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(2);

/// One node's side of the DLM peer network. See the [module docs](super).
///
/// Must be created inside a tokio runtime. All methods take `&self`; share it with an
/// `Arc`. Dropping it stops its tasks; [`Endpoint::close`] also waits for them.
pub struct Endpoint<M: Wire> {
    shared: Arc<Shared<M>>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<(u32, M)>>,
    events: tokio::sync::Mutex<mpsc::Receiver<PeerEvent>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Fault switch (tests): messages to and from these peers are dropped.
    cut: Mutex<std::collections::BTreeSet<u32>>,
    /// `cut` is not empty: the send and receive paths look at it only then.
    cutting: std::sync::atomic::AtomicBool,
}

struct Shared<M> {
    node: u32,
    cluster: String,
    quic: quinn::Endpoint,
    peers: BTreeMap<u32, Peer>,
    incoming_tx: mpsc::Sender<(u32, M)>,
    events_tx: mpsc::Sender<PeerEvent>,
    shutdown: watch::Sender<bool>,
    counters: Counters,
    next_nonce: AtomicU64,
    send_queue_bytes: usize,
    backoff_min: Duration,
    backoff_max: Duration,
    handshake_timeout: Duration,
}

/// The user-facing side of one peer; its task owns the receiving ends.
struct Peer {
    addr: SocketAddr,
    out_tx: mpsc::Sender<Vec<u8>>,
    queued_bytes: Arc<AtomicUsize>,
    /// Accepted connections handed to the peer task (acceptor side only).
    handover_tx: mpsc::Sender<Established>,
    /// The current connection, for probes and `disconnect`.
    conn: Mutex<Option<quinn::Connection>>,
    up: watch::Sender<bool>,
}

/// What ended a connection, from the peer task's point of view.
enum Ended {
    Lost,
    Replaced(Established),
    Shutdown,
}

impl<M: Wire> Endpoint<M> {
    /// Binds node `node` of `cfg` at its configured address with default options, and
    /// starts connecting to every other node.
    pub fn bind(cfg: &ClusterConfig, node: u32) -> Result<Endpoint<M>, TransportError> {
        Self::bind_with(cfg, node, EndpointOptions::from_config(cfg))
    }

    /// Like [`Endpoint::bind`], with explicit options.
    pub fn bind_with(cfg: &ClusterConfig, node: u32, mut opts: EndpointOptions) -> Result<Endpoint<M>, TransportError> {
        let me = cfg.node(node)?;
        let identity = NodeIdentity::from_config(cfg, node)?;
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(opts.keep_alive));
        // Only bidirectional streams are used (the message stream and probes).
        transport.max_concurrent_uni_streams(0u32.into());
        transport.datagram_receive_buffer_size(None);
        transport.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(opts.idle_timeout).map_err(|e| TransportError::Quic(e.to_string()))?,
        ));
        let transport = Arc::new(transport);
        let server_crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls::server_config(&identity)?)
            .map_err(|e| TransportError::Quic(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
        server.transport_config(transport.clone());
        let client_crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls::client_config(&identity)?)
            .map_err(|e| TransportError::Quic(e.to_string()))?;
        let mut client = quinn::ClientConfig::new(Arc::new(client_crypto));
        client.transport_config(transport);

        let bind_err = |source| TransportError::Bind { addr: me.addr, source };
        let socket = match opts.socket.take() {
            Some(s) => s,
            None => std::net::UdpSocket::bind(me.addr).map_err(bind_err)?,
        };
        socket.set_nonblocking(true).map_err(bind_err)?;
        let runtime = quinn::default_runtime().ok_or_else(|| TransportError::Quic("no tokio runtime".into()))?;
        let mut quic =
            quinn::Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, runtime).map_err(bind_err)?;
        quic.set_default_client_config(client);

        let (incoming_tx, incoming_rx) = mpsc::channel(opts.recv_queue_len.max(1));
        let (events_tx, events_rx) = mpsc::channel(opts.event_queue_len.max(1));
        let (shutdown, _) = watch::channel(false);
        let mut peers = BTreeMap::new();
        let mut peer_rx = Vec::new();
        for n in cfg.nodes.iter().filter(|n| n.id != node) {
            let (out_tx, out_rx) = mpsc::channel(opts.send_queue_len.max(1));
            let (handover_tx, handover_rx) = mpsc::channel(4);
            let queued_bytes = Arc::new(AtomicUsize::new(0));
            peers.insert(
                n.id,
                Peer {
                    addr: n.addr,
                    out_tx,
                    queued_bytes: queued_bytes.clone(),
                    handover_tx,
                    conn: Mutex::new(None),
                    up: watch::channel(false).0,
                },
            );
            peer_rx.push((n.id, out_rx, handover_rx, queued_bytes));
        }
        let shared = Arc::new(Shared {
            node,
            cluster: cfg.cluster_name.clone(),
            quic,
            peers,
            incoming_tx,
            events_tx,
            shutdown,
            counters: Counters::default(),
            next_nonce: AtomicU64::new(1),
            send_queue_bytes: opts.send_queue_bytes,
            backoff_min: opts.backoff_min,
            backoff_max: opts.backoff_max.max(opts.backoff_min),
            handshake_timeout: opts.handshake_timeout,
        });
        let span = tracing::info_span!("transport", node);
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(accept_loop(shared.clone()).instrument(span.clone())));
        for (peer, out_rx, handover_rx, queued) in peer_rx {
            tasks.push(tokio::spawn(
                run_peer(shared.clone(), peer, out_rx, handover_rx, queued).instrument(span.clone()),
            ));
        }
        info!(node, addr = %me.addr, "transport endpoint bound");
        Ok(Endpoint {
            shared,
            incoming: tokio::sync::Mutex::new(incoming_rx),
            events: tokio::sync::Mutex::new(events_rx),
            tasks: Mutex::new(tasks),
            cut: Mutex::new(Default::default()),
            cutting: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// This node's id.
    pub fn node(&self) -> u32 {
        self.shared.node
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.shared.quic.local_addr()
    }

    /// Ids of all peers (every configured node but this one), ascending.
    pub fn peers(&self) -> Vec<u32> {
        self.shared.peers.keys().copied().collect()
    }

    /// Enqueues `msg` for node `to` and returns at once. Messages to one peer arrive in
    /// the order they were sent while the connection lasts. Sending to this node itself
    /// delivers to its own [`Endpoint::recv`].
    pub fn send(&self, to: u32, msg: M) -> Result<(), SendError> {
        if self.is_cut(to) {
            return Ok(());
        }
        if to == self.shared.node {
            return self.shared.incoming_tx.try_send((to, msg)).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SendError::QueueFull(to),
                mpsc::error::TrySendError::Closed(_) => SendError::Closed,
            });
        }
        let frame = Frame::encode_value(FrameKind::Message, &msg).map_err(|e| SendError::Encode(e.to_string()))?;
        self.enqueue(to, frame)
    }

    /// Test hook: enqueues `bytes` as they are, unchecked, on the message stream to
    /// `to`, as a broken or hostile peer would. Not for production use.
    #[doc(hidden)]
    pub fn send_raw(&self, to: u32, bytes: Vec<u8>) -> Result<(), SendError> {
        self.enqueue(to, bytes)
    }

    fn enqueue(&self, to: u32, bytes: Vec<u8>) -> Result<(), SendError> {
        let peer = self.shared.peers.get(&to).ok_or(SendError::UnknownPeer(to))?;
        let len = bytes.len();
        let before = peer.queued_bytes.fetch_add(len, Ordering::Relaxed);
        if before + len > self.shared.send_queue_bytes && before > 0 {
            peer.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            return Err(SendError::QueueFull(to));
        }
        peer.out_tx.try_send(bytes).map_err(|e| {
            peer.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => SendError::QueueFull(to),
                mpsc::error::TrySendError::Closed(_) => SendError::Closed,
            }
        })
    }

    /// The next message from any peer, with the sender's id; `None` once the endpoint
    /// is closed.
    pub async fn recv(&self) -> Option<(u32, M)> {
        let mut rx = self.incoming.lock().await;
        loop {
            let (from, m) = rx.recv().await?;
            if !self.is_cut(from) {
                return Some((from, m));
            }
        }
    }

    /// A message if one is ready.
    pub fn try_recv(&self) -> Option<(u32, M)> {
        let mut rx = self.incoming.try_lock().ok()?;
        loop {
            let (from, m) = rx.try_recv().ok()?;
            if !self.is_cut(from) {
                return Some((from, m));
            }
        }
    }

    /// Fault switch, for partition tests: from now on every message to or from
    /// `peers` is dropped (connections stay up, as when a network drops packets
    /// silently); an empty set heals.
    pub fn set_cut(&self, peers: std::collections::BTreeSet<u32>) {
        if !peers.is_empty() {
            warn!(node = self.shared.node, ?peers, "fault switch: messages to and from these peers are dropped");
        }
        self.cutting.store(!peers.is_empty(), Ordering::Relaxed);
        *self.cut.lock().unwrap_or_else(|e| e.into_inner()) = peers;
    }

    /// The peers cut off by [`Endpoint::set_cut`].
    pub fn cut(&self) -> std::collections::BTreeSet<u32> {
        self.cut.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn is_cut(&self, peer: u32) -> bool {
        self.cutting.load(Ordering::Relaxed) && self.cut.lock().unwrap_or_else(|e| e.into_inner()).contains(&peer)
    }

    /// The next peer event; `None` once the endpoint is closed.
    pub async fn next_event(&self) -> Option<PeerEvent> {
        self.events.lock().await.recv().await
    }

    /// An event if one is ready.
    pub fn try_next_event(&self) -> Option<PeerEvent> {
        self.events.try_lock().ok()?.try_recv().ok()
    }

    /// Whether an authenticated connection to `peer` is up now.
    pub fn is_up(&self, peer: u32) -> bool {
        self.shared.peers.get(&peer).is_some_and(|p| *p.up.borrow())
    }

    /// Waits until `peer` is up (returns at once if it is).
    pub async fn wait_up(&self, peer: u32) -> Result<(), TransportError> {
        let p = self.shared.peers.get(&peer).ok_or(TransportError::UnknownPeer(peer))?;
        let mut rx = p.up.subscribe();
        rx.wait_for(|up| *up).await.map(|_| ()).map_err(|_| TransportError::NotConnected(peer))
    }

    /// Measures one raw QUIC round trip to `peer`: a `Ping` on a fresh bidirectional
    /// stream and its `Pong`.
    pub async fn rtt_probe(&self, peer: u32) -> Result<Duration, TransportError> {
        let conn = self.connection(peer)?;
        let nonce = self.shared.next_nonce.fetch_add(1, Ordering::Relaxed);
        let start = Instant::now();
        tokio::time::timeout(self.shared.handshake_timeout, conn::probe(&conn, nonce))
            .await
            .map_err(|_| TransportError::Timeout)??;
        Ok(start.elapsed())
    }

    /// Closes the current connection to `peer`, if any, as if it had been lost; the
    /// dialing side reconnects after backoff. For failure injection and tests.
    pub fn disconnect(&self, peer: u32) -> Result<(), TransportError> {
        let conn = self.connection(peer)?;
        conn.close(CLOSE_DISCONNECT.into(), b"disconnect requested");
        Ok(())
    }

    fn connection(&self, peer: u32) -> Result<quinn::Connection, TransportError> {
        let p = self.shared.peers.get(&peer).ok_or(TransportError::UnknownPeer(peer))?;
        let guard = p.conn.lock().unwrap_or_else(|e| e.into_inner());
        guard.clone().ok_or(TransportError::NotConnected(peer))
    }

    /// Counters since bind.
    pub fn stats(&self) -> TransportStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TransportStats {
            connections_up: get(&c.connections_up),
            connections_refused: get(&c.connections_refused),
            malformed_frames: get(&c.malformed_frames),
            frames_sent: get(&c.frames_sent),
            messages_received: get(&c.messages_received),
            events_dropped: get(&c.events_dropped),
        }
    }

    /// Stops every task, closes every connection, and waits (a bounded time) for the
    /// close to reach the peers.
    pub async fn close(self) {
        self.stop();
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            let _ = t.await;
        }
        // The CONNECTION_CLOSE frames leave at once; waiting for the draining periods of
        // every connection to end (3 PTOs each) is polite but not needed, so it is capped.
        let _ = tokio::time::timeout(CLOSE_LINGER, self.shared.quic.wait_idle()).await;
    }

    fn stop(&self) {
        self.shared.shutdown.send_replace(true);
        self.shared.quic.close(CLOSE_SHUTDOWN.into(), b"endpoint shut down");
    }
}

impl<M: Wire> Drop for Endpoint<M> {
    fn drop(&mut self) {
        self.stop();
    }
}

impl<M> Shared<M> {
    fn event(&self, e: PeerEvent) {
        if self.events_tx.try_send(e).is_err() {
            Counters::bump(&self.counters.events_dropped);
            warn!(?e, "peer event queue full; event dropped");
        }
    }

    /// Records the connection to `peer` and reports the change. A connection is stored
    /// before its `Up` event is queued, and the event before [`Endpoint::is_up`] and
    /// [`Endpoint::wait_up`] see it; `Down` is queued after they see the peer gone.
    fn set_connection(&self, peer: u32, conn: Option<quinn::Connection>) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        let up = conn.is_some();
        *p.conn.lock().unwrap_or_else(|e| e.into_inner()) = conn;
        if up {
            self.event(PeerEvent::Up(peer));
            p.up.send_replace(true);
        } else {
            p.up.send_replace(false);
            self.event(PeerEvent::Down(peer));
        }
    }
}

/// Accepts incoming connections and hands authenticated ones to their peer tasks.
async fn accept_loop<M: Wire>(shared: Arc<Shared<M>>) {
    let mut shutdown = shared.shutdown.subscribe();
    let mut handshakes = JoinSet::new();
    loop {
        while handshakes.try_join_next().is_some() {}
        let incoming = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => break,
            i = shared.quic.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        if handshakes.len() >= MAX_PENDING_HANDSHAKES {
            warn!(remote = %incoming.remote_address(), "too many pending handshakes; refusing");
            incoming.refuse();
            continue;
        }
        let shared = shared.clone();
        handshakes.spawn(
            async move {
                let remote = incoming.remote_address();
                let me = shared.node;
                let local = Local { node: me, cluster: &shared.cluster };
                let is_peer = |id: u32| id < me && shared.peers.contains_key(&id);
                match conn::accept(incoming, local, is_peer, shared.handshake_timeout).await {
                    Ok((peer, est)) => {
                        let Some(p) = shared.peers.get(&peer) else {
                            return; // is_peer checked it
                        };
                        if p.handover_tx.send(est).await.is_err() {
                            debug!(peer, "peer task gone; dropping connection");
                        }
                    }
                    Err(r) if r.counted => {
                        Counters::bump(&shared.counters.connections_refused);
                        warn!(%remote, reason = %r.reason, "refused incoming peer connection");
                    }
                    Err(r) => debug!(%remote, reason = %r.reason, "incoming connection failed"),
                }
            }
            .in_current_span(),
        );
    }
    handshakes.shutdown().await;
}

/// Redial delays: exponential with jitter.
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, next: min }
    }
    fn reset(&mut self) {
        self.next = self.min;
    }
    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        // 75% to 125% of the nominal delay, so peers do not redial in lockstep.
        d.mul_f64(0.75 + rand::random::<f64>() * 0.5)
    }
}

/// Owns one peer: obtains connections (dialing or receiving accepted ones), writes its
/// queue to the current connection, reports up and down.
async fn run_peer<M: Wire>(
    shared: Arc<Shared<M>>,
    peer: u32,
    mut out_rx: mpsc::Receiver<Vec<u8>>,
    mut handover_rx: mpsc::Receiver<Established>,
    queued_bytes: Arc<AtomicUsize>,
) {
    let dialer = shared.node < peer;
    // Invariant: `peers` holds every id a peer task is started for.
    let addr = shared.peers[&peer].addr;
    let mut shutdown = shared.shutdown.subscribe();
    let mut backoff = Backoff::new(shared.backoff_min, shared.backoff_max);
    let mut next: Option<Established> = None;
    let mut last_refusal: Option<String> = None;
    loop {
        let est = match next.take() {
            Some(est) => est,
            None if dialer => {
                let local = Local { node: shared.node, cluster: &shared.cluster };
                let result = tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    r = conn::dial(&shared.quic, local, peer, addr, shared.handshake_timeout) => r,
                };
                match result {
                    Ok(est) => est,
                    Err(e) => {
                        match e {
                            DialError::Refused(reason) => {
                                Counters::bump(&shared.counters.connections_refused);
                                if last_refusal.as_deref() != Some(reason.as_str()) {
                                    warn!(peer, remote = %addr, %reason, "peer connection refused");
                                } else {
                                    debug!(peer, remote = %addr, %reason, "peer connection refused again");
                                }
                                last_refusal = Some(reason);
                            }
                            DialError::Unreachable(reason) => {
                                debug!(peer, remote = %addr, %reason, "peer unreachable");
                            }
                        }
                        tokio::select! {
                            _ = shutdown.wait_for(|s| *s) => return,
                            _ = tokio::time::sleep(backoff.next_delay()) => continue,
                        }
                    }
                }
            }
            None => tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                e = handover_rx.recv() => match e {
                    Some(est) => est,
                    None => return,
                },
            },
        };
        last_refusal = None;
        let conn = est.conn.clone();
        let remote = conn.remote_address();
        let started = Instant::now();
        Counters::bump(&shared.counters.connections_up);
        info!(peer, %remote, "peer up");
        shared.set_connection(peer, Some(conn.clone()));

        let reader = {
            let shared = shared.clone();
            let conn = conn.clone();
            tokio::spawn(
                async move {
                    let incoming = shared.incoming_tx.clone();
                    let probes = conn::serve_probes(peer, conn.clone(), &shared.counters);
                    let messages = conn::read_messages(peer, conn, est.recv, incoming, &shared.counters);
                    // Either ending means the connection is finished or broken.
                    tokio::select! {
                        _ = messages => {},
                        _ = probes => {},
                    }
                }
                .in_current_span(),
            )
        };
        let ended = write_loop(
            &shared,
            peer,
            &conn,
            est.send,
            &mut out_rx,
            &mut handover_rx,
            &queued_bytes,
            dialer,
            &mut shutdown,
        )
        .await;
        match &ended {
            Ended::Replaced(_) => conn.close(CLOSE_REPLACED.into(), b"replaced by a newer connection"),
            Ended::Shutdown => conn.close(CLOSE_SHUTDOWN.into(), b"endpoint shut down"),
            Ended::Lost => conn.close(CLOSE_SHUTDOWN.into(), b"connection lost"),
        }
        reader.abort();
        let _ = reader.await;
        info!(peer, %remote, reason = ?conn.close_reason(), "peer down");
        shared.set_connection(peer, None);
        if started.elapsed() >= STABLE_CONNECTION {
            backoff.reset();
        }
        match ended {
            Ended::Shutdown => return,
            Ended::Replaced(est) => next = Some(est),
            Ended::Lost if dialer => {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(backoff.next_delay()) => {},
                }
            }
            Ended::Lost => {}
        }
    }
}

/// Writes queued frames to the message stream until the connection ends, a newer one
/// replaces it, or the endpoint shuts down.
async fn write_loop<M>(
    shared: &Shared<M>,
    peer: u32,
    conn: &quinn::Connection,
    mut send: quinn::SendStream,
    out_rx: &mut mpsc::Receiver<Vec<u8>>,
    handover_rx: &mut mpsc::Receiver<Established>,
    queued_bytes: &AtomicUsize,
    dialer: bool,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let mut batch = Vec::with_capacity(WRITE_BATCH_BYTES);
    loop {
        let first = tokio::select! {
            biased;
            _ = shutdown.wait_for(|s| *s) => return Ended::Shutdown,
            _ = conn.closed() => return Ended::Lost,
            e = handover_rx.recv(), if !dialer => return match e {
                Some(est) => {
                    info!(peer, "peer reconnected; replacing the old connection");
                    Ended::Replaced(est)
                }
                None => Ended::Shutdown,
            },
            m = out_rx.recv() => match m {
                Some(m) => m,
                None => return Ended::Shutdown,
            },
        };
        batch.clear();
        let mut frames = 1;
        let mut taken = first.len();
        batch.extend_from_slice(&first);
        while batch.len() < WRITE_BATCH_BYTES {
            match out_rx.try_recv() {
                Ok(m) => {
                    taken += m.len();
                    frames += 1;
                    batch.extend_from_slice(&m);
                }
                Err(_) => break,
            }
        }
        queued_bytes.fetch_sub(taken, Ordering::Relaxed);
        // A write waits while the peer's flow-control window is full; the connection may
        // end or be replaced meanwhile. A write cut short only loses bytes on a
        // connection that is being abandoned anyway.
        tokio::select! {
            biased;
            r = send.write_all(&batch) => {
                if let Err(e) = r {
                    debug!(peer, error = %e, frames, "write failed; frames lost with the connection");
                    return Ended::Lost;
                }
            }
            _ = shutdown.wait_for(|s| *s) => return Ended::Shutdown,
            _ = conn.closed() => return Ended::Lost,
            e = handover_rx.recv(), if !dialer => return match e {
                Some(est) => {
                    info!(peer, "peer reconnected during a write; replacing the old connection");
                    Ended::Replaced(est)
                }
                None => Ended::Shutdown,
            },
        }
        shared.counters.frames_sent.fetch_add(frames, Ordering::Relaxed);
    }
}
