//! The serving side: a listener that completes the TLS handshake of each
//! connection (client certificate required, chained to the CA, not
//! revoked, not expired) off the accept loop, and hands tonic connections
//! whose `PeerInfo` (address, role, subject) reaches every request as an
//! extension; and `RoleGate`, the tower layer that refuses a request
//! whose gRPC method needs more than the caller's role, naming both, with
//! a (rate-limited) log line naming the peer.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::files::{load_certs, load_crls, load_key, load_roots, Reloading, TlsFiles};
use crate::{cert_facts, Role, TlsError};

/// Longest a client may take to complete its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Handshakes under way at once; more connections wait to be accepted.
const HANDSHAKES_MAX: usize = 256;
/// Connections handshaken but not yet taken by the server.
const READY_QUEUE: usize = 1024;

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: Option<SocketAddr>,
    /// The certificate's role; None if it names none. Plaintext
    /// connections carry `Node`: without TLS the network is trusted.
    pub role: Option<Role>,
    /// The certificate's subject ("plaintext" without TLS).
    pub subject: String,
    /// Its serial number and end of validity: every request checks them
    /// against the current CRL and clock, so a connection opened before a
    /// revocation (or an expiry) cannot go on using the certificate.
    pub serial: Vec<u8>,
    pub not_after_unix: i64,
    /// The node its certificate names (`raftblk:node:ID`), if any.
    pub node_id: Option<u64>,
    /// Whether the connection is TLS (false: plaintext, trusted network).
    pub tls: bool,
}

impl PeerInfo {
    /// Ok if this peer may speak for node `node` (a raft stream's or a
    /// heartbeat's sender): over TLS only with a certificate naming that
    /// node, so one node's certificate cannot pose as another node;
    /// without TLS anyone may (the network is trusted). Else
    /// PERMISSION_DENIED saying whose certificate it is, and a
    /// (rate-limited) log line naming the peer.
    pub fn speaks_for(&self, node: u64) -> Result<(), tonic::Status> {
        if !self.tls || self.node_id == Some(node) {
            return Ok(());
        }
        let msg = match self.node_id {
            Some(id) => format!(
                "the certificate ({}) is node {id}'s; it may not speak for node {node}",
                self.subject
            ),
            None => format!(
                "the certificate ({}) names no node (raftblk:node:ID); it may not speak for node {node}",
                self.subject
            ),
        };
        denied(self.addr, &msg);
        Err(tonic::Status::permission_denied(msg))
    }

    /// Why this peer's certificate, accepted at its handshake, may no
    /// longer be used (revoked or expired since); None while it may. For
    /// long-lived streams, which pass the role gate once.
    pub fn no_longer_valid(&self) -> Option<&'static str> {
        no_longer_valid(self)
    }
}

/// The serials the server's current CRL revokes (one server per process;
/// replaced at each (re)load of the TLS files).
static REVOKED: std::sync::RwLock<Vec<Vec<u8>>> = std::sync::RwLock::new(Vec::new());

fn revoked(serial: &[u8]) -> bool {
    !serial.is_empty()
        && REVOKED
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|s| s == serial)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Why a certificate accepted at its handshake may no longer be used.
fn no_longer_valid(p: &PeerInfo) -> Option<&'static str> {
    if revoked(&p.serial) {
        Some("revoked since the connection was opened")
    } else if now_unix() > p.not_after_unix {
        Some("expired since the connection was opened")
    } else {
        None
    }
}

/// How a node accepts connections.
#[derive(Clone)]
pub enum ServerSecurity {
    /// No TLS: anyone who reaches the port may do anything (only with
    /// `insecure_plaintext = true`).
    Plaintext,
    Tls(Arc<Reloading<ServerConfig>>),
}

/// A node serves only with a `node` certificate naming it: checked at
/// start and at every reload (a rotation to another role's or another
/// node's certificate keeps the old one).
pub(crate) fn check_node_cert(f: &TlsFiles, node: u64) -> Result<(), TlsError> {
    let own = load_certs(&f.cert)?;
    let Some(first) = own.first() else {
        return Err(TlsError::Config(format!(
            "{}: no certificate in the file",
            f.cert.display()
        )));
    };
    let facts = cert_facts(first);
    if facts.role != Some(Role::Node) {
        return Err(TlsError::Config(format!(
            "{}: a node needs a certificate with the `node` role ({} has {})",
            f.cert.display(),
            facts.subject,
            facts.role.map_or("none".to_owned(), |r| r.to_string())
        )));
    }
    if facts.node_id != Some(node) {
        return Err(TlsError::Config(format!(
            "{}: {}; this is node {node} (issue one with `raftblk certs issue DIR NAME --role node --node-id {node}`)",
            f.cert.display(),
            facts
                .node_id
                .map_or("the certificate names no node".to_owned(), |n| format!(
                    "the certificate is node {n}'s"
                )),
        )));
    }
    Ok(())
}

