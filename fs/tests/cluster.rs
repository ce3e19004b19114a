//! Cluster mounts through the filesystem API: two or three nodes, each with its own
//! in-process lockd (real QUIC on loopback), mount one shared memory device with
//! lock_dlm and see one filesystem. No FUSE here: tests/ has the real-process ones.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use concord_fs::cluster::{mount_cluster, ClusterMount};
use concord_fs::fsck::{fsck, FsckOptions};
use concord_fs::mkfs::{mkfs, MkfsOptions};
use concord_fs::{FsError, MountOptions, RenameFlags, SetAttr};
use concord_journal::{BlockDevice, MemDevice};
use concord_lockd::client::{Client, JoinKind};
use concord_lockd::node::{Node, NodeOptions};
use concord_lockd::transport::testing::LocalCluster;

const FS_NAME: &str = "fs1";

/// Lockd nodes in this process, a tokio runtime for them, and the shared device.
struct Cluster {
    rt: tokio::runtime::Runtime,
    nodes: Vec<Node>,
    dev: Arc<dyn BlockDevice>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(n: u32, journals: u32) -> Cluster {
        // RUST_LOG=lock_dlm=info,concord_fs=debug shows what the nodes did.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let nodes = rt.block_on(async {
            let mut lc = LocalCluster::create(dir.path(), "test", n).unwrap();
            let mut nodes = Vec::new();
            for id in 1..=n {
                let opts = NodeOptions::local(&mut lc, id);
                nodes.push(Node::start(&lc.config, id, opts).await.unwrap());
            }
            for node in &nodes {
                assert!(node.wait_peers_up(Duration::from_secs(20)).await, "peers of node {} not up", node.id());
            }
            nodes
        });
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(96 << 20));
        let o = MkfsOptions {
            journals,
            journal_mib: Some(8),
            lockproto: "lock_dlm".into(),
            locktable: format!("test:{FS_NAME}"),
            rgrp_blocks: Some(2048),
            ..Default::default()
        };
        mkfs(&dev, &o, &mut |_, _| {}).unwrap();
        Cluster { rt, nodes, dev, _dir: dir }
    }

    /// Mounts the device on node `id` (1-based) through its lockd.
    fn mount(&self, id: u32) -> ClusterMount {
        self.mount_on(id, self.dev.clone())
    }

    /// Mounts `dev` (the shared device, maybe wrapped) on node `id`.
    fn mount_on(&self, id: u32, dev: Arc<dyn BlockDevice>) -> ClusterMount {
        let path = self.nodes[id as usize - 1].socket_path().to_path_buf();
        let ls = self.rt.block_on(async {
            let c = Client::connect(&path).await.unwrap();
            tokio::time::timeout(Duration::from_secs(30), c.join(FS_NAME, JoinKind::WithRecovery))
                .await
                .unwrap()
                .unwrap()
        });
        let opts = MountOptions { meta_cache_blocks: 4096, ..Default::default() };
        mount_cluster(dev, ls, self.rt.handle().clone(), &opts).unwrap()
    }

    fn stop(self) {
        let Cluster { rt, nodes, .. } = self;
        rt.block_on(async {
            for n in nodes {
                n.shutdown().await;
            }
        });
    }
}

/// The shared device as one node sees it, counting the writes and flushes that reach
/// it; once `fail` is set they fail instead (a dying disk path).
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn BlockDevice>,
    fail: std::sync::atomic::AtomicBool,
    writes: AtomicU64,
}

impl Counting {
    fn new(inner: Arc<dyn BlockDevice>) -> Arc<Counting> {
        Arc::new(Counting { inner, fail: false.into(), writes: AtomicU64::new(0) })
    }

    fn pass(&self, op: &'static str, offset: u64) -> Result<(), concord_journal::DeviceError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(concord_journal::DeviceError::Io { op, offset, source: std::io::Error::other("injected") });
        }
        self.writes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl BlockDevice for Counting {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), concord_journal::DeviceError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), concord_journal::DeviceError> {
        self.pass("write", offset)?;
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> Result<(), concord_journal::DeviceError> {
        self.pass("flush", 0)?;
        self.inner.flush()
    }
}

fn fsck_clean(dev: &Arc<dyn BlockDevice>) {
    let r = fsck(dev, &FsckOptions { repair: false }, &mut |_, _| {}).unwrap();
    let problems: Vec<String> = r.problems.iter().map(|p| format!("block {}: {}", p.block, p.what)).collect();
    assert!(r.is_clean(), "fsck after unmount:\n{}", problems.join("\n"));
}

