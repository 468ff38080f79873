//! `raftblk-node --config FILE`: the storage daemon.

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
    // Test builds only: failpoints from the FAILPOINTS environment variable.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let config = match raftblk_node::config::NodeConfig::load(&args.config) {
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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
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
    match rt.block_on(raftblk_node::server::serve(config, shutdown)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftblk-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
