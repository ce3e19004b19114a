//! Concord's own cache of file data, held per inode.
//!
//! The device is opened with `O_DIRECT` (DESIGN.md, "Storage"), so nothing below the
//! daemon caches file data, and the kernel's page cache above holds only what buffered
//! readers read: this cache is where small `O_DIRECT` reads through FUSE are served from
//! when they come again. Entries are clean
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

use std::collections::VecDeque;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::format::DirEntry;

/// A directory's entries in readdir order (cookie, that is name hash, then name), as
/// cached per directory: built once from the device, then kept up to date by every
/// change to the directory (so that neither a lookup nor the next `ls` after a create
/// has to read the whole directory again).
///
/// The entries are kept in sorted runs of at most [`CHUNK`] entries, each run one
/// contiguous allocation, the runs in order. A readdir walks the runs front to back, so
/// the CPU's prefetcher streams them in. In a `BTreeSet` (what this was) every node of
/// eleven entries is its own allocation, made in the random order in which names hash;
/// in a cold `ls -f` of 20,000 names, 85 % of the samples in the FUSE readdir handler
/// (a third of the daemon's time) were two loads that missed the CPU cache, one per
/// entry and one per node. With runs, the daemon's time during that `ls` fell by 40 %.
/// An insert or a remove moves at most one run's tail (at most 8 KiB).
#[derive(Debug, Clone, Default)]
pub struct Listing {
    /// Sorted, non-empty runs; every entry of a run sorts before every entry of the next.
    runs: Vec<Vec<Listed>>,
    len: usize,
}

/// The most entries a [`Listing`] run holds; a run that grows past it is split in two.
const CHUNK: usize = 128;

impl Listing {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, in readdir order.
    pub fn iter(&self) -> impl Iterator<Item = &Listed> {
        self.runs.iter().flatten()
    }

    /// The entries after readdir cookie `cookie` (whose hash is greater), in order.
    pub fn after(&self, cookie: u64) -> impl Iterator<Item = &Listed> {
        let (r, i) = self.find(&probe(cookie.saturating_add(1)));
        self.iter_from(r, i).skip_while(move |e| e.hash <= cookie)
    }

    /// The entry named `name`, whose hash is `hash`.
    pub fn get(&self, hash: u64, name: &[u8]) -> Option<&Listed> {
        self.position(hash, name).map(|(r, i)| &self.runs[r][i])
    }

    /// Where the entry named `name` (hash `hash`) is: (run, index in the run). Entries
    /// sharing a hash may straddle runs.
    fn position(&self, hash: u64, name: &[u8]) -> Option<(usize, usize)> {
        let (mut r, mut i) = self.find(&probe(hash));
        while let Some(run) = self.runs.get(r) {
            for (k, e) in run.iter().enumerate().skip(i) {
                if e.hash != hash {
                    return None;
                }
                if *e.name == *name {
                    return Some((r, k));
                }
            }
            (r, i) = (r + 1, 0);
        }
        None
    }

    /// The entries from position (run `r`, index `i`) on, in order.
    fn iter_from(&self, r: usize, i: usize) -> impl Iterator<Item = &Listed> {
        let head = self.runs.get(r).map_or(&[][..], |run| &run[i..]);
        head.iter().chain(self.runs.iter().skip(r + 1).flatten())
    }

    /// Where `key` is or would go: (run, index in the run). The run is the first whose
    /// last entry is not below `key`, or the last run when every entry is below it.
    fn find(&self, key: &Listed) -> (usize, usize) {
        let r = self.runs.partition_point(|run| run[run.len() - 1] < *key);
        let r = r.min(self.runs.len().saturating_sub(1));
        let i = self.runs.get(r).map_or(0, |run| run.partition_point(|e| e < key));
        (r, i)
    }

    pub(crate) fn insert(&mut self, e: DirEntry) {
        self.insert_listed(Listed::from(e));
    }

    fn insert_listed(&mut self, e: Listed) {
        if self.runs.is_empty() {
            let mut run = Vec::with_capacity(CHUNK);
            run.push(e);
            self.runs.push(run);
            self.len = 1;
            return;
        }
        let (r, i) = self.find(&e);
        let run = &mut self.runs[r];
        if run.get(i) == Some(&e) {
            return;
        }
        self.len += 1;
        if run.len() < CHUNK {
            return run.insert(i, e);
        }
        // Full: split it in halves first, so that no run ever outgrows its allocation.
        let mut upper = Vec::with_capacity(CHUNK);
        upper.extend(run.drain(CHUNK / 2..));
        if i <= CHUNK / 2 {
            run.insert(i, e);
        } else {
            upper.insert(i - CHUNK / 2, e);
        }
        self.runs.insert(r + 1, upper);
    }

