//! Deterministic simulation of 3 and 5 [`RaftNode`]s in one process: a seeded
//! scheduler, a virtual clock, a network that delays, loses, duplicates and
//! partitions messages (and corrupts a few), crashes that forget unsynced writes.
//!
//! Checked after every step: all nodes apply the same command at each log index
//! (prefix agreement) and each node's state is the replay of the agreed log up
//! to its applied index. At the end of each run the network heals and every node
//! comes back: every command the client proposed (and re-proposed while it did
//! not see it applied, as the node runtime does) must commit on all nodes.
//! A separate run keeps a minority partitioned and checks that nothing proposed
//! there ever commits.
//!
//! `SIM_SEEDS=n` runs n seeds (default 150 per cluster size); `SIM_SEED=s` runs
//! one. A failure prints the seed.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::membership::store::{MemStore, SledStore};

const TIMING: RaftTiming = RaftTiming { tick_ms: 10, election_ticks: 10, heartbeat_ticks: 2 };
const STEP_MS: u64 = 5;

struct Net {
    in_flight: BTreeMap<(u64, u64), (NodeId, NodeId, Vec<u8>)>,
    seq: u64,
    loss: f64,
    dup: f64,
    corrupt: f64,
    max_delay_ms: u64,
    /// Partition: nodes talk only within the same group.
    group: BTreeMap<NodeId, u8>,
}

impl Net {
    fn connected(&self, a: NodeId, b: NodeId) -> bool {
        self.group.get(&a) == self.group.get(&b)
    }

    fn heal(&mut self) {
        for g in self.group.values_mut() {
            *g = 0;
        }
    }
}

struct Sim {
    seed: u64,
    rng: SmallRng,
    now: u64,
    ids: Vec<NodeId>,
    nodes: BTreeMap<NodeId, Option<RaftNode>>,
    disks: BTreeMap<NodeId, MemStore>,
    down_until: BTreeMap<NodeId, u64>,
    net: Net,
    /// The agreed log: index -> command, as first applied by any node.
    log: BTreeMap<u64, Command>,
    /// Per node: last index it applied (reset to its snapshot on restart).
    applied: BTreeMap<NodeId, u64>,
    /// Commands proposed and not yet seen committed.
    pending: BTreeSet<u64>,
    /// Every command proposed, by its unique incarnation.
    proposed: BTreeMap<u64, Command>,
    /// Commands proposed in a minority: must never commit.
    forbidden: BTreeSet<u64>,
    next_inc: u64,
    restarts: u64,
    compact_every: u64,
}

impl Sim {
    fn new(seed: u64, n: u32) -> Self {
        let ids: Vec<NodeId> = (1..=n).collect();
        let mut rng = SmallRng::seed_from_u64(seed);
        let compact_every = rng.gen_range(5..40);
        let mut sim = Sim {
            seed,
            now: 0,
            nodes: BTreeMap::new(),
            disks: ids.iter().map(|&i| (i, MemStore::new())).collect(),
            down_until: BTreeMap::new(),
            net: Net {
                in_flight: BTreeMap::new(),
                seq: 0,
                loss: rng.gen_range(0.0..0.1),
                dup: rng.gen_range(0.0..0.05),
                corrupt: 0.002,
                max_delay_ms: rng.gen_range(2..40),
                group: ids.iter().map(|&i| (i, 0)).collect(),
            },
            rng,
            ids: ids.clone(),
            log: BTreeMap::new(),
            applied: BTreeMap::new(),
            pending: BTreeSet::new(),
            proposed: BTreeMap::new(),
            forbidden: BTreeSet::new(),
            next_inc: 1,
            restarts: 0,
            compact_every,
        };
        for id in ids {
            sim.start(id);
        }
        sim
    }

