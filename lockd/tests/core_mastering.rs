//! The lockspace core through its public API: message costs of local and remote
//! mastering, bounded memory after idle removal, and wire encoding of messages.

use concord_lockd::core::{
    Event, Flags, LkId, LockRequest, Lockspace, LockspaceConfig, Message, Mode, NodeId, SbFlags, Status,
};

struct Cluster {
    nodes: Vec<Lockspace>,
    sent: usize,
}

impl Cluster {
    fn new(n: u32, idle_ms: u64) -> Cluster {
        let members: Vec<NodeId> = (1..=n).collect();
        Cluster {
            nodes: members
                .iter()
                .map(|&id| {
                    Lockspace::new("fs", id, members.clone(), 7 + u64::from(id))
                        .with_config(LockspaceConfig { idle_ms })
                })
                .collect(),
            sent: 0,
        }
    }

    /// Delivers every message (per-sender FIFO) until quiet; returns the count.
    fn pump(&mut self, now: u64) -> usize {
        let mut count = 0;
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some((to, generation, msg)) = self.nodes[i].poll_transmit() {
                    let from = self.nodes[i].our_node();
                    self.nodes[(to - 1) as usize].handle_message(now, from, generation, msg);
                    count += 1;
                    moved = true;
                }
            }
            if !moved {
                self.sent += count;
                return count;
            }
        }
    }

    fn lock(&mut self, node: NodeId, name: &[u8], mode: Mode, now: u64) -> LkId {
        let ls = &mut self.nodes[(node - 1) as usize];
        let id = ls.request(now, LockRequest { name: name.to_vec(), mode, flags: Flags::empty(), lvb: None }).unwrap();
        self.pump(now);
        let ev = self.nodes[(node - 1) as usize].poll_event();
        assert!(matches!(ev, Some(Event::Ast { lkid, status: Status::Granted, .. }) if lkid == id), "{ev:?}");
        id
    }

    fn unlock(&mut self, node: NodeId, id: LkId, now: u64) {
        self.nodes[(node - 1) as usize].unlock(now, id, None).unwrap();
        self.pump(now);
        let ev = self.nodes[(node - 1) as usize].poll_event();
        assert!(matches!(ev, Some(Event::Ast { status: Status::Unlocked, .. })), "{ev:?}");
    }
}

/// A name whose directory node is `want`.
fn name_with_directory(ls: &Lockspace, want: NodeId) -> Vec<u8> {
    (0..).map(|i| format!("inode/{i}").into_bytes()).find(|n| ls.directory_node(n) == want).unwrap()
}

#[test]
fn resource_used_by_its_directory_node_costs_no_message() {
    let mut c = Cluster::new(3, 10_000);
    let name = name_with_directory(&c.nodes[0], 1);
    for _ in 0..100 {
        let id = c.lock(1, &name, Mode::EX, 0);
        c.nodes[0].convert(0, id, Mode::NL, Flags::empty(), None).unwrap();
        c.pump(0);
        assert!(c.nodes[0].poll_event().is_some());
        c.unlock(1, id, 0);
    }
    assert_eq!(c.sent, 0);
}

#[test]
fn first_lock_costs_one_lookup_round_trip_then_none() {
    let mut c = Cluster::new(3, 10_000);
    let name = name_with_directory(&c.nodes[0], 2);
    let id = c.lock(1, &name, Mode::PR, 0);
    assert_eq!(c.sent, 2, "lookup and its reply");
    c.unlock(1, id, 0);
    for _ in 0..100 {
        let id = c.lock(1, &name, Mode::EX, 5);
        c.unlock(1, id, 5);
    }
    assert_eq!(c.sent, 2, "the master is cached and is ourselves");
    // Another node: a lookup round trip, then one round trip per operation.
    let id = c.lock(3, &name, Mode::PR, 6);
    assert_eq!(c.sent, 2 + 4);
    c.unlock(3, id, 6);
    assert_eq!(c.sent, 2 + 6);
}

#[test]
fn idle_resources_are_dropped_everywhere() {
    let mut c = Cluster::new(4, 10_000);
    for i in 0..2000u32 {
        let node = i % 4 + 1;
        let name = format!("r{i}").into_bytes();
        let id = c.lock(node, &name, Mode::EX, u64::from(i));
        // Another node takes it too, so that it caches the master.
        let other = node % 4 + 1;
        c.unlock(node, id, u64::from(i));
        let id2 = c.lock(other, &name, Mode::PR, u64::from(i));
        c.unlock(other, id2, u64::from(i));
    }
    let before: usize = c.nodes.iter().map(|n| n.resource_count()).sum();
    assert!(before >= 2000);
    // The last lock was released at t=1999.
    let deadline = 1999 + 10_000;
    for n in &mut c.nodes {
        n.handle_timeout(deadline);
    }
    c.pump(deadline);
    for n in &c.nodes {
        assert_eq!(n.resource_count(), 0);
        assert_eq!(n.directory_len(), 0);
        assert_eq!(n.poll_timeout(), None);
    }
}

#[test]
fn messages_round_trip_through_bincode() {
    let lvb = Some([9u8; 32]);
    let name = b"inode/42".to_vec();
    let lkid = LkId(0xdead_beef_0000_0001);
    let all = vec![
        Message::Lookup { name: name.clone() },
        Message::LookupReply { name: name.clone(), master: 3 },
        Message::Request { name: name.clone(), lkid, mode: Mode::EX, flags: Flags::NOQUEUE | Flags::VALBLK, lvb },
        Message::Convert { name: name.clone(), lkid, mode: Mode::NL, flags: Flags::CONVERT | Flags::VALBLK, lvb },
        Message::Unlock { name: name.clone(), lkid, lvb: None },
        Message::Cancel { name: name.clone(), lkid },
        Message::NotMaster { name: name.clone(), lkid },
        Message::Ast { lkid, status: Status::Canceled, mode: Some(Mode::PR), sb_flags: SbFlags::ALTMODE, lvb },
        Message::Bast { lkid, mode: Mode::CW },
        Message::Remove { name },
    ];
    let config = bincode::config::standard();
    for m in all {
        let bytes = bincode::serde::encode_to_vec(&m, config).unwrap();
        let (back, used): (Message, usize) = bincode::serde::decode_from_slice(&bytes, config).unwrap();
        assert_eq!(back, m);
        assert_eq!(used, bytes.len());
    }
}

/// Run by hand (`cargo test --release -p concord-lockd --test core_mastering -- --ignored
/// --nocapture`): the core's own cost of a locally mastered lock and unlock.
#[test]
#[ignore]
fn local_lock_unlock_cost() {
    let mut c = Cluster::new(3, 10_000);
    let name = name_with_directory(&c.nodes[0], 1);
    let n = 200_000u32;
    let start = std::time::Instant::now();
    for _ in 0..n {
        let ls = &mut c.nodes[0];
        let id = ls
            .request(0, LockRequest { name: name.clone(), mode: Mode::EX, flags: Flags::empty(), lvb: None })
            .unwrap();
        ls.poll_event().unwrap();
        ls.unlock(0, id, None).unwrap();
        ls.poll_event().unwrap();
    }
    let per = start.elapsed() / n;
    eprintln!("local lock+unlock in the core: {per:?}");
    assert_eq!(c.pump(0), 0);
}
