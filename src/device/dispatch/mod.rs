//! The request loop: attach and version negotiation, receiving and validating
//! requests, quiescing the device when a request needs it, dispatching to the
//! handlers, replying, and resetting the context when the client goes away.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use super::access_log::StrError;
use super::dma_msg::DmaCallbacks;
use super::migration::{DirtyLogging, MigrationCallbacks};
use super::{irq, log_level as lv, region, ClientLimits, Context, DmaInfo, DmaSg, ResetType};
use crate::error::{Errno, Result};
use crate::protocol::caps::{self, ClientCaps, ServerCaps};
use crate::protocol::*;
use crate::transport::{socketpair, Conn};

mod dma_transfer;
mod region_access;

/// A request read from the client.
#[derive(Debug)]
pub struct Request {
    pub hdr: Header,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// An operation waiting for the device to finish quiescing.
#[derive(Debug, Default)]
pub enum Pending {
    #[default]
    None,
    /// A request to execute once quiesced.
    Msg(Request),
    /// A context reset (client gone) to finish once quiesced.
    CtxReset,
}

impl Pending {
    fn is_none(&self) -> bool {
        matches!(self, Pending::None)
    }
}

/// A handler's successful result.
#[derive(Default)]
pub struct Reply {
    pub body: Vec<u8>,
    /// fds to pass with the reply (not owned: they stay the device's).
    pub fds: Vec<RawFd>,
}

impl Reply {
    fn empty() -> Reply {
        Reply::default()
    }
    fn body(body: Vec<u8>) -> Reply {
        Reply {
            body,
            fds: Vec::new(),
        }
    }
}

impl Context {
    // ---- attach & negotiation -------------------------------------------

    /// Waits for (or, non-blocking, checks for) a client and negotiates the
    /// protocol version with it (`vfu_attach_ctx`).
    pub fn attach(&self) -> Result<()> {
        if self.conn.borrow().is_some() {
            return Err(Errno::EINVAL);
        }
        let conn = self.accept()?;
        let twin = self.negotiate(&conn)?;
        // A blocking context reads its socket from one loop and never asks
        // the caller to poll it, so it may read ahead: a small request then
        // costs one recvmsg instead of two. Non-blocking contexts keep exact
        // reads, so that poll(2) on the socket sees every pending request.
        if !self.is_nonblocking() {
            conn.set_read_ahead(true);
        }
        // The twin socket gets the stall rules of the main one: a client
        // that does not read or answer on it is given up on too.
        let twin = twin
            .map(|fd| Conn::with_stall_timeout(fd, self.client_timeout()))
            .transpose()?;
        *self.conn.borrow_mut() = Some(Rc::new(conn));
        *self.twin.borrow_mut() = twin.map(Rc::new);
        Ok(())
    }

    fn negotiate(&self, conn: &Conn) -> Result<Option<OwnedFd>> {
        let rx = conn.recv_header(false)?;
        let hdr = rx.hdr;
        if hdr.msg_type() != flags::TYPE_COMMAND {
            return Err(Errno::EINVAL);
        }
        let len = match hdr.body_len() {
            Some(l) if hdr.msg_size as usize <= SERVER_MAX_MSG_SIZE => l,
            _ => return Err(Errno::EINVAL),
        };
        let mut body = vec![0u8; len];
        conn.recv_exact(&mut body)?;
        let parsed = self.check_version(&hdr, &body, rx.fds.len() + rx.fds_bad as usize);
        drop(rx.fds);
        let (minor, client) = match parsed {
            Ok(v) => v,
            Err(e) => {
                self.logf(lv::ERR, format_args!("version negotiation failed: {e}"));
                let _ = conn.send(&hdr.reply(0, e.0), &[], &[]);
                return Err(e);
            }
        };
        let twin = if client.twin_socket && client.max_msg_fds > 0 {
            Some(socketpair()?)
        } else {
            None
        };
        let server = ServerCaps {
            max_msg_fds: SERVER_MAX_FDS,
            max_data_xfer_size: SERVER_MAX_DATA_XFER_SIZE,
            migration_pgsize: self.migration.get().map(|m| m.pgsize() as u64),
            twin_socket_fd_index: twin.as_ref().map(|_| 0),
            pgsizes: page_size(),
            max_dma_maps: if self.dma().is_some() {
                self.dma_max_regions.get()
            } else {
                0
            },
            write_multiple: true,
        };
        let mut json = caps::format_server(&server).into_bytes();
        json.push(0);
        let mut v = Vec::with_capacity(4);
        v.put_u16(VERSION_MAJOR);
        v.put_u16(minor);
        let fds: Vec<RawFd> = twin
            .iter()
            .map(|(client_end, _)| client_end.as_raw_fd())
            .collect();
        conn.send(&hdr.reply(v.len() + json.len(), 0), &[&v, &json], &fds)?;
        self.client.set(ClientLimits::from(&client));
        Ok(twin.map(|(_, server_end)| server_end))
    }

