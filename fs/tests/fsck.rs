//! fsck on memory images: clean filesystems stay clean, every kind of corruption is found
//! and named by block, repairable ones are repaired, and `-n` never writes a byte.

use std::sync::{Arc, OnceLock};

use concord_fs::format::*;
use concord_fs::fsck::{fsck, FsckOptions, FsckReport};
use concord_fs::mkfs::{mkfs, MkfsOptions};
use concord_fs::*;
use concord_journal::{BlockDevice, MemDevice};

struct Img {
    mem: Arc<MemDevice>,
    dev: Arc<dyn BlockDevice>,
}

impl Img {
    fn from_vec(v: Vec<u8>) -> Img {
        let mem = Arc::new(MemDevice::from_vec(v));
        let dev: Arc<dyn BlockDevice> = mem.clone();
        Img { mem, dev }
    }

    fn fresh() -> Img {
        let img = Img::from_vec(vec![0u8; 64 << 20]);
        let o = MkfsOptions { journals: 2, journal_mib: Some(8), rgrp_blocks: Some(2048), ..Default::default() };
        mkfs(&img.dev, &o, &mut |_, _| {}).expect("mkfs");
        img
    }

    fn mount(&self) -> Filesystem {
        Filesystem::mount(self.dev.clone(), &MountOptions::default()).expect("mount")
    }

    /// fsck -n, checking that it wrote nothing.
    fn check(&self) -> FsckReport {
        let before = self.mem.snapshot();
        let r = fsck(&self.dev, &FsckOptions { repair: false }, &mut |_, _| {}).expect("fsck -n");
        assert!(before == self.mem.snapshot(), "fsck -n changed the image");
        r
    }

    fn repair(&self) -> FsckReport {
        fsck(&self.dev, &FsckOptions { repair: true }, &mut |_, _| {}).expect("fsck -y")
    }

    fn block(&self, addr: u64) -> Box<Block> {
        let mut b = Box::new([0u8; BLOCK_SIZE]);
        concord_journal::read_block(self.dev.as_ref(), addr, &mut b).unwrap();
        b
    }

    fn put(&self, addr: u64, b: &Block) {
        concord_journal::write_block(self.dev.as_ref(), addr, b).unwrap();
    }

    fn flip(&self, addr: u64, off: usize) {
        let mut b = self.block(addr);
        b[off] ^= 0x5a;
        self.put(addr, &b);
    }

    fn sb(&self) -> Superblock {
        read_superblock(self.dev.as_ref()).unwrap()
    }

    fn dinode(&self, ino: u64) -> Dinode {
        Dinode::decode(&self.block(ino), ino).unwrap()
    }

    fn put_dinode(&self, ino: u64, d: &Dinode) {
        self.put(ino, &d.encode(ino));
    }

    /// Blocks of a type owned by `owner` (scanning the whole image).
    fn blocks_of(&self, ty: BlockType, owner: u64) -> Vec<u64> {
        let img = self.mem.snapshot();
        img.chunks_exact(BLOCK_SIZE)
            .enumerate()
            .filter_map(|(a, c)| {
                let b: &Block = c.try_into().unwrap();
                match peek(b, a as u64) {
                    Ok(h) if h.ty == ty && h.owner == owner => Some(a as u64),
                    _ => None,
                }
            })
            .collect()
    }

    /// Sets a block's bitmap state directly (re-encoding the bitmap, not the header).
    fn set_state(&self, addr: u64, s: BlockState) {
        let sb = self.sb();
        let ri = (addr - sb.first_rgrp) / u64::from(sb.rgrp_blocks);
        let (start, _) = sb.rgrp_extent(ri as u32);
        let k = addr - start;
        let baddr = start + 1 + k / u64::from(BITMAP_BLOCKS_PER);
        let kb = k % u64::from(BITMAP_BLOCKS_PER);
        let b = self.block(baddr);
        let mut bits = decode_bitmap(&b, baddr).unwrap().to_vec();
        let (byte, shift) = ((kb / 4) as usize, 2 * (kb % 4));
        bits[byte] = (bits[byte] & !(3 << shift)) | ((s as u8) << shift);
        self.put(baddr, &encode_bitmap(&bits, baddr, start));
    }

