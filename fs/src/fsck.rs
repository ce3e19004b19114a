//! fsck: an offline check (and with `repair`, repair) of an unmounted Concord device.
//!
//! The check is a read-only walk over raw device reads with the format decoders; it never
//! mounts and never uses a transaction. In order:
//!
//! 1. **Superblock.** The primary at block 16 and the backup at the last block must decode
//!    and agree. A bad primary with a good backup is reported and, with repair, restored
//!    from the backup (and the other way round).
//! 2. **Journals.** Dirty journals are replayed first with repair (`replay_all`); without
//!    repair they are reported, and the blocks a replay would write are laid over the
//!    device for the rest of the check (nothing is written), so the check sees what a
//!    mount would see.
//! 3. **Resource groups.** Every rgrp header and bitmap block is read and decoded; the
//!    geometry comes from the superblock's arithmetic.
//! 4. **Walk.** From the master and the root dinode: every reachable dinode, its block map
//!    (indirect blocks, data), its xattr block, and for directories their entries (target
//!    live and of the entry's type, no duplicate names, `parent` of subdirectories,
//!    `dir_entries`) and hash structure (depth bounds, leaf pointer ranges, entry hashes).
//!    Every block reached is claimed once in an "expected" bitmap; a second claim is
//!    double use. Link counts and `blocks` counts are counted on the way.
//! 5. **Orphans**: UNLINKED dinodes no entry names (freed with repair).
//! 6. **Bitmaps** against the expected state (leaks, referenced-but-free, wrong state) and
//!    the rgrp header counters against the bitmaps.
//!
//! Repairs (only with `repair`, written in place, flushed at the end): superblock copies,
//! bitmaps and counters, link counts, `dir_entries`, `blocks`, `parent`, entry types,
//! orphans, entries naming missing or invalid dinodes. When the walk could not read part
//! of the tree (an undecodable indirect block or leaf, double use), leaks are reported
//! but not freed, since the unread part may own them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use concord_journal::{BlockDevice, LogRegion};

use crate::format::*;
use crate::{journal_region, replay_all, FsError};

/// What fsck may do.
#[derive(Debug, Clone, Copy, Default)]
pub struct FsckOptions {
    /// `false` is `-n` (write nothing at all), `true` is `-y` (repair what is safe).
    pub repair: bool,
}

/// One problem found.
#[derive(Debug, Clone)]
pub struct Problem {
    /// The block the problem is about.
    pub block: u64,
    /// What is wrong.
    pub what: String,
    /// Whether fsck repaired it.
    pub fixed: bool,
}

/// What fsck found.
#[derive(Debug, Clone, Default)]
pub struct FsckReport {
    /// Every problem, in the order found.
    pub problems: Vec<Problem>,
    /// Journals found dirty.
    pub dirty_journals: Vec<u32>,
    /// Journals replayed (with repair).
    pub replayed: Vec<u32>,
    /// Live dinodes reached (system files included).
    pub inodes: u64,
    /// Directories among them.
    pub dirs: u64,
    /// Blocks in use in the rgrps (headers and bitmaps included).
    pub used_blocks: u64,
}

impl FsckReport {
    /// 0 clean, 1 every problem fixed (or journals replayed), 4 problems left.
    pub fn exit_code(&self) -> i32 {
        if self.problems.iter().any(|p| !p.fixed) {
            4
        } else if !self.problems.is_empty() || !self.replayed.is_empty() {
            1
        } else {
            0
        }
    }

    /// Nothing found at all.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }
}

/// Most problems listed one by one; the rest are summarised in one last problem.
const MAX_PROBLEMS: usize = 10_000;
/// Guard against loops in leaf chains.
const MAX_CHAIN: usize = 1 << 16;

/// Check (and with `opts.repair`, repair) the filesystem on `dev`.
///
/// `Err` is an operational error (exit 8): the device cannot be read or written, or holds
/// no Concord superblock at all. Problems with the filesystem are in the report.
pub fn fsck(
    dev: &Arc<dyn BlockDevice>,
    opts: &FsckOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> crate::Result<FsckReport> {
    let device_blocks = dev.len() / BLOCK_SIZE as u64;
    if device_blocks <= SB_ADDR + 1 {
        return Err(FsError::Invalid("device too small to hold a Concord filesystem".into()));
    }
    let mut ck = Checker {
        dev: dev.as_ref(),
        repair: opts.repair,
        device_blocks,
        sb: None,
        overlay: HashMap::new(),
        report: FsckReport::default(),
        suppressed: 0,
        suppressed_unfixed: 0,
        rgrps: Vec::new(),
        inodes: HashMap::new(),
        queue: VecDeque::new(),
        incomplete: false,
        fixes: HashMap::new(),
        leaf_edits: HashMap::new(),
        freeing: HashSet::new(),
        claim_log: None,
        wrote: false,
    };
    ck.superblock()?;
    ck.journals()?;
    let total = ck.progress_total();
    ck.load_rgrps(progress, total)?;
    ck.walk(progress, total)?;
    ck.orphans()?;
    ck.check_nlinks();
    ck.apply_inode_fixes()?;
    ck.compare_bitmaps(progress, total)?;
    ck.check_statfs()?;
    if ck.wrote {
        dev.flush()?;
    }
    ck.finish();
    Ok(ck.report)
}

/// Per-rgrp state: geometry, the on-disk bitmap and the expected one (2 bits a block).
struct Rg {
    e: RindexEntry,
    header: Option<RgrpHeader>,
    disk: Vec<u8>,
    /// Per bitmap block: decoded?
    bitmap_ok: Vec<bool>,
    expect: Vec<u8>,
    max_generation: u64,
    /// Free and dinode blocks the bitmap (as repaired) counts, once compared.
    counted: Option<(u64, u64)>,
}

fn get2(v: &[u8], k: u64) -> BlockState {
    BlockState::from_bits(v[(k / 4) as usize] >> (2 * (k % 4)))
}

fn set2(v: &mut [u8], k: u64, s: BlockState) {
    let byte = (k / 4) as usize;
    let shift = 2 * (k % 4);
    v[byte] = (v[byte] & !(3 << shift)) | ((s as u8) << shift);
}

fn state_name(s: BlockState) -> &'static str {
    match s {
        BlockState::Free => "free",
        BlockState::Used => "used",
        BlockState::Unlinked => "unlinked",
        BlockState::Dinode => "dinode",
    }
}

/// What the walk learnt about one live dinode.
#[derive(Debug, Default)]
struct Ino {
    is_dir: bool,
    mode: u32,
    nlink: u32,
    /// Entries naming it.
    refs: u32,
    /// Entries in it naming directories.
    subdirs: u32,
    /// The first directory found naming it.
    named_in: Option<u64>,
    parent_field: u64,
    /// Whether its directory entries could all be read (nlink of its children trustworthy).
    entries_ok: bool,
}

/// Repairs to one dinode block.
#[derive(Debug, Default)]
struct DinodeFix {
    nlink: Option<u32>,
    blocks: Option<u64>,
    dir_entries: Option<u32>,
    parent: Option<u64>,
    /// A block map too low for the file's size: the height it needs.
    height: Option<u8>,
    /// Stuffed directory entry edits.
    edits: Vec<Edit>,
    /// Problem indices to mark fixed once written.
    problems: Vec<usize>,
}

#[derive(Debug, Clone)]
enum Edit {
    Remove(Vec<u8>),
    SetType(Vec<u8>, u8),
}

