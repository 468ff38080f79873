//! The transmission phase of one connection: a reader parses requests
//! (every offset, length and flag checked before anything is allocated
//! or sent to the backend), runs each in its own task (at most
//! `Limits::in_flight_max` at once, and at most `bytes_in_flight_max` of
//! payload), and one writer task sends the replies in the order they
//! complete. Simple replies, or structured ones when negotiated (reads
//! as OFFSET_DATA and OFFSET_HOLE chunks, block status, errors with a
//! message). NBD_CMD_DISC, a disconnect or a malformed header ends the
//! connection once the requests in flight are answered.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::backend::{hole_runs, Backend, BackendError, Extent};
use crate::export::Export;
use crate::handshake::{skip, Session, BASE_ALLOCATION_ID};
use crate::proto::{self, *};
use crate::ratelimit::client_errors;

/// Bounds of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub in_flight_max: usize,
    pub bytes_in_flight_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            in_flight_max: 64,
            // Two requests of the largest size; 16 connections of a
            // read-only export hold at most 1 GiB.
            bytes_in_flight_max: 64 << 20,
        }
    }
}

/// Most extents in one block status reply.
const EXTENTS_MAX: usize = 1 << 16;

/// Unit of the payload budget.
const BUDGET_UNIT: u32 = 4096;

/// What a connection did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub requests: u64,
    pub errors: u64,
    /// The client ended with NBD_CMD_DISC (not a hard disconnect).
    pub soft_disconnect: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum TransmissionError {
    #[error("bad request magic: the stream cannot be followed any more")]
    BadMagic,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// A checked request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, fua: bool },
    BlockStatus { offset: u64, len: u32, one: bool },
    Disconnect,
}

/// A refused request: its NBD error and a message for the user.
pub type Refusal = (u32, String);