    fn state(&self, addr: u64) -> BlockState {
        let sb = self.sb();
        let ri = (addr - sb.first_rgrp) / u64::from(sb.rgrp_blocks);
        let (start, _) = sb.rgrp_extent(ri as u32);
        let k = addr - start;
        let baddr = start + 1 + k / u64::from(BITMAP_BLOCKS_PER);
        let kb = k % u64::from(BITMAP_BLOCKS_PER);
        let b = self.block(baddr);
        BlockState::from_bits(decode_bitmap(&b, baddr).unwrap()[(kb / 4) as usize] >> (2 * (kb % 4)))
    }
}

/// Inode numbers in the populated image.
#[derive(Debug, Clone, Copy)]
struct Inos {
    root: u64,
    small: u64,
    mapped: u64,
    mapped2: u64,
    sparse: u64,
    big_dir: u64,
    xattr_file: u64,
    sub: u64,
}

fn populated() -> (Img, Inos) {
    static IMAGE: OnceLock<(Vec<u8>, Inos)> = OnceLock::new();
    let (v, inos) = IMAGE.get_or_init(|| {
        let img = Img::fresh();
        let fs = img.mount();
        let root = fs.root();
        let small = fs.create(root, b"small", 0o644, 0, 0).unwrap().ino;
        fs.write(small, 0, b"hello").unwrap();
        let mapped = fs.create(root, b"mapped", 0o644, 0, 0).unwrap().ino;
        fs.write(mapped, 0, &vec![7u8; 20_000]).unwrap();
        let mapped2 = fs.create(root, b"mapped2", 0o644, 0, 0).unwrap().ino;
        fs.write(mapped2, 0, &vec![8u8; 20_000]).unwrap();
        let sparse = fs.create(root, b"sparse", 0o644, 0, 0).unwrap().ino;
        fs.write(sparse, 0, b"head").unwrap();
        fs.write(sparse, 5 << 30, b"tail far away").unwrap();
        let xattr_file = fs.create(root, b"xa", 0o644, 0, 0).unwrap().ino;
        fs.setxattr(xattr_file, b"user.color", b"blue", XattrSet::Any).unwrap();
        fs.setxattr(xattr_file, b"user.size", b"large", XattrSet::Any).unwrap();
        fs.symlink(root, b"link", b"small", 0, 0).unwrap();
        fs.link(small, root, b"small-again").unwrap();
        let sub = fs.mkdir(root, b"sub", 0o755, 0, 0).unwrap().ino;
        let subsub = fs.mkdir(sub, b"deeper", 0o755, 0, 0).unwrap().ino;
        fs.link(mapped, subsub, b"mapped-link").unwrap();
        fs.mknod(sub, b"fifo", S_IFIFO | 0o644, 0, 0, 0).unwrap();
        let big_dir = fs.mkdir(root, b"big", 0o755, 0, 0).unwrap().ino;
        for i in 0..5000 {
            fs.create(big_dir, format!("entry-{i:05}").as_bytes(), 0o644, 0, 0).unwrap();
        }
        fs.unlink(big_dir, b"entry-00042").unwrap();
        fs.unmount().unwrap();
        drop(fs);
        let inos = Inos { root, small, mapped, mapped2, sparse, big_dir, xattr_file, sub };
        (img.mem.snapshot(), inos)
    });
    (Img::from_vec(v.clone()), *inos)
}

fn names(r: &FsckReport) -> String {
    r.problems.iter().map(|p| format!("  block {}: {} (fixed: {})\n", p.block, p.what, p.fixed)).collect()
}

/// fsck -n exits 4 and names `block`.
fn assert_found(img: &Img, block: u64) -> FsckReport {
    let r = img.check();
    assert_eq!(r.exit_code(), 4, "expected problems:\n{}", names(&r));
    assert!(r.problems.iter().any(|p| p.block == block), "no problem names block {block}:\n{}", names(&r));
    r
}

