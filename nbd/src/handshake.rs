//! The fixed newstyle handshake, server side: greeting, client flags
//! (clients without NBD_FLAG_C_FIXED_NEWSTYLE are refused), then option
//! haggling until the client enters transmission (NBD_OPT_GO or
//! NBD_OPT_EXPORT_NAME) or leaves (NBD_OPT_ABORT, disconnect).
//!
//! Options answered: EXPORT_NAME, ABORT, LIST, INFO and GO (NBD_INFO_EXPORT
//! and NBD_INFO_BLOCK_SIZE always, NAME and DESCRIPTION on request),
//! STRUCTURED_REPLY, LIST_META_CONTEXT and SET_META_CONTEXT (only
//! `base:allocation`), STARTTLS (refused: no TLS here); any other is
//! NBD_REP_ERR_UNSUP. Option data is bounded (`OPTION_DATA_MAX`; larger
//! is skipped and refused, far larger ends the connection) and so is
//! the number of options in one handshake.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::export::{Claim, Export};
use crate::proto::{self, *};

/// Largest option data read and parsed (a name of the protocol's
/// longest plus the fields around it).
pub const OPTION_DATA_MAX: u32 = 8192;
/// Largest option data skipped (and refused) instead of ending the
/// connection.
const OPTION_SKIP_MAX: u32 = 1 << 20;
/// Options one handshake may send.
pub const OPTIONS_MAX: u32 = 64;
/// The context id of `base:allocation` once selected.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// What the client negotiated, for the transmission phase.
#[derive(Debug)]
pub struct Session {
    pub structured: bool,
    /// `base:allocation` was selected (block status allowed).
    pub base_allocation: bool,
    pub claim: Claim,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(
        "client did not set NBD_FLAG_C_FIXED_NEWSTYLE (flags {0:#x}): old clients are not served"
    )]
    NotFixedNewstyle(u32),
    #[error("client set unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    BadMagic(u64),
    #[error("option {option} carries {len} bytes (more than the {max} allowed)")]
    OptionTooLong { option: u32, len: u32, max: u32 },
    #[error("more than {0} options in one handshake")]
    TooManyOptions(u32),
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME refused: {0}")]
    Refused(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Negotiation state of one connection.
struct State {
    structured: bool,
    base_allocation: bool,
}

/// Runs the handshake on `s` for `export`: Some(session) when the client
/// entered transmission, None when it aborted.
pub async fn handshake<S>(s: &mut S, export: &Export) -> Result<Option<Session>, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello).await?;
    s.flush().await?;
    let client = s.read_u32().await?;
    if client & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle(client));
    }
    if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::UnknownClientFlags(client));
    }
    let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
    let mut st = State {
        structured: false,
        base_allocation: false,
    };
    for _ in 0..OPTIONS_MAX {
        let magic = s.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadMagic(magic));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > OPTION_DATA_MAX {
            if option == OPT_EXPORT_NAME || len > OPTION_SKIP_MAX {
                return Err(HandshakeError::OptionTooLong {
                    option,
                    len,
                    max: OPTION_DATA_MAX,
                });
            }
            skip(s, len).await?;
            let msg = format!("option data of {len} bytes exceeds {OPTION_DATA_MAX}");
            reply(s, option, REP_ERR_TOO_BIG, msg.as_bytes()).await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                if !export.matches(&name) {
                    return Err(HandshakeError::UnknownExport(name));
                }
                let claim = export.claim().await.map_err(HandshakeError::Refused)?;
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&export.backend().size().to_be_bytes());
                b.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b).await?;
                s.flush().await?;
                return Ok(Some(st.session(claim)));
            }
            OPT_ABORT => {
                // The client may already be gone: its problem.
                let _ = reply(s, option, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    invalid(s, option, "NBD_OPT_LIST carries no data").await?;
                    continue;
                }
                let name = export.name().as_bytes();
                let mut d = Vec::with_capacity(4 + name.len());
                d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                d.extend_from_slice(name);
                reply(s, option, REP_SERVER, &d).await?;
                reply(s, option, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS => {
                reply(
                    s,
                    option,
                    REP_ERR_POLICY,
                    b"TLS is not configured on this server",
                )
                .await?;
            }
            OPT_INFO | OPT_GO => {
                if let Some(claim) = info_or_go(s, export, option, &data).await? {
                    return Ok(Some(st.session(claim)));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    invalid(s, option, "NBD_OPT_STRUCTURED_REPLY carries no data").await?;
                    continue;
                }
                st.structured = true;
                reply(s, option, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                meta_context(s, export, &mut st, option, &data).await?;
            }
            _ => {
                let msg = format!("option {option} is not supported");
                reply(s, option, REP_ERR_UNSUP, msg.as_bytes()).await?;
            }
        }
    }
    Err(HandshakeError::TooManyOptions(OPTIONS_MAX))
}

impl State {
    fn session(&self, claim: Claim) -> Session {
        Session {
            structured: self.structured,
            base_allocation: self.structured && self.base_allocation,
            claim,
        }
    }
}

