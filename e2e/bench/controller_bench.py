#!/usr/bin/env python3
"""Benchmark of `stead controller` (issue 7).

Figures:
  - commit-to-converged latency through the webhook for a one-resource change on a
    repository of N volumes (median of RUNS runs): from `git push` returning to the
    volume file having its new size;
  - idle CPU (percent of one core) and RSS of the controller holding N resources, over
    IDLE seconds with the default 60 s resync (so resyncs are included).

Usage: e2e/bench/controller_bench.py [--n 1000] [--runs 7] [--idle 125] [--json]
--idle 0 skips the idle figures; --json prints one last line {"latencies": [seconds...]}
(scripts/bench.sh reads it).
The binary is $STEAD_BIN or target/release/stead (build it: cargo build --release --bin stead).
Runs as root or not; uses a temp dir and a free loopback port; cleans up.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

MI = 1 << 20


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def git(cwd, *args):
    env = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@example.com",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="b@example.com",
               GIT_CONFIG_NOSYSTEM="1", HOME=cwd)
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def manifests(pool, n, first_size):
    docs = [f"apiVersion: stead.dev/v1alpha1\nkind: StoragePool\nmetadata: {{name: local}}\n"
            f"spec: {{type: dir, path: {pool}}}\n"]
    for i in range(n):
        size = first_size if i == 0 else "1Mi"
        docs.append(f"apiVersion: stead.dev/v1alpha1\nkind: Volume\nmetadata: {{name: v{i:04d}}}\n"
                    f"spec: {{pool: local, size: {size}, deletionPolicy: Delete}}\n")
    return "---\n".join(docs)


def status(run_dir):
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(run_dir, "controller.sock"))
    s.sendall(b"status\n")
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return json.loads(data)


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_kib(pid, key="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--idle", type=float, default=125.0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    binary = os.environ.get("STEAD_BIN", "/var/cache/stead/target/release/stead")
    if not os.path.exists(binary):
        sys.exit(f"{binary} not found: cargo build --release --bin stead (or set STEAD_BIN)")
    work = tempfile.mkdtemp(prefix="stead-bench-")
    proc = None
    try:
        pool = os.path.join(work, "pool")
        bare = os.path.join(work, "repo.git")
        clone = os.path.join(work, "work")
        git(work, "init", "-q", "--bare", "-b", "main", bare)
        git(work, "init", "-q", "-b", "main", clone)
        git(clone, "remote", "add", "origin", bare)
        path = os.path.join(clone, "storage.yaml")
        with open(path, "w") as f:
            f.write(manifests(pool, a.n, "1Mi"))
        git(clone, "add", "-A")
        git(clone, "commit", "-q", "-m", "initial")
        git(clone, "push", "-q", "origin", "main")
        token = os.path.join(work, "token")
        with open(token, "w") as f:
            f.write("bench-token")
        port = free_port()
        run_dir = os.path.join(work, "run")
        log = open(os.path.join(work, "controller.log"), "w")
        t0 = time.monotonic()
        proc = subprocess.Popen(
            [binary, "--state-dir", os.path.join(work, "state"), "--run-dir", run_dir,
             "--cgroup-parent", f"stead-bench-{os.getpid()}", "controller",
             "--source", f"git+file://{bare}#main", "--listen", f"127.0.0.1:{port}",
             "--interval", "1h", "--webhook-token-file", token],
            stdout=subprocess.DEVNULL, stderr=log)
        # Initial convergence.
        while True:
            if proc.poll() is not None:
                sys.exit("controller exited; see " + log.name)
            try:
                st = status(run_dir)
                if st.get("lastResult") == "success" and len(st.get("resources", [])) == a.n + 1:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        initial = time.monotonic() - t0
        print(f"resources: {a.n} volumes + 1 pool")
        print(f"initial convergence (start to all created): {initial:.2f} s")

        image = os.path.join(pool, "images", "v0000.raw")
        lat = []
        for i in range(a.runs):
            size = 2 + i
            with open(path, "w") as f:
                f.write(manifests(pool, a.n, f"{size}Mi"))
            git(clone, "commit", "-q", "-am", f"grow v0000 to {size}Mi")
            git(clone, "push", "-q", "origin", "main")
            start = time.monotonic()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/hooks/git", data=b"{}",
                                         method="POST",
                                         headers={"Authorization": "Bearer bench-token"})
            urllib.request.urlopen(req, timeout=10).read()
            while True:
                try:
                    if os.stat(image).st_size == size * MI:
                        break
                except FileNotFoundError:
                    pass
                if time.monotonic() - start > 60:
                    sys.exit("change not applied within 60 s")
                time.sleep(0.002)
            lat.append(time.monotonic() - start)
            # Let the reconcile finish (status written) before the next commit.
            while status(run_dir).get("reconciles", 0) < i + 2 or status(run_dir).get("lastResult") != "success":
                time.sleep(0.01)
        print("commit-to-converged via webhook (s): " + " ".join(f"{x:.3f}" for x in lat))
        print(f"median latency: {statistics.median(lat) * 1000:.0f} ms")

        if a.json:
            print(json.dumps({"latencies": lat}))
        if a.idle <= 0:
            return
        time.sleep(2)
        hz = os.sysconf("SC_CLK_TCK")
        c0, w0 = cpu_ticks(proc.pid), time.monotonic()
        time.sleep(a.idle)
        c1, w1 = cpu_ticks(proc.pid), time.monotonic()
        cpu = (c1 - c0) / hz / (w1 - w0) * 100
        st = status(run_dir)
        print(f"idle over {w1 - w0:.0f} s (resync 60 s, {st.get('reconciles')} reconciles total): "
              f"CPU {cpu:.2f} % of one core")
        print(f"RSS {rss_kib(proc.pid) / 1024:.1f} MiB (peak {rss_kib(proc.pid, 'VmHWM') / 1024:.1f} MiB)")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    _ = root


if __name__ == "__main__":
    main()
