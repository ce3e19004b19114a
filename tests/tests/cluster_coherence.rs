//! The kernel's caches across nodes, as real processes (three lockds and FUSE mounts of
//! one image): the cases that the FUSE coherence notes
//! (../shared/reference/fuse-coherence.md) name as the ones where other FUSE
//! filesystems deadlock or go stale. Shared mmaps that read and write across nodes, a
//! demote that meets dirty mmap pages in the kernel, demotes of a directory while the
//! node it leaves runs lookups in it, demotes during reads, and an unlinked file that
//! lives on while another node has it open; Concord's read-around window of a random
//! reader after another node writes into it. A system call that hangs (a deadlock) is
//! reported by a deadline on the thread that made it. Needs root and /dev/fuse (skipped
//! otherwise, failing under CI).

use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use concord_tests::{can_mount, Cluster, Spec};

/// How long one system call (or a short batch of them) may take before the test calls
/// it a hang: far beyond any demote, short of the harness's watchdog.
const HANG: Duration = Duration::from_secs(60);

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| ((k * 13 + seed * 101) % 251) as u8).collect()
}

/// Runs `f` on its own thread and returns its result, or panics naming `what` if it
/// has not returned within [`HANG`] (the thread is left behind; the cluster's drop
/// aborts the mounts, which ends its system call).
fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(HANG) {
        Ok(v) => v,
        Err(_) => panic!("{what} did not return within {HANG:?}: a demote deadlocked with the kernel"),
    }
}

/// A shared mapping of a whole file.
struct Map {
    ptr: *mut u8,
    len: usize,
    _file: std::fs::File,
}

// SAFETY: the mapping is only read and written through volatile accesses by whichever
// thread owns the Map; it is unmapped once, on drop.
unsafe impl Send for Map {}

