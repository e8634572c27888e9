//! A connected vfio-user stream: message framing (header, then body),
//! sends with fds, and the socketpair helper.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::error::{Errno, Result};
use crate::protocol::{Header, HEADER_SIZE};

use nix::sys::socket::{self, AddressFamily, MsgFlags, SockFlag, SockType};

use super::fds::CmsgBuf;
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
    pub(super) cmsg: std::cell::RefCell<Option<Box<CmsgBuf>>>,
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
            cmsg: std::cell::RefCell::new(None),
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
            MsgFlags::MSG_DONTWAIT
        } else {
            MsgFlags::MSG_WAITALL
        };
        while done < buf.len() {
            let n = match socket::recv(self.fd.as_raw_fd(), &mut buf[done..], flags) {
                Ok(n) => n,
                Err(e) => {
                    let mut e = Errno::from(e);
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
            };
            if n == 0 {
                return Err(Errno(if done == 0 {
                    libc::ENOMSG
                } else {
                    libc::ECONNRESET
                }));
            }
            done += n;
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
        let mut sent = 0usize;
        while sent < total {
            let mut iov = [IoSlice::new(&[]); MAX_PARTS + 1];
            let mut n_iov = 0;
            let mut skip = sent;
            for p in all {
                if skip >= p.len() {
                    skip -= p.len();
                    continue;
                }
                iov[n_iov] = IoSlice::new(&p[skip..]);
                n_iov += 1;
                skip = 0;
            }
            // The fds go with the first byte only.
            let with_fds = if sent == 0 { fds } else { &[] };
            match self.sendmsg_with_fds(&iov[..n_iov], with_fds) {
                Ok(n) => sent += n,
                Err(e) => match self.send_failed(e) {
                    Some(e) => return Err(e),
                    None => continue,
                },
            }
        }
        Ok(())
    }

    /// Sends all of `buf` with send(2) (no fds).
    pub(super) fn send_flat(&self, buf: &[u8]) -> Result<()> {
        let mut sent = 0;
        while sent < buf.len() {
            match socket::send(self.fd.as_raw_fd(), &buf[sent..], MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => sent += n,
                Err(e) => match self.send_failed(e.into()) {
                    Some(e) => return Err(e),
                    None => continue,
                },
            }
        }
        Ok(())
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Messages up to this size without fds are sent from one stack buffer.
pub(super) const SMALL_SEND: usize = 256;

/// Number of fds [`Conn::send`] used to pass from a stack buffer. Kept for
/// API compatibility: sends with fds now build their control message with
/// nix's `sendmsg`, which allocates it (sends without fds, every reply on
/// the I/O path, allocate nothing).
pub const INLINE_FDS: usize = 28;

/// Creates a connected pair of stream sockets (for the twin socket and tests).
pub fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
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
