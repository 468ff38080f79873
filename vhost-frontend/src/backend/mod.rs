//! The vhost-user-blk device: feature negotiation, config space, and the
//! per-queue data path.
//!
//! One worker thread per virtqueue (`worker`). A worker never waits on the
//! network: on a kick it pops every available chain,
//! validates it (`request`), answers malformed ones at once, copies write
//! payloads out of guest memory and hands each I/O to the tokio runtime
//! (`request_io`, which also counts it for `metrics`).
//! Completions come back through a per-queue eventfd that the same worker
//! polls; it writes read data and status bytes into guest memory, fills the
//! used ring and notifies the guest once per batch, honouring EVENT_IDX.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use raftblk_client::Volume;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

mod request_io;

use crate::metrics::{op_index, ErrorKind, QueueMetrics};
use crate::ratelimit::LogLimiter;
use crate::request::{parse, walk_chain, Desc, DeviceInfo, Kind, Request};
use crate::virtio_blk::*;
use crate::vring::{Vring, VringState};

/// Guest memory as the device maps it: every write into it is logged
/// while live migration has logging on (`dirty_log`).
pub type GuestMem = GuestMemoryMmap<crate::dirty_log::LogBitmap>;
/// The mapping, replaced as the frontend adds and removes regions.
pub type Mem = GuestMemoryAtomic<GuestMem>;

/// Descriptors read from one chain before it is declared malformed.
const CHAIN_DESCS_MAX: usize = 4096;
/// Rounds of popping in one call of `process_queue`.
const PASSES_MAX: u32 = 64;

/// Heads taken from a ring and counted in flight, not yet handed to the
/// runtime: whatever is left (answered at once, dropped, or abandoned on
/// an error) leaves the count when the batch ends.
struct Claimed<'a> {
    ctx: &'a QueueCtx,
    left: usize,
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        let now = self
            .ctx
            .inflight
            .fetch_sub(self.left, Ordering::AcqRel)
            .saturating_sub(self.left);
        self.ctx.metrics.in_flight.set(now as i64);
    }
}

/// Device settings fixed for the life of a daemon.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub num_queues: u16,
    pub queue_size: u16,
    pub read_only: bool,
    /// How long a request may take, retries included, before the guest
    /// gets IOERR. Well above an election timeout.
    pub io_timeout: Duration,
    /// The volume's I/O limits (shared by its connections and updated by
    /// the catalog watcher).
    pub qos: Arc<raftblk_client::qos::Qos>,
}

struct Completion {
    head: u16,
    status: u8,
    status_addr: GuestAddress,
    /// Read data to copy into the request's segments.
    data: Option<Vec<u8>>,
    segments: Vec<Desc>,
}

struct QueueCtx {
    completion: EventFd,
    done: Mutex<Vec<Completion>>,
    inflight: AtomicUsize,
    /// Requests answered on this queue (any status).
    answered: AtomicU64,
    /// Requests served again from the inflight region.
    resubmitted: AtomicU64,
    metrics: QueueMetrics,
}

struct Inner {
    volume: Volume,
    rt: tokio::runtime::Handle,
    opts: DeviceOptions,
    dev: DeviceInfo,
    serial: [u8; ID_BYTES],
    event_idx: AtomicBool,
    mem: RwLock<Option<Mem>>,
    queues: Vec<QueueCtx>,
    bad_chain_log: LogLimiter,
    io_error_log: LogLimiter,
}

/// The device backend for one connection. Cheap to clone.
#[derive(Clone)]
pub struct BlkBackend {
    inner: Arc<Inner>,
}

