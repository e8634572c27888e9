//! UNIX-socket transport: the listening socket, an accepted connection, and
//! message framing with fd passing (SCM_RIGHTS).
//!
//! Receiving is split in two steps, header then body, so that the caller can
//! validate the header before committing to read (and allocate for) a body.
//! Every read loops until it has the whole requested length: a message that
//! arrives in pieces is still received whole. A connection read by a single
//! blocking loop may turn on read-ahead ([`Conn::set_read_ahead`]), so that a
//! small request costs one system call instead of two.
//!
//! A client cannot wedge the server: an accepted connection (and the
//! server's end of a twin socket) gives up on a client that stops reading
//! what it is sent, stops sending in the middle of a message, or connects
//! and never starts its first message, for [`CLIENT_STALL_TIMEOUT`] (or what
//! [`Context::set_client_timeout`](crate::Context::set_client_timeout)
//! sets); that client is then treated as gone (`ECONNRESET`, with
//! [`Conn::stalled`] set). Waiting for the next request is not a stall: a
//! client that has talked may stay idle as long as it likes. Waiting for the
//! *reply* to a request of the server's (DMA_READ, DMA_WRITE) is different:
//! the reply is due, so the server waits for it with a deadline
//! ([`Conn::wait_readable`]) and gives up with `ETIMEDOUT`.
//!
//! The stall timeout bounds each wait, not a whole message: a client that
//! trickles one byte per timeout keeps a message coming. Sends are bounded
//! with `SO_SNDTIMEO`. Receives are bounded with poll(2), and only when a
//! receive would block where silence is a stall (in the middle of a
//! message, or before the first one): a socket receive timeout would arm a
//! kernel timer on every wait for the next request, which measured 2-3% of
//! a small request's round trip. The reply deadline is a
//! total one for the wait, checked before each message the wait reads (a
//! message that has begun is bound by the stall timeout only).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Errno, Result};
use crate::protocol::{Header, HEADER_SIZE, SERVER_MAX_MSG_SIZE};

/// Most fds we are prepared to receive with one message; more are refused as
/// a truncated control message (and the ones that did arrive are closed).
pub const MAX_RECV_FDS: usize = 1024;

/// How long an accepted connection (or the server's end of a twin socket)
/// waits for a client that does not read what it is sent (a reply, a DMA
/// request), that stopped sending in the middle of a message, or that
/// connected and does not begin its first message (the version
/// negotiation, which even a non-blocking context's attach waits for),
/// before it gives up on the client (`ECONNRESET`, which the context
/// handles as a disconnect). It is also how long the context waits for the
/// client's reply to a DMA_READ/DMA_WRITE of its own (`ETIMEDOUT` to the
/// device, and the client is dropped). Upstream has no such bound, so a
/// client that floods requests without reading the replies, or never
/// answers a DMA request, blocks the server forever.
///
/// This is the default;
/// [`Context::set_client_timeout`](crate::Context::set_client_timeout)
/// changes it per context. Sends are bounded with `SO_SNDTIMEO`, which a
/// caller may also change on the connection's fd (`vfu_get_poll_fd`);
/// receives with poll(2), for the shorter of this timeout and an
/// `SO_RCVTIMEO` a caller set on the fd. The DMA reply deadline always
/// follows the context's setting.
pub const CLIENT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Sets `SO_SNDTIMEO` of a socket; `None` (or zero) means no timeout. A
/// non-zero timeout is rounded up to a whole microsecond: a zero `timeval`
/// would mean none at all.
fn set_send_timeout(fd: &OwnedFd, t: Option<Duration>) -> Result<()> {
    let t = match t {
        Some(t) if !t.is_zero() => t.max(Duration::from_micros(1)),
        _ => Duration::ZERO,
    };
    let micros = t.subsec_nanos().div_ceil(1000);
    let (secs, micros) = if micros == 1_000_000 {
        (t.as_secs().saturating_add(1), 0)
    } else {
        (t.as_secs(), micros)
    };
    let tv = libc::timeval {
        tv_sec: secs.try_into().unwrap_or(libc::time_t::MAX),
        tv_usec: micros.into(),
    };
    // SAFETY: tv is a valid timeval and the length matches it.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// A socket timeout option (`SO_SNDTIMEO`, `SO_RCVTIMEO`) of `fd`; `None`
/// when it cannot be read.
fn socket_timeout(fd: RawFd, opt: libc::c_int) -> Option<Duration> {
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: tv and len are valid out pointers of the stated size.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            &mut tv as *mut libc::timeval as *mut libc::c_void,
            &mut len,
        )
    };
    (r == 0).then(|| {
        Duration::new(
            tv.tv_sec.max(0) as u64,
            (tv.tv_usec.max(0) as u32).saturating_mul(1000),
        )
    })
}

/// The `SO_RCVTIMEO` a caller set on a socket, if any.
fn receive_timeout_of(fd: &OwnedFd) -> Option<Duration> {
    socket_timeout(fd.as_raw_fd(), libc::SO_RCVTIMEO).filter(|t| !t.is_zero())
}

/// `SO_SNDTIMEO` and `SO_RCVTIMEO` of a socket, for tests.
#[cfg(test)]
pub(crate) fn socket_timeouts(fd: RawFd) -> [Duration; 2] {
    [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO]
        .map(|opt| socket_timeout(fd, opt).expect("getsockopt of a socket timeout"))
}

/// A listening UNIX socket bound to a path; the path is removed on drop.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
}

fn cvt(ret: libc::c_int) -> Result<libc::c_int> {
    if ret < 0 {
        Err(Errno::last())
    } else {
        Ok(ret)
    }
}

