//! Lock recovery after a membership change (the Linux DLM's `dlm_recoverd`:
//! `dlm_recover_directory`, `dlm_recover_masters`, `dlm_recover_locks`,
//! `dlm_recover_rsbs`, `dlm_recover_grant`), reshaped around generations.
//!
//! Every message carries the generation of its sender's view. When a node enters
//! generation `g` ([`Lockspace::begin_recovery`]) it stops: from then on it drops
//! every message of an older generation and keeps the normal messages of `g`
//! until its recovery is over. Whatever a dropped message would have done is
//! recovered by reconciling each holder's view of its locks with the master's:
//!
//! 1. **Stop and purge.** Masters drop the locks of departed nodes (an LVB a
//!    departed PW/EX holder held becomes invalid). Resources whose master departed
//!    (or whose lookup was in flight) lose their master. Operations in progress to
//!    a departed master end as the DLM ends them (`recover_convert_waiter`): an
//!    unlock or a down-conversion completes at once (the master would have granted
//!    it), a cancelled one completes cancelled, anything else is sent again after
//!    recovery. So does a request sent to a node that no longer mastered the
//!    resource when a surviving master (this node) took it over: its `NotMaster`
//!    is of an older generation and dropped. But a request sent to a live node
//!    while our lookup of the resource was in flight (that node answered
//!    `NotMaster` for another lock, and may have mastered the resource again
//!    since) stays in progress: step 3 reconciles it with the master the
//!    directory names (sent again if that is a new master, which rebuilds from
//!    granted locks only). The directory is cleared.
//! 2. **Directory.** Every member sends a `RecDirEntry` to the new directory node of
//!    each resource it masters, then `RecDirDone` to everyone. A directory node
//!    answers recovery lookups only once it has `RecDirDone` from every member, so
//!    a surviving master is never displaced.
//! 3. **Locks.** For each resource it holds locks on, a holder sends its locks
//!    (`RecLocks`) to the master: a surviving master answers with what it knows of
//!    each lock (the holder completes an operation whose answer was dropped, or
//!    marks it to be sent again); a resource without master is looked up
//!    (`RecLookup`) and its first asker becomes the new master, rebuilding the
//!    queues from the granted locks the holders report, the LVB from the strongest
//!    lock above CR (invalid if there is none). A holder reports the value its
//!    last grant read or wrote, none if that grant was flagged VALNOTVALID (an
//!    invalid LVB must not come back valid), and keeps it across conversions
//!    that do not touch the LVB (PR→CW returns only the holder's own buffer).
//!    PR↔CW conversions whose master departed are settled as
//!    `recover_conversion` does; so are conversions with ALTPR/ALTCW whose
//!    alternate mode allows what the granted mode forbids (PW→EX with ALTCW:
//!    the departed master may have granted CW, then CW to others), which Linux
//!    resends as plain up-conversions in the old mode. Each such lock gets its
//!    old, alternate or requested mode, the first consistent with the other
//!    locks (see `Resource::finish_rebuild`). Done, the holder sends `RecDone`
//!    to everyone.
//! 4. **Resume.** With `RecDone` from every member, a node finishes: masters grant
//!    what recovery freed (queued conversions regardless of order) and send BASTs
//!    anew, held operations are sent, held messages are handled, and
//!    [`Event::Recovered`] is emitted.
//!
//! A new view during recovery starts it over (resources being rebuilt are
//! dropped and rebuilt again). Per-link FIFO order is what makes the barriers
//! work: `RecDirEntry`s arrive before their sender's `RecDirDone`, a node's
//! `RecLookup`s and `RecLocks` before its `RecDone`.

use std::collections::BTreeSet;

use super::{Event, HeldLock, Lockspace, OpKind, Role, Rsb};
use crate::core::message::{LockTruth, Message, RecLock};
use crate::core::resource::Resource;
use crate::core::types::{Flags, LkId, Mode, NodeId, SbFlags, Status};

