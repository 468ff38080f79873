//! `raftblk bench`: drives a running cluster through the client library
//! (4 KiB random writes and reads at QD1 and QD32, 1 MiB sequential writes)
//! and, in the same run, measures this machine's local limits: a 4 KiB
//! write + fdatasync at QD1, and synced RocksDB writes from 32 threads.
//! Prints one table with IOPS, MiB/s, p50/p99 latency, the ratio to the
//! local limit, and the CPU time each operation cost: all node processes
//! together (user + system from `/proc`, for the nodes whose pid files
//! `--local-dir` holds, as `deploy/local-cluster.sh` writes them) and this
//! client process.

use std::os::unix::fs::FileExt as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use raftblk_client::size::parse_size;
use raftblk_client::{Client, Volume};
use rand::Rng as _;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Seconds per workload.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Size of the scratch volume (created and deleted by the bench); the
    /// random workloads touch the region the sequential write filled.
    #[arg(long, default_value = "1G")]
    pub size: String,
    /// Directory on the disk the nodes use, for the local-limit runs.
    #[arg(long, default_value = ".")]
    pub local_dir: PathBuf,
    /// Keep the scratch volume instead of deleting it.
    #[arg(long)]
    pub keep: bool,
    /// Run only these cluster workloads (comma separated: seqwrite,
    /// write1, write32, read1, read32), e.g. to profile one of them.
    /// Without seqwrite the random ones use the first 64 MiB.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
}

/// The cluster workloads, by their `--only` names.
const WORKLOADS: [&str; 5] = ["seqwrite", "write1", "write32", "read1", "read32"];

/// Waiting for the nodes to go idle before a workload (and after it, with
/// the background work it caused counted): at most this long...
const SETTLE_MAX: Duration = Duration::from_secs(30);
/// ...sampling node CPU over this window...
const SETTLE_WINDOW: Duration = Duration::from_millis(500);
/// ...until all nodes together use less than this share of one core.
const SETTLE_IDLE_CORE_SHARE: f64 = 0.10;

/// Latency samples kept per workload.
const SAMPLES_MAX: usize = 2_000_000;

struct Stats {
    name: String,
    ops: u64,
    bytes: u64,
    elapsed: Duration,
    lat_us: Vec<u32>,
    /// CPU spent meanwhile, in ms: all node processes (None: no pid files)
    /// and this process.
    node_cpu_ms: Option<f64>,
    client_cpu_ms: f64,
}

/// CPU time of processes, from `/proc/PID/stat` (utime + stime).
struct CpuMeter {
    nodes: Vec<u32>,
    ticks_per_sec: f64,
}

impl CpuMeter {
    /// The node processes whose pid files (`node*.pid`) are in `dir`.
    fn new(dir: &std::path::Path) -> CpuMeter {
        let mut nodes = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("node") && name.ends_with(".pid") {
                    if let Some(pid) = std::fs::read_to_string(e.path())
                        .ok()
                        .and_then(|t| t.trim().parse::<u32>().ok())
                    {
                        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                            nodes.push(pid);
                        }
                    }
                }
            }
        }
        let ticks_per_sec = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0);
        CpuMeter {
            nodes,
            ticks_per_sec,
        }
    }

    fn ticks(pid: &str) -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may hold spaces: fields start after the ')'.
        let rest = text.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 (1-based) of the line, the
        // 12th and 13th after the name.
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    }

    /// (node ticks, own ticks) now.
    fn sample(&self) -> (Option<u64>, u64) {
        let nodes = if self.nodes.is_empty() {
            None
        } else {
            self.nodes
                .iter()
                .map(|p| Self::ticks(&p.to_string()))
                .sum::<Option<u64>>()
        };
        (nodes, Self::ticks("self").unwrap_or(0))
    }

    fn ms(&self, ticks: u64) -> f64 {
        ticks as f64 * 1000.0 / self.ticks_per_sec
    }

    /// Waits (at most `SETTLE_MAX`) until the nodes are idle: flushes and
    /// compactions a workload left behind end before the next one starts,
    /// and count for the workload that caused them.
    async fn settle(&self) {
        if self.nodes.is_empty() {
            return;
        }
        let started = Instant::now();
        while started.elapsed() < SETTLE_MAX {
            let Some(a) = self.sample().0 else { return };
            tokio::time::sleep(SETTLE_WINDOW).await;
            let Some(b) = self.sample().0 else { return };
            let busy_ms = self.ms(b.saturating_sub(a));
            if busy_ms < SETTLE_WINDOW.as_millis() as f64 * SETTLE_IDLE_CORE_SHARE {
                return;
            }
        }
        eprintln!("note: the nodes were still busy {SETTLE_MAX:?} after a workload");
    }
}

