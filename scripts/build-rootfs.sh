#!/bin/sh
# Builds a busybox rootfs directory and a .tar.zst container template from the Debian
# package busybox-static (installed by apt; nothing is downloaded at run time).
#
#   scripts/build-rootfs.sh OUTDIR        -> OUTDIR/busybox-rootfs/ and OUTDIR/busybox.tar.zst
#
# The rootfs has /bin/busybox + applet symlinks, /sbin/init (busybox init), /etc/inittab
# (sysinit prints a banner, a respawned getty-less shell loop keeps init busy; busybox
# init halts on SIGPWR/SIGUSR2, which stead sends on stop), /etc/passwd, /etc/group,
# /etc/hostname and empty mount points.
set -eu

out=${1:?usage: $0 OUTDIR}
busybox=/bin/busybox
if ! [ -x "$busybox" ] || ! "$busybox" --list >/dev/null 2>&1; then
    echo "$0: $busybox missing: apt-get install busybox-static" >&2
    exit 1
fi
if ! file -L "$busybox" 2>/dev/null | grep -q 'statically linked' && command -v ldd >/dev/null \
   && ldd "$busybox" >/dev/null 2>&1; then
    echo "$0: $busybox is dynamically linked: install busybox-static" >&2
    exit 1
fi
command -v zstd >/dev/null || { echo "$0: zstd missing: apt-get install zstd" >&2; exit 1; }

root="$out/busybox-rootfs"
tmp="$out/.busybox-rootfs.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT

for d in bin sbin usr/bin usr/sbin etc root tmp proc sys dev run var/log home; do
    mkdir -p "$tmp/$d"
done
chmod 1777 "$tmp/tmp"
chmod 700 "$tmp/root"
cp "$busybox" "$tmp/bin/busybox"
for applet in $("$busybox" --list-full); do
    case "$applet" in
        bin/busybox) continue ;;
    esac
    dir=$(dirname "$applet")
    mkdir -p "$tmp/$dir"
    # relative link to /bin/busybox
    up=$(echo "$dir" | sed 's|[^/]*|..|g')
    [ -e "$tmp/$applet" ] || ln -s "$up/bin/busybox" "$tmp/$applet"
done
[ -e "$tmp/sbin/init" ] || ln -s ../bin/busybox "$tmp/sbin/init"

cat > "$tmp/etc/inittab" <<'INITTAB'
::sysinit:/bin/hostname -F /etc/hostname
::sysinit:/bin/echo "stead busybox container up"
::respawn:/bin/sh -c 'exec /bin/sleep 2147483647'
::shutdown:/bin/echo "stead busybox container halting"
INITTAB
echo "root:x:0:0:root:/root:/bin/sh" > "$tmp/etc/passwd"
echo "nobody:x:65534:65534:nobody:/nonexistent:/bin/false" >> "$tmp/etc/passwd"
printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' > "$tmp/etc/group"
echo "busybox" > "$tmp/etc/hostname"
: > "$tmp/etc/resolv.conf"

rm -rf "$root"
mv "$tmp" "$root"
trap - EXIT
tar --numeric-owner --owner=0 --group=0 -C "$root" -cf - . | zstd -q -19 -T0 -f -o "$out/busybox.tar.zst"
echo "rootfs:   $root"
echo "template: $out/busybox.tar.zst"
