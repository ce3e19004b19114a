//! Golden scenario tests (raft-rs datadriven style) over [`Cluster`].
//!
//! A file in `testdata/` is a list of cases separated by blank lines; `#` lines are
//! comments. A case is one command line, a `----` line, and the expected output (one
//! line per event or message, possibly none). Run with `REWRITE=1` to rewrite the
//! expected output from the actual one (then read the diff: the files are the spec).
//!
//! Commands (`node` is 1-based, `lk` a label naming one lock of that node):
//!
//! * `cluster nodes=N [idle_ms=MS]`: start afresh with N nodes (default: 3 nodes,
//!   10 s idle time, before the first command).
//! * `request node=N lk=L res=NAME mode=M [flags=A|B] [lvb=TEXT]`
//! * `convert node=N lk=L mode=M [flags=A|B] [lvb=TEXT]`
//! * `unlock node=N lk=L [lvb=TEXT]`
//! * `cancel node=N lk=L`
//! * `hold`: stop delivering messages after each command; `deliver [n=K]`: deliver
//!   K queued messages (all if no n) and go on delivering after each command.
//! * `tick ms=MS`: advance the clock and fire due timers.
//! * `messages`: the messages delivered since the last `messages`.
//! * `dump node=N`, `dirnode res=NAME`, `stats`.
//! * `crash node=N`: node N crashes and the others enter a new view without it
//!   (lock recovery); `restart node=N`: it comes back in a new view.
//!
//! Output: `ast node=N lk=L status=S mode=M flags=F [lvb=TEXT]`, `bast node=N lk=L
//! mode=M`, `error: ...` when a call is refused.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::harness::Cluster;
use super::{Event, Flags, LkId, LockError, LockRequest, LockspaceConfig, Lvb, Message, Mode, NodeId, LVB_LEN};

struct Interp {
    cluster: Cluster,
    labels: BTreeMap<(NodeId, String), LkId>,
    names: BTreeMap<(NodeId, LkId), String>,
    held: bool,
}

fn parse_args(line: &str) -> (String, BTreeMap<String, String>) {
    let mut parts = line.split_whitespace();
    let cmd = parts.next().unwrap_or_default().to_string();
    let args = parts
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (p.to_string(), String::new()),
        })
        .collect();
    (cmd, args)
}

fn lvb_from(text: &str) -> Lvb {
    let mut v = [0u8; LVB_LEN];
    let b = text.as_bytes();
    v[..b.len().min(LVB_LEN)].copy_from_slice(&b[..b.len().min(LVB_LEN)]);
    v
}