impl Map {
    fn new(path: &Path, writable: bool) -> Map {
        let file = std::fs::OpenOptions::new().read(true).write(writable).open(path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: a fresh shared mapping of an open file of `len` bytes.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        assert_ne!(ptr, libc::MAP_FAILED, "mmap {}: {}", path.display(), std::io::Error::last_os_error());
        Map { ptr: ptr.cast(), len, _file: file }
    }

    fn read(&self) -> Vec<u8> {
        // SAFETY: every index is inside the mapping; volatile so that each call reads
        // the pages as they are now (a new fault after an invalidation).
        (0..self.len).map(|k| unsafe { std::ptr::read_volatile(self.ptr.add(k)) }).collect()
    }

    fn write(&self, at: usize, bytes: &[u8]) {
        assert!(at + bytes.len() <= self.len);
        for (k, b) in bytes.iter().enumerate() {
            // SAFETY: inside the (writable) mapping.
            unsafe { std::ptr::write_volatile(self.ptr.add(at + k), *b) };
        }
    }

    fn msync(&self) {
        // SAFETY: the whole mapping.
        let r = unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) };
        assert_eq!(r, 0, "msync: {}", std::io::Error::last_os_error());
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: mapped in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn statfs_free(p: &Path) -> u64 {
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: a zeroed statvfs filled by the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and a statvfs to fill.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(r, 0, "statvfs {}: {}", p.display(), std::io::Error::last_os_error());
    st.f_bfree
}

/// A node's shared mapping shows another node's write as soon as that write returned;
/// a node's mmap write, once msync'd, is read by the others; and a node that still
/// has dirty pages in a shared mapping when another node reads the file (a demote that
/// meets dirty kernel pages) neither hangs nor loses them: they reach the others once
/// msync'd.
#[test]
fn shared_mmaps_across_nodes() {
    const T: &str = "shared_mmaps_across_nodes";
    if !can_mount(T) {
        return;
    }
    let c = Cluster::up(T, Spec::nodes(3));
    let (m1, m2, m3) = (c.mnt(1), c.mnt(2), c.mnt(3));
    let len = 64 * 1024;
    std::fs::write(m1.join("m"), pattern(1, len)).unwrap();

    // A reader's mapping on node 2 sees node 1's write, then node 3's.
    let map2 = Map::new(&m2.join("m"), false);
    assert!(map2.read() == pattern(1, len), "node 2's mapping reads node 1's file");
    std::fs::OpenOptions::new().write(true).open(m1.join("m")).unwrap().write_all_at(&pattern(2, len), 0).unwrap();
    assert!(map2.read() == pattern(2, len), "node 2's mapping sees node 1's overwrite at once");
    std::fs::OpenOptions::new().write(true).open(m3.join("m")).unwrap().write_all_at(b"node three", 4096).unwrap();
    let mut want = pattern(2, len);
    want[4096..4106].copy_from_slice(b"node three");
    assert!(map2.read() == want, "node 2's mapping sees node 3's write in its second page");

    // A writer's mapping on node 3, msync'd: nodes 1 and 2 (file and mapping) read it.
    let map3 = Map::new(&m3.join("m"), true);
    map3.write(100, b"mapped on 3");
    map3.msync();
    want[100..111].copy_from_slice(b"mapped on 3");
    assert!(std::fs::read(m1.join("m")).unwrap() == want, "node 1 reads node 3's msync'd mmap write");
    assert!(map2.read() == want, "node 2's mapping reads node 3's msync'd mmap write");

    // Dirty pages on node 3 that are not msync'd when node 1 reads and then writes the
    // file: each demote of node 3's glock meets them in the kernel. Nothing hangs.
    map3.write(20_000, b"dirty on 3");
    let p1 = m1.join("m");
    let got = within("node 1's read while node 3 has dirty mmap pages", move || std::fs::read(p1).unwrap());
    assert_eq!(got.len(), len);
    let p1 = m1.join("m");
    within("node 1's write while node 3 has dirty mmap pages", move || {
        std::fs::OpenOptions::new().write(true).open(p1).unwrap().write_all_at(b"written on 1", 40_000).unwrap()
    });
    // Once msync'd, node 3's dirty bytes are on every node, beside node 1's write.
    let map3 = within("node 3's msync", move || {
        map3.write(20_010, b"!");
        map3.msync();
        map3
    });
    drop(map3);
    want[20_000..20_011].copy_from_slice(b"dirty on 3!");
    want[40_000..40_012].copy_from_slice(b"written on 1");
    for (n, m) in [(1, &m1), (2, &m2)] {
        let got = std::fs::read(m.join("m")).unwrap();
        assert!(got[20_000..20_011] == want[20_000..20_011], "node {n} reads node 3's once-dirty mmap bytes");
        assert!(got[40_000..40_012] == want[40_000..40_012], "node {n} reads node 1's write");
        assert!(got == want, "node {n}: the whole file");
    }
    assert!(map2.read() == want, "node 2's mapping at the end");
    drop(map2);
    let mut c = c;
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after unmount:\n{out}");
}

/// Node 1 keeps looking names up (present and absent) in one directory from several
/// threads while nodes 2 and 3 create and remove names in it: every create on another
/// node demotes node 1's directory glock while its lookups hold the kernel's directory
/// lock or wait for the glock. Nothing hangs, and when it stops every node sees the
/// same names.
#[test]
fn directory_demotes_during_lookups_complete() {
    const T: &str = "directory_demotes_during_lookups_complete";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    let (m1, m2, m3) = (c.mnt(1), c.mnt(2), c.mnt(3));
    std::fs::create_dir(m1.join("d")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::new();
    for t in 0..4 {
        let (d, stop, lookups) = (m1.join("d"), stop.clone(), lookups.clone());
        readers.push(std::thread::spawn(move || {
            let mut k = t;
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::symlink_metadata(d.join(format!("f{}", k % 120)));
                if k % 16 == 0 {
                    let _ = std::fs::read_dir(&d).map(|r| r.count());
                }
                lookups.fetch_add(1, Ordering::Relaxed);
                k += 4;
            }
        }));
    }
    let writers: Vec<_> = [(2, m2.clone()), (3, m3.clone())]
        .into_iter()
        .map(|(n, m)| {
            std::thread::spawn(move || {
                for k in 0..60 {
                    let p = m.join("d").join(format!("f{}", (n - 2) * 60 + k));
                    std::fs::write(&p, format!("{n}:{k}")).unwrap();
                    if k % 3 == 0 {
                        std::fs::remove_file(&p).unwrap();
                    }
                }
            })
        })
        .collect();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for w in writers {
            let r = w.join();
            let _ = tx.send(r.is_ok());
        }
    });
    let deadline = Instant::now() + HANG;
    for _ in 0..2 {
        let ok = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("creates on nodes 2 and 3 while node 1 looks up in the directory did not finish: a deadlock");
        assert!(ok, "a writer failed");
    }
    stop.store(true, Ordering::Relaxed);
    let readers_done = within("node 1's lookups", move || readers.into_iter().all(|r| r.join().is_ok()));
    assert!(readers_done, "a lookup thread on node 1 panicked");
    assert!(lookups.load(Ordering::Relaxed) > 0, "node 1 made no lookup at all");

    let want: std::collections::BTreeSet<String> =
        (0..120).filter(|i| (i % 60) % 3 != 0).map(|i| format!("f{i}")).collect();
    for (n, m) in [(1, &m1), (2, &m2), (3, &m3)] {
        let got: std::collections::BTreeSet<String> = std::fs::read_dir(m.join("d"))
            .unwrap_or_else(|e| panic!("node {n}: opendir: {e}"))
            .map(|e| e.unwrap_or_else(|e| panic!("node {n}: readdir: {e}")).file_name().into_string().unwrap())
            .collect();
        assert_eq!(got, want, "node {n} lists the directory");
        for name in ["f0", "f60"] {
            assert!(
                std::fs::symlink_metadata(m.join("d").join(name)).is_err(),
                "node {n}: {name} was removed on another node but is still found"
            );
        }
        assert_eq!(std::fs::read_to_string(m.join("d/f61")).unwrap(), "3:1", "node {n} reads node 3's file");
    }
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after unmount:\n{out}");
}

