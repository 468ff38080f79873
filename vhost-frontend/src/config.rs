//! The config-file form of `raftblk-vhost`: several volumes, one socket
//! each, validated at load with messages that name the bad key.

use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostConfig {
    /// Cluster node addresses.
    pub cluster: Vec<String>,
    /// Per-request deadline, retries included.
    #[serde(default = "default_io_timeout_secs")]
    pub io_timeout_secs: u64,
    /// Address of the Prometheus endpoint (`GET /metrics`); absent: none.
    #[serde(default)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Mutual TLS towards the nodes (a `client` certificate), or
    /// `insecure_plaintext = true`; the command line's --tls-* flags win.
    #[serde(default)]
    pub tls: Option<raftblk_tls::TlsConfig>,
    #[serde(rename = "volume", default)]
    pub volumes: Vec<VolumeExport>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeExport {
    pub name: String,
    pub socket: PathBuf,
    #[serde(default = "default_queues")]
    pub queues: u16,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub read_only: bool,
}

fn default_io_timeout_secs() -> u64 {
    60
}
fn default_queues() -> u16 {
    1
}
fn default_queue_size() -> u16 {
    256
}

/// Checks queue count and size; the messages name `key_prefix`.
pub fn validate_queues(queues: u16, queue_size: u16, key_prefix: &str) -> Result<(), String> {
    if queues == 0 || queues > 64 {
        return Err(format!("{key_prefix}queues: {queues} is not in 1..=64"));
    }
    if !queue_size.is_power_of_two() || !(2..=1024).contains(&queue_size) {
        return Err(format!(
            "{key_prefix}queue_size: {queue_size} must be a power of two in 2..=1024"
        ));
    }
    Ok(())
}

pub fn validate_timeout(secs: u64, key: &str) -> Result<(), String> {
    if !(1..=3600).contains(&secs) {
        return Err(format!("{key}: {secs} is not in 1..=3600"));
    }
    Ok(())
}

impl VhostConfig {
    pub fn load(path: &Path) -> Result<VhostConfig, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let c: VhostConfig = toml::from_str(&text).map_err(|e| {
            format!(
                "{}: {}",
                path.display(),
                e.to_string().trim().replace('\n', " ")
            )
        })?;
        let bad = |m: String| format!("{}: {m}", path.display());
        if c.cluster.is_empty() {
            return Err(bad("cluster: list at least one node address".into()));
        }
        validate_timeout(c.io_timeout_secs, "io_timeout_secs").map_err(bad)?;
        if let Some(t) = &c.tls {
            t.validate().map_err(|(k, m)| bad(format!("{k}: {m}")))?;
        }
        if c.volumes.is_empty() {
            return Err(bad("volume: add at least one [[volume]] table".into()));
        }
        let mut sockets = std::collections::HashSet::new();
        for (i, v) in c.volumes.iter().enumerate() {
            if v.name.is_empty() {
                return Err(bad(format!("volume[{i}].name: must not be empty")));
            }
            validate_queues(v.queues, v.queue_size, &format!("volume[{i}].")).map_err(bad)?;
            if !sockets.insert(v.socket.clone()) {
                return Err(bad(format!(
                    "volume[{i}].socket: {} is used twice",
                    v.socket.display()
                )));
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<VhostConfig, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let p = dir.path().join("vhost.toml");
        std::fs::write(&p, text).map_err(|e| e.to_string())?;
        VhostConfig::load(&p)
    }

    const GOOD: &str = r#"
cluster = ["127.0.0.1:7101"]
[[volume]]
name = "vm1"
socket = "/run/vm1.sock"
queues = 2
[[volume]]
name = "vm2"
socket = "/run/vm2.sock"
"#;

    #[test]
    fn good_config_with_defaults() {
        let c = load(GOOD).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.volumes.len(), 2);
        assert_eq!(c.volumes[1].queues, 1);
        assert_eq!(c.volumes[1].queue_size, 256);
        assert_eq!(c.io_timeout_secs, 60);
    }

    #[test]
    fn errors_name_the_key() {
        let e = |t: &str| load(t).err().unwrap_or_default();
        assert!(e(&GOOD.replace("queues = 2", "queues = 0")).contains("volume[0].queues"));
        assert!(
            e(&GOOD.replace("queues = 2", "queues = 2\nqueue_size = 100"))
                .contains("volume[0].queue_size")
        );
        assert!(e(&GOOD.replace("/run/vm2.sock", "/run/vm1.sock")).contains("volume[1].socket"));
        assert!(
            e(&GOOD.replace("cluster = [\"127.0.0.1:7101\"]", "cluster = []")).contains("cluster")
        );
        assert!(e(&GOOD.replace("queues = 2", "queues = 2\ncolour = 1")).contains("colour"));
        assert!(e(&format!("io_timeout_secs = 0\n{GOOD}")).contains("io_timeout_secs"));
        assert!(e("cluster = [\"a:1\"]\n").contains("[[volume]]"));
    }
}
