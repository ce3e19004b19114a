//! The cluster configuration file.
//!
//! One TOML file describes a cluster and is the same on every node; a node picks its own
//! entry by id (`--node ID`). The format is documented key by key in `docs/config.md`,
//! with an example in `deploy/cluster.toml`:
//!
//! ```toml
//! [cluster]
//! name = "alpha"
//!
//! [tls]
//! dir = "tls"                    # relative to this file
//!
//! [[node]]
//! id = 1
//! name = "n1"
//! addr = "127.0.0.1:7401"
//!
//! [timing]
//! heartbeat_ms = 200
//! lease_ms = 2000
//! # dead_after_ms = 2500         # default: lease_ms + max(lease_ms / 4, 2 x heartbeat_ms)
//!
//! [fence]
//! cmd = ""                       # optional; {id} {name} {addr} are substituted
//!
//! [runtime]
//! dir = "/run/concord"
//! state_dir = "/var/lib/concord"
//! # client_group = "concord"     # who besides root may use lockd and the mounts
//! ```
//!
//! [`ClusterConfig::load`] parses and validates the whole file and reports the first
//! problem with the file name and the offending key; relative paths are resolved against
//! the folder that holds the file, so a cluster directory can be moved as a whole.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Default `[timing] heartbeat_ms`.
pub const DEFAULT_HEARTBEAT_MS: u64 = 200;
/// Default `[timing] lease_ms`.
pub const DEFAULT_LEASE_MS: u64 = 2000;
/// Default `[tls] dir`, relative to the configuration file.
pub const DEFAULT_TLS_DIR: &str = "tls";
/// Default `[runtime] dir`.
pub const DEFAULT_RUNTIME_DIR: &str = "/run/concord";
/// Default `[runtime] state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/concord";
/// Longest accepted cluster name, in bytes (GFS2's lock table name allows 32 for the
/// cluster part).
pub const MAX_CLUSTER_NAME_LEN: usize = 32;
/// Placeholders that `[fence] cmd` may contain.
pub const FENCE_PLACEHOLDERS: [&str; 3] = ["id", "name", "addr"];

/// Why a configuration file could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read cluster config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not have the expected shape (unknown key,
    /// wrong type, missing required key).
    #[error("cluster config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// The file parsed but a value is not acceptable.
    #[error("cluster config {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        /// The offending key, e.g. `node[2].addr` or `timing.lease_ms`.
        key: String,
        message: String,
    },
    /// A node id that the configuration does not list.
    #[error("node {id} is not in cluster config {path} (known ids: {known})")]
    UnknownNode { path: PathBuf, id: u32, known: String },
}

/// One `[[node]]` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// Cluster-wide node id, non-zero, unique.
    pub id: u32,
    /// Human name, unique (used in logs and the fence command).
    pub name: String,
    /// QUIC (UDP) address of this node's DLM peer.
    pub addr: SocketAddr,
}

/// `[timing]`, all in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Interval between heartbeats to each peer.
    pub heartbeat_ms: u64,
    /// A node cut off from quorum this long stops all I/O to the shared device.
    pub lease_ms: u64,
    /// The survivors declare a silent node dead after this long; always above
    /// `lease_ms`, so the dead node's lease has surely run out.
    pub dead_after_ms: u64,
}

impl Timing {
    /// `heartbeat_ms` as a [`Duration`].
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
    /// `lease_ms` as a [`Duration`].
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
    /// `dead_after_ms` as a [`Duration`].
    pub fn dead_after(&self) -> Duration {
        Duration::from_millis(self.dead_after_ms)
    }
}

