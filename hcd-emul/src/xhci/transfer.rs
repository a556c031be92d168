//! Transfer rings: TDs in, URB-like [`Transfer`]s out, Transfer Events back
//! (xHCI 1.2 §4.10, §4.11, §6.4.1).
//!
//! On a doorbell every complete TD on the ring is turned into one transfer
//! and handed to the device, up to [`limits::TDS_IN_FLIGHT`] per endpoint.
//! Completions may arrive from any thread in any order; a TD is reported
//! only when every TD before it on the endpoint has been, so the guest sees
//! completions in ring order and each TD's data lands in its own buffers.

use super::context::{ep_type, EpState};
use super::limits;
use super::ring::{RingError, RingPos};
use super::trb::{cc, ctl, ty, Trb};
use super::{InFlight, Xhci};
use crate::usb::Segment;
use crate::usb::{
    Direction, IsoPacket, SetupPacket, Transfer, TransferKind, TransferResult, TransferStatus,
};

/// Outcome of looking for the next TD on a ring.
enum Fetch {
    /// A whole TD, its TRBs, and the ring position after it.
    Td(Vec<(u64, Trb)>, RingPos),
    /// The guest has not finished producing the next TD.
    NotReady,
    /// Malformed TD: report `cc` at TRB `addr` and halt the endpoint.
    Bad(u32, u64),
    /// The ring is not in guest memory.
    Dma,
}

impl Xhci {
    /// Turns the TDs on a ring into transfers until the ring is empty, the
    /// endpoint stops running, [`limits::TDS_IN_FLIGHT`] are in flight
    /// (then `starved` is set: completions queue the ring again), or the
    /// work budget is spent (the ring is queued again, behind the others).
    /// Only [`Xhci::run_work`] calls this.
    pub(super) fn fetch_tds(&mut self, (s, dci, stream): super::RingKey) {
        if !(1..=super::regs::MAX_SLOTS).contains(&s) || !self.slots[s].enabled {
            return;
        }
        while self.dma_allowed()
            && self.slots[s].eps[dci].state == EpState::Running
            && self.slots[s].eps[dci].inflight.len() < limits::TDS_IN_FLIGHT
        {
            if !self.budget_left() {
                self.mark_pending((s, dci, stream));
                return;
            }
            let Some(pos) = self.slots[s].eps[dci].ring_of(stream) else {
                return;
            };
            let control = self.slots[s].eps[dci].ep_type == ep_type::CONTROL;
            let fetched = if control {
                self.fetch_control_td(pos)
            } else {
                self.fetch_td(pos)
            };
            match fetched {
                Fetch::NotReady => break,
                Fetch::Dma => {
                    self.host_system_error("transfer ring not in guest memory");
                    return;
                }
                Fetch::Bad(code, addr) => {
                    self.reject_td(s, dci, stream, addr, code, None);
                    return;
                }
                Fetch::Td(trbs, after) => self.submit_td(s, dci, stream, trbs, pos, after),
            }
        }
        let ep = &mut self.slots[s].eps[dci];
        let starved = ep.state == EpState::Running && ep.inflight.len() >= limits::TDS_IN_FLIGHT;
        ep.set_starved(stream, starved);
    }

    /// The next TRB, or the outcome a fetch ends with when there is none.
    fn next_trb(&self, pos: RingPos) -> Result<(u64, Trb, RingPos), Fetch> {
        match pos.next(&self.ram) {
            Ok(Some(x)) => Ok(x),
            Ok(None) => Err(Fetch::NotReady),
            Err(RingError::Dma(_)) => Err(Fetch::Dma),
            Err(RingError::LinkLoop(a)) => Err(Fetch::Bad(cc::TRB_ERROR, a)),
        }
    }