impl Listener {
    /// Creates, binds and listens on `path`. With `nonblocking`, `accept`
    /// returns `EAGAIN` instead of waiting for a client.
    pub fn bind(path: &Path, nonblocking: bool) -> Result<Listener> {
        let bytes = path.as_os_str().as_bytes();
        // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        if bytes.len() >= addr.sun_path.len() {
            return Err(Errno(libc::ENAMETOOLONG));
        }
        if bytes.contains(&0) {
            return Err(Errno::EINVAL);
        }
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let mut ty = libc::SOCK_STREAM | libc::SOCK_CLOEXEC;
        if nonblocking {
            ty |= libc::SOCK_NONBLOCK;
        }
        // SAFETY: plain socket(2) call.
        let raw = cvt(unsafe { libc::socket(libc::AF_UNIX, ty, 0) })?;
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: addr is a valid sockaddr_un and the length matches it.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        })?;
        // SAFETY: plain listen(2) on our socket.
        if let Err(e) = cvt(unsafe { libc::listen(fd.as_raw_fd(), 0) }) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(Listener {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Accepts one client (`EAGAIN` when non-blocking and none is waiting),
    /// with the stall rules and [`CLIENT_STALL_TIMEOUT`].
    pub fn accept(&self) -> Result<Conn> {
        self.accept_with_timeout(Some(CLIENT_STALL_TIMEOUT))
    }

    /// [`Listener::accept`] with another stall timeout (`None`: the
    /// connection never gives up on the client, as upstream's does not).
    pub fn accept_with_timeout(&self, timeout: Option<Duration>) -> Result<Conn> {
        loop {
            // SAFETY: accept4 with null address pointers is allowed.
            let r = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if r >= 0 {
                // SAFETY: a fresh fd from accept4 that we now own.
                let fd = unsafe { OwnedFd::from_raw_fd(r) };
                return Conn::with_stall_timeout(fd, timeout);
            }
            let e = Errno::last();
            if e.0 != libc::EINTR {
                return Err(e);
            }
        }
    }

    /// The listening fd, for poll().
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Ok(c) = CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: c is a valid NUL-terminated path.
            unsafe { libc::unlink(c.as_ptr()) };
        }
    }
}

/// A received header with its fds.
#[derive(Debug)]
pub struct Received {
    /// The message header.
    pub hdr: Header,
    /// The fds that came with it, now owned.
    pub fds: Vec<OwnedFd>,
    /// The control data was truncated or malformed.
    pub fds_bad: bool,
}

/// A connected stream socket speaking vfio-user.
#[derive(Debug)]
pub struct Conn {
    fd: OwnedFd,
    /// Control-message buffer for receiving fds, allocated on first use and
    /// kept, so that receiving costs no allocation.
    cmsg: std::cell::RefCell<Vec<u64>>,
    /// Bytes received ahead of the message being read, when enabled.
    ahead: std::cell::RefCell<ReadAhead>,
    /// A socket timeout in the middle of a message (or of a send) means the
    /// peer stalled and is given up on (`ECONNRESET`), while one before a
    /// message has begun means only that the peer is idle, so the wait goes
    /// on. Set for accepted connections; other users of `Conn` (the client)
    /// see their own timeouts as `EAGAIN`.
    stall_resets: bool,
    /// A whole header has been received: from then on the peer may idle.
    talked: std::cell::Cell<bool>,
    /// A stall was reported as `ECONNRESET` (see [`Conn::stalled`]).
    stalled: std::cell::Cell<bool>,
    /// How long a receive waits where silence is a stall (see
    /// [`Conn::with_stall_timeout`]); `None`: unbounded.
    recv_timeout: std::cell::Cell<Option<Duration>>,
}

/// How many bytes a header read may take ahead of the header.
const READ_AHEAD: usize = 4096;

/// The read-ahead state of a connection.
///
/// With read-ahead on, a header read asks the kernel for up to
/// [`READ_AHEAD`] bytes, so that a small request arrives whole in one system
/// call; the bytes past the header are served to the reads that follow.
///
/// fds travel with the first byte of the message they were sent with, and a
/// `recvmsg` that returns fds stops right after the data they came with
/// (the kernel never carries on past an fd-carrying segment). So the fds of
/// one call belong to the last message that starts in the bytes that call
/// returned; they are kept, tagged with that message's stream offset, until
/// its header is read.
#[derive(Debug, Default)]
struct ReadAhead {
    on: bool,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Stream offset of `buf[start]`.
    pos: u64,
    /// fds received early: (stream offset of their message, the fds, whether
    /// the control data was truncated or malformed).
    fds: std::collections::VecDeque<(u64, Vec<OwnedFd>, bool)>,
}

/// Offset in `b`, which starts at a message boundary, of the last message
/// that starts in it.
///
/// Messages are delimited as the request loop reads them: a header whose
/// size is impossible (below the header's, or above the largest message) is
/// answered on its own and the next message starts right after it. (Ending
/// the walk there instead would hand the fds of the next message to the
/// bogus one, where a connection without read-ahead gives them to the
/// message they were sent with.)
fn last_message_start(b: &[u8]) -> usize {
    let mut at = 0usize;
    loop {
        let Some(h) = b.get(at..at + HEADER_SIZE) else {
            return at;
        };
        let mut size = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        if !(HEADER_SIZE..=SERVER_MAX_MSG_SIZE).contains(&size) {
            size = HEADER_SIZE;
        }
        match at.checked_add(size) {
            Some(next) if next < b.len() => at = next,
            _ => return at,
        }
    }
}

/// Space for a control message carrying up to [`MAX_RECV_FDS`] fds.
const CMSG_BUF_LEN: usize = 64 + MAX_RECV_FDS * std::mem::size_of::<RawFd>();

