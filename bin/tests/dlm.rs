//! `concord lockd` and `concord dlm` as real processes on loopback: three nodes serving
//! `dlm exec` with mutual exclusion, `--nowait`, lockdump, a client killed with -9, a
//! node whose certificate comes from another CA, a lockd killed with -9 while all
//! nodes hammer shared locks (recovery, then its restart), and a partitioned lockd
//! (it fences itself, the majority goes on, it rejoins after healing); a node serves
//! no lock before it holds a lease.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use concord_lockd::core::directory_node;

const BIN: &str = env!("CARGO_BIN_EXE_concord");

/// A child process killed (and reaped) when dropped, even if the test panics.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().expect("run concord")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "concord {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A free UDP port on loopback (bound, then released; the caller retries on a clash).
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

/// One cluster configuration and the lockd processes started from it.
struct Cluster {
    dir: PathBuf,
    config: PathBuf,
    lockds: Vec<(u32, Proc)>,
}

impl Cluster {
    /// Writes a CA (with `concord ca`), certificates for `ids` and a config in `dir`.
    fn create(dir: &Path, cluster: &str, ids: &[u32], ports: &[(u32, u16)]) -> Cluster {
        Self::create_with(dir, cluster, ids, ports, "heartbeat_ms = 100\nlease_ms = 1000")
    }

    /// [`Cluster::create`] with the given `[timing]` lines.
    fn create_with(dir: &Path, cluster: &str, ids: &[u32], ports: &[(u32, u16)], timing: &str) -> Cluster {
        Self::create_full(dir, cluster, ids, ports, timing, "")
    }

    /// [`Cluster::create_with`] with more `[runtime]` lines.
    fn create_full(
        dir: &Path,
        cluster: &str,
        ids: &[u32],
        ports: &[(u32, u16)],
        timing: &str,
        runtime: &str,
    ) -> Cluster {
        std::fs::create_dir_all(dir).unwrap();
        let tls = dir.join("tls");
        let tls_s = tls.to_str().unwrap();
        ok(&["ca", "init", tls_s, "--cluster", cluster, "--force"]);
        for id in ids {
            ok(&["ca", "issue", tls_s, "--node", &id.to_string(), "--force"]);
        }
        let mut text = format!(
            "[cluster]\nname = \"{cluster}\"\n\n[tls]\ndir = \"tls\"\n\n[timing]\n{timing}\n\n[runtime]\ndir = \
             \"run\"\nstate_dir = \"state\"\n{runtime}\n"
        );
        for (id, port) in ports {
            text.push_str(&format!("\n[[node]]\nid = {id}\nname = \"n{id}\"\naddr = \"127.0.0.1:{port}\"\n"));
        }
        let config = dir.join("cluster.toml");
        std::fs::write(&config, text).unwrap();
        Cluster { dir: dir.to_path_buf(), config, lockds: Vec::new() }
    }

