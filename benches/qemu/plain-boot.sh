#!/usr/bin/env bash
# Baseline for the QEMU engine's boot benchmark: wall time from launching plain
# qemu-system-x86_64 (TCG, the guest image's overlay, a NoCloud seed ISO, the guest agent
# on virtio-serial) until the guest agent answers guest-ping, N runs, min/median/max.
# The same measure for `stead apply` is the stead side of the pair (see measure_stead).
#
#   benches/qemu/plain-boot.sh [-n RUNS] [-f bios|uefi] [-i IMAGE] [-m MEM_MIB]
#                              [--stead 'CMD' --stead-qga SOCKET [--stead-down 'CMD']]
#
# IMAGE defaults to the cached image of scripts/guest-image.sh (built on first use).
# Every run boots a fresh qcow2 overlay (first boot: cloud-init runs in full) and is
# killed once the agent answered; nothing is left behind. Results go to stdout as
#   plain-bios runs=5 min=31.2 median=33.0 max=35.9 (s)
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
runs=5
firmware=bios
image=""
mem=1024
stead_cmd=""
stead_qga=""
stead_down=""
timeout_s="${BOOT_TIMEOUT:-600}"

while [ $# -gt 0 ]; do
    case "$1" in
    -n) runs="$2"; shift 2 ;;
    -f) firmware="$2"; shift 2 ;;
    -i) image="$2"; shift 2 ;;
    -m) mem="$2"; shift 2 ;;
    --stead) stead_cmd="$2"; shift 2 ;;
    --stead-qga) stead_qga="$2"; shift 2 ;;
    --stead-down) stead_down="$2"; shift 2 ;;
    -h | --help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

case "$firmware" in bios | uefi) ;; *) echo "-f takes bios or uefi" >&2; exit 2 ;; esac
[ -n "$image" ] || image="$("$repo/scripts/guest-image.sh")"
[ -f "$image" ] || { echo "no image $image" >&2; exit 1; }
ovmf_code=/usr/share/OVMF/OVMF_CODE_4M.fd
ovmf_vars=/usr/share/OVMF/OVMF_VARS_4M.fd
seabios=/usr/share/seabios/bios-256k.bin

work="$(mktemp -d /tmp/stead-plain-boot.XXXXXX)"
qemu_pid=""
cleanup() {
    if [ -n "$qemu_pid" ]; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

now() { date +%s.%N; }
# Sets $result to the seconds from $1 to $2. (No command substitution for the measures:
# a subshell would not run the cleanup trap that kills QEMU.)
result=""
elapsed() { result=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$2"); }

# A NoCloud seed like the one stead generates from spec.cloudInit.
make_seed() {
    local dir="$1" n="$2"
    mkdir -p "$dir/seed"
    printf 'instance-id: bench-%s\nlocal-hostname: bench-%s\n' "$n" "$n" >"$dir/seed/meta-data"
    printf '#cloud-config\nwrite_files:\n  - path: /root/bench.txt\n    content: "run %s\\n"\n' "$n" \
        >"$dir/seed/user-data"
    genisoimage -quiet -V cidata -J -r -o "$dir/seed.iso" "$dir/seed/meta-data" "$dir/seed/user-data"
}

# The QEMU command line stead's engine uses for a VM with this image (keep the two in step).
# The seed is a read-only virtio-blk disk: Debian's cloud kernel has no AHCI driver, so
# an ide-cd on q35 would be invisible to the guest.
qemu_args() {
    local dir="$1"
    # The options stead's engine gives the same VM (drivers/src/vm/qemu/argv.rs): TCG with
    # its translation cache size, -cpu max, the seccomp sandbox, cache=none disks, an RNG.
    local -a a=(-name bench,debug-threads=on -nodefaults -no-user-config -display none
        -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny
        -accel tcg,tb-size=256 -cpu max -m "$mem" -smp 1
        -serial "file:$dir/serial.log"
        -qmp "unix:$dir/qmp.sock,server=on,wait=off"
        -drive "file=$dir/disk.qcow2,format=qcow2,if=none,id=disk0,cache=none"
        -device virtio-blk-pci,drive=disk0,bootindex=1
        -drive "file=$dir/seed.iso,format=raw,if=none,id=seed,readonly=on"
        -device virtio-blk-pci,drive=seed
        -device virtio-rng-pci
        -chardev "socket,path=$dir/qga.sock,server=on,wait=off,id=qga0"
        -device virtio-serial-pci
        -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0)
    case "$firmware" in
    bios) a+=(-machine pc -bios "$seabios") ;;
    uefi)
        cp "$ovmf_vars" "$dir/OVMF_VARS.fd"
        a+=(-machine q35
            -drive "if=pflash,format=raw,readonly=on,file=$ovmf_code"
            -drive "if=pflash,format=raw,file=$dir/OVMF_VARS.fd")
        ;;
    esac
    printf '%s\n' "${a[@]}"
}

