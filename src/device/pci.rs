//! PCI configuration space emulation.
//!
//! [`PciConfig`] owns the config space buffer (256 bytes, or 4096 for PCI-X
//! mode 2 and PCI Express) whose address the C API hands out through
//! `vfu_pci_get_config_space()`. Device code written in C reads and writes
//! that buffer directly whenever it runs, including from inside callbacks
//! this module invokes, so the buffer is only ever touched through raw
//! pointer copies and never through a Rust reference.
//!
//! Client accesses to the config space region arrive through
//! [`PciConfig::access`], which splits them into pieces:
//!
//! * the 64-byte standard header is emulated here (command register, BAR
//!   sizing, expansion ROM, read-only IDs, interrupt line, ...);
//! * pieces that fall inside a capability added with
//!   [`PciConfig::add_capability`] go to that capability's rules
//!   (see `pci_caps.rs`);
//! * everything else goes to the device's config-space region callback, or,
//!   without one, reads come from the buffer and writes fail with `EINVAL`.
//!
//! When the region was set up with `VFU_REGION_FLAG_ALWAYS_CB`, nothing is
//! emulated: the whole access goes to the callback.
//!
//! A write that sets "Initiate Function Level Reset" in the PCI Express
//! device control register does not reset anything here: it is recorded and
//! the context collects it with [`PciConfig::take_flr_request`] after the
//! access, then calls the device's reset callback with `VFU_RESET_PCI_FLR`
//! and uses that callback's result as the result of the write.

use std::cell::{Cell, RefCell};
use std::ptr::{self, NonNull};

use super::pci_caps::{CapHost, CapList, CapOps, CapReader, MsiState, MsixState};
use super::pci_regs::CfgSpace;
pub use super::pci_regs::{
    CfgCallback, CFG_SPACE_EXP_SIZE, CFG_SPACE_SIZE, OFF_CAP_PTR, PCI_TYPE_CONVENTIONAL,
    PCI_TYPE_EXPRESS, PCI_TYPE_PCI_X_1, PCI_TYPE_PCI_X_2, STATUS_CAP_LIST, STD_HEADER_SIZE,
};
use crate::error::{Errno, Result};

/// Largest config space [`PciConfig::with_size`] accepts.
pub const MAX_CFG_SIZE: usize = 1 << 20;

/// `PCI_HEADER_TYPE_NORMAL`, the only header type accepted.
pub const PCI_HEADER_TYPE_NORMAL: i32 = 0;

/// The kind of PCI function (`vfu_pci_type_t`), for
/// [`Context::pci_init`](super::Context::pci_init), which also takes the raw
/// `PCI_TYPE_*` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum PciType {
    /// Conventional PCI: 256 bytes of config space.
    Conventional = PCI_TYPE_CONVENTIONAL,
    /// PCI-X mode 1: 256 bytes of config space.
    PciX1 = PCI_TYPE_PCI_X_1,
    /// PCI-X mode 2: 4 KiB of config space.
    PciX2 = PCI_TYPE_PCI_X_2,
    /// PCI Express: 4 KiB of config space.
    Express = PCI_TYPE_EXPRESS,
}

impl PciType {
    /// The type for a raw `PCI_TYPE_*` value, if it is one.
    pub fn from_raw(v: u32) -> Option<PciType> {
        match v {
            PCI_TYPE_CONVENTIONAL => Some(PciType::Conventional),
            PCI_TYPE_PCI_X_1 => Some(PciType::PciX1),
            PCI_TYPE_PCI_X_2 => Some(PciType::PciX2),
            PCI_TYPE_EXPRESS => Some(PciType::Express),
            _ => None,
        }
    }

    /// Size of this type's config space in bytes.
    pub fn config_size(self) -> usize {
        match self {
            PciType::Conventional | PciType::PciX1 => CFG_SPACE_SIZE,
            PciType::PciX2 | PciType::Express => CFG_SPACE_EXP_SIZE,
        }
    }
}

impl From<PciType> for u32 {
    fn from(t: PciType) -> u32 {
        t as u32
    }
}

/// Index of the expansion ROM in the `bars` slices taken by this module.
pub const ROM_INDEX: usize = 6;
/// Number of BARs in a type 0 header.
pub const NUM_BARS: usize = 6;

// Region flag bits this module looks at (`VFU_REGION_FLAG_*`).
const REGION_FLAG_MEM: u32 = 1 << 2;
const REGION_FLAG_64_BITS: u32 = 1 << 4;
const REGION_FLAG_PREFETCH: u32 = 1 << 5;

// Standard header layout.
const OFF_VENDOR_ID: usize = 0x00;
const OFF_DEVICE_ID: usize = 0x02;
const OFF_COMMAND: usize = 0x04;
const OFF_STATUS: usize = 0x06;
const OFF_REVISION: usize = 0x08;
const OFF_CLASS_PROG: usize = 0x09;
const OFF_CLASS_SUB: usize = 0x0a;
const OFF_CLASS_BASE: usize = 0x0b;
const OFF_CACHE_LINE: usize = 0x0c;
const OFF_LATENCY: usize = 0x0d;
const OFF_HEADER_TYPE: usize = 0x0e;
const OFF_BIST: usize = 0x0f;
const OFF_BAR0: usize = 0x10;
const OFF_BAR5: usize = 0x24;
const OFF_CARDBUS_CIS: usize = 0x28;
const OFF_SUBSYS_VENDOR: usize = 0x2c;
const OFF_SUBSYS_ID: usize = 0x2e;
const OFF_ROM: usize = 0x30;
const OFF_INT_LINE: usize = 0x3c;
const OFF_INT_PIN: usize = 0x3d;
const OFF_MIN_GNT: usize = 0x3e;
const OFF_MAX_LAT: usize = 0x3f;

// Command register bits.
const CMD_IO: u16 = 0x001;
const CMD_MEMORY: u16 = 0x002;
const CMD_MASTER: u16 = 0x004;
const CMD_INVALIDATE: u16 = 0x010;
const CMD_VGA_PALETTE: u16 = 0x020;
const CMD_SERR: u16 = 0x100;
const CMD_INTX_DISABLE: u16 = 0x400;
/// Command bits the emulation stores.
const CMD_STORED: u16 =
    CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_INVALIDATE | CMD_SERR | CMD_INTX_DISABLE;
/// Command bits accepted without complaint (palette snooping is ignored).
const CMD_ACCEPTED: u16 = CMD_STORED | CMD_VGA_PALETTE;

// BAR / ROM bits.
const BAR_IO_FLAG_MASK: u32 = 0x3;
const BAR_MEM_FLAG_MASK: u32 = 0xf;
const BAR_SPACE_IO: u32 = 0x1;
const BAR_MEM_TYPE_64: u32 = 0x4;
const BAR_MEM_TYPE_MASK: u32 = 0x6;
const BAR_MEM_PREFETCH: u32 = 0x8;
const ROM_ADDRESS_MASK: u32 = 0xffff_f800;
const ROM_ENABLE: u32 = 0x1;

