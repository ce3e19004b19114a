//! Making a filesystem: `concord mkfs`.
//!
//! mkfs writes straight to the device (there is no journal yet): every rgrp header and
//! bitmap, the system dinodes, the root directory and each journal's first log block,
//! then flushes, then writes both superblocks and flushes again. A crash before the
//! final flush leaves no valid superblock, so a half-made filesystem never mounts.

use std::sync::Arc;

use concord_journal::{BlockDevice, LogRegion};

use crate::format::*;
use crate::{FsError, Result};

/// Smallest journal, in MiB (as mkfs.gfs2).
pub const MIN_JOURNAL_MIB: u32 = 8;
/// Journal size used when none is given and the device is large enough.
pub const DEFAULT_JOURNAL_MIB: u32 = 64;
/// Most journals mkfs makes (the system directories stay stuffed up to this count).
pub const MAX_JOURNALS: u32 = 64;

/// What `concord mkfs` was asked for.
#[derive(Debug, Clone)]
pub struct MkfsOptions {
    pub journals: u32,
    /// None: `DEFAULT_JOURNAL_MIB`, shrunk so that journals take at most a quarter of the device.
    pub journal_mib: Option<u32>,
    pub lockproto: String,
    pub locktable: String,
    pub force: bool,
    /// None: [`DEFAULT_RGRP_BLOCKS`]; for `lock_dlm`, halved (down to
    /// [`MIN_AUTO_RGRP_BLOCKS`]) until every journal's share of the device holds
    /// [`RGRPS_PER_JOURNAL`] rgrps (see [`rgrp_size`]).
    pub rgrp_blocks: Option<u32>,
    pub uuid: [u8; 16],
    pub created: u64,
}

