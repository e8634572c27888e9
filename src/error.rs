//! The error type used across the library: a POSIX errno value.
//!
//! Every failure the protocol can report travels to the client as an errno,
//! and every failure the C API reports is an errno, so the crate's error is
//! exactly that: [`Errno`], with the [`Result`] alias. Each function
//! documents the errnos it returns and what they mean there; callbacks
//! return an `Errno` that goes back to the client unchanged.
//!
//! `Errno` implements [`std::error::Error`], converts from and into
//! [`std::io::Error`], and displays as the system's message, so it works with
//! `?` in functions returning `io::Result` or `Box<dyn Error>`:
//!
//! ```
//! use vfio_user::Errno;
//!
//! fn open_device() -> std::io::Result<()> {
//!     let r: vfio_user::Result<()> = Err(Errno::ENOENT);
//!     r?; // converts into an io::Error
//!     Ok(())
//! }
//! let e = open_device().unwrap_err();
//! assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
//! assert_eq!(Errno::from(e), Errno::ENOENT);
//! ```

use std::fmt;

/// A POSIX error number (`libc::EINVAL`, `libc::ENOENT`, ...); the field is
/// the raw value. The constants below are the ones the library returns; any
/// other value may come from the system or from a client.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

/// Result alias used by the whole crate.
pub type Result<T> = std::result::Result<T, Errno>;

impl Errno {
    /// Interrupted by a signal: try again.
    pub const EINTR: Errno = Errno(libc::EINTR);
    /// Invalid argument.
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    /// No such entry (an unmapped address, an unknown region...).
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    /// Out of memory.
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    /// Operation not supported.
    pub const ENOTSUP: Errno = Errno(libc::ENOTSUP);
    /// Already exists (set up twice, say).
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    /// Bad address: memory the operation cannot reach.
    pub const EFAULT: Errno = Errno(libc::EFAULT);
    /// Permission denied (a write to read-only memory, say).
    pub const EACCES: Errno = Errno(libc::EACCES);
    /// Busy: try again later (the device is still quiescing, say).
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    /// Nothing to do now (non-blocking operations).
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    /// No space left (a limit was reached).
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    /// Not connected: the client went away, or none is attached.
    pub const ENOTCONN: Errno = Errno(libc::ENOTCONN);
    /// Timed out: the client did not answer in time.
    pub const ETIMEDOUT: Errno = Errno(libc::ETIMEDOUT);
    /// Protocol error.
    pub const EPROTO: Errno = Errno(libc::EPROTO);
    /// Operation not permitted.
    pub const EPERM: Errno = Errno(libc::EPERM);
    /// Out of range.
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    /// Bad file descriptor.
    pub const EBADF: Errno = Errno(libc::EBADF);
    /// I/O error.
    pub const EIO: Errno = Errno(libc::EIO);
    /// Too big.
    pub const E2BIG: Errno = Errno(libc::E2BIG);
    /// Value too large (an arithmetic overflow on the way).
    pub const EOVERFLOW: Errno = Errno(libc::EOVERFLOW);

    /// The errno left by the last failed libc call on this thread.
    pub fn last() -> Errno {
        Errno(
            std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }

    /// The raw value.
    pub fn raw(self) -> i32 {
        self.0
    }
}

impl From<std::io::Error> for Errno {
    fn from(e: std::io::Error) -> Self {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Errno({}: {})",
            self.0,
            std::io::Error::from_raw_os_error(self.0)
        )
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Errno {}

impl From<nix::errno::Errno> for Errno {
    fn from(e: nix::errno::Errno) -> Errno {
        Errno(e as i32)
    }
}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}
