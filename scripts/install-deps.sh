#!/usr/bin/env bash
# Installs the Debian packages stead's build, tests and demo need (only what is missing).
set -euo pipefail
pkgs=(
  nftables        # nft: NAT and port forwards (network driver)
  btrfs-progs     # mkfs.btrfs, btrfs: btrfs pools and snapshots
  xfsprogs        # mkfs.xfs for storage tests
  busybox-static  # guest initramfs and container rootfs
  iproute2        # ip: test inspection and namespaces (stead itself uses netlink)
  iputils-ping    # ping across bridges and overlays in tests
  psmisc          # fuser/killall for leak checks
  zstd            # benchmark comparison (stead uses the zstd crate)
  binutils        # as/ld/objcopy for the VMM's tiny test guests
  prometheus      # promtool check metrics
  socat           # unix-socket pokes in tests
  e2fsprogs       # mkfs.ext4
  util-linux      # losetup, mount, unshare, nsenter
  bc              # benchmark arithmetic
  libssl-dev      # git2 https transport (controller sources)
  pkg-config      # finds libssl for the build
  perl            # openssl-src: OpenSSL's Configure (OpenSSL is built and linked statically)
  make            # openssl-src: OpenSSL's build
  git             # controller tests make repositories
  openssh-client  # ssh-keygen: SSH-signed commits (controller --verify-commits)
  gpg             # OpenPGP-signed commits in tests
  gpgv            # OpenPGP signature verification
  python3         # benchmark generators, test HTTP servers
  file            # build-rootfs.sh checks busybox is static
  etcd-server     # etcd 3.4: the cluster's store (tests start their own members on loopback)
  protobuf-compiler # protoc: builds the etcd client's gRPC code
  libprotobuf-dev # protoc's well-known types (google/protobuf/descriptor.proto) the etcd client's protos import
  curl            # the cluster lab's client of etcd's JSON gateway (e2e/src/cluster.rs)
  openssl         # second opinion on the certificates of stead cluster init (pki tests)
  faketime        # libfaketime: one lab agent's wall clock jumps, the host's never (cluster clock test)
  chromium        # the web UI's browser tests (headless)
  chromium-driver # chromedriver: WebDriver server the browser tests drive Chromium through
  crun            # scripts/bench.sh: the container peer (crun run -d / delete -f)
  hyperfine       # whole-process timings of single commands (docs/performance.md)
  linux-perf      # perf: profiles and flame graphs (docs/performance.md)
  jq              # the CI examples' comment posting, run by the e2e tests (examples/ci)
  python3-yaml    # the e2e tests parse the CI examples
  man-db          # man -l: the e2e tests render a generated manual page
  fish            # the e2e tests run the generated fish completions in a real fish
)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# etcd-server's package starts an etcd for the host; stead's tests start their own members, and
# a cluster node runs etcd as stead's docs say: never this one.
if [ -e /lib/systemd/system/etcd.service ] || [ -e /etc/init.d/etcd ]; then
  if [ -d /run/systemd/system ]; then
    systemctl disable --now etcd.service >/dev/null 2>&1 || true
  else
    service etcd stop >/dev/null 2>&1 || true
    update-rc.d etcd disable >/dev/null 2>&1 || true
  fi
fi
# The QEMU engine (full VMs) and its guest image: Debian bookworm's QEMU 7.2. A qemu-utils
# from backports (8.0 and later) breaks bookworm's qemu-system-common, so it is brought to
# bookworm's version with it.
qemu_pkgs=(
  qemu-system-x86     # qemu-system-x86_64: the QEMU engine
  qemu-utils          # qemu-img, qemu-io: qcow2 volumes, clones, image import, tests
  ovmf                # UEFI firmware (OVMF) and its QEMU firmware descriptors
  seabios             # BIOS firmware
  genisoimage         # cloud-init NoCloud seed ISO (cidata); isoinfo in tests
  mmdebstrap          # scripts/guest-image.sh: the Debian test guest
  grub-pc-bin         # the guest image's BIOS boot loader
  grub-efi-amd64-bin  # the guest image's UEFI boot loader
  mtools              # the guest image's EFI system partition
  dosfstools          # mkfs.vfat for the EFI system partition
  fdisk               # sfdisk: the guest image's partition table
)
qmissing=()
for p in "${qemu_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || qmissing+=("$p")
done
if [ ${#qmissing[@]} -gt 0 ]; then
  echo "installing: ${qmissing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if dpkg --compare-versions "$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || echo 0)" ge 1:8; then
    qmissing+=(qemu-utils/bookworm)
  fi
  apt-get install -y -qq --no-install-recommends --allow-downgrades "${qmissing[@]}" >/dev/null
fi
# axe-core for the web UI's accessibility checks (injected by e2e/tests/ui_*.rs), kept
# outside the clone; the tests SKIP that check when it is absent.
axe_dir=/var/cache/stead/axe
if [ ! -s "$axe_dir/node_modules/axe-core/axe.min.js" ] && command -v npm >/dev/null; then
  mkdir -p "$axe_dir"
  npm install --prefix "$axe_dir" --no-audit --no-fund --silent axe-core@4 >/dev/null || \
    echo "warning: axe-core not installed; the UI accessibility checks will SKIP" >&2
fi
command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
# Dependency hygiene in CI: unused dependencies, and bans/licenses (offline checks).
command -v cargo-machete >/dev/null || cargo install --locked cargo-machete
command -v cargo-deny >/dev/null || cargo install --locked cargo-deny
# The `stead` user owns the subordinate id ranges unprivileged containers get their ids
# from (docs/operations.md, "Id ranges of unprivileged containers").
id -u stead >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin stead
# QEMU runs as `stead-qemu` (group kvm for /dev/kvm), not root (docs/security.md, "QEMU's
# user"). The kvm group comes with udev; make it if this host has none.
getent group kvm >/dev/null || groupadd --system kvm
id -u stead-qemu >/dev/null 2>&1 ||
  useradd --system --no-create-home --shell /usr/sbin/nologin --groups kvm stead-qemu
stead_ids=1000000000-1999999999
grep -q '^stead:' /etc/subuid 2>/dev/null || usermod --add-subuids "$stead_ids" stead
grep -q '^stead:' /etc/subgid 2>/dev/null || usermod --add-subgids "$stead_ids" stead
modprobe tun 2>/dev/null || true
modprobe vxlan 2>/dev/null || true
modprobe btrfs 2>/dev/null || true
modprobe loop 2>/dev/null || true