fn qerr(e: virtio_queue::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl BlkBackend {
    pub fn new(
        volume: Volume,
        rt: tokio::runtime::Handle,
        opts: DeviceOptions,
    ) -> io::Result<BlkBackend> {
        let limits = Limits::for_queue_size(opts.queue_size);
        let dev = DeviceInfo {
            capacity_sectors: volume.size_bytes() / SECTOR_BYTES,
            read_only: opts.read_only,
            limits,
        };
        let mut queues = Vec::new();
        for q in 0..opts.num_queues {
            queues.push(QueueCtx {
                metrics: QueueMetrics::new(&volume.info().name, usize::from(q)),
                completion: EventFd::new(EFD_NONBLOCK)?,
                done: Mutex::new(Vec::new()),
                inflight: AtomicUsize::new(0),
                answered: AtomicU64::new(0),
                resubmitted: AtomicU64::new(0),
            });
        }
        Ok(BlkBackend {
            inner: Arc::new(Inner {
                serial: serial(volume.info().id),
                volume,
                rt,
                opts,
                dev,
                event_idx: AtomicBool::new(false),
                mem: RwLock::new(None),
                queues,
                bad_chain_log: LogLimiter::new(10),
                io_error_log: LogLimiter::new(10),
            }),
        })
    }

    /// The eventfd on which queue `q`'s completions are signalled.
    pub fn completion_fd(&self, q: usize) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.inner.queues.get(q).map(|c| c.completion.as_raw_fd())
    }

    /// What requests are checked against: the capacity follows the
    /// volume when it grows.
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            capacity_sectors: self.inner.volume.size_bytes() / SECTOR_BYTES,
            ..self.inner.dev
        }
    }

    pub fn opts(&self) -> &DeviceOptions {
        &self.inner.opts
    }

    /// Requests answered per queue since the connection started.
    pub fn answered_per_queue(&self) -> Vec<u64> {
        self.inner
            .queues
            .iter()
            .map(|q| q.answered.load(Ordering::Relaxed))
            .collect()
    }

    /// Requests served again from the inflight region, over all queues.
    pub fn resubmitted(&self) -> u64 {
        self.inner
            .queues
            .iter()
            .map(|q| q.resubmitted.load(Ordering::Relaxed))
            .sum()
    }

    /// Requests not yet completed, over all queues.
    pub fn inflight(&self) -> usize {
        self.inner
            .queues
            .iter()
            .map(|q| q.inflight.load(Ordering::Acquire))
            .sum()
    }

    fn mem(&self) -> Option<Mem> {
        self.inner.mem.read().ok()?.clone()
    }

    /// Takes every available request of queue `q` (requests found in the
    /// inflight region at start first) and starts or answers each. True
    /// when it stopped at its pass limit with requests maybe left: call
    /// again.
    pub fn process_queue(&self, q: usize, vring: &Vring) -> io::Result<bool> {
        let Some(mem) = self.mem() else {
            return Ok(false);
        };
        let guest = mem.memory();
        let event_idx = self.inner.event_idx.load(Ordering::Acquire);
        let mut passes = 0;
        loop {
            passes += 1;
            // Only the heads are taken from virtio-queue; the chains are
            // walked by `walk_chain`, which rejects loops and `next` fields
            // outside their table instead of serving a cut-off prefix.
            let (table, size, heads, resubmits) = {
                let mut st = vring.lock();
                if !st.serving() {
                    return Ok(false);
                }
                if event_idx {
                    st.queue.disable_notification(&*guest).map_err(qerr)?;
                }
                let table = GuestAddress(st.queue.desc_table());
                let size = st.queue.size();
                let limit = usize::from(self.inner.opts.queue_size);
                let mut v = Vec::new();
                while v.len() < limit {
                    match st.resubmit.pop_front() {
                        Some(h) => v.push(h),
                        None => break,
                    }
                }
                let resubmits = v.len();
                while v.len() < limit {
                    match st.queue.pop_descriptor_chain(mem.memory()) {
                        Some(c) => {
                            let head = c.head_index();
                            if let Some(inf) = &mut st.inflight {
                                inf.get(head);
                            }
                            v.push(head);
                        }
                        None => break,
                    }
                }
                // Claimed under the ring lock: GET_VRING_BASE's drain sees
                // these heads from the moment they leave the ring.
                let ctx = &self.inner.queues[q];
                let now = ctx.inflight.fetch_add(v.len(), Ordering::AcqRel) + v.len();
                ctx.metrics.in_flight.set(now as i64);
                (table, size, v, resubmits)
            };
            let mut claimed = Claimed {
                ctx: &self.inner.queues[q],
                left: heads.len(),
            };
            if resubmits > 0 {
                self.inner.queues[q]
                    .resubmitted
                    .fetch_add(resubmits as u64, Ordering::Relaxed);
                self.inner.queues[q]
                    .metrics
                    .resubmitted
                    .inc_by(resubmits as u64);
            }
            let mut answered = false;
            for head in heads {
                let parsed = walk_chain(&*guest, table, size, head, CHAIN_DESCS_MAX)
                    .and_then(|descs| parse(head, &descs, &*guest, &self.device_info()));
                match parsed {
                    Err(rej) => {
                        self.inner.queues[q].metrics.malformed.inc();
                        if let Some(suppressed) = self.inner.bad_chain_log.allow() {
                            tracing::warn!(queue = q, head, status = rej.code, suppressed, reason = %rej.reason, "malformed request from guest");
                        }
                        if head >= size {
                            // Not a descriptor: the used ring cannot name
                            // it, so it is dropped.
                            continue;
                        }
                        let len = match rej.status {
                            Some(addr) => {
                                let _ = guest.write_slice(&[rej.code], addr);
                                1
                            }
                            None => 0,
                        };
                        vring.lock().add_used(&*guest, head, len)?;
                        self.inner.queues[q]
                            .answered
                            .fetch_add(1, Ordering::Relaxed);
                        answered = true;
                    }
                    Ok(req) => {
                        if self.submit(q, req, &guest, vring)? {
                            answered = true;
                        } else {
                            // Its completion settles it.
                            claimed.left -= 1;
                        }
                    }
                }
            }
            drop(claimed);
            let mut st = vring.lock();
            if answered {
                st.notify_if_needed(&*guest)?;
            }
            if passes > PASSES_MAX {
                // Fairness to the other work of this thread: the worker
                // calls again at once.
                return Ok(true);
            }
            if !event_idx
                || !st.serving()
                || !st.queue.enable_notification(&*guest).map_err(qerr)?
            {
                break;
            }
        }
        Ok(false)
    }

    /// Starts one request; true when it was answered at once.
    fn submit(&self, q: usize, req: Request, guest: &GuestMem, vring: &Vring) -> io::Result<bool> {
        let status_addr = req.status;
        let taken = Instant::now();
        if req.kind == Kind::GetId {
            let mut left = &self.inner.serial[..];
            let mut written = 0u32;
            for s in &req.segments {
                if left.is_empty() {
                    break;
                }
                let n = left.len().min(s.len as usize);
                if guest.write_slice(&left[..n], s.addr).is_err() {
                    break;
                }
                left = &left[n..];
                written += n as u32;
            }
            let status = if left.is_empty() { S_OK } else { S_IOERR };
            self.inner.queues[q]
                .metrics
                .answered(op_index(&req.kind), 0, Duration::ZERO);
            let _ = guest.write_slice(&[status], status_addr);
            vring.lock().add_used(guest, req.head, written + 1)?;
            self.inner.queues[q]
                .answered
                .fetch_add(1, Ordering::Relaxed);
            return Ok(true);
        }
        let payload = if let Kind::Write { len, .. } = req.kind {
            let mut buf = vec![0u8; len as usize];
            let mut at = 0usize;
            for s in &req.segments {
                let end = at + s.len as usize;
                if guest.read_slice(&mut buf[at..end], s.addr).is_err() {
                    self.inner.queues[q].metrics.error(ErrorKind::GuestMemory);
                    let _ = guest.write_slice(&[S_IOERR], status_addr);
                    vring.lock().add_used(guest, req.head, 1)?;
                    self.inner.queues[q]
                        .answered
                        .fetch_add(1, Ordering::Relaxed);
                    return Ok(true);
                }
                at = end;
            }
            Some(buf)
        } else {
            None
        };
        let ctx_index = q;
        let inner = self.inner.clone();
        let Request {
            head,
            kind,
            segments,
            ..
        } = req;
        self.inner.rt.spawn(request_io::serve(
            inner,
            ctx_index,
            request_io::Taken {
                head,
                kind,
                segments,
                status_addr,
                payload,
                taken,
            },
        ));
        Ok(false)
    }

    /// Answers the requests of queue `q` whose I/O finished: read data and
    /// status into guest memory, the used ring, one interrupt per batch.
    /// Every finished request leaves the in-flight count, even when guest
    /// memory or the ring is gone, so draining always ends.
    pub fn complete(&self, q: usize, vring: &Vring) -> io::Result<()> {
        let ctx = &self.inner.queues[q];
        let _ = ctx.completion.read();
        let done = std::mem::take(&mut *ctx.done.lock().unwrap_or_else(|p| p.into_inner()));
        if done.is_empty() {
            return Ok(());
        }
        let count = done.len();
        let result = match self.mem() {
            Some(mem) => {
                let guest = mem.memory();
                let mut st = vring.lock();
                let r = done
                    .into_iter()
                    .try_for_each(|c| answer(&guest, &mut st, c));
                r.and_then(|()| st.notify_if_needed(&*guest))
            }
            None => Ok(()),
        };
        ctx.answered.fetch_add(count as u64, Ordering::Relaxed);
        let now = ctx
            .inflight
            .fetch_sub(count, Ordering::AcqRel)
            .saturating_sub(count);
        ctx.metrics.in_flight.set(now as i64);
        result
    }

    /// Device features offered to the driver.
    pub fn features(&self) -> u64 {
        let mut f = F_VERSION_1
            | F_SIZE_MAX
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_TOPOLOGY
            | F_FLUSH
            | F_MQ
            | F_DISCARD
            | F_WRITE_ZEROES
            | F_RING_EVENT_IDX
            | F_RING_INDIRECT_DESC
            | F_LOG_ALL
            | F_PROTOCOL_FEATURES;
        if self.inner.opts.read_only {
            f |= F_RO;
        }
        f
    }

    /// vhost-user protocol features offered to the frontend.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    pub fn set_event_idx(&self, enabled: bool) {
        self.inner.event_idx.store(enabled, Ordering::Release);
    }

    /// Bytes `offset..offset+size` of the virtio-blk config space (zeros
    /// past its end).
    pub fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = config_space(
            self.device_info().capacity_sectors,
            self.inner.opts.num_queues,
            &self.inner.dev.limits,
        );
        let size = (size as usize).min(256);
        let mut out = vec![0u8; size];
        let start = offset as usize;
        if start < space.len() {
            let n = (space.len() - start).min(size);
            out[..n].copy_from_slice(&space[start..start + n]);
        }
        out
    }

    pub fn update_memory(&self, mem: Mem) {
        if let Ok(mut m) = self.inner.mem.write() {
            *m = Some(mem);
        }
    }

    /// Waits until queue `q` has no request in flight (before the frontend
    /// reads its ring base), bounded by the I/O timeout.
    pub fn drain_queue(&self, q: usize) -> io::Result<()> {
        let Some(ctx) = self.inner.queues.get(q) else {
            return Ok(());
        };
        // A request may wait for the volume's limits before its I/O.
        let deadline = Instant::now()
            + self.inner.opts.io_timeout
            + raftblk_client::qos::DELAY_MAX
            + Duration::from_secs(5);
        while ctx.inflight.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "queue {q}: {} requests still in flight",
                    ctx.inflight.load(Ordering::Acquire)
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

/// Writes one finished request back to the guest and puts it on the used
/// ring.
fn answer(guest: &GuestMem, st: &mut VringState, c: Completion) -> io::Result<()> {
    let mut status = c.status;
    let mut len = 1u32;
    if let (Some(data), S_OK) = (&c.data, status) {
        let mut at = 0usize;
        for s in &c.segments {
            let end = (at + s.len as usize).min(data.len());
            if guest.write_slice(&data[at..end], s.addr).is_err() {
                status = S_IOERR;
                break;
            }
            at = end;
        }
        if status == S_OK {
            len += data.len() as u32;
        }
    }
    let _ = guest.write_slice(&[status], c.status_addr);
    st.add_used(guest, c.head, len)
}