#[test]
fn two_nodes_see_each_others_changes_at_once() {
    let c = Cluster::start(2, 3);
    let a = c.mount(1);
    let b = c.mount(2);
    assert!(a.first, "the first node to mount is the first mounter");
    assert!(!b.first, "the second is not");
    assert_ne!(a.jid, b.jid, "each node has its own journal");
    let (fa, fb) = (&a.fs, &b.fs);
    let root = fa.root();

    // Data, both ways: a write returned on one node is read on the other.
    let f = fa.create(root, b"f", 0o644, 0, 0).unwrap().ino;
    fa.write(f, 0, b"hello from a").unwrap();
    assert_eq!(fb.lookup(root, b"f").unwrap().ino, f);
    assert_eq!(fb.read(f, 0, 100).unwrap(), b"hello from a");
    fb.write(f, 6, b"FROM B").unwrap();
    assert_eq!(fa.read(f, 0, 100).unwrap(), b"hello FROM B");
    // Read again on a (cached glock), then b writes: a's cached copy must go.
    assert_eq!(fa.read(f, 0, 5).unwrap(), b"hello");
    fb.write(f, 0, b"HELLO").unwrap();
    assert_eq!(fa.read(f, 0, 5).unwrap(), b"HELLO");
    // A big write on a (new blocks from a's rgrps), read whole on b. a's statfs
    // counts it at once (its change file); b's once a folded its changes into the
    // master record (statfs_sync, every STATFS_QUANTUM).
    let free_before = fb.statfs().unwrap().bfree;
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    fa.write(f, 0, &big).unwrap();
    let a_after = fa.statfs().unwrap().bfree;
    assert!(free_before - a_after >= 700, "a's statfs counts its own 3 MB at once: {free_before} -> {a_after}");
    assert!(fa.statfs_sync().unwrap(), "a had changes to fold");
    assert!(!fa.statfs_sync().unwrap(), "and then none");
    fb.statfs_sync().unwrap();
    let free_after = fb.statfs().unwrap().bfree;
    assert!(free_before - free_after >= 700, "b's statfs sees a's 3 MB: {free_before} -> {free_after}");
    assert_eq!(free_after, fa.statfs().unwrap().bfree, "both nodes count the same once both folded");
    assert!(fb.read(f, 0, big.len()).unwrap() == big, "b reads a's 3 MB write");

    // Attributes: truncate and chmod on b, seen on a.
    fb.setattr(f, &SetAttr { size: Some(1000), mode: Some(0o600), ..Default::default() }).unwrap();
    let at = fa.getattr(f).unwrap();
    assert_eq!((at.size, at.mode & 0o7777), (1000, 0o600));

    // Names: mkdir on a, creates in it on b, listing on a; rename on b; unlink on a.
    let d = fa.mkdir(root, b"d", 0o755, 0, 0).unwrap().ino;
    for i in 0..20 {
        fb.create(d, format!("n{i}").as_bytes(), 0o644, 0, 0).unwrap();
    }
    assert_eq!(fa.readdir(d, 0, 1000).unwrap().len(), 20, "a lists b's 20 names");
    fb.rename(d, b"n3", root, b"moved", RenameFlags::default()).unwrap();
    assert!(matches!(fa.lookup(d, b"n3"), Err(FsError::NotFound)));
    let moved = fa.lookup(root, b"moved").unwrap().ino;
    fa.unlink(root, b"moved").unwrap();
    assert!(matches!(fb.lookup(root, b"moved"), Err(FsError::NotFound)), "b sees a's unlink of {moved}");
    assert!(matches!(fa.create(d, b"n5", 0o644, 0, 0), Err(FsError::Exists(_))), "a sees b's create");

    a.unmount().unwrap();
    b.unmount().unwrap();
    drop((a, b));
    fsck_clean(&c.dev);
    c.stop();
}

#[test]
fn three_nodes_create_in_one_directory_at_once() {
    let c = Cluster::start(3, 3);
    let mounts: Vec<ClusterMount> = (1..=3).map(|i| c.mount(i)).collect();
    let root = mounts[0].fs.root();
    let shared = mounts[0].fs.mkdir(root, b"shared", 0o755, 0, 0).unwrap().ino;
    const EACH: usize = 60;
    std::thread::scope(|s| {
        for (i, m) in mounts.iter().enumerate() {
            let fs = m.fs.clone();
            s.spawn(move || {
                let own = fs.mkdir(root, format!("own{i}").as_bytes(), 0o755, 0, 0).unwrap().ino;
                for k in 0..EACH {
                    fs.create(shared, format!("n{i}-{k}").as_bytes(), 0o644, 0, 0).unwrap();
                    let f = fs.create(own, format!("f{k}").as_bytes(), 0o644, 0, 0).unwrap().ino;
                    fs.write(f, 0, format!("node {i} file {k}").as_bytes()).unwrap();
                }
            });
        }
    });
    for (i, m) in mounts.iter().enumerate() {
        let names = m.fs.readdir(shared, 0, 10_000).unwrap();
        assert_eq!(names.len(), 3 * EACH, "node {} lists the shared directory", i + 1);
        for j in 0..3 {
            let own = m.fs.lookup(root, format!("own{j}").as_bytes()).unwrap().ino;
            let f = m.fs.lookup(own, b"f7").unwrap().ino;
            assert_eq!(m.fs.read(f, 0, 100).unwrap(), format!("node {j} file 7").as_bytes());
        }
    }
    for m in &mounts {
        m.unmount().unwrap();
    }
    drop(mounts);
    fsck_clean(&c.dev);
    c.stop();
}

#[test]
fn a_slot_beyond_the_journals_is_refused_naming_mkfs_j() {
    let c = Cluster::start(2, 1);
    let a = c.mount(1);
    let path = c.nodes[1].socket_path().to_path_buf();
    let ls = c.rt.block_on(async {
        let cl = Client::connect(&path).await.unwrap();
        cl.join(FS_NAME, JoinKind::WithRecovery).await.unwrap()
    });
    let before = c.dev.len();
    let r = mount_cluster(c.dev.clone(), ls, c.rt.handle().clone(), &MountOptions::default());
    let e = r.expect_err("a second node on a one-journal filesystem is refused").to_string();
    assert!(e.contains("mkfs -j"), "{e}");
    assert_eq!(c.dev.len(), before);
    a.unmount().unwrap();
    drop(a);
    fsck_clean(&c.dev);
    c.stop();
}

