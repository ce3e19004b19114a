//! Cluster-wide plocks through real lockd nodes (in-process, QUIC on loopback) and
//! the client API: a lock on one node blocks a waiting lock on another until it is
//! unlocked, F_GETLK from a third node, cancel, a plain client's disconnect, and a
//! departed node's locks released only after recovery (and, with a recovery client,
//! only after its thaw).

use std::time::Duration;

use concord_lockd::client::{Client, JoinKind, LockspaceHandle, RecoveryEvent};
use concord_lockd::node::{Node, NodeOptions};
use concord_lockd::plock::{PlockConflict, PlockOp, PlockResult, PlockSpace};
use concord_lockd::transport::testing::LocalCluster;
use tokio::task::JoinHandle;

struct Cluster {
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn start(n: u32) -> Cluster {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let mut lc = LocalCluster::create(dir.path(), "test", n).unwrap();
        let mut nodes = Vec::new();
        for id in 1..=n {
            let opts = NodeOptions::local(&mut lc, id);
            nodes.push(Node::start(&lc.config, id, opts).await.unwrap());
        }
        for node in &nodes {
            assert!(node.wait_peers_up(Duration::from_secs(10)).await, "peers of node {} not up", node.id());
        }
        Cluster { nodes, _dir: dir }
    }

