//! The failure-injection suite. Each scenario starts a cluster of real node
//! processes, runs the recording workload through the client library,
//! injects its fault, heals, reads everything back, checks the history
//! (per-block register linearizability, see `history`) and the convergence
//! of every group's replicas, and prints one report line; the suite prints
//! the table at the end and fails if any scenario saw an anomaly.
//!
//!   cargo test --release -p raftblk-cluster-tests --test suite              # all
//!   cargo test --release -p raftblk-cluster-tests --test suite -- leader_kill  # one
//!
//! Faults here are process faults on loopback (kill -9, SIGSTOP, restarts,
//! corruption of a stopped replica).

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use raftblk_client::ClientOptions;
use raftblk_cluster_tests::history::check;
use raftblk_cluster_tests::workload::{summarize, Workload, WorkloadSpec};
use raftblk_cluster_tests::{ClusterSpec, LocalCluster};

type Fault =
    for<'a> fn(&'a mut LocalCluster) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + 'a>>;

struct Scenario {
    name: &'static str,
    nodes: usize,
    fault: Fault,
}

/// Scenarios in which some group loses its majority for a while (all
/// nodes down, 2 of 5 down, a 2|3 split): I/O may stall past the client's
/// deadline there, so failed operations are reported, not a failure.
const QUORUM_LOSS_SCENARIOS: &[&str] = &["kill_all", "five_nodes_lose_two", "minority_split"];

/// Scenarios that need every node in its own network namespace.
const NETNS_SCENARIOS: &[&str] = &[
    "leader_isolated",
    "meta_leader_isolated",
    "minority_split",
    "asymmetric_partition",
    "slow_link",
];

struct Report {
    name: &'static str,
    ops: usize,
    acked_writes: usize,
    errors: usize,
    longest_gap: Duration,
    anomalies: usize,
    note: String,
    failure: Option<String>,
}

const HEALTHY: Duration = Duration::from_secs(40);

fn sleep(ms: u64) -> tokio::time::Sleep {
    tokio::time::sleep(Duration::from_millis(ms))
}

async fn some_leader(c: &LocalCluster, group: u64) -> anyhow::Result<usize> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(l) = c.leader_of(group).await {
            return Ok(l);
        }
        anyhow::ensure!(Instant::now() < deadline, "group {group} has no leader");
        sleep(100).await;
    }
}

fn leader_kill(c: &mut LocalCluster) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        let l = some_leader(c, 1).await?;
        c.kill(l);
        sleep(4000).await;
        c.start_node(l)?;
        Ok(format!("killed node {l} (leader of group 1) for 4 s"))
    })
}

fn follower_kill(
    c: &mut LocalCluster,
) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        let l = some_leader(c, 1).await?;
        let f = (1..=c.spec.nodes).find(|&i| i != l).unwrap_or(1);
        c.kill(f);
        sleep(4000).await;
        c.start_node(f)?;
        Ok(format!("killed node {f} (a follower of group 1) for 4 s"))
    })
}

fn rolling_restart(
    c: &mut LocalCluster,
) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        for i in 1..=c.spec.nodes {
            c.stop(i);
            sleep(1000).await;
            c.start_node(i)?;
            c.wait_healthy(HEALTHY).await?;
        }
        Ok("stopped and restarted every node in turn".into())
    })
}

fn leader_pause(
    c: &mut LocalCluster,
) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        let l = some_leader(c, 1).await?;
        let pid = c.pid(l).ok_or_else(|| anyhow::anyhow!("no pid"))?;
        // SAFETY: signals to a node process this test started and has not reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
        // Well past the election timeout (10 ticks x 50 ms).
        sleep(3000).await;
        // SAFETY: as above.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
        Ok(format!("paused node {l} (leader of group 1) for 3 s"))
    })
}

