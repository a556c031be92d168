//! Fuzzes the Xen ioreq server against the simulated hypervisor
//! (`devmodel::xen::fake`): the input becomes what the guest's vCPUs put in
//! their ioreq slots and the event-channel notifications, served by our
//! server with a real xHCI (a high-speed stick and a SuperSpeed stick with
//! UAS) behind it and guest RAM in the fake (16 MiB, with a hole at
//! 8-9 MiB the map cache cannot map).
//!
//! Input: byte 0 picks 1-4 vCPUs, the next (at most 16 KiB) seeds guest RAM
//! at 0. A prelude places BAR 0, enables decoding and brings the xHCI up
//! (DCBAA, command ring, event ring, run) through ioreqs. Then at most
//! [`MAX_OPS`] operations:
//!
//! - a request in a vCPU's slot: type (mostly COPY/PIO/PCI_CONFIG/
//!   INVALIDATE/TIMEOFFSET), size, addr (mostly inside BAR 0 or our config
//!   space), data (a guest address when `data_is_ptr`), count, direction,
//!   `df`, `data_is_ptr`, and the state byte (mostly READY); its port is
//!   notified most of the time;
//! - a notification alone; the server serving its ports; Xen taking the
//!   answers (IORESP_READY -> NONE); a guest RAM patch.
//!
//! Checked: after the server has served its ports no slot is left READY,
//! and after teardown every range and port it claimed is released.
#![no_main]

use std::sync::atomic::Ordering;

use devmodel::xen::abi;
use devmodel::xen::fake::{FakeBus, FakeEvtchn, FakeXen};
use devmodel::xen::hv::Sbdf;
use devmodel::xen::server::XenServer;
use hcd_emul::usb::Speed;
use hcd_emul::xhci::regs::*;
use hcd_emul::xhci::Xhci;
use hcd_emul::UsbStorage;
use hcd_emul_fuzz::{image, run_small_stack};
use libfuzzer_sys::arbitrary::{Result as AResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, MmapRegion, VolatileMemory};

const MAX_OPS: usize = 128;
const SEED: usize = 16 << 10;
const GUEST: u64 = 16 << 20;
const HOLE: std::ops::Range<u64> = 0x800..0x900;
const BAR0: u64 = 0xf000_0000;
const SBDF: Sbdf = Sbdf {
    seg: 0,
    bus: 0,
    dev: 0x1e,
    func: 0,
};

#[derive(Debug, Clone, Copy, Default)]
struct Req {
    ty: u8,
    addr: u64,
    data: u64,
    count: u32,
    size: u32,
    read: bool,
    ptr: bool,
    df: bool,
}

fn sbdf() -> u64 {
    SBDF.range_value()
}

/// Writes `r` into vCPU `v`'s slot with state `state`, as Xen does.
fn post(page: &MmapRegion, v: u32, r: Req, state: u8) {
    let s = page.as_volatile_slice();
    let b = v as usize * abi::IOREQ_SLOT_SIZE;
    let _ = s.write_obj(r.addr, b + abi::IOREQ_OFF_ADDR);
    let _ = s.write_obj(r.data, b + abi::IOREQ_OFF_DATA);
    let _ = s.write_obj(r.count, b + abi::IOREQ_OFF_COUNT);
    let _ = s.write_obj(r.size, b + abi::IOREQ_OFF_SIZE);
    let _ = s.store(r.ty, b + abi::IOREQ_OFF_TYPE, Ordering::Relaxed);
    let mut f = state & abi::IOREQ_FLAG_STATE_MASK;
    if r.ptr {
        f |= abi::IOREQ_FLAG_DATA_IS_PTR;
    }
    if r.read {
        f |= abi::IOREQ_FLAG_DIR_READ;
    }
    if r.df {
        f |= abi::IOREQ_FLAG_DF;
    }
    let _ = s.store(f, b + abi::IOREQ_OFF_FLAGS, Ordering::Release);
}

