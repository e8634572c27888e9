//! Server-to-client DMA: guest memory reached with `VFIO_USER_DMA_READ` /
//! `VFIO_USER_DMA_WRITE` messages to the client (`vfu_sgl_read` /
//! `vfu_sgl_write` on regions that are not mapped), each waiting for its
//! reply within the client timeout.

use super::*;

impl Context {
    /// Reads or writes guest memory described by `sg` (`vfu_sgl_read` /
    /// `vfu_sgl_write`): directly when `direct` and the region allows it,
    /// else with DMA_READ / DMA_WRITE messages to the client, split by the
    /// client's `max_data_xfer_size`.
    ///
    /// Each message's reply must come within the client timeout
    /// ([`Context::set_client_timeout`]): else the client is dropped and
    /// the transfer fails with `ETIMEDOUT` (`ENOTCONN` when the client hung
    /// up instead).
    pub fn dma_transfer(
        &self,
        sg: &DmaSg,
        buf: &mut [u8],
        is_write: bool,
        direct: bool,
    ) -> Result<()> {
        let dma = self.dma().ok_or(Errno::EINVAL)?.clone();
        if is_write && !sg.writeable {
            return Err(Errno::EPERM);
        }
        if buf.len() as u64 != sg.length {
            return Err(Errno::EINVAL);
        }
        if direct && dma.sg_access(sg, buf, is_write, true)? {
            return Ok(());
        }
        let max = self.client.get().max_data_xfer_size.max(1);
        let base = (sg.dma_addr as u64)
            .checked_add(sg.offset)
            .ok_or(Errno::EINVAL)?;
        let mut done = 0usize;
        while done < buf.len() {
            let n = (buf.len() - done).min(max);
            let addr = base + done as u64;
            self.dma_message(addr, &mut buf[done..done + n], is_write)?;
            done += n;
        }
        if is_write {
            dma.mark_dirty_range(base, buf.len() as u64);
        }
        Ok(())
    }

    fn dma_message(&self, addr: u64, data: &mut [u8], is_write: bool) -> Result<()> {
        let (conn, on_main) = match self.twin.borrow().clone() {
            Some(t) => (t, false),
            None => (self.conn.borrow().clone().ok_or(Errno::ENOTCONN)?, true),
        };
        let id = self.next_msg_id.get();
        self.next_msg_id.set(id.wrapping_add(1));
        let qemu = self.client.get().qemu_dma_layout;
        // Spec layout: {addr u64, count u64, data}. QEMU's: {addr u64,
        // count u32, data} in a struct padded to 16 bytes, so its messages
        // carry 4 bytes after the data. A read request is the same 16 bytes
        // in both (count < 4 GiB, little endian).
        let mut head = [0u8; DMA_REGION_ACCESS_SIZE];
        head[..8].copy_from_slice(&addr.to_le_bytes());
        let head_len = if qemu && is_write {
            head[8..12].copy_from_slice(&(data.len() as u32).to_le_bytes());
            12
        } else {
            head[8..16].copy_from_slice(&(data.len() as u64).to_le_bytes());
            16
        };
        let pad = [0u8; 4];
        let command = if is_write {
            cmd::DMA_WRITE
        } else {
            cmd::DMA_READ
        };
        let tail: &[u8] = if qemu && is_write { &pad } else { &[] };
        let payload_len = head_len + if is_write { data.len() } else { 0 } + tail.len();
        let h = Header {
            msg_id: id,
            cmd: command,
            msg_size: (HEADER_SIZE + payload_len) as u32,
            flags: flags::TYPE_COMMAND,
            error_no: 0,
        };
        let parts: [&[u8]; 3] = [&head[..head_len], if is_write { data } else { &[] }, tail];
        // The reply is due: unlike the wait for a request, silence here is a
        // stall. The deadline bounds the whole wait: commands the client
        // sends meanwhile are kept but do not extend it, so that a client
        // trickling commands cannot hold the device forever either.
        let timeout = self.client_timeout();
        let deadline = timeout.and_then(|t| std::time::Instant::now().checked_add(t));
        let r = conn
            .send(&h, &parts, &[])
            .map_err(DmaWait::Conn)
            .and_then(|()| self.await_dma_reply(&conn, on_main, deadline, id, command));
        let (hdr, body) = match r {
            Ok(reply) => reply,
            Err(DmaWait::Reply(e)) => return Err(e),
            Err(DmaWait::Conn(e))
                if e.0 == libc::ETIMEDOUT || (e.0 == libc::ECONNRESET && conn.stalled()) =>
            {
                self.logf(
                    lv::ERR,
                    format_args!(
                        "msg{id:#x}: no reply to DMA_{} within {:?}, dropping the client",
                        if is_write { "WRITE" } else { "READ" },
                        timeout.unwrap_or_default()
                    ),
                );
                let _ = self.reset_ctx();
                return Err(Errno::ETIMEDOUT);
            }
            Err(DmaWait::Conn(e)) if e.0 == libc::ENOMSG || e.0 == libc::ECONNRESET => {
                let _ = self.reset_ctx();
                return Err(Errno::ENOTCONN);
            }
            Err(DmaWait::Conn(e)) => return Err(e),
        };
        self.check_dma_reply(&hdr, &body, addr, data, is_write)
    }

