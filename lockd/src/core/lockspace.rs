//! The lockspace state machine of one node: local calls, the remote protocol with
//! directory and master nodes, idle resource removal, and the drained outputs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::directory::directory_node;
use super::message::Message;
use super::resource::{Effect, Lkb, Queue, Resource};
mod recovery;

/// Most messages kept for later (newer generation, or normal messages during
/// recovery) before more are dropped.
const MAX_SAVED: usize = 1 << 20;

use super::types::{
    check_convert_flags, check_name, check_request_flags, Flags, LkId, LockError, Lvb, Mode, NodeId, SbFlags, Status,
    LVB_LEN,
};

/// A new lock request (the arguments of `dlm_lock` without CONVERT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockRequest {
    /// Resource name, 1 to 64 bytes.
    pub name: Vec<u8>,
    /// Requested mode.
    pub mode: Mode,
    /// Request flags (see [`Flags::REQUEST_ALLOWED`]).
    pub flags: Flags,
    /// Initial LVB buffer of the lock (it is overwritten by the read on grant when
    /// VALBLK is set); zeros if None.
    pub lvb: Option<Lvb>,
}

/// An output for the local user of the lockspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Completion AST: the request, conversion, unlock or cancel on `lkid` finished.
    /// Exactly one per accepted request, conversion or unlock.
    Ast {
        /// The lock.
        lkid: LkId,
        /// The completion status.
        status: Status,
        /// Status flags (ALTMODE, VALNOTVALID).
        flags: SbFlags,
        /// Granted mode after the operation; None if the lock no longer exists
        /// (unlocked, or a new request that failed or was cancelled).
        mode: Option<Mode>,
        /// The lock's LVB buffer after a granted operation with VALBLK.
        lvb: Option<Lvb>,
    },
    /// Blocking AST: a request for `mode` waits behind this lock.
    Bast {
        /// The lock.
        lkid: LkId,
        /// The blocked request's mode.
        mode: Mode,
    },
    /// Lock recovery for `generation` is complete on this node: every member
    /// reconciled its locks; operations held during recovery have gone on.
    Recovered {
        /// The generation of the view that was recovered.
        generation: u64,
    },
}

/// Tunables of a lockspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockspaceConfig {
    /// How long a resource with no lock is kept (mastered, or its master cached)
    /// before it is dropped; a master tells the directory node. Default 10 s.
    pub idle_ms: u64,
}

impl Default for LockspaceConfig {
    fn default() -> Self {
        LockspaceConfig { idle_ms: 10_000 }
    }
}

/// One lock of a resource, in a [`ResourceDump`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockDump {
    /// Holder node.
    pub node: NodeId,
    /// The holder's lock id.
    pub lkid: LkId,
    /// Granted mode, if granted.
    pub granted: Option<Mode>,
    /// Requested mode, if a request or conversion is in progress.
    pub requested: Option<Mode>,
    /// The queue the lock is on (for a resource mastered elsewhere, as this node
    /// sees its own lock: Wait for a request in progress, Convert for a conversion).
    pub queue: Queue,
}

/// One resource as this node knows it, for `concord dlm lockdump`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceDump {
    /// Resource name.
    pub name: Vec<u8>,
    /// Master node; None while the lookup is in progress.
    pub master: Option<NodeId>,
    /// The LVB and its write sequence, known on the master only.
    pub lvb: Option<(Lvb, u64)>,
    /// All locks (on the master), or this node's locks (elsewhere).
    pub locks: Vec<LockDump>,
}

/// The one timer kind of the lockspace; the table is ordered by deadline.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// Drop the resource if it is still unused.
    ResourceIdle(Vec<u8>),
}

/// What this node knows of a resource's master.
#[derive(Debug)]
enum Role {
    /// We master it.
    Master(Resource),
    /// It is mastered by that node.
    Remote(NodeId),
    /// A lookup is in flight; these requests wait for its answer.
    LookingUp(Vec<LkId>),
    /// Lock recovery lost the master (it departed, or a lookup was in flight):
    /// recovery or the first request afterwards looks it up again.
    Unknown,
}