impl Stats {
    fn iops(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / (1 << 20) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
    fn pct(&mut self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return 0.0;
        }
        self.lat_us.sort_unstable();
        let i = ((self.lat_us.len() - 1) as f64 * p).round() as usize;
        self.lat_us[i] as f64 / 1000.0
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Op {
    Read,
    Write,
}

/// One workload: what to issue, at which queue depth and block size.
struct Spec {
    name: &'static str,
    op: Op,
    qd: usize,
    block: u64,
    sequential: bool,
}

async fn workload(
    vol: &Volume,
    spec: Spec,
    region: u64,
    seconds: u64,
    cpu: &CpuMeter,
) -> anyhow::Result<Stats> {
    let Spec {
        name,
        op,
        qd,
        block,
        sequential,
    } = spec;
    cpu.settle().await;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let next = Arc::new(AtomicU64::new(0));
    let cpu_before = cpu.sample();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..qd {
        let vol = vol.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut ops = 0u64;
            let data = raftblk_client_bench_payload(w as u64, block as usize);
            let slots = region / block;
            while Instant::now() < deadline {
                let off = if sequential {
                    (next.fetch_add(1, Ordering::Relaxed) % slots) * block
                } else {
                    rand::thread_rng().gen_range(0..slots) * block
                };
                let t = Instant::now();
                match op {
                    Op::Write => vol.write(off, &data).await?,
                    Op::Read => {
                        vol.read(off, block).await?;
                    }
                }
                if lat.len() < SAMPLES_MAX / qd.max(1) {
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                ops += 1;
            }
            anyhow::Ok((ops, lat))
        }));
    }
    let mut stats = Stats {
        name: name.to_owned(),
        ops: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        lat_us: Vec::new(),
        node_cpu_ms: None,
        client_cpu_ms: 0.0,
    };
    for t in tasks {
        let (ops, lat) = t.await??;
        stats.ops += ops;
        stats.lat_us.extend(lat);
    }
    stats.elapsed = started.elapsed();
    // The client's share ends with its last operation; the nodes' includes
    // the flushes and compactions the workload left behind.
    let client_after = cpu.sample().1;
    cpu.settle().await;
    let cpu_after = (cpu.sample().0, client_after);
    stats.node_cpu_ms = match (cpu_before.0, cpu_after.0) {
        (Some(a), Some(b)) => Some(cpu.ms(b.saturating_sub(a))),
        _ => None,
    };
    stats.client_cpu_ms = cpu.ms(cpu_after.1.saturating_sub(cpu_before.1));
    stats.bytes = stats.ops * block;
    Ok(stats)
}

