//! Checks `devmodel::xen::abi` against Xen's own C headers.
//!
//! Builds a small C program that includes the headers of Debian's
//! `libxen-dev` (`xen/hvm/dm_op.h`, `xen/hvm/ioreq.h`, `xen/sys/privcmd.h`,
//! `xen/sys/evtchn.h`, ...), has it print `name value` for every size,
//! alignment, offset, constant and ioctl number we transcribed, and
//! compares each line with the Rust value. Without a C compiler (`$CC` or
//! `cc`) the test fails; without the headers it is not built and cargo
//! warns (devmodel/build.rs), except under the README's test command
//! (`XEN_USB_DM_REQUIRE_XEN_HEADERS=1`), whose build then stops: install
//! both with `scripts/setup.sh` (packages `gcc`, `libxen-dev`).
#![cfg(xen_headers)]

use std::fmt::Write as _;
use std::mem::{align_of, offset_of, size_of};
use std::process::Command;

use devmodel::xen::abi::*;
use devmodel::xen::hv::Sbdf;

/// One check: a C expression (also its label) and the Rust value.
struct Check {
    c: String,
    rust: u64,
}

#[derive(Default)]
struct Table(Vec<Check>);

impl Table {
    fn add(&mut self, c: impl Into<String>, rust: impl TryInto<u64>) {
        let rust = rust
            .try_into()
            .unwrap_or_else(|_| panic!("value does not fit u64"));
        self.0.push(Check { c: c.into(), rust });
    }
}

/// `sizeof` and `_Alignof` of a C type against a Rust type.
macro_rules! ty {
    ($t:ident, $c:expr, $r:ty) => {
        $t.add(format!("sizeof({})", $c), size_of::<$r>());
        $t.add(format!("_Alignof({})", $c), align_of::<$r>());
    };
}

/// `offsetof` of C fields against Rust fields, pairwise.
macro_rules! off {
    ($t:ident, $c:expr, $r:ty, $($cf:ident => $rf:ident),+ $(,)?) => {$(
        $t.add(
            format!("offsetof({}, {})", $c, stringify!($cf)),
            offset_of!($r, $rf),
        );
    )+};
}

/// Constants whose C and Rust spellings differ.
macro_rules! consts {
    ($t:ident, $($c:expr => $r:expr),+ $(,)?) => {$(
        $t.add($c, $r);
    )+};
}

