//! Transfer Request Blocks (xHCI 1.2 §6.4): the 16-byte unit of every ring.

/// Size of a TRB in bytes.
pub const TRB_SIZE: u64 = 16;

/// TRB types (§6.4.6 table 6-91).
#[allow(missing_docs)]
pub mod ty {
    pub const NORMAL: u32 = 1;
    pub const SETUP: u32 = 2;
    pub const DATA: u32 = 3;
    pub const STATUS: u32 = 4;
    pub const ISOCH: u32 = 5;
    pub const LINK: u32 = 6;
    pub const EVENT_DATA: u32 = 7;
    pub const NOOP: u32 = 8;
    pub const ENABLE_SLOT: u32 = 9;
    pub const DISABLE_SLOT: u32 = 10;
    pub const ADDRESS_DEVICE: u32 = 11;
    pub const CONFIGURE_ENDPOINT: u32 = 12;
    pub const EVALUATE_CONTEXT: u32 = 13;
    pub const RESET_ENDPOINT: u32 = 14;
    pub const STOP_ENDPOINT: u32 = 15;
    pub const SET_TR_DEQUEUE: u32 = 16;
    pub const RESET_DEVICE: u32 = 17;
    pub const NOOP_COMMAND: u32 = 23;
    pub const TRANSFER_EVENT: u32 = 32;
    pub const COMMAND_COMPLETION: u32 = 33;
    pub const PORT_STATUS_CHANGE: u32 = 34;
    pub const HOST_CONTROLLER_EVENT: u32 = 37;
}

/// Completion codes (§6.4.5 table 6-90).
#[allow(missing_docs)]
pub mod cc {
    pub const SUCCESS: u32 = 1;
    pub const DATA_BUFFER_ERROR: u32 = 2;
    pub const BABBLE: u32 = 3;
    pub const USB_TRANSACTION_ERROR: u32 = 4;
    pub const TRB_ERROR: u32 = 5;
    pub const STALL: u32 = 6;
    pub const RESOURCE_ERROR: u32 = 7;
    pub const NO_SLOTS: u32 = 9;
    pub const INVALID_STREAM_TYPE: u32 = 10;
    pub const SLOT_NOT_ENABLED: u32 = 11;
    pub const ENDPOINT_NOT_ENABLED: u32 = 12;
    pub const SHORT_PACKET: u32 = 13;
    pub const PARAMETER_ERROR: u32 = 17;
    pub const CONTEXT_STATE_ERROR: u32 = 19;
    pub const EVENT_RING_FULL: u32 = 21;
    pub const COMMAND_RING_STOPPED: u32 = 24;
    pub const COMMAND_ABORTED: u32 = 25;
    pub const STOPPED: u32 = 26;
    pub const STOPPED_LENGTH_INVALID: u32 = 27;
    pub const INVALID_STREAM_ID: u32 = 34;
}

/// Control-dword bits shared by several TRB types.
#[allow(missing_docs)]
pub mod ctl {
    pub const CYCLE: u32 = 1 << 0;
    pub const TOGGLE_CYCLE: u32 = 1 << 1; // Link
    pub const ENT: u32 = 1 << 1; // Normal/Data
    pub const ISP: u32 = 1 << 2;
    pub const CHAIN: u32 = 1 << 4;
    pub const IOC: u32 = 1 << 5;
    pub const IDT: u32 = 1 << 6;
    pub const BEI: u32 = 1 << 9;
    pub const BSR: u32 = 1 << 9; // Address Device
    pub const DC: u32 = 1 << 9; // Configure Endpoint
    pub const DIR_IN: u32 = 1 << 16; // Data/Status
    pub const ED: u32 = 1 << 2; // Transfer Event: Event Data
}

/// One TRB as read from guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Trb {
    /// Parameter (dwords 0-1).
    pub parameter: u64,
    /// Status (dword 2).
    pub status: u32,
    /// Control (dword 3).
    pub control: u32,
}

impl Trb {
    /// Decodes 16 bytes.
    pub fn from_bytes(b: &[u8; 16]) -> Self {
        let mut p = [0u8; 8];
        p.copy_from_slice(&b[0..8]);
        Trb {
            parameter: u64::from_le_bytes(p),
            status: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            control: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    /// Encodes to 16 bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.parameter.to_le_bytes());
        b[8..12].copy_from_slice(&self.status.to_le_bytes());
        b[12..16].copy_from_slice(&self.control.to_le_bytes());
        b
    }

    /// TRB type field.
    pub fn trb_type(&self) -> u32 {
        (self.control >> 10) & 0x3f
    }
    /// Cycle bit.
    pub fn cycle(&self) -> bool {
        self.control & ctl::CYCLE != 0
    }
    /// Whether `bit` is set in the control dword.
    pub fn has(&self, bit: u32) -> bool {
        self.control & bit != 0
    }
    /// TRB Transfer Length (17 bits) of transfer TRBs.
    pub fn transfer_len(&self) -> u32 {
        self.status & 0x1_ffff
    }
    /// Interrupter Target of transfer TRBs.
    pub fn interrupter(&self) -> usize {
        (self.status >> 22) as usize
    }
    /// Slot ID of command TRBs.
    pub fn slot_id(&self) -> usize {
        (self.control >> 24) as usize
    }
    /// Endpoint ID (DCI) of endpoint commands.
    pub fn endpoint_id(&self) -> usize {
        ((self.control >> 16) & 0x1f) as usize
    }
}