    fn fetch_td(&self, start: RingPos) -> Fetch {
        let mut pos = start;
        let mut trbs = Vec::new();
        loop {
            let (addr, trb, after) = match self.next_trb(pos) {
                Ok(x) => x,
                Err(f) => return f,
            };
            match trb.trb_type() {
                ty::NORMAL | ty::ISOCH | ty::EVENT_DATA | ty::NOOP => {}
                _ => return Fetch::Bad(cc::TRB_ERROR, addr),
            }
            trbs.push((addr, trb));
            pos = after;
            if !trb.has(ctl::CHAIN) {
                return Fetch::Td(trbs, pos);
            }
            if trbs.len() >= limits::TRBS_PER_TD {
                return Fetch::Bad(cc::TRB_ERROR, addr);
            }
        }
    }

    /// A control transfer: Setup stage, optional Data stage (a Data TRB and
    /// chained Normal/Event Data TRBs), Status stage (§4.11.2.2).
    fn fetch_control_td(&self, start: RingPos) -> Fetch {
        let mut pos = start;
        let mut trbs: Vec<(u64, Trb)> = Vec::new();
        // 0: expect Setup, 1: after Setup, 2: inside Data stage, 3: done.
        let mut stage = 0;
        let mut in_chain = false;
        loop {
            let (addr, trb, after) = match self.next_trb(pos) {
                Ok(x) => x,
                Err(f) => return f,
            };
            pos = after;
            let t = trb.trb_type();
            match (stage, t) {
                (0, ty::NOOP) if trbs.is_empty() && !trb.has(ctl::CHAIN) => {
                    return Fetch::Td(vec![(addr, trb)], pos);
                }
                (0, ty::SETUP) => {
                    if !trb.has(ctl::IDT) || trb.transfer_len() != 8 {
                        return Fetch::Bad(cc::TRB_ERROR, addr);
                    }
                    stage = 1;
                }
                (1, ty::DATA) => {
                    stage = 2;
                    in_chain = trb.has(ctl::CHAIN);
                }
                (2, ty::NORMAL | ty::EVENT_DATA | ty::NOOP) if in_chain => {
                    in_chain = trb.has(ctl::CHAIN);
                }
                (1 | 2, ty::STATUS) if !in_chain => stage = 3,
                (2, ty::EVENT_DATA) => {}
                _ => return Fetch::Bad(cc::TRB_ERROR, addr),
            }
            trbs.push((addr, trb));
            if stage == 3 {
                return Fetch::Td(trbs, pos);
            }
            if trbs.len() >= limits::TRBS_PER_TD {
                return Fetch::Bad(cc::TRB_ERROR, addr);
            }
        }
    }

