//! Purging the blocks of deleted volumes. A background task, off the store
//! thread: every few seconds, for each data group this node leads, it
//! lists the volume ids that still own blocks in the group (a bounded scan
//! on the blocking pool), asks the meta group (linearizably, through the
//! volume cache, so nodes without a meta replica do it too) whether each
//! still exists, and proposes a `PurgeVolume` for the ones found absent
//! again on a later pass than the one that first found them absent.
//! Volume ids are never reused, so a volume absent from the catalog whose
//! blocks exist was deleted; a write that raced with the delete and landed
//! after the purge is found and purged by the next pass.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use raftblk_proto::{command::Cmd, Command, PurgeVolumeCmd, META_GROUP_ID};

use crate::engine::Engine;
use crate::keys;
use crate::service::volume_cache::VolumeCache;
use crate::store::StoreHandle;

/// Pause between two passes.
pub const GC_INTERVAL: Duration = Duration::from_secs(5);
/// Volume ids looked at per group per pass.
const VOLUMES_PER_GROUP_MAX: usize = 256;
/// Deleted volumes awaiting their second look, at most.
const ABSENT_TRACKED_MAX: usize = 4096;
/// Purges proposed per pass, over all groups.
const PURGES_PER_PASS_MAX: usize = 64;

/// What the collector remembers between passes.
#[derive(Default)]
pub struct GcState {
    /// Per group: the volume id the next scan starts from (scans resume
    /// where the last one stopped, so every volume is reached however many
    /// live ones a group holds).
    cursors: HashMap<u64, u64>,
    /// When each volume was first found absent from the catalog: purged
    /// only when found absent again at least half a pass interval later,
    /// i.e. on a later pass (however many passes the scan takes to come
    /// back to it).
    absent_since: HashMap<u64, Instant>,
}

/// Runs forever (the process exits around it).
pub async fn run(store: StoreHandle, volumes: Arc<VolumeCache>) {
    let mut interval = tokio::time::interval(GC_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut state = GcState::default();
    loop {
        interval.tick().await;
        pass(&store, &volumes, &mut state).await;
    }
}

/// One pass over the groups led here; the number of purges proposed.
pub async fn pass(store: &StoreHandle, volumes: &Arc<VolumeCache>, state: &mut GcState) -> usize {
    if state.absent_since.len() > ABSENT_TRACKED_MAX {
        // Bounded: forget the oldest half (they are found again).
        let mut ages: Vec<(Instant, u64)> =
            state.absent_since.iter().map(|(id, t)| (*t, *id)).collect();
        ages.sort_unstable();
        for (_, id) in ages.into_iter().take(ABSENT_TRACKED_MAX / 2) {
            state.absent_since.remove(&id);
        }
    }
    let led: Vec<u64> = store
        .views()
        .into_iter()
        .filter(|v| v.group != META_GROUP_ID && v.role == "leader")
        .map(|v| v.group)
        .collect();
    let mut exists: HashMap<u64, bool> = HashMap::new();
    let mut purged = 0usize;
    for group in led {
        let engine = store.engine.clone();
        let from = state.cursors.get(&group).copied().unwrap_or(0);
        let ids = match tokio::task::spawn_blocking(move || {
            volumes_in_group(&engine, group, from, VOLUMES_PER_GROUP_MAX)
        })
        .await
        {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(group, error = %e, "gc: scan failed");
                continue;
            }
        };
        // A short scan reached the end: start over next time.
        let next = match ids.last() {
            Some(&last) if ids.len() >= VOLUMES_PER_GROUP_MAX => last.saturating_add(1),
            _ => 0,
        };
        state.cursors.insert(group, next);
        for id in ids {
            let alive = match exists.get(&id) {
                Some(a) => *a,
                None => match volumes.refresh(id, Instant::now(), true).await {
                    Ok(info) => {
                        exists.insert(id, info.is_some());
                        info.is_some()
                    }
                    Err(e) => {
                        tracing::debug!(group, volume = id, error = %e, "gc: catalog unreachable");
                        return purged;
                    }
                },
            };
            if alive {
                state.absent_since.remove(&id);
                continue;
            }
            // Kept after a purge: the volume's other groups are purged on
            // this and later passes without a new wait (the map is bounded).
            let first_absent = *state.absent_since.entry(id).or_insert_with(Instant::now);
            if first_absent.elapsed() < GC_INTERVAL / 2 {
                continue;
            }
            tracing::info!(group, volume = id, "purging blocks of a deleted volume");
            let cmd = Command {
                cmd: Some(Cmd::PurgeVolume(PurgeVolumeCmd { volume_id: id })),
            };
            if let Err(e) = store.propose(group, &cmd).await {
                tracing::debug!(group, volume = id, error = %e, "gc: purge not committed");
            }
            purged += 1;
            if purged >= PURGES_PER_PASS_MAX {
                break;
            }
        }
        if purged >= PURGES_PER_PASS_MAX {
            break;
        }
    }
    purged
}

/// Up to `max` distinct volume ids ≥ `from` with blocks (or blocks kept
/// for snapshots) in `group`, in id order.
fn volumes_in_group(engine: &Engine, group: u64, from: u64, max: usize) -> Vec<u64> {
    let mut ids = skip_scan(
        engine,
        group,
        from,
        max,
        |v| keys::volume_blocks_start(group, v),
        |k| keys::parse_block(group, k).map(|(v, _)| v),
    );
    ids.extend(skip_scan(
        engine,
        group,
        from,
        max,
        |v| keys::snap_block(group, v, 0, 0),
        |k| keys::parse_snap_block(group, k).map(|(v, _, _)| v),
    ));
    ids.sort_unstable();
    ids.dedup();
    ids.truncate(max);
    ids
}

/// The first `max` volume ids ≥ `from` of one kind of key: one seek per
/// volume (`first_key` of a volume id, `volume_of` a key's id, None past
/// that kind of key).
fn skip_scan(
    engine: &Engine,
    group: u64,
    mut from: u64,
    max: usize,
    first_key: impl Fn(u64) -> Vec<u8>,
    volume_of: impl Fn(&[u8]) -> Option<u64>,
) -> Vec<u64> {
    let (_, end) = keys::group_range(group);
    let mut out = Vec::new();
    while out.len() < max {
        let start = first_key(from);
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end.clone());
        ro.fill_cache(false);
        let mut iter = engine.db().iterator_cf_opt(
            engine.kv_cf(),
            ro,
            rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
        );
        let Some(Ok((k, _))) = iter.next() else { break };
        let Some(volume) = volume_of(&k) else {
            break;
        };
        out.push(volume);
        match volume.checked_add(1) {
            Some(n) => from = n,
            None => break,
        }
    }
    out
}
