//! Failure detection: heartbeats, a lease per node, and sticky suspicion.
//!
//! [`Liveness`] decides two things for its node, without I/O:
//! * whether this node holds a lease ([`Liveness::has_lease`]): a node without
//!   one must stop touching shared state (it may be declared dead any moment);
//! * which other nodes may be declared dead ([`Liveness::dead_candidates`]) such
//!   that their lease has surely run out, even under asymmetric partitions.
//!
//! The rule and its proof are in the [module docs of `membership`](super).
//!
//! # Calling order
//!
//! Call [`Liveness::poll_heartbeats`] at [`Liveness::next_deadline`] (or more
//! often) and send each heartbeat to its node; pass received heartbeats to
//! [`Liveness::on_heartbeat`] and send back the ack it returns; pass acks to
//! [`Liveness::on_ack`]. After `Dead { node, incarnation }` is committed, call
//! [`Liveness::forget`] (also for the dead incarnations in the state a
//! restarted node catches up with).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::view::NodeId;

/// Incarnations tracked per peer (the current one and a few that stopped).
const MAX_INCARNATIONS: usize = 4;
/// Dead incarnations remembered per peer.
const MAX_TOMBSTONES: usize = 8;
/// Suspicions read from one heartbeat.
const MAX_REPORT: usize = 256;

/// Timing of the failure detector. See [`LivenessTiming::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LivenessTiming {
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    pub dead_after_ms: u64,
}

impl LivenessTiming {
    /// The margin `dead_after_ms` must keep over `lease_ms`:
    /// `max(lease_ms / 4, 2 * heartbeat_ms)`.
    pub fn margin_ms(&self) -> u64 {
        (self.lease_ms / 4).max(2 * self.heartbeat_ms)
    }

    /// `heartbeat_ms > 0`, `lease_ms >= 2 * heartbeat_ms` (a lost heartbeat does
    /// not cost the lease) and `dead_after_ms >= lease_ms + margin_ms()`.
    pub fn check(&self) -> Result<(), super::MembershipError> {
        if self.heartbeat_ms == 0
            || self.lease_ms < 2 * self.heartbeat_ms
            || self.dead_after_ms < self.lease_ms + self.margin_ms()
        {
            return Err(super::MembershipError::Config(format!(
                "liveness timing needs heartbeat_ms > 0, lease_ms >= 2 * heartbeat_ms and \
                 dead_after_ms >= lease_ms + max(lease_ms / 4, 2 * heartbeat_ms): {self:?}"
            )));
        }
        Ok(())
    }

    /// Raises what [`check`](Self::check) refuses to the nearest safe values.
    fn safe(mut self) -> Self {
        self.heartbeat_ms = self.heartbeat_ms.max(1);
        self.lease_ms = self.lease_ms.max(2 * self.heartbeat_ms);
        self.dead_after_ms = self.dead_after_ms.max(self.lease_ms + self.margin_ms());
        self
    }
}

/// Sent by every node to every other node every `heartbeat_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender's incarnation.
    pub incarnation: u64,
    /// The sender's clock, ms.
    pub sent_at: u64,
    /// The (node, incarnation) pairs the sender suspects.
    pub suspects: Vec<(NodeId, u64)>,
}

/// The answer to a heartbeat, unless the receiver suspects the sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatAck {
    /// The heartbeat's `sent_at`, echoed.
    pub sent_at: u64,
    /// The heartbeat's `incarnation`, echoed.
    pub incarnation: u64,
}

/// What we know of one incarnation of a peer.
#[derive(Clone, Copy, Debug)]
struct Track {
    /// Our clock when we last heard it (or first learned of it).
    last_heard: u64,
    /// Sticky: once set, never cleared.
    suspected: bool,
}

#[derive(Clone, Debug, Default)]
struct Peer {
    incarnations: BTreeMap<u64, Track>,
    /// The incarnation of the last heartbeat received from it.
    current: Option<u64>,
    /// Latest `sent_at` of ours it acked (for our incarnation).
    acked: Option<u64>,
    /// Its latest heartbeat's suspicions, and our clock when it arrived.
    report: Option<(u64, BTreeSet<(NodeId, u64)>)>,
    tombstones: VecDeque<u64>,
}

impl Peer {
    fn is_dead(&self, incarnation: u64) -> bool {
        self.tombstones.contains(&incarnation)
    }

    /// Starts tracking `incarnation` (heard or learned of at `now`), dropping the
    /// least useful old one past the bound (not suspected first, then oldest).
    fn track(&mut self, incarnation: u64, now: u64) -> &mut Track {
        if !self.incarnations.contains_key(&incarnation) && self.incarnations.len() >= MAX_INCARNATIONS {
            let victim = self
                .incarnations
                .iter()
                .filter(|(i, _)| Some(**i) != self.current)
                .min_by_key(|(_, t)| (t.suspected, t.last_heard))
                .map(|(i, _)| *i);
            if let Some(v) = victim {
                self.incarnations.remove(&v);
            }
        }
        self.incarnations.entry(incarnation).or_insert(Track { last_heard: now, suspected: false })
    }
}

