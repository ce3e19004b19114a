//! The replicated membership state machine: which nodes are up (with which
//! incarnation), which nodes are members of which lockspace with which slot, and
//! where each lockspace stands in lock recovery.
//!
//! [`ClusterState::apply`] is a pure, deterministic function of the committed
//! [`Command`] sequence: every node applies the same log and gets the same state.
//! It never panics; a command that does not fit the current state (unknown or
//! stale incarnation, duplicate join, late `RecoveryDone`, ...) changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// A node id, as in the lockspace core.
pub type NodeId = crate::core::NodeId;

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Node `node` is up with this incarnation (a random u64 chosen at each lockd
    /// start or after it was fenced).
    Alive { node: NodeId, incarnation: u64 },
    /// Node `node` (that incarnation) is declared dead (its lease has run out,
    /// fencing done).
    Dead { node: NodeId, incarnation: u64 },
    /// Node joins lockspace `ls` (first local client joined).
    Join { ls: String, node: NodeId, incarnation: u64 },
    /// Node leaves lockspace `ls`: clean (unmount: slot free at once) or not (its
    /// mount process died: its slot must be recovered first).
    Leave { ls: String, node: NodeId, incarnation: u64, clean: bool },
    /// `node` finished lock recovery of `ls` for `generation`.
    RecoveryDone { ls: String, generation: u64, node: NodeId },
    /// Member `node` may have lost lock messages of `ls` in `generation` (a
    /// connection to a peer broke and came back, a send queue overflowed): a new
    /// generation with the same members, whose lock recovery reconciles them.
    /// Ignored unless `generation` is still the current one.
    Resync { ls: String, node: NodeId, incarnation: u64, generation: u64 },
}

/// What the cluster knows of one node's life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLife {
    pub incarnation: u64,
    pub alive: bool,
}

/// The agreed view of one lockspace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsView {
    /// 0 = never had members; +1 on every member change.
    pub generation: u64,
    /// node -> slot (slots start at 1).
    pub members: BTreeMap<NodeId, u32>,
    /// node -> the generation in which it joined: tells a member that left and
    /// joined again apart from one that stayed (the lock recovery needs it).
    pub joined: BTreeMap<NodeId, u64>,
    /// Slots of departed members (dead or unclean leave) not yet recovered: not
    /// reusable.
    pub unrecovered: BTreeSet<u32>,
    /// Members removed uncleanly by the change(s) since the last completed
    /// recovery (node -> slot): whose journals and locks the survivors recover.
    pub departed: BTreeMap<NodeId, u32>,
    /// Recovery of `generation` is not complete on every member.
    pub recovering: bool,
    /// Members that reported `RecoveryDone` for `generation`.
    pub done: BTreeSet<NodeId>,
}

/// The whole replicated state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Cluster generation: +1 whenever a node comes up or is declared dead.
    pub generation: u64,
    pub nodes: BTreeMap<NodeId, NodeLife>,
    pub lockspaces: BTreeMap<String, LsView>,
}

impl LsView {
    /// Lowest slot >= 1 used by no member and not waiting for recovery.
    fn free_slot(&self) -> u32 {
        let used: BTreeSet<u32> = self.members.values().copied().collect();
        let mut slot = 1u32;
        while used.contains(&slot) || self.unrecovered.contains(&slot) {
            slot += 1;
        }
        slot
    }

    /// Bookkeeping after any member change.
    fn changed(&mut self) {
        self.generation += 1;
        self.done.clear();
        if self.members.is_empty() {
            // Nobody is left to recover; the next joiner (as GFS2's first mounter)
            // recovers every journal.
            self.unrecovered.clear();
            self.departed.clear();
            self.recovering = false;
        } else {
            self.recovering = true;
        }
    }

    /// Removes `node` if it is a member; unclean removals keep the slot until
    /// recovery. Returns whether it was a member.
    fn remove(&mut self, node: NodeId, clean: bool) -> bool {
        let Some(slot) = self.members.remove(&node) else {
            return false;
        };
        self.joined.remove(&node);
        if !clean {
            self.unrecovered.insert(slot);
            self.departed.insert(node, slot);
        }
        self.changed();
        true
    }
}

