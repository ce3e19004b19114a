//! `concord cluster`: the local cluster in one command, as README's tour uses it. Each
//! test brings a cluster up in its own folder with `concord cluster up`, breaks it with
//! `kill`, `partition`, restarts it, and takes it down with `concord cluster down`,
//! checking after each step what `concord cluster status --json` and the mounts
//! themselves say. A guard takes the cluster down (and kills whatever is left of it)
//! also when a test fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use concord_tests::{can_mount, concord_bin, is_mounted, output_within, text, tmp_base};
use serde_json::Value;

/// How long one `concord cluster` command may take (a cluster up on a loaded 2-core
/// machine running debug builds).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(240);
/// How long the tests wait for the cluster to notice a kill or a partition.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(60);

/// A cluster folder; dropping it takes the cluster down.
struct Local {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
}

impl Local {
    fn new() -> Local {
        let tmp = tempfile::Builder::new().prefix("lc").tempdir_in(tmp_base()).expect("temp dir");
        let dir = tmp.path().join("c");
        Local { _tmp: tmp, dir }
    }

    fn cmd(&self, args: &[&str]) -> Output {
        let mut c = Command::new(concord_bin());
        c.arg("cluster").args(args).arg("--dir").arg(&self.dir).env("NO_COLOR", "1");
        output_within(&mut c, COMMAND_TIMEOUT, None)
    }

