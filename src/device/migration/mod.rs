//! Live migration, protocol version 2.
//!
//! This module owns the device's migration state machine and the three
//! messages that drive it:
//!
//! * `VFIO_USER_DEVICE_FEATURE`: the migration features (capabilities, get/set
//!   of the device state) and the DMA dirty-page logging features
//!   (start/stop/report), in GET, SET and PROBE flavours;
//! * `VFIO_USER_MIG_DATA_READ`: the client pulls device state while the device
//!   is saving (PRE_COPY or STOP_COPY);
//! * `VFIO_USER_MIG_DATA_WRITE`: the client pushes device state while the
//!   device is RESUMING.
//!
//! The `VFIO_USER_DEVICE_FEATURE` handler lives in `feature.rs`; the state
//! machine and the migration data stream live here.
//!
//! # State machine
//!
//! The direct arcs are
//! `STOP -> {RUNNING, STOP_COPY, RESUMING}`, `RUNNING -> {STOP, PRE_COPY}`,
//! `STOP_COPY -> STOP`, `RESUMING -> STOP`, `PRE_COPY -> {RUNNING, STOP_COPY}`.
//! A request for a state that is not one arc away is carried out as the
//! shortest chain of arcs whose interior states are not saving states
//! (PRE_COPY, STOP_COPY); `STOP_COPY -> PRE_COPY` is refused outright, the
//! peer-to-peer states and ERROR can never be requested. The device's
//! `transition` callback sees every arc of the chain, in order.
//!
//! When a transition callback fails the state stays at the last state that was
//! reached successfully (the state before the failing arc) and the callback's
//! errno goes back to the client. The reference implementation behaves this
//! way and its test-suite depends on it: a failed transition must not wedge the
//! device in ERROR. As a consequence ERROR is never entered here; [`Migration::reset`]
//! still knows how to leave it, for robustness.
//!
//! # Re-entrancy
//!
//! The device callbacks may call back into the library (for example to map
//! DMA scatter-gather lists while handling a transition). All state lives in
//! [`Cell`]s and no borrow is held across a callback.

use std::cell::Cell;

use crate::error::{Errno, Result};

mod feature;

pub use feature::{feature_needs_quiesce, handle_device_feature};

// ---------------------------------------------------------------------------
// Wire and ABI constants
// ---------------------------------------------------------------------------

/// vfio-user device state: error (never requested, never entered here).
pub const VFIO_USER_DEVICE_STATE_ERROR: u32 = 0;
/// vfio-user device state: stopped.
pub const VFIO_USER_DEVICE_STATE_STOP: u32 = 1;
/// vfio-user device state: running (the initial state).
pub const VFIO_USER_DEVICE_STATE_RUNNING: u32 = 2;
/// vfio-user device state: stopped, final device state being saved.
pub const VFIO_USER_DEVICE_STATE_STOP_COPY: u32 = 3;
/// vfio-user device state: stopped, device state being restored.
pub const VFIO_USER_DEVICE_STATE_RESUMING: u32 = 4;
/// vfio-user device state: running, peer-to-peer quiesced (unsupported).
pub const VFIO_USER_DEVICE_STATE_RUNNING_P2P: u32 = 5;
/// vfio-user device state: running, device state being saved iteratively.
pub const VFIO_USER_DEVICE_STATE_PRE_COPY: u32 = 6;
/// vfio-user device state: pre-copy, peer-to-peer quiesced (unsupported).
pub const VFIO_USER_DEVICE_STATE_PRE_COPY_P2P: u32 = 7;
/// Number of vfio-user device states; every valid state is below this.
pub const VFIO_USER_DEVICE_NUM_STATES: u32 = 8;

/// `vfu_migr_state_t` value handed to the transition callback for STOP.
pub const VFU_MIGR_STATE_STOP: u32 = 0;
/// `vfu_migr_state_t` value for RUNNING.
pub const VFU_MIGR_STATE_RUNNING: u32 = 1;
/// `vfu_migr_state_t` value for STOP_COPY.
pub const VFU_MIGR_STATE_STOP_AND_COPY: u32 = 2;
/// `vfu_migr_state_t` value for PRE_COPY.
pub const VFU_MIGR_STATE_PRE_COPY: u32 = 3;
/// `vfu_migr_state_t` value for RESUMING.
pub const VFU_MIGR_STATE_RESUME: u32 = 4;

/// A migration state as the device's transition callback sees it
/// (`vfu_migr_state_t`); [`MigrState::from_raw`] converts the `u32` that
/// [`MigrationDevice::transition`](super::MigrationDevice::transition)
/// receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MigrState {
    /// Stopped: no DMA, no interrupts, registers still readable.
    Stop = VFU_MIGR_STATE_STOP,
    /// Running normally (the initial state).
    Running = VFU_MIGR_STATE_RUNNING,
    /// Stopped, the final device state being saved (`read_data`).
    StopAndCopy = VFU_MIGR_STATE_STOP_AND_COPY,
    /// Running, device state being saved ahead of the stop (`read_data`).
    PreCopy = VFU_MIGR_STATE_PRE_COPY,
    /// Stopped, device state being restored (`write_data`).
    Resume = VFU_MIGR_STATE_RESUME,
}

impl MigrState {
    /// The state for a raw `VFU_MIGR_STATE_*` value, if it is one.
    pub fn from_raw(v: u32) -> Option<MigrState> {
        match v {
            VFU_MIGR_STATE_STOP => Some(MigrState::Stop),
            VFU_MIGR_STATE_RUNNING => Some(MigrState::Running),
            VFU_MIGR_STATE_STOP_AND_COPY => Some(MigrState::StopAndCopy),
            VFU_MIGR_STATE_PRE_COPY => Some(MigrState::PreCopy),
            VFU_MIGR_STATE_RESUME => Some(MigrState::Resume),
            _ => None,
        }
    }

    /// Whether the device may run (DMA, interrupts) in this state.
    pub fn is_running(self) -> bool {
        matches!(self, MigrState::Running | MigrState::PreCopy)
    }
}

impl From<MigrState> for u32 {
    fn from(s: MigrState) -> u32 {
        s as u32
    }
}

impl TryFrom<u32> for MigrState {
    type Error = Errno;
    /// `EINVAL` for an unknown state.
    fn try_from(v: u32) -> Result<MigrState> {
        MigrState::from_raw(v).ok_or(Errno::EINVAL)
    }
}

/// The only `vfu_migration_callbacks_t.version` accepted.
pub const VFU_MIGR_CALLBACKS_VERS: i32 = 2;

/// Bits of `vfio_user_device_feature.flags` holding the feature index.
pub const VFIO_DEVICE_FEATURE_MASK: u32 = 0xffff;
/// Operation flag: read the feature into `data[]`.
pub const VFIO_DEVICE_FEATURE_GET: u32 = 1 << 16;
/// Operation flag: set the feature from `data[]`.
pub const VFIO_DEVICE_FEATURE_SET: u32 = 1 << 17;
/// Operation flag: only ask whether the feature (and GET/SET) is supported.
pub const VFIO_DEVICE_FEATURE_PROBE: u32 = 1 << 18;

/// Feature index: migration capabilities (GET returns a `u64` of flags).
pub const VFIO_DEVICE_FEATURE_MIGRATION: u32 = 1;
/// Feature index: device migration state (`{device_state u32, data_fd u32}`).
pub const VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// Feature index: start DMA dirty-page logging.
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_START: u32 = 6;
/// Feature index: stop DMA dirty-page logging.
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: u32 = 7;
/// Feature index: report (and clear) the dirty-page bitmap of a range.
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: u32 = 8;

/// Migration capability flag: STOP_COPY is supported.
pub const VFIO_MIGRATION_STOP_COPY: u64 = 1 << 0;
/// Migration capability flag: the P2P states are supported (never set here).
pub const VFIO_MIGRATION_P2P: u64 = 1 << 1;
/// Migration capability flag: PRE_COPY is supported.
pub const VFIO_MIGRATION_PRE_COPY: u64 = 1 << 2;

/// Size of `struct vfio_user_device_feature` without its `data[]`.
pub const DEVICE_FEATURE_HDR_SIZE: usize = 8;
/// Size of `struct vfio_user_mig_data` without its `data[]`.
pub const MIG_DATA_HDR_SIZE: usize = 8;
/// Size of `struct vfio_user_device_feature_migration` and of
/// `struct vfio_user_device_feature_mig_state`.
const MIG_FEATURE_DATA_SIZE: usize = 8;
/// Size of `struct vfio_user_device_feature_dma_logging_control` (no ranges).
const LOGGING_CONTROL_SIZE: usize = 16;
/// Size of one `struct vfio_user_device_feature_dma_logging_range`.
const LOGGING_RANGE_SIZE: usize = 16;
/// Size of `struct vfio_user_device_feature_dma_logging_report` (no bitmap).
const LOGGING_REPORT_SIZE: usize = 24;

