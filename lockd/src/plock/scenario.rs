//! Golden scenario tests of the plock service: N [`PlockService`]s in one process,
//! messages carried in order by hand, recovery views decided by the script.
//!
//! A file in `testdata/` is a list of cases separated by blank lines; `#` lines are
//! comments. A case is one command, `----`, and the expected output. `REWRITE=1`
//! rewrites the expected output from the actual one (then read the diff).
//!
//! Commands (`op` is a label naming one operation of a node; `res` is `p<N>` for
//! POSIX resource N or `f<N>` for flock resource N; a range is `A-B` with `B` a
//! number, `eof` (i64::MAX) or `max` (u64::MAX); `type` is `r` or `w`):
//!
//! * `cluster nodes=N`: N fresh nodes in view 1.
//! * `lock node=N op=L owner=O res=R range=A-B type=T [wait] [pid=P]`
//! * `unlock node=N op=L owner=O res=R range=A-B`
//! * `unlockowner node=N op=L owner=O res=R`
//! * `get node=N op=L owner=O res=R range=A-B type=T`
//! * `cancel node=N op=L`
//! * `crash node=N`: the others enter a new view without it, frozen;
//!   `join node=N`: a fresh node enters with the others, in a view that does not freeze.
//! * `thaw node=N gen=G`
//! * `hold`: stop delivering messages after each command; `deliver`: deliver all
//!   and go on delivering after each command.
//! * `dump node=N`: the node's held locks, pending count, freeze, and its master table.
//!
//! Output: one line per answer, `node=N op=L: RESULT`. After every delivery, when
//! nothing is in flight, every holder's copy of its locks is checked against the
//! master's table (the invariant recovery relies on), and the table for conflicting
//! grants.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;

use super::range::EOF;
use super::service::{PlockMsg, PlockService};
use super::{PlockOp, PlockResult, PlockSpace};
use crate::core::NodeId;

struct Interp {
    nodes: BTreeMap<NodeId, PlockService>,
    generation: u64,
    net: VecDeque<(NodeId, NodeId, u64, PlockMsg)>,
    labels: BTreeMap<(NodeId, u64), String>,
    ids: BTreeMap<(NodeId, String), u64>,
    held: bool,
}

fn args(line: &str) -> (String, BTreeMap<String, String>) {
    let mut parts = line.split_whitespace();
    let cmd = parts.next().unwrap_or_default().to_string();
    let a = parts
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect();
    (cmd, a)
}

fn num(a: &BTreeMap<String, String>, k: &str) -> u64 {
    a.get(k).unwrap_or_else(|| panic!("missing {k}=")).parse().unwrap_or_else(|_| panic!("bad {k}="))
}

fn end_of(s: &str) -> u64 {
    match s {
        "eof" => EOF,
        "max" => u64::MAX,
        n => n.parse().unwrap(),
    }
}

fn end_show(e: u64) -> String {
    match e {
        EOF => "eof".into(),
        u64::MAX => "max".into(),
        n => n.to_string(),
    }
}

fn range(a: &BTreeMap<String, String>) -> (u64, u64) {
    let r = &a["range"];
    let (s, e) = r.split_once('-').unwrap();
    (s.parse().unwrap(), end_of(e))
}

fn res(a: &BTreeMap<String, String>) -> (PlockSpace, u64) {
    let r = &a["res"];
    let space = if r.starts_with('f') { PlockSpace::Flock } else { PlockSpace::Posix };
    (space, r[1..].parse().unwrap())
}

fn res_show(space: PlockSpace, n: u64) -> String {
    format!("{}{n}", if space == PlockSpace::Flock { 'f' } else { 'p' })
}

fn result_show(r: &PlockResult) -> String {
    match r {
        PlockResult::Conflict(c) => format!(
            "Conflict node={} owner={} pid={} range={}-{} type={}",
            c.node,
            c.owner,
            c.pid,
            c.start,
            end_show(c.end),
            if c.write { 'w' } else { 'r' }
        ),
        r => format!("{r:?}"),
    }
}

impl Interp {
    fn new(n: u32) -> Interp {
        let mut it = Interp {
            nodes: BTreeMap::new(),
            generation: 0,
            net: VecDeque::new(),
            labels: BTreeMap::new(),
            ids: BTreeMap::new(),
            held: false,
        };
        for id in 1..=n {
            it.nodes.insert(id, PlockService::new(id));
        }
        it.view(false);
        it
    }

    fn view(&mut self, freeze: bool) {
        self.generation += 1;
        let members: Vec<NodeId> = self.nodes.keys().copied().collect();
        for s in self.nodes.values_mut() {
            s.begin_view(self.generation, &members, freeze);
        }
    }

