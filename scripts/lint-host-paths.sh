#!/usr/bin/env bash
# Fails if Rust code outside the host layer (drivers/host) names a host path under /sys,
# /proc or /run in a string literal: such paths go through stead-host (ProcFs, SysFs,
# NetnsDir, …), whose roots are injected so tests can use a temp dir.
# Checked: *.rs under schema/ reconciler/ controller/ drivers/src drivers/vmm/src src/,
# except tests/, examples/ and benches/ folders and comment lines.
# Files listed in scripts/host-paths.allow (one repo-relative path a line, `#` comments)
# are reported as warnings only: a temporary list, to shrink to nothing.
# Usage: scripts/lint-host-paths.sh [REPO_ROOT]
set -uo pipefail
root="${1:-$(dirname "$0")/..}"
cd "$root" || exit 2
allow_file=scripts/host-paths.allow

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

allowed=()
if [ -f "$allow_file" ]; then
  while IFS= read -r line; do
    line="${line%%#*}"
    line="${line//[[:space:]]/}"
    [ -n "$line" ] && allowed+=("$line")
  done < "$allow_file"
fi

is_allowed() {
  local a
  for a in "${allowed[@]}"; do [ "$1" = "$a" ] && return 0; done
  return 1
}

bad=0
declare -A allowed_hit=()
while IFS= read -r hit; do
  [ -z "$hit" ] && continue
  file="${hit%%:*}"
  if is_allowed "$file"; then
    echo "warning: allow-listed host path: $hit"
    allowed_hit["$file"]=1
  else
    echo "host path outside stead-host: $hit"
    bad=1
  fi
done <<< "$hits"

for a in "${allowed[@]}"; do
  if [ -z "${allowed_hit[$a]:-}" ]; then
    echo "note: $a is in $allow_file but names no host path (any more): remove it"
  fi
done

if [ $bad -ne 0 ]; then
  echo "lint-host-paths: name these paths through stead-host (drivers/host) instead"
  exit 1
fi
echo "lint-host-paths: clean"