/// fsck -y fixes everything (exit 1), then fsck -n is clean.
fn assert_repaired(img: &Img) {
    let r = img.repair();
    assert_eq!(r.exit_code(), 1, "fsck -y left problems:\n{}", names(&r));
    let r = img.check();
    assert_eq!(r.exit_code(), 0, "not clean after fsck -y:\n{}", names(&r));
}

#[test]
fn fresh_filesystem_is_clean() {
    let img = Img::fresh();
    let mut calls = 0;
    let before = img.mem.snapshot();
    let r = fsck(&img.dev, &FsckOptions { repair: false }, &mut |_, _| calls += 1).unwrap();
    assert!(before == img.mem.snapshot());
    assert!(r.is_clean(), "{}", names(&r));
    assert_eq!(r.exit_code(), 0);
    assert!(calls > 0, "progress is reported");
    // master, root, jindex, 2 journals, rindex, statfs, 2 statfs_change.
    assert_eq!(r.inodes, 9);
    assert_eq!(r.dirs, 3);
    // -y on a clean filesystem writes nothing either.
    let r = img.repair();
    assert_eq!(r.exit_code(), 0, "{}", names(&r));
    assert!(before == img.mem.snapshot());
}

#[test]
fn populated_filesystem_is_clean() {
    let (img, _) = populated();
    let r = img.check();
    assert_eq!(r.exit_code(), 0, "{}", names(&r));
    assert!(r.inodes > 5000);
    assert_eq!(r.dirs, 6); // master, jindex, root, sub, sub/deeper, big
    let before = img.mem.snapshot();
    assert_eq!(img.repair().exit_code(), 0);
    assert!(before == img.mem.snapshot());
}

#[test]
fn no_superblock_is_an_operational_error() {
    let img = Img::from_vec(vec![0u8; 8 << 20]);
    assert!(fsck(&img.dev, &FsckOptions { repair: false }, &mut |_, _| {}).is_err());
    assert!(img.mem.snapshot().iter().all(|&b| b == 0));
}

#[test]
fn flipped_primary_superblock_is_restored_from_the_backup() {
    let (img, _) = populated();
    img.flip(SB_ADDR, 100);
    assert_found(&img, SB_ADDR);
    assert_repaired(&img);
}

#[test]
fn flipped_backup_superblock_is_rewritten() {
    let (img, _) = populated();
    let backup = img.sb().backup_addr();
    img.flip(backup, 60);
    assert_found(&img, backup);
    assert_repaired(&img);
}

/// The statfs master record plus the change files must count what the bitmaps count
/// (populated_filesystem_is_clean checks that mounts keep it so); a change file that
/// says otherwise is named, and repair rewrites the master and zeroes the changes.
#[test]
fn statfs_records_that_disagree_with_the_bitmaps_are_rewritten() {
    let (img, _) = populated();
    let sb = img.sb();
    let master = img.dinode(sb.master_dinode);
    let entries = decode_area(&master.payload[..], sb.master_dinode).unwrap();
    let ino = |n: &str| entries.iter().find(|e| e.name == n.as_bytes()).unwrap().ino;
    let (mino, c1) = (ino("statfs"), ino("statfs_change1"));
    let m = StatfsMaster::decode(&img.dinode(mino), mino).unwrap();
    assert!(m.free < m.total && m.dinodes > 5000, "the populated image's allocations reached the master: {m:?}");
    let mut d = img.dinode(c1);
    StatfsChange { free: -5, dinodes: 1 }.store(&mut d);
    img.put_dinode(c1, &d);
    assert_found(&img, mino);
    assert_repaired(&img);
    assert_eq!(StatfsMaster::decode(&img.dinode(mino), mino).unwrap(), m, "rewritten from the bitmaps");
    assert!(StatfsChange::decode(&img.dinode(c1), c1).unwrap().is_zero());
}

#[test]
fn flipped_rgrp_header_is_rebuilt() {
    let (img, _) = populated();
    let sb = img.sb();
    for i in [0, 1] {
        let (addr, _) = sb.rgrp_extent(i);
        img.flip(addr, 44);
        assert_found(&img, addr);
    }
    assert_repaired(&img);
}

