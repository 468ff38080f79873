#!/usr/bin/env bash
# Builds the Debian packages (raftblk-node, raftblk-vhost, raftblk) from the
# release build with cargo-deb (--no-build: the binaries `cargo build
# --release --workspace` made, so RocksDB is not compiled again), installs
# them with dpkg -i, checks the systemd units with systemd-analyze verify
# (systemd is not PID 1 here), starts a 3-node cluster from the installed
# binaries and the installed example config with mutual TLS
# (certificates from the installed `raftblk certs init`), writes and reads
# back a volume with the installed CLI, and purges the packages, checking
# that nothing they installed is left. Run as root; uses ports 7501-7503.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
[[ $(id -u) == 0 ]] || { echo "package-test: run as root (dpkg)" >&2; exit 1; }
command -v cargo-deb >/dev/null || { echo "package-test: cargo-deb missing (cargo install --locked cargo-deb)" >&2; exit 1; }
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  dpkg --purge raftblk raftblk-node raftblk-vhost >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== build the packages"
for p in raftblk-node raftblk-vhost raftblk-client; do
  cargo deb -p "$p" --no-build --fast --output "$work/debs" >/dev/null
done
ls -l "$work/debs"

echo "== install them"
dpkg -i "$work"/debs/*.deb
for f in /usr/bin/raftblk-node /usr/bin/raftblk-vhost /usr/bin/raftblk \
         /lib/systemd/system/raftblk-node@.service /lib/systemd/system/raftblk-vhost@.service \
         /etc/raftblk/node.toml.example /etc/raftblk/vhost.toml.example; do
  [[ -e "$f" ]] || { echo "package-test: $f not installed" >&2; exit 1; }
done
/usr/bin/raftblk-vhost --version
/usr/bin/raftblk --version

echo "== check the units"
# Instances of the templates, as systemd would load them.
mkdir -p "$work/units"
cp /lib/systemd/system/raftblk-node@.service "$work/units/raftblk-node@node1.service"
cp /lib/systemd/system/raftblk-vhost@.service "$work/units/raftblk-vhost@host1.service"
SYSTEMD_LOG_LEVEL=warning systemd-analyze verify --man=no \
  "$work/units/raftblk-node@node1.service" "$work/units/raftblk-vhost@host1.service"
grep -q '^ExecStart=/usr/bin/raftblk-node ' /lib/systemd/system/raftblk-node@.service
grep -q '^ExecStart=/usr/bin/raftblk-vhost ' /lib/systemd/system/raftblk-vhost@.service

echo "== a 3-node cluster from the installed binaries and example config, with TLS"
/usr/bin/raftblk certs init "$work/tls" --nodes 1,2,3 >/dev/null
for i in 1 2 3; do
  sed -e "s/^node_id = 1$/node_id = $i/" \
      -e "s/10\.0\.0\.\([123]\):7101/127.0.0.1:750\1/g" \
      -e "s|^listen_addr = .*|listen_addr = \"127.0.0.1:750$i\"|" \
      -e "s|^data_dir = .*|data_dir = \"$work/node$i\"|" \
      -e "s|^metrics_addr = .*|metrics_addr = \"127.0.0.1:950$i\"|" \
      -e "s|/etc/raftblk/tls/|$work/tls/|" \
      -e "s|node1\.pem|node$i.pem|; s|node1\.key|node$i.key|" \
      -e "s/^data_groups = 64$/data_groups = 8/" \
      /etc/raftblk/node.toml.example >"$work/node$i.toml"
  # The three nodes share this machine's disk, whose fill the test does
  # not control: the full ratios sit where only a truly full disk hits.
  printf '\n[placement]\nnearfull_ratio = 0.99\nfull_ratio = 1.0\n' >>"$work/node$i.toml"
  /usr/bin/raftblk-node --config "$work/node$i.toml" --check
  /usr/bin/raftblk-node --config "$work/node$i.toml" >"$work/node$i.log" 2>&1 &
  pids+=($!)
done
export RAFTBLK_CLUSTER=127.0.0.1:7501,127.0.0.1:7502,127.0.0.1:7503
export RAFTBLK_TLS_CA="$work/tls/ca.pem" RAFTBLK_TLS_CERT="$work/tls/admin.pem" RAFTBLK_TLS_KEY="$work/tls/admin.key"
# The nodes take a moment to listen: the CLI's first contact is retried
# (bounded), then it waits for every group.
for _ in $(seq 1 60); do
  /usr/bin/raftblk --timeout-secs 2 cluster status >/dev/null 2>&1 && break
  sleep 1
done
if ! /usr/bin/raftblk cluster wait-healthy --wait-secs 120 >/dev/null; then
  tail -n 20 "$work"/node*.log >&2
  exit 1
fi
grep -q "mutual TLS on" "$work/node1.log"
/usr/bin/raftblk volume create pkgtest --size 64M
head -c $((8 << 20)) /dev/urandom >"$work/in.raw"
/usr/bin/raftblk volume import pkgtest "$work/in.raw"
/usr/bin/raftblk volume export pkgtest "$work/out.raw"
cmp -n $((8 << 20)) "$work/in.raw" "$work/out.raw"
# Plaintext is refused by a TLS cluster.
if /usr/bin/raftblk --insecure-plaintext --timeout-secs 3 volume list >/dev/null 2>&1; then
  echo "package-test: a plaintext client reached the TLS cluster" >&2; exit 1
fi
curl -sf http://127.0.0.1:9501/metrics | grep -q '^raftblk_node_proposals_total'

echo "== remove the packages"
for p in "${pids[@]}"; do kill "$p"; done
for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
pids=()
dpkg --purge raftblk raftblk-node raftblk-vhost
for f in /usr/bin/raftblk-node /usr/bin/raftblk-vhost /usr/bin/raftblk \
         /lib/systemd/system/raftblk-node@.service /lib/systemd/system/raftblk-vhost@.service \
         /etc/raftblk/node.toml.example /etc/raftblk/vhost.toml.example; do
  [[ ! -e "$f" ]] || { echo "package-test: $f left after purge" >&2; exit 1; }
done
echo "package-test: built, installed, ran a 3-node TLS cluster from the packages, removed cleanly"
