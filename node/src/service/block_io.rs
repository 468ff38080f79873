//! The BlockIo service: reads, writes, flushes and discards of byte ranges
//! inside one chunk. Every request is validated (alignment, size, chunk,
//! group, volume, bounds) before it touches the store (the volume against
//! the node's cached catalog record, see `volume_cache`: no local meta
//! replica needed); writes are raft
//! proposals acknowledged after commit and apply; reads wait for ReadIndex
//! and verify every block's checksum.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use raftblk_proto::block_io_server::BlockIo;
use raftblk_proto::{
    command::Cmd, placement, BlockRange, Command, DiffRequest, DiffResponse, DiscardCmd,
    DiscardRequest, Error as PbError, ErrorCode, FenceCmd, FenceRequest, FlushRequest, ReadRequest,
    ReadResponse, SnapshotOpRequest, VolumeInfo, WriteCmd, WriteRequest, WriteResponse,
    BLOCK_BYTES, SECTOR_BYTES,
};
use tonic::{Request, Response, Status};

use super::store_error;
use crate::block;
use crate::keys;
use crate::metrics::{self, BlockOp, METRICS};
use crate::service::volume_cache::VolumeCache;
use crate::store::{StoreError, StoreHandle};

/// Reads up to this size run on the request's task.
const INLINE_READ_BYTES_MAX: u64 = 128 * 1024;

pub struct BlockIoService {
    pub store: StoreHandle,
    pub volumes: Arc<VolumeCache>,
}

pub(super) fn invalid(msg: String) -> PbError {
    PbError::new(ErrorCode::InvalidArgument, msg)
}

/// Refuses a write or discard without an attach epoch before it costs a
/// raft round (apply would refuse it too, see `lease`).
fn no_lease(epoch: u64, volume: u64) -> Result<(), PbError> {
    if epoch == 0 {
        return Err(PbError::new(
            ErrorCode::Fenced,
            format!("writes to volume {volume} need an attach lease (epoch 0)"),
        ));
    }
    Ok(())
}

impl BlockIoService {
    /// Checks a range and returns the volume it addresses.
    pub(super) async fn validate(
        &self,
        range: Option<&BlockRange>,
    ) -> Result<Arc<VolumeInfo>, PbError> {
        let r = range.ok_or_else(|| invalid("request has no range".into()))?;
        let cfg = &self.store.config;
        if r.length_bytes == 0 {
            return Err(invalid("length must be positive".into()));
        }
        if r.offset_bytes % SECTOR_BYTES != 0 || r.length_bytes % SECTOR_BYTES != 0 {
            return Err(invalid(format!(
                "offset {} and length {} must be multiples of 512",
                r.offset_bytes, r.length_bytes
            )));
        }
        if r.length_bytes > cfg.limits.io_bytes_max {
            return Err(invalid(format!(
                "length {} exceeds the limit of {} bytes per request",
                r.length_bytes, cfg.limits.io_bytes_max
            )));
        }
        let end = r
            .offset_bytes
            .checked_add(r.length_bytes)
            .ok_or_else(|| PbError::new(ErrorCode::OutOfRange, "range overflows".to_string()))?;
        let volume = self.volume(r.volume_id, end).await?;
        let chunk = placement::chunk_index(r.offset_bytes, volume.chunk_size_bytes);
        if chunk != placement::chunk_index(end - 1, volume.chunk_size_bytes) {
            return Err(invalid(format!(
                "range [{}, {end}) crosses a chunk boundary (chunk size {})",
                r.offset_bytes, volume.chunk_size_bytes
            )));
        }
        let want = placement::chunk_group(r.volume_id, chunk, cfg.cluster.data_groups);
        if want != r.group_id {
            // A client bug, not a stale route: groups never change.
            return Err(PbError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "chunk {chunk} of volume {} lives in group {want}, not {}",
                    r.volume_id, r.group_id
                ),
            ));
        }
        Ok(volume)
    }

    /// The volume `id`, checking that `[.., end)` lies inside it (cached
    /// record, see `volume_cache`).
    async fn volume(&self, id: u64, end: u64) -> Result<Arc<VolumeInfo>, PbError> {
        self.volumes.volume_for_io(id, end).await
    }

    pub(super) async fn propose(
        &self,
        group: u64,
        cmd: Cmd,
        request_id: &[u8],
        retry_age_ms: u64,
    ) -> WriteResponse {
        let cmd = Command { cmd: Some(cmd) };
        match self
            .store
            .propose_request(group, &cmd, request_id, retry_age_ms)
            .await
        {
            Ok(Ok(_)) => WriteResponse { error: None },
            Ok(Err(e)) => WriteResponse { error: Some(e) },
            Err(e) => WriteResponse {
                error: Some(store_error(&self.store, e)),
            },
        }
    }

    pub(super) fn check_leader(&self, group: u64) -> Result<(), PbError> {
        match self.store.view(group) {
            None => Err(store_error(&self.store, StoreError::NoSuchGroup(group))),
            Some(v) if v.role != "leader" => Err(store_error(
                &self.store,
                StoreError::NotLeader {
                    group,
                    leader: (v.leader_id != 0).then_some(v.leader_id),
                },
            )),
            Some(_) => Ok(()),
        }
    }

    /// Refuses writes to a group with a replica on a node whose disk the
    /// cluster map records as past the full ratio (a full follower would
    /// otherwise stop on its next append).
    fn check_space(&self, group: u64) -> Result<(), PbError> {
        let Some(map) = self.store.book.map() else {
            return Ok(());
        };
        if map.full_nodes.is_empty() {
            return Ok(());
        }
        let Some(v) = self.store.view(group) else {
            return Ok(());
        };
        let full: Vec<u64> = v
            .members
            .all()
            .into_iter()
            .filter(|n| map.full_nodes.contains(n))
            .collect();
        if full.is_empty() {
            return Ok(());
        }
        Err(PbError::new(
            ErrorCode::NoSpace,
            format!(
                "group {group} has a replica on node(s) {full:?}, whose disk is past placement.full_ratio ({}): writes are refused until space is freed or nodes are added; reads, discards and deletes still work",
                self.store.config.placement.full_ratio
            ),
        ))
    }
}

