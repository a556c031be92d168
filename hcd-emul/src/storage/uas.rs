//! USB Attached SCSI (the USB-IF mass-storage class's UAS protocol 1.0,
//! with T10 UAS-2 information units) over USB 3 bulk streams: alternate
//! setting 1 of the stick's interface.
//!
//! Four pipes, named by their Pipe Usage descriptors: commands (bulk OUT,
//! no streams), status, data-in and data-out (bulk, streams). The host
//! queues, per command tag `T`, a status transfer and (if the command moves
//! data) a data transfer on stream `T`, then the Command IU; many commands
//! may be outstanding. That is what makes UAS fast where BOT is slow: one
//! command needs one round of doorbells and (usually) one interrupt instead
//! of three strictly sequential phases.
//!
//! Tasks are kept in arrival order. [`Uas::pump`] moves each task's data as
//! soon as the host's transfer for its stream is there, then answers the
//! status transfer on the same stream with a Sense IU (SCSI status plus
//! autosense) and retires the task. Transfers are matched by stream, so
//! each stream's transfers complete in submission order; a transfer for a
//! stream nobody uses waits until the host cancels it. Task Management
//! IUs (abort task, abort/clear task set, LUN and I_T nexus reset, query
//! task) are answered with Response IUs; anything else on the command
//! pipe gets a Response IU "invalid information unit". Everything is
//! bounded: at most [`MAX_TASKS`] tasks and a fixed number of parked
//! transfers per pipe.
//!
//! At high speed there are no streams (UAS §4.5, the USB 2.0 mode): all
//! transfers of a pipe are one queue, so the device tells the host which
//! command's data comes next with a Read Ready or Write Ready IU on the
//! status pipe, one command per direction at a time, and the host then
//! queues that command's data transfer (Linux's uas driver does exactly
//! this: a status transfer per command before its Command IU, and a data
//! transfer plus another status transfer per Ready IU). Status transfers
//! are interchangeable there: each IU names its tag. What this buys over
//! BOT at high speed is the command size (Linux: 512 KiB instead of
//! usb-storage's 120 KiB) and commands queued behind each other instead of
//! three strictly sequential phases each.

use std::collections::VecDeque;

use super::bot::{cancel_parked, DevData};
use super::scsi::{Plan, Scsi, Sense};
use crate::mem::DmaError;
use crate::usb::std_requests::complete_in;
use crate::usb::{Transfer, TransferId, TransferStatus};

/// Command pipe: bulk OUT (Pipe ID 1).
pub const EP_COMMAND: u8 = 0x04;
/// Status pipe: bulk IN with streams (Pipe ID 2).
pub const EP_STATUS: u8 = 0x83;
/// Data-in pipe: bulk IN with streams (Pipe ID 3).
pub const EP_DATA_IN: u8 = 0x85;
/// Data-out pipe: bulk OUT with streams (Pipe ID 4).
pub const EP_DATA_OUT: u8 = 0x06;
/// MaxStreams exponent in the SuperSpeed companions: 2^5 = 32 streams.
pub const MAX_STREAMS_EXP: u8 = 5;
/// Pipe Usage descriptor type (UAS §5.3.3.1).
pub const DT_PIPE_USAGE: u8 = 0x24;
/// Interface protocol of the UAS alternate setting.
pub const PROTOCOL_UAS: u8 = 0x62;

/// Outstanding commands accepted; more get TASK SET FULL.
pub const MAX_TASKS: usize = 64;
/// Transfers parked per pipe before the oldest is failed (the controller
/// bounds what is in flight long before this).
const MAX_PARKED: usize = 1024;

const IU_COMMAND: u8 = 0x01;
const IU_SENSE: u8 = 0x03;
const IU_RESPONSE: u8 = 0x04;
const IU_TASK_MGMT: u8 = 0x05;
const IU_READ_READY: u8 = 0x06;
const IU_WRITE_READY: u8 = 0x07;
/// Command IU without additional CDB bytes.
const COMMAND_IU_LEN: usize = 32;
/// Task Management IU.
const TASK_MGMT_IU_LEN: usize = 16;
/// Sense IU header (sense data follows).
const SENSE_IU_HEADER: usize = 16;