/// A resource known to this node (`dlm_rsb`).
#[derive(Debug)]
struct Rsb {
    role: Role,
    /// Our own locks on it.
    our_locks: BTreeSet<LkId>,
    /// When set, the idle timer that will drop it.
    idle_deadline: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OpKind {
    Request,
    Convert,
    Unlock,
}

#[derive(Clone, Debug)]
struct Pending {
    kind: OpKind,
    mode: Mode,
    flags: Flags,
    lvb: Option<Lvb>,
    /// A cancel was asked for.
    cancel: bool,
    /// The operation was sent to (or performed on) the current master. False for
    /// operations made during lock recovery, or lost with a departed master or a
    /// dropped message: they are (re)sent when recovery ends.
    sent: bool,
    /// A PR<->CW conversion whose master departed before answering: the new
    /// master settles its granted mode (see recovery.rs).
    middle: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LastCallback {
    Cast,
    Bast(Mode),
}

/// A lock of ours (the holder's lkb and lksb).
#[derive(Debug)]
struct HeldLock {
    name: Vec<u8>,
    /// Where its operations go; None while its request waits for a lookup.
    master: Option<NodeId>,
    granted: Option<Mode>,
    pending: Option<Pending>,
    /// The lksb's LVB buffer.
    lvb: Lvb,
    /// The resource's LVB as of the last grant that read or wrote it (with
    /// VALBLK, not flagged VALNOTVALID), which lock recovery may rebuild the
    /// resource from; the buffer itself may since hold a value the user means
    /// to write.
    lvb_read: Option<Lvb>,
    /// Mode of the last completion delivered, for BAST suppression.
    last_cast: Option<Mode>,
    last_callback: Option<LastCallback>,
    /// Completions heard from the master (see `resource::Lkb::seq`).
    seq: u32,
}

/// The lockspace state machine of one node, without I/O.
///
/// Inputs: the local calls [`request`](Self::request), [`convert`](Self::convert),
/// [`unlock`](Self::unlock), [`cancel`](Self::cancel); [`handle_message`](Self::handle_message)
/// for every message from a peer; [`handle_timeout`](Self::handle_timeout) when the
/// time given by [`poll_timeout`](Self::poll_timeout) has come. After any input, drain
/// [`poll_transmit`](Self::poll_transmit) (send each message to its node, in order:
/// the protocol needs per-peer FIFO delivery) and [`poll_event`](Self::poll_event)
/// (ASTs and BASTs for the local user), then re-arm the timer from `poll_timeout`.
/// Time is the caller's clock in milliseconds, passed in as `now`.
#[derive(Debug)]
pub struct Lockspace {
    name: String,
    our_node: NodeId,
    /// Sorted members of the current generation.
    members: Vec<NodeId>,
    /// The generation in which each member joined: a member that left and joined
    /// again between two views this node saw is a new member (its old locks go).
    since: BTreeMap<NodeId, u64>,
    /// Generation of the membership view (1 for a lockspace made with
    /// [`Lockspace::new`]; every view change makes it larger).
    generation: u64,
    config: LockspaceConfig,
    /// High bits of our lock ids: random per incarnation, so that a delayed message
    /// about a lock of a previous run of this node does not name a live lock.
    lkid_base: u64,
    next_lkid: u64,
    locks: BTreeMap<LkId, HeldLock>,
    rsbs: BTreeMap<Vec<u8>, Rsb>,
    /// Directory entries for names whose directory node we are: name → master.
    directory: BTreeMap<Vec<u8>, NodeId>,
    timers: BTreeSet<(u64, Timer)>,
    /// Lock recovery in progress.
    recovery: Option<recovery::Recovery>,
    /// Messages of a newer generation than ours (kept until we reach it), and
    /// normal messages of our generation that arrived during recovery.
    saved: Vec<(NodeId, u64, Message)>,
    /// Messages to send: (to, generation they belong to, message).
    transmits: VecDeque<(NodeId, u64, Message)>,
    events: VecDeque<Event>,
}

fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}

impl Lockspace {
    /// A lockspace `name` on node `our_node` with the given members (in any order).
    /// `seed` seeds the lockspace's randomness (the random high half of its lock
    /// ids).
    ///
    /// # Panics
    ///
    /// If `our_node` is not among `members` (a caller bug).
    pub fn new(name: impl Into<String>, our_node: NodeId, members: Vec<NodeId>, seed: u64) -> Self {
        let mut members = members;
        members.sort_unstable();
        members.dedup();
        assert!(
            members.binary_search(&our_node).is_ok(),
            "node {our_node} is not among the lockspace members {members:?}"
        );
        let mut rng = SmallRng::seed_from_u64(seed);
        Lockspace {
            name: name.into(),
            our_node,
            since: members.iter().map(|m| (*m, 1)).collect(),
            members,
            generation: 1,
            config: LockspaceConfig::default(),
            lkid_base: u64::from(rng.gen::<u32>()) << 32,
            next_lkid: 1,
            locks: BTreeMap::new(),
            rsbs: BTreeMap::new(),
            directory: BTreeMap::new(),
            timers: BTreeSet::new(),
            recovery: None,
            saved: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Replaces the tunables.
    pub fn with_config(mut self, config: LockspaceConfig) -> Self {
        self.config = config;
        self
    }

    /// The lockspace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This node.
    pub fn our_node(&self) -> NodeId {
        self.our_node
    }

    /// The sorted members of the current generation.
    pub fn members(&self) -> &[NodeId] {
        &self.members
    }

    /// The generation of the membership view.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The directory node of a resource name.
    pub fn directory_node(&self, name: &[u8]) -> NodeId {
        directory_node(&self.members, name)
    }

    /// Number of live locks of ours.
    pub fn lock_count(&self) -> usize {
        self.locks.len()
    }

    /// Number of resources this node knows (mastered, cached or being looked up).
    pub fn resource_count(&self) -> usize {
        self.rsbs.len()
    }

    /// Number of directory entries this node keeps.
    pub fn directory_len(&self) -> usize {
        self.directory.len()
    }

    /// Whether this node masters `name`.
    pub fn is_master(&self, name: &[u8]) -> bool {
        matches!(self.rsbs.get(name), Some(Rsb { role: Role::Master(_), .. }))
    }

    /// The next message to send: its destination, the generation it belongs to
    /// (the receiver passes it to [`handle_message`](Self::handle_message)), and
    /// the message.
    pub fn poll_transmit(&mut self) -> Option<(NodeId, u64, Message)> {
        self.transmits.pop_front()
    }

    /// The next AST or BAST for the local user.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.recovery.is_some() {
            return None;
        }
        self.timers.first().map(|(at, _)| *at)
    }

