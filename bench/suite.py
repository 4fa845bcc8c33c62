#!/usr/bin/env python3
"""stead's benchmark suite: every figure of the performance table against its peer.

Run through scripts/bench.sh (it builds the release binaries, hides the controller-less
cgroup2 mount in a private mount namespace and calls this file). Each figure runs a
warm-up pair, then PAIRS pairs interleaved: stead, peer, stead, peer, ... Every run is a
whole process (or a short sequence of them) started from here: wall time from fork to
the last exit, CPU as user + sys of the reaped children (os.wait4). Figures without a
peer run alone and are held against their goal.

Everything privileged happens in a sandbox made here: own state and run dirs under a
temp dir, cgroup parent `stead-bench-<pid>-<figure>`, network figures in their own
network namespace; all removed at the end, also on failure.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAP_CMD = "trap 'exit 0' TERM; sleep 1000 & wait"
DEVNULL = subprocess.DEVNULL


class BenchError(Exception):
    """A run failed: the figure's rows say FAILED with this reason and the suite fails."""


class Skip(BenchError):
    """Something a figure needs is absent: its rows say SKIP with this reason."""


class Sample:
    """Wall and CPU seconds of one run (or of a sequence of runs)."""

    def __init__(self, wall, cpu):
        self.wall = wall
        self.cpu = cpu

    def __add__(self, other):
        cpu = None if self.cpu is None or other.cpu is None else self.cpu + other.cpu
        return Sample(self.wall + other.wall, cpu)


class Ctx:
    """Paths and options shared by the figures."""

    def __init__(self, args, work):
        self.stead = args.stead
        self.vmm_launch = args.vmm_launch
        self.backup_cli = args.backup_cli
        self.work = work
        self.log = open(os.path.join(work, "runs.log"), "ab")
        self.smoke = args.smoke
        self.tag = f"stead-bench-{os.getpid()}"

    def sandbox(self, name):
        """Global options for a stead sandbox of its own (state, run dir, cgroup parent)."""
        d = os.path.join(self.work, name)
        os.makedirs(d, exist_ok=True)
        return ["--state-dir", f"{d}/state", "--run-dir", f"{d}/run",
                "--cgroup-parent", f"{self.tag}-{name}"]


def run(ctx, cmd, ok=(0,), cwd=None):
    """Runs CMD to its end: a Sample of its wall time and its (and its children's) CPU."""
    ctx.log.write(("$ " + " ".join(cmd) + "\n").encode())
    ctx.log.flush()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=DEVNULL, stdout=DEVNULL, stderr=ctx.log, cwd=cwd)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode not in ok:
        raise BenchError(f"`{' '.join(cmd[:4])} …` exited {p.returncode} (see the run log)")
    return Sample(wall, ru.ru_utime + ru.ru_stime)


def run_parallel(ctx, cmds):
    """Starts every command at once and waits for all: wall to the last exit, summed CPU."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdin=DEVNULL, stdout=DEVNULL, stderr=ctx.log) for c in cmds]
    cpu, bad = 0.0, 0
    for p in procs:
        _, status, ru = os.wait4(p.pid, 0)
        cpu += ru.ru_utime + ru.ru_stime
        bad += os.waitstatus_to_exitcode(status) != 0
    wall = time.perf_counter() - t0
    if bad:
        raise BenchError(f"{bad} of {len(cmds)} parallel runs failed (see the run log)")
    return Sample(wall, cpu)


def run_to_marker(ctx, cmd, marker, timeout=30.0):
    """Runs CMD; wall to MARKER on its stdout, CPU of the whole process once it exits."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=DEVNULL, stdout=subprocess.PIPE, stderr=ctx.log)
    buf, seen = b"", None
    while True:
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
        if seen is None and marker in buf:
            seen = time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            p.kill()
    _, status, ru = os.wait4(p.pid, 0)
    p.stdout.close()
    if seen is None:
        raise BenchError(f"`{cmd[0]}`: marker not seen (exit status {status})")
    return Sample(seen, ru.ru_utime + ru.ru_stime)


def tool(name):
    """Raises a stated skip when a peer's tool is missing."""
    if shutil.which(name) is None:
        raise Skip(f"{name} not installed (scripts/install-deps.sh)")


# ---------------------------------------------------------------- the figures


