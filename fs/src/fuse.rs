//! The FUSE adapter: kernel requests in, [`Filesystem`] calls out. FUSE types and errno
//! values live only here.
//!
//! Inode numbers are dinode addresses; FUSE's root (1) maps to the root dinode. The
//! kernel may cache attributes and entries for [`ATTR_TTL`]: one node owns the device in
//! lock_nolock mode, and the cluster mode will invalidate through the notifier.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyLock, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, RequestId, TimeOrNow,
    WriteFlags,
};

use crate::format::*;
use crate::fs::{Attr, Filesystem, RenameFlags, SetAttr, SetTime, XattrSet};
use crate::plock::{FileLocks, LockKind, PlockResult, SetLock};
use crate::FsError;

/// How long the kernel may cache attributes and entries.
pub const ATTR_TTL: Duration = Duration::from_secs(10);
/// Largest write the kernel sends at once.
const MAX_WRITE: u32 = 1 << 20;

/// How many entries the first READDIRPLUS of a large directory returns (more than
/// [`PLUS_SHORT_ABOVE`] entries).
///
/// With `FUSE_READDIRPLUS_AUTO` the kernel asks for attributes with the first read of
/// every directory, and afterwards only when the reader went on to stat the entries
/// that came with attributes (`ls -l`, `du`); a reader that only wants names (`ls`,
/// `find`, a shell glob) gets plain READDIRs after the first. The kernel makes an inode
/// and a dentry for every entry of a READDIRPLUS (and forgets them later), which in a
/// cold `ls -f` of 20,000 names cost about 0.7 ms of the 9 ms the `ls` spent in the
/// kernel for the ~200 entries of the first reply. A short first reply keeps that to a
/// few entries; a reader that stats them is advised to READDIRPLUS at once and gets
/// full replies from the next read on, at the price of one more round trip.
/// Directories up to [`PLUS_SHORT_ABOVE`] entries get full replies from the start: `rm -r`
/// reads a directory whole before it unlinks, and every entry that came with a reply
/// spares it a LOOKUP; in a large directory the first reply covers a small share anyway.
const PLUS_FIRST: usize = 32;

/// Entries whose inode glocks a READDIRPLUS asks for ahead, in a cluster: more than one
/// reply holds (a 4 KiB reply buffer takes about 30 entries with their attributes), so
/// that the next reply's requests are already under way.
const PLUS_PREFETCH: usize = 128;

/// The size above which a directory's first READDIRPLUS is short ([`PLUS_FIRST`]):
/// more than a 32 KiB reply holds (about 200 entries with attributes).
const PLUS_SHORT_ABOVE: usize = 256;

/// The one place where filesystem errors become errno values.
pub fn errno(e: &FsError) -> Errno {
    match e {
        FsError::NotFound | FsError::Stale(_) => Errno::ENOENT,
        FsError::Exists(_) => Errno::EEXIST,
        FsError::NotDir => Errno::ENOTDIR,
        FsError::IsDir => Errno::EISDIR,
        FsError::NotEmpty => Errno::ENOTEMPTY,
        FsError::NoSpace => Errno::ENOSPC,
        FsError::NameTooLong => Errno::ENAMETOOLONG,
        FsError::Invalid(_) => Errno::EINVAL,
        FsError::NoAttr => Errno::ENODATA,
        FsError::TooBig => Errno::EFBIG,
        FsError::TooManyLinks => Errno::EMLINK,
        FsError::ReadOnly => Errno::EROFS,
        FsError::Access => Errno::EACCES,
        FsError::NotSupported(_) => Errno::EOPNOTSUPP,
        _ => Errno::EIO,
    }
}

