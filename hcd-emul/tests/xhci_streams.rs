//! USB 3 bulk streams (xHCI 1.2 §4.12): per-stream transfer rings found
//! through a Linear Primary Stream Context Array, doorbells with a stream
//! ID, Set TR Dequeue Pointer on a stream, Stop Endpoint writing stream
//! contexts back, and hostile stream IDs and contexts.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::fake::{pattern, FakeDevice};
use common::{Driver, ProducerRing, DATA_BASE, RAM_SIZE};
use hcd_emul::usb::Speed;
use hcd_emul::xhci::context::ep_type;
use hcd_emul::xhci::regs::*;
use hcd_emul::xhci::trb::{cc, ty, Trb};

const BULK_IN: usize = 3; // ep 1 IN, with streams
const BULK_OUT: usize = 4; // ep 2 OUT, without

fn bring_up(dev: FakeDevice) -> (Driver, usize) {
    let mut d = Driver::new();
    let port = d.pci.controller_mut().attach(Box::new(dev)).unwrap();
    d.start();
    let slot = d.address(port);
    assert_eq!(
        d.control_out(slot, [0, 9, 1, 0, 0, 0, 0, 0], &[]),
        cc::SUCCESS
    );
    (d, slot)
}

/// A Primary Stream Context Array of `2 << mps` entries, each stream (but
/// the reserved 0) with its own ring, as Linux's xhci_alloc_stream_info
/// lays it out.
struct StreamEp {
    array: u64,
    rings: HashMap<u16, ProducerRing>,
}

fn build_array(d: &mut Driver, mps: u32) -> StreamEp {
    let n = 2u64 << mps;
    let array = d.alloc(16 * n, 64);
    let mut rings = HashMap::new();
    for sid in 1..n {
        let base = d.alloc(16 * 64, 64);
        let v = base | (1 << 1) | 1; // SCT = Primary Transfer Ring, DCS
        d.ram.write(array + 16 * sid, &v.to_le_bytes()).unwrap();
        rings.insert(
            sid as u16,
            ProducerRing {
                base,
                size: 64,
                enq: 0,
                cycle: true,
            },
        );
    }
    StreamEp { array, rings }
}

/// Configure Endpoint adding BULK_IN (type `t`, MaxPStreams `mps`, LSA,
/// TR Dequeue Pointer = `array`) and a plain BULK_OUT.
fn configure(d: &mut Driver, slot: usize, t: u32, mps: u32, lsa: bool, array: u64) -> u32 {
    let inp = d.slots[&slot].in_ctx;
    let out = d.slots[&slot].out_ctx;
    let mut sc = d.read_ctx(out, 0);
    sc[0] = (sc[0] & !(0x1f << 27)) | ((BULK_OUT as u32) << 27);
    sc[3] = 0;
    d.write_ctx(inp, 1, sc);
    let dw0 = (mps << 10) | (u32::from(lsa) << 15);
    let dw1 = (3 << 1) | (t << 3) | (1024 << 16);
    d.write_ctx(
        inp,
        BULK_IN as u64 + 1,
        [dw0, dw1, array as u32, (array >> 32) as u32, 3072, 0, 0, 0],
    );
    let base = d.alloc(16 * 256, 64);
    d.slots.get_mut(&slot).unwrap().rings.insert(
        BULK_OUT,
        ProducerRing {
            base,
            size: 256,
            enq: 0,
            cycle: true,
        },
    );
    let dw1 = (3 << 1) | (ep_type::BULK_OUT << 3) | (1024 << 16);
    d.write_ctx(
        inp,
        BULK_OUT as u64 + 1,
        [0, dw1, base as u32 | 1, (base >> 32) as u32, 3072, 0, 0, 0],
    );
    let add = 1 | (1 << BULK_IN) | (1 << BULK_OUT);
    d.write_ctx(inp, 0, [0, add, 0, 0, 0, 0, 0, 0]);
    d.command(Trb {
        parameter: inp,
        status: 0,
        control: (ty::CONFIGURE_ENDPOINT << 10) | ((slot as u32) << 24),
    })
    .0
}

fn ring_stream(d: &mut Driver, slot: usize, dci: usize, sid: u32) {
    d.w32(DOORBELL_OFFSET + 4 * slot as u64, dci as u32 | (sid << 16));
}

/// Queues one IN TD of `len` bytes at `buf` on stream `sid` (no doorbell);
/// returns its TRB address.
fn queue_on(d: &mut Driver, ep: &mut StreamEp, sid: u16, buf: u64, len: u32) -> u64 {
    let ram = d.ram.clone();
    let trbs = Driver::normal_trbs(&[(buf, len)], true);
    ep.rings.get_mut(&sid).unwrap().push_all(&ram, &trbs)[0]
}

