//! Device and region information, region access (`REGION_READ`/`WRITE`,
//! `REGION_WRITE_MULTI`) and device reset.

use std::os::fd::OwnedFd;

use crate::protocol::{
    cmd, Wire, WireOut, DEVICE_INFO_SIZE, REGION_ACCESS_SIZE, REGION_INFO_CAP_SPARSE_MMAP,
    REGION_INFO_FLAG_CAPS, REGION_INFO_SIZE, REGION_IO_FDS_SIZE, SPARSE_MMAP_AREA_SIZE,
    SPARSE_MMAP_HDR_SIZE, SUB_REGION_IOEVENTFD_SIZE, WRITE_MULTI_DATA_MAX, WRITE_MULTI_ENTRY_SIZE,
    WRITE_MULTI_MAX,
};

use super::*;

/// `DEVICE_GET_INFO` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size of the reply.
    pub argsz: u32,
    /// `DEVICE_FLAGS_*` bits (PCI, reset supported).
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of interrupt indexes.
    pub num_irqs: u32,
}

/// `DEVICE_GET_REGION_INFO` reply, with its sparse-mmap capability and fd.
#[derive(Debug)]
pub struct RegionInfo {
    /// The size the server says the full reply needs.
    pub argsz: u32,
    /// `REGION_INFO_FLAG_*` bits.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability in the reply, 0 for none.
    pub cap_offset: u32,
    /// Region size in bytes.
    pub size: u64,
    /// Offset to map the region at in the fd.
    pub offset: u64,
    /// Mappable areas `(offset, size)` of the sparse-mmap capability, when
    /// the reply carried one.
    pub sparse_mmap: Option<Vec<(u64, u64)>>,
    /// The fd passed with the reply (the region's backing file).
    pub fd: Option<OwnedFd>,
}

/// One ioeventfd of a `DEVICE_GET_REGION_IO_FDS` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoEventFdInfo {
    /// Offset in the region of the watched access.
    pub gpa_offset: u64,
    /// Size of the watched access.
    pub size: u64,
    /// Index into [`RegionIoFds::fds`].
    pub fd_index: u32,
    /// `IO_FD_TYPE_IOEVENTFD` or `IO_FD_TYPE_IOEVENTFD_SHADOW`.
    pub kind: u32,
    /// Data-match flags.
    pub flags: u32,
    /// Index of the shadow memory fd, for shadow ioeventfds.
    pub shadow_fd_index: u32,
    /// Offset in the shadow memory.
    pub shadow_offset: u64,
    /// Value matched when data match is on.
    pub datamatch: u64,
}

/// `DEVICE_GET_REGION_IO_FDS` reply.
#[derive(Debug)]
pub struct RegionIoFds {
    /// The size the server says the full reply needs.
    pub argsz: u32,
    /// Region index.
    pub index: u32,
    /// The ioeventfds.
    pub entries: Vec<IoEventFdInfo>,
    /// The fds passed with the reply.
    pub fds: Vec<OwnedFd>,
}

impl Client {
    // ---- device information -------------------------------------------------

    /// `DEVICE_GET_INFO`.
    pub fn device_info(&mut self) -> Result<DeviceInfo> {
        let mut req = Vec::with_capacity(DEVICE_INFO_SIZE);
        req.put_u32(DEVICE_INFO_SIZE as u32);
        req.put_u32(0);
        req.put_u32(0);
        req.put_u32(0);
        let rep = self.request(cmd::DEVICE_GET_INFO, &[&req], &[], DEVICE_INFO_SIZE)?;
        let b = &rep.body[..];
        let f = |o| b.u32_at(o).map_err(|_| short("DEVICE_GET_INFO"));
        Ok(DeviceInfo {
            argsz: f(0)?,
            flags: f(4)?,
            num_regions: f(8)?,
            num_irqs: f(12)?,
        })
    }

    /// `DEVICE_GET_REGION_INFO`, asking again with a larger `argsz` when the
    /// server needs one for the capabilities.
    pub fn region_info(&mut self, index: u32) -> Result<RegionInfo> {
        let mut argsz = REGION_INFO_SIZE as u32;
        for _ in 0..3 {
            let info = self.region_info_argsz(index, argsz)?;
            if info.argsz <= argsz {
                return Ok(info);
            }
            if info.argsz > MAX_INFO_ARGSZ {
                return proto(format!("region info argsz {} is unreasonable", info.argsz));
            }
            argsz = info.argsz;
        }
        proto("server keeps asking for a larger region info argsz")
    }