#[test]
fn flipped_bitmap_is_rebuilt() {
    let (img, _) = populated();
    let (addr, _) = img.sb().rgrp_extent(0);
    img.flip(addr + 1, 500);
    assert_found(&img, addr + 1);
    assert_repaired(&img);
}

#[test]
fn flipped_dinode_is_named_and_its_entry_removed() {
    let (img, inos) = populated();
    img.flip(inos.mapped2, 2000);
    assert_found(&img, inos.mapped2);
    assert_repaired(&img);
    let fs = img.mount();
    assert!(matches!(fs.lookup(inos.root, b"mapped2"), Err(FsError::NotFound)));
}

#[test]
fn flipped_directory_dinode_is_named() {
    let (img, inos) = populated();
    img.flip(inos.sub, 300);
    assert_found(&img, inos.sub);
}

#[test]
fn flipped_indirect_block_is_named() {
    let (img, inos) = populated();
    assert!(img.dinode(inos.sparse).height >= 3);
    let ind = img.blocks_of(BlockType::Indirect, inos.sparse);
    assert!(ind.len() >= 2, "{ind:?}");
    for &a in &ind {
        let (img, _) = populated();
        img.flip(a, 3000);
        assert_found(&img, a);
    }
}

#[test]
fn flipped_leaf_is_named() {
    let (img, inos) = populated();
    let leaves = img.blocks_of(BlockType::DirLeaf, inos.big_dir);
    assert!(leaves.len() > 10);
    img.flip(leaves[leaves.len() / 2], 1000);
    assert_found(&img, leaves[leaves.len() / 2]);
}

#[test]
fn flipped_hash_table_is_named() {
    let (img, inos) = populated();
    let tables = img.blocks_of(BlockType::DirHash, inos.big_dir);
    assert!(!tables.is_empty());
    img.flip(tables[0], 40);
    assert_found(&img, tables[0]);
}

#[test]
fn flipped_xattr_block_is_named() {
    let (img, inos) = populated();
    let xa = img.dinode(inos.xattr_file).xattr;
    assert_ne!(xa, 0);
    img.flip(xa, 45);
    assert_found(&img, xa);
}

#[test]
fn leaked_block_is_freed() {
    let (img, _) = populated();
    let (start, len) = img.sb().rgrp_extent(3);
    let leak = (start + 100..start + u64::from(len)).find(|&a| img.state(a) == BlockState::Free).unwrap();
    img.set_state(leak, BlockState::Used);
    let r = assert_found(&img, leak);
    assert!(r.problems.iter().any(|p| p.what.contains("leak")), "{}", names(&r));
    assert_repaired(&img);
    assert_eq!(img.state(leak), BlockState::Free);
}

#[test]
fn referenced_block_marked_free_is_marked_used() {
    let (img, inos) = populated();
    let data = img.dinode(inos.mapped).ptr(1);
    assert_ne!(data, 0);
    img.set_state(data, BlockState::Free);
    assert_found(&img, data);
    assert_repaired(&img);
    assert_eq!(img.state(data), BlockState::Used);
}

#[test]
fn double_use_is_reported_and_left() {
    let (img, inos) = populated();
    let shared = img.dinode(inos.mapped).ptr(2);
    let mut d = img.dinode(inos.mapped2);
    d.set_ptr(2, shared);
    img.put_dinode(inos.mapped2, &d);
    let r = assert_found(&img, shared);
    assert!(r.problems.iter().any(|p| p.block == shared && p.what.contains("twice")), "{}", names(&r));
    let r = img.repair();
    assert_eq!(r.exit_code(), 4, "double use is not repaired:\n{}", names(&r));
}

#[test]
fn wrong_link_counts_are_fixed() {
    let (img, inos) = populated();
    let mut d = img.dinode(inos.small);
    assert_eq!(d.nlink, 2);
    d.nlink = 5;
    img.put_dinode(inos.small, &d);
    let mut d = img.dinode(inos.sub);
    d.nlink = 2;
    img.put_dinode(inos.sub, &d);
    assert_found(&img, inos.small);
    assert_found(&img, inos.sub);
    assert_repaired(&img);
    assert_eq!(img.dinode(inos.small).nlink, 2);
    assert_eq!(img.dinode(inos.sub).nlink, 3);
}

