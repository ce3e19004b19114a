//! Deterministic simulation of a lockspace cluster (STYLE.md 12): N nodes in one
//! process, a seeded scheduler, a virtual clock and a network with random delays
//! that keeps each directed link FIFO (as one QUIC stream per peer pair does).
//! Random lock traffic (requests, conversions, unlocks, cancels with random modes and
//! flags; users that answer BASTs) runs on a few resource names, with an idle time
//! short enough that resources are dropped and re-mastered all the time.
//!
//! After every step the checker verifies, from the users' point of view (the ASTs
//! and BASTs they received, not the core's internals):
//! * no two incompatible modes are relied on at once on a resource, across nodes
//!   (a lock is relied on in its granted mode; during a conversion in the weaker of
//!   the two modes; not at all while a request or unlock is in flight);
//! * every AST answers exactly one accepted operation, with a status that operation
//!   allows; BASTs reach granted locks only, for a mode that conflicts;
//! * a lock granted with VALBLK in CW, PR, PW or EX reads the value written by the
//!   last PW/EX holder's down-conversion or unlock (zeros once the resource was
//!   dropped), and a grant read always returns some LVB;
//! * each master's queues are sound (granted modes compatible, nothing grantable
//!   left waiting) and at most one node masters a name.
//!
//! Half of the seeds also crash nodes and bring them back: every change is a new
//! view that each live member enters after its own random delay (so views
//! overlap and recoveries are cut short by the next view), messages already sent
//! by a crashed node are still delivered, and the checks above hold throughout,
//! with the DLM's recovery rules for the LVB (a read flagged VALNOTVALID may
//! return anything; a resource whose master crashed or whose writer's master
//! departed may come back with zeros) and for PR<->CW conversions, and
//! conversions with ALTPR/ALTCW, whose master departed (their failure may report
//! the mode recovery settled). Every node must report `Recovered` for the last
//! generation it entered, in increasing order.
//!
//! At the end every request is cancelled and every lock unlocked: all ASTs must
//! arrive, and after the idle time no node keeps any resource or directory entry.
//!
//! A failure names the seed; `CONCORD_SIM_SEED=n cargo test -p concord-lockd sim`
//! replays it.

use std::collections::{BTreeMap, VecDeque};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::types::{lvb_op, LvbOp};
use super::{
    compatible, Event, Flags, LkId, LockError, LockRequest, Lockspace, LockspaceConfig, Lvb, Message, Mode, NodeId,
    SbFlags, Status, LVB_LEN,
};

/// Shape of one simulated run.
#[derive(Clone, Debug)]
pub(crate) struct SimConfig {
    pub nodes: u32,
    pub names: usize,
    pub steps: usize,
    pub idle_ms: u64,
    pub max_delay_ms: u64,
    pub max_locks_per_node: usize,
    /// Chance per step that a live node crashes (or its client leaves uncleanly):
    /// it leaves the view and the survivors recover its locks.
    pub crash_prob: f64,
    /// Chance per step that a crashed node comes back in a new view.
    pub restart_prob: f64,
    /// Largest delay before a member enters a new view.
    pub max_view_delay_ms: u64,
}

impl SimConfig {
    /// A configuration drawn from the seed: 3 to 5 nodes, 1 to 4 names.
    pub fn from_seed(seed: u64) -> SimConfig {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x5eed_c0f1_9000_0000);
        SimConfig {
            nodes: rng.gen_range(3..=5),
            names: rng.gen_range(1..=4),
            steps: std::env::var("CONCORD_SIM_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(400),
            idle_ms: rng.gen_range(5..=60),
            max_delay_ms: rng.gen_range(0..=20),
            max_locks_per_node: 4,
            // Half of the seeds see crashes, restarts and overlapping views.
            crash_prob: if rng.gen_bool(0.5) { rng.gen_range(0.002..0.02) } else { 0.0 },
            restart_prob: rng.gen_range(0.005..0.03),
            max_view_delay_ms: rng.gen_range(0..=30),
        }
    }
}

/// Counters of one run, to see that the traffic did something.
#[derive(Clone, Debug, Default)]
pub(crate) struct SimStats {
    pub asts: u64,
    pub granted: u64,
    pub basts: u64,
    pub messages: u64,
    pub lvb_reads_checked: u64,
    pub removals: u64,
    /// Requests bounced by a node that no longer masters the resource.
    pub not_master: u64,
    /// Nodes crashed.
    pub crashes: u64,
    /// Lock recoveries completed (per node).
    pub recoveries: u64,
    /// Grants that came with VALNOTVALID.
    pub valnotvalid: u64,
}

#[derive(Clone, Debug)]
enum UserOp {
    Request { mode: Mode, flags: Flags },
    Convert { from: Mode, to: Mode, flags: Flags },
    Unlock,
}

/// A lock as its user knows it.
#[derive(Clone, Debug)]
struct UserLock {
    name: usize,
    granted: Option<Mode>,
    pending: Option<UserOp>,
    cancel_called: bool,
    /// The user's LVB buffer.
    lvb: Lvb,
    /// A BAST arrived since the last grant.
    bast: Option<Mode>,
    /// The operation in progress went through a lock recovery.
    crossed: bool,
    /// A conversion in progress that writes the LVB: (value, previous latest). A
    /// down-conversion held during recovery can be cancelled, and then wrote
    /// nothing.
    undo: Option<(Lvb, Lvb)>,
}

fn compat_set(m: Mode) -> Vec<Mode> {
    Mode::ALL.into_iter().filter(|o| compatible(m, *o)).collect()
}

