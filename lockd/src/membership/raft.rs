//! [`RaftNode`]: the replicated membership log, a sans-IO wrapper of raft-rs's
//! `RawNode` that applies committed [`Command`]s to a [`ClusterState`].
//!
//! # Calling order
//!
//! Feed inputs: [`RaftNode::tick`] (with the current time, at least every
//! `tick_ms`), [`RaftNode::step`] (a peer's message) and [`RaftNode::propose`].
//! Each input runs raft-rs's Ready protocol to the end before it returns:
//! messages that may go out at once (a leader's appends) are queued, the
//! snapshot, entries and hard state are written to the [`Store`] and synced,
//! only then are the messages that needed them queued (votes, append
//! responses), then committed entries are applied. After every input drain
//! [`RaftNode::poll_transmit`] (send each message to its node; losing one is
//! fine, raft retransmits) and [`RaftNode::poll_applied`].
//!
//! # Properties
//!
//! * Fixed voter set, given at creation; quorum = majority. `check_quorum` (a
//!   leader that loses its quorum steps down) and `pre_vote` (a node that was
//!   partitioned away does not disrupt the cluster with a higher term when it
//!   comes back).
//! * Deterministic given the seed and the inputs: raft-rs draws election
//!   timeouts from the thread RNG, so after every call into raft-rs that restarts
//!   the election timer we overwrite the timeout from our seeded RNG (uniform in
//!   `[election_ticks, 2 * election_ticks)`, as raft-rs would).
//! * Proposals are forwarded to the leader by raft; one can be lost (leader
//!   change, message loss): the caller re-proposes what it does not see applied.
//!   A command applied twice is harmless: [`ClusterState::apply`] ignores what
//!   no longer fits.
//! * Every ~[`COMPACT_EVERY`] applied entries the log is compacted to a snapshot
//!   of the [`ClusterState`]; a follower that is further behind gets the snapshot.
//! * After a restart the state starts at the stored snapshot and the committed
//!   entries after it are applied again (and returned by `poll_applied` again).
//! * Bytes from peers never panic: undecodable, misaddressed or implausible
//!   messages and snapshots whose state does not decode are dropped with a warning;
//!   an undecodable committed entry is skipped with an error log. A store write
//!   error stops the node ([`MembershipError::Failed`] from then on): it may
//!   have promised peers things it could not make durable.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write as _;

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, Message, MessageType, Snapshot};
use raft::{GetEntriesContext, RaftState, RawNode, StateRole, StorageError};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tracing::{debug, error, info, warn};

use super::store::Store;
use super::view::{ClusterState, Command, NodeId};
use super::MembershipError;

/// Applied entries between two log compactions.
pub const COMPACT_EVERY: u64 = 1000;
/// Largest encoded command or snapshot state accepted.
const MAX_DECODE: usize = 16 << 20;
/// Bound of the outgoing queue; the oldest messages are dropped past it (raft
/// retransmits what matters).
const MAX_OUTBOX: usize = 16 * 1024;

/// Raft timing. Election timeouts are drawn from
/// `[election_ticks, 2 * election_ticks)` ticks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaftTiming {
    pub tick_ms: u64,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
}

