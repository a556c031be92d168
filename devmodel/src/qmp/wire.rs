//! QMP on the wire: a byte stream of JSON objects (QEMU's parser does not
//! need line ends; libxl's needs every message to end in `\r\n`), with
//! descriptors passed as SCM_RIGHTS alongside the bytes (`add-fd`).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use serde_json::Value;

/// Most input buffered from one peer without a complete message (libxl
/// caps its own receive buffer at 1 MiB too).
pub const MAX_PENDING: usize = 1 << 20;
/// Most descriptors one peer may have pending (libxl sends one at a time).
pub const MAX_FDS: usize = 16;

/// One item of input.
#[derive(Debug)]
pub enum Piece {
    /// A complete JSON object: its exact bytes and its value.
    Msg(Vec<u8>, Value),
    /// Input that is not a JSON object (skipped up to the next line end).
    Bad(String),
}

/// Splits a byte stream into JSON messages.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: Vec<u8>,
}

/// More than [`MAX_PENDING`] bytes without a complete message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overflow;

impl Splitter {
    /// Appends input.
    pub fn push(&mut self, data: &[u8]) -> Result<(), Overflow> {
        if self.buf.len() + data.len() > MAX_PENDING {
            self.buf.clear();
            return Err(Overflow);
        }
        self.buf.extend_from_slice(data);
        Ok(())
    }

    /// The next complete message, if the input holds one.
    pub fn next_piece(&mut self) -> Option<Piece> {
        let start = self.buf.iter().position(|b| !b.is_ascii_whitespace());
        let Some(start) = start else {
            self.buf.clear();
            return None;
        };
        let mut it = serde_json::Deserializer::from_slice(&self.buf[start..]).into_iter::<Value>();
        match it.next()? {
            Ok(v) => {
                let end = start + it.byte_offset();
                let raw = self.buf[start..end].to_vec();
                self.buf.drain(..end);
                if v.is_object() {
                    Some(Piece::Msg(raw, v))
                } else {
                    Some(Piece::Bad(
                        "QMP input object member must be an object".into(),
                    ))
                }
            }
            Err(e) if e.is_eof() => None,
            Err(e) => {
                // Resynchronise at the next line end, as a line-based
                // client would.
                let skip = self.buf[start..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(self.buf.len(), |p| start + p + 1);
                self.buf.drain(..skip);
                Some(Piece::Bad(format!("JSON parse error, {e}")))
            }
        }
    }
}

/// Reads what `fd` has (non-blocking), with any descriptors passed along.
/// `Ok(0)` is the end of the stream.
pub fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    const SPACE: usize = 64 * std::mem::size_of::<u64>();
    let mut cmsg = [0u64; SPACE / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below points at a
    // buffer of ours that outlives the call, with its length.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cmsg.as_mut_ptr().cast();
    msg.msg_controllen = SPACE as _;
    // SAFETY: recvmsg writes into the buffers described by `msg`.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled
    // (msg_controllen tells how much); each SCM_RIGHTS payload is an array
    // of descriptors now owned by this process, taken over exactly once.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<i32>();
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..len / std::mem::size_of::<i32>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("descriptors truncated (too many passed)"));
    }
    Ok(n as usize)
}

/// Writes all of `data` to `fd`, the descriptors attached to its first
/// byte (as libxl sends them). Blocking up to the socket's send timeout.
pub fn send_with_fds(fd: RawFd, data: &[u8], fds: &[OwnedFd]) -> io::Result<()> {
    let mut off = 0;
    let raw: Vec<i32> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let mut cmsg = [0u64; 64];
    while off < data.len() {
        let rest = &data[off..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut _,
            iov_len: rest.len(),
        };
        // SAFETY: as in recv_with_fds; the control buffer is sized with
        // CMSG_SPACE for the descriptors copied into it.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            if off == 0 && !raw.is_empty() {
                let bytes = std::mem::size_of_val(raw.as_slice()) as u32;
                msg.msg_control = cmsg.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(bytes) as _;
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(bytes) as _;
                std::ptr::copy_nonoverlapping(
                    raw.as_ptr(),
                    libc::CMSG_DATA(c).cast::<i32>(),
                    raw.len(),
                );
            }
            libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        off += n as usize;
    }
    Ok(())
}

/// Sets a socket's send timeout (a peer that stops reading cannot hold the
/// proxy for longer).
pub fn set_send_timeout(fd: RawFd, secs: i64) {
    let tv = libc::timeval {
        tv_sec: secs,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads a timeval of ours of the size given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(s: &mut Splitter) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(p) = s.next_piece() {
            out.push(match p {
                Piece::Msg(raw, _) => String::from_utf8(raw).unwrap(),
                Piece::Bad(e) => format!("BAD {e}"),
            });
        }
        out
    }

    #[test]
    fn messages_split_on_json_structure_not_lines() {
        let mut s = Splitter::default();
        s.push(b"{\"execute\":\"qmp_capabilities\",\"id\":1}\r\n{\"exec")
            .unwrap();
        assert_eq!(
            msgs(&mut s),
            ["{\"execute\":\"qmp_capabilities\",\"id\":1}"]
        );
        s.push(b"ute\":\"cont\",\n \"id\": \"a}\\\"\"}{\"x\":1}")
            .unwrap();
        assert_eq!(
            msgs(&mut s),
            ["{\"execute\":\"cont\",\n \"id\": \"a}\\\"\"}", "{\"x\":1}"]
        );
    }

    #[test]
    fn garbage_is_reported_and_skipped_to_the_line_end() {
        let mut s = Splitter::default();
        s.push(b"{\"a\":]\r\n{\"b\":2}\r\n[1]\r\n").unwrap();
        let m = msgs(&mut s);
        assert!(m[0].starts_with("BAD JSON parse error"), "{m:?}");
        assert_eq!(m[1], "{\"b\":2}");
        assert!(m[2].starts_with("BAD"), "{m:?}");
        assert_eq!(m.len(), 3);
        // Deep nesting is refused by the parser's recursion limit.
        s.push(&[b'['; 10_000]).unwrap();
        s.push(b"\n").unwrap();
        assert!(msgs(&mut s)[0].starts_with("BAD"));
    }

    #[test]
    fn pending_input_is_capped() {
        let mut s = Splitter::default();
        let big = vec![b' '; 1000];
        s.push(b"{\"a\":\"").unwrap();
        let mut n = 0;
        while s.push(&big).is_ok() {
            n += 1;
            assert!(n < 2000);
        }
        assert!(n >= 1000);
    }

    #[test]
    fn descriptors_travel_with_the_first_byte() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let f = tempfile::tempfile().unwrap();
        send_with_fds(
            a.as_raw_fd(),
            b"{\"execute\":\"add-fd\"}",
            &[OwnedFd::from(f)],
        )
        .unwrap();
        let mut buf = [0u8; 64];
        let mut fds = Vec::new();
        let n = recv_with_fds(b.as_raw_fd(), &mut buf, &mut fds).unwrap();
        assert_eq!(&buf[..n], b"{\"execute\":\"add-fd\"}");
        assert_eq!(fds.len(), 1);
    }
}
