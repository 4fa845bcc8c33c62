#!/usr/bin/env bash
# Benchmark (issue 2): `stead validate` and `stead diff` on generated manifests of 2,000
# and 20,000 resources (pools, networks, volumes, containers wired by references).
#   scripts/bench-plan.sh [storage|all]
# Uses the release build. Prints the median of 5 runs for each size.
set -euo pipefail
cd "$(dirname "$0")/.."
kinds="${1:-all}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/stead/target}"
cargo build --release --bin stead -q
stead="$CARGO_TARGET_DIR/release/stead"
work=$(mktemp -d /tmp/stead-bench-XXXXXX)
ns="stead-bench-$$"
ip netns add "$ns"
trap 'ip netns del "$ns" 2>/dev/null; rm -rf "$work"' EXIT
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for n in 2000 20000; do
  python3 scripts/gen-manifests.py "$n" "$work/m$n" --root "$work/pools" --kinds "$kinds" >/dev/null
  for verb in validate diff; do
    times=()
    for i in 1 2 3 4 5; do
      s=$(date +%s.%N)
      set +e
      "$stead" --state-dir "$work/state" --run-dir "$work/run" --netns "$ns" $verb "$work/m$n" >/dev/null 2>&1
      code=$?
      set -e
      e=$(date +%s.%N)
      [ "$verb" = validate ] && [ $code -ne 0 ] && { echo "validate failed"; exit 1; }
      times+=("$(echo "$e - $s" | bc)")
    done
    printf '%-8s %6d resources: median %.3f s (runs: %s)\n' "$verb" "$n" "$(printf '%s\n' "${times[@]}" | median)" "${times[*]}"
  done
done
