//! `raftblk top`: a live view of the cluster, refreshed every interval
//! from the nodes' Prometheus endpoints (found through each node's status:
//! `metrics_addr`) and, with `--daemon`, raftblk-vhost endpoints. Per node:
//! read and write IOPS, bandwidth and p99 latency as the node served them,
//! fsync p99, groups led, the slowest replica's lag, CPU and memory. Per
//! volume: the same I/O figures summed over the nodes (and, for volumes a
//! listed daemon serves, as its guest sees them). Rates are the change
//! between two scrapes over the time between them.

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use raftblk_client::Client;
use raftblk_metrics::scrape::{self, quantile_between, sum, Sample};

/// Longest one scrape may take (below the shortest interval).
const SCRAPE_TIMEOUT: Duration = Duration::from_millis(900);
/// Frames between two lookups of the endpoints and the volume names.
const REDISCOVER_FRAMES: u64 = 10;

#[derive(clap::Args, Debug)]
pub struct TopArgs {
    /// Seconds between two refreshes.
    #[arg(long, default_value_t = 1.0)]
    interval_secs: f64,
    /// Stop after this many frames (default: until interrupted).
    #[arg(long)]
    count: Option<u64>,
    /// A raftblk-vhost metrics endpoint (its --metrics-addr) to show
    /// guest-side figures from; repeatable.
    #[arg(long = "daemon")]
    daemons: Vec<SocketAddr>,
    /// Volumes shown at most (the busiest first).
    #[arg(long, default_value_t = 20)]
    volumes: usize,
}

/// One endpoint's last scrape.
struct Scraped {
    at: Instant,
    samples: Vec<Sample>,
}

struct Endpoint {
    /// Node id (0 for a daemon).
    node: u64,
    label: String,
    addr: SocketAddr,
    last: Option<Scraped>,
}

pub async fn run(client: &Client, args: &TopArgs) -> anyhow::Result<()> {
    if !(0.2..=3600.0).contains(&args.interval_secs) {
        anyhow::bail!(
            "--interval-secs: {} is not in 0.2..=3600",
            args.interval_secs
        );
    }
    let interval = Duration::from_secs_f64(args.interval_secs);
    let tty = std::io::stdout().is_terminal();
    let mut nodes: Vec<Endpoint> = Vec::new();
    let mut daemons: Vec<Endpoint> = args
        .daemons
        .iter()
        .map(|a| Endpoint {
            node: 0,
            label: a.to_string(),
            addr: *a,
            last: None,
        })
        .collect();
    let mut names: HashMap<String, String> = HashMap::new();
    let mut notes: Vec<String> = Vec::new();
    let mut frame = 0u64;
    let mut next = Instant::now();
    loop {
        if frame.is_multiple_of(REDISCOVER_FRAMES) {
            notes = discover(client, &mut nodes).await;
            if let Ok(vols) = client.list_volumes().await {
                names = vols
                    .into_iter()
                    .map(|v| (v.id.to_string(), v.name))
                    .collect();
            }
        }
        let node_rows = refresh(&mut nodes).await;
        let daemon_rows = refresh(&mut daemons).await;
        // The first scrape only sets the baseline.
        if frame > 0 {
            let mut text = String::new();
            render(
                &mut text,
                &node_rows,
                &daemon_rows,
                &names,
                &notes,
                interval,
                args.volumes,
            );
            if tty {
                out!("\x1b[H\x1b[2J{text}");
            } else {
                outln!("{text}");
            }
            if args.count.is_some_and(|c| frame >= c) {
                return Ok(());
            }
        }
        frame += 1;
        next += interval;
        let now = Instant::now();
        if next < now {
            next = now;
        }
        tokio::time::sleep_until(next.into()).await;
    }
}

/// Finds each node's metrics endpoint; returns notes on nodes without one.
async fn discover(client: &Client, nodes: &mut Vec<Endpoint>) -> Vec<String> {
    let mut notes = Vec::new();
    let mut found = Vec::new();
    for (id, addr, status) in client.node_statuses().await {
        match status {
            Ok(s) if !s.metrics_addr.is_empty() => match s.metrics_addr.parse::<SocketAddr>() {
                // A node listening on every address is read on the one its
                // gRPC address names.
                Ok(mut m) => {
                    if m.ip().is_unspecified() {
                        if let Ok(a) = addr.parse::<SocketAddr>() {
                            m.set_ip(a.ip());
                        }
                    }
                    found.push((id, addr, m));
                }
                Err(e) => notes.push(format!("node {id}: metrics_addr {:?}: {e}", s.metrics_addr)),
            },
            Ok(_) => notes.push(format!("node {id} ({addr}): no metrics_addr in its config")),
            Err(e) => notes.push(format!("node {id} ({addr}): {e}")),
        }
    }
    let mut old: HashMap<SocketAddr, Endpoint> = nodes.drain(..).map(|e| (e.addr, e)).collect();
    for (id, addr, m) in found {
        nodes.push(old.remove(&m).unwrap_or(Endpoint {
            node: id,
            label: addr,
            addr: m,
            last: None,
        }));
    }
    notes
}