    /// Removes the entry named `name` (hash `hash`), if there is one.
    pub(crate) fn remove(&mut self, hash: u64, name: &[u8]) {
        let Some((r, i)) = self.position(hash, name) else { return };
        let run = &mut self.runs[r];
        run.remove(i);
        self.len -= 1;
        if run.is_empty() {
            self.runs.remove(r);
        }
    }
}

/// Two listings are equal when they hold the same entries, however they are split in runs.
impl PartialEq for Listing {
    fn eq(&self, o: &Self) -> bool {
        self.len == o.len && self.iter().eq(o.iter())
    }
}

impl Eq for Listing {}

impl FromIterator<DirEntry> for Listing {
    fn from_iter<I: IntoIterator<Item = DirEntry>>(it: I) -> Self {
        let mut all: Vec<Listed> = it.into_iter().map(Listed::from).collect();
        all.sort_unstable();
        all.dedup();
        let len = all.len();
        let mut entries = all.into_iter();
        let runs = (0..len.div_ceil(CHUNK))
            .map(|_| {
                let mut run = Vec::with_capacity(CHUNK);
                run.extend(entries.by_ref().take(CHUNK));
                run
            })
            .collect();
        Listing { runs, len }
    }
}

/// Name bytes a [`Listed`] entry holds inline; longer names go to the heap.
const INLINE_NAME: usize = 32;

/// A directory entry as a [`Listing`] keeps it. Its name is stored inline when it is
/// short (most names are), so that walking a listing in readdir order reads only the
/// B-tree's nodes. With every name in its own heap allocation, made in creation order
/// but walked in hash order, a cold `ls -f` of 20,000 names missed the CPU cache once
/// per entry: 40 % of the daemon's time during the `ls` went to loading the names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub hash: u64,
    pub ino: u64,
    pub dtype: u8,
    pub name: SmallVec<[u8; INLINE_NAME]>,
}

impl Listed {
    /// The entry as the directory format has it.
    pub fn entry(&self) -> DirEntry {
        DirEntry { hash: self.hash, ino: self.ino, dtype: self.dtype, name: self.name.to_vec() }
    }
}

impl From<DirEntry> for Listed {
    fn from(e: DirEntry) -> Listed {
        Listed { hash: e.hash, ino: e.ino, dtype: e.dtype, name: SmallVec::from_slice(&e.name) }
    }
}

/// The order of [`DirEntry`]: cookie (hash), then name; readdir's order.
impl Ord for Listed {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.hash, &self.name[..], self.ino, self.dtype).cmp(&(o.hash, &o.name[..], o.ino, o.dtype))
    }
}

impl PartialOrd for Listed {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// The first possible entry with hash `hash`.
fn probe(hash: u64) -> Listed {
    Listed { hash, ino: 0, dtype: 0, name: SmallVec::new() }
}

use parking_lot::Mutex;
use rustc_hash::FxHashMap as HashMap;

use crate::format::{Block, BLOCK_SIZE};

#[derive(Debug, Default)]
struct PerInode {
    blocks: HashMap<u64, Arc<Block>>,
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
    /// A cache holding at most `bytes` of file data (0 disables it).
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
    #[cfg(test)]
    fn get(&self, ino: u64, lblk: u64) -> Option<Arc<Block>> {
        self.inner.lock().inodes.get(&ino)?.blocks.get(&lblk).cloned()
    }

    /// The cached blocks among `[first, first + n)` of `ino`, in order (None: not
    /// cached).
    pub fn get_range(&self, ino: u64, first: u64, n: u64) -> Vec<Option<Arc<Block>>> {
        let g = self.inner.lock();
        let Some(p) = g.inodes.get(&ino) else { return vec![None; n as usize] };
        (first..first + n).map(|b| p.blocks.get(&b).cloned()).collect()
    }

