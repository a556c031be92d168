#!/usr/bin/env python3
"""Where the time of a Bulk-Only command goes, for our xHCI over vfio-user
and QEMU's built-in qemu-xhci, from the two logs phases.sh collects.

Both sticks use bulk IN endpoint 1 (doorbell target 3: data-in, CSW) and bulk
OUT endpoint 2 (target 4: CBW, data-out). A command is CBW doorbell, data
doorbell, CSW doorbell; each phase ends with the guest's interrupt handler
writing ERDP (runtime 0x3c). Times are wall-clock microseconds from the
device side (our trace lines / QEMU's trace events), medians over commands.
Usage: phases.py OUR_TIMELINE QEMU_TRACE
"""
import re
import statistics as st
import sys
from datetime import datetime


def ts(s):
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp() * 1e6


def ours(path):
    """(t, kind, off, val) from XEN_USB_DM_TIMELINE's file: kind DB/DBR
    (off = slot * 4), RTW/RTR (runtime offset), OPW/OPR (operational
    offset), IRQ."""
    ev = []
    for line in open(path):
        us, k, off, val = line.split()
        t, off, val = int(us), int(off, 16), int(val, 16)
        if k == "I":
            ev.append((t, "IRQ", 0, 0))
        elif 0x2000 <= off < 0x3000:
            ev.append((t, "DB" if k == "W" else "DBR", off - 0x2000, val))
        elif 0x1000 <= off < 0x2000:
            ev.append((t, "RTW" if k == "W" else "RTR", off - 0x1000, val))
        elif 0x40 <= off < 0x1000:
            ev.append((t, "OPW" if k == "W" else "OPR", off - 0x40, val))
    return ev


def qemu(path):
    ev = []
    pat = re.compile(r"^(\S+Z) usb_xhci_(doorbell_write|doorbell_read|runtime_write|runtime_read|oper_read|oper_write) off (0x[0-9a-f]+), (?:val|ret) (0x[0-9a-f]+)")
    kinds = {"doorbell_write": "DB", "doorbell_read": "DBR", "runtime_write": "RTW",
             "runtime_read": "RTR", "oper_read": "OPR", "oper_write": "OPW"}
    for line in open(path, errors="replace"):
        m = pat.match(line)
        if m:
            ev.append((ts(m.group(1)), kinds[m.group(2)], int(m.group(3), 16), int(m.group(4), 16)))
    return ev


def phases(ev):
    """Per command: dir, CBW->data DB, data DB->CSW DB, CSW DB->handler end,
    handler end->next CBW (guest), total; plus IRQ->first USBSTS read and
    the spacing of the handler's two ERDP reads (one register read)."""
    cmds, cur = [], None
    for t, k, off, val in ev:
        if k == "DB" and off == 4 and val in (3, 4):
            if val == 4 and (cur is None or cur["phase"] == "csw"):
                cur = {"cbw": t, "phase": "cbw"}
                cmds.append(cur)
            elif cur is not None and cur["phase"] == "cbw":
                cur.update(data=t, dir="read" if val == 3 else "write", phase="data")
            elif cur is not None and cur["phase"] == "data":
                cur.update(csw=t, phase="csw")
        elif k == "RTW" and off == 0x3c and cur is not None:
            cur["end_" + cur["phase"]] = t
    rows = []
    for a, b in zip(cmds, cmds[1:]):
        if "end_csw" in a and "data" in a and "csw" in a:
            rows.append((a["dir"], a["data"] - a["cbw"], a["csw"] - a["data"],
                         a["end_csw"] - a["csw"], b["cbw"] - a["end_csw"], b["cbw"] - a["cbw"]))
    irq_lat, read_rt = [], []
    last_irq = None
    for i, (t, k, off, val) in enumerate(ev):
        if k == "IRQ":
            last_irq = t
        elif k == "OPR" and off == 4 and last_irq is not None:
            irq_lat.append(t - last_irq)
            last_irq = None
        elif k == "RTR" and off == 0x3c and i > 0 and ev[i - 1][1] == "RTR" and ev[i - 1][2] == 0x38:
            read_rt.append(t - ev[i - 1][0])
    return rows, irq_lat, read_rt


def main():
    print("| device | dir | commands | CBW -> data DB | data DB -> CSW DB | CSW DB -> handler done | guest: -> next CBW | per command |")
    print("|---|---|---|---|---|---|---|---|")
    extra = []
    for name, ev in (("ours (vfio-user)", ours(sys.argv[1])), ("QEMU qemu-xhci", qemu(sys.argv[2]))):
        rows, irq_lat, read_rt = phases(ev)
        for d in ("write", "read"):
            r = [x for x in rows if x[0] == d]
            if not r:
                continue
            med = [st.median(x[i] for x in r) for i in range(1, 6)]
            print(f"| {name} | {d} | {len(r)} | " + " | ".join(f"{m:.0f} us" for m in med) + " |")
        if read_rt:
            extra.append(f"{name}: one register read (ERDP lo -> hi) {st.median(read_rt):.0f} us")
        if irq_lat:
            extra.append(f"{name}: interrupt signalled -> first USBSTS read {st.median(irq_lat):.0f} us")
    for e in extra:
        print("- " + e)


if __name__ == "__main__":
    main()
