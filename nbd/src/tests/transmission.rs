//! Transmission tests: hostile requests, read-only exports, one client
//! of a writable export, structured replies, concurrency.

use super::*;

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
