//! The scrubber: a background thread that reads every stored block of every
//! group hosted here, at a bounded rate, and verifies its checksum. A block
//! that fails is counted and queued for repair from the group leader's
//! verified copy (see `server::repair_loop`).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::block;
use crate::keys;
use crate::store::StoreHandle;

/// Blocks verified per batch (then the thread sleeps to hold the rate).
const BATCH: u64 = 256;

/// Runs forever (the process exits around it).
pub fn run(store: StoreHandle) {
    let rate = store.config.limits.scrub_blocks_per_sec.max(1);
    let pause = Duration::from_secs(store.config.limits.scrub_interval_secs);
    loop {
        let started = Instant::now();
        let mut checked = 0u64;
        let mut bad = 0u64;
        let groups: Vec<u64> = store.views().into_iter().map(|v| v.group).collect();
        for g in groups {
            // Blocks only (applied request records follow them).
            let (start, _) = keys::group_range(g);
            let end = keys::blocks_end(g);
            let mut cursor = start;
            loop {
                let batch_started = Instant::now();
                let mut ro = rocksdb::ReadOptions::default();
                ro.set_iterate_upper_bound(end.clone());
                ro.fill_cache(false);
                let iter = store.engine.db().iterator_cf_opt(
                    store.engine.kv_cf(),
                    ro,
                    rocksdb::IteratorMode::From(&cursor, rocksdb::Direction::Forward),
                );
                let mut n = 0u64;
                let mut last: Option<Vec<u8>> = None;
                for item in iter {
                    let Ok((k, v)) = item else { break };
                    if let Some((volume, b)) = keys::parse_block(g, &k) {
                        if block::decode(&v).is_err() {
                            bad += 1;
                            store
                                .counters
                                .checksum_errors
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::error!(
                                group = g,
                                volume,
                                block = b,
                                "scrub: checksum mismatch"
                            );
                            store.note_corrupt(g, volume, b);
                        }
                        n += 1;
                    }
                    last = Some(k.to_vec());
                    if n >= BATCH {
                        break;
                    }
                }
                checked += n;
                crate::metrics::METRICS.scrub_blocks.inc_by(n);
                let Some(mut k) = last else { break };
                if n < BATCH {
                    break;
                }
                k.push(0);
                cursor = k;
                // Hold the rate: BATCH blocks per BATCH/rate seconds.
                let budget = Duration::from_secs_f64(BATCH as f64 / rate as f64);
                if let Some(rest) = budget.checked_sub(batch_started.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
        }
        tracing::info!(
            checked,
            bad,
            secs = started.elapsed().as_secs_f64(),
            "scrub pass finished"
        );
        crate::metrics::METRICS.scrub_passes.inc();
        std::thread::sleep(pause);
    }
}