fn raftblk_client_bench_payload(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// 4 KiB pwrite + fdatasync at QD1 on a scratch file in `dir`.
/// A fresh scratch file `.raftblk-bench-TAG-PID.dat` in `dir` (the
/// caller removes it).
fn scratch_file(dir: &std::path::Path, tag: &str) -> anyhow::Result<(PathBuf, std::fs::File)> {
    let path = dir.join(format!(".raftblk-bench-{tag}-{}.dat", std::process::id()));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    Ok((path, f))
}

fn local_fdatasync(dir: &std::path::Path, seconds: u64) -> anyhow::Result<Stats> {
    let (path, f) = scratch_file(dir, "sync")?;
    let buf = raftblk_client_bench_payload(1, 4096);
    let slots = 16384u64; // 64 MiB file
    f.set_len(slots * 4096)?;
    f.sync_all()?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut lat = Vec::new();
    let mut ops = 0u64;
    let mut rng = rand::thread_rng();
    while Instant::now() < deadline {
        let t = Instant::now();
        f.write_all_at(&buf, rng.gen_range(0..slots) * 4096)?;
        f.sync_data()?;
        if lat.len() < SAMPLES_MAX {
            lat.push(t.elapsed().as_micros() as u32);
        }
        ops += 1;
    }
    let elapsed = started.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(Stats {
        name: "local 4K write+fdatasync QD1".into(),
        ops,
        bytes: ops * 4096,
        elapsed,
        lat_us: lat,
        node_cpu_ms: None,
        client_cpu_ms: 0.0,
    })
}

/// 1 MiB sequential writes to a scratch file in `dir` (at most 1 GiB, then
/// wrapping), fdatasync every 64 MiB and at the end: the disk's sequential
/// write bandwidth.
fn local_seq_write(dir: &std::path::Path, seconds: u64) -> anyhow::Result<Stats> {
    const BLOCK: u64 = 1 << 20;
    const FILE_BLOCKS: u64 = 1024;
    const SYNC_EVERY_BLOCKS: u64 = 64;
    let (path, f) = scratch_file(dir, "seq")?;
    let buf = raftblk_client_bench_payload(2, BLOCK as usize);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut lat = Vec::new();
    let mut ops = 0u64;
    while Instant::now() < deadline {
        let t = Instant::now();
        f.write_all_at(&buf, (ops % FILE_BLOCKS) * BLOCK)?;
        ops += 1;
        if ops.is_multiple_of(SYNC_EVERY_BLOCKS) {
            f.sync_data()?;
        }
        lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
    }
    f.sync_data()?;
    let elapsed = started.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(Stats {
        name: "local 1M seq write (disk bandwidth)".into(),
        ops,
        bytes: ops * BLOCK,
        elapsed,
        lat_us: lat,
        node_cpu_ms: None,
        client_cpu_ms: 0.0,
    })
}

/// Synced RocksDB puts of 4 KiB values from 32 threads.
fn local_rocksdb(dir: &std::path::Path, seconds: u64) -> anyhow::Result<Stats> {
    let path = dir.join(format!(".raftblk-bench-rocksdb-{}", std::process::id()));
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    let db = Arc::new(rocksdb::DB::open(&opts, &path)?);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let threads: Vec<_> = (0..32u64)
        .map(|t| {
            let db = db.clone();
            std::thread::spawn(move || -> anyhow::Result<(u64, Vec<u32>)> {
                let mut wo = rocksdb::WriteOptions::default();
                wo.set_sync(true);
                let value = raftblk_client_bench_payload(t, 4096);
                let mut ops = 0u64;
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let key = ((t << 40) | (ops % 16384)).to_be_bytes();
                    let s = Instant::now();
                    db.put_opt(key, &value, &wo)?;
                    if lat.len() < SAMPLES_MAX / 32 {
                        lat.push(s.elapsed().as_micros() as u32);
                    }
                    ops += 1;
                }
                Ok((ops, lat))
            })
        })
        .collect();
    let mut stats = Stats {
        name: "local RocksDB synced put, 32 writers".into(),
        ops: 0,
        bytes: 0,
        elapsed: Duration::ZERO,
        lat_us: Vec::new(),
        node_cpu_ms: None,
        client_cpu_ms: 0.0,
    };
    for t in threads {
        let (ops, lat) = t
            .join()
            .map_err(|_| anyhow::anyhow!("rocksdb bench thread panicked"))??;
        stats.ops += ops;
        stats.lat_us.extend(lat);
    }
    stats.elapsed = started.elapsed();
    stats.bytes = stats.ops * 4096;
    drop(db);
    let _ = rocksdb::DB::destroy(&rocksdb::Options::default(), &path);
    let _ = std::fs::remove_dir_all(&path);
    Ok(stats)
}

