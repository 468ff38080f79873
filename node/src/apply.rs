//! Applying committed commands to a group's state machine: block writes
//! (with read-modify-write of partial 4 KiB blocks), discards, volume purges
//! and catalog changes. Apply is deterministic: every replica turns the same
//! log into the same bytes. All effects of one ready-loop round go into one
//! write batch together with the apply index; an overlay lets later entries
//! of the round see the effects of earlier ones.

use std::collections::HashMap;

use prost::Message as _;
use raftblk_proto::{
    command::Cmd, CloneWrite, Command, Error as PbError, ErrorCode, VolumeInfo, BLOCK_BYTES,
    SECTOR_BYTES,
};
use rocksdb::WriteBatch;

use crate::block;
use crate::engine::{Engine, EngineError};
use crate::keys;

/// What applying one command produced, handed back to its proposer.
#[derive(Debug, Clone, PartialEq)]
pub enum ApplyOutput {
    Done,
    Volume(VolumeInfo),
    /// The cluster map changed: its new epoch.
    MapEpoch(u64),
    /// A membership change took effect: the group's new membership.
    Membership(std::sync::Arc<crate::membership::Membership>),
    /// A volume's attach lease after an attach, renewal or detach.
    Lease(raftblk_proto::AttachLease),
}

/// The result of one command: a domain error leaves the state unchanged.
pub type ApplyResult = Result<ApplyOutput, PbError>;

/// Accumulates one round's state-machine changes.
pub struct Applier<'a> {
    engine: &'a Engine,
    overlay: HashMap<Vec<u8>, Option<Vec<u8>>>,
    deleted_ranges: Vec<(Vec<u8>, Vec<u8>)>,
    /// Checksum mismatches met during read-modify-write.
    pub checksum_errors: u64,
    /// Corrupt blocks rewritten from a healthy copy.
    pub repaired: u64,
}

