//! Interrupts: `DEVICE_GET_IRQ_INFO` and `DEVICE_SET_IRQS`.

use std::os::fd::{AsFd, RawFd};

use crate::protocol::{
    cmd, Wire, WireOut, IRQ_INFO_SIZE, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
    IRQ_SET_SIZE,
};

use super::wire::raw_fds;
use super::*;

/// `DEVICE_GET_IRQ_INFO` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// `IRQ_INFO_*` bits.
    pub flags: u32,
    /// Interrupt index.
    pub index: u32,
    /// Number of vectors.
    pub count: u32,
}

impl Client {
    /// `DEVICE_GET_IRQ_INFO`.
    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfo> {
        let mut req = Vec::with_capacity(IRQ_INFO_SIZE);
        req.put_u32(IRQ_INFO_SIZE as u32);
        req.put_u32(0);
        req.put_u32(index);
        req.put_u32(0);
        let rep = self.request(cmd::DEVICE_GET_IRQ_INFO, &[&req], &[], IRQ_INFO_SIZE)?;
        let b = &rep.body[..];
        let f = |o| b.u32_at(o).map_err(|_| short("DEVICE_GET_IRQ_INFO"));
        let info = IrqInfo {
            flags: f(4)?,
            index: f(8)?,
            count: f(12)?,
        };
        if info.index != index {
            return proto(format!(
                "irq info for index {} when {index} was asked",
                info.index
            ));
        }
        Ok(info)
    }

    // ---- interrupts -------------------------------------------------------------

    /// `DEVICE_SET_IRQS` with raw fields and data; `argsz` is computed.
    pub fn set_irqs_raw(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        data: &[u8],
        fds: &[RawFd],
    ) -> Result<()> {
        let argsz = u32::try_from(IRQ_SET_SIZE + data.len())
            .map_err(|_| ClientError::InvalidArgument("data too large".into()))?;
        let mut body = Vec::with_capacity(IRQ_SET_SIZE + data.len());
        body.put_u32(argsz);
        body.put_u32(flags);
        body.put_u32(index);
        body.put_u32(start);
        body.put_u32(count);
        body.extend_from_slice(data);
        self.request(cmd::DEVICE_SET_IRQS, &[&body], fds, self.reply_limit(0))?;
        Ok(())
    }

    /// Hands eventfds for vectors `start..start + fds.len()` of `index` to
    /// the server (ACTION_TRIGGER, DATA_EVENTFD), in as many messages as the
    /// server's `max_msg_fds` requires.
    pub fn set_irqs<F: AsFd>(&mut self, index: u32, start: u32, eventfds: &[F]) -> Result<()> {
        if eventfds.is_empty() {
            return invalid("no eventfds (use set_irqs_none or irq_disable)");
        }
        let raw = raw_fds(eventfds);
        let per = self.caps.max_msg_fds.max(1);
        for (i, batch) in raw.chunks(per).enumerate() {
            let first = u32::try_from(i * per)
                .ok()
                .and_then(|o| start.checked_add(o))
                .ok_or_else(|| ClientError::InvalidArgument("vector range overflows".into()))?;
            self.set_irqs_raw(
                IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
                index,
                first,
                batch.len() as u32,
                &[],
                batch,
            )?;
        }
        Ok(())
    }

    /// ACTION_TRIGGER with DATA_NONE: `count` 0 (with `start` 0) disables
    /// every vector of `index`; otherwise the server signals the vectors.
    pub fn set_irqs_none(&mut self, index: u32, start: u32, count: u32) -> Result<()> {
        self.set_irqs_raw(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE,
            index,
            start,
            count,
            &[],
            &[],
        )
    }

    /// ACTION_TRIGGER with DATA_BOOL: the server signals the vectors whose
    /// flag is set.
    pub fn set_irqs_bool(&mut self, index: u32, start: u32, which: &[bool]) -> Result<()> {
        let data: Vec<u8> = which.iter().map(|&b| u8::from(b)).collect();
        let count = u32::try_from(data.len())
            .map_err(|_| ClientError::InvalidArgument("too many vectors".into()))?;
        self.set_irqs_raw(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_BOOL,
            index,
            start,
            count,
            &data,
            &[],
        )
    }

    /// Takes the eventfds of vectors `start..start + count` of `index` away
    /// (DATA_EVENTFD with no fds).
    pub fn irq_disable(&mut self, index: u32, start: u32, count: u32) -> Result<()> {
        self.set_irqs_raw(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
            index,
            start,
            count,
            &[],
            &[],
        )
    }

    /// Masks vectors `start..start + count` of `index`.
    pub fn irq_mask(&mut self, index: u32, start: u32, count: u32) -> Result<()> {
        self.set_irqs_raw(
            IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE,
            index,
            start,
            count,
            &[],
            &[],
        )
    }

    /// Unmasks vectors `start..start + count` of `index`.
    pub fn irq_unmask(&mut self, index: u32, start: u32, count: u32) -> Result<()> {
        self.set_irqs_raw(
            IRQ_SET_ACTION_UNMASK | IRQ_SET_DATA_NONE,
            index,
            start,
            count,
            &[],
            &[],
        )
    }
}