pub async fn run(client: &Client, args: &BenchArgs) -> anyhow::Result<()> {
    let size = parse_size(&args.size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
    if size < (64 << 20) || size % 4096 != 0 {
        anyhow::bail!("--size: at least 64M and a multiple of 4096");
    }
    if args.seconds == 0 || args.seconds > 3600 {
        anyhow::bail!("--seconds: must be in 1..=3600");
    }
    let s = args.seconds;
    let dir = args.local_dir.clone();
    eprintln!(
        "measuring local limits in {} ({s} s each)...",
        dir.display()
    );
    let d1 = dir.clone();
    let mut fsync = tokio::task::spawn_blocking(move || local_fdatasync(&d1, s)).await??;
    let d2 = dir.clone();
    let mut rocks = tokio::task::spawn_blocking(move || local_rocksdb(&d2, s)).await??;
    let d3 = dir.clone();
    let mut disk = tokio::task::spawn_blocking(move || local_seq_write(&d3, s)).await??;
    for w in &args.only {
        if !WORKLOADS.contains(&w.as_str()) {
            anyhow::bail!(
                "--only: unknown workload {w:?} (one of {})",
                WORKLOADS.join(", ")
            );
        }
    }
    let wanted = |w: &str| args.only.is_empty() || args.only.iter().any(|o| o == w);

    let cpu = CpuMeter::new(&dir);
    if cpu.nodes.is_empty() {
        eprintln!(
            "no node pid files in {}: node CPU per operation is not measured",
            dir.display()
        );
    }
    let name = format!("bench-{}", std::process::id());
    client.create_volume(&name, size).await?;
    let vol = client.open_volume(&name).await?;
    let result = async {
        // The run holds the scratch volume's attach lease (taken before
        // the clock starts: the first write would take it otherwise).
        vol.attach().await?.check()?;
        eprintln!("running cluster workloads on volume {name} ({s} s each)...");
        let spec = |name, op, qd, block, sequential| Spec {
            name,
            op,
            qd,
            block,
            sequential,
        };
        let mut seq = None;
        if wanted("seqwrite") {
            let spec = spec("1M seq write QD4", Op::Write, 4, 1 << 20, true);
            seq = Some(workload(&vol, spec, size, s, &cpu).await?);
        }
        // Random I/O within what the sequential pass filled.
        let region = (seq.as_ref().map_or(0, |q| q.ops) * (1 << 20)).clamp(64 << 20, size);
        let mut runs = Vec::new();
        for (key, name, op, qd) in [
            ("write1", "4K rand write QD1", Op::Write, 1),
            ("write32", "4K rand write QD32", Op::Write, 32),
            ("read1", "4K rand read QD1", Op::Read, 1),
            ("read32", "4K rand read QD32", Op::Read, 32),
        ] {
            if wanted(key) {
                let st = workload(&vol, spec(name, op, qd, 4096, false), region, s, &cpu).await?;
                runs.push((key, st));
            }
        }
        let fs_p50 = fsync.pct(0.5);
        let rocks_iops = rocks.iops();
        let disk_mib_s = disk.mib_s();
        let mut out = String::new();
        out += &format!(
            "| workload | IOPS | MiB/s | p50 ms | p99 ms | vs local limit | node CPU ms/op ({} nodes) | client CPU ms/op |\n",
            cpu.nodes.len()
        );
        out += "|---|---:|---:|---:|---:|---|---:|---:|\n";
        let mut row = |st: &mut Stats, ratio: String| {
            let (p50, p99) = (st.pct(0.5), st.pct(0.99));
            let per_op = |ms: f64| {
                if st.ops == 0 {
                    "-".to_string()
                } else {
                    format!("{:.3}", ms / st.ops as f64)
                }
            };
            let (node, client) = if st.name.starts_with("local") {
                ("-".to_string(), "-".to_string())
            } else {
                (
                    st.node_cpu_ms.map_or("-".to_string(), per_op),
                    per_op(st.client_cpu_ms),
                )
            };
            out += &format!(
                "| {} | {:.0} | {:.1} | {:.3} | {:.3} | {} | {} | {} |\n",
                st.name,
                st.iops(),
                st.mib_s(),
                p50,
                p99,
                ratio,
                node,
                client
            );
        };
        row(&mut fsync, "(local limit: QD1 latency)".into());
        row(&mut rocks, "(local limit: QD32 IOPS)".into());
        row(&mut disk, "(local limit: bandwidth)".into());
        for (key, st) in &mut runs {
            let ratio = match *key {
                "write1" => format!(
                    "p50 = {:.2}x local fdatasync p50",
                    st.pct(0.5) / fs_p50.max(1e-9)
                ),
                "write32" => format!(
                    "IOPS = {:.2}x local RocksDB 32 writers",
                    st.iops() / rocks_iops.max(1e-9)
                ),
                _ => "-".into(),
            };
            row(st, ratio);
        }
        if let Some(q) = &mut seq {
            let ratio = format!(
                "MiB/s = {:.3}x local disk bandwidth",
                q.mib_s() / disk_mib_s.max(1e-9)
            );
            row(q, ratio);
        }
        anyhow::Ok(out)
    }
    .await;
    if let Some(a) = vol.attachment() {
        if let Err(e) = a.detach().await {
            eprintln!("warning: could not release the attach lease of {name}: {e}");
        }
    }
    if !args.keep {
        if let Err(e) = client.delete_volume(&name).await {
            eprintln!("warning: could not delete scratch volume {name}: {e}");
        }
    }
    let table = result?;
    outln!("{table}");
    Ok(())
}
