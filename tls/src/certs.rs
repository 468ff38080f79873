//! Making certificates (`raftblk certs`, and the tests): a cluster CA,
//! certificates carrying a role, and CRLs. Keys are ECDSA P-256. A
//! certificate's serial is random; its validity is chosen by the caller
//! (so the tests can make expired ones).

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};

use crate::{Role, TlsError};

fn gen(e: impl std::fmt::Display) -> TlsError {
    TlsError::Generate(e.to_string())
}

fn at(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

fn random_serial() -> Vec<u8> {
    let mut s: [u8; 16] = rand::random();
    // Positive and 16 bytes long in DER.
    s[0] &= 0x7f;
    s[0] |= 0x01;
    s.to_vec()
}

/// A certificate and its key, in PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    /// The serial number (to revoke it).
    pub serial: Vec<u8>,
}

/// A CA able to sign certificates and CRLs.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: String,
}

impl Ca {
    /// A new self-signed CA valid for `valid`.
    pub fn new(name: &str, valid: Duration) -> Result<Ca, TlsError> {
        let key = KeyPair::generate().map_err(gen)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "raftblk");
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        p.not_before = at(now - Duration::from_secs(3600));
        p.not_after = at(now + valid);
        p.serial_number = Some(SerialNumber::from(random_serial()));
        p.key_identifier_method = KeyIdMethod::Sha256;
        let cert = p.self_signed(&key).map_err(gen)?;
        let key_pem = key.serialize_pem();
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem,
            issuer: Issuer::new(p, key),
        })
    }

    /// A CA from its certificate and key files.
    pub fn load(cert: &Path, key: &Path) -> Result<Ca, TlsError> {
        let read = |p: &Path| {
            std::fs::read_to_string(p).map_err(|source| TlsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let kp = KeyPair::from_pem(&key_pem).map_err(|e| TlsError::Pem {
            path: key.display().to_string(),
            message: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, kp).map_err(|e| TlsError::Pem {
            path: cert.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Ca {
            issuer,
            cert_pem,
            key_pem,
        })
    }

    /// A certificate for `name` with `role`, valid from `not_before` to
    /// `not_after`; `hosts` are added as DNS or IP names.
    pub fn issue_between(
        &self,
        name: &str,
        role: Role,
        hosts: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, TlsError> {
        self.issue_inner(name, role, None, hosts, not_before, not_after)
    }

    /// A `node` certificate for node `id` (its URI names the node: the
    /// node may speak only for itself), valid from an hour ago for `valid`.
    pub fn issue_node(
        &self,
        name: &str,
        id: u64,
        hosts: &[String],
        valid: Duration,
    ) -> Result<Issued, TlsError> {
        let now = SystemTime::now();
        self.issue_inner(
            name,
            Role::Node,
            Some(id),
            hosts,
            now - Duration::from_secs(3600),
            now + valid,
        )
    }

    fn issue_inner(
        &self,
        name: &str,
        role: Role,
        node: Option<u64>,
        hosts: &[String],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued, TlsError> {
        let key = KeyPair::generate().map_err(gen)?;
        let mut p = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "raftblk");
        p.distinguished_name = dn;
        let mut sans = vec![SanType::URI(role.uri().try_into().map_err(gen)?)];
        if let Some(id) = node {
            let uri = format!("{}{id}", crate::NODE_URI_PREFIX);
            sans.push(SanType::URI(uri.try_into().map_err(gen)?));
        }
        for h in hosts {
            sans.push(match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(h.clone().try_into().map_err(gen)?),
            });
        }
        p.subject_alt_names = sans;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = at(not_before);
        p.not_after = at(not_after);
        let serial = random_serial();
        p.serial_number = Some(SerialNumber::from(serial.clone()));
        p.key_identifier_method = KeyIdMethod::Sha256;
        let cert = p.signed_by(&key, &self.issuer).map_err(gen)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        })
    }

    /// A certificate valid from an hour ago for `valid`.
    pub fn issue(
        &self,
        name: &str,
        role: Role,
        hosts: &[String],
        valid: Duration,
    ) -> Result<Issued, TlsError> {
        let now = SystemTime::now();
        self.issue_between(
            name,
            role,
            hosts,
            now - Duration::from_secs(3600),
            now + valid,
        )
    }

    /// A CRL revoking `serials`, numbered `number`.
    pub fn crl(&self, serials: &[Vec<u8>], number: u64) -> Result<String, TlsError> {
        let now = SystemTime::now();
        let params = CertificateRevocationListParams {
            this_update: at(now - Duration::from_secs(60)),
            next_update: at(now + Duration::from_secs(365 * 86_400)),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(s.clone()),
                    revocation_time: at(now - Duration::from_secs(60)),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&self.issuer)
            .and_then(|c| c.pem())
            .map_err(gen)
    }
}

/// Writes `pem` to `path` (mode 0600 for keys), replacing it atomically.
pub fn write_pem(path: &Path, pem: &str, secret: bool) -> Result<(), TlsError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| TlsError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    // A leftover from a crash may have another mode: never reuse it.
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(err)?;
    f.write_all(pem.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// What `init_dir` made.
pub struct InitDir {
    pub ca: Ca,
}

/// Makes a CA and certificates for a cluster in `dir` (created if
/// missing; existing files are refused, never overwritten): `ca.pem`,
/// `ca.key`, `node<ID>.pem`/`.key` for each id of `nodes`, `admin.pem`,
/// `client.pem` (with keys) and an empty `crl.pem`.
pub fn init_dir(dir: &Path, nodes: &[u64], valid: Duration) -> Result<InitDir, TlsError> {
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Read {
        path: dir.display().to_string(),
        source,
    })?;
    if dir.join("ca.pem").exists() || dir.join("ca.key").exists() {
        return Err(TlsError::Config(format!(
            "{} already holds a CA (ca.pem): remove it first, or issue more certificates from it",
            dir.display()
        )));
    }
    let ca = Ca::new("raftblk cluster CA", valid)?;
    write_pem(&dir.join("ca.pem"), &ca.cert_pem, false)?;
    write_pem(&dir.join("ca.key"), &ca.key_pem, true)?;
    for id in nodes {
        let c = ca.issue_node(&format!("raftblk node {id}"), *id, &[], valid)?;
        write_pem(&dir.join(format!("node{id}.pem")), &c.cert_pem, false)?;
        write_pem(&dir.join(format!("node{id}.key")), &c.key_pem, true)?;
    }
    for role in [Role::Admin, Role::Client] {
        let c = ca.issue(&format!("raftblk {role}"), role, &[], valid)?;
        write_pem(&dir.join(format!("{role}.pem")), &c.cert_pem, false)?;
        write_pem(&dir.join(format!("{role}.key")), &c.key_pem, true)?;
    }
    write_pem(&dir.join("crl.pem"), &ca.crl(&[], 1)?, false)?;
    Ok(InitDir { ca })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_certificates_carry_their_role() {
        let ca = Ca::new("test CA", Duration::from_secs(86_400)).expect("ca");
        for role in [Role::Client, Role::Admin, Role::Node] {
            let c = ca
                .issue("x", role, &["127.0.0.1".into()], Duration::from_secs(3600))
                .expect("issue");
            let der = crate::files::load_certs_from_pem(&c.cert_pem).expect("pem");
            assert_eq!(crate::role_of_cert(&der[0]).0, Some(role));
            assert_eq!(crate::cert_facts(&der[0]).node_id, None);
        }
        let dir = tempfile::tempdir().expect("dir");
        init_dir(dir.path(), &[1, 2, 3], Duration::from_secs(86_400)).expect("init");
        assert!(dir.path().join("node3.key").exists());
        // Node certificates name their node.
        let der = crate::files::load_certs(&dir.path().join("node3.pem")).expect("node3");
        let facts = crate::cert_facts(&der[0]);
        assert_eq!((facts.role, facts.node_id), (Some(Role::Node), Some(3)));
        assert!(init_dir(dir.path(), &[1], Duration::from_secs(60)).is_err());
        let loaded =
            Ca::load(&dir.path().join("ca.pem"), &dir.path().join("ca.key")).expect("load");
        loaded
            .issue("y", Role::Client, &[], Duration::from_secs(60))
            .expect("issue from a loaded CA");
    }
}