    /// Requests a new lock. On `Ok` exactly one [`Event::Ast`] will follow for it.
    pub fn request(&mut self, now: u64, req: LockRequest) -> Result<LkId, LockError> {
        check_name(&req.name)?;
        check_request_flags(req.mode, req.flags)?;
        let lkid = self.alloc_lkid();
        self.locks.insert(
            lkid,
            HeldLock {
                name: req.name.clone(),
                master: None,
                granted: None,
                pending: Some(Pending {
                    kind: OpKind::Request,
                    mode: req.mode,
                    flags: req.flags,
                    lvb: req.lvb,
                    cancel: false,
                    sent: false,
                    middle: false,
                }),
                lvb: req.lvb.unwrap_or([0; LVB_LEN]),
                lvb_read: None,
                last_cast: None,
                last_callback: None,
                seq: 0,
            },
        );
        if !self.rsbs.contains_key(&req.name) {
            let role = if self.recovery.is_some() { Role::Unknown } else { self.resolve_master(&req.name) };
            self.rsbs.insert(req.name.clone(), Rsb { role, our_locks: BTreeSet::new(), idle_deadline: None });
        }
        if let Some(rsb) = self.rsbs.get_mut(&req.name) {
            rsb.our_locks.insert(lkid);
        }
        if self.recovery.is_none() {
            self.dispatch_request(now, lkid);
        }
        self.update_idle(now, &req.name);
        Ok(lkid)
    }

    /// Converts granted lock `lkid` to `mode` (the CONVERT flag is implied). With
    /// VALBLK, `lvb` (if Some) replaces the lock's LVB buffer first; the buffer is
    /// written to the resource on a conversion down from PW/EX, and the resource's
    /// LVB is read into it on a conversion up. On `Ok` exactly one AST follows.
    pub fn convert(
        &mut self,
        now: u64,
        lkid: LkId,
        mode: Mode,
        flags: Flags,
        lvb: Option<Lvb>,
    ) -> Result<(), LockError> {
        let lock = self.locks.get_mut(&lkid).ok_or(LockError::UnknownLock(lkid))?;
        if lock.pending.is_some() {
            return Err(LockError::Busy(lkid));
        }
        let Some(granted) = lock.granted else {
            return Err(LockError::UnknownLock(lkid));
        };
        // A granted lock always has a master, except during recovery.
        let master = lock.master.unwrap_or(self.our_node);
        check_convert_flags(granted, mode, flags)?;
        let flags = flags | Flags::CONVERT;
        if let (true, Some(v)) = (flags.contains(Flags::VALBLK), lvb) {
            lock.lvb = v;
        }
        let lvb = flags.contains(Flags::VALBLK).then_some(lock.lvb);
        let running = self.recovery.is_none();
        lock.pending =
            Some(Pending { kind: OpKind::Convert, mode, flags, lvb, cancel: false, sent: running, middle: false });
        let name = lock.name.clone();
        if !running {
            // Sent when recovery ends.
        } else if master == self.our_node {
            let mut out = Vec::new();
            let us = self.our_node;
            let res = self.master_resource(&name);
            let r = res.map(|res| res.convert(us, lkid, mode, flags, lvb, &mut out));
            debug_assert!(matches!(r, Some(Ok(()))), "local convert refused: {r:?}");
            self.apply_effects(now, out);
        } else {
            self.send(master, Message::Convert { name: name.clone(), lkid, mode, flags, lvb });
        }
        self.update_idle(now, &name);
        Ok(())
    }