/// One node's failure detector. See the module docs for the calling order.
#[derive(Clone, Debug)]
pub struct Liveness {
    me: NodeId,
    incarnation: u64,
    timing: LivenessTiming,
    peers: BTreeMap<NodeId, Peer>,
    quorum: usize,
    /// No acks before this (our clock): see "restarts" in the proof.
    quiet_until: u64,
    next_heartbeat: u64,
}

impl Liveness {
    /// `voters`: all configured node ids (`me` among them). Timing that fails
    /// [`LivenessTiming::check`] is raised to safe values (with a warning).
    pub fn new(me: NodeId, voters: &[NodeId], incarnation: u64, timing: LivenessTiming, now_ms: u64) -> Self {
        if let Err(e) = timing.check() {
            warn!(node = me, error = %e, "unsafe liveness timing raised");
        }
        let timing = timing.safe();
        let all: BTreeSet<NodeId> = voters.iter().copied().chain([me]).collect();
        let peers = all.iter().filter(|v| **v != me).map(|v| (*v, Peer::default())).collect();
        Liveness {
            me,
            incarnation,
            timing,
            peers,
            quorum: all.len() / 2 + 1,
            quiet_until: now_ms.saturating_add(timing.dead_after_ms),
            next_heartbeat: now_ms,
        }
    }

    /// Majority of the voters.
    pub fn quorum(&self) -> usize {
        self.quorum
    }

    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Marks as suspected every incarnation not heard for `dead_after_ms`.
    fn update(&mut self, now: u64) {
        let dead_after = self.timing.dead_after_ms;
        for (node, peer) in self.peers.iter_mut() {
            for (inc, t) in peer.incarnations.iter_mut() {
                if !t.suspected && now >= t.last_heard.saturating_add(dead_after) {
                    t.suspected = true;
                    info!(node = self.me, peer = node, incarnation = inc, "suspecting peer: no heartbeat");
                }
            }
        }
    }

    /// The heartbeats due now (one per peer), empty if none is due.
    pub fn poll_heartbeats(&mut self, now_ms: u64) -> Vec<(NodeId, Heartbeat)> {
        self.update(now_ms);
        if now_ms < self.next_heartbeat {
            return Vec::new();
        }
        self.next_heartbeat = now_ms + self.timing.heartbeat_ms;
        let suspects: Vec<(NodeId, u64)> = self
            .peers
            .iter()
            .flat_map(|(n, p)| p.incarnations.iter().filter(|(_, t)| t.suspected).map(move |(i, _)| (*n, *i)))
            .collect();
        let hb = Heartbeat { incarnation: self.incarnation, sent_at: now_ms, suspects };
        self.peers.keys().map(|n| (*n, hb.clone())).collect()
    }

    /// When to call [`poll_heartbeats`](Self::poll_heartbeats) next: the next
    /// heartbeat or the next suspicion, whichever is first.
    pub fn next_deadline(&self) -> u64 {
        let suspicion = self
            .peers
            .values()
            .flat_map(|p| p.incarnations.values())
            .filter(|t| !t.suspected)
            .map(|t| t.last_heard.saturating_add(self.timing.dead_after_ms))
            .min();
        suspicion.map_or(self.next_heartbeat, |s| s.min(self.next_heartbeat))
    }

    /// A heartbeat from `from`: the ack to send back, unless we suspect (or
    /// buried) that incarnation or are still in our start-up quiet period.
    pub fn on_heartbeat(&mut self, now_ms: u64, from: NodeId, hb: &Heartbeat) -> Option<HeartbeatAck> {
        self.update(now_ms);
        let me = self.me;
        let voters: BTreeSet<NodeId> = self.peers.keys().copied().chain([me]).collect();
        let peer = self.peers.get_mut(&from)?;
        if peer.is_dead(hb.incarnation) {
            return None;
        }
        let report: BTreeSet<(NodeId, u64)> =
            hb.suspects.iter().take(MAX_REPORT).filter(|(n, _)| *n != from && voters.contains(n)).copied().collect();
        peer.report = Some((now_ms, report.clone()));
        peer.current = Some(hb.incarnation);
        let track = peer.track(hb.incarnation, now_ms);
        if track.suspected {
            return None; // sticky: never ack this incarnation again
        }
        track.last_heard = track.last_heard.max(now_ms);
        // Incarnations others suspect that we never heard of: start our own clock
        // for them, so that we can join (or not) the suspicion.
        for (node, inc) in report {
            if node == me {
                continue;
            }
            if let Some(p) = self.peers.get_mut(&node) {
                if !p.is_dead(inc) && !p.incarnations.contains_key(&inc) {
                    p.track(inc, now_ms);
                }
            }
        }
        if now_ms < self.quiet_until {
            return None;
        }
        Some(HeartbeatAck { sent_at: hb.sent_at, incarnation: hb.incarnation })
    }