/// Reads `[offset, offset+len)` of `volume` from `group`'s blocks,
/// verifying checksums; absent blocks read as zeros.
pub(super) fn read_blocks(
    store: &StoreHandle,
    group: u64,
    volume: u64,
    offset: u64,
    len: u64,
    snapshot: u64,
) -> Result<(Vec<u8>, Vec<u8>), PbError> {
    let engine = &store.engine;
    let mut out = vec![0u8; len as usize];
    let end = offset + len;
    let first = offset / BLOCK_BYTES;
    let last = (end - 1) / BLOCK_BYTES;
    let mut absent = vec![0u8; ((last - first) / 8 + 1) as usize];
    // One view for the whole range: RocksDB's MultiGet reads every key at
    // one sequence number (an implicit snapshot, without the DB-mutex
    // round trip of an explicit one), and the install generation checked
    // before and after proves no snapshot install of this group (which
    // rewrites its range in several batches) began in between; installs of
    // other groups do not matter.
    let busy = || {
        PbError::new(
            ErrorCode::Unavailable,
            format!(
                "node {}: a snapshot install of group {group} is under way",
                store.config.node_id
            ),
        )
    };
    let gen = store.install_gen.stable(group).ok_or_else(busy)?;
    let values = if snapshot == 0 {
        let keys: Vec<Vec<u8>> = (first..=last)
            .map(|b| keys::block(group, volume, b))
            .collect();
        engine
            .db()
            .multi_get_cf(keys.iter().map(|k| (engine.kv_cf(), k.as_slice())))
            .into_iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| PbError::new(ErrorCode::Storage, e.to_string()))?
    } else {
        super::snap_io::read_snapshot_blocks(store, group, volume, first, last, snapshot)?
    };
    if !store.install_gen.unchanged(group, gen) {
        return Err(busy());
    }
    for (i, value) in values.into_iter().enumerate() {
        let b = first + i as u64;
        let Some(stored) = value else {
            absent[i / 8] |= 1 << (i % 8);
            continue;
        };
        let data = match block::decode(&stored) {
            Ok(d) => d,
            Err(e) => {
                store
                    .counters
                    .checksum_errors
                    .fetch_add(1, Ordering::Relaxed);
                store.note_corrupt(group, volume, b);
                tracing::error!(group, volume, block = b, node = store.config.node_id, error = %e, "checksum mismatch on read");
                return Err(PbError::new(
                    ErrorCode::Corrupted,
                    format!(
                        "block {b} of volume {volume} failed its checksum on node {}",
                        store.config.node_id
                    ),
                ));
            }
        };
        let bstart = b * BLOCK_BYTES;
        let lo = offset.max(bstart);
        let hi = end.min(bstart + BLOCK_BYTES);
        out[(lo - offset) as usize..(hi - offset) as usize]
            .copy_from_slice(&data[(lo - bstart) as usize..(hi - bstart) as usize]);
    }
    Ok((out, absent))
}

