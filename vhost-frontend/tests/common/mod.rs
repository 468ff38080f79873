//! A test VMM and guest driver for `raftblk-vhost`: the vhost crate's
//! frontend side plus split virtqueues in a shared memfd, driving a real
//! daemon of a real 3-node cluster without QEMU. Shared by the protocol
//! and fencing tests (each uses part of it).
#![allow(dead_code)]

use std::os::fd::FromRawFd as _;
use std::time::{Duration, Instant};

use raftblk_cluster_tests::guest::VhostDaemon;
use raftblk_cluster_tests::{ClusterSpec, LocalCluster};
use raftblk_vhost::virtio_blk::*;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Address as _, Bytes, FileOffset, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::EventFd;

pub const MEM_BYTES: usize = 32 << 20;
pub const QSIZE: u16 = 64;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;
/// Guest-physical layout: rings of queue q at 0x10000 * (q + 1); request
/// headers at 0x80000, status bytes at 0x90000, data from 0x100000.
pub const HDR: u64 = 0x80000;
pub const STATUS: u64 = 0x90000;
pub const DATA: u64 = 0x100000;
pub const INDIRECT_TABLE: u64 = 0xa0000;
/// Data buffer of each chain `post_writes` lays out.
pub const POST_DATA_BYTES_MAX: usize = 0x10000;

pub struct Vq {
    pub index: usize,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub avail_idx: u16,
    pub used_idx: u16,
    pub kick: EventFd,
    pub _call: EventFd,
}

pub type BeforeKick = Box<dyn Fn(&GuestMemoryMmap<()>, usize) -> anyhow::Result<()>>;

/// What a test adds to the usual negotiation.
pub struct Extra {
    pub protocol: VhostUserProtocolFeatures,
    /// An inflight region to hand back (SET_INFLIGHT_FD) before the rings.
    pub inflight: Option<(VhostUserInflight, std::fs::File)>,
    /// Runs on each queue after its ring is set up, before its kick fd.
    pub before_kick: Option<BeforeKick>,
}

impl Default for Extra {
    fn default() -> Self {
        Extra {
            protocol: VhostUserProtocolFeatures::empty(),
            inflight: None,
            before_kick: None,
        }
    }
}

pub struct Driver {
    pub mem: GuestMemoryMmap<()>,
    pub fe: Frontend,
    pub queues: Vec<Vq>,
}

#[derive(Clone, Copy)]
pub struct D {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

pub fn d(addr: u64, len: u32, write: bool) -> D {
    D { addr, len, write }
}

impl Driver {
    pub fn connect(
        socket: &std::path::Path,
        queues: usize,
    ) -> anyhow::Result<(Driver, u64, VhostUserProtocolFeatures, Vec<u8>)> {
        Self::connect_with(socket, queues, &Extra::default())
    }