    /// `DEVICE_GET_REGION_INFO` with the given `argsz`, parsed without
    /// asking again.
    pub fn region_info_argsz(&mut self, index: u32, argsz: u32) -> Result<RegionInfo> {
        let mut req = Vec::with_capacity(REGION_INFO_SIZE);
        req.put_u32(argsz);
        req.put_u32(0);
        req.put_u32(index);
        req.put_u32(0);
        req.put_u64(0);
        req.put_u64(0);
        let limit = (argsz as usize).max(REGION_INFO_SIZE);
        let rep = self.request(cmd::DEVICE_GET_REGION_INFO, &[&req], &[], limit)?;
        let b = &rep.body[..];
        let f32 = |o| b.u32_at(o).map_err(|_| short("DEVICE_GET_REGION_INFO"));
        let f64 = |o| b.u64_at(o).map_err(|_| short("DEVICE_GET_REGION_INFO"));
        let mut info = RegionInfo {
            argsz: f32(0)?,
            flags: f32(4)?,
            index: f32(8)?,
            cap_offset: f32(12)?,
            size: f64(16)?,
            offset: f64(24)?,
            sparse_mmap: None,
            fd: None,
        };
        if info.index != index {
            return proto(format!(
                "region info for index {} when {index} was asked",
                info.index
            ));
        }
        if info.flags & REGION_INFO_FLAG_CAPS != 0 && info.argsz <= argsz {
            info.sparse_mmap = parse_region_caps(b, info.cap_offset)?;
        }
        info.fd = rep.fds.into_iter().next();
        Ok(info)
    }

