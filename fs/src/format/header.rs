//! The 32-byte header every metadata block starts with.

use super::*;

/// "CNCD".
pub const META_MAGIC: u32 = 0x434E_4344;
pub const HDR_LEN: usize = 32;
const OFF_MAGIC: usize = 0;
const OFF_TYPE: usize = 4;
const OFF_FORMAT: usize = 6;
const OFF_ADDR: usize = 8;
const OFF_OWNER: usize = 16;
const OFF_CRC: usize = 24;
/// Per-type format version written in every header.
pub const BLOCK_FORMAT: u16 = 1;

/// Metadata block types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum BlockType {
    Superblock = 1,
    RgrpHeader = 2,
    Bitmap = 3,
    Dinode = 4,
    Indirect = 5,
    DirLeaf = 6,
    DirHash = 7,
    Xattr = 8,
}

impl BlockType {
    pub fn name(self) -> &'static str {
        match self {
            BlockType::Superblock => "superblock",
            BlockType::RgrpHeader => "rgrp header",
            BlockType::Bitmap => "bitmap",
            BlockType::Dinode => "dinode",
            BlockType::Indirect => "indirect",
            BlockType::DirLeaf => "directory leaf",
            BlockType::DirHash => "directory hash table",
            BlockType::Xattr => "xattr",
        }
    }
    pub fn from_u16(v: u16) -> Option<BlockType> {
        Some(match v {
            1 => BlockType::Superblock,
            2 => BlockType::RgrpHeader,
            3 => BlockType::Bitmap,
            4 => BlockType::Dinode,
            5 => BlockType::Indirect,
            6 => BlockType::DirLeaf,
            7 => BlockType::DirHash,
            8 => BlockType::Xattr,
            _ => return None,
        })
    }
}

/// crc32c of a block with its crc field taken as zero.
pub fn block_crc(b: &Block) -> u32 {
    let c = crc32c::crc32c(&b[..OFF_CRC]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &b[OFF_CRC + 4..])
}

/// Writes the header of `b` (type, own address, owner) and its checksum. Call last,
/// after every other field is in place.
pub fn seal(b: &mut Block, ty: BlockType, addr: u64, owner: u64) {
    put_u32(b, OFF_MAGIC, META_MAGIC);
    put_u16(b, OFF_TYPE, ty as u16);
    put_u16(b, OFF_FORMAT, BLOCK_FORMAT);
    put_u64(b, OFF_ADDR, addr);
    put_u64(b, OFF_OWNER, owner);
    put_u32(b, 28, 0);
    let crc = block_crc(b);
    put_u32(b, OFF_CRC, crc);
}

/// What a checked header says.
/// The inode a block this node sealed itself belongs to, for the blocks that belong to
/// one (indirect, directory and xattr blocks); 0 for the others. Not a check: only for
/// blocks known to be well formed.
pub fn sealed_owner(b: &Block) -> u64 {
    match BlockType::from_u16(get_u16(b, OFF_TYPE)) {
        Some(BlockType::Indirect | BlockType::DirLeaf | BlockType::DirHash | BlockType::Xattr) => get_u64(b, OFF_OWNER),
        _ => 0,
    }
}

/// Whether a sealed metadata block is one a glock's write-back finds (Concord's
/// `ail_empty_gl`, fs/src/fs/glops.rs): a dinode (at its inode's address), an rgrp's
/// header or bitmap, or a block stamped with its inode as owner.
pub fn found_by_write_back(b: &Block) -> bool {
    match BlockType::from_u16(get_u16(b, OFF_TYPE)) {
        Some(BlockType::Dinode | BlockType::RgrpHeader | BlockType::Bitmap) => true,
        Some(_) => sealed_owner(b) != 0,
        None => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub ty: BlockType,
    pub addr: u64,
    pub owner: u64,
}

/// Reads the header without expecting a type (fsck uses it to classify blocks).
pub fn peek(b: &Block, addr: u64) -> Result<Header, FormatError> {
    let magic = get_u32(b, OFF_MAGIC);
    if magic != META_MAGIC {
        return Err(FormatError::BadMagic { block: addr, found: magic });
    }
    let stored = get_u32(b, OFF_CRC);
    let computed = block_crc(b);
    if stored != computed {
        return Err(FormatError::BadChecksum { block: addr, stored, computed });
    }
    let t = get_u16(b, OFF_TYPE);
    let ty = BlockType::from_u16(t).ok_or(FormatError::BadType { block: addr, expected: "metadata", found: t })?;
    let fmt = get_u16(b, OFF_FORMAT);
    if fmt != BLOCK_FORMAT {
        return Err(FormatError::UnknownVersion { block: addr, what: ty.name(), found: fmt.into() });
    }
    let found = get_u64(b, OFF_ADDR);
    if found != addr {
        return Err(FormatError::BadAddr { block: addr, found });
    }
    Ok(Header { ty, addr, owner: get_u64(b, OFF_OWNER) })
}

/// Checks that `b` is a sound block of type `ty` living at `addr`.
pub fn check(b: &Block, ty: BlockType, addr: u64) -> Result<Header, FormatError> {
    let h = peek(b, addr)?;
    if h.ty != ty {
        return Err(FormatError::BadType { block: addr, expected: ty.name(), found: h.ty as u16 });
    }
    Ok(h)
}
