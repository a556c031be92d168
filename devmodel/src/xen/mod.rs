//! The Xen transport: a secondary ioreq server next to qemu-xen.
//!
//! - [`hv`]: what we need from Xen, as traits;
//! - [`sys`]: the real thing, pure Rust over privcmd / evtchn ioctls;
//! - [`abi`]: Xen's structures and constants, checked against Xen's
//!   headers by `tests/xen_abi.rs`.

pub mod abi;
pub mod hv;
pub mod sys;
