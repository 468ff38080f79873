//! Exclusive attach: the volume's attach lease in the meta group and its
//! fence in each data group, as applied state.
//!
//! A lease names at most one holder and an epoch that rises by one with
//! every attach (kept after a detach, so epochs are never reused). The new
//! holder then raises the volume's fence to its epoch in every data group
//! (`FenceCmd`), and every write and discard carries its writer's epoch:
//! apply refuses one below the fence (`FENCED`), so a writer that lost the
//! volume, however late its requests arrive, can no longer change a block
//! once the new holder started. The fence is an ordinary key of the
//! group's state machine, so snapshots, moves and rebuilds carry it.
//!
//! Expiry is judged with the proposing leader's clock (`now_unix_ms` in
//! the command), so every replica decides alike; it only decides whether
//! another holder needs `takeover`: safety rests on the fence alone.

use prost::Message as _;
use raftblk_proto::{
    AttachCmd, AttachLease, DetachCmd, Error as PbError, ErrorCode, FenceCmd, RenewCmd,
};
use rocksdb::WriteBatch;

use crate::apply::{Applier, ApplyOutput, ApplyResult};
use crate::engine::{Engine, EngineError};
use crate::keys;

/// Lease lifetime when the request names none.
pub const LEASE_TTL_MS_DEFAULT: u64 = 30_000;
/// Bounds of a requested lease lifetime.
pub const LEASE_TTL_MS_MIN: u64 = 1_000;
pub const LEASE_TTL_MS_MAX: u64 = 600_000;

/// A requested lifetime, defaulted and clamped.
pub fn lease_ttl_ms(requested: u64) -> u64 {
    if requested == 0 {
        LEASE_TTL_MS_DEFAULT
    } else {
        requested.clamp(LEASE_TTL_MS_MIN, LEASE_TTL_MS_MAX)
    }
}

fn decode_lease(key: &[u8], v: &[u8]) -> Result<AttachLease, EngineError> {
    AttachLease::decode(v).map_err(|e| EngineError::Corrupt {
        key: key.to_vec(),
        what: e.to_string(),
    })
}

fn decode_u64(key: &[u8], v: &[u8]) -> Result<u64, EngineError> {
    let b: [u8; 8] = v.try_into().map_err(|_| EngineError::Corrupt {
        key: key.to_vec(),
        what: "fence is not 8 bytes".into(),
    })?;
    Ok(u64::from_be_bytes(b))
}

/// The attach lease of volume `id` in the local meta replica.
pub fn lookup_lease(engine: &Engine, id: u64) -> Result<Option<AttachLease>, EngineError> {
    let key = keys::attach_lease(raftblk_proto::META_GROUP_ID, id);
    engine
        .get_kv(&key)?
        .map(|v| decode_lease(&key, &v))
        .transpose()
}

fn lost(volume: u64, lease: &AttachLease) -> PbError {
    PbError::new(
        ErrorCode::Fenced,
        if lease.holder.is_empty() {
            format!(
                "the attach lease of volume {volume} was broken (detached at epoch {})",
                lease.epoch
            )
        } else {
            format!(
                "the attach lease of volume {volume} is held by {:?} at epoch {}",
                lease.holder, lease.epoch
            )
        },
    )
}