    /// Builds the transfer for a fetched TD and hands it to the device.
    fn submit_td(
        &mut self,
        s: usize,
        dci: usize,
        stream: u16,
        trbs: Vec<(u64, Trb)>,
        start: RingPos,
        after: RingPos,
    ) {
        let ep_t = self.slots[s].eps[dci].ep_type;
        let mut segments = Vec::new();
        let mut setup = None;
        let mut data_dir = None;
        for (addr, trb) in &trbs {
            match trb.trb_type() {
                ty::SETUP => setup = Some(SetupPacket::from_u64(trb.parameter)),
                ty::NORMAL | ty::DATA | ty::ISOCH => {
                    if trb.trb_type() == ty::DATA {
                        data_dir = Some(trb.has(ctl::DIR_IN));
                    }
                    let len = trb.transfer_len() as usize;
                    if trb.has(ctl::IDT) {
                        if len > 8 {
                            return self.reject_td(
                                s,
                                dci,
                                stream,
                                *addr,
                                cc::TRB_ERROR,
                                Some(after),
                            );
                        }
                        segments.push(Segment::Inline(trb.parameter.to_le_bytes()[..len].to_vec()));
                    } else if len > 0 {
                        if !self.ram.is_mapped(trb.parameter, len) {
                            return self.reject_td(
                                s,
                                dci,
                                stream,
                                *addr,
                                cc::USB_TRANSACTION_ERROR,
                                Some(after),
                            );
                        }
                        // Buffers that continue the previous one in guest
                        // memory become one segment (one file I/O call).
                        Segment::push_guest(&mut segments, trb.parameter, len);
                    }
                }
                _ => {}
            }
        }
        let (kind, direction) = match ep_t {
            ep_type::CONTROL => {
                let Some(sp) = setup else {
                    // A lone No Op TD on the control ring.
                    return self.queue_noop(s, dci, stream, trbs, start, after);
                };
                let dir = sp.direction();
                let trt = (trbs[0].1.control >> 16) & 3;
                let consistent = match data_dir {
                    None => trt == 0,
                    Some(din) => (trt == 3) == din && din == (dir == Direction::In) && trt != 0,
                };
                if !consistent {
                    return self.reject_td(s, dci, stream, trbs[0].0, cc::TRB_ERROR, Some(after));
                }
                (TransferKind::Control(sp), dir)
            }
            ep_type::BULK_IN | ep_type::BULK_OUT => (TransferKind::Bulk, ep_dir(dci)),
            ep_type::INTERRUPT_IN | ep_type::INTERRUPT_OUT => {
                (TransferKind::Interrupt, ep_dir(dci))
            }
            _ => (TransferKind::Isochronous, ep_dir(dci)),
        };
        if segments.is_empty() && trbs.iter().all(|(_, t)| t.trb_type() == ty::NOOP) {
            return self.queue_noop(s, dci, stream, trbs, start, after);
        }
        if direction == Direction::In && segments.iter().any(|x| matches!(x, Segment::Inline(_))) {
            // Immediate data is only defined for OUT.
            return self.reject_td(s, dci, stream, trbs[0].0, cc::TRB_ERROR, Some(after));
        }
        let total: usize = trbs
            .iter()
            .filter(|(_, t)| matches!(t.trb_type(), ty::NORMAL | ty::DATA | ty::ISOCH))
            .map(|(_, t)| t.transfer_len() as usize)
            .sum();
        let iso = if kind == TransferKind::Isochronous {
            vec![IsoPacket {
                offset: 0,
                length: total,
                actual: 0,
                status: TransferStatus::Success,
            }]
        } else {
            Vec::new()
        };
        self.stats.tds += 1;
        self.stats.trbs += trbs.len() as u64;
        self.stats.segments += segments.len() as u64;
        self.stats.bytes += total as u64;
        let id = self.alloc_id();
        let (mut xfer, handle) = Transfer::new(
            id,
            (dci / 2) as u8,
            direction,
            kind,
            segments,
            self.ram.clone(),
            iso,
            self.queue.clone(),
        );
        xfer.set_stream_id(stream);
        let ep = &mut self.slots[s].eps[dci];
        ep.set_ring(stream, after);
        ep.inflight.push_back(InFlight {
            id,
            handle: Some(handle),
            trbs,
            start,
            stream,
            result: None,
        });
        self.inflight.insert(id, (s, dci));
        let port = self.slots[s].port;
        match self
            .ports
            .get_mut(port.wrapping_sub(1))
            .and_then(|p| p.device.as_mut())
        {
            Some(d) => d.submit(xfer),
            // No device: dropping the transfer completes it as DeviceGone.
            None => drop(xfer),
        }
    }

    fn queue_noop(
        &mut self,
        s: usize,
        dci: usize,
        stream: u16,
        trbs: Vec<(u64, Trb)>,
        start: RingPos,
        after: RingPos,
    ) {
        let id = self.alloc_id();
        let ep = &mut self.slots[s].eps[dci];
        ep.set_ring(stream, after);
        ep.inflight.push_back(InFlight {
            id,
            handle: None,
            trbs,
            start,
            stream,
            result: Some(TransferResult {
                id,
                status: TransferStatus::Success,
                actual: 0,
                iso_packets: Vec::new(),
            }),
        });
        self.inflight.insert(id, (s, dci));
        self.retire(s, dci);
    }