/// SCSI status GOOD.
const ST_GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION.
const ST_CHECK: u8 = 0x02;
/// SCSI status TASK SET FULL.
const ST_TASK_SET_FULL: u8 = 0x28;

/// Response IU codes (UAS-2 table 17).
mod rc {
    pub const COMPLETE: u8 = 0x00;
    pub const INVALID_IU: u8 = 0x02;
    pub const NOT_SUPPORTED: u8 = 0x04;
    pub const SUCCEEDED: u8 = 0x08;
    pub const INCORRECT_LUN: u8 = 0x09;
    pub const OVERLAPPED_TAG: u8 = 0x0a;
}

/// Task management functions (SAM-5 via UAS-2 table 14).
mod tmf {
    pub const ABORT_TASK: u8 = 0x01;
    pub const ABORT_TASK_SET: u8 = 0x02;
    pub const CLEAR_TASK_SET: u8 = 0x04;
    pub const LOGICAL_UNIT_RESET: u8 = 0x08;
    pub const I_T_NEXUS_RESET: u8 = 0x10;
    pub const QUERY_TASK: u8 = 0x80;
}

/// One outstanding command.
#[derive(Debug)]
struct Task {
    tag: u16,
    dir_in: bool,
    dev: DevData,
    /// Bytes the device moves in the data phase.
    len: u64,
    done: u64,
    status: u8,
    sense: Option<Sense>,
    /// The data phase is over (all moved, or ended by an error).
    data_done: bool,
    /// Without streams: its Read/Write Ready IU went out (its data phase
    /// is the one under way in its direction).
    ready: bool,
}

impl Task {
    fn from_plan(tag: u16, plan: Plan) -> Self {
        let (dir_in, dev, len, status, sense) = match plan {
            Plan::NoData => (false, DevData::Nothing, 0, ST_GOOD, None),
            Plan::Fail(s) => (false, DevData::Nothing, 0, ST_CHECK, Some(s)),
            Plan::Reply(v) => {
                let n = v.len() as u64;
                (true, DevData::Buffer(v), n, ST_GOOD, None)
            }
            Plan::Read { offset, len } => (true, DevData::Read(offset), len, ST_GOOD, None),
            Plan::Write { offset, len } => (false, DevData::Write(offset), len, ST_GOOD, None),
        };
        Task {
            tag,
            dir_in,
            dev,
            len,
            done: 0,
            status,
            sense,
            data_done: len == 0,
            ready: false,
        }
    }

    fn fail(&mut self, s: Sense) {
        self.status = ST_CHECK;
        self.sense = Some(s);
        self.data_done = true;
    }

    /// The Sense IU that ends the task.
    fn sense_iu(&self) -> Vec<u8> {
        let sense = self
            .sense
            .map(|s| s.to_fixed().to_vec())
            .unwrap_or_default();
        let mut b = vec![0u8; SENSE_IU_HEADER];
        b[0] = IU_SENSE;
        b[2..4].copy_from_slice(&self.tag.to_be_bytes());
        b[6] = self.status;
        b[14..16].copy_from_slice(&(sense.len() as u16).to_be_bytes());
        b.extend_from_slice(&sense);
        b
    }
}

/// A Response IU (UAS-2 §6.2.5).
fn response_iu(tag: u16, code: u8) -> Vec<u8> {
    let mut b = vec![0u8; 8];
    b[0] = IU_RESPONSE;
    b[2..4].copy_from_slice(&tag.to_be_bytes());
    b[7] = code;
    b
}

/// A Read Ready or Write Ready IU (UAS-2 §6.2.6, §6.2.7).
fn ready_iu(tag: u16, dir_in: bool) -> [u8; 4] {
    let [hi, lo] = tag.to_be_bytes();
    let id = if dir_in {
        IU_READ_READY
    } else {
        IU_WRITE_READY
    };
    [id, 0, hi, lo]
}

