//! How the CLI's read commands print for scripts (`--output json`: one
//! JSON document on stdout, field names as in the protocol, sizes in
//! bytes, times in Unix milliseconds plus an RFC 3339 UTC string) and the
//! dates the text output shows.

use raftblk_client::usage::UsageReport;
use raftblk_proto::{AttachLease, NodeStatusResponse, SnapshotState, VolumeInfo};
use serde_json::{json, Value};

/// `--output`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Output {
    #[default]
    Text,
    Json,
}

/// Unix milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

fn state_name(s: i32) -> &'static str {
    match SnapshotState::try_from(s) {
        Ok(SnapshotState::SnapshotPending) => "pending",
        Ok(SnapshotState::SnapshotReady) => "ready",
        Ok(SnapshotState::SnapshotDeleting) => "deleting",
        _ => "unknown",
    }
}

/// One volume, as `volume list --output json` shows it. Stored bytes
/// (data plus what its snapshots keep; one copy) are null when no member
/// could count, and `stored_complete` is false when some group was not
/// counted (the figures are then lower bounds).
pub fn volume_summary(v: &VolumeInfo, usage: Option<&UsageReport>) -> Value {
    let u = usage.map(|r| r.of(v.id));
    json!({
        "stored_bytes": u.map(|u| u.stored_bytes.saturating_add(u.snapshot_bytes)),
        "data_stored_bytes": u.map(|u| u.stored_bytes),
        "snapshot_stored_bytes": u.map(|u| u.snapshot_bytes),
        "stored_complete": usage.map(UsageReport::complete),
        "id": v.id,
        "name": v.name,
        "size_bytes": v.size_bytes,
        "chunk_size_bytes": v.chunk_size_bytes,
        "created_unix_ms": v.created_unix_ms,
        "created": utc(v.created_unix_ms),
        "snapshots": v.snapshots.len(),
        "parent": v.parent.as_ref().map(|p| json!({
            "volume_id": p.volume_id,
            "snapshot_id": p.snapshot_id,
        })),
    })
}

/// One volume in full (`volume info --output json`).
pub fn volume_detail(
    v: &VolumeInfo,
    lease: Option<&AttachLease>,
    usage: Option<&UsageReport>,
) -> Value {
    let mut out = volume_summary(v, usage);
    out["chunks"] = json!(v.size_bytes.div_ceil(v.chunk_size_bytes.max(1)));
    out["snapshots"] = Value::Array(
        v.snapshots
            .iter()
            .map(|s| {
                json!({
                    "id": s.id,
                    "name": s.name,
                    "state": state_name(s.state),
                    "size_bytes": s.size_bytes,
                    "created_unix_ms": s.created_unix_ms,
                    "created": utc(s.created_unix_ms),
                    "quiesce_us": s.quiesce_us,
                })
            })
            .collect(),
    );
    out["qos"] = match &v.qos {
        Some(q) => json!({
            "iops_max": q.iops_max, "read_iops_max": q.read_iops_max,
            "write_iops_max": q.write_iops_max, "bps_max": q.bps_max,
            "read_bps_max": q.read_bps_max, "write_bps_max": q.write_bps_max,
            "iops_burst": q.iops_burst, "bps_burst": q.bps_burst,
        }),
        None => Value::Null,
    };
    out["lease"] = match lease {
        Some(l) if !l.holder.is_empty() => json!({
            "holder": l.holder,
            "epoch": l.epoch,
            "expires_unix_ms": l.expires_unix_ms,
        }),
        Some(l) => json!({ "holder": null, "epoch": l.epoch }),
        None => Value::Null,
    };
    out
}

/// `cluster status --output json`: every node's answer (or why it did not
/// answer), each group's leader view, the placement driver's view, and
/// the same health verdict as the text output.
pub fn status(
    data_groups: u64,
    statuses: &[(u64, String, Result<NodeStatusResponse, String>)],
) -> Value {
    let mut leaders = std::collections::BTreeMap::new();
    let nodes: Vec<Value> = statuses
        .iter()
        .map(|(id, addr, r)| match r {
            Ok(s) => {
                for g in s.groups.iter().filter(|g| g.role == "leader") {
                    leaders.insert(g.group_id, (*id, g.clone()));
                }
                json!({
                    "id": id, "addr": addr, "up": true,
                    "groups": s.groups.len(),
                    "leading": s.groups.iter().filter(|g| g.role == "leader").count(),
                    "hibernating": s.groups.iter().filter(|g| g.hibernating).count(),
                    "checksum_errors": s.checksum_errors,
                    "snapshots_sent": s.snapshots_sent,
                    "snapshots_applied": s.snapshots_applied,
                    "metrics_addr": s.metrics_addr,
                })
            }
            Err(e) => json!({ "id": id, "addr": addr, "up": false, "error": e }),
        })
        .collect();
    let groups: Vec<Value> = (0..=data_groups)
        .map(|g| match leaders.get(&g) {
            Some((l, st)) => json!({
                "group": g, "leader": l, "term": st.term,
                "commit_index": st.commit_index, "applied_index": st.applied_index,
                "voters": st.replicas, "learners": st.learners,
                "voters_outgoing": st.voters_outgoing,
            }),
            None => json!({ "group": g, "leader": null }),
        })
        .collect();
    let placement = statuses
        .iter()
        .filter_map(|(_, _, r)| r.as_ref().ok())
        .filter_map(|s| s.placement)
        .find(|p| p.active);
    let down = statuses.iter().filter(|(_, _, r)| r.is_err()).count();
    let leaderless = (0..=data_groups)
        .filter(|g| !leaders.contains_key(g))
        .count();
    let (degraded, moving) = placement.map_or((0, 0), |p| (p.degraded_groups, p.moves_in_progress));
    json!({
        "nodes": nodes,
        "groups": groups,
        "placement": placement.map(|p| json!({
            "degraded_groups": p.degraded_groups,
            "moves_in_progress": p.moves_in_progress,
            "moves_done": p.moves_done,
            "balanced": p.balanced,
        })),
        "healthy": down == 0 && leaderless == 0 && degraded == 0 && moving == 0,
        "nodes_down": down,
        "groups_without_leader": leaderless,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_utc() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(utc(1_796_590_110_000), "2026-12-06T20:48:30.000Z");
    }
}
