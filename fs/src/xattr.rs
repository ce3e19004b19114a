//! Extended attributes: one xattr block per dinode.

use crate::core::Tx;
use crate::format::*;
use crate::fs::XattrSet;
use crate::{FsError, Result};

/// Largest value accepted (the block holds all of an inode's attributes together).
pub const XATTR_VALUE_MAX: usize = XATTR_AREA - 8;

/// Namespaces we store.
pub(crate) fn check_name(name: &[u8]) -> Result<()> {
    if name.len() > XATTR_NAME_MAX {
        return Err(FsError::NameTooLong);
    }
    let known =
        [b"user.".as_slice(), b"trusted.", b"security.", b"system.posix_acl_access", b"system.posix_acl_default"];
    let ok =
        known.iter().any(|p| if p.ends_with(b".") { name.len() > p.len() && name.starts_with(p) } else { name == *p });
    if !ok {
        return Err(FsError::NotSupported(format!("xattr namespace of {:?}", String::from_utf8_lossy(name))));
    }
    Ok(())
}

pub(crate) fn all(tx: &mut Tx<'_>, ino: u64, d: &Dinode) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    if d.xattr == 0 {
        return Ok(Vec::new());
    }
    let b = tx.read_for(ino, d.xattr)?;
    Ok(decode_xattrs(&b, d.xattr, ino)?)
}

pub(crate) fn get(tx: &mut Tx<'_>, ino: u64, d: &Dinode, name: &[u8]) -> Result<Vec<u8>> {
    all(tx, ino, d)?.into_iter().find(|(n, _)| n == name).map(|(_, v)| v).ok_or(FsError::NoAttr)
}

/// Sets (`Some`) or removes (`None`) one attribute; the caller writes the dinode.
pub(crate) fn set(
    tx: &mut Tx<'_>,
    ino: u64,
    d: &mut Dinode,
    name: &[u8],
    value: Option<&[u8]>,
    how: XattrSet,
) -> Result<()> {
    let mut v = all(tx, ino, d)?;
    let pos = v.binary_search_by(|(n, _)| n.as_slice().cmp(name));
    match (pos, value, how) {
        (Ok(_), Some(_), XattrSet::Create) => return Err(FsError::Exists(String::from_utf8_lossy(name).into_owned())),
        (Err(_), _, XattrSet::Replace) => return Err(FsError::NoAttr),
        (Ok(i), None, _) => {
            v.remove(i);
        }
        (Ok(i), Some(val), _) => v[i].1 = val.to_vec(),
        (Err(i), Some(val), _) => v.insert(i, (name.to_vec(), val.to_vec())),
        (Err(_), None, _) => return Err(FsError::NoAttr),
    }
    if let Some(val) = value {
        if val.len() > XATTR_VALUE_MAX {
            return Err(FsError::TooBig);
        }
    }
    if v.is_empty() {
        if d.xattr != 0 {
            tx.free_block(d.xattr, true)?;
            d.xattr = 0;
        }
        return Ok(());
    }
    let addr = if d.xattr != 0 { d.xattr } else { tx.alloc(ino, BlockState::Used)? };
    let b = encode_xattrs(&v, addr, ino).ok_or(FsError::NoSpace)?;
    tx.write(addr, b);
    d.xattr = addr;
    Ok(())
}
