//! The vfio-user transport against rust-vmm's vfio-user client (a real,
//! independent implementation of the protocol) and against raw, malformed
//! messages.

use hcd_emul::ratelimit::LogCounter;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use devmodel::config::Config;
use devmodel::vfio_user::Server;
use hcd_emul::xhci::regs::*;
use hcd_emul::xhci::trb::{ty, Trb};
use vfio_user::Client;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

struct Running {
    sock: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn start() -> Running {
    start_with(None)
}

/// `start`, the server thread logging to `log` (if given).
fn start_with(log: Option<LogCounter>) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("stick.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("dm.sock");
    let text = format!(
        "[controller]\nmodel=\"xhci\"\n[transport]\nkind=\"vfio-user\"\nsocket=\"{}\"\n[[device]]\nkind=\"storage\"\nimage=\"stick.img\"\n",
        sock.display()
    );
    let cfg = Config::parse(&text, &dir.path().join("xen-dm.toml")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let s2 = stop.clone();
    let sock2 = sock.clone();
    let thread = std::thread::spawn(move || {
        let mut server = Server::new(&sock2, |ram, waker| {
            devmodel::build_controller(&cfg, ram, waker, &mut devmodel::Inputs::default()).unwrap()
        })
        .unwrap();
        tx.send(()).unwrap();
        let mut run = move || server.run(|_| s2.load(Ordering::Relaxed)).unwrap();
        match log {
            Some(l) => tracing::subscriber::with_default(l, run),
            None => run(),
        }
    });
    rx.recv().unwrap();
    Running {
        sock,
        stop,
        thread: Some(thread),
        _dir: dir,
    }
}

fn client(p: &Path) -> Client {
    Client::new(p).expect("vfio-user client connects and negotiates")
}

fn r32(c: &mut Client, region: u32, off: u64) -> u32 {
    let mut b = [0u8; 4];
    c.region_read(region, off, &mut b).unwrap();
    u32::from_le_bytes(b)
}

fn w32(c: &mut Client, region: u32, off: u64, v: u32) {
    c.region_write(region, off, &v.to_le_bytes()).unwrap();
}

#[test]
fn config_space_and_bar_through_a_real_client() {
    let s = start();
    let mut c = client(&s.sock);
    assert_eq!(r32(&mut c, 7, 0), 0x000d_1b36);
    assert_eq!(r32(&mut c, 7, 8) >> 8, 0x0c0330);
    assert_eq!(
        r32(&mut c, 0, 0),
        0x0120_0040,
        "CAPLENGTH/HCIVERSION over BAR 0"
    );
    // BAR sizing through config space.
    w32(&mut c, 7, 0x10, 0xffff_ffff);
    assert_eq!(r32(&mut c, 7, 0x10), !(BAR0_SIZE as u32 - 1) | 0x4);
}

/// DMA through a memfd-like shared file, a command ring, and an MSI-X
/// interrupt delivered through the client's eventfd.
#[test]
fn noop_command_over_dma_with_msix_eventfd() {
    let s = start();
    let mut c = client(&s.sock);
    let ram = tempfile::tempfile().unwrap();
    ram.set_len(1 << 20).unwrap();
    c.dma_map(0, 0, 1 << 20, ram.as_raw_fd()).unwrap();
    let ev = EventFd::new(EFD_NONBLOCK).unwrap();
    // VFIO_IRQ_SET_DATA_EVENTFD | ACTION_TRIGGER on the MSI-X index.
    c.set_irqs(2, (1 << 2) | (1 << 5), 0, 1, &[ev.as_raw_fd()])
        .unwrap();
    w32(&mut c, 7, 4, 6); // memory + bus master
    let op = CAP_LENGTH;
    w32(&mut c, 0, op + OP_USBCMD, USBCMD_HCRST);
    w32(&mut c, 0, op + OP_CONFIG, 8);
    w32(&mut c, 0, op + OP_DCBAAP, 0x1000);
    // Command ring at 0x2000 with one No Op; ERST at 0x3000 -> 0x4000.
    let put = |off: u64, b: &[u8]| {
        use std::os::unix::fs::FileExt;
        ram.write_all_at(b, off).unwrap();
    };
    put(
        0x2000,
        &Trb {
            parameter: 0,
            status: 0,
            control: (ty::NOOP_COMMAND << 10) | 1,
        }
        .to_bytes(),
    );
    put(0x3000, &0x4000u64.to_le_bytes());
    put(0x3008, &16u32.to_le_bytes());
    w32(&mut c, 0, op + OP_CRCR, 0x2001);
    let ir0 = RUNTIME_OFFSET + RT_IR0;
    w32(&mut c, 0, ir0 + 8, 1);
    w32(&mut c, 0, ir0 + 0x18, 0x4000);
    w32(&mut c, 0, ir0 + 0x10, 0x3000);
    w32(&mut c, 0, ir0, IMAN_IE);
    w32(&mut c, 0, op + OP_USBCMD, USBCMD_RS | USBCMD_INTE);
    w32(&mut c, 0, DOORBELL_OFFSET, 0);
    let mut b = [0u8; 16];
    {
        use std::os::unix::fs::FileExt;
        ram.read_exact_at(&mut b, 0x4000).unwrap();
    }
    let t = Trb::from_bytes(&b);
    assert_eq!(t.trb_type(), ty::COMMAND_COMPLETION);
    assert_eq!((t.parameter, t.status >> 24), (0x2000, 1));
    assert_eq!(ev.read().unwrap(), 1, "one MSI-X interrupt signalled");
    // QEMU enables MSI-X with "no eventfd" first (count 1, no descriptor),
    // and disables vectors that way: accepted, and the vector goes quiet.
    c.set_irqs(2, (1 << 2) | (1 << 5), 0, 1, &[]).unwrap();
    let ram2 = &ram;
    {
        use std::os::unix::fs::FileExt;
        ram2.write_all_at(
            &Trb {
                parameter: 0,
                status: 0,
                control: (ty::NOOP_COMMAND << 10) | 1,
            }
            .to_bytes(),
            0x2010,
        )
        .unwrap();
    }
    w32(&mut c, 0, ir0 + 0x18, 0x4010 | 8); // consumed one event, clear EHB
    w32(&mut c, 0, DOORBELL_OFFSET, 0);
    assert!(
        ev.read().is_err(),
        "no interrupt on a vector without eventfd"
    );
    // With an eventfd again, the next event interrupts.
    c.set_irqs(2, (1 << 2) | (1 << 5), 0, 1, &[ev.as_raw_fd()])
        .unwrap();
    {
        use std::os::unix::fs::FileExt;
        ram2.write_all_at(
            &Trb {
                parameter: 0,
                status: 0,
                control: (ty::NOOP_COMMAND << 10) | 1,
            }
            .to_bytes(),
            0x2020,
        )
        .unwrap();
    }
    w32(&mut c, 0, ir0 + 0x18, 0x4020 | 8);
    w32(&mut c, 0, DOORBELL_OFFSET, 0);
    // Interrupt moderation (IMOD 1 ms by default) may delay it: the
    // server's timer delivers it.
    assert_eq!(wait_ev(&ev), Some(1), "interrupt once the eventfd is back");
    // Unmapping the memory under the running controller: the next command
    // fetch finds no RAM and the controller halts (Host System Error)
    // instead of touching unmapped memory.
    c.dma_unmap(0, 1 << 20).unwrap();
    w32(&mut c, 0, DOORBELL_OFFSET, 0);
    let sts = r32(&mut c, 0, op + OP_USBSTS);
    assert_eq!(sts & (USBSTS_HSE | USBSTS_HCH), USBSTS_HSE | USBSTS_HCH);
}

fn wait_ev(ev: &EventFd) -> Option<u64> {
    for _ in 0..200 {
        if let Ok(n) = ev.read() {
            return Some(n);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn raw(p: &Path) -> UnixStream {
    let s = UnixStream::connect(p).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn header(id: u16, cmd: u16, size: u32, flags: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&cmd.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

fn read_reply(s: &mut UnixStream) -> (u16, u32, u32, Vec<u8>) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let size = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let flags = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    let err = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    let mut body = vec![0u8; size - 16];
    s.read_exact(&mut body).unwrap();
    (u16::from_le_bytes([h[0], h[1]]), flags, err, body)
}

fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn malformed_messages_get_errors_and_the_stream_stays_in_sync() {
    let srv = start();
    let mut s = raw(&srv.sock);
    // Unknown command with a payload: error reply, payload consumed.
    let mut m = header(1, 99, 16 + 5, 0);
    m.extend_from_slice(b"hello");
    s.write_all(&m).unwrap();
    let (id, flags, err, _) = read_reply(&mut s);
    assert_eq!((id, flags & 0x21, err), (1, 0x21, libc::ENOTSUP as u32));
    // Truncated REGION_READ payload: EINVAL.
    let mut m = header(2, 9, 16 + 4, 0);
    m.extend_from_slice(&[0; 4]);
    s.write_all(&m).unwrap();
    let (id, flags, err, _) = read_reply(&mut s);
    assert_eq!((id, flags & 0x20, err), (2, 0x20, libc::EINVAL as u32));
    // A read of 1 GiB: refused, nothing allocated.
    let mut m = header(3, 9, 32, 0);
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&0u32.to_le_bytes());
    m.extend_from_slice(&(1u32 << 30).to_le_bytes());
    s.write_all(&m).unwrap();
    assert_eq!(read_reply(&mut s).2, libc::EINVAL as u32);
    // Region index out of range, and a read past the end of BAR 0.
    for (region, off) in [(42u32, 0u64), (0, BAR0_SIZE - 2)] {
        let mut m = header(4, 9, 32, 0);
        m.extend_from_slice(&off.to_le_bytes());
        m.extend_from_slice(&region.to_le_bytes());
        m.extend_from_slice(&4u32.to_le_bytes());
        s.write_all(&m).unwrap();
        assert_eq!(read_reply(&mut s).2, libc::EINVAL as u32);
    }
    // VERSION with garbage capabilities: answered, no crash.
    let mut m = header(5, 1, 16 + 4 + 3, 0);
    m.extend_from_slice(&[0, 0, 0, 0, 0xff, 0xfe, 0x7b]);
    s.write_all(&m).unwrap();
    let (id, flags, _, body) = read_reply(&mut s);
    assert_eq!((id, flags & 0x20), (5, 0));
    assert!(String::from_utf8_lossy(&body[4..]).contains("max_msg_fds"));
    // Still in sync: a valid config read.
    let mut m = header(6, 9, 32, 0);
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&7u32.to_le_bytes());
    m.extend_from_slice(&4u32.to_le_bytes());
    s.write_all(&m).unwrap();
    let (_, _, err, body) = read_reply(&mut s);
    assert_eq!(err, 0);
    assert_eq!(&body[16..20], &0x000d_1b36u32.to_le_bytes());
    // A header whose size is below the header size: the connection drops.
    let _ = s.write_all(&header(7, 9, 8, 0));
    assert!(closed(&mut s));
    // The server survives and serves the next client.
    let mut c = client(&srv.sock);
    assert_eq!(r32(&mut c, 7, 0), 0x000d_1b36);
}

#[test]
fn truncated_message_and_disconnect_mid_message() {
    let srv = start();
    let mut s = raw(&srv.sock);
    let mut m = header(1, 10, 16 + 16 + 64, 0);
    m.extend_from_slice(&[0; 20]);
    s.write_all(&m).unwrap();
    // Half-close mid-message: the server must give up on it and close.
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed(&mut s));
    // A huge size: dropped without allocating it.
    let mut s = raw(&srv.sock);
    let _ = s.write_all(&header(1, 10, u32::MAX, 0));
    assert!(closed(&mut s));
    let mut c = client(&srv.sock);
    assert_eq!(r32(&mut c, 7, 0), 0x000d_1b36);
}

#[test]
fn second_client_is_refused_first_keeps_working() {
    let srv = start();
    let mut a = client(&srv.sock);
    let mut b = raw(&srv.sock);
    // The server may already have closed it: a failed write is fine.
    let _ = b.write_all(&header(1, 4, 16, 0));
    assert!(closed(&mut b), "second client refused");
    assert_eq!(r32(&mut a, 7, 0), 0x000d_1b36);
}

fn set_irqs_msg(id: u16, flags: u32, index: u32, start: u32, count: u32) -> Vec<u8> {
    let mut m = header(id, 8, 16 + 20, 0);
    m.extend_from_slice(&20u32.to_le_bytes());
    m.extend_from_slice(&flags.to_le_bytes());
    m.extend_from_slice(&index.to_le_bytes());
    m.extend_from_slice(&start.to_le_bytes());
    m.extend_from_slice(&count.to_le_bytes());
    m
}

/// SET_IRQS with TRIGGER|DATA_NONE used to signal `count` vectors, a u32
/// from the client: u32::MAX kept the server busy for half an hour.
#[test]
fn set_irqs_count_unbounded_is_refused_quickly() {
    let srv = start();
    let mut s = raw(&srv.sock);
    const TRIGGER_NONE: u32 = (1 << 5) | 1;
    let t0 = std::time::Instant::now();
    for (i, (index, start, count)) in [
        (2u32, 0u32, u32::MAX),
        (2, 1, u32::MAX),
        (2, u32::MAX, 2),
        (2, 0, 5), // one more than the 4 MSI-X vectors
        (0, 0, 2), // INTx has one vector
        (3, 0, 1), // ERR/REQ: none
        (9, 0, 0), // no such index
    ]
    .into_iter()
    .enumerate()
    {
        s.write_all(&set_irqs_msg(i as u16, TRIGGER_NONE, index, start, count))
            .unwrap();
        let (id, flags, err, _) = read_reply(&mut s);
        assert_eq!(
            (id, flags & 0x20, err),
            (i as u16, 0x20, libc::EINVAL as u32),
            "index {index} start {start} count {count}"
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    // In range: accepted (all 4 vectors, and count 0 disabling the index).
    for (i, count) in [(20u16, 4u32), (21, 0)] {
        s.write_all(&set_irqs_msg(i, TRIGGER_NONE, 2, 0, count))
            .unwrap();
        assert_eq!(read_reply(&mut s).2, 0, "count {count}");
    }
}

/// DMA_MAP of more than the file holds used to be accepted (a later access
/// past the end: SIGBUS, the process gone); a client shrinking its file
/// under a mapping did the same.
#[test]
fn dma_map_beyond_the_file_and_shrunk_file_do_not_kill_the_server() {
    use std::os::unix::fs::FileExt;
    let s = start();
    {
        let small = tempfile::tempfile().unwrap();
        small.set_len(4096).unwrap();
        let mut r = raw(&s.sock);
        let (_, flags, err, _) = dma_map_raw(&mut r, 1, 0, 1 << 20, &small);
        assert_eq!(
            (flags & 0x20, err),
            (0x20, libc::EINVAL as u32),
            "1 MiB over a 4 KiB file"
        );
        let (_, _, err, _) = dma_map_raw(&mut r, 2, 0, 4096, &small);
        assert_eq!(err, 0, "what the file holds");
    }
    let mut c = client(&s.sock);
    let ram = tempfile::tempfile().unwrap();
    ram.set_len(1 << 20).unwrap();
    c.dma_map(0, 0, 1 << 20, ram.as_raw_fd()).unwrap();
    w32(&mut c, 7, 4, 6);
    let op = CAP_LENGTH;
    w32(&mut c, 0, op + OP_USBCMD, USBCMD_HCRST);
    w32(&mut c, 0, op + OP_CONFIG, 8);
    w32(&mut c, 0, op + OP_DCBAAP, 0x1000);
    let noop = Trb {
        parameter: 0,
        status: 0,
        control: (ty::NOOP_COMMAND << 10) | 1,
    }
    .to_bytes();
    ram.write_all_at(&noop, 0x2000).unwrap();
    ram.write_all_at(&0x4000u64.to_le_bytes(), 0x3000).unwrap();
    ram.write_all_at(&16u32.to_le_bytes(), 0x3008).unwrap();
    w32(&mut c, 0, op + OP_CRCR, 0x2001);
    let ir0 = RUNTIME_OFFSET + RT_IR0;
    w32(&mut c, 0, ir0 + 8, 1);
    w32(&mut c, 0, ir0 + 0x18, 0x4000);
    w32(&mut c, 0, ir0 + 0x10, 0x3000);
    w32(&mut c, 0, op + OP_USBCMD, USBCMD_RS);
    w32(&mut c, 0, DOORBELL_OFFSET, 0);
    let mut b = [0u8; 16];
    ram.read_exact_at(&mut b, 0x4000).unwrap();
    assert_eq!(Trb::from_bytes(&b).trb_type(), ty::COMMAND_COMPLETION);
    // The client shrinks its file: rings and event ring are past the end.
    ram.write_all_at(&noop, 0x2010).unwrap();
    ram.set_len(0x1000).unwrap();
    // The fetch faults: a DMA error for the access that hit it (Host
    // System Error), the mapping is dropped, and the process lives.
    w32(&mut c, 0, DOORBELL_OFFSET, 0);
    w32(&mut c, 0, DOORBELL_OFFSET, 0);
    let sts = r32(&mut c, 0, op + OP_USBSTS);
    assert_eq!(
        sts & (USBSTS_HSE | USBSTS_HCH),
        USBSTS_HSE | USBSTS_HCH,
        "{sts:#x}"
    );
    // Alive and well: config space answers, memory can be mapped again.
    assert_eq!(r32(&mut c, 7, 0), 0x000d_1b36);
    ram.set_len(1 << 20).unwrap();
    c.dma_map(0, 0, 1 << 20, ram.as_raw_fd()).unwrap();
}

/// DMA_MAP of `size` bytes of `f` at guest address 0 + `offset` 0.
fn dma_map_raw(
    s: &mut UnixStream,
    id: u16,
    offset: u64,
    size: u64,
    f: &std::fs::File,
) -> (u16, u32, u32, Vec<u8>) {
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let mut m = header(id, 2, 16 + 32, 0);
    m.extend_from_slice(&32u32.to_le_bytes());
    m.extend_from_slice(&3u32.to_le_bytes());
    m.extend_from_slice(&offset.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&size.to_le_bytes());
    s.send_with_fd(&m[..], f.as_raw_fd()).unwrap();
    read_reply(s)
}

fn region_write_raw(s: &mut UnixStream, id: u16, region: u32, off: u64, data: &[u8]) -> u32 {
    let mut m = header(id, 10, (16 + 16 + data.len()) as u32, 0);
    m.extend_from_slice(&off.to_le_bytes());
    m.extend_from_slice(&region.to_le_bytes());
    m.extend_from_slice(&(data.len() as u32).to_le_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).unwrap();
    let (rid, _, err, _) = read_reply(s);
    assert_eq!(rid, id);
    err
}

/// Catalogue row: 64 KiB REGION_WRITEs onto the doorbells of a running
/// controller whose command ring is full of work: answered in bounded
/// time, and the server keeps serving. (The controller's own per-doorbell
/// budget is another change; this only checks the transport.)
#[test]
fn region_write_of_64k_onto_the_doorbells_is_answered() {
    use std::os::unix::fs::FileExt;
    let srv = start();
    let mut s = raw(&srv.sock);
    let ram = tempfile::tempfile().unwrap();
    ram.set_len(1 << 20).unwrap();
    assert_eq!(dma_map_raw(&mut s, 1, 0, 1 << 20, &ram).2, 0);
    let w = |s: &mut UnixStream, off: u64, v: u32| {
        assert_eq!(region_write_raw(s, 2, 0, off, &v.to_le_bytes()), 0);
    };
    assert_eq!(region_write_raw(&mut s, 2, 7, 4, &6u16.to_le_bytes()), 0);
    let op = CAP_LENGTH;
    w(&mut s, op + OP_USBCMD, USBCMD_HCRST);
    w(&mut s, op + OP_CONFIG, 8);
    w(&mut s, op + OP_DCBAAP, 0x1000);
    // 4096 No Op commands at 0x10000; a 16-entry event ring.
    let noop = Trb {
        parameter: 0,
        status: 0,
        control: (ty::NOOP_COMMAND << 10) | 1,
    }
    .to_bytes();
    let ring: Vec<u8> = noop.iter().copied().cycle().take(16 * 4096).collect();
    ram.write_all_at(&ring, 0x10000).unwrap();
    ram.write_all_at(&0x4000u64.to_le_bytes(), 0x3000).unwrap();
    ram.write_all_at(&16u32.to_le_bytes(), 0x3008).unwrap();
    w(&mut s, op + OP_CRCR, 0x10001);
    let ir0 = RUNTIME_OFFSET + RT_IR0;
    w(&mut s, ir0 + 8, 1);
    w(&mut s, ir0 + 0x18, 0x4000);
    w(&mut s, ir0 + 0x10, 0x3000);
    w(&mut s, op + OP_USBCMD, USBCMD_RS);
    let t0 = std::time::Instant::now();
    // 64 KiB at the doorbells runs past the 16 KiB BAR: refused whole.
    let big = vec![0u8; 64 * 1024];
    assert_eq!(
        region_write_raw(&mut s, 3, 0, DOORBELL_OFFSET, &big),
        libc::EINVAL as u32
    );
    // Every doorbell at once (host controller doorbell 0 and 255 slot
    // doorbells), again and again: answered.
    for i in 0..16 {
        assert_eq!(
            region_write_raw(&mut s, 4 + i, 0, DOORBELL_OFFSET, &big[..0x1000]),
            0
        );
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // Still serving.
    let mut m = header(30, 9, 32, 0);
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&7u32.to_le_bytes());
    m.extend_from_slice(&4u32.to_le_bytes());
    s.write_all(&m).unwrap();
    let (_, _, err, body) = read_reply(&mut s);
    assert_eq!((err, &body[16..20]), (0, &0x000d_1b36u32.to_le_bytes()[..]));
}

/// Catalogue row, through the protocol: hostile DMA_MAP/UNMAP (zero
/// sizes, wrapping ranges, unmaps of nothing, overlaps) get error replies
/// or succeed harmlessly; the stream stays in sync. (The table's bounds
/// and consistency under thousands of random operations are checked on
/// `DmaMap` itself, `dma::tests`.)
#[test]
fn hostile_dma_map_and_unmap_messages_are_answered() {
    let srv = start();
    let mut s = raw(&srv.sock);
    let f = tempfile::tempfile().unwrap();
    f.set_len(1 << 20).unwrap();
    let unmap = |s: &mut UnixStream, id: u16, addr: u64, size: u64| {
        let mut m = header(id, 3, 16 + 24, 0);
        m.extend_from_slice(&24u32.to_le_bytes());
        m.extend_from_slice(&0u32.to_le_bytes());
        m.extend_from_slice(&addr.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        s.write_all(&m).unwrap();
        let (rid, _, err, _) = read_reply(s);
        assert_eq!(rid, id);
        err
    };
    let einval = libc::EINVAL as u32;
    assert_eq!(dma_map_raw(&mut s, 1, 0, 0, &f).2, einval, "zero size");
    assert_eq!(
        dma_map_raw(&mut s, 2, 4096, 1 << 20, &f).2,
        einval,
        "past the file"
    );
    assert_eq!(dma_map_raw(&mut s, 3, 0, 1 << 20, &f).2, 0);
    assert_eq!(dma_map_raw(&mut s, 4, 0, 1 << 19, &f).2, 0, "overlap");
    assert_eq!(unmap(&mut s, 5, 1 << 40, 4096), 0, "nothing there");
    assert_eq!(unmap(&mut s, 6, u64::MAX - 4095, 8192), einval, "wraps");
    assert_eq!(unmap(&mut s, 7, 0, 0), 0, "zero size");
    assert_eq!(unmap(&mut s, 8, 4096, 4096), 0, "a hole");
    assert_eq!(unmap(&mut s, 9, 0, u64::MAX), 0, "everything");
}

/// Every line a client can provoke goes through the rate limiter: a
/// flood of bad commands, failing maps, refused second clients and
/// reconnects logs at most 10 lines a second per call site.
#[test]
fn log_flood_from_a_hostile_client_is_rate_limited() {
    let log = LogCounter::default();
    let srv = start_with(Some(log.clone()));
    let t0 = std::time::Instant::now();
    let f = tempfile::tempfile().unwrap();
    f.set_len(4096).unwrap();
    let mut s = raw(&srv.sock);
    for i in 0..5000u16 {
        // Unsupported command; a DMA_MAP past the end of its file; a
        // command that wants no reply and fails.
        s.write_all(&header(i, 99, 16, 0)).unwrap();
        read_reply(&mut s);
        dma_map_raw(&mut s, i, 0, 1 << 20, &f);
        s.write_all(&header(i, 99, 16, 1 << 4)).unwrap();
    }
    for _ in 0..200 {
        // A second client (refused), then a reconnect.
        let mut b = raw(&srv.sock);
        let _ = b.write_all(&header(1, 4, 16, 0));
        assert!(closed(&mut b));
    }
    drop(s);
    for _ in 0..200 {
        // Served, or refused if the server has not yet seen the previous
        // one go: either way a line or two per connection.
        let mut c = raw(&srv.sock);
        let _ = c.write_all(&header(1, 4, 16, 0));
        let _ = c.read(&mut [0u8; 16]);
    }
    drop(srv);
    let elapsed = t0.elapsed();
    let sites = log.sites();
    let cap = 10 * (elapsed.as_secs() as usize + 2);
    // The limiter is per call site and process-wide: other tests running
    // at the same time may have used a site's budget for this second, so
    // only "some site logged" is certain here.
    assert!(!sites.is_empty(), "the flood logged nothing at all");
    for (site, n) in &sites {
        assert!(*n <= cap, "{site}: {n} lines in {elapsed:?} (cap {cap})");
    }
}
