//! A throwaway cluster on loopback, for tests and benchmarks.
//!
//! [`LocalCluster::create`] makes a CA and node certificates in `<dir>/tls`, binds one
//! UDP socket per node on `127.0.0.1:0`, and writes `<dir>/cluster.toml` naming those
//! ports. Endpoints are then bound on the already-open sockets, so no other process can
//! take a port between choosing and binding it.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Endpoint, EndpointOptions, TransportError, Wire};
use crate::config::ClusterConfig;
use crate::tls;

/// Errors of [`LocalCluster::create`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A cluster configuration with certificates and pre-bound sockets on loopback.
#[derive(Debug)]
pub struct LocalCluster {
    /// Folder holding `cluster.toml` and `tls/`.
    pub dir: PathBuf,
    /// `<dir>/cluster.toml`.
    pub config_path: PathBuf,
    /// The loaded configuration.
    pub config: ClusterConfig,
    sockets: Vec<(u32, UdpSocket)>,
}

impl LocalCluster {
    /// Creates a cluster named `name` with nodes `1..=nodes` in `dir`.
    pub fn create(dir: &Path, name: &str, nodes: u32) -> Result<LocalCluster, BoxError> {
        let tls_dir = dir.join("tls");
        tls::ca_init(&tls_dir, name, true)?;
        let mut sockets = Vec::new();
        let mut text = format!(
            "[cluster]\nname = \"{name}\"\n\n[tls]\ndir = \"tls\"\n\n\
             [timing]\nheartbeat_ms = 100\nlease_ms = 1000\n\n\
             [runtime]\ndir = \"run\"\nstate_dir = \"state\"\n"
        );
        for id in 1..=nodes {
            tls::ca_issue(&tls_dir, id, true)?;
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            let addr = socket.local_addr()?;
            text.push_str(&format!("\n[[node]]\nid = {id}\nname = \"n{id}\"\naddr = \"{addr}\"\n"));
            sockets.push((id, socket));
        }
        let config_path = dir.join("cluster.toml");
        std::fs::write(&config_path, text)?;
        let config = ClusterConfig::load(&config_path)?;
        Ok(LocalCluster { dir: dir.to_path_buf(), config_path, config, sockets })
    }

    /// Takes node `id`'s pre-bound socket (once).
    pub fn take_socket(&mut self, id: u32) -> Option<UdpSocket> {
        let i = self.sockets.iter().position(|(n, _)| *n == id)?;
        Some(self.sockets.swap_remove(i).1)
    }

    /// Options for node `id`: its pre-bound socket if still there, quick redials.
    pub fn options(&mut self, id: u32) -> EndpointOptions {
        let mut opts = EndpointOptions::from_config(&self.config);
        opts.socket = self.take_socket(id);
        opts.backoff_min = Duration::from_millis(10);
        opts.backoff_max = Duration::from_millis(200);
        opts
    }

    /// Binds node `id` with [`LocalCluster::options`].
    pub fn bind<M: Wire>(&mut self, id: u32) -> Result<Endpoint<M>, TransportError> {
        let opts = self.options(id);
        Endpoint::bind_with(&self.config, id, opts)
    }
}
