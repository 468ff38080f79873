#!/usr/bin/env bash
# Installs the Debian packages raftblk needs to build, test and boot guests
# (run as root on Debian 12): protoc and libclang for the build; QEMU 10
# from bookworm-backports, qemu-storage-daemon, cpio, fio, busybox-static
# and e2fsprogs for the guests; iptables and iproute2 for the failure suite;
# prometheus (promtool) for the metrics tests. Idempotent: installs only what is missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if [[ $(id -u) != 0 ]]; then
  echo "install-deps: run as root (apt-get)" >&2
  exit 1
fi
need=()
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
dpkg -s libclang-dev >/dev/null 2>&1 || need+=(libclang-dev)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v fio >/dev/null 2>&1 || need+=(fio)
[[ -x /bin/busybox ]] || need+=(busybox-static)
command -v mke2fs >/dev/null 2>&1 || need+=(e2fsprogs)
# The failure-injection suite: partitions inside network namespaces.
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v tc >/dev/null 2>&1 || need+=(iproute2)
if ((${#need[@]})); then
  echo "installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq "${need[@]}"
fi
# The metrics tests: promtool (in Debian's prometheus package) checks the
# /metrics output and the alert rules. Not its recommends (node exporter...).
if ! command -v promtool >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus
fi
# QEMU 10 from bookworm-backports: bookworm's 7.2 loses vhost-user
# notifications under TCG and would remove qemu-utils. The suite is added
# from the mirror this machine already uses.
# qemu-utils brings qemu-storage-daemon, and qemu-img and qemu-io for the
# NBD export's tests.
if ! qemu-system-x86_64 --version 2>/dev/null | grep -q "version 10" || ! command -v qemu-storage-daemon >/dev/null \
    || ! command -v qemu-img >/dev/null || ! command -v qemu-io >/dev/null; then
  echo "installing qemu-system-x86 from bookworm-backports"
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    awk '/^URIs:/{print "deb "$2" bookworm-backports main"; exit}' \
      /etc/apt/sources.list.d/debian.sources >/etc/apt/sources.list.d/backports.list
  fi
  apt-get update -qq
  apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils
fi
