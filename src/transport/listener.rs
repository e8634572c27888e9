//! The listening socket a server accepts clients on.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{
    accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
};

use crate::error::{Errno, Result};

use super::{Conn, CLIENT_STALL_TIMEOUT};

/// A listening UNIX socket bound to a path; the path is removed on drop.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
}

/// Longest socket path (`sun_path` holds it and its terminating NUL).
const SUN_PATH_LEN: usize = 108;

impl Listener {
    /// Creates, binds and listens on `path`. With `nonblocking`, `accept`
    /// returns `EAGAIN` instead of waiting for a client.
    pub fn bind(path: &Path, nonblocking: bool) -> Result<Listener> {
        let bytes = path.as_os_str().as_bytes();
        if bytes.len() >= SUN_PATH_LEN {
            return Err(Errno(libc::ENAMETOOLONG));
        }
        if bytes.contains(&0) {
            return Err(Errno::EINVAL);
        }
        let addr = UnixAddr::new(path)?;
        let mut flags = SockFlag::SOCK_CLOEXEC;
        if nonblocking {
            flags |= SockFlag::SOCK_NONBLOCK;
        }
        let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
        bind(fd.as_raw_fd(), &addr)?;
        // A backlog of 0, as upstream's: the kernel still queues a client
        // or so, and a flood of connects is refused rather than queued.
        if let Err(e) = listen(&fd, Backlog::new(0)?) {
            let _ = std::fs::remove_file(path);
            return Err(e.into());
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
            match accept4(self.fd.as_fd(), SockFlag::SOCK_CLOEXEC) {
                Ok(fd) => return Conn::with_stall_timeout(fd, timeout),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
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

impl AsFd for Listener {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
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
            socket_timeouts(&conn),
            [CLIENT_STALL_TIMEOUT, Duration::ZERO]
        );
        assert_eq!(conn.stall_timeout(), Some(CLIENT_STALL_TIMEOUT));
    }
}
