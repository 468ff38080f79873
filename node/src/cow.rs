//! Volume snapshots inside the data groups: copy-on-write of 4 KiB blocks.
//!
//! A snapshot costs nothing when it is taken: each data group records the
//! volume's latest *cut* (`G|S|volume`, the snapshot id). The first change
//! of a block after cut `S` keeps the block's old value under
//! `G|o|volume|block|S` ("kept" values: a stored block, a whiteout, or
//! empty for a block that was absent). So `o|b|K` holds block `b`'s value
//! as of cut `K`, and that value is also its value at every earlier cut
//! `T` with no kept value in `[T, K)`: block `b` at snapshot `T` is the
//! first kept value with `K >= T`, else the current block.
//!
//! Deleting snapshot `D` moves each `o|b|D` to the newest live snapshot
//! `L` between the block's previous kept value and `D` (whose value it
//! is), or drops it when there is none: kept values always sit at live
//! snapshots, and a deleted snapshot frees what only it held. Rollback
//! writes every block's value at the snapshot back (keeping the current
//! values for later snapshots first, like any write).
//!
//! Commands scan a volume's kept values in one group in one apply; they
//! are rare (snapshot delete and rollback), and streaming keeps memory
//! bounded.

use raftblk_proto::{Error as PbError, ErrorCode, SnapshotOp, SnapshotOpCmd};
use rocksdb::WriteBatch;

use crate::apply::{Applier, ApplyOutput, ApplyResult};
use crate::engine::{Engine, EngineError, OwnedSnapshot};
use crate::keys;

/// The kept value of a block that was a whiteout (a clone's zeroed block).
pub(crate) const KEPT_WHITEOUT: &[u8] = b"W";

/// The kept form of a block's current stored value (`None`: absent).
pub fn kept_encode(current: Option<&[u8]>) -> Vec<u8> {
    match current {
        None => Vec::new(),
        Some([]) => KEPT_WHITEOUT.to_vec(),
        Some(stored) => stored.to_vec(),
    }
}

/// The stored value a kept value stands for (`None`: the block was
/// absent; `Some(empty)`: a whiteout).
pub fn kept_decode(kept: &[u8]) -> Option<&[u8]> {
    match kept {
        [] => None,
        k if k == KEPT_WHITEOUT => Some(&[]),
        stored => Some(stored),
    }
}

/// A stored cut: the snapshot id, then (16-byte values) the attach
/// epoch of the holder that cut it (0: not known, e.g. a cut moved back
/// to an older snapshot by a delete).
fn decode_cut(key: &[u8], v: &[u8]) -> Result<(u64, u64), EngineError> {
    let corrupt = || EngineError::Corrupt {
        key: key.to_vec(),
        what: format!("snapshot cut is {} bytes, not 8 or 16", v.len()),
    };
    let word = |i: usize| -> Result<u64, EngineError> {
        let b: [u8; 8] = v
            .get(i..i + 8)
            .and_then(|w| w.try_into().ok())
            .ok_or_else(corrupt)?;
        Ok(u64::from_be_bytes(b))
    };
    match v.len() {
        8 => Ok((word(0)?, 0)),
        16 => Ok((word(0)?, word(8)?)),
        _ => Err(corrupt()),
    }
}

fn encode_cut(snap: u64, epoch: u64) -> Vec<u8> {
    let mut v = snap.to_be_bytes().to_vec();
    v.extend_from_slice(&epoch.to_be_bytes());
    v
}

