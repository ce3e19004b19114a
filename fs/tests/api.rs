//! The filesystem API on a memory device: every operation, persistence across
//! remounts, large directories and sparse files.

use std::sync::Arc;

use concord_fs::format::*;
use concord_fs::mkfs::{mkfs, MkfsOptions};
use concord_fs::*;
use concord_journal::{BlockDevice, CrashDevice, MemDevice};

fn new_dev(mib: u64) -> Arc<dyn BlockDevice> {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(mib << 20));
    let o = MkfsOptions { journals: 2, journal_mib: Some(8), ..Default::default() };
    mkfs(&dev, &o, &mut |_, _| {}).expect("mkfs");
    dev
}

fn mount(dev: &Arc<dyn BlockDevice>) -> Filesystem {
    Filesystem::mount(dev.clone(), &MountOptions::default()).expect("mount")
}

#[test]
fn create_write_read_and_remount() {
    let dev = new_dev(64);
    let fs = mount(&dev);
    let root = fs.root();
    let f = fs.create(root, b"hello", 0o644, 1000, 1000).unwrap();
    assert_eq!(f.mode, S_IFREG | 0o644);
    assert_eq!(f.uid, 1000);
    fs.write(f.ino, 0, b"hello world").unwrap();
    assert_eq!(fs.read(f.ino, 0, 100).unwrap(), b"hello world");
    assert_eq!(fs.read(f.ino, 6, 3).unwrap(), b"wor");
    // Past 3936 bytes the file is unstuffed into blocks, holes read as zeros.
    fs.write(f.ino, 100_000, b"tail").unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().size, 100_004);
    let all = fs.read(f.ino, 0, 200_000).unwrap();
    assert_eq!(all.len(), 100_004);
    assert_eq!(&all[..11], b"hello world");
    assert!(all[11..100_000].iter().all(|&b| b == 0));
    assert_eq!(&all[100_000..], b"tail");
    fs.unmount().unwrap();
    drop(fs);
    let fs = mount(&dev);
    let a = fs.lookup(root, b"hello").unwrap();
    assert_eq!(a.ino, f.ino);
    assert_eq!(fs.read(a.ino, 99_998, 10).unwrap(), b"\0\0tail");
}

#[test]
fn directories_links_and_errors() {
    let dev = new_dev(64);
    let fs = mount(&dev);
    let root = fs.root();
    let d = fs.mkdir(root, b"d", 0o755, 0, 0).unwrap();
    assert_eq!(fs.getattr(root).unwrap().nlink, 3);
    assert!(matches!(fs.mkdir(root, b"d", 0o755, 0, 0), Err(FsError::Exists(_))));
    let f = fs.create(d.ino, b"f", 0o600, 0, 0).unwrap();
    assert!(matches!(fs.rmdir(root, b"d"), Err(FsError::NotEmpty)));
    assert!(matches!(fs.unlink(root, b"d"), Err(FsError::IsDir)));
    assert!(matches!(fs.rmdir(d.ino, b"f"), Err(FsError::NotDir)));
    fs.link(f.ino, root, b"hard").unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().nlink, 2);
    fs.unlink(d.ino, b"f").unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().nlink, 1);
    fs.rmdir(root, b"d").unwrap();
    assert!(matches!(fs.lookup(root, b"d"), Err(FsError::NotFound)));
    assert_eq!(fs.getattr(root).unwrap().nlink, 2);
    let s = fs.symlink(root, b"ln", b"/some/target", 0, 0).unwrap();
    assert_eq!(fs.readlink(s.ino).unwrap(), b"/some/target");
    assert!(matches!(fs.create(root, &[b'x'; 256], 0o644, 0, 0), Err(FsError::NameTooLong)));
    let fifo = fs.mknod(root, b"fifo", S_IFIFO | 0o644, 0, 0, 0).unwrap();
    assert_eq!(fifo.mode & S_IFMT, S_IFIFO);
}

#[test]
fn rename_noreplace_exchange_and_cycles() {
    let dev = new_dev(64);
    let fs = mount(&dev);
    let root = fs.root();
    let a = fs.create(root, b"a", 0o644, 0, 0).unwrap();
    let b = fs.create(root, b"b", 0o644, 0, 0).unwrap();
    let nr = RenameFlags { noreplace: true, exchange: false };
    assert!(matches!(fs.rename(root, b"a", root, b"b", nr), Err(FsError::Exists(_))));
    let ex = RenameFlags { noreplace: false, exchange: true };
    fs.rename(root, b"a", root, b"b", ex).unwrap();
    assert_eq!(fs.lookup(root, b"a").unwrap().ino, b.ino);
    assert_eq!(fs.lookup(root, b"b").unwrap().ino, a.ino);
    // Plain rename over an existing file frees the target.
    fs.rename(root, b"a", root, b"b", RenameFlags::default()).unwrap();
    assert_eq!(fs.lookup(root, b"b").unwrap().ino, b.ino);
    assert!(matches!(fs.getattr(a.ino), Err(FsError::Stale(_))));
    let d1 = fs.mkdir(root, b"d1", 0o755, 0, 0).unwrap();
    let d2 = fs.mkdir(d1.ino, b"d2", 0o755, 0, 0).unwrap();
    assert!(matches!(fs.rename(root, b"d1", d2.ino, b"x", RenameFlags::default()), Err(FsError::Invalid(_))));
    fs.rename(d1.ino, b"d2", root, b"d2", RenameFlags::default()).unwrap();
    assert_eq!(fs.getattr(d1.ino).unwrap().nlink, 2);
    assert_eq!(fs.getattr(root).unwrap().nlink, 4);
    assert_eq!(fs.lookup(d2.ino, b"..").unwrap().ino, root);
}

