//! A cluster of lockspaces in one process for the scenario tests: messages go into
//! one global FIFO queue and are delivered in order; every event is recorded with its
//! node, in the order it happened.

use std::collections::VecDeque;

use super::{Event, Lockspace, LockspaceConfig, Message, NodeId};

pub(crate) struct Cluster {
    pub nodes: Vec<Lockspace>,
    pub now: u64,
    /// Messages sent but not yet delivered: (from, to, generation, message).
    pub queue: VecDeque<(NodeId, NodeId, u64, Message)>,
    /// Messages delivered since the log was last taken.
    pub delivered: Vec<(NodeId, NodeId, Message)>,
    /// Events since they were last taken, with their node.
    pub events: Vec<(NodeId, Event)>,
    /// Crashed nodes (their lockspace is gone; messages to them are dropped).
    pub dead: std::collections::BTreeSet<NodeId>,
    /// The current view and the generation in which each member joined.
    pub generation: u64,
    pub since: std::collections::BTreeMap<NodeId, u64>,
}

impl Cluster {
    /// Nodes 1..=n, all members of lockspace "ls".
    pub fn new(n: u32, config: LockspaceConfig) -> Cluster {
        let members: Vec<NodeId> = (1..=n).collect();
        Cluster {
            nodes: members
                .iter()
                .map(|&id| Lockspace::new("ls", id, members.clone(), u64::from(id)).with_config(config.clone()))
                .collect(),
            now: 0,
            queue: VecDeque::new(),
            delivered: Vec::new(),
            events: Vec::new(),
            dead: Default::default(),
            generation: 1,
            since: members.iter().map(|m| (*m, 1)).collect(),
        }
    }

    /// Node `id` crashes; the others enter a view without it.
    pub fn crash(&mut self, id: NodeId) {
        self.dead.insert(id);
        self.since.remove(&id);
        self.queue.retain(|(_, to, _, _)| *to != id);
        self.new_view();
    }

    /// Node `id` (crashed) comes back, in a new view with the others.
    pub fn restart(&mut self, id: NodeId) {
        self.dead.remove(&id);
        self.since.insert(id, self.generation + 1);
        self.new_view();
    }

    fn new_view(&mut self) {
        self.generation += 1;
        let g = self.generation;
        let view: Vec<(NodeId, u64)> = self.since.iter().map(|(n, s)| (*n, *s)).collect();
        let now = self.now;
        for i in 0..self.nodes.len() {
            let id = (i + 1) as NodeId;
            if self.dead.contains(&id) {
                continue;
            }
            if self.since.get(&id) == Some(&g) {
                let config = LockspaceConfig { idle_ms: 10_000 };
                self.nodes[i] =
                    Lockspace::new_in_view("ls", id, g, view.clone(), u64::from(id) + g).with_config(config);
            } else {
                self.nodes[i].begin_recovery(now, g, view.clone());
            }
        }
        self.collect();
    }

    pub fn node(&mut self, id: NodeId) -> &mut Lockspace {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Moves every node's outputs into the queue and the event log.
    pub fn collect(&mut self) {
        for n in &mut self.nodes {
            let id = n.our_node();
            if self.dead.contains(&id) {
                continue;
            }
            while let Some(e) = n.poll_event() {
                self.events.push((id, e));
            }
            while let Some((to, g, m)) = n.poll_transmit() {
                self.queue.push_back((id, to, g, m));
            }
        }
    }

    /// Delivers the oldest queued message. False if none.
    pub fn deliver_one(&mut self) -> bool {
        self.collect();
        let Some((from, to, g, m)) = self.queue.pop_front() else {
            return false;
        };
        if self.dead.contains(&to) {
            return true;
        }
        self.delivered.push((from, to, m.clone()));
        let now = self.now;
        self.node(to).handle_message(now, from, g, m);
        self.collect();
        true
    }

    /// Delivers until no message is left.
    pub fn run(&mut self) {
        while self.deliver_one() {}
    }

    /// Advances the clock and fires due timers.
    pub fn advance(&mut self, ms: u64) {
        self.now += ms;
        let now = self.now;
        for n in &mut self.nodes {
            if n.poll_timeout().is_some_and(|t| t <= now) {
                n.handle_timeout(now);
            }
        }
        self.collect();
    }
}
