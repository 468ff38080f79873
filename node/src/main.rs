//! `raftblk-node --config FILE`: the storage daemon. Failpoints are never
//! configured here (`FAILPOINTS` is ignored); tests use the separate
//! `raftblk-node-failpoints` binary.

fn main() -> std::process::ExitCode {
    raftblk_node::daemon::main()
}
