//! File locks across the nodes of a cluster mount (docs/internals/file-locks.md):
//! flock(2) and fcntl(2) locks (POSIX and OFD) taken by real processes on different
//! nodes exclude each other, wait for each other, report each other through F_GETLK,
//! are interrupted by signals, and go away with their holder (close, kill -9, the death
//! of its node, after that node's journal is recovered). Two nodes incrementing one
//! counter under fcntl locks lose no update. A lock_nolock mount keeps the kernel's
//! local locks. The lock holders are `lock-helper` processes (tests/src/bin), one
//! command at a time over a pipe; every one is killed when its test ends, also on
//! failure. Needs root and /dev/fuse (skipped otherwise, failing under CI).

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use concord_tests::{can_mount, find_line, Cluster, Spec};

/// How long an answer that should come at once may take (a loaded 2-core machine
/// running debug builds).
const ANSWER: Duration = Duration::from_secs(30);

/// How long a lock that must stay waiting is watched.
const STAYS_WAITING: Duration = Duration::from_millis(700);

/// A `lock-helper` process: commands in, one answer line each out.
struct Helper {
    name: String,
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Helper {
    fn start(name: &str) -> Helper {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lock-helper"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lock-helper");
        let stdin = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        let mut h = Helper { name: name.to_string(), child, stdin, lines };
        assert_eq!(h.reply(ANSWER), "ready");
        h
    }

    /// Sends a command without waiting for its answer.
    fn send(&mut self, cmd: &str) {
        writeln!(self.stdin, "{cmd}").unwrap_or_else(|e| panic!("{}: sending {cmd:?}: {e}", self.name));
        self.stdin.flush().unwrap();
    }

    /// The next answer, within `within`.
    fn reply(&mut self, within: Duration) -> String {
        self.lines.recv_timeout(within).unwrap_or_else(|e| panic!("{}: no answer within {within:?}: {e}", self.name))
    }

    /// Whether no answer comes within `d` (a lock that waits).
    fn silent_for(&mut self, d: Duration) -> bool {
        match self.lines.recv_timeout(d) {
            Ok(l) => panic!("{}: answered {l:?} while it should wait", self.name),
            Err(_) => true,
        }
    }

    fn cmd(&mut self, cmd: &str) -> String {
        self.send(cmd);
        let r = self.reply(ANSWER);
        eprintln!("{}: {cmd} -> {r}", self.name);
        r
    }

    fn ok(&mut self, cmd: &str) {
        let r = self.cmd(cmd);
        assert_eq!(r, "ok", "{}: {cmd}", self.name);
    }