/// Where an entry lives: the dinode (stuffed) or a leaf block.
#[derive(Debug, Clone, Copy)]
enum Container {
    Stuffed(u64),
    Leaf(u64),
}

impl Container {
    fn block(self) -> u64 {
        match self {
            Container::Stuffed(a) | Container::Leaf(a) => a,
        }
    }
}

struct Checker<'a> {
    dev: &'a dyn BlockDevice,
    repair: bool,
    device_blocks: u64,
    sb: Option<Superblock>,
    /// Blocks a replay of dirty journals would write (check-only mode).
    overlay: HashMap<u64, Box<Block>>,
    report: FsckReport,
    suppressed: u64,
    suppressed_unfixed: u64,
    rgrps: Vec<Rg>,
    inodes: HashMap<u64, Ino>,
    queue: VecDeque<(u64, u64)>,
    /// Part of the tree could not be read: leaks are not freed.
    incomplete: bool,
    fixes: HashMap<u64, DinodeFix>,
    leaf_edits: HashMap<u64, (u64, Vec<Edit>, Vec<usize>)>,
    /// Blocks of orphans being freed (not reported as leaks).
    freeing: HashSet<u64>,
    /// Blocks claimed while set (an orphan's, to give back).
    claim_log: Option<Vec<u64>>,
    wrote: bool,
}

impl<'a> Checker<'a> {
    fn sb(&self) -> &Superblock {
        // Set by superblock(), which returns Err when no superblock decodes.
        self.sb.as_ref().expect("superblock checked first")
    }

    /// Records a problem; returns its index (usize::MAX when only counted).
    fn problem(&mut self, block: u64, what: impl Into<String>, fixed: bool) -> usize {
        if self.report.problems.len() >= MAX_PROBLEMS {
            self.suppressed += 1;
            if !fixed {
                self.suppressed_unfixed += 1;
            }
            return usize::MAX;
        }
        let what = what.into();
        tracing::debug!(block, fixed, "{what}");
        self.report.problems.push(Problem { block, what, fixed });
        self.report.problems.len() - 1
    }

    fn mark_fixed(&mut self, idx: usize) {
        if let Some(p) = self.report.problems.get_mut(idx) {
            p.fixed = true;
        } else if idx == usize::MAX && self.suppressed_unfixed > 0 {
            self.suppressed_unfixed -= 1;
        }
    }

    fn finish(&mut self) {
        if self.suppressed > 0 {
            let n = self.suppressed;
            self.report.problems.push(Problem {
                block: 0,
                what: format!("{n} more problems not listed"),
                fixed: self.suppressed_unfixed == 0,
            });
        }
        self.report.used_blocks = self
            .rgrps
            .iter()
            .map(|r| (0..u64::from(r.e.length)).filter(|&k| get2(&r.expect, k) != BlockState::Free).count() as u64)
            .sum();
    }

    fn read(&self, addr: u64) -> crate::Result<Box<Block>> {
        if let Some(b) = self.overlay.get(&addr) {
            return Ok(b.clone());
        }
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        concord_journal::read_block(self.dev, addr, &mut b)?;
        Ok(b)
    }

    fn write(&mut self, addr: u64, b: &Block) -> crate::Result<()> {
        if !self.repair {
            // Our bug, not the world's: every caller checks `repair` first.
            debug_assert!(false, "fsck -n must not write");
            return Err(FsError::ReadOnly);
        }
        concord_journal::write_block(self.dev, addr, b)?;
        self.wrote = true;
        Ok(())
    }

    // ---- superblock -------------------------------------------------------------------

    fn superblock(&mut self) -> crate::Result<()> {
        let primary_raw = self.read(SB_ADDR)?;
        let primary = Superblock::decode(&primary_raw, SB_ADDR, self.device_blocks);
        match primary {
            Ok(sb) => {
                let backup_addr = sb.backup_addr();
                let braw = self.read(backup_addr)?;
                match Superblock::decode(&braw, backup_addr, self.device_blocks) {
                    Ok(b) if b == sb => {}
                    Ok(_) => {
                        let i = self.problem(backup_addr, "backup superblock differs from the primary", false);
                        if self.repair {
                            self.write(backup_addr, &sb.encode(backup_addr))?;
                            self.mark_fixed(i);
                        }
                    }
                    Err(e) => {
                        let i = self.problem(backup_addr, format!("backup superblock: {e}"), false);
                        if self.repair {
                            self.write(backup_addr, &sb.encode(backup_addr))?;
                            self.mark_fixed(i);
                        }
                    }
                }
                self.sb = Some(sb);
                Ok(())
            }
            Err(pe) => {
                let backup_addr = self.device_blocks - 1;
                let braw = self.read(backup_addr)?;
                match Superblock::decode(&braw, backup_addr, self.device_blocks) {
                    Ok(sb) if sb.backup_addr() == backup_addr => {
                        let i = self.problem(SB_ADDR, format!("primary superblock: {pe}; the backup is good"), false);
                        if self.repair {
                            self.write(SB_ADDR, &sb.encode(SB_ADDR))?;
                            self.mark_fixed(i);
                        }
                        self.sb = Some(sb);
                        Ok(())
                    }
                    _ if get_u32(&primary_raw[..], 0) != META_MAGIC => {
                        Err(FsError::Invalid("not a Concord filesystem (no superblock at 64 KiB)".into()))
                    }
                    _ => Err(FsError::Corrupt(pe)),
                }
            }
        }
    }

    // ---- journals ---------------------------------------------------------------------

    fn journals(&mut self) -> crate::Result<()> {
        let sb = self.sb().clone();
        for jid in 0..sb.journals {
            let region = journal_region(&sb, jid);
            match concord_journal::info(self.dev, region, sb.journal_nonce(jid)) {
                Ok(info) if info.clean => {}
                Ok(info) => {
                    self.report.dirty_journals.push(jid);
                    if !self.repair {
                        self.problem(
                            region.start,
                            format!("journal {jid} is dirty (head sequence {}); replay it with -y", info.head_seq),
                            false,
                        );
                        self.overlay_plan(region, sb.journal_nonce(jid), jid);
                    }
                }
                Err(e) => {
                    self.problem(region.start, format!("journal {jid} cannot be read: {e}"), false);
                }
            }
        }
        if self.repair && !self.report.dirty_journals.is_empty() {
            match replay_all(self.dev, &sb) {
                Ok(done) => {
                    self.wrote = true;
                    self.report.replayed = done;
                }
                Err(e) => {
                    self.problem(JOURNAL_AREA_START, format!("journal replay failed: {e}"), false);
                }
            }
        }
        Ok(())
    }

    /// Lays what a replay would write over the device, for the rest of a check-only run.
    fn overlay_plan(&mut self, region: LogRegion, nonce: u64, jid: u32) {
        match concord_journal::scan(self.dev, region, nonce) {
            Ok(plan) => {
                for (addr, b) in plan.writes {
                    self.overlay.insert(addr, b);
                }
            }
            Err(e) => {
                self.problem(region.start, format!("journal {jid} cannot be scanned: {e}"), false);
            }
        }
    }

    // ---- rgrps ------------------------------------------------------------------------

    fn progress_total(&self) -> u64 {
        2 * u64::from(self.sb().rgrp_count) + 1
    }

