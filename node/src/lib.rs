//! raftblk storage node: keeps chunks of volumes in one RocksDB and
//! replicates them with multi-raft over gRPC.
//!
//! Data flow inside a node, following DESIGN.md:
//! `service` (gRPC) → `store` (ready loop, one thread, all groups) →
//! `raft_storage` (raft log on RocksDB) + `apply` (state machine) →
//! `engine` (RocksDB); `transport` carries raft messages and snapshots
//! between nodes, `snapshot_file` stages and installs received snapshots.

pub mod address_book;
pub mod apply;
pub mod block;
pub mod cluster_map;
pub mod config;
pub mod counters;
pub mod cow;
pub mod daemon;
pub mod engine;
pub mod gc;
pub mod identity;
pub mod join;
pub mod keys;
pub mod lease;
pub mod map_sync;
pub mod membership;
pub mod metrics;
pub mod msg;
pub mod placement;
pub mod raft_storage;
pub mod repair;
pub mod scrub;
pub mod server;
pub mod service;
pub mod snap_catalog;
pub mod snapshot_file;
pub mod store;
pub mod throttle;
pub mod transport;
pub mod usage;
