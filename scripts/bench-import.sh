#!/bin/sh
# Times `stead import proxmox` on a generated Proxmox tree of N guests (default 500:
# 80 % VMs, 20 % containers, two or three disks each, cloud-init on every fourth VM,
# linked clones of a template, a storage.cfg, bridges, a bond and backup jobs), with
# hyperfine. Everything lives in a temp dir, removed at the end.
#
#   scripts/bench-import.sh [N]
#   scripts/bench-import.sh --generate DIR [N]   only write the tree under DIR (the
#                                                 benchmark suite's `import` row uses it)
#
# The binary is $STEAD_BIN or target/debug/stead (say which profile you measured:
# `cargo build --bin stead` or `cargo build --release --bin stead`). When the release
# example `import_tree` of the import crate is built, it is timed too.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)

# Writes the Proxmox tree of $n guests under $root.
generate() {
mkdir -p "$root/etc/pve/nodes/pve1/qemu-server" "$root/etc/pve/nodes/pve1/lxc" "$root/etc/network"

cat > "$root/etc/pve/storage.cfg" <<'CFG'
dir: local
	path /var/lib/vz
	content iso,vztmpl,backup

lvmthin: local-lvm
	thinpool data
	vgname pve
	content rootdir,images

dir: vmstore
	path /srv/vmstore
	content images,rootdir

nfs: nas
	server 192.168.1.50
	export /export/pve
	path /mnt/pve/nas
	content backup

rbd: ceph
	pool rbd
	content images
CFG

cat > "$root/etc/network/interfaces" <<'CFG'
auto lo
iface lo inet loopback

iface eno1 inet manual
iface eno2 inet manual
iface eno3 inet manual

auto bond0
iface bond0 inet manual
	bond-slaves eno2 eno3
	bond-mode 802.3ad
	bond-miimon 100

auto vmbr0
iface vmbr0 inet static
	address 192.168.1.10/24
	gateway 192.168.1.1
	bridge-ports eno1
	bridge-stp off
	bridge-fd 0

auto vmbr1
iface vmbr1 inet manual
	bridge-ports bond0
	bridge-vlan-aware yes
CFG

cat > "$root/etc/pve/jobs.cfg" <<'CFG'
vzdump: backup-all
	schedule sat 02:00
	all 1
	storage nas
	prune-backups keep-last=3,keep-weekly=4

vzdump: backup-some
	schedule mon..fri 21:30
	vmid 1000,1001,1002
	storage nas
CFG

python3 - "$root" "$n" <<'PY'
import sys
root, n = sys.argv[1], int(sys.argv[2])
vms = n * 4 // 5
node = f"{root}/etc/pve/nodes/pve1"
def mac(i, k):
    return f"BC:24:11:{(i >> 8) & 0xff:02X}:{i & 0xff:02X}:{k:02X}"
with open(f"{node}/qemu-server/900.conf", "w") as f:
    f.write("name: tpl\nmemory: 1024\ntemplate: 1\nscsi0: vmstore:900/base-900-disk-0.qcow2,size=8G\n")
for i in range(vms):
    vmid = 1000 + i
    lines = [f"name: VM-{i}.corp.example", f"memory: {1024 * (1 + i % 4)}", f"cores: {1 + i % 4}",
             "sockets: 1", "onboot: 1", "agent: 1", "ostype: l26", "scsihw: virtio-scsi-single",
             f"net0: virtio={mac(i, 0)},bridge=vmbr0,firewall=1",
             f"net1: virtio={mac(i, 1)},bridge=vmbr1,tag={10 + i % 50}",
             "boot: order=scsi0;ide2;net0"]
    if i % 10 == 0:
        lines.append(f"scsi0: vmstore:900/base-900-disk-0.qcow2/{vmid}/vm-{vmid}-disk-0.qcow2,size=8G")
    else:
        lines.append(f"scsi0: local-lvm:vm-{vmid}-disk-0,size=32G,discard=on,ssd=1")
    lines.append(f"virtio1: local-lvm:vm-{vmid}-disk-1,size=100G")
    lines.append("ide2: local:iso/debian-12.iso,media=cdrom,size=628M")
    if i % 4 == 0:
        lines += ["ciuser: debian", "ipconfig0: ip=dhcp", f"ide3: local-lvm:vm-{vmid}-cloudinit,media=cdrom",
                  "nameserver: 192.168.1.53", "searchdomain: corp.example"]
    if i % 7 == 0:
        lines += ["hostpci0: 0000:01:00.0", "args: -cpu host"]
    if i % 5 == 0:
        lines += ["", "[snap1]", "memory: 512", f"scsi0: local-lvm:vm-{vmid}-disk-0,size=32G"]
    open(f"{node}/qemu-server/{vmid}.conf", "w").write("\n".join(lines) + "\n")
for j in range(n - vms):
    vmid = 5000 + j
    lines = [f"hostname: ct-{j}", "memory: 512", "cores: 1", "unprivileged: 1", "onboot: 1",
             f"rootfs: local-lvm:vm-{vmid}-disk-0,size=8G",
             f"mp0: local-lvm:vm-{vmid}-disk-1,mp=/srv/data,size=16G",
             f"net0: name=eth0,bridge=vmbr0,hwaddr={mac(60000 + j, 2)},ip=10.{j // 250}.{j % 250}.2/8,type=veth",
             "features: nesting=1"]
    open(f"{node}/lxc/{vmid}.conf", "w").write("\n".join(lines) + "\n")
PY

}

if [ "${1:-}" = "--generate" ]; then
    [ $# -ge 2 ] || { echo "usage: $0 --generate DIR [N]" >&2; exit 2; }
    root=$2
    n=${3:-500}
    generate
    exit 0
fi
n=${1:-500}
target=$(cd "$here" && cargo metadata --format-version 1 --no-deps 2>/dev/null |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin=${STEAD_BIN:-${target:-$here/target}/debug/stead}
[ -x "$bin" ] || { echo "no stead binary at $bin: build it first" >&2; exit 1; }
command -v hyperfine >/dev/null || { echo "hyperfine is needed (apt install hyperfine)" >&2; exit 1; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root=$tmp/root
generate

echo "tree: $(find "$root/etc/pve/nodes" -name '*.conf' | wc -l) guest configs; binary: $bin"
"$bin" import proxmox --root "$root" --out "$tmp/out" 2>/dev/null
"$bin" validate "$tmp/out"
hyperfine --warmup 2 --runs 10 \
    "$bin import proxmox --root $root --out $tmp/out 2>/dev/null"
# The same import and writes without the CLI around them, from a release build of the
# import crate alone (`cargo build --release -p stead-import --example import_tree`).
lib=${target:-$here/target}/release/examples/import_tree
if [ -x "$lib" ]; then
    hyperfine --warmup 2 --runs 10 "$lib $root $tmp/out-lib"
fi
