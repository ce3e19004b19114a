//! One resource as its master sees it: the grant, convert and wait queues, the LVB, and
//! the grant rules of the Linux DLM (`fs/dlm/lock.c`: `_can_be_granted`,
//! `can_be_granted`, `conversion_deadlock_detect`, `grant_pending_locks`,
//! `send_blocking_asts`, `set_lvb_lock`, `set_lvb_unlock`).
//!
//! The resource knows nothing of nodes or messages: every operation appends
//! [`Effect`]s (completion casts and blocking casts addressed to a lock), which the
//! lockspace delivers locally or sends to the holder's node.

use super::types::{lvb_op, Flags, LkId, Lvb, LvbOp, Mode, NodeId, SbFlags, Status, LVB_LEN};

/// A lock as the master holds it (the master copy of an lkb).
#[derive(Clone, Debug)]
pub(crate) struct Lkb {
    pub node: NodeId,
    pub lkid: LkId,
    /// Granted mode; None while a new request waits.
    pub grmode: Option<Mode>,
    /// Requested mode; None when no request or conversion is in progress.
    pub rqmode: Option<Mode>,
    /// Flags of the operation in progress (or of the last one).
    pub flags: Flags,
    /// The holder's LVB buffer (what it last read or asked to write).
    pub lvb: Lvb,
    /// Highest mode already signalled by a BAST since the last grant (`lkb_highbast`).
    pub highbast: Mode,
    /// Status flags gathered for the operation in progress.
    pub sbflags: SbFlags,
    /// Operations completed on this lock (each cast), and the status of the
    /// last: lock recovery compares them with what the holder heard.
    pub seq: u32,
    pub last: Status,
}

impl Lkb {
    /// A new request (not yet on any queue).
    pub fn new(node: NodeId, lkid: LkId, mode: Mode, flags: Flags, lvb: Option<Lvb>) -> Lkb {
        Lkb {
            node,
            lkid,
            grmode: None,
            rqmode: Some(mode),
            flags,
            lvb: lvb.unwrap_or([0; LVB_LEN]),
            highbast: Mode::NL,
            sbflags: SbFlags::empty(),
            seq: 0,
            last: Status::Granted,
        }
    }

    fn key(&self) -> (NodeId, LkId) {
        (self.node, self.lkid)
    }
}

/// The three queues of a resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub enum Queue {
    /// Granted locks (ordered by granted mode, highest first).
    Grant,
    /// Granted locks waiting for a conversion (FIFO, HEADQUE at the head).
    Convert,
    /// New requests waiting (FIFO, HEADQUE at the head).
    Wait,
}

/// Something the master must tell a lock's holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Completion AST for the operation in progress on the lock.
    Cast {
        node: NodeId,
        lkid: LkId,
        status: Status,
        /// Granted mode after the operation; None if the lock is gone.
        mode: Option<Mode>,
        sbflags: SbFlags,
        /// The lock's LVB buffer, for a granted operation with VALBLK.
        lvb: Option<Lvb>,
    },
    /// Blocking AST: another lock waits for `mode`.
    Bast { node: NodeId, lkid: LkId, mode: Mode },
}

/// Why the master refused an operation from a holder: the holder's view disagrees
/// with the master's (a peer bug or a stale message). Nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    UnknownLock,
    WrongState,
    Duplicate,
}

enum Grantable {
    Yes { mode: Mode, alt: bool },
    No { deadlock: bool },
}

/// A mastered resource.
#[derive(Clone, Debug, Default)]
pub(crate) struct Resource {
    pub grant: Vec<Lkb>,
    pub convert: Vec<Lkb>,
    pub wait: Vec<Lkb>,
    pub lvb: Lvb,
    /// Incremented on every LVB write (`res_lvbseq`).
    pub lvb_seq: u64,
    /// The LVB may be stale (`RSB_VALNOTVALID`). Only lock recovery sets it: when a
    /// departed node held PW/EX, or when a new master rebuilt the resource from
    /// NL/CR locks only (recover.c `recover_lvb`). The next write clears it.
    pub valnotvalid: bool,
    /// Being rebuilt by a new master from the holders' reports (lock recovery).
    pub rebuilding: bool,
    /// During a rebuild: the best LVB reported so far, with its rank (2 from a
    /// PW/EX lock, 1 from PR/CW).
    rebuild_lvb: Option<(u8, Lvb)>,
    /// During a rebuild: conversions whose granted mode the departed master took
    /// with it (PR↔CW as in `recover_conversion`, and conversions that may have
    /// been granted an alternate mode), with the mode their holder had, their
    /// requested mode and their alternate mode.
    rebuild_middle: Vec<(Lkb, Mode, Mode, Option<Mode>)>,
}