/// The UAS engine of one logical unit.
#[derive(Debug, Default)]
pub struct Uas {
    /// SuperSpeed: transfers are matched to tasks by stream. Otherwise
    /// (high speed) each pipe is one queue and Ready IUs pace the data.
    streams: bool,
    tasks: VecDeque<Task>,
    /// IUs that answer no task (Response IUs, TASK SET FULL), by stream.
    replies: VecDeque<(u16, Vec<u8>)>,
    status_q: VecDeque<Transfer>,
    data_in_q: VecDeque<Transfer>,
    data_out_q: VecDeque<Transfer>,
}

/// Takes the first parked transfer for `stream`, keeping the others' order.
fn take(q: &mut VecDeque<Transfer>, stream: u16) -> Option<Transfer> {
    let i = q.iter().position(|t| t.stream_id() == stream)?;
    q.remove(i)
}

fn park(q: &mut VecDeque<Transfer>, xfer: Transfer) {
    if q.len() >= MAX_PARKED {
        if let Some(old) = q.pop_front() {
            old.complete(TransferStatus::Stall, 0);
        }
    }
    q.push_back(xfer);
}

impl Uas {
    /// An engine for a device at SuperSpeed (`streams`) or high speed.
    pub fn new(streams: bool) -> Self {
        Uas {
            streams,
            ..Uas::default()
        }
    }

    /// Drops every task and fails every parked transfer with `status`
    /// (bus reset, configuration or interface change).
    pub fn reset(&mut self, status: TransferStatus) {
        self.tasks.clear();
        self.replies.clear();
        for t in self
            .status_q
            .drain(..)
            .chain(self.data_in_q.drain(..))
            .chain(self.data_out_q.drain(..))
        {
            t.complete(status, 0);
        }
    }

    /// Completes parked transfer `id` as cancelled, if it is parked here.
    pub fn cancel(&mut self, id: TransferId) {
        cancel_parked(&mut self.status_q, id);
        cancel_parked(&mut self.data_in_q, id);
        cancel_parked(&mut self.data_out_q, id);
    }

    /// Outstanding commands.
    pub fn tasks(&self) -> usize {
        self.tasks.len()
    }

    /// A transfer on the command pipe: one Command or Task Management IU.
    pub fn command(&mut self, xfer: Transfer, scsi: &mut Scsi) {
        let mut b = [0u8; COMMAND_IU_LEN];
        let n = xfer.len().min(b.len());
        match xfer.read_data(0, &mut b[..n]) {
            Ok(got) if got == n => {}
            Ok(_) => {
                xfer.complete(TransferStatus::Cancelled, 0);
                return;
            }
            Err(_) => {
                xfer.complete(TransferStatus::TransactionError, 0);
                return;
            }
        }
        let len = xfer.len();
        xfer.complete(TransferStatus::Success, len);
        if n < 4 {
            guest_warn!(target: "storage::uas", "{n}-byte IU on the command pipe ignored");
            return;
        }
        let tag = u16::from_be_bytes([b[2], b[3]]);
        let lun_ok = b[8..16].iter().all(|&x| x == 0);
        match b[0] {
            IU_COMMAND if n == COMMAND_IU_LEN => {
                if self.tasks.iter().any(|t| t.tag == tag) {
                    guest_warn!(target: "storage::uas", "command with tag {tag} already in progress");
                    self.replies
                        .push_back((tag, response_iu(tag, rc::OVERLAPPED_TAG)));
                } else if self.tasks.len() >= MAX_TASKS {
                    let t = Task {
                        status: ST_TASK_SET_FULL,
                        ..Task::from_plan(tag, Plan::NoData)
                    };
                    self.replies.push_back((tag, t.sense_iu()));
                } else {
                    let mut cdb = [0u8; 16];
                    cdb.copy_from_slice(&b[16..32]);
                    let plan = if lun_ok {
                        scsi.plan(&cdb)
                    } else {
                        Plan::Fail(Sense::LUN_NOT_SUPPORTED)
                    };
                    self.tasks.push_back(Task::from_plan(tag, plan));
                }
            }
            IU_TASK_MGMT if n >= TASK_MGMT_IU_LEN => {
                let code = if lun_ok {
                    self.task_management(b[4], u16::from_be_bytes([b[6], b[7]]))
                } else {
                    rc::INCORRECT_LUN
                };
                self.replies.push_back((tag, response_iu(tag, code)));
            }
            id => {
                guest_warn!(target: "storage::uas", "invalid IU {id:#04x} ({n} bytes) on the command pipe");
                self.replies
                    .push_back((tag, response_iu(tag, rc::INVALID_IU)));
            }
        }
        self.bound_replies();
    }

