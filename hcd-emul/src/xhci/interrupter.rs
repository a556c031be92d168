//! Interrupters and their event rings (xHCI 1.2 §4.9.4, §4.17, §5.5.2).
//!
//! The controller is the producer of each event ring: it writes an event's
//! first 12 bytes, then the control dword carrying the cycle bit, so the
//! guest never sees a half-written event. The segment table is read when
//! the first event is written after ERSTBA changes. Interrupt moderation
//! (IMOD) and the Event Handler Busy flag decide when a written event turns
//! into an interrupt.

use std::time::{Duration, Instant};

use super::regs::{ERDP_EHB, ERST_MAX_LOG2, IMAN_IE, IMAN_IP};
use super::trb::{cc, ty, Trb, TRB_SIZE};
use crate::mem::GuestRam;

/// Largest event ring segment accepted (§6.5: 16..=4096 TRBs).
pub const MAX_SEGMENT_TRBS: u32 = 4096;

/// Why an event could not be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    /// The segment table or a segment is not in guest RAM, or malformed:
    /// the controller must signal Host System Error.
    #[error("event ring segment table is invalid or unmapped")]
    Invalid,
    /// ERSTSZ is 0: the ring is disabled and the event is lost.
    #[error("event ring disabled (ERSTSZ = 0)")]
    Disabled,
    /// The ring is full; the event is lost (an Event Ring Full Error was
    /// posted when it filled up).
    #[error("event ring full")]
    Full,
}

/// One interrupter's registers and event-ring producer state.
#[derive(Debug, Clone, Default)]
pub struct Interrupter {
    /// IMAN.
    pub iman: u32,
    /// IMOD (interval in 250 ns units, counter).
    pub imod: u32,
    /// ERSTSZ.
    pub erstsz: u32,
    /// ERSTBA.
    pub erstba: u64,
    /// ERDP, including DESI and EHB.
    pub erdp: u64,
    loaded: bool,
    seg: u32,
    seg_base: u64,
    seg_size: u32,
    enq: u32,
    pcs: bool,
    full: bool,
    /// An interrupt is owed to the guest (pending moderation or EHB).
    owed: bool,
    next_allowed: Option<Instant>,
    /// Events lost (ring full or disabled), for diagnostics.
    pub lost: u64,
}

impl Interrupter {
    /// Register-reset state.
    pub fn reset(&mut self) {
        *self = Interrupter {
            imod: 4000, // §5.5.2.2 default
            ..Default::default()
        };
    }

    /// ERSTBA or ERSTSZ changed: reload the segment table lazily.
    pub fn invalidate(&mut self) {
        self.loaded = false;
        self.full = false;
    }

    fn load(&mut self, ram: &GuestRam) -> Result<(), EventError> {
        if self.erstsz == 0 {
            return Err(EventError::Disabled);
        }
        if self.erstsz > (1 << ERST_MAX_LOG2) {
            return Err(EventError::Invalid);
        }
        self.seg = 0;
        self.enq = 0;
        self.pcs = true;
        self.full = false;
        self.load_segment(ram, 0)?;
        self.loaded = true;
        Ok(())
    }