    async fn join(&self, node: u32, kind: JoinKind) -> LockspaceHandle {
        let c = Client::connect(self.nodes[node as usize - 1].socket_path()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), c.join("ls", kind)).await.unwrap().unwrap()
    }

    /// Waits until every node has applied a view of "ls" with `n` members and
    /// finished its lock recovery.
    async fn settle(&self, n: usize) {
        for node in &self.nodes {
            wait_until(
                || node.status().lockspaces.iter().any(|l| l.name == "ls" && l.members.len() == n && !l.recovering),
                "every node in the view",
            )
            .await;
        }
    }

    async fn stop(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

async fn wait_until<F: FnMut() -> bool>(mut f: F, what: &str) {
    for _ in 0..1000 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

const FILE: u64 = 42;

fn lock(owner: u64, start: u64, end: u64, write: bool, wait: bool) -> PlockOp {
    PlockOp::Lock { owner, pid: 1000 + owner as u32, start, end, write, wait }
}

async fn plock(h: &LockspaceHandle, token: u64, op: PlockOp) -> PlockResult {
    tokio::time::timeout(Duration::from_secs(10), h.plock(token, PlockSpace::Posix, FILE, op)).await.unwrap().unwrap()
}

/// Starts a waiting operation in its own task.
fn spawn_plock(h: &LockspaceHandle, token: u64, op: PlockOp) -> JoinHandle<PlockResult> {
    let h = h.clone();
    tokio::spawn(async move { h.plock(token, PlockSpace::Posix, FILE, op).await.unwrap() })
}

/// Asserts that a waiting operation is still waiting a little later.
async fn still_waiting(t: &mut JoinHandle<PlockResult>) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    if t.is_finished() {
        panic!("the waiting lock was answered too early: {:?}", t.await);
    }
}

async fn answer(t: JoinHandle<PlockResult>) -> PlockResult {
    tokio::time::timeout(Duration::from_secs(10), t).await.expect("no answer in time").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_on_one_node_blocks_a_waiter_on_another_until_unlocked_getlk_and_cancel() {
    let c = Cluster::start(3).await;
    let h1 = c.join(1, JoinKind::Plain).await;
    let h2 = c.join(2, JoinKind::Plain).await;
    let h3 = c.join(3, JoinKind::Plain).await;
    c.settle(3).await;

    assert_eq!(plock(&h1, 1, lock(7, 0, 99, true, false)).await, PlockResult::Granted);
    // Node 2 without waiting: EAGAIN; with waiting: blocked.
    assert_eq!(plock(&h2, 1, lock(7, 50, 50, false, false)).await, PlockResult::Again);
    let mut waiter = spawn_plock(&h2, 2, lock(7, 50, 50, false, true));
    still_waiting(&mut waiter).await;
    // F_GETLK from node 3 sees node 1's lock with its pid.
    let got = plock(&h3, 1, PlockOp::Get { owner: 9, start: 10, end: u64::MAX, write: false }).await;
    assert_eq!(
        got,
        PlockResult::Conflict(PlockConflict { node: 1, owner: 7, pid: 1007, start: 0, end: 99, write: true })
    );
    // Node 1 unlocks: node 2's waiter is granted.
    assert_eq!(plock(&h1, 2, PlockOp::Unlock { owner: 7, start: 0, end: u64::MAX }).await, PlockResult::Unlocked);
    assert_eq!(answer(waiter).await, PlockResult::Granted);
    let got = plock(&h3, 2, PlockOp::Get { owner: 9, start: 0, end: u64::MAX, write: true }).await;
    assert!(
        matches!(got, PlockResult::Conflict(PlockConflict { node: 2, owner: 7, start: 50, end: 50, .. })),
        "{got:?}"
    );

    // Cancel: node 3 waits on node 2's read lock, then cancels; nothing of it is
    // left (node 1 can then take a write lock beside node 2's).
    let mut waiter = spawn_plock(&h3, 3, lock(1, 0, 99, true, true));
    still_waiting(&mut waiter).await;
    tokio::time::timeout(Duration::from_secs(5), h3.plock_cancel(3)).await.unwrap().unwrap();
    assert_eq!(answer(waiter).await, PlockResult::Cancelled);
    // Cancelling what is not in flight is fine.
    h3.plock_cancel(3).await.unwrap();
    assert_eq!(plock(&h1, 3, lock(7, 51, 99, true, false)).await, PlockResult::Granted);
    assert_eq!(plock(&h2, 3, PlockOp::UnlockOwner { owner: 7 }).await, PlockResult::Unlocked);
    assert_eq!(plock(&h3, 4, lock(1, 0, 50, true, false)).await, PlockResult::Granted);

    // A bad range is refused by the local lockd.
    let bad = h1.plock(9, PlockSpace::Posix, FILE, lock(7, 10, 5, true, false)).await;
    assert!(bad.is_err(), "{bad:?}");
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_that_disconnects_loses_its_plocks_and_its_waiting_ops() {
    let c = Cluster::start(2).await;
    let keeper = c.join(1, JoinKind::Plain).await;
    let gone = c.join(1, JoinKind::Plain).await;
    let h2 = c.join(2, JoinKind::Plain).await;
    c.settle(2).await;
    assert_eq!(plock(&gone, 1, lock(5, 0, 9, true, false)).await, PlockResult::Granted);
    // Its waiting lock (on node 2's lock) must be cancelled, not granted to nobody.
    // (Owner 6, which will wait for owner 5, holds nothing it waits for: no cycle.)
    assert_eq!(plock(&h2, 1, lock(8, 100, 100, true, false)).await, PlockResult::Granted);
    let mut orphan = spawn_plock(&gone, 2, lock(5, 100, 100, true, true));
    let mut waiter = spawn_plock(&h2, 2, lock(6, 0, 0, false, true));
    still_waiting(&mut waiter).await;
    still_waiting(&mut orphan).await;
    // The client goes (its task, holding a clone of the handle, with it).
    orphan.abort();
    drop(gone);
    let n1 = &c.nodes[0];
    wait_until(|| n1.status().clients.len() == 1, "node 1 sees the client gone").await;
    assert_eq!(answer(waiter).await, PlockResult::Granted);
    // Its waiting lock left nothing behind: node 2 unlocks and node 1's keeper can
    // take the byte at once.
    assert_eq!(plock(&h2, 3, PlockOp::UnlockOwner { owner: 6 }).await, PlockResult::Unlocked);
    assert_eq!(plock(&h2, 4, PlockOp::UnlockOwner { owner: 8 }).await, PlockResult::Unlocked);
    assert_eq!(plock(&keeper, 1, lock(1, 0, 200, true, false)).await, PlockResult::Granted);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_nodes_plocks_are_released_after_recovery_and_the_thaw() {
    let c = Cluster::start(3).await;
    // Node 1 (the plock master) has a mount; node 2 a mount and a plain user; node
    // 3 only a plain user (it thaws by itself once lock recovery is done).
    let mount1 = c.join(1, JoinKind::WithRecovery).await;
    let mount2 = c.join(2, JoinKind::WithRecovery).await;
    let mut events2 = mount2.recovery();
    let user2 = c.join(2, JoinKind::Plain).await;
    let user3 = c.join(3, JoinKind::Plain).await;
    c.settle(3).await;
    assert_eq!(plock(&mount1, 1, lock(1, 0, 99, true, false)).await, PlockResult::Granted);
    assert_eq!(plock(&user3, 1, lock(3, 200, 299, true, false)).await, PlockResult::Granted);
    let mut waiter2 = spawn_plock(&user2, 1, lock(2, 10, 10, true, true));
    let waiter3 = spawn_plock(&user3, 2, lock(3, 20, 20, false, true));
    still_waiting(&mut waiter2).await;
    assert!(!waiter3.is_finished());

    // The mount on node 1 dies: node 1 leaves uncleanly, its locks go with it once
    // the others have recovered. Node 3 has no recovery client: granted after lock
    // recovery. Node 2 waits for its mount's thaw.
    drop(mount1);
    assert_eq!(answer(waiter3).await, PlockResult::Granted);
    let generation = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events2.recv()).await.unwrap().unwrap();
        // (Earlier views, as node 3's join, were recovered too.)
        if let RecoveryEvent::Done { generation, slots, .. } = ev {
            if !slots.contains_key(&1) {
                break generation;
            }
        }
    };
    still_waiting(&mut waiter2).await;
    mount2.plock_thaw(generation - 1).await.unwrap();
    still_waiting(&mut waiter2).await;
    mount2.plock_thaw(generation).await.unwrap();
    assert_eq!(answer(waiter2).await, PlockResult::Granted);
    // The survivors' locks survived the new master (node 2 now).
    let got = plock(&user2, 2, PlockOp::Get { owner: 9, start: 0, end: u64::MAX, write: true }).await;
    assert!(
        matches!(got, PlockResult::Conflict(PlockConflict { node: 2, owner: 2, start: 10, end: 10, .. })),
        "{got:?}"
    );
    let got = plock(&user2, 3, PlockOp::Get { owner: 9, start: 100, end: u64::MAX, write: true }).await;
    assert!(
        matches!(got, PlockResult::Conflict(PlockConflict { node: 3, owner: 3, start: 200, end: 299, .. })),
        "{got:?}"
    );
    c.stop().await;
}
