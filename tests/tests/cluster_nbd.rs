//! Three nodes mount one filesystem served by a real NBD server (`qemu-nbd
//! --shared=8` on loopback, started by the test) through Concord's own NBD client
//! (`nbd://127.0.0.1:PORT/EXPORT` as the device of mkfs, mount and fsck): no kernel NBD
//! driver anywhere. The coherence checks of the cluster tests (a write fsync'd on one
//! node read on the others; rename, unlink and creates in a shared directory seen
//! across nodes), and `kill -9` of one node (lockd and mount): the survivors fence it,
//! replay its journal over NBD, and read what it fsync'd; fsck over NBD is clean. And
//! a restart of the NBD server under the three mounts, which they ride out.
//! Needs root, /dev/fuse and qemu-nbd (skipped otherwise, failing under CI).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use concord_journal::nbd_test::{have_qemu_nbd, QemuNbd};
use concord_tests::{can_mount, concord, log_mark, text, wait_for_line_since, Cluster, Spec, READY_TIMEOUT};

/// The cluster's image served by qemu-nbd, made again with mkfs over NBD, and every
/// node mounted through `nbd://`. The server is returned first so that the caller
/// drops the cluster (its mounts) before it.
fn nbd_cluster(test: &str) -> Option<(QemuNbd, Cluster)> {
    if !can_mount(test) || !have_qemu_nbd(test) {
        return None;
    }
    let mut c = Cluster::new(test, Spec::nodes(3));
    let q = QemuNbd::start(&c.image, "fs1");
    let spec = &c.spec;
    let o =
        concord(&["mkfs", "--force", "-j", &spec.journals.to_string(), "-p", "lock_dlm", "-t", &spec.table, &q.url]);
    assert!(o.status.success(), "mkfs over NBD: {}", text(&o));
    c.use_device(&q.url);
    c.start_lockds();
    c.mount(&[1, 2, 3]);
    Some((q, c))
}

