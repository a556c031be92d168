//! EHCI 1.0 register layout (chapter 2) and schedule data structures
//! (chapter 3), as constants.

/// Capability registers' length; operational registers follow.
pub const CAP_LENGTH: u64 = 0x20;
/// HCIVERSION 1.00.
pub const HCI_VERSION: u32 = 0x0100;
/// Root ports (HCSPARAMS.N_PORTS); port 1 carries the rate-matching hub.
pub const N_PORTS: usize = 6;
/// Memory BAR size (the spec's 4 KiB page).
pub const BAR0_SIZE: u64 = 0x1000;
/// Offset of the EHCI extended capability (USBLEGSUP) in configuration
/// space (HCCPARAMS.EECP).
pub const EECP: u8 = 0x68;

// Operational registers, offsets from CAP_LENGTH (§2.3).
/// USBCMD.
pub const OP_USBCMD: u64 = 0x00;
/// USBSTS.
pub const OP_USBSTS: u64 = 0x04;
/// USBINTR.
pub const OP_USBINTR: u64 = 0x08;
/// FRINDEX.
pub const OP_FRINDEX: u64 = 0x0c;
/// CTRLDSSEGMENT.
pub const OP_CTRLDSSEGMENT: u64 = 0x10;
/// PERIODICLISTBASE.
pub const OP_PERIODICLISTBASE: u64 = 0x14;
/// ASYNCLISTADDR.
pub const OP_ASYNCLISTADDR: u64 = 0x18;
/// CONFIGFLAG.
pub const OP_CONFIGFLAG: u64 = 0x40;
/// PORTSC(1); port n at OP_PORTSC + 4 * (n - 1).
pub const OP_PORTSC: u64 = 0x44;

// USBCMD (§2.3.1).
/// Run/Stop.
pub const CMD_RS: u32 = 1 << 0;
/// Host Controller Reset.
pub const CMD_HCRESET: u32 = 1 << 1;
/// Frame List Size (1024/512/256 entries).
pub const CMD_FLS: u32 = 3 << 2;
/// Periodic Schedule Enable.
pub const CMD_PSE: u32 = 1 << 4;
/// Asynchronous Schedule Enable.
pub const CMD_ASE: u32 = 1 << 5;
/// Interrupt on Async Advance Doorbell.
pub const CMD_IAAD: u32 = 1 << 6;
/// Light Host Controller Reset (not supported: reads 0).
pub const CMD_LHCR: u32 = 1 << 7;
/// Interrupt Threshold Control.
pub const CMD_ITC: u32 = 0xff << 16;
/// Bits software may set (FLS is fixed at 1024: HCCPARAMS.PFL = 0).
pub const CMD_WRITABLE: u32 = CMD_RS | CMD_PSE | CMD_ASE | CMD_ITC | (3 << 8) | (1 << 11);
/// Reset value: ITC = 8 micro-frames.
pub const CMD_DEFAULT: u32 = 0x0008_0000;

// USBSTS (§2.3.2).
/// USB Interrupt (IOC, short packet).
pub const STS_USBINT: u32 = 1 << 0;
/// USB Error Interrupt.
pub const STS_USBERRINT: u32 = 1 << 1;
/// Port Change Detect.
pub const STS_PCD: u32 = 1 << 2;
/// Frame List Rollover.
pub const STS_FLR: u32 = 1 << 3;
/// Host System Error.
pub const STS_HSE: u32 = 1 << 4;
/// Interrupt on Async Advance.
pub const STS_IAA: u32 = 1 << 5;
/// The interrupt bits (write 1 to clear; enabled by USBINTR bit for bit).
pub const STS_INTS: u32 = 0x3f;
/// HCHalted.
pub const STS_HCHALTED: u32 = 1 << 12;
/// Reclamation.
pub const STS_RECLAMATION: u32 = 1 << 13;
/// Periodic Schedule Status.
pub const STS_PSS: u32 = 1 << 14;
/// Asynchronous Schedule Status.
pub const STS_ASS: u32 = 1 << 15;

