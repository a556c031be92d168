#!/usr/bin/env python3
"""Reads a stick's USB capture (xen-usb-dm's `capture = ...`, usbmon pcap)
back with tshark and checks it against what the guest did.

Usage: capture-check.py PCAP GUEST_LOG LABEL

tshark decodes the file as it decodes a usbmon capture of a real host
(USB, USB mass storage, SCSI dissectors); from its fields:
  - every submitted URB ('S') has exactly one completion ('C');
  - per enumeration (a session starts at each SET_CONFIGURATION: the
    firmware's, the guest kernel's, the kernel's again after the rebind),
    every Bulk-Only CBW is answered by a CSW with the same tag, and the
    data the device moved in between equals dCBWDataTransferLength minus
    the CSW's residue;
  - the bytes of the READ and WRITE commands of the last sessions, one per
    DISKSTAT line of the guest (the block layer's sectors read and written,
    /sys/block/sda/stat, printed before the disk went away), equal them
    (not counting sd's own read of block 0 right after READ CAPACITY,
    which bypasses the block layer).
Prints RESULT lines (PASS/FAIL) in the guest matrix's format.
"""
import subprocess
import sys

FIELDS = [
    "frame.number", "usb.urb_type", "usb.urb_id", "usb.endpoint_address",
    "usb.transfer_type", "usb.urb_status", "usb.urb_len", "usb.setup.bRequest",
    "usbms.dCBWSignature", "usbms.dCBWTag", "usbms.dCBWDataTransferLength",
    "usbms.dCBWFlags", "usbms.dCSWSignature", "usbms.dCSWDataResidue",
    "usbms.dCSWStatus", "scsi_sbc.opcode",
]
READS = {0x28, 0xA8, 0x88}
WRITES = {0x2A, 0xAA, 0x8A}


def num(s):
    if not s:
        return None
    s = s.split(",")[0]
    return int(s, 16) if s.startswith("0x") else int(s)


def main():
    pcap, log, label = sys.argv[1:4]
    results = []

    def res(name, ok, detail):
        results.append(f"  [{label}] RESULT {name} {'PASS' if ok else 'FAIL'} {detail}")

    out = subprocess.run(
        ["tshark", "-r", pcap, "-T", "fields", "-E", "separator=/t", "-E", "occurrence=f"]
        + sum((["-e", f] for f in FIELDS), []),
        capture_output=True, text=True, check=False)
    if out.returncode != 0:
        res("capture_tshark", False, out.stderr.strip().splitlines()[-1:] or "tshark failed")
        print("\n".join(results))
        return 1
    rows = []
    for line in out.stdout.splitlines():
        v = line.split("\t")
        v += [""] * (len(FIELDS) - len(v))
        rows.append(dict(zip(FIELDS, v)))
    res("capture_tshark", len(rows) > 0, f"{len(rows)} records decoded")

    # Every S has exactly one C, after it.
    open_urbs, bad = {}, []
    for r in rows:
        uid, t = r["usb.urb_id"], r["usb.urb_type"].strip("'")
        if t == "S":
            if uid in open_urbs:
                bad.append(f"frame {r['frame.number']}: urb {uid} submitted twice")
            open_urbs[uid] = r
        elif t == "C":
            if open_urbs.pop(uid, None) is None:
                bad.append(f"frame {r['frame.number']}: completion without submission")
    bad += [f"urb {u} never completed" for u in open_urbs]
    res("capture_pairs", not bad, "; ".join(bad[:3]) or
        f"{sum(1 for r in rows if r['usb.urb_type'].strip(chr(39)) == 'S')} URBs, each completed once")

    # Sessions and BOT commands.
    sessions = [[]]
    cbw, cbw_urb, moved = None, None, 0
    problems, commands = [], 0
    for r in rows:
        t = r["usb.urb_type"].strip("'")
        ep = num(r["usb.endpoint_address"])
        if t == "S" and num(r["usb.transfer_type"]) == 2 and num(r["usb.setup.bRequest"]) == 9 \
                and ep == 0x00:
            sessions.append([])
            cbw = None
            continue
        if t == "S" and num(r["usbms.dCBWSignature"]) == 0x43425355:
            if cbw is not None:
                problems.append(f"frame {r['frame.number']}: CBW tag {cbw['tag']:#x} got no CSW")
            cbw = {"tag": num(r["usbms.dCBWTag"]), "len": num(r["usbms.dCBWDataTransferLength"]),
                   "in": (num(r["usbms.dCBWFlags"]) or 0) & 0x80 != 0,
                   "op": num(r["scsi_sbc.opcode"]), "frame": r["frame.number"]}
            cbw_urb, moved = r["usb.urb_id"], 0
            continue
        if t != "C" or cbw is None or num(r["usb.transfer_type"]) != 3:
            continue
        if r["usb.urb_id"] == cbw_urb:
            continue  # the CBW's own completion
        if num(r["usbms.dCSWSignature"]) == 0x53425355:
            tag, residue, status = num(r["usbms.dCBWTag"]), num(r["usbms.dCSWDataResidue"]), \
                num(r["usbms.dCSWStatus"])
            commands += 1
            if tag != cbw["tag"]:
                problems.append(f"frame {r['frame.number']}: CSW tag {tag:#x} for CBW {cbw['tag']:#x}")
            elif moved != cbw["len"] - residue:
                problems.append(f"frame {r['frame.number']}: {moved} bytes moved, CBW {cbw['len']} "
                                f"residue {residue}")
            sessions[-1].append((cbw, moved, status))
            cbw = None
            continue
        want_ep = 0x81 if cbw["in"] else 0x02
        if ep == want_ep and num(r["usb.urb_status"]) == 0:
            moved += num(r["usb.urb_len"]) or 0
    res("capture_bot", commands > 0 and not problems, "; ".join(problems[:3]) or
        f"{commands} commands in {len(sessions) - 1} enumerations: every CBW answered by its CSW, "
        "data lengths = CBW length - residue")

    # The kernel's sessions against the guest's block-layer counts.
    stats = []
    with open(log, errors="replace") as f:
        for line in f:
            if line.startswith("DISKSTAT "):
                _, rs, ws = line.split()[:3]
                stats.append((int(rs) * 512, int(ws) * 512))
    if not stats:
        res("capture_vs_guest", False, "no DISKSTAT line in the guest log")
    else:
        tail = sessions[-len(stats):]
        got, probes = [], 0
        for sess in tail:
            rd = wr = 0
            prev = None
            for c, m, s in sess:
                # sd's revalidation reads block 0 right after READ
                # CAPACITY(10/16) itself (sd_read_block_zero), outside the
                # block layer and so outside /sys/block/sda/stat.
                if c["op"] in READS and prev in (0x25, 0x9E) and c["len"] <= 4096:
                    probes += 1
                elif c["op"] in READS and s == 0:
                    rd += m
                elif c["op"] in WRITES and s == 0:
                    wr += m
                prev = c["op"]
            got.append((rd, wr))
        res("capture_vs_guest", got == stats,
            f"read/write bytes per enumeration: capture {got}, guest block layer {stats} "
            f"({probes} revalidation reads of sd not counted by the block layer)")
    print("\n".join(results))
    return 0 if all(" PASS " in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
