//! The superblock (type 1), kept at block 16 and at the device's last block.

use super::*;

pub const LOCKPROTO_DLM: &str = "lock_dlm";
pub const LOCKPROTO_NOLOCK: &str = "lock_nolock";
const NAME_FIELD: usize = 64;

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub journals: u32,
    pub journal_blocks: u32,
    pub total_blocks: u64,
    pub root_dinode: u64,
    pub master_dinode: u64,
    pub journal_start: u64,
    pub first_rgrp: u64,
    pub rgrp_blocks: u32,
    pub rgrp_count: u32,
    pub lockproto: String,
    pub locktable: String,
    pub created: u64,
}

fn put_name(b: &mut Block, off: usize, s: &str) {
    let n = s.len().min(NAME_FIELD - 1);
    b[off..off + NAME_FIELD].fill(0);
    b[off..off + n].copy_from_slice(&s.as_bytes()[..n]);
}

fn name(b: &Block, addr: u64, off: usize, field: &'static str) -> Result<String, FormatError> {
    let raw = &b[off..off + NAME_FIELD];
    let len = raw.iter().position(|&c| c == 0).ok_or_else(|| bad(addr, field, "not NUL-terminated"))?;
    if raw[len..].iter().any(|&c| c != 0) {
        return Err(bad(addr, field, "garbage after NUL"));
    }
    let s = std::str::from_utf8(&raw[..len]).map_err(|_| bad(addr, field, "not UTF-8"))?;
    if !s.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(bad(addr, field, "not printable ASCII"));
    }
    Ok(s.to_string())
}

impl Superblock {
    /// The backup superblock's address.
    pub fn backup_addr(&self) -> u64 {
        self.total_blocks - 1
    }

    /// Address of journal `jid`'s first block.
    pub fn journal_addr(&self, jid: u32) -> u64 {
        self.journal_start + u64::from(jid) * u64::from(self.journal_blocks)
    }

    /// The journal nonce that marks this filesystem's log blocks for `jid`.
    pub fn journal_nonce(&self, jid: u32) -> u64 {
        let mut a = [0u8; 8];
        a.copy_from_slice(&self.uuid[..8]);
        u64::from_le_bytes(a) ^ u64::from(jid)
    }

    /// Start block of rgrp `i` and its length.
    pub fn rgrp_extent(&self, i: u32) -> (u64, u32) {
        let start = self.first_rgrp + u64::from(i) * u64::from(self.rgrp_blocks);
        let end = (start + u64::from(self.rgrp_blocks)).min(self.total_blocks - 1);
        (start, (end - start) as u32)
    }

    /// The lock table's cluster and filesystem names.
    pub fn table_parts(&self) -> (&str, &str) {
        self.locktable.split_once(':').unwrap_or(("", self.locktable.as_str()))
    }

