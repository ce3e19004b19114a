//! Deterministic simulation of [`Liveness`] on 3 and 5 nodes: per-link
//! (directional) cuts, random delay and loss, each node's clock with its own
//! offset and a rate off by up to 1%, restarts with new incarnations, and the
//! runtime's part simulated (a candidacy is "committed" after a random delay:
//! every node forgets that incarnation, and that node, if still running it,
//! restarts with a new one).
//!
//! Checked after every step: whenever any node lists (X, i) among its dead
//! candidates, or ever did, X running incarnation i has no lease.

use std::collections::{BTreeMap, BTreeSet};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::*;

const TIMING: LivenessTiming = LivenessTiming { heartbeat_ms: 100, lease_ms: 1000, dead_after_ms: 1500 };
const STEP_MS: u64 = 5;

#[derive(Clone, Debug)]
enum Msg {
    Hb(Heartbeat),
    Ack(HeartbeatAck),
}

struct Node {
    live: Liveness,
    inc: u64,
    offset: u64,
    /// Clock rate in parts per million off the simulation's.
    rate_ppm: i64,
}

impl Node {
    fn clock(&self, global: u64) -> u64 {
        let drift = (global as i128 * self.rate_ppm as i128 / 1_000_000) as i64;
        (self.offset as i64 + global as i64 + drift) as u64
    }
}

struct Sim {
    seed: u64,
    rng: SmallRng,
    now: u64,
    ids: Vec<NodeId>,
    nodes: BTreeMap<NodeId, Option<Node>>,
    down_until: BTreeMap<NodeId, u64>,
    in_flight: BTreeMap<(u64, u64), (NodeId, NodeId, Msg)>,
    seq: u64,
    cut: BTreeSet<(NodeId, NodeId)>,
    loss: f64,
    max_delay_ms: u64,
    max_drift_ppm: i64,
    /// Candidacies seen anywhere, with the time they get "committed".
    candidates: BTreeMap<(NodeId, u64), u64>,
    /// Committed deaths, forgotten by every node (also by nodes started later).
    dead: BTreeSet<(NodeId, u64)>,
    /// Whether the runtime part (commit, forget, fence) runs.
    commit: bool,
}

