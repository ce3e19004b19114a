//! Encoding and decoding of the journal's own log blocks.
//!
//! Byte layouts are in `docs/internals/journal.md`, "Block formats". All
//! integers are little-endian. Every log block starts with the same 64-byte
//! header (magic, version, kind, nonce, sequence number, own address, crc32c,
//! entry count). Metadata copies in the log are the file system's own blocks,
//! written raw; they are not described here.
//!
//! [`LogBlock::decode`] never panics: any byte pattern gives either a block or
//! a [`DecodeError`].

use crate::device::{Block, BLOCK_SIZE};

/// "CNLG" read as a little-endian u32.
pub const LOG_MAGIC: u32 = 0x434E_4C47;
/// Version of the log block format.
pub const LOG_VERSION: u16 = 1;

/// Offsets of the common header fields.
pub mod off {
    /// u32 magic.
    pub const MAGIC: usize = 0;
    /// u16 format version.
    pub const VERSION: usize = 4;
    /// u16 block kind.
    pub const KIND: usize = 6;
    /// u64 journal nonce.
    pub const NONCE: usize = 8;
    /// u64 transaction sequence number.
    pub const SEQ: usize = 16;
    /// u64 absolute block address of this block.
    pub const ADDR: usize = 24;
    /// u32 crc32c of the block with this field zeroed.
    pub const CRC: usize = 32;
    /// u32 number of entries (descriptor and revoke), 0 for commit.
    pub const COUNT: usize = 36;
    /// Descriptor/revoke: u32 index of this block among its kind in the transaction.
    pub const INDEX: usize = 40;
    /// Commit: u32 flags.
    pub const FLAGS: usize = 40;
    /// Commit: u32 hash (crc) of the previous commit header.
    pub const PREV_HASH: usize = 44;
    /// Commit: u64 ring position of the tail transaction's first block.
    pub const TAIL_POS: usize = 48;
    /// Commit: u64 sequence number of the tail transaction.
    pub const TAIL_SEQ: usize = 56;
    /// Commit: u32 body hash.
    pub const BODY_HASH: usize = 64;
    /// Commit: u32 number of body blocks before this header.
    pub const BODY_BLOCKS: usize = 68;
    /// Commit: u64 first block of the log region.
    pub const REGION_START: usize = 72;
    /// Commit: u64 length of the log region in blocks.
    pub const REGION_BLOCKS: usize = 80;
    /// End of the commit header's fields; the rest of the block is zero.
    pub const COMMIT_END: usize = 88;
    /// Descriptor/revoke: first u64 entry.
    pub const ENTRIES: usize = 64;
}

/// Entries (home addresses) per descriptor or revoke block.
pub const ENTRIES_PER_BLOCK: usize = (BLOCK_SIZE - off::ENTRIES) / 8;
const _: () = assert!(ENTRIES_PER_BLOCK == 504);
const _: () = assert!(off::COMMIT_END <= BLOCK_SIZE);

/// Commit flag: nothing needs replay (tail is this header, body empty).
pub const FLAG_CLEAN: u32 = 1;
/// Commit flag: written by a clean unmount (shutdown) or by replay.
pub const FLAG_UNMOUNT: u32 = 2;
/// Commit flag: the body and this header were written before one flush (no
/// ordered data, no checkpoint): a crash may leave the header without its
/// body, and replay then falls back to the previous header.
pub const FLAG_ONE_FLUSH: u32 = 4;
const KNOWN_FLAGS: u32 = FLAG_CLEAN | FLAG_UNMOUNT | FLAG_ONE_FLUSH;

/// Kind of a log block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Lists home addresses of the metadata copies that follow it.
    Descriptor = 1,
    /// Lists revoked home addresses.
    Revoke = 2,
    /// Commits a transaction.
    Commit = 3,
}

/// Fields every log block carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Identifies the file system and journal; other values are foreign.
    pub nonce: u64,
    /// Sequence number of the transaction the block belongs to.
    pub seq: u64,
    /// Absolute device block address the block was written to.
    pub addr: u64,
}

/// The commit header's own fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Commit {
    /// `FLAG_*` bits.
    pub flags: u32,
    /// crc of the previous commit header (its `crc` field).
    pub prev_hash: u32,
    /// Ring position (0-based within the region) of the tail transaction's first block.
    pub tail_pos: u64,
    /// Sequence number of the tail transaction (oldest one replay must walk).
    pub tail_seq: u64,
    /// crc32c over the little-endian crc32c of every body block, in log order.
    pub body_hash: u32,
    /// Number of blocks of this transaction before the commit header.
    pub body_blocks: u32,
    /// First block of the log region.
    pub region_start: u64,
    /// Length of the log region in blocks.
    pub region_blocks: u64,
}

