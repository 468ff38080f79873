//! The raftblk backend: a `raftblk_client::Volume` behind the `Backend`
//! trait, with the volume's I/O limits applied where each request enters
//! (`Qos::admit`: reads and writes count their bytes, trims and write
//! zeroes are write operations of no bytes, flushes are free, a block
//! status scan is a read of what it scans) and, for a writable export,
//! its attach lease checked on every request: once lost (another holder
//! took the volume over), every request fails.
//!
//! Block status uses the trait's default (read the range, zero blocks
//! are holes): raftblk stores no all-zero block, so a block that reads
//! as zeros is exactly one that is not allocated.

use std::sync::Arc;

use bytes::Bytes;
use raftblk_client::qos::Qos;
use raftblk_client::{ClientError, Volume};

use crate::backend::{Backend, BackendError, BackendResult};
use crate::ratelimit::LogLimiter;

pub struct VolumeBackend {
    volume: Volume,
    qos: Arc<Qos>,
    /// A writable export checks its lease.
    leased: bool,
    lost_log: LogLimiter,
}

impl VolumeBackend {
    pub fn new(volume: Volume, qos: Arc<Qos>, leased: bool) -> VolumeBackend {
        VolumeBackend {
            volume,
            qos,
            leased,
            lost_log: LogLimiter::new(1),
        }
    }

    /// Fails once the attach lease is lost.
    fn lease(&self) -> Result<(), BackendError> {
        if !self.leased {
            return Ok(());
        }
        let lost = match self.volume.attachment() {
            Some(a) => a.lost(),
            None => Some("the export holds no attach lease".to_owned()),
        };
        match lost {
            None => Ok(()),
            Some(why) => {
                if let Some(suppressed) = self.lost_log.allow() {
                    tracing::error!(volume = %self.volume.info().name, suppressed, reason = %why, "attach lease lost: failing every request");
                }
                Err(BackendError::Io(format!("attach lease lost: {why}")))
            }
        }
    }
}

fn map(e: ClientError) -> BackendError {
    match e {
        ClientError::InvalidArgument(m) => BackendError::InvalidArgument(m),
        ClientError::OutOfRange(m) => BackendError::OutOfRange(m),
        other => BackendError::Io(other.to_string()),
    }
}

impl Backend for VolumeBackend {
    fn size(&self) -> u64 {
        self.volume.size_bytes()
    }

    fn read(&self, offset: u64, len: u32) -> BackendResult<'_, Vec<u8>> {
        Box::pin(async move {
            self.lease()?;
            self.qos.admit(false, u64::from(len)).await;
            self.volume.read(offset, u64::from(len)).await.map_err(map)
        })
    }

    fn write(&self, offset: u64, data: Bytes) -> BackendResult<'_, ()> {
        Box::pin(async move {
            self.lease()?;
            self.qos.admit(true, data.len() as u64).await;
            self.volume.write_bytes(offset, data).await.map_err(map)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u32) -> BackendResult<'_, ()> {
        Box::pin(async move {
            self.lease()?;
            self.qos.admit(true, 0).await;
            self.volume
                .write_zeroes(offset, u64::from(len))
                .await
                .map_err(map)
        })
    }

    fn trim(&self, offset: u64, len: u32) -> BackendResult<'_, ()> {
        Box::pin(async move {
            self.lease()?;
            self.qos.admit(true, 0).await;
            self.volume
                .discard(offset, u64::from(len))
                .await
                .map_err(map)
        })
    }

    fn flush(&self) -> BackendResult<'_, ()> {
        Box::pin(async move {
            self.lease()?;
            self.volume.flush().await.map_err(map)
        })
    }
}
