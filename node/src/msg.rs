//! What flows into the store thread ([`StoreMsg`]) and what comes back
//! ([`StoreError`]): the contract between the store and everything that
//! talks to it (services, transport, snapshot receiver, snapshot install
//! thread), kept apart so none of them depends on the store's insides.

use std::path::PathBuf;

use raft::prelude::Message;
use tokio::sync::oneshot;

use crate::apply::ApplyResult;
use crate::engine::{EngineError, OwnedSnapshot};

/// Why the store could not carry out a request.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not the leader of group {group}")]
    NotLeader { group: u64, leader: Option<u64> },
    #[error("group {0} is not hosted on this node")]
    NoSuchGroup(u64),
    #[error("group {group}: the store inbox is full")]
    InboxFull { group: u64 },
    #[error("group {group}: {what} timed out")]
    TimedOut { group: u64, what: &'static str },
    #[error("group {group}: the entry was replaced after a leader change")]
    EntryReplaced { group: u64 },
    #[error("group {group}: raft dropped the proposal: {reason}")]
    ProposalDropped { group: u64, reason: String },
    #[error("group {group}: {what} is busy; retry later")]
    Busy { group: u64, what: &'static str },
    #[error("group {group}: configuration version is {actual}, the change was planned against {expected}")]
    ConfChanged {
        group: u64,
        expected: u64,
        actual: u64,
    },
    #[error("group {group}: membership change refused: {reason}")]
    BadConfChange { group: u64, reason: String },
    #[error("group {group}: raft setup: {reason}")]
    RaftSetup { group: u64, reason: String },
    #[error("storage: {0}")]
    Engine(#[from] EngineError),
    #[error("the store has stopped")]
    Stopped,
}

/// Answer to a proposal: committed and applied (with the command's result).
pub type ProposeCb = oneshot::Sender<Result<ApplyResult, StoreError>>;
/// Answer to a read-index request: the replica has applied far enough.
pub type ReadCb = oneshot::Sender<Result<(), StoreError>>;

/// Messages into the store thread.
pub enum StoreMsg {
    Propose {
        group: u64,
        data: Vec<u8>,
        /// A client's request id (16 bytes) or empty: see `store::dedup`.
        request_id: Vec<u8>,
        /// 0, or how long ago the client first sent this request.
        retry_age_ms: u64,
        cb: ProposeCb,
    },
    ReadIndex {
        group: u64,
        allow_follower: bool,
        cb: ReadCb,
    },
    /// Raft messages from one peer: `(group, sender's conf_ver, message)`.
    Raft {
        msgs: Vec<(u64, u64, Message)>,
    },
    /// A peer says this node is not a member of `group` at `conf_ver`.
    RaftGc {
        from: u64,
        group: u64,
        conf_ver: u64,
        /// The raft peer id the notice is about (0: any older replica).
        peer: u64,
    },
    /// The leader of `group` hibernates (see `store::hibernate`).
    Hibernate {
        from: u64,
        group: u64,
        term: u64,
        commit: u64,
    },
    /// Propose one membership change step of a group (see `membership`).
    ChangePeers {
        group: u64,
        changes: Vec<crate::membership::PeerChange>,
        /// Refuse unless the group is at this version (0: any).
        conf_ver: u64,
        cb: ProposeCb,
    },
    SnapshotReceived {
        group: u64,
        msg: Box<Message>,
        path: PathBuf,
    },
    SnapshotStatus {
        group: u64,
        to: u64,
        ok: bool,
    },
    /// The snapshot install thread has validated the staged file and
    /// refilled `group`'s range from it (or failed to).
    SnapshotFilled {
        group: u64,
        result: Result<(), EngineError>,
    },
    /// The kv-flush thread flushed the state machines: the applied
    /// indexes recorded before it began are durable (see `store::flush`).
    KvFlushed {
        applied: crate::store::FlushedApplies,
        result: Result<(), EngineError>,
    },
    Unreachable {
        to: u64,
    },
    Digest {
        group: u64,
        cb: oneshot::Sender<Result<(OwnedSnapshot, u64), StoreError>>,
    },
    /// Extend the leader lease of a group with a background ReadIndex round.
    RenewLease {
        group: u64,
    },
    /// Propose the repair of a corrupt block from this leader's copy, if
    /// no unapplied entry touches it (see `repair`).
    Repair {
        group: u64,
        volume: u64,
        block: u64,
        cb: ProposeCb,
    },
    /// Hand leadership of a group to `to`, or (None) to its most
    /// up-to-date follower.
    TransferLeader {
        group: u64,
        to: Option<u64>,
    },
}
