# Sourced by stead-boot.sh and clones.sh: the stead binary, the guest image and a sandbox
# for one benchmark run. Sets $stead, $image, $box (temp dir with base/, pool/ and the
# directory named by $1), $ns and $args (stead's sandbox options), writes base/base.yaml
# (a dir pool and a template volume made from the image), and removes it all on exit.
#   bench_sandbox WORKDIR NAME [STEAD_BIN]
bench_sandbox() {
    local work="$1" name="$2"
    stead="${3:-${CARGO_TARGET_DIR:-/var/cache/stead/target}/release/stead}"
    [ -x "$stead" ] || { echo "no stead binary at $stead (cargo build --release --bin stead)" >&2; exit 1; }
    image="$("$repo/scripts/guest-image.sh")"
    box="$(mktemp -d "/tmp/stead-$name-bench.XXXXXX")"
    ns="${STEAD_BENCH_TAG:-stead-bench-$name}-$$"
    args=(--state-dir "$box/state" --run-dir "$box/run" --cgroup-parent "$ns" --netns "$ns")
    bench_work="$work"
    ip netns add "$ns"
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
    mkdir -p "$box/base" "$box/$work" "$box/pool"
    cat >"$box/base/base.yaml" <<YAML
apiVersion: stead.dev/v1alpha1
kind: StoragePool
metadata: {name: bench}
spec: {type: dir, path: $box/pool, content: [images]}
---
apiVersion: stead.dev/v1alpha1
kind: Volume
metadata: {name: tpl}
spec: {pool: bench, size: 2Gi, format: qcow2, template: true, source: {file: $image}}
YAML
}

bench_cleanup() {
    "$stead" "${args[@]}" destroy --yes --allow-data-loss "$box/base" "$box/$bench_work" >/dev/null 2>&1 || true
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$box"
}
