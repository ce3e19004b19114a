//! Names: lookup, creating (create, mknod, mkdir, symlink), readlink, link, unlink and
//! rmdir, rename, readdir and the cached listings behind it. Freeing an inode whose
//! last link goes is [`super::inode`]'s.

use std::sync::Arc;

use crate::cache::Listing;
use crate::core::Tx;
use crate::format::*;
use crate::lock::{LockMode, LockName};
use crate::{dir, FsError, Result};

use super::attrs::attr_of;
use super::inode::free_inode;
use super::{now, Attr, DirItem, Filesystem, RenameFlags};

fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    if !valid_name(name) {
        return Err(FsError::Invalid(format!("bad name {:?}", String::from_utf8_lossy(name))));
    }
    Ok(())
}

const S_ISGID: u32 = 0o2000;
const MAX_LINKS: u32 = 65000;

/// Inodes whose glocks a create asks for ahead ([`Tx::prefetch_next_inodes`]).
const PREFETCH_INODES: usize = 8;

impl Filesystem {
    pub fn lookup(&self, parent: u64, name: &[u8]) -> Result<Attr> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let _l = self.lock(&[parent], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let pd = tx.dir(parent)?;
            if name == b"." {
                return Ok(attr_of(parent, &pd));
            }
            if name == b".." {
                let pp = if pd.parent == 0 { parent } else { pd.parent };
                let d = tx.dinode_shared(pp)?;
                return Ok(attr_of(pp, &d));
            }
            let e = dir::lookup(&mut tx, parent, &pd, name)?.ok_or(FsError::NotFound)?;
            let d = tx.dinode_shared(e.ino)?;
            Ok(attr_of(e.ino, &d))
        })
    }

    /// Creates a regular file, device node, fifo or socket (the type is in `mode`).
    pub fn mknod(&self, parent: u64, name: &[u8], mode: u32, rdev: u32, uid: u32, gid: u32) -> Result<Attr> {
        let t = mode & S_IFMT;
        let mode = if t == 0 { mode | S_IFREG } else { mode };
        if ![S_IFREG, S_IFIFO, S_IFSOCK, S_IFCHR, S_IFBLK].contains(&(mode & S_IFMT)) {
            return Err(FsError::Invalid("mknod of this file type".into()));
        }
        self.create_node(parent, name, mode, rdev, uid, gid, None)
    }

    pub fn create(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        self.create_node(parent, name, S_IFREG | (mode & 0o7777), 0, uid, gid, None)
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        self.create_node(parent, name, S_IFDIR | (mode & 0o7777), 0, uid, gid, None)
    }

    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8], uid: u32, gid: u32) -> Result<Attr> {
        if target.is_empty() || target.len() > SYMLINK_MAX {
            return Err(if target.is_empty() {
                FsError::Invalid("empty symlink".into())
            } else {
                FsError::NameTooLong
            });
        }
        self.create_node(parent, name, S_IFLNK | 0o777, 0, uid, gid, Some(target))
    }

    fn create_node(
        &self,
        parent: u64,
        name: &[u8],
        mut mode: u32,
        rdev: u32,
        uid: u32,
        mut gid: u32,
        target: Option<&[u8]>,
    ) -> Result<Attr> {
        check_name(name)?;
        let _l = self.lock(&[parent], LockMode::Exclusive)?;
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut pd = tx.dir(parent)?;
            if pd.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if dir::lookup(&mut tx, parent, &pd, name)?.is_some() {
                return Err(FsError::Exists(String::from_utf8_lossy(name).into_owned()));
            }
            let is_dir = mode & S_IFMT == S_IFDIR;
            if is_dir && pd.nlink >= MAX_LINKS {
                return Err(FsError::TooManyLinks);
            }
            if pd.mode & S_ISGID != 0 {
                gid = pd.gid;
                if is_dir {
                    mode |= S_ISGID;
                }
            }
            let ino = tx.alloc(parent, BlockState::Dinode)?;
            // The reply's reference takes its iopen glock: asked for now, it travels
            // beside the inode glock's request rather than after it.
            tx.core.locks.prefetch(LockName::Iopen(ino), LockMode::Shared);
            tx.prefetch_next_inodes(ino, PREFETCH_INODES);
            tx.lock_inode_ex(ino)?;
            let g = tx.next_generation(ino)?;
            let t = now();
            let mut d = Dinode::new(mode, uid, gid, t, g);
            d.rdev = rdev;
            if is_dir {
                d.nlink = 2;
                d.parent = parent;
                pd.nlink += 1;
                tx.new_listing(ino);
            }
            if let Some(target) = target {
                if target.len() <= STUFFED_MAX {
                    d.payload[..target.len()].copy_from_slice(target);
                } else {
                    // A long target gets a data block of its own, written before the
                    // commit that makes the dinode point at it (ordered).
                    let a = tx.alloc(ino, BlockState::Used)?;
                    let mut b = vec![0u8; BLOCK_SIZE];
                    b[..target.len()].copy_from_slice(target);
                    tx.core.dev.write_at(a * BLOCK_SIZE as u64, &b)?;
                    tx.ordered = true;
                    d.height = 1;
                    d.set_ptr(0, a);
                    d.blocks = 1;
                }
                d.size = target.len() as u64;
            }
            dir::add(&mut tx, parent, &mut pd, DirEntry::new(name, ino, dtype_of(mode)))?;
            pd.mtime = t;
            pd.ctime = t;
            tx.put_dinode(parent, &pd);
            tx.put_dinode(ino, &d);
            let cluster = tx.core.locks.is_cluster();
            tx.commit()?;
            if cluster {
                // The parent's lock is still held: no other node can have come to
                // the new inode yet (its name is only in this node's directory).
                self.born_here.lock().insert(ino);
            }
            Ok(attr_of(ino, &d))
        })
    }

    pub fn readlink(&self, ino: u64) -> Result<Vec<u8>> {
        let _l = self.lock(&[ino], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dinode_shared(ino)?;
            if !d.is_symlink() {
                return Err(FsError::Invalid("not a symlink".into()));
            }
            let len = d.size as usize;
            if d.height == 0 {
                return Ok(d.payload[..len].to_vec());
            }
            let a = d.ptr(0);
            if a == 0 || len > BLOCK_SIZE {
                return Err(FsError::Corrupt(bad(ino, "symlink", "long target without its block")));
            }
            let mut b = vec![0u8; BLOCK_SIZE];
            tx.core.dev.read_at(a * BLOCK_SIZE as u64, &mut b)?;
            b.truncate(len);
            Ok(b)
        })
    }

    pub fn link(&self, ino: u64, parent: u64, name: &[u8]) -> Result<Attr> {
        check_name(name)?;
        let _l = self.lock(&[parent, ino], LockMode::Exclusive)?;
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut pd = tx.dir(parent)?;
            let mut d = tx.dinode(ino)?;
            if d.is_dir() {
                return Err(FsError::NotSupported("hard links to directories".into()));
            }
            if d.nlink == 0 {
                return Err(FsError::NotFound);
            }
            if d.nlink >= MAX_LINKS {
                return Err(FsError::TooManyLinks);
            }
            if dir::lookup(&mut tx, parent, &pd, name)?.is_some() {
                return Err(FsError::Exists(String::from_utf8_lossy(name).into_owned()));
            }
            let t = now();
            dir::add(&mut tx, parent, &mut pd, DirEntry::new(name, ino, dtype_of(d.mode)))?;
            d.nlink += 1;
            d.ctime = t;
            pd.mtime = t;
            pd.ctime = t;
            tx.put_dinode(parent, &pd);
            tx.put_dinode(ino, &d);
            tx.commit()?;
            Ok(attr_of(ino, &d))
        })
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> Result<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &[u8], want_dir: bool) -> Result<()> {
        if name == b"." || name == b".." {
            return Err(if want_dir { FsError::Invalid("rmdir of . or ..".into()) } else { FsError::IsDir });
        }
        let _l = self.lock(&[parent], LockMode::Exclusive)?;
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            let mut pd = tx.dir(parent)?;
            let e = dir::lookup(&mut tx, parent, &pd, name)?.ok_or(FsError::NotFound)?;
            tx.lock_inode_ex(e.ino)?;
            let mut d = tx.dinode(e.ino)?;
            if want_dir && !d.is_dir() {
                return Err(FsError::NotDir);
            }
            if !want_dir && d.is_dir() {
                return Err(FsError::IsDir);
            }
            if want_dir && d.dir_entries != 0 {
                return Err(FsError::NotEmpty);
            }
            dir::remove(&mut tx, parent, &mut pd, name)?;
            let t = now();
            pd.mtime = t;
            pd.ctime = t;
            if want_dir {
                pd.nlink -= 1;
            }
            tx.put_dinode(parent, &pd);
            drop_link(&mut tx, e.ino, &mut d, t)?;
            tx.commit()?;
            Ok(())
        })?;
        self.free_unlinked_now()
    }

    pub fn rename(&self, p1: u64, n1: &[u8], p2: u64, n2: &[u8], flags: RenameFlags) -> Result<()> {
        check_name(n2)?;
        check_name(n1)?;
        if flags.exchange && flags.noreplace {
            return Err(FsError::Invalid("RENAME_EXCHANGE with RENAME_NOREPLACE".into()));
        }
        // The rename lock (GFS2's sd_rename_gl) keeps two moves across directories
        // from making a loop; a rename within one directory cannot, and its
        // directory's lock is enough (in a cluster the rename glock would otherwise
        // travel between nodes for every rename).
        let _r = if p1 != p2 { Some(self.locks.acquire(LockName::Rename, LockMode::Exclusive)?) } else { None };
        let _l = self.lock(&[p1, p2], LockMode::Exclusive)?;
        self.run(true, |c| {
            let mut tx = Tx::new(c);
            rename_tx(&mut tx, p1, n1, p2, n2, flags)?;
            tx.commit()?;
            Ok(())
        })?;
        self.free_unlinked_now()
    }

    pub fn readdir(&self, ino: u64, after: u64, max: usize) -> Result<Vec<DirItem>> {
        let all = self.listing(ino)?;
        let mut out: Vec<DirItem> = Vec::new();
        // At least `max` entries, and never half of a run of equal cookies.
        for e in all.after(after) {
            if out.len() >= max.max(1) && out.last().is_some_and(|l| l.cookie != e.hash) {
                break;
            }
            out.push(DirItem { cookie: e.hash, name: e.name.to_vec(), ino: e.ino, dtype: e.dtype });
        }
        Ok(out)
    }

    /// Every entry of directory `ino` in cookie order (`DirEntry::hash`): a snapshot,
    /// cached until the directory changes.
    pub fn listing(&self, ino: u64) -> Result<Arc<Listing>> {
        let _l = self.lock(&[ino], LockMode::Shared)?;
        self.run(false, |c| {
            let mut tx = Tx::new(c);
            let d = tx.dir(ino)?;
            if let Some(l) = tx.core.listing(ino) {
                return Ok(l.clone());
            }
            let l = Arc::new(dir::list_all(&mut tx, ino, &d)?);
            tx.core.cache_listing(ino, l.clone());
            Ok(l)
        })
    }

    /// The parent of a directory (itself for the root).
    pub fn parent_of(&self, ino: u64) -> Result<u64> {
        self.run(false, |c| {
            let d = Tx::new(c).dinode_shared(ino)?;
            Ok(if d.parent == 0 { ino } else { d.parent })
        })
    }
}

