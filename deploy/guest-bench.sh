#!/usr/bin/env bash
# Guest benchmark: boots the test guest under QEMU (TCG, 2 vCPUs) and runs
# the same fio jobs inside it (libaio, direct) against four disks, in one run:
#   raftblk   a 3-replica raftblk volume through raftblk-vhost (vhost-user-blk)
#   nbd       a 3-replica raftblk volume through raftblk-nbd and QEMU's NBD
#             client, under the same virtio-blk device
#   qsd       a raw file exported by qemu-storage-daemon over vhost-user-blk
#   virtio    QEMU's built-in virtio-blk on a raw file
# and prints one table with IOPS, MiB/s, latency and the raftblk/qsd ratio.
#
#   deploy/guest-bench.sh [SECONDS-PER-JOB]     (default 10)
#
# Uses (and starts, if needed) the local cluster of deploy/local-cluster.sh.
# TCG is the ceiling here: compare the rows as ratios.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECS="${1:-10}"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET/release"
STATE="$ROOT/.local-cluster"
export RAFTBLK_CLUSTER="127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103"
"$ROOT/deploy/local-cluster.sh" up >/dev/null
# The CLI's TLS credentials (admin); the daemons below take the client ones.
eval "$("$ROOT/deploy/local-cluster.sh" env)"
work="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat >"$work/bench.sh" <<GUEST
#!/bin/sh
common="--filename=/dev/vda --direct=1 --ioengine=libaio --size=256m --time_based --runtime=$SECS --group_reporting --output-format=terse --terse-version=3"
run() { name=\$1; shift; fio --name=\$name \$common "\$@" | sed -n "s/^/RAFTBLK-BENCH /p"; }
run seqwrite-1M-qd4 --rw=write --bs=1M --iodepth=4
run randread-4k-qd1 --rw=randread --bs=4k --iodepth=1
run randread-4k-qd32 --rw=randread --bs=4k --iodepth=32
run randwrite-4k-qd1 --rw=randwrite --bs=4k --iodepth=1
run randwrite-4k-qd32 --rw=randwrite --bs=4k --iodepth=32
run seqread-1M-qd4 --rw=read --bs=1M --iodepth=4
GUEST

# (a) raftblk
vol="bench-vm-$(date +%s)"
"$BIN/raftblk" volume create "$vol" --size 1G >/dev/null
RAFTBLK_TLS_CERT="$ROOT/.local-cluster/certs/client.pem" RAFTBLK_TLS_KEY="$ROOT/.local-cluster/certs/client.key" \
  "$BIN/raftblk-vhost" --socket "$work/raftblk.sock" --volume "$vol" --queues 2 \
  --metrics-addr "${VHOST_METRICS_ADDR:-127.0.0.1:9201}" >"$work/vhost.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [[ -S "$work/raftblk.sock" ]] && break; sleep 0.1; done
echo "raftblk: booting guest, fio ${SECS}s per job..." >&2
bash "$ROOT/deploy/run-guest.sh" "$work/bench.sh" "vhost:$work/raftblk.sock" 2 | grep "^RAFTBLK-BENCH" | sed 's/^/raftblk /' >"$work/results"
# (a') raftblk through raftblk-nbd (QEMU's NBD client, virtio-blk in the guest)
nvol="bench-nbd-$(date +%s)"
"$BIN/raftblk" volume create "$nvol" --size 1G >/dev/null
RAFTBLK_TLS_CERT="$ROOT/.local-cluster/certs/client.pem" RAFTBLK_TLS_KEY="$ROOT/.local-cluster/certs/client.key" \
  "$BIN/raftblk-nbd" --socket "$work/nbd.sock" --volume "$nvol" >"$work/nbd.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do [[ -S "$work/nbd.sock" ]] && break; sleep 0.1; done
echo "raftblk-nbd: booting guest..." >&2
bash "$ROOT/deploy/run-guest.sh" "$work/bench.sh" "nbd:$work/nbd.sock:$nvol" 2 | grep "^RAFTBLK-BENCH" | sed 's/^/nbd /' >>"$work/results"
# (b) qemu-storage-daemon on a raw file
truncate -s 1G "$work/qsd.img"
qemu-storage-daemon \
  --blockdev "driver=file,node-name=f,filename=$work/qsd.img,cache.direct=on,aio=native" \
  --blockdev driver=raw,node-name=d,file=f \
  --export "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path=$work/qsd.sock,writable=on,num-queues=2" &
pids+=($!)
for _ in $(seq 1 100); do [[ -S "$work/qsd.sock" ]] && break; sleep 0.1; done
echo "qsd: booting guest..." >&2
bash "$ROOT/deploy/run-guest.sh" "$work/bench.sh" "vhost:$work/qsd.sock" 2 | grep "^RAFTBLK-BENCH" | sed 's/^/qsd /' >>"$work/results"
# (c) QEMU's built-in virtio-blk
truncate -s 1G "$work/virtio.img"
echo "virtio-blk: booting guest..." >&2
bash "$ROOT/deploy/run-guest.sh" "$work/bench.sh" "file:$work/virtio.img" 2 | grep "^RAFTBLK-BENCH" | sed 's/^/virtio /' >>"$work/results"
"$BIN/raftblk" volume delete "$vol" >/dev/null || true
kill "${pids[1]}" 2>/dev/null || true
sleep 1
"$BIN/raftblk" volume delete "$nvol" >/dev/null || true

# terse v3: $3 job name; read: iops $8, clat p50 $24, p99 $30; write: iops $49,
# clat p50 $65, p99 $71 (percentile fields look like 50.000000%=123, usec).
tr -d '\r' <"$work/results" | awk '
function pv(s) { sub(/.*=/, "", s); return s / 1000.0 }
{
  split($0, a, " "); target = a[1]; sub(/^[a-z]+ RAFTBLK-BENCH /, "", $0)
  n = split($0, f, ";"); job = f[3]
  bs = (job ~ /1M/) ? 1024 : 4
  if (job ~ /write/) { iops = f[49]; p50 = pv(f[65]); p99 = pv(f[71]) } else { iops = f[8]; p50 = pv(f[24]); p99 = pv(f[30]) }
  key = job; jobs[key] = 1; I[target, key] = iops; P50[target, key] = p50; P99[target, key] = p99; B[key] = bs
}
END {
  printf "| job | raftblk IOPS | raftblk-nbd IOPS | qsd IOPS | virtio-blk IOPS | raftblk MiB/s | raftblk p50 ms | nbd p50 ms | qsd p50 ms | raftblk p99 ms | nbd p99 ms | qsd p99 ms | raftblk/qsd IOPS | raftblk/qsd p50 |\n"
  printf "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
  split("seqwrite-1M-qd4 randread-4k-qd1 randread-4k-qd32 randwrite-4k-qd1 randwrite-4k-qd32 seqread-1M-qd4", order, " ")
  for (i = 1; i <= 6; i++) {
    k = order[i]; if (!(k in jobs)) continue
    r = I["raftblk", k]; n = I["nbd", k]; q = I["qsd", k]; v = I["virtio", k]
    printf "| %s | %.0f | %.0f | %.0f | %.0f | %.1f | %.3f | %.3f | %.3f | %.3f | %.3f | %.3f | %.2f | %.2f |\n", k, r, n, q, v, r * B[k] / 1024, P50["raftblk", k], P50["nbd", k], P50["qsd", k], P99["raftblk", k], P99["nbd", k], P99["qsd", k], (q > 0 ? r / q : 0), (P50["qsd", k] > 0 ? P50["raftblk", k] / P50["qsd", k] : 0)
  }
}'