    fn load_rgrps(&mut self, progress: &mut dyn FnMut(u64, u64), total: u64) -> crate::Result<()> {
        let sb = self.sb().clone();
        for i in 0..sb.rgrp_count {
            let (start, len) = sb.rgrp_extent(i);
            let e = RindexEntry::for_rgrp(start, len);
            let hraw = self.read(e.addr)?;
            let header = match RgrpHeader::decode(&hraw, e.addr) {
                Ok(h) => {
                    if h.index != i || h.length != e.length || h.bitmap_blocks != e.bitmap_blocks {
                        self.problem(
                            e.addr,
                            format!(
                                "rgrp {i} header says index {} length {} bitmaps {}, expected {i}, {}, {}",
                                h.index, h.length, h.bitmap_blocks, e.length, e.bitmap_blocks
                            ),
                            false,
                        );
                    }
                    Some(h)
                }
                Err(err) => {
                    self.problem(e.addr, format!("rgrp {i} header: {err}"), false);
                    None
                }
            };
            let per = BLOCK_SIZE - HDR_LEN;
            let mut disk = vec![0u8; e.bitmap_blocks as usize * per];
            let mut bitmap_ok = vec![false; e.bitmap_blocks as usize];
            for bi in 0..e.bitmap_blocks as usize {
                let baddr = e.addr + 1 + bi as u64;
                let raw = self.read(baddr)?;
                match decode_bitmap(&raw, baddr) {
                    Ok(bits) => {
                        disk[bi * per..(bi + 1) * per].copy_from_slice(&bits[..per]);
                        bitmap_ok[bi] = true;
                    }
                    Err(err) => {
                        self.problem(baddr, format!("rgrp {i} bitmap: {err}"), false);
                    }
                }
            }
            let mut expect = vec![0u8; disk.len()];
            for k in 0..1 + u64::from(e.bitmap_blocks) {
                set2(&mut expect, k, BlockState::Used);
            }
            self.rgrps.push(Rg { e, header, disk, bitmap_ok, expect, max_generation: 0, counted: None });
            progress(u64::from(i) + 1, total);
        }
        Ok(())
    }

    /// (rgrp index, block offset in the rgrp) of a block in some rgrp's data area.
    fn locate(&self, addr: u64) -> Option<(usize, u64)> {
        let sb = self.sb.as_ref()?;
        if addr < sb.first_rgrp {
            return None;
        }
        let ri = (addr - sb.first_rgrp) / u64::from(sb.rgrp_blocks);
        let r = self.rgrps.get(usize::try_from(ri).ok()?)?;
        let k = addr - r.e.addr;
        (k > u64::from(r.e.bitmap_blocks) && k < u64::from(r.e.length)).then_some((ri as usize, k))
    }

    /// The bitmap's state of a data-area block, None when its bitmap block is unreadable.
    fn disk_state(&self, addr: u64) -> Option<BlockState> {
        let (ri, k) = self.locate(addr)?;
        let r = &self.rgrps[ri];
        r.bitmap_ok[(k / u64::from(BITMAP_BLOCKS_PER)) as usize].then(|| get2(&r.disk, k))
    }

    /// Claims a block for `owner` (a description) in `state`. False when the block is
    /// outside the data areas or already claimed (both reported, naming `from`/`addr`).
    fn claim(&mut self, addr: u64, state: BlockState, from: u64, what: &str) -> bool {
        let Some((ri, k)) = self.locate(addr) else {
            self.problem(from, format!("{what} points at block {addr}, outside every rgrp's data area"), false);
            self.incomplete = true;
            return false;
        };
        let old = get2(&self.rgrps[ri].expect, k);
        if old != BlockState::Free {
            self.problem(
                addr,
                format!("block {addr} used twice: as {} and by {what} (from block {from})", state_name(old)),
                false,
            );
            self.incomplete = true;
            return false;
        }
        set2(&mut self.rgrps[ri].expect, k, state);
        if let Some(log) = &mut self.claim_log {
            log.push(addr);
        }
        true
    }

    // ---- walk -------------------------------------------------------------------------

    fn walk(&mut self, progress: &mut dyn FnMut(u64, u64), total: u64) -> crate::Result<()> {
        let sb = self.sb().clone();
        for (ino, parent) in [(sb.master_dinode, sb.master_dinode), (sb.root_dinode, sb.root_dinode)] {
            match self.load_dinode(ino) {
                Ok(d) => {
                    if !d.is_dir() {
                        self.problem(ino, format!("dinode {ino} (root or master) is not a directory"), false);
                        self.incomplete = true;
                        continue;
                    }
                    if !self.claim(ino, BlockState::Dinode, SB_ADDR, "the superblock") {
                        continue;
                    }
                    self.note_live(ino, &d);
                    self.queue.push_back((ino, parent));
                }
                Err(e) => {
                    self.problem(ino, format!("root or master dinode: {e}"), false);
                    self.incomplete = true;
                }
            }
        }
        let mut visited = 0u64;
        while let Some((ino, parent)) = self.queue.pop_front() {
            self.visit(ino, parent)?;
            visited += 1;
            if visited.is_multiple_of(256) {
                progress(u64::from(sb.rgrp_count), total);
            }
        }
        self.check_master()?;
        progress(u64::from(sb.rgrp_count) + 1, total);
        Ok(())
    }

    fn load_dinode(&self, ino: u64) -> crate::Result<Dinode> {
        let b = self.read(ino)?;
        Ok(Dinode::decode(&b, ino)?)
    }

    fn note_live(&mut self, ino: u64, d: &Dinode) {
        self.report.inodes += 1;
        if d.is_dir() {
            self.report.dirs += 1;
        }
        if let Some((ri, _)) = self.locate(ino) {
            let g = &mut self.rgrps[ri].max_generation;
            *g = (*g).max(d.generation);
        }
        self.inodes.insert(
            ino,
            Ino {
                is_dir: d.is_dir(),
                mode: d.mode,
                nlink: d.nlink,
                refs: 0,
                subdirs: 0,
                named_in: None,
                parent_field: d.parent,
                entries_ok: true,
            },
        );
    }

    fn fix(&mut self, ino: u64) -> &mut DinodeFix {
        self.fixes.entry(ino).or_default()
    }