/// What the config space needs to know about one BAR or the expansion ROM
/// (index 0..=5 BARs, 6 ROM): the region's size and `VFU_REGION_FLAG_*`
/// flags (READ 1, WRITE 2, MEM 4, ALWAYS_CB 8, 64_BITS 16, PREFETCH 32).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// Region size in bytes; 0 means the BAR is not implemented.
    pub size: u64,
    /// `VFU_REGION_FLAG_*` bits of the region.
    pub flags: u32,
}

impl BarInfo {
    fn is_mem(&self) -> bool {
        self.flags & REGION_FLAG_MEM != 0
    }

    /// A 64-bit BAR only makes sense in memory space.
    fn is_mem64(&self) -> bool {
        self.is_mem() && self.flags & REGION_FLAG_64_BITS != 0
    }
}

/// PCI configuration space of one device.
///
/// All methods take `&self`: the context may call back into device code
/// from [`PciConfig::access`], and that code may in turn call
/// `vfu_pci_find_capability()` and friends.
pub struct PciConfig {
    /// Start of the buffer: `words` zero-initialised `u64`s, so the buffer
    /// is 8-byte aligned like the `calloc()`ed one C code expects.
    buf: NonNull<u64>,
    words: usize,
    /// Logical size in bytes (`<= words * 8`).
    len: usize,
    pci_type: u32,
    caps: RefCell<CapList>,
    /// BAR/ROM info recorded by [`PciConfig::setup_bar`] / [`PciConfig::realize`].
    bars: Cell<[BarInfo; NUM_BARS + 1]>,
    flr_requested: Cell<bool>,
}

// SAFETY: the buffer is a private heap allocation owned by this value (freed
// in Drop) and holds no thread-affine state; moving the owner to another
// thread moves sole ownership of the allocation with it. (`Cell`/`RefCell`
// already keep the type !Sync.)
unsafe impl Send for PciConfig {}

impl Drop for PciConfig {
    fn drop(&mut self) {
        let slice = ptr::slice_from_raw_parts_mut(self.buf.as_ptr(), self.words);
        // SAFETY: `buf`/`words` came from `Box::into_raw` of a `Box<[u64]>`
        // of exactly `words` elements in `alloc`, and are freed only here.
        drop(unsafe { Box::from_raw(slice) });
    }
}

impl PciConfig {
    /// `vfu_pci_init`: a zeroed config space for `pci_type`
    /// (`PCI_TYPE_*`; 256 bytes for conventional and PCI-X mode 1, 4096 for
    /// PCI-X mode 2 and Express). Only `PCI_HEADER_TYPE_NORMAL` is accepted.
    /// `revision` is accepted and ignored, as upstream does.
    pub fn new(pci_type: u32, hdr_type: i32, revision: i32) -> Result<PciConfig> {
        let _ = revision;
        let size = match pci_type {
            PCI_TYPE_CONVENTIONAL | PCI_TYPE_PCI_X_1 => CFG_SPACE_SIZE,
            PCI_TYPE_PCI_X_2 | PCI_TYPE_EXPRESS => CFG_SPACE_EXP_SIZE,
            _ => return Err(Errno::EINVAL),
        };
        if hdr_type != PCI_HEADER_TYPE_NORMAL {
            return Err(Errno::EINVAL);
        }
        Ok(Self::alloc(size, pci_type))
    }

    /// The config space upstream creates at realize time when `vfu_pci_init`
    /// was never called: conventional type, `size` bytes (the config
    /// region's size, 256 when the device did not set one up). `EINVAL` when
    /// `size` cannot hold the standard header or is absurdly large (over
    /// [`MAX_CFG_SIZE`]); upstream allocates whatever it is given.
    pub fn with_size(size: usize) -> Result<PciConfig> {
        if !(STD_HEADER_SIZE..=MAX_CFG_SIZE).contains(&size) {
            return Err(Errno::EINVAL);
        }
        Ok(Self::alloc(size, PCI_TYPE_CONVENTIONAL))
    }

    fn alloc(len: usize, pci_type: u32) -> PciConfig {
        let words = len.div_ceil(8);
        let boxed: Box<[u64]> = vec![0u64; words].into_boxed_slice();
        let raw = Box::into_raw(boxed) as *mut u64;
        let buf = NonNull::new(raw).unwrap_or(NonNull::dangling());
        PciConfig {
            buf,
            words,
            len,
            pci_type,
            caps: RefCell::new(CapList::default()),
            bars: Cell::new([BarInfo::default(); NUM_BARS + 1]),
            flr_requested: Cell::new(false),
        }
    }

    /// The buffer's address, for `vfu_pci_get_config_space()`. Valid and
    /// fixed for the life of this value.
    pub fn as_ptr(&self) -> *mut u8 {
        self.buf.as_ptr().cast::<u8>()
    }

    /// Config space size in bytes.
    pub fn size(&self) -> usize {
        self.len
    }

    /// The `PCI_TYPE_*` given to [`PciConfig::new`].
    pub fn pci_type(&self) -> u32 {
        self.pci_type
    }

    // ---- capabilities (logic in pci_caps.rs) ----------------------------------

    /// `vfu_pci_add_capability` with the capability's bytes in `data`
    /// (which must hold at least the capability's size, see
    /// [`cap_size_from_header`](super::pci_caps::cap_size_from_header); extra bytes are ignored).
    ///
    /// `pos` 0 places the capability after the last one added (or at 64 /
    /// 256 for the first standard / extended one), rounded up to 4 bytes;
    /// otherwise at `pos`, which must not overlap the header (below 64) or
    /// another capability, and for extended capabilities must be 4-byte
    /// aligned, and be 256 for the first one. Returns the offset.
    ///
    /// This variant does not know whether the device registered a
    /// config-space region callback, so it accepts the CALLBACK flag; the C
    /// API goes through [`PciConfig::add_capability_raw`], which refuses
    /// CALLBACK without a callback as upstream does.
    ///
    /// Errors, in upstream's order: unknown flag bits `EINVAL`; extended
    /// capability on a conventional / PCI-X mode 1 device `EINVAL`; already
    /// [`MAX_CAPS`](super::pci_caps::MAX_CAPS) of that kind `ENOSPC`; unsupported ID `ENOTSUP`;
    /// explicit position running past the end of the list's space `EINVAL`;
    /// position below the start of the list's space, overlap, or extended
    /// list not starting at 256 `EINVAL`; no room left `ENOSPC`; a callback
    /// running this config space's access right now `EBUSY`.
    pub fn add_capability(&self, pos: usize, flags: i32, data: &[u8]) -> Result<usize> {
        CapOps::add_capability(self, pos, flags, data)
    }

