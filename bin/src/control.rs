//! The control socket of a cluster mount, and `concord status` / `concord glocks`.
//!
//! A cluster mount process listens on a unix socket named after its mount point
//! ([`socket_for`]: `/run/concord/mounts/<hash>.sock`, or under
//! `$CONCORD_RUNTIME_DIR`). Who may ask is decided as for lockd's socket
//! ([`concord_lockd::access`], `[runtime] client_group` of the mount's cluster
//! configuration): without a group the socket is mode 0600 in a 0700 folder, with one
//! it is 0660 in a 0710 folder, both of that group; and the peer's credentials are
//! checked at accept, so that a socket or folder opened wider by hand still serves
//! only root and the group. A client sends one line (`status`, `status --json`,
//! `glocks`, `glocks --json`, `top`) and reads the answer until the server closes the
//! connection; a refused client reads one `error: ...` line saying why.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use concord_fs::cluster::ClusterMount;
use concord_lockd::access::{Access, Peer};

/// The directory of the control sockets.
fn socket_dir() -> PathBuf {
    match std::env::var_os("CONCORD_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("mounts"),
        None => PathBuf::from("/run/concord/mounts"),
    }
}

/// The control socket of the mount on `mountpoint` (its canonical path, hashed: FNV-1a).
pub fn socket_for(mountpoint: &Path) -> PathBuf {
    let canon = mountpoint.canonicalize().unwrap_or_else(|_| mountpoint.to_path_buf());
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in canon.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    socket_dir().join(format!("{h:016x}.sock"))
}

/// What the control socket reports of a cluster mount.
pub struct Info {
    pub mount: Arc<ClusterMount>,
    pub node: u32,
    pub cluster: String,
    pub lockspace: String,
    pub device: String,
    pub mountpoint: PathBuf,
}

fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

impl Info {
    fn state(&self) -> &'static str {
        let m = &self.mount;
        if m.fenced() {
            "fenced"
        } else if m.fs.is_withdrawn() {
            "withdrawn"
        } else if m.recovering() {
            "recovering"
        } else {
            "up"
        }
    }

    fn status(&self, json: bool) -> String {
        let m = &self.mount;
        let (generation, members) = m.lockspace_view();
        if json {
            let v = serde_json::json!({
                "node": self.node,
                "cluster": self.cluster,
                "lockspace": self.lockspace,
                "device": self.device,
                "mountpoint": self.mountpoint.display().to_string(),
                "jid": m.jid,
                "first_mounter": m.first,
                "state": self.state(),
                "stopped": m.stopped_why(),
                "generation": generation,
                "members": members,
                "glocks": m.glocks.dump().iter().filter(|l| l.starts_with("G:")).count(),
                "dlm_requests": m.glocks.dlm_requests(),
                "glock_lends": m.glocks.lends_and_late_invals().0,
                "late_invals": m.glocks.lends_and_late_invals().1,
            });
            return format!("{v}\n");
        }
        format!(
            "node {} of cluster {}, lockspace {}\ndevice {} on {}\njid {}{}\nstate {}{}\ngeneration {} members {:?}\nglocks {} (DLM requests sent {}; lent to local waiters {}, late kernel invalidations {})\n",
            self.node,
            self.cluster,
            self.lockspace,
            self.device,
            self.mountpoint.display(),
            m.jid,
            if m.first { " (first mounter)" } else { "" },
            self.state(),
            m.stopped_why().map(|w| format!(" ({w})")).unwrap_or_default(),
            generation,
            members,
            m.glocks.dump().iter().filter(|l| l.starts_with("G:")).count(),
            m.glocks.dlm_requests(),
            m.glocks.lends_and_late_invals().0,
            m.glocks.lends_and_late_invals().1,
        )
    }

    fn glocks(&self, json: bool) -> String {
        let lines = self.mount.glocks.dump();
        if !json {
            let mut s = lines.join("\n");
            s.push('\n');
            return s;
        }
        // One object per glock: its G: line and its holders' H: lines, as dumped.
        let mut out = Vec::new();
        for l in lines {
            if l.starts_with("G:") {
                out.push((l, Vec::new()));
            } else if let Some(last) = out.last_mut() {
                last.1.push(l.trim().to_string());
            }
        }
        let items: Vec<String> = out
            .iter()
            .map(|(g, h)| {
                let hs: Vec<String> = h.iter().map(|x| json_str(x)).collect();
                format!("{{\"glock\":{},\"holders\":[{}]}}", json_str(g.trim()), hs.join(","))
            })
            .collect();
        format!("[{}]\n", items.join(","))
    }

    /// `top`: what `concord top` shows of this mount, as one JSON object: the status's
    /// node, mountpoint, state, generation and DLM request count, the glock count, the
    /// last journal recoveries, and the busiest glocks (the 20 with the longest waits and
    /// the 20 asked for most by other nodes).
    fn top(&self) -> String {
        let m = &self.mount;
        let (generation, members) = m.lockspace_view();
        let mut glocks = m.glocks.top();
        let mut keep: Vec<concord_fs::glock::GlockTop> = Vec::new();
        glocks.sort_by_key(|g| std::cmp::Reverse((g.wait_ms, g.waiters)));
        keep.extend(glocks.iter().filter(|g| g.waiters > 0).take(TOP_ROWS));
        glocks.sort_by_key(|g| std::cmp::Reverse(g.stats.bcount));
        for g in glocks.iter().take(TOP_ROWS) {
            if !keep.iter().any(|k| k.name == g.name) {
                keep.push(*g);
            }
        }
        let rows: Vec<serde_json::Value> = keep
            .iter()
            .map(|g| {
                serde_json::json!({
                    "glock": g.name.to_string(),
                    "state": g.state.to_string(),
                    "holders": g.holders,
                    "waiters": g.waiters,
                    "wait_ms": g.wait_ms,
                    "demotes_asked": g.stats.bcount,
                    "dlm_requests": g.stats.dcount,
                    "queued": g.stats.qcount,
                    "srttb_us": g.stats.srttb_ns / 1000,
                })
            })
            .collect();
        let recoveries: Vec<serde_json::Value> = m
            .recoveries()
            .iter()
            .map(|r| serde_json::json!({"jid": r.jid, "at_unix_ms": r.at_unix_ms, "ms": r.ms, "outcome": r.outcome}))
            .collect();
        let v = serde_json::json!({
            "node": self.node,
            "mountpoint": self.mountpoint.display().to_string(),
            "state": self.state(),
            "generation": generation,
            "members": members,
            "dlm_requests": m.glocks.dlm_requests(),
            "glocks": m.glocks.dump().iter().filter(|l| l.starts_with("G:")).count(),
            "recoveries": recoveries,
            "top": rows,
        });
        format!("{v}\n")
    }

    fn answer(&self, req: &str) -> String {
        let mut words = req.split_whitespace();
        let what = words.next().unwrap_or("");
        let json = words.any(|w| w == "--json");
        match what {
            "status" => self.status(json),
            "glocks" => self.glocks(json),
            "top" => self.top(),
            other => format!("error: unknown request {other:?} (status, glocks, top)\n"),
        }
    }
}

