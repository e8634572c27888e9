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

mod access_log;
pub(crate) mod dispatch;
pub mod dma;
pub mod dma_msg;
mod event_loop;
pub mod irq;
pub mod migration;
pub mod pci;
pub mod pci_caps;
pub(crate) mod pci_regs;
pub mod region;

use std::cell::{Cell, OnceCell, RefCell};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::error::{Errno, Result};
use crate::protocol::caps::ClientCaps;
use crate::transport::{Conn, Listener, CLIENT_STALL_TIMEOUT};

pub use dma::{DmaController, DmaInfo, DmaSg, GuestSlice};
pub use irq::{IrqType, Irqs};
pub use migration::MigrState;
pub use pci::{PciConfig, PciType};
pub use region::{IoEventFd, Region, RegionCb, RegionSetup};

/// syslog-style log levels, as `vfu_setup_log` takes them: a message is
/// logged when its level is at most the context's level.
pub mod log_level {
    /// The system is unusable (`LOG_EMERG`).
    pub const EMERG: i32 = 0;
    /// Action must be taken immediately (`LOG_ALERT`).
    pub const ALERT: i32 = 1;
    /// Critical conditions (`LOG_CRIT`).
    pub const CRIT: i32 = 2;
    /// Error conditions (`LOG_ERR`), the default level.
    pub const ERR: i32 = 3;
    /// Warning conditions (`LOG_WARNING`).
    pub const WARNING: i32 = 4;
    /// Normal but significant conditions (`LOG_NOTICE`).
    pub const NOTICE: i32 = 5;
    /// Informational messages (`LOG_INFO`).
    pub const INFO: i32 = 6;
    /// Debug messages (`LOG_DEBUG`).
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

/// A device's live-migration callbacks (`vfu_migration_callbacks_t`),
/// registered with [`Context::setup_migration`].
///
/// The methods take `&self` and run on the context's thread, inside
/// [`Context::run`]: keep mutable device state in a `Cell` or `RefCell`.
/// Errors go back to the client as they are.
pub trait MigrationDevice {
    /// Move to `state`, a `VFU_MIGR_STATE_*` value ([`MigrState::from_raw`]
    /// gives the typed state). The library walks the state machine and calls
    /// this once per step, in order. An error leaves the device in the state
    /// it was in before this step.
    fn transition(&self, ctx: &Context, state: u32) -> Result<()>;
    /// Produce migration data into (a prefix of) `buf` and return how many
    /// bytes were written; 0 means there is no more data for now. Called in
    /// PRE_COPY and STOP_AND_COPY.
    fn read_data(&self, ctx: &Context, buf: &mut [u8]) -> Result<usize>;
    /// Consume migration data sent by the source (in RESUME); must consume
    /// all of `buf` and return its length.
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

/// The device context: one device, served on one UNIX socket to one client
/// at a time.
///
/// This is the engine behind both APIs: the C functions of
/// `libvfio-user.so.0` are thin wrappers over it. From Rust:
///
/// 1. [`Context::create`] binds the socket;
/// 2. set the device up: [`Context::pci_init`] and [`PciConfig`],
///    [`Context::setup_region`], [`Context::setup_irq_count`],
///    [`Context::setup_dma`], [`Context::setup_migration`], callbacks
///    ([`Context::on_reset`], [`Context::on_quiesce`], ...);
/// 3. [`Context::realize`];
/// 4. [`Context::attach`] waits for a client, [`Context::run`] serves it
///    (or, non-blocking, [`Context::try_attach`], [`Context::wait_ready`]
///    and [`Context::run_ready`] from an event loop).
///
/// Callbacks are closures that receive `&Context` (they may call back into
/// it, to trigger an interrupt or read guest memory, say). Device state they
/// share is typically an `Rc<RefCell<State>>` captured by each closure; the
/// raw [`Context::private`] pointer only exists for the C API.
///
/// A context is neither `Send` nor `Sync`: it lives on the thread that
/// created it. [`Context::dma`] and [`Context::irqs`] hand out `Send + Sync`
/// handles for other threads. Dropping the context disconnects the client
/// (running the reset and DMA-unregister callbacks) and removes the socket.
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
    irq_maskable: Cell<[bool; irq::NUM_IRQ_TYPES]>,
    irqs: OnceLock<Arc<Irqs>>,
    dma: OnceLock<Arc<DmaController>>,
    /// The lock-free state of the DMA controller, for the per-I/O C entry
    /// points (one load from the handle): the shared empty copy until DMA is
    /// set up, then the controller's own, which `dma` keeps alive as long as
    /// this context lives. Set once, by `setup_dma`.
    dma_snap: AtomicPtr<dma::Snapshot>,
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
    /// See [`Context::set_client_timeout`].
    client_timeout: Cell<Option<Duration>>,
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
    /// Creates a context serving a UNIX socket at `path`, bound and
    /// listening when this returns. With `nonblocking`, [`Context::attach`]
    /// and [`Context::run`] never wait (see [`Context::try_attach`],
    /// [`Context::wait_ready`] and [`Context::run_ready`]).
    ///
    /// Errors: the errno of `bind`/`listen` (`EADDRINUSE` when the path
    /// exists, for instance).
    pub fn create(path: impl AsRef<Path>, nonblocking: bool) -> Result<Context> {
        let flags = if nonblocking { FLAG_ATTACH_NB } else { 0 };
        Context::new(path.as_ref(), flags, std::ptr::null_mut())
    }

