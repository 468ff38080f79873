//! Handshake tests: refused clients, every option, the bounds, and
//! NBD_OPT_EXPORT_NAME into simple I/O.

use super::*;

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
