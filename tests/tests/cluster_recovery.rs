//! Node failures as real processes: three `concord lockd` and three `concord mount
//! --config --node` processes share one image while every node writes (fsync'd and
//! not) in a directory of its own and in a shared one; then processes are killed with
//! SIGKILL. What a killed node's fsync returned for is there afterwards, with its exact
//! content, on every survivor and on the node when it mounts again; the survivors go on
//! writing, also in the directory the dead node held; fsck is clean at the end.
//!
//! * a killed mount process alone: its lockd stays, leaves the lockspace for it, and
//!   the survivors recover its jid without fencing the node;
//! * a killed node (lockd and mount): the survivors' lockds declare it dead once its
//!   lease has run out, run the fence command, recover its locks, and the survivors
//!   replay its journal; it comes back in a newer lockspace generation;
//! * every node killed: the first node to mount again replays all three journals;
//! * two nodes killed at once (five lockds, three mounts): the last mount standing
//!   replays both journals;
//! * kill cycles (`CONCORD_KILL_CYCLES`, default 2; a seeded RNG picks the victims,
//!   `CONCORD_KILL_SEED` replays them): a mount alone, then a whole node, again and
//!   again, the dead node back each time, nothing fsync'd lost.
//!
//! The recovery is waited for through the mounts' log lines (lock_dlm's, the seed's
//! "recover generation G jid J" and "recover generation G done"). Needs root and
//! /dev/fuse (skipped otherwise, failing under CI).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use concord_tests::{
    can_mount, concord, find_line, find_line_since, lines_since, log_mark, text, wait_for_line_since, Cluster, Spec,
    READY_TIMEOUT, TEST_DEADLINE,
};
use rand::{Rng, SeedableRng};

/// Rounds every writer must have finished before the kill.
const ROUNDS_BEFORE_KILL: usize = 8;

/// What a path must hold once its change is durable.
#[derive(Clone, Debug, PartialEq)]
enum Want {
    Data(Vec<u8>),
    Gone,
}

/// What one node's writer has made durable (an fsync of the file and of its
/// directories returned after the change), by path below the mount point; and the
/// paths the round in progress changes, which may be found in either state (or torn).
#[derive(Default, Debug)]
struct Durable {
    files: BTreeMap<String, Want>,
    in_flight: BTreeSet<String>,
    rounds: usize,
    /// Rounds of in-place overwrites done.
    overwrites: usize,
    /// The writer saw [`PAUSE`] and waits between rounds.
    paused: bool,
    /// Every content each path was given, for a failure's message.
    history: BTreeMap<String, Vec<Vec<u8>>>,
}

/// Writer modes: creates, renames and unlinks in the node's own and the shared
/// directory; a pause between rounds; in-place overwrites of the node's own files.
const FULL: u8 = 0;
const PAUSE: u8 = 1;
const OVERWRITE: u8 = 2;

/// A thread writing on one node's mount until stopped or until a system call fails.
struct Writer {
    node: u32,
    durable: Arc<Mutex<Durable>>,
    stop: Arc<AtomicBool>,
    mode: Arc<AtomicU8>,
    /// In [`FULL`] mode the writer pauses once it has done this many rounds.
    limit: Arc<AtomicUsize>,
    handle: Option<JoinHandle<Result<(), String>>>,
}

/// The bytes of one write: lines naming the node, the round, the kind of write and
/// the offset, so that bytes found in the wrong place tell where they came from.
fn content(node: u32, round: usize, tag: u8) -> Vec<u8> {
    let len = 700 + (round * 997 + node as usize * 313 + tag as usize * 59) % 7000;
    let mut v = Vec::with_capacity(len + 64);
    while v.len() < len {
        v.extend_from_slice(format!("node {node} round {round} tag {tag} offset {:05}\n", v.len()).as_bytes());
    }
    v.truncate(len);
    v
}

fn write_file(p: &Path, data: &[u8], sync: bool) -> Result<(), String> {
    let mut f = std::fs::File::create(p).map_err(|e| format!("create {}: {e}", p.display()))?;
    f.write_all(data).map_err(|e| format!("write {}: {e}", p.display()))?;
    if sync {
        f.sync_all().map_err(|e| format!("fsync {}: {e}", p.display()))?;
    }
    Ok(())
}

fn sync_dir(p: &Path) -> Result<(), String> {
    std::fs::File::open(p).and_then(|d| d.sync_all()).map_err(|e| format!("fsync dir {}: {e}", p.display()))
}

