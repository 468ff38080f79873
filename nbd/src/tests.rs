//! Protocol tests: a small NBD client against the server over a tokio
//! UnixStream pair, with the in-memory backend. Handshake (old clients,
//! every option, bounds), transmission (malformed, out of range,
//! unaligned, oversize, unknown commands and flags, read-only EPERM,
//! structured reads and block status, concurrency).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::backend::{Backend, BackendResult, MemBackend};
use crate::export::Export;
use crate::handshake::{handshake, HandshakeError, OPTIONS_MAX};
use crate::proto::{self, *};
use crate::transmission::{serve, Limits, Stats};

const SIZE: usize = 8 << 20;
const T: Duration = Duration::from_secs(20);

type ServerResult = Result<Option<Stats>, String>;

/// Runs the server's side of one connection on `srv`.
fn spawn_server(srv: UnixStream, export: Arc<Export>) -> tokio::task::JoinHandle<ServerResult> {
    tokio::spawn(async move {
        let mut srv = srv;
        match handshake(&mut srv, &export).await {
            Ok(Some(session)) => serve(srv, export, session, Limits::default())
                .await
                .map(Some)
                .map_err(|e| e.to_string()),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    })
}

struct C {
    s: UnixStream,
}

struct Chunk {
    flags: u16,
    kind: u16,
    handle: u64,
    payload: Vec<u8>,
}

impl C {
    /// Connects to a new server connection of `export`.
    async fn connect(export: &Arc<Export>) -> (C, tokio::task::JoinHandle<ServerResult>) {
        let (cli, srv) = UnixStream::pair().expect("socketpair");
        (C { s: cli }, spawn_server(srv, export.clone()))
    }

    async fn greet(&mut self, flags: u32) -> u16 {
        let mut b = [0u8; 18];
        self.s.read_exact(&mut b).await.expect("greeting");
        assert_eq!(&b[0..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&b[8..16], &IHAVEOPT.to_be_bytes());
        self.s.write_u32(flags).await.expect("flags");
        u16::from_be_bytes([b[16], b[17]])
    }

    async fn send_opt(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.expect("option");
    }

    /// Replies to `option` up to the final one (ACK or an error).
    async fn replies(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            assert_eq!(self.s.read_u64().await.expect("reply"), OPTION_REPLY_MAGIC);
            assert_eq!(self.s.read_u32().await.expect("reply"), option);
            let kind = self.s.read_u32().await.expect("reply");
            let len = self.s.read_u32().await.expect("reply");
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d).await.expect("reply data");
            out.push((kind, d));
            if kind == REP_ACK || kind & (1 << 31) != 0 {
                return out;
            }
        }
    }

    async fn opt(&mut self, option: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.send_opt(option, data).await;
        self.replies(option).await
    }

    /// Greets, negotiates structured replies and base:allocation if
    /// `structured`, and enters transmission with NBD_OPT_GO.
    async fn go(&mut self, name: &str, structured: bool) -> Vec<(u32, Vec<u8>)> {
        self.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        if structured {
            assert_eq!(self.opt(OPT_STRUCTURED_REPLY, &[]).await[0].0, REP_ACK);
            let r = self
                .opt(OPT_SET_META_CONTEXT, &meta_data(name, &[BASE_ALLOCATION]))
                .await;
            assert_eq!(r.len(), 2);
            assert_eq!(r[0].0, REP_META_CONTEXT);
        }
        self.opt(OPT_GO, &go_data(name, &[])).await
    }

    async fn request(&mut self, kind: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        let r = proto::Request {
            flags,
            kind,
            handle,
            offset,
            len,
        };
        self.s
            .write_all(&proto::encode_request(&r))
            .await
            .expect("request");
    }

    /// A simple reply: (error, handle).
    async fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.s.read_u32().await.expect("reply"), SIMPLE_REPLY_MAGIC);
        let err = self.s.read_u32().await.expect("reply");
        (err, self.s.read_u64().await.expect("reply"))
    }

    async fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut d = vec![0u8; n];
        self.s.read_exact(&mut d).await.expect("data");
        d
    }

    async fn chunk(&mut self) -> Chunk {
        assert_eq!(
            self.s.read_u32().await.expect("chunk"),
            STRUCTURED_REPLY_MAGIC
        );
        let flags = self.s.read_u16().await.expect("chunk");
        let kind = self.s.read_u16().await.expect("chunk");
        let handle = self.s.read_u64().await.expect("chunk");
        let len = self.s.read_u32().await.expect("chunk");
        let payload = self.bytes(len as usize).await;
        Chunk {
            flags,
            kind,
            handle,
            payload,
        }
    }

    /// Chunks of one structured reply, up to the final one.
    async fn structured(&mut self) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            let c = self.chunk().await;
            let done = c.flags & REPLY_FLAG_DONE != 0;
            out.push(c);
            if done {
                return out;
            }
        }
    }

    async fn write(&mut self, handle: u64, offset: u64, data: &[u8], flags: u16) {
        self.request(CMD_WRITE, flags, handle, offset, data.len() as u32)
            .await;
        self.s.write_all(data).await.expect("payload");
    }

    async fn disc(mut self, server: tokio::task::JoinHandle<ServerResult>) -> Stats {
        self.request(CMD_DISC, 0, 0, 0, 0).await;
        let r = tokio::time::timeout(T, server).await;
        r.expect("server ends")
            .expect("join")
            .expect("ok")
            .expect("served")
    }
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q.as_bytes());
    }
    d
}

