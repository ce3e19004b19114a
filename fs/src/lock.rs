//! Lock handles: every access to an inode or an rgrp goes through one.
//!
//! In `lock_nolock` mode (one node) a request is granted at once, as GFS2's nolock
//! module does; the cluster mode will put glocks behind the same calls. Callers take
//! locks in the order of DESIGN.md ("Lock order"): rename, inodes (parent before child,
//! otherwise by number), rgrps, then the transaction.

/// What is locked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockName {
    Rename,
    Inode(u64),
    Rgrp(u64),
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
}

/// The lock module the filesystem was mounted with.
pub trait LockModule: Send + Sync + std::fmt::Debug {
    /// Acquires `name` in `mode`, waiting as long as needed.
    fn acquire(&self, name: LockName, mode: LockMode) -> crate::Result<LockHold>;
    /// The protocol's name, as in the superblock.
    fn proto(&self) -> &'static str;
}

/// `lock_nolock`: one node, every request granted at once.
#[derive(Debug, Default)]
pub struct NoLock;

impl LockModule for NoLock {
    fn acquire(&self, name: LockName, mode: LockMode) -> crate::Result<LockHold> {
        Ok(LockHold { name, mode })
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