fn state(page: &MmapRegion, v: u32) -> u8 {
    page.as_volatile_slice()
        .load::<u8>(
            v as usize * abi::IOREQ_SLOT_SIZE + abi::IOREQ_OFF_FLAGS,
            Ordering::Acquire,
        )
        .unwrap_or(0)
        & abi::IOREQ_FLAG_STATE_MASK
}

/// Xen takes the answer: the slot goes back to NONE.
fn ack(page: &MmapRegion, v: u32) {
    if state(page, v) == abi::STATE_IORESP_READY {
        let at = v as usize * abi::IOREQ_SLOT_SIZE + abi::IOREQ_OFF_FLAGS;
        let s = page.as_volatile_slice();
        let f = s.load::<u8>(at, Ordering::Acquire).unwrap_or(0);
        let _ = s.store(f & !abi::IOREQ_FLAG_STATE_MASK, at, Ordering::Release);
    }
}

fn req(u: &mut Unstructured) -> AResult<Req> {
    let ty = match u.int_in_range(0u8..=15)? {
        0..=6 => abi::IOREQ_TYPE_COPY,
        7 | 8 => abi::IOREQ_TYPE_PIO,
        9..=11 => abi::IOREQ_TYPE_PCI_CONFIG,
        12 => abi::IOREQ_TYPE_INVALIDATE,
        13 => abi::IOREQ_TYPE_TIMEOFFSET,
        _ => u.arbitrary()?,
    };
    let size = if u.ratio(15u8, 16)? {
        *u.choose(&[1u32, 2, 4, 8])?
    } else {
        u.arbitrary()?
    };
    let near = u.ratio(7u8, 8)?;
    let addr = match ty {
        abi::IOREQ_TYPE_COPY if near => {
            BAR0 + u64::from(u.int_in_range(0u32..=BAR0_SIZE as u32 + 64)?) / u64::from(size.max(1))
                * u64::from(size.max(1))
        }
        abi::IOREQ_TYPE_PCI_CONFIG if near => {
            let sb = if u.ratio(15u8, 16)? {
                sbdf()
            } else {
                u64::from(u.arbitrary::<u16>()?)
            };
            sb << 32 | u64::from(u.int_in_range(0u32..=4100)?)
        }
        abi::IOREQ_TYPE_PIO if near => u64::from(u.arbitrary::<u16>()?),
        _ => u.arbitrary()?,
    };
    let ptr = u.ratio(1u8, 4)?;
    let data = if ptr && near {
        u64::from(u.int_in_range(0u32..=(GUEST as u32 + 4096))?)
    } else {
        u.arbitrary()?
    };
    let count = match u.int_in_range(0u8..=7)? {
        0..=4 => 1,
        5 | 6 => u.int_in_range(0u32..=16)?,
        _ => u.arbitrary()?,
    };
    Ok(Req {
        ty,
        addr,
        data,
        count,
        size,
        read: u.arbitrary()?,
        ptr,
        df: u.ratio(1u8, 8)?,
    })
}

fn stick(speed: Speed) -> Option<Box<UsbStorage>> {
    UsbStorage::from_file(image(), false, speed)
        .ok()
        .map(|s| Box::new(s.with_uas(speed == Speed::Super)))
}

