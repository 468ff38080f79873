//! The node's gRPC services: volumes (catalog), block I/O, raft transport
//! (receiving side) and cluster status. Each turns requests into store
//! proposals or linearizable reads and maps failures to wire errors.

pub mod block_io;
pub mod cluster;
pub mod map;
pub mod raft;
pub mod roles;
pub mod snap_io;
pub mod volume_cache;
pub mod volumes;

use raftblk_proto::{Error as PbError, ErrorCode};

use crate::store::{StoreError, StoreHandle};

/// Wire form of a store failure, with a leader hint for NotLeader.
pub fn store_error(store: &StoreHandle, e: StoreError) -> PbError {
    match e {
        StoreError::NotLeader { group, leader } => {
            let mut err = PbError::new(
                ErrorCode::NotLeader,
                format!(
                    "node {} is not the leader of group {group}",
                    store.config.node_id
                ),
            );
            if let Some(l) = leader {
                err.leader_id = l;
                err.leader_addr = store.book.addr(l).unwrap_or_default();
            }
            err
        }
        StoreError::NoSuchGroup(g) => PbError::new(
            ErrorCode::WrongGroup,
            format!("group {g} has no replica on node {}", store.config.node_id),
        ),
        StoreError::InboxFull { .. }
        | StoreError::TimedOut { .. }
        | StoreError::EntryReplaced { .. }
        | StoreError::ProposalDropped { .. }
        | StoreError::Busy { .. }
        | StoreError::RaftSetup { .. }
        | StoreError::Stopped => PbError::new(ErrorCode::Unavailable, e.to_string()),
        StoreError::ConfChanged { .. } => PbError::new(ErrorCode::ConfChanged, e.to_string()),
        StoreError::BadConfChange { .. } => PbError::new(ErrorCode::InvalidArgument, e.to_string()),
        StoreError::Engine(_) => PbError::new(ErrorCode::Storage, e.to_string()),
    }
}
