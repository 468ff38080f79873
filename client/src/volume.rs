//! A volume handle: validates guest-style I/O (512-byte aligned, inside the
//! volume), splits it at chunk boundaries and at the per-RPC size limit, and
//! sends the pieces to their groups' leaders concurrently. Writes and
//! discards carry the epoch of the handle's attach lease, taken at the
//! first of them (`attach`) unless the owner attached explicitly.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use raftblk_proto::block_io_client::BlockIoClient;
use raftblk_proto::{
    placement, BlockRange, DiscardRequest, FlushRequest, ReadRequest, VolumeInfo, WriteRequest,
    SECTOR_BYTES,
};

use crate::attach::{AttachOptions, Attachment};
use crate::error::ClientError;
use crate::router::Client;

/// Largest gRPC message the client sends or accepts.
const MESSAGE_BYTES_MAX: usize = raftblk_proto::GRPC_MESSAGE_BYTES_MAX;

/// One piece of a request: a range inside one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub group: u64,
    pub offset: u64,
    pub len: u64,
}

/// The `retry_age_ms` of one request's attempts: 0 on the first, then the
/// milliseconds since the first (at least 1), so the group can tell a retry
/// it may still check from one it can no longer.
struct RetryAge {
    first: std::time::Instant,
    sent: std::sync::atomic::AtomicBool,
}

impl RetryAge {
    fn new() -> Self {
        RetryAge {
            first: std::time::Instant::now(),
            sent: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn next(&self) -> u64 {
        if !self.sent.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return 0;
        }
        (self.first.elapsed().as_millis() as u64).max(1)
    }
}

/// An open volume.
#[derive(Clone)]
pub struct Volume {
    client: Client,
    info: VolumeInfo,
    /// The size now: grows when `refresh_size` finds the catalog's larger
    /// (shared by every clone).
    size_bytes: Arc<AtomicU64>,
    /// The I/O limits as of the last catalog read (shared by every clone).
    qos: Arc<Mutex<Option<raftblk_proto::QosLimits>>>,
    data_groups: u64,
    written_groups: Arc<Mutex<HashSet<u64>>>,
    /// The attach lease writes carry the epoch of (shared by every clone).
    attachment: Arc<tokio::sync::OnceCell<Arc<Attachment>>>,
    attach_options: Arc<AttachOptions>,
    /// The snapshot this handle reads (0: the volume now; else read-only).
    pub(crate) snapshot: u64,
    /// A clone's parent snapshot: blocks the clone never wrote read as
    /// the parent's (see `clone`).
    pub(crate) parent: Option<Arc<Volume>>,
}

/// Splits `[offset, offset+len)` at chunk boundaries and every `piece_max`.
pub fn split(
    volume_id: u64,
    offset: u64,
    len: u64,
    chunk: u64,
    piece_max: u64,
    data_groups: u64,
) -> Vec<Piece> {
    let mut out = Vec::new();
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let chunk_end = (at / chunk + 1) * chunk;
        let piece_end = end.min(chunk_end).min(at + piece_max);
        out.push(Piece {
            group: placement::chunk_group(volume_id, at / chunk, data_groups),
            offset: at,
            len: piece_end - at,
        });
        at = piece_end;
    }
    out
}

impl Volume {
    /// A handle of `info` as of snapshot `snap` (0: now) of `size` bytes,
    /// with its parents if it is a clone.
    pub(crate) async fn open_at(
        client: Client,
        info: VolumeInfo,
        snap: u64,
        size: u64,
    ) -> Result<Volume, ClientError> {
        Self::open_at_depth(client, info, snap, size, 0).await
    }

    pub(crate) async fn open_at_depth(
        client: Client,
        info: VolumeInfo,
        snap: u64,
        size: u64,
        depth: usize,
    ) -> Result<Volume, ClientError> {
        let parent = match info.parent {
            Some(p) => Some(client.open_parent(p, depth).await?),
            None => None,
        };
        let mut v = Volume::new(client, info);
        v.snapshot = snap;
        v.parent = parent;
        v.size_bytes = Arc::new(AtomicU64::new(size));
        Ok(v)
    }

