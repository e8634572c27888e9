//! Region access requests: `VFIO_USER_REGION_READ` / `REGION_WRITE` and
//! `VFIO_USER_REGION_WRITE_MULTI`, and the region access the other
//! modules share (with its access log).

use super::*;

impl Context {
    pub(super) fn handle_region_access(&self, command: u16, body: &mut [u8]) -> Result<Reply> {
        if body.len() < REGION_ACCESS_SIZE {
            return Err(Errno::EINVAL);
        }
        let offset = body.u64_at(0)?;
        let idx = body.u32_at(8)?;
        let count = body.u32_at(12)? as usize;
        if count > SERVER_MAX_DATA_XFER_SIZE {
            return Err(Errno::EINVAL);
        }
        let is_write = command == cmd::REGION_WRITE;
        if is_write && body.len() - REGION_ACCESS_SIZE != count {
            return Err(Errno::EINVAL);
        }
        let size = self
            .regions
            .borrow()
            .get(idx as usize)
            .ok_or(Errno::EINVAL)?
            .size;
        if offset.saturating_add(count as u64) > size {
            return Err(Errno::EINVAL);
        }
        if crate::device::migration::device_is_stopped_and_copying(self.migration.get()) {
            return Err(Errno::EINVAL);
        }
        if count == 0 {
            return Ok(Reply::empty());
        }
        let mut out = self.reply_buf();
        out.extend_from_slice(&body[..REGION_ACCESS_SIZE]);
        let r = if is_write {
            // The device reads the data straight out of the request buffer.
            self.region_access(idx as usize, &mut body[REGION_ACCESS_SIZE..], offset, true)
        } else {
            out.resize(REGION_ACCESS_SIZE + count, 0);
            self.region_access(idx as usize, &mut out[REGION_ACCESS_SIZE..], offset, false)
        };
        if let Err(e) = r {
            // Keep the buffer for the next request.
            *self.tx_spare.borrow_mut() = out;
            return Err(e);
        }
        Ok(Reply::body(out))
    }

    /// Runs one region access through config-space emulation or the
    /// device's callback; anything short of the whole count is an error.
    /// At `LOG_DEBUG` every access is logged (see `access_log`); below it
    /// this costs one load and compare.
    pub(crate) fn region_access(
        &self,
        idx: usize,
        buf: &mut [u8],
        offset: u64,
        is_write: bool,
    ) -> Result<()> {
        let r = self.region_access_unlogged(idx, buf, offset, is_write);
        if self.log_level.get() >= lv::DEBUG {
            self.log_region_access(idx, buf, offset, is_write, &r);
        }
        r
    }

    fn region_access_unlogged(
        &self,
        idx: usize,
        buf: &mut [u8],
        offset: u64,
        is_write: bool,
    ) -> Result<()> {
        let (flags, cb) = {
            let regions = self.regions.borrow();
            let r = regions.get(idx).ok_or(Errno::EINVAL)?;
            (r.flags, r.cb.clone())
        };
        let n = if idx == region::CFG && flags & region::FLAG_ALWAYS_CB == 0 {
            let pci = self.pci().ok_or(Errno::EINVAL)?;
            let mut bars = [crate::device::pci::BarInfo::default(); region::ROM + 1];
            for (b, r) in bars.iter_mut().zip(self.regions.borrow().iter()) {
                *b = crate::device::pci::BarInfo {
                    size: r.size,
                    flags: r.flags,
                };
            }
            let mut delegate = |b: &mut [u8], off: u64, w: bool| -> Result<usize> {
                match &cb {
                    Some(cb) => cb(self, b, off, w),
                    None => Err(Errno::EINVAL),
                }
            };
            let has_cb = cb.is_some();
            let d: Option<&mut crate::device::pci::CfgCallback<'_>> =
                if has_cb { Some(&mut delegate) } else { None };
            let n = pci.access(buf, offset, is_write, d, false, &bars)?;
            if pci.take_flr_request() {
                self.call_reset(ResetType::PciFlr)?;
            }
            n
        } else {
            let cb = cb.ok_or(Errno::EINVAL)?;
            cb(self, buf, offset, is_write)?
        };
        if n != buf.len() {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    pub(super) fn handle_write_multi(&self, body: &mut [u8]) -> Result<Reply> {
        let n = body.u64_at(0)?;
        if n == 0 || n > WRITE_MULTI_MAX as u64 {
            return Err(Errno::EINVAL);
        }
        let n = n as usize;
        if body.len() < 8 + n * WRITE_MULTI_ENTRY_SIZE {
            return Err(Errno::EINVAL);
        }
        for i in 0..n {
            let e = &mut body[8 + i * WRITE_MULTI_ENTRY_SIZE..8 + (i + 1) * WRITE_MULTI_ENTRY_SIZE];
            let offset = e.u64_at(0)?;
            let idx = e.u32_at(8)?;
            let count = e.u32_at(12)? as usize;
            if count > WRITE_MULTI_DATA_MAX {
                return Err(Errno::EINVAL);
            }
            let size = self
                .regions
                .borrow()
                .get(idx as usize)
                .ok_or(Errno::EINVAL)?
                .size;
            if offset.saturating_add(count as u64) > size {
                return Err(Errno::EINVAL);
            }
            self.region_access(idx as usize, &mut e[16..16 + count], offset, true)?;
        }
        Ok(Reply::empty())
    }
}
