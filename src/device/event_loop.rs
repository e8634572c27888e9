//! The event-loop helpers of a non-blocking context: attaching a client
//! if one is waiting, waiting until the socket is ready, and handling the
//! requests that can be handled without waiting.

use std::os::fd::AsFd;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::Context;
use crate::error::{Errno, Result};

impl Context {
    /// Attaches a client if one is waiting (`vfu_attach_ctx` on a
    /// non-blocking context): `Ok(true)` once attached, `Ok(false)` when no
    /// client is there yet (or a signal interrupted the wait). A blocking
    /// context waits for a client, like [`Context::attach`]. A client that
    /// fails version negotiation is dropped with an error (`EINVAL` usually);
    /// the caller may try again.
    pub fn try_attach(&self) -> Result<bool> {
        match self.attach() {
            Ok(()) => Ok(true),
            Err(e) if is_transient(e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits until there is something for the context to do, at most
    /// `timeout` (`None`: no limit): a client connecting, a request (or the
    /// client hanging up) on the connection, or requests that arrived while
    /// the device waited for a DMA reply and are held in the context (those
    /// make it return at once: polling the socket would not see them).
    ///
    /// `Ok(true)` when there is work, `Ok(false)` on timeout or when a
    /// signal interrupted the wait. `ENOTCONN` when there is nothing to poll.
    /// Use it (or poll [`Context::poll_fd`] in your own loop) before
    /// [`Context::try_attach`] and [`Context::run_ready`].
    pub fn wait_ready(&self, timeout: Option<Duration>) -> Result<bool> {
        if !self.deferred.borrow().is_empty() {
            return Ok(true);
        }
        let timeout = match timeout {
            None => PollTimeout::NONE,
            // Rounded up, so that a short timeout does not become a busy loop.
            Some(t) => i32::try_from(t.as_nanos().div_ceil(1_000_000))
                .ok()
                .and_then(|ms| PollTimeout::try_from(ms).ok())
                .unwrap_or(PollTimeout::MAX),
        };
        // The fd polled is the connection's, else the listener's (as
        // `poll_fd`), borrowed from its owner for the call. Nothing the
        // wait calls can reach the context, so the borrow cannot clash.
        let conn = self.conn.borrow();
        let listener = self.listener.borrow();
        let fd = match (conn.as_ref(), listener.as_ref()) {
            (Some(c), _) => c.as_fd(),
            (None, Some(l)) => l.as_fd(),
            (None, None) => return Err(Errno::ENOTCONN),
        };
        match poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], timeout) {
            Ok(r) => Ok(r > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Handles the requests that can be handled without waiting, at most
    /// `max` of them, on a non-blocking context (`EINVAL` on a blocking one,
    /// whose [`Context::run`] never returns while the client is there).
    /// Returns how many were handled: 0 when there was nothing to do, or
    /// when the device is still quiescing (its quiesce callback returned
    /// `EBUSY` and it has not called [`Context::device_quiesced`] yet).
    ///
    /// Errors are [`Context::run`]'s: `ENOTCONN` when the client has gone
    /// (the context is then ready for [`Context::try_attach`] again), or a
    /// failure to talk to the client.
    ///
    /// A typical loop:
    ///
    /// ```no_run
    /// # fn main() -> vfio_user::Result<()> {
    /// use std::time::Duration;
    /// let ctx = vfio_user::Context::create("/tmp/dev.sock", true)?;
    /// // ... set the device up ...
    /// ctx.realize()?;
    /// while !ctx.try_attach()? {
    ///     ctx.wait_ready(Some(Duration::from_millis(100)))?;
    /// }
    /// loop {
    ///     ctx.wait_ready(Some(Duration::from_millis(5)))?;
    ///     match ctx.run_ready(64) {
    ///         Ok(_) => {}
    ///         Err(vfio_user::Errno::ENOTCONN) => break,
    ///         Err(e) => return Err(e),
    ///     }
    ///     // ... the device's own work: timers, DMA, interrupts ...
    /// }
    /// # Ok(()) }
    /// ```
    #[doc(alias = "run_once")]
    pub fn run_ready(&self, max: usize) -> Result<usize> {
        if !self.is_nonblocking() {
            return Err(Errno::EINVAL);
        }
        let mut handled = 0usize;
        while handled < max {
            match self.run() {
                Ok(0) => break,
                Ok(n) => handled += n,
                Err(e) if e == Errno::EBUSY || is_transient(e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(handled)
    }
}

/// Errors that only mean "nothing to do now".
fn is_transient(e: Errno) -> bool {
    e.0 == libc::EAGAIN || e.0 == libc::EWOULDBLOCK || e.0 == libc::EINTR
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::tests::sock;
    use std::time::Instant;

    #[test]
    fn nonblocking_event_loop_helpers() {
        let ctx = Context::create(sock("nb"), true).unwrap();
        ctx.realize().unwrap();
        // No client: nothing to attach, polling times out.
        assert_eq!(ctx.try_attach(), Ok(false));
        let t = Instant::now();
        assert_eq!(ctx.wait_ready(Some(Duration::from_millis(30))), Ok(false));
        assert!(t.elapsed() >= Duration::from_millis(25));
        // A sub-millisecond timeout still waits (rounded up), without error.
        assert_eq!(ctx.wait_ready(Some(Duration::from_nanos(1))), Ok(false));
        // Not attached: nothing to run.
        assert_eq!(ctx.run_ready(8), Err(Errno::ENOTCONN));

        let blocking = Context::create(sock("blk"), false).unwrap();
        blocking.realize().unwrap();
        assert_eq!(blocking.run_ready(8), Err(Errno::EINVAL));
    }
}
