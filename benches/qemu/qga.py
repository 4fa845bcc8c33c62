#!/usr/bin/env python3
"""Tiny QEMU guest agent client for the benchmark scripts.

    qga.py SOCKET [--wait SECONDS] [COMMAND_JSON]
    qga.py SOCKET [--wait SECONDS] --exec SHELL_COMMAND

Connects to the agent's chardev socket (retrying until --wait runs out), synchronises with
guest-sync and a fresh id (dropping stale replies a restarted agent may still send), sends
COMMAND_JSON (default: guest-ping) and prints its reply. Exit 0 on a reply, 1 otherwise.
--exec runs `sh -c SHELL_COMMAND` in the guest (guest-exec), prints its output and exits
with its status.
"""
import base64
import json
import random
import socket
import sys
import time


def read_line(sock, buf):
    """One JSON reply from the socket; returns (reply, rest of the buffer)."""
    while True:
        while b"\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise OSError("agent closed the connection")
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        line = line.strip().lstrip(b"\xff")
        if line:
            return json.loads(line), buf


# guest-sync ids come from this range; an int reply in it is a (possibly stale) sync reply,
# never a command's answer (file handles are small, times are far larger).
SYNC_IDS = (1 << 24, 1 << 31)


def is_sync_reply(reply):
    value = reply.get("return")
    return isinstance(value, int) and SYNC_IDS[0] <= value < SYNC_IDS[1]


def sync(sock, deadline):
    """Sends guest-sync with a fresh id every 0.2 s until one is answered (a guest whose
    agent is not up yet drops them); stale replies to earlier ids are skipped."""
    sent, buf = set(), b""
    while True:
        sync_id = random.randrange(*SYNC_IDS)
        sent.add(sync_id)
        msg = {"execute": "guest-sync", "arguments": {"id": sync_id}}
        sock.sendall(json.dumps(msg).encode() + b"\n")
        sock.settimeout(0.2)
        try:
            while True:
                reply, buf = read_line(sock, buf)
                if isinstance(reply.get("return"), int) and reply["return"] in sent:
                    return buf
        except socket.timeout:
            if time.monotonic() >= deadline:
                raise


def ask(path, command, deadline):
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(2.0)
    try:
        sock.connect(path)
        buf = sync(sock, deadline)
        sock.sendall(json.dumps(command).encode() + b"\n")
        sock.settimeout(max(5.0, deadline - time.monotonic()))
        while True:
            reply, buf = read_line(sock, buf)
            if not is_sync_reply(reply):
                return reply
    finally:
        sock.close()


def guest_exec(path, shell, deadline):
    started = ask(path, {"execute": "guest-exec", "arguments": {
        "path": "/bin/sh", "arg": ["-c", shell], "capture-output": True}}, deadline)
    pid = started["return"]["pid"]
    while True:
        status = ask(path, {"execute": "guest-exec-status", "arguments": {"pid": pid}},
                     time.monotonic() + 30)["return"]
        if status.get("exited"):
            sys.stdout.write(base64.b64decode(status.get("out-data", "")).decode(errors="replace"))
            sys.stderr.write(base64.b64decode(status.get("err-data", "")).decode(errors="replace"))
            return status.get("exitcode", 1)
        time.sleep(0.2)


def main(argv):
    args = argv[1:]
    wait = 0.0
    if len(args) >= 3 and args[1] == "--wait":
        wait = float(args[2])
        del args[1:3]
    if not args:
        print(__doc__, file=sys.stderr)
        return 2
    path = args[0]
    deadline = time.monotonic() + wait
    if len(args) == 3 and args[1] == "--exec":
        return guest_exec(path, args[2], deadline)
    command = json.loads(args[1]) if len(args) > 1 else {"execute": "guest-ping"}
    deadline = time.monotonic() + wait
    while True:
        try:
            print(json.dumps(ask(path, command, deadline)))
            return 0
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return 1
            time.sleep(0.1)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
