//! `concord ca init|issue`: the cluster CA and node certificates (see
//! `concord_lockd::tls` and docs/config.md).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use concord_lockd::tls;

#[derive(Args)]
pub struct CaArgs {
    #[command(subcommand)]
    cmd: CaCmd,
}

#[derive(Subcommand)]
enum CaCmd {
    /// Create a cluster CA: writes DIR/ca.crt and DIR/ca.key (mode 0600).
    Init {
        /// The cluster's TLS folder (the `tls.dir` of the cluster config).
        dir: PathBuf,
        /// Cluster name, recorded in the CA's subject.
        #[arg(long, default_value = "concord")]
        cluster: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue node N's certificate: writes DIR/node-N.crt and DIR/node-N.key, signed by
    /// the CA in DIR.
    Issue {
        /// The cluster's TLS folder, holding ca.crt and ca.key.
        dir: PathBuf,
        /// Node id.
        #[arg(long)]
        node: u32,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(a: CaArgs) -> Result<()> {
    match a.cmd {
        CaCmd::Init { dir, cluster, force } => {
            let f = tls::ca_init(&dir, &cluster, force)
                .with_context(|| format!("creating a cluster CA in {}", dir.display()))?;
            println!("wrote {} and {}", f.cert.display(), f.key.display());
        }
        CaCmd::Issue { dir, node, force } => {
            let f = tls::ca_issue(&dir, node, force)
                .with_context(|| format!("issuing node {node}'s certificate with the CA in {}", dir.display()))?;
            println!("wrote {} and {}", f.cert.display(), f.key.display());
        }
    }
    Ok(())
}
