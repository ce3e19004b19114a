//! Glocks: a node's cached holds on DLM locks, as GFS2's glock.c, as a sans-IO state
//! machine (docs/internals/glocks.md).
//!
//! A glock is named `(type, number)` ([`GlockName`]) and is in one of the states UN, SH,
//! DF, EX ([`GlState`]), held at the DLM as NL, PR, CW, EX ([`dlm_mode`]). Local
//! holders queue on it; the DLM lock stays cached after the last one leaves, so taking
//! it again costs no message. A BAST asks for a demote, which waits for the holders
//! and, for inode glocks, the minimum hold time, then syncs, invalidates and converts
//! down.
//!
//! [`Glocks`] owns all glocks of a mount. It does no I/O, starts no threads and reads
//! no clock: each input carries `now_ms`, and the work it creates comes out as
//! [`Action`]s.
//!
//! # Driving it
//!
//! 1. Feed inputs as they happen: [`Glocks::acquire`] / [`Glocks::try_cached`] /
//!    [`Glocks::release`] from filesystem operations, [`Glocks::handle_ast`] and
//!    [`Glocks::handle_bast`] from the DLM, [`Glocks::sync_done`] and
//!    [`Glocks::inval_done`] when the work of a `Sync` or `Invalidate` finishes,
//!    [`Glocks::set_blocked`] from lock recovery, [`Glocks::evict`] from the cache
//!    shrinker.
//! 2. After each input, drain [`Glocks::poll_action`] until `None` and carry every
//!    action out (the order within one drain matters only per glock, and is kept):
//!    * `Dlm { name, req }`: send the request; report its AST with `handle_ast`.
//!    * `Cancel { name }`: cancel the outstanding request of `name`.
//!    * `Unlock { name }`: unlock the DLM lock; the glock is gone.
//!    * `Sync { name }`: commit the journal, log revokes, write back the object's dirty
//!      data and metadata, wait for direct I/O; then `sync_done`. On an I/O error,
//!      withdraw instead: the glock stays locked and is never released to others.
//!    * `Invalidate { name, metadata }`: drop cached pages (and attributes, entries,
//!      metadata when `metadata`), our own and the kernel's; then `inval_done`.
//!    * `Granted { holder, .. }` / `Failed { holder, .. }`: wake the waiting operation.
//! 3. Then set the timer to [`Glocks::next_deadline`] and call
//!    [`Glocks::handle_timeout`] when it passes.
//!
//! Sync and invalidate run on the runtime's demote thread, never on a FUSE request
//! thread, and never while holding a lock a FUSE request may need.
//!
//! # The runtime
//!
//! [`GlockRuntime`] does all of the above for a mount, on a lockspace joined through
//! lockd's client ([`concord_lockd::client::LockspaceHandle`]):
//!
//! * [`GlockRuntime::acquire`] blocks the calling OS thread until the holder is
//!   granted or failed and returns a [`GlockHold`], which releases on drop;
//!   [`GlockRuntime::try_cached`] is the non-blocking hot path.
//! * DLM requests, conversions, cancels and unlocks are tokio tasks; a task reads
//!   BASTs, another sleeps until [`Glocks::next_deadline`]. Resource names are GFS2's
//!   (`"%8x%16llx"`, [`dlm_resource_name`]).
//! * `Sync` and `Invalidate` call the filesystem's [`GlockOps`] on one OS thread
//!   (`glock-demote`); a failed sync, a lost lockd connection or repeated DLM
//!   failures withdraw the runtime ([`GlockRuntime::withdraw`]): every acquire fails
//!   with [`GlockError::Io`] and no DLM request goes out any more.
//! * [`GlockRuntime::shutdown`] unlocks every DLM lock at unmount.

mod machine;
#[cfg(test)]
mod random;
mod runtime;
#[cfg(test)]
mod scenario;
mod stats;
mod types;

pub use runtime::*;

pub use machine::{Action, AstResult, DlmRequest, GlockError, GlockTop, Glocks, HolderId, Poll, Tunables};
pub use stats::GlockStats;
pub use types::{dlm_mode, make_flags, DlmFlags, DlmMode, GlFlags, GlState, GlockName, GlockType, HolderFlags};
