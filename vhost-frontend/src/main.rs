//! `raftblk-vhost`: the vhost-user-blk daemon.
//!
//! ```text
//! raftblk-vhost --socket PATH --volume NAME --cluster ADDR,... [--queues N]
//!               [--queue-size N] [--read-only] [--io-timeout-secs S]
//!               [--takeover | --incoming] [--metrics-addr ADDR]
//! raftblk-vhost --config FILE      # several volumes, one socket each
//! ```
//!
//! Each volume is served under its attach lease, held by
//! `raftblk-vhost@HOST/MACHINE-ID:SOCKET`: taken at start (refused, naming the holder,
//! if another holder's lease is live, unless `--takeover`), or with
//! `--incoming` (a live-migration destination) taken over at the guest's
//! first request. A daemon restarted on the same socket reclaims its own
//! lease; one that lost its lease fails every request. SIGTERM or SIGINT
//! gives the leases back before the daemon exits.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use raftblk_client::attach::daemon_holder;
use raftblk_client::{AttachOptions, Client, ClientError, ClientOptions};
use raftblk_vhost::backend::DeviceOptions;
use raftblk_vhost::config::{validate_queues, validate_timeout, VhostConfig, VolumeExport};
use raftblk_vhost::serve::serve_volume;

#[derive(Parser, Debug)]
#[command(
    name = "raftblk-vhost",
    version,
    about = "Serve raftblk volumes to QEMU/KVM guests over vhost-user-blk"
)]
struct Args {
    /// Config file serving several volumes (instead of the flags below).
    #[arg(long, conflicts_with_all = ["socket", "volume"])]
    config: Option<PathBuf>,
    /// Unix socket to listen on (QEMU connects to it).
    #[arg(long, required_unless_present = "config")]
    socket: Option<PathBuf>,
    /// Volume to serve.
    #[arg(long, required_unless_present = "config")]
    volume: Option<String>,
    /// Cluster node addresses (host:port, comma separated).
    #[arg(
        long,
        env = "RAFTBLK_CLUSTER",
        default_value = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
    )]
    cluster: String,
    /// Virtqueues (QEMU's num-queues must not exceed it).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Descriptors per virtqueue.
    #[arg(long, default_value_t = 256)]
    queue_size: u16,
    /// Serve the disk read-only.
    #[arg(long)]
    read_only: bool,
    /// Deadline of one guest request, retries included; the guest sees an
    /// I/O error only after it.
    #[arg(long, default_value_t = 60)]
    io_timeout_secs: u64,
    /// Take the volume's attach lease over even if another holder's is
    /// live (restarting a VM on another host after its old host failed):
    /// the old holder is fenced and can no longer write.
    #[arg(long, conflicts_with = "incoming")]
    takeover: bool,
    /// Serve a live-migration destination: take the lease over when the
    /// guest starts here (its first request), not at start.
    #[arg(long)]
    incoming: bool,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g.
    /// 127.0.0.1:9201 (default: no endpoint).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    tls: raftblk_client::tls_args::TlsArgs,
    /// Exit after this many VMM connections have ended (default: never).
    #[arg(long, hide = true)]
    connections: Option<u64>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftblk-vhost: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut metrics_addr = args.metrics_addr;
    let mut tls = args.tls.clone();
    let (cluster, timeout, exports) = match &args.config {
        Some(path) => {
            let c = VhostConfig::load(path).map_err(anyhow::Error::msg)?;
            metrics_addr = metrics_addr.or(c.metrics_addr);
            let flags_given = tls.insecure_plaintext
                || tls.tls_ca.is_some()
                || tls.tls_cert.is_some()
                || tls.tls_key.is_some()
                || tls.tls_crl.is_some();
            if let (false, Some(t)) = (flags_given, &c.tls) {
                tls.insecure_plaintext = t.insecure_plaintext;
                tls.tls_ca = t.ca_file.clone();
                tls.tls_cert = t.cert_file.clone();
                tls.tls_key = t.key_file.clone();
                tls.tls_crl = t.crl_file.clone();
            }
            (c.cluster, c.io_timeout_secs, c.volumes)
        }
        None => {
            validate_queues(args.queues, args.queue_size, "--").map_err(anyhow::Error::msg)?;
            validate_timeout(args.io_timeout_secs, "--io-timeout-secs")
                .map_err(anyhow::Error::msg)?;
            let cluster = args
                .cluster
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
            let export = VolumeExport {
                name: args.volume.clone().unwrap_or_default(),
                socket: args.socket.clone().unwrap_or_default(),
                queues: args.queues,
                queue_size: args.queue_size,
                read_only: args.read_only,
            };
            (cluster, args.io_timeout_secs, vec![export])
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the runtime")?;
    let io_timeout = Duration::from_secs(timeout);
    let security = {
        let _guard = rt.enter();
        tls.security().map_err(anyhow::Error::msg)?
    };
    let client = rt.block_on(Client::connect(
        &cluster,
        ClientOptions {
            deadline: io_timeout,
            security,
            ..ClientOptions::default()
        },
    ))?;
    if let Some(addr) = metrics_addr {
        let c = client.clone();
        let refresh = Arc::new(move || raftblk_vhost::metrics::set_client_retries(c.retries()));
        rt.block_on(raftblk_metrics::serve(addr, Some(refresh)))?;
    }
    let mut threads = Vec::new();
    let mut refused = Vec::new();
    // Watched from before the first attach, so a stop during start-up
    // gives back the leases taken so far.
    let served = Arc::new(Mutex::new(Vec::new()));
    rt.spawn(release_on_signal(served.clone()));
    for e in exports {
        let volume = rt
            .block_on(client.open_volume(&e.name))
            .with_context(|| format!("volume {:?}", e.name))?;
        let attach = AttachOptions {
            holder: daemon_holder("raftblk-vhost", &e.socket),
            takeover: args.takeover || args.incoming,
            // A restart on the same socket gets a new epoch: whatever its
            // predecessor still had in flight is fenced.
            reuse: false,
            ..AttachOptions::default()
        };
        let volume = volume.with_attach_options(attach);
        served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(volume.clone());
        // A read-only export writes nothing: it takes no lease.
        if !args.incoming && !e.read_only {
            match rt
                .block_on(volume.attach())
                .and_then(|a| a.check().map(|_| a))
            {
                Ok(a) => {
                    tracing::info!(volume = %e.name, holder = a.holder(), epoch = a.epoch(), "serving under the attach lease");
                }
                Err(err @ (ClientError::Attached(_) | ClientError::Fenced(_))) => {
                    // Held by another daemon: the other volumes are still
                    // served (restart this daemon to serve this one once
                    // its lease is free, or with --takeover).
                    let err = anyhow::Error::new(err).context(format!(
                        "cannot attach volume {:?} (if its holder is gone for good: --takeover)",
                        e.name
                    ));
                    tracing::error!(volume = %e.name, error = format!("{err:#}"), "not serving this volume");
                    refused.push(err);
                    continue;
                }
                // Anything else (the cluster unreachable, say) stops the
                // daemon, for systemd to start it again.
                Err(err) => {
                    return Err(anyhow::Error::new(err)
                        .context(format!("cannot attach volume {:?}", e.name)))
                }
            }
        }
        let opts = DeviceOptions {
            num_queues: e.queues,
            queue_size: e.queue_size,
            read_only: e.read_only,
            io_timeout,
            qos: Arc::new(raftblk_client::qos::Qos::new(volume.info().qos)),
        };
        let handle = rt.handle().clone();
        let connections = args.connections;
        threads.push(
            std::thread::Builder::new()
                .name(format!("serve-{}", e.name))
                .spawn(move || serve_volume(&e.socket, volume, handle, opts, connections))
                .context("spawn serving thread")?,
        );
    }
    if threads.is_empty() {
        return Err(refused
            .pop()
            .unwrap_or_else(|| anyhow::anyhow!("no volume to serve")));
    }
    let mut result = Ok(());
    for t in threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => result = Err(anyhow::anyhow!("a serving thread panicked")),
        }
    }
    result
}

