//! Raft transport, sending side: one long-lived gRPC stream per peer node,
//! messages batched per peer, reconnect with backoff, bounded queues (a full
//! queue drops messages: raft retransmits). Snapshots go on their own
//! stream, read from a DB snapshot in bounded pieces.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::Message;
use raftblk_proto::raft_transport_client::RaftTransportClient;
use raftblk_proto::{RaftBatch, RaftEnvelope, GRPC_MESSAGE_BYTES_MAX};
use raftblk_tls::ClientSecurity;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::address_book::AddressBook;
use crate::config::NodeConfig;
use crate::counters::{Counters, Suspects};
use crate::engine::{Engine, OwnedSnapshot};
use crate::metrics::METRICS;
use crate::msg::StoreMsg;
use raftblk_metrics::prometheus::IntCounter;

mod snapshot;
use snapshot::{send_snapshot, SnapshotSource};

const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often a snapshot transfer's progress is checked.
const STALL_CHECK: Duration = Duration::from_millis(500);

/// How this node connects to others (TLS with its node certificate, or
/// plaintext): set once at start, before the first connection.
static SECURITY: std::sync::OnceLock<ClientSecurity> = std::sync::OnceLock::new();

/// Sets how every internal connection is made (the first call wins).
pub fn set_security(s: ClientSecurity) {
    let _ = SECURITY.set(s);
}

fn security() -> ClientSecurity {
    SECURITY.get().cloned().unwrap_or(ClientSecurity::Plaintext)
}

/// The keepalives and timeouts every internal connection uses.
fn endpoint(addr: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true))
}

/// Opens a channel to another node.
pub async fn connect(addr: &str) -> Result<Channel, tonic::transport::Error> {
    security().connect(endpoint(addr)?).await
}

/// A channel to another node, connected at its first request.
pub fn connect_lazy(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(security().connect_lazy(endpoint(addr)?))
}

/// What a peer link carries.
enum Outgoing {
    Raft {
        group: u64,
        conf_ver: u64,
        msg: Message,
    },
    Gc {
        group: u64,
        conf_ver: u64,
        peer: u64,
    },
    Hibernate {
        group: u64,
        term: u64,
        commit: u64,
    },
}

/// Sending side of the raft transport, owned by the store thread.
pub struct Transport {
    node_id: u64,
    store_uuid: bytes::Bytes,
    /// One link per peer: its address and queue.
    peers: HashMap<u64, (String, mpsc::Sender<Outgoing>)>,
    book: Arc<AddressBook>,
    /// The address book's epoch the links were last matched to.
    book_epoch: u64,
    rt: tokio::runtime::Handle,
    store_tx: mpsc::Sender<StoreMsg>,
    counters: Arc<Counters>,
    suspects: Arc<Suspects>,
    engine: Engine,
    piece_bytes: usize,
    /// A snapshot transfer that moves nothing for this long is abandoned.
    snapshot_stall: Duration,
    /// Shared by every snapshot sent (the rebuild throttle).
    throttle: Arc<crate::throttle::Throttle>,
    queue_capacity: usize,
    batch_msgs_max: usize,
    batch_bytes_max: usize,
    keepalive: Duration,
}

