//! The command ring (xHCI 1.2 §4.6).
//!
//! Doorbell 0 queues the command ring; commands then run within the work
//! budget of the access (at most [`limits::COMMANDS_PER_ACCESS`]), the
//! rest on the following wake-ups. A command whose input context
//! cannot be read completes with Parameter Error; an unreadable command ring
//! is a Host System Error.

use super::context::{ep_type, slot_state, Ctx, EpState, CTX_SIZE};
use super::limits;
use super::regs::MAX_SLOTS;
use super::ring::RingPos;
use super::transfer::ep_address;
use super::trb::{cc, ctl, ty, Trb};
use super::{Stream, Xhci, SCT_PRIMARY_TR};

impl Xhci {
    /// Runs commands until the ring is empty, the budget is spent (then
    /// `cmd_pending` stays set and the next wake-up goes on), or the ring
    /// stops.
    pub(super) fn process_commands(&mut self) {
        for _ in 0..limits::COMMANDS_PER_ACCESS {
            if !self.cmd_running || !self.dma_allowed() {
                self.cmd_pending = false;
                return;
            }
            if !self.budget_left() {
                return;
            }
            match self.cmd_ring.next(&self.ram) {
                Ok(None) => {
                    self.cmd_pending = false;
                    return;
                }
                Ok(Some((addr, trb, after))) => {
                    self.cmd_ring = after;
                    self.budget.spend(1);
                    let (code, slot) = self.execute(&trb);
                    self.event(
                        0,
                        Trb {
                            parameter: addr,
                            status: code << 24,
                            control: ((slot as u32) << 24) | (ty::COMMAND_COMPLETION << 10),
                        },
                        false,
                    );
                }
                Err(e) => {
                    self.host_system_error(&format!("command ring: {e}"));
                    return;
                }
            }
        }
    }

    pub(super) fn stop_command_ring(&mut self) {
        self.cmd_running = false;
        self.event(
            0,
            Trb {
                parameter: self.cmd_ring.dequeue,
                status: cc::COMMAND_RING_STOPPED << 24,
                control: ty::COMMAND_COMPLETION << 10,
            },
            false,
        );
    }

    fn slot_valid(&self, s: usize) -> bool {
        (1..=MAX_SLOTS).contains(&s) && self.slots[s].enabled
    }

    fn execute(&mut self, trb: &Trb) -> (u32, usize) {
        let s = trb.slot_id();
        match trb.trb_type() {
            ty::ENABLE_SLOT => self.cmd_enable_slot(),
            ty::NOOP_COMMAND => (cc::SUCCESS, 0),
            t @ (ty::DISABLE_SLOT
            | ty::ADDRESS_DEVICE
            | ty::CONFIGURE_ENDPOINT
            | ty::EVALUATE_CONTEXT
            | ty::RESET_ENDPOINT
            | ty::STOP_ENDPOINT
            | ty::SET_TR_DEQUEUE
            | ty::RESET_DEVICE) => {
                if !self.slot_valid(s) {
                    return (cc::SLOT_NOT_ENABLED, if s <= MAX_SLOTS { s } else { 0 });
                }
                let code = match t {
                    ty::DISABLE_SLOT => self.cmd_disable_slot(s),
                    ty::ADDRESS_DEVICE => self.cmd_address_device(s, trb),
                    ty::CONFIGURE_ENDPOINT => self.cmd_configure_endpoint(s, trb),
                    ty::EVALUATE_CONTEXT => self.cmd_evaluate_context(s, trb),
                    ty::RESET_DEVICE => self.cmd_reset_device(s),
                    _ => self.cmd_endpoint(s, trb),
                };
                (code, s)
            }
            other => {
                guest_warn!(target: "xhci::command", "unsupported command TRB type {other}");
                (cc::TRB_ERROR, 0)
            }
        }
    }

    fn cmd_enable_slot(&mut self) -> (u32, usize) {
        let max = (self.config & 0xff) as usize;
        match (1..=max.min(MAX_SLOTS)).find(|&s| !self.slots[s].enabled) {
            Some(s) => {
                self.slots[s] = super::Slot::new();
                self.slots[s].enabled = true;
                (cc::SUCCESS, s)
            }
            None => (cc::NO_SLOTS, 0),
        }
    }