impl ClusterState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `node` is recorded alive with exactly `incarnation`.
    pub fn is_alive(&self, node: NodeId, incarnation: u64) -> bool {
        self.nodes.get(&node).is_some_and(|l| l.alive && l.incarnation == incarnation)
    }

    /// Applies one committed command; returns the names of lockspaces whose view
    /// (generation) changed. Never panics on any input; commands that do not fit
    /// (unknown/stale incarnation, duplicate join, ...) change nothing.
    pub fn apply(&mut self, cmd: &Command) -> Vec<String> {
        match cmd {
            Command::Alive { node, incarnation } => {
                let mut changed = Vec::new();
                if let Some(life) = self.nodes.get(node) {
                    if life.incarnation == *incarnation {
                        // Already alive: nothing to do. A dead incarnation never
                        // comes back (it was fenced; it must restart with a new one).
                        return changed;
                    }
                    if life.alive {
                        let old = life.incarnation;
                        changed = self.kill(*node, old);
                    }
                }
                self.nodes.insert(*node, NodeLife { incarnation: *incarnation, alive: true });
                self.generation += 1;
                changed
            }
            Command::Dead { node, incarnation } => {
                if self.is_alive(*node, *incarnation) {
                    self.generation += 1;
                    self.kill(*node, *incarnation)
                } else {
                    Vec::new()
                }
            }
            Command::Join { ls, node, incarnation } => {
                if !self.is_alive(*node, *incarnation) {
                    return Vec::new();
                }
                let view = self.lockspaces.entry(ls.clone()).or_default();
                if view.members.contains_key(node) {
                    return Vec::new();
                }
                let slot = view.free_slot();
                view.members.insert(*node, slot);
                view.changed();
                view.joined.insert(*node, view.generation);
                vec![ls.clone()]
            }
            Command::Leave { ls, node, incarnation, clean } => {
                if !self.is_alive(*node, *incarnation) {
                    return Vec::new();
                }
                match self.lockspaces.get_mut(ls) {
                    Some(view) => {
                        if view.remove(*node, *clean) {
                            vec![ls.clone()]
                        } else {
                            Vec::new()
                        }
                    }
                    None => Vec::new(),
                }
            }
            Command::Resync { ls, node, incarnation, generation } => {
                if !self.is_alive(*node, *incarnation) {
                    return Vec::new();
                }
                match self.lockspaces.get_mut(ls) {
                    Some(view) if view.generation == *generation && view.members.contains_key(node) => {
                        view.changed();
                        vec![ls.clone()]
                    }
                    _ => Vec::new(),
                }
            }
            Command::RecoveryDone { ls, generation, node } => {
                if let Some(view) = self.lockspaces.get_mut(ls) {
                    if view.recovering && view.generation == *generation && view.members.contains_key(node) {
                        view.done.insert(*node);
                        if view.members.keys().all(|m| view.done.contains(m)) {
                            view.recovering = false;
                            view.unrecovered.clear();
                            view.departed.clear();
                        }
                    }
                }
                // Completing recovery does not change the generation.
                Vec::new()
            }
        }
    }

    /// Marks `node`/`incarnation` dead and removes it uncleanly from every
    /// lockspace. The caller checked that it is recorded alive.
    fn kill(&mut self, node: NodeId, incarnation: u64) -> Vec<String> {
        self.nodes.insert(node, NodeLife { incarnation, alive: false });
        let mut changed = Vec::new();
        for (name, view) in self.lockspaces.iter_mut() {
            if view.remove(node, false) {
                changed.push(name.clone());
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(node: NodeId, incarnation: u64) -> Command {
        Command::Alive { node, incarnation }
    }
    fn dead(node: NodeId, incarnation: u64) -> Command {
        Command::Dead { node, incarnation }
    }
    fn join(node: NodeId, incarnation: u64) -> Command {
        Command::Join { ls: "fs1".into(), node, incarnation }
    }
    fn leave(node: NodeId, incarnation: u64, clean: bool) -> Command {
        Command::Leave { ls: "fs1".into(), node, incarnation, clean }
    }
    fn done(node: NodeId, generation: u64) -> Command {
        Command::RecoveryDone { ls: "fs1".into(), generation, node }
    }
    fn state(cmds: &[Command]) -> ClusterState {
        let mut s = ClusterState::new();
        for c in cmds {
            s.apply(c);
        }
        s
    }
    fn fs1(s: &ClusterState) -> &LsView {
        &s.lockspaces["fs1"]
    }
    fn slots(s: &ClusterState) -> Vec<(NodeId, u32)> {
        fs1(s).members.iter().map(|(n, s)| (*n, *s)).collect()
    }

    #[test]
    fn resync_bumps_the_generation_once_and_only_for_members() {
        let mut s = ClusterState::new();
        s.apply(&Command::Alive { node: 1, incarnation: 10 });
        s.apply(&Command::Alive { node: 2, incarnation: 20 });
        s.apply(&join(1, 10));
        s.apply(&join(2, 20));
        let g = s.lockspaces["fs1"].generation;
        let slots = s.lockspaces["fs1"].members.clone();
        let resync =
            |node, incarnation, generation| Command::Resync { ls: "fs1".into(), node, incarnation, generation };
        assert_eq!(s.apply(&resync(1, 10, g)), vec!["fs1".to_string()]);
        assert_eq!(s.lockspaces["fs1"].generation, g + 1);
        assert_eq!(s.lockspaces["fs1"].members, slots, "same members, same slots");
        assert!(s.lockspaces["fs1"].recovering);
        // The same request again (another member, or a re-proposal): already done.
        assert!(s.apply(&resync(2, 20, g)).is_empty());
        // Not a member, or a stale incarnation: nothing.
        s.apply(&Command::Alive { node: 3, incarnation: 30 });
        assert!(s.apply(&resync(3, 30, g + 1)).is_empty());
        assert!(s.apply(&resync(1, 11, g + 1)).is_empty());
        assert_eq!(s.lockspaces["fs1"].generation, g + 1);
    }

    #[test]
    fn join_takes_lowest_free_slot_and_bumps_generation() {
        let mut s = state(&[alive(1, 11), alive(2, 22), alive(3, 33)]);
        assert_eq!(s.apply(&join(2, 22)), vec!["fs1".to_string()]);
        assert_eq!(s.apply(&join(1, 11)), vec!["fs1".to_string()]);
        assert_eq!(slots(&s), vec![(1, 2), (2, 1)]);
        assert_eq!(fs1(&s).generation, 2);
        assert!(fs1(&s).recovering);
        // Clean leave frees slot 1 at once; node 3 takes it.
        s.apply(&leave(2, 22, true));
        assert!(fs1(&s).departed.is_empty() && fs1(&s).unrecovered.is_empty());
        s.apply(&join(3, 33));
        assert_eq!(slots(&s), vec![(1, 2), (3, 1)]);
        assert_eq!(fs1(&s).generation, 4);
    }

    #[test]
    fn duplicate_join_is_ignored() {
        let mut s = state(&[alive(1, 11), join(1, 11)]);
        let before = s.clone();
        assert!(s.apply(&join(1, 11)).is_empty());
        assert_eq!(s, before);
    }

    #[test]
    fn join_and_leave_need_the_live_incarnation() {
        let mut s = state(&[alive(1, 11)]);
        assert!(s.apply(&join(1, 12)).is_empty());
        assert!(s.apply(&join(2, 22)).is_empty());
        assert!(s.lockspaces.is_empty());
        s.apply(&join(1, 11));
        let before = s.clone();
        assert!(s.apply(&leave(1, 12, false)).is_empty());
        assert_eq!(s, before);
        // A dead node can neither join nor leave.
        s.apply(&dead(1, 11));
        let before = s.clone();
        assert!(s.apply(&join(1, 11)).is_empty());
        assert!(s.apply(&leave(1, 11, true)).is_empty());
        assert_eq!(s, before);
    }

    #[test]
    fn dead_node_slot_is_reused_only_after_recovery() {
        let mut s = state(&[alive(1, 11), alive(2, 22), alive(3, 33), join(1, 11), join(2, 22)]);
        assert_eq!(s.apply(&dead(1, 11)), vec!["fs1".to_string()]);
        assert!(!s.nodes[&1].alive);
        let v = fs1(&s);
        assert_eq!(v.generation, 3);
        assert_eq!(v.unrecovered, BTreeSet::from([1]));
        assert_eq!(v.departed, BTreeMap::from([(1, 1)]));
        assert!(v.recovering);
        // Node 3 joins during recovery: slot 1 is not reusable, it gets 3.
        s.apply(&join(3, 33));
        assert_eq!(slots(&s), vec![(2, 2), (3, 3)]);
        let g = fs1(&s).generation;
        // Recovery of an older generation does not count.
        s.apply(&done(2, g - 1));
        assert!(fs1(&s).done.is_empty());
        s.apply(&done(2, g));
        assert!(fs1(&s).recovering);
        s.apply(&done(3, g));
        let v = fs1(&s);
        assert!(!v.recovering && v.unrecovered.is_empty() && v.departed.is_empty());
        // Node 1 restarts and gets its old slot back.
        s.apply(&alive(1, 12));
        s.apply(&join(1, 12));
        assert_eq!(slots(&s), vec![(1, 1), (2, 2), (3, 3)]);
    }

    #[test]
    fn unclean_leave_keeps_the_slot_until_recovery() {
        let mut s = state(&[alive(1, 11), alive(2, 22), join(1, 11), join(2, 22)]);
        s.apply(&leave(1, 11, false));
        let v = fs1(&s);
        assert_eq!(v.unrecovered, BTreeSet::from([1]));
        assert_eq!(v.departed, BTreeMap::from([(1, 1)]));
        // The node is still alive; it rejoins and must not get slot 1 yet.
        s.apply(&join(1, 11));
        assert_eq!(slots(&s), vec![(1, 3), (2, 2)]);
        assert!(s.nodes[&1].alive);
    }

    #[test]
    fn recovery_done_from_non_member_or_when_idle_is_ignored() {
        let mut s = state(&[alive(1, 11), alive(2, 22), join(1, 11)]);
        s.apply(&done(2, 1));
        assert!(fs1(&s).done.is_empty());
        s.apply(&done(1, 1));
        assert!(!fs1(&s).recovering);
        let before = s.clone();
        s.apply(&done(1, 1));
        assert!(s.apply(&Command::RecoveryDone { ls: "nope".into(), generation: 1, node: 1 }).is_empty());
        assert_eq!(s, before);
    }

    #[test]
    fn restart_with_new_incarnation_first_kills_the_old_one() {
        let mut s = state(&[alive(1, 11), alive(2, 22), join(1, 11), join(2, 22)]);
        assert_eq!(s.apply(&alive(1, 12)), vec!["fs1".to_string()]);
        assert_eq!(s.nodes[&1], NodeLife { incarnation: 12, alive: true });
        let v = fs1(&s);
        assert_eq!(slots(&s), vec![(2, 2)]);
        assert_eq!(v.departed, BTreeMap::from([(1, 1)]));
        // The old incarnation's commands are now stale.
        let before = s.clone();
        assert!(s.apply(&dead(1, 11)).is_empty());
        assert!(s.apply(&join(1, 11)).is_empty());
        assert!(s.apply(&leave(1, 11, false)).is_empty());
        assert_eq!(s, before);
        // A repeated Alive of the live incarnation changes nothing.
        assert!(s.apply(&alive(1, 12)).is_empty());
        assert_eq!(s, before);
        // A dead incarnation does not come back to life.
        s.apply(&dead(1, 12));
        let before = s.clone();
        s.apply(&alive(1, 12));
        assert_eq!(s, before);
    }

    #[test]
    fn last_member_leaving_clears_recovery_state() {
        let mut s = state(&[alive(1, 11), alive(2, 22), join(1, 11), join(2, 22), dead(1, 11)]);
        assert!(fs1(&s).recovering);
        s.apply(&dead(2, 22));
        let v = fs1(&s);
        assert!(v.members.is_empty() && v.unrecovered.is_empty() && v.departed.is_empty() && !v.recovering);
        assert_eq!(v.generation, 4);
        s.apply(&alive(2, 23));
        s.apply(&join(2, 23));
        assert_eq!(slots(&s), vec![(2, 1)]);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn command() -> impl Strategy<Value = Command> {
            let node = 1u32..5;
            let inc = 1u64..4;
            let ls = prop_oneof![Just("a".to_string()), Just("b".to_string())];
            prop_oneof![
                (node.clone(), inc.clone()).prop_map(|(node, incarnation)| Command::Alive { node, incarnation }),
                (node.clone(), inc.clone()).prop_map(|(node, incarnation)| Command::Dead { node, incarnation }),
                (ls.clone(), node.clone(), inc.clone()).prop_map(|(ls, node, incarnation)| Command::Join {
                    ls,
                    node,
                    incarnation
                }),
                (ls.clone(), node.clone(), inc.clone(), any::<bool>())
                    .prop_map(|(ls, node, incarnation, clean)| Command::Leave { ls, node, incarnation, clean }),
                (ls, 0u64..12, node).prop_map(|(ls, generation, node)| Command::RecoveryDone { ls, generation, node }),
            ]
        }

        proptest! {
            #[test]
            fn random_commands_never_panic_and_slots_stay_unique(cmds in proptest::collection::vec(command(), 0..80)) {
                let mut s = ClusterState::new();
                for c in &cmds {
                    let before = s.clone();
                    let changed = s.apply(c);
                    for (name, v) in &s.lockspaces {
                        let slots: BTreeSet<u32> = v.members.values().copied().collect();
                        prop_assert_eq!(slots.len(), v.members.len(), "two members share a slot");
                        prop_assert!(slots.iter().all(|s| *s >= 1));
                        prop_assert!(slots.is_disjoint(&v.unrecovered), "member holds an unrecovered slot");
                        prop_assert!(v.done.iter().all(|n| v.members.contains_key(n)));
                        prop_assert!(v.members.keys().all(|n| s.nodes.get(n).is_some_and(|l| l.alive)));
                        let old_gen = before.lockspaces.get(name).map_or(0, |v| v.generation);
                        prop_assert_eq!(changed.contains(name), v.generation != old_gen);
                        if v.members.is_empty() {
                            prop_assert!(!v.recovering && v.unrecovered.is_empty() && v.departed.is_empty());
                        }
                    }
                }
            }
        }
    }
}
