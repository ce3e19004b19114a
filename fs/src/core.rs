//! The mounted filesystem's shared state, the metadata cache and transactions.
//!
//! All metadata changes of one operation go into one [`Tx`]: blocks are read through
//! the transaction (its own dirty copies first, then the cache, then the journal's
//! not-yet-checkpointed copies, then the device), changed copies stay in the
//! transaction, and `commit` hands them to the journal as one transaction. An
//! operation that fails before `commit` leaves nothing behind.

use std::collections::BTreeMap;
use std::sync::Arc;

use rustc_hash::{FxHashMap as HashMap, FxHashSet};

use concord_journal::{BlockDevice, Journal, OrderedWrite, Transaction};

use crate::cache::{DataCache, Listing};
use crate::format::*;
use crate::lock::{LocalDirectory, LockHold, LockMode, LockModule, LockName};
use crate::{FsError, Result};

/// Metadata blocks cached by default (bounded memory: 256 MiB, as much again decoded).
pub(crate) const CACHE_MAX: usize = 65536;

/// Which of eight eviction classes block `addr` is in (a multiplicative hash, so that
/// neighbouring blocks fall in different classes).
fn evict_class(addr: u64) -> u64 {
    addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 61
}

/// Directory entries kept in cached listings, over all directories.
const DIR_CACHE_MAX: usize = 1 << 20;

/// In-memory summary of one rgrp.
#[derive(Debug, Clone)]
pub(crate) struct RgrpInfo {
    pub e: RindexEntry,
    pub free: u32,
}

/// A cached metadata block, decoded (see [`Core::parsed`]).
#[derive(Debug, Clone)]
pub(crate) enum Parsed {
    Dinode(Arc<Dinode>),
    /// An indirect block: its owner and pointers.
    Indirect(u64, Arc<[u64]>),
    Bitmap(Arc<[u8]>),
    /// A directory leaf: its owner and contents.
    Leaf(u64, Arc<Leaf>),
    /// A directory hash table block: its owner and pointers.
    Hash(u64, Arc<[u64]>),
}

impl Parsed {
    /// Panics unless `self` is what decoding `b` gives: a check, in debug builds (and so
    /// in every test), that a form staged beside an encoded block matches it.
    #[cfg(debug_assertions)]
    fn assert_matches(&self, b: &Block, addr: u64) {
        let same = match self {
            Parsed::Dinode(d) => Dinode::decode(b, addr).is_ok_and(|x| x == **d),
            Parsed::Indirect(o, p) => decode_indirect(b, addr, *o, u64::MAX).is_ok_and(|x| x[..] == p[..]),
            Parsed::Bitmap(bits) => decode_bitmap(b, addr).is_ok_and(|x| x[..] == bits[..]),
            Parsed::Leaf(o, l) => Leaf::decode(b, addr, *o).is_ok_and(|x| x == **l),
            Parsed::Hash(o, p) => decode_hash_block(b, addr, *o, u64::MAX).is_ok_and(|x| x[..] == p[..]),
        };
        assert!(same, "block {addr}: staged form {self:?} differs from its encoding");
    }
}

/// The statfs system files of a mount with a journal (docs/internals/glocks.md,
/// "statfs"): every transaction that changes free or dinode counts adds its change to
/// this journal's change file in the same transaction; `Filesystem::statfs_sync`
/// folds it into the master record under the master's glock.
#[derive(Clone, Copy, Debug)]
pub struct StatfsFiles {
    /// The master record's inode.
    pub master: u64,
    /// This journal's change file.
    pub change: u64,
    /// What the change file holds, as of the last transaction.
    pub local: StatfsChange,
}

/// State under the filesystem's lock.
///
/// The metadata block cache (with the decoded forms and directory listings beside it)
/// and the allocator's rgrp state are private to this module: the filesystem, and a
/// glock's invalidation, reach them through methods ([`Core::drop_inode`],
/// [`Core::drop_rgrp`], [`Core::drop_all`], [`Core::block_counts`], ...) and
/// transactions ([`Tx`]).
#[derive(Debug)]
pub(crate) struct Core {
    pub dev: Arc<dyn BlockDevice>,
    pub sb: Superblock,
    pub journal: Option<Arc<Journal>>,
    cache: HashMap<u64, Arc<Block>>,
    /// Blocks `cache` holds at most after a read: a read that finds it full first
    /// evicts an eighth of it ([`Core::cache_evict`]).
    cache_max: usize,
    /// The class of blocks the next eviction starts with (see [`Core::cache_evict`]).
    next_evict_class: u64,
    /// Decoded forms of blocks in `cache` (checked once when decoded), dropped with
    /// them: reads do not re-check and re-decode the same dinode, indirect or bitmap
    /// block every time. Only [`Core::cache_put`], [`Core::cache_remove`] and
    /// [`Core::cache_evict`] change `cache`, so the two cannot disagree.
    parsed: HashMap<u64, Parsed>,
    /// The metadata blocks in `cache` read on behalf of each inode (indirect, hash
    /// table, leaf and xattr blocks; the dinode block is the inode number itself), so
    /// that everything cached for one inode can be dropped at once.
    owned: HashMap<u64, FxHashSet<u64>>,
    /// Directory listings, per directory, in cookie order (built by readdir, used by
    /// readdir and lookup); kept up to date by the transactions that change them.
    dirs: HashMap<u64, Arc<Listing>>,
    /// Entries in `dirs`.
    dir_entries: usize,
    /// Clean file data, per inode (see [`crate::cache`]).
    pub data: Arc<DataCache>,
    /// Per inode, the sequence of the last transaction that changed what `fdatasync`
    /// must make durable (size, block map, stuffed data); see [`Core::datasync_seq`].
    data_seq: HashMap<u64, u64>,
    rgrps: Vec<RgrpInfo>,
    /// Blocks freed by transactions not yet durable: not handed out again until then,
    /// so that a crash cannot leave the old owner pointing at a new owner's data.
    pending_free: BTreeMap<u64, u64>,
    /// Journal sequence up to which `pending_free` was last pruned.
    pruned_at: u64,
    /// Next rgrp to try for allocations without a goal.
    rgrp_hint: usize,
    /// Cluster mounts: inode numbers whose glocks were asked for ahead of their create
    /// ([`Tx::prefetch_next_inodes`]), the latest last.
    prefetched: std::collections::VecDeque<u64>,
    /// Cluster mounts: per rgrp (by index), the block from which a search for a new
    /// inode whose glocks' directory is on this node starts ([`Tx::find_local`]). No
    /// block before it is a free block such a search could take: the searches walked
    /// over them (blocks in use, and free ones left for data) and do not walk over them
    /// again. Lowered when a block becomes free (`prune_pending`), dropped with the
    /// rgrp's glock (another node may have freed blocks) and when the members change;
    /// the rgrp's end when it has none left. Before, every create walked again from its
    /// goal over every free block of the rgrp whose directory is another node, and
    /// creates slowed down as the rgrp filled (from 2.4k to 0.4k per second after 40k
    /// creates on one node of three).
    local_cursor: HashMap<usize, u64>,
    /// The directory `local_cursor` was computed for.
    local_for: Option<LocalDirectory>,
    /// Blocks examined by allocation searches (for tests and diagnosis).
    pub(crate) alloc_scanned: u64,
    /// Rgrps (by index) whose glock a try found held by another node, and when: not
    /// tried again for [`RGRP_BUSY`].
    rgrp_busy: HashMap<usize, std::time::Instant>,
    /// Whether the running attempt may end with [`FsError::TryLock`] (an operation
    /// tries a few locks at most).
    pub(crate) may_try_locks: bool,
    /// References per inode: open handles and the kernel's lookups (an unlinked inode
    /// stays until the last one is gone).
    pub refs: HashMap<u64, u32>,
    /// Inodes whose last link went while they were referenced: the last reference
    /// frees them. (Others need no work when the kernel forgets them.)
    pub unlinked: FxHashSet<u64>,
    /// Sequence of the last transaction handed to the journal.
    pub last_seq: u64,
    pub device_blocks: u64,
    pub locks: Arc<dyn LockModule>,
    /// The statfs files this mount writes (none read-only): see [`StatfsFiles`].
    pub statfs: Option<StatfsFiles>,
    /// Locks taken outside the filesystem lock for the operation running under it
    /// (after it asked for them with [`FsError::NeedLock`]).
    pub held: Vec<LockHold>,
}