    fn cmd_disable_slot(&mut self, s: usize) -> u32 {
        self.drop_slot_transfers(s);
        self.free_slot_streams(s);
        if self.slots[s].ctx_addr != 0 {
            self.write_out_slot(s, slot_state::DISABLED_ENABLED, 0);
        }
        self.slots[s] = super::Slot::new();
        cc::SUCCESS
    }

    fn input_ctx(&self, trb: &Trb, i: u64) -> Option<Ctx> {
        let base = trb.parameter & !0xf;
        let a = base.checked_add(i * CTX_SIZE)?;
        Ctx::read(&self.ram, a).ok()
    }

    fn cmd_address_device(&mut self, s: usize, trb: &Trb) -> u32 {
        let bsr = trb.has(ctl::BSR);
        match (self.slots[s].state, bsr) {
            (slot_state::DISABLED_ENABLED, _) | (slot_state::DEFAULT, false) => {}
            _ => return cc::CONTEXT_STATE_ERROR,
        }
        let (Some(icc), Some(slot_in), Some(ep0_in)) = (
            self.input_ctx(trb, 0),
            self.input_ctx(trb, 1),
            self.input_ctx(trb, 2),
        ) else {
            return cc::PARAMETER_ERROR;
        };
        if icc.0[1] & 3 != 3 {
            return cc::PARAMETER_ERROR;
        }
        let port = slot_in.root_port();
        if !(1..=self.ports.len()).contains(&port) {
            return cc::TRB_ERROR;
        }
        if !self.ports[port - 1]
            .device
            .as_ref()
            .is_some_and(|d| d.connected())
        {
            return cc::USB_TRANSACTION_ERROR;
        }
        // One device, one slot: a port another slot already addressed is
        // refused (QEMU: TRB Error), or two slots would drive one device.
        if let Some(other) =
            (1..=MAX_SLOTS).find(|&o| o != s && self.slots[o].enabled && self.slots[o].port == port)
        {
            guest_warn!(target: "xhci::command", "slot {s}: port {port} already belongs to slot {other}");
            return cc::TRB_ERROR;
        }
        if ep0_in.ep_type() != ep_type::CONTROL || ep0_in.max_packet() == 0 {
            return cc::PARAMETER_ERROR;
        }
        let Some(dcbaa_entry) = self.dcbaap.checked_add(8 * s as u64) else {
            return cc::PARAMETER_ERROR;
        };
        let ctx_addr = match self.ram.read_u64(dcbaa_entry) {
            Ok(a) if a & !0x3f != 0 && self.ram.is_mapped(a & !0x3f, 32 * CTX_SIZE as usize) => {
                a & !0x3f
            }
            _ => return cc::PARAMETER_ERROR,
        };
        let (state, address) = if bsr {
            (slot_state::DEFAULT, 0)
        } else {
            (slot_state::ADDRESSED, s as u8)
        };
        // A slot in Default state may be addressed again, possibly on
        // another port: what it had in flight belongs to the old device and
        // is cancelled there, not later on the new one.
        self.drop_slot_transfers(s);
        let slot = &mut self.slots[s];
        slot.port = port;
        slot.ctx_addr = ctx_addr;
        slot.intr = slot_in.slot_interrupter();
        slot.state = state;
        let deq = ep0_in.dequeue();
        let ep = &mut slot.eps[1];
        ep.state = EpState::Running;
        ep.ep_type = ep_type::CONTROL;
        ep.max_packet = ep0_in.max_packet();
        ep.ring = RingPos::new(deq, deq & 1 != 0);
        let mut out_slot = slot_in;
        out_slot.set_slot_state(state, address);
        let mut out_ep0 = ep0_in;
        out_ep0.set_ep_state(EpState::Running, deq, deq & 1 != 0);
        if out_slot.write(&self.ram, ctx_addr).is_err()
            || out_ep0.write(&self.ram, ctx_addr + CTX_SIZE).is_err()
        {
            return cc::PARAMETER_ERROR;
        }
        cc::SUCCESS
    }