    /// Checks one live dinode: its block map, xattrs and (directories) entries.
    fn visit(&mut self, ino: u64, _parent: u64) -> crate::Result<()> {
        let d = match self.load_dinode(ino) {
            Ok(d) => d,
            Err(e) => {
                self.problem(ino, format!("dinode {ino}: {e}"), false);
                return Ok(());
            }
        };
        // Block map.
        let mut tree_ok = true;
        let mut owned = 0u64;
        let mut table_blocks: Vec<(u64, u64)> = Vec::new();
        if d.flags & DIF_JOURNAL != 0 {
            // The payload is an extent in the journal area, checked with jindex.
        } else if d.height > 0 {
            let collect = d.is_exhash();
            let ptrs: Vec<u64> = (0..DINODE_PTRS).map(|i| d.ptr(i)).collect();
            self.walk_tree(ino, ino, &ptrs, d.height, 0, 0, collect, &mut owned, &mut tree_ok, &mut table_blocks)?;
            if d.is_reg() && d.size > max_file_size(d.height) {
                let idx = self.problem(
                    ino,
                    format!("dinode {ino}: size {} beyond what height {} maps", d.size, d.height),
                    false,
                );
                if tree_ok && d.size <= max_file_size(MAX_HEIGHT) {
                    let f = self.fix(ino);
                    f.height = Some(height_for(d.size.div_ceil(BLOCK_SIZE as u64) - 1));
                    f.problems.push(idx);
                }
            }
        }
        // Xattrs (not counted in `blocks`).
        if d.xattr != 0 && self.claim(d.xattr, BlockState::Used, ino, &format!("dinode {ino}'s xattr pointer")) {
            let b = self.read(d.xattr)?;
            if let Err(e) = decode_xattrs(&b, d.xattr, ino) {
                self.problem(d.xattr, format!("xattr block of dinode {ino}: {e}"), false);
            }
        }
        // Directory contents.
        if d.is_dir() {
            let mut ctx = DirCtx { ino, names: HashSet::new(), count: 0, valid: 0, ok: true };
            if d.is_exhash() {
                self.walk_exhash(&d, &table_blocks, &mut ctx, &mut owned, &mut tree_ok)?;
            } else {
                match decode_area(&d.payload[..], ino) {
                    Ok(entries) => {
                        for e in entries {
                            self.entry(&mut ctx, Container::Stuffed(ino), e)?;
                        }
                    }
                    Err(e) => {
                        self.problem(ino, format!("directory {ino} entries: {e}"), false);
                        ctx.ok = false;
                    }
                }
            }
            if let Some(i) = self.inodes.get_mut(&ino) {
                i.entries_ok = ctx.ok && tree_ok;
            }
            if !ctx.ok || !tree_ok {
                self.incomplete = true;
            } else if u64::from(d.dir_entries) != ctx.count || ctx.valid != ctx.count {
                let idx = if u64::from(d.dir_entries) != ctx.count {
                    self.problem(
                        ino,
                        format!("directory {ino}: dir_entries is {} but it holds {} entries", d.dir_entries, ctx.count),
                        false,
                    )
                } else {
                    usize::MAX - 1
                };
                let valid = ctx.valid as u32;
                let f = self.fix(ino);
                f.dir_entries = Some(valid);
                if idx != usize::MAX - 1 {
                    f.problems.push(idx);
                }
            }
        }
        if tree_ok && d.flags & DIF_JOURNAL == 0 && owned != d.blocks {
            let idx = self.problem(ino, format!("dinode {ino}: blocks is {} but it owns {owned}", d.blocks), false);
            let f = self.fix(ino);
            f.blocks = Some(owned);
            f.problems.push(idx);
        } else if !tree_ok {
            self.incomplete = true;
        }
        Ok(())
    }

    /// Walks the block map below `ptrs` (in block `from`) at `level` of a tree of height `h`.
    #[allow(clippy::too_many_arguments)]
    fn walk_tree(
        &mut self,
        ino: u64,
        from: u64,
        ptrs: &[u64],
        h: u8,
        level: u8,
        base: u64,
        collect: bool,
        owned: &mut u64,
        ok: &mut bool,
        leaves: &mut Vec<(u64, u64)>,
    ) -> crate::Result<()> {
        let span = (INDIRECT_PTRS as u64).saturating_pow(u32::from(h - 1 - level));
        for (i, &p) in ptrs.iter().enumerate() {
            if p == 0 {
                continue;
            }
            let lblock = base.saturating_add((i as u64).saturating_mul(span));
            let leaf = level + 1 == h;
            let what = if leaf { format!("dinode {ino}'s block map") } else { format!("dinode {ino}'s tree") };
            if !self.claim(p, BlockState::Used, from, &what) {
                *ok = false;
                continue;
            }
            *owned += 1;
            if leaf {
                if collect {
                    leaves.push((lblock, p));
                }
                continue;
            }
            let b = self.read(p)?;
            match decode_indirect(&b, p, ino, self.device_blocks) {
                Ok(child) => {
                    self.walk_tree(ino, p, &child, h, level + 1, lblock, collect, owned, ok, leaves)?;
                }
                Err(e) => {
                    self.problem(p, format!("indirect block of dinode {ino}: {e}"), false);
                    *ok = false;
                }
            }
        }
        Ok(())
    }

    fn walk_exhash(
        &mut self,
        d: &Dinode,
        table_blocks: &[(u64, u64)],
        ctx: &mut DirCtx,
        owned: &mut u64,
        tree_ok: &mut bool,
    ) -> crate::Result<()> {
        let ino = ctx.ino;
        let depth = d.dir_depth;
        let n = 1u64 << depth;
        if d.size != 8 * n {
            self.problem(ino, format!("directory {ino}: size {} but a hash table of depth {depth}", d.size), false);
        }
        // Read the table (at most 2^17 pointers).
        let nblocks = n.div_ceil(HASH_PTRS as u64);
        let mut table: Vec<u64> = Vec::with_capacity(n as usize);
        let mut table_addr: Vec<u64> = Vec::with_capacity(nblocks as usize);
        for lb in 0..nblocks {
            let Some(&(_, addr)) = table_blocks.iter().find(|(l, _)| *l == lb) else {
                self.problem(ino, format!("directory {ino}: hash table block {lb} is missing"), false);
                *tree_ok = false;
                return Ok(());
            };
            let b = self.read(addr)?;
            match decode_hash_block(&b, addr, ino, self.device_blocks) {
                Ok(ptrs) => {
                    let take = (n - lb * HASH_PTRS as u64).min(HASH_PTRS as u64) as usize;
                    table.extend_from_slice(&ptrs[..take]);
                    table_addr.push(addr);
                }
                Err(e) => {
                    self.problem(addr, format!("hash table of directory {ino}: {e}"), false);
                    *tree_ok = false;
                    return Ok(());
                }
            }
        }
        if let Some(&(lb, addr)) = table_blocks.iter().find(|(l, _)| *l >= nblocks) {
            self.problem(addr, format!("directory {ino}: mapped block {lb} beyond its hash table"), false);
        }
        let tab_block = |i: u64| table_addr[(i / HASH_PTRS as u64) as usize];
        let mut seen: HashSet<u64> = HashSet::new();
        let mut i = 0u64;
        while i < n {
            let p = table[i as usize];
            if p == 0 {
                self.problem(tab_block(i), format!("directory {ino}: hash table entry {i} is empty"), false);
                *tree_ok = false;
                i += 1;
                continue;
            }
            if seen.contains(&p) {
                self.problem(tab_block(i), format!("directory {ino}: leaf {p} pointed at from two ranges"), false);
                *tree_ok = false;
                i += 1;
                continue;
            }
            seen.insert(p);
            if !self.claim(p, BlockState::Used, tab_block(i), &format!("directory {ino}'s hash table")) {
                *tree_ok = false;
                i += 1;
                continue;
            }
            *owned += 1;
            let b = self.read(p)?;
            let leaf = match Leaf::decode(&b, p, ino) {
                Ok(l) => l,
                Err(e) => {
                    self.problem(p, format!("leaf of directory {ino}: {e}"), false);
                    *tree_ok = false;
                    i += 1;
                    while i < n && table[i as usize] == p {
                        i += 1;
                    }
                    continue;
                }
            };
            if leaf.depth > depth {
                self.problem(
                    p,
                    format!("leaf of directory {ino}: depth {} above the table's {depth}", leaf.depth),
                    false,
                );
                *tree_ok = false;
                i += 1;
                while i < n && table[i as usize] == p {
                    i += 1;
                }
                continue;
            }
            let size = 1u64 << (depth - leaf.depth);
            let start = i;
            if !start.is_multiple_of(size)
                || start + size > n
                || table[start as usize..(start + size) as usize].iter().any(|&q| q != p)
            {
                self.problem(
                    tab_block(i),
                    format!(
                        "directory {ino}: leaf {p} of depth {} is not pointed at by entries {start}..{}",
                        leaf.depth,
                        start + size
                    ),
                    false,
                );
                *tree_ok = false;
            }
            let range = start..start.saturating_add(size);
            // The leaf and its chain.
            let mut cur = Some((p, leaf));
            let mut chain = 0usize;
            while let Some((addr, l)) = cur.take() {
                for e in &l.entries {
                    if !range.contains(&hash_index(e.hash, depth)) {
                        self.problem(
                            addr,
                            format!(
                                "directory {ino}: entry {:?} hashes outside its leaf's range",
                                String::from_utf8_lossy(&e.name)
                            ),
                            false,
                        );
                        *tree_ok = false;
                    }
                }
                if l.next != 0 && l.depth != MAX_DIR_DEPTH {
                    self.problem(addr, format!("directory {ino}: leaf chained below the maximum depth"), false);
                    *tree_ok = false;
                }
                let next = l.next;
                for e in l.entries {
                    self.entry(ctx, Container::Leaf(addr), e)?;
                }
                chain += 1;
                if next == 0 || chain > MAX_CHAIN {
                    break;
                }
                if !self.claim(next, BlockState::Used, addr, &format!("directory {ino}'s leaf chain")) {
                    *tree_ok = false;
                    break;
                }
                *owned += 1;
                let b = self.read(next)?;
                match Leaf::decode(&b, next, ino) {
                    Ok(nl) => {
                        if nl.depth != l.depth {
                            self.problem(next, format!("directory {ino}: chained leaf of another depth"), false);
                            *tree_ok = false;
                        }
                        cur = Some((next, nl));
                    }
                    Err(e) => {
                        self.problem(next, format!("leaf of directory {ino}: {e}"), false);
                        *tree_ok = false;
                    }
                }
            }
            i = start + 1;
            while i < n && table[i as usize] == p {
                i += 1;
            }
        }
        Ok(())
    }