#[test]
fn large_directory_hashes_and_lists_everything() {
    let dev = new_dev(256);
    let fs = mount(&dev);
    let root = fs.root();
    let d = fs.mkdir(root, b"big", 0o755, 0, 0).unwrap();
    let n = 20_000;
    for i in 0..n {
        fs.create(d.ino, format!("file-{i:06}").as_bytes(), 0o644, 0, 0).unwrap();
    }
    for i in (0..n).step_by(997) {
        fs.lookup(d.ino, format!("file-{i:06}").as_bytes()).unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    let mut after = 0;
    loop {
        let v = fs.readdir(d.ino, after, 100).unwrap();
        let Some(last) = v.last() else { break };
        after = last.cookie;
        for e in v {
            assert!(seen.insert(e.name), "duplicate entry in readdir");
        }
    }
    assert_eq!(seen.len(), n);
    for i in 0..n {
        if i % 3 != 0 {
            fs.unlink(d.ino, format!("file-{i:06}").as_bytes()).unwrap();
        }
    }
    assert!(matches!(fs.lookup(d.ino, b"file-000001"), Err(FsError::NotFound)));
    fs.lookup(d.ino, b"file-000003").unwrap();
    fs.unmount().unwrap();
    drop(fs);
    let fs = mount(&dev);
    let mut count = 0;
    let mut after = 0;
    loop {
        let v = fs.readdir(d.ino, after, 1000).unwrap();
        let Some(last) = v.last() else { break };
        after = last.cookie;
        count += v.len();
    }
    assert_eq!(count, n.div_ceil(3));
}

#[test]
fn sparse_terabyte_file_truncate_and_punch() {
    let dev = new_dev(64);
    let fs = mount(&dev);
    let root = fs.root();
    let f = fs.create(root, b"sparse", 0o644, 0, 0).unwrap();
    let tib = 1u64 << 40;
    fs.write(f.ino, tib - 4, b"end!").unwrap();
    fs.write(f.ino, 5 << 30, b"mid").unwrap();
    assert_eq!(fs.getattr(f.ino).unwrap().size, tib);
    assert_eq!(fs.read(f.ino, tib - 4, 10).unwrap(), b"end!");
    assert_eq!(fs.read(f.ino, (5 << 30) - 1, 5).unwrap(), b"\0mid\0");
    assert_eq!(fs.seek(f.ino, 0, true).unwrap(), Some(5 << 30));
    let free_before = fs.statfs().unwrap().bfree;
    fs.setattr(f.ino, &SetAttr { size: Some(10), ..Default::default() }).unwrap();
    fs.fsync().unwrap();
    fs.checkpoint().unwrap();
    assert!(fs.statfs().unwrap().bfree > free_before, "truncate frees blocks");
    let g = fs.create(root, b"g", 0o644, 0, 0).unwrap();
    fs.write(g.ino, 0, &vec![7u8; 40_000]).unwrap();
    fs.fallocate(g.ino, 5000, 20_000, true, true).unwrap();
    let v = fs.read(g.ino, 0, 40_000).unwrap();
    assert!(v[..5000].iter().all(|&b| b == 7));
    assert!(v[5000..25_000].iter().all(|&b| b == 0));
    assert!(v[25_000..].iter().all(|&b| b == 7));
    fs.fallocate(g.ino, 0, 100_000, false, false).unwrap();
    assert_eq!(fs.getattr(g.ino).unwrap().size, 100_000);
}

#[test]
fn xattrs_and_setattr() {
    let dev = new_dev(64);
    let fs = mount(&dev);
    let root = fs.root();
    let f = fs.create(root, b"x", 0o644, 0, 0).unwrap();
    assert!(matches!(fs.getxattr(f.ino, b"user.a"), Err(FsError::NoAttr)));
    fs.setxattr(f.ino, b"user.a", b"1", XattrSet::Any).unwrap();
    fs.setxattr(f.ino, b"trusted.b", b"22", XattrSet::Create).unwrap();
    assert!(matches!(fs.setxattr(f.ino, b"user.a", b"x", XattrSet::Create), Err(FsError::Exists(_))));
    assert!(matches!(fs.setxattr(f.ino, b"user.zz", b"x", XattrSet::Replace), Err(FsError::NoAttr)));
    assert!(matches!(fs.setxattr(f.ino, b"bogus.a", b"x", XattrSet::Any), Err(FsError::NotSupported(_))));
    assert_eq!(fs.getxattr(f.ino, b"trusted.b").unwrap(), b"22");
    assert_eq!(fs.listxattr(f.ino).unwrap(), vec![b"trusted.b".to_vec(), b"user.a".to_vec()]);
    fs.removexattr(f.ino, b"user.a").unwrap();
    fs.removexattr(f.ino, b"trusted.b").unwrap();
    assert!(fs.listxattr(f.ino).unwrap().is_empty());
    let a = fs
        .setattr(
            f.ino,
            &SetAttr {
                mode: Some(0o4711),
                uid: Some(5),
                gid: Some(6),
                mtime: Some(SetTime::At(Time { sec: 7, nsec: 8 })),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!((a.mode, a.uid, a.gid, a.mtime), (S_IFREG | 0o4711, 5, 6, Time { sec: 7, nsec: 8 }));
}

#[test]
fn unlinked_open_file_lives_until_release() {
    let dev = new_dev(64);
    let fs = mount(&dev);
    let root = fs.root();
    let f = fs.create(root, b"tmp", 0o644, 0, 0).unwrap();
    fs.write(f.ino, 0, &vec![1u8; 50_000]).unwrap();
    fs.open(f.ino).unwrap();
    fs.unlink(root, b"tmp").unwrap();
    assert_eq!(fs.read(f.ino, 0, 3).unwrap(), vec![1, 1, 1]);
    fs.release(f.ino).unwrap();
    assert!(matches!(fs.getattr(f.ino), Err(FsError::Stale(_))));
    // Unlinked while open, then the node dies: the next mount frees it.
    let g = fs.create(root, b"tmp2", 0o644, 0, 0).unwrap();
    fs.open(g.ino).unwrap();
    fs.unlink(root, b"tmp2").unwrap();
    fs.fsync().unwrap();
    drop(fs); // no unmount: a crash
    let fs = mount(&dev);
    assert!(matches!(fs.getattr(g.ino), Err(FsError::Stale(_))));
}

/// The kernel's time flush after the last unlink of a regular file (a SETATTR of the
/// mtime alone, in writeback-cache mode) answers with the new times and commits
/// nothing; a time change of a linked file, and any other change of an unlinked one,
/// still commit.
#[test]
fn time_flush_of_an_unlinked_file_commits_nothing() {
    let crash = Arc::new(CrashDevice::new(64 << 20, 1));
    let dev: Arc<dyn BlockDevice> = crash.clone();
    mkfs(&dev, &MkfsOptions { journals: 1, journal_mib: Some(8), ..Default::default() }, &mut |_, _| {}).unwrap();
    let fs = mount(&dev);
    let root = fs.root();
    let f = fs.create(root, b"f", 0o644, 0, 0).unwrap();
    let g = fs.create(root, b"g", 0o644, 0, 0).unwrap();
    fs.open(f.ino).unwrap();
    fs.unlink(root, b"f").unwrap();
    fs.fsync().unwrap();
    let at = |sec| SetAttr { mtime: Some(SetTime::At(Time { sec, nsec: 0 })), ..Default::default() };
    let w = crash.stats().writes;
    assert_eq!(fs.setattr(f.ino, &at(11)).unwrap().mtime, Time { sec: 11, nsec: 0 });
    fs.fsync().unwrap();
    assert_eq!(crash.stats().writes, w, "the time flush of an unlinked file was journaled");
    // A linked file's times are kept.
    fs.setattr(g.ino, &at(12)).unwrap();
    fs.fsync().unwrap();
    assert!(crash.stats().writes > w, "the mtime of a linked file was not journaled");
    // So is a mode change of the unlinked file (it is still open).
    let w = crash.stats().writes;
    let mode = SetAttr { mode: Some(0o600), ..Default::default() };
    assert_eq!(fs.setattr(f.ino, &mode).unwrap().mode, S_IFREG | 0o600);
    fs.fsync().unwrap();
    assert!(crash.stats().writes > w);
    fs.release(f.ino).unwrap();
    assert!(matches!(fs.getattr(f.ino), Err(FsError::Stale(_))));
    fs.unmount().unwrap();
    let fs = mount(&dev);
    assert_eq!(fs.getattr(g.ino).unwrap().mtime, Time { sec: 12, nsec: 0 });
}

/// mkfs options of a lock_dlm filesystem (table alpha:fs1).
fn dlm_mkfs_options() -> MkfsOptions {
    MkfsOptions {
        lockproto: LOCKPROTO_DLM.into(),
        locktable: "alpha:fs1".into(),
        journal_mib: Some(8),
        ..Default::default()
    }
}

#[test]
fn mount_refuses_foreign_and_dlm_devices() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
    assert!(matches!(Filesystem::mount(dev.clone(), &MountOptions::default()), Err(FsError::Invalid(_))));
    let o = dlm_mkfs_options();
    mkfs(&dev, &o, &mut |_, _| {}).unwrap();
    assert!(matches!(Filesystem::mount(dev.clone(), &MountOptions::default()), Err(FsError::NotSupported(_))));
    let fs = Filesystem::mount(dev.clone(), &MountOptions { force_nolock: true, ..Default::default() }).unwrap();
    fs.unmount().unwrap();
    // mkfs refuses to overwrite without force.
    assert!(matches!(mkfs(&dev, &o, &mut |_, _| {}), Err(FsError::Exists(_))));
}

/// Records every lock request, to check that operations go through lock handles.
#[derive(Debug, Default)]
struct Recorder(std::sync::Mutex<Vec<(concord_fs::lock::LockName, concord_fs::lock::LockMode)>>);

impl concord_fs::lock::LockModule for Recorder {
    fn acquire(
        &self,
        name: concord_fs::lock::LockName,
        mode: concord_fs::lock::LockMode,
    ) -> Result<concord_fs::lock::LockHold> {
        self.0.lock().unwrap().push((name, mode));
        Ok(concord_fs::lock::LockHold::new(name, mode))
    }
    fn proto(&self) -> &'static str {
        "recorder"
    }
}

/// The locks one call took, in the order taken: `inode N SH|EX`, `rgrp EX` (any rgrp:
/// which one depends on the allocator), `rename EX`.
fn took(rec: &Recorder, names: &[(u64, &str)], f: impl FnOnce()) -> Vec<String> {
    use concord_fs::lock::{LockMode, LockName};
    rec.0.lock().unwrap().clear();
    f();
    let got = std::mem::take(&mut *rec.0.lock().unwrap());
    let mut out: Vec<String> = Vec::new();
    for (n, m) in got {
        let m = if m == LockMode::Shared { "SH" } else { "EX" };
        let s = match n {
            LockName::Rename => format!("rename {m}"),
            LockName::Inode(i) => {
                let name = names.iter().find(|(x, _)| *x == i).map_or_else(|| i.to_string(), |(_, s)| s.to_string());
                format!("{name} {m}")
            }
            LockName::Rgrp(_) => format!("rgrp {m}"),
            LockName::Iopen(i) => format!("iopen {i} {m}"),
            LockName::Journal(j) => format!("journal {j} {m}"),
        };
        if out.last() != Some(&s) {
            out.push(s);
        }
    }
    out
}

/// Every operation of the filesystem API takes exactly these locks, in this order (the
/// lock module sees each inode and rgrp access; a new or changed call shows here). What
/// takes no lock yet is listed at the end: `parent_of` and `statfs` (cluster mounts will
/// need them); `fsync`s write back what the caller's earlier locked calls changed.
#[test]
fn every_filesystem_operation_takes_exactly_these_locks() {
    let dev = new_dev(64);
    let rec = Arc::new(Recorder::default());
    let fs = Filesystem::mount_with(dev.clone(), &MountOptions::default(), rec.clone()).unwrap();
    let root = fs.root();
    let d = fs.mkdir(root, b"d", 0o755, 0, 0).unwrap().ino;
    let f = fs.create(root, b"f", 0o644, 0, 0).unwrap().ino;
    fs.write(f, 0, &vec![1u8; 10_000]).unwrap();
    let g = fs.create(d, b"g", 0o644, 0, 0).unwrap().ino;
    let sl = fs.symlink(root, b"sl", &[b'y'; 4000], 0, 0).unwrap().ino;
    let n = [(root, "root"), (d, "d"), (f, "f"), (g, "g"), (sl, "sl")];
    let t = |op: &dyn Fn()| took(&rec, &n, op);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let ids = std::cell::RefCell::new(Vec::new());
    let cases: Vec<(&str, Vec<String>, Vec<String>)> = vec![
        (
            "getattr",
            t(&|| {
                let _ = fs.getattr(f).unwrap();
            }),
            s(&["f SH"]),
        ),
        (
            "lookup",
            t(&|| {
                let _ = fs.lookup(root, b"f").unwrap();
            }),
            s(&["root SH"]),
        ),
        ("create", t(&|| ids.borrow_mut().push(fs.create(d, b"c", 0o644, 0, 0).unwrap().ino)), s(&["d EX", "rgrp EX"])),
        (
            "mkdir",
            t(&|| {
                let _ = fs.mkdir(d, b"m", 0o755, 0, 0).unwrap();
            }),
            s(&["d EX", "rgrp EX"]),
        ),
        (
            "mknod",
            t(&|| {
                let _ = fs.mknod(d, b"p", S_IFIFO | 0o644, 0, 0, 0).unwrap();
            }),
            s(&["d EX", "rgrp EX"]),
        ),
        (
            "symlink",
            t(&|| {
                let _ = fs.symlink(d, b"s", b"f", 0, 0).unwrap();
            }),
            s(&["d EX", "rgrp EX"]),
        ),
        (
            "long symlink",
            t(&|| {
                let _ = fs.symlink(d, b"l", &[b'x'; 4000], 0, 0).unwrap();
            }),
            s(&["d EX", "rgrp EX"]),
        ),
        (
            "readlink",
            t(&|| {
                let _ = fs.readlink(sl).unwrap();
            }),
            s(&["sl SH"]),
        ),
        (
            "link",
            t(&|| {
                let _ = fs.link(f, d, b"f2").unwrap();
            }),
            s(&["d EX", "f EX"]),
        ),
        ("unlink", t(&|| fs.unlink(d, b"f2").unwrap()), s(&["d EX"])),
        ("rmdir", t(&|| fs.rmdir(d, b"m").unwrap()), s(&["d EX", "rgrp EX"])),
        ("rename in a directory", t(&|| fs.rename(d, b"g", d, b"h", RenameFlags::default()).unwrap()), s(&["d EX"])),
        (
            "rename across",
            t(&|| fs.rename(d, b"h", root, b"g", RenameFlags::default()).unwrap()),
            s(&["rename EX", "root EX", "d EX"]),
        ),
        (
            "open",
            t(&|| {
                let _ = fs.open(f).unwrap();
            }),
            s(&["f SH"]),
        ),
        (
            "read",
            t(&|| {
                let _ = fs.read(f, 0, 100).unwrap();
            }),
            s(&["f SH"]),
        ),
        (
            "read_direct",
            t(&|| {
                let _ = fs.read_direct(f, 0, 100).unwrap();
            }),
            s(&["f SH"]),
        ),
        (
            "overwrite",
            t(&|| {
                let _ = fs.write(f, 0, b"abc").unwrap();
            }),
            s(&["f EX"]),
        ),
        (
            "append",
            t(&|| {
                let _ = fs.write(f, 10_000, &[2u8; 8192]).unwrap();
            }),
            s(&["f EX", "rgrp EX"]),
        ),
        (
            "chmod",
            t(&|| {
                let _ = fs.setattr(f, &SetAttr { mode: Some(0o600), ..Default::default() }).unwrap();
            }),
            s(&["f EX"]),
        ),
        (
            "truncate down",
            t(&|| {
                let _ = fs.setattr(f, &SetAttr { size: Some(100), ..Default::default() }).unwrap();
            }),
            s(&["f EX", "rgrp EX"]),
        ),
        ("fallocate", t(&|| fs.fallocate(f, 0, 20_000, false, false).unwrap()), s(&["f EX", "rgrp EX"])),
        ("punch", t(&|| fs.fallocate(f, 4096, 8192, true, true).unwrap()), s(&["f EX", "rgrp EX"])),
        (
            "seek",
            t(&|| {
                let _ = fs.seek(f, 0, false).unwrap();
            }),
            s(&["f SH"]),
        ),
        (
            "readdir",
            t(&|| {
                let _ = fs.readdir(d, 0, 100).unwrap();
            }),
            s(&["d SH"]),
        ),
        (
            "listing",
            t(&|| {
                let _ = fs.listing(root).unwrap();
            }),
            s(&["root SH"]),
        ),
        ("setxattr", t(&|| fs.setxattr(f, b"user.a", b"1", XattrSet::Any).unwrap()), s(&["f EX", "rgrp EX"])),
        (
            "getxattr",
            t(&|| {
                let _ = fs.getxattr(f, b"user.a").unwrap();
            }),
            s(&["f SH"]),
        ),
        (
            "listxattr",
            t(&|| {
                let _ = fs.listxattr(f).unwrap();
            }),
            s(&["f SH"]),
        ),
        ("removexattr", t(&|| fs.removexattr(f, b"user.a").unwrap()), s(&["f EX", "rgrp EX"])),
        ("fsync_inode", t(&|| fs.fsync_inode(f, false).unwrap()), s(&[])),
        ("fsync", t(&|| fs.fsync().unwrap()), s(&[])),
        // The dinode's bitmap state becomes "unlinked" (the rgrp). The victim's own
        // dinode changes under its parent's lock only: cluster mounts must lock it.
        ("unlink while open", t(&|| fs.unlink(root, b"f").unwrap()), s(&["root EX", "rgrp EX"])),
        ("release of the last reference", t(&|| fs.release(f).unwrap()), s(&["f EX", "rgrp EX"])),
        (
            "parent_of",
            t(&|| {
                let _ = fs.parent_of(d).unwrap();
            }),
            s(&[]),
        ),
        (
            "statfs",
            t(&|| {
                let _ = fs.statfs().unwrap();
            }),
            s(&[]),
        ),
    ];
    let wrong: Vec<String> = cases
        .iter()
        .filter(|(_, got, want)| got != want)
        .map(|(op, got, want)| format!("{op}: took {got:?}, expected {want:?}"))
        .collect();
    assert!(wrong.is_empty(), "locks differ:\n{}", wrong.join("\n"));
    assert_eq!(ids.borrow().len(), 1);
}

#[test]
fn concurrent_writers_and_readers_see_whole_writes() {
    let dev = new_dev(128);
    let fs = Arc::new(mount(&dev));
    let root = fs.root();
    let shared = fs.create(root, b"shared", 0o644, 0, 0).unwrap();
    let chunk = 64 * 1024;
    let threads: Vec<_> = (0..4u8)
        .map(|t| {
            let fs = fs.clone();
            std::thread::spawn(move || {
                let own = fs.create(root, format!("own{t}").as_bytes(), 0o644, 0, 0).unwrap();
                for round in 0..20u8 {
                    let data = vec![t.wrapping_mul(31).wrapping_add(round); chunk];
                    // Disjoint ranges of one file, and a file of its own.
                    let off = (u64::from(round) * 4 + u64::from(t)) * chunk as u64;
                    fs.write(shared.ino, off, &data).unwrap();
                    fs.write(own.ino, u64::from(round) * chunk as u64, &data).unwrap();
                    let back = fs.read(shared.ino, off, chunk).unwrap();
                    assert!(back == data, "thread {t} round {round}: a read saw a partial write");
                }
                own.ino
            })
        })
        .collect();
    let owns: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (t, ino) in owns.iter().enumerate() {
        for round in 0..20u8 {
            let want = vec![(t as u8).wrapping_mul(31).wrapping_add(round); chunk];
            assert!(fs.read(*ino, u64::from(round) * chunk as u64, chunk).unwrap() == want);
            let off = (u64::from(round) * 4 + t as u64) * chunk as u64;
            assert!(fs.read(shared.ino, off, chunk).unwrap() == want);
        }
    }
    fs.fsync().unwrap();
    fs.unmount().unwrap();
    let report =
        concord_fs::fsck::fsck(&dev, &concord_fs::fsck::FsckOptions { repair: false }, &mut |_, _| {}).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
}

/// Finds the device block holding `pattern` at its start (file data is written in place).
fn find_block(dev: &Arc<dyn BlockDevice>, pattern: &[u8]) -> u64 {
    let mut b = vec![0u8; 4096];
    for addr in 0..dev.len() / 4096 {
        dev.read_at(addr * 4096, &mut b).unwrap();
        if b.starts_with(pattern) {
            return addr;
        }
    }
    panic!("pattern not on the device");
}

#[test]
fn data_cache_stays_coherent_with_every_change_to_file_data() {
    let dev = new_dev(64);
    let fs = mount(&dev);
    let root = fs.root();
    let f = fs.create(root, b"f", 0o644, 0, 0).unwrap().ino;
    let block = |v: u8| vec![v; 4096];
    for i in 0..8u8 {
        fs.write(f, u64::from(i) * 4096, &block(i + 1)).unwrap();
    }
    // Reads fill the cache.
    assert_eq!(fs.read_direct(f, 0, 8 * 4096).unwrap()[4096 * 3], 4);
    assert!(fs.cached_data_blocks() >= 8);
    // Overwrite, partial overwrite.
    fs.write(f, 4096, &block(0xaa)).unwrap();
    fs.write(f, 2 * 4096 + 100, b"xyz").unwrap();
    let all = fs.read_direct(f, 0, 8 * 4096).unwrap();
    assert_eq!(all[4096], 0xaa);
    assert_eq!(&all[2 * 4096 + 100..2 * 4096 + 103], b"xyz");
    assert_eq!(all[2 * 4096 + 103], 3);
    // Truncate into a block, then grow again: the cut bytes read as zeros.
    fs.setattr(f, &SetAttr { size: Some(5 * 4096 + 10), ..Default::default() }).unwrap();
    // The last block, cut by the end of the file, is kept too (zero-filled past it).
    let before = fs.cached_data_blocks();
    assert_eq!(fs.read(f, 5 * 4096, 4096).unwrap(), vec![6u8; 10]);
    assert_eq!(fs.cached_data_blocks(), before + 1);
    assert_eq!(fs.read(f, 5 * 4096, 4096).unwrap(), vec![6u8; 10]);
    fs.setattr(f, &SetAttr { size: Some(8 * 4096), ..Default::default() }).unwrap();
    let all = fs.read_direct(f, 0, 8 * 4096).unwrap();
    assert!(all[5 * 4096..5 * 4096 + 10].iter().all(|&b| b == 6));
    assert!(all[5 * 4096 + 10..].iter().all(|&b| b == 0), "bytes cut by truncate came back");
    // Punch a hole.
    fs.read_direct(f, 0, 8 * 4096).unwrap();
    fs.fallocate(f, 0, 4096, true, true).unwrap();
    assert!(fs.read_direct(f, 0, 4096).unwrap().iter().all(|&b| b == 0));
    // Grow by writing past the end: the gap reads as zeros.
    fs.write(f, 12 * 4096, &block(9)).unwrap();
    let all = fs.read_direct(f, 0, 13 * 4096).unwrap();
    assert!(all[8 * 4096..12 * 4096].iter().all(|&b| b == 0));
    assert_eq!(all[12 * 4096], 9);
    // A freed inode's number reused by a new file shows nothing of the old one.
    fs.unlink(root, b"f").unwrap();
    // Freed blocks are handed out again once the free is durable.
    fs.fsync().unwrap();
    let mut reused = false;
    for i in 0..64 {
        let name = format!("g{i}");
        let g = fs.create(root, name.as_bytes(), 0o644, 0, 0).unwrap().ino;
        fs.write(g, 0, &vec![0x55; 3 * 4096]).unwrap();
        let got = fs.read_direct(g, 0, 8 * 4096).unwrap();
        assert!(got == vec![0x55; 3 * 4096], "file {name} (inode {g}) shows stale data");
        if g == f {
            reused = true;
            break;
        }
    }
    assert!(reused, "the test wants the freed inode number back");
}

#[test]
fn a_single_block_read_keeps_its_window_and_the_window_stays_coherent() {
    let dev = new_dev(64);
    let fs = mount(&dev);
    let root = fs.root();
    let f = fs.create(root, b"f", 0o644, 0, 0).unwrap().ino;
    // 20 blocks and 100 bytes, each block marked with its number.
    let mut data: Vec<u8> = (0..20 * 4096 + 100).map(|i| (i / 4096) as u8 ^ 0xa5).collect();
    for (i, b) in data.chunks_mut(4096).enumerate() {
        b[..8].copy_from_slice(&(i as u64 + 1000).to_le_bytes());
    }
    fs.write(f, 0, &data).unwrap();
    fs.fsync().unwrap();
    fs.checkpoint().unwrap();
    // A miss of block 3 reads blocks 0..16 and keeps them.
    assert!(fs.read(f, 3 * 4096, 4096).unwrap() == data[3 * 4096..4 * 4096]);
    assert_eq!(fs.cached_data_blocks(), 16);
    // A hit reads nothing more.
    assert!(fs.read(f, 9 * 4096 + 5, 100).unwrap() == data[9 * 4096 + 5..9 * 4096 + 105]);
    assert_eq!(fs.cached_data_blocks(), 16);
    // The neighbours came from that one read: change block 9 behind the filesystem's
    // back and it still serves the bytes it read around block 3.
    let addr9 = find_block(&dev, &data[9 * 4096..9 * 4096 + 8]);
    dev.write_at(addr9 * 4096, &[0xee; 4096]).unwrap();
    assert!(fs.read(f, 9 * 4096, 4096).unwrap() == data[9 * 4096..10 * 4096], "block 9 was not read around block 3");
    fs.drop_caches(f);
    assert_eq!(fs.cached_data_blocks(), 0);
    assert!(fs.read(f, 9 * 4096, 4096).unwrap() == vec![0xee; 4096], "drop_caches kept the window");
    data[9 * 4096..10 * 4096].fill(0xee);
    // A write into the window is read back, and so are the blocks beside it.
    fs.write(f, 7 * 4096 + 10, b"written").unwrap();
    data[7 * 4096 + 10..7 * 4096 + 17].copy_from_slice(b"written");
    for b in [7u64, 6, 8, 15] {
        let at = (b * 4096) as usize;
        assert!(fs.read(f, b * 4096, 4096).unwrap() == data[at..at + 4096], "block {b}");
    }
    // The last window is clipped to the end of the file: 16..20 and the 100-byte tail.
    let before = fs.cached_data_blocks();
    assert!(fs.read(f, 17 * 4096, 4096).unwrap() == data[17 * 4096..18 * 4096]);
    assert_eq!(fs.cached_data_blocks(), before + 5);
    assert!(fs.read(f, 20 * 4096, 4096).unwrap() == data[20 * 4096..]);
    // Truncate into the window and grow again: the cut bytes read as zeros.
    fs.setattr(f, &SetAttr { size: Some(18 * 4096 + 5), ..Default::default() }).unwrap();
    fs.setattr(f, &SetAttr { size: Some(21 * 4096), ..Default::default() }).unwrap();
    let got = fs.read(f, 18 * 4096, 4096).unwrap();
    assert!(got[..5] == data[18 * 4096..18 * 4096 + 5]);
    assert!(got[5..].iter().all(|&b| b == 0), "bytes cut by truncate came back");
    assert!(fs.read(f, 19 * 4096, 4096).unwrap().iter().all(|&b| b == 0));
    assert!(fs.read(f, 16 * 4096, 4096).unwrap() == data[16 * 4096..17 * 4096]);
    // A read that crosses two windows is read as asked, without read-around.
    let before = fs.cached_data_blocks();
    fs.drop_caches(f);
    assert!(fs.read(f, 15 * 4096 + 2048, 4096).unwrap() == data[15 * 4096 + 2048..16 * 4096 + 2048]);
    assert!(fs.cached_data_blocks() < before);
    assert!(fs.cached_data_blocks() <= 2);
}

#[test]
fn small_direct_reads_are_cached_and_drop_caches_forgets_an_inode() {
    let dev = new_dev(64);
    let fs = mount(&dev);
    let root = fs.root();
    let f = fs.create(root, b"big", 0o644, 0, 0).unwrap().ino;
    let mib = 1usize << 20;
    let mut data: Vec<u8> = (0..8 * mib).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
    for (i, b) in data.chunks_mut(4096).enumerate() {
        b[..16].copy_from_slice(&[&(i as u64).to_le_bytes()[..], b"blockmrk"].concat());
    }
    fs.write(f, 0, &data).unwrap();
    // Buffered reads of more than a block (the kernel's readahead for a sequential
    // reader; its page cache holds them) add nothing; a buffered read of one block (a
    // random reader) is kept with its 16-block window; a small O_DIRECT read is kept; a
    // large O_DIRECT read is read in parallel pieces and not kept.
    fs.read(f, 0, 64 << 10).unwrap();
    assert_eq!(fs.cached_data_blocks(), 0);
    fs.read(f, 200 * 4096, 4096).unwrap();
    assert_eq!(fs.cached_data_blocks(), 16);
    fs.read_direct(f, 100 * 4096, 4096).unwrap();
    assert_eq!(fs.cached_data_blocks(), 17);
    for i in 0..8 {
        assert!(fs.read_direct(f, (i * mib) as u64, mib).unwrap() == data[i * mib..(i + 1) * mib], "MiB {i}");
    }
    assert_eq!(fs.cached_data_blocks(), 17);
    // Unaligned, across cached and uncached blocks.
    let got = fs.read_direct(f, 99 * 4096 + 17, 3 * 4096).unwrap();
    assert!(got == data[99 * 4096 + 17..102 * 4096 + 17]);
    let mut off = 0;
    while off < data.len() {
        assert!(fs.read_direct(f, off as u64, 128 * 1024).unwrap() == data[off..off + 128 * 1024], "at {off}");
        off += 128 * 1024;
    }
    assert_eq!(fs.cached_data_blocks(), 2048);
    // Change a block behind the filesystem's back (as another node would): the cache
    // still serves the old bytes until the inode's caches are dropped.
    fs.fsync().unwrap();
    fs.checkpoint().unwrap();
    let addr = find_block(&dev, &data[5 * 4096..5 * 4096 + 16]);
    dev.write_at(addr * 4096, &[0xee; 4096]).unwrap();
    assert!(fs.read(f, 5 * 4096, 4096).unwrap() == data[5 * 4096..6 * 4096], "block 5 was not cached");
    fs.drop_caches(f);
    assert_eq!(fs.cached_data_blocks(), 0);
    assert!(fs.read(f, 5 * 4096, 4096).unwrap() == vec![0xee; 4096], "drop_caches kept stale data");
    data[5 * 4096..6 * 4096].fill(0xee);
    // A mount without a data cache reads the device every time.
    drop(fs);
    let fs = Filesystem::mount(dev.clone(), &MountOptions { data_cache_bytes: 0, ..Default::default() }).unwrap();
    assert!(fs.read_direct(f, 0, mib).unwrap() == data[..mib]);
    assert!(fs.read_direct(f, 4096, 4096).unwrap() == data[4096..8192]);
    assert_eq!(fs.cached_data_blocks(), 0);
}

/// A full metadata cache makes room by evicting an eighth of itself: it is never
/// emptied, and what it serves stays right.
#[test]
fn a_full_metadata_cache_evicts_an_eighth_and_is_never_emptied() {
    let dev = new_dev(64);
    let fs = mount(&dev);
    let root = fs.root();
    let inos: Vec<u64> =
        (0..300).map(|i| fs.create(root, format!("f{i}").as_bytes(), 0o640, i, 7).unwrap().ino).collect();
    fs.unmount().unwrap();
    drop(fs);
    let max = 64;
    let fs = Filesystem::mount(dev.clone(), &MountOptions { meta_cache_blocks: max, ..Default::default() }).unwrap();
    let mut was_full = false;
    for round in 0..2 {
        for (i, &ino) in inos.iter().enumerate() {
            let a = if round == 0 { fs.lookup(root, format!("f{i}").as_bytes()) } else { fs.getattr(ino) };
            let a = a.unwrap();
            assert_eq!((a.ino, a.uid, a.mode), (ino, i as u32, S_IFREG | 0o640));
            let n = fs.cached_meta_blocks();
            assert!(n <= max, "{n} blocks cached, more than {max}");
            was_full |= n == max;
            assert!(!was_full || n >= max - max / 8, "cache fell to {n} blocks after being full");
        }
    }
    assert!(was_full, "300 inodes never filled a 64-block cache");
}

#[test]
fn decoded_metadata_is_reused_until_drop_caches() {
    let dev = new_dev(64);
    // Without a data cache, every read maps its block.
    let fs = Filesystem::mount(dev.clone(), &MountOptions { data_cache_bytes: 0, ..Default::default() }).unwrap();
    let f = fs.create(fs.root(), b"mapped", 0o644, 0, 0).unwrap().ino;
    let data: Vec<u8> = (0..2048 * 4096).map(|i| (i / 4096) as u8).collect();
    fs.write(f, 0, &data).unwrap();
    assert!(fs.read(f, 5 * 4096, 4096).unwrap() == data[5 * 4096..6 * 4096]);
    fs.fsync().unwrap();
    fs.checkpoint().unwrap();
    assert_eq!(fs.cached_data_blocks(), 0);
    // Behind the filesystem's back (as another node would): swap the device blocks of
    // logical blocks 5 and 6 in the file's indirect block, and change its owner.
    let read = |addr: u64| {
        let mut b = concord_journal::zeroed_block();
        concord_journal::read_block(dev.as_ref(), addr, &mut b).unwrap();
        b
    };
    let mut d = Dinode::decode(&read(f), f).unwrap();
    assert!(d.height >= 2, "height {}", d.height);
    let ind = d.ptr(0);
    let mut ptrs = decode_indirect(&read(ind), ind, f, dev.len() / 4096).unwrap();
    ptrs.swap(5, 6);
    dev.write_at(ind * 4096, &encode_indirect(&ptrs, ind, f)[..]).unwrap();
    d.uid = 4242;
    dev.write_at(f * 4096, &d.encode(f)[..]).unwrap();
    // The decoded dinode and pointers are served until the inode's caches are dropped ...
    assert!(fs.read(f, 5 * 4096, 4096).unwrap() == data[5 * 4096..6 * 4096]);
    assert_eq!(fs.getattr(f).unwrap().uid, 0);
    fs.drop_caches(f);
    // ... and decoded again from the device after.
    assert!(fs.read(f, 5 * 4096, 4096).unwrap() == data[6 * 4096..7 * 4096], "stale block map");
    assert!(fs.read(f, 6 * 4096, 4096).unwrap() == data[5 * 4096..6 * 4096], "stale block map");
    assert_eq!(fs.getattr(f).unwrap().uid, 4242, "stale dinode");
}

#[test]
fn cached_directory_listings_follow_every_change() {
    let dev = new_dev(64);
    let fs = mount(&dev);
    let root = fs.root();
    let d = fs.mkdir(root, b"d", 0o755, 0, 0).unwrap().ino;
    let e = fs.mkdir(root, b"e", 0o755, 0, 0).unwrap().ino;
    let names = |dir: u64| {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let v = fs.readdir(dir, after, 7).unwrap();
            let Some(last) = v.last() else { break };
            after = last.cookie;
            out.extend(v.into_iter().map(|i| String::from_utf8(i.name).unwrap()));
        }
        out.sort();
        out
    };
    // The listing kept up to date through the changes equals one built from the device.
    let same_as_rebuilt = |dir: u64| {
        let kept = fs.listing(dir).unwrap();
        fs.drop_caches(dir);
        assert_eq!(*kept, *fs.listing(dir).unwrap(), "directory {dir}");
    };
    for i in 0..300 {
        fs.create(d, format!("n{i}").as_bytes(), 0o644, 0, 0).unwrap();
    }
    assert_eq!(names(d).len(), 300);
    // Every kind of change after the listing was cached shows in the next one.
    fs.create(d, b"new", 0o644, 0, 0).unwrap();
    fs.unlink(d, b"n5").unwrap();
    fs.rename(d, b"n6", e, b"moved", RenameFlags::default()).unwrap();
    fs.rename(d, b"n7", d, b"n7b", RenameFlags::default()).unwrap();
    fs.link(fs.lookup(d, b"n8").unwrap().ino, d, b"n8link").unwrap();
    fs.mkdir(d, b"sub", 0o755, 0, 0).unwrap();
    fs.rename(d, b"n9", d, b"n10", RenameFlags { exchange: true, ..Default::default() }).unwrap();
    assert!(fs.create(d, b"n11", 0o644, 0, 0).is_err());
    same_as_rebuilt(d);
    same_as_rebuilt(e);
    let got = names(d);
    assert_eq!(got.len(), 300 + 1 - 1 - 1 + 1 + 1);
    for (n, present) in [("new", true), ("n5", false), ("n6", false), ("n7", false), ("n7b", true), ("n8link", true)] {
        assert_eq!(got.contains(&n.to_string()), present, "{n}");
        assert_eq!(fs.lookup(d, n.as_bytes()).is_ok(), present, "lookup {n}");
    }
    assert_eq!(names(e), vec!["moved".to_string()]);
    fs.rename(d, b"new", e, b"moved", RenameFlags::default()).unwrap();
    assert!(fs.lookup(d, b"new").is_err());
    assert_eq!(names(e), vec!["moved".to_string()]);
    same_as_rebuilt(d);
    same_as_rebuilt(e);
    // A small (stuffed) directory's listing is kept up to date too.
    let s = fs.mkdir(root, b"small", 0o755, 0, 0).unwrap().ino;
    assert!(names(s).is_empty());
    fs.create(s, b"a", 0o644, 0, 0).unwrap();
    fs.create(s, b"b", 0o644, 0, 0).unwrap();
    fs.unlink(s, b"a").unwrap();
    assert_eq!(names(s), vec!["b".to_string()]);
    same_as_rebuilt(s);
    // rmdir of a listed directory, and a new one under the same name.
    fs.rmdir(d, b"sub").unwrap();
    let sub = fs.mkdir(d, b"sub", 0o755, 0, 0).unwrap().ino;
    assert!(names(sub).is_empty());
}