fn mem_export(read_only: bool) -> (Arc<MemBackend>, Arc<Export>) {
    let m = Arc::new(MemBackend::new(SIZE));
    let e = Export::new("vol", m.clone(), read_only).with_claim_wait(Duration::from_millis(100));
    (m, Arc::new(e))
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u8).wrapping_mul(31) ^ seed) | 1)
        .collect()
}

#[tokio::test]
async fn old_and_odd_clients_are_refused() {
    let (_, e) = mem_export(false);
    // No NBD_FLAG_C_FIXED_NEWSTYLE: an old newstyle client.
    let (mut c, srv) = C::connect(&e).await;
    assert_eq!(c.greet(0).await, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    let r = srv.await.expect("join");
    assert!(
        matches!(&r, Err(m) if m.contains("FIXED_NEWSTYLE")),
        "{r:?}"
    );
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).await.unwrap_or(1), 0, "closed");
    // Unknown client flags.
    let (mut c, srv) = C::connect(&e).await;
    c.greet(FLAG_C_FIXED_NEWSTYLE | 0x100).await;
    assert!(srv.await.expect("join").is_err());
    // A bad option magic.
    let (mut c, srv) = C::connect(&e).await;
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.s.write_all(&[0u8; 16]).await.expect("write");
    let r = srv.await.expect("join");
    assert!(matches!(&r, Err(m) if m.contains("magic")), "{r:?}");
}