/// The strongest mode compatible with everything any of `modes` is compatible with.
fn weakest_common(modes: &[Mode]) -> Mode {
    let mut need: Vec<Mode> = Vec::new();
    for m in modes {
        for c in compat_set(*m) {
            if !need.contains(&c) {
                need.push(c);
            }
        }
    }
    [Mode::EX, Mode::PW, Mode::PR, Mode::CW, Mode::CR, Mode::NL]
        .into_iter()
        .find(|m| need.iter().all(|n| compatible(*m, *n)))
        .unwrap_or(Mode::NL)
}

fn alt_mode(to: Mode, flags: Flags) -> Option<Mode> {
    if to != Mode::PR && flags.contains(Flags::ALTPR) {
        Some(Mode::PR)
    } else if to != Mode::CW && flags.contains(Flags::ALTCW) {
        Some(Mode::CW)
    } else {
        None
    }
}

impl UserLock {
    /// The mode the user may rely on now.
    fn relied(&self) -> Option<Mode> {
        let g = self.granted?;
        match &self.pending {
            None => Some(g),
            Some(UserOp::Request { .. }) | Some(UserOp::Unlock) => None,
            Some(UserOp::Convert { to, flags, .. }) => {
                let mut modes = vec![g, *to];
                modes.extend(alt_mode(*to, *flags));
                // An up-conversion: still g. A down-conversion: already the lower
                // mode. Otherwise (PR<->CW) what both allow.
                if modes.iter().all(|m| compat_set(*m).iter().all(|c| compatible(g, *c) || !compatible(*m, *c))) {
                    Some(g)
                } else {
                    Some(weakest_common(&modes))
                }
            }
        }
    }
}

struct Sim {
    rng: SmallRng,
    cfg: SimConfig,
    seed: u64,
    now: u64,
    nodes: Vec<Lockspace>,
    /// Per directed link (from, to): FIFO of (deliver_at, message).
    links: BTreeMap<(NodeId, NodeId), VecDeque<(u64, u64, Message)>>,
    users: Vec<BTreeMap<LkId, UserLock>>,
    names: Vec<Vec<u8>>,
    /// Last value written by a PW/EX holder, per name.
    latest_lvb: Vec<Lvb>,
    /// A PW->EX conversion with ALTPR/ALTCW and VALBLK in flight: if granted in
    /// the alternate mode it is a conversion down from PW, which writes (as in
    /// Linux, the LVB rule follows the mode actually granted). Until its AST,
    /// readers may see either value.
    alt_write: Vec<Option<Lvb>>,
    lvb_counter: u64,
    stats: SimStats,
    /// The node (index) mastering each name.
    mastered: Vec<Option<usize>>,
    /// The master of the name crashed since its last LVB write: a read may also
    /// return zeros.
    lvb_uncertain: Vec<bool>,
    /// Whether each node is up (a crashed node's lockspace is gone).
    alive: Vec<bool>,
    /// The current view.
    generation: u64,
    members: Vec<NodeId>,
    /// Views not yet entered: (when, node index, generation, members).
    views: Vec<(u64, usize, u64, Vec<(NodeId, u64)>)>,
    /// Last generation each node recovered.
    recovered: Vec<u64>,
    /// Generation in which each node last joined.
    since: Vec<u64>,
    /// Print every step (CONCORD_SIM_TRACE=1), to read a failing seed.
    trace: bool,
}

impl Sim {
    fn new(seed: u64, cfg: SimConfig) -> Sim {
        let members: Vec<NodeId> = (1..=cfg.nodes).collect();
        let nodes = members
            .iter()
            .map(|&id| {
                Lockspace::new("sim", id, members.clone(), seed.wrapping_mul(31).wrapping_add(u64::from(id)))
                    .with_config(LockspaceConfig { idle_ms: cfg.idle_ms })
            })
            .collect();
        let names: Vec<Vec<u8>> = (0..cfg.names).map(|i| format!("res{i}").into_bytes()).collect();
        Sim {
            rng: SmallRng::seed_from_u64(seed),
            seed,
            now: 0,
            nodes,
            links: BTreeMap::new(),
            users: vec![BTreeMap::new(); cfg.nodes as usize],
            latest_lvb: vec![[0; LVB_LEN]; names.len()],
            alt_write: vec![None; names.len()],
            mastered: vec![None; names.len()],
            lvb_uncertain: vec![false; names.len()],
            alive: vec![true; cfg.nodes as usize],
            generation: 1,
            members: members.clone(),
            views: Vec::new(),
            recovered: vec![1; cfg.nodes as usize],
            since: vec![1; cfg.nodes as usize],
            names,
            lvb_counter: 0,
            stats: SimStats::default(),
            trace: std::env::var_os("CONCORD_SIM_TRACE").is_some(),
            cfg,
        }
    }

    fn fail(&self, what: String) -> ! {
        if self.trace {
            for (i, n) in self.nodes.iter().enumerate() {
                if self.alive[i] {
                    eprintln!(
                        "node {} g{} recovering={} dump {:?}",
                        i + 1,
                        n.generation(),
                        n.is_recovering(),
                        n.dump()
                    );
                }
            }
        }
        panic!("simulation seed {} at t={}ms: {what}", self.seed, self.now);
    }

    fn next_lvb(&mut self, node: NodeId) -> Lvb {
        self.lvb_counter += 1;
        let mut v = [0u8; LVB_LEN];
        v[..4].copy_from_slice(&node.to_le_bytes());
        v[4..12].copy_from_slice(&self.lvb_counter.to_le_bytes());
        v
    }