    /// One directory entry: its name, its target, the target's type.
    fn entry(&mut self, ctx: &mut DirCtx, c: Container, e: DirEntry) -> crate::Result<()> {
        ctx.count += 1;
        let dir = ctx.ino;
        let name = String::from_utf8_lossy(&e.name).into_owned();
        if !ctx.names.insert(e.name.clone()) {
            self.problem(c.block(), format!("directory {dir}: name {name:?} appears twice"), false);
            ctx.valid += 1;
            return Ok(());
        }
        // Already known: another link.
        if let Some(info) = self.inodes.get(&e.ino) {
            let (is_dir, mode) = (info.is_dir, info.mode);
            ctx.valid += 1;
            if is_dir {
                self.problem(
                    c.block(),
                    format!("directory {dir}: entry {name:?} is a second link to directory {}", e.ino),
                    false,
                );
                self.incomplete = true;
            } else if let Some(info) = self.inodes.get_mut(&e.ino) {
                info.refs += 1;
            }
            self.check_dtype(dir, c, &e, &name, mode);
            return Ok(());
        }
        // A new target: it must be a live dinode.
        let dead = match self.locate(e.ino) {
            None => Some("outside every rgrp's data area".to_string()),
            Some(_) => match self.disk_state(e.ino) {
                Some(s @ (BlockState::Free | BlockState::Used)) => {
                    Some(format!("marked {} in the bitmap", state_name(s)))
                }
                _ => None,
            },
        };
        if let Some(why) = dead {
            let idx = self.problem(
                c.block(),
                format!("directory {dir}: entry {name:?} names inode {}, which is {why}", e.ino),
                false,
            );
            self.edit(c, dir, Edit::Remove(e.name.clone()), idx);
            return Ok(());
        }
        let d = match self.load_dinode(e.ino) {
            Ok(d) => d,
            Err(FsError::Corrupt(fe)) => {
                let idx =
                    self.problem(e.ino, format!("dinode {} (entry {name:?} in directory {dir}): {fe}", e.ino), false);
                self.edit(c, dir, Edit::Remove(e.name.clone()), idx);
                return Ok(());
            }
            Err(other) => return Err(other),
        };
        if !self.claim(e.ino, BlockState::Dinode, c.block(), &format!("entry {name:?} of directory {dir}")) {
            ctx.valid += 1;
            return Ok(());
        }
        ctx.valid += 1;
        self.note_live(e.ino, &d);
        if let Some(info) = self.inodes.get_mut(&e.ino) {
            info.refs = 1;
            info.named_in = Some(dir);
        }
        if d.is_dir() {
            if let Some(p) = self.inodes.get_mut(&dir) {
                p.subdirs += 1;
            }
        }
        self.check_dtype(dir, c, &e, &name, d.mode);
        self.queue.push_back((e.ino, dir));
        Ok(())
    }

    fn check_dtype(&mut self, dir: u64, c: Container, e: &DirEntry, name: &str, mode: u32) {
        let want = dtype_of(mode);
        if e.dtype != want {
            let idx = self.problem(
                c.block(),
                format!("directory {dir}: entry {name:?} has type {} but inode {} has mode {mode:o}", e.dtype, e.ino),
                false,
            );
            self.edit(c, dir, Edit::SetType(e.name.clone(), want), idx);
        }
    }

    fn edit(&mut self, c: Container, dir: u64, ed: Edit, problem: usize) {
        match c {
            Container::Stuffed(ino) => {
                let f = self.fix(ino);
                f.edits.push(ed);
                f.problems.push(problem);
            }
            Container::Leaf(addr) => {
                let le = self.leaf_edits.entry(addr).or_insert_with(|| (dir, Vec::new(), Vec::new()));
                le.1.push(ed);
                le.2.push(problem);
            }
        }
    }

    /// The master directory's system files and the journal dinodes.
    fn check_master(&mut self) -> crate::Result<()> {
        let sb = self.sb().clone();
        let master = sb.master_dinode;
        let Ok(m) = self.load_dinode(master) else { return Ok(()) };
        if !m.is_dir() || m.is_exhash() {
            self.problem(master, "master directory is not a stuffed directory", false);
            return Ok(());
        }
        let Ok(entries) = decode_area(&m.payload[..], master) else { return Ok(()) };
        let find = |n: &str| entries.iter().find(|e| e.name == n.as_bytes()).map(|e| e.ino);
        // rindex against the superblock's geometry.
        match find("rindex") {
            None => {
                self.problem(master, "master directory has no rindex", false);
            }
            Some(ri) => self.check_rindex(ri, &sb)?,
        }
        for name in std::iter::once("statfs".to_string()).chain((0..sb.journals).map(|j| format!("statfs_change{j}"))) {
            match find(&name) {
                Some(ino) if self.inodes.get(&ino).is_some_and(|i| i.mode & S_IFMT == S_IFREG) => {}
                _ => {
                    self.problem(master, format!("master directory: system file {name} missing or not a file"), false);
                }
            }
        }
        // Journal dinodes.
        let Some(jindex) = find("jindex") else {
            self.problem(master, "master directory has no jindex", false);
            return Ok(());
        };
        let Ok(jd) = self.load_dinode(jindex) else { return Ok(()) };
        let Ok(jentries) = (if jd.is_dir() && !jd.is_exhash() {
            decode_area(&jd.payload[..], jindex)
        } else {
            Err(bad(jindex, "jindex", "not a stuffed directory"))
        }) else {
            self.problem(jindex, "jindex is not a readable stuffed directory", false);
            return Ok(());
        };
        for jid in 0..sb.journals {
            let name = format!("journal{jid}");
            let Some(e) = jentries.iter().find(|e| e.name == name.as_bytes()) else {
                self.problem(jindex, format!("jindex has no {name}"), false);
                continue;
            };
            let Ok(j) = self.load_dinode(e.ino) else { continue };
            let want = (sb.journal_addr(jid), u64::from(sb.journal_blocks));
            if j.flags & DIF_JOURNAL == 0 || j.journal_extent() != want {
                self.problem(
                    e.ino,
                    format!(
                        "journal dinode {name}: extent {:?}, but the superblock puts journal {jid} at {want:?}",
                        j.journal_extent()
                    ),
                    false,
                );
            }
        }
        if jentries.len() as u64 != u64::from(sb.journals) {
            self.problem(
                jindex,
                format!("jindex holds {} entries for {} journals", jentries.len(), sb.journals),
                false,
            );
        }
        Ok(())
    }

