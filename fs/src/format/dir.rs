//! Directory entries, entry areas, leaves (type 6) and hash table blocks (type 7).

use super::*;

pub const DIRENT_HDR: usize = 20;
pub const NAME_MAX: usize = 255;
/// Offset of the entry area inside a leaf.
pub const LEAF_AREA_OFF: usize = 48;
/// Capacity of a leaf's entry area.
pub const LEAF_AREA: usize = BLOCK_SIZE - LEAF_AREA_OFF;
/// Leaf pointers in one hash table block.
pub const HASH_PTRS: usize = (BLOCK_SIZE - HDR_LEN) / 8;
/// Largest hash table depth (as GFS2's).
pub const MAX_DIR_DEPTH: u16 = 17;
const AREA_HDR: usize = 8;

pub const DT_FIFO: u8 = 1;
pub const DT_CHR: u8 = 2;
pub const DT_DIR: u8 = 4;
pub const DT_BLK: u8 = 6;
pub const DT_REG: u8 = 8;
pub const DT_LNK: u8 = 10;
pub const DT_SOCK: u8 = 12;

/// The DT_* type for a mode.
pub fn dtype_of(mode: u32) -> u8 {
    match mode & S_IFMT {
        S_IFDIR => DT_DIR,
        S_IFLNK => DT_LNK,
        S_IFIFO => DT_FIFO,
        S_IFSOCK => DT_SOCK,
        S_IFCHR => DT_CHR,
        S_IFBLK => DT_BLK,
        _ => DT_REG,
    }
}

/// The 63-bit name hash (≥ 3), also the readdir cookie.
pub fn name_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &c in name {
        h ^= u64::from(c);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64 finaliser
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 1).max(3)
}

/// Index into a hash table of `depth` bits for a 63-bit hash.
pub fn hash_index(hash: u64, depth: u16) -> u64 {
    if depth == 0 {
        0
    } else {
        hash >> (63 - u32::from(depth))
    }
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub hash: u64,
    pub ino: u64,
    pub dtype: u8,
    pub name: Vec<u8>,
}

/// Entries order by cookie (hash), then name: readdir's order.
impl Ord for DirEntry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.hash, &self.name, self.ino, self.dtype).cmp(&(o.hash, &o.name, o.ino, o.dtype))
    }
}

impl PartialOrd for DirEntry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl DirEntry {
    pub fn new(name: &[u8], ino: u64, dtype: u8) -> DirEntry {
        DirEntry { hash: name_hash(name), ino, dtype, name: name.to_vec() }
    }
    /// Bytes this entry takes in an area.
    pub fn rec_len(&self) -> usize {
        align8(DIRENT_HDR + self.name.len())
    }
}

/// Bytes `entries` take in an area, with the area header.
pub fn area_bytes(entries: &[DirEntry]) -> usize {
    AREA_HDR + entries.iter().map(DirEntry::rec_len).sum::<usize>()
}

/// Checks a name: 1..=255 bytes, no '/' or NUL, not "." or "..".
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && !name.contains(&b'/')
        && !name.contains(&0)
        && name != b"."
        && name != b".."
}

/// Writes `entries` (sorted by hash) into `area`. Returns false when they don't fit.
pub fn encode_area(entries: &[DirEntry], area: &mut [u8]) -> bool {
    let total = area_bytes(entries);
    if total > area.len() {
        return false;
    }
    area.fill(0);
    put_u32(area, 0, entries.len() as u32);
    put_u32(area, 4, (total - AREA_HDR) as u32);
    let mut off = AREA_HDR;
    for e in entries {
        put_u64(area, off, e.hash);
        put_u64(area, off + 8, e.ino);
        put_u16(area, off + 16, e.name.len() as u16);
        area[off + 18] = e.dtype;
        area[off + DIRENT_HDR..off + DIRENT_HDR + e.name.len()].copy_from_slice(&e.name);
        off += e.rec_len();
    }
    true
}

