//! Fuzzes the vfio-user server's message handling: the input is what a
//! hostile client sends, with a real xHCI (a SuperSpeed stick offering
//! UAS and a high-speed stick) behind the server.
//!
//! The server is driven through `devmodel::vfio_user::fuzzing`: its own
//! `serve_from` on one end of a socket pair, one message at a time on this
//! thread. The harness writes a valid VERSION negotiation, then up to
//! [`MAX_OPS`] operations decoded from the input:
//!
//! - a message: command (mostly a known one), flags (mostly 0, sometimes
//!   NO_REPLY or anything), a payload built for the command from fuzzed
//!   fields (or raw bytes), `message_size` fixed up most of the time and
//!   raw sometimes (the stream then desynchronises as it would);
//!   DMA_MAP sometimes carries a descriptor of a 1 MiB shared-memory file,
//!   SET_IRQS sometimes eventfds;
//! - a write into that shared memory (guest RAM: rings, contexts);
//! - a `process()` of the controller (a completion wake-up).
//!
//! The harness knows the bytes it has written, so it asks the server for a
//! message only once the whole message is in the socket (the server's
//! 5-second wait for the rest of a message never starts); at the end it
//! shuts its end down, so whatever is left is read to EOF and fails. When
//! the server drops the client, the harness connects again. Replies are
//! drained after every message so the server never blocks writing.
#![no_main]

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};

use devmodel::vfio_user::fuzzing::FuzzSession;
use devmodel::vfio_user::MAX_MESSAGE;
use hcd_emul::usb::Speed;
use hcd_emul::xhci::regs::BAR0_SIZE;
use hcd_emul::xhci::Xhci;
use hcd_emul::UsbStorage;
use hcd_emul_fuzz::{image, run_small_stack, shm_file};
use libfuzzer_sys::arbitrary::{Result as AResult, Unstructured};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const MAX_OPS: usize = 64;
const HEADER: usize = 16;
/// The shared-memory file DMA_MAP hands over.
const MEM: u64 = 1 << 20;

const VERSION: u16 = 1;
const DMA_MAP: u16 = 2;
const DMA_UNMAP: u16 = 3;
const GET_INFO: u16 = 4;
const GET_REGION_INFO: u16 = 5;
const GET_IRQ_INFO: u16 = 7;
const SET_IRQS: u16 = 8;
const REGION_READ: u16 = 9;
const REGION_WRITE: u16 = 10;
const RESET: u16 = 13;
const COMMANDS: [u16; 11] = [
    VERSION,
    DMA_MAP,
    DMA_UNMAP,
    GET_INFO,
    GET_REGION_INFO,
    6,
    GET_IRQ_INFO,
    SET_IRQS,
    REGION_READ,
    REGION_WRITE,
    RESET,
];

/// The client's side: its socket end and what the server has not read yet.
struct Client {
    sock: UnixStream,
    /// Bytes written that the server has not consumed.
    pending: Vec<u8>,
    /// The socket is full (or broken): nothing more is sent.
    stuck: bool,
}

impl Client {
    fn new(sock: UnixStream) -> Self {
        sock.set_nonblocking(true)
            .expect("nonblocking client socket");
        Self {
            sock,
            pending: Vec::new(),
            stuck: false,
        }
    }

    fn send(&mut self, msg: &[u8], fds: &[RawFd]) {
        if self.stuck {
            return;
        }
        let r = if fds.is_empty() {
            self.sock.write(msg)
        } else {
            self.sock
                .send_with_fds(&[msg], fds)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
        };
        match r {
            Ok(n) => {
                self.pending.extend_from_slice(&msg[..n]);
                if n < msg.len() {
                    self.stuck = true;
                }
            }
            Err(_) => self.stuck = true,
        }
    }

    /// Bytes of the next message as the server frames it, if they are all
    /// in the socket: a header with an impossible size is all the server
    /// reads before it drops the client.
    fn next_message(&self) -> Option<usize> {
        let h = self.pending.get(..HEADER)?;
        let size = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        if !(HEADER..=MAX_MESSAGE).contains(&size) {
            return Some(HEADER);
        }
        (self.pending.len() >= size).then_some(size)
    }

