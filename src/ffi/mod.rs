//! The C ABI of libvfio-user.so.0: thin adapters over [`crate::device`].
//!
//! This is the only module with `extern "C"` items. Each entry point converts
//! its arguments, calls the Rust API, and reports failure the C way (-1 or
//! NULL with errno). Every body runs inside [`boundary::guard`], so no panic
//! crosses into C. The API part of `include/vfio-user/libvfio-user.h` is
//! generated from this file and its modules (`dma.rs`, `pci.rs`,
//! `region_fds.rs`) by cbindgen (see build.rs); type names that the
//! header defines by hand (enums, callback typedefs, PCI structs) are
//! excluded from generation and only referenced.

#![allow(non_camel_case_types)]

pub mod boundary;
mod compat;
// The entry points in these files follow those of this one in the header
// (cbindgen reads this file's items first, then its modules in order).
mod dma;
mod pci;
mod region_fds;

use std::ffi::{c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::rc::Rc;

use libc::{iovec, loff_t, size_t, ssize_t};

use crate::device::dma::{SglError, Snapshot};
use crate::device::{
    self, Context, DmaInfo, DmaSg, IoEventFd, MigrationDevice, RegionSetup, ResetType,
};
use crate::error::{Errno, Result};
use boundary::{
    as_handle, c_ref, c_slice, c_slice_mut, c_str, guard, handle_ref, into_handle, ret, set_errno,
    take_handle, Castable,
};

/// Opaque context handle (`vfu_ctx_t`).
pub struct vfu_ctx {
    _private: [u8; 0],
}
/// `vfu_ctx_t`.
pub type vfu_ctx_t = vfu_ctx;

/// Opaque scatter/gather entry (`dma_sg_t`); its size is `dma_sg_size()`.
pub struct dma_sg {
    _private: [u8; 0],
}
/// `dma_sg_t`.
pub type dma_sg_t = dma_sg;

impl Castable for vfu_ctx {
    type RustType = Context;
}

// Names defined by hand in the header preamble; excluded from generation.
pub type vfu_trans_t = c_int;
pub type vfu_dev_type_t = c_int;
pub type vfu_reset_type_t = c_int;
pub type vfu_pci_type_t = c_int;
pub type vfu_migr_state_t = c_int;
pub type vfu_dev_irq_type = c_int;
pub type vfu_dma_addr_t = *mut c_void;
pub struct vfu_pci_config_space_t {
    _private: [u8; 0],
}
// The header declares these as function types; a parameter of function type
// is a pointer to function in C, which is what these nullable pointers are.
pub type vfu_log_fn_t = Option<unsafe extern "C" fn(*mut vfu_ctx_t, c_int, *const c_char)>;
pub type vfu_region_access_cb_t =
    Option<unsafe extern "C" fn(*mut vfu_ctx_t, *mut c_char, size_t, loff_t, bool) -> ssize_t>;
pub type vfu_reset_cb_t = Option<unsafe extern "C" fn(*mut vfu_ctx_t, vfu_reset_type_t) -> c_int>;
pub type vfu_device_quiesce_cb_t = Option<unsafe extern "C" fn(*mut vfu_ctx_t) -> c_int>;
pub type vfu_dma_register_cb_t = Option<unsafe extern "C" fn(*mut vfu_ctx_t, *mut vfu_dma_info_t)>;
pub type vfu_dma_unregister_cb_t =
    Option<unsafe extern "C" fn(*mut vfu_ctx_t, *mut vfu_dma_info_t)>;
pub type vfu_dev_irq_state_cb_t = Option<unsafe extern "C" fn(*mut vfu_ctx_t, u32, u32, bool)>;

/// A guest DMA region as the register/unregister callbacks see it.
#[repr(C)]
pub struct vfu_dma_info {
    /// The region in the guest's DMA address space.
    pub iova: iovec,
    /// Where it is mapped in this process, or NULL.
    pub vaddr: *mut c_void,
    /// The whole mapping that contains it, when mapped.
    pub mapping: iovec,
    /// Page size of the mapping.
    pub page_size: size_t,
    /// PROT_* of the mapping.
    pub prot: u32,
}
/// `vfu_dma_info_t`.
pub type vfu_dma_info_t = vfu_dma_info;

/// Live-migration callbacks; `version` must be `VFU_MIGR_CALLBACKS_VERS`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct vfu_migration_callbacks_t {
    pub version: c_int,
    pub transition: Option<unsafe extern "C" fn(*mut vfu_ctx_t, vfu_migr_state_t) -> c_int>,
    pub read_data: Option<unsafe extern "C" fn(*mut vfu_ctx_t, *mut c_void, u64) -> ssize_t>,
    pub write_data: Option<unsafe extern "C" fn(*mut vfu_ctx_t, *mut c_void, u64) -> ssize_t>,
}

