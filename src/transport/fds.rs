//! fd passing: `sendmsg`/`recvmsg` with `SCM_RIGHTS` control data (through
//! nix), receiving into a control buffer the connection keeps, and taking
//! ownership of every fd that arrives, truncated control data included.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

use crate::error::{Errno, Result};

use super::{Conn, MAX_RECV_FDS};

/// Space for a control message carrying up to [`MAX_RECV_FDS`] fds.
pub(super) const CMSG_BUF_LEN: usize = 64 + MAX_RECV_FDS * std::mem::size_of::<RawFd>();

/// The receive control buffer: aligned for `struct cmsghdr`, allocated on a
/// connection's first receive and kept, so that receiving costs no
/// allocation. All zero before every `recvmsg`: the kernel writes into it
/// only when control data arrives, and it is cleared again after such a
/// receive, so that a walk of truncated control data (which nix declines)
/// ends where what the kernel wrote ends.
#[repr(C, align(8))]
pub(crate) struct CmsgBuf([u8; CMSG_BUF_LEN]);

impl std::fmt::Debug for CmsgBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CmsgBuf")
    }
}

/// Size of `struct cmsghdr`, which is also where a control message's data
/// starts (it is a multiple of the `size_t` alignment on Linux).
const CMSG_HDR: usize = std::mem::size_of::<libc::cmsghdr>();

/// Takes ownership of `fd` (skipping the negative values the kernel never
/// sends).
fn own(fd: RawFd, out: &mut Vec<OwnedFd>) {
    if fd >= 0 {
        // SAFETY: the kernel just installed this descriptor in our table for
        // the SCM_RIGHTS message we received; nothing else refers to it, so
        // owning it here is what closes it exactly once.
        out.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// Takes ownership of every `SCM_RIGHTS` fd in truncated control data
/// (`MSG_CTRUNC`), which nix does not iterate: the kernel installed the fds
/// that fit, and they must be closed. `buf` was all zero before the
/// receive, so the walk stops where the kernel's writing stopped.
fn take_truncated(buf: &[u8], out: &mut Vec<OwnedFd>) {
    const ALIGN: usize = std::mem::size_of::<usize>();
    let word = |at: usize| -> usize {
        let mut b = [0u8; ALIGN];
        b.copy_from_slice(&buf[at..at + ALIGN]);
        usize::from_ne_bytes(b)
    };
    let int = |at: usize| -> i32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&buf[at..at + 4]);
        i32::from_ne_bytes(b)
    };
    let mut off = 0usize;
    while off + CMSG_HDR <= buf.len() {
        // struct cmsghdr: size_t cmsg_len; int cmsg_level; int cmsg_type.
        let len = word(off);
        if len < CMSG_HDR {
            break;
        }
        let (level, ty) = (int(off + ALIGN), int(off + ALIGN + 4));
        let end = off.saturating_add(len).min(buf.len());
        if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
            let mut at = off + CMSG_HDR;
            while at + 4 <= end {
                own(int(at), out);
                at += 4;
            }
        }
        off = match len
            .div_ceil(ALIGN)
            .checked_mul(ALIGN)
            .and_then(|l| off.checked_add(l))
        {
            Some(n) => n,
            None => break,
        };
    }
}

