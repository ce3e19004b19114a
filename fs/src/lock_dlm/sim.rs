//! A deterministic simulation for the golden files: N nodes, each a [`LockDlm`] with
//! a toy filesystem (a set of pending journal recoveries), over a fake lockspace
//! (membership views with generations and slots, recover_prep / recover_slot /
//! recover_done delivered as lockd does) and a fake DLM holding control_lock and
//! mounted_lock (grant and convert queues, NOQUEUE, LVB read on grant and
//! up-conversion with VALBLK, written on a down-conversion from EX with VALBLK,
//! locking suspended during lock recovery). One shared "disk" records which journals
//! need replay.
//!
//! Every input a node gets is printed (`n1 <- ...`), then every action it emits
//! (`n1 -> ...`, `n1 log: ...`). After each command the simulation settles: inputs
//! are delivered round-robin, one per node per round, then due timers fire; time moves
//! only with `advance`. Invariants are checked after every command and panic:
//! * at most one node is in first-mount recovery;
//! * a settled node that is mounted and not blocked sees no journal needing replay;
//! * nobody replays the journal of a live mounted node; a non-first mount never
//!   starts with its own journal dirty.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use super::{
    Action, AstResult, ControlLvb, DlmOp, DlmRequest, Flags, LkFlags, LockDlm, Lvb, Mode, NondiskLock, RecoveryResult,
    LVB_LEN,
};

type NodeId = u32;

fn compatible(a: Mode, b: Mode) -> bool {
    matches!((a, b), (Mode::NL, _) | (_, Mode::NL) | (Mode::PR, Mode::PR))
}

struct Waiter {
    node: NodeId,
    mode: Mode,
    flags: LkFlags,
}

struct Resource {
    lvb: Lvb,
    granted: BTreeMap<NodeId, Mode>,
    /// Conversions and new requests waiting, FIFO.
    waiting: VecDeque<Waiter>,
}

/// The fake DLM: two resources, one lock per node on each.
struct FakeDlm {
    res: [Resource; 2],
    /// Lock recovery in progress: requests wait in `deferred`.
    blocked: bool,
    deferred: VecDeque<(NodeId, DlmRequest)>,
    /// Test switch: ASTs are kept in `held` until released.
    hold: bool,
    held: VecDeque<(NodeId, NondiskLock, AstResult)>,
}

type Ast = (NodeId, NondiskLock, AstResult);

impl FakeDlm {
    fn new() -> FakeDlm {
        let r = || Resource { lvb: [0; LVB_LEN], granted: BTreeMap::new(), waiting: VecDeque::new() };
        FakeDlm { res: [r(), r()], blocked: false, deferred: VecDeque::new(), hold: false, held: VecDeque::new() }
    }

    fn grantable(r: &Resource, node: NodeId, mode: Mode) -> bool {
        r.granted.iter().filter(|(n, _)| **n != node).all(|(_, m)| compatible(*m, mode))
    }

    fn request(&mut self, node: NodeId, req: DlmRequest) -> Vec<Ast> {
        if self.blocked && req.op != DlmOp::Unlock {
            self.deferred.push_back((node, req));
            return Vec::new();
        }
        let lock = req.lock;
        let r = &mut self.res[lock.index()];
        let mut out = Vec::new();
        let has = r.granted.contains_key(&node) || r.waiting.iter().any(|w| w.node == node);
        match req.op {
            DlmOp::Lock { mode, flags } => {
                if has {
                    out.push((node, lock, AstResult::Error("-EINVAL lock exists".into())));
                } else if r.waiting.is_empty() && Self::grantable(r, node, mode) {
                    r.granted.insert(node, mode);
                    let lvb = flags.contains(LkFlags::VALBLK).then_some(r.lvb);
                    out.push((node, lock, AstResult::Granted { lvb }));
                } else if flags.contains(LkFlags::NOQUEUE) {
                    out.push((node, lock, AstResult::TryFailed));
                } else {
                    r.waiting.push_back(Waiter { node, mode, flags });
                }
            }
            DlmOp::Convert { mode, flags, lvb } => match r.granted.get(&node).copied() {
                None => out.push((node, lock, AstResult::Error("-EINVAL no lock".into()))),
                Some(old) if Self::grantable(r, node, mode) => {
                    let mut read = None;
                    if flags.contains(LkFlags::VALBLK) {
                        if old == Mode::EX && mode < old {
                            if let Some(l) = lvb {
                                r.lvb = l;
                            }
                        } else if mode > old {
                            read = Some(r.lvb);
                        }
                    }
                    r.granted.insert(node, mode);
                    out.push((node, lock, AstResult::Granted { lvb: read }));
                }
                Some(_) if flags.contains(LkFlags::NOQUEUE) => out.push((node, lock, AstResult::TryFailed)),
                Some(_) => r.waiting.push_back(Waiter { node, mode, flags }),
            },
            DlmOp::Unlock => {
                r.granted.remove(&node);
                r.waiting.retain(|w| w.node != node);
            }
        }
        out.extend(self.grant_waiting(lock));
        out
    }

