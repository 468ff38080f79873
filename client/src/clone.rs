//! A clone's I/O: blocks it never wrote read through to its parent
//! snapshot (which never changes), writes that cover such a block partly
//! carry the parent's bytes of it so the group merges into them (copy-up,
//! decided at apply: no race with the clone's other writes), zeros are
//! kept as whiteouts (see `CloneWrite`), and flatten copies every block
//! the clone still shares so its parent can go.

use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};
use raftblk_proto::{CloneWrite, BLOCK_BYTES};

use crate::error::ClientError;
use crate::volume::{Piece, Volume};

/// Bits set in an absent-block map.
fn absent_blocks(absent: &[u8]) -> impl Iterator<Item = usize> + '_ {
    absent.iter().enumerate().flat_map(|(i, byte)| {
        (0..8)
            .filter(move |b| byte & (1 << b) != 0)
            .map(move |b| i * 8 + b)
    })
}

impl Volume {
    /// Reads `[offset, offset+len)` of this handle, zeros past its end.
    pub(crate) async fn read_clipped(&self, offset: u64, len: u64) -> Result<Vec<u8>, ClientError> {
        let size = self.size_bytes();
        let mut out = vec![0u8; len as usize];
        if offset < size {
            let n = len.min(size - offset);
            let data = Box::pin(self.read(offset, n)).await?;
            out[..n as usize].copy_from_slice(&data);
        }
        Ok(out)
    }

    /// Replaces the bytes of a piece read at `offset` that fall in blocks
    /// the clone never wrote (`absent`) with its parent's.
    pub(crate) async fn fill_from_parent(
        &self,
        data: &mut [u8],
        offset: u64,
        absent: &[u8],
    ) -> Result<(), ClientError> {
        let Some(parent) = &self.parent else {
            return Ok(());
        };
        let end = offset + data.len() as u64;
        let first = offset / BLOCK_BYTES;
        // Runs of absent blocks, clipped to the piece.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for i in absent_blocks(absent) {
            let b = first + i as u64;
            let lo = (b * BLOCK_BYTES).max(offset);
            let hi = ((b + 1) * BLOCK_BYTES).min(end);
            if lo >= hi {
                continue;
            }
            match runs.last_mut() {
                Some(r) if r.1 == lo => r.1 = hi,
                _ => runs.push((lo, hi)),
            }
        }
        for (lo, hi) in runs {
            let bytes = parent.read_clipped(lo, hi - lo).await?;
            let at = (lo - offset) as usize;
            data[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(())
    }

    /// What a write or discard of piece `p` tells the group about the
    /// clone (`None` for a volume that is no clone).
    pub(crate) async fn clone_write(
        &self,
        p: &Piece,
        only_absent: bool,
    ) -> Result<Option<CloneWrite>, ClientError> {
        let Some(parent) = &self.parent else {
            return Ok(None);
        };
        let end = p.offset + p.len;
        let head = p.offset / BLOCK_BYTES * BLOCK_BYTES;
        let tail = (end - 1) / BLOCK_BYTES * BLOCK_BYTES;
        let head_partial = p.offset != head || (head == tail && end != head + BLOCK_BYTES);
        let tail_partial = end != tail + BLOCK_BYTES;
        let mut c = CloneWrite {
            only_absent,
            ..Default::default()
        };
        if head_partial {
            c.head_base = Bytes::from(parent.read_clipped(head, BLOCK_BYTES).await?);
        }
        if tail_partial {
            c.tail_base = if tail == head && head_partial {
                c.head_base.clone()
            } else {
                Bytes::from(parent.read_clipped(tail, BLOCK_BYTES).await?)
            };
        }
        Ok(Some(c))
    }

    /// Copies every block the clone still shares with its parent into it
    /// (never over the clone's own: `only_absent`), calling `progress`
    /// with the bytes done; then `Client::flatten` drops the parent.
    pub(crate) async fn copy_up_all(
        &self,
        progress: impl Fn(u64) + Sync,
    ) -> Result<(), ClientError> {
        let Some(parent) = &self.parent else {
            return Ok(());
        };
        let writer = self.attach().await?;
        let size = self.size_bytes();
        let pieces = self.pieces(0, size);
        let progress = &progress;
        stream::iter(pieces)
            .map(|p| {
                let writer = writer.clone();
                async move {
                    let (_, absent) = self.read_piece(&p, true).await?;
                    let first = p.offset / BLOCK_BYTES;
                    for i in absent_blocks(&absent) {
                        let b = first + i as u64;
                        let lo = (b * BLOCK_BYTES).max(p.offset);
                        let hi = ((b + 1) * BLOCK_BYTES).min(p.offset + p.len);
                        if lo >= hi || lo >= parent.size_bytes() {
                            continue;
                        }
                        let data = parent.read_clipped(lo, hi - lo).await?;
                        if data.iter().all(|&x| x == 0) {
                            // Absent reads as zeros once the parent is gone.
                            continue;
                        }
                        let _held = writer.gate.lock.read().await;
                        let epoch = writer.check()?;
                        let piece = Piece {
                            group: p.group,
                            offset: lo,
                            len: hi - lo,
                        };
                        let clone = self.clone_write(&piece, true).await?;
                        self.send_write(&piece, Bytes::from(data), epoch, clone)
                            .await?;
                    }
                    progress(p.len);
                    Ok::<(), ClientError>(())
                }
            })
            .buffer_unordered(self.client().options().pieces_in_flight_max)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}

impl crate::router::Client {
    /// Flattens clone `name`: copies what it shares with its parent into
    /// it (holding its lease: refused while a guest runs on it), then
    /// drops the parent, which may then be deleted.
    pub async fn flatten(
        &self,
        name: &str,
        progress: impl Fn(u64) + Sync,
    ) -> Result<raftblk_proto::VolumeInfo, ClientError> {
        let vol = self.open_volume(name).await?;
        if vol.parent.is_none() {
            return Err(ClientError::InvalidArgument(format!(
                "volume {name} is not a clone"
            )));
        }
        // Refused before any copying (the node refuses it too): a
        // snapshot of the clone reads its absent blocks through the parent.
        if !vol.info().snapshots.is_empty() {
            let names: Vec<&str> = vol
                .info()
                .snapshots
                .iter()
                .map(|s| s.name.as_str())
                .collect();
            return Err(ClientError::InvalidArgument(format!(
                "volume {name} has snapshots ({}) that read through its parent; delete them before flattening",
                names.join(", ")
            )));
        }
        let opts = crate::AttachOptions {
            holder: format!(
                "raftblk-flatten@{}:{}",
                crate::attach::machine_name(),
                std::process::id()
            ),
            takeover: false,
            reuse: false,
            ..Default::default()
        };
        let vol = vol.with_attach_options(opts);
        let r = vol.copy_up_all(progress).await;
        let r = match r {
            Ok(()) => self.drop_parent(name).await,
            Err(e) => Err(e),
        };
        if let Some(a) = vol.attachment() {
            let _ = a.detach().await;
        }
        r
    }
}
