//! The wait primitive both transports share: one epoll set holding the
//! transport's own descriptors, an eventfd devices signal when they
//! complete a transfer from another thread, and a timerfd armed for the
//! controller's next deadline (interrupt moderation). No busy polling.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

/// What woke the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// A device completed something (the waker fired).
    Completion,
    /// The controller's deadline passed.
    Deadline,
    /// A transport descriptor added with this token is ready.
    Fd(u64),
}

const TOKEN_WAKER: u64 = u64::MAX;
const TOKEN_TIMER: u64 = u64::MAX - 1;

/// epoll + completion eventfd + deadline timerfd.
#[derive(Debug)]
pub struct EventLoop {
    epoll: Epoll,
    waker: EventFd,
    timer: TimerFd,
    armed_for: Option<Instant>,
    events: Vec<EpollEvent>,
}

impl EventLoop {
    /// A loop with only the waker and the timer registered.
    pub fn new() -> io::Result<Self> {
        let waker = EventFd::new(EFD_NONBLOCK)?;
        let timer = TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        let epoll = Epoll::new()?;
        let l = Self {
            epoll,
            waker,
            timer,
            armed_for: None,
            events: vec![EpollEvent::default(); 16],
        };
        l.add_token(l.waker.as_raw_fd(), TOKEN_WAKER)?;
        l.add_token(l.timer.as_raw_fd(), TOKEN_TIMER)?;
        Ok(l)
    }

    /// A callback for devices: wakes the loop with [`Wake::Completion`].
    pub fn waker(&self) -> io::Result<Box<dyn Fn() + Send + Sync>> {
        let w = self.waker.try_clone()?;
        Ok(Box::new(move || {
            let _ = w.write(1);
        }))
    }

    fn add_token(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, token),
        )
    }

    /// Watches `fd` for input or hang-up, reported as [`Wake::Fd`]`(token)`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        debug_assert!(token < TOKEN_TIMER, "token reserved");
        self.add_token(fd, token)
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }

    /// Arms the timer for `deadline` (if it changed) and waits up to
    /// `timeout` for anything. An interrupted wait returns no events.
    pub fn wait(&mut self, deadline: Option<Instant>, timeout: Duration) -> io::Result<Vec<Wake>> {
        self.arm(deadline);
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        let n = match self.epoll.wait(ms, &mut self.events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::with_capacity(n);
        for e in self.events.iter().take(n) {
            out.push(match e.data() {
                TOKEN_WAKER => {
                    let _ = self.waker.read();
                    Wake::Completion
                }
                TOKEN_TIMER => {
                    let _ = self.timer.wait();
                    self.armed_for = None;
                    Wake::Deadline
                }
                t => Wake::Fd(t),
            });
        }
        Ok(out)
    }

    fn arm(&mut self, deadline: Option<Instant>) {
        if deadline == self.armed_for {
            return;
        }
        let r = match deadline {
            Some(t) => {
                let d = t.saturating_duration_since(Instant::now());
                // A zero duration would disarm a timerfd.
                self.timer.reset(d.max(Duration::from_nanos(1)), None)
            }
            None => self.timer.clear(),
        };
        if let Err(e) = r {
            hcd_emul::guest_warn!("event loop: timer: {e}");
        }
        self.armed_for = deadline;
    }
}