    /// [`PciConfig::add_capability`] for the C API: `cfg_cb_registered`
    /// tells whether the config-space region has a callback (CALLBACK caps
    /// need one, else `EINVAL`), and `read(offset, dst)` copies capability
    /// bytes from the C `data` pointer. It is first asked for the ID (and
    /// for vendor-specific capabilities the length field), and only then
    /// for the whole capability, so it is never asked for bytes past the
    /// capability's true size. (Upstream copies the full fixed size too, so
    /// a caller passing a shorter struct is read past in both.)
    pub fn add_capability_raw(
        &self,
        pos: usize,
        flags: i32,
        cfg_cb_registered: bool,
        read: &mut CapReader<'_>,
    ) -> Result<usize> {
        CapOps::add_capability_raw(self, pos, flags, cfg_cb_registered, read)
    }

    /// `vfu_pci_find_capability`: offset of the first capability with ID
    /// `id`. `ENOENT` when there is none (the C API returns 0 then).
    pub fn find_capability(&self, extended: bool, id: i32) -> Result<usize> {
        CapOps::find_capability(self, extended, id)
    }

    /// `vfu_pci_find_next_capability`: offset of the next capability with ID
    /// `id` after the one at `pos` (from the start of the list when `pos` is
    /// 0), walking the lists as config space holds them. `EINVAL` when `pos`
    /// or a list entry lies too close to the end of config space (as
    /// upstream: `pos + 1` for standard, `pos + 4` for extended must be
    /// below the size), `ENOENT` when the list ends (or loops) without a
    /// match.
    pub fn find_next_capability(&self, extended: bool, pos: usize, id: i32) -> Result<usize> {
        CapOps::find_next_capability(self, extended, pos, id)
    }

    /// Whether any standard capability was added.
    pub fn has_std_caps(&self) -> bool {
        CapOps::has_std_caps(self)
    }

    /// Offset of the (last added) PCI Express capability.
    pub fn pcie_cap_offset(&self) -> Option<usize> {
        CapOps::pcie_cap_offset(self)
    }

    /// MSI-X state from the first MSI-X capability, if any.
    pub fn msix_state(&self) -> Option<MsixState> {
        CapOps::msix_state(self)
    }

    /// MSI state from the first MSI capability, if any.
    pub fn msi_state(&self) -> Option<MsiState> {
        CapOps::msi_state(self)
    }

    // ---- raw buffer access -----------------------------------------------

