//! The vhost-user protocol, backend side, for one connection: our own
//! handler of the frontend's requests (the `vhost` crate's
//! `VhostUserBackendReqHandlerMut`), in place of vhost-user-backend's
//! daemon, so that every message a block device needs is ours to answer —
//! inflight regions (GET/SET_INFLIGHT_FD) above all.
//!
//! It owns the negotiated state (features, guest memory map, the address
//! translation for ring addresses, the inflight region) and the queues'
//! `Vring`s and worker threads. Rings start when their kick fd arrives and
//! stop at GET_VRING_BASE, which answers only once every request the ring
//! accepted is answered. Everything the frontend sends is checked: indices
//! against the queue count, sizes against what was offered, addresses
//! against the memory map.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::Error as VuError;
use vhost::vhost_user::{Backend, GpuBackend, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::backend::{BlkBackend, GuestMem, Mem};
use crate::dirty_log::{DirtyLog, LogBitmap};
use crate::inflight::InflightRegion;
use crate::resize::ConfigNotifier;
use crate::virtio_blk::{F_LOG_ALL, F_PROTOCOL_FEATURES, F_RING_EVENT_IDX};
use crate::vring::Vring;
use crate::worker::Worker;

type VuResult<T> = std::result::Result<T, VuError>;

/// Memory regions a frontend may add (QEMU's own limit).
const MEM_SLOTS_MAX: u64 = 509;

/// Where one region of guest memory lives in the frontend's address space.
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// The protocol state of one connection.
pub struct Handler {
    backend: BlkBackend,
    vrings: Vec<Vring>,
    workers: Vec<Worker>,
    mem: Mem,
    mappings: Vec<Mapping>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    inflight: Option<InflightRegion>,
    /// Where the backend-request channel goes when the frontend sets one
    /// up: the size watcher sends config changes through it.
    notifier: ConfigNotifier,
    log: Arc<DirtyLog>,
    /// A request failed in a way the frontend cannot be told about (a
    /// ring that would not drain): the connection must end, so the
    /// frontend reconnects and the inflight region serves what is left.
    fatal: bool,
}

fn invalid(what: impl Into<String>) -> VuError {
    VuError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, what.into()))
}

/// Sets O_NONBLOCK on an eventfd the frontend handed over, so that a
/// counter the frontend left full or empty never blocks a worker.
fn set_nonblocking(f: &File) {
    // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
}

impl Handler {
    pub fn new(backend: BlkBackend, notifier: ConfigNotifier) -> io::Result<Handler> {
        let opts = backend.opts().clone();
        let mut vrings = Vec::new();
        let mut workers = Vec::new();
        for q in 0..usize::from(opts.num_queues) {
            let v = Vring::new(opts.queue_size)?;
            workers.push(Worker::spawn(q, v.clone(), backend.clone())?);
            vrings.push(v);
        }
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        backend.update_memory(mem.clone());
        Ok(Handler {
            backend,
            vrings,
            workers,
            mem,
            mappings: Vec::new(),
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            inflight: None,
            notifier,
            log: Arc::new(DirtyLog::default()),
            fatal: false,
        })
    }

    fn vring(&self, index: u32) -> VuResult<&Vring> {
        self.vrings
            .get(index as usize)
            .ok_or_else(|| invalid(format!("queue {index} does not exist")))
    }

    fn poke(&self, index: usize) {
        if let Some(w) = self.workers.get(index) {
            w.poke();
        }
    }

