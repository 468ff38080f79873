//! raftblk-vhost: serves raftblk volumes to QEMU/KVM guests as
//! vhost-user-blk devices.
//!
//! Data flow: `serve` accepts a VMM on a unix socket → `backend` (one worker
//! per virtqueue) pops descriptor chains → `request` validates them against
//! the `virtio_blk` rules → the I/O runs on tokio through the raftblk client
//! library → completions return through an eventfd to the queue's worker.

pub mod backend;
pub mod config;
pub mod ratelimit;
pub mod request;
pub mod serve;
pub mod virtio_blk;