/// mkfs picks smaller rgrps for a cluster filesystem on a small device, so that every
/// journal's share of the rgrps (where its node allocates) holds rgrps of its own; a
/// single-node filesystem and an asked-for size keep theirs.
#[test]
fn mkfs_gives_every_journal_rgrps_of_its_own() {
    let sb_of = |o: MkfsOptions| {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(256 << 20));
        mkfs(&dev, &o, &mut |_, _| {}).expect("mkfs").sb
    };
    let dlm = |journals| MkfsOptions { journals, lockproto: LOCKPROTO_DLM.into(), ..Default::default() };
    for journals in [2, 3, 4] {
        let sb = sb_of(dlm(journals));
        let n = sb.rgrp_count as usize;
        let min = sb.rgrp_blocks == concord_fs::mkfs::MIN_AUTO_RGRP_BLOCKS;
        assert!(n >= 2 * journals as usize || min, "{journals} journals, {n} rgrps of {} blocks", sb.rgrp_blocks);
        assert!(sb.rgrp_blocks < DEFAULT_RGRP_BLOCKS, "{journals} journals on 256 MiB keep 128 MiB rgrps");
        // The first rgrp of each journal's share (Core::spread_allocation) differs.
        let starts: std::collections::BTreeSet<usize> =
            (0..journals as usize).map(|j| j * n / journals as usize).collect();
        assert_eq!(starts.len(), journals as usize, "{n} rgrps: {starts:?}");
    }
    assert_eq!(sb_of(MkfsOptions { journals: 3, ..Default::default() }).rgrp_blocks, DEFAULT_RGRP_BLOCKS);
    assert_eq!(sb_of(MkfsOptions { rgrp_blocks: Some(4096), ..dlm(3) }).rgrp_blocks, 4096);
    // Never below 32 MiB by itself: 64 journals on 256 MiB share what there is.
    let sb = sb_of(MkfsOptions { journal_mib: Some(8), ..dlm(20) });
    assert_eq!(sb.rgrp_blocks, concord_fs::mkfs::MIN_AUTO_RGRP_BLOCKS);
}

