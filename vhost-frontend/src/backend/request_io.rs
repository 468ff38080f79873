//! One guest request's I/O on the tokio runtime: the volume's I/O limits,
//! the attach-lease check, the cluster operation under the request's
//! deadline, its metrics, and the hand-back of the result to the queue's
//! worker through the completion eventfd (`BlkBackend::complete`).

use std::sync::Arc;
use std::time::Instant;

use raftblk_client::ClientError;
use vm_memory::GuestAddress;

use super::{Completion, Inner};
use crate::metrics::{op_index, ErrorKind};
use crate::request::{Desc, Kind};
use crate::virtio_blk::{S_IOERR, S_OK};

/// A request taken off the ring, with its write payload copied out.
pub(super) struct Taken {
    pub head: u16,
    pub kind: Kind,
    pub segments: Vec<Desc>,
    pub status_addr: GuestAddress,
    pub payload: Option<Vec<u8>>,
    /// When the worker took it (its latency counts from here).
    pub taken: Instant,
}

/// Serves one request of queue `ctx_index` and queues its completion.
pub(super) async fn serve(inner: Arc<Inner>, ctx_index: usize, req: Taken) {
    let Taken {
        head,
        kind,
        segments,
        status_addr,
        mut payload,
        taken,
    } = req;
    let op = op_index(&kind);
    let vol = &inner.volume;
    let deadline = inner.opts.io_timeout;
    // The volume's limits delay the request before it starts (its
    // deadline counts from then).
    let (write, bytes) = match &kind {
        Kind::Read { len, .. } => (false, Some(*len)),
        Kind::Write { len, .. } => (true, Some(*len)),
        Kind::Discard { .. } | Kind::WriteZeroes { .. } => (true, Some(0)),
        Kind::Flush | Kind::GetId => (false, None),
    };
    if let Some(bytes) = bytes {
        inner.opts.qos.admit(write, bytes).await;
    }
    let started = Instant::now();
    let io = async {
        // Only the holder of the volume's attach lease serves it: a
        // migration destination takes the lease over here, at the
        // guest's first request; a daemon that lost it fails them.
        if !inner.opts.read_only {
            vol.attach().await?.check()?;
        }
        match &kind {
            Kind::Read { offset, len } => vol.read(*offset, *len).await.map(Some),
            Kind::Write { offset, .. } => {
                let data = payload.take().unwrap_or_default();
                vol.write_bytes(*offset, data.into()).await.map(|_| None)
            }
            Kind::Flush => vol.flush().await.map(|_| None),
            Kind::Discard { ranges } => {
                for (off, len) in ranges {
                    vol.discard(*off, *len).await?;
                }
                Ok(None)
            }
            Kind::WriteZeroes { ranges } => {
                for (off, len) in ranges {
                    vol.write_zeroes(*off, *len).await?;
                }
                Ok(None)
            }
            Kind::GetId => Ok(None),
        }
    };
    let ctx = &inner.queues[ctx_index];
    let (status, data) = match tokio::time::timeout(deadline, io).await {
        Ok(Ok(data)) => {
            ctx.metrics
                .answered(op, bytes.unwrap_or(0), taken.elapsed());
            (S_OK, data)
        }
        Ok(Err(e)) => {
            ctx.metrics.answered(op, 0, taken.elapsed());
            ctx.metrics.error(match e {
                ClientError::Fenced(_) | ClientError::Attached(_) => ErrorKind::Fenced,
                ClientError::Timeout { .. } => ErrorKind::Timeout,
                _ => ErrorKind::Io,
            });
            if let Some(suppressed) = inner.io_error_log.allow() {
                tracing::error!(queue = ctx_index, head, suppressed, error = %e, elapsed_ms = started.elapsed().as_millis() as u64, "I/O failed");
            }
            (S_IOERR, None)
        }
        Err(_) => {
            ctx.metrics.answered(op, 0, taken.elapsed());
            ctx.metrics.error(ErrorKind::Timeout);
            if let Some(suppressed) = inner.io_error_log.allow() {
                tracing::error!(queue = ctx_index, head, suppressed, "I/O timed out");
            }
            (S_IOERR, None)
        }
    };
    ctx.done
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Completion {
            head,
            status,
            status_addr,
            data,
            segments,
        });
    let _ = ctx.completion.write(1);
}
