//! `raftblk certs`: a CA and certificates for a cluster (`init`), more
//! certificates from that CA (`issue`: a new node, a daemon host, an
//! operator), and revocation (`revoke`: rewrites the CRL the nodes and
//! clients re-read within seconds). Needs no running cluster.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use raftblk_tls::certs::{self, Ca};
use raftblk_tls::Role;

#[derive(clap::Subcommand, Debug)]
pub enum CertsCmd {
    /// Make a CA and certificates in DIR: ca.pem/ca.key, node<ID>.pem/.key
    /// for each node id, admin.pem/.key, client.pem/.key and an empty
    /// crl.pem. Refuses a DIR that already holds a CA.
    Init {
        dir: PathBuf,
        /// Node ids to make certificates for.
        #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
        nodes: Vec<u64>,
        /// Validity of every certificate, in days.
        #[arg(long, default_value_t = 825)]
        days: u64,
    },
    /// Issue one more certificate from the CA in DIR: writes
    /// DIR/NAME.pem and DIR/NAME.key.
    Issue {
        dir: PathBuf,
        /// File name (and subject): e.g. node4, vhost-host7, alice.
        name: String,
        /// Its role: client (daemons), admin (operators), node.
        #[arg(long, value_parser = ["client", "admin", "node"])]
        role: String,
        /// Host names or addresses to add as subject alternative names.
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// With --role node (and only then): the node's id. The
        /// certificate names it, and the node may speak only for itself.
        #[arg(long)]
        node_id: Option<u64>,
        #[arg(long, default_value_t = 825)]
        days: u64,
    },
    /// Revoke certificates (PEM files) issued by the CA in DIR: adds
    /// their serials to DIR/crl.pem (and DIR/revoked.txt). Nodes and
    /// clients configured with that CRL refuse them within seconds.
    Revoke {
        dir: PathBuf,
        #[arg(required = true)]
        certs: Vec<PathBuf>,
    },
}

fn valid(days: u64) -> anyhow::Result<Duration> {
    anyhow::ensure!(
        (1..=36_500).contains(&days),
        "--days: {days} is not in 1..=36500"
    );
    Ok(Duration::from_secs(days * 86_400))
}

fn check_name(name: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !name.starts_with('.'),
        "name {name:?}: use 1 to 64 letters, digits, '-', '_' or '.'"
    );
    Ok(())
}

pub fn run(cmd: &CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init { dir, nodes, days } => {
            anyhow::ensure!(!nodes.is_empty(), "--nodes: give at least one node id");
            certs::init_dir(dir, nodes, valid(*days)?)?;
            outln!("made a CA and certificates in {}:", dir.display());
            outln!("  ca.pem, ca.key (keep ca.key offline: it signs new certificates)");
            for n in nodes {
                outln!("  node{n}.pem, node{n}.key   role node   ([tls] of node {n}'s config)");
            }
            outln!("  admin.pem, admin.key     role admin  (raftblk CLI for catalog and membership changes)");
            outln!("  client.pem, client.key   role client (raftblk-vhost, raftblk-nbd)");
            outln!("  crl.pem                  empty CRL   (raftblk certs revoke adds to it)");
        }
        CertsCmd::Issue {
            dir,
            name,
            role,
            hosts,
            node_id,
            days,
        } => {
            check_name(name)?;
            let role = Role::parse(role).context("role")?;
            match (role, node_id) {
                (Role::Node, None) => anyhow::bail!(
                    "--node-id: a node certificate names its node (the node may speak only for itself)"
                ),
                (Role::Node, Some(0)) => anyhow::bail!("--node-id: node ids start at 1"),
                (Role::Node, Some(_)) => {}
                (_, Some(_)) => anyhow::bail!("--node-id is for --role node only"),
                (_, None) => {}
            }
            let ca = load_ca(dir)?;
            let (cert, key) = (
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}.key")),
            );
            anyhow::ensure!(
                !cert.exists() && !key.exists(),
                "{} already exists: choose another name",
                cert.display()
            );
            let c = match node_id {
                Some(id) => ca.issue_node(&format!("raftblk {name}"), *id, hosts, valid(*days)?)?,
                None => ca.issue(&format!("raftblk {name}"), role, hosts, valid(*days)?)?,
            };
            certs::write_pem(&cert, &c.cert_pem, false)?;
            certs::write_pem(&key, &c.key_pem, true)?;
            outln!(
                "issued {} and {} (role {role}{})",
                cert.display(),
                key.display(),
                node_id.map_or(String::new(), |id| format!(", node {id}"))
            );
        }
        CertsCmd::Revoke { dir, certs: files } => {
            let ca = load_ca(dir)?;
            let list = dir.join("revoked.txt");
            let mut serials: Vec<String> = std::fs::read_to_string(&list)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .filter(|l| !l.is_empty())
                .collect();
            for f in files {
                let der = raftblk_tls::files::load_certs(f)?;
                let serial = serial_of(&der[0]).with_context(|| format!("{}", f.display()))?;
                if !serials.contains(&serial) {
                    serials.push(serial);
                }
                outln!("revoking {}", f.display());
            }
            let bytes: Vec<Vec<u8>> = serials
                .iter()
                .map(|s| hex_decode(s))
                .collect::<anyhow::Result<_>>()?;
            let number = serials.len() as u64 + 1;
            certs::write_pem(&dir.join("crl.pem"), &ca.crl(&bytes, number)?, false)?;
            certs::write_pem(&list, &(serials.join("\n") + "\n"), false)?;
            outln!(
                "{} now revokes {} certificate(s)",
                dir.join("crl.pem").display(),
                serials.len()
            );
        }
    }
    Ok(())
}

fn load_ca(dir: &Path) -> anyhow::Result<Ca> {
    Ok(Ca::load(&dir.join("ca.pem"), &dir.join("ca.key"))?)
}

fn serial_of(der: &[u8]) -> anyhow::Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("not a certificate: {e}"))?;
    Ok(cert
        .tbs_certificate
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

fn hex_decode(s: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(s.len().is_multiple_of(2), "revoked.txt: bad serial {s:?}");
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16)
                .map_err(|e| anyhow::anyhow!("revoked.txt: {s:?}: {e}"))
        })
        .collect()
}