    fn start(&mut self, id: NodeId) {
        let seed = self.seed ^ (u64::from(id) << 32) ^ (self.restarts << 40);
        let store = Box::new(self.disks[&id].clone());
        let mut node = RaftNode::new(id, &self.ids, store, TIMING, seed)
            .unwrap_or_else(|e| panic!("seed {}: node {id} does not start: {e}", self.seed));
        node.set_compact_every(self.compact_every);
        // It applies again from its snapshot on: reset the monotonic check.
        self.applied.insert(id, 0);
        self.nodes.insert(id, Some(node));
    }

    fn crash(&mut self, id: NodeId, down_ms: u64) {
        self.nodes.insert(id, None);
        self.disks[&id].crash();
        self.down_until.insert(id, self.now + down_ms);
        self.restarts += 1;
    }

    fn node(&mut self, id: NodeId) -> Option<&mut RaftNode> {
        self.nodes.get_mut(&id).and_then(|n| n.as_mut())
    }

    /// Moves outputs of node `id` into the network and the agreed log.
    fn drain(&mut self, id: NodeId) {
        let seed = self.seed;
        let Some(node) = self.nodes.get_mut(&id).and_then(|n| n.as_mut()) else {
            return;
        };
        while let Some((index, cmd)) = node.poll_applied() {
            let last = self.applied[&id];
            assert!(index > last, "seed {seed}: node {id} applied {index} after {last}");
            self.applied.insert(id, index);
            match self.log.get(&index) {
                Some(agreed) => {
                    assert_eq!(agreed, &cmd, "seed {seed}: node {id} disagrees at index {index}")
                }
                None => {
                    self.log.insert(index, cmd.clone());
                }
            }
            if let Command::Alive { incarnation, .. } = cmd {
                assert!(!self.forbidden.contains(&incarnation), "seed {seed}: a minority proposal committed: {cmd:?}");
                self.pending.remove(&incarnation);
            }
        }
        let mut out = Vec::new();
        while let Some(m) = node.poll_transmit() {
            out.push(m);
        }
        for (to, bytes) in out {
            self.send(id, to, bytes);
        }
    }

    fn send(&mut self, from: NodeId, to: NodeId, mut bytes: Vec<u8>) {
        if !self.net.connected(from, to) || self.rng.gen_bool(self.net.loss) {
            return;
        }
        if self.rng.gen_bool(self.net.corrupt) {
            // Raft trusts the transport for integrity (TLS gives it): a corrupted
            // message that still decoded could break agreement, so the simulated
            // corruption only produces undecodable frames (an invalid wire type).
            bytes.insert(0, 0xff);
        }
        let copies = if self.rng.gen_bool(self.net.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let at = self.now + self.rng.gen_range(1..=self.net.max_delay_ms);
            self.net.seq += 1;
            self.net.in_flight.insert((at, self.net.seq), (from, to, bytes.clone()));
        }
    }

    fn propose(&mut self, inc: u64) {
        let up: Vec<NodeId> = self.ids.iter().copied().filter(|i| self.nodes[i].is_some()).collect();
        if up.is_empty() {
            return;
        }
        let id = up[self.rng.gen_range(0..up.len())];
        let cmd = self.proposed[&inc].clone();
        if let Some(node) = self.node(id) {
            let _ = node.propose(cmd);
        }
        self.drain(id);
    }

    fn new_command(&mut self) -> u64 {
        let inc = self.next_inc;
        self.next_inc += 1;
        let node = self.rng.gen_range(1..=8);
        self.proposed.insert(inc, Command::Alive { node, incarnation: inc });
        inc
    }

    /// One step of virtual time: deliveries, ticks, restarts.
    fn step(&mut self) {
        self.now += STEP_MS;
        let due: Vec<(u64, u64)> = self.net.in_flight.range(..(self.now + 1, 0)).map(|(k, _)| *k).collect();
        for k in due {
            let Some((from, to, bytes)) = self.net.in_flight.remove(&k) else { continue };
            // A link cut after sending also loses what was in flight.
            if !self.net.connected(from, to) {
                continue;
            }
            if let Some(node) = self.node(to) {
                node.step(from, &bytes);
            }
            self.drain(to);
        }
        for id in self.ids.clone() {
            if self.nodes[&id].is_none() && self.down_until.get(&id).is_some_and(|t| *t <= self.now) {
                self.start(id);
            }
            let now = self.now;
            if let Some(node) = self.node(id) {
                node.tick(now);
            }
            self.drain(id);
        }
    }

