//! The block map: logical block → device block through the dinode's pointer tree.

use crate::core::Tx;
use crate::format::*;
use crate::Result;

/// Logical blocks covered by one pointer at `level` (0 = the dinode) of a tree of height `h`.
fn span(h: u8, level: usize) -> u64 {
    (INDIRECT_PTRS as u64).pow(u32::from(h) - 1 - level as u32)
}

fn indirect(tx: &mut Tx<'_>, ino: u64, addr: u64) -> Result<Vec<u64>> {
    Ok(tx.indirect(addr, ino)?.clone())
}

/// The device block holding logical block `lblock` and how many following logical
/// blocks continue contiguously on the device (at most `max`); `(0, n)` is a hole of `n`.
pub(crate) fn lookup_extent(tx: &mut Tx<'_>, ino: u64, d: &Dinode, lblock: u64, max: u64) -> Result<(u64, u64)> {
    let h = d.height;
    if h == 0 || lblock >= map_capacity(h) {
        return Ok((0, max.max(1)));
    }
    let path = map_path(lblock, h);
    // The pointers of the level walked: the dinode's own (read in place, not copied:
    // this runs for every read), then each indirect block's.
    let mut ind: Option<std::sync::Arc<[u64]>> = None;
    for (level, &idx) in path.iter().enumerate() {
        let ptr = |i: usize| ind.as_ref().map_or_else(|| d.ptr(i), |a| a[i]);
        let count = ind.as_ref().map_or(DINODE_PTRS, |a| a.len());
        let p = ptr(idx);
        if level + 1 == h as usize {
            // Leaf level: extend the run inside this pointer array.
            let mut n = 1u64;
            while n < max && idx + (n as usize) < count {
                let q = ptr(idx + n as usize);
                if (p == 0 && q != 0) || (p != 0 && q != p + n) {
                    break;
                }
                n += 1;
            }
            return Ok((p, n));
        }
        if p == 0 {
            // A hole over this whole subtree (up to its end).
            let sp = span(h, level);
            let left = sp - (lblock % sp);
            return Ok((0, left.min(max).max(1)));
        }
        ind = Some(tx.indirect_shared(p, ino)?);
    }
    Ok((0, 1))
}

/// The device block of `lblock`, if mapped.
pub(crate) fn lookup(tx: &mut Tx<'_>, ino: u64, d: &Dinode, lblock: u64) -> Result<Option<u64>> {
    let (p, _) = lookup_extent(tx, ino, d, lblock, 1)?;
    Ok((p != 0).then_some(p))
}

/// Adds levels on top until the tree maps `lblock`. The dinode must not be stuffed.
fn grow(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, lblock: u64) -> Result<()> {
    let need = height_for(lblock);
    if lblock >= map_capacity(MAX_HEIGHT) {
        return Err(crate::FsError::TooBig);
    }
    while d.height < need {
        let any = (0..DINODE_PTRS).any(|i| d.ptr(i) != 0);
        if any {
            let a = tx.alloc(ino, BlockState::Used)?;
            let ptrs: Vec<u64> = (0..DINODE_PTRS).map(|i| d.ptr(i)).collect();
            tx.new_indirect(a, ino, ptrs);
            for i in 0..DINODE_PTRS {
                d.set_ptr(i, 0);
            }
            d.set_ptr(0, a);
            d.blocks += 1;
        }
        d.height += 1;
    }
    Ok(())
}

/// Raises the tree so that it maps every block of a file of `size` bytes, as GFS2 keeps
/// a dinode's height in step with its size: a truncate up that leaves the new end in a
/// hole still makes the tree tall enough for it (fsck checks the rule). A tree with no
/// pointers grows for free; otherwise one indirect block per level is allocated.
pub(crate) fn grow_for_size(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, size: u64) -> Result<()> {
    debug_assert!(d.height > 0, "stuffed dinodes are unstuffed before mapping");
    if size == 0 || size <= max_file_size(d.height) {
        return Ok(());
    }
    grow(tx, ino, d, size.div_ceil(BLOCK_SIZE as u64) - 1)
}

