//! The schedules (EHCI 1.0 chapter 4): the asynchronous list of QHs
//! (§4.8, §4.10), the periodic frame list with interrupt QHs, iTDs and
//! siTDs (§4.6, §4.7, §4.12), and qTD chains turned into transfers.
//!
//! A QH has at most one transfer in flight, so transfers on an endpoint
//! complete in order. A transfer covers a run of qTDs: a control
//! transfer's SETUP, data and status qTDs, or consecutive bulk/interrupt
//! qTDs of one direction that the controller would execute back to back
//! whatever the device answers — every qTD but the last a whole number of
//! packets and, for IN, with an alternate next pointer that leaves the run
//! on a short packet (Linux builds every multi-qTD URB this way). When the
//! device completes it, the qTDs are written back as the controller would
//! have left them qTD by qTD (a short packet ends the run where it
//! happened; the qTDs after it stay active, the queue follows the
//! alternate pointer), and the QH overlay shows the last qTD executed.

use std::collections::HashSet;

use super::*;
use crate::usb::{
    Direction, IsoPacket, Segment, SetupPacket, Transfer, TransferKind, TransferStatus,
};

/// A qTD (or a QH overlay, which has the same layout): next, alternate
/// next, token, five buffer pointers.
#[derive(Debug, Clone, Copy)]
pub(super) struct Qtd {
    addr: u32,
    dw: [u32; 8],
}

impl Qtd {
    fn token(&self) -> u32 {
        self.dw[2]
    }
    fn pid(&self) -> u32 {
        (self.token() & TOK_PID) >> 8
    }
    fn bytes(&self) -> usize {
        ((self.token() >> TOK_BYTES_SHIFT) & TOK_BYTES_MASK) as usize
    }
    fn active(&self) -> bool {
        self.token() & TOK_ACTIVE != 0
    }
    fn next(&self) -> u32 {
        self.dw[0]
    }
    fn alt(&self) -> u32 {
        // The overlay keeps NakCnt in bits 4:1.
        self.dw[1] & (LINK_ADDR | LINK_T)
    }
}

/// What a transfer in flight covers.
#[derive(Debug)]
pub(super) enum Covers {
    /// qTDs of a QH.
    Qh(Plan),
    /// Transactions (index, length) of an iTD.
    Itd(Vec<(usize, usize)>),
    /// An siTD's one transaction of this length.
    Sitd(usize),
}

/// The qTDs of a QH's transfer.
#[derive(Debug)]
pub(super) struct Plan {
    dtc: bool,
    mps: usize,
    setup: Option<(Qtd, SetupPacket)>,
    data: Vec<Qtd>,
    status: Option<Qtd>,
    /// Data toggle of the first data packet.
    toggle: bool,
    dir_in: bool,
}

impl Plan {
    /// The qTD the overlay held when the transfer started.
    fn first(&self) -> u32 {
        match &self.setup {
            Some((q, _)) => q.addr,
            None => self.data.first().map_or(0, |q| q.addr),
        }
    }
}

/// A transfer handed to a device.
#[derive(Debug)]
pub(super) struct InFlight {
    handle: TransferHandle,
    element: u32,
    path: DevPath,
    covers: Covers,
    /// A QH of the periodic schedule.
    periodic: bool,
}

/// Packets a transfer of `bytes` took with `mps`-byte packets (a zero
/// length packet counts; a short end after whole packets was a zero
/// length packet).
fn packets(bytes: usize, mps: usize, short: bool) -> usize {
    let mps = mps.max(1);
    if bytes == 0 {
        return 1;
    }
    bytes.div_ceil(mps) + usize::from(short && bytes.is_multiple_of(mps))
}

/// Why a schedule element could not be used.
enum Fault {
    /// Schedule memory unreadable or unwritable: Host System Error.
    Memory,
    /// The qTD asks for what no controller can do: the queue halts.
    Halt(u32),
}

