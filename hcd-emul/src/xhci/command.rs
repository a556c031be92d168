//! The command ring (xHCI 1.2 §4.6).
//!
//! Commands run synchronously when doorbell 0 is rung, at most
//! [`limits::COMMANDS_PER_DOORBELL`] per ring. A command whose input context
//! cannot be read completes with Parameter Error; an unreadable command ring
//! is a Host System Error.

use super::context::{ep_type, slot_state, Ctx, EpState, CTX_SIZE};
use super::limits;
use super::regs::MAX_SLOTS;
use super::ring::RingPos;
use super::trb::{cc, ctl, ty, Trb};
use super::Xhci;

impl Xhci {
    pub(super) fn process_commands(&mut self) {
        self.process_completions();
        for _ in 0..limits::COMMANDS_PER_DOORBELL {
            if !self.cmd_running || !self.running() {
                return;
            }
            match self.cmd_ring.next(&self.ram) {
                Ok(None) => return,
                Ok(Some((addr, trb, after))) => {
                    self.cmd_ring = after;
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
            if !dir_ok || c.max_packet() == 0 || c.max_pstreams() != 0 {
                guest_warn!(target: "xhci::command", "slot {s} ep {dci}: invalid endpoint context");
                return cc::PARAMETER_ERROR;
            }
            adds.push((dci, c));
        }
        for dci in 2..32usize {
            if drop & (1 << dci) != 0 {
                self.disable_endpoint(s, dci);
            }
        }
        for (dci, c) in adds {
            self.disable_endpoint(s, dci);
            let deq = c.dequeue();
            let ep = &mut self.slots[s].eps[dci];
            ep.state = EpState::Running;
            ep.ep_type = c.ep_type();
            ep.max_packet = c.max_packet();
            ep.ring = RingPos::new(deq, deq & 1 != 0);
            let mut out = c;
            out.set_ep_state(EpState::Running, deq, deq & 1 != 0);
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
                self.slots[s].eps[dci].ring = RingPos::new(p, p & 1 != 0);
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
    /// context.
    pub(super) fn write_out_ep(&mut self, s: usize, dci: usize) {
        let a = self.slots[s].ctx_addr + CTX_SIZE * dci as u64;
        let ep = &self.slots[s].eps[dci];
        let (st, ring) = (ep.state, ep.ring);
        if let Ok(mut c) = Ctx::read(&self.ram, a) {
            c.set_ep_state(st, ring.dequeue, ring.cycle);
            if c.write(&self.ram, a).is_ok() {
                return;
            }
        }
        guest_warn!(target: "xhci::command", "slot {s} ep {dci}: output context unwritable");
    }
}
