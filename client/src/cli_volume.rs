//! `raftblk volume ...`: create, list, info, grow, set, delete, import and
//! export (whole volumes, snapshots and diffs), clone and flatten, detach;
//! with the progress bars and lease handling those need. The argument
//! types live in `main.rs`.

use super::*;

pub(crate) async fn volume(cli: &Cli, cmd: &VolumeCmd) -> anyhow::Result<()> {
    // Validate arguments before touching the network.
    let size = match cmd {
        VolumeCmd::Create { size, .. } | VolumeCmd::Grow { size, .. } => {
            Some(parse_volume_size(size)?)
        }
        _ => None,
    };
    if let VolumeCmd::Import { file, .. } = cmd {
        let meta =
            std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
        if !meta.is_file() {
            bail!("{} is not a regular file", file.display());
        }
    }
    let client = connect(cli).await?;
    match cmd {
        VolumeCmd::Create { name, qos, .. } => {
            let limits = (!qos.is_empty())
                .then(|| qos.apply(raftblk_proto::QosLimits::default()))
                .transpose()?;
            let v = client
                .create_volume_with_qos(name, size.unwrap_or(0), limits)
                .await?;
            outln!(
                "created volume {} (id {}, {})",
                v.name,
                v.id,
                format_size(v.size_bytes)
            );
        }
        VolumeCmd::List if cli.output == cli_output::Output::Json => {
            let vols = client.list_volumes().await?;
            let usage = usage_or_warn(&client, &vols).await;
            let all: Vec<_> = vols
                .iter()
                .map(|v| cli_output::volume_summary(v, usage.as_ref()))
                .collect();
            outln!("{:#}", serde_json::Value::Array(all));
        }
        VolumeCmd::Info { name } if cli.output == cli_output::Output::Json => {
            let (v, lease) = client.volume_status(name).await?;
            let usage = usage_or_warn(&client, std::slice::from_ref(&v)).await;
            outln!(
                "{:#}",
                cli_output::volume_detail(&v, lease.as_ref(), usage.as_ref())
            );
        }
        VolumeCmd::List => {
            let vols = client.list_volumes().await?;
            let usage = usage_or_warn(&client, &vols).await;
            outln!(
                "{:<6} {:<32} {:>14} {:>14} {:>12}",
                "ID",
                "NAME",
                "SIZE",
                "STORED",
                "CHUNK"
            );
            for v in vols {
                outln!(
                    "{:<6} {:<32} {:>14} {:>14} {:>12}",
                    v.id,
                    v.name,
                    format_size(v.size_bytes),
                    describe_stored(usage.as_ref(), v.id, false),
                    format_size(v.chunk_size_bytes)
                );
            }
        }
        VolumeCmd::Info { name } => {
            let (v, lease) = client.volume_status(name).await?;
            let usage = usage_or_warn(&client, std::slice::from_ref(&v)).await;
            outln!("name:       {}", v.name);
            outln!("id:         {}", v.id);
            outln!(
                "size:       {} ({} bytes)",
                format_size(v.size_bytes),
                v.size_bytes
            );
            outln!(
                "stored:     {}",
                describe_stored(usage.as_ref(), v.id, true)
            );
            outln!("chunk size: {}", format_size(v.chunk_size_bytes));
            outln!("chunks:     {}", v.size_bytes.div_ceil(v.chunk_size_bytes));
            outln!("created:    {}", cli_output::utc(v.created_unix_ms));
            outln!("attached:   {}", describe_lease(lease.as_ref()));
            outln!("limits:     {}", describe_qos(v.qos.as_ref()));
            outln!("snapshots:  {}", v.snapshots.len());
            if let Some(p) = v.parent {
                let parent = client.volume_by_id(p.volume_id).await;
                let (pv, ps) = match &parent {
                    Ok(pv) => (
                        pv.name.clone(),
                        pv.snapshots
                            .iter()
                            .find(|s| s.id == p.snapshot_id)
                            .map_or_else(|| format!("id {}", p.snapshot_id), |s| s.name.clone()),
                    ),
                    Err(_) => (
                        format!("id {}", p.volume_id),
                        format!("id {}", p.snapshot_id),
                    ),
                };
                outln!("parent:     {pv}@{ps} (a clone)");
            }
        }
        VolumeCmd::Set { name, qos } => {
            if qos.is_empty() {
                bail!("nothing to set: give --iops-max, --bps-max or another limit");
            }
            let now = client.volume_info(name).await?;
            let limits = qos.apply(now.qos.unwrap_or_default())?;
            let v = client.set_qos(name, Some(limits)).await?;
            outln!("volume {} limits: {}", v.name, describe_qos(v.qos.as_ref()));
        }
        VolumeCmd::Detach { name, force } => {
            if !force {
                bail!("detach breaks the attach lease of another process: pass --force if its holder is gone");
            }
            let l = client.detach_volume(name, "", 0, true).await?;
            outln!("volume {name} is detached (last epoch {})", l.epoch);
        }
        VolumeCmd::Delete { name } => {
            let v = client.delete_volume(name).await?;
            outln!("deleted volume {} (id {})", v.name, v.id);
        }
        VolumeCmd::Grow { name, .. } => {
            let v = client.grow_volume(name, size.unwrap_or(0)).await?;
            outln!("volume {} is now {}", v.name, format_size(v.size_bytes));
        }
        VolumeCmd::Import { name, file } => import(&client, name, file).await?,
        VolumeCmd::Export { name, file, live } => export(&client, name, file, *live).await?,
        VolumeCmd::Image(cmd) => cli_snapshot::image(&client, cmd).await?,
    }
    Ok(())
}