    /// Creates a context serving a UNIX socket at `path` (`vfu_create_ctx`),
    /// with `FLAG_*` flags and the C API's private pointer (returned by
    /// [`Context::private`], never dereferenced by the library). The socket
    /// is bound and listening when this returns. Rust code normally uses
    /// [`Context::create`].
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
            irq_maskable: Cell::new([false; irq::NUM_IRQ_TYPES]),
            irqs: OnceLock::new(),
            dma: OnceLock::new(),
            dma_snap: AtomicPtr::new(dma::Snapshot::empty() as *const _ as *mut _),
            dma_max_regions: Cell::new(0),
            migration: OnceCell::new(),
            pending: RefCell::new(dispatch::Pending::None),
            deferred: RefCell::new(std::collections::VecDeque::new()),
            rx_spare: RefCell::new(Vec::new()),
            tx_spare: RefCell::new(Vec::new()),
            quiesced: Cell::new(false),
            realized: Cell::new(false),
            next_msg_id: Cell::new(1),
            client_timeout: Cell::new(Some(CLIENT_STALL_TIMEOUT)),
        })
    }

    /// The private pointer given to [`Context::new`] (null for
    /// [`Context::create`]).
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
    ///
    /// With a `shadow_fd` (not -1) it is a shadow ioeventfd: the client
    /// gets the shadow memory fd too (`VFIO_USER_IO_FD_TYPE_IOEVENTFD_SHADOW`
    /// in `VFIO_USER_DEVICE_GET_REGION_IO_FDS`) and, with a kernel that
    /// supports it, has the written value stored at `shadow_offset` in that
    /// memory. Upstream offers this only in builds with its shadow-ioeventfd
    /// option; here it is always available. Neither fd is owned: the device
    /// keeps them open while the context lives and closes them itself.
    /// `EINVAL` for a negative fd other than -1 or an access outside the
    /// region.
    pub fn create_ioeventfd(&self, idx: usize, e: IoEventFd) -> Result<()> {
        if e.fd < -1 || e.shadow_fd < -1 {
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

    /// Sets (or, with `None`, removes) the reset callback. See
    /// [`Context::on_reset`].
    pub fn setup_reset_cb(&self, cb: Option<ResetCb>) {
        self.cbs.borrow_mut().reset = cb;
    }

    /// Sets (or, with `None`, removes) the quiesce callback. See
    /// [`Context::on_quiesce`].
    pub fn setup_quiesce_cb(&self, cb: Option<QuiesceCb>) {
        self.cbs.borrow_mut().quiesce = cb;
    }

    /// Calls `f` when the device must reset: the client asked for a device
    /// reset or a PCI function-level reset, or went away
    /// ([`ResetType::LostConn`]). The library has already quiesced the
    /// device. An error goes back to the client.
    pub fn on_reset(&self, f: impl Fn(&Context, ResetType) -> Result<()> + 'static) {
        self.setup_reset_cb(Some(Rc::new(f)));
    }

    /// Calls `f` before any operation that needs the device quiet: DMA map
    /// and unmap, reset, migration state changes and the context's teardown
    /// when the client leaves. While quiesced the device must not use guest
    /// memory, except from inside the callbacks the library makes meanwhile
    /// (DMA register and unregister, reset, migration transition).
    ///
    /// `f` returns `Ok(())` when the device is quiet now; it is unquiesced
    /// when [`Context::run`] returns. It returns `Err(EBUSY)` when it needs
    /// time: `run` then fails with `EBUSY` until the device calls
    /// [`Context::device_quiesced`], which carries out the operation (the
    /// device is unquiesced when that returns). Any other error fails the
    /// operation. See the crate documentation's section on quiesce.
    /// Without a quiesce callback the device is assumed to be always quiet
    /// (it only touches guest memory from its own thread, outside
    /// [`Context::run`]).
    pub fn on_quiesce(&self, f: impl Fn(&Context) -> Result<()> + 'static) {
        self.setup_quiesce_cb(Some(Rc::new(f)));
    }

    /// Calls `f(ctx, start, count, masked)` when the client masks or unmasks
    /// vectors of interrupt `index` ([`IrqType`] or a raw index).
    pub fn on_irq_state(
        &self,
        index: impl Into<u32>,
        f: impl Fn(&Context, u32, u32, bool) + 'static,
    ) -> Result<()> {
        self.setup_irq_state_cb(index, Some(Rc::new(f)))
    }

    /// Sends the library's and [`Context::log`]'s messages at `level` (a
    /// [`log_level`] value) or more severe to `f(ctx, level, message)`.
    pub fn on_log(&self, level: i32, f: impl Fn(&Context, i32, &str) + 'static) -> Result<()> {
        self.setup_log(Some(Rc::new(f)), level)
    }

    /// Calls `f` after the client maps a DMA region; needs
    /// [`Context::setup_dma`] first (`EINVAL` otherwise).
    pub fn on_dma_register(&self, f: impl Fn(&Context, &DmaInfo) + 'static) -> Result<()> {
        if self.dma.get().is_none() {
            return Err(Errno::EINVAL);
        }
        self.cbs.borrow_mut().dma_register = Some(Rc::new(f));
        Ok(())
    }

    /// Calls `f` before a DMA region goes away (client unmap or
    /// disconnection): the device must stop using addresses inside it. Needs
    /// [`Context::setup_dma`] first (`EINVAL` otherwise).
    pub fn on_dma_unregister(&self, f: impl Fn(&Context, &DmaInfo) + 'static) -> Result<()> {
        if self.dma.get().is_none() {
            return Err(Errno::EINVAL);
        }
        self.cbs.borrow_mut().dma_unregister = Some(Rc::new(f));
        Ok(())
    }

    /// Enables DMA (`vfu_setup_device_dma`): clients may then map memory, up
    /// to `max_regions` regions.
    pub fn setup_dma(
        &self,
        max_regions: usize,
        register: Option<DmaCb>,
        unregister: Option<DmaCb>,
    ) -> Result<()> {
        let snap = Arc::new(dma::Snapshot::new());
        let fast = Arc::as_ptr(&snap) as *mut dma::Snapshot;
        if self
            .dma
            .set(Arc::new(DmaController::with_snapshot(max_regions, snap)))
            .is_err()
        {
            return Err(Errno::EEXIST);
        }
        // After the controller is in place: whoever sees this pointer sees
        // a copy that lives as long as the context.
        self.dma_snap.store(fast, Ordering::Release);
        self.dma_max_regions.set(max_regions);
        let mut c = self.cbs.borrow_mut();
        c.dma_register = register;
        c.dma_unregister = unregister;
        Ok(())
    }

    /// Sets the number of vectors of interrupt `index`
    /// (`vfu_setup_device_nr_irqs`): an [`IrqType`], or a raw index as the C
    /// API passes it. `EINVAL` for an unknown index, `EBUSY` once realized.
    pub fn setup_irq_count(&self, index: impl Into<u32>, count: u32) -> Result<()> {
        let index: u32 = index.into();
        let mut c = self.irq_counts.get();
        *c.get_mut(index as usize).ok_or(Errno::EINVAL)? = count;
        if self.irqs.get().is_some() {
            return Err(Errno::EBUSY);
        }
        self.irq_counts.set(c);
        Ok(())
    }

    /// Makes the library honour the client's MASK/UNMASK of an interrupt
    /// index (INTx, MSI or MSI-X) itself, beyond upstream libvfio-user: a
    /// vector triggered while masked is held as pending (see
    /// [`Irqs::is_pending`], for a Pending Bit Array) and signalled when the
    /// client unmasks it, and the index reports `VFIO_IRQ_INFO_MASKABLE`.
    /// Call before [`Context::realize`]; `EBUSY` after.
    pub fn set_irq_maskable(&self, index: impl Into<u32>, maskable: bool) -> Result<()> {
        let index = index.into() as usize;
        if index >= irq::ERR as usize {
            return Err(Errno::EINVAL);
        }
        if self.irqs.get().is_some() {
            return Err(Errno::EBUSY);
        }
        let mut m = self.irq_maskable.get();
        m[index] = maskable;
        self.irq_maskable.set(m);
        Ok(())
    }

    /// Triggers the error interrupt (`VFIO_PCI_ERR_IRQ_INDEX`), when the
    /// client gave it an eventfd. Other threads use the [`Irqs`] handle.
    pub fn irq_trigger_err(&self) -> Result<()> {
        self.irqs
            .get()
            .ok_or(Errno::EINVAL)?
            .trigger_special(irq::ERR)
    }

    /// Triggers the device request interrupt (`VFIO_PCI_REQ_IRQ_INDEX`),
    /// asking the client to release the device. Other threads use the
    /// [`Irqs`] handle.
    pub fn irq_trigger_req(&self) -> Result<()> {
        self.irqs
            .get()
            .ok_or(Errno::EINVAL)?
            .trigger_special(irq::REQ)
    }

    /// Sets the mask-state callback of interrupt `index` (see
    /// [`Context::on_irq_state`]). `EINVAL` for an unknown index.
    pub fn setup_irq_state_cb(&self, index: impl Into<u32>, cb: Option<IrqStateCb>) -> Result<()> {
        let index: u32 = index.into();
        let mut c = self.cbs.borrow_mut();
        *c.irq_state.get_mut(index as usize).ok_or(Errno::EINVAL)? = cb;
        Ok(())
    }

    /// Enables live migration (protocol v2, with pre-copy) with the device's
    /// callbacks. Dirty-page logging needs [`Context::setup_dma`] too.
    /// `EEXIST` when called twice.
    pub fn setup_migration(&self, dev: Rc<dyn MigrationDevice>) -> Result<()> {
        let m = migration::Migration::new(migration::VFU_MIGR_CALLBACKS_VERS)?;
        self.migration.set(m).map_err(|_| Errno::EEXIST)?;
        self.cbs.borrow_mut().migration = Some(dev);
        Ok(())
    }

    /// Initializes PCI config space (`vfu_pci_init`) and returns it, to set
    /// IDs and class and to add capabilities.
    ///
    /// `pci_type` is a [`PciType`] (or a raw `PCI_TYPE_*` value, as the C
    /// API passes it): 256 bytes of config space for conventional PCI and
    /// PCI-X mode 1, 4096 for PCI-X mode 2 and Express. `hdr_type` must be
    /// [`pci::PCI_HEADER_TYPE_NORMAL`]; `revision` is ignored (set the
    /// revision byte with [`PciConfig::write_raw`]). `EINVAL` for anything
    /// else, `EEXIST` when config space exists already.
    ///
    /// ```no_run
    /// # fn main() -> vfio_user::Result<()> {
    /// use vfio_user::device::{pci, PciType};
    /// let ctx = vfio_user::Context::create("/tmp/dev.sock", false)?;
    /// let cfg = ctx.pci_init(PciType::Express, pci::PCI_HEADER_TYPE_NORMAL, 0)?;
    /// cfg.set_id(0x494f, 0x0dc8, 0, 0);
    /// cfg.set_class(0xff, 0, 0);
    /// # Ok(()) }
    /// ```
    pub fn pci_init(
        &self,
        pci_type: impl Into<u32>,
        hdr_type: i32,
        revision: i32,
    ) -> Result<&pci::PciConfig> {
        let p = pci::PciConfig::new(pci_type.into(), hdr_type, revision)?;
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
        self.pci.get().ok_or(Errno::ENOMEM)
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
        let _ = self.irqs.set(Arc::new(Irqs::with_masking(
            counts,
            self.irq_maskable.get(),
        )));
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

    /// The lock-free state of the DMA controller (`dma/fast.rs`): empty
    /// until DMA is set up. Usable from any thread.
    pub(crate) fn dma_snapshot(&self) -> &dma::Snapshot {
        let p = self.dma_snap.load(Ordering::Acquire);
        // SAFETY: `p` is the static empty copy or, once `setup_dma` stored
        // it, the copy owned by this context's DMA controller, which `dma`
        // (a `OnceLock`, never emptied) keeps alive until the context is
        // dropped; the borrow returned cannot outlive `&self`. The copy is
        // only ever accessed through shared references (atomics).
        unsafe { &*p }
    }

    /// Whether a client is attached.
    pub fn is_attached(&self) -> bool {
        self.conn.borrow().is_some()
    }

    /// The fd to poll for readability (`vfu_get_poll_fd`): the connection
    /// when attached, else the listening socket. It changes on attach and
    /// when the client leaves, so fetch it again each time round an event
    /// loop. -1 when there is neither. [`Context::wait_ready`] polls it for
    /// you.
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
        l.as_ref()
            .ok_or(Errno::ENOTCONN)?
            .accept_with_timeout(self.client_timeout.get())
    }

    /// Sets how long the context waits for a client that stops responding
    /// before it gives up on it (30 s by default, [`CLIENT_STALL_TIMEOUT`]);
    /// `None` waits forever, as upstream libvfio-user does.
    ///
    /// The timeout applies to a client that connects and does not begin
    /// the version negotiation, stops in the middle of a message, does not
    /// read what the server sends it (on the main or the twin socket), or
    /// does not answer a `DMA_READ`/`DMA_WRITE` request of the server's: the
    /// reply must arrive within the timeout of the request, whatever else
    /// the client sends meanwhile (its commands are kept and handled after
    /// the transfer). The transfer ([`Context::dma_read`],
    /// [`Context::dma_write`], [`Context::dma_transfer`], `vfu_sgl_read`)
    /// then fails with `ETIMEDOUT`, and a stalled client is dropped like one
    /// that hung up: the reset callback runs with
    /// [`ResetType::LostConn`] and [`Context::run`] reports `ENOTCONN`. A
    /// client that is merely idle between its own requests is never dropped.
    ///
    /// Takes effect at once, for the attached client too. `EINVAL` for a
    /// zero duration (use `None`), else the error of `setsockopt`.
    pub fn set_client_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        if timeout.is_some_and(|t| t.is_zero()) {
            return Err(Errno::EINVAL);
        }
        for c in [&self.conn, &self.twin] {
            if let Some(c) = c.borrow().as_ref() {
                c.set_stall_timeout(timeout)?;
            }
        }
        self.client_timeout.set(timeout);
        Ok(())
    }

    /// The timeout set by [`Context::set_client_timeout`].
    pub fn client_timeout(&self) -> Option<Duration> {
        self.client_timeout.get()
    }
}