    fn grant_waiting(&mut self, lock: NondiskLock) -> Vec<Ast> {
        let r = &mut self.res[lock.index()];
        let mut out = Vec::new();
        while let Some(w) = r.waiting.front() {
            if !Self::grantable(r, w.node, w.mode) {
                break;
            }
            let w = r.waiting.pop_front().unwrap_or_else(|| unreachable!("front exists"));
            let old = r.granted.insert(w.node, w.mode);
            let up = old.is_none_or(|o| w.mode > o);
            let lvb = (w.flags.contains(LkFlags::VALBLK) && up).then_some(r.lvb);
            out.push((w.node, lock, AstResult::Granted { lvb }));
        }
        out
    }

    /// A departed node's locks are purged (the LVB is kept as it was).
    fn purge(&mut self, node: NodeId) {
        for r in &mut self.res {
            r.granted.remove(&node);
            r.waiting.retain(|w| w.node != node);
        }
        self.deferred.retain(|(n, _)| *n != node);
        self.held.retain(|(n, _, _)| *n != node);
    }

    /// Lock recovery over: waiting requests are granted where they can be, then the
    /// requests made meanwhile are applied in order.
    fn unblock(&mut self) -> Vec<Ast> {
        self.blocked = false;
        let mut out = Vec::new();
        for lock in NondiskLock::ALL {
            out.extend(self.grant_waiting(lock));
        }
        while let Some((node, req)) = self.deferred.pop_front() {
            out.extend(self.request(node, req));
        }
        out
    }

    fn dump(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for lock in NondiskLock::ALL {
            let r = &self.res[lock.index()];
            let granted: Vec<String> = r.granted.iter().map(|(n, m)| format!("n{n}:{m}")).collect();
            let waiting: Vec<String> = r.waiting.iter().map(|w| format!("n{}:{}", w.node, w.mode)).collect();
            let mut l = format!("{lock} granted=[{}] waiting=[{}]", granted.join(","), waiting.join(","));
            if lock == NondiskLock::Control {
                l.push_str(&format!(" lvb=({})", ControlLvb::from_bytes(r.lvb)));
            }
            lines.push(l);
        }
        if self.blocked {
            lines.push(format!("locking suspended, {} requests deferred", self.deferred.len()));
        }
        if !self.held.is_empty() {
            lines.push(format!("{} ASTs held", self.held.len()));
        }
        lines
    }
}

enum Input {
    Prep,
    Slot(u32),
    Done {
        generation: u64,
        slots: Vec<u32>,
    },
    /// lockd's Joined reply, given to the core as its first recover_done.
    Joined {
        generation: u64,
    },
    Ast(NondiskLock, AstResult),
}

impl fmt::Display for Input {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Input::Prep => f.write_str("prep"),
            Input::Slot(s) => write!(f, "slot {s}"),
            Input::Done { generation, slots } => write!(f, "done gen={generation} slots={}", join(slots)),
            Input::Joined { generation } => write!(f, "joined gen={generation}"),
            Input::Ast(lock, r) => write!(f, "ast {lock} {r}"),
        }
    }
}

fn join(v: &[u32]) -> String {
    let s: Vec<String> = v.iter().map(u32::to_string).collect();
    if s.is_empty() {
        "-".into()
    } else {
        s.join(",")
    }
}

struct Node {
    core: LockDlm,
    slot: u32,
    inbox: VecDeque<Input>,
    paused: bool,
    /// MountReady seen: Some(first).
    mounted: Option<bool>,
    /// Journals the node's filesystem was asked to recover and has not answered.
    recovering: BTreeSet<u32>,
}

/// A membership change whose lock recovery is not finished.
struct View {
    generation: u64,
    departed: Vec<u32>,
    joining: Vec<NodeId>,
}

pub(crate) struct Sim {
    now_ms: u64,
    journals: u32,
    /// Journals that need replay (their writer died, or dirty from the start).
    dirty: BTreeSet<u32>,
    generation: u64,
    nodes: BTreeMap<NodeId, Node>,
    dlm: FakeDlm,
    view: Option<View>,
    out: Vec<String>,
}