fn build_server_config(f: &TlsFiles, node: u64) -> Result<ServerConfig, TlsError> {
    check_node_cert(f, node)?;
    let provider = crate::provider();
    let roots = load_roots(&f.ca)?;
    let mut verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    if let Some(crl) = &f.crl {
        let crls = load_crls(crl)?;
        if !crls.is_empty() {
            verifier = verifier.with_crls(crls);
        }
    }
    let verifier = verifier
        .build()
        .map_err(|e| TlsError::Config(format!("{}: {e}", f.ca.display())))?;
    let serials = match &f.crl {
        Some(crl) => crate::revoked_serials(&load_crls(crl)?),
        None => Vec::new(),
    };
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&f.cert)?, load_key(&f.key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", f.cert.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    // Only once everything loaded: the new CRL applies to live
    // connections from the next request on.
    *REVOKED.write().unwrap_or_else(|p| p.into_inner()) = serials;
    Ok(cfg)
}

impl ServerSecurity {
    /// TLS for node `node` from `files`, reloaded when they change (call
    /// on a runtime).
    pub fn tls(files: TlsFiles, node: u64) -> Result<ServerSecurity, TlsError> {
        Ok(ServerSecurity::Tls(Reloading::watch(
            files,
            "server",
            move |f| build_server_config(f, node),
        )?))
    }

    /// The connections `listener` accepts, handshaken (TLS) or as they are
    /// (plaintext), for `tonic::transport::Server::serve_with_incoming`.
    pub fn incoming(&self, listener: TcpListener) -> ReceiverStream<io::Result<Conn>> {
        let (tx, rx) = mpsc::channel(READY_QUEUE);
        let security = self.clone();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(HANDSHAKES_MAX));
            loop {
                let (stream, addr) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                match &security {
                    ServerSecurity::Plaintext => {
                        let peer = PeerInfo {
                            addr: Some(addr),
                            role: Some(Role::Node),
                            subject: "plaintext".into(),
                            serial: Vec::new(),
                            not_after_unix: i64::MAX,
                            node_id: None,
                            tls: false,
                        };
                        if tx.send(Ok(Conn::Plain(stream, peer))).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    ServerSecurity::Tls(cfg) => {
                        // Accept always, then close at once when every
                        // handshake slot is taken: idle strangers must not
                        // stop the accept loop (nodes and daemons retry).
                        let Ok(permit) = slots.clone().try_acquire_owned() else {
                            refused(addr, "too many handshakes under way");
                            drop(stream);
                            continue;
                        };
                        let acceptor = tokio_rustls::TlsAcceptor::from(cfg.get());
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let r =
                                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                                    .await;
                            match r {
                                Ok(Ok(tls)) => {
                                    let facts = tls
                                        .get_ref()
                                        .1
                                        .peer_certificates()
                                        .and_then(|c| c.first())
                                        .map(|c| cert_facts(c))
                                        .unwrap_or_default();
                                    let peer = PeerInfo {
                                        addr: Some(addr),
                                        role: facts.role,
                                        subject: facts.subject,
                                        serial: facts.serial,
                                        not_after_unix: facts.not_after_unix,
                                        node_id: facts.node_id,
                                        tls: true,
                                    };
                                    // The slot is held until the server
                                    // takes the connection.
                                    let _ = tx.send(Ok(Conn::Tls(Box::new(tls), peer))).await;
                                    drop(permit);
                                }
                                Ok(Err(e)) => refused(addr, &e.to_string()),
                                Err(_) => refused(addr, "handshake timed out"),
                            }
                        });
                    }
                }
            }
        });
        ReceiverStream::new(rx)
    }
}