    fn check_version(&self, hdr: &Header, body: &[u8], nr_fds: usize) -> Result<(u16, ClientCaps)> {
        if hdr.cmd != cmd::VERSION || nr_fds != 0 || body.len() < 4 {
            return Err(Errno::EINVAL);
        }
        let major = body.u16_at(0)?;
        let minor = body.u16_at(2)?;
        if major != VERSION_MAJOR {
            return Err(Errno::EINVAL);
        }
        let mut client = ClientCaps::default();
        if body.len() > 4 {
            let json = &body[4..];
            if json.last() != Some(&0) {
                return Err(Errno::EINVAL);
            }
            // The string ends at its first NUL, as a C string would.
            let end = json.iter().position(|&b| b == 0).unwrap_or(json.len());
            client = caps::parse_client(&json[..end])?;
            if let (Some(m), Some(p)) = (self.migration.get(), client.migration_pgsize) {
                m.set_pgsize(usize::try_from(p).map_err(|_| Errno::EINVAL)?)?;
            }
        }
        Ok((minor.min(VERSION_MINOR), client))
    }

    // ---- the loop --------------------------------------------------------

    /// Processes requests (`vfu_run_ctx`). Non-blocking contexts handle at
    /// most one request per call and return how many they handled; blocking
    /// ones loop until an error (`ENOTCONN` when the client goes away).
    /// `EBUSY` while the device has not finished quiescing.
    pub fn run(&self) -> Result<usize> {
        if !self.is_realized() {
            return Err(Errno::EINVAL);
        }
        let mut handled = 0;
        loop {
            if !self.pending.borrow().is_none() {
                return Err(Errno::EBUSY);
            }
            match self.get_request() {
                Ok(req) => {
                    let r = self.handle_request(req);
                    handled += 1;
                    self.quiesced.set(false);
                    r?;
                }
                Err(e) if e.0 == libc::ENOMSG || e.0 == libc::EAGAIN => {}
                Err(e) => return Err(e),
            }
            // Commands that arrived while the device waited for a DMA reply
            // are handled now: nothing on the socket would wake the caller
            // for them.
            if self.is_nonblocking() && self.deferred.borrow().is_empty() {
                return Ok(handled);
            }
        }
    }

