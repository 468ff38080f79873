//! Placement: which raft group holds a chunk, and which nodes replicate a
//! group. Both are pure functions of the cluster's bootstrap parameters, so
//! every node and every client computes the same answer without asking.

/// Index of the chunk that holds byte `offset_bytes` of a volume.
pub fn chunk_index(offset_bytes: u64, chunk_size_bytes: u64) -> u64 {
    debug_assert!(chunk_size_bytes > 0);
    offset_bytes / chunk_size_bytes
}

/// The data group (`1..=data_groups`) that stores `chunk` of `volume_id`.
///
/// A stable hash (splitmix64 over both ids): never change it, existing
/// clusters depend on it.
pub fn chunk_group(volume_id: u64, chunk: u64, data_groups: u64) -> u64 {
    assert!(data_groups > 0, "a cluster has at least one data group");
    let h = splitmix64(splitmix64(volume_id) ^ chunk.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15);
    1 + h % data_groups
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Replica node ids of `group`, given the cluster's node ids.
///
/// Bootstrap placement. The meta group (0) starts on the first 5 nodes if
/// there are 5 or more, else on the first 3 (or as many as there are): an
/// odd size where it can be. Data group `g` starts on `replicas`
/// consecutive nodes from `(g - 1) % n`, so groups are spread evenly and
/// every group's replicas are on distinct nodes. Replicas move later by
/// membership change; this only says where they begin.
pub fn group_replicas(node_ids: &[u64], group: u64, replicas: u64) -> Vec<u64> {
    let mut ids = node_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let n = ids.len() as u64;
    if n == 0 {
        return Vec::new();
    }
    if group == crate::META_GROUP_ID {
        let size = if n >= 5 { 5 } else { n.min(3) };
        return ids.into_iter().take(size as usize).collect();
    }
    let count = replicas.min(n);
    (0..count)
        .map(|i| ids[((group - 1 + i) % n) as usize])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_group_is_stable_and_in_range() {
        // Pinned values: a change here breaks every existing cluster.
        let v1: Vec<u64> = (0..8).map(|c| chunk_group(1, c, 16)).collect();
        assert_eq!(v1, vec![4, 15, 14, 7, 12, 5, 5, 15]);
        let v42: Vec<u64> = (0..4).map(|c| chunk_group(42, c, 7)).collect();
        assert_eq!(v42, vec![4, 6, 5, 7]);
        for v in 1..20 {
            for c in 0..200 {
                let g = chunk_group(v, c, 7);
                assert!((1..=7).contains(&g));
            }
        }
        let mut counts = [0u32; 8];
        for c in 0..8000 {
            counts[chunk_group(3, c, 8) as usize - 1] += 1;
        }
        assert!(counts.iter().all(|&n| n > 800), "uneven spread {counts:?}");
    }

    #[test]
    fn replicas_are_distinct_and_spread() {
        let nodes = [3, 1, 2, 5, 4];
        for g in 1..=10 {
            let r = group_replicas(&nodes, g, 3);
            assert_eq!(r.len(), 3);
            let mut s = r.clone();
            s.sort_unstable();
            s.dedup();
            assert_eq!(s.len(), 3, "group {g}: {r:?}");
        }
        assert_eq!(group_replicas(&nodes, 0, 3), vec![1, 2, 3, 4, 5]);
        assert_eq!(group_replicas(&[1, 2, 3, 4], 0, 3), vec![1, 2, 3]);
        assert_eq!(group_replicas(&[1, 2], 1, 3), vec![1, 2]);
    }
}
