//! The error type used across the library: a POSIX errno value.
//!
//! Every failure the protocol can report travels to the client as an errno,
//! and every failure the C API reports is an errno, so the crate's internal
//! error is exactly that, with a few helpers.

use std::fmt;

/// A POSIX error number (`libc::EINVAL`, `libc::ENOENT`, ...).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(pub i32);

/// Result alias used by the whole crate.
pub type Result<T> = std::result::Result<T, Errno>;

impl Errno {
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    pub const ENOTSUP: Errno = Errno(libc::ENOTSUP);
    pub const EEXIST: Errno = Errno(libc::EEXIST);
    pub const EFAULT: Errno = Errno(libc::EFAULT);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EBUSY: Errno = Errno(libc::EBUSY);
    pub const EAGAIN: Errno = Errno(libc::EAGAIN);
    pub const ENOSPC: Errno = Errno(libc::ENOSPC);
    pub const ENOTCONN: Errno = Errno(libc::ENOTCONN);
    pub const EPROTO: Errno = Errno(libc::EPROTO);
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
    pub const EBADF: Errno = Errno(libc::EBADF);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const E2BIG: Errno = Errno(libc::E2BIG);
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