impl Sim {
    pub(crate) fn new() -> Sim {
        Sim {
            now_ms: 0,
            journals: 3,
            dirty: BTreeSet::new(),
            generation: 0,
            nodes: BTreeMap::new(),
            dlm: FakeDlm::new(),
            view: None,
            out: Vec::new(),
        }
    }

    /// The lines printed since the last call.
    pub(crate) fn take_output(&mut self) -> String {
        std::mem::take(&mut self.out).join("\n")
    }

    fn say(&mut self, line: String) {
        self.out.push(line);
    }

    // ---- commands ----

    pub(crate) fn disk(&mut self, journals: u32, dirty: &[u32]) {
        self.journals = journals;
        self.dirty = dirty.iter().copied().collect();
    }

    /// A node joins the lockspace (a new view); with `stall`, lock recovery stays
    /// in progress until [`Sim::recovery_done`].
    pub(crate) fn join(&mut self, id: NodeId, stall: bool) {
        assert!(!self.nodes.contains_key(&id), "n{id} is already a member");
        let used: BTreeSet<u32> = self.nodes.values().map(|n| n.slot).collect();
        let slot = (1..).find(|s| !used.contains(s)).unwrap_or(1);
        self.say(format!("n{id} joins with slot {slot}"));
        let node = Node {
            core: LockDlm::new(self.journals),
            slot,
            inbox: VecDeque::new(),
            paused: false,
            mounted: None,
            recovering: BTreeSet::new(),
        };
        self.nodes.insert(id, node);
        self.new_view(None, Some(id));
        if !stall {
            self.finish_view();
        }
        self.settle();
    }

    /// A node dies: its locks are purged, its journal needs replay if it had mounted.
    pub(crate) fn kill(&mut self, id: NodeId, stall: bool) {
        let node = self.nodes.remove(&id).unwrap_or_else(|| panic!("no node n{id}"));
        let jid = node.slot - 1;
        if node.mounted.is_some() && jid < self.journals {
            self.dirty.insert(jid);
        }
        self.say(format!("n{id} dies (slot {})", node.slot));
        self.dlm.purge(id);
        self.new_view(Some(node.slot), None);
        if let Some(v) = &mut self.view {
            if v.joining.contains(&id) {
                v.joining.retain(|n| *n != id);
                v.departed.retain(|s| *s != node.slot);
            }
        }
        if !stall {
            self.finish_view();
        }
        self.settle();
    }

    fn new_view(&mut self, departed: Option<u32>, joining: Option<NodeId>) {
        self.generation += 1;
        self.dlm.blocked = true;
        let v = self.view.get_or_insert(View { generation: 0, departed: Vec::new(), joining: Vec::new() });
        v.generation = self.generation;
        v.departed.extend(departed);
        v.joining.extend(joining);
        let joining = v.joining.clone();
        for (id, n) in &mut self.nodes {
            if !joining.contains(id) {
                n.inbox.push_back(Input::Prep);
            }
        }
    }

    /// Lock recovery of the pending view finishes: locking resumes, then members get
    /// recover_slot for each departed slot and recover_done, joiners their Joined.
    pub(crate) fn recovery_done(&mut self) {
        self.finish_view();
        self.settle();
    }

    fn finish_view(&mut self) {
        let Some(view) = self.view.take() else {
            self.say("no lock recovery in progress".into());
            return;
        };
        self.resume_locking();
        let slots: Vec<u32> = {
            let mut s: Vec<u32> = self.nodes.values().map(|n| n.slot).collect();
            s.sort_unstable();
            s
        };
        for (id, n) in &mut self.nodes {
            if view.joining.contains(id) {
                n.inbox.push_back(Input::Joined { generation: view.generation });
            } else {
                n.inbox.extend(view.departed.iter().map(|s| Input::Slot(*s)));
                n.inbox.push_back(Input::Done { generation: view.generation, slots: slots.clone() });
            }
        }
    }

    /// Locking resumes before recover_done is delivered (dlm_recoverd's step 8).
    pub(crate) fn unblock_dlm(&mut self) {
        self.resume_locking();
        self.settle();
    }

    fn resume_locking(&mut self) {
        if self.dlm.blocked {
            let asts = self.dlm.unblock();
            self.route(asts);
        }
    }

    pub(crate) fn mount(&mut self, id: NodeId) {
        self.node(id).core.control_mount();
        self.drain(id);
        self.settle();
    }