fn queue_conflict(q: &[Lkb], key: (NodeId, LkId), rq: Mode) -> bool {
    q.iter().any(|g| g.key() != key && g.grmode.is_some_and(|gm| !gm.compatible(rq)))
}

fn position(q: &[Lkb], key: (NodeId, LkId)) -> Option<usize> {
    q.iter().position(|l| l.key() == key)
}

impl Resource {
    /// No lock of any kind.
    pub fn is_empty(&self) -> bool {
        self.grant.is_empty() && self.convert.is_empty() && self.wait.is_empty()
    }

    /// Iterates over all locks with their queue.
    pub fn locks(&self) -> impl Iterator<Item = (Queue, &Lkb)> {
        self.grant
            .iter()
            .map(|l| (Queue::Grant, l))
            .chain(self.convert.iter().map(|l| (Queue::Convert, l)))
            .chain(self.wait.iter().map(|l| (Queue::Wait, l)))
    }

    /// Whether a lock with this key exists.
    pub fn contains(&self, node: NodeId, lkid: LkId) -> bool {
        self.locks().any(|(_, l)| l.key() == (node, lkid))
    }

    /// `_can_be_granted` for `lkb` asking for `rq`. `now` is true when the operation
    /// is being received now, false when it already sits on the convert or wait queue.
    fn can_be_granted_mode(&self, lkb: &Lkb, rq: Mode, now: bool) -> bool {
        let conv = lkb.grmode.is_some();
        let key = lkb.key();
        // Never conflict with a granted mode, whether on the grant queue or held by a
        // lock waiting on the convert queue.
        if queue_conflict(&self.grant, key, rq) || queue_conflict(&self.convert, key, rq) {
            return false;
        }
        // A conversion received now is granted in place unless QUECVT; with QUECVT
        // it goes behind queued conversions.
        let headque = lkb.flags.contains(Flags::HEADQUE);
        let noorder = lkb.flags.contains(Flags::NOORDER);
        if now && conv {
            // Concord: with QUECVT, a conversion that would be first on the
            // queue anyway (HEADQUE) or that ignores order (NOORDER) is judged
            // as it will be once queued, instead of waiting for the next
            // grant_pending_locks as in Linux.
            return !lkb.flags.contains(Flags::QUECVT) || self.convert.is_empty() || headque || noorder;
        }
        if lkb.flags.contains(Flags::EXPEDITE) || noorder {
            return true;
        }
        if conv {
            // !now: FIFO on the convert queue.
            return self.convert.first().is_some_and(|f| f.key() == key);
        }
        if !self.convert.is_empty() {
            return false;
        }
        if now {
            // Concord: a HEADQUE request would be first on the wait queue, so it is
            // judged as the first waiter (Linux would queue it and grant it at the
            // next grant_pending_locks).
            self.wait.is_empty() || headque
        } else {
            self.wait.first().is_some_and(|f| f.key() == key)
        }
    }

    /// `can_be_granted`: the requested mode, else a conversion deadlock check, else the
    /// ALTPR/ALTCW alternate mode.
    fn can_be_granted(&self, lkb: &Lkb, now: bool) -> Grantable {
        let Some(rq) = lkb.rqmode else {
            return Grantable::No { deadlock: false };
        };
        if self.can_be_granted_mode(lkb, rq, now) {
            return Grantable::Yes { mode: rq, alt: false };
        }
        let going_to_head = now && lkb.flags.contains(Flags::HEADQUE);
        if lkb.grmode.is_some() && !lkb.flags.contains(Flags::NOQUEUE) && self.conversion_deadlock(lkb, going_to_head) {
            return Grantable::No { deadlock: true };
        }
        let alt = if rq != Mode::PR && lkb.flags.contains(Flags::ALTPR) {
            Some(Mode::PR)
        } else if rq != Mode::CW && lkb.flags.contains(Flags::ALTCW) {
            Some(Mode::CW)
        } else {
            None
        };
        if let Some(a) = alt {
            if self.can_be_granted_mode(lkb, a, now) {
                return Grantable::Yes { mode: a, alt: true };
            }
        }
        Grantable::No { deadlock: false }
    }

