//! The Prometheus endpoints under a real guest workload: a Linux guest
//! runs fio on a raftblk-vhost disk (two queues) while the test scrapes
//! the daemon (`--metrics-addr`) and all three nodes (`metrics_addr`) in
//! the middle of the run and after it. The series that must move do
//! (proposals, fsyncs, raft messages, block I/O and its bytes, per-queue
//! requests), the daemon's request counts match the guest's own disk
//! statistics, and `promtool check metrics` accepts every output.

use std::process::{Command, Stdio};
use std::time::Duration;

use raftblk_cluster_tests::guest::{run_guest, VhostDaemon};
use raftblk_cluster_tests::metrics::{scrape, sum};
use raftblk_cluster_tests::{ClusterSpec, LocalCluster};

const GUEST_TIMEOUT: Duration = Duration::from_secs(600);

/// fio writes then reads for a few seconds each; the guest prints its
/// disk's completed reads and writes (`/sys/block/vda/stat` fields 1 and
/// 5) once everything is done.
const SCRIPT: &str = r#"#!/bin/sh
set -e
fio --name=w --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite \
    --bs=4k --iodepth=8 --size=32m --runtime=6 --time_based \
    --output-format=terse --terse-version=3 > /tmp/w.out 2>&1 &
sleep 3
echo RAFTBLK-METRICS-MID
wait
fio --name=r --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randread \
    --bs=4k --iodepth=8 --size=32m --runtime=3 --time_based \
    --output-format=terse --terse-version=3 > /tmp/r.out 2>&1
set -- $(cat /sys/block/vda/stat)
echo "RAFTBLK-METRICS-STAT $1 $5"
"#;