impl RaftTiming {
    fn check(&self) -> Result<(), MembershipError> {
        if self.tick_ms == 0 || self.heartbeat_ticks == 0 || self.election_ticks <= self.heartbeat_ticks {
            return Err(MembershipError::Config(format!(
                "raft timing needs tick_ms > 0 and election_ticks > heartbeat_ticks > 0: {self:?}"
            )));
        }
        Ok(())
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_DECODE>()
}

/// Encodes a command as a log entry's data.
pub fn encode_command(cmd: &Command) -> Vec<u8> {
    // Encoding into a Vec cannot fail for these plain types (the size limit only
    // applies to decoding, and commands are small).
    bincode::serde::encode_to_vec(cmd, bincode_config()).expect("a Command always encodes")
}

/// Decodes a log entry's data (the whole slice must be one command).
pub fn decode_command(bytes: &[u8]) -> Option<Command> {
    match bincode::serde::decode_from_slice::<Command, _>(bytes, bincode_config()) {
        Ok((cmd, used)) if used == bytes.len() => Some(cmd),
        _ => None,
    }
}

fn encode_state(state: &ClusterState) -> Vec<u8> {
    // As for commands: plain maps, sets, strings and integers always encode.
    bincode::serde::encode_to_vec(state, bincode_config()).expect("a ClusterState always encodes")
}

fn decode_state(bytes: &[u8]) -> Result<ClusterState, MembershipError> {
    match bincode::serde::decode_from_slice::<ClusterState, _>(bytes, bincode_config()) {
        Ok((state, used)) if used == bytes.len() => Ok(state),
        Ok(_) => Err(MembershipError::Corrupt("trailing bytes after the snapshot state".into())),
        Err(e) => Err(MembershipError::Corrupt(format!("snapshot state: {e}"))),
    }
}

/// raft-rs's view of our [`Store`].
struct RaftStorage {
    store: Box<dyn Store>,
}

fn unavailable() -> raft::Error {
    raft::Error::Store(StorageError::Unavailable)
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(self.store.hard_state(), self.store.conf_state()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low < self.store.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.store.entries(low, high, max_size.into()).ok_or_else(unavailable)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx + 1 < self.store.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        self.store.term(idx).ok_or_else(unavailable)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.store.first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.store.last_index())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let snap = self.store.snapshot();
        if snap.get_metadata().index < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        Ok(snap)
    }
}

/// Forwards raft-rs's slog records to tracing.
struct TracingDrain;

struct KvText(String);

impl slog::Serializer for KvText {
    fn emit_arguments(&mut self, key: slog::Key, val: &std::fmt::Arguments<'_>) -> slog::Result {
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &slog::Record<'_>, values: &slog::OwnedKVList) -> Result<(), slog::Never> {
        use slog::KV as _;
        let text = |record: &slog::Record<'_>| {
            let mut kv = KvText(String::new());
            let _ = record.kv().serialize(record, &mut kv);
            let _ = values.serialize(record, &mut kv);
            format!("raft: {}{}", record.msg(), kv.0)
        };
        match record.level() {
            slog::Level::Critical | slog::Level::Error => error!("{}", text(record)),
            slog::Level::Warning => warn!("{}", text(record)),
            slog::Level::Info => {
                if tracing::enabled!(tracing::Level::INFO) {
                    info!("{}", text(record))
                }
            }
            slog::Level::Debug | slog::Level::Trace => {
                if tracing::enabled!(tracing::Level::TRACE) {
                    tracing::trace!("{}", text(record))
                }
            }
        }
        Ok(())
    }
}

/// One node's replica of the membership log. See the module docs for the
/// calling order.
pub struct RaftNode {
    id: NodeId,
    voters: BTreeSet<NodeId>,
    raw: RawNode<RaftStorage>,
    timing: RaftTiming,
    rng: SmallRng,
    last_tick_ms: Option<u64>,
    state: ClusterState,
    outbox: VecDeque<(NodeId, Vec<u8>)>,
    applied: VecDeque<(u64, Command)>,
    failed: bool,
    compact_every: u64,
    snapshot_installed: Option<u64>,
    /// Peers a snapshot was queued for, to report to raft after `advance`.
    snapshots_sent: Vec<u64>,
}