fn lvb_show(v: &Lvb) -> String {
    let end = v.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
    if end == 0 {
        "(zero)".to_string()
    } else if v[..end].iter().all(|b| b.is_ascii_graphic()) {
        String::from_utf8_lossy(&v[..end]).into_owned()
    } else {
        v[..end].iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn mode_show(m: Option<Mode>) -> &'static str {
    m.map_or("-", |m| m.as_str())
}

impl Interp {
    fn new(nodes: u32, idle_ms: u64) -> Interp {
        Interp {
            cluster: Cluster::new(nodes, LockspaceConfig { idle_ms }),
            labels: BTreeMap::new(),
            names: BTreeMap::new(),
            held: false,
        }
    }

    fn label(&self, node: NodeId, lkid: LkId) -> String {
        self.names.get(&(node, lkid)).cloned().unwrap_or_else(|| format!("#{lkid}"))
    }

    fn lkid(&self, node: NodeId, label: &str) -> LkId {
        // A label never used names no lock: LkId(0) is never allocated.
        self.labels.get(&(node, label.to_string())).copied().unwrap_or(LkId(0))
    }

    fn show_message(&self, from: NodeId, to: NodeId, m: &Message) -> String {
        let name = |n: &[u8]| String::from_utf8_lossy(n).into_owned();
        let detail = match m {
            Message::Lookup { name: n } | Message::Remove { name: n } => format!("res={}", name(n)),
            Message::LookupReply { name: n, master } => format!("res={} master={master}", name(n)),
            Message::Request { name: n, lkid, mode, .. } => {
                format!("lk={} res={} mode={mode}", self.label(from, *lkid), name(n))
            }
            Message::Convert { lkid, mode, .. } => format!("lk={} mode={mode}", self.label(from, *lkid)),
            Message::Unlock { lkid, .. } | Message::Cancel { lkid, .. } => {
                format!("lk={}", self.label(from, *lkid))
            }
            Message::NotMaster { lkid, .. } => format!("lk={}", self.label(to, *lkid)),
            Message::Ast { lkid, status, .. } => format!("lk={} status={status}", self.label(to, *lkid)),
            Message::Bast { lkid, mode } => format!("lk={} mode={mode}", self.label(to, *lkid)),
            Message::RecDirEntry { name: n } | Message::RecLookup { name: n } | Message::RecNotMaster { name: n } => {
                format!("res={}", name(n))
            }
            Message::RecLookupReply { name: n, master } => format!("res={} master={master}", name(n)),
            Message::RecLocks { name: n, locks, .. } => format!("res={} locks={}", name(n), locks.len()),
            Message::RecLocksReply { name: n, truths } => {
                format!("res={} {}", name(n), if truths.is_some() { "truths" } else { "rebuilt" })
            }
            Message::RecDirDone | Message::RecDone => String::new(),
        };
        format!("{from}->{to} {} {detail}", m.kind())
    }

    fn settle(&mut self) {
        self.cluster.collect();
        if !self.held {
            self.cluster.run();
        }
    }

    fn exec(&mut self, line: &str) -> String {
        let (cmd, a) = parse_args(line);
        let get = |k: &str| a.get(k).cloned().unwrap_or_default();
        let node = || -> NodeId { get("node").parse().expect("node=N") };
        let mode = || -> Mode { get("mode").parse().expect("mode=M") };
        let flags = || -> Flags { get("flags").parse().expect("flags") };
        let lvb = || a.get("lvb").map(|t| lvb_from(t));
        let mut out = String::new();
        let now = self.cluster.now;
        let result = match cmd.as_str() {
            "cluster" => {
                let n = get("nodes").parse().unwrap_or(3);
                let idle = get("idle_ms").parse().unwrap_or(10_000);
                *self = Interp::new(n, idle);
                Ok(())
            }
            "request" => {
                let (n, lk) = (node(), get("lk"));
                let req = LockRequest { name: get("res").into_bytes(), mode: mode(), flags: flags(), lvb: lvb() };
                self.cluster.node(n).request(now, req).map(|id| {
                    self.labels.insert((n, lk.clone()), id);
                    self.names.insert((n, id), lk);
                })
            }
            "convert" => {
                let n = node();
                let id = self.lkid(n, &get("lk"));
                self.cluster.node(n).convert(now, id, mode(), flags(), lvb())
            }
            "unlock" => {
                let n = node();
                let id = self.lkid(n, &get("lk"));
                self.cluster.node(n).unlock(now, id, lvb())
            }
            "cancel" => {
                let n = node();
                let id = self.lkid(n, &get("lk"));
                self.cluster.node(n).cancel(now, id)
            }
            "crash" => {
                self.cluster.crash(node());
                Ok(())
            }
            "restart" => {
                self.cluster.restart(node());
                Ok(())
            }
            "hold" => {
                self.held = true;
                Ok(())
            }
            "deliver" => {
                self.held = false;
                match a.get("n") {
                    Some(k) => {
                        for _ in 0..k.parse::<usize>().expect("n=K") {
                            self.cluster.deliver_one();
                        }
                        self.held = true;
                    }
                    None => self.cluster.run(),
                }
                Ok(())
            }
            "tick" => {
                self.cluster.advance(get("ms").parse().expect("ms=MS"));
                Ok(())
            }
            "messages" => {
                let log = std::mem::take(&mut self.cluster.delivered);
                for (f, t, m) in &log {
                    writeln!(out, "{}", self.show_message(*f, *t, m)).unwrap();
                }
                Ok(())
            }
            "dump" => {
                let n = node();
                for r in self.cluster.node(n).dump() {
                    let lvb = r.lvb.map(|(v, seq)| format!(" lvb={} seq={seq}", lvb_show(&v))).unwrap_or_default();
                    let master = r.master.map_or("-".to_string(), |m| m.to_string());
                    writeln!(out, "res={} master={master}{lvb}", String::from_utf8_lossy(&r.name)).unwrap();
                    for l in &r.locks {
                        writeln!(
                            out,
                            "  {:?} node={} lk={} granted={} requested={}",
                            l.queue,
                            l.node,
                            self.label(l.node, l.lkid),
                            mode_show(l.granted),
                            mode_show(l.requested)
                        )
                        .unwrap();
                    }
                }
                Ok(())
            }
            "dirnode" => {
                let d = self.cluster.nodes[0].directory_node(get("res").as_bytes());
                writeln!(out, "dir={d}").unwrap();
                Ok(())
            }
            "stats" => {
                for n in &self.cluster.nodes {
                    writeln!(
                        out,
                        "node={} resources={} directory={} locks={}",
                        n.our_node(),
                        n.resource_count(),
                        n.directory_len(),
                        n.lock_count()
                    )
                    .unwrap();
                }
                Ok(())
            }
            other => panic!("unknown command {other:?}"),
        };
        if let Err(e) = result {
            // Lock ids are random per node incarnation: show the label instead.
            let lk = get("lk");
            let e = match e {
                LockError::UnknownLock(_) => format!("unknown lock {lk}"),
                LockError::Busy(_) => format!("lock {lk} has an operation in progress"),
                LockError::NothingToCancel(_) => format!("lock {lk} has nothing to cancel"),
                other => other.to_string(),
            };
            writeln!(out, "error: {e}").unwrap();
        }
        self.settle();
        for (n, e) in std::mem::take(&mut self.cluster.events) {
            match e {
                Event::Ast { lkid, status, flags, mode, lvb } => {
                    write!(
                        out,
                        "ast node={n} lk={} status={status} mode={} flags={flags}",
                        self.label(n, lkid),
                        mode_show(mode)
                    )
                    .unwrap();
                    if let Some(v) = lvb {
                        write!(out, " lvb={}", lvb_show(&v)).unwrap();
                    }
                    out.push('\n');
                }
                Event::Bast { lkid, mode } => {
                    writeln!(out, "bast node={n} lk={} mode={mode}", self.label(n, lkid)).unwrap()
                }
                Event::Recovered { generation } => writeln!(out, "recovered node={n} generation={generation}").unwrap(),
            }
        }
        for n in &self.cluster.nodes {
            if !self.cluster.dead.contains(&n.our_node()) {
                n.check_invariants();
            }
        }
        out
    }
}

enum Item {
    Text(String),
    Case { line: usize, cmd: String, expected: Vec<String> },
}

fn parse(text: &str, path: &str) -> Vec<Item> {
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
        assert_eq!(lines.get(i + 1).copied(), Some("----"), "{path}:{}: expected ----", i + 2);
        let start = i;
        i += 2;
        let mut expected = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() {
            expected.push(lines[i].to_string());
            i += 1;
        }
        items.push(Item::Case { line: start + 1, cmd: l.to_string(), expected });
        // The blank line ending the case, if any, is kept as text.
    }
    items
}