    /// Keeps unanswered replies bounded (a host that never reads status).
    fn bound_replies(&mut self) {
        while self.replies.len() > MAX_TASKS {
            self.replies.pop_front();
        }
    }

    fn task_management(&mut self, function: u8, task_tag: u16) -> u8 {
        match function {
            tmf::ABORT_TASK => {
                self.tasks.retain(|t| t.tag != task_tag);
                rc::COMPLETE
            }
            tmf::ABORT_TASK_SET
            | tmf::CLEAR_TASK_SET
            | tmf::LOGICAL_UNIT_RESET
            | tmf::I_T_NEXUS_RESET => {
                self.tasks.clear();
                rc::COMPLETE
            }
            tmf::QUERY_TASK if self.tasks.iter().any(|t| t.tag == task_tag) => rc::SUCCEEDED,
            tmf::QUERY_TASK => rc::COMPLETE,
            _ => rc::NOT_SUPPORTED,
        }
    }

    /// Parks a status transfer.
    pub fn status(&mut self, xfer: Transfer) {
        park(&mut self.status_q, xfer);
    }

    /// Parks a data transfer (`dir_in` for the data-in pipe).
    pub fn data(&mut self, xfer: Transfer, dir_in: bool) {
        park(self.data_q(dir_in), xfer);
    }

    /// The parked transfers of the data-in (`dir_in`) or data-out pipe.
    fn data_q(&mut self, dir_in: bool) -> &mut VecDeque<Transfer> {
        if dir_in {
            &mut self.data_in_q
        } else {
            &mut self.data_out_q
        }
    }

    /// Moves data and status for every task whose transfers are there.
    /// Each step consumes a parked transfer: bounded.
    pub fn pump(&mut self, scsi: &mut Scsi) {
        if !self.streams {
            return self.pump_serial(scsi);
        }
        loop {
            let mut progressed = false;
            let mut i = 0;
            while i < self.tasks.len() {
                let (tag, dir_in, data_done) = {
                    let t = &self.tasks[i];
                    (t.tag, t.dir_in, t.data_done)
                };
                if !data_done {
                    if let Some(x) = take(self.data_q(dir_in), tag) {
                        Self::move_data(&mut self.tasks[i], x, scsi);
                        progressed = true;
                    }
                }
                let t = &self.tasks[i];
                if t.data_done {
                    if let Some(x) = take(&mut self.status_q, t.tag) {
                        complete_in(x, &t.sense_iu());
                        self.tasks.remove(i);
                        progressed = true;
                        continue;
                    }
                }
                i += 1;
            }
            let mut j = 0;
            while j < self.replies.len() {
                let tag = self.replies[j].0;
                match take(&mut self.status_q, tag) {
                    Some(x) => {
                        if let Some((_, iu)) = self.replies.remove(j) {
                            complete_in(x, &iu);
                        }
                        progressed = true;
                    }
                    None => j += 1,
                }
            }
            if !progressed {
                break;
            }
        }
    }