/// A cluster's lock module as the allocator sees it: every lock is granted when asked
/// for, but taken inside a transaction (`try_now`) only once asked for (a glock not yet
/// cached), and new inodes should get numbers whose lock directory is node 1 of three.
#[derive(Debug, Default)]
struct Uncached(std::sync::Mutex<std::collections::HashSet<concord_fs::lock::LockName>>);

impl concord_fs::lock::LockModule for Uncached {
    fn acquire(
        &self,
        name: concord_fs::lock::LockName,
        mode: concord_fs::lock::LockMode,
    ) -> Result<concord_fs::lock::LockHold> {
        self.0.lock().unwrap().insert(name);
        Ok(concord_fs::lock::LockHold::new(name, mode))
    }
    fn try_now(
        &self,
        name: concord_fs::lock::LockName,
        mode: concord_fs::lock::LockMode,
    ) -> Result<Option<concord_fs::lock::LockHold>> {
        Ok(self.0.lock().unwrap().contains(&name).then(|| concord_fs::lock::LockHold::new(name, mode)))
    }
    /// Rgrps are free to take (no other node holds one).
    fn try_acquire(
        &self,
        name: concord_fs::lock::LockName,
        mode: concord_fs::lock::LockMode,
    ) -> Result<Option<concord_fs::lock::LockHold>> {
        if matches!(name, concord_fs::lock::LockName::Rgrp(_)) {
            return self.acquire(name, mode).map(Some);
        }
        self.try_now(name, mode)
    }
    fn local_directory(&self) -> Option<concord_fs::lock::LocalDirectory> {
        Some(concord_fs::lock::LocalDirectory::new(1, vec![1, 2, 3]))
    }
    fn is_cluster(&self) -> bool {
        true
    }
    fn proto(&self) -> &'static str {
        "uncached"
    }
}