    /// `DEVICE_GET_REGION_IO_FDS`: the region's ioeventfds and their fds.
    pub fn region_io_fds(&mut self, index: u32) -> Result<RegionIoFds> {
        let first = self.region_io_fds_argsz(index, REGION_IO_FDS_SIZE as u32)?;
        if first.1 == 0 {
            return Ok(first.0);
        }
        let need = (first.1 as usize)
            .checked_mul(SUB_REGION_IOEVENTFD_SIZE)
            .and_then(|n| n.checked_add(REGION_IO_FDS_SIZE))
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n <= MAX_INFO_ARGSZ)
            .ok_or_else(|| {
                ClientError::Protocol(format!("{} ioeventfds is unreasonable", first.1))
            })?;
        let (r, count) = self.region_io_fds_argsz(index, need)?;
        if r.entries.len() != count as usize {
            return proto(format!(
                "io fds reply lists {} of {count} entries",
                r.entries.len()
            ));
        }
        Ok(r)
    }

    /// `DEVICE_GET_REGION_IO_FDS` with the given `argsz`; also returns the
    /// total count the server reported.
    pub fn region_io_fds_argsz(&mut self, index: u32, argsz: u32) -> Result<(RegionIoFds, u32)> {
        let mut req = Vec::with_capacity(REGION_IO_FDS_SIZE);
        req.put_u32(argsz);
        req.put_u32(0);
        req.put_u32(index);
        req.put_u32(0);
        let limit = (argsz as usize).max(REGION_IO_FDS_SIZE);
        let rep = self.request(cmd::DEVICE_GET_REGION_IO_FDS, &[&req], &[], limit)?;
        let b = &rep.body[..];
        let f32 = |o| b.u32_at(o).map_err(|_| short("DEVICE_GET_REGION_IO_FDS"));
        let rargsz = f32(0)?;
        let rindex = f32(8)?;
        let count = f32(12)?;
        if rindex != index {
            return proto(format!("io fds for index {rindex} when {index} was asked"));
        }
        let rest = b.get(REGION_IO_FDS_SIZE..).unwrap_or(&[]);
        let mut entries = Vec::new();
        if !rest.is_empty() {
            if rest.len() % SUB_REGION_IOEVENTFD_SIZE != 0
                || rest.len() / SUB_REGION_IOEVENTFD_SIZE != count as usize
            {
                return proto(format!(
                    "{} bytes of ioeventfd entries for a count of {count}",
                    rest.len()
                ));
            }
            for e in rest.chunks_exact(SUB_REGION_IOEVENTFD_SIZE) {
                let g32 = |o| e.u32_at(o).map_err(|_| short("ioeventfd entry"));
                let g64 = |o| e.u64_at(o).map_err(|_| short("ioeventfd entry"));
                entries.push(IoEventFdInfo {
                    gpa_offset: g64(0)?,
                    size: g64(8)?,
                    fd_index: g32(16)?,
                    kind: g32(20)?,
                    flags: g32(24)?,
                    shadow_fd_index: g32(28)?,
                    shadow_offset: g64(32)?,
                    datamatch: g64(40)?,
                });
            }
        }
        Ok((
            RegionIoFds {
                argsz: rargsz,
                index,
                entries,
                fds: rep.fds,
            },
            count,
        ))
    }

    // ---- region access --------------------------------------------------------

    pub(super) fn xfer_chunk(&self) -> usize {
        self.caps.max_data_xfer_size.max(1)
    }

    /// Most data bytes in one request we send: the server's limit, and
    /// what arrives whole at a server reading it with one `recv()`.
    pub(super) fn send_chunk(&self) -> usize {
        self.xfer_chunk().min(self.opts.max_send_data).max(1)
    }

    pub(super) fn region_access_head(index: u32, offset: u64, count: usize) -> Result<Vec<u8>> {
        let count = u32::try_from(count)
            .map_err(|_| ClientError::InvalidArgument("access too large".into()))?;
        let mut h = Vec::with_capacity(REGION_ACCESS_SIZE);
        h.put_u64(offset);
        h.put_u32(index);
        h.put_u32(count);
        Ok(h)
    }

    /// `REGION_READ` of `len` bytes at `offset`, split by the server's
    /// `max_data_xfer_size`. A zero length sends nothing.
    pub fn region_read(&mut self, index: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        let chunk = self.xfer_chunk();
        while out.len() < len {
            let n = (len - out.len()).min(chunk);
            let off = offset
                .checked_add(out.len() as u64)
                .ok_or_else(|| ClientError::InvalidArgument("offset overflows".into()))?;
            let head = Client::region_access_head(index, off, n)?;
            let rep = self.request(cmd::REGION_READ, &[&head], &[], REGION_ACCESS_SIZE + n)?;
            let b = &rep.body[..];
            let got_off = b.u64_at(0).map_err(|_| short("REGION_READ"))?;
            let got_idx = b.u32_at(8).map_err(|_| short("REGION_READ"))?;
            let got_n = b.u32_at(12).map_err(|_| short("REGION_READ"))? as usize;
            if got_off != off || got_idx != index || got_n != n || b.len() != REGION_ACCESS_SIZE + n
            {
                return proto(format!(
                    "REGION_READ reply ({got_off:#x}, {got_idx}, {got_n}, {} bytes) for ({off:#x}, {index}, {n})",
                    b.len()
                ));
            }
            out.extend_from_slice(&b[REGION_ACCESS_SIZE..]);
        }
        Ok(out)
    }

    /// `REGION_WRITE` of `data` at `offset`, split by the server's
    /// `max_data_xfer_size` and our `max_send_data`. Empty data sends
    /// nothing.
    pub fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.region_write_impl(index, offset, data, false)
    }

    /// `REGION_WRITE` with `NO_REPLY`: returns once the request is sent.
    pub fn region_write_posted(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.region_write_impl(index, offset, data, true)
    }

    pub(super) fn region_write_impl(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
        posted: bool,
    ) -> Result<()> {
        let chunk = self.send_chunk();
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(chunk);
            let off = offset
                .checked_add(done as u64)
                .ok_or_else(|| ClientError::InvalidArgument("offset overflows".into()))?;
            let head = Client::region_access_head(index, off, n)?;
            let part = &data[done..done + n];
            if posted {
                self.post(cmd::REGION_WRITE, &[&head, part], &[])?;
            } else {
                let rep =
                    self.request(cmd::REGION_WRITE, &[&head, part], &[], REGION_ACCESS_SIZE)?;
                let b = &rep.body[..];
                let ok = b.u64_at(0).ok() == Some(off)
                    && b.u32_at(8).ok() == Some(index)
                    && b.u32_at(12).ok() == Some(n as u32);
                if !ok {
                    return proto("REGION_WRITE reply does not echo the request");
                }
            }
            done += n;
        }
        Ok(())
    }

    /// `REGION_WRITE_MULTI`: several small writes `(index, offset, data)` in
    /// one message (split every `WRITE_MULTI_MAX` entries). Each data must be
    /// at most 8 bytes. Needs the server's `write_multiple`.
    pub fn region_write_multi(&mut self, writes: &[(u32, u64, &[u8])]) -> Result<()> {
        if !self.caps.write_multiple {
            return Err(ClientError::Unsupported("write_multiple".into()));
        }
        if writes.is_empty() {
            return invalid("no writes");
        }
        for batch in writes.chunks(WRITE_MULTI_MAX) {
            let mut body = Vec::with_capacity(8 + batch.len() * WRITE_MULTI_ENTRY_SIZE);
            body.put_u64(batch.len() as u64);
            for (index, offset, data) in batch {
                if data.len() > WRITE_MULTI_DATA_MAX {
                    return invalid(format!(
                        "write of {} bytes in REGION_WRITE_MULTI",
                        data.len()
                    ));
                }
                body.put_u64(*offset);
                body.put_u32(*index);
                body.put_u32(data.len() as u32);
                let mut d = [0u8; WRITE_MULTI_DATA_MAX];
                d[..data.len()].copy_from_slice(data);
                body.extend_from_slice(&d);
            }
            self.request(cmd::REGION_WRITE_MULTI, &[&body], &[], self.reply_limit(0))?;
        }
        Ok(())
    }

    /// `DEVICE_RESET`.
    pub fn reset(&mut self) -> Result<()> {
        self.request(cmd::DEVICE_RESET, &[], &[], self.reply_limit(0))?;
        Ok(())
    }
}

