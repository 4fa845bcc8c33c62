#!/usr/bin/env bash
# Benchmark (issue 8): `stead env up` and `stead env down` of an environment with one
# bridge, two containers and one volume cloned (reflink) from a 1 GiB base snapshot.
# Uses a loop-mounted XFS with reflink made here, the release build, 5 rounds.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/stead/target}"
cargo build --release --bin stead -q
stead="$CARGO_TARGET_DIR/release/stead"
work=$(mktemp -d /tmp/stead-bench-env-XXXXXX)
chmod 755 "$work"   # unprivileged containers (mapped root) must traverse the state dir
dev=""
cleanup() {
  "$stead" --state-dir "$work/state" --run-dir "$work/run" --cgroup-parent stead-bench env down bench >/dev/null 2>&1 || true
  umount -l "$work/mnt" 2>/dev/null || true
  [ -n "$dev" ] && losetup -d "$dev" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
truncate -s 4G "$work/xfs.img"
mkfs.xfs -q -m reflink=1 "$work/xfs.img"
dev=$(losetup -f --show "$work/xfs.img")
mkdir -p "$work/mnt"
mount "$dev" "$work/mnt"
scripts/build-rootfs.sh "$work/assets" >/dev/null
g=(--state-dir "$work/state" --run-dir "$work/run" --cgroup-parent stead-bench)
cat > "$work/base.yaml" <<YAML
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: p}
spec: {type: dir, path: $work/mnt/pool}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: data}
spec: {pool: p, size: 1Gi}
YAML
"$stead" "${g[@]}" apply --yes -q "$work/base.yaml" >/dev/null
# 1 GiB of mixed data in the base volume, then the snapshot environments clone from.
python3 - "$work/mnt/pool/images/data.raw" <<'PY'
import os, sys
with open(sys.argv[1], "r+b") as f:
    chunk = 1 << 20
    for i in range(1024):
        if i % 3 == 0: f.write(os.urandom(chunk))
        elif i % 3 == 1: f.write((b"stead log line %d\n" % i) * (chunk // 20) + b"\0" * (chunk - (chunk // 20) * len(b"stead log line %d\n" % i)))
        else: f.write(b"\0" * chunk)
PY
"$stead" "${g[@]}" snapshot create Volume/data golden >/dev/null
mkdir -p "$work/env"
cat > "$work/env/env.yaml" <<YAML
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: p}
spec: {type: dir, path: $work/mnt/pool}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: data}
spec: {pool: p, size: 1Gi}
---
apiVersion: stead.dev/v1alpha1
kind: Network
metadata: {name: lan0}
spec: {addresses: [10.77.0.1/24]}
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {name: a}
spec:
  rootfs: {template: $work/assets/busybox.tar.zst}
  interfaces: [{name: eth0, network: lan0, address: 10.77.0.10/24}]
---
apiVersion: stead.dev/v1alpha1
kind: Container
metadata: {name: b}
spec:
  rootfs: {template: $work/assets/busybox.tar.zst}
  interfaces: [{name: eth0, network: lan0, address: 10.77.0.11/24}]
YAML
ups=(); downs=()
for i in 1 2 3 4 5; do
  s=$(date +%s.%N)
  "$stead" "${g[@]}" -q env up bench "$work/env" --from-snapshot golden >"$work/up.log" 2>&1 || { cat "$work/up.log"; exit 1; }
  m=$(date +%s.%N)
  ip netns exec stead-env-bench ping -c1 -W2 10.77.0.11 >/dev/null
  m2=$(date +%s.%N)
  "$stead" "${g[@]}" -q env down bench >/dev/null
  e=$(date +%s.%N)
  ups+=("$(echo "$m - $s" | bc)"); downs+=("$(echo "$e - $m2" | bc)")
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
echo "env up   (bridge + 2 containers + 1 GiB volume cloned by reflink): median $(median "${ups[@]}") s  runs: ${ups[*]}"
echo "env down (verified teardown):                                      median $(median "${downs[@]}") s  runs: ${downs[*]}"
