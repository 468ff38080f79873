//! Block I/O at snapshots: reads of a volume as of a snapshot, the
//! per-group snapshot operations (cut, delete, rollback; see `cow`) and
//! the changed-block maps incremental exports are built from. Each checks
//! the snapshot against the catalog (linearizable for operations, the
//! node's cached record for reads, refreshed when it does not know the
//! snapshot yet).

use std::sync::Arc;

use raftblk_proto::{
    command::Cmd, BlockRange, DiffRequest, Error as PbError, ErrorCode, SnapshotOp, SnapshotOpCmd,
    SnapshotOpRequest, SnapshotState, VolumeInfo, BLOCK_BYTES,
};

use super::block_io::{invalid, BlockIoService};
use super::store_error;
use crate::cow;
use crate::store::StoreHandle;

fn storage(e: crate::engine::EngineError) -> PbError {
    PbError::new(ErrorCode::Storage, e.to_string())
}

/// Stored values of blocks `[first, last]` as of `snap` (`None`: absent),
/// from one view of the engine; refused if the group has not cut `snap`.
pub(super) fn read_snapshot_blocks(
    store: &StoreHandle,
    group: u64,
    volume: u64,
    first: u64,
    last: u64,
    snap: u64,
) -> Result<Vec<Option<Vec<u8>>>, PbError> {
    let engine = &store.engine;
    let view = engine.snapshot();
    let cut = cow::cut_at(engine, &view, group, volume).map_err(storage)?;
    if cut < snap {
        return Err(PbError::new(
            ErrorCode::Unavailable,
            format!("group {group} has not cut snapshot {snap} of volume {volume} (latest {cut})"),
        ));
    }
    cow::read_at(engine, &view, group, volume, first, last - first + 1, snap).map_err(storage)
}

fn state_is(s: &raftblk_proto::SnapshotInfo, state: SnapshotState) -> bool {
    s.state == state as i32
}

