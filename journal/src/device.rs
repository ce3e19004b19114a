//! The block device abstraction every piece of Concord storage sits on.
//!
//! A [`BlockDevice`] is a byte-addressed array whose I/O happens in whole
//! 4096-byte blocks at 4096-aligned offsets. [`BlockDevice::flush`] is the only
//! durability point: a write that completed before a flush returned is durable,
//! a write not followed by a flush may or may not be (see
//! `docs/internals/journal.md`, "What the journal assumes of the device").
//!
//! Implementations: [`crate::FileDevice`] (image file or block device, O_DIRECT),
//! [`crate::NbdDevice`] (an NBD server, over TCP), [`crate::MemDevice`] (in memory) and [`crate::CrashDevice`] (simulated power
//! cuts and injected failures, for tests).

/// Size of every block Concord reads or writes.
pub const BLOCK_SIZE: usize = 4096;

/// One block of the device.
pub type Block = [u8; BLOCK_SIZE];

/// Size of a disk sector: the unit a torn write is made of.
pub const SECTOR_SIZE: usize = 512;

/// Errors of the device layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    /// The operating system reported an error.
    #[error("device {op} at offset {offset} failed: {source}")]
    Io {
        /// `"open"`, `"read"`, `"write"`, `"flush"`, `"size"`.
        op: &'static str,
        /// Byte offset of the failed operation (0 for open/flush).
        offset: u64,
        /// The error itself.
        #[source]
        source: std::io::Error,
    },
    /// The request reaches past the end of the device.
    #[error("I/O of {len} bytes at offset {offset} is past the end of the device ({size} bytes)")]
    OutOfRange {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request.
        len: usize,
        /// Size of the device.
        size: u64,
    },
    /// Offset or length is not a multiple of [`BLOCK_SIZE`].
    #[error("I/O of {len} bytes at offset {offset} is not aligned to {BLOCK_SIZE} bytes")]
    Unaligned {
        /// Byte offset of the request.
        offset: u64,
        /// Length of the request.
        len: usize,
    },
    /// A failure injected by a test device ([`crate::CrashDevice::fail_after`]).
    #[error("injected device failure")]
    Injected,
    /// The simulated device lost power ([`crate::CrashDevice::power_cut`]).
    #[error("device is powered off")]
    PoweredOff,
    /// Write or flush on a device opened read-only.
    #[error("device is opened read-only")]
    ReadOnly,
    /// An `nbd://` device argument that cannot be parsed.
    #[error("bad NBD URL {url:?}: {why} (expected nbd://HOST[:PORT]/[EXPORT])")]
    NbdUrl {
        /// The argument as given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// No connection to the NBD server could be made (TCP connect or handshake).
    #[error("cannot connect to NBD server {server}: {why}")]
    NbdConnect {
        /// `host:port/export`.
        server: String,
        /// The system's error.
        why: String,
    },
    /// The NBD server refused the connection's negotiation (no such export, TLS
    /// required, a read-only export opened for writing, ...).
    #[error("NBD server {server} refused: {why}")]
    NbdRefused {
        /// `host:port/export`.
        server: String,
        /// The server's reason, or what the client could not accept.
        why: String,
    },
    /// The NBD server sent something the protocol does not allow; the connection is
    /// closed and the device fails every later call.
    #[error("NBD server {server} broke the protocol: {why}")]
    NbdProtocol {
        /// `host:port/export`.
        server: String,
        /// What was wrong.
        why: String,
    },
    /// The NBD server answered a request with an error.
    #[error("NBD {op} at offset {offset} failed on the server: error {errno}{}", if message.is_empty() { String::new() } else { format!(" ({message})") })]
    Nbd {
        /// `"read"`, `"write"`, `"flush"`, `"trim"`.
        op: &'static str,
        /// Byte offset of the request (of the chunk the server named, if it did).
        offset: u64,
        /// The NBD error value (errno numbering: 5 EIO, 28 ENOSPC, ...).
        errno: u32,
        /// The server's message, if it sent one (structured replies).
        message: String,
    },
    /// The connection to the NBD server is lost and could not be made again in time,
    /// or could not be made again safely; every later call fails.
    #[error("NBD server {server}: connection lost: {why}")]
    NbdDisconnected {
        /// `host:port/export`.
        server: String,
        /// Why the device gave up.
        why: String,
    },
    /// The file system holding the image refuses O_DIRECT.
    #[error("{path} cannot be opened with O_DIRECT (the file system refuses it, e.g. tmpfs); use --no-direct")]
    DirectUnsupported {
        /// The path that was opened.
        path: String,
    },
}

/// A shared block device.
///
/// All offsets and lengths are in bytes and must be multiples of
/// [`BLOCK_SIZE`]; otherwise the call returns [`DeviceError::Unaligned`].
/// Reads and writes are complete (never short). Implementations are safe to
/// call from many threads at once.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// Size in bytes, a multiple of [`BLOCK_SIZE`] (a ragged end is ignored).
    fn len(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// Writes `buf` at `offset`. Not durable until [`BlockDevice::flush`].
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError>;
    /// Makes every write that completed before this call durable (fdatasync).
    fn flush(&self) -> Result<(), DeviceError>;
}

/// Reads block number `addr`.
pub fn read_block(dev: &dyn BlockDevice, addr: u64, buf: &mut Block) -> Result<(), DeviceError> {
    dev.read_at(block_offset(addr)?, buf)
}

/// Writes block number `addr`.
pub fn write_block(dev: &dyn BlockDevice, addr: u64, buf: &Block) -> Result<(), DeviceError> {
    dev.write_at(block_offset(addr)?, buf)
}

fn block_offset(addr: u64) -> Result<u64, DeviceError> {
    addr.checked_mul(BLOCK_SIZE as u64).ok_or(DeviceError::OutOfRange { offset: u64::MAX, len: BLOCK_SIZE, size: 0 })
}

/// Checks alignment and range of a request; shared by every implementation.
// is_multiple_of needs Rust 1.87; the workspace's rust-version is 1.85.
#[allow(clippy::manual_is_multiple_of)]
pub(crate) fn check_io(offset: u64, len: usize, size: u64) -> Result<(), DeviceError> {
    let bs = BLOCK_SIZE as u64;
    if offset % bs != 0 || len % BLOCK_SIZE != 0 {
        return Err(DeviceError::Unaligned { offset, len });
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DeviceError::OutOfRange { offset, len, size }),
    }
}

/// A zeroed block on the heap.
pub fn zeroed_block() -> Box<Block> {
    // Allocated zeroed (calloc), not built on the stack and copied to the heap.
    let v = vec![0u8; BLOCK_SIZE].into_boxed_slice();
    match v.try_into() {
        Ok(b) => b,
        Err(_) => unreachable!("a vector of BLOCK_SIZE bytes"),
    }
}