    /// `node`/`incarnation` is alive in the committed view: if we track it neither
    /// from its heartbeats nor from another node's suspicion, starts our own clock for
    /// it now, so that an incarnation that died while we were not listening (before
    /// this node started, or before a fence gave it a new failure detector: the
    /// quorum was lost with it) is suspected and can be declared dead. Its lease has
    /// surely run out `dead_after_ms` after we learned of it: any ack we gave it came
    /// earlier.
    pub fn watch(&mut self, now_ms: u64, node: NodeId, incarnation: u64) {
        if node == self.me {
            return;
        }
        if let Some(p) = self.peers.get_mut(&node) {
            if !p.is_dead(incarnation) && !p.incarnations.contains_key(&incarnation) {
                p.track(incarnation, now_ms);
            }
        }
    }

    /// An ack of one of our heartbeats.
    pub fn on_ack(&mut self, now_ms: u64, from: NodeId, ack: &HeartbeatAck) {
        if ack.incarnation != self.incarnation || ack.sent_at > now_ms {
            return; // for a previous incarnation of ours, or not of our clock
        }
        if let Some(peer) = self.peers.get_mut(&from) {
            peer.acked = Some(peer.acked.map_or(ack.sent_at, |a| a.max(ack.sent_at)));
        }
    }

    /// Our lease expiry (our clock): `T_q + lease_ms`, where `T_q` is the
    /// `(quorum - 1)`-th latest acked `sent_at` among the peers (we count as one
    /// of the quorum). `None` before a quorum acked; unlimited in a one-node
    /// cluster.
    pub fn lease_until(&self) -> Option<u64> {
        let need = self.quorum - 1;
        if need == 0 {
            return Some(u64::MAX);
        }
        let mut acked: Vec<u64> = self.peers.values().filter_map(|p| p.acked).collect();
        acked.sort_unstable_by(|a, b| b.cmp(a));
        acked.get(need - 1).map(|t| t.saturating_add(self.timing.lease_ms))
    }

    pub fn has_lease(&self, now_ms: u64) -> bool {
        self.lease_until().is_some_and(|t| now_ms < t)
    }

    /// The incarnation of `node`'s last heartbeat received.
    pub fn incarnation_of(&self, node: NodeId) -> Option<u64> {
        self.peers.get(&node).and_then(|p| p.current)
    }

    /// Whether this node suspects `node`/`incarnation` at `now_ms`.
    pub fn suspects(&self, now_ms: u64, node: NodeId, incarnation: u64) -> bool {
        self.peers
            .get(&node)
            .and_then(|p| p.incarnations.get(&incarnation))
            .is_some_and(|t| t.suspected || now_ms >= t.last_heard.saturating_add(self.timing.dead_after_ms))
    }

    /// The (node, incarnation) pairs that a quorum of nodes other than that node
    /// suspect: our own suspicion, and the suspicions in the other peers' latest
    /// heartbeats if those arrived less than `lease_ms` ago.
    pub fn dead_candidates(&self, now_ms: u64) -> Vec<(NodeId, u64)> {
        let fresh = self.timing.lease_ms;
        let mut out = Vec::new();
        for (&x, peer) in &self.peers {
            let mut incs: BTreeSet<u64> = peer.incarnations.keys().copied().collect();
            for (&p, other) in &self.peers {
                if let (true, Some((_, report))) = (p != x, &other.report) {
                    incs.extend(report.iter().filter(|(n, _)| *n == x).map(|(_, i)| *i));
                }
            }
            for inc in incs {
                if peer.is_dead(inc) {
                    continue;
                }
                let mut count = usize::from(self.suspects(now_ms, x, inc));
                for (&p, other) in &self.peers {
                    if p == x {
                        continue;
                    }
                    if let Some((at, report)) = &other.report {
                        if now_ms < at.saturating_add(fresh) && report.contains(&(x, inc)) {
                            count += 1;
                        }
                    }
                }
                if count >= self.quorum {
                    out.push((x, inc));
                }
            }
        }
        out
    }

    /// After `Dead { node, incarnation }` is committed: drop what we know of that
    /// incarnation; it is never acked or reported as a candidate again.
    pub fn forget(&mut self, node: NodeId, incarnation: u64) {
        let Some(peer) = self.peers.get_mut(&node) else {
            return;
        };
        peer.incarnations.remove(&incarnation);
        if peer.current == Some(incarnation) {
            peer.current = None;
        }
        if !peer.is_dead(incarnation) {
            if peer.tombstones.len() >= MAX_TOMBSTONES {
                peer.tombstones.pop_front();
            }
            peer.tombstones.push_back(incarnation);
        }
    }
}

#[cfg(test)]
#[path = "liveness_sim.rs"]
mod sim;