/// One endpoint's figures over the last interval.
struct Row {
    node: u64,
    label: String,
    error: Option<String>,
    before: Vec<Sample>,
    after: Vec<Sample>,
    secs: f64,
}

impl Row {
    fn rate(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        if self.secs <= 0.0 {
            return 0.0;
        }
        ((sum(&self.after, name, labels) - sum(&self.before, name, labels)) / self.secs).max(0.0)
    }

    fn p99_ms(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        quantile_between(&self.before, &self.after, name, labels, 0.99).map(|s| s * 1000.0)
    }

    fn now(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sum(&self.after, name, labels)
    }
}

/// Scrapes every endpoint at once; rows for those with two scrapes.
async fn refresh(endpoints: &mut [Endpoint]) -> Vec<Row> {
    let fetched = futures::future::join_all(
        endpoints
            .iter()
            .map(|e| scrape::fetch(e.addr, SCRAPE_TIMEOUT)),
    )
    .await;
    let mut rows = Vec::new();
    for (e, r) in endpoints.iter_mut().zip(fetched) {
        let at = Instant::now();
        match r {
            Ok(text) => {
                let samples = scrape::parse(&text);
                let (before, secs) = match e.last.take() {
                    Some(l) => (l.samples, at.duration_since(l.at).as_secs_f64()),
                    None => (samples.clone(), 0.0),
                };
                rows.push(Row {
                    node: e.node,
                    label: e.label.clone(),
                    error: None,
                    before,
                    after: samples.clone(),
                    secs,
                });
                e.last = Some(Scraped { at, samples });
            }
            Err(err) => {
                e.last = None;
                rows.push(Row {
                    node: e.node,
                    label: e.label.clone(),
                    error: Some(err.to_string()),
                    before: Vec::new(),
                    after: Vec::new(),
                    secs: 0.0,
                });
            }
        }
    }
    rows
}

fn ms(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.2}"))
}

fn mib(bytes_per_sec: f64) -> String {
    format!("{:.1}", bytes_per_sec / (1024.0 * 1024.0))
}

