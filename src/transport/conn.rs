//! A connected vfio-user stream: message framing (header, then body),
//! sends with fds, and the socketpair helper.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::error::{Errno, Result};
use crate::protocol::{Header, HEADER_SIZE};

use super::cvt;
use super::read_ahead::ReadAhead;

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
    pub(super) fd: OwnedFd,
    /// Control-message buffer for receiving fds, allocated on first use and
    /// kept, so that receiving costs no allocation.
    pub(super) cmsg: std::cell::RefCell<Vec<u64>>,
    /// Bytes received ahead of the message being read, when enabled.
    pub(super) ahead: std::cell::RefCell<ReadAhead>,
    /// A socket timeout in the middle of a message (or of a send) means the
    /// peer stalled and is given up on (`ECONNRESET`), while one before a
    /// message has begun means only that the peer is idle, so the wait goes
    /// on. Set for accepted connections; other users of `Conn` (the client)
    /// see their own timeouts as `EAGAIN`.
    pub(super) stall_resets: bool,
    /// A whole header has been received: from then on the peer may idle.
    pub(super) talked: std::cell::Cell<bool>,
    /// A stall was reported as `ECONNRESET` (see [`Conn::stalled`]).
    pub(super) stalled: std::cell::Cell<bool>,
    /// How long a receive waits where silence is a stall (see
    /// [`Conn::with_stall_timeout`]); `None`: unbounded.
    pub(super) recv_timeout: std::cell::Cell<Option<Duration>>,
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

    /// Lets header reads take up to 4 KiB ahead, so that a small message
    /// is received with one system call. Only for a connection that one
    /// blocking loop reads: bytes held here are invisible to poll(2) on the
    /// socket, so a caller that polls before each read could wait forever
    /// for a message already received.
    pub fn set_read_ahead(&self, on: bool) {
        self.ahead.borrow_mut().on = on;
    }

    /// The socket fd, for poll().
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
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
    pub(super) fn send_flat(&self, buf: &[u8]) -> Result<()> {
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
}

/// Messages up to this size without fds are sent from one stack buffer.
pub(super) const SMALL_SEND: usize = 256;

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
    use crate::protocol::{cmd, Header};

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
}