fn write_synced(p: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn three_nodes_over_nbd_see_each_others_changes() {
    const T: &str = "three_nodes_over_nbd_see_each_others_changes";
    let Some((_q, mut c)) = nbd_cluster(T) else { return };
    let m: Vec<PathBuf> = (1..=3).map(|n| c.mnt(n)).collect();
    // The mount says which device it serves.
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(mounts.lines().any(|l| l.starts_with(&c.device()) && l.contains(m[0].to_str().unwrap())), "{mounts}");

    // Written and fsync'd on node 1, read on 2 and 3; rewritten on 2, read on 1 and 3.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    write_synced(&m[0].join("f"), &data);
    for n in [1, 2] {
        assert!(std::fs::read(m[n].join("f")).unwrap() == data, "node {} reads node 1's file", n + 1);
    }
    write_synced(&m[1].join("f"), b"node 2 was here");
    for n in [0, 2] {
        assert_eq!(std::fs::read(m[n].join("f")).unwrap(), b"node 2 was here", "node {}", n + 1);
    }
    // A rename on node 2 and an unlink on node 3, seen everywhere.
    std::fs::rename(m[1].join("f"), m[1].join("g")).unwrap();
    for mm in &m {
        assert!(!mm.join("f").exists() && std::fs::read(mm.join("g")).unwrap() == b"node 2 was here");
    }
    std::fs::remove_file(m[2].join("g")).unwrap();
    for mm in &m {
        assert!(!mm.join("g").exists(), "{} still finds g", mm.display());
    }
    // A shared directory with creates from all three nodes at once.
    std::fs::create_dir(m[0].join("shared")).unwrap();
    let threads: Vec<_> = m
        .iter()
        .enumerate()
        .map(|(i, mm)| {
            let dir = mm.join("shared");
            std::thread::spawn(move || {
                for k in 0..20 {
                    std::fs::write(dir.join(format!("n{}-{k}", i + 1)), format!("node {} file {k}", i + 1)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let want: BTreeSet<String> = (1..=3).flat_map(|n| (0..20).map(move |k| format!("n{n}-{k}"))).collect();
    for mm in &m {
        assert_eq!(names(&mm.join("shared")), want, "the shared directory on {}", mm.display());
        assert_eq!(std::fs::read_to_string(mm.join("shared/n3-7")).unwrap(), "node 3 file 7");
    }
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n over NBD after unmount:\n{out}");
}

#[test]
fn a_node_killed_over_nbd_is_fenced_and_replayed_by_the_survivors() {
    const T: &str = "a_node_killed_over_nbd_is_fenced_and_replayed_by_the_survivors";
    let Some((_q, mut c)) = nbd_cluster(T) else { return };
    let jid2 = c.status(2)["jid"].as_u64().expect("jid");
    // Node 2 works in a directory of its own; what it fsyncs must survive it.
    let own = c.mnt(2).join("own2");
    std::fs::create_dir(&own).unwrap();
    let fsynced: Vec<Vec<u8>> = (0..8u8).map(|k| vec![b'a' + k; 5000 + usize::from(k) * 3000]).collect();
    for (k, d) in fsynced.iter().enumerate() {
        write_synced(&own.join(format!("s{k}")), d);
    }
    std::fs::File::open(&own).unwrap().sync_all().unwrap();
    std::fs::write(own.join("unsynced"), b"maybe").unwrap();
    let marks: Vec<(PathBuf, u64)> = [1, 3].iter().map(|&n| (c.mount_log(n), log_mark(&c.mount_log(n)))).collect();

    c.crash(&[2]);
    let (_, line) = wait_for_line_since(&marks, &["recover generation ", &format!(" jid {jid2} ")], READY_TIMEOUT);
    let generation = line.split("recover generation ").nth(1).and_then(|r| r.split(' ').next()).unwrap().to_string();
    let (_, replayed) = wait_for_line_since(&marks, &["journal recovered", &format!("jid={jid2} ")], READY_TIMEOUT);
    assert!(replayed.contains("replayed=true"), "node 2's journal was dirty: {replayed}");
    for mark in &marks {
        wait_for_line_since(
            std::slice::from_ref(mark),
            &[&format!("recover generation {generation} done")],
            READY_TIMEOUT,
        );
    }
    assert_eq!(c.fenced(), vec![2], "the fence command ran for node 2");

    for n in [1, 3] {
        let own = c.mnt(n).join("own2");
        for (k, d) in fsynced.iter().enumerate() {
            let got = std::fs::read(own.join(format!("s{k}"))).unwrap_or_else(|e| panic!("node {n}: s{k}: {e}"));
            assert!(got == *d, "node {n} reads s{k} as node 2 fsync'd it");
        }
    }
    // The directory node 2 held: a survivor creates in it, the other reads it.
    std::fs::write(c.mnt(1).join("own2/after"), b"node 1 after node 2 died").unwrap();
    assert_eq!(std::fs::read(c.mnt(3).join("own2/after")).unwrap(), b"node 1 after node 2 died");
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n over NBD after the survivors unmounted:\n{out}");
}

/// The NBD server is killed (`kill -9`) and started again on the same port while the
/// three nodes are mounted: each node's client connects again and sends again what had
/// no reply, no node withdraws, and what was written before and after is all there.
#[test]
fn three_nodes_ride_out_a_restart_of_the_nbd_server() {
    const T: &str = "three_nodes_ride_out_a_restart_of_the_nbd_server";
    let Some((mut q, mut c)) = nbd_cluster(T) else { return };
    let m: Vec<PathBuf> = (1..=3).map(|n| c.mnt(n)).collect();
    let before: Vec<Vec<u8>> = (0..3u8).map(|n| vec![b'0' + n; 70_000]).collect();
    for (n, mm) in m.iter().enumerate() {
        write_synced(&mm.join(format!("before{n}")), &before[n]);
    }
    // Unsynced writes in flight in the kernel and the mounts while the server dies.
    std::fs::write(m[0].join("unsynced"), vec![7u8; 300_000]).unwrap();
    let marks: Vec<(PathBuf, u64)> = (1..=3).map(|n| (c.mount_log(n), log_mark(&c.mount_log(n)))).collect();
    q.restart();
    for mark in &marks {
        wait_for_line_since(std::slice::from_ref(mark), &["NBD connection made again"], READY_TIMEOUT);
    }
    for (n, mm) in m.iter().enumerate() {
        write_synced(&mm.join(format!("after{n}")), format!("node {} after the restart", n + 1).as_bytes());
    }
    for mm in &m {
        for (n, want) in before.iter().enumerate() {
            assert!(std::fs::read(mm.join(format!("before{n}"))).unwrap() == *want, "{}: before{n}", mm.display());
            let after = std::fs::read_to_string(mm.join(format!("after{n}"))).unwrap();
            assert_eq!(after, format!("node {} after the restart", n + 1));
        }
        assert_eq!(std::fs::read(mm.join("unsynced")).unwrap(), vec![7u8; 300_000]);
    }
    for n in 1..=3 {
        assert_eq!(c.status(n)["state"], "up", "node {n} after the server restart");
    }
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n over NBD after the restart:\n{out}");
}