async fn reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    s.write_all(&proto::option_reply(option, kind, data))
        .await?;
    s.flush().await
}

async fn invalid<S: AsyncWrite + Unpin>(s: &mut S, option: u32, msg: &str) -> std::io::Result<()> {
    reply(s, option, REP_ERR_INVALID, msg.as_bytes()).await
}

/// Reads and drops `len` bytes through a small buffer.
pub async fn skip<S: AsyncRead + Unpin>(s: &mut S, len: u32) -> std::io::Result<()> {
    let mut left = len as usize;
    let mut buf = vec![0u8; 64 << 10];
    while left > 0 {
        let n = left.min(buf.len());
        s.read_exact(&mut buf[..n]).await?;
        left -= n;
    }
    Ok(())
}

/// A cursor over option data whose every read is bounds-checked.
struct Fields<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let b = self.data.get(self.at..end)?;
        self.at = end;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A string of `u32` length (at most the protocol's longest).
    fn string(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        if n > STRING_MAX {
            return None;
        }
        self.take(n)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    }

    fn done(&self) -> bool {
        self.at == self.data.len()
    }
}

/// NBD_OPT_INFO / NBD_OPT_GO; for a GO the client got, returns its claim.
async fn info_or_go<S>(
    s: &mut S,
    export: &Export,
    option: u32,
    data: &[u8],
) -> std::io::Result<Option<Claim>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut f = Fields { data, at: 0 };
    let parsed = (|| {
        let name = f.string()?;
        let n = f.u16()?;
        let mut infos = Vec::with_capacity(usize::from(n).min(64));
        for _ in 0..n {
            infos.push(f.u16()?);
        }
        f.done().then_some((name, infos))
    })();
    let Some((name, infos)) = parsed else {
        invalid(s, option, "malformed NBD_OPT_INFO/NBD_OPT_GO data").await?;
        return Ok(None);
    };
    if !export.matches(&name) {
        let msg = format!(
            "no export named {name:?} (this server exports {:?})",
            export.name()
        );
        reply(s, option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
        return Ok(None);
    }
    let claim = if option == OPT_GO {
        match export.claim().await {
            Ok(c) => Some(c),
            Err(msg) => {
                if let Some(suppressed) = crate::ratelimit::client_errors().allow() {
                    tracing::warn!(
                        export = export.name(),
                        suppressed,
                        "refused a client: {msg}"
                    );
                }
                reply(s, option, REP_ERR_POLICY, msg.as_bytes()).await?;
                return Ok(None);
            }
        }
    } else {
        None
    };
    let mut e = Vec::with_capacity(12);
    e.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    e.extend_from_slice(&export.backend().size().to_be_bytes());
    e.extend_from_slice(&export.transmission_flags().to_be_bytes());
    reply(s, option, REP_INFO, &e).await?;
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    for v in [BLOCK_MIN, BLOCK_PREFERRED, PAYLOAD_MAX] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    reply(s, option, REP_INFO, &b).await?;
    if infos.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(export.name().as_bytes());
        reply(s, option, REP_INFO, &d).await?;
    }
    if infos.contains(&INFO_DESCRIPTION) {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(format!("raftblk volume {}", export.name()).as_bytes());
        reply(s, option, REP_INFO, &d).await?;
    }
    reply(s, option, REP_ACK, &[]).await?;
    Ok(claim)
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
async fn meta_context<S>(
    s: &mut S,
    export: &Export,
    st: &mut State,
    option: u32,
    data: &[u8],
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if !st.structured {
        return invalid(s, option, "negotiate structured replies first").await;
    }
    let mut f = Fields { data, at: 0 };
    let parsed = (|| {
        let name = f.string()?;
        let n = f.u32()?;
        // Each query takes at least its 4-byte length: `n` is bounded
        // by the data read.
        if n as usize > data.len() / 4 {
            return None;
        }
        let mut queries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            queries.push(f.string()?);
        }
        f.done().then_some((name, queries))
    })();
    let Some((name, queries)) = parsed else {
        return invalid(s, option, "malformed meta context query").await;
    };
    if !export.matches(&name) {
        let msg = format!("no export named {name:?}");
        return reply(s, option, REP_ERR_UNKNOWN, msg.as_bytes()).await;
    }
    let set = option == OPT_SET_META_CONTEXT;
    let wanted = if set {
        queries.iter().any(|q| q == BASE_ALLOCATION)
    } else {
        queries.is_empty() || queries.iter().any(|q| q == "base:" || q == BASE_ALLOCATION)
    };
    if set {
        // A set replaces the previous selection.
        st.base_allocation = wanted;
    }
    if wanted {
        let id = if set { BASE_ALLOCATION_ID } else { 0 };
        let mut d = id.to_be_bytes().to_vec();
        d.extend_from_slice(BASE_ALLOCATION.as_bytes());
        reply(s, option, REP_META_CONTEXT, &d).await?;
    }
    reply(s, option, REP_ACK, &[]).await
}
