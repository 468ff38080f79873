//! What an export serves: the `Backend` trait (read, write, write
//! zeroes, trim, flush, size, block status), the errors a backend
//! reports and the NBD error each becomes, the all-zero scan that
//! answers `base:allocation` by reading, and `MemBackend`, an in-memory
//! backend for the protocol tests.
//!
//! The server checks every request (alignment, range, size, read-only)
//! before it reaches a backend; a backend checks again only what it must
//! for its own safety.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::Bytes;
use futures::future::BoxFuture;

use crate::proto;

/// Granularity of allocation: raftblk stores 4 KiB blocks, and a block
/// that reads as zeros is not stored.
pub const BLOCK: u64 = 4096;

/// Longest range one block-status query scans (a shorter extent list
/// answers a longer query, as the protocol allows).
pub const STATUS_SCAN_MAX: u32 = 32 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("out of range: {0}")]
    OutOfRange(String),
    #[error("read-only export")]
    ReadOnly,
    #[error("no space: {0}")]
    NoSpace(String),
    /// The export stopped serving (its lease was lost, say).
    #[error("{0}")]
    Shutdown(String),
    #[error("i/o error: {0}")]
    Io(String),
}

impl BackendError {
    /// The NBD error value this becomes on the wire.
    pub fn errno(&self) -> u32 {
        match self {
            BackendError::InvalidArgument(_) | BackendError::OutOfRange(_) => proto::EINVAL,
            BackendError::ReadOnly => proto::EPERM,
            BackendError::NoSpace(_) => proto::ENOSPC,
            BackendError::Shutdown(_) => proto::ESHUTDOWN,
            BackendError::Io(_) => proto::EIO,
        }
    }
}

pub type BackendResult<'a, T> = BoxFuture<'a, Result<T, BackendError>>;

/// One `base:allocation` extent: `len` bytes with `flags`
/// (`STATE_HOLE`, `STATE_ZERO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u32,
    pub flags: u32,
}

/// A served disk. Offsets and lengths are 512-byte aligned and inside
/// `size()` when the server calls; lengths are at most 32 MiB for reads
/// and writes.
pub trait Backend: Send + Sync + 'static {
    /// Size in bytes now (it may grow while served).
    fn size(&self) -> u64;
    fn read(&self, offset: u64, len: u32) -> BackendResult<'_, Vec<u8>>;
    fn write(&self, offset: u64, data: Bytes) -> BackendResult<'_, ()>;
    /// Zeroes the range (a thin backend frees it).
    fn write_zeroes(&self, offset: u64, len: u32) -> BackendResult<'_, ()>;
    /// Deallocates the range (reads as zeros afterwards in raftblk).
    fn trim(&self, offset: u64, len: u32) -> BackendResult<'_, ()>;
    /// Returns once every write completed before the call is durable.
    fn flush(&self) -> BackendResult<'_, ()>;
    /// `base:allocation` of a prefix of `[offset, offset+len)` (at least
    /// one extent, at most `len` bytes in all). The default reads the
    /// range (at most `STATUS_SCAN_MAX`) and reports its all-zero 4 KiB
    /// blocks as holes: right for a backend that stores no zero block.
    /// A backend with cheaper allocation metadata overrides it.
    fn block_status(&self, offset: u64, len: u32) -> BackendResult<'_, Vec<Extent>> {
        let len = len.min(STATUS_SCAN_MAX);
        Box::pin(async move {
            let data = self.read(offset, len).await?;
            Ok(zero_extents(offset, &data))
        })
    }
}

/// Whether every byte of `b` is zero.
pub fn all_zero(b: &[u8]) -> bool {
    // Word-wise: the common all-zero 4 KiB block costs 512 compares.
    let mut words = b.chunks_exact(8);
    words
        .by_ref()
        .all(|w| <[u8; 8]>::try_from(w).is_ok_and(|w| u64::from_ne_bytes(w) == 0))
        && words.remainder().iter().all(|&x| x == 0)
}

/// Pieces of `[offset, offset + data.len())` cut at absolute 4 KiB
/// boundaries, each with whether it is all zero and whether it is a
/// whole block.
fn blocks(offset: u64, data: &[u8]) -> impl Iterator<Item = (usize, usize, bool, bool)> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= data.len() {
            return None;
        }
        let abs = offset + at as u64;
        let to_boundary = (BLOCK - abs % BLOCK) as usize;
        let end = (at + to_boundary).min(data.len());
        let whole = abs.is_multiple_of(BLOCK) && end - at == BLOCK as usize;
        let zero = all_zero(&data[at..end]);
        let piece = (at, end, zero, whole);
        at = end;
        Some(piece)
    })
}

/// The `base:allocation` extents of `data` read at `offset`: whole 4 KiB
/// blocks of zeros are holes that read as zeros (HOLE|ZERO); a partial
/// block at either end of zeros reads as zeros but may be allocated
/// (ZERO); the rest is data (0). Adjacent pieces of one state merge.
pub fn zero_extents(offset: u64, data: &[u8]) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for (start, end, zero, whole) in blocks(offset, data) {
        let flags = match (zero, whole) {
            (true, true) => proto::STATE_HOLE | proto::STATE_ZERO,
            (true, false) => proto::STATE_ZERO,
            (false, _) => 0,
        };
        let len = (end - start) as u32;
        match out.last_mut() {
            Some(last) if last.flags == flags && last.len.checked_add(len).is_some() => {
                last.len += len
            }
            _ => out.push(Extent { len, flags }),
        }
    }
    out
}