const _: () = {
    assert!(std::mem::size_of::<vfu_dma_info>() == std::mem::size_of::<DmaInfo>());
    assert!(std::mem::size_of::<vfu_dma_info>() == 56);
    assert!(std::mem::offset_of!(vfu_dma_info, vaddr) == 16);
    assert!(std::mem::offset_of!(vfu_dma_info, mapping) == 24);
    assert!(std::mem::offset_of!(vfu_dma_info, page_size) == 40);
    assert!(std::mem::offset_of!(vfu_dma_info, prot) == 48);
    assert!(std::mem::size_of::<vfu_migration_callbacks_t>() == 32);
    assert!(std::mem::size_of::<DmaSg>() == 40);
};

/// The context behind a handle from C: by the C API's contract one that
/// vfu_create_ctx returned and vfu_destroy_ctx has not freed (see
/// [`boundary::handle_ref`]). `EINVAL` for NULL.
fn ctx<'a>(p: *mut vfu_ctx_t) -> Result<&'a Context> {
    handle_ref(p).ok_or(Errno::EINVAL)
}

/// The errno a C callback left, or `fallback` when it left none.
fn cb_errno(fallback: i32) -> Errno {
    match boundary::errno() {
        0 => Errno(fallback),
        e => Errno(e),
    }
}

/// A device callback that takes an int argument and returns a status:
/// `vfu_reset_cb_t` and the migration `transition`.
type StatusCb = unsafe extern "C" fn(*mut vfu_ctx_t, c_int) -> c_int;

/// Calls `f`, a [`StatusCb`] the device registered through the C API:
/// `Ok` for a status >= 0, else the errno it left (`EINVAL` if none).
fn call_status(f: StatusCb, c: &Context, arg: c_int) -> Result<()> {
    set_errno(0);
    // SAFETY: a callback registered through the C API, called as that API
    // specifies: with the handle of its own context and a plain int.
    match unsafe { f(as_handle(c), arg) } {
        r if r < 0 => Err(cb_errno(libc::EINVAL)),
        _ => Ok(()),
    }
}

/// The callback's own (mutable) copy of a region's description.
fn dma_info_ptr(info: &DmaInfo) -> vfu_dma_info {
    vfu_dma_info {
        iova: info.iova,
        vaddr: info.vaddr,
        mapping: info.mapping,
        page_size: info.page_size,
        prot: info.prot,
    }
}

// ---- context lifecycle ----------------------------------------------------

/// Size of `dma_sg_t`.
#[no_mangle]
pub extern "C" fn dma_sg_size() -> size_t {
    std::mem::size_of::<DmaSg>()
}

#[no_mangle]
pub extern "C" fn vfu_create_ctx(
    trans: vfu_trans_t,
    path: *const c_char,
    flags: c_int,
    pvt: *mut c_void,
    dev_type: vfu_dev_type_t,
) -> *mut vfu_ctx_t {
    guard(|| {
        if flags & !device::FLAG_ATTACH_NB != 0 {
            set_errno(libc::EINVAL);
            return std::ptr::null_mut();
        }
        if trans != 0 || dev_type != 0 {
            set_errno(libc::ENOTSUP);
            return std::ptr::null_mut();
        }
        let Some(p) = c_str(path) else {
            set_errno(libc::EINVAL);
            return std::ptr::null_mut();
        };
        // SAFETY: the shim only stores the two function pointers.
        unsafe { vfu_log_shim_init(vfu_rs_log_enabled, vfu_rs_log_message) };
        let path = Path::new(std::ffi::OsStr::from_bytes(p.to_bytes()));
        ret(Context::new(path, flags, pvt), |c| {
            into_handle::<vfu_ctx>(Box::new(c))
        })
    })
}