    /// A TD that cannot be executed: TDs already in flight report first,
    /// then the error event at TRB `addr`, and the endpoint halts. A TD that
    /// parsed but is unusable is skipped (`resume` past it); a malformed one
    /// leaves the ring at its start.
    fn reject_td(
        &mut self,
        s: usize,
        dci: usize,
        stream: u16,
        addr: u64,
        code: u32,
        resume: Option<RingPos>,
    ) {
        guest_warn!(target: "xhci::transfer", "slot {s} ep {dci}: TD at {addr:#x} rejected (completion code {code})");
        // TDs before it that the device already finished report first.
        self.collect_results();
        if self.report_ready(s, dci) {
            // One of them failed: the endpoint halts there, and this TD
            // is fetched again after the guest's recovery.
            self.halt_endpoint(s, dci);
            return;
        }
        let intr = self.slots[s].intr;
        self.transfer_event(s, dci, intr, addr, code, 0, false, false);
        if let Some(after) = resume {
            self.slots[s].eps[dci].set_ring(stream, after);
        }
        self.halt_endpoint(s, dci);
    }

    /// Reports finished TDs, halts the endpoint if one of them failed, and
    /// queues the ring(s) again where fetching stopped at the in-flight
    /// cap and there is room now. While the controller may not touch guest
    /// memory the results wait (the endpoint stays listed as dirty).
    pub(super) fn retire(&mut self, s: usize, dci: usize) {
        if !self.dma_allowed() {
            let ep = &mut self.slots[s].eps[dci];
            if !ep.dirty {
                ep.dirty = true;
                self.dirty.push((s, dci));
            }
            return;
        }
        if self.report_ready(s, dci) {
            self.halt_endpoint(s, dci);
        }
        let ep = &mut self.slots[s].eps[dci];
        if ep.state != EpState::Running || ep.inflight.len() >= limits::TDS_IN_FLIGHT {
            return;
        }
        let mut resume = Vec::new();
        if ep.starved {
            ep.starved = false;
            resume.push(0);
        }
        for (sid, st) in ep.streams.iter_mut().enumerate().skip(1) {
            if st.starved {
                st.starved = false;
                resume.push(sid as u16);
            }
        }
        for stream in resume {
            self.mark_pending((s, dci, stream));
        }
    }

    /// Reports finished TDs from the head of the endpoint's queue: in ring
    /// order per stream (streams do not wait for each other; on an endpoint
    /// without streams everything is stream 0). Stops at the first TD that
    /// failed and returns `true` (the caller halts the endpoint); nothing
    /// later is reported.
    fn report_ready(&mut self, s: usize, dci: usize) -> bool {
        if !self.dma_allowed() {
            return false;
        }
        loop {
            let ep = &mut self.slots[s].eps[dci];
            let Some(i) = first_reportable(&ep.inflight) else {
                return false;
            };
            let Some(td) = ep.inflight.remove(i) else {
                return false;
            };
            self.inflight.remove(&td.id);
            let Some(res) = td.result.as_ref() else {
                return false;
            };
            if self.report(s, dci, &td, res) {
                return true;
            }
        }
    }