impl Sim {
    fn new(seed: u64, n: u32) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed);
        let ids: Vec<NodeId> = (1..=n).collect();
        let mut sim = Sim {
            seed,
            now: rng.gen_range(0..1000),
            nodes: BTreeMap::new(),
            down_until: BTreeMap::new(),
            in_flight: BTreeMap::new(),
            seq: 0,
            cut: BTreeSet::new(),
            loss: 0.0,
            max_delay_ms: 30,
            max_drift_ppm: 10_000,
            candidates: BTreeMap::new(),
            dead: BTreeSet::new(),
            commit: true,
            rng,
            ids: ids.clone(),
        };
        for id in ids {
            sim.start(id);
        }
        sim
    }

    fn start(&mut self, id: NodeId) {
        let inc = self.rng.gen();
        let offset = self.rng.gen_range(0..1_000_000);
        let rate_ppm = self.rng.gen_range(-self.max_drift_ppm..=self.max_drift_ppm);
        let mut node = Node { live: Liveness::new(id, &[], 0, TIMING, 0), inc, offset, rate_ppm };
        node.live = Liveness::new(id, &self.ids, inc, TIMING, node.clock(self.now));
        // A restarted node catches up with the committed deaths.
        for (x, i) in &self.dead {
            node.live.forget(*x, *i);
        }
        self.nodes.insert(id, Some(node));
    }

    fn stop(&mut self, id: NodeId, down_ms: u64) {
        self.nodes.insert(id, None);
        self.down_until.insert(id, self.now + down_ms);
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        if self.cut.contains(&(from, to)) || self.rng.gen_bool(self.loss) {
            return;
        }
        let at = self.now + self.rng.gen_range(1..=self.max_delay_ms);
        self.seq += 1;
        self.in_flight.insert((at, self.seq), (from, to, msg));
    }

    fn step(&mut self) {
        self.now += STEP_MS;
        let due: Vec<(u64, u64)> = self.in_flight.range(..(self.now + 1, 0)).map(|(k, _)| *k).collect();
        for k in due {
            let Some((from, to, msg)) = self.in_flight.remove(&k) else { continue };
            let now = self.now;
            let Some(Some(node)) = self.nodes.get_mut(&to) else { continue };
            let t = node.clock(now);
            match msg {
                Msg::Hb(hb) => {
                    if let Some(ack) = node.live.on_heartbeat(t, from, &hb) {
                        self.send(to, from, Msg::Ack(ack));
                    }
                }
                Msg::Ack(ack) => node.live.on_ack(t, from, &ack),
            }
        }
        for id in self.ids.clone() {
            if self.nodes[&id].is_none() && self.down_until.get(&id).is_some_and(|t| *t <= self.now) {
                self.start(id);
            }
            let now = self.now;
            let Some(Some(node)) = self.nodes.get_mut(&id) else { continue };
            let t = node.clock(now);
            if t >= node.live.next_deadline() {
                for (to, hb) in node.live.poll_heartbeats(t) {
                    self.send(id, to, Msg::Hb(hb));
                }
            }
        }
        self.check();
        if self.commit {
            self.commit_deaths();
        }
    }

    /// The invariants; records new candidacies.
    fn check(&mut self) {
        let mut seen = Vec::new();
        for node in self.nodes.values().flatten() {
            seen.extend(node.live.dead_candidates(node.clock(self.now)));
        }
        for c in seen {
            if !self.candidates.contains_key(&c) {
                let at = self.now + self.rng.gen_range(0..2000);
                self.candidates.insert(c, at);
            }
        }
        for &(x, i) in self.candidates.keys() {
            if let Some(Some(node)) = self.nodes.get(&x) {
                if node.inc == i {
                    let t = node.clock(self.now);
                    assert!(
                        !node.live.has_lease(t),
                        "seed {}: node {x} incarnation {i} holds a lease until {:?} (now {t}) but was a dead candidate",
                        self.seed,
                        node.live.lease_until()
                    );
                }
            }
        }
    }

    /// The runtime: a candidacy commits `Dead`; everyone forgets it; the dead
    /// node, if it still runs that incarnation, is fenced and restarts.
    fn commit_deaths(&mut self) {
        let due: Vec<(NodeId, u64)> = self
            .candidates
            .iter()
            .filter(|(c, at)| **at <= self.now && !self.dead.contains(c))
            .map(|(c, _)| *c)
            .collect();
        for (x, i) in due {
            self.dead.insert((x, i));
            for node in self.nodes.values_mut().flatten() {
                node.live.forget(x, i);
            }
            if self.nodes[&x].as_ref().is_some_and(|n| n.inc == i) {
                let down = self.rng.gen_range(0..3000);
                self.stop(x, down);
            }
        }
    }

    fn run(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.step();
        }
    }

    fn node(&self, id: NodeId) -> &Node {
        self.nodes[&id].as_ref().expect("node is running")
    }

    fn has_lease(&self, id: NodeId) -> bool {
        let n = self.node(id);
        n.live.has_lease(n.clock(self.now))
    }

    fn candidates_on(&self, id: NodeId) -> Vec<(NodeId, u64)> {
        let n = self.node(id);
        n.live.dead_candidates(n.clock(self.now))
    }

    fn cut_from(&mut self, x: NodeId) {
        for &o in &self.ids {
            if o != x {
                self.cut.insert((x, o));
            }
        }
    }

    fn cut_to(&mut self, x: NodeId) {
        for &o in &self.ids {
            if o != x {
                self.cut.insert((o, x));
            }
        }
    }
}

fn seeds(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED is a number")];
    }
    let n = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    (0..n).collect()
}

fn run_seeds(default: u64, f: impl Fn(u64)) {
    for seed in seeds(default) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(seed))).is_err() {
            panic!("liveness simulation failed: replay with SIM_SEED={seed}");
        }
    }
}

#[test]
fn timing_check_requires_the_margin() {
    assert!(TIMING.check().is_ok());
    let t = LivenessTiming { heartbeat_ms: 100, lease_ms: 1000, dead_after_ms: 1249 };
    assert!(t.check().is_err());
    assert_eq!(t.safe().dead_after_ms, 1250);
    assert!(LivenessTiming { heartbeat_ms: 600, lease_ms: 1000, dead_after_ms: 5000 }.check().is_err());
}

#[test]
fn lease_is_the_quorum_th_latest_ack() {
    let mut l = Liveness::new(1, &[1, 2, 3, 4, 5], 7, TIMING, 0);
    assert_eq!(l.quorum(), 3);
    assert_eq!(l.lease_until(), None);
    let ack = |sent_at| HeartbeatAck { sent_at, incarnation: 7 };
    l.on_ack(500, 2, &ack(400));
    assert_eq!(l.lease_until(), None, "two of five is no quorum");
    l.on_ack(500, 3, &ack(300));
    assert_eq!(l.lease_until(), Some(1300));
    l.on_ack(600, 4, &ack(450));
    assert_eq!(l.lease_until(), Some(1400));
    // Acks of another incarnation or of a future time do not count.
    l.on_ack(600, 5, &HeartbeatAck { sent_at: 590, incarnation: 8 });
    l.on_ack(600, 5, &ack(700));
    assert_eq!(l.lease_until(), Some(1400));
    assert!(l.has_lease(1399) && !l.has_lease(1400));
    assert_eq!(Liveness::new(1, &[1], 7, TIMING, 0).lease_until(), Some(u64::MAX));
}

