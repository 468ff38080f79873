//! `raftblk node ...` and the cluster-map parts of `raftblk cluster ...`:
//! list, add, drain, take out, bring in, remove and weigh nodes, and set
//! cluster flags, through the meta leader.

use clap::Subcommand;
use raftblk_client::Client;
use raftblk_proto::{ClusterFlags, ClusterMap, NodeState, PlacementStatus};

#[derive(Subcommand, Debug)]
pub enum NodeCmd {
    /// Nodes with their state, weight, failure domain and replica count.
    List,
    /// Register a node before it first starts; prints its id.
    Add {
        /// The address it will listen on (host:port).
        addr: String,
        /// Its id (default: the next free one).
        #[arg(long, default_value_t = 0)]
        id: u64,
        #[arg(long, default_value = "")]
        failure_domain: String,
        /// Share of replicas (default 100).
        #[arg(long, default_value_t = 0)]
        weight: u64,
    },
    /// Move every replica off a node (it keeps serving meanwhile).
    Drain { id: u64 },
    /// Treat a node as gone: its replicas are re-created elsewhere.
    Out { id: u64 },
    /// Put a drained or out node back in service.
    In { id: u64 },
    /// Remove a node that holds no replica any more.
    Remove { id: u64 },
    /// Set a node's weight (share of replicas; 0: none).
    SetWeight { id: u64, weight: u64 },
}

fn state_name(s: i32) -> &'static str {
    match NodeState::try_from(s) {
        Ok(NodeState::Up) => "up",
        Ok(NodeState::Down) => "down",
        Ok(NodeState::Out) => "out",
        Ok(NodeState::Draining) => "draining",
        Ok(NodeState::Removed) => "removed",
        _ => "?",
    }
}

/// Replicas each node holds per the map (any role).
pub fn replica_counts(map: &ClusterMap) -> std::collections::BTreeMap<u64, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for g in &map.groups {
        let mut members = g.voters.clone();
        members.extend(&g.learners);
        members.extend(&g.voters_outgoing);
        members.sort_unstable();
        members.dedup();
        for n in members {
            *counts.entry(n).or_insert(0) += 1;
        }
    }
    counts
}

pub fn print_nodes(map: &ClusterMap) {
    let counts = replica_counts(map);
    outln!(
        "{:<6} {:<22} {:<9} {:>6} {:<12} {:>8}",
        "ID",
        "ADDRESS",
        "STATE",
        "WEIGHT",
        "DOMAIN",
        "REPLICAS"
    );
    for n in &map.nodes {
        outln!(
            "{:<6} {:<22} {:<9} {:>6} {:<12} {:>8}",
            n.id,
            n.addr,
            state_name(n.state),
            n.weight,
            if n.failure_domain.is_empty() {
                "-"
            } else {
                &n.failure_domain
            },
            counts.get(&n.id).copied().unwrap_or(0)
        );
    }
    let f = map.flags.unwrap_or_default();
    let set: Vec<&str> = [
        ("noout", f.noout),
        ("norecover", f.norecover),
        ("norebalance", f.norebalance),
    ]
    .iter()
    .filter(|(_, on)| *on)
    .map(|(n, _)| *n)
    .collect();
    outln!(
        "map epoch {}{}",
        map.epoch,
        if set.is_empty() {
            String::new()
        } else {
            format!(", flags: {}", set.join(","))
        }
    );
}

pub async fn run(client: &Client, cmd: &NodeCmd) -> anyhow::Result<()> {
    let map = match cmd {
        NodeCmd::List => client.cluster_map().await?,
        NodeCmd::Add {
            addr,
            id,
            failure_domain,
            weight,
        } => {
            let id = client.add_node(addr, *id, failure_domain, *weight).await?;
            outln!("node {id} added at {addr}: start it with node_id = {id} and seeds");
            return Ok(());
        }
        NodeCmd::Drain { id } => {
            client
                .set_node(*id, Some(NodeState::Draining), None)
                .await?
        }
        NodeCmd::Out { id } => client.set_node(*id, Some(NodeState::Out), None).await?,
        NodeCmd::In { id } => client.set_node(*id, Some(NodeState::Up), None).await?,
        NodeCmd::Remove { id } => client.set_node(*id, Some(NodeState::Removed), None).await?,
        NodeCmd::SetWeight { id, weight } => client.set_node(*id, None, Some(*weight)).await?,
    };
    print_nodes(&map);
    Ok(())
}

/// `raftblk cluster flag NAME on|off`.
pub async fn set_flag(client: &Client, name: &str, on: bool) -> anyhow::Result<()> {
    let mut flags: ClusterFlags = client.cluster_map().await?.flags.unwrap_or_default();
    match name {
        "noout" => flags.noout = on,
        "norecover" => flags.norecover = on,
        "norebalance" => flags.norebalance = on,
        other => anyhow::bail!("unknown flag {other}"),
    }
    let map = client.set_flags(flags).await?;
    print_nodes(&map);
    Ok(())
}

/// One line on the placement driver's state.
pub fn describe_placement(p: &PlacementStatus) -> String {
    let eta = if p.eta_secs > 0 {
        format!(", about {} s left", p.eta_secs)
    } else {
        String::new()
    };
    format!(
        "{} degraded group(s), {} move(s) in progress, {} done ({:.1}/min){eta}",
        p.degraded_groups, p.moves_in_progress, p.moves_done, p.moves_per_min
    )
}

/// `raftblk cluster wait-healthy`: polls once a second until every group
/// has a leader, nothing is degraded and nothing moves; draws a progress
/// bar on a terminal, one line per change otherwise.
pub async fn wait_healthy(client: &Client, wait_secs: u64, balanced: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(wait_secs);
    let total = client.topology().data_groups + 1;
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last_line = String::new();
    let mut calm = 0u32;
    loop {
        let statuses = client.node_statuses().await;
        let mut led = std::collections::BTreeSet::new();
        let mut placement = None;
        for s in statuses.iter().filter_map(|(_, _, r)| r.as_ref().ok()) {
            for g in s.groups.iter().filter(|g| g.role == "leader") {
                led.insert(g.group_id);
            }
            if let Some(p) = s.placement.filter(|p| p.active) {
                placement = Some(p);
            }
        }
        let p = placement.unwrap_or_default();
        let busy = (p.degraded_groups.max(p.moves_in_progress)).min(total);
        let leaderless = total.saturating_sub(led.len() as u64);
        let healthy = total.saturating_sub(busy.max(leaderless));
        let healthy_now = placement.is_some() && healthy == total && p.groups_reported >= total;
        calm = if healthy_now && (!balanced || p.balanced) {
            calm + 1
        } else {
            0
        };
        let done = calm >= if balanced { 3 } else { 1 };
        let width = 30u64;
        let filled = (healthy * width / total.max(1)) as usize;
        let line = format!(
            "[{}{}] {healthy}/{total} groups healthy; {}",
            "#".repeat(filled),
            "-".repeat(width as usize - filled),
            if placement.is_some() {
                describe_placement(&p)
            } else {
                "no meta leader reports yet".to_string()
            }
        );
        if tty {
            out!("\r{line}\x1b[K");
            let _ = std::io::stdout().flush();
        } else if line != last_line {
            outln!("{line}");
        }
        last_line = line;
        if done {
            if tty {
                outln!();
            }
            outln!(
                "cluster healthy{}",
                if balanced { " and balanced" } else { "" }
            );
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            if tty {
                outln!();
            }
            anyhow::bail!("cluster not healthy after {wait_secs} s");
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}
