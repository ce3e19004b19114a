//! Agreed membership: which nodes are up, which are members of which
//! lockspace with which slot (journal), and when a departed member's locks and
//! journal have been recovered. Three sans-IO parts and a store:
//!
//! * [`view`]: the replicated state machine. [`ClusterState::apply`] is a pure
//!   function of the committed [`Command`]s (`Alive`, `Dead`, `Join`, `Leave`,
//!   `RecoveryDone`): node lives by incarnation, per lockspace a generation
//!   (+1 on every member change), members with slots (lowest free slot >= 1;
//!   the slot of a member that died or left uncleanly is not reused before every
//!   member reported `RecoveryDone` for the current generation), and the
//!   departed members whose journals the survivors recover.
//! * [`raft`]: [`RaftNode`], the log that orders those commands: tikv's raft-rs
//!   0.7 `RawNode` (fixed voter set, check-quorum, pre-vote) behind `tick`,
//!   `step`, `propose` in and `poll_transmit`, `poll_applied` out, persisting
//!   before sending what raft's Ready protocol says must be durable first, and
//!   compacting the log into a snapshot of the state every ~1000 entries.
//! * [`store`]: the [`Store`] trait raft persists into: [`MemStore`] (tests and
//!   the simulation, with crashes that forget unsynced writes) and [`SledStore`]
//!   (`<state_dir>/node-<id>/raft`).
//! * [`liveness`]: [`Liveness`], heartbeats with a lease per node and sticky
//!   suspicion; it says when this node may act (it holds a lease) and which other
//!   node may be proposed `Dead` (its lease has surely run out).
//!
//! # How the node runtime uses them
//!
//! At start a node picks a random incarnation, creates a [`Liveness`] and opens
//! its [`RaftNode`], and once it holds a lease proposes `Alive` (re-proposing
//! until it sees it applied: a proposal can be lost, and a duplicate is
//! harmless). Waiting for the lease matters: a node that never held one is not
//! fenced by losing it, so it must not be up before it has one; at a cold start
//! of the whole cluster this waits out the peers' `dead_after_ms` quiet period.
//! A node acts on shared
//! state (grants locks, writes the disk) only while [`Liveness::has_lease`]. When
//! [`Liveness::dead_candidates`] lists `(X, i)` it proposes `Dead { X, i }`;
//! when that commits, every node calls [`Liveness::forget`]. A node that sees
//! its own `Dead` committed, or that lost its lease and cannot get it back,
//! restarts its lockd state with a new incarnation (fenced). `Join` and `Leave`
//! come from local mounts; `RecoveryDone` from the lockspace once its lock
//! recovery for the generation is complete.
//!
//! # The failure detector and why it is safe
//!
//! Rule:
//! * every node sends every other node a [`Heartbeat`] `{ incarnation, sent_at
//!   (sender's clock), suspects }` every `heartbeat_ms`;
//! * the receiver answers with a [`HeartbeatAck`] echoing `sent_at` and the
//!   incarnation, unless it suspects that incarnation (or it was committed dead,
//!   or the receiver started less than `dead_after_ms` ago: see *restarts*);
//! * P suspects X's incarnation i when it has received no heartbeat of (X, i) for
//!   `dead_after_ms` (P's clock). Suspicion is sticky: P never acks (X, i) again.
//!   A new incarnation of X starts fresh;
//! * X's lease: sort the latest acked `sent_at` per peer, descending, take the
//!   `(quorum - 1)`-th: `T_q`. X holds a lease until `T_q + lease_ms` (X's
//!   clock). X counts as one of the quorum; `quorum = voters / 2 + 1`;
//! * (X, i) is a dead candidate at O when a quorum of nodes other than X suspect
//!   it: O's own suspicion, plus the `suspects` of each other node's latest
//!   heartbeat if it arrived less than `lease_ms` ago.
//!
//! Timing: `dead_after_ms >= lease_ms + margin`, `margin = max(lease_ms / 4,
//! 2 * heartbeat_ms)`, and `lease_ms >= 2 * heartbeat_ms`
//! ([`LivenessTiming::check`]).
//!
//! **Claim.** When any node lists (X, i) as a dead candidate, X running
//! incarnation i has no lease, and it never gets one again.
//!
//! **Proof** (clocks may have any offset; their rates are taken equal first).
//! Let S be the quorum of suspecters (none is X) behind the candidacy, and
//! suppose X holds a lease at time t: there are `quorum - 1` peers L whose
//! acks X received for heartbeats sent at or after `T_q > t - lease_ms`. S has
//! `quorum` members among the `voters - 1` peers and L has `quorum - 1`;
//! `2 * quorum - 1 > voters - 1`, so some P is in both. P acked a heartbeat of
//! (X, i) sent at `s >= T_q`, so P received it at some real time `r >= s`, before
//! it suspected (sticky suspicion: no ack after). P suspects only `dead_after_ms`
//! after the last heartbeat it received, so P's suspicion began at real time
//! `>= r + dead_after_ms >= s + dead_after_ms`. X's lease from that ack ends at
//! `s + lease_ms < s + dead_after_ms`: before P suspected, hence before anyone
//! could see P's suspicion (a report is sent after the suspicion, or it is O's
//! own). As every lease quorum contains such a P (S only grows while (X, i)
//! runs: suspicion is sticky), every lease X can hold ended before the
//! candidacy became visible, and no later ack can come from P. ∎
//!
//! *Clock rates.* If clocks run at rates within `1 ± ρ`, the lease lasts at most
//! `lease_ms (1 + ρ)` real time and the suspicion waits at least
//! `dead_after_ms (1 - ρ)`; the margin `lease_ms / 4` covers `ρ` up to 11 %.
//! The `2 * heartbeat_ms` part keeps a candidacy from following one late
//! heartbeat on short leases. The simulation runs clocks off by up to 1 %.
//!
//! *Restarts of a suspecter.* P's stickiness lives in P's memory: if P restarts
//! (new incarnation P'), P' could ack (X, i) while O still counts the
//! suspicion in P's last heartbeat. Two rules close this: O counts a report
//! only for `lease_ms` after receiving it, and a new incarnation acks nobody for
//! its first `dead_after_ms`. A report of P sent at `s_P` (before P died, so
//! before P' started at `R0`) and received `d` later is counted until
//! `s_P + d + lease_ms`; P' acks nothing before `R0 + dead_after_ms`. So no
//! ack of P' exists while the report counts if `d <= margin`: **assumption**, a
//! heartbeat is not delivered more than `margin` after it was sent (QUIC
//! connections of a dead process close; a late frame is the only way). A
//! restarted node must also `forget` the incarnations the committed state
//! records dead (it catches up with the log during its quiet period), so that X
//! cannot gather a lease again from restarted nodes after being declared dead.
//!
//! *What the detector does not do.* A node that hears nobody but is heard by all
//! (its incoming links cut) loses its lease but is not declared dead (everyone
//! hears it): the runtime restarts it with a new incarnation, and the old one
//! is then suspected and declared dead `dead_after_ms` later. Liveness of the
//! detector needs a quorum of nodes that hear each other.
//!
//! # Tests
//!
//! Unit tests for every rule of the state machine and a proptest (random
//! command sequences never panic, never give two members one slot); the stores
//! (operations, crash, reopen, corruption); a seeded simulation of 3 and 5
//! RaftNodes (delay, loss, duplication, undecodable frames, partitions that
//! heal, crashes that lose unsynced writes, small compaction intervals so that
//! snapshots are sent) checking prefix agreement and state = log replay after
//! every step, that everything re-proposed commits once the network heals, and
//! that a minority partition never commits; a seeded simulation of the failure
//! detector (directional cuts, loss, delay, drifting clocks, restarts) checking
//! the claim above after every step. `SIM_SEEDS=n` / `SIM_SEED=s` set the seeds.

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
