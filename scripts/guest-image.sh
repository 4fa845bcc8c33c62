#!/usr/bin/env bash
# Builds a small Debian guest disk image for stead's QEMU engine tests and benchmarks,
# once, and caches it outside the clone.
#
#   scripts/guest-image.sh               build if needed; print the qcow2 path on stdout
#   scripts/guest-image.sh --print-path  print where the image is (or would be); build nothing
#
# The cache lives under ${STEAD_ASSETS:-/var/cache/stead/assets}/guest-<key>/, where <key>
# hashes this script and its inputs (suite, packages, sizes), so a changed recipe gets a
# new directory and an unchanged one returns at once. The build happens in a temp dir and
# is renamed into place, so an interrupted build never leaves a half image in the cache.
#
# The disk (2 GiB virtual, GPT) boots under SeaBIOS and OVMF alike:
#   p1  BIOS boot partition: grub i386-pc core.img (the MBR holds grub's boot.img)
#   p2  EFI system partition: EFI/BOOT/BOOTX64.EFI is Debian's signed shim, beside its
#       signed grub (so secure boot works too), with EFI/debian/grub.cfg
#   p3  ext4 root, label "steadroot" (root=LABEL=..., so vda and sda both work)
# Both grubs run a small config that finds the root fs by label and loads its
# /boot/grub/grub.cfg (no menu, no timeout, console=ttyS0).
# The guest has cloud-init (NoCloud only, networking rendered for systemd-networkd) and
# qemu-guest-agent (started by udev when the org.qemu.guest_agent.0 port appears).
#
# Needs (Debian): mmdebstrap, e2fsprogs, dosfstools, mtools, fdisk, grub-common,
# grub-pc-bin, qemu-utils, and deb.debian.org at build time only.
set -euo pipefail

suite="${STEAD_GUEST_SUITE:-bookworm}"
mirror="${STEAD_GUEST_MIRROR:-http://deb.debian.org/debian}"
disk_mib="${STEAD_GUEST_DISK_MIB:-2048}"
packages=(
    linux-image-cloud-amd64 systemd-sysv udev dbus cloud-init qemu-guest-agent
    iputils-ping iproute2 e2fsprogs ca-certificates cloud-guest-utils zstd
)
extra="${STEAD_GUEST_EXTRA_PACKAGES:-}"
# shellcheck disable=SC2206
[ -n "$extra" ] && packages+=($extra)

# Layout in 512-byte sectors.
bios_start=2048
bios_sectors=2048 # 1 MiB
esp_start=4096
esp_sectors=65536 # 32 MiB
root_start=$((esp_start + esp_sectors))
disk_sectors=$((disk_mib * 2048))
root_sectors=$((disk_sectors - root_start - 2048)) # leave room for the backup GPT
root_label=steadroot

self="$(readlink -f "${BASH_SOURCE[0]}")"
log() { echo "guest-image: $*" >&2; }

# The guest's own configuration, applied inside the rootfs by mmdebstrap's customize hook
# (the script runs itself as `guest-image.sh --customize ROOTDIR`, with the chroot's /proc
# and /dev mounted).
customize() {
    local root="$1"
    if [ -z "$root" ] || [ "$root" = / ] || [ ! -d "$root/etc/apt" ]; then
        log "--customize: '$root' is not a fresh rootfs"
        exit 1
    fi
    cat >"$root/etc/fstab" <<EOF
LABEL=$root_label / ext4 defaults,errors=remount-ro 0 1
EOF
    echo debian >"$root/etc/hostname"
    # Empty machine-id: each VM gets its own on first boot.
    : >"$root/etc/machine-id"
    rm -f "$root/var/lib/dbus/machine-id"
    customize_cloud_init "$root"
    customize_units "$root"
    customize_boot "$root"
    rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin "$root/var/cache/apt/archives/"*.deb
    rm -rf "$root/var/log/"*.log "$root/var/log/apt/"*
}

# NoCloud only, networking rendered for systemd-networkd, and only the modules that make
# sense offline (each one costs seconds under TCG).
customize_cloud_init() {
    local root="$1"
    mkdir -p "$root/etc/cloud/cloud.cfg.d"
    cat >"$root/etc/cloud/cloud.cfg.d/90-stead.cfg" <<'EOF'
# stead guest image: seeds come from a NoCloud "cidata" disk only.
datasource_list: [ NoCloud, None ]
system_info:
  network:
    renderers: [ networkd ]
locale: false
ssh_genkeytypes: []
cloud_init_modules:
  - migrator
  - seed_random
  - bootcmd
  - write-files
  - growpart
  - resizefs
  - disk_setup
  - mounts
  - set_hostname
  - update_hostname
  - update_etc_hosts
  - ca-certs
  - users-groups
  - ssh
cloud_config_modules:
  - set-passwords
  - timezone
  - runcmd
cloud_final_modules:
  - package-update-upgrade-install
  - write-files-deferred
  - scripts-vendor
  - scripts-per-once
  - scripts-per-boot
  - scripts-per-instance
  - scripts-user
  - ssh-authkey-fingerprints
  - phone-home
  - final-message
  - power-state-change
EOF
}

