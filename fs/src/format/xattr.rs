//! The xattr block (type 8).

use super::*;

const XA_AREA_OFF: usize = HDR_LEN + 8;
/// Bytes of records one xattr block holds.
pub const XATTR_AREA: usize = BLOCK_SIZE - XA_AREA_OFF;
pub const XATTR_NAME_MAX: usize = 255;

/// (name, value) pairs, sorted by name.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Bytes a record takes.
pub fn xattr_rec_len(name: &[u8], value: &[u8]) -> usize {
    align8(4 + name.len() + value.len())
}

/// Encodes the xattrs (sorted by name); None when they do not fit in one block.
pub fn encode_xattrs(xattrs: &[(Vec<u8>, Vec<u8>)], addr: u64, owner: u64) -> Option<Box<Block>> {
    let used: usize = xattrs.iter().map(|(n, v)| xattr_rec_len(n, v)).sum();
    if used > XATTR_AREA {
        return None;
    }
    let mut b = concord_journal::zeroed_block();
    put_u32(&mut b[..], HDR_LEN, xattrs.len() as u32);
    put_u32(&mut b[..], HDR_LEN + 4, used as u32);
    let mut off = XA_AREA_OFF;
    for (n, v) in xattrs {
        put_u16(&mut b[..], off, n.len() as u16);
        put_u16(&mut b[..], off + 2, v.len() as u16);
        b[off + 4..off + 4 + n.len()].copy_from_slice(n);
        b[off + 4 + n.len()..off + 4 + n.len() + v.len()].copy_from_slice(v);
        off += xattr_rec_len(n, v);
    }
    seal(&mut b, BlockType::Xattr, addr, owner);
    Some(b)
}

/// Decodes an xattr block.
pub fn decode_xattrs(b: &Block, addr: u64, owner: u64) -> Result<Xattrs, FormatError> {
    let h = check(b, BlockType::Xattr, addr)?;
    if h.owner != owner {
        return Err(bad(addr, "owner", format!("belongs to {} not {owner}", h.owner)));
    }
    let count = get_u32(b, HDR_LEN) as usize;
    let used = get_u32(b, HDR_LEN + 4) as usize;
    if used > XATTR_AREA || count > used / 8 + 1 {
        return Err(bad(addr, "xattr area", format!("{count} records in {used} bytes")));
    }
    let end = XA_AREA_OFF + used;
    let mut off = XA_AREA_OFF;
    let mut out: Xattrs = Vec::with_capacity(count);
    for _ in 0..count {
        let (Some(nl), Some(vl)) = (try_u16(&b[..end], off), try_u16(&b[..end], off + 2)) else {
            return Err(bad(addr, "xattr", "record runs past the area"));
        };
        let (nl, vl) = (nl as usize, vl as usize);
        if nl == 0 || nl > XATTR_NAME_MAX || off + 4 + nl + vl > end {
            return Err(bad(addr, "xattr", "bad record lengths"));
        }
        let name = b[off + 4..off + 4 + nl].to_vec();
        let value = b[off + 4 + nl..off + 4 + nl + vl].to_vec();
        if out.last().is_some_and(|(p, _)| *p >= name) {
            return Err(bad(addr, "xattr", "names out of order"));
        }
        off += align8(4 + nl + vl);
        out.push((name, value));
    }
    if off != end {
        return Err(bad(addr, "xattr area", "used bytes do not match the records"));
    }
    Ok(out)
}