#[test]
fn wrong_counts_in_a_dinode_are_fixed() {
    let (img, inos) = populated();
    let mut d = img.dinode(inos.sparse);
    d.blocks += 3;
    img.put_dinode(inos.sparse, &d);
    let mut d = img.dinode(inos.big_dir);
    d.dir_entries += 1;
    img.put_dinode(inos.big_dir, &d);
    let mut d = img.dinode(inos.sub);
    d.parent = inos.big_dir;
    img.put_dinode(inos.sub, &d);
    assert_found(&img, inos.sparse);
    assert_found(&img, inos.big_dir);
    assert_found(&img, inos.sub);
    assert_repaired(&img);
    assert_eq!(img.dinode(inos.big_dir).dir_entries, 4999);
    assert_eq!(img.dinode(inos.sub).parent, inos.root);
}

#[test]
fn dangling_entry_is_removed() {
    let (img, inos) = populated();
    let (start, len) = img.sb().rgrp_extent(2);
    let free = (start + 10..start + u64::from(len)).find(|&a| img.state(a) == BlockState::Free).unwrap();
    let mut root = img.dinode(inos.root);
    let mut entries = decode_area(&root.payload[..], inos.root).unwrap();
    entries.push(DirEntry::new(b"ghost", free, DT_REG));
    entries.sort_by(|a, b| (a.hash, &a.name).cmp(&(b.hash, &b.name)));
    assert!(encode_area(&entries, &mut root.payload[..]));
    root.dir_entries += 1;
    img.put_dinode(inos.root, &root);
    let r = assert_found(&img, inos.root);
    assert!(r.problems.iter().any(|p| p.what.contains("ghost")), "{}", names(&r));
    assert_repaired(&img);
    let fs = img.mount();
    assert!(matches!(fs.lookup(inos.root, b"ghost"), Err(FsError::NotFound)));
    assert!(fs.lookup(inos.root, b"small").is_ok());
}

#[test]
fn wrong_entry_type_is_fixed() {
    let (img, inos) = populated();
    let mut root = img.dinode(inos.root);
    let mut entries = decode_area(&root.payload[..], inos.root).unwrap();
    entries.iter_mut().find(|e| e.name == b"small").unwrap().dtype = DT_DIR;
    assert!(encode_area(&entries, &mut root.payload[..]));
    img.put_dinode(inos.root, &root);
    assert_found(&img, inos.root);
    assert_repaired(&img);
}

#[test]
fn dirty_journal_is_reported_with_n_and_replayed_with_y() {
    let img = Img::fresh();
    let fs = img.mount();
    let root = fs.root();
    let f = fs.create(root, b"logged", 0o644, 0, 0).unwrap();
    fs.write(f.ino, 0, &vec![3u8; 10_000]).unwrap();
    fs.mkdir(root, b"d", 0o755, 0, 0).unwrap();
    fs.fsync().unwrap();
    drop(fs); // no unmount: the journal stays dirty
    let r = img.check();
    assert_eq!(r.exit_code(), 4, "{}", names(&r));
    assert_eq!(r.dirty_journals, vec![0]);
    assert!(r.replayed.is_empty());
    // Only the journal is reported: the check looks through the log.
    assert_eq!(r.problems.len(), 1, "{}", names(&r));
    let r = img.repair();
    assert_eq!(r.exit_code(), 1, "{}", names(&r));
    assert_eq!(r.replayed, vec![0]);
    let r = img.check();
    assert_eq!(r.exit_code(), 0, "{}", names(&r));
    let fs = img.mount();
    assert_eq!(fs.read(fs.lookup(root, b"logged").unwrap().ino, 0, 20_000).unwrap(), vec![3u8; 10_000]);
}

