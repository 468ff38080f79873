//! The one wire contract of raftblk: the protobuf messages and gRPC services
//! every process speaks, the raft log command format, and the placement
//! function that maps a volume's chunks to raft groups (a contract too: a
//! client and every node must agree on it bit for bit).

#![allow(clippy::large_enum_variant)]

tonic::include_proto!("raftblk.v1");

pub mod placement;

/// Guest-visible logical block (a virtio sector).
pub const SECTOR_BYTES: u64 = 512;
/// Stored block: the unit of checksums, thin provisioning and read-modify-write.
pub const BLOCK_BYTES: u64 = 4096;
/// The meta group (catalog) always has this id; data groups are `1..=N`.
pub const META_GROUP_ID: u64 = 0;
/// Largest message any raftblk endpoint accepts (decoding) or sends.
pub const GRPC_MESSAGE_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Oldest retry of a write or discard a group still checks against the
/// request ids it applied (`retry_age_ms`); an older one gets
/// `REQUEST_EXPIRED`. Well past any client's retry deadline (30 s by
/// default), and well short of how long a node keeps the ids, which leaves
/// room for clock differences between replicas.
pub const RETRY_AGE_MAX_MS: u64 = 90_000;

impl Error {
    /// A new domain error with a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Error {
            code: code as i32,
            message: message.into(),
            leader_id: 0,
            leader_addr: String::new(),
        }
    }

    /// The decoded error code (unknown codes read as `Unspecified`).
    pub fn kind(&self) -> ErrorCode {
        ErrorCode::try_from(self.code).unwrap_or(ErrorCode::Unspecified)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind().as_str_name(), self.message)?;
        if self.leader_id != 0 {
            write!(f, " (leader {} at {})", self.leader_id, self.leader_addr)?;
        }
        Ok(())
    }
}
