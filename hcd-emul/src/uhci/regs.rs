//! UHCI 1.1 register layout (chapter 2) and schedule data structures
//! (chapter 3), as constants.

/// I/O BAR (BAR 4) size: 32 bytes, as PIIX3/PIIX4 decode (QEMU too: "BSD
/// guests seem to rely on this").
pub const BAR4_SIZE: u64 = 0x20;
/// Root ports (PORTSC1, PORTSC2).
pub const N_PORTS: usize = 2;
/// Offset of USBLEGSUP in configuration space (PIIX3/PIIX4 §2.2.?; what
/// Linux's pci-quirks and uhci-pci read and write).
pub const USBLEGSUP: u8 = 0xc0;

// I/O registers (§2.1).
/// USBCMD (16 bits).
pub const REG_USBCMD: u64 = 0x00;
/// USBSTS (16 bits).
pub const REG_USBSTS: u64 = 0x02;
/// USBINTR (16 bits).
pub const REG_USBINTR: u64 = 0x04;
/// FRNUM (16 bits).
pub const REG_FRNUM: u64 = 0x06;
/// FLBASEADD (32 bits).
pub const REG_FLBASEADD: u64 = 0x08;
/// SOFMOD (8 bits).
pub const REG_SOFMOD: u64 = 0x0c;
/// PORTSC1 (16 bits); PORTSC2 follows.
pub const REG_PORTSC: u64 = 0x10;

// USBCMD (§2.1.1).
/// Run/Stop.
pub const CMD_RS: u16 = 1 << 0;
/// Host Controller Reset.
pub const CMD_HCRESET: u16 = 1 << 1;
/// Global Reset.
pub const CMD_GRESET: u16 = 1 << 2;
/// Enter Global Suspend Mode.
pub const CMD_EGSM: u16 = 1 << 3;
/// Force Global Resume.
pub const CMD_FGR: u16 = 1 << 4;
/// Software Debug.
pub const CMD_SWDBG: u16 = 1 << 5;
/// Configure Flag.
pub const CMD_CF: u16 = 1 << 6;
/// Max Packet (64 bytes for FSBR).
pub const CMD_MAXP: u16 = 1 << 7;
/// Bits software may set.
pub const CMD_WRITABLE: u16 = 0xff;

// USBSTS (§2.1.2), write 1 to clear.
/// USB Interrupt (IOC or short packet).
pub const STS_USBINT: u16 = 1 << 0;
/// USB Error Interrupt.
pub const STS_ERROR: u16 = 1 << 1;
/// Resume Detect.
pub const STS_RD: u16 = 1 << 2;
/// Host System Error.
pub const STS_HSE: u16 = 1 << 3;
/// Host Controller Process Error.
pub const STS_HCPE: u16 = 1 << 4;
/// HCHalted.
pub const STS_HCH: u16 = 1 << 5;
/// The bits a write of 1 clears.
pub const STS_RWC: u16 = 0x3f;

// USBINTR (§2.1.3).
/// Timeout/CRC interrupt enable (errors).
pub const INTR_TIMEOUT_CRC: u16 = 1 << 0;
/// Resume interrupt enable.
pub const INTR_RESUME: u16 = 1 << 1;
/// Interrupt On Complete enable.
pub const INTR_IOC: u16 = 1 << 2;
/// Short packet interrupt enable.
pub const INTR_SP: u16 = 1 << 3;

// PORTSC (§2.1.7).
/// Current Connect Status.
pub const PORT_CCS: u16 = 1 << 0;
/// Connect Status Change (write 1 to clear).
pub const PORT_CSC: u16 = 1 << 1;
/// Port Enabled.
pub const PORT_PE: u16 = 1 << 2;
/// Port Enable Change (write 1 to clear).
pub const PORT_PEC: u16 = 1 << 3;
/// Line status D+ (bit 4) and D- (bit 5).
pub const PORT_LS: u16 = 3 << 4;
/// Line status: J state of a full-speed device (D+ high).
pub const PORT_LS_FS_J: u16 = 1 << 4;
/// Line status: J state of a low-speed device (D- high).
pub const PORT_LS_LS_J: u16 = 1 << 5;
/// Resume Detect.
pub const PORT_RD: u16 = 1 << 6;
/// Reserved, reads 1 (Linux counts ports by it).
pub const PORT_ALWAYS1: u16 = 1 << 7;
/// Low Speed Device Attached.
pub const PORT_LSDA: u16 = 1 << 8;
/// Port Reset.
pub const PORT_PR: u16 = 1 << 9;
/// Suspend.
pub const PORT_SUSP: u16 = 1 << 12;
/// Write-1-to-clear bits.
pub const PORT_RWC: u16 = PORT_CSC | PORT_PEC;
/// What a register offset past the last port reads (QEMU: bit 7 clear, so
/// Linux's port count stops there).
pub const PORT_MISSING: u16 = 0xff7f;

// Link pointers (§3.1, §3.2.1, §3.3).
/// Terminate.
pub const LINK_T: u32 = 1 << 0;
/// The link names a QH (else a TD).
pub const LINK_Q: u32 = 1 << 1;
/// Depth first (TD link pointers only).
pub const LINK_VF: u32 = 1 << 2;
/// Address bits.
pub const LINK_ADDR: u32 = !0xf;

// TD control and status (§3.2.2).
/// Short Packet Detect.
pub const TD_SPD: u32 = 1 << 29;
/// Error counter (C_ERR), bits 28:27.
pub const TD_CERR: u32 = 3 << 27;
/// Low-speed device.
pub const TD_LS: u32 = 1 << 26;
/// Isochronous select.
pub const TD_IOS: u32 = 1 << 25;
/// Interrupt On Complete.
pub const TD_IOC: u32 = 1 << 24;
/// Active.
pub const TD_ACTIVE: u32 = 1 << 23;
/// Stalled.
pub const TD_STALLED: u32 = 1 << 22;
/// Data buffer error.
pub const TD_DBUFERR: u32 = 1 << 21;
/// Babble detected.
pub const TD_BABBLE: u32 = 1 << 20;
/// NAK received.
pub const TD_NAK: u32 = 1 << 19;
/// CRC/time out error.
pub const TD_CRCTIMEO: u32 = 1 << 18;
/// Bitstuff error.
pub const TD_BITSTUFF: u32 = 1 << 17;
/// Every status bit (cleared when a TD executes).
pub const TD_STATUS: u32 = 0x00ff_0000 & !TD_ACTIVE;
/// Actual length, n - 1 (0x7ff: none).
pub const TD_ACTLEN: u32 = 0x7ff;

// TD token (§3.2.3).
/// Maximum length field shift (n - 1; 0x7ff: zero length).
pub const TOK_MAXLEN_SHIFT: u32 = 21;
/// Data toggle.
pub const TOK_D: u32 = 1 << 19;
/// PIDs.
pub const PID_SETUP: u8 = 0x2d;
/// IN.
pub const PID_IN: u8 = 0x69;
/// OUT.
pub const PID_OUT: u8 = 0xe1;
/// The largest valid maximum length field: 1280 bytes (0x4ff); 0x500 to
/// 0x7fe are invalid (§3.2.3), 0x7ff means zero.
pub const MAXLEN_MAX: u32 = 0x4ff;
