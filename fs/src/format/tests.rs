use super::*;
use proptest::prelude::*;

fn sample_sb() -> Superblock {
    Superblock {
        uuid: [7; 16],
        journals: 2,
        journal_blocks: 2048,
        total_blocks: 100_000,
        root_dinode: 5000,
        master_dinode: 5001,
        journal_start: JOURNAL_AREA_START,
        first_rgrp: JOURNAL_AREA_START + 4096,
        rgrp_blocks: 32768,
        rgrp_count: 3,
        lockproto: LOCKPROTO_DLM.into(),
        locktable: "alpha:fs1".into(),
        created: 1,
    }
}

#[test]
fn superblock_round_trip_and_backup_address() {
    let sb = sample_sb();
    let b = sb.encode(SB_ADDR);
    assert_eq!(Superblock::decode(&b, SB_ADDR, 100_000).unwrap(), sb);
    // The same bytes read at another address are a misdirected write.
    assert!(matches!(Superblock::decode(&b, 17, 100_000), Err(FormatError::BadAddr { .. })));
    // A device smaller than the superblock says is refused.
    assert!(Superblock::decode(&b, SB_ADDR, 99_999).is_err());
}

#[test]
fn flipped_byte_is_caught_by_checksum() {
    let sb = sample_sb();
    for off in [0usize, 9, 40, 100, 200, 4095] {
        let mut b = sb.encode(SB_ADDR);
        b[off] ^= 0x40;
        assert!(Superblock::decode(&b, SB_ADDR, 100_000).is_err(), "flip at {off} undetected");
    }
}

#[test]
fn unknown_version_is_named() {
    let mut b = sample_sb().encode(SB_ADDR);
    put_u32(&mut b[..], 32, 2);
    let crc = block_crc(&b);
    put_u32(&mut b[..], 24, crc);
    let e = Superblock::decode(&b, SB_ADDR, 100_000).unwrap_err();
    assert!(matches!(e, FormatError::UnknownVersion { found: 2, .. }), "{e}");
}

#[test]
fn map_path_matches_capacity() {
    assert_eq!(map_path(0, 1), vec![0]);
    assert_eq!(map_path(491, 1), vec![491]);
    assert_eq!(map_path(492, 2), vec![0, 492]);
    assert_eq!(map_path(508, 2), vec![1, 0]);
    assert_eq!(height_for(491), 1);
    assert_eq!(height_for(492), 2);
    assert!(max_file_size(4) > 1 << 40, "1 TiB files need height 4 at most");
}

#[test]
fn hash_index_uses_top_bits() {
    let h = name_hash(b"hello");
    assert!((3..1 << 63).contains(&h));
    assert_eq!(hash_index(h, 0), 0);
    assert_eq!(hash_index(h, 1), h >> 62);
    assert_eq!(hash_index(u64::MAX >> 1, 17), (1 << 17) - 1);
}

fn entries(names: &[Vec<u8>]) -> Vec<DirEntry> {
    let mut v: Vec<DirEntry> =
        names.iter().enumerate().map(|(i, n)| DirEntry::new(n, 100 + i as u64, DT_REG)).collect();
    v.sort_by(|a, b| (a.hash, &a.name).cmp(&(b.hash, &b.name)));
    v
}

fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>().prop_filter("no / or NUL", |c| *c != b'/' && *c != 0), 1..60)
        .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

