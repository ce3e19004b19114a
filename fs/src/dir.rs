//! Directories: stuffed entry areas in the dinode, and extendible hashing (exhash)
//! once they outgrow it. The dinode is changed in place; the caller writes it.

use crate::bmap;
use std::sync::Arc;

use crate::cache::{Listed, Listing};
use crate::core::{Parsed, Tx};
use crate::format::*;
use crate::{FsError, Result};

fn stuffed_entries(ino: u64, d: &Dinode) -> Result<Vec<DirEntry>> {
    Ok(decode_area(&d.payload[..], ino)?)
}

fn insert_sorted(v: &mut Vec<DirEntry>, e: DirEntry) {
    let pos = v.partition_point(|x| (x.hash, &x.name) < (e.hash, &e.name));
    v.insert(pos, e);
}

fn table_len(d: &Dinode) -> u64 {
    1u64 << d.dir_depth
}

/// The pointers of hash table block `addr` of directory `ino`.
fn hash_block(tx: &mut Tx<'_>, ino: u64, addr: u64) -> Result<Arc<[u64]>> {
    let blocks = tx.core.device_blocks;
    tx.parsed(
        addr,
        ino,
        |p| match p {
            Parsed::Hash(o, ptrs) if *o == ino => Some(ptrs.clone()),
            _ => None,
        },
        |b| Ok(Arc::from(decode_hash_block(b, addr, ino, blocks)?)),
        |ptrs| Parsed::Hash(ino, ptrs),
    )
}

fn table_get(tx: &mut Tx<'_>, ino: u64, d: &Dinode, idx: u64) -> Result<u64> {
    let lblock = idx / HASH_PTRS as u64;
    let p = bmap::lookup(tx, ino, d, lblock)?
        .ok_or_else(|| FsError::Corrupt(bad(ino, "hash table", format!("block {lblock} missing"))))?;
    let ptrs = hash_block(tx, ino, p)?;
    let leaf = ptrs[(idx % HASH_PTRS as u64) as usize];
    if leaf == 0 {
        return Err(FsError::Corrupt(bad(p, "hash table", format!("entry {idx} is empty"))));
    }
    Ok(leaf)
}

/// Reads the whole table.
fn table_all(tx: &mut Tx<'_>, ino: u64, d: &Dinode) -> Result<Vec<u64>> {
    let n = table_len(d);
    let mut out = Vec::with_capacity(n as usize);
    for lb in 0..n.div_ceil(HASH_PTRS as u64) {
        let p = bmap::lookup(tx, ino, d, lb)?
            .ok_or_else(|| FsError::Corrupt(bad(ino, "hash table", format!("block {lb} missing"))))?;
        let ptrs = hash_block(tx, ino, p)?;
        let take = (n - lb * HASH_PTRS as u64).min(HASH_PTRS as u64) as usize;
        out.extend_from_slice(&ptrs[..take]);
    }
    Ok(out)
}

/// Writes the whole table (allocating table blocks as needed).
fn table_write(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, table: &[u64]) -> Result<()> {
    for (lb, chunk) in table.chunks(HASH_PTRS).enumerate() {
        let (p, _) = bmap::map_alloc(tx, ino, d, lb as u64, ino)?;
        tx.write(p, encode_hash_block(chunk, p, ino));
    }
    d.size = 8 * table.len() as u64;
    Ok(())
}

/// Sets table entries `[start, start + count)` to `leaf`.
fn table_set(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, start: u64, count: u64, leaf: u64) -> Result<()> {
    let per = HASH_PTRS as u64;
    let mut i = start;
    while i < start + count {
        let lb = i / per;
        let p = bmap::lookup(tx, ino, d, lb)?
            .ok_or_else(|| FsError::Corrupt(bad(ino, "hash table", format!("block {lb} missing"))))?;
        let mut ptrs = hash_block(tx, ino, p)?.to_vec();
        while i < start + count && i / per == lb {
            ptrs[(i % per) as usize] = leaf;
            i += 1;
        }
        tx.write(p, encode_hash_block(&ptrs, p, ino));
    }
    Ok(())
}

/// Directory `ino`'s leaf at `addr`, decoded once and shared while it is unchanged.
fn read_leaf(tx: &mut Tx<'_>, ino: u64, addr: u64) -> Result<Arc<Leaf>> {
    tx.parsed(
        addr,
        ino,
        |p| match p {
            Parsed::Leaf(o, l) if *o == ino => Some(l.clone()),
            _ => None,
        },
        |b| Ok(Arc::new(Leaf::decode(b, addr, ino)?)),
        |l| Parsed::Leaf(ino, l),
    )
}

/// The leaf at `addr` (read by [`read_leaf`] as `leaf`), to change: its shared decoded
/// form is given up, so that it need not be copied.
fn own_leaf(tx: &mut Tx<'_>, addr: u64, leaf: Arc<Leaf>) -> Leaf {
    tx.forget_parsed(addr);
    Arc::try_unwrap(leaf).unwrap_or_else(|l| Leaf::clone(&l))
}

