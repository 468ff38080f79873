//! Key layout of the node's one RocksDB.
//!
//! Two column families:
//! - `raft` (always written through the WAL): per group, log entries
//!   `G|e|index`, hard state `G|h`, truncated state `G|t`, snapshot-apply
//!   marker `G|s`, the replica's own raft peer id `G|p` (see
//!   `membership`), and the tombstone `G|x` (configuration version and
//!   peer id) of a replica removed from the group.
//! - `kv` (the state machines; apply writes it without the WAL, see
//!   `store::flush`): the apply state `MAX|a|G` and conf state `MAX|c|G` of
//!   each group, outside every group's range so snapshots and digests
//!   leave them out but in the same family as the data they describe (a
//!   crash keeps both or neither); and each group's state machine under
//!   the prefix `G`: blocks
//!   `G|b|volume|block`, catalog volumes `G|v|name`, id index `G|i|id`,
//!   next volume id `G|n`, configuration version `G|r` (in the state
//!   machine so a snapshot carries it), applied client request ids
//!   `G|q|generation|id` (see `store::dedup`), volume fences `G|f|volume`
//!   (the lowest attach epoch the group still accepts writes of, see
//!   `lease`), volume snapshot cuts `G|S|volume` and the blocks kept for
//!   snapshots `G|o|volume|block|snapshot` (see `cow`); in the meta group also volumes' attach leases `G|A|volume`
//!   and the cluster map: nodes `G|N|id`, groups `G|P|group`, flags `G|F`,
//!   epoch `G|E`, parameters `G|K`, full nodes `G|U`.
//!
//! `G` and all integers are 8-byte big-endian so keys sort numerically and a
//! group's state machine is one contiguous range (what a snapshot copies).

pub const CF_RAFT: &str = "raft";
pub const CF_KV: &str = "kv";

fn with_group(group: u64, tag: u8, extra: usize) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + extra);
    k.extend_from_slice(&group.to_be_bytes());
    k.push(tag);
    k
}

pub fn entry(group: u64, index: u64) -> Vec<u8> {
    let mut k = with_group(group, b'e', 8);
    k.extend_from_slice(&index.to_be_bytes());
    k
}

/// Index encoded in an entry key, if it is one of `group`'s.
pub fn entry_index(group: u64, key: &[u8]) -> Option<u64> {
    if key.len() != 17 || key[..8] != group.to_be_bytes() || key[8] != b'e' {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[9..17]);
    Some(u64::from_be_bytes(b))
}

pub fn hard_state(group: u64) -> Vec<u8> {
    with_group(group, b'h', 0)
}
/// A group's configuration as of its applied index (`kv` family).
pub fn conf_state(group: u64) -> Vec<u8> {
    let mut k = with_group(u64::MAX, b'c', 8);
    k.extend_from_slice(&group.to_be_bytes());
    k
}
pub fn truncated_state(group: u64) -> Vec<u8> {
    with_group(group, b't', 0)
}
/// A group's applied index and term (`kv` family).
pub fn apply_state(group: u64) -> Vec<u8> {
    let mut k = with_group(u64::MAX, b'a', 8);
    k.extend_from_slice(&group.to_be_bytes());
    k
}
pub fn snapshot_marker(group: u64) -> Vec<u8> {
    with_group(group, b's', 0)
}
/// The node this data directory belongs to (`raft` family; outside every
/// group's range).
pub fn store_ident() -> Vec<u8> {
    let mut k = with_group(u64::MAX, b'I', 0);
    k.extend_from_slice(b"dent");
    k
}
/// The last cluster map this node saw (`raft` family, outside every
/// group's range), for restarts when no meta replica answers.
pub fn store_map() -> Vec<u8> {
    let mut k = with_group(u64::MAX, b'M', 0);
    k.extend_from_slice(b"ap");
    k
}
pub fn tombstone(group: u64) -> Vec<u8> {
    with_group(group, b'x', 0)
}
/// The raft peer id of this node's replica of the group (`raft` family;
/// absent for a bootstrap replica, whose peer id is the node id).
pub fn own_peer(group: u64) -> Vec<u8> {
    with_group(group, b'p', 0)
}
/// The group's configuration version (`kv` family).
pub fn conf_ver(group: u64) -> Vec<u8> {
    with_group(group, b'r', 0)
}

pub fn block(group: u64, volume: u64, block: u64) -> Vec<u8> {
    let mut k = with_group(group, b'b', 16);
    k.extend_from_slice(&volume.to_be_bytes());
    k.extend_from_slice(&block.to_be_bytes());
    k
}

/// First key after every block of `group`.
pub fn blocks_end(group: u64) -> Vec<u8> {
    with_group(group, b'c', 0)
}