/// Rows of each of the two lists `top` answers with.
const TOP_ROWS: usize = 20;

/// The control sockets of every cluster mount on this machine (for `concord top`
/// without a mount point).
pub fn all_sockets() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(socket_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    v.sort();
    v
}

/// Sends `request` to the control socket at `path`; the answer.
pub fn ask(path: &Path, request: &str) -> Result<String> {
    ask_mount(path, None, request)
}

/// [`ask`], with the errors worded for the mount on `mountpoint` when it is known.
fn ask_mount(path: &Path, mountpoint: Option<&Path>, request: &str) -> Result<String> {
    let mut s = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && mountpoint.is_some() => bail!(
            "{}: no cluster mount answers there (no control socket {}); single-node mounts have none",
            mountpoint.unwrap_or(path).display(),
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
            "permission denied connecting to {}: the mount{} accepts root and the members of its cluster's \
             [runtime] client_group only",
            path.display(),
            mountpoint.map(|m| format!(" on {}", m.display())).unwrap_or_default()
        ),
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{request}\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out).with_context(|| format!("reading the answer of {}", path.display()))?;
    if let Some(e) = out.strip_prefix("error: ") {
        bail!("{}", e.trim());
    }
    Ok(out)
}

/// Listens on the mount's control socket until the returned guard is dropped.
pub struct Server {
    path: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Starts the control socket of a cluster mount (a thread answering one request per
/// connection), open to the clients `access` admits.
pub fn serve(info: Info, access: Access) -> Result<Server> {
    use std::os::unix::fs::MetadataExt;
    let path = socket_for(&info.mountpoint);
    let dir = path.parent().expect("socket path has a directory");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // With a group, the folder lets its members through (0710); without one, nobody
    // else (0700 unless another mount on this machine gave it a group).
    let mode = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?.mode() & 0o777;
    match access.group() {
        Some(g) => {
            std::os::unix::fs::chown(dir, None, Some(g.gid)).with_context(|| format!("chgrp {}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o710))
        }
        None if mode & 0o067 != 0 => std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)),
        None => Ok(()),
    }
    .with_context(|| format!("restricting {}", dir.display()))?;
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    access.secure_socket(&path).with_context(|| format!("restricting {}", path.display()))?;
    let info = Arc::new(info);
    std::thread::Builder::new().name("control".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let refusal = match Peer::of(&conn) {
                Ok(peer) => access.check(&peer).err().map(|r| r.to_string()),
                Err(e) => Some(format!("its credentials cannot be read: {e}")),
            };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(if refusal.is_some() { 1 } else { 5 })));
            // The request is read even from a refused client: closing with its bytes
            // unread would reset the connection before it reads the refusal.
            let mut line = String::new();
            let mut r = BufReader::new(&conn).take(4096);
            if r.read_line(&mut line).is_err() && refusal.is_none() {
                continue;
            }
            let answer = match refusal {
                None => info.answer(line.trim()),
                Some(why) => {
                    tracing::warn!(why, "refused a client on the control socket");
                    format!("error: the mount refused this client: {why}\n")
                }
            };
            let _ = conn.write_all(answer.as_bytes());
        }
    })?;
    Ok(Server { path })
}

/// `concord status|glocks MOUNTPOINT [--json]`: asks the mount on `mountpoint`.
pub fn query(mountpoint: &Path, what: &str, json: bool) -> Result<String> {
    let req = if json { format!("{what} --json") } else { what.to_string() };
    ask_mount(&socket_for(mountpoint), Some(mountpoint), &req)
}
