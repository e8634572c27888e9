//! The device context: everything a vfio-user server knows about one device
//! and its client, and the safe Rust API to set it up and run it.
//!
//! A [`Context`] is created for one socket path, configured (regions, PCI
//! config space, IRQ counts, DMA, migration, callbacks), realized, then
//! attached to a client and run. Setup and running happen on one thread; the
//! handles returned by [`Context::dma`] and [`Context::irqs`] may be used from
//! any thread.
//!
//! Callbacks receive `&Context` and may call back into it (upstream's C API
//! allows a region callback to trigger an IRQ or read config space), so the
//! context never holds a borrow of its own state while a callback runs.

pub mod dispatch;
pub mod dma;
pub mod dma_msg;
pub mod irq;
pub mod migration;
pub mod pci;
pub mod pci_caps;
pub mod region;

use std::cell::{Cell, OnceCell, RefCell};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::{Arc, OnceLock};

use crate::error::{Errno, Result};
use crate::protocol::caps::ClientCaps;
use crate::transport::{Conn, Listener};

pub use dma::{DmaController, DmaInfo, DmaSg};
pub use irq::Irqs;
pub use region::{IoEventFd, Region, RegionCb, RegionSetup};

/// syslog-style log levels, as `vfu_setup_log` takes them.
pub mod log_level {
    pub const EMERG: i32 = 0;
    pub const ALERT: i32 = 1;
    pub const CRIT: i32 = 2;
    pub const ERR: i32 = 3;
    pub const WARNING: i32 = 4;
    pub const NOTICE: i32 = 5;
    pub const INFO: i32 = 6;
    pub const DEBUG: i32 = 7;
}

/// Why the device is being reset (`vfu_reset_type_t`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ResetType {
    /// The client asked for a device reset.
    Device = 0,
    /// The client went away.
    LostConn = 1,
    /// The client started a PCI function-level reset.
    PciFlr = 2,
}

/// Log sink: `(ctx, level, message)`.
pub type LogFn = Rc<dyn Fn(&Context, i32, &str)>;
/// Reset callback.
pub type ResetCb = Rc<dyn Fn(&Context, ResetType) -> Result<()>>;
/// Quiesce callback: `Ok(())` when quiesced now, `Err(EBUSY)` when the device
/// will call [`Context::device_quiesced`] later, any other error fails the
/// operation that needed the quiesce.
pub type QuiesceCb = Rc<dyn Fn(&Context) -> Result<()>>;
/// DMA register/unregister callback.
pub type DmaCb = Rc<dyn Fn(&Context, &DmaInfo)>;
/// IRQ mask-state callback: `(ctx, start, count, masked)`.
pub type IrqStateCb = Rc<dyn Fn(&Context, u32, u32, bool)>;

/// A device's live-migration callbacks (`vfu_migration_callbacks_t`).
pub trait MigrationDevice {
    /// Move to `state` (a `VFU_MIGR_STATE_*` value).
    fn transition(&self, ctx: &Context, state: u32) -> Result<()>;
    /// Produce migration data into `buf`; 0 means no more data.
    fn read_data(&self, ctx: &Context, buf: &mut [u8]) -> Result<usize>;
    /// Consume migration data.
    fn write_data(&self, ctx: &Context, buf: &[u8]) -> Result<usize>;
}

/// Flag for [`Context::new`]: attach and run without blocking.
pub const FLAG_ATTACH_NB: i32 = 1 << 0;

#[derive(Default)]
pub(crate) struct Callbacks {
    pub log: Option<LogFn>,
    pub reset: Option<ResetCb>,
    pub quiesce: Option<QuiesceCb>,
    pub dma_register: Option<DmaCb>,
    pub dma_unregister: Option<DmaCb>,
    pub irq_state: [Option<IrqStateCb>; irq::NUM_IRQ_TYPES],
    pub migration: Option<Rc<dyn MigrationDevice>>,
}