    fn check_rindex(&mut self, ino: u64, sb: &Superblock) -> crate::Result<()> {
        let Ok(d) = self.load_dinode(ino) else { return Ok(()) };
        if d.size > (sb.rgrp_count as u64 + 1) * RINDEX_LEN as u64 * 2 + BLOCK_SIZE as u64 {
            self.problem(ino, format!("rindex size {} is far beyond {} rgrps", d.size, sb.rgrp_count), false);
            return Ok(());
        }
        let mut bytes = vec![0u8; d.size as usize];
        if d.height == 0 {
            let n = bytes.len().min(STUFFED_MAX);
            bytes[..n].copy_from_slice(&d.payload[..n]);
        } else if d.height == 1 {
            for (i, chunk) in bytes.chunks_mut(BLOCK_SIZE).enumerate() {
                let p = if i < DINODE_PTRS { d.ptr(i) } else { 0 };
                if p == 0 || p >= self.device_blocks {
                    self.problem(ino, format!("rindex block {i} is missing"), false);
                    return Ok(());
                }
                let b = self.read(p)?;
                chunk.copy_from_slice(&b[..chunk.len()]);
            }
        } else {
            self.problem(ino, "rindex has an unexpected block map height", false);
            return Ok(());
        }
        match RindexEntry::decode_all(&bytes, ino) {
            Ok(entries) => {
                if entries.len() != sb.rgrp_count as usize {
                    self.problem(
                        ino,
                        format!("rindex holds {} rgrps, the superblock {}", entries.len(), sb.rgrp_count),
                        false,
                    );
                }
                for (i, r) in entries.iter().enumerate().take(sb.rgrp_count as usize) {
                    let (start, len) = sb.rgrp_extent(i as u32);
                    if *r != RindexEntry::for_rgrp(start, len) {
                        self.problem(ino, format!("rindex record {i} disagrees with the superblock"), false);
                    }
                }
            }
            Err(e) => {
                self.problem(ino, format!("rindex: {e}"), false);
            }
        }
        Ok(())
    }

    // ---- orphans and link counts ------------------------------------------------------

    fn orphans(&mut self) -> crate::Result<()> {
        let mut found = Vec::new();
        for r in &self.rgrps {
            for k in 1 + u64::from(r.e.bitmap_blocks)..u64::from(r.e.length) {
                if r.bitmap_ok[(k / u64::from(BITMAP_BLOCKS_PER)) as usize]
                    && get2(&r.disk, k) == BlockState::Unlinked
                    && get2(&r.expect, k) == BlockState::Free
                {
                    found.push(r.e.addr + k);
                }
            }
        }
        for ino in found {
            let d = match self.load_dinode(ino) {
                Ok(d) => d,
                Err(e) => {
                    // Left as a leak: the bitmap says UNLINKED, nothing owns it.
                    self.problem(ino, format!("block {ino} marked unlinked but is not a dinode: {e}"), false);
                    continue;
                }
            };
            // Claim what it owns, then (repairing) give it all back to be freed.
            self.claim_log = Some(Vec::new());
            let incomplete_before = self.incomplete;
            let mut ok = true;
            let mut owned = 0u64;
            let mut leaves = Vec::new();
            self.claim(ino, BlockState::Unlinked, ino, "an orphan");
            if d.height > 0 && d.flags & DIF_JOURNAL == 0 {
                let ptrs: Vec<u64> = (0..DINODE_PTRS).map(|i| d.ptr(i)).collect();
                self.walk_tree(ino, ino, &ptrs, d.height, 0, 0, d.is_exhash(), &mut owned, &mut ok, &mut leaves)?;
            }
            if d.is_exhash() && ok {
                let mut seen = HashSet::new();
                for (_, t) in leaves {
                    let b = self.read(t)?;
                    let Ok(ptrs) = decode_hash_block(&b, t, ino, self.device_blocks) else {
                        ok = false;
                        break;
                    };
                    for mut p in ptrs.into_iter().filter(|&p| p != 0) {
                        let mut chain = 0;
                        while p != 0 && seen.insert(p) && chain < MAX_CHAIN {
                            if !self.claim(p, BlockState::Used, t, "an orphan's hash table") {
                                ok = false;
                                break;
                            }
                            let b = self.read(p)?;
                            p = match Leaf::decode(&b, p, ino) {
                                Ok(l) => l.next,
                                Err(_) => {
                                    ok = false;
                                    0
                                }
                            };
                            chain += 1;
                        }
                    }
                }
            }
            if d.xattr != 0 {
                self.claim(d.xattr, BlockState::Used, ino, "an orphan's xattr pointer");
            }
            let idx = self.problem(ino, format!("orphan: dinode {ino} is unlinked and no entry names it"), false);
            let claimed = self.claim_log.take().unwrap_or_default();
            if self.repair && ok {
                // Everything it claimed goes back to free; bitmaps are written below.
                for a in claimed {
                    if let Some((ri, k)) = self.locate(a) {
                        set2(&mut self.rgrps[ri].expect, k, BlockState::Free);
                        self.freeing.insert(a);
                    }
                }
                self.incomplete = incomplete_before;
                self.mark_fixed(idx);
            }
        }
        Ok(())
    }

    fn check_nlinks(&mut self) {
        let sb = self.sb().clone();
        let mut list: Vec<(u64, u32, u32, bool, Option<u64>, u64)> = Vec::new();
        for (&ino, i) in &self.inodes {
            let want = if i.is_dir { i.subdirs.saturating_add(2) } else { i.refs };
            list.push((ino, i.nlink, want, i.is_dir && i.entries_ok, i.named_in, i.parent_field));
        }
        list.sort_unstable();
        for (ino, have, want, trust_dir, named_in, parent_field) in list {
            let is_dir = self.inodes.get(&ino).is_some_and(|i| i.is_dir);
            // A directory's own count is only known when all its entries were read.
            let known = if is_dir { trust_dir } else { !self.incomplete };
            if have != want {
                let idx = self.problem(ino, format!("dinode {ino}: nlink is {have}, expected {want}"), false);
                if known {
                    let f = self.fix(ino);
                    f.nlink = Some(want);
                    f.problems.push(idx);
                }
            }
            if is_dir {
                let want_parent = if ino == sb.root_dinode || ino == sb.master_dinode { Some(ino) } else { named_in };
                if let Some(p) = want_parent {
                    if p != parent_field {
                        let idx = self.problem(
                            ino,
                            format!("directory {ino}: parent is {parent_field}, but {p} holds it"),
                            false,
                        );
                        let f = self.fix(ino);
                        f.parent = Some(p);
                        f.problems.push(idx);
                    }
                }
            }
        }
    }