/// The state of one lock recovery.
#[derive(Debug)]
pub(super) struct Recovery {
    generation: u64,
    /// Members whose directory entries have all arrived.
    dir_done: BTreeSet<NodeId>,
    /// Members that reconciled all their locks.
    rec_done: BTreeSet<NodeId>,
    /// Recovery lookups waiting for the directory to be complete.
    held_lookups: Vec<(NodeId, Vec<u8>)>,
    /// Our recovery lookups waiting for their answer.
    lookups: BTreeSet<Vec<u8>>,
    /// Our `RecLocks` waiting for their answer.
    reconciling: BTreeSet<Vec<u8>>,
    sent_done: bool,
}

/// A conversion between PR and CW: neither mode is below the other.
fn middle_conversion(granted: Mode, requested: Mode) -> bool {
    matches!((granted, requested), (Mode::PR, Mode::CW) | (Mode::CW, Mode::PR))
}

/// A conversion to a lower mode, which a master always grants at once.
fn down_conversion(granted: Mode, requested: Mode) -> bool {
    !middle_conversion(granted, requested) && requested < granted
}

/// The alternate mode (ALTPR/ALTCW) a master may grant instead of `requested`.
fn alt_mode(requested: Mode, flags: Flags) -> Option<Mode> {
    if requested != Mode::PR && flags.contains(Flags::ALTPR) {
        Some(Mode::PR)
    } else if requested != Mode::CW && flags.contains(Flags::ALTCW) {
        Some(Mode::CW)
    } else {
        None
    }
}

/// A conversion whose answer, lost with a departed master, may have left the
/// lock in a mode that allows others what `granted` forbids: PR↔CW, or an
/// up-conversion granted in an alternate mode that is not above `granted`
/// (PW→EX with ALTCW granted CW, PR→EX with ALTCW, CW→PW with ALTPR...), after
/// which the master may have granted others modes that conflict with `granted`.
fn ambiguous_conversion(granted: Mode, requested: Mode, flags: Flags) -> bool {
    let widens = |m: Mode| Mode::ALL.into_iter().any(|c| m.compatible(c) && !granted.compatible(c));
    middle_conversion(granted, requested)
        || (!down_conversion(granted, requested) && alt_mode(requested, flags).is_some_and(widens))
}

impl Lockspace {
    /// A lockspace this node joins in view `generation` with `members`: it starts
    /// in lock recovery (it has nothing to recover, but takes part in the directory
    /// rebuild and waits for every member), and [`Event::Recovered`] says when it
    /// can be used. Calls made before are held.
    pub fn new_in_view(
        name: impl Into<String>,
        our_node: NodeId,
        generation: u64,
        members: Vec<(NodeId, u64)>,
        seed: u64,
    ) -> Self {
        let mut ls = Lockspace::new(name, our_node, vec![our_node], seed);
        ls.generation = 0;
        ls.begin_recovery(0, generation, members);
        ls
    }

    /// Whether lock recovery is in progress.
    pub fn is_recovering(&self) -> bool {
        self.recovery.is_some()
    }

