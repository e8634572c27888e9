//! The message exchange with the server: framing replies, matching them to
//! requests (skipping late replies to abandoned ones), and serving the
//! server's own requests met while waiting.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::error::Errno;
use crate::protocol::{cmd, flags, Header, DMA_REGION_ACCESS_SIZE, HEADER_SIZE};
use crate::transport::Conn;

use super::dma::serve_command;
use super::*;

/// One message as received: header, body and the fds that came with it.
#[derive(Debug)]
pub struct RawMessage {
    /// The header as received.
    pub hdr: Header,
    /// The `msg_size - 16` bytes after the header.
    pub body: Vec<u8>,
    /// The fds passed with the message (owned; closed when dropped).
    pub fds: Vec<OwnedFd>,
}

/// Why reading a message failed, and whether the stream is out of step.
pub(super) struct ReadFail {
    err: ClientError,
    desync: bool,
}

pub(super) fn stream_conn(fd: OwnedFd, timeout: Duration) -> Result<Conn> {
    let s = UnixStream::from(fd);
    s.set_read_timeout(Some(timeout))
        .map_err(|e| ClientError::Io(e.into()))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| ClientError::Io(e.into()))?;
    Ok(Conn::from_fd(OwnedFd::from(s)))
}

/// Reads one whole message, refusing bodies above `limit`.
pub(super) fn read_msg(conn: &Conn, limit: usize) -> std::result::Result<RawMessage, ReadFail> {
    let rx = conn.recv_header(false).map_err(|e| {
        let err = io_err(e);
        // A timeout after poll said readable means a partial header.
        let desync = !matches!(err, ClientError::Disconnected);
        ReadFail { err, desync }
    })?;
    let hdr = rx.hdr;
    let Some(len) = hdr.body_len() else {
        return Err(ReadFail {
            err: ClientError::Protocol(format!(
                "message size {} below the header size",
                hdr.msg_size
            )),
            desync: true,
        });
    };
    if len > limit {
        return Err(ReadFail {
            err: ClientError::Protocol(format!("message body of {len} bytes exceeds {limit}")),
            desync: true,
        });
    }
    let mut body = vec![0u8; len];
    conn.recv_exact(&mut body).map_err(|e| ReadFail {
        err: io_err(e),
        desync: true,
    })?;
    if rx.fds_bad {
        return Err(ReadFail {
            err: ClientError::Protocol("truncated or malformed fd list".into()),
            desync: false,
        });
    }
    Ok(RawMessage {
        hdr,
        body,
        fds: rx.fds,
    })
}

/// Waits until one of `conns` is readable (or hung up); returns its
/// position, or `Timeout` at the deadline.
pub(super) fn poll_any(conns: &[&Conn], deadline: Instant) -> Result<usize> {
    let mut p: Vec<PollFd<'_>> = conns
        .iter()
        .map(|c| PollFd::new(c.as_fd(), PollFlags::POLLIN))
        .collect();
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .ok_or(ClientError::Timeout)?;
        let ms = i32::try_from(left.as_millis().saturating_add(1)).unwrap_or(i32::MAX);
        match poll(
            &mut p,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ClientError::Io(e.into())),
        }
        // Any revents bit counts (nix reports unknown bits as None).
        if let Some(i) = p.iter().position(|x| x.any() != Some(false)) {
            return Ok(i);
        }
        if Instant::now() >= deadline {
            return Err(ClientError::Timeout);
        }
    }
}

pub(super) fn raw_fds<F: AsFd>(fds: &[F]) -> Vec<RawFd> {
    fds.iter().map(|f| f.as_fd().as_raw_fd()).collect()
}

impl Client {
    /// Serves the server's DMA requests until none arrives for `idle`;
    /// returns how many were served. A reply arriving meanwhile (to nothing
    /// outstanding) is a protocol error.
    pub fn serve_dma(&mut self, idle: Duration) -> Result<usize> {
        self.usable()?;
        let mut served = 0;
        loop {
            let mut conns = vec![&self.conn];
            conns.extend(self.twin.as_ref());
            let which = match poll_any(&conns, Instant::now() + idle) {
                Ok(0) => Sock::Main,
                Ok(_) => Sock::Twin,
                Err(ClientError::Timeout) => return Ok(served),
                Err(e) => return Err(e),
            };
            let l = self.cmd_limit();
            let msg = self.read_from(which, l)?;
            if msg.hdr.msg_type() != flags::TYPE_COMMAND {
                return proto(format!(
                    "unexpected message (cmd {}, id {:#x}) with no request outstanding",
                    msg.hdr.cmd, msg.hdr.msg_id
                ));
            }
            self.serve(which, &msg)?;
            served += 1;
        }
    }

    // ---- raw messages ------------------------------------------------------

