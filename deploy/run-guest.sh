#!/usr/bin/env bash
# Boots the small test guest under QEMU (TCG) with one disk and runs a shell
# script inside it; the guest's console goes to stdout.
#
#   deploy/run-guest.sh SCRIPT DISK-SPEC [QUEUES]
#
# DISK-SPEC is one of
#   vhost:SOCKET   a vhost-user-blk socket (raftblk-vhost, qemu-storage-daemon)
#   file:PATH      QEMU's built-in virtio-blk on a raw file (cache=none, aio=native)
#   nbd:SOCKET:EXPORT  virtio-blk on QEMU's NBD client (raftblk-nbd, qemu-nbd)
# The guest (kernel + initramfs with busybox and fio) is built by
# vhost-frontend/guest/build.sh on first use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
script="$1"
disk="$2"
queues="${3:-2}"
GUEST="${RAFTBLK_GUEST_DIR:-/var/tmp/raftblk-guest}"
bash "$ROOT/vhost-frontend/guest/build.sh" "$GUEST" >&2
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/t"
cp "$script" "$work/t/test.sh"
chmod +x "$work/t/test.sh"
(cd "$work/t" && echo test.sh | cpio -o -H newc --quiet | gzip -1) >"$work/test.cpio.gz"
cat "$GUEST/base.cpio.gz" "$work/test.cpio.gz" >"$work/initrd"
case "$disk" in
  vhost:*)
    dev=(-chardev "socket,id=c0,path=${disk#vhost:}" -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues")
    ;;
  file:*)
    dev=(-blockdev "driver=file,node-name=f0,filename=${disk#file:},cache.direct=on,aio=native"
         -blockdev "driver=raw,node-name=d0,file=f0"
         -device "virtio-blk-pci,drive=d0,num-queues=$queues")
    ;;
  nbd:*)
    spec="${disk#nbd:}"
    dev=(-blockdev "driver=nbd,server.type=unix,server.path=${spec%%:*},export=${spec#*:},node-name=d0"
         -device "virtio-blk-pci,drive=d0,num-queues=$queues")
    ;;
  *) echo "run-guest: DISK-SPEC must be vhost:SOCKET, file:PATH or nbd:SOCKET:EXPORT" >&2; exit 2 ;;
esac
# vhost-user needs guest RAM in shared memory; TCG needs maxcpus >= 2.
timeout 900 qemu-system-x86_64 \
  -machine q35,memory-backend=mem0 -accel tcg,thread=multi -smp 2,maxcpus=2 -m 512M \
  -object memory-backend-memfd,id=mem0,size=512M,share=on \
  -kernel "$GUEST/vmlinuz" -initrd "$work/initrd" \
  -append "console=ttyS0 rdinit=/init panic=-1 quiet" \
  -display none -monitor none -serial stdio -no-reboot \
  "${dev[@]}"
