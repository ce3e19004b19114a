//! The client API against in-process lockd nodes over real QUIC on loopback:
//! pipelining, ASTs and BASTs across nodes, LVBs, cancel, what a disconnect does for
//! each kind of client, and a malformed client frame.

use std::time::Duration;

use concord_lockd::client::{Client, ClientError, ErrorKind, JoinKind, LockspaceHandle, RecoveryEvent};
use concord_lockd::core::{directory_node, Flags, Mode, SbFlags, Status, LVB_LEN};
use concord_lockd::node::{Node, NodeOptions};
use concord_lockd::transport::testing::LocalCluster;

struct Cluster {
    nodes: Vec<Node>,
    /// One plain client per node joined to "ls", so that every node is a member of
    /// its view and directory nodes are spread over all of them.
    _keepers: Vec<LockspaceHandle>,
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
        let mut keepers = Vec::new();
        for node in &nodes {
            let c = Client::connect(node.socket_path()).await.unwrap();
            keepers.push(
                tokio::time::timeout(Duration::from_secs(20), c.join("ls", JoinKind::Plain)).await.unwrap().unwrap(),
            );
        }
        // Every node has applied the view with all of them.
        for node in &nodes {
            wait_until(
                || {
                    node.status()
                        .lockspaces
                        .iter()
                        .any(|l| l.name == "ls" && l.members.len() == n as usize && !l.recovering)
                },
                "every node in the view",
            )
            .await;
        }
        Cluster { nodes, _keepers: keepers, _dir: dir }
    }

    async fn client(&self, node: u32) -> Client {
        Client::connect(self.nodes[node as usize - 1].socket_path()).await.unwrap()
    }

    async fn join(&self, node: u32, kind: JoinKind) -> LockspaceHandle {
        self.client(node).await.join("ls", kind).await.unwrap()
    }

    async fn stop(self) {
        for n in self.nodes {
            n.shutdown().await;
        }
    }
}

/// A resource name whose directory node is `node` among `1..=n`, so that the first
/// node to use it is also the one that masters it without a lookup message.
fn name_with_directory(node: u32, n: u32, tag: &str) -> Vec<u8> {
    let members: Vec<u32> = (1..=n).collect();
    (0..).map(|i| format!("{tag}/{i}").into_bytes()).find(|name| directory_node(&members, name) == node).unwrap()
}