    fn load_segment(&mut self, ram: &GuestRam, i: u32) -> Result<(), EventError> {
        let entry = self
            .erstba
            .checked_add(u64::from(i) * 16)
            .ok_or(EventError::Invalid)?;
        let mut b = [0u8; 16];
        ram.read(entry, &mut b).map_err(|_| EventError::Invalid)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[0..8]);
        let base = u64::from_le_bytes(a) & !0x3f;
        let size = u32::from(u16::from_le_bytes([b[8], b[9]]));
        if size == 0 || size > MAX_SEGMENT_TRBS {
            return Err(EventError::Invalid);
        }
        if !ram.is_mapped(base, size as usize * TRB_SIZE as usize) {
            return Err(EventError::Invalid);
        }
        self.seg_base = base;
        self.seg_size = size;
        Ok(())
    }

    fn enqueue_addr(&self) -> u64 {
        self.seg_base + u64::from(self.enq) * TRB_SIZE
    }

    /// Address and cycle of the position after the current one (loads the
    /// next segment's entry only to learn its base).
    fn advance(&mut self, ram: &GuestRam) -> Result<(), EventError> {
        self.enq += 1;
        if self.enq >= self.seg_size {
            self.enq = 0;
            self.seg += 1;
            if self.seg >= self.erstsz {
                self.seg = 0;
                self.pcs = !self.pcs;
            }
            self.load_segment(ram, self.seg)?;
        }
        Ok(())
    }

    fn next_addr(&self, ram: &GuestRam) -> Result<u64, EventError> {
        if self.enq + 1 < self.seg_size {
            return Ok(self.enqueue_addr() + TRB_SIZE);
        }
        let mut probe = self.clone();
        probe.advance(ram)?;
        Ok(probe.enqueue_addr())
    }

    fn put(&mut self, ram: &GuestRam, mut trb: Trb) -> Result<(), EventError> {
        trb.control = (trb.control & !1) | u32::from(self.pcs);
        let b = trb.to_bytes();
        let a = self.enqueue_addr();
        ram.write(a, &b[0..12]).map_err(|_| EventError::Invalid)?;
        ram.write(a + 12, &b[12..16])
            .map_err(|_| EventError::Invalid)?;
        self.advance(ram)
    }

    /// Writes one event. The caller asks for the interrupt separately
    /// (through [`Interrupter::owe_interrupt`]) unless Block Event Interrupt
    /// was set.
    pub fn write_event(&mut self, ram: &GuestRam, trb: Trb) -> Result<(), EventError> {
        if !self.loaded {
            self.load(ram)?;
        }
        if self.full {
            self.lost += 1;
            return Err(EventError::Full);
        }
        // The ring is full when the slot after the enqueue pointer is the
        // dequeue pointer; the last free slot takes the Event Ring Full
        // Error (§4.9.4), so the producer never catches up with the guest.
        let mut probe = self.clone();
        probe.advance(ram)?;
        let after_next = probe.next_addr(ram)?;
        let erdp = self.erdp & !0xf;
        if probe.enqueue_addr() == erdp {
            self.full = true;
            self.lost += 1;
            return Err(EventError::Full);
        }
        if after_next == erdp {
            let full = Trb {
                parameter: 0,
                status: cc::EVENT_RING_FULL << 24,
                control: ty::HOST_CONTROLLER_EVENT << 10,
            };
            self.put(ram, full)?;
            self.full = true;
            self.lost += 1;
            return Err(EventError::Full);
        }
        self.put(ram, trb)
    }

    /// The guest wrote ERDP (either half). `ehb_clear` if it wrote 1 to EHB.
    pub fn set_erdp(&mut self, value: u64, ehb_clear: bool) {
        let ehb = if ehb_clear { 0 } else { self.erdp & ERDP_EHB };
        let moved = (value & !0xf) != (self.erdp & !0xf);
        self.erdp = (value & !ERDP_EHB) | ehb;
        if self.full && moved {
            // The guest consumed events: space was freed.
            self.full = false;
        }
        if self.loaded && (self.erdp & !0xf) != self.enqueue_addr() && ehb == 0 {
            // Events the guest has not consumed yet still need an interrupt.
            self.owed = true;
        }
    }

    /// Records that an event wants an interrupt.
    pub fn owe_interrupt(&mut self) {
        self.owed = true;
    }

    /// Decides whether an owed interrupt fires now. Returns `Some(true)` to
    /// fire, `None` if nothing is owed, `Some(false)` if moderation delays it
    /// (see [`Interrupter::deadline`]).
    pub fn due(&mut self, now: Instant) -> Option<bool> {
        if !self.owed {
            return None;
        }
        if self.erdp & ERDP_EHB != 0 {
            // The guest is still handling the previous interrupt; when it
            // writes ERDP the debt is re-evaluated.
            self.owed = false;
            return None;
        }
        if let Some(t) = self.next_allowed {
            if now < t {
                return Some(false);
            }
        }
        self.owed = false;
        self.iman |= IMAN_IP;
        self.erdp |= ERDP_EHB;
        let interval = u64::from(self.imod & 0xffff) * 250;
        self.next_allowed = (interval > 0).then(|| now + Duration::from_nanos(interval));
        Some(true)
    }

    /// When a delayed interrupt becomes due.
    pub fn deadline(&self) -> Option<Instant> {
        if self.owed {
            self.next_allowed
        } else {
            None
        }
    }

    /// Whether the interrupter asks for an interrupt (IP and IE).
    pub fn level(&self) -> bool {
        self.iman & (IMAN_IP | IMAN_IE) == (IMAN_IP | IMAN_IE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(ram: &GuestRam, seg_trbs: u16) -> Interrupter {
        let mut i = Interrupter::default();
        i.reset();
        ram.write(0x1000, &0x2000u64.to_le_bytes()).unwrap();
        ram.write(0x1008, &seg_trbs.to_le_bytes()).unwrap();
        i.erstsz = 1;
        i.erstba = 0x1000;
        i.erdp = 0x2000;
        i
    }

    fn ev(n: u64) -> Trb {
        Trb {
            parameter: n,
            status: 0,
            control: ty::PORT_STATUS_CHANGE << 10,
        }
    }

    #[test]
    fn writes_with_cycle_and_detects_full() {
        let ram = GuestRam::anonymous(0x10000);
        let mut i = setup(&ram, 16);
        for n in 0..14 {
            i.write_event(&ram, ev(n)).unwrap();
        }
        // 15th write leaves one slot: Event Ring Full Error takes it.
        assert_eq!(i.write_event(&ram, ev(14)), Err(EventError::Full));
        assert_eq!(i.write_event(&ram, ev(15)), Err(EventError::Full));
        let mut b = [0u8; 16];
        ram.read(0x2000 + 14 * 16, &mut b).unwrap();
        let t = Trb::from_bytes(&b);
        assert_eq!(t.trb_type(), ty::HOST_CONTROLLER_EVENT);
        assert_eq!(t.status >> 24, cc::EVENT_RING_FULL);
        assert!(t.cycle());
        // Guest consumes everything: producer resumes and wraps with PCS=0.
        i.set_erdp(0x2000 + 15 * 16, true);
        i.write_event(&ram, ev(99)).unwrap();
        i.write_event(&ram, ev(100)).unwrap();
        ram.read(0x2000, &mut b).unwrap();
        let t = Trb::from_bytes(&b);
        assert_eq!((t.parameter, t.cycle()), (100, false));
    }

    #[test]
    fn zero_and_huge_erst_are_rejected() {
        let ram = GuestRam::anonymous(0x10000);
        let mut i = setup(&ram, 16);
        i.erstsz = 0;
        assert_eq!(i.write_event(&ram, ev(0)), Err(EventError::Disabled));
        i.erstsz = 0xffff;
        assert_eq!(i.write_event(&ram, ev(0)), Err(EventError::Invalid));
        i.erstsz = 1;
        ram.write(0x1008, &0u16.to_le_bytes()).unwrap();
        assert_eq!(i.write_event(&ram, ev(0)), Err(EventError::Invalid));
        ram.write(0x1008, &16u16.to_le_bytes()).unwrap();
        i.erstba = 0xffff_ffff_0000;
        assert_eq!(i.write_event(&ram, ev(0)), Err(EventError::Invalid));
    }

    #[test]
    fn moderation_delays_second_interrupt() {
        let mut i = Interrupter::default();
        i.reset();
        i.iman = IMAN_IE;
        i.imod = 4000; // 1 ms
        let t0 = Instant::now();
        i.owe_interrupt();
        assert_eq!(i.due(t0), Some(true));
        i.set_erdp(0, true); // guest handled it
        i.owe_interrupt();
        assert_eq!(i.due(t0), Some(false));
        assert!(i.deadline().is_some());
        assert_eq!(i.due(t0 + Duration::from_millis(2)), Some(true));
    }
}
