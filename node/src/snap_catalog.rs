//! Snapshot and clone records in the meta group's catalog: a volume's
//! snapshots live in its `VolumeInfo` (ids rise with creation and are
//! never reused), a clone names its parent snapshot. The data groups keep
//! the blocks (see `cow`); these commands only change records, and each
//! checks the state it moves from, so a retried or late command changes
//! nothing twice.

use raftblk_proto::{
    CreateSnapshotCmd, Error as PbError, ErrorCode, SetSnapshotStateCmd, SnapshotInfo,
    SnapshotState, VolumeInfo,
};
use rocksdb::WriteBatch;

use crate::apply::{Applier, ApplyOutput, ApplyResult};
use crate::engine::EngineError;
use crate::keys;

/// Most snapshots one volume keeps.
pub const SNAPSHOTS_PER_VOLUME_MAX: usize = 256;

/// Checks a snapshot name: like a volume name.
pub fn validate_snapshot_name(name: &str) -> Result<(), PbError> {
    crate::service::volumes::validate_name(name).map_err(|e| {
        PbError::new(
            ErrorCode::InvalidArgument,
            e.message.replace("volume name", "snapshot name"),
        )
    })
}

fn no_volume(what: impl std::fmt::Display) -> PbError {
    PbError::new(ErrorCode::NoSuchVolume, format!("no volume {what}"))
}

/// Why a clone with snapshots cannot be flattened.
pub fn flatten_refused(v: &VolumeInfo) -> PbError {
    let names: Vec<&str> = v.snapshots.iter().map(|s| s.name.as_str()).collect();
    PbError::new(
        ErrorCode::InvalidArgument,
        format!(
            "volume {:?} has snapshots ({}) that read through its parent; delete them before flattening",
            v.name,
            names.join(", ")
        ),
    )
}

/// The snapshot `name` (or id) of `v`.
pub fn find_snapshot<'a>(v: &'a VolumeInfo, name: &str) -> Result<&'a SnapshotInfo, PbError> {
    v.snapshots.iter().find(|s| s.name == name).ok_or_else(|| {
        PbError::new(
            ErrorCode::NoSuchVolume,
            format!("volume {:?} has no snapshot {name:?}", v.name),
        )
    })
}