    /// Reads the next request. `ENOMSG` means a bad request was already
    /// answered; `EAGAIN` that nothing was waiting.
    fn get_request(&self) -> Result<Request> {
        let deferred = self.deferred.borrow_mut().pop_front();
        let mut req = match deferred {
            Some(r) => r,
            None => {
                let Some(conn) = self.conn.borrow().clone() else {
                    // Upstream's wording, for scripts that grep for it.
                    self.logf(
                        lv::ERR,
                        format_args!("tran_sock_get_request_header: not connected"),
                    );
                    return Err(Errno::ENOTCONN);
                };
                match self.read_request(&conn) {
                    Ok(Some(r)) => r,
                    Ok(None) => return Err(Errno(libc::ENOMSG)),
                    Err(e) if e.0 == libc::ENOMSG || e.0 == libc::ECONNRESET => {
                        self.logf(
                            lv::DEBUG,
                            format_args!("failed to receive request header: {}", StrError(e)),
                        );
                        if e.0 == libc::ENOMSG {
                            self.logf(lv::INFO, format_args!("client disconnected"));
                        } else {
                            self.logf(lv::INFO, format_args!("client connection lost: {e}"));
                        }
                        self.reset_ctx()?;
                        return Err(Errno::ENOTCONN);
                    }
                    Err(e) => {
                        if e.0 != libc::EAGAIN {
                            self.logf(
                                lv::ERR,
                                format_args!("failed to receive request: {}", StrError(e)),
                            );
                        }
                        return Err(e);
                    }
                }
            }
        };
        if let Some(err) = self.precheck(&req) {
            self.send_reply(&req.hdr, &Err(err))?;
            return Err(Errno(libc::ENOMSG));
        }
        if self.command_needs_quiesce(&req) {
            let cb = self.cbs.borrow().quiesce.clone();
            if let Some(cb) = cb {
                match cb(self) {
                    Ok(()) => self.quiesced.set(true),
                    Err(e) if e == Errno::EBUSY => {
                        req.fds.shrink_to_fit();
                        *self.pending.borrow_mut() = Pending::Msg(req);
                        return Err(Errno::EBUSY);
                    }
                    Err(e) => {
                        self.send_reply(&req.hdr, &Err(e))?;
                        return Err(Errno(libc::ENOMSG));
                    }
                }
            }
        }
        Ok(req)
    }

    /// Reads one request off the socket. A request with a bad header is
    /// answered here (its body, when its size is sane, is read and dropped so
    /// that the stream stays in step) and reported as `None`. `ENOMSG` and
    /// `ECONNRESET` mean the client went away.
    fn read_request(&self, conn: &Conn) -> Result<Option<Request>> {
        let rx = conn.recv_header(self.is_nonblocking())?;
        let hdr = rx.hdr;
        let size = hdr.msg_size as usize;
        let sane = (HEADER_SIZE..=SERVER_MAX_MSG_SIZE).contains(&size);
        // The body goes into the context's spare buffer: no allocation per
        // message once it has grown to the working size.
        let mut body = std::mem::take(&mut *self.rx_spare.borrow_mut());
        let len = if sane { size - HEADER_SIZE } else { 0 };
        // Only bytes past the buffer's current length get zero-filled (the
        // receive below overwrites the rest): a stream of large messages of
        // one size (migration data) is not memset once per message.
        if body.len() > len {
            body.truncate(len);
        } else {
            body.resize(len, 0);
        }
        if len > 0 {
            conn.recv_exact(&mut body).map_err(|e| {
                if e.0 == libc::ENOMSG {
                    Errno(libc::ECONNRESET)
                } else {
                    e
                }
            })?;
        }
        let bad = hdr.msg_type() != flags::TYPE_COMMAND
            || !sane
            || (size == HEADER_SIZE && hdr.cmd != cmd::DEVICE_RESET)
            || rx.fds_bad;
        if bad {
            self.logf(
                lv::ERR,
                format_args!("msg{:#x}: bad header {:?}", hdr.msg_id, hdr),
            );
            drop(rx.fds);
            self.send_reply(&hdr, &Err(Errno::EINVAL))?;
            return Ok(None);
        }
        Ok(Some(Request {
            hdr,
            body,
            fds: rx.fds,
        }))
    }

    /// Checks that may refuse a request before any quiesce.
    fn precheck(&self, req: &Request) -> Option<Errno> {
        super::migration::command_allowed(self.migration.get(), req.hdr.cmd).err()
    }

    fn command_needs_quiesce(&self, req: &Request) -> bool {
        if self.cbs.borrow().quiesce.is_none() {
            return false;
        }
        match req.hdr.cmd {
            cmd::DMA_MAP | cmd::DMA_UNMAP => self.dma().is_some(),
            cmd::DEVICE_RESET => true,
            cmd::REGION_WRITE => {
                let (Ok(offset), Ok(idx)) = (req.body.u64_at(0), req.body.u32_at(8)) else {
                    return false;
                };
                idx as usize == region::CFG
                    && self.pci().is_some_and(|p| p.write_needs_quiesce(offset))
            }
            cmd::DEVICE_FEATURE => super::migration::feature_needs_quiesce(&req.body),
            _ => false,
        }
    }