/// Checks a request against the export (`size` bytes now) and the
/// session: alignment, range, the payload bound, flags, read-only.
pub fn check(r: &proto::Request, read_only: bool, s: &Session, size: u64) -> Result<Op, Refusal> {
    let bad = |m: String| Err((EINVAL, m));
    let allowed = match r.kind {
        CMD_READ | CMD_FLUSH | CMD_DISC => CMD_FLAG_FUA,
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        k => return bad(format!("unknown command {k}")),
    };
    if r.flags & !allowed != 0 {
        return bad(format!(
            "flags {:#x} not valid for command {}",
            r.flags, r.kind
        ));
    }
    let fua = r.flags & CMD_FLAG_FUA != 0;
    match r.kind {
        CMD_DISC => return Ok(Op::Disconnect),
        CMD_FLUSH => return Ok(Op::Flush),
        _ => {}
    }
    let writes = matches!(r.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && read_only {
        return Err((EPERM, "the export is read-only".into()));
    }
    if r.kind == CMD_BLOCK_STATUS && !s.base_allocation {
        return bad("no metadata context was negotiated".into());
    }
    let (offset, len) = (r.offset, r.len);
    if !offset.is_multiple_of(u64::from(BLOCK_MIN)) || !len.is_multiple_of(BLOCK_MIN) {
        return bad(format!(
            "offset {offset} and length {len} must be multiples of {BLOCK_MIN}"
        ));
    }
    if matches!(r.kind, CMD_READ | CMD_WRITE) && len > PAYLOAD_MAX {
        return bad(format!(
            "length {len} exceeds the {PAYLOAD_MAX}-byte maximum"
        ));
    }
    if r.kind == CMD_BLOCK_STATUS && len == 0 {
        return bad("block status of 0 bytes".into());
    }
    if offset
        .checked_add(u64::from(len))
        .is_none_or(|end| end > size)
    {
        let e = if matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return Err((
            e,
            format!("{len} bytes at {offset} end past the export's {size} bytes"),
        ));
    }
    Ok(match r.kind {
        CMD_READ => Op::Read { offset, len },
        CMD_WRITE => Op::Write { offset, len, fua },
        CMD_TRIM => Op::Trim { offset, len, fua },
        CMD_WRITE_ZEROES => Op::WriteZeroes { offset, len, fua },
        _ => Op::BlockStatus {
            offset,
            len,
            one: r.flags & CMD_FLAG_REQ_ONE != 0,
        },
    })
}

/// One reply, whole, with the budget it holds until written.
struct Reply {
    parts: Vec<Bytes>,
    error: bool,
    _permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// Serves the transmission phase on `stream` until the client leaves.
pub async fn serve<S>(
    stream: S,
    export: Arc<Export>,
    session: Session,
    limits: Limits,
) -> Result<Stats, TransmissionError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let (tx, rx) = mpsc::channel::<Reply>(limits.in_flight_max.max(1));
    let (gone_tx, mut gone_rx) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::spawn(async move {
        let r = write_replies(wr, rx).await;
        drop(gone_tx);
        r
    });
    let requests = Arc::new(Semaphore::new(limits.in_flight_max.max(1)));
    let units = (limits.bytes_in_flight_max / BUDGET_UNIT).max(PAYLOAD_MAX / BUDGET_UNIT);
    let budget = Arc::new(Semaphore::new(units as usize));
    let mut tasks = tokio::task::JoinSet::new();
    let mut stats = Stats::default();
    let session = Arc::new(session);
    let result = loop {
        while tasks.try_join_next().is_some() {}
        let mut hdr = [0u8; REQUEST_BYTES];
        let read = tokio::select! {
            r = rd.read_exact(&mut hdr) => r,
            _ = &mut gone_rx => break Ok(()),
        };
        if let Err(e) = read {
            // EOF between requests: a hard disconnect by the client.
            break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e.into())
            };
        }
        let Some(req) = proto::parse_request(&hdr) else {
            break Err(TransmissionError::BadMagic);
        };
        stats.requests += 1;
        let size = export.backend().size();
        let op = check(&req, export.read_only(), &session, size);
        if req.kind == CMD_WRITE && op.is_err() {
            // The payload follows whatever we think of the request.
            if let Err(e) = skip(&mut rd, req.len).await {
                break Err(e.into());
            }
        }
        let op = match op {
            Ok(Op::Disconnect) => {
                stats.soft_disconnect = true;
                break Ok(());
            }
            Ok(op) => op,
            Err((errno, msg)) => {
                stats.errors += 1;
                log_refusal(&req, errno, &msg);
                let reply = error_reply(&session, req.handle, errno, &msg);
                if tx.send(reply).await.is_err() {
                    break Ok(());
                }
                continue;
            }
        };
        let bytes = match op {
            Op::Read { len, .. } | Op::Write { len, .. } => len,
            Op::BlockStatus { len, .. } => len.min(crate::backend::STATUS_SCAN_MAX),
            _ => 0,
        };
        let need = bytes.div_ceil(BUDGET_UNIT).max(1);
        let (Ok(p1), Ok(p2)) = (
            requests.clone().acquire_owned().await,
            budget.clone().acquire_many_owned(need).await,
        ) else {
            break Ok(());
        };
        let payload = if let Op::Write { len, .. } = op {
            let mut b = BytesMut::zeroed(len as usize);
            if let Err(e) = rd.read_exact(&mut b).await {
                break Err(e.into());
            }
            b.freeze()
        } else {
            Bytes::new()
        };
        let (export, session, tx) = (export.clone(), session.clone(), tx.clone());
        tasks.spawn(async move {
            let mut reply = run(export.backend().as_ref(), &session, req.handle, op, payload).await;
            reply._permits = Some((p1, p2));
            let _ = tx.send(reply).await;
        });
    };
    // Answer everything accepted before closing.
    while tasks.join_next().await.is_some() {}
    drop(tx);
    let written = writer.await.unwrap_or(Ok(0));
    stats.errors += written.unwrap_or(0);
    result.map(|_| stats)
}

/// Writes replies as they come; flushes whenever none is waiting.
/// Returns how many were errors.
async fn write_replies<W>(wr: W, mut rx: mpsc::Receiver<Reply>) -> std::io::Result<u64>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(256 << 10, wr);
    let mut errors = 0;
    while let Some(r) = rx.recv().await {
        errors += u64::from(r.error);
        for p in &r.parts {
            w.write_all(p).await?;
        }
        drop(r);
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    let _ = w.shutdown().await;
    Ok(errors)
}

fn log_refusal(req: &proto::Request, errno: u32, msg: &str) {
    if let Some(suppressed) = client_errors().allow() {
        tracing::warn!(
            command = req.kind,
            offset = req.offset,
            len = req.len,
            flags = req.flags,
            errno,
            suppressed,
            "refused a request: {msg}"
        );
    }
}

fn error_reply(s: &Session, handle: u64, errno: u32, msg: &str) -> Reply {
    let parts = if s.structured {
        vec![proto::error_chunk(handle, errno, msg)]
    } else {
        vec![proto::simple_reply(handle, errno)]
    };
    Reply {
        parts,
        error: false,
        _permits: None,
    }
}