impl Conn {
    /// One `recvmsg` into `buf`; returns the byte count, the fds that came
    /// with the bytes and whether the control data was truncated
    /// (`MSG_CTRUNC`: more fds than [`MAX_RECV_FDS`]; the ones that arrived
    /// are returned, owned, and closed with the rest by the caller).
    /// `idle`: no byte of the message being read has arrived yet. Allocates
    /// nothing unless fds arrive (after the control buffer's first use).
    pub(super) fn recvmsg_once(
        &self,
        buf: &mut [u8],
        nonblocking: bool,
        idle: bool,
    ) -> Result<(usize, Vec<OwnedFd>, bool)> {
        let mut cbuf_slot = self.cmsg.borrow_mut();
        let cbuf = &mut cbuf_slot
            .get_or_insert_with(|| Box::new(CmsgBuf([0; CMSG_BUF_LEN])))
            .0;
        // A bounded receive does not block in the kernel: when nothing is
        // there it waits with poll(2) instead (see the module doc).
        let bounded = !nonblocking && self.bounded(idle);
        let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
        if nonblocking || bounded {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        let mut fds = Vec::new();
        let mut iov = [IoSliceMut::new(buf)];
        let (n, truncated, had_cmsg) = loop {
            match socket::recvmsg::<()>(self.fd.as_raw_fd(), &mut iov, Some(&mut cbuf[..]), flags) {
                Ok(msg) => {
                    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
                    let mut had_cmsg = false;
                    // Err (ENOBUFS) only when truncated: handled below.
                    if let Ok(cmsgs) = msg.cmsgs() {
                        for c in cmsgs {
                            had_cmsg = true;
                            if let ControlMessageOwned::ScmRights(v) = c {
                                fds.reserve(v.len());
                                v.into_iter().for_each(|fd| own(fd, &mut fds));
                            }
                        }
                    }
                    break (msg.bytes, truncated, had_cmsg);
                }
                Err(e) => {
                    let mut e = Errno::from(e);
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
                }
            }
        };
        if truncated {
            take_truncated(cbuf, &mut fds);
        }
        if truncated || had_cmsg {
            // Back to all zero for the next receive (see `CmsgBuf`).
            cbuf.fill(0);
        }
        Ok((n, fds, truncated))
    }

    /// One `sendmsg` of `iov`, passing `fds` (if any) as `SCM_RIGHTS`.
    /// Returns the bytes sent.
    pub(super) fn sendmsg_with_fds(&self, iov: &[IoSlice<'_>], fds: &[RawFd]) -> Result<usize> {
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
        Ok(socket::sendmsg::<()>(
            self.fd.as_raw_fd(),
            iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{cmd, Header};
    use crate::transport::socketpair;

    use std::os::fd::AsRawFd;

    /// A connected server and client, and the header of a `DMA_MAP`
    /// request without a body, to send fds with.
    fn pair_and_header() -> (Conn, Conn, Header) {
        let (a, b) = socketpair().unwrap();
        let h = Header {
            msg_id: 1,
            cmd: cmd::DMA_MAP,
            msg_size: 16,
            flags: 0,
            error_no: 0,
        };
        (Conn::from_fd(a), Conn::from_fd(b), h)
    }

    #[test]
    fn fds_are_passed_and_owned() {
        let (server, client, h) = pair_and_header();
        let (x, _y) = socketpair().unwrap();
        client
            .send(&h, &[], &[x.as_raw_fd(), x.as_raw_fd()])
            .unwrap();
        let r = server.recv_header(false).unwrap();
        assert_eq!(r.hdr, h);
        assert_eq!(r.fds.len(), 2);
        assert_ne!(r.fds[0].as_raw_fd(), x.as_raw_fd());
    }

    /// Whether `fd` is an open descriptor of this process.
    fn is_open(fd: RawFd) -> bool {
        std::path::Path::new(&format!("/proc/self/fd/{fd}")).exists()
    }

    /// One cmsghdr + `fds`, laid out as the kernel writes it.
    fn put_cmsg(buf: &mut [u8], at: usize, level: i32, ty: i32, fds: &[RawFd]) -> usize {
        let w = std::mem::size_of::<usize>();
        let len = CMSG_HDR + 4 * fds.len();
        buf[at..at + w].copy_from_slice(&len.to_ne_bytes());
        buf[at + w..at + w + 4].copy_from_slice(&level.to_ne_bytes());
        buf[at + w + 4..at + w + 8].copy_from_slice(&ty.to_ne_bytes());
        for (i, fd) in fds.iter().enumerate() {
            let o = at + CMSG_HDR + 4 * i;
            buf[o..o + 4].copy_from_slice(&fd.to_ne_bytes());
        }
        at + len.div_ceil(w) * w
    }

    #[test]
    fn truncated_control_data_gives_every_fd_that_arrived_an_owner() {
        // What the kernel leaves in the (zeroed) buffer on MSG_CTRUNC: the
        // fds that fit, which nix's iterator declines to walk.
        let (p, q) = socketpair().unwrap();
        let (r, _keep) = socketpair().unwrap();
        let raw = [p.as_raw_fd(), q.as_raw_fd(), r.as_raw_fd()];
        let mut buf = vec![0u8; CMSG_BUF_LEN];
        let next = put_cmsg(&mut buf, 0, libc::SOL_SOCKET, libc::SCM_RIGHTS, &raw[..2]);
        // A second message of another type is skipped, a third SCM_RIGHTS
        // one is taken; the zeros after it end the walk.
        let next = put_cmsg(
            &mut buf,
            next,
            libc::SOL_SOCKET,
            libc::SCM_CREDENTIALS,
            &[7, 7, 7],
        );
        put_cmsg(
            &mut buf,
            next,
            libc::SOL_SOCKET,
            libc::SCM_RIGHTS,
            &raw[2..],
        );
        // The test's own handles give up ownership: take_truncated's result
        // now owns these descriptors, as it would the kernel's.
        std::mem::forget((p, q, r));
        let mut out = Vec::new();
        take_truncated(&buf, &mut out);
        let got: Vec<RawFd> = out.iter().map(|f| f.as_raw_fd()).collect();
        assert_eq!(got, raw);
        drop(out);
        for fd in raw {
            assert!(!is_open(fd), "fd {fd} leaked");
        }
    }

    #[test]
    fn garbage_lengths_end_the_truncated_walk() {
        let w = std::mem::size_of::<usize>();
        let mut buf = vec![0u8; 64];
        // A length past the buffer: only what lies inside is read (and
        // here that is nothing that could be an fd: -1 is skipped).
        buf[..w].copy_from_slice(&usize::MAX.to_ne_bytes());
        buf[w..w + 4].copy_from_slice(&libc::SOL_SOCKET.to_ne_bytes());
        buf[w + 4..w + 8].copy_from_slice(&libc::SCM_RIGHTS.to_ne_bytes());
        for c in buf[CMSG_HDR..].chunks_mut(4) {
            c.copy_from_slice(&(-1i32).to_ne_bytes());
        }
        let mut out = Vec::new();
        take_truncated(&buf, &mut out);
        assert!(out.is_empty());
        // A length below the header's ends the walk at once.
        buf[..w].copy_from_slice(&1usize.to_ne_bytes());
        take_truncated(&buf, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn control_buffer_is_zero_again_after_fds_arrive() {
        let (server, client, h) = pair_and_header();
        let (x, _y) = socketpair().unwrap();
        client.send(&h, &[], &[x.as_raw_fd()]).unwrap();
        let r = server.recv_header(false).unwrap();
        assert_eq!(r.fds.len(), 1);
        assert!(!r.fds_bad);
        let cbuf = server.cmsg.borrow();
        assert!(cbuf.as_ref().unwrap().0.iter().all(|&b| b == 0));
    }
}