impl Core {
    /// The state of a mount, with empty caches and no rgrps yet ([`Core::set_rgrps`]
    /// gives them once the rindex is read). `cache_max` is the block cache's limit in
    /// blocks (at least 8).
    pub fn new(
        dev: Arc<dyn BlockDevice>,
        sb: Superblock,
        journal: Option<Arc<Journal>>,
        data: Arc<DataCache>,
        cache_max: usize,
        device_blocks: u64,
        locks: Arc<dyn LockModule>,
    ) -> Core {
        Core {
            owned: HashMap::default(),
            dirs: HashMap::default(),
            dir_entries: 0,
            data,
            data_seq: HashMap::default(),
            dev,
            sb,
            journal,
            cache: HashMap::default(),
            cache_max: cache_max.max(8),
            next_evict_class: 0,
            parsed: HashMap::default(),
            statfs: None,
            rgrps: Vec::new(),
            pending_free: Default::default(),
            pruned_at: 0,
            rgrp_hint: 0,
            prefetched: Default::default(),
            local_cursor: HashMap::default(),
            local_for: None,
            alloc_scanned: 0,
            rgrp_busy: HashMap::default(),
            may_try_locks: false,
            refs: HashMap::default(),
            unlinked: Default::default(),
            last_seq: 0,
            device_blocks,
            locks,
            held: Vec::new(),
        }
    }

    /// Reads a metadata block's current committed contents; `owner` is the inode it
    /// belongs to (0: none, or the block is the dinode itself).
    pub fn read_meta_for(&mut self, owner: u64, addr: u64) -> Result<Arc<Block>> {
        if let Some(b) = self.cache.get(&addr) {
            return Ok(b.clone());
        }
        if addr >= self.device_blocks {
            return Err(FsError::Stale(addr));
        }
        let mut b: Box<Block> = concord_journal::zeroed_block();
        let from_log = match &self.journal {
            Some(j) => j.read_block(addr, &mut b),
            None => false,
        };
        if !from_log {
            concord_journal::read_block(self.dev.as_ref(), addr, &mut b)?;
        }
        let b: Arc<Block> = Arc::from(b);
        if self.cache.len() >= self.cache_max {
            self.cache_evict();
        }
        self.cache_put(addr, b.clone());
        if owner != 0 {
            self.owned.entry(owner).or_default().insert(addr);
        }
        Ok(b)
    }

    /// Caches block `addr`'s current contents (its decoded form, if any, is dropped).
    pub fn cache_put(&mut self, addr: u64, b: Arc<Block>) {
        self.cache.insert(addr, b);
        self.parsed.remove(&addr);
    }

    /// Forgets block `addr`, with its decoded form and its place in its owner's set in
    /// `owned` (the owner is in the block's header).
    pub fn cache_remove(&mut self, addr: u64) {
        if let Some(b) = self.cache.remove(&addr) {
            let owner = sealed_owner(&b);
            if let Some(set) = self.owned.get_mut(&owner) {
                set.remove(&addr);
                if set.is_empty() {
                    self.owned.remove(&owner);
                }
            }
        }
        self.parsed.remove(&addr);
    }

    /// Makes room in a full block cache: evicts blocks, with their decoded forms, until
    /// it holds 7/8 of `cache_max` (commits also put blocks in, so it can be fuller).
    /// Victims are taken by class: the address, hashed, falls in one of eight classes,
    /// and each eviction starts from the class after the last one's, so every block
    /// takes its turn, whatever its age or how often it is read. Emptying the whole
    /// cache instead, as this did before, made every workload larger than the cache
    /// reread its rgrp bitmaps, directory blocks and hot dinodes all at once, every
    /// 65,536 reads. An evicted block leaves its owner's set in `owned` too
    /// ([`Core::cache_remove`]), so `owned` stays as bounded as the cache.
    pub fn cache_evict(&mut self) {
        let keep = self.cache_max - self.cache_max / 8;
        while self.cache.len() > keep {
            let class = self.next_evict_class;
            self.next_evict_class = (class + 1) % 8;
            let n = self.cache.len() - keep;
            let victims: Vec<u64> = self.cache.keys().copied().filter(|&a| evict_class(a) == class).take(n).collect();
            for a in victims {
                self.cache_remove(a);
            }
        }
    }

    /// Drops every metadata block cached for inode `ino` (its dinode block included)
    /// and its cached file data.
    pub fn drop_inode(&mut self, ino: u64) {
        self.cache_remove(ino);
        self.drop_listing(ino);
        for a in self.owned.remove(&ino).unwrap_or_default() {
            self.cache_remove(a);
        }
        self.data.drop_inode(ino);
    }

    /// Forgets every cached block, decoded form and listing, and all cached file data
    /// (another node's journal was replayed under them).
    pub fn drop_all(&mut self) {
        self.cache.clear();
        self.parsed.clear();
        self.owned.clear();
        self.dirs.clear();
        self.dir_entries = 0;
        self.data.clear();
        self.local_cursor.clear();
    }

    /// Forgets rgrp `addr`'s header and bitmap blocks, with their decoded forms (what
    /// its glock's invalidation drops; the free count is re-read from the header when
    /// a transaction next takes the glock: [`Tx::lock_rgrp`]).
    pub fn drop_rgrp(&mut self, addr: u64) {
        if let Some(ri) = self.rgrp_of(addr) {
            self.local_cursor.remove(&ri);
        }
        if let Some(range) = self.rgrp_meta(addr) {
            for a in range {
                self.cache_remove(a);
            }
        }
    }

