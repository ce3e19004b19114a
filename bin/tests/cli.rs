//! The command line tools on image files: mkfs, fsck, jinfo, as a user runs them.

use std::path::Path;
use std::process::{Command, Output};

fn concord(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_concord")).args(args).output().expect("run concord")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exit code")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn image(dir: &Path) -> String {
    dir.join("fs.img").to_str().expect("utf-8 path").to_string()
}

#[test]
fn mkfs_fsck_jinfo_and_refusal_to_overwrite() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = image(dir.path());
    let o = concord(&["mkfs", "-j", "3", "-t", "alpha:fs1", "-p", "lock_dlm", "--size", "1G", &img]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let t = text(&o);
    for want in ["Journals:            3", "lock_dlm", "alpha:fs1", "UUID:", "Block size:          4096"] {
        assert!(t.contains(want), "mkfs output lacks {want:?}:\n{t}");
    }
    let o = concord(&["fsck", "-n", &img]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let o = concord(&["jinfo", &img]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    assert_eq!(text(&o).matches(", clean,").count(), 3, "{}", text(&o));

    let before = std::fs::read(&img).unwrap();
    let o = concord(&["mkfs", "-j", "3", &img]);
    assert_ne!(code(&o), 0);
    assert!(text(&o).contains("--force"), "{}", text(&o));
    assert!(std::fs::read(&img).unwrap() == before, "a refused mkfs changed the image");
    let o = concord(&["mkfs", "--force", "-j", "2", &img]);
    assert_eq!(code(&o), 0, "{}", text(&o));
}

#[test]
fn mkfs_refuses_a_device_too_small_naming_the_minimum() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = image(dir.path());
    let o = concord(&["mkfs", "-j", "3", "--size", "20M", &img]);
    assert_ne!(code(&o), 0);
    assert!(text(&o).contains("too small") && text(&o).contains("at least"), "{}", text(&o));
}

#[test]
fn fsck_names_a_flipped_metadata_block() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = image(dir.path());
    let o = concord(&["mkfs", "-j", "2", "--size", "256M", &img]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    // The first rgrp's header follows the journal area: 17 + 2 journals.
    let sb = {
        let bytes = std::fs::read(&img).unwrap();
        let mut b = [0u8; 4096];
        b.copy_from_slice(&bytes[16 * 4096..17 * 4096]);
        concord_fs::format::Superblock::decode(&b, 16, (bytes.len() / 4096) as u64).unwrap()
    };
    for block in [sb.first_rgrp, sb.first_rgrp + 1, sb.root_dinode, sb.master_dinode] {
        let mut bytes = std::fs::read(&img).unwrap();
        let saved = bytes.clone();
        bytes[(block * 4096 + 300) as usize] ^= 0x10;
        std::fs::write(&img, &bytes).unwrap();
        let o = concord(&["fsck", "-n", &img]);
        assert_eq!(code(&o), 4, "flip in block {block}: {}", text(&o));
        assert!(text(&o).contains(&format!("block {block}")), "fsck does not name block {block}:\n{}", text(&o));
        std::fs::write(&img, &saved).unwrap();
    }
    let o = concord(&["fsck", "-n", "/nonexistent/device"]);
    assert_eq!(code(&o), 8, "{}", text(&o));
}

/// Holds `flock` on `path` as a running Concord process would, until dropped.
struct Held {
    _file: std::fs::File,
}

impl Held {
    fn new(path: &str, exclusive: bool) -> Held {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(path).unwrap();
        let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
        // SAFETY: flock on a file this test opened.
        assert_eq!(unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) }, 0);
        Held { _file: f }
    }
}

fn concord_waiting(secs: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_concord"))
        .args(args)
        .env("CONCORD_CLAIM_WAIT_SECS", secs)
        .output()
        .expect("run concord")
}

#[test]
fn a_device_in_use_is_waited_for_then_refused_and_left_unchanged() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = image(dir.path());
    let o = concord(&["mkfs", "--size", "256M", &img]);
    assert_eq!(code(&o), 0, "{}", text(&o));
    let before = std::fs::read(&img).unwrap();

    // Held exclusively (a mount): mkfs, fsck -y and fsck -n are refused; jinfo reads.
    let held = Held::new(&img, true);
    for args in [&["mkfs", "--force", &img][..], &["fsck", "-y", &img], &["fsck", "-n", &img]] {
        let o = concord_waiting("1", args);
        assert_ne!(code(&o), 0, "{args:?} ran on a device in use: {}", text(&o));
        assert!(text(&o).contains("in use by another Concord process"), "{args:?}: {}", text(&o));
        assert!(text(&o).contains("waiting up to 1 s"), "{args:?} did not say it waited: {}", text(&o));
    }
    assert!(std::fs::read(&img).unwrap() == before, "a refused command changed the image");
    let o = concord(&["jinfo", &img]);
    assert_eq!(code(&o), 0, "jinfo beside a mount: {}", text(&o));
    drop(held);

    // Held shared (fsck -n or a read-only mount): another reader runs beside it, a
    // writer does not.
    let held = Held::new(&img, false);
    let o = concord_waiting("1", &["fsck", "-n", &img]);
    assert_eq!(code(&o), 0, "fsck -n beside a reader: {}", text(&o));
    let o = concord_waiting("1", &["mkfs", "--force", &img]);
    assert_ne!(code(&o), 0, "mkfs beside a reader: {}", text(&o));

    // Let go while a command waits: it goes on.
    let t = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(1500));
        drop(held);
    });
    let o = concord_waiting("30", &["mkfs", "--force", &img]);
    t.join().unwrap();
    assert_eq!(code(&o), 0, "mkfs after the device was let go: {}", text(&o));
    assert!(text(&o).contains("waiting up to 30 s"), "{}", text(&o));
}
