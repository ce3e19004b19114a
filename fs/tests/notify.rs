//! Dropping an inode's caches reaches the kernel: a FUSE session in this process,
//! changes made behind the kernel's back through the API (as another node's would
//! be), and [`Filesystem::drop_caches`] / [`Filesystem::drop_entry`] making them
//! visible through the mount. Needs root and /dev/fuse; says so and skips otherwise.

mod common;

use common::{can_mount, checked, filesystem, session};
use concord_fs::fuse::FuseKernelCache;

#[test]
fn drop_caches_makes_changes_behind_the_kernel_visible() {
    if !can_mount("drop_caches_makes_changes_behind_the_kernel_visible") {
        return;
    }
    let fs = filesystem(64);
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path();
    let session = session(&fs, mnt, "concord-notify-test");
    fs.set_kernel_cache(std::sync::Arc::new(FuseKernelCache::new(session.notifier(), fs.root())));
    let bg = session.spawn().unwrap();
    checked(bg, || {
        let a = mnt.join("a");
        std::fs::write(&a, vec![b'o'; 8192]).unwrap();
        std::fs::File::open(&a).unwrap().sync_all().unwrap();
        assert!(std::fs::read(&a).unwrap() == vec![b'o'; 8192]);
        // Behind the kernel's back: same size, new bytes.
        let ino = fs.lookup(fs.root(), b"a").unwrap().ino;
        fs.write(ino, 0, &[b'n'; 8192]).unwrap();
        assert!(std::fs::read(&a).unwrap() == vec![b'o'; 8192], "the kernel did not cache the file: nothing to test");
        fs.drop_caches(ino);
        assert!(std::fs::read(&a).unwrap() == vec![b'n'; 8192], "drop_caches left the kernel's pages");
        // Attributes: a mode changed behind the kernel's back.
        let mode = |p: &std::path::Path| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
        };
        let before = mode(&a);
        fs.setattr(ino, &concord_fs::SetAttr { mode: Some(0o600), ..Default::default() }).unwrap();
        assert_eq!(mode(&a), before, "the kernel did not cache attributes: nothing to test");
        fs.drop_caches(ino);
        assert_eq!(mode(&a), 0o600, "drop_caches left the kernel's attributes");
        // Names: a file removed behind the kernel's back.
        let b = mnt.join("b");
        std::fs::write(&b, b"x").unwrap();
        assert!(std::fs::metadata(&b).is_ok());
        fs.unlink(fs.root(), b"b").unwrap();
        assert!(std::fs::metadata(&b).is_ok(), "the kernel did not cache the name: nothing to test");
        fs.drop_entry(fs.root(), b"b");
        let e = std::fs::metadata(&b).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "drop_entry left the kernel's name");
    });
}