impl Ehci {
    fn read_dwords<const N: usize>(&self, addr: u32) -> Result<[u32; N], Fault> {
        let mut b = vec![0u8; N * 4];
        self.ram
            .read(u64::from(addr), &mut b)
            .map_err(|_| Fault::Memory)?;
        let mut out = [0u32; N];
        for (i, c) in b.chunks_exact(4).enumerate() {
            out[i] = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(out)
    }

    fn write_dwords(&self, addr: u32, dw: &[u32]) -> Result<(), Fault> {
        let b: Vec<u8> = dw.iter().flat_map(|d| d.to_le_bytes()).collect();
        self.ram
            .write(u64::from(addr), &b)
            .map_err(|_| Fault::Memory)
    }

    fn read_qtd(&self, addr: u32) -> Result<Qtd, Fault> {
        Ok(Qtd {
            addr,
            dw: self.read_dwords::<8>(addr)?,
        })
    }

    /// The guest memory a qTD's buffer covers: Total Bytes from the
    /// current page and offset, across at most the five pages.
    fn qtd_segments(q: &Qtd, out: &mut Vec<Segment>) -> Result<(), Fault> {
        let mut left = q.bytes();
        let mut page = ((q.token() & TOK_CPAGE) >> 12) as usize;
        // C_Page names one of the five buffer pointers (0-4).
        let Some(first) = q.dw.get(3 + page).filter(|_| page <= 4) else {
            return Err(Fault::Halt(TOK_XACT));
        };
        let mut addr = u64::from(first & !0xfff) | u64::from(q.dw[3] & 0xfff);
        while left > 0 {
            if page > 4 {
                // More bytes than the five pages hold.
                return Err(Fault::Halt(TOK_XACT));
            }
            let room = 0x1000 - (addr & 0xfff) as usize;
            let n = room.min(left);
            Segment::push_guest(out, addr, n);
            left -= n;
            page += 1;
            if page <= 4 {
                addr = u64::from(q.dw[3 + page] & !0xfff);
            }
        }
        Ok(())
    }

    /// The device a QH addresses: its address on an enabled port, and for
    /// a full/low-speed endpoint, behind the hub its split fields name.
    fn find_device(&mut self, ch: u32, caps: u32) -> Option<DevPath> {
        let addr = (ch & 0x7f) as u8;
        let eps = (ch >> QH_EPS_SHIFT) & 3;
        if eps == 2 {
            for p in 1..=N_PORTS {
                let port = &self.ports[p - 1];
                if port.portsc & (PORT_PED | PORT_CCS) == (PORT_PED | PORT_CCS)
                    && port.portsc & PORT_SUSP == 0
                    && port.device.is_some()
                    && port.address == addr
                {
                    return Some(DevPath {
                        root: p,
                        hub_port: 0,
                    });
                }
            }
        }
        // Behind the hub (high speed too: a hub port carries any speed).
        let hub_addr = self.ports[0].address;
        let root_ok = self.ports[0].portsc & (PORT_PED | PORT_CCS) == (PORT_PED | PORT_CCS);
        let hub = self.hub_mut()?;
        if !root_ok {
            return None;
        }
        let split_hub = ((caps >> 16) & 0x7f) as u8;
        let split_port = ((caps >> 23) & 0x7f) as u8;
        for hp in 1..=hub.port_count() {
            if !hub.port_enabled(hp) || hub.address_of(hp) != addr {
                continue;
            }
            let speed = hub.port_device(hp).map(|d| d.speed())?;
            let split = eps != 2;
            if split != (speed != Speed::High) {
                return None;
            }
            if split && (split_hub != hub_addr || split_port != hp) {
                // A split to a hub or port the device is not on: no TT
                // ever answers.
                return None;
            }
            return Some(DevPath {
                root: 1,
                hub_port: hp,
            });
        }
        None
    }

    fn device_mut(&mut self, path: DevPath) -> Option<&mut (dyn UsbDevice + 'static)> {
        if path.hub_port == 0 {
            return self
                .ports
                .get_mut(path.root.checked_sub(1)?)?
                .device
                .as_mut()
                .map(Attached::dev_mut);
        }
        self.hub_mut()?.port_device(path.hub_port)
    }

    /// Serves one QH: continues its queue if nothing is in flight for it.
    /// Returns whether a transfer was started.
    pub(super) fn service_qh(&mut self, qh: u32, periodic: bool) -> bool {
        if self.by_element.contains_key(&qh) || self.unretired_for(qh) {
            return false;
        }
        match self.try_service_qh(qh, periodic) {
            Ok(started) => started,
            Err(Fault::Memory) => {
                self.schedule_fault(&format!("QH {qh:#x}: schedule memory not accessible"));
                false
            }
            Err(Fault::Halt(_)) => false,
        }
    }

    fn try_service_qh(&mut self, qh: u32, periodic: bool) -> Result<bool, Fault> {
        let q = self.read_dwords::<12>(qh)?;
        let (ch, caps) = (q[1], q[2]);
        if periodic && caps & 0xff == 0 {
            // Periodic QHs run in the micro-frames of their S-mask; none.
            return Ok(false);
        }
        let mut overlay = Qtd {
            addr: q[3] & LINK_ADDR,
            dw: [q[4], q[5], q[6], q[7], q[8], q[9], q[10], q[11]],
        };
        if overlay.token() & TOK_HALTED != 0 {
            return Ok(false);
        }
        if !overlay.active() {
            // Advance the queue (§4.10.2): a short packet takes the
            // alternate next qTD, if there is one.
            let short = overlay.pid() == PID_IN && overlay.bytes() > 0;
            let next = if short && overlay.alt() & LINK_T == 0 {
                overlay.alt()
            } else {
                overlay.next()
            };
            if next & LINK_T != 0 {
                return Ok(false);
            }
            let qtd = self.read_qtd(next & LINK_ADDR)?;
            if !qtd.active() {
                return Ok(false);
            }
            let mut dw = qtd.dw;
            if ch & QH_DTC == 0 {
                // The toggle lives in the QH.
                dw[2] = (dw[2] & !TOK_DT) | (overlay.token() & TOK_DT);
            }
            dw[2] = (dw[2] & !TOK_PING) | (overlay.token() & TOK_PING);
            let mut ov = [0u32; 9];
            ov[0] = qtd.addr;
            ov[1..].copy_from_slice(&dw);
            self.write_dwords(qh + 12, &ov)?;
            overlay = Qtd { addr: qtd.addr, dw };
        }
        let plan = match self.plan(ch, &overlay) {
            Ok(Some(p)) => p,
            Ok(None) => return Ok(false),
            Err(Fault::Halt(bits)) => {
                self.halt_qh(qh, &overlay, bits)?;
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let Some(path) = self.find_device(ch, caps) else {
            // Nobody answers: three errors and the queue halts (§4.10.3).
            self.halt_qh(qh, &overlay, TOK_XACT)?;
            return Ok(false);
        };
        let mut segments = Vec::new();
        for d in &plan.data {
            if let Err(f) = Self::qtd_segments(d, &mut segments) {
                if let Fault::Halt(bits) = f {
                    self.halt_qh(qh, &overlay, bits)?;
                }
                return Ok(false);
            }
        }
        let ep = ((ch >> 8) & 0xf) as u8;
        let kind = match plan.setup {
            Some((_, sp)) => TransferKind::Control(sp),
            None if periodic => TransferKind::Interrupt,
            None => TransferKind::Bulk,
        };
        let dir = if plan.dir_in {
            Direction::In
        } else {
            Direction::Out
        };
        let id = self.alloc_id();
        let (xfer, handle) = Transfer::new(
            id,
            ep,
            dir,
            kind,
            segments,
            self.ram.clone(),
            Vec::new(),
            self.queue.clone(),
        );
        self.stats.transfers += 1;
        self.stats.qtds += (plan.data.len()
            + usize::from(plan.setup.is_some())
            + usize::from(plan.status.is_some())) as u64;
        self.stats.bytes += xfer.len() as u64;
        self.inflight.insert(
            id,
            InFlight {
                handle,
                element: qh,
                path,
                covers: Covers::Qh(plan),
                periodic,
            },
        );
        self.by_element.insert(qh, id);
        match self.device_mut(path) {
            Some(d) => d.submit(xfer),
            None => xfer.complete(TransferStatus::DeviceGone, 0),
        }
        Ok(true)
    }

    /// The qTDs one transfer covers, starting at the overlay's; `None`
    /// while a control transfer's chain is not complete in memory yet.
    fn plan(&self, ch: u32, first: &Qtd) -> Result<Option<Plan>, Fault> {
        let mps = ((ch >> 16) & 0x7ff) as usize;
        let dtc = ch & QH_DTC != 0;
        if first.pid() == PID_SETUP {
            if first.bytes() != 8 {
                return Err(Fault::Halt(TOK_XACT));
            }
            let addr = u64::from(first.dw[3]);
            let mut b = [0u8; 8];
            self.ram
                .read(addr, &mut b)
                .map_err(|_| Fault::Halt(TOK_XACT))?;
            let sp = SetupPacket::from_bytes(b);
            let dir_in = sp.request_type & 0x80 != 0;
            let data_pid = if dir_in { PID_IN } else { PID_OUT };
            let mut data = Vec::new();
            let mut link = first.next();
            let status = loop {
                if link & LINK_T != 0 {
                    return Ok(None);
                }
                let q = self.read_qtd(link & LINK_ADDR)?;
                if !q.active() {
                    return Ok(None);
                }
                let is_status = if sp.length == 0 {
                    true
                } else {
                    q.pid() != data_pid
                };
                if is_status {
                    break q;
                }
                if data.len() >= limits::QTDS_PER_TRANSFER || q.pid() == PID_SETUP {
                    return Err(Fault::Halt(TOK_XACT));
                }
                link = q.next();
                data.push(q);
            };
            return Ok(Some(Plan {
                dtc: true,
                mps,
                setup: Some((*first, sp)),
                data,
                status: Some(status),
                toggle: true,
                dir_in,
            }));
        }
        let pid = first.pid();
        if pid != PID_IN && pid != PID_OUT {
            return Err(Fault::Halt(TOK_XACT));
        }
        let mut data = vec![*first];
        let mut total = first.bytes();
        loop {
            let last = data[data.len() - 1];
            let whole = last.bytes() > 0 && mps > 0 && last.bytes() % mps == 0;
            let diverts = pid == PID_OUT
                || (last.alt() & LINK_T == 0 && last.alt() != last.next() & (LINK_ADDR | LINK_T));
            if !whole
                || !diverts
                || last.next() & LINK_T != 0
                || data.len() >= limits::QTDS_PER_TRANSFER
            {
                break;
            }
            let q = self.read_qtd(last.next() & LINK_ADDR)?;
            if !q.active()
                || q.pid() != pid
                || q.token() & TOK_HALTED != 0
                || total + q.bytes() > limits::BYTES_PER_TRANSFER
                || data.iter().any(|d| d.addr == q.addr)
            {
                break;
            }
            total += q.bytes();
            data.push(q);
        }
        Ok(Some(Plan {
            dtc,
            mps,
            setup: None,
            data,
            status: None,
            toggle: first.token() & TOK_DT != 0,
            dir_in: pid == PID_IN,
        }))
    }

    /// Halts the queue at the overlay's qTD with `bits` (and raises
    /// USBERRINT), as after its error counter ran out.
    fn halt_qh(&mut self, qh: u32, overlay: &Qtd, bits: u32) -> Result<(), Fault> {
        let tok = (overlay.token() & !(TOK_ACTIVE | TOK_CERR)) | TOK_HALTED | bits;
        self.write_dwords(overlay.addr + 8, &[tok])?;
        self.write_dwords(qh + 24, &[tok])?;
        self.usbsts |= STS_USBERRINT;
        if overlay.token() & TOK_IOC != 0 {
            self.usbsts |= STS_USBINT;
        }
        Ok(())
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

    /// Writes a result back; if the schedule memory is not there (a
    /// client remapping guest RAM), keeps it for the next wake-up (see
    /// [`Ehci::schedule_fault`]).
    pub(super) fn apply_result(&mut self, inf: InFlight, r: TransferResult) {
        let res = match &inf.covers {
            Covers::Qh(plan) => self.retire_qh(inf.element, inf.path, plan, inf.periodic, &r),
            Covers::Itd(tx) => self.retire_itd(inf.element, tx, &r),
            Covers::Sitd(len) => self.retire_sitd(inf.element, *len, &r),
        };
        if res.is_err() {
            self.unretired.push((inf, r));
            self.schedule_fault("schedule memory not writable");
        }
    }

    /// Whether a result for `element` waits to be written back.
    fn unretired_for(&self, element: u32) -> bool {
        self.unretired.iter().any(|(f, _)| f.element == element)
    }

    fn retire_qh(
        &mut self,
        qh: u32,
        path: DevPath,
        plan: &Plan,
        periodic: bool,
        r: &TransferResult,
    ) -> Result<(), Fault> {
        // The guest may have taken the qTDs back (unlinked the QH and
        // waited for the advance): then nothing is written.
        let ov = self.read_dwords::<4>(qh + 12)?;
        let first = self.read_qtd(plan.first())?;
        if ov[0] & LINK_ADDR != plan.first() || ov[3] & TOK_ACTIVE == 0 || !first.active() {
            guest_info!(target: "ehci", "QH {qh:#x}: qTD {:#x} taken back before its transfer completed; result dropped", plan.first());
            return Ok(());
        }
        let ok = matches!(
            r.status,
            TransferStatus::Success | TransferStatus::ShortPacket
        );
        // How a halt reads (Table 4-13; Linux's qtd_copy_status): a STALL
        // is Halted with the error counter left non-zero; babble and
        // transaction errors exhaust it (CERR = 0).
        let (err_bits, keep_cerr) = match r.status {
            TransferStatus::Stall => (0, true),
            TransferStatus::Babble => (TOK_BABBLE, false),
            _ => (TOK_XACT, false),
        };
        let halt = |tok: u32| {
            let tok = if keep_cerr {
                if tok & TOK_CERR == 0 {
                    tok | (1 << 10)
                } else {
                    tok
                }
            } else {
                tok & !TOK_CERR
            };
            tok | TOK_HALTED | err_bits
        };
        let mut writes: Vec<(Qtd, u32)> = Vec::new();
        let mut toggle = plan.toggle;
        let mut irq_ioc = false;
        let mut short = false;
        let mut failed = false;
        if let Some((q, _)) = &plan.setup {
            let tok = (q.token() & !(TOK_ACTIVE | (TOK_BYTES_MASK << TOK_BYTES_SHIFT))) ^ TOK_DT;
            writes.push((*q, tok));
        }
        let mut left = r.actual;
        let mut ended_at: Option<usize> = None;
        for (i, q) in plan.data.iter().enumerate() {
            let len = q.bytes();
            let moved = len.min(left);
            left -= moved;
            let here_short = plan.dir_in && moved < len;
            let here_error = !ok && (moved < len || i + 1 == plan.data.len());
            let pk = packets(moved, plan.mps, here_short);
            let dt_in = if plan.dtc || plan.setup.is_some() {
                q.token() & TOK_DT != 0
            } else {
                toggle
            };
            let dt_out = dt_in ^ (pk % 2 == 1);
            toggle = if here_error { dt_in } else { dt_out };
            let mut tok = q.token() & !(TOK_ACTIVE | (TOK_BYTES_MASK << TOK_BYTES_SHIFT) | TOK_DT);
            tok |= ((len - moved) as u32) << TOK_BYTES_SHIFT;
            if if here_error { dt_in } else { dt_out } {
                tok |= TOK_DT;
            }
            if here_error {
                tok = halt(tok);
            }
            writes.push((*q, tok));
            if here_error {
                failed = true;
                ended_at = Some(i);
                break;
            }
            if here_short {
                short = true;
                ended_at = Some(i);
                break;
            }
        }
        if let Some(st) = &plan.status {
            let last_data = plan.data.len().checked_sub(1);
            let reaches = if failed {
                false
            } else if short {
                let i = ended_at.unwrap_or(0);
                Some(i) == last_data || plan.data[i].alt() & LINK_T != 0
            } else {
                true
            };
            if !ok && plan.data.is_empty() {
                let tok = halt(st.token() & !TOK_ACTIVE);
                writes.push((*st, tok));
                failed = true;
            } else if reaches {
                let tok =
                    (st.token() & !(TOK_ACTIVE | (TOK_BYTES_MASK << TOK_BYTES_SHIFT))) ^ TOK_DT;
                writes.push((*st, tok));
            }
        }
        for (q, tok) in &writes {
            self.write_dwords(q.addr + 8, &[*tok])?;
            if tok & TOK_IOC != 0 {
                irq_ioc = true;
            }
        }
        // The overlay shows the last qTD executed.
        if let Some((last, tok)) = writes.last() {
            let mut tok = *tok;
            if !plan.dtc && plan.setup.is_none() {
                tok = (tok & !TOK_DT) | if toggle { TOK_DT } else { 0 };
            }
            let ov = [
                last.addr, last.dw[0], last.dw[1], tok, last.dw[3], last.dw[4], last.dw[5],
                last.dw[6], last.dw[7],
            ];
            self.write_dwords(qh + 12, &ov)?;
        }
        if ok {
            if let Some((_, sp)) = &plan.setup {
                if sp.request_type == 0 && sp.request == crate::usb::request::SET_ADDRESS {
                    self.set_address(path, (sp.value & 0x7f) as u8);
                }
            }
        }
        if irq_ioc || short {
            self.usbsts |= STS_USBINT;
        }
        if failed {
            self.usbsts |= STS_USBERRINT;
        }
        // The next qTD may be waiting already.
        self.service_qh(qh, periodic);
        Ok(())
    }

    fn set_address(&mut self, path: DevPath, addr: u8) {
        if path.hub_port == 0 {
            if let Some(p) = self.ports.get_mut(path.root.wrapping_sub(1)) {
                p.address = addr;
            }
        } else if let Some(h) = self.hub_mut() {
            h.set_address_of(path.hub_port, addr);
        }
    }

    /// Cancels what is in flight for `path` (unplug, reset, port handed
    /// away).
    pub(super) fn cancel_device(&mut self, path: DevPath) {
        let ids: Vec<TransferId> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.path == path || (path.hub_port == 0 && f.path.root == path.root))
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
        if let Some(d) = self.device_mut(inf.path) {
            d.cancel(id);
        }
    }

    /// Cancels every transfer in flight (halt, reset, Bus Master off).
    /// The qTDs stay active: they run again when the controller does.
    pub(super) fn cancel_all(&mut self) {
        let ids: Vec<TransferId> = self.inflight.keys().copied().collect();
        for id in ids {
            self.cancel(id);
        }
        self.unretired.clear();
    }

    /// Walks the asynchronous list once. Returns whether anything started.
    pub(super) fn walk_async(&mut self) -> bool {
        self.stats.async_passes += 1;
        let mut seen = HashSet::new();
        let mut cur = self.async_addr;
        let mut busy = false;
        for _ in 0..limits::QH_PER_PASS {
            if !self.dma_allowed() || !self.budget_left() || !seen.insert(cur) {
                break;
            }
            let Ok([link]) = self.read_dwords::<1>(cur) else {
                self.schedule_fault(&format!("async QH {cur:#x} not accessible"));
                break;
            };
            busy |= self.service_qh(cur, false);
            if link & LINK_T != 0 || link & LINK_TYPE != TYPE_QH {
                break;
            }
            cur = link & LINK_ADDR;
        }
        if !self.budget_left() {
            self.unfinished = true;
        }
        busy
    }

    /// The QHs reachable on the asynchronous list now.
    fn async_reachable(&self) -> HashSet<u32> {
        let mut seen = HashSet::new();
        let mut cur = self.async_addr;
        for _ in 0..limits::QH_PER_PASS {
            if !seen.insert(cur) {
                break;
            }
            let Ok([link]) = self.read_dwords::<1>(cur) else {
                break;
            };
            if link & LINK_T != 0 || link & LINK_TYPE != TYPE_QH {
                break;
            }
            cur = link & LINK_ADDR;
        }
        seen
    }

    /// The doorbell (IAAD): transfers of asynchronous QHs the guest
    /// unlinked are cancelled before it reclaims their memory.
    pub(super) fn drop_unlinked_async(&mut self) {
        self.drop_taken_back();
        let linked = self.async_reachable();
        let gone: Vec<TransferId> = self
            .inflight
            .iter()
            .filter(|(_, f)| {
                matches!(f.covers, Covers::Qh(_)) && !f.periodic && !linked.contains(&f.element)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.cancel(id);
        }
    }

    /// Transfers whose QH the guest took back: its overlay no longer
    /// holds the transfer's first qTD, active. Linux unlinks an interrupt
    /// QH, waits for the frame to pass, clears the overlay's Active bit
    /// and refreshes it, with no doorbell; the device must not complete
    /// into the given-back qTD afterwards.
    pub(super) fn drop_taken_back(&mut self) {
        let mut gone = Vec::new();
        let mut periodic = false;
        for (id, f) in &self.inflight {
            let Covers::Qh(plan) = &f.covers else {
                continue;
            };
            match self.read_dwords::<4>(f.element + 12) {
                Ok(ov) if ov[0] & LINK_ADDR == plan.first() && ov[3] & TOK_ACTIVE != 0 => {
                    periodic |= f.periodic;
                }
                _ => gone.push(*id),
            }
        }
        // A periodic QH no frame reaches any more is never executed again
        // by a real controller: its transfer ends with it.
        if periodic {
            if let Some(reach) = self.periodic_reachable() {
                for (id, f) in &self.inflight {
                    if f.periodic && !reach.contains(&f.element) && !gone.contains(id) {
                        gone.push(*id);
                    }
                }
            }
        }
        for id in gone {
            self.cancel(id);
        }
    }

    /// The QHs the periodic frame list reaches: one read of the list,
    /// then each distinct chain once. `None` if the list is unreadable.
    fn periodic_reachable(&self) -> Option<HashSet<u32>> {
        let mut b = vec![0u8; 4096];
        self.ram.read(u64::from(self.periodic_base), &mut b).ok()?;
        let mut seen = HashSet::new();
        let mut qhs = HashSet::new();
        for c in b.chunks_exact(4) {
            let mut link = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            for _ in 0..limits::LINKS_PER_FRAME {
                if link & LINK_T != 0 || !seen.insert(link & LINK_ADDR) {
                    break;
                }
                if link & LINK_TYPE == TYPE_QH {
                    qhs.insert(link & LINK_ADDR);
                }
                match self.read_dwords::<1>(link & LINK_ADDR) {
                    Ok([n]) => link = n,
                    Err(_) => return None,
                }
            }
        }
        Some(qhs)
    }

    /// Walks the frames of the periodic schedule that passed since the
    /// last walk (at most [`limits::FRAMES_PER_PASS`]). Returns whether
    /// anything started.
    pub(super) fn walk_periodic(&mut self) -> bool {
        self.drop_taken_back();
        let now = self.uframes() / 8;
        let from = match self.last_frame {
            Some(f) if f >= now => return false,
            Some(f) => (f + 1).max(now.saturating_sub(u64::from(limits::FRAMES_PER_PASS) - 1)),
            None => now,
        };
        self.iso_active = false;
        let mut busy = false;
        let mut served = HashSet::new();
        for f in from..=now {
            if !self.dma_allowed() || !self.budget_left() {
                self.unfinished = true;
                return busy;
            }
            busy |= self.walk_frame(f, &mut served);
            self.stats.frames += 1;
        }
        self.last_frame = Some(now);
        busy
    }

    fn walk_frame(&mut self, frame: u64, served: &mut HashSet<u32>) -> bool {
        let entry = self.periodic_base + 4 * (frame % 1024) as u32;
        let Ok([mut link]) = self.read_dwords::<1>(entry) else {
            self.schedule_fault("periodic frame list not accessible");
            return false;
        };
        let mut busy = false;
        let mut seen = HashSet::new();
        for _ in 0..limits::LINKS_PER_FRAME {
            if link & LINK_T != 0 {
                break;
            }
            let addr = link & LINK_ADDR;
            if !seen.insert(addr) {
                break;
            }
            let next = match link & LINK_TYPE {
                TYPE_QH => {
                    if served.insert(addr) {
                        busy |= self.service_qh(addr, true);
                    }
                    self.read_dwords::<1>(addr).map(|d| d[0])
                }
                TYPE_ITD => {
                    busy |= self.service_itd(addr);
                    self.read_dwords::<1>(addr).map(|d| d[0])
                }
                TYPE_SITD => {
                    busy |= self.service_sitd(addr);
                    self.read_dwords::<1>(addr).map(|d| d[0])
                }
                // FSTN: follow its normal path link.
                _ => self.read_dwords::<1>(addr).map(|d| d[0]),
            };
            match next {
                Ok(n) => link = n,
                Err(_) => {
                    self.schedule_fault("periodic schedule not accessible");
                    break;
                }
            }
            if !self.dma_allowed() {
                break;
            }
        }
        busy
    }

    /// High-speed isochronous: the active transactions of an iTD in the
    /// frame it is linked in, as one isochronous transfer.
    fn service_itd(&mut self, itd: u32) -> bool {
        if self.by_element.contains_key(&itd) {
            return false;
        }
        let Ok(d) = self.read_dwords::<16>(itd) else {
            self.schedule_fault("iTD not accessible");
            return false;
        };
        let active: Vec<usize> = (0..8).filter(|&t| d[1 + t] & (1 << 31) != 0).collect();
        if active.is_empty() {
            return false;
        }
        self.iso_active = true;
        let dev_addr = (d[9] & 0x7f) as u8;
        let ep = ((d[9] >> 8) & 0xf) as u8;
        let dir_in = d[10] & (1 << 11) != 0;
        let mut segments = Vec::new();
        let mut iso = Vec::new();
        let mut tx = Vec::new();
        let mut bad = Vec::new();
        let mut off = 0usize;
        for &t in &active {
            let w = d[1 + t];
            let len = ((w >> 16) & 0xfff) as usize;
            let pg = ((w >> 12) & 7) as usize;
            // Seven buffer pages (0-6); PG 7 names none: the transaction
            // fails, as its buffer cannot be reached.
            let Some(page) = d.get(9 + pg).filter(|_| pg <= 6) else {
                bad.push((t, len));
                continue;
            };
            let start = u64::from(page & !0xfff) + u64::from(w & 0xfff);
            let first = len.min(0x1000 - (start & 0xfff) as usize);
            if first > 0 {
                segments.push(Segment::Guest {
                    addr: start,
                    len: first,
                });
            }
            if len > first {
                let Some(p2) = d.get(10 + pg).filter(|_| pg < 6) else {
                    // Crossing past the seventh page.
                    tx.push((t, first));
                    iso.push(IsoPacket {
                        offset: off,
                        length: first,
                        actual: 0,
                        status: TransferStatus::Success,
                    });
                    off += first;
                    continue;
                };
                segments.push(Segment::Guest {
                    addr: u64::from(p2 & !0xfff),
                    len: len - first,
                });
            }
            iso.push(IsoPacket {
                offset: off,
                length: len,
                actual: 0,
                status: TransferStatus::Success,
            });
            tx.push((t, len));
            off += len;
        }
        if !bad.is_empty() {
            self.fail_itd(itd, &d, &bad);
        }
        if tx.is_empty() {
            return false;
        }
        let ch = u32::from(dev_addr) | (u32::from(ep) << 8) | (2 << QH_EPS_SHIFT);
        let Some(path) = self.find_device(ch, 0) else {
            return self.fail_itd(itd, &d, &tx);
        };
        self.submit_iso(itd, path, ep, dir_in, segments, iso, Covers::Itd(tx))
    }

    fn fail_itd(&mut self, itd: u32, d: &[u32; 16], tx: &[(usize, usize)]) -> bool {
        for &(t, _) in tx {
            let w = (d[1 + t] & !(0xf << 28)) | (1 << 28);
            if self.write_dwords(itd + 4 + 4 * t as u32, &[w]).is_err() {
                self.schedule_fault("iTD not writable");
                return false;
            }
            if w & (1 << 15) != 0 {
                self.usbsts |= STS_USBINT;
            }
        }
        self.usbsts |= STS_USBERRINT;
        false
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_iso(
        &mut self,
        element: u32,
        path: DevPath,
        ep: u8,
        dir_in: bool,
        segments: Vec<Segment>,
        iso: Vec<IsoPacket>,
        covers: Covers,
    ) -> bool {
        let id = self.alloc_id();
        let dir = if dir_in {
            Direction::In
        } else {
            Direction::Out
        };
        let (xfer, handle) = Transfer::new(
            id,
            ep,
            dir,
            TransferKind::Isochronous,
            segments,
            self.ram.clone(),
            iso,
            self.queue.clone(),
        );
        self.stats.transfers += 1;
        self.stats.bytes += xfer.len() as u64;
        self.inflight.insert(
            id,
            InFlight {
                handle,
                element,
                path,
                covers,
                periodic: false,
            },
        );
        self.by_element.insert(element, id);
        match self.device_mut(path) {
            Some(d) => d.submit(xfer),
            None => xfer.complete(TransferStatus::DeviceGone, 0),
        }
        true
    }

    fn retire_itd(
        &mut self,
        itd: u32,
        tx: &[(usize, usize)],
        r: &TransferResult,
    ) -> Result<(), Fault> {
        let d = self.read_dwords::<16>(itd)?;
        for (i, &(t, len)) in tx.iter().enumerate() {
            let w = d[1 + t];
            if w & (1 << 31) == 0 {
                continue; // taken back
            }
            let p = r.iso_packets.get(i);
            let actual = p.map_or(0, |p| p.actual.min(len));
            let mut nw = w & !(0xf << 28) & !(0xfff << 16);
            let dir_in = d[10] & (1 << 11) != 0;
            nw |= (if dir_in { actual } else { len } as u32) << 16;
            match p.map_or(r.status, |p| p.status) {
                TransferStatus::Success | TransferStatus::ShortPacket => {}
                TransferStatus::Babble => nw |= 1 << 29,
                _ => nw |= 1 << 28,
            }
            self.write_dwords(itd + 4 + 4 * t as u32, &[nw])?;
            if nw & (1 << 15) != 0 {
                self.usbsts |= STS_USBINT;
            }
        }
        Ok(())
    }

    /// Full-speed isochronous through the hub's TT: an siTD's one
    /// transaction.
    fn service_sitd(&mut self, sitd: u32) -> bool {
        if self.by_element.contains_key(&sitd) {
            return false;
        }
        let Ok(d) = self.read_dwords::<7>(sitd) else {
            self.schedule_fault("siTD not accessible");
            return false;
        };
        if d[3] & TOK_ACTIVE == 0 {
            return false;
        }
        self.iso_active = true;
        let dir_in = d[1] & (1 << 31) != 0;
        let ep = ((d[1] >> 8) & 0xf) as u8;
        let ch = (d[1] & 0x7f) | (u32::from(ep) << 8);
        let caps = ((d[1] >> 16) & 0x7f) << 16 | ((d[1] >> 24) & 0x7f) << 23;
        let len = ((d[3] >> 16) & 0x3ff) as usize;
        let start = u64::from(d[4]);
        let first = len.min(0x1000 - (start & 0xfff) as usize);
        let mut segments = vec![];
        if first > 0 {
            segments.push(Segment::Guest {
                addr: start,
                len: first,
            });
        }
        if len > first {
            segments.push(Segment::Guest {
                addr: u64::from(d[5] & !0xfff),
                len: len - first,
            });
        }
        let iso = vec![IsoPacket {
            offset: 0,
            length: len,
            actual: 0,
            status: TransferStatus::Success,
        }];
        let Some(path) = self.find_device(ch, caps) else {
            let st = (d[3] & !0xff) | (1 << 3);
            if self.write_dwords(sitd + 12, &[st]).is_err() {
                self.schedule_fault("siTD not writable");
            }
            self.usbsts |= STS_USBERRINT;
            return false;
        };
        self.submit_iso(sitd, path, ep, dir_in, segments, iso, Covers::Sitd(len))
    }

    fn retire_sitd(&mut self, sitd: u32, len: usize, r: &TransferResult) -> Result<(), Fault> {
        let d = self.read_dwords::<7>(sitd)?;
        if d[3] & TOK_ACTIVE == 0 {
            return Ok(());
        }
        let p = r.iso_packets.first();
        let actual = p.map_or(0, |p| p.actual.min(len));
        let mut st = d[3] & !0xff & !(0x3ff << 16);
        st |= ((len - actual) as u32) << 16;
        match p.map_or(r.status, |p| p.status) {
            TransferStatus::Success | TransferStatus::ShortPacket => {}
            TransferStatus::Babble => st |= TOK_BABBLE,
            _ => st |= TOK_XACT,
        }
        self.write_dwords(sitd + 12, &[st])?;
        if st & (1 << 31) != 0 {
            self.usbsts |= STS_USBINT;
        }
        Ok(())
    }
}

#[cfg(test)]
mod unit {
    use super::packets;

    #[test]
    fn packet_counts_decide_the_toggle() {
        assert_eq!(packets(0, 512, false), 1);
        assert_eq!(packets(512, 512, false), 1);
        assert_eq!(packets(513, 512, false), 2);
        assert_eq!(packets(1024, 512, true), 3);
        assert_eq!(packets(100, 512, true), 1);
        assert_eq!(packets(100, 0, false), 100);
    }
}
