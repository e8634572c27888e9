//! DMA: mapping guest memory into the server (`DMA_MAP`/`DMA_UNMAP`) and
//! serving the server's `DMA_READ`/`DMA_WRITE` requests from the client's
//! [`DmaSpace`] or a [`DmaBacking`].

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::Arc;

use crate::device::dma_msg::{
    BITMAP_HEADER_SIZE, DMA_MAP_SIZE, DMA_UNMAP_ALL, DMA_UNMAP_GET_DIRTY_BITMAP, DMA_UNMAP_SIZE,
};
use crate::device::migration::dirty_bitmap_size;
use crate::error::Errno;
use crate::protocol::{cmd, Wire, WireOut, DMA_REGION_ACCESS_SIZE};
use crate::transport::Conn;

use super::*;

/// Executes one server-to-client command and answers it (unless it asked
/// for no reply). Errors are only local send failures.
pub(super) fn serve_command(
    conn: &Conn,
    msg: &RawMessage,
    backing: &dyn DmaBacking,
    max_xfer: usize,
) -> Result<()> {
    let hdr = &msg.hdr;
    let b = &msg.body[..];
    let res: std::result::Result<Vec<u8>, Errno> = (|| {
        let addr = b.u64_at(0)?;
        let count = b.u64_at(8)?;
        let count = usize::try_from(count).map_err(|_| Errno::EINVAL)?;
        if count > max_xfer {
            return Err(Errno::EINVAL);
        }
        let mut out = Vec::with_capacity(DMA_REGION_ACCESS_SIZE + count);
        out.put_u64(addr);
        out.put_u64(count as u64);
        match hdr.cmd {
            cmd::DMA_READ => {
                if b.len() != DMA_REGION_ACCESS_SIZE {
                    return Err(Errno::EINVAL);
                }
                out.resize(DMA_REGION_ACCESS_SIZE + count, 0);
                backing.dma_read(addr, &mut out[DMA_REGION_ACCESS_SIZE..])?;
            }
            cmd::DMA_WRITE => {
                let data = b.get(DMA_REGION_ACCESS_SIZE..).ok_or(Errno::EINVAL)?;
                if data.len() != count {
                    return Err(Errno::EINVAL);
                }
                backing.dma_write(addr, data)?;
            }
            _ => return Err(Errno::EINVAL),
        }
        Ok(out)
    })();
    if hdr.no_reply() {
        return Ok(());
    }
    let sent = match res {
        Ok(out) => conn.send(&hdr.reply(out.len(), 0), &[&out], &[]),
        Err(e) => conn.send(&hdr.reply(0, e.0), &[], &[]),
    };
    sent.map_err(io_err)
}

impl Client {
    // ---- DMA ------------------------------------------------------------------

    /// `DMA_MAP` of `[iova, iova + size)`, backed by `fd` at `offset` when
    /// given, with `flags` (`DMA_REGION_READ`/`WRITE`/`MMAP`/`FILE_IO` of
    /// `device::dma_msg`).
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        fd: Option<(BorrowedFd<'_>, u64)>,
        flags: u32,
    ) -> Result<()> {
        let mut body = Vec::with_capacity(DMA_MAP_SIZE);
        body.put_u32(DMA_MAP_SIZE as u32);
        body.put_u32(flags);
        body.put_u64(fd.map_or(0, |(_, o)| o));
        body.put_u64(iova);
        body.put_u64(size);
        let fds: Vec<RawFd> = fd.iter().map(|(f, _)| f.as_raw_fd()).collect();
        self.request(cmd::DMA_MAP, &[&body], &fds, self.reply_limit(0))?;
        Ok(())
    }

    /// Maps all of `mem` at `iova` (with its fd when `with_fd`, else
    /// reachable only through DMA messages) and serves the server's DMA
    /// messages for it from then on.
    pub fn dma_map_memory(
        &mut self,
        iova: u64,
        mem: &Arc<GuestMemory>,
        with_fd: bool,
        flags: u32,
    ) -> Result<()> {
        let len = mem.len() as u64;
        let mut staged = self.space.clone();
        staged
            .insert(iova, len, mem.clone(), 0)
            .map_err(|_| ClientError::InvalidArgument("overlaps a mapped range".into()))?;
        let fd = with_fd.then(|| (mem.fd(), 0));
        self.dma_map(iova, len, fd, flags)?;
        self.space = staged;
        Ok(())
    }

    /// `DMA_UNMAP` with `flags` (0 or `DMA_UNMAP_ALL`); forgets the client
    /// memory of the range on success.
    pub fn dma_unmap(&mut self, iova: u64, size: u64, flags: u32) -> Result<()> {
        let mut body = Vec::with_capacity(DMA_UNMAP_SIZE);
        body.put_u32(DMA_UNMAP_SIZE as u32);
        body.put_u32(flags);
        body.put_u64(iova);
        body.put_u64(size);
        let rep = self.request(cmd::DMA_UNMAP, &[&body], &[], self.reply_limit(0))?;
        if rep.body.get(8..DMA_UNMAP_SIZE) != body.get(8..DMA_UNMAP_SIZE) {
            return proto("DMA_UNMAP reply does not echo the request");
        }
        if flags & DMA_UNMAP_ALL != 0 {
            self.space.clear();
        } else {
            self.space.remove(iova, size);
        }
        Ok(())
    }

