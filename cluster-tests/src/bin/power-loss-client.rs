//! `power-loss-client`: the workload of the power-loss test
//! (`tests/power_loss.rs`), run inside the test guest next to three
//! `raftblk-node` processes, on the guest's console.
//!
//!   power-loss-client write  BLOCKS TASKS OPS_MAX   (prints `ACK block write`)
//!   power-loss-client check  BLOCKS                 (prints `SEEN block write|0|garbage`,
//!                                                    then `CONVERGED` or `DIVERGED ...`)
//!
//! `write` creates volume `pl` if needed and has TASKS writers; writer t
//! owns the blocks `b ≡ t (mod TASKS)` and writes them in turn, one write
//! at a time, each 4 KiB block holding its write id (`history::block_payload`,
//! ids increasing per writer), and prints a line once each write is
//! acknowledged. The test kills the guest's QEMU in the middle of it: the
//! guest's page cache is lost with everything the nodes had not synced.
//! `check` (after a reboot) reads every block back, then waits until the
//! three replicas of every data group report the same applied index and
//! digest.

use std::time::{Duration, Instant};

use raftblk_client::{Client, ClientOptions};
use raftblk_cluster_tests::history::{block_payload, decode, Seen, BLOCK};
use raftblk_proto::cluster_client::ClusterClient;
use raftblk_proto::GroupDigestRequest;

const NODES: [&str; 3] = ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"];
const VOLUME: &str = "pl";
/// Bound of the whole run: the cluster's start included (slow under TCG).
const RUN_MAX: Duration = Duration::from_secs(150);
const CONVERGE_MAX: Duration = Duration::from_secs(120);

fn arg(args: &[String], i: usize, what: &str) -> anyhow::Result<u64> {
    args.get(i)
        .ok_or_else(|| anyhow::anyhow!("missing {what}"))?
        .parse()
        .map_err(|e| anyhow::anyhow!("{what}: {e}"))
}

async fn connect() -> anyhow::Result<Client> {
    let seeds: Vec<String> = NODES.iter().map(|s| s.to_string()).collect();
    let opts = ClientOptions {
        deadline: Duration::from_secs(60),
        ..ClientOptions::default()
    };
    let started = Instant::now();
    loop {
        match Client::connect(&seeds, opts.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) if started.elapsed() < RUN_MAX => {
                eprintln!("connect: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn write(blocks: u64, tasks: u64, ops_max: u64) -> anyhow::Result<()> {
    let client = connect().await?;
    let size = blocks * BLOCK as u64;
    let started = Instant::now();
    let vol = loop {
        if let Ok(v) = client.open_volume(VOLUME).await {
            break v;
        }
        anyhow::ensure!(
            started.elapsed() < RUN_MAX,
            "volume {VOLUME} not ready in time"
        );
        if let Err(e) = client.create_volume(VOLUME, size).await {
            eprintln!("create volume: {e}; retrying");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("WRITING");
    let mut handles = Vec::new();
    for t in 0..tasks {
        let vol = vol.clone();
        handles.push(tokio::spawn(async move {
            let mine: Vec<u64> = (t..blocks).step_by(tasks as usize).collect();
            for n in 0..ops_max {
                if started.elapsed() >= RUN_MAX {
                    break;
                }
                let block = mine[(n % mine.len() as u64) as usize];
                // Write ids: unique across writers, increasing per writer.
                let id = (n + 1) * tasks + t;
                vol.write(block * BLOCK as u64, &block_payload(id, block))
                    .await?;
                println!("ACK {block} {id}");
            }
            anyhow::Ok(())
        }));
    }
    for h in handles {
        h.await??;
    }
    println!("WRITE-DONE");
    Ok(())
}

async fn check(blocks: u64) -> anyhow::Result<()> {
    let client = connect().await?;
    let started = Instant::now();
    let vol = loop {
        match client.open_volume(VOLUME).await {
            Ok(v) => break v,
            Err(e) => {
                anyhow::ensure!(started.elapsed() < RUN_MAX, "open volume: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    for block in 0..blocks {
        let data = vol.read(block * BLOCK as u64, BLOCK as u64).await?;
        match decode(block, &data) {
            Seen::Zeros => println!("SEEN {block} 0"),
            Seen::Write(id) => println!("SEEN {block} {id}"),
            Seen::Garbage => println!("SEEN {block} garbage"),
        }
    }
    let data_groups = client.topology().data_groups;
    let deadline = Instant::now() + CONVERGE_MAX;
    let mut last = Vec::new();
    loop {
        let mut all_same = true;
        last.clear();
        for g in 1..=data_groups {
            let mut seen = Vec::new();
            for addr in NODES {
                seen.push(digest(addr, g).await.ok());
            }
            let same = seen.iter().all(|d| d.is_some() && *d == seen[0]);
            all_same &= same;
            last.push((g, seen));
        }
        if all_same {
            println!("CONVERGED {data_groups}");
            return Ok(());
        }
        if Instant::now() >= deadline {
            println!("DIVERGED {last:?}");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `(applied index, blocks, digest)` of `group` at the node at `addr`.
async fn digest(addr: &str, group: u64) -> anyhow::Result<(u64, u64, u64)> {
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await?;
    let r = ClusterClient::new(ch)
        .group_digest(GroupDigestRequest { group_id: group })
        .await?
        .into_inner();
    if let Some(e) = r.error {
        anyhow::bail!("digest of group {group} at {addr}: {e:?}");
    }
    Ok((r.applied_index, r.block_count, r.digest))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("write") => {
            write(
                arg(&args, 2, "BLOCKS")?,
                arg(&args, 3, "TASKS")?.max(1),
                arg(&args, 4, "OPS_MAX")?,
            )
            .await
        }
        Some("check") => check(arg(&args, 2, "BLOCKS")?).await,
        _ => anyhow::bail!("usage: power-loss-client write BLOCKS TASKS OPS_MAX | check BLOCKS"),
    }
}