/// Dead-node recovery, in-process: a node dies (its lockd aborted as in a crash, its
/// mount cut off) after fsync; the survivor's lockd notices, lock_dlm recovers the dead
/// node's journal on the survivor, and what the dead node had fsync'd is read there.
#[test]
fn a_dead_nodes_fsynced_changes_are_recovered_by_a_survivor() {
    let mut c = Cluster::start(3, 3);
    let seen_a = Counting::new(c.dev.clone());
    let a = c.mount_on(1, seen_a.clone());
    let b = c.mount(2);
    let root = a.fs.root();
    // Created and written on a, fsync'd there; still only in a's journal (a holds
    // the glocks, nothing asked it to write them back).
    let d = a.fs.mkdir(root, b"from-a", 0o755, 0, 0).unwrap().ino;
    let f = a.fs.create(d, b"durable", 0o644, 0, 0).unwrap().ino;
    let data: Vec<u8> = (0..20_000u32).map(|i| (i % 253) as u8).collect();
    a.fs.write(f, 0, &data).unwrap();
    a.fs.fsync_inode(f, false).unwrap();
    a.fs.fsync().unwrap();
    let jid_a = a.jid;
    // Node 1 crashes: its lockd stops at once; its mount is cut off from the DLM.
    c.nodes.remove(0).abort();
    // b's first request on what a held waits for the recovery of a's locks and
    // journal, then sees a's fsync'd work.
    let (tx, rx) = std::sync::mpsc::channel();
    let fb = b.fs.clone();
    std::thread::spawn(move || {
        let r = (|| {
            let d = fb.lookup(root, b"from-a")?.ino;
            let f = fb.lookup(d, b"durable")?.ino;
            fb.read(f, 0, 30_000)
        })();
        let _ = tx.send(r);
    });
    let got = rx.recv_timeout(Duration::from_secs(60)).expect("the survivor went on within 60 s").unwrap();
    assert!(got == data, "the survivor reads what the dead node fsync'd");
    assert!(!b.recovering(), "recovery is over on the survivor");
    // The dead node's gate closed when it lost its lockd: nothing it does reaches the
    // device any more (the survivor has replayed its journal and writes on).
    assert!(a.fenced(), "the node cut off from its lockd closed its device gate");
    let writes = seen_a.writes.load(Ordering::SeqCst);
    assert!(a.fs.write(f, 0, b"late write from the dead node").is_err());
    assert!(a.fs.create(d, b"late", 0o644, 0, 0).is_err());
    assert!(a.fs.fsync().is_err() || seen_a.writes.load(Ordering::SeqCst) == writes);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(seen_a.writes.load(Ordering::SeqCst), writes, "a write of the fenced node reached the device");
    // The survivor writes on.
    b.fs.write(f, 0, b"after").unwrap();
    b.unmount().unwrap();
    std::mem::forget(a);
    drop(b);
    let info = concord_journal::info(
        c.dev.as_ref(),
        concord_fs::journal_region(&concord_fs::read_superblock(c.dev.as_ref()).unwrap(), jid_a),
        concord_fs::read_superblock(c.dev.as_ref()).unwrap().journal_nonce(jid_a),
    )
    .unwrap();
    assert!(info.clean, "the dead node's journal was replayed and marked clean");
    fsck_clean(&c.dev);
    c.stop();
}

/// An unlinked file open on another node stays readable there, and is freed when that
/// node closes it (iopen glocks); a file nobody has open is freed by the unlink.
#[test]
fn an_unlinked_file_lives_while_another_node_has_it_open() {
    let c = Cluster::start(2, 3);
    let a = c.mount(1);
    let b = c.mount(2);
    let root = a.fs.root();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 241) as u8).collect();
    let f = a.fs.create(root, b"open-elsewhere", 0o644, 0, 0).unwrap().ino;
    a.fs.write(f, 0, &data).unwrap();
    let g = a.fs.create(root, b"open-nowhere", 0o644, 0, 0).unwrap().ino;
    a.fs.write(g, 0, &data).unwrap();
    // b opens f (and looks it up, as the kernel would).
    assert_eq!(b.fs.lookup(root, b"open-elsewhere").unwrap().ino, f);
    b.fs.open(f).unwrap();
    a.fs.unlink(root, b"open-elsewhere").unwrap();
    a.fs.unlink(root, b"open-nowhere").unwrap();
    assert!(matches!(b.fs.lookup(root, b"open-elsewhere"), Err(FsError::NotFound)));
    assert!(b.fs.read(f, 0, data.len()).unwrap() == data, "b still reads the unlinked file it has open");
    assert_eq!(b.fs.getattr(f).unwrap().nlink, 0);
    // b's last close frees it.
    b.fs.release(f).unwrap();
    a.unmount().unwrap();
    b.unmount().unwrap();
    drop((a, b));
    // Nothing is left unlinked (fsck names orphans), and every block came back.
    fsck_clean(&c.dev);
    let fs = concord_fs::Filesystem::mount(c.dev.clone(), &MountOptions { force_nolock: true, ..Default::default() })
        .unwrap();
    let st = fs.statfs().unwrap();
    fs.unmount().unwrap();
    drop(fs);
    let fresh = {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(96 << 20));
        let o = MkfsOptions {
            journals: 3,
            journal_mib: Some(8),
            lockproto: "lock_dlm".into(),
            locktable: format!("test:{FS_NAME}"),
            rgrp_blocks: Some(2048),
            ..Default::default()
        };
        mkfs(&dev, &o, &mut |_, _| {}).unwrap();
        let fs =
            concord_fs::Filesystem::mount(dev, &MountOptions { force_nolock: true, ..Default::default() }).unwrap();
        fs.statfs().unwrap()
    };
    assert_eq!(st.bfree, fresh.bfree, "the two unlinked files' blocks are free again");
    c.stop();
}

