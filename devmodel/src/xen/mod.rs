//! The Xen transport: a secondary ioreq server next to qemu-xen.
//!
//! - [`hv`]: what we need from Xen, as traits;
//! - [`sys`]: the real thing, pure Rust over privcmd / evtchn ioctls;
//! - [`abi`]: Xen's structures and constants, checked against Xen's
//!   headers by `tests/xen_abi.rs`;
//! - [`server`]: the ioreq server (protocol, PCI on Xen, event loop);
//! - [`mapcache`]: guest memory mapped on demand.
//!
//! The protocol is tested against an in-process simulation of the ioreq
//! page, event channels and guest memory (`fake.rs`, test builds only).

pub mod abi;
#[cfg(test)]
mod fake;
/// The simulated hypervisor, for the `xen_ioreq` fuzz target.
#[cfg(all(feature = "fuzzing", not(test)))]
#[doc(hidden)]
#[allow(missing_docs)]
#[path = "fake.rs"]
pub mod fake;
pub mod hv;
pub mod mapcache;
pub mod server;
pub mod sys;
#[cfg(test)]
mod tests;
