//! The `xen-usb-dm` device-model process: configuration, PCI wiring and the
//! transports (Xen ioreq server, vfio-user). The transports arrive with
//! their issues; this crate currently re-exports the controller library.
#![warn(missing_docs)]

pub use hcd_emul;