    fn err(&mut self, cmd: &str, errno: i32) {
        let r = self.cmd(cmd);
        assert_eq!(r, format!("err {errno}"), "{}: {cmd} (expected errno {errno})", self.name);
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// kill -9, and waits until the process is gone.
    fn kill(&mut self) {
        let _ = self.child.kill();
        let start = Instant::now();
        while start.elapsed() < ANSWER {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("{}: did not die within {ANSWER:?} of SIGKILL", self.name);
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // A helper stuck in the kernel dies once the cluster's mounts are stopped
        // (the Cluster is dropped after its helpers): wait a little, never forever.
        let _ = self.child.kill();
        let start = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `cmd` until it answers ok (a lock another process's close or death frees: the
/// kernel sends RELEASE after close(2) returned), within `within`.
fn ok_within(h: &mut Helper, cmd: &str, within: Duration) {
    let start = Instant::now();
    loop {
        let r = h.cmd(cmd);
        if r == "ok" {
            return;
        }
        assert!(start.elapsed() < within, "{}: {cmd} still {r} after {within:?}", h.name);
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn file(dir: &Path, name: &str, len: usize) -> String {
    std::fs::write(dir.join(name), vec![0u8; len]).unwrap();
    dir.join(name).to_str().unwrap().to_string()
}

/// flock(2) across two nodes: LOCK_EX excludes LOCK_SH and LOCK_EX (LOCK_NB:
/// EWOULDBLOCK), a downgrade lets a shared lock in, an upgrade waits for it, a
/// waiting flock is granted when the holder unlocks, and a lock goes with its file's
/// close and with its holder's kill -9.
#[test]
fn flock_across_nodes() {
    const T: &str = "flock_across_nodes";
    if !can_mount(T) {
        return;
    }
    let c = Cluster::up(T, Spec::nodes(2));
    let f1 = file(&c.mnt(1), "f", 0);
    let f2 = c.mnt(2).join("f").to_str().unwrap().to_string();
    let mut a = Helper::start("a@1");
    let mut b = Helper::start("b@2");
    a.ok(&format!("open 0 {f1}"));
    b.ok(&format!("open 0 {f2}"));

    a.ok("flock 0 ex nb");
    b.err("flock 0 sh nb", libc::EWOULDBLOCK);
    b.err("flock 0 ex nb", libc::EWOULDBLOCK);
    // Downgrade: a shared lock from the other node fits beside it.
    a.ok("flock 0 sh nb");
    b.ok("flock 0 sh nb");
    a.err("flock 0 ex nb", libc::EWOULDBLOCK);
    b.ok("flock 0 un");
    // Upgrade, alone.
    a.ok("flock 0 ex nb");
    b.err("flock 0 sh nb", libc::EWOULDBLOCK);

    // A waiting flock, granted when the holder unlocks.
    b.send("flock 0 ex");
    assert!(b.silent_for(STAYS_WAITING));
    a.ok("flock 0 un");
    assert_eq!(b.reply(ANSWER), "ok", "b's waiting flock after a's unlock");
    a.err("flock 0 sh nb", libc::EWOULDBLOCK);

    // Released when its file is closed.
    b.ok("close 0");
    ok_within(&mut a, "flock 0 ex nb", ANSWER);

    // Released when its holder is killed.
    b.ok(&format!("open 0 {f2}"));
    b.err("flock 0 ex nb", libc::EWOULDBLOCK);
    b.send("flock 0 ex");
    assert!(b.silent_for(STAYS_WAITING));
    a.kill();
    assert_eq!(b.reply(ANSWER), "ok", "b's waiting flock after a's kill -9");
}

/// fcntl(2) POSIX locks across three nodes: a conflict is EAGAIN, F_SETLKW waits
/// until the holder unlocks, and F_GETLK from a third node sees the holder's ranges
/// as they are split and merged, with pid 0 (another node's pid means nothing here),
/// while a process on the holder's node sees the holder's pid.
#[test]
fn fcntl_locks_across_nodes() {
    const T: &str = "fcntl_locks_across_nodes";
    if !can_mount(T) {
        return;
    }
    let c = Cluster::up(T, Spec::nodes(3));
    let f1 = file(&c.mnt(1), "f", 4096);
    let f = |n: u32| c.mnt(n).join("f").to_str().unwrap().to_string();
    let mut a = Helper::start("a@1");
    let mut a2 = Helper::start("a2@1");
    let mut b = Helper::start("b@2");
    let mut g = Helper::start("g@3");
    a.ok(&format!("open 0 {f1}"));
    a2.ok(&format!("open 0 {f1}"));
    b.ok(&format!("open 0 {}", f(2)));
    g.ok(&format!("open 0 {}", f(3)));

    a.ok("lk 0 setlk w 0 100");
    b.err("lk 0 setlk w 50 10", libc::EAGAIN);
    b.err("lk 0 setlk r 0 1", libc::EAGAIN);
    b.ok("lk 0 setlk w 100 10");
    assert_eq!(g.cmd("getlk 0 getlk r 0 1000"), "w 0 100 0", "node 3 sees a's lock, pid 0");
    assert_eq!(a2.cmd("getlk 0 getlk r 0 10"), format!("w 0 100 {}", a.pid()), "node 1 sees a's pid");
    assert_eq!(g.cmd("getlk 0 getlk r 200 10"), "unlck");

    // Split: unlock the middle.
    a.ok("lk 0 setlk u 40 20");
    assert_eq!(g.cmd("getlk 0 getlk w 0 1000"), "w 0 40 0");
    assert_eq!(g.cmd("getlk 0 getlk w 40 20"), "unlck");
    assert_eq!(g.cmd("getlk 0 getlk w 45 30"), "w 60 40 0");
    // A read lock in the hole: read fits beside it, write does not.
    a.ok("lk 0 setlk r 40 20");
    assert_eq!(g.cmd("getlk 0 getlk w 40 20"), "r 40 20 0");
    assert_eq!(g.cmd("getlk 0 getlk r 40 20"), "unlck");
    // Merge: a write lock over the read lock joins the three.
    a.ok("lk 0 setlk w 40 20");
    assert_eq!(g.cmd("getlk 0 getlk r 0 100"), "w 0 100 0");
    // To the end of the file (l_len 0).
    b.ok("lk 0 setlk w 500 0");
    assert_eq!(g.cmd("getlk 0 getlk r 1000000 1"), "w 500 0 0");
    b.ok("lk 0 setlk u 500 0");

    // F_SETLKW waits until the holder unlocks.
    b.send("lk 0 setlkw w 10 10");
    assert!(b.silent_for(STAYS_WAITING));
    a.ok("lk 0 setlk u 0 15");
    assert!(b.silent_for(STAYS_WAITING), "b waits while a still holds 15..19");
    a.ok("lk 0 setlk u 0 100");
    assert_eq!(b.reply(ANSWER), "ok", "b's F_SETLKW after a's unlock");
    a.err("lk 0 setlk r 12 1", libc::EAGAIN);
    // A close drops the process's POSIX locks on the file.
    b.ok("close 0");
    ok_within(&mut a, "lk 0 setlk w 0 200", ANSWER);
}

/// OFD locks belong to the open file: two open files of one process conflict, another
/// descriptor's close does not drop them (a POSIX lock would go), and the release of
/// their own file does.
#[test]
fn ofd_locks_across_nodes() {
    const T: &str = "ofd_locks_across_nodes";
    if !can_mount(T) {
        return;
    }
    let c = Cluster::up(T, Spec::nodes(2));
    let f1 = file(&c.mnt(1), "f", 4096);
    let f2 = c.mnt(2).join("f").to_str().unwrap().to_string();
    let mut a = Helper::start("a@1");
    let mut b = Helper::start("b@2");
    a.ok(&format!("open 0 {f1}"));
    a.ok(&format!("open 1 {f1}"));
    b.ok(&format!("open 0 {f2}"));

    a.ok("lk 0 ofd_setlk w 0 10");
    a.err("lk 1 ofd_setlk w 5 1", libc::EAGAIN);
    let seen = a.cmd("getlk 1 ofd_getlk r 0 100");
    assert!(seen.starts_with("w 0 10 "), "F_OFD_GETLK through the second file: {seen}");
    b.err("lk 0 ofd_setlk r 5 1", libc::EAGAIN);
    a.ok("lk 1 ofd_setlk w 20 10");

    // Another descriptor of the same process closed: the OFD locks stay.
    a.ok(&format!("open 2 {f1}"));
    a.ok("close 2");
    b.err("lk 0 ofd_setlk w 5 1", libc::EAGAIN);
    b.err("lk 0 ofd_setlk w 25 1", libc::EAGAIN);

    // A waiting OFD lock, granted when the holding file is released.
    b.send("lk 0 ofd_setlkw w 5 1");
    assert!(b.silent_for(STAYS_WAITING));
    a.ok("close 0");
    assert_eq!(b.reply(ANSWER), "ok", "b's F_OFD_SETLKW after a's file 0 was released");
    b.err("lk 0 ofd_setlk w 25 1", libc::EAGAIN);
    a.ok("close 1");
    ok_within(&mut b, "lk 0 ofd_setlk w 0 100", ANSWER);
}

/// A signal ends F_SETLKW and a blocking flock with EINTR and leaves no waiter behind:
/// when the holder unlocks, the lock is free for anyone (a leftover waiter would have
/// taken it). SIGKILL of a waiting process likewise.
#[test]
fn a_signal_interrupts_a_waiting_lock_and_leaves_nothing() {
    const T: &str = "a_signal_interrupts_a_waiting_lock_and_leaves_nothing";
    if !can_mount(T) {
        return;
    }
    let c = Cluster::up(T, Spec::nodes(2));
    let f1 = file(&c.mnt(1), "f", 4096);
    let f2 = c.mnt(2).join("f").to_str().unwrap().to_string();
    let mut a = Helper::start("a@1");
    let mut b = Helper::start("b@2");
    a.ok(&format!("open 0 {f1}"));
    b.ok(&format!("open 0 {f2}"));

    a.ok("lk 0 setlk w 0 10");
    a.ok("flock 0 ex nb");
    b.send("lk 0 setlkw w 0 10");
    assert!(b.silent_for(STAYS_WAITING));
    b.signal(libc::SIGUSR1);
    assert_eq!(b.reply(ANSWER), format!("err {}", libc::EINTR), "F_SETLKW interrupted");
    b.send("flock 0 ex");
    assert!(b.silent_for(STAYS_WAITING));
    b.signal(libc::SIGUSR1);
    assert_eq!(b.reply(ANSWER), format!("err {}", libc::EINTR), "flock interrupted");
    // Nothing of b's waits is left: a unlocks and takes the locks again at once.
    a.ok("lk 0 setlk u 0 10");
    a.ok("flock 0 un");
    a.ok("lk 0 setlk w 0 10");
    a.ok("flock 0 ex nb");

    // A waiting process killed: it dies (the wait is cancelled), and leaves nothing.
    let mut k = Helper::start("k@2");
    k.ok(&format!("open 0 {f2}"));
    k.send("lk 0 setlkw w 0 10");
    assert!(k.silent_for(STAYS_WAITING));
    k.kill();
    a.ok("lk 0 setlk u 0 10");
    a.ok("lk 0 setlk w 0 10");
    b.err("lk 0 setlk w 0 1", libc::EAGAIN);
}

/// Two owners on two nodes, each waiting for the other's range: the second wait is
/// refused with EDEADLK instead of hanging both.
#[test]
fn a_deadlock_across_nodes_is_edeadlk() {
    const T: &str = "a_deadlock_across_nodes_is_edeadlk";
    if !can_mount(T) {
        return;
    }
    let c = Cluster::up(T, Spec::nodes(2));
    let f1 = file(&c.mnt(1), "f", 4096);
    let f2 = c.mnt(2).join("f").to_str().unwrap().to_string();
    let mut a = Helper::start("a@1");
    let mut b = Helper::start("b@2");
    a.ok(&format!("open 0 {f1}"));
    b.ok(&format!("open 0 {f2}"));
    a.ok("lk 0 setlk w 0 10");
    b.ok("lk 0 setlk w 100 10");
    a.send("lk 0 setlkw w 100 10");
    assert!(a.silent_for(STAYS_WAITING));
    b.err("lk 0 setlkw w 0 10", libc::EDEADLK);
    b.ok("lk 0 setlk u 100 10");
    assert_eq!(a.reply(ANSWER), "ok", "a's wait after b gave up");
}

/// kill -9 of a process holding POSIX locks and a flock: its locks go with it, and a
/// process on another node waiting for them gets them.
#[test]
fn a_killed_holder_process_releases_its_locks() {
    const T: &str = "a_killed_holder_process_releases_its_locks";
    if !can_mount(T) {
        return;
    }
    let c = Cluster::up(T, Spec::nodes(2));
    let f1 = file(&c.mnt(1), "f", 4096);
    let f2 = c.mnt(2).join("f").to_str().unwrap().to_string();
    let mut a = Helper::start("a@1");
    let mut b = Helper::start("b@2");
    a.ok(&format!("open 0 {f1}"));
    b.ok(&format!("open 0 {f2}"));
    a.ok("lk 0 setlk w 0 10");
    a.ok("lk 0 ofd_setlk w 20 10");
    b.send("lk 0 setlkw w 0 10");
    assert!(b.silent_for(STAYS_WAITING));
    a.kill();
    assert_eq!(b.reply(ANSWER), "ok", "b's F_SETLKW after a's kill -9");
    ok_within(&mut b, "lk 0 ofd_setlk w 20 10", ANSWER);
}

/// The holder's node dies (lockd and mount killed): the lock waited for on another
/// node is granted, once the dead node's journal was recovered.
#[test]
fn a_dead_nodes_locks_pass_after_its_recovery() {
    const T: &str = "a_dead_nodes_locks_pass_after_its_recovery";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    let f1 = file(&c.mnt(1), "f", 4096);
    let f2 = c.mnt(2).join("f").to_str().unwrap().to_string();
    let mut a = Helper::start("a@1");
    let mut b = Helper::start("b@2");
    a.ok(&format!("open 0 {f1}"));
    b.ok(&format!("open 0 {f2}"));
    a.ok("lk 0 setlk w 0 10");
    b.send("lk 0 setlkw w 0 10");
    assert!(b.silent_for(STAYS_WAITING));
    c.crash(&[1]);
    assert_eq!(b.reply(Duration::from_secs(60)), "ok", "b's F_SETLKW after node 1 died");
    let recovered = [2, 3].iter().any(|n| find_line(&c.mount_log(*n), &["journal recovered"]).is_some());
    assert!(recovered, "the lock passed before node 1's journal was recovered:\n{}", c.logs());
    drop(a);
}

/// How many times each node increments the counter (CONCORD_LOCK_COUNT overrides).
fn rounds() -> u64 {
    std::env::var("CONCORD_LOCK_COUNT").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

/// Two nodes add one to one counter in a shared file, each `rounds()` times, every
/// time under an fcntl write lock: no update is lost.
fn counter(test: &str, how: &str) {
    if !can_mount(test) {
        return;
    }
    let mut spec = Spec::nodes(2);
    spec.deadline = Duration::from_secs(900);
    let c = Cluster::up(test, spec);
    let f1 = file(&c.mnt(1), "counter", 4096);
    let f2 = c.mnt(2).join("counter").to_str().unwrap().to_string();
    let mut a = Helper::start("a@1");
    let mut b = Helper::start("b@2");
    a.ok(&format!("open 0 {f1}"));
    b.ok(&format!("open 0 {f2}"));
    let n = rounds();
    let start = Instant::now();
    a.send(&format!("count 0 {n} {how}"));
    b.send(&format!("count 0 {n} {how}"));
    let limit = Duration::from_secs(800);
    assert_eq!(a.reply(limit), "ok");
    assert_eq!(b.reply(limit), "ok");
    eprintln!("{test}: 2 x {n} increments in {:?}", start.elapsed());
    let got = std::fs::read(c.mnt(1).join("counter")).unwrap();
    assert_eq!(u64::from_le_bytes(got[..8].try_into().unwrap()), 2 * n, "no lost update ({how})");
}

#[test]
fn a_counter_under_fcntl_locks_loses_no_update_pread_pwrite() {
    counter("a_counter_under_fcntl_locks_loses_no_update_pread_pwrite", "pread");
}

/// Through a shared mapping, with no msync: the unlock writes the locked range's
/// pages back before the lock goes (docs/internals/file-locks.md, "Data under a
/// lock"), so the next holder on the other node reads the last store.
#[test]
fn a_counter_under_fcntl_locks_loses_no_update_mmap() {
    counter("a_counter_under_fcntl_locks_loses_no_update_mmap", "mmap");
}

/// A lock_nolock mount offers no file locks to the filesystem: the kernel's own keep
/// working (flock between two processes on one mount excludes).
#[test]
fn a_lock_nolock_mount_keeps_local_locks() {
    const T: &str = "a_lock_nolock_mount_keeps_local_locks";
    if !can_mount(T) {
        return;
    }
    let c = Cluster::new(T, Spec::nodes(1));
    let mnt = c.mnt(1);
    let mut m = concord_tests::Foreground::start(
        Command::new(concord_tests::concord_bin())
            .args(["mount", "-o", "lockproto=lock_nolock"])
            .arg(&c.image)
            .arg(&mnt),
        &mnt,
        &c.dir().join("nolock.log"),
    );
    let f = file(&mnt, "f", 4096);
    let mut a = Helper::start("a");
    let mut b = Helper::start("b");
    a.ok(&format!("open 0 {f}"));
    b.ok(&format!("open 0 {f}"));
    a.ok("flock 0 ex nb");
    b.err("flock 0 ex nb", libc::EWOULDBLOCK);
    a.ok("lk 0 setlk w 0 10");
    b.err("lk 0 setlk w 5 1", libc::EAGAIN);
    assert_eq!(b.cmd("getlk 0 getlk w 0 10"), format!("w 0 10 {}", a.pid()));
    a.ok("flock 0 un");
    b.ok("flock 0 ex nb");
    drop((a, b));
    m.stop();
}