    /// [`Uas::pump`] without streams: every parked transfer is for the
    /// front of its pipe's queue. Per round, in this order: finished tasks'
    /// Sense IUs and the replies (oldest first) take status transfers; the
    /// task whose data phase is under way in each direction takes that
    /// pipe's data transfers; a direction without one gives its oldest
    /// waiting task a Ready IU. Each step consumes a parked transfer.
    fn pump_serial(&mut self, scsi: &mut Scsi) {
        loop {
            let mut progressed = false;
            // Status: finished tasks, in arrival order, then the replies.
            let mut i = 0;
            while i < self.tasks.len() && !self.status_q.is_empty() {
                if self.tasks[i].data_done {
                    if let (Some(t), Some(x)) = (self.tasks.remove(i), self.status_q.pop_front()) {
                        complete_in(x, &t.sense_iu());
                        progressed = true;
                    }
                } else {
                    i += 1;
                }
            }
            while !self.replies.is_empty() && !self.status_q.is_empty() {
                if let (Some((_, iu)), Some(x)) =
                    (self.replies.pop_front(), self.status_q.pop_front())
                {
                    complete_in(x, &iu);
                    progressed = true;
                }
            }
            for dir_in in [true, false] {
                let active = self
                    .tasks
                    .iter()
                    .position(|t| t.dir_in == dir_in && t.ready && !t.data_done);
                match active {
                    Some(i) => {
                        if let Some(x) = self.data_q(dir_in).pop_front() {
                            Self::move_data(&mut self.tasks[i], x, scsi);
                            progressed = true;
                        }
                    }
                    None => {
                        // Data nobody asked for (no Ready IU out in this
                        // direction): it cannot belong to a later command,
                        // so it must not be given to one. STALL, as QEMU.
                        let q = self.data_q(dir_in);
                        if !q.is_empty() {
                            guest_warn!(target: "storage::uas", "{} data transfer(s) without a Ready IU stalled", q.len());
                            for x in q.drain(..) {
                                x.complete(TransferStatus::Stall, 0);
                            }
                            progressed = true;
                        }
                        let next = self
                            .tasks
                            .iter_mut()
                            .find(|t| t.dir_in == dir_in && !t.ready && !t.data_done);
                        if let Some(t) = next {
                            if let Some(x) = self.status_q.pop_front() {
                                t.ready = true;
                                complete_in(x, &ready_iu(t.tag, dir_in));
                                progressed = true;
                            }
                        }
                    }
                }
            }
            if !progressed {
                break;
            }
        }
    }

    /// One data transfer for task `t`: up to the bytes the device still
    /// has (IN: a short packet when it has fewer than the buffer holds).
    fn move_data(t: &mut Task, x: Transfer, scsi: &mut Scsi) {
        let left = t.len.saturating_sub(t.done);
        let want = usize::try_from(left).unwrap_or(usize::MAX).min(x.len());
        let r = t.dev.move_data(&x, t.dir_in, t.done, want, scsi.file());
        match r {
            Ok(moved) => {
                t.done = t.done.saturating_add(moved as u64);
                if t.done >= t.len || moved < want {
                    // All moved, or the host cancelled under us: the
                    // phase is over either way.
                    t.data_done = true;
                    if moved < want {
                        t.fail(Sense::ABORTED);
                    }
                }
                let st = if moved < x.len() {
                    TransferStatus::ShortPacket
                } else {
                    TransferStatus::Success
                };
                x.complete(st, moved);
            }
            Err(DmaError::Io) => {
                guest_warn!(target: "storage::uas", "image I/O failed; failing the command");
                t.fail(if t.dir_in {
                    Sense::READ_ERROR
                } else {
                    Sense::WRITE_ERROR
                });
                x.complete(TransferStatus::ShortPacket, 0);
            }
            Err(e) => {
                guest_warn!(target: "storage::uas", "data buffer not accessible: {e}");
                t.fail(Sense::ABORTED);
                x.complete(TransferStatus::TransactionError, 0);
            }
        }
    }
}
