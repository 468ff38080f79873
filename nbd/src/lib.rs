//! raftblk-nbd: serves raftblk volumes over the NBD protocol, so that
//! `qemu-img` (convert, compare, map) and QEMU's NBD block driver under
//! any emulated disk (IDE, AHCI, virtio-scsi) reach them.
//!
//! - `proto`: the wire format (constants, request parser, reply encoders).
//! - `handshake`: fixed newstyle option haggling.
//! - `transmission`: requests in flight, checked, answered by one writer.
//! - `backend`: the `Backend` trait, the zero-block scan behind block
//!   status, and an in-memory backend for tests.
//! - `volume_backend`: the raftblk volume backend (QoS, lease check).
//! - `export`: one export: name, flags, its single-writer claim.
//! - `open`: which backend a name opens (volume; snapshots later), and
//!   the catalog watch (size, QoS).
//! - `server`: the accept loop and connection bounds.

pub mod backend;
pub mod export;
pub mod handshake;
pub mod open;
pub mod proto;
pub mod ratelimit;
pub mod server;
pub mod transmission;
pub mod volume_backend;

#[cfg(test)]
mod tests;