    /// Executes a request and replies to it.
    fn handle_request(&self, mut req: Request) -> Result<()> {
        let res = self.exec(&mut req);
        if let Err(e) = &res {
            self.logf(
                lv::DEBUG,
                format_args!("msg{:#x}: cmd {} failed: {e}", req.hdr.msg_id, req.hdr.cmd),
            );
        }
        let sent = self.send_reply(&req.hdr, &res);
        // Keep both buffers for the next request; unused fds are closed
        // when `req` drops.
        *self.rx_spare.borrow_mut() = std::mem::take(&mut req.body);
        if let Ok(r) = res {
            // A handler that did not use the spare (an empty reply, say)
            // must not cost the next request its buffer.
            let mut spare = self.tx_spare.borrow_mut();
            if r.body.capacity() > spare.capacity() {
                *spare = r.body;
            }
        }
        sent
    }

    /// An empty reply buffer, reusing the spare one.
    fn reply_buf(&self) -> Vec<u8> {
        let mut b = std::mem::take(&mut *self.tx_spare.borrow_mut());
        b.clear();
        b
    }

    /// Sends the reply for `hdr` (unless the client asked for none). A client
    /// that went away resets the context and reports `ENOTCONN`.
    fn send_reply(&self, hdr: &Header, res: &Result<Reply>) -> Result<()> {
        if hdr.no_reply() {
            return Ok(());
        }
        let Some(conn) = self.conn.borrow().clone() else {
            return Err(Errno::ENOTCONN);
        };
        let sent = match res {
            Ok(r) => conn.send(&hdr.reply(r.body.len(), 0), &[&r.body], &r.fds),
            Err(e) => conn.send(&hdr.reply(0, e.0), &[], &[]),
        };
        if let Err(e) = sent {
            self.logf(lv::ERR, format_args!("failed to reply: {}", StrError(e)));
        }
        match sent {
            Ok(()) => Ok(()),
            // Like upstream, a reply that fails because the client went away
            // resets the context and is not itself an error: the next call
            // reports ENOTCONN.
            Err(e) if e.0 == libc::ECONNRESET || e.0 == libc::ENOMSG => self.reset_ctx(),
            Err(e) => Err(e),
        }
    }

