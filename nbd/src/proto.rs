//! The NBD wire format: magic numbers, option, command, flag and error
//! values (as the protocol document numbers them), the request header
//! parser and the encoders of option replies, simple replies and
//! structured reply chunks. Everything is big-endian on the wire.

use bytes::{BufMut, Bytes, BytesMut};

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the magic of every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

// Info types (NBD_OPT_INFO / NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured replies.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// base:allocation states.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context served.
pub const BASE_ALLOCATION: &str = "base:allocation";

// Error values (the protocol's own numbering).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ESHUTDOWN: u32 = 108;

/// Size of a request header.
pub const REQUEST_BYTES: usize = 28;

/// Block sizes advertised (NBD_INFO_BLOCK_SIZE): raftblk addresses
/// 512-byte sectors, stores 4 KiB blocks, and takes at most 32 MiB of
/// payload in one request.
pub const BLOCK_MIN: u32 = 512;
pub const BLOCK_PREFERRED: u32 = 4096;
pub const PAYLOAD_MAX: u32 = 32 << 20;

/// Longest string (export name, query, error message) the protocol
/// allows.
pub const STRING_MAX: usize = 4096;

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

/// Parses a request header; None if its magic is wrong (the stream cannot
/// be resynchronised then).
pub fn parse_request(b: &[u8; REQUEST_BYTES]) -> Option<Request> {
    let u16_at = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
    if u32_at(0) != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: u16_at(4),
        kind: u16_at(6),
        handle: u64_at(8),
        offset: u64_at(16),
        len: u32_at(24),
    })
}

/// Encodes a request header (the tests' client side).
pub fn encode_request(r: &Request) -> [u8; REQUEST_BYTES] {
    let mut b = [0u8; REQUEST_BYTES];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// An option reply of `kind` with `data`.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A simple reply header (read data, if any, follows it).
pub fn simple_reply(handle: u64, error: u32) -> Bytes {
    let mut b = BytesMut::with_capacity(16);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error);
    b.put_u64(handle);
    b.freeze()
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(handle: u64, flags: u16, kind: u16, len: u32) -> BytesMut {
    let mut b = BytesMut::with_capacity(20 + 12);
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(handle);
    b.put_u32(len);
    b
}

/// An NBD_REPLY_TYPE_ERROR chunk (final) with a message for the user.
pub fn error_chunk(handle: u64, error: u32, message: &str) -> Bytes {
    let mut end = message.len().min(STRING_MAX);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut b = chunk_header(
        handle,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    );
    b.put_u32(error);
    b.put_u16(msg.len() as u16);
    b.put_slice(msg);
    b.freeze()
}

/// An NBD_REPLY_TYPE_NONE chunk: the end of a structured reply.
pub fn done_chunk(handle: u64) -> Bytes {
    chunk_header(handle, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0).freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let mut b = encode_request(&r);
        assert_eq!(parse_request(&b), Some(r));
        b[0] ^= 1;
        assert_eq!(parse_request(&b), None);
    }

    #[test]
    fn error_chunk_cuts_long_messages_at_a_char() {
        let long = "é".repeat(STRING_MAX);
        let c = error_chunk(1, EIO, &long);
        let len = u32::from_be_bytes([c[16], c[17], c[18], c[19]]) as usize;
        assert_eq!(c.len(), 20 + len);
        let msg_len = u16::from_be_bytes([c[24], c[25]]) as usize;
        assert!(msg_len <= STRING_MAX);
        assert!(std::str::from_utf8(&c[26..26 + msg_len]).is_ok());
    }
}