impl BlockIoService {
    /// Checks that snapshot `snap` of `v` is ready and covers `range`
    /// (reading the catalog again if the cached record does not know it).
    pub(super) async fn check_snapshot(
        &self,
        v: &Arc<VolumeInfo>,
        snap: u64,
        range: &BlockRange,
    ) -> Result<(), PbError> {
        let cached = v.snapshots.iter().find(|s| s.id == snap).cloned();
        let info = match cached {
            Some(s) if state_is(&s, SnapshotState::SnapshotReady) => Some(s),
            _ => self
                .volumes
                .fetch(v.id)
                .await?
                .and_then(|(fresh, _)| fresh.snapshots.into_iter().find(|s| s.id == snap)),
        };
        let Some(info) = info.filter(|s| state_is(s, SnapshotState::SnapshotReady)) else {
            return Err(PbError::new(
                ErrorCode::NoSuchVolume,
                format!("volume {:?} has no ready snapshot with id {snap}", v.name),
            ));
        };
        let end = range.offset_bytes.saturating_add(range.length_bytes);
        if end > info.size_bytes {
            return Err(PbError::new(
                ErrorCode::OutOfRange,
                format!(
                    "range ends at {end}, past snapshot {:?} ({} bytes)",
                    info.name, info.size_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Checks a snapshot operation against the catalog and proposes it.
    pub(super) async fn snapshot_op(&self, r: SnapshotOpRequest) -> Result<(), PbError> {
        if r.group_id == raftblk_proto::META_GROUP_ID
            || r.group_id > self.store.config.cluster.data_groups
        {
            return Err(invalid(format!("group {} is not a data group", r.group_id)));
        }
        self.check_leader(r.group_id)?;
        let op = SnapshotOp::try_from(r.op)
            .ok()
            .filter(|o| *o != SnapshotOp::Unspecified)
            .ok_or_else(|| invalid(format!("unknown snapshot operation {}", r.op)))?;
        let Some((v, _)) = self.volumes.fetch(r.volume_id).await? else {
            return Err(PbError::new(
                ErrorCode::NoSuchVolume,
                format!("no volume with id {}", r.volume_id),
            ));
        };
        let snap = v.snapshots.iter().find(|s| s.id == r.snapshot_id);
        let (want, what) = match op {
            SnapshotOp::Cut => (SnapshotState::SnapshotPending, "pending"),
            SnapshotOp::Delete => (SnapshotState::SnapshotDeleting, "being deleted"),
            _ => (SnapshotState::SnapshotReady, "ready"),
        };
        if !snap.is_some_and(|s| state_is(s, want)) {
            return Err(PbError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "volume {:?} has no {what} snapshot with id {}",
                    v.name, r.snapshot_id
                ),
            ));
        }
        if op != SnapshotOp::Delete && r.epoch == 0 {
            return Err(PbError::new(
                ErrorCode::Fenced,
                format!(
                    "a snapshot cut or rollback of volume {:?} needs its attach lease",
                    v.name
                ),
            ));
        }
        let live = v
            .snapshots
            .iter()
            .filter(|s| s.id != r.snapshot_id && !state_is(s, SnapshotState::SnapshotDeleting))
            .map(|s| s.id)
            .collect();
        let cmd = Cmd::SnapshotOp(SnapshotOpCmd {
            volume_id: r.volume_id,
            snapshot_id: r.snapshot_id,
            op: op as i32,
            epoch: r.epoch,
            live,
        });
        // Every operation is idempotent (see `cow`): no request id.
        match self.propose(r.group_id, cmd, &[], 0).await.error {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// The changed-block map of a range between two snapshots.
    pub(super) async fn diff_range(&self, r: DiffRequest) -> Result<Vec<u8>, PbError> {
        let range = r
            .range
            .ok_or_else(|| invalid("request has no range".into()))?;
        let v = self.validate(Some(&range)).await?;
        if r.to_snapshot == 0 || (r.from_snapshot != 0 && r.from_snapshot >= r.to_snapshot) {
            return Err(invalid(format!(
                "a diff runs from an older snapshot (or 0) to a newer one, not {} to {}",
                r.from_snapshot, r.to_snapshot
            )));
        }
        self.check_snapshot(&v, r.to_snapshot, &range).await?;
        if r.from_snapshot != 0 {
            let whole = BlockRange {
                length_bytes: 0,
                ..range
            };
            self.check_snapshot(&v, r.from_snapshot, &whole).await?;
        }
        self.check_leader(range.group_id)?;
        self.store
            .read_index(range.group_id, false)
            .await
            .map_err(|e| store_error(&self.store, e))?;
        let store = self.store.clone();
        let (group, volume) = (range.group_id, range.volume_id);
        let first = range.offset_bytes / BLOCK_BYTES;
        let last = (range.offset_bytes + range.length_bytes - 1) / BLOCK_BYTES;
        let (from, to) = (r.from_snapshot, r.to_snapshot);
        tokio::task::spawn_blocking(move || {
            let engine = &store.engine;
            let busy = || {
                PbError::new(
                    ErrorCode::Unavailable,
                    format!("a snapshot install of group {group} is under way"),
                )
            };
            let gen = store.install_gen.stable(group).ok_or_else(busy)?;
            let view = engine.snapshot();
            let cut = cow::cut_at(engine, &view, group, volume).map_err(storage)?;
            if cut < to {
                return Err(PbError::new(
                    ErrorCode::Unavailable,
                    format!("group {group} has not cut snapshot {to} of volume {volume}"),
                ));
            }
            let changed = cow::changed_between(
                engine,
                &view,
                group,
                volume,
                first,
                last - first + 1,
                from,
                to,
            )
            .map_err(storage)?;
            if !store.install_gen.unchanged(group, gen) {
                return Err(busy());
            }
            let mut bits = vec![0u8; changed.len().div_ceil(8)];
            for (i, c) in changed.into_iter().enumerate() {
                if c {
                    bits[i / 8] |= 1 << (i % 8);
                }
            }
            Ok(bits)
        })
        .await
        .map_err(|e| PbError::new(ErrorCode::Storage, e.to_string()))?
    }
}
