//! Parsing and validating one virtio-blk descriptor chain. Everything here
//! treats the guest as hostile: every length is checked before use, sums
//! are checked for overflow, every buffer must lie inside guest memory and
//! point the right way, and the sector range must fit the disk. A chain
//! that fails gets IOERR or UNSUPP (when its status byte is usable), never
//! a panic and never an access outside the guest's regions.
//!
//! Layout accepted (what Linux, QEMU's drivers and every VMM use): the
//! 16-byte header alone in the first, device-readable descriptor; data
//! buffers in the middle; the status byte in the last, device-writable
//! descriptor.
//!
//! The chain itself is walked here too (`walk_chain`), not by
//! virtio-queue's iterator: that one stops silently after a table's worth
//! of descriptors or at a `next` outside the table, so a chain whose `next`
//! fields loop (or leave the table) would be served as whatever prefix it
//! yielded. Here every descriptor is read at most once and a chain must end
//! with a descriptor without NEXT; anything else is malformed.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

use crate::virtio_blk::*;

/// One descriptor as the device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub write_only: bool,
}

/// A validated request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub head: u16,
    pub kind: Kind,
    /// Data buffers, in order (device-writable for reads and GET_ID,
    /// device-readable for writes).
    pub segments: Vec<Desc>,
    pub status: GuestAddress,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    GetId,
    /// Byte ranges to discard, or to zero (`unmap` is always honoured:
    /// zeroed blocks are deallocated).
    Discard {
        ranges: Vec<(u64, u64)>,
    },
    WriteZeroes {
        ranges: Vec<(u64, u64)>,
    },
}

/// A chain that cannot be served.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub head: u16,
    /// Where to write the status byte, if the chain has a usable one.
    pub status: Option<GuestAddress>,
    pub code: u8,
    pub reason: String,
}

/// What the device knows when it parses a chain.
#[derive(Debug, Clone, Copy)]
pub struct DeviceInfo {
    pub capacity_sectors: u64,
    pub read_only: bool,
    pub limits: Limits,
}

/// Split-ring descriptor flags and size (VIRTIO 1.2, 2.7.5).
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
const DESC_BYTES: u32 = 16;

/// The status byte of a chain whose last descriptor is `last`, if it is
/// usable: device-writable, at least one byte, inside guest memory.
fn status_byte<M: GuestMemory>(mem: &M, last: Option<&Desc>) -> Option<GuestAddress> {
    let d = last?;
    (d.write_only && d.len >= 1 && mem.check_range(d.addr, 1, Permissions::Write)).then_some(d.addr)
}

/// The entries of one descriptor table visited so far: one bit each, so at
/// most 8 KiB for the largest table (65535 entries).
struct Visited {
    bits: Vec<u64>,
}

impl Visited {
    fn new(entries: u32) -> Visited {
        let mut v = Visited { bits: Vec::new() };
        v.reset(entries);
        v
    }

    /// Forgets every entry and resizes for a table of `entries`.
    fn reset(&mut self, entries: u32) {
        self.bits.clear();
        self.bits.resize(entries.div_ceil(64) as usize, 0);
    }

    /// Marks entry `i`; false when it was marked already (or is outside
    /// the table).
    fn insert(&mut self, i: u16) -> bool {
        let bit = 1u64 << (i % 64);
        match self.bits.get_mut(usize::from(i / 64)) {
            Some(word) if *word & bit == 0 => {
                *word |= bit;
                true
            }
            _ => false,
        }
    }
}

