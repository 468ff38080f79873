//! Which role each gRPC method needs (see `raftblk_tls::Role`): the
//! table the server's role gate consults before any service runs. Reads
//! of volumes and of the cluster's state, attach leases, snapshot cuts and
//! block I/O are a `client`'s (what raftblk-vhost and raftblk-nbd do);
//! catalog and membership changes an `admin`'s; raft traffic, heartbeats
//! and repairs a `node`'s. A method missing here needs `node`.
//!
//! One method is split further inside its handler: BlockIo.Snapshot
//! deletes and rollbacks (changes to stored data a holder never makes)
//! need `admin`; cuts need `client`.

use raftblk_tls::Role;

/// The least role that may call the method at `path`
/// (`/raftblk.v1.Service/Method`).
pub fn required(path: &str) -> Role {
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Role::Node;
    };
    match (service, method) {
        ("raftblk.v1.BlockIo", _) => Role::Client,
        (
            "raftblk.v1.Volumes",
            "Get" | "List" | "GetById" | "Attach" | "Renew" | "Detach" | "FinishSnapshot",
        ) => Role::Client,
        (
            "raftblk.v1.Volumes",
            "Create" | "Delete" | "Grow" | "SetQos" | "CreateSnapshot" | "DeleteSnapshot"
            | "RemoveSnapshot" | "Flatten",
        ) => Role::Admin,
        ("raftblk.v1.Cluster", "Status" | "GetMap" | "VolumeUsage") => Role::Client,
        (
            "raftblk.v1.Cluster",
            "Join" | "SetNode" | "SetFlags" | "ChangePeers" | "GroupDigest" | "TransferLeader",
        ) => Role::Admin,
        _ => Role::Node,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_of_every_service_has_a_role() {
        assert_eq!(required("/raftblk.v1.RaftTransport/Send"), Role::Node);
        assert_eq!(required("/raftblk.v1.RaftTransport/Snapshot"), Role::Node);
        assert_eq!(required("/raftblk.v1.Cluster/Heartbeat"), Role::Node);
        assert_eq!(required("/raftblk.v1.Cluster/RepairBlock"), Role::Node);
        assert_eq!(required("/raftblk.v1.Volumes/Create"), Role::Admin);
        assert_eq!(required("/raftblk.v1.Volumes/Attach"), Role::Client);
        assert_eq!(required("/raftblk.v1.Cluster/VolumeUsage"), Role::Client);
        assert_eq!(required("/raftblk.v1.BlockIo/Write"), Role::Client);
        assert_eq!(required("/raftblk.v1.Volumes/SomethingNew"), Role::Node);
        assert_eq!(required("garbage"), Role::Node);
    }
}