#[test]
fn suspicion_is_sticky_and_a_new_incarnation_starts_fresh() {
    let mut l = Liveness::new(1, &[1, 2, 3], 7, TIMING, 0);
    let hb = |incarnation, sent_at| Heartbeat { incarnation, sent_at, suspects: vec![] };
    assert_eq!(l.on_heartbeat(100, 2, &hb(20, 5)), None, "quiet after start");
    assert!(l.on_heartbeat(1500, 2, &hb(20, 6)).is_some());
    assert_eq!(l.incarnation_of(2), Some(20));
    assert_eq!(l.poll_heartbeats(1500).len(), 2);
    assert_eq!(l.next_deadline(), 1500 + TIMING.heartbeat_ms);
    assert!(!l.suspects(2999, 2, 20));
    assert!(l.suspects(3000, 2, 20));
    assert_eq!(l.on_heartbeat(3100, 2, &hb(20, 7)), None, "suspected");
    assert_eq!(l.on_heartbeat(3200, 2, &hb(20, 8)), None, "sticky");
    assert!(l.on_heartbeat(3200, 2, &hb(21, 1)).is_some(), "a new incarnation starts fresh");
    let sent = l.poll_heartbeats(3200);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0].1.suspects, vec![(2, 20)]);
    // Node 3 agrees: quorum (2 of 3) of nodes other than 2.
    let report = Heartbeat { incarnation: 30, sent_at: 1, suspects: vec![(2, 20)] };
    l.on_heartbeat(3300, 3, &report);
    assert_eq!(l.dead_candidates(3300), vec![(2, 20)]);
    // The report goes stale after lease_ms.
    assert!(l.dead_candidates(3300 + TIMING.lease_ms).is_empty());
    l.forget(2, 20);
    assert!(l.dead_candidates(3300).is_empty());
    assert_eq!(l.on_heartbeat(3400, 2, &hb(20, 9)), None, "a dead incarnation is never acked");
}

#[test]
fn an_incarnation_alive_in_the_view_but_never_heard_is_suspected_once_watched() {
    // Node 1 starts (or was fenced, which gives it a new detector) after node 3 died:
    // it never hears node 3's incarnation 30, which the committed view still has alive.
    let mut l = Liveness::new(1, &[1, 2, 3], 7, TIMING, 0);
    let d = TIMING.dead_after_ms;
    assert!(!l.suspects(5 * d, 3, 30), "an incarnation never heard of is not tracked");
    l.watch(1000, 3, 30);
    assert!(!l.suspects(1000 + d - 1, 3, 30), "suspected before dead_after_ms since it was learned");
    assert!(l.suspects(1000 + d, 3, 30));
    l.poll_heartbeats(1000 + d);
    let hb = l.poll_heartbeats(1000 + d + TIMING.heartbeat_ms);
    assert!(hb.iter().all(|(_, h)| h.suspects.contains(&(3, 30))), "the suspicion is reported: {hb:?}");
    // A watched incarnation that heartbeats is not suspected.
    l.watch(1000, 2, 20);
    let beat = Heartbeat { incarnation: 20, sent_at: 1, suspects: vec![] };
    l.on_heartbeat(1000 + d - 10, 2, &beat);
    assert!(!l.suspects(1000 + d, 2, 20));
    // A dead incarnation is not watched again, nor is this node itself.
    l.forget(3, 30);
    l.watch(9 * d, 3, 30);
    assert!(!l.suspects(20 * d, 3, 30));
    l.watch(0, 1, 7);
    assert!(l.dead_candidates(20 * d).iter().all(|(n, _)| *n != 1));
}

#[test]
fn connected_cluster_never_produces_candidates() {
    run_seeds(20, |seed| {
        for n in [3, 5] {
            let mut sim = Sim::new(seed, n);
            sim.loss = 0.02;
            sim.run(TIMING.dead_after_ms + 1000);
            for _ in 0..(30_000 / STEP_MS) {
                sim.step();
                for &id in &sim.ids {
                    assert!(sim.has_lease(id), "seed {seed}: node {id} lost its lease in a connected cluster");
                }
            }
            assert!(sim.candidates.is_empty(), "seed {seed}: candidates {:?}", sim.candidates);
        }
    });
}

