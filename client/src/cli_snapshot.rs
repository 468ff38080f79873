//! `raftblk snapshot ...` and the image commands of `raftblk volume`
//! (clone, flatten, export-diff, import-diff).

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use clap::Subcommand;
use raftblk_client::size::format_size;
use raftblk_client::snapshot::parse_snap_spec;
use raftblk_client::Client;
use raftblk_proto::SnapshotState;

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Take a crash-consistent snapshot (the volume's holder holds its
    /// writes for the moment of the cut).
    Create { spec: String },
    /// List a volume's snapshots.
    List { volume: String },
    /// Delete a snapshot (refused while clones use it).
    Delete { spec: String },
    /// Set a volume back to a snapshot (refused while it is attached).
    Rollback { spec: String },
}

/// Image commands of `raftblk volume`.
#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Make a writable volume that shares a snapshot's blocks (constant
    /// time, whatever the size).
    Clone { spec: String, name: String },
    /// Copy what a clone shares with its parent into it, so the parent
    /// snapshot may be deleted (refused while the clone is attached).
    Flatten { name: String },
    /// Write the blocks that changed between two snapshots (all blocks
    /// holding data without --from-snap) to a file.
    ExportDiff {
        spec: String,
        file: PathBuf,
        #[arg(long)]
        from_snap: Option<String>,
    },
    /// Apply a file from export-diff to a volume (holding its lease).
    ImportDiff { file: PathBuf, name: String },
}

fn state_name(s: i32) -> &'static str {
    match SnapshotState::try_from(s) {
        Ok(SnapshotState::SnapshotPending) => "pending",
        Ok(SnapshotState::SnapshotReady) => "ready",
        Ok(SnapshotState::SnapshotDeleting) => "deleting",
        _ => "?",
    }
}

pub async fn snapshot(client: &Client, cmd: &SnapshotCmd) -> anyhow::Result<()> {
    match cmd {
        SnapshotCmd::Create { spec } => {
            let (vol, snap) = parse_snap_spec(spec)?;
            let t = std::time::Instant::now();
            let s = client.create_snapshot(vol, snap).await?;
            outln!(
                "created snapshot {vol}@{} (id {}, {}): writes held {:.3} ms, {:.0} ms in all",
                s.name,
                s.id,
                format_size(s.size_bytes),
                s.quiesce_us as f64 / 1000.0,
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
        SnapshotCmd::List { volume } => {
            let v = client.volume_info(volume).await?;
            outln!(
                "{:<6} {:<32} {:<9} {:>12} {:>14} {:>12}",
                "ID",
                "NAME",
                "STATE",
                "SIZE",
                "CREATED(ms)",
                "HELD(us)"
            );
            for s in &v.snapshots {
                outln!(
                    "{:<6} {:<32} {:<9} {:>12} {:>14} {:>12}",
                    s.id,
                    s.name,
                    state_name(s.state),
                    format_size(s.size_bytes),
                    s.created_unix_ms,
                    s.quiesce_us
                );
            }
        }
        SnapshotCmd::Delete { spec } => {
            let (vol, snap) = parse_snap_spec(spec)?;
            client.delete_snapshot(vol, snap).await?;
            outln!("deleted snapshot {vol}@{snap}");
        }
        SnapshotCmd::Rollback { spec } => {
            let (vol, snap) = parse_snap_spec(spec)?;
            client.rollback_snapshot(vol, snap).await?;
            outln!("volume {vol} is back at snapshot {snap}");
        }
    }
    Ok(())
}

pub async fn image(client: &Client, cmd: &ImageCmd) -> anyhow::Result<()> {
    match cmd {
        ImageCmd::Clone { spec, name } => {
            let (vol, snap) = parse_snap_spec(spec)?;
            let t = std::time::Instant::now();
            let v = client.clone_volume(vol, snap, name).await?;
            outln!(
                "created volume {} (id {}, {}) as a clone of {vol}@{snap} in {:.1} ms",
                v.name,
                v.id,
                format_size(v.size_bytes),
                t.elapsed().as_secs_f64() * 1000.0
            );
        }
        ImageCmd::Flatten { name } => {
            let size = client.volume_info(name).await?.size_bytes;
            let pb = crate::cli_volume::progress(size, "flatten");
            let v = client.flatten(name, |n| pb.inc(n)).await?;
            pb.finish_and_clear();
            outln!("volume {} no longer depends on a snapshot", v.name);
        }
        ImageCmd::ExportDiff {
            spec,
            file,
            from_snap,
        } => {
            let (vol, snap) = parse_snap_spec(spec)?;
            // Check the snapshots before the file is touched.
            let v = client.volume_info(vol).await?;
            let to = raftblk_client::snapshot::snapshot_named(&v, snap)?;
            if let Some(f) = from_snap {
                let from = raftblk_client::snapshot::snapshot_named(&v, f)?;
                if from.id >= to.id {
                    bail!("--from-snap {f} is not older than {snap}");
                }
            }
            let size = to.size_bytes;
            // Only a file this command creates is removed on failure.
            let created = !file.exists();
            let out = std::fs::File::create(file)
                .with_context(|| format!("cannot create {}", file.display()))?;
            let pb = crate::cli_volume::progress(size, "export-diff");
            let r = client
                .export_diff(
                    vol,
                    snap,
                    from_snap.as_deref(),
                    std::io::BufWriter::new(out),
                    |n| pb.inc(n),
                )
                .await;
            pb.finish_and_clear();
            let (data, zeros) = match r {
                Ok(x) => x,
                Err(e) => {
                    if created {
                        let _ = std::fs::remove_file(file);
                    }
                    return Err(e.into());
                }
            };
            outln!(
                "exported {vol}@{snap}{} to {}: {} of data, {} of zeros",
                from_snap
                    .as_deref()
                    .map(|f| format!(" since {f}"))
                    .unwrap_or_default(),
                file.display(),
                format_size(data),
                format_size(zeros)
            );
        }
        ImageCmd::ImportDiff { file, name } => {
            let meta = std::fs::metadata(file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            if !meta.is_file() {
                bail!("{} is not a regular file", file.display());
            }
            let vol = client.open_volume(name).await?;
            vol.attach()
                .await
                .and_then(|a| a.check())
                .with_context(|| format!("cannot attach volume {name}"))?;
            let pb = crate::cli_volume::progress(meta.len(), "import-diff");
            let r = raftblk_client::diff::import_diff(&vol, file, |n| pb.inc(n)).await;
            pb.finish_and_clear();
            if let Some(a) = vol.attachment() {
                let _ = a.detach().await;
            }
            let h = r?;
            outln!(
                "applied {} ({} -> {}) to volume {name}",
                file.display(),
                if h.from.is_empty() { "empty" } else { &h.from },
                h.to
            );
        }
    }
    Ok(())
}
