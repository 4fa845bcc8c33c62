#!/usr/bin/env bash
# Builds the guest assets the examples use, from Debian packages only (nothing is
# downloaded at run time): a busybox rootfs template for containers.
#   scripts/build-assets.sh DEST_DIR
set -euo pipefail
dest="${1:-/var/lib/stead/assets}"
mkdir -p "$dest"
here="$(cd "$(dirname "$0")" && pwd)"
if [ -x "$here/build-rootfs.sh" ]; then
  [ -f "$dest/busybox.tar.zst" ] || "$here/build-rootfs.sh" "$dest"
fi
echo "assets in $dest"