    /// The blocks of rgrp `addr`'s header and bitmaps (what its glock guards).
    pub fn rgrp_meta(&self, addr: u64) -> Option<std::ops::RangeInclusive<u64>> {
        let e = self.rgrps[self.rgrp_of(addr)?].e;
        (e.addr == addr).then(|| addr..=addr + u64::from(e.bitmap_blocks))
    }

    /// Metadata blocks in the block cache.
    pub fn cached_blocks(&self) -> usize {
        self.cache.len()
    }

    /// Directory `ino`'s cached listing, if it has one.
    pub fn listing(&self, ino: u64) -> Option<&Arc<Listing>> {
        self.dirs.get(&ino)
    }

    /// Caches directory `ino`'s listing (bounded: all listings go when full).
    pub fn cache_listing(&mut self, ino: u64, l: Arc<Listing>) {
        self.drop_listing(ino);
        if self.dir_entries + l.len() > DIR_CACHE_MAX {
            self.dirs.clear();
            self.dir_entries = 0;
        }
        self.dir_entries += l.len();
        self.dirs.insert(ino, l);
    }

    /// Forgets directory `ino`'s cached listing.
    pub fn drop_listing(&mut self, ino: u64) {
        self.take_listing(ino);
    }

    /// Takes directory `ino`'s cached listing out of the cache.
    pub fn take_listing(&mut self, ino: u64) -> Option<Arc<Listing>> {
        let l = self.dirs.remove(&ino)?;
        self.dir_entries -= l.len();
        Some(l)
    }

    /// Notes that transaction `seq` changed `ino`'s size, block map or stuffed data.
    pub fn data_changed(&mut self, ino: u64, seq: u64) {
        self.data_seq.insert(ino, seq);
        if self.data_seq.len() > 4096 {
            if let Some(j) = &self.journal {
                let done = j.stats().committed_seq;
                self.data_seq.retain(|_, s| *s > done);
            }
        }
    }

    /// The sequence up to which the journal must be committed before `ino`'s data can
    /// be read back after a crash (0: nothing pending).
    pub fn datasync_seq(&self, ino: u64) -> u64 {
        self.data_seq.get(&ino).copied().unwrap_or(0)
    }

    /// Index of the rgrp holding `addr`.
    pub fn rgrp_of(&self, addr: u64) -> Option<usize> {
        let i = self.rgrps.partition_point(|r| r.e.addr <= addr).checked_sub(1)?;
        let r = &self.rgrps[i].e;
        (addr < r.addr + u64::from(r.length)).then_some(i)
    }

    /// The address of the header of the rgrp holding `addr`.
    pub fn rgrp_addr_of(&self, addr: u64) -> Option<u64> {
        self.rgrp_of(addr).map(|ri| self.rgrps[ri].e.addr)
    }

    /// A try for `name` found it held by another node ([`FsError::TryLock`]).
    pub fn lock_busy(&mut self, name: LockName) {
        if let LockName::Rgrp(a) = name {
            if let Some(ri) = self.rgrp_of(a) {
                self.rgrp_busy.insert(ri, std::time::Instant::now());
            }
        }
    }

    /// The directory the allocator's local searches are for: a change of members
    /// changes which numbers are local, and the cursors start again.
    pub fn set_local_directory(&mut self, dir: &LocalDirectory) {
        if self.local_for.as_ref() != Some(dir) {
            self.local_cursor.clear();
            self.local_for = Some(dir.clone());
        }
    }

    /// Installs the rgrps read from the rindex at mount (with their headers' free
    /// counts).
    pub fn set_rgrps(&mut self, rgrps: Vec<RgrpInfo>) {
        self.rgrps = rgrps;
    }

    /// Every rgrp's rindex entry.
    pub fn rgrp_entries(&self) -> Vec<RindexEntry> {
        self.rgrps.iter().map(|r| r.e).collect()
    }

    /// Every rgrp's rindex entry and its free count as this node has it.
    pub fn rgrp_free_counts(&self) -> Vec<(RindexEntry, u32)> {
        self.rgrps.iter().map(|r| (r.e, r.free)).collect()
    }

    /// Data blocks over all rgrps, and how many of them are free for the allocator
    /// (blocks freed by transactions not durable yet do not count).
    pub fn block_counts(&mut self) -> (u64, u64) {
        self.prune_pending();
        let blocks = self.data_blocks();
        let bfree: u64 =
            self.rgrps.iter().map(|r| u64::from(r.free)).sum::<u64>().saturating_sub(self.pending_free.len() as u64);
        (blocks, bfree)
    }

    /// Data blocks of every rgrp: the filesystem's size as statfs counts it.
    pub fn data_blocks(&self) -> u64 {
        self.rgrps.iter().map(|r| u64::from(r.e.data_blocks)).sum()
    }

    /// Cluster mounts: allocations without a goal start in the part of the device that
    /// belongs to journal `jid` of `journals`, so that nodes allocate from different
    /// rgrps.
    pub fn spread_allocation(&mut self, jid: u32, journals: u32) {
        let n = self.rgrps.len();
        self.rgrp_hint = (jid as usize * n) / (journals.max(1) as usize);
    }

    /// Forgets pending frees that are durable now.
    pub fn prune_pending(&mut self) {
        if let Some(j) = &self.journal {
            let done = j.stats().committed_seq;
            if done != self.pruned_at {
                // Blocks free to take again: a search for a local inode number must see
                // them (only those whose directory is here matter to it).
                let mut usable = Vec::new();
                let dir = self.local_for.as_ref();
                self.pending_free.retain(|&a, seq| {
                    let keep = *seq > done;
                    if !keep && dir.is_some_and(|d| d.is_local(a)) {
                        usable.push(a);
                    }
                    keep
                });
                self.pruned_at = done;
                for a in usable {
                    if let Some(c) = self.rgrp_of(a).and_then(|ri| self.local_cursor.get_mut(&ri)) {
                        *c = (*c).min(a);
                    }
                }
            }
        }
    }
}

/// What an allocation search does after a usable block ([`Tx::scan_free`]).
enum Scan {
    Next,
    Stop,
}

/// How long an rgrp that a try found held by another node is not tried again. The try
/// asked that node to give it back if it only keeps it cached (TRY_1CB): the first
/// mounter, for one, keeps every rgrp it read at mount.
const RGRP_BUSY: std::time::Duration = std::time::Duration::from_secs(1);

/// Blocks a prefetch of the next local inode numbers walks at most.
const PREFETCH_SCAN: u64 = 1024;

/// Whether none of the 32 blocks whose 2-bit states `w` holds (little-endian bitmap
/// bytes) is free: a free block has both bits clear.
fn none_free(w: u64) -> bool {
    const LOW: u64 = 0x5555_5555_5555_5555;
    (w | (w >> 1)) & LOW == LOW
}