/// Runs of `data` read at `offset`: `(start, end, hole)` where a hole is
/// a run of whole all-zero 4 KiB blocks (a structured read sends it as
/// NBD_REPLY_TYPE_OFFSET_HOLE instead of its bytes).
pub fn hole_runs(offset: u64, data: &[u8]) -> Vec<(usize, usize, bool)> {
    let mut out: Vec<(usize, usize, bool)> = Vec::new();
    for (start, end, zero, whole) in blocks(offset, data) {
        let hole = zero && whole;
        match out.last_mut() {
            Some(last) if last.2 == hole => last.1 = end,
            _ => out.push((start, end, hole)),
        }
    }
    out
}

/// An in-memory disk (zero-filled), for tests. Counts flushes.
pub struct MemBackend {
    data: Mutex<Vec<u8>>,
    pub flushes: AtomicU64,
}

impl MemBackend {
    pub fn new(size: usize) -> MemBackend {
        MemBackend {
            data: Mutex::new(vec![0; size]),
            flushes: AtomicU64::new(0),
        }
    }

    /// A copy of `[offset, offset+len)`.
    pub fn snapshot(&self, offset: usize, len: usize) -> Vec<u8> {
        let d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        d.get(offset..offset.saturating_add(len))
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, BackendError> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.size())
            .ok_or_else(|| BackendError::OutOfRange(format!("{offset}+{len}")))?;
        Ok(offset as usize..end as usize)
    }

    fn fill(&self, offset: u64, len: u32, with: Option<&[u8]>) -> Result<(), BackendError> {
        let r = self.range(offset, u64::from(len))?;
        let mut d = self.data.lock().unwrap_or_else(|p| p.into_inner());
        match with {
            Some(src) => d[r].copy_from_slice(src),
            None => d[r].fill(0),
        }
        Ok(())
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.data.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    fn read(&self, offset: u64, len: u32) -> BackendResult<'_, Vec<u8>> {
        let r = self
            .range(offset, u64::from(len))
            .map(|r| self.data.lock().unwrap_or_else(|p| p.into_inner())[r].to_vec());
        Box::pin(async move { r })
    }

    fn write(&self, offset: u64, data: Bytes) -> BackendResult<'_, ()> {
        let r = u32::try_from(data.len())
            .map_err(|_| BackendError::InvalidArgument("too long".into()))
            .and_then(|len| self.fill(offset, len, Some(&data)));
        Box::pin(async move { r })
    }

    fn write_zeroes(&self, offset: u64, len: u32) -> BackendResult<'_, ()> {
        let r = self.fill(offset, len, None);
        Box::pin(async move { r })
    }

    fn trim(&self, offset: u64, len: u32) -> BackendResult<'_, ()> {
        let r = self.fill(offset, len, None);
        Box::pin(async move { r })
    }

    fn flush(&self) -> BackendResult<'_, ()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_of_holes_data_and_partial_blocks() {
        let mut d = vec![0u8; 5 * 4096];
        d[4096 + 7] = 1; // block 1 is data
        let e = zero_extents(0, &d);
        assert_eq!(
            e,
            vec![
                Extent {
                    len: 4096,
                    flags: 3
                },
                Extent {
                    len: 4096,
                    flags: 0
                },
                Extent {
                    len: 3 * 4096,
                    flags: 3
                },
            ]
        );
        // Starting 512 bytes into a block: the first partial block is
        // only known to read as zeros.
        let e = zero_extents(512, &d[..4096 * 2]);
        assert_eq!(
            e[0],
            Extent {
                len: 3584,
                flags: 2
            }
        );
        assert_eq!(e.iter().map(|x| x.len).sum::<u32>(), 8192);
        assert!(zero_extents(0, &[]).is_empty());
        let runs = hole_runs(0, &d);
        assert_eq!(
            runs,
            vec![(0, 4096, true), (4096, 8192, false), (8192, 5 * 4096, true)]
        );
    }

    #[test]
    fn all_zero_checks_every_byte() {
        for len in [0usize, 1, 7, 8, 9, 4096] {
            let mut b = vec![0u8; len];
            assert!(all_zero(&b));
            if len > 0 {
                b[len - 1] = 1;
                assert!(!all_zero(&b), "{len}");
            }
        }
    }

    #[tokio::test]
    async fn mem_backend_bounds() {
        let m = MemBackend::new(8192);
        assert!(m.read(4096, 8192).await.is_err());
        assert!(m.read(u64::MAX, 512).await.is_err());
        m.write(512, Bytes::from_static(&[9u8; 512]))
            .await
            .unwrap_or(());
        assert_eq!(m.snapshot(512, 2), vec![9, 9]);
        let st = m.block_status(0, 8192).await.unwrap_or_default();
        assert_eq!(
            st,
            vec![
                Extent {
                    len: 4096,
                    flags: 0
                },
                Extent {
                    len: 4096,
                    flags: 3
                }
            ]
        );
    }
}