fn ok_reply(handle: u64) -> Reply {
    Reply {
        parts: vec![proto::simple_reply(handle, 0)],
        error: false,
        _permits: None,
    }
}

/// Runs one checked request against the backend; its reply.
async fn run(b: &dyn Backend, s: &Session, handle: u64, op: Op, payload: Bytes) -> Reply {
    let r = match op {
        Op::Read { offset, len } => match b.read(offset, len).await {
            Ok(d) if d.len() == len as usize => return read_reply(s, handle, offset, d),
            Ok(d) => Err(BackendError::Io(format!(
                "backend returned {} bytes for a {len}-byte read",
                d.len()
            ))),
            Err(e) => Err(e),
        },
        Op::Write { offset, fua, .. } => with_fua(b, fua, b.write(offset, payload)).await,
        Op::Trim { offset, len, fua } => with_fua(b, fua, b.trim(offset, len)).await,
        Op::WriteZeroes { offset, len, fua } => with_fua(b, fua, b.write_zeroes(offset, len)).await,
        Op::Flush => b.flush().await,
        Op::BlockStatus { offset, len, one } => match b.block_status(offset, len).await {
            Ok(e) => return status_reply(handle, len, one, e),
            Err(e) => Err(e),
        },
        Op::Disconnect => Ok(()),
    };
    match r {
        Ok(()) => ok_reply(handle),
        Err(e) => {
            let errno = e.errno();
            if let Some(suppressed) = client_errors().allow() {
                tracing::warn!(?op, errno, suppressed, error = %e, "request failed");
            }
            let mut reply = error_reply(s, handle, errno, &e.to_string());
            reply.error = true;
            reply
        }
    }
}

async fn with_fua(
    b: &dyn Backend,
    fua: bool,
    f: crate::backend::BackendResult<'_, ()>,
) -> Result<(), BackendError> {
    f.await?;
    if fua {
        b.flush().await?;
    }
    Ok(())
}

/// A successful read: the data after a simple reply header, or
/// structured chunks (runs of whole zero blocks as holes).
fn read_reply(s: &Session, handle: u64, offset: u64, data: Vec<u8>) -> Reply {
    if !s.structured {
        return Reply {
            parts: vec![proto::simple_reply(handle, 0), Bytes::from(data)],
            error: false,
            _permits: None,
        };
    }
    if data.is_empty() {
        return Reply {
            parts: vec![proto::done_chunk(handle)],
            error: false,
            _permits: None,
        };
    }
    let runs = hole_runs(offset, &data);
    let data = Bytes::from(data);
    let mut parts = Vec::with_capacity(runs.len() * 2);
    let last = runs.len() - 1;
    for (i, (start, end, hole)) in runs.into_iter().enumerate() {
        let flags = if i == last { REPLY_FLAG_DONE } else { 0 };
        let at = offset + start as u64;
        let n = (end - start) as u32;
        if hole {
            let mut h = proto::chunk_header(handle, flags, REPLY_TYPE_OFFSET_HOLE, 12);
            h.put_u64(at);
            h.put_u32(n);
            parts.push(h.freeze());
        } else {
            let mut h = proto::chunk_header(handle, flags, REPLY_TYPE_OFFSET_DATA, 8 + n);
            h.put_u64(at);
            parts.push(h.freeze());
            parts.push(data.slice(start..end));
        }
    }
    Reply {
        parts,
        error: false,
        _permits: None,
    }
}

/// A block status reply: the backend's extents, cut to the request
/// (never empty: an unknown status is reported as allocated data).
fn status_reply(handle: u64, len: u32, one: bool, extents: Vec<Extent>) -> Reply {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len().min(EXTENTS_MAX));
    let mut total: u32 = 0;
    for e in extents {
        let left = len - total;
        if left == 0 {
            break;
        }
        let n = e.len.min(left);
        if n == 0 {
            continue;
        }
        out.push(Extent {
            len: n,
            flags: e.flags & (STATE_HOLE | STATE_ZERO),
        });
        total += n;
        if one || out.len() >= EXTENTS_MAX {
            break;
        }
    }
    if out.is_empty() {
        out.push(Extent { len, flags: 0 });
    }
    let mut b = proto::chunk_header(
        handle,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        4 + 8 * out.len() as u32,
    );
    b.put_u32(BASE_ALLOCATION_ID);
    for e in &out {
        b.put_u32(e.len);
        b.put_u32(e.flags);
    }
    Reply {
        parts: vec![b.freeze()],
        error: false,
        _permits: None,
    }
}