/// One operation's metadata changes.
pub(crate) struct Tx<'a> {
    pub core: &'a mut Core,
    dirty: BTreeMap<u64, Arc<Block>>,
    revokes: Vec<u64>,
    freed: Vec<u64>,
    free_delta: Vec<(usize, i64)>,
    /// Free and dinode counts this transaction changes (for the statfs change file).
    stat: StatfsChange,
    /// This transaction folds the change file into the master record
    /// ([`Tx::folds_statfs`]).
    fold_statfs: bool,
    /// Rgrp locks held until the transaction is handed to the journal.
    rgrp_holds: Vec<LockHold>,
    /// Newly allocated data blocks were written in place for this transaction:
    /// they must be durable before its commit header (ordered data).
    pub ordered: bool,
    /// Bitmaps, rgrp headers and indirect blocks decoded once per transaction and
    /// sealed (encoded, checksummed) once at commit.
    dec: Decoded,
    /// Decoded forms of blocks in `dirty`, given when written: they join
    /// [`Core::parsed`] at commit.
    staged: HashMap<u64, Parsed>,
    /// Listings of the directories this transaction changes: taken out of
    /// [`Core::dirs`] at the first change (so that nothing reads them half-changed),
    /// kept up to date, and put back at commit; a transaction dropped uncommitted takes
    /// them with it, and the next readdir builds them again from the device.
    listings: HashMap<u64, Listing>,
}

/// Decoded blocks of one transaction; the flag says whether they changed.
#[derive(Default)]
struct Decoded {
    /// bitmap block -> (its rgrp, bits, dirty)
    bits: BTreeMap<u64, (u64, Vec<u8>, bool)>,
    /// rgrp header block -> (header, dirty)
    hdrs: BTreeMap<u64, (RgrpHeader, bool)>,
    /// indirect block -> (owner, pointers, dirty)
    ind: BTreeMap<u64, (u64, Vec<u64>, bool)>,
}

