//! virtio-blk definitions this daemon speaks (VIRTIO 1.2, section 5.2):
//! feature bits, request types, status codes and the device config space.

/// Request types.
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// Status codes.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Feature bits.
pub const F_SIZE_MAX: u64 = 1 << 1;
pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_TOPOLOGY: u64 = 1 << 10;
pub const F_MQ: u64 = 1 << 12;
pub const F_DISCARD: u64 = 1 << 13;
pub const F_WRITE_ZEROES: u64 = 1 << 14;
/// vhost: the frontend may ask for dirty-page logging (live migration).
pub const F_LOG_ALL: u64 = 1 << 26;
pub const F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const F_RING_EVENT_IDX: u64 = 1 << 29;
pub const F_VERSION_1: u64 = 1 << 32;
/// vhost-user: the backend speaks protocol features.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Flag of a write-zeroes range: the device may deallocate.
pub const WZ_FLAG_UNMAP: u32 = 1;

/// Length of the request header (type, reserved, sector).
pub const HEADER_BYTES: u32 = 16;
/// Length of one discard / write-zeroes range.
pub const DISCARD_RANGE_BYTES: u32 = 16;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = 20;
pub const SECTOR_BYTES: u64 = 512;

/// Limits advertised to the driver and enforced on every request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Data descriptors per request.
    pub seg_max: u32,
    /// Bytes per data descriptor.
    pub size_max: u32,
    /// Bytes per read/write request.
    pub request_bytes_max: u64,
    pub discard_sectors_max: u32,
    pub discard_seg_max: u32,
}

impl Limits {
    pub fn for_queue_size(queue_size: u16) -> Limits {
        Limits {
            // Two descriptors of every chain are header and status.
            seg_max: u32::from(queue_size).saturating_sub(2).clamp(1, 254),
            size_max: 1 << 20,
            request_bytes_max: 4 << 20,
            discard_sectors_max: 1 << 18,
            discard_seg_max: 16,
        }
    }
}

/// The 60-byte `struct virtio_blk_config`, little-endian.
pub fn config_space(capacity_sectors: u64, num_queues: u16, limits: &Limits) -> Vec<u8> {
    let mut c = Vec::with_capacity(60);
    c.extend_from_slice(&capacity_sectors.to_le_bytes()); // 0 capacity
    c.extend_from_slice(&limits.size_max.to_le_bytes()); // 8 size_max
    c.extend_from_slice(&limits.seg_max.to_le_bytes()); // 12 seg_max
    c.extend_from_slice(&[0u8; 4]); // 16 geometry
    c.extend_from_slice(&512u32.to_le_bytes()); // 20 blk_size (logical)
    c.push(3); // 24 physical_block_exp: 512 << 3 = 4096
    c.push(0); // 25 alignment_offset
    c.extend_from_slice(&8u16.to_le_bytes()); // 26 min_io_size (in logical blocks) = 4 KiB
    c.extend_from_slice(&8u32.to_le_bytes()); // 28 opt_io_size = 4 KiB
    c.push(0); // 32 writeback
    c.push(0); // 33 unused
    c.extend_from_slice(&num_queues.to_le_bytes()); // 34 num_queues
    c.extend_from_slice(&limits.discard_sectors_max.to_le_bytes()); // 36 max_discard_sectors
    c.extend_from_slice(&limits.discard_seg_max.to_le_bytes()); // 40 max_discard_seg
    c.extend_from_slice(&8u32.to_le_bytes()); // 44 discard_sector_alignment
    c.extend_from_slice(&limits.discard_sectors_max.to_le_bytes()); // 48 max_write_zeroes_sectors
    c.extend_from_slice(&limits.discard_seg_max.to_le_bytes()); // 52 max_write_zeroes_seg
    c.push(1); // 56 write_zeroes_may_unmap
    c.extend_from_slice(&[0u8; 3]); // 57 unused
    debug_assert_eq!(c.len(), 60);
    c
}

/// A stable 20-byte serial for a volume (GET_ID): `raftblk-<id>` padded
/// with zeros, so it survives renames and daemon restarts.
pub fn serial(volume_id: u64) -> [u8; ID_BYTES] {
    let mut out = [0u8; ID_BYTES];
    let s = format!("raftblk-{volume_id}");
    let n = s.len().min(ID_BYTES);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_layout() {
        let l = Limits::for_queue_size(256);
        let c = config_space(2048, 2, &l);
        assert_eq!(c.len(), 60);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap_or_default()),
            2048
        );
        assert_eq!(
            u32::from_le_bytes(c[12..16].try_into().unwrap_or_default()),
            254
        );
        assert_eq!(c[24], 3);
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 2);
        assert_eq!(c[56], 1);
        assert_eq!(&serial(42)[..10], b"raftblk-42");
    }
}