#[tokio::test]
async fn options_list_info_unknown_and_bounds() {
    let (_, e) = mem_export(false);
    let (mut c, srv) = C::connect(&e).await;
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    // LIST: the one export.
    let r = c.opt(OPT_LIST, &[]).await;
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].0, REP_SERVER);
    assert_eq!(&r[0].1, &[0, 0, 0, 3, b'v', b'o', b'l']);
    assert_eq!(c.opt(OPT_LIST, b"x").await[0].0, REP_ERR_INVALID);
    // Unknown options, extended headers among them, and STARTTLS.
    for o in [11u32, 4, 99, u32::MAX] {
        assert_eq!(c.opt(o, b"abc").await[0].0, REP_ERR_UNSUP, "option {o}");
    }
    assert_eq!(c.opt(OPT_STARTTLS, &[]).await[0].0, REP_ERR_POLICY);
    // INFO: export size and flags, block sizes, the name on request.
    let r = c.opt(OPT_INFO, &go_data("vol", &[INFO_NAME])).await;
    assert_eq!(r.last().map(|x| x.0), Some(REP_ACK));
    let infos: Vec<&Vec<u8>> = r.iter().filter(|x| x.0 == REP_INFO).map(|x| &x.1).collect();
    let export = infos
        .iter()
        .find(|d| d[0..2] == INFO_EXPORT.to_be_bytes())
        .expect("export");
    assert_eq!(export.len(), 12);
    assert_eq!(
        u64::from_be_bytes(export[2..10].try_into().unwrap_or_default()),
        SIZE as u64
    );
    let flags = u16::from_be_bytes([export[10], export[11]]);
    assert_eq!(flags & FLAG_READ_ONLY, 0);
    assert_ne!(flags & FLAG_SEND_WRITE_ZEROES, 0);
    let bs = infos
        .iter()
        .find(|d| d[0..2] == INFO_BLOCK_SIZE.to_be_bytes())
        .expect("block size");
    let v = |i: usize| u32::from_be_bytes(bs[i..i + 4].try_into().unwrap_or_default());
    assert_eq!((v(2), v(6), v(10)), (512, 4096, 32 << 20));
    assert!(infos
        .iter()
        .any(|d| d[..] == [&[0u8, 1][..], b"vol"].concat()[..]));
    // The default (empty) name is this export; others are unknown.
    assert_eq!(
        c.opt(OPT_INFO, &go_data("", &[])).await.last().map(|x| x.0),
        Some(REP_ACK)
    );
    assert_eq!(
        c.opt(OPT_GO, &go_data("nope", &[])).await[0].0,
        REP_ERR_UNKNOWN
    );
    // Malformed INFO data: a name longer than the data, trailing bytes,
    // a count of infos the data does not hold.
    let mut bad = go_data("vol", &[]);
    bad[3] = 200;
    assert_eq!(c.opt(OPT_INFO, &bad).await[0].0, REP_ERR_INVALID);
    let mut bad = go_data("vol", &[]);
    bad.push(0);
    assert_eq!(c.opt(OPT_GO, &bad).await[0].0, REP_ERR_INVALID);
    let mut bad = go_data("vol", &[]);
    let n = bad.len();
    bad[n - 1] = 5;
    assert_eq!(c.opt(OPT_GO, &bad).await[0].0, REP_ERR_INVALID);
    // Meta contexts need structured replies first; then only
    // base:allocation is known.
    let q = meta_data("vol", &[BASE_ALLOCATION]);
    assert_eq!(c.opt(OPT_SET_META_CONTEXT, &q).await[0].0, REP_ERR_INVALID);
    assert_eq!(
        c.opt(OPT_STRUCTURED_REPLY, b"x").await[0].0,
        REP_ERR_INVALID
    );
    assert_eq!(c.opt(OPT_STRUCTURED_REPLY, &[]).await[0].0, REP_ACK);
    let r = c.opt(OPT_LIST_META_CONTEXT, &meta_data("vol", &[])).await;
    assert_eq!(r.len(), 2);
    assert_eq!(&r[0].1[4..], BASE_ALLOCATION.as_bytes());
    let r = c
        .opt(
            OPT_LIST_META_CONTEXT,
            &meta_data("vol", &["qemu:dirty-bitmap:x"]),
        )
        .await;
    assert_eq!(r.len(), 1);
    let r = c
        .opt(OPT_SET_META_CONTEXT, &meta_data("vol", &["base:", "x:y"]))
        .await;
    assert_eq!(r.len(), 1, "a namespace alone selects nothing");
    assert_eq!(
        c.opt(OPT_SET_META_CONTEXT, &meta_data("other", &[])).await[0].0,
        REP_ERR_UNKNOWN
    );
    let mut bad = meta_data("vol", &[BASE_ALLOCATION]);
    bad[11] = 0xff; // the query count far beyond the data
    assert_eq!(
        c.opt(OPT_SET_META_CONTEXT, &bad).await[0].0,
        REP_ERR_INVALID
    );
    // Option data over the bound is skipped and refused.
    assert_eq!(
        c.opt(OPT_GO, &vec![7u8; 10_000]).await[0].0,
        REP_ERR_TOO_BIG
    );
    // Abort: ACK, and the server ends the connection.
    assert_eq!(c.opt(OPT_ABORT, &[]).await[0].0, REP_ACK);
    assert!(matches!(srv.await.expect("join"), Ok(None)));
}

