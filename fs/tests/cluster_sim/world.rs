//! The simulated cluster: per node a real [`Filesystem`] whose lock module
//! ([`SimLocks`]) drives the glock state machine ([`Glocks`]) over the lockspace core
//! ([`Lockspace`]), all in one thread, with a virtual clock and a seeded choice of
//! which message travels next. Demotes (sync, invalidate) run the node's real glops.
//!
//! One operation runs at a time. When it waits for a lock, [`Sim::run_until`] moves
//! the world (messages between lockspaces, ASTs and BASTs into the glocks, demote work
//! on the nodes that must give locks back, timers when nothing else can move) until
//! the lock is granted; a world that stops moving first is a deadlock and fails the
//! run.
//!
//! Crashes follow lock_dlm's order: the node's unflushed writes are cut
//! ([`SharedDisk::crash`]) and its memory dropped; the survivors enter a new
//! lockspace view with their glocks blocked (BLOCK_LOCKS), lock recovery runs until
//! every survivor reports it recovered, then the lowest survivor takes the dead node's
//! journal glock (EX, TRY|NOEXP), replays the journal with [`replay_journal`] (the
//! function the cluster mount's recovery calls), drops its cached metadata
//! ([`Filesystem::forget_metadata`]) and releases the glock; then locks are unblocked.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Weak};

use concord_fs::cluster::glock_of;
use concord_fs::format::{Superblock, LOCKPROTO_DLM};
use concord_fs::glock::{
    bast_mode, dlm_resource_name, glock_mode, lockd_flags, lockd_mode, AstResult, DlmFlags, GlFlags, GlState,
    GlockError, GlockName, GlockOps, GlockType, Glocks, HolderFlags, HolderId, Poll, Tunables,
};
use concord_fs::lock::{LocalDirectory, LockHold, LockMode, LockModule, LockName};
use concord_fs::{read_superblock, replay_all, replay_journal, Filesystem, FsError, MountOptions};
use concord_journal::BlockDevice;
use concord_lockd::core::{Event, LkId, LockRequest, Lockspace, Message, Mode, NodeId, Status};
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::disk::SharedDisk;

/// Steps one wait may take before the run is declared stuck.
const MAX_STEPS: usize = 200_000;

fn state_of(mode: LockMode) -> GlState {
    match mode {
        LockMode::Shared => GlState::Sh,
        LockMode::Exclusive => GlState::Ex,
    }
}

/// The DLM mode a glock state holds (UN keeps NL).
fn dlm_of(s: GlState) -> Mode {
    match s {
        GlState::Un => Mode::NL,
        GlState::Sh => Mode::PR,
        GlState::Df => Mode::CW,
        GlState::Ex => Mode::EX,
    }
}

/// Demote work for a node's filesystem.
#[derive(Debug, Clone, Copy)]
enum Work {
    Sync(GlockName),
    Inval(GlockName, bool),
}

/// One live node's lock state.
struct Node {
    ls: Lockspace,
    glocks: Glocks,
    lkids: BTreeMap<GlockName, LkId>,
    by_lkid: BTreeMap<LkId, GlockName>,
    results: BTreeMap<HolderId, Result<GlState, GlockError>>,
    prefetched: BTreeSet<HolderId>,
    recovered: u64,
}

impl Node {
    fn new(ls: Lockspace) -> Node {
        Node {
            ls,
            glocks: Glocks::new(Tunables::default()),
            lkids: BTreeMap::new(),
            by_lkid: BTreeMap::new(),
            results: BTreeMap::new(),
            prefetched: BTreeSet::new(),
            recovered: 0,
        }
    }
}

/// Everything the lock layer of the cluster is, behind one mutex (never held while a
/// filesystem runs).
pub struct World {
    pub now: u64,
    rng: SmallRng,
    seed: u64,
    nodes: Vec<Option<Node>>,
    /// Per node: bumped at every crash, so that holds of a dead incarnation do nothing.
    incarnation: Vec<u64>,
    generation: u64,
    since: Vec<u64>,
    links: BTreeMap<(NodeId, NodeId), VecDeque<(u64, Message)>>,
    work: VecDeque<(usize, u64, Work)>,
    /// Per node: syncs of inode and rgrp glocks done that left the whole journal
    /// committed (durable points).
    pub syncs: Vec<u64>,
    /// The first thing that went wrong inside the lock layer.
    pub failure: Option<String>,
    pub dlm_messages: u64,
    pub demotes: u64,
}