impl Applier<'_> {
    pub(crate) fn volume_by_id(
        &self,
        group: u64,
        id: u64,
    ) -> Result<Option<VolumeInfo>, EngineError> {
        let Some(name) = self.get(&keys::volume_by_id(group, id))? else {
            return Ok(None);
        };
        Ok(self
            .volume_info(group, &String::from_utf8_lossy(&name))?
            .filter(|v| v.id == id))
    }

    fn save_volume(&mut self, wb: &mut WriteBatch, group: u64, v: &VolumeInfo) {
        use prost::Message as _;
        self.put(wb, keys::volume(group, &v.name), v.encode_to_vec());
    }

    pub(crate) fn create_snapshot(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        c: CreateSnapshotCmd,
    ) -> Result<ApplyResult, EngineError> {
        let Some(mut v) = self.volume_info(group, &c.volume)? else {
            return Ok(Err(no_volume(format_args!("named {:?}", c.volume))));
        };
        if v.snapshots.iter().any(|s| s.name == c.snapshot) {
            return Ok(Err(PbError::new(
                ErrorCode::VolumeExists,
                format!(
                    "volume {:?} already has a snapshot {:?}",
                    v.name, c.snapshot
                ),
            )));
        }
        if let Some(p) = v
            .snapshots
            .iter()
            .find(|s| s.state == SnapshotState::SnapshotPending as i32)
        {
            return Ok(Err(PbError::new(
                ErrorCode::Unavailable,
                format!(
                    "snapshot {:?} of volume {:?} is being taken; try again when it is done",
                    p.name, v.name
                ),
            )));
        }
        if v.snapshots.len() >= SNAPSHOTS_PER_VOLUME_MAX {
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "volume {:?} has {SNAPSHOTS_PER_VOLUME_MAX} snapshots, the most it may keep",
                    v.name
                ),
            )));
        }
        let id = v.next_snapshot_id.max(1);
        v.next_snapshot_id = id + 1;
        v.snapshots.push(SnapshotInfo {
            id,
            name: c.snapshot,
            created_unix_ms: c.created_unix_ms,
            state: SnapshotState::SnapshotPending as i32,
            size_bytes: v.size_bytes,
            quiesce_us: 0,
        });
        self.save_volume(wb, group, &v);
        Ok(Ok(ApplyOutput::Volume(v)))
    }

    pub(crate) fn set_snapshot_state(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        c: SetSnapshotStateCmd,
    ) -> Result<ApplyResult, EngineError> {
        let Some(mut v) = self.volume_by_id(group, c.volume_id)? else {
            return Ok(Err(no_volume(format_args!("with id {}", c.volume_id))));
        };
        let Some(i) = v.snapshots.iter().position(|s| s.id == c.snapshot_id) else {
            return Ok(Err(PbError::new(
                ErrorCode::NoSuchVolume,
                format!(
                    "volume {:?} has no snapshot with id {}",
                    v.name, c.snapshot_id
                ),
            )));
        };
        let from = v.snapshots[i].state;
        let to = c.state;
        let pending = SnapshotState::SnapshotPending as i32;
        let ready = SnapshotState::SnapshotReady as i32;
        let deleting = SnapshotState::SnapshotDeleting as i32;
        let allowed = (from == to)
            || (from == pending && (to == ready || to == deleting))
            || (from == ready && to == deleting && !c.from_pending_only)
            || (from == deleting
                && to == SnapshotState::Unspecified as i32
                && !c.from_pending_only);
        if !allowed {
            let name = |s: i32| {
                SnapshotState::try_from(s)
                    .map(|s| s.as_str_name())
                    .unwrap_or("?")
            };
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "snapshot {:?} of volume {:?} is {}, it cannot become {}",
                    v.snapshots[i].name,
                    v.name,
                    name(from),
                    name(to)
                ),
            )));
        }
        if to == deleting && from != deleting {
            let clones = self.clones_of(group, v.id, c.snapshot_id)?;
            if !clones.is_empty() {
                return Ok(Err(PbError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "snapshot {:?} of volume {:?} has clones: {} (flatten or delete them first)",
                        v.snapshots[i].name,
                        v.name,
                        clones.join(", ")
                    ),
                )));
            }
        }
        if to == SnapshotState::Unspecified as i32 {
            v.snapshots.remove(i);
        } else {
            v.snapshots[i].state = to;
            if from == pending && to == ready {
                v.snapshots[i].quiesce_us = c.quiesce_us;
            }
        }
        self.save_volume(wb, group, &v);
        Ok(Ok(ApplyOutput::Volume(v)))
    }

    /// Names of the volumes cloned from `volume`'s snapshot `snap` (a
    /// scan of the catalog: small next to blocks, and snapshot deletes
    /// are rare).
    pub(crate) fn clones_of(
        &mut self,
        group: u64,
        volume: u64,
        snap: u64,
    ) -> Result<Vec<String>, EngineError> {
        use prost::Message as _;
        let mut out = Vec::new();
        let (start, end) = (keys::volumes_start(group), keys::volumes_end(group));
        self.scan_each(&start, &end, |_, k, v| {
            let info = VolumeInfo::decode(v).map_err(|e| EngineError::Corrupt {
                key: k.to_vec(),
                what: e.to_string(),
            })?;
            if info
                .parent
                .is_some_and(|p| p.volume_id == volume && p.snapshot_id == snap)
            {
                out.push(info.name);
            }
            Ok(())
        })?;
        Ok(out)
    }

    pub(crate) fn flatten(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        name: &str,
    ) -> Result<ApplyResult, EngineError> {
        let Some(mut v) = self.volume_info(group, name)? else {
            return Ok(Err(no_volume(format_args!("named {name:?}"))));
        };
        // A snapshot of the clone reads its absent blocks through the
        // parent: dropping the parent would turn them into zeros.
        if !v.snapshots.is_empty() {
            return Ok(Err(flatten_refused(&v)));
        }
        v.parent = None;
        self.save_volume(wb, group, &v);
        Ok(Ok(ApplyOutput::Volume(v)))
    }
}
