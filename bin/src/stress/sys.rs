//! The system calls of `concord stress` that std does not offer: fallocate, renameat2,
//! extended attributes, flock and OFD locks. Each returns `std::io::Result`.

use std::ffi::CString;
use std::fs::File;
use std::io::{Error, Result};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cpath(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| Error::from_raw_os_error(libc::EINVAL))
}

fn check(r: libc::c_int) -> Result<()> {
    if r < 0 {
        Err(Error::last_os_error())
    } else {
        Ok(())
    }
}

/// fallocate(2) with `mode` (0, FALLOC_FL_KEEP_SIZE, or PUNCH_HOLE|KEEP_SIZE).
pub fn fallocate(f: &File, mode: libc::c_int, off: u64, len: u64) -> Result<()> {
    // SAFETY: fallocate on a descriptor we own.
    check(unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) })
}

/// renameat2(2) with RENAME_EXCHANGE: swaps two existing names atomically.
pub fn exchange(a: &Path, b: &Path) -> Result<()> {
    let (a, b) = (cpath(a)?, cpath(b)?);
    // SAFETY: two NUL-terminated paths that live across the call.
    check(unsafe { libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE) })
}

/// lsetxattr(2).
pub fn set_xattr(p: &Path, name: &str, value: &[u8]) -> Result<()> {
    let (p, n) = (cpath(p)?, CString::new(name).map_err(|_| Error::from_raw_os_error(libc::EINVAL))?);
    // SAFETY: NUL-terminated path and name, a value slice that lives across the call.
    check(unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), value.as_ptr().cast(), value.len(), 0) })
}

/// lgetxattr(2): the value, or None for ENODATA.
pub fn get_xattr(p: &Path, name: &str) -> Result<Option<Vec<u8>>> {
    let (p, n) = (cpath(p)?, CString::new(name).map_err(|_| Error::from_raw_os_error(libc::EINVAL))?);
    let mut buf = vec![0u8; 4096];
    // SAFETY: NUL-terminated path and name, a buffer of the length given.
    let r = unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        let e = Error::last_os_error();
        return if e.raw_os_error() == Some(libc::ENODATA) { Ok(None) } else { Err(e) };
    }
    buf.truncate(r as usize);
    Ok(Some(buf))
}

/// lremovexattr(2).
pub fn remove_xattr(p: &Path, name: &str) -> Result<()> {
    let (p, n) = (cpath(p)?, CString::new(name).map_err(|_| Error::from_raw_os_error(libc::EINVAL))?);
    // SAFETY: NUL-terminated path and name.
    check(unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) })
}

/// llistxattr(2): the names.
pub fn list_xattrs(p: &Path) -> Result<Vec<String>> {
    let p = cpath(p)?;
    let mut buf = vec![0u8; 8192];
    // SAFETY: NUL-terminated path, a buffer of the length given.
    let r = unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf.split(|b| *b == 0).filter(|n| !n.is_empty()).map(|n| String::from_utf8_lossy(n).into_owned()).collect())
}

/// flock(2) LOCK_EX (waits) or LOCK_UN.
pub fn flock(f: &File, exclusive: bool) -> Result<()> {
    let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_UN };
    // SAFETY: flock on a descriptor we own.
    check(unsafe { libc::flock(f.as_raw_fd(), op) })
}

/// An OFD write lock of the whole file (F_OFD_SETLKW, waits), or its release.
pub fn ofd_lock(f: &File, lock: bool) -> Result<()> {
    // SAFETY: an all-zero flock is valid; l_pid must be 0 for OFD locks.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if lock { libc::F_WRLCK } else { libc::F_UNLCK } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    let cmd = if lock { libc::F_OFD_SETLKW } else { libc::F_OFD_SETLK };
    // SAFETY: fcntl with an OFD lock command on a descriptor we own and a valid flock.
    check(unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) })
}

/// Whether an error says the filesystem does not do this.
pub fn unsupported(e: &Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS))
}