#[tokio::test]
async fn handshake_bounds_end_the_connection() {
    let (_, e) = mem_export(false);
    // Too many options.
    let (mut c, srv) = C::connect(&e).await;
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    for _ in 0..OPTIONS_MAX {
        c.opt(99, &[]).await;
    }
    // The server may be gone before this one is written.
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&[0, 0, 0, 99, 0, 0, 0, 0]);
    let _ = c.s.write_all(&b).await;
    let r = srv.await.expect("join");
    assert!(matches!(&r, Err(m) if m.contains("options")), "{r:?}");
    // An option claiming gigabytes of data.
    let (mut c, srv) = C::connect(&e).await;
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    let _ = c.s.write_all(&b).await;
    assert!(srv.await.expect("join").is_err());
    // EXPORT_NAME of an unknown export: the session ends (it cannot
    // carry an error).
    let (mut c, srv) = C::connect(&e).await;
    c.greet(FLAG_C_FIXED_NEWSTYLE).await;
    c.send_opt(OPT_EXPORT_NAME, b"nope").await;
    let r = srv.await.expect("join");
    let mut b = [0u8; 1];
    assert_eq!(c.s.read(&mut b).await.unwrap_or(0), 0, "closed");
    assert!(
        matches!(r, Err(ref m) if m.contains("unknown export")),
        "{r:?}"
    );
    let _ = HandshakeError::TooManyOptions(0);
}

#[tokio::test]
async fn export_name_then_simple_io() {
    let (m, e) = mem_export(false);
    let (mut c, srv) = C::connect(&e).await;
    c.greet(FLAG_C_FIXED_NEWSTYLE).await; // zeroes wanted
    c.send_opt(OPT_EXPORT_NAME, b"").await;
    assert_eq!(c.s.read_u64().await.expect("size"), SIZE as u64);
    let flags = c.s.read_u16().await.expect("flags");
    assert_ne!(flags & FLAG_SEND_FUA, 0);
    assert_eq!(c.bytes(124).await, vec![0u8; 124]);
    let data = pattern(64 << 10, 3);
    c.write(1, 4096, &data, CMD_FLAG_FUA).await;
    assert_eq!(c.simple().await, (0, 1));
    assert_eq!(m.flushes.load(Ordering::Relaxed), 1, "FUA flushed");
    c.request(CMD_READ, 0, 2, 4096, 64 << 10).await;
    assert_eq!(c.simple().await, (0, 2));
    assert_eq!(c.bytes(64 << 10).await, data);
    c.request(CMD_FLUSH, 0, 3, 0, 0).await;
    assert_eq!(c.simple().await, (0, 3));
    c.request(CMD_TRIM, 0, 4, 4096, 4096).await;
    assert_eq!(c.simple().await, (0, 4));
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 5, 8192, 512)
        .await;
    assert_eq!(c.simple().await, (0, 5));
    assert_eq!(m.snapshot(4096, 4096 + 512), vec![0u8; 4096 + 512]);
    assert_eq!(
        m.snapshot(8192 + 512, 8),
        data[4096 + 512..4096 + 520].to_vec()
    );
    let st = c.disc(srv).await;
    assert!(st.soft_disconnect);
    assert_eq!(st.requests, 6);
}

