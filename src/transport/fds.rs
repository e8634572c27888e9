//! fd passing: receiving `SCM_RIGHTS` control data into owned fds.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::error::{Errno, Result};

use super::{Conn, MAX_RECV_FDS};

/// Space for a control message carrying up to [`MAX_RECV_FDS`] fds.
pub(super) const CMSG_BUF_LEN: usize = 64 + MAX_RECV_FDS * std::mem::size_of::<RawFd>();

/// Takes ownership of every fd in the SCM_RIGHTS messages of `msg`.
///
/// # Safety
/// `msg` must describe a control buffer just filled in by recvmsg(2).
pub(super) unsafe fn take_fds(msg: &libc::msghdr, out: &mut Vec<OwnedFd>) -> Result<()> {
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
    /// One `recvmsg` into `buf`; returns the byte count, the fds that came
    /// with the bytes and whether the control data was truncated/malformed.
    /// `idle`: no byte of the message being read has arrived yet.
    pub(super) fn recvmsg_once(
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{cmd, Header};
    use crate::transport::socketpair;

    use std::os::fd::AsRawFd;

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
}