    /// Caches clean copies of blocks of `ino`, evicting the oldest entries when full.
    pub fn insert(&self, ino: u64, blocks: impl IntoIterator<Item = (u64, Arc<Block>)>) {
        let mut blocks = blocks.into_iter().peekable();
        // Nothing to keep (a read served from the cache, a stuffed file): no entry for
        // the inode, and no lock taken.
        if self.limit == 0 || blocks.peek().is_none() {
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
    }

    /// Drops everything.
    pub fn clear(&self) {
        let mut g = self.inner.lock();
        g.inodes.clear();
        g.fifo.clear();
        g.count = 0;
    }

    /// Drops everything cached for `ino`.
    pub fn drop_inode(&self, ino: u64) {
        let mut g = self.inner.lock();
        if let Some(p) = g.inodes.remove(&ino) {
            g.count -= p.blocks.len();
        }
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
    fn inserting_nothing_leaves_no_entry() {
        let c = DataCache::new(64 * BLOCK_SIZE);
        for ino in 0..100 {
            c.insert(ino, []);
        }
        assert!(c.inner.lock().inodes.is_empty());
        c.insert(7, [(0, blk(1))]);
        assert_eq!(c.inner.lock().inodes.len(), 1);
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

    proptest::proptest! {
        // Inserts and removes, enough to split runs many times and to empty some,
        // against a `BTreeSet` of the same entries: same order, same length, same
        // answers from `get` and `after`.
        #[test]
        fn listing_matches_a_sorted_set_through_inserts_and_removes(
            ops in proptest::collection::vec((proptest::bool::weighted(0.7), 0u64..600, 0u8..4), 1..1500),
            cookies in proptest::collection::vec(0u64..620, 1..8),
        ) {
            let mut l = Listing::default();
            let mut model = std::collections::BTreeSet::new();
            for (add, hash, n) in ops {
                let name = vec![b'a' + n; 1 + n as usize * 20];
                if add {
                    let e = DirEntry { hash, ino: hash * 10 + u64::from(n), dtype: 1, name };
                    l.insert(e.clone());
                    model.insert(e);
                } else {
                    l.remove(hash, &name);
                    model.retain(|e: &DirEntry| !(e.hash == hash && e.name == name));
                }
            }
            proptest::prop_assert_eq!(l.len(), model.len());
            let all: Vec<DirEntry> = l.iter().map(Listed::entry).collect();
            proptest::prop_assert_eq!(&all, &model.iter().cloned().collect::<Vec<_>>());
            for e in &model {
                proptest::prop_assert_eq!(l.get(e.hash, &e.name).map(Listed::entry), Some(e.clone()));
            }
            for c in cookies {
                let want: Vec<DirEntry> = model.iter().filter(|e| e.hash > c).cloned().collect();
                proptest::prop_assert_eq!(l.after(c).map(Listed::entry).collect::<Vec<_>>(), want);
                proptest::prop_assert!(l.get(c, b"not-a-name").is_none());
            }
            let rebuilt: Listing = model.iter().cloned().collect();
            proptest::prop_assert_eq!(&rebuilt, &l);
        }
    }

    /// A listing walks its entries in `DirEntry` order (cookie, then name), finds each
    /// by name and removes exactly the one named: for names shorter and longer than
    /// what is kept inline, and for names that share a cookie.
    #[test]
    fn listing_keeps_readdir_order_for_short_long_and_colliding_names() {
        let mut entries: Vec<DirEntry> = Vec::new();
        for len in [1, 7, INLINE_NAME - 1, INLINE_NAME, INLINE_NAME + 1, 100, 255] {
            for k in 0..5u8 {
                let name: Vec<u8> = (0..len).map(|i| b'a' + ((i as u8).wrapping_mul(7) ^ k) % 26).collect();
                entries.push(DirEntry::new(&name, 100 + entries.len() as u64, 1));
            }
        }
        // Names sharing one cookie, their inode numbers in the opposite order.
        let long = b"a-long-name-that-is-not-kept-inline-in-the-entry";
        for (i, name) in [&long[..], b"b", b"a", b"m"].into_iter().enumerate() {
            entries.push(DirEntry { hash: 42, ino: 10 - i as u64, dtype: 1, name: name.to_vec() });
        }
        let mut l: Listing = entries.iter().rev().cloned().collect();
        entries.sort();
        assert_eq!(l.iter().map(Listed::entry).collect::<Vec<_>>(), entries);
        for e in &entries {
            assert_eq!(l.get(e.hash, &e.name).map(Listed::entry).as_ref(), Some(e));
        }
        let past_42: Vec<DirEntry> = entries.iter().filter(|e| e.hash > 42).cloned().collect();
        assert_eq!(l.after(42).map(Listed::entry).collect::<Vec<_>>(), past_42);
        l.remove(42, b"b");
        l.remove(42, b"absent");
        assert!(l.get(42, b"b").is_none());
        assert!(l.get(42, b"a").is_some() && l.get(42, b"m").is_some() && l.get(42, long).is_some());
        assert_eq!(l.len(), entries.len() - 1);
    }
}