/// Replaying a dead node's journal never puts back an old copy of a block that a live
/// node changed after the dead node logged it: a's changes to a dinode are in a's
/// journal, b takes the inode and changes it, then a dies and b replays a's journal.
#[test]
fn replay_of_a_dead_node_never_overwrites_a_newer_block() {
    let mut c = Cluster::start(3, 3);
    let a = c.mount(1);
    let b = c.mount(2);
    let root = a.fs.root();
    let f = a.fs.create(root, b"contested", 0o644, 0, 0).unwrap().ino;
    a.fs.write(f, 0, b"old contents from a").unwrap();
    a.fs.setattr(f, &SetAttr { mode: Some(0o640), ..Default::default() }).unwrap();
    a.fs.fsync().unwrap();
    // The dinode's old copies are in a's journal. b takes the inode (a demotes) and
    // changes it; b writes it home.
    b.fs.setattr(f, &SetAttr { mode: Some(0o600), size: Some(3), ..Default::default() }).unwrap();
    b.fs.write(f, 0, b"NEW").unwrap();
    b.fs.checkpoint().unwrap();
    // a dies; b recovers a's journal.
    c.nodes.remove(0).abort();
    let (tx, rx) = std::sync::mpsc::channel();
    let fb = b.fs.clone();
    std::thread::spawn(move || {
        // Waits for the recovery: the root directory's glock was a's.
        let _ = tx.send(fb.create(root, b"after-recovery", 0o644, 0, 0).map(|_| ()));
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("the survivor went on within 60 s").unwrap();
    assert!(!b.recovering());
    b.fs.forget_metadata();
    let at = b.fs.getattr(f).unwrap();
    assert_eq!((at.mode & 0o7777, at.size), (0o600, 3), "the replay put back a's old dinode");
    assert_eq!(b.fs.read(f, 0, 100).unwrap(), b"NEW");
    b.unmount().unwrap();
    std::mem::forget(a);
    drop(b);
    fsck_clean(&c.dev);
    c.stop();
}

/// A demote writes back only its own glock's blocks (GFS2's ail_empty_gl): what the
/// node logged under glocks it keeps stays in its journal, is not written home, and is
/// replayed if the node dies; the blocks it gave up are revoked, so the replay does not
/// put their old copies over what the other node wrote there since.
#[test]
fn a_demote_writes_back_only_its_glocks_blocks_and_a_replay_keeps_the_rest() {
    let mut c = Cluster::start(3, 3);
    let a = c.mount(1);
    let b = c.mount(2);
    let root = a.fs.root();
    let d1 = a.fs.mkdir(root, b"given", 0o755, 0, 0).unwrap().ino;
    let d2 = a.fs.mkdir(root, b"kept", 0o755, 0, 0).unwrap().ino;
    let x = a.fs.create(d1, b"x", 0o644, 0, 0).unwrap().ino;
    for i in 0..40u32 {
        a.fs.create(d2, format!("y{i}").as_bytes(), 0o644, 0, 0).unwrap();
    }
    a.fs.setattr(x, &SetAttr { mode: Some(0o640), ..Default::default() }).unwrap();
    a.fs.fsync().unwrap();
    let before = a.fs.journal_stats().unwrap();
    assert!(before.ail_blocks > 0, "a's work is only in its journal: {before:?}");

    // b takes x and its directory: a writes back their blocks, and only theirs.
    let bx = b.fs.lookup(b.fs.lookup(root, b"given").unwrap().ino, b"x").unwrap().ino;
    assert_eq!(bx, x);
    b.fs.setattr(x, &SetAttr { mode: Some(0o600), ..Default::default() }).unwrap();
    let after = a.fs.journal_stats().unwrap();
    assert_eq!(after.checkpoints, before.checkpoints, "no whole checkpoint: {after:?}");
    assert!(after.blocks_written_back > before.blocks_written_back, "x's blocks were written back: {after:?}");
    assert!(after.ail_blocks > 0, "the kept directory's blocks are still only in a's journal: {after:?}");
    b.fs.checkpoint().unwrap();

    // a dies; b replays its journal.
    c.nodes.remove(0).abort();
    let (tx, rx) = std::sync::mpsc::channel();
    let fb = b.fs.clone();
    std::thread::spawn(move || {
        // The root's glock was a's: waits for the recovery.
        let _ = tx.send(fb.create(root, b"after-recovery", 0o644, 0, 0).map(|_| ()));
    });
    rx.recv_timeout(Duration::from_secs(60)).expect("the survivor went on within 60 s").unwrap();
    b.fs.forget_metadata();
    assert_eq!(b.fs.getattr(x).unwrap().mode & 0o7777, 0o600, "the replay put a's old dinode of x back");
    let kept = b.fs.lookup(root, b"kept").unwrap().ino;
    assert_eq!(kept, d2);
    for i in 0..40u32 {
        b.fs.lookup(d2, format!("y{i}").as_bytes()).unwrap_or_else(|e| panic!("y{i} of a's journal: {e}"));
    }
    b.unmount().unwrap();
    std::mem::forget(a);
    drop(b);
    fsck_clean(&c.dev);
    c.stop();
}

/// Names of a directory whose glock left this node lately are not noted for the kernel
/// (the FUSE layer gives them with a zero entry timeout): such a directory moves
/// between nodes, and a later demote's invalidation of noted names can wait behind a
/// local request holding the directory lock (a late invalidation). A directory only
/// this node uses keeps its names noted.
#[test]
fn names_in_a_directory_another_node_changes_are_not_kept_by_the_kernel() {
    let c = Cluster::start(2, 2);
    let a = c.mount(1);
    let b = c.mount(2);
    let root = a.fs.root();
    let shared = a.fs.mkdir(root, b"shared", 0o755, 0, 0).unwrap().ino;
    let private = a.fs.mkdir(root, b"private", 0o755, 0, 0).unwrap().ino;
    for dir in [shared, private] {
        let e = a.fs.entry_epoch(dir);
        assert!(a.fs.note_entries(dir, e, [&b"x"[..]]), "a directory only a uses: noted");
    }
    // b changes the shared directory: its glock leaves a.
    b.fs.create(b.fs.lookup(root, b"shared").unwrap().ino, b"from-b", 0o644, 0, 0).unwrap();
    assert!(a.fs.lookup(shared, b"from-b").is_ok());
    let e = a.fs.entry_epoch(shared);
    assert!(!a.fs.note_entries(shared, e, [&b"y"[..]]), "the shared directory's names get no entry timeout");
    let e = a.fs.entry_epoch(private);
    assert!(a.fs.note_entries(private, e, [&b"y"[..]]), "the private one's still do");
    a.unmount().unwrap();
    b.unmount().unwrap();
    c.stop();
}

/// Rgrp headers stay right when nodes allocate from the rgrp the first mounter read at
/// mount (it once cached every header there without the rgrps' glocks, and a later
/// allocation wrote a header from that stale copy: fsck found the counts off).
#[test]
fn allocations_after_another_nodes_truncate_keep_rgrp_headers_right() {
    let c = Cluster::start(3, 3);
    let m: Vec<ClusterMount> = (1..=3).map(|i| c.mount(i)).collect();
    let root = m[0].fs.root();
    let big = vec![7u8; 3 << 20];
    let f = m[2].fs.create(root, b"big", 0o644, 0, 0).unwrap().ino;
    m[2].fs.write(f, 0, &big).unwrap();
    let f2 = m[1].fs.lookup(root, b"big").unwrap().ino;
    m[1].fs.setattr(f2, &SetAttr { size: Some(5000), ..Default::default() }).unwrap();
    let n = m[1].fs.create(root, b"new", 0o644, 0, 0).unwrap().ino;
    m[1].fs.write(n, 0, b"alloc on node 2").unwrap();
    let n1 = m[0].fs.create(root, b"new1", 0o644, 0, 0).unwrap().ino;
    m[0].fs.write(n1, 0, &vec![1u8; 100000]).unwrap();
    for x in &m {
        x.unmount().unwrap();
    }
    drop(m);
    fsck_clean(&c.dev);
    c.stop();
}

/// An inode unlinked while the kernels of both nodes still reference it (they send no
/// FORGET at unmount) is freed when the last of them unmounts: fsck finds no orphan.
#[test]
fn an_inode_still_referenced_at_unmount_is_freed_by_the_last_node() {
    let c = Cluster::start(2, 3);
    let a = c.mount(1);
    let b = c.mount(2);
    let root = a.fs.root();
    let f = a.fs.create(root, b"a", 0o644, 0, 0).unwrap().ino;
    a.fs.reference(f, 1);
    a.fs.write(f, 0, b"x\n").unwrap();
    assert_eq!(b.fs.lookup(root, b"a").unwrap().ino, f);
    b.fs.reference(f, 1);
    b.fs.unlink(root, b"a").unwrap();
    let d = b.fs.mkdir(root, b"d", 0o755, 0, 0).unwrap().ino;
    b.fs.reference(d, 1);
    assert_eq!(a.fs.lookup(root, b"d").unwrap().ino, d);
    a.fs.reference(d, 1);
    a.fs.rmdir(root, b"d").unwrap();
    a.unmount().unwrap();
    b.unmount().unwrap();
    drop((a, b));
    fsck_clean(&c.dev);
    c.stop();
}

/// An inode unlinked while this node still references it, which another node looked
/// at and forgot (its iopen glock only cached there, no holder), is freed when this
/// node unmounts: the first exclusive try fails on the other node's cached lock and
/// makes it give the lock back (TRY_1CB), and the unmount tries again. Tried once only,
/// the inode was left behind, since the other node never learns it was unlinked (fsck
/// found such orphans after a stress run's `cluster down`).
#[test]
fn an_unlinked_inode_another_node_only_cached_is_freed_at_unmount() {
    let c = Cluster::start(2, 3);
    let a = c.mount(1);
    let b = c.mount(2);
    let root = a.fs.root();
    let f = a.fs.create(root, b"a", 0o644, 0, 0).unwrap().ino;
    a.fs.reference(f, 1);
    a.fs.write(f, 0, b"x\n").unwrap();
    assert_eq!(b.fs.lookup(root, b"a").unwrap().ino, f);
    b.fs.reference(f, 1);
    b.fs.forget(f, 1).unwrap();
    a.fs.unlink(root, b"a").unwrap();
    a.unmount().unwrap();
    b.unmount().unwrap();
    drop((a, b));
    fsck_clean(&c.dev);
    c.stop();
}

/// By hand (`cargo test --release -p concord-fs --test cluster -- --ignored --nocapture
/// bench_`): through the filesystem API (no FUSE), the time from a write starting on
/// one node to the new bytes read on another (the demote path: sync, invalidate,
/// convert, grant), and creates per second from one node and from two at once.
#[test]
#[ignore = "a benchmark, run by hand"]
fn bench_cross_node_write_read_and_creates() {
    let c = Cluster::start(3, 3);
    let a = c.mount(1);
    let b = c.mount(2);
    let root = a.fs.root();
    let f = a.fs.create(root, b"pingpong", 0o644, 0, 0).unwrap().ino;
    a.fs.write(f, 0, &[0u8; 4096]).unwrap();
    let mut ns = Vec::new();
    for i in 0..300u32 {
        let t = std::time::Instant::now();
        a.fs.write(f, 0, &i.to_le_bytes()).unwrap();
        let got = b.fs.read(f, 0, 4).unwrap();
        ns.push(t.elapsed().as_micros() as u64);
        assert_eq!(got, i.to_le_bytes());
    }
    ns.sort_unstable();
    eprintln!(
        "write on a -> read on b: p50 {} us, p99 {} us ({} rounds)",
        ns[ns.len() / 2],
        ns[ns.len() * 99 / 100],
        ns.len()
    );
    const N: usize = 2000;
    let creates = |fs: &concord_fs::Filesystem, dir: u64, tag: &str| {
        for k in 0..N {
            fs.create(dir, format!("{tag}-{k}").as_bytes(), 0o644, 0, 0).unwrap();
        }
    };
    let da = a.fs.mkdir(root, b"alone", 0o755, 0, 0).unwrap().ino;
    let t = std::time::Instant::now();
    creates(&a.fs, da, "a");
    eprintln!("creates, one node: {:.0}/s", N as f64 / t.elapsed().as_secs_f64());
    let (d1, d2) =
        (a.fs.mkdir(root, b"own-a", 0o755, 0, 0).unwrap().ino, b.fs.mkdir(root, b"own-b", 0o755, 0, 0).unwrap().ino);
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| creates(&a.fs, d1, "a"));
        s.spawn(|| creates(&b.fs, d2, "b"));
    });
    eprintln!("creates, two nodes, own directories: {:.0}/s in all", 2.0 * N as f64 / t.elapsed().as_secs_f64());
    let shared = a.fs.mkdir(root, b"shared", 0o755, 0, 0).unwrap().ino;
    let t = std::time::Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| creates(&a.fs, shared, "a"));
        s.spawn(|| creates(&b.fs, shared, "b"));
    });
    eprintln!("creates, two nodes, one shared directory: {:.0}/s in all", 2.0 * N as f64 / t.elapsed().as_secs_f64());
    a.unmount().unwrap();
    b.unmount().unwrap();
    drop((a, b));
    c.stop();
}