#[no_mangle]
pub extern "C" fn vfu_realize_ctx(vfu_ctx: *mut vfu_ctx_t) -> c_int {
    guard(|| ret(ctx(vfu_ctx).and_then(|c| c.realize()), |_| 0))
}

#[no_mangle]
pub extern "C" fn vfu_attach_ctx(vfu_ctx: *mut vfu_ctx_t) -> c_int {
    guard(|| ret(ctx(vfu_ctx).and_then(|c| c.attach()), |_| 0))
}

#[no_mangle]
pub extern "C" fn vfu_get_poll_fd(vfu_ctx: *mut vfu_ctx_t) -> c_int {
    guard(|| ret(ctx(vfu_ctx).map(|c| c.poll_fd()), |fd| fd))
}

#[no_mangle]
pub extern "C" fn vfu_run_ctx(vfu_ctx: *mut vfu_ctx_t) -> c_int {
    guard(|| {
        ret(ctx(vfu_ctx).and_then(|c| c.run()), |n| {
            n.min(c_int::MAX as usize) as c_int
        })
    })
}

#[no_mangle]
pub extern "C" fn vfu_destroy_ctx(vfu_ctx: *mut vfu_ctx_t) {
    guard(|| {
        // SAFETY: the handle came from vfu_create_ctx and is not used again.
        drop(unsafe { take_handle(vfu_ctx) });
    })
}

#[no_mangle]
pub extern "C" fn vfu_get_private(vfu_ctx: *mut vfu_ctx_t) -> *mut c_void {
    guard(|| ctx(vfu_ctx).map_or(std::ptr::null_mut(), |c| c.private()))
}

#[no_mangle]
pub extern "C" fn vfu_setup_log(vfu_ctx: *mut vfu_ctx_t, log: vfu_log_fn_t, level: c_int) -> c_int {
    guard(|| {
        let f = log.map(|f| {
            Rc::new(move |c: &Context, lvl: i32, msg: &str| {
                let mut bytes: Vec<u8> = msg.bytes().filter(|&b| b != 0).collect();
                bytes.push(0);
                // Logging must not disturb the errno a failing callback left.
                let saved = boundary::errno();
                // SAFETY: calling the device's log function with a valid
                // NUL-terminated string and its own context.
                unsafe { f(as_handle(c), lvl, bytes.as_ptr() as *const c_char) };
                set_errno(saved);
            }) as device::LogFn
        });
        ret(ctx(vfu_ctx).and_then(|c| c.setup_log(f, level)), |_| 0)
    })
}

extern "C" {
    fn vfu_log_shim_init(
        enabled: extern "C" fn(*mut vfu_ctx_t, c_int) -> bool,
        message: extern "C" fn(*mut vfu_ctx_t, c_int, *const c_char),
    );
}

/// Called by the C `vfu_log` shim: is this level enabled?
extern "C" fn vfu_rs_log_enabled(vfu_ctx: *mut vfu_ctx_t, level: c_int) -> bool {
    guard(|| ctx(vfu_ctx).is_ok_and(|c| c.log_enabled(level)))
}

/// Called by the C `vfu_log` shim with the formatted message.
extern "C" fn vfu_rs_log_message(vfu_ctx: *mut vfu_ctx_t, level: c_int, msg: *const c_char) {
    guard(|| {
        // The shim passes a NUL-terminated buffer (or NULL).
        let Some(msg) = c_str(msg) else {
            return;
        };
        if let Ok(c) = ctx(vfu_ctx) {
            c.log(level, &msg.to_string_lossy());
        }
    })
}

// ---- regions & callbacks --------------------------------------------------

