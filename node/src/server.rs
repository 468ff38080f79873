//! Wiring of one node process: open the engine, start the store thread and
//! the transport, serve every gRPC service until a shutdown signal.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::Context as _;
use raftblk_proto::block_io_server::BlockIoServer;
use raftblk_proto::cluster_server::ClusterServer;
use raftblk_proto::raft_transport_server::RaftTransportServer;
use raftblk_proto::volumes_server::VolumesServer;
use raftblk_proto::GRPC_MESSAGE_BYTES_MAX;

use crate::address_book::AddressBook;
use crate::config::NodeConfig;
use crate::engine::Engine;
use crate::service::{
    block_io::BlockIoService, cluster::ClusterService, raft::RaftService, volumes::VolumesService,
};
use crate::store;
use crate::transport::Transport;
use raftblk_tls::server::RoleGateLayer;
use raftblk_tls::{ClientSecurity, ServerSecurity};

/// Runs the node until `shutdown` resolves.
pub async fn serve(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let mut config = config;
    let engine = Engine::open_with_budget(&config.data_dir, config.limits.memory_budget_bytes)
        .with_context(|| {
            format!(
                "cannot open the data directory {}",
                config.data_dir.display()
            )
        })?;
    let engine_at_stop = engine.clone();
    let ident = crate::identity::load(&engine, config.node_id)
        .with_context(|| format!("data directory {}", config.data_dir.display()))?;
    // TLS first: joining already talks to other nodes.
    let server_security = match config.tls.as_ref().and_then(|t| t.files()) {
        Some(files) => {
            let server =
                ServerSecurity::tls(files.clone(), config.node_id).context("TLS (tls.* keys)")?;
            crate::transport::set_security(
                ClientSecurity::tls_for_node(files, config.node_id).context("TLS (tls.* keys)")?,
            );
            tracing::info!(node = config.node_id, "mutual TLS on");
            server
        }
        None => {
            tracing::warn!(
                node = config.node_id,
                "TLS is off (tls.insecure_plaintext = true): anyone who reaches this node may do anything"
            );
            crate::transport::set_security(ClientSecurity::Plaintext);
            ServerSecurity::Plaintext
        }
    };
    let map = crate::join::prepare(&mut config, &engine, &ident).await?;
    let config = Arc::new(config);
    // Where the others are: the bootstrap nodes, then the last map seen.
    let book = Arc::new(AddressBook::new(
        config.cluster.nodes.iter().map(|n| (n.id, n.addr.clone())),
    ));
    if let Some(m) = &map {
        book.update(m);
        crate::map_sync::persist(&engine, m);
    }
    let rt = tokio::runtime::Handle::current();
    let tcfg = config.clone();
    let tengine = engine.clone();
    let tbook = book.clone();
    let tuuid = ident.uuid;
    let (store, handle) = store::create(
        config.clone(),
        ident,
        book,
        engine,
        move |tx, counters, suspects| {
            Transport::new(&tcfg, tuuid, tbook, tengine, rt, tx, counters, suspects)
        },
    )
    .context("cannot start the raft store")?;
    let store_thread = std::thread::Builder::new()
        .name("raft-store".into())
        .spawn(move || store.run())
        .context("cannot spawn the store thread")?;
    let addr: std::net::SocketAddr = config.listen_addr.parse().context("listen_addr")?;
    tracing::info!(node = config.node_id, %addr, groups = handle.views().len(), "raftblk-node serving");
    let svc_raft = RaftService {
        store: handle.clone(),
        store_tx: handle.sender(),
        nonce: AtomicU64::new(0),
    };
    let volumes = crate::service::volume_cache::VolumeCache::new(handle.clone());
    tokio::spawn(repair_loop(handle.clone()));
    tokio::spawn(crate::map_sync::run(handle.clone()));
    let reports: Arc<crate::placement::reports::Reports> = Default::default();
    let placement: Arc<crate::placement::driver::DriverStatus> = Default::default();
    tokio::spawn(crate::placement::driver::run(
        handle.clone(),
        reports.clone(),
        placement.clone(),
    ));
    tokio::spawn(crate::gc::run(handle.clone(), volumes.clone()));
    if let Some(maddr) = &config.metrics_addr {
        let maddr = maddr.parse().context("metrics_addr")?;
        let scrape = crate::metrics::Scrape {
            store: handle.clone(),
            placement: placement.clone(),
            per_group: config.metrics_per_group,
        };
        let bound = raftblk_metrics::serve(maddr, Some(Arc::new(move || scrape.refresh())))
            .await
            .context("cannot start the metrics endpoint")?;
        let _ = crate::metrics::BOUND_ADDR.set(bound);
    }
    if config.limits.scrub_blocks_per_sec > 0 {
        let scrub_store = handle.clone();
        std::thread::Builder::new()
            .name("scrub".into())
            .spawn(move || crate::scrub::run(scrub_store))
            .context("cannot spawn the scrub thread")?;
    }
    // On a shutdown signal: hand every leadership to another replica (so
    // clients are not left with a leader that no longer answers), then stop
    // serving; raft streams from peers never end by themselves, so give the
    // server a short grace period rather than waiting for them.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let hand_off = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        hand_off_leadership(&hand_off, std::time::Duration::from_secs(3)).await;
        let _ = stop_tx.send(true);
    });
    let mut stop_wait = stop_rx.clone();
    let mut stop_server = stop_rx;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let server = tonic::transport::Server::builder()
        .layer(RoleGateLayer {
            required: crate::service::roles::required,
        })
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(2)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(5)))
        .add_service(
            VolumesServer::new(VolumesService {
                store: handle.clone(),
            })
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(
            BlockIoServer::new(BlockIoService {
                store: handle.clone(),
                volumes,
            })
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(
            RaftTransportServer::new(svc_raft)
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        )
        .add_service(ClusterServer::new(ClusterService {
            store: handle.clone(),
            reports,
            placement,
            join_lock: tokio::sync::Mutex::new(()),
            usage_slot: std::sync::Arc::new(tokio::sync::Semaphore::new(1)),
            usage_cursor: Default::default(),
        }))
        .serve_with_incoming_shutdown(server_security.incoming(listener), async move {
            let _ = stop_server.wait_for(|stop| *stop).await;
        });
    let result = tokio::select! {
        r = server => r.with_context(|| format!("gRPC server on {addr}")),
        _ = async move {
            let _ = stop_wait.wait_for(|stop| *stop).await;
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        } => Ok(()),
    };
    // Applies skip the WAL (see `store::flush`): flush them, so a restart
    // finds them on disk instead of re-applying them from the log.
    if let Err(e) = engine_at_stop.flush_kv() {
        tracing::warn!(node = config.node_id, error = %e, "flushing the state machines at stop failed");
    }
    tracing::info!(node = config.node_id, "stopped");
    drop(handle);
    // The store thread exits once every handle (services, transport
    // receivers) is gone; do not wait on it forever.
    let _ = store_thread;
    result
}

/// Asks every group this node leads to transfer leadership to another
/// replica, and waits (bounded) until it leads none.
async fn hand_off_leadership(store: &store::StoreHandle, deadline: std::time::Duration) {
    let until = tokio::time::Instant::now() + deadline;
    let mut asked = std::collections::HashSet::new();
    loop {
        let led: Vec<u64> = store
            .views()
            .into_iter()
            .filter(|v| v.role == "leader" && v.members.voters.len() > 1)
            .map(|v| v.group)
            .collect();
        if led.is_empty() {
            tracing::info!("no group led here any more");
            return;
        }
        for g in &led {
            if asked.insert(*g) {
                store.request_transfer_leader(*g, None);
            }
        }
        if tokio::time::Instant::now() >= until {
            tracing::warn!(groups = ?led, "still leading groups at shutdown");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        // Re-ask for groups that were not handed over yet.
        if asked.len() == led.len() {
            asked.clear();
        }
    }
}

/// Asks group leaders to repair the blocks this node found corrupt: every
/// 500 ms, a bounded number per pass, each RPC under a timeout.
async fn repair_loop(store: store::StoreHandle) {
    const PER_PASS: usize = 64;
    let mut interval = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        interval.tick().await;
        let batch = store.suspects.take(PER_PASS);
        for (group, volume, block) in batch {
            let leader = store.view(group).map(|v| v.leader_id).unwrap_or(0);
            let addr = store.book.addr(leader);
            let done = match (leader, addr) {
                (l, Some(addr)) if l != 0 && l != store.config.node_id => {
                    request_repair(&addr, group, volume, block).await
                }
                (l, _) if l == store.config.node_id => {
                    // Our own copy is bad: let a healthy replica lead, and
                    // ask it for the repair on the next pass.
                    store.request_transfer_leader(group, None);
                    false
                }
                _ => false,
            };
            if !done {
                // Not yet: keep it for the next pass (bounded set).
                store.note_corrupt(group, volume, block);
            }
        }
    }
}

async fn request_repair(addr: &str, group: u64, volume: u64, block: u64) -> bool {
    let call = async {
        let ch = crate::transport::connect(addr).await.ok()?;
        let r = raftblk_proto::cluster_client::ClusterClient::new(ch)
            .repair_block(raftblk_proto::RepairBlockRequest {
                group_id: group,
                volume_id: volume,
                block,
            })
            .await
            .ok()?
            .into_inner();
        Some(r.error.is_none())
    };
    match tokio::time::timeout(std::time::Duration::from_secs(5), call).await {
        Ok(Some(true)) => {
            tracing::info!(
                group,
                volume,
                block,
                "block repaired from the leader's copy"
            );
            true
        }
        _ => false,
    }
}