impl Applier<'_> {
    /// The volume's fence in `group` (0: never fenced).
    pub(crate) fn fence_of(&self, group: u64, volume: u64) -> Result<u64, EngineError> {
        let key = keys::fence(group, volume);
        match self.get(&key)? {
            Some(v) => decode_u64(&key, &v),
            None => Ok(0),
        }
    }

    /// Refuses a write or discard of `epoch` below the volume's fence.
    pub(crate) fn check_epoch(
        &self,
        group: u64,
        volume: u64,
        epoch: u64,
    ) -> Result<Option<PbError>, EngineError> {
        let fence = self.fence_of(group, volume)?;
        if epoch >= fence && epoch != 0 {
            return Ok(None);
        }
        Ok(Some(PbError::new(
            ErrorCode::Fenced,
            if epoch == 0 {
                format!("writes to volume {volume} need an attach lease (epoch 0)")
            } else {
                format!(
                    "volume {volume} was attached by another holder: epoch {epoch} is below the fence {fence} of group {group}"
                )
            },
        )))
    }

    pub(crate) fn fence(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        c: FenceCmd,
    ) -> Result<ApplyResult, EngineError> {
        if c.epoch > self.fence_of(group, c.volume_id)? {
            self.put(
                wb,
                keys::fence(group, c.volume_id),
                c.epoch.to_be_bytes().to_vec(),
            );
        }
        Ok(Ok(ApplyOutput::Done))
    }

    fn lease(&self, group: u64, volume: u64) -> Result<Option<AttachLease>, EngineError> {
        if self.get(&keys::volume_by_id(group, volume))?.is_none() {
            return Ok(None);
        }
        let key = keys::attach_lease(group, volume);
        Ok(Some(match self.get(&key)? {
            Some(v) => decode_lease(&key, &v)?,
            None => AttachLease::default(),
        }))
    }

    fn store_lease(&mut self, wb: &mut WriteBatch, group: u64, volume: u64, l: &AttachLease) {
        self.put(wb, keys::attach_lease(group, volume), l.encode_to_vec());
    }

    pub(crate) fn attach(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        c: AttachCmd,
    ) -> Result<ApplyResult, EngineError> {
        let Some(mut lease) = self.lease(group, c.volume_id)? else {
            return Ok(Err(no_volume(c.volume_id)));
        };
        if c.holder.is_empty() {
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                "an attach names its holder",
            )));
        }
        let live = !lease.holder.is_empty() && lease.expires_unix_ms > c.now_unix_ms;
        let expires = c.now_unix_ms.saturating_add(lease_ttl_ms(c.ttl_ms));
        if lease.holder == c.holder && c.reuse {
            // The holder's handles share its epoch even past the expiry
            // (renewals failed for a while): nobody attached since.
            lease.expires_unix_ms = expires;
        } else if live && lease.holder != c.holder && !c.takeover {
            return Ok(Err(PbError::new(
                ErrorCode::Attached,
                format!(
                    "volume {} is attached by {:?} (epoch {}, lease expires in {} s unless renewed)",
                    c.volume_id,
                    lease.holder,
                    lease.epoch,
                    (lease.expires_unix_ms - c.now_unix_ms).div_ceil(1000)
                ),
            )));
        } else {
            lease = AttachLease {
                holder: c.holder,
                epoch: lease.epoch + 1,
                acquired_unix_ms: c.now_unix_ms,
                expires_unix_ms: expires,
            };
        }
        self.store_lease(wb, group, c.volume_id, &lease);
        Ok(Ok(ApplyOutput::Lease(lease)))
    }

    pub(crate) fn renew(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        c: RenewCmd,
    ) -> Result<ApplyResult, EngineError> {
        let Some(mut lease) = self.lease(group, c.volume_id)? else {
            return Ok(Err(no_volume(c.volume_id)));
        };
        if lease.holder != c.holder || lease.epoch != c.epoch {
            return Ok(Err(lost(c.volume_id, &lease)));
        }
        lease.expires_unix_ms = c.now_unix_ms.saturating_add(lease_ttl_ms(c.ttl_ms));
        self.store_lease(wb, group, c.volume_id, &lease);
        Ok(Ok(ApplyOutput::Lease(lease)))
    }

    pub(crate) fn detach(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        c: DetachCmd,
    ) -> Result<ApplyResult, EngineError> {
        let Some(mut lease) = self.lease(group, c.volume_id)? else {
            return Ok(Err(no_volume(c.volume_id)));
        };
        if !c.force && (lease.holder != c.holder || lease.epoch != c.epoch) {
            return Ok(Err(lost(c.volume_id, &lease)));
        }
        // The epoch stays: the next attach gets a higher one.
        lease.holder.clear();
        lease.expires_unix_ms = 0;
        self.store_lease(wb, group, c.volume_id, &lease);
        Ok(Ok(ApplyOutput::Lease(lease)))
    }
}

