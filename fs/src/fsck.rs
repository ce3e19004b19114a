//! fsck: an offline check (and with `repair`, repair) of an unmounted Concord device.

use std::sync::Arc;

use concord_journal::BlockDevice;

use crate::FsError;

/// What fsck may do.
#[derive(Debug, Clone, Copy, Default)]
pub struct FsckOptions {
    /// `false` is `-n` (write nothing at all), `true` is `-y` (repair what is safe).
    pub repair: bool,
}

/// One problem found.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The block the problem is about.
    pub block: u64,
    /// What is wrong.
    pub what: String,
    /// Whether fsck repaired it.
    pub fixed: bool,
}

/// What fsck found.
#[derive(Debug, Clone, Default)]
pub struct FsckReport {
    pub problems: Vec<Problem>,
    pub dirty_journals: Vec<u32>,
    pub replayed: Vec<u32>,
    pub inodes: u64,
    pub dirs: u64,
    pub used_blocks: u64,
}

impl FsckReport {
    /// 0 clean, 1 every problem fixed (or journals replayed), 4 problems left.
    pub fn exit_code(&self) -> i32 {
        if self.problems.iter().any(|p| !p.fixed) {
            4
        } else if !self.problems.is_empty() || !self.replayed.is_empty() {
            1
        } else {
            0
        }
    }

    /// Nothing found at all.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }
}

/// Check (and with `opts.repair`, repair) the filesystem on `dev`.
pub fn fsck(
    dev: &Arc<dyn BlockDevice>,
    opts: &FsckOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> crate::Result<FsckReport> {
    let _ = (dev, opts, progress);
    Err(FsError::NotSupported("fsck not yet implemented".into()))
}
