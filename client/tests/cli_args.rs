//! The `raftblk` CLI rejects bad arguments before touching the network, and
//! says clearly when the cluster cannot be reached.

use std::process::Command;

fn raftblk(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_raftblk"))
        .args(args)
        .output()
        .expect("run raftblk");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn dead_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").to_string()
}

#[test]
fn bad_sizes_are_rejected_before_connecting() {
    // The address is never contacted: argument errors come first.
    let c = dead_addr();
    for (size, text) in [
        ("1000", "not a multiple of 512"),
        ("0", "must be positive"),
        ("lots", "is not a size"),
    ] {
        let (ok, err) = raftblk(&["--cluster", &c, "volume", "create", "v", "--size", size]);
        assert!(!ok, "size {size} accepted");
        assert!(err.contains(text), "size {size}: {err}");
        assert!(
            !err.contains("cannot reach"),
            "size {size} contacted the cluster: {err}"
        );
    }
}

#[test]
fn unreachable_cluster_is_named() {
    let c = dead_addr();
    let (ok, err) = raftblk(&[
        "--cluster",
        &c,
        "--timeout-secs",
        "2",
        "--insecure-plaintext",
        "volume",
        "list",
    ]);
    assert!(!ok);
    assert!(
        err.contains(&format!("cannot reach the cluster at {c}")),
        "{err}"
    );
}

#[test]
fn no_tls_credentials_is_a_clear_error_not_plaintext() {
    let c = dead_addr();
    let (ok, err) = raftblk(&["--cluster", &c, "volume", "list"]);
    assert!(!ok);
    assert!(
        err.contains("no TLS credentials") && err.contains("--tls-cert"),
        "{err}"
    );
    let (ok, err) = raftblk(&[
        "--cluster",
        &c,
        "--tls-ca",
        "/nonexistent/ca.pem",
        "volume",
        "list",
    ]);
    assert!(!ok);
    assert!(err.contains("--tls-cert, --tls-key missing"), "{err}");
    let (ok, err) = raftblk(&[
        "--cluster",
        &c,
        "--tls-ca",
        "/nonexistent/ca.pem",
        "--tls-cert",
        "/nonexistent/c.pem",
        "--tls-key",
        "/nonexistent/c.key",
        "volume",
        "list",
    ]);
    assert!(!ok);
    assert!(err.contains("cannot read /nonexistent/c.pem"), "{err}");
}

#[test]
fn import_of_a_missing_file_is_rejected_before_connecting() {
    let c = dead_addr();
    let (ok, err) = raftblk(&[
        "--cluster",
        &c,
        "volume",
        "import",
        "v",
        "/nonexistent/img.raw",
    ]);
    assert!(!ok);
    assert!(err.contains("cannot read /nonexistent/img.raw"), "{err}");
}
