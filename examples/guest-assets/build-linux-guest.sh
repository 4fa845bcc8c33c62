#!/bin/sh
# Builds a small Linux guest for stead VirtualMachines from Debian packages:
#   OUT/vmlinuz      Debian's cloud kernel (linux-image-cloud-amd64, a bzImage)
#   OUT/initrd.img   busybox (busybox-static) initramfs with the virtio modules
#
# Usage: build-linux-guest.sh [OUT_DIR]        (default ./guest; needs root only for apt)
#
# The packages are downloaded with `apt-get download` and unpacked into a scratch dir
# (nothing is installed on the host). Needs: apt-get, dpkg-deb, gzip, xz or zstd (for
# compressed modules); cpio, else busybox's.
#
# Booting a Linux guest needs hardware virtualization (vmx/svm in /proc/cpuinfo). On hosts
# without it (e.g. PVM-based nested KVM), use stead's tiny demo guest instead:
#   stead vmm --write-demo-guest /var/lib/stead/images/tiny-guest.bin   (cmdline "mode=idle")
#
# Guest init (OUT/initrd.img): mounts /proc /sys /dev, loads virtio_mmio, virtio_blk,
# virtio_net (and ext4), then reads these kernel command-line options:
#   stead.ip=ADDR/PREFIX   address for eth0 (brought up with `ip`)
#   stead.gw=ADDR          default gateway
#   stead.ping=ADDR        ping ADDR 3 times and print "stead: ping ADDR ok|failed"
#   stead.test=1           self-test: prints "stead: vda marker ..." (mounts an ext4
#                          /dev/vda, reads /stead-marker, writes /stead-written), then
#                          "stead: test done" and idles (a guest reset would boot again,
#                          and without ACPI a poweroff only halts the vCPUs)
#   root=/dev/vda          mount /dev/vda and switch_root into it (its /sbin/init)
# Otherwise it starts a shell on the serial console (ttyS0).
#
# Example VirtualMachine:
#   boot: {kernel: /var/lib/stead/images/vmlinuz, initrd: /var/lib/stead/images/initrd.img,
#          cmdline: "console=ttyS0 reboot=k panic=-1 stead.ip=10.0.0.10/24"}
set -eu

OUT=${1:-./guest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

need() { command -v "$1" >/dev/null 2>&1 || { echo "missing tool: $1" >&2; exit 1; }; }
need apt-get
need dpkg-deb
need gzip

# The metapackage depends on the versioned image package; resolve and fetch it.
KPKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null \
    | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-cloud-amd64\)$/\1/p' | grep -v unsigned | head -n1)
if [ -z "$KPKG" ]; then
    echo "cannot resolve linux-image-cloud-amd64 (run apt-get update?)" >&2
    exit 1
fi
echo "kernel package: $KPKG"
cd "$WORK"
apt-get download "$KPKG" busybox-static >/dev/null
mkdir -p kpkg bbpkg
dpkg-deb -x "$(ls ./linux-image-*.deb | head -n1)" kpkg
dpkg-deb -x "$(ls ./busybox-static_*.deb | head -n1)" bbpkg

VMLINUZ=$(ls kpkg/boot/vmlinuz-* | head -n1)
KVER=${VMLINUZ##*/vmlinuz-}
cp "$VMLINUZ" "$OUT/vmlinuz"
echo "kernel $KVER -> $OUT/vmlinuz"

# Initramfs tree.
R=$WORK/root
mkdir -p "$R/bin" "$R/sbin" "$R/proc" "$R/sys" "$R/dev" "$R/newroot" "$R/lib/modules" "$R/etc" "$R/tmp"
cp bbpkg/bin/busybox "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do
    [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"
done

# Modules (with their dependencies, in load order), decompressed for busybox insmod.
MODDIR=kpkg/lib/modules/$KVER
[ -d "$MODDIR" ] || MODDIR=kpkg/usr/lib/modules/$KVER
order=""
modfile() { # module name -> path of its .ko[.xz|.zst] (names may use - or _)
    alt=$(echo "$1" | tr _ -)
    find "$MODDIR" \( -name "$1.ko*" -o -name "$alt.ko*" \) | head -n1
}
modcat() {
    case "$1" in
        *.ko.xz) need xz; xz -dc "$1" ;;
        *.ko.zst) need zstd; zstd -qdc "$1" ;;
        *) cat "$1" ;;
    esac
}
add_mod() { # $1 = module name; appends its dependencies (from .modinfo "depends=") first
    f=$(modfile "$1")
    [ -n "$f" ] || return 0      # built in
    case " $order " in *" $f "*) return 0 ;; esac
    deps=$(modcat "$f" | tr '\0' '\n' | sed -n 's/^depends=//p' | head -n1 | tr , ' ')
    for d in $deps; do add_mod "$d"; done
    f=$(modfile "$1")    # POSIX sh has no locals: the recursion clobbered $f
    case " $order " in *" $f "*) return 0 ;; esac
    order="$order $f"
}
for m in virtio_mmio virtio_blk virtio_net ext4 af_packet; do add_mod "$m"; done
: > "$R/lib/modules/load-order"
for f in $order; do
    base=${f##*/}; base=${base%.xz}; base=${base%.zst}
    modcat "$f" > "$R/lib/modules/$base"
    echo "$base" >> "$R/lib/modules/load-order"
done
echo "modules:$(tr '\n' ' ' < "$R/lib/modules/load-order")"

cat > "$R/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
for m in $(cat /lib/modules/load-order); do insmod /lib/modules/$m 2>/dev/null; done
[ -e /dev/vda ] || mdev -s
echo "stead: guest up ($(uname -r)), $(grep -c ^processor /proc/cpuinfo) cpu(s)"
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}";; esac; done; }
ip link set lo up
if [ -n "$(arg stead.ip)" ]; then
    ip link set eth0 up
    ip addr add "$(arg stead.ip)" dev eth0
    [ -n "$(arg stead.gw)" ] && ip route add default via "$(arg stead.gw)"
    echo "stead: eth0 $(arg stead.ip) mac $(cat /sys/class/net/eth0/address)"
fi
if [ -n "$(arg stead.ping)" ]; then
    if ping -c 3 -W 2 "$(arg stead.ping)" >/dev/null 2>&1; then
        echo "stead: ping $(arg stead.ping) ok"
    else
        echo "stead: ping $(arg stead.ping) failed"
    fi
fi
if [ "$(arg stead.test)" = 1 ]; then
    if [ -b /dev/vda ] && mount -t ext4 /dev/vda /newroot 2>/dev/null; then
        echo "stead: vda marker $(cat /newroot/stead-marker 2>/dev/null)"
        date > /newroot/stead-written && sync
        umount /newroot
    else
        echo "stead: vda missing or not ext4"
    fi
    echo "stead: test done"
    sync
    exec sleep 2147483647
fi
if [ "$(arg root)" = /dev/vda ] && mount /dev/vda /newroot; then
    mount --move /dev /newroot/dev 2>/dev/null
    exec switch_root /newroot /sbin/init
fi
echo "stead: no root=/dev/vda; shell on the console"
exec setsid cttyhack sh
INIT
chmod +x "$R/init"

if command -v cpio >/dev/null 2>&1; then CPIO="cpio --quiet"; else CPIO="$WORK/bbpkg/bin/busybox cpio"; fi
(cd "$R" && find . | $CPIO -o -H newc | gzip -9) > "$OUT/initrd.img"
echo "initramfs -> $OUT/initrd.img ($(wc -c < "$OUT/initrd.img") bytes)"
