//! The glock runtime against in-process lockd nodes over real QUIC on loopback: a
//! cached re-take sends nothing, a demote syncs and invalidates before another node is
//! granted (and waits for the minimum hold time, fired by the timer), TRY requests
//! fail without leaving anything queued, withdraw fails waiters, BLOCK_LOCKS holds
//! grants back except for NOEXP, shutdown unlocks.
//!
//! `acquire` blocks its thread: the tests call it from plain threads (the test
//! thread, or one spawned per call with a bounded wait), never from async code.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use concord_fs::glock::{
    GlState, GlockError, GlockHold, GlockName, GlockOps, GlockRuntime, GlockType, HolderFlags, Tunables,
};
use concord_lockd::client::{Client, JoinKind, LockspaceHandle};
use concord_lockd::node::{Node, NodeOptions};
use concord_lockd::transport::testing::LocalCluster;

/// Upper bound for anything that should happen (generous: never a speed check).
const WAIT: Duration = Duration::from_secs(15);
/// How long something that must not happen yet is watched.
const STILL_PENDING: Duration = Duration::from_millis(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    Sync,
    Inval { metadata: bool },
}

/// The filesystem's side of demotes, recorded.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<(GlockName, Ev)>>,
    /// Set if an op ever ran inside a tokio runtime (it must run on the demote thread).
    on_tokio: AtomicBool,
}

impl Recorder {
    fn events_for(&self, name: GlockName) -> Vec<Ev> {
        self.events.lock().unwrap().iter().filter(|(n, _)| *n == name).map(|(_, e)| *e).collect()
    }

    fn record(&self, name: GlockName, ev: Ev) {
        if tokio::runtime::Handle::try_current().is_ok() {
            self.on_tokio.store(true, Ordering::SeqCst);
        }
        self.events.lock().unwrap().push((name, ev));
    }
}

impl GlockOps for Recorder {
    fn sync(&self, name: GlockName) -> Result<(), String> {
        self.record(name, Ev::Sync);
        Ok(())
    }

    fn invalidate(&self, name: GlockName, metadata: bool) -> bool {
        self.record(name, Ev::Inval { metadata });
        true
    }
}

/// In-process lockd nodes (as lockd/tests/node_client.rs), one plain keeper client
/// per node joined to "ls", and the glock runtimes mounted on them. Dropping it (also
/// when a test fails) shuts the runtimes and the nodes down.
struct Harness {
    mounts: Vec<(Arc<GlockRuntime>, LockspaceHandle)>,
    keepers: Vec<LockspaceHandle>,
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

impl Harness {
    fn start(n: u32) -> Harness {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let (nodes, keepers) = rt.block_on(async {
            let mut lc = LocalCluster::create(dir.path(), "test", n).unwrap();
            let mut nodes = Vec::new();
            for id in 1..=n {
                let opts = NodeOptions::local(&mut lc, id);
                nodes.push(Node::start(&lc.config, id, opts).await.unwrap());
            }
            for node in &nodes {
                assert!(node.wait_peers_up(WAIT).await, "peers of node {} not up", node.id());
            }
            let mut keepers = Vec::new();
            for node in &nodes {
                let c = Client::connect(node.socket_path()).await.unwrap();
                keepers.push(tokio::time::timeout(WAIT, c.join("ls", JoinKind::Plain)).await.unwrap().unwrap());
            }
            (nodes, keepers)
        });
        for node in &nodes {
            wait_until("every node in the view", || {
                node.status()
                    .lockspaces
                    .iter()
                    .any(|l| l.name == "ls" && l.members.len() == n as usize && !l.recovering)
            });
        }
        Harness { mounts: Vec::new(), keepers, nodes, _dir: dir, rt }
    }

    /// A glock runtime on `node`, as a mount starts it: its own lockd connection,
    /// joined with recovery callbacks, `ops` as the filesystem.
    fn mount(&mut self, node: u32, tunables: Tunables, ops: &Arc<Recorder>) -> Arc<GlockRuntime> {
        let path = self.nodes[node as usize - 1].socket_path().to_path_buf();
        let ls = self.rt.block_on(async {
            let c = Client::connect(&path).await.unwrap();
            tokio::time::timeout(WAIT, c.join("ls", JoinKind::WithRecovery)).await.unwrap().unwrap()
        });
        let g = GlockRuntime::start(ls.clone(), self.rt.handle().clone(), tunables);
        let dyn_ops: Arc<dyn GlockOps> = ops.clone();
        g.set_ops(Arc::downgrade(&dyn_ops));
        self.mounts.push((g.clone(), ls));
        g
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        for (g, ls) in self.mounts.drain(..) {
            g.shutdown();
            let _ = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), ls.leave()).await });
        }
        self.keepers.clear();
        for node in self.nodes.drain(..) {
            let _ = self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), node.shutdown()).await });
        }
    }
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn inode(number: u64) -> GlockName {
    GlockName::new(GlockType::Inode, number)
}

