#!/usr/bin/env bash
# Idle cost of many raft groups: starts 3 local nodes (ports 7201-7203, a
# temporary directory) with GROUPS data groups (default 1024), waits until
# every group has a leader, lets them settle (idle groups hibernate), then
# measures each node's CPU (utime + stime from /proc/PID/stat) over SECONDS
# (default 30) and its RSS, prints a table and stops the nodes.
#
#   deploy/idle-bench.sh [GROUPS] [SECONDS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GROUPS_N="${1:-1024}"
SECONDS_N="${2:-30}"
SETTLE_SECS=10
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
NODE_BIN="$TARGET/release/raftblk-node"
CLI_BIN="$TARGET/release/raftblk"
[[ -x "$NODE_BIN" && -x "$CLI_BIN" ]] || (cd "$ROOT" && cargo build --release --quiet -p raftblk-node -p raftblk-client --bins)
DIR="$(mktemp -d /tmp/raftblk-idle.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT
for i in 1 2 3; do
  cat >"$DIR/node$i.toml" <<CONF
node_id = $i
listen_addr = "127.0.0.1:720$i"
data_dir = "$DIR/node$i"
tls = { insecure_plaintext = true }
[cluster]
data_groups = $GROUPS_N
replicas = 3
[[cluster.nodes]]
id = 1
addr = "127.0.0.1:7201"
[[cluster.nodes]]
id = 2
addr = "127.0.0.1:7202"
[[cluster.nodes]]
id = 3
addr = "127.0.0.1:7203"
[limits]
scrub_blocks_per_sec = 0
CONF
  RUST_LOG=warn "$NODE_BIN" --config "$DIR/node$i.toml" >"$DIR/node$i.log" 2>&1 &
  PIDS+=($!)
  disown
done
export RAFTBLK_CLUSTER="127.0.0.1:7201,127.0.0.1:7202,127.0.0.1:7203"
for _ in $(seq 1 300); do
  if "$CLI_BIN" cluster status 2>/dev/null | grep -q "health: OK"; then break; fi
  sleep 0.2
done
"$CLI_BIN" cluster status | tail -3
sleep "$SETTLE_SECS"
HZ="$(getconf CLK_TCK)"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A START
for p in "${PIDS[@]}"; do START[$p]="$(ticks "$p")"; done
sleep "$SECONDS_N"
echo
echo "3 nodes, $GROUPS_N data groups + meta, 3 replicas, idle; CPU over $SECONDS_N s after $SETTLE_SECS s settling"
echo
echo "| node | CPU (% of one core) | RSS | groups hibernating |"
echo "|---|---:|---:|---:|"
STATUS="$("$CLI_BIN" cluster status 2>/dev/null || true)"
i=1
for p in "${PIDS[@]}"; do
  end="$(ticks "$p")"
  cpu="$(awk -v a="${START[$p]}" -v b="$end" -v hz="$HZ" -v s="$SECONDS_N" 'BEGIN { printf "%.1f", (b - a) * 100 / hz / s }')"
  rss="$(awk '/VmRSS/ {printf "%d MiB", $2 / 1024}' "/proc/$p/status")"
  asleep="$(awk -v id="$i" '$1 == id && $3 == "up" {print $6 "/" $4}' <<<"$STATUS")"
  echo "| $i | $cpu | $rss | $asleep |"
  i=$((i + 1))
done
