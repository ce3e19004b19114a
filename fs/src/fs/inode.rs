//! An inode's life after its names: references (open handles and the kernel's lookup
//! counts), iopen glocks in a cluster (every node holds one shared while it has the
//! inode; the last one anywhere frees an unlinked inode), the reclaim thread, and
//! freeing unlinked inodes at the last close, at unmount and, for orphans a crash left,
//! at mount. docs/internals/cluster.md, "Unlinked inodes: iopen glocks".

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::core::{Core, Tx};
use crate::format::*;
use crate::lock::{LockMode, LockName};
use crate::{bmap, dir, FsError, Result};

use super::{Attr, Filesystem};

/// Idle iopen glocks a cluster node keeps cached (each costs a little memory here
/// and in lockd; giving one back costs two DLM requests, taking it again one).
pub(super) const IOPEN_IDLE_MAX: usize = 16_384;

/// In the reclaim thread's queue: not an inode but a request for an orphan scan
/// ([`Filesystem::scan_orphans_later`]); no inode has this number.
/// What the reclaim thread is asked to do.
#[derive(Debug)]
pub(super) enum Reclaim {
    /// Free this unlinked inode once no node has it (tried again per [`RECLAIM_RETRY`]).
    Free(u64),
    /// Scan the device for unlinked inodes ([`Filesystem::scan_orphans_later`]).
    Scan,
    /// Fold journal `jid`'s statfs change file into the master record
    /// ([`Filesystem::fold_statfs_later`]).
    FoldStatfs(u32),
}

/// When the reclaim thread tries again to free an unlinked inode whose exclusive iopen
/// try failed, after the failure before: another node that only had the glock cached
/// gave it back on the BAST the try sent (TRY_1CB); one that has the inode open keeps
/// it, and frees the inode at its own last close.
const RECLAIM_RETRY: [Duration; 5] = [
    Duration::from_millis(5),
    Duration::from_millis(20),
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1500),
];

impl Filesystem {
    /// Notes an open handle (unlinked inodes stay until the last release).
    pub fn open(&self, ino: u64) -> Result<Attr> {
        let a = self.getattr(ino)?;
        *self.core.lock().refs.entry(ino).or_insert(0) += 1;
        self.hold_iopen(ino)?;
        Ok(a)
    }

    /// Drops an open handle; frees the inode when it was the last and it is unlinked.
    pub fn release(&self, ino: u64) -> Result<()> {
        self.unref(ino, 1)
    }

    /// Takes `n` references to an inode without opening it (the kernel's lookup
    /// count, through FUSE): an unlinked inode lives until every reference is gone.
    pub fn reference(&self, ino: u64, n: u64) {
        *self.core.lock().refs.entry(ino).or_insert(0) += n as u32;
        if let Err(e) = self.hold_iopen(ino) {
            tracing::warn!(ino, error = %e, "iopen glock not taken: another node's last close may free this inode");
        }
    }

    /// Drops `n` references (FUSE forget); frees the inode when none is left and it is
    /// unlinked.
    pub fn forget(&self, ino: u64, n: u64) -> Result<()> {
        self.unref(ino, n)
    }

    fn unref(&self, ino: u64, n: u64) -> Result<()> {
        if !self.locks.is_cluster() {
            if drop_refs(&mut self.core.lock(), ino, n) {
                self.free_unlinked(ino)?;
            }
            return Ok(());
        }
        let last = {
            let mut c = self.core.lock();
            drop_refs(&mut c, ino, n);
            !c.refs.contains_key(&ino)
        };
        if last {
            // This node no longer has the inode: its iopen glock goes, and if its last
            // link went (here or on another node) and no node has it any more, it is
            // freed here.
            // The holder goes; the glock stays cached shared, so that the inode's next
            // lookup here costs no DLM request. Another node's exclusive try (TRY_1CB)
            // makes this node give it back at once.
            {
                let mut m = self.iopen.lock();
                // A thread still taking it sees the references gone and drops it.
                if m.get(&ino).is_some_and(Option::is_some) {
                    drop(m.remove(&ino));
                }
            }
            self.iopen_went_idle(ino);
            let unlinked = match self.getattr(ino) {
                Ok(a) => a.nlink == 0,
                Err(FsError::NotFound | FsError::Stale(_)) => false,
                Err(e) => return Err(e),
            };
            if unlinked && !self.free_if_unused(ino)? {
                self.free_later(ino);
            }
        }
        Ok(())
    }