/// `acquire` on its own thread; the answer comes on the channel.
fn spawn_acquire(
    g: &Arc<GlockRuntime>,
    name: GlockName,
    state: GlState,
    flags: HolderFlags,
) -> mpsc::Receiver<Result<GlockHold, GlockError>> {
    let (tx, rx) = mpsc::channel();
    let g = g.clone();
    std::thread::spawn(move || {
        let _ = tx.send(g.acquire(name, state, flags));
    });
    rx
}

/// `acquire`, failing the test if it does not return within [`WAIT`].
fn acquire(
    g: &Arc<GlockRuntime>,
    name: GlockName,
    state: GlState,
    flags: HolderFlags,
) -> Result<GlockHold, GlockError> {
    spawn_acquire(g, name, state, flags).recv_timeout(WAIT).unwrap_or_else(|e| panic!("acquire {name} {state}: {e}"))
}

fn assert_still_pending<T: std::fmt::Debug>(rx: &mpsc::Receiver<T>, what: &str) {
    match rx.recv_timeout(STILL_PENDING) {
        Err(RecvTimeoutError::Timeout) => {}
        other => panic!("{what}: expected to be still waiting, got {other:?}"),
    }
}

/// The dump's `G:` line of `name`.
fn glock_line(g: &GlockRuntime, name: GlockName) -> String {
    let tag = format!(" n:{name} ");
    g.dump().into_iter().find(|l| l.starts_with("G:") && l.contains(&tag)).unwrap_or_default()
}

/// Waits until `name` is in `state` on `g`. A node learns its own conversion's
/// answer on its own time: the other node may be granted (and go on) first.
fn wait_state(g: &GlockRuntime, name: GlockName, state: GlState) {
    let tag = format!("s:{state} ");
    wait_until(&format!("{name} in {state}"), || glock_line(g, name).contains(&tag));
}

/// The `f:` flags of `name` in the dump.
fn glock_flags(g: &GlockRuntime, name: GlockName) -> String {
    let line = glock_line(g, name);
    line.split_whitespace().find_map(|w| w.strip_prefix("f:")).unwrap_or_default().to_string()
}

/// Holder lines of `name` in the dump.
fn holders(g: &GlockRuntime, name: GlockName) -> usize {
    let tag = format!(" n:{name} ");
    let dump = g.dump();
    let Some(at) = dump.iter().position(|l| l.starts_with("G:") && l.contains(&tag)) else { return 0 };
    dump[at + 1..].iter().take_while(|l| l.starts_with(" H:")).count()
}

#[test]
fn a_cached_retake_sends_no_dlm_message() {
    let mut h = Harness::start(1);
    let rec = Arc::new(Recorder::default());
    let g = h.mount(1, Tunables::default(), &rec);
    let name = inode(0x100);

    assert_eq!(g.dlm_requests(), 0);
    let hold = acquire(&g, name, GlState::Ex, HolderFlags::NONE).unwrap();
    assert_eq!((hold.name(), hold.state()), (name, GlState::Ex));
    assert_eq!(g.dlm_requests(), 1, "the first take is one DLM request");
    drop(hold);

    let hold = acquire(&g, name, GlState::Ex, HolderFlags::NONE).unwrap();
    assert_eq!(hold.state(), GlState::Ex);
    assert_eq!(g.dlm_requests(), 1, "re-taking the cached EX sent a DLM request");
    drop(hold);

    let sh = acquire(&g, name, GlState::Sh, HolderFlags::NONE).unwrap();
    assert_eq!(sh.state(), GlState::Sh);
    let sh2 = g.try_cached(name, GlState::Sh).expect("SH under a cached EX is served from the cache");
    assert_eq!(sh2.state(), GlState::Sh);
    assert_eq!(g.dlm_requests(), 1, "SH under a cached EX sent a DLM request");
    assert_eq!(holders(&g, name), 2);
    drop((sh, sh2));

    assert!(glock_line(&g, name).contains("s:EX"), "{:?}", g.dump());
    assert!(rec.events_for(name).is_empty(), "no demote happened: {:?}", rec.events_for(name));
}

