//! Dinodes (type 4) and block map indirect blocks (type 5).

use super::*;

pub const DINODE_PAYLOAD_OFF: usize = 160;
/// Bytes of inline ("stuffed") data a dinode holds.
pub const STUFFED_MAX: usize = BLOCK_SIZE - DINODE_PAYLOAD_OFF;
/// Block pointers at the top of a block map, in the dinode.
pub const DINODE_PTRS: usize = STUFFED_MAX / 8;
/// Block pointers in an indirect block.
pub const INDIRECT_PTRS: usize = (BLOCK_SIZE - HDR_LEN) / 8;
/// Maximum block map height.
pub const MAX_HEIGHT: u8 = 5;
/// Longest symlink target (PATH_MAX - 1, as Linux allows). Targets of up to
/// [`STUFFED_MAX`] bytes are stored in the dinode; longer ones in one data block
/// (height 1, pointer 0).
pub const SYMLINK_MAX: usize = 4095;

pub const DIF_SYSTEM: u32 = 1;
pub const DIF_EXHASH: u32 = 2;
pub const DIF_JOURNAL: u32 = 4;
const DIF_KNOWN: u32 = DIF_SYSTEM | DIF_EXHASH | DIF_JOURNAL;

const _: () = assert!(DINODE_PTRS == 492 && INDIRECT_PTRS == 508 && STUFFED_MAX == 3936);

/// A timestamp.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Time {
    pub sec: i64,
    pub nsec: u32,
}

/// File type bits of `mode`.
pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFIFO: u32 = 0o010000;
pub const S_IFSOCK: u32 = 0o140000;
pub const S_IFCHR: u32 = 0o020000;
pub const S_IFBLK: u32 = 0o060000;

/// A decoded dinode. `payload` is the raw 3936-byte payload area; its meaning depends on
/// the kind (see disk-format.md), interpreted by the filesystem layer.
#[derive(Clone, PartialEq, Eq)]
pub struct Dinode {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub size: u64,
    pub blocks: u64,
    pub atime: Time,
    pub mtime: Time,
    pub ctime: Time,
    pub flags: u32,
    pub rdev: u32,
    pub height: u8,
    pub generation: u64,
    pub xattr: u64,
    pub dir_entries: u32,
    pub dir_depth: u16,
    pub parent: u64,
    pub payload: Box<[u8; STUFFED_MAX]>,
}

impl std::fmt::Debug for Dinode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dinode")
            .field("mode", &format_args!("{:o}", self.mode))
            .field("nlink", &self.nlink)
            .field("size", &self.size)
            .field("height", &self.height)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

fn get_time(b: &Block, s: usize, ns: usize) -> Time {
    Time { sec: get_i64(b, s), nsec: get_u32(b, ns) }
}

