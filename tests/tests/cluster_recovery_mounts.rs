//! Mounts and unmounts during a recovery (issue 16), as real processes: three `concord
//! lockd` and up to three `concord mount --config --node` processes on one image.
//!
//! A recovery is made to last by stopping the survivors' mount processes (SIGSTOP)
//! before the failure: their lockds go on (heartbeats, lease, lock recovery), so the
//! node is not declared dead, and lockd's recovery callbacks wait in the mount's
//! socket until SIGCONT. What lock_dlm's control work does is then up to the test, with
//! no hook in the product:
//!
//! * a node that mounts while the survivor's recovery is pending waits in
//!   control_mount and mounts only after the survivor replayed the dead node's
//!   journal (which may be the one it mounts on: it may get the dead node's slot);
//! * a survivor that is asked to unmount (SIGTERM) during the recovery leaves cleanly,
//!   and the other survivor finishes the recovery;
//! * a second failure during the recovery (the survivor replaying is killed as it
//!   starts) restarts it in the newer generation, and the last node standing recovers
//!   both journals;
//! * a node declared dead (lockd and mount killed, fenced) whose lockd starts again
//!   at once and mounts again rejoins as a new member in a newer generation and mounts
//!   only after its old journal was recovered by a survivor, which it does not replay.
//!
//! Every stopped survivor must carry on afterwards: its own lease watch must not take
//! the pause for a lost lease (its lockd renewed the lease all along). Every test ends
//! with fsck. Needs root and /dev/fuse (skipped otherwise, failing under CI).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use concord_tests::{
    can_mount, concord, find_line_since, lines_since, log_mark, text, wait_for_line_since, Cluster, Spec, Starting,
    READY_TIMEOUT,
};

/// Files each node fsyncs before it is killed.
const FILES: usize = 12;

/// control_mount retries (one every 500 ms) a waiting mounter must have made while the
/// recovery could not go on, before the test lets it go on: longer than the lease
/// (2.5 s), so that a stopped survivor's lease watch finds its last answer from lockd
/// out of date when it goes on.
const WAITS: usize = 6;

/// Stops a process with SIGSTOP; SIGCONT when resumed or dropped (a failing test
/// leaves no stopped process for the cluster's stop to wait on).
struct Paused {
    pid: i32,
    running: bool,
}

impl Paused {
    fn stop(pid: u32) -> Paused {
        signal(pid as i32, libc::SIGSTOP);
        Paused { pid: pid as i32, running: false }
    }

