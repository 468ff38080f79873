//! Mutual TLS for every raftblk connection (node ↔ node, CLI and daemons
//! → node). Each certificate is signed by the cluster's CA and names one
//! role in a URI subject alternative name, `raftblk:role:<role>`:
//!
//! - `client`: block I/O, attach leases, snapshot cuts, reading volumes
//!   and the cluster's state: what raftblk-vhost and raftblk-nbd need;
//! - `admin`: all of `client`, plus catalog and membership changes;
//! - `node`: everything, including raft and snapshot messages.
//!
//! Parts: `files` (the PEM files a config names, loaded and watched for
//! changes), `server` (a TLS listener whose connections carry the peer's
//! role into every request, and the gate that refuses a request outside
//! it), `client` (a connector presenting this side's certificate and
//! accepting only servers holding a `node` certificate), `certs`
//! (making a CA and certificates: `raftblk certs`).

use std::fmt;

pub mod certs;
pub mod client;
pub mod config;
pub mod files;
pub mod server;

pub use client::ClientSecurity;
pub use config::TlsConfig;
pub use files::TlsFiles;
pub use server::{PeerInfo, ServerSecurity};

/// What a certificate's holder may do; each role includes the ones below
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Client,
    Admin,
    Node,
}

/// The URI SAN prefix naming a role.
pub const ROLE_URI_PREFIX: &str = "raftblk:role:";
/// URI subject alternative name prefix naming the node a `node`
/// certificate belongs to (`raftblk:node:3`): that node may speak only for
/// itself in raft streams and heartbeats.
pub const NODE_URI_PREFIX: &str = "raftblk:node:";

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Admin => "admin",
            Role::Node => "node",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "client" => Some(Role::Client),
            "admin" => Some(Role::Admin),
            "node" => Some(Role::Node),
            _ => None,
        }
    }

    /// The SAN value that grants this role.
    pub fn uri(self) -> String {
        format!("{ROLE_URI_PREFIX}{}", self.name())
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error("certificate generation: {0}")]
    Generate(String),
}

/// The role and subject a certificate (DER) names: `(role, subject)`.
/// No role when the certificate has no `raftblk:role:` URI, or names an
/// unknown one or several.
pub fn role_of_cert(der: &[u8]) -> (Option<Role>, String) {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return (None, "(unparsable certificate)".into());
    };
    let subject = cert.subject().to_string();
    let mut roles = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name {
                if let Some(r) = uri.strip_prefix(ROLE_URI_PREFIX) {
                    roles.push(Role::parse(r));
                }
            }
        }
    }
    let role = match roles.as_slice() {
        [Some(r)] => Some(*r),
        _ => None,
    };
    (role, subject)
}

/// What the server remembers of a client certificate.
#[derive(Debug, Clone, Default)]
pub struct CertFacts {
    pub role: Option<Role>,
    pub subject: String,
    pub serial: Vec<u8>,
    /// End of validity, Unix seconds (0 if unreadable: then it counts as
    /// expired).
    pub not_after_unix: i64,
    /// The node it names (`raftblk:node:ID`), if exactly one.
    pub node_id: Option<u64>,
}

/// Role, subject, serial and end of validity of a certificate (DER).
pub fn cert_facts(der: &[u8]) -> CertFacts {
    let (role, subject) = role_of_cert(der);
    let (serial, not_after_unix, node_id) = match x509_parser::parse_x509_certificate(der) {
        Ok((_, c)) => {
            let mut ids = Vec::new();
            if let Ok(Some(san)) = c.subject_alternative_name() {
                for name in &san.value.general_names {
                    if let x509_parser::extensions::GeneralName::URI(uri) = name {
                        if let Some(id) = uri.strip_prefix(NODE_URI_PREFIX) {
                            ids.push(id.parse::<u64>().ok());
                        }
                    }
                }
            }
            let node_id = match ids.as_slice() {
                [Some(id)] => Some(*id),
                _ => None,
            };
            (
                c.tbs_certificate.raw_serial().to_vec(),
                c.validity().not_after.timestamp(),
                node_id,
            )
        }
        Err(_) => (Vec::new(), 0, None),
    };
    CertFacts {
        role,
        subject,
        serial,
        not_after_unix,
        node_id,
    }
}

/// The serial numbers a set of CRLs revokes.
pub fn revoked_serials(
    crls: &[rustls_pki_types::CertificateRevocationListDer<'_>],
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for crl in crls {
        if let Ok((_, c)) = x509_parser::parse_x509_crl(crl.as_ref()) {
            for r in c.iter_revoked_certificates() {
                out.push(r.raw_serial().to_vec());
            }
        }
    }
    out
}

/// The rustls crypto provider every config here uses: *ring* (pure Rust
/// and assembly, no C toolchain beyond what RocksDB already needs). It
/// offers classical key exchange only (X25519, P-256, P-384): rustls marks
/// it deprecated for lacking post-quantum hybrids, which need aws-lc-rs
/// and its CMake build.
#[allow(deprecated)]
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}
