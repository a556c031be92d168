//! Register layout and bit definitions (xHCI 1.2 chapter 5).

/// Length of the capability register block; operational registers follow.
pub const CAP_LENGTH: u64 = 0x40;
/// Interface version implemented (xHCI 1.2 §5.3.2).
pub const HCI_VERSION: u32 = 0x0120;
/// Offset of the runtime registers (RTSOFF).
pub const RUNTIME_OFFSET: u64 = 0x1000;
/// Offset of the doorbell array (DBOFF).
pub const DOORBELL_OFFSET: u64 = 0x2000;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u32 = 0x3000;
/// Offset of the MSI-X pending-bit array in BAR 0.
pub const MSIX_PBA_OFFSET: u32 = 0x3800;
/// Size of BAR 0.
pub const BAR0_SIZE: u64 = 0x4000;

/// Device slots supported.
pub const MAX_SLOTS: usize = 32;
/// Interrupters supported.
pub const MAX_INTRS: usize = 4;
/// USB 2 root ports (numbered 1..=USB2_PORTS).
pub const USB2_PORTS: usize = 4;
/// USB 3 root ports (numbered USB2_PORTS+1..=MAX_PORTS).
pub const USB3_PORTS: usize = 4;
/// All root ports.
pub const MAX_PORTS: usize = USB2_PORTS + USB3_PORTS;
/// log2 of the most Event Ring Segment Table entries (ERST Max, §5.3.4).
pub const ERST_MAX_LOG2: u32 = 4;
/// Scratchpad buffers the driver must allocate (§4.20).
pub const SCRATCHPAD_BUFS: u32 = 2;

// Operational register offsets (relative to CAP_LENGTH), §5.4.
/// USBCMD.
pub const OP_USBCMD: u64 = 0x00;
/// USBSTS.
pub const OP_USBSTS: u64 = 0x04;
/// PAGESIZE.
pub const OP_PAGESIZE: u64 = 0x08;
/// DNCTRL.
pub const OP_DNCTRL: u64 = 0x14;
/// CRCR (64-bit).
pub const OP_CRCR: u64 = 0x18;
/// DCBAAP (64-bit).
pub const OP_DCBAAP: u64 = 0x30;
/// CONFIG.
pub const OP_CONFIG: u64 = 0x38;
/// First port register set.
pub const OP_PORTS: u64 = 0x400;

/// USBCMD Run/Stop.
pub const USBCMD_RS: u32 = 1 << 0;
/// USBCMD Host Controller Reset.
pub const USBCMD_HCRST: u32 = 1 << 1;
/// USBCMD Interrupter Enable.
pub const USBCMD_INTE: u32 = 1 << 2;
/// USBCMD Host System Error Enable.
pub const USBCMD_HSEE: u32 = 1 << 3;
/// USBCMD Light HC Reset.
pub const USBCMD_LHCRST: u32 = 1 << 7;
/// USBCMD Controller Save State.
pub const USBCMD_CSS: u32 = 1 << 8;
/// USBCMD Controller Restore State.
pub const USBCMD_CRS: u32 = 1 << 9;
/// USBCMD writable bits we keep.
pub const USBCMD_MASK: u32 = 0x0000_3f0d;

/// USBSTS HC Halted.
pub const USBSTS_HCH: u32 = 1 << 0;
/// USBSTS Host System Error (RW1C).
pub const USBSTS_HSE: u32 = 1 << 2;
/// USBSTS Event Interrupt (RW1C).
pub const USBSTS_EINT: u32 = 1 << 3;
/// USBSTS Port Change Detect (RW1C).
pub const USBSTS_PCD: u32 = 1 << 4;
/// USBSTS Save/Restore Error (RW1C).
pub const USBSTS_SRE: u32 = 1 << 10;
/// USBSTS Controller Not Ready.
pub const USBSTS_CNR: u32 = 1 << 11;
/// USBSTS Host Controller Error.
pub const USBSTS_HCE: u32 = 1 << 12;
/// USBSTS write-1-to-clear bits.
pub const USBSTS_W1C: u32 = USBSTS_HSE | USBSTS_EINT | USBSTS_PCD | USBSTS_SRE;

