//! The volume records the block I/O path checks requests against (id,
//! size, chunk size), cached on every node so that data groups never need
//! a local meta replica: a miss, a stale entry or a request past the cached
//! end refreshes the record from the meta group by a linearizable read
//! (ReadIndex on the local meta replica when this node hosts one, else the
//! `Volumes.GetById` RPC on any meta replica, leader or follower).
//!
//! Staleness is bounded: an entry older than `limits.volume_cache_ttl_ms`
//! is never used (it is re-read first), and one older than half of that is
//! re-read in the background while still serving. So I/O to a deleted
//! volume is accepted for at most that long after the delete committed,
//! and I/O past the end is never accepted: volumes only grow, and a range
//! past the cached size always re-reads the record before it is refused.
//! Negative answers (no such volume) are cached the same way, so a client
//! hammering a deleted volume costs one meta read per TTL per node.
//!
//! The price of the bound: block I/O needs the meta group at least once
//! per TTL per volume and node. While the meta group has no quorum for
//! longer than that, requests get UNAVAILABLE (clients retry) instead of
//! being checked against records that may be stale.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use raftblk_proto::volumes_client::VolumesClient;
use raftblk_proto::{
    placement, AttachLease, Error as PbError, ErrorCode, VolumeIdRequest, VolumeInfo, META_GROUP_ID,
};
use tonic::transport::Channel;

use super::store_error;
use crate::apply;
use crate::store::StoreHandle;

/// Records kept at most; beyond it the oldest half is dropped.
const ENTRIES_MAX: usize = 65_536;
/// One `GetById` attempt on one meta replica.
const REMOTE_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(1500);

struct Entry {
    /// Shared: a cache hit clones a pointer, not the record.
    info: Option<Arc<VolumeInfo>>,
    fetched: Instant,
}

/// Cached catalog records, shared by the node's services and tasks.
pub struct VolumeCache {
    store: StoreHandle,
    ttl: Duration,
    entries: RwLock<HashMap<u64, Entry>>,
    /// One refresh per volume at a time; others wait for its answer.
    refreshing: Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    /// Volumes with a background refresh under way.
    background: Mutex<HashSet<u64>>,
    channels: Mutex<HashMap<String, Channel>>,
    /// The meta replica that answered last (asked first next time).
    last_good: AtomicUsize,
}

fn unavailable(msg: String) -> PbError {
    PbError::new(ErrorCode::Unavailable, msg)
}

impl VolumeCache {
    pub fn new(store: StoreHandle) -> Arc<VolumeCache> {
        let ttl = Duration::from_millis(store.config.limits.volume_cache_ttl_ms);
        Arc::new(VolumeCache {
            store,
            ttl,
            entries: RwLock::new(HashMap::new()),
            refreshing: Mutex::new(HashMap::new()),
            background: Mutex::new(HashSet::new()),
            channels: Mutex::new(HashMap::new()),
            last_good: AtomicUsize::new(0),
        })
    }

    fn cached(&self, id: u64) -> Option<(Option<Arc<VolumeInfo>>, Duration)> {
        let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
        map.get(&id).map(|e| (e.info.clone(), e.fetched.elapsed()))
    }

    fn remember(&self, id: u64, info: Option<Arc<VolumeInfo>>, fetched: Instant) {
        let mut map = self.entries.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= ENTRIES_MAX && !map.contains_key(&id) {
            let mut ages: Vec<(Instant, u64)> = map.iter().map(|(k, e)| (e.fetched, *k)).collect();
            ages.sort_unstable();
            for (_, k) in ages.into_iter().take(ENTRIES_MAX / 2) {
                map.remove(&k);
            }
        }
        match map.get(&id) {
            // Never replace a newer answer with an older one.
            Some(e) if e.fetched > fetched => {}
            _ => {
                map.insert(id, Entry { info, fetched });
            }
        }
    }

