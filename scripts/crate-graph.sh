#!/bin/sh
# Prints the workspace's crate graph from `cargo metadata`: for each crate, the
# workspace crates it depends on (normal dependencies) and the external crates that
# say what kind of I/O it does. docs/architecture.md quotes this output.
#   scripts/crate-graph.sh          print it
#   scripts/crate-graph.sh --check  fail if docs/architecture.md does not quote it as it is
set -eu
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--check" ]; then
  graph=$("$0")
  if ! python3 -c 'import sys; sys.exit(0 if sys.argv[1] in open("docs/architecture.md").read() else 1)' "$graph"; then
    echo "docs/architecture.md does not show the crate graph as it is; paste this in:"
    echo "$graph"
    exit 1
  fi
  echo "crate graph in docs/architecture.md: up to date"
  exit 0
fi
cargo metadata --format-version 1 --no-deps --offline | python3 -c '
import json, sys
IO = ["tokio", "nix", "rustix", "libc", "git2", "axum", "rusqlite", "rtnetlink", "nftables",
      "kvm-ioctls", "vm-memory", "notify", "prometheus", "caps", "seccompiler", "xattr",
      "indicatif", "walkdir", "etcd-client"]
m = json.load(sys.stdin)
names = {p["name"] for p in m["packages"]}
root = m["workspace_root"]
for p in sorted(m["packages"], key=lambda p: p["manifest_path"]):
    deps = [d for d in p["dependencies"] if d["kind"] is None]
    ours = ", ".join(sorted(d["name"] for d in deps if d["name"] in names)) or "(none)"
    io = ", ".join(sorted(d["name"] for d in deps if d["name"] in IO)) or "none"
    folder = p["manifest_path"][len(root):].rsplit("/", 1)[0].lstrip("/") or "."
    print("%-18s %-14s -> %s" % (p["name"], folder + "/", ours))
    print("%-33s    I/O crates: %s" % ("", io))
'