    /// Reads messages until the reply to request `id` (a `command`) comes,
    /// keeping the commands the client sends meanwhile on the main socket
    /// for the request loop. With a `deadline`, the wait fails with
    /// `ETIMEDOUT` when no message has begun by then. Returns the reply's
    /// header and body.
    fn await_dma_reply(
        &self,
        conn: &Conn,
        on_main: bool,
        deadline: Option<std::time::Instant>,
        id: u16,
        command: u16,
    ) -> std::result::Result<(Header, Vec<u8>), DmaWait> {
        loop {
            if let Some(d) = deadline {
                conn.wait_readable(d).map_err(DmaWait::Conn)?;
            }
            let rx = conn.recv_header(false).map_err(DmaWait::Conn)?;
            let hdr = rx.hdr;
            let len = match hdr.body_len() {
                Some(l) if hdr.msg_size as usize <= SERVER_MAX_MSG_SIZE => l,
                _ => return Err(DmaWait::Reply(Errno::EINVAL)),
            };
            let mut body = vec![0u8; len];
            conn.recv_exact(&mut body).map_err(DmaWait::Conn)?;
            if hdr.msg_type() == flags::TYPE_COMMAND && on_main {
                // The client sent a command while we waited: keep it for the
                // request loop instead of mistaking it for our reply.
                self.deferred.borrow_mut().push_back(Request {
                    hdr,
                    body,
                    fds: rx.fds,
                });
                continue;
            }
            if hdr.msg_type() != flags::TYPE_REPLY || hdr.msg_id != id || hdr.cmd != command {
                return Err(DmaWait::Reply(Errno::EINVAL));
            }
            return Ok((hdr, body));
        }
    }

    /// Checks the client's reply to a DMA_READ/DMA_WRITE at `addr` and
    /// copies the data read into `data`.
    fn check_dma_reply(
        &self,
        hdr: &Header,
        body: &[u8],
        addr: u64,
        data: &mut [u8],
        is_write: bool,
    ) -> Result<()> {
        if hdr.flags & flags::ERROR != 0 {
            let e = hdr.error_no;
            return Err(Errno(if e == 0 || e > MAX_ERROR_NO {
                libc::EINVAL
            } else {
                e as i32
            }));
        }
        if self.client.get().qemu_dma_layout {
            // QEMU answers a write with a bare header and a read with
            // {addr u64, count u32, data, 4 bytes}.
            if is_write {
                return Ok(());
            }
            if body.u64_at(0)? != addr || body.u32_at(8)? as usize != data.len() {
                return Err(Errno::EINVAL);
            }
            data.copy_from_slice(body.get(12..12 + data.len()).ok_or(Errno::EINVAL)?);
            return Ok(());
        }
        if body.u64_at(0)? != addr || body.u64_at(8)? != data.len() as u64 {
            return Err(Errno::EINVAL);
        }
        if !is_write {
            let src = body
                .get(DMA_REGION_ACCESS_SIZE..DMA_REGION_ACCESS_SIZE + data.len())
                .ok_or(Errno::EINVAL)?;
            data.copy_from_slice(src);
        }
        Ok(())
    }
}

/// Why waiting for the reply to a DMA message failed.
enum DmaWait {
    /// The connection failed: the client hung up (`ENOMSG`, `ECONNRESET`)
    /// or stalled (`ECONNRESET` with [`Conn::stalled`]), the reply deadline
    /// passed (`ETIMEDOUT`), or another socket error.
    Conn(Errno),
    /// The client sent something that is not the reply.
    Reply(Errno),
}
