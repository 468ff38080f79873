#!/usr/bin/env bash
# Local 3-node raftblk cluster on loopback (ports 7101-7103).
#
#   deploy/local-cluster.sh up       build (if needed) and start the 3 nodes
#   deploy/local-cluster.sh down     stop them (SIGTERM, then SIGKILL)
#   deploy/local-cluster.sh status   processes + `raftblk cluster status`
#   deploy/local-cluster.sh demo     up, then create a volume, write random
#                                    data, read it back and compare; then
#                                    serve a volume with raftblk-vhost, boot a
#                                    Linux guest under QEMU with it as its disk,
#                                    write and verify data inside the guest
#                                    and check it from the host
#   deploy/local-cluster.sh add-node start the next joining node (4, then 5:
#                                    deploy/local/node4.toml, node5.toml) and
#                                    wait until the cluster has rebalanced
#   deploy/local-cluster.sh remove-node ID
#                                    drain node ID, wait until its replicas
#                                    live elsewhere, remove it from the
#                                    cluster, stop it and delete its data
#   deploy/local-cluster.sh wipe     down, then delete all data
#   deploy/local-cluster.sh env      print the exports that point the raftblk
#                                    CLI at this cluster with the admin
#                                    certificate: eval "$(deploy/local-cluster.sh env)"
#
# The cluster runs with mutual TLS: `up` makes a CA and certificates in
# .local-cluster/certs (raftblk certs init) the first time; the nodes use
# node<N>.pem, this script's CLI calls admin.pem, raftblk-vhost client.pem.
# State (data, logs, pids, certificates) lives in .local-cluster/ under the
# repository.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STATE="$ROOT/.local-cluster"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
PROFILE_DIR="$TARGET/release"
NODE_BIN="$PROFILE_DIR/raftblk-node"
CLI_BIN="$PROFILE_DIR/raftblk"
VHOST_BIN="$PROFILE_DIR/raftblk-vhost"
export RAFTBLK_CLUSTER="127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
CERTS="$STATE/certs"
export RAFTBLK_TLS_CA="$CERTS/ca.pem" RAFTBLK_TLS_CERT="$CERTS/admin.pem" RAFTBLK_TLS_KEY="$CERTS/admin.key"
export RAFTBLK_TLS_CRL="$CERTS/crl.pem"

# The daemons' environment: the client certificate.
as_client() { RAFTBLK_TLS_CERT="$CERTS/client.pem" RAFTBLK_TLS_KEY="$CERTS/client.key" "$@"; }

certs() {
  [[ -f "$CERTS/ca.pem" ]] && return 0
  mkdir -p "$STATE"
  "$CLI_BIN" certs init "$CERTS" --nodes 1,2,3,4,5 >/dev/null
  echo "made a CA and certificates in $CERTS"
}

build() {
  if ! command -v protoc >/dev/null || ! dpkg -s libclang-dev >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]]; then bash "$ROOT/deploy/install-deps.sh"; else
      echo "building needs protobuf-compiler and libclang-dev: sudo deploy/install-deps.sh" >&2; exit 1; fi
  fi
  # A no-op when up to date; a clean build compiles RocksDB (~15 minutes).
  [[ -x "$NODE_BIN" ]] || echo "building raftblk (a clean build compiles RocksDB: ~15 minutes)..."
  # Only the shipped packages: the test-only failpoints feature (enabled by
  # cluster-tests) must not reach the binaries this script runs.
  cargo build --release --quiet -p raftblk-node -p raftblk-client -p raftblk-vhost --bins
}

running() { [[ -f "$STATE/node$1.pid" ]] && kill -0 "$(cat "$STATE/node$1.pid")" 2>/dev/null; }

# The bootstrap nodes and any added ones.
nodes() {
  local ids="1 2 3"
  for i in 4 5; do [[ -f "$STATE/node$i.pid" ]] && ids="$ids $i"; done
  echo "$ids"
}

