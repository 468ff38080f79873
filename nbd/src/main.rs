//! `raftblk-nbd`: serves one raftblk volume over the NBD protocol.
//!
//! ```text
//! raftblk-nbd --socket PATH --volume NAME --cluster ADDR,... [--read-only]
//!             [--takeover] [--io-timeout-secs S] [--connections-max N]
//! ```
//!
//! The export's name is the volume's (the empty default name is accepted
//! too): `qemu-img info 'nbd+unix:///NAME?socket=PATH'`. A writable
//! export holds the volume's attach lease as
//! `raftblk-nbd@HOST/MACHINE-ID:SOCKET` (refused, naming the holder, if
//! another holder's lease is live, unless `--takeover`) and serves one
//! client at a time; a read-only export takes no lease and serves up to
//! `--connections-max` clients at once. SIGTERM or SIGINT gives the
//! lease back before the daemon exits. TCP (`--listen`) needs TLS, which
//! is not built yet: it is refused.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use raftblk_client::{Client, ClientOptions, Volume};
use raftblk_nbd::export::Export;
use raftblk_nbd::open::{open, watch, OpenOptions, WATCH_INTERVAL};
use raftblk_nbd::server::{serve_unix, ServerOptions, ServerStats};

#[derive(Parser, Debug)]
#[command(
    name = "raftblk-nbd",
    version,
    about = "Serve a raftblk volume over the NBD protocol (qemu-img, QEMU's NBD block driver)"
)]
struct Args {
    #[command(flatten)]
    tls: raftblk_client::tls_args::TlsArgs,
    /// Unix socket to listen on (`nbd+unix:///VOLUME?socket=PATH`).
    #[arg(long, required_unless_present = "listen")]
    socket: Option<PathBuf>,
    /// TCP address to listen on: refused until TLS (NBD_OPT_STARTTLS) is
    /// built, as NBD over plain TCP is readable and writable by anyone
    /// on the path.
    #[arg(long)]
    listen: Option<String>,
    /// Volume to serve (its name is the export's name).
    #[arg(long)]
    volume: String,
    /// Cluster node addresses (host:port, comma separated).
    #[arg(
        long,
        env = "RAFTBLK_CLUSTER",
        default_value = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
    )]
    cluster: String,
    /// Serve the export read-only (no lease; several clients at once).
    #[arg(long)]
    read_only: bool,
    /// Take the volume's attach lease over even if another holder's is
    /// live: the old holder is fenced and can no longer write.
    #[arg(long, conflicts_with = "read_only")]
    takeover: bool,
    /// Deadline of one request, retries included; the client sees an
    /// I/O error only after it.
    #[arg(long, default_value_t = 60)]
    io_timeout_secs: u64,
    /// Connections open at once (handshaking or served).
    #[arg(long, default_value_t = 16)]
    connections_max: usize,
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
            eprintln!("raftblk-nbd: error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if let Some(addr) = &args.listen {
        anyhow::bail!(
            "--listen {addr}: NBD over TCP needs TLS (NBD_OPT_STARTTLS), which raftblk-nbd does not have yet; serve on a Unix socket (--socket)"
        );
    }
    let socket = args.socket.clone().context("--socket is required")?;
    anyhow::ensure!(
        (1..=3600).contains(&args.io_timeout_secs),
        "--io-timeout-secs must be between 1 and 3600"
    );
    anyhow::ensure!(
        (1..=1024).contains(&args.connections_max),
        "--connections-max must be between 1 and 1024"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the runtime")?;
    rt.block_on(serve(args, socket))
}

async fn serve(args: Args, socket: PathBuf) -> anyhow::Result<()> {
    let cluster: Vec<String> = args
        .cluster
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    let client = Client::connect(
        &cluster,
        ClientOptions {
            deadline: Duration::from_secs(args.io_timeout_secs),
            security: args.tls.security().map_err(anyhow::Error::msg)?,
            ..ClientOptions::default()
        },
    )
    .await?;
    // Watched from before the attach, so a stop during start-up gives
    // back a lease just taken.
    let served: Arc<Mutex<Option<Volume>>> = Arc::new(Mutex::new(None));
    tokio::spawn(release_on_signal(served.clone(), socket.clone()));
    let opened = open(
        &client,
        &args.volume,
        &OpenOptions {
            read_only: args.read_only,
            takeover: args.takeover,
            socket: socket.clone(),
        },
    )
    .await?;
    *served.lock().unwrap_or_else(|p| p.into_inner()) = Some(opened.volume.clone());
    let listener = bind(&socket)?;
    tokio::spawn(watch(
        opened.volume.clone(),
        opened.qos.clone(),
        WATCH_INTERVAL,
    ));
    let read_only = opened.read_only;
    let export = Arc::new(Export::new(&opened.name, opened.backend, read_only));
    tracing::info!(
        socket = %socket.display(),
        volume = export.name(),
        size_bytes = export.backend().size(),
        read_only,
        connections_max = args.connections_max,
        "serving volume over NBD"
    );
    let opts = ServerOptions {
        connections_max: args.connections_max,
        ..ServerOptions::default()
    };
    serve_unix(listener, export, opts, Arc::new(ServerStats::default())).await;
    Ok(())
}

/// Listens on `path`, replacing a stale socket left by a previous run
/// (never another kind of file).
fn bind(path: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::FileTypeExt as _;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        anyhow::ensure!(
            m.file_type().is_socket(),
            "{} exists and is not a socket",
            path.display()
        );
        std::fs::remove_file(path).with_context(|| format!("remove {}", path.display()))?;
    }
    tokio::net::UnixListener::bind(path).with_context(|| format!("listen on {}", path.display()))
}

/// Longest the daemon waits for its lease to be given back at shutdown.
const DETACH_TIMEOUT: Duration = Duration::from_secs(5);

/// On SIGTERM or SIGINT: gives back the attach lease (so the next holder
/// attaches at once), removes the socket, exits.
async fn release_on_signal(volume: Arc<Mutex<Option<Volume>>>, socket: PathBuf) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot watch SIGTERM/SIGINT: the lease is not given back at exit");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    let v = volume.lock().unwrap_or_else(|p| p.into_inner()).clone();
    if let Some(a) = v.as_ref().and_then(Volume::attachment) {
        match tokio::time::timeout(DETACH_TIMEOUT, a.release()).await {
            Ok(Ok(())) => tracing::info!("attach lease given back"),
            Ok(Err(e)) => tracing::warn!(error = %e, "could not give the lease back"),
            Err(_) => tracing::warn!("giving the lease back timed out; it expires by itself"),
        }
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("exiting on a signal");
    std::process::exit(0);
}
