#!/usr/bin/env bash
# Fails if Rust code outside the host layer (drivers/host) names a host path under /sys,
# /proc or /run in a string literal: such paths go through stead-host (ProcFs, SysFs,
# NetnsDir, …), whose roots are injected so tests can use a temp dir.
# Checked: *.rs under schema/ reconciler/ controller/ drivers/src drivers/vmm/src src/,
# except tests/, examples/ and benches/ folders and comment lines.
# Usage: scripts/lint-host-paths.sh [REPO_ROOT]
set -uo pipefail
root="${1:-$(dirname "$0")/..}"
cd "$root" || exit 2

dirs=()
for d in schema reconciler controller drivers/src drivers/vmm/src src; do
  [ -d "$d" ] && dirs+=("$d")
done

# A string literal naming /sys/, /proc/ or /run/ anywhere in it, or exactly "/sys",
# "/proc" or "/run"; then drop comment lines (//, ///, //!, and block-comment lines).
literal='"[^"]*/(sys|proc|run)/[^"]*"|"/(sys|proc|run)"'
comment='^[^:]+:[0-9]+:[[:space:]]*(//|/\*|\*)'
hits=$(grep -rnE --include='*.rs' "$literal" "${dirs[@]}" 2>/dev/null \
  | grep -vE "$comment" \
  | grep -vE '^([^:]*/)?(tests|examples|benches)/' || true)

bad=0
while IFS= read -r hit; do
  [ -z "$hit" ] && continue
  echo "host path outside stead-host: $hit"
  bad=1
done <<< "$hits"

if [ $bad -ne 0 ]; then
  echo "lint-host-paths: name these paths through stead-host (drivers/host) instead"
  exit 1
fi
echo "lint-host-paths: clean"