impl<'a> Applier<'a> {
    pub fn new(engine: &'a Engine) -> Self {
        Applier {
            engine,
            overlay: HashMap::new(),
            deleted_ranges: Vec::new(),
            checksum_errors: 0,
            repaired: 0,
        }
    }

    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, EngineError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        if self
            .deleted_ranges
            .iter()
            .any(|(s, e)| key >= s.as_slice() && key < e.as_slice())
        {
            return Ok(None);
        }
        self.engine.get_kv(key)
    }

    pub(crate) fn put(&mut self, wb: &mut WriteBatch, key: Vec<u8>, value: Vec<u8>) {
        wb.put_cf(self.engine.kv_cf(), &key, &value);
        self.overlay.insert(key, Some(value));
    }

    pub(crate) fn delete(&mut self, wb: &mut WriteBatch, key: Vec<u8>) {
        wb.delete_cf(self.engine.kv_cf(), &key);
        self.overlay.insert(key, None);
    }

    /// Calls `f` on every pair in `[start, end)` as this round sees it
    /// (the engine's, with the round's earlier changes over them), in key
    /// order, streaming. Changes `f` makes are not seen by this scan.
    pub(crate) fn scan_each(
        &mut self,
        start: &[u8],
        end: &[u8],
        mut f: impl FnMut(&mut Self, &[u8], &[u8]) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        let mut round: Vec<(Vec<u8>, Option<Vec<u8>>)> = self
            .overlay
            .iter()
            .filter(|(k, _)| k.as_slice() >= start && k.as_slice() < end)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        round.sort_by(|a, b| a.0.cmp(&b.0));
        let deleted = self.deleted_ranges.clone();
        let engine = self.engine;
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_vec());
        let iter = engine.db().iterator_cf_opt(
            engine.kv_cf(),
            ro,
            rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward),
        );
        let mut next_round = 0;
        for item in iter {
            let (k, v) = item?;
            // The round's own pairs sorting before this one.
            while next_round < round.len() && round[next_round].0.as_slice() < &*k {
                if let Some(rv) = &round[next_round].1 {
                    f(self, &round[next_round].0, rv)?;
                }
                next_round += 1;
            }
            if next_round < round.len() && round[next_round].0.as_slice() == &*k {
                if let Some(rv) = &round[next_round].1 {
                    f(self, &k, rv)?;
                }
                next_round += 1;
                continue;
            }
            if deleted.iter().any(|(s, e)| *k >= **s && *k < **e) {
                continue;
            }
            f(self, &k, &v)?;
        }
        for (rk, rv) in &round[next_round..] {
            if let Some(rv) = rv {
                f(self, rk, rv)?;
            }
        }
        Ok(())
    }

    /// The ranges this round deleted (purged volumes), for reclamation
    /// once the round's batch is written.
    pub fn take_deleted_ranges(&mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        std::mem::take(&mut self.deleted_ranges)
    }

    pub(crate) fn delete_range(&mut self, wb: &mut WriteBatch, start: Vec<u8>, end: Vec<u8>) {
        wb.delete_range_cf(self.engine.kv_cf(), &start, &end);
        self.overlay
            .retain(|k, _| !(k.as_slice() >= start.as_slice() && k.as_slice() < end.as_slice()));
        self.deleted_ranges.push((start, end));
    }

    /// Applies one command of `group`; storage failures are fatal to the
    /// round (returned as `Err`), domain errors are the command's result.
    pub fn apply(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        data: &[u8],
    ) -> Result<ApplyResult, EngineError> {
        if data.is_empty() {
            // Raft's empty entry at the start of a term.
            return Ok(Ok(ApplyOutput::Done));
        }
        let cmd = match Command::decode(data) {
            Ok(Command { cmd: Some(c) }) => c,
            Ok(Command { cmd: None }) | Err(_) => {
                return Ok(Err(PbError::new(
                    ErrorCode::InvalidArgument,
                    "undecodable command",
                )));
            }
        };
        match cmd {
            Cmd::Write(w) => {
                if let Some(e) = self.check_epoch(group, w.volume_id, w.epoch)? {
                    return Ok(Err(e));
                }
                self.write(
                    wb,
                    group,
                    w.volume_id,
                    w.offset_bytes,
                    Some(&w.data),
                    w.data.len() as u64,
                    w.clone.as_ref(),
                )
            }
            Cmd::Discard(d) => {
                if let Some(e) = self.check_epoch(group, d.volume_id, d.epoch)? {
                    return Ok(Err(e));
                }
                self.write(
                    wb,
                    group,
                    d.volume_id,
                    d.offset_bytes,
                    None,
                    d.length_bytes,
                    d.clone.as_ref(),
                )
            }
            Cmd::PurgeVolume(p) => {
                self.delete_range(
                    wb,
                    keys::volume_blocks_start(group, p.volume_id),
                    keys::volume_blocks_end(group, p.volume_id),
                );
                self.delete(wb, keys::fence(group, p.volume_id));
                self.delete_range(
                    wb,
                    keys::snap_block(group, p.volume_id, 0, 0),
                    keys::snap_volume_end(group, p.volume_id),
                );
                self.delete(wb, keys::snap_cut(group, p.volume_id));
                crate::metrics::METRICS.forget_volume(p.volume_id);
                Ok(Ok(ApplyOutput::Done))
            }
            Cmd::Fence(c) => self.fence(wb, group, c),
            Cmd::Attach(c) => self.attach(wb, group, c),
            Cmd::Renew(c) => self.renew(wb, group, c),
            Cmd::Detach(c) => self.detach(wb, group, c),
            Cmd::SetNode(c) => self.set_node(wb, group, c),
            Cmd::SetGroups(c) => self.set_groups(wb, group, c),
            Cmd::SetFlags(c) => self.set_flags(wb, group, c),
            Cmd::SetFullNodes(c) => self.set_full_nodes(wb, group, c),
            Cmd::CreateVolume(c) => self.create_volume(wb, group, c),
            Cmd::DeleteVolume(d) => self.delete_volume(wb, group, &d.name),
            Cmd::GrowVolume(g) => self.grow_volume(wb, group, &g.name, g.new_size_bytes),
            Cmd::SetQos(q) => self.set_qos(wb, group, &q.name, q.qos),
            Cmd::SnapshotOp(c) => self.snapshot_op(wb, group, c),
            Cmd::CreateSnapshot(c) => self.create_snapshot(wb, group, c),
            Cmd::SetSnapshotState(c) => self.set_snapshot_state(wb, group, c),
            Cmd::Flatten(c) => self.flatten(wb, group, &c.name),
            Cmd::RepairBlock(r) => {
                let want = if r.zero { 0 } else { BLOCK_BYTES as usize };
                if r.data.len() != want {
                    return Ok(Err(PbError::new(
                        ErrorCode::InvalidArgument,
                        "repair data is neither one block nor (zero) empty",
                    )));
                }
                // Only copies that fail their checksum are replaced: a
                // healthy copy already equals the repair's value (see
                // `repair`: it is this block's value as of this entry).
                let key = keys::block(group, r.volume_id, r.block);
                if let Some(stored) = self.get(&key)? {
                    if block::decode(&stored).is_err() {
                        tracing::warn!(
                            group,
                            volume = r.volume_id,
                            block = r.block,
                            zero = r.zero,
                            "repaired a corrupt block"
                        );
                        self.repaired += 1;
                        if r.zero {
                            self.delete(wb, key);
                        } else {
                            self.put(wb, key, block::encode(&r.data));
                        }
                    }
                }
                Ok(Ok(ApplyOutput::Done))
            }
        }
    }

    /// Writes `data` (or zeros, for a discard when `data` is None) at
    /// `offset`; blocks that end up all zero are deleted (thin volumes),
    /// or kept as whiteouts on a clone (`clone` set, see `CloneWrite`).
    /// The first change of a block after the volume's latest snapshot cut
    /// keeps its old value for the snapshot (see `cow`).
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        volume: u64,
        offset: u64,
        data: Option<&[u8]>,
        len: u64,
        clone: Option<&CloneWrite>,
    ) -> Result<ApplyResult, EngineError> {
        if !offset.is_multiple_of(SECTOR_BYTES)
            || !len.is_multiple_of(SECTOR_BYTES)
            || len == 0
            || offset.checked_add(len).is_none()
        {
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                format!("unaligned range offset={offset} length={len}"),
            )));
        }
        if let Some(c) = clone {
            for base in [&c.head_base, &c.tail_base] {
                if !base.is_empty() && base.len() != BLOCK_BYTES as usize {
                    return Ok(Err(PbError::new(
                        ErrorCode::InvalidArgument,
                        format!("a clone's base block is {} bytes, not 4096", base.len()),
                    )));
                }
            }
        }
        let cut = self.cut_of(group, volume)?;
        let end = offset + len;
        let first_block = offset / BLOCK_BYTES;
        let last_block = (end - 1) / BLOCK_BYTES;
        for b in first_block..=last_block {
            let block_start = b * BLOCK_BYTES;
            let lo = offset.max(block_start);
            let hi = end.min(block_start + BLOCK_BYTES);
            let key = keys::block(group, volume, b);
            let full = lo == block_start && hi == block_start + BLOCK_BYTES;
            let current = if full && clone.is_none_or(|c| !c.only_absent) {
                None
            } else {
                let cur = self.get(&key)?;
                if cur.is_some() && clone.is_some_and(|c| c.only_absent) {
                    // Flatten's copy-up never overwrites the clone's own.
                    continue;
                }
                cur
            };
            self.preserve(wb, group, volume, b, cut)?;
            let mut base_corrupt = false;
            let mut content = if full {
                vec![0u8; BLOCK_BYTES as usize]
            } else {
                match current {
                    Some(stored) => match block::decode(&stored) {
                        Ok(d) => d.to_vec(),
                        Err(e) => {
                            base_corrupt = true;
                            self.checksum_errors += 1;
                            tracing::error!(group, volume, block = b, error = %e, "checksum mismatch during read-modify-write");
                            vec![0u8; BLOCK_BYTES as usize]
                        }
                    },
                    None => {
                        // A clone's block it never wrote: the parent's.
                        let base = clone.map(|c| {
                            if b == first_block && lo != block_start {
                                &c.head_base
                            } else {
                                &c.tail_base
                            }
                        });
                        match base {
                            Some(base) if base.len() == BLOCK_BYTES as usize => base.to_vec(),
                            _ => vec![0u8; BLOCK_BYTES as usize],
                        }
                    }
                }
            };
            let dst = &mut content[(lo - block_start) as usize..(hi - block_start) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(lo - offset) as usize..(hi - offset) as usize]),
                None => dst.fill(0),
            }
            if base_corrupt {
                // The untouched part of this block is unknown here: keep it
                // marked corrupt so reads refuse it and the scrubber has it
                // repaired from the leader's copy.
                self.put(wb, key, block::encode_poisoned(&content));
            } else if block::is_zero(&content) {
                if clone.is_some() {
                    self.put(wb, key, block::WHITEOUT.to_vec());
                } else {
                    self.delete(wb, key);
                }
            } else {
                self.put(wb, key, block::encode(&content));
            }
        }
        Ok(Ok(ApplyOutput::Done))
    }

    pub(crate) fn volume_info(
        &self,
        group: u64,
        name: &str,
    ) -> Result<Option<VolumeInfo>, EngineError> {
        let key = keys::volume(group, name);
        match self.get(&key)? {
            Some(v) => {
                VolumeInfo::decode(v.as_slice())
                    .map(Some)
                    .map_err(|e| EngineError::Corrupt {
                        key,
                        what: e.to_string(),
                    })
            }
            None => Ok(None),
        }
    }

    fn create_volume(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        c: raftblk_proto::CreateVolumeCmd,
    ) -> Result<ApplyResult, EngineError> {
        if self.volume_info(group, &c.name)?.is_some() {
            return Ok(Err(PbError::new(
                ErrorCode::VolumeExists,
                format!("volume {:?} already exists", c.name),
            )));
        }
        let next_key = keys::next_volume_id(group);
        let id = match self.get(&next_key)? {
            Some(v) if v.len() == 8 => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&v);
                u64::from_be_bytes(b)
            }
            Some(_) => {
                return Err(EngineError::Corrupt {
                    key: next_key,
                    what: "next volume id is not 8 bytes".into(),
                })
            }
            None => 1,
        };
        let mut size_bytes = c.size_bytes;
        if let Some(p) = c.parent {
            let snap = self
                .volume_by_id(group, p.volume_id)?
                .and_then(|v| v.snapshots.into_iter().find(|s| s.id == p.snapshot_id));
            match snap {
                Some(s) if s.state == raftblk_proto::SnapshotState::SnapshotReady as i32 => {
                    if size_bytes == 0 {
                        size_bytes = s.size_bytes;
                    }
                }
                _ => {
                    return Ok(Err(PbError::new(
                        ErrorCode::NoSuchVolume,
                        format!(
                            "the parent snapshot (volume id {}, snapshot id {}) is not ready or is gone",
                            p.volume_id, p.snapshot_id
                        ),
                    )))
                }
            }
        }
        let info = VolumeInfo {
            id,
            name: c.name.clone(),
            size_bytes,
            chunk_size_bytes: c.chunk_size_bytes,
            created_unix_ms: c.created_unix_ms,
            qos: c.qos,
            snapshots: Vec::new(),
            next_snapshot_id: 1,
            whiteouts: c.parent.is_some(),
            parent: c.parent,
        };
        self.put(wb, next_key, (id + 1).to_be_bytes().to_vec());
        self.put(wb, keys::volume(group, &c.name), info.encode_to_vec());
        self.put(wb, keys::volume_by_id(group, id), c.name.into_bytes());
        Ok(Ok(ApplyOutput::Volume(info)))
    }

    fn delete_volume(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        name: &str,
    ) -> Result<ApplyResult, EngineError> {
        let Some(info) = self.volume_info(group, name)? else {
            return Ok(Err(PbError::new(
                ErrorCode::NoSuchVolume,
                format!("no volume named {name:?}"),
            )));
        };
        for snap in &info.snapshots {
            let clones = self.clones_of(group, info.id, snap.id)?;
            if !clones.is_empty() {
                return Ok(Err(PbError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "snapshot {:?} of volume {name:?} has clones: {} (flatten or delete them first)",
                        snap.name,
                        clones.join(", ")
                    ),
                )));
            }
        }
        self.delete(wb, keys::volume(group, name));
        self.delete(wb, keys::volume_by_id(group, info.id));
        self.delete(wb, keys::attach_lease(group, info.id));
        Ok(Ok(ApplyOutput::Volume(info)))
    }

    fn set_qos(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        name: &str,
        qos: Option<raftblk_proto::QosLimits>,
    ) -> Result<ApplyResult, EngineError> {
        let Some(mut info) = self.volume_info(group, name)? else {
            return Ok(Err(PbError::new(
                ErrorCode::NoSuchVolume,
                format!("no volume named {name:?}"),
            )));
        };
        info.qos = qos.filter(|q| *q != raftblk_proto::QosLimits::default());
        self.put(wb, keys::volume(group, name), info.encode_to_vec());
        Ok(Ok(ApplyOutput::Volume(info)))
    }

    fn grow_volume(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        name: &str,
        new_size: u64,
    ) -> Result<ApplyResult, EngineError> {
        let Some(mut info) = self.volume_info(group, name)? else {
            return Ok(Err(PbError::new(
                ErrorCode::NoSuchVolume,
                format!("no volume named {name:?}"),
            )));
        };
        if new_size < info.size_bytes {
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "volume {name:?} is {} bytes; shrinking to {new_size} is not supported",
                    info.size_bytes
                ),
            )));
        }
        info.size_bytes = new_size;
        self.put(wb, keys::volume(group, name), info.encode_to_vec());
        Ok(Ok(ApplyOutput::Volume(info)))
    }
}

