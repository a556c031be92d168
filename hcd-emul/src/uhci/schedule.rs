//! The schedule (UHCI 1.1 chapter 3): the frame list, TDs and QHs with
//! their horizontal and vertical links, and runs of TDs turned into
//! transfers.
//!
//! A QH has at most one transfer in flight, so transfers on an endpoint
//! complete in order. A transfer covers a run of TDs the controller would
//! execute back to back whatever the device answers: a control transfer's
//! SETUP, data and status TDs, or consecutive IN or OUT TDs of one
//! endpoint, each a full packet of the run's size, up to the first one with
//! IOC (Linux puts IOC on the last TD of each URB, so a run never crosses
//! into the next URB). When the device completes it, the TDs are written
//! back as the controller would have left them TD by TD: a short packet
//! ends the run where it happened (the QH element stays on that TD if it
//! has SPD, else moves past it), an error leaves the element on the failed
//! TD, and success moves the element to the link of the last TD.
//!
//! TDs at the head of a frame-list entry (isochronous, and anything a
//! guest puts there outside a QH) run once when their frame comes; QHs run
//! whenever a walk reaches them, from whichever frame (an interrupt QH
//! polled more often than its period only answers sooner).

use std::collections::{HashSet, VecDeque};

use super::*;
use crate::usb::{
    Direction, IsoPacket, Segment, SetupPacket, Transfer, TransferKind, TransferStatus,
};

/// A transfer descriptor (§3.2): link, control and status, token, buffer.
#[derive(Debug, Clone, Copy)]
pub(super) struct Td {
    addr: u32,
    link: u32,
    ctrl: u32,
    token: u32,
    buf: u32,
}

impl Td {
    fn active(&self) -> bool {
        self.ctrl & TD_ACTIVE != 0
    }
    fn ioc(&self) -> bool {
        self.ctrl & TD_IOC != 0
    }
    fn pid(&self) -> u8 {
        (self.token & 0xff) as u8
    }
    /// Maximum length in bytes; `None` for the illegal encodings 0x500 to
    /// 0x7fe.
    fn len(&self) -> Option<usize> {
        match self.token >> TOK_MAXLEN_SHIFT {
            0x7ff => Some(0),
            n if n <= MAXLEN_MAX => Some(n as usize + 1),
            _ => None,
        }
    }
    fn devaddr(&self) -> u8 {
        ((self.token >> 8) & 0x7f) as u8
    }
    fn endpoint(&self) -> u8 {
        ((self.token >> 15) & 0xf) as u8
    }
    /// The link points at another TD.
    fn links_td(&self) -> bool {
        self.link & (LINK_T | LINK_Q) == 0
    }
}

/// The status word of a TD that executed and moved `n` bytes.
fn done(td: &Td, n: usize) -> u32 {
    let actlen = if n == 0 {
        TD_ACTLEN
    } else {
        (n as u32 - 1) & TD_ACTLEN
    };
    (td.ctrl & !(TD_ACTIVE | TD_STATUS | TD_ACTLEN)) | actlen
}

/// The TDs of a QH's transfer.
#[derive(Debug)]
pub(super) struct Plan {
    setup: Option<(Td, SetupPacket)>,
    data: Vec<Td>,
    status: Option<Td>,
    dir_in: bool,
}

impl Plan {
    fn first(&self) -> u32 {
        match &self.setup {
            Some((t, _)) => t.addr,
            None => self.data.first().map_or(0, |t| t.addr),
        }
    }
}

/// What a transfer in flight covers.
#[derive(Debug)]
pub(super) enum Covers {
    /// TDs of a QH.
    Qh(Plan),
    /// One TD outside any QH (at the head of a frame-list entry).
    Td(Td),
}

/// A transfer handed to a device.
#[derive(Debug)]
pub(super) struct InFlight {
    handle: TransferHandle,
    element: u32,
    port: usize,
    covers: Covers,
}