/// A freed inode read by number (a kernel's late FORGET or GETATTR) is stale, not
/// corrupt: its block may never have been written home (found by fsbench's rm of
/// fio's files: the node withdrew on "bad magic").
#[test]
fn a_freed_inode_read_by_number_is_stale_not_corrupt() {
    let c = Cluster::start(2, 3);
    let a = c.mount(1);
    let root = a.fs.root();
    let f = a.fs.create(root, b"brief", 0o644, 0, 0).unwrap().ino;
    a.fs.reference(f, 1);
    a.fs.unlink(root, b"brief").unwrap();
    a.fs.forget(f, 1).unwrap();
    assert!(matches!(a.fs.getattr(f), Err(FsError::Stale(_) | FsError::NotFound)), "{:?}", a.fs.getattr(f));
    a.fs.forget(f, 1).unwrap();
    assert!(!a.fs.is_withdrawn(), "reading a freed inode withdrew the node");
    a.fs.create(root, b"after", 0o644, 0, 0).unwrap();
    a.unmount().unwrap();
    drop(a);
    fsck_clean(&c.dev);
    c.stop();
}

/// A node that freed an inode keeps its iopen glock cached exclusive (its TRY EX
/// succeeded). When it makes a new inode with the same number and holds it (the
/// kernel's reference), that hold must bring the glock down to SH (GFS2 takes iopen
/// holders with GL_EXACT): served by the cached EX instead, another node's open of the
/// new file asks for SH, and the demote it needs waits for this node's holder, which
/// stays as long as this node has the inode: the other node's open hangs. (Found by
/// tests/ cluster_recovery: a survivor reading a file whose inode number its writer
/// had freed and used again.)
#[test]
fn an_iopen_hold_under_a_cached_exclusive_glock_lets_other_nodes_open() {
    use concord_fs::cluster::DlmLocks;
    use concord_fs::lock::{LockMode, LockModule, LockName};
    let c = Cluster::start(2, 3);
    let a = c.mount(1);
    let b = c.mount(2);
    let (la, lb) = (Arc::new(DlmLocks::new(a.glocks.clone())), Arc::new(DlmLocks::new(b.glocks.clone())));
    let ino = LockName::Iopen(1 << 40);
    // a frees the inode: its exclusive try works, and the glock stays cached EX.
    let freeing = la.try_acquire(ino, LockMode::Exclusive).unwrap().expect("nobody else has it");
    drop(freeing);
    // a makes a new inode with that number and holds it, as long as it has it.
    let _held_by_a = la.acquire(ino, LockMode::Shared).unwrap();
    // b opens it.
    let (tx, rx) = std::sync::mpsc::channel();
    let lb2 = lb.clone();
    std::thread::spawn(move || {
        let _ = tx.send(lb2.acquire(ino, LockMode::Shared).map(drop));
    });
    let r = rx.recv_timeout(Duration::from_secs(30)).expect("b's iopen SH waited 30 s behind a's holder");
    r.unwrap();
    drop(_held_by_a);
    a.unmount().unwrap();
    b.unmount().unwrap();
    drop((a, b));
    c.stop();
}