fn table() -> Table {
    let mut t = Table::default();

    // --- basic types
    ty!(t, "domid_t", DomId);
    ty!(t, "ioservid_t", IoServId);
    ty!(t, "xen_pfn_t", XenPfn);

    // --- dm_op.h
    ty!(t, "struct xen_dm_op", XenDmOp);
    off!(t, "struct xen_dm_op", XenDmOp, op => op, pad => pad, u => u);
    t.add("sizeof(((struct xen_dm_op *)0)->u)", size_of::<XenDmOpU>());
    t.add(
        "__alignof__(((struct xen_dm_op *)0)->u)",
        align_of::<XenDmOpU>(),
    );

    let c = "struct xen_dm_op_create_ioreq_server";
    ty!(t, c, XenDmOpCreateIoreqServer);
    off!(t, c, XenDmOpCreateIoreqServer, handle_bufioreq => handle_bufioreq, pad => pad, id => id);
    let c = "struct xen_dm_op_ioreq_server_range";
    ty!(t, c, XenDmOpIoreqServerRange);
    off!(t, c, XenDmOpIoreqServerRange,
        id => id, pad => pad, type => type_, start => start, end => end);
    let c = "struct xen_dm_op_set_ioreq_server_state";
    ty!(t, c, XenDmOpSetIoreqServerState);
    off!(t, c, XenDmOpSetIoreqServerState, id => id, enabled => enabled, pad => pad);
    let c = "struct xen_dm_op_destroy_ioreq_server";
    ty!(t, c, XenDmOpDestroyIoreqServer);
    off!(t, c, XenDmOpDestroyIoreqServer, id => id, pad => pad);
    let c = "struct xen_dm_op_set_pci_intx_level";
    ty!(t, c, XenDmOpSetPciIntxLevel);
    off!(t, c, XenDmOpSetPciIntxLevel,
        domain => domain, bus => bus, device => device, intx => intx, level => level);
    let c = "struct xen_dm_op_set_isa_irq_level";
    ty!(t, c, XenDmOpSetIsaIrqLevel);
    off!(t, c, XenDmOpSetIsaIrqLevel, isa_irq => isa_irq, level => level);
    let c = "struct xen_dm_op_modified_memory";
    ty!(t, c, XenDmOpModifiedMemory);
    off!(t, c, XenDmOpModifiedMemory, nr_extents => nr_extents, opaque => opaque);
    let c = "struct xen_dm_op_modified_memory_extent";
    ty!(t, c, XenDmOpModifiedMemoryExtent);
    off!(t, c, XenDmOpModifiedMemoryExtent, nr => nr, pad => pad, first_pfn => first_pfn);
    let c = "struct xen_dm_op_inject_msi";
    ty!(t, c, XenDmOpInjectMsi);
    off!(t, c, XenDmOpInjectMsi, data => data, pad => pad, addr => addr);
    let c = "struct xen_dm_op_get_ioreq_server_info";
    ty!(t, c, XenDmOpGetIoreqServerInfo);
    off!(t, c, XenDmOpGetIoreqServerInfo,
        id => id, flags => flags, bufioreq_port => bufioreq_port,
        ioreq_gfn => ioreq_gfn, bufioreq_gfn => bufioreq_gfn);
    let c = "struct xen_dm_op_nr_vcpus";
    ty!(t, c, XenDmOpNrVcpus);
    off!(t, c, XenDmOpNrVcpus, vcpus => vcpus);

    consts!(t,
        "XEN_DMOP_create_ioreq_server" => XEN_DMOP_CREATE_IOREQ_SERVER,
        "XEN_DMOP_get_ioreq_server_info" => XEN_DMOP_GET_IOREQ_SERVER_INFO,
        "XEN_DMOP_map_io_range_to_ioreq_server" => XEN_DMOP_MAP_IO_RANGE_TO_IOREQ_SERVER,
        "XEN_DMOP_unmap_io_range_from_ioreq_server" => XEN_DMOP_UNMAP_IO_RANGE_FROM_IOREQ_SERVER,
        "XEN_DMOP_set_ioreq_server_state" => XEN_DMOP_SET_IOREQ_SERVER_STATE,
        "XEN_DMOP_destroy_ioreq_server" => XEN_DMOP_DESTROY_IOREQ_SERVER,
        "XEN_DMOP_set_pci_intx_level" => XEN_DMOP_SET_PCI_INTX_LEVEL,
        "XEN_DMOP_set_isa_irq_level" => XEN_DMOP_SET_ISA_IRQ_LEVEL,
        "XEN_DMOP_modified_memory" => XEN_DMOP_MODIFIED_MEMORY,
        "XEN_DMOP_inject_msi" => XEN_DMOP_INJECT_MSI,
        "XEN_DMOP_nr_vcpus" => XEN_DMOP_NR_VCPUS,
        "XEN_DMOP_no_gfns" => XEN_DMOP_NO_GFNS,
        "XEN_DMOP_IO_RANGE_PORT" => XEN_DMOP_IO_RANGE_PORT,
        "XEN_DMOP_IO_RANGE_MEMORY" => XEN_DMOP_IO_RANGE_MEMORY,
        "XEN_DMOP_IO_RANGE_PCI" => XEN_DMOP_IO_RANGE_PCI,
        "HVM_IOREQSRV_BUFIOREQ_OFF" => HVM_IOREQSRV_BUFIOREQ_OFF,
        "DOMID_INVALID" => DOMID_INVALID,
    );
    for (s, b, d, f) in [(0, 0, 0x1f, 0), (0x1234, 0xab, 0x0d, 5), (0, 1, 0x3f, 0xf)] {
        let sbdf = Sbdf {
            seg: s,
            bus: b,
            dev: d,
            func: f,
        };
        t.add(
            format!("XEN_DMOP_PCI_SBDF({s:#x}, {b:#x}, {d:#x}, {f:#x})"),
            sbdf.range_value(),
        );
        t.add(
            format!("XEN_DMOP_PCI_SBDF({s:#x}, {b:#x}, {d:#x}, {f:#x}) + 0"),
            xen_dmop_pci_sbdf(s, b, d, f),
        );
    }

    // --- memory.h
    consts!(t,
        "XENMEM_resource_ioreq_server" => XENMEM_RESOURCE_IOREQ_SERVER,
        "XENMEM_resource_ioreq_server_frame_bufioreq" => XENMEM_RESOURCE_IOREQ_SERVER_FRAME_BUFIOREQ,
        "XENMEM_resource_ioreq_server_frame_ioreq(0)" => xenmem_resource_ioreq_server_frame_ioreq(0),
        "XENMEM_resource_ioreq_server_frame_ioreq(3)" => xenmem_resource_ioreq_server_frame_ioreq(3),
    );

    // --- ioreq.h
    ty!(t, "struct ioreq", Ioreq);
    t.add("sizeof(struct ioreq) + 0", IOREQ_SLOT_SIZE);
    off!(t, "struct ioreq", Ioreq,
        addr => addr, data => data, count => count, size => size,
        vp_eport => vp_eport, _pad0 => pad0, type => type_);
    consts!(t,
        "offsetof(struct ioreq, addr) + 0" => IOREQ_OFF_ADDR,
        "offsetof(struct ioreq, data) + 0" => IOREQ_OFF_DATA,
        "offsetof(struct ioreq, count) + 0" => IOREQ_OFF_COUNT,
        "offsetof(struct ioreq, size) + 0" => IOREQ_OFF_SIZE,
        "offsetof(struct ioreq, vp_eport) + 0" => IOREQ_OFF_VP_EPORT,
        "offsetof(struct ioreq, type) + 0" => IOREQ_OFF_TYPE,
    );
    // Bitfields: the C side sets one field to all ones in a zeroed ioreq
    // and reports `byte_index * 256 + byte_value` of the only non-zero byte.
    let bit = |f: IoreqFlags| IOREQ_OFF_FLAGS * 256 + usize::from(f.encode());
    let none = IoreqFlags::default();
    consts!(t,
        "IOREQ_BITPOS(state, 0xf)" => bit(IoreqFlags { state: 0xf, ..none }),
        "IOREQ_BITPOS(data_is_ptr, 1)" => bit(IoreqFlags { data_is_ptr: true, ..none }),
        "IOREQ_BITPOS(dir, 1)" => bit(IoreqFlags { read: true, ..none }),
        "IOREQ_BITPOS(dir, IOREQ_READ)" => IOREQ_OFF_FLAGS * 256 + usize::from(IOREQ_FLAG_DIR_READ),
        "IOREQ_BITPOS(df, 1)" => bit(IoreqFlags { df: true, ..none }),
        "IOREQ_BITPOS(state, STATE_IORESP_READY)" => bit(IoreqFlags { state: STATE_IORESP_READY, ..none }),
        "IOREQ_BITPOS(_pad1, 1)" => IOREQ_OFF_FLAGS * 256 + 0x80,
    );
    consts!(t,
        "IOREQ_READ" => IOREQ_READ,
        "IOREQ_WRITE" => IOREQ_WRITE,
        "STATE_IOREQ_NONE" => STATE_IOREQ_NONE,
        "STATE_IOREQ_READY" => STATE_IOREQ_READY,
        "STATE_IOREQ_INPROCESS" => STATE_IOREQ_INPROCESS,
        "STATE_IORESP_READY" => STATE_IORESP_READY,
        "IOREQ_TYPE_PIO" => IOREQ_TYPE_PIO,
        "IOREQ_TYPE_COPY" => IOREQ_TYPE_COPY,
        "IOREQ_TYPE_PCI_CONFIG" => IOREQ_TYPE_PCI_CONFIG,
        "IOREQ_TYPE_TIMEOFFSET" => IOREQ_TYPE_TIMEOFFSET,
        "IOREQ_TYPE_INVALIDATE" => IOREQ_TYPE_INVALIDATE,
    );

    // --- privcmd.h
    let c = "privcmd_dm_op_buf_t";
    ty!(t, c, PrivcmdDmOpBuf);
    off!(t, c, PrivcmdDmOpBuf, uptr => uptr, size => size);
    let c = "privcmd_dm_op_t";
    ty!(t, c, PrivcmdDmOp);
    off!(t, c, PrivcmdDmOp, dom => dom, num => num, ubufs => ubufs);
    let c = "privcmd_mmap_resource_t";
    ty!(t, c, PrivcmdMmapResource);
    off!(t, c, PrivcmdMmapResource,
        dom => dom, type => type_, id => id, idx => idx, num => num, addr => addr);
    let c = "privcmd_mmapbatch_v2_t";
    ty!(t, c, PrivcmdMmapBatchV2);
    off!(t, c, PrivcmdMmapBatchV2,
        num => num, dom => dom, addr => addr, arr => arr, err => err);
    t.add(
        "sizeof(*((privcmd_mmapbatch_v2_t *)0)->err)",
        size_of::<std::os::raw::c_int>(),
    );
    consts!(t,
        "IOCTL_PRIVCMD_MMAPBATCH_V2" => IOCTL_PRIVCMD_MMAPBATCH_V2,
        "IOCTL_PRIVCMD_DM_OP" => IOCTL_PRIVCMD_DM_OP,
        "IOCTL_PRIVCMD_RESTRICT" => IOCTL_PRIVCMD_RESTRICT,
        "IOCTL_PRIVCMD_MMAP_RESOURCE" => IOCTL_PRIVCMD_MMAP_RESOURCE,
    );

    // --- evtchn.h
    let c = "struct ioctl_evtchn_bind_interdomain";
    ty!(t, c, IoctlEvtchnBindInterdomain);
    off!(t, c, IoctlEvtchnBindInterdomain,
        remote_domain => remote_domain, remote_port => remote_port);
    let c = "struct ioctl_evtchn_unbind";
    ty!(t, c, IoctlEvtchnUnbind);
    off!(t, c, IoctlEvtchnUnbind, port => port);
    let c = "struct ioctl_evtchn_notify";
    ty!(t, c, IoctlEvtchnNotify);
    off!(t, c, IoctlEvtchnNotify, port => port);
    let c = "struct ioctl_evtchn_restrict_domid";
    ty!(t, c, IoctlEvtchnRestrictDomid);
    off!(t, c, IoctlEvtchnRestrictDomid, domid => domid);
    consts!(t,
        "IOCTL_EVTCHN_BIND_INTERDOMAIN" => IOCTL_EVTCHN_BIND_INTERDOMAIN,
        "IOCTL_EVTCHN_UNBIND" => IOCTL_EVTCHN_UNBIND,
        "IOCTL_EVTCHN_NOTIFY" => IOCTL_EVTCHN_NOTIFY,
        "IOCTL_EVTCHN_RESTRICT_DOMID" => IOCTL_EVTCHN_RESTRICT_DOMID,
    );
    t
}

