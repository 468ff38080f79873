//! Dirty-page logging for live migration (`VHOST_F_LOG_ALL` with the
//! `LOG_SHMFD` protocol feature): while the frontend has logging on, every
//! byte the daemon writes into guest memory — read payloads, status bytes,
//! serial numbers, used-ring elements and indices, `avail_event` — sets the
//! bit of its 4 KiB guest page in a bitmap the frontend shares with
//! SET_LOG_BASE, so QEMU copies that page again before the guest moves.
//!
//! The marking happens inside vm-memory: guest memory is
//! `GuestMemoryMmap<LogBitmap>`, and every write through it calls
//! `LogBitmap::mark_dirty` with the region offset written. Each region's
//! bitmap is bound, when the region is mapped, to its guest-physical base
//! and to the connection's `DirtyLog`, so regions added after SET_LOG_BASE
//! are logged too, and turning LOG_ALL off stops the marking.

use std::fmt;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use vm_memory::bitmap::{Bitmap, BitmapSlice, NewBitmap, WithBitmapSlice};
use vm_memory::{FileOffset, MmapRegion, VolatileMemory};

/// Guest page size the vhost-user log counts in.
pub const LOG_PAGE_BYTES: u64 = 4096;
/// Largest log accepted: one bit per page, so 1 GiB covers 32 TiB of
/// guest memory.
pub const LOG_BYTES_MAX: u64 = 1 << 30;

/// The log of one connection.
#[derive(Default)]
pub struct DirtyLog {
    enabled: AtomicBool,
    map: RwLock<Option<Arc<MmapRegion<()>>>>,
    /// Page bits set since the connection started (for tests and logs).
    pages_marked: AtomicU64,
}

impl DirtyLog {
    /// LOG_ALL on or off (SET_FEATURES).
    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    pub fn pages_marked(&self) -> u64 {
        self.pages_marked.load(Ordering::Relaxed)
    }

    /// Maps the log the frontend shares (SET_LOG_BASE), replacing any
    /// earlier one. The file must hold the whole range and be sealed
    /// against shrinking, so the mapping never reaches past its end.
    pub fn set_base(&self, file: File, size_bytes: u64, offset_bytes: u64) -> Result<(), String> {
        if size_bytes == 0 || size_bytes > LOG_BYTES_MAX {
            return Err(format!(
                "dirty log of {size_bytes} bytes (1..={LOG_BYTES_MAX})"
            ));
        }
        let end = offset_bytes
            .checked_add(size_bytes)
            .ok_or("dirty log range overflows")?;
        // QEMU's log is a memfd sealed against shrinking; an unsealed file
        // could shrink under the mapping and SIGBUS the daemon.
        // SAFETY: F_GET_SEALS only reads the file's seal set.
        let seals =
            unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err("dirty log file is not sealed against shrinking".into());
        }
        let len = file.metadata().map_err(|e| e.to_string())?.len();
        if len < end {
            return Err(format!(
                "dirty log file has {len} bytes; the log ends at {end}"
            ));
        }
        let map = MmapRegion::from_file(FileOffset::new(file, offset_bytes), size_bytes as usize)
            .map_err(|e| format!("map the dirty log: {e}"))?;
        *self.map.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(map));
        Ok(())
    }

    /// Sets the bits of the pages of guest-physical `gpa..gpa+len`.
    fn mark(&self, gpa: u64, len: usize) {
        if len == 0 || !self.enabled() {
            return;
        }
        let guard = self.map.read().unwrap_or_else(|p| p.into_inner());
        let Some(map) = guard.as_ref() else { return };
        let bytes = map.as_volatile_slice();
        let first = gpa / LOG_PAGE_BYTES;
        let last = gpa.saturating_add(len as u64 - 1) / LOG_PAGE_BYTES;
        for page in first..=last {
            let Ok(byte) = usize::try_from(page / 8) else {
                return;
            };
            // Pages past the log's end are not the frontend's to know of.
            let Ok(cell) = bytes.get_atomic_ref::<AtomicU8>(byte) else {
                return;
            };
            cell.fetch_or(1 << (page % 8), Ordering::SeqCst);
            self.pages_marked.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn is_marked(&self, gpa: u64) -> bool {
        let guard = self.map.read().unwrap_or_else(|p| p.into_inner());
        let Some(map) = guard.as_ref() else {
            return false;
        };
        let page = gpa / LOG_PAGE_BYTES;
        let Ok(byte) = usize::try_from(page / 8) else {
            return false;
        };
        map.as_volatile_slice()
            .get_atomic_ref::<AtomicU8>(byte)
            .map(|c| c.load(Ordering::SeqCst) & (1 << (page % 8)) != 0)
            .unwrap_or(false)
    }
}

/// Where a region sits and which log it writes to, set once when the
/// region is mapped.
type Binding = (u64, Arc<DirtyLog>);

/// The vm-memory bitmap of one guest region.
#[derive(Default)]
pub struct LogBitmap {
    binding: OnceLock<Binding>,
}

impl fmt::Debug for LogBitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogBitmap")
            .field("gpa_base", &self.binding.get().map(|b| b.0))
            .finish()
    }
}