/// The access check open(2) makes (the kernel's `may_open` with `generic_permission`,
/// for a regular file): `flags`' access mode (and O_TRUNC) needs read or write
/// permission in the class of `a`'s mode bits that the caller falls in (owner, group
/// with the supplementary `groups`, others). Root passes (CAP_DAC_OVERRIDE). ACLs and
/// capabilities other than root's are not seen: Concord stores no ACLs.
pub fn may_open(a: &Attr, flags: i32, uid: u32, gid: u32, groups: &[u32]) -> crate::Result<()> {
    if uid == 0 {
        return Ok(());
    }
    let (read, write) = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => (true, false),
        libc::O_WRONLY => (false, true),
        _ => (true, true),
    };
    let write = write || flags & libc::O_TRUNC != 0;
    let bits = if a.uid == uid {
        a.mode >> 6
    } else if a.gid == gid || groups.contains(&a.gid) {
        a.mode >> 3
    } else {
        a.mode
    };
    if (read && bits & 0o4 == 0) || (write && bits & 0o2 == 0) {
        return Err(FsError::Access);
    }
    Ok(())
}

/// The supplementary groups of process `pid` (its `Groups:` line in /proc), empty when
/// it cannot be read (the process is gone): then only its own gid counts.
fn supplementary_groups(pid: u32) -> Vec<u32> {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return Vec::new() };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

/// `fuse_lk_in.lk_flags`: the lock is a flock(2) lock.
const FUSE_LK_FLOCK: u32 = 1;

/// The kernel's OFFSET_MAX: a lock range ends at most here (to the end of the file).
const OFFSET_MAX: u64 = i64::MAX as u64;

/// The one place where file lock answers become errno values
/// (docs/internals/file-locks.md): a failure of the lock service itself (lockd
/// unreachable or failing, the node fenced or withdrawn) is ENOLCK, as fcntl(2)
/// documents for a lock table that cannot take the lock.
fn lock_errno(r: &crate::Result<PlockResult>) -> Option<Errno> {
    match r {
        Ok(PlockResult::Granted | PlockResult::Unlocked) => None,
        Ok(PlockResult::Again) => Some(Errno::EAGAIN),
        Ok(PlockResult::Deadlock) => Some(Errno::EDEADLK),
        Ok(PlockResult::Cancelled) => Some(Errno::EINTR),
        Ok(other) => {
            tracing::warn!(answer = ?other, "file lock: an answer that does not fit the request");
            Some(Errno::ENOLCK)
        }
        Err(e) => {
            tracing::warn!(error = %e, "file lock failed");
            Some(Errno::ENOLCK)
        }
    }
}

fn to_system(t: Time) -> SystemTime {
    if t.sec >= 0 {
        UNIX_EPOCH + Duration::new(t.sec as u64, t.nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(u64::from(t.nsec))
    }
}

fn from_system(t: SystemTime) -> Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Time { sec: d.as_secs() as i64, nsec: d.subsec_nanos() },
        Err(e) => {
            let d = e.duration();
            let (mut sec, mut nsec) = (-(d.as_secs() as i64), d.subsec_nanos());
            if nsec > 0 {
                sec -= 1;
                nsec = 1_000_000_000 - nsec;
            }
            Time { sec, nsec }
        }
    }
}

