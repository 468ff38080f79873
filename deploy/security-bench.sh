#!/usr/bin/env bash
# What mutual TLS and the metrics endpoints cost: `raftblk bench` against
# a 3-node loopback cluster (the local cluster's configs, ports 7101-7103)
# in three set-ups, one run each: TLS and metrics on (the default), TLS off
# (tls.insecure_plaintext), metrics off (no metrics_addr). Prints each
# run's table; BENCHMARKS.md has the figures.
#
#   deploy/security-bench.sh [SECONDS]      (per workload, default 10)
#
# Stops the local cluster first (same ports) and leaves it stopped.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET/release"
secs="${1:-10}"
deploy/local-cluster.sh down >/dev/null 2>&1 || true
deploy/local-cluster.sh up >/dev/null   # builds, makes the certificates
deploy/local-cluster.sh down >/dev/null
eval "$(deploy/local-cluster.sh env)"
work=".local-cluster/security-bench"
rm -rf "$work"; mkdir -p "$work"
pids=()
stop() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap stop EXIT

run() { # NAME TLS(on|off) METRICS(on|off)
  local name=$1 tls=$2 metrics=$3
  rm -rf "$work/$name"; mkdir -p "$work/$name"
  for i in 1 2 3; do
    local cfg="$work/$name/node$i.toml"
    sed -e "s|^data_dir = .*|data_dir = \"$work/$name/node$i\"|" deploy/local/node$i.toml >"$cfg"
    if [[ $metrics == off ]]; then sed -i '/^metrics_addr = /d' "$cfg"; fi
    if [[ $tls == off ]]; then
      sed -i '/^\[tls\]$/,$d' "$cfg"
      printf '\n[tls]\ninsecure_plaintext = true\n' >>"$cfg"
    fi
    "$BIN/raftblk-node" --config "$cfg" >"$work/$name/node$i.log" 2>&1 &
    pids+=($!)
  done
  cli() {
    if [[ $tls == off ]]; then
      env -u RAFTBLK_TLS_CA -u RAFTBLK_TLS_CERT -u RAFTBLK_TLS_KEY -u RAFTBLK_TLS_CRL \
        "$BIN/raftblk" --insecure-plaintext "$@"
    else
      "$BIN/raftblk" "$@"
    fi
  }
  # The nodes take a moment to listen (bounded retries), then every group.
  for _ in $(seq 1 60); do cli --timeout-secs 2 cluster status >/dev/null 2>&1 && break; sleep 1; done
  cli cluster wait-healthy --wait-secs 60 >/dev/null
  echo "== $name (TLS $tls, metrics $metrics)"
  cli bench --seconds "$secs" --local-dir "$work/$name"
  stop
}
run default on on
run plaintext off on
run no-metrics on off