/// A decoded log block.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LogBlock {
    /// `index`-th descriptor of the transaction; `addrs` are the home addresses
    /// of the copies that follow it, in order.
    Descriptor { hdr: Header, index: u32, addrs: Vec<u64> },
    /// `index`-th revoke block of the transaction.
    Revoke { hdr: Header, index: u32, addrs: Vec<u64> },
    /// Commit header.
    Commit { hdr: Header, commit: Commit },
}

/// Why bytes are not a valid log block.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Not a log block at all.
    #[error("bad magic {0:#010x}")]
    Magic(u32),
    /// Written by another format version.
    #[error("unknown version {0}")]
    Version(u16),
    /// Unknown block kind.
    #[error("unknown block kind {0}")]
    Kind(u16),
    /// Checksum mismatch (torn or corrupt).
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc {
        /// crc in the block.
        stored: u32,
        /// crc of the contents.
        computed: u32,
    },
    /// A field holds an impossible value.
    #[error("invalid field {0}")]
    Field(&'static str),
}

impl LogBlock {
    /// The common header.
    pub fn header(&self) -> &Header {
        match self {
            LogBlock::Descriptor { hdr, .. } | LogBlock::Revoke { hdr, .. } | LogBlock::Commit { hdr, .. } => hdr,
        }
    }

    /// The kind.
    pub fn kind(&self) -> Kind {
        match self {
            LogBlock::Descriptor { .. } => Kind::Descriptor,
            LogBlock::Revoke { .. } => Kind::Revoke,
            LogBlock::Commit { .. } => Kind::Commit,
        }
    }

    /// Encodes into `buf` (every byte is written), crc included; returns the crc.
    ///
    /// Panics if a descriptor or revoke has no entries or more than
    /// [`ENTRIES_PER_BLOCK`] (a bug of the caller).
    pub fn encode(&self, buf: &mut Block) -> u32 {
        buf.fill(0);
        let hdr = self.header();
        put_u32(buf, off::MAGIC, LOG_MAGIC);
        put_u16(buf, off::VERSION, LOG_VERSION);
        put_u16(buf, off::KIND, self.kind() as u16);
        put_u64(buf, off::NONCE, hdr.nonce);
        put_u64(buf, off::SEQ, hdr.seq);
        put_u64(buf, off::ADDR, hdr.addr);
        match self {
            LogBlock::Descriptor { index, addrs, .. } | LogBlock::Revoke { index, addrs, .. } => {
                assert!(!addrs.is_empty() && addrs.len() <= ENTRIES_PER_BLOCK, "bad entry count {}", addrs.len());
                put_u32(buf, off::COUNT, addrs.len() as u32);
                put_u32(buf, off::INDEX, *index);
                for (i, a) in addrs.iter().enumerate() {
                    put_u64(buf, off::ENTRIES + 8 * i, *a);
                }
            }
            LogBlock::Commit { commit: c, .. } => {
                put_u32(buf, off::FLAGS, c.flags);
                put_u32(buf, off::PREV_HASH, c.prev_hash);
                put_u64(buf, off::TAIL_POS, c.tail_pos);
                put_u64(buf, off::TAIL_SEQ, c.tail_seq);
                put_u32(buf, off::BODY_HASH, c.body_hash);
                put_u32(buf, off::BODY_BLOCKS, c.body_blocks);
                put_u64(buf, off::REGION_START, c.region_start);
                put_u64(buf, off::REGION_BLOCKS, c.region_blocks);
            }
        }
        let crc = block_crc(buf);
        put_u32(buf, off::CRC, crc);
        crc
    }

    /// Encodes into a new block; returns it with its crc.
    pub fn to_block(&self) -> (Box<Block>, u32) {
        let mut b = crate::device::zeroed_block();
        let crc = self.encode(&mut b);
        (b, crc)
    }

