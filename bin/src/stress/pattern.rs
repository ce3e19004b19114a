//! The self-describing data `concord stress` writes, and its decoder.
//!
//! Every 16-byte unit of a file's data says what it is: four little-endian u32s,
//!
//! ```text
//! 0..4    seed     the run's seed (its low 32 bits)
//! 4..8    file     the file's id: worker + 1 in the top byte, the worker's file number below
//! 8..12   unit     the unit's index in the file (its offset / 16)
//! 12..16  gen      the worker's write generation that wrote it (1, 2, ...)
//! ```
//!
//! A unit never written reads as 16 zero bytes (a hole, a truncated and grown tail, a
//! punched range). No written unit is all zeros: file ids start at `1 << 24`. A read
//! can therefore say of every unit whether it is right, and if not what it found: the
//! data of another file, of another offset, of an older or newer write, zeros, or
//! bytes that are no pattern of this run at all. All writes, truncates and punches are
//! in whole units, so a file's size is always a multiple of [`UNIT`].
//!
//! This file uses nothing but std, so that tests/tests/stress.rs can include it.

/// The bytes one pattern unit covers.
pub const UNIT: u64 = 16;

/// What a unit holds (or must hold).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// 16 zero bytes.
    Zero,
    /// A unit written by this program.
    Data { seed: u32, file: u32, unit: u32, gen: u32 },
    /// Anything else: not a pattern of this program (the raw bytes).
    Garbage([u8; 16]),
}

/// A file id: worker `w` (0-based), the worker's `n`th file (1-based, below 2^24).
pub fn file_id(worker: u32, n: u32) -> u32 {
    ((worker + 1) << 24) | (n & 0x00ff_ffff)
}

/// The low 32 bits of the run's seed, as written into every unit.
pub fn seed32(seed: u64) -> u32 {
    seed as u32
}

/// The 16 bytes of unit `unit` of file `file` written by generation `gen`.
pub fn encode(seed: u32, file: u32, unit: u32, gen: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&seed.to_le_bytes());
    b[4..8].copy_from_slice(&file.to_le_bytes());
    b[8..12].copy_from_slice(&unit.to_le_bytes());
    b[12..16].copy_from_slice(&gen.to_le_bytes());
    b
}

/// Fills `buf` (a multiple of 16 bytes) with the units of `file` from `first_unit` on.
pub fn fill(buf: &mut [u8], seed: u32, file: u32, first_unit: u32, gen: u32) {
    for (i, chunk) in buf.chunks_exact_mut(UNIT as usize).enumerate() {
        chunk.copy_from_slice(&encode(seed, file, first_unit + i as u32, gen));
    }
}

/// What 16 bytes are, for a run of seed `seed`: units with another seed are garbage to
/// it (another run's data, or bytes that look like a pattern by chance).
pub fn decode_for(b: &[u8], seed: u32) -> Unit {
    match decode(b) {
        Unit::Data { seed: s, .. } if s != seed => {
            let mut raw = [0u8; 16];
            raw.copy_from_slice(b);
            Unit::Garbage(raw)
        }
        u => u,
    }
}

/// What 16 bytes are.
pub fn decode(b: &[u8]) -> Unit {
    let mut raw = [0u8; 16];
    let n = b.len().min(16);
    raw[..n].copy_from_slice(&b[..n]);
    if b.len() == 16 && raw == [0u8; 16] {
        return Unit::Zero;
    }
    let word = |i: usize| u32::from_le_bytes([raw[i], raw[i + 1], raw[i + 2], raw[i + 3]]);
    let (seed, file, unit, gen) = (word(0), word(4), word(8), word(12));
    if b.len() != 16 || file >> 24 == 0 || gen == 0 {
        return Unit::Garbage(raw);
    }
    Unit::Data { seed, file, unit, gen }
}

/// A file id as people read it: `worker.number`.
pub fn file_name(file: u32) -> String {
    format!("{}.{}", (file >> 24).wrapping_sub(1), file & 0x00ff_ffff)
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::Zero => write!(f, "zeros"),
            Unit::Data { seed, file, unit, gen } => {
                write!(f, "file {} offset {} gen {gen} (seed {seed})", file_name(*file), u64::from(*unit) * UNIT)
            }
            Unit::Garbage(b) => {
                write!(f, "bytes ")?;
                for x in b {
                    write!(f, "{x:02x}")?;
                }
                let text: String = b.iter().map(|&c| if (0x20..0x7f).contains(&c) { c as char } else { '.' }).collect();
                write!(f, " {text:?} (no pattern of this run)")
            }
        }
    }
}

