#!/usr/bin/env bash
# Fails if a test left anything behind: links, namespaces, cgroups, loop devices, mounts,
# processes. The demo's own scope (stead-demo) is not a test leftover and is ignored.
set -u
bad=0
say() { echo "leak: $*"; bad=1; }
demo='stead-demo'
ip -o link show | grep -E 'stead' | grep -v "$demo" && say "links above"
ip netns list 2>/dev/null | grep -E '^stead' | grep -v "$demo" && say "network namespaces above"
for c in /sys/fs/cgroup/*/stead* /sys/fs/cgroup/stead*; do
  [ -e "$c" ] && [[ "$c" != *"$demo"* ]] && say "cgroup $c"
done
losetup -a 2>/dev/null | grep -E 'stead' | grep -v "$demo" && say "loop devices above"
grep -E 'stead' /proc/mounts | grep -v "$demo" && say "mounts above"
pgrep -af 'stead (shim|vmm|qemu)' | grep -v "$demo" && say "processes above"
# QEMU processes a test or the QEMU engine started (their command lines name stead's run
# or temp directories; a QEMU of the operator's own is not ours).
pgrep -af 'qemu-system' | grep -E 'stead' | grep -v "$demo" && say "QEMU processes above"
# etcd members the cluster tests started (their data directories are stead-etcd-* temp dirs).
pgrep -af 'etcd .*--data-dir=[^ ]*stead-etcd-' && say "etcd processes above"
# etcd members, agents and controllers of the cluster lab (their command lines name the
# lab's stead-lab-* temp dir).
pgrep -af '/stead-lab-' && say "cluster lab processes above"
[ $bad -eq 0 ] && echo "leak check: clean"
exit $bad
