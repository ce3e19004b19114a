//! QUIC transport between DLM peers, with mutual TLS.
//!
//! An [`Endpoint`] is one node's side of the peer network: a quinn endpoint bound to the
//! node's address from the cluster configuration, keeping one connection to every other
//! configured node. It is generic over the message type `M` (any serde type, see
//! [`Wire`]), so it knows nothing of the lockspace core that rides on it.
//!
//! # Connections
//!
//! * **One connection per peer pair; the lower id dials.** Node `a` dials node `b` iff
//!   `a < b`, at bind time and again after every loss, with exponential backoff
//!   ([`EndpointOptions::backoff_min`] doubling up to [`EndpointOptions::backoff_max`],
//!   with jitter). The higher id only accepts; a hello from a higher id than the
//!   acceptor's is refused. When a dialer comes back (a restarted process) while the
//!   acceptor still holds the old connection, the new connection replaces the old one.
//! * **Identity.** TLS is mutual and the cluster CA is the only root (see
//!   [`crate::tls`]); the dialer also checks the server name `node-<N>.concord`. The
//!   dialer then opens one bidirectional stream and sends a [`frame::Hello`] (protocol
//!   version, cluster name, its id, the id it wants); the acceptor checks that the id in
//!   the hello equals the id in the peer's certificate, that versions and cluster name
//!   match, and answers with its own hello, which the dialer checks the same way.
//!   Anything else closes the connection with [`CLOSE_REFUSED`] and a `tracing::warn!`
//!   naming the peer address.
//! * **Messages.** That first stream stays open for the life of the connection and
//!   carries [`frame`]s of kind `Message` in both directions: per-peer FIFO, pipelined
//!   (a send is an enqueue; the writer batches whatever is queued into one write), no
//!   round trip per message. A frame that fails validation (magic, version, kind, size,
//!   CRC, bincode) closes that connection only, with [`CLOSE_MALFORMED`]; the dialer
//!   reconnects after backoff.
//! * **Delivery.** FIFO and exactly-once while one connection lasts. Messages still in
//!   flight when a connection is lost may be lost; the user learns of it from
//!   [`PeerEvent::Down`]. Messages sent while a peer is down wait in its bounded queue
//!   and go out once it is up again.
//! * **Probes.** [`Endpoint::rtt_probe`] opens a fresh bidirectional stream, sends a
//!   `Ping` frame and times the `Pong`: the raw QUIC round trip, the floor for lock
//!   latency benchmarks.
//! * **Liveness.** QUIC keep-alives every `timing.heartbeat_ms`; a connection silent
//!   for `timing.lease_ms` is closed by QUIC's idle timeout and reported as down. Real
//!   failure detection (leases, quorum) belongs to the membership layer above.
//!
//! Every queue is bounded: per-peer send queues ([`EndpointOptions::send_queue_len`]
//! frames and [`EndpointOptions::send_queue_bytes`] bytes; [`Endpoint::send`] returns
//! [`SendError::QueueFull`] beyond that), the receive queue
//! ([`EndpointOptions::recv_queue_len`]; when full, reading from peers pauses and QUIC
//! flow control pushes back on senders) and the event queue (events beyond it are
//! dropped and counted; [`Endpoint::is_up`] always tells the current state).
//!
//! # Example
//!
//! ```no_run
//! # async fn demo(cfg: concord_lockd::config::ClusterConfig) -> Result<(), Box<dyn std::error::Error>> {
//! use concord_lockd::transport::Endpoint;
//! let ep: Endpoint<String> = Endpoint::bind(&cfg, 1)?;
//! ep.send(2, "hello".to_string())?;
//! if let Some((from, msg)) = ep.recv().await {
//!     println!("{from}: {msg}");
//! }
//! ep.close().await;
//! # Ok(()) }
//! ```

mod conn;
mod endpoint;
pub mod frame;
pub mod testing;

use std::net::SocketAddr;
use std::time::Duration;

pub use endpoint::Endpoint;

use crate::config::{ClusterConfig, ConfigError};
use crate::tls::TlsError;

