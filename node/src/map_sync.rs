//! This node's side of the cluster map: once per heartbeat interval it
//! reports to the meta leader (its address, data-directory identity, disk
//! space, the groups it leads and hosts) and, when the map changed, fetches
//! it, updates the address book and persists it (a restart finds its peers
//! even before any meta replica answers). All calls are bounded in time;
//! the meta leader is found through the map's meta voters and leader hints.
//!
//! The map also catches replicas the GC notices cannot (see
//! `store::conf`): a replica that never speaks, such as a learner whose
//! move was rolled back while its node was down, is destroyed once the map
//! records a newer configuration of its group without this node.

use std::time::Duration;

use prost::Message as _;
use raftblk_proto::cluster_client::ClusterClient;
use raftblk_proto::{
    ClusterMap, Empty, ErrorCode, GroupStatus, NodeHeartbeat, PeerProgress, META_GROUP_ID,
};
use rocksdb::WriteBatch;

use crate::engine::Engine;
use crate::store::StoreHandle;

/// One RPC to the meta group.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

/// The persisted map, if any.
pub fn load_persisted(engine: &Engine) -> Option<ClusterMap> {
    let v = engine.get_raft(&crate::keys::store_map()).ok()??;
    ClusterMap::decode(v.as_slice()).ok()
}

/// Writes `map` as this node's last known map.
pub fn persist(engine: &Engine, map: &ClusterMap) {
    let mut wb = WriteBatch::default();
    wb.put_cf(
        engine.raft_cf(),
        crate::keys::store_map(),
        map.encode_to_vec(),
    );
    if let Err(e) = engine.write(wb, false) {
        tracing::warn!(error = %e, "cannot persist the cluster map");
    }
}

/// Bytes (total, available) of the file system holding `path`.
pub fn disk_space(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) writes into the zeroed struct we own; `c` is a
    // valid NUL-terminated path for the duration of the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

/// Takes `map` into the address book (and persists it) if it is newer.
pub fn take_map(store: &StoreHandle, map: &ClusterMap) {
    if map.epoch > store.book.epoch() {
        store.book.update(map);
        persist(&store.engine, map);
    }
}

/// Replicas here that the map shows were removed: the map records a newer
/// committed configuration of their group that leaves this node out.
/// An uninitialized replica (version 0, waiting for its first snapshot)
/// is judged by its incarnation (the version that added it), so a learner
/// whose move was rolled back before it got a snapshot goes too. Each is
/// `(group, conf_ver, peer)`: the notice names the incarnation seen here,
/// so a newer one created meanwhile is not destroyed by it.
pub fn stale_replicas(store: &StoreHandle, map: &ClusterMap) -> Vec<(u64, u64, u64)> {
    let me = store.config.node_id;
    let mut out = Vec::new();
    for v in store.views() {
        // An uninitialized replica's own version is 0; its incarnation is
        // the version that added it, so a newer map without this node saw
        // it removed.
        let local = if v.members.conf_ver == 0 {
            crate::membership::incarnation_of(v.peer)
        } else {
            v.members.conf_ver
        };
        if local == 0 {
            continue;
        }
        let Some(rec) = map.groups.iter().find(|g| g.group_id == v.group) else {
            continue;
        };
        let member = rec.voters.contains(&me)
            || rec.learners.contains(&me)
            || rec.voters_outgoing.contains(&me);
        if rec.conf_ver > local && !member {
            out.push((v.group, rec.conf_ver, v.peer));
        }
    }
    out
}

/// The map as this node's meta replica has applied it, after a ReadIndex
/// (linearizable); None if there is no local meta replica or it cannot
/// answer now.
pub async fn read_local(store: &StoreHandle) -> Option<ClusterMap> {
    store.view(META_GROUP_ID)?;
    store.read_index(META_GROUP_ID, true).await.ok()?;
    let engine = store.engine.clone();
    tokio::task::spawn_blocking(move || crate::cluster_map::read(&engine).ok())
        .await
        .ok()?
}

/// Nodes to ask for meta things, best first: the meta voters of the map,
/// then every known node, then the seeds (as addresses).
fn meta_candidates(store: &StoreHandle, leader_hint: u64) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |a: Option<String>| {
        if let Some(a) = a {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    };
    if leader_hint != 0 {
        push(store.book.addr(leader_hint));
    }
    for id in store.book.meta_voters() {
        push(store.book.addr(id));
    }
    for (_, a) in store.book.nodes() {
        push(Some(a));
    }
    for s in &store.config.seeds {
        push(Some(s.clone()));
    }
    out
}