class Figure:
    """One measured figure. Subclasses set the class attributes and the run methods.

    `stead()` and `peer()` return {row: Sample}; `rows` lists the rows with their goals:
    (row, title, peer title, goal text, kind, limit), kind "ratio" (stead/peer median ≤
    limit) or "abs" (stead median < limit seconds).
    """

    name = ""
    rows = ()
    has_peer = True
    warmup = 1
    pairs = 10

    def __init__(self, ctx):
        self.ctx = ctx

    def setup(self):
        pass

    def stead(self):
        raise NotImplementedError

    def peer(self):
        return {}

    def teardown(self):
        pass


def busybox_rootfs(ctx):
    """The busybox rootfs both container sides use (scripts/build-rootfs.sh)."""
    assets = os.path.join(ctx.work, "assets")
    root = os.path.join(assets, "busybox-rootfs")
    if not os.path.isdir(root):
        subprocess.run([f"{REPO}/scripts/build-rootfs.sh", assets], check=True, stdout=DEVNULL)
    return root


def container_doc(name, rootfs):
    return (f"apiVersion: stead.dev/v1alpha1\nkind: Container\nmetadata: {{name: {name}}}\n"
            f"spec:\n  rootfs: {{path: {rootfs}}}\n  unprivileged: false\n"
            f"  command: [/bin/sh, -c, \"{TRAP_CMD}\"]\n"
            f"  resources: {{memory: 64Mi, pids: 100}}\n  restartPolicy: never\n")