/// A node whose device writes fail withdraws: it stops writing, and it leaves the
/// lockspace as a crash would, so that the other node recovers its journal (with what
/// it had fsync'd) and goes on in the directory the withdrawn node held EX, rather
/// than waiting for glocks that node would never give back.
#[test]
fn a_node_that_withdraws_is_recovered_by_the_others() {
    let c = Cluster::start(2, 3);
    let seen_a = Counting::new(c.dev.clone());
    let a = c.mount_on(1, seen_a.clone());
    let b = c.mount(2);
    let root = a.fs.root();
    let d = a.fs.mkdir(root, b"held-by-a", 0o755, 0, 0).unwrap().ino;
    let f = a.fs.create(d, b"durable", 0o644, 0, 0).unwrap().ino;
    let data: Vec<u8> = (0..12_000u32).map(|i| (i % 241) as u8).collect();
    a.fs.write(f, 0, &data).unwrap();
    a.fs.fsync().unwrap();
    let jid_a = a.jid;
    // a's disk path fails: its next write in place (or commit) fails and a withdraws.
    seen_a.fail.store(true, Ordering::SeqCst);
    let w = a.fs.write(f, 0, b"lost with the disk");
    assert!(w.is_err() || a.fs.fsync().is_err(), "a write or commit on a failing device fails");
    assert!(a.fs.is_withdrawn(), "a withdrew");
    assert!(a.fenced(), "a's device gate closed with the withdraw");
    seen_a.fail.store(false, Ordering::SeqCst);
    let writes = seen_a.writes.load(Ordering::SeqCst);
    assert!(a.fs.create(d, b"late", 0o644, 0, 0).is_err(), "a withdrawn node refuses work");
    // b recovers a's journal and goes on where a held the locks.
    let (tx, rx) = std::sync::mpsc::channel();
    let fb = b.fs.clone();
    std::thread::spawn(move || {
        let r = (|| {
            let d = fb.lookup(root, b"held-by-a")?.ino;
            let f = fb.lookup(d, b"durable")?.ino;
            let got = fb.read(f, 0, 20_000)?;
            fb.create(d, b"from-b", 0o644, 0, 0)?;
            Ok::<_, concord_fs::FsError>(got)
        })();
        let _ = tx.send(r);
    });
    let got = rx.recv_timeout(Duration::from_secs(60)).expect("b went on within 60 s of a's withdraw").unwrap();
    assert!(got == data, "b reads what a fsync'd before it withdrew");
    assert!(!b.recovering(), "recovery is over on b");
    assert!(a.unmount().is_err(), "a withdrawn node's unmount says so");
    assert_eq!(seen_a.writes.load(Ordering::SeqCst), writes, "a write of the withdrawn node reached the device");
    b.unmount().unwrap();
    drop((a, b));
    let sb = concord_fs::read_superblock(c.dev.as_ref()).unwrap();
    let info =
        concord_journal::info(c.dev.as_ref(), concord_fs::journal_region(&sb, jid_a), sb.journal_nonce(jid_a)).unwrap();
    assert!(info.clean, "b replayed a's journal and marked it clean");
    fsck_clean(&c.dev);
    c.stop();
}

