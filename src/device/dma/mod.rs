//! The DMA controller: the table of guest memory regions a client has
//! registered with `VFIO_USER_DMA_MAP`, address translation into
//! scatter/gather entries, direct access to that memory, and dirty page
//! logging for live migration.
//!
//! Design:
//!
//! * Regions live in a `RegionTable` (`table.rs`: ordered by first
//!   IOVA, with a page hash for small regions), behind an `RwLock`.
//!   Map/unmap take the write lock; the I/O paths that miss the cache below
//!   (translation, `sgl_get`, `sgl_put`, dirty marking, direct access) take
//!   the read lock, so device threads run concurrently with each other.
//! * Each thread keeps a two-way set-associative cache of the regions it
//!   translated into (a software TLB: 1 Ki sets of two one-line entries,
//!   128 KiB, allocated on the thread's first translation), each entry
//!   tagged with a process-wide unique "generation" of the region table.
//!   Removing a region starts a new generation; adding one does not (it
//!   overlaps nothing, so no cached translation becomes false). A translation, `sgl_get` or a
//!   direct `sg_read`/`sg_write` that hits the cache takes no lock and walks
//!   no tree. The direct copies run inside a read-side section (`rcu.rs`):
//!   plain stores to a slot of the thread's own, paired with the
//!   `membarrier` of the thread that removes a region, which waits for
//!   sections in progress before it unmaps anything.
//! * While the table holds at most 64 regions (guest RAM blocks, as SPDK's
//!   target sees them), a lock-free copy of it (`snap.rs`, a sequence
//!   lock rewritten under the write lock on every change) answers
//!   translation and `sgl_get` first, before the cache: a few compares,
//!   no thread-local access, no lock. An entry remembers where the copy
//!   held its region (a checked hint), so its `sgl_get` does not search.
//! * A [`DmaSg`] names its region by a never-reused identifier plus the
//!   region's start address. Every use re-validates both against the table
//!   (an `O(log n)` lookup), so an entry for a region that was unmapped, or a
//!   made-up entry, yields an errno instead of touching freed memory.
//! * Dirty bitmaps are arrays of `AtomicU64`, set with `fetch_or` under the
//!   read lock and harvested with `swap`, one 64-page word at a time.
//!
//! Files of this module, one concept each:
//!
//! * `controller.rs`: [`DmaController`] itself, its region table under the
//!   lock, and adding, finding and removing regions;
//! * `region.rs`: a registered region, its mapping of the client's fd
//!   (`mmap`) and the identity of that file, region identifiers and table
//!   generations;
//! * `translate.rs`: address translation into scatter/gather entries
//!   (`addr_to_sgl`, `sgl_get` / `sgl_put`);
//! * `fast.rs`: the per-I/O fast paths over the lock-free copy, which the
//!   C entry points call straight from the context;
//! * `tlb.rs`: the per-thread translation cache;
//! * `table.rs`: the ordered region table (with its page hash);
//! * `snap.rs`: the lock-free copy of a small table;
//! * `rcu.rs`: the read-side sections of the lock-free access paths;
//! * `dirty.rs`: dirty page logging and its bitmaps;
//! * `guest.rs`: access to guest memory ([`GuestSlice`], `sg_read` /
//!   `sg_write`, `read` / `write`, file I/O for regions that are not mapped).
//!
//! Each file carries the unit tests of its code; `test_util.rs` holds the
//! helpers they share.

use std::cell::Cell;
use std::ffi::c_void;
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Errno, Result};

mod controller;
mod dirty;
mod fast;
mod guest;
mod rcu;
mod region;
mod snap;
mod table;
#[cfg(test)]
mod test_util;
mod tlb;
mod translate;

pub use controller::DmaController;
use controller::*;
pub use dirty::bitmap_size;
use dirty::*;
pub use guest::GuestSlice;
use region::*;
pub(crate) use snap::Snapshot;
use table::{RegionTable, Span};
use tlb::*;
use translate::*;

/// Largest DMA region a client may register, as upstream: 8 TiB on 64-bit
/// hosts.
#[cfg(target_pointer_width = "64")]
pub const MAX_DMA_SIZE: u64 = 8 << 40;
/// Largest DMA region a client may register on 32-bit hosts.
#[cfg(not(target_pointer_width = "64"))]
pub const MAX_DMA_SIZE: u64 = u32::MAX as u64;

/// One scatter/gather entry, laid out exactly like upstream's
/// `struct dma_sg` so that C callers can allocate arrays of it
/// (`dma_sg_size()` reports its size).
///
/// `dma_addr` is the IOVA where the region starts and `offset` the offset of
/// the described range within that region, so the range's IOVA is
/// `dma_addr + offset`. `region` is an opaque identifier of the region; it is
/// never 0 for a valid entry and never reused, and its low 32 bits are never
/// all zero (some callers only look at those).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DmaSg {
    /// IOVA of the start of the region.
    pub dma_addr: *mut c_void,
    /// Opaque region identifier (0 means "none").
    pub region: usize,
    /// Length of the described range.
    pub length: u64,
    /// Offset of the range within the region.
    pub offset: u64,
    /// Whether the range was translated for writing.
    pub writeable: bool,
    /// Where the region was found in the controller's lock-free copy of the
    /// table, so that `sgl_get` looks there first (a hint: checked, and
    /// searched for when wrong). Upstream's layout has padding here.
    pub(crate) hint: u8,
}

