#!/usr/bin/env bash
# The whole test suite: lint, build, every test (unit, sandboxed kernel tests, e2e).
# Runs as root on a fresh Debian 12 machine; installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/stead/target}"
mkdir -p "$CARGO_TARGET_DIR"

scripts/install-deps.sh

echo "== the workspace crates of another checkout are rebuilt"
# A target dir shared by two checkouts (CI's clone and a developer's tree) keeps the test
# binaries of the last one to build them; where a checkout's sources look older than those
# binaries they are reused with the other checkout's paths compiled in
# (env!("CARGO_MANIFEST_DIR"): fixtures, docs/openapi.json). The workspace's own crates are
# rebuilt when the checkout changes; dependencies stay warm.
stamp="$CARGO_TARGET_DIR/.stead-checkout"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$PWD" ]; then
  # shellcheck disable=SC2046
  cargo clean $(cargo metadata --no-deps --format-version 1 \
    | python3 -c 'import json,sys; print(" ".join("-p " + p["name"] for p in json.load(sys.stdin)["packages"]))')
  echo "$PWD" > "$stamp"
fi

echo "== fmt and clippy"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== one vm-memory and one vmm-sys-util in the tree"
dups=$(cargo tree -d -e normal --workspace 2>/dev/null | grep -E '^(vm-memory|vmm-sys-util) ' || true)
if [ -n "$dups" ]; then echo "duplicate rust-vmm crates: $dups"; exit 1; fi

echo "== dependency hygiene: no unused dependencies; bans and licenses (deny.toml)"
cargo machete
cargo deny --offline check bans licenses

echo "== host paths (/proc, /sys, /run) only in the host layer"
scripts/lint-host-paths.sh
scripts/crate-graph.sh --check

echo "== etcd for the cluster tests (a SKIP otherwise) and protoc for the etcd client"
command -v etcd >/dev/null && etcd --version | head -1 || echo "no etcd: the cluster tests will SKIP"
command -v protoc >/dev/null || { echo "protoc missing (apt-get install protobuf-compiler)"; exit 1; }

echo "== build"
cargo build --workspace --bins

echo "== examples validate"
for d in examples/storage examples/homelab examples/datacenter examples/qemu; do
  "$CARGO_TARGET_DIR/debug/stead" validate "$d"
done

echo "== the QEMU tests' guest image (built once, cached outside the clone by its inputs)"
scripts/guest-image.sh >/dev/null

echo "== tests"
export STEAD_BIN="$CARGO_TARGET_DIR/debug/stead"
# Tests for kernel features this host may lack print `SKIP <test>: <reason>` and return;
# run them once with their output shown so every skip is visible here.
echo "-- tests that depend on optional kernel features (SKIP lines below, if any)"
cargo nextest run --workspace --success-output immediate --failure-output immediate \
  --status-level fail --final-status-level none \
  -E 'binary(net_bond_vlan) | binary(storage_backends) | binary(linux) | binary(vm_linux) | binary(store_etcd) | binary(store_tls) | binary(store_cluster)' 2>&1 \
  | grep -E "SKIP|FAIL|panicked" || true
cargo nextest run --workspace --no-fail-fast --failure-output final --success-output never --status-level fail --final-status-level skip "$@"

echo "== benchmark suite smoke (one pair of each figure, debug build; no timing is asserted)"
scripts/bench.sh --smoke

echo "== leak check"
scripts/leak-check.sh