    /// Unlocks granted lock `lkid` (no operation may be in progress: cancel it
    /// first). With `lvb` (VALBLK), a lock held in PW or EX writes it to the
    /// resource. On `Ok` exactly one AST with -DLM_EUNLOCK follows.
    pub fn unlock(&mut self, now: u64, lkid: LkId, lvb: Option<Lvb>) -> Result<(), LockError> {
        let lock = self.locks.get_mut(&lkid).ok_or(LockError::UnknownLock(lkid))?;
        if lock.pending.is_some() {
            return Err(LockError::Busy(lkid));
        }
        let Some(granted) = lock.granted else {
            return Err(LockError::UnknownLock(lkid));
        };
        let master = lock.master.unwrap_or(self.our_node);
        if let Some(v) = lvb {
            lock.lvb = v;
        }
        lock.pending = Some(Pending {
            kind: OpKind::Unlock,
            mode: granted,
            flags: if lvb.is_some() { Flags::VALBLK } else { Flags::empty() },
            lvb,
            cancel: false,
            sent: self.recovery.is_none(),
            middle: false,
        });
        let name = lock.name.clone();
        if self.recovery.is_some() {
            // Sent when recovery ends.
        } else if master == self.our_node {
            let mut out = Vec::new();
            let us = self.our_node;
            let res = self.master_resource(&name);
            let r = res.map(|res| res.unlock(us, lkid, lvb, &mut out));
            debug_assert!(matches!(r, Some(Ok(()))), "local unlock refused: {r:?}");
            self.apply_effects(now, out);
        } else {
            self.send(master, Message::Unlock { name: name.clone(), lkid, lvb });
        }
        self.update_idle(now, &name);
        Ok(())
    }

    /// Cancels the request or conversion in progress on `lkid`. The cancel itself
    /// has no AST: the operation it targets completes with -DLM_ECANCEL (a request is
    /// gone, a conversion is back in its granted mode), or with 0 if it was granted
    /// before the cancel reached the master. Cancelling twice is harmless.
    pub fn cancel(&mut self, now: u64, lkid: LkId) -> Result<(), LockError> {
        let lock = self.locks.get_mut(&lkid).ok_or(LockError::UnknownLock(lkid))?;
        let Some(p) = lock.pending.as_mut() else {
            return Err(LockError::NothingToCancel(lkid));
        };
        if p.kind == OpKind::Unlock {
            return Err(LockError::Busy(lkid));
        }
        if p.cancel {
            return Ok(());
        }
        p.cancel = true;
        // A PR<->CW conversion whose master departed has a granted mode only the
        // new master knows: it is sent again and cancelled there.
        let sent = p.sent || p.middle;
        let name = lock.name.clone();
        if self.recovery.is_some() {
            if !sent {
                // It never reached a master: cancelled at once.
                if let Some(Rsb { role: Role::LookingUp(waiting), .. }) = self.rsbs.get_mut(&name) {
                    waiting.retain(|l| *l != lkid);
                }
                self.finish_canceled(now, lkid);
            }
            // Otherwise the cancel is sent when recovery ends, if still needed.
            return Ok(());
        }
        match lock.master {
            None => {
                // Still waiting for the lookup: never reached a master.
                if let Some(Rsb { role: Role::LookingUp(waiting), .. }) = self.rsbs.get_mut(&name) {
                    waiting.retain(|l| *l != lkid);
                }
                self.finish_op(now, lkid, Status::Canceled, None, SbFlags::empty(), None);
            }
            Some(m) if m == self.our_node => {
                let mut out = Vec::new();
                let us = self.our_node;
                let res = self.master_resource(&name);
                let r = res.map(|res| res.cancel(us, lkid, &mut out));
                debug_assert!(matches!(r, Some(Ok(()))), "local cancel refused: {r:?}");
                self.apply_effects(now, out);
            }
            Some(m) => {
                self.send(m, Message::Cancel { name: name.clone(), lkid });
            }
        }
        self.update_idle(now, &name);
        Ok(())
    }

