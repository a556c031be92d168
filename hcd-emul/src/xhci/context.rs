//! Device, slot and endpoint contexts (xHCI 1.2 §6.2), 32-byte layout.

use crate::mem::{DmaError, GuestRam};

/// Size of one context (HCCPARAMS1.CSZ = 0).
pub const CTX_SIZE: u64 = 32;

/// Slot states (§6.2.2 dword 3).
#[allow(missing_docs)]
pub mod slot_state {
    pub const DISABLED_ENABLED: u32 = 0;
    pub const DEFAULT: u32 = 1;
    pub const ADDRESSED: u32 = 2;
    pub const CONFIGURED: u32 = 3;
}

/// Endpoint states (§6.2.3 dword 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum EpState {
    /// Not configured.
    #[default]
    Disabled = 0,
    /// Running.
    Running = 1,
    /// Halted after an error (stall, babble, transaction error, TRB error).
    Halted = 2,
    /// Stopped by Stop Endpoint.
    Stopped = 3,
    /// Error (bad context contents).
    Error = 4,
}

/// Endpoint types (§6.2.3 dword 1 EP Type).
#[allow(missing_docs)]
pub mod ep_type {
    pub const NOT_VALID: u32 = 0;
    pub const ISOCH_OUT: u32 = 1;
    pub const BULK_OUT: u32 = 2;
    pub const INTERRUPT_OUT: u32 = 3;
    pub const CONTROL: u32 = 4;
    pub const ISOCH_IN: u32 = 5;
    pub const BULK_IN: u32 = 6;
    pub const INTERRUPT_IN: u32 = 7;
}

/// A context read from guest memory: eight dwords.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ctx(pub [u32; 8]);

impl Ctx {
    /// Reads the context at `addr`.
    pub fn read(ram: &GuestRam, addr: u64) -> Result<Ctx, DmaError> {
        let mut b = [0u8; 32];
        ram.read(addr, &mut b)?;
        let mut d = [0u32; 8];
        for (i, v) in d.iter_mut().enumerate() {
            *v = u32::from_le_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]);
        }
        Ok(Ctx(d))
    }

    /// Writes the context at `addr`.
    pub fn write(&self, ram: &GuestRam, addr: u64) -> Result<(), DmaError> {
        let mut b = [0u8; 32];
        for (i, v) in self.0.iter().enumerate() {
            b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
        ram.write(addr, &b)
    }

    // Slot context fields.
    /// Root Hub Port Number (slot context).
    pub fn root_port(&self) -> usize {
        ((self.0[1] >> 16) & 0xff) as usize
    }
    /// Context Entries (slot context).
    pub fn context_entries(&self) -> u32 {
        self.0[0] >> 27
    }
    /// Interrupter Target (slot context).
    pub fn slot_interrupter(&self) -> usize {
        (self.0[2] >> 22) as usize
    }
    /// Sets Slot State and USB Device Address (slot context dword 3).
    pub fn set_slot_state(&mut self, state: u32, address: u8) {
        self.0[3] = (state << 27) | u32::from(address);
    }

    // Endpoint context fields.
    /// EP Type.
    pub fn ep_type(&self) -> u32 {
        (self.0[1] >> 3) & 7
    }
    /// Max Packet Size.
    pub fn max_packet(&self) -> u32 {
        self.0[1] >> 16
    }
    /// Max Primary Streams.
    pub fn max_pstreams(&self) -> u32 {
        (self.0[0] >> 10) & 0x1f
    }
    /// Linear Stream Array.
    pub fn lsa(&self) -> bool {
        self.0[0] & (1 << 15) != 0
    }
    /// TR Dequeue Pointer with DCS in bit 0.
    pub fn dequeue(&self) -> u64 {
        u64::from(self.0[2]) | (u64::from(self.0[3]) << 32)
    }
    /// Sets EP State and TR Dequeue Pointer/DCS.
    pub fn set_ep_state(&mut self, st: EpState, dequeue: u64, dcs: bool) {
        self.0[0] = (self.0[0] & !7) | st as u32;
        let d = (dequeue & !0xf) | u64::from(dcs);
        self.0[2] = d as u32;
        self.0[3] = (d >> 32) as u32;
    }
}
