//! `raftblk-node --config FILE` rejects bad config files with a message
//! naming the bad key, and exits with status 2 without touching data.

use std::process::Command;

const GOOD: &str = r#"
node_id = 1
listen_addr = "127.0.0.1:7101"
data_dir = "DATA"
tls = { insecure_plaintext = true }
[cluster]
data_groups = 4
[[cluster.nodes]]
id = 1
addr = "127.0.0.1:7101"
[[cluster.nodes]]
id = 2
addr = "127.0.0.1:7102"
[[cluster.nodes]]
id = 3
addr = "127.0.0.1:7103"
"#;

fn run(
    config: &str,
    extra: &[&str],
) -> (Option<i32>, String, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let path = dir.path().join("node.toml");
    std::fs::write(&path, config.replace("DATA", &data.to_string_lossy())).expect("write config");
    let out = Command::new(env!("CARGO_BIN_EXE_raftblk-node"))
        .arg("--config")
        .arg(&path)
        .args(extra)
        .output()
        .expect("run raftblk-node");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    (out.status.code(), text, data, dir)
}

#[test]
fn good_config_checks_ok() {
    let (code, text, _, _d) = run(GOOD, &["--check"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("config ok: node 1 of 3 nodes"), "{text}");
}

#[test]
fn bad_configs_name_the_key_and_leave_no_data() {
    let cases: &[(&str, &str)] = &[
        ("node_id = 1", "node_id = 7"),
        ("data_groups = 4", "data_groups = 0"),
        (
            "listen_addr = \"127.0.0.1:7101\"",
            "listen_addr = \"localhost\"",
        ),
        ("data_groups = 4", "data_groups = 4\nreplicas = 5"),
        (
            "data_groups = 4",
            "data_groups = 4\nchunk_size_bytes = 12345",
        ),
        ("id = 3", "id = 2"),
        ("data_groups = 4", "data_groups = 4\ncolour = \"blue\""),
        ("data_groups = 4", "data_groups = \"four\""),
        (
            "data_groups = 4",
            "data_groups = 4\n[limits]\nworker_threads = 100000",
        ),
        // No [tls] section: plaintext only when asked for.
        ("tls = { insecure_plaintext = true }\n", ""),
        (
            "tls = { insecure_plaintext = true }",
            "tls = { ca_file = \"ca.pem\", cert_file = \"n.pem\" }",
        ),
        (
            "tls = { insecure_plaintext = true }",
            "tls = { insecure_plaintext = true, ca_file = \"ca.pem\" }",
        ),
    ];
    let keys = [
        "node_id",
        "cluster.data_groups",
        "listen_addr",
        "cluster.replicas",
        "cluster.chunk_size_bytes",
        "cluster.nodes[2].id",
        "colour",
        "data_groups",
        "limits.worker_threads",
        "tls",
        "tls.key_file",
        "tls.ca_file",
    ];
    for ((from, to), key) in cases.iter().zip(keys) {
        let (code, text, data, _d) = run(&GOOD.replace(from, to), &[]);
        assert_eq!(code, Some(2), "{to}: {text}");
        assert!(
            text.contains(key),
            "error for `{to}` does not name `{key}`: {text}"
        );
        assert!(
            !data.exists(),
            "a rejected config created the data directory"
        );
    }
    let (code, text, _, _d) = run("this is not toml", &[]);
    assert_eq!(code, Some(2));
    assert!(text.contains("node.toml"), "{text}");
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_raftblk-node"))
        .args(["--config", "/nonexistent/raftblk.toml"])
        .output()
        .expect("run raftblk-node");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot read config file /nonexistent/raftblk.toml"),
        "{err}"
    );
}