    fn cmd_configure_endpoint(&mut self, s: usize, trb: &Trb) -> u32 {
        if !matches!(
            self.slots[s].state,
            slot_state::ADDRESSED | slot_state::CONFIGURED
        ) {
            return cc::CONTEXT_STATE_ERROR;
        }
        if trb.has(ctl::DC) {
            for dci in 2..32 {
                self.disable_endpoint(s, dci);
            }
            self.slots[s].state = slot_state::ADDRESSED;
            self.write_out_slot(s, slot_state::ADDRESSED, s as u8);
            return cc::SUCCESS;
        }
        let Some(icc) = self.input_ctx(trb, 0) else {
            return cc::PARAMETER_ERROR;
        };
        let (drop, add) = (icc.0[0], icc.0[1]);
        // Validate every added context before changing anything.
        let mut adds = Vec::new();
        for dci in 2..32usize {
            if add & (1 << dci) == 0 {
                continue;
            }
            let Some(c) = self.input_ctx(trb, dci as u64 + 1) else {
                return cc::PARAMETER_ERROR;
            };
            let t = c.ep_type();
            let dir_ok = match t {
                ep_type::CONTROL => true,
                ep_type::ISOCH_IN | ep_type::BULK_IN | ep_type::INTERRUPT_IN => dci % 2 == 1,
                ep_type::ISOCH_OUT | ep_type::BULK_OUT | ep_type::INTERRUPT_OUT => dci % 2 == 0,
                _ => false,
            };
            if !dir_ok || c.max_packet() == 0 {
                guest_warn!(target: "xhci::command", "slot {s} ep {dci}: invalid endpoint context");
                return cc::PARAMETER_ERROR;
            }
            let streams = match self.read_stream_array(&c) {
                Ok(v) => v,
                Err(why) => {
                    guest_warn!(target: "xhci::command", "slot {s} ep {dci}: streams refused: {why}");
                    return cc::PARAMETER_ERROR;
                }
            };
            adds.push((dci, c, streams));
        }
        for dci in 2..32usize {
            if drop & (1 << dci) != 0 {
                self.disable_endpoint(s, dci);
            }
        }
        for (dci, _, _) in &adds {
            self.disable_endpoint(s, *dci);
        }
        // Host resources for streams (a passthrough device allocates them
        // on the host controller) before any endpoint is enabled.
        let port = self.slots[s].port;
        let mut allocated = Vec::new();
        for (dci, _, streams) in &adds {
            if streams.is_empty() {
                continue;
            }
            let n = (streams.len() - 1) as u16;
            let dev = self
                .ports
                .get_mut(port.wrapping_sub(1))
                .and_then(|p| p.device.as_mut());
            let ok = dev.is_some_and(|d| d.alloc_streams(ep_address(*dci), n));
            if !ok {
                guest_warn!(target: "xhci::command", "slot {s} ep {dci}: device cannot have {n} streams");
                for a in allocated {
                    if let Some(d) = self
                        .ports
                        .get_mut(port.wrapping_sub(1))
                        .and_then(|p| p.device.as_mut())
                    {
                        d.free_streams(ep_address(a));
                    }
                }
                return cc::RESOURCE_ERROR;
            }
            allocated.push(*dci);
        }
        for (dci, c, streams) in adds {
            let deq = c.dequeue();
            let ep = &mut self.slots[s].eps[dci];
            ep.state = EpState::Running;
            ep.ep_type = c.ep_type();
            ep.max_packet = c.max_packet();
            let mut out = c;
            if streams.is_empty() {
                ep.ring = RingPos::new(deq, deq & 1 != 0);
                out.set_ep_state(EpState::Running, deq, deq & 1 != 0);
            } else {
                ep.stream_array = deq & !0xf;
                ep.streams = streams;
                out.set_ep_state(EpState::Running, deq & !0xf, false);
            }
            let a = self.slots[s].ctx_addr + CTX_SIZE * dci as u64;
            if out.write(&self.ram, a).is_err() {
                guest_warn!(target: "xhci::command", "slot {s}: output context unwritable");
            }
        }
        let any = (2..32).any(|d| self.slots[s].eps[d].state != EpState::Disabled);
        let st = if any {
            slot_state::CONFIGURED
        } else {
            slot_state::ADDRESSED
        };
        self.slots[s].state = st;
        if add & 1 != 0 {
            if let Some(slot_in) = self.input_ctx(trb, 1) {
                let a = self.slots[s].ctx_addr;
                if let Ok(mut out) = Ctx::read(&self.ram, a) {
                    out.0[0] = (out.0[0] & !(0x1f << 27)) | (slot_in.0[0] & (0x1f << 27));
                    let _ = out.write(&self.ram, a);
                }
            }
        }
        self.write_out_slot(s, st, s as u8);
        cc::SUCCESS
    }

