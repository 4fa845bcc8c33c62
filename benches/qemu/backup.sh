#!/usr/bin/env bash
# First vs incremental backup of a running QEMU VM's disk: a 2 GiB qcow2 full of random
# data, attached to a guestless QEMU; backed up, then 10 MiB changed, backed up again.
# Prints both backups' wall time and bytes read (goal: the re-backup >= 10x faster).
#
#   benches/qemu/backup.sh [SIZE_MIB] [CHANGE_MIB] [WORKDIR]
#
# Builds drivers/examples/qemu_backup_bench.rs (release by default; PROFILE=dev for a
# debug build). Needs qemu-system-x86_64 and qemu-img.
set -euo pipefail
SIZE_MIB=${1:-2048}
CHANGE_MIB=${2:-10}
WORK=${3:-$(mktemp -d /var/tmp/stead-qemu-backup-bench.XXXXXX)}
PROFILE=${PROFILE:-release}
cd "$(dirname "$0")/../.."
for t in qemu-system-x86_64 qemu-img; do
    command -v "$t" > /dev/null || { echo "SKIP qemu backup bench: $t missing"; exit 0; }
done
cargo build -q --profile "$PROFILE" -p stead-drivers --example qemu_backup_bench
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
DIR=$PROFILE; [ "$PROFILE" = dev ] && DIR=debug
BIN="$TARGET_DIR/$DIR/examples/qemu_backup_bench"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"

# Random data (incompressible, no dedup): the first backup reads and stores all of it.
dd if=/dev/urandom of="$WORK/disk.raw" bs=4M count=$((SIZE_MIB / 4)) status=none
qemu-img convert -q -f raw -O qcow2 "$WORK/disk.raw" "$WORK/disk.qcow2"
rm -f "$WORK/disk.raw"
cat "$WORK/disk.qcow2" > /dev/null   # warm page cache, as for a running VM's hot disk

echo "disk: ${SIZE_MIB} MiB qcow2 (random data), change: ${CHANGE_MIB} MiB, build: $PROFILE"
"$BIN" "$WORK/disk.qcow2" "$WORK" "$CHANGE_MIB"
