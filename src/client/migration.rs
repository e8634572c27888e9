//! Migration: `DEVICE_FEATURE` (migration state, dirty-page logging) and
//! `MIG_DATA_READ`/`MIG_DATA_WRITE`.

use crate::device::migration::{
    dirty_bitmap_size, DEVICE_FEATURE_HDR_SIZE, MIG_DATA_HDR_SIZE,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET,
};
use crate::protocol::{cmd, Wire, WireOut};

use super::*;

impl Client {
    // ---- migration ----------------------------------------------------------------

    /// `DEVICE_FEATURE` with an explicit `argsz`; returns the whole reply
    /// body (its 8-byte `argsz`/`flags` header included).
    pub fn device_feature_raw(
        &mut self,
        argsz: u32,
        feature_flags: u32,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let mut head = Vec::with_capacity(DEVICE_FEATURE_HDR_SIZE);
        head.put_u32(argsz);
        head.put_u32(feature_flags);
        let limit = (argsz as usize).max(DEVICE_FEATURE_HDR_SIZE + data.len());
        let rep = self.request(cmd::DEVICE_FEATURE, &[&head, data], &[], limit)?;
        if rep.body.len() < DEVICE_FEATURE_HDR_SIZE {
            return Err(short("DEVICE_FEATURE"));
        }
        Ok(rep.body)
    }

    /// `DEVICE_FEATURE` with `flags` (operation | feature index) and `data`;
    /// returns the reply's data (after its 8-byte header). `argsz` covers the
    /// request and at least 8 bytes of reply data.
    pub fn device_feature(&mut self, feature_flags: u32, data: &[u8]) -> Result<Vec<u8>> {
        let argsz = DEVICE_FEATURE_HDR_SIZE + data.len().max(8);
        let argsz = u32::try_from(argsz)
            .map_err(|_| ClientError::InvalidArgument("data too large".into()))?;
        let mut b = self.device_feature_raw(argsz, feature_flags, data)?;
        Ok(b.split_off(DEVICE_FEATURE_HDR_SIZE))
    }

    /// The device's migration capability flags (`VFIO_MIGRATION_*`).
    pub fn migration_flags(&mut self) -> Result<u64> {
        let d =
            self.device_feature(VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION, &[])?;
        d[..].u64_at(0).map_err(|_| short("migration flags"))
    }

    /// The device's migration state (`VFIO_USER_DEVICE_STATE_*`).
    pub fn mig_state(&mut self) -> Result<u32> {
        let d = self.device_feature(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &[],
        )?;
        d[..].u32_at(0).map_err(|_| short("migration state"))
    }

    /// Moves the device to migration state `state`.
    pub fn set_mig_state(&mut self, state: u32) -> Result<()> {
        let mut data = Vec::with_capacity(8);
        data.put_u32(state);
        data.put_u32(0);
        self.device_feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &data,
        )?;
        Ok(())
    }

    /// `MIG_DATA_READ` of at most `max` bytes (capped by the negotiated
    /// transfer sizes); an empty result means the device has no more data.
    pub fn mig_data_read(&mut self, max: usize) -> Result<Vec<u8>> {
        let size = max
            .min(self.opts.max_data_xfer_size)
            .min(self.caps.max_data_xfer_size);
        let size32 = u32::try_from(size)
            .map_err(|_| ClientError::InvalidArgument("size too large".into()))?;
        let mut req = Vec::with_capacity(MIG_DATA_HDR_SIZE);
        req.put_u32(size32.saturating_add(MIG_DATA_HDR_SIZE as u32));
        req.put_u32(size32);
        let rep = self.request(cmd::MIG_DATA_READ, &[&req], &[], MIG_DATA_HDR_SIZE + size)?;
        let b = &rep.body[..];
        let n = b.u32_at(4).map_err(|_| short("MIG_DATA_READ"))? as usize;
        if n > size {
            return proto(format!("MIG_DATA_READ returned {n} bytes for {size} asked"));
        }
        let data = b
            .get(MIG_DATA_HDR_SIZE..MIG_DATA_HDR_SIZE + n)
            .ok_or_else(|| short("MIG_DATA_READ"))?;
        Ok(data.to_vec())
    }

    /// Reads migration data in `chunk`-sized requests until the device has
    /// no more.
    pub fn mig_data_read_all(&mut self, chunk: usize) -> Result<Vec<u8>> {
        if chunk == 0 {
            return invalid("zero chunk");
        }
        let mut all = Vec::new();
        loop {
            let d = self.mig_data_read(chunk)?;
            if d.is_empty() {
                return Ok(all);
            }
            all.extend_from_slice(&d);
        }
    }

    /// `MIG_DATA_WRITE` of `data`, split by the smaller of the two
    /// negotiated transfer sizes (servers check migration data against the
    /// client's `max_data_xfer_size`, as upstream does) and by our
    /// `max_send_data`.
    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<()> {
        let chunk = self.send_chunk().min(self.opts.max_data_xfer_size).max(1);
        for part in data.chunks(chunk) {
            let n = u32::try_from(part.len())
                .map_err(|_| ClientError::InvalidArgument("chunk too large".into()))?;
            let mut req = Vec::with_capacity(MIG_DATA_HDR_SIZE);
            req.put_u32(n.saturating_add(MIG_DATA_HDR_SIZE as u32));
            req.put_u32(n);
            self.request(cmd::MIG_DATA_WRITE, &[&req, part], &[], self.reply_limit(0))?;
        }
        Ok(())
    }

    /// Starts dirty-page logging at `page_size` over `ranges` `(iova, len)`.
    pub fn dma_logging_start(&mut self, page_size: u64, ranges: &[(u64, u64)]) -> Result<()> {
        let n = u32::try_from(ranges.len())
            .map_err(|_| ClientError::InvalidArgument("too many ranges".into()))?;
        let mut data = Vec::with_capacity(16 + ranges.len() * 16);
        data.put_u64(page_size);
        data.put_u32(n);
        data.put_u32(0);
        for &(iova, len) in ranges {
            data.put_u64(iova);
            data.put_u64(len);
        }
        self.device_feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            &data,
        )?;
        Ok(())
    }

    /// Stops dirty-page logging.
    pub fn dma_logging_stop(&mut self) -> Result<()> {
        self.device_feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
            &[],
        )?;
        Ok(())
    }

    /// Reports (and clears) the dirty bitmap of `[iova, iova + len)` at
    /// `page_size` granularity: one bit per page, in 64-bit words.
    pub fn dma_logging_report(&mut self, iova: u64, len: u64, page_size: u64) -> Result<Vec<u8>> {
        let bm = dirty_bitmap_size(len, page_size)
            .map_err(|_| ClientError::InvalidArgument("bad bitmap geometry".into()))?;
        let total = u64::try_from(DEVICE_FEATURE_HDR_SIZE + 24)
            .ok()
            .and_then(|h| h.checked_add(bm))
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| ClientError::InvalidArgument("bitmap too large".into()))?;
        let mut data = Vec::with_capacity(24);
        data.put_u64(iova);
        data.put_u64(len);
        data.put_u64(page_size);
        let b = self.device_feature_raw(
            total,
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            &data,
        )?;
        let start = DEVICE_FEATURE_HDR_SIZE + 24;
        if b.len() != total as usize || b.get(DEVICE_FEATURE_HDR_SIZE..start) != Some(&data[..]) {
            return proto("DMA_LOGGING_REPORT reply has the wrong shape");
        }
        Ok(b[start..].to_vec())
    }
}