fn kill_all(c: &mut LocalCluster) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        for i in 1..=c.spec.nodes {
            c.kill(i);
        }
        sleep(1000).await;
        for i in 1..=c.spec.nodes {
            c.start_node(i)?;
        }
        Ok("kill -9 of every node at once, then restart".into())
    })
}

fn corrupted_replica(
    c: &mut LocalCluster,
) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        // A cold volume the workload never writes: its blocks stay corrupt
        // on the victim until something reads them.
        let client = c.client().await?;
        let cold = client.create_volume("cold", 1 << 20).await?;
        let vol = client.open_volume("cold").await?;
        let data = raftblk_cluster_tests::payload(77, 1 << 20);
        vol.write(0, &data).await?;
        // Every replica has the cold blocks before the victim stops (the
        // workload goes on meanwhile, so replicas are never identical for
        // long: wait for the writes to be applied, not for equality).
        for g in 0..=c.spec.data_groups {
            c.wait_applied(g, Duration::from_secs(20)).await?;
        }
        let victim = 2;
        c.stop(victim);
        let mut flipped = 0;
        {
            let engine = raftblk_node::engine::Engine::open(&c.data_dir(victim))?;
            let db = engine.db();
            let iter = db.iterator_cf(engine.kv_cf(), rocksdb::IteratorMode::Start);
            let mut puts = Vec::new();
            for item in iter {
                let (k, v) = item?;
                // Every stored block of the cold volume, and some others.
                let is_block = k.len() == 25 && k[8] == b'b';
                let volume = u64::from_be_bytes(
                    k.get(9..17)
                        .and_then(|s| s.try_into().ok())
                        .unwrap_or_default(),
                );
                if is_block && (volume == cold.id || flipped < 64) {
                    let mut v = v.to_vec();
                    v[200] ^= 0x5a;
                    puts.push((k.to_vec(), v));
                    flipped += 1;
                }
            }
            for (k, v) in puts {
                db.put_cf(engine.kv_cf(), k, v)?;
            }
            db.flush_cf(engine.kv_cf())?;
        }
        c.start_node(victim)?;
        c.wait_healthy(HEALTHY).await?;
        // Ask once for the corrupt replica to lead every group (it hands
        // leadership away again when it meets a bad block).
        for g in 1..=c.spec.data_groups {
            c.request_transfer_leader(g, victim).await;
        }
        sleep(1000).await;
        let got = vol.read(0, 1 << 20).await?;
        anyhow::ensure!(
            got == data,
            "a read of the cold volume returned wrong bytes"
        );
        let met = c.status(victim).await?.checksum_errors;
        anyhow::ensure!(
            met > 0,
            "the corrupt replica never met a bad block: the scenario tested nothing"
        );
        Ok(format!(
            "flipped bytes in {flipped} stored blocks of node {victim} and made it leader; it met {met} checksum errors, readers got good copies"
        ))
    })
}

fn five_nodes_lose_two(
    c: &mut LocalCluster,
) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        c.kill(1);
        c.kill(2);
        sleep(5000).await;
        c.start_node(1)?;
        sleep(3000).await;
        c.start_node(2)?;
        Ok("kill -9 of nodes 1 and 2 of 5; node 1 back after 5 s, node 2 after 8 s".into())
    })
}

/// 6 nodes: node 6 hosts no meta replica; it leads the data groups it
/// replicates (so it serves I/O checked against its cached volume
/// records) while the meta leader is killed and restarted.
fn six_nodes_kill_meta_leader(
    c: &mut LocalCluster,
) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        let ids: Vec<u64> = (1..=c.spec.nodes as u64).collect();
        let mut led = Vec::new();
        for g in 1..=c.spec.data_groups {
            let replicas = raftblk_proto::placement::group_replicas(&ids, g, c.spec.replicas);
            if replicas.contains(&6) {
                c.transfer_leader(g, 6, Duration::from_secs(10)).await?;
                led.push(g);
            }
        }
        let m = some_leader(c, 0).await?;
        anyhow::ensure!(m != 6, "node 6 leads the meta group");
        c.kill(m);
        sleep(5000).await;
        c.start_node(m)?;
        Ok(format!(
            "node 6 (no meta replica) led groups {led:?}; kill -9 of meta leader node {m}, back after 5 s"
        ))
    })
}