/// An inode left unlinked by a mount that died with it open is an orphan: named by
/// fsck -n, freed by fsck -y. (A clean unmount frees such inodes itself:
/// `unlinked_while_open_is_freed_by_a_clean_unmount`.)
#[test]
fn orphan_is_freed() {
    let (img, inos) = populated();
    let fs = img.mount();
    fs.open(inos.mapped2).unwrap();
    fs.unlink(inos.root, b"mapped2").unwrap();
    // The mount dies with the file open (a clean unmount would free it): everything
    // written home, the journal not marked clean.
    fs.checkpoint().unwrap();
    drop(fs);
    assert_eq!(img.state(inos.mapped2), BlockState::Unlinked);
    let r = assert_found(&img, inos.mapped2);
    assert!(r.problems.iter().any(|p| p.what.contains("orphan")), "{}", names(&r));
    assert_repaired(&img);
    assert_eq!(img.state(inos.mapped2), BlockState::Free);
}

#[test]
fn random_corruption_never_panics_and_n_never_writes() {
    let (base, _) = populated();
    let image = base.mem.snapshot();
    // Every metadata block address, from a scan.
    let meta: Vec<u64> = image
        .chunks_exact(BLOCK_SIZE)
        .enumerate()
        .filter(|(a, c)| peek(<&Block>::try_from(*c).unwrap(), *a as u64).is_ok())
        .map(|(a, _)| a as u64)
        .collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..40 {
        let img = Img::from_vec(image.clone());
        for _ in 0..3 {
            let a = meta[(next() % meta.len() as u64) as usize];
            let mut b = img.block(a);
            let off = (next() % BLOCK_SIZE as u64) as usize;
            b[off] = next() as u8;
            if next() % 2 == 0 {
                // Keep the checksum valid so the fields themselves are checked.
                let h = peek(&img.block(a), a).unwrap();
                seal(&mut b, h.ty, a, h.owner);
            }
            img.put(a, &b);
        }
        let before = img.mem.snapshot();
        if let Ok(r) = fsck(&img.dev, &FsckOptions { repair: false }, &mut |_, _| {}) {
            assert!(r.exit_code() == 0 || r.exit_code() == 4);
        }
        assert!(before == img.mem.snapshot(), "fsck -n changed the image");
        let _ = fsck(&img.dev, &FsckOptions { repair: true }, &mut |_, _| {});
        let _ = fsck(&img.dev, &FsckOptions { repair: false }, &mut |_, _| {});
    }
}

/// A truncate up past what height 1 maps (492 blocks), of an
/// empty file and of one with data near its start, leaves a clean filesystem whose
/// trees are tall enough, and the bytes read back (data, then zeros).
#[test]
fn truncate_up_raises_the_block_map_and_stays_clean() {
    let img = Img::fresh();
    let fs = img.mount();
    let root = fs.root();
    let empty = fs.create(root, b"empty", 0o644, 0, 0).unwrap().ino;
    fs.setattr(empty, &SetAttr { size: Some(3_000_000), ..Default::default() }).unwrap();
    let head = fs.create(root, b"head", 0o644, 0, 0).unwrap().ino;
    fs.write(head, 0, &vec![9u8; 10_000]).unwrap();
    fs.setattr(head, &SetAttr { size: Some(3_000_000), ..Default::default() }).unwrap();
    // Two levels up at once (past 976 MiB), then back down and up again.
    let tall = fs.create(root, b"tall", 0o644, 0, 0).unwrap().ino;
    fs.write(tall, 4096, b"x").unwrap();
    fs.setattr(tall, &SetAttr { size: Some(2 << 30), ..Default::default() }).unwrap();
    fs.setattr(tall, &SetAttr { size: Some(5000), ..Default::default() }).unwrap();
    fs.setattr(tall, &SetAttr { size: Some(3_000_000), ..Default::default() }).unwrap();
    let back = fs.read(head, 9_990, 20).unwrap();
    assert_eq!(&back[..10], &[9u8; 10][..]);
    assert_eq!(&back[10..], &[0u8; 10][..]);
    fs.unmount().unwrap();
    drop(fs);
    assert_eq!(img.dinode(empty).height, 2);
    assert_eq!(img.dinode(head).height, 2);
    assert_eq!(img.dinode(head).blocks, 4, "3 data blocks and the new indirect block");
    let r = img.check();
    assert_eq!(r.exit_code(), 0, "{}", names(&r));
}