    fn cmd_evaluate_context(&mut self, s: usize, trb: &Trb) -> u32 {
        if self.slots[s].state == slot_state::DISABLED_ENABLED {
            return cc::CONTEXT_STATE_ERROR;
        }
        let Some(icc) = self.input_ctx(trb, 0) else {
            return cc::PARAMETER_ERROR;
        };
        let a = self.slots[s].ctx_addr;
        if icc.0[1] & 2 != 0 {
            let Some(ep0) = self.input_ctx(trb, 2) else {
                return cc::PARAMETER_ERROR;
            };
            if ep0.max_packet() == 0 {
                return cc::PARAMETER_ERROR;
            }
            self.slots[s].eps[1].max_packet = ep0.max_packet();
            if let Ok(mut out) = Ctx::read(&self.ram, a + CTX_SIZE) {
                out.0[1] = (out.0[1] & 0xffff) | (ep0.max_packet() << 16);
                let _ = out.write(&self.ram, a + CTX_SIZE);
            }
        }
        if icc.0[1] & 1 != 0 {
            let Some(slot_in) = self.input_ctx(trb, 1) else {
                return cc::PARAMETER_ERROR;
            };
            self.slots[s].intr = slot_in.slot_interrupter();
            if let Ok(mut out) = Ctx::read(&self.ram, a) {
                out.0[1] = (out.0[1] & !0xffff) | (slot_in.0[1] & 0xffff);
                out.0[2] = (out.0[2] & 0x003f_ffff) | (slot_in.0[2] & !0x003f_ffff);
                let _ = out.write(&self.ram, a);
            }
        }
        cc::SUCCESS
    }

    fn cmd_reset_device(&mut self, s: usize) -> u32 {
        if self.slots[s].state == slot_state::DISABLED_ENABLED {
            return cc::CONTEXT_STATE_ERROR;
        }
        self.drop_slot_transfers(s);
        for dci in 2..32 {
            self.disable_endpoint(s, dci);
        }
        self.slots[s].state = slot_state::DEFAULT;
        self.write_out_slot(s, slot_state::DEFAULT, 0);
        cc::SUCCESS
    }

    /// Reset Endpoint, Stop Endpoint, Set TR Dequeue Pointer.
    fn cmd_endpoint(&mut self, s: usize, trb: &Trb) -> u32 {
        let dci = trb.endpoint_id();
        if !(1..32).contains(&dci) {
            return cc::TRB_ERROR;
        }
        let state = self.slots[s].eps[dci].state;
        if state == EpState::Disabled {
            return cc::ENDPOINT_NOT_ENABLED;
        }
        match trb.trb_type() {
            ty::RESET_ENDPOINT => {
                if state != EpState::Halted {
                    return cc::CONTEXT_STATE_ERROR;
                }
                self.slots[s].eps[dci].state = EpState::Stopped;
            }
            ty::STOP_ENDPOINT => {
                if state != EpState::Running {
                    return cc::CONTEXT_STATE_ERROR;
                }
                self.stop_endpoint(s, dci);
            }
            _ => {
                if !matches!(state, EpState::Stopped | EpState::Error) {
                    return cc::CONTEXT_STATE_ERROR;
                }
                let p = trb.parameter;
                if p & !0xf == 0 {
                    return cc::PARAMETER_ERROR;
                }
                let ep = &mut self.slots[s].eps[dci];
                if ep.has_streams() {
                    // Stream ID in dword 2, SCT in bits 3:1 (§6.4.3.9).
                    let sid = (trb.status >> 16) as usize;
                    if sid == 0 || sid >= ep.streams.len() {
                        return cc::INVALID_STREAM_ID;
                    }
                    if (p >> 1) & 7 != SCT_PRIMARY_TR {
                        return cc::INVALID_STREAM_TYPE;
                    }
                    ep.streams[sid].ring = Some(RingPos::new(p, p & 1 != 0));
                } else {
                    ep.ring = RingPos::new(p, p & 1 != 0);
                }
            }
        }
        self.write_out_ep(s, dci);
        cc::SUCCESS
    }

