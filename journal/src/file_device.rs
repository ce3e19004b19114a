//! [`FileDevice`]: an image file or a block device, normally opened with O_DIRECT.
//!
//! O_DIRECT bypasses the kernel page cache, so a node never reads a stale copy
//! of a block another node wrote (DESIGN.md, "Storage"). It requires buffers
//! aligned to 4096 bytes in memory; when the caller's buffer is not aligned the
//! I/O goes through an internal aligned bounce buffer ([`AlignedBuf`]).

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::ptr::NonNull;

use crate::device::{check_io, BlockDevice, DeviceError, BLOCK_SIZE};

/// How to open a [`FileDevice`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenOptions {
    /// Open with O_DIRECT (default true). Turn off only for file systems that
    /// refuse it (`--no-direct`).
    pub direct: bool,
    /// Open read-only: writes and flushes fail with [`DeviceError::ReadOnly`].
    pub read_only: bool,
    /// Create the image file if missing and extend it to at least this many
    /// bytes. Ignored for block devices.
    pub create_size: Option<u64>,
}

impl Default for OpenOptions {
    fn default() -> OpenOptions {
        OpenOptions { direct: true, read_only: false, create_size: None }
    }
}

/// An image file or block device accessed with pread/pwrite.
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    len: u64,
    direct: bool,
    read_only: bool,
}

/// Largest bounce buffer used for one unaligned request; bigger requests are
/// split into pieces of this size.
const BOUNCE_MAX: usize = 1 << 20;

/// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)` on Linux with the generic ioctl
/// encoding (x86, arm, riscv).
const BLKGETSIZE64: u64 = (2 << 30) | ((std::mem::size_of::<usize>() as u64) << 16) | (0x12 << 8) | 114;

impl FileDevice {
    /// Opens `path` as described by `opts`.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<FileDevice, DeviceError> {
        let io = |op, source| DeviceError::Io { op, offset: 0, source };
        let mut oo = std::fs::OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.create_size.is_some() && !opts.read_only {
            oo.create(true);
        }
        if opts.direct {
            oo.custom_flags(libc::O_DIRECT);
        }
        let file = match oo.open(path) {
            Ok(f) => f,
            Err(e) if opts.direct && e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(DeviceError::DirectUnsupported { path: path.display().to_string() });
            }
            Err(e) => return Err(io("open", e)),
        };
        let meta = file.metadata().map_err(|e| io("size", e))?;
        let len = if meta.file_type().is_block_device() {
            block_device_size(&file).map_err(|e| io("size", e))?
        } else {
            if let Some(size) = opts.create_size {
                if meta.len() < size && !opts.read_only {
                    file.set_len(size).map_err(|e| io("size", e))?;
                }
            }
            file.metadata().map_err(|e| io("size", e))?.len()
        };
        Ok(FileDevice {
            file,
            len: len / BLOCK_SIZE as u64 * BLOCK_SIZE as u64,
            direct: opts.direct,
            read_only: opts.read_only,
        })
    }

    /// Claims the device for this process, without waiting: shared (`exclusive` false)
    /// or exclusive, with `flock(2)` on the opened file. Returns false when another
    /// open file holds a claim that conflicts. The claim lasts as long as the file is
    /// open. It is advisory: it keeps Concord processes on one machine from writing a
    /// device under each other (two single-node mounts, or mkfs under a mount), and
    /// sees nothing on other machines.
    pub fn try_claim(&self, exclusive: bool) -> std::io::Result<bool> {
        use std::os::fd::AsRawFd;
        let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
        // SAFETY: flock on a descriptor this FileDevice owns and keeps open.
        if unsafe { libc::flock(self.file.as_raw_fd(), op | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
            e => Err(e),
        }
    }

    fn io_error(&self, op: &'static str, offset: u64, source: std::io::Error) -> DeviceError {
        if self.direct && source.raw_os_error() == Some(libc::EINVAL) {
            tracing::error!(
                op,
                offset,
                "EINVAL on O_DIRECT I/O; the file system may refuse O_DIRECT (use --no-direct)"
            );
        }
        DeviceError::Io { op, offset, source }
    }

    fn needs_bounce(&self, ptr: *const u8) -> bool {
        self.direct && (ptr as usize) & (BLOCK_SIZE - 1) != 0
    }
}