/// A name removed or renamed on node 1 is gone from node 2's kernel when node 1's
/// call returns, also while node 2's processes keep FUSE requests in the directory
/// waiting for its glock. Such a request holds the directory's i_rwsem in node 2's
/// kernel, and the demote's `inval_entry` needs that lock: the demote must not convert
/// (letting node 1 go on) before the kernel dropped the name, so it lends the glock to
/// the waiting requests and starts over (docs/internals/glocks.md, "Demotes"). Before
/// that, it gave up after 200 ms and node 2 kept the old name for as long as the
/// request waited.
#[test]
fn names_removed_on_one_node_are_gone_from_the_others_kernel_when_the_call_returns() {
    const T: &str = "names_removed_on_one_node_are_gone_from_the_others_kernel_when_the_call_returns";
    const ROUNDS: usize = 60;
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(2));
    let (m1, m2) = (c.mnt(1), c.mnt(2));
    std::fs::create_dir(m1.join("d")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let lookups = Arc::new(AtomicU64::new(0));
    // Node 2's stream of requests in d: lookups of names never seen before (each one
    // reaches the daemon, holding d's i_rwsem shared while it waits for d's glock)
    // and listings.
    let mut streams = Vec::new();
    for t in 0..4 {
        let (d, stop, lookups) = (m2.join("d"), stop.clone(), lookups.clone());
        streams.push(std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = std::fs::symlink_metadata(d.join(format!("x{t}-{k}")));
                if k.is_multiple_of(8) {
                    let _ = std::fs::read_dir(&d).map(|r| r.count());
                }
                lookups.fetch_add(1, Ordering::Relaxed);
                k += 1;
            }
        }));
    }
    let (d1, d2) = (m1.join("d"), m2.join("d"));
    let (stale, rounds) = within("node 1's creates, renames and unlinks", move || {
        let mut stale = Vec::new();
        // Rounds stop after 40 s, within the hang deadline: demotes that give up
        // waiting for the kernel after 200 ms make them slow.
        let stop_at = Instant::now() + Duration::from_secs(40);
        let mut rounds = 0;
        for i in 0..ROUNDS {
            if Instant::now() > stop_at {
                break;
            }
            rounds += 1;
            let old = format!("r{i}");
            std::fs::write(d1.join(&old), b"x").unwrap();
            // Node 2's kernel learns the name (a positive entry kept for 10 s).
            assert!(std::fs::symlink_metadata(d2.join(&old)).is_ok(), "round {i}: node 2 does not see {old}");
            let how = if i % 2 == 0 {
                std::fs::rename(d1.join(&old), d1.join(format!("s{i}"))).unwrap();
                "renamed"
            } else {
                std::fs::remove_file(d1.join(&old)).unwrap();
                "removed"
            };
            if std::fs::symlink_metadata(d2.join(&old)).is_ok() {
                stale.push(format!("round {i}: {old} {how} on node 1, still found on node 2"));
            }
        }
        (stale, rounds)
    });
    stop.store(true, Ordering::Relaxed);
    let streams_done = within("node 2's lookups", move || streams.into_iter().all(|s| s.join().is_ok()));
    assert!(streams_done, "a lookup thread on node 2 panicked");
    assert!(lookups.load(Ordering::Relaxed) > 0, "node 2 made no lookup at all");
    let st = c.status(2);
    eprintln!("node 2: glock lent {} times, {} late invalidations", st["glock_lends"], st["late_invals"]);
    assert!(stale.is_empty(), "{} of {rounds} rounds stale:\n{}", stale.len(), stale.join("\n"));
    assert!(rounds >= 20, "only {rounds} rounds in 40 s");
    for i in (0..rounds).step_by(2) {
        assert!(std::fs::symlink_metadata(m2.join(format!("d/s{i}"))).is_ok(), "node 2 misses s{i}");
    }
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after unmount:\n{out}");
}

