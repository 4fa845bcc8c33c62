#!/usr/bin/env bash
# The resident memory of a QEMU VM's supervisor, two ways, alternating: the small
# `stead-supervise` binary next to `stead` (what the driver starts when it is there), and
# `stead qemu` forked from the whole `stead` binary (a copy of `stead` alone in a temp dir).
# The VM is guestless (a blank disk: SeaBIOS finds nothing to boot and idles), so the
# figure is the supervisor's own. Everything lives in a sandbox removed at the end.
#
#   benches/qemu/supervisor-rss.sh [-n RUNS] [RELEASE_DIR]
#
# RELEASE_DIR holds `stead` and `stead-supervise` (default: the release build,
# cargo build --release --bin stead --bin stead-supervise).
set -euo pipefail
runs=5
if [ "${1:-}" = "-n" ]; then runs="$2"; shift 2; fi
rel="${1:-${CARGO_TARGET_DIR:-/var/cache/stead/target}/release}"
for b in stead stead-supervise; do
    [ -x "$rel/$b" ] || { echo "no $rel/$b (cargo build --release --bin stead --bin stead-supervise)" >&2; exit 1; }
done
box="$(mktemp -d /tmp/stead-suprss.XXXXXX)"
chmod 0711 "$box" # QEMU's unprivileged user reaches the VM's files below
ns="stead-suprss-$$"
ip netns add "$ns"
cleanup() {
    for tag in small whole; do
        for s in "$rel/stead" "$box/solo/stead"; do
            [ -d "$box/$tag" ] && "$s" --state-dir "$box/$tag/state" --run-dir "$box/$tag/run" \
                --cgroup-parent "$ns-$tag" --netns "$ns" destroy --yes --allow-data-loss \
                "$box/$tag/vm.yaml" >/dev/null 2>&1 || true
        done
    done
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$box"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
mkdir -p "$box/solo"
cp "$rel/stead" "$box/solo/stead"

# One run: apply the VM, read its supervisor's RSS and private memory, destroy it.
measure() {
    local stead="$1" tag="$2"
    local args=(--state-dir "$box/$tag/state" --run-dir "$box/$tag/run" --cgroup-parent "$ns-$tag" --netns "$ns")
    mkdir -p "$box/$tag/pool"
    cat >"$box/$tag/vm.yaml" <<YAML
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: p}
spec: {type: dir, path: $box/$tag/pool, content: [images]}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: blank}
spec: {pool: p, size: 64Mi, format: raw, deletionPolicy: Delete}
---
apiVersion: stead.dev/v1alpha1
kind: VirtualMachine
metadata: {name: rss}
spec:
  engine: qemu
  accel: tcg
  firmware: bios
  cpus: 1
  memory: 64Mi
  disks: [{volume: blank, boot: 1}]
  restartPolicy: never
YAML
    "$stead" "${args[@]}" apply --yes "$box/$tag/vm.yaml" >/dev/null 2>>"$box/apply.log"
    sleep 3
    local pid
    pid="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["supervisorPid"])' \
        "$box/$tag/run/vms/rss/supervisor.json")"
    local exe rss pss private
    exe="$(basename "$(readlink "/proc/$pid/exe")")"
    rss="$(awk '/^Rss:/ {print $2}' "/proc/$pid/smaps_rollup")"
    pss="$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup")"
    private="$(awk '/^Private_(Clean|Dirty):/ {s += $2} END {print s}' "/proc/$pid/smaps_rollup")"
    echo "$tag $exe rss=$rss pss=$pss private=$private" >&2
    echo "$rss $pss $private" >>"$box/$tag.rss"
    "$stead" "${args[@]}" destroy --yes --allow-data-loss "$box/$tag/vm.yaml" >/dev/null 2>>"$box/apply.log"
}

for _ in $(seq "$runs"); do
    measure "$rel/stead" small
    measure "$box/solo/stead" whole
done
summary() {
    local tag="$1" what="$2" col="$3"
    cut -d' ' -f"$col" "$box/$tag.rss" | sort -n |
        awk -v t="$what" '{a[NR]=$1} END {printf "  %-8s min %5d  median %5d  max %5d KiB\n", t, a[1], a[int((NR+1)/2)], a[NR]}'
}
echo "QEMU supervisor memory over $runs runs each (release build):"
for tag in small whole; do
    case "$tag" in
    small) echo "stead-supervise (small binary):" ;;
    whole) echo "stead qemu (forked from the whole stead binary):" ;;
    esac
    summary "$tag" RSS 1
    summary "$tag" PSS 2
    summary "$tag" private 3
done