# One plain boot: sets $result to the seconds from launch to the agent's answer.
measure_plain() {
    local n="$1" dir="$work/run-$1" t0 t1
    mkdir -p "$dir"
    qemu-img create -q -f qcow2 -F qcow2 -b "$image" "$dir/disk.qcow2"
    make_seed "$dir" "$n"
    local -a args
    mapfile -t args < <(qemu_args "$dir")
    t0=$(now)
    qemu-system-x86_64 "${args[@]}" </dev/null >"$dir/qemu.out" 2>&1 &
    qemu_pid=$!
    if ! "$here/qga.py" "$dir/qga.sock" --wait "$timeout_s" >/dev/null; then
        echo "run $n: no guest agent after ${timeout_s}s; serial log tail:" >&2
        tail -20 "$dir/serial.log" >&2 || true
        exit 1
    fi
    t1=$(now)
    # Not timed: the seed was applied (a guest that missed it boots as fast, without it).
    if ! "$here/qga.py" "$dir/qga.sock" --wait 30 '{"execute":"guest-get-host-name"}' |
        grep -q "\"bench-$n\""; then
        echo "run $n: the guest did not take the seed's hostname bench-$n" >&2
        exit 1
    fi
    kill "$qemu_pid"
    wait "$qemu_pid" 2>/dev/null || true
    qemu_pid=""
    rm -rf "$dir"
    elapsed "$t0" "$t1"
}

# The stead side of the pair. CMD (e.g. `stead apply -f vm.yaml` for a VM using the same
# image, firmware and seed) runs from t0; the time ends when the agent answers on SOCKET
# (the VM's qga socket in stead's run dir); DOWN (e.g. `stead delete ...`) then removes
# the VM. Each run must start from a fresh disk, as the plain runs do.
measure_stead() {
    local n="$1" t0 t1
    t0=$(now)
    bash -c "$stead_cmd" >"$work/stead-$n.out" 2>&1 || {
        echo "run $n: stead command failed:" >&2
        cat "$work/stead-$n.out" >&2
        exit 1
    }
    "$here/qga.py" "$stead_qga" --wait "$timeout_s" >/dev/null || {
        echo "run $n: no guest agent on $stead_qga" >&2
        exit 1
    }
    t1=$(now)
    [ -z "$stead_down" ] || bash -c "$stead_down" >/dev/null 2>&1 || true
    elapsed "$t0" "$t1"
}

summary() {
    python3 -c '
import statistics, sys
name, xs = sys.argv[1], sorted(float(x) for x in sys.argv[2:])
print(f"{name} runs={len(xs)} min={xs[0]:.2f} median={statistics.median(xs):.2f} max={xs[-1]:.2f} (s)")
' "$@"
}

# Plain and stead runs alternate, so that a change in the machine's load hits both sides.
if [ -n "$stead_cmd" ] && [ -z "$stead_qga" ]; then
    echo "--stead needs --stead-qga SOCKET" >&2
    exit 2
fi
plain=()
stead=()
for ((i = 1; i <= runs; i++)); do
    measure_plain "$i"
    echo "plain-$firmware run $i: $result s" >&2
    plain+=("$result")
    if [ -n "$stead_cmd" ]; then
        measure_stead "$i"
        echo "stead-$firmware run $i: $result s" >&2
        stead+=("$result")
    fi
done
summary "plain-$firmware" "${plain[@]}"
[ -z "$stead_cmd" ] || summary "stead-$firmware" "${stead[@]}"