/// What a node allocated and did not yet fold into the statfs master record when it
/// died is folded by the survivor that replays its journal: `df` elsewhere counts it.
#[test]
fn a_dead_nodes_statfs_changes_are_folded_by_the_survivor() {
    let mut c = Cluster::start(3, 3);
    let a = c.mount(1);
    let b = c.mount(2);
    let root = a.fs.root();
    let free_before = b.fs.statfs().unwrap().bfree;
    let f = a.fs.create(root, b"kept", 0o644, 0, 0).unwrap().ino;
    a.fs.write(f, 0, &vec![7u8; 1 << 20]).unwrap();
    a.fs.fsync().unwrap();
    assert_eq!(b.fs.statfs().unwrap().bfree, free_before, "not folded yet: b does not count it");
    c.nodes.remove(0).abort();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // Through the root, which a held EX: waits for the recovery.
        assert_eq!(b.fs.lookup(root, b"kept").unwrap().ino, f);
        let free = b.fs.statfs().unwrap().bfree;
        if free + 256 <= free_before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dead node's allocation never reached the master record: {free} free, {free_before} before"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.unmount().unwrap();
    std::mem::forget(a);
    drop(b);
    fsck_clean(&c.dev);
    c.stop();
}

/// A node that dies with an unlinked file open leaves it behind, unlinked; the survivor
/// that replays its journal scans for such orphans and frees them (no live node has
/// them open), so the space comes back without waiting for the next first mounter.
#[test]
fn a_dead_nodes_open_unlinked_file_is_freed_by_the_survivor() {
    let mut c = Cluster::start(3, 3);
    let a = c.mount(1);
    let b = c.mount(2);
    let root = a.fs.root();
    let free_before = b.fs.statfs().unwrap().bfree;
    let f = a.fs.create(root, b"doomed", 0o644, 0, 0).unwrap().ino;
    a.fs.write(f, 0, &vec![7u8; 1 << 20]).unwrap();
    a.fs.open(f).unwrap();
    a.fs.unlink(root, b"doomed").unwrap();
    a.fs.fsync().unwrap();
    // b's statfs counts the allocation once a folded it into the master record.
    assert!(a.fs.statfs_sync().unwrap());
    let free_used = b.fs.statfs().unwrap().bfree;
    assert!(free_used + 256 <= free_before, "b counts a's 1 MiB: {free_before} -> {free_used}");
    // Node 1 crashes with the file open.
    c.nodes.remove(0).abort();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        // Going through the root, which a held EX, waits for the recovery.
        assert!(matches!(b.fs.lookup(root, b"doomed"), Err(FsError::NotFound)));
        let free = b.fs.statfs().unwrap().bfree;
        if free + 4 >= free_before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dead node's unlinked file was not freed: {free} free blocks, {free_before} before it"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.unmount().unwrap();
    std::mem::forget(a);
    drop(b);
    fsck_clean(&c.dev);
    c.stop();
}

