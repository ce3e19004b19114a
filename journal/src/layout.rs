//! Laying a batch out as log blocks, and writing ranges of the ring.
//!
//! One batch on disk: for every run of up to [`ENTRIES_PER_BLOCK`] metadata
//! blocks a descriptor followed by the raw copies, then the revoke blocks, then
//! the commit header. Shared by the journal and by the replay tests.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::block::{raw_crc, BodyHasher, Commit, Header, LogBlock, ENTRIES_PER_BLOCK};
use crate::device::{Block, BlockDevice, DeviceError, BLOCK_SIZE};
use crate::log::LogRegion;

/// Log blocks a batch of `n_blocks` copies and `n_revokes` revokes takes,
/// including its commit header.
pub(crate) fn batch_log_blocks(n_blocks: usize, n_revokes: usize) -> u64 {
    let per = ENTRIES_PER_BLOCK;
    (n_blocks + n_blocks.div_ceil(per) + n_revokes.div_ceil(per) + 1) as u64
}

/// The body (everything before the commit header) of one batch.
pub(crate) struct Body {
    /// The body blocks, contiguous, to be written at `start` (may wrap).
    pub bytes: Vec<u8>,
    /// Body hash for the commit header.
    pub hash: u32,
    /// Number of body blocks.
    pub blocks: u64,
}

/// Lays out the body of batch `seq` starting at ring position `start`.
pub(crate) fn layout_body(
    region: LogRegion,
    nonce: u64,
    seq: u64,
    start: u64,
    blocks: &BTreeMap<u64, Arc<Block>>,
    revokes: &BTreeSet<u64>,
) -> Body {
    let total = batch_log_blocks(blocks.len(), revokes.len()) - 1;
    let mut bytes = Vec::with_capacity(total as usize * BLOCK_SIZE);
    let mut pos = start;
    let entries: Vec<(&u64, &Arc<Block>)> = blocks.iter().collect();
    for (index, chunk) in entries.chunks(ENTRIES_PER_BLOCK).enumerate() {
        let hdr = Header { nonce, seq, addr: region.addr(pos) };
        let addrs = chunk.iter().map(|(a, _)| **a).collect();
        let (buf, _) = LogBlock::Descriptor { hdr, index: index as u32, addrs }.to_block();
        bytes.extend_from_slice(&buf[..]);
        pos = region.advance(pos, 1);
        for (_, b) in chunk {
            bytes.extend_from_slice(&b[..]);
            pos = region.advance(pos, 1);
        }
    }
    let revokes: Vec<u64> = revokes.iter().copied().collect();
    for (index, chunk) in revokes.chunks(ENTRIES_PER_BLOCK).enumerate() {
        let hdr = Header { nonce, seq, addr: region.addr(pos) };
        let (buf, _) = LogBlock::Revoke { hdr, index: index as u32, addrs: chunk.to_vec() }.to_block();
        bytes.extend_from_slice(&buf[..]);
        pos = region.advance(pos, 1);
    }
    let mut hasher = BodyHasher::default();
    for b in bytes.chunks_exact(BLOCK_SIZE) {
        hasher.push(raw_crc(as_block(b)));
    }
    debug_assert_eq!(bytes.len() as u64, total * BLOCK_SIZE as u64);
    Body { bytes, hash: hasher.finish(), blocks: total }
}

/// Encodes the commit header of batch `seq` at ring position `pos`.
pub(crate) fn commit_block(region: LogRegion, nonce: u64, seq: u64, pos: u64, commit: Commit) -> (Box<Block>, u32) {
    LogBlock::Commit { hdr: Header { nonce, seq, addr: region.addr(pos) }, commit }.to_block()
}

/// Writes `bytes` (whole blocks) to the ring from position `start`, splitting
/// at the end of the region.
pub(crate) fn write_ring(
    dev: &dyn BlockDevice,
    region: LogRegion,
    start: u64,
    bytes: &[u8],
) -> Result<(), DeviceError> {
    let n = (bytes.len() / BLOCK_SIZE) as u64;
    let first = n.min(region.blocks - start);
    let split = first as usize * BLOCK_SIZE;
    if first > 0 {
        dev.write_at(region.addr(start) * BLOCK_SIZE as u64, &bytes[..split])?;
    }
    if split < bytes.len() {
        dev.write_at(region.start * BLOCK_SIZE as u64, &bytes[split..])?;
    }
    Ok(())
}

/// Writes blocks to their home addresses (sorted by address), one write per
/// run of consecutive addresses.
pub(crate) fn write_home<'a>(
    dev: &dyn BlockDevice,
    blocks: impl IntoIterator<Item = (u64, &'a Block)>,
) -> Result<(), DeviceError> {
    let mut run_start = 0u64;
    let mut run: Vec<u8> = Vec::new();
    for (addr, b) in blocks {
        let run_len = (run.len() / BLOCK_SIZE) as u64;
        if !run.is_empty() && addr != run_start + run_len {
            dev.write_at(run_start * BLOCK_SIZE as u64, &run)?;
            run.clear();
        }
        if run.is_empty() {
            run_start = addr;
        }
        run.extend_from_slice(&b[..]);
        if run.len() >= 256 * BLOCK_SIZE {
            dev.write_at(run_start * BLOCK_SIZE as u64, &run)?;
            run.clear();
        }
    }
    if !run.is_empty() {
        dev.write_at(run_start * BLOCK_SIZE as u64, &run)?;
    }
    Ok(())
}

/// Views a `BLOCK_SIZE` slice as a block.
pub(crate) fn as_block(b: &[u8]) -> &Block {
    // Callers pass slices from chunks_exact(BLOCK_SIZE) or block-aligned ranges.
    b.try_into().expect("slice of exactly BLOCK_SIZE bytes")
}
