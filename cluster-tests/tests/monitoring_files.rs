//! The shipped monitoring files are valid: `deploy/check-monitoring.sh`
//! runs promtool on deploy/prometheus.yml, the alert rules and their unit
//! tests (each alert fires on the series it watches), and every query of
//! the Grafana dashboard.

use std::process::Command;

#[test]
fn prometheus_config_alerts_and_dashboard_pass_promtool() -> anyhow::Result<()> {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/check-monitoring.sh");
    let out = Command::new("bash").arg(&script).output()?;
    assert!(
        out.status.success(),
        "{} failed:\n{}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
