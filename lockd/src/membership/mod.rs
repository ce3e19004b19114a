//! Agreed membership (design and proof to be written).

pub mod liveness;
pub mod raft;
pub mod store;
pub mod view;

pub use self::raft::{RaftNode, RaftTiming};
pub use liveness::{Heartbeat, HeartbeatAck, Liveness, LivenessTiming};
pub use store::{MemStore, SledStore, Store};
pub use view::{ClusterState, Command, LsView, NodeId, NodeLife};

/// Errors of the membership layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MembershipError {
    /// The durable store failed (I/O).
    #[error("raft store: {0}")]
    Store(#[from] sled::Error),
    /// Stored data could not be decoded: the raft state on disk is corrupt.
    #[error("raft store is corrupt: {0}")]
    Corrupt(String),
    /// The store was asked for something it does not hold (a programming error in
    /// the caller or a store that lost data).
    #[error("raft store: {0}")]
    Missing(String),
    /// raft-rs refused an operation.
    #[error("raft: {0}")]
    Raft(#[from] ::raft::Error),
    /// No leader is known: a proposal cannot be forwarded.
    #[error("no raft leader known")]
    NoLeader,
    /// The node stopped after a store failure (it may have told peers things it
    /// could not make durable, so it must not go on); restart it.
    #[error("raft node stopped after a store failure")]
    Failed,
    /// Invalid configuration.
    #[error("membership configuration: {0}")]
    Config(String),
}