/// `promtool check metrics` on `text`: Ok, or what it said.
fn promtool_check(text: &str, what: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("promtool (deploy/install-deps.sh installs it): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "promtool check metrics rejects the {what} output:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn node_sum(texts: &[String], name: &str, labels: &[(&str, &str)]) -> f64 {
    texts.iter().map(|t| sum(t, name, labels)).sum()
}

#[test]
fn node_and_daemon_metrics_move_under_a_guest_workload() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let client = rt.block_on(cluster.client())?;
    rt.block_on(client.create_volume("vm", 128 << 20))?;
    let dir = tempfile::tempdir()?;
    let vhost = VhostDaemon::start_with(
        dir.path(),
        &cluster.cluster_arg(),
        "vm",
        2,
        &["--metrics-addr", "127.0.0.1:0"],
    )?;
    let daemon_addr = vhost.metrics_addr().ok_or_else(|| {
        anyhow::anyhow!(
            "the daemon logged no metrics address:\n{}",
            vhost.log_text()
        )
    })?;
    let node_addrs: Vec<_> = (1..=3)
        .map(|i| {
            cluster
                .metrics_addr(i)
                .ok_or_else(|| anyhow::anyhow!("node {i} logged no metrics address"))
        })
        .collect::<anyhow::Result<_>>()?;
    let scrape_nodes =
        || -> anyhow::Result<Vec<String>> { node_addrs.iter().map(|a| scrape(*a)).collect() };
    let before = scrape_nodes()?;
    let mut mid: Option<anyhow::Result<(Vec<String>, String)>> = None;
    let run = run_guest(&vhost.socket, 2, SCRIPT, GUEST_TIMEOUT, |line| {
        if line.contains("RAFTBLK-METRICS-MID") && mid.is_none() {
            mid = Some(scrape_nodes().and_then(|n| Ok((n, scrape(daemon_addr)?))));
        }
    })?;
    assert_eq!(run.exit, Some(0), "guest failed:\n{}", run.output);
    let (mid_nodes, mid_daemon) = mid.ok_or_else(|| anyhow::anyhow!("no mid-run marker"))??;
    let after = scrape_nodes()?;
    let daemon = scrape(daemon_addr)?;

    // The daemon: per-queue series for both queues, counts equal to what
    // the guest's disk completed, bytes of 4 KiB requests, latencies for
    // every answered request, nothing left in flight or failed.
    let stat = run
        .values("RAFTBLK-METRICS-STAT")
        .pop()
        .ok_or_else(|| anyhow::anyhow!("no disk statistics:\n{}", run.output))?;
    let guest_reads: f64 = stat.first().and_then(|v| v.parse().ok()).unwrap_or(-1.0);
    let guest_writes: f64 = stat.get(1).and_then(|v| v.parse().ok()).unwrap_or(-1.0);
    let vol = ("volume", "vm");
    let reqs = |text: &str, op: &str| sum(text, "raftblk_vhost_requests_total", &[vol, ("op", op)]);
    let (reads, writes) = (reqs(&daemon, "read"), reqs(&daemon, "write"));
    println!(
        "daemon: {reads} reads, {writes} writes (guest: {guest_reads}, {guest_writes}); mid-run {} writes",
        reqs(&mid_daemon, "write")
    );
    assert!(writes > 100.0, "too few writes counted:\n{daemon}");
    // The guest reads its statistics a moment before the daemon's final
    // scrape: a few requests (a probe of the partition table) may land
    // between the two.
    for (what, daemon_n, guest_n) in [
        ("writes", writes, guest_writes),
        ("reads", reads, guest_reads),
    ] {
        assert!(
            daemon_n >= guest_n && daemon_n <= guest_n + 16.0,
            "daemon {what} {daemon_n} vs {guest_n} in the guest's disk statistics"
        );
    }
    let mid_writes = reqs(&mid_daemon, "write");
    assert!(
        mid_writes > 0.0 && mid_writes < writes,
        "the mid-run scrape saw {mid_writes} of {writes} writes"
    );
    for q in ["0", "1"] {
        assert!(
            daemon.contains(&format!(
                "raftblk_vhost_requests_total{{op=\"write\",queue=\"{q}\",volume=\"vm\"}}"
            )),
            "no series for queue {q}:\n{daemon}"
        );
    }
    let write_bytes = sum(
        &daemon,
        "raftblk_vhost_request_bytes_total",
        &[vol, ("op", "write")],
    );
    assert!(
        write_bytes >= 4096.0 * (writes - 16.0),
        "{write_bytes} bytes for {writes} writes"
    );
    assert_eq!(
        sum(
            &daemon,
            "raftblk_vhost_request_duration_seconds_count",
            &[vol, ("op", "write")]
        ),
        writes,
        "a latency for every write"
    );
    assert_eq!(
        sum(&daemon, "raftblk_vhost_requests_in_flight", &[vol]),
        0.0
    );
    assert_eq!(
        sum(&daemon, "raftblk_vhost_request_errors_total", &[vol]),
        0.0
    );
    assert!(sum(&daemon, "process_resident_memory_bytes", &[]) > 0.0);

    // The nodes: every series that follows writes moved between the
    // scrapes, and the leaders served at least the guest's write bytes.
    for name in [
        "raftblk_node_proposals_total",
        "raftblk_node_proposal_duration_seconds_count",
        "raftblk_node_fsyncs_total",
        "raftblk_node_fsync_duration_seconds_count",
        "raftblk_node_raft_messages_sent_total",
        "raftblk_node_raft_message_sent_bytes_total",
        "raftblk_node_raft_messages_received_total",
        "raftblk_node_write_batch_groups_count",
        "raftblk_node_apply_batch_entries_count",
    ] {
        let (b, m, a) = (
            node_sum(&before, name, &[]),
            node_sum(&mid_nodes, name, &[]),
            node_sum(&after, name, &[]),
        );
        assert!(b < m && m < a, "{name} did not move: {b} -> {m} -> {a}");
    }
    let node_writes = node_sum(
        &after,
        "raftblk_node_block_requests_total",
        &[("op", "write")],
    ) - node_sum(
        &before,
        "raftblk_node_block_requests_total",
        &[("op", "write")],
    );
    let node_write_bytes = node_sum(&after, "raftblk_node_block_bytes_total", &[("op", "write")])
        - node_sum(
            &before,
            "raftblk_node_block_bytes_total",
            &[("op", "write")],
        );
    println!("nodes: {node_writes} block writes, {node_write_bytes} bytes");
    assert!(
        node_writes >= writes,
        "{node_writes} node writes for {writes} guest writes"
    );
    assert!(
        node_write_bytes >= write_bytes,
        "{node_write_bytes} < {write_bytes}"
    );
    let leaders = node_sum(&after, "raftblk_node_groups", &[("role", "leader")]);
    assert_eq!(
        leaders, 5.0,
        "4 data groups and the meta group have one leader each"
    );
    assert_eq!(node_sum(&after, "raftblk_cluster_driver_active", &[]), 1.0);
    assert_eq!(
        node_sum(&after, "raftblk_cluster_nodes", &[("state", "up")]),
        3.0
    );
    assert_eq!(
        node_sum(&after, "raftblk_cluster_degraded_groups", &[]),
        0.0
    );
    assert!(node_sum(&after, "raftblk_node_stored_bytes", &[]) > 0.0);

    for (i, t) in after.iter().enumerate() {
        promtool_check(t, &format!("node {}", i + 1))?;
    }
    promtool_check(&daemon, "raftblk-vhost")?;

    // Every raftblk series the dashboard and the alert rules query exists
    // (a renamed metric would leave an empty panel or a silent alert).
    let exported = format!("{}\n{daemon}", after.join("\n"));
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let mut missing = Vec::new();
    for file in ["grafana/raftblk.json", "prometheus/alerts.yml"] {
        let text = std::fs::read_to_string(deploy.join(file))?;
        for name in series_names(&text) {
            if !exported.contains(&format!("\n{name}")) {
                missing.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
    Ok(())
}

/// The `raftblk_*` metric names a dashboard or rule file mentions.
fn series_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("raftblk_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        // Recording-rule names of the check script, not series.
        if !name.starts_with("raftblk_dashboard") && name.len() > "raftblk_".len() {
            names.insert(name.to_owned());
        }
        rest = &tail[end..];
    }
    names
}
