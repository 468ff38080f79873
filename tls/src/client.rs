//! The connecting side: tonic channels over TLS that present this side's
//! certificate (reloaded when its files change) and accept a server only
//! if its certificate chains to the CA, is not revoked, and carries the
//! `node` role. Server names are not checked: nodes are reached by
//! whatever address the cluster map holds, and what makes a server
//! trustworthy is a node certificate from the cluster's CA.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::files::{load_certs, load_crls, load_key, load_roots, Reloading, TlsFiles};
use crate::{role_of_cert, Role, TlsError};

/// How a client (or a node, towards its peers) connects.
#[derive(Clone)]
pub enum ClientSecurity {
    /// No TLS (only towards a cluster that runs without it).
    Plaintext,
    Tls(Arc<Reloading<ClientConfig>>),
}

impl std::fmt::Debug for ClientSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ClientSecurity::Plaintext => "Plaintext",
            ClientSecurity::Tls(_) => "Tls",
        })
    }
}

/// Accepts servers holding a `node` certificate from the CA, whatever
/// name they were reached by.
#[derive(Debug)]
struct NodeVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain, expiry and revocation are checked before the name:
        // a name mismatch means everything else held.
        match self
            .inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(e) => return Err(e),
        }
        match role_of_cert(end_entity) {
            (Some(Role::Node), _) => Ok(ServerCertVerified::assertion()),
            (role, subject) => Err(rustls::Error::General(format!(
                "the server's certificate ({subject}) is not a raftblk node certificate (role {})",
                role.map_or("none".to_owned(), |r| r.to_string())
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn build_client_config(f: &TlsFiles) -> Result<ClientConfig, TlsError> {
    let provider = crate::provider();
    let roots = load_roots(&f.ca)?;
    let mut verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone());
    if let Some(crl) = &f.crl {
        let crls = load_crls(crl)?;
        if !crls.is_empty() {
            verifier = verifier.with_crls(crls);
        }
    }
    let inner = verifier
        .build()
        .map_err(|e| TlsError::Config(format!("{}: {e}", f.ca.display())))?;
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NodeVerifier { inner }))
        .with_client_auth_cert(load_certs(&f.cert)?, load_key(&f.key)?)
        .map_err(|e| TlsError::Config(format!("{}: {e}", f.cert.display())))?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

impl ClientSecurity {
    /// TLS from `files`, reloaded when they change (call on a runtime).
    pub fn tls(files: TlsFiles) -> Result<ClientSecurity, TlsError> {
        let own = load_certs(&files.cert)?;
        if role_of_cert(&own[0]).0.is_none() {
            return Err(TlsError::Config(format!(
                "{}: the certificate names no raftblk role (a URI SAN raftblk:role:client, admin or node)",
                files.cert.display()
            )));
        }
        Ok(ClientSecurity::Tls(Reloading::watch(
            files,
            "client",
            build_client_config,
        )?))
    }

    /// TLS for node `node`'s own outgoing connections: like [`Self::tls`],
    /// but the certificate must be a `node` certificate naming `node`, at
    /// start and at every reload (a rotation to another node's certificate
    /// keeps the old one, rather than presenting an identity peers refuse).
    pub fn tls_for_node(files: TlsFiles, node: u64) -> Result<ClientSecurity, TlsError> {
        Ok(ClientSecurity::Tls(Reloading::watch(
            files,
            "client",
            move |f| {
                crate::server::check_node_cert(f, node)?;
                build_client_config(f)
            },
        )?))
    }

    /// TLS presenting no certificate at all (what a stranger does): for
    /// tests and diagnostics; nodes refuse it at the handshake.
    pub fn anonymous(ca: &std::path::Path) -> Result<ClientSecurity, TlsError> {
        let provider = crate::provider();
        let inner = WebPkiServerVerifier::builder_with_provider(load_roots(ca)?, provider.clone())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let mut cfg = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NodeVerifier { inner }))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(ClientSecurity::Tls(Reloading::fixed(cfg)))
    }

    /// Connects `endpoint` (an `http://host:port` endpoint: TLS, if on,
    /// is this connector's).
    pub async fn connect(&self, endpoint: Endpoint) -> Result<Channel, tonic::transport::Error> {
        match self {
            ClientSecurity::Plaintext => endpoint.connect().await,
            ClientSecurity::Tls(cfg) => {
                endpoint
                    .connect_with_connector(Connector { cfg: cfg.clone() })
                    .await
            }
        }
    }

    /// Like `connect`, connecting at the first request.
    pub fn connect_lazy(&self, endpoint: Endpoint) -> Channel {
        match self {
            ClientSecurity::Plaintext => endpoint.connect_lazy(),
            ClientSecurity::Tls(cfg) => {
                endpoint.connect_with_connector_lazy(Connector { cfg: cfg.clone() })
            }
        }
    }
}

/// TCP, then the TLS handshake with the current client config.
#[derive(Clone)]
struct Connector {
    cfg: Arc<Reloading<ClientConfig>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let cfg = self.cfg.get();
        Box::pin(async move {
            let host = uri.host().ok_or("no host in the endpoint")?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().ok_or("no port in the endpoint")?;
            let tcp = TcpStream::connect((host, port)).await?;
            let _ = tcp.set_nodelay(true);
            // Any name: the verifier checks the role, not the name.
            let name = ServerName::try_from("raftblk-node")?;
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}
