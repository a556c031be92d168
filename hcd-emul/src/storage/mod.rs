//! An emulated USB mass-storage device: USB Mass Storage Class Bulk-Only
//! Transport 1.0 carrying SCSI (SPC-4 / SBC-3 subset), backed by a raw
//! image file; optionally ([`UsbStorage::with_uas`], SuperSpeed or high
//! speed) also USB Attached SCSI as alternate setting 1 (see [`uas`]).
//!
//! * Chapter-9 requests (USB 2.0 ch. 9, USB 3.2 ch. 9) go through
//!   [`StdRequests`]; the class requests Bulk-Only Mass Storage Reset and
//!   Get Max LUN (BOT §3.1, §3.2) are handled here.
//! * The BOT state machine (BOT §5, §6): CBW on bulk OUT (endpoint 2), a
//!   data phase in the CBW's direction, CSW on bulk IN (endpoint 1). The
//!   host's expectation and the device's intent are reconciled per §6.7
//!   (see `bot::reconcile`). An invalid CBW stalls both bulk endpoints
//!   until Reset Recovery (§5.3.4): CLEAR_FEATURE(ENDPOINT_HALT) alone does
//!   not unhalt them before the class reset.
//! * Each bulk endpoint keeps a FIFO of submitted transfers. A transfer
//!   waits ("parked") while the state machine has nothing for it (an IN
//!   transfer before the command that produces its data, say); everything
//!   else completes inside [`UsbDevice::submit`], in submission order. While
//!   an endpoint is halted, every transfer reaching the head of its FIFO
//!   completes with STALL, as a real device answers every token.
//! * A data phase may be split over any number of transfers of any size; an
//!   offset tracks progress. READ and WRITE data moves between the image
//!   file and guest memory directly ([`Transfer::fill_from_file`],
//!   [`Transfer::drain_to_file`]).

mod bot;
mod scsi;
pub mod uas;

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use tracing::trace;

use crate::mem::DmaError;
use crate::usb::descriptor::{
    Bos, ConfigDescriptor, DeviceDescriptor, EndpointDescriptor, InterfaceDescriptor,
    SsEndpointCompanion, SuperSpeedCapability, Usb2Extension,
};
use crate::usb::std_requests::{complete_in, DescriptorSet, StdOutcome, StdRequests};
use crate::usb::{
    Direction, SetupPacket, Speed, Transfer, TransferId, TransferKind, TransferStatus, UsbDevice,
};
use bot::{DataPhase, DevData, Next};
use scsi::{Plan, Scsi};
use uas::Uas;

pub use bot::Cbw;
pub use scsi::{
    Sense, BLOCK_SIZE, KEY_DATA_PROTECT, KEY_ILLEGAL_REQUEST, KEY_MEDIUM_ERROR, KEY_NO_SENSE,
};

/// USB vendor ID (the one QEMU's usb-storage uses).
pub const VENDOR_ID: u16 = 0x46f4;
/// USB product ID.
pub const PRODUCT_ID: u16 = 0x0001;
/// Bulk IN endpoint address (CSW and data-in).
pub const EP_IN: u8 = 0x81;
/// Bulk OUT endpoint address (CBW and data-out).
pub const EP_OUT: u8 = 0x02;

/// Class request Bulk-Only Mass Storage Reset (BOT §3.1).
const REQ_BOT_RESET: u8 = 0xff;
/// Class request Get Max LUN (BOT §3.2).
const REQ_GET_MAX_LUN: u8 = 0xfe;
/// Most data-stage bytes read for an OUT control request.
const MAX_CONTROL_OUT: usize = 4096;

/// Why a storage device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The image could not be opened.
    #[error("cannot open image {path:?}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The image's size could not be read.
    #[error("cannot read the image size")]
    Metadata(#[source] std::io::Error),
    /// The image is empty.
    #[error("the image is empty")]
    Empty,
    /// The image size is not a whole number of 512-byte blocks.
    #[error("image size {0} is not a multiple of 512")]
    NotBlockMultiple(u64),
    /// Only full, high and SuperSpeed are offered (no low-speed bulk).
    #[error("speed {0:?} is not supported (full, high or super only)")]
    UnsupportedSpeed(Speed),
}

