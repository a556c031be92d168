#!/usr/bin/env python3
"""events.py SOCKET: connects to xen-usb-dm's control socket, negotiates,
and prints the name of every event it receives, one per line (flushed),
until the socket closes or it is killed."""
import json
import socket
import sys
import time


def main():
    # (up to 10 s for the socket: a client started beside xen-usb-dm)
    for attempt in range(200):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(sys.argv[1])
            break
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if attempt == 199:
                raise
            time.sleep(0.05)
    f = s.makefile("rw")
    json.loads(f.readline())  # greeting
    f.write(json.dumps({"execute": "qmp_capabilities"}) + "\n")
    f.flush()
    for line in f:
        r = json.loads(line)
        if "event" in r:
            print(r["event"], json.dumps(r.get("data", {}), sort_keys=True), flush=True)


main()