impl Transport {
    /// Spawns one sender task per known peer on `rt`.
    // Each argument is a separate piece of the node's wiring (built once,
    // in `server`); a struct for them would only be taken apart here.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &NodeConfig,
        store_uuid: [u8; 16],
        book: Arc<AddressBook>,
        engine: Engine,
        rt: tokio::runtime::Handle,
        store_tx: mpsc::Sender<StoreMsg>,
        counters: Arc<Counters>,
        suspects: Arc<Suspects>,
    ) -> Transport {
        let mut t = Transport {
            node_id: config.node_id,
            store_uuid: bytes::Bytes::copy_from_slice(&store_uuid),
            peers: HashMap::new(),
            book,
            book_epoch: u64::MAX,
            rt,
            store_tx,
            counters,
            suspects,
            engine,
            piece_bytes: config.raft.snapshot_piece_bytes as usize,
            snapshot_stall: Duration::from_secs(config.placement.snapshot_stall_secs),
            throttle: Arc::new(crate::throttle::Throttle::new(
                config.placement.snapshot_bytes_per_sec,
            )),
            queue_capacity: config.limits.peer_queue_capacity,
            batch_msgs_max: config.limits.transport_batch_msgs_max,
            batch_bytes_max: config.limits.transport_batch_bytes_max,
            keepalive: Duration::from_millis(
                config.raft.tick_interval_ms * config.raft.heartbeat_ticks as u64,
            ),
        };
        t.refresh();
        t
    }

    /// Matches the links to the address book: a link for every member
    /// (so keepalives reach it even with no group in common), none for
    /// nodes gone from it, a new link for a node whose address changed.
    pub fn refresh(&mut self) {
        let epoch = self.book.epoch();
        if epoch == self.book_epoch {
            return;
        }
        self.book_epoch = epoch;
        let nodes: HashMap<u64, String> = self
            .book
            .nodes()
            .into_iter()
            .filter(|(id, _)| *id != self.node_id)
            .collect();
        // Dropping a link's sender ends its task.
        self.peers
            .retain(|id, (addr, _)| nodes.get(id).is_some_and(|a| a == addr));
        for (id, addr) in nodes {
            if !self.peers.contains_key(&id) {
                self.spawn_link(id, addr);
            }
        }
    }

    fn spawn_link(&mut self, to: u64, addr: String) {
        let (tx, rx) = mpsc::channel(self.queue_capacity);
        self.peers.insert(to, (addr.clone(), tx));
        let peer = PeerLink {
            from: self.node_id,
            uuid: self.store_uuid.clone(),
            to,
            addr,
            rx,
            store_tx: self.store_tx.clone(),
            batch_msgs_max: self.batch_msgs_max,
            batch_bytes_max: self.batch_bytes_max,
            keepalive: self.keepalive,
            sent: {
                // Exported at 0 from the start, like every per-peer series.
                METRICS.raft_dropped.with_label_values(&[&to.to_string()]);
                METRICS.raft_received.with_label_values(&[&to.to_string()]);
                METRICS
                    .raft_received_bytes
                    .with_label_values(&[&to.to_string()]);
                METRICS.raft_sent.with_label_values(&[&to.to_string()])
            },
            sent_bytes: METRICS
                .raft_sent_bytes
                .with_label_values(&[&to.to_string()]),
        };
        self.rt.spawn(peer.run());
    }

    /// Queues a raft message of `group` (at configuration version
    /// `conf_ver`) for its peer; false if it was dropped (no link to that
    /// peer, or its queue is full: raft resends).
    pub fn send(&self, group: u64, conf_ver: u64, msg: Message) -> bool {
        let to = crate::membership::node_of(msg.to);
        self.queue(
            to,
            Outgoing::Raft {
                group,
                conf_ver,
                msg,
            },
        )
    }

    /// Tells node `to` that its replica `peer` (a raft peer id) is not a
    /// member of `group` at `conf_ver`.
    pub fn send_gc(&self, to: u64, group: u64, conf_ver: u64, peer: u64) {
        self.queue(
            to,
            Outgoing::Gc {
                group,
                conf_ver,
                peer,
            },
        );
    }

    /// Tells follower `to` that this leader's `group` hibernates.
    pub fn send_hibernate(&self, to: u64, group: u64, term: u64, commit: u64) {
        self.queue(
            to,
            Outgoing::Hibernate {
                group,
                term,
                commit,
            },
        );
    }

    fn queue(&self, to: u64, out: Outgoing) -> bool {
        let dropped = || {
            self.counters
                .dropped_messages
                .fetch_add(1, Ordering::Relaxed);
            METRICS
                .raft_dropped
                .with_label_values(&[&to.to_string()])
                .inc();
        };
        let Some((_, tx)) = self.peers.get(&to) else {
            dropped();
            return false;
        };
        if tx.try_send(out).is_err() {
            dropped();
            return false;
        }
        true
    }

    /// Streams a snapshot to its receiver in the background and reports the
    /// outcome to the store.
    pub fn send_snapshot(&self, group: u64, msg: Message, snap: OwnedSnapshot) {
        // `to` is the raft peer (raft is told about it), its node the
        // receiver.
        let to = msg.to;
        let Some(addr) = self
            .peers
            .get(&crate::membership::node_of(to))
            .map(|(a, _)| a.clone())
        else {
            return;
        };
        let from = self.node_id;
        let store_tx = self.store_tx.clone();
        let engine = self.engine.clone();
        let piece_bytes = self.piece_bytes;
        let stall = self.snapshot_stall;
        let suspects = self.suspects.clone();
        let counters = self.counters.clone();
        let throttle = self.throttle.clone();
        self.rt.spawn(async move {
            let source = SnapshotSource {
                snap,
                engine,
                suspects,
                counters,
                throttle,
            };
            let r = send_snapshot(from, addr, group, msg, source, piece_bytes, stall).await;
            if let Err(e) = &r {
                tracing::warn!(group, to, error = %e, "snapshot transfer failed");
            } else {
                tracing::info!(group, to, "snapshot sent");
            }
            let _ = store_tx
                .send(StoreMsg::SnapshotStatus {
                    group,
                    to,
                    ok: r.is_ok(),
                })
                .await;
        });
    }
}

