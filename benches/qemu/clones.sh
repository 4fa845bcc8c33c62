#!/usr/bin/env bash
# Ten linked clones of the guest image, created and started by one `stead apply`: the
# apply's wall time (volumes cloned, seeds written, ten QEMUs up and answering QMP), the
# disk the clones use, and the time until every guest agent answers. Runs in a sandbox
# (own state/run dirs, cgroup parent, network namespace, pool dir), removed at the end.
#
#   benches/qemu/clones.sh [-n COUNT] [STEAD_BIN]
#
# STEAD_BIN defaults to the release build (cargo build --release --bin stead).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
count=10
while [ $# -gt 0 ]; do
    case "$1" in
    -n) count="$2"; shift 2 ;;
    -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
    *) break ;;
    esac
done
# shellcheck source=benches/qemu/sandbox.sh
. "$here/sandbox.sh"
bench_sandbox vms clones "${1:-}"
for i in $(seq 1 "$count"); do
    cat >>"$box/vms/vms.yaml" <<YAML
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: c$i-root}
spec: {pool: bench, size: 2Gi, format: qcow2, clone: {from: tpl}, deletionPolicy: Delete}
---
apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {name: c$i}
spec:
  accel: tcg
  memory: 512Mi
  disks: [{volume: c$i-root, boot: 1}]
  agent: true
  restartPolicy: never
  cloudInit: {hostname: clone-$i}
YAML
done
echo "importing the template once (not timed)" >&2
"$stead" "${args[@]}" apply --yes "$box/base" >/dev/null
tpl_kib=$(du -sk "$box/pool/images/tpl.qcow2" | cut -f1)

t0=$(date +%s.%N)
"$stead" "${args[@]}" apply --yes "$box/base" "$box/vms" >/dev/null
t1=$(date +%s.%N)
clones_kib=$(du -ck "$box"/pool/images/c*-root.qcow2 | tail -1 | cut -f1)
echo "apply of $count linked clones + $count VMs (QEMU started): $(echo "$t1 - $t0" | bc) s"
echo "disk: template ${tpl_kib} KiB; $count clones ${clones_kib} KiB right after the apply"
for i in $(seq 1 "$count"); do
    "$here/qga.py" "$box/run/vms/c$i/qemu/qga.sock" --wait 1800 >/dev/null
done
t2=$(date +%s.%N)
clones_kib=$(du -ck "$box"/pool/images/c*-root.qcow2 | tail -1 | cut -f1)
echo "every guest agent answered after $(echo "$t2 - $t0" | bc) s (TCG, all guests booting at once)"
echo "disk: $count clones ${clones_kib} KiB after first boot (cloud-init, logs)"