/// Why a TD could not be used.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// Schedule memory unreadable or unwritable.
    Memory,
    /// The TD is malformed (reserved PID, illegal length): Host
    /// Controller Process Error (§2.1.2), as QEMU does.
    Process(&'static str),
    /// The transaction fails on the bus (nobody answers, buffer not
    /// there): the TD completes with these error bits.
    Bus(u32),
}

impl Uhci {
    fn read_u32s<const N: usize>(&self, addr: u32) -> Result<[u32; N], Fault> {
        let mut b = [0u8; 64];
        let b = &mut b[..N * 4];
        self.ram
            .read(u64::from(addr), b)
            .map_err(|_| Fault::Memory)?;
        let mut out = [0u32; N];
        for (i, c) in b.chunks_exact(4).enumerate() {
            out[i] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(out)
    }

    fn write_u32(&self, addr: u32, v: u32) -> Result<(), Fault> {
        self.ram
            .write(u64::from(addr), &v.to_le_bytes())
            .map_err(|_| Fault::Memory)
    }

    fn read_td(&self, addr: u32) -> Result<Td, Fault> {
        let [link, ctrl, token, buf] = self.read_u32s::<4>(addr)?;
        Ok(Td {
            addr,
            link,
            ctrl,
            token,
            buf,
        })
    }

    /// One walk: the frame-bound TDs of the frames that passed since the
    /// last walk, then every QH reachable from the frame list. Returns
    /// whether anything started or completed.
    pub(super) fn walk(&mut self) -> bool {
        self.stats.walks += 1;
        let now = self.frame();
        let mut raw = std::mem::take(&mut self.fl_scratch);
        raw.resize(4096, 0);
        if self.ram.read(u64::from(self.flbase), &mut raw).is_err() {
            self.fl_scratch = raw;
            self.schedule_fault("frame list not accessible");
            return false;
        }
        let entry = |i: u64| {
            let o = (i as usize & 1023) * 4;
            u32::from_le_bytes([raw[o], raw[o + 1], raw[o + 2], raw[o + 3]])
        };
        let mut busy = false;
        let from = self
            .last_frame
            .map_or(now, |l| l + 1)
            .max(now.saturating_sub(limits::FRAMES_PER_WALK - 1));
        for f in from..=now {
            busy |= self.frame_tds(entry(f), f);
        }
        self.last_frame = Some(now);

        // Every QH reachable from any frame, each once, breadth first (a
        // long chain in one frame cannot starve the others).
        // The distinct entries are kept from the last walk while the frame
        // list's bytes are the same (most walks: an idle guest's list never
        // changes), so an idle walk costs one 4 KiB read and compare.
        if self.fl_cache.0 == raw {
            self.fl_scratch = raw;
        } else {
            let mut heads: Vec<u32> = (0..1024)
                .map(entry)
                .filter(|e| e & LINK_T == 0)
                .map(|e| e & (LINK_ADDR | LINK_Q))
                .collect();
            heads.sort_unstable();
            heads.dedup();
            self.fl_scratch = std::mem::replace(&mut self.fl_cache, (raw, heads)).0;
        }
        let mut work: VecDeque<u32> = self.fl_cache.1.iter().copied().collect();
        let mut visited = HashSet::new();
        let mut reached = HashSet::new();
        let mut complete = true;
        while let Some(link) = work.pop_front() {
            if link & LINK_T != 0 || !visited.insert(link & (LINK_ADDR | LINK_Q)) {
                continue;
            }
            if visited.len() > limits::NODES_PER_WALK || !self.budget_left() || !self.dma_allowed()
            {
                complete = false;
                break;
            }
            let addr = link & LINK_ADDR;
            if link & LINK_Q == 0 {
                // A TD outside a QH: only frame-bound TDs run (above);
                // follow it to what comes after.
                match self.read_u32s::<1>(addr) {
                    Ok([next]) => work.push_back(next),
                    Err(_) => {
                        self.schedule_fault(&format!("TD {addr:#x} not accessible"));
                        complete = false;
                        break;
                    }
                }
                continue;
            }
            let Ok([head, element]) = self.read_u32s::<2>(addr) else {
                self.schedule_fault(&format!("QH {addr:#x} not accessible"));
                complete = false;
                break;
            };
            reached.insert(addr);
            busy |= self.service_qh(addr);
            if element & (LINK_T | LINK_Q) == LINK_Q {
                // A QH in the vertical position.
                work.push_back(element);
            }
            work.push_back(head);
        }
        if complete {
            // Transfers of QHs no longer linked: the guest may free their
            // TDs once it sees the next frame.
            let gone: Vec<TransferId> = self
                .inflight
                .iter()
                .filter(|(_, f)| matches!(f.covers, Covers::Qh(_)) && !reached.contains(&f.element))
                .map(|(id, _)| *id)
                .collect();
            for id in gone {
                self.cancel(id);
            }
            self.owed.retain(|qh, _| reached.contains(qh));
            self.checked_frame = Some(now);
        }
        busy
    }

    /// Runs the TDs at the head of frame `f`'s entry (up to its first QH).
    fn frame_tds(&mut self, mut link: u32, f: u64) -> bool {
        let mut busy = false;
        for _ in 0..limits::TDS_PER_FRAME {
            if link & (LINK_T | LINK_Q) != 0 || !self.budget_left() {
                break;
            }
            let Ok(td) = self.read_td(link & LINK_ADDR) else {
                self.schedule_fault(&format!("frame {} TD {link:#x} not accessible", f & 1023));
                break;
            };
            busy |= self.service_td(td);
            link = td.link;
        }
        busy
    }

    /// Raises the interrupt of an inactive TD with IOC, once a frame
    /// (Linux sets IOC on its inactive terminating TD to get "an
    /// interrupt next frame").
    fn inactive_ioc(&mut self) {
        let f = self.frame();
        if self.ioc_frame != Some(f) {
            self.ioc_frame = Some(f);
            self.int_ioc = true;
        }
    }

    /// The port whose enabled device has address `addr`.
    fn find_port(&self, addr: u8) -> Option<usize> {
        (1..=N_PORTS).find(|&p| {
            let port = &self.ports[p - 1];
            port.portsc & (PORT_PE | PORT_CCS) == (PORT_PE | PORT_CCS)
                && port.portsc & PORT_SUSP == 0
                && port.device.is_some()
                && port.address == addr
        })
    }

    /// A TD outside any QH: an isochronous TD, or a single packet.
    fn service_td(&mut self, td: Td) -> bool {
        if self.by_element.contains_key(&td.addr) || self.unretired_for(td.addr) {
            return false;
        }
        if !td.active() {
            if td.ioc() {
                self.inactive_ioc();
            }
            return false;
        }
        let res = self.check_td(&td).and_then(|len| {
            if td.pid() == PID_SETUP {
                // A control transfer needs its QH (every guest's has one).
                return Err(Fault::Bus(TD_CRCTIMEO));
            }
            let port = self
                .find_port(td.devaddr())
                .ok_or(Fault::Bus(TD_CRCTIMEO))?;
            Ok((len, port))
        });
        let (len, port) = match res {
            Ok(v) => v,
            Err(f) => {
                self.td_fault(&td, f);
                return true;
            }
        };
        let dir = if td.pid() == PID_IN {
            Direction::In
        } else {
            Direction::Out
        };
        let iso = td.ctrl & TD_IOS != 0;
        let kind = if iso {
            TransferKind::Isochronous
        } else {
            self.data_kind(port, td.endpoint(), dir)
        };
        let segs = if len > 0 {
            vec![Segment::Guest {
                addr: u64::from(td.buf),
                len,
            }]
        } else {
            Vec::new()
        };
        let iso_packets = if iso {
            vec![IsoPacket {
                offset: 0,
                length: len,
                actual: 0,
                status: TransferStatus::Success,
            }]
        } else {
            Vec::new()
        };
        self.submit(
            port,
            td.addr,
            td.endpoint(),
            dir,
            kind,
            segs,
            iso_packets,
            Covers::Td(td),
            1,
        );
        true
    }

    /// Bulk or interrupt, as the device's descriptors say (a TD does not).
    fn data_kind(&self, port: usize, ep: u8, dir: Direction) -> TransferKind {
        let address = ep | if dir == Direction::In { 0x80 } else { 0 };
        let int = self.ports[port - 1]
            .device
            .as_ref()
            .is_some_and(|d| d.is_interrupt_endpoint(address));
        if int {
            TransferKind::Interrupt
        } else {
            TransferKind::Bulk
        }
    }

    /// Validates PID and length; returns the length.
    fn check_td(&self, td: &Td) -> Result<usize, Fault> {
        if !matches!(td.pid(), PID_SETUP | PID_IN | PID_OUT) {
            return Err(Fault::Process("reserved PID"));
        }
        td.len().ok_or(Fault::Process("illegal maximum length"))
    }

    /// A TD that cannot run: a process error halts the controller; a bus
    /// error completes the TD with the error (C_ERR run out) and, for a
    /// QH, leaves the element on it.
    fn td_fault(&mut self, td: &Td, f: Fault) {
        match f {
            Fault::Memory => self.schedule_fault(&format!("TD {:#x} not accessible", td.addr)),
            Fault::Process(why) => {
                guest_warn!(target: "uhci", "TD {:#x} (token {:#x}): {why}: process error, halted", td.addr, td.token);
                self.usbsts |= STS_HCPE;
                self.stop();
            }
            Fault::Bus(bits) => {
                let st = (done(td, 0) & !TD_CERR) | TD_STALLED | bits;
                if self.write_u32(td.addr + 4, st).is_err() {
                    self.schedule_fault("TD not writable");
                    return;
                }
                self.usbsts |= STS_ERROR;
                if td.ioc() {
                    self.int_ioc = true;
                }
            }
        }
    }

    /// Serves one QH: completes TDs owed to it and starts its next
    /// transfer if nothing is in flight for it. Returns whether anything
    /// happened.
    pub(super) fn service_qh(&mut self, qh: u32) -> bool {
        let mut busy = false;
        for _ in 0..=limits::OWED_PER_VISIT {
            if self.by_element.contains_key(&qh) || self.unretired_for(qh) {
                return busy;
            }
            let element = match self.read_u32s::<1>(qh + 4) {
                Ok([e]) => e,
                Err(_) => {
                    self.schedule_fault(&format!("QH {qh:#x} not accessible"));
                    return busy;
                }
            };
            if element & (LINK_T | LINK_Q) != 0 {
                return busy;
            }
            let td = match self.read_td(element & LINK_ADDR) {
                Ok(t) => t,
                Err(_) => {
                    self.schedule_fault(&format!("QH {qh:#x}: TD {element:#x} not accessible"));
                    return busy;
                }
            };
            if self.owed.get(&qh).is_some_and(|o| o.contains(&td.addr)) && td.active() {
                if self.complete_owed(qh, &td).is_err() {
                    self.schedule_fault("TD not writable");
                    return busy;
                }
                busy = true;
                continue;
            }
            if td.active() {
                // The queue went on to something else.
                self.owed.remove(&qh);
            } else {
                if td.ioc() {
                    self.inactive_ioc();
                }
                return busy;
            }
            return self.start_qh(qh, td) || busy;
        }
        busy
    }

    /// A TD past the short data stage of a control transfer the device
    /// already finished: a data TD moves nothing, the status stage
    /// succeeds; the element moves on.
    fn complete_owed(&mut self, qh: u32, td: &Td) -> Result<(), Fault> {
        self.write_u32(td.addr + 4, done(td, 0))?;
        self.write_u32(qh + 4, td.link)?;
        if td.ioc() {
            self.int_ioc = true;
        }
        if let Some(o) = self.owed.get_mut(&qh) {
            o.retain(|&a| a != td.addr);
            if o.is_empty() {
                self.owed.remove(&qh);
            }
        }
        Ok(())
    }

    /// Starts the transfer at `td`, the element of `qh`.
    fn start_qh(&mut self, qh: u32, td: Td) -> bool {
        let plan = match self.plan(&td) {
            Ok(Some(p)) => p,
            Ok(None) => return false,
            Err(f) => {
                self.td_fault(&td, f);
                return true;
            }
        };
        let Some(port) = self.find_port(td.devaddr()) else {
            // Nobody answers: three time-outs and the TD stalls.
            self.td_fault(&td, Fault::Bus(TD_CRCTIMEO));
            return true;
        };
        let mut segs: Vec<Segment> = Vec::new();
        for d in &plan.data {
            let len = d.len().unwrap_or(0);
            if len > 0 {
                Segment::push_guest(&mut segs, u64::from(d.buf), len);
            }
        }
        let dir = if plan.dir_in {
            Direction::In
        } else {
            Direction::Out
        };
        let kind = match plan.setup {
            Some((_, sp)) => TransferKind::Control(sp),
            None => self.data_kind(port, td.endpoint(), dir),
        };
        let tds = plan.data.len()
            + usize::from(plan.setup.is_some())
            + usize::from(plan.status.is_some());
        self.submit(
            port,
            qh,
            td.endpoint(),
            dir,
            kind,
            segs,
            Vec::new(),
            Covers::Qh(plan),
            tds,
        );
        true
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        port: usize,
        element: u32,
        ep: u8,
        dir: Direction,
        kind: TransferKind,
        segs: Vec<Segment>,
        iso: Vec<IsoPacket>,
        covers: Covers,
        tds: usize,
    ) {
        let id = self.alloc_id();
        let (xfer, handle) = Transfer::new(
            id,
            ep,
            dir,
            kind,
            segs,
            self.ram.clone(),
            iso,
            self.queue.clone(),
        );
        self.stats.transfers += 1;
        self.stats.tds += tds as u64;
        self.stats.bytes += xfer.len() as u64;
        self.inflight.insert(
            id,
            InFlight {
                handle,
                element,
                port,
                covers,
            },
        );
        self.by_element.insert(element, id);
        match self.ports[port - 1].device.as_mut() {
            Some(d) => d.submit(xfer),
            None => xfer.complete(TransferStatus::DeviceGone, 0),
        }
    }

    /// The TDs one transfer covers, starting at `first`; `None` while a
    /// control transfer's chain is not complete in memory yet.
    fn plan(&self, first: &Td) -> Result<Option<Plan>, Fault> {
        let len = self.check_td(first)?;
        if first.pid() == PID_SETUP {
            if len != 8 {
                return Err(Fault::Bus(TD_CRCTIMEO));
            }
            let mut b = [0u8; 8];
            self.ram
                .read(u64::from(first.buf), &mut b)
                .map_err(|_| Fault::Bus(TD_DBUFERR))?;
            let sp = SetupPacket::from_bytes(b);
            let dir_in = sp.request_type & 0x80 != 0;
            let data_pid = if dir_in { PID_IN } else { PID_OUT };
            let mut data = Vec::new();
            let mut cur = *first;
            let status = loop {
                if !cur.links_td() {
                    return Ok(None);
                }
                let t = self.read_td(cur.link & LINK_ADDR)?;
                if !t.active() {
                    return Ok(None);
                }
                self.check_td(&t)?;
                if t.pid() == PID_SETUP || data.len() >= limits::TDS_PER_TRANSFER {
                    return Err(Fault::Bus(TD_CRCTIMEO));
                }
                if sp.length == 0 || t.pid() != data_pid {
                    break t;
                }
                data.push(t);
                cur = t;
            };
            return Ok(Some(Plan {
                setup: Some((*first, sp)),
                data,
                status: Some(status),
                dir_in,
            }));
        }
        // A run of IN or OUT TDs: every TD but the last a full packet of
        // the first TD's size, up to the first with IOC.
        let mut data = vec![*first];
        let mut total = len;
        let mut seen = HashSet::from([first.addr]);
        loop {
            let last = data[data.len() - 1];
            let last_len = last.len().unwrap_or(0);
            if last_len != len || len == 0 || last.ioc() || !last.links_td() {
                break;
            }
            if data.len() >= limits::TDS_PER_TRANSFER || !self.budget_left() {
                break;
            }
            let t = self.read_td(last.link & LINK_ADDR)?;
            let Some(tl) = t.len() else { break };
            if !t.active()
                || t.pid() != first.pid()
                || t.devaddr() != first.devaddr()
                || t.endpoint() != first.endpoint()
                || t.ctrl & TD_IOS != 0
                || tl > len
                || total + tl > limits::BYTES_PER_TRANSFER
                || !seen.insert(t.addr)
            {
                break;
            }
            total += tl;
            data.push(t);
        }
        Ok(Some(Plan {
            setup: None,
            data,
            status: None,
            dir_in: first.pid() == PID_IN,
        }))
    }

    /// Applies a device's result to what its transfer covers.
    pub(super) fn retire(&mut self, r: TransferResult) {
        let Some(inf) = self.inflight.remove(&r.id) else {
            return; // cancelled meanwhile
        };
        self.by_element.remove(&inf.element);
        if r.status == TransferStatus::Cancelled {
            return;
        }
        self.apply_result(inf, r);
    }

    /// Writes a result back; if the schedule memory is not there, keeps
    /// it for the next wake-up.
    pub(super) fn apply_result(&mut self, inf: InFlight, r: TransferResult) {
        let res = match &inf.covers {
            Covers::Qh(plan) => self.retire_qh(inf.element, inf.port, plan, &r),
            Covers::Td(td) => self.retire_td(td, &r),
        };
        if res.is_err() {
            self.unretired.push((inf, r));
            self.schedule_fault("schedule memory not writable");
        }
    }

    fn unretired_for(&self, element: u32) -> bool {
        self.unretired.iter().any(|(f, _)| f.element == element)
    }

    /// The error bits of a failed transfer, and whether the error counter
    /// stays (a STALL handshake) or ran out (no answer, babble).
    fn error_bits(status: TransferStatus) -> (u32, bool) {
        match status {
            TransferStatus::Stall => (TD_STALLED, true),
            TransferStatus::Babble => (TD_STALLED | TD_BABBLE, false),
            _ => (TD_STALLED | TD_CRCTIMEO, false),
        }
    }

    fn retire_td(&mut self, td: &Td, r: &TransferResult) -> Result<(), Fault> {
        let now = self.read_td(td.addr)?;
        if !now.active() || now.token != td.token || now.buf != td.buf {
            return Ok(()); // taken back
        }
        let len = td.len().unwrap_or(0);
        let (status, actual) = match r.iso_packets.first() {
            Some(p) => (p.status, p.actual.min(len)),
            None => (r.status, r.actual.min(len)),
        };
        let mut st = done(td, actual);
        if !matches!(
            status,
            TransferStatus::Success | TransferStatus::ShortPacket
        ) {
            let (bits, keep) = Self::error_bits(status);
            st |= bits;
            if !keep {
                st &= !TD_CERR;
            }
            self.usbsts |= STS_ERROR;
        } else if actual < len && td.ctrl & TD_SPD != 0 && td.pid() == PID_IN {
            self.int_short = true;
        }
        self.write_u32(td.addr + 4, st)?;
        if td.ioc() {
            self.int_ioc = true;
        }
        Ok(())
    }

    fn retire_qh(
        &mut self,
        qh: u32,
        port: usize,
        plan: &Plan,
        r: &TransferResult,
    ) -> Result<(), Fault> {
        // The guest may have taken the TDs back (unlinked the QH, waited a
        // frame, reused them): then nothing is written.
        let [element] = self.read_u32s::<1>(qh + 4)?;
        let first = self.read_td(plan.first())?;
        if element & (LINK_ADDR | LINK_T | LINK_Q) != plan.first() || !first.active() {
            guest_info!(target: "uhci", "QH {qh:#x}: TD {:#x} taken back before its transfer completed; result dropped", plan.first());
            return Ok(());
        }
        let ok = matches!(
            r.status,
            TransferStatus::Success | TransferStatus::ShortPacket
        );
        let (err_bits, keep_cerr) = Self::error_bits(r.status);
        let fail = |st: u32| {
            let st = st | err_bits;
            if keep_cerr {
                st
            } else {
                st & !TD_CERR
            }
        };
        let mut writes: Vec<(Td, u32)> = Vec::new();
        let mut new_element = None;
        let mut failed = false;
        let mut short_stop = false;
        let mut owed: Vec<u32> = Vec::new();
        if let Some((s, _)) = &plan.setup {
            writes.push((*s, done(s, 8)));
            new_element = Some(s.link);
        }
        let mut left = r.actual;
        let mut ended = false;
        for (i, t) in plan.data.iter().enumerate() {
            let len = t.len().unwrap_or(0);
            let moved = len.min(left);
            left -= moved;
            let short = plan.dir_in && moved < len;
            let error_here = !ok && (moved < len || i + 1 == plan.data.len());
            if error_here {
                writes.push((*t, fail(done(t, moved))));
                new_element = Some(t.addr);
                failed = true;
                ended = true;
                break;
            }
            writes.push((*t, done(t, moved)));
            if short {
                ended = true;
                if t.ctrl & TD_SPD != 0 {
                    // §3.2.2: inactive, the QH not advanced, USBINT.
                    new_element = Some(t.addr);
                    short_stop = true;
                } else {
                    new_element = Some(t.link);
                }
                if plan.setup.is_some() {
                    owed.extend(plan.data[i + 1..].iter().map(|d| d.addr));
                    owed.extend(plan.status.iter().map(|s| s.addr));
                }
                break;
            }
            new_element = Some(t.link);
        }
        if let Some(st) = &plan.status {
            if !ended {
                if ok {
                    writes.push((*st, done(st, 0)));
                    new_element = Some(st.link);
                } else {
                    writes.push((*st, fail(done(st, 0))));
                    new_element = Some(st.addr);
                    failed = true;
                }
            }
        }
        for (t, st) in &writes {
            self.write_u32(t.addr + 4, *st)?;
            if t.ioc() {
                self.int_ioc = true;
            }
        }
        if let Some(e) = new_element {
            self.write_u32(qh + 4, e)?;
        }
        if short_stop {
            self.int_short = true;
        }
        if failed {
            self.usbsts |= STS_ERROR;
        }
        if !owed.is_empty() {
            self.owed.insert(qh, owed);
        }
        if ok {
            if let Some((_, sp)) = &plan.setup {
                if sp.request_type == 0 && sp.request == crate::usb::request::SET_ADDRESS {
                    if let Some(p) = self.ports.get_mut(port - 1) {
                        p.address = (sp.value & 0x7f) as u8;
                    }
                }
            }
        }
        // The next TDs may be waiting already.
        self.service_qh(qh);
        Ok(())
    }

    /// Cancels what is in flight on port `p` (unplug, reset, disable).
    pub(super) fn cancel_port(&mut self, p: usize) {
        let ids: Vec<TransferId> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.port == p)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.cancel(id);
        }
    }

    fn cancel(&mut self, id: TransferId) {
        let Some(inf) = self.inflight.remove(&id) else {
            return;
        };
        self.by_element.remove(&inf.element);
        inf.handle.cancel();
        if let Some(d) = self
            .ports
            .get_mut(inf.port - 1)
            .and_then(|p| p.device.as_mut())
        {
            d.cancel(id);
        }
    }

    /// Cancels every transfer in flight (halt, reset, Bus Master off).
    /// The TDs stay active: they run again when the controller does.
    pub(super) fn cancel_all(&mut self) {
        let ids: Vec<TransferId> = self.inflight.keys().copied().collect();
        for id in ids {
            self.cancel(id);
        }
        self.unretired.clear();
    }
}