    /// Notes that this node's iopen glock of `ino` has no holder left; gives the
    /// oldest idle ones back to the DLM past [`IOPEN_IDLE_MAX`].
    fn iopen_went_idle(&self, ino: u64) {
        let old: Vec<u64> = {
            let mut q = self.iopen_idle.lock();
            q.push_back(ino);
            let over = q.len().saturating_sub(IOPEN_IDLE_MAX);
            q.drain(..over).collect()
        };
        for ino in old {
            // Does nothing while the inode is held again.
            self.locks.uncache_soon(LockName::Iopen(ino));
        }
    }

    /// Cluster mounts: starts the reclaim thread, which tries again to free unlinked
    /// inodes whose exclusive iopen try failed ([`RECLAIM_RETRY`]) and folds the statfs
    /// change file into the master record every [`super::STATFS_QUANTUM`]. It holds the
    /// filesystem weakly and ends with it.
    pub fn start_reclaim(self: &Arc<Self>) {
        if !self.locks.is_cluster() || self.reclaim.get().is_some() {
            return;
        }
        let (tx, rx) = std::sync::mpsc::channel::<Reclaim>();
        let weak = Arc::downgrade(self);
        // A scan (after the recovery of a dead node's journal) runs here too, off the
        // recovery's thread.
        let spawned = std::thread::Builder::new().name("reclaim".into()).spawn(move || {
            use std::cmp::Reverse;
            let mut due: std::collections::BinaryHeap<Reverse<(Instant, u64, usize)>> = Default::default();
            let mut next_statfs = Instant::now() + super::STATFS_QUANTUM;
            loop {
                let wait = due.peek().map_or(next_statfs, |Reverse((t, _, _))| (*t).min(next_statfs));
                let wait = wait.saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(Reclaim::Scan) => {
                        let Some(fs) = weak.upgrade() else { return };
                        match fs.find_orphans() {
                            Ok(found) => {
                                tracing::info!(found = found.len(), "orphan scan after a journal recovery");
                                // Noted as this node's to free: an unmount before the
                                // queue below is done frees them too.
                                fs.core.lock().unlinked.extend(found.iter().copied());
                                let now = Instant::now();
                                due.extend(found.into_iter().map(|ino| Reverse((now, ino, 0))));
                            }
                            Err(e) => tracing::warn!(error = %e, "orphan scan after a journal recovery failed"),
                        }
                    }
                    Ok(Reclaim::FoldStatfs(jid)) => {
                        let Some(fs) = weak.upgrade() else { return };
                        match fs.fold_statfs_of(jid) {
                            Ok(folded) => tracing::debug!(jid, folded, "statfs change file of a departed journal"),
                            Err(e) => tracing::warn!(jid, error = %e, "folding a departed journal's statfs changes"),
                        }
                    }
                    Ok(Reclaim::Free(ino)) => due.push(Reverse((Instant::now() + RECLAIM_RETRY[0], ino, 0))),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
                }
                if next_statfs <= Instant::now() {
                    let Some(fs) = weak.upgrade() else { return };
                    if fs.is_withdrawn() {
                        return;
                    }
                    // This node's allocations and frees reach other nodes' statfs.
                    if let Err(e) = fs.statfs_sync() {
                        tracing::debug!(error = %e, "statfs sync: trying again later");
                    }
                    next_statfs = Instant::now() + super::STATFS_QUANTUM;
                }
                while due.peek().is_some_and(|Reverse((t, _, _))| *t <= Instant::now()) {
                    let Some(Reverse((_, ino, attempt))) = due.pop() else { break };
                    let Some(fs) = weak.upgrade() else { return };
                    if fs.is_withdrawn() {
                        return;
                    }
                    match fs.free_if_unused(ino) {
                        Ok(true) => {}
                        Ok(false) if attempt + 1 < RECLAIM_RETRY.len() => {
                            due.push(Reverse((Instant::now() + RECLAIM_RETRY[attempt + 1], ino, attempt + 1)));
                        }
                        Ok(false) => {
                            tracing::debug!(ino, "unlinked inode still open on another node: freed there");
                            fs.core.lock().unlinked.remove(&ino);
                        }
                        // A DLM error (a request refused during a recovery): tried
                        // again like a busy inode, not dropped.
                        Err(e) if attempt + 1 < RECLAIM_RETRY.len() && !fs.is_withdrawn() => {
                            tracing::debug!(ino, error = %e, "freeing an unlinked inode: trying again");
                            due.push(Reverse((Instant::now() + RECLAIM_RETRY[attempt + 1], ino, attempt + 1)));
                        }
                        Err(e) => tracing::warn!(ino, error = %e, "freeing an unlinked inode failed"),
                    }
                }
            }
        });
        match spawned {
            Ok(_) => {
                let _ = self.reclaim.set(parking_lot::Mutex::new(tx));
            }
            Err(e) => tracing::warn!(error = %e, "no reclaim thread: unlinked inodes in use elsewhere are freed there"),
        }
    }

    /// Cluster mounts, after this node replayed a dead node's journal: that node's
    /// unlinked inodes (open there when it died, or unlinked by it and not yet freed)
    /// are freed by the reclaim thread, each only if no live node has it (its iopen
    /// glock, as at any last close).
    pub fn scan_orphans_later(&self) {
        if let Some(tx) = self.reclaim.get() {
            let _ = tx.lock().send(Reclaim::Scan);
        }
    }

    /// Cluster mounts, after this node replayed journal `jid` of a departed node (or
    /// mounted first, with every other journal unowned): the reclaim thread folds that
    /// journal's statfs change file into the master record, as GFS2's recovery does,
    /// so that `df` counts what the departed node allocated and freed.
    pub fn fold_statfs_later(&self, jid: u32) {
        if let Some(tx) = self.reclaim.get() {
            let _ = tx.lock().send(Reclaim::FoldStatfs(jid));
        }
    }

    /// One try of the reclaim thread's: frees unlinked inode `ino` if no node has it
    /// (true when freed, or when it is not this node's to free). For the cluster
    /// simulator (fs/tests/cluster_sim), which runs no threads and retries itself.
    #[doc(hidden)]
    pub fn try_free_unlinked(&self, ino: u64) -> Result<bool> {
        self.free_if_unused(ino)
    }

    /// An unlinked inode that could not be freed now: the reclaim thread tries again;
    /// without it, the node that has the inode open frees it.
    fn free_later(&self, ino: u64) {
        if let Some(tx) = self.reclaim.get() {
            if tx.lock().send(Reclaim::Free(ino)).is_ok() {
                return;
            }
        }
        self.core.lock().unlinked.remove(&ino);
    }

    /// Cluster mounts: holds inode `ino`'s iopen glock shared while this node has the
    /// inode open or referenced (GFS2's i_iopen_gh), so that another node's last close
    /// does not free it under us.
    fn hold_iopen(&self, ino: u64) -> Result<()> {
        if !self.locks.is_cluster() {
            return Ok(());
        }
        // One thread per inode asks for it: a second request queued on the glock
        // while another node's BAST has a demote pending (which waits for this node's
        // holder, kept as long as the kernel has the inode) would wait forever.
        {
            let mut m = self.iopen.lock();
            loop {
                match m.get(&ino) {
                    Some(Some(_)) => return Ok(()),
                    Some(None) => self.iopen_cv.wait(&mut m),
                    None => {
                        m.insert(ino, None);
                        break;
                    }
                }
            }
        }
        let r = self.locks.acquire(LockName::Iopen(ino), LockMode::Shared);
        let mut m = self.iopen.lock();
        let held = self.core.lock().refs.contains_key(&ino);
        let r = match r {
            Ok(h) if held => {
                m.insert(ino, Some(h));
                Ok(())
            }
            Ok(_) => {
                m.remove(&ino);
                Ok(())
            }
            Err(e) => {
                m.remove(&ino);
                Err(e)
            }
        };
        drop(m);
        self.iopen_cv.notify_all();
        r
    }

    /// Cluster mounts, after an unlink or a rename that took an inode's last link:
    /// frees it if no node has it (otherwise the last node to have it does).
    pub(super) fn free_unlinked_now(&self) -> Result<()> {
        if !self.locks.is_cluster() {
            return Ok(());
        }
        let cands: Vec<u64> = {
            let c = self.core.lock();
            c.unlinked.iter().filter(|i| !c.refs.contains_key(i)).copied().collect()
        };
        for ino in cands {
            if !self.free_if_unused(ino)? {
                self.free_later(ino);
            }
        }
        Ok(())
    }

    /// Cluster mounts: frees unlinked inode `ino` if no node has it: this node has no
    /// reference and gets its iopen glock exclusive without waiting (a node that has it
    /// open holds it shared, and frees it at its own last close). False if another node
    /// holds the iopen glock (open there, or only cached: the try's BAST makes such a
    /// node give it back, so a later try may succeed); true when freed or when this
    /// node has the inode again (its own last close frees it).
    fn free_if_unused(&self, ino: u64) -> Result<bool> {
        if self.core.lock().refs.contains_key(&ino) {
            return Ok(true);
        }
        if self.born_here.lock().contains(&ino) {
            // Checked again under the inode's glock: while this node holds it, no
            // other node can have come to the inode (a lookup, a getattr or an open
            // elsewhere takes the glock first, and its demote clears the mark).
            let _l = self.lock(&[ino], LockMode::Exclusive)?;
            if self.born_here.lock().remove(&ino) {
                tracing::debug!(ino, "unlinked inode never left this node: freeing it");
                self.free_unlinked(ino)?;
                return Ok(true);
            }
        }
        let Some(h) = self.locks.try_acquire(LockName::Iopen(ino), LockMode::Exclusive)? else {
            tracing::debug!(ino, "unlinked inode held on another node: not freed now");
            return Ok(false);
        };
        tracing::debug!(ino, "unlinked inode used nowhere: freeing it");
        // The glock stays cached exclusive: a node that makes an inode with this
        // number again takes it from here through the DLM.
        let r = self.free_unlinked(ino);
        drop(h);
        r.map(|()| true)
    }

    /// Frees inode `ino`, whose last reference just went, if its last link went too.
    fn free_unlinked(&self, ino: u64) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _l = self.lock(&[ino], LockMode::Exclusive)?;
        self.wait_data(ino, 0, u64::MAX);
        self.run(true, |c| {
            c.unlinked.remove(&ino);
            let mut tx = Tx::new(c);
            let d = match tx.dinode(ino) {
                Ok(d) => d,
                Err(FsError::Stale(_)) => {
                    // The block is no dinode any more: freed and used again, perhaps
                    // by another node, under glocks this node's copy does not follow.
                    drop(tx);
                    c.drop_inode(ino);
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            if tx.core.locks.is_cluster() {
                // Under its rgrp's glock, the bitmap says whether another node freed
                // it already (dinode reads in a cluster do not look at the bitmap; a
                // freed dinode keeps whatever it held, even a link count above zero
                // when its free revoked the unlink's copy in the same journal batch).
                let rg = tx.core.rgrp_addr_of(ino).ok_or(FsError::Stale(ino))?;
                tx.lock_rgrp(rg)?;
                match tx.state_of(ino)? {
                    BlockState::Unlinked => {}
                    // A live inode (its number used again): its glock, held here,
                    // keeps the copy just read right.
                    BlockState::Dinode => return Ok(()),
                    // Freed by another node. The block just read would stay cached
                    // under this inode's glock, which no other node will ask for: once
                    // the block is allocated again (an indirect block or a directory
                    // leaf of another inode, under that inode's glock), this node would
                    // read the old dinode through the new owner. So it goes.
                    BlockState::Free | BlockState::Used => {
                        drop(tx);
                        c.drop_inode(ino);
                        return Ok(());
                    }
                }
            }
            if d.nlink != 0 {
                return Ok(());
            }
            free_inode(&mut tx, ino, d)?;
            tx.commit()?;
            Ok(())
        })
    }

    /// The first mounter of a cluster frees what every earlier mount left unlinked
    /// (no node has anything open then).
    pub(crate) fn free_orphans_now(&self) -> Result<usize> {
        self.free_orphans()
    }

    /// Frees inodes left UNLINKED by a crash (nobody holds them open after a mount).
    pub(super) fn free_orphans(&self) -> Result<usize> {
        let mut freed = 0;
        for ino in self.find_orphans()? {
            freed += self.run(true, |c| {
                let mut tx = Tx::new(c);
                tx.lock_inode_ex(ino)?;
                let d = tx.dinode(ino)?;
                if d.nlink != 0 {
                    return Ok(0);
                }
                free_inode(&mut tx, ino, d)?;
                tx.commit()?;
                Ok(1)
            })?;
        }
        Ok(freed)
    }

    /// The inodes whose bitmap state is UNLINKED, each rgrp's bitmap read under its
    /// lock (only rgrps whose header counts unlinked inodes).
    fn find_orphans(&self) -> Result<Vec<u64>> {
        let rgrps: Vec<RindexEntry> = self.core.lock().rgrp_entries();
        let mut all = Vec::new();
        let mut hb = vec![0u8; BLOCK_SIZE];
        let cluster = self.locks.is_cluster();
        for e in rgrps {
            // On a single node (at mount, after its own replay) a first look at the
            // header as the device has it, without its lock and without caching it,
            // skips the rgrps that count no unlinked inode. In a cluster the device's
            // copy may be old: the node that holds the rgrp's glock has the newer
            // header in its journal until a demote writes it back, so the header is
            // read under the glock.
            if !cluster {
                self.dev.read_at(e.addr * BLOCK_SIZE as u64, &mut hb)?;
                let block: &Block = hb.as_slice().try_into().map_err(|_| FsError::Invalid("block size".into()))?;
                if RgrpHeader::decode(block, e.addr)?.unlinked == 0 {
                    continue;
                }
            }
            let orphans = self.run(true, |c| {
                let mut tx = Tx::new(c);
                tx.lock_rgrp(e.addr)?;
                if RgrpHeader::decode(&*tx.read(e.addr)?, e.addr)?.unlinked == 0 {
                    return Ok(Vec::new());
                }
                let mut orphans = Vec::new();
                for bi in 0..e.bitmap_blocks {
                    let baddr = e.addr + 1 + u64::from(bi);
                    let b = tx.read(baddr)?;
                    let bits = decode_bitmap(&b, baddr)?;
                    for (i, byte) in bits.iter().enumerate() {
                        for s in 0..4 {
                            if BlockState::from_bits(byte >> (2 * s)) == BlockState::Unlinked {
                                let k = u64::from(bi) * u64::from(BITMAP_BLOCKS_PER) + (i as u64) * 4 + s;
                                if k < u64::from(e.length) {
                                    orphans.push(e.addr + k);
                                }
                            }
                        }
                    }
                }
                Ok(orphans)
            })?;
            all.extend(orphans);
        }
        Ok(all)
    }

    /// At unmount the kernel's references are gone (it sends no FORGET for the inodes
    /// it still had): inodes unlinked while referenced are freed now rather than left
    /// for the next mount's orphan scan. In a cluster this node also gives back its
    /// iopen glocks, and frees an unlinked inode only if no other node has it (the
    /// last node to have it does, at its own close or unmount).
    pub(super) fn free_unlinked_at_unmount(&self) -> Result<()> {
        let referenced: Vec<u64> = {
            let mut c = self.core.lock();
            let v = c.refs.keys().copied().collect();
            c.refs.clear();
            v
        };
        if !self.locks.is_cluster() {
            let unlinked: Vec<u64> = self.core.lock().unlinked.iter().copied().collect();
            for ino in unlinked {
                self.free_unlinked(ino)?;
            }
            return Ok(());
        }
        // This node's iopen glocks go back first (holders, then the DLM locks): two
        // nodes unmounting at once, each still holding the other's shared lock,
        // would each refuse the other's exclusive try and leave the inode behind.
        let held: Vec<LockName> =
            self.iopen.lock().drain().filter(|(_, h)| h.is_some()).map(|(ino, _)| LockName::Iopen(ino)).collect();
        self.locks.uncache_all(&held);
        let mut cands: Vec<u64> = self.core.lock().unlinked.iter().copied().collect();
        for ino in referenced {
            match self.getattr(ino) {
                Ok(a) if a.nlink == 0 => cands.push(ino),
                _ => {}
            }
        }
        cands.sort_unstable();
        cands.dedup();
        // Tried in rounds, as the reclaim thread does: a try that fails because
        // another node only has the iopen glock cached makes that node give it back
        // (TRY_1CB), and the next round's try works. Tried once only, such an inode
        // was left behind (an orphan that fsck found after a stress run's `cluster
        // down`): the other node never knew it was unlinked.
        for delay in std::iter::once(Duration::ZERO).chain(RECLAIM_RETRY) {
            if cands.is_empty() {
                break;
            }
            std::thread::sleep(delay);
            let mut left = Vec::new();
            for ino in cands {
                match self.free_if_unused(ino) {
                    Ok(true) => {}
                    Ok(false) => left.push(ino),
                    // A request refused while another node leaves (the whole
                    // cluster going down at once): tried again in the next round
                    // rather than leaving this and every later candidate behind.
                    Err(e) if !self.is_withdrawn() => {
                        tracing::debug!(ino, error = %e, "freeing an unlinked inode at unmount: trying again");
                        left.push(ino);
                    }
                    Err(e) => return Err(e),
                }
            }
            cands = left;
        }
        // Open on another node, which frees them at its own last close.
        let mut c = self.core.lock();
        for ino in cands {
            c.unlinked.remove(&ino);
        }
        Ok(())
    }
}

/// Drops `n` of inode `ino`'s references; true when that was the last one of an inode
/// whose last link went while it was referenced (it must be freed now).
fn drop_refs(c: &mut Core, ino: u64, n: u64) -> bool {
    match c.refs.get_mut(&ino) {
        Some(k) if u64::from(*k) > n => {
            *k -= n as u32;
            false
        }
        Some(_) => {
            c.refs.remove(&ino);
            c.unlinked.contains(&ino)
        }
        None => false,
    }
}

/// Frees an inode and every block it owns (its listing, cached or taken, goes too).
pub(super) fn free_inode(tx: &mut Tx<'_>, ino: u64, mut d: Dinode) -> Result<()> {
    tx.core.drop_inode(ino);
    tx.forget_listing(ino);
    if d.is_dir() {
        dir::free_all(tx, ino, &mut d)?;
    } else if d.flags & DIF_JOURNAL == 0 {
        bmap::free_range(tx, ino, &mut d, 0, u64::MAX, false)?;
    }
    if d.xattr != 0 {
        tx.free_block(d.xattr, true)?;
    }
    tx.free_block(ino, true)
}
