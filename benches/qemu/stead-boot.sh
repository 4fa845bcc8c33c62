#!/usr/bin/env bash
# The stead side of the boot benchmark: `stead apply` of a VM (a linked clone of the guest
# image, the same size, memory, firmware and cloud-init seed as plain-boot.sh's runs) until
# the guest agent answers, alternating with plain QEMU through plain-boot.sh, then the
# supervisor's RSS. Everything lives in a sandbox (own state/run dirs, cgroup parent,
# network namespace, pool dir) that is removed at the end.
#
#   benches/qemu/stead-boot.sh [-n RUNS] [-f bios|uefi] [STEAD_BIN]
#
# STEAD_BIN defaults to the release build (cargo build --release --bin stead).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
runs=3
firmware=bios
while [ $# -gt 0 ]; do
    case "$1" in
    -n) runs="$2"; shift 2 ;;
    -f) firmware="$2"; shift 2 ;;
    -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
    *) break ;;
    esac
done
# shellcheck source=benches/qemu/sandbox.sh
. "$here/sandbox.sh"
bench_sandbox vm boot "${1:-}"
cat >"$box/vm/vm.yaml" <<YAML
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: bench-root}
spec: {pool: bench, size: 2Gi, format: qcow2, clone: {from: tpl}, deletionPolicy: Delete}
---
apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {name: bench}
spec:
  accel: tcg
  firmware: $firmware
  cpus: 1
  memory: 1Gi
  disks: [{volume: bench-root, boot: 1}]
  agent: true
  restartPolicy: never
  cloudInit: {hostname: bench-stead}
YAML
echo "importing the template once (not timed)" >&2
"$stead" "${args[@]}" apply --yes "$box/base" >/dev/null

# The supervisor's RSS is read while the guest runs, before the VM leaves the manifests
# (an apply of the base alone deletes the VM and its clone).
rss_log="$box/rss"
up="'$stead' ${args[*]} apply --yes '$box/base' '$box/vm' >/dev/null"
# The supervisor is `stead-supervise qemu` when that binary sits next to stead, else `stead qemu`.
down="pgrep -f '^(${stead}|${stead}-supervise) qemu --run-dir $box/run' | xargs -r ps -o rss= -p >>'$rss_log.qemu-sup'; '$stead' ${args[*]} apply --yes --allow-data-loss '$box/base'"
"$here/plain-boot.sh" -n "$runs" -f "$firmware" -i "$image" \
    --stead "$up" --stead-qga "$box/run/vms/bench/qemu/qga.sock" --stead-down "$down"
if [ -s "$rss_log.qemu-sup" ]; then
    sort -n "$rss_log.qemu-sup" | awk '{a[NR]=$1} END {printf "stead qemu supervisor RSS: min=%d max=%d KiB over %d runs\n", a[1], a[NR], NR}'
fi
