#!/usr/bin/env bash
# Builds the guest assets the examples use, from Debian packages only (nothing is
# downloaded at run time):
#   - busybox.tar.zst: a busybox-static container rootfs template (scripts/build-rootfs.sh);
#   - tiny-guest.bin: stead's own tiny demo VM kernel (runs on any KVM, even without
#     VT-x; boot it with cmdline "mode=idle"). For a real Linux guest on hosts with
#     hardware virtualization see examples/guest-assets/build-linux-guest.sh.
#   scripts/build-assets.sh DEST_DIR STEAD_BINARY
set -euo pipefail
dest="${1:-/var/lib/stead/assets}"
stead="${2:-stead}"
here="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$dest"
[ -f "$dest/busybox.tar.zst" ] || "$here/build-rootfs.sh" "$dest"
[ -f "$dest/tiny-guest.bin" ] || "$stead" vmm --write-demo-guest "$dest/tiny-guest.bin"
echo "assets in $dest"
