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

use crate::config::NodeConfig;
use crate::engine::Engine;
use crate::service::{
    block_io::BlockIoService, cluster::ClusterService, raft::RaftService, volumes::VolumesService,
};
use crate::store;
use crate::transport::Transport;

/// Runs the node until `shutdown` resolves.
pub async fn serve(
    config: NodeConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let engine = Engine::open(&config.data_dir).with_context(|| {
        format!(
            "cannot open the data directory {}",
            config.data_dir.display()
        )
    })?;
    let rt = tokio::runtime::Handle::current();
    let tcfg = config.clone();
    let tengine = engine.clone();
    let (store, handle) = store::create(config.clone(), engine, move |tx, counters| {
        Transport::new(&tcfg, tengine, rt, tx, counters)
    })
    .context("cannot start the raft store")?;
    let store_thread = std::thread::Builder::new()
        .name("raft-store".into())
        .spawn(move || store.run())
        .context("cannot spawn the store thread")?;
    let addr = config.listen_addr.parse().context("listen_addr")?;
    tracing::info!(node = config.node_id, %addr, groups = handle.views().len(), "raftblk-node serving");
    let svc_raft = RaftService {
        store: handle.clone(),
        store_tx: handle.sender(),
        nonce: AtomicU64::new(0),
    };
    let result = tonic::transport::Server::builder()
        .tcp_nodelay(true)
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
        }))
        .serve_with_shutdown(addr, shutdown)
        .await
        .with_context(|| format!("gRPC server on {addr}"));
    drop(handle);
    // The store thread exits once every handle (services, transport
    // receivers) is gone; do not wait on it forever.
    let _ = store_thread;
    result
}
