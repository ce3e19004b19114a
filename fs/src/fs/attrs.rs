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
            Ok(StatFs {
                blocks,
                bfree,
                files: blocks,
                ffree: bfree,
                bsize: BLOCK_SIZE as u32,
                namelen: NAME_MAX as u32,
            })
        })
    }

    /// statfs in a cluster: other nodes allocate and free too, so the free count is
    /// the sum of the rgrp headers as the device has them (each node writes its
    /// headers home at every demote of an rgrp glock and at each checkpoint), and this
    /// node's own rgrps as it has them. Like GFS2's statfs without `statfs_slow`, it
    /// may lag what other nodes did since their last write-back. (GFS2 keeps per-node
    /// statfs change files for this; Concord's exist on disk and are not used yet.)
    fn statfs_cluster(&self) -> Result<StatFs> {
        let rgrps = self.core.lock().rgrp_free_counts();
        let mut blocks = 0u64;
        let mut bfree = 0u64;
        let mut b = vec![0u8; BLOCK_SIZE];
        for (e, mine) in rgrps {
            blocks += u64::from(e.data_blocks);
            let held = self.locks.try_now(LockName::Rgrp(e.addr), LockMode::Shared).ok().flatten();
            if held.is_some() {
                bfree += u64::from(mine);
                continue;
            }
            self.dev.read_at(e.addr * BLOCK_SIZE as u64, &mut b)?;
            let block: &Block = b.as_slice().try_into().map_err(|_| FsError::Invalid("block size".into()))?;
            match RgrpHeader::decode(block, e.addr) {
                Ok(h) => bfree += u64::from(h.free),
                Err(_) => bfree += u64::from(mine),
            }
        }
        Ok(StatFs { blocks, bfree, files: blocks, ffree: bfree, bsize: BLOCK_SIZE as u32, namelen: NAME_MAX as u32 })
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
