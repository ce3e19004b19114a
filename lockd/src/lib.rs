//! concord-lockd: Concord's distributed lock manager.
//!
//! * [`core`]: the lockspace state machine (modes, queues, flags, LVBs, ASTs and
//!   BASTs, directory and mastering), with no I/O.
//! * [`transport`]: QUIC with mutual TLS between peers, versioned size-limited frames.
//! * [`tls`]: the cluster CA and node certificates.
//! * [`membership`]: agreed membership (a Raft log of node lives, lockspace members,
//!   slots and recovery), heartbeats with leases and sticky suspicion, with no I/O.
//! * [`config`]: the cluster configuration file.
//! * [`node`]: the node runtime (`concord lockd`): lockspaces, peers, local clients.
//! * [`client`]: the async client API over the lockd's unix socket.
//! * [`access`]: who may use lockd's client socket (and the mounts' control sockets).
//! * [`plock`]: cluster-wide POSIX byte-range locks and flock locks, served beside the DLM.

pub mod access;
pub mod client;
pub mod config;
pub mod core;
pub mod membership;
pub mod node;
pub mod plock;
pub mod tls;
pub mod transport;
mod uds;