    /// `conversion_deadlock_detect`: `lkb` (a conversion) is deadlocked if its granted
    /// mode blocks a conversion queued ahead of it, or if it and a conversion behind it
    /// block each other. A conversion received now is not on the queue yet, so every
    /// queued conversion counts as ahead of it: the newcomer whose granted mode blocks
    /// an already queued conversion is the one refused with -EDEADLK, as in Linux.
    ///
    /// Concord also refuses a conversion that is about to go to the head of the queue
    /// (HEADQUE) when a queued conversion, which will then be behind it, holds a mode
    /// that blocks it: it would wait at the head for a lock that can only move after
    /// it. Linux misses this case and both conversions wait forever (the
    /// simulation found such hangs).
    fn conversion_deadlock(&self, lkb: &Lkb, going_to_head: bool) -> bool {
        let (Some(gr2), Some(rq2)) = (lkb.grmode, lkb.rqmode) else {
            return false;
        };
        if going_to_head {
            return self
                .convert
                .iter()
                .any(|l1| l1.key() != lkb.key() && l1.grmode.is_some_and(|gr1| !gr1.compatible(rq2)));
        }
        let mut lkb_is_ahead = false;
        for l1 in &self.convert {
            if l1.key() == lkb.key() {
                lkb_is_ahead = true;
                continue;
            }
            let (Some(gr1), Some(rq1)) = (l1.grmode, l1.rqmode) else {
                continue;
            };
            let blocks_l1 = !gr2.compatible(rq1);
            let blocked_by_l1 = !gr1.compatible(rq2);
            if blocks_l1 && (!lkb_is_ahead || blocked_by_l1) {
                return true;
            }
        }
        false
    }

    /// Grants `lkb` in `mode` (`_grant_lock` + `set_lvb_lock`), puts it on the grant
    /// queue in mode order, and returns its completion cast.
    fn grant_lock(&mut self, mut lkb: Lkb, mode: Mode, alt: bool, out: &mut Vec<Effect>) {
        match lvb_op(lkb.grmode, mode) {
            LvbOp::Read if lkb.flags.contains(Flags::VALBLK) => lkb.lvb = self.lvb,
            LvbOp::Write if lkb.flags.contains(Flags::VALBLK) => {
                self.lvb = lkb.lvb;
                self.lvb_seq += 1;
                self.valnotvalid = false;
            }
            _ => {}
        }
        if self.valnotvalid {
            lkb.sbflags |= SbFlags::VALNOTVALID;
        }
        if alt {
            lkb.sbflags |= SbFlags::ALTMODE;
        }
        lkb.grmode = Some(mode);
        lkb.rqmode = None;
        lkb.highbast = Mode::NL;
        lkb.seq = lkb.seq.wrapping_add(1);
        lkb.last = Status::Granted;
        out.push(Effect::Cast {
            node: lkb.node,
            lkid: lkb.lkid,
            status: Status::Granted,
            mode: Some(mode),
            sbflags: lkb.sbflags,
            lvb: lkb.flags.contains(Flags::VALBLK).then_some(lkb.lvb),
        });
        self.add_granted(lkb);
    }

    /// Grant queue kept in order of granted mode, highest first, FIFO within a mode.
    fn add_granted(&mut self, lkb: Lkb) {
        let at = self.grant.iter().position(|g| g.grmode < lkb.grmode).unwrap_or(self.grant.len());
        self.grant.insert(at, lkb);
    }

    fn add_queued(q: &mut Vec<Lkb>, lkb: Lkb) {
        if lkb.flags.contains(Flags::HEADQUE) {
            q.insert(0, lkb);
        } else {
            q.push(lkb);
        }
    }

    fn cast_failure(lkb: &mut Lkb, status: Status, out: &mut Vec<Effect>) {
        lkb.seq = lkb.seq.wrapping_add(1);
        lkb.last = status;
        out.push(Effect::Cast {
            node: lkb.node,
            lkid: lkb.lkid,
            status,
            mode: lkb.grmode,
            sbflags: lkb.sbflags,
            lvb: None,
        });
    }