// Command numbers this module needs to know about (see `command_allowed`).
const CMD_REGION_READ: u16 = 9;
const CMD_REGION_WRITE: u16 = 10;
const CMD_DEVICE_FEATURE: u16 = 16;
const CMD_MIG_DATA_READ: u16 = 17;

// ---------------------------------------------------------------------------
// Device-facing interfaces
// ---------------------------------------------------------------------------

/// The device's migration callbacks (`vfu_migration_callbacks_t`).
///
/// Every error is an errno that is sent to the client unchanged.
pub trait MigrationCallbacks {
    /// The device moves to `state`, a `VFU_MIGR_STATE_*` value.
    fn transition(&self, state: u32) -> Result<()>;
    /// Fill (a prefix of) `buf` with migration data; return how many bytes
    /// were written. Zero means there is no more data. Returning more than
    /// `buf.len()` is a device bug and fails the request with `EINVAL`.
    fn read_data(&self, buf: &mut [u8]) -> Result<usize>;
    /// Consume `buf`; partial writes are not supported, so anything other
    /// than `Ok(buf.len())` fails the request.
    fn write_data(&self, buf: &[u8]) -> Result<usize>;
}

/// Dirty-page logging over the DMA controller, implemented by the context.
pub trait DirtyLogging {
    /// Start logging with the given page size. `ranges` are the `(iova,
    /// length)` pairs the client listed (possibly none); the reference
    /// implementation ignores them and logs every directly-mapped region.
    /// Must fail with `EINVAL` when there is no DMA controller, and when
    /// logging already runs with a different page size (same size: no-op).
    fn start(&self, page_size: u64, ranges: &[(u64, u64)]) -> Result<()>;
    /// Stop logging (no-op when not logging). Must fail with `EINVAL` when
    /// there is no DMA controller.
    fn stop(&self) -> Result<()>;
    /// Fill `bitmap` (exactly [`dirty_bitmap_size`]`(len, page_size)` bytes)
    /// with the dirty pages of `[iova, iova + len)` at `page_size`
    /// granularity, clearing them. Must fail with `EINVAL` when there is no
    /// DMA controller.
    fn report(&self, iova: u64, len: u64, page_size: u64, bitmap: &mut [u8]) -> Result<()>;
}

// ---------------------------------------------------------------------------
// State machine
// ---------------------------------------------------------------------------

/// A state a device can be in and a client can ask for.
fn is_usable(state: u32, pre_copy: bool) -> bool {
    match state {
        VFIO_USER_DEVICE_STATE_STOP
        | VFIO_USER_DEVICE_STATE_RUNNING
        | VFIO_USER_DEVICE_STATE_STOP_COPY
        | VFIO_USER_DEVICE_STATE_RESUMING => true,
        VFIO_USER_DEVICE_STATE_PRE_COPY => pre_copy,
        _ => false,
    }
}

/// Whether `from -> to` is one of the direct arcs.
fn is_direct_arc(from: u32, to: u32, pre_copy: bool) -> bool {
    use self::{
        VFIO_USER_DEVICE_STATE_PRE_COPY as PRE_COPY, VFIO_USER_DEVICE_STATE_RESUMING as RESUMING,
        VFIO_USER_DEVICE_STATE_RUNNING as RUNNING, VFIO_USER_DEVICE_STATE_STOP as STOP,
        VFIO_USER_DEVICE_STATE_STOP_COPY as STOP_COPY,
    };
    if !is_usable(from, pre_copy) || !is_usable(to, pre_copy) {
        return false;
    }
    matches!(
        (from, to),
        (STOP, RUNNING)
            | (STOP, STOP_COPY)
            | (STOP, RESUMING)
            | (RUNNING, STOP)
            | (RUNNING, PRE_COPY)
            | (STOP_COPY, STOP)
            | (RESUMING, STOP)
            | (PRE_COPY, RUNNING)
            | (PRE_COPY, STOP_COPY)
    )
}

/// The next state on the shortest allowed path from `from` to `to`.
///
/// Returns `Some(from)` when `from == to` (nothing to do) and `None` when the
/// request is refused: ERROR, the P2P states, values outside the enum, PRE_COPY
/// when the device has no pre-copy support, and `STOP_COPY -> PRE_COPY`.
pub fn next_step(from: u32, to: u32, pre_copy: bool) -> Option<u32> {
    use self::{
        VFIO_USER_DEVICE_STATE_PRE_COPY as PRE_COPY, VFIO_USER_DEVICE_STATE_RESUMING as RESUMING,
        VFIO_USER_DEVICE_STATE_RUNNING as RUNNING, VFIO_USER_DEVICE_STATE_STOP as STOP,
        VFIO_USER_DEVICE_STATE_STOP_COPY as STOP_COPY,
    };
    if !is_usable(from, pre_copy) || !is_usable(to, pre_copy) {
        return None;
    }
    if from == to || is_direct_arc(from, to, pre_copy) {
        return Some(to);
    }
    // Indirect requests. STOP and RUNNING are the only non-saving hubs: every
    // indirect path leaves its start state through one of them.
    match (from, to) {
        // Leaving STOP_COPY for PRE_COPY would restart a finished save.
        (STOP_COPY, PRE_COPY) => None,
        // STOP_COPY and RESUMING only lead to STOP.
        (STOP_COPY, _) | (RESUMING, _) => Some(STOP),
        // PRE_COPY heads for RUNNING (STOP_COPY is saving, so can't be
        // crossed); RUNNING's only non-saving exit is STOP.
        (PRE_COPY, _) => Some(RUNNING),
        (RUNNING, _) => Some(STOP),
        // STOP reaches PRE_COPY through RUNNING.
        (STOP, PRE_COPY) => Some(RUNNING),
        _ => None,
    }
}

/// Maps a vfio-user device state to the `vfu_migr_state_t` the device sees.
pub fn vfu_state(vfio_state: u32) -> Option<u32> {
    match vfio_state {
        VFIO_USER_DEVICE_STATE_STOP => Some(VFU_MIGR_STATE_STOP),
        VFIO_USER_DEVICE_STATE_RUNNING => Some(VFU_MIGR_STATE_RUNNING),
        VFIO_USER_DEVICE_STATE_STOP_COPY => Some(VFU_MIGR_STATE_STOP_AND_COPY),
        VFIO_USER_DEVICE_STATE_RESUMING => Some(VFU_MIGR_STATE_RESUME),
        VFIO_USER_DEVICE_STATE_PRE_COPY => Some(VFU_MIGR_STATE_PRE_COPY),
        _ => None,
    }
}

/// The host page size, the only migration page size a client may pick.
fn host_page_size() -> usize {
    let v = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE);
    usize::try_from(v.ok().flatten().unwrap_or(0))
        .ok()
        .filter(|&p| p > 0)
        .unwrap_or(4096)
}

/// Per-device migration state, present when the device registered migration
/// callbacks.
#[derive(Debug)]
pub struct Migration {
    state: Cell<u32>,
    pre_copy: bool,
    pgsize: Cell<usize>,
}

impl Migration {
    /// Migration support for a device whose callbacks declare `version`.
    ///
    /// Fails with `EINVAL` unless `version` is [`VFU_MIGR_CALLBACKS_VERS`].
    /// (The C entry point must also refuse, with `EINVAL`, a callbacks struct
    /// with a null `transition`, `read_data` or `write_data`.) The device
    /// starts RUNNING and supports pre-copy, as the reference implementation
    /// always advertises `STOP_COPY | PRE_COPY`.
    pub fn new(version: i32) -> Result<Migration> {
        Migration::with_pre_copy(version, true)
    }

    /// Like [`Migration::new`], choosing whether PRE_COPY is supported. Without
    /// it every arc touching PRE_COPY is absent and the capability flags only
    /// report STOP_COPY.
    pub fn with_pre_copy(version: i32, pre_copy: bool) -> Result<Migration> {
        if version != VFU_MIGR_CALLBACKS_VERS {
            return Err(Errno::EINVAL);
        }
        Ok(Migration {
            state: Cell::new(VFIO_USER_DEVICE_STATE_RUNNING),
            pre_copy,
            pgsize: Cell::new(host_page_size()),
        })
    }

    /// The current vfio-user device state (`VFIO_USER_DEVICE_STATE_*`).
    pub fn state(&self) -> u32 {
        self.state.get()
    }

    /// Whether the device supports PRE_COPY.
    pub fn pre_copy(&self) -> bool {
        self.pre_copy
    }

    /// The capability flags returned by a GET of the MIGRATION feature.
    pub fn flags(&self) -> u64 {
        if self.pre_copy {
            VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY
        } else {
            VFIO_MIGRATION_STOP_COPY
        }
    }