    /// A fresh message id.
    pub fn next_msg_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    pub(super) fn usable(&self) -> Result<()> {
        match &self.broken {
            Some(why) => proto(format!("connection out of step: {why}")),
            None => Ok(()),
        }
    }

    pub(super) fn send_on_main(
        &mut self,
        hdr: &Header,
        parts: &[&[u8]],
        fds: &[RawFd],
    ) -> Result<()> {
        self.usable()?;
        match self.conn.send(hdr, parts, fds) {
            Ok(()) => Ok(()),
            Err(e) => {
                let err = io_err(e);
                if matches!(err, ClientError::Timeout) {
                    self.broken = Some("send timed out".into());
                }
                Err(err)
            }
        }
    }

    /// Sends `hdr` and `body` as they are (the header is not adjusted), with
    /// `fds`: for tests of the server's handling of malformed requests.
    pub fn send_raw(&mut self, hdr: &Header, body: &[u8], fds: &[RawFd]) -> Result<()> {
        self.send_on_main(hdr, &[body], fds)
    }

    /// Waits for the next reply on the main socket, serving server requests
    /// meanwhile, and returns it whatever its id or error state.
    pub fn recv_reply(&mut self) -> Result<RawMessage> {
        let limit = self.reply_limit(0);
        self.next_reply(limit)
    }

    /// A body limit for replies: `extra` above the general allowance.
    pub(super) fn reply_limit(&self, extra: usize) -> usize {
        self.opts
            .max_data_xfer_size
            .max(self.caps.max_data_xfer_size)
            .saturating_add(64 * 1024)
            .saturating_add(extra)
    }

    pub(super) fn cmd_limit(&self) -> usize {
        DMA_REGION_ACCESS_SIZE.saturating_add(self.opts.max_data_xfer_size)
    }

    /// Reads one message from `which`, marking the stream broken when the
    /// failure leaves it out of step.
    pub(super) fn read_from(&mut self, which: Sock, limit: usize) -> Result<RawMessage> {
        let conn = match which {
            Sock::Main => &self.conn,
            Sock::Twin => self.twin.as_ref().ok_or(ClientError::Disconnected)?,
        };
        match read_msg(conn, limit) {
            Ok(m) => Ok(m),
            Err(f) => {
                if f.desync {
                    self.broken = Some(f.err.to_string());
                }
                Err(f.err)
            }
        }
    }

    /// Serves one server command that arrived on `which`.
    pub(super) fn serve(&mut self, which: Sock, msg: &RawMessage) -> Result<()> {
        let conn = match which {
            Sock::Main => &self.conn,
            Sock::Twin => self.twin.as_ref().ok_or(ClientError::Disconnected)?,
        };
        let backing: &dyn DmaBacking = match &self.backing {
            Some(b) => b.as_ref(),
            None => &self.space,
        };
        let r = serve_command(conn, msg, backing, self.opts.max_data_xfer_size);
        if r.is_ok() && matches!(msg.hdr.cmd, cmd::DMA_READ | cmd::DMA_WRITE) {
            self.dma_served += 1;
            if which == Sock::Twin {
                self.dma_served_twin += 1;
            }
        }
        r
    }