impl<'a> Tx<'a> {
    pub fn new(core: &'a mut Core) -> Tx<'a> {
        Tx {
            core,
            dirty: BTreeMap::new(),
            revokes: Vec::new(),
            freed: Vec::new(),
            free_delta: Vec::new(),
            stat: StatfsChange::default(),
            fold_statfs: false,
            rgrp_holds: Vec::new(),
            ordered: false,
            dec: Decoded::default(),
            staged: HashMap::default(),
            listings: HashMap::default(),
        }
    }

    /// Takes directory `dir`'s cached listing, if any, into the transaction (see
    /// [`Tx::listings`]); [`Tx::listing_mut`] then changes it.
    pub fn take_listing(&mut self, dir: u64) {
        if let Some(l) = self.core.take_listing(dir) {
            self.listings.insert(dir, Arc::try_unwrap(l).unwrap_or_else(|l| Listing::clone(&l)));
        }
    }

    /// Starts the listing of `dir`, a directory this transaction creates (empty): it is
    /// kept up to date from then on, so the first readdir after a directory is filled
    /// need not build it from the device.
    pub fn new_listing(&mut self, dir: u64) {
        self.listings.insert(dir, Listing::default());
    }

    /// The listing of `dir` taken by [`Tx::take_listing`].
    pub fn listing_mut(&mut self, dir: u64) -> Option<&mut Listing> {
        self.listings.get_mut(&dir)
    }

    /// Forgets directory `dir`'s listing, cached or taken.
    pub fn forget_listing(&mut self, dir: u64) {
        self.listings.remove(&dir);
        self.core.drop_listing(dir);
    }

    /// Block `addr` decoded: the form known for its current contents if `pick` takes it
    /// (this transaction's version if it wrote the block, else the committed one), else
    /// `decode` of the block read for `owner`, then remembered as `wrap` of it.
    pub fn parsed<T: Clone>(
        &mut self,
        addr: u64,
        owner: u64,
        pick: impl FnOnce(&Parsed) -> Option<T>,
        decode: impl FnOnce(&Block) -> Result<T>,
        wrap: impl FnOnce(T) -> Parsed,
    ) -> Result<T> {
        if let Some(t) = self.known(addr).and_then(pick) {
            return Ok(t);
        }
        let t = decode(&*self.read_for(owner, addr)?)?;
        self.remember(addr, wrap(t.clone()));
        Ok(t)
    }

    /// Block `addr`'s decoded form, if one is known for its current contents.
    fn known(&self, addr: u64) -> Option<&Parsed> {
        if self.dirty.contains_key(&addr) {
            self.staged.get(&addr)
        } else {
            self.core.parsed.get(&addr)
        }
    }

    /// Forgets block `addr`'s decoded form (its holder is about to change it).
    pub fn forget_parsed(&mut self, addr: u64) {
        if self.dirty.contains_key(&addr) {
            self.staged.remove(&addr);
        } else {
            self.core.parsed.remove(&addr);
        }
    }

    /// Remembers `p` as the decoded form of block `addr`'s current contents, just read
    /// through [`Tx::read_for`].
    fn remember(&mut self, addr: u64, p: Parsed) {
        if self.dirty.contains_key(&addr) {
            self.staged.insert(addr, p);
        } else if self.core.cache.contains_key(&addr) {
            self.core.parsed.insert(addr, p);
        }
    }

    pub fn read(&mut self, addr: u64) -> Result<Arc<Block>> {
        self.read_for(0, addr)
    }

    /// Reads a metadata block that belongs to inode `owner` (see [`Core::owned`]).
    pub fn read_for(&mut self, owner: u64, addr: u64) -> Result<Arc<Block>> {
        match self.dirty.get(&addr) {
            Some(b) => Ok(b.clone()),
            None => self.core.read_meta_for(owner, addr),
        }
    }

    /// Stages a sealed block.
    pub fn write(&mut self, addr: u64, b: Box<Block>) {
        self.staged.remove(&addr);
        self.dirty.insert(addr, Arc::from(b));
    }

    /// Stages a sealed block together with its decoded form `p`.
    pub fn write_parsed(&mut self, addr: u64, b: Box<Block>, p: Parsed) {
        #[cfg(debug_assertions)]
        p.assert_matches(&b, addr);
        self.dirty.insert(addr, Arc::from(b));
        self.staged.insert(addr, p);
    }

    pub fn dinode(&mut self, ino: u64) -> Result<Dinode> {
        Ok(Dinode::clone(&*self.dinode_shared(ino)?))
    }

    /// Like [`Tx::dinode`], without a copy: for readers.
    pub fn dinode_shared(&mut self, ino: u64) -> Result<Arc<Dinode>> {
        if ino < self.core.sb.first_rgrp || ino >= self.core.device_blocks {
            return Err(FsError::Stale(ino));
        }
        if self.core.locks.is_cluster() {
            // Read under its own glock (at least SH), whatever lock brought us here: a
            // copy cached without it would never be invalidated when another node
            // changes the inode. The bitmap check below would need the rgrp's glock on
            // every read, so it is made only when the block does not decode as a
            // dinode: a freed inode (its block never written home) is stale, not
            // corrupt.
            self.lock_now(LockName::Inode(ino), LockMode::Shared)?;
            return match self.dinode_unchecked_shared(ino) {
                Err(FsError::Corrupt(e)) => {
                    let rg = self.core.rgrp_addr_of(ino).ok_or(FsError::Stale(ino))?;
                    self.lock_rgrp(rg)?;
                    if matches!(self.state_of(ino)?, BlockState::Dinode | BlockState::Unlinked) {
                        Err(FsError::Corrupt(e))
                    } else {
                        Err(FsError::Stale(ino))
                    }
                }
                r => r,
            };
        } else if !matches!(self.state_of(ino)?, BlockState::Dinode | BlockState::Unlinked) {
            // A freed dinode block keeps its old bytes: the bitmap says whether it lives.
            return Err(FsError::Stale(ino));
        }
        self.dinode_unchecked_shared(ino)
    }

    /// A dinode that must be a directory.
    pub fn dir(&mut self, ino: u64) -> Result<Dinode> {
        let d = self.dinode(ino)?;
        if !d.is_dir() {
            return Err(FsError::NotDir);
        }
        Ok(d)
    }

    /// Reads a dinode without consulting the bitmap (mount, before rgrps are loaded).
    pub fn dinode_unchecked(&mut self, ino: u64) -> Result<Dinode> {
        Ok(Dinode::clone(&*self.dinode_unchecked_shared(ino)?))
    }

    fn dinode_unchecked_shared(&mut self, ino: u64) -> Result<Arc<Dinode>> {
        self.parsed(
            ino,
            0,
            |p| match p {
                Parsed::Dinode(d) => Some(d.clone()),
                _ => None,
            },
            |b| match peek(b, ino) {
                Ok(h) if h.ty == BlockType::Dinode => Ok(Arc::new(Dinode::decode(b, ino)?)),
                // A block that is no longer a dinode: the inode was freed and reused.
                Ok(_) => Err(FsError::Stale(ino)),
                Err(e) => Err(e.into()),
            },
            Parsed::Dinode,
        )
    }

    pub fn put_dinode(&mut self, ino: u64, d: &Dinode) {
        self.write_parsed(ino, d.encode(ino), Parsed::Dinode(Arc::new(d.clone())));
    }

    /// Frees a block: bitmap to FREE, revoked if it held metadata.
    pub fn free_block(&mut self, addr: u64, was_meta: bool) -> Result<()> {
        let old = self.set_state(addr, BlockState::Free)?;
        if old == BlockState::Free {
            return Err(FsError::Corrupt(bad(addr, "bitmap", "freeing a free block")));
        }
        if was_meta {
            self.revokes.push(addr);
            self.dirty.remove(&addr);
            self.staged.remove(&addr);
            self.dec.ind.remove(&addr);
        }
        self.freed.push(addr);
        Ok(())
    }

    /// Takes `name` in `mode` for the rest of the transaction if that needs no wait;
    /// otherwise asks [`Filesystem::run`](crate::Filesystem) for it
    /// ([`FsError::NeedLock`]). True when the lock is new to this transaction.
    /// In a cluster, takes inode `ino`'s glock EX for this transaction (an inode it
    /// changes that the operation did not lock itself: a new inode, a victim of unlink
    /// or rename). Nothing in lock_nolock, where the parent's lock covers it.
    pub fn lock_inode_ex(&mut self, ino: u64) -> Result<()> {
        if self.core.locks.is_cluster() {
            self.lock_now(LockName::Inode(ino), LockMode::Exclusive)?;
        }
        Ok(())
    }

    pub fn lock_now(&mut self, name: LockName, mode: LockMode) -> Result<bool> {
        if self.rgrp_holds.iter().any(|h| h.name == name && (h.mode == LockMode::Exclusive || mode == LockMode::Shared))
        {
            return Ok(false);
        }
        if self.core.held.iter().any(|h| h.name == name && (h.mode == LockMode::Exclusive || mode == LockMode::Shared))
        {
            // Given by `run` for this attempt: new to the transaction all the same.
            self.rgrp_holds.push(LockHold::new(name, mode));
            return Ok(true);
        }
        match self.core.locks.try_now(name, mode)? {
            Some(h) => {
                self.rgrp_holds.push(h);
                Ok(true)
            }
            None => Err(FsError::NeedLock(name, mode)),
        }
    }

    /// Takes rgrp `addr`'s lock exclusively for the rest of the transaction. In a
    /// cluster, the rgrp's free count is re-read from its header when the lock is new
    /// to this transaction (another node may have allocated from it since).
    pub(crate) fn lock_rgrp(&mut self, addr: u64) -> Result<()> {
        let fresh = self.lock_now(LockName::Rgrp(addr), LockMode::Exclusive)?;
        if fresh && self.core.locks.is_cluster() && !self.dec.hdrs.contains_key(&addr) {
            let free = self.header(addr)?.0.free;
            if let Some(ri) = self.core.rgrp_of(addr) {
                self.core.rgrps[ri].free = free;
            }
        }
        Ok(())
    }

    /// Loads bitmap block `baddr` of rgrp `rgrp` into the transaction.
    fn load_bits(&mut self, baddr: u64, rgrp: u64) -> Result<()> {
        if !self.dec.bits.contains_key(&baddr) {
            let bits = self.committed_bits(baddr)?.to_vec();
            self.dec.bits.insert(baddr, (rgrp, bits, false));
        }
        Ok(())
    }

    /// Bitmap block `baddr` as last committed (the transaction has not loaded it).
    fn committed_bits(&mut self, baddr: u64) -> Result<Arc<[u8]>> {
        self.parsed(
            baddr,
            0,
            |p| match p {
                Parsed::Bitmap(bits) => Some(bits.clone()),
                _ => None,
            },
            |b| Ok(Arc::from(decode_bitmap(b, baddr)?)),
            Parsed::Bitmap,
        )
    }

    /// Rgrp header `addr`, decoded once per transaction.
    fn header(&mut self, addr: u64) -> Result<&mut (RgrpHeader, bool)> {
        if !self.dec.hdrs.contains_key(&addr) {
            let h = RgrpHeader::decode(&*self.read(addr)?, addr)?;
            self.dec.hdrs.insert(addr, (h, false));
        }
        // Inserted just above when absent.
        Ok(self.dec.hdrs.get_mut(&addr).expect("header loaded"))
    }

    /// The pointers of indirect block `addr` owned by `owner`.
    pub fn indirect(&mut self, addr: u64, owner: u64) -> Result<&mut Vec<u64>> {
        if !self.dec.ind.contains_key(&addr) {
            let ptrs = self.committed_indirect(addr, owner)?.to_vec();
            self.dec.ind.insert(addr, (owner, ptrs, false));
        }
        // Inserted just above when absent.
        Ok(&mut self.dec.ind.get_mut(&addr).expect("indirect loaded").1)
    }

    /// The pointers of indirect block `addr` owned by `owner`, for reading.
    pub fn indirect_shared(&mut self, addr: u64, owner: u64) -> Result<Arc<[u64]>> {
        match self.dec.ind.get(&addr) {
            Some(e) if e.0 == owner => Ok(Arc::from(&e.1[..])),
            _ => self.committed_indirect(addr, owner),
        }
    }

    /// Indirect block `addr` as last committed (the transaction has not loaded it).
    fn committed_indirect(&mut self, addr: u64, owner: u64) -> Result<Arc<[u64]>> {
        let blocks = self.core.device_blocks;
        self.parsed(
            addr,
            owner,
            |p| match p {
                Parsed::Indirect(o, ptrs) if *o == owner => Some(ptrs.clone()),
                _ => None,
            },
            |b| Ok(Arc::from(decode_indirect(b, addr, owner, blocks)?)),
            |ptrs| Parsed::Indirect(owner, ptrs),
        )
    }

    /// Marks indirect block `addr` changed (after changing it through [`Tx::indirect`]).
    pub fn indirect_changed(&mut self, addr: u64) {
        if let Some(e) = self.dec.ind.get_mut(&addr) {
            e.2 = true;
        }
    }

    /// A new indirect block.
    pub fn new_indirect(&mut self, addr: u64, owner: u64, ptrs: Vec<u64>) {
        let mut ptrs = ptrs;
        ptrs.resize(INDIRECT_PTRS, 0);
        self.dec.ind.insert(addr, (owner, ptrs, true));
    }

    /// Encodes every changed decoded block into the transaction.
    fn seal_decoded(&mut self) {
        let dec = std::mem::take(&mut self.dec);
        for (a, (rgrp, bits, dirty)) in dec.bits {
            if dirty {
                let b = encode_bitmap(&bits, a, rgrp);
                self.write_parsed(a, b, Parsed::Bitmap(Arc::from(bits)));
            }
        }
        for (a, (h, dirty)) in dec.hdrs {
            if dirty {
                self.write(a, h.encode(a));
            }
        }
        for (a, (owner, ptrs, dirty)) in dec.ind {
            if dirty {
                let b = encode_indirect(&ptrs, a, owner);
                self.write_parsed(a, b, Parsed::Indirect(owner, Arc::from(ptrs)));
            }
        }
    }

    /// A block's bitmap state.
    pub fn state_of(&mut self, addr: u64) -> Result<BlockState> {
        let ri = self.core.rgrp_of(addr).ok_or(FsError::Stale(addr))?;
        let e = self.core.rgrps[ri].e;
        let k = addr - e.addr;
        let per = u64::from(BITMAP_BLOCKS_PER);
        let baddr = e.addr + 1 + k / per;
        let kb = k % per;
        let byte = match self.dec.bits.get(&baddr) {
            Some(e) => e.1[(kb / 4) as usize],
            None => self.committed_bits(baddr)?[(kb / 4) as usize],
        };
        Ok(BlockState::from_bits(byte >> (2 * (kb % 4))))
    }

    /// Sets a block's bitmap state, keeping the rgrp header's counters; returns the old state.
    pub fn set_state(&mut self, addr: u64, state: BlockState) -> Result<BlockState> {
        let ri = self.core.rgrp_of(addr).ok_or_else(|| FsError::Corrupt(bad(addr, "address", "outside every rgrp")))?;
        let e = self.core.rgrps[ri].e;
        self.lock_rgrp(e.addr)?;
        let k = addr - e.addr;
        let per = u64::from(BITMAP_BLOCKS_PER);
        let baddr = e.addr + 1 + k / per;
        let kb = k % per;
        self.load_bits(baddr, e.addr)?;
        let byte = (kb / 4) as usize;
        let shift = 2 * (kb % 4);
        let entry = self.dec.bits.get_mut(&baddr).expect("bitmap loaded");
        let old = BlockState::from_bits(entry.1[byte] >> shift);
        if old == state {
            return Ok(old);
        }
        entry.1[byte] = (entry.1[byte] & !(3 << shift)) | ((state as u8) << shift);
        entry.2 = true;
        let (h, hdirty) = self.header(e.addr)?;
        *hdirty = true;
        for (s, c) in [
            (BlockState::Free, &mut h.free),
            (BlockState::Dinode, &mut h.dinodes),
            (BlockState::Unlinked, &mut h.unlinked),
        ] {
            if old == s {
                *c = c.wrapping_sub(1);
            }
            if state == s {
                *c = c.wrapping_add(1);
            }
        }
        if state == BlockState::Free {
            self.free_delta.push((ri, 1));
            self.stat.free += 1;
        } else if old == BlockState::Free {
            self.free_delta.push((ri, -1));
            self.stat.free -= 1;
        }
        if state == BlockState::Dinode {
            self.stat.dinodes += 1;
        } else if old == BlockState::Dinode {
            self.stat.dinodes -= 1;
        }
        Ok(old)
    }

    /// Allocates one block in `state`, near `goal` when possible.
    pub fn alloc(&mut self, goal: u64, state: BlockState) -> Result<u64> {
        let mut v = self.alloc_run(goal, 1, state)?;
        v.pop().ok_or(FsError::NoSpace)
    }

    /// Allocates up to `n` blocks (at least one), contiguous from the first free block
    /// at or after `goal` where possible.
    pub fn alloc_run(&mut self, goal: u64, n: usize, state: BlockState) -> Result<Vec<u64>> {
        self.core.prune_pending();
        let nr = self.core.rgrps.len();
        let start = self.core.rgrp_of(goal).unwrap_or(self.core.rgrp_hint % nr.max(1));
        // In a cluster a new inode takes a number whose glocks' DLM directory entry
        // this node keeps: their first requests are answered here. Any rgrp whose glock
        // is cached here serves one before a block of another kind is taken.
        let local = if state == BlockState::Dinode { self.core.locks.local_directory() } else { None };
        let mut need = None;
        if let Some(dir) = &local {
            self.core.set_local_directory(dir);
            let mut uncached = Vec::new();
            for step in 0..nr {
                let ri = (start + step) % nr;
                if self.core.rgrps[ri].free == 0 || self.local_exhausted(ri) {
                    continue;
                }
                let found = match self.find_local(ri, n, dir) {
                    Err(FsError::NeedLock(name, mode)) => {
                        need.get_or_insert((name, mode));
                        uncached.push(ri);
                        continue;
                    }
                    r => r?,
                };
                if !found.is_empty() {
                    return self.take_found(ri, found, state);
                }
            }
            // None of the rgrps held here has such a number left: rather than a number
            // whose first request costs a round trip to another node on every create
            // from now on, try once (no queueing) for another rgrp, the first after the
            // one this node allocates from: its own part of the device, which other
            // nodes seldom hold. One held elsewhere is passed over for a while.
            if self.core.may_try_locks {
                let hint = self.core.rgrp_hint % nr.max(1);
                self.core.rgrp_busy.retain(|_, t| t.elapsed() < RGRP_BUSY);
                let pick = (0..nr)
                    .map(|k| (hint + k) % nr)
                    .find(|ri| uncached.contains(ri) && !self.core.rgrp_busy.contains_key(ri));
                if let Some(ri) = pick {
                    return Err(FsError::TryLock(LockName::Rgrp(self.core.rgrps[ri].e.addr), LockMode::Exclusive));
                }
            }
        }
        // In a cluster, rgrps whose lock would need a DLM request are passed over
        // while another may serve; only when none can is one asked for.
        for step in 0..nr {
            let ri = (start + step) % nr;
            if self.core.rgrps[ri].free == 0 {
                continue;
            }
            let e = self.core.rgrps[ri].e;
            let from = if step == 0 && goal >= e.data_start { goal } else { e.data_start };
            let found = match self.find_free(ri, from, n) {
                Err(FsError::NeedLock(name, mode)) => {
                    need.get_or_insert((name, mode));
                    continue;
                }
                r => r?,
            };
            let found =
                if found.is_empty() && from > e.data_start { self.find_free(ri, e.data_start, n)? } else { found };
            if !found.is_empty() {
                return self.take_found(ri, found, state);
            }
        }
        match need {
            // No rgrp whose glock is cached here can serve: ask for the one this node
            // allocates from (its share of the device, `rgrp_hint`) rather than the
            // goal's, which another node likely holds (new inodes go near their
            // parent, and every node's directories start near the root).
            Some(_)
                if self.core.rgrps[self.core.rgrp_hint % nr].free > 0
                    && !self
                        .core
                        .held
                        .iter()
                        .any(|h| h.name == LockName::Rgrp(self.core.rgrps[self.core.rgrp_hint % nr].e.addr)) =>
            {
                let a = self.core.rgrps[self.core.rgrp_hint % nr].e.addr;
                Err(FsError::NeedLock(LockName::Rgrp(a), LockMode::Exclusive))
            }
            Some((name, mode)) => Err(FsError::NeedLock(name, mode)),
            None => Err(FsError::NoSpace),
        }
    }

    /// Marks the blocks an allocation search found as `state`.
    fn take_found(&mut self, ri: usize, found: Vec<u64>, state: BlockState) -> Result<Vec<u64>> {
        for &a in &found {
            self.set_state(a, state)?;
        }
        self.core.rgrp_hint = ri;
        Ok(found)
    }

    /// Whether rgrp `ri` is known to have no free block left for a local inode number.
    fn local_exhausted(&self, ri: usize) -> bool {
        let e = self.core.rgrps[ri].e;
        self.core.local_cursor.get(&ri).is_some_and(|&c| c >= e.addr + u64::from(e.length))
    }

    /// Cluster mounts, after allocating inode `ino`: asks (without waiting) for the
    /// glocks of the next `n` inodes this node will likely make, the free blocks right
    /// after `ino` in its rgrp, where the next creates find room. A new inode number is
    /// a new DLM resource, whose first request costs a round trip to its directory
    /// node; asked for ahead, the next creates find their glocks cached. A guess that
    /// misses leaves a glock cached here, given back on the first BAST.
    pub fn prefetch_next_inodes(&mut self, ino: u64, n: usize) {
        if !self.core.locks.is_cluster() {
            return;
        }
        let Some(ri) = self.core.rgrp_of(ino) else { return };
        let Some(dir) = self.core.locks.local_directory() else { return };
        self.core.set_local_directory(&dir);
        // A guess: a bounded walk from the cursor on, not to the end of a full rgrp on
        // every create; it leaves the cursor as it is.
        let from = (ino + 1).max(self.core.local_cursor.get(&ri).copied().unwrap_or(0));
        let Ok((next, _)) = self.find_local_walk(ri, from, n, &dir, PREFETCH_SCAN) else { return };
        for a in next {
            if self.core.prefetched.contains(&a) {
                continue;
            }
            if self.core.prefetched.len() >= 4 * n.max(1) {
                self.core.prefetched.pop_front();
            }
            self.core.prefetched.push_back(a);
            self.core.locks.prefetch(LockName::Inode(a), LockMode::Exclusive);
            self.core.locks.prefetch(LockName::Iopen(a), LockMode::Shared);
        }
    }

    /// Finds up to `n` free blocks of rgrp `ri` from `from`: the first free one and the
    /// free ones right after it.
    fn find_free(&mut self, ri: usize, from: u64, n: usize) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        self.scan_free(ri, from, u64::MAX, true, |a| {
            out.push(a);
            if out.len() == n {
                Scan::Stop
            } else {
                Scan::Next
            }
        })?;
        Ok(out)
    }

