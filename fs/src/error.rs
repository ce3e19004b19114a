//! The filesystem's error type. The FUSE adapter maps it to errno in one place.

use concord_journal::{DeviceError, JournalError};

use crate::format::FormatError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("already exists: {0}")]
    Exists(String),
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("no space left on device")]
    NoSpace,
    #[error("file name too long")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no such attribute")]
    NoAttr,
    #[error("file too large")]
    TooBig,
    #[error("too many links")]
    TooManyLinks,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("permission denied")]
    Access,
    #[error("operation not supported: {0}")]
    NotSupported(String),
    #[error("stale inode {0}")]
    Stale(u64),
    #[error("filesystem withdrawn after an earlier error; unmount and run fsck")]
    Withdrawn,
    #[error("corrupt metadata: {0}")]
    Corrupt(#[from] FormatError),
    #[error("device error: {0}")]
    Device(#[from] DeviceError),
    #[error("journal error: {0}")]
    Journal(#[from] JournalError),
    /// Inside the filesystem mutex, a lock that is not held and cannot be had without
    /// waiting (a DLM request, or a local holder): [`crate::Filesystem`] drops the
    /// mutex, takes it (with the others needed, in lock order) and runs the operation
    /// again. Never returned to callers.
    #[error("internal: {0:?} is needed in {1:?} mode")]
    NeedLock(crate::lock::LockName, crate::lock::LockMode),
    /// Inside the filesystem mutex, a lock worth having but not worth waiting for (an
    /// rgrp with new inode numbers whose lock directory is this node, when the rgrps
    /// held here have none left): [`crate::Filesystem`] drops the mutex, tries for it
    /// once without queueing (held elsewhere: the rgrp is passed over for a while), and
    /// runs the operation again either way. Never returned to callers.
    #[error("internal: {0:?} is wanted in {1:?} mode")]
    TryLock(crate::lock::LockName, crate::lock::LockMode),
    /// The cluster lock manager failed a lock request (lockd gone, fenced, withdrawn).
    #[error("cluster lock failed: {0}")]
    Lock(String),
}

impl FsError {
    /// Errors after which the node must stop writing (withdraw).
    pub fn is_fatal(&self) -> bool {
        matches!(self, FsError::Corrupt(_) | FsError::Device(_) | FsError::Journal(_) | FsError::Withdrawn)
    }
}

pub type Result<T, E = FsError> = std::result::Result<T, E>;
