//! The workload: concurrent clients issuing reads, writes (every payload
//! unique and traceable, see `history`), discards and flushes on several
//! volumes through the real client library, recording every invocation and
//! completion. Bounded in operations and time.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use raftblk_client::Volume;
use rand::{Rng, SeedableRng};

use crate::history::{block_payload, decode, Op, OpKind, Seen, BLOCK};

#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    pub clients: u32,
    /// Blocks (4 KiB) used at the start of each volume.
    pub blocks: u64,
    /// Upper bound on operations over all clients.
    pub ops_max: u64,
    /// Upper bound on the run, whatever `stop` says.
    pub duration_max: Duration,
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        WorkloadSpec {
            clients: 6,
            blocks: 256,
            ops_max: 50_000,
            duration_max: Duration::from_secs(120),
        }
    }
}

/// A running workload.
pub struct Workload {
    pub ops: Arc<Mutex<Vec<Op>>>,
    pub started: Instant,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// What each 4 KiB block of a read starting at block `first` held.
fn decode_read(first: u64, data: &[u8]) -> Vec<Seen> {
    data.chunks(BLOCK)
        .enumerate()
        .map(|(i, d)| decode(first + i as u64, d))
        .collect()
}

fn micros(started: Instant) -> u64 {
    started.elapsed().as_micros() as u64
}

impl Workload {
    /// Starts the clients.
    pub fn start(volumes: Vec<Volume>, spec: WorkloadSpec, seed: u64) -> Workload {
        let ops = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let next_id = Arc::new(AtomicU64::new(1));
        let count = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for c in 0..spec.clients {
            let volumes = volumes.clone();
            let ops = ops.clone();
            let stop = stop.clone();
            let next_id = next_id.clone();
            let count = count.clone();
            let spec = spec.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (u64::from(c) << 32));
                while !stop.load(Ordering::Relaxed)
                    && started.elapsed() < spec.duration_max
                    && count.fetch_add(1, Ordering::Relaxed) < spec.ops_max
                {
                    let v = rng.gen_range(0..volumes.len());
                    let vol = &volumes[v];
                    let n = rng.gen_range(1..=4u64);
                    let first = rng.gen_range(0..=spec.blocks - n);
                    let dice = rng.gen_range(0..100);
                    let invoke = micros(started);
                    let (kind, ok) = if dice < 55 {
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        let mut data = Vec::with_capacity((n as usize) * BLOCK);
                        for b in first..first + n {
                            data.extend_from_slice(&block_payload(id, b));
                        }
                        let ok = vol.write(first * BLOCK as u64, &data).await.is_ok();
                        (OpKind::Write { id }, ok)
                    } else if dice < 90 {
                        match vol.read(first * BLOCK as u64, n * BLOCK as u64).await {
                            Ok(data) => {
                                let seen = decode_read(first, &data);
                                (OpKind::Read { seen }, true)
                            }
                            Err(_) => (OpKind::Read { seen: Vec::new() }, false),
                        }
                    } else if dice < 96 {
                        let id = next_id.fetch_add(1, Ordering::Relaxed);
                        let ok = if rng.gen_bool(0.5) {
                            vol.discard(first * BLOCK as u64, n * BLOCK as u64)
                                .await
                                .is_ok()
                        } else {
                            vol.write_zeroes(first * BLOCK as u64, n * BLOCK as u64)
                                .await
                                .is_ok()
                        };
                        (OpKind::Discard { id }, ok)
                    } else {
                        (OpKind::Flush, vol.flush().await.is_ok())
                    };
                    let complete = ok.then(|| micros(started));
                    ops.lock().unwrap_or_else(|p| p.into_inner()).push(Op {
                        client: c,
                        volume: v as u32,
                        first_block: first,
                        blocks: n,
                        kind,
                        invoke,
                        complete,
                    });
                }
            }));
        }
        Workload {
            ops,
            started,
            stop,
            tasks,
        }
    }

    /// Stops the clients and waits for them.
    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }

    /// Reads every block of every volume once more (after healing) and
    /// records the reads: lost acknowledged writes show up here.
    pub async fn final_reads(&mut self, volumes: &[Volume], blocks: u64) {
        for (v, vol) in volumes.iter().enumerate() {
            let mut first = 0;
            while first < blocks {
                let n = 32.min(blocks - first);
                let invoke = micros(self.started);
                let r = vol.read(first * BLOCK as u64, n * BLOCK as u64).await;
                let (kind, complete) = match r {
                    Ok(data) => (
                        OpKind::Read {
                            seen: decode_read(first, &data),
                        },
                        Some(micros(self.started)),
                    ),
                    Err(_) => (OpKind::Read { seen: Vec::new() }, None),
                };
                self.ops.lock().unwrap_or_else(|p| p.into_inner()).push(Op {
                    client: u32::MAX,
                    volume: v as u32,
                    first_block: first,
                    blocks: n,
                    kind,
                    invoke,
                    complete,
                });
                first += n;
            }
        }
    }

    pub fn history(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Stops the clients, reads every block once more, and checks the
    /// history: no linearizability anomaly and no failed operation (what
    /// the scenarios where a majority stays up promise). Prints a one-line
    /// summary and returns it.
    pub async fn stop_and_check(
        &mut self,
        volumes: &[Volume],
        blocks: u64,
    ) -> anyhow::Result<Summary> {
        self.stop().await;
        let end = self.started.elapsed();
        self.final_reads(volumes, blocks).await;
        let history = self.history();
        let summary = summarize(&history, end);
        let anomalies = crate::history::check(&history);
        println!(
            "{} ops, {} acked writes, {} failed, longest gap {:?}, {} anomalies",
            summary.ops,
            summary.acked_writes,
            summary.errors,
            summary.longest_gap,
            anomalies.len()
        );
        anyhow::ensure!(
            anomalies.is_empty(),
            "anomalies: {:?}",
            &anomalies[..anomalies.len().min(5)]
        );
        let failed: Vec<&Op> = history
            .iter()
            .filter(|o| o.complete.is_none())
            .take(5)
            .collect();
        anyhow::ensure!(
            summary.errors == 0,
            "{} operations failed: {failed:?}",
            summary.errors
        );
        Ok(summary)
    }
}

/// Summary of a history for the report.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub ops: usize,
    pub acked_writes: usize,
    pub errors: usize,
    pub longest_gap: Duration,
}

/// Counts and the longest window (within `[0, end]`) with no successful op.
pub fn summarize(ops: &[Op], end: Duration) -> Summary {
    let mut done: Vec<u64> = ops.iter().filter_map(|o| o.complete).collect();
    done.sort_unstable();
    let mut gap = 0u64;
    let mut prev = 0u64;
    for t in done
        .iter()
        .copied()
        .chain(std::iter::once(end.as_micros() as u64))
    {
        gap = gap.max(t.saturating_sub(prev));
        prev = prev.max(t);
    }
    Summary {
        ops: ops.len(),
        acked_writes: ops
            .iter()
            .filter(|o| matches!(o.kind, OpKind::Write { .. }) && o.complete.is_some())
            .count(),
        errors: ops.iter().filter(|o| o.complete.is_none()).count(),
        longest_gap: Duration::from_micros(gap),
    }
}