fn fsync_error(c: &mut LocalCluster) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        let l = some_leader(c, 1).await?;
        let f = (1..=c.spec.nodes).find(|&i| i != l).unwrap_or(1);
        // Restart a follower with a failpoint: its 300th synced write fails.
        c.kill(f);
        c.set_next_env(f, &[("FAILPOINTS", "engine_sync_write=300*off->return")]);
        c.start_node(f)?;
        let code = c.wait_exit(f, Duration::from_secs(30));
        anyhow::ensure!(
            code == Some(70),
            "node {f} did not fail-stop on the fsync error (exit {code:?})"
        );
        sleep(1000).await;
        c.start_node(f)?;
        Ok(format!(
            "fsync failed on node {f}: it stopped (exit 70), was restarted and caught up"
        ))
    })
}

fn full_disk(c: &mut LocalCluster) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        let (n, _) = c
            .spec
            .tmpfs_node
            .ok_or_else(|| anyhow::anyhow!("no tmpfs node"))?;
        // The workload fills node n's small disk; it must stop by itself.
        let code = c.wait_exit(n, Duration::from_secs(60));
        anyhow::ensure!(code.is_some(), "node {n} never noticed its full disk");
        sleep(1000).await;
        c.grow_tmpfs(n, 1024)?;
        c.start_node(n)?;
        Ok(format!("node {n}'s disk filled up: it stopped (exit {code:?}); space freed, restarted, caught up"))
    })
}

/// Cuts the current leader of `group` off from its peers for 5 s (clients
/// can still reach it).
async fn isolate_leader_of(c: &LocalCluster, group: u64) -> anyhow::Result<usize> {
    let l = some_leader(c, group).await?;
    let others: Vec<usize> = (1..=c.spec.nodes).filter(|&i| i != l).collect();
    let net = c
        .net
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("needs network namespaces"))?;
    net.isolate(l, &others)?;
    sleep(5000).await;
    net.heal()?;
    Ok(l)
}

fn leader_isolated(
    c: &mut LocalCluster,
) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        let l = isolate_leader_of(c, 1).await?;
        Ok(format!("isolated node {l} (leader of group 1) from its peers for 5 s; clients could still reach it"))
    })
}

fn meta_leader_isolated(
    c: &mut LocalCluster,
) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        let l = isolate_leader_of(c, 0).await?;
        Ok(format!(
            "isolated node {l} (leader of the meta group) from its peers for 5 s"
        ))
    })
}

fn minority_split(
    c: &mut LocalCluster,
) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        // 5 nodes: {1, 2} | {3, 4, 5}.
        let net = c
            .net
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("needs network namespaces"))?;
        for i in [1, 2] {
            net.isolate(i, &[3, 4, 5])?;
        }
        for i in [3, 4, 5] {
            net.isolate(i, &[1, 2])?;
        }
        sleep(5000).await;
        net.heal()?;
        Ok("split 5 nodes into {1,2} and {3,4,5} for 5 s".into())
    })
}

fn asymmetric_partition(
    c: &mut LocalCluster,
) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        let l = some_leader(c, 1).await?;
        let net = c
            .net
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("needs network namespaces"))?;
        // The leader's messages are lost; it still hears its followers.
        for j in (1..=c.spec.nodes).filter(|&i| i != l) {
            net.cut_one_way(l, j)?;
        }
        sleep(5000).await;
        net.heal()?;
        Ok(format!(
            "dropped everything node {l} (leader of group 1) sent to its peers for 5 s"
        ))
    })
}

