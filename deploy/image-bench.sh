#!/usr/bin/env bash
# Image benchmark: how long `raftblk snapshot create` and `raftblk volume
# clone` take as the volume grows (they must not grow with it: a snapshot
# records a cut per data group, a clone is a catalog record). For each size
# it creates a volume, writes 64 MiB into it, takes a snapshot and clones
# it, and prints one table (times as the CLI user sees them, process start
# included).
#
#   deploy/image-bench.sh [SIZE ...]     (default 1G 100G 10T 1P)
#
# Uses (and starts, if needed) the local cluster of deploy/local-cluster.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
RB="$TARGET/release/raftblk"
export RAFTBLK_CLUSTER="127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
"$ROOT/deploy/local-cluster.sh" up >/dev/null
# The CLI's TLS credentials (admin); the daemons below take the client ones.
eval "$("$ROOT/deploy/local-cluster.sh" env)"
sizes=("$@")
[[ ${#sizes[@]} -gt 0 ]] || sizes=(1G 100G 10T 1P)
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
head -c $((64 << 20)) /dev/urandom >"$work/data.raw"
ms() { date +%s%3N; }
printf '%-8s %14s %16s %12s\n' SIZE SNAPSHOT-MS WRITES-HELD-MS CLONE-MS
for size in "${sizes[@]}"; do
  v="ib-$size-$$"
  "$RB" volume create "$v" --size "$size" >/dev/null
  "$RB" volume import "$v" "$work/data.raw" >/dev/null
  t0=$(ms); out=$("$RB" snapshot create "$v@s"); t1=$(ms)
  held=$(sed -n 's/.*writes held \([0-9.]*\) ms.*/\1/p' <<<"$out")
  t2=$(ms); "$RB" volume clone "$v@s" "$v-c" >/dev/null; t3=$(ms)
  printf '%-8s %14d %16s %12d\n' "$size" $((t1 - t0)) "$held" $((t3 - t2))
  "$RB" volume delete "$v-c" >/dev/null
  "$RB" volume delete "$v" >/dev/null
done
