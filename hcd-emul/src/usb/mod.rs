//! The USB core shared by every controller and every device backend
//! (USB 2.0 chapters 5 and 9, USB 3.2 chapter 9).
//!
//! Controllers turn the guest's schedules into [`Transfer`]s and hand them to
//! a [`UsbDevice`]; the device completes each one — at once or later, from any
//! thread — through the transfer itself, which posts a [`TransferResult`] to
//! the controller's [`CompletionQueue`]. Controllers never know what kind of
//! device they talk to; devices never know the controller.

pub mod descriptor;
pub mod hub;
#[cfg(test)]
pub(crate) mod sleeper;
pub mod std_requests;
mod transfer;

pub use transfer::{
    CompletionQueue, IsoPacket, Segment, Transfer, TransferHandle, TransferId, TransferKind,
    TransferResult, TransferStatus, TransferTap, Wakeup,
};

/// Bus speed of a device (USB 3.2 §9.6.1; xHCI 1.2 §7.2.2.1.1 default PSIs).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Speed {
    /// 1.5 Mb/s.
    Low,
    /// 12 Mb/s.
    Full,
    /// 480 Mb/s.
    High,
    /// 5 Gb/s.
    Super,
}

impl Speed {
    /// Whether the device belongs on a USB 3 (SuperSpeed) root port.
    pub fn is_superspeed(self) -> bool {
        matches!(self, Speed::Super)
    }
}

/// Direction of a data transfer, seen from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    /// Host to device.
    Out,
    /// Device to host.
    In,
}

/// The eight-byte SETUP packet of a control transfer (USB 2.0 §9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct SetupPacket {
    /// bmRequestType: bit 7 direction, bits 6..5 type, bits 4..0 recipient.
    pub request_type: u8,
    /// bRequest.
    pub request: u8,
    /// wValue.
    pub value: u16,
    /// wIndex.
    pub index: u16,
    /// wLength: the most bytes the data stage may carry.
    pub length: u16,
}

impl SetupPacket {
    /// Decodes the packet from its wire form.
    pub fn from_bytes(b: [u8; 8]) -> Self {
        Self {
            request_type: b[0],
            request: b[1],
            value: u16::from_le_bytes([b[2], b[3]]),
            index: u16::from_le_bytes([b[4], b[5]]),
            length: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    /// Decodes the packet from the 64-bit immediate field of an xHCI Setup TRB.
    pub fn from_u64(v: u64) -> Self {
        Self::from_bytes(v.to_le_bytes())
    }

    /// The wire form.
    pub fn to_bytes(self) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = self.request_type;
        b[1] = self.request;
        b[2..4].copy_from_slice(&self.value.to_le_bytes());
        b[4..6].copy_from_slice(&self.index.to_le_bytes());
        b[6..8].copy_from_slice(&self.length.to_le_bytes());
        b
    }

    /// Direction of the data stage.
    pub fn direction(self) -> Direction {
        if self.request_type & 0x80 != 0 {
            Direction::In
        } else {
            Direction::Out
        }
    }
}

/// A USB device as a controller sees it: emulated devices and host
/// passthrough backends both implement this.
///
/// Asynchronous by contract: [`UsbDevice::submit`] hands the transfer over
/// and returns; the device completes it with [`Transfer::complete`] now or
/// later, from any thread. Transfers submitted on one endpoint must be
/// completed in submission order (controllers also enforce the order they
/// report in); on an endpoint with USB 3 bulk streams the order holds per
/// stream ([`Transfer::stream_id`]). A transfer that is dropped without completion completes as
/// [`TransferStatus::DeviceGone`], so nothing can hang on a lost transfer.
pub trait UsbDevice: Send + std::fmt::Debug {
    /// Short human name for logs ("storage stick.img", "host 1-2").
    fn name(&self) -> String;

    /// Bus speed; decides USB 2 or USB 3 root port.
    fn speed(&self) -> Speed;

    /// Bus reset (port reset): back to the default state, address 0,
    /// unconfigured. Transfers still in flight are completed as cancelled.
    fn reset(&mut self);

    /// Queues a transfer. `xfer.endpoint()` is the endpoint number (0-15),
    /// `xfer.direction()` the data direction (for control transfers, that of
    /// the data stage).
    fn submit(&mut self, xfer: Transfer);

    /// Asks the device to abandon transfer `id`. The controller has already
    /// stopped the transfer from touching guest memory (see
    /// [`TransferHandle::cancel`]); this only lets the device drop its own
    /// work (a passthrough backend discards the host URB).
    fn cancel(&mut self, id: TransferId);

    /// Whether a device is present behind this object now. Backends whose
    /// device can vanish and come back (host passthrough: unplugged and
    /// re-plugged) return `false` meanwhile; the controller shows a
    /// disconnect on the port (failing the transfers in flight) and a new
    /// connection when this turns `true` again. It asks after every wake-up
    /// (see [`UsbDevice::set_wakeup`]). Emulated devices are always there.
    fn connected(&self) -> bool {
        true
    }

    /// The port the device hangs off was suspended (`true`: USB 2.0
    /// §7.1.7.6, the host stopped all traffic to it; xHCI U3, EHCI and
    /// UHCI PORTSC Suspend, a hub's PORT_SUSPEND) or resumed (`false`).
    /// A bus reset ([`UsbDevice::reset`]) also ends a suspend. The default
    /// ignores it: a passthrough device is not suspended on the host.
    fn suspend(&mut self, _suspended: bool) {}