/// A byte-count progress bar for the long volume and image commands.
pub(crate) fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(what.to_owned());
    pb
}

/// What volumes store, or `None` (with a warning on stderr) when no member
/// could count: the rest of a listing is still worth printing. A partial
/// count is printed as a lower bound (see [`describe_stored`]), with the
/// groups it lacks named here.
async fn usage_or_warn(
    client: &Client,
    volumes: &[raftblk_proto::VolumeInfo],
) -> Option<raftblk_client::usage::UsageReport> {
    match client.volume_usage(volumes).await {
        Ok(u) => {
            if !u.complete() {
                eprintln!(
                    "warning: stored bytes leave out groups {:?}, which no node counted ({}); they are lower bounds (>=)",
                    u.groups_missing,
                    if u.errors.is_empty() { "no leader answered".to_owned() } else { u.errors.join("; ") }
                );
            }
            Some(u)
        }
        Err(e) => {
            eprintln!("warning: stored bytes unknown: {e}");
            None
        }
    }
}

/// A volume's stored bytes for the text output: `-` when unknown, `>=`
/// before a partial count; `long` adds the bytes and the snapshots' share.
fn describe_stored(
    usage: Option<&raftblk_client::usage::UsageReport>,
    volume: u64,
    long: bool,
) -> String {
    let Some(report) = usage else {
        return "-".to_owned();
    };
    let u = report.of(volume);
    let total = u.stored_bytes.saturating_add(u.snapshot_bytes);
    let bound = if report.complete() { "" } else { ">=" };
    if long {
        format!(
            "{bound}{} ({total} bytes; {} of data, {} kept for snapshots; one copy, not times replicas)",
            format_size(total),
            format_size(u.stored_bytes),
            format_size(u.snapshot_bytes)
        )
    } else {
        format!("{bound}{}", format_size(total))
    }
}

/// `holder (epoch N, ...)` or `no`.
fn describe_lease(lease: Option<&raftblk_proto::AttachLease>) -> String {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    match lease {
        Some(l) if !l.holder.is_empty() => {
            let left = l.expires_unix_ms.saturating_sub(now_ms);
            if left == 0 {
                format!(
                    "{} (epoch {}, lease expired: another holder may attach)",
                    l.holder, l.epoch
                )
            } else {
                format!(
                    "{} (epoch {}, lease renewed until {} s from now)",
                    l.holder,
                    l.epoch,
                    left.div_ceil(1000)
                )
            }
        }
        Some(l) => format!("no (last epoch {})", l.epoch),
        None => "no".to_owned(),
    }
}

/// Opens `name` holding its attach lease (refused, naming the holder, if
/// another process holds it).
async fn open_attached(client: &Client, name: &str) -> anyhow::Result<raftblk_client::Volume> {
    let vol = client.open_volume(name).await?;
    vol.attach()
        .await
        .and_then(|a| a.check())
        .with_context(|| format!("cannot attach volume {name}"))?;
    Ok(vol)
}