fn endpoint_cmd(d: &mut Driver, t: u32, slot: usize, dci: usize, param: u64, status: u32) -> u32 {
    d.command(Trb {
        parameter: param,
        status,
        control: (t << 10) | ((slot as u32) << 24) | ((dci as u32) << 16),
    })
    .0
}

fn stream_ctx(d: &Driver, ep: &StreamEp, sid: u64) -> u64 {
    d.ram.read_u64(ep.array + 16 * sid).unwrap()
}

#[test]
fn capability_advertises_primary_stream_arrays_without_secondary() {
    let mut d = Driver::new();
    let hcc = d.r32(0x10);
    assert_eq!((hcc >> 12) & 0xf, 7, "MaxPSASize 7: 256 primary streams");
    assert_ne!(hcc & (1 << 7), 0, "NSS: no secondary stream arrays");
}

#[test]
fn tds_on_several_streams_reach_the_device_with_their_stream_and_complete_in_order_per_stream() {
    let (dev, st) = FakeDevice::asynchronous(Speed::Super, Duration::from_millis(3), 8);
    let (mut d, slot) = bring_up(dev);
    let mut ep = build_array(&mut d, 3);
    let code = configure(&mut d, slot, ep_type::BULK_IN, 3, true, ep.array);
    assert_eq!(code, cc::SUCCESS);
    assert_eq!(st.lock().unwrap().stream_allocs, vec![(0x81, 15)]);
    let out = d.read_ctx(d.slots[&slot].out_ctx, BULK_IN as u64);
    assert_eq!(out[0] & 7, 1, "running");
    assert_eq!(
        u64::from(out[2]) | (u64::from(out[3]) << 32),
        ep.array,
        "TR Dequeue Pointer field keeps the stream array"
    );
    // Three TDs on each of streams 1, 2 and 15, queued before any
    // doorbell; doorbells in reverse order.
    let mut queued: Vec<(u16, u64, u64)> = Vec::new();
    for &sid in &[1u16, 2, 15] {
        for k in 0..3u64 {
            let buf = DATA_BASE + 0x1000 * (u64::from(sid) * 4 + k);
            let trb = queue_on(&mut d, &mut ep, sid, buf, 1000);
            queued.push((sid, trb, buf));
        }
    }
    for sid in [15, 2, 1] {
        ring_stream(&mut d, slot, BULK_IN, sid);
    }
    let mut events = Vec::new();
    while events.len() < queued.len() {
        let c = d.next_transfer(slot, BULK_IN).expect("transfer event");
        assert_eq!(c.code, cc::SUCCESS);
        events.push(c.trb);
    }
    for sid in [1u16, 2, 15] {
        let want: Vec<u64> = queued.iter().filter(|q| q.0 == sid).map(|q| q.1).collect();
        let got: Vec<u64> = events
            .iter()
            .copied()
            .filter(|t| want.contains(t))
            .collect();
        assert_eq!(got, want, "stream {sid} completes in its ring order");
    }
    let sub = st.lock().unwrap().submitted.clone();
    let streams: Vec<u16> = sub.iter().map(|s| s.2).collect();
    assert_eq!(streams, vec![15, 15, 15, 2, 2, 2, 1, 1, 1]);
    assert!(sub.iter().all(|s| s.0 == 1 && s.1));
    // Each TD's data landed in its own buffer.
    let mut order: Vec<&(u16, u64, u64)> = Vec::new();
    for sid in [15u16, 2, 1] {
        order.extend(queued.iter().filter(|q| q.0 == sid));
    }
    for (q, s) in order.iter().zip(sub.iter()) {
        let mut got = vec![0u8; 1000];
        d.ram.read(q.2, &mut got).unwrap();
        let want: Vec<u8> = (0..1000).map(|i| pattern(s.3 as u32, i)).collect();
        assert!(got == want, "TD on stream {} holds its own data", q.0);
    }
    // The endpoint without streams still works, with stream id 0.
    let buf = DATA_BASE + 0x10_0000;
    d.ram.write(buf, &[7u8; 64]).unwrap();
    assert_eq!(d.bulk(slot, BULK_OUT, &[(buf, 64)]).0, cc::SUCCESS);
    let last = *st.lock().unwrap().submitted.last().unwrap();
    assert_eq!((last.0, last.1, last.2), (2, false, 0));
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
}