/// Drops one link of `d` (already removed from its directory): frees the inode when no
/// link is left and nobody has it open, else marks it UNLINKED until the last close.
fn drop_link(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, t: Time) -> Result<()> {
    d.ctime = t;
    if d.is_dir() {
        d.nlink = 0;
    } else {
        d.nlink = d.nlink.saturating_sub(1);
    }
    if d.nlink > 0 {
        tx.put_dinode(ino, d);
        return Ok(());
    }
    // In a cluster another node may have it open: it is marked unlinked here and freed
    // after the transaction by whichever node is last to have it (iopen glocks).
    if tx.core.refs.get(&ino).copied().unwrap_or(0) > 0 || tx.core.locks.is_cluster() {
        tx.core.unlinked.insert(ino);
        tx.set_state(ino, BlockState::Unlinked)?;
        tx.put_dinode(ino, d);
        return Ok(());
    }
    free_inode(tx, ino, d.clone())
}

/// A directory may not move below itself: walks up from `target_parent` to the root.
fn not_below(tx: &mut Tx<'_>, dir: u64, target_parent: u64) -> Result<()> {
    let mut a = target_parent;
    // Bounded by the tree's depth; the bound guards against a corrupt parent loop.
    for _ in 0..100_000 {
        if a == dir {
            return Err(FsError::Invalid("rename of a directory into itself".into()));
        }
        let ad = tx.dinode(a)?;
        if ad.parent == 0 || ad.parent == a {
            return Ok(());
        }
        a = ad.parent;
    }
    Err(FsError::Corrupt(bad(target_parent, "parent", "loop in the directory tree")))
}