    pub fn connect_with(
        socket: &std::path::Path,
        queues: usize,
        extra: &Extra,
    ) -> anyhow::Result<(Driver, u64, VhostUserProtocolFeatures, Vec<u8>)> {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is
        // checked and then owned by the File.
        let fd = unsafe { libc::memfd_create(c"raftblk-test-mem".as_ptr(), 0) };
        anyhow::ensure!(fd >= 0, "memfd_create failed");
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(MEM_BYTES as u64)?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_BYTES,
            Some(FileOffset::new(file, 0)),
        )])?;
        let mut fe = Frontend::connect(socket, queues as u64)?;
        fe.set_owner()?;
        let features = fe.get_features()?;
        let want = F_VERSION_1
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
            | F_PROTOCOL_FEATURES;
        fe.set_features(features & want)?;
        let pf = fe.get_protocol_features()?;
        fe.set_protocol_features(
            pf & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK
                | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
                | extra.protocol),
        )?;
        if let Some((msg, file)) = &extra.inflight {
            use std::os::fd::AsRawFd as _;
            fe.set_inflight_fd(msg, file.as_raw_fd())?;
        }
        let (_, config) = fe.get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])?;
        let region = mem
            .iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no region"))?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)?;
        let host = info.userspace_addr;
        fe.set_mem_table(&[info])?;
        let mut vqs = Vec::new();
        for q in 0..queues {
            let base = 0x10000 * (q as u64 + 1);
            let vq = Vq {
                index: q,
                desc: base,
                avail: base + 0x1000,
                used: base + 0x2000,
                avail_idx: 0,
                used_idx: 0,
                kick: EventFd::new(0)?,
                _call: EventFd::new(0)?,
            };
            fe.set_vring_num(q, QSIZE)?;
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: host + vq.desc,
                    used_ring_addr: host + vq.used,
                    avail_ring_addr: host + vq.avail,
                    log_addr: None,
                },
            )?;
            fe.set_vring_base(q, 0)?;
            if let Some(f) = &extra.before_kick {
                f(&mem, q)?;
            }
            fe.set_vring_call(q, &vq._call)?;
            fe.set_vring_kick(q, &vq.kick)?;
            fe.set_vring_enable(q, true)?;
            vqs.push(vq);
        }
        Ok((
            Driver {
                mem,
                fe,
                queues: vqs,
            },
            features,
            pf,
            config,
        ))
    }

    pub fn write_desc(&self, table: u64, i: u16, x: D, next: Option<u16>) -> anyhow::Result<()> {
        let mut flags = if x.write { F_WRITE } else { 0 };
        if next.is_some() {
            flags |= F_NEXT;
        }
        let at = GuestAddress(table + u64::from(i) * 16);
        self.mem.write_obj(x.addr, at)?;
        self.mem.write_obj(x.len, at.unchecked_add(8))?;
        self.mem.write_obj(flags, at.unchecked_add(12))?;
        self.mem
            .write_obj(next.unwrap_or(0), at.unchecked_add(14))?;
        Ok(())
    }

    /// Submits a chain on queue `q` (direct, or through one indirect table)
    /// and waits for it; returns the used length.
    pub fn submit(&mut self, q: usize, chain: &[D], indirect: bool) -> anyhow::Result<u32> {
        let table: Vec<(D, Option<u16>)> = chain
            .iter()
            .enumerate()
            .map(|(i, x)| (*x, (i + 1 < chain.len()).then_some(i as u16 + 1)))
            .collect();
        self.submit_table(q, &table, indirect)
    }

    /// Like `submit`, with every descriptor's `next` given explicitly
    /// (entry i of the table is descriptor i; the chain starts at 0).
    pub fn submit_table(
        &mut self,
        q: usize,
        table: &[(D, Option<u16>)],
        indirect: bool,
    ) -> anyhow::Result<u32> {
        let desc = self.queues[q].desc;
        if indirect {
            for (i, (x, next)) in table.iter().enumerate() {
                self.write_desc(INDIRECT_TABLE, i as u16, *x, *next)?;
            }
            let at = GuestAddress(desc);
            self.mem.write_obj(INDIRECT_TABLE, at)?;
            self.mem
                .write_obj((table.len() * 16) as u32, at.unchecked_add(8))?;
            self.mem.write_obj(F_INDIRECT, at.unchecked_add(12))?;
            self.mem.write_obj(0u16, at.unchecked_add(14))?;
        } else {
            anyhow::ensure!(
                table.len() <= usize::from(QSIZE),
                "chain longer than the queue"
            );
            for (i, (x, next)) in table.iter().enumerate() {
                self.write_desc(desc, i as u16, *x, *next)?;
            }
        }
        self.make_available(q, 0)?;
        self.wait_used(q, 0)
    }

    /// Puts head index `head` on queue `q`'s available ring and kicks.
    pub fn make_available(&mut self, q: usize, head: u16) -> anyhow::Result<()> {
        let vq = &mut self.queues[q];
        let slot = vq.avail_idx % QSIZE;
        self.mem
            .write_obj(head, GuestAddress(vq.avail + 4 + u64::from(slot) * 2))?;
        vq.avail_idx = vq.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(vq.avail_idx, GuestAddress(vq.avail + 2))?;
        vq.kick.write(1)?;
        Ok(())
    }

    /// Waits for the next used-ring entry of queue `q`, which must be
    /// `head`; returns its length.
    pub fn wait_used(&mut self, q: usize, head: u16) -> anyhow::Result<u32> {
        let vq = &mut self.queues[q];
        let used = vq.used;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(used + 2))?;
            if idx != vq.used_idx {
                let slot = vq.used_idx % QSIZE;
                let id: u32 = self
                    .mem
                    .read_obj(GuestAddress(used + 4 + u64::from(slot) * 8))?;
                let len: u32 = self
                    .mem
                    .read_obj(GuestAddress(used + 8 + u64::from(slot) * 8))?;
                vq.used_idx = vq.used_idx.wrapping_add(1);
                anyhow::ensure!(id == u32::from(head), "used id {id}, expected head {head}");
                return Ok(len);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "queue {} request not answered in 30 s",
                vq.index
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Posts one write per `(sector, data)` on queue `q` without waiting
    /// for any, in chain slots `first_slot..` (chain k: descriptors
    /// 3k..3k+2 and a header, data buffer and status byte of its own; a
    /// slot must not be reused before its answer); returns the heads.
    pub fn post_writes(
        &mut self,
        q: usize,
        first_slot: usize,
        writes: &[(u64, Vec<u8>)],
    ) -> anyhow::Result<Vec<u16>> {
        anyhow::ensure!(
            (first_slot + writes.len()) * 3 <= usize::from(QSIZE),
            "{} writes from slot {first_slot} do not fit one queue",
            writes.len()
        );
        let desc = self.queues[q].desc;
        let mut heads = Vec::new();
        for (k, (sector, data)) in writes.iter().enumerate() {
            anyhow::ensure!(data.len() <= POST_DATA_BYTES_MAX, "write too large");
            let k = (first_slot + k) as u64;
            let (hdr, status, buf) = (
                HDR + 16 * k,
                STATUS + k,
                DATA + POST_DATA_BYTES_MAX as u64 * k,
            );
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&T_OUT.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(hdr))?;
            self.mem.write_slice(data, GuestAddress(buf))?;
            self.mem.write_obj(0xAAu8, GuestAddress(status))?;
            let base = (3 * k) as u16;
            self.write_desc(desc, base, d(hdr, 16, false), Some(base + 1))?;
            self.write_desc(
                desc,
                base + 1,
                d(buf, data.len() as u32, false),
                Some(base + 2),
            )?;
            self.write_desc(desc, base + 2, d(status, 1, true), None)?;
            heads.push(base);
        }
        for h in &heads {
            self.make_available(q, *h)?;
        }
        Ok(heads)
    }

    /// Waits (at most `timeout`) for `n` used entries of queue `q` posted
    /// by `post_writes`, in any order; returns each one's head and status.
    pub fn collect(
        &mut self,
        q: usize,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<Vec<(u16, u8)>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let vq = &mut self.queues[q];
            let idx: u16 = self.mem.read_obj(GuestAddress(vq.used + 2))?;
            if idx == vq.used_idx {
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "queue {q}: {} of {n} requests answered in {timeout:?}",
                    out.len()
                );
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let slot = vq.used_idx % QSIZE;
            let id: u32 = self
                .mem
                .read_obj(GuestAddress(vq.used + 4 + u64::from(slot) * 8))?;
            vq.used_idx = vq.used_idx.wrapping_add(1);
            let head = u16::try_from(id)?;
            let status: u8 = self
                .mem
                .read_obj(GuestAddress(STATUS + u64::from(head / 3)))?;
            out.push((head, status));
        }
        Ok(out)
    }

    pub fn header(&self, t: u32, sector: u64) -> anyhow::Result<D> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR))?;
        Ok(d(HDR, 16, false))
    }

    /// Runs a request and returns (status byte, used length).
    pub fn run(&mut self, q: usize, chain: &[D]) -> anyhow::Result<(u8, u32)> {
        self.mem.write_obj(0xAAu8, GuestAddress(STATUS))?;
        let len = self.submit(q, chain, false)?;
        Ok((self.mem.read_obj(GuestAddress(STATUS))?, len))
    }

    pub fn status(&self) -> D {
        d(STATUS, 1, true)
    }

    pub fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> anyhow::Result<u8> {
        self.mem.write_slice(data, GuestAddress(DATA))?;
        let h = self.header(T_OUT, sector)?;
        let st = self.status();
        Ok(self.run(q, &[h, d(DATA, data.len() as u32, false), st])?.0)
    }

    pub fn read(&mut self, q: usize, sector: u64, len: u32) -> anyhow::Result<(u8, Vec<u8>)> {
        self.mem
            .write_slice(&vec![0x55u8; len as usize], GuestAddress(DATA))?;
        let h = self.header(T_IN, sector)?;
        let st = self.status();
        // Split the buffer over two descriptors, as drivers do.
        let half = len / 2;
        let (s, used) = self.run(
            q,
            &[
                h,
                d(DATA, half, true),
                d(DATA + u64::from(half), len - half, true),
                st,
            ],
        )?;
        if s == S_OK {
            assert_eq!(used, len + 1, "used length of a read");
        }
        let mut buf = vec![0u8; len as usize];
        self.mem.read_slice(&mut buf, GuestAddress(DATA))?;
        Ok((s, buf))
    }

    pub fn discard(
        &mut self,
        q: usize,
        t: u32,
        sector: u64,
        sectors: u32,
        flags: u32,
    ) -> anyhow::Result<u8> {
        let mut r = [0u8; 16];
        r[0..8].copy_from_slice(&sector.to_le_bytes());
        r[8..12].copy_from_slice(&sectors.to_le_bytes());
        r[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&r, GuestAddress(DATA))?;
        let h = self.header(t, 0)?;
        let st = self.status();
        Ok(self.run(q, &[h, d(DATA, 16, false), st])?.0)
    }
}

pub fn setup(
    volume: &str,
    size: u64,
) -> anyhow::Result<(LocalCluster, tempfile::TempDir, VhostDaemon, u64)> {
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let client = rt.block_on(cluster.client())?;
    let info = rt.block_on(client.create_volume(volume, size))?;
    let dir = tempfile::tempdir()?;
    let vhost = VhostDaemon::start(dir.path(), &cluster.cluster_arg(), volume, 2)?;
    Ok((cluster, dir, vhost, info.id))
}