// PORTSC (§2.3.8).
/// Current Connect Status.
pub const PORT_CCS: u32 = 1 << 0;
/// Connect Status Change (RWC).
pub const PORT_CSC: u32 = 1 << 1;
/// Port Enabled.
pub const PORT_PED: u32 = 1 << 2;
/// Port Enable Change (RWC).
pub const PORT_PEDC: u32 = 1 << 3;
/// Over-current Active.
pub const PORT_OCA: u32 = 1 << 4;
/// Over-current Change (RWC).
pub const PORT_OCC: u32 = 1 << 5;
/// Force Port Resume.
pub const PORT_FPR: u32 = 1 << 6;
/// Suspend.
pub const PORT_SUSP: u32 = 1 << 7;
/// Port Reset.
pub const PORT_PR: u32 = 1 << 8;
/// Line Status (J-state: a full- or high-speed device before reset).
pub const PORT_LS_J: u32 = 2 << 10;
/// Line Status field.
pub const PORT_LS: u32 = 3 << 10;
/// Port Power (always on: HCSPARAMS.PPC = 0).
pub const PORT_PP: u32 = 1 << 12;
/// Port Owner (1: a companion controller's; we have none).
pub const PORT_PO: u32 = 1 << 13;
/// The write-1-to-clear bits.
pub const PORT_RWC: u32 = PORT_CSC | PORT_PEDC | PORT_OCC;
/// Port Indicator, Port Test Control and the wake enables: stored as
/// written.
pub const PORT_STORED: u32 = (3 << 14) | (0xf << 16) | (7 << 20);

// Link pointers (§3.1).
/// Terminate.
pub const LINK_T: u32 = 1;
/// Type field.
pub const LINK_TYPE: u32 = 3 << 1;
/// Type iTD.
pub const TYPE_ITD: u32 = 0;
/// Type QH.
pub const TYPE_QH: u32 = 1 << 1;
/// Type siTD.
pub const TYPE_SITD: u32 = 2 << 1;
/// Type FSTN.
pub const TYPE_FSTN: u32 = 3 << 1;
/// Address bits of a link.
pub const LINK_ADDR: u32 = !0x1f;

// qTD token (§3.5.3).
/// Active.
pub const TOK_ACTIVE: u32 = 1 << 7;
/// Halted.
pub const TOK_HALTED: u32 = 1 << 6;
/// Data Buffer Error.
pub const TOK_DBE: u32 = 1 << 5;
/// Babble Detected.
pub const TOK_BABBLE: u32 = 1 << 4;
/// Transaction Error.
pub const TOK_XACT: u32 = 1 << 3;
/// Missed Micro-Frame.
pub const TOK_MMF: u32 = 1 << 2;
/// Split Transaction State.
pub const TOK_SPLITXSTATE: u32 = 1 << 1;
/// Ping state / ERR.
pub const TOK_PING: u32 = 1 << 0;
/// PID code field.
pub const TOK_PID: u32 = 3 << 8;
/// PID OUT.
pub const PID_OUT: u32 = 0;
/// PID IN.
pub const PID_IN: u32 = 1;
/// PID SETUP.
pub const PID_SETUP: u32 = 2;
/// Error counter.
pub const TOK_CERR: u32 = 3 << 10;
/// Current page.
pub const TOK_CPAGE: u32 = 7 << 12;
/// Interrupt On Complete.
pub const TOK_IOC: u32 = 1 << 15;
/// Total Bytes to Transfer.
pub const TOK_BYTES_SHIFT: u32 = 16;
/// Total Bytes mask (after the shift).
pub const TOK_BYTES_MASK: u32 = 0x7fff;
/// Data toggle.
pub const TOK_DT: u32 = 1 << 31;

// QH endpoint characteristics, dword 1 (§3.6.2).
/// Endpoint speed: 0 full, 1 low, 2 high.
pub const QH_EPS_SHIFT: u32 = 12;
/// Data Toggle Control (1: from the qTD).
pub const QH_DTC: u32 = 1 << 14;
/// Head of Reclamation List.
pub const QH_H: u32 = 1 << 15;
/// Control endpoint (full/low speed).
pub const QH_C: u32 = 1 << 27;