    /// Moves a node's outputs to the network and its events to the checker.
    fn drain(&mut self, idx: usize) {
        let from = self.nodes[idx].our_node();
        while let Some((to, g, m)) = self.nodes[idx].poll_transmit() {
            self.stats.messages += 1;
            if matches!(m, Message::NotMaster { .. }) {
                self.stats.not_master += 1;
            }
            let delay = self.rng.gen_range(0..=self.cfg.max_delay_ms);
            let link = self.links.entry((from, to)).or_default();
            let at = (self.now + delay).max(link.back().map_or(0, |(t, _, _)| *t));
            link.push_back((at, g, m));
        }
        while let Some(e) = self.nodes[idx].poll_event() {
            self.on_event(idx, e);
        }
    }

    fn on_event(&mut self, idx: usize, e: Event) {
        if self.trace {
            eprintln!("t={} node {} event {e:?}", self.now, idx + 1);
        }
        match e {
            Event::Recovered { generation } => {
                self.stats.recoveries += 1;
                let current = self.nodes[idx].generation();
                if generation != current || generation <= self.recovered[idx] {
                    self.fail(format!(
                        "node {} recovered generation {generation} (current {current}, last recovered {})",
                        idx + 1,
                        self.recovered[idx]
                    ));
                }
                self.recovered[idx] = generation;
            }
            Event::Ast { lkid, status, flags, mode, lvb } => {
                self.stats.asts += 1;
                let Some(mut lock) = self.users[idx].remove(&lkid) else {
                    self.fail(format!("node {} AST for unknown lock {lkid}", idx + 1));
                };
                let Some(op) = lock.pending.take() else {
                    self.fail(format!("node {} second AST for {lkid}: {status:?}", idx + 1));
                };
                let ok = match (&op, status) {
                    (UserOp::Request { mode: rq, flags: f }, Status::Granted) => {
                        mode == Some(*rq) && !flags.contains(SbFlags::ALTMODE)
                            || (flags.contains(SbFlags::ALTMODE) && mode == alt_mode(*rq, *f))
                    }
                    (UserOp::Request { flags: f, .. }, Status::Again) => f.contains(Flags::NOQUEUE) && mode.is_none(),
                    (UserOp::Request { .. }, Status::Canceled) => lock.cancel_called && mode.is_none(),
                    (UserOp::Convert { to, flags: f, .. }, Status::Granted) => {
                        mode == Some(*to) && !flags.contains(SbFlags::ALTMODE)
                            || (flags.contains(SbFlags::ALTMODE) && mode == alt_mode(*to, *f))
                    }
                    // A PR<->CW or ALTPR/ALTCW conversion whose master departed may
                    // come back in the mode recovery settled (see recovery.rs).
                    (UserOp::Convert { from, flags: f, .. }, Status::Again) => {
                        f.contains(Flags::NOQUEUE) && (mode == Some(*from) || lock.crossed && mode.is_some())
                    }
                    (UserOp::Convert { from, flags: f, .. }, Status::Deadlock) => {
                        !f.contains(Flags::NOQUEUE) && (mode == Some(*from) || lock.crossed && mode.is_some())
                    }
                    (UserOp::Convert { from, .. }, Status::Canceled) => {
                        lock.cancel_called && (mode == Some(*from) || lock.crossed && mode.is_some())
                    }
                    (UserOp::Unlock, Status::Unlocked) => mode.is_none(),
                    _ => false,
                };
                if !ok {
                    self.fail(format!(
                        "node {} AST {status:?} mode {mode:?} flags {flags} does not answer {op:?} (cancel {})",
                        idx + 1,
                        lock.cancel_called
                    ));
                }
                if status == Status::Granted {
                    self.stats.granted += 1;
                    let (prev, f) = match &op {
                        UserOp::Request { flags, .. } => (None, *flags),
                        UserOp::Convert { from, flags, .. } => (Some(*from), *flags),
                        UserOp::Unlock => unreachable!("checked above"),
                    };
                    let new = mode.unwrap_or(Mode::NL);
                    if f.contains(Flags::VALBLK) {
                        let Some(v) = lvb else {
                            self.fail(format!("node {} VALBLK grant without LVB", idx + 1));
                        };
                        if flags.contains(SbFlags::VALNOTVALID) {
                            self.stats.valnotvalid += 1;
                        } else if lvb_op(prev, new) == LvbOp::Read && new >= Mode::CW {
                            self.stats.lvb_reads_checked += 1;
                            let zeros = self.lvb_uncertain[lock.name] && v == [0; LVB_LEN];
                            if v != self.latest_lvb[lock.name] && Some(v) != self.alt_write[lock.name] && !zeros {
                                self.fail(format!(
                                    "node {} read LVB {:?} on {:?}->{new}, last written {:?}",
                                    idx + 1,
                                    &v[..12],
                                    prev,
                                    &self.latest_lvb[lock.name][..12]
                                ));
                            }
                        }
                        lock.lvb = v;
                    } else if lvb.is_some() {
                        self.fail("LVB in the AST of a grant without VALBLK".into());
                    }
                    if let (Some(Mode::PW), true, Some(m)) = (prev, f.contains(Flags::VALBLK), mode) {
                        // Only the alternate-mode grant writes unannounced; a
                        // plain write was counted when it was issued.
                        if flags.contains(SbFlags::ALTMODE) && lvb_op(prev, m) == LvbOp::Write {
                            self.latest_lvb[lock.name] = lock.lvb;
                            self.lvb_uncertain[lock.name] = false;
                        }
                    }
                    lock.granted = mode;
                    lock.bast = None;
                }
                if matches!(op, UserOp::Convert { from: Mode::PW, .. }) {
                    self.alt_write[lock.name] = None;
                }
                // A write whose master departed is lost with it (the resource
                // then comes back invalid, or anew with zeros).
                if lock.crossed && (matches!(op, UserOp::Unlock) || lock.undo.is_some()) {
                    self.lvb_uncertain[lock.name] = true;
                }
                if status != Status::Granted && matches!(op, UserOp::Convert { .. }) {
                    lock.granted = mode;
                    if let Some((w, prev)) = lock.undo {
                        if self.latest_lvb[lock.name] == w {
                            self.latest_lvb[lock.name] = prev;
                        }
                    }
                }
                lock.undo = None;
                lock.cancel_called = false;
                lock.crossed = false;
                if mode.is_some() {
                    self.users[idx].insert(lkid, lock);
                }
            }
            Event::Bast { lkid, mode } => {
                self.stats.basts += 1;
                let Some(lock) = self.users[idx].get_mut(&lkid) else {
                    self.fail(format!("node {} BAST for unknown lock {lkid}", idx + 1));
                };
                let Some(g) = lock.granted else {
                    self.fail(format!("node {} BAST for ungranted lock {lkid}", idx + 1));
                };
                if compatible(g, mode) {
                    self.fail(format!("node {} BAST {mode} to a lock granted {g}", idx + 1));
                }
                lock.bast = Some(mode);
            }
        }
    }