    /// Each node's state is the replay of the agreed log up to its applied index.
    fn check_states(&self) {
        for (&id, node) in &self.nodes {
            let Some(node) = node else { continue };
            assert!(!node.is_failed(), "seed {}: node {id} failed", self.seed);
            let mut model = ClusterState::new();
            for (_, cmd) in self.log.range(..=node.applied_index()) {
                model.apply(cmd);
            }
            assert_eq!(node.state(), &model, "seed {}: node {id} state differs from the log replay", self.seed);
        }
    }

    fn leaders(&self) -> Vec<(NodeId, u64)> {
        self.nodes.iter().filter_map(|(id, n)| n.as_ref().filter(|n| n.is_leader()).map(|n| (*id, n.term()))).collect()
    }

    fn check_one_leader_per_term(&self) {
        let leaders = self.leaders();
        let terms: BTreeSet<u64> = leaders.iter().map(|l| l.1).collect();
        assert_eq!(terms.len(), leaders.len(), "seed {}: two leaders in one term: {leaders:?}", self.seed);
    }

    /// Random chaos for `ms`, then heal and settle: everything proposed commits.
    fn run_chaos(&mut self, ms: u64) {
        let end = self.now + ms;
        let n = self.ids.len();
        let mut steps = 0u64;
        while self.now < end {
            let r: f64 = self.rng.gen();
            if r < 0.002 {
                // New partition: random groups (sometimes everyone together).
                for id in self.ids.clone() {
                    let g = if self.rng.gen_bool(0.3) { 0 } else { self.rng.gen_range(0..3) };
                    self.net.group.insert(id, g);
                }
            } else if r < 0.004 {
                self.net.heal();
            } else if r < 0.005 {
                let id = self.ids[self.rng.gen_range(0..n)];
                if self.nodes[&id].is_some() {
                    let down = self.rng.gen_range(50..3000);
                    self.crash(id, down);
                }
            }
            if self.rng.gen_bool(0.05) {
                let inc = self.new_command();
                self.pending.insert(inc);
                self.propose(inc);
            }
            if steps.is_multiple_of(100) {
                // The client re-proposes what it did not see committed.
                for inc in self.pending.clone().into_iter().take(20) {
                    self.propose(inc);
                }
            }
            self.step();
            self.check_one_leader_per_term();
            if steps.is_multiple_of(20) {
                self.check_states();
            }
            steps += 1;
        }
        self.settle();
    }

    /// Heals everything and runs until every pending command committed everywhere.
    fn settle(&mut self) {
        self.net.heal();
        self.net.loss = 0.0;
        self.net.corrupt = 0.0;
        for id in self.ids.clone() {
            if self.nodes[&id].is_none() {
                self.start(id);
            }
        }
        let deadline = self.now + 30_000;
        let mut steps = 0u64;
        loop {
            if steps.is_multiple_of(100) {
                for inc in self.pending.clone().into_iter().take(50) {
                    self.propose(inc);
                }
            }
            self.step();
            steps += 1;
            let last = self.log.keys().next_back().copied().unwrap_or(0);
            let caught_up = self.nodes.values().all(|n| n.as_ref().is_some_and(|n| n.applied_index() >= last));
            if self.pending.is_empty() && caught_up {
                break;
            }
            assert!(
                self.now < deadline,
                "seed {}: not settled: pending {:?}, applied {:?}, last {last}, leaders {:?}",
                self.seed,
                self.pending,
                self.nodes.values().flatten().map(|n| n.applied_index()).collect::<Vec<_>>(),
                self.leaders()
            );
        }
        self.check_states();
        let first = self.nodes.values().flatten().next().map(|n| n.state().clone());
        for n in self.nodes.values().flatten() {
            assert_eq!(Some(n.state()), first.as_ref(), "seed {}: states differ after settling", self.seed);
        }
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED is a number")];
    }
    let n = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(150);
    (0..n).collect()
}