    // ---- repairs of dinodes and leaves -------------------------------------------------

    fn apply_inode_fixes(&mut self) -> crate::Result<()> {
        if !self.repair {
            return Ok(());
        }
        let mut inos: Vec<u64> = self.fixes.keys().copied().collect();
        inos.sort_unstable();
        for ino in inos {
            let Some(f) = self.fixes.remove(&ino) else { continue };
            let Ok(mut d) = self.load_dinode(ino) else { continue };
            if let Some(n) = f.nlink {
                d.nlink = n;
            }
            if let Some(b) = f.blocks {
                d.blocks = b;
            }
            if let Some(p) = f.parent {
                d.parent = p;
            }
            if let Some(n) = f.dir_entries {
                d.dir_entries = n;
            }
            if let Some(h) = f.height {
                if !self.raise_height(ino, &mut d, h)? {
                    continue;
                }
            }
            if !f.edits.is_empty() {
                let Ok(mut entries) = decode_area(&d.payload[..], ino) else { continue };
                apply_edits(&mut entries, &f.edits);
                let mut payload = [0u8; STUFFED_MAX];
                if !encode_area(&entries, &mut payload) {
                    continue;
                }
                d.payload.copy_from_slice(&payload);
            }
            self.write(ino, &d.encode(ino))?;
            for p in f.problems {
                self.mark_fixed(p);
            }
        }
        let mut leaves: Vec<u64> = self.leaf_edits.keys().copied().collect();
        leaves.sort_unstable();
        for addr in leaves {
            let Some((owner, edits, problems)) = self.leaf_edits.remove(&addr) else { continue };
            let b = self.read(addr)?;
            let Ok(mut leaf) = Leaf::decode(&b, addr, owner) else { continue };
            apply_edits(&mut leaf.entries, &edits);
            let Some(nb) = leaf.encode(addr, owner) else { continue };
            self.write(addr, &nb)?;
            for p in problems {
                self.mark_fixed(p);
            }
        }
        Ok(())
    }

    /// Raises `d`'s block map to height `h` as the filesystem's truncate does: each new
    /// level moves the dinode's pointers into a fresh indirect block (a block free on
    /// disk and claimed by nothing; the bitmap comparison that follows marks it used).
    /// False when no free block is left (the problem stays unfixed).
    fn raise_height(&mut self, ino: u64, d: &mut Dinode, h: u8) -> crate::Result<bool> {
        while d.height < h {
            if (0..DINODE_PTRS).any(|i| d.ptr(i) != 0) {
                let Some(a) = self.free_block() else { return Ok(false) };
                if !self.claim(a, BlockState::Used, ino, &format!("dinode {ino}'s new indirect block")) {
                    return Ok(false);
                }
                let ptrs: Vec<u64> = (0..DINODE_PTRS).map(|i| d.ptr(i)).collect();
                self.write(a, &encode_indirect(&ptrs, a, ino))?;
                for i in 0..DINODE_PTRS {
                    d.set_ptr(i, 0);
                }
                d.set_ptr(0, a);
                d.blocks += 1;
            }
            d.height += 1;
        }
        Ok(true)
    }

    /// A data-area block free both on disk and in what the walk found.
    fn free_block(&self) -> Option<u64> {
        for r in &self.rgrps {
            for k in u64::from(r.e.bitmap_blocks) + 1..u64::from(r.e.length) {
                let bi = (k / u64::from(BITMAP_BLOCKS_PER)) as usize;
                if r.bitmap_ok[bi] && get2(&r.disk, k) == BlockState::Free && get2(&r.expect, k) == BlockState::Free {
                    return Some(r.e.addr + k);
                }
            }
        }
        None
    }

    // ---- bitmaps ----------------------------------------------------------------------

    fn compare_bitmaps(&mut self, progress: &mut dyn FnMut(u64, u64), total: u64) -> crate::Result<()> {
        let nrg = self.rgrps.len();
        for ri in 0..nrg {
            self.compare_rgrp(ri)?;
            progress(nrg as u64 + 1 + ri as u64, total);
        }
        Ok(())
    }