    fn check(&mut self) {
        // Users: relied-on modes pairwise compatible per name.
        let mut relied: Vec<Vec<(usize, LkId, Mode)>> = vec![Vec::new(); self.names.len()];
        for (i, locks) in self.users.iter().enumerate() {
            for (id, l) in locks {
                if let Some(m) = l.relied() {
                    relied[l.name].push((i + 1, *id, m));
                }
            }
        }
        for (n, list) in relied.iter().enumerate() {
            for (a, x) in list.iter().enumerate() {
                for y in &list[a + 1..] {
                    if !compatible(x.2, y.2) {
                        self.fail(format!(
                            "res{n}: node {} lock {} relies on {} while node {} lock {} relies on {}",
                            x.0, x.1, x.2, y.0, y.1, y.2
                        ));
                    }
                }
            }
        }
        // Masters.
        for (i, n) in self.nodes.iter().enumerate() {
            if self.alive[i] {
                n.check_invariants();
            }
        }
        for (i, name) in self.names.iter().enumerate() {
            let masters: Vec<usize> =
                (0..self.nodes.len()).filter(|k| self.alive[*k] && self.nodes[*k].is_master(name)).collect();
            if masters.len() > 1 {
                self.fail(format!("res{i} has masters {masters:?}"));
            }
            match self.mastered[i] {
                // Dropped by its master when idle: its LVB is gone.
                Some(m) if masters.is_empty() && self.alive[m] && !self.nodes[m].is_recovering() => {
                    if self.trace {
                        eprintln!("t={} res{i} dropped by node {}: LVB gone", self.now, m + 1);
                    }
                    self.stats.removals += 1;
                    self.latest_lvb[i] = [0; LVB_LEN];
                }
                // Its master crashed: a new master rebuilds the LVB from a
                // holder above CR (it must be the latest), marks it invalid, or
                // (nobody holding it any more) starts anew with zeros.
                // (Or a recovery dropped the resource its master was rebuilding.)
                Some(_) if masters.is_empty() => self.lvb_uncertain[i] = true,
                _ => {}
            }
            self.mastered[i] = masters.first().copied();
        }
    }

    fn random_flags(&mut self, convert: bool, mode: Mode) -> Flags {
        let r = &mut self.rng;
        let mut f = Flags::empty();
        for (p, flag) in [
            (0.25, Flags::NOQUEUE),
            (0.5, Flags::VALBLK),
            (0.1, Flags::HEADQUE),
            (0.1, Flags::NOORDER),
            (0.05, Flags::NOEXP),
        ] {
            if r.gen_bool(p) {
                f |= flag;
            }
        }
        if r.gen_bool(0.2) {
            f |= if r.gen_bool(0.5) { Flags::ALTPR } else { Flags::ALTCW };
        }
        if f.contains(Flags::NOQUEUE) && r.gen_bool(0.4) {
            f |= Flags::NOQUEUEBAST;
        }
        if convert {
            if r.gen_bool(0.2) {
                f |= Flags::QUECVT;
            }
        } else if mode == Mode::NL && !f.contains(Flags::NOQUEUE) && r.gen_bool(0.2) {
            f |= Flags::EXPEDITE;
        }
        // Now and then something invalid, which must be refused without an AST.
        if r.gen_bool(0.02) {
            f |= Flags::CONVERT;
        }
        f
    }

    fn random_mode(&mut self) -> Mode {
        Mode::ALL[self.rng.gen_range(0..Mode::ALL.len())]
    }