/// Runs one scenario file; panics with every mismatch, or rewrites it with REWRITE=1.
pub(crate) fn run_file(file: &str) {
    let path = format!("{}/src/core/testdata/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let items = parse(&text, &path);
    let mut interp = Interp::new(3, 10_000);
    let mut failures = String::new();
    let mut rewritten = String::new();
    for item in &items {
        match item {
            Item::Text(t) => {
                rewritten.push_str(t);
                rewritten.push('\n');
            }
            Item::Case { line, cmd, expected } => {
                let actual = interp.exec(cmd);
                let actual: Vec<String> = actual.lines().map(str::to_string).collect();
                if &actual != expected {
                    writeln!(
                        failures,
                        "{file}:{line}: {cmd}\n  expected:\n    {}\n  actual:\n    {}",
                        expected.join("\n    "),
                        actual.join("\n    ")
                    )
                    .unwrap();
                }
                rewritten.push_str(cmd);
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
    compat_matrix => "compat-matrix.txt",
    grant_order_new_request_waits_behind_conversions => "grant-order.txt",
    in_place_conversion => "convert-in-place.txt",
    quecvt_queues_a_grantable_conversion => "quecvt.txt",
    noqueue_returns_eagain => "noqueue.txt",
    noqueuebast_sends_basts => "noqueuebast.txt",
    lock_recovery => "recovery.txt",
    altpr => "altpr.txt",
    altcw => "altcw.txt",
    headque => "headque.txt",
    noorder => "noorder.txt",
    expedite => "expedite.txt",
    cancel_request => "cancel-request.txt",
    cancel_conversion => "cancel-convert.txt",
    unlock => "unlock.txt",
    conversion_deadlock => "conversion-deadlock.txt",
    lvb_write_and_read => "lvb.txt",
    bast_not_repeated => "bast-not-repeated.txt",
    remote_master => "remote-master.txt",
    idle_resource_removal => "idle-removal.txt",
    invalid_calls_get_no_ast => "invalid-calls.txt",
}