const PRELUDE: &str = r#"
/* dm_op.h and the tools-only parts of xen.h need __XEN_TOOLS__. */
#define __XEN_TOOLS__ 1
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <xen/xen.h>
#include <xen/memory.h>
#include <xen/hvm/hvm_op.h>
#include <xen/hvm/dm_op.h>
#include <xen/hvm/ioreq.h>
#include <xen/sys/privcmd.h>
#include <xen/sys/evtchn.h>

/* byte_index * 256 + value of the only non-zero byte of *p, or ~0. */
static unsigned long long only_byte(const void *p, size_t n)
{
    const unsigned char *b = p;
    unsigned long long r = ~0ULL;
    size_t i;
    for (i = 0; i < n; i++) {
        if (b[i]) {
            if (r != ~0ULL)
                return ~0ULL;
            r = i * 256ULL + b[i];
        }
    }
    return r;
}

#define IOREQ_BITPOS(field, v) \
    ({ struct ioreq r_; memset(&r_, 0, sizeof(r_)); r_.field = (v); \
       only_byte(&r_, sizeof(r_)); })

int main(void)
{
"#;

fn c_program(t: &Table) -> String {
    let mut s = String::from(PRELUDE);
    for (i, c) in t.0.iter().enumerate() {
        writeln!(
            s,
            "    printf(\"{i} %llu\\n\", (unsigned long long)({}));",
            c.c
        )
        .unwrap();
    }
    s.push_str("    return 0;\n}\n");
    s
}

#[test]
fn abi_matches_xen_headers() {
    let t = table();
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path().join("xen_abi.c");
    let exe = dir.path().join("xen_abi");
    std::fs::write(&src, c_program(&t)).expect("write C source");

    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let mut cmd = Command::new(&cc);
    // (the directory devmodel/build.rs found the headers in, if not the default)
    if let Ok(dir) = std::env::var("XEN_INCLUDE_DIR") {
        cmd.arg(format!("-I{dir}"));
    }
    let out = cmd
        .arg("-std=gnu11")
        .arg("-Wall")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "xen_abi: cannot run the C compiler `{cc}`: {e}.\n\
                 This test needs a C compiler and Xen's headers: run scripts/setup.sh \
                 (or apt-get install gcc libxen-dev)."
            )
        });
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let hint = if stderr.contains("xen/") && stderr.contains("No such file") {
            "Xen's headers are missing: install Debian's libxen-dev (scripts/setup.sh does)."
        } else {
            "The C program against Xen's headers did not compile (see above)."
        };
        panic!("xen_abi: `{cc}` failed ({}):\n{stderr}\n{hint}", out.status);
    }

    let run = Command::new(&exe).output().expect("run the ABI program");
    assert!(run.status.success(), "ABI program failed: {}", run.status);
    let stdout = String::from_utf8(run.stdout).expect("utf-8 output");
    let mut c_values = vec![None; t.0.len()];
    for line in stdout.lines() {
        let (i, v) = line.split_once(' ').expect("`index value` line");
        let i: usize = i.parse().expect("index");
        c_values[i] = Some(v.parse::<u64>().expect("value"));
    }

    let mut report = String::new();
    let mut bad = 0;
    for (c, got) in t.0.iter().zip(&c_values) {
        let ok = *got == Some(c.rust);
        bad += usize::from(!ok);
        writeln!(
            report,
            "{} {:<58} C {:>12} Rust {:>12}",
            if ok { "  " } else { "!!" },
            c.c,
            got.map_or("-".to_string(), |v| format!("{v:#x}")),
            format!("{:#x}", c.rust)
        )
        .unwrap();
    }
    println!("{report}");
    assert_eq!(
        bad,
        0,
        "{bad} of {} ABI values differ from Xen's headers:\n{report}",
        t.0.len()
    );
}
