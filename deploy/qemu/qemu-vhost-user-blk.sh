#!/usr/bin/env bash
# Attach a raftblk volume to a QEMU/KVM guest over vhost-user-blk.
#
# 1. Serve the volume (one socket per volume):
#      raftblk-vhost --socket /run/raftblk/vm1.sock --volume vm1 \
#                    --cluster 10.0.0.1:7101,10.0.0.2:7101,10.0.0.3:7101 --queues 4
#    or, for several volumes, `raftblk-vhost --config /etc/raftblk/vhost.toml`
#    (see vhost.toml next to this file) under systemd
#    (deploy/raftblk-vhost@.service).
# 2. Start QEMU. vhost-user needs the guest RAM in shared memory (a memfd
#    with share=on), and num-queues must not exceed the daemon's --queues.
#    `reconnect-ms=1000` (QEMU before 9.2: `reconnect=1`) makes QEMU
#    reconnect to the socket if raftblk-vhost restarts; the guest's
#    in-flight requests are resubmitted from the inflight region once the
#    daemon is back (the guest sees a stall, never an error).
set -euo pipefail
SOCK="${1:-/run/raftblk/vm1.sock}"
exec qemu-system-x86_64 \
  -machine q35,accel=kvm,memory-backend=mem0 \
  -cpu host -smp 4 -m 4G \
  -object memory-backend-memfd,id=mem0,size=4G,share=on \
  -chardev socket,id=disk0,path="$SOCK",reconnect-ms=1000 \
  -device vhost-user-blk-pci,chardev=disk0,num-queues=4,bootindex=1 \
  -nic user,model=virtio-net-pci \
  -drive file=seed.iso,media=cdrom,if=ide \
  -display none -serial mon:stdio
