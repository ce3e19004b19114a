//! On-disk format version 1: encoders and decoders for every metadata block.
//!
//! The byte layout is specified in `docs/internals/disk-format.md`; the offsets here are
//! its named constants. Every decoder checks the block header (magic, type, format,
//! own address, crc32c) and then every field's bounds, and returns [`FormatError`] on
//! any input; none of them panics.

mod bytes;
mod dinode;
mod dir;
mod header;
mod rgrp;
mod statfs;
mod superblock;
mod xattr;

pub use bytes::*;
pub use dinode::*;
pub use dir::*;
pub use header::*;
pub use rgrp::*;
pub use statfs::*;
pub use superblock::*;
pub use xattr::*;

/// Block size of format version 1.
pub const BLOCK_SIZE: usize = 4096;
/// One block's bytes.
pub type Block = [u8; BLOCK_SIZE];
/// The format version this code writes and understands.
pub const FS_FORMAT: u32 = 1;
/// Address of the primary superblock (byte offset 64 KiB).
pub const SB_ADDR: u64 = 16;
/// First block of the journal area.
pub const JOURNAL_AREA_START: u64 = 17;

/// Why a block failed to decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    #[error("block {block}: bad magic {found:#010x}")]
    BadMagic { block: u64, found: u32 },
    #[error("block {block}: expected a {expected} block, found type {found}")]
    BadType { block: u64, expected: &'static str, found: u16 },
    #[error("block {block}: unknown {what} format version {found}")]
    UnknownVersion { block: u64, what: &'static str, found: u32 },
    #[error("block {block}: header names address {found} (misdirected write?)")]
    BadAddr { block: u64, found: u64 },
    #[error("block {block}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadChecksum { block: u64, stored: u32, computed: u32 },
    #[error("block {block}: bad {field}: {reason}")]
    BadField { block: u64, field: &'static str, reason: String },
}

/// Shorthand for a field error.
pub(crate) fn bad(block: u64, field: &'static str, reason: impl Into<String>) -> FormatError {
    FormatError::BadField { block, field, reason: reason.into() }
}

/// Round up to a multiple of 8.
pub(crate) const fn align8(n: usize) -> usize {
    (n + 7) & !7
}

#[cfg(test)]
mod tests;