impl Default for MkfsOptions {
    fn default() -> Self {
        MkfsOptions {
            journals: 1,
            journal_mib: None,
            lockproto: LOCKPROTO_NOLOCK.into(),
            locktable: "concord:fs".into(),
            force: false,
            rgrp_blocks: None,
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// What mkfs made, for printing.
#[derive(Debug, Clone)]
pub struct MkfsReport {
    pub sb: Superblock,
    pub data_blocks: u64,
}

/// Names a filesystem or other signature found on a device, if any.
pub fn existing_signature(dev: &dyn BlockDevice) -> Result<Option<String>> {
    let mut b = [0u8; BLOCK_SIZE];
    if dev.len() >= (SB_ADDR + 1) * BLOCK_SIZE as u64 {
        concord_journal::read_block(dev, SB_ADDR, &mut b)?;
        if get_u32(&b, 0) == META_MAGIC {
            return Ok(Some("a Concord filesystem".into()));
        }
        if u32::from_be_bytes([b[0], b[1], b[2], b[3]]) == 0x0116_1970 {
            return Ok(Some("a GFS2 filesystem".into()));
        }
    }
    if dev.len() >= BLOCK_SIZE as u64 {
        concord_journal::read_block(dev, 0, &mut b)?;
        if get_u16(&b, 1080) == 0xEF53 {
            return Ok(Some("an ext2/3/4 filesystem".into()));
        }
        if &b[0..4] == b"XFSB" {
            return Ok(Some("an XFS filesystem".into()));
        }
    }
    Ok(None)
}

struct Geometry {
    journal_blocks: u32,
    first_rgrp: u64,
    rgrp_blocks: u32,
    rgrp_count: u32,
}

/// The smallest rgrp mkfs picks by itself: 32 MiB, GFS2's smallest.
pub const MIN_AUTO_RGRP_BLOCKS: u32 = 8192;

/// Rgrps that each journal's share of a `lock_dlm` device should hold when mkfs picks
/// the rgrp size.
pub const RGRPS_PER_JOURNAL: u64 = 2;

/// The rgrp size when none was asked for. A cluster mount allocates, when nothing ties
/// it to a place, from its journal's share of the rgrps (`Core::spread_allocation`), and
/// two nodes that share an rgrp take its glock from each other: every such demote
/// writes the journal back whole. Large rgrps on a small device leave several journals
/// one rgrp (a 256 MiB device with three journals had two rgrps of 128 MiB, so the
/// nodes of journals 0 and 1 both allocated from the first), so for `lock_dlm` the
/// default is halved until each journal has [`RGRPS_PER_JOURNAL`] of them or the size
/// reaches [`MIN_AUTO_RGRP_BLOCKS`]. mkfs.gfs2 likewise picks smaller rgrps for
/// smaller devices.
fn rgrp_size(room: u64, o: &MkfsOptions) -> u32 {
    if let Some(rb) = o.rgrp_blocks {
        return rb;
    }
    let mut rb = DEFAULT_RGRP_BLOCKS;
    if o.lockproto == LOCKPROTO_DLM {
        let want = RGRPS_PER_JOURNAL * u64::from(o.journals);
        while rb / 2 >= MIN_AUTO_RGRP_BLOCKS && room / u64::from(rb) < want {
            rb /= 2;
        }
    }
    rb
}

fn geometry(total: u64, o: &MkfsOptions) -> Result<Geometry> {
    let min_tail = 64 + 1; // one smallest rgrp + backup superblock
    let min_blocks = |jmib: u32| JOURNAL_AREA_START + u64::from(o.journals) * u64::from(jmib) * 256 + min_tail;
    let jmib = match o.journal_mib {
        Some(m) if m < MIN_JOURNAL_MIB => {
            return Err(FsError::Invalid(format!("journal size {m} MiB is below the minimum of {MIN_JOURNAL_MIB} MiB")))
        }
        Some(m) => m,
        None => {
            let quarter = (total / 4 / 256 / u64::from(o.journals)) as u32;
            quarter.clamp(MIN_JOURNAL_MIB, DEFAULT_JOURNAL_MIB)
        }
    };
    if total < min_blocks(jmib) {
        let need = min_blocks(jmib) * BLOCK_SIZE as u64;
        return Err(FsError::Invalid(format!(
            "device too small: {} bytes; {} journal(s) of {jmib} MiB need at least {need} bytes ({} MiB)",
            total * BLOCK_SIZE as u64,
            o.journals,
            need.div_ceil(1 << 20)
        )));
    }
    let journal_blocks = jmib * 256;
    let first_rgrp = JOURNAL_AREA_START + u64::from(o.journals) * u64::from(journal_blocks);
    let room = total - 1 - first_rgrp;
    let rgrp_blocks = rgrp_size(room, o);
    let rb = u64::from(rgrp_blocks);
    let rgrp_count = (room / rb + u64::from(room % rb >= 64)) as u32;
    Ok(Geometry { journal_blocks, first_rgrp, rgrp_blocks, rgrp_count })
}

/// Makes a filesystem on `dev`. Refuses (writing nothing) when the device already
/// holds a filesystem and `force` is not set, or is too small.
pub fn mkfs(dev: &Arc<dyn BlockDevice>, o: &MkfsOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<MkfsReport> {
    if o.journals == 0 || o.journals > MAX_JOURNALS {
        return Err(FsError::Invalid(format!("journals must be 1..={MAX_JOURNALS}, not {}", o.journals)));
    }
    if o.lockproto != LOCKPROTO_DLM && o.lockproto != LOCKPROTO_NOLOCK {
        return Err(FsError::Invalid(format!("lock protocol must be lock_dlm or lock_nolock, not {:?}", o.lockproto)));
    }
    validate_locktable(&o.locktable).map_err(FsError::Invalid)?;
    if o.rgrp_blocks.is_some_and(|rb| rb < 64) {
        return Err(FsError::Invalid("rgrp size below 64 blocks".into()));
    }
    if !o.force {
        if let Some(what) = existing_signature(dev.as_ref())? {
            return Err(FsError::Exists(format!("the device holds {what}; use --force to overwrite it")));
        }
    }
    let total = dev.len() / BLOCK_SIZE as u64;
    let g = geometry(total, o)?;
    let mut sb = Superblock {
        uuid: o.uuid,
        journals: o.journals,
        journal_blocks: g.journal_blocks,
        total_blocks: total,
        root_dinode: 0,
        master_dinode: 0,
        journal_start: JOURNAL_AREA_START,
        first_rgrp: g.first_rgrp,
        rgrp_blocks: g.rgrp_blocks,
        rgrp_count: g.rgrp_count,
        lockproto: o.lockproto.clone(),
        locktable: o.locktable.clone(),
        created: o.created,
    };
    let rindex: Vec<RindexEntry> = (0..g.rgrp_count)
        .map(|i| {
            let (start, len) = sb.rgrp_extent(i);
            RindexEntry::for_rgrp(start, len)
        })
        .collect();
    let r0 = rindex[0];

    // System dinodes in rgrp 0, in this order.
    let n = o.journals as u64;
    let d = r0.data_start;
    let master = d;
    let root = d + 1;
    let jindex = d + 2;
    let journal_ino = |j: u64| d + 3 + j;
    let rindex_ino = d + 3 + n;
    let statfs_ino = rindex_ino + 1;
    let change_ino = |j: u64| statfs_ino + 1 + j;
    let dinode_count = 3 + n + 2 + n;
    let rindex_bytes: Vec<u8> = rindex.iter().flat_map(|e| e.encode()).collect();
    let rindex_data_blocks =
        if rindex_bytes.len() <= STUFFED_MAX { 0 } else { rindex_bytes.len().div_ceil(BLOCK_SIZE) as u64 };
    if rindex_data_blocks > DINODE_PTRS as u64 {
        return Err(FsError::Invalid("device too large for the rindex file (more than 62,000 rgrps)".into()));
    }
    let used_in_r0 = dinode_count + rindex_data_blocks;
    if used_in_r0 + 16 > u64::from(r0.data_blocks) {
        return Err(FsError::Invalid("device too small for the system files".into()));
    }
    sb.master_dinode = master;
    sb.root_dinode = root;

    let now = Time { sec: o.created as i64, nsec: 0 };
    let sys_dir = |entries: &[DirEntry]| {
        let mut di = Dinode::new(S_IFDIR | 0o755, 0, 0, now, 0);
        di.flags = DIF_SYSTEM;
        di.parent = master;
        di.nlink = 2 + entries.iter().filter(|e| e.dtype == DT_DIR).count() as u32;
        di.dir_entries = entries.len() as u32;
        let mut sorted = entries.to_vec();
        sorted.sort_by(|a, b| (a.hash, &a.name).cmp(&(b.hash, &b.name)));
        // Fits: MAX_JOURNALS entries of at most 40 bytes each.
        let fits = encode_area(&sorted, &mut di.payload[..]);
        assert!(fits, "system directory must fit stuffed");
        di
    };
    let sys_file = |bytes: &[u8]| {
        let mut di = Dinode::new(S_IFREG | 0o600, 0, 0, now, 0);
        di.flags = DIF_SYSTEM;
        di.size = bytes.len() as u64;
        di.payload[..bytes.len()].copy_from_slice(bytes);
        di
    };

    let mut writes: Vec<(u64, Box<Block>)> = Vec::new();
    let mut master_entries = vec![
        DirEntry::new(b"jindex", jindex, DT_DIR),
        DirEntry::new(b"rindex", rindex_ino, DT_REG),
        DirEntry::new(b"statfs", statfs_ino, DT_REG),
    ];
    for j in 0..n {
        master_entries.push(DirEntry::new(format!("statfs_change{j}").as_bytes(), change_ino(j), DT_REG));
    }
    let mut m = sys_dir(&master_entries);
    m.nlink = 3;
    writes.push((master, m.encode(master)));
    let mut rootdi = Dinode::new(S_IFDIR | 0o755, 0, 0, now, 0);
    rootdi.nlink = 2;
    rootdi.parent = root;
    writes.push((root, rootdi.encode(root)));
    let jentries: Vec<DirEntry> =
        (0..n).map(|j| DirEntry::new(format!("journal{j}").as_bytes(), journal_ino(j), DT_REG)).collect();
    writes.push((jindex, sys_dir(&jentries).encode(jindex)));
    for j in 0..n {
        let mut jd = Dinode::new(S_IFREG | 0o600, 0, 0, now, 0);
        jd.flags = DIF_SYSTEM | DIF_JOURNAL;
        jd.size = u64::from(g.journal_blocks) * BLOCK_SIZE as u64;
        jd.set_journal_extent(sb.journal_addr(j as u32), u64::from(g.journal_blocks));
        writes.push((journal_ino(j), jd.encode(journal_ino(j))));
    }
    let data_blocks: u64 = rindex.iter().map(|e| u64::from(e.data_blocks)).sum();
    let free_total = data_blocks - used_in_r0;
    let mut stat = [0u8; 24];
    put_u64(&mut stat, 0, data_blocks);
    put_u64(&mut stat, 8, free_total);
    put_u64(&mut stat, 16, dinode_count);
    writes.push((statfs_ino, sys_file(&stat).encode(statfs_ino)));
    for j in 0..n {
        writes.push((change_ino(j), sys_file(&[0u8; 16]).encode(change_ino(j))));
    }
    // rindex: stuffed, or data blocks right after the dinodes.
    if rindex_data_blocks == 0 {
        writes.push((rindex_ino, sys_file(&rindex_bytes).encode(rindex_ino)));
    } else {
        let mut di = Dinode::new(S_IFREG | 0o600, 0, 0, now, 0);
        di.flags = DIF_SYSTEM;
        di.size = rindex_bytes.len() as u64;
        di.height = 1;
        di.blocks = rindex_data_blocks;
        for (i, chunk) in rindex_bytes.chunks(BLOCK_SIZE).enumerate() {
            let addr = d + dinode_count + i as u64;
            di.set_ptr(i, addr);
            let mut blk = Box::new([0u8; BLOCK_SIZE]);
            blk[..chunk.len()].copy_from_slice(chunk);
            writes.push((addr, blk));
        }
        writes.push((rindex_ino, di.encode(rindex_ino)));
    }
    for (addr, b) in &writes {
        concord_journal::write_block(dev.as_ref(), *addr, b)?;
    }

    // Rgrp headers and bitmaps.
    let total_steps = u64::from(g.rgrp_count) + u64::from(o.journals);
    for (i, e) in rindex.iter().enumerate() {
        let used = if i == 0 { used_in_r0 } else { 0 };
        let dinodes = if i == 0 { dinode_count } else { 0 };
        write_rgrp(dev.as_ref(), i as u32, e, used, dinodes)?;
        progress(i as u64 + 1, total_steps);
    }
    // Journals are written in full once, so that an image file holds real blocks there
    // (no allocation, and no filesystem metadata to sync, on every log write later).
    let zeros = vec![0u8; 1 << 20];
    for j in 0..o.journals {
        let region = LogRegion { start: sb.journal_addr(j), blocks: u64::from(g.journal_blocks) };
        let (mut off, end) = (region.start * BLOCK_SIZE as u64, (region.start + region.blocks) * BLOCK_SIZE as u64);
        while off < end {
            let n = (end - off).min(zeros.len() as u64) as usize;
            dev.write_at(off, &zeros[..n])?;
            off += n as u64;
        }
        concord_journal::format(dev.as_ref(), region, sb.journal_nonce(j))?;
        progress(u64::from(g.rgrp_count) + u64::from(j) + 1, total_steps);
    }
    dev.flush()?;
    concord_journal::write_block(dev.as_ref(), sb.backup_addr(), &sb.encode(sb.backup_addr()))?;
    concord_journal::write_block(dev.as_ref(), SB_ADDR, &sb.encode(SB_ADDR))?;
    dev.flush()?;
    Ok(MkfsReport { sb, data_blocks })
}

/// Writes rgrp `index`'s header and bitmaps. In rgrp 0 the first `dinodes` data blocks
/// are dinodes and the next `used - dinodes` are used (rindex data).
fn write_rgrp(dev: &dyn BlockDevice, index: u32, e: &RindexEntry, used: u64, dinodes: u64) -> Result<()> {
    let meta = 1 + e.bitmap_blocks as u64;
    let mut bits = vec![0u8; (e.bitmap_blocks as usize) * (BLOCK_SIZE - HDR_LEN)];
    let mut set = |k: u64, s: BlockState| {
        let byte = (k / 4) as usize;
        let shift = 2 * (k % 4);
        bits[byte] = (bits[byte] & !(3 << shift)) | ((s as u8) << shift);
    };
    for k in 0..meta {
        set(k, BlockState::Used);
    }
    for k in 0..used {
        set(meta + k, if k < dinodes { BlockState::Dinode } else { BlockState::Used });
    }
    let h = RgrpHeader {
        index,
        length: e.length,
        bitmap_blocks: e.bitmap_blocks,
        free: e.data_blocks - used as u32,
        dinodes: dinodes as u32,
        unlinked: 0,
        igeneration: 1,
    };
    concord_journal::write_block(dev, e.addr, &h.encode(e.addr))?;
    let per = BLOCK_SIZE - HDR_LEN;
    for i in 0..e.bitmap_blocks as usize {
        let addr = e.addr + 1 + i as u64;
        concord_journal::write_block(dev, addr, &encode_bitmap(&bits[i * per..(i + 1) * per], addr, e.addr))?;
    }
    Ok(())
}
