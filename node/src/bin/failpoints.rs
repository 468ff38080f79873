//! `raftblk-node-failpoints`: the storage daemon with failpoints configured
//! from the `FAILPOINTS` environment variable (the `fail` crate's syntax),
//! for the failure-injection tests only. Built only with the `failpoints`
//! feature; nothing in `deploy/` builds or runs it.

fn main() -> std::process::ExitCode {
    let _failpoints = fail::FailScenario::setup();
    raftblk_node::daemon::main()
}