// ---- guest memory ----------------------------------------------------------

impl Context {
    /// Copies guest memory at `iova` into `buf`, whatever kind of DMA region
    /// holds it: directly when the region is mapped into this process or
    /// backed by a file, else with `DMA_READ` messages the client answers.
    /// The range may span several regions.
    ///
    /// Call it from the context's thread, in the device's own loop rather
    /// than inside a callback (a client that waits for the reply to its
    /// request may not answer DMA messages meanwhile). Other threads use
    /// [`DmaController::read`] on [`Context::dma`].
    ///
    /// Errors: `EINVAL` without [`Context::setup_dma`], `ENOENT` when part of
    /// the range is not mapped, `EACCES` when a region is not readable,
    /// `ENOTCONN` when the client is gone, `ETIMEDOUT` when it did not
    /// answer in time (it is then dropped: see
    /// [`Context::set_client_timeout`]), or the client's error.
    pub fn dma_read(&self, iova: u64, buf: &mut [u8]) -> Result<()> {
        let dma = self.dma().ok_or(Errno::EINVAL)?.clone();
        dma.for_each_sg(iova, buf.len(), dma::PROT_READ, |sg, range| {
            let part = buf.get_mut(range).ok_or(Errno::EFAULT)?;
            self.dma_transfer(sg, part, false, true)
        })
    }