    /// `modes_require_bast`: whether granted lock `gr` must hear of a request for `rq`.
    fn modes_require_bast(gr: &Lkb, rq: Mode) -> bool {
        let Some(gm) = gr.grmode else { return false };
        if (gm == Mode::PR && rq == Mode::CW) || (gm == Mode::CW && rq == Mode::PR) {
            return gr.highbast < Mode::EX;
        }
        gr.highbast < rq && !gm.compatible(rq)
    }

    /// `send_bast_queue` over the grant queue (and the convert queue when `all`, for
    /// NOQUEUEBAST) for the blocked request `key` wanting `rq`.
    fn send_blocking_asts(&mut self, key: (NodeId, LkId), rq: Mode, all: bool, out: &mut Vec<Effect>) {
        let queues: &mut [&mut Vec<Lkb>] =
            if all { &mut [&mut self.grant, &mut self.convert] } else { &mut [&mut self.grant] };
        for q in queues.iter_mut() {
            for gr in q.iter_mut() {
                if gr.key() != key && Self::modes_require_bast(gr, rq) {
                    out.push(Effect::Bast { node: gr.node, lkid: gr.lkid, mode: rq });
                    gr.highbast = rq;
                }
            }
        }
    }

    /// A new request (`do_request` + `do_request_effects`).
    pub fn request(&mut self, mut lkb: Lkb, out: &mut Vec<Effect>) -> Result<(), Refused> {
        if self.contains(lkb.node, lkb.lkid) {
            return Err(Refused::Duplicate);
        }
        let Some(rq) = lkb.rqmode else {
            return Err(Refused::WrongState);
        };
        lkb.sbflags = SbFlags::empty();
        match self.can_be_granted(&lkb, true) {
            Grantable::Yes { mode, alt } => self.grant_lock(lkb, mode, alt, out),
            Grantable::No { .. } if !lkb.flags.contains(Flags::NOQUEUE) => {
                let key = lkb.key();
                Self::add_queued(&mut self.wait, lkb);
                self.send_blocking_asts(key, rq, false, out);
            }
            Grantable::No { .. } => {
                Self::cast_failure(&mut lkb, Status::Again, out);
                if lkb.flags.contains(Flags::NOQUEUEBAST) {
                    self.send_blocking_asts(lkb.key(), rq, true, out);
                }
            }
        }
        Ok(())
    }

    /// A conversion of a granted lock (`do_convert` + `do_convert_effects`).
    pub fn convert(
        &mut self,
        node: NodeId,
        lkid: LkId,
        mode: Mode,
        flags: Flags,
        lvb: Option<Lvb>,
        out: &mut Vec<Effect>,
    ) -> Result<(), Refused> {
        let Some(i) = position(&self.grant, (node, lkid)) else {
            return Err(if self.contains(node, lkid) { Refused::WrongState } else { Refused::UnknownLock });
        };
        let lkb = &mut self.grant[i];
        lkb.rqmode = Some(mode);
        lkb.flags = flags;
        lkb.sbflags = SbFlags::empty();
        if let (true, Some(v)) = (flags.contains(Flags::VALBLK), lvb) {
            lkb.lvb = v;
        }
        match self.can_be_granted(&self.grant[i], true) {
            Grantable::Yes { mode, alt } => {
                let lkb = self.grant.remove(i);
                self.grant_lock(lkb, mode, alt, out);
                self.grant_pending(out);
            }
            Grantable::No { deadlock: true } => {
                // Left granted in its old mode.
                let lkb = &mut self.grant[i];
                lkb.rqmode = None;
                Self::cast_failure(lkb, Status::Deadlock, out);
            }
            Grantable::No { .. } if !flags.contains(Flags::NOQUEUE) => {
                let lkb = self.grant.remove(i);
                let key = lkb.key();
                Self::add_queued(&mut self.convert, lkb);
                self.send_blocking_asts(key, mode, false, out);
            }
            Grantable::No { .. } => {
                let lkb = &mut self.grant[i];
                lkb.rqmode = None;
                Self::cast_failure(lkb, Status::Again, out);
                if flags.contains(Flags::NOQUEUEBAST) {
                    self.send_blocking_asts((node, lkid), mode, true, out);
                }
            }
        }
        Ok(())
    }