    /// The first mounter's filesystem replays every dirty journal, then first_done.
    pub(crate) fn first_done(&mut self, id: NodeId) {
        let dirty: Vec<u32> = self.dirty.iter().copied().collect();
        for j in &dirty {
            self.check_replay(id, *j);
        }
        self.dirty.clear();
        if dirty.is_empty() {
            self.say(format!("n{id} fs: no journal needs replay"));
        } else {
            self.say(format!("n{id} fs: replays journals {}", join(&dirty)));
        }
        // The filesystem reports every replay, as GFS2's recovery does; the core
        // ignores them during first-mount recovery.
        let now = self.now_ms;
        for j in dirty {
            self.say(format!("n{id} <- recovery_result jid={j} success"));
            self.node(id).core.recovery_result(now, j, RecoveryResult::Success);
            self.drain(id);
        }
        self.node(id).core.first_done();
        self.drain(id);
        self.settle();
    }

    /// A node's filesystem finishes a journal recovery.
    pub(crate) fn recovered(&mut self, id: NodeId, jid: u32, gave_up: bool) {
        if !self.node(id).recovering.remove(&jid) {
            self.say(format!("n{id} fs: was not asked to recover journal {jid}"));
        }
        let result = if gave_up {
            self.say(format!("n{id} fs: gives up journal {jid}"));
            RecoveryResult::GaveUp
        } else if self.dirty.contains(&jid) {
            self.check_replay(id, jid);
            self.dirty.remove(&jid);
            self.say(format!("n{id} fs: replays journal {jid}"));
            RecoveryResult::Success
        } else {
            self.say(format!("n{id} fs: journal {jid} is clean"));
            RecoveryResult::Success
        };
        let now = self.now_ms;
        self.say(format!("n{id} <- recovery_result jid={jid} {result}"));
        self.node(id).core.recovery_result(now, jid, result);
        self.drain(id);
        self.settle();
    }

    /// Moves the clock, firing timers in order.
    pub(crate) fn advance(&mut self, ms: u64) {
        let target = self.now_ms + ms;
        while let Some((t, _)) = self.next_timer().filter(|(t, _)| *t <= target) {
            if t > self.now_ms {
                self.now_ms = t;
                self.say(format!("-- t={t}"));
            }
            self.settle();
        }
        if target > self.now_ms {
            self.now_ms = target;
            self.say(format!("-- t={target}"));
        }
    }

    pub(crate) fn pause(&mut self, id: NodeId, paused: bool) {
        self.node(id).paused = paused;
        self.settle();
    }

    /// `hold`: ASTs are kept back from now on. Else the held ASTs are delivered, and
    /// with `keep_holding` the ones they cause are held again.
    pub(crate) fn hold_asts(&mut self, hold: bool, keep_holding: bool) {
        if hold {
            self.dlm.hold = true;
            return;
        }
        self.dlm.hold = false;
        let held: Vec<Ast> = self.dlm.held.drain(..).collect();
        self.route(held);
        self.dlm.hold = keep_holding;
        self.settle();
    }

    /// Writes the control_lock LVB's generation directly (an operator's tool).
    pub(crate) fn set_lvb_generation(&mut self, generation: u32) {
        let mut l = ControlLvb::from_bytes(self.dlm.res[NondiskLock::Control.index()].lvb);
        l.set_generation(generation);
        self.dlm.res[NondiskLock::Control.index()].lvb = l.to_bytes();
        self.say(format!("control_lock lvb=({l})"));
    }

    pub(crate) fn state(&mut self, id: NodeId) {
        let n = self.node(id);
        let c = &n.core;
        let (block, start, mount) = c.generations();
        let flags: Flags = c.flags();
        let jid = c.jid().map_or("-".to_string(), |j| j.to_string());
        let mounted = match n.mounted {
            Some(true) => "first",
            Some(false) => "yes",
            None => "no",
        };
        let submit: Vec<String> = c.recover_submit().iter().map(|(j, g)| format!("{j}@{g}")).collect();
        let result: Vec<String> = c.recover_result().iter().map(|(j, r)| format!("{j}:{r}")).collect();
        let recovering: Vec<u32> = n.recovering.iter().copied().collect();
        let line = format!(
            "n{id} mounted={mounted} jid={jid} flags={} block={block} start={start} mount={mount} lvb=({}) \
             submit=[{}] result=[{}] fs_recovering=[{}]",
            flags.names(),
            c.control_lvb(),
            submit.join(","),
            result.join(","),
            recovering.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
        );
        self.say(line);
    }

