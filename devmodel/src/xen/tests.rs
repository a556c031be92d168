//! The ioreq protocol end to end against the simulated hypervisor: a real
//! xHCI (with a stick) behind the server, guest vCPUs posting requests in
//! their slots from other threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hcd_emul::usb::Speed;
use hcd_emul::xhci::Xhci;
use hcd_emul::UsbStorage;

use super::abi;
use super::fake::{guest_read, guest_write, FakeBus, FakeEvtchn, FakeVcpu, FakeXen, Req};
use super::hv::{IoRange, Sbdf};
use super::server::{Exit, XenServer, XenStats};

const SBDF: Sbdf = Sbdf {
    seg: 0,
    bus: 0,
    dev: 0x1e,
    func: 0,
};
const BAR0: u64 = 0xf000_0000;
const GUEST: u64 = 16 << 20;
/// Frames 0x800..0x900 (8-9 MiB) are a hole.
const HOLE: std::ops::Range<u64> = 0x800..0x900;

struct Rig {
    xen: Arc<FakeXen>,
    bus: Arc<FakeBus>,
    stop: Arc<AtomicBool>,
    server: Option<JoinHandle<(Exit, XenStats)>>,
    _img: tempfile::NamedTempFile,
}

fn sbdf() -> u32 {
    SBDF.range_value() as u32
}

