#!/usr/bin/env bash
# stead's benchmark suite: every figure of the performance table side by side with its
# peer (crun, qemu microvm, plain QEMU, zstd -T0) in one run, interleaved stead/peer after
# a warm-up, one table at the end (docs/performance.md, "Benchmark suite").
#
#   scripts/bench.sh [--smoke] [--only FIGURE]... [--out FILE | --record] [--no-build]
#                    [--debug | --release]
#
#   --smoke       one pair of each figure, no warm-up, smaller data (a tenth of the plan
#                 sizes, 16 MiB of backup data), the debug build unless
#                 --release (CI: asserts that every row has a number or a stated SKIP,
#                 never a timing)
#   --only NAME   one figure (repeatable): container, containers-50, microvm, qemu-vm,
#                 plan-20k, plan-100k, noop-200-networks, commit-converged, backup, validate
#   --out FILE    also write the report to FILE; --record writes bench/results/<date>.md
#   --no-build    use the binaries already built
#   --debug/--release  which build to measure (default: release; --smoke: debug)
# Runs as root. Builds the binaries (stead, stead-supervise, the stead-vmm launch and
# backup examples) and the guest image for the QEMU row when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

py_args=()
build=1
profile=""
smoke=0
cmdline="scripts/bench.sh $*"
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) py_args+=(--smoke); smoke=1; shift ;;
    --only) py_args+=(--only "$2"); shift 2 ;;
    --out) py_args+=(--out "$2"); shift 2 ;;
    --record) py_args+=(--out "bench/results/$(date -u +%F).md"); shift ;;
    --no-build) build=0; shift ;;
    --debug) profile=debug; shift ;;
    --release) profile=release; shift ;;
    -h | --help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "scripts/bench.sh runs as root (containers, namespaces, cgroups)" >&2; exit 2; }
for t in python3 unshare crun qemu-system-x86_64 zstd; do
  command -v "$t" >/dev/null || echo "note: $t is missing (scripts/install-deps.sh): its rows will SKIP" >&2
done

target=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
[ -n "$profile" ] || { [ "$smoke" = 1 ] && profile=debug || profile=release; }
cargo_profile=(); [ "$profile" = release ] && cargo_profile=(--release)
if [ "$build" = 1 ]; then
  echo "== $profile build" >&2
  cargo build -q "${cargo_profile[@]}" --bin stead --bin stead-supervise
  cargo build -q "${cargo_profile[@]}" -p stead-vmm --example launch
  cargo build -q "${cargo_profile[@]}" -p stead-drivers --example backup_cli
fi
rel="$target/$profile"
for b in "$rel/stead" "$rel/stead-supervise" "$rel/examples/launch" "$rel/examples/backup_cli"; do
  [ -x "$b" ] || { echo "missing $b: run without --no-build" >&2; exit 1; }
done
# The QEMU row boots the cached guest image; build it now (not timed) when it is missing.
# (scripts/guest-image.sh returns at once when the image is cached.)
if command -v qemu-system-x86_64 >/dev/null && ! [ -f "$(scripts/guest-image.sh --print-path)" ]; then
  echo "== guest image (built once, cached)" >&2
  scripts/guest-image.sh >/dev/null || echo "note: no guest image: the QEMU row will fail" >&2
fi

# crun refuses this host's hybrid cgroup layout while the controller-less cgroup2 mount is
# visible: both sides run in a private mount namespace where it is unmounted.
exec unshare -m --propagation private -- sh -c '
  if mountpoint -q /sys/fs/cgroup/unified; then umount /sys/fs/cgroup/unified; fi
  exec "$@"' bench \
  python3 -B "$repo/bench/suite.py" --stead "$rel/stead" --vmm-launch "$rel/examples/launch" \
  --backup-cli "$rel/examples/backup_cli" --command "$cmdline" "${py_args[@]}"