    fn user_step(&mut self, idx: usize) {
        let now = self.now;
        let node = (idx + 1) as NodeId;
        let idle: Vec<LkId> = self.users[idx].iter().filter(|(_, l)| l.pending.is_none()).map(|(id, _)| *id).collect();
        let pending: Vec<LkId> =
            self.users[idx].iter().filter(|(_, l)| l.pending.is_some()).map(|(id, _)| *id).collect();
        let basted: Vec<LkId> = idle.iter().copied().filter(|id| self.users[idx][id].bast.is_some()).collect();
        let roll = self.rng.gen_range(0..100);
        if !basted.is_empty() && roll < 60 {
            // Answer a BAST as GFS2 does: give the lock up or go down to NL.
            let id = basted[self.rng.gen_range(0..basted.len())];
            if self.rng.gen_bool(0.5) {
                self.do_unlock(idx, id);
            } else {
                let flags = if self.rng.gen_bool(0.5) { Flags::VALBLK } else { Flags::empty() };
                self.do_convert(idx, id, Mode::NL, flags);
            }
        } else if roll < 35 && self.users[idx].len() < self.cfg.max_locks_per_node {
            let name = self.rng.gen_range(0..self.names.len());
            let mode = self.random_mode();
            let flags = self.random_flags(false, mode);
            let lvb = self.rng.gen_bool(0.3).then(|| self.next_lvb(node));
            let req = LockRequest { name: self.names[name].clone(), mode, flags, lvb };
            if self.trace {
                eprintln!("t={now} node {node} request {req:?}");
            }
            match self.nodes[idx].request(now, req) {
                Ok(id) => {
                    if self.trace {
                        eprintln!("t={now} node {node} requested {id}");
                    }
                    let prev = self.users[idx].insert(
                        id,
                        UserLock {
                            name,
                            granted: None,
                            pending: Some(UserOp::Request { mode, flags }),
                            cancel_called: false,
                            lvb: lvb.unwrap_or([0; LVB_LEN]),
                            bast: None,
                            crossed: false,
                            undo: None,
                        },
                    );
                    if prev.is_some() {
                        self.fail(format!("lock id {id} reused while live"));
                    }
                }
                Err(LockError::InvalidFlags(_)) => {}
                Err(e) => self.fail(format!("request refused: {e}")),
            }
        } else if roll < 60 && !idle.is_empty() {
            let id = idle[self.rng.gen_range(0..idle.len())];
            let to = self.random_mode();
            let flags = self.random_flags(true, to);
            self.do_convert(idx, id, to, flags);
        } else if roll < 75 && !idle.is_empty() {
            let id = idle[self.rng.gen_range(0..idle.len())];
            self.do_unlock(idx, id);
        } else if roll < 90 && !pending.is_empty() {
            let id = pending[self.rng.gen_range(0..pending.len())];
            self.do_cancel(idx, id);
        } else if roll < 92 {
            // Calls on a lock that does not exist are refused.
            let bogus = LkId(self.rng.gen());
            if self.users[idx].contains_key(&bogus) {
                return;
            }
            let r = self.nodes[idx].unlock(now, bogus, None);
            if !matches!(r, Err(LockError::UnknownLock(_))) {
                self.fail(format!("unlock of a bogus lock gave {r:?}"));
            }
        }
    }

    fn do_convert(&mut self, idx: usize, id: LkId, to: Mode, flags: Flags) {
        let node = (idx + 1) as NodeId;
        let from = self.users[idx][&id].granted.unwrap_or(Mode::NL);
        let lvb = (flags.contains(Flags::VALBLK) && self.rng.gen_bool(0.7)).then(|| self.next_lvb(node));
        if self.trace {
            eprintln!("t={} node {node} convert {id} {from}->{to} {flags} {lvb:?}", self.now);
        }
        match self.nodes[idx].convert(self.now, id, to, flags, lvb) {
            Ok(()) => {
                let name = self.users[idx][&id].name;
                let lost = self.write_may_be_lost(idx, name);
                let lock = self.users[idx].get_mut(&id).expect("listed above");
                if let Some(v) = lvb {
                    lock.lvb = v;
                }
                if flags.contains(Flags::VALBLK) && lvb_op(Some(from), to) == LvbOp::Write {
                    lock.undo = Some((lock.lvb, self.latest_lvb[name]));
                    self.latest_lvb[name] = lock.lvb;
                    self.lvb_uncertain[name] = lost;
                }
                if let (Mode::PW, true, Some(alt)) = (from, flags.contains(Flags::VALBLK), alt_mode(to, flags)) {
                    if lvb_op(Some(from), to) == LvbOp::Read && lvb_op(Some(from), alt) == LvbOp::Write {
                        self.alt_write[name] = Some(lock.lvb);
                    }
                }
                lock.pending = Some(UserOp::Convert { from, to, flags });
                lock.crossed = self.nodes[idx].is_recovering();
            }
            Err(LockError::InvalidFlags(_)) => {}
            Err(e) => self.fail(format!("convert of idle granted lock refused: {e}")),
        }
    }

    /// Whether an LVB write node `idx` issues now on `name` may be lost: it is
    /// held for after a recovery, or no live node masters the name (its master
    /// crashed, and the writer has not entered the new view yet: if it crashes
    /// too, nothing ever tells the checker that the write went nowhere).
    fn write_may_be_lost(&self, idx: usize, name: usize) -> bool {
        self.nodes[idx].is_recovering() || self.mastered[name].is_none()
    }