    /// Handles a message from peer `from`. Messages that do not fit (unknown lock,
    /// wrong sender or state, bad name) are logged and dropped.
    ///
    /// `generation` is the one the sender stamped it with (see
    /// [`poll_transmit`](Self::poll_transmit)): a message of an older generation is
    /// dropped (recovery reconciles what it would have done), one of a newer
    /// generation is kept until this node enters that generation, and a normal
    /// message that arrives while this node recovers is kept until recovery ends
    /// (the Linux DLM's requestqueue).
    pub fn handle_message(&mut self, now: u64, from: NodeId, generation: u64, msg: Message) {
        if generation < self.generation {
            tracing::debug!(
                node = self.our_node,
                from,
                generation,
                kind = msg.kind(),
                "message of an old generation dropped"
            );
            return;
        }
        if generation > self.generation || (self.recovery.is_some() && !msg.is_recovery()) {
            if self.saved.len() >= MAX_SAVED {
                tracing::warn!(node = self.our_node, from, generation, "too many saved messages; dropped");
                return;
            }
            self.saved.push((from, generation, msg));
            return;
        }
        if from == self.our_node || self.members.binary_search(&from).is_err() {
            tracing::warn!(node = self.our_node, from, "message from a non-member dropped");
            return;
        }
        match msg {
            Message::Lookup { name } => {
                if check_name(&name).is_err() || self.directory_node(&name) != self.our_node {
                    tracing::warn!(node = self.our_node, from, res = %show(&name), "misdirected lookup");
                    return;
                }
                let master = *self.directory.entry(name.clone()).or_insert(from);
                self.send(from, Message::LookupReply { name, master });
            }
            Message::LookupReply { name, master } => self.on_lookup_reply(now, from, name, master),
            Message::Request { name, lkid, mode, flags, lvb } => {
                if check_name(&name).is_err() || check_request_flags(mode, flags).is_err() {
                    tracing::warn!(node = self.our_node, from, "malformed request dropped");
                    return;
                }
                let mut out = Vec::new();
                match self.master_resource(&name) {
                    Some(res) => {
                        if let Err(e) = res.request(Lkb::new(from, lkid, mode, flags, lvb), &mut out) {
                            tracing::warn!(node = self.our_node, from, %lkid, ?e, "request refused");
                        }
                    }
                    None => {
                        self.send(from, Message::NotMaster { name, lkid });
                        return;
                    }
                }
                self.apply_effects(now, out);
                self.update_idle(now, &name);
            }
            Message::Convert { name, lkid, mode, flags, lvb } => {
                let mut out = Vec::new();
                let r = self.master_resource(&name).map(|res| res.convert(from, lkid, mode, flags, lvb, &mut out));
                self.after_master_op(now, from, lkid, &name, r, out);
            }
            Message::Unlock { name, lkid, lvb } => {
                let mut out = Vec::new();
                let r = self.master_resource(&name).map(|res| res.unlock(from, lkid, lvb, &mut out));
                self.after_master_op(now, from, lkid, &name, r, out);
            }
            Message::Cancel { name, lkid } => {
                let mut out = Vec::new();
                let r = self.master_resource(&name).map(|res| res.cancel(from, lkid, &mut out));
                // A cancel that finds nothing (its request already ended, or was
                // bounced with NotMaster) is the normal race and is ignored.
                if let Some(Ok(())) = r {
                    self.apply_effects(now, out);
                    self.update_idle(now, &name);
                }
            }
            Message::NotMaster { name, lkid } => self.on_not_master(now, from, name, lkid),
            Message::Ast { lkid, status, mode, sb_flags, lvb } => {
                self.deliver_cast(now, from, lkid, status, mode, sb_flags, lvb)
            }
            Message::Bast { lkid, mode } => self.deliver_bast(from, lkid, mode),
            Message::Remove { name } => {
                if self.directory.get(&name) == Some(&from) {
                    self.directory.remove(&name);
                }
            }
            m => self.handle_recovery_message(now, from, m),
        }
    }

    /// Drops resources whose idle time has run out.
    pub fn handle_timeout(&mut self, now: u64) {
        if self.recovery.is_some() {
            return;
        }
        while let Some((at, _)) = self.timers.first() {
            if *at > now {
                break;
            }
            let Some((at, Timer::ResourceIdle(name))) = self.timers.pop_first() else {
                break;
            };
            let Some(rsb) = self.rsbs.get(&name) else { continue };
            if rsb.idle_deadline != Some(at) || !Self::rsb_idle(rsb) {
                continue;
            }
            let was_master = matches!(rsb.role, Role::Master(_));
            self.rsbs.remove(&name);
            if was_master {
                let dir = self.directory_node(&name);
                tracing::debug!(node = self.our_node, res = %show(&name), "idle resource removed");
                if dir == self.our_node {
                    if self.directory.get(&name) == Some(&self.our_node) {
                        self.directory.remove(&name);
                    }
                } else {
                    self.send(dir, Message::Remove { name });
                }
            }
        }
    }

