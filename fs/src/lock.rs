//! Lock handles: every access to an inode or an rgrp goes through one.
//!
//! In `lock_nolock` mode (one node) the locks are local read/write locks, as the VFS's
//! inode locks are under GFS2's nolock module; the cluster mode will put glocks behind
//! the same calls. Callers take locks in the order of DESIGN.md ("Lock order"): rename,
//! inodes (parent before child, otherwise by number), rgrps, then the transaction.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};

/// What is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockName {
    Rename,
    Inode(u64),
    Rgrp(u64),
    /// Who has inode `n` open or referenced (cluster mounts: every node holds it
    /// shared while it does; the last one anywhere gets it exclusive and frees an
    /// unlinked inode). Never taken inside the filesystem lock.
    Iopen(u64),
    /// Journal `jid` (cluster mounts: its owner holds it exclusive while mounted, a
    /// recovering node while it replays it). Never taken inside the filesystem lock.
    Journal(u32),
}

/// Shared (glock SH, DLM PR) or exclusive (glock EX, DLM EX).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// A granted hold; dropping it releases the hold (the lock itself may stay cached).
#[derive(Debug)]
#[must_use]
pub struct LockHold {
    pub name: LockName,
    pub mode: LockMode,
    table: Option<Arc<LockTable>>,
    /// A lock module's own hold (a glock holder), released when dropped.
    _guard: Option<Box<dyn std::any::Any + Send>>,
}

impl LockHold {
    /// A hold that releases nothing when dropped (for lock modules that track
    /// nothing, and tests).
    pub fn new(name: LockName, mode: LockMode) -> LockHold {
        LockHold { name, mode, table: None, _guard: None }
    }

    /// A hold whose release is `guard`'s drop (a glock holder).
    pub fn with_guard(name: LockName, mode: LockMode, guard: Box<dyn std::any::Any + Send>) -> LockHold {
        LockHold { name, mode, table: None, _guard: Some(guard) }
    }
}

impl Drop for LockHold {
    fn drop(&mut self) {
        if let Some(t) = self.table.take() {
            t.release(self.name, self.mode);
        }
    }
}

/// Which inode numbers' glocks (inode, iopen and flock share a directory node) have
/// their DLM directory entry on this node: the first request for them is answered by
/// this node's lockd, without a message to another node. The allocator prefers such
/// numbers for new inodes; a wrong answer (a membership change under way) costs a
/// round trip, never correctness. docs/internals/cluster.md, "Creates without a round
/// trip".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalDirectory {
    me: u32,
    /// Sorted.
    members: Vec<u32>,
}

impl LocalDirectory {
    pub fn new(me: u32, mut members: Vec<u32>) -> LocalDirectory {
        members.sort_unstable();
        members.dedup();
        LocalDirectory { me, members }
    }

    /// Whether inode number `ino`'s glocks have their directory entry here.
    pub fn is_local(&self, ino: u64) -> bool {
        if self.members.is_empty() {
            return true;
        }
        // Lockd places the inode glock's name by its number part, which the iopen
        // and flock glocks of the inode share.
        let name = crate::glock::dlm_resource_name_bytes(crate::glock::GlockName {
            ty: crate::glock::GlockType::Inode,
            number: ino,
        });
        concord_lockd::core::directory::directory_node(&self.members, &name) == self.me
    }
}

/// The lock module the filesystem was mounted with.
pub trait LockModule: Send + Sync + std::fmt::Debug {
    /// Acquires `name` in `mode`, waiting as long as needed.
    fn acquire(&self, name: LockName, mode: LockMode) -> crate::Result<LockHold>;
    /// Acquires `name` only if that needs no waiting (no other local holder in the way,
    /// no DLM message): called with the filesystem mutex held, where no wait is allowed.
    fn try_now(&self, name: LockName, mode: LockMode) -> crate::Result<Option<LockHold>> {
        self.acquire(name, mode).map(Some)
    }
    /// Acquires `name` if no other holder is in the way, here or on another node
    /// (a DLM request with NOQUEUE): `None` when one is. Never waits for a holder.
    fn try_acquire(&self, name: LockName, mode: LockMode) -> crate::Result<Option<LockHold>> {
        self.try_now(name, mode)
    }
    /// Drops what the module caches of `name` once nobody holds it (a cluster gives
    /// the DLM lock back, so that another node can take it at once).
    /// Starts taking `name` in `mode` without waiting, for a lock the caller will ask
    /// for soon (the iopen glock of an inode being made while its inode glock is
    /// requested): both requests then travel at once. Never blocks.
    fn prefetch(&self, _name: LockName, _mode: LockMode) {}

    /// Cluster mounts: which inode numbers' glocks have their DLM directory entry on
    /// this node, as of the lockspace's last view. None: no preference.
    fn local_directory(&self) -> Option<LocalDirectory> {
        None
    }

    /// Whether requests of this node wait for `name` (asked during its demote).
    fn has_waiters(&self, _name: LockName) -> bool {
        false
    }

    /// Whether another node asked for `name` and this node has not given it back yet
    /// (a demote due, pending or under way): what is read under it now must not be
    /// cached beyond the demote.
    fn demote_requested(&self, _name: LockName) -> bool {
        false
    }