    fn do_unlock(&mut self, idx: usize, id: LkId) {
        let node = (idx + 1) as NodeId;
        let lvb = self.rng.gen_bool(0.5).then(|| self.next_lvb(node));
        if self.trace {
            eprintln!("t={} node {node} unlock {id} {lvb:?}", self.now);
        }
        match self.nodes[idx].unlock(self.now, id, lvb) {
            Ok(()) => {
                let lost = self.write_may_be_lost(idx, self.users[idx][&id].name);
                let lock = self.users[idx].get_mut(&id).expect("listed above");
                if let (Some(v), Some(Mode::PW | Mode::EX)) = (lvb, lock.granted) {
                    self.latest_lvb[lock.name] = v;
                    self.lvb_uncertain[lock.name] = lost;
                }
                lock.pending = Some(UserOp::Unlock);
                lock.crossed = self.nodes[idx].is_recovering();
            }
            Err(e) => self.fail(format!("unlock of idle granted lock refused: {e}")),
        }
    }

    fn do_cancel(&mut self, idx: usize, id: LkId) {
        if self.trace {
            eprintln!("t={} node {} cancel {id}", self.now, idx + 1);
        }
        let r = self.nodes[idx].cancel(self.now, id);
        // The AST may be delivered at once (local master): take events first.
        let is_unlock = matches!(self.users[idx][&id].pending, Some(UserOp::Unlock));
        match r {
            Ok(()) if !is_unlock => {
                if let Some(l) = self.users[idx].get_mut(&id) {
                    l.cancel_called = true;
                }
            }
            Err(LockError::Busy(_)) if is_unlock => {}
            other => self.fail(format!("cancel of a pending lock gave {other:?}")),
        }
    }

    fn deliver_random(&mut self) -> bool {
        let ready: Vec<(NodeId, NodeId)> = self
            .links
            .iter()
            .filter(|(_, q)| q.front().is_some_and(|(t, _, _)| *t <= self.now))
            .map(|(k, _)| *k)
            .collect();
        if ready.is_empty() {
            return false;
        }
        let (from, to) = ready[self.rng.gen_range(0..ready.len())];
        let (_, g, m) = self.links.get_mut(&(from, to)).and_then(|q| q.pop_front()).expect("ready link has a message");
        let idx = (to - 1) as usize;
        if !self.alive[idx] {
            return true;
        }
        if self.trace {
            eprintln!("t={} deliver {from}->{to} g{g} {m:?}", self.now);
        }
        self.nodes[idx].handle_message(self.now, from, g, m);
        self.drain(idx);
        true
    }

    fn fire_timers(&mut self) {
        for idx in 0..self.nodes.len() {
            if self.alive[idx] && self.nodes[idx].poll_timeout().is_some_and(|t| t <= self.now) {
                if self.trace {
                    eprintln!("t={} node {} timeout", self.now, idx + 1);
                }
                self.nodes[idx].handle_timeout(self.now);
                self.drain(idx);
            }
        }
    }

    fn in_flight(&self) -> bool {
        self.links.values().any(|q| !q.is_empty()) || !self.views.is_empty()
    }

    /// A live node crashes: its lockspace and its users' locks are gone; what it
    /// sent is still on the way.
    fn crash(&mut self, idx: usize) {
        if self.trace {
            eprintln!("t={} node {} crashes", self.now, idx + 1);
        }
        self.stats.crashes += 1;
        self.alive[idx] = false;
        self.users[idx].clear();
        self.views.retain(|v| v.1 != idx);
        let node = (idx + 1) as NodeId;
        self.links.retain(|(_, to), _| *to != node);
    }

    /// A new view of the live nodes (plus `joining`, which starts in it); the
    /// others enter it after a random delay each.
    fn new_view(&mut self, joining: Option<usize>) {
        self.generation += 1;
        let g = self.generation;
        if let Some(j) = joining {
            self.alive[j] = true;
            self.since[j] = g;
        }
        self.members = (0..self.nodes.len()).filter(|i| self.alive[*i]).map(|i| (i + 1) as NodeId).collect();
        let view: Vec<(NodeId, u64)> = self.members.iter().map(|m| (*m, self.since[(*m - 1) as usize])).collect();
        if self.trace {
            eprintln!("t={} view g{g} {:?}", self.now, self.members);
        }
        for idx in 0..self.nodes.len() {
            if !self.alive[idx] {
                continue;
            }
            if Some(idx) == joining {
                let seed = self.seed.wrapping_mul(31).wrapping_add(g * 1000 + idx as u64);
                self.nodes[idx] = Lockspace::new_in_view("sim", (idx + 1) as NodeId, g, view.clone(), seed)
                    .with_config(LockspaceConfig { idle_ms: self.cfg.idle_ms });
                self.recovered[idx] = 0;
                self.drain(idx);
            } else {
                let at = self.now + self.rng.gen_range(0..=self.cfg.max_view_delay_ms);
                self.views.push((at, idx, g, view.clone()));
            }
        }
    }

    /// Members enter the views whose time has come.
    fn fire_views(&mut self) {
        let now = self.now;
        let mut due: Vec<(u64, usize, u64, Vec<(NodeId, u64)>)> = Vec::new();
        self.views.retain(|v| {
            if v.0 <= now {
                due.push(v.clone());
                false
            } else {
                true
            }
        });
        due.sort_by_key(|v| v.2);
        for (_, idx, g, members) in due {
            if self.trace {
                eprintln!("t={now} node {} enters g{g}", idx + 1);
            }
            self.nodes[idx].begin_recovery(now, g, members);
            for l in self.users[idx].values_mut() {
                if l.pending.is_some() {
                    l.crossed = true;
                }
            }
            self.drain(idx);
        }
    }