/// One round `k` of node `node`'s workload on `mnt`: a file fsync'd in its own
/// directory and one in the shared directory; every third round a rename of the
/// previous round's own file, every fourth an unlink of a shared file of two rounds
/// ago; files and an append left unsynced; then both directories fsync'd, after which
/// the round's changes are recorded as durable.
fn round(node: u32, mnt: &Path, k: usize, durable: &Mutex<Durable>) -> Result<(), String> {
    let own = format!("own{node}");
    let mut changes = vec![
        (format!("{own}/s{k}"), Want::Data(content(node, k, 0))),
        (format!("shared/n{node}-s{k}"), Want::Data(content(node, k, 1))),
    ];
    let data_of = |p: &str| match durable.lock().unwrap().files.get(p) {
        Some(Want::Data(v)) => Some(v.clone()),
        _ => None,
    };
    // The file keeps what it holds now (an overwrite round may have rewritten it).
    let rename = (k % 3 == 2)
        .then(|| (format!("{own}/s{}", k - 1), format!("{own}/r{}", k - 1)))
        .and_then(|(from, to)| data_of(&from).map(|d| (from, to, d)));
    let unlink = (k % 4 == 3).then(|| format!("shared/n{node}-s{}", k - 2)).filter(|u| data_of(u).is_some());
    let writes = changes.clone();
    if let Some((from, to, data)) = &rename {
        changes.push((from.clone(), Want::Gone));
        changes.push((to.clone(), Want::Data(data.clone())));
    }
    if let Some(u) = &unlink {
        changes.push((u.clone(), Want::Gone));
    }
    durable.lock().unwrap().in_flight = changes.iter().map(|(p, _)| p.clone()).collect();
    for (p, w) in &writes {
        let Want::Data(d) = w else { unreachable!() };
        write_file(&mnt.join(p), d, true)?;
    }
    if let Some((from, to, _)) = &rename {
        std::fs::rename(mnt.join(from), mnt.join(to)).map_err(|e| format!("rename {from} {to}: {e}"))?;
    }
    if let Some(u) = &unlink {
        std::fs::remove_file(mnt.join(u)).map_err(|e| format!("unlink {u}: {e}"))?;
    }
    // Unsynced: whatever of it the next fsync does not carry may be lost.
    write_file(&mnt.join(format!("{own}/u{k}")), &content(node, k, 2), false)?;
    write_file(&mnt.join(format!("shared/n{node}-u{k}")), &content(node, k, 3), false)?;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(mnt.join(format!("{own}/log")))
        .and_then(|mut f| f.write_all(format!("round {k}\n").as_bytes()))
        .map_err(|e| format!("append {own}/log: {e}"))?;
    sync_dir(&mnt.join(&own))?;
    sync_dir(&mnt.join("shared"))?;
    let mut d = durable.lock().unwrap();
    for (p, w) in changes {
        if let Want::Data(v) = &w {
            d.history.entry(p.clone()).or_default().push(v.clone());
        }
        d.files.insert(p, w);
    }
    d.in_flight.clear();
    d.rounds += 1;
    Ok(())
}