    /// Finds up to `n` free blocks of rgrp `ri` whose glocks' DLM directory entry is on
    /// this node (`dir`), from the rgrp's cursor on (`Core::local_cursor`), which it
    /// moves up to the first one found, or to the rgrp's end when there is none.
    fn find_local(&mut self, ri: usize, n: usize, dir: &LocalDirectory) -> Result<Vec<u64>> {
        let data_start = self.core.rgrps[ri].e.data_start;
        let from = self.core.local_cursor.get(&ri).copied().unwrap_or(data_start).max(data_start);
        let (out, reached) = self.find_local_walk(ri, from, n, dir, u64::MAX)?;
        self.core.local_cursor.insert(ri, out.first().copied().unwrap_or(reached));
        Ok(out)
    }

    /// The walk of [`find_local`](Self::find_local): the blocks found and where the walk
    /// stopped.
    fn find_local_walk(
        &mut self,
        ri: usize,
        from: u64,
        n: usize,
        dir: &LocalDirectory,
        limit: u64,
    ) -> Result<(Vec<u64>, u64)> {
        let mut out = Vec::new();
        let reached = self.scan_free(ri, from, limit, false, |a| {
            if dir.is_local(a) {
                out.push(a);
                if out.len() == n {
                    return Scan::Stop;
                }
            }
            Scan::Next
        })?;
        Ok((out, reached))
    }