    fn membership_step(&mut self) {
        if self.cfg.crash_prob == 0.0 {
            return;
        }
        let live: Vec<usize> = (0..self.nodes.len()).filter(|i| self.alive[*i]).collect();
        if live.len() > 1 && self.rng.gen_bool(self.cfg.crash_prob) {
            let idx = live[self.rng.gen_range(0..live.len())];
            self.crash(idx);
            self.new_view(None);
        } else if live.len() < self.nodes.len() && self.rng.gen_bool(self.cfg.restart_prob) {
            let dead: Vec<usize> = (0..self.nodes.len()).filter(|i| !self.alive[*i]).collect();
            let idx = dead[self.rng.gen_range(0..dead.len())];
            self.new_view(Some(idx));
        }
    }

    /// Delivers everything, advancing the clock as needed.
    fn settle(&mut self) {
        let mut guard = 0;
        while self.in_flight() {
            self.fire_views();
            if !self.deliver_random() {
                let next = self.links.values().filter_map(|q| q.front().map(|(t, _, _)| *t)).min();
                let next_view = self.views.iter().map(|v| v.0).min();
                let next = next.into_iter().chain(next_view).min().unwrap_or(self.now);
                self.now = self.now.max(next);
            }
            self.check();
            guard += 1;
            if guard > 1_000_000 {
                self.fail("messages never stop".into());
            }
        }
    }

    fn run(mut self) -> SimStats {
        for _ in 0..self.cfg.steps {
            self.now += self.rng.gen_range(0..=3);
            self.membership_step();
            self.fire_views();
            self.fire_timers();
            self.check();
            let idx = self.rng.gen_range(0..self.nodes.len());
            if !self.alive[idx] {
                self.deliver_random();
            } else if self.rng.gen_bool(0.4) {
                self.user_step(idx);
                self.drain(idx);
            } else {
                self.deliver_random();
            }
            self.check();
        }
        // Liveness: release every granted lock nobody is converting, without
        // cancelling anything, until nothing more happens. Every request and
        // conversion must then have completed: a conversion deadlock is refused
        // with -EDEADLK when it would form (see resource.rs), never left waiting.
        self.settle();
        for (i, n) in self.nodes.iter().enumerate() {
            if self.alive[i] && n.is_recovering() {
                self.fail(format!("node {} never finished recovering generation {}", i + 1, n.generation()));
            }
        }
        for _round in 0..200 {
            let mut released = false;
            for idx in 0..self.nodes.len() {
                if !self.alive[idx] {
                    continue;
                }
                let idle: Vec<LkId> =
                    self.users[idx].iter().filter(|(_, l)| l.pending.is_none()).map(|(id, _)| *id).collect();
                for id in idle {
                    self.do_unlock(idx, id);
                    self.drain(idx);
                    released = true;
                }
            }
            self.settle();
            if !released {
                break;
            }
        }
        let mut stuck_names = vec![(false, false); self.names.len()];
        for locks in &self.users {
            for l in locks.values() {
                match l.pending {
                    Some(UserOp::Convert { .. }) => stuck_names[l.name].1 = true,
                    Some(_) => stuck_names[l.name].0 = true,
                    None => self.fail(format!("lock left granted after release: {l:?}")),
                }
            }
        }
        for (i, (requests, conversions)) in stuck_names.iter().enumerate() {
            if *requests && !*conversions {
                self.fail(format!("res{i}: requests never granted with nothing held"));
            }
            if *conversions {
                self.fail(format!("res{i}: conversions never granted with nothing else held"));
            }
        }
        // Wind down: cancel what waits, unlock what is held, until nothing is left.
        for _round in 0..50 {
            let all_empty = self.users.iter().all(|u| u.is_empty());
            if all_empty {
                break;
            }
            for idx in 0..self.nodes.len() {
                if !self.alive[idx] {
                    continue;
                }
                let ids: Vec<LkId> = self.users[idx].keys().copied().collect();
                for id in ids {
                    let Some(l) = self.users[idx].get(&id) else { continue };
                    match (&l.pending, l.cancel_called) {
                        (None, _) => self.do_unlock(idx, id),
                        (Some(UserOp::Unlock), _) | (Some(_), true) => {}
                        (Some(_), false) => self.do_cancel(idx, id),
                    }
                    self.drain(idx);
                }
            }
            self.settle();
        }
        for (i, u) in self.users.iter().enumerate() {
            if !u.is_empty() {
                self.fail(format!("node {} still has locks after wind-down: {u:?}", i + 1));
            }
        }
        // After the idle time every resource and directory entry is gone.
        for _ in 0..3 {
            self.now += self.cfg.idle_ms + 1;
            self.fire_timers();
            self.settle();
        }
        for n in self.nodes.iter().enumerate().filter(|(i, _)| self.alive[*i]).map(|(_, n)| n) {
            if n.resource_count() != 0 || n.directory_len() != 0 || n.lock_count() != 0 {
                self.fail(format!(
                    "node {} keeps {} resources, {} directory entries, {} locks",
                    n.our_node(),
                    n.resource_count(),
                    n.directory_len(),
                    n.lock_count()
                ));
            }
        }
        self.stats
    }
}