#[derive(Debug)]
enum BotState {
    ExpectCbw,
    Data(DataPhase),
    Status([u8; bot::CSW_LEN]),
}

/// An emulated USB flash drive (one LUN, 512-byte blocks).
#[derive(Debug)]
pub struct UsbStorage {
    name: String,
    speed: Speed,
    blocks: u64,
    std: StdRequests,
    scsi: Scsi,
    state: BotState,
    /// An invalid CBW was seen: bulk endpoints stay halted until the
    /// Bulk-Only Mass Storage Reset.
    need_reset_recovery: bool,
    in_q: VecDeque<Transfer>,
    out_q: VecDeque<Transfer>,
    /// The UAS engine (alternate setting 1; SuperSpeed or high speed).
    uas: Uas,
}

/// The UAS alternate setting: four bulk pipes, each followed by its Pipe
/// Usage descriptor; at SuperSpeed (`companion`) the status and data pipes
/// carry streams, at high speed (512-byte packets) nothing does.
fn uas_interface(companion: Option<SsEndpointCompanion>) -> InterfaceDescriptor {
    let mps = if companion.is_some() { 1024 } else { 512 };
    let ep = |addr, pipe: u8, streams: bool| EndpointDescriptor {
        ss_companion: companion.map(|c| SsEndpointCompanion {
            attributes: if streams { uas::MAX_STREAMS_EXP } else { 0 },
            ..c
        }),
        extra: vec![4, uas::DT_PIPE_USAGE, pipe, 0],
        ..EndpointDescriptor::bulk(addr, mps)
    };
    InterfaceDescriptor {
        interface_number: 0,
        alternate_setting: 1,
        class: 8,
        subclass: 6,
        protocol: uas::PROTOCOL_UAS,
        interface_index: 0,
        extra: Vec::new(),
        endpoints: vec![
            ep(uas::EP_COMMAND, 1, false),
            ep(uas::EP_STATUS, 2, true),
            ep(uas::EP_DATA_IN, 3, true),
            ep(uas::EP_DATA_OUT, 4, true),
        ],
    }
}