/// A file whose tree is too low for its size (as older binaries left them) is named by
/// fsck -n and raised by fsck -y, keeping its data.
#[test]
fn a_block_map_too_low_for_the_size_is_raised() {
    let img = Img::fresh();
    let fs = img.mount();
    let root = fs.root();
    let ino = fs.create(root, b"f", 0o644, 0, 0).unwrap().ino;
    fs.write(ino, 0, &vec![5u8; 8192]).unwrap();
    let hollow = fs.create(root, b"hollow", 0o644, 0, 0).unwrap().ino;
    fs.write(hollow, 0, &vec![6u8; 5000]).unwrap();
    fs.unmount().unwrap();
    drop(fs);
    // Forge what the old truncate did: a size beyond height 1, height left at 1.
    for i in [ino, hollow] {
        let mut d = img.dinode(i);
        assert_eq!(d.height, 1);
        d.size = 3_000_000;
        img.put_dinode(i, &d);
    }
    // And one without any pointer (grows without a block).
    let mut d = img.dinode(hollow);
    let data = [d.ptr(0), d.ptr(1)];
    d.set_ptr(0, 0);
    d.set_ptr(1, 0);
    d.blocks = 0;
    img.put_dinode(hollow, &d);
    for a in data {
        img.set_state(a, BlockState::Free);
    }
    let r = assert_found(&img, ino);
    assert!(r.problems.iter().any(|p| p.what.contains("beyond what height 1 maps")), "{}", names(&r));
    assert_repaired(&img);
    let d = img.dinode(ino);
    assert_eq!((d.height, d.blocks), (2, 3));
    assert_eq!(img.dinode(hollow).height, 2);
    let fs = img.mount();
    assert_eq!(fs.read(ino, 8190, 4).unwrap(), vec![5, 5, 0, 0]);
    assert_eq!(fs.getattr(ino).unwrap().size, 3_000_000);
}

/// Symlink targets up to 4095 bytes: inline up to 3936, in a block of their own beyond;
/// read back exactly, checked by fsck, and the block freed with the link.
#[test]
fn long_symlinks_are_kept_checked_and_freed() {
    let img = Img::fresh();
    let fs = img.mount();
    let root = fs.root();
    let free0 = fs.statfs().unwrap().bfree;
    let mut links = Vec::new();
    for len in [1023usize, 1024, 3936, 3937, 4095] {
        let target: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
        let name = format!("l{len}");
        let a = fs.symlink(root, name.as_bytes(), &target, 0, 0).unwrap();
        assert_eq!(a.size, len as u64);
        links.push((name, a.ino, target));
    }
    assert!(matches!(fs.symlink(root, b"l4096", &[b'x'; 4096], 0, 0), Err(FsError::NameTooLong)));
    fs.unmount().unwrap();
    drop(fs);
    let r = img.check();
    assert_eq!(r.exit_code(), 0, "{}", names(&r));
    assert_eq!(img.dinode(links[3].1).height, 1, "3937 bytes do not fit in the dinode");
    assert_eq!(img.dinode(links[2].1).height, 0);
    let fs = img.mount();
    for (_, ino, target) in &links {
        assert_eq!(&fs.readlink(*ino).unwrap(), target);
    }
    for (name, _, _) in &links {
        fs.unlink(root, name.as_bytes()).unwrap();
    }
    fs.unmount().unwrap();
    drop(fs);
    let fs = img.mount();
    assert_eq!(fs.statfs().unwrap().bfree, free0, "the long targets' blocks are freed");
    fs.unmount().unwrap();
    drop(fs);
    let r = img.check();
    assert_eq!(r.exit_code(), 0, "{}", names(&r));
}

#[test]
fn unlinked_while_open_is_freed_by_a_clean_unmount() {
    let (img, inos) = populated();
    let fs = img.mount();
    fs.open(inos.mapped2).unwrap();
    fs.unlink(inos.root, b"mapped2").unwrap();
    fs.unmount().unwrap();
    drop(fs);
    assert_eq!(img.state(inos.mapped2), BlockState::Free);
    let r = img.check();
    assert_eq!(r.exit_code(), 0, "{}", names(&r));
}
