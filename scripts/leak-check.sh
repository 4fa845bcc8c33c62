#!/usr/bin/env bash
# Fails if a test left anything behind: links, namespaces, cgroups, loop devices, mounts, processes.
set -u
bad=0
say() { echo "leak: $*"; bad=1; }
ip -o link show | grep -E 'stead|stv|stt' | grep -v '^$' && say "links above"
ip netns list 2>/dev/null | grep -E '^stead' && say "network namespaces above"
for c in /sys/fs/cgroup/*/stead* /sys/fs/cgroup/stead*; do [ -e "$c" ] && say "cgroup $c"; done
losetup -a 2>/dev/null | grep -E 'stead' && say "loop devices above"
grep -E 'stead' /proc/mounts && say "mounts above"
pgrep -af 'stead (shim|vmm)' && say "processes above"
[ $bad -eq 0 ] && echo "leak check: clean"
exit $bad