    /// The resources this node knows, with their locks: all locks for resources it
    /// masters, its own locks for the others.
    pub fn dump(&self) -> Vec<ResourceDump> {
        self.rsbs
            .iter()
            .map(|(name, rsb)| match &rsb.role {
                Role::Master(res) => ResourceDump {
                    name: name.clone(),
                    master: Some(self.our_node),
                    lvb: Some((res.lvb, res.lvb_seq)),
                    locks: res
                        .locks()
                        .map(|(queue, l)| LockDump {
                            node: l.node,
                            lkid: l.lkid,
                            granted: l.grmode,
                            requested: l.rqmode,
                            queue,
                        })
                        .collect(),
                },
                Role::Remote(_) | Role::LookingUp(_) | Role::Unknown => ResourceDump {
                    name: name.clone(),
                    master: match rsb.role {
                        Role::Remote(m) => Some(m),
                        _ => None,
                    },
                    lvb: None,
                    locks: rsb
                        .our_locks
                        .iter()
                        .filter_map(|id| self.locks.get(id).map(|l| (id, l)))
                        .map(|(id, l)| {
                            let requested =
                                l.pending.as_ref().and_then(|p| (p.kind != OpKind::Unlock).then_some(p.mode));
                            LockDump {
                                node: self.our_node,
                                lkid: *id,
                                granted: l.granted,
                                requested,
                                queue: match (l.granted, requested) {
                                    (None, _) => Queue::Wait,
                                    (Some(_), Some(_)) => Queue::Convert,
                                    (Some(_), None) => Queue::Grant,
                                },
                            }
                        })
                        .collect(),
                },
            })
            .collect()
    }

    // ---- internals ----

    /// Queues `msg` for `to`, stamped with our generation.
    fn send(&mut self, to: NodeId, msg: Message) {
        self.transmits.push_back((to, self.generation, msg));
    }

    fn alloc_lkid(&mut self) -> LkId {
        loop {
            let id = LkId(self.lkid_base | (self.next_lkid & 0xffff_ffff));
            self.next_lkid = self.next_lkid.wrapping_add(1);
            if id.0 & 0xffff_ffff != 0 && !self.locks.contains_key(&id) {
                return id;
            }
        }
    }

    fn master_resource(&mut self, name: &[u8]) -> Option<&mut Resource> {
        match self.rsbs.get_mut(name) {
            Some(Rsb { role: Role::Master(res), .. }) => Some(res),
            _ => None,
        }
    }

    /// Finds out who masters `name`: from our own directory entries when we are its
    /// directory node (becoming master if nobody is), else by asking the directory
    /// node.
    fn resolve_master(&mut self, name: &[u8]) -> Role {
        let dir = self.directory_node(name);
        if dir == self.our_node {
            match self.directory.get(name) {
                Some(&m) if m != self.our_node => Role::Remote(m),
                _ => {
                    self.directory.insert(name.to_vec(), self.our_node);
                    Role::Master(Resource::default())
                }
            }
        } else {
            self.send(dir, Message::Lookup { name: name.to_vec() });
            Role::LookingUp(Vec::new())
        }
    }

    /// Sends, queues or performs the pending request of `lkid` according to what we
    /// know of its resource's master.
    fn dispatch_request(&mut self, now: u64, lkid: LkId) {
        let Some(lock) = self.locks.get(&lkid) else { return };
        let Some(p) = lock.pending.clone() else { return };
        let name = lock.name.clone();
        if matches!(self.rsbs.get(&name), Some(Rsb { role: Role::Unknown, .. })) {
            let role = self.resolve_master(&name);
            if let Some(rsb) = self.rsbs.get_mut(&name) {
                rsb.role = role;
            }
        }
        let Some(rsb) = self.rsbs.get_mut(&name) else {
            debug_assert!(false, "lock {lkid} without its resource");
            return;
        };
        let master = match &mut rsb.role {
            Role::LookingUp(waiting) => {
                waiting.push(lkid);
                None
            }
            Role::Remote(m) => Some(*m),
            Role::Master(_) => Some(self.our_node),
            Role::Unknown => None,
        };
        let Some(master) = master else { return };
        if let Some(lock) = self.locks.get_mut(&lkid) {
            lock.master = Some(master);
            if let Some(p) = lock.pending.as_mut() {
                p.sent = true;
            }
        }
        if master == self.our_node {
            let mut out = Vec::new();
            let lkb = Lkb::new(self.our_node, lkid, p.mode, p.flags, p.lvb);
            let r = self.master_resource(&name).map(|res| res.request(lkb, &mut out));
            debug_assert!(matches!(r, Some(Ok(()))), "local request refused: {r:?}");
            self.apply_effects(now, out);
        } else {
            self.send(master, Message::Request { name, lkid, mode: p.mode, flags: p.flags, lvb: p.lvb });
        }
    }