/// Takes ownership of every fd in the SCM_RIGHTS messages of `msg`.
///
/// # Safety
/// `msg` must describe a control buffer just filled in by recvmsg(2).
unsafe fn take_fds(msg: &libc::msghdr, out: &mut Vec<OwnedFd>) -> Result<()> {
    let mut bad = false;
    // SAFETY: the caller guarantees msg came from a successful recvmsg.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: cmsg is non-null and within the control buffer.
        let c = unsafe { &*cmsg };
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: computing the data offset of a valid cmsg.
            let data = unsafe { libc::CMSG_DATA(cmsg) } as *const RawFd;
            let hdr_len = unsafe { libc::CMSG_LEN(0) } as usize;
            let len = (c.cmsg_len as usize).saturating_sub(hdr_len);
            if len % std::mem::size_of::<RawFd>() != 0 {
                bad = true;
            }
            for i in 0..len / std::mem::size_of::<RawFd>() {
                // SAFETY: the kernel wrote `len` bytes of fds after the header;
                // each one is a new descriptor owned by this process.
                let fd = unsafe { std::ptr::read_unaligned(data.add(i)) };
                if fd >= 0 {
                    // SAFETY: as above, the descriptor is ours to own.
                    out.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        // SAFETY: advancing within the buffer described by msg.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    if bad {
        Err(Errno::EINVAL)
    } else {
        Ok(())
    }
}

impl Conn {
    /// Wraps an already connected socket.
    pub fn from_fd(fd: OwnedFd) -> Conn {
        Conn {
            fd,
            cmsg: std::cell::RefCell::new(Vec::new()),
            ahead: std::cell::RefCell::new(ReadAhead::default()),
            stall_resets: false,
            talked: std::cell::Cell::new(false),
            stalled: std::cell::Cell::new(false),
            recv_timeout: std::cell::Cell::new(None),
        }
    }

    /// Wraps a socket connected to a client, with the stall rules: a wait
    /// of `timeout` (`None`: unbounded) in the middle of a message, in a
    /// send, or before the peer's first message is reported as
    /// `ECONNRESET` (and [`Conn::stalled`]).
    pub fn with_stall_timeout(fd: OwnedFd, timeout: Option<Duration>) -> Result<Conn> {
        let conn = Conn::from_fd(fd);
        conn.set_stall_timeout(timeout)?;
        Ok(Conn {
            stall_resets: true,
            ..conn
        })
    }

    /// Changes the stall timeout of a connection made with
    /// [`Conn::with_stall_timeout`] (`None`: unbounded).
    pub fn set_stall_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        set_send_timeout(&self.fd, timeout)?;
        self.recv_timeout.set(timeout.filter(|t| !t.is_zero()));
        Ok(())
    }

    /// The stall timeout receives wait for (see [`Conn::with_stall_timeout`]).
    pub fn stall_timeout(&self) -> Option<Duration> {
        self.recv_timeout.get()
    }

    /// Whether a receive that finds no data must be bounded: a stall timeout
    /// is set, and no byte of the message being read has arrived (`idle`)
    /// only counts as idleness once the peer has talked.
    fn bounded(&self, idle: bool) -> bool {
        self.recv_timeout.get().is_some() && !(idle && self.talked.get())
    }

    /// Waits until the socket is readable, for the stall timeout (or a
    /// shorter `SO_RCVTIMEO` a caller set on the fd). `EAGAIN` when it
    /// passes, as a socket timeout would report it.
    fn wait_bounded(&self) -> Result<()> {
        let Some(mut t) = self.recv_timeout.get() else {
            return Ok(());
        };
        if let Some(own) = receive_timeout_of(&self.fd) {
            t = t.min(own);
        }
        // Rounded up to whole milliseconds: never shorter than asked.
        let ms = i32::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: pfd is one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return Ok(());
            }
            if r == 0 {
                return Err(Errno::EAGAIN);
            }
            let e = Errno::last();
            if e.0 != libc::EINTR {
                return Err(e);
            }
        }
    }

    /// Whether an error this connection reported as `ECONNRESET` was a
    /// stall (the peer neither read nor wrote for the socket timeout) rather
    /// than the peer closing the connection.
    pub fn stalled(&self) -> bool {
        self.stalled.get()
    }

    /// Waits until a message can be read, at most until `deadline`
    /// (`ETIMEDOUT` then): for a reply that is due, where silence is not
    /// idleness. Returns at once when bytes read ahead are waiting, or when
    /// the peer hung up (the read that follows reports it).
    pub fn wait_readable(&self, deadline: std::time::Instant) -> Result<()> {
        {
            let ra = self.ahead.borrow();
            if ra.end > ra.start {
                return Ok(());
            }
        }
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Errno(libc::ETIMEDOUT));
            }
            // Rounded up, so that the wait never ends before the deadline.
            let ms = i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: pfd is one valid pollfd for the duration of the call.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r > 0 {
                return Ok(());
            }
            if r < 0 {
                let e = Errno::last();
                if e.0 != libc::EINTR {
                    return Err(e);
                }
            }
        }
    }

    /// Lets header reads take up to 4 KiB ahead, so that a small message
    /// is received with one system call. Only for a connection that one
    /// blocking loop reads: bytes held here are invisible to poll(2) on the
    /// socket, so a caller that polls before each read could wait forever
    /// for a message already received.
    pub fn set_read_ahead(&self, on: bool) {
        self.ahead.borrow_mut().on = on;
    }

    /// One `recvmsg` into `buf`; returns the byte count, the fds that came
    /// with the bytes and whether the control data was truncated/malformed.
    /// `idle`: no byte of the message being read has arrived yet.
    fn recvmsg_once(
        &self,
        buf: &mut [u8],
        nonblocking: bool,
        idle: bool,
    ) -> Result<(usize, Vec<OwnedFd>, bool)> {
        let mut cbuf = self.cmsg.borrow_mut();
        if cbuf.len() < CMSG_BUF_LEN / 8 {
            cbuf.resize(CMSG_BUF_LEN / 8, 0);
        }
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain old data; zero is a valid starting value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = CMSG_BUF_LEN as _;
        // A bounded receive does not block in the kernel: when nothing is
        // there it waits with poll(2) instead (see the module doc).
        let bounded = !nonblocking && self.bounded(idle);
        let mut flags = libc::MSG_CMSG_CLOEXEC;
        if nonblocking || bounded {
            flags |= libc::MSG_DONTWAIT;
        }
        let n = loop {
            // A retry starts from the whole control buffer again.
            msg.msg_controllen = CMSG_BUF_LEN as _;
            msg.msg_flags = 0;
            // SAFETY: msg points at live buffers of the stated sizes.
            let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, flags) };
            if n >= 0 {
                break n as usize;
            }
            let mut e = Errno::last();
            if bounded && e.0 == libc::EAGAIN {
                match self.wait_bounded() {
                    Ok(()) => continue,
                    Err(w) => e = w,
                }
            }
            match self.recv_timed_out(e, nonblocking, idle) {
                Some(e) => return Err(e),
                None => continue,
            }
        };
        let mut fds = Vec::new();
        // SAFETY: msg was just filled in by recvmsg.
        let fd_res = unsafe { take_fds(&msg, &mut fds) };
        let bad = msg.msg_flags & libc::MSG_CTRUNC != 0 || fd_res.is_err();
        Ok((n, fds, bad))
    }

    /// [`Conn::recv_header`] with read-ahead on.
    fn recv_header_ahead(&self, nonblocking: bool) -> Result<Received> {
        let mut guard = self.ahead.borrow_mut();
        let ra = &mut *guard;
        if ra.buf.len() < READ_AHEAD {
            ra.buf.resize(READ_AHEAD, 0);
        }
        while ra.end - ra.start < HEADER_SIZE {
            // Keep the partial header at the front, then fill the rest.
            ra.buf.copy_within(ra.start..ra.end, 0);
            ra.end -= ra.start;
            ra.start = 0;
            let had = ra.end;
            // Only a read that has nothing yet may return EAGAIN: once a
            // header has begun, the rest of it is waited for.
            let (n, fds, bad) =
                self.recvmsg_once(&mut ra.buf[had..], nonblocking && had == 0, had == 0)?;
            if n == 0 {
                return Err(Errno(if had == 0 {
                    libc::ENOMSG
                } else {
                    libc::ECONNRESET
                }));
            }
            ra.end += n;
            if !fds.is_empty() || bad {
                let at = last_message_start(&ra.buf[..ra.end]) as u64;
                ra.fds.push_back((ra.pos + at, fds, bad));
            }
        }
        self.talked.set(true);
        let mut h = [0u8; HEADER_SIZE];
        h.copy_from_slice(&ra.buf[ra.start..ra.start + HEADER_SIZE]);
        let at = ra.pos;
        ra.start += HEADER_SIZE;
        ra.pos += HEADER_SIZE as u64;
        let mut fds = Vec::new();
        let mut fds_bad = false;
        while ra.fds.front().is_some_and(|(p, _, _)| *p <= at) {
            if let Some((p, f, b)) = ra.fds.pop_front() {
                // fds tagged with an earlier offset belonged to no header
                // we read (a stream with a bogus size): they are closed.
                if p == at {
                    fds = f;
                    fds_bad = b;
                }
            }
        }
        Ok(Received {
            hdr: Header::decode(&h),
            fds,
            fds_bad,
        })
    }

    /// The socket fd, for poll().
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// What a failed receive means: `None` to retry (`EINTR`, or a timeout
    /// while an accepted connection waits, blocking, for a message to begin
    /// from a peer that has talked before), else the error to report
    /// (`ECONNRESET` for any other timeout of an accepted connection: the
    /// client stalled in the middle of a message, or never began).
    fn recv_timed_out(&self, e: Errno, nonblocking: bool, idle: bool) -> Option<Errno> {
        match e.0 {
            libc::EINTR => None,
            libc::EAGAIN if self.stall_resets && !nonblocking => {
                if idle && self.talked.get() {
                    None
                } else {
                    self.stalled.set(true);
                    Some(Errno(libc::ECONNRESET))
                }
            }
            _ => Some(e),
        }
    }

    /// Receives one message header and the fds sent with it.
    ///
    /// With `nonblocking`, returns `EAGAIN` when no byte is waiting; once the
    /// first byte has arrived the rest of the header is waited for. Errors:
    /// `ENOMSG` when the peer closed the connection cleanly, `ECONNRESET` when
    /// it closed in the middle of a header. Control data that was truncated
    /// (more fds than we take) or malformed is reported in
    /// [`Received::fds_bad`] with whatever fds did arrive, so that the caller
    /// can still read the body and answer with an error.
    pub fn recv_header(&self, nonblocking: bool) -> Result<Received> {
        if self.ahead.borrow().on {
            return self.recv_header_ahead(nonblocking);
        }
        let mut buf = [0u8; HEADER_SIZE];
        let (n, fds, fds_bad) = self.recvmsg_once(&mut buf, nonblocking, true)?;
        if n == 0 {
            return Err(Errno(libc::ENOMSG));
        }
        if n < HEADER_SIZE {
            self.recv_exact(&mut buf[n..]).map_err(|e| {
                if e.0 == libc::ENOMSG {
                    Errno(libc::ECONNRESET)
                } else {
                    e
                }
            })?;
        }
        self.talked.set(true);
        Ok(Received {
            hdr: Header::decode(&buf),
            fds,
            fds_bad,
        })
    }

    /// Fills `buf` completely, waiting as needed. `ENOMSG` if the peer closed
    /// before anything arrived, `ECONNRESET` if it closed part way.
    pub fn recv_exact(&self, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        {
            // Bytes read ahead come first; the rest is read directly (never
            // past the end of `buf`).
            let mut ra = self.ahead.borrow_mut();
            let n = buf.len().min(ra.end - ra.start);
            if n > 0 {
                buf[..n].copy_from_slice(&ra.buf[ra.start..ra.start + n]);
                ra.start += n;
                done = n;
            }
            ra.pos += buf.len() as u64;
        }
        // Whatever is read here is part of a message already begun.
        let bounded = self.bounded(false);
        let flags = if bounded {
            libc::MSG_DONTWAIT
        } else {
            libc::MSG_WAITALL
        };
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: rest is a valid writable buffer of rest.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    rest.as_mut_ptr() as *mut libc::c_void,
                    rest.len(),
                    flags,
                )
            };
            if n < 0 {
                let mut e = Errno::last();
                if bounded && e.0 == libc::EAGAIN {
                    match self.wait_bounded() {
                        Ok(()) => continue,
                        Err(w) => e = w,
                    }
                }
                // Whatever is read here is part of a message already begun.
                match self.recv_timed_out(e, false, false) {
                    Some(e) => return Err(e),
                    None => continue,
                }
            }
            if n == 0 {
                return Err(Errno(if done == 0 {
                    libc::ENOMSG
                } else {
                    libc::ECONNRESET
                }));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Sends a header followed by `parts`, passing `fds` with the first byte.
    /// A peer that went away is reported as `ECONNRESET`. Uses one
    /// `sendmsg` in the common case and allocates nothing for up to
    /// [`INLINE_FDS`] fds.
    pub fn send(&self, hdr: &Header, parts: &[&[u8]], fds: &[RawFd]) -> Result<()> {
        const MAX_PARTS: usize = 7;
        if parts.len() > MAX_PARTS {
            return Err(Errno::EINVAL);
        }
        let h = hdr.encode();
        let mut all: [&[u8]; MAX_PARTS + 1] = [&[]; MAX_PARTS + 1];
        all[0] = &h;
        all[1..=parts.len()].copy_from_slice(parts);
        let all = &all[..=parts.len()];
        let total: usize = all.iter().map(|p| p.len()).sum();
        if fds.is_empty() && total <= SMALL_SEND {
            // A small message without fds (most replies) is gathered on the
            // stack and sent with send(2), which costs the kernel less than
            // sendmsg's msghdr and iovec import (measured: about 2% of a
            // 4-byte region access round trip).
            let mut flat = [0u8; SMALL_SEND];
            let mut at = 0;
            for p in all {
                flat[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            return self.send_flat(&flat[..total]);
        }
        let data_len = std::mem::size_of_val(fds);
        let mut inline = [0u64; 2 + INLINE_FDS / 2];
        let mut heap = Vec::new();
        let cbuf: &mut [u64] = if fds.len() <= INLINE_FDS {
            &mut inline
        } else {
            heap.resize((64 + data_len).div_ceil(8), 0u64);
            &mut heap
        };
        let mut sent = 0usize;
        while sent < total {
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; MAX_PARTS + 1];
            let mut n_iov = 0;
            let mut skip = sent;
            for p in all {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                iov[n_iov] = libc::iovec {
                    iov_base: p[skip..].as_ptr() as *mut libc::c_void,
                    iov_len: p.len() - skip,
                };
                n_iov += 1;
                skip = 0;
            }
            // SAFETY: msghdr is plain old data; zero is a valid starting value.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n_iov as _;
            if sent == 0 && !fds.is_empty() {
                // SAFETY: CMSG_SPACE is a pure computation.
                let space = unsafe { libc::CMSG_SPACE(data_len as u32) } as usize;
                msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
                msg.msg_controllen = space as _;
                // SAFETY: cbuf holds at least `space` bytes (16 bytes of cmsg
                // header plus the fds, rounded up), so the header and data
                // written below stay inside it.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&msg);
                    (*c).cmsg_level = libc::SOL_SOCKET;
                    (*c).cmsg_type = libc::SCM_RIGHTS;
                    (*c).cmsg_len = libc::CMSG_LEN(data_len as u32) as _;
                    std::ptr::copy_nonoverlapping(
                        fds.as_ptr() as *const u8,
                        libc::CMSG_DATA(c),
                        data_len,
                    );
                }
            }
            // SAFETY: msg describes live buffers.
            let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                match self.send_failed(Errno::last()) {
                    Some(e) => return Err(e),
                    None => continue,
                }
            }
            sent += n as usize;
        }
        Ok(())
    }

    /// Sends all of `buf` with send(2) (no fds).
    fn send_flat(&self, buf: &[u8]) -> Result<()> {
        let mut sent = 0;
        while sent < buf.len() {
            let rest = &buf[sent..];
            // SAFETY: rest is a live buffer of rest.len() bytes.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    rest.as_ptr() as *const libc::c_void,
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                match self.send_failed(Errno::last()) {
                    Some(e) => return Err(e),
                    None => continue,
                }
            }
            sent += n as usize;
        }
        Ok(())
    }

    /// What a failed send means: `None` to retry (`EINTR`), else the error
    /// to report.
    fn send_failed(&self, e: Errno) -> Option<Errno> {
        match e.0 {
            libc::EINTR => None,
            libc::EPIPE => Some(Errno(libc::ECONNRESET)),
            // The peer did not read for CLIENT_STALL_TIMEOUT; part of the
            // message may be sent, so the stream is lost.
            libc::EAGAIN if self.stall_resets => {
                self.stalled.set(true);
                Some(Errno(libc::ECONNRESET))
            }
            _ => Some(e),
        }
    }
}