impl Default for DmaSg {
    fn default() -> Self {
        DmaSg {
            dma_addr: std::ptr::null_mut(),
            region: 0,
            length: 0,
            offset: 0,
            writeable: false,
            hint: 0,
        }
    }
}

impl DmaSg {
    /// IOVA of the start of the described range.
    pub fn iova(&self) -> u64 {
        (self.dma_addr as usize as u64).wrapping_add(self.offset)
    }
}

/// Description of a DMA region handed to the device's register/unregister
/// callbacks, laid out exactly like upstream's `vfu_dma_info_t`.
///
/// `vaddr` is where the region's first byte is mapped in this process (null
/// when the region is not mapped), `mapping` the whole (page-aligned) mapping
/// that contains it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DmaInfo {
    /// Guest IOVA range of the region.
    pub iova: libc::iovec,
    /// Local address of the region's first byte, or null.
    pub vaddr: *mut c_void,
    /// The local mapping containing the region, or `{null, 0}`.
    pub mapping: libc::iovec,
    /// Page size of the backing (max of the system page size and the file's
    /// block size).
    pub page_size: usize,
    /// `PROT_READ` / `PROT_WRITE` bits the client granted.
    pub prot: u32,
}

impl DmaInfo {
    /// First IOVA of the region.
    pub fn iova_start(&self) -> u64 {
        self.iova.iov_base as usize as u64
    }

    /// Length of the region in bytes.
    pub fn iova_len(&self) -> u64 {
        self.iova.iov_len as u64
    }
}

impl PartialEq for DmaInfo {
    fn eq(&self, other: &Self) -> bool {
        self.iova.iov_base == other.iova.iov_base
            && self.iova.iov_len == other.iova.iov_len
            && self.vaddr == other.vaddr
            && self.mapping.iov_base == other.mapping.iov_base
            && self.mapping.iov_len == other.mapping.iov_len
            && self.page_size == other.page_size
            && self.prot == other.prot
    }
}

impl Eq for DmaInfo {}

impl fmt::Debug for DmaInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaInfo")
            .field("iova", &(self.iova.iov_base, self.iova.iov_len))
            .field("vaddr", &self.vaddr)
            .field("mapping", &(self.mapping.iov_base, self.mapping.iov_len))
            .field("page_size", &self.page_size)
            .field("prot", &self.prot)
            .finish()
    }
}

/// Failure of [`DmaController::addr_to_sgl`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SglError {
    /// The translation failed with this errno.
    Errno(Errno),
    /// The output array is too small; this many entries are needed. (The C
    /// API reports this as `-n - 1`.)
    NeedMore(usize),
}

impl From<Errno> for SglError {
    fn from(e: Errno) -> Self {
        SglError::Errno(e)
    }
}

impl fmt::Display for SglError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SglError::Errno(e) => write!(f, "{e}"),
            SglError::NeedMore(n) => write!(f, "{n} scatter/gather entries needed"),
        }
    }
}

impl std::error::Error for SglError {}

/// The C API's `LIBVFIO_USER_MAX_DMA_REGIONS`: a region limit for
/// [`Context::setup_dma`](super::Context::setup_dma) that is as good as
/// none.
pub const MAX_DMA_REGIONS: usize = 1000 * 1000;

/// `PROT_READ`, for [`DmaController::with_guest`] and
/// [`DmaController::addr_to_sgl`].
pub const PROT_READ: i32 = libc::PROT_READ;
/// `PROT_WRITE`, for [`DmaController::with_guest`] and
/// [`DmaController::addr_to_sgl`].
pub const PROT_WRITE: i32 = libc::PROT_WRITE;
/// `PROT_READ | PROT_WRITE`.
pub const PROT_RW: i32 = PROT_READ | PROT_WRITE;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_upstream() {
        assert_eq!(std::mem::size_of::<DmaSg>(), 40);
        assert_eq!(std::mem::offset_of!(DmaSg, dma_addr), 0);
        assert_eq!(std::mem::offset_of!(DmaSg, region), 8);
        assert_eq!(std::mem::offset_of!(DmaSg, length), 16);
        assert_eq!(std::mem::offset_of!(DmaSg, offset), 24);
        assert_eq!(std::mem::offset_of!(DmaSg, writeable), 32);
        // The lookup hint lives in what upstream leaves as padding.
        assert_eq!(std::mem::offset_of!(DmaSg, hint), 33);
        assert_eq!(std::mem::size_of::<DmaInfo>(), 56);
        assert_eq!(std::mem::offset_of!(DmaInfo, iova), 0);
        assert_eq!(std::mem::offset_of!(DmaInfo, vaddr), 16);
        assert_eq!(std::mem::offset_of!(DmaInfo, mapping), 24);
        assert_eq!(std::mem::offset_of!(DmaInfo, page_size), 40);
        assert_eq!(std::mem::offset_of!(DmaInfo, prot), 48);
        fn send_sync<T: Send + Sync>() {}
        send_sync::<DmaController>();
    }
}
