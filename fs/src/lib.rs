//! concord-fs: Concord's filesystem.
//!
//! * [`format`]: the on-disk format (docs/internals/disk-format.md).
//! * [`mkfs`]: making a filesystem.
//! * [`Filesystem`]: the mounted filesystem's API (lookup, create, read, write, ...),
//!   which the FUSE adapter and most tests call.
//! * [`lock`]: lock handles: local locks (lock_nolock) or glocks (lock_dlm).
//! * [`glock`]: glocks, a node's cached holds on DLM locks (docs/internals/glocks.md).
//! * [`lock_dlm`]: the mount and recovery control protocol (docs/internals/lock_dlm.md).
//! * [`cluster`]: a cluster mount, joining the three (docs/internals/cluster.md).
//! * [`plock`]: flock and fcntl locks across the nodes of a cluster mount.
//! * [`cache`]: file data cached per inode.

mod bmap;
pub mod cache;
pub mod cluster;
mod core;
mod dir;
mod error;
pub mod format;
mod fs;
pub mod fsck;
pub mod fuse;
pub mod glock;
#[cfg(test)]
mod golden;
pub mod lock;
pub mod lock_dlm;
pub mod mkfs;
pub mod plock;
mod xattr;

pub use error::{FsError, Result};
pub use fs::{
    journal_region, read_superblock, replay_all, replay_journal, Attr, DirItem, Filesystem, KernelCache, MountOptions,
    RenameFlags, SetAttr, SetTime, StatFs, XattrSet,
};