fn block_device_size(file: &File) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to
    // a live, properly aligned u64 for the duration of the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(size)
}

impl BlockDevice for FileDevice {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        check_io(offset, buf.len(), self.len)?;
        if !self.needs_bounce(buf.as_ptr()) {
            return self.file.read_exact_at(buf, offset).map_err(|e| self.io_error("read", offset, e));
        }
        let mut bounce = AlignedBuf::new(buf.len().min(BOUNCE_MAX));
        for (i, piece) in buf.chunks_mut(BOUNCE_MAX).enumerate() {
            let off = offset + (i * BOUNCE_MAX) as u64;
            let tmp = &mut bounce.as_mut_slice()[..piece.len()];
            self.file.read_exact_at(tmp, off).map_err(|e| self.io_error("read", off, e))?;
            piece.copy_from_slice(tmp);
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        check_io(offset, buf.len(), self.len)?;
        if !self.needs_bounce(buf.as_ptr()) {
            return self.file.write_all_at(buf, offset).map_err(|e| self.io_error("write", offset, e));
        }
        let mut bounce = AlignedBuf::new(buf.len().min(BOUNCE_MAX));
        for (i, piece) in buf.chunks(BOUNCE_MAX).enumerate() {
            let off = offset + (i * BOUNCE_MAX) as u64;
            let tmp = &mut bounce.as_mut_slice()[..piece.len()];
            tmp.copy_from_slice(piece);
            self.file.write_all_at(tmp, off).map_err(|e| self.io_error("write", off, e))?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.file.sync_data().map_err(|e| self.io_error("flush", 0, e))
    }
}

/// A heap buffer aligned to [`BLOCK_SIZE`], as O_DIRECT requires.
///
/// Owns one allocation made with `Layout::from_size_align(len, BLOCK_SIZE)`,
/// zero-filled, freed on drop; exposed only as a slice, so it is as safe to
/// use as a `Vec<u8>`.
#[derive(Debug)]
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf uniquely owns its allocation (like Box<[u8]>); no shared
// interior state.
unsafe impl Send for AlignedBuf {}
// SAFETY: &AlignedBuf only gives out &[u8].
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` > 0).
    pub fn new(len: usize) -> AlignedBuf {
        assert!(len > 0, "AlignedBuf of zero bytes");
        let layout = Self::layout(len);
        // SAFETY: layout has a non-zero size (asserted above).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len, BLOCK_SIZE).expect("AlignedBuf size overflows")
    }

    /// The contents.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to len initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The contents, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const BS: u64 = BLOCK_SIZE as u64;

    /// A temp dir on a real disk file system (/tmp may be tmpfs, which refuses O_DIRECT).
    fn disk_tempdir() -> tempfile::TempDir {
        tempfile::Builder::new().prefix("concord-journal-test").tempdir_in("/var/tmp").unwrap()
    }

    fn exercise(dev: &FileDevice) {
        assert_eq!(dev.len(), 64 * BS);
        // Aligned buffer.
        let mut a = AlignedBuf::new(2 * BLOCK_SIZE);
        a.as_mut_slice().fill(0xAB);
        dev.write_at(4 * BS, a.as_slice()).unwrap();
        // Deliberately misaligned buffer: a slice one byte into a Vec.
        let mut v = vec![0u8; 3 * BLOCK_SIZE + 1];
        for (i, b) in v.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let unaligned = &v[1..];
        dev.write_at(10 * BS, unaligned).unwrap();
        dev.flush().unwrap();
        let mut back = vec![0u8; 3 * BLOCK_SIZE + 1];
        dev.read_at(10 * BS, &mut back[1..]).unwrap();
        assert_eq!(&back[1..], unaligned);
        let mut b = AlignedBuf::new(2 * BLOCK_SIZE);
        dev.read_at(4 * BS, b.as_mut_slice()).unwrap();
        assert!(b.as_slice().iter().all(|&x| x == 0xAB));
        assert!(matches!(dev.read_at(64 * BS, b.as_mut_slice()), Err(DeviceError::OutOfRange { .. })));
        assert!(matches!(dev.write_at(7, a.as_slice()), Err(DeviceError::Unaligned { .. })));
    }

    #[test]
    fn image_file_direct_and_buffered() {
        let dir = disk_tempdir();
        let path = dir.path().join("img");
        for direct in [true, false] {
            let opts = OpenOptions { direct, read_only: false, create_size: Some(64 * BS + 100) };
            let dev = match FileDevice::open(&path, &opts) {
                Err(DeviceError::DirectUnsupported { .. }) if direct => {
                    eprintln!("SKIP image_file_direct_and_buffered (direct): /var/tmp refuses O_DIRECT");
                    continue;
                }
                r => r.unwrap(),
            };
            exercise(&dev);
        }
        // Reopen read-only: data is there, writes are refused.
        let ro = OpenOptions { direct: false, read_only: true, create_size: None };
        let dev = FileDevice::open(&path, &ro).unwrap();
        let mut b = vec![0u8; BLOCK_SIZE];
        dev.read_at(4 * BS, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0xAB));
        assert!(matches!(dev.write_at(0, &b), Err(DeviceError::ReadOnly)));
    }

    #[test]
    fn missing_file_without_create_is_an_error() {
        let dir = disk_tempdir();
        let r = FileDevice::open(&dir.path().join("nope"), &OpenOptions::default());
        assert!(matches!(r, Err(DeviceError::Io { op: "open", .. })));
    }

    #[test]
    fn direct_on_tmpfs_says_no_direct() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("SKIP direct_on_tmpfs_says_no_direct: no /dev/shm");
            return;
        }
        let dir = tempfile::Builder::new().prefix("concord-journal-test").tempdir_in(shm).unwrap();
        let opts = OpenOptions { create_size: Some(BS), ..OpenOptions::default() };
        match FileDevice::open(&dir.path().join("img"), &opts) {
            Err(e @ DeviceError::DirectUnsupported { .. }) => {
                assert!(e.to_string().contains("--no-direct"));
            }
            Ok(_) => {
                eprintln!("SKIP direct_on_tmpfs_says_no_direct: /dev/shm accepts O_DIRECT here")
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }

    /// Detaches a loop device on drop, even when the test fails.
    struct LoopGuard(String);

    impl Drop for LoopGuard {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }

    #[test]
    fn loop_block_device() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            crate::skip_test("loop_block_device", "not root");
            return;
        }
        let dir = disk_tempdir();
        let img = dir.path().join("img");
        std::fs::File::create(&img).unwrap().set_len(64 * BS).unwrap();
        let out = match Command::new("losetup").arg("--find").arg("--show").arg(&img).output() {
            Ok(o) if o.status.success() => o,
            Ok(o) => {
                let why = format!("losetup failed: {}", String::from_utf8_lossy(&o.stderr).trim());
                crate::skip_test("loop_block_device", &why);
                return;
            }
            Err(e) => {
                crate::skip_test("loop_block_device", &format!("losetup unavailable: {e}"));
                return;
            }
        };
        let guard = LoopGuard(String::from_utf8_lossy(&out.stdout).trim().to_string());
        let dev = FileDevice::open(Path::new(&guard.0), &OpenOptions::default()).unwrap();
        exercise(&dev);
        drop(dev);
        // The data reached the image file underneath.
        let raw = std::fs::read(&img).unwrap();
        assert!(raw[4 * BLOCK_SIZE..6 * BLOCK_SIZE].iter().all(|&x| x == 0xAB));
    }
}