    /// Unlock of a granted lock with no conversion in progress (`do_unlock`). With
    /// `lvb` (VALBLK), a lock held in PW or EX writes it to the resource.
    pub fn unlock(&mut self, node: NodeId, lkid: LkId, lvb: Option<Lvb>, out: &mut Vec<Effect>) -> Result<(), Refused> {
        let Some(i) = position(&self.grant, (node, lkid)) else {
            return Err(if self.contains(node, lkid) { Refused::WrongState } else { Refused::UnknownLock });
        };
        let lkb = self.grant.remove(i);
        if let (Some(v), Some(Mode::PW | Mode::EX)) = (lvb, lkb.grmode) {
            self.lvb = v;
            self.lvb_seq += 1;
            self.valnotvalid = false;
        }
        out.push(Effect::Cast {
            node,
            lkid,
            status: Status::Unlocked,
            mode: None,
            sbflags: SbFlags::empty(),
            lvb: None,
        });
        self.grant_pending(out);
        Ok(())
    }

    /// Cancel (`do_cancel`): a waiting request is removed, a waiting conversion goes
    /// back to its granted mode, both with -DLM_ECANCEL. A lock already granted has
    /// nothing to cancel: no cast (its grant cast was, or is being, delivered).
    pub fn cancel(&mut self, node: NodeId, lkid: LkId, out: &mut Vec<Effect>) -> Result<(), Refused> {
        let key = (node, lkid);
        if let Some(i) = position(&self.wait, key) {
            let mut lkb = self.wait.remove(i);
            lkb.rqmode = None;
            Self::cast_failure(&mut lkb, Status::Canceled, out);
        } else if let Some(i) = position(&self.convert, key) {
            let mut lkb = self.convert.remove(i);
            lkb.rqmode = None;
            Self::cast_failure(&mut lkb, Status::Canceled, out);
            self.add_granted(lkb);
        } else if position(&self.grant, key).is_some() {
            return Ok(());
        } else {
            return Err(Refused::UnknownLock);
        }
        self.grant_pending(out);
        Ok(())
    }

    /// `grant_pending_locks`: grant what the queues allow, conversions first, then
    /// send BASTs to granted locks for the highest mode still waiting.
    fn grant_pending(&mut self, out: &mut Vec<Effect>) {
        let mut high: Option<Mode> = None;
        let mut cw = false;
        loop {
            let mut granted = false;
            let mut hi: Option<Mode> = None;
            let mut i = 0;
            while i < self.convert.len() {
                match self.can_be_granted(&self.convert[i], false) {
                    Grantable::Yes { mode, alt } => {
                        let lkb = self.convert.remove(i);
                        self.grant_lock(lkb, mode, alt, out);
                        granted = true;
                    }
                    Grantable::No { deadlock: true } => {
                        // Linux only warns here too: a deadlock between conversions
                        // already queued can only come from HEADQUE.
                        tracing::warn!(lkid = %self.convert[i].lkid, "pending conversion deadlock");
                        i += 1;
                    }
                    Grantable::No { deadlock: false } => {
                        let rq = self.convert[i].rqmode;
                        hi = hi.max(rq);
                        cw |= rq == Some(Mode::CW);
                        i += 1;
                    }
                }
            }
            if !granted {
                high = high.max(hi);
                break;
            }
        }
        let mut i = 0;
        while i < self.wait.len() {
            match self.can_be_granted(&self.wait[i], false) {
                Grantable::Yes { mode, alt } => {
                    let lkb = self.wait.remove(i);
                    self.grant_lock(lkb, mode, alt, out);
                }
                Grantable::No { .. } => {
                    let rq = self.wait[i].rqmode;
                    high = high.max(rq);
                    cw |= rq == Some(Mode::CW);
                    i += 1;
                }
            }
        }
        let Some(high) = high else { return };
        for gr in &mut self.grant {
            let Some(gm) = gr.grmode else { continue };
            let needs = if (gm == Mode::PR && cw) || (gm == Mode::CW && high == Mode::PR) {
                gr.highbast < Mode::EX
            } else {
                gr.highbast < high && !gm.compatible(high)
            };
            if needs {
                let mode = if cw && high == Mode::PR && gm == Mode::PR { Mode::CW } else { high };
                out.push(Effect::Bast { node: gr.node, lkid: gr.lkid, mode });
                gr.highbast = high;
            }
        }
    }