fn slow_link(c: &mut LocalCluster) -> Pin<Box<dyn Future<Output = anyhow::Result<String>> + '_>> {
    Box::pin(async move {
        let f = c
            .spec
            .delay_proxy_node
            .ok_or_else(|| anyhow::anyhow!("needs the delay proxy"))?;
        // Make it a follower everywhere first.
        let other = if f == 1 { 2 } else { 1 };
        for g in 0..=c.spec.data_groups {
            if c.leader_of(g).await == Some(f) {
                c.transfer_leader(g, other, Duration::from_secs(10)).await?;
            }
        }
        let net = c
            .net
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("needs network namespaces"))?;
        // Everything sent to the follower arrives 150 ms late, and what it
        // sends is limited to 2 Mbit/s.
        net.slow_link(f, "2mbit")?;
        if let Some(d) = &c.delay {
            d.set_delay(150);
        }
        sleep(1000).await;
        // The delay is real: a status call to the slow node takes at least
        // the delay (requests go through the proxy).
        let t = Instant::now();
        c.status(f).await?;
        let rtt = t.elapsed();
        anyhow::ensure!(
            rtt >= Duration::from_millis(150),
            "status of node {f} took {rtt:?}: no delay"
        );
        sleep(5000).await;
        if let Some(d) = &c.delay {
            d.set_delay(0);
        }
        net.heal()?;
        Ok(format!(
            "follower node {f}: 150 ms delay on everything it receives (proxy; a status call took {} ms) and 2 Mbit/s out (tbf) for 6 s",
            rtt.as_millis()
        ))
    })
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "leader_kill",
        nodes: 3,
        fault: leader_kill,
    },
    Scenario {
        name: "follower_kill",
        nodes: 3,
        fault: follower_kill,
    },
    Scenario {
        name: "rolling_restart",
        nodes: 3,
        fault: rolling_restart,
    },
    Scenario {
        name: "leader_pause",
        nodes: 3,
        fault: leader_pause,
    },
    Scenario {
        name: "kill_all",
        nodes: 3,
        fault: kill_all,
    },
    Scenario {
        name: "corrupted_replica",
        nodes: 3,
        fault: corrupted_replica,
    },
    Scenario {
        name: "five_nodes_lose_two",
        nodes: 5,
        fault: five_nodes_lose_two,
    },
    Scenario {
        name: "six_nodes_kill_meta_leader",
        nodes: 6,
        fault: six_nodes_kill_meta_leader,
    },
    Scenario {
        name: "fsync_error",
        nodes: 3,
        fault: fsync_error,
    },
    Scenario {
        name: "full_disk",
        nodes: 3,
        fault: full_disk,
    },
    Scenario {
        name: "leader_isolated",
        nodes: 3,
        fault: leader_isolated,
    },
    Scenario {
        name: "meta_leader_isolated",
        nodes: 3,
        fault: meta_leader_isolated,
    },
    Scenario {
        name: "minority_split",
        nodes: 5,
        fault: minority_split,
    },
    Scenario {
        name: "asymmetric_partition",
        nodes: 3,
        fault: asymmetric_partition,
    },
    Scenario {
        name: "slow_link",
        nodes: 3,
        fault: slow_link,
    },
];

/// Scenarios that need root: a tmpfs mount, network namespaces.
fn needs_root(s: &Scenario) -> bool {
    s.name == "full_disk" || NETNS_SCENARIOS.contains(&s.name)
}

fn spec_for(s: &Scenario) -> anyhow::Result<ClusterSpec> {
    let is_root = unsafe_getuid() == 0;
    if needs_root(s) && !is_root {
        anyhow::bail!("needs root (tmpfs mount / network namespaces)");
    }
    Ok(ClusterSpec {
        nodes: s.nodes,
        // Six nodes: enough groups that every node replicates some.
        data_groups: if s.nodes >= 6 { 6 } else { 4 },
        chunk_size_bytes: 64 * 1024,
        tmpfs_node: (s.name == "full_disk").then_some((3, 48)),
        // The scenario checks that a node whose disk fills up stops
        // (fail-stop): no refusal before it (tests/join.rs checks that).
        full_ratios: (s.name == "full_disk").then_some((0.85, 1.0)),
        netns: NETNS_SCENARIOS.contains(&s.name),
        // The slow node (made a follower of every group by the scenario).
        delay_proxy_node: (s.name == "slow_link").then_some(3),
        ..ClusterSpec::default()
    })
}