start_node() {
  "$NODE_BIN" --config "deploy/local/node$1.toml" >>"$STATE/node$1.log" 2>&1 &
  echo $! >"$STATE/node$1.pid"
  echo "started node $1 (pid $!, log $STATE/node$1.log)"
}

stop_node() {
  if running "$1"; then
    local pid; pid="$(cat "$STATE/node$1.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    echo "stopped node $1"
  fi
}

add_node() {
  build
  mkdir -p "$STATE"
  local n=""
  for i in 4 5; do if ! running "$i"; then n="$i"; break; fi; done
  if [[ -z "$n" ]]; then echo "nodes 4 and 5 already run: the local cluster has configs for 5 nodes" >&2; return 1; fi
  start_node "$n"
  # It joins through its seeds (wait until the map shows it), then the
  # placement driver moves replicas and leaderships to it.
  for _ in $(seq 1 100); do
    "$CLI_BIN" node list 2>/dev/null | awk -v n="$n" '$1 == n && $3 == "up"' | grep -q . && break
    sleep 0.2
  done
  "$CLI_BIN" cluster wait-healthy --balanced --wait-secs 300
  "$CLI_BIN" node list
}

remove_node() {
  local id="${1:-}"
  if [[ ! "$id" =~ ^[0-9]+$ ]]; then echo "usage: $0 remove-node ID" >&2; return 2; fi
  "$CLI_BIN" node drain "$id"
  # Draining replicas count as degraded until they live elsewhere.
  "$CLI_BIN" cluster wait-healthy --wait-secs 600
  # The map learns of the last move within a heartbeat or two.
  local ok=""
  for _ in $(seq 1 30); do
    if "$CLI_BIN" node remove "$id" >/dev/null 2>&1; then ok=1; break; fi
    sleep 1
  done
  if [[ -z "$ok" ]]; then "$CLI_BIN" node remove "$id"; return 1; fi
  stop_node "$id"
  rm -f "$STATE/node$id.pid"
  rm -rf "$STATE/node$id"
  echo "node $id removed from the cluster, stopped, its data deleted"
  "$CLI_BIN" node list
}

up() {
  build
  mkdir -p "$STATE"
  certs
  for i in $(nodes); do
    if running "$i"; then echo "node $i already running (pid $(cat "$STATE/node$i.pid"))"; continue; fi
    start_node "$i"
  done
  # Wait (bounded) until every group has a leader.
  for _ in $(seq 1 100); do
    if "$CLI_BIN" cluster status 2>/dev/null | grep -q "health: OK"; then
      echo "cluster is up"; return 0
    fi
    sleep 0.2
  done
  echo "cluster did not become healthy within 20 s; see $STATE/node*.log" >&2
  "$CLI_BIN" cluster status || true
  return 1
}

down() {
  # Pid files of added nodes stay, so `up` restarts them too.
  for i in $(nodes); do
    stop_node "$i"
    if [[ "$i" -le 3 ]]; then rm -f "$STATE/node$i.pid"; fi
  done
}

status() {
  for i in $(nodes); do
    if running "$i"; then echo "node $i: running (pid $(cat "$STATE/node$i.pid"))"; else echo "node $i: stopped"; fi
  done
  "$CLI_BIN" cluster status
}

demo() {
  up
  local vol="demo-$(date +%s)"
  local tmp; tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  "$CLI_BIN" volume create "$vol" --size 64M
  # 24 MiB of random data: crosses several 4 MiB chunks, hence several groups.
  head -c $((24 * 1024 * 1024)) /dev/urandom >"$tmp/in.img"
  "$CLI_BIN" volume import "$vol" "$tmp/in.img"
  "$CLI_BIN" volume export "$vol" "$tmp/out.img"
  local want got
  want="$(sha256sum <"$tmp/in.img" | cut -d' ' -f1)"
  # The volume is 64 MiB: the rest after the image must read as zeros.
  got="$(head -c $((24 * 1024 * 1024)) "$tmp/out.img" | sha256sum | cut -d' ' -f1)"
  if [[ "$want" != "$got" ]]; then echo "MISMATCH: wrote $want, read $got" >&2; return 1; fi
  if [[ -n "$(tail -c +$((24 * 1024 * 1024 + 1)) "$tmp/out.img" | tr -d '\0' | head -c 1)" ]]; then
    echo "MISMATCH: unwritten tail is not zeros" >&2; return 1
  fi
  "$CLI_BIN" volume info "$vol"
  echo "round trip OK: volume $vol holds the 24 MiB written (sha256 $want), the rest reads as zeros"
  guest_demo
}

