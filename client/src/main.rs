//! `raftblk`: the admin CLI (cluster status, node and volume management,
//! raw image import/export, benchmark).

/// `println!` for the CLI's output: a reader that went away (`raftblk
/// volume list | head -3`) ends the command quietly, as Unix tools do,
/// instead of a panic with a backtrace.
macro_rules! outln {
    () => {
        $crate::write_out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::write_out(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for the CLI's output (see `outln!`).
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::write_out(format_args!($($arg)*))
    };
}

/// Writes to stdout; exits quietly with 141 (128 + SIGPIPE, what a shell
/// shows for a tool its pipe's reader closed) when the reader is gone.
fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let r = stdout.write_fmt(args).and_then(|()| stdout.flush());
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
        eprintln!("raftblk: cannot write to stdout: {e}");
        std::process::exit(1);
    }
}

mod bench;
mod cli_certs;
mod cli_node;
mod cli_output;
mod cli_snapshot;
mod cli_volume;
mod top;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};
use futures::stream::{self, StreamExt, TryStreamExt};
use raftblk_client::size::{format_size, parse_size};
use raftblk_client::{Client, ClientError, ClientOptions};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

#[derive(Parser, Debug)]
#[command(name = "raftblk", version, about = "raftblk admin CLI")]
struct Cli {
    /// Cluster node addresses (host:port, comma separated).
    #[arg(
        long,
        env = "RAFTBLK_CLUSTER",
        default_value = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103",
        global = true
    )]
    cluster: String,
    /// Deadline of one operation, retries included, in seconds.
    #[arg(long, default_value_t = 30, global = true)]
    timeout_secs: u64,
    #[command(flatten)]
    tls: raftblk_client::tls_args::TlsArgs,
    /// Output of the read commands (cluster status, volume list, volume
    /// info): text for people, json for scripts.
    #[arg(long, value_enum, default_value_t = cli_output::Output::Text, global = true)]
    output: cli_output::Output,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Cluster-wide operations.
    Cluster {
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Volume management.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Snapshots: create, list, delete, rollback (VOLUME@SNAPSHOT).
    Snapshot {
        #[command(subcommand)]
        cmd: cli_snapshot::SnapshotCmd,
    },
    /// Node management: list, add, drain, out, in, remove, set-weight.
    Node {
        #[command(subcommand)]
        cmd: cli_node::NodeCmd,
    },
    /// Benchmark a running cluster against this machine's local limits.
    Bench(bench::BenchArgs),
    /// Live view of the cluster from the nodes' metrics endpoints: per
    /// node and per volume IOPS, bandwidth and p99 latency, fsync p99,
    /// groups led, replica lag.
    Top(top::TopArgs),
    /// Certificates for mutual TLS: init (a CA and a cluster's
    /// certificates), issue, revoke.
    Certs {
        #[command(subcommand)]
        cmd: cli_certs::CertsCmd,
    },
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Members, groups, leaders, terms, indexes and health.
    Status,
    /// Wait until every group has a leader and its full set of healthy
    /// replicas and no replica is moving, showing progress.
    WaitHealthy {
        /// Give up (exit status 1) after this many seconds.
        #[arg(long, default_value_t = 600)]
        wait_secs: u64,
        /// Also wait until replicas and leaderships are balanced (after
        /// adding a node), for three seconds in a row.
        #[arg(long)]
        balanced: bool,
    },
    /// Set a cluster flag: `noout` (nodes that go down are never marked
    /// out: a planned reboot causes no rebuild), `norecover` (no automatic
    /// membership change), `norebalance` (repairs only, no balancing).
    Flag {
        #[arg(value_parser = ["noout", "norecover", "norebalance"])]
        name: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Create a thin volume.
    Create {
        name: String,
        /// Size, e.g. 10G (a multiple of 512 bytes).
        #[arg(long)]
        size: String,
        #[command(flatten)]
        qos: QosArgs,
    },
    /// Change a volume's I/O limits (the serving daemon applies them
    /// within a second; flags not given keep their value, 0 removes one).
    Set {
        name: String,
        #[command(flatten)]
        qos: QosArgs,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Info { name: String },
    /// Delete a volume (its blocks are freed in the background).
    Delete { name: String },
    /// Grow a volume.
    Grow {
        name: String,
        /// New size, e.g. 20G.
        #[arg(long)]
        size: String,
    },
    /// Copy a raw image file into a volume.
    Import { name: String, file: PathBuf },
    /// Copy a volume (or VOLUME@SNAPSHOT) into a raw image file (holding
    /// the volume's attach lease, unless a snapshot is read).
    Export {
        name: String,
        file: PathBuf,
        /// Read a volume attached elsewhere (a running guest's), without
        /// the lease: the image is consistent only if nothing writes.
        #[arg(long)]
        live: bool,
    },
    #[command(flatten)]
    Image(cli_snapshot::ImageCmd),
    /// Break a volume's attach lease (its holder is fenced by the next
    /// attach). For a holder that is gone; a live one loses the volume.
    Detach {
        name: String,
        /// Required: the lease belongs to another process.
        #[arg(long)]
        force: bool,
    },
}

/// Per-volume I/O limits (0: none). Requests above them are delayed,
/// never failed.
#[derive(clap::Args, Debug, Default)]
struct QosArgs {
    /// Operations per second, reads and writes together.
    #[arg(long)]
    iops_max: Option<u64>,
    #[arg(long)]
    read_iops_max: Option<u64>,
    #[arg(long)]
    write_iops_max: Option<u64>,
    /// Bytes per second, reads and writes together (e.g. 100M).
    #[arg(long)]
    bps_max: Option<String>,
    #[arg(long)]
    read_bps_max: Option<String>,
    #[arg(long)]
    write_bps_max: Option<String>,
    /// Operations allowed above the rate after an idle spell.
    #[arg(long)]
    iops_burst: Option<u64>,
    /// Bytes allowed above the rate after an idle spell (e.g. 64M).
    #[arg(long)]
    bps_burst: Option<String>,
}

impl QosArgs {
    fn is_empty(&self) -> bool {
        self.iops_max.is_none()
            && self.read_iops_max.is_none()
            && self.write_iops_max.is_none()
            && self.bps_max.is_none()
            && self.read_bps_max.is_none()
            && self.write_bps_max.is_none()
            && self.iops_burst.is_none()
            && self.bps_burst.is_none()
    }

    /// `base` with the limits given here replaced.
    fn apply(&self, base: raftblk_proto::QosLimits) -> anyhow::Result<raftblk_proto::QosLimits> {
        let bytes = |flag: &str, v: &Option<String>, old: u64| -> anyhow::Result<u64> {
            match v {
                None => Ok(old),
                Some(t) => parse_size(t).map_err(|e| anyhow::anyhow!("--{flag}: {e}")),
            }
        };
        Ok(raftblk_proto::QosLimits {
            iops_max: self.iops_max.unwrap_or(base.iops_max),
            read_iops_max: self.read_iops_max.unwrap_or(base.read_iops_max),
            write_iops_max: self.write_iops_max.unwrap_or(base.write_iops_max),
            bps_max: bytes("bps-max", &self.bps_max, base.bps_max)?,
            read_bps_max: bytes("read-bps-max", &self.read_bps_max, base.read_bps_max)?,
            write_bps_max: bytes("write-bps-max", &self.write_bps_max, base.write_bps_max)?,
            iops_burst: self.iops_burst.unwrap_or(base.iops_burst),
            bps_burst: bytes("bps-burst", &self.bps_burst, base.bps_burst)?,
        })
    }
}

/// `iops 500 (read -, write -), bytes/s -, ...` or `none`.
fn describe_qos(q: Option<&raftblk_proto::QosLimits>) -> String {
    let Some(q) = q.filter(|q| **q != raftblk_proto::QosLimits::default()) else {
        return "none".to_owned();
    };
    let n = |v: u64| {
        if v == 0 {
            "-".to_owned()
        } else {
            v.to_string()
        }
    };
    let b = |v: u64| {
        if v == 0 {
            "-".to_owned()
        } else {
            format!("{}/s", format_size(v))
        }
    };
    format!(
        "IOPS {} (read {}, write {}, burst {}); bandwidth {} (read {}, write {}, burst {})",
        n(q.iops_max),
        n(q.read_iops_max),
        n(q.write_iops_max),
        n(q.iops_burst),
        b(q.bps_max),
        b(q.read_bps_max),
        b(q.write_bps_max),
        if q.bps_burst == 0 {
            "-".to_owned()
        } else {
            format_size(q.bps_burst)
        }
    )
}

/// Bytes per import/export step.
const COPY_PIECE_BYTES: u64 = 1 << 20;
/// Steps in flight during import/export.
const COPY_IN_FLIGHT: usize = 8;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raftblk: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftblk: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let seeds: Vec<String> = cli
        .cluster
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let security = cli.tls.security().map_err(anyhow::Error::msg)?;
    let opts = ClientOptions {
        deadline: Duration::from_secs(cli.timeout_secs.max(1)),
        security,
        ..ClientOptions::default()
    };
    Ok(Client::connect(&seeds, opts).await?)
}

fn parse_volume_size(text: &str) -> anyhow::Result<u64> {
    let size = parse_size(text).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
    if size == 0 {
        bail!("--size: must be positive");
    }
    if size % 512 != 0 {
        bail!("--size: {size} bytes is not a multiple of 512");
    }
    Ok(size)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        Cmd::Cluster {
            cmd: ClusterCmd::Status,
        } => status(&connect(&cli).await?, cli.output).await,
        Cmd::Cluster {
            cmd:
                ClusterCmd::WaitHealthy {
                    wait_secs,
                    balanced,
                },
        } => cli_node::wait_healthy(&connect(&cli).await?, *wait_secs, *balanced).await,
        Cmd::Cluster {
            cmd: ClusterCmd::Flag { name, state },
        } => cli_node::set_flag(&connect(&cli).await?, name, state == "on").await,
        Cmd::Volume { cmd } => cli_volume::volume(&cli, cmd).await,
        Cmd::Snapshot { cmd } => cli_snapshot::snapshot(&connect(&cli).await?, cmd).await,
        Cmd::Node { cmd } => cli_node::run(&connect(&cli).await?, cmd).await,
        Cmd::Bench(args) => bench::run(&connect(&cli).await?, args).await,
        Cmd::Top(args) => top::run(&connect(&cli).await?, args).await,
        Cmd::Certs { cmd } => cli_certs::run(cmd),
    }
}