/// An inode made on a node whose glock never left it cannot be known to any other
/// node: its unlink frees it without asking the DLM. Once another node has looked at
/// it, freeing it asks the iopen glock again.
#[test]
fn an_inode_that_never_left_its_node_is_freed_without_the_dlm() {
    let c = Cluster::start(2, 3);
    let a = c.mount(1);
    let b = c.mount(2);
    let root = a.fs.root();
    let free0 = a.fs.statfs().unwrap().bfree;
    let fresh = a.fs.create(root, b"fresh", 0o644, 0, 0).unwrap().ino;
    a.fs.write(fresh, 0, &[1u8; 10_000]).unwrap();
    let before = a.glocks.dlm_requests();
    a.fs.unlink(root, b"fresh").unwrap();
    assert_eq!(a.glocks.dlm_requests(), before, "the unlink and free of an inode that never left node a");
    assert_eq!(a.fs.statfs().unwrap().bfree, free0, "the fresh inode and its blocks were freed");
    let seen = a.fs.create(root, b"seen", 0o644, 0, 0).unwrap().ino;
    a.fs.write(seen, 0, &[2u8; 10_000]).unwrap();
    assert_eq!(b.fs.lookup(root, b"seen").unwrap().ino, seen);
    let before = a.glocks.dlm_requests();
    a.fs.unlink(root, b"seen").unwrap();
    assert!(a.glocks.dlm_requests() > before, "node b had the inode: node a asks the DLM before freeing it");
    assert_eq!(a.fs.statfs().unwrap().bfree, free0, "the inode node b had seen (and no longer has) was freed");
    a.unmount().unwrap();
    b.unmount().unwrap();
    drop((a, b));
    fsck_clean(&c.dev);
    c.stop();
}

/// A file one node unlinked while another had it open is freed when the node that had
/// it dies: the unlinking node gave up (the inode was held elsewhere) and kept the
/// rgrp's glock, whose header, counting the unlinked inode, is in its journal and not
/// yet on the device. The survivor's orphan scan after the recovery reads each rgrp
/// header under its glock; read from the device, the stale header counted nothing and
/// the inode stayed an orphan (fsck found one after a stress run with a kill).
#[test]
fn a_file_unlinked_while_open_on_a_node_that_dies_is_freed_by_the_survivors() {
    let mut c = Cluster::start(3, 3);
    let a = c.mount(1);
    let b = c.mount(2);
    let d = c.mount(3);
    let root = b.fs.root();
    let free_before = b.fs.statfs().unwrap().bfree;
    let f = b.fs.create(root, b"held", 0o644, 0, 0).unwrap().ino;
    b.fs.write(f, 0, &vec![3u8; 1 << 20]).unwrap();
    b.fs.fsync().unwrap();
    assert_eq!(a.fs.lookup(root, b"held").unwrap().ino, f);
    a.fs.open(f).unwrap();
    b.fs.unlink(root, b"held").unwrap();
    b.fs.fsync().unwrap();
    // b's reclaim thread tries again for about 2 s, then leaves the inode to a.
    std::thread::sleep(Duration::from_secs(4));
    assert!(b.fs.statfs_sync().unwrap());
    assert!(d.fs.statfs().unwrap().bfree + 256 <= free_before, "the file's blocks are still in use");
    // Node 1 dies with the file open: a survivor replays its journal and scans.
    c.nodes.remove(0).abort();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        assert!(matches!(d.fs.lookup(root, b"held"), Err(FsError::NotFound)));
        b.fs.statfs_sync().unwrap();
        d.fs.statfs_sync().unwrap();
        let free = d.fs.statfs().unwrap().bfree;
        if free + 4 >= free_before {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the file the dead node had open was not freed: {free} free blocks, {free_before} before it"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d.unmount().unwrap();
    b.unmount().unwrap();
    std::mem::forget(a);
    drop((b, d));
    fsck_clean(&c.dev);
    c.stop();
}

/// New inodes take numbers whose glocks' DLM directory entry is on the node that makes
/// them (lockd places a glock name by its number), so that a create asks no other
/// node. Data still goes right after its inode, into the blocks passed over.
#[test]
fn new_inodes_take_numbers_whose_lock_directory_is_their_own_node() {
    use concord_lockd::core::directory::directory_node;
    let c = Cluster::start(3, 3);
    let mounts: Vec<ClusterMount> = (1..=3).map(|id| c.mount(id)).collect();
    let root = mounts[0].fs.root();
    for (i, m) in mounts.iter().enumerate() {
        let node = i as u32 + 1;
        let dir = m.fs.mkdir(root, format!("d{node}").as_bytes(), 0o755, 0, 0).unwrap().ino;
        let mut inos = vec![dir];
        for k in 0..60 {
            let f = m.fs.create(dir, format!("f{k}").as_bytes(), 0o644, 0, 0).unwrap().ino;
            if k % 3 == 0 {
                m.fs.write(f, 0, &[k as u8; 5000]).unwrap();
            }
            inos.push(f);
        }
        for ino in inos {
            let name = format!("{:8x}{:16x}", 2, ino);
            assert_eq!(directory_node(&[1, 2, 3], name.as_bytes()), node, "inode {ino} made on node {node}");
        }
    }
    for m in &mounts {
        m.fs.fsync().unwrap();
    }
    // Every node sees every file, with its data.
    let d1 = mounts[2].fs.lookup(root, b"d1").unwrap().ino;
    let f3 = mounts[2].fs.lookup(d1, b"f3").unwrap().ino;
    assert_eq!(mounts[2].fs.read(f3, 0, 6000).unwrap(), vec![3u8; 5000]);
    for m in mounts {
        m.unmount().unwrap();
    }
    fsck_clean(&c.dev);
    c.stop();
}