    /// Decodes and verifies `buf`. Does not check nonce or address (the caller
    /// knows what to expect); see [`LogBlock::decode_at`].
    pub fn decode(buf: &Block) -> Result<LogBlock, DecodeError> {
        let magic = get_u32(buf, off::MAGIC);
        if magic != LOG_MAGIC {
            return Err(DecodeError::Magic(magic));
        }
        let version = get_u16(buf, off::VERSION);
        if version != LOG_VERSION {
            return Err(DecodeError::Version(version));
        }
        let stored = get_u32(buf, off::CRC);
        let computed = block_crc(buf);
        if stored != computed {
            return Err(DecodeError::Crc { stored, computed });
        }
        let hdr =
            Header { nonce: get_u64(buf, off::NONCE), seq: get_u64(buf, off::SEQ), addr: get_u64(buf, off::ADDR) };
        let count = get_u32(buf, off::COUNT) as usize;
        let kind = get_u16(buf, off::KIND);
        match kind {
            1 | 2 => {
                if count == 0 || count > ENTRIES_PER_BLOCK {
                    return Err(DecodeError::Field("count"));
                }
                if !is_zero(&buf[off::INDEX + 4..off::ENTRIES]) || !is_zero(&buf[off::ENTRIES + 8 * count..]) {
                    return Err(DecodeError::Field("unused bytes"));
                }
                let index = get_u32(buf, off::INDEX);
                let addrs = (0..count).map(|i| get_u64(buf, off::ENTRIES + 8 * i)).collect();
                Ok(if kind == 1 {
                    LogBlock::Descriptor { hdr, index, addrs }
                } else {
                    LogBlock::Revoke { hdr, index, addrs }
                })
            }
            3 => {
                if count != 0 {
                    return Err(DecodeError::Field("count"));
                }
                let c = Commit {
                    flags: get_u32(buf, off::FLAGS),
                    prev_hash: get_u32(buf, off::PREV_HASH),
                    tail_pos: get_u64(buf, off::TAIL_POS),
                    tail_seq: get_u64(buf, off::TAIL_SEQ),
                    body_hash: get_u32(buf, off::BODY_HASH),
                    body_blocks: get_u32(buf, off::BODY_BLOCKS),
                    region_start: get_u64(buf, off::REGION_START),
                    region_blocks: get_u64(buf, off::REGION_BLOCKS),
                };
                if !is_zero(&buf[off::COMMIT_END..]) {
                    return Err(DecodeError::Field("unused bytes"));
                }
                if c.flags & !KNOWN_FLAGS != 0 {
                    return Err(DecodeError::Field("flags"));
                }
                if c.tail_pos >= c.region_blocks {
                    return Err(DecodeError::Field("tail_pos"));
                }
                if u64::from(c.body_blocks) >= c.region_blocks {
                    return Err(DecodeError::Field("body_blocks"));
                }
                if c.tail_seq > hdr.seq {
                    return Err(DecodeError::Field("tail_seq"));
                }
                Ok(LogBlock::Commit { hdr, commit: c })
            }
            k => Err(DecodeError::Kind(k)),
        }
    }

    /// Decodes `buf` read from block `addr` and accepts it only if it carries
    /// `nonce` and `addr` (otherwise it is a foreign, stale or misdirected block).
    pub fn decode_at(buf: &Block, nonce: u64, addr: u64) -> Result<LogBlock, DecodeError> {
        let b = LogBlock::decode(buf)?;
        if b.header().nonce != nonce {
            return Err(DecodeError::Field("nonce"));
        }
        if b.header().addr != addr {
            return Err(DecodeError::Field("addr"));
        }
        Ok(b)
    }
}

/// crc32c of a block with its crc field taken as zero.
fn block_crc(buf: &Block) -> u32 {
    let c = crc32c::crc32c(&buf[..off::CRC]);
    let c = crc32c::crc32c_append(c, &[0u8; 4]);
    crc32c::crc32c_append(c, &buf[off::CRC + 4..])
}

/// crc32c of any block (used for raw metadata copies in the body hash).
pub fn raw_crc(buf: &Block) -> u32 {
    crc32c::crc32c(buf)
}

/// Accumulates a transaction's body hash: crc32c over the little-endian crc
/// of every body block, in log order.
#[derive(Clone, Copy, Debug, Default)]
pub struct BodyHasher(u32);

impl BodyHasher {
    /// Adds the crc of the next body block.
    pub fn push(&mut self, block_crc: u32) {
        self.0 = crc32c::crc32c_append(self.0, &block_crc.to_le_bytes());
    }

    /// The hash.
    pub fn finish(&self) -> u32 {
        self.0
    }
}

