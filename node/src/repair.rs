//! Planning the repair of a corrupt block, on the group leader's store
//! thread. A repair is a raft command carrying the block's value; to be
//! right on every replica it must be the value *as of the log position
//! just before the repair entry*. The leader knows that value only when
//! no entry between its applied index and the end of its log touches the
//! block: then its applied copy is that value, and the repair, appended
//! right after, is applied by every replica at exactly that state (Log
//! Matching: an entry committed at an index has the same prefix
//! everywhere). Any in-flight write, discard, purge or repair of the block
//! makes the leader refuse for now ([`RepairRefusal::Busy`]); the asking
//! replica retries on its next pass.
//!
//! Blocks that read as zeros (no key) are repaired too: the command says
//! `zero`, and a replica holding a corrupt copy deletes it.

use prost::Message as _;
use raftblk_proto::{command::Cmd, Command, RepairBlockCmd, BLOCK_BYTES};

use crate::block;
use crate::engine::{Engine, EngineError};
use crate::keys;

/// Why the leader cannot propose a repair now.
#[derive(Debug, thiserror::Error)]
pub enum RepairRefusal {
    #[error("an entry not yet applied touches the block; retry once it is")]
    Busy,
    #[error("the leader's own copy is corrupt too: {0}")]
    LeaderCorrupt(block::ChecksumError),
    #[error("storage: {0}")]
    Engine(#[from] EngineError),
}

/// Does the encoded command `data` change block `blk` of `volume`?
/// (Undecodable commands change nothing: apply rejects them.)
pub fn touches(data: &[u8], volume: u64, blk: u64) -> bool {
    if data.is_empty() {
        return false;
    }
    let Ok(Command { cmd: Some(cmd) }) = Command::decode(data) else {
        return false;
    };
    let covers = |v: u64, offset: u64, len: u64| {
        if v != volume || len == 0 {
            return false;
        }
        let first = offset / BLOCK_BYTES;
        let last = offset.saturating_add(len - 1) / BLOCK_BYTES;
        (first..=last).contains(&blk)
    };
    match cmd {
        Cmd::Write(w) => covers(w.volume_id, w.offset_bytes, w.data.len() as u64),
        Cmd::Discard(d) => covers(d.volume_id, d.offset_bytes, d.length_bytes),
        Cmd::PurgeVolume(p) => p.volume_id == volume,
        Cmd::RepairBlock(r) => r.volume_id == volume && r.block == blk,
        // A rollback may rewrite any block of the volume.
        Cmd::SnapshotOp(s) => s.volume_id == volume,
        Cmd::CreateVolume(_)
        | Cmd::DeleteVolume(_)
        | Cmd::GrowVolume(_)
        | Cmd::SetNode(_)
        | Cmd::SetGroups(_)
        | Cmd::SetFlags(_)
        | Cmd::SetFullNodes(_)
        | Cmd::Fence(_)
        | Cmd::Attach(_)
        | Cmd::Renew(_)
        | Cmd::Detach(_)
        | Cmd::SetQos(_)
        | Cmd::CreateSnapshot(_)
        | Cmd::SetSnapshotState(_)
        | Cmd::Flatten(_) => false,
    }
}

/// The repair command for block `blk` of `volume` in `group`, read from
/// the leader's applied state in `engine`, given the data of every entry
/// past the applied index (`unapplied`).
pub fn plan<'a>(
    engine: &Engine,
    group: u64,
    volume: u64,
    blk: u64,
    unapplied: impl IntoIterator<Item = &'a [u8]>,
) -> Result<RepairBlockCmd, RepairRefusal> {
    if unapplied.into_iter().any(|d| touches(d, volume, blk)) {
        return Err(RepairRefusal::Busy);
    }
    let cmd = match engine.get_kv(&keys::block(group, volume, blk))? {
        None => RepairBlockCmd {
            volume_id: volume,
            block: blk,
            data: Default::default(),
            zero: true,
        },
        Some(stored) => {
            let data = block::decode(&stored).map_err(RepairRefusal::LeaderCorrupt)?;
            RepairBlockCmd {
                volume_id: volume,
                block: blk,
                data: data.to_vec().into(),
                zero: false,
            }
        }
    };
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::{Applier, ApplyOutput};
    use raftblk_proto::WriteCmd;
    use rocksdb::WriteBatch;

    const GROUP: u64 = 1;
    const VOLUME: u64 = 3;

    fn entry(c: Cmd) -> Vec<u8> {
        Command { cmd: Some(c) }.encode_to_vec()
    }

    fn write(offset: u64, data: Vec<u8>) -> Vec<u8> {
        entry(Cmd::Write(WriteCmd {
            volume_id: VOLUME,
            offset_bytes: offset,
            data: data.into(),
            epoch: 1,
            clone: None,
        }))
    }

    fn apply(engine: &Engine, data: &[u8]) {
        let mut wb = WriteBatch::default();
        let mut a = Applier::new(engine);
        let r = a
            .apply(&mut wb, GROUP, data)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r, Ok(ApplyOutput::Done));
        engine.write(wb, false).unwrap_or_else(|e| panic!("{e}"));
    }

    fn open() -> (tempfile::TempDir, Engine) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let engine = Engine::open(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        (dir, engine)
    }

    fn corrupt(engine: &Engine, blk: u64) {
        let key = keys::block(GROUP, VOLUME, blk);
        let mut stored = engine.get_kv(&key).ok().flatten().unwrap_or_default();
        stored[100] ^= 1;
        engine
            .db()
            .put_cf(engine.kv_cf(), &key, &stored)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    fn content(engine: &Engine, blk: u64) -> Option<Vec<u8>> {
        let stored = engine.get_kv(&keys::block(GROUP, VOLUME, blk)).ok()??;
        Some(block::decode(&stored).ok()?.to_vec())
    }

    fn repair_entry(cmd: RepairBlockCmd) -> Vec<u8> {
        entry(Cmd::RepairBlock(cmd))
    }

    /// The scripted log of the race: 1 = full write A (both replicas),
    /// the follower's copy rots, 2 = a 512-byte write W proposed but not
    /// yet applied when the repair is asked for, 3 = the repair.
    #[test]
    fn a_repair_never_rolls_back_a_later_write() {
        let (_l, leader) = open();
        let (_f, follower) = open();
        let a = vec![7u8; 4096];
        let e1 = write(0, a.clone());
        apply(&leader, &e1);
        apply(&follower, &e1);
        corrupt(&follower, 0);
        let e2 = write(512, vec![9u8; 512]);
        let mut expected = a.clone();
        expected[512..1024].fill(9);

        // The race as it was: the leader's copy read outside raft while W
        // is in flight, proposed after W. Applied after W, it rolls W back
        // on the follower under a valid checksum.
        let racy = RepairBlockCmd {
            volume_id: VOLUME,
            block: 0,
            data: content(&leader, 0).unwrap_or_default().into(),
            zero: false,
        };
        {
            let (_d, f2) = open();
            apply(&f2, &e1);
            corrupt(&f2, 0);
            apply(&f2, &e2);
            apply(&f2, &repair_entry(racy));
            assert_eq!(
                content(&f2, 0),
                Some(a.clone()),
                "the old repair is expected to roll W back (the race)"
            );
        }

        // Now: with W unapplied the leader refuses to plan.
        assert!(matches!(
            plan(&leader, GROUP, VOLUME, 0, [e2.as_slice()]),
            Err(RepairRefusal::Busy)
        ));
        // Entries that touch other blocks or volumes do not block it.
        let other = write(4096, vec![1u8; 512]);
        assert!(plan(&leader, GROUP, VOLUME, 0, [other.as_slice()]).is_ok());
        // W applies everywhere (the follower's merge stays flagged).
        apply(&leader, &e2);
        apply(&follower, &e2);
        let stored = follower
            .get_kv(&keys::block(GROUP, VOLUME, 0))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            stored.is_some_and(|v| block::decode(&v).is_err()),
            "merge over rot must stay stored and flagged"
        );
        // Planned now, the repair carries W; applied, the replicas agree.
        let cmd =
            plan(&leader, GROUP, VOLUME, 0, std::iter::empty()).unwrap_or_else(|e| panic!("{e}"));
        apply(&leader, &repair_entry(cmd.clone()));
        apply(&follower, &repair_entry(cmd));
        assert_eq!(content(&leader, 0), Some(expected.clone()));
        assert_eq!(content(&follower, 0), Some(expected));
    }

    #[test]
    fn a_poisoned_copy_of_an_all_zero_block_heals() {
        let (_l, leader) = open();
        let (_f, follower) = open();
        // The follower holds a corrupt copy of a block the leader never
        // stored (it reads as zeros).
        apply(&follower, &write(8192, vec![5u8; 4096]));
        corrupt(&follower, 2);
        let cmd =
            plan(&leader, GROUP, VOLUME, 2, std::iter::empty()).unwrap_or_else(|e| panic!("{e}"));
        assert!(cmd.zero && cmd.data.is_empty());
        apply(&follower, &repair_entry(cmd));
        assert_eq!(
            follower
                .get_kv(&keys::block(GROUP, VOLUME, 2))
                .unwrap_or_else(|e| panic!("{e}")),
            None,
            "the corrupt copy is deleted: the block reads as zeros"
        );
    }

    #[test]
    fn a_corrupt_leader_copy_is_refused() {
        let (_l, leader) = open();
        apply(&leader, &write(0, vec![3u8; 4096]));
        corrupt(&leader, 0);
        assert!(matches!(
            plan(&leader, GROUP, VOLUME, 0, std::iter::empty()),
            Err(RepairRefusal::LeaderCorrupt(_))
        ));
    }

    #[test]
    fn what_touches_a_block() {
        assert!(touches(&write(0, vec![1u8; 512]), VOLUME, 0));
        assert!(!touches(&write(0, vec![1u8; 512]), VOLUME, 1));
        assert!(touches(&write(4096 - 512, vec![1u8; 1024]), VOLUME, 1));
        let discard = entry(Cmd::Discard(raftblk_proto::DiscardCmd {
            volume_id: VOLUME,
            offset_bytes: 0,
            length_bytes: 1 << 20,
            epoch: 1,
            clone: None,
        }));
        assert!(touches(&discard, VOLUME, 255));
        assert!(!touches(&discard, VOLUME, 256));
        assert!(!touches(&discard, VOLUME + 1, 0));
        let purge = entry(Cmd::PurgeVolume(raftblk_proto::PurgeVolumeCmd {
            volume_id: VOLUME,
        }));
        assert!(touches(&purge, VOLUME, 12345));
        assert!(!touches(&[], VOLUME, 0));
        assert!(!touches(b"\xff\xff garbage", VOLUME, 0));
    }
}