/// A client request id `group` applied, filed under generation `gen`
/// (see `store::dedup`).
pub fn applied_request(group: u64, gen: u64, id: &[u8]) -> Vec<u8> {
    let mut k = with_group(group, b'q', 8 + id.len());
    k.extend_from_slice(&gen.to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// The applied request ids of `group` filed before generation `gen`.
pub fn applied_requests_before(group: u64, gen: u64) -> (Vec<u8>, Vec<u8>) {
    let mut end = with_group(group, b'q', 8);
    end.extend_from_slice(&gen.to_be_bytes());
    (with_group(group, b'q', 0), end)
}

/// Whether `key` is an applied request id of `group`: bookkeeping that
/// replicas may drop at different times, left out of digests.
pub fn is_applied_request(group: u64, key: &[u8]) -> bool {
    key.len() > 9 && key[..8] == group.to_be_bytes() && key[8] == b'q'
}

/// First key of `volume`'s blocks in `group`.
pub fn volume_blocks_start(group: u64, volume: u64) -> Vec<u8> {
    block(group, volume, 0)
}

/// First key after `volume`'s blocks in `group`.
pub fn volume_blocks_end(group: u64, volume: u64) -> Vec<u8> {
    match volume.checked_add(1) {
        Some(next) => block(group, next, 0),
        None => blocks_end(group),
    }
}

/// `(volume, block)` of a block key of `group`.
pub fn parse_block(group: u64, key: &[u8]) -> Option<(u64, u64)> {
    if key.len() != 25 || key[..8] != group.to_be_bytes() || key[8] != b'b' {
        return None;
    }
    let mut v = [0u8; 8];
    let mut b = [0u8; 8];
    v.copy_from_slice(&key[9..17]);
    b.copy_from_slice(&key[17..25]);
    Some((u64::from_be_bytes(v), u64::from_be_bytes(b)))
}

pub fn volume(group: u64, name: &str) -> Vec<u8> {
    let mut k = with_group(group, b'v', name.len());
    k.extend_from_slice(name.as_bytes());
    k
}
pub fn volumes_start(group: u64) -> Vec<u8> {
    with_group(group, b'v', 0)
}
pub fn volumes_end(group: u64) -> Vec<u8> {
    with_group(group, b'w', 0)
}
pub fn volume_by_id(group: u64, id: u64) -> Vec<u8> {
    let mut k = with_group(group, b'i', 8);
    k.extend_from_slice(&id.to_be_bytes());
    k
}
/// The attach lease of volume `id` (meta group).
pub fn attach_lease(group: u64, id: u64) -> Vec<u8> {
    let mut k = with_group(group, b'A', 8);
    k.extend_from_slice(&id.to_be_bytes());
    k
}
/// The fence of volume `id` in data group `group`.
pub fn fence(group: u64, id: u64) -> Vec<u8> {
    let mut k = with_group(group, b'f', 8);
    k.extend_from_slice(&id.to_be_bytes());
    k
}
pub fn next_volume_id(group: u64) -> Vec<u8> {
    with_group(group, b'n', 0)
}

/// The latest snapshot cut of volume `id` in data group `group` (see
/// `cow`).
pub fn snap_cut(group: u64, id: u64) -> Vec<u8> {
    let mut k = with_group(group, b'S', 8);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// The value block `block` of `volume` had at snapshot `snap`'s cut, kept
/// when it was first overwritten after that cut (see `cow`).
pub fn snap_block(group: u64, volume: u64, block: u64, snap: u64) -> Vec<u8> {
    let mut k = with_group(group, b'o', 24);
    k.extend_from_slice(&volume.to_be_bytes());
    k.extend_from_slice(&block.to_be_bytes());
    k.extend_from_slice(&snap.to_be_bytes());
    k
}

/// `[start, end)` of the kept snapshot blocks of `volume`'s blocks
/// `[first, end_block)` in `group`.
pub fn snap_blocks_range(
    group: u64,
    volume: u64,
    first: u64,
    end_block: u64,
) -> (Vec<u8>, Vec<u8>) {
    let start = snap_block(group, volume, first, 0);
    let end = match end_block.checked_sub(1) {
        Some(last) => match last.checked_add(1) {
            Some(next) => snap_block(group, volume, next, 0),
            None => snap_volume_end(group, volume),
        },
        None => start.clone(),
    };
    (start, end)
}

/// First key after every kept snapshot block of `volume` in `group`.
pub fn snap_volume_end(group: u64, volume: u64) -> Vec<u8> {
    match volume.checked_add(1) {
        Some(next) => snap_block(group, next, 0, 0),
        None => with_group(group, b'p', 0),
    }
}

/// `(volume, block, snapshot)` of a kept snapshot block key of `group`.
pub fn parse_snap_block(group: u64, key: &[u8]) -> Option<(u64, u64, u64)> {
    if key.len() != 33 || key[..8] != group.to_be_bytes() || key[8] != b'o' {
        return None;
    }
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&key[i..i + 8]);
        u64::from_be_bytes(b)
    };
    Some((word(9), word(17), word(25)))
}

/// Cluster map keys (meta group).
pub fn map_node(group: u64, id: u64) -> Vec<u8> {
    let mut k = with_group(group, b'N', 8);
    k.extend_from_slice(&id.to_be_bytes());
    k
}
pub fn map_nodes_range(group: u64) -> (Vec<u8>, Vec<u8>) {
    (with_group(group, b'N', 0), with_group(group, b'O', 0))
}
pub fn map_group(group: u64, id: u64) -> Vec<u8> {
    let mut k = with_group(group, b'P', 8);
    k.extend_from_slice(&id.to_be_bytes());
    k
}
pub fn map_groups_range(group: u64) -> (Vec<u8>, Vec<u8>) {
    (with_group(group, b'P', 0), with_group(group, b'Q', 0))
}
pub fn map_flags(group: u64) -> Vec<u8> {
    with_group(group, b'F', 0)
}
pub fn map_epoch(group: u64) -> Vec<u8> {
    with_group(group, b'E', 0)
}
pub fn map_full_nodes(group: u64) -> Vec<u8> {
    with_group(group, b'U', 0)
}
pub fn map_params(group: u64) -> Vec<u8> {
    with_group(group, b'K', 0)
}

/// The state-machine range of `group` in the `kv` family: `[start, end)`.
pub fn group_range(group: u64) -> (Vec<u8>, Vec<u8>) {
    let start = group.to_be_bytes().to_vec();
    let end = match group.checked_add(1) {
        Some(g) => g.to_be_bytes().to_vec(),
        None => vec![0xff; 9],
    };
    (start, end)
}

pub fn u64_pair(a: u64, b: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&a.to_be_bytes());
    v.extend_from_slice(&b.to_be_bytes());
    v
}

