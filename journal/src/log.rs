//! The per-jid log ring: shared types, errors, and the entry points.
//!
//! * [`format`] (mkfs), [`scan`] (pure read, builds a [`ReplayPlan`]),
//!   [`apply`] (writes a plan, idempotent), [`info`] (for `concord jinfo`):
//!   in `replay.rs`;
//! * [`Journal`]: the running journal of a mounted node (group commit,
//!   checkpoint, clean shutdown): in `journal.rs`.

use std::sync::Arc;

use crate::device::{Block, DeviceError, BLOCK_SIZE};

pub use crate::journal::{Journal, JournalStats, OrderedWrite};
pub use crate::replay::{apply, format, info, scan, JournalInfo, ReplayPlan};

/// Smallest log region accepted, in blocks.
pub const MIN_LOG_BLOCKS: u64 = 256;

/// The blocks a journal occupies on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRegion {
    /// First block address.
    pub start: u64,
    /// Length in blocks (at least [`MIN_LOG_BLOCKS`]).
    pub blocks: u64,
}

impl LogRegion {
    /// Checks the region against the minimum size and the device size.
    pub(crate) fn check(&self, dev_len: u64) -> Result<(), JournalError> {
        if self.blocks < MIN_LOG_BLOCKS {
            return Err(JournalError::TooSmall { blocks: self.blocks, min: MIN_LOG_BLOCKS });
        }
        let dev_blocks = dev_len / BLOCK_SIZE as u64;
        match self.start.checked_add(self.blocks) {
            Some(end) if end <= dev_blocks => Ok(()),
            _ => Err(JournalError::OutsideDevice { region: *self, device_blocks: dev_blocks }),
        }
    }

    /// Absolute block address of ring position `pos`.
    pub(crate) fn addr(&self, pos: u64) -> u64 {
        self.start + pos % self.blocks
    }

    /// Ring position `n` blocks after `pos`.
    pub(crate) fn advance(&self, pos: u64, n: u64) -> u64 {
        (pos + n % self.blocks) % self.blocks
    }

    /// Blocks from `from` to `to` inclusive, walking forward around the ring.
    pub(crate) fn span(&self, from: u64, to: u64) -> u64 {
        (to + self.blocks - from) % self.blocks + 1
    }

    /// The largest batch, in log blocks including its commit header, that the
    /// journal writes: half the ring, so that after a checkpoint the free part
    /// of the ring can always take another batch.
    pub(crate) fn max_batch_blocks(&self) -> u64 {
        self.blocks / 2
    }
}

/// Errors of the journal.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JournalError {
    /// The device failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The journal needs replay before it can be opened.
    #[error("journal {jid} is dirty: replay it first")]
    Dirty {
        /// Journal id.
        jid: u32,
    },
    /// The log contradicts itself (or holds no valid commit header at all).
    #[error("journal corrupt at block {block}: {reason}")]
    Corrupt {
        /// Absolute block address where the problem was found.
        block: u64,
        /// What is wrong.
        reason: String,
    },
    /// The log region is smaller than [`MIN_LOG_BLOCKS`].
    #[error("log region of {blocks} blocks is smaller than the minimum of {min}")]
    TooSmall {
        /// Blocks in the region.
        blocks: u64,
        /// The minimum.
        min: u64,
    },
    /// The log region does not lie inside the device.
    #[error("log region {region:?} lies outside the device of {device_blocks} blocks")]
    OutsideDevice {
        /// The region.
        region: LogRegion,
        /// Device size in blocks.
        device_blocks: u64,
    },
    /// A transaction larger than the log can ever hold was added; the journal
    /// has stopped (see [`Journal::max_transaction_blocks`]).
    #[error("transaction larger than the log can hold")]
    Full,
    /// An earlier I/O error stopped the journal; it refuses further work.
    #[error("journal withdrawn after an earlier error")]
    Withdrawn,
    /// [`Journal::shutdown`] has completed; the journal accepts no more work.
    #[error("journal has been shut down")]
    ShutDown,
}

/// One transaction: metadata blocks to log and addresses to revoke.
///
/// Within one transaction revokes take effect first, then blocks: a
/// transaction that frees an address and logs it again leaves it logged.
#[derive(Clone, Debug, Default)]
pub struct Transaction {
    /// (home block address, new contents).
    pub blocks: Vec<(u64, Arc<Block>)>,
    /// Home addresses freed by this transaction: older logged copies of them
    /// must never be replayed.
    pub revokes: Vec<u64>,
    /// The transaction makes newly allocated data blocks reachable, written in
    /// place before [`Journal::add`]: its batch flushes them before the commit
    /// header (ordered data). Without it a batch may commit with one flush.
    pub ordered: bool,
}

impl Transaction {
    /// An empty transaction.
    pub fn new() -> Transaction {
        Transaction::default()
    }

    /// Logs `block` as the new contents of home address `addr`.
    pub fn add_block(&mut self, addr: u64, block: Arc<Block>) -> &mut Transaction {
        self.blocks.push((addr, block));
        self
    }

    /// Revokes home address `addr`.
    pub fn revoke(&mut self, addr: u64) -> &mut Transaction {
        self.revokes.push(addr);
        self
    }

    /// True when the transaction logs and revokes nothing.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.revokes.is_empty()
    }
}
