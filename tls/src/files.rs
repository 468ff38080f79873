//! The PEM files one side's TLS is built from (CA, certificate chain, key,
//! optional CRL), and `Reloading`: a built config that is rebuilt when any
//! of its files changes (checked every `RELOAD_POLL`), so certificates
//! rotate and revocations take effect without a restart. A rebuild that
//! fails (a half-written file) keeps the previous config and logs why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::TlsError;

/// How often the files are checked for changes.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// Largest PEM file read.
const PEM_BYTES_MAX: u64 = 16 << 20;

/// Where one side's credentials are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate(s): peers must chain to it.
    pub ca: PathBuf,
    /// This side's certificate (chain), naming its role.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1 PEM).
    pub key: PathBuf,
    /// Revoked certificates (PEM CRLs), if any.
    pub crl: Option<PathBuf>,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    let err = |source| TlsError::Read {
        path: path.display().to_string(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if meta.len() > PEM_BYTES_MAX {
        return Err(TlsError::Pem {
            path: path.display().to_string(),
            message: format!("larger than {PEM_BYTES_MAX} bytes"),
        });
    }
    std::fs::read(path).map_err(err)
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// The certificates of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(pem_err(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The certificates of PEM text.
pub fn load_certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: "(text)".into(),
            message: e.to_string(),
        })
}

/// The private key of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| pem_err(path, e))
}

/// The CRLs of a PEM file (possibly none).
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bytes = read(path)?;
    CertificateRevocationListDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, e))
}

/// The CA file as a trust store.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| pem_err(path, e))?;
    }
    Ok(Arc::new(roots))
}

impl TlsFiles {
    fn paths(&self) -> Vec<&Path> {
        let mut p = vec![self.ca.as_path(), self.cert.as_path(), self.key.as_path()];
        if let Some(c) = &self.crl {
            p.push(c);
        }
        p
    }

    /// What identifies the files' current contents: each one's
    /// modification time and size (a missing file reads as none).
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        self.paths()
            .into_iter()
            .map(|p| {
                std::fs::metadata(p)
                    .ok()
                    .and_then(|m| Some((m.modified().ok()?, m.len())))
            })
            .collect()
    }
}

/// A config built from `TlsFiles`, rebuilt when they change.
pub struct Reloading<T> {
    current: RwLock<Arc<T>>,
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Builds the config once (failing if the files are bad) and, on the
    /// current tokio runtime, watches the files for as long as the
    /// returned value lives.
    pub fn watch(
        files: TlsFiles,
        what: &'static str,
        build: impl Fn(&TlsFiles) -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Reloading<T>>, TlsError> {
        let first = build(&files)?;
        let this = Arc::new(Reloading {
            current: RwLock::new(Arc::new(first)),
        });
        let weak = Arc::downgrade(&this);
        let mut stamp = files.stamp();
        // The state of the files last reported as not loading: one warning
        // per change, not one per poll.
        let mut reported = None;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RELOAD_POLL).await;
                let Some(this) = weak.upgrade() else { return };
                let now = files.stamp();
                if now == stamp {
                    continue;
                }
                match build(&files) {
                    Ok(c) => {
                        *this.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(c);
                        stamp = now;
                        tracing::info!(cert = %files.cert.display(), "{what}: TLS files changed; reloaded");
                    }
                    Err(e) => {
                        // Keep the old config; try again at the next poll
                        // (a file may be half written).
                        if reported.as_ref() != Some(&now) {
                            tracing::warn!(error = %e, "{what}: TLS files changed but do not load; keeping the previous ones");
                            reported = Some(now);
                        }
                    }
                }
            }
        });
        Ok(this)
    }

    /// A config that never changes.
    pub fn fixed(config: T) -> Arc<Reloading<T>> {
        Arc::new(Reloading {
            current: RwLock::new(Arc::new(config)),
        })
    }

    /// The config as of now.
    pub fn get(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