/// Decodes an entry area, checking every record. `block` names the block in errors.
pub fn decode_area(area: &[u8], block: u64) -> Result<Vec<DirEntry>, FormatError> {
    if area.len() < AREA_HDR {
        return Err(bad(block, "entry area", "too small"));
    }
    let count = get_u32(area, 0) as usize;
    let used = get_u32(area, 4) as usize;
    if used > area.len() - AREA_HDR || count.saturating_mul(align8(DIRENT_HDR + 1)) > used {
        return Err(bad(block, "entry area", format!("{count} entries in {used} bytes")));
    }
    let mut out = Vec::with_capacity(count);
    let mut off = AREA_HDR;
    let end = AREA_HDR + used;
    let mut last = 0u64;
    for _ in 0..count {
        if off + DIRENT_HDR > end {
            return Err(bad(block, "entry", "runs past the area"));
        }
        let hash = get_u64(area, off);
        let ino = get_u64(area, off + 8);
        let nlen = get_u16(area, off + 16) as usize;
        let dtype = area[off + 18];
        if off + DIRENT_HDR + nlen > end {
            return Err(bad(block, "entry", "name runs past the area"));
        }
        let name = area[off + DIRENT_HDR..off + DIRENT_HDR + nlen].to_vec();
        if !valid_name(&name) {
            return Err(bad(block, "entry", "invalid name"));
        }
        if name_hash(&name) != hash {
            return Err(bad(block, "entry", format!("hash mismatch for {:?}", String::from_utf8_lossy(&name))));
        }
        if hash < last {
            return Err(bad(block, "entry", "entries out of hash order"));
        }
        if ino == 0 || ![DT_FIFO, DT_CHR, DT_DIR, DT_BLK, DT_REG, DT_LNK, DT_SOCK].contains(&dtype) {
            return Err(bad(block, "entry", "bad inode or type"));
        }
        last = hash;
        off += align8(DIRENT_HDR + nlen);
        out.push(DirEntry { hash, ino, dtype, name });
    }
    if off != end {
        return Err(bad(block, "entry area", "used bytes do not match the entries"));
    }
    Ok(out)
}

/// A decoded directory leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leaf {
    pub depth: u16,
    pub next: u64,
    pub entries: Vec<DirEntry>,
}

impl Leaf {
    /// Encodes the leaf; None when the entries do not fit.
    pub fn encode(&self, addr: u64, owner: u64) -> Option<Box<Block>> {
        let mut b = concord_journal::zeroed_block();
        if !encode_area(&self.entries, &mut b[LEAF_AREA_OFF..]) {
            return None;
        }
        put_u16(&mut b[..], 32, self.depth);
        put_u64(&mut b[..], 40, self.next);
        seal(&mut b, BlockType::DirLeaf, addr, owner);
        Some(b)
    }

    pub fn decode(b: &Block, addr: u64, owner: u64) -> Result<Leaf, FormatError> {
        let h = check(b, BlockType::DirLeaf, addr)?;
        if h.owner != owner {
            return Err(bad(addr, "owner", format!("belongs to {} not {owner}", h.owner)));
        }
        let depth = get_u16(b, 32);
        if depth > MAX_DIR_DEPTH {
            return Err(bad(addr, "depth", depth.to_string()));
        }
        Ok(Leaf { depth, next: get_u64(b, 40), entries: decode_area(&b[LEAF_AREA_OFF..], addr)? })
    }
}

/// Encodes a hash table block.
pub fn encode_hash_block(ptrs: &[u64], addr: u64, owner: u64) -> Box<Block> {
    let mut b = concord_journal::zeroed_block();
    for (i, p) in ptrs.iter().take(HASH_PTRS).enumerate() {
        put_u64(&mut b[..], HDR_LEN + i * 8, *p);
    }
    seal(&mut b, BlockType::DirHash, addr, owner);
    b
}

/// Decodes a hash table block's leaf pointers.
pub fn decode_hash_block(b: &Block, addr: u64, owner: u64, device_blocks: u64) -> Result<Vec<u64>, FormatError> {
    let h = check(b, BlockType::DirHash, addr)?;
    if h.owner != owner {
        return Err(bad(addr, "owner", format!("belongs to {} not {owner}", h.owner)));
    }
    let ptrs: Vec<u64> = (0..HASH_PTRS).map(|i| get_u64(b, HDR_LEN + i * 8)).collect();
    if let Some(p) = ptrs.iter().find(|&&p| p >= device_blocks) {
        return Err(bad(addr, "pointer", format!("{p} beyond the device")));
    }
    Ok(ptrs)
}