    /// Runs `concord cluster ARGS`, which must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.cmd(args);
        assert!(o.status.success(), "concord cluster {args:?} failed: {}\n{}", text(&o), self.logs());
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn status(&self) -> Value {
        let out = self.ok(&["status", "--json"]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
    }

    fn node(&self, st: &Value, id: u64) -> Value {
        st["nodes"].as_array().unwrap().iter().find(|n| n["id"] == id).cloned().unwrap()
    }

    fn mnt(&self, id: u32) -> PathBuf {
        self.dir.join("mnt").join(id.to_string())
    }

    /// Polls the status until `pred` holds; panics with the last status otherwise.
    fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let st = self.status();
            if pred(&st) {
                return st;
            }
            assert!(
                start.elapsed() < NOTICE_TIMEOUT,
                "{what}: not seen in {NOTICE_TIMEOUT:?}; status {st:#}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The pids the cluster folder records.
    fn recorded_pids(&self) -> Vec<u32> {
        std::fs::read_dir(self.dir.join("run"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            .filter_map(|e| std::fs::read_to_string(e.path()).ok()?.trim().parse().ok())
            .collect()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for e in std::fs::read_dir(self.dir.join("log")).into_iter().flatten().flatten() {
            let body = std::fs::read_to_string(e.path()).unwrap_or_default();
            let lines: Vec<&str> = body.lines().collect();
            s.push_str(&format!("--- {} (last 30 lines)\n", e.path().display()));
            s.push_str(&lines[lines.len().saturating_sub(30)..].join("\n"));
            s.push('\n');
        }
        s
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if !self.dir.join("cluster.toml").exists() {
            return;
        }
        let pids = self.recorded_pids();
        let mut c = Command::new(concord_bin());
        c.arg("cluster").arg("down").arg("--dir").arg(&self.dir);
        let _ = c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).status();
        // Whatever `down` did not stop (a hung mount): killed and detached.
        for pid in pids {
            if alive(pid) && cmdline(pid).contains(&self.dir.display().to_string()) {
                // SAFETY: kill(2) of a process whose command line names our folder.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        for id in 1..=16 {
            if is_mounted(&self.mnt(id)) {
                concord_tests::detach(&self.mnt(id));
            }
        }
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

fn cmdline(pid: u32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).replace('\0', " ")
}

fn states(st: &Value) -> Vec<String> {
    st["nodes"].as_array().unwrap().iter().map(|n| n["state"].as_str().unwrap_or("?").to_string()).collect()
}

fn write_synced(p: &Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::File::create(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// README's tour: up, write on node 1, read on node 3, kill node 2, watch the status,
/// restart it; then a mount crash, a partition, `down`, and `up` again on the same disk.
#[test]
fn cluster_up_kill_restart_partition_down() {
    if !can_mount("cluster_up_kill_restart_partition_down") {
        return;
    }
    let c = Local::new();
    let out = c.ok(&["up", "--size", "512M"]);
    for id in 1..=3 {
        assert!(out.contains(&c.mnt(id).display().to_string()), "up does not name node {id}'s mount point: {out}");
        assert!(is_mounted(&c.mnt(id)), "node {id} is not mounted after up");
    }
    let st = c.status();
    assert_eq!(states(&st), ["up", "up", "up"], "{st:#}");
    assert_eq!(st["quorate"], true);
    assert_eq!(st["live_nodes"], serde_json::json!([1, 2, 3]));
    let mut jids: Vec<u64> = st["nodes"].as_array().unwrap().iter().map(|n| n["jid"].as_u64().unwrap()).collect();
    jids.sort();
    assert_eq!(jids, [0, 1, 2], "each node has its own journal: {st:#}");
    let pids: Vec<Value> = st["nodes"].as_array().unwrap().iter().map(|n| n["mount_pid"].clone()).collect();

    // Up again: says so, starts nothing.
    let again = c.ok(&["up"]);
    assert!(again.contains("up already"), "{again}");
    let st = c.status();
    let pids2: Vec<Value> = st["nodes"].as_array().unwrap().iter().map(|n| n["mount_pid"].clone()).collect();
    assert_eq!(pids, pids2, "a second up started new mounts");
    let refused = c.cmd(&["up", "--nodes", "5"]);
    assert!(!refused.status.success() && text(&refused).contains("--nodes"), "{}", text(&refused));

    // Write on node 1, read on node 3; node 2 works in its own directory.
    write_synced(&c.mnt(1).join("greeting"), b"hello from node 1\n");
    assert_eq!(std::fs::read(c.mnt(3).join("greeting")).unwrap(), b"hello from node 1\n");
    std::fs::create_dir(c.mnt(2).join("two")).unwrap();
    write_synced(&c.mnt(2).join("two/last-words"), b"fsync'd by node 2\n");

    // A node crash: both processes of node 2 killed; the others recover it.
    let gen_before = st["generation"].as_u64().unwrap();
    let out = c.ok(&["kill", "2"]);
    assert!(out.contains("lockd") && out.contains("mount"), "{out}");
    let st = c.wait_status("node 2 down and out of the live nodes", |st| {
        c.node(st, 2)["state"] == "down" && st["live_nodes"] == serde_json::json!([1, 3])
    });
    assert!(st["generation"].as_u64().unwrap() > gen_before, "{st:#}");
    assert!(c.node(&st, 2)["lockd_pid"].is_null() && c.node(&st, 2)["mount_pid"].is_null(), "{st:#}");
    assert!(!is_mounted(&c.mnt(2)), "kill left node 2's dead mount attached");
    // A survivor writes where node 2 held the locks, and reads what it fsync'd.
    write_synced(&c.mnt(3).join("two/after"), b"node 3 was here\n");
    assert_eq!(std::fs::read(c.mnt(1).join("two/last-words")).unwrap(), b"fsync'd by node 2\n");

    c.ok(&["restart", "2"]);
    let st = c.wait_status("node 2 back", |st| states(st) == ["up", "up", "up"]);
    assert_eq!(st["live_nodes"], serde_json::json!([1, 2, 3]));
    assert_eq!(std::fs::read(c.mnt(2).join("two/after")).unwrap(), b"node 3 was here\n");

    // A mount crash: node 3's lockd stays, its mount goes; restart mounts it again.
    let lockd3 = c.node(&st, 3)["lockd_pid"].clone();
    c.ok(&["kill", "3", "--mount-only"]);
    let st = c.status();
    assert_eq!(c.node(&st, 3)["state"], "unmounted", "{st:#}");
    assert_eq!(c.node(&st, 3)["lockd_pid"], lockd3, "--mount-only killed the lockd: {st:#}");
    c.ok(&["restart", "3"]);
    c.wait_status("node 3 mounted again", |st| states(st) == ["up", "up", "up"]);
    assert_eq!(std::fs::read(c.mnt(3).join("greeting")).unwrap(), b"hello from node 1\n");

    // A partition: node 1 cut off stops (fenced), the others go on; after heal and
    // restart it is a member again.
    c.ok(&["partition", "1"]);
    c.wait_status("node 1 fenced, nodes 2 and 3 live", |st| {
        c.node(st, 1)["state"] == "fenced" && st["live_nodes"] == serde_json::json!([2, 3])
    });
    assert!(std::fs::read_dir(c.mnt(1)).is_err(), "a fenced node still serves its mount");
    write_synced(&c.mnt(2).join("during-partition"), b"2\n");
    c.ok(&["heal", "1"]);
    c.wait_status("node 1's lockd back in the live nodes", |st| st["live_nodes"] == serde_json::json!([1, 2, 3]));
    c.ok(&["restart", "1"]);
    c.wait_status("node 1 mounted again", |st| states(st) == ["up", "up", "up"]);
    assert_eq!(std::fs::read(c.mnt(1).join("during-partition")).unwrap(), b"2\n");

    // Down: nothing left running or mounted; the disk kept.
    let pids = c.recorded_pids();
    assert_eq!(pids.len(), 6, "pid files: {pids:?}");
    let out = c.ok(&["down"]);
    assert!(out.contains("is down"), "{out}");
    for pid in pids {
        assert!(!alive(pid), "process {pid} ({}) still runs after down", cmdline(pid));
    }
    for id in 1..=3 {
        assert!(!is_mounted(&c.mnt(id)), "node {id} still mounted after down");
    }
    assert_eq!(states(&c.status()), ["down", "down", "down"]);
    let fsck = concord_tests::concord(&["fsck", "-n", c.dir.join("disk.img").to_str().unwrap()]);
    assert_eq!(fsck.status.code(), Some(0), "fsck after down: {}", text(&fsck));

    // Up again on the same disk.
    c.ok(&["up"]);
    assert_eq!(std::fs::read(c.mnt(2).join("greeting")).unwrap(), b"hello from node 1\n");
    c.ok(&["down"]);
}

/// With --netns every lockd has its own namespace and address, and a partition takes
/// its link down: the node is cut off for real and fences itself.
#[test]
fn cluster_up_netns_partition_cuts_a_real_link() {
    if !can_mount("cluster_up_netns_partition_cuts_a_real_link") {
        return;
    }
    if !Command::new("ip").arg("-V").output().is_ok_and(|o| o.status.success()) {
        concord_journal::skip_test("cluster_up_netns_partition_cuts_a_real_link", "no `ip` command (iproute2)");
        return;
    }
    let c = Local::new();
    let before = netns_list();
    c.ok(&["up", "--netns", "--nodes", "3", "--size", "256M"]);
    let st = c.status();
    assert_eq!(st["netns"], true);
    assert_eq!(netns_list().len(), before.len() + 4, "three node namespaces and a bridge's");
    assert_eq!(states(&st), ["up", "up", "up"], "{st:#}");
    for n in st["nodes"].as_array().unwrap() {
        let addr = n["addr"].as_str().unwrap();
        assert!(addr.starts_with("10.237.0."), "node {} is not on the private bridge: {addr}", n["id"]);
        // The lockd runs in its own network namespace, not the test's.
        let pid = n["lockd_pid"].as_u64().unwrap();
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
        let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
        assert_ne!(theirs, ours, "node {}'s lockd shares the test's network namespace", n["id"]);
    }
    write_synced(&c.mnt(3).join("before"), b"b\n");
    c.ok(&["partition", "3"]);
    c.wait_status("node 3 fenced", |st| {
        c.node(st, 3)["state"] == "fenced" && st["live_nodes"] == serde_json::json!([1, 2])
    });
    write_synced(&c.mnt(1).join("during"), b"d\n");
    assert_eq!(std::fs::read(c.mnt(2).join("before")).unwrap(), b"b\n");
    c.ok(&["heal", "3"]);
    c.wait_status("node 3's lockd back", |st| st["live_nodes"] == serde_json::json!([1, 2, 3]));
    c.ok(&["restart", "3"]);
    c.wait_status("node 3 mounted again", |st| states(st) == ["up", "up", "up"]);
    assert_eq!(std::fs::read(c.mnt(3).join("during")).unwrap(), b"d\n");
    c.ok(&["down"]);
    assert_eq!(netns_list(), before, "down left network namespaces behind");
}

fn netns_list() -> std::collections::BTreeSet<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// A tmux server of its own (its socket name is unique), killed when dropped.
struct Tmux(String);

impl Tmux {
    fn new() -> Tmux {
        Tmux(format!("concord-test-{}", std::process::id()))
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux").arg("-L").arg(&self.0).args(args).output().expect("run tmux")
    }

    /// Starts `command` in a new detached session `name` of 200x60.
    fn start(&self, name: &str, command: &str) {
        let o = self.run(&["new-session", "-d", "-s", name, "-x", "200", "-y", "60", command]);
        assert!(o.status.success(), "tmux new-session: {}", text(&o));
    }

    fn screen(&self, name: &str) -> String {
        let target = format!("={name}:");
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", &target]).stdout).into_owned()
    }

    /// Waits until the screen of `name` holds every one of `needles`; the screen.
    fn wait_screen(&self, name: &str, needles: &[&str]) -> String {
        let start = Instant::now();
        loop {
            let s = self.screen(name);
            if needles.iter().all(|n| s.contains(n)) {
                return s;
            }
            assert!(start.elapsed() < NOTICE_TIMEOUT, "the screen of {name} never showed {needles:?}:\n{s}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn alive(&self, name: &str) -> bool {
        self.run(&["has-session", "-t", &format!("={name}")]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// `concord top` and `concord cluster status --watch` in a terminal (tmux): they draw,
/// redraw when the cluster changes (a mount killed, its journal recovered), and quit
/// on q.
#[test]
fn top_and_status_watch_refresh_in_a_terminal_and_quit_on_q() {
    if !can_mount("top_and_status_watch_refresh_in_a_terminal_and_quit_on_q") {
        return;
    }
    if !Command::new("tmux").arg("-V").output().is_ok_and(|o| o.status.success()) {
        concord_journal::skip_test("top_and_status_watch_refresh_in_a_terminal_and_quit_on_q", "no tmux");
        return;
    }
    let c = Local::new();
    c.ok(&["up", "--nodes", "2", "--size", "256M"]);
    // Contention: node 2 reads what node 1 writes, so node 1 is asked for its glocks.
    for i in 0..20 {
        std::fs::write(c.mnt(1).join("ping"), format!("{i}\n")).unwrap();
        assert_eq!(std::fs::read_to_string(c.mnt(2).join("ping")).unwrap(), format!("{i}\n"));
    }
    let t = Tmux::new();
    let bin = concord_bin();
    // The two mounts of this test only (other tests' clusters may run meanwhile).
    t.start("top", &format!("{} top {} {}", bin.display(), c.mnt(1).display(), c.mnt(2).display()));
    t.start("watch", &format!("{} cluster status --watch --dir {}", bin.display(), c.dir.display()));
    let m1 = c.mnt(1).display().to_string();
    let m2 = c.mnt(2).display().to_string();
    let screen = t.wait_screen("top", &["concord top:", &m1, &m2, "MOST DEMOTES", "LONGEST WAITS"]);
    // Node 1 was asked for the glock of the file node 2 read: a row with a count.
    assert!(
        screen.lines().any(|l| l.starts_with("1 ") && l.contains("2/") && !l.contains("nobody")),
        "no glock of node 1 asked for by node 2:\n{screen}"
    );
    t.wait_screen("watch", &["NODE", &m1, &m2, "q quits"]);

    // A mount crash: node 1 recovers node 2's journal; both views redraw.
    c.ok(&["kill", "2", "--mount-only"]);
    let screen = t.wait_screen("top", &["node 1 jid"]);
    assert!(!screen.contains(&m2), "top still shows the killed mount:\n{screen}");
    let screen = t.wait_screen("watch", &["unmounted"]);
    assert!(screen.lines().any(|l| l.starts_with("2 ") && l.contains("unmounted")), "{screen}");

    // q quits both.
    for s in ["top", "watch"] {
        let o = t.run(&["send-keys", "-t", &format!("={s}:"), "q"]);
        assert!(o.status.success(), "send-keys: {}", text(&o));
    }
    let start = Instant::now();
    while t.alive("top") || t.alive("watch") {
        assert!(start.elapsed() < NOTICE_TIMEOUT, "q did not quit:\n{}\n{}", t.screen("top"), t.screen("watch"));
        std::thread::sleep(Duration::from_millis(100));
    }
    c.ok(&["down"]);
}

/// Two of three nodes killed: the third loses its quorum and fences itself. Restarting
/// one node brings the quorum back; the node that is still dead must be declared dead
/// (though no running lockd heard it since: the one restarted is new, the fenced one
/// started a new failure detector) so that the restarted node can mount, recover the
/// journals and read what the dead ones fsync'd.
#[test]
fn a_lost_quorum_comes_back_with_the_nodes() {
    if !can_mount("a_lost_quorum_comes_back_with_the_nodes") {
        return;
    }
    let c = Local::new();
    c.ok(&["up", "--size", "256M"]);
    write_synced(&c.mnt(3).join("from-3"), b"three\n");
    write_synced(&c.mnt(2).join("from-2"), b"two\n");
    c.ok(&["kill", "2"]);
    c.ok(&["kill", "3"]);
    c.wait_status("node 1 fenced without a quorum", |st| c.node(st, 1)["state"] == "fenced");
    c.ok(&["restart", "2"]);
    let st = c.wait_status("node 2 up, node 3 declared dead", |st| {
        c.node(st, 2)["state"] == "up" && st["live_nodes"] == serde_json::json!([1, 2])
    });
    assert_eq!(st["quorate"], true);
    assert_eq!(std::fs::read(c.mnt(2).join("from-3")).unwrap(), b"three\n");
    assert_eq!(std::fs::read(c.mnt(2).join("from-2")).unwrap(), b"two\n");
    c.ok(&["restart", "1"]);
    c.ok(&["restart", "3"]);
    c.wait_status("all up", |st| states(st) == ["up", "up", "up"]);
    assert_eq!(std::fs::read(c.mnt(1).join("from-3")).unwrap(), b"three\n");
    c.ok(&["down"]);
    let fsck = concord_tests::concord(&["fsck", "-n", c.dir.join("disk.img").to_str().unwrap()]);
    assert_eq!(fsck.status.code(), Some(0), "fsck after down: {}", text(&fsck));
}