    fn on_lookup_reply(&mut self, now: u64, from: NodeId, name: Vec<u8>, master: NodeId) {
        if self.directory_node(&name) != from || self.members.binary_search(&master).is_err() {
            tracing::warn!(node = self.our_node, from, "bad lookup reply dropped");
            return;
        }
        let Some(rsb) = self.rsbs.get_mut(&name) else {
            if master == self.our_node {
                // We are named master of something we do not hold: give it back so
                // that the directory entry does not point at us forever.
                self.send(from, Message::Remove { name });
            }
            return;
        };
        let Role::LookingUp(waiting) = &mut rsb.role else {
            tracing::warn!(node = self.our_node, from, res = %show(&name), "unexpected lookup reply");
            return;
        };
        let waiting = std::mem::take(waiting);
        rsb.role = if master == self.our_node { Role::Master(Resource::default()) } else { Role::Remote(master) };
        for lkid in waiting {
            self.dispatch_request(now, lkid);
        }
        self.update_idle(now, &name);
    }

    fn on_not_master(&mut self, now: u64, from: NodeId, name: Vec<u8>, lkid: LkId) {
        let Some(lock) = self.locks.get_mut(&lkid) else { return };
        let ok = lock.name == name
            && lock.master == Some(from)
            && matches!(&lock.pending, Some(p) if p.kind == OpKind::Request);
        if !ok {
            tracing::warn!(node = self.our_node, from, %lkid, "unexpected not-master dropped");
            return;
        }
        lock.master = None;
        if lock.pending.as_ref().is_some_and(|p| p.cancel) {
            self.finish_op(now, lkid, Status::Canceled, None, SbFlags::empty(), None);
            return;
        }
        let stale = matches!(self.rsbs.get(&name), Some(Rsb { role: Role::Remote(m), .. }) if *m == from);
        if stale {
            tracing::debug!(node = self.our_node, from, res = %show(&name), "master moved; looking up again");
            let role = self.resolve_master(&name);
            if let Some(rsb) = self.rsbs.get_mut(&name) {
                rsb.role = role;
            }
        }
        self.dispatch_request(now, lkid);
        self.update_idle(now, &name);
    }

    fn after_master_op(
        &mut self,
        now: u64,
        from: NodeId,
        lkid: LkId,
        name: &[u8],
        r: Option<Result<(), super::resource::Refused>>,
        out: Vec<Effect>,
    ) {
        match r {
            Some(Ok(())) => {
                self.apply_effects(now, out);
                self.update_idle(now, name);
            }
            Some(Err(e)) => {
                tracing::warn!(node = self.our_node, from, %lkid, ?e, "operation refused")
            }
            None => {
                tracing::warn!(node = self.our_node, from, %lkid, res = %show(name), "operation on a resource we do not master")
            }
        }
    }

