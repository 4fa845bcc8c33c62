#!/bin/sh
# Flame graph of the container start path: `stead apply --yes` of one privileged busybox
# container (memory + pids limits, no network), the CLI and the `stead shim` it starts,
# sampled with `perf record` and drawn with inferno.
#
#   scripts/flamegraph.sh [OUT.svg] [RUNS]
#
# Defaults: docs/img/container-start-flamegraph.svg, 30 runs; FOLDED=FILE also keeps the
# collapsed stacks. The binary is $STEAD_BIN
# or target/release/stead (build it with `cargo build --release --bin stead`). Needs root,
# perf (apt linux-perf), busybox-static and zstd, and inferno (installed here with
# `cargo install --locked inferno` when missing). Everything runs in a private mount
# namespace with its own state/run dirs and cgroup parent under a temp dir; the host's
# cgroups are left alone.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/docs/img/container-start-flamegraph.svg}
runs=${2:-30}
bin=${STEAD_BIN:-$here/target/release/stead}
[ -x "$bin" ] || { echo "$0: $bin missing: cargo build --release --bin stead" >&2; exit 1; }
command -v inferno-flamegraph >/dev/null || cargo install --locked inferno
for t in perf inferno-collapse-perf inferno-flamegraph unshare; do
    command -v "$t" >/dev/null || { echo "$0: $t missing (see the header)" >&2; exit 1; }
done
[ "$(id -u)" = 0 ] || { echo "$0: needs root" >&2; exit 1; }

work=$(mktemp -d /tmp/stead-flame.XXXXXX)
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM
"$here/scripts/build-rootfs.sh" "$work" >/dev/null
cat > "$work/c.yaml" <<YAML
apiVersion: stead.dev/v1alpha1
kind: Container
metadata:
  name: flame
spec:
  rootfs:
    path: $work/busybox-rootfs
  command: ["/bin/sh", "-c", "trap 'exit 0' TERM; sleep 1000 & wait"]
  unprivileged: false
  resources:
    memory: 64Mi
    pids: 64
YAML

# In a private mount namespace: crun and stead both see the v1 controllers only when the
# controller-less cgroup2 mount is hidden (as the benchmarks run them).
cat > "$work/run.sh" <<SH
set -eu
umount /sys/fs/cgroup/unified 2>/dev/null || true
export STEAD_STATE_DIR=$work/state STEAD_RUN_DIR=$work/run STEAD_CGROUP_PARENT=stead-flame-\$\$
i=0
while [ \$i -lt $runs ]; do
    perf record -q -F 4999 --call-graph dwarf,16384 -o $work/perf.\$i -- "$bin" apply --yes $work/c.yaml >/dev/null 2>&1
    "$bin" destroy --yes $work/c.yaml >/dev/null 2>&1
    i=\$((i + 1))
done
SH
unshare -m sh "$work/run.sh"
for f in "$work"/perf.*; do
    perf script -i "$f" 2>/dev/null
done | inferno-collapse-perf > "$work/folded"
# Frames narrower than 2 px are left out: the graph stays readable and small.
inferno-flamegraph --title "stead apply: container start path ($runs runs)" \
    --countname samples --minwidth 2 < "$work/folded" > "$out"
# FOLDED=file keeps the collapsed stacks (for a table by process or library).
if [ -n "${FOLDED:-}" ]; then cp "$work/folded" "$FOLDED"; fi
echo "$out"