    fn drain_replies(&mut self) {
        let mut buf = [0u8; 16384];
        loop {
            match self.sock.read(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

type Session = FuzzSession<Xhci>;

/// Serves every whole message in the socket. `false`: the server dropped
/// the client (the caller reconnects).
fn serve_ready(s: &mut Session, c: &mut Client) -> bool {
    while let Some(n) = c.next_message() {
        let r = s.serve_one();
        c.pending.drain(..n.min(c.pending.len()));
        c.drain_replies();
        if r.is_err() {
            return false;
        }
    }
    true
}

fn msg(id: u16, cmd: u16, flags: u32, size: Option<u32>, payload: &[u8]) -> Vec<u8> {
    let size = size.unwrap_or((HEADER + payload.len()) as u32);
    let mut m = Vec::with_capacity(HEADER + payload.len());
    m.extend_from_slice(&id.to_le_bytes());
    m.extend_from_slice(&cmd.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(payload);
    m
}

fn put32(p: &mut Vec<u8>, v: u32) {
    p.extend_from_slice(&v.to_le_bytes());
}
fn put64(p: &mut Vec<u8>, v: u64) {
    p.extend_from_slice(&v.to_le_bytes());
}

/// A region offset: mostly inside BAR 0 / config space, naturally aligned.
fn region_and_offset(u: &mut Unstructured) -> AResult<(u32, u64)> {
    Ok(match u.int_in_range(0u8..=7)? {
        0..=3 => (
            0,
            u64::from(u.int_in_range(0u32..=(BAR0_SIZE as u32 - 1))?) & !3,
        ),
        4 | 5 => (7, u64::from(u.int_in_range(0u32..=255)?)),
        6 => (u.int_in_range(0u32..=9)?, u.arbitrary::<u16>()?.into()),
        _ => (u.arbitrary()?, u.arbitrary()?),
    })
}

/// Fuzzed fields of one message: (command, payload, descriptors to pass).
fn message(
    u: &mut Unstructured,
    mem: &std::fs::File,
    evs: &mut Vec<EventFd>,
) -> AResult<(u16, Vec<u8>, Vec<RawFd>)> {
    let cmd = if u.ratio(1u8, 16)? {
        u.arbitrary()?
    } else {
        *u.choose(&COMMANDS)?
    };
    let mut p = Vec::new();
    let mut fds = Vec::new();
    if u.ratio(1u8, 16)? {
        // Raw payload.
        let n = u.int_in_range(0usize..=64)?;
        p.extend_from_slice(u.bytes(n.min(u.len()))?);
        return Ok((cmd, p, fds));
    }
    match cmd {
        VERSION => {
            p.extend_from_slice(&0u16.to_le_bytes());
            p.extend_from_slice(&u.arbitrary::<u16>()?.to_le_bytes());
            let n = u.int_in_range(0usize..=32)?;
            p.extend_from_slice(u.bytes(n.min(u.len()))?);
        }
        DMA_MAP => {
            let with_fd = u.ratio(3u8, 4)?;
            let mut addr = if u.ratio(3u8, 4)? {
                u64::from(u.int_in_range(0u32..=63)?) << 12
            } else {
                u.arbitrary()?
            };
            let (offset, size): (u64, u64) = if u.ratio(3u8, 4)? {
                (
                    u64::from(u.int_in_range(0u32..=255)?) << 12,
                    u64::from(u.int_in_range(1u32..=256)?) << 12,
                )
            } else {
                (u.arbitrary()?, u.arbitrary()?)
            };
            // Sizes and offsets past the file's end, and offsets near
            // 2^64, reach the server as they are: it must refuse them.
            if with_fd {
                fds.push(mem.as_raw_fd());
            }
            if u.ratio(1u8, 8)? {
                addr &= 0xffff_ffff;
            }
            put32(&mut p, 32);
            put32(&mut p, u.int_in_range(0u32..=3)?);
            put64(&mut p, offset);
            put64(&mut p, addr);
            put64(&mut p, size);
        }
        DMA_UNMAP => {
            put32(&mut p, 24);
            put32(&mut p, u.int_in_range(0u32..=3)?);
            if u.ratio(3u8, 4)? {
                put64(&mut p, u64::from(u.int_in_range(0u32..=63)?) << 12);
                put64(&mut p, u64::from(u.int_in_range(0u32..=64)?) << 12);
            } else {
                put64(&mut p, u.arbitrary()?);
                put64(&mut p, u.arbitrary()?);
            }
        }
        GET_REGION_INFO | GET_IRQ_INFO => {
            put32(&mut p, 32);
            put32(&mut p, 0);
            put32(&mut p, u.int_in_range(0u32..=10)?);
        }
        SET_IRQS => {
            let action = *u.choose(&[1u32 << 3, 1 << 4, 1 << 5])?;
            let data = *u.choose(&[1u32 << 0, 1 << 1, 1 << 2])?;
            let flags = if u.ratio(1u8, 8)? {
                u.arbitrary()?
            } else {
                action | data
            };
            let index = u.int_in_range(0u32..=5)?;
            let start = if u.ratio(7u8, 8)? {
                u.int_in_range(0u32..=16)?
            } else {
                u.arbitrary()?
            };
            let nfds = if data == 1 << 2 && u.ratio(2u8, 3)? {
                u.int_in_range(1usize..=4)?
            } else {
                0
            };
            let count = if u.ratio(7u8, 8)? {
                nfds as u32
            } else {
                u.arbitrary()?
            };
            for _ in 0..nfds {
                if let Ok(e) = EventFd::new(EFD_NONBLOCK) {
                    fds.push(e.as_raw_fd());
                    evs.push(e);
                }
            }
            put32(&mut p, 20);
            put32(&mut p, flags);
            put32(&mut p, index);
            put32(&mut p, start);
            put32(&mut p, count);
            if data == 1 << 1 {
                let n = u.int_in_range(0usize..=4)?;
                p.extend_from_slice(u.bytes(n.min(u.len()))?);
            }
        }
        REGION_READ => {
            let (region, off) = region_and_offset(u)?;
            let count = match u.int_in_range(0u8..=7)? {
                0..=5 => *u.choose(&[1u32, 2, 4, 8])?,
                6 => u.int_in_range(0u32..=256)?,
                _ => u.arbitrary()?,
            };
            put64(&mut p, off);
            put32(&mut p, region);
            put32(&mut p, count);
        }
        REGION_WRITE => {
            let (region, off) = region_and_offset(u)?;
            let n = match u.int_in_range(0u8..=7)? {
                0..=5 => *u.choose(&[1usize, 2, 4, 8])?,
                _ => u.int_in_range(0usize..=64)?,
            };
            let data = u.bytes(n.min(u.len()))?;
            let count = if u.ratio(15u8, 16)? {
                data.len() as u32
            } else {
                u.arbitrary()?
            };
            put64(&mut p, off);
            put32(&mut p, region);
            put32(&mut p, count);
            p.extend_from_slice(data);
        }
        _ => {
            // GET_INFO, RESET, unknown: an optional short payload.
            let n = u.int_in_range(0usize..=8)?;
            p.extend_from_slice(u.bytes(n.min(u.len()))?);
        }
    }
    Ok((cmd, p, fds))
}

fn stick(speed: Speed) -> Option<Box<UsbStorage>> {
    UsbStorage::from_file(image(), false, speed)
        .ok()
        .map(|s| Box::new(s.with_uas(speed == Speed::Super)))
}

fn run(data: &[u8]) {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "vfio-user-fuzz-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let (mut s, sock) = FuzzSession::new(&path, |ram, waker| {
        let mut x = Xhci::new(ram);
        x.completion_queue().set_waker(waker);
        for sp in [Speed::Super, Speed::High] {
            if let Some(d) = stick(sp) {
                let _ = x.attach(d);
            }
        }
        x
    })
    .expect("vfio-user server");
    let mut c = Client::new(sock);
    let mem = shm_file(MEM);
    let mut evs = Vec::new();

    // VERSION negotiation, as QEMU's client starts.
    let caps = b"{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":1048576}}\0";
    let mut v = vec![0, 0, 2, 0];
    v.extend_from_slice(caps);
    c.send(&msg(0, VERSION, 0, None, &v), &[]);
    serve_ready(&mut s, &mut c);

    let mut u = Unstructured::new(data);
    let mut id = 1u16;
    for _ in 0..MAX_OPS {
        if u.is_empty() {
            break;
        }
        let Ok(op) = u.int_in_range(0u8..=15) else {
            break;
        };
        match op {
            0 => {
                // Guest RAM: a few bytes into the shared memory.
                let Ok(off) = u.int_in_range(0u32..=(64 << 12) - 1) else {
                    break;
                };
                let n = u.int_in_range(1usize..=64).unwrap_or(1);
                let b = u.bytes(n.min(u.len())).unwrap_or(&[]);
                let _ = mem.write_all_at(b, u64::from(off));
            }
            1 => s.process(),
            _ => {
                let Ok((cmd, payload, fds)) = message(&mut u, &mem, &mut evs) else {
                    break;
                };
                let flags = match u.int_in_range(0u8..=15).unwrap_or(0) {
                    0 => 1 << 4, // NO_REPLY
                    1 => u.arbitrary().unwrap_or(0),
                    _ => 0,
                };
                let size = if u.ratio(1u8, 16).unwrap_or(false) {
                    Some(u.arbitrary().unwrap_or(0))
                } else {
                    None
                };
                c.send(&msg(id, cmd, flags, size, &payload), &fds);
                id = id.wrapping_add(1);
            }
        }
        if !serve_ready(&mut s, &mut c) {
            // Dropped (device reset); the client comes back.
            match s.reconnect() {
                Ok(sock) => c = Client::new(sock),
                Err(_) => break,
            }
        }
        if c.stuck {
            break;
        }
    }
    // Whatever is left is read up to EOF, then the client is gone.
    let _ = c.sock.shutdown(std::net::Shutdown::Write);
    while !c.pending.is_empty() {
        let before = c.pending.len();
        let r = s.serve_one();
        let n = c.next_message().unwrap_or(c.pending.len());
        c.pending.drain(..n.min(c.pending.len()));
        c.drain_replies();
        if r.is_err() || c.pending.len() == before {
            break;
        }
    }
    s.hang_up();
    assert_eq!(s.pci().controller().transfers_in_flight(), 0);
    assert_eq!(s.dma_mappings(), 0);
    drop(evs);
}

fuzz_target!(|data: &[u8]| {
    run_small_stack(data, run);
});
