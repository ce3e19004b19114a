//! The harness of the multi-node tests: real `concord lockd` and `concord mount`
//! processes of one cluster on loopback, sharing one image file.
//!
//! [`Cluster`] makes a CA and node certificates (`concord ca`), a cluster.toml on free
//! loopback ports and a `lock_dlm` image, starts the lockds and waits for their quorum,
//! and mounts nodes as foreground child processes,
//! each ready when it prints its ready line. Dropping it always stops everything, also
//! when the test panics: SIGTERM to every mount, then for a mount that does not stop,
//! the abort of its FUSE connection and SIGKILL, `umount -l` of anything still
//! mounted, SIGKILL to the lockds, and the removal of the temporary folder. A
//! watchdog does the same to the mounts if a test runs too long, so that a filesystem
//! request that hangs fails the test instead of hanging it. One cluster runs at a time
//! in a test binary (the tests take a lock), whatever `--test-threads` says.
//!
//! Crashes for the recovery tests: [`Cluster::kill_mount`] (`kill -9` of one mount
//! process, its dead FUSE mount detached), [`Cluster::crash`] (lockd and mount of some
//! nodes at once), [`Cluster::restart_lockds`] (on the same ports and state), and
//! [`wait_for_line`] in a process's log ([`Cluster::mount_log`]; a restarted process
//! logs to a new file, `mount-2.1.log`; a survivor's log holds every recovery it took
//! part in, so that a test of repeated kills takes a [`log_mark`] before each kill and
//! searches after it with [`wait_for_line_since`]). The lockds' fence command appends
//! the fenced node's id to a file ([`Cluster::fenced`]).
//!
//! `CONCORD_TEST_KEEP=1` keeps the folder (logs, image, config) for a post-mortem.
//!
//! The tests need root and /dev/fuse ([`can_mount`]); they find the `concord` binary
//! next to the test executable (`cargo build -p concord`, or `cargo test --workspace`,
//! which builds it for the bin crate's own tests).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a lockd quorum or a mount may take to get ready (a loaded 2-core CI machine
/// running debug builds is slow; nothing here waits this long when things work).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a mount may take to stop after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one test may run before the watchdog aborts its FUSE connections, unless
/// its [`Spec::deadline`] says otherwise (`CONCORD_TEST_DEADLINE_SECS` overrides both).
pub const TEST_DEADLINE: Duration = Duration::from_secs(180);

/// Lockd timings of the tests: nothing dies on purpose here, so the lease is long
/// enough that a starved process is never fenced, and short enough that a new lockd
/// (which waits `dead_after_ms`, 3.1 s with these) is up soon.
const TIMING: &str = "heartbeat_ms = 200\nlease_ms = 2500";

/// The `concord` binary beside the test executable (target/debug/concord).
pub fn concord_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir of the test executable");
    let bin = dir.join("concord");
    assert!(bin.exists(), "{} is missing: build it first: cargo build -p concord", bin.display());
    bin
}

/// Where the tests put their temporary folders: target/tmp (a real disk, where the
/// images can be opened with O_DIRECT, which tmpfs refuses).
pub fn tmp_base() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe.ancestors().nth(3).expect("target dir of the test executable");
    let base = target.join("tmp");
    std::fs::create_dir_all(&base).expect("create target/tmp");
    base
}

/// Whether this process can make FUSE mounts (root and /dev/fuse); otherwise reports
/// the skip with `concord_journal::skip_test` (a failure under CI).
pub fn can_mount(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        concord_journal::skip_test(test, "needs root");
        return false;
    }
    if !Path::new("/dev/fuse").exists() {
        concord_journal::skip_test(test, "no /dev/fuse");
        return false;
    }
    true
}

/// A `concord` command with the output collected.
pub fn concord(args: &[&str]) -> Output {
    Command::new(concord_bin()).args(args).output().expect("run concord")
}