#[test]
fn isolated_node_loses_lease_then_majority_declares_it_dead() {
    run_seeds(20, |seed| {
        for n in [3, 5] {
            let mut sim = Sim::new(seed, n);
            sim.commit = false;
            sim.run(TIMING.dead_after_ms + 2000);
            let x = 1 + (seed % u64::from(n)) as NodeId;
            let inc = sim.node(x).inc;
            assert!(sim.has_lease(x));
            let t0 = sim.now;
            sim.cut_from(x);
            sim.cut_to(x);
            let mut lost = None;
            let mut declared = None;
            while sim.now < t0 + TIMING.dead_after_ms + 2000 {
                sim.step();
                if lost.is_none() && !sim.has_lease(x) {
                    lost = Some(sim.now - t0);
                }
                let others: Vec<NodeId> = sim.ids.iter().copied().filter(|i| *i != x).collect();
                if declared.is_none() && others.iter().all(|&o| sim.candidates_on(o).contains(&(x, inc))) {
                    declared = Some(sim.now - t0);
                }
            }
            let lost = lost.expect("lease lost");
            let declared = declared.expect("declared dead by every other node");
            // The lease runs out within lease_ms (clock rates aside).
            assert!(lost <= TIMING.lease_ms + 20, "seed {seed}: lease lost after {lost} ms");
            assert!(declared > lost, "seed {seed}");
            assert!(declared >= TIMING.dead_after_ms - 2 * TIMING.heartbeat_ms, "seed {seed}: {declared}");
            assert!(declared <= TIMING.dead_after_ms + 3 * TIMING.heartbeat_ms, "seed {seed}: {declared}");
            assert!(sim.candidates_on(x).is_empty(), "the isolated node alone declares nobody dead");
        }
    });
}

#[test]
fn node_nobody_hears_is_declared_dead() {
    run_seeds(10, |seed| {
        let mut sim = Sim::new(seed, 5);
        sim.commit = false;
        sim.run(TIMING.dead_after_ms + 2000);
        let inc = sim.node(3).inc;
        let t0 = sim.now;
        sim.cut_from(3); // 3 hears everyone, nobody hears 3
        sim.run(TIMING.lease_ms + 50);
        assert!(!sim.has_lease(3));
        sim.run(TIMING.dead_after_ms);
        assert!(sim.now - t0 > TIMING.dead_after_ms);
        for o in [1, 2, 4, 5] {
            assert!(sim.candidates_on(o).contains(&(3, inc)), "seed {seed}: node {o}");
        }
    });
}

#[test]
fn node_that_hears_nobody_loses_its_lease_but_is_not_declared_dead() {
    run_seeds(10, |seed| {
        for n in [3, 5] {
            let mut sim = Sim::new(seed, n);
            sim.commit = false;
            sim.run(TIMING.dead_after_ms + 2000);
            sim.cut_to(2); // everyone hears 2, 2 hears nobody (no acks either)
            sim.run(TIMING.lease_ms + 50);
            assert!(!sim.has_lease(2));
            sim.run(5 * TIMING.dead_after_ms);
            assert!(!sim.has_lease(2));
            assert!(sim.candidates.is_empty(), "seed {seed}: {:?}", sim.candidates);
            for &id in &sim.ids {
                if id != 2 {
                    assert!(sim.has_lease(id));
                }
            }
        }
    });
}

/// Random directional cuts, loss, delays, drifting clocks, crashes and restarts;
/// the invariant is checked after every step.
#[test]
fn random_partitions_never_declare_a_leaseholder_dead() {
    run_seeds(40, |seed| {
        let n = if seed % 2 == 0 { 3 } else { 5 };
        let mut sim = Sim::new(seed, n);
        sim.loss = sim.rng.gen_range(0.0..0.2);
        sim.max_delay_ms = sim.rng.gen_range(1..=TIMING.heartbeat_ms);
        let end = sim.now + 60_000;
        while sim.now < end {
            let r: f64 = sim.rng.gen();
            if r < 0.002 {
                let a = sim.ids[sim.rng.gen_range(0..sim.ids.len())];
                let b = sim.ids[sim.rng.gen_range(0..sim.ids.len())];
                if a != b {
                    sim.cut.insert((a, b));
                }
            } else if r < 0.0025 {
                sim.cut.clear();
            } else if r < 0.0027 {
                let id = sim.ids[sim.rng.gen_range(0..sim.ids.len())];
                if sim.nodes[&id].is_some() {
                    let down = sim.rng.gen_range(0..5000);
                    sim.stop(id, down);
                }
            }
            sim.step();
        }
    });
}