customize_units() {
    local root="$1"
    # A VM without network config (or without DHCP) must not wait two minutes for it.
    mkdir -p "$root/etc/systemd/system/systemd-networkd-wait-online.service.d"
    cat >"$root/etc/systemd/system/systemd-networkd-wait-online.service.d/stead.conf" <<'EOF'
[Unit]
ConditionPathExistsGlob=/etc/systemd/network/*.network
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=5
EOF
    chroot "$root" systemctl enable systemd-networkd.service >&2
    # Ext4 scrubbing needs LVM snapshots; its boot-time reaper only costs time here.
    chroot "$root" systemctl mask e2scrub_reap.service e2scrub_all.timer >&2
}

customize_boot() {
    local root="$1"
    # A small initramfs: the root disk is virtio-blk or virtio-scsi, ext4 is built in.
    echo MODULES=list >"$root/etc/initramfs-tools/conf.d/stead"
    printf '%s\n' virtio_pci virtio_blk virtio_scsi sd_mod >>"$root/etc/initramfs-tools/modules"
    chroot "$root" update-initramfs -u -k all >&2
    fetch_signed_efi "$root"
    rm -f "$root/vmlinuz.old" "$root/initrd.img.old"
    mkdir -p "$root/boot/grub"
    cat >"$root/boot/grub/grub.cfg" <<EOF
set timeout=0
set default=0
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
menuentry 'Debian' {
    search --no-floppy --label --set=root $root_label
    linux /vmlinuz root=LABEL=$root_label ro console=tty0 console=ttyS0,115200n8 quiet
    initrd /initrd.img
}
EOF
}

# Debian's signed shim and grub for the ESP (so the disk also boots with secure boot on),
# fetched by the chroot's apt from the same suite and unpacked into $STEAD_GUEST_SIGNED_OUT.
fetch_signed_efi() {
    local root="$1" out="${STEAD_GUEST_SIGNED_OUT:-}" deb
    [ -n "$out" ] || return 0
    mkdir -p "$root/tmp/signed"
    chroot "$root" sh -c 'cd /tmp/signed && apt-get download -q shim-signed grub-efi-amd64-signed' >&2
    for deb in "$root"/tmp/signed/*.deb; do
        dpkg-deb -x "$deb" "$out"
    done
    rm -rf "$root/tmp/signed"
}

if [ "${1:-}" = "--customize" ]; then
    customize "${2:-}"
    exit 0
fi

cache_key() {
    {
        sha256sum <"$self"
        printf '%s\n' "$suite" "$mirror" "$disk_mib" "${packages[@]}"
    } | sha256sum | cut -c1-16
}

assets="${STEAD_ASSETS:-/var/cache/stead/assets}"
dir="$assets/guest-$(cache_key)"
image="$dir/guest.qcow2"

if [ "${1:-}" = "--print-path" ]; then
    echo "$image"
    exit 0
fi
if [ -f "$image" ]; then
    echo "$image"
    exit 0
fi

for tool in mmdebstrap mkfs.ext4 mkfs.vfat mcopy mmd sfdisk grub-mkimage qemu-img; do
    command -v "$tool" >/dev/null || {
        log "missing $tool (apt-get install mmdebstrap e2fsprogs dosfstools mtools fdisk grub-common grub-pc-bin qemu-utils)"
        exit 1
    }
done
[ -d /usr/lib/grub/i386-pc ] || {
    log "missing grub's i386-pc modules (apt-get install grub-pc-bin)"
    exit 1
}

mkdir -p "$assets"
work="$(mktemp -d "$assets/.guest-build.XXXXXX")"
# An interrupted mmdebstrap may leave the chroot's proc, sys and dev mounted: unmount what
# is below the work dir, and never let rm cross into another file system.
cleanup() {
    local m
    set +e
    findmnt -rn -o TARGET | grep -F "$work/" | sort -r | while read -r m; do
        umount -l "$m" || true
    done
    rm -rf --one-file-system "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
started=$SECONDS

build_rootfs() {
    local root="$1"
    log "mmdebstrap $suite (${packages[*]})"
    mmdebstrap --variant=apt --components=main \
        --include="$(
            IFS=,
            echo "${packages[*]}"
        )" \
        --dpkgopt='path-exclude=/usr/share/man/*' \
        --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' \
        --dpkgopt='path-exclude=/usr/share/locale/*' \
        --dpkgopt='path-include=/usr/share/locale/locale.alias' \
        --dpkgopt='path-exclude=/usr/share/info/*' \
        --aptopt='APT::Install-Recommends "false"' \
        --customize-hook="\"$self\" --customize \"\$1\"" \
        "$suite" "$root" "$mirror" >&2
}

# Embedded grub config: find the root fs by label and load its grub.cfg.
write_embedded_cfg() {
    cat >"$1" <<EOF
search --no-floppy --label --set=root $root_label
set prefix=(\$root)/boot/grub
configfile (\$root)/boot/grub/grub.cfg
EOF
}

grub_modules_common=(part_gpt ext2 search search_label configfile normal linux echo test serial terminal)

build_bios_core() {
    local out="$1" cfg="$2"
    grub-mkimage -O i386-pc -o "$out" -c "$cfg" -p /boot/grub \
        "${grub_modules_common[@]}" biosdisk
}


# Writes a little-endian integer of $3 bytes at byte offset $2 of file $1.
put_le() {
    local file="$1" offset="$2" size="$3" value="$4" hex="" i
    for ((i = 0; i < size; i++)); do
        hex+=$(printf '\\x%02x' $(((value >> (8 * i)) & 0xff)))
    done
    printf "$hex" | dd of="$file" bs=1 seek="$offset" conv=notrunc status=none
}

# Installs grub's boot.img in the protective MBR and core.img in the BIOS boot partition,
# as grub-bios-setup would, without needing a block device.
install_bios_boot() {
    local disk="$1" core="$2" core_sectors
    core_sectors=$((($(stat -c %s "$core") + 511) / 512))
    if [ "$core_sectors" -gt "$bios_sectors" ]; then
        log "core.img ($core_sectors sectors) does not fit the BIOS boot partition"
        exit 1
    fi
    # boot.img's code, up to the disk signature; the partition table stays.
    dd if=/usr/lib/grub/i386-pc/boot.img of="$disk" bs=440 count=1 conv=notrunc status=none
    # boot.img loads core.img's first sector (diskboot) from this LBA (kernel_sector, 0x5c).
    put_le "$disk" $((0x5c)) 8 "$bios_start"
    # 0x64: boot drive 0xff = use the drive the BIOS booted from.
    dd if="$core" of="$disk" bs=512 seek="$bios_start" conv=notrunc status=none
    # diskboot's first blocklist (the last 12 bytes of its sector): start LBA (8), count (2),
    # segment (2). grub-mkimage filled the count; the rest follows diskboot directly.
    put_le "$disk" $((bios_start * 512 + 512 - 12)) 8 $((bios_start + 1))
}

# The ESP: the removable-media path EFI/BOOT/BOOTX64.EFI is Debian's signed shim, which
# loads the signed grub beside it (no fbx64.efi: no boot entries are made); that grub reads
# EFI/debian/grub.cfg (its built-in prefix), the same small config as the BIOS core's.
build_esp() {
    local esp="$1" signed="$2" cfg="$3" shim grub
    shim="$signed/usr/lib/shim/shimx64.efi.signed"
    grub="$signed/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed"
    for f in "$shim" "$grub"; do
        [ -f "$f" ] || { log "no $f in shim-signed / grub-efi-amd64-signed"; exit 1; }
    done
    truncate -s $((esp_sectors * 512)) "$esp"
    mkfs.vfat -F 16 -n ESP "$esp" >/dev/null
    mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/EFI/debian
    mcopy -i "$esp" "$shim" ::/EFI/BOOT/BOOTX64.EFI
    mcopy -i "$esp" "$grub" ::/EFI/BOOT/grubx64.efi
    mcopy -i "$esp" "$cfg" ::/EFI/debian/grub.cfg
}

build_root_fs() {
    local fs="$1" root="$2"
    truncate -s $((root_sectors * 512)) "$fs"
    mkfs.ext4 -q -L "$root_label" -d "$root" "$fs"
}

partition() {
    local disk="$1"
    truncate -s "${disk_mib}M" "$disk"
    sfdisk --quiet --label gpt "$disk" >/dev/null <<EOF
start=$bios_start, size=$bios_sectors, type=21686148-6449-6E6F-744E-656564454649, name=bios
start=$esp_start, size=$esp_sectors, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp
start=$root_start, size=$root_sectors, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root
EOF
}

place() {
    local disk="$1" part="$2" start="$3"
    dd if="$part" of="$disk" bs=1M seek=$((start * 512)) oflag=seek_bytes conv=notrunc,sparse status=none
}

root="$work/rootfs"
mkdir -p "$root" "$work/signed"
export STEAD_GUEST_SIGNED_OUT="$work/signed"
build_rootfs "$root"
log "rootfs: $(du -sh "$root" | cut -f1)"

write_embedded_cfg "$work/embedded.cfg"
build_bios_core "$work/core.img" "$work/embedded.cfg"
build_esp "$work/esp.img" "$work/signed" "$work/embedded.cfg"
build_root_fs "$work/root.img" "$root"
rm -rf "$root"

disk="$work/guest.raw"
partition "$disk"
install_bios_boot "$disk" "$work/core.img"
place "$disk" "$work/esp.img" "$esp_start"
place "$disk" "$work/root.img" "$root_start"
rm -f "$work/esp.img" "$work/root.img"

out="$work/out"
mkdir -p "$out"
qemu-img convert -O qcow2 "$disk" "$out/guest.qcow2"
rm -f "$disk"
cat >"$out/INFO" <<EOF
suite=$suite
packages=${packages[*]}
disk_mib=$disk_mib
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
build_seconds=$((SECONDS - started))
EOF
mv -T "$out" "$dir" 2>/dev/null || [ -f "$image" ] # a concurrent build may have won
log "built in $((SECONDS - started)) s: $image ($(du -h "$image" | cut -f1))"
echo "$image"