/// stdout and stderr of `o`, for messages.
pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Runs `cmd`, killing it (and detaching `mnt`) if it has not exited after `timeout`:
/// for a command that must be refused but, if the feature breaks, would mount and
/// serve forever.
pub fn output_within(cmd: &mut Command, timeout: Duration, mnt: Option<&Path>) -> Output {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let (out, err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let read_all = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let (out, err) = (read_all(Box::new(out)), read_all(Box::new(err)));
    let start = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait") {
            break st;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let st = child.wait().expect("wait");
            if let Some(m) = mnt {
                detach(m);
            }
            panic!("{:?} did not exit within {timeout:?} ({st})", cmd);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// A hash of a whole file (to show that a refused command wrote nothing).
pub fn file_hash(p: &Path) -> u64 {
    use std::hash::Hasher;
    use std::io::Read;
    let mut f = std::fs::File::open(p).expect("open image");
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read image");
        if n == 0 {
            return h.finish();
        }
        h.write(&buf[..n]);
    }
}

/// A free UDP port on loopback (bound, then released; a clash is retried by
/// [`Cluster::start_lockds`]).
fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One cluster at a time per test binary.
static SERIAL: Mutex<()> = Mutex::new(());

/// Options of [`Cluster::new`].
#[derive(Debug, Clone)]
pub struct Spec {
    /// Nodes in the configuration (ids 1..=nodes).
    pub nodes: u32,
    /// `[cluster] name` of the configuration.
    pub cluster: String,
    /// Lock table of the image (`mkfs -t`).
    pub table: String,
    /// Journals of the image (`mkfs -j`).
    pub journals: u32,
    /// Image size (`mkfs --size`).
    pub size: String,
    /// How long the test may run before the watchdog stops its mounts
    /// ([`TEST_DEADLINE`]; `CONCORD_TEST_DEADLINE_SECS` overrides it): a test whose
    /// length is configurable (kill cycles) sets it from that length.
    pub deadline: Duration,
}

impl Spec {
    /// `nodes` nodes of cluster "tc", an image of 256 MiB with 3 journals and lock
    /// table tc:fs1.
    pub fn nodes(nodes: u32) -> Spec {
        Spec {
            nodes,
            cluster: "tc".into(),
            table: "tc:fs1".into(),
            journals: 3,
            size: "256M".into(),
            deadline: TEST_DEADLINE,
        }
    }
}

/// A child process and the log file its stderr goes to.
struct Proc {
    child: Child,
    log: PathBuf,
}

/// A running `concord mount` of one node.
struct Mount {
    node: u32,
    mnt: PathBuf,
    proc: Proc,
}

/// What the watchdog needs to stop the mounts of a test that hangs.
#[derive(Default)]
struct Live {
    /// (pid, mount point) of every mount process not yet reaped.
    mounts: Vec<(u32, PathBuf)>,
}

/// A cluster of lockd and mount processes in a temporary folder; see the module doc.
pub struct Cluster {
    pub spec: Spec,
    dir: tempfile::TempDir,
    /// The lockds' runtime folder (their sockets): a short path in the system's temp
    /// folder, since a unix socket path holds at most 107 bytes and `dir` sits below
    /// the checkout, whose path can be long.
    run: tempfile::TempDir,
    pub config: PathBuf,
    pub image: PathBuf,
    /// What `mount` and `fsck` are given instead of [`Cluster::image`] (an `nbd://`
    /// URL serving it): see [`Cluster::use_device`].
    device: Option<String>,
    lockds: Vec<(u32, Proc)>,
    mounts: Vec<Mount>,
    /// The log of each process started so far, by (kind, node): a restarted process
    /// logs to a new file, so that the earlier one's log stays for a post-mortem.
    started: std::collections::BTreeMap<(&'static str, u32), (u32, PathBuf)>,
    live: Arc<Mutex<Live>>,
    watchdog: Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Writes certificates, cluster.toml and the image (`mkfs -p lock_dlm`); starts no
    /// process. `test` names the test in the watchdog's message.
    pub fn new(test: &str, spec: Spec) -> Cluster {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = tempfile::Builder::new().prefix(&format!("{test}-")).tempdir_in(tmp_base()).unwrap();
        let tls = dir.path().join("tls");
        let tls_s = tls.to_str().unwrap();
        ok(&["ca", "init", tls_s, "--cluster", &spec.cluster]);
        for id in 1..=spec.nodes {
            ok(&["ca", "issue", tls_s, "--node", &id.to_string()]);
        }
        let image = dir.path().join("shared.img");
        let mut c = Cluster {
            config: dir.path().join("cluster.toml"),
            image,
            device: None,
            dir,
            run: tempfile::Builder::new().prefix("cc").tempdir_in(std::env::temp_dir()).unwrap(),
            lockds: Vec::new(),
            mounts: Vec::new(),
            started: Default::default(),
            live: Arc::default(),
            watchdog: None,
            spec,
            _serial: serial,
        };
        c.write_config();
        ok(&[
            "mkfs",
            "-j",
            &c.spec.journals.to_string(),
            "-p",
            "lock_dlm",
            "-t",
            &c.spec.table,
            "--size",
            &c.spec.size,
            c.image.to_str().unwrap(),
        ]);
        for id in 1..=c.spec.nodes {
            std::fs::create_dir(c.mnt(id)).unwrap();
        }
        c.start_watchdog(test, c.spec.deadline);
        c
    }

    /// [`Cluster::new`], the lockds of every node and a mount on every node.
    pub fn up(test: &str, spec: Spec) -> Cluster {
        let mut c = Cluster::new(test, spec);
        c.start_lockds();
        let all: Vec<u32> = (1..=c.spec.nodes).collect();
        c.mount(&all);
        c
    }

    /// Node `id`'s lockd socket.
    pub fn lockd_socket(&self, id: u32) -> PathBuf {
        self.run.path().join(format!("lockd-{id}.sock"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Node `id`'s mount point (a folder that exists from the start).
    pub fn mnt(&self, id: u32) -> PathBuf {
        self.dir.path().join(format!("mnt{id}"))
    }

    /// The file the lockds' fence command appends a fenced node's id to (one line per
    /// fence; see [`Cluster::fenced`]).
    pub fn fence_record(&self) -> PathBuf {
        self.dir.path().join("fenced")
    }

    fn write_config(&self) {
        let mut text = format!(
            "[cluster]\nname = \"{}\"\n\n[tls]\ndir = \"tls\"\n\n[timing]\n{TIMING}\n\n[fence]\ncmd = \"echo {{id}} >> \
             '{}'\"\n\n[runtime]\ndir = \"{}\"\nstate_dir = \"state\"\n",
            self.spec.cluster,
            self.fence_record().display(),
            self.run.path().display()
        );
        for id in 1..=self.spec.nodes {
            text.push_str(&format!("\n[[node]]\nid = {id}\nname = \"n{id}\"\naddr = \"127.0.0.1:{}\"\n", free_port()));
        }
        std::fs::write(&self.config, text).unwrap();
    }

    /// Starts every node's lockd and waits until each one is quorate with all nodes
    /// live; starts over on new ports if one of them exits (a port taken meanwhile).
    pub fn start_lockds(&mut self) {
        for attempt in 0.. {
            for id in 1..=self.spec.nodes {
                self.spawn_lockd(id);
            }
            let start = Instant::now();
            let up = loop {
                if self.lockds.iter_mut().any(|(_, p)| !matches!(p.child.try_wait(), Ok(None))) {
                    break false;
                }
                if (1..=self.spec.nodes).all(|id| self.quorate(id)) {
                    break true;
                }
                assert!(
                    start.elapsed() < READY_TIMEOUT,
                    "the lockds did not reach a quorum in {READY_TIMEOUT:?}\n{}",
                    self.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            };
            if up {
                return;
            }
            assert!(attempt < 3, "the lockds did not start:\n{}", self.logs());
            self.kill_lockds();
            for e in std::fs::read_dir(self.run.path()).into_iter().flatten().flatten() {
                std::fs::remove_file(e.path()).ok();
            }
            std::fs::remove_dir_all(self.dir.path().join("state")).ok();
            self.write_config();
        }
    }

    /// Whether node `id`'s lockd says it is quorate with every node live.
    fn quorate(&self, id: u32) -> bool {
        let o =
            concord(&["dlm", "--config", self.config.to_str().unwrap(), "--node", &id.to_string(), "status", "--json"]);
        if !o.status.success() {
            return false;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&o.stdout) else { return false };
        let live = v["live_nodes"].as_array().map_or(0, |a| a.len());
        v["quorate"] == serde_json::json!(true) && live == self.spec.nodes as usize
    }

    /// `concord mount --config CFG --node N DEVICE MNT` (the image, or
    /// [`Cluster::use_device`]'s) with `extra` arguments, as a command to run by hand
    /// (refusal tests).
    pub fn mount_cmd(&self, id: u32, extra: &[&str]) -> Command {
        let mut cmd = Command::new(concord_bin());
        cmd.arg("mount")
            .args(["--config", self.config.to_str().unwrap(), "--node", &id.to_string()])
            .arg(self.device())
            .arg(self.mnt(id))
            .args(extra)
            .env("NO_COLOR", "1");
        cmd
    }

    /// Mounts nodes `ids` (all started at once) and waits for each ready line.
    pub fn mount(&mut self, ids: &[u32]) {
        for &id in ids {
            assert!(!self.mounts.iter().any(|m| m.node == id), "node {id} is mounted already");
        }
        let starts: Vec<Starting> = ids.iter().map(|&id| self.mount_start(id)).collect();
        let deadline = Instant::now() + READY_TIMEOUT;
        for s in starts {
            self.finish_by(s, deadline);
        }
    }

    /// Starts node `id`'s mount and returns without waiting for it: a test that checks
    /// what a mount does while it waits (for a recovery) looks at its log and at
    /// [`Starting::ready`], then calls [`Cluster::mount_finish`]. The process is the
    /// cluster's from the start (stopped with the others when the cluster is dropped).
    pub fn mount_start(&mut self, id: u32) -> Starting {
        assert!(!self.mounts.iter().any(|m| m.node == id), "node {id} is mounted already");
        let log = self.next_log("mount", id);
        let mut cmd = self.mount_cmd(id, &[]);
        let mut child = spawn_logged(&mut cmd, &log, libc::SIGTERM, Stdio::piped());
        let rx = ready_line(&mut child);
        self.live.lock().unwrap().mounts.push((child.id(), self.mnt(id)));
        self.mounts.push(Mount { node: id, mnt: self.mnt(id), proc: Proc { child, log } });
        Starting { id, rx, line: None }
    }

    /// Waits for the ready line of a mount started by [`Cluster::mount_start`].
    pub fn mount_finish(&mut self, s: Starting) {
        self.finish_by(s, Instant::now() + READY_TIMEOUT);
    }

    /// Waits until `deadline` for the ready line of a started mount.
    fn finish_by(&mut self, mut s: Starting, deadline: Instant) {
        let line = match s.line.take() {
            Some(l) => Ok(l),
            None => s.rx.recv_timeout(deadline.saturating_duration_since(Instant::now())),
        };
        match line {
            Ok(line) if line.contains("mounted on") => {}
            Ok(line) => panic!("the mount of node {} ended without its ready line ({line:?})\n{}", s.id, self.logs()),
            Err(_) => panic!("the mount of node {} was not ready in {READY_TIMEOUT:?}\n{}", s.id, self.logs()),
        }
    }

    /// Unmounts node `id` with SIGTERM and waits for its process: it must exit 0 and
    /// say that it unmounted cleanly.
    pub fn unmount(&mut self, id: u32) {
        self.unmount_all_of(&[id]);
    }

    /// Unmounts every mounted node at once (SIGTERM to all, then waits for all).
    pub fn unmount_all(&mut self) {
        let ids: Vec<u32> = self.mounts.iter().map(|m| m.node).collect();
        self.unmount_all_of(&ids);
    }

    fn unmount_all_of(&mut self, ids: &[u32]) {
        for m in self.mounts.iter().filter(|m| ids.contains(&m.node)) {
            // SAFETY: kill(2) on a child process of ours that has not been reaped.
            unsafe { libc::kill(m.proc.child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut failures = Vec::new();
        for &id in ids {
            let i = self.mounts.iter().position(|m| m.node == id).expect("node is mounted");
            let st = loop {
                if let Some(st) = self.mounts[i].proc.child.try_wait().expect("wait") {
                    break Some(st);
                }
                if Instant::now() > deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            let log = std::fs::read_to_string(&self.mounts[i].proc.log).unwrap_or_default();
            match st {
                None => failures.push(format!("node {id}: did not stop in {STOP_TIMEOUT:?} after SIGTERM")),
                Some(st) if !st.success() => failures.push(format!("node {id}: exited with {st}")),
                Some(_) if !log.contains("unmounted cleanly") => failures.push(format!("node {id}: no clean unmount")),
                Some(_) => {}
            }
            if st.is_some() {
                let m = self.mounts.remove(i);
                self.live.lock().unwrap().mounts.retain(|(pid, _)| *pid != m.proc.child.id());
                // A clean exit has unmounted; a failed one may leave the mount behind.
                if is_mounted(&m.mnt) {
                    detach(&m.mnt);
                    failures.push(format!("node {id}: still mounted after its process exited"));
                }
            }
        }
        assert!(failures.is_empty(), "unmount: {}\n{}", failures.join("; "), self.logs());
    }

    /// `concord fsck -n` of the image (or [`Cluster::use_device`]'s): (exit code, output).
    pub fn fsck(&self) -> (i32, String) {
        let o = concord(&["fsck", "-n", &self.device()]);
        (o.status.code().unwrap_or(-1), text(&o))
    }

    /// Mounts and fsck use `device` (e.g. `nbd://127.0.0.1:PORT/EXPORT`, a server of
    /// [`Cluster::image`]) instead of the image file from now on.
    pub fn use_device(&mut self, device: &str) {
        self.device = Some(device.to_string());
    }

    /// The device argument of mounts and fsck: [`Cluster::use_device`]'s, or the image.
    pub fn device(&self) -> String {
        self.device.clone().unwrap_or_else(|| self.image.to_str().unwrap().to_string())
    }

    /// The logs of every process, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            s.push_str(&format!("---- {} (last {} lines) ----\n{}\n", f.display(), tail.len(), tail.join("\n")));
        }
        s
    }

    fn start_watchdog(&mut self, test: &str, deadline: Duration) {
        let (tx, rx) = mpsc::channel::<()>();
        let live = self.live.clone();
        let test = test.to_string();
        let h = std::thread::spawn(move || {
            let deadline = std::env::var("CONCORD_TEST_DEADLINE_SECS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(deadline, Duration::from_secs);
            if rx.recv_timeout(deadline) != Err(mpsc::RecvTimeoutError::Timeout) {
                return;
            }
            eprintln!("watchdog: {test} ran longer than {deadline:?}: aborting its FUSE connections");
            let mounts = live.lock().unwrap().mounts.clone();
            for (pid, mnt) in mounts {
                abort_connection(&mnt);
                // SAFETY: kill(2) on a mount process of this test, listed until reaped.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        });
        self.watchdog = Some((tx, h));
    }

    fn kill_lockds(&mut self) {
        for (_, mut p) in self.lockds.drain(..) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    /// Stops whatever still runs: see the module doc.
    fn stop_everything(&mut self) {
        for m in &self.mounts {
            // SAFETY: kill(2) on a child process of ours that has not been reaped.
            unsafe { libc::kill(m.proc.child.id() as i32, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for m in &mut self.mounts {
            while matches!(m.proc.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for m in &mut self.mounts {
            if matches!(m.proc.child.try_wait(), Ok(None)) {
                eprintln!("node {}: the mount did not stop on SIGTERM: aborting its FUSE connection", m.node);
                abort_connection(&m.mnt);
                let _ = m.proc.child.kill();
            }
        }
        for m in self.mounts.drain(..) {
            let mut child = m.proc.child;
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if is_mounted(&m.mnt) {
                detach(&m.mnt);
            }
            self.live.lock().unwrap().mounts.retain(|(pid, _)| *pid != child.id());
            // Reaped only if it is gone: a process stuck in the kernel is left behind
            // rather than this test hanging on it.
            let _ = child.try_wait();
        }
        self.kill_lockds();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some((tx, h)) = self.watchdog.take() {
            let _ = tx.send(());
            let _ = h.join();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.stop_everything();
        if std::env::var_os("CONCORD_TEST_KEEP").is_some_and(|v| v == "1") {
            let dir = std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("temp dir"));
            eprintln!("kept {} (CONCORD_TEST_KEEP=1)", dir.keep().display());
        }
    }
}

fn ok(args: &[&str]) -> String {
    let o = concord(args);
    assert!(o.status.success(), "concord {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The first line `child` prints on its piped stdout, sent when it comes (an empty
/// line if it ends first); the rest is read to its end, so that the process never finds
/// its stdout closed.
fn ready_line(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    rx
}

/// A mount started by [`Cluster::mount_start`] that may not be ready yet.
pub struct Starting {
    id: u32,
    rx: mpsc::Receiver<String>,
    /// The first line of its stdout, once read.
    line: Option<String>,
}

impl Starting {
    /// Whether the mount printed its first line (the ready line, or an empty one if
    /// it exited without it), without waiting.
    pub fn printed(&mut self) -> bool {
        if self.line.is_none() {
            self.line = self.rx.try_recv().ok();
        }
        self.line.is_some()
    }
}

/// A single-node `concord mount` in the foreground, stopped (and detached) when
/// dropped.
pub struct Foreground {
    child: Option<Child>,
    mnt: PathBuf,
    log: PathBuf,
}

impl Foreground {
    /// Spawns `cmd` (a `concord mount` on `mnt`, stderr to `log`) and waits for its
    /// ready line.
    pub fn start(cmd: &mut Command, mnt: &Path, log: &Path) -> Foreground {
        let mut child = spawn_logged(cmd, log, libc::SIGTERM, Stdio::piped());
        let rx = ready_line(&mut child);
        let f = Foreground { child: Some(child), mnt: mnt.to_path_buf(), log: log.to_path_buf() };
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(line) if line.contains("mounted on") => f,
            other => {
                panic!("{cmd:?} did not get ready ({other:?}): {}", std::fs::read_to_string(&f.log).unwrap_or_default())
            }
        }
    }

    /// SIGTERM; the process must exit 0 having unmounted cleanly.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: kill(2) on our child, not yet reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        let st = loop {
            if let Some(st) = child.try_wait().expect("wait") {
                break st;
            }
            if start.elapsed() > STOP_TIMEOUT {
                self.child = Some(child);
                panic!("{}: the mount did not stop in {STOP_TIMEOUT:?} after SIGTERM", self.mnt.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert!(st.success() && log.contains("unmounted cleanly"), "{}: {st}: {log}", self.mnt.display());
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our child, not yet reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while matches!(child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(30) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                abort_connection(&self.mnt);
                let _ = child.kill();
                let _ = child.try_wait();
            }
        }
        if is_mounted(&self.mnt) {
            detach(&self.mnt);
        }
    }
}

/// Spawns `cmd` with stderr to `log`, and `sig` sent to it if this thread ends first
/// (the test process killed: nothing is left running).
fn spawn_logged(cmd: &mut Command, log: &Path, sig: libc::c_int, stdout: Stdio) -> Child {
    let f = std::fs::File::create(log).unwrap();
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, sig) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.env("NO_COLOR", "1").stdin(Stdio::null()).stdout(stdout).stderr(f).spawn().expect("spawn concord")
}

/// The `major:minor` of the mount on `mnt`, from /proc/self/mountinfo (which does not
/// touch the mount, unlike stat(2) of a hung one).
fn mount_dev(mnt: &Path) -> Option<(u32, u32)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mnt.to_str()?;
    info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.len() > 4 && f[4] == want {
            let (a, b) = f[2].split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        } else {
            None
        }
    })
}

/// Whether something is mounted on `mnt`.
pub fn is_mounted(mnt: &Path) -> bool {
    mount_dev(mnt).is_some()
}

/// Aborts the FUSE connection of the mount on `mnt` (every request of it fails at once
/// with ENOTCONN, and its process can be killed even if stuck in the kernel).
fn abort_connection(mnt: &Path) {
    let Some((0, minor)) = mount_dev(mnt) else { return };
    let conns = Path::new("/sys/fs/fuse/connections");
    if std::fs::read_dir(conns).map(|mut d| d.next().is_none()).unwrap_or(true) {
        let _ = Command::new("mount").args(["-t", "fusectl", "fusectl"]).arg(conns).stderr(Stdio::null()).status();
    }
    if let Err(e) = std::fs::write(conns.join(minor.to_string()).join("abort"), b"1") {
        eprintln!("aborting the FUSE connection of {}: {e}", mnt.display());
    }
}

/// Detaches whatever is mounted on `mnt` (lazily: it goes once no one uses it).
pub fn detach(mnt: &Path) {
    let root = {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    };
    let st = if root {
        Command::new("umount").arg("-l").arg(mnt).stderr(Stdio::null()).status()
    } else {
        Command::new("fusermount3").arg("-uz").arg(mnt).stderr(Stdio::null()).status()
    };
    if !st.is_ok_and(|s| s.success()) && is_mounted(mnt) {
        let _ = Command::new("fusermount3").arg("-uz").arg(mnt).stderr(Stdio::null()).status();
    }
}

impl Cluster {
    /// The process id of node `id`'s mount (fault injection in tests).
    pub fn mount_pid(&self, id: u32) -> Option<u32> {
        self.mounts.iter().find(|m| m.node == id).map(|m| m.proc.child.id())
    }
}

/// Crashes and restarts: kill -9 of one node's mount or lockd, a lockd started again on
/// the same configuration (same ports, same state folder), and waits on the logs.
/// Every process started here is a child of the [`Cluster`], listed as the first ones
/// are, so that dropping it stops them too.
impl Cluster {
    /// A new log file for a process of `kind` ("lockd", "mount") of node `id`:
    /// `kind-id.log` the first time, `kind-id.N.log` for its Nth restart.
    fn next_log(&mut self, kind: &'static str, id: u32) -> PathBuf {
        let n = self.started.get(&(kind, id)).map_or(0, |(n, _)| n + 1);
        let name = if n == 0 { format!("{kind}-{id}.log") } else { format!("{kind}-{id}.{n}.log") };
        let log = self.dir.path().join(name);
        self.started.insert((kind, id), (n, log.clone()));
        log
    }

    fn spawn_lockd(&mut self, id: u32) {
        assert!(!self.lockds.iter().any(|(n, _)| *n == id), "node {id}'s lockd runs already");
        let log = self.next_log("lockd", id);
        let mut cmd = Command::new(concord_bin());
        cmd.args(["lockd", "--config", self.config.to_str().unwrap(), "--node", &id.to_string()]);
        let child = spawn_logged(&mut cmd, &log, libc::SIGKILL, Stdio::null());
        self.lockds.push((id, Proc { child, log }));
    }

    /// The log file of node `id`'s latest mount process (stderr: its tracing lines).
    pub fn mount_log(&self, id: u32) -> PathBuf {
        self.started.get(&("mount", id)).unwrap_or_else(|| panic!("node {id} was never mounted")).1.clone()
    }

    /// The log file of node `id`'s latest lockd.
    pub fn lockd_log(&self, id: u32) -> PathBuf {
        self.started.get(&("lockd", id)).unwrap_or_else(|| panic!("node {id}'s lockd never ran")).1.clone()
    }

    /// Whether node `id` has a mount process running (not killed, not unmounted).
    pub fn is_mounted_node(&self, id: u32) -> bool {
        self.mounts.iter().any(|m| m.node == id)
    }

    /// The nodes that have a mount process running, in order.
    pub fn mounted_nodes(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.mounts.iter().map(|m| m.node).collect();
        v.sort_unstable();
        v
    }

    /// `kill -9` of node `id`'s mount process, as a crash of it alone: waits until the
    /// process is gone, then detaches its dead FUSE mount (`umount -l`), so that the
    /// node can mount there again. Its lockd is left running.
    pub fn kill_mount(&mut self, id: u32) {
        let i = self.mounts.iter().position(|m| m.node == id).unwrap_or_else(|| panic!("node {id} is not mounted"));
        let _ = self.mounts[i].proc.child.kill();
        self.reap_killed_mount(id);
    }

    /// `kill -9` of the lockd and the mount process (if mounted) of every node in
    /// `ids`, all signals sent before any wait, as a power cut of those machines; then
    /// waits for them and detaches the dead mounts.
    pub fn crash(&mut self, ids: &[u32]) {
        for (_, p) in self.lockds.iter_mut().filter(|(n, _)| ids.contains(n)) {
            let _ = p.child.kill();
        }
        for m in self.mounts.iter_mut().filter(|m| ids.contains(&m.node)) {
            let _ = m.proc.child.kill();
        }
        for &id in ids {
            if self.lockds.iter().any(|(n, _)| *n == id) {
                self.kill_lockd(id);
            }
            if self.is_mounted_node(id) {
                self.reap_killed_mount(id);
            }
        }
    }

    /// Waits for node `id`'s mount process, sent SIGKILL, to be gone; detaches its mount.
    fn reap_killed_mount(&mut self, id: u32) {
        let i = self.mounts.iter().position(|m| m.node == id).unwrap_or_else(|| panic!("node {id} is not mounted"));
        let mut m = self.mounts.remove(i);
        let pid = m.proc.child.id();
        let mut gone = wait_exit(&mut m.proc.child, STOP_TIMEOUT);
        if !gone {
            // Stuck in the kernel on a FUSE request: aborting the connection frees it.
            abort_connection(&m.mnt);
            gone = wait_exit(&mut m.proc.child, Duration::from_secs(10));
        }
        if !gone {
            self.mounts.push(m);
            panic!("node {id}: the mount process {pid} did not die after SIGKILL\n{}", self.logs());
        }
        self.live.lock().unwrap().mounts.retain(|(p, _)| *p != pid);
        detach(&m.mnt);
        assert!(!is_mounted(&m.mnt), "node {id}: {} is still mounted after umount -l", m.mnt.display());
    }

    /// `kill -9` of node `id`'s lockd; waits until it is gone.
    pub fn kill_lockd(&mut self, id: u32) {
        let i = self
            .lockds
            .iter()
            .position(|(n, _)| *n == id)
            .unwrap_or_else(|| panic!("node {id}'s lockd is not running"));
        let (_, mut p) = self.lockds.remove(i);
        let _ = p.child.kill();
        let _ = p.child.wait();
    }

    /// Starts the lockd of every node whose lockd is not running, on the configuration
    /// (ports, certificates, state folder) they had, and waits until every lockd is
    /// quorate with all nodes live.
    pub fn restart_lockds(&mut self) {
        for id in 1..=self.spec.nodes {
            if !self.lockds.iter().any(|(n, _)| *n == id) {
                self.spawn_lockd(id);
            }
        }
        self.wait_lockds_quorate();
    }

    /// Waits until every running lockd is quorate with all nodes live; panics (with the
    /// logs) if one exits or the wait passes [`READY_TIMEOUT`].
    pub fn wait_lockds_quorate(&mut self) {
        let start = Instant::now();
        loop {
            let exited =
                self.lockds.iter_mut().find_map(|(id, p)| (!matches!(p.child.try_wait(), Ok(None))).then_some(*id));
            if let Some(id) = exited {
                panic!("node {id}'s lockd exited (log {})\n{}", self.lockd_log(id).display(), self.logs());
            }
            if self.lockds.iter().all(|(id, _)| self.quorate(*id)) {
                return;
            }
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "the lockds did not reach a quorum with every node live in {READY_TIMEOUT:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `concord status MNT --json` of node `id`'s mount.
    pub fn status(&self, id: u32) -> serde_json::Value {
        let o = concord(&["status", self.mnt(id).to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "concord status of node {id}: {}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("concord status --json of node {id}: {e}"))
    }

    /// `concord dlm --config CFG --node N status --json` of node `id`'s lockd.
    pub fn dlm_status(&self, id: u32) -> serde_json::Value {
        let cfg = self.config.to_str().unwrap();
        let o = concord(&["dlm", "--config", cfg, "--node", &id.to_string(), "status", "--json"]);
        assert!(o.status.success(), "concord dlm status of node {id}: {}", text(&o));
        serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("concord dlm status --json of node {id}: {e}"))
    }

    /// The nodes the lockds' fence command was run for, in order.
    pub fn fenced(&self) -> Vec<u32> {
        std::fs::read_to_string(self.fence_record())
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().parse().unwrap_or_else(|_| panic!("fence record line {l:?}")))
            .collect()
    }
}

/// Waits up to `timeout` for `child` to exit; whether it did (reaped).
fn wait_exit(child: &mut Child, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        if start.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A position in a log file (its length now): [`find_line_since`] and
/// [`wait_for_line_since`] look only at what is written after it, so that a test that
/// kills and restarts nodes again and again finds the lines of this round, not of an
/// earlier one in the same file.
pub fn log_mark(log: &Path) -> u64 {
    std::fs::metadata(log).map_or(0, |m| m.len())
}

/// The lines of `log` written after `since` (a [`log_mark`]).
pub fn lines_since(log: &Path, since: u64) -> Vec<String> {
    let bytes = std::fs::read(log).unwrap_or_default();
    let from = (since as usize).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).lines().map(str::to_string).collect()
}

/// The first line of `log` after `since` that contains every one of `needles`.
pub fn find_line_since(log: &Path, since: u64, needles: &[&str]) -> Option<String> {
    lines_since(log, since).into_iter().find(|l| needles.iter().all(|n| l.contains(n)))
}

/// The first line of `log` that contains every one of `needles`, or `None`.
pub fn find_line(log: &Path, needles: &[&str]) -> Option<String> {
    find_line_since(log, 0, needles)
}

/// Waits until one of `logs` has a line containing every one of `needles`, and returns
/// that log and line; panics after `timeout` naming the files, with their last lines.
pub fn wait_for_line(logs: &[PathBuf], needles: &[&str], timeout: Duration) -> (PathBuf, String) {
    let marked: Vec<(PathBuf, u64)> = logs.iter().map(|l| (l.clone(), 0)).collect();
    wait_for_line_since(&marked, needles, timeout)
}

/// [`wait_for_line`] in the part of each log after its mark ([`log_mark`]).
pub fn wait_for_line_since(logs: &[(PathBuf, u64)], needles: &[&str], timeout: Duration) -> (PathBuf, String) {
    let start = Instant::now();
    loop {
        for (log, since) in logs {
            if let Some(line) = find_line_since(log, *since, needles) {
                return (log.clone(), line);
            }
        }
        if start.elapsed() > timeout {
            let mut tails = String::new();
            for (log, since) in logs {
                let lines = lines_since(log, *since);
                let tail = &lines[lines.len().saturating_sub(40)..];
                tails.push_str(&format!("---- {} (after byte {since}) ----\n{}\n", log.display(), tail.join("\n")));
            }
            let names: Vec<String> = logs.iter().map(|(l, _)| l.display().to_string()).collect();
            panic!("no line with {needles:?} in {} within {timeout:?}\n{tails}", names.join(" or "));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