    fn exec(&self, req: &mut Request) -> Result<Reply> {
        let body = &req.body[..];
        match req.hdr.cmd {
            cmd::DMA_MAP | cmd::DMA_UNMAP => {
                let Some(dma) = self.dma().cloned() else {
                    return Ok(Reply::empty());
                };
                let cbs = CtxDma::new(self);
                let out = if req.hdr.cmd == cmd::DMA_MAP {
                    super::dma_msg::handle_dma_map(&dma, &cbs, body, &mut req.fds)?
                } else {
                    super::dma_msg::handle_dma_unmap(&dma, &cbs, body, &mut req.fds)?
                };
                Ok(Reply::body(out))
            }
            cmd::DEVICE_GET_INFO => {
                if body.len() < DEVICE_INFO_SIZE || (body.u32_at(0)? as usize) < DEVICE_INFO_SIZE {
                    return Err(Errno::EINVAL);
                }
                let mut out = Vec::with_capacity(DEVICE_INFO_SIZE);
                out.put_u32(DEVICE_INFO_SIZE as u32);
                out.put_u32(DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET);
                out.put_u32(region::NUM_REGIONS as u32);
                out.put_u32(irq::NUM_IRQ_TYPES as u32);
                Ok(Reply::body(out))
            }
            cmd::DEVICE_GET_REGION_INFO => {
                let (body, fds) = region::get_region_info(&self.regions.borrow(), body)?;
                Ok(Reply { body, fds })
            }
            cmd::DEVICE_GET_REGION_IO_FDS => {
                let (body, fds) = region::get_region_io_fds(&self.regions.borrow(), body)?;
                Ok(Reply { body, fds })
            }
            cmd::DEVICE_GET_IRQ_INFO => {
                let irqs = self.irqs().ok_or(Errno::EINVAL)?;
                Ok(Reply::body(irqs.handle_get_info(body)?))
            }
            cmd::DEVICE_SET_IRQS => {
                let irqs = self.irqs().ok_or(Errno::EINVAL)?.clone();
                if let Some(ch) = irqs.handle_set(body, &mut req.fds)? {
                    let cb = self.cbs.borrow().irq_state[ch.index as usize].clone();
                    if let Some(cb) = cb {
                        cb(self, ch.start, ch.count, ch.mask);
                    }
                }
                Ok(Reply::empty())
            }
            cmd::REGION_READ | cmd::REGION_WRITE => {
                self.handle_region_access(req.hdr.cmd, &mut req.body)
            }
            cmd::REGION_WRITE_MULTI => self.handle_write_multi(&mut req.body),
            cmd::DEVICE_RESET => {
                self.logf(lv::INFO, format_args!("device reset by client"));
                self.call_reset(ResetType::Device)?;
                if let Some(m) = self.migration.get() {
                    m.reset();
                }
                Ok(Reply::empty())
            }
            cmd::DEVICE_FEATURE => {
                let dev = CtxMig(self);
                let log = CtxDirty(self);
                let out = super::migration::handle_device_feature(
                    self.migration.get(),
                    &dev,
                    &log,
                    body,
                )?;
                Ok(Reply::body(out))
            }
            cmd::MIG_DATA_READ => {
                let dev = CtxMig(self);
                // The spare reply buffer, as the last reply left it: no
                // allocation (and, for large chunks, no fresh pages to
                // fault in) per message, and no zero-fill of bytes the
                // device is about to write (the handler zeroes only what
                // the device leaves).
                let mut out = std::mem::take(&mut *self.tx_spare.borrow_mut());
                let max = self.client.get().max_data_xfer_size;
                if let Err(e) = super::migration::handle_mig_data_read(
                    self.migration.get(),
                    &dev,
                    body,
                    max,
                    &mut out,
                ) {
                    // Keep the buffer for the next request.
                    *self.tx_spare.borrow_mut() = out;
                    return Err(e);
                }
                Ok(Reply::body(out))
            }
            cmd::MIG_DATA_WRITE => {
                let dev = CtxMig(self);
                let max = self.client.get().max_data_xfer_size;
                let out =
                    super::migration::handle_mig_data_write(self.migration.get(), &dev, body, max)?;
                Ok(Reply::body(out))
            }
            _ => Err(Errno::EINVAL),
        }
    }

    // ---- reset & quiesce -------------------------------------------------

    pub(crate) fn call_reset(&self, why: ResetType) -> Result<()> {
        let cb = self.cbs.borrow().reset.clone();
        match cb {
            Some(cb) => cb(self, why),
            None => Ok(()),
        }
    }

    /// The client is gone: quiesce (possibly asynchronously), then forget
    /// everything about it.
    pub(crate) fn reset_ctx(&self) -> Result<()> {
        let cb = self.cbs.borrow().quiesce.clone();
        if let Some(cb) = cb {
            if self.pending.borrow().is_none() {
                if let Err(e) = cb(self) {
                    if e == Errno::EBUSY {
                        *self.pending.borrow_mut() = Pending::CtxReset;
                    }
                    return Err(e);
                }
            }
        }
        self.reset_ctx_quiesced(false);
        Ok(())
    }

    /// Forgets the client. `shutdown`: the context is being destroyed, so
    /// no client comes next and the migration state is left alone (the
    /// device gets no transition callbacks while it is torn down).
    fn reset_ctx_quiesced(&self, shutdown: bool) {
        if let Some(dma) = self.dma().cloned() {
            super::dma_msg::unmap_all(&dma, &CtxDma::new(self));
        }
        // Back to RUNNING first, so that the reset callback finds the device
        // in the state a new client expects.
        if let Some(m) = self.migration.get().filter(|_| !shutdown) {
            if let Err(e) = m.lost_connection(&CtxMig(self)) {
                self.logf(
                    lv::ERR,
                    format_args!(
                        "migration: returning to running after the client left failed: {}",
                        e
                    ),
                );
            }
        }
        let _ = self.call_reset(ResetType::LostConn);
        if let Some(irqs) = self.irqs() {
            irqs.reset();
        }
        self.deferred.borrow_mut().clear();
        *self.conn.borrow_mut() = None;
        *self.twin.borrow_mut() = None;
    }