#[tokio::test]
async fn hostile_requests_get_errors_and_the_connection_goes_on() {
    let (m, e) = mem_export(false);
    let (mut c, srv) = C::connect(&e).await;
    assert_eq!(c.go("vol", false).await.last().map(|x| x.0), Some(REP_ACK));
    let size = SIZE as u64;
    let cases: Vec<(u16, u16, u64, u32, u32)> = vec![
        (CMD_READ, 0, 1, 512, EINVAL),               // unaligned offset
        (CMD_READ, 0, 0, 100, EINVAL),               // unaligned length
        (CMD_READ, 0, size - 512, 1024, EINVAL),     // past the end
        (CMD_READ, 0, u64::MAX - 511, 4096, EINVAL), // wraps
        (CMD_READ, 0, 0, PAYLOAD_MAX + 512, EINVAL), // oversize
        (CMD_TRIM, 0, size, 512, EINVAL),            // past the end
        (CMD_WRITE_ZEROES, 0, size - 512, 1024, ENOSPC),
        (5, 0, 0, 512, EINVAL),                       // CACHE: not offered
        (8, 0, 0, 0, EINVAL),                         // RESIZE
        (0xffff, 0, 0, 0, EINVAL),                    // unknown
        (CMD_READ, 1 << 2, 0, 512, EINVAL),           // DF: not offered
        (CMD_TRIM, CMD_FLAG_REQ_ONE, 0, 512, EINVAL), // flag of another command
        (CMD_BLOCK_STATUS, 0, 0, 512, EINVAL),        // no meta context
    ];
    for (i, (kind, flags, offset, len, errno)) in cases.into_iter().enumerate() {
        c.request(kind, flags, 100 + i as u64, offset, len).await;
        assert_eq!(c.simple().await, (errno, 100 + i as u64), "case {i}");
    }
    // Refused writes: their payload is skipped, whatever its size.
    let bad_writes: Vec<(u64, u32, u32)> = vec![
        (size - 512, 1024, ENOSPC),
        (100, 512, EINVAL),
        (0, PAYLOAD_MAX + 4096, EINVAL),
    ];
    for (i, (offset, len, errno)) in bad_writes.into_iter().enumerate() {
        let payload = vec![0xeeu8; len as usize];
        c.write(200 + i as u64, offset, &payload, 0).await;
        assert_eq!(c.simple().await, (errno, 200 + i as u64), "write {i}");
    }
    assert!(
        m.snapshot(0, SIZE).iter().all(|&b| b == 0),
        "nothing written"
    );
    // Zero-length requests are no-ops.
    c.request(CMD_READ, 0, 300, size, 0).await;
    assert_eq!(c.simple().await, (0, 300));
    // The connection still works; a bad magic then ends it.
    c.write(301, 0, &[1u8; 512], 0).await;
    assert_eq!(c.simple().await, (0, 301));
    c.s.write_all(&[0xffu8; REQUEST_BYTES])
        .await
        .expect("write");
    let r = tokio::time::timeout(T, srv)
        .await
        .expect("ends")
        .expect("join");
    assert!(matches!(&r, Err(m) if m.contains("magic")), "{r:?}");
}

