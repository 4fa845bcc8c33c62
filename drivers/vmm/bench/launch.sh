#!/usr/bin/env bash
# Launch benchmark for stead-vmm (not a test).
#
# Measures, for the tiny guest in "hello" mode (prints one line, powers off):
#   - in-process: Vm::new -> first serial byte -> VM exit (examples/launch.rs);
#   - per process: exec -> marker line on stdout -> process exit, and peak RSS
#     (getrusage of the child via os.wait4; /usr/bin/time -v cross-check when present);
#   - the same for qemu-system-x86_64 -M microvm -enable-kvm on the same guest (the
#     PVH ELF build) when QEMU is installed.
# Usage: drivers/vmm/bench/launch.sh [RUNS]   (default 20). Builds in release mode.
set -euo pipefail
RUNS=${1:-20}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/stead/target-vmm}
cd "$(dirname "$0")/../../.."
cargo build -q --release -p stead-vmm --example launch
BIN="$CARGO_TARGET_DIR/release/examples/launch"
PVH=$("$BIN" --print-pvh-path)

echo "== in-process (release), $RUNS runs"
"$BIN" --runs "$RUNS" | tail -1
"$BIN" --runs "$RUNS" --pvh | tail -1

# measure NAME MARKER CMD...: median exec->marker, exec->exit, max peak RSS.
measure() {
    python3 - "$RUNS" "$@" <<'PY'
import os, sys, time, subprocess, statistics, tempfile
runs = int(sys.argv[1]); name = sys.argv[2]; marker = sys.argv[3].encode(); cmd = sys.argv[4:]
# ru_maxrss of a child forked from Python includes Python's own pages from before exec,
# so peak RSS comes from /usr/bin/time (a small C program) when it is installed.
use_time = os.access("/usr/bin/time", os.X_OK)
rss_file = tempfile.NamedTemporaryFile(prefix="stead-bench-", delete=False).name
if use_time:
    cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file] + cmd
marks, exits, rss = [], [], []
for _ in range(runs):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    buf, tm = b"", None
    while True:
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
        if tm is None and marker in buf:
            tm = time.perf_counter() - t0
    _, status, ru = os.wait4(p.pid, 0)
    te = time.perf_counter() - t0
    if tm is None:
        sys.exit(f"{name}: marker not seen (status {status}): {buf!r}")
    if use_time:
        with open(rss_file) as f:
            kb = int(f.read().split()[-1])
    else:
        kb = ru.ru_maxrss
    marks.append(tm * 1e3); exits.append(te * 1e3); rss.append(kb)
os.unlink(rss_file)
print(f"{name:<28} marker {statistics.median(marks):7.2f} ms   exit {statistics.median(exits):7.2f} ms"
      f"   peak RSS {max(rss) / 1024:6.1f} MiB (median {statistics.median(rss) / 1024:.1f})")
PY
}

echo "== per process (exec -> marker -> exit), $RUNS runs"
measure "stead-vmm (flat image)" "hello from stead" "$BIN" --echo
measure "stead-vmm (PVH ELF)" "hello from stead" "$BIN" --echo --pvh
QEMU_ARGS=(-M microvm,x-option-roms=off,rtc=off -enable-kvm -cpu host,-arch-capabilities
    -m 32M -smp 1 -nodefaults -no-user-config -display none -serial stdio
    -device isa-debug-exit,iobase=0x600,iosize=1 -kernel "$PVH" -append mode=hello)
if command -v qemu-system-x86_64 >/dev/null; then
    measure "qemu -M microvm (PVH ELF)" "hello from stead" qemu-system-x86_64 "${QEMU_ARGS[@]}"
else
    echo "qemu-system-x86_64 not installed: QEMU comparison skipped"
fi

if [ -x /usr/bin/time ]; then
    echo "== /usr/bin/time -v cross-check (one run each)"
    /usr/bin/time -v "$BIN" --echo 2>&1 >/dev/null | grep -E "Maximum resident|Elapsed" | sed 's/^/stead-vmm: /'
    if command -v qemu-system-x86_64 >/dev/null; then
        /usr/bin/time -v qemu-system-x86_64 "${QEMU_ARGS[@]}" 2>&1 >/dev/null \
            | grep -E "Maximum resident|Elapsed" | sed 's/^/qemu: /' || true
    fi
fi