    /// Posts the Transfer Events for one TD. Returns `true` if the TD ended
    /// in an error that halts the endpoint.
    fn report(&mut self, s: usize, dci: usize, td: &InFlight, res: &TransferResult) -> bool {
        let err = match res.status {
            TransferStatus::Success | TransferStatus::ShortPacket => None,
            TransferStatus::Stall => Some(cc::STALL),
            TransferStatus::Babble => Some(cc::BABBLE),
            TransferStatus::TransactionError
            | TransferStatus::Cancelled
            | TransferStatus::DeviceGone => Some(cc::USB_TRANSACTION_ERROR),
        };
        let default_intr = self.slots[s].intr;
        let mut left = res.actual;
        let mut short = false;
        let mut edtla: usize = 0;
        let last = td.trbs.len().saturating_sub(1);
        for (i, (addr, trb)) in td.trbs.iter().enumerate() {
            let intr = if trb.interrupter() < super::regs::MAX_INTRS {
                trb.interrupter()
            } else {
                default_intr
            };
            let ioc = trb.has(ctl::IOC);
            let bei = trb.has(ctl::BEI);
            match trb.trb_type() {
                ty::NORMAL | ty::DATA | ty::ISOCH => {
                    let len = trb.transfer_len() as usize;
                    let chunk = len.min(left);
                    left -= chunk;
                    edtla = edtla.saturating_add(chunk);
                    let residue = (len - chunk) as u32;
                    if let Some(code) = err {
                        if chunk < len || i == last {
                            self.transfer_event(s, dci, intr, *addr, code, residue, false, false);
                            return true;
                        }
                        if ioc {
                            self.transfer_event(s, dci, intr, *addr, cc::SUCCESS, 0, false, bei);
                        }
                        continue;
                    }
                    if chunk < len && !short {
                        short = true;
                        if trb.has(ctl::ISP) || ioc {
                            self.transfer_event(
                                s,
                                dci,
                                intr,
                                *addr,
                                cc::SHORT_PACKET,
                                residue,
                                false,
                                bei,
                            );
                            continue;
                        }
                    }
                    if ioc {
                        let code = if short { cc::SHORT_PACKET } else { cc::SUCCESS };
                        self.transfer_event(s, dci, intr, *addr, code, residue, false, bei);
                    }
                }
                ty::EVENT_DATA => {
                    if err.is_none() && ioc {
                        let code = if short { cc::SHORT_PACKET } else { cc::SUCCESS };
                        let len = (edtla & 0xff_ffff) as u32;
                        self.transfer_event(s, dci, intr, trb.parameter, code, len, true, bei);
                    }
                    edtla = 0;
                }
                _ => {
                    // Setup, Status, No Op.
                    if let Some(code) = err {
                        if i == last {
                            self.transfer_event(s, dci, intr, *addr, code, 0, false, false);
                            return true;
                        }
                    } else if ioc {
                        self.transfer_event(s, dci, intr, *addr, cc::SUCCESS, 0, false, bei);
                    }
                }
            }
        }
        err.is_some()
    }

    #[allow(clippy::too_many_arguments)]
    fn transfer_event(
        &mut self,
        s: usize,
        dci: usize,
        intr: usize,
        param: u64,
        code: u32,
        len: u32,
        event_data: bool,
        bei: bool,
    ) {
        let ed = if event_data { ctl::ED } else { 0 };
        self.event(
            intr,
            Trb {
                parameter: param,
                status: (code << 24) | (len & 0xff_ffff),
                control: ((s as u32) << 24)
                    | ((dci as u32) << 16)
                    | (ty::TRANSFER_EVENT << 10)
                    | ed,
            },
            bei,
        );
    }

    /// Cancels every TD in flight on an endpoint; each ring (each
    /// stream's) is rewound to the first of them. With `report`, TDs the
    /// device finished meanwhile are reported first, in order; returns the
    /// oldest TD cancelled, and whether a reported one failed (the caller
    /// halts the endpoint). Never fetches: no path back into TD fetching.
    pub(super) fn cancel_endpoint(
        &mut self,
        s: usize,
        dci: usize,
        report: bool,
    ) -> (Option<InFlight>, bool) {
        for td in &self.slots[s].eps[dci].inflight {
            if let Some(h) = &td.handle {
                h.cancel();
            }
        }
        // Completions that won the race.
        self.collect_results();
        let failed = report && self.report_ready(s, dci);
        let rest: Vec<InFlight> = self.slots[s].eps[dci].inflight.drain(..).collect();
        self.budget.spend(rest.len() as u64);
        let port = self.slots[s].port;
        for td in &rest {
            self.inflight.remove(&td.id);
            if let Some(d) = self
                .ports
                .get_mut(port.wrapping_sub(1))
                .and_then(|p| p.device.as_mut())
            {
                d.cancel(td.id);
            }
        }
        let ep = &mut self.slots[s].eps[dci];
        let mut rewound: Vec<u16> = Vec::new();
        for td in &rest {
            if !rewound.contains(&td.stream) {
                rewound.push(td.stream);
                ep.set_ring(td.stream, td.start);
            }
        }
        (rest.into_iter().next(), failed)
    }

    /// The endpoint halts (a TD failed or could not be executed): TDs in
    /// flight behind it are cancelled unreported.
    fn halt_endpoint(&mut self, s: usize, dci: usize) {
        self.cancel_endpoint(s, dci, false);
        self.slots[s].eps[dci].state = EpState::Halted;
        self.write_out_ep(s, dci);
    }