/// The device context.
pub struct Context {
    private: *mut libc::c_void,
    nonblocking: bool,
    path: PathBuf,
    log_level: Cell<i32>,
    pub(crate) cbs: RefCell<Callbacks>,
    listener: RefCell<Option<Listener>>,
    pub(crate) conn: RefCell<Option<Rc<Conn>>>,
    pub(crate) twin: RefCell<Option<Rc<Conn>>>,
    pub(crate) client: Cell<ClientLimits>,
    pub(crate) regions: RefCell<Vec<Region>>,
    pci: OnceCell<pci::PciConfig>,
    irq_counts: Cell<[u32; irq::NUM_IRQ_TYPES]>,
    irqs: OnceLock<Arc<Irqs>>,
    dma: OnceLock<Arc<DmaController>>,
    pub(crate) dma_max_regions: Cell<usize>,
    pub(crate) migration: OnceCell<migration::Migration>,
    pub(crate) pending: RefCell<dispatch::Pending>,
    /// Commands received while waiting for a reply on the main socket.
    pub(crate) deferred: RefCell<std::collections::VecDeque<dispatch::Request>>,
    /// Request and reply buffers kept between messages.
    pub(crate) rx_spare: RefCell<Vec<u8>>,
    pub(crate) tx_spare: RefCell<Vec<u8>>,
    pub(crate) quiesced: Cell<bool>,
    realized: Cell<bool>,
    pub(crate) next_msg_id: Cell<u16>,
}

/// What the client negotiated.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClientLimits {
    pub max_data_xfer_size: usize,
    /// Use QEMU's layout for DMA_READ/DMA_WRITE messages.
    pub qemu_dma_layout: bool,
}

impl From<&ClientCaps> for ClientLimits {
    fn from(c: &ClientCaps) -> Self {
        ClientLimits {
            max_data_xfer_size: c.max_data_xfer_size,
            qemu_dma_layout: c.qemu_dma_layout,
        }
    }
}

impl Context {
    /// Creates a context serving a UNIX socket at `path` (`vfu_create_ctx`).
    /// The socket is bound and listening when this returns.
    pub fn new(path: &Path, flags: i32, private: *mut libc::c_void) -> Result<Context> {
        if flags & !FLAG_ATTACH_NB != 0 {
            return Err(Errno::EINVAL);
        }
        let nonblocking = flags & FLAG_ATTACH_NB != 0;
        let listener = Listener::bind(path, nonblocking)?;
        let mut counts = [0u32; irq::NUM_IRQ_TYPES];
        counts[irq::ERR as usize] = 1;
        counts[irq::REQ as usize] = 1;
        Ok(Context {
            private,
            nonblocking,
            path: path.to_path_buf(),
            log_level: Cell::new(log_level::ERR),
            cbs: RefCell::new(Callbacks::default()),
            listener: RefCell::new(Some(listener)),
            conn: RefCell::new(None),
            twin: RefCell::new(None),
            client: Cell::new(ClientLimits::from(&ClientCaps::default())),
            regions: RefCell::new(vec![Region::default(); region::NUM_REGIONS]),
            pci: OnceCell::new(),
            irq_counts: Cell::new(counts),
            irqs: OnceLock::new(),
            dma: OnceLock::new(),
            dma_max_regions: Cell::new(0),
            migration: OnceCell::new(),
            pending: RefCell::new(dispatch::Pending::None),
            deferred: RefCell::new(std::collections::VecDeque::new()),
            rx_spare: RefCell::new(Vec::new()),
            tx_spare: RefCell::new(Vec::new()),
            quiesced: Cell::new(false),
            realized: Cell::new(false),
            next_msg_id: Cell::new(1),
        })
    }

