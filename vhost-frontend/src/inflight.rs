//! The inflight region (vhost-user `INFLIGHT_SHMFD`, split rings): shared
//! memory, kept by the frontend across a backend restart, in which the
//! daemon marks every request it took from the avail ring until its used
//! element is written. A daemon started after a crash finds there the
//! requests the guest is still waiting for and serves them again.
//!
//! Layout of one queue's part (the spec's `QueueRegionSplit`), at
//! `q * queue_region_bytes(queue_size)`:
//!
//! ```text
//! 0  u64 features   8 u16 version   10 u16 desc_num
//! 12 u16 last_batch_head            14 u16 used_idx
//! 16 + 16*i: DescStateSplit { u8 inflight; u8 pad[5]; u16 next; u64 counter }
//! ```
//!
//! The frontend can write this memory at any time, so nothing read from it
//! is trusted: every index is bounds-checked (the mapping's own checked
//! accessors), a head found in flight is only a head to validate like any
//! other chain, and the file must carry our size seals so it cannot shrink
//! under the mapping (SIGBUS).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use vhost::vhost_user::message::VhostUserInflight;
use vm_memory::{Bytes, FileOffset, MmapRegion, VolatileMemory};

/// Region format version we write.
const VERSION: u16 = 1;
const HEADER_BYTES: usize = 16;
const DESC_BYTES: usize = 16;
const ALIGN_BYTES: usize = 64;

const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const DESC_OFF_INFLIGHT: usize = 0;
const DESC_OFF_COUNTER: usize = 8;

/// Seals every region we hand out carries, and every region handed back
/// must carry (the size can never change under our mapping).
const SEALS_REQUIRED: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;

/// Bytes of one queue's part of the region.
pub fn queue_region_bytes(queue_size: u16) -> usize {
    let raw = HEADER_BYTES + DESC_BYTES * usize::from(queue_size);
    raw.div_ceil(ALIGN_BYTES) * ALIGN_BYTES
}

/// A mapped inflight region.
pub struct InflightRegion {
    map: Arc<MmapRegion<()>>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// A new zeroed region for GET_INFLIGHT_FD, with the file to send.
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<(InflightRegion, File)> {
        let size = usize::from(num_queues) * queue_region_bytes(queue_size);
        if size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "inflight region of zero queues or zero descriptors",
            ));
        }
        // SAFETY: the name is a NUL-terminated literal; the flags are valid.
        let fd = unsafe {
            libc::memfd_create(
                c"raftblk-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size as u64)?;
        // SAFETY: F_ADD_SEALS on a memfd we own, with valid seal flags.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                SEALS_REQUIRED | libc::F_SEAL_SEAL,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let map = MmapRegion::from_file(FileOffset::new(file.try_clone()?, 0), size)
            .map_err(io::Error::other)?;
        Ok((
            InflightRegion {
                map: Arc::new(map),
                num_queues,
                queue_size,
            },
            file,
        ))
    }

    /// Maps the region the frontend hands back with SET_INFLIGHT_FD,
    /// checking it against what this device offers.
    pub fn open(
        msg: &VhostUserInflight,
        file: File,
        num_queues_max: u16,
        queue_size_max: u16,
    ) -> Result<InflightRegion, String> {
        if msg.num_queues == 0 || msg.num_queues > num_queues_max {
            return Err(format!(
                "inflight region for {} queues; the device has {num_queues_max}",
                msg.num_queues
            ));
        }
        if msg.queue_size == 0 || msg.queue_size > queue_size_max {
            return Err(format!(
                "inflight region for queues of {} descriptors; at most {queue_size_max}",
                msg.queue_size
            ));
        }
        let want = usize::from(msg.num_queues) * queue_region_bytes(msg.queue_size);
        if msg.mmap_size != want as u64 {
            return Err(format!(
                "inflight region of {} bytes; {} queues of {} descriptors need {want}",
                msg.mmap_size, msg.num_queues, msg.queue_size
            ));
        }
        if msg.mmap_offset != 0 {
            return Err(format!(
                "inflight region at offset {}; regions made here start at 0",
                msg.mmap_offset
            ));
        }
        // SAFETY: F_GET_SEALS only reads the file's seal set.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & SEALS_REQUIRED != SEALS_REQUIRED {
            return Err("inflight region file is not sealed against resizing".into());
        }
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len < want as u64 {
            return Err(format!(
                "inflight region file has {len} bytes; {want} are needed"
            ));
        }
        let map = MmapRegion::from_file(FileOffset::new(file, 0), want)
            .map_err(|e| format!("map the inflight region: {e}"))?;
        Ok(InflightRegion {
            map: Arc::new(map),
            num_queues: msg.num_queues,
            queue_size: msg.queue_size,
        })
    }

    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// Queue `q`'s part, if the region covers it.
    pub fn queue(&self, q: u16) -> Option<InflightQueue> {
        (q < self.num_queues).then(|| InflightQueue {
            map: self.map.clone(),
            base: usize::from(q) * queue_region_bytes(self.queue_size),
            desc_num: self.queue_size,
            counter: 0,
        })
    }
}