#[tokio::test]
async fn read_only_export_refuses_writes_and_serves_many() {
    let (m, e) = mem_export(true);
    let (mut c1, s1) = C::connect(&e).await;
    let (mut c2, s2) = C::connect(&e).await;
    c1.greet(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let r = c1.opt(OPT_GO, &go_data("vol", &[])).await;
    let flags = u16::from_be_bytes([r[0].1[10], r[0].1[11]]);
    assert_ne!(flags & FLAG_READ_ONLY, 0);
    assert_ne!(flags & FLAG_CAN_MULTI_CONN, 0);
    assert_eq!(c2.go("vol", true).await.last().map(|x| x.0), Some(REP_ACK));
    c1.write(1, 0, &[5u8; 4096], 0).await;
    assert_eq!(c1.simple().await, (EPERM, 1));
    c1.request(CMD_TRIM, 0, 2, 0, 4096).await;
    assert_eq!(c1.simple().await, (EPERM, 2));
    c1.request(CMD_WRITE_ZEROES, 0, 3, 0, 4096).await;
    assert_eq!(c1.simple().await, (EPERM, 3));
    // Structured: the error comes as an error chunk with a message.
    c2.write(4, 0, &[5u8; 512], 0).await;
    let ch = c2.structured().await;
    assert_eq!(ch.len(), 1);
    assert_eq!((ch[0].kind, ch[0].handle), (REPLY_TYPE_ERROR, 4));
    assert_eq!(&ch[0].payload[0..4], &EPERM.to_be_bytes());
    assert!(String::from_utf8_lossy(&ch[0].payload[6..]).contains("read-only"));
    c1.request(CMD_READ, 0, 5, 0, 4096).await;
    assert_eq!(c1.simple().await, (0, 5));
    assert_eq!(c1.bytes(4096).await, vec![0u8; 4096]);
    assert!(m.snapshot(0, 4096).iter().all(|&b| b == 0));
    c1.disc(s1).await;
    c2.disc(s2).await;
}

#[tokio::test]
async fn writable_export_serves_one_client_at_a_time() {
    let (_, e) = mem_export(false);
    let (mut c1, s1) = C::connect(&e).await;
    assert_eq!(c1.go("vol", false).await.last().map(|x| x.0), Some(REP_ACK));
    let (mut c2, s2) = C::connect(&e).await;
    let r = c2.go("vol", false).await;
    assert_eq!(r[0].0, REP_ERR_POLICY);
    assert!(String::from_utf8_lossy(&r[0].1).contains("in use by another client"));
    // INFO still answers; once the first client left, GO succeeds.
    assert_eq!(
        c2.opt(OPT_INFO, &go_data("vol", &[]))
            .await
            .last()
            .map(|x| x.0),
        Some(REP_ACK)
    );
    c1.disc(s1).await;
    assert_eq!(
        c2.opt(OPT_GO, &go_data("vol", &[]))
            .await
            .last()
            .map(|x| x.0),
        Some(REP_ACK)
    );
    c2.disc(s2).await;
}

#[tokio::test]
async fn structured_reads_holes_and_block_status() {
    let (m, e) = mem_export(false);
    let (mut c, srv) = C::connect(&e).await;
    assert_eq!(c.go("vol", true).await.last().map(|x| x.0), Some(REP_ACK));
    // Data at [8K, 12K) and [20K, 21K); the rest is zero.
    let d1 = pattern(4096, 1);
    let d2 = pattern(1024, 2);
    c.write(1, 8192, &d1, 0).await;
    assert_eq!(c.simple().await, (0, 1));
    c.write(2, 20480, &d2, 0).await;
    assert_eq!(c.simple().await, (0, 2));
    // A read of [512, 28K) comes back as data and hole chunks that
    // reassemble to the disk's bytes.
    let (off, len) = (512u64, 28672u32 - 512);
    c.request(CMD_READ, 0, 3, off, len).await;
    let chunks = c.structured().await;
    let mut got = vec![0xaau8; len as usize];
    let mut covered = 0u64;
    let mut holes = 0;
    for ch in &chunks {
        assert_eq!(ch.handle, 3);
        let at = u64::from_be_bytes(ch.payload[0..8].try_into().unwrap_or_default()) - off;
        match ch.kind {
            REPLY_TYPE_OFFSET_DATA => {
                let n = ch.payload.len() - 8;
                got[at as usize..at as usize + n].copy_from_slice(&ch.payload[8..]);
                covered += n as u64;
            }
            REPLY_TYPE_OFFSET_HOLE => {
                let n = u32::from_be_bytes(ch.payload[8..12].try_into().unwrap_or_default());
                assert_eq!(at % 4096, 4096 - 512, "holes are whole blocks");
                got[at as usize..at as usize + n as usize].fill(0);
                covered += u64::from(n);
                holes += 1;
            }
            k => panic!("chunk type {k}"),
        }
    }
    assert_eq!(covered, u64::from(len));
    assert!(holes >= 2, "{holes} holes");
    assert_eq!(got, m.snapshot(off as usize, len as usize));
    // Block status: hole, data, hole, data (partial block), hole.
    c.request(CMD_BLOCK_STATUS, 0, 4, 0, 32768).await;
    let ch = c.structured().await;
    assert_eq!((ch.len(), ch[0].kind), (1, REPLY_TYPE_BLOCK_STATUS));
    let p = &ch[0].payload;
    let w = |i: usize| u32::from_be_bytes(p[i..i + 4].try_into().unwrap_or_default());
    assert_eq!(w(0), crate::handshake::BASE_ALLOCATION_ID);
    let ext: Vec<(u32, u32)> = (0..(p.len() - 4) / 8)
        .map(|i| (w(4 + 8 * i), w(8 + 8 * i)))
        .collect();
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        ext,
        vec![(8192, hz), (4096, 0), (8192, hz), (4096, 0), (8192, hz)]
    );
    // REQ_ONE: one extent.
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 5, 0, 32768)
        .await;
    let ch = c.structured().await;
    assert_eq!(ch[0].payload.len(), 12);
    // A query longer than one scan is answered for a prefix.
    let whole = SIZE as u32;
    c.request(CMD_BLOCK_STATUS, 0, 6, 0, whole).await;
    let p = c.structured().await.remove(0).payload;
    let sum: u64 = (0..(p.len() - 4) / 8)
        .map(|i| {
            u64::from(u32::from_be_bytes(
                p[4 + 8 * i..8 + 8 * i].try_into().unwrap_or_default(),
            ))
        })
        .sum();
    assert!(sum > 0 && sum <= u64::from(whole), "{sum}");
    // Past the end: EINVAL as an error chunk.
    c.request(CMD_BLOCK_STATUS, 0, 7, SIZE as u64 - 4096, 8192)
        .await;
    let ch = c.structured().await;
    assert_eq!(ch[0].kind, REPLY_TYPE_ERROR);
    assert_eq!(&ch[0].payload[0..4], &EINVAL.to_be_bytes());
    // A structured read refused early is an error chunk too.
    c.request(CMD_READ, 0, 8, 3, 512).await;
    let ch = c.structured().await;
    assert_eq!((ch.len(), ch[0].kind), (1, REPLY_TYPE_ERROR));
    // Flush and write replies may stay simple.
    c.request(CMD_FLUSH, 0, 9, 0, 0).await;
    assert_eq!(c.simple().await, (0, 9));
    c.disc(srv).await;
}

