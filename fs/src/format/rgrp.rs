//! Resource group headers, bitmaps and the rgrp index records.

use super::*;

/// Blocks described by one bitmap block.
pub const BITMAP_BLOCKS_PER: u32 = ((BLOCK_SIZE - HDR_LEN) * 4) as u32;
/// Default rgrp size: 128 MiB.
pub const DEFAULT_RGRP_BLOCKS: u32 = 32768;
/// Size of one rindex record.
pub const RINDEX_LEN: usize = 32;

/// A block's allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BlockState {
    Free = 0,
    Used = 1,
    Unlinked = 2,
    Dinode = 3,
}

impl BlockState {
    pub fn from_bits(v: u8) -> BlockState {
        match v & 3 {
            0 => BlockState::Free,
            1 => BlockState::Used,
            2 => BlockState::Unlinked,
            _ => BlockState::Dinode,
        }
    }
}

/// Bitmap blocks needed for an rgrp of `len` blocks.
pub fn bitmap_blocks_for(len: u32) -> u32 {
    len.div_ceil(BITMAP_BLOCKS_PER)
}

/// The rgrp header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgrpHeader {
    pub index: u32,
    pub length: u32,
    pub bitmap_blocks: u32,
    pub free: u32,
    pub dinodes: u32,
    pub unlinked: u32,
    pub igeneration: u64,
}

impl RgrpHeader {
    pub fn encode(&self, addr: u64) -> Box<Block> {
        let mut b = concord_journal::zeroed_block();
        put_u32(&mut b[..], 32, self.index);
        put_u32(&mut b[..], 36, self.length);
        put_u32(&mut b[..], 40, self.bitmap_blocks);
        put_u32(&mut b[..], 44, self.free);
        put_u32(&mut b[..], 48, self.dinodes);
        put_u32(&mut b[..], 52, self.unlinked);
        put_u64(&mut b[..], 56, self.igeneration);
        seal(&mut b, BlockType::RgrpHeader, addr, 0);
        b
    }

    pub fn decode(b: &Block, addr: u64) -> Result<RgrpHeader, FormatError> {
        check(b, BlockType::RgrpHeader, addr)?;
        let h = RgrpHeader {
            index: get_u32(b, 32),
            length: get_u32(b, 36),
            bitmap_blocks: get_u32(b, 40),
            free: get_u32(b, 44),
            dinodes: get_u32(b, 48),
            unlinked: get_u32(b, 52),
            igeneration: get_u64(b, 56),
        };
        if h.length < 64 || h.bitmap_blocks != bitmap_blocks_for(h.length) {
            return Err(bad(addr, "length", format!("{} blocks with {} bitmaps", h.length, h.bitmap_blocks)));
        }
        let counted = u64::from(h.free) + u64::from(h.dinodes) + u64::from(h.unlinked);
        if counted > u64::from(h.length) {
            return Err(bad(addr, "free", "counters exceed the rgrp length"));
        }
        Ok(h)
    }
}

/// Encodes a bitmap block whose bits (2 per block) are `bits` (up to 4064 bytes).
pub fn encode_bitmap(bits: &[u8], addr: u64, rgrp: u64) -> Box<Block> {
    let mut b = concord_journal::zeroed_block();
    let n = bits.len().min(BLOCK_SIZE - HDR_LEN);
    b[HDR_LEN..HDR_LEN + n].copy_from_slice(&bits[..n]);
    seal(&mut b, BlockType::Bitmap, addr, rgrp);
    b
}

/// Checks a bitmap block and returns its bit bytes.
pub fn decode_bitmap(b: &Block, addr: u64) -> Result<&[u8], FormatError> {
    check(b, BlockType::Bitmap, addr)?;
    Ok(&b[HDR_LEN..])
}

/// One record of the rgrp index file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RindexEntry {
    pub addr: u64,
    pub length: u32,
    pub bitmap_blocks: u32,
    pub data_start: u64,
    pub data_blocks: u32,
}

impl RindexEntry {
    pub fn for_rgrp(addr: u64, length: u32) -> RindexEntry {
        let bitmap_blocks = bitmap_blocks_for(length);
        RindexEntry {
            addr,
            length,
            bitmap_blocks,
            data_start: addr + 1 + u64::from(bitmap_blocks),
            data_blocks: length - 1 - bitmap_blocks,
        }
    }

    pub fn encode(&self) -> [u8; RINDEX_LEN] {
        let mut b = [0u8; RINDEX_LEN];
        put_u64(&mut b, 0, self.addr);
        put_u32(&mut b, 8, self.length);
        put_u32(&mut b, 12, self.bitmap_blocks);
        put_u64(&mut b, 16, self.data_start);
        put_u32(&mut b, 24, self.data_blocks);
        b
    }

    /// Decodes every record of an rindex file's contents.
    pub fn decode_all(bytes: &[u8], owner: u64) -> Result<Vec<RindexEntry>, FormatError> {
        if !bytes.len().is_multiple_of(RINDEX_LEN) {
            return Err(bad(owner, "rindex", format!("size {} is not a multiple of 32", bytes.len())));
        }
        let mut out = Vec::with_capacity(bytes.len() / RINDEX_LEN);
        for r in bytes.chunks_exact(RINDEX_LEN) {
            let e = RindexEntry {
                addr: get_u64(r, 0),
                length: get_u32(r, 8),
                bitmap_blocks: get_u32(r, 12),
                data_start: get_u64(r, 16),
                data_blocks: get_u32(r, 24),
            };
            if e.length < 64 || e != RindexEntry::for_rgrp(e.addr, e.length) {
                return Err(bad(owner, "rindex", format!("inconsistent record for rgrp at {}", e.addr)));
            }
            out.push(e);
        }
        Ok(out)
    }
}
