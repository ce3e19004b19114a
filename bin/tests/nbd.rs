//! The command line tools on an NBD export through Concord's own client: `concord
//! mkfs`, `fsck -n` and `jinfo` with `nbd://127.0.0.1:PORT/EXPORT`, served by a real
//! `qemu-nbd` started by the test (skipped without it, failing under CI); and the
//! refusals of bad NBD device arguments.

use std::process::{Command, Output};

use concord_journal::nbd_test::{have_qemu_nbd, QemuNbd};

fn concord(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_concord")).args(args).output().expect("run concord")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(args: &[&str]) -> String {
    let o = concord(args);
    assert!(o.status.success(), "concord {args:?}: {}", text(&o));
    text(&o)
}

#[test]
fn mkfs_fsck_and_jinfo_over_nbd() {
    const T: &str = "mkfs_fsck_and_jinfo_over_nbd";
    if !have_qemu_nbd(T) {
        return;
    }
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = dir.path().join("served.img");
    std::fs::File::create(&img).unwrap().set_len(256 << 20).unwrap();
    let q = QemuNbd::start(&img, "fs1");
    let out = ok(&["mkfs", "-j", "3", "-p", "lock_dlm", "-t", "tc:fs1", &q.url]);
    assert!(out.contains(&format!("Device:              {}", q.url)), "{out}");
    assert!(out.contains("Journals:            3"), "{out}");
    let out = ok(&["fsck", "-n", &q.url]);
    assert!(out.contains("0 problem(s)"), "{out}");
    let out = ok(&["jinfo", &q.url]);
    assert_eq!(out.matches(", clean,").count(), 3, "{out}");
    // What mkfs wrote over NBD is in the served file: the file itself checks clean.
    drop(q);
    let out = ok(&["fsck", "-n", img.to_str().unwrap()]);
    assert!(out.contains("0 problem(s)"), "{out}");
    let out = ok(&["jinfo", img.to_str().unwrap()]);
    assert!(out.contains("lock table tc:fs1 (lock_dlm)"), "{out}");

    // And the other way: an image made on the file checks clean over NBD, and mkfs
    // over NBD refuses to overwrite it without --force.
    let img2 = dir.path().join("made-here.img");
    ok(&["mkfs", "-j", "2", "--size", "128M", img2.to_str().unwrap()]);
    let q = QemuNbd::start(&img2, "");
    assert!(q.url.ends_with('/'), "an empty export name: {}", q.url);
    assert!(ok(&["fsck", "-n", &q.url]).contains("0 problem(s)"));
    let o = concord(&["mkfs", "-j", "2", &q.url]);
    assert!(!o.status.success() && text(&o).contains("--force"), "{}", text(&o));
    let o = concord(&["mkfs", "-j", "2", "--size", "1G", &q.url]);
    assert!(!o.status.success() && text(&o).contains("--size makes an image file"), "{}", text(&o));
    let wrong = q.url.trim_end_matches('/').to_string() + "/nosuch";
    let o = concord(&["jinfo", &wrong]);
    assert!(!o.status.success() && text(&o).contains("no export named \"nosuch\""), "{}", text(&o));
}

#[test]
fn bad_nbd_urls_are_refused_naming_the_form() {
    for url in ["nbd://", "nbd://127.0.0.1:notaport/x", "nbd://127.0.0.1:0/x"] {
        let o = concord(&["jinfo", url]);
        assert!(!o.status.success(), "{url}");
        assert!(text(&o).contains("nbd://HOST[:PORT]/[EXPORT]"), "{url}: {}", text(&o));
    }
    // Nothing listens there: a connect error, promptly.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let o = concord(&["fsck", "-n", &format!("nbd://127.0.0.1:{port}/x")]);
    assert_eq!(o.status.code(), Some(8), "{}", text(&o));
    assert!(text(&o).contains("connect"), "{}", text(&o));
}