    pub(crate) fn dump_dlm(&mut self) {
        let mut lines = self.dlm.dump();
        let dirty: Vec<String> = self.dirty.iter().map(u32::to_string).collect();
        lines.push(format!("dirty journals [{}]", dirty.join(",")));
        self.out.extend(lines);
    }

    // ---- the machinery ----

    fn node(&mut self, id: NodeId) -> &mut Node {
        self.nodes.get_mut(&id).unwrap_or_else(|| panic!("no node n{id}"))
    }

    fn next_timer(&self) -> Option<(u64, NodeId)> {
        let it = self.nodes.iter().filter(|(_, n)| !n.paused);
        it.filter_map(|(id, n)| n.core.next_timeout().map(|t| (t, *id))).min()
    }

    fn route(&mut self, asts: Vec<Ast>) {
        for (id, lock, result) in asts {
            if self.dlm.hold {
                self.dlm.held.push_back((id, lock, result));
            } else if let Some(n) = self.nodes.get_mut(&id) {
                n.inbox.push_back(Input::Ast(lock, result));
            }
        }
    }

    fn deliver(&mut self, id: NodeId, input: Input) {
        self.say(format!("n{id} <- {input}"));
        let now = self.now_ms;
        let slot = self.node(id).slot;
        let c = &mut self.node(id).core;
        match input {
            Input::Prep => c.recover_prep(),
            Input::Slot(s) => c.recover_slot(s),
            Input::Done { generation, slots } => c.recover_done(now, generation, slot, &slots),
            Input::Joined { generation } => c.recover_done(now, generation, slot, &[slot]),
            Input::Ast(lock, r) => c.dlm_ast(now, lock, r),
        }
        self.drain(id);
    }

    /// Carries out a node's actions.
    fn drain(&mut self, id: NodeId) {
        while let Some(a) = self.node(id).core.poll_action() {
            match &a {
                Action::Log { .. } => self.say(format!("n{id} {a}")),
                _ => self.say(format!("n{id} -> {a}")),
            }
            match a {
                Action::Dlm(req) => {
                    let asts = self.dlm.request(id, req);
                    self.route(asts);
                }
                Action::RecoverJournal { jid } => {
                    self.node(id).recovering.insert(jid);
                }
                Action::MountReady { jid, first } => {
                    if !first && self.dirty.contains(&jid) {
                        panic!("invariant: n{id} mounted with jid {jid} while its journal needs replay");
                    }
                    self.node(id).mounted = Some(first);
                }
                Action::MountRefused(_) => self.node(id).mounted = None,
                Action::BlockLocks | Action::UnblockLocks | Action::Wake { .. } | Action::Log { .. } => {}
            }
        }
    }

    /// Delivers inputs and fires due timers until nothing is left to do now.
    fn settle(&mut self) {
        for _ in 0..100_000 {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            let mut progressed = false;
            for id in ids {
                let Some(n) = self.nodes.get_mut(&id) else { continue };
                if n.paused {
                    continue;
                }
                if let Some(input) = n.inbox.pop_front() {
                    self.deliver(id, input);
                    progressed = true;
                }
            }
            if progressed {
                continue;
            }
            match self.next_timer() {
                Some((t, id)) if t <= self.now_ms => {
                    self.say(format!("n{id} <- timeout"));
                    let now = self.now_ms;
                    self.node(id).core.handle_timeout(now);
                    self.drain(id);
                }
                _ => {
                    self.check_invariants();
                    return;
                }
            }
        }
        panic!("the simulation does not settle");
    }

    fn check_replay(&self, replayer: NodeId, jid: u32) {
        for (id, n) in &self.nodes {
            if *id != replayer && n.mounted.is_some() && n.slot - 1 == jid {
                panic!("invariant: n{replayer} replays journal {jid} of live mounted node n{id}");
            }
        }
    }

    fn check_invariants(&self) {
        let firsts: Vec<&NodeId> =
            self.nodes.iter().filter(|(_, n)| n.core.flags().contains(Flags::FIRST_MOUNT)).map(|(id, _)| id).collect();
        assert!(firsts.len() <= 1, "invariant: several first mounters {firsts:?}");
        for (id, n) in &self.nodes {
            let settled = !n.paused && n.inbox.is_empty();
            let f = n.core.flags();
            let working = f.contains(Flags::MOUNT_DONE) && !f.contains(Flags::FIRST_MOUNT) && !n.core.block_locks();
            if settled && n.mounted.is_some() && working && !self.dirty.is_empty() {
                panic!("invariant: n{id} has locks unblocked while journals {:?} need replay", self.dirty);
            }
        }
    }
}