/// The descriptors of the drive at `speed` (with the UAS alternate setting
/// if `uas`, at high speed or SuperSpeed).
fn descriptor_set(speed: Speed, serial: &str, uas: bool) -> DescriptorSet {
    let ss = speed.is_superspeed();
    let device = DeviceDescriptor {
        bcd_usb: if ss { 0x0320 } else { 0x0200 },
        device_class: 0,
        device_subclass: 0,
        device_protocol: 0,
        max_packet_size0: if ss { 9 } else { 64 },
        vendor_id: VENDOR_ID,
        product_id: PRODUCT_ID,
        bcd_device: 0x0100,
        manufacturer_index: 1,
        product_index: 2,
        serial_index: 3,
        num_configurations: 1,
    };
    let config = |mps: u16, companion: Option<SsEndpointCompanion>, max_power: u8| {
        let ep = |addr| EndpointDescriptor {
            ss_companion: companion,
            ..EndpointDescriptor::bulk(addr, mps)
        };
        ConfigDescriptor {
            configuration_value: 1,
            configuration_index: 0,
            attributes: ConfigDescriptor::ATTR_ONE | ConfigDescriptor::ATTR_SELF_POWERED,
            max_power,
            extra: Vec::new(),
            interfaces: vec![InterfaceDescriptor {
                interface_number: 0,
                alternate_setting: 0,
                class: 8,
                subclass: 6,
                protocol: 0x50,
                interface_index: 0,
                extra: Vec::new(),
                endpoints: vec![ep(EP_IN), ep(EP_OUT)],
            }],
        }
    };
    let strings = vec![
        "hcd-emul".to_string(),
        "USB Mass Storage".to_string(),
        serial.to_string(),
    ];
    if ss {
        let companion = SsEndpointCompanion {
            max_burst: 15,
            attributes: 0,
            bytes_per_interval: 0,
        };
        let mut config = config(1024, Some(companion), 12);
        if uas {
            config.interfaces.push(uas_interface(Some(companion)));
        }
        DescriptorSet {
            speed,
            device,
            // 12 * 8 mA = 96 mA.
            config,
            other_speed: None,
            qualifier: None,
            bos: Some(Bos {
                usb2_extension: Some(Usb2Extension { lpm: false }),
                superspeed: Some(SuperSpeedCapability {
                    attributes: 0,
                    speeds_supported: 0x000e,
                    functionality_support: 1,
                    u1_exit_latency: 0x0a,
                    u2_exit_latency: 0x20,
                }),
            }),
            strings,
            self_powered: true,
        }
    } else if speed == Speed::Full {
        // A full-speed-only device (USB 2.0 §9.6.2): bulk packets of 64
        // bytes, no device qualifier and no other-speed configuration
        // (both requests STALL).
        DescriptorSet {
            speed,
            qualifier: None,
            device,
            config: config(64, None, 50),
            other_speed: None,
            bos: None,
            strings,
            self_powered: true,
        }
    } else {
        DescriptorSet {
            speed,
            qualifier: Some(device.qualifier()),
            device,
            // 50 * 2 mA = 100 mA.
            config: {
                let mut c = config(512, None, 50);
                if uas {
                    c.interfaces.push(uas_interface(None));
                }
                c
            },
            other_speed: Some(config(64, None, 50)),
            bos: None,
            strings,
            self_powered: true,
        }
    }
}

/// A serial number of 16 hex digits derived from the file's identity.
fn serial_for(file: &File) -> String {
    use std::os::unix::fs::MetadataExt;
    let id = file
        .metadata()
        .map(|m| m.dev().rotate_left(32) ^ m.ino())
        .unwrap_or(0x1234_5678_9abc_def0);
    format!("{id:016X}")
}