    fn exec(&mut self, line: &str) -> String {
        let (cmd, a) = args(line);
        let node = a.get("node").map(|_| num(&a, "node") as NodeId);
        let mut out = String::new();
        let op = |a: &BTreeMap<String, String>| -> PlockOp {
            let owner = num(a, "owner");
            match cmd.as_str() {
                "lock" => {
                    let (start, end) = range(a);
                    PlockOp::Lock {
                        owner,
                        pid: a.get("pid").map_or(owner as u32 * 100, |p| p.parse().unwrap()),
                        start,
                        end,
                        write: a["type"] == "w",
                        wait: a.contains_key("wait"),
                    }
                }
                "unlock" => {
                    let (start, end) = range(a);
                    PlockOp::Unlock { owner, start, end }
                }
                "unlockowner" => PlockOp::UnlockOwner { owner },
                _ => {
                    let (start, end) = range(a);
                    PlockOp::Get { owner, start, end, write: a["type"] == "w" }
                }
            }
        };
        match cmd.as_str() {
            "cluster" => *self = Interp::new(num(&a, "nodes") as u32),
            "lock" | "unlock" | "unlockowner" | "get" => {
                let n = node.unwrap();
                let (space, number) = res(&a);
                let id = self.nodes.get_mut(&n).unwrap().request(space, number, op(&a));
                self.labels.insert((n, id), a["op"].clone());
                self.ids.insert((n, a["op"].clone()), id);
            }
            "cancel" => {
                let n = node.unwrap();
                let id = self.ids[&(n, a["op"].clone())];
                if !self.nodes.get_mut(&n).unwrap().cancel(id) {
                    out.push_str("nothing to cancel\n");
                }
            }
            "crash" => {
                let n = node.unwrap();
                self.nodes.remove(&n);
                self.net.retain(|(from, to, _, _)| *from != n && *to != n);
                self.view(true);
            }
            "join" => {
                let n = node.unwrap();
                self.nodes.insert(n, PlockService::new(n));
                // A fresh node starts at the current generation + 1 with the others.
                self.view(false);
            }
            "thaw" => {
                let thawed = self.nodes.get_mut(&node.unwrap()).unwrap().thaw(num(&a, "gen"));
                if !thawed {
                    out.push_str("not thawed\n");
                }
            }
            "hold" => self.held = true,
            "deliver" => self.held = false,
            "dump" => {
                let s = &self.nodes[&node.unwrap()];
                writeln!(
                    out,
                    "gen={} master={:?} frozen={:?} pending={}",
                    s.generation(),
                    s.master(),
                    s.frozen(),
                    s.pending_count()
                )
                .unwrap();
                for l in s.held() {
                    let r = l.range;
                    writeln!(
                        out,
                        "  held {} owner={} range={}-{} type={} pid={}",
                        res_show(l.space, l.number),
                        l.owner,
                        r.start,
                        end_show(r.end),
                        if r.write { 'w' } else { 'r' },
                        r.pid
                    )
                    .unwrap();
                }
                if let Some(t) = s.table() {
                    for l in t.locks() {
                        let r = l.range;
                        writeln!(
                            out,
                            "  table {} node={} owner={} range={}-{} type={} pid={}",
                            res_show(l.space, l.number),
                            l.node,
                            l.owner,
                            r.start,
                            end_show(r.end),
                            if r.write { 'w' } else { 'r' },
                            r.pid
                        )
                        .unwrap();
                    }
                    for w in t.waiters() {
                        let label = self.labels.get(&(w.node, w.op)).cloned().unwrap_or_default();
                        writeln!(
                            out,
                            "  wait {} node={} op={label} owner={} range={}-{} type={} on={}/{}",
                            res_show(w.space, w.number),
                            w.node,
                            w.owner,
                            w.start,
                            end_show(w.end),
                            if w.write { 'w' } else { 'r' },
                            w.blocker.0,
                            w.blocker.1
                        )
                        .unwrap();
                    }
                }
            }
            other => panic!("unknown command {other}"),
        }
        if !self.held {
            self.pump(&mut out);
        }
        self.answers(&mut out);
        out
    }

    fn answers(&mut self, out: &mut String) {
        for (n, s) in self.nodes.iter_mut() {
            while let Some((id, r)) = s.poll_answer() {
                let label = self.labels.get(&(*n, id)).cloned().unwrap_or_else(|| id.to_string());
                writeln!(out, "node={n} op={label}: {}", result_show(&r)).unwrap();
            }
        }
    }