/// Runs one seed; panics (naming the seed) on any violation.
pub(crate) fn run_seed(seed: u64) -> SimStats {
    Sim::new(seed, SimConfig::from_seed(seed)).run()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weakest_common_mode() {
        assert_eq!(weakest_common(&[Mode::PR, Mode::CW]), Mode::CR);
        assert_eq!(weakest_common(&[Mode::EX]), Mode::EX);
        assert_eq!(weakest_common(&[Mode::EX, Mode::NL]), Mode::NL);
    }

    /// Thousands of seeds of random traffic with invariant checks after every step.
    /// `CONCORD_SIM_SEED=n` replays one seed; `CONCORD_SIM_SEEDS=n` runs n seeds
    /// from `CONCORD_SIM_FIRST_SEED` (default 0); `CONCORD_SIM_STEPS` sets the
    /// steps per seed (default 400); `CONCORD_SIM_TRACE=1` prints every step.
    #[test]
    fn simulation_random_traffic_keeps_dlm_invariants() {
        if let Some(seed) = std::env::var("CONCORD_SIM_SEED").ok().and_then(|s| s.parse().ok()) {
            let stats = run_seed(seed);
            eprintln!("seed {seed}: {stats:?}");
            return;
        }
        let seeds: u64 = std::env::var("CONCORD_SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(4000);
        let first: u64 = std::env::var("CONCORD_SIM_FIRST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
        let mut total = SimStats::default();
        for seed in first..first + seeds {
            let s = run_seed(seed);
            total.asts += s.asts;
            total.granted += s.granted;
            total.basts += s.basts;
            total.messages += s.messages;
            total.lvb_reads_checked += s.lvb_reads_checked;
            total.removals += s.removals;
            total.not_master += s.not_master;
            total.crashes += s.crashes;
            total.recoveries += s.recoveries;
            total.valnotvalid += s.valnotvalid;
        }
        eprintln!("{seeds} seeds: {total:?}");
        assert!(total.granted > seeds * 10, "too little traffic: {total:?}");
        assert!(total.basts > 0 && total.lvb_reads_checked > 0 && total.removals > 0);
        assert!(total.not_master > 0, "no stale master was ever hit: {total:?}");
        assert!(total.crashes > seeds / 4 && total.recoveries > total.crashes, "too few crashes: {total:?}");
        assert!(total.valnotvalid > 0, "no LVB was ever invalidated by recovery: {total:?}");
    }
}

/// Random operation sequences, with garbage messages from peers mixed in, never
/// panic and never break a node's own invariants (STYLE.md 10 and 13).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::super::harness::Cluster;
    use super::*;

    const STATUSES: [Status; 5] =
        [Status::Granted, Status::Again, Status::Unlocked, Status::Canceled, Status::Deadlock];

    fn garbage(kind: u8, name: Vec<u8>, lkid: LkId, mode: Mode, bits: u32, x: u64) -> Message {
        let lvb = matches!(x % 2, 0).then_some([x as u8; LVB_LEN]);
        let node = (x % 5) as NodeId;
        match kind % 10 {
            0 => Message::Lookup { name },
            1 => Message::LookupReply { name, master: node },
            2 => Message::Request { name, lkid, mode, flags: Flags(bits), lvb },
            3 => Message::Convert { name, lkid, mode, flags: Flags(bits), lvb },
            4 => Message::Unlock { name, lkid, lvb },
            5 => Message::Cancel { name, lkid },
            6 => Message::NotMaster { name, lkid },
            7 => Message::Ast {
                lkid,
                status: STATUSES[(x % 5) as usize],
                mode: (!matches!(x % 3, 0)).then_some(mode),
                sb_flags: SbFlags(bits as u8),
                lvb,
            },
            8 => Message::Bast { lkid, mode },
            _ => Message::Remove { name },
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]
        #[test]
        fn random_operations_and_garbage_never_panic(
            ops in prop::collection::vec(any::<(u8, u8, u8, u8, u32, u64)>(), 0..300)
        ) {
            let mut c = Cluster::new(3, LockspaceConfig { idle_ms: 20 });
            let mut ids: Vec<LkId> = Vec::new();
            for (kind, node, a, b, bits, x) in ops {
                let n = NodeId::from(node % 3) + 1;
                let mode = Mode::ALL[usize::from(a % 6)];
                // Mostly known flag bits, sometimes anything.
                let flags = Flags(if matches!(x % 7, 0) { bits } else { bits & 0x8001_3c1d });
                let pick = if ids.is_empty() || matches!(x % 11, 0) {
                    LkId(x)
                } else {
                    ids[(x as usize) % ids.len()]
                };
                let name = match b % 8 {
                    6 => Vec::new(),
                    7 => vec![b'x'; 65 + usize::from(b % 3)],
                    k => format!("n{}", k % 4).into_bytes(),
                };
                let now = c.now;
                match kind % 10 {
                    0 | 1 => {
                        let req = LockRequest { name: name.clone(), mode, flags, lvb: None };
                        if let Ok(id) = c.node(n).request(now, req) {
                            ids.push(id);
                        }
                    }
                    2 => { let _ = c.node(n).convert(now, pick, mode, flags, None); }
                    3 => { let _ = c.node(n).unlock(now, pick, matches!(x % 2, 0).then_some([1; LVB_LEN])); }
                    4 => { let _ = c.node(n).cancel(now, pick); }
                    5 | 6 => { c.deliver_one(); }
                    7 => c.advance(u64::from(b % 32)),
                    8 => {
                        let from = NodeId::from(a % 5);
                        let m = garbage(b, name, pick, mode, flags.0, x);
                        c.node(n).handle_message(now, from, 1, m);
                    }
                    _ => c.run(),
                }
                c.collect();
                for node in &c.nodes {
                    node.check_invariants();
                }
            }
            c.run();
            c.events.clear();
        }
    }
}
