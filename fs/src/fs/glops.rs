//! What glock demotes and journal recovery ask of the filesystem, as GFS2's glops.c:
//! the sync before an EX glock leaves this node, the invalidation of Concord's caches
//! (and the kernel's, through [`super::kernel`]) before any glock leaves, forgetting
//! everything after another node's journal was replayed, and the cluster's withdraw.
//! [`crate::cluster`] calls these from the glock runtime's demote thread and lock_dlm's
//! recovery.

use concord_journal::Block;

use crate::format::sealed_owner;
use crate::lock::LockName;
use crate::{FsError, Result};

use super::Filesystem;

impl Filesystem {
    /// Before a glock held EX leaves this node: every change made under it reaches its
    /// home on the device, and this node's journal no longer holds it, so that a later
    /// replay of this journal can never overwrite what another node writes there next.
    ///
    /// As GFS2's `inode_go_sync`/`rgrp_go_sync` with `ail_empty_gl`: data writes of an
    /// inode in flight are waited for, the journal commits, and only the glock's own
    /// blocks are written home and revoked ([`concord_journal::Journal::write_back`]):
    /// an inode's dinode and the blocks stamped with it as owner (indirect, directory
    /// and xattr blocks), an rgrp's header and bitmaps. Every change to those blocks is
    /// made under this glock held EX (a transaction takes its inodes' and rgrps' glocks
    /// before it writes), so no other glock's demote needs them, and what other glocks
    /// logged stays in the journal until their own demote or the log's next checkpoint.
    pub fn sync_glock(&self, name: LockName) -> Result<()> {
        let owned: Box<dyn Fn(u64, &Block) -> bool> = match name {
            LockName::Inode(ino) => {
                // Another node may have this inode from now on.
                self.born_here.lock().remove(&ino);
                self.wait_data(ino, 0, u64::MAX);
                Box::new(move |addr, b| addr == ino || sealed_owner(b) == ino)
            }
            LockName::Rgrp(addr) => {
                let Some(range) = self.core.lock().rgrp_meta(addr) else {
                    return Ok(());
                };
                Box::new(move |a, _| range.contains(&a))
            }
            // They guard no block of their own: what changed under them changed
            // under inode and rgrp glocks too, which write it back when they go.
            LockName::Rename | LockName::Iopen(_) | LockName::Journal(_) => return Ok(()),
        };
        if self.is_withdrawn() {
            return Err(FsError::Withdrawn);
        }
        let Some(j) = &self.journal else {
            return Ok(());
        };
        let r = j.write_back(&*owned).map(drop).map_err(FsError::from);
        if let Err(e) = &r {
            self.withdraw(e);
        }
        r
    }

    /// Before a glock leaves this node (or goes down to a mode that may not cache):
    /// Concord's caches of what it protects go, and the kernel's. An inode's dinode,
    /// map and directory blocks, listing and cached data; an rgrp's header and bitmap
    /// blocks (its free count is re-read from the header when the lock comes back).
    /// The kernel is told on its own threads ([`Filesystem::set_kernel_cache`]), and
    /// this waits for its confirmation; false when it did not come in time (see
    /// [`Filesystem::kernel_invalidate`] and docs/internals/glocks.md: the glock is
    /// then lent to the local requests waiting for it, which may hold the kernel lock
    /// the notification waits for, and the demote starts over).
    pub fn invalidate_glock(&self, name: LockName) -> bool {
        match name {
            LockName::Inode(ino) => {
                self.core.lock().drop_inode(ino);
                // A directory's names the kernel was given go with it.
                let names = self.kernel_names.lock().dir_left(ino);
                // Local requests waiting for this glock may hold the kernel's locks
                // that the invalidation needs (a create holds its directory's, a read
                // its page's): then the wait is short.
                let locks = self.locks.clone();
                let confirmed = Box::new(move || locks.kernel_confirmed(name));
                self.kernel_invalidate(names, ino, &|| self.locks.has_waiters(name), confirmed)
            }
            LockName::Rgrp(addr) => {
                self.core.lock().drop_rgrp(addr);
                true
            }
            LockName::Rename | LockName::Iopen(_) | LockName::Journal(_) => true,
        }
    }

    /// After another node's journal was replayed into the device: everything cached
    /// may be older than what the replay wrote, so all of it goes.
    pub fn forget_metadata(&self) {
        let mut c = self.core.lock();
        c.drop_all();
    }

    /// Stops every write (a fenced node, a lost lockd, a failed demote): further
    /// operations fail, nothing more reaches the journal.
    pub fn withdraw_cluster(&self, why: &str) {
        self.withdraw(&FsError::Lock(why.to_string()));
        if let Some(j) = &self.journal {
            j.stop_background();
        }
    }

    /// Cluster mounts: start allocating in the part of the device that belongs to
    /// journal `jid` of `journals`, so that nodes allocate from different rgrps (and
    /// their rgrp glocks stay where they are).
    pub fn spread_allocation(&self, jid: u32, journals: u32) {
        self.core.lock().spread_allocation(jid, journals);
    }
}