/// What a queue's start found in the region.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Where the avail ring continues (used index plus requests in flight).
    pub next_avail: Option<u16>,
    /// Heads to serve again, oldest first.
    pub resubmit: Vec<u16>,
    /// Why the region was reset instead of read, if it was.
    pub reset_reason: Option<String>,
}

/// One queue's part of the inflight region.
pub struct InflightQueue {
    map: Arc<MmapRegion<()>>,
    base: usize,
    desc_num: u16,
    counter: u64,
}

impl InflightQueue {
    fn store<T: vm_memory::AtomicAccess>(&self, off: usize, v: T) {
        // Offsets are in bounds by construction (head < desc_num, checked
        // by every caller); a failure would only skip the store.
        let _ = self
            .map
            .as_volatile_slice()
            .store(v, self.base + off, Ordering::Relaxed);
    }

    fn load<T: vm_memory::AtomicAccess + Default>(&self, off: usize) -> T {
        self.map
            .as_volatile_slice()
            .load(self.base + off, Ordering::Relaxed)
            .unwrap_or_default()
    }

    fn desc_off(head: u16) -> usize {
        HEADER_BYTES + DESC_BYTES * usize::from(head)
    }

    /// Reads the region when the ring starts (the spec's recovery):
    /// a fresh region is initialised; otherwise the element written to the
    /// used ring last, if the crash came between writing it and clearing
    /// its mark, is cleared, and every head still marked is returned in
    /// the order it was taken.
    pub fn start(&mut self, queue_size: u16, ring_used_idx: u16) -> Recovered {
        let mut out = Recovered::default();
        let version: u16 = self.load(OFF_VERSION);
        let desc_num: u16 = self.load(OFF_DESC_NUM);
        if version != 0 && (version != VERSION || desc_num != queue_size) {
            out.reset_reason = Some(format!(
                "inflight region has version {version} and {desc_num} descriptors; \
                 the queue has {queue_size}"
            ));
        }
        if queue_size != self.desc_num {
            out.reset_reason = Some(format!(
                "queue of {queue_size} descriptors; the inflight region was made for {}",
                self.desc_num
            ));
        }
        if version == 0 || out.reset_reason.is_some() {
            for i in 0..self.desc_num {
                self.store(Self::desc_off(i) + DESC_OFF_INFLIGHT, 0u8);
                self.store(Self::desc_off(i) + DESC_OFF_COUNTER, 0u64);
            }
            self.store(OFF_DESC_NUM, self.desc_num.min(queue_size));
            self.store(OFF_USED_IDX, ring_used_idx);
            self.store(OFF_LAST_BATCH_HEAD, 0u16);
            fence(Ordering::SeqCst);
            self.store(OFF_VERSION, VERSION);
            self.counter = 0;
            return out;
        }
        let used_idx: u16 = self.load(OFF_USED_IDX);
        if used_idx != ring_used_idx {
            let last: u16 = self.load(OFF_LAST_BATCH_HEAD);
            if last < self.desc_num {
                self.store(Self::desc_off(last) + DESC_OFF_INFLIGHT, 0u8);
            }
            fence(Ordering::SeqCst);
            self.store(OFF_USED_IDX, ring_used_idx);
        }
        let mut found: Vec<(u64, u16)> = Vec::new();
        for i in 0..self.desc_num {
            let mark: u8 = self.load(Self::desc_off(i) + DESC_OFF_INFLIGHT);
            if mark == 1 {
                let counter: u64 = self.load(Self::desc_off(i) + DESC_OFF_COUNTER);
                found.push((counter, i));
            }
        }
        found.sort_unstable();
        self.counter = found.last().map_or(0, |(c, _)| c.wrapping_add(1));
        // At most desc_num heads: the count fits the ring's u16 arithmetic.
        let inuse = found.len() as u16;
        out.next_avail = Some(ring_used_idx.wrapping_add(inuse));
        out.resubmit = found.into_iter().map(|(_, head)| head).collect();
        out
    }