    fn check_range(&self, off: usize, len: usize) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Errno::EINVAL),
        }
    }

    /// Copies config space bytes at `off` into `dst`, without emulation.
    /// `EINVAL` if the range is not inside config space.
    pub fn read_raw(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        self.check_range(off, dst.len())?;
        // SAFETY: `off + dst.len() <= self.len`, which is inside the
        // allocation; the buffer is only reached through raw pointers so no
        // Rust reference aliases it; `ptr::copy` tolerates overlap.
        unsafe { ptr::copy(self.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    /// Copies `src` into config space at `off`, without emulation.
    /// `EINVAL` if the range is not inside config space.
    pub fn write_raw(&self, off: usize, src: &[u8]) -> Result<()> {
        self.check_range(off, src.len())?;
        // SAFETY: as in `read_raw`, the destination range is inside the
        // allocation and no reference to the buffer exists.
        unsafe { ptr::copy(src.as_ptr(), self.as_ptr().add(off), src.len()) };
        Ok(())
    }

    // ---- device-side setup -------------------------------------------------

    /// `vfu_pci_set_id`: vendor, device, subsystem vendor and subsystem IDs.
    pub fn set_id(&self, vid: u16, did: u16, ssvid: u16, ssid: u16) {
        // The header always fits (the buffer is at least 256 bytes).
        let _ = self.wr16(OFF_VENDOR_ID, vid);
        let _ = self.wr16(OFF_DEVICE_ID, did);
        let _ = self.wr16(OFF_SUBSYS_VENDOR, ssvid);
        let _ = self.wr16(OFF_SUBSYS_ID, ssid);
    }

    /// `vfu_pci_set_class`: base class, subclass and programming interface.
    pub fn set_class(&self, base: u8, sub: u8, pi: u8) {
        let _ = self.wr8(OFF_CLASS_BASE, base);
        let _ = self.wr8(OFF_CLASS_SUB, sub);
        let _ = self.wr8(OFF_CLASS_PROG, pi);
    }

    /// Records the size and flags of BAR `idx` (0..=5) or the ROM (6), used
    /// by [`PciConfig::access`] when it is given an empty `bars` slice.
    /// Config space itself is not changed: as upstream, the BAR type bits are
    /// written by [`PciConfig::realize`]. Out-of-range indexes are ignored.
    pub fn setup_bar(&self, idx: usize, info: BarInfo) {
        let mut all = self.bars.get();
        if let Some(slot) = all.get_mut(idx) {
            *slot = info;
            self.bars.set(all);
        }
    }

    /// What upstream does to config space in `vfu_realize_ctx` (call once),
    /// bit for bit, so that config space dumps are identical:
    ///
    /// * every one of the six BAR registers, implemented or not, gets type
    ///   bits from its own region's flags: bit 0 (I/O space) unless the
    ///   region is MEM, so unused BARs and the upper dword of a 64-bit BAR
    ///   read as I/O; bits 2:1 set to 64-bit when the region is 64-bit;
    ///   bit 3 (prefetchable) when it is prefetchable. What the device
    ///   wrote there before realize is kept otherwise;
    /// * the interrupt pin is set to INTA# when `intx` (the device has INTx
    ///   vectors);
    /// * the status register's capabilities-list bit is set when standard
    ///   capabilities exist.
    ///
    /// `bars` (index 0..=6, missing entries count as unimplemented) is
    /// recorded as with [`PciConfig::setup_bar`].
    pub fn realize(&self, bars: &[BarInfo], intx: bool) {
        for (i, info) in bars.iter().enumerate().take(NUM_BARS + 1) {
            self.setup_bar(i, *info);
        }
        let all = self.bars.get();
        for (idx, info) in all.iter().enumerate().take(NUM_BARS) {
            let off = OFF_BAR0 + 4 * idx;
            let Ok(mut v) = self.rd32(off) else { continue };
            if !info.is_mem() {
                v |= BAR_SPACE_IO;
            }
            if info.flags & REGION_FLAG_64_BITS != 0 {
                v = (v & !BAR_MEM_TYPE_MASK) | BAR_MEM_TYPE_64;
            }
            if info.flags & REGION_FLAG_PREFETCH != 0 {
                v |= BAR_MEM_PREFETCH;
            }
            let _ = self.wr32(off, v);
        }
        if intx {
            let _ = self.wr8(OFF_INT_PIN, 1);
        }
        if self.has_std_caps() {
            self.set_cap_list_bit();
        }
    }

    fn set_cap_list_bit(&self) {
        if let Ok(s) = self.rd16(OFF_STATUS) {
            let _ = self.wr16(OFF_STATUS, s | STATUS_CAP_LIST);
        }
    }

    /// Whether a client write to the config region at `offset` must quiesce
    /// the device first (upstream: a write starting at the PCI Express
    /// capability's device control register, which may initiate an FLR).
    /// False when there is no PCI Express capability (upstream compares
    /// against offset 7 in that case, which is a bug).
    pub fn write_needs_quiesce(&self, offset: u64) -> bool {
        match self.pcie_cap_offset() {
            Some(cap) => offset == (cap + super::pci_caps::PX_DEVCTL) as u64,
            None => false,
        }
    }

    /// Whether the last [`PciConfig::access`] was a write that initiated a
    /// function level reset; clears the request. The context must then call
    /// the device's reset callback with `VFU_RESET_PCI_FLR` and make the
    /// callback's result the write's result (without a reset callback
    /// upstream just logs and the write succeeds).
    pub fn take_flr_request(&self) -> bool {
        self.flr_requested.replace(false)
    }

    // ---- client access -----------------------------------------------------

    /// A `VFIO_USER_REGION_READ`/`WRITE` on the config space region:
    /// `buf` is the data (source for writes, destination for reads) and
    /// `offset` the position in config space.
    ///
    /// `cb` is the device's config-space region callback, if any; it gets
    /// the pieces upstream hands to it (the whole access when `always_cb`,
    /// otherwise areas outside the header and the known capabilities, and
    /// capabilities added with the CALLBACK flag). No borrow is held while
    /// it runs, so it may call back into this value.
    ///
    /// `bars` is the BAR/ROM info (index 0..=6) for BAR sizing; when empty,
    /// the info recorded by [`PciConfig::setup_bar`]/[`PciConfig::realize`]
    /// is used.
    ///
    /// Returns the number of bytes handled, which is short only when the
    /// callback handled nothing of a piece; errors carry upstream's errno
    /// (`EINVAL` for bad header writes and for ranges outside config space,
    /// `EPERM` for read-only capabilities and capability headers, ...).
    /// Pieces handled before a failing piece stay done, as upstream.
    pub fn access(
        &self,
        buf: &mut [u8],
        offset: u64,
        is_write: bool,
        mut cb: Option<&mut CfgCallback<'_>>,
        always_cb: bool,
        bars: &[BarInfo],
    ) -> Result<usize> {
        self.flr_requested.set(false);
        let count = buf.len();
        if always_cb {
            let f = cb.ok_or(Errno::EINVAL)?;
            let n = f(buf, offset, is_write)?;
            if n > count {
                return Err(Errno::EINVAL);
            }
            return Ok(n);
        }
        let start = usize::try_from(offset).map_err(|_| Errno::EINVAL)?;
        self.check_range(start, count)?;

        let recorded;
        let bars = if bars.is_empty() {
            recorded = self.bars.get();
            &recorded[..]
        } else {
            bars
        };

        let mut done = 0;
        while done < count {
            let pos = start + done;
            let rest = buf.get_mut(done..).ok_or(Errno::EINVAL)?;
            let n = self.access_piece(rest, pos, is_write, &mut cb, bars)?;
            if n == 0 {
                // The callback handled nothing: stop rather than loop
                // forever (upstream spins here).
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// Handles the piece of an access starting at `pos` (`buf` runs to the
    /// end of the access); returns how many bytes of it were handled.
    fn access_piece(
        &self,
        buf: &mut [u8],
        pos: usize,
        is_write: bool,
        cb: &mut Option<&mut CfgCallback<'_>>,
        bars: &[BarInfo],
    ) -> Result<usize> {
        if pos < STD_HEADER_SIZE {
            if is_write {
                let reg = header_reg_len(pos);
                if reg == 0 {
                    return Err(Errno::EINVAL);
                }
                let n = buf.len().min(reg);
                let piece = buf.get(..n).ok_or(Errno::EINVAL)?;
                self.header_write(pos, piece, bars)?;
                return Ok(n);
            }
            let n = buf.len().min(STD_HEADER_SIZE - pos);
            let piece = buf.get_mut(..n).ok_or(Errno::EINVAL)?;
            self.read_raw(pos, piece)?;
            return Ok(n);
        }

        let end = pos.checked_add(buf.len()).ok_or(Errno::EINVAL)?;
        // Copy the capability out so no borrow is held past this statement.
        let cap = self
            .caps
            .try_borrow()
            .map_err(|_| Errno::EBUSY)?
            .first_in(pos, end);
        match cap {
            None => self.nonstd_access(buf, pos, is_write, cb),
            Some(c) if c.off > pos => {
                let piece = buf.get_mut(..c.off - pos).ok_or(Errno::EINVAL)?;
                self.nonstd_access(piece, pos, is_write, cb)
            }
            Some(c) => {
                let n = buf.len().min(c.end() - pos);
                let piece = buf.get_mut(..n).ok_or(Errno::EINVAL)?;
                self.cap_access(&c, piece, pos, is_write, cb)
            }
        }
    }

    /// Config space that is neither header nor an emulated capability: the
    /// device callback if there is one, else reads from the buffer and
    /// writes refused.
    fn nonstd_access(
        &self,
        buf: &mut [u8],
        pos: usize,
        is_write: bool,
        cb: &mut Option<&mut CfgCallback<'_>>,
    ) -> Result<usize> {
        if let Some(f) = cb.as_mut() {
            let n = f(buf, pos as u64, is_write)?;
            if n > buf.len() {
                return Err(Errno::EINVAL);
            }
            return Ok(n);
        }
        if is_write {
            return Err(Errno::EINVAL);
        }
        self.read_raw(pos, buf)?;
        Ok(buf.len())
    }

    // ---- standard header -----------------------------------------------------

    /// Writes one header register (`data` is no longer than the register
    /// starting at `pos`).
    fn header_write(&self, pos: usize, data: &[u8], bars: &[BarInfo]) -> Result<()> {
        match pos {
            OFF_COMMAND => self.command_write(data),
            // Status: its RW1C bits are not emulated; the write is ignored.
            OFF_STATUS => Ok(()),
            // Read-only registers: the spec says writes are ignored.
            OFF_REVISION | OFF_CLASS_PROG | OFF_INT_PIN | OFF_MIN_GNT | OFF_MAX_LAT => Ok(()),
            OFF_INT_LINE | OFF_CACHE_LINE | OFF_LATENCY => match data.first() {
                Some(&b) => self.wr8(pos, b),
                None => Ok(()),
            },
            OFF_BAR0..=OFF_BAR5 if (pos - OFF_BAR0) & 3 == 0 => {
                self.bar_write((pos - OFF_BAR0) / 4, data, bars)
            }
            OFF_ROM => self.rom_write(data, bars),
            // IDs, header type, BIST, CardBus CIS, subsystem IDs and the
            // capability pointer are refused, as upstream.
            _ => Err(Errno::EINVAL),
        }
    }

    /// `data` replaces the low bytes of the 32-bit value `cur` (a short write
    /// leaves the other bytes as they are; upstream reads past the client's
    /// data instead).
    fn merge32(cur: u32, data: &[u8]) -> u32 {
        let mut b = cur.to_le_bytes();
        for (dst, src) in b.iter_mut().zip(data) {
            *dst = *src;
        }
        u32::from_le_bytes(b)
    }

    fn command_write(&self, data: &[u8]) -> Result<()> {
        let cur = self.rd16(OFF_COMMAND)?;
        let written: u16 = if data.len() >= 2 { 0xffff } else { 0x00ff };
        let v = Self::merge32(u32::from(cur), data) as u16 & written;
        let keep = !(CMD_STORED & written);
        self.wr16(OFF_COMMAND, (cur & keep) | (v & CMD_STORED))?;
        // As upstream, the known bits take effect even when the write also
        // carries bits this emulation does not support.
        if v & !CMD_ACCEPTED != 0 {
            return Err(Errno::EINVAL);
        }
        Ok(())
    }

    /// Address mask and read-only type-bit mask of BAR `idx`.
    fn bar_masks(idx: usize, bars: &[BarInfo]) -> (u32, u32) {
        let info = |i: usize| bars.get(i).copied().unwrap_or_default();
        if idx % 2 == 1 {
            let lower = info(idx - 1);
            if lower.is_mem64() {
                // Upper dword of a 64-bit BAR: all address bits, no type bits.
                // (Upstream uses `size >> 32` here, which reads back 0 instead
                // of all-ones when the BAR is smaller than 4 GiB.)
                return ((size_mask(lower.size) >> 32) as u32, 0);
            }
        }
        let bar = info(idx);
        let flag_mask = if bar.is_mem() {
            BAR_MEM_FLAG_MASK
        } else {
            BAR_IO_FLAG_MASK
        };
        (size_mask(bar.size) as u32 & !flag_mask, flag_mask)
    }

    fn bar_write(&self, idx: usize, data: &[u8], bars: &[BarInfo]) -> Result<()> {
        let off = OFF_BAR0 + 4 * idx;
        let cur = self.rd32(off)?;
        let v = Self::merge32(cur, data);
        let (mask, flag_mask) = Self::bar_masks(idx, bars);
        self.wr32(off, (v & mask) | (cur & flag_mask))
    }

    fn rom_write(&self, data: &[u8], bars: &[BarInfo]) -> Result<()> {
        let cur = self.rd32(OFF_ROM)?;
        let v = Self::merge32(cur, data);
        let rom = bars.get(ROM_INDEX).copied().unwrap_or_default();
        if rom.size > 0 {
            // A ROM region exists: emulate the register (address bits down to
            // the ROM's size, and the enable bit), so the guest can size it.
            // Upstream does not emulate ROM sizing.
            let size = rom.size.max(0x800);
            let mask = (size_mask(size) as u32 & ROM_ADDRESS_MASK) | ROM_ENABLE;
            return self.wr32(OFF_ROM, v & mask);
        }
        // No ROM: upstream's rules, the register stays zero.
        match v {
            0 => self.wr32(OFF_ROM, 0),
            ROM_ADDRESS_MASK | 0xffff_fffe | 0xffff_ffff => Ok(()),
            _ => Err(Errno::EINVAL),
        }
    }
}

/// Address-bit mask for a BAR of `size` bytes (rounded up to a power of
/// two); 0 for no BAR or a size too large to represent.
impl CfgSpace for PciConfig {
    fn size(&self) -> usize {
        self.len
    }

    fn pci_type(&self) -> u32 {
        self.pci_type
    }

    fn read_raw(&self, off: usize, dst: &mut [u8]) -> Result<()> {
        PciConfig::read_raw(self, off, dst)
    }

    fn write_raw(&self, off: usize, src: &[u8]) -> Result<()> {
        PciConfig::write_raw(self, off, src)
    }
}

impl CapHost for PciConfig {
    fn caps(&self) -> &RefCell<CapList> {
        &self.caps
    }

    fn request_flr(&self) {
        self.flr_requested.set(true);
    }

    fn set_cap_list_bit(&self) {
        PciConfig::set_cap_list_bit(self)
    }

    fn nonstd_access(
        &self,
        buf: &mut [u8],
        pos: usize,
        is_write: bool,
        cb: &mut Option<&mut CfgCallback<'_>>,
    ) -> Result<usize> {
        PciConfig::nonstd_access(self, buf, pos, is_write, cb)
    }
}

fn size_mask(size: u64) -> u64 {
    match size.checked_next_power_of_two() {
        Some(p) if size > 0 => !(p - 1),
        _ => 0,
    }
}

/// Size of the header register starting at `off`, 0 when `off` is not the
/// start of a register (writes there are refused).
fn header_reg_len(off: usize) -> usize {
    match off {
        OFF_VENDOR_ID => 4,
        OFF_COMMAND | OFF_STATUS => 2,
        OFF_REVISION => 1,
        OFF_CLASS_PROG => 3,
        OFF_CACHE_LINE | OFF_LATENCY | OFF_HEADER_TYPE | OFF_BIST => 1,
        OFF_BAR0..=OFF_BAR5 if (off - OFF_BAR0) & 3 == 0 => 4,
        OFF_CARDBUS_CIS | OFF_SUBSYS_VENDOR | OFF_ROM => 4,
        OFF_CAP_PTR => 1,
        OFF_INT_LINE | OFF_INT_PIN | OFF_MIN_GNT | OFF_MAX_LAT => 1,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: u32 = REGION_FLAG_MEM | 3;
    const MEM64: u32 = MEM | REGION_FLAG_64_BITS;
    const IO: u32 = 3;

    fn read(p: &PciConfig, off: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        let n = p.access(&mut v, off, false, None, false, &[])?;
        assert_eq!(n, len);
        Ok(v)
    }

    fn write(p: &PciConfig, off: u64, data: &[u8], bars: &[BarInfo]) -> Result<usize> {
        let mut v = data.to_vec();
        p.access(&mut v, off, true, None, false, bars)
    }

    fn rd32(p: &PciConfig, off: u64) -> u32 {
        let v = read(p, off, 4).unwrap();
        u32::from_le_bytes([v[0], v[1], v[2], v[3]])
    }

    fn express() -> PciConfig {
        PciConfig::new(PCI_TYPE_EXPRESS, PCI_HEADER_TYPE_NORMAL, 0).unwrap()
    }

    /// What a guest does to size a BAR: write all-ones, read back, restore.
    fn probe_bar(p: &PciConfig, off: u64, bars: &[BarInfo]) -> u32 {
        let orig = read(p, off, 4).unwrap();
        write(p, off, &[0xff; 4], bars).unwrap();
        let v = rd32(p, off);
        write(p, off, &orig, bars).unwrap();
        v
    }

    #[test]
    fn init_sizes_and_errors() {
        for (t, size) in [(0, 256), (1, 256), (2, 4096), (3, 4096)] {
            let p = PciConfig::new(t, 0, 7).unwrap();
            assert_eq!(p.size(), size);
            assert_eq!(p.pci_type(), t);
            assert_eq!(p.as_ptr() as usize % 8, 0);
            let mut all = vec![0xaau8; size];
            p.read_raw(0, &mut all).unwrap();
            assert!(all.iter().all(|&b| b == 0));
        }
        assert_eq!(PciConfig::new(4, 0, 0).err(), Some(Errno::EINVAL));
        assert_eq!(PciConfig::new(3, 1, 0).err(), Some(Errno::EINVAL));
        assert_eq!(PciConfig::new(0, -1, 0).err(), Some(Errno::EINVAL));
        assert_eq!(PciConfig::with_size(4096).unwrap().size(), 4096);
        assert_eq!(
            PciConfig::with_size(4096).unwrap().pci_type(),
            PCI_TYPE_CONVENTIONAL
        );
        assert_eq!(PciConfig::with_size(300).unwrap().size(), 300);
        assert_eq!(PciConfig::with_size(63).err(), Some(Errno::EINVAL));
        assert_eq!(
            PciConfig::with_size(MAX_CFG_SIZE + 1).err(),
            Some(Errno::EINVAL)
        );
        // A small space still works: header emulation stays in bounds.
        let small = PciConfig::with_size(64).unwrap();
        small.set_id(1, 2, 3, 4);
        small.realize(
            &[BarInfo {
                size: 16,
                flags: MEM,
            }],
            true,
        );
        assert_eq!(probe_bar(&small, 0x10, &[]), 0xffff_fff0);
        assert_eq!(read(&small, 0, 64).unwrap()[0..2], [1, 0]);
        assert_eq!(small.find_capability(false, 1), Err(Errno::ENOENT));
        assert_eq!(small.find_capability(true, 1), Err(Errno::EINVAL));
        assert_eq!(
            small.add_capability(0, 0, &[1, 0, 0, 0, 0, 0, 0, 0]),
            Err(Errno::ENOSPC)
        );
    }

    #[test]
    fn ids_and_class_land_in_buffer() {
        let p = PciConfig::new(0, 0, 0).unwrap();
        p.set_id(0x1af4, 0x1000, 0x1234, 0x5678);
        p.set_class(0x02, 0x00, 0x01);
        // The buffer itself, read without emulation.
        let mut raw = [0u8; 64];
        p.read_raw(0, &mut raw).unwrap();
        assert_eq!(&raw[0..4], &[0xf4, 0x1a, 0x00, 0x10]);
        assert_eq!(&raw[9..12], &[0x01, 0x00, 0x02]);
        assert_eq!(&raw[0x2c..0x30], &[0x34, 0x12, 0x78, 0x56]);
        // Reads through the emulation see the same, unaligned too.
        assert_eq!(read(&p, 1, 3).unwrap(), vec![0x1a, 0x00, 0x10]);
        // A store straight into the buffer (what C code does through the
        // pointer vfu_pci_get_config_space returns; `write_raw` stores
        // through the same pointer) is seen by the next access.
        p.write_raw(0x3d, &[2]).unwrap();
        assert_eq!(read(&p, 0x3d, 1).unwrap(), vec![2]);
    }

    #[test]
    fn realize_sets_bar_types_pin_and_cap_list() {
        let p = express();
        let bars = [
            BarInfo {
                size: 256,
                flags: IO,
            },
            BarInfo {
                size: 4096,
                flags: MEM,
            },
            BarInfo {
                size: 1 << 20,
                flags: MEM64,
            },
            BarInfo::default(),
            BarInfo {
                size: 1 << 30,
                flags: MEM64 | REGION_FLAG_PREFETCH,
            },
            BarInfo::default(),
            BarInfo::default(),
        ];
        p.realize(&bars, true);
        let got: Vec<u32> = (0..6).map(|i| rd32(&p, 0x10 + 4 * i)).collect();
        // As upstream: the unused BAR and the upper halves of the 64-bit
        // BARs have no MEM region, so they read as I/O.
        assert_eq!(got, vec![0x1, 0x0, 0x4, 0x1, 0xc, 0x1]);
        assert_eq!(read(&p, 0x3d, 1).unwrap(), vec![1]);
        assert_eq!(rd32(&p, 4) >> 16, 0, "no caps, no CL bit");

        let q = PciConfig::new(0, 0, 0).unwrap();
        q.add_capability(
            0,
            0,
            &[super::super::pci_caps::CAP_ID_PM, 0, 0, 0, 0, 0, 0, 0],
        )
        .unwrap();
        q.realize(&[], false);
        assert_eq!(read(&q, 6, 2).unwrap(), vec![0x10, 0]);
        assert_eq!(read(&q, 0x3d, 1).unwrap(), vec![0]);
    }

    #[test]
    fn bar_sizing() {
        let p = express();
        let bars = [
            BarInfo {
                size: 4096,
                flags: MEM,
            },
            BarInfo {
                size: 256,
                flags: IO,
            },
            BarInfo {
                size: 8 << 30,
                flags: MEM64,
            },
            BarInfo::default(),
            BarInfo {
                size: 1 << 20,
                flags: MEM64 | REGION_FLAG_PREFETCH,
            },
            BarInfo::default(),
            BarInfo::default(),
        ];
        p.realize(&bars, false);
        assert_eq!(probe_bar(&p, 0x10, &bars), 0xffff_f000);
        assert_eq!(probe_bar(&p, 0x14, &bars), 0xffff_ff01);
        assert_eq!(probe_bar(&p, 0x18, &bars), 0x0000_0004);
        assert_eq!(probe_bar(&p, 0x1c, &bars), 0xffff_fffe);
        assert_eq!(probe_bar(&p, 0x20, &bars), 0xfff0_000c);
        assert_eq!(probe_bar(&p, 0x24, &bars), 0xffff_ffff);

        // Restoring puts the original values back.
        assert_eq!(rd32(&p, 0x10), 0);
        assert_eq!(rd32(&p, 0x14), 1);
        // Programming an address keeps only the address bits and the type.
        write(&p, 0x10, &0xfebf_1234u32.to_le_bytes(), &bars).unwrap();
        assert_eq!(rd32(&p, 0x10), 0xfebf_1000);
        write(&p, 0x14, &0x0000_c0ffu32.to_le_bytes(), &bars).unwrap();
        assert_eq!(rd32(&p, 0x14), 0x0000_c001);
        // A 1-byte write only replaces the low byte.
        write(&p, 0x10, &[0xff], &bars).unwrap();
        assert_eq!(rd32(&p, 0x10), 0xfebf_1000);
        write(&p, 0x10, &[0x00, 0x20], &bars).unwrap();
        assert_eq!(rd32(&p, 0x10), 0xfebf_2000);
        // Writes in the middle of a BAR are refused.
        assert_eq!(write(&p, 0x11, &[0], &bars), Err(Errno::EINVAL));

        // Without explicit info the recorded one is used.
        let q = express();
        q.setup_bar(
            0,
            BarInfo {
                size: 32,
                flags: MEM,
            },
        );
        q.realize(&[], false);
        assert_eq!(probe_bar(&q, 0x10, &[]), 0xffff_ffe0);
        // Unimplemented BARs read as I/O (bit 0), as upstream's do, even
        // after sizing.
        assert_eq!(rd32(&q, 0x14), 1);
        assert_eq!(probe_bar(&q, 0x14, &[]), 1);
    }

    #[test]
    fn bar_sizing_like_linux_probe() {
        // The 64-bit probe of upstream's region-info test: 4, 8 and 16 GiB.
        let p = express();
        let mut bars = [BarInfo::default(); 7];
        for (i, s) in [(0, 1u64 << 32), (2, 2 << 32), (4, 4 << 32)] {
            bars[i] = BarInfo {
                size: s,
                flags: MEM64,
            };
        }
        p.realize(&bars, false);
        for i in [0u64, 2, 4] {
            let lo = probe_bar(&p, 0x10 + 4 * i, &bars);
            let hi = probe_bar(&p, 0x14 + 4 * i, &bars);
            assert_eq!(lo & 0x7, 0x4);
            let sz = ((u64::from(hi) << 32) | u64::from(lo & 0xffff_fff0)).wrapping_neg();
            assert_eq!(sz, bars[i as usize].size);
        }
    }

    #[test]
    fn rom_bar() {
        let p = express();
        // No ROM: upstream's accepted values, register stays zero.
        for v in [0xffff_ffffu32, 0xffff_f800, 0xffff_fffe, 0] {
            write(&p, 0x30, &v.to_le_bytes(), &[]).unwrap();
            assert_eq!(rd32(&p, 0x30), 0);
        }
        assert_eq!(
            write(&p, 0x30, &0x1234_0001u32.to_le_bytes(), &[]),
            Err(Errno::EINVAL)
        );

        // A 64 KiB ROM can be sized, placed and enabled.
        let mut bars = [BarInfo::default(); 7];
        bars[ROM_INDEX] = BarInfo {
            size: 0x10000,
            flags: 1,
        };
        assert_eq!(probe_bar(&p, 0x30, &bars), 0xffff_0001);
        write(&p, 0x30, &0xfeb0_0001u32.to_le_bytes(), &bars).unwrap();
        assert_eq!(rd32(&p, 0x30), 0xfeb0_0001);
        // A tiny ROM still decodes at 2 KiB granularity.
        bars[ROM_INDEX].size = 100;
        assert_eq!(probe_bar(&p, 0x30, &bars), 0xffff_f801);
    }

    #[test]
    fn command_register() {
        let p = express();
        write(&p, 4, &0x0507u16.to_le_bytes(), &[]).unwrap();
        assert_eq!(read(&p, 4, 2).unwrap(), 0x0507u16.to_le_bytes());
        write(&p, 4, &[0, 0], &[]).unwrap();
        assert_eq!(read(&p, 4, 2).unwrap(), vec![0, 0]);
        // VGA palette snooping is accepted but not stored.
        write(&p, 4, &0x0037u16.to_le_bytes(), &[]).unwrap();
        assert_eq!(read(&p, 4, 2).unwrap(), 0x0017u16.to_le_bytes());
        // Unsupported bits fail the write, the known ones still apply.
        assert_eq!(
            write(&p, 4, &0x0046u16.to_le_bytes(), &[]),
            Err(Errno::EINVAL)
        );
        assert_eq!(read(&p, 4, 2).unwrap(), 0x0006u16.to_le_bytes());
        // A 1-byte write leaves the high byte alone.
        write(&p, 4, &0x0400u16.to_le_bytes(), &[]).unwrap();
        write(&p, 4, &[0x02], &[]).unwrap();
        assert_eq!(read(&p, 4, 2).unwrap(), 0x0402u16.to_le_bytes());
        assert_eq!(write(&p, 5, &[0x04], &[]), Err(Errno::EINVAL));
        // Command + status in one write: status ignored.
        write(&p, 4, &[0x01, 0x00, 0xff, 0xff], &[]).unwrap();
        assert_eq!(rd32(&p, 4), 0x0000_0001);
    }

    #[test]
    fn header_write_rules() {
        let p = express();
        p.set_id(0x1111, 0x2222, 0x3333, 0x4444);
        p.set_class(1, 2, 3);
        assert_eq!(write(&p, 0, &[0; 4], &[]), Err(Errno::EINVAL));
        assert_eq!(write(&p, 0, &[0; 2], &[]), Err(Errno::EINVAL));
        assert_eq!(write(&p, 2, &[0; 2], &[]), Err(Errno::EINVAL));
        assert_eq!(write(&p, 0x2c, &[0; 4], &[]), Err(Errno::EINVAL));
        assert_eq!(write(&p, 0x0e, &[0x80], &[]), Err(Errno::EINVAL));
        assert_eq!(write(&p, 0x0f, &[0x80], &[]), Err(Errno::EINVAL));
        assert_eq!(write(&p, 0x28, &[1; 4], &[]), Err(Errno::EINVAL));
        assert_eq!(write(&p, 0x34, &[0x40], &[]), Err(Errno::EINVAL));
        for off in 0x35..0x3c {
            assert_eq!(write(&p, off, &[1], &[]), Err(Errno::EINVAL));
        }
        assert_eq!(rd32(&p, 0), 0x2222_1111);
        // Read-only registers: write accepted and ignored.
        assert_eq!(write(&p, 8, &[9, 9, 9, 9], &[]), Ok(4));
        assert_eq!(rd32(&p, 8), 0x0102_0300);
        // Interrupt line, pin, min grant, max latency in one go.
        assert_eq!(write(&p, 0x3c, &[0x0b, 0x04, 0x05, 0x06], &[]), Ok(4));
        assert_eq!(rd32(&p, 0x3c), 0x0000_000b);
        // Cache line size and latency timer are stored; header type refused
        // after them, as upstream.
        assert_eq!(
            write(&p, 0x0c, &[0x10, 0x20, 0x00], &[]),
            Err(Errno::EINVAL)
        );
        assert_eq!(read(&p, 0x0c, 2).unwrap(), vec![0x10, 0x20]);
    }

    #[test]
    fn noncap_area_without_callback() {
        let p = express();
        p.write_raw(0x80, b"wxyz").unwrap();
        assert_eq!(read(&p, 0x80, 4).unwrap(), b"wxyz");
        assert_eq!(write(&p, 0x80, b"abcd", &[]), Err(Errno::EINVAL));
        assert_eq!(read(&p, 0x80, 4).unwrap(), b"wxyz");
        // Reads may span the header and beyond.
        let v = read(&p, 60, 72).unwrap();
        assert_eq!(&v[0x80 - 60..0x84 - 60], b"wxyz");
    }

    #[test]
    fn callback_gets_nonemulated_pieces() {
        let p = express();
        p.set_id(0xabcd, 0, 0, 0);
        let mut seen = Vec::new();
        let mut f = |b: &mut [u8], off: u64, w: bool| -> Result<usize> {
            seen.push((off, b.len(), w));
            if !w {
                b.fill(0x5a);
            }
            Ok(b.len())
        };
        let mut v = vec![0u8; 12];
        assert_eq!(
            p.access(&mut v, 60, false, Some(&mut f), false, &[]),
            Ok(12)
        );
        assert_eq!(&v[..4], &[0, 0, 0, 0]);
        assert!(v[4..].iter().all(|&b| b == 0x5a));
        let mut w = vec![1u8; 8];
        assert_eq!(
            p.access(&mut w, 0x100, true, Some(&mut f), false, &[]),
            Ok(8)
        );
        assert_eq!(seen, vec![(64, 8, false), (0x100, 8, true)]);
    }

    #[test]
    fn always_cb_takes_everything() {
        let p = express();
        let mut seen = Vec::new();
        let mut f = |b: &mut [u8], off: u64, w: bool| -> Result<usize> {
            seen.push((off, b.len(), w));
            Ok(b.len())
        };
        let mut v = vec![0u8; 4];
        assert_eq!(p.access(&mut v, 0, true, Some(&mut f), true, &[]), Ok(4));
        assert_eq!(seen, vec![(0, 4, true)]);
        assert_eq!(
            p.access(&mut v, 0, false, None, true, &[]),
            Err(Errno::EINVAL)
        );
        let mut greedy = |b: &mut [u8], _: u64, _: bool| -> Result<usize> { Ok(b.len() + 1) };
        assert_eq!(
            p.access(&mut v, 0, false, Some(&mut greedy), true, &[]),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            p.access(&mut v, 0x100, false, Some(&mut greedy), false, &[]),
            Err(Errno::EINVAL)
        );
    }

    #[test]
    fn callback_short_and_failing() {
        let p = express();
        let mut lazy = |_: &mut [u8], _: u64, _: bool| -> Result<usize> { Ok(0) };
        let mut v = vec![0u8; 8];
        assert_eq!(
            p.access(&mut v, 0x100, false, Some(&mut lazy), false, &[]),
            Ok(0)
        );
        let mut half = |b: &mut [u8], _: u64, _: bool| -> Result<usize> { Ok(b.len().div_ceil(2)) };
        assert_eq!(
            p.access(&mut v, 0x100, false, Some(&mut half), false, &[]),
            Ok(8)
        );
        let mut bad = |_: &mut [u8], _: u64, _: bool| -> Result<usize> { Err(Errno::EIO) };
        assert_eq!(
            p.access(&mut v, 0x100, true, Some(&mut bad), false, &[]),
            Err(Errno::EIO)
        );
    }

    #[test]
    fn out_of_range_rejected() {
        let p = PciConfig::new(0, 0, 0).unwrap();
        let mut v = vec![0u8; 8];
        assert_eq!(
            p.access(&mut v, 252, false, None, false, &[]),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            p.access(&mut v, 256, true, None, false, &[]),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            p.access(&mut v, u64::MAX, false, None, false, &[]),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            p.access(&mut v, u64::MAX - 3, false, None, false, &[]),
            Err(Errno::EINVAL)
        );
        assert_eq!(p.access(&mut v, 248, false, None, false, &[]), Ok(8));
        assert_eq!(p.access(&mut [], 256, false, None, false, &[]), Ok(0));
        assert_eq!(p.read_raw(usize::MAX, &mut v), Err(Errno::EINVAL));
        assert_eq!(p.write_raw(250, &v), Err(Errno::EINVAL));
        assert!(!p.write_needs_quiesce(7));
    }

    #[test]
    fn random_accesses_stay_in_bounds() {
        use super::super::pci_caps::{CAP_FLAG_CALLBACK, CAP_FLAG_EXTENDED, CAP_FLAG_READONLY};
        let p = express();
        p.add_capability(0, 0, &[1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
        p.add_capability(
            0,
            0,
            &[
                5, 0, 0x0e, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ],
        )
        .unwrap();
        p.add_capability(0, 0, &[0x11, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0])
            .unwrap();
        let mut px = vec![0u8; 0x3c];
        px[0] = 0x10;
        px[7] = 0x10;
        p.add_capability(0, 0, &px).unwrap();
        p.add_capability(0, CAP_FLAG_READONLY, &[9, 0, 5, 1, 2])
            .unwrap();
        p.add_capability(0, CAP_FLAG_CALLBACK, &[9, 0, 6, 1, 2, 3])
            .unwrap();
        p.add_capability(0, CAP_FLAG_EXTENDED, &[3, 0, 1, 0, 1, 2, 3, 4, 5, 6, 7, 8])
            .unwrap();
        p.add_capability(
            0,
            CAP_FLAG_EXTENDED,
            &[0xb, 0, 1, 0, 0, 0, 0x00, 0x01, 1, 2, 3, 4, 5, 6, 7, 8],
        )
        .unwrap();
        let bars = [BarInfo {
            size: 4096,
            flags: MEM,
        }; 7];
        p.realize(&bars, true);

        let mut seed: u64 = 0x1234_5678_9abc_def0;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        // Miri interprets every access: fewer of them there.
        let rounds = if cfg!(miri) { 600 } else { 20000 };
        for i in 0..rounds {
            let off = match next() % 4 {
                0 => next() % 64,
                1 => 64 + next() % 192,
                2 => next() % 4200,
                _ => u64::MAX - next() % 8,
            };
            let len = (next() % 80) as usize;
            let is_write = next() % 2 == 0;
            let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let r = if i % 2 == 0 {
                p.access(&mut data, off, is_write, None, false, &bars)
            } else {
                let mut cb = |b: &mut [u8], o: u64, _w: bool| -> Result<usize> {
                    assert!(o as usize + b.len() <= 4096);
                    Ok(b.len())
                };
                p.access(&mut data, off, is_write, Some(&mut cb), false, &[])
            };
            if let Ok(n) = r {
                assert!(n <= len);
                assert!(off as usize + len <= 4096);
            }
            let _ = p.take_flr_request();
        }
        // The capability lists survived: headers are never client-writable.
        use super::super::pci_caps::CAP_ID_VNDR;
        assert_eq!(p.find_capability(false, 1), Ok(64));
        assert!(p
            .find_next_capability(false, 64, i32::from(CAP_ID_VNDR))
            .is_ok());
        assert_eq!(p.find_capability(true, 0xb), Ok(268));
    }

    #[test]
    fn pci_type_values_and_sizes() {
        for t in [
            PciType::Conventional,
            PciType::PciX1,
            PciType::PciX2,
            PciType::Express,
        ] {
            assert_eq!(PciType::from_raw(u32::from(t)), Some(t));
            let p = PciConfig::new(t.into(), PCI_HEADER_TYPE_NORMAL, 0).unwrap();
            assert_eq!(p.size(), t.config_size());
        }
        assert_eq!(u32::from(PciType::Express), PCI_TYPE_EXPRESS);
        assert_eq!(PciType::Conventional.config_size(), 256);
        assert_eq!(PciType::Express.config_size(), 4096);
        assert_eq!(PciType::from_raw(4), None);
    }
}
