//! The stored form of a 4 KiB block: a CRC32 (crc32fast) followed by the
//! data. Every read verifies the checksum; a mismatch is an error, never
//! data.

use raftblk_proto::BLOCK_BYTES;

/// Stored value length: 4-byte little-endian CRC32 + 4096 data bytes.
pub const STORED_BLOCK_BYTES: usize = 4 + BLOCK_BYTES as usize;

/// A stored block whose bytes do not match their checksum.
#[derive(Debug, thiserror::Error)]
#[error(
    "block checksum mismatch (stored {stored:#010x}, computed {computed:#010x}, length {length})"
)]
pub struct ChecksumError {
    pub stored: u32,
    pub computed: u32,
    pub length: usize,
}

/// Encodes 4096 data bytes into their stored form.
pub fn encode(data: &[u8]) -> Vec<u8> {
    assert_eq!(data.len(), BLOCK_BYTES as usize, "blocks are 4 KiB");
    let mut v = Vec::with_capacity(STORED_BLOCK_BYTES);
    v.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    v.extend_from_slice(data);
    v
}

/// Encodes a block whose content is known to be unreliable (merged over a
/// corrupt base): the stored checksum deliberately does not match, so every
/// read and the scrubber treat it as corrupt until it is repaired.
pub fn encode_poisoned(data: &[u8]) -> Vec<u8> {
    let mut v = encode(data);
    v[0] ^= 0xff;
    v
}

/// The stored form of a clone's zeroed block (a whiteout): an empty value,
/// so the block reads as zeros rather than as the parent's.
pub const WHITEOUT: &[u8] = &[];

static ZEROS: [u8; BLOCK_BYTES as usize] = [0; BLOCK_BYTES as usize];

/// Verifies a stored block and returns its data bytes (zeros for a
/// whiteout).
pub fn decode(stored: &[u8]) -> Result<&[u8], ChecksumError> {
    if stored.is_empty() {
        return Ok(&ZEROS);
    }
    if stored.len() != STORED_BLOCK_BYTES {
        return Err(ChecksumError {
            stored: 0,
            computed: 0,
            length: stored.len(),
        });
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&stored[..4]);
    let stored_crc = u32::from_le_bytes(crc);
    let data = &stored[4..];
    let computed = crc32fast::hash(data);
    if computed != stored_crc {
        return Err(ChecksumError {
            stored: stored_crc,
            computed,
            length: stored.len(),
        });
    }
    Ok(data)
}

/// True when every byte is zero (such blocks are not stored: thin volumes).
pub fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_detects_flips() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut stored = encode(&data);
        assert_eq!(decode(&stored).expect("valid"), &data[..]);
        stored[100] ^= 0x10;
        assert!(decode(&stored).is_err());
        stored[100] ^= 0x10;
        stored[1] ^= 1;
        assert!(decode(&stored).is_err());
        assert!(decode(&stored[..10]).is_err());
        assert!(decode(&encode_poisoned(&data)).is_err());
        assert!(is_zero(&[0; 4096]));
        assert!(!is_zero(&data));
    }
}
