//! `concord lockd --config FILE --node N`: the node's DLM peer (see
//! `concord_lockd::node` and docs/internals/lockd.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use concord_lockd::config::ClusterConfig;
use concord_lockd::node::{Node, NodeOptions};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Args)]
pub struct LockdArgs {
    /// Cluster configuration file.
    #[arg(long)]
    pub config: PathBuf,
    /// This node's id in the configuration.
    #[arg(long)]
    pub node: u32,
    /// Runtime threads: 1 (the default) runs everything on one thread, which measured
    /// faster on small machines (no cross-thread wake-ups; the lockspaces are behind one
    /// lock anyway); 0 for one per CPU.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

pub fn run(a: LockdArgs) -> Result<()> {
    let cfg = ClusterConfig::load(&a.config)?;
    cfg.node(a.node)?;
    let rt = if a.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if a.threads > 1 {
            b.worker_threads(a.threads);
        }
        b.enable_all().thread_name("lockd").build()
    }
    .context("starting the tokio runtime")?;
    rt.block_on(async {
        let opts = NodeOptions::from_config(&cfg, a.node);
        let node = Node::start(&cfg, a.node, opts).await.with_context(|| format!("starting lockd node {}", a.node))?;
        eprintln!(
            "concord lockd: node {} of cluster {} listening on {}",
            a.node,
            cfg.cluster_name,
            node.socket_path().display()
        );
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let sig = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(node = a.node, signal = sig, "stopping");
        node.shutdown().await;
        Ok(())
    })
}