    /// Walks the free blocks of rgrp `ri` from `from`, at most `limit` blocks far,
    /// handing each usable one to `found` (blocks freed by transactions not yet durable
    /// are not usable) until it says stop. With `run`, a block in use after a usable
    /// one ends the walk (a run of free blocks is wanted). Returns where the walk
    /// stopped (the rgrp's end when it went through).
    fn scan_free(
        &mut self,
        ri: usize,
        from: u64,
        limit: u64,
        run: bool,
        mut found: impl FnMut(u64) -> Scan,
    ) -> Result<u64> {
        let e = self.core.rgrps[ri].e;
        // The bitmap is read under the rgrp's lock: in a cluster, another node may be
        // allocating from it.
        self.lock_rgrp(e.addr)?;
        let end = (e.addr + u64::from(e.length)).min(from.saturating_add(limit));
        let per = u64::from(BITMAP_BLOCKS_PER);
        let mut any = false;
        let mut a = from.max(e.data_start);
        let start = a;
        while a < end {
            let k = a - e.addr;
            let baddr = e.addr + 1 + k / per;
            self.load_bits(baddr, e.addr)?;
            let block_end = (e.addr + (k / per + 1) * per).min(end);
            let bits = &self.dec.bits[&baddr].1;
            while a < block_end {
                let kb = (a - e.addr) % per;
                // Skip 32 blocks at a time while none is free (a block is free when
                // both its bits are clear): a search must not test every used block
                // one by one.
                if (!any || !run) && kb.is_multiple_of(32) && a + 32 <= block_end {
                    let i = (kb / 4) as usize;
                    if let Some(w) = bits.get(i..i + 8) {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(w);
                        if none_free(u64::from_le_bytes(b)) {
                            a += 32;
                            continue;
                        }
                    }
                }
                let byte = bits[(kb / 4) as usize];
                let st = BlockState::from_bits(byte >> (2 * (kb % 4)));
                let usable =
                    st == BlockState::Free && !self.core.pending_free.contains_key(&a) && !self.freed.contains(&a);
                if usable {
                    any = true;
                    if let Scan::Stop = found(a) {
                        self.core.alloc_scanned += a + 1 - start;
                        return Ok(a);
                    }
                } else if any && run {
                    self.core.alloc_scanned += a + 1 - start;
                    return Ok(a);
                }
                a += 1;
            }
        }
        self.core.alloc_scanned += a.saturating_sub(start);
        Ok(a.max(end))
    }