    /// Marks `head` as taken from the avail ring.
    pub fn get(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let off = Self::desc_off(head);
        self.store(off + DESC_OFF_COUNTER, self.counter);
        self.counter = self.counter.wrapping_add(1);
        fence(Ordering::Release);
        self.store(off + DESC_OFF_INFLIGHT, 1u8);
    }

    /// Before `head` goes on the used ring.
    pub fn pre_put(&self, head: u16) {
        if head < self.desc_num {
            self.store(OFF_LAST_BATCH_HEAD, head);
            fence(Ordering::Release);
        }
    }

    /// After `head` went on the used ring, which now ends at `next_used`.
    pub fn post_put(&self, head: u16, next_used: u16) {
        if head >= self.desc_num {
            return;
        }
        self.store(Self::desc_off(head) + DESC_OFF_INFLIGHT, 0u8);
        fence(Ordering::Release);
        self.store(OFF_USED_IDX, next_used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(num_queues: u16, queue_size: u16, size: usize) -> VhostUserInflight {
        VhostUserInflight {
            mmap_size: size as u64,
            mmap_offset: 0,
            num_queues,
            queue_size,
        }
    }

    #[test]
    fn a_region_handed_back_finds_the_requests_in_flight_in_order() {
        let (_, file) = InflightRegion::create(2, 8).expect("create");
        let size = 2 * queue_region_bytes(8);
        let a = InflightRegion::open(&msg(2, 8, size), file.try_clone().expect("dup"), 2, 8)
            .expect("open");
        let mut q1 = a.queue(1).expect("queue 1");
        assert_eq!(q1.start(8, 0), Recovered::default());
        q1.get(5);
        q1.get(2);
        q1.get(7);
        // 2 completes; 5 and 7 stay in flight.
        q1.pre_put(2);
        q1.post_put(2, 1);
        // A "crash" between writing 7's used element (used idx 2) and
        // clearing its mark.
        q1.pre_put(7);
        drop(q1);
        drop(a);
        let b = InflightRegion::open(&msg(2, 8, size), file, 2, 8).expect("reopen");
        let mut q1 = b.queue(1).expect("queue 1");
        let r = q1.start(8, 2);
        assert_eq!(r.resubmit, vec![5]);
        assert_eq!(r.next_avail, Some(3));
        assert_eq!(r.reset_reason, None);
        // Queue 0 was never used: fresh.
        assert_eq!(
            b.queue(0).expect("queue 0").start(8, 0),
            Recovered::default()
        );
    }

    #[test]
    fn hostile_regions_are_refused_or_reset() {
        let (_, file) = InflightRegion::create(1, 8).expect("create");
        let size = queue_region_bytes(8);
        let dup = || file.try_clone().expect("dup");
        assert!(InflightRegion::open(&msg(3, 8, 3 * size), dup(), 2, 8).is_err());
        assert!(InflightRegion::open(&msg(1, 16, size), dup(), 1, 8).is_err());
        assert!(InflightRegion::open(&msg(1, 8, size + 64), dup(), 1, 8).is_err());
        let mut m = msg(1, 8, size);
        m.mmap_offset = 4096;
        assert!(InflightRegion::open(&m, dup(), 1, 8).is_err());
        // A file without our seals could shrink under the mapping.
        let plain = tempfile::tempfile().expect("tempfile");
        plain.set_len(size as u64).expect("size");
        let e = InflightRegion::open(&msg(1, 8, size), plain, 1, 8)
            .err()
            .expect("unsealed file refused");
        assert!(e.contains("sealed"), "{e}");
        // Garbage contents: a wrong descriptor count resets the queue's
        // part instead of resubmitting anything.
        let r = InflightRegion::open(&msg(1, 8, size), dup(), 1, 8).expect("open");
        let q = r.queue(0).expect("queue");
        q.store(OFF_VERSION, VERSION);
        q.store(OFF_DESC_NUM, 200u16);
        q.store(OFF_LAST_BATCH_HEAD, 60000u16);
        for i in 0..8 {
            q.store(InflightQueue::desc_off(i), 1u8);
        }
        let mut q = r.queue(0).expect("queue");
        let got = q.start(8, 0);
        assert!(got.reset_reason.is_some());
        assert!(got.resubmit.is_empty());
        // Marks of any value but 1 and a last head out of range are ignored.
        q.store(InflightQueue::desc_off(3), 7u8);
        q.store(OFF_LAST_BATCH_HEAD, 60000u16);
        q.store(OFF_USED_IDX, 9u16);
        let got = q.start(8, 0);
        assert_eq!(got.resubmit, Vec::<u16>::new());
        assert_eq!(got.next_avail, Some(0));
    }
}