    /// The private pointer given at creation.
    pub fn private(&self) -> *mut libc::c_void {
        self.private
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether attach and run are non-blocking.
    pub fn is_nonblocking(&self) -> bool {
        self.nonblocking
    }

    /// Whether [`Context::realize`] has run.
    pub fn is_realized(&self) -> bool {
        self.realized.get()
    }

    // ---- logging -------------------------------------------------------

    /// Sets the log sink and level (`vfu_setup_log`).
    pub fn setup_log(&self, log: Option<LogFn>, level: i32) -> Result<()> {
        if !(log_level::EMERG..=log_level::DEBUG).contains(&level) {
            return Err(Errno::EINVAL);
        }
        self.cbs.borrow_mut().log = log;
        self.log_level.set(level);
        Ok(())
    }

    /// Whether a message at `level` would be logged.
    pub fn log_enabled(&self, level: i32) -> bool {
        level <= self.log_level.get() && self.cbs.borrow().log.is_some()
    }

    /// Logs `msg` at `level` through the device's log sink.
    pub fn log(&self, level: i32, msg: &str) {
        if level > self.log_level.get() {
            return;
        }
        let f = self.cbs.borrow().log.clone();
        if let Some(f) = f {
            f(self, level, msg);
        }
    }

    pub(crate) fn logf(&self, level: i32, args: std::fmt::Arguments<'_>) {
        if self.log_enabled(level) {
            self.log(level, &args.to_string());
        }
    }

    // ---- setup ---------------------------------------------------------

    /// Sets up a region (`vfu_setup_region`).
    pub fn setup_region(&self, idx: usize, setup: RegionSetup) -> Result<()> {
        let mut regions = self.regions.try_borrow_mut().map_err(|_| Errno::EBUSY)?;
        let r = region::validate(&regions, idx, setup)?;
        if let Some(p) = self.pci.get() {
            if idx <= region::ROM {
                p.setup_bar(
                    idx,
                    pci::BarInfo {
                        size: r.size,
                        flags: r.flags,
                    },
                );
            }
        }
        regions[idx] = r;
        Ok(())
    }

    /// Registers an ioeventfd for the client (`vfu_create_ioeventfd`).
    pub fn create_ioeventfd(&self, idx: usize, e: IoEventFd) -> Result<()> {
        if e.shadow_fd != -1 {
            // Shadow ioeventfds need a kernel extension upstream only builds on
            // request; like upstream's default build, refuse them.
            return Err(Errno::EINVAL);
        }
        let mut regions = self.regions.try_borrow_mut().map_err(|_| Errno::EBUSY)?;
        let r = regions.get_mut(idx).ok_or(Errno::EINVAL)?;
        match e.gpa_offset.checked_add(e.size) {
            Some(end) if end <= r.size => {}
            _ => return Err(Errno::EINVAL),
        }
        r.ioeventfds.push(e);
        Ok(())
    }

    /// Sets the reset callback.
    pub fn setup_reset_cb(&self, cb: Option<ResetCb>) {
        self.cbs.borrow_mut().reset = cb;
    }

    /// Sets the quiesce callback.
    pub fn setup_quiesce_cb(&self, cb: Option<QuiesceCb>) {
        self.cbs.borrow_mut().quiesce = cb;
    }

    /// Enables DMA (`vfu_setup_device_dma`): clients may then map memory, up
    /// to `max_regions` regions.
    pub fn setup_dma(
        &self,
        max_regions: usize,
        register: Option<DmaCb>,
        unregister: Option<DmaCb>,
    ) -> Result<()> {
        if self
            .dma
            .set(Arc::new(DmaController::new(max_regions)))
            .is_err()
        {
            return Err(Errno::EEXIST);
        }
        self.dma_max_regions.set(max_regions);
        let mut c = self.cbs.borrow_mut();
        c.dma_register = register;
        c.dma_unregister = unregister;
        Ok(())
    }

    /// Sets the number of vectors of an IRQ index (`vfu_setup_device_nr_irqs`).
    pub fn setup_irq_count(&self, index: u32, count: u32) -> Result<()> {
        let mut c = self.irq_counts.get();
        *c.get_mut(index as usize).ok_or(Errno::EINVAL)? = count;
        if self.irqs.get().is_some() {
            return Err(Errno::EBUSY);
        }
        self.irq_counts.set(c);
        Ok(())
    }

    /// Sets the mask-state callback of an IRQ index.
    pub fn setup_irq_state_cb(&self, index: u32, cb: Option<IrqStateCb>) -> Result<()> {
        let mut c = self.cbs.borrow_mut();
        *c.irq_state.get_mut(index as usize).ok_or(Errno::EINVAL)? = cb;
        Ok(())
    }

    /// Enables live migration with the device's callbacks.
    pub fn setup_migration(&self, dev: Rc<dyn MigrationDevice>) -> Result<()> {
        let m = migration::Migration::new(migration::VFU_MIGR_CALLBACKS_VERS)?;
        self.migration.set(m).map_err(|_| Errno::EEXIST)?;
        self.cbs.borrow_mut().migration = Some(dev);
        Ok(())
    }

    /// Initializes PCI config space (`vfu_pci_init`).
    pub fn pci_init(&self, pci_type: u32, hdr_type: i32, revision: i32) -> Result<()> {
        let p = pci::PciConfig::new(pci_type, hdr_type, revision)?;
        {
            let regions = self.regions.borrow();
            for (i, r) in regions.iter().enumerate().take(region::ROM + 1) {
                if r.size > 0 {
                    p.setup_bar(
                        i,
                        pci::BarInfo {
                            size: r.size,
                            flags: r.flags,
                        },
                    );
                }
            }
        }
        let size = p.size() as u64;
        self.pci.set(p).map_err(|_| Errno::EEXIST)?;
        let mut regions = self.regions.borrow_mut();
        let cfg = &mut regions[region::CFG];
        cfg.size = size;
        cfg.flags = region::FLAG_RW;
        Ok(())
    }

    /// The PCI config space, once [`Context::pci_init`] or realize made it.
    pub fn pci(&self) -> Option<&pci::PciConfig> {
        self.pci.get()
    }

    /// Finishes setup (`vfu_realize_ctx`): creates default config space and
    /// the IRQ tables. Idempotent.
    pub fn realize(&self) -> Result<()> {
        if self.realized.get() {
            return Ok(());
        }
        {
            let mut regions = self.regions.borrow_mut();
            let cfg = &mut regions[region::CFG];
            if cfg.size == 0 {
                cfg.flags = region::FLAG_RW;
                cfg.size = pci::CFG_SPACE_SIZE as u64;
            }
        }
        if self.pci.get().is_none() {
            let size = self.regions.borrow()[region::CFG].size;
            let p = pci::PciConfig::with_size(usize::try_from(size).map_err(|_| Errno::EINVAL)?)?;
            let _ = self.pci.set(p);
        }
        let counts = self.irq_counts.get();
        let pci = self.pci.get().ok_or(Errno::ENOMEM)?;
        {
            let regions = self.regions.borrow();
            let bars: Vec<pci::BarInfo> = regions
                .iter()
                .take(region::ROM + 1)
                .map(|r| pci::BarInfo {
                    size: r.size,
                    flags: r.flags,
                })
                .collect();
            pci.realize(&bars, counts[irq::INTX as usize] != 0);
        }
        let _ = self.irqs.set(Arc::new(Irqs::new(counts)));
        self.realized.set(true);
        Ok(())
    }

    /// The interrupt state, once realized. Usable from any thread.
    pub fn irqs(&self) -> Option<&Arc<Irqs>> {
        self.irqs.get()
    }

    /// Triggers vector `sub` of the device's interrupt (`vfu_irq_trigger`).
    pub fn irq_trigger(&self, sub: u32) -> Result<()> {
        self.irqs.get().ok_or(Errno::EINVAL)?.trigger(sub)
    }

    /// The DMA controller, once DMA is set up. Usable from any thread.
    pub fn dma(&self) -> Option<&Arc<DmaController>> {
        self.dma.get()
    }

    /// Whether a client is attached.
    pub fn is_attached(&self) -> bool {
        self.conn.borrow().is_some()
    }

    /// The fd to poll: the connection when attached, else the listener.
    pub fn poll_fd(&self) -> RawFd {
        if let Some(c) = self.conn.borrow().as_ref() {
            return c.as_raw_fd();
        }
        self.listener
            .borrow()
            .as_ref()
            .map_or(-1, |l| l.as_raw_fd())
    }

    pub(crate) fn accept(&self) -> Result<Conn> {
        let l = self.listener.borrow();
        l.as_ref().ok_or(Errno::ENOTCONN)?.accept()
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        dispatch::destroy(self);
    }
}