/// CRCR Ring Cycle State.
pub const CRCR_RCS: u64 = 1 << 0;
/// CRCR Command Stop.
pub const CRCR_CS: u64 = 1 << 1;
/// CRCR Command Abort.
pub const CRCR_CA: u64 = 1 << 2;
/// CRCR Command Ring Running.
pub const CRCR_CRR: u64 = 1 << 3;

// Runtime registers, §5.5.
/// Offset of interrupter register set 0 within the runtime block.
pub const RT_IR0: u64 = 0x20;
/// Size of one interrupter register set.
pub const RT_IR_STRIDE: u64 = 0x20;
/// IMAN Interrupt Pending (RW1C).
pub const IMAN_IP: u32 = 1 << 0;
/// IMAN Interrupt Enable.
pub const IMAN_IE: u32 = 1 << 1;
/// ERDP Event Handler Busy (RW1C).
pub const ERDP_EHB: u64 = 1 << 3;

// PORTSC, §5.4.8.
/// Current Connect Status.
pub const PORTSC_CCS: u32 = 1 << 0;
/// Port Enabled/Disabled (RW1C).
pub const PORTSC_PED: u32 = 1 << 1;
/// Over-current Active.
pub const PORTSC_OCA: u32 = 1 << 3;
/// Port Reset (RW1S).
pub const PORTSC_PR: u32 = 1 << 4;
/// Port Link State shift.
pub const PORTSC_PLS_SHIFT: u32 = 5;
/// Port Link State mask (after shift).
pub const PORTSC_PLS_MASK: u32 = 0xf;
/// Port Power.
pub const PORTSC_PP: u32 = 1 << 9;
/// Port Speed shift.
pub const PORTSC_SPEED_SHIFT: u32 = 10;
/// Port Indicator Control shift (2 bits).
pub const PORTSC_PIC_SHIFT: u32 = 14;
/// Link State Write Strobe.
pub const PORTSC_LWS: u32 = 1 << 16;
/// Connect Status Change.
pub const PORTSC_CSC: u32 = 1 << 17;
/// Port Enabled/Disabled Change.
pub const PORTSC_PEC: u32 = 1 << 18;
/// Warm Port Reset Change (USB 3).
pub const PORTSC_WRC: u32 = 1 << 19;
/// Over-current Change.
pub const PORTSC_OCC: u32 = 1 << 20;
/// Port Reset Change.
pub const PORTSC_PRC: u32 = 1 << 21;
/// Port Link State Change.
pub const PORTSC_PLC: u32 = 1 << 22;
/// Port Config Error Change.
pub const PORTSC_CEC: u32 = 1 << 23;
/// Cold Attach Status.
pub const PORTSC_CAS: u32 = 1 << 24;
/// Wake on Connect/Disconnect/Over-current enables.
pub const PORTSC_WAKE_MASK: u32 = 0x7 << 25;
/// Device Removable (0 = removable).
pub const PORTSC_DR: u32 = 1 << 30;
/// Warm Port Reset (RW1S, USB 3).
pub const PORTSC_WPR: u32 = 1 << 31;
/// All change bits (RW1C).
pub const PORTSC_CHANGE_MASK: u32 =
    PORTSC_CSC | PORTSC_PEC | PORTSC_WRC | PORTSC_OCC | PORTSC_PRC | PORTSC_PLC | PORTSC_CEC;

/// Port link states, §5.4.8 table 5-27.
pub mod pls {
    /// U0 (enabled, active).
    pub const U0: u32 = 0;
    /// U3 (suspended).
    pub const U3: u32 = 3;
    /// Disabled.
    pub const DISABLED: u32 = 4;
    /// RxDetect (USB 3, nothing connected).
    pub const RX_DETECT: u32 = 5;
    /// Polling (USB 2 connected, not yet reset).
    pub const POLLING: u32 = 7;
    /// Resume.
    pub const RESUME: u32 = 15;
}

/// Protocol speed IDs (default PSI values, §7.2.2.1.1).
pub mod speed_id {
    /// Full speed.
    pub const FULL: u32 = 1;
    /// Low speed.
    pub const LOW: u32 = 2;
    /// High speed.
    pub const HIGH: u32 = 3;
    /// SuperSpeed Gen1 x1.
    pub const SUPER: u32 = 4;
}