/// What a unit of file `file` at index `unit` must hold when the model says generation
/// `gen` (0: zeros).
pub fn expected(seed: u32, file: u32, unit: u32, gen: u32) -> Unit {
    if gen == 0 {
        Unit::Zero
    } else {
        Unit::Data { seed, file, unit, gen }
    }
}

/// The first unit of `data` (a file's content from offset 0) that differs from the
/// generations `gens` (one per unit; 0 for zeros) of file `file`: its offset, what was
/// expected and what was found. Sizes are compared by the caller.
pub fn first_difference(data: &[u8], seed: u32, file: u32, gens: &[u32]) -> Option<(u64, Unit, Unit)> {
    for (i, chunk) in data.chunks(UNIT as usize).enumerate() {
        let want = expected(seed, file, i as u32, gens.get(i).copied().unwrap_or(0));
        let found = decode_for(chunk, seed);
        if found != want {
            return Some((i as u64 * UNIT, want, found));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_unit_decodes_to_what_wrote_it() {
        let f = file_id(2, 17);
        let b = encode(99, f, 5, 42);
        assert_eq!(decode(&b), Unit::Data { seed: 99, file: f, unit: 5, gen: 42 });
        assert_eq!(decode(&[0u8; 16]), Unit::Zero);
        assert_eq!(file_name(f), "2.17");
    }

    #[test]
    fn a_corrupted_unit_is_reported_with_what_was_found() {
        let f = file_id(0, 3);
        let gens = [7u32, 7, 0, 9];
        let mut data = vec![0u8; 64];
        fill(&mut data[0..32], 1, f, 0, 7);
        fill(&mut data[48..64], 1, f, 3, 9);
        assert_eq!(first_difference(&data, 1, f, &gens), None);

        // A unit partly overwritten is found, whatever it then looks like.
        let mut torn = data.clone();
        torn[20..28].copy_from_slice(b"VANDAL!!");
        assert_eq!(first_difference(&torn, 1, f, &gens).map(|d| d.0), Some(16));

        // Bytes that are no pattern at all.
        let mut bad = data.clone();
        bad[16..32].copy_from_slice(b"VANDAL!!VANDAL!!");
        let (off, want, found) = first_difference(&bad, 1, f, &gens).expect("the corruption is found");
        assert_eq!(off, 16);
        assert_eq!(want, Unit::Data { seed: 1, file: f, unit: 1, gen: 7 });
        assert!(matches!(found, Unit::Garbage(_)), "{found}");
        assert!(found.to_string().contains("56414e44414c2121"), "{found}");
        assert!(found.to_string().contains("VANDAL!!"), "{found}");

        // Bytes that look like a unit of another seed are no pattern of this run.
        let mut foreign = data.clone();
        foreign[0..16].copy_from_slice(b"VANDAL!!VANDAL!!");
        let (_, _, found) = first_difference(&foreign, 1, f, &gens).unwrap();
        assert!(matches!(found, Unit::Garbage(_)), "{found}");

        // An older write (a lost update) names its generation.
        let mut stale = data.clone();
        stale[48..64].copy_from_slice(&encode(1, f, 3, 8));
        let (off, want, found) = first_difference(&stale, 1, f, &gens).unwrap();
        assert_eq!(off, 48);
        assert_eq!(found.to_string(), "file 0.3 offset 48 gen 8 (seed 1)");
        assert_eq!(want.to_string(), "file 0.3 offset 48 gen 9 (seed 1)");

        // Another file's data, a misplaced unit, and zeros where data belongs.
        let mut other = data.clone();
        other[0..16].copy_from_slice(&encode(1, file_id(1, 3), 0, 7));
        assert!(first_difference(&other, 1, f, &gens).unwrap().2.to_string().starts_with("file 1.3 offset 0"));
        let mut moved = data.clone();
        moved[16..32].copy_from_slice(&encode(1, f, 0, 7));
        assert_eq!(first_difference(&moved, 1, f, &gens).unwrap().2.to_string(), "file 0.3 offset 0 gen 7 (seed 1)");
        let mut zeroed = data;
        zeroed[0..16].fill(0);
        assert_eq!(first_difference(&zeroed, 1, f, &gens).unwrap().2, Unit::Zero);
    }
}