    /// Next inode generation from the rgrp holding `ino`.
    pub fn next_generation(&mut self, ino: u64) -> Result<u64> {
        let ri = self.core.rgrp_of(ino).ok_or(FsError::Stale(ino))?;
        let a = self.core.rgrps[ri].e.addr;
        self.lock_rgrp(a)?;
        let (h, dirty) = self.header(a)?;
        let g = h.igeneration;
        h.igeneration += 1;
        *dirty = true;
        Ok(g)
    }

    /// Hands the changes to the journal (no I/O unless the batch is full); returns the
    /// journal sequence that will make them durable.
    pub fn commit(self) -> Result<u64> {
        Ok(self.commit_inner(false)?.0)
    }

    /// Like [`Tx::commit`], for a transaction whose newly allocated data blocks are
    /// written after this call, outside the filesystem lock: the guard holds the
    /// journal batch back until it is dropped (data written) or failed.
    pub fn commit_ordered(self) -> Result<(u64, Option<OrderedWrite>)> {
        self.commit_inner(true)
    }

    /// Marks this transaction as the one that folds the change file into the master
    /// record (it wrote both): at commit the mount's change is zero again.
    pub fn folds_statfs(&mut self) {
        self.fold_statfs = true;
    }

    fn commit_inner(mut self, data_follows: bool) -> Result<(u64, Option<OrderedWrite>)> {
        // The change file goes in the same transaction as the counts it follows, so a
        // replay brings back both or neither.
        let local = match self.core.statfs {
            Some(_) if self.fold_statfs => Some(StatfsChange::default().plus(self.stat)),
            Some(sf) if !self.stat.is_zero() => {
                let local = sf.local.plus(self.stat);
                let mut d = self.dinode_unchecked(sf.change)?;
                local.store(&mut d);
                self.put_dinode(sf.change, &d);
                Some(local)
            }
            _ => None,
        };
        self.seal_decoded();
        let Tx {
            core,
            dirty,
            revokes,
            freed,
            free_delta,
            stat: _,
            fold_statfs: _,
            rgrp_holds: _holds,
            ordered,
            dec: _,
            mut staged,
            listings,
        } = self;
        if dirty.is_empty() && revokes.is_empty() {
            for (dir, l) in listings {
                core.cache_listing(dir, Arc::new(l));
            }
            return Ok((core.last_seq, None));
        }
        let journal = core.journal.clone().ok_or(FsError::ReadOnly)?;
        // Cluster mounts write a block back at its glock's demote only: a block no
        // glock's write-back finds would stay in this journal, and a replay could
        // write it over another node's newer copy.
        debug_assert!(
            !core.locks.is_cluster() || dirty.values().all(|b| crate::format::found_by_write_back(b)),
            "a transaction logs a block no glock writes back"
        );
        let mut t = Transaction::new();
        t.ordered = ordered;
        for a in &revokes {
            t.revoke(*a);
        }
        for (a, b) in &dirty {
            t.add_block(*a, b.clone());
        }
        let (seq, guard) = if data_follows {
            let (seq, g) = journal.add_ordered(t);
            (seq, Some(g))
        } else {
            (journal.add(t), None)
        };
        for (a, b) in dirty {
            // Blocks written here belong to their inode as much as blocks read for it.
            let owner = sealed_owner(&b);
            if owner != 0 {
                core.owned.entry(owner).or_default().insert(a);
            }
            core.cache_put(a, b);
            if let Some(p) = staged.remove(&a) {
                core.parsed.insert(a, p);
            }
        }
        for a in revokes {
            core.cache_remove(a);
        }
        for (dir, l) in listings {
            core.cache_listing(dir, Arc::new(l));
        }
        for (ri, d) in free_delta {
            let f = &mut core.rgrps[ri].free;
            *f = f.wrapping_add_signed(d as i32);
        }
        for a in freed {
            core.pending_free.insert(a, seq);
        }
        if let (Some(local), Some(sf)) = (local, core.statfs.as_mut()) {
            sf.local = local;
        }
        core.last_seq = seq;
        Ok((seq, guard))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn none_free_sees_a_free_block_in_any_position() {
        // Every block used, in every mix of the three used states.
        for fill in [0x5555_5555_5555_5555u64, 0xaaaa_aaaa_aaaa_aaaa, u64::MAX, 0x9d27_e4b1_6c38_f59a | LOW_ONES] {
            assert!(none_free(fill), "{fill:#x}");
            for pos in 0..32 {
                let freed = fill & !(3u64 << (2 * pos));
                assert!(!none_free(freed), "block {pos} free in {freed:#x}");
            }
        }
        // The bitmap's byte order: block 0 is the low bits of byte 0.
        let mut bytes = [0xffu8; 8];
        bytes[5] = 0b1111_0011;
        assert!(!none_free(u64::from_le_bytes(bytes)));
        assert_eq!(BlockState::from_bits(bytes[5] >> 2), BlockState::Free);
    }

    /// Sets the low bit of every pair whose two bits are clear (so that the pattern has
    /// no free block).
    const LOW_ONES: u64 = 0x5555_5555_5555_5555 & !(0x9d27_e4b1_6c38_f59a | (0x9d27_e4b1_6c38_f59a >> 1));
}