    /// Moves the device to `target`, calling `cbs.transition` once per arc of
    /// the path (see [`next_step`]).
    ///
    /// Asking for the current state succeeds without any callback. A refused
    /// or invalid target fails with `EINVAL` before any callback. A callback
    /// error is returned as is and leaves the device in the last state it
    /// reached.
    pub fn set_state(&self, cbs: &dyn MigrationCallbacks, target: u32) -> Result<()> {
        // ERROR, the P2P states and anything outside the enum are refused
        // even as a no-op request. (The reference accepts a target equal to
        // the number of states here and then reads past its table.)
        if !is_usable(target, self.pre_copy) {
            return Err(Errno::EINVAL);
        }
        // A path has at most three arcs; the bound only guarantees
        // termination should a callback re-enter and move the state around.
        for _ in 0..VFIO_USER_DEVICE_NUM_STATES {
            let current = self.state.get();
            if current == target {
                return Ok(());
            }
            let next = next_step(current, target, self.pre_copy).ok_or(Errno::EINVAL)?;
            let vfu = vfu_state(next).ok_or(Errno::EINVAL)?;
            cbs.transition(vfu)?;
            self.state.set(next);
        }
        if self.state.get() == target {
            Ok(())
        } else {
            Err(Errno::EINVAL)
        }
    }

    /// What a device reset does to the migration state.
    ///
    /// The reference implementation leaves the migration state untouched on
    /// `VFIO_USER_DEVICE_RESET`, and so does this, except that a device in
    /// ERROR (which this module never enters) goes back to RUNNING. No
    /// callback is made. (A lost connection is different: see
    /// [`Migration::lost_connection`].)
    pub fn reset(&self) {
        if self.state.get() == VFIO_USER_DEVICE_STATE_ERROR {
            self.state.set(VFIO_USER_DEVICE_STATE_RUNNING);
        }
    }

    /// What losing the client does to the migration state: the device goes
    /// back to RUNNING through the legal arcs (`STOP_COPY -> STOP ->
    /// RUNNING`, `RESUMING -> STOP -> RUNNING`, `STOP -> RUNNING`,
    /// `PRE_COPY -> RUNNING`), `cbs.transition` seeing each arc in order, the
    /// way closing a VFIO device fd returns a Linux VFIO device to RUNNING.
    /// A half-done migration cannot be finished by anyone once its client
    /// is gone, and a device left stopped would refuse the next client's
    /// region accesses.
    ///
    /// The reference implementation (since its commit 4f4fce4) leaves the
    /// state alone here as well; this is a deliberate difference. An
    /// explicit `VFIO_USER_DEVICE_RESET` still goes through
    /// [`Migration::reset`] and keeps the state.
    ///
    /// If a transition callback fails, the state is set to RUNNING anyway
    /// (no client is left to report the error to, and the reset callback
    /// that follows tells the device to start afresh); the callback's error
    /// is returned for logging. The same happens from ERROR and from any
    /// state with no arc to RUNNING.
    pub fn lost_connection(&self, cbs: &dyn MigrationCallbacks) -> Result<()> {
        let r = if is_usable(self.state.get(), self.pre_copy) {
            self.set_state(cbs, VFIO_USER_DEVICE_STATE_RUNNING)
        } else if self.state.get() == VFIO_USER_DEVICE_STATE_ERROR {
            Ok(())
        } else {
            Err(Errno::EINVAL)
        };
        self.state.set(VFIO_USER_DEVICE_STATE_RUNNING);
        r
    }

    /// The migration page size advertised in the version reply
    /// (`capabilities.migration.pgsize`); the host page size by default.
    pub fn pgsize(&self) -> usize {
        self.pgsize.get()
    }

    /// Records the client's `migration.pgsize`; anything but the host page
    /// size is refused with `EINVAL`.
    pub fn set_pgsize(&self, pgsize: usize) -> Result<()> {
        if pgsize != host_page_size() {
            return Err(Errno::EINVAL);
        }
        self.pgsize.set(pgsize);
        Ok(())
    }

    #[cfg(test)]
    fn force_state(&self, state: u32) {
        self.state.set(state);
    }
}

// ---------------------------------------------------------------------------
// Byte helpers
// ---------------------------------------------------------------------------

fn get_u32(b: &[u8], off: usize) -> Result<u32> {
    let end = off.checked_add(4).ok_or(Errno::EINVAL)?;
    let s = b.get(off..end).ok_or(Errno::EINVAL)?;
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    Ok(u32::from_le_bytes(a))
}

fn get_u64(b: &[u8], off: usize) -> Result<u64> {
    let end = off.checked_add(8).ok_or(Errno::EINVAL)?;
    let s = b.get(off..end).ok_or(Errno::EINVAL)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Ok(u64::from_le_bytes(a))
}

fn set_u32(b: &mut [u8], off: usize, v: u32) -> Result<()> {
    let end = off.checked_add(4).ok_or(Errno::EINVAL)?;
    b.get_mut(off..end)
        .ok_or(Errno::EINVAL)?
        .copy_from_slice(&v.to_le_bytes());
    Ok(())
}

/// Bytes of a dirty bitmap covering `length` bytes at `page_size`
/// granularity: one bit per page, rounded up to whole `u64` words.
///
/// `EINVAL` when `page_size` is zero or larger than `length`. Cannot overflow.
pub fn dirty_bitmap_size(length: u64, page_size: u64) -> Result<u64> {
    if page_size == 0 || length < page_size {
        return Err(Errno::EINVAL);
    }
    let pages = length.div_ceil(page_size);
    // pages.div_ceil(64) <= 2^58, so the product fits easily.
    Ok(pages.div_ceil(64) * 8)
}

// ---------------------------------------------------------------------------
// VFIO_USER_MIG_DATA_READ / WRITE
// ---------------------------------------------------------------------------

/// Common checks of a migration data request; returns the requested size.
fn check_mig_data(
    mig: Option<&Migration>,
    payload: &[u8],
    states: &[u32],
    max_data_xfer_size: usize,
) -> Result<usize> {
    if payload.len() < MIG_DATA_HDR_SIZE {
        return Err(Errno::EINVAL);
    }
    let mig = mig.ok_or(Errno::EINVAL)?;
    if !states.contains(&mig.state()) {
        return Err(Errno::EINVAL);
    }
    let argsz = get_u32(payload, 0)?;
    let size = get_u32(payload, 4)?;
    let size = usize::try_from(size).map_err(|_| Errno::EINVAL)?;
    if size > max_data_xfer_size {
        return Err(Errno::EINVAL);
    }
    if u64::from(argsz) < MIG_DATA_HDR_SIZE as u64 + size as u64 {
        return Err(Errno::EINVAL);
    }
    Ok(size)
}

/// Handles `VFIO_USER_MIG_DATA_READ` (device in PRE_COPY or STOP_COPY).
///
/// On success `reply` holds `{argsz = 8 + n, size = n}` followed by `size`
/// data bytes of which the device filled the first `n` (the rest are zero):
/// the message length is header + requested size, as the reference sends and
/// as its client insists on receiving. The device's `read_data` writes
/// straight into `reply`. On failure `reply` is left empty.
///
/// `reply` may come in holding earlier bytes (a reused buffer): they are
/// kept rather than zeroed first, and only the bytes the device leaves
/// unwritten are zeroed afterwards. So a buffer the size of the chunk costs
/// no fill per message; `read_data` may see stale bytes of earlier replies
/// of the same context where it is about to write.
///
/// `EINVAL` for a short payload, no migration, a wrong state, a size above
/// `max_data_xfer_size` or an `argsz` below 8 + size, and a device claiming
/// more bytes than asked for (the reference would trust it and overflow);
/// otherwise the callback's errno.
pub fn handle_mig_data_read(
    mig: Option<&Migration>,
    cbs: &dyn MigrationCallbacks,
    payload: &[u8],
    max_data_xfer_size: usize,
    reply: &mut Vec<u8>,
) -> Result<()> {
    let size = check_mig_data(
        mig,
        payload,
        &[
            VFIO_USER_DEVICE_STATE_PRE_COPY,
            VFIO_USER_DEVICE_STATE_STOP_COPY,
        ],
        max_data_xfer_size,
    )
    .inspect_err(|_| reply.clear())?;
    let Some(total) = MIG_DATA_HDR_SIZE.checked_add(size) else {
        reply.clear();
        return Err(Errno::EINVAL);
    };
    // Zeroes only what the buffer never held (nothing, once it has been
    // this large): what the device leaves unwritten is zeroed below.
    if reply.len() < total {
        reply.resize(total, 0);
    } else {
        reply.truncate(total);
    }
    let result = fill_mig_data(cbs, reply, size);
    if result.is_err() {
        reply.clear();
    }
    result
}

