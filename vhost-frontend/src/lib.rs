//! raftblk-vhost: serves raftblk volumes to QEMU/KVM guests as
//! vhost-user-blk devices.
//!
//! Data flow: `serve` accepts a VMM on a unix socket → `handler` answers
//! its vhost-user requests and sets up each `vring` (with its part of the
//! `inflight` region) → one `worker` thread per virtqueue wakes on kicks →
//! `backend` pops descriptor chains → `request` validates them against the
//! `virtio_blk` rules → the I/O runs on tokio through the raftblk client
//! library → completions return through an eventfd to the queue's worker.
//! Beside them, `resize` follows the volume's size (and its I/O limits,
//! which `qos` applies as requests enter) and tells the frontend when it
//! grew; `metrics` counts what the data path does for Prometheus.

pub mod backend;
pub mod config;
pub mod dirty_log;
pub mod handler;
pub mod inflight;
pub mod metrics;
pub mod ratelimit;
pub mod request;
pub mod resize;
pub mod serve;
pub mod virtio_blk;
pub mod vring;
pub mod worker;