fn write_leaf(tx: &mut Tx<'_>, ino: u64, addr: u64, leaf: Leaf) -> Result<()> {
    let b = leaf.encode(addr, ino).ok_or_else(|| FsError::Corrupt(bad(addr, "leaf", "entries overflow")))?;
    tx.write_parsed(addr, b, Parsed::Leaf(ino, Arc::new(leaf)));
    Ok(())
}

/// Looks `name` up.
pub(crate) fn lookup(tx: &mut Tx<'_>, ino: u64, d: &Dinode, name: &[u8]) -> Result<Option<DirEntry>> {
    let hash = name_hash(name);
    if let Some(l) = tx.core.listing(ino) {
        return Ok(l.get(hash, name).map(Listed::entry));
    }
    if !d.is_exhash() {
        return Ok(stuffed_entries(ino, d)?.into_iter().find(|e| e.name == name));
    }
    let mut addr = table_get(tx, ino, d, hash_index(hash, d.dir_depth))?;
    let mut guard = 0;
    while addr != 0 {
        let leaf = read_leaf(tx, ino, addr)?;
        if let Some(e) = leaf.entries.iter().find(|e| e.hash == hash && e.name == name) {
            return Ok(Some(e.clone()));
        }
        addr = leaf.next;
        guard += 1;
        if guard > 1_000_000 {
            return Err(FsError::Corrupt(bad(ino, "leaf chain", "loops")));
        }
    }
    Ok(None)
}

/// Adds an entry (the caller checked that the name is absent).
pub(crate) fn add(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, e: DirEntry) -> Result<()> {
    tx.take_listing(ino);
    let listed = tx.listing_mut(ino).is_some().then(|| e.clone());
    if !d.is_exhash() {
        let mut v = stuffed_entries(ino, d)?;
        insert_sorted(&mut v, e.clone());
        if encode_area(&v, &mut d.payload[..]) {
            d.dir_entries += 1;
            list_add(tx, ino, listed);
            return Ok(());
        }
        v.retain(|x| x.name != e.name);
        to_exhash(tx, ino, d, v)?;
    }
    exhash_add(tx, ino, d, e)?;
    d.dir_entries += 1;
    list_add(tx, ino, listed);
    Ok(())
}

/// Adds entry `e` (if the listing is cached) to directory `ino`'s listing.
fn list_add(tx: &mut Tx<'_>, ino: u64, e: Option<DirEntry>) {
    if let (Some(e), Some(l)) = (e, tx.listing_mut(ino)) {
        l.insert(e);
    }
}

/// Removes `e` from directory `ino`'s listing, if it is cached.
fn list_remove(tx: &mut Tx<'_>, ino: u64, e: &DirEntry) {
    if let Some(l) = tx.listing_mut(ino) {
        l.remove(e.hash, &e.name);
    }
}

/// Turns a stuffed directory holding `entries` into a hashed one of depth 0.
fn to_exhash(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, entries: Vec<DirEntry>) -> Result<()> {
    let leaf_addr = tx.alloc(ino, BlockState::Used)?;
    d.blocks += 1;
    write_leaf(tx, ino, leaf_addr, Leaf { depth: 0, next: 0, entries })?;
    d.payload.fill(0);
    d.flags |= DIF_EXHASH;
    d.height = 1;
    d.dir_depth = 0;
    table_write(tx, ino, d, &[leaf_addr])
}

fn exhash_add(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, e: DirEntry) -> Result<()> {
    for _ in 0..64 {
        let idx = hash_index(e.hash, d.dir_depth);
        let addr = table_get(tx, ino, d, idx)?;
        let leaf = read_leaf(tx, ino, addr)?;
        if area_bytes(&leaf.entries) + e.rec_len() <= LEAF_AREA {
            let mut leaf = own_leaf(tx, addr, leaf);
            insert_sorted(&mut leaf.entries, e);
            return write_leaf(tx, ino, addr, leaf);
        }
        if leaf.depth < d.dir_depth {
            let leaf = own_leaf(tx, addr, leaf);
            split(tx, ino, d, idx, addr, leaf)?;
        } else if d.dir_depth < MAX_DIR_DEPTH {
            let t = table_all(tx, ino, d)?;
            let doubled: Vec<u64> = t.iter().flat_map(|&p| [p, p]).collect();
            d.dir_depth += 1;
            table_write(tx, ino, d, &doubled)?;
        } else {
            return chain_add(tx, ino, d, addr, e);
        }
    }
    Err(FsError::Corrupt(bad(ino, "directory", "could not place an entry")))
}