/// Fetches the map from another node (linearizable if it hosts a meta
/// replica).
pub async fn fetch_remote(store: &StoreHandle) -> Option<ClusterMap> {
    for addr in meta_candidates(store, 0).into_iter().take(8) {
        if addr == store.config.listen_addr {
            continue;
        }
        let Ok(ch) = crate::transport::connect(&addr).await else {
            continue;
        };
        let mut client = ClusterClient::new(ch);
        let call = client.get_map(Empty {});
        if let Ok(Ok(r)) = tokio::time::timeout(CALL_TIMEOUT, call).await {
            let r = r.into_inner();
            if r.error.is_none() {
                if let Some(m) = r.map {
                    return Some(m);
                }
            }
        }
    }
    None
}

fn heartbeat(store: &StoreHandle) -> NodeHeartbeat {
    let views = store.views();
    let (capacity, available) = disk_space(&store.config.data_dir).unwrap_or((0, 0));
    NodeHeartbeat {
        node_id: store.config.node_id,
        addr: store.config.listen_addr.clone(),
        store_uuid: store.store_uuid.to_vec().into(),
        capacity_bytes: capacity,
        available_bytes: available,
        hosted: views.iter().map(|v| v.group).collect(),
        led: views
            .iter()
            .filter(|v| v.role == "leader")
            .map(|v| GroupStatus {
                group_id: v.group,
                replicas: v.members.voters.clone(),
                learners: v.members.learners.clone(),
                voters_outgoing: v.members.voters_outgoing.clone(),
                conf_ver: v.members.conf_ver,
                leader_id: v.leader_id,
                term: v.term,
                // The commit index of the moment the progress was taken.
                commit_index: v.progress_commit,
                applied_index: v.applied_index,
                progress: v
                    .progress
                    .iter()
                    .map(|&(node_id, matched, state)| PeerProgress {
                        node_id,
                        matched,
                        state: state.to_owned(),
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        map_epoch: store.book.epoch(),
    }
}

/// Sends one heartbeat to the meta leader; returns the map epoch it
/// reported, and the leader that answered.
async fn send_heartbeat(store: &StoreHandle, leader_hint: u64) -> Option<(u64, u64)> {
    let hb = heartbeat(store);
    let mut hint = leader_hint;
    if let Some(v) = store.view(META_GROUP_ID) {
        if v.leader_id != 0 {
            hint = v.leader_id;
        }
    }
    let mut tried = Vec::new();
    for _ in 0..4 {
        let addrs = meta_candidates(store, hint);
        let Some(addr) = addrs.into_iter().find(|a| !tried.contains(a)) else {
            break;
        };
        tried.push(addr.clone());
        let Ok(ch) = crate::transport::connect(&addr).await else {
            continue;
        };
        let mut client = ClusterClient::new(ch);
        let call = client.heartbeat(hb.clone());
        match tokio::time::timeout(CALL_TIMEOUT, call).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                match r.error {
                    None => return Some((r.map_epoch, hint)),
                    Some(e) if e.kind() == ErrorCode::NotLeader => {
                        if e.leader_id != 0 {
                            hint = e.leader_id;
                            if let Some(a) = store.book.addr(e.leader_id) {
                                tried.retain(|t| *t != a);
                            }
                        }
                    }
                    Some(e) => {
                        tracing::warn!(error = %e, "heartbeat refused by the meta leader");
                        return None;
                    }
                }
            }
            _ => continue,
        }
    }
    None
}

/// Runs until the process ends.
pub async fn run(store: StoreHandle) {
    let every = Duration::from_millis(store.config.placement.heartbeat_interval_ms);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader = 0u64;
    let mut since_fetch = 0u32;
    loop {
        tick.tick().await;
        let reported = send_heartbeat(&store, leader).await;
        if let Some((_, l)) = reported {
            leader = l;
        }
        since_fetch += 1;
        // Fetch when the leader says the map moved on, and every 10
        // intervals regardless (a lost response, a leader change).
        let stale = reported.is_some_and(|(epoch, _)| epoch > store.book.epoch());
        if stale || since_fetch >= 10 || store.book.map().is_none() {
            let map = match read_local(&store).await {
                Some(m) => Some(m),
                None => fetch_remote(&store).await,
            };
            if let Some(m) = map {
                take_map(&store, &m);
                since_fetch = 0;
                for (group, conf_ver, peer) in stale_replicas(&store, &m) {
                    tracing::info!(
                        group,
                        conf_ver,
                        peer,
                        "the map shows this replica was removed"
                    );
                    let gc = crate::msg::StoreMsg::RaftGc {
                        from: 0,
                        group,
                        conf_ver,
                        peer,
                    };
                    let _ = store.sender().try_send(gc);
                }
            }
        }
    }
}
