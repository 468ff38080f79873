//! The `[tls]` section of a config file (raftblk-node's, raftblk-vhost's):
//! the CA, this side's certificate and key, and an optional CRL; or,
//! explicitly, `insecure_plaintext = true`. Nothing is implied: the
//! programs refuse a config without the section, so nothing runs in
//! plaintext by omission.

use std::path::PathBuf;

use crate::TlsFiles;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA certificate (PEM): peers and clients must chain to it.
    pub ca_file: Option<PathBuf>,
    /// This side's certificate (PEM), with its role in a URI SAN
    /// (`raftblk:role:node` for a node).
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM).
    pub key_file: Option<PathBuf>,
    /// Revoked certificates (PEM CRL); re-read when it changes.
    pub crl_file: Option<PathBuf>,
    /// Serve and connect without TLS: anyone who reaches `listen_addr`
    /// may do anything. Only on a network that is trusted as a whole.
    #[serde(default)]
    pub insecure_plaintext: bool,
}

impl TlsConfig {
    /// Checks the section; `Err((key, message))` names the bad key.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let files = [
            ("tls.ca_file", &self.ca_file),
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
        ];
        if self.insecure_plaintext {
            if let Some((k, _)) = files
                .iter()
                .chain([("tls.crl_file", &self.crl_file)].iter())
                .find(|(_, v)| v.is_some())
            {
                return Err((
                    (*k).to_owned(),
                    "set together with tls.insecure_plaintext = true: choose TLS or plaintext"
                        .into(),
                ));
            }
            return Ok(());
        }
        for (k, v) in files {
            match v {
                None => {
                    return Err((
                        k.to_owned(),
                        "missing: mutual TLS needs tls.ca_file, tls.cert_file and tls.key_file (or tls.insecure_plaintext = true to run without TLS)".into(),
                    ))
                }
                Some(p) if p.as_os_str().is_empty() => {
                    return Err((k.to_owned(), "must not be empty".into()))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// The files to load; None in plaintext.
    pub fn files(&self) -> Option<TlsFiles> {
        if self.insecure_plaintext {
            return None;
        }
        Some(TlsFiles {
            ca: self.ca_file.clone()?,
            cert: self.cert_file.clone()?,
            key: self.key_file.clone()?,
            crl: self.crl_file.clone(),
        })
    }
}