/// One round `j` of in-place overwrites in node `node`'s own directory: one of its
/// durable files rewritten with new bytes of the same length and fsync'd, its unsynced
/// `u0` rewritten without fsync. Nothing is allocated, renamed or unlinked, and no
/// other node touches these files: the round needs no glock another node holds.
fn overwrite_round(node: u32, mnt: &Path, j: usize, durable: &Mutex<Durable>) -> Result<(), String> {
    let own = format!("own{node}");
    let (path, len) = {
        let d = durable.lock().unwrap();
        let own_files: Vec<(&String, usize)> = d
            .files
            .iter()
            .filter_map(|(p, w)| match w {
                Want::Data(v) if p.starts_with(&format!("{own}/")) => Some((p, v.len())),
                _ => None,
            })
            .collect();
        let (p, len) = own_files[j % own_files.len()];
        (p.clone(), len)
    };
    let data: Vec<u8> = content(node, 1000 + j, 4).into_iter().cycle().take(len).collect();
    durable.lock().unwrap().in_flight = BTreeSet::from([path.clone()]);
    let f = std::fs::OpenOptions::new().write(true).open(mnt.join(&path)).map_err(|e| format!("open {path}: {e}"))?;
    f.write_all_at(&data, 0).map_err(|e| format!("overwrite {path}: {e}"))?;
    f.sync_all().map_err(|e| format!("fsync {path}: {e}"))?;
    let u0 = mnt.join(format!("{own}/u0"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&u0)
        .and_then(|f| f.write_all_at(&content(node, 2000 + j, 5)[..100], 0))
        .map_err(|e| format!("overwrite {own}/u0: {e}"))?;
    let mut d = durable.lock().unwrap();
    d.history.entry(path.clone()).or_default().push(data.clone());
    d.files.insert(path, Want::Data(data));
    d.in_flight.clear();
    d.overwrites += 1;
    Ok(())
}

impl Writer {
    /// Starts node `node`'s writer on `mnt` (its own directory and "shared" exist).
    fn start(node: u32, mnt: PathBuf) -> Writer {
        Writer::resume(node, mnt, Arc::default(), 0)
    }

    /// Starts a writer for node `node` on `mnt` that goes on with the record `durable`
    /// of an earlier writer of the node (killed with its mount, its in-flight paths
    /// settled: [`settle_in_flight`]), its rounds numbered from `first_round`, so that
    /// it makes new names and never rewrites one the earlier writer left in flight.
    fn resume(node: u32, mnt: PathBuf, durable: Arc<Mutex<Durable>>, first_round: usize) -> Writer {
        let limit = durable.lock().unwrap().rounds + ROUNDS_BEFORE_KILL;
        let stop = Arc::new(AtomicBool::new(false));
        let mode = Arc::new(AtomicU8::new(FULL));
        let limit = Arc::new(AtomicUsize::new(limit));
        let (d, s, m, l) = (durable.clone(), stop.clone(), mode.clone(), limit.clone());
        let handle = std::thread::Builder::new()
            .name(format!("writer-{node}"))
            .spawn(move || {
                let (mut k, mut j) = (first_round, 0);
                while !s.load(Ordering::SeqCst) {
                    let mode = m.load(Ordering::SeqCst);
                    let enough = {
                        let mut d = d.lock().unwrap();
                        let enough = mode == FULL && d.rounds >= l.load(Ordering::SeqCst);
                        d.paused = mode == PAUSE || enough;
                        enough
                    };
                    match mode {
                        FULL if !enough => {
                            round(node, &mnt, k, &d)?;
                            k += 1;
                        }
                        OVERWRITE => {
                            overwrite_round(node, &mnt, j, &d)?;
                            j += 1;
                        }
                        _ => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                Ok(())
            })
            .unwrap();
        Writer { node, durable, stop, mode, limit, handle: Some(handle) }
    }

    fn rounds(&self) -> usize {
        self.durable.lock().unwrap().rounds
    }

    /// Fails the test if the writer stopped on an error.
    fn check_running(&mut self) {
        if self.handle.as_ref().is_some_and(|h| h.is_finished()) {
            let r = self.handle.take().unwrap().join().expect("writer thread panicked");
            panic!("node {}'s writer stopped: {r:?}", self.node);
        }
    }

    /// Stops a writer on a live node: its last round must have gone through.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let r = self.handle.take().expect("writer running").join().expect("writer thread panicked");
        assert_eq!(r, Ok(()), "node {}'s writer failed", self.node);
        assert!(self.durable.lock().unwrap().in_flight.is_empty());
    }

    /// The writer of a killed node: its next system call failed.
    fn join_killed(&mut self) -> String {
        let r = self.handle.take().expect("writer running").join().expect("writer thread panicked");
        match r {
            Err(e) => e,
            Ok(()) => panic!("node {}'s writer ended without an error on a killed mount", self.node),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // A failing test: the writer stops at its next round; waited for a while, so
        // that it has no file open on the mount when the cluster's drop unmounts.
        self.stop.store(true, Ordering::SeqCst);
        let start = Instant::now();
        while self.handle.as_ref().is_some_and(|h| !h.is_finished()) && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Makes "shared" and every mounted node's own directory (on its own node, which so
/// holds it EX), and starts a writer on each mounted node.
fn start_writers(c: &Cluster) -> Vec<Writer> {
    std::fs::create_dir(c.mnt(1).join("shared")).unwrap();
    c.mounted_nodes()
        .into_iter()
        .map(|n| {
            std::fs::create_dir(c.mnt(n).join(format!("own{n}"))).unwrap();
            Writer::start(n, c.mnt(n))
        })
        .collect()
}

/// Waits until `done` holds for every running writer (and none failed).
fn wait_writers(writers: &mut [Writer], what: &str, done: impl Fn(&Durable) -> bool) {
    let start = Instant::now();
    while writers.iter().any(|w| w.handle.is_some() && !done(&w.durable.lock().unwrap())) {
        for w in writers.iter_mut() {
            w.check_running();
        }
        let rounds: Vec<usize> = writers.iter().map(Writer::rounds).collect();
        assert!(start.elapsed() < READY_TIMEOUT, "the writers did not get to {what} in {READY_TIMEOUT:?}: {rounds:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether no glock of `nodes` is being demoted, waits for a demote or is in a DLM
/// request; with the sum of their DLM requests so far.
fn glocks_idle(c: &Cluster, nodes: &[u32]) -> Option<u64> {
    let mut requests = 0;
    for &n in nodes {
        requests += c.status(n)["dlm_requests"].as_u64().expect("dlm_requests");
        let o = concord(&["glocks", c.mnt(n).to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "concord glocks of node {n}: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("glocks --json");
        for g in v.as_array().expect("glocks --json is a list") {
            let line = g["glock"].as_str().expect("G: line");
            let flags = line.split(' ').find_map(|w| w.strip_prefix("f:")).unwrap_or("");
            if flags.chars().any(|f| "lDdpSiRbCF".contains(f)) || !line.contains(" d:-/") {
                return None;
            }
        }
    }
    Some(requests)
}

/// Brings every writer to a point where a kill leaves each node's journal dirty: the
/// writers pause between rounds; once no glock moves on any node (demotes asked for
/// earlier done, no DLM request for a while), they go on overwriting their own files
/// in place, fsync'd, until killed. Those rounds need nothing of another node, so no
/// demote (which checkpoints a node's whole journal) comes between the last fsync and
/// the kill.
fn prepare_kill(c: &Cluster, writers: &mut [Writer]) {
    for w in writers.iter() {
        w.mode.store(PAUSE, Ordering::SeqCst);
    }
    wait_writers(writers, "their pause", |d| d.paused);
    let nodes: Vec<u32> = writers.iter().map(|w| w.node).collect();
    let start = Instant::now();
    loop {
        let before = glocks_idle(c, &nodes);
        std::thread::sleep(Duration::from_millis(300));
        if before.is_some() && glocks_idle(c, &nodes) == before {
            break;
        }
        assert!(start.elapsed() < READY_TIMEOUT, "the glocks did not settle in {READY_TIMEOUT:?}\n{}", c.logs());
    }
    let base: Vec<usize> = writers.iter().map(|w| w.durable.lock().unwrap().overwrites).collect();
    for w in writers.iter() {
        w.mode.store(OVERWRITE, Ordering::SeqCst);
    }
    for (w, b) in writers.iter_mut().zip(base) {
        wait_writers(std::slice::from_mut(w), "two overwrite rounds", |d| d.overwrites >= b + 2);
    }
}

/// The writers of `nodes` go back to creating, renaming and unlinking everywhere, for
/// `rounds` more rounds each.
fn resume_full(writers: &[Writer], nodes: &[u32], rounds: usize) {
    for w in writers.iter().filter(|w| nodes.contains(&w.node)) {
        w.limit.store(w.rounds() + rounds, Ordering::SeqCst);
        w.mode.store(FULL, Ordering::SeqCst);
    }
}

/// Rounds the survivors write after the kill (through the recovery).
const ROUNDS_AFTER_KILL: usize = 4;

/// Checks on `mnt` that everything `w` made durable is there (rounds in flight aside):
/// each file with its exact content, each removed name gone. Returns the files read.
fn check_durable(mnt: &Path, w: &Writer, on: &str) -> usize {
    let d = w.durable.lock().unwrap();
    let mut read = 0;
    for (p, want) in &d.files {
        if d.in_flight.contains(p) {
            continue;
        }
        let got = std::fs::read(mnt.join(p));
        match (want, got) {
            (Want::Data(data), Ok(got)) => {
                if got != *data {
                    let at = got.iter().zip(data).position(|(a, b)| a != b).unwrap_or(got.len().min(data.len()));
                    let versions = d.history.get(p).map_or(0, Vec::len);
                    let earlier = d.history.get(p).and_then(|h| h.iter().position(|v| *v == got));
                    panic!(
                        "{on}: {p} (fsync'd by node {}) has {} bytes that differ from the {} written from byte {at} \
                         (it was written {versions} times; what is read is version {earlier:?}; bytes there: {:?})",
                        w.node,
                        got.len(),
                        data.len(),
                        String::from_utf8_lossy(&got[at..(at + 48).min(got.len())])
                    );
                }
                read += 1;
            }
            (Want::Data(_), Err(e)) => panic!("{on}: {p}, fsync'd by node {}, cannot be read: {e}", w.node),
            (Want::Gone, Err(e)) if e.raw_os_error() == Some(libc::ENOENT) => {}
            (Want::Gone, r) => {
                panic!("{on}: {p}, durably removed by node {}, is there: {:?}", w.node, r.map(|v| v.len()))
            }
        }
    }
    read
}

/// Node `id`'s jid and lockspace generation, from `concord status --json`.
fn jid_and_generation(c: &Cluster, id: u32) -> (u64, u64) {
    let v = c.status(id);
    assert_eq!(v["state"], "up", "node {id}: {v}");
    (v["jid"].as_u64().expect("jid"), v["generation"].as_u64().expect("generation"))
}

/// The mount logs of `nodes` with their [`log_mark`]s: taken before a kill, so that
/// the recovery that follows is searched for after them.
fn mount_marks(c: &Cluster, nodes: &[u32]) -> Vec<(PathBuf, u64)> {
    nodes
        .iter()
        .map(|&n| {
            let log = c.mount_log(n);
            let mark = log_mark(&log);
            (log, mark)
        })
        .collect()
}

/// G of a lock_dlm line "recover generation G ...".
fn recover_generation(line: &str) -> Option<u64> {
    line.split("recover generation ").nth(1)?.split(' ').next()?.parse().ok()
}

/// Waits until one of the `survivors` asked for the recovery of `jid` and every
/// survivor finished that recovery; see [`wait_recovered_since`]. Returns G.
fn wait_recovered(c: &Cluster, survivors: &[u32], jid: u64) -> u64 {
    let logs: Vec<(PathBuf, u64)> = survivors.iter().map(|&n| (c.mount_log(n), 0)).collect();
    wait_recovered_since(c, &logs, &[jid])
}

/// Waits until the survivors (their mount logs after the `marks` taken before the
/// kill) asked for the recovery of every one of `jids` ("recover generation G jid
/// J"), one of them replayed each ("journal recovered jid=J"), and every survivor
/// finished the latest of those recovery generations ("recover generation G done",
/// or a later generation's: a second death during a recovery moves it on); checks
/// that one survivor, and one only, replayed each journal, and that it was dirty.
/// Returns the latest G.
fn wait_recovered_since(c: &Cluster, marks: &[(PathBuf, u64)], jids: &[u64]) -> u64 {
    let mut generation = 0;
    for &jid in jids {
        let (_, line) = wait_for_line_since(marks, &["recover generation ", &format!(" jid {jid} ")], READY_TIMEOUT);
        let g = recover_generation(&line).unwrap_or_else(|| panic!("no generation in {line:?}"));
        generation = generation.max(g);
        wait_for_line_since(marks, &["journal recovered", &format!("jid={jid} ")], READY_TIMEOUT);
    }
    for (log, since) in marks {
        let start = Instant::now();
        let done = |l: &String| {
            l.contains("recover generation ")
                && l.contains(" done")
                && recover_generation(l).is_some_and(|g| g >= generation)
        };
        while !lines_since(log, *since).iter().any(done) {
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "{} does not say recover generation {generation} (or a later one) done in {READY_TIMEOUT:?}\n{}",
                log.display(),
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    for &jid in jids {
        let replayed: Vec<String> = marks
            .iter()
            .flat_map(|(l, since)| lines_since(l, *since))
            .filter(|l| l.contains("journal recovered") && l.contains(&format!("jid={jid} ")))
            .collect();
        assert_eq!(replayed.len(), 1, "one survivor replays journal {jid}, not {replayed:?}\n{}", c.logs());
        assert!(replayed[0].contains("replayed=true"), "the dead node's journal was dirty: {}", replayed[0]);
    }
    generation
}

/// After `w`'s node died and the survivors recovered its journal: each path its last
/// round had in flight holds one state or the other (or a torn in-place write), and
/// what a survivor reads now on `mnt` is on the device for good. It is recorded as
/// what the path must hold from now on, so that the later checks (after more kills)
/// cover it too, and a writer can go on with the record ([`Writer::resume`]).
fn settle_in_flight(mnt: &Path, w: &Writer) {
    let mut d = w.durable.lock().unwrap();
    for p in std::mem::take(&mut d.in_flight) {
        let now = match std::fs::read(mnt.join(&p)) {
            Ok(v) => Want::Data(v),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Want::Gone,
            Err(e) => panic!("{p}, in flight when node {} died, cannot be read: {e}", w.node),
        };
        if let Want::Data(v) = &now {
            d.history.entry(p.clone()).or_default().push(v.clone());
        }
        d.files.insert(p, now);
    }
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

/// The lockspace part of node `id`'s lockd status.
fn lockspace(c: &Cluster, id: u32) -> serde_json::Value {
    let v = c.dlm_status(id);
    v["lockspaces"].as_array().and_then(|a| a.iter().find(|l| l["name"] == "fs1")).cloned().unwrap_or_else(|| {
        panic!("node {id}'s lockd has no lockspace fs1: {v}");
    })
}

/// After node 2 (jid `jid`) died with its writer: the survivors (1 and 3) create in
/// node 2's directory and read everything every node made durable; their writers went
/// on after the kill and stop cleanly; node 2's journal is clean; node 2 mounts again
/// and sees the same. Returns node 2's new lockspace generation.
fn survivors_carry_on_and_node_2_comes_back(c: &mut Cluster, writers: &mut [Writer], rounds_at_kill: &[usize]) -> u64 {
    // The directory node 2 held EX: a survivor creates and writes in it.
    std::fs::write(c.mnt(1).join("own2/after-recovery"), b"written by node 1 after node 2 died").unwrap();
    assert_eq!(std::fs::read(c.mnt(3).join("own2/after-recovery")).unwrap(), b"written by node 1 after node 2 died");
    // The survivors' writers went on past the kill and the recovery.
    for (w, at_kill) in writers.iter_mut().zip(rounds_at_kill).filter(|(w, _)| w.node != 2) {
        let want = at_kill + ROUNDS_AFTER_KILL;
        wait_writers(std::slice::from_mut(w), "their rounds after the kill", |d| d.rounds >= want);
    }
    for w in writers.iter_mut().filter(|w| w.node != 2) {
        w.stop();
    }
    for on in [1, 3] {
        for w in writers.iter() {
            let n = check_durable(&c.mnt(on), w, &format!("node {on}"));
            assert!(n >= ROUNDS_BEFORE_KILL, "node {on} read only {n} files of node {}", w.node);
        }
    }
    c.mount(&[2]);
    assert_eq!(c.status(2)["state"], "up");
    for w in writers.iter() {
        check_durable(&c.mnt(2), w, "node 2 mounted again");
    }
    assert_eq!(std::fs::read(c.mnt(2).join("own2/after-recovery")).unwrap(), b"written by node 1 after node 2 died");
    std::fs::write(c.mnt(2).join("own2/back"), b"node 2 is back").unwrap();
    assert_eq!(std::fs::read(c.mnt(1).join("own2/back")).unwrap(), b"node 2 is back");
    c.status(2)["generation"].as_u64().expect("generation")
}

/// `kill -9` of node 2's mount process while every node writes; its lockd stays up and
/// leaves the lockspace for it. The survivors recover its jid (no fence: the node's
/// lockd lives), create in the directory it held, read what it fsync'd; it mounts
/// again and sees the same; fsck is clean.
#[test]
fn a_killed_mount_process_is_recovered_by_the_survivors() {
    const T: &str = "a_killed_mount_process_is_recovered_by_the_survivors";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    let (jid2, gen_before) = jid_and_generation(&c, 2);
    let mut writers = start_writers(&c);
    wait_writers(&mut writers, "the rounds before the kill", |d| d.rounds >= ROUNDS_BEFORE_KILL);
    prepare_kill(&c, &mut writers);
    let rounds_at_kill: Vec<usize> = writers.iter().map(Writer::rounds).collect();
    c.kill_mount(2);
    let err = writers[1].join_killed();
    resume_full(&writers, &[1, 3], ROUNDS_AFTER_KILL);
    let generation = wait_recovered(&c, &[1, 3], jid2);
    assert!(generation > gen_before, "recovery generation {generation} after {gen_before}");
    assert_eq!(journal_state(&c, jid2), "clean", "node 2's journal after the survivors recovered it");
    // Its lockd left the lockspace for it; nobody fenced the node.
    assert!(
        find_line(&c.lockd_log(2), &["client with recovery callbacks left uncleanly"]).is_some(),
        "node 2's lockd did not see its mount go:\n{}",
        c.logs()
    );
    for n in [1, 3] {
        let ls = lockspace(&c, n);
        assert_eq!(ls["members"], serde_json::json!([1, 3]), "node {n}'s lockspace after node 2's mount died");
        assert!(ls["last_recovery"]["departed"].get("2").is_some(), "node {n}: node 2 departed: {ls}");
        let live = c.dlm_status(n)["live_nodes"].clone();
        assert_eq!(live, serde_json::json!([1, 2, 3]), "node 2's lockd lives, so the node is not declared dead");
    }
    assert!(c.fenced().is_empty(), "a node was fenced: {:?}", c.fenced());
    let gen_after = survivors_carry_on_and_node_2_comes_back(&mut c, &mut writers, &rounds_at_kill);
    assert!(gen_after > generation, "node 2 mounts again in generation {gen_after}, after {generation}");
    assert!(c.fenced().is_empty(), "a node was fenced: {:?}", c.fenced());
    eprintln!("node 2's writer ended with: {err}");
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after all three unmounted:\n{out}");
}

/// `kill -9` of node 2's lockd and mount at once while every node writes: the
/// survivors' lockds declare it dead once its lease has run out (the fence command
/// runs for it), recover its locks, and the survivors replay its journal; they create
/// in its directory and read what it fsync'd; its lockd starts again and it mounts in
/// a newer lockspace generation and sees the same; fsck is clean.
#[test]
fn a_killed_node_is_fenced_and_recovered() {
    const T: &str = "a_killed_node_is_fenced_and_recovered";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    let (jid2, gen_before) = jid_and_generation(&c, 2);
    let mut writers = start_writers(&c);
    wait_writers(&mut writers, "the rounds before the kill", |d| d.rounds >= ROUNDS_BEFORE_KILL);
    prepare_kill(&c, &mut writers);
    let rounds_at_kill: Vec<usize> = writers.iter().map(Writer::rounds).collect();
    c.crash(&[2]);
    let err = writers[1].join_killed();
    resume_full(&writers, &[1, 3], ROUNDS_AFTER_KILL);
    let generation = wait_recovered(&c, &[1, 3], jid2);
    assert!(generation > gen_before, "recovery generation {generation} after {gen_before}");
    assert_eq!(c.fenced(), vec![2], "the fence command ran for node 2 alone");
    let declared = [1, 3].iter().filter_map(|&n| find_line(&c.lockd_log(n), &["node declared dead", "target=2"]));
    assert_eq!(declared.count(), 1, "one survivor's lockd (the leader) declares node 2 dead\n{}", c.logs());
    for n in [1, 3] {
        assert_eq!(c.dlm_status(n)["live_nodes"], serde_json::json!([1, 3]), "node {n}'s lockd: node 2 is dead");
        let ls = lockspace(&c, n);
        assert_eq!(ls["members"], serde_json::json!([1, 3]), "node {n}'s lockspace after node 2 died");
        assert!(ls["last_recovery"]["departed"].get("2").is_some(), "node {n}: node 2 departed: {ls}");
    }
    assert_eq!(journal_state(&c, jid2), "clean", "node 2's journal after the survivors recovered it");
    c.restart_lockds();
    let gen_after = survivors_carry_on_and_node_2_comes_back(&mut c, &mut writers, &rounds_at_kill);
    assert!(gen_after > generation, "node 2 mounts again in generation {gen_after}, after {generation}");
    assert_eq!(c.fenced(), vec![2], "nobody else was fenced");
    eprintln!("node 2's writer ended with: {err}");
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after all three unmounted:\n{out}");
}

/// `kill -9` of every mount and every lockd while all three nodes write (the
/// first-mounter test): the lockds start again; node 1 mounts first and its log says
/// that it replayed all three dirty journals; nodes 2 and 3 mount after it without
/// replaying; every node reads everything every node fsync'd; fsck is clean.
#[test]
fn after_every_mount_is_killed_the_first_mounter_replays_every_journal() {
    const T: &str = "after_every_mount_is_killed_the_first_mounter_replays_every_journal";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::up(T, Spec::nodes(3));
    let mut writers = start_writers(&c);
    wait_writers(&mut writers, "the rounds before the kill", |d| d.rounds >= ROUNDS_BEFORE_KILL);
    prepare_kill(&c, &mut writers);
    c.crash(&[1, 2, 3]);
    for w in &mut writers {
        w.join_killed();
    }
    for jid in 0..3 {
        assert_eq!(journal_state(&c, jid), "dirty", "journal {jid} after every node was killed");
    }
    c.restart_lockds();
    c.mount(&[1]);
    let log1 = c.mount_log(1);
    let line = find_line(&log1, &["journals replayed at mount"])
        .unwrap_or_else(|| panic!("{} does not say which journals node 1 replayed\n{}", log1.display(), c.logs()));
    assert!(line.contains("replayed=[0, 1, 2]") && line.contains("first=true"), "node 1 replays all three: {line}");
    assert!(find_line(&log1, &["first mounter control generation"]).is_some(), "node 1 is the first mounter");
    let jid1 = c.status(1)["jid"].as_u64().expect("jid");
    for jid in (0..3).filter(|j| *j != jid1) {
        assert_eq!(journal_state(&c, jid), "clean", "journal {jid} after node 1 mounted first");
    }
    c.mount(&[2, 3]);
    for n in [2, 3] {
        let log = c.mount_log(n);
        assert!(
            find_line(&log, &["mounted", "first=false"]).is_some(),
            "node {n} mounts after the first:\n{}",
            c.logs()
        );
        assert!(
            find_line(&log, &["journals replayed at mount"]).is_none(),
            "node {n} replayed a journal:\n{}",
            c.logs()
        );
    }
    for on in 1..=3 {
        for w in &writers {
            let n = check_durable(&c.mnt(on), w, &format!("node {on}"));
            assert!(n >= ROUNDS_BEFORE_KILL, "node {on} read only {n} files of node {}", w.node);
        }
    }
    std::fs::write(c.mnt(3).join("own1/after"), b"node 3 writes in node 1's directory").unwrap();
    assert_eq!(std::fs::read(c.mnt(1).join("own1/after")).unwrap(), b"node 3 writes in node 1's directory");
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after all three unmounted:\n{out}");
}

/// `kill -9` of nodes 2 and 3, lockd and mount, at once, while the three mounted nodes
/// write. The cluster has five lockds (nodes 4 and 5 mount nothing): a lease needs a
/// quorum of lockds, so with three the one left would rightly fence itself; with five,
/// nodes 1, 4 and 5 keep a quorum, declare 2 and 3 dead, fence both and recover their
/// locks, and node 1, the last mount standing, replays both journals (three journals,
/// two dirty). It creates in both dead nodes' directories and reads everything every
/// node fsync'd; both nodes' lockds start again and both mount in a newer generation
/// and see the same; fsck is clean.
#[test]
fn two_nodes_killed_at_once_are_recovered_by_the_last_one() {
    const T: &str = "two_nodes_killed_at_once_are_recovered_by_the_last_one";
    if !can_mount(T) {
        return;
    }
    let mut c = Cluster::new(T, Spec::nodes(5));
    c.start_lockds();
    c.mount(&[1, 2, 3]);
    let (jid2, gen_before) = jid_and_generation(&c, 2);
    let (jid3, _) = jid_and_generation(&c, 3);
    let mut writers = start_writers(&c);
    assert_eq!(writers.len(), 3);
    wait_writers(&mut writers, "the rounds before the kill", |d| d.rounds >= ROUNDS_BEFORE_KILL);
    prepare_kill(&c, &mut writers);
    let rounds_at_kill = writers[0].rounds();
    let marks = mount_marks(&c, &[1]);
    c.crash(&[2, 3]);
    let errs: Vec<String> = writers[1..].iter_mut().map(Writer::join_killed).collect();
    resume_full(&writers, &[1], ROUNDS_AFTER_KILL);
    let generation = wait_recovered_since(&c, &marks, &[jid2, jid3]);
    assert!(generation > gen_before, "recovery generation {generation} after {gen_before}");
    for jid in [jid2, jid3] {
        assert_eq!(journal_state(&c, jid), "clean", "journal {jid} after node 1 recovered it");
    }
    let mut fenced = c.fenced();
    fenced.sort_unstable();
    assert_eq!(fenced, vec![2, 3], "the fence command ran once for each dead node");
    for target in [2, 3] {
        let declared = [1, 4, 5]
            .iter()
            .filter(|&&n| find_line(&c.lockd_log(n), &["node declared dead", &format!("target={target}")]).is_some())
            .count();
        assert_eq!(declared, 1, "one live lockd (the leader) declares node {target} dead\n{}", c.logs());
    }
    for n in [1, 4, 5] {
        assert_eq!(c.dlm_status(n)["live_nodes"], serde_json::json!([1, 4, 5]), "node {n}'s lockd: 2 and 3 are dead");
    }
    assert_eq!(lockspace(&c, 1)["members"], serde_json::json!([1]), "node 1 is the lockspace's last member");
    // The directories nodes 2 and 3 held EX: node 1 creates and writes in both.
    for n in [2, 3] {
        std::fs::write(c.mnt(1).join(format!("own{n}/after-recovery")), format!("node 1 after node {n} died")).unwrap();
    }
    let want = rounds_at_kill + ROUNDS_AFTER_KILL;
    wait_writers(&mut writers[..1], "node 1's rounds after the kill", |d| d.rounds >= want);
    writers[0].stop();
    for w in &writers {
        let n = check_durable(&c.mnt(1), w, "node 1");
        assert!(n >= ROUNDS_BEFORE_KILL, "node 1 read only {n} files of node {}", w.node);
    }
    c.restart_lockds();
    c.mount(&[2, 3]);
    for n in [2, 3] {
        let (_, g) = jid_and_generation(&c, n);
        assert!(g > generation, "node {n} mounts again in generation {g}, after {generation}");
        for w in &writers {
            check_durable(&c.mnt(n), w, &format!("node {n} mounted again"));
        }
        for d in [2, 3] {
            let got = std::fs::read(c.mnt(n).join(format!("own{d}/after-recovery"))).unwrap();
            assert_eq!(got, format!("node 1 after node {d} died").as_bytes(), "node {n} reads own{d}/after-recovery");
        }
    }
    std::fs::write(c.mnt(3).join("own2/back"), b"node 3 is back").unwrap();
    assert_eq!(std::fs::read(c.mnt(2).join("own2/back")).unwrap(), b"node 3 is back");
    let mut fenced = c.fenced();
    fenced.sort_unstable();
    assert_eq!(fenced, vec![2, 3], "nobody else was fenced");
    eprintln!("nodes 2 and 3's writers ended with: {errs:?}");
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after all three unmounted:\n{out}");
}

/// Rounds every writer does in each kill cycle before the kill.
const ROUNDS_PER_CYCLE: usize = 4;

/// A restarted writer of a node killed in cycle `n` numbers its rounds from
/// `ROUND_BASE * (n + 1)`: far above what any earlier writer of the node reached (a
/// few rounds per cycle), so its names are new.
const ROUND_BASE: usize = 1000;

/// Every writer in `writers` does `rounds` more rounds of the full workload; waits
/// for them (each then pauses).
fn run_rounds(writers: &mut [Writer], rounds: usize, what: &str) {
    let nodes: Vec<u32> = writers.iter().map(|w| w.node).collect();
    resume_full(writers, &nodes, rounds);
    for w in writers.iter_mut() {
        let want = w.limit.load(Ordering::SeqCst);
        wait_writers(std::slice::from_mut(w), what, |d| d.rounds >= want);
    }
}

/// A value of the environment, parsed, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v:?} does not parse")),
        Err(_) => default,
    }
}

/// Kill cycles under load: in each, every node runs the full workload for a few
/// rounds, then a node picked by a seeded RNG is killed with `kill -9`: its mount
/// alone on even cycles, its lockd and mount on odd ones. The survivors recover its
/// journal (a newer generation; fenced only when its lockd died too), write on
/// through the recovery, and read everything every node made durable, the dead
/// node's last fsync'd files first of all; the node (its lockd started again) mounts
/// in a newer generation, sees the same and goes on writing with the same record. At
/// the end every node reads everything and fsck is clean.
///
/// `CONCORD_KILL_CYCLES` (default 2, for CI) sets the cycles, `CONCORD_KILL_SEED` the
/// seed (printed; a failure's message names it), e.g. by hand:
/// `CONCORD_KILL_CYCLES=100 cargo test -p concord-tests --test cluster_recovery
/// kill_and_restart_cycles -- --nocapture` (the watchdog's deadline grows with the
/// cycles).
#[test]
fn kill_and_restart_cycles_lose_nothing() {
    const T: &str = "kill_and_restart_cycles_lose_nothing";
    if !can_mount(T) {
        return;
    }
    let cycles: u32 = env_or("CONCORD_KILL_CYCLES", 2);
    let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let seed: u64 = env_or("CONCORD_KILL_SEED", clock.as_nanos() as u64);
    eprintln!("{T}: {cycles} cycles, seed {seed} (CONCORD_KILL_SEED={seed} replays the victims)");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let deadline = TEST_DEADLINE + Duration::from_secs(60) * cycles;
    let mut c = Cluster::up(T, Spec { deadline, ..Spec::nodes(3) });
    let mut writers = start_writers(&c);
    let mut fenced = Vec::new();
    let started = Instant::now();
    for cycle in 0..cycles {
        let victim: u32 = rng.gen_range(1..=3);
        let whole = cycle % 2 == 1;
        let what = if whole { "lockd and mount" } else { "mount" };
        let ctx = format!("cycle {cycle} of {cycles} (CONCORD_KILL_SEED={seed}): kill -9 of node {victim}'s {what}");
        eprintln!("{ctx} ({:.1} s)", started.elapsed().as_secs_f64());
        let survivors: Vec<u32> = (1..=3).filter(|&n| n != victim).collect();
        let vi = victim as usize - 1;
        run_rounds(&mut writers, ROUNDS_PER_CYCLE, "their rounds of the cycle");
        prepare_kill(&c, &mut writers);
        let (jid, gen_before) = jid_and_generation(&c, victim);
        let marks = mount_marks(&c, &survivors);
        let victim_lockd = (c.lockd_log(victim), log_mark(&c.lockd_log(victim)));
        let survivor_lockds: Vec<(PathBuf, u64)> = survivors
            .iter()
            .map(|&n| {
                let l = c.lockd_log(n);
                let m = log_mark(&l);
                (l, m)
            })
            .collect();
        let at_kill: Vec<usize> = writers.iter().map(Writer::rounds).collect();
        if whole {
            c.crash(&[victim]);
            fenced.push(victim);
        } else {
            c.kill_mount(victim);
        }
        let err = writers[vi].join_killed();
        resume_full(&writers, &survivors, ROUNDS_AFTER_KILL);
        let generation = wait_recovered_since(&c, &marks, &[jid]);
        assert!(generation > gen_before, "{ctx}: recovery generation {generation} after {gen_before}");
        assert_eq!(journal_state(&c, jid), "clean", "{ctx}: journal {jid} after the survivors recovered it");
        if whole {
            let declared = survivor_lockds
                .iter()
                .filter(|(l, m)| find_line_since(l, *m, &["node declared dead", &format!("target={victim}")]).is_some())
                .count();
            assert_eq!(declared, 1, "{ctx}: one survivor's lockd declares the node dead\n{}", c.logs());
        } else {
            let left =
                find_line_since(&victim_lockd.0, victim_lockd.1, &["client with recovery callbacks left uncleanly"]);
            assert!(left.is_some(), "{ctx}: the node's lockd did not see its mount go\n{}", c.logs());
        }
        assert_eq!(c.fenced(), fenced, "{ctx}: the nodes fenced so far (a node is fenced only when its lockd died)");
        // The survivors create in the directory the dead node held EX.
        let name = format!("own{victim}/after-kill-{cycle}");
        std::fs::write(c.mnt(survivors[0]).join(&name), ctx.as_bytes()).unwrap();
        assert_eq!(std::fs::read(c.mnt(survivors[1]).join(&name)).unwrap(), ctx.as_bytes(), "{ctx}: {name}");
        for &s in &survivors {
            let want = at_kill[s as usize - 1] + ROUNDS_AFTER_KILL;
            wait_writers(&mut writers[s as usize - 1..s as usize], "their rounds after the kill", |d| d.rounds >= want);
        }
        for &s in &survivors {
            for w in &writers {
                check_durable(&c.mnt(s), w, &format!("{ctx}: node {s}"));
            }
        }
        settle_in_flight(&c.mnt(survivors[0]), &writers[vi]);
        if whole {
            c.restart_lockds();
        }
        c.mount(&[victim]);
        let (_, gen_after) = jid_and_generation(&c, victim);
        assert!(gen_after > generation, "{ctx}: the node mounts again in generation {gen_after}, after {generation}");
        for w in &writers {
            check_durable(&c.mnt(victim), w, &format!("{ctx}: node {victim} mounted again"));
        }
        eprintln!("{ctx}: its writer ended with: {err}");
        let durable = writers[vi].durable.clone();
        writers[vi] = Writer::resume(victim, c.mnt(victim), durable, ROUND_BASE * (cycle as usize + 1));
    }
    for w in writers.iter_mut() {
        w.stop();
    }
    for n in 1..=3 {
        for w in &writers {
            let read = check_durable(&c.mnt(n), w, &format!("node {n} at the end (CONCORD_KILL_SEED={seed})"));
            assert!(read >= ROUNDS_PER_CYCLE, "node {n} read only {read} files of node {}", w.node);
        }
    }
    eprintln!("{T}: {cycles} cycles in {:.1} s, fenced {fenced:?}", started.elapsed().as_secs_f64());
    c.unmount_all();
    let (code, out) = c.fsck();
    assert_eq!(code, 0, "fsck -n after all three unmounted (CONCORD_KILL_SEED={seed}):\n{out}");
}