/// Reads the catalog entry of volume `name` from the local meta replica.
pub fn lookup_volume(engine: &Engine, name: &str) -> Result<Option<VolumeInfo>, EngineError> {
    let key = keys::volume(raftblk_proto::META_GROUP_ID, name);
    match engine.get_kv(&key)? {
        Some(v) => VolumeInfo::decode(v.as_slice())
            .map(Some)
            .map_err(|e| EngineError::Corrupt {
                key,
                what: e.to_string(),
            }),
        None => Ok(None),
    }
}

/// Reads the catalog entry of volume `id` from the local meta replica:
/// both lookups (id → name → record) from one pinned view, and a record
/// that names another id (the name was reused after a delete) is `None`.
pub fn lookup_volume_by_id(engine: &Engine, id: u64) -> Result<Option<VolumeInfo>, EngineError> {
    let snap = engine.db().snapshot();
    let g = raftblk_proto::META_GROUP_ID;
    let Some(name) = snap.get_cf(engine.kv_cf(), keys::volume_by_id(g, id))? else {
        return Ok(None);
    };
    let key = keys::volume(g, &String::from_utf8_lossy(&name));
    let Some(v) = snap.get_cf(engine.kv_cf(), &key)? else {
        return Ok(None);
    };
    let info = VolumeInfo::decode(v.as_slice()).map_err(|e| EngineError::Corrupt {
        key,
        what: e.to_string(),
    })?;
    Ok((info.id == id).then_some(info))
}

