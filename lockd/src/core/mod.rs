//! The lockspace core: the Linux DLM's lock semantics and its directory/master
//! protocol as a state machine without I/O.
//!
//! * [`types`]: modes and the compatibility matrix, request flags, completion
//!   statuses with their Linux values, AST flags, LVBs, lock ids, errors.
//! * [`Lockspace`]: one node's view of one lockspace. Local calls
//!   ([`Lockspace::request`], [`convert`](Lockspace::convert),
//!   [`unlock`](Lockspace::unlock), [`cancel`](Lockspace::cancel)) and peer messages
//!   ([`Lockspace::handle_message`]) go in; [`Message`]s to send, [`Event`]s (ASTs and
//!   BASTs) for the local user and the next timer deadline come out.
//! * Each resource has a master node that keeps its grant, convert and wait queues
//!   and applies the Linux DLM's grant rules (`_can_be_granted`): never conflict with
//!   a granted mode; a new request is granted at once only if no conversion and no
//!   other request waits (unless NOORDER, or EXPEDITE for NL); a conversion is
//!   granted in place when compatible unless QUECVT; queued conversions before
//!   queued requests, each FIFO (HEADQUE at the head); ALTPR/ALTCW; NOQUEUE
//!   (-EAGAIN) and NOQUEUEBAST; CANCEL; conversion deadlock (-EDEADLK to the
//!   conversion that would close the cycle); LVB read on grant and written on
//!   conversion down from, or unlock of, PW/EX; BASTs to the granted locks that
//!   block a request, with the Linux DLM's suppression of repeated BASTs.
//! * The directory node of a name is `sorted_members[(crc32c(name) >> 16) % n]`; the
//!   first node to look a name up becomes its master and the directory remembers
//!   it, so a resource used by one node only is mastered there and costs no
//!   message. A master drops a resource nobody has held for
//!   [`LockspaceConfig::idle_ms`] and tells the directory; other nodes forget their
//!   cached master after the same time.
//!
//! Deviations from Linux, on purpose (the last two were found by the simulation):
//! * unlocking a lock with a request or conversion in progress is refused
//!   ([`LockError::Busy`]; cancel first), so that every accepted operation gets
//!   exactly one AST;
//! * a new request with HEADQUE, and a conversion with QUECVT plus HEADQUE or
//!   NOORDER, are judged at once as they would be once queued (Linux queues them
//!   and grants them only at the next `grant_pending_locks`);
//! * a conversion going to the head of the convert queue (HEADQUE) is refused with
//!   -EDEADLK when a conversion already queued holds a mode that blocks it (Linux
//!   misses this conversion deadlock and both wait forever);
//! * CONVDEADLK, IVVALBLK, PERSISTENT, FORCEUNLOCK and TIMEOUT are not offered.
//!
//! A [`Message`] belongs to one lockspace: the transport carries the lockspace's
//! name (or id) and the sender's node id beside it, and delivers the messages of
//! each sender in order (one stream per peer pair).
//!
//! Lock recovery: every message carries the generation of its sender's view.
//! [`Lockspace::begin_recovery`] enters a new view (members with the generation in
//! which each joined, as the membership layer commits them): messages of older
//! generations are dropped from then on, departed nodes' locks are purged, the
//! directory is rebuilt from the surviving masters, resources whose master
//! departed get a new master rebuilt from the holders' reports (LVB from a lock
//! above CR, else VALNOTVALID; a departed PW/EX holder also invalidates it), each
//! holder reconciles its operations in progress with the master's view, and
//! [`Event::Recovered`] ends it. Calls made meanwhile are held and go on after.
//! See `lockspace/recovery.rs` for the protocol and its barriers.
//!
//! Tests: golden scenario files in `src/core/testdata/` (one per DLM behaviour,
//! run against several lockspaces in one process; `REWRITE=1` regenerates them),
//! and a deterministic simulation (`sim.rs`) of 3 to 5 nodes with random traffic,
//! random per-link delays and invariant checks after every step.
//!
//! # Example
//!
//! Two nodes in one process, messages carried by hand:
//!
//! ```
//! use concord_lockd::core::{Event, Flags, LockRequest, Lockspace, Mode, Status};
//!
//! let mut nodes = vec![
//!     Lockspace::new("fs1", 1, vec![1, 2], 1),
//!     Lockspace::new("fs1", 2, vec![1, 2], 2),
//! ];
//! // Delivers every queued message, in order, until the cluster is quiet.
//! fn pump(nodes: &mut [Lockspace]) {
//!     loop {
//!         let mut moved = false;
//!         for i in 0..nodes.len() {
//!             while let Some((to, generation, msg)) = nodes[i].poll_transmit() {
//!                 let from = nodes[i].our_node();
//!                 nodes[(to - 1) as usize].handle_message(0, from, generation, msg);
//!                 moved = true;
//!             }
//!         }
//!         if !moved {
//!             return;
//!         }
//!     }
//! }
//!
//! let ex = |name: &[u8], flags| LockRequest { name: name.to_vec(), mode: Mode::EX, flags, lvb: None };
//! let a = nodes[0].request(0, ex(b"inode/42", Flags::empty())).unwrap();
//! pump(&mut nodes);
//! assert!(matches!(nodes[0].poll_event(),
//!     Some(Event::Ast { lkid, status: Status::Granted, mode: Some(Mode::EX), .. }) if lkid == a));
//!
//! // Node 2 tries without waiting: -EAGAIN, and no BAST without NOQUEUEBAST.
//! nodes[1].request(0, ex(b"inode/42", Flags::NOQUEUE)).unwrap();
//! pump(&mut nodes);
//! assert!(matches!(nodes[1].poll_event(), Some(Event::Ast { status: Status::Again, .. })));
//!
//! // Node 2 waits; node 1 gets a BAST for EX and unlocks; node 2 is granted.
//! let b = nodes[1].request(0, ex(b"inode/42", Flags::empty())).unwrap();
//! pump(&mut nodes);
//! assert_eq!(nodes[0].poll_event(), Some(Event::Bast { lkid: a, mode: Mode::EX }));
//! nodes[0].unlock(0, a, None).unwrap();
//! pump(&mut nodes);
//! assert!(matches!(nodes[0].poll_event(), Some(Event::Ast { status: Status::Unlocked, .. })));
//! assert!(matches!(nodes[1].poll_event(),
//!     Some(Event::Ast { lkid, status: Status::Granted, .. }) if lkid == b));
//! ```

pub mod directory;
mod lockspace;
mod message;
mod resource;
pub mod types;

#[cfg(test)]
mod harness;
#[cfg(test)]
mod scenario;
#[cfg(test)]
mod sim;

pub use directory::directory_node;
pub use lockspace::{Event, LockDump, LockRequest, Lockspace, LockspaceConfig, ResourceDump};
pub use message::Message;
pub use resource::Queue;
pub use types::{
    compatible, Flags, LkId, LockError, Lvb, Mode, NodeId, SbFlags, Status, DLM_ECANCEL, DLM_EUNLOCK, EAGAIN, EDEADLK,
    LVB_LEN, MAX_NAME_LEN,
};