/// Waits until the master's dump (seen through `h`, on the master) shows `n` waiting
/// requests on `name`: a request is accepted by the requester's lockd before its
/// message reaches the master.
async fn wait_for_waiters(h: &LockspaceHandle, name: &[u8], n: usize) {
    for _ in 0..500 {
        let dump = h.dump().await.unwrap().unwrap();
        let waiting = dump
            .resources
            .iter()
            .find(|r| r.name == name)
            .map_or(0, |r| r.locks.iter().filter(|l| l.queue == concord_lockd::core::Queue::Wait).count());
        if waiting >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the master never showed {n} waiter(s)");
}

async fn wait_until<F: FnMut() -> bool>(mut f: F, what: &str) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_on_one_connection() {
    let c = Cluster::start(3).await;
    let ls = c.join(1, JoinKind::Plain).await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..500 {
        let ls = ls.clone();
        set.spawn(async move { ls.lock(format!("res/{i}").as_bytes(), Mode::PR, Flags::empty(), None).await });
    }
    let mut lkids = Vec::new();
    while let Some(r) = set.join_next().await {
        let ast = r.unwrap().unwrap();
        assert_eq!(ast.status, Status::Granted);
        assert_eq!(ast.mode, Some(Mode::PR));
        lkids.push(ast.lkid);
    }
    assert_eq!(lkids.len(), 500);
    let st = ls.client().status().await.unwrap();
    assert_eq!(st.lockspaces[0].locks, 500);
    let mut set = tokio::task::JoinSet::new();
    for lkid in lkids {
        let ls = ls.clone();
        set.spawn(async move { ls.unlock(lkid, None).await });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().unwrap().status, Status::Unlocked);
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bast_reaches_the_holder_on_another_node_and_the_waiter_is_granted_after_unlock() {
    let c = Cluster::start(3).await;
    let a = c.join(1, JoinKind::Plain).await;
    let b = c.join(2, JoinKind::Plain).await;
    let mut basts = a.basts();
    let held = a.lock(b"inode/42", Mode::EX, Flags::empty(), None).await.unwrap();
    assert_eq!(held.status, Status::Granted);
    let waiting = b.request(b"inode/42", Mode::PR, Flags::empty(), None).await.unwrap();
    let bast = tokio::time::timeout(Duration::from_secs(5), basts.recv()).await.unwrap().unwrap();
    assert_eq!(bast.lkid, held.lkid);
    assert_eq!(bast.mode, Mode::PR);
    // Down-convert instead of unlocking: PR is compatible with the waiter.
    let conv = a.convert(held.lkid, Mode::PR, Flags::empty(), None).await.unwrap();
    assert_eq!((conv.status, conv.mode), (Status::Granted, Some(Mode::PR)));
    let ast = waiting.ast().await.unwrap();
    assert_eq!((ast.status, ast.mode), (Status::Granted, Some(Mode::PR)));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lvb_written_on_unlock_is_read_by_the_next_lock_on_another_node() {
    let c = Cluster::start(3).await;
    let a = c.join(1, JoinKind::Plain).await;
    let b = c.join(3, JoinKind::Plain).await;
    let name = name_with_directory(2, 3, "lvb");
    let ast = a.lock(&name, Mode::EX, Flags::VALBLK, None).await.unwrap();
    assert_eq!(ast.lvb, Some([0; LVB_LEN]));
    let mut v = [0u8; LVB_LEN];
    v[0] = 7;
    v[31] = 42;
    a.unlock(ast.lkid, Some(v)).await.unwrap();
    let ast = b.lock(&name, Mode::PR, Flags::VALBLK, None).await.unwrap();
    assert_eq!(ast.status, Status::Granted);
    assert_eq!(ast.lvb, Some(v));
    assert!(!ast.sb_flags.contains(SbFlags::VALNOTVALID));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_posted_unlock_is_applied_before_later_requests_and_its_lvb_is_seen() {
    let c = Cluster::start(3).await;
    let a = c.join(1, JoinKind::Plain).await;
    let b = c.join(3, JoinKind::Plain).await;
    // Mastered on node 1 (the poster's own node) and on node 2 (a remote master).
    for (dir, tag) in [(1, "posted-local"), (2, "posted-remote")] {
        let name = name_with_directory(dir, 3, tag);
        for i in 0..50u8 {
            let ast = a.lock(&name, Mode::EX, Flags::VALBLK, None).await.unwrap();
            assert_eq!(ast.status, Status::Granted);
            // The LVB the previous posted unlock wrote is read by the next lock.
            assert_eq!(ast.lvb.unwrap()[0], i, "{tag}");
            let mut v = [0u8; LVB_LEN];
            v[0] = i + 1;
            a.unlock_posted(ast.lkid, Some(v)).await.unwrap();
        }
        // Another node gets the lock once the last posted unlock is applied.
        let ast = tokio::time::timeout(Duration::from_secs(10), b.lock(&name, Mode::EX, Flags::VALBLK, None))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((ast.status, ast.lvb.unwrap()[0]), (Status::Granted, 50), "{tag}");
        b.unlock(ast.lkid, None).await.unwrap();
    }
    // A refused posted unlock (unknown lock) is logged; the connection goes on.
    let held = a.lock(b"z", Mode::EX, Flags::empty(), None).await.unwrap();
    a.unlock_posted(held.lkid, None).await.unwrap();
    a.unlock_posted(held.lkid, None).await.unwrap();
    let ast = a.lock(b"z", Mode::EX, Flags::NOQUEUE, None).await.unwrap();
    assert_eq!(ast.status, Status::Granted);
    a.unlock(ast.lkid, None).await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noqueue_answers_eagain_and_a_cancelled_wait_answers_ecancel() {
    let c = Cluster::start(2).await;
    let a = c.join(1, JoinKind::Plain).await;
    let b = c.join(2, JoinKind::Plain).await;
    let held = a.lock(b"x", Mode::EX, Flags::empty(), None).await.unwrap();
    let again = b.lock(b"x", Mode::EX, Flags::NOQUEUE, None).await.unwrap();
    assert_eq!((again.status, again.mode), (Status::Again, None));
    let pending = b.request(b"x", Mode::EX, Flags::empty(), None).await.unwrap();
    b.cancel(pending.lkid).await.unwrap();
    let ast = pending.ast().await.unwrap();
    assert_eq!((ast.status, ast.mode), (Status::Canceled, None));
    // Refused calls are errors with no AST.
    let e = b.unlock(ast.lkid, None).await.unwrap_err();
    assert!(matches!(e, ClientError::Refused(ref r) if r.kind == ErrorKind::UnknownLock), "{e}");
    let e = a.lock(b"y", Mode::EX, Flags::NOQUEUEBAST, None).await.unwrap_err();
    assert!(matches!(e, ClientError::Refused(ref r) if r.kind == ErrorKind::InvalidFlags), "{e}");
    a.unlock(held.lkid, None).await.unwrap();
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locally_mastered_lock_and_unlock_send_no_message() {
    let c = Cluster::start(3).await;
    let ls = c.join(2, JoinKind::Plain).await;
    let name = name_with_directory(2, 3, "local");
    let before = c.nodes[1].status().lock_messages_sent;
    for _ in 0..200 {
        let ast = ls.lock(&name, Mode::EX, Flags::empty(), None).await.unwrap();
        ls.unlock(ast.lkid, None).await.unwrap();
    }
    let after = c.nodes[1].status().lock_messages_sent;
    assert_eq!(after, before, "a locally mastered resource cost peer messages");
    let dump = ls.dump().await.unwrap().unwrap();
    let r = dump.resources.iter().find(|r| r.name == name).unwrap();
    assert_eq!(r.master, Some(2));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_client_that_disconnects_loses_its_locks() {
    let c = Cluster::start(3).await;
    let a = c.join(1, JoinKind::Plain).await;
    let b = c.join(3, JoinKind::Plain).await;
    let gone = name_with_directory(1, 3, "gone");
    a.lock(&gone, Mode::EX, Flags::empty(), None).await.unwrap();
    // A request still waiting when the client goes must be cancelled, not granted to nobody.
    let a2 = c.join(1, JoinKind::Plain).await;
    let waiting = b.request(&gone, Mode::EX, Flags::empty(), None).await.unwrap();
    wait_for_waiters(&a, &gone, 1).await;
    let a2_wait = a2.request(&gone, Mode::EX, Flags::empty(), None).await.unwrap();
    drop(a);
    let n1 = &c.nodes[0];
    // Left on node 1: the keeper and a2.
    wait_until(|| n1.status().clients.len() == 2, "node 1 sees the client gone").await;
    let ast = tokio::time::timeout(Duration::from_secs(5), waiting.ast()).await.unwrap().unwrap();
    assert_eq!(ast.status, Status::Granted);
    drop(a2_wait);
    drop(a2);
    b.unlock(ast.lkid, None).await.unwrap();
    // Nothing of the departed clients is left on node 1.
    wait_until(|| n1.status().lockspaces[0].locks == 0, "node 1 has no locks").await;
    let again = b.lock(&gone, Mode::EX, Flags::NOQUEUE, None).await.unwrap();
    assert_eq!(again.status, Status::Granted);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_client_that_dies_is_recovered_by_the_others() {
    let c = Cluster::start(3).await;
    // Node 1 also takes part in another lockspace, which must not notice.
    let elsewhere = c.client(1).await.join("other", JoinKind::Plain).await.unwrap();
    let other_gen = elsewhere.generation();
    let fs = c.join(1, JoinKind::WithRecovery).await;
    let fs_slot = fs.slot();
    assert!(fs_slot >= 1);
    let watcher = c.join(2, JoinKind::WithRecovery).await;
    let mut events = watcher.recovery();
    let waiter = c.join(3, JoinKind::Plain).await;
    let journal = name_with_directory(1, 3, "journal");
    let held = fs.lock(&journal, Mode::EX, Flags::VALBLK, Some([7; LVB_LEN])).await.unwrap();
    assert_eq!(held.status, Status::Granted);
    let pending = waiter.request(&journal, Mode::PR, Flags::VALBLK, None).await.unwrap();
    // The mount process dies: its client connection closes. Its node leaves the
    // lockspace uncleanly (node 1 masters the resource: the master goes too).
    drop(fs);
    let ast = tokio::time::timeout(Duration::from_secs(10), pending.ast()).await.unwrap().unwrap();
    assert_eq!(ast.status, Status::Granted, "the dead client's EX is regranted");
    assert!(ast.sb_flags.contains(SbFlags::VALNOTVALID), "its holder held EX: the LVB is invalid");
    // The other recovery client saw prep, the slot, done, in that order, with the
    // slot table of the new generation.
    let mut seen = Vec::new();
    let done_gen = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv()).await.unwrap().unwrap();
        seen.push(ev.clone());
        if let RecoveryEvent::Done { generation, slots, our_slot } = ev {
            assert!(!slots.contains_key(&1), "node 1 left: {slots:?}");
            assert_eq!(slots.get(&2), Some(&our_slot));
            break generation;
        }
    };
    let prep = seen.iter().position(|e| matches!(e, RecoveryEvent::Prep { generation } if *generation == done_gen));
    let slot = seen.iter().position(|e| matches!(e, RecoveryEvent::Slot { node: 1, slot } if *slot == fs_slot));
    assert!(prep.is_some() && slot.is_some() && prep < slot, "prep then slot then done: {seen:?}");
    // Node 1 stays in its other lockspace, untouched.
    let st = c.nodes[0].status();
    let other = st.lockspaces.iter().find(|l| l.name == "other").unwrap();
    assert!(other.member && other.generation == other_gen, "{other:?}");
    assert_eq!(st.lockspaces.iter().find(|l| l.name == "ls").unwrap().unclean_leaves, 1);
    // A new mount on node 1 joins again (after the recovery, its slot may be reused).
    let again = c.join(1, JoinKind::WithRecovery).await;
    assert!(again.slot() >= 1);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_client_frame_closes_only_that_client() {
    let c = Cluster::start(2).await;
    let bad = c.join(1, JoinKind::Plain).await;
    let good = c.join(1, JoinKind::Plain).await;
    let held = bad.lock(b"m", Mode::EX, Flags::empty(), None).await.unwrap();
    bad.client().send_raw(b"\xdc\xc0\x01\x02\x04\x00\x00\x00garbage!".to_vec()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), bad.client().closed()).await.unwrap();
    assert!(matches!(bad.unlock(held.lkid, None).await, Err(ClientError::Disconnected)));
    // Its locks went with it; the other client goes on.
    let ast = good.lock(b"m", Mode::EX, Flags::empty(), None).await.unwrap();
    assert_eq!(ast.status, Status::Granted);
    // An oversized frame header is refused from the header alone.
    let big = c.join(1, JoinKind::Plain).await;
    big.client().send_raw(b"\xdc\xc0\x01\x02\xff\xff\xff\x00".to_vec()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), big.client().closed()).await.unwrap();
    good.unlock(ast.lkid, None).await.unwrap();
    // Left: the keeper and `good`.
    assert_eq!(c.nodes[0].status().clients.len(), 2);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockdump_shows_holders_modes_and_masters_across_nodes() {
    let c = Cluster::start(3).await;
    let a = c.join(1, JoinKind::Plain).await;
    let b = c.join(2, JoinKind::Plain).await;
    let name = name_with_directory(1, 3, "dump");
    a.lock(&name, Mode::PR, Flags::empty(), None).await.unwrap();
    b.lock(&name, Mode::CR, Flags::empty(), None).await.unwrap();
    let _w = b.request(&name, Mode::EX, Flags::empty(), None).await.unwrap();
    wait_for_waiters(&a, &name, 1).await;
    let dump = a.dump().await.unwrap().unwrap();
    let r = dump.resources.iter().find(|r| r.name == name).unwrap();
    assert_eq!(r.master, Some(1));
    let mut seen: Vec<(u32, Option<Mode>, Option<Mode>)> =
        r.locks.iter().map(|l| (l.node, l.granted, l.requested)).collect();
    seen.sort();
    assert_eq!(seen, vec![(1, Some(Mode::PR), None), (2, None, Some(Mode::EX)), (2, Some(Mode::CR), None)]);
    // Node 2 sees its own locks and knows the master.
    let dump2 = b.dump().await.unwrap().unwrap();
    let r2 = dump2.resources.iter().find(|r| r.name == name).unwrap();
    assert_eq!((r2.master, r2.locks.len()), (Some(1), 2));
    c.stop().await;
}

/// Messages lost on a link that comes back before anyone is declared dead (here the
/// fault switch drops them for a moment, below `dead_after_ms`) are reconciled: the
/// reconnection resyncs the lockspace (a new generation, same members and slots),
/// and a request whose lookup was lost is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_lost_on_a_link_that_comes_back_are_resynced() {
    let c = Cluster::start(3).await;
    let a = c.join(1, JoinKind::Plain).await;
    let b = c.join(2, JoinKind::Plain).await;
    let name = name_with_directory(1, 3, "cut");
    let held = a.lock(&name, Mode::EX, Flags::empty(), None).await.unwrap();
    let before = c.nodes[1].status().lockspaces[0].clone();
    c.client(1).await.set_fault_cut(vec![2]).await.unwrap();
    c.client(2).await.set_fault_cut(vec![1]).await.unwrap();
    // Node 2's lookup (to node 1, the directory and master) is lost; so would be the
    // BAST to node 1 and the AST back.
    let pending = b.request(&name, Mode::EX, Flags::empty(), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.unlock(held.lkid, None).await.unwrap();
    c.client(1).await.set_fault_cut(vec![]).await.unwrap();
    c.client(2).await.set_fault_cut(vec![]).await.unwrap();
    let ast = tokio::time::timeout(Duration::from_secs(10), pending.ast()).await.expect("the lost request is answered");
    assert_eq!(ast.unwrap().status, Status::Granted);
    let after = c.nodes[1].status().lockspaces[0].clone();
    assert!(after.generation > before.generation, "{} -> {}", before.generation, after.generation);
    assert_eq!(after.slots, before.slots);
    c.stop().await;
}
