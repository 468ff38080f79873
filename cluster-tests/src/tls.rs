//! The test processes' certificates: one CA per test process (made at the
//! first use, in a directory of the system's temporary dir), node
//! certificates for ids 1 to `NODE_IDS_MAX`, and one `admin` and one
//! `client` certificate. Every test cluster runs with mutual TLS on: its
//! nodes' `[tls]` sections, the test's own clients (admin) and the
//! daemons it starts (client) all use these.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use raftblk_tls::{ClientSecurity, Role, TlsFiles};

/// Node ids with certificates.
pub const NODE_IDS_MAX: u64 = 16;

static DIR: OnceLock<PathBuf> = OnceLock::new();

/// The directory holding `ca.pem`, `node<i>.pem`, `admin.pem`,
/// `client.pem` (and keys) and `crl.pem`.
pub fn dir() -> &'static Path {
    DIR.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let parent = std::env::temp_dir().join("raftblk-test-certs");
        // Each test process leaves its directory behind (no exit hook):
        // those older than a day are removed here, bounding the pile.
        if let Ok(entries) = std::fs::read_dir(&parent) {
            for e in entries.flatten().take(10_000) {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age > Duration::from_secs(86_400));
                if old {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let d = parent.join(format!("{}-{nanos}", std::process::id()));
        let ids: Vec<u64> = (1..=NODE_IDS_MAX).collect();
        if let Err(e) = raftblk_tls::certs::init_dir(&d, &ids, Duration::from_secs(30 * 86_400)) {
            panic!("cannot make the test certificates in {}: {e}", d.display());
        }
        d
    })
}

/// The certificate files of `name` (`node3`, `admin`, `client`).
pub fn files(name: &str) -> TlsFiles {
    let d = dir();
    TlsFiles {
        ca: d.join("ca.pem"),
        cert: d.join(format!("{name}.pem")),
        key: d.join(format!("{name}.key")),
        crl: Some(d.join("crl.pem")),
    }
}

/// The `[tls]` section of node `i`'s config.
pub fn node_section(i: usize) -> String {
    let f = files(&format!("node{i}"));
    format!(
        "\n[tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\ncrl_file = \"{}\"\n",
        f.ca.display(),
        f.cert.display(),
        f.key.display(),
        f.crl.as_deref().unwrap_or(Path::new("")).display()
    )
}

/// Environment for a raftblk program acting as `role` (`admin` for the
/// CLI, `client` for the daemons).
pub fn env(role: Role) -> Vec<(String, String)> {
    let f = files(role.name());
    vec![
        ("RAFTBLK_TLS_CA".into(), f.ca.display().to_string()),
        ("RAFTBLK_TLS_CERT".into(), f.cert.display().to_string()),
        ("RAFTBLK_TLS_KEY".into(), f.key.display().to_string()),
    ]
}

/// A client-side security config for `role` (on a tokio runtime).
pub fn security(role: Role) -> ClientSecurity {
    match ClientSecurity::tls(files(role.name())) {
        Ok(s) => s,
        Err(e) => panic!("test certificates: {e}"),
    }
}

/// Environment for the `raftblk` CLI in tests (the `admin` certificate).
pub fn cli_env() -> Vec<(String, String)> {
    env(Role::Admin)
}