pub fn parse_u64_pair(v: &[u8]) -> Option<(u64, u64)> {
    if v.len() != 16 {
        return None;
    }
    let mut a = [0u8; 8];
    let mut b = [0u8; 8];
    a.copy_from_slice(&v[..8]);
    b.copy_from_slice(&v[8..]);
    Some((u64::from_be_bytes(a), u64::from_be_bytes(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort() {
        assert_eq!(entry_index(3, &entry(3, 77)), Some(77));
        assert_eq!(entry_index(4, &entry(3, 77)), None);
        assert!(entry(1, 255) < entry(1, 256));
        assert_eq!(parse_block(2, &block(2, 9, 1000)), Some((9, 1000)));
        let (s, e) = group_range(5);
        for k in [
            block(5, 1, 1),
            volume(5, "x"),
            next_volume_id(5),
            conf_ver(5),
            applied_request(5, 7, &[1; 16]),
            attach_lease(5, 3),
            fence(5, 3),
            snap_cut(5, 3),
            snap_block(5, 3, 9, 2),
            snap_volume_end(5, u64::MAX),
        ] {
            assert!(k >= s && k < e);
        }
        assert!(is_applied_request(5, &applied_request(5, 7, &[1; 16])));
        assert!(!is_applied_request(5, &block(5, 1, 1)));
        assert!(!is_applied_request(6, &applied_request(5, 7, &[1; 16])));
        let (qs, qe) = applied_requests_before(5, 8);
        assert!(
            applied_request(5, 7, &[0xff; 16]) >= qs && applied_request(5, 7, &[0xff; 16]) < qe
        );
        assert!(applied_request(5, 8, &[0; 16]) >= qe);
        assert!(block(5, u64::MAX, u64::MAX) < blocks_end(5));
        assert!(fence(5, 0) >= blocks_end(5) && !is_applied_request(5, &fence(5, 1)));
        assert!(block(6, 0, 0) >= e);
        assert!(volume_blocks_end(5, 1) > block(5, 1, u64::MAX));
        assert_eq!(parse_u64_pair(&u64_pair(4, 5)), Some((4, 5)));
        assert_eq!(
            parse_snap_block(5, &snap_block(5, 3, 9, 2)),
            Some((3, 9, 2))
        );
        let (a, b) = snap_blocks_range(5, 3, 9, 11);
        assert!(snap_block(5, 3, 9, 0) >= a && snap_block(5, 3, 10, u64::MAX) < b);
        assert!(snap_block(5, 3, 11, 0) >= b && snap_block(5, 3, 8, u64::MAX) < a);
        assert!(snap_block(5, 3, u64::MAX, u64::MAX) < snap_volume_end(5, 3));
        assert!(!is_applied_request(5, &snap_block(5, 3, 9, 2)));
    }
}