    fn resume(&mut self) {
        if !self.running {
            signal(self.pid, libc::SIGCONT);
            self.running = true;
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if !self.running {
            // SAFETY: kill(2) with SIGCONT on the process this test stopped.
            unsafe { libc::kill(self.pid, libc::SIGCONT) };
        }
    }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a process this test's cluster started and has not reaped.
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

/// Stops node `id`'s mount process.
fn pause_mount(c: &Cluster, id: u32) -> Paused {
    Paused::stop(c.mount_pid(id).unwrap_or_else(|| panic!("node {id} is not mounted")))
}

/// Each of `nodes` makes its own directory `own{node}` (on its own mount, so it holds
/// the directory's glock EX).
fn make_dirs(c: &Cluster, nodes: &[u32]) {
    for &n in nodes {
        std::fs::create_dir(c.mnt(n).join(format!("own{n}"))).unwrap();
    }
}

/// Node `node` writes [`FILES`] files in its own directory (see [`make_dirs`]), each
/// fsync'd, then fsyncs the directory: all of it is durable, and in the node's journal
/// as long as no other node takes a glock it holds (a demote checkpoints the node's
/// whole journal): so every node makes its directory before any writes its files.
/// Returns (path below the mount point, content).
fn write_synced(c: &Cluster, node: u32) -> Vec<(String, Vec<u8>)> {
    let mnt = c.mnt(node);
    let dir = format!("own{node}");
    let mut files = Vec::new();
    for k in 0..FILES {
        let path = format!("{dir}/f{k}");
        let data: Vec<u8> = format!("node {node} file {k}\n").repeat(50 + 97 * k).into_bytes();
        let mut f = std::fs::File::create(mnt.join(&path)).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        files.push((path, data));
    }
    std::fs::File::open(mnt.join(&dir)).and_then(|d| d.sync_all()).unwrap();
    files
}

/// Every file of `files` has its content on node `on`'s mount.
fn check_files(c: &Cluster, on: u32, files: &[(String, Vec<u8>)], whose: u32) {
    for (p, data) in files {
        let got = std::fs::read(c.mnt(on).join(p))
            .unwrap_or_else(|e| panic!("node {on}: {p}, fsync'd by node {whose}, cannot be read: {e}"));
        assert!(
            got == *data,
            "node {on}: {p}, fsync'd by node {whose}, has {} bytes, not the {} written",
            got.len(),
            data.len()
        );
    }
}

/// Node `id`'s jid and lockspace generation, from `concord status --json`; its state
/// must be "up" (a stopped survivor's lease watch must not have stopped it).
fn jid_and_generation(c: &Cluster, id: u32) -> (u64, u64) {
    let v = c.status(id);
    assert_eq!(v["state"], "up", "node {id}: {v}\n{}", c.logs());
    (v["jid"].as_u64().expect("jid"), v["generation"].as_u64().expect("generation"))
}

/// Waits until node `id`'s lockd has the lockspace with exactly `members`: the lock
/// recovery of a departure (or a join) is done there.
fn wait_members(c: &Cluster, id: u32, members: &[u32]) {
    let start = Instant::now();
    loop {
        let v = c.dlm_status(id);
        let ls = v["lockspaces"].as_array().and_then(|a| a.iter().find(|l| l["name"] == "fs1")).cloned();
        if ls.as_ref().is_some_and(|l| l["members"] == serde_json::json!(members)) {
            return;
        }
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "node {id}'s lockd does not have lockspace members {members:?}: {ls:?}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until node `id`'s mount, started by [`Cluster::mount_start`] while the
/// recovery cannot go on, has logged [`WAITS`] control_mount waits ("control_mount
/// wait for journal recovery", "wait1", ...); it must neither print its ready line
/// nor log that it mounted meanwhile.
fn wait_in_control_mount(c: &Cluster, id: u32, starting: &mut Starting, why: &str) {
    let log = c.mount_log(id);
    let start = Instant::now();
    loop {
        let mounted = starting.printed() || !lines_with(&log, 0, &["mounted", "first="]).is_empty();
        assert!(!mounted, "node {id} mounted {why}\n{}", c.logs());
        let count = lines_with(&log, 0, &["control_mount wait"]).len();
        if count >= WAITS {
            return;
        }
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "node {id} logged {count} control_mount waits, not {WAITS}, in {READY_TIMEOUT:?}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// G of a lock_dlm line "recover generation G ...".
fn recover_generation(line: &str) -> Option<u64> {
    line.split("recover generation ").nth(1)?.split(' ').next()?.parse().ok()
}

/// The lines after `since` in `log` with every one of `needles`.
fn lines_with(log: &Path, since: u64, needles: &[&str]) -> Vec<String> {
    lines_since(log, since).into_iter().filter(|l| needles.iter().all(|x| l.contains(x))).collect()
}

/// Waits until node `id`'s log (after `since`) says a recovery generation `at_least`
/// or later is done; returns that generation.
fn wait_done(c: &Cluster, id: u32, since: u64, at_least: u64) -> u64 {
    let log = c.mount_log(id);
    let start = Instant::now();
    loop {
        let done = lines_with(&log, since, &["recover generation ", " done"])
            .iter()
            .filter_map(|l| recover_generation(l))
            .filter(|g| *g >= at_least)
            .max();
        if let Some(g) = done {
            return g;
        }
        assert!(
            start.elapsed() < READY_TIMEOUT,
            "node {id} does not say recover generation {at_least} (or later) done\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The recoveries of journal `jid` in the logs after their marks: (log, line). A
/// survivor that saw a jid fail in a generation older than the one another survivor
/// recovered it in sets its bit again and recovers it once more, finding it clean
/// (`replayed=false`): [`dirty_replays`] counts only the real ones.
fn replays(marks: &[(PathBuf, u64)], jid: u64) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for (log, since) in marks {
        for l in lines_with(log, *since, &["journal recovered", &format!("jid={jid} ")]) {
            out.push((log.clone(), l));
        }
    }
    out
}

/// The replays of journal `jid` that found it dirty, in the logs after their marks.
fn dirty_replays(marks: &[(PathBuf, u64)], jid: u64) -> Vec<(PathBuf, String)> {
    replays(marks, jid).into_iter().filter(|(_, l)| l.contains("replayed=true")).collect()
}

/// Journal `jid`'s state as `concord jinfo` shows it ("clean" or "dirty").
fn journal_state(c: &Cluster, jid: u64) -> String {
    let o = concord(&["jinfo", c.image.to_str().unwrap()]);
    assert!(o.status.success(), "jinfo: {}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let line = out.lines().find(|l| l.starts_with(&format!("journal{jid}:"))).unwrap_or_else(|| panic!("{out}"));
    if line.contains(", clean,") {
        "clean".into()
    } else if line.contains(", dirty,") {
        "dirty".into()
    } else {
        panic!("journal state in {line:?}")
    }
}

/// Unmounts every node, then fsck -n must be clean and every journal clean.
fn finish(c: &mut Cluster) {
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after every node unmounted:\n{out}");
    for jid in 0..u64::from(c.spec.journals) {
        assert_eq!(journal_state(c, jid), "clean", "journal {jid} after every node unmounted");
    }
}

/// Nodes 1 and 2 are mounted; node 1's mount is stopped, node 2's is killed after it
/// fsync'd its files. Node 3 mounts meanwhile and must wait in control_mount (its log
/// says so, again and again) without mounting, since no mounted node has recovered
/// node 2's journal yet. Node 1 goes on: it replays node 2's journal, node 3 mounts
/// after it without replaying anything and reads what node 2 fsync'd; node 1 is still
/// up (its lease watch did not take the pause for a lost lease).
#[test]
fn a_node_that_mounts_during_a_recovery_waits_for_it() {
    const T: &str = "a_node_that_mounts_during_a_recovery_waits_for_it";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::new(T, Spec::nodes(3));
    c.start_lockds();
    c.mount(&[1, 2]);
    let (jid2, gen_before) = jid_and_generation(&c, 2);
    make_dirs(&c, &[2]);
    let files = write_synced(&c, 2);
    let log1 = c.mount_log(1);
    let mark1 = log_mark(&log1);
    let mut node1 = pause_mount(&c, 1);
    c.kill_mount(2);
    wait_members(&c, 1, &[1]);
    let mut starting = c.mount_start(3);
    let log3 = c.mount_log(3);
    wait_in_control_mount(&c, 3, &mut starting, "while node 2's journal was not recovered");
    node1.resume();
    c.mount_finish(starting);
    let marks = [(log1.clone(), mark1)];
    let (_, line) = wait_for_line_since(&marks, &["recover generation ", &format!(" jid {jid2}")], READY_TIMEOUT);
    let generation = recover_generation(&line).expect("generation");
    assert!(generation > gen_before, "recovery generation {generation} after {gen_before}");
    let replayed = dirty_replays(&marks, jid2);
    assert_eq!(replayed.len(), 1, "node 1 replays node 2's dirty journal once: {replayed:?}\n{}", c.logs());
    // Node 3 gets node 2's slot (its journal, now clean) if lockd's lock recovery of
    // node 2's departure was complete when node 3 joined, else the next one.
    let (jid3, gen3) = jid_and_generation(&c, 3);
    eprintln!("node 3 mounted on jid {jid3} (node 2 had {jid2})");
    assert!(gen3 > gen_before, "node 3 joined in generation {gen3}, after {gen_before}");
    assert!(find_line_since(&log3, 0, &["mounted", "first=false"]).is_some(), "node 3 is no first mounter");
    assert!(
        find_line_since(&log3, 0, &["journals replayed at mount"]).is_none(),
        "node 3 replayed its journal itself: it was not recovered before it mounted\n{}",
        c.logs()
    );
    wait_done(&c, 1, mark1, generation);
    jid_and_generation(&c, 1);
    check_files(&c, 3, &files, 2);
    check_files(&c, 1, &files, 2);
    std::fs::write(c.mnt(3).join("own2/from-3"), b"node 3 writes in node 2's directory").unwrap();
    assert_eq!(std::fs::read(c.mnt(1).join("own2/from-3")).unwrap(), b"node 3 writes in node 2's directory");
    assert!(c.fenced().is_empty(), "a node was fenced: {:?}", c.fenced());
    finish(&mut c);
}

/// All three nodes are mounted; node 3 fsyncs its files; the mounts of nodes 1 and 2
/// are stopped and node 3's is killed. Node 2 gets SIGTERM while stopped and goes on:
/// it finds the recovery callbacks and the unmount at once, and unmounts cleanly
/// (exit 0, its journal clean), whether or not it replayed node 3's journal first.
/// Then node 1 goes on and finishes the recovery (of node 3's journal, and of node 2's
/// clean leave) alone: node 3's journal is recovered once, node 1 reads what node 3
/// fsync'd and is still up.
#[test]
fn a_node_that_unmounts_during_a_recovery_leaves_cleanly() {
    const T: &str = "a_node_that_unmounts_during_a_recovery_leaves_cleanly";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    let (jid2, _) = jid_and_generation(&c, 2);
    let (jid3, gen_before) = jid_and_generation(&c, 3);
    make_dirs(&c, &[3]);
    let files = write_synced(&c, 3);
    let marks: Vec<(PathBuf, u64)> = [1, 2].iter().map(|&n| (c.mount_log(n), log_mark(&c.mount_log(n)))).collect();
    let mut node1 = pause_mount(&c, 1);
    let pid2 = c.mount_pid(2).expect("node 2 mounted");
    let mut node2 = pause_mount(&c, 2);
    c.kill_mount(3);
    wait_members(&c, 1, &[1, 2]);
    signal(pid2 as i32, libc::SIGTERM);
    node2.resume();
    c.unmount(2);
    let log2 = c.mount_log(2);
    let took_part = find_line_since(&log2, marks[1].1, &["recover generation ", &format!(" jid {jid3}")]);
    eprintln!("node 2 before it left: {took_part:?}; {:?}", replays(&marks[1..], jid3));
    assert_eq!(journal_state(&c, jid2), "clean", "node 2's journal after its unmount");
    wait_members(&c, 1, &[1]);
    node1.resume();
    let g = wait_done(&c, 1, marks[0].1, gen_before + 1);
    // Node 2 may have replayed node 3's journal before it left; then node 1 finds it
    // clean. It was dirty, and replayed once.
    let replayed = dirty_replays(&marks, jid3);
    assert_eq!(replayed.len(), 1, "node 3's dirty journal is replayed once: {replayed:?}\n{}", c.logs());
    assert_eq!(journal_state(&c, jid3), "clean", "node 3's journal after recovery generation {g}");
    let (_, gen1) = jid_and_generation(&c, 1);
    assert!(gen1 > gen_before, "node 1's generation {gen1} after node 3 died and node 2 left");
    check_files(&c, 1, &files, 3);
    std::fs::write(c.mnt(1).join("own3/from-1"), b"node 1 writes in node 3's directory").unwrap();
    c.mount(&[2, 3]);
    check_files(&c, 2, &files, 3);
    assert_eq!(std::fs::read(c.mnt(3).join("own3/from-1")).unwrap(), b"node 1 writes in node 3's directory");
    assert!(c.fenced().is_empty(), "a node was fenced: {:?}", c.fenced());
    finish(&mut c);
}

/// Waits (polling often) until `log` has a line with every one of `needles` after
/// `since`: for a kill that must land as soon as something starts.
fn wait_line_fast(c: &Cluster, log: &Path, since: u64, needles: &[&str]) -> String {
    let start = Instant::now();
    loop {
        if let Some(l) = find_line_since(log, since, needles) {
            return l;
        }
        assert!(start.elapsed() < READY_TIMEOUT, "{} has no line with {needles:?}\n{}", log.display(), c.logs());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// All three nodes are mounted; nodes 2 and 3 fsync their files; node 1's mount is
/// stopped and node 3's is killed. Node 2 alone starts the recovery of node 3's
/// journal and is killed the moment it asks for it ("recover generation G jid J"; its
/// replay may be done or not). Node 1, the last node standing, goes on: it recovers
/// both journals in a generation newer than G, replays node 2's (and node 3's unless
/// node 2 finished it), and reads what both fsync'd. Issue 16's "the last node
/// standing recovers everyone" is this test too.
#[test]
fn a_second_failure_during_a_recovery_restarts_it_in_the_new_generation() {
    const T: &str = "a_second_failure_during_a_recovery_restarts_it_in_the_new_generation";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    let (jid2, gen_before) = jid_and_generation(&c, 2);
    let (jid3, _) = jid_and_generation(&c, 3);
    make_dirs(&c, &[2, 3]);
    let files2 = write_synced(&c, 2);
    let files3 = write_synced(&c, 3);
    let marks: Vec<(PathBuf, u64)> = [1, 2].iter().map(|&n| (c.mount_log(n), log_mark(&c.mount_log(n)))).collect();
    let mut node1 = pause_mount(&c, 1);
    c.kill_mount(3);
    let log2 = c.mount_log(2);
    let line = wait_line_fast(&c, &log2, marks[1].1, &["recover generation ", &format!(" jid {jid3}")]);
    c.kill_mount(2);
    let first = recover_generation(&line).expect("generation");
    assert!(first > gen_before, "node 2's recovery generation {first} after {gen_before}");
    let by2 = replays(&marks[1..], jid3);
    eprintln!("node 2 was killed after {line:?}; its replay of journal {jid3}: {by2:?}");
    wait_members(&c, 1, &[1]);
    node1.resume();
    let node1_marks = &marks[..1];
    let mut generation = 0;
    for jid in [jid2, jid3] {
        let (_, l) = wait_for_line_since(node1_marks, &["recover generation ", &format!(" jid {jid}")], READY_TIMEOUT);
        let g = recover_generation(&l).expect("generation");
        assert!(g > first, "node 1 recovers journal {jid} in generation {g}, newer than node 2's {first}");
        generation = generation.max(g);
        wait_for_line_since(node1_marks, &["journal recovered", &format!("jid={jid} ")], READY_TIMEOUT);
    }
    wait_done(&c, 1, marks[0].1, generation);
    let done_before = lines_with(&marks[0].0, marks[0].1, &["recover generation ", " done"])
        .iter()
        .filter_map(|l| recover_generation(l))
        .filter(|g| *g < generation)
        .collect::<Vec<_>>();
    assert!(done_before.is_empty(), "node 1 unblocked in generations {done_before:?} before both were recovered");
    let replayed2 = dirty_replays(&marks, jid2);
    assert!(
        replayed2.len() == 1 && replayed2[0].0 == marks[0].0,
        "node 1 replays node 2's dirty journal once: {replayed2:?}"
    );
    let dirty3 = dirty_replays(&marks, jid3);
    assert!(dirty3.len() <= 1, "node 3's journal replayed (dirty) twice: {dirty3:?}");
    for jid in [jid2, jid3] {
        assert_eq!(journal_state(&c, jid), "clean", "journal {jid} after node 1 recovered it");
    }
    let (_, gen1) = jid_and_generation(&c, 1);
    assert!(gen1 >= generation, "node 1's generation {gen1}");
    check_files(&c, 1, &files2, 2);
    check_files(&c, 1, &files3, 3);
    for n in [2, 3] {
        std::fs::write(c.mnt(1).join(format!("own{n}/from-1")), b"node 1 after the second failure").unwrap();
    }
    c.mount(&[2, 3]);
    check_files(&c, 3, &files2, 2);
    check_files(&c, 2, &files3, 3);
    assert_eq!(std::fs::read(c.mnt(2).join("own3/from-1")).unwrap(), b"node 1 after the second failure");
    assert!(c.fenced().is_empty(), "a node was fenced: {:?}", c.fenced());
    finish(&mut c);
}

/// All three nodes are mounted; node 3 fsyncs its files; the mounts of nodes 1 and 2
/// are stopped, and node 3's lockd and mount are killed. The survivors' lockds declare
/// it dead, fence it and recover its locks; its lockd starts again at once, as a new
/// incarnation, and it mounts again: as a new member, in a newer generation, waiting
/// in control_mount while its old journal is not recovered (the survivors' mounts are
/// stopped). Once they go on, one of them replays that journal and only then does node
/// 3 mount, replaying nothing itself, and reading what it had fsync'd.
#[test]
fn a_node_declared_dead_rejoins_as_a_new_member_after_its_journal_is_recovered() {
    const T: &str = "a_node_declared_dead_rejoins_as_a_new_member_after_its_journal_is_recovered";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    let (jid3, gen_before) = jid_and_generation(&c, 3);
    make_dirs(&c, &[3]);
    let files = write_synced(&c, 3);
    let marks: Vec<(PathBuf, u64)> = [1, 2].iter().map(|&n| (c.mount_log(n), log_mark(&c.mount_log(n)))).collect();
    let mut paused = [pause_mount(&c, 1), pause_mount(&c, 2)];
    c.crash(&[3]);
    wait_members(&c, 1, &[1, 2]);
    c.restart_lockds();
    assert_eq!(c.fenced(), vec![3], "node 3 was fenced before its lockd came back");
    let mut starting = c.mount_start(3);
    let log3 = c.mount_log(3);
    wait_in_control_mount(&c, 3, &mut starting, "again before its old journal was recovered");
    assert!(replays(&marks, jid3).is_empty(), "a stopped survivor replayed");
    for p in &mut paused {
        p.resume();
    }
    c.mount_finish(starting);
    let (_, line) = wait_for_line_since(&marks, &["recover generation ", &format!(" jid {jid3}")], READY_TIMEOUT);
    let generation = recover_generation(&line).expect("generation");
    let replayed = dirty_replays(&marks, jid3);
    assert_eq!(replayed.len(), 1, "one survivor replays node 3's dirty journal once: {replayed:?}\n{}", c.logs());
    assert!(
        find_line_since(&log3, 0, &["journals replayed at mount"]).is_none(),
        "node 3 replayed a journal at mount: its old one was not recovered before\n{}",
        c.logs()
    );
    let (jid, gen3) = jid_and_generation(&c, 3);
    assert!(gen3 > gen_before && gen3 >= generation, "node 3 rejoined in generation {gen3}, recovery in {generation}");
    eprintln!("node 3 back on jid {jid} (was {jid3}) in generation {gen3}; recovered in {generation}");
    for n in [1, 2] {
        wait_done(&c, n, marks[n as usize - 1].1, generation);
        jid_and_generation(&c, n);
    }
    check_files(&c, 3, &files, 3);
    check_files(&c, 1, &files, 3);
    std::fs::write(c.mnt(3).join("own3/back"), b"node 3 is back").unwrap();
    assert_eq!(std::fs::read(c.mnt(2).join("own3/back")).unwrap(), b"node 3 is back");
    assert_eq!(c.fenced(), vec![3], "nobody else was fenced");
    finish(&mut c);
}
