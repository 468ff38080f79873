//! Protocol tests: a small NBD client against the server over a tokio
//! UnixStream pair, with the in-memory backend. `handshake`: old
//! clients, every option, bounds; `transmission`: malformed, out of
//! range, unaligned, oversize, unknown commands and flags, read-only
//! EPERM, one writer, structured reads and block status, concurrency.

mod handshake;
mod transmission;

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