async fn run(s: &Scenario, mut cluster: LocalCluster) -> anyhow::Result<Report> {
    cluster.wait_healthy(HEALTHY).await?;
    let opts = ClientOptions {
        deadline: Duration::from_secs(10),
        attempt_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    };
    let client = cluster.client_with(opts.clone()).await?;
    let mut volumes = Vec::new();
    for v in 0..2 {
        let name = format!("{}-{v}", s.name);
        client.create_volume(&name, 1 << 20).await?;
        volumes.push(client.open_volume(&name).await?);
    }
    let wspec = WorkloadSpec::default();
    let blocks = wspec.blocks;
    let mut wl = Workload::start(volumes.clone(), wspec, 0x5eed);
    sleep(2000).await;
    let note = (s.fault)(&mut cluster).await?;
    cluster.wait_healthy(HEALTHY).await?;
    sleep(2000).await;
    wl.stop().await;
    let end = wl.started.elapsed();
    // Read everything back with a patient client.
    let patient = cluster
        .client_with(ClientOptions {
            deadline: Duration::from_secs(30),
            ..opts
        })
        .await?;
    let mut fresh = Vec::new();
    for v in 0..2 {
        fresh.push(patient.open_volume(&format!("{}-{v}", s.name)).await?);
    }
    wl.final_reads(&fresh, blocks).await;
    let history = wl.history();
    let summary = summarize(&history, end);
    let anomalies = check(&history);
    let mut failure = None;
    if !anomalies.is_empty() {
        failure = Some(format!(
            "{} anomalies, first: {:?}",
            anomalies.len(),
            &anomalies[..anomalies.len().min(3)]
        ));
    }
    // Convergence: every group's replicas hold identical state.
    for g in 0..=cluster.spec.data_groups {
        if let Err(e) = cluster
            .wait_replicas_identical(g, Duration::from_secs(30))
            .await
        {
            failure.get_or_insert(format!("no convergence: {e}"));
        }
    }
    // Availability: where every group keeps a majority up (the promise),
    // no operation fails. Scenarios that take a majority of some group
    // down for seconds only report their errors.
    if summary.errors > 0 && !QUORUM_LOSS_SCENARIOS.contains(&s.name) {
        failure.get_or_insert(format!(
            "{} operations failed or timed out: the workload saw I/O errors",
            summary.errors
        ));
    }
    let final_reads_failed = history
        .iter()
        .filter(|o| o.client == u32::MAX && o.complete.is_none())
        .count();
    if final_reads_failed > 0 {
        failure.get_or_insert(format!(
            "{final_reads_failed} final reads failed after healing"
        ));
    }
    Ok(Report {
        name: s.name,
        ops: summary.ops,
        acked_writes: summary.acked_writes,
        errors: summary.errors,
        longest_gap: summary.longest_gap,
        anomalies: anomalies.len(),
        note,
        failure,
    })
}

/// Sets up the cluster in the host namespace, then runs the scenario; for
/// network-namespace scenarios every client thread (and this one, for the
/// duration) lives in the test's client namespace.
fn run_one(s: &Scenario, rt: &tokio::runtime::Runtime) -> anyhow::Result<Report> {
    let spec = spec_for(s)?;
    let cluster = LocalCluster::start(spec)?;
    let Some(client_ns) = cluster
        .net
        .as_ref()
        .map(|n| format!("/run/netns/{}", n.client_ns()))
    else {
        return rt.block_on(run(s, cluster));
    };
    let host = std::fs::File::open("/proc/thread-self/ns/net")?;
    let ns_for_threads = client_ns.clone();
    let nrt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            if let Err(e) = raftblk_cluster_tests::netns::enter(&ns_for_threads) {
                eprintln!("cannot enter the client namespace: {e}");
            }
        })
        .build()?;
    raftblk_cluster_tests::netns::enter(&client_ns)?;
    let r = nrt.block_on(run(s, cluster));
    drop(nrt);
    // Back to the host namespace for the next scenario.
    // SAFETY: setns(2) with an fd we own for this process's original netns.
    unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&host), libc::CLONE_NEWNET) };
    r
}

