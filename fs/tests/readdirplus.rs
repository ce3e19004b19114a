//! Directory listings through the kernel: every name once, and attributes (the kernel
//! making an inode per entry) only where the reader wants them. A FUSE session in this
//! process over an in-memory device. Needs root and /dev/fuse; says so and skips
//! otherwise.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::{can_mount, checked, filesystem, session};
use concord_fs::Filesystem;

fn names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

/// Makes `n` files in a new directory `name` through the API, behind the kernel's back
/// (the kernel has looked none of them up).
fn populate(fs: &Filesystem, name: &str, n: usize) -> BTreeSet<String> {
    let dir = fs.mkdir(fs.root(), name.as_bytes(), 0o755, 0, 0).unwrap().ino;
    (0..n)
        .map(|i| {
            let f = format!("file-{i:05}");
            fs.create(dir, f.as_bytes(), 0o644, 0, 0).unwrap();
            f
        })
        .collect()
}

#[test]
fn a_large_directory_is_listed_whole_without_an_inode_per_entry() {
    if !can_mount("a_large_directory_is_listed_whole_without_an_inode_per_entry") {
        return;
    }
    let fs = filesystem(128);
    let big = populate(&fs, "big", 3000);
    let small = populate(&fs, "small", 100);
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path();
    let bg = session(&fs, mnt, "concord-readdir-test").spawn().unwrap();
    checked(bg, || {
        // Names only, as ls -f reads them: every name once, and the kernel holds no
        // more than the directory and a short first reply's entries.
        let before = fs.referenced_inodes();
        let listed = names(&mnt.join("big"));
        assert_eq!(listed.len(), big.len(), "a name listed twice or missing");
        assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), big);
        let held = fs.referenced_inodes() - before;
        assert!(held <= 1 + 32, "listing names of 3,000 files made the kernel hold {held} inodes");
        // A small directory comes with attributes in one reply: its entries need no
        // LOOKUP afterwards.
        let before = fs.referenced_inodes();
        let listed = names(&mnt.join("small"));
        assert_eq!(listed.iter().cloned().collect::<BTreeSet<_>>(), small);
        let held = fs.referenced_inodes() - before;
        assert_eq!(held, 1 + small.len(), "a small directory's entries came without attributes");
        // Names and attributes, as ls -l reads them: after the short first reply the
        // kernel asks for attributes again and every stat is answered.
        for e in std::fs::read_dir(mnt.join("big")).unwrap() {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            assert!(m.is_file() && m.len() == 0, "{:?}", e.file_name());
        }
        assert!(fs.referenced_inodes() >= 1 + big.len() + 1 + small.len());
    });
}
