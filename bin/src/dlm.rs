//! `concord dlm`: use a node's lockd as `dlm_tool` and `flock(1)` are used — status,
//! lock dump, running a command under a cluster lock — and `concord dlm bench`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use concord_lockd::client::{Client, ClientError, JoinKind, LockspaceDump, NodeStatus};
use concord_lockd::config::ClusterConfig;
use concord_lockd::core::{Flags, Mode, Queue, Status};

mod bench;

#[derive(Args)]
pub struct DlmArgs {
    /// Cluster configuration file (not needed by `bench`).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// This node's id: the lockd to talk to (not needed by `bench`).
    #[arg(long, global = true)]
    node: Option<u32>,
    #[command(subcommand)]
    cmd: DlmCmd,
}

#[derive(Subcommand)]
enum DlmCmd {
    /// Show the locks this node knows, by lockspace and resource: all locks of the
    /// resources it masters, its own locks on the others.
    Lockdump {
        /// Only this lockspace.
        lockspace: Option<String>,
    },
    /// Show the node, its peers, lockspaces and clients.
    Status {
        /// One JSON object (keys: node, generation, members, slots, quorate, fenced, ...).
        #[arg(long)]
        json: bool,
        /// The lockspace whose generation, members and slots the JSON keys
        /// `generation`, `members` and `slots` give (default: the only one, if
        /// there is one; else the cluster's generation and live nodes, no slots).
        #[arg(long)]
        lockspace: Option<String>,
    },
    /// Run COMMAND while holding a cluster lock (like flock(1)). Exit status: the
    /// command's; 1 with --nowait if the lock is busy; 2 if lockd cannot be used.
    Exec {
        /// Lock mode.
        #[arg(long, default_value = "EX", value_parser = parse_mode)]
        mode: Mode,
        /// Do not wait: exit with status 1 at once if the lock is held in a conflicting mode.
        #[arg(long)]
        nowait: bool,
        /// Lockspace.
        lockspace: String,
        /// Resource name.
        name: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Benchmark lock latency and throughput between in-process peers over real QUIC on
    /// loopback (no config needed).
    Bench(bench::BenchArgs),
    /// Fault switch for partition tests: this node's lockd drops every message to
    /// and from the given peers (connections stay up, as with a network that drops
    /// packets), or heals.
    Fault {
        /// Peers to cut off, e.g. `--cut 1,2`.
        #[arg(long, value_delimiter = ',', required_unless_present = "heal")]
        cut: Vec<u32>,
        /// Deliver everything again.
        #[arg(long, conflicts_with = "cut")]
        heal: bool,
    },
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    s.parse()
}

/// Exit status of `dlm exec` when lockd cannot be used.
const EXIT_LOCKD: u8 = 2;

pub fn run(a: DlmArgs) -> ExitCode {
    let r = match a.cmd {
        DlmCmd::Bench(b) if !b.lockd => bench::run(b).map(|()| ExitCode::SUCCESS),
        cmd => (|| {
            let bench_all = matches!(cmd, DlmCmd::Bench(_));
            let (Some(config), Some(node)) = (a.config.as_ref(), a.node.or(bench_all.then_some(0))) else {
                bail!("--config FILE and --node N are needed to reach a lockd");
            };
            let cfg = ClusterConfig::load(config)?;
            if !bench_all {
                cfg.node(node)?;
            }
            let socket = cfg.lockd_socket_path(node);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let group = cfg.client_group.clone();
                let connect = || async {
                    Client::connect_named(&socket, "concord dlm").await.map_err(|e| match e {
                        ClientError::PermissionDenied { path } => anyhow::anyhow!(
                            "permission denied connecting to {path}: lockd accepts {}",
                            concord_lockd::access::describe(group.as_deref())
                        ),
                        ClientError::AccessDenied(_) => anyhow::Error::new(e),
                        e => anyhow::Error::new(e).context(format!("is `concord lockd --node {node}` running?")),
                    })
                };
                match cmd {
                    DlmCmd::Lockdump { lockspace } => {
                        let client = connect().await?;
                        let dump = client.dump(lockspace.as_deref()).await?;
                        print!("{}", format_dump(&dump));
                        Ok(ExitCode::SUCCESS)
                    }
                    DlmCmd::Status { json, lockspace } => {
                        let client = connect().await?;
                        let st = client.status().await?;
                        if json {
                            println!("{}", status_json(&st, lockspace.as_deref()));
                        } else {
                            print!("{}", format_status(&st));
                        }
                        Ok(ExitCode::SUCCESS)
                    }
                    DlmCmd::Exec { mode, nowait, lockspace, name, command } => {
                        match exec(connect().await, mode, nowait, &lockspace, &name, &command).await {
                            Ok(code) => Ok(code),
                            Err(e) => {
                                eprintln!("concord dlm exec: {e:#}");
                                Ok(ExitCode::from(EXIT_LOCKD))
                            }
                        }
                    }
                    DlmCmd::Bench(b) => {
                        bench::against_lockds(b, &cfg).await?;
                        Ok(ExitCode::SUCCESS)
                    }
                    DlmCmd::Fault { cut, heal } => {
                        let client = connect().await?;
                        client.set_fault_cut(if heal { Vec::new() } else { cut }).await?;
                        Ok(ExitCode::SUCCESS)
                    }
                }
            })
        })(),
    };
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("concord dlm: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn exec(
    client: Result<Client>,
    mode: Mode,
    nowait: bool,
    lockspace: &str,
    name: &str,
    command: &[String],
) -> Result<ExitCode> {
    let client = client?;
    let ls = client.join(lockspace, JoinKind::Plain).await?;
    let mut stops = ls.recovery();
    let flags = if nowait { Flags::NOQUEUE } else { Flags::empty() };
    let ast = ls.lock(name.as_bytes(), mode, flags, None).await?;
    match ast.status {
        Status::Granted => {}
        Status::Again => {
            eprintln!("concord dlm exec: {lockspace}/{name} is busy (held in a mode incompatible with {mode})");
            return Ok(ExitCode::from(1));
        }
        other => bail!("lock request on {lockspace}/{name} ended with {other}"),
    }
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..]);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            // If we die, the command must not go on believing it holds the lock: lockd
            // gives the lock away as soon as our connection closes.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().with_context(|| format!("cannot run {:?}", command[0]))?;
    let status = tokio::select! {
        s = child.wait() => s.context("waiting for the command")?,
        _ = client.closed() => {
            let _ = child.kill().await;
            bail!("connection to lockd lost while holding {lockspace}/{name}: command killed");
        }
        why = async {
            while let Some(ev) = stops.recv().await {
                if let concord_lockd::client::RecoveryEvent::Stopped { reason } = ev {
                    return reason;
                }
            }
            std::future::pending().await
        } => {
            // The lock is gone (this node was fenced): the command must not go on.
            let _ = child.kill().await;
            bail!("lock {lockspace}/{name} lost ({why}): command killed");
        }
    };
    if let Err(e) = ls.unlock(ast.lkid, None).await {
        eprintln!("concord dlm exec: unlock of {lockspace}/{name}: {e}");
    }
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        (None, None) => 1,
    };
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// A resource name for people: printable ASCII as is, other bytes as `\xNN`.
pub(crate) fn show_name(name: &[u8]) -> String {
    let mut s = String::new();
    for &b in name {
        if (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\' {
            s.push(b as char);
        } else {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

fn mode_or_iv(m: Option<Mode>) -> &'static str {
    m.map_or("IV", |m| m.as_str())
}

pub(crate) fn format_dump(dump: &[LockspaceDump]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    for ls in dump {
        let members: Vec<String> = ls.members.iter().map(|m| m.to_string()).collect();
        let _ = writeln!(
            out,
            "lockspace {}: generation {}, members {}, {} resource(s)",
            ls.name,
            ls.generation,
            members.join(" "),
            ls.resources.len()
        );
        for r in &ls.resources {
            let master = r.master.map_or("(lookup in progress)".to_string(), |m| m.to_string());
            let _ = writeln!(out, "Resource \"{}\" master {master} directory {}", show_name(&r.name), r.directory);
            if let Some((lvb, seq)) = &r.lvb {
                let hex: String = lvb.iter().map(|b| format!("{b:02x}")).collect();
                let _ = writeln!(out, "  LVB {hex} seq {seq}");
            }
            for (q, title) in [(Queue::Grant, "Granted"), (Queue::Convert, "Conversion"), (Queue::Wait, "Waiting")] {
                let locks: Vec<_> = r.locks.iter().filter(|l| l.queue == q).collect();
                if locks.is_empty() {
                    continue;
                }
                let _ = writeln!(out, "  {title}");
                for l in locks {
                    let owner = l.owner.as_ref().map(|o| format!(" ({o})")).unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "    id {} gr {} rq {} node {} master {master}{owner}",
                        l.lkid,
                        mode_or_iv(l.granted),
                        mode_or_iv(l.requested),
                        l.node
                    );
                }
            }
        }
    }
    out
}

/// The status as one JSON object: every field of [`NodeStatus`], with `generation`,
/// `members` and `slots` those of the selected lockspace (see `dlm status --help`);
/// the cluster's own are kept as `cluster_generation` and `live_nodes`.
pub(crate) fn status_json(st: &NodeStatus, lockspace: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::to_value(st).unwrap_or_else(|_| serde_json::json!({}));
    let selected = match lockspace {
        Some(name) => st.lockspaces.iter().find(|l| l.name == name),
        None if st.lockspaces.len() == 1 => st.lockspaces.first(),
        None => None,
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("cluster_generation".into(), serde_json::json!(st.generation));
        o.insert("live_nodes".into(), serde_json::json!(st.members));
        match selected {
            Some(l) => {
                let slots: serde_json::Map<String, serde_json::Value> =
                    l.slots.iter().map(|(n, s)| (n.to_string(), serde_json::json!(s))).collect();
                o.insert("lockspace".into(), serde_json::json!(l.name));
                o.insert("generation".into(), serde_json::json!(l.generation));
                o.insert("members".into(), serde_json::json!(l.members));
                o.insert("slots".into(), serde_json::Value::Object(slots));
            }
            None => {
                o.insert("slots".into(), serde_json::json!({}));
            }
        }
    }
    v
}

fn format_status(st: &NodeStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let members: Vec<String> = st.members.iter().map(|m| m.to_string()).collect();
    let _ = writeln!(
        out,
        "node {} of cluster {}, generation {}, up {:.1}s",
        st.node,
        st.cluster,
        st.generation,
        st.uptime_ms as f64 / 1000.0
    );
    let _ = writeln!(out, "live nodes: {}", members.join(" "));
    let _ = writeln!(
        out,
        "incarnation {:016x}; membership leader {}, term {}",
        st.incarnation,
        st.leader.map_or("none".to_string(), |l| l.to_string()),
        st.term
    );
    match &st.quorum_reason {
        None => {
            let _ = writeln!(out, "quorate: yes");
        }
        Some(why) => {
            let _ = writeln!(out, "quorate: no ({why})");
        }
    }
    let lease = st.lease_left_ms.map_or("none".to_string(), |l| format!("{l} ms left"));
    let _ = writeln!(
        out,
        "lease: {lease} (heartbeat {} ms, lease {} ms, dead after {} ms)",
        st.heartbeat_ms, st.lease_ms, st.dead_after_ms
    );
    if st.fenced || st.fence_count > 0 {
        let _ = writeln!(
            out,
            "fenced: {} ({} time(s); last: {})",
            if st.fenced { "yes" } else { "no" },
            st.fence_count,
            st.last_fence.as_deref().unwrap_or("-")
        );
    }
    let _ = writeln!(
        out,
        "transport: {} connection(s) refused, {} closed for malformed frames",
        st.connections_refused, st.malformed_frames
    );
    let _ = writeln!(out, "peers:");
    for p in &st.peers {
        let _ = writeln!(out, "  {} {} {} {}", p.id, p.name, p.addr, if p.up { "up" } else { "down" });
    }
    let _ = writeln!(out, "lockspaces:");
    for l in &st.lockspaces {
        let plain = l.clients.iter().filter(|(_, k)| *k == JoinKind::Plain).count();
        let rec = l.clients.len() - plain;
        let slots: Vec<String> = l.slots.iter().map(|(n, s)| format!("{n}:{s}")).collect();
        let _ = writeln!(
            out,
            "  {}: generation {}, members (node:slot) {}{}{}, {} lock(s), {} resource(s), {} directory entr(ies), \
             clients: {plain} plain, {rec} with recovery",
            l.name,
            l.generation,
            slots.join(" "),
            if l.member { "" } else { " (this node is not a member)" },
            if l.recovering { ", recovering" } else { "" },
            l.locks,
            l.resources,
            l.directory
        );
        if !l.unrecovered.is_empty() {
            let _ = writeln!(out, "    slots waiting for recovery: {:?}", l.unrecovered);
        }
        if let Some(r) = &l.last_recovery {
            let _ = writeln!(
                out,
                "    last recovery: generation {}, departed {:?}, {} ms, {:.1}s ago",
                r.generation,
                r.departed,
                r.ms,
                st.uptime_ms.saturating_sub(r.at_ms) as f64 / 1000.0
            );
        }
        if l.unclean_leaves > 0 {
            let _ = writeln!(out, "    {} unclean leave(s) of this node's recovery client", l.unclean_leaves);
        }
    }
    let _ = writeln!(out, "clients:");
    for c in &st.clients {
        let joined: Vec<String> = c.joined.iter().map(|(n, k)| format!("{n} ({})", k.as_str())).collect();
        let pid = c.pid.map(|p| format!(" pid {p}")).unwrap_or_default();
        let _ = writeln!(
            out,
            "  {}{pid} {:?}: {} lock(s), joined {}",
            c.id,
            c.name,
            c.locks,
            if joined.is_empty() { "nothing".into() } else { joined.join(", ") }
        );
    }
    out
}