/// Splits the leaf at `addr` (pointed at from table entry `idx`) in two.
fn split(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, idx: u64, addr: u64, leaf: Leaf) -> Result<()> {
    let ld = leaf.depth;
    let size = 1u64 << (d.dir_depth - ld);
    let start = idx & !(size - 1);
    let new_addr = tx.alloc(addr, BlockState::Used)?;
    d.blocks += 1;
    let (hi, lo): (Vec<DirEntry>, Vec<DirEntry>) =
        leaf.entries.into_iter().partition(|x| hash_index(x.hash, ld + 1) & 1 == 1);
    write_leaf(tx, ino, addr, Leaf { depth: ld + 1, next: 0, entries: lo })?;
    write_leaf(tx, ino, new_addr, Leaf { depth: ld + 1, next: 0, entries: hi })?;
    table_set(tx, ino, d, start + size / 2, size / 2, new_addr)
}

/// At maximum depth: put the entry in the first chained leaf with room.
fn chain_add(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, first: u64, e: DirEntry) -> Result<()> {
    let mut addr = first;
    loop {
        let leaf = read_leaf(tx, ino, addr)?;
        let mut leaf = own_leaf(tx, addr, leaf);
        if area_bytes(&leaf.entries) + e.rec_len() <= LEAF_AREA {
            insert_sorted(&mut leaf.entries, e);
            return write_leaf(tx, ino, addr, leaf);
        }
        if leaf.next == 0 {
            let n = tx.alloc(addr, BlockState::Used)?;
            d.blocks += 1;
            write_leaf(tx, ino, n, Leaf { depth: leaf.depth, next: 0, entries: vec![e] })?;
            leaf.next = n;
            return write_leaf(tx, ino, addr, leaf);
        }
        addr = leaf.next;
    }
}

/// Removes `name`, returning its entry.
pub(crate) fn remove(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, name: &[u8]) -> Result<DirEntry> {
    tx.take_listing(ino);
    let hash = name_hash(name);
    if !d.is_exhash() {
        let mut v = stuffed_entries(ino, d)?;
        let pos = v.iter().position(|e| e.name == name).ok_or(FsError::NotFound)?;
        let e = v.remove(pos);
        // Fewer entries always fit where more did.
        let fits = encode_area(&v, &mut d.payload[..]);
        debug_assert!(fits);
        d.dir_entries -= 1;
        list_remove(tx, ino, &e);
        return Ok(e);
    }
    let mut addr = table_get(tx, ino, d, hash_index(hash, d.dir_depth))?;
    while addr != 0 {
        let leaf = read_leaf(tx, ino, addr)?;
        if let Some(pos) = leaf.entries.iter().position(|e| e.hash == hash && e.name == name) {
            let mut leaf = own_leaf(tx, addr, leaf);
            let e = leaf.entries.remove(pos);
            write_leaf(tx, ino, addr, leaf)?;
            d.dir_entries -= 1;
            list_remove(tx, ino, &e);
            return Ok(e);
        }
        addr = leaf.next;
    }
    Err(FsError::NotFound)
}

/// Every entry of a directory in cookie (hash, then name) order: what
/// [`Core::dirs`](crate::core::Core) caches.
pub(crate) fn list_all(tx: &mut Tx<'_>, ino: u64, d: &Dinode) -> Result<Listing> {
    if !d.is_exhash() {
        return Ok(stuffed_entries(ino, d)?.into_iter().collect());
    }
    let n = table_len(d);
    let mut out = Vec::new();
    let mut idx = 0;
    while idx < n {
        let mut addr = table_get(tx, ino, d, idx)?;
        let mut depth = 0;
        while addr != 0 {
            let leaf = read_leaf(tx, ino, addr)?;
            depth = leaf.depth;
            out.extend(leaf.entries.iter().cloned());
            addr = leaf.next;
        }
        // The leaf fills the aligned run of 2^(dir_depth - depth) table slots.
        let size = 1u64 << (d.dir_depth.saturating_sub(depth));
        idx = (idx & !(size - 1)) + size;
    }
    // The listing puts them in readdir order.
    Ok(out.into_iter().collect())
}

/// Frees every block of an (empty or not) directory's hash structure.
pub(crate) fn free_all(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode) -> Result<()> {
    if !d.is_exhash() {
        return Ok(());
    }
    let mut leaves = std::collections::BTreeSet::new();
    for p in table_all(tx, ino, d)? {
        let mut a = p;
        while a != 0 && leaves.insert(a) {
            a = read_leaf(tx, ino, a)?.next;
        }
    }
    for a in leaves {
        tx.free_block(a, true)?;
        d.blocks -= 1;
    }
    bmap::free_range(tx, ino, d, 0, u64::MAX, true)?;
    d.flags &= !DIF_EXHASH;
    d.height = 0;
    d.dir_depth = 0;
    d.size = 0;
    d.payload.fill(0);
    let fits = encode_area(&[], &mut d.payload[..]);
    debug_assert!(fits);
    Ok(())
}
