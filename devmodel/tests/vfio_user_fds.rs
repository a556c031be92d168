//! File descriptors a hostile vfio-user client attaches to messages: more
//! than the server takes, on commands that take none, or the wrong number.
//! Alone in its own test binary: it counts this process's open descriptors.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devmodel::config::Config;
use devmodel::vfio_user::Server;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn header(id: u16, cmd: u16, size: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&cmd.to_le_bytes());
    v.extend_from_slice(&size.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v
}

/// (id, error) of the next reply.
fn reply(s: &mut UnixStream) -> (u16, u32) {
    let mut h = [0u8; 16];
    s.read_exact(&mut h).unwrap();
    let size = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    let mut body = vec![0u8; size - 16];
    s.read_exact(&mut body).unwrap();
    (
        u16::from_le_bytes([h[0], h[1]]),
        u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
    )
}

#[test]
fn too_many_fds_in_one_message_are_closed_and_the_stream_stays_in_sync() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("stick.img"), vec![0u8; 1 << 20]).unwrap();
    let sock = dir.path().join("dm.sock");
    let text = format!(
        "[controller]\nmodel=\"xhci\"\n[transport]\nkind=\"vfio-user\"\nsocket=\"{}\"\n[[device]]\nkind=\"storage\"\nimage=\"stick.img\"\n",
        sock.display()
    );
    let cfg = Config::parse(&text, &dir.path().join("xen-dm.toml")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel();
    let (s2, sock2) = (stop.clone(), sock.clone());
    let thread = std::thread::spawn(move || {
        let mut server = Server::new(&sock2, |ram, waker| {
            devmodel::build_controller(&cfg, ram, waker, &mut devmodel::Inputs::default()).unwrap()
        })
        .unwrap();
        tx.send(()).unwrap();
        server.run(|_| s2.load(Ordering::Relaxed)).unwrap();
    });
    rx.recv().unwrap();
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Settle: the server has accepted the client.
    s.write_all(&header(1, 4, 16)).unwrap();
    assert_eq!(reply(&mut s), (1, 0));
    let backing = tempfile::tempfile().unwrap();
    backing.set_len(1 << 20).unwrap();
    let baseline = open_fds();
    let many =
        |n: usize| -> Vec<std::fs::File> { (0..n).map(|_| backing.try_clone().unwrap()).collect() };
    let raw = |v: &[std::fs::File]| -> Vec<RawFd> { v.iter().map(|f| f.as_raw_fd()).collect() };
    // 200 descriptors (the server takes 16 per message), on GET_INFO:
    // refused, all closed, the next message is read as one.
    let fds = many(200);
    s.send_with_fds(&[&header(2, 4, 16)[..]], &raw(&fds))
        .unwrap();
    drop(fds);
    assert_eq!(reply(&mut s), (2, libc::EINVAL as u32));
    // A few on a command that takes none: ignored (closed).
    let fds = many(3);
    s.send_with_fds(&[&header(7, 4, 16)[..]], &raw(&fds))
        .unwrap();
    drop(fds);
    assert_eq!(reply(&mut s), (7, 0));
    // DMA_MAP with 20 descriptors: refused.
    let mut m = header(3, 2, 16 + 32);
    m.extend_from_slice(&32u32.to_le_bytes());
    m.extend_from_slice(&3u32.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&(1u64 << 20).to_le_bytes());
    let fds = many(20);
    s.send_with_fds(&[&m[..]], &raw(&fds)).unwrap();
    drop(fds);
    assert_eq!(reply(&mut s), (3, libc::EINVAL as u32));
    // SET_IRQS MSI-X, count 1, with 5 eventfd-less descriptors: refused.
    let mut m = header(4, 8, 16 + 20);
    for v in [20u32, (1 << 2) | (1 << 5), 2, 0, 1] {
        m.extend_from_slice(&v.to_le_bytes());
    }
    let fds = many(5);
    s.send_with_fds(&[&m[..]], &raw(&fds)).unwrap();
    drop(fds);
    assert_eq!(reply(&mut s), (4, libc::EINVAL as u32));
    // Descriptors arriving with the second half of a message (read as
    // plain body bytes): dropped by the kernel, framing intact.
    let mut m = header(5, 9, 32);
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&7u32.to_le_bytes());
    m.extend_from_slice(&4u32.to_le_bytes());
    s.write_all(&m[..16]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let fds = many(8);
    s.send_with_fds(&[&m[16..]], &raw(&fds)).unwrap();
    drop(fds);
    assert_eq!(reply(&mut s), (5, 0));
    // Still in sync, and nothing leaked into this process.
    s.write_all(&header(6, 4, 16)).unwrap();
    assert_eq!(reply(&mut s), (6, 0));
    assert_eq!(open_fds(), baseline, "descriptors leaked");

    stop.store(true, Ordering::Relaxed);
    drop(s);
    thread.join().unwrap();
}
