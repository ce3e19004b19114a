//! Little-endian field access at fixed offsets.
//!
//! The offsets passed in are format constants inside a 4096-byte block, so the slicing
//! cannot go out of bounds for a `Block`; callers decoding variable positions check
//! bounds first and use the `try_` forms.

pub fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
pub fn get_i64(b: &[u8], off: usize) -> i64 {
    get_u64(b, off) as i64
}
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
pub fn put_i64(b: &mut [u8], off: usize, v: i64) {
    put_u64(b, off, v as u64);
}
/// `get_u64` that returns None when the field does not fit in `b`.
pub fn try_u64(b: &[u8], off: usize) -> Option<u64> {
    (off.checked_add(8)? <= b.len()).then(|| get_u64(b, off))
}
/// `get_u16` that returns None when the field does not fit in `b`.
pub fn try_u16(b: &[u8], off: usize) -> Option<u16> {
    (off.checked_add(2)? <= b.len()).then(|| get_u16(b, off))
}
