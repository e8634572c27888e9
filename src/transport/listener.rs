//! The listening socket a server accepts clients on.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Errno, Result};

use super::{cvt, Conn, CLIENT_STALL_TIMEOUT};

/// A listening UNIX socket bound to a path; the path is removed on drop.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::transport::socket_timeouts;
    use std::time::Duration;

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
}
