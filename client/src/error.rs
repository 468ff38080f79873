//! Errors the client library reports to its callers.

use raftblk_proto::{Error as PbError, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the cluster at {addrs}: {reason}")]
    Unreachable { addrs: String, reason: String },
    #[error("no volume named {0:?}")]
    NoSuchVolume(String),
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    /// A snapshot (or a volume by id) that does not exist, as the
    /// cluster described it.
    #[error("{0}")]
    NotFound(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("out of range: {0}")]
    OutOfRange(String),
    #[error("{what} did not complete before its deadline; last error: {last}")]
    Timeout { what: String, last: String },
    /// The volume was attached by another holder since this one: it may
    /// not write any more.
    #[error("fenced: {0}")]
    Fenced(String),
    /// Another holder's attach lease is live.
    #[error("{0}")]
    Attached(String),
    #[error("server error: {0}")]
    Server(PbError),
    /// The node refused the call for this program's certificate (its
    /// role, see raftblk-tls): retrying cannot help.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl ClientError {
    /// Maps a final (non-retryable) server error.
    pub fn from_server(e: PbError, name: Option<&str>) -> ClientError {
        match e.kind() {
            ErrorCode::NoSuchVolume => {
                ClientError::NoSuchVolume(name.map(str::to_owned).unwrap_or(e.message))
            }
            ErrorCode::VolumeExists => {
                ClientError::VolumeExists(name.map(str::to_owned).unwrap_or(e.message))
            }
            ErrorCode::InvalidArgument => ClientError::InvalidArgument(e.message),
            ErrorCode::OutOfRange => ClientError::OutOfRange(e.message),
            ErrorCode::Fenced => ClientError::Fenced(e.message),
            ErrorCode::Attached => ClientError::Attached(e.message),
            _ => ClientError::Server(e),
        }
    }
}
