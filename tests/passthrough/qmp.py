#!/usr/bin/env python3
"""qmp.py SOCKET JSON: sends one QMP command to QEMU and prints the reply."""
import json
import socket
import sys


def main():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(sys.argv[1])
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    for cmd in ({"execute": "qmp_capabilities"}, json.loads(sys.argv[2])):
        f.write(json.dumps(cmd) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if "event" not in r:
                break
        if "error" in r:
            print("qmp error:", r["error"], file=sys.stderr)
            sys.exit(1)
    print(json.dumps(r.get("return")))


main()