    /// The device finished quiescing (`vfu_device_quiesced`): run what was
    /// waiting for it. With a non-zero `err` the waiting request is dropped.
    pub fn device_quiesced(&self, err: i32) -> Result<()> {
        if self.cbs.borrow().quiesce.is_none() || self.pending.borrow().is_none() {
            return Err(Errno::EINVAL);
        }
        self.quiesced.set(true);
        // Leave the pending state in place while the request runs, so that a
        // reset it triggers does not quiesce again.
        let pending = std::mem::replace(&mut *self.pending.borrow_mut(), Pending::CtxReset);
        let r = if err == 0 {
            match pending {
                Pending::Msg(req) => self.handle_request(req),
                Pending::CtxReset => {
                    self.reset_ctx_quiesced(false);
                    Ok(())
                }
                Pending::None => Ok(()),
            }
        } else {
            Ok(())
        };
        *self.pending.borrow_mut() = Pending::None;
        self.quiesced.set(false);
        r
    }
}

/// `vfu_destroy_ctx`'s teardown, run when the context drops.
pub(crate) fn destroy(ctx: &mut Context) {
    ctx.cbs.borrow_mut().quiesce = None;
    *ctx.pending.borrow_mut() = Pending::None;
    // Without a quiesce callback this is what reset_ctx would do.
    ctx.reset_ctx_quiesced(true);
}

fn page_size() -> u64 {
    let p = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(0);
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

// ---- adapters from the module traits to the context's callbacks -----------

struct CtxDma<'a> {
    ctx: &'a Context,
    reg: Option<super::DmaCb>,
    unreg: Option<super::DmaCb>,
}

impl<'a> CtxDma<'a> {
    fn new(ctx: &'a Context) -> Self {
        let c = ctx.cbs.borrow();
        CtxDma {
            ctx,
            reg: c.dma_register.clone(),
            unreg: c.dma_unregister.clone(),
        }
    }
}

impl DmaCallbacks for CtxDma<'_> {
    fn register(&self, info: &DmaInfo) {
        if let Some(cb) = &self.reg {
            cb(self.ctx, info);
        }
    }
    fn unregister(&self, info: &DmaInfo) {
        if let Some(cb) = &self.unreg {
            cb(self.ctx, info);
        }
    }
    fn has_register(&self) -> bool {
        self.reg.is_some()
    }
    fn has_unregister(&self) -> bool {
        self.unreg.is_some()
    }
}

struct CtxMig<'a>(&'a Context);

impl MigrationCallbacks for CtxMig<'_> {
    fn transition(&self, state: u32) -> Result<()> {
        let dev = self.0.cbs.borrow().migration.clone().ok_or(Errno::EINVAL)?;
        dev.transition(self.0, state)
    }
    fn read_data(&self, buf: &mut [u8]) -> Result<usize> {
        let dev = self.0.cbs.borrow().migration.clone().ok_or(Errno::EINVAL)?;
        dev.read_data(self.0, buf)
    }
    fn write_data(&self, buf: &[u8]) -> Result<usize> {
        let dev = self.0.cbs.borrow().migration.clone().ok_or(Errno::EINVAL)?;
        dev.write_data(self.0, buf)
    }
}

struct CtxDirty<'a>(&'a Context);

impl DirtyLogging for CtxDirty<'_> {
    fn start(&self, page_size: u64, ranges: &[(u64, u64)]) -> Result<()> {
        self.0
            .dma()
            .ok_or(Errno::EINVAL)?
            .logging_start(page_size, ranges)
    }
    fn stop(&self) -> Result<()> {
        self.0.dma().ok_or(Errno::EINVAL)?.logging_stop()
    }
    fn report(&self, iova: u64, len: u64, page_size: u64, bitmap: &mut [u8]) -> Result<()> {
        self.0
            .dma()
            .ok_or(Errno::EINVAL)?
            .logging_report(iova, len, page_size, bitmap)
    }
}