fn no_volume(id: u64) -> PbError {
    PbError::new(ErrorCode::NoSuchVolume, format!("no volume with id {id}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftblk_proto::{command::Cmd, Command, CreateVolumeCmd, WriteCmd};

    fn apply(engine: &Engine, group: u64, c: Cmd) -> ApplyResult {
        let mut wb = WriteBatch::default();
        let mut a = Applier::new(engine);
        let data = Command { cmd: Some(c) }.encode_to_vec();
        let r = a
            .apply(&mut wb, group, &data)
            .unwrap_or_else(|e| panic!("{e}"));
        engine.write(wb, false).unwrap_or_else(|e| panic!("{e}"));
        r
    }

    fn attach(holder: &str, takeover: bool, reuse: bool, now: u64) -> Cmd {
        Cmd::Attach(AttachCmd {
            volume_id: 1,
            holder: holder.into(),
            takeover,
            reuse,
            now_unix_ms: now,
            ttl_ms: 10_000,
        })
    }

    fn epoch(r: ApplyResult) -> u64 {
        match r {
            Ok(ApplyOutput::Lease(l)) => l.epoch,
            other => panic!("not a lease: {other:?}"),
        }
    }

    fn code(r: ApplyResult) -> ErrorCode {
        match r {
            Err(e) => e.kind(),
            Ok(o) => panic!("succeeded: {o:?}"),
        }
    }

    #[test]
    fn attach_takeover_reuse_expiry_detach() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let engine = Engine::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            code(apply(&engine, 0, attach("a", false, false, 0))),
            ErrorCode::NoSuchVolume
        );
        let create = Cmd::CreateVolume(CreateVolumeCmd {
            name: "v".into(),
            size_bytes: 1 << 20,
            chunk_size_bytes: 1 << 20,
            created_unix_ms: 0,
            qos: None,
            parent: None,
        });
        assert!(apply(&engine, 0, create).is_ok());
        assert_eq!(epoch(apply(&engine, 0, attach("a", false, false, 0))), 1);
        // The same holder: shares its epoch with `reuse`, else a new one.
        assert_eq!(epoch(apply(&engine, 0, attach("a", false, true, 1))), 1);
        assert_eq!(epoch(apply(&engine, 0, attach("a", false, false, 2))), 2);
        // Another holder: refused while the lease lives, unless taking over.
        assert_eq!(
            code(apply(&engine, 0, attach("b", false, false, 3))),
            ErrorCode::Attached
        );
        assert_eq!(epoch(apply(&engine, 0, attach("b", true, false, 4))), 3);
        // The old holder can neither renew nor detach any more.
        let renew = |holder: &str, epoch: u64, now: u64| {
            Cmd::Renew(RenewCmd {
                volume_id: 1,
                holder: holder.into(),
                epoch,
                now_unix_ms: now,
                ttl_ms: 10_000,
            })
        };
        assert_eq!(code(apply(&engine, 0, renew("a", 2, 5))), ErrorCode::Fenced);
        assert_eq!(epoch(apply(&engine, 0, renew("b", 3, 5))), 3);
        // Expired (10 s after the renewal at 5): anyone attaches.
        assert_eq!(
            code(apply(&engine, 0, attach("c", false, false, 10_004))),
            ErrorCode::Attached
        );
        assert_eq!(
            epoch(apply(&engine, 0, attach("c", false, false, 10_005))),
            4
        );
        // A holder sharing its lease keeps the epoch even past its expiry
        // (nobody attached since).
        assert_eq!(
            epoch(apply(&engine, 0, attach("c", false, true, 30_000))),
            4
        );
        let detach = |holder: &str, epoch: u64, force: bool| {
            Cmd::Detach(DetachCmd {
                volume_id: 1,
                holder: holder.into(),
                epoch,
                force,
            })
        };
        assert_eq!(
            code(apply(&engine, 0, detach("b", 3, false))),
            ErrorCode::Fenced
        );
        assert_eq!(epoch(apply(&engine, 0, detach("x", 0, true))), 4);
        let l = lookup_lease(&engine, 1).ok().flatten().unwrap_or_default();
        assert!(l.holder.is_empty());
        // Epochs never go back after a detach.
        assert_eq!(
            epoch(apply(&engine, 0, attach("d", false, false, 10_006))),
            5
        );
    }

    #[test]
    fn writes_below_the_fence_are_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let engine = Engine::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let write = |epoch: u64| {
            Cmd::Write(WriteCmd {
                volume_id: 7,
                offset_bytes: 0,
                data: vec![epoch as u8 + 1; 4096].into(),
                epoch,
                clone: None,
            })
        };
        assert_eq!(code(apply(&engine, 3, write(0))), ErrorCode::Fenced);
        assert_eq!(apply(&engine, 3, write(1)), Ok(ApplyOutput::Done));
        let discard = |epoch| {
            Cmd::Discard(raftblk_proto::DiscardCmd {
                volume_id: 7,
                offset_bytes: 0,
                length_bytes: 4096,
                epoch,
                clone: None,
            })
        };
        let fence = |epoch| {
            Cmd::Fence(FenceCmd {
                volume_id: 7,
                epoch,
            })
        };
        assert_eq!(apply(&engine, 3, fence(2)), Ok(ApplyOutput::Done));
        // A lower fence never lowers it.
        assert_eq!(apply(&engine, 3, fence(1)), Ok(ApplyOutput::Done));
        assert_eq!(code(apply(&engine, 3, write(1))), ErrorCode::Fenced);
        assert_eq!(code(apply(&engine, 3, discard(1))), ErrorCode::Fenced);
        // The block still holds the write of epoch 1 from before the fence.
        let stored = engine.get_kv(&keys::block(3, 7, 0)).ok().flatten();
        assert!(stored.is_some_and(|b| crate::block::decode(&b).is_ok_and(|d| d[0] == 2)));
        assert_eq!(apply(&engine, 3, write(2)), Ok(ApplyOutput::Done));
        assert_eq!(apply(&engine, 3, discard(2)), Ok(ApplyOutput::Done));
        // Other volumes and groups are not fenced.
        let other = Cmd::Write(WriteCmd {
            volume_id: 8,
            offset_bytes: 0,
            data: vec![1u8; 4096].into(),
            epoch: 1,
            clone: None,
        });
        assert_eq!(apply(&engine, 3, other), Ok(ApplyOutput::Done));
        assert_eq!(apply(&engine, 4, write(1)), Ok(ApplyOutput::Done));
    }
}