    /// Delivers the master's effects: ours as events, others' as messages.
    fn apply_effects(&mut self, now: u64, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Cast { node, lkid, status, mode, sbflags, lvb } => {
                    if node == self.our_node {
                        self.deliver_cast(now, node, lkid, status, mode, sbflags, lvb);
                    } else {
                        self.send(node, Message::Ast { lkid, status, mode, sb_flags: sbflags, lvb });
                    }
                }
                Effect::Bast { node, lkid, mode } => {
                    if node == self.our_node {
                        self.deliver_bast(node, lkid, mode);
                    } else {
                        self.send(node, Message::Bast { lkid, mode });
                    }
                }
            }
        }
    }

    /// A completion from the master `from` (ourselves for local masters).
    fn deliver_cast(
        &mut self,
        now: u64,
        from: NodeId,
        lkid: LkId,
        status: Status,
        mode: Option<Mode>,
        sbflags: SbFlags,
        lvb: Option<Lvb>,
    ) {
        let Some(lock) = self.locks.get(&lkid) else {
            tracing::warn!(node = self.our_node, from, %lkid, "ast for an unknown lock");
            return;
        };
        let fits = lock.master == Some(from)
            && match (lock.pending.as_ref().map(|p| p.kind), status) {
                (Some(OpKind::Request), Status::Granted) => mode.is_some(),
                (Some(OpKind::Request), Status::Again | Status::Canceled) => true,
                (Some(OpKind::Convert), Status::Granted) => mode.is_some(),
                (Some(OpKind::Convert), Status::Again | Status::Deadlock | Status::Canceled) => true,
                (Some(OpKind::Unlock), Status::Unlocked) => true,
                _ => false,
            };
        if !fits {
            tracing::warn!(node = self.our_node, from, %lkid, ?status, "ast does not fit the lock; dropped");
            return;
        }
        if let Some(l) = self.locks.get_mut(&lkid) {
            l.seq = l.seq.wrapping_add(1);
        }
        self.finish_op(now, lkid, status, mode, sbflags, lvb);
    }

    /// Completes the operation in progress on `lkid` and emits its AST.
    fn finish_op(
        &mut self,
        now: u64,
        lkid: LkId,
        status: Status,
        mode: Option<Mode>,
        sbflags: SbFlags,
        lvb: Option<Lvb>,
    ) {
        let Some(lock) = self.locks.get_mut(&lkid) else { return };
        let Some(p) = lock.pending.take() else { return };
        let gone = match p.kind {
            OpKind::Request => status != Status::Granted,
            OpKind::Convert => false,
            OpKind::Unlock => true,
        };
        if status == Status::Granted {
            // What the holder knows of the resource's LVB, which lock recovery
            // may rebuild it from: a grant that read (or wrote) it returns its
            // value, unless flagged VALNOTVALID; a conversion that keeps it
            // (PR->CW, down to NL/CR) returns only the holder's own buffer, and
            // the value read before still holds (no PW/EX could write it since).
            let op = mode.map(|m| super::types::lvb_op(lock.granted, m));
            if op != Some(super::types::LvbOp::Keep) {
                lock.lvb_read = lvb.filter(|_| !sbflags.contains(SbFlags::VALNOTVALID));
            }
        }
        if status == Status::Granted || (p.kind == OpKind::Convert && mode.is_some()) {
            // A conversion that failed reports the master's granted mode, which
            // lock recovery may have settled differently (a PR<->CW conversion
            // whose master departed).
            lock.granted = mode;
        }
        if let Some(v) = lvb {
            lock.lvb = v;
        }
        let mode = if gone { None } else { lock.granted };
        lock.last_cast = mode;
        lock.last_callback = Some(LastCallback::Cast);
        self.events.push_back(Event::Ast {
            lkid,
            status,
            flags: sbflags,
            mode,
            lvb: if status == Status::Granted { lvb } else { None },
        });
        if gone {
            let name = lock.name.clone();
            self.locks.remove(&lkid);
            if let Some(rsb) = self.rsbs.get_mut(&name) {
                rsb.our_locks.remove(&lkid);
            }
            self.update_idle(now, &name);
        }
    }

    /// A BAST from the master `from`, filtered as `dlm_may_skip_callback` does: not
    /// delivered if the blocked mode is compatible with the mode of the last
    /// completion, or if the previous callback was a BAST for the same mode or a
    /// stronger one above PR.
    fn deliver_bast(&mut self, from: NodeId, lkid: LkId, mode: Mode) {
        let Some(lock) = self.locks.get_mut(&lkid) else { return };
        if lock.master != Some(from) || lock.granted.is_none() {
            tracing::warn!(node = self.our_node, from, %lkid, "bast does not fit the lock; dropped");
            return;
        }
        if lock.last_cast.is_some_and(|c| c.compatible(mode)) {
            return;
        }
        if let Some(LastCallback::Bast(prev)) = lock.last_callback {
            if prev == mode || (prev > mode && prev > Mode::PR) {
                return;
            }
        }
        lock.last_callback = Some(LastCallback::Bast(mode));
        self.events.push_back(Event::Bast { lkid, mode });
    }

    fn rsb_idle(rsb: &Rsb) -> bool {
        rsb.our_locks.is_empty()
            && match &rsb.role {
                Role::Master(res) => res.is_empty(),
                Role::Remote(_) | Role::Unknown => true,
                // The directory may be naming us master right now.
                Role::LookingUp(_) => false,
            }
    }

    /// Arms or disarms the idle timer of `name`.
    fn update_idle(&mut self, now: u64, name: &[u8]) {
        let Some(rsb) = self.rsbs.get_mut(name) else { return };
        let idle = Self::rsb_idle(rsb);
        match (idle, rsb.idle_deadline) {
            (true, None) => {
                let at = now.saturating_add(self.config.idle_ms);
                rsb.idle_deadline = Some(at);
                self.timers.insert((at, Timer::ResourceIdle(name.to_vec())));
            }
            (false, Some(at)) => {
                rsb.idle_deadline = None;
                self.timers.remove(&(at, Timer::ResourceIdle(name.to_vec())));
            }
            _ => {}
        }
    }

    /// Test hook: checks internal invariants of this node. Panics on violation.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        for (name, rsb) in &self.rsbs {
            if let Role::Master(res) = &rsb.role {
                res.check(self.recovery.is_none());
                for (_, l) in res.locks() {
                    if l.node == self.our_node {
                        assert!(self.locks.contains_key(&l.lkid), "master lkb without lock");
                    }
                }
            }
            for id in &rsb.our_locks {
                let l = self.locks.get(id).expect("our_locks names a live lock");
                assert_eq!(&l.name, name);
            }
            if self.recovery.is_none() {
                let armed = rsb.idle_deadline.is_some();
                assert_eq!(armed, Self::rsb_idle(rsb), "idle timer out of step for {}", show(name));
            }
        }
        for (id, l) in &self.locks {
            let rsb = self.rsbs.get(&l.name).expect("a lock's resource is known");
            assert!(rsb.our_locks.contains(id));
            assert!(l.granted.is_some() || l.pending.is_some(), "dead lock kept");
        }
    }
}