    /// Copies `buf` into guest memory at `iova`, like [`Context::dma_read`]
    /// in the other direction (`DMA_WRITE` messages for regions the client
    /// serves). Written pages are marked dirty while the client logs dirty
    /// pages. `EACCES` when a region is read-only.
    pub fn dma_write(&self, iova: u64, buf: &[u8]) -> Result<()> {
        let dma = self.dma().ok_or(Errno::EINVAL)?.clone();
        dma.for_each_sg(iova, buf.len(), dma::PROT_WRITE, |sg, range| {
            let part = buf.get(range).ok_or(Errno::EFAULT)?;
            if dma.sg_write(sg, part, true)? {
                return Ok(());
            }
            // Served by the client: the message path needs its own buffer.
            self.dma_transfer(sg, &mut part.to_vec(), true, false)
        })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        dispatch::destroy(self);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::socket_timeouts;

    pub(super) fn sock(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vfu-ctx-{tag}-{}.sock", std::process::id()))
    }

    #[test]
    fn create_and_typed_setup() {
        let path = sock("typed");
        let ctx = Context::create(&path, true).unwrap();
        assert!(ctx.is_nonblocking());
        assert!(ctx.private().is_null());
        assert_eq!(ctx.path(), path);
        // The path is taken while the context lives.
        assert!(Context::create(&path, false).is_err());

        let cfg = ctx
            .pci_init(PciType::Express, pci::PCI_HEADER_TYPE_NORMAL, 0)
            .unwrap();
        assert_eq!(cfg.size(), 4096);
        assert_eq!(cfg.pci_type(), pci::PCI_TYPE_EXPRESS);
        assert_eq!(
            ctx.pci_init(PciType::Conventional, 0, 0).err(),
            Some(Errno::EEXIST)
        );
        assert_eq!(ctx.regions.borrow()[region::CFG].size, 4096);

        ctx.setup_irq_count(IrqType::Msix, 4).unwrap();
        ctx.setup_irq_count(irq::INTX, 1).unwrap();
        assert_eq!(ctx.setup_irq_count(9u32, 1), Err(Errno::EINVAL));
        ctx.on_irq_state(IrqType::Msix, |_, _, _, _| {}).unwrap();
        assert_eq!(ctx.on_irq_state(5u32, |_, _, _, _| {}), Err(Errno::EINVAL));

        // DMA callbacks need DMA.
        assert_eq!(ctx.on_dma_register(|_, _| {}), Err(Errno::EINVAL));
        assert_eq!(ctx.on_dma_unregister(|_, _| {}), Err(Errno::EINVAL));
        let mut buf = [0u8; 4];
        assert_eq!(ctx.dma_read(0, &mut buf), Err(Errno::EINVAL));
        ctx.setup_dma(4, None, None).unwrap();
        ctx.on_dma_register(|_, _| {}).unwrap();
        ctx.on_dma_unregister(|_, _| {}).unwrap();
        assert!(ctx.cbs.borrow().dma_unregister.is_some());
        // Nothing mapped.
        assert_eq!(ctx.dma_read(0x1000, &mut buf), Err(Errno::ENOENT));
        assert_eq!(ctx.dma_write(0x1000, &buf), Err(Errno::ENOENT));
        ctx.dma_write(0x1000, &[]).unwrap();

        assert_eq!(
            ctx.on_log(99, |_, _, _| {}),
            Err(Errno::EINVAL),
            "bad level"
        );
        let seen = Rc::new(RefCell::new(Vec::new()));
        let s = seen.clone();
        ctx.on_log(log_level::INFO, move |_, level, msg| {
            s.borrow_mut().push((level, msg.to_string()))
        })
        .unwrap();
        ctx.log(log_level::DEBUG, "hidden");
        ctx.log(log_level::WARNING, "shown");
        assert_eq!(*seen.borrow(), [(log_level::WARNING, "shown".to_string())]);

        ctx.on_reset(|_, _| Ok(()));
        ctx.on_quiesce(|_| Err(Errno::EBUSY));
        assert!(ctx.cbs.borrow().reset.is_some());
        assert!(ctx.cbs.borrow().quiesce.is_some());
        ctx.realize().unwrap();
        assert_eq!(ctx.irqs().unwrap().count(irq::MSIX), 4);
        assert_eq!(ctx.setup_irq_count(IrqType::Msi, 1), Err(Errno::EBUSY));
    }

    #[test]
    fn client_timeout_reaches_the_main_and_the_twin_socket() {
        let path = sock("timeout");
        let ctx = Context::create(&path, false).unwrap();
        ctx.realize().unwrap();
        assert_eq!(ctx.client_timeout(), Some(CLIENT_STALL_TIMEOUT));
        assert_eq!(
            ctx.set_client_timeout(Some(Duration::ZERO)),
            Err(Errno::EINVAL)
        );
        assert_eq!(ctx.client_timeout(), Some(CLIENT_STALL_TIMEOUT));
        let two = Duration::from_secs(2);
        ctx.set_client_timeout(Some(two)).unwrap();
        assert_eq!(ctx.client_timeout(), Some(two));

        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let client = std::thread::spawn(move || {
            let opts = crate::client::ClientOptions {
                twin_socket: true,
                ..Default::default()
            };
            let c = crate::client::Client::connect_with(&path, opts).unwrap();
            assert!(c.has_twin_socket());
            done.recv().unwrap();
        });
        ctx.attach().unwrap();
        // SO_SNDTIMEO for sends; receives are bounded by the connection
        // itself (no SO_RCVTIMEO).
        let check = |t: Option<Duration>| {
            for c in [&ctx.conn, &ctx.twin] {
                let c = c.borrow();
                let c = c.as_ref().expect("socket");
                assert_eq!(
                    socket_timeouts(c),
                    [t.unwrap_or(Duration::ZERO), Duration::ZERO]
                );
                assert_eq!(c.stall_timeout(), t);
            }
        };
        check(Some(two));
        // While attached: both sockets follow.
        let four = Duration::from_secs(4);
        ctx.set_client_timeout(Some(four)).unwrap();
        check(Some(four));
        ctx.set_client_timeout(None).unwrap();
        assert_eq!(ctx.client_timeout(), None);
        check(None);
        done_tx.send(()).unwrap();
        client.join().unwrap();
        assert_eq!(ctx.run(), Err(Errno::ENOTCONN));
    }
}
