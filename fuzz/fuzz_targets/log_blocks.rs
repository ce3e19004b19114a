//! The journal's log block decoder on arbitrary bytes: errors, never panics.
#![no_main]
use concord_journal::block::LogBlock;
use concord_journal::BLOCK_SIZE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut b = [0u8; BLOCK_SIZE];
    let n = data.len().min(BLOCK_SIZE);
    b[..n].copy_from_slice(&data[..n]);
    let _ = LogBlock::decode(&b);
    let _ = LogBlock::decode_at(&b, 0x5eed, 17);
});