fn kind(mode: u32) -> FileType {
    match mode & S_IFMT {
        S_IFDIR => FileType::Directory,
        S_IFLNK => FileType::Symlink,
        S_IFIFO => FileType::NamedPipe,
        S_IFSOCK => FileType::Socket,
        S_IFCHR => FileType::CharDevice,
        S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn dtype_kind(dt: u8) -> FileType {
    match dt {
        DT_DIR => FileType::Directory,
        DT_LNK => FileType::Symlink,
        DT_FIFO => FileType::NamedPipe,
        DT_SOCK => FileType::Socket,
        DT_CHR => FileType::CharDevice,
        DT_BLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// The kernel's caches of a FUSE session, reached through fuser's notifier.
pub struct FuseKernelCache {
    notifier: fuser::Notifier,
    root: u64,
}

impl FuseKernelCache {
    pub fn new(notifier: fuser::Notifier, root: u64) -> FuseKernelCache {
        FuseKernelCache { notifier, root }
    }

    fn fuse_ino(&self, ino: u64) -> INodeNo {
        INodeNo(if ino == self.root { 1 } else { ino })
    }
}

/// ENOENT from a notification means the kernel had nothing cached: not an error.
fn notified(what: &str, r: std::io::Result<()>) {
    if let Err(e) = r {
        if e.raw_os_error() != Some(libc::ENOENT) {
            tracing::warn!(error = %e, "FUSE notification {what} failed");
        }
    }
}

impl crate::fs::KernelCache for FuseKernelCache {
    fn inval_inode(&self, ino: u64) {
        // Offset 0, length 0: the attributes and every cached page.
        notified("inval_inode", self.notifier.inval_inode(self.fuse_ino(ino), 0, 0));
    }

    fn inval_entry(&self, parent: u64, name: &[u8]) {
        notified("inval_entry", self.notifier.inval_entry(self.fuse_ino(parent), OsStr::from_bytes(name)));
    }

    fn write_back_range(&self, ino: u64, start: u64, end: u64) {
        // The kernel's `invalidate_inode_pages2_range` launders (writes back) a dirty
        // page before it drops it, and unmaps mapped ones. Length 0: to the end.
        let offset = start.min(i64::MAX as u64) as i64;
        let len = if end >= i64::MAX as u64 { 0 } else { (end - start).saturating_add(1).min(i64::MAX as u64) as i64 };
        notified("inval_inode (range)", self.notifier.inval_inode(self.fuse_ino(ino), offset, len));
    }
}

/// A mounted Concord filesystem served to the kernel.
#[derive(Debug)]
pub struct ConcordFuse {
    fs: Arc<Filesystem>,
    root: u64,
    /// How long the kernel may keep a name (and the attributes that come with it):
    /// [`ATTR_TTL`]. In a cluster every name given to the kernel is noted
    /// ([`ConcordFuse::named`]) and invalidated when its directory's glock leaves this
    /// node: coherence comes from invalidation, not from short timeouts.
    entry_ttl: Duration,
    /// Cluster mounts: flock and fcntl locks go to the cluster's lock service
    /// (docs/internals/file-locks.md). None for lock_nolock: the kernel keeps them.
    locks: Option<FileLocks>,
    /// The next open file's handle (each open file has its own: OFD locks are
    /// dropped when their file is released).
    next_fh: std::sync::atomic::AtomicU64,
}

impl ConcordFuse {
    pub fn new(fs: Arc<Filesystem>) -> ConcordFuse {
        let root = fs.root();
        let locks = fs.plocks().map(|p| {
            let f = fs.clone();
            FileLocks::new(p)
                .with_write_back(Arc::new(move |ino, start, end, done| f.kernel_write_back(ino, start, end, done)))
        });
        ConcordFuse { fs, root, entry_ttl: ATTR_TTL, locks, next_fh: std::sync::atomic::AtomicU64::new(1) }
    }

    fn new_fh(&self) -> FileHandle {
        FileHandle(self.next_fh.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    /// Runs `f`, an operation whose reply lets the kernel cache `name` in directory
    /// `parent` (a positive or negative entry), and notes the name for invalidation
    /// ([`Filesystem::note_entries`]) before the reply goes out. Returns the entry
    /// timeout for the reply: zero (the kernel asks again at its next use) when the
    /// name could not be noted (the directory's glock is leaving or left this node).
    fn named<T>(&self, parent: u64, name: &[u8], f: impl FnOnce() -> T) -> (T, Duration) {
        let epoch = self.fs.entry_epoch(parent);
        let r = f();
        (r, self.ttl(self.fs.note_entries(parent, epoch, [name])))
    }

    fn ttl(&self, noted: bool) -> Duration {
        if noted {
            self.entry_ttl
        } else {
            Duration::ZERO
        }
    }

    /// A CREATE (open with O_CREAT, without O_EXCL) found `name` in `dir` taken: the
    /// file is opened as open(2) would have opened it had the kernel seen the name. The
    /// kernel does none of that open's own checks for a CREATE (it marks the file
    /// created: no permission check, no O_TRUNC), so they are made here: a directory
    /// is EISDIR, any other non-regular file stays EEXIST (a symlink would have been
    /// followed; a rare race, told plainly), the caller needs the access its flags ask
    /// for ([`may_open`]), and O_TRUNC truncates.
    fn open_taken_name(&self, req: &Request, dir: u64, name: &[u8], flags: i32) -> crate::Result<Attr> {
        let a = self.fs.lookup(dir, name)?;
        match a.mode & S_IFMT {
            S_IFREG => {}
            S_IFDIR => return Err(FsError::IsDir),
            _ => return Err(FsError::Exists(String::from_utf8_lossy(name).into_owned())),
        }
        let groups = supplementary_groups(req.pid());
        may_open(&a, flags, req.uid(), req.gid(), &groups)?;
        if flags & libc::O_TRUNC != 0 {
            return self.fs.setattr(a.ino, &crate::fs::SetAttr { size: Some(0), ..Default::default() });
        }
        Ok(a)
    }

    fn ino(&self, i: INodeNo) -> u64 {
        if i.0 == 1 {
            self.root
        } else {
            i.0
        }
    }

    fn fuse_ino(&self, ino: u64) -> INodeNo {
        INodeNo(if ino == self.root { 1 } else { ino })
    }

    fn attr(&self, a: &Attr) -> FileAttr {
        FileAttr {
            ino: self.fuse_ino(a.ino),
            size: a.size,
            blocks: a.blocks * 8,
            atime: to_system(a.atime),
            mtime: to_system(a.mtime),
            ctime: to_system(a.ctime),
            crtime: to_system(a.ctime),
            kind: kind(a.mode),
            perm: (a.mode & 0o7777) as u16,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            rdev: a.rdev,
            blksize: BLOCK_SIZE as u32,
            flags: 0,
        }
    }

    /// Replies with an entry; the kernel now holds one lookup reference to it, which
    /// keeps an unlinked inode alive until the matching forget (its dirty pages may
    /// still be written back after the last close).
    fn entry(&self, (r, ttl): (crate::Result<Attr>, Duration), reply: ReplyEntry) {
        match r {
            Ok(a) => {
                self.fs.reference(a.ino, 1);
                reply.entry(&ttl, &self.attr(&a), Generation(a.generation))
            }
            Err(e) => reply.error(errno(&e)),
        }
    }
}

fn empty(r: crate::Result<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(&e)),
    }
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(s) => SetTime::At(from_system(s)),
    }
}

const FALLOC_FL_KEEP_SIZE: i32 = 1;
const FALLOC_FL_PUNCH_HOLE: i32 = 2;
const XATTR_CREATE: i32 = 1;
const XATTR_REPLACE: i32 = 2;

impl fuser::Filesystem for ConcordFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let _ = config.add_capabilities(InitFlags::FUSE_PARALLEL_DIROPS);
        // readdirplus only when the kernel sees stats follow readdir (ls -l), not for ls.
        let _ = config.add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        // The kernel keeps dirty pages and sends large writes back; single-node coherence
        // is trivially kept, the cluster mode flushes them on demotes (notify_inval_inode).
        // Not in a cluster: with it the kernel keeps its own size and mtime of a file
        // and would not see another node's extension or truncation of an open file.
        if !self.fs.is_cluster() {
            let _ = config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE);
        }
        // File locks through the filesystem, held across the cluster; a lock_nolock
        // mount leaves them to the kernel, right on one node and free.
        if self.locks.is_some() {
            if let Err(missing) = config.add_capabilities(InitFlags::FUSE_POSIX_LOCKS | InitFlags::FUSE_FLOCK_LOCKS) {
                tracing::warn!(
                    ?missing,
                    "the kernel does not offer cluster-wide file locks: they stay local to each node"
                );
            }
        }
        let _ = config.set_time_granularity(Duration::from_nanos(1));
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let dir = self.ino(parent);
        match self.named(dir, name.as_bytes(), || self.fs.lookup(dir, name.as_bytes())) {
            // A negative entry (node id 0) that the kernel may cache for the TTL.
            (Err(FsError::NotFound), ttl) => {
                let mut none = self.attr(&Attr {
                    ino: 0,
                    mode: S_IFREG,
                    nlink: 0,
                    uid: 0,
                    gid: 0,
                    size: 0,
                    blocks: 0,
                    atime: Time::default(),
                    mtime: Time::default(),
                    ctime: Time::default(),
                    rdev: 0,
                    generation: 0,
                });
                none.ino = INodeNo(0);
                reply.entry(&ttl, &none, Generation(0))
            }
            r => self.entry(r, reply),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let ino = self.ino(ino);
        if ino != self.root {
            if let Err(e) = self.fs.forget(ino, nlookup) {
                tracing::warn!(ino, error = %e, "forget");
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(self.ino(ino)) {
            Ok(a) => reply.attr(&ATTR_TTL, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let s = SetAttr { mode, uid, gid, size, atime: atime.map(set_time), mtime: mtime.map(set_time) };
        match self.fs.setattr(self.ino(ino), &s) {
            Ok(a) => reply.attr(&ATTR_TTL, &self.attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(self.ino(ino)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let mode = (mode & S_IFMT) | (mode & !umask & 0o7777);
        let dir = self.ino(parent);
        let r =
            self.named(dir, name.as_bytes(), || self.fs.mknod(dir, name.as_bytes(), mode, rdev, req.uid(), req.gid()));
        self.entry(r, reply);
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let dir = self.ino(parent);
        let r = self
            .named(dir, name.as_bytes(), || self.fs.mkdir(dir, name.as_bytes(), mode & !umask, req.uid(), req.gid()));
        self.entry(r, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.fs.unlink(self.ino(parent), name.as_bytes()), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.fs.rmdir(self.ino(parent), name.as_bytes()), reply);
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link_name: &OsStr, target: &std::path::Path, reply: ReplyEntry) {
        let dir = self.ino(parent);
        let r = self.named(dir, link_name.as_bytes(), || {
            self.fs.symlink(dir, link_name.as_bytes(), target.as_os_str().as_bytes(), req.uid(), req.gid())
        });
        self.entry(r, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(fuser::RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::EINVAL);
        }
        let f = RenameFlags {
            noreplace: flags.contains(fuser::RenameFlags::RENAME_NOREPLACE),
            exchange: flags.contains(fuser::RenameFlags::RENAME_EXCHANGE),
        };
        // The kernel moves its entry to the new name (and with EXCHANGE keeps both).
        let (p1, p2) = (self.ino(parent), self.ino(newparent));
        let (e1, e2) = (self.fs.entry_epoch(p1), self.fs.entry_epoch(p2));
        let r = self.fs.rename(p1, name.as_bytes(), p2, newname.as_bytes(), f);
        self.fs.note_renamed(p1, e1, name.as_bytes());
        self.fs.note_renamed(p2, e2, newname.as_bytes());
        empty(r, reply);
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let dir = self.ino(newparent);
        let r = self.named(dir, newname.as_bytes(), || self.fs.link(self.ino(ino), dir, newname.as_bytes()));
        self.entry(r, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.open(self.ino(ino)) {
            // One node owns the device: the kernel's pages stay valid across opens.
            Ok(_) => reply.opened(self.new_fh(), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let direct = flags.0 & libc::O_DIRECT != 0;
        self.fs.read_then(self.ino(ino), offset, size as usize, direct, |r| match r {
            Ok(d) => reply.data(d),
            Err(e) => reply.error(errno(&e)),
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(self.ino(ino), offset, data) {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// lock_nolock: not implemented, on purpose: the kernel sends FLUSH on every
    /// close(2) and waits for the answer, and after one ENOSYS it stops sending them
    /// (`fc->no_flush`). A close still writes the file's dirty pages back and reports
    /// their errors (the kernel does that before it would send FLUSH); Concord has
    /// nothing more to do at a close (POSIX locks are the kernel's: the mount does not
    /// offer FUSE_POSIX_LOCKS). Answering FLUSH would make creating and closing a file
    /// three round trips (LOOKUP, CREATE, FLUSH) instead of two.
    ///
    /// Cluster mounts: a close drops the closing process's POSIX locks on the inode
    /// (the kernel keeps no copy of them, so it sends no unlock of its own); lockd is
    /// asked only when that owner locked the inode since ([`FileLocks::flush`]).
    fn flush(&self, req: &Request, ino: INodeNo, fh: FileHandle, lock_owner: LockOwner, reply: ReplyEmpty) {
        let Some(locks) = &self.locks else { return reply.error(Errno::ENOSYS) };
        let ino = self.ino(ino);
        locks.flush(
            req.unique().0,
            ino,
            fh.0,
            lock_owner.0,
            Box::new(move |r| {
                // The close itself succeeded; a lock service that failed has lost this
                // node's locks anyway (fenced, lockd gone).
                if let Err(e) = r {
                    tracing::warn!(ino, error = %e, "file locks: unlock at close");
                }
                reply.ok()
            }),
        );
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let ino = self.ino(ino);
        let r = self.fs.release(ino);
        let Some(locks) = &self.locks else { return empty(r, reply) };
        // The file's flock lock (the kernel names its owner when the file ever took
        // one) and its OFD locks.
        locks.release(
            req.unique().0,
            ino,
            fh.0,
            lock_owner.map(|o| o.0),
            Box::new(move |u| {
                if let Err(e) = u {
                    tracing::warn!(ino, error = %e, "file locks: unlock at release");
                }
                empty(r, reply)
            }),
        );
    }

    fn interrupt(&self, _req: &Request, unique: RequestId) {
        if let Some(locks) = &self.locks {
            locks.interrupt(unique.0);
        }
    }

    /// F_GETLK: the pid of a conflicting lock is its holder's only when the holder is
    /// on this node; another node's pid means nothing here (the kernel would
    /// translate it to whatever local process has that number), so it is 0.
    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        let Some(locks) = &self.locks else { return reply.error(Errno::ENOSYS) };
        let write = match typ {
            libc::F_RDLCK => false,
            libc::F_WRLCK => true,
            _ => return reply.error(Errno::EINVAL),
        };
        let here = locks.node();
        locks.get(
            req.unique().0,
            self.ino(ino),
            lock_owner.0,
            start,
            end,
            write,
            Box::new(move |r| match r {
                Ok(PlockResult::Free) => reply.locked(start, end, libc::F_UNLCK, 0),
                Ok(PlockResult::Conflict(c)) => {
                    let typ = if c.write { libc::F_WRLCK } else { libc::F_RDLCK };
                    let pid = if c.node == here { c.pid } else { 0 };
                    reply.locked(c.start.min(OFFSET_MAX), c.end.min(OFFSET_MAX), typ, pid)
                }
                other => reply.error(lock_errno(&other).unwrap_or(Errno::ENOLCK)),
            }),
        );
    }

    /// F_SETLK, F_SETLKW (and the OFD variants) and flock(2). A waiting request is
    /// answered from the runtime: no FUSE thread waits for a lock.
    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        lk_flags: u32,
        reply: ReplyEmpty,
    ) {
        let Some(locks) = &self.locks else { return reply.error(Errno::ENOSYS) };
        let kind = match typ {
            libc::F_RDLCK => LockKind::Read,
            libc::F_WRLCK => LockKind::Write,
            libc::F_UNLCK => LockKind::Unlock,
            _ => return reply.error(Errno::EINVAL),
        };
        let flock = lk_flags & FUSE_LK_FLOCK != 0;
        let l = SetLock { owner: lock_owner.0, pid, start, end, kind, wait: sleep, flock };
        locks.set(
            req.unique().0,
            self.ino(ino),
            fh.0,
            l,
            Box::new(move |r| match lock_errno(&r) {
                None => reply.ok(),
                Some(e) => reply.error(e),
            }),
        );
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        empty(self.fs.fsync_inode(self.ino(ino), datasync), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.open(self.ino(ino)) {
            Ok(a) if a.mode & S_IFMT == S_IFDIR => reply.opened(FileHandle(0), FopenFlags::empty()),
            Ok(_) => {
                let _ = self.fs.release(self.ino(ino));
                reply.error(Errno::ENOTDIR)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let dir = self.ino(ino);
        if offset < 1 && reply.add(ino, 1, FileType::Directory, ".") {
            return reply.ok();
        }
        if offset < 2 {
            let parent = self.fs.parent_of(dir).unwrap_or(dir);
            if reply.add(self.fuse_ino(parent), 2, FileType::Directory, "..") {
                return reply.ok();
            }
        }
        let all = match self.fs.listing(dir) {
            Ok(v) => v,
            Err(e) => return reply.error(errno(&e)),
        };
        for e in all.after(if offset >= 3 { offset } else { 0 }) {
            if reply.add(self.fuse_ino(e.ino), e.hash, dtype_kind(e.dtype), OsStr::from_bytes(&e.name)) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let dir = self.ino(ino);
        let dot = |d: u64| self.fs.getattr(d).map(|a| self.attr(&a));
        if offset < 1 {
            match dot(dir) {
                Ok(a) if reply.add(ino, 1, ".", &ATTR_TTL, &a, Generation(0)) => return reply.ok(),
                Ok(_) => {}
                Err(e) => return reply.error(errno(&e)),
            }
        }
        if offset < 2 {
            let parent = self.fs.parent_of(dir).unwrap_or(dir);
            match dot(parent) {
                Ok(a) if reply.add(self.fuse_ino(parent), 2, "..", &ATTR_TTL, &a, Generation(0)) => return reply.ok(),
                Ok(_) => {}
                Err(e) => return reply.error(errno(&e)),
            }
        }
        let epoch = self.fs.entry_epoch(dir);
        let all = match self.fs.listing(dir) {
            Ok(v) => v,
            Err(e) => return reply.error(errno(&e)),
        };
        let limit = if offset < 3 && all.len() > PLUS_SHORT_ABOVE { PLUS_FIRST } else { usize::MAX };
        let names: Vec<&[u8]> =
            all.after(if offset >= 3 { offset } else { 0 }).take(limit).map(|e| &e.name[..]).collect();
        let ttl = self.ttl(self.fs.note_entries(dir, epoch, names));
        // The glocks of this reply's entries and of the next reply's, asked for at once.
        self.fs.prefetch_attrs(all.after(if offset >= 3 { offset } else { 0 }).take(PLUS_PREFETCH).map(|e| e.ino));
        for e in all.after(if offset >= 3 { offset } else { 0 }).take(limit) {
            // Each entry returned counts as a lookup for the kernel.
            let Ok(a) = self.fs.getattr(e.ino) else { continue };
            let fa = self.attr(&a);
            if reply.add(fa.ino, e.hash, OsStr::from_bytes(&e.name), &ttl, &fa, Generation(a.generation)) {
                break;
            }
            // Added: the kernel counts a lookup for it.
            self.fs.reference(e.ino, 1);
        }
        reply.ok();
    }

    fn releasedir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        empty(self.fs.release(self.ino(ino)), reply);
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        empty(self.fs.fsync(), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs() {
            Ok(s) => reply.statfs(s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let how = if flags & XATTR_CREATE != 0 {
            XattrSet::Create
        } else if flags & XATTR_REPLACE != 0 {
            XattrSet::Replace
        } else {
            XattrSet::Any
        };
        match self.fs.setxattr(self.ino(ino), name.as_bytes(), value, how) {
            Ok(()) => reply.ok(),
            Err(FsError::TooBig) => reply.error(Errno::E2BIG),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.fs.getxattr(self.ino(ino), name.as_bytes()) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.data(&v),
            Ok(_) => reply.error(Errno::ERANGE),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(self.ino(ino)) {
            Ok(names) => {
                let mut buf = Vec::new();
                for n in names {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                if size == 0 {
                    reply.size(buf.len() as u32)
                } else if buf.len() <= size as usize {
                    reply.data(&buf)
                } else {
                    reply.error(Errno::ERANGE)
                }
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.fs.removexattr(self.ino(ino), name.as_bytes()), reply);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // default_permissions: the kernel checks permissions itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let dir = self.ino(parent);
        let (r, ttl) = self.named(dir, name.as_bytes(), || {
            self.fs.create(dir, name.as_bytes(), mode & !umask & 0o7777, req.uid(), req.gid())
        });
        // open(O_CREAT) without O_EXCL on a name the kernel believed free: another
        // node made it since this one's lookup (the negative entry's invalidation waits
        // for the directory lock this request's open holds). POSIX opens the file then;
        // the kernel marks a CREATE's file as created and skips its own checks, so the
        // daemon makes them (see `open_taken_name`).
        let (r, fresh) = match r {
            Err(FsError::Exists(_)) if flags & libc::O_EXCL == 0 => {
                (self.open_taken_name(req, dir, name.as_bytes(), flags), false)
            }
            r => (r, true),
        };
        match r.and_then(|a| self.fs.open(a.ino)) {
            // One reference for the open handle (fs.open), one for the kernel's lookup.
            Ok(a) => {
                self.fs.reference(a.ino, 1);
                // An existing file's pages may be another node's older ones: dropped.
                let keep = if fresh { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
                reply.created(&ttl, &self.attr(&a), Generation(a.generation), self.new_fh(), keep)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode & !(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE) != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let keep = mode & FALLOC_FL_KEEP_SIZE != 0;
        let punch = mode & FALLOC_FL_PUNCH_HOLE != 0;
        empty(self.fs.fallocate(self.ino(ino), offset, length, keep, punch), reply);
    }

    // lseek(SEEK_DATA/SEEK_HOLE) is left to the kernel (FUSE_LSEEK answers ENOSYS, and the
    // kernel falls back to its generic llseek: the whole file is data, the hole is at its
    // end). With the writeback cache the kernel may hold dirty pages this process has not
    // seen yet, so an answer from the on-disk map could call freshly written data a hole.
    // `Filesystem::seek` gives the precise answer for data that has been written back.

    fn copy_file_range(
        &self,
        _req: &Request,
        ino_in: INodeNo,
        _fh_in: FileHandle,
        offset_in: u64,
        ino_out: INodeNo,
        _fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        let (src, dst) = (self.ino(ino_in), self.ino(ino_out));
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(u64::from(MAX_WRITE)) as usize;
            let data = match self.fs.read(src, offset_in + done, chunk) {
                Ok(d) => d,
                Err(e) => return reply.error(errno(&e)),
            };
            if data.is_empty() {
                break;
            }
            if let Err(e) = self.fs.write(dst, offset_out + done, &data) {
                return reply.error(errno(&e));
            }
            done += data.len() as u64;
        }
        reply.written(done.min(u64::from(u32::MAX)) as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(mode: u32, uid: u32, gid: u32) -> Attr {
        Attr {
            ino: 100,
            mode: S_IFREG | mode,
            nlink: 1,
            uid,
            gid,
            size: 0,
            blocks: 1,
            atime: Default::default(),
            mtime: Default::default(),
            ctime: Default::default(),
            rdev: 0,
            generation: 1,
        }
    }

    #[test]
    fn may_open_checks_the_class_the_caller_falls_in() {
        let (r, w, rw) = (libc::O_RDONLY, libc::O_WRONLY, libc::O_RDWR);
        let f = file(0o640, 1000, 50);
        // Owner: read and write.
        assert!(may_open(&f, rw, 1000, 1000, &[]).is_ok());
        // Group, by primary or supplementary gid: read only.
        assert!(may_open(&f, r, 2000, 50, &[]).is_ok());
        assert!(may_open(&f, r, 2000, 2000, &[7, 50]).is_ok());
        assert!(matches!(may_open(&f, w, 2000, 50, &[]), Err(FsError::Access)));
        assert!(matches!(may_open(&f, r | libc::O_TRUNC, 2000, 50, &[]), Err(FsError::Access)));
        // Others: nothing.
        assert!(matches!(may_open(&f, r, 2000, 2000, &[]), Err(FsError::Access)));
        // The owner class decides even when the group's bits would allow more.
        let g = file(0o460, 1000, 50);
        assert!(matches!(may_open(&g, w, 1000, 50, &[]), Err(FsError::Access)));
        assert!(may_open(&g, w, 2000, 50, &[]).is_ok());
        // Root passes.
        assert!(may_open(&file(0o000, 1000, 50), rw | libc::O_TRUNC, 0, 0, &[]).is_ok());
    }

    #[test]
    fn supplementary_groups_are_read_from_proc() {
        let mine = supplementary_groups(std::process::id());
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("Groups:")).unwrap();
        assert_eq!(mine.len(), line.split_whitespace().count() - 1, "{line}");
        assert!(supplementary_groups(u32::MAX).is_empty());
    }
}