/// Reads the descriptors of the chain at `head` in the split-ring
/// descriptor table at `table` (`size` entries), following at most one
/// indirect table. Every descriptor is read from guest memory at most once,
/// so a `next` back to a descriptor already visited (a loop, in the ring
/// or in an indirect table) is detected as such, as is a `next` outside
/// its table, an unreadable descriptor, an indirect table inside an
/// indirect table, an indirect table whose length is not whole
/// descriptors, and more than `max_descs` descriptors.
///
/// Such a chain is rejected with IOERR. Its status byte is the last
/// descriptor read before the fault (the one whose `next` is bad, for a
/// loop the one that closes it), when that one is a usable status byte;
/// a chain longer than `max_descs` has none.
pub fn walk_chain<M: GuestMemory>(
    mem: &M,
    table: GuestAddress,
    size: u16,
    head: u16,
    max_descs: usize,
) -> Result<Vec<Desc>, Rejected> {
    let mut descs: Vec<Desc> = Vec::new();
    let fail = |descs: &[Desc], reason: String| Rejected {
        head,
        status: status_byte(mem, descs.last()),
        code: S_IOERR,
        reason,
    };
    if head >= size {
        return Err(fail(
            &[],
            format!("head index {head} outside the ring of {size}"),
        ));
    }
    let mut table = table;
    let mut entries = u32::from(size);
    let mut visited = Visited::new(entries);
    let mut in_indirect = false;
    let mut index = head;
    loop {
        let place = if in_indirect {
            "indirect table"
        } else {
            "ring"
        };
        if u32::from(index) >= entries {
            return Err(fail(
                &descs,
                format!("next index {index} outside the {place} of {entries}"),
            ));
        }
        if !visited.insert(index) {
            return Err(fail(
                &descs,
                format!("descriptor {index} of the {place} visited twice: the chain loops"),
            ));
        }
        let mut raw = [0u8; DESC_BYTES as usize];
        let readable = table
            .checked_add(u64::from(index) * u64::from(DESC_BYTES))
            .is_some_and(|at| mem.read_slice(&mut raw, at).is_ok());
        if !readable {
            return Err(fail(
                &descs,
                format!("descriptor {index} of the {place} outside guest memory"),
            ));
        }
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&raw[0..8]);
        let addr = u64::from_le_bytes(addr);
        let len = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if flags & DESC_F_INDIRECT != 0 {
            if in_indirect {
                return Err(fail(
                    &descs,
                    "indirect descriptor inside an indirect table".into(),
                ));
            }
            let n = len / DESC_BYTES;
            if len == 0 || !len.is_multiple_of(DESC_BYTES) || n > u32::from(u16::MAX) {
                return Err(fail(&descs, format!("indirect table of {len} bytes")));
            }
            // Its NEXT flag is ignored (drivers must not set it), as
            // virtio-queue and QEMU do: the chain continues in the table.
            in_indirect = true;
            table = GuestAddress(addr);
            entries = n;
            visited.reset(entries);
            index = 0;
            continue;
        }
        if descs.len() >= max_descs {
            return Err(Rejected {
                head,
                status: None,
                code: S_IOERR,
                reason: "descriptor chain too long".into(),
            });
        }
        descs.push(Desc {
            addr: GuestAddress(addr),
            len,
            write_only: flags & DESC_F_WRITE != 0,
        });
        if flags & DESC_F_NEXT == 0 {
            return Ok(descs);
        }
        index = next;
    }
}

fn in_memory<M: GuestMemory>(mem: &M, d: &Desc) -> bool {
    let access = if d.write_only {
        Permissions::Write
    } else {
        Permissions::Read
    };
    d.len == 0 || mem.check_range(d.addr, d.len as usize, access)
}