    fn new(client: Client, info: VolumeInfo) -> Volume {
        let data_groups = client.topology().data_groups;
        Volume {
            client,
            snapshot: 0,
            parent: None,
            size_bytes: Arc::new(AtomicU64::new(info.size_bytes)),
            qos: Arc::new(Mutex::new(info.qos)),
            info,
            data_groups,
            written_groups: Arc::new(Mutex::new(HashSet::new())),
            attachment: Arc::new(tokio::sync::OnceCell::new()),
            attach_options: Arc::new(AttachOptions::default()),
        }
    }

    /// How the first write attaches (default: the process's shared
    /// lease, no takeover). Only before the handle attached.
    pub fn with_attach_options(mut self, opts: AttachOptions) -> Volume {
        self.attach_options = Arc::new(opts);
        self
    }

    /// Takes the attach lease now if the handle has none yet; returns it
    /// (lost, see `Attachment::check`, if the name now names another
    /// volume).
    pub async fn attach(&self) -> Result<Arc<Attachment>, ClientError> {
        let a = self
            .attachment
            .get_or_try_init(|| async {
                let a = self
                    .client
                    .attach_id(&self.info.name, self.info.id, &self.attach_options)
                    .await?;
                if a.volume().id != self.info.id {
                    // Another volume of the same name: this handle ends
                    // here for good (it never writes the new one).
                    let why = format!(
                        "volume {} was replaced (id {} by id {})",
                        self.info.name,
                        self.info.id,
                        a.volume().id
                    );
                    a.mark_lost(&why);
                    let _ = self
                        .client
                        .detach_volume(&self.info.name, a.holder(), a.epoch(), false)
                        .await;
                }
                Ok::<_, ClientError>(a)
            })
            .await?;
        Ok(a.clone())
    }

    /// The handle's attach lease, if it took one.
    pub fn attachment(&self) -> Option<Arc<Attachment>> {
        self.attachment.get().cloned()
    }

    /// The lease writes go under: attaches on first use; refused on a
    /// snapshot.
    async fn writer(&self) -> Result<Arc<Attachment>, ClientError> {
        if self.snapshot != 0 {
            return Err(ClientError::InvalidArgument(format!(
                "volume {} is open at a snapshot: read-only",
                self.info.name
            )));
        }
        self.attach().await
    }

    /// A write's or discard's final error: FENCED means the lease is lost.
    fn write_err(&self, e: ClientError) -> ClientError {
        let e = self.map_err(e);
        if let (ClientError::Fenced(why), Some(a)) = (&e, self.attachment.get()) {
            a.mark_lost(why);
        }
        e
    }

    /// The catalog entry as opened (its size may be older than
    /// `size_bytes`).
    pub fn info(&self) -> &VolumeInfo {
        &self.info
    }

