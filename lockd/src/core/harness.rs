//! A cluster of lockspaces in one process for the scenario tests: messages go into
//! one global FIFO queue and are delivered in order; every event is recorded with its
//! node, in the order it happened.

use std::collections::VecDeque;

use super::{Event, Lockspace, LockspaceConfig, Message, NodeId};

pub(crate) struct Cluster {
    pub nodes: Vec<Lockspace>,
    pub now: u64,
    /// Messages sent but not yet delivered: (from, to, message).
    pub queue: VecDeque<(NodeId, NodeId, Message)>,
    /// Messages delivered since the log was last taken.
    pub delivered: Vec<(NodeId, NodeId, Message)>,
    /// Events since they were last taken, with their node.
    pub events: Vec<(NodeId, Event)>,
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
        }
    }

    pub fn node(&mut self, id: NodeId) -> &mut Lockspace {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Moves every node's outputs into the queue and the event log.
    pub fn collect(&mut self) {
        for n in &mut self.nodes {
            let id = n.our_node();
            while let Some(e) = n.poll_event() {
                self.events.push((id, e));
            }
            while let Some((to, m)) = n.poll_transmit() {
                self.queue.push_back((id, to, m));
            }
        }
    }

    /// Delivers the oldest queued message. False if none.
    pub fn deliver_one(&mut self) -> bool {
        self.collect();
        let Some((from, to, m)) = self.queue.pop_front() else {
            return false;
        };
        self.delivered.push((from, to, m.clone()));
        let now = self.now;
        self.node(to).handle_message(now, from, m);
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