fn run_seeds(nodes: u32, f: impl Fn(u64, u32)) {
    for seed in seeds() {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(seed, nodes)));
        if r.is_err() {
            panic!("simulation failed with {nodes} nodes: replay with SIM_SEED={seed}");
        }
    }
}

#[test]
fn raft_sim_three_nodes_agree_and_commit() {
    run_seeds(3, |seed, n| Sim::new(seed, n).run_chaos(6_000));
}

#[test]
fn raft_sim_five_nodes_agree_and_commit() {
    run_seeds(5, |seed, n| Sim::new(seed.wrapping_add(1 << 20), n).run_chaos(6_000));
}

/// A minority partition (with or without the old leader) never commits, the
/// majority goes on committing.
#[test]
fn raft_sim_minority_partition_never_commits() {
    let seeds: Vec<u64> = seeds().into_iter().take(40).collect();
    for seed in seeds {
        let n = if seed % 2 == 0 { 3 } else { 5 };
        let mut sim = Sim::new(seed.wrapping_add(2 << 20), n);
        sim.net.loss = 0.0;
        sim.net.corrupt = 0.0;
        // Elect a leader and commit something.
        let inc = sim.new_command();
        sim.pending.insert(inc);
        sim.settle();
        let leader = sim.leaders()[0].0;
        // Minority: the leader (odd seeds: not the leader) plus, for 5 nodes, one more.
        let quorum = n as usize / 2 + 1;
        let mut minority: Vec<NodeId> = Vec::new();
        for &id in &sim.ids {
            let take = if seed % 4 < 2 { id == leader } else { id != leader };
            if take && minority.len() < n as usize - quorum {
                minority.push(id);
            }
        }
        for &id in &sim.ids {
            sim.net.group.insert(id, if minority.contains(&id) { 1 } else { 0 });
        }
        let majority: Vec<NodeId> = sim.ids.iter().copied().filter(|i| !minority.contains(i)).collect();
        for step in 0..1000 {
            if step % 10 == 0 {
                let inc = sim.new_command();
                sim.forbidden.insert(inc);
                let id = minority[step % minority.len()];
                let cmd = sim.proposed[&inc].clone();
                if let Some(node) = sim.node(id) {
                    let _ = node.propose(cmd);
                }
                sim.drain(id);
                let inc = sim.new_command();
                sim.pending.insert(inc);
                let id = majority[step % majority.len()];
                let cmd = sim.proposed[&inc].clone();
                if let Some(node) = sim.node(id) {
                    let _ = node.propose(cmd);
                }
                sim.drain(id);
            }
            sim.step();
            sim.check_one_leader_per_term();
        }
        // The majority kept committing (re-proposals included) ...
        assert!(sim.leaders().iter().any(|(l, _)| majority.contains(l)), "seed {seed}: no majority leader");
        // ... and after healing, the minority's proposals are gone for good.
        sim.settle();
        assert!(sim.pending.is_empty());
    }
}

