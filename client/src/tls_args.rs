//! The TLS flags every client-side program takes (`raftblk`,
//! `raftblk-vhost`, `raftblk-nbd`): the CA, this side's certificate and
//! key, an optional CRL, each also from the environment
//! (`RAFTBLK_TLS_CA`, ...), or `--insecure-plaintext` for a cluster that
//! runs without TLS. Neither is an error: plaintext is never implied.

use std::path::PathBuf;

use raftblk_tls::{ClientSecurity, TlsFiles};

#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// The cluster CA certificate (PEM).
    #[arg(long, env = "RAFTBLK_TLS_CA", global = true)]
    pub tls_ca: Option<PathBuf>,
    /// This program's certificate (PEM), carrying its role
    /// (raftblk:role:client for daemons, admin for catalog changes).
    #[arg(long, env = "RAFTBLK_TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "RAFTBLK_TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,
    /// Revoked certificates (PEM CRL), re-read when it changes.
    #[arg(long, env = "RAFTBLK_TLS_CRL", global = true)]
    pub tls_crl: Option<PathBuf>,
    /// Connect without TLS (only to a cluster whose nodes set
    /// tls.insecure_plaintext = true).
    #[arg(
        long,
        env = "RAFTBLK_INSECURE_PLAINTEXT",
        global = true,
        conflicts_with_all = ["tls_ca", "tls_cert", "tls_key", "tls_crl"]
    )]
    pub insecure_plaintext: bool,
}

impl TlsArgs {
    /// How to connect; must run on a tokio runtime (certificates are
    /// watched for changes).
    pub fn security(&self) -> Result<ClientSecurity, String> {
        if self.insecure_plaintext {
            return Ok(ClientSecurity::Plaintext);
        }
        let missing = [
            ("--tls-ca", &self.tls_ca),
            ("--tls-cert", &self.tls_cert),
            ("--tls-key", &self.tls_key),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_none())
        .map(|(k, _)| k)
        .collect::<Vec<_>>();
        match (missing.len(), &self.tls_ca, &self.tls_cert, &self.tls_key) {
            (0, Some(ca), Some(cert), Some(key)) => ClientSecurity::tls(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                crl: self.tls_crl.clone(),
            })
            .map_err(|e| e.to_string()),
            (3, ..) => Err(
                "no TLS credentials: give --tls-ca, --tls-cert and --tls-key (or RAFTBLK_TLS_CA, RAFTBLK_TLS_CERT, RAFTBLK_TLS_KEY; `raftblk certs init DIR` makes them), or --insecure-plaintext for a cluster running without TLS"
                    .into(),
            ),
            _ => Err(format!("TLS: {} missing", missing.join(", "))),
        }
    }
}
