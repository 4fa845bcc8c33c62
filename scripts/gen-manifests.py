#!/usr/bin/env python3
"""Generates a large, valid manifest set for benchmarks.

usage: gen-manifests.py N OUT_DIR [--root DIR] [--kinds storage|all]
N resources: pools (1 per 100 volumes), volumes, and with --kinds all also networks and
containers wired by references (container -> network, container -> volume mount).
"""
import os, sys

n = int(sys.argv[1]); out = sys.argv[2]
root = "/tmp/stead-bench"
kinds = "storage"
args = sys.argv[3:]
while args:
    a = args.pop(0)
    if a == "--root": root = args.pop(0)
    elif a == "--kinds": kinds = args.pop(0)
os.makedirs(out, exist_ok=True)
docs = []
def doc(kind, name, spec, labels=None):
    lab = f"\n  labels: {{{', '.join(f'{k}: {v}' for k, v in labels.items())}}}" if labels else ""
    return f"apiVersion: stead.dev/v1alpha1\nkind: {kind}\nmetadata:\n  name: {name}{lab}\nspec:\n{spec}"
count = 0
per_pool = 100
i = 0
files = {}
while count < n:
    if i % per_pool == 0:
        p = f"pool{i // per_pool}"
        files.setdefault(p, []).append(doc("StoragePool", p, f"  type: dir\n  path: {root}/{p}\n  content: [images, rootdir]\n"))
        count += 1
        if kinds == "all" and count < n:
            net = f"net{i // per_pool}"
            files[p].append(doc("Network", net, f"  type: bridge\n  addresses: [10.{(i // per_pool) // 250}.{(i // per_pool) % 250}.1/24]\n"))
            count += 1
    pool = f"pool{i // per_pool}"
    if count < n:
        files[pool].append(doc("Volume", f"vol{i}", f"  pool: {pool}\n  size: {1 + i % 64}Mi\n  deletionPolicy: Delete\n", {"tier": "bench"}))
        count += 1
    if kinds == "all" and count < n and i % 4 == 0:
        net = f"net{i // per_pool}"
        host = 2 + (i % per_pool)
        files[pool].append(doc("Container", f"ct{i}", f"  rootfs: {{path: {root}/rootfs}}\n  interfaces:\n    - {{name: eth0, network: {net}, address: 10.{(i // per_pool) // 250}.{(i // per_pool) % 250}.{host}/24}}\n  mounts:\n    - {{volume: vol{i}, path: /data}}\n  state: stopped\n"))
        count += 1
    i += 1
for name, ds in files.items():
    with open(os.path.join(out, f"{name}.yaml"), "w") as f:
        f.write("---\n".join(ds))
print(f"{count} resources in {len(files)} files under {out}")