    fn start(&mut self, id: u32) {
        let log = std::fs::File::create(self.dir.join(format!("lockd-{id}.log"))).unwrap();
        let child = Command::new(BIN)
            .args(["lockd", "--config", self.config.to_str().unwrap(), "--node", &id.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.lockds.push((id, Proc(child)));
    }

    /// `kill -9` of node `id`'s lockd.
    fn kill(&mut self, id: u32) {
        let i = self.lockds.iter().position(|(n, _)| *n == id).expect("lockd started");
        let (_, mut p) = self.lockds.remove(i);
        p.0.kill().unwrap();
        p.0.wait().unwrap();
        let log = self.dir.join(format!("lockd-{id}.log"));
        let _ = std::fs::rename(&log, self.dir.join(format!("lockd-{id}.killed.log")));
    }

    /// Whether every lockd started is still running.
    fn all_running(&mut self) -> bool {
        self.lockds.iter_mut().all(|(_, p)| matches!(p.0.try_wait(), Ok(None)))
    }

    fn dlm(&self, node: u32, args: &[&str]) -> Output {
        let mut full = vec!["dlm", "--config", self.config.to_str().unwrap(), "--node"];
        let n = node.to_string();
        full.push(&n);
        full.extend_from_slice(args);
        run(&full)
    }

    fn dlm_cmd(&self, node: u32, args: &[&str]) -> Command {
        self.dlm_cmd_with(Path::new(BIN), node, args)
    }

    /// [`dlm_cmd`](Self::dlm_cmd) with another copy of the binary.
    fn dlm_cmd_with(&self, bin: &Path, node: u32, args: &[&str]) -> Command {
        let mut c = Command::new(bin);
        c.args(["dlm", "--config", self.config.to_str().unwrap(), "--node", &node.to_string()]).args(args);
        c
    }

    fn status(&self, node: u32) -> Option<serde_json::Value> {
        let o = self.dlm(node, &["status", "--json"]);
        o.status.success().then(|| serde_json::from_slice(&o.stdout).expect("status --json is JSON"))
    }

    fn peers_up(&self, node: u32) -> Option<Vec<bool>> {
        let st = self.status(node)?;
        Some(st["peers"].as_array()?.iter().map(|p| p["up"].as_bool().unwrap_or(false)).collect())
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for (id, _) in &self.lockds {
            let log = std::fs::read_to_string(self.dir.join(format!("lockd-{id}.log"))).unwrap_or_default();
            s.push_str(&format!("---- lockd {id} ----\n{log}\n"));
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Starts lockd for `ids` of a fresh cluster in `dir` and waits until they are all
/// connected; retries with new ports if a port was taken meanwhile.
fn start_cluster(dir: &Path, ids: &[u32]) -> Cluster {
    start_cluster_with(dir, ids, "heartbeat_ms = 100\nlease_ms = 1000")
}

/// Short timings for the recovery tests: a dead node is declared dead after 700 ms.
/// (The loopback timings of docs/config.md, 50/250 ms, work too, but a CI machine
/// that starves a process for a quarter second would fence it spuriously.)
const TIGHT: &str = "heartbeat_ms = 100\nlease_ms = 500";

fn start_cluster_with(dir: &Path, ids: &[u32], timing: &str) -> Cluster {
    start_cluster_full(dir, ids, timing, "")
}

/// [`start_cluster_with`] with more `[runtime]` lines.
fn start_cluster_full(dir: &Path, ids: &[u32], timing: &str, runtime: &str) -> Cluster {
    for attempt in 0.. {
        let ports: Vec<(u32, u16)> = ids.iter().map(|id| (*id, free_port())).collect();
        let mut c = Cluster::create_full(&dir.join(format!("try{attempt}")), "alpha", ids, &ports, timing, runtime);
        for id in ids {
            c.start(*id);
        }
        let start = Instant::now();
        let ready = loop {
            if !c.all_running() || start.elapsed() > Duration::from_secs(20) {
                break false;
            }
            if ids.iter().all(|id| c.peers_up(*id).is_some_and(|v| v.iter().all(|u| *u))) {
                break true;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if ready {
            return c;
        }
        assert!(attempt < 3, "cluster did not come up:\n{}", c.logs());
    }
    unreachable!()
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

#[test]
fn dlm_exec_from_three_nodes_excludes_each_other() {
    let tmp = tmpdir();
    let c = start_cluster(tmp.path(), &[1, 2, 3]);
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("counter"), "0\n").unwrap();
    // Detects two holders at once: the busy marker must not exist on entry.
    let script = "if [ -e busy ]; then echo overlap >> overlaps; fi; touch busy; v=$(cat counter); \
                  sleep 0.005; echo $((v+1)) > counter; rm busy";
    const ROUNDS: usize = 15;
    std::thread::scope(|s| {
        for node in 1..=3u32 {
            let c = &c;
            let work = &work;
            s.spawn(move || {
                for _ in 0..ROUNDS {
                    let o = c
                        .dlm_cmd(node, &["exec", "shared", "counter", "--", "sh", "-c", script])
                        .current_dir(work)
                        .output()
                        .unwrap();
                    assert!(o.status.success(), "dlm exec on node {node}: {}", text(&o));
                }
            });
        }
    });
    let count: usize = std::fs::read_to_string(work.join("counter")).unwrap().trim().parse().unwrap();
    assert!(!work.join("overlaps").exists(), "two holders of an EX lock at once");
    assert_eq!(count, 3 * ROUNDS, "increments were lost: mutual exclusion failed");
    // The exit status of the command is passed through.
    let o = c.dlm(2, &["exec", "shared", "counter", "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
}

#[test]
fn nowait_is_busy_lockdump_shows_holders_and_a_killed_client_loses_its_lock() {
    let tmp = tmpdir();
    let c = start_cluster(tmp.path(), &[1, 2, 3]);
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    // Node 1 holds EX (and masters the resource: it asked first).
    let holder = Proc(
        c.dlm_cmd(1, &["exec", "fs1", "held", "--", "sh", "-c", "touch holding; sleep 60"])
            .current_dir(&work)
            .spawn()
            .unwrap(),
    );
    wait_for("node 1 to hold the lock", Duration::from_secs(10), || work.join("holding").exists());

    let o = c.dlm(2, &["exec", "--nowait", "fs1", "held", "--", "touch", "should-not-run"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("busy"), "{}", text(&o));
    assert!(!work.join("should-not-run").exists());
    let o = c.dlm(3, &["exec", "--nowait", "--mode", "PR", "fs1", "held", "--", "true"]);
    assert_eq!(o.status.code(), Some(1), "PR beside EX: {}", text(&o));

    // A waiter on node 3 queues behind the holder.
    let waiter =
        Proc(c.dlm_cmd(3, &["exec", "fs1", "held", "--", "touch", "node3-ran"]).current_dir(&work).spawn().unwrap());
    let mut dump = String::new();
    wait_for("the lockdump to show holder and waiter", Duration::from_secs(10), || {
        dump = ok(&["dlm", "--config", c.config.to_str().unwrap(), "--node", "1", "lockdump", "fs1"]);
        dump.contains("Waiting") && dump.contains("rq EX node 3")
    });
    assert!(dump.contains("Resource \"held\" master 1"), "{dump}");
    assert!(dump.contains("gr EX rq IV node 1 master 1"), "{dump}");
    let dump3 = c.dlm(3, &["lockdump"]);
    assert!(text(&dump3).contains("Resource \"held\" master 1"), "{}", text(&dump3));

    // kill -9 the holding client: lockd unlocks for it, node 3's waiter runs.
    let mut holder = holder;
    holder.0.kill().unwrap();
    holder.0.wait().unwrap();
    wait_for("node 3 to get the lock", Duration::from_secs(10), || work.join("node3-ran").exists());
    drop(waiter);
    let o = c.dlm(2, &["exec", "--nowait", "fs1", "held", "--", "true"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

#[test]
fn a_node_with_a_foreign_certificate_is_refused_and_the_others_carry_on() {
    let tmp = tmpdir();
    // The cluster is nodes 2, 3, 4; the intruder claims id 1 (so that it dials all of
    // them) with a certificate from its own CA.
    let c = start_cluster(tmp.path(), &[2, 3, 4]);
    let cfg = std::fs::read_to_string(&c.config).unwrap();
    let mut ports: Vec<(u32, u16)> = vec![(1, free_port())];
    for id in [2u32, 3, 4] {
        let key = format!("id = {id}\nname = \"n{id}\"\naddr = \"127.0.0.1:");
        let at = cfg.find(&key).unwrap() + key.len();
        let port: u16 = cfg[at..].split('"').next().unwrap().parse().unwrap();
        ports.push((id, port));
    }
    let mut intruder = Cluster::create(&tmp.path().join("intruder"), "alpha", &[1], &ports);
    intruder.start(1);
    wait_for("the intruder's lockd", Duration::from_secs(10), || intruder.status(1).is_some());
    std::thread::sleep(Duration::from_millis(1500));
    let up = intruder.peers_up(1).unwrap();
    assert!(up.iter().all(|u| !u), "a peer accepted a foreign certificate: {up:?}");
    wait_for("the cluster to count refused connections", Duration::from_secs(10), || {
        [2, 3, 4].iter().any(|id| c.status(*id).is_some_and(|s| s["connections_refused"].as_u64() > Some(0)))
    });
    for id in [2, 3, 4] {
        assert_eq!(c.peers_up(id).unwrap(), vec![true, true], "node {id} lost a legitimate peer");
    }
    // The intruder cannot get a lock whose directory is on another node.
    let members = [1u32, 2, 3, 4];
    let name = (0..).map(|i| format!("r{i}")).find(|n| directory_node(&members, n.as_bytes()) != 1).unwrap();
    let mut attempt = Proc(
        intruder
            .dlm_cmd(1, &["exec", "--nowait", "fs1", &name, "--", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_secs(2));
    let st = attempt.0.try_wait().unwrap();
    assert!(!st.is_some_and(|s| s.success()), "the intruder got a cluster lock");
    // The three others keep working, on the same name.
    for id in [2, 3, 4] {
        let o = c.dlm(id, &["exec", "--nowait", "fs1", &name, "--", "true"]);
        assert!(o.status.success(), "node {id}: {}", text(&o));
    }
    drop(intruder);
}

/// Node 3 takes lock `name` of lockspace "shared" (its command touches `holding` in
/// `work` and sleeps), then node 1 runs `waiter` (in `work`) under the same lock, so
/// it waits. Returns both `dlm exec` processes.
fn node3_holds_node1_waits(c: &Cluster, work: &Path, name: &str, waiter: &str) -> (Proc, Proc) {
    let holder = Proc(
        c.dlm_cmd(3, &["exec", "shared", name, "--", "sh", "-c", "touch holding; sleep 60"])
            .current_dir(work)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("node 3 to hold the lock", Duration::from_secs(20), || work.join("holding").exists());
    let waiter =
        Proc(c.dlm_cmd(1, &["exec", "shared", name, "--", "sh", "-c", waiter]).current_dir(work).spawn().unwrap());
    (holder, waiter)
}

/// `generation`, `members` and `slots` of lockspace `ls` in node `id`'s status.
fn view(c: &Cluster, id: u32, ls: &str) -> Option<(u64, Vec<u64>, serde_json::Value)> {
    let o = c.dlm(id, &["status", "--json", "--lockspace", ls]);
    if !o.status.success() {
        return None;
    }
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
    st.get("lockspace")?;
    let members = st["members"].as_array()?.iter().filter_map(|m| m.as_u64()).collect();
    Some((st["generation"].as_u64()?, members, st["slots"].clone()))
}

/// Loops of `dlm exec` on every node increment a shared counter under an EX lock;
/// node 3 holds another lock that node 1 waits for; `kill -9` of node 3's lockd:
/// the survivors agree on a new view without it, grant its locks to the waiters,
/// and the loops on nodes 1 and 2 go on with mutual exclusion intact. Restarted,
/// node 3 joins again in a newer generation.
#[test]
fn a_killed_lockd_is_recovered_by_the_survivors_and_rejoins() {
    let tmp = tmpdir();
    // CONCORD_RECOVERY_TIMING="" measures with the default timings, and
    // CONCORD_RECOVERY_TIMING='heartbeat_ms = 50\nlease_ms = 250' with the loopback
    // ones (by hand: the recovery time is printed; docs/PERFORMANCE.md).
    // The default here is TIGHT with a 1.5 s lease: on a loaded 2-CPU machine (CI) a
    // 500 ms lease sometimes ran out on the survivors too, and they fenced themselves.
    let timing =
        std::env::var("CONCORD_RECOVERY_TIMING").unwrap_or_else(|_| "heartbeat_ms = 100\nlease_ms = 1500".to_string());
    let mut c = start_cluster_with(tmp.path(), &[1, 2, 3], &timing.replace("\\n", "\n"));
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("counter"), "0\n").unwrap();
    // Node 3 holds "held" (and masters it: it asked first); node 1 waits for it.
    let (holder, waiter) = node3_holds_node1_waits(&c, &work, "held", "date +%s%N > got-held");
    // Each holder marks the critical section with its node; a marker found on
    // entry is an overlap, unless it is node 3's, left by a run killed with its lockd.
    // The counter is replaced by a rename: node 3's `dlm exec` kills its command when
    // its lockd dies, and a kill between a truncating `>` and its write would leave an
    // empty counter that the next holder reads as 0.
    let script = "for f in busy.*; do [ -e \"$f\" ] && echo \"$f\" >> overlaps; done; touch busy.$NODE; \
                  v=$(cat counter); sleep 0.002; echo $((v+1)) > counter.$NODE; mv counter.$NODE counter; \
                  rm busy.$NODE";
    let stop = std::sync::atomic::AtomicBool::new(false);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let pid3 = c.lockds.iter().find(|(n, _)| *n == 3).unwrap().1 .0.id();
    let (killed_at, recovered_ms, before) = std::thread::scope(|s| {
        for node in 1..=3u32 {
            let (c, work, stop, done) = (&c, &work, &stop, &done);
            s.spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let o = c
                        .dlm_cmd(node, &["exec", "shared", "counter", "--", "sh", "-c", script])
                        .current_dir(work)
                        .env("NODE", node.to_string())
                        .output()
                        .unwrap();
                    if o.status.success() {
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    } else {
                        // Only node 3's runs may fail: its lockd is gone.
                        assert_eq!(node, 3, "dlm exec on node {node}: {}", text(&o));
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            });
        }
        wait_for("all three in the view", Duration::from_secs(20), || {
            [1, 2, 3].iter().all(|id| view(&c, *id, "shared").is_some_and(|v| v.1 == vec![1, 2, 3]))
        });
        let before = view(&c, 1, "shared").unwrap().0;
        std::thread::sleep(Duration::from_millis(300));
        let killed_at = std::time::SystemTime::now();
        let k = Command::new("kill").args(["-9", &pid3.to_string()]).status().unwrap();
        assert!(k.success());
        let start = Instant::now();
        wait_for("node 1's waiter to get node 3's lock", Duration::from_secs(20), || work.join("got-held").exists());
        let recovered = start.elapsed();
        std::thread::sleep(Duration::from_millis(700));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (killed_at, recovered, before)
    });
    c.kill(3);
    drop(holder);
    drop(waiter);
    let got: u128 = std::fs::read_to_string(work.join("got-held")).unwrap().trim().parse().unwrap();
    let kill_ns = killed_at.duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    eprintln!(
        "recovery: kill -9 to the waiter's grant {} ms (seen by the test after {} ms)",
        got.saturating_sub(kill_ns) / 1_000_000,
        recovered_ms.as_millis()
    );
    let count: usize = std::fs::read_to_string(work.join("counter")).unwrap().trim().parse().unwrap();
    let overlaps = std::fs::read_to_string(work.join("overlaps")).unwrap_or_default();
    let stale3 = work.join("busy.3").exists();
    for o in overlaps.lines() {
        assert!(o == "busy.3" && stale3, "two holders of an EX lock at once: {o} (node 3's marker left: {stale3})");
    }
    // A run on node 3 may have incremented and then lost its lockd before it could
    // report success: at most one such run.
    let ok_runs = done.load(std::sync::atomic::Ordering::Relaxed);
    assert!(count == ok_runs || count == ok_runs + 1, "count {count}, successful runs {ok_runs}");
    // The survivors agree on the new view: same generation, members 1 and 2, same slots.
    let mut v1 = None;
    wait_for("the survivors to agree on a view without node 3", Duration::from_secs(10), || {
        v1 = view(&c, 1, "shared");
        let v2 = view(&c, 2, "shared");
        v1.as_ref().is_some_and(|v| v.1 == vec![1, 2]) && v1 == v2
    });
    let (gen_after, _, slots) = v1.unwrap();
    assert!(gen_after > before, "generation {gen_after} after {before}");
    assert!(slots.get("3").is_none() && slots.get("1").is_some(), "{slots}");
    // Node 3 comes back in a newer generation.
    c.start(3);
    wait_for("node 3 to serve a lock again", Duration::from_secs(20), || {
        c.dlm(3, &["exec", "--nowait", "shared", "again", "--", "true"]).status.success()
    });
    let (gen_back, members, _) = view(&c, 3, "shared").unwrap();
    assert!(gen_back > gen_after && members.contains(&3), "generation {gen_back}, members {members:?}");
}

/// Node 3 is cut off from the others (the transport's fault switch, both ways):
/// it loses its lease and fences itself (its `dlm exec` command is killed), the
/// majority declares it dead and grants its lock to a waiter; healed, it rejoins
/// as a new incarnation.
#[test]
fn a_partitioned_lockd_fences_itself_and_the_majority_goes_on() {
    let tmp = tmpdir();
    let c = start_cluster_with(tmp.path(), &[1, 2, 3], TIGHT);
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (mut holder, waiter) = node3_holds_node1_waits(&c, &work, "p3", "touch node1-ran");
    // Node 2 takes part in the lockspace too.
    let _member2 = Proc(
        c.dlm_cmd(2, &["exec", "shared", "keep2", "--", "sh", "-c", "touch holding2; sleep 60"])
            .current_dir(&work)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("all three in the view", Duration::from_secs(20), || {
        [1, 2, 3].iter().all(|id| view(&c, *id, "shared").is_some_and(|v| v.1 == vec![1, 2, 3]))
    });
    // Node 3 also waits for node 2's lock: a request still waiting when its node
    // leaves the lockspace must fail, not wait forever.
    wait_for("node 2 to hold keep2", Duration::from_secs(10), || work.join("holding2").exists());
    let mut waiter3 = Proc(
        c.dlm_cmd(3, &["exec", "shared", "keep2", "--", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("node 3's request for keep2 to wait", Duration::from_secs(10), || {
        text(&c.dlm(2, &["lockdump", "shared"])).contains("rq EX node 3")
    });
    let inc3 = c.status(3).unwrap()["incarnation"].as_u64().unwrap();
    assert!(c.dlm(3, &["fault", "--cut", "1,2"]).status.success());
    assert!(c.dlm(1, &["fault", "--cut", "3"]).status.success());
    assert!(c.dlm(2, &["fault", "--cut", "3"]).status.success());
    wait_for("node 3 to fence itself", Duration::from_secs(10), || {
        c.status(3).is_some_and(|s| s["fenced"] == serde_json::json!(true) && s["quorate"] == serde_json::json!(false))
    });
    // Its command was killed: the lock it held is no longer its.
    wait_for("node 3's dlm exec to end", Duration::from_secs(10), || holder.0.try_wait().unwrap().is_some());
    assert!(!holder.0.try_wait().unwrap().unwrap().success());
    wait_for("node 3's waiting dlm exec to fail", Duration::from_secs(10), || waiter3.0.try_wait().unwrap().is_some());
    assert!(!waiter3.0.try_wait().unwrap().unwrap().success());
    wait_for("node 1's waiter to run", Duration::from_secs(10), || work.join("node1-ran").exists());
    let v1 = view(&c, 1, "shared").unwrap();
    assert_eq!(v1.1, vec![1, 2]);
    assert_eq!(Some(v1.clone()), view(&c, 2, "shared"));
    // The majority keeps serving.
    assert!(c.dlm(2, &["exec", "--nowait", "shared", "p3", "--", "true"]).status.success());
    // Healed, node 3 rejoins as a new incarnation and serves again.
    for id in [1, 2, 3] {
        assert!(c.dlm(id, &["fault", "--heal"]).status.success());
    }
    wait_for("node 3 to serve a lock again", Duration::from_secs(20), || {
        c.dlm(3, &["exec", "--nowait", "shared", "after", "--", "true"]).status.success()
    });
    let st3 = c.status(3).unwrap();
    assert_eq!(st3["fenced"], serde_json::json!(false));
    assert_ne!(st3["incarnation"].as_u64().unwrap(), inc3, "a fenced node comes back as a new incarnation");
    drop(waiter);
}

/// A node serves locks only while it holds a lease, from its start on. With a long
/// start-up quiet period (`dead_after_ms = 4000`: for 4 s after its start no node acks
/// heartbeats) no node holds a lease at first, so node 3's lock must wait for its
/// lease; cut off right after the grant, node 3 fences itself. (Before the fix, node 3
/// was up in the cluster and granted the lock within a second, without a lease; cut
/// off, it never fenced itself, as only the loss of a lease it had held fenced it.)
#[test]
fn a_node_serves_locks_only_once_it_holds_a_lease() {
    let tmp = tmpdir();
    let c = start_cluster_with(tmp.path(), &[1, 2, 3], "heartbeat_ms = 100\nlease_ms = 500\ndead_after_ms = 4000");
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mut holder = Proc(
        c.dlm_cmd(3, &["exec", "shared", "early", "--", "sh", "-c", "touch holding; sleep 60"])
            .current_dir(&work)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("node 3 to hold the lock", Duration::from_secs(30), || work.join("holding").exists());
    let st = c.status(3).unwrap();
    assert!(st["lease_left_ms"].is_u64(), "node 3 serves a lock without a lease: {st}");
    assert!(c.dlm(3, &["fault", "--cut", "1,2"]).status.success());
    assert!(c.dlm(1, &["fault", "--cut", "3"]).status.success());
    assert!(c.dlm(2, &["fault", "--cut", "3"]).status.success());
    wait_for("node 3 to fence itself", Duration::from_secs(10), || {
        c.status(3).is_some_and(|s| s["fenced"] == serde_json::json!(true))
    });
    wait_for("node 3's dlm exec to end", Duration::from_secs(10), || holder.0.try_wait().unwrap().is_some());
    assert!(!holder.0.try_wait().unwrap().unwrap().success());
}

/// With `[fence] cmd`, the survivors run it before they recover a dead node: while it
/// fails, recovery waits and the log says so; once it succeeds, the dead node's lock
/// goes to the waiter. The command gets the node's id, name and address.
#[test]
fn recovery_waits_for_the_fence_command_to_succeed() {
    let tmp = tmpdir();
    let flag = tmp.path().join("fence-ok");
    let record = tmp.path().join("fenced");
    let timing = format!(
        "{TIGHT}\n\n[fence]\ncmd = \"test -e '{}' && echo {{id}} {{name}} {{addr}} >> '{}'\"",
        flag.display(),
        record.display()
    );
    let mut c = start_cluster_with(tmp.path(), &[1, 2, 3], &timing);
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let (holder, waiter) = node3_holds_node1_waits(&c, &work, "f", "touch node1-ran");
    wait_for("nodes 1 and 3 in the view", Duration::from_secs(20), || {
        view(&c, 1, "shared").is_some_and(|v| v.1 == vec![1, 3])
    });
    c.kill(3);
    wait_for("the failed fence command in the log", Duration::from_secs(10), || {
        c.logs().contains("fence command failed")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!work.join("node1-ran").exists(), "recovered before the fence command succeeded");
    std::fs::write(&flag, "").unwrap();
    wait_for("node 1's waiter to run", Duration::from_secs(10), || work.join("node1-ran").exists());
    let fenced = std::fs::read_to_string(&record).unwrap();
    assert!(fenced.starts_with("3 n3 127.0.0.1:"), "{fenced}");
    drop(holder);
    drop(waiter);
}

/// The unprivileged user the access tests run commands as (only its number is used; CI
/// and the development machine have a user `tests` with it).
const USER: u32 = 1500;
/// A group nobody is in, as `[runtime] client_group` (a number needs no /etc/group entry).
const GROUP: u32 = 4242;

/// `cmd` to be run as uid [`USER`] with primary group `gid` and supplementary `groups`
/// (std's `CommandExt::uid` would drop every supplementary group, so all three are set
/// here, in that order, while still root).
fn as_user(cmd: &mut Command, gid: u32, groups: &[u32]) -> Output {
    use std::os::unix::process::CommandExt;
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: setgroups, setgid and setuid are async-signal-safe, and `groups` was
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 || libc::setgid(gid) != 0 || libc::setuid(USER) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null()).output().expect("run concord as the test user")
}

fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Whether this test runs as root (it must, to run commands as another user);
/// otherwise reports the skip.
fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        concord_journal::skip_test(test, "needs root, to run commands as another user");
    }
    root
}

/// lockd serves root and the members of `[runtime] client_group` only: its socket's
/// mode refuses the others at connect, and so do its checks of the peer's credentials
/// when the mode is opened wider by hand; both refusals say why. A member is let in by
/// its primary group or by a supplementary one.
#[test]
fn only_root_and_the_client_group_may_use_lockd() {
    use std::os::unix::fs::MetadataExt;
    if !root("only_root_and_the_client_group_may_use_lockd") {
        return;
    }
    // Where the test user reads the configuration, reaches the socket's folder and runs
    // its own copy of the binary: outside the checkout, whose folders (a clone in a
    // `mktemp -d` folder, or in /root) the test user may not pass through.
    let tmp = tempfile::Builder::new().prefix("dlmu").tempdir_in(std::env::temp_dir()).unwrap();
    chmod(tmp.path(), 0o755);
    let ubin = tmp.path().join("concord");
    std::fs::copy(BIN, &ubin).unwrap();
    chmod(&ubin, 0o755);
    let mut c = start_cluster(&tmp.path().join("root-only"), &[1]);
    let sock = c.dir.join("run/lockd-1.sock");
    assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o600);
    let o = as_user(&mut c.dlm_cmd_with(&ubin, 1, &["status"]), USER, &[]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains(&format!("permission denied connecting to {}: lockd accepts root only", sock.display())), "{t}");
    // A socket opened to everyone by hand still serves root only.
    chmod(&sock, 0o666);
    let o = as_user(&mut c.dlm_cmd_with(&ubin, 1, &["status"]), USER, &[]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(
        t.contains("lockd refused this client: uid 1500 is not root and not in the client group (none is configured"),
        "{t}"
    );
    let o = as_user(&mut c.dlm_cmd_with(&ubin, 1, &["exec", "ls", "r", "--", "true"]), USER, &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("lockd refused this client: uid 1500"), "{}", text(&o));
    assert!(c.logs().contains("refused a client on the socket"), "{}", c.logs());
    assert!(c.dlm(1, &["status"]).status.success(), "root is served");
    assert!(c.all_running());
    drop(c);

    let group = format!("client_group = \"{GROUP}\"");
    let c = start_cluster_full(&tmp.path().join("group"), &[1], "heartbeat_ms = 100\nlease_ms = 1000", &group);
    let sock = c.dir.join("run/lockd-1.sock");
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o660, GROUP));
    // A member by a supplementary group, and by its primary group.
    for (gid, groups) in [(USER, vec![GROUP]), (GROUP, vec![])] {
        let o = as_user(&mut c.dlm_cmd_with(&ubin, 1, &["status", "--json"]), gid, &groups);
        assert!(o.status.success(), "gid {gid} groups {groups:?}: {}", text(&o));
        let o = as_user(&mut c.dlm_cmd_with(&ubin, 1, &["exec", "ls", "r", "--", "true"]), gid, &groups);
        assert!(o.status.success(), "gid {gid} groups {groups:?}: {}", text(&o));
    }
    let o = as_user(&mut c.dlm_cmd_with(&ubin, 1, &["status"]), USER, &[7]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains(&format!("lockd accepts root and group {GROUP} only")), "{t}");
    chmod(&sock, 0o666);
    let o = as_user(&mut c.dlm_cmd_with(&ubin, 1, &["status"]), USER, &[7]);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains(&format!("lockd refused this client: uid 1500 is not root and not in group {GROUP}")), "{t}");
}

/// Forged and malformed frames on lockd's client socket (a real `concord lockd`) close
/// the connection that sent them and nothing else: another client holds a lock
/// throughout, takes and frees others between the forgeries, and lockd keeps running.
/// A well-formed unlock or convert of that client's lock from another connection is
/// refused (lock ids belong to their connection).
#[test]
fn forged_frames_on_the_client_socket_close_only_their_connection() {
    use concord_lockd::client::{Client, JoinKind};
    use concord_lockd::core::{Flags, Mode, Status};
    use concord_lockd::node::proto::{ClientFrame, ClientRequest, ErrorKind, ServerMsg, MAX_CLIENT_FRAME};
    use concord_lockd::transport::frame::{Frame, FrameKind, HEADER_LEN};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let tmp = tmpdir();
    let mut c = start_cluster(tmp.path(), &[1]);
    let sock = c.dir.join("run/lockd-1.sock");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let limit = Duration::from_secs(20);
    rt.block_on(async {
        let good = Client::connect(&sock).await.unwrap();
        let ls = tokio::time::timeout(limit, good.join("forged", JoinKind::Plain)).await.unwrap().unwrap();
        let held = ls.lock(b"held", Mode::EX, Flags::empty(), None).await.unwrap();
        assert_eq!(held.status, Status::Granted);

        let frame = |id, req| Frame::encode_value(FrameKind::Message, &ClientFrame { id, req }).unwrap();
        let hello = frame(1, ClientRequest::Hello { version: 1, name: "forger".into() });
        let mut huge = hello[..HEADER_LEN].to_vec();
        huge[4..8].copy_from_slice(&(MAX_CLIENT_FRAME as u32 + 1).to_le_bytes());
        let mut bad_crc = hello.clone();
        *bad_crc.last_mut().unwrap() ^= 0xff;
        let cut = hello[..HEADER_LEN + 2].to_vec();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("random bytes", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            ("a length over the limit (header only)", huge),
            ("a bad checksum", bad_crc),
            ("an undecodable payload", Frame::encode(FrameKind::Message, &[0xff; 9]).unwrap()),
            ("a ping instead of a message", Frame::encode_value(FrameKind::Ping, &7u64).unwrap()),
            ("a truncated frame, then garbage", [cut.clone(), vec![0xab; 64]].concat()),
            ("a valid hello, then garbage", [hello.clone(), b"garbage!".to_vec()].concat()),
        ];
        for (what, bytes) in &cases {
            let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
            s.write_all(bytes).await.unwrap();
            // lockd closes it (end of file, or a reset if our bytes were left unread).
            let mut got = Vec::new();
            let closed = tokio::time::timeout(limit, s.read_to_end(&mut got)).await;
            assert!(closed.is_ok(), "{what}: the connection was not closed");
            // The other client is served meanwhile.
            let name = format!("after {what}");
            let a = ls.lock(name.as_bytes(), Mode::EX, Flags::empty(), None).await.unwrap();
            assert_eq!(a.status, Status::Granted, "{what}");
            ls.unlock(a.lkid, None).await.unwrap();
        }
        // A frame cut short and a client that goes away.
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        s.write_all(&cut).await.unwrap();
        drop(s);

        // Well-formed requests on another connection for the good client's lock.
        let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
        let join = frame(2, ClientRequest::Join { name: "forged".into(), kind: JoinKind::Plain });
        s.write_all(&[hello.clone(), join].concat()).await.unwrap();
        let mut buf = Vec::new();
        let joined = loop {
            match next_msg(&mut s, &mut buf, limit).await {
                ServerMsg::Reply { id: 2, reply } => break reply,
                ServerMsg::Reply { id: 1, .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        };
        let concord_lockd::node::proto::Reply::Joined { ls: lsid, .. } = joined else { panic!("{joined:?}") };
        let forged = [
            frame(3, ClientRequest::Unlock { ls: lsid, lkid: held.lkid, lvb: None }),
            frame(
                4,
                ClientRequest::Convert { ls: lsid, lkid: held.lkid, mode: Mode::NL, flags: Flags::empty(), lvb: None },
            ),
        ];
        s.write_all(&forged.concat()).await.unwrap();
        for id in [3, 4] {
            match next_msg(&mut s, &mut buf, limit).await {
                ServerMsg::Error { id: got, error } if got == id => assert_eq!(error.kind, ErrorKind::UnknownLock),
                other => panic!("forged request {id} answered with {other:?}"),
            }
        }
        drop(s);
        // The lock is still held: another client cannot take it at once.
        let other = Client::connect(&sock).await.unwrap().join("forged", JoinKind::Plain).await.unwrap();
        assert_eq!(other.lock(b"held", Mode::EX, Flags::NOQUEUE, None).await.unwrap().status, Status::Again);
        ls.unlock(held.lkid, None).await.unwrap();
        let a = other.lock(b"held", Mode::EX, Flags::NOQUEUE, None).await.unwrap();
        assert_eq!(a.status, Status::Granted);
        // Only the two real clients are left.
        let start = Instant::now();
        loop {
            let n = good.status().await.unwrap().clients.len();
            if n == 2 {
                break;
            }
            assert!(start.elapsed() < limit, "{n} clients left, not 2");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    assert!(c.all_running(), "lockd died:\n{}", c.logs());
    let malformed = c.logs().matches("malformed frame from client").count();
    assert_eq!(malformed, 7, "{}", c.logs());
}

/// The next message lockd sends on a raw connection (`buf` holds what was read past it).
async fn next_msg(
    s: &mut tokio::net::UnixStream,
    buf: &mut Vec<u8>,
    limit: Duration,
) -> concord_lockd::node::proto::ServerMsg {
    use concord_lockd::transport::frame::{Frame, FrameKind};
    use tokio::io::AsyncReadExt;
    loop {
        if let Ok((f, n)) = Frame::decode(buf) {
            buf.drain(..n);
            return f.value_of(FrameKind::Message).unwrap();
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(limit, s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "lockd closed a well-formed connection");
        buf.extend_from_slice(&chunk[..n]);
    }
}