/// A create whose new inode's glock is not cached ends its first attempt for it
/// (`NeedLock`), takes it, and tries again: the retry must pick the same inode number.
/// It picked the next one after the last number given, so every retry needed another
/// lock, and creates failed with EIO ("needed more than N locks") under load.
#[test]
fn a_create_retried_for_its_new_inodes_lock_takes_the_same_number() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
    mkfs(&dev, &dlm_mkfs_options(), &mut |_, _| {}).unwrap();
    let locks = Arc::new(Uncached::default());
    let fs = Filesystem::mount_with(dev.clone(), &MountOptions { cluster: true, ..Default::default() }, locks.clone())
        .unwrap();
    let root = fs.root();
    let dir = concord_fs::lock::LocalDirectory::new(1, vec![1, 2, 3]);
    let mut inos = Vec::new();
    for k in 0..40 {
        let ino = fs.create(root, format!("f{k}").as_bytes(), 0o644, 0, 0).unwrap().ino;
        assert!(dir.is_local(ino), "inode {ino}: its lock directory is another node");
        inos.push(ino);
    }
    inos.sort_unstable();
    inos.dedup();
    assert_eq!(inos.len(), 40);
    // Every number but the ones it took was asked for at most by a prefetch: no
    // create took a lock for an inode it did not make.
    let asked = locks.0.lock().unwrap().iter().filter(|n| matches!(n, concord_fs::lock::LockName::Inode(_))).count();
    assert_eq!(asked, 40 + 1, "inode locks asked for: the 40 new ones and the root");
}

