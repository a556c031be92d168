//! Emulated USB host controllers and the USB core they share.
//!
//! Layering (see `docs/design.md`): [`usb`] (device trait, transfers,
//! descriptors) <- controllers ([`xhci`], [`ehci`], [`uhci`]) and emulated devices
//! ([`storage`], [`hid`]); [`pci`] models the PCI function every controller is
//! exposed as; [`mem`] is the only path to guest memory. Nothing here knows
//! the hypervisor.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[macro_use]
pub mod ratelimit;
pub mod capture;
pub mod hid;
pub mod mem;
pub mod storage;
pub mod usb;

pub use mem::{DmaError, FileCursor, GuestRam, HostRange, WorkBudget};
pub use storage::{StorageError, UsbStorage};
pub mod controller;
pub mod ehci;
pub mod pci;
pub mod poll;
pub mod uhci;
pub mod xhci;