    /// A resource that a new master rebuilds from the holders' reports.
    pub fn rebuilding() -> Resource {
        Resource { rebuilding: true, ..Resource::default() }
    }

    /// Lock recovery: drops the locks of departed nodes. A departed PW/EX holder
    /// may have written the LVB, or been about to: it becomes invalid. Nothing is
    /// granted yet (that waits for [`recovery_grant`](Self::recovery_grant)).
    pub fn purge(&mut self, departed: &std::collections::BTreeSet<NodeId>) {
        let mut invalid = false;
        for q in [&mut self.grant, &mut self.convert, &mut self.wait] {
            q.retain(|l| {
                let gone = departed.contains(&l.node);
                invalid |= gone && matches!(l.grmode, Some(Mode::PW | Mode::EX));
                !gone
            });
        }
        self.rebuild_middle.retain(|(l, ..)| !departed.contains(&l.node));
        if invalid {
            self.valnotvalid = true;
        }
    }

    /// What the master knows of lock (`node`, `lkid`), for a holder's reconciliation.
    pub fn truth(&self, node: NodeId, lkid: LkId) -> Option<super::message::TruthState> {
        self.locks().find(|(_, l)| l.key() == (node, lkid)).map(|(q, l)| super::message::TruthState {
            granted: l.grmode,
            requested: if q == Queue::Grant { None } else { l.rqmode },
            sb_flags: l.sbflags,
            lvb: l.lvb,
            seq: l.seq,
            last: l.last,
        })
    }

    /// Lock recovery on a new master: adds the granted locks a holder reported.
    /// Requests in progress are not added (their holders send them again once
    /// recovery is over).
    pub fn rebuild_add(&mut self, node: NodeId, locks: &[super::message::RecLock]) {
        for r in locks {
            if self.contains(node, r.lkid) || self.rebuild_middle.iter().any(|(l, ..)| l.key() == (node, r.lkid)) {
                continue;
            }
            let mut lkb = Lkb::new(node, r.lkid, Mode::NL, Flags::empty(), r.lvb);
            lkb.rqmode = None;
            lkb.seq = r.seq;
            if let Some(rq) = r.middle {
                self.rebuild_middle.push((lkb, r.granted.unwrap_or(Mode::NL), rq, r.alt));
                continue;
            }
            let Some(g) = r.granted else { continue };
            lkb.grmode = Some(g);
            let rank = match g {
                Mode::PW | Mode::EX => 2,
                Mode::PR | Mode::CW => 1,
                _ => 0,
            };
            if let (true, Some(v)) = (rank > 0, r.lvb) {
                if self.rebuild_lvb.is_none_or(|(best, _)| rank > best) {
                    self.rebuild_lvb = Some((rank, v));
                }
            }
            self.add_granted(lkb);
        }
    }

    /// Ends a rebuild: the conversions whose outcome the departed master took
    /// with it get a granted mode, and the LVB is the one of the strongest
    /// reported lock above CR, or invalid when only NL/CR locks (or none) remain
    /// (`recover_lvb`).
    ///
    /// Each such lock's real mode is the one its holder had, its requested mode
    /// or its alternate mode, and the real modes were compatible with the modes
    /// the other holders report (which are never stronger than their real
    /// ones): the first assignment, in order of preference, compatible with the
    /// reported granted locks and with each other is taken. A PR↔CW conversion
    /// prefers what Linux's `recover_conversion` gives it (the PR or CW mode
    /// some granted lock holds, else its requested mode: the departed master
    /// had granted it); another prefers the mode its holder had (a grant its
    /// holder never heard of was never relied on), then its alternate mode,
    /// then its requested one. (Any of them is safe for what its holder relied
    /// on meanwhile: whatever it allows, one of the three allowed too.)
    pub fn finish_rebuild(&mut self) {
        if !self.rebuilding {
            return;
        }
        self.rebuilding = false;
        let held = self.grant.iter().find_map(|l| l.grmode.filter(|m| matches!(m, Mode::PR | Mode::CW)));
        let middles = std::mem::take(&mut self.rebuild_middle);
        let candidates: Vec<Vec<Mode>> = middles
            .iter()
            .map(|&(_, g, rq, alt)| {
                let mut c = if matches!((g, rq), (Mode::PR, Mode::CW) | (Mode::CW, Mode::PR)) {
                    vec![held.unwrap_or(rq), rq, g]
                } else {
                    vec![g, alt.unwrap_or(g), rq]
                };
                c.dedup();
                c
            })
            .collect();
        let granted: Vec<Mode> = self.grant.iter().filter_map(|l| l.grmode).collect();
        let mut chosen = Vec::with_capacity(middles.len());
        if !Self::settle(&candidates, &granted, &mut chosen) {
            // Cannot happen while the holders' reports are true.
            tracing::warn!("no consistent mode for conversions lost with their master; NL given");
            chosen.clear();
        }
        for ((mut lkb, ..), mode) in middles.into_iter().zip(chosen.into_iter().chain(std::iter::repeat(Mode::NL))) {
            lkb.grmode = Some(mode);
            self.add_granted(lkb);
        }
        match self.rebuild_lvb.take() {
            Some((_, v)) => {
                self.lvb = v;
                self.valnotvalid = false;
            }
            None => {
                self.lvb = [0; LVB_LEN];
                self.valnotvalid = true;
            }
        }
    }