    /// Stop Endpoint: in-flight TDs are cancelled; the one being executed
    /// reports Stopped and will run again from its start after a doorbell.
    /// If a TD the device finished meanwhile failed, the endpoint halts
    /// instead.
    pub(super) fn stop_endpoint(&mut self, s: usize, dci: usize) {
        let (oldest, failed) = self.cancel_endpoint(s, dci, true);
        if failed {
            self.slots[s].eps[dci].state = EpState::Halted;
            return;
        }
        if let Some(td) = oldest {
            if let Some(&(addr, trb)) = td.trbs.first() {
                let intr = self.slots[s].intr;
                let len = trb.transfer_len();
                let code = match trb.trb_type() {
                    ty::NORMAL | ty::DATA | ty::ISOCH => cc::STOPPED,
                    _ => cc::STOPPED_LENGTH_INVALID,
                };
                let len = if code == cc::STOPPED { len } else { 0 };
                self.transfer_event(s, dci, intr, addr, code, len, false, false);
            }
        }
        if self.slots[s].eps[dci].state == EpState::Running {
            self.slots[s].eps[dci].state = EpState::Stopped;
        }
    }

    pub(super) fn disable_endpoint(&mut self, s: usize, dci: usize) {
        self.cancel_endpoint(s, dci, false);
        if self.slots[s].eps[dci].has_streams() {
            let port = self.slots[s].port;
            if let Some(d) = self
                .ports
                .get_mut(port.wrapping_sub(1))
                .and_then(|p| p.device.as_mut())
            {
                d.free_streams(ep_address(dci));
            }
        }
        let ep = &mut self.slots[s].eps[dci];
        *ep = super::Endpoint::default();
    }

    /// Releases the streams of every endpoint of a slot that has them (the
    /// slot goes away: Disable Slot, HCRST).
    pub(super) fn free_slot_streams(&mut self, s: usize) {
        for dci in 1..32 {
            if self.slots[s].eps[dci].has_streams() {
                self.disable_endpoint(s, dci);
            }
        }
    }

    /// Forgets every transfer of a slot without reporting (port reset,
    /// Disable Slot, Reset Device, HCRST).
    pub(super) fn drop_slot_transfers(&mut self, s: usize) {
        for dci in 1..32 {
            if !self.slots[s].eps[dci].inflight.is_empty() {
                self.cancel_endpoint(s, dci, false);
            }
        }
    }

    /// The device went away: every TD in flight fails with USB Transaction
    /// Error, and the endpoints halt.
    pub(super) fn fail_slot_transfers(&mut self, s: usize) {
        for dci in 1..32 {
            let mut any = false;
            for td in self.slots[s].eps[dci].inflight.iter_mut() {
                let cancelled = td.handle.as_ref().is_some_and(|h| h.cancel());
                if cancelled {
                    td.result = Some(TransferResult {
                        id: td.id,
                        status: TransferStatus::DeviceGone,
                        actual: 0,
                        iso_packets: Vec::new(),
                    });
                    any = true;
                }
            }
            if any {
                self.collect_results();
                self.retire(s, dci);
            }
        }
    }
}

/// Index of the TD to report next: the first finished TD that no earlier
/// unfinished TD of the same stream precedes.
fn first_reportable(q: &std::collections::VecDeque<InFlight>) -> Option<usize> {
    let mut blocked: Vec<u16> = Vec::new();
    for (i, t) in q.iter().enumerate() {
        if blocked.contains(&t.stream) {
            continue;
        }
        if t.result.is_some() {
            return Some(i);
        }
        blocked.push(t.stream);
    }
    None
}

/// USB endpoint address (number, bit 7 for IN) of a Device Context Index.
pub(super) fn ep_address(dci: usize) -> u8 {
    let n = (dci / 2) as u8 & 0x0f;
    if dci % 2 == 1 {
        n | 0x80
    } else {
        n
    }
}

fn ep_dir(dci: usize) -> Direction {
    if dci % 2 == 1 {
        Direction::In
    } else {
        Direction::Out
    }
}