/// New inode numbers whose lock directory is this node, in a cluster: once an rgrp has
/// none left, the allocator tries for another rgrp (no queueing) rather than taking
/// numbers whose first lock request goes to another node, and it does not walk again,
/// on every create, over the free blocks it leaves for data. It walked from its goal
/// each time (creates slowed down as the rgrp filled: 2.4k to 0.4k per second on one
/// node of three after 40k creates), and then took the rgrp's first free block, whose
/// lock directory is another node two times in three.
#[test]
fn creates_keep_taking_local_numbers_without_walking_the_same_blocks_again() {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20));
    mkfs(&dev, &MkfsOptions { rgrp_blocks: Some(1024), ..dlm_mkfs_options() }, &mut |_, _| {}).unwrap();
    let locks = Arc::new(Uncached::default());
    let fs = Filesystem::mount_with(dev.clone(), &MountOptions { cluster: true, ..Default::default() }, locks.clone())
        .unwrap();
    let root = fs.root();
    let dir = concord_fs::lock::LocalDirectory::new(1, vec![1, 2, 3]);
    // About a third of a 1024-block rgrp's blocks are local: 1,500 inodes need several.
    let n = 1500u64;
    let before = fs.alloc_blocks_scanned();
    let mut inos = std::collections::HashSet::new();
    for k in 0..n {
        let ino = fs.create(root, format!("f{k}").as_bytes(), 0o644, 0, 0).unwrap().ino;
        assert!(dir.is_local(ino), "create {k}: inode {ino}: its lock directory is another node");
        assert!(inos.insert(ino));
    }
    let rgrps: std::collections::HashSet<u64> = inos.iter().map(|i| i / 1024).collect();
    assert!(rgrps.len() >= 4, "1,500 local inodes in {} rgrps of 1024 blocks", rgrps.len());
    // A create walks a few dozen blocks (its own search from the rgrp's cursor, the
    // prefetch's look ahead at the next eight local numbers), not the rgrp: walking
    // again from the goal cost up to a whole rgrp per create.
    let scanned = fs.alloc_blocks_scanned() - before;
    assert!(scanned < 100 * n, "{scanned} blocks examined for {n} creates");
    // Freed numbers are found again: unlink a few early ones, make them durable, and
    // the next creates take them.
    let mut early: Vec<u64> = inos.iter().copied().collect();
    early.sort_unstable();
    for k in 0..n {
        let name = format!("f{k}");
        let a = fs.lookup(root, name.as_bytes()).unwrap();
        if early[..20].contains(&a.ino) {
            fs.unlink(root, name.as_bytes()).unwrap();
        }
    }
    fs.fsync().unwrap();
    let mut again = 0;
    for k in 0..20 {
        let ino = fs.create(root, format!("g{k}").as_bytes(), 0o644, 0, 0).unwrap().ino;
        assert!(dir.is_local(ino));
        again += usize::from(early[..20].contains(&ino));
    }
    assert!(again >= 10, "only {again} of 20 freed local numbers were taken again");
}
