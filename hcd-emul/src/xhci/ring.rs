//! Walking a producer/consumer TRB ring owned by the guest (xHCI 1.2 §4.9).
//!
//! A ring position is a plain value (dequeue address + consumer cycle
//! state). Readers walk a copy and commit it only once a whole unit (a TD,
//! a command) has been taken, so a half-written TD is simply not ready yet.
//! Link TRBs are followed transparently, at most [`LINK_LIMIT`] in a row: a
//! ring made only of Link TRBs (CVE-2016-8576) is an error, not a hang.

use super::trb::{ctl, ty, Trb, TRB_SIZE};
use crate::mem::GuestRam;

/// Most consecutive Link TRBs followed before the ring is declared broken
/// (QEMU uses 32 as well).
pub const LINK_LIMIT: usize = 32;

/// Why a ring could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The ring lies in memory that is not guest RAM.
    #[error("ring TRB at {0:#x} is not in guest memory")]
    Dma(u64),
    /// Too many Link TRBs in a row.
    #[error("more than {LINK_LIMIT} Link TRBs in a row at {0:#x}")]
    LinkLoop(u64),
}

/// A consumer position on a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct RingPos {
    /// Address of the next TRB to consume.
    pub dequeue: u64,
    /// Consumer Cycle State.
    pub cycle: bool,
}

impl RingPos {
    /// A position at `addr` (low 4 bits ignored) with cycle state `cycle`.
    pub fn new(addr: u64, cycle: bool) -> Self {
        Self {
            dequeue: addr & !0xf,
            cycle,
        }
    }

    /// Reads the next TRB the guest has handed over, following Link TRBs.
    /// Returns its address, the TRB, and the position after it; `None` if
    /// the guest has not produced it yet (cycle bit mismatch).
    pub fn next(self, ram: &GuestRam) -> Result<Option<(u64, Trb, RingPos)>, RingError> {
        let mut pos = self;
        for _ in 0..=LINK_LIMIT {
            let mut b = [0u8; 16];
            ram.read(pos.dequeue, &mut b)
                .map_err(|_| RingError::Dma(pos.dequeue))?;
            let trb = Trb::from_bytes(&b);
            if trb.cycle() != pos.cycle {
                return Ok(None);
            }
            if trb.trb_type() == ty::LINK {
                let toggle = trb.has(ctl::TOGGLE_CYCLE);
                pos = RingPos {
                    dequeue: trb.parameter & !0xf,
                    cycle: pos.cycle ^ toggle,
                };
                continue;
            }
            let after = RingPos {
                dequeue: pos.dequeue.wrapping_add(TRB_SIZE),
                cycle: pos.cycle,
            };
            return Ok(Some((pos.dequeue, trb, after)));
        }
        Err(RingError::LinkLoop(self.dequeue))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(ram: &GuestRam, addr: u64, t: Trb) {
        ram.write(addr, &t.to_bytes()).unwrap();
    }

    #[test]
    fn follows_link_with_toggle() {
        let ram = GuestRam::anonymous(0x10000);
        put(
            &ram,
            0x1000,
            Trb {
                parameter: 7,
                status: 0,
                control: (ty::NORMAL << 10) | 1,
            },
        );
        put(
            &ram,
            0x1010,
            Trb {
                parameter: 0x1000,
                status: 0,
                control: (ty::LINK << 10) | ctl::TOGGLE_CYCLE | 1,
            },
        );
        let p = RingPos::new(0x1000, true);
        let (a, t, p) = p.next(&ram).unwrap().unwrap();
        assert_eq!((a, t.parameter), (0x1000, 7));
        // After the link, cycle flips and the old TRB no longer matches.
        assert_eq!(p.next(&ram).unwrap(), None);
    }

    #[test]
    fn self_linked_ring_is_an_error_with_and_without_toggle() {
        let ram = GuestRam::anonymous(0x10000);
        put(
            &ram,
            0x2000,
            Trb {
                parameter: 0x2000,
                status: 0,
                control: (ty::LINK << 10) | 1,
            },
        );
        assert_eq!(
            RingPos::new(0x2000, true).next(&ram),
            Err(RingError::LinkLoop(0x2000))
        );
        // With toggle the second visit has the wrong cycle: ring empty.
        put(
            &ram,
            0x3000,
            Trb {
                parameter: 0x3000,
                status: 0,
                control: (ty::LINK << 10) | ctl::TOGGLE_CYCLE | 1,
            },
        );
        assert_eq!(RingPos::new(0x3000, true).next(&ram), Ok(None));
        // Two links toggling each other forever are still capped.
        put(
            &ram,
            0x4000,
            Trb {
                parameter: 0x4010,
                status: 0,
                control: (ty::LINK << 10) | ctl::TOGGLE_CYCLE | 1,
            },
        );
        put(
            &ram,
            0x4010,
            Trb {
                parameter: 0x4000,
                status: 0,
                control: (ty::LINK << 10) | ctl::TOGGLE_CYCLE,
            },
        );
        assert_eq!(
            RingPos::new(0x4000, true).next(&ram),
            Err(RingError::LinkLoop(0x4000))
        );
    }

    #[test]
    fn unmapped_ring_is_a_dma_error() {
        let ram = GuestRam::anonymous(0x1000);
        assert_eq!(
            RingPos::new(0x10_0000, true).next(&ram),
            Err(RingError::Dma(0x10_0000))
        );
    }
}