#[no_mangle]
pub extern "C" fn vfu_setup_region(
    vfu_ctx: *mut vfu_ctx_t,
    region_idx: c_int,
    size: size_t,
    region_access: vfu_region_access_cb_t,
    flags: c_int,
    mmap_areas: *mut iovec,
    nr_mmap_areas: u32,
    fd: c_int,
    offset: u64,
) -> c_int {
    guard(|| {
        let r = (|| {
            let c = ctx(vfu_ctx)?;
            if mmap_areas.is_null() != (nr_mmap_areas == 0) || region_idx < 0 {
                return Err(Errno::EINVAL);
            }
            // The caller passes nr_mmap_areas iovecs.
            let areas = c_slice(mmap_areas, nr_mmap_areas as usize).map(|s| {
                s.iter()
                    .map(|v| (v.iov_base as u64, v.iov_len as u64))
                    .collect()
            });
            let cb = region_access.map(|f| {
                Rc::new(
                    move |c: &Context, buf: &mut [u8], off: u64, w: bool| -> Result<usize> {
                        set_errno(0);
                        // SAFETY: calling the device's callback with a buffer of
                        // the stated length and its own context.
                        let n = unsafe {
                            f(
                                as_handle(c),
                                buf.as_mut_ptr() as *mut c_char,
                                buf.len(),
                                off as loff_t,
                                w,
                            )
                        };
                        if n < 0 {
                            Err(cb_errno(libc::EINVAL))
                        } else {
                            Ok(n as usize)
                        }
                    },
                ) as device::RegionCb
            });
            c.setup_region(
                region_idx as usize,
                RegionSetup {
                    size: size as u64,
                    cb,
                    flags: flags as u32,
                    mmap_areas: areas,
                    fd: (fd >= 0).then_some(fd),
                    offset,
                },
            )
        })();
        ret(r, |_| 0)
    })
}

#[no_mangle]
pub extern "C" fn vfu_setup_device_reset_cb(
    vfu_ctx: *mut vfu_ctx_t,
    reset: vfu_reset_cb_t,
) -> c_int {
    guard(|| {
        let cb = reset.map(|f| {
            Rc::new(move |c: &Context, t: ResetType| call_status(f, c, t as c_int))
                as device::ResetCb
        });
        ret(ctx(vfu_ctx).map(|c| c.setup_reset_cb(cb)), |_| 0)
    })
}

#[no_mangle]
pub extern "C" fn vfu_setup_device_quiesce_cb(
    vfu_ctx: *mut vfu_ctx_t,
    quiesce_cb: vfu_device_quiesce_cb_t,
) {
    guard(|| {
        let cb = quiesce_cb.map(|f| {
            Rc::new(move |c: &Context| -> Result<()> {
                set_errno(0);
                // SAFETY: calling the device's callback with its own context.
                match unsafe { f(as_handle(c)) } {
                    r if r < 0 => Err(cb_errno(libc::EINVAL)),
                    _ => Ok(()),
                }
            }) as device::QuiesceCb
        });
        if let Ok(c) = ctx(vfu_ctx) {
            c.setup_quiesce_cb(cb);
        }
    })
}

#[no_mangle]
pub extern "C" fn vfu_device_quiesced(vfu_ctx: *mut vfu_ctx_t, quiesce_errno: c_int) -> c_int {
    guard(|| {
        ret(
            ctx(vfu_ctx).and_then(|c| c.device_quiesced(quiesce_errno)),
            |_| 0,
        )
    })
}

fn dma_cb(f: vfu_dma_register_cb_t) -> Option<device::DmaCb> {
    f.map(|f| {
        Rc::new(move |c: &Context, info: &DmaInfo| {
            let mut copy = dma_info_ptr(info);
            // SAFETY: calling the device's callback with a valid info copy.
            unsafe { f(as_handle(c), &mut copy) };
        }) as device::DmaCb
    })
}

#[no_mangle]
pub extern "C" fn vfu_setup_device_dma(
    vfu_ctx: *mut vfu_ctx_t,
    max_regions: size_t,
    dma_register: vfu_dma_register_cb_t,
    dma_unregister: vfu_dma_unregister_cb_t,
) -> c_int {
    guard(|| {
        let r = ctx(vfu_ctx).and_then(|c| {
            // A binary built against the 2025 header passes a callback here.
            if let Err(msg) = compat::check_max_regions(c, max_regions) {
                compat::report(c, crate::device::log_level::ERR, msg);
                return Err(Errno::EINVAL);
            }
            c.setup_dma(max_regions, dma_cb(dma_register), dma_cb(dma_unregister))
        });
        ret(r, |_| 0)
    })
}