#[tonic::async_trait]
impl BlockIo for BlockIoService {
    async fn read(&self, req: Request<ReadRequest>) -> Result<Response<ReadResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let io = r.range.as_ref().map(|g| (g.volume_id, g.length_bytes));
        let res = self.read_inner(r).await;
        account(BlockOp::Read, started, &res, |r| r.error.is_none(), io);
        res
    }

    async fn write(&self, req: Request<WriteRequest>) -> Result<Response<WriteResponse>, Status> {
        let started = Instant::now();
        let r = req.into_inner();
        let io = r.range.as_ref().map(|g| (g.volume_id, g.length_bytes));
        let res = self.write_inner(r).await;
        account(BlockOp::Write, started, &res, |r| r.error.is_none(), io);
        res
    }

    async fn flush(&self, req: Request<FlushRequest>) -> Result<Response<WriteResponse>, Status> {
        let started = Instant::now();
        let res = self.flush_inner(req.into_inner()).await;
        account(BlockOp::Flush, started, &res, |r| r.error.is_none(), None);
        res
    }

    async fn discard(
        &self,
        req: Request<DiscardRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        let started = Instant::now();
        let res = self.discard_inner(req.into_inner()).await;
        account(BlockOp::Discard, started, &res, |r| r.error.is_none(), None);
        res
    }

    async fn fence(&self, req: Request<FenceRequest>) -> Result<Response<WriteResponse>, Status> {
        let r = req.into_inner();
        let fail = |e| Ok(Response::new(WriteResponse { error: Some(e) }));
        if r.epoch == 0 {
            return fail(invalid("a fence needs an epoch above 0".into()));
        }
        if r.group_id == raftblk_proto::META_GROUP_ID
            || r.group_id > self.store.config.cluster.data_groups
        {
            return fail(invalid(format!("group {} is not a data group", r.group_id)));
        }
        if let Err(e) = self.check_leader(r.group_id) {
            return fail(e);
        }
        // Only an epoch the meta group handed out (a linearizable read, as
        // rare as attaches): a fence above every attach would leave the
        // volume unwritable for good.
        let last = match self.volumes.fetch(r.volume_id).await {
            Ok(Some((_, lease))) => lease.map_or(0, |l| l.epoch),
            Ok(None) => {
                return fail(PbError::new(
                    ErrorCode::NoSuchVolume,
                    format!("no volume with id {}", r.volume_id),
                ))
            }
            Err(e) => return fail(e),
        };
        if r.epoch > last {
            return fail(invalid(format!(
                "epoch {} of volume {} was never handed out (last attach: epoch {last})",
                r.epoch, r.volume_id
            )));
        }
        let cmd = Cmd::Fence(FenceCmd {
            volume_id: r.volume_id,
            epoch: r.epoch,
        });
        // Idempotent (the fence only rises): no request id needed.
        Ok(Response::new(self.propose(r.group_id, cmd, &[], 0).await))
    }

    async fn snapshot(
        &self,
        req: Request<SnapshotOpRequest>,
    ) -> Result<Response<WriteResponse>, Status> {
        // A holder cuts (client); deleting or rolling back stored data is
        // an admin's (see `roles`).
        if req.get_ref().op != raftblk_proto::SnapshotOp::Cut as i32 {
            raftblk_tls::server::require(
                &req,
                raftblk_tls::Role::Admin,
                "snapshot deletes and rollbacks",
            )?;
        }
        let error = self.snapshot_op(req.into_inner()).await.err();
        Ok(Response::new(WriteResponse { error }))
    }

    async fn diff(&self, req: Request<DiffRequest>) -> Result<Response<DiffResponse>, Status> {
        Ok(Response::new(
            match self.diff_range(req.into_inner()).await {
                Ok(changed) => DiffResponse {
                    error: None,
                    changed: changed.into(),
                },
                Err(e) => DiffResponse {
                    error: Some(e),
                    ..Default::default()
                },
            },
        ))
    }
}

/// Counts one served request for the metrics: its latency and outcome
/// by operation and, for a successful read or write of `io` = (volume,
/// bytes), the volume's counters.
fn account<T>(
    op: BlockOp,
    started: Instant,
    res: &Result<Response<T>, Status>,
    succeeded: fn(&T) -> bool,
    io: Option<(u64, u64)>,
) {
    let ok = matches!(res, Ok(r) if succeeded(r.get_ref()));
    if let (true, Some((volume, bytes))) = (ok, io) {
        let write = matches!(op, BlockOp::Write);
        METRICS.block_io(write, volume, bytes, started.elapsed());
    }
    metrics::observe_block(op, started, ok);
}

