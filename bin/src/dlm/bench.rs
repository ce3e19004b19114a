//! `concord dlm bench`.

use anyhow::Result;
use clap::Args;

#[derive(Args)]
pub struct BenchArgs {
    /// Number of nodes.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(_a: BenchArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
