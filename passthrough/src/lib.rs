//! Host USB passthrough: a physical USB device, reached through Linux
//! usbfs, served to the guest as an [`hcd_emul::usb::UsbDevice`] behind
//! any of our controllers.
//!
//! * [`rule`]: which device (bus + address, port path, vendor:product
//!   with optional serial) and the sysfs scan that finds it.
//! * [`usbfs`]: the kernel interface (asynchronous URBs), the only place
//!   with `unsafe` ioctls.
//! * [`descriptors`]: the host device's descriptors and the rewrite that
//!   shows a SuperSpeed device on a USB 2 root port.
//! * [`HostDevice`]: the backend (see its module documentation for the
//!   threading, ordering, zero-copy and hot-plug rules).
//!
//! Why usbfs ioctls rather than a library: see `docs/design.md`.
#![warn(missing_docs)]

pub mod descriptors;
mod device;
pub mod list;
pub mod rule;
pub mod usbfs;

pub use device::{
    map_status, route_control, ControlRoute, HostDevice, HostError, HostMonitor, HostOptions,
    PassthroughStats, BYTES_IN_FLIGHT, MAX_URB_LEN,
};
pub use rule::{HostDeviceInfo, MatchRule, RuleError};