/// Gives the lease of `vol` back.
async fn detach(vol: &raftblk_client::Volume) {
    if let Some(a) = vol.attachment() {
        if let Err(e) = a.detach().await {
            eprintln!("warning: could not release the attach lease (it expires by itself): {e}");
        }
    }
}

async fn import(client: &Client, name: &str, file: &std::path::Path) -> anyhow::Result<()> {
    let vol = open_attached(client, name).await?;
    let r = import_into(&vol, name, file).await;
    detach(&vol).await;
    r
}

async fn import_into(
    vol: &raftblk_client::Volume,
    name: &str,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    let file_len = std::fs::metadata(file)?.len();
    if file_len > vol.size_bytes() {
        bail!(
            "{} is {} bytes, larger than volume {name} ({} bytes)",
            file.display(),
            file_len,
            vol.size_bytes()
        );
    }
    let pb = progress(file_len, "import");
    let steps: Vec<u64> = (0..file_len.div_ceil(COPY_PIECE_BYTES))
        .map(|i| i * COPY_PIECE_BYTES)
        .collect();
    let path = file.to_owned();
    stream::iter(steps)
        .map(|off| {
            let vol = vol.clone();
            let path = path.clone();
            let pb = pb.clone();
            async move {
                let len = COPY_PIECE_BYTES.min(file_len - off);
                let mut f = tokio::fs::File::open(&path).await?;
                f.seek(std::io::SeekFrom::Start(off)).await?;
                let mut buf = vec![0u8; len as usize];
                f.read_exact(&mut buf).await?;
                // Pad a final partial sector with zeros.
                let padded = len.div_ceil(512) * 512;
                buf.resize(padded as usize, 0);
                if buf.iter().all(|&b| b == 0) {
                    vol.write_zeroes(off, padded).await?;
                } else {
                    vol.write(off, &buf).await?;
                }
                pb.inc(len);
                anyhow::Ok(())
            }
        })
        .buffer_unordered(COPY_IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await?;
    vol.flush().await?;
    pb.finish_and_clear();
    outln!(
        "imported {} ({file_len} bytes) into volume {name}",
        file.display()
    );
    Ok(())
}

async fn export(
    client: &Client,
    name: &str,
    file: &std::path::Path,
    live: bool,
) -> anyhow::Result<()> {
    if let Some((volume, snap)) = name.split_once('@') {
        // A snapshot never changes: no lease needed.
        let vol = client.open_snapshot(volume, snap).await?;
        return export_from(&vol, name, file).await;
    }
    // The lease keeps writers away while the image is read.
    let vol = if live {
        client.open_volume(name).await?
    } else {
        open_attached(client, name).await.map_err(|e| {
            let attached = e
                .chain()
                .any(|c| matches!(c.downcast_ref(), Some(ClientError::Attached(_))));
            if attached {
                e.context("export --live reads a volume in use, without the lease")
            } else {
                e
            }
        })?
    };
    let r = export_from(&vol, name, file).await;
    detach(&vol).await;
    r
}

async fn export_from(
    vol: &raftblk_client::Volume,
    name: &str,
    file: &std::path::Path,
) -> anyhow::Result<()> {
    let size = vol.size_bytes();
    let mut out = tokio::fs::File::create(file)
        .await
        .with_context(|| format!("cannot create {}", file.display()))?;
    let pb = progress(size, "export");
    let steps: Vec<u64> = (0..size.div_ceil(COPY_PIECE_BYTES))
        .map(|i| i * COPY_PIECE_BYTES)
        .collect();
    let mut reads = stream::iter(steps)
        .map(|off| {
            let vol = vol.clone();
            async move { vol.read(off, COPY_PIECE_BYTES.min(size - off)).await }
        })
        .buffered(COPY_IN_FLIGHT);
    while let Some(data) = reads.next().await {
        let data = data?;
        out.write_all(&data).await?;
        pb.inc(data.len() as u64);
    }
    out.flush().await?;
    out.sync_all().await?;
    pb.finish_and_clear();
    outln!(
        "exported volume {name} ({size} bytes) to {}",
        file.display()
    );
    Ok(())
}