#[test]
fn a_demote_syncs_and_invalidates_before_the_other_node_is_granted() {
    let mut h = Harness::start(2);
    let (r1, r2) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let g1 = h.mount(1, Tunables::default(), &r1);
    // Node 2 keeps its glock at least 1 s after a state change while holders are queued.
    let slow = Tunables { hold_time_default_ms: 1000, hold_time_max_ms: 1000, ..Tunables::default() };
    let g2 = h.mount(2, slow, &r2);
    let name = inode(0x200);

    drop(acquire(&g1, name, GlState::Ex, HolderFlags::NONE).unwrap());
    assert!(r1.events_for(name).is_empty());

    // Node 2 asks EX: node 1 gets a BAST for its cached EX and demotes to UN. By the
    // time node 2 is granted, node 1 has synced, then invalidated metadata too.
    let h2 = acquire(&g2, name, GlState::Ex, HolderFlags::NONE).unwrap();
    assert_eq!(r1.events_for(name), vec![Ev::Sync, Ev::Inval { metadata: true }]);
    wait_state(&g1, name, GlState::Un);

    // Node 1 asks SH again: it waits while node 2 holds EX.
    let rx = spawn_acquire(&g1, name, GlState::Sh, HolderFlags::NONE);
    assert_still_pending(&rx, "SH on node 1 while node 2 holds EX");
    // Node 2 got the BAST and keeps the glock for its minimum hold time.
    wait_until("node 2's demote is pending", || glock_flags(&g2, name).contains('d'));
    assert!(r2.events_for(name).is_empty());
    // Released before the hold time ran out: the timer fires the demote.
    drop(h2);
    let h1 = rx.recv_timeout(WAIT).expect("SH on node 1 after node 2 released").unwrap();
    assert_eq!(h1.state(), GlState::Sh);
    // EX -> SH for a PR BAST: synced, clean pages kept.
    assert_eq!(r2.events_for(name), vec![Ev::Sync]);
    wait_state(&g2, name, GlState::Sh);
    drop(h1);

    assert!(!r1.on_tokio.load(Ordering::SeqCst) && !r2.on_tokio.load(Ordering::SeqCst), "ops ran on a tokio thread");

    // Unmount of node 1: its locks are unlocked, so node 2 takes EX without node 1
    // demoting anything, and node 1 takes nothing any more.
    g1.shutdown();
    let h2 = acquire(&g2, name, GlState::Ex, HolderFlags::NONE).unwrap();
    assert_eq!(h2.state(), GlState::Ex);
    assert_eq!(r1.events_for(name), vec![Ev::Sync, Ev::Inval { metadata: true }]);
    assert!(matches!(acquire(&g1, name, GlState::Sh, HolderFlags::NONE), Err(GlockError::Io)));
}

#[test]
fn try_fails_on_a_conflict_and_leaves_nothing_behind() {
    let mut h = Harness::start(2);
    let (r1, r2) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let g1 = h.mount(1, Tunables::default(), &r1);
    let g2 = h.mount(2, Tunables::default(), &r2);
    let name = inode(0x300);

    // A new lock, refused with NOQUEUE.
    let h2 = acquire(&g2, name, GlState::Ex, HolderFlags::NONE).unwrap();
    assert_eq!(acquire(&g1, name, GlState::Ex, HolderFlags::TRY).unwrap_err(), GlockError::TryAgain);
    assert_eq!(holders(&g1, name), 0, "{:?}", g1.dump());
    assert!(!glock_flags(&g1, name).contains('l'), "a state change left running: {:?}", g1.dump());
    // No BAST without TRY_1CB: node 2 did not start a demote.
    assert!(glock_line(&g2, name).contains("s:EX"));
    assert!(!glock_flags(&g2, name).contains('D') && !glock_flags(&g2, name).contains('d'), "{:?}", g2.dump());
    drop(h2);
    let h1 = acquire(&g1, name, GlState::Ex, HolderFlags::NONE).unwrap();
    assert_eq!(h1.state(), GlState::Ex);
    drop(h1);

    // A conversion from the cached NL, refused with NOQUEUE.
    let h2 = acquire(&g2, name, GlState::Ex, HolderFlags::NONE).unwrap();
    wait_state(&g1, name, GlState::Un);
    assert_eq!(acquire(&g1, name, GlState::Sh, HolderFlags::TRY).unwrap_err(), GlockError::TryAgain);
    assert_eq!(holders(&g1, name), 0, "{:?}", g1.dump());
    assert!(!glock_flags(&g1, name).contains('l'), "{:?}", g1.dump());
    assert!(glock_line(&g1, name).contains("s:UN"), "{:?}", g1.dump());
    assert!(r2.events_for(name).iter().filter(|e| **e == Ev::Sync).count() == 1, "{:?}", r2.events_for(name));
    drop(h2);
    let h1 = acquire(&g1, name, GlState::Sh, HolderFlags::NONE).unwrap();
    assert_eq!(h1.state(), GlState::Sh);
}