    /// The kernel confirmed the invalidation that a demote of `name` reported
    /// unconfirmed: a loan of the glock to local requests can end
    /// ([`crate::glock::Glocks::inval_confirmed`]). Called on a fuse-notify thread.
    fn kernel_confirmed(&self, _name: LockName) {}

    fn uncache(&self, _name: LockName) {}
    /// Starts giving back what the module caches of `name` without waiting for it.
    fn uncache_soon(&self, _name: LockName) {}
    /// [`uncache`](Self::uncache) of many names at once (their DLM locks go back in
    /// parallel).
    fn uncache_all(&self, names: &[LockName]) {
        for n in names {
            self.uncache(*n);
        }
    }
    /// The protocol's name, as in the superblock.
    fn proto(&self) -> &'static str;
    /// Whether other nodes share the device (lock_dlm): caches are then only valid
    /// under a held lock, and what a lock protects is re-read when it is granted.
    fn is_cluster(&self) -> bool {
        false
    }
    /// The cluster's file lock service (flock and fcntl locks across nodes), for a
    /// cluster mount. None for lock_nolock: the kernel's own locks are right on one
    /// node and cost nothing.
    fn plocks(&self) -> Option<Arc<dyn crate::plock::Plocks>> {
        None
    }
}

/// Local read/write locks by name: many shared holders or one exclusive holder.
#[derive(Debug, Default)]
pub struct LockTable {
    held: Mutex<HashMap<LockName, (u32, bool)>>,
    cv: Condvar,
}

impl LockTable {
    fn try_acquire(self: &Arc<Self>, name: LockName, mode: LockMode) -> Option<LockHold> {
        let mut held = self.held.lock();
        let e = held.entry(name).or_insert((0, false));
        let free = match mode {
            LockMode::Shared => !e.1,
            LockMode::Exclusive => !e.1 && e.0 == 0,
        };
        if !free {
            return None;
        }
        match mode {
            LockMode::Shared => e.0 += 1,
            LockMode::Exclusive => e.1 = true,
        }
        Some(LockHold { name, mode, table: Some(self.clone()), _guard: None })
    }

    fn acquire(self: &Arc<Self>, name: LockName, mode: LockMode) -> LockHold {
        let mut held = self.held.lock();
        loop {
            let e = held.entry(name).or_insert((0, false));
            let free = match mode {
                LockMode::Shared => !e.1,
                LockMode::Exclusive => !e.1 && e.0 == 0,
            };
            if free {
                match mode {
                    LockMode::Shared => e.0 += 1,
                    LockMode::Exclusive => e.1 = true,
                }
                return LockHold { name, mode, table: Some(self.clone()), _guard: None };
            }
            self.cv.wait(&mut held);
        }
    }

    fn release(&self, name: LockName, mode: LockMode) {
        let mut held = self.held.lock();
        if let Some(e) = held.get_mut(&name) {
            match mode {
                LockMode::Shared => e.0 = e.0.saturating_sub(1),
                LockMode::Exclusive => e.1 = false,
            }
            if *e == (0, false) {
                held.remove(&name);
            }
        }
        self.cv.notify_all();
    }

    /// Names currently held (for dumps and tests).
    pub fn held(&self) -> Vec<LockName> {
        let mut v: Vec<LockName> = self.held.lock().keys().copied().collect();
        v.sort();
        v
    }
}

/// `lock_nolock`: one node; locks are local read/write locks.
#[derive(Debug, Default)]
pub struct NoLock {
    table: Arc<LockTable>,
}

impl LockModule for NoLock {
    fn acquire(&self, name: LockName, mode: LockMode) -> crate::Result<LockHold> {
        Ok(self.table.acquire(name, mode))
    }
    fn try_now(&self, name: LockName, mode: LockMode) -> crate::Result<Option<LockHold>> {
        Ok(self.table.try_acquire(name, mode))
    }
    fn proto(&self) -> &'static str {
        crate::format::LOCKPROTO_NOLOCK
    }
}

/// Acquires every lock in `names` in the design's lock order, deduplicated.
pub fn acquire_ordered(m: &dyn LockModule, names: &mut Vec<LockName>, mode: LockMode) -> crate::Result<Vec<LockHold>> {
    names.sort();
    names.dedup();
    names.iter().map(|n| m.acquire(*n, mode)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_and_shared_shares() {
        let m = Arc::new(NoLock::default());
        let a = m.acquire(LockName::Inode(5), LockMode::Shared).unwrap();
        let b = m.acquire(LockName::Inode(5), LockMode::Shared).unwrap();
        let m2 = m.clone();
        let got = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let got2 = got.clone();
        let t = std::thread::spawn(move || {
            let _x = m2.acquire(LockName::Inode(5), LockMode::Exclusive).unwrap();
            got2.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!got.load(std::sync::atomic::Ordering::SeqCst), "exclusive granted beside shared holders");
        drop(a);
        drop(b);
        t.join().unwrap();
        assert!(got.load(std::sync::atomic::Ordering::SeqCst));
        assert!(m.table.held().is_empty(), "every hold released");
    }
}