    /// The volume's I/O limits as of the last catalog read (`refresh_size`).
    pub fn qos(&self) -> Option<raftblk_proto::QosLimits> {
        *self.qos.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Acquire)
    }

    /// Reads the catalog again: when the volume grew, every clone of this
    /// handle accepts I/O up to the new end from now on; returns the new
    /// size then. A volume of the same name but another id (deleted and
    /// created again) is an error: this handle stays on the old one.
    pub async fn refresh_size(&self) -> Result<Option<u64>, ClientError> {
        let now = self.client.volume_info(&self.info.name).await?;
        if now.id != self.info.id {
            return Err(ClientError::NoSuchVolume(format!(
                "{} (id {} was replaced by id {})",
                self.info.name, self.info.id, now.id
            )));
        }
        *self.qos.lock().unwrap_or_else(|p| p.into_inner()) = now.qos;
        if self.snapshot != 0 {
            // A snapshot never changes size (the volume's limits apply).
            return Ok(None);
        }
        let old = self.size_bytes.fetch_max(now.size_bytes, Ordering::AcqRel);
        Ok((now.size_bytes > old).then_some(now.size_bytes))
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        if !offset.is_multiple_of(SECTOR_BYTES) || !len.is_multiple_of(SECTOR_BYTES) {
            return Err(ClientError::InvalidArgument(format!(
                "offset {offset} and length {len} must be multiples of 512"
            )));
        }
        let size = self.size_bytes();
        match offset.checked_add(len) {
            Some(end) if end <= size => Ok(()),
            _ => Err(ClientError::OutOfRange(format!(
                "range at {offset} of {len} bytes ends past volume {:?} ({size} bytes)",
                self.info.name
            ))),
        }
    }

    pub(crate) fn pieces(&self, offset: u64, len: u64) -> Vec<Piece> {
        let max = self
            .client
            .options()
            .piece_bytes_max
            .min(MESSAGE_BYTES_MAX as u64 / 2);
        split(
            self.info.id,
            offset,
            len,
            self.info.chunk_size_bytes,
            max,
            self.data_groups,
        )
    }

    pub(crate) fn range(&self, p: &Piece) -> BlockRange {
        BlockRange {
            group_id: p.group,
            volume_id: self.info.id,
            offset_bytes: p.offset,
            length_bytes: p.len,
        }
    }

    pub(crate) fn map_err(&self, e: ClientError) -> ClientError {
        match e {
            ClientError::Server(pb) => ClientError::from_server(pb, Some(&self.info.name)),
            other => other,
        }
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<u8>, ClientError> {
        self.check(offset, len)?;
        let mut out = vec![0u8; len as usize];
        let pieces = self.pieces(offset, len);
        let results: Vec<(Piece, Vec<u8>)> = stream::iter(pieces)
            .map(|p| async move {
                let (data, absent) = self.read_piece(&p, self.parent.is_some()).await?;
                let mut data = data.to_vec();
                if !absent.is_empty() {
                    self.fill_from_parent(&mut data, p.offset, &absent).await?;
                }
                Ok::<_, ClientError>((p, data))
            })
            .buffer_unordered(self.client.options().pieces_in_flight_max)
            .try_collect()
            .await?;
        for (p, data) in results {
            let at = (p.offset - offset) as usize;
            out[at..at + p.len as usize].copy_from_slice(&data);
        }
        Ok(out)
    }

    /// Reads one piece from its group: its bytes and, with
    /// `report_absent`, the map of blocks the volume never wrote.
    pub(crate) async fn read_piece(
        &self,
        p: &Piece,
        report_absent: bool,
    ) -> Result<(Bytes, Bytes), ClientError> {
        let range = self.range(p);
        let snapshot_id = self.snapshot;
        let (data, absent) = self
            .client
            .call_group(p.group, "read", |ch| async move {
                let r = BlockIoClient::new(ch)
                    .max_decoding_message_size(MESSAGE_BYTES_MAX)
                    .read(ReadRequest {
                        range: Some(range),
                        snapshot_id,
                        report_absent,
                    })
                    .await?
                    .into_inner();
                Ok((r.error, (r.data, r.absent)))
            })
            .await
            .map_err(|e| self.map_err(e))?;
        if data.len() as u64 != p.len {
            return Err(ClientError::InvalidArgument(format!(
                "server returned {} bytes for a {}-byte read",
                data.len(),
                p.len
            )));
        }
        Ok((data, absent))
    }

    /// Writes `data` at `offset`; returns once every piece is committed.
    pub async fn write(&self, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        self.write_bytes(offset, Bytes::copy_from_slice(data)).await
    }

    /// Like `write`, for a buffer the caller hands over (no copy: the
    /// pieces sent to each group are slices of it).
    pub async fn write_bytes(&self, offset: u64, all: Bytes) -> Result<(), ClientError> {
        let len = all.len() as u64;
        self.check(offset, len)?;
        let pieces = self.pieces(offset, len);
        let writer = self.writer().await?;
        let _held = writer.gate.lock.read().await;
        let epoch = writer.check()?;
        self.note_written(&pieces);
        stream::iter(pieces)
            .map(|p| {
                let at = (p.offset - offset) as usize;
                let chunk = all.slice(at..at + p.len as usize);
                async move {
                    let clone = self.clone_write(&p, false).await?;
                    self.send_write(&p, chunk, epoch, clone).await
                }
            })
            .buffer_unordered(self.client.options().pieces_in_flight_max)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Sends one piece's write to its group (retried under one request id).
    pub(crate) async fn send_write(
        &self,
        p: &Piece,
        chunk: Bytes,
        epoch: u64,
        clone: Option<raftblk_proto::CloneWrite>,
    ) -> Result<(), ClientError> {
        let range = self.range(p);
        let request_id = self.client.next_request_id();
        let age = RetryAge::new();
        self.client
            .call_group(p.group, "write", |ch| {
                let req = WriteRequest {
                    range: Some(range),
                    data: chunk.clone(),
                    request_id: request_id.clone(),
                    retry_age_ms: age.next(),
                    epoch,
                    clone: clone.clone(),
                };
                async move {
                    let r = BlockIoClient::new(ch)
                        .max_encoding_message_size(MESSAGE_BYTES_MAX)
                        .write(req)
                        .await?
                        .into_inner();
                    Ok((r.error, ()))
                }
            })
            .await
            .map_err(|e| self.write_err(e))
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Deallocates `[offset, offset+len)`: it reads as zeros afterwards and
    /// its blocks take no space.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.discard_inner(offset, len, false).await
    }

    /// Zeroes `[offset, offset+len)` (thin: the blocks are freed).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.discard_inner(offset, len, true).await
    }

    async fn discard_inner(&self, offset: u64, len: u64, zeroes: bool) -> Result<(), ClientError> {
        self.check(offset, len)?;
        // Discards carry no data: pieces may be as large as a chunk.
        let pieces = split(
            self.info.id,
            offset,
            len,
            self.info.chunk_size_bytes,
            self.info
                .chunk_size_bytes
                .min(self.client.options().piece_bytes_max),
            self.data_groups,
        );
        let writer = self.writer().await?;
        let _held = writer.gate.lock.read().await;
        let epoch = writer.check()?;
        self.note_written(&pieces);
        stream::iter(pieces)
            .map(|p| async move {
                let range = self.range(&p);
                let clone = self.clone_write(&p, false).await?;
                let request_id = self.client.next_request_id();
                let age = RetryAge::new();
                self.client
                    .call_group(p.group, "discard", |ch| {
                        let request_id = request_id.clone();
                        let retry_age_ms = age.next();
                        let clone = clone.clone();
                        async move {
                            let r = BlockIoClient::new(ch)
                                .discard(DiscardRequest {
                                    range: Some(range),
                                    zeroes,
                                    request_id,
                                    retry_age_ms,
                                    epoch,
                                    clone,
                                })
                                .await?
                                .into_inner();
                            Ok((r.error, ()))
                        }
                    })
                    .await
                    .map_err(|e| self.write_err(e))
            })
            .buffer_unordered(self.client.options().pieces_in_flight_max)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Barrier: returns once every write completed before the call is
    /// durable. Writes complete only after commit (fsynced on a majority),
    /// so this confirms with each group written since the last flush that
    /// its leader still holds a quorum and has applied them.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let groups: Vec<u64> = {
            let mut g = self
                .written_groups
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            g.drain().collect()
        };
        let res = stream::iter(groups.clone())
            .map(|group| async move {
                self.client
                    .call_group(group, "flush", |ch| async move {
                        let r = BlockIoClient::new(ch)
                            .flush(FlushRequest { group_id: group })
                            .await?
                            .into_inner();
                        Ok((r.error, ()))
                    })
                    .await
                    .map_err(|e| self.map_err(e))
            })
            .buffer_unordered(self.client.options().pieces_in_flight_max)
            .try_collect::<Vec<()>>()
            .await;
        if res.is_err() {
            // Keep them for the next flush.
            let mut g = self
                .written_groups
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            g.extend(groups);
        }
        res.map(|_| ())
    }

    fn note_written(&self, pieces: &[Piece]) {
        let mut g = self
            .written_groups
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        g.extend(pieces.iter().map(|p| p.group));
    }
}

impl Client {
    /// Opens volume `name` for I/O.
    pub async fn open_volume(&self, name: &str) -> Result<Volume, ClientError> {
        let info = self.volume_info(name).await?;
        let size = info.size_bytes;
        Volume::open_at(self.clone(), info, 0, size).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_at_chunks_and_piece_limit() {
        let chunk = 1 << 20;
        let p = split(7, chunk - 4096, 8192, chunk, 1 << 20, 16);
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].offset, p[0].len), (chunk - 4096, 4096));
        assert_eq!((p[1].offset, p[1].len), (chunk, 4096));
        assert_eq!(p[0].group, placement::chunk_group(7, 0, 16));
        assert_eq!(p[1].group, placement::chunk_group(7, 1, 16));
        let p = split(7, 0, 3 << 20, 4 << 20, 1 << 20, 16);
        assert_eq!(p.len(), 3);
        assert!(p.iter().all(|x| x.len == 1 << 20));
        let total: u64 = split(1, 512, 10 << 20, 4 << 20, 1 << 20, 4)
            .iter()
            .map(|x| x.len)
            .sum();
        assert_eq!(total, 10 << 20);
    }
}
