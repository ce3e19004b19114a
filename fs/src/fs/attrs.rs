//! Attributes: getattr, setattr (truncate included: [`super::data`] does the blocks),
//! statfs, extended attributes.

use crate::core::Tx;
use crate::format::*;
use crate::lock::{LockMode, LockName};
use crate::{xattr, FsError, Result};

use super::data::truncate;
use super::{now, Attr, Filesystem, SetAttr, SetTime, StatFs, XattrSet};

pub(super) fn attr_of(ino: u64, d: &Dinode) -> Attr {
    Attr {
        ino,
        mode: d.mode,
        nlink: d.nlink,
        uid: d.uid,
        gid: d.gid,
        size: d.size,
        blocks: d.blocks + 1 + u64::from(d.xattr != 0),
        atime: d.atime,
        mtime: d.mtime,
        ctime: d.ctime,
        rdev: d.rdev,
        generation: d.generation,
    }
}

impl Filesystem {
    /// Asks, without waiting, for the shared inode and iopen glocks of `inos`, whose
    /// attributes the caller is about to read and which the kernel will then hold
    /// (a READDIRPLUS of a directory another node filled): their DLM requests then
    /// travel together instead of two round trips (and a demote on the node that holds
    /// them) per entry, one entry after the other. Does nothing on one node.
    pub fn prefetch_attrs(&self, inos: impl Iterator<Item = u64>) {
        if !self.locks.is_cluster() {
            return;
        }
        for ino in inos {
            self.locks.prefetch(LockName::Inode(ino), LockMode::Shared);
            self.locks.prefetch(LockName::Iopen(ino), LockMode::Shared);
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr> {
        let _l = self.lock(&[ino], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dinode_shared(ino)?;
            Ok(attr_of(ino, &d))
        })
    }

    pub fn setattr(&self, ino: u64, s: &SetAttr) -> Result<Attr> {
        let _l = self.lock(&[ino], LockMode::Exclusive)?;
        if s.size.is_some() {
            self.wait_data(ino, 0, u64::MAX);
        }
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut d = tx.dinode(ino)?;
            let t = now();
            if let Some(m) = s.mode {
                d.mode = (d.mode & S_IFMT) | (m & 0o7777);
            }
            if let Some(u) = s.uid {
                d.uid = u;
            }
            if let Some(g) = s.gid {
                d.gid = g;
            }
            if let Some(size) = s.size {
                if d.is_dir() {
                    return Err(FsError::IsDir);
                }
                if !d.is_reg() {
                    return Err(FsError::Invalid("truncate of a special file".into()));
                }
                truncate(&mut tx, ino, &mut d, size)?;
                d.mtime = t;
            }
            let pick = |st: SetTime| match st {
                SetTime::Now => t,
                SetTime::At(x) => x,
            };
            if let Some(a) = s.atime {
                d.atime = pick(a);
            }
            if let Some(m) = s.mtime {
                d.mtime = pick(m);
            }
            d.ctime = t;
            // The kernel's time flush after the last unlink of a regular file (in
            // writeback-cache mode the kernel owns a regular file's mtime and ctime and
            // writes them back with a SETATTR of the mtime after every unlink, rename and
            // link). Nobody can read these times again: the kernel keeps its own while it
            // holds the inode, and the inode is freed when it lets go (or at the next
            // mount). So no transaction for them.
            let times_only = s.mode.is_none() && s.uid.is_none() && s.gid.is_none() && s.size.is_none();
            if times_only && s.atime.is_none() && d.nlink == 0 && d.is_reg() {
                return Ok(attr_of(ino, &d));
            }
            tx.put_dinode(ino, &d);
            let seq = tx.commit()?;
            if s.size.is_some() {
                c.data_changed(ino, seq);
            }
            Ok(attr_of(ino, &d))
        })
    }

    pub fn statfs(&self) -> Result<StatFs> {
        if self.is_cluster() {
            return self.statfs_cluster();
        }
        self.run(false, |c| {
            let (blocks, bfree) = c.block_counts();
            Ok(stat_fs(blocks, bfree))
        })
    }

    /// statfs in a cluster, as GFS2's: the master record (read under its glock, shared)
    /// plus this node's change file. Other nodes' changes count once they fold them
    /// into the master ([`Filesystem::statfs_sync`], every [`super::STATFS_QUANTUM`] on a
    /// node with changes, and at unmount): like GFS2's statfs without `statfs_slow`,
    /// it may lag them by that much. A read-only mount has no change file and sums
    /// the rgrp headers as the device has them.
    fn statfs_cluster(&self) -> Result<StatFs> {
        let files = self.core.lock().statfs;
        let Some(sf) = files else {
            return self.statfs_from_headers();
        };
        let _l = self.lock(&[sf.master], LockMode::Shared)?;
        self.run(false, |c| {
            let blocks = c.data_blocks();
            let local = c.statfs.map(|s| s.local).unwrap_or_default();
            let mut tx = Tx::new(c);
            let m = StatfsMaster::decode(&tx.dinode_unchecked(sf.master)?, sf.master)?.plus(local);
            let bfree = m.free.min(blocks);
            Ok(stat_fs(blocks, bfree))
        })
    }

    /// statfs of a read-only cluster mount: the sum of the rgrp headers as the device
    /// has them (each node writes its headers home at every demote of an rgrp glock
    /// and at each checkpoint).
    fn statfs_from_headers(&self) -> Result<StatFs> {
        let rgrps = self.core.lock().rgrp_free_counts();
        let mut blocks = 0u64;
        let mut bfree = 0u64;
        let mut b = vec![0u8; BLOCK_SIZE];
        for (e, mine) in rgrps {
            blocks += u64::from(e.data_blocks);
            self.dev.read_at(e.addr * BLOCK_SIZE as u64, &mut b)?;
            let block: &Block = b.as_slice().try_into().map_err(|_| FsError::Invalid("block size".into()))?;
            match RgrpHeader::decode(block, e.addr) {
                Ok(h) => bfree += u64::from(h.free),
                Err(_) => bfree += u64::from(mine),
            }
        }
        Ok(stat_fs(blocks, bfree))
    }

    /// Folds this node's statfs change file into the master record, in one
    /// transaction under the master's glock (exclusive), as GFS2's `gfs2_statfs_sync`.
    /// Returns whether there was anything to fold.
    pub fn statfs_sync(&self) -> Result<bool> {
        let closed = self.statfs_closed.lock();
        if *closed {
            return Ok(false);
        }
        self.statfs_sync_locked()
    }

    /// Folds journal `jid`'s change file (not this mount's) into the master record and
    /// zeroes it, when no node owns the journal: its journal glock is tried (a node
    /// that mounted with it holds it, and takes the change file as its own). The
    /// zeroed change file is written home and revoked from this node's journal before
    /// the journal glock goes, so that the next owner reads it from the device.
    /// Returns whether anything was folded.
    pub fn fold_statfs_of(&self, jid: u32) -> Result<bool> {
        let files = self.core.lock().statfs;
        let Some(sf) = files else { return Ok(false) };
        if jid >= self.sb.journals || self.is_withdrawn() {
            return Ok(false);
        }
        let Some(_journal) = self.locks.try_acquire(LockName::Journal(jid), LockMode::Exclusive)? else {
            return Ok(false);
        };
        let _l = self.lock(&[sf.master], LockMode::Exclusive)?;
        let change = self.run(true, |c| {
            let sb = c.sb.clone();
            let mut tx = Tx::new(c);
            let m = tx.dinode_unchecked(sb.master_dinode)?;
            let name = format!("statfs_change{jid}");
            let Some(e) = crate::dir::lookup(&mut tx, sb.master_dinode, &m, name.as_bytes())? else {
                return Err(FsError::Invalid(format!("master directory: no {name}")));
            };
            if e.ino == sf.change {
                return Ok(None);
            }
            // Read from the device: the journal's owner wrote it last, not this node.
            tx.core.cache_remove(e.ino);
            let mut cd = tx.dinode_unchecked(e.ino)?;
            let ch = StatfsChange::decode(&cd, e.ino)?;
            if ch.is_zero() {
                return Ok(None);
            }
            let mut md = tx.dinode_unchecked(sf.master)?;
            StatfsMaster::decode(&md, sf.master)?.plus(ch).store(&mut md);
            tx.put_dinode(sf.master, &md);
            StatfsChange::default().store(&mut cd);
            tx.put_dinode(e.ino, &cd);
            tx.commit()?;
            tracing::info!(jid, free = ch.free, dinodes = ch.dinodes, "statfs changes of a departed journal folded");
            Ok(Some(e.ino))
        })?;
        let Some(change) = change else { return Ok(false) };
        if let Some(j) = &self.journal {
            let r = j.write_back(&|a, _| a == change).map_err(FsError::from);
            if let Err(e) = &r {
                self.withdraw(e);
            }
            r?;
        }
        Ok(true)
    }

    /// [`Filesystem::statfs_sync`] with its mutex held.
    pub(super) fn statfs_sync_locked(&self) -> Result<bool> {
        let files = self.core.lock().statfs;
        let Some(sf) = files.filter(|s| !s.local.is_zero()) else {
            return Ok(false);
        };
        let _l = self.lock(&[sf.master], LockMode::Exclusive)?;
        self.run(true, |c| {
            let Some(local) = c.statfs.map(|s| s.local).filter(|l| !l.is_zero()) else {
                return Ok(false);
            };
            let mut tx = Tx::new(c);
            let mut md = tx.dinode_unchecked(sf.master)?;
            let m = StatfsMaster::decode(&md, sf.master)?.plus(local);
            m.store(&mut md);
            tx.put_dinode(sf.master, &md);
            let mut cd = tx.dinode_unchecked(sf.change)?;
            StatfsChange::default().store(&mut cd);
            tx.put_dinode(sf.change, &cd);
            tx.folds_statfs();
            tx.commit()?;
            tracing::debug!(free = local.free, dinodes = local.dinodes, "statfs change folded into the master record");
            Ok(true)
        })
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        let _l = self.lock(&[ino], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dinode_shared(ino)?;
            xattr::get(&mut tx, ino, &d, name)
        })
    }

    pub fn listxattr(&self, ino: u64) -> Result<Vec<Vec<u8>>> {
        let _l = self.lock(&[ino], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dinode_shared(ino)?;
            Ok(xattr::all(&mut tx, ino, &d)?.into_iter().map(|(n, _)| n).collect())
        })
    }

    pub fn setxattr(&self, ino: u64, name: &[u8], value: &[u8], how: XattrSet) -> Result<()> {
        xattr::check_name(name)?;
        let _l = self.lock(&[ino], LockMode::Exclusive)?;
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut d = tx.dinode(ino)?;
            xattr::set(&mut tx, ino, &mut d, name, Some(value), how)?;
            d.ctime = now();
            tx.put_dinode(ino, &d);
            tx.commit()?;
            Ok(())
        })
    }

    pub fn removexattr(&self, ino: u64, name: &[u8]) -> Result<()> {
        let _l = self.lock(&[ino], LockMode::Exclusive)?;
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut d = tx.dinode(ino)?;
            xattr::set(&mut tx, ino, &mut d, name, None, XattrSet::Replace)?;
            d.ctime = now();
            tx.put_dinode(ino, &d);
            tx.commit()?;
            Ok(())
        })
    }
}

/// statfs's answer for `blocks` data blocks of which `bfree` are free (every free block
/// can hold an inode: files is blocks, ffree is bfree).
fn stat_fs(blocks: u64, bfree: u64) -> StatFs {
    StatFs { blocks, bfree, files: blocks, ffree: bfree, bsize: BLOCK_SIZE as u32, namelen: NAME_MAX as u32 }
}