#[test]
fn withdraw_fails_the_waiting_acquire_and_every_later_one() {
    let mut h = Harness::start(2);
    let (r1, r2) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    let g1 = h.mount(1, Tunables::default(), &r1);
    let g2 = h.mount(2, Tunables::default(), &r2);
    let name = inode(0x400);

    let h2 = acquire(&g2, name, GlState::Ex, HolderFlags::NONE).unwrap();
    let rx = spawn_acquire(&g1, name, GlState::Ex, HolderFlags::NONE);
    assert_still_pending(&rx, "EX on node 1 while node 2 holds EX");
    assert!(!g1.is_withdrawn());
    g1.withdraw("test");
    assert!(g1.is_withdrawn());
    assert_eq!(rx.recv_timeout(WAIT).expect("the waiter was not woken").unwrap_err(), GlockError::Io);

    let sent = g1.dlm_requests();
    assert_eq!(acquire(&g1, name, GlState::Ex, HolderFlags::NONE).unwrap_err(), GlockError::Io);
    assert_eq!(acquire(&g1, inode(0x401), GlState::Sh, HolderFlags::NONE).unwrap_err(), GlockError::Io);
    assert!(g1.try_cached(name, GlState::Sh).is_none());
    g1.withdraw("again");
    assert_eq!(g1.dlm_requests(), sent, "a withdrawn runtime sent DLM requests");
    assert!(!g2.is_withdrawn());
    drop(h2);
}

#[test]
fn blocked_locks_hold_grants_back_except_noexp() {
    let mut h = Harness::start(1);
    let rec = Arc::new(Recorder::default());
    let g = h.mount(1, Tunables::default(), &rec);
    let name = inode(0x500);
    let journal = GlockName::new(GlockType::Journal, 0);

    g.set_blocked(true);
    let rx = spawn_acquire(&g, name, GlState::Ex, HolderFlags::NONE);
    assert_still_pending(&rx, "EX while locks are blocked");
    // The request went out and lockd granted it; the reply is held back.
    wait_until("the reply is frozen", || glock_flags(&g, name).contains('F'));

    let j = acquire(&g, journal, GlState::Ex, HolderFlags::NOEXP).expect("NOEXP goes through while blocked");
    assert_eq!(j.state(), GlState::Ex);
    assert!(matches!(rx.try_recv(), Err(mpsc::TryRecvError::Empty)), "granted while blocked");

    g.set_blocked(false);
    let held = rx.recv_timeout(WAIT).expect("EX after unblocking").unwrap();
    assert_eq!(held.state(), GlState::Ex);
    drop((held, j));
}

/// By hand (`cargo test --release -p concord-fs --test glock_runtime -- --ignored
/// --nocapture`): the time of re-taking a cached glock (acquire and release, and
/// try_cached), and the DLM messages it sends (none). Numbers in docs/PERFORMANCE.md.
#[test]
#[ignore = "a benchmark, run by hand"]
fn bench_cached_glock_retake() {
    let mut h = Harness::start(1);
    let rec = Arc::new(Recorder::default());
    let g = h.mount(1, Tunables::default(), &rec);
    let name = inode(0x200);
    drop(acquire(&g, name, GlState::Ex, HolderFlags::NONE).unwrap());
    let sent = g.dlm_requests();
    const N: usize = 200_000;
    for (what, cached) in [("acquire+release", false), ("try_cached+release", true)] {
        let mut ns = Vec::with_capacity(N);
        for _ in 0..N {
            let t = std::time::Instant::now();
            let hold = if cached {
                g.try_cached(name, GlState::Ex).unwrap()
            } else {
                g.acquire(name, GlState::Ex, HolderFlags::NONE).unwrap()
            };
            drop(hold);
            ns.push(t.elapsed().as_nanos() as u64);
        }
        ns.sort_unstable();
        eprintln!("{what}: p50 {} ns, p99 {} ns, max {} ns ({N} takes)", ns[N / 2], ns[N * 99 / 100], ns[N - 1]);
    }
    assert_eq!(g.dlm_requests(), sent, "a cached re-take sent DLM requests");
    eprintln!("DLM requests during {} re-takes: {}", 2 * N, g.dlm_requests() - sent);
}