    /// Volume `id`, checked to cover `[.., end)`: served from the cache
    /// when fresh enough, else re-read from the meta group first.
    pub async fn volume_for_io(
        self: &Arc<Self>,
        id: u64,
        end: u64,
    ) -> Result<Arc<VolumeInfo>, PbError> {
        let info = match self.cached(id) {
            Some((Some(v), age)) if age < self.ttl && end <= v.size_bytes => {
                if age >= self.ttl / 2 && self.start_background(id) {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let _ = me.refresh(id, Instant::now(), false).await;
                        me.end_background(id);
                    });
                }
                Some(v)
            }
            Some((None, age)) if age < self.ttl => None,
            // Past the cached end: only an answer read after this request
            // arrived may refuse it (a grow may just have committed).
            Some((Some(v), _)) if end > v.size_bytes => {
                self.refresh(id, Instant::now(), true).await?
            }
            _ => self.refresh(id, Instant::now(), false).await?,
        };
        let v = info.ok_or_else(|| {
            PbError::new(ErrorCode::NoSuchVolume, format!("no volume with id {id}"))
        })?;
        if end > v.size_bytes {
            return Err(PbError::new(
                ErrorCode::OutOfRange,
                format!(
                    "range ends at byte {end}, past the end of volume {:?} ({} bytes)",
                    v.name, v.size_bytes
                ),
            ));
        }
        Ok(v)
    }

    /// One background refresh per volume at a time.
    fn start_background(&self, id: u64) -> bool {
        let mut b = self.background.lock().unwrap_or_else(|p| p.into_inner());
        b.insert(id)
    }

    fn end_background(&self, id: u64) {
        let mut b = self.background.lock().unwrap_or_else(|p| p.into_inner());
        b.remove(&id);
    }

    /// Re-reads volume `id`, unless an answer read after `asked` arrived
    /// meanwhile (another caller refreshed it) or, when not `strict`, one
    /// younger than half the TTL (callers queued behind one refresh share
    /// its answer).
    pub async fn refresh(
        &self,
        id: u64,
        asked: Instant,
        strict: bool,
    ) -> Result<Option<Arc<VolumeInfo>>, PbError> {
        let lock = {
            let mut r = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
            r.entry(id).or_default().clone()
        };
        let _guard = lock.lock().await;
        {
            let map = self.entries.read().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = map.get(&id) {
                if e.fetched >= asked || (!strict && e.fetched.elapsed() < self.ttl / 2) {
                    return Ok(e.info.clone());
                }
            }
        }
        let fetched = Instant::now();
        let result = self
            .fetch(id)
            .await
            .map(|v| v.map(|(info, _)| Arc::new(info)));
        if let Ok(info) = &result {
            self.remember(id, info.clone(), fetched);
        }
        {
            let mut r = self.refreshing.lock().unwrap_or_else(|p| p.into_inner());
            if Arc::strong_count(&lock) <= 2 {
                r.remove(&id);
            }
        }
        result
    }

    /// A linearizable read of volume `id`'s record and attach lease from
    /// the meta group. Errors are always UNAVAILABLE: they are about the
    /// meta group, and must not read as (say) a NOT_LEADER hint for the
    /// data group the request addressed.
    pub async fn fetch(&self, id: u64) -> Result<Option<Record>, PbError> {
        let mut local_error = None;
        if self.store.view(META_GROUP_ID).is_some() {
            let local = async {
                self.store
                    .read_index(META_GROUP_ID, true)
                    .await
                    .map_err(|e| store_error(&self.store, e))?;
                read_local_catalog(&self.store, id)
            };
            let budget = Duration::from_millis(self.store.config.limits.request_timeout_ms / 2);
            match tokio::time::timeout(budget, local).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => local_error = Some(e.to_string()),
                Err(_) => local_error = Some("local meta replica timed out".to_string()),
            }
        }
        // No local meta replica, or it cannot answer now (no leader known,
        // lagging, installing): ask the others.
        self.fetch_remote(id).await.map_err(|e| match local_error {
            Some(l) => unavailable(format!("{}; local meta replica: {l}", e.message)),
            None => e,
        })
    }

    async fn fetch_remote(&self, id: u64) -> Result<Option<Record>, PbError> {
        let cfg = &self.store.config;
        let mut meta = self.store.book.meta_voters();
        if meta.is_empty() {
            // No map yet: the bootstrap placement.
            meta = placement::group_replicas(&cfg.node_ids(), META_GROUP_ID, cfg.cluster.replicas);
        }
        let deadline = Instant::now() + Duration::from_millis(cfg.limits.request_timeout_ms);
        let mut reasons = Vec::new();
        let first = self.last_good.load(Ordering::Relaxed) % meta.len().max(1);
        for k in 0..meta.len() {
            let at = (first + k) % meta.len();
            let node = meta[at];
            if node == cfg.node_id {
                continue;
            }
            let Some(addr) = self.store.book.addr(node) else {
                continue;
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let ch = match self.channel(&addr) {
                Ok(c) => c,
                Err(e) => {
                    reasons.push(format!("node {node}: {e}"));
                    continue;
                }
            };
            let mut client = VolumesClient::new(ch);
            let call = client.get_by_id(VolumeIdRequest { id });
            match tokio::time::timeout(REMOTE_ATTEMPT_TIMEOUT.min(left), call).await {
                Ok(Ok(r)) => {
                    let r = r.into_inner();
                    match r.error {
                        None => {
                            self.last_good.store(at, Ordering::Relaxed);
                            return Ok(r.volume.map(|v| (v, r.lease)));
                        }
                        Some(e) if e.kind() == ErrorCode::NoSuchVolume => {
                            self.last_good.store(at, Ordering::Relaxed);
                            return Ok(None);
                        }
                        Some(e) => reasons.push(format!("node {node}: {e}")),
                    }
                }
                Ok(Err(s)) => reasons.push(format!("node {node}: {}", s.message())),
                Err(_) => reasons.push(format!("node {node}: timed out")),
            }
        }
        Err(unavailable(format!(
            "cannot read volume {id} from the meta group: {}",
            reasons.join("; ")
        )))
    }

    fn channel(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let c = crate::transport::connect_lazy(addr)?;
        map.insert(addr.to_owned(), c.clone());
        Ok(c)
    }
}

/// A volume's catalog record and its attach lease (`None`: never attached).
pub type Record = (VolumeInfo, Option<AttachLease>);

/// Volume `id`'s record and lease from this node's meta replica (after a
/// ReadIndex): refused, not answered "absent", while a snapshot install
/// rewrites the meta group's range.
pub fn read_local_catalog(store: &StoreHandle, id: u64) -> Result<Option<Record>, PbError> {
    let busy = || {
        unavailable(format!(
            "node {}: the catalog is being rewritten by a snapshot install",
            store.config.node_id
        ))
    };
    let gen = store.install_gen.stable(META_GROUP_ID).ok_or_else(busy)?;
    let storage = |e: crate::engine::EngineError| PbError::new(ErrorCode::Storage, e.to_string());
    let r = match apply::lookup_volume_by_id(&store.engine, id).map_err(storage)? {
        Some(v) => Some((
            v,
            crate::lease::lookup_lease(&store.engine, id).map_err(storage)?,
        )),
        None => None,
    };
    if !store.install_gen.unchanged(META_GROUP_ID, gen) {
        return Err(busy());
    }
    Ok(r)
}