/// Longest the daemon waits for its leases to be given back at shutdown.
const DETACH_TIMEOUT: Duration = Duration::from_secs(5);

/// On SIGTERM or SIGINT: gives back the attach lease of every volume served
/// (so the next holder attaches at once), then exits. A daemon killed
/// otherwise leaves its leases to expire, or to its own restart.
async fn release_on_signal(volumes: Arc<Mutex<Vec<raftblk_client::Volume>>>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot watch SIGTERM/SIGINT: leases are not given back at exit");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    // Requests still in flight keep being served until the exit (their
    // epoch stays valid until another holder attaches); QEMU hands those
    // not answered to the next daemon from the inflight region.
    let volumes: Vec<raftblk_client::Volume> =
        volumes.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut releases = tokio::task::JoinSet::new();
    for v in volumes {
        if let Some(a) = v.attachment() {
            releases.spawn(async move {
                if let Err(e) = a.release().await {
                    tracing::warn!(volume = %v.info().name, error = %e, "could not give the lease back");
                }
            });
        }
    }
    let all = async { while releases.join_next().await.is_some() {} };
    if tokio::time::timeout(DETACH_TIMEOUT, all).await.is_err() {
        tracing::warn!("giving the leases back timed out; they expire by themselves");
    }
    tracing::info!("exiting on a signal");
    std::process::exit(0);
}