async fn status(client: &Client, output: cli_output::Output) -> anyhow::Result<()> {
    let topo = client.topology();
    if output == cli_output::Output::Json {
        let statuses = client.node_statuses().await;
        let mut v = cli_output::status(topo.data_groups, &statuses);
        v["cluster"] = serde_json::json!({
            "nodes": topo.nodes.len(),
            "data_groups": topo.data_groups,
            "replicas": topo.replicas,
            "chunk_size_bytes": topo.chunk_size_bytes,
        });
        outln!("{v:#}");
        return Ok(());
    }
    outln!(
        "cluster: {} nodes, {} data groups, {} replicas, chunk {}",
        topo.nodes.len(),
        topo.data_groups,
        topo.replicas,
        format_size(topo.chunk_size_bytes)
    );
    let statuses = client.node_statuses().await;
    // How recently any other node heard from each node on its raft stream.
    let mut heard: std::collections::BTreeMap<u64, u64> = std::collections::BTreeMap::new();
    for s in statuses.iter().filter_map(|(_, _, r)| r.as_ref().ok()) {
        for p in s.peers.iter().filter(|p| p.heard) {
            let e = heard.entry(p.node_id).or_insert(u64::MAX);
            *e = (*e).min(p.silent_ms);
        }
    }
    let heard_of = |id: &u64| match heard.get(id) {
        Some(ms) => format!("{ms}ms ago"),
        None => "-".to_string(),
    };
    outln!(
        "{:<6} {:<22} {:<8} {:>7} {:>9} {:>7} {:>10} {:>10} {:>12}",
        "NODE",
        "ADDRESS",
        "HEALTH",
        "GROUPS",
        "LEADING",
        "ASLEEP",
        "CRC-ERRS",
        "SNAPSHOTS",
        "PEERS-HEARD"
    );
    let mut leaders = std::collections::BTreeMap::new();
    for (id, addr, r) in &statuses {
        match r {
            Ok(s) => {
                let leading = s.groups.iter().filter(|g| g.role == "leader").count();
                for g in &s.groups {
                    if g.role == "leader" {
                        leaders.insert(g.group_id, (*id, g.clone()));
                    }
                }
                let asleep = s.groups.iter().filter(|g| g.hibernating).count();
                outln!(
                    "{:<6} {:<22} {:<8} {:>7} {:>9} {:>7} {:>10} {:>4}/{:<5} {:>12}",
                    id,
                    addr,
                    "up",
                    s.groups.len(),
                    leading,
                    asleep,
                    s.checksum_errors,
                    s.snapshots_sent,
                    s.snapshots_applied,
                    heard_of(id)
                );
            }
            Err(e) => outln!(
                "{:<6} {:<22} {:<8} (peers heard it {}; {e})",
                id,
                addr,
                "DOWN",
                heard_of(id)
            ),
        }
    }
    outln!();
    outln!(
        "{:<6} {:<14} {:<8} {:>6} {:>10} {:>10}",
        "GROUP",
        "REPLICAS",
        "LEADER",
        "TERM",
        "COMMIT",
        "APPLIED"
    );
    let mut unhealthy = 0;
    for g in 0..=topo.data_groups {
        let name = if g == 0 {
            "meta".to_string()
        } else {
            g.to_string()
        };
        match leaders.get(&g) {
            Some((l, st)) => {
                // Voters; learners as `+n`; a joint configuration's
                // outgoing voters as `-n`.
                let join = |v: &[u64], prefix: &str| {
                    v.iter().map(|r| format!("{prefix}{r}")).collect::<Vec<_>>()
                };
                let mut reps = join(&st.replicas, "");
                reps.extend(join(&st.learners, "+"));
                let outgoing: Vec<u64> = st
                    .voters_outgoing
                    .iter()
                    .copied()
                    .filter(|v| !st.replicas.contains(v))
                    .collect();
                reps.extend(join(&outgoing, "-"));
                outln!(
                    "{:<6} {:<14} {:<8} {:>6} {:>10} {:>10}",
                    name,
                    reps.join(","),
                    l,
                    st.term,
                    st.commit_index,
                    st.applied_index
                )
            }
            None => {
                unhealthy += 1;
                outln!("{:<6} {:<14} {:<8}", name, "?", "NONE")
            }
        }
    }
    let down = statuses.iter().filter(|(_, _, r)| r.is_err()).count();
    outln!();
    let placement = statuses
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok())
        .filter_map(|s| s.placement)
        .find(|p| p.active);
    let (degraded, moving) = match placement {
        Some(p) => {
            outln!("placement: {}", cli_node::describe_placement(&p));
            (p.degraded_groups, p.moves_in_progress)
        }
        None => {
            outln!("placement: no meta leader reports");
            (0, 0)
        }
    };
    if down == 0 && unhealthy == 0 && degraded == 0 && moving == 0 {
        outln!("health: OK");
    } else {
        outln!(
            "health: DEGRADED ({down} node(s) down, {unhealthy} group(s) without a leader, {degraded} degraded, {moving} moving)"
        );
    }
    Ok(())
}