    /// `DMA_UNMAP` of every mapping.
    pub fn dma_unmap_all(&mut self) -> Result<()> {
        self.dma_unmap(0, 0, DMA_UNMAP_ALL)
    }

    /// `DMA_UNMAP` with `GET_DIRTY_BITMAP`: unmaps and returns the region's
    /// dirty bitmap at `pgsize` granularity.
    pub fn dma_unmap_dirty(&mut self, iova: u64, size: u64, pgsize: u64) -> Result<Vec<u8>> {
        let bm = dirty_bitmap_size(size, pgsize)
            .map_err(|_| ClientError::InvalidArgument("bad bitmap geometry".into()))?;
        let bm = usize::try_from(bm)
            .map_err(|_| ClientError::InvalidArgument("bitmap too large".into()))?;
        let total = DMA_UNMAP_SIZE + BITMAP_HEADER_SIZE + bm;
        let argsz = u32::try_from(total)
            .map_err(|_| ClientError::InvalidArgument("bitmap too large".into()))?;
        let mut body = Vec::with_capacity(DMA_UNMAP_SIZE + BITMAP_HEADER_SIZE);
        body.put_u32(argsz);
        body.put_u32(DMA_UNMAP_GET_DIRTY_BITMAP);
        body.put_u64(iova);
        body.put_u64(size);
        body.put_u64(pgsize);
        body.put_u64(bm as u64);
        let rep = self.request(cmd::DMA_UNMAP, &[&body], &[], total)?;
        if rep.body.len() != total
            || rep
                .body
                .get(..DMA_UNMAP_SIZE + BITMAP_HEADER_SIZE)
                .map(|h| &h[8..])
                != Some(&body[8..])
        {
            return proto("DMA_UNMAP dirty reply has the wrong shape");
        }
        self.space.remove(iova, size);
        Ok(rep.body[DMA_UNMAP_SIZE + BITMAP_HEADER_SIZE..].to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::tests::{fake_server, recv};
    use crate::protocol::{flags, Header};

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run sendmsg/recvmsg with fds")]
    fn serves_dma_requests_while_waiting_for_a_reply() {
        let (mut c, t) = fake_server(|conn| {
            let (h, body) = recv(&conn);
            assert_eq!(h.cmd, cmd::REGION_WRITE);
            // Ask the client to read 4 bytes at 0x1002, then to write.
            let mut q = Vec::new();
            q.put_u64(0x1002);
            q.put_u64(4);
            let rh = Header {
                msg_id: 100,
                cmd: cmd::DMA_READ,
                msg_size: 32,
                flags: 0,
                error_no: 0,
            };
            conn.send(&rh, &[&q], &[]).unwrap();
            let (a, data) = recv(&conn);
            assert_eq!((a.msg_id, a.msg_type()), (100, flags::TYPE_REPLY));
            assert_eq!(&data[16..], b"cdef");
            let mut w = Vec::new();
            w.put_u64(0x1000);
            w.put_u64(2);
            w.extend_from_slice(b"XY");
            let wh = Header {
                msg_id: 101,
                cmd: cmd::DMA_WRITE,
                msg_size: 34,
                flags: 0,
                error_no: 0,
            };
            conn.send(&wh, &[&w], &[]).unwrap();
            let (a, data) = recv(&conn);
            assert_eq!((a.msg_id, a.flags & flags::ERROR, data.len()), (101, 0, 16));
            // Outside the memory: an error reply.
            let mut q = Vec::new();
            q.put_u64(0x9000);
            q.put_u64(4);
            let rh = Header {
                msg_id: 102,
                cmd: cmd::DMA_READ,
                msg_size: 32,
                flags: 0,
                error_no: 0,
            };
            conn.send(&rh, &[&q], &[]).unwrap();
            let (a, _) = recv(&conn);
            assert_eq!(a.error_no, libc::EFAULT as u32);
            conn.send(&h.reply(16, 0), &[&body[..16]], &[]).unwrap();
            let _ = conn.recv_header(false);
        });
        let mem = Arc::new(GuestMemory::new(4096).unwrap());
        mem.write(0, b"abcdefgh").unwrap();
        c.dma_space_mut()
            .insert(0x1000, 4096, mem.clone(), 0)
            .unwrap();
        c.region_write(0, 0, b"go").unwrap();
        assert_eq!(mem.read_vec(0, 4).unwrap(), b"XYcd");
        assert_eq!(c.dma_requests_served(), 3);
        drop(c);
        t.join().unwrap();
    }
}