    fn vmm_va_to_gpa(&self, va: u64) -> VuResult<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa_base)
            .ok_or_else(|| invalid(format!("ring address {va:#x} is outside guest memory")))
    }

    /// Maps one region the frontend sent, its bitmap bound to this
    /// connection's dirty log.
    fn map_region(
        &self,
        region: &VhostUserMemoryRegion,
        file: File,
    ) -> VuResult<GuestRegionMmap<LogBitmap>> {
        let r: GuestRegionMmap<LogBitmap> = GuestRegionMmap::new(
            region.mmap_region::<LogBitmap>(file)?,
            GuestAddress(region.guest_phys_addr),
        )
        .ok_or_else(|| invalid("memory region overflows the guest address space"))?;
        GuestMemoryRegion::bitmap(&r).bind(region.guest_phys_addr, self.log.clone());
        Ok(r)
    }

    /// Whether the connection must end (see `fatal`).
    pub fn fatal(&self) -> bool {
        self.fatal
    }

    /// Page bits set in the dirty log on this connection.
    pub fn pages_logged(&self) -> u64 {
        self.log.pages_marked()
    }

    fn replace_memory(&mut self, mem: GuestMem) {
        self.mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(mem);
        self.backend.update_memory(self.mem.clone());
    }

    fn protocol_acked(&self, f: VhostUserProtocolFeatures) -> bool {
        self.acked_protocol_features & f.bits() != 0
    }

    /// A ring starts when its kick fd arrives: it becomes ready, and if an
    /// inflight region is set, the requests it records are queued for
    /// resubmission and the avail index continues after them.
    fn start_ring(&mut self, index: usize) {
        let mem = self.mem.memory();
        let inflight = self.inflight.as_ref().and_then(|r| r.queue(index as u16));
        let mut st = self.vrings[index].lock();
        if st.started {
            // A new kick fd for a running ring: follow it, nothing else
            // (recovery again would serve requests in flight twice).
            st.generation += 1;
            drop(st);
            self.poke(index);
            return;
        }
        // `is_valid` checks a ready queue's sizes and ring addresses.
        st.queue.set_ready(true);
        if !st.queue.is_valid(&*mem) {
            st.queue.set_ready(false);
            tracing::warn!(
                queue = index,
                "ring addresses are not valid in guest memory; the queue stays stopped"
            );
            st.started = false;
            st.generation += 1;
            drop(st);
            self.poke(index);
            return;
        }
        st.broken = false;
        st.resubmit.clear();
        st.inflight = None;
        if let Some(mut inf) = inflight {
            let used = st
                .queue
                .used_idx(&*mem, std::sync::atomic::Ordering::Acquire)
                .map(|w| w.0)
                .unwrap_or(0);
            let found = inf.start(st.queue.size(), used);
            if let Some(reason) = &found.reset_reason {
                tracing::warn!(queue = index, %reason, "inflight region reset");
            }
            if let Some(next) = found.next_avail {
                st.queue.set_next_avail(next);
            }
            if !found.resubmit.is_empty() {
                tracing::info!(
                    queue = index,
                    requests = found.resubmit.len(),
                    used_idx = used,
                    "resubmitting requests from the inflight region"
                );
            }
            st.resubmit = found.resubmit.into();
            st.inflight = Some(inf);
        }
        st.started = true;
        st.generation += 1;
        drop(st);
        self.poke(index);
    }

    /// Stops every ring (reset, disconnect) after answering what it
    /// accepted.
    pub fn stop_all(&mut self) {
        for q in 0..self.vrings.len() {
            {
                let mut st = self.vrings[q].lock();
                st.started = false;
                st.generation += 1;
            }
            self.poke(q);
            if let Err(e) = self.backend.drain_queue(q) {
                tracing::warn!(queue = q, error = %e, "requests left in flight");
            }
        }
    }
}

impl Drop for Handler {
    fn drop(&mut self) {
        self.stop_all();
        for w in &mut self.workers {
            w.stop();
        }
    }
}

