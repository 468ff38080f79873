//! The `raftblk-node` process: command line, logging, the panic policy
//! (any panic on any thread ends the process with status 101 and a log
//! line, so a supervisor restarts it and it recovers from its data
//! directory: a node never lingers half-alive), the runtime, and signals.
//! Shared by the `raftblk-node` binary and the test-only
//! `raftblk-node-failpoints` binary.

use std::path::PathBuf;

use clap::Parser;

/// raftblk storage node.
#[derive(Parser, Debug)]
#[command(
    name = "raftblk-node",
    version,
    about = "raftblk storage node: chunked volumes on RocksDB, replicated by multi-raft"
)]
struct Args {
    /// Node config file (TOML).
    #[arg(long, short = 'c')]
    config: PathBuf,
    /// Check the config file and exit.
    #[arg(long)]
    check: bool,
}

/// Runs the daemon; the process exit code.
pub fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    exit_on_panic();
    let config = match crate::config::NodeConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("raftblk-node: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    if args.check {
        println!(
            "config ok: node {} of {} nodes",
            config.node_id,
            config.cluster.nodes.len()
        );
        return std::process::ExitCode::SUCCESS;
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if config.limits.worker_threads > 0 {
        builder.worker_threads(config.limits.worker_threads);
    }
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raftblk-node: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    match rt.block_on(crate::server::serve(config, shutdown)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftblk-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Exit status of a process that panicked.
pub const PANIC_EXIT_CODE: i32 = 101;

/// Makes every panic, on any thread, end the process: a store thread that
/// died would otherwise leave a node answering "store stopped" forever
/// while its supervisor sees it running.
pub fn exit_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let thread = std::thread::current()
            .name()
            .unwrap_or("unnamed")
            .to_owned();
        // Straight to stderr (the log), not through `tracing`: the panic
        // may have happened with the log writer's lock held.
        eprintln!(
            "raftblk-node: panic on thread {thread}: stopping the node (status {PANIC_EXIT_CODE}); it recovers from its data directory at restart"
        );
        // SAFETY: _exit(2) ends the process at once without running atexit
        // handlers or C++ static destructors, which could hang or crash
        // while RocksDB's background threads are still running; the data
        // on disk is consistent at any instant (fail-stop design).
        unsafe { libc::_exit(PANIC_EXIT_CODE) }
    }));
}