/// Maps `lblock`, allocating what is missing. Returns the device block and whether it
/// was newly allocated (its contents are then undefined and must be written).
/// `leaf_state` is Used for both data and mapped metadata (hash table blocks).
pub(crate) fn map_alloc(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, lblock: u64, goal: u64) -> Result<(u64, bool)> {
    debug_assert!(d.height > 0, "stuffed dinodes are unstuffed before mapping");
    grow(tx, ino, d, lblock)?;
    let h = d.height;
    let path = map_path(lblock, h);
    // Level 0: the dinode.
    let mut p = d.ptr(path[0]);
    if p == 0 {
        let st = BlockState::Used;
        p = tx.alloc(goal, st)?;
        d.set_ptr(path[0], p);
        d.blocks += 1;
        if h == 1 {
            return Ok((p, true));
        }
        tx.new_indirect(p, ino, Vec::new());
    } else if h == 1 {
        return Ok((p, false));
    }
    // Levels 1..h: indirect blocks.
    let mut parent = p;
    for (level, &idx) in path.iter().enumerate().skip(1) {
        let c = tx.indirect(parent, ino)?[idx];
        let leaf = level + 1 == h as usize;
        if c != 0 {
            if leaf {
                return Ok((c, false));
            }
            parent = c;
            continue;
        }
        let c = tx.alloc(goal, BlockState::Used)?;
        d.blocks += 1;
        tx.indirect(parent, ino)?[idx] = c;
        tx.indirect_changed(parent);
        if leaf {
            return Ok((c, true));
        }
        tx.new_indirect(c, ino, Vec::new());
        parent = c;
    }
    unreachable!("the loop returns at the leaf level")
}

/// Frees the mapped blocks of logical range `[from, to)` and the indirect blocks left
/// empty. `meta` says whether the mapped blocks are metadata (revoked when freed).
pub(crate) fn free_range(tx: &mut Tx<'_>, ino: u64, d: &mut Dinode, from: u64, to: u64, meta: bool) -> Result<()> {
    let h = d.height;
    if h == 0 || from >= to {
        return Ok(());
    }
    let sp = span(h, 0);
    for i in 0..DINODE_PTRS {
        let p = d.ptr(i);
        let lo = i as u64 * sp;
        let hi = lo.saturating_add(sp);
        if p == 0 || hi <= from || lo >= to {
            continue;
        }
        let (freed, empty) = free_sub(tx, ino, p, h, 0, lo, from, to, meta)?;
        d.blocks -= freed;
        if empty {
            d.set_ptr(i, 0);
        }
    }
    Ok(())
}

/// Frees inside the subtree of pointer `p` at `level` covering logical blocks from `lo`.
/// Returns (blocks freed, whether `p` itself was freed).
fn free_sub(
    tx: &mut Tx<'_>,
    ino: u64,
    p: u64,
    h: u8,
    level: usize,
    lo: u64,
    from: u64,
    to: u64,
    meta: bool,
) -> Result<(u64, bool)> {
    let sp = span(h, level);
    if level + 1 == h as usize {
        // p is a leaf (data or mapped metadata block).
        tx.free_block(p, meta)?;
        return Ok((1, true));
    }
    let mut ptrs = indirect(tx, ino, p)?;
    let csp = sp / INDIRECT_PTRS as u64;
    let mut freed = 0;
    let mut changed = false;
    for (j, c) in ptrs.iter_mut().enumerate() {
        let clo = lo + j as u64 * csp;
        let chi = clo + csp;
        if *c == 0 || chi <= from || clo >= to {
            continue;
        }
        let (f, empty) = free_sub(tx, ino, *c, h, level + 1, clo, from, to, meta)?;
        freed += f;
        if empty {
            *c = 0;
            changed = true;
        }
    }
    if ptrs.iter().all(|&c| c == 0) {
        tx.free_block(p, true)?;
        return Ok((freed + 1, true));
    }
    if changed {
        *tx.indirect(p, ino)? = ptrs;
        tx.indirect_changed(p);
    }
    Ok((freed, false))
}