impl BlockIoService {
    async fn read_inner(&self, r: ReadRequest) -> Result<Response<ReadResponse>, Status> {
        let fail = |e| {
            Ok(Response::new(ReadResponse {
                error: Some(e),
                ..Default::default()
            }))
        };
        let range = match r.range {
            Some(range) => range,
            None => return fail(invalid("request has no range".into())),
        };
        match self.validate(Some(&range)).await {
            Ok(v) if r.snapshot_id != 0 => {
                if let Err(e) = self.check_snapshot(&v, r.snapshot_id, &range).await {
                    return fail(e);
                }
            }
            Ok(_) => {}
            Err(e) => return fail(e),
        }
        if let Err(e) = self.check_leader(range.group_id) {
            return fail(e);
        }
        if let Err(e) = self.store.read_index(range.group_id, false).await {
            return fail(store_error(&self.store, e));
        }
        // Small reads come from the memtable or block cache in microseconds:
        // run them inline; large ones on the blocking pool.
        let (g, v, off, len) = (
            range.group_id,
            range.volume_id,
            range.offset_bytes,
            range.length_bytes,
        );
        let snap = r.snapshot_id;
        let res = if len <= INLINE_READ_BYTES_MAX && snap == 0 {
            read_blocks(&self.store, g, v, off, len, snap)
        } else {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || read_blocks(&store, g, v, off, len, snap))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
        };
        match res {
            Ok((data, absent)) => Ok(Response::new(ReadResponse {
                error: None,
                data: data.into(),
                absent: if r.report_absent {
                    absent.into()
                } else {
                    Default::default()
                },
            })),
            Err(e) => {
                if e.kind() == ErrorCode::Corrupted {
                    // This replica's copy is bad: hand leadership to a healthy
                    // replica so the client's retry reads a good copy.
                    self.store.request_transfer_leader(range.group_id, None);
                }
                fail(e)
            }
        }
    }

    async fn write_inner(&self, r: WriteRequest) -> Result<Response<WriteResponse>, Status> {
        let fail = |e| Ok(Response::new(WriteResponse { error: Some(e) }));
        let Some(range) = r.range else {
            return fail(invalid("request has no range".into()));
        };
        if r.data.len() as u64 != range.length_bytes {
            return fail(invalid(format!(
                "data is {} bytes but the range is {} bytes",
                r.data.len(),
                range.length_bytes
            )));
        }
        if let Err(e) = self.validate(Some(&range)).await {
            return fail(e);
        }
        if let Err(e) = self.check_leader(range.group_id) {
            return fail(e);
        }
        if let Err(e) = self.check_space(range.group_id) {
            return fail(e);
        }
        if let Err(e) = no_lease(r.epoch, range.volume_id) {
            return fail(e);
        }
        let cmd = Cmd::Write(WriteCmd {
            volume_id: range.volume_id,
            offset_bytes: range.offset_bytes,
            data: r.data,
            epoch: r.epoch,
            clone: r.clone,
        });
        Ok(Response::new(
            self.propose(range.group_id, cmd, &r.request_id, r.retry_age_ms)
                .await,
        ))
    }

    async fn flush_inner(&self, req: FlushRequest) -> Result<Response<WriteResponse>, Status> {
        // Writes are acknowledged only once committed (fsynced on a
        // majority), so a flush has nothing to force to disk: it is a
        // barrier that confirms, via ReadIndex, that this node still leads
        // the group and has applied every acknowledged write.
        let group = req.group_id;
        let error = self
            .store
            .read_index(group, false)
            .await
            .err()
            .map(|e| store_error(&self.store, e));
        Ok(Response::new(WriteResponse { error }))
    }

    async fn discard_inner(&self, r: DiscardRequest) -> Result<Response<WriteResponse>, Status> {
        let fail = |e| Ok(Response::new(WriteResponse { error: Some(e) }));
        let Some(range) = r.range else {
            return fail(invalid("request has no range".into()));
        };
        if let Err(e) = self.validate(Some(&range)).await {
            return fail(e);
        }
        if let Err(e) = self.check_leader(range.group_id) {
            return fail(e);
        }
        if let Err(e) = no_lease(r.epoch, range.volume_id) {
            return fail(e);
        }
        let cmd = Cmd::Discard(DiscardCmd {
            volume_id: range.volume_id,
            offset_bytes: range.offset_bytes,
            length_bytes: range.length_bytes,
            epoch: r.epoch,
            clone: r.clone,
        });
        Ok(Response::new(
            self.propose(range.group_id, cmd, &r.request_id, r.retry_age_ms)
                .await,
        ))
    }
}