#[test]
fn a_stream_waits_only_for_itself_and_stop_and_set_tr_dequeue_keep_stream_contexts() {
    let (mut dev, st) = FakeDevice::new(Speed::Super);
    dev.park_stream = Some(3);
    let (mut d, slot) = bring_up(dev);
    let mut ep = build_array(&mut d, 2);
    assert_eq!(
        configure(&mut d, slot, ep_type::BULK_IN, 2, true, ep.array),
        cc::SUCCESS
    );
    let a = queue_on(&mut d, &mut ep, 3, DATA_BASE, 512);
    ring_stream(&mut d, slot, BULK_IN, 3);
    let b = queue_on(&mut d, &mut ep, 2, DATA_BASE + 0x1000, 512);
    ring_stream(&mut d, slot, BULK_IN, 2);
    // Stream 2 completes although stream 3's older TD is still out.
    assert_eq!(d.wait_transfer(slot, BULK_IN, b).code, cc::SUCCESS);
    assert_eq!(st.lock().unwrap().outstanding, 1);

    // Stop Endpoint: the parked TD reports Stopped, every stream's
    // dequeue pointer goes back to the Stream Context Array.
    assert_eq!(
        endpoint_cmd(&mut d, ty::STOP_ENDPOINT, slot, BULK_IN, 0, 0),
        cc::SUCCESS
    );
    assert_eq!(d.wait_transfer(slot, BULK_IN, a).code, cc::STOPPED);
    assert_eq!(st.lock().unwrap().outstanding, 0, "parked TD cancelled");
    assert_eq!(
        stream_ctx(&d, &ep, 3),
        a | 2 | 1,
        "stream 3 rewound to its TD"
    );
    assert_eq!(
        stream_ctx(&d, &ep, 2),
        (b + 16) | 2 | 1,
        "stream 2 past its TD"
    );
    let out = d.read_ctx(d.slots[&slot].out_ctx, BULK_IN as u64);
    assert_eq!(out[0] & 7, 3, "stopped");
    assert_eq!(u64::from(out[2]) | (u64::from(out[3]) << 32), ep.array);

    // Hostile Set TR Dequeue: reserved stream 0, past the array, wrong SCT.
    let p = (a + 16) | 2 | 1;
    for (param, sid, want) in [
        (p, 0u32, cc::INVALID_STREAM_ID),
        (p, 8, cc::INVALID_STREAM_ID),
        (p, 0xffff, cc::INVALID_STREAM_ID),
        ((a + 16) | 1, 3, cc::INVALID_STREAM_TYPE),
        ((a + 16) | (2 << 1) | 1, 3, cc::INVALID_STREAM_TYPE),
    ] {
        let code = endpoint_cmd(&mut d, ty::SET_TR_DEQUEUE, slot, BULK_IN, param, sid << 16);
        assert_eq!(code, want, "Set TR Dequeue {param:#x} stream {sid}");
    }
    // Skip the stopped TD on stream 3: written to its stream context.
    assert_eq!(
        endpoint_cmd(&mut d, ty::SET_TR_DEQUEUE, slot, BULK_IN, p, 3 << 16),
        cc::SUCCESS
    );
    assert_eq!(stream_ctx(&d, &ep, 3), p);
    assert_eq!(
        stream_ctx(&d, &ep, 2),
        (b + 16) | 2 | 1,
        "other streams kept"
    );
    // Stream 3's ring now starts after the skipped TD.
    ep.rings.get_mut(&3).unwrap().enq = 1;
    // A doorbell restarts the endpoint; stream 2 goes on where it was.
    let c = queue_on(&mut d, &mut ep, 2, DATA_BASE + 0x2000, 512);
    ring_stream(&mut d, slot, BULK_IN, 2);
    assert_eq!(d.wait_transfer(slot, BULK_IN, c).code, cc::SUCCESS);
    let e = queue_on(&mut d, &mut ep, 3, DATA_BASE + 0x3000, 512);
    assert_eq!(e, a + 16);
    ring_stream(&mut d, slot, BULK_IN, 3);
    let sub = st.lock().unwrap().submitted.clone();
    assert_eq!(
        sub.iter().map(|s| s.2).collect::<Vec<_>>(),
        vec![3, 2, 2, 3],
        "the new stream 3 TD reached the device"
    );

    // Deconfigure frees the streams on the device.
    let (code, _) = d.command(Trb {
        parameter: 0,
        status: 0,
        control: (ty::CONFIGURE_ENDPOINT << 10) | (1 << 9) | ((slot as u32) << 24),
    });
    assert_eq!(code, cc::SUCCESS);
    assert_eq!(st.lock().unwrap().stream_frees, vec![0x81]);
    assert_eq!(d.pci.controller().transfers_in_flight(), 0);
}