impl World {
    fn fail(&mut self, what: String) {
        if self.failure.is_none() {
            self.failure = Some(what);
        }
    }

    fn node(&mut self, n: usize) -> &mut Node {
        // Callers check liveness first: a dead node's locks are never touched.
        self.nodes[n].as_mut().expect("a live node")
    }

    fn alive(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].is_some()).collect()
    }

    /// Carries out everything node `n`'s glocks and lockspace have produced.
    fn drain(&mut self, n: usize) {
        let now = self.now;
        let inc = self.incarnation[n];
        for _ in 0..100_000 {
            let mut moved = false;
            let Some(node) = self.nodes[n].as_mut() else { return };
            let mut failures = Vec::new();
            while let Some(a) = node.glocks.poll_action() {
                moved = true;
                if std::env::var_os("SIM_DEBUG").is_some() {
                    eprintln!("  t={now} node {} glock action {a:?}", n + 1);
                }
                use concord_fs::glock::Action as A;
                match a {
                    A::Dlm { name, req } => {
                        let mode = lockd_mode(req.to);
                        let flags = lockd_flags(req.flags);
                        if req.flags.contains(DlmFlags::CONVERT) {
                            let Some(&lkid) = node.lkids.get(&name) else {
                                failures.push(format!("node {}: conversion of {name} lockd does not know", n + 1));
                                continue;
                            };
                            if let Err(e) = node.ls.convert(now, lkid, mode, flags, None) {
                                failures.push(format!("node {}: convert {name}: {e}", n + 1));
                            }
                        } else {
                            if let Some(old) = node.lkids.remove(&name) {
                                node.by_lkid.remove(&old);
                            }
                            let req = LockRequest { name: dlm_resource_name(name), mode, flags, lvb: None };
                            match node.ls.request(now, req) {
                                Ok(lkid) => {
                                    node.lkids.insert(name, lkid);
                                    node.by_lkid.insert(lkid, name);
                                }
                                Err(e) => failures.push(format!("node {}: request {name}: {e}", n + 1)),
                            }
                        }
                    }
                    A::Cancel { name } => {
                        if let Some(&lkid) = node.lkids.get(&name) {
                            // Too late is fine: the AST is on its way.
                            let _ = node.ls.cancel(now, lkid);
                        }
                    }
                    A::Unlock { name } => {
                        if let Some(lkid) = node.lkids.remove(&name) {
                            node.by_lkid.remove(&lkid);
                            if let Err(e) = node.ls.unlock(now, lkid, None) {
                                failures.push(format!("node {}: unlock {name}: {e}", n + 1));
                            }
                        }
                    }
                    A::Sync { name } => self.work.push_back((n, inc, Work::Sync(name))),
                    A::Invalidate { name, metadata } => self.work.push_back((n, inc, Work::Inval(name, metadata))),
                    A::Granted { holder, state } => {
                        if node.prefetched.remove(&holder) {
                            node.glocks.release(holder, now);
                        } else {
                            node.results.insert(holder, Ok(state));
                        }
                    }
                    A::Failed { holder, error } => {
                        if !node.prefetched.remove(&holder) {
                            node.results.insert(holder, Err(error));
                        }
                    }
                }
            }
            while let Some(ev) = node.ls.poll_event() {
                moved = true;
                if std::env::var_os("SIM_DEBUG").is_some() {
                    eprintln!("  t={now} node {} lockd event {ev:?}", n + 1);
                }
                match ev {
                    Event::Ast { lkid, status, mode, .. } => {
                        if status == Status::Unlocked {
                            continue;
                        }
                        let Some(&name) = node.by_lkid.get(&lkid) else { continue };
                        if mode.is_none() {
                            node.lkids.remove(&name);
                            node.by_lkid.remove(&lkid);
                        }
                        let r = match status {
                            Status::Granted => mode.and_then(glock_mode).map_or(AstResult::Error, AstResult::Granted),
                            Status::Again => AstResult::TryFailed,
                            Status::Canceled => AstResult::Cancelled,
                            Status::Deadlock => AstResult::Deadlock,
                            Status::Unlocked => AstResult::Error,
                        };
                        if r == AstResult::Error {
                            failures.push(format!("node {}: DLM error on {name}: {status:?}", n + 1));
                        }
                        node.glocks.handle_ast(name, r, now);
                    }
                    Event::Bast { lkid, mode } => {
                        if let Some(&name) = node.by_lkid.get(&lkid) {
                            node.glocks.handle_bast(name, bast_mode(mode), now);
                        }
                    }
                    Event::Recovered { generation } => node.recovered = generation,
                }
            }
            let from = (n + 1) as NodeId;
            while let Some((to, generation, msg)) = node.ls.poll_transmit() {
                moved = true;
                self.links.entry((from, to)).or_default().push_back((generation, msg));
            }
            for f in failures {
                self.fail(f);
            }
            if !moved {
                return;
            }
        }
        self.fail(format!("node {}: its glocks and lockspace never settle", n + 1));
    }

    fn drain_all(&mut self) {
        for n in 0..self.nodes.len() {
            self.drain(n);
        }
    }

    /// One move of the world.
    fn step(&mut self) -> Step {
        self.drain_all();
        if let Some((n, inc, w)) = self.work.pop_front() {
            return Step::Work(n, inc, w);
        }
        let busy: Vec<(NodeId, NodeId)> = self.links.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
        if !busy.is_empty() {
            let (from, to) = busy[self.rng.gen_range(0..busy.len())];
            // The link was chosen among the non-empty ones.
            let (generation, msg) = self.links.get_mut(&(from, to)).and_then(VecDeque::pop_front).expect("a message");
            self.dlm_messages += 1;
            let now = self.now;
            if let Some(node) = self.nodes[(to - 1) as usize].as_mut() {
                node.ls.handle_message(now, from, generation, msg);
            }
            return Step::Moved;
        }
        let next = self.nodes.iter().flatten().filter_map(|n| n.glocks.next_deadline()).min();
        if let Some(t) = next {
            self.advance(t);
            return Step::Moved;
        }
        Step::Idle
    }

    /// Moves the clock to `t` (never back) and fires every timer due.
    pub fn advance(&mut self, t: u64) {
        self.now = self.now.max(t);
        let now = self.now;
        for node in self.nodes.iter_mut().flatten() {
            if node.glocks.next_deadline().is_some_and(|d| d <= now) {
                node.glocks.handle_timeout(now);
            }
            if node.ls.poll_timeout().is_some_and(|d| d <= now) {
                node.ls.handle_timeout(now);
            }
        }
    }

    fn release(&mut self, n: usize, inc: u64, id: HolderId) {
        if self.incarnation[n] != inc || self.nodes[n].is_none() {
            return;
        }
        let now = self.now;
        let node = self.node(n);
        node.results.remove(&id);
        node.glocks.release(id, now);
        self.drain(n);
    }

    /// Checks every node's glocks and that no two nodes hold incompatible glocks. A
    /// glock whose demote is in progress (its holders gone, none granted until it
    /// ends) counts unless `quiet`: while the world moves, the DLM may grant another
    /// node before this node's glock hears that its conversion down is done.
    pub fn check(&self, quiet: bool) -> Result<(), String> {
        let mut states: BTreeMap<GlockName, Vec<(usize, GlState)>> = BTreeMap::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let Some(node) = node else { continue };
            node.glocks.check_invariants().map_err(|e| format!("node {}: glock invariant: {e}", i + 1))?;
            for name in node.glocks.names() {
                let leaving = node.glocks.flags(name).is_some_and(|f| f.contains(GlFlags::DEMOTE_IN_PROGRESS));
                if leaving && !quiet {
                    continue;
                }
                if let Some(s) = node.glocks.state(name) {
                    states.entry(name).or_default().push((i, s));
                }
            }
        }
        for (name, v) in &states {
            for (a, sa) in v {
                for (b, sb) in v {
                    if a < b && !concord_lockd::core::compatible(dlm_of(*sa), dlm_of(*sb)) {
                        let dump = |i: usize| {
                            let node = self.nodes[i].as_ref().expect("listed live");
                            let res = dlm_resource_name(*name);
                            let locks: Vec<String> = node
                                .ls
                                .dump()
                                .into_iter()
                                .filter(|r| r.name == res)
                                .map(|r| format!("{r:?}"))
                                .collect();
                            format!(
                                "node {}: {}\n    lockd: {}",
                                i + 1,
                                node.glocks.dump(*name, self.now).unwrap_or_default().join(" | "),
                                locks.join("; ")
                            )
                        };
                        return Err(format!(
                            "{name}: node {} holds {} while node {} holds {}\n  {}\n  {}",
                            a + 1,
                            sa.as_str(),
                            b + 1,
                            sb.as_str(),
                            dump(*a),
                            dump(*b)
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Node `n`'s cached state of `name`.
    pub fn state(&self, n: usize, name: GlockName) -> Option<GlState> {
        self.nodes[n].as_ref().and_then(|x| x.glocks.state(name))
    }
}

enum Step {
    Work(usize, u64, Work),
    Moved,
    Idle,
}

/// The world and the filesystems its demotes call.
pub struct Sim {
    pub world: Mutex<World>,
    fs: Mutex<Vec<Weak<Filesystem>>>,
}

impl Sim {
    /// Moves the world until `done` holds or nothing can move; true if `done` held.
    fn run_until(&self, mut done: impl FnMut(&mut World) -> bool) -> bool {
        for _ in 0..MAX_STEPS {
            let step = {
                let mut w = self.world.lock();
                if done(&mut w) {
                    return true;
                }
                w.step()
            };
            match step {
                Step::Work(n, inc, work) => self.do_work(n, inc, work),
                Step::Moved => {}
                Step::Idle => return done(&mut self.world.lock()),
            }
        }
        self.world.lock().fail(format!("the world did not settle in {MAX_STEPS} steps"));
        false
    }

    /// Runs until nothing moves.
    pub fn settle(&self) {
        self.run_until(|_| false);
    }

    fn do_work(&self, n: usize, inc: u64, work: Work) {
        let fs = self.fs.lock()[n].upgrade();
        // A sync commits the whole journal when the glock has anything in it (and then
        // writes back only the glock's blocks); a glock with nothing logged costs no
        // commit, and is no durable point (GFS2 skips the log flush of a clean glock).
        let mut committed = false;
        let r = match (&fs, work) {
            (Some(fs), Work::Sync(name)) => {
                let r = fs.sync(name);
                committed = fs.all_committed();
                r
            }
            (Some(fs), Work::Inval(name, metadata)) => {
                fs.invalidate(name, metadata);
                Ok(())
            }
            (None, _) => Ok(()),
        };
        drop(fs);
        let mut w = self.world.lock();
        if w.incarnation[n] != inc || w.nodes[n].is_none() {
            return;
        }
        w.demotes += 1;
        let now = w.now;
        match (work, r) {
            (Work::Sync(name), Ok(())) => {
                if matches!(name.ty, GlockType::Inode | GlockType::Rgrp) && committed {
                    w.syncs[n] += 1;
                }
                w.node(n).glocks.sync_done(name, now);
            }
            (Work::Sync(name), Err(e)) => w.fail(format!("node {}: sync of {name} failed: {e}", n + 1)),
            (Work::Inval(name, _), _) => w.node(n).glocks.inval_done(name, now),
        }
        w.drain(n);
    }

    /// Asks node `n` for a holder of `name` and waits for its answer.
    fn acquire(&self, n: usize, name: GlockName, state: GlState, flags: HolderFlags) -> Result<HolderId, GlockError> {
        let id = {
            let mut w = self.world.lock();
            if w.nodes[n].is_none() {
                return Err(GlockError::Io);
            }
            let now = w.now;
            let (id, poll) = w.node(n).glocks.acquire(name, state, flags, now);
            w.drain(n);
            match poll {
                Poll::Granted(_) => return Ok(id),
                Poll::Failed(e) => return Err(e),
                Poll::Pending => id,
            }
        };
        let got = self.run_until(|w| w.nodes[n].as_ref().is_none_or(|x| x.results.contains_key(&id)));
        let mut w = self.world.lock();
        let now = w.now;
        let Some(node) = w.nodes[n].as_mut() else { return Err(GlockError::Io) };
        match node.results.remove(&id) {
            Some(Ok(_)) => Ok(id),
            Some(Err(e)) => {
                node.glocks.release(id, now);
                w.drain(n);
                Err(e)
            }
            None => {
                debug_assert!(!got);
                let dump = node.glocks.dump(name, now).unwrap_or_default().join("\n");
                w.fail(format!("node {}: {name} {} never granted (deadlock?)\n{dump}", n + 1, state.as_str()));
                Err(GlockError::Io)
            }
        }
    }
}

/// A held glock; dropping it releases the holder.
struct Holder {
    sim: Arc<Sim>,
    node: usize,
    inc: u64,
    id: HolderId,
    mark: Option<(Arc<Mutex<Vec<(LockName, LockMode)>>>, LockName, LockMode)>,
}

impl Drop for Holder {
    fn drop(&mut self) {
        if let Some((held, name, mode)) = self.mark.take() {
            let mut h = held.lock();
            if let Some(i) = h.iter().rposition(|e| *e == (name, mode)) {
                h.swap_remove(i);
            }
        }
        self.sim.world.lock().release(self.node, self.inc, self.id);
    }
}

/// The filesystem's lock module on a simulated node: as `DlmLocks`, over the world.
pub struct SimLocks {
    sim: Arc<Sim>,
    node: usize,
    inc: u64,
    /// What the running operation holds (one thread runs everything), as DlmLocks's
    /// per-thread record: a lock already held is not asked for again.
    held: Arc<Mutex<Vec<(LockName, LockMode)>>>,
}

impl std::fmt::Debug for SimLocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimLocks(node {})", self.node + 1)
    }
}

impl SimLocks {
    fn holds(&self, name: LockName, mode: LockMode) -> Option<bool> {
        if matches!(name, LockName::Iopen(_)) {
            return None;
        }
        let mut any = None;
        for &(n, m) in self.held.lock().iter() {
            if n == name {
                if m == LockMode::Exclusive || mode == LockMode::Shared {
                    return Some(true);
                }
                any = Some(false);
            }
        }
        any
    }

    fn hold(&self, name: LockName, mode: LockMode, id: HolderId) -> LockHold {
        let mark = if matches!(name, LockName::Iopen(_)) {
            None
        } else {
            self.held.lock().push((name, mode));
            Some((self.held.clone(), name, mode))
        };
        let h = Holder { sim: self.sim.clone(), node: self.node, inc: self.inc, id, mark };
        LockHold::with_guard(name, mode, Box::new(h))
    }

    fn dead(&self) -> bool {
        let w = self.sim.world.lock();
        w.incarnation[self.node] != self.inc || w.nodes[self.node].is_none()
    }
}

fn lock_err(name: LockName, mode: LockMode, e: GlockError) -> FsError {
    FsError::Lock(format!("{} {}: {e}", glock_of(name), state_of(mode).as_str()))
}

impl LockModule for SimLocks {
    fn acquire(&self, name: LockName, mode: LockMode) -> concord_fs::Result<LockHold> {
        match self.holds(name, mode) {
            Some(true) => return Ok(LockHold::new(name, mode)),
            Some(false) => return Err(FsError::Lock(format!("{name:?}: shared to exclusive while held"))),
            None => {}
        }
        if self.dead() {
            return Err(FsError::Withdrawn);
        }
        let flags = match (name, mode) {
            (LockName::Iopen(_), LockMode::Shared) => HolderFlags::EXACT,
            _ => HolderFlags::NONE,
        };
        let id =
            self.sim.acquire(self.node, glock_of(name), state_of(mode), flags).map_err(|e| lock_err(name, mode, e))?;
        Ok(self.hold(name, mode, id))
    }

    fn try_now(&self, name: LockName, mode: LockMode) -> concord_fs::Result<Option<LockHold>> {
        match self.holds(name, mode) {
            Some(true) => return Ok(Some(LockHold::new(name, mode))),
            Some(false) => return Ok(None),
            None => {}
        }
        if self.dead() {
            return Err(FsError::Withdrawn);
        }
        let id = {
            let mut w = self.sim.world.lock();
            let id = w.node(self.node).glocks.try_cached(glock_of(name), state_of(mode));
            w.drain(self.node);
            id
        };
        Ok(id.map(|id| self.hold(name, mode, id)))
    }

    fn try_acquire(&self, name: LockName, mode: LockMode) -> concord_fs::Result<Option<LockHold>> {
        if self.holds(name, mode).is_some() {
            return Ok(None);
        }
        if self.dead() {
            return Err(FsError::Withdrawn);
        }
        let flags = if matches!(name, LockName::Iopen(_)) { HolderFlags::TRY_1CB } else { HolderFlags::TRY };
        match self.sim.acquire(self.node, glock_of(name), state_of(mode), flags) {
            Ok(id) => Ok(Some(self.hold(name, mode, id))),
            Err(GlockError::TryAgain) => Ok(None),
            Err(e) => Err(lock_err(name, mode, e)),
        }
    }

    fn prefetch(&self, name: LockName, mode: LockMode) {
        if self.holds(name, mode).is_some() || self.dead() {
            return;
        }
        let mut w = self.sim.world.lock();
        let now = w.now;
        let node = w.node(self.node);
        let (id, poll) = node.glocks.acquire(glock_of(name), state_of(mode), HolderFlags::NONE, now);
        match poll {
            Poll::Granted(_) | Poll::Failed(_) => node.glocks.release(id, now),
            Poll::Pending => {
                node.prefetched.insert(id);
            }
        }
        w.drain(self.node);
    }

    /// As a real node's: new inodes take numbers whose lock directory is this node
    /// (nodes numbered from 1 over the live ones), which makes creates retry for a
    /// prefetched glock not granted yet.
    fn local_directory(&self) -> Option<LocalDirectory> {
        let w = self.sim.world.lock();
        let members = (0..w.nodes.len()).filter(|&i| w.nodes[i].is_some()).map(|i| i as u32 + 1).collect();
        Some(LocalDirectory::new(self.node as u32 + 1, members))
    }

    fn has_waiters(&self, name: LockName) -> bool {
        let w = self.sim.world.lock();
        w.nodes[self.node].as_ref().is_some_and(|x| x.glocks.has_waiters(glock_of(name)))
    }

    fn uncache(&self, name: LockName) {
        if !self.evict(name) {
            return;
        }
        let g = glock_of(name);
        let n = self.node;
        self.sim.run_until(|w| matches!(w.state(n, g), None | Some(GlState::Un)));
    }

    fn uncache_soon(&self, name: LockName) {
        self.evict(name);
    }

    fn proto(&self) -> &'static str {
        LOCKPROTO_DLM
    }

    fn is_cluster(&self) -> bool {
        true
    }
}

impl SimLocks {
    fn evict(&self, name: LockName) -> bool {
        if self.dead() {
            return false;
        }
        let mut w = self.sim.world.lock();
        let now = w.now;
        let done = w.node(self.node).glocks.evict(glock_of(name), now);
        w.drain(self.node);
        done
    }
}

/// The cluster: N nodes over one shared disk.
pub struct Cluster {
    pub sim: Arc<Sim>,
    pub disk: Arc<SharedDisk>,
    pub fs: Vec<Option<Arc<Filesystem>>>,
    journal: Vec<Option<HolderId>>,
    pub sb: Superblock,
    /// Journal recoveries that replayed something.
    pub replays: u64,
}

fn journal_glock(jid: usize) -> GlockName {
    GlockName { ty: GlockType::Journal, number: jid as u64 }
}

impl Cluster {
    /// Starts `n` nodes on `image` in lockspace generation 1 and mounts them in order
    /// (node 1 first, replaying every journal).
    pub fn start(image: Vec<u8>, n: usize, seed: u64) -> Result<Cluster, String> {
        let disk = SharedDisk::new(image, n);
        let members: Vec<NodeId> = (1..=n as NodeId).collect();
        let nodes = (0..n)
            .map(|i| {
                let id = (i + 1) as NodeId;
                Some(Node::new(Lockspace::new(
                    "sim",
                    id,
                    members.clone(),
                    seed.wrapping_mul(31).wrapping_add(i as u64),
                )))
            })
            .collect();
        let world = World {
            now: 0,
            rng: SmallRng::seed_from_u64(seed ^ 0x5eed),
            seed,
            nodes,
            incarnation: vec![0; n],
            generation: 1,
            since: vec![1; n],
            links: BTreeMap::new(),
            work: VecDeque::new(),
            syncs: vec![0; n],
            failure: None,
            dlm_messages: 0,
            demotes: 0,
        };
        let sim = Arc::new(Sim { world: Mutex::new(world), fs: Mutex::new((0..n).map(|_| Weak::new()).collect()) });
        let sb = read_superblock(disk.view(0).as_ref()).map_err(|e| e.to_string())?;
        let mut c = Cluster { sim, disk, fs: vec![None; n], journal: vec![None; n], sb, replays: 0 };
        for i in 0..n {
            c.mount(i, i == 0)?;
        }
        Ok(c)
    }

    pub fn n(&self) -> usize {
        self.fs.len()
    }

    pub fn alive(&self) -> Vec<usize> {
        (0..self.n()).filter(|i| self.fs[*i].is_some()).collect()
    }

    /// The first failure inside the lock layer, if any.
    pub fn failure(&self) -> Option<String> {
        self.sim.world.lock().failure.clone()
    }

    fn mount(&mut self, i: usize, first: bool) -> Result<(), String> {
        let dev: Arc<dyn BlockDevice> = self.disk.view(i);
        let hold = self
            .sim
            .acquire(i, journal_glock(i), GlState::Ex, HolderFlags::NOEXP)
            .map_err(|e| format!("node {}: journal glock: {e}", i + 1))?;
        self.journal[i] = Some(hold);
        if first {
            replay_all(dev.as_ref(), &self.sb).map_err(|e| format!("replay at first mount: {e}"))?;
        } else {
            replay_journal(dev.as_ref(), &self.sb, i as u32).map_err(|e| format!("replay own journal: {e}"))?;
        }
        let inc = self.sim.world.lock().incarnation[i];
        let locks = Arc::new(SimLocks { sim: self.sim.clone(), node: i, inc, held: Default::default() });
        let opts = MountOptions { cluster: true, jid: i as u32, ..Default::default() };
        let fs =
            Arc::new(Filesystem::mount_with(dev, &opts, locks).map_err(|e| format!("node {}: mount: {e}", i + 1))?);
        fs.stop_background_commits();
        fs.spread_allocation(i as u32, self.sb.journals);
        self.sim.fs.lock()[i] = Arc::downgrade(&fs);
        self.fs[i] = Some(fs);
        self.sim.settle();
        Ok(())
    }

    /// Enters a new lockspace view on every live node (with `joining` new in it), with
    /// glocks blocked until lock recovery is done everywhere. Returns the generation.
    fn new_view(&mut self, joining: Option<usize>) -> Result<u64, String> {
        let g = {
            let mut w = self.sim.world.lock();
            w.generation += 1;
            let g = w.generation;
            if let Some(j) = joining {
                w.since[j] = g;
            }
            let alive: Vec<usize> =
                (0..w.nodes.len()).filter(|i| w.nodes[*i].is_some() || Some(*i) == joining).collect();
            let members: Vec<(NodeId, u64)> = alive.iter().map(|i| ((*i + 1) as NodeId, w.since[*i])).collect();
            let now = w.now;
            for i in alive {
                if Some(i) == joining {
                    let seed = w.seed.wrapping_mul(31).wrapping_add(g * 1000 + i as u64);
                    w.nodes[i] =
                        Some(Node::new(Lockspace::new_in_view("sim", (i + 1) as NodeId, g, members.clone(), seed)));
                } else {
                    let node = w.node(i);
                    node.ls.begin_recovery(now, g, members.clone());
                    node.glocks.set_blocked(true, now);
                }
                w.drain(i);
            }
            g
        };
        let ok = self.sim.run_until(|w| w.nodes.iter().flatten().all(|n| n.recovered >= g));
        if !ok {
            return Err(format!("lock recovery of generation {g} did not finish"));
        }
        Ok(g)
    }

    fn unblock(&self) {
        {
            let mut w = self.sim.world.lock();
            let now = w.now;
            for i in w.alive() {
                w.node(i).glocks.set_blocked(false, now);
                w.drain(i);
            }
        }
        self.sim.settle();
    }

    /// Node `i` crashes: a power cut of its unflushed writes (`tear`: the last kept one
    /// torn), its memory gone; then lock recovery and the replay of its journal by the
    /// lowest survivor. Returns the block writes lost.
    pub fn crash(&mut self, i: usize, rng: &mut SmallRng, tear: bool) -> Result<usize, String> {
        let lost = self.disk.crash(i, rng, tear);
        {
            let mut w = self.sim.world.lock();
            w.nodes[i] = None;
            w.incarnation[i] += 1;
            let id = (i + 1) as NodeId;
            w.links.retain(|(from, to), _| *from != id && *to != id);
            w.work.retain(|(n, _, _)| *n != i);
        }
        self.sim.fs.lock()[i] = Weak::new();
        self.journal[i] = None;
        drop(self.fs[i].take());
        if self.alive().is_empty() {
            return Ok(lost);
        }
        self.new_view(None)?;
        let r = self.alive()[0];
        let hold = self
            .sim
            .acquire(r, journal_glock(i), GlState::Ex, HolderFlags::TRY | HolderFlags::NOEXP)
            .map_err(|e| format!("node {}: journal {i} glock for recovery: {e}", r + 1))?;
        let dev: Arc<dyn BlockDevice> = self.disk.view(r);
        let replayed = replay_journal(dev.as_ref(), &self.sb, i as u32);
        if let Some(fs) = &self.fs[r] {
            fs.forget_metadata();
        }
        {
            let mut w = self.sim.world.lock();
            let inc = w.incarnation[r];
            w.release(r, inc, hold);
        }
        match replayed {
            Ok(true) => self.replays += 1,
            Ok(false) => {}
            Err(e) => return Err(format!("node {}: recovery of journal {i}: {e}", r + 1)),
        }
        self.unblock();
        Ok(lost)
    }

    /// Node `i`, crashed, joins again and mounts.
    pub fn remount(&mut self, i: usize) -> Result<(), String> {
        self.disk.revive(i);
        let first = self.alive().is_empty();
        self.new_view(Some(i))?;
        self.unblock();
        self.mount(i, first)
    }

    /// Checks the lock layer: no failure inside it, glock invariants, no conflict;
    /// then lets the world settle and checks again, every cached glock counted.
    pub fn check_locks(&self) -> Result<(), String> {
        {
            let w = self.sim.world.lock();
            if let Some(f) = &w.failure {
                return Err(format!("lock layer: {f}"));
            }
            w.check(false)?;
        }
        self.sim.settle();
        let w = self.sim.world.lock();
        if let Some(f) = &w.failure {
            return Err(format!("lock layer: {f}"));
        }
        w.check(true)
    }

    /// Moves time on by `ms` (timers fire: minimum hold times, idle resources).
    pub fn tick(&self, ms: u64) {
        {
            let mut w = self.sim.world.lock();
            let t = w.now + ms;
            w.advance(t);
        }
        self.sim.settle();
    }
}