/// Walks the capability chain of a region-info reply; returns the sparse
/// mmap areas if the chain has that capability.
pub(super) fn parse_region_caps(b: &[u8], first: u32) -> Result<Option<Vec<(u64, u64)>>> {
    let mut off = first as usize;
    let mut areas = None;
    // Each capability must lie after the previous one, which bounds the walk.
    let mut min = REGION_INFO_SIZE;
    while off != 0 {
        if off < min {
            return proto(format!("capability at {off} overlaps what precedes it"));
        }
        let id = b.u16_at(off).map_err(|_| short("region capability"))?;
        let next = b.u32_at(off + 4).map_err(|_| short("region capability"))? as usize;
        if id == REGION_INFO_CAP_SPARSE_MMAP {
            let nr = b
                .u32_at(off + 8)
                .map_err(|_| short("sparse mmap capability"))? as usize;
            let mut v = Vec::new();
            for i in 0..nr {
                let a = i
                    .checked_mul(SPARSE_MMAP_AREA_SIZE)
                    .and_then(|x| x.checked_add(off + SPARSE_MMAP_HDR_SIZE))
                    .ok_or_else(|| short("sparse mmap capability"))?;
                let o = b.u64_at(a).map_err(|_| short("sparse mmap area"))?;
                let s = b.u64_at(a + 8).map_err(|_| short("sparse mmap area"))?;
                v.push((o, s));
            }
            areas = Some(v);
        }
        min = off + 8;
        off = next;
    }
    Ok(areas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_caps_walk_is_bounded() {
        let mut b = vec![0u8; 32];
        b.put_u16(REGION_INFO_CAP_SPARSE_MMAP);
        b.put_u16(1);
        b.put_u32(0);
        b.put_u32(1);
        b.put_u32(0);
        b.put_u64(0x1000);
        b.put_u64(0x2000);
        assert_eq!(
            parse_region_caps(&b, 32).unwrap(),
            Some(vec![(0x1000, 0x2000)])
        );
        // A chain pointing back at itself is refused, not looped on.
        b[36..40].copy_from_slice(&32u32.to_le_bytes());
        assert!(parse_region_caps(&b, 32).is_err());
        // Areas running past the reply.
        let mut c = b.clone();
        c[36..40].copy_from_slice(&0u32.to_le_bytes());
        c[40..44].copy_from_slice(&9u32.to_le_bytes());
        assert!(parse_region_caps(&c, 32).is_err());
        assert!(parse_region_caps(&b, 8).is_err());
    }
}
