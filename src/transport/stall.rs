//! Stall and reply timeouts: `SO_SNDTIMEO` for sends, poll(2)-bounded
//! receives where silence is a stall, and the deadline for a reply that is
//! due (see the module doc of `transport`).

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use nix::sys::time::TimeVal;

use crate::error::{Errno, Result};

use super::Conn;

/// Sets `SO_SNDTIMEO` of a socket; `None` (or zero) means no timeout. A
/// non-zero timeout is rounded up to a whole microsecond: a zero `timeval`
/// would mean none at all.
pub(super) fn set_send_timeout(fd: &OwnedFd, t: Option<Duration>) -> Result<()> {
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
    let tv = TimeVal::new(secs.try_into().unwrap_or(libc::time_t::MAX), micros.into());
    Ok(setsockopt(fd, sockopt::SendTimeout, &tv)?)
}

/// A socket timeout (`SO_SNDTIMEO` or `SO_RCVTIMEO`) as a `Duration`.
fn duration_of(tv: TimeVal) -> Duration {
    Duration::new(
        tv.tv_sec().max(0) as u64,
        (tv.tv_usec().max(0) as u32).saturating_mul(1000),
    )
}

/// The `SO_RCVTIMEO` a caller set on a socket, if any.
pub(super) fn receive_timeout_of(fd: &OwnedFd) -> Option<Duration> {
    getsockopt(fd, sockopt::ReceiveTimeout)
        .ok()
        .map(duration_of)
        .filter(|t| !t.is_zero())
}

/// `SO_SNDTIMEO` and `SO_RCVTIMEO` of a socket, for tests.
#[cfg(test)]
pub(crate) fn socket_timeouts(fd: &impl AsFd) -> [Duration; 2] {
    let snd = getsockopt(fd, sockopt::SendTimeout).expect("getsockopt of SO_SNDTIMEO");
    let rcv = getsockopt(fd, sockopt::ReceiveTimeout).expect("getsockopt of SO_RCVTIMEO");
    [duration_of(snd), duration_of(rcv)]
}

/// Waits up to `ms` milliseconds for `fd` to be readable (or hung up):
/// `Ok(true)` when it is, `Ok(false)` when the time passed, `EINTR` as an
/// error for the caller to retry.
fn poll_readable(fd: &OwnedFd, ms: i32) -> Result<bool> {
    let mut pfd = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    let timeout = PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX);
    Ok(poll(&mut pfd, timeout)? > 0)
}

impl Conn {
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
    pub(super) fn bounded(&self, idle: bool) -> bool {
        self.recv_timeout.get().is_some() && !(idle && self.talked.get())
    }

    /// Waits until the socket is readable, for the stall timeout (or a
    /// shorter `SO_RCVTIMEO` a caller set on the fd). `EAGAIN` when it
    /// passes, as a socket timeout would report it.
    pub(super) fn wait_bounded(&self) -> Result<()> {
        let Some(mut t) = self.recv_timeout.get() else {
            return Ok(());
        };
        if let Some(own) = receive_timeout_of(&self.fd) {
            t = t.min(own);
        }
        // Rounded up to whole milliseconds: never shorter than asked.
        let ms = i32::try_from(t.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
        loop {
            match poll_readable(&self.fd, ms) {
                Ok(true) => return Ok(()),
                Ok(false) => return Err(Errno::EAGAIN),
                Err(e) if e.0 == libc::EINTR => {}
                Err(e) => return Err(e),
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
            match poll_readable(&self.fd, ms) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) if e.0 == libc::EINTR => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// What a failed receive means: `None` to retry (`EINTR`, or a timeout
    /// while an accepted connection waits, blocking, for a message to begin
    /// from a peer that has talked before), else the error to report
    /// (`ECONNRESET` for any other timeout of an accepted connection: the
    /// client stalled in the middle of a message, or never began).
    pub(super) fn recv_timed_out(&self, e: Errno, nonblocking: bool, idle: bool) -> Option<Errno> {
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

    /// What a failed send means: `None` to retry (`EINTR`), else the error
    /// to report.
    pub(super) fn send_failed(&self, e: Errno) -> Option<Errno> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Header;
    use crate::transport::socketpair;
    use crate::transport::tests::*;
    use std::os::fd::OwnedFd;
    use std::time::Duration;

    fn timeout_pair(t: Duration) -> (Conn, Conn) {
        let (a, b) = socketpair().unwrap();
        let server = Conn::with_stall_timeout(a, Some(t)).unwrap();
        (server, Conn::from_fd(b))
    }

    /// Sets `SO_RCVTIMEO` as a caller of ours might.
    fn set_receive_timeout(fd: &OwnedFd, t: Duration) {
        let tv = TimeVal::new(t.as_secs() as libc::time_t, t.subsec_micros().into());
        setsockopt(fd, sockopt::ReceiveTimeout, &tv).unwrap();
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
            assert_eq!(socket_timeouts(&a), [want, Duration::ZERO], "{t:?}");
        }
        // Under a microsecond is not "no timeout" (a zero timeval).
        for ns in [1, 999, 1500] {
            set_send_timeout(&a, Some(Duration::from_nanos(ns))).unwrap();
            let got = socket_timeouts(&a)[0];
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
        assert_eq!(socket_timeouts(&c), [ms(40), Duration::ZERO]);
        assert_eq!(c.stall_timeout(), Some(ms(40)));
        c.set_stall_timeout(Some(ms(80))).unwrap();
        assert_eq!(socket_timeouts(&c), [ms(80), Duration::ZERO]);
        assert_eq!(c.stall_timeout(), Some(ms(80)));
        c.set_stall_timeout(None).unwrap();
        assert_eq!(socket_timeouts(&c), [Duration::ZERO; 2]);
        assert_eq!(c.stall_timeout(), None);
    }
}