#[no_mangle]
pub extern "C" fn vfu_setup_device_nr_irqs(
    vfu_ctx: *mut vfu_ctx_t,
    irq_type: vfu_dev_irq_type,
    count: u32,
) -> c_int {
    guard(|| {
        let r = ctx(vfu_ctx).and_then(|c| {
            let t = u32::try_from(irq_type).map_err(|_| Errno::EINVAL)?;
            c.setup_irq_count(t, count)
        });
        ret(r, |_| 0)
    })
}

#[no_mangle]
pub extern "C" fn vfu_setup_irq_state_callback(
    vfu_ctx: *mut vfu_ctx_t,
    irq_type: vfu_dev_irq_type,
    cb: vfu_dev_irq_state_cb_t,
) -> c_int {
    guard(|| {
        let f = cb.map(|f| {
            Rc::new(move |c: &Context, start: u32, count: u32, mask: bool| {
                // SAFETY: calling the device's callback with its own context.
                unsafe { f(as_handle(c), start, count, mask) };
            }) as device::IrqStateCb
        });
        let r = ctx(vfu_ctx).and_then(|c| {
            let t = u32::try_from(irq_type).map_err(|_| Errno::EINVAL)?;
            c.setup_irq_state_cb(t, f)
        });
        ret(r, |_| 0)
    })
}

struct CMigration(vfu_migration_callbacks_t);

/// The buffer of a migration data transfer, which also picks the callback.
enum MigrationData<'a> {
    /// For `read_data`, which fills it.
    Read(&'a mut [u8]),
    /// For `write_data`, which only reads it.
    Write(&'a [u8]),
}

impl CMigration {
    /// Calls `read_data` or `write_data` (after the buffer's kind): the
    /// number of bytes it moved, or the errno it left (`EINVAL` if none).
    fn data(&self, c: &Context, buf: MigrationData<'_>) -> Result<usize> {
        let (f, p, len) = match buf {
            MigrationData::Read(b) => (self.0.read_data, b.as_mut_ptr() as *mut c_void, b.len()),
            MigrationData::Write(b) => (self.0.write_data, b.as_ptr() as *mut c_void, b.len()),
        };
        let f = f.ok_or(Errno::EINVAL)?;
        set_errno(0);
        // SAFETY: a callback registered through the C API, called as it
        // specifies: `p` is valid for `len` bytes, borrowed exclusively when
        // `read_data` writes it, only read by `write_data`.
        let n = unsafe { f(as_handle(c), p, len as u64) };
        if n < 0 {
            Err(cb_errno(libc::EINVAL))
        } else {
            Ok(n as usize)
        }
    }
}

impl MigrationDevice for CMigration {
    fn transition(&self, c: &Context, state: u32) -> Result<()> {
        let f = self.0.transition.ok_or(Errno::EINVAL)?;
        call_status(f, c, state as c_int)
    }
    fn read_data(&self, c: &Context, buf: &mut [u8]) -> Result<usize> {
        self.data(c, MigrationData::Read(buf))
    }
    fn write_data(&self, c: &Context, buf: &[u8]) -> Result<usize> {
        self.data(c, MigrationData::Write(buf))
    }
}

#[no_mangle]
pub extern "C" fn vfu_setup_device_migration_callbacks(
    vfu_ctx: *mut vfu_ctx_t,
    callbacks: *const vfu_migration_callbacks_t,
) -> c_int {
    guard(|| {
        let r = ctx(vfu_ctx).and_then(|c| {
            let cbs = c_ref(callbacks).ok_or(Errno::EINVAL)?;
            if cbs.version != device::migration::VFU_MIGR_CALLBACKS_VERS {
                return Err(Errno::EINVAL);
            }
            c.setup_migration(Rc::new(CMigration(*cbs)))
        });
        ret(r, |_| 0)
    })
}

// ---- interrupts -------------------------------------------------------------

/// Thread-safe: may be called from any thread.
#[no_mangle]
pub extern "C" fn vfu_irq_trigger(vfu_ctx: *mut vfu_ctx_t, subindex: u32) -> c_int {
    guard(|| {
        // Only the Sync IRQ table is touched, so this is sound from any thread.
        let r = ctx(vfu_ctx).and_then(|c| {
            c.irqs()
                .ok_or(Errno::EINVAL)
                .and_then(|i| i.trigger(subindex))
        });
        ret(r, |_| 0)
    })
}