guest_demo() {
  if ! command -v qemu-system-x86_64 >/dev/null || ! command -v cpio >/dev/null || ! command -v fio >/dev/null; then
    if [[ $(id -u) == 0 ]]; then bash "$ROOT/deploy/install-deps.sh"; else
      echo "the guest demo needs QEMU and the guest tools: sudo deploy/install-deps.sh" >&2; return 1; fi
  fi
  local vm="demo-vm-$(date +%s)"
  local tmp; tmp="$(mktemp -d)"
  "$CLI_BIN" volume create "$vm" --size 256M
  as_client "$VHOST_BIN" --socket "$STATE/$vm.sock" --volume "$vm" --queues 2 >>"$STATE/vhost.log" 2>&1 &
  local vpid=$!
  for _ in $(seq 1 100); do [[ -S "$STATE/$vm.sock" ]] && break; sleep 0.1; done
  cat >"$tmp/test.sh" <<'GUEST'
#!/bin/sh
set -e
dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
dd if=/tmp/data of=/dev/vda bs=1M oflag=direct 2>/dev/null
sync
want=$(sha256sum /tmp/data | cut -d' ' -f1)
got=$(dd if=/dev/vda bs=1M count=16 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$want" = "$got" ] || { echo "RAFTBLK-DEMO MISMATCH $want $got"; exit 1; }
echo "RAFTBLK-DEMO $want"
GUEST
  echo "booting a Linux guest under QEMU with volume $vm as its disk (vhost-user-blk, 2 queues)..."
  bash "$ROOT/deploy/run-guest.sh" "$tmp/test.sh" "vhost:$STATE/$vm.sock" 2 | tee "$tmp/console.log" | grep -E "^RAFTBLK" || true
  kill "$vpid" 2>/dev/null || true
  wait "$vpid" 2>/dev/null || true
  local sum; sum="$(awk '/^RAFTBLK-DEMO [0-9a-f]/{print $2}' "$tmp/console.log" | tr -d '\r')"
  if [[ -z "$sum" ]]; then echo "guest demo FAILED; console:" >&2; cat "$tmp/console.log" >&2; rm -rf "$tmp"; return 1; fi
  "$CLI_BIN" volume export "$vm" "$tmp/vm.img" >/dev/null
  local host; host="$(head -c $((16 * 1024 * 1024)) "$tmp/vm.img" | sha256sum | cut -d' ' -f1)"
  rm -rf "$tmp"
  if [[ "$host" != "$sum" ]]; then echo "guest demo FAILED: guest wrote $sum, the cluster holds $host" >&2; return 1; fi
  echo "guest OK: the guest wrote and verified 16 MiB on its raftblk disk (sha256 $sum); the cluster holds the same bytes"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  demo) demo ;;
  add-node) add_node ;;
  remove-node) remove_node "${2:-}" ;;
  wipe) down; rm -rf "$STATE"; echo "wiped $STATE" ;;
  env)
    echo "export RAFTBLK_CLUSTER=$RAFTBLK_CLUSTER"
    echo "export RAFTBLK_TLS_CA=$RAFTBLK_TLS_CA RAFTBLK_TLS_CERT=$RAFTBLK_TLS_CERT RAFTBLK_TLS_KEY=$RAFTBLK_TLS_KEY RAFTBLK_TLS_CRL=$RAFTBLK_TLS_CRL"
    ;;
  *) echo "usage: $0 up|down|status|demo|add-node|remove-node ID|wipe|env" >&2; exit 2 ;;
esac
