#!/usr/bin/env bash
# Checks the monitoring files with promtool (Debian's prometheus package):
# deploy/prometheus.yml and its alert rules, the alert rules' unit tests
# (deploy/prometheus/alerts_test.yml), and every query of the Grafana
# dashboard (each is parsed as a recording rule, so a typo fails here, not
# on an operator's screen). Run from anywhere; exits non-zero on a failure.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
command -v promtool >/dev/null || { echo "check-monitoring: promtool missing (deploy/install-deps.sh installs it)" >&2; exit 1; }
promtool check config "$here/prometheus.yml"
(cd "$here/prometheus" && promtool test rules alerts_test.yml)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - "$here/grafana/raftblk.json" >"$tmp/dashboard-rules.yml" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
if not exprs:
    sys.exit("no queries in the dashboard")
print("groups:\n  - name: dashboard\n    rules:")
for i, e in enumerate(exprs):
    print(f"      - record: raftblk_dashboard_query_{i}\n        expr: {json.dumps(e)}")
PY
promtool check rules "$tmp/dashboard-rules.yml"
echo "check-monitoring: all good"
