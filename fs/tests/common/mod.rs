//! What the tests that mount through FUSE in this process share.

use std::path::Path;
use std::sync::Arc;

use concord_fs::fuse::ConcordFuse;
use concord_fs::mkfs::{mkfs, MkfsOptions};
use concord_fs::{Filesystem, MountOptions};
use concord_journal::{BlockDevice, MemDevice};

/// Whether this process can mount (root and /dev/fuse); says which test skips if not.
pub fn can_mount(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new("/dev/fuse").exists() {
        concord_journal::skip_test(test, "needs root and /dev/fuse");
        return false;
    }
    true
}

/// A fresh filesystem on an in-memory device of `mib` MiB, mounted through the API.
pub fn filesystem(mib: u64) -> Arc<Filesystem> {
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(mib << 20));
    mkfs(&dev, &MkfsOptions { journals: 1, journal_mib: Some(8), ..Default::default() }, &mut |_, _| {}).unwrap();
    Arc::new(Filesystem::mount(dev, &MountOptions::default()).unwrap())
}

/// A FUSE session for `fs` on `mnt` with two request threads, not yet running.
pub fn session(fs: &Arc<Filesystem>, mnt: &Path, fsname: &str) -> fuser::Session<ConcordFuse> {
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![fuser::MountOption::FSName(fsname.into())];
    cfg.n_threads = Some(2);
    fuser::Session::new(ConcordFuse::new(fs.clone()), mnt, &cfg).unwrap()
}

/// Runs `checks` against the running session `bg`, unmounts whatever happens, then
/// passes a failure on.
pub fn checked(bg: fuser::BackgroundSession, checks: impl FnOnce()) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(checks));
    bg.umount_and_join().unwrap();
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
}