    /// Waits for one message that is not a server command, serving commands
    /// (on both sockets) as they come; each served command restarts the
    /// timeout.
    pub(super) fn next_reply(&mut self, limit: usize) -> Result<RawMessage> {
        self.usable()?;
        let limit_main = limit.max(self.cmd_limit());
        let mut deadline = Instant::now() + self.opts.timeout;
        loop {
            let mut conns = vec![&self.conn];
            conns.extend(self.twin.as_ref());
            let which = if poll_any(&conns, deadline)? == 0 {
                Sock::Main
            } else {
                Sock::Twin
            };
            let msg = match which {
                Sock::Main => self.read_from(Sock::Main, limit_main)?,
                Sock::Twin => {
                    let l = self.cmd_limit();
                    match self.read_from(Sock::Twin, l) {
                        Ok(m) => m,
                        // The server may drop the twin socket; keep waiting
                        // on the main one.
                        Err(ClientError::Disconnected) => {
                            self.twin = None;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            if msg.hdr.msg_type() == flags::TYPE_COMMAND {
                self.serve(which, &msg)?;
                deadline = Instant::now() + self.opts.timeout;
                continue;
            }
            if which == Sock::Twin {
                return proto(format!(
                    "unexpected message type {} on the twin socket",
                    msg.hdr.msg_type()
                ));
            }
            if msg.body.len() > limit {
                return proto(format!(
                    "reply body of {} bytes exceeds {limit}",
                    msg.body.len()
                ));
            }
            return Ok(msg);
        }
    }

    /// Waits for the reply to request `id`, skipping late replies to
    /// requests that timed out.
    pub(super) fn wait_reply(&mut self, id: u16, command: u16, limit: usize) -> Result<RawMessage> {
        loop {
            let msg = match self.next_reply(limit) {
                Ok(m) => m,
                Err(ClientError::Timeout) => {
                    if self.abandoned.len() >= MAX_ABANDONED {
                        self.abandoned.remove(0);
                    }
                    self.abandoned.push(id);
                    return Err(ClientError::Timeout);
                }
                Err(e) => return Err(e),
            };
            if msg.hdr.msg_id != id {
                if let Some(p) = self.abandoned.iter().position(|&a| a == msg.hdr.msg_id) {
                    self.abandoned.remove(p);
                    continue;
                }
                return proto(format!(
                    "reply id {:#x} while waiting for {id:#x}",
                    msg.hdr.msg_id
                ));
            }
            if msg.hdr.msg_type() != flags::TYPE_REPLY {
                return proto(format!(
                    "message type {} is not a reply",
                    msg.hdr.msg_type()
                ));
            }
            if msg.hdr.cmd != command {
                return proto(format!(
                    "reply for command {} to command {command}",
                    msg.hdr.cmd
                ));
            }
            if msg.hdr.flags & flags::ERROR != 0 {
                let e = msg.hdr.error_no;
                if e == 0 || e > i32::MAX as u32 {
                    return proto(format!("error reply with errno {e}"));
                }
                return Err(ClientError::Server {
                    cmd: command,
                    errno: Errno(e as i32),
                });
            }
            return Ok(msg);
        }
    }

    /// Sends a command and waits for its successful reply, whose body may
    /// not exceed `limit` bytes.
    pub(super) fn request(
        &mut self,
        command: u16,
        parts: &[&[u8]],
        fds: &[RawFd],
        limit: usize,
    ) -> Result<RawMessage> {
        let id = self.next_msg_id();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let size = u32::try_from(HEADER_SIZE + len)
            .map_err(|_| ClientError::InvalidArgument("message too large".into()))?;
        let hdr = Header {
            msg_id: id,
            cmd: command,
            msg_size: size,
            flags: flags::TYPE_COMMAND,
            error_no: 0,
        };
        self.send_on_main(&hdr, parts, fds)?;
        self.wait_reply(id, command, limit)
    }

    /// Sends a command with `NO_REPLY`.
    pub(super) fn post(&mut self, command: u16, parts: &[&[u8]], fds: &[RawFd]) -> Result<()> {
        let id = self.next_msg_id();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let size = u32::try_from(HEADER_SIZE + len)
            .map_err(|_| ClientError::InvalidArgument("message too large".into()))?;
        let hdr = Header {
            msg_id: id,
            cmd: command,
            msg_size: size,
            flags: flags::TYPE_COMMAND | flags::NO_REPLY,
            error_no: 0,
        };
        self.send_on_main(&hdr, parts, fds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tests::{fake_server, recv};

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run sendmsg/recvmsg with fds")]
    fn misbehaving_server_gives_errors_not_panics() {
        let (mut c, t) = fake_server(|conn| {
            // 1: a reply with the wrong id.
            let (h, _) = recv(&conn);
            let mut bad = h.reply(0, 0);
            bad.msg_id = bad.msg_id.wrapping_add(7);
            conn.send(&bad, &[], &[]).unwrap();
            // 2: a short DEVICE_GET_INFO reply.
            let (h, _) = recv(&conn);
            conn.send(&h.reply(4, 0), &[&[16, 0, 0, 0]], &[]).unwrap();
            // 3: an error reply.
            let (h, _) = recv(&conn);
            conn.send(&h.reply(0, libc::EBUSY), &[], &[]).unwrap();
            // 4: silence, then a late reply, then the reply to 5.
            let (h4, _) = recv(&conn);
            let (h5, _) = recv(&conn);
            conn.send(&h4.reply(0, 0), &[], &[]).unwrap();
            conn.send(&h5.reply(0, 0), &[], &[]).unwrap();
            // 6: a header claiming less than itself.
            let (h, _) = recv(&conn);
            let mut bad = h.reply(0, 0);
            bad.msg_size = 3;
            conn.send(&bad, &[], &[]).unwrap();
            // Keep the socket open until the client is done.
            let _ = conn.recv_header(false);
        });
        assert!(matches!(c.reset(), Err(ClientError::Protocol(_))));
        assert!(matches!(c.device_info(), Err(ClientError::Protocol(_))));
        let e = c.reset().unwrap_err();
        assert_eq!(e.server_errno(), Some(Errno::EBUSY));
        assert!(matches!(c.reset(), Err(ClientError::Timeout)));
        // The late reply to the timed-out request is skipped.
        c.reset().unwrap();
        assert!(matches!(c.reset(), Err(ClientError::Protocol(_))));
        // The stream is now out of step: every later call says so.
        assert!(matches!(c.reset(), Err(ClientError::Protocol(_))));
        drop(c);
        t.join().unwrap();
    }
}