/// Allows one log line per second about things peers cause (they control
/// how many), counting what it holds back.
struct OncePerSecond {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl OncePerSecond {
    const fn new() -> OncePerSecond {
        OncePerSecond {
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Some(lines held back since the last one) when a line may go out.
    fn allow(&self) -> Option<u64> {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1000;
        let last = self.last_ms.load(Ordering::Relaxed);
        if now >= last + 1000
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Logs a refused connection (rate-limited).
fn refused(addr: SocketAddr, why: &str) {
    static LOG: OncePerSecond = OncePerSecond::new();
    if let Some(suppressed) = LOG.allow() {
        tracing::warn!(peer = %addr, suppressed, "TLS connection refused: {why}");
    }
}

/// An accepted connection.
pub enum Conn {
    Plain(TcpStream, PeerInfo),
    Tls(Box<TlsStream<TcpStream>>, PeerInfo),
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        match self {
            Conn::Plain(_, p) | Conn::Tls(_, p) => p.clone(),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s, _) => s.is_write_vectored(),
            Conn::Tls(s, _) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s, _) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s, _) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The role a request's caller holds (None: its certificate names none).
pub fn caller_role<T>(req: &tonic::Request<T>) -> Option<Role> {
    req.extensions().get::<PeerInfo>().and_then(|p| p.role)
}

/// For checks finer than a method (inside a handler): Ok if the caller
/// holds `need`, else PERMISSION_DENIED naming `what` and both roles, and
/// a (rate-limited) log line naming the peer.
pub fn require<T>(req: &tonic::Request<T>, need: Role, what: &str) -> Result<(), tonic::Status> {
    let peer = req.extensions().get::<PeerInfo>();
    let have = peer.and_then(|p| p.role);
    if have.is_some_and(|r| r >= need) && peer.and_then(no_longer_valid).is_none() {
        return Ok(());
    }
    let msg = format!(
        "{what} needs the `{need}` role; the caller's certificate ({}) has `{}`",
        peer.map_or("", |p| p.subject.as_str()),
        have.map_or("none".to_owned(), |r| r.to_string())
    );
    denied(peer.and_then(|p| p.addr), &msg);
    Err(tonic::Status::permission_denied(msg))
}

/// The tower layer putting `RoleGate` in front of a server's services:
/// `required` maps a gRPC path (`/raftblk.v1.Volumes/Create`) to the least
/// role that may call it.
#[derive(Clone, Copy)]
pub struct RoleGateLayer {
    pub required: fn(&str) -> Role,
}

impl<S> tower_layer::Layer<S> for RoleGateLayer {
    type Service = RoleGate<S>;

    fn layer(&self, inner: S) -> RoleGate<S> {
        RoleGate {
            inner,
            required: self.required,
        }
    }
}

#[derive(Clone)]
pub struct RoleGate<S> {
    inner: S,
    required: fn(&str) -> Role,
}

impl<S, B> tower_service::Service<http::Request<B>> for RoleGate<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<futures::future::Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let need = (self.required)(path);
        let peer = req.extensions().get::<PeerInfo>();
        let have = peer.and_then(|p| p.role);
        let invalid = peer.and_then(no_longer_valid);
        if have.is_some_and(|r| r >= need) && invalid.is_none() {
            return futures::future::Either::Right(self.inner.call(req));
        }
        let (addr, subject) = peer.map_or((None, ""), |p| (p.addr, p.subject.as_str()));
        let msg = match (invalid, have) {
            (Some(why), _) => format!("{path}: the caller's certificate ({subject}) was {why}"),
            (None, have) => match have {
            Some(r) => format!("{path} needs the `{need}` role; the caller's certificate ({subject}) has `{r}`"),
            None => format!("{path} needs the `{need}` role; the caller's certificate ({subject}) names no raftblk role"),
            },
        };
        denied(addr, &msg);
        futures::future::Either::Left(futures::future::ready(Ok(
            tonic::Status::permission_denied(msg).into_http(),
        )))
    }
}

/// Logs a refused request (rate-limited), naming the peer.
fn denied(addr: Option<SocketAddr>, msg: &str) {
    static LOG: OncePerSecond = OncePerSecond::new();
    if let Some(suppressed) = LOG.allow() {
        let peer = addr.map_or("?".to_owned(), |a| a.to_string());
        tracing::warn!(peer, suppressed, "request refused: {msg}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_serves_only_with_its_own_node_certificate() {
        let dir = tempfile::tempdir().expect("dir");
        crate::certs::init_dir(dir.path(), &[1, 2, 3], Duration::from_secs(86_400)).expect("init");
        let files = |name: &str| TlsFiles {
            ca: dir.path().join("ca.pem"),
            cert: dir.path().join(format!("{name}.pem")),
            key: dir.path().join(format!("{name}.key")),
            crl: Some(dir.path().join("crl.pem")),
        };
        check_node_cert(&files("node3"), 3).expect("node 3's own certificate");
        let other = check_node_cert(&files("node3"), 2).expect_err("node 3's for node 2");
        assert!(other.to_string().contains("node 3's"), "{other}");
        let admin = check_node_cert(&files("admin"), 1).expect_err("an admin certificate");
        assert!(admin.to_string().contains("`node` role"), "{admin}");
    }
}
