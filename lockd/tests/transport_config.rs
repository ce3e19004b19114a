//! The cluster configuration file as users write it: the shipped example loads, and
//! mistakes are reported with the file and the key.

use std::path::{Path, PathBuf};

use concord_lockd::config::{ClusterConfig, ConfigError};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cluster.toml")
}

#[test]
fn shipped_example_loads() {
    let cfg = ClusterConfig::load(example()).unwrap();
    assert_eq!(cfg.cluster_name, "alpha");
    assert_eq!(cfg.node_ids().collect::<Vec<_>>(), vec![1, 2, 3]);
    let deploy = example().parent().unwrap().to_path_buf();
    assert_eq!(cfg.tls_dir, deploy.join("tls"));
    assert_eq!(cfg.node_key_path(2), deploy.join("tls/node-2.key"));
    assert_eq!(cfg.lockd_socket_path(3), deploy.join("run/lockd-3.sock"));
    assert_eq!(cfg.timing.dead_after_ms, 2500);
    assert_eq!(cfg.node(2).unwrap().addr.port(), 7402);
    assert_eq!(cfg.fence_command(1).unwrap(), None);
}

fn write(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("cluster.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn mistakes_are_reported_with_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(example()).unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("name = \"alpha\"", "name = \"\"", "cluster.name: must not be empty"),
        ("id = 3", "id = 2", "node[2].id: duplicate node id 2"),
        ("127.0.0.1:7403", "127.0.0.1:7401", "node[2].addr: duplicate address 127.0.0.1:7401"),
        ("127.0.0.1:7403", "n3.example:7403", "node[2].addr: \"n3.example:7403\" is not an IP address"),
        ("127.0.0.1:7403", "127.0.0.1", "node[2].addr"),
        ("lease_ms = 2000", "lease_ms = 200", "timing.lease_ms: 200 must be at least twice"),
        ("# dead_after_ms = 2500", "dead_after_ms = 2400", "timing.dead_after_ms: 2400 must be at least"),
        ("heartbeat_ms = 200", "heartbeat_ms = 200\nheartbeat = 3", "unknown field `heartbeat`"),
        ("cmd = \"\"", "cmd = \"fence {node}\"", "fence.cmd"),
        ("[cluster]", "[clusters]", "unknown field `clusters`"),
        ("dir = \"tls\"", "dir = 5", "invalid type"),
    ];
    for (from, to, want) in cases {
        assert!(base.contains(from), "example lacks {from:?}");
        let path = write(dir.path(), &base.replacen(from, to, 1));
        let e = ClusterConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains(want), "{from:?} -> {to:?}: got {e:?}, want {want:?}");
        assert!(e.contains(&path.display().to_string()), "no file name in {e:?}");
    }
}

#[test]
fn missing_file_and_unknown_node() {
    let dir = tempfile::tempdir().unwrap();
    let e = ClusterConfig::load(dir.path().join("nope.toml")).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    assert!(e.to_string().contains("nope.toml"), "{e}");
    let cfg = ClusterConfig::load(example()).unwrap();
    let e = cfg.node(9).unwrap_err().to_string();
    assert!(e.contains("node 9 is not in cluster config") && e.contains("1, 2, 3"), "{e}");
}