    pub fn encode(&self, addr: u64) -> Box<Block> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        put_u32(&mut b[..], 32, FS_FORMAT);
        put_u32(&mut b[..], 36, BLOCK_SIZE as u32);
        b[40..56].copy_from_slice(&self.uuid);
        put_u32(&mut b[..], 56, self.journals);
        put_u32(&mut b[..], 60, self.journal_blocks);
        put_u64(&mut b[..], 64, self.total_blocks);
        put_u64(&mut b[..], 72, self.root_dinode);
        put_u64(&mut b[..], 80, self.master_dinode);
        put_u64(&mut b[..], 88, self.journal_start);
        put_u64(&mut b[..], 96, self.first_rgrp);
        put_u32(&mut b[..], 104, self.rgrp_blocks);
        put_u32(&mut b[..], 108, self.rgrp_count);
        put_name(&mut b, 112, &self.lockproto);
        put_name(&mut b, 176, &self.locktable);
        put_u64(&mut b[..], 240, self.created);
        seal(&mut b, BlockType::Superblock, addr, 0);
        b
    }

    /// Decodes and validates a superblock read from `addr`. `device_blocks` is the
    /// device size: a superblock claiming more blocks than the device has is refused.
    pub fn decode(b: &Block, addr: u64, device_blocks: u64) -> Result<Superblock, FormatError> {
        check(b, BlockType::Superblock, addr)?;
        let v = get_u32(b, 32);
        if v != FS_FORMAT {
            return Err(FormatError::UnknownVersion { block: addr, what: "filesystem", found: v });
        }
        if get_u32(b, 36) != BLOCK_SIZE as u32 {
            return Err(bad(addr, "block_size", format!("{} is not 4096", get_u32(b, 36))));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[40..56]);
        let sb = Superblock {
            uuid,
            journals: get_u32(b, 56),
            journal_blocks: get_u32(b, 60),
            total_blocks: get_u64(b, 64),
            root_dinode: get_u64(b, 72),
            master_dinode: get_u64(b, 80),
            journal_start: get_u64(b, 88),
            first_rgrp: get_u64(b, 96),
            rgrp_blocks: get_u32(b, 104),
            rgrp_count: get_u32(b, 108),
            lockproto: name(b, addr, 112, "lockproto")?,
            locktable: name(b, addr, 176, "locktable")?,
            created: get_u64(b, 240),
        };
        sb.validate(addr, device_blocks)?;
        Ok(sb)
    }

    fn validate(&self, addr: u64, device_blocks: u64) -> Result<(), FormatError> {
        if self.total_blocks > device_blocks {
            return Err(bad(
                addr,
                "total_blocks",
                format!("{} blocks but the device has only {device_blocks}", self.total_blocks),
            ));
        }
        if self.journals == 0 || self.journals > 1024 {
            return Err(bad(addr, "journals", format!("{} not in 1..=1024", self.journals)));
        }
        if self.journal_start != JOURNAL_AREA_START {
            return Err(bad(addr, "journal_start", self.journal_start.to_string()));
        }
        let jend = u64::from(self.journals)
            .checked_mul(u64::from(self.journal_blocks))
            .and_then(|n| n.checked_add(self.journal_start));
        if jend != Some(self.first_rgrp) {
            return Err(bad(addr, "first_rgrp", "does not follow the journal area"));
        }
        if self.rgrp_blocks < 64 || self.rgrp_count == 0 {
            return Err(bad(addr, "rgrp_blocks", "rgrp geometry out of range"));
        }
        let rend = u64::from(self.rgrp_count - 1)
            .checked_mul(u64::from(self.rgrp_blocks))
            .and_then(|n| n.checked_add(self.first_rgrp));
        match rend {
            Some(last) if last + 64 <= self.total_blocks.saturating_sub(1) => {}
            _ => return Err(bad(addr, "rgrp_count", "rgrps run past the end of the device")),
        }
        let data = self.first_rgrp..self.total_blocks - 1;
        for (field, v) in [("root_dinode", self.root_dinode), ("master_dinode", self.master_dinode)] {
            if !data.contains(&v) {
                return Err(bad(addr, field, format!("{v} outside the rgrps")));
            }
        }
        if self.lockproto != LOCKPROTO_DLM && self.lockproto != LOCKPROTO_NOLOCK {
            return Err(bad(addr, "lockproto", format!("unknown protocol {:?}", self.lockproto)));
        }
        Ok(())
    }
}

/// Checks a lock table `cluster:fsname` as mkfs.gfs2 does.
pub fn validate_locktable(t: &str) -> Result<(), String> {
    let (c, f) = t.split_once(':').ok_or_else(|| format!("lock table {t:?} is not cluster:fsname"))?;
    let ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok(c) || c.len() > 32 {
        return Err(format!("cluster name {c:?} must be 1-32 characters of [A-Za-z0-9_-]"));
    }
    if !ok(f) || f.len() > 30 {
        return Err(format!("filesystem name {f:?} must be 1-30 characters of [A-Za-z0-9_-]"));
    }
    Ok(())
}