fn fill_mig_data(cbs: &dyn MigrationCallbacks, reply: &mut [u8], size: usize) -> Result<()> {
    let buf = reply.get_mut(MIG_DATA_HDR_SIZE..).ok_or(Errno::EINVAL)?;
    let n = cbs.read_data(buf)?;
    if n > size {
        return Err(Errno::EINVAL);
    }
    // What the device did not write may hold earlier bytes: zeroed.
    buf[n..].fill(0);
    // n <= size <= u32::MAX, checked above.
    let n32 = u32::try_from(n).map_err(|_| Errno::EINVAL)?;
    let argsz = n32
        .checked_add(MIG_DATA_HDR_SIZE as u32)
        .ok_or(Errno::EINVAL)?;
    set_u32(reply, 0, argsz)?;
    set_u32(reply, 4, n32)
}

/// Handles `VFIO_USER_MIG_DATA_WRITE` (device in RESUMING).
///
/// Hands the `size` data bytes following the 8-byte header to the device's
/// `write_data`; the reply body is empty, as in the reference. `EINVAL` for
/// a short payload or one not holding `size` data bytes, no migration, a
/// wrong state, a size above `max_data_xfer_size`, an `argsz` below 8 + size,
/// or a partial write; otherwise the callback's errno.
pub fn handle_mig_data_write(
    mig: Option<&Migration>,
    cbs: &dyn MigrationCallbacks,
    payload: &[u8],
    max_data_xfer_size: usize,
) -> Result<Vec<u8>> {
    let size = check_mig_data(
        mig,
        payload,
        &[VFIO_USER_DEVICE_STATE_RESUMING],
        max_data_xfer_size,
    )?;
    let end = MIG_DATA_HDR_SIZE.checked_add(size).ok_or(Errno::EINVAL)?;
    let data = payload.get(MIG_DATA_HDR_SIZE..end).ok_or(Errno::EINVAL)?;
    let n = cbs.write_data(data)?;
    if n != size {
        return Err(Errno::EINVAL);
    }
    Ok(Vec::new())
}

// ---------------------------------------------------------------------------
// Command gating
// ---------------------------------------------------------------------------

/// Whether the device is in STOP_COPY; region accesses must then be refused
/// with `EINVAL` (the reference checks this while validating the access).
pub fn device_is_stopped_and_copying(mig: Option<&Migration>) -> bool {
    mig.is_some_and(|m| m.state() == VFIO_USER_DEVICE_STATE_STOP_COPY)
}