/// One peer's sender task.
struct PeerLink {
    from: u64,
    /// This node's data-directory identity, sent with every batch.
    uuid: bytes::Bytes,
    to: u64,
    addr: String,
    rx: mpsc::Receiver<Outgoing>,
    store_tx: mpsc::Sender<StoreMsg>,
    batch_msgs_max: usize,
    batch_bytes_max: usize,
    /// An empty batch goes out when nothing else did for this long, so the
    /// peer hears from this node even when every group is quiet.
    keepalive: Duration,
    /// This peer's series of `raftblk_node_raft_messages_sent_total` and
    /// `..._sent_bytes_total`.
    sent: IntCounter,
    sent_bytes: IntCounter,
}

impl PeerLink {
    async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match connect(&self.addr).await {
                Ok(channel) => {
                    backoff = BACKOFF_MIN;
                    tracing::debug!(node = self.from, peer = self.to, "raft stream connected");
                    if !self.stream(channel).await {
                        return;
                    }
                }
                Err(e) => {
                    tracing::debug!(node = self.from, peer = self.to, error = %e, "peer unreachable");
                }
            }
            // Messages queued while disconnected are stale: raft resends.
            while self.rx.try_recv().is_ok() {}
            let _ = self
                .store_tx
                .try_send(StoreMsg::Unreachable { to: self.to });
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// Feeds one stream until it fails; false when the store is gone.
    async fn stream(&mut self, channel: Channel) -> bool {
        let mut client = RaftTransportClient::new(channel)
            .max_encoding_message_size(GRPC_MESSAGE_BYTES_MAX)
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX);
        let (btx, brx) = mpsc::channel::<RaftBatch>(8);
        let call = client.send(ReceiverStream::new(brx));
        tokio::pin!(call);
        let mut keepalive = tokio::time::interval(self.keepalive);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut sent = false;
        loop {
            tokio::select! {
                res = &mut call => {
                    if let Err(e) = res {
                        tracing::debug!(node = self.from, peer = self.to, error = %e, "raft stream ended");
                    }
                    return true;
                }
                first = self.rx.recv() => {
                    let Some(first) = first else { return false };
                    let batch = self.batch(first);
                    if btx.send(batch).await.is_err() {
                        return true;
                    }
                    sent = true;
                }
                _ = keepalive.tick() => {
                    if !std::mem::take(&mut sent) {
                        let empty = RaftBatch {
                            from_node: self.from,
                            to_node: self.to,
                            envelopes: Vec::new(),
                            from_store_uuid: self.uuid.clone(),
                        };
                        // Never wait for room: a full stream is not idle.
                        let _ = btx.try_send(empty);
                    }
                }
            }
        }
    }

    fn batch(&mut self, first: Outgoing) -> RaftBatch {
        let mut envelopes = Vec::new();
        let mut bytes = 0usize;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                Outgoing::Raft {
                    group,
                    conf_ver,
                    msg,
                } => match msg.write_to_bytes() {
                    Ok(b) => {
                        bytes += b.len();
                        envelopes.push(RaftEnvelope {
                            group_id: group,
                            message: b.into(),
                            conf_ver,
                            ..Default::default()
                        });
                    }
                    Err(e) => tracing::warn!(group, error = %e, "cannot encode raft message"),
                },
                Outgoing::Gc {
                    group,
                    conf_ver,
                    peer,
                } => envelopes.push(RaftEnvelope {
                    group_id: group,
                    conf_ver,
                    gc: true,
                    gc_peer: peer,
                    ..Default::default()
                }),
                Outgoing::Hibernate {
                    group,
                    term,
                    commit,
                } => envelopes.push(RaftEnvelope {
                    group_id: group,
                    hibernate: true,
                    term,
                    commit,
                    ..Default::default()
                }),
            }
            if envelopes.len() >= self.batch_msgs_max || bytes >= self.batch_bytes_max {
                break;
            }
            next = self.rx.try_recv().ok();
        }
        self.sent.inc_by(envelopes.len() as u64);
        self.sent_bytes.inc_by(bytes as u64);
        RaftBatch {
            from_node: self.from,
            to_node: self.to,
            envelopes,
            from_store_uuid: self.uuid.clone(),
        }
    }
}