    fn compare_rgrp(&mut self, ri: usize) -> crate::Result<()> {
        let per = u64::from(BITMAP_BLOCKS_PER);
        let (e, len) = (self.rgrps[ri].e, u64::from(self.rgrps[ri].e.length));
        let may_free = !self.incomplete;
        let mut dirty = vec![false; e.bitmap_blocks as usize];
        // A run of same-kind differences is one problem.
        let mut run: Option<(u64, u64, BlockState, BlockState)> = None;
        let mut runs: Vec<(u64, u64, BlockState, BlockState)> = Vec::new();
        for k in 0..len {
            let bi = (k / per) as usize;
            if !self.rgrps[ri].bitmap_ok[bi] {
                continue;
            }
            let exp = get2(&self.rgrps[ri].expect, k);
            let disk = get2(&self.rgrps[ri].disk, k);
            let addr = e.addr + k;
            if exp == disk || self.freeing.contains(&addr) {
                if let Some(r) = run.take() {
                    runs.push(r);
                }
                continue;
            }
            match &mut run {
                Some((_, end, x, y)) if *end == addr && *x == exp && *y == disk => *end += 1,
                _ => {
                    if let Some(r) = run.take() {
                        runs.push(r);
                    }
                    run = Some((addr, addr + 1, exp, disk));
                }
            }
        }
        if let Some(r) = run.take() {
            runs.push(r);
        }
        for (start, end, exp, disk) in runs {
            let n = end - start;
            let span = if n == 1 { format!("block {start}") } else { format!("blocks {start}..{end} ({n})") };
            let (what, fixable) = if exp == BlockState::Free {
                (format!("{span} marked {} in the bitmap but unreachable (leak)", state_name(disk)), may_free)
            } else if disk == BlockState::Free {
                (format!("{span} in use as {} but marked free in the bitmap", state_name(exp)), true)
            } else {
                (format!("{span} in use as {} but marked {} in the bitmap", state_name(exp), state_name(disk)), true)
            };
            let idx = self.problem(start, what, false);
            if self.repair && fixable {
                for a in start..end {
                    let k = a - e.addr;
                    set2(&mut self.rgrps[ri].disk, k, exp);
                    dirty[(k / per) as usize] = true;
                }
                self.mark_fixed(idx);
            } else if exp == BlockState::Free {
                // Left as it is: count the block as in use.
                for a in start..end {
                    set2(&mut self.rgrps[ri].expect, a - e.addr, disk);
                }
            }
        }
        // Orphans being freed.
        if self.repair {
            let freeing: Vec<u64> = self.freeing.iter().copied().filter(|&a| a >= e.addr && a < e.addr + len).collect();
            for a in freeing {
                let k = a - e.addr;
                if self.rgrps[ri].bitmap_ok[(k / per) as usize] && get2(&self.rgrps[ri].disk, k) != BlockState::Free {
                    set2(&mut self.rgrps[ri].disk, k, BlockState::Free);
                    dirty[(k / per) as usize] = true;
                }
            }
        }
        // Unreadable bitmap blocks: rebuilt from the walk when the walk was complete.
        for (bi, dirty_bi) in dirty.iter_mut().enumerate() {
            if !self.rgrps[ri].bitmap_ok[bi] && self.repair && may_free {
                let r = &mut self.rgrps[ri];
                let lo = bi * (BLOCK_SIZE - HDR_LEN);
                let hi = lo + (BLOCK_SIZE - HDR_LEN);
                let src = r.expect[lo..hi].to_vec();
                r.disk[lo..hi].copy_from_slice(&src);
                r.bitmap_ok[bi] = true;
                *dirty_bi = true;
                let baddr = e.addr + 1 + bi as u64;
                let idxs: Vec<usize> = (0..self.report.problems.len())
                    .filter(|&i| self.report.problems[i].block == baddr && !self.report.problems[i].fixed)
                    .collect();
                for i in idxs {
                    self.mark_fixed(i);
                }
            }
        }
        for (bi, d) in dirty.iter().enumerate() {
            if *d {
                let baddr = e.addr + 1 + bi as u64;
                let lo = bi * (BLOCK_SIZE - HDR_LEN);
                let b = encode_bitmap(&self.rgrps[ri].disk[lo..lo + (BLOCK_SIZE - HDR_LEN)], baddr, e.addr);
                self.write(baddr, &b)?;
            }
        }
        // Header counters against the bitmap (as repaired).
        if !self.rgrps[ri].bitmap_ok.iter().all(|&x| x) {
            return Ok(());
        }
        let (mut free, mut dinodes, mut unlinked) = (0u32, 0u32, 0u32);
        for k in 0..len {
            match get2(&self.rgrps[ri].disk, k) {
                BlockState::Free => free += 1,
                BlockState::Dinode => dinodes += 1,
                BlockState::Unlinked => unlinked += 1,
                BlockState::Used => {}
            }
        }
        self.rgrps[ri].counted = Some((u64::from(free), u64::from(dinodes)));
        let want = |igeneration| RgrpHeader {
            index: ri as u32,
            length: e.length,
            bitmap_blocks: e.bitmap_blocks,
            free,
            dinodes,
            unlinked,
            igeneration,
        };
        let max_gen = self.rgrps[ri].max_generation;
        let hdr = self.rgrps[ri].header.clone();
        let new = match &hdr {
            Some(h) => {
                let w = want(h.igeneration.max(max_gen.saturating_add(1)).max(1));
                let counters = (h.free, h.dinodes, h.unlinked) != (free, dinodes, unlinked);
                if counters {
                    let idx = self.problem(
                        e.addr,
                        format!(
                            "rgrp {ri} header counts free {} dinodes {} unlinked {}, the bitmap {free} {dinodes} {unlinked}",
                            h.free, h.dinodes, h.unlinked
                        ),
                        false,
                    );
                    if self.repair {
                        self.mark_fixed(idx);
                    }
                }
                if h.igeneration <= max_gen {
                    let idx = self.problem(
                        e.addr,
                        format!(
                            "rgrp {ri} header: igeneration {} not above generation {max_gen} in use",
                            h.igeneration
                        ),
                        false,
                    );
                    if self.repair {
                        self.mark_fixed(idx);
                    }
                }
                (w != *h).then_some(w)
            }
            None => Some(want(max_gen.saturating_add(1).max(1))),
        };
        if let Some(w) = new {
            if self.repair {
                self.write(e.addr, &w.encode(e.addr))?;
                let idxs: Vec<usize> = (0..self.report.problems.len())
                    .filter(|&i| self.report.problems[i].block == e.addr && !self.report.problems[i].fixed)
                    .collect();
                for i in idxs {
                    self.mark_fixed(i);
                }
                self.rgrps[ri].header = Some(w);
            }
        }
        Ok(())
    }
}

impl Checker<'_> {
    /// The statfs records against the bitmaps: the master's free and dinode counts
    /// plus every journal's change file must be what the bitmaps count (a node's
    /// change file holds what it allocated and freed since it last folded it into the
    /// master). Repair writes the master from the bitmaps and zeroes the change files.
    fn check_statfs(&mut self) -> crate::Result<()> {
        let Some(sb) = self.sb.clone() else { return Ok(()) };
        let Some(counted) = self.rgrps.iter().map(|r| r.counted).collect::<Option<Vec<_>>>() else {
            return Ok(());
        };
        let (free, dinodes) = counted.iter().fold((0u64, 0u64), |(f, d), (a, b)| (f + a, d + b));
        let total: u64 = self.rgrps.iter().map(|r| u64::from(r.e.data_blocks)).sum();
        let master = sb.master_dinode;
        let Ok(m) = self.load_dinode(master) else { return Ok(()) };
        let Ok(entries) = decode_area(&m.payload[..], master) else { return Ok(()) };
        let find = |n: &str| entries.iter().find(|e| e.name == n.as_bytes()).map(|e| e.ino);
        let Some(mino) = find("statfs") else { return Ok(()) };
        let changes: Option<Vec<u64>> = (0..sb.journals).map(|j| find(&format!("statfs_change{j}"))).collect();
        let Some(changes) = changes else { return Ok(()) };
        let mut md = self.load_dinode(mino)?;
        let rec = StatfsMaster::decode(&md, mino);
        let mut sum = StatfsChange::default();
        let mut cds = Vec::new();
        let mut readable = rec.is_ok();
        for &c in &changes {
            let cd = self.load_dinode(c)?;
            match StatfsChange::decode(&cd, c) {
                Ok(ch) => sum = sum.plus(ch),
                Err(_) => readable = false,
            }
            cds.push((c, cd));
        }
        let want = StatfsMaster { total, free, dinodes };
        let found = rec.as_ref().ok().map(|r| {
            let whole = r.plus(sum);
            (whole.total, whole.free, whole.dinodes)
        });
        if readable && found == Some((total, free, dinodes)) {
            return Ok(());
        }
        let what = match (readable, rec) {
            (true, Ok(r)) => format!(
                "statfs: the master record (total {}, free {}, dinodes {}) with the change files ({:+} free, {:+} dinodes) \
                 disagrees with the rgrps (total {total}, free {free}, dinodes {dinodes})",
                r.total, r.free, r.dinodes, sum.free, sum.dinodes
            ),
            _ => "statfs: a master or change record is unreadable".to_string(),
        };
        let idx = self.problem(mino, what, false);
        if self.repair {
            want.store(&mut md);
            self.write(mino, &md.encode(mino))?;
            for (c, mut cd) in cds {
                StatfsChange::default().store(&mut cd);
                self.write(c, &cd.encode(c))?;
            }
            self.mark_fixed(idx);
        }
        Ok(())
    }
}

/// One directory being walked.
struct DirCtx {
    ino: u64,
    names: HashSet<Vec<u8>>,
    /// Entries found.
    count: u64,
    /// Entries that stay (not removed by a repair).
    valid: u64,
    ok: bool,
}

fn apply_edits(entries: &mut Vec<DirEntry>, edits: &[Edit]) {
    for ed in edits {
        match ed {
            Edit::Remove(name) => entries.retain(|e| &e.name != name),
            Edit::SetType(name, t) => {
                for e in entries.iter_mut().filter(|e| &e.name == name) {
                    e.dtype = *t;
                }
            }
        }
    }
}