impl VhostUserBackendReqHandlerMut for Handler {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.stop_all();
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.stop_all();
        for v in &self.vrings {
            v.lock().enabled = false;
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.backend.features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.backend.features();
        if features & !offered != 0 {
            return Err(invalid(format!(
                "features {:#x} were not offered",
                features & !offered
            )));
        }
        self.acked_features = features;
        let logging = features & F_LOG_ALL != 0;
        if logging != self.log.enabled() {
            tracing::info!(
                logging,
                pages_logged = self.log.pages_marked(),
                "dirty-page logging for migration"
            );
        }
        self.log.set_enabled(logging);
        // Without PROTOCOL_FEATURES, rings are enabled from the start.
        if features & F_PROTOCOL_FEATURES == 0 {
            for (q, v) in self.vrings.iter().enumerate() {
                {
                    let mut st = v.lock();
                    st.enabled = true;
                    st.generation += 1;
                }
                self.poke(q);
            }
        }
        let event_idx = features & F_RING_EVENT_IDX != 0;
        for v in &self.vrings {
            v.lock().queue.set_event_idx(event_idx);
        }
        self.backend.set_event_idx(event_idx);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        for (region, file) in ctx.iter().zip(files) {
            let r = self.map_region(region, file)?;
            mappings.push(Mapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
            regions.push(r);
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| invalid(format!("memory table: {e}")))?;
        self.replace_memory(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = self.backend.opts().queue_size;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            return Err(invalid(format!(
                "queue {index}: size {num} (a power of two up to {max})"
            )));
        }
        self.vring(index)?.lock().queue.set_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let desc = self.vmm_va_to_gpa(descriptor)?;
        let avail = self.vmm_va_to_gpa(available)?;
        let used = self.vmm_va_to_gpa(used)?;
        let mem = self.mem.memory();
        let mut st = self.vring(index)?.lock();
        let q = &mut st.queue;
        q.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
        q.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        // The used index continues from what the ring holds (a driver that
        // reset its rings starts again at 0).
        if let Ok(idx) = q.used_idx(&*mem, std::sync::atomic::Ordering::Acquire) {
            q.set_next_used(idx.0);
        }
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        // Split rings: the avail index in the low 16 bits.
        self.vring(index)?.lock().queue.set_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let vring = self.vring(index)?.clone();
        {
            let mut st = vring.lock();
            st.started = false;
            st.generation += 1;
        }
        self.poke(index as usize);
        if let Err(e) = self.backend.drain_queue(index as usize) {
            self.fatal = true;
            return Err(VuError::ReqHandlerError(e));
        }
        let mut st = vring.lock();
        st.queue.set_ready(false);
        let next_avail = st.queue.next_avail();
        st.kick = None;
        st.call = None;
        st.generation += 1;
        drop(st);
        self.poke(index as usize);
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = usize::from(index);
        {
            let mut st = self.vring(u32::from(index))?.lock();
            if let Some(f) = &fd {
                set_nonblocking(f);
            }
            st.kick = fd;
            st.generation += 1;
        }
        self.start_ring(q);
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let mut st = self.vring(u32::from(index))?.lock();
        if let Some(f) = &fd {
            set_nonblocking(f);
        }
        st.call = fd;
        // Requests may have been answered (resubmissions) before the call
        // fd arrived: one spurious interrupt makes sure none is missed.
        if st.started {
            let _ = st.signal_used();
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(self.backend.protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        let offered = self.backend.protocol_features().bits();
        if features & !offered != 0 {
            return Err(invalid(format!(
                "protocol features {:#x} were not offered",
                features & !offered
            )));
        }
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.vrings.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if self.acked_features & F_PROTOCOL_FEATURES == 0 {
            return Err(VuError::InvalidOperation(
                "SET_VRING_ENABLE without PROTOCOL_FEATURES",
            ));
        }
        {
            let mut st = self.vring(index)?.lock();
            st.enabled = enable;
            st.generation += 1;
        }
        self.poke(index as usize);
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        Ok(self.backend.config(offset, size))
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        Err(VuError::InvalidOperation(
            "the virtio-blk config space is read-only",
        ))
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        if self.protocol_acked(VhostUserProtocolFeatures::REPLY_ACK) {
            backend.set_reply_ack_flag(true);
        }
        static CHANNELS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = CHANNELS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *self.notifier.lock().unwrap_or_else(|p| p.into_inner()) = Some((id, backend));
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }

    fn get_inflight_fd(&mut self, msg: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let opts = self.backend.opts();
        if msg.num_queues == 0 || msg.num_queues > opts.num_queues {
            return Err(invalid(format!(
                "inflight region for {} queues; the device has {}",
                msg.num_queues, opts.num_queues
            )));
        }
        if msg.queue_size == 0 || msg.queue_size > opts.queue_size {
            return Err(invalid(format!(
                "inflight region for queues of {} descriptors; at most {}",
                msg.queue_size, opts.queue_size
            )));
        }
        let (region, file) = InflightRegion::create(msg.num_queues, msg.queue_size)
            .map_err(VuError::ReqHandlerError)?;
        let size =
            u64::from(msg.num_queues) * crate::inflight::queue_region_bytes(msg.queue_size) as u64;
        self.inflight = Some(region);
        Ok((
            VhostUserInflight {
                mmap_size: size,
                mmap_offset: 0,
                num_queues: msg.num_queues,
                queue_size: msg.queue_size,
            },
            file,
        ))
    }

    fn set_inflight_fd(&mut self, msg: &VhostUserInflight, file: File) -> VuResult<()> {
        let opts = self.backend.opts();
        match InflightRegion::open(msg, file, opts.num_queues, opts.queue_size) {
            Ok(region) => {
                tracing::info!(
                    queues = region.num_queues(),
                    queue_size = region.queue_size(),
                    "inflight region set"
                );
                self.inflight = Some(region);
                Ok(())
            }
            Err(reason) => {
                tracing::warn!(%reason, "inflight region refused");
                Err(invalid(reason))
            }
        }
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MEM_SLOTS_MAX)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy is not supported"));
        }
        if self.mappings.len() as u64 >= MEM_SLOTS_MAX {
            return Err(invalid("every memory slot is in use"));
        }
        let r = Arc::new(self.map_region(region, fd)?);
        let mem = self
            .mem
            .memory()
            .insert_region(r)
            .map_err(|e| invalid(format!("add memory region: {e}")))?;
        self.replace_memory(mem);
        self.mappings.push(Mapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| invalid(format!("remove memory region: {e}")))?;
        self.replace_memory(mem);
        self.mappings
            .retain(|m| m.gpa_base != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation(
            "no device state: the volume is shared storage",
        ))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation("no device state"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }

    fn set_log_base(&mut self, log: &VhostUserLog, file: File) -> VuResult<()> {
        match self.log.set_base(file, log.mmap_size, log.mmap_offset) {
            Ok(()) => {
                tracing::info!(size_bytes = log.mmap_size, "dirty log set");
                Ok(())
            }
            Err(reason) => {
                tracing::warn!(%reason, "dirty log refused");
                Err(invalid(reason))
            }
        }
    }
}