    /// Depth-first search for the first assignment of `candidates` (one list
    /// per lock, in order of preference) compatible with `granted` and with
    /// itself.
    fn settle(candidates: &[Vec<Mode>], granted: &[Mode], chosen: &mut Vec<Mode>) -> bool {
        let Some(first) = candidates.get(chosen.len()) else { return true };
        for &m in first {
            if granted.iter().chain(chosen.iter()).all(|o| o.compatible(m)) {
                chosen.push(m);
                if Self::settle(candidates, granted, chosen) {
                    return true;
                }
                chosen.pop();
            }
        }
        false
    }

    /// Lock recovery is over: BASTs may be sent again for every mode, conversions
    /// queued before recovery are granted without regard to their order (as the
    /// DLM does after recovery), then the queues are served as usual.
    pub fn recovery_grant(&mut self, out: &mut Vec<Effect>) {
        for l in self.grant.iter_mut().chain(self.convert.iter_mut()) {
            l.highbast = Mode::NL;
        }
        loop {
            let i = (0..self.convert.len()).find(|&i| {
                let l = &self.convert[i];
                l.rqmode.is_some_and(|rq| {
                    !queue_conflict(&self.grant, l.key(), rq) && !queue_conflict(&self.convert, l.key(), rq)
                })
            });
            let Some(i) = i else { break };
            let lkb = self.convert.remove(i);
            let rq = lkb.rqmode.unwrap_or(Mode::NL);
            self.grant_lock(lkb, rq, false, out);
        }
        self.grant_pending(out);
    }

    /// Whether any queued lock could be granted now (a bug: grant_pending missed it).
    #[cfg(test)]
    pub fn has_grantable_waiter(&self) -> bool {
        self.convert
            .iter()
            .chain(self.wait.iter())
            .any(|l| matches!(self.can_be_granted(l, false), Grantable::Yes { .. }))
    }

    /// Checks the master's own invariants: granted modes (on the grant and convert
    /// queues) pairwise compatible, queue membership consistent. Panics on violation.
    #[cfg(test)]
    pub fn check(&self, settled: bool) {
        let held: Vec<&Lkb> = self.grant.iter().chain(self.convert.iter()).collect();
        for (i, a) in held.iter().enumerate() {
            assert!(a.grmode.is_some(), "granted lock without grmode: {a:?}");
            for b in &held[i + 1..] {
                let (ga, gb) = (a.grmode.unwrap(), b.grmode.unwrap());
                assert!(ga.compatible(gb), "incompatible grants {a:?} {b:?}");
            }
        }
        for l in &self.grant {
            assert!(l.rqmode.is_none(), "granted lock with rqmode: {l:?}");
        }
        for l in &self.convert {
            assert!(l.rqmode.is_some(), "converting lock without rqmode: {l:?}");
        }
        for l in &self.wait {
            assert!(l.grmode.is_none() && l.rqmode.is_some(), "bad waiter {l:?}");
        }
        if settled {
            assert!(!self.has_grantable_waiter(), "a queued lock could be granted: {self:?}");
        }
    }
}