/// A slice of a region's bitmap: a borrow of its binding and the slice's
/// offset in the region, so taking one (vm-memory does on every guest
/// memory access) costs no reference count.
#[derive(Clone, Copy)]
pub struct LogSlice<'a> {
    binding: &'a OnceLock<Binding>,
    offset: usize,
}

impl fmt::Debug for LogSlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogSlice")
            .field("gpa_base", &self.binding.get().map(|b| b.0))
            .field("offset", &self.offset)
            .finish()
    }
}

impl LogSlice<'_> {
    /// Binds the region this bitmap belongs to (guest-physical base
    /// `gpa_base`) to the connection's log. Binding twice keeps the first.
    pub fn bind(&self, gpa_base: u64, log: Arc<DirtyLog>) {
        let _ = self.binding.set((gpa_base, log));
    }

    fn gpa(&self, offset: usize) -> Option<(u64, &DirtyLog)> {
        self.binding.get().map(|(base, log)| {
            let at = base
                .saturating_add(self.offset as u64)
                .saturating_add(offset as u64);
            (at, &**log)
        })
    }
}

impl<'a> WithBitmapSlice<'a> for LogBitmap {
    type S = LogSlice<'a>;
}

impl Bitmap for LogBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.slice_at(0).mark_dirty(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.slice_at(0).dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> LogSlice<'_> {
        LogSlice {
            binding: &self.binding,
            offset,
        }
    }
}

impl<'a> WithBitmapSlice<'_> for LogSlice<'a> {
    type S = LogSlice<'a>;
}

impl BitmapSlice for LogSlice<'_> {}

impl<'a> Bitmap for LogSlice<'a> {
    fn mark_dirty(&self, offset: usize, len: usize) {
        if let Some((at, log)) = self.gpa(offset) {
            log.mark(at, len);
        }
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.gpa(offset).is_some_and(|(at, log)| log.is_marked(at))
    }

    fn slice_at(&self, offset: usize) -> LogSlice<'a> {
        LogSlice {
            binding: self.binding,
            offset: self.offset.saturating_add(offset),
        }
    }
}

impl NewBitmap for LogBitmap {
    fn with_len(_len: usize) -> Self {
        LogBitmap::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{
        Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap, GuestMemoryRegion,
    };

    /// A memfd sealed against shrinking, as QEMU makes its log.
    fn sealed(size: u64) -> File {
        use std::os::fd::{AsRawFd, FromRawFd};
        // SAFETY: memfd_create with a NUL-terminated literal name.
        let fd = unsafe { libc::memfd_create(c"log".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: a fresh fd nobody else owns.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(size).expect("size");
        // SAFETY: F_ADD_SEALS on our memfd with valid flags.
        let rc = unsafe {
            libc::fcntl(
                f.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        assert_eq!(rc, 0);
        f
    }

    #[test]
    fn writes_mark_their_pages_only_while_logging_is_on() {
        let log = Arc::new(DirtyLog::default());
        let mem: GuestMemoryMmap<LogBitmap> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x10_0000), 0x10_0000)]).expect("mem");
        for r in mem.iter() {
            r.bitmap().bind(r.start_addr().0, log.clone());
        }
        log.set_base(sealed(4096), 4096, 0).expect("log base");
        // Off: nothing marked.
        mem.write_slice(&[1u8; 10], GuestAddress(0x10_0000))
            .expect("write");
        assert_eq!(log.pages_marked(), 0);
        log.set_enabled(true);
        // A write across a page boundary marks both pages.
        mem.write_slice(&[1u8; 10], GuestAddress(0x10_2ffc))
            .expect("write");
        assert!(log.is_marked(0x10_2000) && log.is_marked(0x10_3000));
        assert!(!log.is_marked(0x10_1000) && !log.is_marked(0x10_4000));
        // A one-byte status write.
        mem.write_obj(0u8, GuestAddress(0x1f_ffff)).expect("write");
        assert!(log.is_marked(0x1f_f000));
        log.set_enabled(false);
        mem.write_slice(&[1u8; 10], GuestAddress(0x10_8000))
            .expect("write");
        assert!(!log.is_marked(0x10_8000));
        assert_eq!(log.pages_marked(), 3);
    }

    #[test]
    fn a_log_file_shorter_than_the_log_or_unsealed_is_refused() {
        let log = DirtyLog::default();
        let plain = tempfile::tempfile().expect("log file");
        plain.set_len(4096).expect("size");
        assert!(log.set_base(plain, 4096, 0).is_err());
        let file = sealed(4096);
        assert!(log
            .set_base(file.try_clone().expect("dup"), 8192, 0)
            .is_err());
        assert!(log.set_base(file.try_clone().expect("dup"), 0, 0).is_err());
        assert!(log.set_base(file, 4096, 4096).is_err());
    }
}
