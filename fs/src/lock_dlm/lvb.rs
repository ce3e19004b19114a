//! The control_lock LVB: the cluster-wide record of journal recovery.
//!
//! Layout (the seed's `control_lvb_read` / `control_lvb_write`, `JID_BITMAP_OFFSET`):
//!
//! ```text
//! byte 0..4   generation, u32 little-endian: the latest lockspace generation whose
//!             slot failures are reflected in the bitmap (0xFFFFFFFF: mounts refused)
//! byte 4..8   unused (kept as read: a write copies the bytes it read)
//! byte 8..32  jid bitmap, little-endian bit order: jid N is bit N % 8 of byte 8 + N / 8;
//!             a set bit means journal N needs recovery
//! ```
//!
//! 32 bytes is lockd's `LVB_LEN` (GFS2's `GDLM_LVB_SIZE`), so the bitmap covers jids
//! 0 to 191 ([`MAX_JIDS`]).

use std::fmt;

/// Length of a lock value block; must equal `concord_lockd::core::LVB_LEN`.
pub const LVB_LEN: usize = 32;

/// A lock value block as the DLM carries it.
pub type Lvb = [u8; LVB_LEN];

/// Offset of the jid bitmap: 4 bytes of generation, 4 unused.
pub const JID_BITMAP_OFFSET: usize = 8;

/// Journals the bitmap can describe.
pub const MAX_JIDS: u32 = ((LVB_LEN - JID_BITMAP_OFFSET) * 8) as u32;

/// Generation value that makes every `control_mount` fail ("control_lock disabled").
pub const GENERATION_DISABLED: u32 = 0xFFFF_FFFF;

/// The decoded view of a control_lock LVB; every byte pattern is valid.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct ControlLvb(Lvb);

impl ControlLvb {
    /// All zero: generation 0, no jid bits (what a fresh lockspace's LVB holds).
    pub const fn zeroed() -> Self {
        ControlLvb([0; LVB_LEN])
    }

    /// Wraps the bytes of a control_lock LVB.
    pub const fn from_bytes(bytes: Lvb) -> Self {
        ControlLvb(bytes)
    }

    /// The bytes to hand to the DLM.
    pub const fn to_bytes(self) -> Lvb {
        self.0
    }

    /// The generation (bytes 0..4, little-endian).
    pub fn generation(&self) -> u32 {
        u32::from_le_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }

    /// Sets the generation, leaving every other byte as it is.
    pub fn set_generation(&mut self, generation: u32) {
        self.0[..4].copy_from_slice(&generation.to_le_bytes());
    }

    fn bit(jid: u32) -> Option<(usize, u8)> {
        (jid < MAX_JIDS).then(|| (JID_BITMAP_OFFSET + jid as usize / 8, 1u8 << (jid % 8)))
    }

    /// Whether jid's bit is set (`test_bit_le`); false beyond the bitmap.
    pub fn jid(&self, jid: u32) -> bool {
        Self::bit(jid).is_some_and(|(byte, mask)| self.0[byte] & mask != 0)
    }

    /// Sets jid's bit (`__set_bit_le`). Returns false (and changes nothing) for a jid
    /// beyond the bitmap.
    pub fn set_jid(&mut self, jid: u32) -> bool {
        match Self::bit(jid) {
            Some((byte, mask)) => {
                self.0[byte] |= mask;
                true
            }
            None => false,
        }
    }

    /// Clears jid's bit (`__clear_bit_le`).
    pub fn clear_jid(&mut self, jid: u32) {
        if let Some((byte, mask)) = Self::bit(jid) {
            self.0[byte] &= !mask;
        }
    }

    /// Whether no jid needs recovery (`all_jid_bits_clear`).
    pub fn all_jids_clear(&self) -> bool {
        self.0[JID_BITMAP_OFFSET..].iter().all(|b| *b == 0)
    }

    /// Clears the whole LVB, generation included (`memset(ls_lvb_bits, 0, ...)`).
    pub fn clear(&mut self) {
        self.0 = [0; LVB_LEN];
    }

    /// The jids whose bit is set, ascending.
    pub fn jids(&self) -> Vec<u32> {
        (0..MAX_JIDS).filter(|j| self.jid(*j)).collect()
    }
}

impl fmt::Display for ControlLvb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gen {} jids [", self.generation())?;
        for (i, j) in self.jids().iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{j}")?;
        }
        f.write_str("]")
    }
}

impl fmt::Debug for ControlLvb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_little_endian_at_byte_0() {
        let mut l = ControlLvb::zeroed();
        l.set_generation(0x0403_0201);
        assert_eq!(&l.to_bytes()[..8], &[1, 2, 3, 4, 0, 0, 0, 0]);
        assert_eq!(l.generation(), 0x0403_0201);
    }

    #[test]
    fn jid_bits_start_at_byte_8_in_le_bit_order() {
        let mut l = ControlLvb::zeroed();
        assert!(l.all_jids_clear());
        assert!(l.set_jid(0));
        assert!(l.set_jid(9));
        assert!(l.set_jid(MAX_JIDS - 1));
        let b = l.to_bytes();
        assert_eq!(b[8], 0b0000_0001);
        assert_eq!(b[9], 0b0000_0010);
        assert_eq!(b[31], 0b1000_0000);
        assert_eq!(l.jids(), vec![0, 9, MAX_JIDS - 1]);
        assert!(!l.all_jids_clear());
        l.clear_jid(0);
        l.clear_jid(9);
        l.clear_jid(MAX_JIDS - 1);
        assert!(l.all_jids_clear());
        assert_eq!(l.generation(), 0);
    }

    #[test]
    fn jids_beyond_the_bitmap_are_refused() {
        let mut l = ControlLvb::zeroed();
        assert_eq!(MAX_JIDS, 192);
        assert!(!l.set_jid(MAX_JIDS));
        assert!(!l.jid(MAX_JIDS));
        assert_eq!(l, ControlLvb::zeroed());
    }

    #[test]
    fn unused_bytes_survive_a_generation_write() {
        let mut raw = [0u8; LVB_LEN];
        raw[4..8].copy_from_slice(&[9, 8, 7, 6]);
        let mut l = ControlLvb::from_bytes(raw);
        l.set_generation(5);
        assert_eq!(&l.to_bytes()[4..8], &[9, 8, 7, 6]);
        // Unused bytes are not jid bits.
        assert!(l.all_jids_clear());
        assert_eq!(l.to_string(), "gen 5 jids []");
    }
}
