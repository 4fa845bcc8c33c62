#!/usr/bin/env bash
# The main job: install what is missing, build stead, build guest assets, converge
# examples/homelab on this host inside a sandbox, then show `stead get`.
#   scripts/demo.sh        bring the demo up (idempotent: re-running converges)
#   scripts/demo.sh qemu   the same, plus examples/qemu (full VMs through QEMU)
#   scripts/demo.sh down   remove everything the demo created
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/stead/target}"
NS=stead-demo
STATE=/var/lib/stead-demo
RUN=/run/stead-demo
stead="$CARGO_TARGET_DIR/release/stead"
args=(--state-dir "$STATE" --run-dir "$RUN" --cgroup-parent stead-demo --netns "$NS")

# `scripts/demo.sh qemu` also converges examples/qemu (full VMs through QEMU: a cloud-init
# Debian VM, a UEFI VM, a template with two linked clones) from the cached guest image,
# with its paths moved under the demo's own directories.
QEMU_MANIFESTS="$STATE/examples-qemu"
qemu_manifests() {
  rm -rf "$QEMU_MANIFESTS"; mkdir -p "$QEMU_MANIFESTS"
  for f in examples/qemu/*.yaml; do
    sed -e 's#/var/lib/stead/images/#/var/lib/stead-demo-pools/images/#' \
        -e 's#/var/lib/stead/pools/vms#/var/lib/stead-demo-pools/vms#' "$f" >"$QEMU_MANIFESTS/$(basename "$f")"
  done
}

if [ "${1:-}" = "down" ]; then
  if [ -x "$stead" ] && [ -d "$QEMU_MANIFESTS" ]; then
    "$stead" "${args[@]}" destroy --yes --allow-data-loss "$QEMU_MANIFESTS" || true
  fi
  [ -x "$stead" ] && "$stead" "${args[@]}" destroy --yes --allow-data-loss examples/homelab/ || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$STATE" "$RUN" /var/lib/stead-demo-pools
  echo "demo removed"
  exit 0
fi

scripts/install-deps.sh
echo "== building stead (release)"
cargo build --release --bin stead --bin stead-supervise
echo "== building guest assets"
scripts/build-assets.sh /var/lib/stead-demo-pools/assets "$stead"
ip netns list | grep -qw "$NS" || { ip netns add "$NS"; ip -n "$NS" link set lo up; }

echo "== stead validate"
"$stead" "${args[@]}" validate examples/homelab/
echo "== stead diff"
set +e
"$stead" "${args[@]}" diff examples/homelab/
code=$?
set -e
[ $code -eq 1 ] && exit 1
echo "== stead apply"
"$stead" "${args[@]}" apply --yes examples/homelab/
echo "== stead diff (must be clean)"
"$stead" "${args[@]}" diff examples/homelab/
if [ "${1:-}" = "qemu" ]; then
  echo "== the guest image for examples/qemu (scripts/guest-image.sh, cached)"
  install -D -m 0644 "$(scripts/guest-image.sh)" /var/lib/stead-demo-pools/images/debian-12.qcow2
  qemu_manifests
  echo "== stead apply examples/qemu (full VMs; under TCG they take a minute or two to boot)"
  "$stead" "${args[@]}" apply --yes "$QEMU_MANIFESTS"
fi
echo "== stead get"
"$stead" "${args[@]}" get
echo "== the web container answers through the port forward (10.42.0.1:8080 -> 10.42.0.10:80)"
for i in 1 2 3 4 5; do
  ip netns exec "$NS" wget -qO- -T 2 http://10.42.0.1:8080/ && break
  sleep 1
done
echo
echo "The demo is running in network namespace $NS with state in $STATE."
echo "Try: $stead ${args[*]} get -o yaml | less"
echo "Remove it with: scripts/demo.sh down"
