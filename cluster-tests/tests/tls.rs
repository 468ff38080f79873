//! Mutual TLS with roles, against a real 3-node cluster (every test
//! cluster runs with TLS on): strangers are refused at the handshake (no
//! certificate, one from another CA, an expired one, a revoked one, or
//! plaintext); a `client` certificate does block I/O but cannot send raft
//! messages or create volumes, a node's certificate cannot speak for
//! another node, and the refusal names the role and is
//! logged with the peer; an `admin` certificate can; a certificate
//! revoked while the cluster runs is refused within seconds (the CRL is
//! re-read without a restart), and so is a node's: the raft streams it had
//! open are cut.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use raftblk_client::{Client, ClientError, ClientOptions};
use raftblk_cluster_tests::{metrics, tls, ClusterSpec, LocalCluster};
use raftblk_proto::raft_transport_client::RaftTransportClient;
use raftblk_proto::RaftBatch;
use raftblk_tls::certs::{write_pem, Ca};
use raftblk_tls::{ClientSecurity, Role, TlsFiles};

fn opts(security: ClientSecurity) -> ClientOptions {
    ClientOptions {
        security,
        deadline: Duration::from_secs(3),
        attempt_timeout: Duration::from_secs(2),
        ..ClientOptions::default()
    }
}

/// Writes an issued certificate and key into `dir` as NAME.pem/.key.
fn files_in(dir: &Path, name: &str, cert: &str, key: &str) -> anyhow::Result<TlsFiles> {
    write_pem(&dir.join(format!("{name}.pem")), cert, false)?;
    write_pem(&dir.join(format!("{name}.key")), key, true)?;
    Ok(TlsFiles {
        ca: tls::dir().join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        crl: None,
    })
}