fn rename_tx(tx: &mut Tx<'_>, p1: u64, n1: &[u8], p2: u64, n2: &[u8], flags: RenameFlags) -> Result<()> {
    let mut pd1 = tx.dir(p1)?;
    let mut pd2 = if p1 == p2 { pd1.clone() } else { tx.dir(p2)? };
    let src = dir::lookup(tx, p1, &pd1, n1)?.ok_or(FsError::NotFound)?;
    let dst = dir::lookup(tx, p2, &pd2, n2)?;
    if flags.exchange && dst.is_none() {
        return Err(FsError::NotFound);
    }
    if flags.noreplace && dst.is_some() {
        return Err(FsError::Exists(String::from_utf8_lossy(n2).into_owned()));
    }
    if let Some(dst) = &dst {
        if dst.ino == src.ino {
            return Ok(()); // same inode: rename(2) does nothing
        }
    }
    tx.lock_inode_ex(src.ino)?;
    if let Some(dst) = &dst {
        tx.lock_inode_ex(dst.ino)?;
    }
    let mut sd = tx.dinode(src.ino)?;
    let t = now();
    if sd.is_dir() && p1 != p2 {
        not_below(tx, src.ino, p2)?;
    }
    if flags.exchange {
        let dst = dst.expect("checked above: exchange needs a target");
        let mut dd = tx.dinode(dst.ino)?;
        if dd.is_dir() && p1 != p2 {
            not_below(tx, dst.ino, p1)?;
        }
        dir::remove(tx, p1, &mut pd1, n1)?;
        if p1 == p2 {
            dir::remove(tx, p1, &mut pd1, n2)?;
            dir::add(tx, p1, &mut pd1, DirEntry::new(n1, dst.ino, dst.dtype))?;
            dir::add(tx, p1, &mut pd1, DirEntry::new(n2, src.ino, src.dtype))?;
        } else {
            dir::remove(tx, p2, &mut pd2, n2)?;
            dir::add(tx, p1, &mut pd1, DirEntry::new(n1, dst.ino, dst.dtype))?;
            dir::add(tx, p2, &mut pd2, DirEntry::new(n2, src.ino, src.dtype))?;
            if sd.is_dir() {
                sd.parent = p2;
                pd1.nlink -= 1;
                pd2.nlink += 1;
            }
            if dd.is_dir() {
                dd.parent = p1;
                pd2.nlink -= 1;
                pd1.nlink += 1;
            }
        }
        sd.ctime = t;
        dd.ctime = t;
        tx.put_dinode(src.ino, &sd);
        tx.put_dinode(dst.ino, &dd);
    } else {
        if let Some(dst) = &dst {
            let mut dd = tx.dinode(dst.ino)?;
            if dd.is_dir() && !sd.is_dir() {
                return Err(FsError::IsDir);
            }
            if !dd.is_dir() && sd.is_dir() {
                return Err(FsError::NotDir);
            }
            if dd.is_dir() && dd.dir_entries != 0 {
                return Err(FsError::NotEmpty);
            }
            let target_pd = if p1 == p2 { &mut pd1 } else { &mut pd2 };
            dir::remove(tx, p2, target_pd, n2)?;
            if dd.is_dir() {
                target_pd.nlink -= 1;
            }
            drop_link(tx, dst.ino, &mut dd, t)?;
        }
        dir::remove(tx, p1, &mut pd1, n1)?;
        if p1 == p2 {
            dir::add(tx, p1, &mut pd1, DirEntry::new(n2, src.ino, src.dtype))?;
        } else {
            dir::add(tx, p2, &mut pd2, DirEntry::new(n2, src.ino, src.dtype))?;
            if sd.is_dir() {
                sd.parent = p2;
                pd1.nlink -= 1;
                pd2.nlink += 1;
            }
        }
        sd.ctime = t;
        tx.put_dinode(src.ino, &sd);
    }
    pd1.mtime = t;
    pd1.ctime = t;
    tx.put_dinode(p1, &pd1);
    if p1 != p2 {
        pd2.mtime = t;
        pd2.ctime = t;
        tx.put_dinode(p2, &pd2);
    }
    Ok(())
}
