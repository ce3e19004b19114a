//! Cluster mounts as real processes: three `concord lockd` and three `concord mount
//! --config --node` processes on loopback share one image. What one node's system call
//! returned, the others see at once (the checks read once, never retry); concurrent
//! creates from all nodes end in one consistent directory; every node unmounts cleanly
//! and fsck finds nothing; mounts that do not fit the cluster are refused without a
//! write. Needs root and /dev/fuse (skipped otherwise, failing under CI).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

use concord_tests::{can_mount, concord, file_hash, output_within, text, Cluster, Spec};

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

fn set(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn enoent(p: &Path) -> bool {
    matches!(std::fs::symlink_metadata(p), Err(e) if e.raw_os_error() == Some(libc::ENOENT))
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| ((k * 31 + seed * 7) % 251) as u8).collect()
}

fn getxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let path = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 256];
    // SAFETY: valid C strings and a buffer of the length given.
    let n = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    (n >= 0).then(|| buf[..n as usize].to_vec())
}

fn setxattr(p: &Path, name: &str, value: &[u8]) {
    let path = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a value of the length given.
    let r = unsafe { libc::setxattr(path.as_ptr(), cname.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
    assert_eq!(r, 0, "setxattr {name} on {}: {}", p.display(), std::io::Error::last_os_error());
}

/// Every change one node's system call made is seen by the next system call on the
/// other nodes: data, an append to a file another node has open, attributes, names.
#[test]
fn three_nodes_see_each_others_changes_at_once() {
    const T: &str = "three_nodes_see_each_others_changes_at_once";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    let (m1, m2, m3) = (c.mnt(1), c.mnt(2), c.mnt(3));

    // A write on node 1 is read at once on nodes 2 and 3.
    std::fs::write(m1.join("f"), b"hello from node 1").unwrap();
    assert_eq!(std::fs::read(m2.join("f")).unwrap(), b"hello from node 1", "node 2 reads node 1's write");
    assert_eq!(std::fs::read(m3.join("f")).unwrap(), b"hello from node 1", "node 3 reads node 1's write");
    // Overwritten in place on node 2: the pages nodes 1 and 3 have cached must go.
    std::fs::OpenOptions::new().write(true).open(m2.join("f")).unwrap().write_all_at(b"HELLO", 0).unwrap();
    assert_eq!(std::fs::read(m1.join("f")).unwrap(), b"HELLO from node 1", "node 1 after node 2's overwrite");
    assert_eq!(std::fs::read(m3.join("f")).unwrap(), b"HELLO from node 1", "node 3 after node 2's overwrite");
    // 3 MiB across many pages and blocks, written on node 3.
    let big = pattern(3, 3 << 20);
    std::fs::write(m3.join("big"), &big).unwrap();
    assert!(std::fs::read(m1.join("big")).unwrap() == big, "node 1 reads node 3's 3 MiB write");
    assert!(std::fs::read(m2.join("big")).unwrap() == big, "node 2 reads node 3's 3 MiB write");

    // An append on node 2 to a file node 3 has open (and has read, so its pages and
    // size are cached there): fstat and read through the open descriptor see it.
    std::fs::write(m1.join("log"), b"line 1\n").unwrap();
    let mut open3 = std::fs::File::open(m3.join("log")).unwrap();
    let mut seen = String::new();
    open3.read_to_string(&mut seen).unwrap();
    assert_eq!(seen, "line 1\n");
    let mut app = std::fs::OpenOptions::new().append(true).open(m2.join("log")).unwrap();
    app.write_all(b"line 2 from node 2\n").unwrap();
    drop(app);
    let want = "line 1\nline 2 from node 2\n";
    assert_eq!(open3.metadata().unwrap().len(), want.len() as u64, "fstat on node 3 sees node 2's append");
    let mut buf = vec![0u8; 100];
    let n = open3.read_at(&mut buf, 0).unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), want, "read on node 3's open file sees node 2's append");
    let mut rest = String::new();
    open3.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "line 2 from node 2\n", "reading on from node 3's file offset");
    // Truncated on node 1 while still open on node 3.
    std::fs::OpenOptions::new().write(true).open(m1.join("log")).unwrap().set_len(4).unwrap();
    assert_eq!(open3.metadata().unwrap().len(), 4, "fstat on node 3 sees node 1's truncate");
    let n = open3.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"line", "read on node 3's open file after node 1's truncate");
    assert_eq!(std::fs::metadata(m2.join("log")).unwrap().len(), 4, "stat on node 2 sees node 1's truncate");
    drop(open3);

    // Truncate of the big file on node 2, up and down.
    std::fs::OpenOptions::new().write(true).open(m2.join("big")).unwrap().set_len(5000).unwrap();
    assert_eq!(std::fs::metadata(m1.join("big")).unwrap().len(), 5000);
    assert!(std::fs::read(m3.join("big")).unwrap() == big[..5000], "node 3 after node 2's truncate");
    std::fs::OpenOptions::new().write(true).open(m3.join("big")).unwrap().set_len(1 << 20).unwrap();
    let grown = std::fs::read(m1.join("big")).unwrap();
    assert_eq!(grown.len(), 1 << 20, "node 1 sees node 3's truncate up");
    assert!(grown[..5000] == big[..5000] && grown[5000..].iter().all(|b| *b == 0), "a hole after truncate up");

    // chmod, times, xattr on node 2.
    std::fs::set_permissions(m2.join("f"), std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(std::fs::metadata(m1.join("f")).unwrap().mode() & 0o7777, 0o640, "node 1 sees node 2's chmod");
    assert_eq!(std::fs::metadata(m3.join("f")).unwrap().mode() & 0o7777, 0o640, "node 3 sees node 2's chmod");
    let when = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    std::fs::File::options().write(true).open(m2.join("f")).unwrap().set_modified(when).unwrap();
    assert_eq!(std::fs::metadata(m1.join("f")).unwrap().mtime(), 1_000_000_000, "node 1 sees node 2's utimens");
    setxattr(&m2.join("f"), "user.who", b"node 2");
    assert_eq!(getxattr(&m3.join("f"), "user.who").as_deref(), Some(&b"node 2"[..]), "node 3 sees node 2's xattr");

    // mkdir on node 3, seen by stat and readdir on the others.
    std::fs::create_dir(m3.join("d")).unwrap();
    assert!(std::fs::metadata(m1.join("d")).unwrap().is_dir(), "node 1 sees node 3's mkdir");
    assert_eq!(names(&m2), set(&["big", "d", "f", "log"]), "node 2 lists node 3's mkdir");
    // rename on node 1 into the new directory.
    std::fs::rename(m1.join("f"), m1.join("d/g")).unwrap();
    assert!(enoent(&m2.join("f")), "node 2: the old name is gone after node 1's rename");
    assert_eq!(std::fs::read(m2.join("d/g")).unwrap(), b"HELLO from node 1", "node 2 reads the new name");
    assert_eq!(names(&m3.join("d")), set(&["g"]), "node 3 lists the renamed file");
    assert_eq!(names(&m3), set(&["big", "d", "log"]), "node 3 no longer lists the old name");
    // link on node 3, seen as a second name and a link count on node 1.
    std::fs::hard_link(m3.join("d/g"), m3.join("g2")).unwrap();
    assert_eq!(std::fs::metadata(m1.join("d/g")).unwrap().nlink(), 2, "node 1 sees node 3's link");
    assert_eq!(std::fs::read(m1.join("g2")).unwrap(), b"HELLO from node 1");
    // unlink on node 2.
    std::fs::remove_file(m2.join("d/g")).unwrap();
    std::fs::remove_file(m2.join("g2")).unwrap();
    assert!(enoent(&m1.join("d/g")), "node 1: ENOENT after node 2's unlink");
    assert!(enoent(&m3.join("g2")), "node 3: ENOENT after node 2's unlink");
    assert!(names(&m1.join("d")).is_empty(), "node 1 lists the emptied directory");
    // rmdir on node 3.
    std::fs::remove_dir(m3.join("d")).unwrap();
    assert!(enoent(&m1.join("d")), "node 1: ENOENT after node 3's rmdir");
    assert!(enoent(&m2.join("d")), "node 2: ENOENT after node 3's rmdir");
    assert_eq!(names(&m1), set(&["big", "log"]));

    // While the nodes have the image, a single-node mount and fsck are refused (the
    // device claim), without waiting long.
    let lone = c.dir().join("lone");
    std::fs::create_dir(&lone).unwrap();
    let mut cmd = Command::new(concord_tests::concord_bin());
    cmd.args(["mount", "-o", "lockproto=lock_nolock"]).arg(&c.image).arg(&lone).env("CONCORD_CLAIM_WAIT_SECS", "1");
    let o = output_within(&mut cmd, Duration::from_secs(60), Some(&lone));
    assert!(!o.status.success() && text(&o).contains("in use"), "a lock_nolock mount beside the nodes: {}", text(&o));
    let o = output_within(
        Command::new(concord_tests::concord_bin())
            .args(["fsck", "-n"])
            .arg(&c.image)
            .env("CONCORD_CLAIM_WAIT_SECS", "1"),
        Duration::from_secs(60),
        None,
    );
    assert!(o.status.code() == Some(8) && text(&o).contains("in use"), "fsck -n beside the nodes: {}", text(&o));

    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after all three unmounted:\n{out}");
}