/// A backend whose reads take a while and count how many run at once.
struct Slow {
    inner: MemBackend,
    now: AtomicUsize,
    max: AtomicUsize,
}

impl Backend for Slow {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read(&self, offset: u64, len: u32) -> BackendResult<'_, Vec<u8>> {
        Box::pin(async move {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            self.inner.read(offset, len).await
        })
    }
    fn write(&self, offset: u64, data: Bytes) -> BackendResult<'_, ()> {
        self.inner.write(offset, data)
    }
    fn write_zeroes(&self, offset: u64, len: u32) -> BackendResult<'_, ()> {
        self.inner.write_zeroes(offset, len)
    }
    fn trim(&self, offset: u64, len: u32) -> BackendResult<'_, ()> {
        self.inner.trim(offset, len)
    }
    fn flush(&self) -> BackendResult<'_, ()> {
        self.inner.flush()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_run_concurrently_within_the_bound() {
    let slow = Arc::new(Slow {
        inner: MemBackend::new(SIZE),
        now: AtomicUsize::new(0),
        max: AtomicUsize::new(0),
    });
    let e = Arc::new(Export::new("vol", slow.clone(), true));
    let (mut c, srv) = C::connect(&e).await;
    c.go("vol", false).await;
    let n = 200u64;
    for h in 0..n {
        c.request(CMD_READ, 0, h, (h % 64) * 4096, 4096).await;
    }
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (err, h) = c.simple().await;
        assert_eq!(err, 0);
        c.bytes(4096).await;
        assert!(
            !std::mem::replace(&mut seen[h as usize], true),
            "handle {h} twice"
        );
    }
    let max = slow.max.load(Ordering::SeqCst);
    assert!(
        max > 8 && max <= Limits::default().in_flight_max,
        "{max} in flight"
    );
    let st = c.disc(srv).await;
    assert_eq!(st.requests, n + 1);
}