/// Node 2 reads a 4 MiB file over and over (the kernel reading ahead, pages locked
/// while Concord serves them) while node 1 overwrites pieces of it: every overwrite
/// demotes node 2's glock in the middle of a read. Nothing hangs, and the last read
/// on node 2 equals the file as node 1 left it.
#[test]
fn demotes_during_reads_complete_and_the_last_read_is_current() {
    const T: &str = "demotes_during_reads_complete_and_the_last_read_is_current";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    let (m1, m2) = (c.mnt(1), c.mnt(2));
    let len = 4 << 20;
    std::fs::write(m1.join("r"), pattern(0, len)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (p2, stop2) = (m2.join("r"), stop.clone());
    let reader = std::thread::spawn(move || {
        let mut reads = 0u32;
        while !stop2.load(Ordering::Relaxed) {
            assert_eq!(std::fs::read(&p2).unwrap().len(), len, "node 2 reads the whole file");
            reads += 1;
        }
        reads
    });
    let p1 = m1.join("r");
    let want = within("node 1's overwrites while node 2 reads", move || {
        let f = std::fs::OpenOptions::new().write(true).open(&p1).unwrap();
        let mut want = pattern(0, len);
        for k in 0..40usize {
            let at = (k * 104_729) % (len - 8192);
            let piece = pattern(k + 1, 8192);
            f.write_all_at(&piece, at as u64).unwrap();
            want[at..at + 8192].copy_from_slice(&piece);
            std::thread::sleep(Duration::from_millis(5));
        }
        want
    });
    stop.store(true, Ordering::Relaxed);
    let reads = within("node 2's reader", move || reader.join().expect("node 2's reader panicked"));
    assert!(reads > 0, "node 2 finished no read");
    assert!(std::fs::read(m2.join("r")).unwrap() == want, "node 2's read after node 1's last overwrite");
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after unmount:\n{out}");
}

/// A random reader (readahead off, as fio's randread asks with FADV_RANDOM) makes the
/// kernel send one block at a time, and Concord reads the 64 KiB window around a miss
/// and keeps it. Blocks of that window that node 1 overwrites afterwards, which node
/// 2's kernel never had, must come back new on node 2: the demote of the inode's glock
/// drops Concord's cached window with the rest of the inode's data.
#[test]
fn a_random_readers_window_is_dropped_when_another_node_writes_into_it() {
    const T: &str = "a_random_readers_window_is_dropped_when_another_node_writes_into_it";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(2));
    let (m1, m2) = (c.mnt(1), c.mnt(2));
    let len = 32 * 4096;
    let mut want = pattern(7, len);
    std::fs::write(m1.join("w"), &want).unwrap();
    let f2 = std::fs::File::open(m2.join("w")).unwrap();
    // SAFETY: posix_fadvise on a file descriptor this test owns and keeps open.
    let r = unsafe { libc::posix_fadvise(f2.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    assert_eq!(r, 0, "posix_fadvise(RANDOM)");
    let read_block = |b: usize| {
        let f = f2.try_clone().unwrap();
        within("node 2's read of one block", move || {
            let mut buf = vec![0u8; 4096];
            f.read_exact_at(&mut buf, (b * 4096) as u64).unwrap();
            buf
        })
    };
    // Node 2 reads block 3 only: its window is blocks 0 to 15.
    assert!(read_block(3) == want[3 * 4096..4 * 4096], "node 2's first read");
    // Node 1 overwrites blocks 9 and 14 (inside that window) and block 20 (outside).
    let f1 = std::fs::OpenOptions::new().write(true).open(m1.join("w")).unwrap();
    for (k, b) in [9usize, 14, 20].into_iter().enumerate() {
        let piece = pattern(100 + k, 4096);
        f1.write_all_at(&piece, (b * 4096) as u64).unwrap();
        want[b * 4096..(b + 1) * 4096].copy_from_slice(&piece);
    }
    drop(f1);
    for b in [9usize, 14, 20, 3, 10] {
        assert!(read_block(b) == want[b * 4096..(b + 1) * 4096], "node 2's block {b} after node 1's overwrite");
    }
    // And the other way round: node 1 reads around block 18, node 2 writes block 25.
    let f1 = std::fs::File::open(m1.join("w")).unwrap();
    // SAFETY: as above, on node 1's descriptor.
    let r = unsafe { libc::posix_fadvise(f1.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM) };
    assert_eq!(r, 0, "posix_fadvise(RANDOM)");
    let mut buf = vec![0u8; 4096];
    f1.read_exact_at(&mut buf, 18 * 4096).unwrap();
    assert!(buf == want[18 * 4096..19 * 4096]);
    let piece = pattern(200, 4096);
    std::fs::OpenOptions::new().write(true).open(m2.join("w")).unwrap().write_all_at(&piece, 25 * 4096).unwrap();
    want[25 * 4096..26 * 4096].copy_from_slice(&piece);
    f1.read_exact_at(&mut buf, 25 * 4096).unwrap();
    assert!(buf == want[25 * 4096..26 * 4096], "node 1's block 25 after node 2's overwrite");
    drop((f1, f2));
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after unmount:\n{out}");
}

/// A file unlinked on node 1 while node 2 has it open stays readable on node 2; its
/// blocks are freed only when node 2 closes it (statfs on node 1 shows them back), and
/// fsck finds nothing left over.
#[test]
fn an_unlinked_file_open_on_another_node_lives_until_closed() {
    const T: &str = "an_unlinked_file_open_on_another_node_lives_until_closed";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    let (m1, m2) = (c.mnt(1), c.mnt(2));
    let len = 2 << 20;
    let free_before = statfs_free(&m1);
    std::fs::write(m1.join("u"), pattern(7, len)).unwrap();
    std::fs::File::open(m1.join("u")).unwrap().sync_all().unwrap();
    let held = std::fs::File::open(m2.join("u")).unwrap();
    let free_written = statfs_free(&m1);
    assert!(
        free_before - free_written >= (len / 4096) as u64,
        "the file's blocks are counted: {free_before} -> {free_written}"
    );

    std::fs::remove_file(m1.join("u")).unwrap();
    assert!(std::fs::symlink_metadata(m2.join("u")).is_err(), "node 2 no longer finds the name");
    let mut got = vec![0u8; len];
    held.read_exact_at(&mut got, 0).unwrap();
    assert!(got == pattern(7, len), "node 2 reads the unlinked file through its open descriptor");
    // Still allocated while open on node 2.
    let free_unlinked = statfs_free(&m1);
    assert!(
        free_unlinked + ((len / 4096) as u64) / 2 <= free_before,
        "node 1 freed the blocks of a file node 2 still has open: {free_written} -> {free_unlinked} (empty: {free_before})"
    );
    drop(held);
    // The kernel forgets the inode on node 2 soon after the close; then node 2's last
    // reference frees it. Wait for statfs on node 1 to count the blocks free again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let free = statfs_free(&m1);
        if free + 8 >= free_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 2 closed the unlinked file but its blocks are not free: {free} free, {free_before} before"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after unmount:\n{out}");
}