    fn collect(&mut self) {
        for (n, s) in self.nodes.iter_mut() {
            while let Some((to, g, m)) = s.poll_transmit() {
                self.net.push_back((*n, to, g, m));
            }
        }
    }

    /// Delivers every message, in order, until none is in flight; then checks the
    /// invariants.
    fn pump(&mut self, out: &mut String) {
        self.collect();
        while let Some((from, to, g, m)) = self.net.pop_front() {
            if let Some(s) = self.nodes.get_mut(&to) {
                s.handle_message(from, g, m);
            }
            self.collect();
            self.answers(out);
        }
        self.check();
    }

    fn check(&self) {
        let Some(master) = self.nodes.values().find_map(|s| s.table()) else { return };
        assert!(master.conflicting_grants().is_empty(), "conflicting grants: {:?}", master.conflicting_grants());
        if self.nodes.values().any(|s| s.is_rebuilding()) {
            return;
        }
        let waiting = master.waiters();
        for (n, s) in &self.nodes {
            let mut mine: Vec<_> = master
                .locks()
                .into_iter()
                .filter(|l| l.node == *n)
                .filter(|l| {
                    !waiting.iter().any(|w| w.space == PlockSpace::Flock && (w.node, w.owner) == (l.node, l.owner))
                })
                .map(|l| (l.space, l.number, l.owner, l.range))
                .collect();
            let mut held: Vec<_> = s
                .held()
                .into_iter()
                .filter(|l| !waiting.iter().any(|w| w.space == PlockSpace::Flock && (w.node, w.owner) == (*n, l.owner)))
                .map(|l| (l.space, l.number, l.owner, l.range))
                .collect();
            mine.sort_by_key(|l| (l.0, l.1, l.2, l.3.start));
            held.sort_by_key(|l| (l.0, l.1, l.2, l.3.start));
            assert_eq!(held, mine, "node {n}'s copy of its locks differs from the master's table");
        }
    }
}

enum Item {
    Text(String),
    Case { line: usize, cmd: String, expected: Vec<String> },
}

fn parse(text: &str) -> Vec<Item> {
    let lines: Vec<&str> = text.lines().collect();
    let mut items = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if l.trim().is_empty() || l.starts_with('#') {
            items.push(Item::Text(l.to_string()));
            i += 1;
            continue;
        }
        assert_eq!(lines.get(i + 1).copied(), Some("----"), "line {}: expected ----", i + 2);
        let start = i;
        i += 2;
        let mut expected = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() {
            expected.push(lines[i].to_string());
            i += 1;
        }
        items.push(Item::Case { line: start + 1, cmd: l.to_string(), expected });
    }
    items
}

fn run_file(file: &str) {
    let path = format!("{}/src/plock/testdata/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut interp = Interp::new(3);
    let mut failures = String::new();
    let mut rewritten = String::new();
    for item in parse(&text) {
        match item {
            Item::Text(t) => {
                rewritten.push_str(&t);
                rewritten.push('\n');
            }
            Item::Case { line, cmd, expected } => {
                let actual: Vec<String> = interp.exec(&cmd).lines().map(str::to_string).collect();
                if actual != expected {
                    writeln!(
                        failures,
                        "{file}:{line}: {cmd}\n  expected:\n    {}\n  actual:\n    {}",
                        expected.join("\n    "),
                        actual.join("\n    ")
                    )
                    .unwrap();
                }
                rewritten.push_str(&cmd);
                rewritten.push_str("\n----\n");
                for l in &actual {
                    rewritten.push_str(l);
                    rewritten.push('\n');
                }
            }
        }
    }
    if std::env::var_os("REWRITE").is_some() {
        std::fs::write(&path, rewritten).unwrap();
        return;
    }
    assert!(failures.is_empty(), "scenario mismatches:\n{failures}");
}

macro_rules! scenarios {
    ($($test:ident => $file:literal,)*) => {
        $(
            #[test]
            fn $test() {
                run_file($file);
            }
        )*
    };
}

scenarios! {
    conflicts_and_nowait_locks => "conflicts.txt",
    waiters_are_granted_after_release_in_fifo_order => "waiters.txt",
    getlk_reports_the_first_conflicting_lock => "getlk.txt",
    edeadlk_across_nodes_and_resources => "deadlock.txt",
    cancel_leaves_nothing_behind => "cancel.txt",
    flock_upgrade_and_downgrade => "flock.txt",
    recovery_departed_holder_and_thaw => "recovery.txt",
    recovery_of_a_departed_master => "master-departs.txt",
}