fn render(
    out: &mut String,
    nodes: &[Row],
    daemons: &[Row],
    names: &HashMap<String, String>,
    notes: &[String],
    interval: Duration,
    volumes_max: usize,
) {
    use std::fmt::Write as _;
    let max_of = |name: &str| {
        nodes
            .iter()
            .map(|r| r.now(name, &[]))
            .fold(0.0f64, f64::max)
    };
    let _ = writeln!(
        out,
        "raftblk top: {} nodes, every {:.1} s; degraded groups {}, moving {}, nodes down/out {}",
        nodes.len(),
        interval.as_secs_f64(),
        max_of("raftblk_cluster_degraded_groups"),
        max_of("raftblk_cluster_moving_groups"),
        nodes
            .iter()
            .map(|r| r.now("raftblk_cluster_nodes", &[("state", "down")])
                + r.now("raftblk_cluster_nodes", &[("state", "out")]))
            .fold(0.0f64, f64::max),
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:>4} {:<21} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>5} {:>7} {:>5} {:>7}",
        "NODE",
        "ADDRESS",
        "R IOPS",
        "W IOPS",
        "R MiB/s",
        "W MiB/s",
        "R p99ms",
        "W p99ms",
        "FSYNC p99",
        "LEADS",
        "LAG",
        "CPU%",
        "RSS MiB"
    );
    let block = "raftblk_node_block_request_duration_seconds";
    for r in nodes {
        if let Some(e) = &r.error {
            let _ = writeln!(out, "{:>4} {:<21} unreachable: {e}", r.node, r.label);
            continue;
        }
        let _ = writeln!(
            out,
            "{:>4} {:<21} {:>8.0} {:>8.0} {:>8} {:>8} {:>8} {:>8} {:>9} {:>5} {:>7} {:>5.0} {:>7.0}",
            r.node,
            r.label,
            r.rate("raftblk_node_block_requests_total", &[("op", "read")]),
            r.rate("raftblk_node_block_requests_total", &[("op", "write")]),
            mib(r.rate("raftblk_node_block_bytes_total", &[("op", "read")])),
            mib(r.rate("raftblk_node_block_bytes_total", &[("op", "write")])),
            ms(r.p99_ms(block, &[("op", "read")])),
            ms(r.p99_ms(block, &[("op", "write")])),
            ms(r.p99_ms("raftblk_node_fsync_duration_seconds", &[])),
            r.now("raftblk_node_groups", &[("role", "leader")]),
            r.now("raftblk_node_replica_lag_entries_max", &[]),
            100.0 * r.rate("raftblk_process_cpu_seconds_total", &[]),
            r.now("process_resident_memory_bytes", &[]) / (1024.0 * 1024.0),
        );
    }
    // Volumes: every node's share of each volume's I/O, summed.
    let merged = |pick: fn(&Row) -> &Vec<Sample>| -> Vec<Sample> {
        nodes.iter().flat_map(|r| pick(r).iter().cloned()).collect()
    };
    let all = Row {
        node: 0,
        label: String::new(),
        error: None,
        before: merged(|r| &r.before),
        after: merged(|r| &r.after),
        secs: nodes
            .iter()
            .filter(|r| r.error.is_none())
            .map(|r| r.secs)
            .fold(0.0, f64::max),
    };
    let mut ids: BTreeMap<String, f64> = BTreeMap::new();
    for s in &all.after {
        if s.name == "raftblk_node_block_requests_total" {
            if let Some(v) = s.label("volume") {
                ids.entry(v.to_owned()).or_insert(0.0);
            }
        }
    }
    let mut vols: Vec<(String, f64)> = ids
        .into_keys()
        .map(|id| {
            let iops = all.rate("raftblk_node_block_requests_total", &[("volume", &id)]);
            (id, iops)
        })
        .filter(|(_, iops)| *iops > 0.0)
        .collect();
    vols.sort_by(|a, b| b.1.total_cmp(&a.1));
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "VOLUME (at the nodes)",
        "ID",
        "R IOPS",
        "W IOPS",
        "R MiB/s",
        "W MiB/s",
        "R p99ms",
        "W p99ms"
    );
    if vols.is_empty() {
        let _ = writeln!(out, "(no volume I/O in the last interval)");
    }
    let vsec = "raftblk_node_volume_request_duration_seconds";
    for (id, _) in vols.iter().take(volumes_max) {
        let name = names
            .get(id)
            .map_or(if id == "other" { "(others)" } else { "?" }, String::as_str);
        let v: &str = id;
        let _ = writeln!(
            out,
            "{:<24} {:>6} {:>8.0} {:>8.0} {:>8} {:>8} {:>8} {:>8}",
            name,
            id,
            all.rate(
                "raftblk_node_block_requests_total",
                &[("op", "read"), ("volume", v)]
            ),
            all.rate(
                "raftblk_node_block_requests_total",
                &[("op", "write"), ("volume", v)]
            ),
            mib(all.rate(
                "raftblk_node_block_bytes_total",
                &[("op", "read"), ("volume", v)]
            )),
            mib(all.rate(
                "raftblk_node_block_bytes_total",
                &[("op", "write"), ("volume", v)]
            )),
            ms(all.p99_ms(vsec, &[("op", "read"), ("volume", v)])),
            ms(all.p99_ms(vsec, &[("op", "write"), ("volume", v)])),
        );
    }
    if !daemons.is_empty() {
        render_daemons(out, daemons);
    }
    for n in notes {
        let _ = writeln!(out, "note: {n}");
    }
}

/// Per volume as its guest sees it (raftblk-vhost endpoints).
fn render_daemons(out: &mut String, daemons: &[Row]) {
    use std::fmt::Write as _;
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<24} {:<21} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6}",
        "VOLUME (guest side)",
        "DAEMON",
        "R IOPS",
        "W IOPS",
        "R MiB/s",
        "W MiB/s",
        "R p99ms",
        "W p99ms",
        "QUEUED",
        "ERR/s"
    );
    let reqs = "raftblk_vhost_requests_total";
    let bytes = "raftblk_vhost_request_bytes_total";
    let lat = "raftblk_vhost_request_duration_seconds";
    for r in daemons {
        if let Some(e) = &r.error {
            let _ = writeln!(out, "{:<24} {:<21} unreachable: {e}", "-", r.label);
            continue;
        }
        let mut vols: Vec<String> = r
            .after
            .iter()
            .filter(|s| s.name == reqs)
            .filter_map(|s| s.label("volume").map(str::to_owned))
            .collect();
        vols.sort();
        vols.dedup();
        for v in &vols {
            let v: &str = v;
            let _ = writeln!(
                out,
                "{:<24} {:<21} {:>8.0} {:>8.0} {:>8} {:>8} {:>8} {:>8} {:>6} {:>6.0}",
                v,
                r.label,
                r.rate(reqs, &[("op", "read"), ("volume", v)]),
                r.rate(reqs, &[("op", "write"), ("volume", v)]),
                mib(r.rate(bytes, &[("op", "read"), ("volume", v)])),
                mib(r.rate(bytes, &[("op", "write"), ("volume", v)])),
                ms(r.p99_ms(lat, &[("op", "read"), ("volume", v)])),
                ms(r.p99_ms(lat, &[("op", "write"), ("volume", v)])),
                r.now("raftblk_vhost_requests_in_flight", &[("volume", v)]),
                r.rate("raftblk_vhost_request_errors_total", &[("volume", v)]),
            );
        }
    }
}