impl Dinode {
    /// A fresh dinode of the given mode, stuffed and empty.
    pub fn new(mode: u32, uid: u32, gid: u32, now: Time, generation: u64) -> Dinode {
        Dinode {
            mode,
            uid,
            gid,
            nlink: 1,
            size: 0,
            blocks: 0,
            atime: now,
            mtime: now,
            ctime: now,
            flags: 0,
            rdev: 0,
            height: 0,
            generation,
            xattr: 0,
            dir_entries: 0,
            dir_depth: 0,
            parent: 0,
            payload: Box::new([0u8; STUFFED_MAX]),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }
    pub fn is_reg(&self) -> bool {
        self.mode & S_IFMT == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.mode & S_IFMT == S_IFLNK
    }
    pub fn is_exhash(&self) -> bool {
        self.flags & DIF_EXHASH != 0
    }

    /// Block pointer `i` of the top of the block map.
    pub fn ptr(&self, i: usize) -> u64 {
        get_u64(&self.payload[..], i * 8)
    }
    pub fn set_ptr(&mut self, i: usize, v: u64) {
        put_u64(&mut self.payload[..], i * 8, v);
    }

    /// The extent of a journal dinode.
    pub fn journal_extent(&self) -> (u64, u64) {
        (get_u64(&self.payload[..], 0), get_u64(&self.payload[..], 8))
    }
    pub fn set_journal_extent(&mut self, start: u64, blocks: u64) {
        put_u64(&mut self.payload[..], 0, start);
        put_u64(&mut self.payload[..], 8, blocks);
    }

    pub fn encode(&self, addr: u64) -> Box<Block> {
        let mut b = concord_journal::zeroed_block();
        self.encode_into(&mut b, addr);
        b
    }

    pub fn encode_into(&self, b: &mut Block, addr: u64) {
        b[..DINODE_PAYLOAD_OFF].fill(0);
        put_u32(b, 32, self.mode);
        put_u32(b, 36, self.uid);
        put_u32(b, 40, self.gid);
        put_u32(b, 44, self.nlink);
        put_u64(b, 48, self.size);
        put_u64(b, 56, self.blocks);
        put_i64(b, 64, self.atime.sec);
        put_i64(b, 72, self.mtime.sec);
        put_i64(b, 80, self.ctime.sec);
        put_u32(b, 88, self.atime.nsec);
        put_u32(b, 92, self.mtime.nsec);
        put_u32(b, 96, self.ctime.nsec);
        put_u32(b, 100, self.flags);
        put_u32(b, 104, self.rdev);
        b[108] = self.height;
        put_u64(b, 112, self.generation);
        put_u64(b, 120, self.xattr);
        put_u32(b, 128, self.dir_entries);
        put_u16(b, 132, self.dir_depth);
        put_u64(b, 136, self.parent);
        b[DINODE_PAYLOAD_OFF..].copy_from_slice(&self.payload[..]);
        seal(b, BlockType::Dinode, addr, 0);
    }

    pub fn decode(b: &Block, addr: u64) -> Result<Dinode, FormatError> {
        check(b, BlockType::Dinode, addr)?;
        let mut payload = Box::new([0u8; STUFFED_MAX]);
        payload.copy_from_slice(&b[DINODE_PAYLOAD_OFF..]);
        let d = Dinode {
            mode: get_u32(b, 32),
            uid: get_u32(b, 36),
            gid: get_u32(b, 40),
            nlink: get_u32(b, 44),
            size: get_u64(b, 48),
            blocks: get_u64(b, 56),
            atime: get_time(b, 64, 88),
            mtime: get_time(b, 72, 92),
            ctime: get_time(b, 80, 96),
            flags: get_u32(b, 100),
            rdev: get_u32(b, 104),
            height: b[108],
            generation: get_u64(b, 112),
            xattr: get_u64(b, 120),
            dir_entries: get_u32(b, 128),
            dir_depth: get_u16(b, 132),
            parent: get_u64(b, 136),
            payload,
        };
        d.validate(addr)?;
        Ok(d)
    }

    fn validate(&self, addr: u64) -> Result<(), FormatError> {
        let fmt = self.mode & S_IFMT;
        if ![S_IFDIR, S_IFREG, S_IFLNK, S_IFIFO, S_IFSOCK, S_IFCHR, S_IFBLK].contains(&fmt) {
            return Err(bad(addr, "mode", format!("unknown file type {:o}", self.mode)));
        }
        if self.flags & !DIF_KNOWN != 0 {
            return Err(bad(addr, "flags", format!("unknown flags {:#x}", self.flags)));
        }
        if self.height > MAX_HEIGHT {
            return Err(bad(addr, "height", format!("{} > {MAX_HEIGHT}", self.height)));
        }
        for t in [self.atime, self.mtime, self.ctime] {
            if t.nsec >= 1_000_000_000 {
                return Err(bad(addr, "time", "nanoseconds out of range"));
            }
        }
        if self.height == 0 && !self.is_dir() && self.flags & DIF_JOURNAL == 0 && self.size > STUFFED_MAX as u64 {
            return Err(bad(addr, "size", format!("stuffed file of {} bytes", self.size)));
        }
        if self.size > max_file_size(MAX_HEIGHT) {
            return Err(bad(addr, "size", "beyond the largest mappable file"));
        }
        let inline = self.height == 0 && self.size <= STUFFED_MAX as u64;
        let in_block = self.height == 1 && self.size > STUFFED_MAX as u64 && self.size <= SYMLINK_MAX as u64;
        if self.is_symlink() && (self.size == 0 || !(inline || in_block)) {
            return Err(bad(addr, "size", "bad symlink length"));
        }
        if self.is_exhash() && (!self.is_dir() || self.height == 0 || self.dir_depth > MAX_DIR_DEPTH) {
            return Err(bad(addr, "flags", "bad hashed directory"));
        }
        if self.is_dir() && !self.is_exhash() && self.height != 0 {
            return Err(bad(addr, "height", "unhashed directory with a block map"));
        }
        Ok(())
    }
}

/// Logical blocks a block map of height `h` can address.
pub fn map_capacity(h: u8) -> u64 {
    if h == 0 {
        return 0;
    }
    let mut n = DINODE_PTRS as u64;
    for _ in 1..h {
        n = n.saturating_mul(INDIRECT_PTRS as u64);
    }
    n
}

/// Largest file size for a height.
pub fn max_file_size(h: u8) -> u64 {
    map_capacity(h).saturating_mul(BLOCK_SIZE as u64)
}

/// Smallest height that maps logical block `lblock`.
pub fn height_for(lblock: u64) -> u8 {
    let mut h = 1;
    while map_capacity(h) <= lblock && h < MAX_HEIGHT {
        h += 1;
    }
    h
}

/// Path of pointer indices from the dinode down to logical block `lblock` in a tree of
/// height `h`: element 0 indexes the dinode's pointers, the rest indirect blocks.
pub fn map_path(lblock: u64, h: u8) -> Vec<usize> {
    let mut path = vec![0usize; h as usize];
    let mut rest = lblock;
    for level in (1..h as usize).rev() {
        path[level] = (rest % INDIRECT_PTRS as u64) as usize;
        rest /= INDIRECT_PTRS as u64;
    }
    path[0] = rest as usize;
    path
}

/// Encodes an indirect block of 508 pointers.
pub fn encode_indirect(ptrs: &[u64], addr: u64, owner: u64) -> Box<Block> {
    let mut b = concord_journal::zeroed_block();
    for (i, p) in ptrs.iter().take(INDIRECT_PTRS).enumerate() {
        put_u64(&mut b[..], HDR_LEN + i * 8, *p);
    }
    seal(&mut b, BlockType::Indirect, addr, owner);
    b
}

/// Decodes an indirect block's pointers, checking they point inside the device.
pub fn decode_indirect(b: &Block, addr: u64, owner: u64, device_blocks: u64) -> Result<Vec<u64>, FormatError> {
    let h = check(b, BlockType::Indirect, addr)?;
    if h.owner != owner {
        return Err(bad(addr, "owner", format!("belongs to {} not {owner}", h.owner)));
    }
    let ptrs: Vec<u64> = (0..INDIRECT_PTRS).map(|i| get_u64(b, HDR_LEN + i * 8)).collect();
    if let Some(p) = ptrs.iter().find(|&&p| p >= device_blocks) {
        return Err(bad(addr, "pointer", format!("{p} beyond the device")));
    }
    Ok(ptrs)
}
