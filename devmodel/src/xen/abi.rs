//! Xen public ABI: structures, ioctl numbers and constants (to be filled).
