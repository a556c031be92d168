//! Emulated USB host controllers and the USB core they share.
//!
//! Layering (see `docs/design.md`): [`usb`] (device trait, transfers,
//! descriptors) <- controllers ([`xhci`]) and emulated devices
//! ([`storage`]); [`pci`] models the PCI function every controller is
//! exposed as; [`mem`] is the only path to guest memory. Nothing here knows
//! the hypervisor.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[macro_use]
pub mod ratelimit;
pub mod mem;
pub mod storage;
pub mod usb;

pub use mem::{DmaError, FileCursor, GuestRam, HostRange};
pub use storage::{StorageError, UsbStorage};
pub mod pci;
pub mod xhci;
