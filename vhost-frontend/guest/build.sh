#!/usr/bin/env bash
# Builds the small Linux guest the end-to-end tests and the quick start
# boot under QEMU: Debian's 6.1 kernel (virtio_blk, ext4, and AHCI and
# virtio-scsi for the NBD tests, as modules) and
# a busybox initramfs with fio, mkfs.ext4 and e2fsck copied in with their libraries.
#
#   vhost-frontend/guest/build.sh [OUTDIR]    (default /var/tmp/raftblk-guest)
#
# Produces OUTDIR/vmlinuz and OUTDIR/base.cpio.gz; a test appends its own
# cpio holding /test.sh (Linux unpacks concatenated archives). Cached: does
# nothing when both exist and are newer than this script and init. Needs:
# apt-get (download only), dpkg, cpio, busybox-static, fio, e2fsprogs.
set -euo pipefail
OUT="${1:-${RAFTBLK_GUEST_DIR:-/var/tmp/raftblk-guest}}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -s "$OUT/vmlinuz" && -s "$OUT/base.cpio.gz" && "$OUT/base.cpio.gz" -nt "$HERE/init" \
      && "$OUT/base.cpio.gz" -nt "$HERE/build.sh" ]]; then
  exit 0
fi
for tool in cpio dpkg apt-get gzip; do
  command -v "$tool" >/dev/null || { echo "guest build: $tool is missing" >&2; exit 1; }
done
for f in /bin/busybox /usr/bin/fio /sbin/mke2fs /sbin/e2fsck; do
  [[ -x "$f" ]] || { echo "guest build: $f is missing (apt-get install busybox-static fio e2fsprogs)" >&2; exit 1; }
done
mkdir -p "$OUT"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
pkg="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')"
[[ -n "$pkg" ]] || { echo "guest build: cannot resolve linux-image-amd64 (run apt-get update)" >&2; exit 1; }
apt-get download "$pkg" >/dev/null 2>&1 || apt-get download "$pkg"
dpkg -x ./*.deb kernel
kver="$(ls kernel/lib/modules | head -1)"
cp kernel/boot/vmlinuz-"$kver" "$OUT/vmlinuz.tmp"

root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib,lib64,lib/modules,proc,sys,dev,tmp,mnt,etc}
cp /bin/busybox "$root/bin/busybox"
copy_with_libs() {
  local bin="$1" dest="$2"
  cp "$bin" "$root$dest"
  ldd "$bin" | awk '/=> \//{print $3} /^\s*\/lib/{print $1}' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}
copy_with_libs /usr/bin/fio /usr/bin/fio
copy_with_libs /sbin/mke2fs /sbin/mke2fs
ln -s mke2fs "$root/sbin/mkfs.ext4"
copy_with_libs /sbin/e2fsck /sbin/e2fsck
# The dynamic loader at its canonical path.
mkdir -p "$root/lib64"
cp -L /lib64/ld-linux-x86-64.so.2 "$root/lib64/"
mods="kernel/lib/modules/$kver/kernel"
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev \
         drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/block/virtio_blk \
         lib/crc16 fs/mbcache fs/jbd2/jbd2 crypto/crc32c_generic fs/ext4/ext4 \
         drivers/scsi/scsi_common drivers/scsi/scsi_mod lib/crc64 crypto/crc64_rocksoft_generic \
         lib/crc64-rocksoft crypto/crct10dif_common crypto/crct10dif_generic lib/crc-t10dif \
         block/t10-pi drivers/scsi/sd_mod drivers/ata/libata drivers/ata/libahci drivers/ata/ahci \
         drivers/scsi/virtio_scsi; do
  # The SCSI disk, AHCI (SATA) and virtio-scsi stacks and their
  # dependencies (modinfo's depends=, in load order) serve the emulated
  # disks of the NBD tests; init loads them only when asked
  # (raftblk.disk=sda on the kernel command line).
  cp "$mods/$m.ko" "$root/lib/modules/"
done
cp "$HERE/init" "$root/init"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$OUT/base.cpio.gz.tmp"
mv "$OUT/vmlinuz.tmp" "$OUT/vmlinuz"
mv "$OUT/base.cpio.gz.tmp" "$OUT/base.cpio.gz"
echo "guest: $OUT/vmlinuz ($kver), $OUT/base.cpio.gz ($(du -h "$OUT/base.cpio.gz" | cut -f1))"