/// Whether command `cmd` may run in the current migration state.
///
/// While the device is STOP or STOP_COPY only REGION_READ, REGION_WRITE,
/// DEVICE_FEATURE and MIG_DATA_READ are executed; anything else is answered
/// with `EINVAL` (before any quiescing). Other states, and devices without
/// migration, allow everything.
pub fn command_allowed(mig: Option<&Migration>, cmd: u16) -> Result<()> {
    let Some(mig) = mig else {
        return Ok(());
    };
    let state = mig.state();
    if state != VFIO_USER_DEVICE_STATE_STOP && state != VFIO_USER_DEVICE_STATE_STOP_COPY {
        return Ok(());
    }
    match cmd {
        CMD_REGION_READ | CMD_REGION_WRITE | CMD_DEVICE_FEATURE | CMD_MIG_DATA_READ => Ok(()),
        _ => Err(Errno::EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::VecDeque;

    const STOP: u32 = VFIO_USER_DEVICE_STATE_STOP;
    const RUNNING: u32 = VFIO_USER_DEVICE_STATE_RUNNING;
    const STOP_COPY: u32 = VFIO_USER_DEVICE_STATE_STOP_COPY;
    const RESUMING: u32 = VFIO_USER_DEVICE_STATE_RESUMING;
    const PRE_COPY: u32 = VFIO_USER_DEVICE_STATE_PRE_COPY;
    const ERROR: u32 = VFIO_USER_DEVICE_STATE_ERROR;
    const RUNNING_P2P: u32 = VFIO_USER_DEVICE_STATE_RUNNING_P2P;
    const PRE_COPY_P2P: u32 = VFIO_USER_DEVICE_STATE_PRE_COPY_P2P;

    const GET: u32 = VFIO_DEVICE_FEATURE_GET;
    const SET: u32 = VFIO_DEVICE_FEATURE_SET;
    const PROBE: u32 = VFIO_DEVICE_FEATURE_PROBE;

    /// A device that records what it is asked and can be told to fail.
    #[derive(Default)]
    struct FakeDevice {
        transitions: RefCell<Vec<u32>>,
        /// Fail the transition callback from this call index (0-based) on.
        fail_transition_at: Cell<Option<usize>>,
        fail_errno: Cell<i32>,
        /// Bytes read_data produces.
        data: RefCell<Vec<u8>>,
        /// If set, read_data claims this many bytes regardless of the buffer.
        read_claim: Cell<Option<usize>>,
        read_calls: RefCell<Vec<usize>>,
        written: RefCell<Vec<u8>>,
        /// If set, write_data claims this many bytes.
        write_claim: Cell<Option<usize>>,
        fail_data: Cell<bool>,
    }

    impl MigrationCallbacks for FakeDevice {
        fn transition(&self, state: u32) -> Result<()> {
            let n = self.transitions.borrow().len();
            if self.fail_transition_at.get().is_some_and(|at| n >= at) {
                return Err(Errno(self.fail_errno.get()));
            }
            self.transitions.borrow_mut().push(state);
            Ok(())
        }
        fn read_data(&self, buf: &mut [u8]) -> Result<usize> {
            self.read_calls.borrow_mut().push(buf.len());
            if self.fail_data.get() {
                return Err(Errno(self.fail_errno.get()));
            }
            let data = self.data.borrow();
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            Ok(self.read_claim.get().unwrap_or(n))
        }
        fn write_data(&self, buf: &[u8]) -> Result<usize> {
            if self.fail_data.get() {
                return Err(Errno(self.fail_errno.get()));
            }
            self.written.borrow_mut().extend_from_slice(buf);
            Ok(self.write_claim.get().unwrap_or(buf.len()))
        }
    }

    #[derive(Debug, PartialEq, Eq, Clone)]
    enum LogCall {
        Start(u64, Vec<(u64, u64)>),
        Stop,
        Report(u64, u64, u64, usize),
    }

    #[derive(Default)]
    struct FakeLog {
        calls: RefCell<Vec<LogCall>>,
        fail: Cell<Option<i32>>,
    }

    impl DirtyLogging for FakeLog {
        fn start(&self, page_size: u64, ranges: &[(u64, u64)]) -> Result<()> {
            self.calls
                .borrow_mut()
                .push(LogCall::Start(page_size, ranges.to_vec()));
            self.fail.get().map_or(Ok(()), |e| Err(Errno(e)))
        }
        fn stop(&self) -> Result<()> {
            self.calls.borrow_mut().push(LogCall::Stop);
            self.fail.get().map_or(Ok(()), |e| Err(Errno(e)))
        }
        fn report(&self, iova: u64, len: u64, page_size: u64, bitmap: &mut [u8]) -> Result<()> {
            self.calls
                .borrow_mut()
                .push(LogCall::Report(iova, len, page_size, bitmap.len()));
            if let Some(e) = self.fail.get() {
                return Err(Errno(e));
            }
            for (i, b) in bitmap.iter_mut().enumerate() {
                *b = i as u8 ^ 0xa5;
            }
            Ok(())
        }
    }

    // ---- independent reference: BFS over an explicit arc list ----

    fn arcs(pre_copy: bool) -> Vec<(u32, u32)> {
        let all = [
            (STOP, RUNNING),
            (STOP, STOP_COPY),
            (STOP, RESUMING),
            (RUNNING, STOP),
            (RUNNING, PRE_COPY),
            (STOP_COPY, STOP),
            (RESUMING, STOP),
            (PRE_COPY, RUNNING),
            (PRE_COPY, STOP_COPY),
        ];
        all.iter()
            .copied()
            .filter(|&(a, b)| pre_copy || (a != PRE_COPY && b != PRE_COPY))
            .collect()
    }

    /// Every shortest path from `from` to `to` (excluding `from`, including
    /// `to`) whose interior avoids saving states; empty if none.
    fn bfs_paths(from: u32, to: u32, pre_copy: bool) -> Vec<Vec<u32>> {
        let saving = |s: u32| s == PRE_COPY || s == STOP_COPY;
        let arcs = arcs(pre_copy);
        let mut found: Vec<Vec<u32>> = Vec::new();
        let mut queue: VecDeque<Vec<u32>> = VecDeque::new();
        queue.push_back(vec![from]);
        while let Some(path) = queue.pop_front() {
            if !found.is_empty() && path.len() > found[0].len() {
                break;
            }
            let last = *path.last().unwrap();
            if last == to && path.len() > 1 {
                found.push(path);
                continue;
            }
            if path.len() > 1 && saving(last) {
                continue;
            }
            if path.len() > 8 {
                continue;
            }
            for &(a, b) in &arcs {
                if a == last && !path.contains(&b) {
                    let mut p = path.clone();
                    p.push(b);
                    queue.push_back(p);
                }
            }
        }
        found.into_iter().map(|p| p[1..].to_vec()).collect()
    }

    /// The expected transition sequence (`None` = refused) per the rules.
    fn expected_path(from: u32, to: u32, pre_copy: bool) -> Option<Vec<u32>> {
        let usable = |s: u32| {
            matches!(s, STOP | RUNNING | STOP_COPY | RESUMING) || (s == PRE_COPY && pre_copy)
        };
        if !usable(from) || !usable(to) {
            return None;
        }
        if from == to {
            return Some(vec![]);
        }
        if from == STOP_COPY && to == PRE_COPY {
            return None;
        }
        let paths = bfs_paths(from, to, pre_copy);
        assert!(
            paths.len() <= 1,
            "ambiguous shortest paths {from}->{to}: {paths:?}"
        );
        paths.into_iter().next()
    }

    fn mig_in(state: u32, pre_copy: bool) -> Migration {
        let m = Migration::with_pre_copy(VFU_MIGR_CALLBACKS_VERS, pre_copy).unwrap();
        m.force_state(state);
        m
    }

    #[test]
    fn full_transition_table_matches_bfs() {
        let mut reachable_pairs = 0;
        for pre_copy in [true, false] {
            for from in 0..VFIO_USER_DEVICE_NUM_STATES + 2 {
                for to in 0..VFIO_USER_DEVICE_NUM_STATES + 2 {
                    let expected = expected_path(from, to, pre_copy);
                    // next_step agrees with the first arc of the BFS path.
                    let step = next_step(from, to, pre_copy);
                    match &expected {
                        None => assert_eq!(step, None, "{from}->{to} pre_copy={pre_copy}"),
                        Some(p) if p.is_empty() => assert_eq!(step, Some(from)),
                        Some(p) => assert_eq!(step, Some(p[0]), "{from}->{to} pre_copy={pre_copy}"),
                    }

                    // set_state walks the whole path through the callback.
                    let m = mig_in(from, pre_copy);
                    let dev = FakeDevice::default();
                    let r = m.set_state(&dev, to);
                    match expected {
                        None => {
                            assert_eq!(r, Err(Errno::EINVAL), "{from}->{to}");
                            assert!(dev.transitions.borrow().is_empty());
                            assert_eq!(m.state(), from);
                        }
                        Some(path) => {
                            reachable_pairs += 1;
                            assert_eq!(r, Ok(()), "{from}->{to}");
                            let vfu: Vec<u32> =
                                path.iter().map(|&s| vfu_state(s).unwrap()).collect();
                            assert_eq!(*dev.transitions.borrow(), vfu, "{from}->{to}");
                            assert_eq!(m.state(), to);
                        }
                    }
                }
            }
        }
        // 5 usable states with pre-copy (25 pairs minus STOP_COPY->PRE_COPY),
        // 4 without (16 pairs).
        assert_eq!(reachable_pairs, 24 + 16);
    }

    #[test]
    fn spot_check_paths() {
        let path = |from, to| {
            let m = mig_in(from, true);
            let dev = FakeDevice::default();
            m.set_state(&dev, to).unwrap();
            let t = dev.transitions.borrow().clone();
            t
        };
        assert_eq!(
            path(RESUMING, PRE_COPY),
            vec![
                VFU_MIGR_STATE_STOP,
                VFU_MIGR_STATE_RUNNING,
                VFU_MIGR_STATE_PRE_COPY
            ]
        );
        assert_eq!(
            path(RUNNING, STOP_COPY),
            vec![VFU_MIGR_STATE_STOP, VFU_MIGR_STATE_STOP_AND_COPY]
        );
        assert_eq!(
            path(PRE_COPY, RESUMING),
            vec![
                VFU_MIGR_STATE_RUNNING,
                VFU_MIGR_STATE_STOP,
                VFU_MIGR_STATE_RESUME
            ]
        );
        assert_eq!(
            path(PRE_COPY, STOP_COPY),
            vec![VFU_MIGR_STATE_STOP_AND_COPY]
        );
        assert_eq!(path(STOP, STOP), Vec::<u32>::new());
        // Without pre-copy, RUNNING -> PRE_COPY is refused.
        assert_eq!(next_step(RUNNING, PRE_COPY, false), None);
        assert_eq!(next_step(RUNNING, PRE_COPY, true), Some(PRE_COPY));
    }

    #[test]
    fn invalid_and_refused_requests() {
        let dev = FakeDevice::default();
        let m = Migration::new(VFU_MIGR_CALLBACKS_VERS).unwrap();
        assert_eq!(m.state(), RUNNING);
        for bad in [ERROR, RUNNING_P2P, PRE_COPY_P2P, 8, 9, 0xabcd, u32::MAX] {
            assert_eq!(m.set_state(&dev, bad), Err(Errno::EINVAL), "{bad}");
            assert_eq!(m.state(), RUNNING);
        }
        m.set_state(&dev, STOP_COPY).unwrap();
        dev.transitions.borrow_mut().clear();
        assert_eq!(m.set_state(&dev, PRE_COPY), Err(Errno::EINVAL));
        assert_eq!(m.state(), STOP_COPY);
        assert!(dev.transitions.borrow().is_empty());
    }

    #[test]
    fn callbacks_version_checked() {
        assert_eq!(Migration::new(1).unwrap_err(), Errno::EINVAL);
        assert_eq!(Migration::new(3).unwrap_err(), Errno::EINVAL);
        let m = Migration::new(2).unwrap();
        assert!(m.pre_copy());
        assert_eq!(
            m.flags(),
            VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY
        );
        let m = Migration::with_pre_copy(2, false).unwrap();
        assert_eq!(m.flags(), VFIO_MIGRATION_STOP_COPY);
    }

    #[test]
    fn callback_failure_mid_chain_keeps_last_reached_state() {
        // RESUMING -> PRE_COPY is STOP, RUNNING, PRE_COPY; fail the second arc.
        let m = mig_in(RESUMING, true);
        let dev = FakeDevice::default();
        dev.fail_transition_at.set(Some(1));
        dev.fail_errno.set(0xbeef);
        assert_eq!(m.set_state(&dev, PRE_COPY), Err(Errno(0xbeef)));
        assert_eq!(*dev.transitions.borrow(), vec![VFU_MIGR_STATE_STOP]);
        assert_eq!(m.state(), STOP);
        // The device is not wedged: a later request proceeds from STOP.
        dev.fail_transition_at.set(None);
        m.set_state(&dev, RUNNING).unwrap();
        assert_eq!(m.state(), RUNNING);

        // Failure on the very first arc leaves the state untouched.
        let m = mig_in(STOP_COPY, true);
        let dev = FakeDevice::default();
        dev.fail_transition_at.set(Some(0));
        dev.fail_errno.set(libc::EIO);
        assert_eq!(m.set_state(&dev, RUNNING), Err(Errno::EIO));
        assert_eq!(m.state(), STOP_COPY);
    }

    #[test]
    fn reset_only_leaves_error() {
        let m = mig_in(ERROR, true);
        m.reset();
        assert_eq!(m.state(), RUNNING);
        let m = mig_in(STOP_COPY, true);
        m.reset();
        assert_eq!(m.state(), STOP_COPY);
    }

    #[test]
    fn lost_connection_walks_back_to_running() {
        use self::{VFU_MIGR_STATE_RUNNING as V_RUN, VFU_MIGR_STATE_STOP as V_STOP};
        let cases: [(u32, &[u32]); 5] = [
            (RUNNING, &[]),
            (STOP, &[V_RUN]),
            (STOP_COPY, &[V_STOP, V_RUN]),
            (RESUMING, &[V_STOP, V_RUN]),
            (PRE_COPY, &[V_RUN]),
        ];
        for (from, arcs) in cases {
            let m = mig_in(from, true);
            let dev = FakeDevice::default();
            m.lost_connection(&dev).unwrap();
            assert_eq!(m.state(), RUNNING, "from {from}");
            assert_eq!(*dev.transitions.borrow(), arcs, "from {from}");
        }
        // ERROR: no arc, straight to RUNNING.
        let m = mig_in(ERROR, true);
        let dev = FakeDevice::default();
        m.lost_connection(&dev).unwrap();
        assert_eq!(m.state(), RUNNING);
        assert!(dev.transitions.borrow().is_empty());
        // A failing callback is reported, and the device is RUNNING anyway.
        let m = mig_in(STOP_COPY, true);
        let dev = FakeDevice::default();
        dev.fail_transition_at.set(Some(1));
        dev.fail_errno.set(libc::EIO);
        assert_eq!(m.lost_connection(&dev), Err(Errno::EIO));
        assert_eq!(*dev.transitions.borrow(), [VFU_MIGR_STATE_STOP]);
        assert_eq!(m.state(), RUNNING);
    }

    #[test]
    fn pgsize_only_host_page_size() {
        let m = Migration::new(2).unwrap();
        let host = host_page_size();
        assert_eq!(m.pgsize(), host);
        assert_eq!(m.set_pgsize(host * 2), Err(Errno::EINVAL));
        assert_eq!(m.set_pgsize(0), Err(Errno::EINVAL));
        assert_eq!(m.set_pgsize(host), Ok(()));
    }

    // ---- DEVICE_FEATURE ----

    fn feat(argsz: u32, flags: u32, data: &[u8]) -> Vec<u8> {
        let mut v = argsz.to_le_bytes().to_vec();
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    fn run(mig: Option<&Migration>, payload: &[u8]) -> (Result<Vec<u8>>, FakeDevice, FakeLog) {
        let dev = FakeDevice::default();
        let log = FakeLog::default();
        let r = handle_device_feature(mig, &dev, &log, payload);
        (r, dev, log)
    }

    #[test]
    fn feature_get_migration_flags() {
        let m = Migration::new(2).unwrap();
        let flags = GET | VFIO_DEVICE_FEATURE_MIGRATION;
        let (r, _, _) = run(Some(&m), &feat(16, flags, &[]));
        let mut want = feat(16, flags, &[]);
        want.extend_from_slice(&(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY).to_le_bytes());
        assert_eq!(r.unwrap(), want);
        // argsz larger than needed: reply argsz is still 16.
        let (r, _, _) = run(Some(&m), &feat(4096, flags, &[0; 8]));
        assert_eq!(r.unwrap(), want);
        // argsz too small.
        let (r, _, _) = run(Some(&m), &feat(15, flags, &[0; 8]));
        assert_eq!(r, Err(Errno::EINVAL));
        let (r, _, _) = run(Some(&m), &feat(8, flags, &[]));
        assert_eq!(r, Err(Errno::EINVAL));
    }

    #[test]
    fn feature_get_device_state() {
        let m = mig_in(RESUMING, true);
        let flags = GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
        let (r, dev, _) = run(Some(&m), &feat(16, flags, &[]));
        let mut want = feat(16, flags, &[]);
        want.extend_from_slice(&RESUMING.to_le_bytes());
        want.extend_from_slice(&0u32.to_le_bytes());
        assert_eq!(r.unwrap(), want);
        assert!(dev.transitions.borrow().is_empty());
    }

    #[test]
    fn feature_set_device_state() {
        let m = Migration::new(2).unwrap();
        let flags = SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
        let mut data = STOP_COPY.to_le_bytes().to_vec();
        data.extend_from_slice(&0u32.to_le_bytes());
        let req = feat(16, flags, &data);
        let (r, dev, _) = run(Some(&m), &req);
        assert_eq!(r.unwrap(), req, "SET replies with a copy of the request");
        assert_eq!(
            *dev.transitions.borrow(),
            vec![VFU_MIGR_STATE_STOP, VFU_MIGR_STATE_STOP_AND_COPY]
        );
        assert_eq!(m.state(), STOP_COPY);

        // argsz smaller than the payload.
        let (r, dev, _) = run(Some(&m), &feat(8, flags, &STOP.to_le_bytes()));
        assert_eq!(r, Err(Errno::EINVAL));
        assert!(dev.transitions.borrow().is_empty());
        // Missing device_state.
        let (r, _, _) = run(Some(&m), &feat(8, flags, &[]));
        assert_eq!(r, Err(Errno::EINVAL));
        let (r, _, _) = run(Some(&m), &feat(11, flags, &[1, 0, 0]));
        assert_eq!(r, Err(Errno::EINVAL));
        // Refused transition.
        let (r, _, _) = run(Some(&m), &feat(16, flags, &feat(PRE_COPY, 0, &[])));
        assert_eq!(r, Err(Errno::EINVAL));
        // Nonexistent state.
        let (r, _, _) = run(Some(&m), &feat(16, flags, &feat(0xabcd, 0, &[])));
        assert_eq!(r, Err(Errno::EINVAL));
        assert_eq!(m.state(), STOP_COPY);

        // Callback errno goes through.
        let dev = FakeDevice::default();
        dev.fail_transition_at.set(Some(0));
        dev.fail_errno.set(0xbeef);
        let r = handle_device_feature(
            Some(&m),
            &dev,
            &FakeLog::default(),
            &feat(16, flags, &feat(RUNNING, 0, &[])),
        );
        assert_eq!(r, Err(Errno(0xbeef)));
        assert_eq!(m.state(), STOP_COPY);
    }

    #[test]
    fn feature_operation_rules() {
        let m = Migration::new(2).unwrap();
        let einval = |mig: Option<&Migration>, p: &[u8]| {
            let (r, dev, log) = run(mig, p);
            assert_eq!(r, Err(Errno::EINVAL), "{p:?}");
            assert!(dev.transitions.borrow().is_empty());
            assert!(log.calls.borrow().is_empty());
        };
        // Short payloads.
        einval(Some(&m), &[]);
        einval(
            Some(&m),
            &feat(16, GET | VFIO_DEVICE_FEATURE_MIGRATION, &[])[..7],
        );
        // SET of a GET-only feature.
        einval(
            Some(&m),
            &feat(16, SET | VFIO_DEVICE_FEATURE_MIGRATION, &[0; 8]),
        );
        // GET of a SET-only feature.
        einval(
            Some(&m),
            &feat(64, GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START, &[0; 16]),
        );
        // GET + SET without PROBE.
        einval(
            Some(&m),
            &feat(
                16,
                GET | SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                &feat(RUNNING, 0, &[]),
            ),
        );
        // No operation at all.
        einval(
            Some(&m),
            &feat(16, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, &[0; 8]),
        );
        // Unknown feature indexes, with every operation.
        for f in [0, 3, 4, 5, 9, 0xffff] {
            for op in [GET, SET, PROBE, PROBE | GET] {
                einval(Some(&m), &feat(64, op | f, &[0; 32]));
            }
        }
        // Unknown operation bits.
        einval(
            Some(&m),
            &feat(16, (1 << 19) | GET | VFIO_DEVICE_FEATURE_MIGRATION, &[]),
        );
        // No migration: every feature refused.
        for f in [1, 2, 6, 7, 8] {
            for op in [GET, SET, PROBE] {
                einval(None, &feat(64, op | f, &[0; 32]));
            }
        }
    }

    #[test]
    fn feature_probe() {
        let m = Migration::new(2).unwrap();
        let p = feat(8, PROBE | VFIO_DEVICE_FEATURE_MIGRATION, &[]);
        assert_eq!(run(Some(&m), &p).0.unwrap(), p);
        let p = feat(8, PROBE | GET | VFIO_DEVICE_FEATURE_MIGRATION, &[]);
        assert_eq!(run(Some(&m), &p).0.unwrap(), p);
        // PROBE + SET on a GET-only feature.
        let p = feat(8, PROBE | SET | GET | VFIO_DEVICE_FEATURE_MIGRATION, &[]);
        assert_eq!(run(Some(&m), &p).0, Err(Errno::EINVAL));
        // PROBE + GET + SET on a feature with both.
        let p = feat(
            8,
            PROBE | SET | GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &[],
        );
        assert_eq!(run(Some(&m), &p).0.unwrap(), p);
        // argsz below the payload.
        let p = feat(2, PROBE | VFIO_DEVICE_FEATURE_MIGRATION, &[]);
        assert_eq!(run(Some(&m), &p).0, Err(Errno::EINVAL));
        let p = feat(11, PROBE | VFIO_DEVICE_FEATURE_DMA_LOGGING_START, &[0; 4]);
        assert_eq!(run(Some(&m), &p).0, Err(Errno::EINVAL));
        // Probing SET does not run anything.
        let p = feat(
            16,
            PROBE | SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &feat(STOP, 0, &[]),
        );
        let (r, dev, _) = run(Some(&m), &p);
        assert_eq!(r.unwrap(), p);
        assert!(dev.transitions.borrow().is_empty());
        assert_eq!(m.state(), RUNNING);
        // Probing the logging features.
        for f in [6, 7, 8] {
            let p = feat(8, PROBE | f, &[]);
            let (r, _, log) = run(Some(&m), &p);
            assert_eq!(r.unwrap(), p);
            assert!(log.calls.borrow().is_empty());
        }
    }

    fn control(page_size: u64, num_ranges: u32, ranges: &[(u64, u64)]) -> Vec<u8> {
        let mut v = page_size.to_le_bytes().to_vec();
        v.extend_from_slice(&num_ranges.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        for &(a, l) in ranges {
            v.extend_from_slice(&a.to_le_bytes());
            v.extend_from_slice(&l.to_le_bytes());
        }
        v
    }

    #[test]
    fn logging_start_stop() {
        let m = Migration::new(2).unwrap();
        let start = SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START;
        let stop = SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP;

        // num_ranges = 0.
        let p = feat(24, start, &control(4096, 0, &[]));
        let (r, _, log) = run(Some(&m), &p);
        assert_eq!(r.unwrap(), p);
        assert_eq!(*log.calls.borrow(), vec![LogCall::Start(4096, vec![])]);

        // Two ranges.
        let ranges = [(0x1000, 0x2000), (0x10_0000, 0x4000)];
        let p = feat(56, start, &control(4096, 2, &ranges));
        let (r, _, log) = run(Some(&m), &p);
        assert_eq!(r.unwrap(), p);
        assert_eq!(
            *log.calls.borrow(),
            vec![LogCall::Start(4096, ranges.to_vec())]
        );

        // num_ranges overflowing the payload, including a huge count.
        for n in [1, 3, u32::MAX] {
            let p = feat(
                56,
                start,
                &control(4096, n, &ranges[..n.min(2) as usize - 1]),
            );
            let (r, _, log) = run(Some(&m), &p);
            assert_eq!(r, Err(Errno::EINVAL), "num_ranges {n}");
            assert!(log.calls.borrow().is_empty());
        }
        // Short control structure.
        let p = feat(20, start, &control(4096, 0, &[])[..12]);
        assert_eq!(run(Some(&m), &p).0, Err(Errno::EINVAL));
        let p = feat(8, start, &[]);
        assert_eq!(run(Some(&m), &p).0, Err(Errno::EINVAL));
        // Zero page size.
        let p = feat(24, start, &control(0, 0, &[]));
        let (r, _, log) = run(Some(&m), &p);
        assert_eq!(r, Err(Errno::EINVAL));
        assert!(log.calls.borrow().is_empty());
        // argsz below payload.
        let p = feat(23, start, &control(4096, 0, &[]));
        assert_eq!(run(Some(&m), &p).0, Err(Errno::EINVAL));
        // The controller's errno goes through.
        let log = FakeLog::default();
        log.fail.set(Some(libc::EINVAL));
        let r = handle_device_feature(
            Some(&m),
            &FakeDevice::default(),
            &log,
            &feat(24, start, &control(2048, 0, &[])),
        );
        assert_eq!(r, Err(Errno::EINVAL));

        // Stop, with and without a control structure.
        let p = feat(24, stop, &control(4096, 0, &[]));
        let (r, _, log) = run(Some(&m), &p);
        assert_eq!(r.unwrap(), p);
        assert_eq!(*log.calls.borrow(), vec![LogCall::Stop]);
        let p = feat(8, stop, &[]);
        let (r, _, log) = run(Some(&m), &p);
        assert_eq!(r.unwrap(), p);
        assert_eq!(*log.calls.borrow(), vec![LogCall::Stop]);
        let log = FakeLog::default();
        log.fail.set(Some(libc::ENOENT));
        let r = handle_device_feature(Some(&m), &FakeDevice::default(), &log, &feat(8, stop, &[]));
        assert_eq!(r, Err(Errno::ENOENT));
    }

    fn report(iova: u64, len: u64, page_size: u64) -> Vec<u8> {
        let mut v = iova.to_le_bytes().to_vec();
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&page_size.to_le_bytes());
        v
    }

    #[test]
    fn logging_report() {
        let m = Migration::new(2).unwrap();
        let flags = GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT;
        let rep = report(0x10000, 0x20000, 4096); // 32 pages -> 8 bytes
        let p = feat(40, flags, &rep);
        let (r, _, log) = run(Some(&m), &p);
        let r = r.unwrap();
        assert_eq!(r.len(), 40);
        assert_eq!(&r[..4], &40u32.to_le_bytes());
        assert_eq!(&r[4..32], &p[4..32]);
        let want: Vec<u8> = (0..8u8).map(|i| i ^ 0xa5).collect();
        assert_eq!(&r[32..], &want[..]);
        assert_eq!(
            *log.calls.borrow(),
            vec![LogCall::Report(0x10000, 0x20000, 4096, 8)]
        );

        // argsz one byte short.
        let (r, _, log) = run(Some(&m), &feat(39, flags, &rep));
        assert_eq!(r, Err(Errno::EINVAL));
        assert!(log.calls.borrow().is_empty());
        // Short report structure.
        let (r, _, _) = run(Some(&m), &feat(40, flags, &rep[..23]));
        assert_eq!(r, Err(Errno::EINVAL));
        // Page size zero, page size above the length.
        let (r, _, _) = run(Some(&m), &feat(40, flags, &report(0, 0x20000, 0)));
        assert_eq!(r, Err(Errno::EINVAL));
        let (r, _, _) = run(Some(&m), &feat(40, flags, &report(0, 0x10000, 1 << 24)));
        assert_eq!(r, Err(Errno::EINVAL));
        // Enormous bitmap: argsz (u32) can never cover it, and nothing is
        // allocated or overflows.
        let (r, _, log) = run(Some(&m), &feat(u32::MAX, flags, &report(0, u64::MAX, 1)));
        assert_eq!(r, Err(Errno::EINVAL));
        assert!(log.calls.borrow().is_empty());
        // The controller's errno goes through.
        let log = FakeLog::default();
        log.fail.set(Some(libc::ENOTSUP));
        let r = handle_device_feature(
            Some(&m),
            &FakeDevice::default(),
            &log,
            &feat(40, flags, &rep),
        );
        assert_eq!(r, Err(Errno::ENOTSUP));
    }

    #[test]
    fn bitmap_size_computation() {
        assert_eq!(dirty_bitmap_size(0x10000, 4096), Ok(8));
        assert_eq!(dirty_bitmap_size(4096 * 64, 4096), Ok(8));
        assert_eq!(dirty_bitmap_size(4096 * 65, 4096), Ok(16));
        assert_eq!(dirty_bitmap_size(4097, 4096), Ok(8));
        assert_eq!(dirty_bitmap_size(1, 1), Ok(8));
        assert_eq!(dirty_bitmap_size(u64::MAX, 1), Ok(1 << 61));
        assert_eq!(dirty_bitmap_size(u64::MAX, u64::MAX), Ok(8));
        assert_eq!(dirty_bitmap_size(4095, 4096), Err(Errno::EINVAL));
        assert_eq!(dirty_bitmap_size(4096, 0), Err(Errno::EINVAL));
        assert_eq!(dirty_bitmap_size(0, 0), Err(Errno::EINVAL));
    }

    #[test]
    fn quiesce_decisions() {
        let q = |flags: u32| feature_needs_quiesce(&feat(16, flags, &[]));
        assert!(q(SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE));
        assert!(q(GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE));
        assert!(q(SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START));
        assert!(q(SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP));
        assert!(!q(GET | VFIO_DEVICE_FEATURE_MIGRATION));
        assert!(!q(GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT));
        assert!(!q(PROBE | SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE));
        assert!(!q(PROBE | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE));
        assert!(!feature_needs_quiesce(&feat(16, SET | 2, &[])[..7]));
        assert!(!feature_needs_quiesce(&[]));
    }

    // ---- MIG_DATA_READ / WRITE ----

    fn mig_data(argsz: u32, size: u32, data: &[u8]) -> Vec<u8> {
        let mut v = argsz.to_le_bytes().to_vec();
        v.extend_from_slice(&size.to_le_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn mig_data_read_states() {
        for state in [STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY] {
            let m = mig_in(state, true);
            let dev = FakeDevice::default();
            *dev.data.borrow_mut() = vec![0, 1, 2, 3];
            let mut reply = vec![0xff; 3];
            let r = handle_mig_data_read(Some(&m), &dev, &mig_data(12, 4, &[]), 4, &mut reply);
            if state == PRE_COPY || state == STOP_COPY {
                r.unwrap();
                assert_eq!(reply, mig_data(12, 4, &[0, 1, 2, 3]));
            } else {
                assert_eq!(r, Err(Errno::EINVAL), "state {state}");
                assert!(reply.is_empty());
                assert!(dev.read_calls.borrow().is_empty());
            }
        }
        let dev = FakeDevice::default();
        let mut reply = Vec::new();
        assert_eq!(
            handle_mig_data_read(None, &dev, &mig_data(12, 4, &[]), 4, &mut reply),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn mig_data_read_sizes() {
        let m = mig_in(PRE_COPY, true);
        let dev = FakeDevice::default();
        *dev.data.borrow_mut() = vec![9; 16];
        let mut reply = Vec::new();
        // Size 0: the device is asked for nothing, reply is a bare header.
        handle_mig_data_read(Some(&m), &dev, &mig_data(8, 0, &[]), 4, &mut reply).unwrap();
        assert_eq!(reply, mig_data(8, 0, &[]));
        assert_eq!(*dev.read_calls.borrow(), vec![0]);
        // Exactly the limit.
        handle_mig_data_read(Some(&m), &dev, &mig_data(12, 4, &[]), 4, &mut reply).unwrap();
        assert_eq!(reply, mig_data(12, 4, &[9; 4]));
        // One above.
        dev.read_calls.borrow_mut().clear();
        let r = handle_mig_data_read(Some(&m), &dev, &mig_data(13, 5, &[]), 4, &mut reply);
        assert_eq!(r, Err(Errno::EINVAL));
        assert!(reply.is_empty());
        assert!(dev.read_calls.borrow().is_empty());
        // Huge size against a huge limit: argsz (u32) cannot cover it.
        let r = handle_mig_data_read(
            Some(&m),
            &dev,
            &mig_data(u32::MAX, u32::MAX, &[]),
            usize::MAX,
            &mut reply,
        );
        assert_eq!(r, Err(Errno::EINVAL));
        // argsz too small.
        let r = handle_mig_data_read(Some(&m), &dev, &mig_data(11, 4, &[]), 4, &mut reply);
        assert_eq!(r, Err(Errno::EINVAL));
        // Short payload.
        let r = handle_mig_data_read(Some(&m), &dev, &mig_data(12, 4, &[])[..7], 4, &mut reply);
        assert_eq!(r, Err(Errno::EINVAL));
        assert!(dev.read_calls.borrow().is_empty());

        // Device returns less than asked: size/argsz say so, the message keeps
        // the requested length with zero padding.
        *dev.data.borrow_mut() = vec![7, 7];
        handle_mig_data_read(Some(&m), &dev, &mig_data(12, 4, &[]), 4, &mut reply).unwrap();
        assert_eq!(reply, mig_data(10, 2, &[7, 7, 0, 0]));
    }

    #[test]
    fn mig_data_read_device_errors() {
        let m = mig_in(STOP_COPY, true);
        let dev = FakeDevice::default();
        *dev.data.borrow_mut() = vec![1; 4];
        // Claims more than the buffer: refused, nothing sent.
        dev.read_claim.set(Some(5));
        let mut reply = Vec::new();
        let r = handle_mig_data_read(Some(&m), &dev, &mig_data(12, 4, &[]), 4, &mut reply);
        assert_eq!(r, Err(Errno::EINVAL));
        assert!(reply.is_empty());
        dev.read_claim.set(Some(usize::MAX));
        let r = handle_mig_data_read(Some(&m), &dev, &mig_data(12, 4, &[]), 4, &mut reply);
        assert_eq!(r, Err(Errno::EINVAL));
        // Callback errno passes through.
        dev.read_claim.set(None);
        dev.fail_data.set(true);
        dev.fail_errno.set(0xbeef);
        let r = handle_mig_data_read(Some(&m), &dev, &mig_data(12, 4, &[]), 4, &mut reply);
        assert_eq!(r, Err(Errno(0xbeef)));
        assert!(reply.is_empty());
    }

    #[test]
    fn mig_data_write() {
        let data = [1u8, 2, 3, 4];
        for state in [STOP, RUNNING, STOP_COPY, PRE_COPY] {
            let m = mig_in(state, true);
            let dev = FakeDevice::default();
            let r = handle_mig_data_write(Some(&m), &dev, &mig_data(12, 4, &data), 4);
            assert_eq!(r, Err(Errno::EINVAL));
            assert!(dev.written.borrow().is_empty());
        }
        let m = mig_in(RESUMING, true);
        let dev = FakeDevice::default();
        assert_eq!(
            handle_mig_data_write(Some(&m), &dev, &mig_data(12, 4, &data), 4),
            Ok(vec![])
        );
        assert_eq!(*dev.written.borrow(), data);
        // Extra trailing bytes are not handed to the device.
        let dev = FakeDevice::default();
        handle_mig_data_write(Some(&m), &dev, &mig_data(12, 2, &data), 4).unwrap();
        assert_eq!(*dev.written.borrow(), [1, 2]);
        // Size 0.
        let dev = FakeDevice::default();
        handle_mig_data_write(Some(&m), &dev, &mig_data(8, 0, &[]), 4).unwrap();
        assert!(dev.written.borrow().is_empty());

        let einval = |p: &[u8], max: usize| {
            let dev = FakeDevice::default();
            assert_eq!(
                handle_mig_data_write(Some(&m), &dev, p, max),
                Err(Errno::EINVAL)
            );
            assert!(dev.written.borrow().is_empty());
        };
        // Above the limit.
        einval(&mig_data(13, 5, &[0; 5]), 4);
        // argsz too small.
        einval(&mig_data(11, 4, &data), 4);
        // Data missing (header only), data short by one.
        einval(&mig_data(12, 4, &[]), 4);
        einval(&mig_data(12, 4, &data[..3]), 4);
        // Short header.
        einval(&mig_data(12, 4, &[])[..7], 4);
        // Huge size with a huge limit.
        einval(&mig_data(u32::MAX, u32::MAX, &data), usize::MAX);
        // No migration.
        assert_eq!(
            handle_mig_data_write(None, &FakeDevice::default(), &mig_data(12, 4, &data), 4),
            Err(Errno::EINVAL)
        );

        // Partial write and callback errno.
        let dev = FakeDevice::default();
        dev.write_claim.set(Some(3));
        assert_eq!(
            handle_mig_data_write(Some(&m), &dev, &mig_data(12, 4, &data), 4),
            Err(Errno::EINVAL)
        );
        let dev = FakeDevice::default();
        dev.fail_data.set(true);
        dev.fail_errno.set(0xbeef);
        assert_eq!(
            handle_mig_data_write(Some(&m), &dev, &mig_data(12, 4, &data), 4),
            Err(Errno(0xbeef))
        );
    }

    #[test]
    fn command_gating() {
        let all: Vec<u16> = (0..=20).collect();
        let allowed_stopped = [9u16, 10, 16, 17];
        for state in [STOP, STOP_COPY] {
            let m = mig_in(state, true);
            for &c in &all {
                let r = command_allowed(Some(&m), c);
                if allowed_stopped.contains(&c) {
                    assert_eq!(r, Ok(()), "cmd {c} state {state}");
                } else {
                    assert_eq!(r, Err(Errno::EINVAL), "cmd {c} state {state}");
                }
            }
        }
        for state in [RUNNING, RESUMING, PRE_COPY] {
            let m = mig_in(state, true);
            for &c in &all {
                assert_eq!(command_allowed(Some(&m), c), Ok(()));
            }
        }
        for &c in &all {
            assert_eq!(command_allowed(None, c), Ok(()));
        }
        assert!(device_is_stopped_and_copying(Some(&mig_in(
            STOP_COPY, true
        ))));
        assert!(!device_is_stopped_and_copying(Some(&mig_in(STOP, true))));
        assert!(!device_is_stopped_and_copying(None));
    }

    #[test]
    fn reentrant_callback_sees_consistent_state() {
        // A transition callback that reads the state mid-transition (as a
        // device calling back into the library would) must not panic.
        struct Peek<'a> {
            mig: &'a Migration,
            seen: RefCell<Vec<(u32, u32)>>,
        }
        impl MigrationCallbacks for Peek<'_> {
            fn transition(&self, state: u32) -> Result<()> {
                self.seen.borrow_mut().push((state, self.mig.state()));
                Ok(())
            }
            fn read_data(&self, _: &mut [u8]) -> Result<usize> {
                Ok(0)
            }
            fn write_data(&self, b: &[u8]) -> Result<usize> {
                Ok(b.len())
            }
        }
        let m = Migration::new(2).unwrap();
        let p = Peek {
            mig: &m,
            seen: RefCell::new(vec![]),
        };
        m.set_state(&p, RESUMING).unwrap();
        assert_eq!(
            *p.seen.borrow(),
            vec![
                (VFU_MIGR_STATE_STOP, RUNNING),
                (VFU_MIGR_STATE_RESUME, STOP)
            ]
        );
    }

    #[test]
    fn migr_state_values() {
        let all = [
            (MigrState::Stop, VFU_MIGR_STATE_STOP),
            (MigrState::Running, VFU_MIGR_STATE_RUNNING),
            (MigrState::StopAndCopy, VFU_MIGR_STATE_STOP_AND_COPY),
            (MigrState::PreCopy, VFU_MIGR_STATE_PRE_COPY),
            (MigrState::Resume, VFU_MIGR_STATE_RESUME),
        ];
        for (s, v) in all {
            assert_eq!(u32::from(s), v);
            assert_eq!(MigrState::from_raw(v), Some(s));
            assert_eq!(MigrState::try_from(v), Ok(s));
        }
        assert_eq!(MigrState::from_raw(5), None);
        assert_eq!(MigrState::try_from(77), Err(Errno::EINVAL));
        assert!(MigrState::PreCopy.is_running());
        assert!(!MigrState::StopAndCopy.is_running());
    }
}