    /// Whether the device signals resume (remote wakeup, USB 2.0
    /// §7.1.7.7): only while suspended and only if the host enabled it with
    /// SET_FEATURE(DEVICE_REMOTE_WAKEUP). `true` once per request (the
    /// request is taken). A device that wants to wake the bus calls its
    /// [`Wakeup`]; the controller asks every suspended port's device after
    /// each wake-up and shows the resume the way its hardware does.
    fn remote_wakeup(&mut self) -> bool {
        false
    }

    /// The guest configured bulk endpoint `endpoint` (address, bit 7 for
    /// IN) with stream IDs `1..=streams` (xHCI Configure Endpoint with
    /// MaxPStreams). Transfers on it then carry a [`Transfer::stream_id`].
    /// Returns `false` if the streams cannot be had (the controller then
    /// fails the command with Resource Error, as a host controller out of
    /// stream resources would). The default refuses: streams only where
    /// the device's descriptors offer them (an emulated device checks its
    /// own, e.g. with [`DescriptorSet::offers_streams`]; a passthrough
    /// backend asks the host, whose kernel checks the real device's).
    ///
    /// [`DescriptorSet::offers_streams`]: crate::usb::std_requests::DescriptorSet::offers_streams
    fn alloc_streams(&mut self, _endpoint: u8, _streams: u16) -> bool {
        false
    }

    /// The streams of `endpoint` are no longer used (endpoint dropped or
    /// deconfigured, slot disabled). Transfers on it have been cancelled.
    fn free_streams(&mut self, _endpoint: u8) {}

    /// Called once when the device is plugged into a controller: `wakeup`
    /// wakes the controller's event loop, for a device whose
    /// [`UsbDevice::connected`] changes without a transfer completing.
    fn set_wakeup(&mut self, _wakeup: Wakeup) {}

    /// Whether endpoint `address` (bit 7 set for IN) is an interrupt
    /// endpoint of the device's current configuration. Controllers whose
    /// schedules do not name the transfer type (a UHCI TD does not) ask
    /// this to hand a non-control, non-isochronous transfer over as
    /// [`TransferKind::Interrupt`] rather than [`TransferKind::Bulk`]. The
    /// default: none is.
    fn is_interrupt_endpoint(&self, _address: u8) -> bool {
        false
    }

    /// The downstream ports, if the device is a hub ([`hub::Hub`]): how a
    /// controller reaches the devices behind it (split transactions name
    /// the hub and its port). Other devices have none.
    fn as_hub(&mut self) -> Option<&mut dyn HubPorts> {
        None
    }
}

/// The downstream ports of a hub, as a controller sees them to route
/// transactions (USB 2.0 §11.14, §11.17: the host addresses a full- or
/// low-speed device behind a high-speed hub with split transactions naming
/// the hub's address and the port; a high-speed device behind it by its
/// address alone). Ports are 1-based.
pub trait HubPorts {
    /// Number of downstream ports (bNbrPorts).
    fn port_count(&self) -> u8;

    /// Whether `port` is enabled (wPortStatus PORT_ENABLE; a suspended
    /// port stays enabled).
    fn port_enabled(&self, port: u8) -> bool;

    /// The device a transaction from the host reaches through `port`: only
    /// when the port is powered, connected, enabled and not suspended.
    fn port_device(&mut self, port: u8) -> Option<&mut (dyn UsbDevice + 'static)>;

    /// The device plugged into `port`, whatever the port's state: for
    /// bookkeeping the host cannot do over the bus (cancelling a transfer
    /// the device still holds, following nested hubs).
    fn attached_device(&mut self, port: u8) -> Option<&mut (dyn UsbDevice + 'static)>;

    /// Looks at [`UsbDevice::connected`] of the devices behind the hub
    /// (recursively through downstream hubs) and shows connection changes.
    /// Controllers call it whenever they look at `connected()` of their
    /// root ports' devices (after every wake-up).
    fn poll_connections(&mut self);
}

/// USB 2.0 standard request codes (table 9-4).
pub mod request {
    /// GET_STATUS.
    pub const GET_STATUS: u8 = 0;
    /// CLEAR_FEATURE.
    pub const CLEAR_FEATURE: u8 = 1;
    /// SET_FEATURE.
    pub const SET_FEATURE: u8 = 3;
    /// SET_ADDRESS.
    pub const SET_ADDRESS: u8 = 5;
    /// GET_DESCRIPTOR.
    pub const GET_DESCRIPTOR: u8 = 6;
    /// SET_DESCRIPTOR.
    pub const SET_DESCRIPTOR: u8 = 7;
    /// GET_CONFIGURATION.
    pub const GET_CONFIGURATION: u8 = 8;
    /// SET_CONFIGURATION.
    pub const SET_CONFIGURATION: u8 = 9;
    /// GET_INTERFACE.
    pub const GET_INTERFACE: u8 = 10;
    /// SET_INTERFACE.
    pub const SET_INTERFACE: u8 = 11;
    /// SET_SEL (USB 3).
    pub const SET_SEL: u8 = 48;
    /// SET_ISOCH_DELAY (USB 3).
    pub const SET_ISOCH_DELAY: u8 = 49;
    /// Feature selector ENDPOINT_HALT.
    pub const FEATURE_ENDPOINT_HALT: u16 = 0;
    /// Feature selector DEVICE_REMOTE_WAKEUP.
    pub const FEATURE_DEVICE_REMOTE_WAKEUP: u16 = 1;
}
