//! Concord's own cache of file data, held per inode, with sequential readahead.
//!
//! The device is opened with `O_DIRECT` (DESIGN.md, "Storage"), so nothing below the
//! daemon caches file data: this cache is where a re-read, an `O_DIRECT` read through
//! FUSE, or the next requests of a sequential read are served from. Entries are clean
//! copies of whole 4 KiB blocks keyed by (inode, logical block), so that one call,
//! [`DataCache::drop_inode`], drops everything cached for an inode: what a glock demote
//! will do in the cluster mode. Memory is bounded by a byte limit; the oldest
//! insertions go first (FIFO).
//!
//! Coherence within one node comes from the inode locks: a reader fills the cache
//! while it holds the inode shared and after every in-flight write to the range has
//! finished; every path that changes file data on the device (write, zeroing, truncate,
//! punch, freeing the inode) drops the affected blocks while it holds the inode
//! exclusively. Holes are never cached.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::format::{Block, BLOCK_SIZE};

/// Readahead grows up to this many bytes beyond a sequential read.
pub const READAHEAD_MAX: u64 = 4 << 20;
/// The first readahead window after two sequential reads.
const READAHEAD_MIN: u64 = 256 << 10;

#[derive(Debug, Default)]
struct PerInode {
    blocks: HashMap<u64, Arc<Block>>,
    /// The end of the last read (the next sequential offset) and the current window.
    next: u64,
    window: u64,
    /// Readahead already read up to here (bytes): a sequential read inside it needs
    /// no new readahead until it nears the end.
    ahead_to: u64,
}

#[derive(Debug, Default)]
struct Inner {
    inodes: HashMap<u64, PerInode>,
    /// Insertion order for eviction; entries dropped meanwhile are skipped.
    fifo: VecDeque<(u64, u64)>,
    count: usize,
}

/// Clean file data cached per inode.
#[derive(Debug)]
pub struct DataCache {
    inner: Mutex<Inner>,
    limit: usize,
}

impl DataCache {
    /// A cache holding at most `bytes` of file data (0 disables it, readahead included).
    pub fn new(bytes: usize) -> DataCache {
        DataCache { inner: Mutex::new(Inner::default()), limit: bytes / BLOCK_SIZE }
    }

    pub fn enabled(&self) -> bool {
        self.limit > 0
    }