/// Messages up to this size without fds are sent from one stack buffer.
const SMALL_SEND: usize = 256;

/// Number of fds [`Conn::send`] passes without allocating.
pub const INLINE_FDS: usize = 28;

/// Creates a connected pair of stream sockets (for the twin socket and tests).
pub fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: fds has room for the two descriptors socketpair writes.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both fds are fresh and owned by us.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::cmd;

    #[test]
    fn header_and_body_survive_byte_by_byte_delivery() {
        let (a, b) = socketpair().unwrap();
        let server = Conn::from_fd(a);
        let client = Conn::from_fd(b);
        let t = std::thread::spawn(move || {
            let h = Header {
                msg_id: 3,
                cmd: cmd::REGION_WRITE,
                msg_size: 20,
                flags: 0,
                error_no: 0,
            };
            let mut all = h.encode().to_vec();
            all.extend_from_slice(&[1, 2, 3, 4]);
            for byte in all {
                client.send_raw(&[byte]);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            client
        });
        let r = server.recv_header(false).unwrap();
        assert!(r.fds.is_empty() && !r.fds_bad);
        assert_eq!(r.hdr.msg_size, 20);
        let mut body = [0u8; 4];
        server.recv_exact(&mut body).unwrap();
        assert_eq!(body, [1, 2, 3, 4]);
        drop(t.join().unwrap());
        assert_eq!(server.recv_header(false).unwrap_err(), Errno(libc::ENOMSG));
    }

    #[test]
    fn fds_are_passed_and_owned() {
        let (a, b) = socketpair().unwrap();
        let server = Conn::from_fd(a);
        let client = Conn::from_fd(b);
        let (x, _y) = socketpair().unwrap();
        let h = Header {
            msg_id: 1,
            cmd: cmd::DMA_MAP,
            msg_size: 16,
            flags: 0,
            error_no: 0,
        };
        client
            .send(&h, &[], &[x.as_raw_fd(), x.as_raw_fd()])
            .unwrap();
        let r = server.recv_header(false).unwrap();
        assert_eq!(r.hdr, h);
        assert_eq!(r.fds.len(), 2);
        assert_ne!(r.fds[0].as_raw_fd(), x.as_raw_fd());
    }

    #[test]
    fn nonblocking_header_reports_eagain() {
        let (a, _b) = socketpair().unwrap();
        let server = Conn::from_fd(a);
        assert_eq!(server.recv_header(true).unwrap_err(), Errno::EAGAIN);
    }

    #[test]
    fn send_to_closed_peer_is_econnreset() {
        let (a, b) = socketpair().unwrap();
        drop(b);
        let c = Conn::from_fd(a);
        let h = Header::default();
        assert_eq!(
            c.send(&h, &[b"x"], &[]).unwrap_err(),
            Errno(libc::ECONNRESET)
        );
    }

    fn msg(id: u16, body: &[u8]) -> (Header, Vec<u8>) {
        let h = Header {
            msg_id: id,
            cmd: cmd::REGION_WRITE,
            msg_size: (HEADER_SIZE + body.len()) as u32,
            flags: 0,
            error_no: 0,
        };
        (h, body.to_vec())
    }

    #[test]
    fn read_ahead_gives_each_pipelined_message_its_own_fds() {
        let (a, b) = socketpair().unwrap();
        let server = Conn::from_fd(a);
        server.set_read_ahead(true);
        let client = Conn::from_fd(b);
        let (x, _y) = socketpair().unwrap();
        let (h1, b1) = msg(1, &[1; 20]);
        let (h2, b2) = msg(2, &[2; 8]);
        let (h3, b3) = msg(3, &[3; 4]);
        let (h4, b4) = msg(4, &[4; 4]);
        client.send(&h1, &[&b1], &[]).unwrap();
        client
            .send(&h2, &[&b2], &[x.as_raw_fd(), x.as_raw_fd()])
            .unwrap();
        client.send(&h3, &[&b3], &[]).unwrap();
        client.send(&h4, &[&b4], &[x.as_raw_fd()]).unwrap();
        for (h, b, nfds) in [(h1, b1, 0), (h2, b2, 2), (h3, b3, 0), (h4, b4, 1)] {
            let r = server.recv_header(false).unwrap();
            assert_eq!(r.hdr, h);
            assert_eq!(r.fds.len(), nfds, "message {}", h.msg_id);
            assert!(!r.fds_bad);
            let mut body = vec![0u8; b.len()];
            server.recv_exact(&mut body).unwrap();
            assert_eq!(body, b);
        }
        drop(client);
        assert_eq!(server.recv_header(false).unwrap_err(), Errno(libc::ENOMSG));
    }

    #[test]
    fn read_ahead_handles_bodies_larger_than_its_buffer() {
        let (a, b) = socketpair().unwrap();
        let server = Conn::from_fd(a);
        server.set_read_ahead(true);
        let client = Conn::from_fd(b);
        let big: Vec<u8> = (0..3 * READ_AHEAD + 5).map(|i| i as u8).collect();
        let (h1, b1) = msg(1, &big);
        let (h2, b2) = msg(2, &[9; 4]);
        let t = std::thread::spawn(move || {
            client.send(&h1, &[&b1], &[]).unwrap();
            client.send(&h2, &[&b2], &[]).unwrap();
            client
        });
        let r = server.recv_header(false).unwrap();
        assert_eq!(r.hdr.msg_id, 1);
        let mut body = vec![0u8; big.len()];
        server.recv_exact(&mut body).unwrap();
        assert_eq!(body, big);
        let r = server.recv_header(false).unwrap();
        assert_eq!(r.hdr.msg_id, 2);
        let mut body = [0u8; 4];
        server.recv_exact(&mut body).unwrap();
        assert_eq!(body, [9; 4]);
        drop(t.join().unwrap());
    }

    #[test]
    fn read_ahead_survives_byte_by_byte_delivery_and_reports_resets() {
        let (a, b) = socketpair().unwrap();
        let server = Conn::from_fd(a);
        server.set_read_ahead(true);
        let client = Conn::from_fd(b);
        let (h1, b1) = msg(5, &[7; 6]);
        let t = std::thread::spawn(move || {
            let mut all = h1.encode().to_vec();
            all.extend_from_slice(&b1);
            // A second header, cut short.
            all.extend_from_slice(&h1.encode()[..9]);
            for byte in all {
                client.send_raw(&[byte]);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        let r = server.recv_header(false).unwrap();
        assert_eq!(r.hdr, h1);
        let mut body = [0u8; 6];
        server.recv_exact(&mut body).unwrap();
        assert_eq!(body, [7; 6]);
        t.join().unwrap();
        assert_eq!(
            server.recv_header(false).unwrap_err(),
            Errno(libc::ECONNRESET)
        );
    }

    #[test]
    fn last_message_start_walks_whole_and_partial_messages() {
        let (h1, b1) = msg(1, &[0; 4]);
        let (h2, _) = msg(2, &[0; 100]);
        let mut b = h1.encode().to_vec();
        b.extend_from_slice(&b1);
        assert_eq!(last_message_start(&b), 0);
        b.extend_from_slice(&h2.encode()[..3]);
        assert_eq!(last_message_start(&b), 20);
        b.extend_from_slice(&h2.encode()[3..]);
        b.extend_from_slice(&[0; 10]);
        assert_eq!(last_message_start(&b), 20);
        // A header with an impossible size is a message of its own, header
        // only, as the request loop reads it.
        for size in [3, (SERVER_MAX_MSG_SIZE + 1) as u32, u32::MAX] {
            let bogus = Header {
                msg_size: size,
                ..Header::default()
            };
            let mut c = bogus.encode().to_vec();
            c.extend_from_slice(&h1.encode());
            assert_eq!(last_message_start(&c), 16, "size {size}");
            c.extend_from_slice(&b1);
            c.extend_from_slice(&bogus.encode());
            assert_eq!(last_message_start(&c), 36, "size {size}");
        }
    }

    #[test]
    fn read_ahead_gives_fds_to_the_message_after_a_bogus_header() {
        // Regression: read-ahead used to stop its walk at a header with an
        // impossible size and hand the fds of the next message to it, while
        // the request loop answers such a header on its own and reads on.
        for size in [0, 15, (SERVER_MAX_MSG_SIZE + 1) as u32] {
            let (a, b) = socketpair().unwrap();
            let server = Conn::from_fd(a);
            server.set_read_ahead(true);
            let client = Conn::from_fd(b);
            let (x, _y) = socketpair().unwrap();
            let bogus = Header {
                msg_id: 1,
                msg_size: size,
                ..Header::default()
            };
            client.send_raw(&bogus.encode());
            let (h2, b2) = msg(2, &[2; 8]);
            client.send(&h2, &[&b2], &[x.as_raw_fd()]).unwrap();
            let r = server.recv_header(false).unwrap();
            assert_eq!(r.hdr, bogus);
            assert!(
                r.fds.is_empty(),
                "size {size}: fds went to the bogus header"
            );
            let r = server.recv_header(false).unwrap();
            assert_eq!(r.hdr, h2);
            assert_eq!(r.fds.len(), 1, "size {size}");
            let mut body = [0u8; 8];
            server.recv_exact(&mut body).unwrap();
            assert_eq!(body, [2; 8]);
        }
    }

    fn timeout_pair(t: Duration) -> (Conn, Conn) {
        let (a, b) = socketpair().unwrap();
        let server = Conn::with_stall_timeout(a, Some(t)).unwrap();
        (server, Conn::from_fd(b))
    }

    /// Sets `SO_RCVTIMEO` as a caller of ours might.
    fn set_receive_timeout(fd: &OwnedFd, t: Duration) {
        let tv = libc::timeval {
            tv_sec: t.as_secs() as libc::time_t,
            tv_usec: t.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: tv is a valid timeval of the stated size.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
    }

    #[test]
    fn a_callers_shorter_receive_timeout_bounds_stalls() {
        // The stall timeout is long; a caller set a short SO_RCVTIMEO on the
        // fd (as a C device may, on vfu_get_poll_fd): a stall in the middle
        // of a header is given up on after the short one.
        for ahead in [false, true] {
            let (a, b) = socketpair().unwrap();
            let server = Conn::with_stall_timeout(a, Some(Duration::from_secs(30))).unwrap();
            server.set_read_ahead(ahead);
            set_receive_timeout(&server.fd, Duration::from_millis(100));
            let client = Conn::from_fd(b);
            let (h, _) = msg(3, &[3; 4]);
            client.send_raw(&h.encode()[..5]);
            let start = std::time::Instant::now();
            assert_eq!(
                server.recv_header(false).unwrap_err(),
                Errno(libc::ECONNRESET)
            );
            let took = start.elapsed();
            assert!(
                took >= Duration::from_millis(100) && took < Duration::from_secs(10),
                "{took:?}"
            );
            assert!(server.stalled());
        }
    }

    #[test]
    fn stalled_peers_are_given_up_idle_ones_are_not() {
        let t = Duration::from_millis(100);
        for ahead in [false, true] {
            // Silent from the start: given up.
            let (server, _client) = timeout_pair(t);
            server.set_read_ahead(ahead);
            let start = std::time::Instant::now();
            assert_eq!(
                server.recv_header(false).unwrap_err(),
                Errno(libc::ECONNRESET)
            );
            assert!(start.elapsed() >= t);

            // Idle after a first message: the wait for the next one to
            // begin survives timeouts.
            let (server, client) = timeout_pair(t);
            server.set_read_ahead(ahead);
            let (h, b) = msg(6, &[6; 4]);
            client.send(&h, &[&b], &[]).unwrap();
            assert_eq!(server.recv_header(false).unwrap().hdr, h);
            let mut body = [0u8; 4];
            server.recv_exact(&mut body).unwrap();
            let sender = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(350));
                let (h, b) = msg(7, &[7; 4]);
                client.send(&h, &[&b], &[]).unwrap();
                client
            });
            let r = server.recv_header(false).unwrap();
            assert_eq!(r.hdr.msg_id, 7);
            server.recv_exact(&mut body).unwrap();
            let client = sender.join().unwrap();
            // A non-blocking read still reports EAGAIN.
            assert_eq!(server.recv_header(true).unwrap_err(), Errno::EAGAIN);

            // Stalled inside a header, then inside a body.
            let (h, b) = msg(8, &[8; 4]);
            client.send_raw(&h.encode()[..5]);
            let start = std::time::Instant::now();
            assert_eq!(
                server.recv_header(false).unwrap_err(),
                Errno(libc::ECONNRESET)
            );
            assert!(start.elapsed() >= t);
            let (server, client) = timeout_pair(t);
            server.set_read_ahead(ahead);
            client.send_raw(&h.encode());
            client.send_raw(&b[..2]);
            assert_eq!(server.recv_header(true).unwrap().hdr, h);
            let mut body = [0u8; 4];
            assert_eq!(
                server.recv_exact(&mut body).unwrap_err(),
                Errno(libc::ECONNRESET)
            );
        }
        // A client that does not read: the send gives up.
        let (server, client) = timeout_pair(t);
        let big = vec![0u8; 1 << 16];
        let h = Header::default();
        let start = std::time::Instant::now();
        let err = loop {
            if let Err(e) = server.send(&h, &[&big], &[]) {
                break e;
            }
            assert!(start.elapsed() < Duration::from_secs(20));
        };
        assert_eq!(err, Errno(libc::ECONNRESET));
        drop(client);
        // Without the stall rule (the client's connections) a timeout stays
        // EAGAIN.
        let (a, b) = socketpair().unwrap();
        set_receive_timeout(&a, t);
        let plain = Conn::from_fd(a);
        assert_eq!(plain.recv_header(false).unwrap_err(), Errno::EAGAIN);
        drop(b);
    }

    #[test]
    fn stalls_are_told_apart_from_hang_ups() {
        let t = Duration::from_millis(50);
        let (h, _) = msg(9, &[9; 4]);
        let (server, client) = timeout_pair(t);
        client.send_raw(&h.encode()[..5]);
        assert_eq!(
            server.recv_header(false).unwrap_err(),
            Errno(libc::ECONNRESET)
        );
        assert!(server.stalled());
        let (server, client) = timeout_pair(t);
        client.send_raw(&h.encode()[..5]);
        drop(client);
        assert_eq!(
            server.recv_header(false).unwrap_err(),
            Errno(libc::ECONNRESET)
        );
        assert!(!server.stalled());
    }

    #[test]
    fn wait_readable_sees_read_ahead_bytes_and_keeps_its_deadline() {
        let t = Duration::from_millis(60);
        for ahead in [false, true] {
            let (server, client) = timeout_pair(Duration::from_secs(5));
            server.set_read_ahead(ahead);
            let (h1, b1) = msg(1, &[1; 4]);
            let (h2, b2) = msg(2, &[2; 4]);
            client.send(&h1, &[&b1], &[]).unwrap();
            client.send(&h2, &[&b2], &[]).unwrap();
            let mut body = [0u8; 4];
            assert_eq!(server.recv_header(false).unwrap().hdr, h1);
            server.recv_exact(&mut body).unwrap();
            // The second message is in the socket, or already read ahead
            // (the socket is then empty): either way it is ready.
            let start = std::time::Instant::now();
            server.wait_readable(start + t).unwrap();
            assert!(start.elapsed() < t);
            assert_eq!(server.recv_header(false).unwrap().hdr, h2);
            server.recv_exact(&mut body).unwrap();
            assert_eq!(body, [2; 4]);
            // Nothing more: the deadline passes, although the socket's own
            // timeout is far longer.
            let start = std::time::Instant::now();
            assert_eq!(
                server.wait_readable(start + t).unwrap_err(),
                Errno(libc::ETIMEDOUT)
            );
            let took = start.elapsed();
            assert!(took >= t && took < Duration::from_secs(2), "{took:?}");
            // A deadline already past.
            assert_eq!(
                server.wait_readable(start).unwrap_err(),
                Errno(libc::ETIMEDOUT)
            );
            // A hang-up is ready too: the read reports it.
            drop(client);
            server
                .wait_readable(std::time::Instant::now() + Duration::from_secs(5))
                .unwrap();
            assert_eq!(server.recv_header(false).unwrap_err(), Errno(libc::ENOMSG));
        }
    }

    #[test]
    fn send_timeouts_round_up_and_none_clears_them() {
        // The kernel keeps socket timeouts in scheduler ticks (1 to 10 ms),
        // rounded up: whole multiples of 20 ms read back exactly.
        let (a, _b) = socketpair().unwrap();
        for (t, want) in [
            (Some(Duration::new(3, 999_999_001)), Duration::from_secs(4)),
            (Some(Duration::from_millis(260)), Duration::from_millis(260)),
            (None, Duration::ZERO),
            (Some(Duration::ZERO), Duration::ZERO),
        ] {
            set_send_timeout(&a, t).unwrap();
            assert_eq!(
                socket_timeouts(a.as_raw_fd()),
                [want, Duration::ZERO],
                "{t:?}"
            );
        }
        // Under a microsecond is not "no timeout" (a zero timeval).
        for ns in [1, 999, 1500] {
            set_send_timeout(&a, Some(Duration::from_nanos(ns))).unwrap();
            let got = socket_timeouts(a.as_raw_fd())[0];
            assert!(
                got > Duration::ZERO && got <= Duration::from_millis(10),
                "{ns} ns: {got:?}"
            );
        }
        // The stall timeout: SO_SNDTIMEO for sends, our own bound for
        // receives (no SO_RCVTIMEO, which would arm a timer on every wait).
        let c = Conn::with_stall_timeout(a, Some(Duration::from_millis(40))).unwrap();
        assert!(c.stall_resets);
        let ms = Duration::from_millis;
        assert_eq!(socket_timeouts(c.fd.as_raw_fd()), [ms(40), Duration::ZERO]);
        assert_eq!(c.stall_timeout(), Some(ms(40)));
        c.set_stall_timeout(Some(ms(80))).unwrap();
        assert_eq!(socket_timeouts(c.fd.as_raw_fd()), [ms(80), Duration::ZERO]);
        assert_eq!(c.stall_timeout(), Some(ms(80)));
        c.set_stall_timeout(None).unwrap();
        assert_eq!(socket_timeouts(c.fd.as_raw_fd()), [Duration::ZERO; 2]);
        assert_eq!(c.stall_timeout(), None);
    }

    #[test]
    fn accepted_connections_get_the_stall_timeout() {
        let dir = std::env::temp_dir().join(format!("vfu-transport-{}.sock", std::process::id()));
        let l = Listener::bind(&dir, false).unwrap();
        let _c = std::os::unix::net::UnixStream::connect(&dir).unwrap();
        let conn = l.accept().unwrap();
        assert!(conn.stall_resets);
        assert_eq!(
            socket_timeouts(conn.as_raw_fd()),
            [CLIENT_STALL_TIMEOUT, Duration::ZERO]
        );
        assert_eq!(conn.stall_timeout(), Some(CLIENT_STALL_TIMEOUT));
    }

    impl Conn {
        fn send_raw(&self, b: &[u8]) {
            // SAFETY: b is a valid buffer.
            let n = unsafe { libc::send(self.as_raw_fd(), b.as_ptr() as *const _, b.len(), 0) };
            assert_eq!(n as usize, b.len());
        }
    }
}