    /// Enters view `generation` whose members (this node among them) are given
    /// with the generation in which each joined: stops normal locking and starts
    /// lock recovery (see the module docs). A node missing from the view, or that
    /// joined again since the previous view this node saw, has departed. Local
    /// calls made until [`Event::Recovered`] are accepted and held. A generation
    /// not newer than the current one is ignored.
    pub fn begin_recovery(&mut self, now: u64, generation: u64, members: Vec<(NodeId, u64)>) {
        let since: std::collections::BTreeMap<NodeId, u64> = members.into_iter().collect();
        let members: Vec<NodeId> = since.keys().copied().collect();
        if generation <= self.generation || members.binary_search(&self.our_node).is_err() {
            tracing::warn!(
                node = self.our_node,
                generation,
                current = self.generation,
                ?members,
                "view ignored: not newer, or without this node"
            );
            return;
        }
        let departed: BTreeSet<NodeId> =
            self.members.iter().copied().filter(|m| *m != self.our_node && since.get(m) != self.since.get(m)).collect();
        self.since = since;
        tracing::info!(node = self.our_node, ls = %self.name, generation, ?members, ?departed, "lock recovery started");
        self.members = members;
        self.generation = generation;
        self.recovery = Some(Recovery {
            generation,
            dir_done: BTreeSet::new(),
            rec_done: BTreeSet::new(),
            held_lookups: Vec::new(),
            lookups: BTreeSet::new(),
            reconciling: BTreeSet::new(),
            sent_done: false,
        });

        // 1. Purge departed nodes' locks; forget masters that are gone, lookups in
        // flight, and resources being rebuilt by a recovery that did not finish.
        for rsb in self.rsbs.values_mut() {
            match &mut rsb.role {
                Role::Master(res) if res.rebuilding => rsb.role = Role::Unknown,
                Role::Master(res) => res.purge(&departed),
                Role::Remote(m) if departed.contains(m) => rsb.role = Role::Unknown,
                Role::LookingUp(_) => rsb.role = Role::Unknown,
                _ => {}
            }
        }
        // A request sent to a node that no longer masters the resource, which we
        // now master ourselves (the directory named us after that node dropped
        // it): its NotMaster, or the request itself, is of an older generation
        // and dropped, and no other master will report on it. It never reached
        // a master: it is sent again (to us), or cancelled if asked.
        let us = self.our_node;
        let stale_request = |l: &HeldLock| {
            l.master != Some(us) && l.pending.as_ref().is_some_and(|p| p.kind == OpKind::Request && p.sent)
        };
        // A lock whose master is a live node although the resource's cached master
        // is unknown (a request sent while our lookup of the resource was in
        // flight: that node had answered NotMaster for another lock and may have
        // mastered the resource again since; or a granted lock of a resource whose
        // cache went stale the same way): it is reconciled with whoever the
        // directory names master now, never ended locally (its master may still
        // hold it: an unlock completed here would leave it there for good).
        let in_flight_to_live = |l: &HeldLock| l.master.is_some_and(|m| m != us && !departed.contains(&m));
        let lost: Vec<LkId> = self
            .locks
            .iter()
            .filter(|(_, l)| match self.rsbs.get(&l.name) {
                Some(Rsb { role: Role::Unknown, .. }) => !in_flight_to_live(l),
                Some(Rsb { role: Role::Master(_), .. }) => stale_request(l),
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for lkid in lost {
            self.master_lost(now, lkid);
        }
        // Cached masters of resources we hold nothing on are dropped.
        let unused: Vec<Vec<u8>> = self
            .rsbs
            .iter()
            .filter(|(_, r)| r.our_locks.is_empty() && !matches!(r.role, Role::Master(_)))
            .map(|(n, _)| n.clone())
            .collect();
        for name in unused {
            if let Some(rsb) = self.rsbs.remove(&name) {
                if let Some(at) = rsb.idle_deadline {
                    self.timers.remove(&(at, super::Timer::ResourceIdle(name)));
                }
            }
        }

        // 2. The directory, rebuilt from the surviving masters.
        self.directory.clear();
        let mastered: Vec<Vec<u8>> =
            self.rsbs.iter().filter(|(_, r)| matches!(r.role, Role::Master(_))).map(|(n, _)| n.clone()).collect();
        for name in mastered {
            let dir = self.directory_node(&name);
            if dir == self.our_node {
                self.directory.insert(name, self.our_node);
            } else {
                self.send(dir, Message::RecDirEntry { name });
            }
        }
        for m in self.others() {
            self.send(m, Message::RecDirDone);
        }
        let us = self.our_node;
        if let Some(r) = self.recovery.as_mut() {
            r.dir_done.insert(us);
        }

        // 3. Our locks, reconciled with their masters.
        let names: Vec<Vec<u8>> =
            self.rsbs.iter().filter(|(_, r)| !r.our_locks.is_empty()).map(|(n, _)| n.clone()).collect();
        for name in names {
            match self.rsbs.get(&name).map(|r| &r.role) {
                Some(Role::Remote(m)) => {
                    let m = *m;
                    self.send_rec_locks(m, name, false);
                }
                Some(Role::Unknown) => self.rec_lookup(name),
                _ => {}
            }
        }

        // Messages of this generation that came early are handled now; older
        // ones are dropped.
        let saved = std::mem::take(&mut self.saved);
        for (from, g, msg) in saved {
            if g >= generation {
                self.handle_message(now, from, g, msg);
            }
        }
        self.recovery_progress(now);
    }

    fn others(&self) -> Vec<NodeId> {
        self.members.iter().copied().filter(|m| *m != self.our_node).collect()
    }

    /// Lock `lkid` lost its master (departed, or unknown): its operation in progress
    /// ends as the DLM ends it, or waits to be sent again.
    fn master_lost(&mut self, now: u64, lkid: LkId) {
        let Some(lock) = self.locks.get_mut(&lkid) else { return };
        lock.master = None;
        let granted = lock.granted;
        let lvb = lock.lvb;
        let Some(p) = lock.pending.as_mut() else { return };
        match (p.kind, granted) {
            (OpKind::Unlock, _) => {
                self.finish_op(now, lkid, Status::Unlocked, None, SbFlags::empty(), None);
            }
            (OpKind::Convert, Some(g)) if down_conversion(g, p.mode) => {
                let lvb = p.flags.contains(crate::core::Flags::VALBLK).then_some(lvb);
                let mode = p.mode;
                self.finish_op(now, lkid, Status::Granted, Some(mode), SbFlags::empty(), lvb);
            }
            // The departed master may have granted it: its granted mode is settled
            // by the new master, then it is sent again (and cancelled, if asked).
            (OpKind::Convert, Some(g)) if ambiguous_conversion(g, p.mode, p.flags) => {
                p.sent = false;
                p.middle = true;
            }
            _ if p.cancel => self.finish_canceled(now, lkid),
            _ => p.sent = false,
        }
    }

    /// Completes the operation in progress on `lkid` with -DLM_ECANCEL: a request
    /// is gone, a conversion is back in its granted mode.
    pub(super) fn finish_canceled(&mut self, now: u64, lkid: LkId) {
        let mode = self.locks.get(&lkid).and_then(|l| l.granted);
        self.finish_op(now, lkid, Status::Canceled, mode, SbFlags::empty(), None);
    }

    fn report(&self, name: &[u8]) -> Vec<RecLock> {
        let Some(rsb) = self.rsbs.get(name) else { return Vec::new() };
        rsb.our_locks
            .iter()
            .filter_map(|id| self.locks.get(id).map(|l| (*id, l)))
            .map(|(lkid, l): (LkId, &HeldLock)| RecLock {
                lkid,
                granted: l.granted,
                middle: l.pending.as_ref().filter(|p| p.middle).map(|p| p.mode),
                alt: l.pending.as_ref().filter(|p| p.middle).and_then(|p| alt_mode(p.mode, p.flags)),
                lvb: l.lvb_read,
                seq: l.seq,
            })
            .collect()
    }

    fn send_rec_locks(&mut self, master: NodeId, name: Vec<u8>, directory: bool) {
        let locks = self.report(&name);
        if let Some(r) = self.recovery.as_mut() {
            r.reconciling.insert(name.clone());
        }
        self.send(master, Message::RecLocks { name, locks, directory });
    }

    fn rec_lookup(&mut self, name: Vec<u8>) {
        let dir = self.directory_node(&name);
        let us = self.our_node;
        let Some(r) = self.recovery.as_mut() else { return };
        r.lookups.insert(name.clone());
        if dir == us {
            r.held_lookups.push((us, name));
        } else {
            self.send(dir, Message::RecLookup { name });
        }
    }

    /// We master `name` now (recovery lookup): rebuild it, starting with our locks.
    fn become_new_master(&mut self, name: &[u8]) {
        let us = self.our_node;
        let report = self.report(name);
        let Some(rsb) = self.rsbs.get_mut(name) else { return };
        if let Role::Master(_) = rsb.role {
            return;
        }
        let mut res = Resource::rebuilding();
        res.rebuild_add(us, &report);
        rsb.role = Role::Master(res);
        for id in rsb.our_locks.clone() {
            if let Some(l) = self.locks.get_mut(&id) {
                l.master = Some(us);
                // Rebuilt from the granted locks: a request still in flight to
                // the node that answered NotMaster never reached a master (that
                // node would still master it); it is sent again.
                if let Some(p) = l.pending.as_mut() {
                    p.sent = false;
                }
            }
        }
        tracing::debug!(node = us, res = %super::show(name), "new master (recovery)");
    }

    fn on_rec_lookup_reply(&mut self, name: Vec<u8>, master: NodeId) {
        let waited = self.recovery.as_mut().is_some_and(|r| r.lookups.remove(&name));
        if !waited {
            tracing::warn!(node = self.our_node, res = %super::show(&name), "unexpected recovery lookup reply");
            return;
        }
        if master == self.our_node {
            self.become_new_master(&name);
            return;
        }
        let Some(rsb) = self.rsbs.get_mut(&name) else { return };
        rsb.role = Role::Remote(master);
        for id in rsb.our_locks.clone() {
            if let Some(l) = self.locks.get_mut(&id) {
                l.master = Some(master);
            }
        }
        self.send_rec_locks(master, name, true);
    }

    /// A surviving master's answer for our locks on `name`.
    fn apply_truths(&mut self, now: u64, truths: Vec<LockTruth>) {
        for t in truths {
            let Some(lock) = self.locks.get_mut(&t.lkid) else { continue };
            let granted = lock.granted;
            let heard = lock.seq;
            let Some(p) = lock.pending.as_mut() else {
                if t.state.as_ref().map(|s| s.granted) != Some(granted) {
                    tracing::warn!(node = self.our_node, lkid = %t.lkid, "master disagrees about an idle lock");
                }
                continue;
            };
            if !p.sent {
                continue;
            }
            let (kind, cancel, rq) = (p.kind, p.cancel, p.mode);
            let valblk = p.flags.contains(crate::core::Flags::VALBLK);
            enum Act {
                Keep,
                Failed(Status, Option<Mode>),
                Granted(Option<Mode>, SbFlags, Option<crate::core::Lvb>),
                Unlocked,
                /// Cancelled, in the mode the master holds the lock in (a PR<->CW
                /// conversion whose master departed may have been settled in
                /// another mode than the holder's).
                Canceled(Option<Mode>),
                Resend,
            }
            let act = match (kind, t.state) {
                // Still queued on the master: it goes on after recovery.
                (OpKind::Request | OpKind::Convert, Some(s)) if s.requested.is_some() => Act::Keep,
                (OpKind::Request, Some(s)) if s.granted.is_some() => {
                    let flags = if s.granted == Some(rq) { s.sb_flags } else { s.sb_flags | SbFlags::ALTMODE };
                    Act::Granted(s.granted, flags, valblk.then_some(s.lvb))
                }
                // The master completed the conversion; its answer was dropped.
                (OpKind::Convert, Some(s)) if s.seq != heard && s.last == Status::Granted => {
                    let flags = if s.granted == Some(rq) { s.sb_flags } else { s.sb_flags | SbFlags::ALTMODE };
                    Act::Granted(s.granted, flags, valblk.then_some(s.lvb))
                }
                (OpKind::Convert, Some(s)) if s.seq != heard => Act::Failed(s.last, s.granted),
                (OpKind::Unlock, None) => Act::Unlocked,
                (OpKind::Convert, None) => {
                    tracing::warn!(node = self.our_node, lkid = %t.lkid, "master lost a granted lock");
                    Act::Resend
                }
                // Never reached the master, or its answer (-EAGAIN, -EDEADLK,
                // -DLM_ECANCEL) was dropped: cancelled if asked, else sent again.
                (OpKind::Convert, Some(s)) if cancel => Act::Canceled(s.granted),
                (OpKind::Request | OpKind::Convert, _) if cancel => Act::Canceled(granted),
                _ => Act::Resend,
            };
            match act {
                Act::Keep => {}
                Act::Failed(status, mode) => {
                    if let Some(l) = self.locks.get_mut(&t.lkid) {
                        l.seq = l.seq.wrapping_add(1);
                    }
                    self.finish_op(now, t.lkid, status, mode, SbFlags::empty(), None)
                }
                Act::Granted(mode, flags, lvb) => {
                    if let Some(l) = self.locks.get_mut(&t.lkid) {
                        l.seq = l.seq.wrapping_add(1);
                    }
                    self.finish_op(now, t.lkid, Status::Granted, mode, flags, lvb)
                }
                Act::Unlocked => self.finish_op(now, t.lkid, Status::Unlocked, None, SbFlags::empty(), None),
                Act::Canceled(mode) => self.finish_op(now, t.lkid, Status::Canceled, mode, SbFlags::empty(), None),
                Act::Resend => {
                    if let Some(p) = self.locks.get_mut(&t.lkid).and_then(|l| l.pending.as_mut()) {
                        p.sent = false;
                    }
                }
            }
        }
    }

    pub(super) fn handle_recovery_message(&mut self, now: u64, from: NodeId, msg: Message) {
        if self.recovery.is_none() {
            tracing::warn!(node = self.our_node, from, kind = msg.kind(), "recovery message outside recovery dropped");
            return;
        }
        match msg {
            Message::RecDirEntry { name } => {
                if self.directory_node(&name) != self.our_node {
                    tracing::warn!(node = self.our_node, from, "misdirected recovery directory entry");
                    return;
                }
                let m = *self.directory.entry(name).or_insert(from);
                if m != from {
                    tracing::warn!(node = self.our_node, from, m, "two masters claim one resource; first kept");
                }
            }
            Message::RecDirDone => {
                if let Some(r) = self.recovery.as_mut() {
                    r.dir_done.insert(from);
                }
            }
            Message::RecLookup { name } => {
                if crate::core::types::check_name(&name).is_err() || self.directory_node(&name) != self.our_node {
                    tracing::warn!(node = self.our_node, from, "misdirected recovery lookup");
                    return;
                }
                if let Some(r) = self.recovery.as_mut() {
                    r.held_lookups.push((from, name));
                }
            }
            Message::RecLookupReply { name, master } => {
                if self.directory_node(&name) != from || self.members.binary_search(&master).is_err() {
                    tracing::warn!(node = self.our_node, from, "bad recovery lookup reply dropped");
                    return;
                }
                self.on_rec_lookup_reply(name, master);
            }
            Message::RecLocks { name, locks, directory } => {
                let awaiting = self.recovery.as_ref().is_some_and(|r| r.lookups.contains(&name));
                match self.rsbs.get_mut(&name).map(|r| &mut r.role) {
                    Some(Role::Master(res)) if res.rebuilding => {
                        res.rebuild_add(from, &locks);
                        self.send(from, Message::RecLocksReply { name, truths: None });
                    }
                    Some(Role::Master(res)) => {
                        let truths = locks.iter().map(|l| LockTruth { lkid: l.lkid, state: res.truth(from, l.lkid) });
                        let truths = Some(truths.collect());
                        self.send(from, Message::RecLocksReply { name, truths });
                    }
                    // The directory named us, and our own answer is on its way.
                    Some(Role::Unknown) if awaiting && directory => {
                        self.become_new_master(&name);
                        if let Some(Rsb { role: Role::Master(res), .. }) = self.rsbs.get_mut(&name) {
                            res.rebuild_add(from, &locks);
                        }
                        self.send(from, Message::RecLocksReply { name, truths: None });
                    }
                    _ => self.send(from, Message::RecNotMaster { name }),
                }
            }
            Message::RecLocksReply { name, truths } => {
                let waited = self.recovery.as_mut().is_some_and(|r| r.reconciling.remove(&name));
                let from_master = matches!(self.rsbs.get(&name), Some(Rsb { role: Role::Remote(m), .. }) if *m == from);
                if !waited || !from_master {
                    tracing::warn!(node = self.our_node, from, "unexpected recovery locks reply");
                    return;
                }
                match truths {
                    Some(t) => self.apply_truths(now, t),
                    // Rebuilt from the granted locks: whatever was in progress
                    // is sent again.
                    None => {
                        let ids: Vec<LkId> =
                            self.rsbs.get(&name).map(|r| r.our_locks.iter().copied().collect()).unwrap_or_default();
                        for id in ids {
                            if let Some(p) = self.locks.get_mut(&id).and_then(|l| l.pending.as_mut()) {
                                p.sent = false;
                            }
                        }
                    }
                }
            }
            Message::RecNotMaster { name } => {
                let waited = self.recovery.as_mut().is_some_and(|r| r.reconciling.remove(&name));
                if !waited {
                    return;
                }
                if let Some(rsb) = self.rsbs.get_mut(&name) {
                    rsb.role = Role::Unknown;
                    let ids: Vec<LkId> = rsb.our_locks.iter().copied().collect();
                    for id in ids {
                        self.master_lost(now, id);
                    }
                }
                if self.rsbs.get(&name).is_some_and(|r| !r.our_locks.is_empty()) {
                    self.rec_lookup(name);
                }
            }
            Message::RecDone => {
                if let Some(r) = self.recovery.as_mut() {
                    r.rec_done.insert(from);
                }
            }
            other => tracing::warn!(node = self.our_node, from, kind = other.kind(), "not a recovery message"),
        }
        self.recovery_progress(now);
    }

    /// Moves recovery on as far as what has arrived allows.
    fn recovery_progress(&mut self, now: u64) {
        loop {
            let Some(r) = self.recovery.as_mut() else { return };
            let dir_complete = self.members.iter().all(|m| r.dir_done.contains(m));
            if dir_complete && !r.held_lookups.is_empty() {
                let held = std::mem::take(&mut r.held_lookups);
                for (from, name) in held {
                    let master = *self.directory.entry(name.clone()).or_insert(from);
                    if from == self.our_node {
                        self.on_rec_lookup_reply(name, master);
                    } else {
                        self.send(from, Message::RecLookupReply { name, master });
                    }
                }
                continue;
            }
            if !r.sent_done && r.lookups.is_empty() && r.reconciling.is_empty() {
                r.sent_done = true;
                r.rec_done.insert(self.our_node);
                for m in self.others() {
                    self.send(m, Message::RecDone);
                }
                continue;
            }
            if self.members.iter().all(|m| r.rec_done.contains(m)) {
                self.finish_recovery(now);
            }
            return;
        }
    }

    /// 4. Every member reconciled: grant, resend, resume.
    fn finish_recovery(&mut self, now: u64) {
        let Some(r) = self.recovery.take() else { return };
        let generation = r.generation;
        let mut out = Vec::new();
        for rsb in self.rsbs.values_mut() {
            if let Role::Master(res) = &mut rsb.role {
                res.finish_rebuild();
                res.recovery_grant(&mut out);
            }
        }
        self.apply_effects(now, out);
        // Operations held during recovery, or lost with a master, go out now.
        let ids: Vec<LkId> = self.locks.keys().copied().collect();
        for lkid in ids {
            let Some(lock) = self.locks.get(&lkid) else { continue };
            let Some(p) = lock.pending.clone() else { continue };
            if !p.sent {
                self.resend(now, lkid, &p);
            }
            if p.cancel {
                // Asked during recovery, or before it for an operation sent again.
                if let Some(q) = self.locks.get_mut(&lkid).and_then(|l| l.pending.as_mut()) {
                    q.cancel = false;
                    let _ = self.cancel(now, lkid);
                }
            }
        }
        let names: Vec<Vec<u8>> = self.rsbs.keys().cloned().collect();
        for name in names {
            self.update_idle(now, &name);
        }
        tracing::info!(node = self.our_node, ls = %self.name, generation, "lock recovery done");
        self.events.push_back(Event::Recovered { generation });
        let saved = std::mem::take(&mut self.saved);
        for (from, g, msg) in saved {
            self.handle_message(now, from, g, msg);
        }
    }

    /// Sends an operation held during recovery, or lost with its master.
    fn resend(&mut self, now: u64, lkid: LkId, p: &super::Pending) {
        if p.kind == OpKind::Request {
            self.dispatch_request(now, lkid);
            return;
        }
        let Some(lock) = self.locks.get_mut(&lkid) else { return };
        let (name, master) = (lock.name.clone(), lock.master);
        if let Some(q) = lock.pending.as_mut() {
            q.sent = true;
        }
        let convert = p.kind == OpKind::Convert;
        match master {
            Some(m) if m == self.our_node => {
                let mut out = Vec::new();
                let r = self.master_resource(&name).map(|res| {
                    if convert {
                        res.convert(m, lkid, p.mode, p.flags, p.lvb, &mut out)
                    } else {
                        res.unlock(m, lkid, p.lvb, &mut out)
                    }
                });
                if !matches!(r, Some(Ok(()))) {
                    tracing::warn!(node = m, %lkid, ?r, "held operation refused after recovery");
                }
                self.apply_effects(now, out);
            }
            Some(m) => {
                let msg = if convert {
                    Message::Convert { name, lkid, mode: p.mode, flags: p.flags, lvb: p.lvb }
                } else {
                    Message::Unlock { name, lkid, lvb: p.lvb }
                };
                self.send(m, msg);
            }
            None => tracing::warn!(node = self.our_node, %lkid, "granted lock without master after recovery"),
        }
    }
}