fn is_zero(b: &[u8]) -> bool {
    b.iter().all(|&x| x == 0)
}
fn put_u16(b: &mut Block, at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut Block, at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut Block, at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u16(b: &Block, at: usize) -> u16 {
    let mut x = [0u8; 2];
    x.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(x)
}
fn get_u32(b: &Block, at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}
fn get_u64(b: &Block, at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_header() -> impl Strategy<Value = Header> {
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(nonce, seq, addr)| Header { nonce, seq, addr })
    }

    fn arb_log_block() -> impl Strategy<Value = LogBlock> {
        let list = || proptest::collection::vec(any::<u64>(), 1..=ENTRIES_PER_BLOCK);
        prop_oneof![
            (arb_header(), any::<u32>(), list()).prop_map(|(hdr, index, addrs)| LogBlock::Descriptor {
                hdr,
                index,
                addrs
            }),
            (arb_header(), any::<u32>(), list()).prop_map(|(hdr, index, addrs)| LogBlock::Revoke { hdr, index, addrs }),
            (arb_header(), 0..4u32, any::<u32>(), any::<u32>(), any::<u64>(), 1..u64::MAX, any::<u32>()).prop_map(
                |(hdr, flags, prev_hash, body_hash, region_start, region_blocks, x)| {
                    let tail_pos = u64::from(x) % region_blocks;
                    let body_blocks = (u64::from(x) % region_blocks) as u32;
                    LogBlock::Commit {
                        hdr,
                        commit: Commit {
                            flags,
                            prev_hash,
                            tail_pos,
                            tail_seq: hdr.seq / 2,
                            body_hash,
                            body_blocks,
                            region_start,
                            region_blocks,
                        },
                    }
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn every_log_block_round_trips(b in arb_log_block()) {
            let (buf, crc) = b.to_block();
            prop_assert_eq!(get_u32(&buf, off::CRC), crc);
            prop_assert_eq!(LogBlock::decode(&buf), Ok(b.clone()));
            let h = *b.header();
            prop_assert_eq!(LogBlock::decode_at(&buf, h.nonce, h.addr), Ok(b.clone()));
            prop_assert!(LogBlock::decode_at(&buf, h.nonce ^ 1, h.addr).is_err());
            prop_assert!(LogBlock::decode_at(&buf, h.nonce, h.addr ^ 1).is_err());
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), BLOCK_SIZE)) {
            let mut buf = [0u8; BLOCK_SIZE];
            buf.copy_from_slice(&bytes);
            let _ = LogBlock::decode(&buf);
            // With a valid magic, version and crc the field checks are reached.
            put_u32(&mut buf, off::MAGIC, LOG_MAGIC);
            put_u16(&mut buf, off::VERSION, LOG_VERSION);
            let crc = block_crc(&buf);
            put_u32(&mut buf, off::CRC, crc);
            let _ = LogBlock::decode(&buf);
        }

        #[test]
        fn mutated_blocks_are_rejected(b in arb_log_block(), at in 0..BLOCK_SIZE, bit in 0..8u8) {
            let (mut buf, _) = b.to_block();
            buf[at] ^= 1 << bit;
            // A single flipped bit is always caught (by magic, version or crc).
            prop_assert!(LogBlock::decode(&buf).is_err());
        }

        #[test]
        fn mutated_blocks_with_fixed_crc_never_panic(b in arb_log_block(), at in 0..off::ENTRIES + 16, v in any::<u8>()) {
            let (mut buf, _) = b.to_block();
            buf[at] = v;
            let crc = block_crc(&buf);
            put_u32(&mut buf, off::CRC, crc);
            if let Ok(d) = LogBlock::decode(&buf) {
                // Whatever decodes re-encodes to the same bytes.
                prop_assert_eq!(&*d.to_block().0, &*buf);
            }
        }
    }

    #[test]
    fn field_checks() {
        let hdr = Header { nonce: 1, seq: 5, addr: 9 };
        let commit = Commit {
            flags: FLAG_CLEAN,
            prev_hash: 0,
            tail_pos: 3,
            tail_seq: 5,
            body_hash: 0,
            body_blocks: 0,
            region_start: 0,
            region_blocks: 256,
        };
        let bad = |c: Commit| LogBlock::decode(&LogBlock::Commit { hdr, commit: c }.to_block().0);
        assert!(bad(commit).is_ok());
        assert_eq!(bad(Commit { flags: 8, ..commit }), Err(DecodeError::Field("flags")));
        assert_eq!(bad(Commit { tail_pos: 256, ..commit }), Err(DecodeError::Field("tail_pos")));
        assert_eq!(bad(Commit { body_blocks: 256, ..commit }), Err(DecodeError::Field("body_blocks")));
        assert_eq!(bad(Commit { tail_seq: 6, ..commit }), Err(DecodeError::Field("tail_seq")));
        let (mut buf, _) = LogBlock::Revoke { hdr, index: 0, addrs: vec![1] }.to_block();
        put_u32(&mut buf, off::COUNT, 0);
        let crc = block_crc(&buf);
        put_u32(&mut buf, off::CRC, crc);
        assert_eq!(LogBlock::decode(&buf), Err(DecodeError::Field("count")));
        put_u16(&mut buf, off::KIND, 9);
        let crc = block_crc(&buf);
        put_u32(&mut buf, off::CRC, crc);
        assert_eq!(LogBlock::decode(&buf), Err(DecodeError::Kind(9)));
    }
}