#[test]
fn hostile_doorbell_stream_ids_are_ignored() {
    let (dev, st) = FakeDevice::new(Speed::Super);
    let (mut d, slot) = bring_up(dev);
    let mut ep = build_array(&mut d, 1); // 4 contexts: streams 1-3
                                         // Stream 2's context is not a transfer ring (SCT 0).
    let v = stream_ctx(&d, &ep, 2) & !0xe;
    d.ram.write(ep.array + 32, &v.to_le_bytes()).unwrap();
    assert_eq!(
        configure(&mut d, slot, ep_type::BULK_IN, 1, true, ep.array),
        cc::SUCCESS
    );
    for sid in 1..=3u16 {
        queue_on(
            &mut d,
            &mut ep,
            sid,
            DATA_BASE + 0x1000 * u64::from(sid),
            64,
        );
    }
    for sid in [0u32, 2, 4, 255, 0xffff] {
        ring_stream(&mut d, slot, BULK_IN, sid);
    }
    d.poll_events();
    assert!(st.lock().unwrap().submitted.is_empty(), "nothing submitted");
    assert!(!d.pci.controller().halted());
    ring_stream(&mut d, slot, BULK_IN, 3);
    let t3 = ep.rings[&3].base;
    assert_eq!(d.wait_transfer(slot, BULK_IN, t3).code, cc::SUCCESS);
    assert_eq!(st.lock().unwrap().submitted.len(), 1);
}

#[test]
fn hostile_stream_endpoint_contexts_fail_configure_endpoint() {
    let (dev, st) = FakeDevice::new(Speed::Super);
    let (mut d, slot) = bring_up(dev);
    let ep = build_array(&mut d, 2);
    let big = d.alloc(16 * 512, 64);
    // MaxPStreams above MaxPSASize (7).
    let code = configure(&mut d, slot, ep_type::BULK_IN, 8, true, big);
    assert_eq!(code, cc::PARAMETER_ERROR);
    assert_eq!(
        configure(&mut d, slot, ep_type::BULK_IN, 31, true, big),
        cc::PARAMETER_ERROR
    );
    // Secondary stream arrays (LSA = 0).
    assert_eq!(
        configure(&mut d, slot, ep_type::BULK_IN, 2, false, ep.array),
        cc::PARAMETER_ERROR
    );
    // Streams on an interrupt endpoint.
    assert_eq!(
        configure(&mut d, slot, ep_type::INTERRUPT_IN, 2, true, ep.array),
        cc::PARAMETER_ERROR
    );
    // Stream context array outside guest memory, wholly or in part, or 0.
    for array in [0xf000_0000u64, RAM_SIZE as u64 - 32, 0, !0xfu64] {
        assert_eq!(
            configure(&mut d, slot, ep_type::BULK_IN, 2, true, array),
            cc::PARAMETER_ERROR,
            "array at {array:#x}"
        );
    }
    assert!(st.lock().unwrap().stream_allocs.is_empty());
    let out = d.read_ctx(d.slots[&slot].out_ctx, 0);
    assert_eq!(out[3] >> 27, 2, "slot still addressed");
    // The device cannot have the streams: Resource Error.
    st.lock().unwrap().refuse_streams = true;
    assert_eq!(
        configure(&mut d, slot, ep_type::BULK_IN, 2, true, ep.array),
        cc::RESOURCE_ERROR
    );
    st.lock().unwrap().refuse_streams = false;
    assert_eq!(
        configure(&mut d, slot, ep_type::BULK_IN, 2, true, ep.array),
        cc::SUCCESS
    );
    // Reconfiguring the endpoint frees the old streams first.
    assert_eq!(
        configure(&mut d, slot, ep_type::BULK_IN, 2, true, ep.array),
        cc::SUCCESS
    );
    {
        let s = st.lock().unwrap();
        assert_eq!(s.stream_allocs, vec![(0x81, 7), (0x81, 7), (0x81, 7)]);
        assert_eq!(s.stream_frees, vec![0x81]);
    }
    // Disable Slot frees them too.
    let (code, _) = d.command(Trb {
        parameter: 0,
        status: 0,
        control: (ty::DISABLE_SLOT << 10) | ((slot as u32) << 24),
    });
    assert_eq!(code, cc::SUCCESS);
    assert_eq!(st.lock().unwrap().stream_frees, vec![0x81, 0x81]);
}
