//! Every on-disk metadata decoder on arbitrary bytes: errors, never panics.
#![no_main]
use concord_fs::format::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = [0u8; BLOCK_SIZE];
    let n = data.len().min(BLOCK_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    // Half the inputs get a valid header so that the field decoders are reached.
    if let Some((&t, _)) = data.split_first() {
        if t & 1 == 1 {
            if let Some(ty) = BlockType::from_u16(u16::from(t >> 1) % 9) {
                seal(&mut b, ty, 42, 5);
            }
        }
    }
    let _ = peek(&b, 42);
    let _ = Superblock::decode(&b, 42, 1 << 40);
    let _ = RgrpHeader::decode(&b, 42);
    let _ = decode_bitmap(&b, 42);
    let _ = Dinode::decode(&b, 42);
    let _ = decode_indirect(&b, 42, 5, 1 << 40);
    let _ = Leaf::decode(&b, 42, 5);
    let _ = decode_hash_block(&b, 42, 5, 1 << 40);
    let _ = decode_xattrs(&b, 42, 5);
    let _ = decode_area(data, 42);
    let _ = RindexEntry::decode_all(data, 42);
});