    /// Blocks cached (for tests and status).
    pub fn len(&self) -> usize {
        self.inner.lock().count
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The cached copy of logical block `lblk` of `ino`.
    pub fn get(&self, ino: u64, lblk: u64) -> Option<Arc<Block>> {
        self.inner.lock().inodes.get(&ino)?.blocks.get(&lblk).cloned()
    }

    /// Copies the cached blocks among `[first, first + n)` into `out` (block `first`
    /// at offset 0); returns which ones were found.
    pub fn get_range(&self, ino: u64, first: u64, n: u64) -> Vec<Option<Arc<Block>>> {
        let g = self.inner.lock();
        let Some(p) = g.inodes.get(&ino) else { return vec![None; n as usize] };
        (first..first + n).map(|b| p.blocks.get(&b).cloned()).collect()
    }

    /// Caches clean copies of blocks of `ino`, evicting the oldest entries when full.
    pub fn insert(&self, ino: u64, blocks: impl IntoIterator<Item = (u64, Arc<Block>)>) {
        if self.limit == 0 {
            return;
        }
        let mut g = self.inner.lock();
        let g = &mut *g;
        let p = g.inodes.entry(ino).or_default();
        for (lblk, b) in blocks {
            if p.blocks.insert(lblk, b).is_none() {
                g.count += 1;
                g.fifo.push_back((ino, lblk));
            }
        }
        while g.count > self.limit {
            let Some((i, l)) = g.fifo.pop_front() else { break };
            if let Some(p) = g.inodes.get_mut(&i) {
                if p.blocks.remove(&l).is_some() {
                    g.count -= 1;
                }
            }
        }
        // Dropped entries stay in the FIFO until popped; keep it proportional.
        if g.fifo.len() > 2 * g.count + 1024 {
            let inodes = &g.inodes;
            g.fifo.retain(|(i, l)| inodes.get(i).is_some_and(|p| p.blocks.contains_key(l)));
        }
    }

    /// Drops the cached blocks of `ino` in `[from, to)` (logical blocks).
    pub fn drop_range(&self, ino: u64, from: u64, to: u64) {
        let mut g = self.inner.lock();
        let g = &mut *g;
        let Some(p) = g.inodes.get_mut(&ino) else { return };
        let before = p.blocks.len();
        if to.saturating_sub(from) < p.blocks.len() as u64 {
            for b in from..to {
                p.blocks.remove(&b);
            }
        } else {
            p.blocks.retain(|&b, _| b < from || b >= to);
        }
        g.count -= before - p.blocks.len();
        p.ahead_to = p.ahead_to.min(from.saturating_mul(BLOCK_SIZE as u64));
    }

    /// Drops everything cached for `ino`, readahead state included.
    pub fn drop_inode(&self, ino: u64) {
        let mut g = self.inner.lock();
        if let Some(p) = g.inodes.remove(&ino) {
            g.count -= p.blocks.len();
        }
    }

    /// Records a read of `[off, end)` and returns how far the device read should
    /// extend for readahead: `end` itself for a read that is not sequential, or that
    /// earlier readahead already covers well enough.
    pub fn readahead(&self, ino: u64, off: u64, end: u64) -> u64 {
        if self.limit == 0 {
            return end;
        }
        let mut g = self.inner.lock();
        let p = g.inodes.entry(ino).or_default();
        let sequential = off == p.next || (off < p.next && end > p.next);
        p.next = end;
        if !sequential {
            p.window = 0;
            p.ahead_to = 0;
            return end;
        }
        // Read ahead again once less than half a window is left in front, with a
        // window twice the last one.
        if p.ahead_to >= end + p.window / 2 {
            return end;
        }
        p.window = (p.window * 2).clamp(READAHEAD_MIN, READAHEAD_MAX);
        let to = end + p.window;
        p.ahead_to = to;
        to
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blk(v: u8) -> Arc<Block> {
        Arc::new([v; BLOCK_SIZE])
    }

    #[test]
    fn bounded_and_oldest_evicted_first() {
        let c = DataCache::new(4 * BLOCK_SIZE);
        c.insert(1, (0..3).map(|i| (i, blk(i as u8))));
        c.insert(2, (0..3).map(|i| (i, blk(10 + i as u8))));
        assert_eq!(c.len(), 4);
        assert!(c.get(1, 0).is_none() && c.get(1, 1).is_none());
        assert_eq!(c.get(1, 2).unwrap()[0], 2);
        assert_eq!(c.get(2, 2).unwrap()[0], 12);
    }

    #[test]
    fn drops_by_range_and_by_inode() {
        let c = DataCache::new(64 * BLOCK_SIZE);
        c.insert(1, (0..10).map(|i| (i, blk(i as u8))));
        c.insert(2, (0..10).map(|i| (i, blk(i as u8))));
        c.drop_range(1, 3, 5);
        assert!(c.get(1, 3).is_none() && c.get(1, 4).is_none());
        assert!(c.get(1, 2).is_some() && c.get(1, 5).is_some());
        c.drop_range(1, 8, u64::MAX);
        assert!(c.get(1, 8).is_none() && c.get(1, 9).is_none() && c.get(1, 7).is_some());
        assert_eq!(c.len(), 6 + 10);
        c.drop_inode(2);
        assert_eq!(c.len(), 6);
        assert!(c.get(2, 0).is_none());
        // Re-inserting after drops keeps the FIFO consistent.
        for _ in 0..1000 {
            c.insert(3, [(0, blk(1))]);
            c.drop_inode(3);
        }
        assert_eq!(c.len(), 6);
        assert!(c.inner.lock().fifo.len() <= 2 * 6 + 1025);
    }

    #[test]
    fn readahead_only_for_sequential_reads() {
        let c = DataCache::new(1 << 30);
        let m = 1u64 << 20;
        // A read from the start of a file counts as sequential, as in the kernel.
        assert!(c.readahead(1, 0, m) > m);
        // A first read elsewhere is not known to be sequential; the next one is.
        assert_eq!(c.readahead(2, 10 * m, 11 * m), 11 * m);
        let a = c.readahead(2, 11 * m, 12 * m);
        assert!(a > 12 * m);
        // Inside what was read ahead, no new readahead until it runs short.
        assert_eq!(c.readahead(2, 12 * m, 12 * m + 4096), 12 * m + 4096);
        // A random read resets it.
        assert_eq!(c.readahead(2, 100 * m, 101 * m), 101 * m);
        assert_eq!(c.readahead(2, 5 * m, 6 * m), 6 * m);
        // Disabled cache: no readahead.
        let off = DataCache::new(0);
        assert_eq!(off.readahead(1, 0, m), m);
        assert_eq!(off.readahead(1, m, 2 * m), 2 * m);
    }
}