/// Message types the transport can carry.
pub trait Wire: serde::Serialize + serde::de::DeserializeOwned + Send + 'static {}
impl<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static> Wire for T {}

/// QUIC application close code: normal shutdown.
pub const CLOSE_SHUTDOWN: u32 = 0;
/// QUIC application close code: a malformed frame was received.
pub const CLOSE_MALFORMED: u32 = 1;
/// QUIC application close code: the peer's identity or hello was refused.
pub const CLOSE_REFUSED: u32 = 2;
/// QUIC application close code: a newer connection from the same peer replaced this one.
pub const CLOSE_REPLACED: u32 = 3;
/// QUIC application close code: closed on request ([`Endpoint::disconnect`]).
pub const CLOSE_DISCONNECT: u32 = 4;

/// A change in the reachability of a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerEvent {
    /// An authenticated connection to the peer is established; messages flow.
    Up(u32),
    /// The connection to the peer is gone; messages in flight may have been lost.
    Down(u32),
}

/// Tunables of an [`Endpoint`]. [`EndpointOptions::from_config`] gives the defaults.
#[derive(Debug)]
pub struct EndpointOptions {
    /// Frames queued per peer before [`Endpoint::send`] fails with `QueueFull`.
    pub send_queue_len: usize,
    /// Bytes queued per peer before [`Endpoint::send`] fails with `QueueFull`.
    pub send_queue_bytes: usize,
    /// Received messages buffered before reading from peers pauses.
    pub recv_queue_len: usize,
    /// Peer events buffered before further events are dropped.
    pub event_queue_len: usize,
    /// First delay before redialing a lost or unreachable peer.
    pub backoff_min: Duration,
    /// Largest delay between dial attempts.
    pub backoff_max: Duration,
    /// Time allowed for the QUIC/TLS handshake plus the hello exchange, and for a probe.
    pub handshake_timeout: Duration,
    /// QUIC keep-alive interval (default `timing.heartbeat_ms`).
    pub keep_alive: Duration,
    /// QUIC idle timeout (default `timing.lease_ms`).
    pub idle_timeout: Duration,
    /// A socket to use instead of binding the node's configured address (tests bind
    /// port 0 first and write the config afterwards, race-free).
    pub socket: Option<std::net::UdpSocket>,
}

impl EndpointOptions {
    /// Defaults, with QUIC timers from the configuration's `[timing]`.
    pub fn from_config(cfg: &ClusterConfig) -> EndpointOptions {
        EndpointOptions {
            send_queue_len: 16 * 1024,
            send_queue_bytes: 64 << 20,
            recv_queue_len: 64 * 1024,
            event_queue_len: 1024,
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(5),
            keep_alive: cfg.timing.heartbeat(),
            idle_timeout: cfg.timing.lease(),
            socket: None,
        }
    }
}

/// Counters of an [`Endpoint`], since bind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Authenticated connections that came up (both directions of dialing).
    pub connections_up: u64,
    /// Connections refused: failed TLS handshakes, identity mismatches, bad hellos.
    pub connections_refused: u64,
    /// Connections closed because of a malformed frame from the peer.
    pub malformed_frames: u64,
    /// Message frames handed to QUIC.
    pub frames_sent: u64,
    /// Messages delivered to [`Endpoint::recv`].
    pub messages_received: u64,
    /// Peer events dropped because the event queue was full.
    pub events_dropped: u64,
}

/// Errors of binding and probing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("QUIC configuration: {0}")]
    Quic(String),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("node {0} is not a peer of this endpoint")]
    UnknownPeer(u32),
    #[error("node {0} is not connected")]
    NotConnected(u32),
    #[error("timed out")]
    Timeout,
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("protocol: {0}")]
    Protocol(String),
}

/// Why [`Endpoint::send`] did not enqueue a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    #[error("node {0} is not a peer of this endpoint")]
    UnknownPeer(u32),
    #[error("send queue to node {0} is full")]
    QueueFull(u32),
    #[error("message does not encode: {0}")]
    Encode(String),
    #[error("the endpoint is closed")]
    Closed,
}