fn unsafe_getuid() -> u32 {
    // SAFETY: getuid(2) has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

fn main() -> std::process::ExitCode {
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let is_root = unsafe_getuid() == 0;
    if is_root {
        println!("failure-injection suite: network namespaces per node for partition/slow-link scenarios, loopback for process faults");
    } else {
        println!("failure-injection suite: not root: the process-fault scenarios run on loopback; full_disk and the network scenarios are skipped (they need root: a tmpfs mount, network namespaces)");
    }
    // Negative control: the checker must flag a stale read, a lost write and
    // a new->old inversion.
    {
        let n = raftblk_cluster_tests::history::negative_control();
        let verdict = if n.caught() {
            "caught (as it should)"
        } else {
            "NOT CAUGHT"
        };
        println!("negative_control       {n}: {verdict}");
        if !n.caught() {
            return std::process::ExitCode::FAILURE;
        }
    }
    let mut reports = Vec::new();
    let started = Instant::now();
    let mut skipped = 0usize;
    for s in SCENARIOS {
        if !filter.is_empty() && !filter.iter().any(|f| s.name.contains(f.as_str())) {
            continue;
        }
        if needs_root(s) && !is_root {
            println!(
                "{:<22} SKIPPED: needs root ({})",
                s.name,
                if s.name == "full_disk" {
                    "mounts a size-limited tmpfs"
                } else {
                    "creates network namespaces"
                }
            );
            skipped += 1;
            continue;
        }
        let t = Instant::now();
        let r = run_one(s, &rt).unwrap_or_else(|e| Report {
            name: s.name,
            ops: 0,
            acked_writes: 0,
            errors: 0,
            longest_gap: Duration::ZERO,
            anomalies: 0,
            note: String::new(),
            failure: Some(format!("scenario error: {e:#}")),
        });
        println!(
            "{:<22} ops={:<6} acked_writes={:<6} errors={:<5} longest_gap={:>6.2}s anomalies={} {} ({:.0}s) {}",
            r.name,
            r.ops,
            r.acked_writes,
            r.errors,
            r.longest_gap.as_secs_f64(),
            r.anomalies,
            if r.failure.is_none() { "PASS" } else { "FAIL" },
            t.elapsed().as_secs_f64(),
            r.note
        );
        if let Some(f) = &r.failure {
            println!("    {f}");
        }
        reports.push(r);
    }
    println!();
    println!("| scenario | ops | acked writes | errors/timeouts | longest gap (s) | anomalies | result |");
    println!("|---|---:|---:|---:|---:|---:|---|");
    for r in &reports {
        println!(
            "| {} | {} | {} | {} | {:.2} | {} | {} |",
            r.name,
            r.ops,
            r.acked_writes,
            r.errors,
            r.longest_gap.as_secs_f64(),
            r.anomalies,
            if r.failure.is_none() { "pass" } else { "FAIL" }
        );
    }
    let failed = reports.iter().filter(|r| r.failure.is_some()).count();
    println!();
    println!("suite finished in {:.0} s", started.elapsed().as_secs_f64());
    if skipped > 0 {
        println!(
            "{} passed, {} failed, {skipped} skipped (need root)",
            reports.len() - failed,
            failed
        );
    } else {
        println!("{} passed, {} failed", reports.len() - failed, failed);
    }
    if failed > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}