/// The next volume id the local meta replica would hand out: every id below
/// it was created at some point (so an id below it that is missing from the
/// catalog belongs to a deleted volume).
pub fn next_volume_id(engine: &Engine) -> Result<u64, EngineError> {
    match engine.get_kv(&keys::next_volume_id(raftblk_proto::META_GROUP_ID))? {
        Some(v) if v.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v);
            Ok(u64::from_be_bytes(b))
        }
        _ => Ok(1),
    }
}

/// Every volume in the local meta replica, in name order.
pub fn list_volumes(engine: &Engine) -> Result<Vec<VolumeInfo>, EngineError> {
    let g = raftblk_proto::META_GROUP_ID;
    let mut out = Vec::new();
    let mut ro = rocksdb::ReadOptions::default();
    ro.set_iterate_upper_bound(keys::volumes_end(g));
    let start = keys::volumes_start(g);
    let iter = engine.db().iterator_cf_opt(
        engine.kv_cf(),
        ro,
        rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward),
    );
    for item in iter {
        let (k, v) = item?;
        let info = VolumeInfo::decode(&*v).map_err(|e| EngineError::Corrupt {
            key: k.to_vec(),
            what: e.to_string(),
        })?;
        out.push(info);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftblk_proto::{RepairBlockCmd, WriteCmd};

    fn cmd(c: Cmd) -> Vec<u8> {
        Command { cmd: Some(c) }.encode_to_vec()
    }

    fn apply(engine: &Engine, data: &[u8]) -> ApplyResult {
        let mut wb = WriteBatch::default();
        let mut a = Applier::new(engine);
        let r = a.apply(&mut wb, 1, data).unwrap_or_else(|e| panic!("{e}"));
        engine.write(wb, false).unwrap_or_else(|e| panic!("{e}"));
        r
    }

    #[test]
    fn rmw_over_a_corrupt_base_stays_flagged_until_repaired() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let engine = Engine::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let good = vec![7u8; 4096];
        let w = |offset: u64, data: Vec<u8>| {
            cmd(Cmd::Write(WriteCmd {
                volume_id: 3,
                offset_bytes: offset,
                data: data.into(),
                epoch: 1,
                clone: None,
            }))
        };
        assert_eq!(apply(&engine, &w(0, good.clone())), Ok(ApplyOutput::Done));
        // Corrupt the stored block, then write 512 bytes into it.
        let key = keys::block(1, 3, 0);
        let mut stored = engine.get_kv(&key).ok().flatten().unwrap_or_default();
        stored[100] ^= 1;
        engine
            .db()
            .put_cf(engine.kv_cf(), &key, &stored)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            apply(&engine, &w(512, vec![9u8; 512])),
            Ok(ApplyOutput::Done)
        );
        let after = engine.get_kv(&key).ok().flatten().unwrap_or_default();
        assert!(
            block::decode(&after).is_err(),
            "a merge over a corrupt base must stay flagged"
        );
        // A repair with the leader's copy replaces it.
        let mut fixed = good.clone();
        fixed[512..1024].fill(9);
        let repair = cmd(Cmd::RepairBlock(RepairBlockCmd {
            volume_id: 3,
            block: 0,
            data: fixed.clone().into(),
            zero: false,
        }));
        assert_eq!(apply(&engine, &repair), Ok(ApplyOutput::Done));
        let healed = engine.get_kv(&key).ok().flatten().unwrap_or_default();
        assert_eq!(
            block::decode(&healed).map(|d| d.to_vec()).ok(),
            Some(fixed.clone())
        );
        // A repair never overwrites a healthy copy (it may be newer).
        let stale = cmd(Cmd::RepairBlock(RepairBlockCmd {
            volume_id: 3,
            block: 0,
            data: good.into(),
            zero: false,
        }));
        assert_eq!(apply(&engine, &stale), Ok(ApplyOutput::Done));
        let kept = engine.get_kv(&key).ok().flatten().unwrap_or_default();
        assert_eq!(block::decode(&kept).map(|d| d.to_vec()).ok(), Some(fixed));
    }
}