proptest! {
    #[test]
    fn dinode_round_trip(mode in prop::sample::select(vec![S_IFREG|0o644, S_IFDIR|0o755, S_IFIFO|0o600]),
                         uid: u32, gid: u32, nlink: u32, size in 0u64..3936, sec: i64, nsec in 0u32..1_000_000_000,
                         addr in 1u64..1<<40, payload in proptest::collection::vec(any::<u8>(), STUFFED_MAX)) {
        let mut d = Dinode::new(mode, uid, gid, Time { sec, nsec }, 9);
        d.nlink = nlink;
        d.size = size;
        d.payload.copy_from_slice(&payload);
        let b = d.encode(addr);
        prop_assert_eq!(Dinode::decode(&b, addr).unwrap(), d);
    }

    #[test]
    fn leaf_round_trip(names in proptest::collection::vec(name_strategy(), 0..40), depth in 0u16..=17, next: u64) {
        let leaf = Leaf { depth, next, entries: entries(&names) };
        if let Some(b) = leaf.encode(77, 5) {
            prop_assert_eq!(Leaf::decode(&b, 77, 5).unwrap(), leaf);
        } else {
            prop_assert!(area_bytes(&leaf.entries) > LEAF_AREA);
        }
    }

    #[test]
    fn xattr_round_trip(mut xs in proptest::collection::btree_map(proptest::collection::vec(any::<u8>(), 1..40), proptest::collection::vec(any::<u8>(), 0..200), 0..10)) {
        let xs: Vec<(Vec<u8>, Vec<u8>)> = std::mem::take(&mut xs).into_iter().collect();
        if let Some(b) = encode_xattrs(&xs, 9, 3) {
            prop_assert_eq!(decode_xattrs(&b, 9, 3).unwrap(), xs);
        }
    }

    #[test]
    fn rgrp_round_trip(len in 64u32..100_000, free in 0u32..64, gen: u64) {
        let h = RgrpHeader { index: 3, length: len, bitmap_blocks: bitmap_blocks_for(len), free, dinodes: 1, unlinked: 0, igeneration: gen };
        prop_assert_eq!(RgrpHeader::decode(&h.encode(1234), 1234).unwrap(), h);
    }

    /// No decoder panics on arbitrary bytes, whether or not the header is made valid.
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), BLOCK_SIZE), ty in 1u16..9, seal_it: bool) {
        let mut b = [0u8; BLOCK_SIZE];
        b.copy_from_slice(&bytes);
        if seal_it {
            if let Some(t) = BlockType::from_u16(ty) { seal(&mut b, t, 42, 5); }
        }
        decode_all(&b);
    }

    /// Mutating one byte of a valid block never panics a decoder.
    #[test]
    fn mutated_valid_blocks_never_panic(off in 0usize..BLOCK_SIZE, val: u8, which in 0usize..6, reseal: bool) {
        let names: Vec<Vec<u8>> = (0..30).map(|i| format!("file{i}").into_bytes()).collect();
        let mut b = match which {
            0 => sample_sb().encode(42),
            1 => Dinode::new(S_IFREG | 0o644, 0, 0, Time::default(), 1).encode(42),
            2 => Leaf { depth: 3, next: 0, entries: entries(&names) }.encode(42, 5).unwrap(),
            3 => encode_xattrs(&[(b"user.a".to_vec(), b"v".to_vec())], 42, 5).unwrap(),
            4 => RgrpHeader { index: 0, length: 100, bitmap_blocks: 1, free: 10, dinodes: 1, unlinked: 0, igeneration: 0 }.encode(42),
            _ => encode_indirect(&[1, 2, 3], 42, 5),
        };
        b[off] = val;
        if reseal {
            let crc = block_crc(&b);
            put_u32(&mut b[..], 24, crc);
        }
        decode_all(&b);
    }
}

fn decode_all(b: &Block) {
    let _ = peek(b, 42);
    let _ = Superblock::decode(b, 42, 1 << 40);
    let _ = RgrpHeader::decode(b, 42);
    let _ = decode_bitmap(b, 42);
    let _ = Dinode::decode(b, 42);
    let _ = decode_indirect(b, 42, 5, 1 << 40);
    let _ = Leaf::decode(b, 42, 5);
    let _ = decode_hash_block(b, 42, 5, 1 << 40);
    let _ = decode_xattrs(b, 42, 5);
    let _ = decode_area(&b[100..], 42);
    let _ = RindexEntry::decode_all(&b[..], 42);
}
