//! raftblk client library: what every consumer (the CLI, the vhost-user-blk
//! frontend, the tests) uses to reach the cluster.
//!
//! - `topology`: the cluster's shape, fetched from any reachable node.
//! - `router`: group → leader cache, per-attempt timeouts, retries of
//!   NotLeader / unavailable / timeouts with backoff under a deadline.
//! - `admin`: the cluster map and node administration (meta leader).
//! - `attach`: attach leases: one writer per volume, fenced by epoch.
//! - `volume`: a volume handle that validates I/O, splits it at chunk
//!   boundaries and sends the pieces concurrently.

pub mod admin;
pub mod attach;
pub mod catalog;
pub mod clone;
pub mod diff;
pub mod error;
pub mod qos;
pub mod router;
pub mod size;
pub mod snapshot;
pub mod tls_args;
pub mod topology;
pub mod usage;
pub mod volume;

pub use attach::{AttachOptions, Attachment};
pub use error::ClientError;
pub use router::{Client, ClientOptions};
pub use volume::Volume;