impl UsbStorage {
    /// Opens the raw image at `path` (read-only if `readonly`).
    pub fn open(path: &Path, readonly: bool, speed: Speed) -> Result<Self, StorageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| StorageError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let mut dev = Self::from_file(file, readonly, speed)?;
        if let Some(n) = path.file_name() {
            dev.name = format!("storage {}", n.to_string_lossy());
        }
        Ok(dev)
    }

    /// Wraps an open image file. Its length must be a non-zero multiple of
    /// 512; `speed` must be full, high or super (low-speed devices have no
    /// bulk endpoints, USB 2.0 §5.8.3).
    pub fn from_file(file: File, readonly: bool, speed: Speed) -> Result<Self, StorageError> {
        if !matches!(speed, Speed::Full | Speed::High | Speed::Super) {
            return Err(StorageError::UnsupportedSpeed(speed));
        }
        let len = file.metadata().map_err(StorageError::Metadata)?.len();
        if len == 0 {
            return Err(StorageError::Empty);
        }
        if len % BLOCK_SIZE != 0 {
            return Err(StorageError::NotBlockMultiple(len));
        }
        let blocks = len / BLOCK_SIZE;
        let serial = serial_for(&file);
        Ok(Self {
            name: "storage".to_string(),
            speed,
            blocks,
            std: StdRequests::new(descriptor_set(speed, &serial, false)),
            scsi: Scsi::new(file, blocks, readonly, serial),
            state: BotState::ExpectCbw,
            need_reset_recovery: false,
            in_q: VecDeque::new(),
            out_q: VecDeque::new(),
            uas: Uas::new(speed.is_superspeed()),
        })
    }

    /// Offers or withholds (the default) the UAS alternate setting; it is
    /// offered at SuperSpeed (with streams) and high speed (without: Ready
    /// IUs), never at full speed. Meant for set-up, before the device is
    /// plugged in.
    pub fn with_uas(mut self, on: bool) -> Self {
        let serial = self.scsi.serial().to_string();
        self.std = StdRequests::new(descriptor_set(self.speed, &serial, on));
        self
    }

    /// Whether the host selected the UAS alternate setting.
    pub fn uas_active(&self) -> bool {
        self.std.alternate(0) == 1
    }

    /// Capacity in 512-byte blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The descriptors the device presents.
    pub fn descriptors(&self) -> &DescriptorSet {
        self.std.descriptors()
    }

    fn halt_bulk(&mut self) {
        self.std.set_halted(EP_IN, true);
        self.std.set_halted(EP_OUT, true);
    }

    fn bot_reset(&mut self) {
        self.state = BotState::ExpectCbw;
        self.need_reset_recovery = false;
    }

    fn fail_parked(&mut self, status: TransferStatus) {
        for t in self.in_q.drain(..).chain(self.out_q.drain(..)) {
            t.complete(status, 0);
        }
        self.uas.reset(status);
    }

    fn control(&mut self, xfer: Transfer, setup: SetupPacket) {
        let mut data_out = Vec::new();
        if setup.direction() == Direction::Out {
            let n = xfer
                .len()
                .min(usize::from(setup.length))
                .min(MAX_CONTROL_OUT);
            data_out = vec![0u8; n];
            if xfer.read_data(0, &mut data_out).is_err() {
                xfer.complete(TransferStatus::TransactionError, 0);
                return;
            }
        }
        let ack = data_out.len();
        match self.std.handle(&setup, &data_out) {
            StdOutcome::Data(v) => complete_in(xfer, &v),
            StdOutcome::NoData => xfer.complete(TransferStatus::Success, ack),
            StdOutcome::Stall => xfer.complete(TransferStatus::Stall, 0),
            StdOutcome::ClearHalt(ep) => {
                if self.need_reset_recovery && (ep == EP_IN || ep == EP_OUT) {
                    // BOT §5.3.4: halted until Reset Recovery.
                    self.std.set_halted(ep, true);
                }
                xfer.complete(TransferStatus::Success, ack);
            }
            StdOutcome::SetHalt(_) => xfer.complete(TransferStatus::Success, ack),
            StdOutcome::Configured(v) => {
                self.bot_reset();
                if v == 0 {
                    self.fail_parked(TransferStatus::Stall);
                } else {
                    // Back in alternate setting 0: UAS tasks are gone.
                    self.uas.reset(TransferStatus::Cancelled);
                }
                xfer.complete(TransferStatus::Success, ack);
            }
            StdOutcome::InterfaceSet { .. } => {
                // BOT <-> UAS: whatever was under way on the old setting
                // is gone.
                self.bot_reset();
                self.fail_parked(TransferStatus::Cancelled);
                xfer.complete(TransferStatus::Success, ack);
            }
            StdOutcome::NotStandard => self.class_request(xfer, setup),
        }
    }

    fn class_request(&mut self, xfer: Transfer, s: SetupPacket) {
        match (s.request_type, s.request) {
            (0x21, REQ_BOT_RESET) if s.value == 0 && s.index == 0 && s.length == 0 => {
                trace!(target: "storage::bot", "Bulk-Only Mass Storage Reset");
                self.bot_reset();
                xfer.complete(TransferStatus::Success, 0);
            }
            (0xa1, REQ_GET_MAX_LUN) if s.value == 0 && s.index == 0 && s.length >= 1 => {
                complete_in(xfer, &[0]);
            }
            _ => {
                guest_warn!(
                    target: "storage",
                    "unsupported control request {:02x}/{:02x}",
                    s.request_type,
                    s.request
                );
                xfer.complete(TransferStatus::Stall, 0);
            }
        }
    }

    /// Runs the state machine over the parked transfers until neither FIFO
    /// can make progress. Every iteration consumes a transfer: bounded.
    fn pump(&mut self) {
        loop {
            let mut progressed = false;
            if !self.out_q.is_empty() {
                if self.std.is_halted(EP_OUT) {
                    if let Some(t) = self.out_q.pop_front() {
                        t.complete(TransferStatus::Stall, 0);
                        progressed = true;
                    }
                } else if matches!(self.state, BotState::ExpectCbw)
                    || matches!(&self.state, BotState::Data(p) if !p.dir_in)
                {
                    if let Some(t) = self.out_q.pop_front() {
                        self.bulk_out(t);
                        progressed = true;
                    }
                }
            }
            if !self.in_q.is_empty() {
                if self.std.is_halted(EP_IN) {
                    if let Some(t) = self.in_q.pop_front() {
                        t.complete(TransferStatus::Stall, 0);
                        progressed = true;
                    }
                } else if matches!(self.state, BotState::Status(_))
                    || matches!(&self.state, BotState::Data(p) if p.dir_in)
                {
                    if let Some(t) = self.in_q.pop_front() {
                        self.bulk_in(t);
                        progressed = true;
                    }
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn bulk_out(&mut self, xfer: Transfer) {
        match std::mem::replace(&mut self.state, BotState::ExpectCbw) {
            BotState::ExpectCbw => self.cbw(xfer),
            BotState::Data(mut p) => {
                self.data_out(&mut p, xfer);
                self.finish_phase(p);
            }
            s @ BotState::Status(_) => {
                // Not reached: pump() parks OUT transfers in this state.
                self.state = s;
                xfer.complete(TransferStatus::Stall, 0);
            }
        }
    }

    fn bulk_in(&mut self, xfer: Transfer) {
        match std::mem::replace(&mut self.state, BotState::ExpectCbw) {
            BotState::Status(csw) => self.send_csw(csw, xfer),
            BotState::Data(mut p) => {
                self.data_in(&mut p, xfer);
                self.finish_phase(p);
            }
            BotState::ExpectCbw => {
                // Not reached: pump() parks IN transfers in this state.
                xfer.complete(TransferStatus::Stall, 0);
            }
        }
    }

    fn cbw(&mut self, xfer: Transfer) {
        let mut b = [0u8; bot::CBW_LEN];
        let cbw = if xfer.len() == bot::CBW_LEN {
            match xfer.read_data(0, &mut b) {
                Ok(n) if n == bot::CBW_LEN => Cbw::parse(&b),
                Ok(_) => {
                    // Cancelled under us: as if never sent.
                    xfer.complete(TransferStatus::Cancelled, 0);
                    return;
                }
                Err(_) => {
                    xfer.complete(TransferStatus::TransactionError, 0);
                    return;
                }
            }
        } else {
            None
        };
        let len = xfer.len();
        xfer.complete(TransferStatus::Success, len);
        let Some(cbw) = cbw else {
            guest_warn!(target: "storage::bot", "invalid CBW ({len} bytes); stalling until Reset Recovery");
            self.halt_bulk();
            self.need_reset_recovery = true;
            return;
        };
        let plan = if cbw.lun != 0 {
            self.scsi.set_sense(Sense::LUN_NOT_SUPPORTED);
            Plan::Fail(Sense::LUN_NOT_SUPPORTED)
        } else {
            self.scsi.plan(&cbw.cdb)
        };
        trace!(
            target: "storage::bot",
            "CBW tag {:#x} len {} in {} op {:#04x}: {:?}",
            cbw.tag, cbw.data_len, cbw.dir_in, cbw.cdb[0],
            match &plan { Plan::Reply(v) => format!("reply {}", v.len()), p => format!("{p:?}") }
        );
        self.state = match bot::reconcile(&cbw, plan) {
            Next::Status(csw) => BotState::Status(csw),
            Next::Data(p) => BotState::Data(p),
        };
    }

    /// After a data-phase transfer: stay in the phase, or move to the CSW
    /// (stalling bulk-IN if the device ran out of data before the host).
    fn finish_phase(&mut self, p: DataPhase) {
        if p.done >= p.host_len {
            self.state = BotState::Status(bot::csw(p.tag, p.residue(), p.status));
        } else if p.dir_in && p.dev_done >= p.dev_len {
            self.std.set_halted(EP_IN, true);
            self.state = BotState::Status(bot::csw(p.tag, p.residue(), p.status));
        } else {
            self.state = BotState::Data(p);
        }
    }

    fn data_in(&mut self, p: &mut DataPhase, xfer: Transfer) {
        let want = (xfer.len() as u64).min(p.host_len.saturating_sub(p.done));
        let n = want.min(p.dev_len.saturating_sub(p.dev_done));
        if want == 0 {
            xfer.complete(TransferStatus::Success, 0);
            return;
        }
        if n == 0 {
            // Device has nothing (more) to send: STALL (BOT §6.7.2, 6.7.4).
            p.dev_len = p.dev_done;
            xfer.complete(TransferStatus::Stall, 0);
            return;
        }
        // n <= xfer.len(), so it fits usize.
        let nu = usize::try_from(n).unwrap_or(usize::MAX);
        let r = p
            .dev
            .move_data(&xfer, true, p.dev_done, nu, self.scsi.file());
        match r {
            Ok(moved) => {
                let moved64 = moved as u64;
                p.done = p.done.saturating_add(moved64);
                p.dev_done = p.dev_done.saturating_add(moved64);
                let status = if moved < xfer.len() {
                    TransferStatus::ShortPacket
                } else {
                    TransferStatus::Success
                };
                xfer.complete(status, moved);
            }
            Err(DmaError::Io) => {
                guest_warn!(target: "storage::bot", "image read failed; failing the command");
                self.scsi.set_sense(Sense::READ_ERROR);
                p.status = bot::STATUS_FAILED;
                p.dev_len = p.dev_done;
                xfer.complete(TransferStatus::Stall, 0);
            }
            Err(e) => {
                guest_warn!(target: "storage::bot", "bulk-in buffer not accessible: {e}");
                xfer.complete(TransferStatus::TransactionError, 0);
            }
        }
    }

    fn data_out(&mut self, p: &mut DataPhase, xfer: Transfer) {
        let want = (xfer.len() as u64).min(p.host_len.saturating_sub(p.done));
        let keep = want.min(p.dev_len.saturating_sub(p.dev_done));
        let want_u = usize::try_from(want).unwrap_or(usize::MAX);
        if keep > 0 {
            if !matches!(p.dev, DevData::Write(_)) {
                // Only writes keep data.
                xfer.complete(TransferStatus::TransactionError, 0);
                return;
            }
            let keep_u = usize::try_from(keep).unwrap_or(usize::MAX);
            let r = p
                .dev
                .move_data(&xfer, false, p.dev_done, keep_u, self.scsi.file());
            match r {
                Ok(moved) if moved == keep_u => p.dev_done = p.dev_done.saturating_add(keep),
                Ok(_) => {
                    // Cancelled under us: no progress.
                    xfer.complete(TransferStatus::Cancelled, 0);
                    return;
                }
                Err(DmaError::Io) => {
                    guest_warn!(target: "storage::bot", "image write failed; failing the command");
                    self.scsi.set_sense(Sense::WRITE_ERROR);
                    p.status = bot::STATUS_FAILED;
                    // Discard the rest of the phase.
                    p.dev_len = p.dev_done;
                }
                Err(e) => {
                    guest_warn!(target: "storage::bot", "bulk-out buffer not accessible: {e}");
                    xfer.complete(TransferStatus::TransactionError, 0);
                    return;
                }
            }
        }
        p.done = p.done.saturating_add(want);
        xfer.complete(TransferStatus::Success, want_u);
    }

    fn send_csw(&mut self, csw: [u8; bot::CSW_LEN], xfer: Transfer) {
        if xfer.is_empty() {
            self.state = BotState::Status(csw);
            xfer.complete(TransferStatus::Success, 0);
            return;
        }
        match xfer.write_data(0, &csw) {
            Ok(0) => {
                // Cancelled under us: the CSW is still to be sent.
                self.state = BotState::Status(csw);
                xfer.complete(TransferStatus::Cancelled, 0);
            }
            Ok(n) => {
                let status = match xfer.len() {
                    l if l < bot::CSW_LEN => TransferStatus::Babble,
                    l if l > bot::CSW_LEN => TransferStatus::ShortPacket,
                    _ => TransferStatus::Success,
                };
                xfer.complete(status, n);
                self.state = BotState::ExpectCbw;
            }
            Err(e) => {
                guest_warn!(target: "storage::bot", "CSW buffer not accessible: {e}");
                self.state = BotState::Status(csw);
                xfer.complete(TransferStatus::TransactionError, 0);
            }
        }
    }

    /// A bulk transfer while the UAS alternate setting is selected.
    fn submit_uas(&mut self, xfer: Transfer) {
        let addr = match xfer.direction() {
            Direction::In => 0x80 | xfer.endpoint(),
            Direction::Out => xfer.endpoint(),
        };
        let known = matches!(
            addr,
            uas::EP_COMMAND | uas::EP_STATUS | uas::EP_DATA_IN | uas::EP_DATA_OUT
        );
        if !known || !matches!(xfer.kind(), TransferKind::Bulk) || self.std.is_halted(addr) {
            if !known {
                guest_warn!(target: "storage::uas", "transfer on endpoint {addr:#04x} rejected");
            }
            xfer.complete(TransferStatus::Stall, 0);
            return;
        }
        match addr {
            uas::EP_COMMAND => self.uas.command(xfer, &mut self.scsi),
            uas::EP_STATUS => self.uas.status(xfer),
            a => self.uas.data(xfer, a == uas::EP_DATA_IN),
        }
        self.uas.pump(&mut self.scsi);
    }
}

impl UsbDevice for UsbStorage {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn speed(&self) -> Speed {
        self.speed
    }

    fn reset(&mut self) {
        self.std.reset();
        self.bot_reset();
        self.scsi.clear_sense();
        self.fail_parked(TransferStatus::Cancelled);
    }

    fn submit(&mut self, xfer: Transfer) {
        if self.uas_active() && !matches!(xfer.kind(), TransferKind::Control(_)) {
            return self.submit_uas(xfer);
        }
        match (xfer.kind(), xfer.endpoint(), xfer.direction()) {
            (TransferKind::Control(setup), 0, _) => self.control(xfer, setup),
            (TransferKind::Bulk, 1, Direction::In) if self.std.is_configured() => {
                self.in_q.push_back(xfer);
            }
            (TransferKind::Bulk, 2, Direction::Out) if self.std.is_configured() => {
                self.out_q.push_back(xfer);
            }
            (kind, ep, dir) => {
                guest_warn!(target: "storage", "transfer {kind:?} on endpoint {ep} {dir:?} rejected");
                xfer.complete(TransferStatus::Stall, 0);
            }
        }
        self.pump();
    }

    fn alloc_streams(&mut self, endpoint: u8, _streams: u16) -> bool {
        // The guest may ask for more stream IDs than MaxStreams (xHCI
        // arrays are powers of two); the UAS driver uses only ours.
        self.std.descriptors().offers_streams(endpoint)
    }

    fn cancel(&mut self, id: TransferId) {
        self.uas.cancel(id);
        bot::cancel_parked(&mut self.in_q, id);
        bot::cancel_parked(&mut self.out_q, id);
    }
}

#[cfg(test)]
mod tests;