impl Applier<'_> {
    /// The volume's latest snapshot cut in `group` (0: none).
    pub(crate) fn cut_of(&self, group: u64, volume: u64) -> Result<u64, EngineError> {
        Ok(self.cut_with_epoch(group, volume)?.0)
    }

    /// The volume's latest cut in `group` and the epoch that cut it.
    fn cut_with_epoch(&self, group: u64, volume: u64) -> Result<(u64, u64), EngineError> {
        let key = keys::snap_cut(group, volume);
        match self.get(&key)? {
            Some(v) => decode_cut(&key, &v),
            None => Ok((0, 0)),
        }
    }

    /// Before block `b` changes: keeps its value for cut `cut` unless it
    /// was kept already (its first change since the cut).
    pub(crate) fn preserve(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        volume: u64,
        b: u64,
        cut: u64,
    ) -> Result<(), EngineError> {
        if cut == 0 {
            return Ok(());
        }
        let kept = keys::snap_block(group, volume, b, cut);
        if self.get(&kept)?.is_some() {
            return Ok(());
        }
        let current = self.get(&keys::block(group, volume, b))?;
        self.put(wb, kept, kept_encode(current.as_deref()));
        Ok(())
    }

    /// Sets block `b` to `value` (`None`: absent, `Some(empty)`: whiteout).
    fn set_block(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        volume: u64,
        b: u64,
        value: Option<Vec<u8>>,
    ) {
        let key = keys::block(group, volume, b);
        match value {
            Some(v) => self.put(wb, key, v),
            None => self.delete(wb, key),
        }
    }

    pub(crate) fn snapshot_op(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        c: SnapshotOpCmd,
    ) -> Result<ApplyResult, EngineError> {
        let (volume, snap) = (c.volume_id, c.snapshot_id);
        if snap == 0 {
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                "snapshot id 0 is not a snapshot",
            )));
        }
        match SnapshotOp::try_from(c.op) {
            Ok(SnapshotOp::Cut) => {
                if let Some(e) = self.check_epoch(group, volume, c.epoch)? {
                    return Ok(Err(e));
                }
                // Ids rise with creation; a retry (or a late copy) of an
                // older cut changes nothing.
                let (cut, cut_epoch) = self.cut_with_epoch(group, volume)?;
                if snap > cut {
                    self.put(wb, keys::snap_cut(group, volume), encode_cut(snap, c.epoch));
                } else if snap == cut && cut_epoch != 0 && cut_epoch != c.epoch {
                    // An earlier holder cut this group and stopped before
                    // the rest: the writes it let through since then are
                    // not in the snapshot here but may be in other
                    // groups' later cuts. The snapshot must fail.
                    return Ok(Err(PbError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "snapshot {snap} was cut in group {group} by an earlier holder \
                             (epoch {cut_epoch}); it cannot be completed by epoch {}",
                            c.epoch
                        ),
                    )));
                }
                Ok(Ok(ApplyOutput::Done))
            }
            Ok(SnapshotOp::Delete) => self.delete_snapshot(wb, group, volume, snap, &c.live),
            Ok(SnapshotOp::Rollback) => {
                if let Some(e) = self.check_epoch(group, volume, c.epoch)? {
                    return Ok(Err(e));
                }
                self.rollback(wb, group, volume, snap)
            }
            Ok(SnapshotOp::Unspecified) | Err(_) => Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                format!("unknown snapshot operation {}", c.op),
            ))),
        }
    }

    fn delete_snapshot(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        volume: u64,
        snap: u64,
        live: &[u64],
    ) -> Result<ApplyResult, EngineError> {
        let mut live: Vec<u64> = live.iter().copied().filter(|&s| s != snap).collect();
        live.sort_unstable();
        // The newest live snapshot in (after, snap).
        let newest_between =
            |after: u64| live.iter().rev().find(|&&s| s > after && s < snap).copied();
        let start = keys::snap_block(group, volume, 0, 0);
        let end = keys::snap_volume_end(group, volume);
        // (block, newest kept snapshot id below `snap`) of the block being
        // walked.
        let mut prev: Option<(u64, u64)> = None;
        self.scan_each(&start, &end, |a, k, v| {
            let Some((_, b, s)) = keys::parse_snap_block(group, k) else {
                return Ok(());
            };
            if s < snap {
                prev = Some((b, s));
                return Ok(());
            }
            if s != snap {
                return Ok(());
            }
            let after = match prev {
                Some((pb, ps)) if pb == b => ps,
                _ => 0,
            };
            a.delete(wb, k.to_vec());
            if let Some(l) = newest_between(after) {
                a.put(wb, keys::snap_block(group, volume, b, l), v.to_vec());
            }
            Ok(())
        })?;
        if self.cut_of(group, volume)? == snap {
            match live.iter().rev().find(|&&s| s < snap) {
                Some(&l) => self.put(wb, keys::snap_cut(group, volume), l.to_be_bytes().to_vec()),
                None => self.delete(wb, keys::snap_cut(group, volume)),
            }
        }
        Ok(Ok(ApplyOutput::Done))
    }

    fn rollback(
        &mut self,
        wb: &mut WriteBatch,
        group: u64,
        volume: u64,
        snap: u64,
    ) -> Result<ApplyResult, EngineError> {
        let cut = self.cut_of(group, volume)?;
        if cut < snap {
            return Ok(Err(PbError::new(
                ErrorCode::InvalidArgument,
                format!("snapshot {snap} of volume {volume} was never cut in group {group}"),
            )));
        }
        let start = keys::snap_block(group, volume, 0, 0);
        let end = keys::snap_volume_end(group, volume);
        let mut done: Option<u64> = None;
        self.scan_each(&start, &end, |a, k, v| {
            let Some((_, b, s)) = keys::parse_snap_block(group, k) else {
                return Ok(());
            };
            if s < snap || done == Some(b) {
                return Ok(());
            }
            done = Some(b);
            // `v` is the block's value at `snap`; the value now is kept
            // for the latest cut first, like any write's.
            a.preserve(wb, group, volume, b, cut)?;
            a.set_block(wb, group, volume, b, kept_decode(v).map(<[u8]>::to_vec));
            Ok(())
        })?;
        Ok(Ok(ApplyOutput::Done))
    }
}