fn run(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let vcpus = u32::from(first % 4) + 1;
    let xen = FakeXen::new(vcpus, GUEST, HOLE);
    let bus = FakeBus::new();
    let seed = (rest.len() / 2).min(SEED);
    let guest = xen.guest();
    let _ = guest.as_volatile_slice().write_slice(&rest[..seed], 0);
    let page = xen.page();
    let mut server = XenServer::new(
        xen.clone(),
        Box::new(FakeEvtchn::new(bus.clone())),
        SBDF,
        |ram, waker| {
            let mut x = Xhci::new(ram);
            x.completion_queue().set_waker(waker);
            for sp in [Speed::High, Speed::Super] {
                if let Some(d) = stick(sp) {
                    let _ = x.attach(d);
                }
            }
            x
        },
    )
    .expect("ioreq server on the fake hypervisor");

    // Prelude through vCPU 0: BAR 0, decoding + bus master, xHCI bring-up.
    let do_req = |server: &mut XenServer<Xhci>, r: Req| {
        post(&page, 0, r, abi::STATE_IOREQ_READY);
        let _ = bus.try_fire(FakeXen::remote_port(0));
        server.serve_ports();
        ack(&page, 0);
    };
    let cfg = |reg: u64, size: u32, data: u64| Req {
        ty: abi::IOREQ_TYPE_PCI_CONFIG,
        addr: sbdf() << 32 | reg,
        data,
        count: 1,
        size,
        ..Default::default()
    };
    let mmio = |off: u64, data: u32| Req {
        ty: abi::IOREQ_TYPE_COPY,
        addr: BAR0 + off,
        data: data.into(),
        count: 1,
        size: 4,
        ..Default::default()
    };
    do_req(&mut server, cfg(0x10, 4, BAR0));
    do_req(&mut server, cfg(0x14, 4, 0));
    do_req(&mut server, cfg(0x04, 2, 6));
    let op = CAP_LENGTH;
    let ir0 = RUNTIME_OFFSET + RT_IR0;
    let _ = guest.as_volatile_slice().write_obj(0x4000u64, 0x3000);
    let _ = guest.as_volatile_slice().write_obj(64u32, 0x3008);
    for (off, v) in [
        (op + OP_CONFIG, MAX_SLOTS as u32),
        (op + OP_DCBAAP, 0x1000),
        (op + OP_CRCR, 0x2001),
        (ir0 + 8, 1),
        (ir0 + 0x18, 0x4000),
        (ir0 + 0x10, 0x3000),
        (ir0, IMAN_IE),
        (op + OP_USBCMD, USBCMD_RS | USBCMD_INTE),
    ] {
        do_req(&mut server, mmio(off, v));
    }

    let mut u = Unstructured::new(&rest[seed..]);
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let Ok(op) = u.int_in_range(0u8..=15) else {
            break;
        };
        let v = u.int_in_range(0..=vcpus - 1).unwrap_or(0);
        match op {
            0..=8 => {
                let Ok(r) = req(&mut u) else { break };
                let st = if u.ratio(15u8, 16).unwrap_or(true) {
                    abi::STATE_IOREQ_READY
                } else {
                    u.arbitrary().unwrap_or(0)
                };
                post(&page, v, r, st);
                if u.ratio(7u8, 8).unwrap_or(true) {
                    let _ = bus.try_fire(FakeXen::remote_port(v));
                }
                if u.ratio(3u8, 4).unwrap_or(true) {
                    server.serve_ports();
                    ack(&page, v);
                }
            }
            9 => {
                let _ = bus.try_fire(FakeXen::remote_port(v));
            }
            10 | 11 => server.serve_ports(),
            12 => {
                for w in 0..vcpus {
                    ack(&page, w);
                }
            }
            13 => server.process(),
            _ => {
                // Guest RAM: a few bytes anywhere (the hole included; the
                // fake backs it with a separate file nobody maps).
                let Ok(at) = u.int_in_range(0u32..=GUEST as u32 - 1) else {
                    break;
                };
                let n = u.int_in_range(1usize..=16).unwrap_or(1);
                let b = u.bytes(n.min(u.len())).unwrap_or(&[]);
                let _ = guest.as_volatile_slice().write_slice(b, at as usize);
            }
        }
        if matches!(op, 10 | 11) {
            for w in 0..vcpus {
                assert_ne!(
                    state(&page, w),
                    abi::STATE_IOREQ_READY,
                    "vCPU {w}'s request left unanswered after serve_ports"
                );
            }
        }
    }
    server.serve_ports();
    drop(server);
    let rec = xen.rec();
    assert!(
        rec.ranges.is_empty(),
        "ranges left claimed: {:?}",
        rec.ranges
    );
    assert!(rec.destroyed && !rec.enabled);
    assert_eq!(bus.bound(), 0, "event channels left bound");
}

fuzz_target!(|data: &[u8]| {
    run_small_stack(data, run);
});