impl Rig {
    fn new(vcpus: u32) -> Self {
        let xen = FakeXen::new(vcpus, GUEST, HOLE);
        let bus = FakeBus::new();
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(4 << 20).unwrap();
        let path = img.path().to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let (x2, b2, s2) = (xen.clone(), bus.clone(), stop.clone());
        let server = std::thread::spawn(move || {
            let mut s = XenServer::new(x2, Box::new(FakeEvtchn::new(b2)), SBDF, |ram, waker| {
                let mut x = Xhci::new(ram);
                x.completion_queue().set_waker(waker);
                let dev = UsbStorage::open(&path, false, Speed::High).unwrap();
                x.attach(Box::new(dev)).unwrap();
                x
            })
            .unwrap();
            tx.send(()).unwrap();
            let exit = s.run(|| s2.load(Ordering::SeqCst)).unwrap();
            (exit, s.stats)
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Self {
            xen,
            bus,
            stop,
            server: Some(server),
            _img: img,
        }
    }

    fn vcpu(&self, v: u32) -> FakeVcpu {
        FakeVcpu::new(&self.xen, self.bus.clone(), v)
    }

    fn finish(mut self) -> (Exit, XenStats) {
        self.stop.store(true, Ordering::SeqCst);
        self.server.take().unwrap().join().unwrap()
    }

    /// Places BAR 0 at `addr` and enables memory decoding and bus mastering.
    fn enable(&self, c: &FakeVcpu, addr: u64) {
        c.cfg_write(sbdf(), 0x10, 4, addr & 0xffff_ffff);
        c.cfg_write(sbdf(), 0x14, 4, addr >> 32);
        c.cfg_write(sbdf(), 0x04, 2, 0x6);
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.server.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn setup_binds_every_vcpu_and_claims_the_function_teardown_undoes_it() {
    let rig = Rig::new(3);
    let r = rig.xen.rec();
    assert_eq!(r.servers_created, 1);
    assert!(r.enabled);
    assert_eq!(rig.bus.bound(), 3);
    assert_eq!(r.ranges, vec![(IoRange::Pci, 0xf0, 0xf0)]);
    let xen = rig.xen.clone();
    let bus = rig.bus.clone();
    rig.finish();
    let r = xen.rec();
    assert!(r.destroyed && !r.enabled);
    assert!(r.ranges.is_empty(), "{:?}", r.ranges);
    assert_eq!(bus.bound(), 0);
}

#[test]
fn config_space_bar_sizing_and_bar_claims_follow_the_guest() {
    let rig = Rig::new(1);
    let c = rig.vcpu(0);
    assert_eq!(c.cfg_read(sbdf(), 0, 4), 0x000d_1b36);
    assert_eq!(c.cfg_read(sbdf(), 0, 2), 0x1b36);
    assert_eq!(c.cfg_read(sbdf(), 2, 2), 0x000d);
    assert_eq!(c.cfg_read(sbdf(), 0x0b, 1), 0x0c, "class");
    // Another function (Xen would not send it): all ones.
    assert_eq!(c.cfg_read(sbdf() + 8, 0, 4), 0xffff_ffff);
    // BAR sizing as hvmloader does it: 16 KiB, 64-bit.
    c.cfg_write(sbdf(), 0x10, 4, 0xffff_ffff);
    assert_eq!(c.cfg_read(sbdf(), 0x10, 4) & 0xffff_fff0, 0xffff_c000);
    assert_eq!(c.cfg_read(sbdf(), 0x10, 4) & 0x6, 0x4, "64-bit BAR");
    assert_eq!(
        rig.xen.rec().ranges.len(),
        1,
        "nothing claimed while decoding is off"
    );
    rig.enable(&c, BAR0);
    let mem: Vec<_> = rig
        .xen
        .rec()
        .ranges
        .into_iter()
        .filter(|r| r.0 == IoRange::Memory)
        .collect();
    assert_eq!(mem, vec![(IoRange::Memory, BAR0, BAR0 + 0x3fff)]);
    // Move the BAR while decoding: the old range is released.
    c.cfg_write(sbdf(), 0x10, 4, 0xe000_0000);
    let mem: Vec<_> = rig
        .xen
        .rec()
        .ranges
        .into_iter()
        .filter(|r| r.0 == IoRange::Memory)
        .collect();
    assert_eq!(mem, vec![(IoRange::Memory, 0xe000_0000, 0xe000_3fff)]);
    // Decoding off: released.
    c.cfg_write(sbdf(), 0x04, 2, 0);
    assert_eq!(rig.xen.rec().ranges, vec![(IoRange::Pci, 0xf0, 0xf0)]);
    let (_, st) = rig.finish();
    assert!(st.config >= 10);
}

#[test]
fn mmio_single_and_rep_accesses_in_both_directions() {
    let rig = Rig::new(1);
    let c = rig.vcpu(0);
    rig.enable(&c, BAR0);
    let caplen = c.mmio_read(BAR0, 1);
    assert_eq!(caplen, 0x40);
    assert_eq!(c.mmio_read(BAR0 + 2, 2), 0x0120, "HCIVERSION 1.2");
    let hcs: Vec<u64> = (0..4).map(|i| c.mmio_read(BAR0 + 4 * i, 4)).collect();
    // rep read into guest memory (data_is_ptr), upwards...
    c.request(Req {
        ty: abi::IOREQ_TYPE_COPY,
        addr: BAR0,
        data: 0x1000,
        count: 4,
        size: 4,
        read: true,
        ptr: true,
        df: false,
    });
    let g = rig.xen.guest();
    let got: Vec<u64> = guest_read(&g, 0x1000, 16)
        .chunks(4)
        .map(|b| u64::from(u32::from_le_bytes(b.try_into().unwrap())))
        .collect();
    assert_eq!(got, hcs);
    // ...and downwards (df): item i at BAR0+12-4i lands at 0x2000+12-4i.
    c.request(Req {
        ty: abi::IOREQ_TYPE_COPY,
        addr: BAR0 + 12,
        data: 0x200c,
        count: 4,
        size: 4,
        read: true,
        ptr: true,
        df: true,
    });
    assert_eq!(guest_read(&g, 0x2000, 16), guest_read(&g, 0x1000, 16));
    // rep write from guest memory into the MSI-X table (vector 1).
    let entry: Vec<u8> = [0xfee0_1000u32, 0, 0x4077, 1]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    guest_write(&g, 0x3000, &entry);
    c.request(Req {
        ty: abi::IOREQ_TYPE_COPY,
        addr: BAR0 + 0x3010,
        data: 0x3000,
        count: 4,
        size: 4,
        ptr: true,
        ..Default::default()
    });
    assert_eq!(c.mmio_read(BAR0 + 0x3010, 4), 0xfee0_1000);
    assert_eq!(c.mmio_read(BAR0 + 0x3018, 4), 0x4077);
    assert_eq!(c.mmio_read(BAR0 + 0x3010, 8), 0xfee0_1000, "8-byte access");
    // Outside our BAR: reads as nothing there.
    assert_eq!(c.mmio_read(BAR0 + 0x4000, 4), 0xffff_ffff);
    // Port I/O: we claim no ports.
    let pio = c.request(Req {
        ty: abi::IOREQ_TYPE_PIO,
        addr: 0xc000,
        count: 1,
        size: 2,
        read: true,
        ..Default::default()
    });
    assert_eq!(pio, 0xffff);
    let (_, st) = rig.finish();
    assert!(st.mmio >= 20 && st.pio == 1, "{st:?}");
}

/// Sets up a command ring and an event ring in guest memory, MSI-X vector
/// 0, and runs the controller.
fn start_xhci(rig: &Rig, c: &FakeVcpu) {
    let g = rig.xen.guest();
    rig.enable(c, BAR0);
    // MSI-X: table entry 0, then enable in the capability.
    c.mmio_write(BAR0 + 0x3000, 4, 0xfee0_0000);
    c.mmio_write(BAR0 + 0x3004, 4, 0);
    c.mmio_write(BAR0 + 0x3008, 4, 0x4041);
    c.mmio_write(BAR0 + 0x300c, 4, 0);
    let mut cap = c.cfg_read(sbdf(), 0x34, 1) as u32;
    let mut msix = None;
    for _ in 0..16 {
        if cap == 0 {
            break;
        }
        if c.cfg_read(sbdf(), cap, 1) == 0x11 {
            msix = Some(cap);
        }
        cap = c.cfg_read(sbdf(), cap + 1, 1) as u32;
    }
    let msix = msix.expect("MSI-X capability");
    c.cfg_write(sbdf(), msix + 2, 2, 0x8000);
    // Event ring: one 16-TRB segment at 0x21000, ERST at 0x20000.
    let erst: Vec<u8> = [0x21000u64.to_le_bytes(), 16u64.to_le_bytes()].concat();
    guest_write(&g, 0x20000, &erst);
    let ir = BAR0 + 0x1020;
    c.mmio_write(ir + 0x08, 4, 1);
    c.mmio_write(ir + 0x18, 8, 0x21000);
    c.mmio_write(ir + 0x10, 8, 0x20000);
    c.mmio_write(ir, 4, 0x2); // IMAN.IE
    c.mmio_write(BAR0 + 0x58, 8, 0x10000 | 1); // CRCR, RCS
    c.mmio_write(BAR0 + 0x70, 8, 0x30000); // DCBAAP
    c.mmio_write(BAR0 + 0x40, 4, 0x5); // RS | INTE
}

/// Posts a No Op command at ring index `i` and rings doorbell 0.
fn noop(rig: &Rig, c: &FakeVcpu, i: u64) {
    let trb: Vec<u8> = [0u64.to_le_bytes(), ((23u64 << 10 | 1) << 32).to_le_bytes()].concat();
    guest_write(&rig.xen.guest(), 0x10000 + 16 * i, &trb);
    c.mmio_write(BAR0 + 0x2000, 4, 0);
}

/// The completion code and type of event `i`, once written.
fn event(rig: &Rig, i: u64) -> (u32, u32) {
    let t0 = Instant::now();
    loop {
        let e = guest_read(&rig.xen.guest(), 0x21000 + 16 * i, 16);
        let ctl = u32::from_le_bytes(e[12..16].try_into().unwrap());
        if ctl & 1 == 1 {
            let status = u32::from_le_bytes(e[8..12].try_into().unwrap());
            return (status >> 24, (ctl >> 10) & 0x3f);
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "no event {i}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn commands_run_from_guest_memory_with_msix_and_survive_invalidate() {
    let rig = Rig::new(1);
    let c = rig.vcpu(0);
    start_xhci(&rig, &c);
    noop(&rig, &c, 0);
    assert_eq!(event(&rig, 0), (1, 33), "Command Completion, Success");
    assert_eq!(
        rig.xen.rec().msis,
        vec![(0xfee0_0000, 0x4041)],
        "the guest's own address/data"
    );
    let calls = rig.xen.rec().map_calls;
    assert!(calls >= 1);
    // Xen's p2m changed: every mapping is dropped, the next DMA maps again.
    c.request(Req {
        ty: abi::IOREQ_TYPE_INVALIDATE,
        data: !0,
        count: 1,
        size: 4,
        ..Default::default()
    });
    c.mmio_write(BAR0 + 0x1020 + 0x18, 8, 0x21010 | 8); // ERDP, EHB
    noop(&rig, &c, 1);
    assert_eq!(event(&rig, 1), (1, 33));
    assert!(
        rig.xen.rec().map_calls > calls,
        "re-mapped after INVALIDATE"
    );
    // Interrupt moderation may hold the second message for its interval.
    let t0 = Instant::now();
    while rig.xen.rec().msis.len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "second MSI-X message"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let (_, st) = rig.finish();
    assert_eq!(st.invalidates, 1);
}

/// XENFEAT_hvm_pirqs (Xen 4.17's default): Linux writes MSI-X entry 0
/// as vector 0 (ExtINT) with the pirq in the destination field and leaves
/// it masked, masking through the event channel instead. The interrupt
/// must still reach Xen as that message (which Xen turns into the pirq's
/// event); before, it waited in the PBA and xhci_hcd timed out its first
/// command ("Command Aborted").
#[test]
fn msix_under_xen_pirqs_reaches_xen_although_the_entry_is_masked() {
    let rig = Rig::new(1);
    let c = rig.vcpu(0);
    start_xhci(&rig, &c);
    c.mmio_write(BAR0 + 0x3000, 4, 0xfee3_7000); // pirq 0x37
    c.mmio_write(BAR0 + 0x3004, 4, 0);
    c.mmio_write(BAR0 + 0x3008, 4, 0x700); // ExtINT, vector 0
    c.mmio_write(BAR0 + 0x300c, 4, 1); // masked
    noop(&rig, &c, 0);
    assert_eq!(event(&rig, 0), (1, 33), "Command Completion, Success");
    let t0 = Instant::now();
    while rig.xen.rec().msis.is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(5), "no MSI-X message");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(rig.xen.rec().msis, vec![(0xfee3_7000, 0x700)]);
    rig.finish();
}

#[test]
fn dma_into_a_hole_is_a_host_system_error_not_a_crash() {
    let rig = Rig::new(1);
    let c = rig.vcpu(0);
    start_xhci(&rig, &c);
    // Command ring moved into the hole: the controller must halt with HSE.
    c.mmio_write(BAR0 + 0x40, 4, 0x4); // stop
    let t0 = Instant::now();
    while c.mmio_read(BAR0 + 0x44, 4) & 1 == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
    c.mmio_write(BAR0 + 0x58, 8, (HOLE.start << 12) | 1);
    c.mmio_write(BAR0 + 0x40, 4, 0x5);
    c.mmio_write(BAR0 + 0x2000, 4, 0);
    let sts = c.mmio_read(BAR0 + 0x44, 4);
    assert_ne!(sts & 0x4, 0, "HSE, USBSTS {sts:#x}");
    let (_, st) = rig.finish();
    assert!(st.ioreqs > 0);
}

#[test]
fn two_vcpus_at_once_each_get_their_own_answers() {
    let rig = Rig::new(2);
    let c0 = rig.vcpu(0);
    rig.enable(&c0, BAR0);
    let threads: Vec<_> = (0..2u32)
        .map(|v| {
            let c = rig.vcpu(v);
            std::thread::spawn(move || {
                // Each vCPU owns one interrupter's IMOD register.
                let reg = BAR0 + 0x1020 + 32 * u64::from(v + 1) + 4;
                for i in 0..300u64 {
                    let val = (u64::from(v) << 24) | (i & 0xffff);
                    c.mmio_write(reg, 4, val);
                    assert_eq!(c.mmio_read(reg, 4), val, "vCPU {v} iteration {i}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(rig.bus.notified(FakeXen::remote_port(0)) >= 600);
    assert!(rig.bus.notified(FakeXen::remote_port(1)) >= 600);
}

#[test]
fn malformed_requests_are_answered_without_crashing() {
    let rig = Rig::new(1);
    let c = rig.vcpu(0);
    rig.enable(&c, BAR0);
    let bad = [
        // bad sizes
        Req {
            ty: abi::IOREQ_TYPE_COPY,
            addr: BAR0,
            count: 1,
            size: 3,
            read: true,
            ..Default::default()
        },
        Req {
            ty: abi::IOREQ_TYPE_COPY,
            addr: BAR0,
            count: 1,
            size: 16,
            read: true,
            ..Default::default()
        },
        Req {
            ty: abi::IOREQ_TYPE_COPY,
            addr: BAR0,
            count: 1,
            size: 0,
            read: true,
            ..Default::default()
        },
        Req {
            ty: abi::IOREQ_TYPE_PCI_CONFIG,
            addr: u64::from(sbdf()) << 32 | 0xffe,
            count: 1,
            size: 4,
            read: true,
            ..Default::default()
        },
        // a register number that would wrap a 32-bit end check
        Req {
            ty: abi::IOREQ_TYPE_PCI_CONFIG,
            addr: u64::from(sbdf()) << 32 | 0xffff_fffe,
            count: 1,
            size: 4,
            read: true,
            ..Default::default()
        },
        Req {
            ty: abi::IOREQ_TYPE_PCI_CONFIG,
            addr: u64::from(sbdf()) << 32,
            count: 1,
            size: 8,
            read: true,
            ..Default::default()
        },
        // unknown types
        Req {
            ty: 99,
            addr: BAR0,
            count: 1,
            size: 4,
            read: true,
            ..Default::default()
        },
        Req {
            ty: 5,
            addr: BAR0,
            count: 1,
            size: 4,
            ..Default::default()
        },
        // an address outside our ranges, wrapping
        Req {
            ty: abi::IOREQ_TYPE_COPY,
            addr: u64::MAX - 1,
            count: 1,
            size: 4,
            read: true,
            ..Default::default()
        },
        // a huge rep count to a pointer in the hole and past the end of RAM
        Req {
            ty: abi::IOREQ_TYPE_COPY,
            addr: BAR0,
            data: HOLE.start << 12,
            count: u32::MAX,
            size: 4,
            read: true,
            ptr: true,
            df: false,
        },
        Req {
            ty: abi::IOREQ_TYPE_COPY,
            addr: BAR0 + 0x3000,
            data: u64::MAX - 8,
            count: 1 << 20,
            size: 8,
            ptr: true,
            df: true,
            read: false,
        },
    ];
    for r in bad {
        let d = c.request(r);
        if r.read && !r.ptr {
            let ones = if r.size >= 8 {
                u64::MAX
            } else {
                (1u64 << (r.size * 8)) - 1
            };
            assert_eq!(d, ones, "{r:?}");
        }
    }
    // A slot not in READY (INPROCESS with garbage) is left alone.
    c.post(
        Req {
            ty: abi::IOREQ_TYPE_COPY,
            addr: BAR0,
            count: 1,
            size: 4,
            read: true,
            ..Default::default()
        },
        abi::STATE_IOREQ_INPROCESS,
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        c.state(),
        abi::STATE_IOREQ_INPROCESS,
        "never moved backwards or answered twice"
    );
    // And the server still works.
    assert_eq!(c.mmio_read(BAR0, 1), 0x40);
    let (_, st) = rig.finish();
    assert!(st.refused >= 9, "{st:?}");
}

#[test]
fn domain_death_ends_the_server_and_teardown_tolerates_it() {
    let rig = Rig::new(1);
    let t0 = Instant::now();
    rig.xen.kill();
    let mut rig = rig;
    let (exit, _) = rig.server.take().unwrap().join().unwrap();
    assert_eq!(exit, Exit::DomainGone);
    assert!(t0.elapsed() < Duration::from_secs(5));
}

/// The liveness check runs by time on every loop iteration, so a guest
/// keeping the server busy with requests cannot hide its domain's death.
#[test]
fn domain_death_is_noticed_during_a_request_burst() {
    let mut rig = Rig::new(1);
    let c = rig.vcpu(0);
    rig.enable(&c, BAR0);
    let busy = Arc::new(AtomicBool::new(true));
    let b2 = busy.clone();
    let hammer = std::thread::spawn(move || {
        let mut n = 0u64;
        while b2.load(Ordering::SeqCst) {
            // Re-post as soon as the slot is answered (or every 50 µs),
            // rep reads of the whole capability block each time.
            let posted = c.try_post(
                Req {
                    ty: abi::IOREQ_TYPE_COPY,
                    addr: BAR0,
                    data: 0x10_0000,
                    count: 4096,
                    size: 4,
                    read: true,
                    ptr: true,
                    df: false,
                },
                abi::STATE_IOREQ_READY,
            );
            if !posted {
                break;
            }
            n += 1;
            let t = Instant::now();
            while c.state() != abi::STATE_IORESP_READY && t.elapsed() < Duration::from_micros(50) {}
        }
        n
    });
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    rig.xen.kill();
    let (exit, st) = rig.server.take().unwrap().join().unwrap();
    let noticed = t0.elapsed();
    busy.store(false, Ordering::SeqCst);
    let posted = hammer.join().unwrap();
    assert_eq!(exit, Exit::DomainGone);
    assert!(noticed < Duration::from_millis(2500), "{noticed:?}");
    assert!(
        posted > 10 && st.ioreqs > 10,
        "the burst ran: {posted} posted, {st:?}"
    );
}

/// Catalogue rows: 8-byte port I/O and port reps, BARs placed near 2^52
/// (and where they would wrap), rep MMIO onto the doorbells — each
/// answered, in bounded time, and the server keeps working.
#[test]
fn hostile_port_io_high_bars_and_rep_doorbells_are_answered() {
    let rig = Rig::new(1);
    let c = rig.vcpu(0);
    let t0 = Instant::now();
    // 8-byte port I/O (x86 has none): all ones, nothing done.
    let pio8 = c.request(Req {
        ty: abi::IOREQ_TYPE_PIO,
        addr: 0xc000,
        count: 1,
        size: 8,
        read: true,
        ..Default::default()
    });
    assert_eq!(pio8, u64::MAX);
    // Port reps (rep insw / outsw) with a huge count, both directions.
    for read in [true, false] {
        c.request(Req {
            ty: abi::IOREQ_TYPE_PIO,
            addr: 0xc000,
            data: 0x1000,
            count: u32::MAX,
            size: 2,
            read,
            ptr: true,
            df: false,
        });
    }
    // BAR 0 near 2^52 (the top of a 52-bit physical address space)...
    let high = (1u64 << 52) - 0x4000;
    rig.enable(&c, high);
    assert_eq!(c.mmio_read(high, 1), 0x40, "CAPLENGTH at the high BAR");
    assert!(rig
        .xen
        .rec()
        .ranges
        .contains(&(IoRange::Memory, high, high + 0x3fff)));
    // ...and at the very top, where base + size wraps: not claimed, and
    // accesses there are nobody's.
    let top: u64 = !0x3fff;
    rig.enable(&c, top);
    assert!(!rig.xen.rec().ranges.iter().any(|r| r.1 == top));
    assert_eq!(c.mmio_read(top, 4), 0xffff_ffff);
    assert_eq!(c.mmio_read(u64::MAX - 1, 4), 0xffff_ffff);
    // Back to a sane place; a rep MMIO write of 4096 items from guest
    // memory onto the doorbell array (and past the end of the BAR).
    rig.enable(&c, BAR0);
    start_xhci(&rig, &c);
    c.request(Req {
        ty: abi::IOREQ_TYPE_COPY,
        addr: BAR0 + 0x2000,
        data: 0x10_0000,
        count: 4096,
        size: 4,
        ptr: true,
        ..Default::default()
    });
    // 8-byte items (doorbells 0 and 1 in one write) with a count far
    // beyond what Xen sends: cut to 4096 items.
    c.request(Req {
        ty: abi::IOREQ_TYPE_COPY,
        addr: BAR0 + 0x2000,
        data: 0x10_0000,
        count: u32::MAX,
        size: 8,
        ptr: true,
        ..Default::default()
    });
    assert_eq!(c.mmio_read(BAR0, 1), 0x40, "still serving");
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    let (_, st) = rig.finish();
    assert!(st.refused >= 3, "{st:?}");
}