/// Stored values of `volume`'s blocks `[first, first+count)` in `group` as
/// of snapshot `snap` (`None`: absent), read from one view.
pub fn read_at(
    engine: &Engine,
    view: &OwnedSnapshot,
    group: u64,
    volume: u64,
    first: u64,
    count: u64,
    snap: u64,
) -> Result<Vec<Option<Vec<u8>>>, EngineError> {
    let mut out: Vec<Option<Option<Vec<u8>>>> = vec![None; count as usize];
    let (start, end) = keys::snap_blocks_range(group, volume, first, first + count);
    view.scan_kv(engine, &start, &end, |k, v| {
        if let Some((_, b, s)) = keys::parse_snap_block(group, k) {
            let slot = &mut out[(b - first) as usize];
            if s >= snap && slot.is_none() {
                *slot = Some(kept_decode(v).map(<[u8]>::to_vec));
            }
        }
        true
    })?;
    out.into_iter()
        .enumerate()
        .map(|(i, v)| match v {
            Some(decided) => Ok(decided),
            None => view.get_kv(engine, &keys::block(group, volume, first + i as u64)),
        })
        .collect()
}

/// Which of `volume`'s blocks `[first, first+count)` in `group` changed
/// between snapshots `from` and `to` (`from` 0: which hold data at `to`).
#[allow(clippy::too_many_arguments)]
pub fn changed_between(
    engine: &Engine,
    view: &OwnedSnapshot,
    group: u64,
    volume: u64,
    first: u64,
    count: u64,
    from: u64,
    to: u64,
) -> Result<Vec<bool>, EngineError> {
    if from == 0 {
        return Ok(read_at(engine, view, group, volume, first, count, to)?
            .into_iter()
            .map(|v| v.is_some())
            .collect());
    }
    let mut out = vec![false; count as usize];
    let (start, end) = keys::snap_blocks_range(group, volume, first, first + count);
    view.scan_kv(engine, &start, &end, |k, _| {
        if let Some((_, b, s)) = keys::parse_snap_block(group, k) {
            if s >= from && s < to {
                out[(b - first) as usize] = true;
            }
        }
        true
    })?;
    Ok(out)
}