/// Connecting with `security` fails, and a node logs why: a line
/// "TLS connection refused" containing `cause` (the handshake error the
/// node saw), so a refusal for another reason (a timeout, a client-side
/// check) does not pass for this one.
async fn refused(cluster: &LocalCluster, security: ClientSecurity, what: &str, cause: &str) {
    // The refusal log is limited to one line a second per node.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    if Client::connect(&cluster.addrs(), opts(security))
        .await
        .is_ok()
    {
        panic!("{what}: the cluster accepted the connection");
    }
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let logs: String = (1..=3).map(|i| cluster.log_tail(i, 200)).collect();
        if logs
            .lines()
            .any(|l| l.contains("TLS connection refused") && l.contains(cause))
        {
            return;
        }
        if Instant::now() > until {
            let seen: Vec<&str> = logs
                .lines()
                .filter(|l| l.contains("TLS connection refused"))
                .collect();
            panic!("{what}: no node logged a refusal for {cause:?}; refusals logged: {seen:#?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn strangers_are_refused_and_roles_are_enforced() -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let cluster = LocalCluster::start(ClusterSpec::default())?;
    rt.block_on(cluster.wait_healthy(Duration::from_secs(30)))?;
    let scratch = tempfile::tempdir()?;
    let ca = Ca::load(&tls::dir().join("ca.pem"), &tls::dir().join("ca.key"))?;
    rt.block_on(async {
        // No certificate at all.
        let anon = ClientSecurity::anonymous(&tls::dir().join("ca.pem"))?;
        refused(
            &cluster,
            anon,
            "no client certificate",
            "peer sent no certificates",
        )
        .await;

        // A certificate from another CA, with the right role.
        let other = Ca::new("some other CA", Duration::from_secs(86_400))?;
        let c = other.issue("intruder", Role::Admin, &[], Duration::from_secs(3600))?;
        let f = files_in(scratch.path(), "other-ca", &c.cert_pem, &c.key_pem)?;
        refused(
            &cluster,
            ClientSecurity::tls(f)?,
            "another CA's certificate",
            "UnknownIssuer",
        )
        .await;

        // An expired certificate from the right CA.
        let now = SystemTime::now();
        let c = ca.issue_between(
            "expired",
            Role::Admin,
            &[],
            now - Duration::from_secs(2 * 86_400),
            now - Duration::from_secs(86_400),
        )?;
        let f = files_in(scratch.path(), "expired", &c.cert_pem, &c.key_pem)?;
        refused(
            &cluster,
            ClientSecurity::tls(f)?,
            "an expired certificate",
            "certificate expired",
        )
        .await;

        // Plaintext towards TLS nodes.
        refused(
            &cluster,
            ClientSecurity::Plaintext,
            "plaintext",
            "InvalidContentType",
        )
        .await;

        // A client certificate: block I/O and leases, nothing more.
        let admin = cluster.client().await?;
        admin.create_volume("v", 16 << 20).await?;
        let client = Client::connect(&cluster.addrs(), opts(tls::security(Role::Client))).await?;
        let vol = client.open_volume("v").await?;
        vol.write(0, &[5u8; 4096]).await?;
        assert_eq!(vol.read(0, 4096).await?, vec![5u8; 4096]);
        match client.create_volume("w", 16 << 20).await {
            Ok(_) => panic!("a client certificate created a volume"),
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.contains("needs the `admin` role") && text.contains("has `client`"),
                    "{text}"
                );
            }
        }
        let mut raft = RaftTransportClient::new(
            tls::security(Role::Client)
                .connect(tonic::transport::Endpoint::from_shared(format!(
                    "http://{}",
                    cluster.addr(1)
                ))?)
                .await?,
        );
        let batch = RaftBatch {
            from_node: 2,
            to_node: 1,
            ..Default::default()
        };
        let status = raft
            .send(tokio_stream::iter(vec![batch]))
            .await
            .expect_err("a client certificate sent raft messages");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("needs the `node` role"),
            "{status:?}"
        );

        // One node's certificate cannot pose as another node: node 3's,
        // in a raft stream, a heartbeat, a join or a snapshot claiming to
        // be node 2.
        let node3 = ClientSecurity::tls(tls::files("node3"))?;
        let ch = node3
            .connect(tonic::transport::Endpoint::from_shared(format!(
                "http://{}",
                cluster.addr(1)
            ))?)
            .await?;
        let status = RaftTransportClient::new(ch.clone())
            .send(tokio_stream::iter(vec![RaftBatch {
                from_node: 2,
                to_node: 1,
                ..Default::default()
            }]))
            .await
            .expect_err("node 3's certificate spoke for node 2");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(
            status.message().contains("is node 3's") && status.message().contains("node 2"),
            "{status:?}"
        );
        let status = raftblk_proto::cluster_client::ClusterClient::new(ch.clone())
            .heartbeat(raftblk_proto::NodeHeartbeat {
                node_id: 2,
                ..Default::default()
            })
            .await
            .expect_err("node 3's certificate sent node 2's heartbeat");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        let status = raftblk_proto::cluster_client::ClusterClient::new(ch.clone())
            .join(raftblk_proto::JoinRequest {
                node_id: 2,
                addr: "127.0.0.1:1".into(),
                ..Default::default()
            })
            .await
            .expect_err("node 3's certificate re-registered node 2");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        let status = RaftTransportClient::new(ch)
            .snapshot(tokio_stream::iter(vec![raftblk_proto::SnapshotPiece {
                from_node: 2,
                to_node: 1,
                ..Default::default()
            }]))
            .await
            .expect_err("node 3's certificate sent a snapshot as node 2");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

        // Nor finish (delete) a snapshot that is ready, delete one through
        // the data groups, or break another holder's lease.
        let snap = admin.create_snapshot("v", "s1").await?;
        let info = admin.volume_info("v").await?;
        let ch = tls::security(Role::Client)
            .connect(tonic::transport::Endpoint::from_shared(format!(
                "http://{}",
                cluster.addr(1)
            ))?)
            .await?;
        let mut vols = raftblk_proto::volumes_client::VolumesClient::new(ch.clone());
        let mut finished = None;
        for _ in 0..20 {
            // Through the meta leader (any node forwards nothing: try until
            // the answer is not NOT_LEADER).
            let r = vols
                .finish_snapshot(raftblk_proto::FinishSnapshotRequest {
                    volume_id: info.id,
                    snapshot_id: snap.id,
                    ok: false,
                    quiesce_us: 0,
                })
                .await?
                .into_inner();
            match r.error {
                Some(e) if e.code == raftblk_proto::ErrorCode::NotLeader as i32 => {
                    let leader = cluster.leader_of(0).await.unwrap_or(1);
                    vols = raftblk_proto::volumes_client::VolumesClient::new(
                        tls::security(Role::Client)
                            .connect(tonic::transport::Endpoint::from_shared(format!(
                                "http://{}",
                                cluster.addr(leader)
                            ))?)
                            .await?,
                    );
                }
                other => {
                    finished = Some(other);
                    break;
                }
            }
        }
        let err = finished
            .flatten()
            .expect("finishing a ready snapshot was not refused");
        assert!(err.message.contains("cannot become"), "{err:?}");
        let after = admin.volume_info("v").await?;
        assert_eq!(
            after
                .snapshots
                .iter()
                .find(|s| s.id == snap.id)
                .map(|s| s.state),
            Some(raftblk_proto::SnapshotState::SnapshotReady as i32),
            "the snapshot must stay ready"
        );
        let detach = vols
            .detach(raftblk_proto::DetachRequest {
                name: "v".into(),
                force: true,
                ..Default::default()
            })
            .await
            .expect_err("a client certificate broke a lease with --force");
        assert_eq!(detach.code(), tonic::Code::PermissionDenied, "{detach:?}");
        let mut bio = raftblk_proto::block_io_client::BlockIoClient::new(ch);
        let del = bio
            .snapshot(raftblk_proto::SnapshotOpRequest {
                group_id: 1,
                volume_id: info.id,
                snapshot_id: snap.id,
                op: raftblk_proto::SnapshotOp::Delete as i32,
                epoch: 0,
            })
            .await
            .expect_err("a client certificate deleted snapshot data");
        assert_eq!(del.code(), tonic::Code::PermissionDenied, "{del:?}");

        // An admin certificate can change the catalog.
        admin.create_volume("w", 16 << 20).await?;
        anyhow::Ok(())
    })?;
    let logs: String = (1..=3).map(|i| cluster.log_tail(i, 400)).collect();
    assert!(
        logs.contains("request refused") && logs.contains("peer="),
        "no log line names the refused peer"
    );

    // Revocation while running: a fresh admin certificate works, is
    // revoked in the CRL file the nodes read, and within seconds, without
    // a restart, is refused both on the connection it already had open
    // and on new ones.
    let c = ca.issue("ops", Role::Admin, &[], Duration::from_secs(3600))?;
    let f = files_in(scratch.path(), "ops", &c.cert_pem, &c.key_pem)?;
    rt.block_on(async {
        let ops = Client::connect(&cluster.addrs(), opts(ClientSecurity::tls(f.clone())?)).await?;
        ops.list_volumes().await?;
        write_pem(
            &tls::dir().join("crl.pem"),
            &ca.crl(std::slice::from_ref(&c.serial), 2)?,
            false,
        )?;
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            match ops.list_volumes().await {
                Err(ClientError::PermissionDenied(m)) => {
                    assert!(m.contains("revoked since the connection was opened"), "{m}");
                    break;
                }
                Err(e) => panic!("the open connection failed otherwise: {e}"),
                Ok(_) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Ok(_) => panic!("a revoked certificate still works on its connection after 30 s"),
            }
        }
        // (The client may see only a closed stream: TLS 1.3 sends the
        // client's certificate after the server's Finished, so the
        // refusal's cause is asserted where the node logs it.)
        refused(
            &cluster,
            ClientSecurity::tls(f.clone())?,
            "a revoked certificate",
            "Revoked",
        )
        .await;
        // The others still work.
        cluster.client().await?.list_volumes().await?;
        anyhow::Ok(())
    })?;

    // A node's certificate revoked while it runs: the raft streams it
    // already had open (which passed the role gate once, when they opened)
    // are cut within seconds, and it cannot open new ones; the other two
    // nodes go on serving writes.
    let node3 = raftblk_tls::files::load_certs(&tls::dir().join("node3.pem"))?;
    let node3_serial = raftblk_tls::cert_facts(node3[0].as_ref()).serial;
    let addrs: Vec<_> = (1..=2)
        .map(|i| {
            cluster
                .metrics_addr(i)
                .ok_or_else(|| anyhow::anyhow!("node {i} serves no metrics"))
        })
        .collect::<anyhow::Result<_>>()?;
    // Raft messages nodes 1 and 2 have received from node 3.
    let from3 = || -> anyhow::Result<f64> {
        let mut n = 0.0;
        for a in &addrs {
            n += metrics::sum(
                &metrics::scrape(*a)?,
                "raftblk_node_raft_messages_received_total",
                &[("peer", "3")],
            );
        }
        Ok(n)
    };
    rt.block_on(async {
        let admin = cluster.client().await?;
        admin.create_volume("rv", 16 << 20).await?;
        let vol = admin.open_volume("rv").await?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let writer = tokio::spawn(async move {
            let until = Instant::now() + Duration::from_secs(90);
            let mut n = 0u64;
            while Instant::now() < until && !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                vol.write((n * 4096 * 61) % (16 << 20), &[n as u8; 4096]).await?;
                n += 1;
            }
            anyhow::Ok((n, vol))
        });
        let before = from3()?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        anyhow::ensure!(
            from3()? > before,
            "nodes 1 and 2 hear nothing from node 3 even before the revocation"
        );
        write_pem(
            &tls::dir().join("crl.pem"),
            &ca.crl(&[c.serial.clone(), node3_serial], 3)?,
            false,
        )?;
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let a = from3()?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            if from3()? == a {
                break;
            }
            anyhow::ensure!(
                Instant::now() < until,
                "nodes 1 and 2 still receive raft messages from node 3 30 s after its certificate was revoked"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (writes, vol) = writer.await??;
        anyhow::ensure!(writes > 0, "no write went through");
        // Writes still go through on nodes 1 and 2.
        vol.write(0, &[9u8; 4096]).await?;
        anyhow::ensure!(vol.read(0, 4096).await? == vec![9u8; 4096]);
        anyhow::Ok(())
    })?;
    let logs: String = (1..=2).map(|i| cluster.log_tail(i, 400)).collect();
    assert!(
        logs.contains("raft stream cut"),
        "no log line says why node 3's stream was cut"
    );
    Ok(())
}