    /// Writes the slot state into the output slot context.
    pub(super) fn write_out_slot(&mut self, s: usize, state: u32, address: u8) {
        let a = self.slots[s].ctx_addr;
        if let Ok(mut c) = Ctx::read(&self.ram, a) {
            c.set_slot_state(state, address);
            if c.write(&self.ram, a).is_ok() {
                return;
            }
        }
        guest_warn!(target: "xhci::command", "slot {s}: output context unwritable");
    }

    /// Writes an endpoint's state and dequeue pointer into the output
    /// context; for an endpoint with streams, the Stream Context Array
    /// pointer stays and every stream's dequeue pointer and cycle state go
    /// back to its Stream Context (§4.12.2.1: software reads them there
    /// once the endpoint has stopped or halted).
    pub(super) fn write_out_ep(&mut self, s: usize, dci: usize) {
        let a = self.slots[s].ctx_addr + CTX_SIZE * dci as u64;
        let ep = &self.slots[s].eps[dci];
        let st = ep.state;
        let (deq, dcs) = if ep.has_streams() {
            for (sid, stream) in ep.streams.iter().enumerate().skip(1) {
                let Some(r) = stream.ring else { continue };
                let v = (r.dequeue & !0xf) | (SCT_PRIMARY_TR << 1) | u64::from(r.cycle);
                let at = ep.stream_array.wrapping_add(16 * sid as u64);
                if self.ram.write(at, &v.to_le_bytes()).is_err() {
                    guest_warn!(target: "xhci::command", "slot {s} ep {dci}: stream context array unwritable");
                    break;
                }
            }
            (ep.stream_array, false)
        } else {
            (ep.ring.dequeue, ep.ring.cycle)
        };
        if let Ok(mut c) = Ctx::read(&self.ram, a) {
            c.set_ep_state(st, deq, dcs);
            if c.write(&self.ram, a).is_ok() {
                return;
            }
        }
        guest_warn!(target: "xhci::command", "slot {s} ep {dci}: output context unwritable");
    }

    /// The streams of an endpoint context being added: empty without
    /// streams; else one entry per Primary Stream Context (entry 0, the
    /// reserved stream, unused). Every guest-controlled field is checked:
    /// streams only on bulk endpoints, MaxPStreams within MaxPSASize, Linear
    /// Stream Arrays only (we advertise NSS), the array in guest memory.
    fn read_stream_array(&self, c: &Ctx) -> Result<Vec<Stream>, &'static str> {
        let mps = c.max_pstreams();
        if mps == 0 {
            return Ok(Vec::new());
        }
        if !matches!(c.ep_type(), ep_type::BULK_IN | ep_type::BULK_OUT) {
            return Err("streams on a non-bulk endpoint");
        }
        if mps > limits::MAX_PSA_SIZE {
            return Err("MaxPStreams above MaxPSASize");
        }
        if !c.lsa() {
            return Err("secondary stream arrays are not supported");
        }
        let n = 2usize << mps;
        let base = c.dequeue() & !0xf;
        let mut raw = vec![0u8; 16 * n];
        if base == 0 || self.ram.read(base, &mut raw).is_err() {
            return Err("stream context array not in guest memory");
        }
        let mut streams = vec![Stream::default(); n];
        for (sid, st) in streams.iter_mut().enumerate().skip(1) {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[16 * sid..16 * sid + 8]);
            let v = u64::from_le_bytes(b);
            if (v >> 1) & 7 == SCT_PRIMARY_TR && v & !0xf != 0 {
                st.ring = Some(RingPos::new(v, v & 1 != 0));
            }
        }
        Ok(streams)
    }
}