/// A whole, validated cluster configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The file this was loaded from (as given to [`ClusterConfig::load`]).
    pub path: PathBuf,
    /// `[cluster] name`.
    pub cluster_name: String,
    /// `[tls] dir`, resolved against the configuration file's folder.
    pub tls_dir: PathBuf,
    /// `[[node]]` entries, sorted by id.
    pub nodes: Vec<NodeConfig>,
    /// `[timing]`.
    pub timing: Timing,
    /// `[fence] cmd`; `None` when absent or empty.
    pub fence_cmd: Option<String>,
    /// `[runtime] dir`, resolved against the configuration file's folder.
    pub runtime_dir: PathBuf,
    /// `[runtime] state_dir`, resolved against the configuration file's folder.
    pub state_dir: PathBuf,
    /// `[runtime] client_group`: the group (a name or a number) whose members may use
    /// lockd's client socket and the mounts' control sockets besides root
    /// ([`crate::access`]); `None`: root only.
    pub client_group: Option<String>,
}

// The file as written. Unknown keys are errors, so a typo such as `lease_msec` is
// reported instead of silently falling back to a default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    cluster: RawCluster,
    #[serde(default)]
    tls: RawTls,
    #[serde(default, rename = "node")]
    nodes: Vec<RawNode>,
    #[serde(default)]
    timing: RawTiming,
    #[serde(default)]
    fence: RawFence,
    #[serde(default)]
    runtime: RawRuntime,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTls {
    dir: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: i64,
    name: String,
    addr: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTiming {
    heartbeat_ms: Option<i64>,
    lease_ms: Option<i64>,
    dead_after_ms: Option<i64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawFence {
    cmd: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRuntime {
    dir: Option<String>,
    state_dir: Option<String>,
    client_group: Option<String>,
}

impl ClusterConfig {
    /// Reads, parses and validates the configuration file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<ClusterConfig, ConfigError> {
        let path = path.as_ref();
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` as if it had been read from `path` (relative paths in
    /// it are resolved against `path`'s folder; the file itself is not read).
    pub fn parse(text: &str, path: impl AsRef<Path>) -> Result<ClusterConfig, ConfigError> {
        let path = path.as_ref();
        let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        let base = path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
        let base = if base.as_os_str().is_empty() { PathBuf::from(".") } else { base };

        // [cluster]
        let cluster_name = raw.cluster.name;
        if cluster_name.is_empty() {
            return Err(invalid("cluster.name", "must not be empty".into()));
        }
        if cluster_name.len() > MAX_CLUSTER_NAME_LEN {
            return Err(invalid(
                "cluster.name",
                format!("{cluster_name:?} is longer than {MAX_CLUSTER_NAME_LEN} bytes"),
            ));
        }
        if !cluster_name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(invalid(
                "cluster.name",
                format!("{cluster_name:?} may only contain letters, digits, '-' and '_'"),
            ));
        }

        // [[node]]
        if raw.nodes.is_empty() {
            return Err(invalid("node", "at least one [[node]] is required".into()));
        }
        let mut nodes = Vec::with_capacity(raw.nodes.len());
        let mut ids = BTreeSet::new();
        let mut names = BTreeSet::new();
        let mut addrs = BTreeSet::new();
        for (i, n) in raw.nodes.into_iter().enumerate() {
            let key = |field: &str| format!("node[{i}].{field}");
            let id = match u32::try_from(n.id) {
                Ok(id) if id != 0 => id,
                _ => return Err(invalid(&key("id"), format!("{} is not a node id (1 ..= {})", n.id, u32::MAX))),
            };
            if !ids.insert(id) {
                return Err(invalid(&key("id"), format!("duplicate node id {id}")));
            }
            if n.name.is_empty() || n.name.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(invalid(&key("name"), format!("{:?} must be non-empty, without spaces", n.name)));
            }
            if !names.insert(n.name.clone()) {
                return Err(invalid(&key("name"), format!("duplicate node name {:?}", n.name)));
            }
            let addr: SocketAddr = n.addr.parse().map_err(|_| {
                invalid(
                    &key("addr"),
                    format!(
                        "{:?} is not an IP address with a port, e.g. \"192.0.2.1:7401\" or \"[2001:db8::1]:7401\"",
                        n.addr
                    ),
                )
            })?;
            if addr.port() == 0 {
                return Err(invalid(&key("addr"), format!("{addr}: port 0 is not allowed")));
            }
            if addr.ip().is_unspecified() || addr.ip().is_multicast() {
                return Err(invalid(
                    &key("addr"),
                    format!("{addr}: must be an address peers can reach, not a wildcard or multicast address"),
                ));
            }
            if !addrs.insert(addr) {
                return Err(invalid(&key("addr"), format!("duplicate address {addr}")));
            }
            nodes.push(NodeConfig { id, name: n.name, addr });
        }
        nodes.sort_by_key(|n| n.id);

        // [timing]
        let ms = |key: &str, v: Option<i64>, default: u64| -> Result<u64, ConfigError> {
            match v {
                None => Ok(default),
                Some(v) if v > 0 => Ok(v as u64),
                Some(v) => Err(invalid(key, format!("{v} must be a positive number of milliseconds"))),
            }
        };
        let heartbeat_ms = ms("timing.heartbeat_ms", raw.timing.heartbeat_ms, DEFAULT_HEARTBEAT_MS)?;
        let lease_ms = ms("timing.lease_ms", raw.timing.lease_ms, DEFAULT_LEASE_MS)?;
        if lease_ms < 2 * heartbeat_ms {
            return Err(invalid(
                "timing.lease_ms",
                format!(
                    "{lease_ms} must be at least twice heartbeat_ms ({heartbeat_ms}), so that one lost heartbeat does not end a lease"
                ),
            ));
        }
        let margin = (lease_ms / 4).max(2 * heartbeat_ms);
        let dead_after_ms = ms("timing.dead_after_ms", raw.timing.dead_after_ms, lease_ms + margin)?;
        if dead_after_ms < lease_ms + margin {
            return Err(invalid(
                "timing.dead_after_ms",
                format!(
                    "{dead_after_ms} must be at least lease_ms + max(lease_ms / 4, 2 x heartbeat_ms) = {}: a node may \
                     only be declared dead after its lease has surely run out",
                    lease_ms + margin
                ),
            ));
        }
        let timing = Timing { heartbeat_ms, lease_ms, dead_after_ms };

        // [fence]
        let fence_cmd = match raw.fence.cmd {
            Some(cmd) if !cmd.trim().is_empty() => {
                check_fence_placeholders(&cmd).map_err(|m| invalid("fence.cmd", m))?;
                Some(cmd)
            }
            _ => None,
        };

        // [tls], [runtime]
        let non_empty = |key: &str, v: Option<String>, default: &str| match v {
            Some(v) if v.is_empty() => Err(invalid(key, "must not be empty".into())),
            Some(v) => Ok(base.join(v)),
            None => Ok(base.join(default)),
        };
        let tls_dir = non_empty("tls.dir", raw.tls.dir, DEFAULT_TLS_DIR)?;
        let runtime_dir = non_empty("runtime.dir", raw.runtime.dir, DEFAULT_RUNTIME_DIR)?;
        let state_dir = non_empty("runtime.state_dir", raw.runtime.state_dir, DEFAULT_STATE_DIR)?;
        let client_group = match raw.runtime.client_group {
            Some(g) if g.is_empty() || g.len() > 64 || !g.bytes().all(|b| b.is_ascii_graphic() && b != b':') => {
                return Err(invalid(
                    "runtime.client_group",
                    format!("{g:?} is not a group name or number (1 to 64 printable characters, no spaces or ':')"),
                ))
            }
            g => g,
        };

        Ok(ClusterConfig {
            path: path.to_path_buf(),
            cluster_name,
            tls_dir,
            nodes,
            timing,
            fence_cmd,
            runtime_dir,
            state_dir,
            client_group,
        })
    }

    /// The entry of node `id`, or [`ConfigError::UnknownNode`].
    pub fn node(&self, id: u32) -> Result<&NodeConfig, ConfigError> {
        self.nodes.iter().find(|n| n.id == id).ok_or_else(|| ConfigError::UnknownNode {
            path: self.path.clone(),
            id,
            known: self.node_ids().map(|i| i.to_string()).collect::<Vec<_>>().join(", "),
        })
    }

    /// All node ids, ascending.
    pub fn node_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.nodes.iter().map(|n| n.id)
    }

    /// `<tls dir>/ca.crt`: the cluster CA certificate, the only trust root.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.tls_dir.join(crate::tls::CA_CERT_FILE)
    }

    /// `<tls dir>/ca.key`: the CA's private key (needed only by `concord ca issue`; keep
    /// it off the nodes if you can).
    pub fn ca_key_path(&self) -> PathBuf {
        self.tls_dir.join(crate::tls::CA_KEY_FILE)
    }

    /// `<tls dir>/node-<id>.crt`.
    pub fn node_cert_path(&self, id: u32) -> PathBuf {
        self.tls_dir.join(crate::tls::node_cert_file(id))
    }

    /// `<tls dir>/node-<id>.key`.
    pub fn node_key_path(&self, id: u32) -> PathBuf {
        self.tls_dir.join(crate::tls::node_key_file(id))
    }

    /// `<runtime dir>/lockd-<id>.sock`: the control socket of node `id`'s lockd.
    pub fn lockd_socket_path(&self, id: u32) -> PathBuf {
        self.runtime_dir.join(format!("lockd-{id}.sock"))
    }

    /// The fence command for node `id` with `{id}`, `{name}` and `{addr}` substituted, or
    /// `None` when no fence command is configured.
    pub fn fence_command(&self, id: u32) -> Result<Option<String>, ConfigError> {
        let node = self.node(id)?;
        Ok(self.fence_cmd.as_ref().map(|cmd| {
            cmd.replace("{id}", &node.id.to_string())
                .replace("{name}", &node.name)
                .replace("{addr}", &node.addr.to_string())
        }))
    }
}

impl fmt::Display for NodeConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {} ({}, {})", self.id, self.name, self.addr)
    }
}

/// Every `{...}` in a fence command must be one of [`FENCE_PLACEHOLDERS`].
fn check_fence_placeholders(cmd: &str) -> Result<(), String> {
    let mut rest = cmd;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(format!("{cmd:?}: unclosed '{{'"));
        };
        let name = &after[..close];
        if !FENCE_PLACEHOLDERS.contains(&name) {
            return Err(format!("{cmd:?}: unknown placeholder {{{name}}} (known: {{id}}, {{name}}, {{addr}})"));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[cluster]
name = "alpha"

[tls]
dir = "tls"

[[node]]
id = 2
name = "n2"
addr = "127.0.0.1:7402"

[[node]]
id = 1
name = "n1"
addr = "127.0.0.1:7401"

[timing]
heartbeat_ms = 100
lease_ms = 1000

[fence]
cmd = "virsh destroy {name} # {id} {addr}"

[runtime]
dir = "run"
"#;

    fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
        ClusterConfig::parse(text, "/etc/concord/cluster.toml")
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn good_file_parses_with_defaults_and_resolved_paths() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.cluster_name, "alpha");
        assert_eq!(c.node_ids().collect::<Vec<_>>(), vec![1, 2]);
        // lease 1000 + max(1000 / 4, 2 x 100)
        assert_eq!(c.timing.dead_after_ms, 1250);
        assert_eq!(c.tls_dir, PathBuf::from("/etc/concord/tls"));
        assert_eq!(c.runtime_dir, PathBuf::from("/etc/concord/run"));
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/concord"));
        assert_eq!(c.node_cert_path(2), PathBuf::from("/etc/concord/tls/node-2.crt"));
        assert_eq!(c.node_key_path(2), PathBuf::from("/etc/concord/tls/node-2.key"));
        assert_eq!(c.ca_cert_path(), PathBuf::from("/etc/concord/tls/ca.crt"));
        assert_eq!(c.fence_command(1).unwrap().unwrap(), "virsh destroy n1 # 1 127.0.0.1:7401");
        assert_eq!(c.node(2).unwrap().name, "n2");
        assert!(matches!(c.node(9), Err(ConfigError::UnknownNode { id: 9, .. })));
    }

    #[test]
    fn relative_config_path_resolves_against_current_folder() {
        let c = ClusterConfig::parse(GOOD, "cluster.toml").unwrap();
        assert_eq!(c.tls_dir, PathBuf::from("./tls"));
    }

    #[test]
    fn minimal_file_gets_defaults() {
        let c = parse("[cluster]\nname=\"a\"\n[[node]]\nid=1\nname=\"x\"\naddr=\"10.0.0.1:1\"\n").unwrap();
        assert_eq!(c.timing.heartbeat_ms, DEFAULT_HEARTBEAT_MS);
        assert_eq!(c.timing.lease_ms, DEFAULT_LEASE_MS);
        assert_eq!(c.timing.dead_after_ms, 2500);
        assert_eq!(c.fence_cmd, None);
        assert_eq!(c.runtime_dir, PathBuf::from(DEFAULT_RUNTIME_DIR));
        assert_eq!(c.client_group, None);
    }

    #[test]
    fn errors_name_the_key() {
        let e = err(&GOOD.replace("name = \"alpha\"", "name = \"\""));
        assert!(e.contains("cluster.name: must not be empty"), "{e}");
        let e = err(&GOOD.replace("id = 2", "id = 1"));
        assert!(e.contains("node[1].id: duplicate node id 1"), "{e}");
        let e = err(&GOOD.replace("7402", "7401"));
        assert!(e.contains("node[1].addr: duplicate address"), "{e}");
        let e = err(&GOOD.replace("\"n2\"", "\"n1\""));
        assert!(e.contains("duplicate node name"), "{e}");
        let e = err(&GOOD.replace("127.0.0.1:7402", "localhost:7402"));
        assert!(e.contains("node[0].addr") && e.contains("not an IP address"), "{e}");
        let e = err(&GOOD.replace("lease_ms = 1000", "lease_ms = 100"));
        assert!(e.contains("timing.lease_ms") && e.contains("twice heartbeat_ms"), "{e}");
        let e = err(&GOOD.replace("lease_ms = 1000", "lease_ms = 1000\ndead_after_ms = 1000"));
        assert!(e.contains("timing.dead_after_ms"), "{e}");
        let e = err(&GOOD.replace("heartbeat_ms = 100", "heartbeat_ms = 0"));
        assert!(e.contains("timing.heartbeat_ms") && e.contains("positive"), "{e}");
        let e = err(&GOOD.replace("id = 2", "id = 0"));
        assert!(e.contains("node[0].id") && e.contains("not a node id"), "{e}");
        let e = err(&GOOD.replace("id = 2", "id = -3"));
        assert!(e.contains("not a node id"), "{e}");
        let e = err(&GOOD.replace("{name}", "{host}"));
        assert!(e.contains("fence.cmd") && e.contains("{host}"), "{e}");
        let e = err(&GOOD.replace("lease_ms", "lease_msec"));
        assert!(e.contains("lease_msec"), "{e}");
        let e = err(&GOOD.replace("[cluster]\nname = \"alpha\"", ""));
        assert!(e.contains("cluster"), "{e}");
        let e = err(&GOOD.replace("127.0.0.1:7401", "0.0.0.0:7401"));
        assert!(e.contains("wildcard"), "{e}");
        let e = err("[cluster]\nname = \"a\"\n");
        assert!(e.contains("at least one [[node]]"), "{e}");
        let e = err(&GOOD.replace("dir = \"run\"", "dir = \"run\"\nclient_group = \"a b\""));
        assert!(e.contains("runtime.client_group") && e.contains("\"a b\""), "{e}");
        let c = parse(&GOOD.replace("dir = \"run\"", "dir = \"run\"\nclient_group = \"concord\"")).unwrap();
        assert_eq!(c.client_group.as_deref(), Some("concord"));
        let e = err("not toml at all [");
        assert!(e.starts_with("cluster config /etc/concord/cluster.toml:"), "{e}");
    }
}