/// Parses the chain `descs` whose head index is `head`.
pub fn parse<M: GuestMemory>(
    head: u16,
    descs: &[Desc],
    mem: &M,
    dev: &DeviceInfo,
) -> Result<Request, Rejected> {
    let reject_no_status = |reason: &str| Rejected {
        head,
        status: None,
        code: S_IOERR,
        reason: reason.to_owned(),
    };
    let Some(last) = descs.last() else {
        return Err(reject_no_status("empty descriptor chain"));
    };
    if !last.write_only || last.len < 1 {
        return Err(reject_no_status(
            "last descriptor is not a writable status byte",
        ));
    }
    if !mem.check_range(last.addr, 1, Permissions::Write) {
        return Err(reject_no_status("status byte outside guest memory"));
    }
    let status = last.addr;
    let reject = |code: u8, reason: String| Rejected {
        head,
        status: Some(status),
        code,
        reason,
    };
    if descs.len() < 2 {
        return Err(reject(S_IOERR, "chain has no header".into()));
    }
    let header = descs[0];
    if header.write_only {
        return Err(reject(S_IOERR, "header descriptor is write-only".into()));
    }
    if header.len < HEADER_BYTES {
        return Err(reject(
            S_IOERR,
            format!("header descriptor is {} bytes, need 16", header.len),
        ));
    }
    let mut h = [0u8; HEADER_BYTES as usize];
    if mem.read_slice(&mut h, header.addr).is_err() {
        return Err(reject(S_IOERR, "header outside guest memory".into()));
    }
    let req_type = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
    let data = &descs[1..descs.len() - 1];
    if data.len() > dev.limits.seg_max as usize {
        return Err(reject(
            S_IOERR,
            format!(
                "{} data segments exceed seg_max {}",
                data.len(),
                dev.limits.seg_max
            ),
        ));
    }
    let mut total: u64 = 0;
    for d in data {
        if !in_memory(mem, d) {
            return Err(reject(
                S_IOERR,
                format!("buffer {:#x}+{} outside guest memory", d.addr.0, d.len),
            ));
        }
        if d.len > dev.limits.size_max {
            return Err(reject(
                S_IOERR,
                format!(
                    "segment of {} bytes exceeds size_max {}",
                    d.len, dev.limits.size_max
                ),
            ));
        }
        total = match total.checked_add(u64::from(d.len)) {
            Some(t) => t,
            None => return Err(reject(S_IOERR, "data length overflows".into())),
        };
    }
    let want_direction = |writable: bool| -> Result<(), Rejected> {
        if data.iter().any(|d| d.write_only != writable) {
            return Err(reject(
                S_IOERR,
                format!(
                    "data buffer has the wrong direction (must be device-{})",
                    if writable { "writable" } else { "readable" }
                ),
            ));
        }
        Ok(())
    };
    let check_range = |sector: u64, bytes: u64| -> Result<u64, Rejected> {
        let offset = sector.checked_mul(SECTOR_BYTES);
        let end_sector = bytes
            .checked_div(SECTOR_BYTES)
            .and_then(|n| sector.checked_add(n));
        match (offset, end_sector) {
            (Some(off), Some(end)) if end <= dev.capacity_sectors => Ok(off),
            _ => Err(reject(
                S_IOERR,
                format!(
                    "sectors {sector}..+{} past the end of the disk ({} sectors)",
                    bytes / SECTOR_BYTES,
                    dev.capacity_sectors
                ),
            )),
        }
    };
    let kind = match req_type {
        T_IN | T_OUT => {
            let write = req_type == T_OUT;
            if write && dev.read_only {
                return Err(reject(S_IOERR, "write to a read-only disk".into()));
            }
            want_direction(!write)?;
            if total == 0 || !total.is_multiple_of(SECTOR_BYTES) {
                return Err(reject(
                    S_IOERR,
                    format!("data length {total} is not a positive multiple of 512"),
                ));
            }
            if total > dev.limits.request_bytes_max {
                return Err(reject(
                    S_IOERR,
                    format!(
                        "request of {total} bytes exceeds {}",
                        dev.limits.request_bytes_max
                    ),
                ));
            }
            let offset = check_range(sector, total)?;
            if write {
                Kind::Write { offset, len: total }
            } else {
                Kind::Read { offset, len: total }
            }
        }
        T_FLUSH => Kind::Flush,
        T_GET_ID => {
            want_direction(true)?;
            if total < ID_BYTES as u64 {
                return Err(reject(
                    S_IOERR,
                    format!("GET_ID buffer of {total} bytes, need 20"),
                ));
            }
            Kind::GetId
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let zeroes = req_type == T_WRITE_ZEROES;
            if dev.read_only {
                return Err(reject(S_IOERR, "discard on a read-only disk".into()));
            }
            want_direction(false)?;
            if total == 0 || !total.is_multiple_of(u64::from(DISCARD_RANGE_BYTES)) {
                return Err(reject(
                    S_IOERR,
                    format!("discard payload of {total} bytes is not whole 16-byte ranges"),
                ));
            }
            let count = total / u64::from(DISCARD_RANGE_BYTES);
            if count > u64::from(dev.limits.discard_seg_max) {
                return Err(reject(
                    S_IOERR,
                    format!(
                        "{count} ranges exceed max_discard_seg {}",
                        dev.limits.discard_seg_max
                    ),
                ));
            }
            // Gather the payload (bounded: at most discard_seg_max * 16 bytes).
            let mut payload = Vec::with_capacity(total as usize);
            for d in data {
                let mut buf = vec![0u8; d.len as usize];
                if mem.read_slice(&mut buf, d.addr).is_err() {
                    return Err(reject(
                        S_IOERR,
                        "discard payload outside guest memory".into(),
                    ));
                }
                payload.extend_from_slice(&buf);
            }
            let mut ranges = Vec::with_capacity(count as usize);
            for r in payload.chunks_exact(DISCARD_RANGE_BYTES as usize) {
                let mut s = [0u8; 8];
                s.copy_from_slice(&r[0..8]);
                let start = u64::from_le_bytes(s);
                let num = u32::from_le_bytes([r[8], r[9], r[10], r[11]]);
                let flags = u32::from_le_bytes([r[12], r[13], r[14], r[15]]);
                let allowed = if zeroes { WZ_FLAG_UNMAP } else { 0 };
                if flags & !allowed != 0 {
                    return Err(reject(
                        S_UNSUPP,
                        format!("unsupported range flags {flags:#x}"),
                    ));
                }
                if num == 0 || num > dev.limits.discard_sectors_max {
                    return Err(reject(
                        S_IOERR,
                        format!(
                            "range of {num} sectors (allowed 1..={})",
                            dev.limits.discard_sectors_max
                        ),
                    ));
                }
                let bytes = u64::from(num) * SECTOR_BYTES;
                let offset = check_range(start, bytes)?;
                ranges.push((offset, bytes));
            }
            if zeroes {
                Kind::WriteZeroes { ranges }
            } else {
                Kind::Discard { ranges }
            }
        }
        other => {
            return Err(reject(
                S_UNSUPP,
                format!("unsupported request type {other}"),
            ))
        }
    };
    Ok(Request {
        head,
        kind,
        segments: data.to_vec(),
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0x1000), 0x10000)])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn dev() -> DeviceInfo {
        DeviceInfo {
            capacity_sectors: 64,
            read_only: false,
            limits: Limits::for_queue_size(16),
        }
    }

    fn header(m: &GuestMemoryMmap<()>, at: u64, t: u32, sector: u64) -> Desc {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at))
            .unwrap_or_else(|e| panic!("{e}"));
        Desc {
            addr: GuestAddress(at),
            len: 16,
            write_only: false,
        }
    }

    fn d(addr: u64, len: u32, w: bool) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            write_only: w,
        }
    }

    #[test]
    fn good_read_and_write() {
        let m = mem();
        let r = parse(
            3,
            &[
                header(&m, 0x1000, T_IN, 8),
                d(0x2000, 4096, true),
                d(0x3000, 1, true),
            ],
            &m,
            &dev(),
        );
        let r = r.unwrap_or_else(|e| panic!("{e:?}"));
        assert_eq!(
            r.kind,
            Kind::Read {
                offset: 4096,
                len: 4096
            }
        );
        assert_eq!(r.status, GuestAddress(0x3000));
        let w = parse(
            3,
            &[
                header(&m, 0x1000, T_OUT, 0),
                d(0x2000, 512, false),
                d(0x2200, 512, false),
                d(0x3000, 1, true),
            ],
            &m,
            &dev(),
        );
        assert_eq!(
            w.map(|r| r.kind),
            Ok(Kind::Write {
                offset: 0,
                len: 1024
            })
        );
    }

    fn code(r: Result<Request, Rejected>) -> (Option<GuestAddress>, u8, String) {
        match r {
            Ok(r) => panic!("accepted {r:?}"),
            Err(e) => (e.status, e.code, e.reason),
        }
    }

    #[test]
    fn malformed_chains_are_rejected() {
        let m = mem();
        let dv = dev();
        let st = d(0x3000, 1, true);
        // Status not writable: no status can be written.
        let (s, _, why) = code(parse(
            0,
            &[
                header(&m, 0x1000, T_IN, 0),
                d(0x2000, 512, true),
                d(0x3000, 1, false),
            ],
            &m,
            &dv,
        ));
        assert_eq!(s, None, "{why}");
        // Status outside guest memory.
        assert_eq!(
            code(parse(
                0,
                &[header(&m, 0x1000, T_IN, 0), d(0xfff_0000, 1, true)],
                &m,
                &dv
            ))
            .0,
            None
        );
        // Short header, write-only header.
        let mut short = header(&m, 0x1000, T_IN, 0);
        short.len = 8;
        assert!(code(parse(0, &[short, d(0x2000, 512, true), st], &m, &dv))
            .2
            .contains("16"));
        let mut wo = header(&m, 0x1000, T_IN, 0);
        wo.write_only = true;
        assert!(code(parse(0, &[wo, d(0x2000, 512, true), st], &m, &dv))
            .2
            .contains("write-only"));
        // Wrong direction both ways.
        assert!(code(parse(
            0,
            &[header(&m, 0x1000, T_IN, 0), d(0x2000, 512, false), st],
            &m,
            &dv
        ))
        .2
        .contains("direction"));
        assert!(code(parse(
            0,
            &[header(&m, 0x1000, T_OUT, 0), d(0x2000, 512, true), st],
            &m,
            &dv
        ))
        .2
        .contains("direction"));
        // Buffer outside memory, and one straddling its end.
        assert!(code(parse(
            0,
            &[header(&m, 0x1000, T_IN, 0), d(0x100_0000, 512, true), st],
            &m,
            &dv
        ))
        .2
        .contains("outside"));
        assert!(code(parse(
            0,
            &[header(&m, 0x1000, T_IN, 0), d(0x10e00, 0x400, true), st],
            &m,
            &dv
        ))
        .2
        .contains("outside"));
        // Past the end of the disk, and sector overflow.
        assert!(code(parse(
            0,
            &[header(&m, 0x1000, T_IN, 63), d(0x2000, 1024, true), st],
            &m,
            &dv
        ))
        .2
        .contains("past the end"));
        assert!(code(parse(
            0,
            &[header(&m, 0x1000, T_IN, u64::MAX), d(0x2000, 512, true), st],
            &m,
            &dv
        ))
        .2
        .contains("past the end"));
        // Unaligned length.
        assert!(code(parse(
            0,
            &[header(&m, 0x1000, T_IN, 0), d(0x2000, 100, true), st],
            &m,
            &dv
        ))
        .2
        .contains("multiple of 512"));
        // Too many segments.
        let mut many = vec![header(&m, 0x1000, T_IN, 0)];
        many.extend((0..20).map(|i| d(0x2000 + i * 512, 512, true)));
        many.push(st);
        assert!(code(parse(0, &many, &m, &dv)).2.contains("seg_max"));
        // Unknown type → UNSUPP.
        assert_eq!(
            code(parse(0, &[header(&m, 0x1000, 99, 0), st], &m, &dv)).1,
            S_UNSUPP
        );
        // Read-only disk refuses writes and discards.
        let ro = DeviceInfo {
            read_only: true,
            ..dv
        };
        assert!(code(parse(
            0,
            &[header(&m, 0x1000, T_OUT, 0), d(0x2000, 512, false), st],
            &m,
            &ro
        ))
        .2
        .contains("read-only"));
    }

    #[test]
    fn discard_ranges() {
        let m = mem();
        let dv = dev();
        let st = d(0x3000, 1, true);
        let range = |at: u64, sector: u64, num: u32, flags: u32| {
            let mut r = [0u8; 16];
            r[0..8].copy_from_slice(&sector.to_le_bytes());
            r[8..12].copy_from_slice(&num.to_le_bytes());
            r[12..16].copy_from_slice(&flags.to_le_bytes());
            m.write_slice(&r, GuestAddress(at))
                .unwrap_or_else(|e| panic!("{e}"));
            d(at, 16, false)
        };
        let ok = parse(
            0,
            &[
                header(&m, 0x1000, T_WRITE_ZEROES, 0),
                range(0x2000, 8, 8, WZ_FLAG_UNMAP),
                st,
            ],
            &m,
            &dv,
        );
        assert_eq!(
            ok.map(|r| r.kind),
            Ok(Kind::WriteZeroes {
                ranges: vec![(4096, 4096)]
            })
        );
        // UNMAP is not a discard flag.
        assert_eq!(
            code(parse(
                0,
                &[header(&m, 0x1000, T_DISCARD, 0), range(0x2000, 8, 8, 1), st],
                &m,
                &dv
            ))
            .1,
            S_UNSUPP
        );
        assert!(code(parse(
            0,
            &[
                header(&m, 0x1000, T_DISCARD, 0),
                range(0x2000, 60, 8, 0),
                st
            ],
            &m,
            &dv
        ))
        .2
        .contains("past the end"));
        assert!(code(parse(
            0,
            &[header(&m, 0x1000, T_DISCARD, 0), d(0x2000, 10, false), st],
            &m,
            &dv
        ))
        .2
        .contains("16-byte"));
    }

    /// Writes descriptor `i` of the table at `table`.
    fn put(m: &GuestMemoryMmap<()>, table: u64, i: u16, x: Desc, flags: u16, next: u16) {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&x.addr.0.to_le_bytes());
        raw[8..12].copy_from_slice(&x.len.to_le_bytes());
        let w = if x.write_only { DESC_F_WRITE } else { 0 };
        raw[12..14].copy_from_slice(&(flags | w).to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        m.write_slice(&raw, GuestAddress(table + u64::from(i) * 16))
            .unwrap_or_else(|e| panic!("{e}"));
    }

    const RING: u64 = 0x8000;
    const TABLE: u64 = 0x9000;
    const N: u16 = DESC_F_NEXT;

    fn walk(m: &GuestMemoryMmap<()>, head: u16) -> Result<Vec<Desc>, Rejected> {
        walk_chain(m, GuestAddress(RING), 8, head, 64)
    }

    /// The rejection of a chain that must not walk.
    fn bad(r: Result<Vec<Desc>, Rejected>) -> Rejected {
        match r {
            Ok(d) => panic!("walked {d:?}"),
            Err(e) => {
                assert_eq!(e.code, S_IOERR);
                e
            }
        }
    }

    #[test]
    fn walks_direct_and_indirect_chains() {
        let m = mem();
        let (h, x, st) = (
            d(0x1000, 16, false),
            d(0x2000, 512, true),
            d(0x3000, 1, true),
        );
        put(&m, RING, 5, h, N, 2);
        put(&m, RING, 2, x, N, 7);
        put(&m, RING, 7, st, 0, 0);
        assert_eq!(walk(&m, 5), Ok(vec![h, x, st]));
        // An indirect head (its next is ignored); the table starts at 0.
        put(&m, RING, 1, d(TABLE, 48, false), DESC_F_INDIRECT | N, 6);
        put(&m, TABLE, 0, h, N, 2);
        put(&m, TABLE, 2, x, N, 1);
        put(&m, TABLE, 1, st, 0, 0);
        assert_eq!(walk(&m, 1), Ok(vec![h, x, st]));
        // Every table's entries can be used once each: a full ring.
        for i in 0..8u16 {
            put(&m, RING, i, d(0x2000, 512, true), N, (i + 1) % 8);
        }
        put(&m, RING, 2, st, 0, 0);
        assert_eq!(walk(&m, 3).map(|v| v.len()), Ok(8));
    }

    #[test]
    fn loops_and_strays_are_rejected() {
        let m = mem();
        let (h, x, st) = (
            d(0x1000, 16, false),
            d(0x2000, 512, false),
            d(0x3000, 1, true),
        );
        let indirect = |len: u32| {
            put(&m, RING, 0, d(TABLE, len, false), DESC_F_INDIRECT, 0);
        };
        // Indirect table header -> data -> status -> header: cut off at the
        // table's length it would be a valid write. The status byte is the
        // descriptor that closes the loop.
        indirect(48);
        put(&m, TABLE, 0, h, N, 1);
        put(&m, TABLE, 1, x, N, 2);
        put(&m, TABLE, 2, st, N, 0);
        let e = bad(walk(&m, 0));
        assert!(e.reason.contains("loops"), "{}", e.reason);
        assert_eq!(e.status, Some(st.addr));
        // ... -> status -> data, and a longer table than the loop.
        put(&m, TABLE, 2, st, N, 1);
        assert!(bad(walk(&m, 0)).reason.contains("loops"));
        indirect(64);
        assert!(bad(walk(&m, 0)).reason.contains("loops"));
        // A descriptor that is its own next.
        put(&m, TABLE, 1, x, N, 1);
        let e = bad(walk(&m, 0));
        assert!(e.reason.contains("loops"));
        assert_eq!(e.status, None, "data buffer is no status byte");
        // Next outside the table (which the memory behind it does not
        // extend).
        indirect(48);
        put(&m, TABLE, 1, x, N, 2);
        put(&m, TABLE, 2, st, N, 3);
        put(&m, TABLE, 3, st, 0, 0);
        let e = bad(walk(&m, 0));
        assert!(
            e.reason.contains("outside the indirect table"),
            "{}",
            e.reason
        );
        assert_eq!(e.status, Some(st.addr));
        // Loop in the ring itself, and a next outside it.
        put(&m, RING, 3, h, N, 4);
        put(&m, RING, 4, st, N, 3);
        assert!(bad(walk(&m, 3)).reason.contains("loops"));
        put(&m, RING, 4, st, N, 8);
        assert!(bad(walk(&m, 3)).reason.contains("outside the ring"));
        // Head outside the ring: no status.
        let e = bad(walk(&m, 8));
        assert!(e.reason.contains("head index"));
        assert_eq!(e.status, None);
        // Indirect inside indirect.
        indirect(48);
        put(&m, TABLE, 2, st, N, 1);
        put(&m, TABLE, 1, d(TABLE, 48, false), DESC_F_INDIRECT, 0);
        assert!(bad(walk(&m, 0)).reason.contains("inside an indirect"));
        // Indirect tables of no descriptors, part of one, too many, and
        // outside guest memory.
        for len in [0, 40, 16 * 65536] {
            indirect(len);
            let e = bad(walk(&m, 0));
            assert!(e.reason.contains("indirect table of"), "{}", e.reason);
            assert_eq!(e.status, None);
        }
        put(&m, RING, 0, d(0xfff_0000, 48, false), DESC_F_INDIRECT, 0);
        assert!(bad(walk(&m, 0)).reason.contains("outside guest memory"));
        // A ring outside guest memory.
        assert!(bad(walk_chain(&m, GuestAddress(0x100_0000), 8, 0, 64))
            .reason
            .contains("outside guest memory"));
        // More descriptors than allowed: no status.
        put(&m, RING, 0, d(TABLE, 48, false), DESC_F_INDIRECT, 0);
        put(&m, TABLE, 0, h, N, 1);
        put(&m, TABLE, 1, x, N, 2);
        put(&m, TABLE, 2, st, 0, 0);
        assert_eq!(
            walk_chain(&m, GuestAddress(RING), 8, 0, 3).map(|v| v.len()),
            Ok(3)
        );
        let e = bad(walk_chain(&m, GuestAddress(RING), 8, 0, 2));
        assert_eq!(
            (e.status, e.reason.as_str()),
            (None, "descriptor chain too long")
        );
    }
}