/// The volume's latest cut in `group` as of `view`.
pub fn cut_at(
    engine: &Engine,
    view: &OwnedSnapshot,
    group: u64,
    volume: u64,
) -> Result<u64, EngineError> {
    let key = keys::snap_cut(group, volume);
    match view.get_kv(engine, &key)? {
        Some(v) => Ok(decode_cut(&key, &v)?.0),
        None => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;
    use raftblk_proto::{command::Cmd, Command, DiscardCmd, FenceCmd, WriteCmd};

    const G: u64 = 1;
    const V: u64 = 3;

    fn run(engine: &Engine, c: Cmd) -> ApplyResult {
        let data = Command { cmd: Some(c) }.encode_to_vec();
        let mut wb = WriteBatch::default();
        let mut a = Applier::new(engine);
        let r = a.apply(&mut wb, G, &data).unwrap_or_else(|e| panic!("{e}"));
        engine.write(wb, false).unwrap_or_else(|e| panic!("{e}"));
        r
    }

    fn write(engine: &Engine, block: u64, byte: u8) {
        let r = run(
            engine,
            Cmd::Write(WriteCmd {
                volume_id: V,
                offset_bytes: block * 4096,
                data: vec![byte; 4096].into(),
                epoch: 1,
                clone: None,
            }),
        );
        assert_eq!(r, Ok(ApplyOutput::Done));
    }

    fn op(engine: &Engine, op: SnapshotOp, snap: u64, live: &[u64]) -> ApplyResult {
        run(
            engine,
            Cmd::SnapshotOp(SnapshotOpCmd {
                volume_id: V,
                snapshot_id: snap,
                op: op as i32,
                epoch: 1,
                live: live.to_vec(),
            }),
        )
    }

    /// First byte of each of blocks 0..4 at `snap` (0: now), 0 if absent.
    fn image(engine: &Engine, snap: u64) -> Vec<u8> {
        let view = engine.snapshot();
        let vals = if snap == 0 {
            (0..4)
                .map(|b| {
                    view.get_kv(engine, &keys::block(G, V, b))
                        .unwrap_or_else(|e| panic!("{e}"))
                })
                .collect()
        } else {
            read_at(engine, &view, G, V, 0, 4, snap).unwrap_or_else(|e| panic!("{e}"))
        };
        vals.iter()
            .map(|v| {
                v.as_deref()
                    .map_or(0, |s| crate::block::decode(s).map_or(0xee, |d| d[0]))
            })
            .collect()
    }

    fn kept_count(engine: &Engine) -> usize {
        let view = engine.snapshot();
        let mut n = 0;
        let (s, e) = keys::snap_blocks_range(G, V, 0, 4);
        view.scan_kv(engine, &s, &e, |_, _| {
            n += 1;
            true
        })
        .unwrap_or_else(|e| panic!("{e}"));
        n
    }

    #[test]
    fn cuts_keep_old_values_and_deletes_free_them() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let engine = Engine::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let fence = FenceCmd {
            volume_id: V,
            epoch: 1,
        };
        assert_eq!(run(&engine, Cmd::Fence(fence)), Ok(ApplyOutput::Done));
        write(&engine, 0, 1);
        write(&engine, 1, 1);
        assert_eq!(op(&engine, SnapshotOp::Cut, 1, &[]), Ok(ApplyOutput::Done));
        write(&engine, 0, 2);
        write(&engine, 0, 3); // second change since cut 1: nothing more kept
        write(&engine, 2, 2);
        assert_eq!(op(&engine, SnapshotOp::Cut, 2, &[]), Ok(ApplyOutput::Done));
        write(&engine, 1, 4);
        write(&engine, 3, 4);
        let d = run(
            &engine,
            Cmd::Discard(DiscardCmd {
                volume_id: V,
                offset_bytes: 0,
                length_bytes: 4096,
                epoch: 1,
                clone: None,
            }),
        );
        assert_eq!(d, Ok(ApplyOutput::Done));
        assert_eq!(image(&engine, 1), vec![1, 1, 0, 0]);
        assert_eq!(image(&engine, 2), vec![3, 1, 2, 0]);
        assert_eq!(image(&engine, 0), vec![0, 4, 2, 4]);
        assert_eq!(
            changed_between(&engine, &engine.snapshot(), G, V, 0, 4, 1, 2).ok(),
            Some(vec![true, false, true, false])
        );
        // Snapshot 1 goes: its values that snapshot 2 does not need go too.
        let before = kept_count(&engine);
        assert_eq!(
            op(&engine, SnapshotOp::Delete, 1, &[2]),
            Ok(ApplyOutput::Done)
        );
        assert!(kept_count(&engine) < before, "delete freed nothing");
        assert_eq!(image(&engine, 2), vec![3, 1, 2, 0]);
        // Rollback to 2, twice (idempotent), then 2 still reads the same.
        for _ in 0..2 {
            assert_eq!(
                op(&engine, SnapshotOp::Rollback, 2, &[]),
                Ok(ApplyOutput::Done)
            );
            assert_eq!(image(&engine, 0), vec![3, 1, 2, 0]);
            assert_eq!(image(&engine, 2), vec![3, 1, 2, 0]);
        }
        // Deleting the last snapshot frees every kept value and the cut.
        assert_eq!(
            op(&engine, SnapshotOp::Delete, 2, &[]),
            Ok(ApplyOutput::Done)
        );
        assert_eq!(kept_count(&engine), 0);
        write(&engine, 2, 9);
        assert_eq!(
            kept_count(&engine),
            0,
            "a write after the last delete kept a value"
        );
    }

    #[test]
    fn a_middle_snapshot_hands_its_values_to_an_older_one() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let engine = Engine::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let fence = FenceCmd {
            volume_id: V,
            epoch: 1,
        };
        assert_eq!(run(&engine, Cmd::Fence(fence)), Ok(ApplyOutput::Done));
        write(&engine, 0, 1);
        op(&engine, SnapshotOp::Cut, 1, &[]).unwrap_or_else(|e| panic!("{e:?}"));
        op(&engine, SnapshotOp::Cut, 2, &[]).unwrap_or_else(|e| panic!("{e:?}"));
        write(&engine, 0, 2); // kept under 2 only; snapshot 1 reads it too
        op(&engine, SnapshotOp::Cut, 3, &[]).unwrap_or_else(|e| panic!("{e:?}"));
        write(&engine, 0, 3);
        assert_eq!(image(&engine, 1)[0], 1);
        op(&engine, SnapshotOp::Delete, 2, &[1, 3]).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(image(&engine, 1)[0], 1, "snapshot 1 lost its value");
        assert_eq!(image(&engine, 3)[0], 2);
        op(&engine, SnapshotOp::Delete, 3, &[1]).unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(image(&engine, 1)[0], 1);
        write(&engine, 0, 4); // cut is back at 1; its value is kept already
        assert_eq!(image(&engine, 1)[0], 1);
        assert_eq!(kept_count(&engine), 1);
    }

    /// A snapshot one holder cut in some groups and abandoned cannot be
    /// completed by the next holder: its writes since the first cut are
    /// missing here, and other groups would take them in.
    #[test]
    fn a_cut_left_by_an_earlier_holder_is_not_completed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let engine = Engine::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let fence = |epoch| {
            let r = run(
                &engine,
                Cmd::Fence(FenceCmd {
                    volume_id: V,
                    epoch,
                }),
            );
            assert_eq!(r, Ok(ApplyOutput::Done));
        };
        let cut = |snap, epoch| {
            run(
                &engine,
                Cmd::SnapshotOp(SnapshotOpCmd {
                    volume_id: V,
                    snapshot_id: snap,
                    op: SnapshotOp::Cut as i32,
                    epoch,
                    live: vec![],
                }),
            )
        };
        fence(1);
        assert_eq!(cut(1, 1), Ok(ApplyOutput::Done));
        assert_eq!(
            cut(1, 1),
            Ok(ApplyOutput::Done),
            "a retry by the same holder"
        );
        fence(2);
        let refused = cut(1, 2);
        assert!(
            matches!(&refused, Err(e) if e.message.contains("earlier holder")),
            "{refused:?}"
        );
        assert_eq!(cut(2, 2), Ok(ApplyOutput::Done), "the next snapshot");
        assert_eq!(cut(2, 2), Ok(ApplyOutput::Done));
    }
}