impl std::fmt::Debug for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftNode")
            .field("id", &self.id)
            .field("term", &self.term())
            .field("leader", &self.leader())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl RaftNode {
    /// `voters`: all configured node ids (fixed voter set; quorum = majority of
    /// them). A fresh store is initialized with that conf state; an existing one
    /// is reopened (and must have the same voters).
    pub fn new(
        id: NodeId,
        voters: &[NodeId],
        mut store: Box<dyn Store>,
        timing: RaftTiming,
        seed: u64,
    ) -> Result<Self, MembershipError> {
        timing.check()?;
        let voter_set: BTreeSet<NodeId> = voters.iter().copied().collect();
        if voter_set.contains(&0) || !voter_set.contains(&id) {
            return Err(MembershipError::Config(format!(
                "node {id} must be one of the voters {voters:?} (node ids start at 1)"
            )));
        }
        let wanted: Vec<u64> = voter_set.iter().map(|v| u64::from(*v)).collect();
        let stored = store.conf_state();
        if stored.voters.is_empty() && store.last_index() == 0 {
            store.set_conf_state(&ConfState::from((wanted.clone(), Vec::<u64>::new())))?;
            store.sync()?;
        } else {
            let mut have = stored.voters.clone();
            have.sort_unstable();
            if have != wanted {
                return Err(MembershipError::Config(format!(
                    "the raft store was made for voters {have:?}, not {wanted:?} (the voter set is fixed)"
                )));
            }
        }
        let snap = store.snapshot();
        let applied = snap.get_metadata().index;
        let state = if applied > 0 { decode_state(&snap.data)? } else { ClusterState::new() };
        let config = raft::Config {
            id: u64::from(id),
            election_tick: timing.election_ticks,
            heartbeat_tick: timing.heartbeat_ticks,
            min_election_tick: timing.election_ticks,
            max_election_tick: 2 * timing.election_ticks,
            applied,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        let logger = slog::Logger::root(TracingDrain, slog::o!("node" => id));
        let raw = RawNode::new(&config, RaftStorage { store }, &logger)?;
        let mut node = RaftNode {
            id,
            voters: voter_set,
            raw,
            timing,
            rng: SmallRng::seed_from_u64(seed),
            last_tick_ms: None,
            state,
            outbox: VecDeque::new(),
            applied: VecDeque::new(),
            failed: false,
            compact_every: COMPACT_EVERY,
            snapshot_installed: None,
            snapshots_sent: Vec::new(),
        };
        node.randomize_election_timeout();
        node.process_ready();
        Ok(node)
    }

    /// Calls raft's tick once per `tick_ms` elapsed since the previous call (the
    /// first call only starts the clock). After a long pause at most
    /// `2 * election_ticks` ticks are run.
    pub fn tick(&mut self, now_ms: u64) {
        if self.failed {
            return;
        }
        let Some(last) = self.last_tick_ms else {
            self.last_tick_ms = Some(now_ms);
            return;
        };
        let due = now_ms.saturating_sub(last) / self.timing.tick_ms;
        let max = 2 * self.timing.election_ticks as u64;
        let n = due.min(max);
        self.last_tick_ms = Some(if due > max { now_ms } else { last + due * self.timing.tick_ms });
        for _ in 0..n {
            self.raw.tick();
            self.randomize_election_timeout();
        }
        self.process_ready();
    }

    /// A raft message from peer `from`, as bytes. Undecodable, misaddressed or
    /// implausible messages are dropped with a warning.
    pub fn step(&mut self, from: NodeId, wire: &[u8]) {
        if self.failed {
            return;
        }
        let msg = match Message::parse_from_bytes(wire) {
            Ok(m) => m,
            Err(e) => {
                warn!(node = self.id, from, error = %e, "undecodable raft message dropped");
                return;
            }
        };
        if let Err(why) = self.check_message(from, &msg) {
            warn!(node = self.id, from, msg_type = ?msg.get_msg_type(), why, "raft message dropped");
            return;
        }
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.raw.step(msg)));
        match stepped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!(node = self.id, from, error = %e, "raft refused a message"),
            Err(_) => {
                // raft-rs asserts on some inconsistent inputs; a peer sending such a
                // message must not bring this process down, but the raft state can no
                // longer be trusted.
                error!(node = self.id, from, "raft panicked on a peer message; membership node stopped");
                self.failed = true;
                self.outbox.clear();
                return;
            }
        }
        self.randomize_election_timeout();
        self.process_ready();
    }

    /// Checks what raft-rs takes on trust.
    fn check_message(&self, from: NodeId, msg: &Message) -> Result<(), &'static str> {
        if msg.to != u64::from(self.id) {
            return Err("addressed to another node");
        }
        if msg.from != u64::from(from) || from == self.id || !self.voters.contains(&from) {
            return Err("sender is not the peer it came from, or not a voter");
        }
        if raft::raw_node::is_local_msg(msg.get_msg_type()) {
            return Err("local message type");
        }
        let mut index = msg.index;
        for e in msg.entries.iter() {
            if msg.get_msg_type() == MessageType::MsgAppend && (e.index != index + 1 || e.term > msg.term) {
                return Err("append entries not contiguous after the message index");
            }
            index = e.index;
        }
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            let snap = msg.get_snapshot();
            let mut voters = snap.get_metadata().get_conf_state().voters.clone();
            voters.sort_unstable();
            let ours: Vec<u64> = self.voters.iter().map(|v| u64::from(*v)).collect();
            if voters != ours || !snap.get_metadata().get_conf_state().learners.is_empty() {
                return Err("snapshot with another voter set");
            }
            if decode_state(&snap.data).is_err() {
                return Err("snapshot state does not decode");
            }
        }
        Ok(())
    }

    /// Proposes a command. Forwarded to the leader as raft does; an error if no
    /// leader is known (try again after the next election). Success does not
    /// mean it will commit: watch [`poll_applied`](Self::poll_applied).
    pub fn propose(&mut self, cmd: Command) -> Result<(), MembershipError> {
        if self.failed {
            return Err(MembershipError::Failed);
        }
        if self.leader().is_none() {
            return Err(MembershipError::NoLeader);
        }
        let data = encode_command(&cmd);
        let result = self.raw.propose(Vec::new(), data);
        self.process_ready();
        result.map_err(|e| match e {
            raft::Error::ProposalDropped => MembershipError::NoLeader,
            e => MembershipError::Raft(e),
        })
    }

    /// The next raft message to send (already made durable what it relies on).
    pub fn poll_transmit(&mut self) -> Option<(NodeId, Vec<u8>)> {
        self.outbox.pop_front()
    }

    /// The next committed command, in log order, already applied to
    /// [`state`](Self::state).
    pub fn poll_applied(&mut self) -> Option<(u64, Command)> {
        self.applied.pop_front()
    }

    /// `Some(index)` once after [`state`](Self::state) was replaced by a
    /// snapshot from the leader (this node was too far behind): the commands up
    /// to `index` are not returned by `poll_applied`; re-read the whole state.
    /// Commands queued in `poll_applied` before it are older than the snapshot.
    pub fn poll_snapshot(&mut self) -> Option<u64> {
        self.snapshot_installed.take()
    }

    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    pub fn leader(&self) -> Option<NodeId> {
        match self.raw.raft.leader_id {
            raft::INVALID_ID => None,
            l => NodeId::try_from(l).ok(),
        }
    }

    pub fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub fn term(&self) -> u64 {
        self.raw.raft.term
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// Index of the last applied log entry.
    pub fn applied_index(&self) -> u64 {
        self.raw.raft.raft_log.applied
    }

    /// Changes the compaction interval (tests use a small one to exercise
    /// snapshots).
    pub fn set_compact_every(&mut self, entries: u64) {
        self.compact_every = entries.max(1);
    }

    /// Whether the node stopped after a store failure (see the module docs).
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// raft-rs restarts its election timer with `election_elapsed = 0` and a
    /// timeout from the thread RNG; replace that timeout with one from ours. Done
    /// after every call into raft-rs, before the next tick can read the timeout.
    fn randomize_election_timeout(&mut self) {
        if self.raw.raft.election_elapsed == 0 {
            let e = self.timing.election_ticks;
            let t = self.rng.gen_range(e..2 * e);
            self.raw.raft.set_randomized_election_timeout(t);
        }
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let Ok(to) = NodeId::try_from(m.to) else {
                continue;
            };
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.snapshots_sent.push(m.to);
            }
            match m.write_to_bytes() {
                Ok(bytes) => {
                    if self.outbox.len() >= MAX_OUTBOX {
                        self.outbox.pop_front();
                    }
                    self.outbox.push_back((to, bytes));
                }
                Err(e) => error!(node = self.id, error = %e, "raft message does not encode"),
            }
        }
    }

    fn process_ready(&mut self) {
        if self.failed {
            return;
        }
        if let Err(e) = self.try_process_ready() {
            error!(node = self.id, error = %e, "raft store failed; membership node stopped");
            self.failed = true;
            self.outbox.clear();
        }
    }

    /// raft-rs's Ready/LightReady protocol, synchronously.
    fn try_process_ready(&mut self) -> Result<(), MembershipError> {
        // Each round handles everything raft had; a new round is only needed when
        // handling produced more (bounded in practice to a few rounds).
        for _ in 0..64 {
            if !self.raw.has_ready() {
                return Ok(());
            }
            let mut rd = self.raw.ready();
            // A leader's messages may go before its own log is durable.
            self.send(rd.take_messages());
            let mut wrote = false;
            if !rd.snapshot().is_empty() {
                let snap = rd.snapshot().clone();
                // Checked in `step` before raft saw it.
                let state = decode_state(&snap.data)?;
                self.raw.mut_store().store.apply_snapshot(&snap)?;
                self.state = state;
                self.snapshot_installed = Some(snap.get_metadata().index);
                wrote = true;
                info!(node = self.id, index = snap.get_metadata().index, "installed a membership snapshot");
            }
            self.apply_entries(rd.take_committed_entries());
            if !rd.entries().is_empty() {
                self.raw.mut_store().store.append(rd.entries())?;
                wrote = true;
            }
            if let Some(hs) = rd.hs() {
                self.raw.mut_store().store.set_hard_state(hs)?;
                wrote = true;
            }
            if wrote {
                self.raw.mut_store().store.sync()?;
            }
            // Votes and append responses: only now that they are durable.
            self.send(rd.take_persisted_messages());
            let mut light = self.raw.advance(rd);
            if let Some(commit) = light.commit_index() {
                let store = &mut self.raw.mut_store().store;
                let mut hs = store.hard_state();
                hs.commit = commit;
                // Not synced: a lost commit index is learned again from the leader.
                store.set_hard_state(&hs)?;
            }
            self.send(light.take_messages());
            self.apply_entries(light.take_committed_entries());
            self.raw.advance_apply();
            // The transport does not tell whether a snapshot arrived: report it
            // sent, so the leader probes the follower again (and sends a new
            // snapshot if the follower still lacks it) instead of waiting forever.
            for to in std::mem::take(&mut self.snapshots_sent) {
                self.raw.report_snapshot(to, raft::SnapshotStatus::Finish);
            }
            self.maybe_compact()?;
        }
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) {
        for e in entries {
            if e.data.is_empty() {
                continue; // a new leader's empty entry
            }
            if e.get_entry_type() != EntryType::EntryNormal {
                warn!(node = self.id, index = e.index, "configuration change entry ignored (fixed voters)");
                continue;
            }
            match decode_command(&e.data) {
                Some(cmd) => {
                    let changed = self.state.apply(&cmd);
                    debug!(node = self.id, index = e.index, ?cmd, ?changed, "membership command applied");
                    self.applied.push_back((e.index, cmd));
                }
                None => error!(node = self.id, index = e.index, "undecodable committed membership entry skipped"),
            }
        }
    }

    /// Snapshots the state and compacts the log every `compact_every` entries.
    fn maybe_compact(&mut self) -> Result<(), MembershipError> {
        let applied = self.raw.raft.raft_log.applied;
        let every = self.compact_every;
        let store = &mut self.raw.mut_store().store;
        let snap_index = store.snapshot().get_metadata().index;
        if applied < snap_index + every {
            return Ok(());
        }
        let Some(term) = store.term(applied) else {
            return Ok(()); // not held (cannot happen: applied entries are stored)
        };
        let mut snap = Snapshot { data: encode_state(&self.state).into(), ..Default::default() };
        let meta = snap.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(store.conf_state());
        store.compact(&snap)?;
        store.sync()?;
        debug!(node = self.id, index = applied, "membership log compacted");
        Ok(())
    }
}

#[cfg(test)]
#[path = "raft_sim.rs"]
mod sim;
