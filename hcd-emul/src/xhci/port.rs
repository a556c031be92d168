//! Root hub ports (xHCI 1.2 §4.19, PORTSC §5.4.8).
//!
//! USB 2 ports come up in Polling after a connect and are enabled by a port
//! reset; USB 3 ports train straight to U0 and come up enabled. Every change
//! bit that goes from 0 to 1 posts a Port Status Change Event.

use super::regs::*;
use super::trb::{ty, Trb};
use super::Xhci;
use crate::usb::Speed;

impl Xhci {
    /// Recomputes a port after connect/disconnect/reset of the controller.
    /// `notify` posts the change event (not during HCRST).
    pub(super) fn port_update(&mut self, port: usize, notify: bool) {
        let Some(p) = self.ports.get_mut(port - 1) else {
            return;
        };
        let old = p.portsc;
        let keep = p.portsc & (PORTSC_WAKE_MASK | (3 << PORTSC_PIC_SHIFT));
        let mut sc = PORTSC_PP | keep;
        match p.device.as_ref().filter(|d| d.connected()) {
            Some(d) => {
                let speed = match d.speed() {
                    Speed::Low => speed_id::LOW,
                    Speed::Full => speed_id::FULL,
                    Speed::High => speed_id::HIGH,
                    Speed::Super => speed_id::SUPER,
                };
                sc |= PORTSC_CCS | (speed << PORTSC_SPEED_SHIFT);
                if p.usb3 {
                    sc |= PORTSC_PED | (pls::U0 << PORTSC_PLS_SHIFT);
                } else {
                    sc |= pls::POLLING << PORTSC_PLS_SHIFT;
                }
            }
            None => sc |= pls::RX_DETECT << PORTSC_PLS_SHIFT,
        }
        if notify {
            sc |= old & PORTSC_CHANGE_MASK;
            if (old ^ sc) & PORTSC_CCS != 0 {
                sc |= PORTSC_CSC;
            }
            if old & PORTSC_PED != 0 && sc & PORTSC_PED == 0 {
                sc |= PORTSC_PEC;
            }
        } else if sc & PORTSC_CCS != 0 {
            // After HCRST a connected device shows up as a new connection.
            sc |= PORTSC_CSC;
        }
        p.portsc = sc;
        self.port_changed(port, old);
    }

    /// Posts a Port Status Change Event if a change bit went 0 -> 1.
    fn port_changed(&mut self, port: usize, old: u32) {
        let new = self.ports[port - 1].portsc;
        if (new & !old) & PORTSC_CHANGE_MASK == 0 {
            return;
        }
        self.usbsts |= USBSTS_PCD;
        if self.running() {
            self.event(
                0,
                Trb {
                    parameter: (port as u64) << 24,
                    status: 1 << 24,
                    control: ty::PORT_STATUS_CHANGE << 10,
                },
                false,
            );
        }
    }

    pub(super) fn write_portsc(&mut self, port: usize, val: u32) {
        let idx = port - 1;
        let old = self.ports[idx].portsc;
        let usb3 = self.ports[idx].usb3;
        let connected = old & PORTSC_CCS != 0;
        let mut sc = old & !(val & PORTSC_CHANGE_MASK);
        sc = (sc & !(PORTSC_WAKE_MASK | (3 << PORTSC_PIC_SHIFT)))
            | (val & (PORTSC_WAKE_MASK | (3 << PORTSC_PIC_SHIFT)));
        if val & PORTSC_PED != 0 && !usb3 && sc & PORTSC_PED != 0 {
            // Software disables a USB 2 port (PED is RW1C).
            sc &= !PORTSC_PED;
        }
        self.ports[idx].portsc = sc;
        let warm = usb3 && val & PORTSC_WPR != 0;
        if (val & PORTSC_PR != 0 || warm) && connected {
            self.port_reset(port, warm);
        } else if val & PORTSC_LWS != 0 && connected {
            let target = (val >> PORTSC_PLS_SHIFT) & PORTSC_PLS_MASK;
            self.set_link_state(port, target);
        }
        // Compare with the value before this write so that clearing a
        // change bit never posts an event, but setting one does.
        let now = self.ports[idx].portsc;
        self.port_changed(port, old & now);
    }

    fn set_link_state(&mut self, port: usize, target: u32) {
        let p = &mut self.ports[port - 1];
        let cur = (p.portsc >> PORTSC_PLS_SHIFT) & PORTSC_PLS_MASK;
        let new = match target {
            pls::U0 | pls::U3 | pls::RESUME => target,
            _ => {
                guest_warn!(target: "xhci", "port {port}: link state {target} write ignored");
                return;
            }
        };
        if p.portsc & PORTSC_PED == 0 {
            return;
        }
        p.portsc = (p.portsc & !(PORTSC_PLS_MASK << PORTSC_PLS_SHIFT)) | (new << PORTSC_PLS_SHIFT);
        if new == pls::U0 && (cur == pls::U3 || cur == pls::RESUME) {
            p.portsc |= PORTSC_PLC;
        }
        let suspended = |s: u32| s == pls::U3 || s == pls::RESUME;
        if suspended(cur) != suspended(new) {
            if let Some(d) = p.device.as_mut() {
                d.suspend(suspended(new));
            }
        }
    }

    /// Device-initiated resume (xHCI 1.2 §4.15.2.3): a device in U3 that
    /// signals remote wakeup takes its USB 2 port to Resume (software
    /// drives it to U0 after 20 ms) and its USB 3 port straight to U0,
    /// with a Port Link State Change either way.
    pub(super) fn poll_remote_wakeup(&mut self) {
        for port in 1..=self.ports.len() {
            let p = &mut self.ports[port - 1];
            let state = (p.portsc >> PORTSC_PLS_SHIFT) & PORTSC_PLS_MASK;
            if state != pls::U3 || p.portsc & PORTSC_PED == 0 {
                continue;
            }
            let Some(d) = p.device.as_mut() else {
                continue;
            };
            if !d.remote_wakeup() {
                continue;
            }
            let old = p.portsc;
            let new = if p.usb3 {
                d.suspend(false);
                pls::U0
            } else {
                pls::RESUME
            };
            p.portsc = (p.portsc & !(PORTSC_PLS_MASK << PORTSC_PLS_SHIFT))
                | (new << PORTSC_PLS_SHIFT)
                | PORTSC_PLC;
            self.port_changed(port, old);
        }
    }

    /// Port reset: the device returns to its default state, the port is
    /// enabled in U0, and any transfer in flight to it is dropped.
    fn port_reset(&mut self, port: usize, warm: bool) {
        for s in 1..=MAX_SLOTS {
            if self.slots[s].enabled && self.slots[s].port == port {
                self.drop_slot_transfers(s);
            }
        }
        let p = &mut self.ports[port - 1];
        if let Some(d) = p.device.as_mut() {
            d.reset();
        }
        p.portsc = (p.portsc & !(PORTSC_PLS_MASK << PORTSC_PLS_SHIFT) & !PORTSC_PR)
            | PORTSC_PED
            | PORTSC_PRC
            | (pls::U0 << PORTSC_PLS_SHIFT);
        if warm {
            p.portsc |= PORTSC_WRC;
        }
    }
}
