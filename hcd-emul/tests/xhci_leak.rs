//! CVE-2016-7466 class: attach/detach in a loop with resident memory
//! watched. Alone in its own test binary, so no other test's memory moves
//! the figure.

mod common;

use std::sync::Arc;

use common::fake::FakeDevice;
use common::Driver;
use hcd_emul::usb::Speed;
use hcd_emul::xhci::trb::{cc, ty, Trb};

/// Resident set size of this process, in KiB.
fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = s.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4
}

/// CVE-2016-7466 class: plugging and unplugging a device with a slot
/// addressed and transfers in flight, 1,000 times, leaks nothing.
#[test]
fn attach_detach_1000_times_keeps_memory_flat() {
    let mut d = Driver::new();
    d.start();
    let out = d.alloc(32 * 32, 64);
    let inp = d.alloc(33 * 32, 64);
    let ring = d.alloc(16 * 32, 64);
    let buf = d.alloc(64, 64);
    let cycle = |d: &mut Driver| {
        let (mut dev, st) = FakeDevice::new(Speed::High);
        dev.park_control = true;
        let port = d.pci.controller_mut().attach(Box::new(dev)).unwrap();
        d.reset_port(port);
        let slot = d.enable_slot(out);
        d.ram.write(ring, &[0u8; 16 * 32]).unwrap();
        assert_eq!(d.address_device(slot, port, inp, ring, false), cc::SUCCESS);
        d.write_get_descriptor_td(ring, buf);
        d.ring_doorbell(slot, 1);
        assert_eq!(st.lock().unwrap().outstanding, 1);
        // Unplugged with the transfer in flight: it fails, the device is
        // handed back and dropped.
        let dev = d.pci.controller_mut().detach(port).unwrap();
        drop(dev);
        d.poll_events();
        let (code, _) = d.command(Trb {
            parameter: 0,
            status: 0,
            control: (ty::DISABLE_SLOT << 10) | ((slot as u32) << 24),
        });
        assert_eq!(code, cc::SUCCESS);
        d.poll_events();
        assert_eq!(d.pci.controller().transfers_in_flight(), 0);
        assert_eq!(Arc::strong_count(&st), 1, "device state leaked");
    };
    for _ in 0..100 {
        cycle(&mut d);
    }
    let before = rss_kib();
    for _ in 0..1000 {
        cycle(&mut d);
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 1024,
        "resident memory grew by {grown} KiB in 1,000 cycles"
    );
}