/// A node on a SledStore is stopped and reopened: it keeps its log and catches up,
/// also through a snapshot after the others compacted.
#[test]
fn raft_node_on_sled_store_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let ids = [1, 2, 3];
    let mut disks: BTreeMap<NodeId, MemStore> = BTreeMap::new();
    let mut nodes: BTreeMap<NodeId, Option<RaftNode>> = BTreeMap::new();
    let open = |id: NodeId, disks: &BTreeMap<NodeId, MemStore>| -> RaftNode {
        let store: Box<dyn Store> =
            if id == 1 { Box::new(SledStore::open(dir.path()).unwrap()) } else { Box::new(disks[&id].clone()) };
        let mut node = RaftNode::new(id, &ids, store, TIMING, u64::from(id)).unwrap();
        node.set_compact_every(10);
        node
    };
    for id in ids {
        disks.insert(id, MemStore::new());
    }
    for id in ids {
        nodes.insert(id, Some(open(id, &disks)));
    }
    let mut now = 0;
    let mut applied: BTreeMap<NodeId, Vec<u64>> = BTreeMap::new();
    let mut run = |nodes: &mut BTreeMap<NodeId, Option<RaftNode>>, ms: u64, proposals: &mut Vec<Command>| {
        for _ in 0..ms / STEP_MS {
            now += STEP_MS;
            if let Some(cmd) = proposals.last().cloned() {
                let leader = nodes.values().flatten().find(|n| n.is_leader()).map(|n| n.id());
                if let Some(Some(node)) = leader.and_then(|l| nodes.get_mut(&l)) {
                    if node.propose(cmd).is_ok() {
                        proposals.pop();
                    }
                }
            }
            let mut msgs = Vec::new();
            for (id, node) in nodes.iter_mut() {
                let Some(node) = node else { continue };
                node.tick(now);
                while let Some((to, b)) = node.poll_transmit() {
                    msgs.push((*id, to, b));
                }
                while let Some((i, _)) = node.poll_applied() {
                    applied.entry(*id).or_default().push(i);
                }
            }
            while !msgs.is_empty() {
                let mut next = Vec::new();
                for (from, to, b) in msgs {
                    if let Some(Some(node)) = nodes.get_mut(&to) {
                        node.step(from, &b);
                        while let Some((t, b)) = node.poll_transmit() {
                            next.push((to, t, b));
                        }
                        while let Some((i, _)) = node.poll_applied() {
                            applied.entry(to).or_default().push(i);
                        }
                    }
                }
                msgs = next;
            }
        }
    };
    let mut props: Vec<Command> = (1..=15).map(|i| Command::Alive { node: 4, incarnation: i }).collect();
    run(&mut nodes, 3000, &mut props);
    assert!(props.is_empty());
    let before = nodes[&1].as_ref().unwrap().state().clone();
    assert_eq!(before.nodes[&4].incarnation, 1);
    // Node 1 stops; the others commit 30 more (and compact past node 1's log).
    nodes.insert(1, None);
    let mut props: Vec<Command> = (16..=45).map(|i| Command::Alive { node: 4, incarnation: i }).collect();
    run(&mut nodes, 5000, &mut props);
    assert!(props.is_empty());
    let reopened = open(1, &disks);
    assert_eq!(reopened.state().nodes.contains_key(&4), before.nodes.contains_key(&4));
    nodes.insert(1, Some(reopened));
    run(&mut nodes, 3000, &mut Vec::new());
    let states: Vec<&ClusterState> = nodes.values().flatten().map(|n| n.state()).collect();
    assert_eq!(states[0].nodes[&4].incarnation, 16, "the final state: Alive 16..45 in reverse order ends at 16");
    assert!(states.iter().all(|s| *s == states[0]));
}

/// Garbage from a peer never panics.
#[test]
fn raft_node_drops_garbage() {
    let mut node = RaftNode::new(1, &[1, 2, 3], Box::new(MemStore::new()), TIMING, 7).unwrap();
    let mut rng = SmallRng::seed_from_u64(1);
    for len in 0..2000 {
        let bytes: Vec<u8> = (0..len % 300).map(|_| rng.gen()).collect();
        node.step(2, &bytes);
    }
    // A valid message from the wrong sender, or to someone else.
    let mut m = Message::default();
    m.set_msg_type(MessageType::MsgHeartbeat);
    m.from = 3;
    m.to = 1;
    m.term = 5;
    node.step(2, &m.write_to_bytes().unwrap());
    m.from = 2;
    m.to = 3;
    node.step(2, &m.write_to_bytes().unwrap());
    assert_eq!(node.term(), 0);
    assert!(!node.is_failed());
    assert!(matches!(node.propose(Command::Alive { node: 1, incarnation: 1 }), Err(MembershipError::NoLeader)));
}