class CrunBundle:
    """An OCI bundle for crun on the same rootfs, command and limits as stead's manifest."""

    def __init__(self, ctx, rootfs, name):
        tool("crun")
        self.ctx = ctx
        self.dir = os.path.join(ctx.work, name)
        self.root = os.path.join(ctx.work, name + "-state")
        os.makedirs(self.dir, exist_ok=True)
        subprocess.run(["crun", "spec"], cwd=self.dir, check=True)
        path = os.path.join(self.dir, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["root"] = {"path": rootfs, "readonly": False}
        cfg["process"]["terminal"] = False
        cfg["process"]["args"] = ["/bin/sh", "-c", TRAP_CMD]
        cfg["linux"]["cgroupsPath"] = f"/{ctx.tag}-{name}"
        cfg["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 100}}
        with open(path, "w") as f:
            json.dump(cfg, f)
        self.ids = set()

    def cmd(self, *args):
        return ["crun", "--root", self.root, "--cgroup-manager=cgroupfs", *args]

    def run_cmd(self, cid):
        self.ids.add(cid)
        return self.cmd("run", "-d", "-b", self.dir, cid)

    def delete_cmd(self, cid):
        self.ids.discard(cid)
        return self.cmd("delete", "-f", cid)

    def cleanup(self):
        for cid in list(self.ids):
            subprocess.run(self.delete_cmd(cid), stdout=DEVNULL, stderr=DEVNULL)


class ContainerLifecycle(Figure):
    """stead apply + destroy of one container against crun run -d + delete -f."""

    name = "container"
    rows = (
        ("container-lifecycle", "container create+start+stop+delete (CLI)",
         "crun run -d + delete -f", "≤ 0.8× crun", "ratio", 0.8),
        ("container-start", "container start → running (apply returns)",
         "crun run -d", "≤ 0.8× crun", "ratio", 0.8),
    )
    pairs = 15

    def setup(self):
        rootfs = busybox_rootfs(self.ctx)
        self.g = self.ctx.sandbox("ct")
        self.manifest = os.path.join(self.ctx.work, "ct.yaml")
        with open(self.manifest, "w") as f:
            f.write(container_doc("bench", rootfs))
        self.crun = CrunBundle(self.ctx, rootfs, "crun-one")
        self.n = 0
        # The state DB's first open (creating it) is not part of any run.
        run(self.ctx, [self.ctx.stead, *self.g, "destroy", "--yes", self.manifest])

    def stead(self):
        up = run(self.ctx, [self.ctx.stead, *self.g, "apply", "--yes", self.manifest])
        down = run(self.ctx, [self.ctx.stead, *self.g, "destroy", "--yes", self.manifest])
        return {"container-lifecycle": up + down, "container-start": up}

    def peer(self):
        self.n += 1
        cid = f"{self.ctx.tag}-{self.n}"
        up = run(self.ctx, self.crun.run_cmd(cid))
        down = run(self.ctx, self.crun.delete_cmd(cid))
        return {"container-lifecycle": up + down, "container-start": up}

    def teardown(self):
        if hasattr(self, "crun"):
            self.crun.cleanup()
        if hasattr(self, "g"):
            subprocess.run([self.ctx.stead, *self.g, "destroy", "--yes", self.manifest],
                           stdout=DEVNULL, stderr=DEVNULL)


class Containers50(Figure):
    """One stead apply of 50 containers against 50 crun run -d started at once."""

    name = "containers-50"
    rows = (("containers-50", "50 containers applied at once",
             "50 × crun run -d in parallel", "≤ 1× crun", "ratio", 1.0),)

    def setup(self):
        rootfs = busybox_rootfs(self.ctx)
        self.g = self.ctx.sandbox("ct50")
        self.manifest = os.path.join(self.ctx.work, "ct50.yaml")
        with open(self.manifest, "w") as f:
            f.write("---\n".join(container_doc(f"b{i:02d}", rootfs) for i in range(50)))
        self.bundles = [CrunBundle(self.ctx, rootfs, f"crun50-{i:02d}") for i in range(50)]
        self.n = 0
        run(self.ctx, [self.ctx.stead, *self.g, "destroy", "--yes", self.manifest])

    def stead(self):
        up = run(self.ctx, [self.ctx.stead, *self.g, "apply", "--yes", self.manifest])
        run(self.ctx, [self.ctx.stead, *self.g, "destroy", "--yes", self.manifest])
        return {"containers-50": up}

    def peer(self):
        self.n += 1
        cids = [f"{self.ctx.tag}-{self.n}-{i:02d}" for i in range(50)]
        up = run_parallel(self.ctx, [b.run_cmd(c) for b, c in zip(self.bundles, cids)])
        run_parallel(self.ctx, [b.delete_cmd(c) for b, c in zip(self.bundles, cids)])
        return {"containers-50": up}

    def teardown(self):
        for b in getattr(self, "bundles", []):
            b.cleanup()
        if hasattr(self, "g"):
            subprocess.run([self.ctx.stead, *self.g, "destroy", "--yes", self.manifest],
                           stdout=DEVNULL, stderr=DEVNULL)


class MicroVm(Figure):
    """stead-vmm against qemu -M microvm: exec → the tiny PVH guest's line on the serial."""

    name = "microvm"
    rows = (("microvm", "microVM launch → guest marker",
             "qemu -M microvm, same PVH guest", "≤ 0.25× qemu", "ratio", 0.25),)
    marker = b"hello from stead"

    def setup(self):
        tool("qemu-system-x86_64")
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise Skip("no usable /dev/kvm")
        pvh = subprocess.run([self.ctx.vmm_launch, "--print-pvh-path"], check=True,
                             capture_output=True, text=True).stdout.strip()
        self.qemu = ["qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off",
                     "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "32M", "-smp", "1",
                     "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                     "-device", "isa-debug-exit,iobase=0x600,iosize=1", "-kernel", pvh,
                     "-append", "mode=hello"]

    def stead(self):
        s = run_to_marker(self.ctx, [self.ctx.vmm_launch, "--echo", "--pvh"], self.marker)
        return {"microvm": s}

    def peer(self):
        return {"microvm": run_to_marker(self.ctx, self.qemu, self.marker)}


class QemuVm(Figure):
    """stead apply of a VM until its guest agent answers, against plain QEMU (same argv).

    benches/qemu/stead-boot.sh runs the pairs (plain, then stead) in its own sandbox; a
    TCG boot takes ~35 s, so this row has 3 pairs and no warm-up (10 pairs alone would
    take 12 minutes).
    """

    name = "qemu-vm"
    rows = (("qemu-vm", "QEMU VM apply → guest agent answers",
             "plain qemu script", "≤ 1.05× plain", "ratio", 1.05),)
    warmup = 0
    pairs = 3

    def setup(self):
        tool("qemu-system-x86_64")
        tool("genisoimage")
        self.samples = None

    def collect(self):
        """Runs all pairs at once through stead-boot.sh; returns ([stead], [plain])."""
        cmd = [f"{REPO}/benches/qemu/stead-boot.sh", "-n", str(self.pairs), self.ctx.stead]
        env = dict(os.environ, BOOT_TIMEOUT="300", STEAD_BENCH_TAG=f"{self.ctx.tag}-boot")
        p = subprocess.run(cmd, stdin=DEVNULL, capture_output=True, text=True, env=env)
        self.ctx.log.write((p.stderr + p.stdout).encode())
        if p.returncode != 0:
            tail = p.stderr.strip().splitlines()[-1:] or ["no output"]
            raise BenchError(f"stead-boot.sh failed: {tail[0]}")
        runs = re.findall(r"^(plain|stead)-\w+ run \d+: ([0-9.]+) s$", p.stderr, re.M)
        return ([float(t) for s, t in runs if s == "stead"],
                [float(t) for s, t in runs if s == "plain"])


class Plan(Figure):
    """stead diff of N generated resources (pools, networks, volumes, containers)."""

    has_peer = False
    # Runs of seconds on files just written (in the page cache): no warm-up.
    warmup = 0

    def __init__(self, ctx, n, limit):
        super().__init__(ctx)
        k = f"{n // 1000}k"
        self.name = f"plan-{k}"
        # The smoke (a debug build) plans a tenth: it only shows that the row runs.
        self.n = n // 10 if ctx.smoke else n
        self.rows = ((self.name, f"plan {self.n // 1000}k resources (`stead diff`)", "—",
                      f"< {limit:g} s (at {k})", "abs", limit),)

    def setup(self):
        self.ns = f"{self.ctx.tag}-{self.name}"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        d = os.path.join(self.ctx.work, self.name)
        self.dir = os.path.join(d, "manifests")
        subprocess.run([sys.executable, f"{REPO}/scripts/gen-manifests.py", str(self.n), self.dir,
                        "--root", os.path.join(d, "pools"), "--kinds", "all"],
                       check=True, stdout=DEVNULL)
        self.g = self.ctx.sandbox(self.name) + ["--netns", self.ns]

    def stead(self):
        return {self.name: run(self.ctx, [self.ctx.stead, *self.g, "diff", self.dir], ok=(2,))}

    def teardown(self):
        if hasattr(self, "ns"):
            subprocess.run(["ip", "netns", "del", self.ns], stderr=DEVNULL)


class NoopApply(Figure):
    """A no-op apply of 200 networks (bridges with addresses) in a network namespace."""

    name = "noop-200-networks"
    has_peer = False
    rows = ((name, "no-op apply, 200 networks", "—", "< 50 ms", "abs", 0.050),)

    def setup(self):
        self.ns = f"{self.ctx.tag}-noop"
        subprocess.run(["ip", "netns", "add", self.ns], check=True)
        self.g = self.ctx.sandbox("noop") + ["--netns", self.ns]
        self.manifest = os.path.join(self.ctx.work, "nets.yaml")
        with open(self.manifest, "w") as f:
            f.write("---\n".join(
                f"apiVersion: stead.dev/v1alpha1\nkind: Network\nmetadata: {{name: n{i:03d}}}\n"
                f"spec: {{type: bridge, addresses: [10.{i // 250}.{i % 250}.1/24]}}\n"
                for i in range(200)))
        run(self.ctx, [self.ctx.stead, *self.g, "apply", "--yes", self.manifest])

    def stead(self):
        s = run(self.ctx, [self.ctx.stead, *self.g, "apply", "--yes", self.manifest])
        return {self.name: s}

    def teardown(self):
        if hasattr(self, "g"):
            subprocess.run([self.ctx.stead, *self.g, "destroy", "--yes", self.manifest],
                           stdout=DEVNULL, stderr=DEVNULL)
        if hasattr(self, "ns"):
            subprocess.run(["ip", "netns", "del", self.ns], stderr=DEVNULL)


class CommitConverged(Figure):
    """Webhook commit → converged on a repository of 1,000 volumes (e2e/bench)."""

    name = "commit-converged"
    has_peer = False
    rows = ((name, "commit → converged (webhook), 1,000 resources", "—",
             "p50 < 100 ms, p99 < 250 ms", "p50p99", (0.100, 0.250)),)
    warmup = 0
    pairs = 20

    def collect(self):
        cmd = [sys.executable, f"{REPO}/e2e/bench/controller_bench.py", "--n", "1000",
               "--runs", str(self.pairs), "--idle", "0", "--json"]
        p = subprocess.run(cmd, stdin=DEVNULL, capture_output=True, text=True,
                           env=dict(os.environ, STEAD_BIN=self.ctx.stead))
        self.ctx.log.write((p.stderr + p.stdout).encode())
        if p.returncode != 0:
            raise BenchError("controller_bench.py failed: " + (p.stderr.strip()[-200:] or "?"))
        return json.loads(p.stdout.strip().splitlines()[-1])["latencies"]


class Backup(Figure):
    """First and unchanged re-backup of mixed data against zstd -T0 of the same file."""

    name = "backup"
    rows = (
        ("backup-first", "first backup, MiB mixed data", "zstd -T0 -o file",
         "≤ 1.0× zstd (as fast or faster)", "ratio", 1.0),
        ("backup-again", "unchanged re-backup, same data", "zstd -T0 -o file",
         "≤ 0.05× zstd (≥ 20× faster)", "ratio", 0.05),
    )

    def __init__(self, ctx):
        super().__init__(ctx)
        self.mib = 16 if ctx.smoke else 256
        first = (self.rows[0][0], f"first backup, {self.mib} MiB mixed data", *self.rows[0][2:])
        self.rows = (first, self.rows[1])

    def setup(self):
        tool("zstd")
        self.dir = os.path.join(self.ctx.work, "backup")
        os.makedirs(self.dir, exist_ok=True)
        self.data = os.path.join(self.dir, "data.raw")
        subprocess.run([sys.executable, "-c", MIXED_DATA, self.data, str(self.mib)],
                       check=True)
        with open(self.data, "rb") as f:
            while f.read(1 << 24):
                pass
        # A file changed within 2 s of a backup is read again (the racy window): the data
        # is as old as a scheduled backup would find it.
        time.sleep(2.1)

    def stead(self):
        store = os.path.join(self.dir, "store")
        shutil.rmtree(store, ignore_errors=True)
        cmd = [self.ctx.backup_cli, "run", "--path", f"disk={self.data}", "--name",
               "Volume/bench", "-s", store]
        first = run(self.ctx, cmd)
        again = run(self.ctx, cmd)
        return {"backup-first": first, "backup-again": again}

    def peer(self):
        out = os.path.join(self.dir, "data.zst")
        s = run(self.ctx, ["zstd", "-q", "-T0", "-f", self.data, "-o", out])
        os.unlink(out)
        return {"backup-first": s, "backup-again": s}


# 1/3 random, 1/3 text-like, 1/3 zeros in 4 MiB blocks (drivers/benches/backup_bench.sh).
MIXED_DATA = r"""
import os, sys, random
path, mib = sys.argv[1], int(sys.argv[2])
random.seed(42)
alphabet = (b"e" * 12 + b"t" * 9 + b"a" * 8 + b"o" * 8 + b"i" * 7 + b"n" * 7 + b" " * 18
            + b"s" * 6 + b"h" * 6 + b"r" * 6 + b"d" * 4 + b"l" * 4 + b"\n" * 3 + b"cumwfgypb,.")
table = bytes(alphabet[i % len(alphabet)] for i in range(256))
blk = 4 << 20
with open(path, "wb") as f:
    for i in range(mib // 4):
        k = i % 3
        f.write(os.urandom(blk) if k == 0 else os.urandom(blk).translate(table) if k == 1
                else bytes(blk))
"""


class Validate(Figure):
    """stead validate of one file: the CLI's fixed cost."""

    name = "validate"
    has_peer = False
    rows = ((name, "`stead validate` of one file", "—", "< 3 ms", "abs", 0.003),)
    pairs = 15

    def setup(self):
        self.manifest = os.path.join(self.ctx.work, "validate.yaml")
        with open(self.manifest, "w") as f:
            f.write(container_doc("bench", "/srv/rootfs"))

    def stead(self):
        return {self.name: run(self.ctx, [self.ctx.stead, "validate", self.manifest])}


class ImportProxmox(Figure):
    """stead import proxmox of a generated Proxmox VE tree (scripts/bench-import.sh)."""

    name = "import-500"
    has_peer = False

    def __init__(self, ctx):
        super().__init__(ctx)
        # The smoke (a debug build) imports a tenth: it only shows that the row runs.
        self.n = 50 if ctx.smoke else 500
        self.rows = ((self.name, f"`stead import proxmox` of {self.n} guests", "—",
                      "< 1 s (at 500)", "abs", 1.0),)

    def setup(self):
        d = os.path.join(self.ctx.work, self.name)
        self.root = os.path.join(d, "pve")
        self.out = os.path.join(d, "out")
        subprocess.run(["sh", f"{REPO}/scripts/bench-import.sh", "--generate", self.root,
                        str(self.n)], check=True, stdout=DEVNULL)

    def stead(self):
        return {self.name: run(self.ctx, [self.ctx.stead, "import", "proxmox", "--root",
                                          self.root, "--out", self.out])}


def figures(ctx):
    return [ContainerLifecycle(ctx), Containers50(ctx), MicroVm(ctx), QemuVm(ctx),
            Plan(ctx, 20_000, 1.0), Plan(ctx, 100_000, 3.0), NoopApply(ctx),
            CommitConverged(ctx), Backup(ctx), Validate(ctx), ImportProxmox(ctx)]


# ---------------------------------------------------------------- running and reporting


def measure(fig, pairs, warmup):
    """Runs the figure: {row: ([stead Samples], [peer Samples])}."""
    out = {r[0]: ([], []) for r in fig.rows}
    if hasattr(fig, "collect"):
        fig.pairs = pairs if pairs is not None else fig.pairs
        got = fig.collect()
        if isinstance(got, tuple):
            s, p = got
            out[fig.rows[0][0]] = ([Sample(x, None) for x in s], [Sample(x, None) for x in p])
        else:
            out[fig.rows[0][0]] = ([Sample(x, None) for x in got], [])
        if not out[fig.rows[0][0]][0]:
            raise BenchError("no run was measured")
        return out
    n = pairs if pairs is not None else fig.pairs
    for i in range(warmup + n):
        a = fig.stead()
        b = fig.peer() if fig.has_peer else {}
        if i < warmup:
            continue
        for row, (sv, pv) in out.items():
            sv.append(a[row])
            if row in b:
                pv.append(b[row])
    return out


def med(xs):
    return statistics.median(xs) if xs else None


def p99(xs):
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


def fmt_t(s):
    if s is None:
        return "—"
    return f"{s * 1000:.1f} ms" if s < 10 else f"{s:.2f} s"


def verdict(row, sv, pv):
    """(ratio text, met text) for a row's samples."""
    _, _, _, _, kind, limit = row
    sm = med([x.wall for x in sv])
    if kind == "ratio":
        pm = med([x.wall for x in pv])
        if not pm:
            return "—", "?"
        r = sm / pm
        return f"{r:.2f}×", "yes" if r <= limit else "no"
    if kind == "p50p99":
        walls = [x.wall for x in sv]
        ok = sm < limit[0] and p99(walls) < limit[1]
        return f"p99 {fmt_t(p99(walls))}", "yes" if ok else "no"
    return "—", "yes" if sm < limit else "no"


def table(results, smoke):
    """The Markdown table of every row: measured, skipped or failed."""
    lines = ["| figure | stead median | peer | peer median | ratio | stead min–max "
             "| peer min–max | CPU stead / peer | n | goal | met? |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, got in results:
        name, title, peer, goal = row[0], row[1], row[2], row[3]
        if isinstance(got, str):
            lines.append(f"| {title} | {got} | {peer} | — | — | — | — | — | 0 | {goal} | — |")
            continue
        sv, pv = got
        walls = [x.wall for x in sv]
        pw = [x.wall for x in pv]
        ratio, met = verdict(row, sv, pv)
        if smoke:
            met = "— (smoke)"
        cpu_s = med([x.cpu for x in sv if x.cpu is not None])
        cpu_p = med([x.cpu for x in pv if x.cpu is not None])
        rng = lambda xs: f"{fmt_t(min(xs))}–{fmt_t(max(xs))}" if xs else "—"  # noqa: E731
        lines.append(f"| {title} | {fmt_t(med(walls))} | {peer} | {fmt_t(med(pw))} | {ratio} "
                     f"| {rng(walls)} | {rng(pw)} | {fmt_t(cpu_s)} / {fmt_t(cpu_p)} "
                     f"| {len(walls)}{'+' + str(len(pw)) if pw else ''} | {goal} | {met} |")
    return "\n".join(lines)


def remove_cgroups(tag, base="/sys/fs/cgroup"):
    """Removes the cgroups named after this run that are left empty (sandbox parents).

    Under the hidden cgroup2 mount point, crun leaves plain directories with a
    `cgroup.procs` file on the tmpfs: those are removed as files.
    """
    for ctrl in sorted(os.listdir(base)):
        top = os.path.join(base, ctrl)
        if os.path.islink(top) or not os.path.isdir(top):
            continue
        for name in os.listdir(top):
            if not name.startswith(tag):
                continue
            if not os.path.ismount(top):
                shutil.rmtree(os.path.join(top, name), ignore_errors=True)
                continue
            for d, _, _ in os.walk(os.path.join(top, name), topdown=False):
                try:
                    os.rmdir(d)
                except OSError as e:
                    print(f"left behind: cgroup {d}: {e.strerror}", file=sys.stderr)


def first_line(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not installed"


def machine(args):
    """Machine and versions, as Markdown lines."""
    cpu = "?"
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            cpu = line.split(":", 1)[1].strip()
    mem = subprocess.run(["free", "-m"], capture_output=True, text=True).stdout.split("\n")[1]
    rev = subprocess.run(["git", "-C", REPO, "describe", "--always", "--dirty", "--abbrev=12"],
                         capture_output=True, text=True).stdout.strip() or "?"
    return [
        f"- machine: {cpu}, {os.cpu_count()} cores, {mem.split()[1]} MiB memory, "
        f"kernel {platform.release()}, load average {os.getloadavg()[0]:.2f} at start",
        f"- stead {rev} ({args.stead})",
        f"- {first_line(['crun', '--version'])}; {first_line(['qemu-system-x86_64', '--version'])}; "
        f"{first_line(['zstd', '--version']).strip('* ')}; {first_line(['etcd', '--version'])}; "
        f"Python {platform.python_version()}",
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stead", required=True)
    ap.add_argument("--vmm-launch", required=True)
    ap.add_argument("--backup-cli", required=True)
    ap.add_argument("--smoke", action="store_true", help="one pair of each figure, no warm-up")
    ap.add_argument("--only", action="append", default=[], help="run only this figure (repeatable)")
    ap.add_argument("--out", help="also write the report (Markdown) to this file")
    ap.add_argument("--command", default="scripts/bench.sh", help="the command line to record")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="stead-bench-")
    os.chmod(work, 0o755)
    ctx = Ctx(args, work)
    figs = figures(ctx)
    names = [f.name for f in figs]
    for o in args.only:
        if o not in names:
            sys.exit(f"unknown figure {o}; figures: {', '.join(names)}")
    figs = [f for f in figs if not args.only or f.name in args.only]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.datetime.now(datetime.timezone.utc)
    head = machine(args)
    results = []
    failed = False
    try:
        for fig in figs:
            t0 = time.monotonic()
            print(f"== {fig.name}", file=sys.stderr, flush=True)
            try:
                fig.setup()
                got = measure(fig, 1 if args.smoke else None, 0 if args.smoke else fig.warmup)
                for row in fig.rows:
                    results.append((row, got[row[0]]))
            except Skip as e:
                for row in fig.rows:
                    results.append((row, f"SKIP: {e}"))
            except (BenchError, subprocess.CalledProcessError, OSError) as e:
                failed = True
                for row in fig.rows:
                    results.append((row, f"FAILED: {e}"))
            finally:
                fig.teardown()
            print(f"   {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    finally:
        ctx.log.close()
        remove_cgroups(ctx.tag)
        log_copy = os.path.join(tempfile.gettempdir(), "stead-bench-last.log")
        shutil.copyfile(os.path.join(work, "runs.log"), log_copy)
        shutil.rmtree(work, ignore_errors=True)
    took = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    head[0] += f", {os.getloadavg()[0]:.2f} at the end"
    report = "\n".join([
        f"# stead benchmark suite, {started:%Y-%m-%d %H:%M} UTC", "",
        f"`{args.command}` ({'smoke: one pair each' if args.smoke else 'full run'}; "
        f"took {took / 60:.1f} min; wall medians; CPU = user + sys of the reaped processes)", "",
        *head, "", table(results, args.smoke), ""])
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
    # Every row must have a number or a stated skip; a failed setup is an error.
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
