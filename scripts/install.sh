#!/usr/bin/env bash
# Installs built stead binaries, their manual pages and shell completions (and, with
# --systemd, the controller's unit). Running it again gives the same tree.
#
# Usage: scripts/install.sh [--prefix DIR] [--destdir DIR] [--from DIR] [--systemd]
#   --prefix DIR   where stead lives (default /usr/local): DIR/bin, DIR/share/man/man1,
#                  DIR/share/{bash-completion,zsh,fish}, DIR/lib/systemd/system
#   --destdir DIR  stage the tree under DIR (packaging); nothing outside it is touched
#   --from DIR     the directory holding the built `stead` and `stead-supervise`
#                  (default: the cargo target dir's release/, then debug/)
#   --systemd      also install examples/systemd/stead-controller.service
#
# Build first: cargo build --release --bin stead --bin stead-supervise
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
prefix=/usr/local
destdir=
from=
systemd=no

usage() { sed -n '2,13s/^# \{0,1\}//p' "$0"; }
die() { echo "install.sh: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; prefix=$2; shift 2 ;;
    --prefix=*) prefix=${1#*=}; shift ;;
    --destdir) [ $# -ge 2 ] || die "--destdir needs a directory"; destdir=$2; shift 2 ;;
    --destdir=*) destdir=${1#*=}; shift ;;
    --from) [ $# -ge 2 ] || die "--from needs a directory"; from=$2; shift 2 ;;
    --from=*) from=${1#*=}; shift ;;
    --systemd) systemd=yes; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
case "$prefix" in /*) ;; *) die "--prefix must be an absolute path" ;; esac
prefix=${prefix%/}
destdir=${destdir%/}

# The binaries: --from, else the cargo target dir (which .cargo/config.toml may move).
binaries=(stead stead-supervise)
if [ -z "$from" ]; then
  target=${CARGO_TARGET_DIR:-}
  if [ -z "$target" ] && command -v cargo >/dev/null; then
    target=$(cd "$repo" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
      | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
  fi
  target=${target:-$repo/target}
  for profile in release debug; do
    if [ -x "$target/$profile/stead" ] && [ -x "$target/$profile/stead-supervise" ]; then
      from=$target/$profile
      break
    fi
  done
  [ -n "$from" ] || die "no built stead in $target/{release,debug}: run cargo build --release --bin stead --bin stead-supervise, or pass --from DIR"
fi
for b in "${binaries[@]}"; do
  [ -x "$from/$b" ] || die "$from/$b is missing or not executable"
done

root=$destdir$prefix
bindir=$root/bin
mandir=$root/share/man/man1
bashdir=$root/share/bash-completion/completions
zshdir=$root/share/zsh/site-functions
fishdir=$root/share/fish/vendor_completions.d
unitdir=$root/lib/systemd/system

# Writes stdin to $1 (mode $2) through a temporary file and a rename: a running binary
# is replaced, not overwritten, and an interrupted run leaves no half-written file.
put() {
  local dest=$1 mode=$2 tmp
  mkdir -p "$(dirname "$dest")"
  tmp=$(mktemp "$dest.XXXXXX")
  cat > "$tmp"
  chmod "$mode" "$tmp"
  mv -f "$tmp" "$dest"
}

for b in "${binaries[@]}"; do
  put "$bindir/$b" 0755 < "$from/$b"
done
echo "binaries: $bindir/{$(IFS=,; echo "${binaries[*]}")}"

# Pages and completions come from the binary being installed. Pages of subcommands that
# no longer exist are removed first, so a re-run leaves exactly the current set.
stead=$from/stead
pages=$(mktemp -d)
trap 'rm -rf "$pages"' EXIT
"$stead" man --out "$pages" 2>/dev/null
mkdir -p "$mandir"
rm -f "$mandir"/stead.1 "$mandir"/stead-*.1
for page in "$pages"/*.1; do
  put "$mandir/$(basename "$page")" 0644 < "$page"
done
echo "manual pages: $mandir ($(ls "$pages" | wc -l) pages)"

"$stead" completions bash | put "$bashdir/stead" 0644
"$stead" completions zsh | put "$zshdir/_stead" 0644
"$stead" completions fish | put "$fishdir/stead.fish" 0644
echo "completions: $bashdir/stead, $zshdir/_stead, $fishdir/stead.fish"

if [ "$systemd" = yes ]; then
  sed "s|/usr/local/bin/stead|$prefix/bin/stead|g" \
    "$repo/examples/systemd/stead-controller.service" | put "$unitdir/stead-controller.service" 0644
  echo "systemd unit: $unitdir/stead-controller.service (configure /etc/stead/controller.env, then systemctl enable --now stead-controller)"
  if [ -z "$destdir" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload
  fi
fi