/// Three nodes create files at once, each in one shared directory and in a directory
/// of its own; every node then lists everything, and fsck is clean.
#[test]
fn three_nodes_create_at_once_in_shared_and_own_directories() {
    const T: &str = "three_nodes_create_at_once_in_shared_and_own_directories";
    if !can_mount(T) {
        return;
    }
    const EACH: usize = 200;
    let mut c = Cluster::up(T, Spec::nodes(3));
    std::fs::create_dir(c.mnt(1).join("shared")).unwrap();
    let mnts: Vec<_> = (1..=3).map(|i| c.mnt(i)).collect();
    std::thread::scope(|s| {
        let threads: Vec<_> = mnts
            .iter()
            .enumerate()
            .map(|(i, m)| {
                s.spawn(move || {
                    let own = m.join(format!("own{i}"));
                    std::fs::create_dir(&own).unwrap();
                    for k in 0..EACH {
                        std::fs::File::create(m.join(format!("shared/n{i}-{k}")))
                            .unwrap_or_else(|e| panic!("node {}: create shared/n{i}-{k}: {e}", i + 1));
                        std::fs::write(own.join(format!("f{k}")), format!("node {i} file {k}"))
                            .unwrap_or_else(|e| panic!("node {}: create own{i}/f{k}: {e}", i + 1));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a creating thread failed");
        }
    });
    let shared: BTreeSet<String> = (0..3).flat_map(|i| (0..EACH).map(move |k| format!("n{i}-{k}"))).collect();
    for (n, m) in mnts.iter().enumerate() {
        let got = names(&m.join("shared"));
        assert_eq!(got.len(), 3 * EACH, "node {} lists the shared directory", n + 1);
        assert!(got == shared, "node {} lists other names than were created", n + 1);
        for i in 0..3 {
            let own = m.join(format!("own{i}"));
            assert_eq!(names(&own).len(), EACH, "node {} lists own{i}", n + 1);
            for k in (0..EACH).step_by(19) {
                let data = std::fs::read(own.join(format!("f{k}"))).unwrap();
                assert_eq!(data, format!("node {i} file {k}").as_bytes(), "node {} reads own{i}/f{k}", n + 1);
            }
        }
    }
    // `concord status` and `concord glocks` answer through each mount's control socket.
    for (n, m) in mnts.iter().enumerate() {
        let o = concord(&["status", m.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "status of node {}: {}", n + 1, text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("status --json is JSON");
        assert_eq!(v["node"], n as u64 + 1, "{v}");
        assert_eq!(v["state"], "up", "{v}");
        assert_eq!(v["members"].as_array().map(|a| a.len()), Some(3), "{v}");
        assert!(v["jid"].as_u64().is_some_and(|j| j < 3), "{v}");
        let o = concord(&["glocks", m.to_str().unwrap()]);
        assert!(o.status.success(), "glocks of node {}: {}", n + 1, text(&o));
        let dump = String::from_utf8_lossy(&o.stdout);
        assert!(dump.lines().any(|l| l.starts_with("G:") && l.contains(" n:9/")), "own journal glock:\n{dump}");
    }
    let o = concord(&["status", c.dir().to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("no cluster mount"), "{}", text(&o));
    // A reader that goes away before the dump is written (`concord glocks M | head`)
    // ends the command quietly, without a panic.
    let mut child = Command::new(concord_tests::concord_bin())
        .args(["glocks", mnts[0].to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn concord glocks");
    drop(child.stdout.take());
    let o = child.wait_with_output().expect("wait for concord glocks");
    assert!(o.status.success() && o.stderr.is_empty(), "concord glocks into a closed pipe: {}", text(&o));
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after all three unmounted:\n{out}");
}

/// Two nodes open(O_CREAT) one new name at the same moment, round after round: both
/// opens succeed and give the same file, as on one node. The loser's kernel still had
/// the name as free (it had just looked it up; the negative entry's invalidation waits
/// for the directory lock its open holds), so its CREATE finds the name taken: the
/// mount opens the file instead of failing with EEXIST, as POSIX requires without
/// O_EXCL. With O_EXCL one of the two gets EEXIST.
#[test]
fn two_nodes_opening_one_new_name_with_o_creat_both_get_the_file() {
    const T: &str = "two_nodes_opening_one_new_name_with_o_creat_both_get_the_file";
    if !can_mount(T) {
        return;
    }
    const ROUNDS: usize = 40;
    let mut c = Cluster::up(T, Spec::nodes(2));
    std::fs::create_dir(c.mnt(1).join("race")).unwrap();
    let mnts: Vec<_> = (1..=2).map(|i| c.mnt(i).join("race")).collect();
    for excl in [false, true] {
        for k in 0..ROUNDS {
            let name = format!("f{k}-{excl}");
            let barrier = std::sync::Barrier::new(2);
            let opened: Vec<std::io::Result<std::fs::File>> = std::thread::scope(|s| {
                let threads: Vec<_> = mnts
                    .iter()
                    .map(|m| {
                        let (p, barrier) = (m.join(&name), &barrier);
                        s.spawn(move || {
                            barrier.wait();
                            let mut o = std::fs::OpenOptions::new();
                            o.read(true).write(true);
                            if excl {
                                o.create_new(true);
                            } else {
                                o.create(true);
                            }
                            o.open(&p)
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().expect("an opening thread panicked")).collect()
            });
            if excl {
                let won = opened.iter().filter(|r| r.is_ok()).count();
                let exist =
                    opened.iter().filter(|r| matches!(r, Err(e) if e.raw_os_error() == Some(libc::EEXIST))).count();
                assert_eq!((won, exist), (1, 1), "round {k} with O_EXCL: {opened:?}");
                continue;
            }
            let files: Vec<std::fs::File> = opened
                .into_iter()
                .enumerate()
                .map(|(n, r)| r.unwrap_or_else(|e| panic!("round {k}: node {}: open(O_CREAT) of {name}: {e}", n + 1)))
                .collect();
            let inos: Vec<u64> = files.iter().map(|f| f.metadata().unwrap().ino()).collect();
            assert_eq!(inos[0], inos[1], "round {k}: the two nodes opened different files");
            files[0].write_all_at(b"from node 1", 0).unwrap();
            let mut got = vec![0u8; 11];
            files[1].read_exact_at(&mut got, 0).unwrap();
            assert_eq!(got, b"from node 1", "round {k}: node 2 reads through its descriptor");
        }
    }
    assert_eq!(names(&mnts[1]).len(), 2 * ROUNDS, "one file per name and round");
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after both unmounted:\n{out}");
}

/// A mount whose configuration names another cluster than the image's lock table is
/// refused, naming both, and writes nothing; so is a mount whose lockd is not running
/// (saying how to start it).
#[test]
fn mounts_that_do_not_fit_are_refused_and_write_nothing() {
    const T: &str = "mounts_that_do_not_fit_are_refused_and_write_nothing";
    // No FUSE mount is made here (each is refused before), but a broken refusal
    // would mount.
    if !can_mount(T) {
        return;
    }
    let c = Cluster::new(
        T,
        Spec { cluster: "blue".into(), table: "green:fs1".into(), size: "128M".into(), ..Spec::nodes(1) },
    );
    let before = file_hash(&c.image);
    let mnt = c.mnt(1);
    let o = output_within(&mut c.mount_cmd(1, &[]), Duration::from_secs(60), Some(&mnt));
    let err = text(&o);
    assert!(!o.status.success(), "a mount of cluster blue's node on a green filesystem: {err}");
    assert!(err.contains("blue") && err.contains("green"), "the refusal names both clusters: {err}");
    assert_eq!(file_hash(&c.image), before, "the refused mount changed the image");
    drop(c);

    let c = Cluster::new(T, Spec { size: "128M".into(), ..Spec::nodes(1) });
    let before = file_hash(&c.image);
    let mnt = c.mnt(1);
    let o = output_within(&mut c.mount_cmd(1, &[]), Duration::from_secs(60), Some(&mnt));
    let err = text(&o);
    let want = format!(
        "lockd is not running for node 1 (socket {}): start it with `concord lockd --config {} --node 1`",
        c.lockd_socket(1).display(),
        c.config.display()
    );
    assert!(!o.status.success() && err.contains(&want), "without lockd: {err}\nwanted: {want}");
    assert_eq!(file_hash(&c.image), before, "the mount without lockd changed the image");
}

/// A `lock_dlm` filesystem mounted on one node with `-o lockproto=lock_nolock` has
/// the device to itself: a cluster node is refused meanwhile; once it is gone, the
/// node mounts and sees what it wrote.
#[test]
fn a_lock_nolock_mount_and_cluster_nodes_exclude_each_other() {
    const T: &str = "a_lock_nolock_mount_and_cluster_nodes_exclude_each_other";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::new(T, Spec::nodes(1));
    c.start_lockds();
    let lone = c.dir().join("lone");
    std::fs::create_dir(&lone).unwrap();
    let mut lone_mount = concord_tests::Foreground::start(
        Command::new(concord_tests::concord_bin())
            .args(["mount", "-o", "lockproto=lock_nolock"])
            .arg(&c.image)
            .arg(&lone),
        &lone,
        &c.dir().join("lone.log"),
    );
    std::fs::write(lone.join("written alone"), b"lock_nolock").unwrap();
    let mnt = c.mnt(1);
    let o = output_within(c.mount_cmd(1, &[]).env("CONCORD_CLAIM_WAIT_SECS", "1"), Duration::from_secs(60), Some(&mnt));
    assert!(
        !o.status.success() && text(&o).contains("in use"),
        "a cluster node beside a lock_nolock mount: {}",
        text(&o)
    );
    lone_mount.stop();
    c.mount(&[1]);
    assert_eq!(std::fs::read(mnt.join("written alone")).unwrap(), b"lock_nolock");
    std::fs::write(mnt.join("written by node 1"), b"lock_dlm").unwrap();
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after the unmount:\n{out}");
}

/// The unprivileged user the access test runs `concord status` as (only its number is
/// used; CI and the development machine have a user `tests` with it).
const USER: u32 = 1500;
/// A group nobody is in, as `[runtime] client_group` (a number needs no /etc/group entry).
const GROUP: u32 = 4242;

/// `cmd` run as uid [`USER`] with primary group `gid` and supplementary `groups` (all
/// three set here while still root: std's `CommandExt::uid` drops supplementary groups).
fn as_user(cmd: &mut Command, gid: u32, groups: &[u32]) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: setgroups, setgid and setuid are async-signal-safe, and `groups` was
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 || libc::setgid(gid) != 0 || libc::setuid(USER) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdin(std::process::Stdio::null()).output().expect("run concord as the test user")
}

/// A cluster mount's control socket (`concord status`, `concord glocks`) answers root
/// and the members of `[runtime] client_group` only: others are refused by the
/// socket's mode and, with the mode opened wider by hand, by the check of their
/// credentials; both refusals say why.
#[test]
fn only_root_and_the_client_group_may_ask_a_mount() {
    const T: &str = "only_root_and_the_client_group_may_ask_a_mount";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::new(T, Spec::nodes(1));
    c.start_lockds();
    // The test user resolves the mount point's path (the control socket is named after it).
    std::fs::set_permissions(c.dir(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // A control socket folder of this test's own, with a short path (a socket's path
    // holds at most 107 bytes), which the test user may pass through.
    let run_dir = tempfile::Builder::new().prefix("cc").tempdir_in(std::env::temp_dir()).unwrap();
    std::fs::set_permissions(run_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (mnt, run) = (c.mnt(1), run_dir.path().to_path_buf());
    let chmod = |p: &Path, mode| std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    // The test user's copy of the binary, outside the checkout (whose folders, a clone in
    // a `mktemp -d` folder or in /root, it may not pass through).
    let ubin = run.join("concord");
    std::fs::copy(concord_tests::concord_bin(), &ubin).unwrap();
    chmod(&ubin, 0o755);
    let status = |what: &[&str]| {
        let mut cmd = Command::new(&ubin);
        cmd.args(what).arg(&mnt).env("CONCORD_RUNTIME_DIR", &run);
        cmd
    };
    // As `Cluster::mount_cmd`, with the given configuration and that folder.
    let mount = |config: &Path, log: &str| {
        let mut cmd = Command::new(concord_tests::concord_bin());
        cmd.arg("mount").arg("--config").arg(config).args(["--node", "1"]).arg(&c.image).arg(&mnt);
        cmd.env("CONCORD_RUNTIME_DIR", &run);
        concord_tests::Foreground::start(&mut cmd, &mnt, &c.dir().join(log))
    };
    let sock = || std::fs::read_dir(run.join("mounts")).unwrap().next().unwrap().unwrap().path();

    // No client group: root only.
    let mut m = mount(&c.config, "mount-root-only.log");
    let o = status(&["status"]).output().unwrap();
    assert!(o.status.success() && text(&o).contains("node 1 of cluster tc"), "root: {}", text(&o));
    let o = as_user(&mut status(&["status"]), USER, &[]);
    assert!(!o.status.success() && text(&o).contains("permission denied connecting to"), "{}", text(&o));
    chmod(&run.join("mounts"), 0o755);
    chmod(&sock(), 0o666);
    let o = as_user(&mut status(&["glocks"]), USER, &[]);
    assert!(
        !o.status.success()
            && text(&o).contains("the mount refused this client: uid 1500 is not root and not in the client group"),
        "{}",
        text(&o)
    );
    m.stop();

    // `client_group`: its members are answered, by a supplementary or the primary group.
    let text_cfg = std::fs::read_to_string(&c.config).unwrap();
    let with_group = c.dir().join("cluster-group.toml");
    let line = "state_dir = \"state\"\n";
    assert!(text_cfg.contains(line));
    std::fs::write(&with_group, text_cfg.replace(line, &format!("{line}client_group = \"{GROUP}\"\n"))).unwrap();
    let mut m = mount(&with_group, "mount-group.log");
    let (d, s) = (std::fs::metadata(run.join("mounts")).unwrap(), std::fs::metadata(sock()).unwrap());
    assert_eq!((d.mode() & 0o777, d.gid(), s.mode() & 0o777, s.gid()), (0o710, GROUP, 0o660, GROUP));
    for (gid, groups) in [(USER, vec![GROUP]), (GROUP, vec![])] {
        let o = as_user(&mut status(&["status", "--json"]), gid, &groups);
        assert!(o.status.success(), "gid {gid} groups {groups:?}: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["state"], "up", "{v}");
    }
    let o = as_user(&mut status(&["status"]), USER, &[7]);
    assert!(!o.status.success() && text(&o).contains("permission denied connecting to"), "{}", text(&o));
    chmod(&run.join("mounts"), 0o711);
    chmod(&sock(), 0o666);
    let o = as_user(&mut status(&["status"]), USER, &[7]);
    assert!(
        !o.status.success()
            && text(&o).contains("the mount refused this client: uid 1500 is not root and not in group 4242"),
        "{}",
        text(&o)
    );
    // Root still is.
    assert!(status(&["status"]).output().unwrap().status.success());
    m.stop();
}
