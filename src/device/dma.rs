//! The DMA controller: the table of guest memory regions a client has
//! registered with `VFIO_USER_DMA_MAP`, address translation into
//! scatter/gather entries, direct access to that memory, and dirty page
//! logging for live migration.
//!
//! Design:
//!
//! * Regions live in a `RegionTable` (`dma_table.rs`: ordered by first
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
//!   target sees them), a lock-free copy of it (`dma_snap.rs`, a sequence
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

use super::dma_snap::{self, Snapshot};
use super::dma_table::{RegionTable, Span};
use super::rcu;
use std::cell::Cell;
use std::ffi::c_void;
use std::fmt;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Errno, Result};

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

/// Number of bytes of a dirty bitmap covering `len` bytes at `page_size`
/// granularity: one bit per (started) page, rounded up to whole 64-bit words,
/// as upstream computes it. `EINVAL` for a zero page size or a length shorter
/// than one page.
pub fn bitmap_size(len: u64, page_size: u64) -> Result<usize> {
    if page_size == 0 || len < page_size {
        return Err(Errno::EINVAL);
    }
    let pages = len / page_size + u64::from(len % page_size != 0);
    let bytes = pages.div_ceil(64).checked_mul(8).ok_or(Errno::EINVAL)?;
    usize::try_from(bytes).map_err(|_| Errno::EINVAL)
}

/// How the server reaches a region's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AccessMode {
    /// No fd: only through VFIO_USER_DMA_READ/WRITE messages.
    Message,
    /// The fd is mapped into this process.
    Mmap,
    /// `pread`/`pwrite` on the fd.
    FileIo,
}

/// What makes two fds "the same file" for an identical re-map: device,
/// inode and open flags (upstream's fallback criterion when `kcmp` is not
/// available; we always use it so that mmap'ed regions need not keep their
/// fd open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    flags: i32,
}

impl FileIdentity {
    fn of(fd: &OwnedFd) -> Result<FileIdentity> {
        Self::from_stat(fd, &fstat(fd)?)
    }

    /// The identity of `fd`, whose `fstat` is `st`.
    fn from_stat(fd: &OwnedFd, st: &libc::stat) -> Result<FileIdentity> {
        // SAFETY: F_GETFL on an open fd takes no further arguments.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
        if flags == -1 {
            return Err(Errno::last());
        }
        Ok(FileIdentity {
            dev: st.st_dev,
            ino: st.st_ino,
            flags,
        })
    }
}

fn fstat(fd: &OwnedFd) -> Result<libc::stat> {
    // SAFETY: `stat` is plain old data, so all-zero is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open (we own it) and `st` is a valid out pointer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(Errno::EINVAL);
    }
    Ok(st)
}

/// A private shared mapping of a region's fd; unmapped on drop.
struct Mapping {
    base: usize,
    len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what a successful mmap returned and
        // nothing else unmaps them; every user of the memory goes through the
        // region table, from which the owning region was removed first.
        unsafe {
            libc::munmap(self.base as *mut c_void, self.len);
        }
    }
}

/// One registered region. `repr(C)` to keep the fields a lookup reads
/// together at the front, in the first cache line.
#[repr(C)]
struct Region {
    id: usize,
    iova: u64,
    len: u64,
    /// Local address of the first byte (0 when not mapped).
    vaddr: usize,
    prot: i32,
    mode: AccessMode,
    /// Offset of the region in its file.
    file_offset: u64,
    page_size: usize,
    mapping: Option<Mapping>,
    /// Kept only for FILE_IO regions (shared so that I/O can run without the
    /// table lock held).
    fd: Option<Arc<OwnedFd>>,
    identity: Option<FileIdentity>,
    /// One bit per logging page while dirty page logging is on.
    dirty: Option<Box<[AtomicU64]>>,
}

impl Span for Region {
    fn start(&self) -> u64 {
        self.iova
    }
    fn len(&self) -> u64 {
        self.len
    }
}

impl Region {
    fn end(&self) -> u64 {
        // Cannot overflow: checked when the region was added.
        self.iova + self.len
    }

    fn info(&self) -> DmaInfo {
        let (map_base, map_len) = match &self.mapping {
            Some(m) => (m.base, m.len),
            None => (0, 0),
        };
        DmaInfo {
            iova: libc::iovec {
                iov_base: self.iova as usize as *mut c_void,
                iov_len: self.len as usize,
            },
            vaddr: self.vaddr as *mut c_void,
            mapping: libc::iovec {
                iov_base: map_base as *mut c_void,
                iov_len: map_len,
            },
            page_size: self.page_size,
            prot: self.prot as u32,
        }
    }

    /// Sets the dirty bits of the pages touched by `[offset, offset + len)`
    /// (offsets within the region). No-op without a bitmap.
    fn mark_dirty(&self, offset: u64, len: u64, page_size: u64) {
        let Some(bits) = &self.dirty else { return };
        if len == 0 || page_size == 0 {
            return;
        }
        let Some(end) = offset.checked_add(len) else {
            return;
        };
        let first = offset / page_size;
        let last = end.div_ceil(page_size);
        set_bits(bits, first, last);
    }
}

/// Atomically sets bits `[first, last)` of `words`, clipped to its size.
fn set_bits(words: &[AtomicU64], first: u64, last: u64) {
    let total = (words.len() as u64).saturating_mul(64);
    let last = last.min(total);
    if first >= last {
        return;
    }
    let w_first = first / 64;
    let w_last = (last - 1) / 64;
    for w in w_first..=w_last {
        let lo = if w == w_first { first % 64 } else { 0 };
        let hi = if w == w_last { (last - 1) % 64 + 1 } else { 64 };
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        if let Some(word) = usize::try_from(w).ok().and_then(|i| words.get(i)) {
            word.fetch_or(mask, Ordering::Release);
        }
    }
}

/// Allocates `n` zeroed atomic words without touching the memory (the
/// allocator hands out lazily zeroed pages for big sizes), reporting failure
/// as `ENOMEM` instead of aborting.
fn zeroed_words(n: usize) -> Result<Box<[AtomicU64]>> {
    if n == 0 {
        return Ok(Box::new([]));
    }
    let layout = std::alloc::Layout::array::<AtomicU64>(n).map_err(|_| Errno::ENOMEM)?;
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut AtomicU64;
    if ptr.is_null() {
        return Err(Errno::ENOMEM);
    }
    // SAFETY: `ptr` is a fresh allocation of exactly `n` AtomicU64 with the
    // global allocator and the layout `Box<[AtomicU64]>` uses; all-zero bytes
    // are a valid AtomicU64 (it has the same representation as u64).
    Ok(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, n)) })
}

fn dirty_bitmap_for(len: u64, page_size: u64) -> Result<Box<[AtomicU64]>> {
    let pages = len.div_ceil(page_size);
    let words = usize::try_from(pages.div_ceil(64)).map_err(|_| Errno::ENOMEM)?;
    zeroed_words(words)
}

fn system_page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as usize
    } else {
        4096
    }
}

/// The page size for a region backed by a file whose `fstat` is `st`: the larger of the system page
/// size and the file's block size (hugetlbfs reports its huge page size), as
/// upstream. A block size that is not a multiple of the system page size
/// cannot be used to align a mapping, so it is ignored.
fn fd_page_size(st: &libc::stat) -> Result<usize> {
    let sys = system_page_size();
    let blk = usize::try_from(st.st_blksize).map_err(|_| Errno::EINVAL)?;
    if blk > sys && blk % sys == 0 {
        Ok(blk)
    } else {
        Ok(sys)
    }
}

/// Process-wide source of region table generations, so that a generation
/// identifies one shape of one controller's table and a thread's cached
/// translation can never be mistaken for another controller's.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);
/// Process-wide source of region identifiers.
static NEXT_REGION_ID: AtomicUsize = AtomicUsize::new(1);

fn new_generation() -> u64 {
    NEXT_GENERATION.fetch_add(1, Ordering::Relaxed)
}

fn new_region_id() -> usize {
    loop {
        let id = NEXT_REGION_ID.fetch_add(1, Ordering::Relaxed);
        // C callers (and upstream's Python bindings) may read the field as a
        // 32-bit int; keep that part non-zero too.
        if id as u32 != 0 {
            return id;
        }
    }
}

/// A region as a thread's translation cache remembers it.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Hint {
    generation: u64,
    start: u64,
    len: u64,
    id: usize,
    prot: i32,
    /// Local address of the region when it is mmap'ed, else 0.
    vaddr: usize,
    /// The region itself. Only dereferenced with the table's read lock held
    /// and `generation` current, which proves the region is still there.
    region: *const Region,
}

impl Hint {
    const EMPTY: Hint = Hint {
        generation: 0,
        start: 0,
        len: 0,
        id: 0,
        prot: 0,
        vaddr: 0,
        region: std::ptr::null(),
    };

    fn of(region: &Region, generation: u64) -> Hint {
        Hint {
            generation,
            start: region.iova,
            len: region.len,
            id: region.id,
            prot: region.prot,
            vaddr: if region.mode == AccessMode::Mmap {
                region.vaddr
            } else {
                0
            },
            region,
        }
    }
}

/// log2 of the number of sets in each thread's translation cache.
const TLB_SET_BITS: u32 = 10;
/// Addresses in the same 4 KiB granule share a cache set.
const TLB_GRANULE_SHIFT: u32 = 12;

/// One set of the translation cache: two entries, the most recently filled
/// first, in two adjacent cache lines.
#[repr(C, align(128))]
struct TlbSet([Cell<Hint>; 2]);

/// What each thread keeps for DMA: its translation cache and its handle for
/// entering the read-side sections of the lock-free access paths.
struct ThreadCache {
    sets: Box<[TlbSet]>,
    reader: rcu::Reader,
}

thread_local! {
    /// Each thread's translation cache: a two-way set-associative table of
    /// the regions it translated into recently, indexed by a hash of the
    /// address's granule (a software TLB). Allocated on a thread's first
    /// translation, so threads that never do DMA pay nothing.
    static TLB: ThreadCache = ThreadCache {
        sets: (0..1usize << TLB_SET_BITS)
            .map(|_| TlbSet([Cell::new(Hint::EMPTY), Cell::new(Hint::EMPTY)]))
            .collect(),
        reader: rcu::Reader::new(),
    };
}

fn tlb_set_index(iova: u64) -> usize {
    // Fibonacci hashing: regions laid out with any power-of-two stride still
    // spread over the whole table.
    ((iova >> TLB_GRANULE_SHIFT).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - TLB_SET_BITS))
        as usize
}

impl ThreadCache {
    /// The entry of `iova`'s set that satisfies `hit`, if any. Both entries
    /// are read before either is tested, so that their loads overlap.
    #[inline]
    fn find(&self, iova: u64, hit: impl Fn(&Hint) -> bool) -> Option<Hint> {
        let set = &self.sets[tlb_set_index(iova)].0;
        let (h0, h1) = (set[0].get(), set[1].get());
        if hit(&h0) {
            Some(h0)
        } else if hit(&h1) {
            Some(h1)
        } else {
            None
        }
    }

    /// Makes `hint` the most recent entry of `iova`'s set; the older of the
    /// two goes, unless `hint` replaces an entry for the same region.
    fn insert(&self, iova: u64, hint: Hint) {
        let set = &self.sets[tlb_set_index(iova)].0;
        let first = set[0].get();
        if first.id != hint.id || first.start != hint.start {
            set[1].set(first);
        }
        set[0].set(hint);
    }
}

/// This thread's cached region for `iova` that satisfies `hit`.
#[inline]
fn tlb_find(iova: u64, hit: impl Fn(&Hint) -> bool) -> Option<Hint> {
    TLB.try_with(|t| t.find(iova, hit)).ok().flatten()
}

fn tlb_set(iova: u64, hint: Hint) {
    // During thread teardown the cache may be gone: then nothing is cached.
    let _ = TLB.try_with(|t| t.insert(iova, hint));
}

struct Inner {
    regions: RegionTable<Region>,
    /// Logging page size, 0 when not logging.
    dirty_page_size: u64,
}

/// The DMA controller of one device context. `Send + Sync`: every method
/// takes `&self`.
pub struct DmaController {
    inner: RwLock<Inner>,
    max_regions: usize,
    max_size: u64,
    /// Current generation of the region table (see [`NEXT_GENERATION`]).
    generation: AtomicU64,
    /// Copy of `Inner::dirty_page_size` readable without the lock, to make
    /// `sgl_put` free when not logging.
    logging_page_size: AtomicU64,
    /// Lock-free copy of the table while it is small (`dma_snap.rs`),
    /// republished under the write lock after every change.
    snap: Snapshot,
}

impl fmt::Debug for DmaController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaController")
            .field("regions", &self.region_count())
            .field("max_regions", &self.max_regions)
            .field(
                "logging_page_size",
                &self.logging_page_size.load(Ordering::Relaxed),
            )
            .finish()
    }
}

/// Resolves a scatter/gather entry to its region, rejecting entries that do
/// not name a live region or that reach outside it.
fn resolve<'a>(regions: &'a RegionTable<Region>, sg: &DmaSg) -> Result<&'a Region> {
    if sg.region == 0 {
        return Err(Errno::EINVAL);
    }
    let region = regions
        .get(sg.dma_addr as usize as u64)
        .filter(|r| r.id == sg.region)
        .ok_or(Errno::EINVAL)?;
    check_sg(region, sg)
}

/// The checks of [`resolve`] once the entry's region is known.
fn check_sg<'a>(region: &'a Region, sg: &DmaSg) -> Result<&'a Region> {
    check_range(region.len, region.prot, sg).map(|()| region)
}

/// Whether `sg` fits a region of `len` bytes and protection `prot`.
#[inline]
fn check_range(len: u64, prot: i32, sg: &DmaSg) -> Result<()> {
    let end = sg.offset.checked_add(sg.length).ok_or(Errno::EINVAL)?;
    if end > len {
        return Err(Errno::EINVAL);
    }
    if sg.writeable && prot & libc::PROT_WRITE == 0 {
        return Err(Errno::EACCES);
    }
    Ok(())
}

/// Whether the cached `h` is current (`generation`) and for the region `sg`
/// names (a non-zero identifier, checked by the caller).
#[inline]
fn names_region(h: &Hint, sg: &DmaSg, generation: u64) -> bool {
    h.generation != 0
        && h.generation == generation
        && h.id == sg.region
        && h.start == sg.dma_addr as usize as u64
}

#[inline]
fn fill_sg(sg: &mut DmaSg, region_start: u64, id: usize, addr: u64, len: u64, prot: i32) {
    fill_sg_hinted(sg, region_start, id, addr, len, prot, 0);
}

#[inline]
fn fill_sg_hinted(
    sg: &mut DmaSg,
    region_start: u64,
    id: usize,
    addr: u64,
    len: u64,
    prot: i32,
    hint: u8,
) {
    sg.hint = hint;
    sg.dma_addr = region_start as usize as *mut c_void;
    sg.region = id;
    sg.offset = addr - region_start;
    sg.length = len;
    sg.writeable = prot & libc::PROT_WRITE != 0;
}

impl DmaController {
    /// Creates an empty controller accepting at most `max_regions` regions of
    /// at most [`MAX_DMA_SIZE`] bytes each.
    pub fn new(max_regions: usize) -> Self {
        DmaController {
            inner: RwLock::new(Inner {
                regions: RegionTable::new(),
                dirty_page_size: 0,
            }),
            max_regions,
            max_size: MAX_DMA_SIZE,
            generation: AtomicU64::new(new_generation()),
            logging_page_size: AtomicU64::new(0),
            snap: Snapshot::new(),
        }
    }

    /// Republishes the lock-free copy of the table; call with the write lock
    /// held (`inner`), after every change to the table.
    fn publish_snapshot(&self, inner: &Inner) {
        let entries = inner.regions.values().map(|r| dma_snap::Entry {
            start: r.iova,
            len: r.len,
            id: r.id,
            vaddr: if r.mode == AccessMode::Mmap {
                r.vaddr
            } else {
                0
            },
            prot: r.prot,
            slot: 0,
        });
        self.snap.publish(inner.regions.len(), entries);
    }

    fn table(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn table_mut(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Must be called with the write lock held, after every removal from
    /// the table: it invalidates every thread's cached translations.
    fn bump_generation(&self) {
        self.generation.store(new_generation(), Ordering::Release);
    }

    /// Registers a region of `len` bytes at `iova`.
    ///
    /// Without an fd the region is only reachable through DMA messages to the
    /// client. With an fd it is mapped into this process with protection
    /// `prot` (`PROT_READ`/`PROT_WRITE`) unless `file_io` is set, in which
    /// case the fd is kept for `pread`/`pwrite`. The fd is always consumed.
    ///
    /// Errors, as upstream: `ENOSPC` when `len` exceeds [`MAX_DMA_SIZE`];
    /// `EINVAL` when the range overlaps an existing region (registering an
    /// identical region again — same range, offset, file and protection — is
    /// accepted and returns the existing region), when the region limit is
    /// reached, for a zero length or a range that wraps the address space;
    /// the mmap errno when mapping fails.
    pub fn add_region(
        &self,
        iova: u64,
        len: u64,
        fd: Option<OwnedFd>,
        offset: u64,
        prot: i32,
        file_io: bool,
    ) -> Result<DmaInfo> {
        if prot & !(libc::PROT_READ | libc::PROT_WRITE) != 0 {
            return Err(Errno::EINVAL);
        }
        if len > self.max_size {
            return Err(Errno::ENOSPC);
        }
        // Upstream accepts empty regions; they can never be reached, so we
        // refuse them. Ranges ending past 2^64 are refused too.
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let end = iova.checked_add(len).ok_or(Errno::EINVAL)?;
        if file_io && fd.is_none() {
            return Err(Errno::EINVAL);
        }

        let mut inner = self.table_mut();

        // The first region ending after `iova` is the only candidate for an
        // overlap: any later one starts after it.
        let existing = inner
            .regions
            .last_starting_before(end)
            .filter(|r| r.end() > iova);
        if let Some(existing) = existing {
            if existing.iova == iova && existing.len == len {
                if existing.file_offset != offset {
                    return Err(Errno::EINVAL);
                }
                let same_file = match (&fd, existing.identity) {
                    (None, None) => true,
                    (Some(fd), Some(id)) => FileIdentity::of(fd).ok() == Some(id),
                    _ => false,
                };
                if !same_file || existing.prot != prot {
                    return Err(Errno::EINVAL);
                }
                // Identical re-registration: keep the existing region; the
                // new fd is closed when dropped.
                return Ok(existing.info());
            }
            return Err(Errno::EINVAL);
        }

        if inner.regions.len() >= self.max_regions {
            return Err(Errno::EINVAL);
        }

        let mode = match (&fd, file_io) {
            (None, _) => AccessMode::Message,
            (Some(_), true) => AccessMode::FileIo,
            (Some(_), false) => AccessMode::Mmap,
        };
        // One fstat for both the page size and the file's identity.
        let (page_size, identity) = match &fd {
            Some(fd) => {
                let st = fstat(fd)?;
                (fd_page_size(&st)?, Some(FileIdentity::from_stat(fd, &st)?))
            }
            None => (system_page_size(), None),
        };

        let dirty = if mode != AccessMode::Message && inner.dirty_page_size != 0 {
            Some(dirty_bitmap_for(len, inner.dirty_page_size)?)
        } else {
            None
        };

        let mut mapping = None;
        let mut vaddr = 0usize;
        let mut kept_fd = None;
        match (mode, fd) {
            (AccessMode::Mmap, Some(fd)) => {
                let (m, v) = map_fd(&fd, len, offset, prot, page_size)?;
                mapping = Some(m);
                vaddr = v;
                // The mapping keeps the file alive; the fd is not needed any
                // more (unlike upstream, which keeps every region's fd open
                // and needs a process-wide fd cache to keep their number down).
                drop(fd);
            }
            (AccessMode::FileIo, Some(fd)) => {
                if i64::try_from(offset).is_err() {
                    return Err(Errno::EINVAL);
                }
                kept_fd = Some(Arc::new(fd));
            }
            _ => {}
        }

        let region = Region {
            id: new_region_id(),
            iova,
            len,
            prot,
            mode,
            file_offset: offset,
            page_size,
            mapping,
            vaddr,
            fd: kept_fd,
            identity,
            dirty,
        };
        let info = region.info();
        inner.regions.insert(Box::new(region));
        self.publish_snapshot(&inner);
        // No new generation: a new region overlaps no existing one, so every
        // cached translation stays true (misses are never cached).
        Ok(info)
    }

    /// Looks up the region that starts exactly at `iova` and is exactly `len`
    /// bytes long (`ENOENT` otherwise) without removing it. The message
    /// handler uses this to run the unregister callback while the region is
    /// still usable.
    pub fn find_exact(&self, iova: u64, len: u64) -> Result<DmaInfo> {
        let inner = self.table();
        inner
            .regions
            .get(iova)
            .filter(|r| r.len == len)
            .map(|r| r.info())
            .ok_or(Errno::ENOENT)
    }

    /// The region with the lowest IOVA, if any.
    pub fn first_region(&self) -> Option<DmaInfo> {
        self.table().regions.values().next().map(|r| r.info())
    }

    /// Removes the region that starts exactly at `iova` and is exactly `len`
    /// bytes long (`ENOENT` otherwise, as upstream), unmapping it and closing
    /// its fd. The returned info describes the region as it was (its `vaddr`
    /// is no longer valid).
    pub fn remove_region(&self, iova: u64, len: u64) -> Result<DmaInfo> {
        let region = {
            let mut inner = self.table_mut();
            match inner.regions.get(iova) {
                Some(r) if r.len == len => {}
                _ => return Err(Errno::ENOENT),
            }
            let region = inner.regions.remove(iova).ok_or(Errno::ENOENT)?;
            self.publish_snapshot(&inner);
            self.bump_generation();
            region
        };
        // Unmapped here, outside the lock, once no lock-free access that
        // might still use it is in progress: nobody can reach it any more.
        rcu::synchronize();
        let info = region.info();
        drop(region);
        Ok(info)
    }

    /// Removes every region (lowest IOVA first) and returns what they were.
    pub fn remove_all(&self) -> Vec<DmaInfo> {
        let regions = {
            let mut inner = self.table_mut();
            let regions = inner.regions.take_all();
            self.publish_snapshot(&inner);
            self.bump_generation();
            regions
        };
        rcu::synchronize();
        regions.iter().map(|r| r.info()).collect()
    }

    /// Number of registered regions.
    pub fn region_count(&self) -> usize {
        self.table().regions.len()
    }

    /// Translates `[iova, iova + len)` into scatter/gather entries, one per
    /// region it crosses, filling at most `sgl.len()` of them.
    ///
    /// Returns the number of entries, `NeedMore(n)` when `sgl` holds fewer
    /// than the `n` required (the first `sgl.len()` are filled anyway),
    /// `ENOENT` when part of the range is not mapped and `EACCES` when `prot`
    /// asks for `PROT_WRITE` on a read-only region. A zero length yields 0.
    #[inline]
    pub fn addr_to_sgl(
        &self,
        iova: u64,
        len: u64,
        sgl: &mut [DmaSg],
        prot: i32,
    ) -> std::result::Result<usize, SglError> {
        if let Some(first) = sgl.first_mut() {
            if self.addr_to_sg_fast(iova, len, first, prot) {
                return Ok(1);
            }
        }
        self.addr_to_sgl_cached(iova, len, sgl, prot)
    }

    /// The fastest translation: with few regions (the lock-free copy of the
    /// table, `dma_snap.rs`), a non-empty range inside one region that
    /// allows `prot` is a search of a small sorted array, without lock or
    /// hashing. Fills `sg` and returns true; false when the full path
    /// ([`Self::addr_to_sgl`]) must answer, errors included.
    ///
    /// Never panics (the C entry points run it outside their panic guard).
    #[inline(always)]
    pub fn addr_to_sg_fast(&self, iova: u64, len: u64, sg: &mut DmaSg, prot: i32) -> bool {
        let end = iova.wrapping_add(len);
        if len == 0 || end < iova {
            return false;
        }
        // `end - start` cannot wrap: the hit contains iova, so start <= iova < end.
        let hit = self.snap.read(
            #[inline(always)]
            |v| v.containing(iova).filter(|e| end - e.start <= e.len),
        );
        match hit {
            Some(Some(e)) if prot & libc::PROT_WRITE == 0 || e.prot & libc::PROT_WRITE != 0 => {
                fill_sg_hinted(sg, e.start, e.id, iova, len, prot, e.slot);
                true
            }
            _ => false,
        }
    }

    /// The fastest `sgl_get` of one entry: with few regions, the local
    /// address of an entry that names a live mapped region, fits it and
    /// asks for no access it forbids. `None` when the full path
    /// ([`Self::sgl_get`]) must answer (it also gives the errno of a stale
    /// or made-up entry).
    ///
    /// Never panics (the C entry points run it outside their panic guard).
    #[inline(always)]
    pub fn sg_addr_fast(&self, sg: &DmaSg) -> Option<*mut c_void> {
        if sg.region == 0 {
            return None;
        }
        #[inline(always)]
        fn local(v: &dma_snap::View<'_>, sg: &DmaSg) -> Option<usize> {
            let e = v.named(sg.dma_addr as usize as u64, sg.region, sg.hint)?;
            if e.vaddr == 0 || check_range(e.len, e.prot, sg).is_err() {
                return None;
            }
            // In bounds: offset + length <= the region's length, and the
            // mapping covers the whole region.
            Some(e.vaddr.wrapping_add(sg.offset as usize))
        }
        let addr = self.snap.read(
            #[inline(always)]
            |v| local(v, sg),
        )??;
        Some(addr as *mut c_void)
    }

    /// Whether dirty pages are being logged (so `sgl_put` has work to do).
    #[inline(always)]
    pub fn logging(&self) -> bool {
        self.logging_page_size.load(Ordering::Acquire) != 0
    }

    /// [`Self::addr_to_sgl`] past the lock-free copy: the thread's
    /// translation cache, then the table under its read lock. Kept out of
    /// line so that the fast path saves no registers.
    #[inline(never)]
    fn addr_to_sgl_cached(
        &self,
        iova: u64,
        len: u64,
        sgl: &mut [DmaSg],
        prot: i32,
    ) -> std::result::Result<usize, SglError> {
        // Fast path: this thread's translation cache knows the region and no
        // region has been removed since.
        if len > 0 {
            if let Some(first) = sgl.first_mut() {
                let generation = self.generation.load(Ordering::Acquire);
                let hint = tlb_find(iova, |h| {
                    h.generation != 0
                        && h.generation == generation
                        && iova >= h.start
                        && iova
                            .checked_add(len)
                            .is_some_and(|end| end <= h.start + h.len)
                });
                if let Some(hint) = hint {
                    if prot & libc::PROT_WRITE != 0 && hint.prot & libc::PROT_WRITE == 0 {
                        return Err(SglError::Errno(Errno::EACCES));
                    }
                    fill_sg(first, hint.start, hint.id, iova, len, prot);
                    return Ok(1);
                }
            }
        }

        let inner = self.table();
        let generation = self.generation.load(Ordering::Acquire);
        // One tree walk when the range lies in one region (the usual case):
        // `translate` and the hint below would each walk the tree again.
        if len > 0 {
            if let Some(r) = inner.regions.containing(iova) {
                if iova.checked_add(len).is_some_and(|e| e <= r.end()) {
                    if prot & libc::PROT_WRITE != 0 && r.prot & libc::PROT_WRITE == 0 {
                        return Err(SglError::Errno(Errno::EACCES));
                    }
                    let Some(first) = sgl.first_mut() else {
                        return Err(SglError::NeedMore(1));
                    };
                    fill_sg(first, r.iova, r.id, iova, len, prot);
                    tlb_set(iova, Hint::of(r, generation));
                    return Ok(1);
                }
            }
        }
        let count = translate(&inner.regions, iova, len, sgl, prot)?;
        if count > 0 {
            if let Some(r) = inner.regions.containing(iova) {
                tlb_set(iova, Hint::of(r, generation));
            }
        }
        if count > sgl.len() {
            return Err(SglError::NeedMore(count));
        }
        Ok(count)
    }

    /// Gives the local address of each entry's memory: `iov[i]` receives
    /// `sgl[i]`. `EINVAL` for an entry that does not name a live region (or
    /// when `iov` is shorter than `sgl`), `EFAULT` for a region that is not
    /// mapped into this process.
    ///
    /// The addresses stay valid until the region is unregistered; the device
    /// must drop them in its unregister callback.
    #[inline]
    pub fn sgl_get(&self, sgl: &[DmaSg], iov: &mut [libc::iovec]) -> Result<()> {
        if iov.len() < sgl.len() {
            return Err(Errno::EINVAL);
        }
        // Few regions: each entry checked against the lock-free copy of the
        // table. Entries it does not know (stale, made up, of an unmapped
        // region, or refused) go the long way, for their errno.
        let mut known = 0;
        for (sg, out) in sgl.iter().zip(iov.iter_mut()) {
            let Some(addr) = self.sg_addr_fast(sg) else {
                break;
            };
            out.iov_base = addr;
            out.iov_len = sg.length as usize;
            known += 1;
        }
        if known == sgl.len() {
            return Ok(());
        }
        self.sgl_get_cached(&sgl[known..], &mut iov[known..])
    }

    /// [`Self::sgl_get`] past the lock-free copy (out of line, as
    /// [`Self::addr_to_sgl_cached`]). `iov` is at least as long as `sgl`.
    #[inline(never)]
    fn sgl_get_cached(&self, sgl: &[DmaSg], iov: &mut [libc::iovec]) -> Result<()> {
        // Entries this thread's cache knows are answered without the lock:
        // that only computes addresses, touching neither the table nor a
        // region. The lock is taken from the first entry it does not know.
        let mut known = 0;
        for (sg, out) in sgl.iter().zip(iov.iter_mut()) {
            let Some(m) = self.cached_mapping(sg) else {
                break;
            };
            out.iov_base = m?.0 as *mut c_void;
            out.iov_len = sg.length as usize;
            known += 1;
        }
        if known == sgl.len() {
            return Ok(());
        }
        let inner = self.table();
        for (sg, out) in sgl[known..].iter().zip(iov[known..].iter_mut()) {
            let region = self.resolve_cached(&inner, sg)?;
            if region.mode != AccessMode::Mmap {
                return Err(Errno::EFAULT);
            }
            // In bounds: `resolve` checked offset + length <= region length,
            // and the mapping covers the whole region.
            out.iov_base = (region.vaddr + sg.offset as usize) as *mut c_void;
            out.iov_len = sg.length as usize;
        }
        Ok(())
    }

    /// Releases entries obtained with [`Self::sgl_get`]: marks the writeable
    /// ones dirty while logging. Invalid entries are ignored.
    #[inline]
    pub fn sgl_put(&self, sgl: &[DmaSg]) {
        self.sgl_mark_dirty(sgl);
    }

    /// Marks the writeable entries of `sgl` dirty while logging (no-op
    /// otherwise: one load). Invalid entries are ignored.
    #[inline]
    pub fn sgl_mark_dirty(&self, sgl: &[DmaSg]) {
        if self.logging_page_size.load(Ordering::Acquire) != 0 {
            self.sgl_mark_dirty_logging(sgl);
        }
    }

    /// [`Self::sgl_mark_dirty`] while logging (out of line).
    #[inline(never)]
    fn sgl_mark_dirty_logging(&self, sgl: &[DmaSg]) {
        let inner = self.table();
        let page_size = inner.dirty_page_size;
        if page_size == 0 {
            return;
        }
        for sg in sgl.iter().filter(|sg| sg.writeable) {
            if let Ok(region) = self.resolve_cached(&inner, sg) {
                region.mark_dirty(sg.offset, sg.length, page_size);
            }
        }
    }

    /// Marks the pages of `[iova, iova + len)` dirty in every logged region
    /// the range touches (for writes the server performs by other means).
    pub fn mark_dirty_range(&self, iova: u64, len: u64) {
        if len == 0 || self.logging_page_size.load(Ordering::Acquire) == 0 {
            return;
        }
        let inner = self.table();
        let page_size = inner.dirty_page_size;
        if page_size == 0 {
            return;
        }
        let end = iova.saturating_add(len);
        let first_key = inner.regions.containing(iova).map_or(iova, |r| r.iova);
        for region in inner.regions.range(first_key..end) {
            let lo = iova.max(region.iova);
            let hi = end.min(region.end());
            if lo < hi {
                region.mark_dirty(lo - region.iova, hi - lo, page_size);
            }
        }
    }

    /// Whether the entry's region is mapped into this process (so that
    /// [`Self::sgl_get`] works on it). False for invalid entries.
    pub fn sg_is_mappable(&self, sg: &DmaSg) -> bool {
        let inner = self.table();
        self.resolve_cached(&inner, sg)
            .is_ok_and(|r| r.mode == AccessMode::Mmap)
    }

    /// Reads or writes the memory of one entry on behalf of `vfu_sgl_read` /
    /// `vfu_sgl_write`; `buf` must hold at least `sg.length` bytes (only that
    /// many are transferred).
    ///
    /// As upstream, the server touches the memory itself only when `direct`
    /// (`VFU_SGL_DIRECT_ACCESS`) is given: with a memcpy for mapped regions,
    /// with `pread`/`pwrite` for FILE_IO regions. `Ok(true)` means done;
    /// `Ok(false)` means the caller must instead send VFIO_USER_DMA_READ/WRITE
    /// messages to the client. Errors: `EPERM` writing through an entry not
    /// translated for writing, `EINVAL` for an invalid entry or short buffer,
    /// `EACCES` for an access the region's protection forbids, `EIO` when
    /// file I/O fails. Direct writes mark the pages dirty while logging.
    pub fn sg_access(
        &self,
        sg: &DmaSg,
        buf: &mut [u8],
        is_write: bool,
        direct: bool,
    ) -> Result<bool> {
        if is_write {
            self.sg_write(sg, buf, direct)
        } else {
            self.sg_read(sg, buf, direct)
        }
    }

    /// The read half of [`Self::sg_access`].
    pub fn sg_read(&self, sg: &DmaSg, buf: &mut [u8], direct: bool) -> Result<bool> {
        let n = self.check_buf(sg, buf.len())?;
        if direct {
            let dst = buf.as_mut_ptr();
            let done = self.with_cached_mapping(sg, libc::PROT_READ, |src| {
                // SAFETY: `with_cached_mapping` runs this inside a read-side
                // section, with the region mapped readable at `src` for the
                // entry's `n` bytes and no unmapping possible until the
                // section ends; `buf` has at least `n` bytes. `copy`
                // tolerates a buffer that itself lies in guest memory.
                unsafe { std::ptr::copy(src, dst, n) }
            });
            if let Some(done) = done {
                return done.map(|()| true);
            }
        }
        let inner = self.table();
        let region = self.resolve_cached(&inner, sg)?;
        if !direct {
            return Ok(false);
        }
        match region.mode {
            AccessMode::Message => Ok(false),
            AccessMode::Mmap => {
                if region.prot & libc::PROT_READ == 0 {
                    return Err(Errno::EACCES);
                }
                let src = (region.vaddr + sg.offset as usize) as *const u8;
                // SAFETY: `resolve` checked that the range lies in the region,
                // which is mapped readable for as long as we hold the read
                // lock; `buf` has at least `n` bytes. `copy` tolerates a
                // buffer that itself lies in guest memory.
                unsafe { std::ptr::copy(src, buf.as_mut_ptr(), n) };
                Ok(true)
            }
            AccessMode::FileIo => {
                let fd = region.fd.clone().ok_or(Errno::EIO)?;
                let pos = file_pos(region, sg)?;
                drop(inner);
                file_io(&fd, pos, buf.as_mut_ptr(), n, false)?;
                Ok(true)
            }
        }
    }

    /// The write half of [`Self::sg_access`].
    pub fn sg_write(&self, sg: &DmaSg, buf: &[u8], direct: bool) -> Result<bool> {
        if !sg.writeable {
            return Err(Errno::EPERM);
        }
        let n = self.check_buf(sg, buf.len())?;
        if direct {
            let src = buf.as_ptr();
            let done = self.with_cached_mapping(sg, libc::PROT_WRITE, |dst| {
                // SAFETY: as in `sg_read`, with the region mapped writable
                // (and not logging, so there is nothing to mark dirty).
                unsafe { std::ptr::copy(src, dst, n) }
            });
            if let Some(done) = done {
                return done.map(|()| true);
            }
        }
        let inner = self.table();
        let region = self.resolve_cached(&inner, sg)?;
        if !direct {
            return Ok(false);
        }
        if region.mode != AccessMode::Message && region.prot & libc::PROT_WRITE == 0 {
            return Err(Errno::EACCES);
        }
        match region.mode {
            AccessMode::Message => Ok(false),
            AccessMode::Mmap => {
                let dst = (region.vaddr + sg.offset as usize) as *mut u8;
                // SAFETY: `resolve` checked that the range lies in the region,
                // which is mapped writable (checked above) for as long as we
                // hold the read lock; `buf` has at least `n` bytes.
                unsafe { std::ptr::copy(buf.as_ptr(), dst, n) };
                // Marked after the copy: a report taken in between must not
                // clear the bit of a write that has not landed yet.
                region.mark_dirty(sg.offset, sg.length, inner.dirty_page_size);
                Ok(true)
            }
            AccessMode::FileIo => {
                let fd = region.fd.clone().ok_or(Errno::EIO)?;
                let pos = file_pos(region, sg)?;
                drop(inner);
                // pwrite only reads from the buffer.
                file_io(&fd, pos, buf.as_ptr() as *mut u8, n, true)?;
                // After the write, for the same reason as above.
                self.mark_dirty_range(sg.iova(), sg.length);
                Ok(true)
            }
        }
    }

    /// This thread's cached translation of `sg`'s region, when current. Call
    /// with the table's read lock held.
    fn cached(&self, sg: &DmaSg) -> Option<Hint> {
        TLB.try_with(|t| self.cached_in(t, sg)).ok().flatten()
    }

    /// [`Self::cached`] in the cache `t` (this thread's).
    #[inline]
    fn cached_in(&self, t: &ThreadCache, sg: &DmaSg) -> Option<Hint> {
        if sg.region == 0 {
            return None;
        }
        let generation = self.generation.load(Ordering::Acquire);
        t.find(sg.iova(), |h| names_region(h, sg, generation))
    }

    /// For an entry of a mapped region this thread's cache knows: the local
    /// address of its first byte, the region's protection and the table
    /// generation the answer holds for, after the checks of [`check_sg`].
    /// `None` when the cache cannot tell. The address stays valid until the
    /// region is removed.
    fn cached_mapping(&self, sg: &DmaSg) -> Option<Result<(usize, i32, u64)>> {
        TLB.try_with(|t| self.cached_mapping_in(t, sg))
            .ok()
            .flatten()
    }

    /// [`Self::cached_mapping`] in the cache `t` (this thread's).
    #[inline]
    fn cached_mapping_in(&self, t: &ThreadCache, sg: &DmaSg) -> Option<Result<(usize, i32, u64)>> {
        let h = self.cached_in(t, sg).filter(|h| h.vaddr != 0)?;
        Some(
            check_range(h.len, h.prot, sg)
                .map(|()| (h.vaddr + sg.offset as usize, h.prot, h.generation)),
        )
    }

    /// The lock-free path of direct access: when this thread's translation
    /// cache knows `sg`'s region, current and mapped, runs `copy` with the
    /// local address of the entry's first byte inside a read-side section
    /// (so the memory cannot be unmapped under it) and returns `Some(Ok)`.
    /// `Some(Err)` for an entry the region refuses (range, or `need`, the
    /// protection the access needs); `None` when the cache cannot tell, or
    /// for a write while dirty pages are logged: then the caller takes the
    /// locked path.
    #[inline]
    fn with_cached_mapping(
        &self,
        sg: &DmaSg,
        need: i32,
        copy: impl FnOnce(*mut u8),
    ) -> Option<Result<()>> {
        // Few regions: the lock-free copy of the table knows the entry's
        // region (translations through it fill no thread cache).
        let known = self.snap.read_at(
            #[inline(always)]
            |v| {
                let e = v.named(sg.dma_addr as usize as u64, sg.region, sg.hint)?;
                // Not mapped: the locked path knows what to do instead.
                if sg.region == 0 || e.vaddr == 0 {
                    return None;
                }
                Some(
                    check_range(e.len, e.prot, sg)
                        .map(|()| (e.vaddr.wrapping_add(sg.offset as usize), e.prot)),
                )
            },
        );
        if let Some((Some(found), seq)) = known {
            let (addr, prot) = match found {
                Ok(m) => m,
                Err(e) => return Some(Err(e)),
            };
            if prot & need == 0 {
                return Some(Err(Errno::EACCES));
            }
            return TLB
                .try_with(|t| {
                    let _section = t.reader.enter();
                    // As below: a removal (or logging start) published
                    // before now is seen here, or waits for this section.
                    if !self.snap.unchanged(seq)
                        || (need & libc::PROT_WRITE != 0
                            && self.logging_page_size.load(Ordering::Relaxed) != 0)
                    {
                        return None;
                    }
                    copy(addr as *mut u8);
                    Some(Ok(()))
                })
                .ok()
                .flatten();
        }
        TLB.try_with(|t| {
            let (addr, prot, generation) = match self.cached_mapping_in(t, sg)? {
                Ok(m) => m,
                Err(e) => return Some(Err(e)),
            };
            if prot & need == 0 {
                return Some(Err(Errno::EACCES));
            }
            let _section = t.reader.enter();
            // Checked again inside the section: a removal (or logging start)
            // published before now is seen here, or waits for this section
            // to end before it unmaps anything (`rcu::synchronize`).
            if self.generation.load(Ordering::Relaxed) != generation
                || (need & libc::PROT_WRITE != 0
                    && self.logging_page_size.load(Ordering::Relaxed) != 0)
            {
                return None;
            }
            copy(addr as *mut u8);
            Some(Ok(()))
        })
        .ok()
        .flatten()
    }

    /// [`resolve`], answered from this thread's translation cache when it
    /// holds the entry's region (the usual case: the entry was just made by
    /// this thread's `addr_to_sgl`). `inner` is the table under its read lock.
    fn resolve_cached<'a>(&self, inner: &'a Inner, sg: &DmaSg) -> Result<&'a Region> {
        if let Some(h) = self.cached(sg) {
            // SAFETY: the entry was made from a region of this controller's
            // table while its generation was `h.generation` (generations are
            // unique per controller and change), and the generation is still
            // current. Every removal changes it under the write lock, and we
            // hold the read lock (`inner`), so the region is still in the
            // table and stays there for the lifetime of `inner`.
            let region = unsafe { &*h.region };
            return check_sg(region, sg);
        }
        resolve(&inner.regions, sg)
    }

    fn check_buf(&self, sg: &DmaSg, buf_len: usize) -> Result<usize> {
        let n = usize::try_from(sg.length).map_err(|_| Errno::EINVAL)?;
        if buf_len < n {
            return Err(Errno::EINVAL);
        }
        Ok(n)
    }

    /// Starts dirty page logging at `page_size` granularity. `EINVAL` for a
    /// zero page size or one that is not a power of two, or when logging is
    /// already on at a different page size (same page size: no-op). As
    /// upstream, `ranges` is accepted but every region is logged. `ENOMEM`
    /// when a bitmap cannot be allocated (nothing is logged then).
    pub fn logging_start(&self, page_size: u64, ranges: &[(u64, u64)]) -> Result<()> {
        let _ = ranges;
        // Upstream only refuses 0; a non-power-of-two size cannot be related
        // to the report page sizes (which must be powers of two), so we refuse
        // it here rather than produce meaningless reports later.
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(Errno::EINVAL);
        }
        let mut inner = self.table_mut();
        if inner.dirty_page_size != 0 {
            return if inner.dirty_page_size == page_size {
                Ok(())
            } else {
                Err(Errno::EINVAL)
            };
        }
        let mut bitmaps = Vec::new();
        for region in inner.regions.values() {
            if region.mode != AccessMode::Message {
                bitmaps.push((region.iova, dirty_bitmap_for(region.len, page_size)?));
            }
        }
        for (iova, bitmap) in bitmaps {
            if let Some(r) = inner.regions.get_mut(iova) {
                r.dirty = Some(bitmap);
            }
        }
        inner.dirty_page_size = page_size;
        self.logging_page_size.store(page_size, Ordering::Release);
        drop(inner);
        // Lock-free writes that began before logging are over when this
        // returns; later ones see it on and take the path that marks pages.
        rcu::synchronize();
        Ok(())
    }

    /// Stops dirty page logging and drops the bitmaps (no-op when off).
    pub fn logging_stop(&self) -> Result<()> {
        let mut inner = self.table_mut();
        if inner.dirty_page_size == 0 {
            return Ok(());
        }
        for region in inner.regions.values_mut() {
            region.dirty = None;
        }
        inner.dirty_page_size = 0;
        self.logging_page_size.store(0, Ordering::Release);
        Ok(())
    }

    /// Whether dirty page logging is on.
    pub fn logging_active(&self) -> bool {
        self.logging_page_size.load(Ordering::Acquire) != 0
    }

    /// The logging page size, when logging.
    pub fn logging_page_size(&self) -> Option<u64> {
        match self.logging_page_size.load(Ordering::Acquire) {
            0 => None,
            n => Some(n),
        }
    }

    /// Fills `bitmap` with the dirty state of the pages starting at `iova`
    /// (bit `i` of byte `j` is page `8 * j + i`, pages of `page_size` bytes)
    /// and clears what it reported.
    ///
    /// Follows upstream's rules and errnos: `[iova, iova + len)` must be
    /// mapped (`ENOENT`), must start at the start of a region and stay inside
    /// it (`ENOTSUP`); logging must be on, `page_size` a power of two, `len`
    /// at least one page of both sizes and `bitmap` exactly
    /// [`bitmap_size`]`(len, page_size)` bytes (`EINVAL`); the region must be
    /// backed by an fd (`EINVAL`). Since the bitmap is rounded up to 64-bit
    /// words, it may report (and clear) pages past `len` that are still in
    /// the region, exactly like upstream. A report page size different from
    /// the logging one is served by OR-ing (larger) or replicating (smaller)
    /// bits.
    pub fn logging_report(
        &self,
        iova: u64,
        len: u64,
        page_size: u64,
        bitmap: &mut [u8],
    ) -> Result<()> {
        let inner = self.table();
        let mut sg = [DmaSg::default()];
        match translate(&inner.regions, iova, len, &mut sg, 0) {
            Ok(1) => {}
            Ok(_) => return Err(Errno::EINVAL),
            Err(SglError::NeedMore(_)) => return Err(Errno::ENOTSUP),
            Err(SglError::Errno(e)) => return Err(e),
        }
        if sg[0].offset != 0 {
            return Err(Errno::ENOTSUP);
        }
        let server_page = inner.dirty_page_size;
        if server_page == 0 {
            return Err(Errno::EINVAL);
        }
        if page_size == 0 || !page_size.is_power_of_two() {
            return Err(Errno::EINVAL);
        }
        bitmap_size(len, server_page)?;
        if bitmap.len() != bitmap_size(len, page_size)? {
            return Err(Errno::EINVAL);
        }
        let region = inner.regions.get(iova).ok_or(Errno::ENOENT)?;
        let words = match (&region.dirty, region.mode) {
            (Some(words), m) if m != AccessMode::Message => words,
            _ => return Err(Errno::EINVAL),
        };
        harvest(words, bitmap, server_page, page_size);
        Ok(())
    }
}

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

// ---- safe access to guest memory ------------------------------------------

impl DmaController {
    /// Runs `f` with the guest memory at `[iova, iova + len)`, which must be
    /// mapped into this process (the client passed an fd with `DMA_MAP`) and
    /// allow `prot` (`PROT_READ`, `PROT_WRITE` or both). The range may span
    /// several adjacent regions.
    ///
    /// The controller's read lock is held while `f` runs, and unmapping a
    /// region needs the write lock, so the memory cannot go away under the
    /// [`GuestSlice`]; the slice cannot outlive the call. Keep `f` short:
    /// the client's `DMA_UNMAP` waits for it. Inside `f`, use only the
    /// slice: calling [`Context::run`](super::Context::run), or this
    /// controller again (another `with_guest`, `read`, `addr_to_sgl`...),
    /// could deadlock, since the lock is not re-entrant and an unmap may be
    /// waiting for it.
    ///
    /// Errors: `EINVAL` for unknown `prot` bits or a range that wraps the
    /// address space, `ENOENT` when part of the range is not mapped,
    /// `EACCES` when a region does not allow `prot`, `EFAULT` when a region
    /// is not mapped into this process (the client gave no fd, or asked for
    /// file I/O): use [`Self::read`] / [`Self::write`], or
    /// [`Context::dma_read`](super::Context::dma_read) /
    /// [`Context::dma_write`](super::Context::dma_write) for those.
    ///
    /// ```
    /// use vfio_user::device::dma::{DmaController, PROT_RW};
    ///
    /// let dma = DmaController::new(4);
    /// // Nothing is mapped yet.
    /// let r = dma.with_guest(0x1000, 8, PROT_RW, |mem| mem.len());
    /// assert_eq!(r, Err(vfio_user::Errno::ENOENT));
    /// ```
    pub fn with_guest<R>(
        &self,
        iova: u64,
        len: usize,
        prot: i32,
        f: impl FnOnce(GuestSlice<'_>) -> R,
    ) -> Result<R> {
        if prot & !PROT_RW != 0 {
            return Err(Errno::EINVAL);
        }
        let len64 = u64::try_from(len).map_err(|_| Errno::EINVAL)?;
        let end = iova.checked_add(len64).ok_or(Errno::EINVAL)?;
        let inner = self.table();
        let mut addr = iova;
        while addr < end {
            let region = inner.regions.containing(addr).ok_or(Errno::ENOENT)?;
            if region.prot & prot != prot {
                return Err(Errno::EACCES);
            }
            if region.mode != AccessMode::Mmap {
                return Err(Errno::EFAULT);
            }
            addr = region.end().min(end);
        }
        Ok(f(GuestSlice {
            regions: &inner.regions,
            iova,
            len,
            prot,
            dirty_page_size: inner.dirty_page_size,
        }))
    }

    /// Copies guest memory at `iova` into `buf`, from regions mapped into
    /// this process or backed by a file (`pread`). The range may span
    /// several adjacent regions.
    ///
    /// Errors: `ENOENT` when part of the range is not mapped, `EACCES` when
    /// a region is not readable, `EFAULT` when a region can only be reached
    /// through messages to the client (use
    /// [`Context::dma_read`](super::Context::dma_read) for those), `EIO` when
    /// file I/O fails. On error, `buf` may be partly filled.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<()> {
        self.for_each_sg(iova, buf.len(), PROT_READ, |sg, range| {
            let part = buf.get_mut(range).ok_or(Errno::EFAULT)?;
            match self.sg_read(sg, part, true)? {
                true => Ok(()),
                false => Err(Errno::EFAULT),
            }
        })
    }

    /// Copies `buf` into guest memory at `iova`, like [`Self::read`] in the
    /// other direction; `EACCES` when a region is read-only. Written pages
    /// are marked dirty while the client logs dirty pages. On error, a
    /// prefix of `buf` may have been written.
    pub fn write(&self, iova: u64, buf: &[u8]) -> Result<()> {
        self.for_each_sg(iova, buf.len(), PROT_WRITE, |sg, range| {
            let part = buf.get(range).ok_or(Errno::EFAULT)?;
            match self.sg_write(sg, part, true)? {
                true => Ok(()),
                false => Err(Errno::EFAULT),
            }
        })
    }

    /// Translates `[iova, iova + len)` one region at a time and calls `f`
    /// with each entry and the part of the caller's buffer it covers.
    pub(crate) fn for_each_sg(
        &self,
        iova: u64,
        len: usize,
        prot: i32,
        mut f: impl FnMut(&DmaSg, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < len {
            let addr = iova.checked_add(done as u64).ok_or(Errno::ENOENT)?;
            let mut sgl = [DmaSg::default()];
            match self.addr_to_sgl(addr, (len - done) as u64, &mut sgl, prot) {
                Ok(_) | Err(SglError::NeedMore(_)) => {}
                Err(SglError::Errno(e)) => return Err(e),
            }
            let [sg] = sgl;
            let n = usize::try_from(sg.length).map_err(|_| Errno::EINVAL)?;
            if n == 0 || n > len - done {
                return Err(Errno::EFAULT);
            }
            f(&sg, done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

/// Guest memory lent to the closure of [`DmaController::with_guest`].
///
/// Offsets are relative to the start of the range. Every access is
/// bounds-checked and copies with [`std::ptr::copy`]: the memory is shared
/// with the client (and the guest behind it), which may change it at any
/// time, so no Rust reference to it is ever handed out. Bytes that the guest
/// writes concurrently may read back torn, as with any memory shared with a
/// guest.
pub struct GuestSlice<'a> {
    regions: &'a RegionTable<Region>,
    iova: u64,
    len: usize,
    prot: i32,
    dirty_page_size: u64,
}

impl fmt::Debug for GuestSlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestSlice")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.len)
            .field("prot", &self.prot)
            .finish()
    }
}

impl GuestSlice<'_> {
    /// Length of the range in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest address (IOVA) of the first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Whether [`Self::write_at`] is allowed (the range was borrowed with
    /// `PROT_WRITE`).
    pub fn is_writable(&self) -> bool {
        self.prot & PROT_WRITE != 0
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`. `EFAULT` when they
    /// are not all inside the range, `EPERM` when the range was borrowed
    /// without `PROT_READ`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        if self.prot & PROT_READ == 0 {
            return Err(Errno::EPERM);
        }
        let dst = buf.as_mut_ptr();
        self.each_piece(offset, buf.len(), |src, done, n, _, _| {
            // SAFETY: `each_piece` hands out `n` bytes at `src` inside a
            // region that is mapped readable (checked by `with_guest`) and
            // stays mapped while the table's read lock, which `'a` borrows,
            // is held; `done + n <= buf.len()`. `copy` tolerates overlap
            // (`buf` could itself be guest memory).
            unsafe { std::ptr::copy(src as *const u8, dst.add(done), n) };
        })
    }

    /// Copies `buf` into the range at `offset` and marks the pages dirty
    /// while the client logs dirty pages. `EFAULT` when the bytes are not
    /// all inside the range, `EPERM` when the range was borrowed without
    /// `PROT_WRITE`.
    pub fn write_at(&self, offset: usize, buf: &[u8]) -> Result<()> {
        if self.prot & PROT_WRITE == 0 {
            return Err(Errno::EPERM);
        }
        let src = buf.as_ptr();
        let page_size = self.dirty_page_size;
        self.each_piece(offset, buf.len(), |dst, done, n, region, region_off| {
            // SAFETY: as in `read_at`, with the region mapped writable.
            unsafe { std::ptr::copy(src.add(done), dst, n) };
            // After the copy, so that a concurrent report cannot clear the
            // bit of a write that has not landed yet.
            region.mark_dirty(region_off, n as u64, page_size);
        })
    }

    /// Copies the whole range into a new vector (`EPERM` without
    /// `PROT_READ`).
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.len];
        self.read_at(0, &mut v)?;
        Ok(v)
    }

    /// Calls `f(address, done, n, region, offset in region)` for each piece
    /// of `[offset, offset + len)` that lies in one region.
    fn each_piece(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(*mut u8, usize, usize, &Region, u64),
    ) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => return Err(Errno::EFAULT),
        }
        let mut done = 0usize;
        while done < len {
            // Cannot overflow: `with_guest` checked `iova + self.len`.
            let addr = self.iova + (offset + done) as u64;
            let region = self.regions.containing(addr).ok_or(Errno::EFAULT)?;
            let in_region = addr - region.iova;
            let n = usize::try_from(region.end() - addr)
                .unwrap_or(usize::MAX)
                .min(len - done);
            // The region was validated as mapped when the slice was made, and
            // the table cannot change while the slice lives.
            if region.mode != AccessMode::Mmap || region.vaddr == 0 {
                return Err(Errno::EFAULT);
            }
            let ptr = (region.vaddr + in_region as usize) as *mut u8;
            f(ptr, done, n, region, in_region);
            done += n;
        }
        Ok(())
    }
}

/// Walks the regions covering `[iova, iova + len)`, filling `sgl` as far as
/// it goes, and returns the number of entries the whole range needs.
fn translate(
    regions: &RegionTable<Region>,
    iova: u64,
    len: u64,
    sgl: &mut [DmaSg],
    prot: i32,
) -> std::result::Result<usize, SglError> {
    if len == 0 {
        return Ok(0);
    }
    let first = regions.containing(iova).ok_or(Errno::ENOENT)?;
    let mut addr = iova;
    let mut remaining = len;
    let mut count = 0usize;
    for region in regions.range(first.iova..) {
        if count > 0 && region.iova != addr {
            // A hole after the previous region.
            return Err(SglError::Errno(Errno::ENOENT));
        }
        if prot & libc::PROT_WRITE != 0 && region.prot & libc::PROT_WRITE == 0 {
            return Err(SglError::Errno(Errno::EACCES));
        }
        let chunk = remaining.min(region.end() - addr);
        if let Some(sg) = sgl.get_mut(count) {
            fill_sg(sg, region.iova, region.id, addr, chunk, prot);
        }
        count += 1;
        remaining -= chunk;
        if remaining == 0 {
            return Ok(count);
        }
        addr = region.end();
    }
    Err(SglError::Errno(Errno::ENOENT))
}

/// Position in the region's file of an entry's first byte.
fn file_pos(region: &Region, sg: &DmaSg) -> Result<i64> {
    region
        .file_offset
        .checked_add(sg.offset)
        .and_then(|p| i64::try_from(p).ok())
        .ok_or(Errno::EINVAL)
}

/// Transfers exactly `n` bytes between `buf` and the file at `pos`, retrying
/// short transfers; any failure or end of file is `EIO`, as upstream.
fn file_io(fd: &OwnedFd, pos: i64, buf: *mut u8, n: usize, write: bool) -> Result<()> {
    let mut done = 0usize;
    while done < n {
        let off = pos.checked_add(done as i64).ok_or(Errno::EIO)?;
        // SAFETY: `buf` points to at least `n` bytes owned by the caller (for
        // writes they are only read); the fd is open while we hold the Arc.
        let r = unsafe {
            let p = buf.add(done) as *mut c_void;
            if write {
                libc::pwrite(fd.as_raw_fd(), p, n - done, off)
            } else {
                libc::pread(fd.as_raw_fd(), p, n - done, off)
            }
        };
        if r < 0 {
            if Errno::last() == Errno(libc::EINTR) {
                continue;
            }
            return Err(Errno::EIO);
        }
        if r == 0 {
            return Err(Errno::EIO);
        }
        done += r as usize;
    }
    Ok(())
}

/// Takes (and clears) a server bitmap word; words past the end read as 0.
fn take_word(words: &[AtomicU64], i: usize) -> u64 {
    match words.get(i) {
        // Skipping the swap for clean words is racy but harmless: a bit set
        // just after the load is reported next time.
        Some(w) if w.load(Ordering::Relaxed) != 0 => w.swap(0, Ordering::Acquire),
        _ => 0,
    }
}

/// Gathers bits 0, 2, 4, ... of `x` into bits 0..32.
fn compress_even(mut x: u64) -> u64 {
    x &= 0x5555_5555_5555_5555;
    x = (x | (x >> 1)) & 0x3333_3333_3333_3333;
    x = (x | (x >> 2)) & 0x0f0f_0f0f_0f0f_0f0f;
    x = (x | (x >> 4)) & 0x00ff_00ff_00ff_00ff;
    x = (x | (x >> 8)) & 0x0000_ffff_0000_ffff;
    (x | (x >> 16)) & 0x0000_0000_ffff_ffff
}

/// Spreads bits 0..32 of `x` to bits 0, 2, 4, ....
fn spread_even(mut x: u64) -> u64 {
    x &= 0x0000_0000_ffff_ffff;
    x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
    x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
    x = (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    x = (x | (x << 2)) & 0x3333_3333_3333_3333;
    (x | (x << 1)) & 0x5555_5555_5555_5555
}

/// ORs each group of `2^k` adjacent bits into one bit (`64 >> k` results).
fn squeeze(mut x: u64, k: u32) -> u64 {
    for _ in 0..k {
        x = compress_even(x | (x >> 1));
    }
    x
}

/// Repeats each of the low `64 >> k` bits `2^k` times.
fn stretch(mut x: u64, k: u32) -> u64 {
    for _ in 0..k {
        let s = spread_even(x);
        x = s | (s << 1);
    }
    x
}

/// Produces the report bitmap `out` (a multiple of 8 bytes) from the
/// server bitmap `words` (logging page `server`, report page `client`, both
/// powers of two), clearing the server bits it consumes.
fn harvest(words: &[AtomicU64], out: &mut [u8], server: u64, client: u64) {
    let out_words = out.len() / 8;
    let mut put = |j: usize, v: u64| {
        if let Some(chunk) = out.get_mut(j * 8..j * 8 + 8) {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    };
    if client == server {
        for j in 0..out_words {
            put(j, take_word(words, j));
        }
    } else if client > server {
        // Each report bit covers `f` logged pages.
        let f = client / server;
        if f <= 64 {
            let k = f.trailing_zeros();
            let per = 64 / f as u32;
            let f = f as usize;
            for j in 0..out_words {
                let mut v = 0u64;
                for s in 0..f {
                    let w = take_word(words, j * f + s);
                    if w != 0 {
                        v |= squeeze(w, k) << (s as u32 * per);
                    }
                }
                put(j, v);
            }
        } else {
            let g = (f / 64) as usize;
            for j in 0..out_words {
                let mut v = 0u64;
                for b in 0..64usize {
                    let first = (j * 64 + b).saturating_mul(g);
                    if first >= words.len() {
                        break;
                    }
                    let mut any = 0u64;
                    for i in first..first.saturating_add(g).min(words.len()) {
                        any |= take_word(words, i);
                    }
                    if any != 0 {
                        v |= 1 << b;
                    }
                }
                put(j, v);
            }
        }
    } else {
        // Each logged page covers `f` report bits.
        let f = server / client;
        if f <= 64 {
            let k = f.trailing_zeros();
            let per = 64 / f as u32;
            let mask = (1u64 << per) - 1;
            let f = f as usize;
            let mut i = 0usize;
            while i * f < out_words {
                let w = take_word(words, i);
                for c in 0..f {
                    let j = i * f + c;
                    if j >= out_words {
                        break;
                    }
                    let chunk = (w >> (c as u32 * per)) & mask;
                    put(j, if chunk == 0 { 0 } else { stretch(chunk, k) });
                }
                i += 1;
            }
        } else {
            let g = (f / 64) as usize;
            let mut i = 0usize;
            while (i * 64).saturating_mul(g) < out_words {
                let w = take_word(words, i);
                for b in 0..64usize {
                    let v = if w >> b & 1 != 0 { u64::MAX } else { 0 };
                    for t in 0..g {
                        let j = (i * 64 + b) * g + t;
                        if j >= out_words {
                            break;
                        }
                        put(j, v);
                    }
                }
                i += 1;
            }
        }
    }
}

/// Maps `len` bytes of `fd` at `offset` shared with protection `prot`.
/// Returns the mapping and the local address of byte `offset`.
fn map_fd(
    fd: &OwnedFd,
    len: u64,
    offset: u64,
    prot: i32,
    page_size: usize,
) -> Result<(Mapping, usize)> {
    let page = page_size as u64;
    let aligned = offset - offset % page;
    let delta = offset - aligned;
    // Upstream maps round_up(len) bytes from the rounded-down offset, which
    // falls short of the region's end when the offset is not page aligned;
    // we include the leading slack.
    let map_len = len
        .checked_add(delta)
        .and_then(|l| l.checked_next_multiple_of(page))
        .and_then(|l| usize::try_from(l).ok())
        .ok_or(Errno::EINVAL)?;
    let file_off = libc::off_t::try_from(aligned).map_err(|_| Errno::EINVAL)?;
    if !offset
        .checked_add(len)
        .is_some_and(|e| i64::try_from(e).is_ok())
    {
        return Err(Errno::EINVAL);
    }
    // SAFETY: a fresh mapping at an address of the kernel's choosing; it does
    // not alias any Rust object.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            file_off,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    // Keep guest memory out of core dumps, as upstream. Failure is harmless.
    // SAFETY: the range is the mapping just created.
    unsafe {
        libc::madvise(base, map_len, libc::MADV_DONTDUMP);
    }
    let base = base as usize;
    Ok((Mapping { base, len: map_len }, base + delta as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::time::Instant;

    const PROT_RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
    const PAGE: u64 = 4096;

    fn memfd(size: u64) -> OwnedFd {
        // SAFETY: the name is a valid C string.
        let fd = unsafe { libc::memfd_create(c"dma-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: fd is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: the fd is open.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
        assert_eq!(r, 0);
        fd
    }

    fn dup(fd: &OwnedFd) -> OwnedFd {
        fd.try_clone().unwrap()
    }

    fn pread_file(fd: &OwnedFd, off: u64, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        // SAFETY: v has n bytes.
        let r =
            unsafe { libc::pread(fd.as_raw_fd(), v.as_mut_ptr() as *mut c_void, n, off as i64) };
        assert_eq!(r, n as isize);
        v
    }

    fn pwrite_file(fd: &OwnedFd, off: u64, data: &[u8]) {
        // SAFETY: data is a valid buffer.
        let r = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                data.as_ptr() as *const c_void,
                data.len(),
                off as i64,
            )
        };
        assert_eq!(r, data.len() as isize);
    }

    fn sg1(dma: &DmaController, iova: u64, len: u64, prot: i32) -> DmaSg {
        let mut sgl = [DmaSg::default()];
        assert_eq!(dma.addr_to_sgl(iova, len, &mut sgl, prot), Ok(1));
        sgl[0]
    }

    fn report(dma: &DmaController, iova: u64, len: u64, pg: u64) -> Result<Vec<u8>> {
        let mut bm = vec![0u8; bitmap_size(len, pg)?];
        dma.logging_report(iova, len, pg, &mut bm)?;
        Ok(bm)
    }

    fn bits(bm: &[u8]) -> u128 {
        let mut v = 0u128;
        for (i, b) in bm.iter().take(16).enumerate() {
            v |= u128::from(*b) << (8 * i);
        }
        v
    }

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

    #[test]
    fn map_unmap_memfd() {
        let dma = DmaController::new(10);
        let fd = memfd(4 * PAGE);
        pwrite_file(&fd, PAGE, b"hello");
        let keep = dup(&fd);
        let info = dma
            .add_region(0x10000, 2 * PAGE, Some(fd), PAGE, PROT_RW, false)
            .unwrap();
        assert_eq!(info.iova_start(), 0x10000);
        assert_eq!(info.iova_len(), 2 * PAGE);
        assert!(!info.vaddr.is_null());
        assert_eq!(info.mapping.iov_len as u64, 2 * PAGE);
        assert_eq!(info.page_size as u64, PAGE);
        assert_eq!(info.prot, PROT_RW as u32);
        // vaddr points at file offset PAGE.
        // SAFETY: the region is mapped readable and 2 pages long.
        let got = unsafe { std::slice::from_raw_parts(info.vaddr as *const u8, 5) }.to_vec();
        assert_eq!(got, b"hello");
        assert_eq!(dma.region_count(), 1);

        let removed = dma.remove_region(0x10000, 2 * PAGE).unwrap();
        assert_eq!(removed.iova_start(), 0x10000);
        assert_eq!(dma.region_count(), 0);
        assert_eq!(dma.remove_region(0x10000, 2 * PAGE), Err(Errno::ENOENT));
        drop(keep);
    }

    #[test]
    fn message_region_info() {
        let dma = DmaController::new(10);
        let info = dma
            .add_region(0x10000, PAGE, None, 0, PROT_RW, false)
            .unwrap();
        assert!(info.vaddr.is_null());
        assert!(info.mapping.iov_base.is_null());
        assert_eq!(info.mapping.iov_len, 0);
        assert_eq!(info.page_size, system_page_size());
        let sg = sg1(&dma, 0x10000, PAGE, PROT_RW);
        assert!(!dma.sg_is_mappable(&sg));
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }];
        assert_eq!(dma.sgl_get(&[sg], &mut iov), Err(Errno::EFAULT));
        // FILE_IO needs an fd.
        assert_eq!(
            dma.add_region(0x90000, PAGE, None, 0, PROT_RW, true)
                .unwrap_err(),
            Errno::EINVAL
        );
    }

    #[test]
    fn unaligned_offset_mapping_covers_region() {
        let dma = DmaController::new(10);
        let fd = memfd(4 * PAGE);
        let keep = dup(&fd);
        pwrite_file(&keep, 0x1800 + PAGE - 1, b"Z");
        let info = dma
            .add_region(0x0, PAGE, Some(fd), 0x1800, PROT_RW, false)
            .unwrap();
        assert_eq!(info.mapping.iov_len as u64, 2 * PAGE);
        // SAFETY: the last byte of the region lies inside the mapping.
        let last = unsafe { *(info.vaddr as *const u8).add(PAGE as usize - 1) };
        assert_eq!(last, b'Z');
    }

    #[test]
    fn overlap_and_identical_remap() {
        let dma = DmaController::new(10);
        let fd = memfd(4 * PAGE);
        let fd2 = dup(&fd);
        let fd3 = dup(&fd);
        let a = dma
            .add_region(0x4000, 2 * PAGE, Some(fd), 0, PROT_RW, false)
            .unwrap();
        // Overlaps: upstream reports EINVAL.
        for (iova, len) in [
            (0x3000, 2 * PAGE),
            (0x5000, PAGE),
            (0x4000, PAGE),
            (0x0, 0x10000),
        ] {
            assert_eq!(
                dma.add_region(iova, len, None, 0, PROT_RW, false)
                    .unwrap_err(),
                Errno::EINVAL,
                "{iova:#x}"
            );
        }
        // Adjacent is fine.
        dma.add_region(0x2000, 2 * PAGE, None, 0, PROT_RW, false)
            .unwrap();
        dma.add_region(0x6000, PAGE, None, 0, PROT_RW, false)
            .unwrap();
        // Identical: accepted, same region.
        let b = dma
            .add_region(0x4000, 2 * PAGE, Some(fd2), 0, PROT_RW, false)
            .unwrap();
        assert_eq!(a.vaddr, b.vaddr);
        assert_eq!(dma.region_count(), 3);
        // Same range, different prot / offset / file: EINVAL.
        assert_eq!(
            dma.add_region(0x4000, 2 * PAGE, Some(fd3), 0, libc::PROT_READ, false)
                .unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            dma.add_region(0x4000, 2 * PAGE, Some(memfd(4 * PAGE)), 0, PROT_RW, false)
                .unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            dma.add_region(0x4000, 2 * PAGE, None, 0, PROT_RW, false)
                .unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(dma.region_count(), 3);
    }

    #[test]
    fn size_limits() {
        let dma = DmaController::new(3);
        assert_eq!(
            dma.add_region(0x1000, MAX_DMA_SIZE + PAGE, None, 0, PROT_RW, false)
                .unwrap_err(),
            Errno::ENOSPC
        );
        dma.add_region(1 << 50, MAX_DMA_SIZE, None, 0, PROT_RW, false)
            .unwrap();
        assert_eq!(
            dma.add_region(0x1000, 0, None, 0, PROT_RW, false)
                .unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            dma.add_region(u64::MAX - 0xfff, 0x2000, None, 0, PROT_RW, false)
                .unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            dma.add_region(0, PAGE, None, 0, libc::PROT_EXEC, false)
                .unwrap_err(),
            Errno::EINVAL
        );
    }

    #[test]
    fn max_regions() {
        let dma = DmaController::new(4);
        for i in 0..4 {
            dma.add_region(i * PAGE, PAGE, None, 0, PROT_RW, false)
                .unwrap();
        }
        assert_eq!(
            dma.add_region(10 * PAGE, PAGE, None, 0, PROT_RW, false)
                .unwrap_err(),
            Errno::EINVAL
        );
        // An identical re-map does not count as a new region.
        dma.add_region(0, PAGE, None, 0, PROT_RW, false).unwrap();
        dma.remove_region(0, PAGE).unwrap();
        dma.add_region(10 * PAGE, PAGE, None, 0, PROT_RW, false)
            .unwrap();
    }

    #[test]
    fn exact_match_unmap_and_remove_all() {
        let dma = DmaController::new(10);
        dma.add_region(0x1000, 0x2000, None, 0, PROT_RW, false)
            .unwrap();
        dma.add_region(0x8000, 0x1000, Some(memfd(PAGE)), 0, PROT_RW, false)
            .unwrap();
        assert_eq!(dma.remove_region(0x1000, 0x1000), Err(Errno::ENOENT));
        assert_eq!(dma.remove_region(0x2000, 0x1000), Err(Errno::ENOENT));
        assert_eq!(dma.remove_region(0x1000, 0x3000), Err(Errno::ENOENT));
        assert_eq!(dma.find_exact(0x1000, 0x2000).unwrap().iova_start(), 0x1000);
        assert_eq!(dma.find_exact(0x1000, 0x1000).unwrap_err(), Errno::ENOENT);
        assert_eq!(dma.first_region().unwrap().iova_start(), 0x1000);
        let all = dma.remove_all();
        assert_eq!(
            all.iter().map(DmaInfo::iova_start).collect::<Vec<_>>(),
            vec![0x1000, 0x8000]
        );
        assert_eq!(dma.region_count(), 0);
        assert!(dma.first_region().is_none());
    }

    #[test]
    fn addr_to_sgl_across_adjacent_regions() {
        let dma = DmaController::new(10);
        let fd = memfd(4 * PAGE);
        for i in 1..4u64 {
            dma.add_region(
                i * PAGE,
                PAGE,
                Some(dup(&fd)),
                (i - 1) * PAGE,
                PROT_RW,
                false,
            )
            .unwrap();
        }
        let mut sgl = [DmaSg::default(); 3];
        assert_eq!(
            dma.addr_to_sgl(PAGE + 0x800, 2 * PAGE, &mut sgl, libc::PROT_READ),
            Ok(3)
        );
        assert_eq!(sgl[0].dma_addr as u64, PAGE);
        assert_eq!((sgl[0].offset, sgl[0].length), (0x800, 0x800));
        assert_eq!(
            (sgl[1].dma_addr as u64, sgl[1].offset, sgl[1].length),
            (2 * PAGE, 0, PAGE)
        );
        assert_eq!(
            (sgl[2].dma_addr as u64, sgl[2].offset, sgl[2].length),
            (3 * PAGE, 0, 0x800)
        );
        assert!(!sgl[0].writeable);
        assert!(sgl.iter().all(|s| s.region != 0 && s.region as u32 != 0));
        assert_ne!(sgl[0].region, sgl[1].region);
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 3];
        dma.sgl_get(&sgl, &mut iov).unwrap();
        assert_eq!(
            iov.iter().map(|v| v.iov_len).collect::<Vec<_>>(),
            vec![0x800, 0x1000, 0x800]
        );
        // Shorter iov array.
        assert_eq!(dma.sgl_get(&sgl, &mut iov[..2]), Err(Errno::EINVAL));

        // Holes and unmapped addresses.
        let mut one = [DmaSg::default()];
        assert_eq!(
            dma.addr_to_sgl(0, 16, &mut one, 0),
            Err(SglError::Errno(Errno::ENOENT))
        );
        assert_eq!(
            dma.addr_to_sgl(3 * PAGE, 2 * PAGE, &mut one, 0),
            Err(SglError::Errno(Errno::ENOENT))
        );
        assert_eq!(
            dma.addr_to_sgl(PAGE, u64::MAX, &mut one, 0),
            Err(SglError::Errno(Errno::ENOENT))
        );
        // Zero length.
        assert_eq!(dma.addr_to_sgl(PAGE, 0, &mut one, 0), Ok(0));
        // A hole between two regions.
        dma.add_region(5 * PAGE, PAGE, None, 0, PROT_RW, false)
            .unwrap();
        let mut three = [DmaSg::default(); 3];
        assert_eq!(
            dma.addr_to_sgl(3 * PAGE, 3 * PAGE, &mut three, 0),
            Err(SglError::Errno(Errno::ENOENT))
        );
        assert_eq!(dma.addr_to_sgl(5 * PAGE + 1, 16, &mut three, 0), Ok(1));
    }

    #[test]
    fn addr_to_sgl_need_more() {
        let dma = DmaController::new(10);
        for i in 0..4u64 {
            dma.add_region(i * PAGE, PAGE, None, 0, PROT_RW, false)
                .unwrap();
        }
        let mut sgl = [DmaSg::default(); 2];
        assert_eq!(
            dma.addr_to_sgl(0, 4 * PAGE, &mut sgl, 0),
            Err(SglError::NeedMore(4))
        );
        // The first entries were still filled.
        assert_eq!((sgl[1].dma_addr as u64, sgl[1].length), (PAGE, PAGE));
        assert_eq!(
            dma.addr_to_sgl(0, 3 * PAGE, &mut [], 0),
            Err(SglError::NeedMore(3))
        );
        assert_eq!(
            dma.addr_to_sgl(0, PAGE, &mut [], 0),
            Err(SglError::NeedMore(1))
        );
    }

    #[test]
    fn prot_violations() {
        let dma = DmaController::new(10);
        let fd = memfd(2 * PAGE);
        dma.add_region(0, PAGE, Some(fd), 0, libc::PROT_READ, false)
            .unwrap();
        dma.add_region(PAGE, PAGE, None, 0, PROT_RW, false).unwrap();
        let mut sgl = [DmaSg::default(); 2];
        // Slow path, then fast path (hint now set).
        for _ in 0..2 {
            assert_eq!(
                dma.addr_to_sgl(0, 16, &mut sgl, PROT_RW),
                Err(SglError::Errno(Errno::EACCES))
            );
            assert_eq!(dma.addr_to_sgl(0, 16, &mut sgl, libc::PROT_READ), Ok(1));
        }
        assert_eq!(
            dma.addr_to_sgl(0, 2 * PAGE, &mut sgl, libc::PROT_WRITE),
            Err(SglError::Errno(Errno::EACCES))
        );
        // Reading is fine; writing through a read entry is EPERM.
        let sg = sgl[0];
        let mut buf = [0u8; 16];
        assert_eq!(dma.sg_access(&sg, &mut buf, true, true), Err(Errno::EPERM));
        assert_eq!(dma.sg_access(&sg, &mut buf, false, true), Ok(true));
        // A forged writeable entry on a read-only region is refused.
        let mut forged = sg;
        forged.writeable = true;
        assert_eq!(dma.sg_write(&forged, &buf, true), Err(Errno::EACCES));
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }];
        assert_eq!(dma.sgl_get(&[forged], &mut iov), Err(Errno::EACCES));
    }

    #[test]
    fn sgl_get_put_dirty() {
        let dma = DmaController::new(10);
        let fd = memfd(0x20 * PAGE);
        dma.add_region(0x10 * PAGE, 0x20 * PAGE, Some(fd), 0, PROT_RW, false)
            .unwrap();
        dma.add_region(0x40 * PAGE, 0x10 * PAGE, None, 0, PROT_RW, false)
            .unwrap();
        assert!(!dma.logging_active());
        // Put while not logging: nothing recorded.
        let w = sg1(&dma, 0x10 * PAGE, PAGE, PROT_RW);
        dma.sgl_put(&[w]);
        dma.logging_start(PAGE, &[]).unwrap();
        assert!(dma.logging_active());
        assert_eq!(
            bits(&report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap()),
            0
        );

        let s1 = sg1(&dma, 0x10 * PAGE, PAGE, PROT_RW);
        let s2 = sg1(&dma, 0x11 * PAGE, PAGE, libc::PROT_READ);
        let s3 = sg1(&dma, 0x12 * PAGE, PAGE, PROT_RW);
        let s4 = sg1(&dma, 0x16 * PAGE, 4 * PAGE, PROT_RW);
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 4];
        dma.sgl_get(&[s1, s2, s3, s4], &mut iov).unwrap();
        // Write through the iovec.
        // SAFETY: iov[3] is a writable mapping of 4 pages.
        unsafe { std::ptr::write_bytes(iov[3].iov_base as *mut u8, 0xab, iov[3].iov_len) };
        assert_eq!(
            bits(&report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap()),
            0
        );
        dma.sgl_put(&[s1, s4]);
        assert_eq!(
            bits(&report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap()),
            0b11_1100_0001
        );
        // Reported bits were cleared.
        assert_eq!(
            bits(&report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap()),
            0
        );
        // Read-only entries do not dirty; mark_dirty does like put.
        dma.sgl_put(&[s2]);
        dma.sgl_mark_dirty(&[s3]);
        assert_eq!(
            bits(&report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap()),
            0b100
        );
        // Bits past `len` but within the 64-bit word are reported, as upstream.
        dma.sgl_put(&[sg1(&dma, 0x27 * PAGE, PAGE, PROT_RW)]);
        assert_eq!(
            bits(&report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap()),
            1 << 23
        );
        // Message-only region: put is harmless, report is EINVAL.
        dma.sgl_put(&[sg1(&dma, 0x40 * PAGE, PAGE, PROT_RW)]);
        assert_eq!(
            report(&dma, 0x40 * PAGE, 0x10 * PAGE, PAGE).unwrap_err(),
            Errno::EINVAL
        );
        dma.logging_stop().unwrap();
        assert!(!dma.logging_active());
        assert_eq!(
            report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap_err(),
            Errno::EINVAL
        );
    }

    #[test]
    fn logging_report_page_sizes() {
        let dma = DmaController::new(10);
        dma.add_region(
            0x10 * PAGE,
            0x20 * PAGE,
            Some(memfd(0x20 * PAGE)),
            0,
            PROT_RW,
            false,
        )
        .unwrap();
        dma.logging_start(PAGE, &[(0, 1 << 40)]).unwrap();
        // Idempotent at the same size; other sizes refused.
        dma.logging_start(PAGE, &[]).unwrap();
        assert_eq!(dma.logging_start(PAGE / 2, &[]), Err(Errno::EINVAL));
        assert_eq!(dma.logging_start(PAGE * 2, &[]), Err(Errno::EINVAL));
        let s1 = sg1(&dma, 0x10 * PAGE, PAGE, PROT_RW);
        let s4 = sg1(&dma, 0x16 * PAGE, 4 * PAGE, PROT_RW);
        let put = || dma.sgl_put(&[s1, s4]);
        let base = 0x10 * PAGE;
        let len = 0x10 * PAGE;

        put();
        assert_eq!(
            bits(&report(&dma, base, len, PAGE / 2).unwrap()),
            0b1111_1111_0000_0000_0011
        );
        put();
        assert_eq!(
            bits(&report(&dma, base, len, PAGE * 2).unwrap()),
            0b0001_1001
        );
        put();
        assert_eq!(bits(&report(&dma, base, len, PAGE << 4).unwrap()), 0b1);
        assert_eq!(bits(&report(&dma, base, len, PAGE << 4).unwrap()), 0b0);
        // Much smaller report pages: each logged page is 64+ bits.
        put();
        let bm = report(&dma, base, len, PAGE / 128).unwrap();
        assert_eq!(bm.len(), 16 * 128 / 8);
        assert!(bm[..16].iter().all(|&b| b == 0xff));
        assert!(bm[16..16 * 6].iter().all(|&b| b == 0));
        assert!(bm[16 * 6..16 * 10].iter().all(|&b| b == 0xff));
        assert!(bm[16 * 10..].iter().all(|&b| b == 0));
        // Much larger report pages: one bit covers several words.
        dma.sgl_put(&[sg1(&dma, 0x2f * PAGE, PAGE, PROT_RW)]);
        let bm = report(&dma, base, 0x20 * PAGE, 0x20 * PAGE).unwrap();
        assert_eq!(bits(&bm), 1);
        // Bad arguments.
        assert_eq!(
            report(&dma, 0xdead_beef, len, PAGE).unwrap_err(),
            Errno::ENOENT
        );
        assert_eq!(
            report(&dma, base + 1, 0x20 * PAGE - 1, PAGE).unwrap_err(),
            Errno::ENOTSUP
        );
        assert_eq!(
            report(&dma, base, 0x21 * PAGE, PAGE).unwrap_err(),
            Errno::ENOENT
        );
        let mut bm = vec![0u8; 8];
        assert_eq!(
            dma.logging_report(base, len, 1 << 24, &mut bm),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            dma.logging_report(base, len, 3000, &mut bm),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            dma.logging_report(base, len, PAGE, &mut bm[..4]),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            dma.logging_report(base, PAGE / 2, PAGE / 2, &mut bm),
            Err(Errno::EINVAL)
        );
        assert_eq!(dma.logging_start(0, &[]), Err(Errno::EINVAL));
    }

    #[test]
    fn logging_new_regions_and_reports_across_words() {
        let dma = DmaController::new(10);
        dma.logging_start(PAGE, &[]).unwrap();
        // A region added while logging gets a bitmap.
        dma.add_region(0, 1024 * PAGE, Some(memfd(1024 * PAGE)), 0, PROT_RW, false)
            .unwrap();
        dma.mark_dirty_range(130 * PAGE + 5, 300 * PAGE);
        // And a range touching two regions plus a hole.
        dma.add_region(
            2048 * PAGE,
            64 * PAGE,
            Some(memfd(64 * PAGE)),
            0,
            PROT_RW,
            false,
        )
        .unwrap();
        dma.mark_dirty_range(1000 * PAGE, 2000 * PAGE);
        let bm = report(&dma, 0, 1024 * PAGE, PAGE).unwrap();
        let is_set = |p: usize| bm[p / 8] >> (p % 8) & 1 == 1;
        for p in 0..1024 {
            let expected = (130..=430).contains(&p) || p >= 1000;
            assert_eq!(is_set(p), expected, "page {p}");
        }
        let bm2 = report(&dma, 2048 * PAGE, 64 * PAGE, PAGE).unwrap();
        assert_eq!(u64::from_le_bytes(bm2[..8].try_into().unwrap()), u64::MAX);
        // Combine 4 logged pages per report bit over many words.
        dma.mark_dirty_range(512 * PAGE, PAGE);
        let bm = report(&dma, 0, 1024 * PAGE, 4 * PAGE).unwrap();
        assert_eq!(bm.len(), 32);
        let set: Vec<usize> = (0..256).filter(|p| bm[p / 8] >> (p % 8) & 1 == 1).collect();
        assert_eq!(set, vec![128]);
    }

    #[test]
    fn report_64gib_is_fast() {
        let dma = DmaController::new(10);
        let len = 64u64 << 30;
        dma.add_region(0, len, None, 0, PROT_RW, false).unwrap();
        // An fd-backed region is needed for a bitmap; use FILE_IO so nothing
        // is mapped.
        dma.add_region(len, len, Some(memfd(PAGE)), 0, PROT_RW, true)
            .unwrap();
        dma.logging_start(PAGE, &[]).unwrap();
        dma.mark_dirty_range(len, len);
        let mut bm = vec![0u8; bitmap_size(len, PAGE).unwrap()];
        let mut best = std::time::Duration::MAX;
        for _ in 0..3 {
            dma.mark_dirty_range(len, len);
            let t = Instant::now();
            dma.logging_report(len, len, PAGE, &mut bm).unwrap();
            best = best.min(t.elapsed());
            assert!(bm.iter().all(|&b| b == 0xff));
        }
        // Empty reports are cheaper still.
        let t = Instant::now();
        dma.logging_report(len, len, PAGE, &mut bm).unwrap();
        let empty = t.elapsed();
        assert!(bm.iter().all(|&b| b == 0));
        eprintln!("64 GiB report: full {best:?}, empty {empty:?}");
        // Generous for debug builds on a loaded machine; release is ~0.3 ms.
        assert!(best.as_millis() < 50, "{best:?}");
    }

    #[test]
    fn sg_access_modes() {
        let dma = DmaController::new(10);
        let fd_m = memfd(4 * PAGE);
        let fd_f = memfd(4 * PAGE);
        let keep_m = dup(&fd_m);
        let keep_f = dup(&fd_f);
        dma.add_region(0x10000, 2 * PAGE, Some(fd_m), PAGE, PROT_RW, false)
            .unwrap();
        dma.add_region(0x20000, 2 * PAGE, Some(fd_f), PAGE, PROT_RW, true)
            .unwrap();
        dma.add_region(0x30000, 2 * PAGE, None, 0, PROT_RW, false)
            .unwrap();
        dma.logging_start(PAGE, &[]).unwrap();

        let data: Vec<u8> = (0..100u8).collect();
        for base in [0x10000u64, 0x20000] {
            let sg = sg1(&dma, base + PAGE + 10, 100, PROT_RW);
            // Without the direct flag everything goes to the client.
            let mut tmp = data.clone();
            assert_eq!(dma.sg_access(&sg, &mut tmp, true, false), Ok(false));
            assert_eq!(dma.sg_write(&sg, &data, true), Ok(true));
            let mut back = vec![0u8; 100];
            assert_eq!(dma.sg_read(&sg, &mut back, true), Ok(true));
            assert_eq!(back, data);
            // Short buffer.
            assert_eq!(dma.sg_read(&sg, &mut back[..99], true), Err(Errno::EINVAL));
            // Dirty page: second page of the region.
            assert_eq!(bits(&report(&dma, base, 2 * PAGE, PAGE).unwrap()), 0b10);
        }
        // The bytes landed in the files at offset PAGE + PAGE + 10.
        assert_eq!(pread_file(&keep_m, 2 * PAGE + 10, 100), data);
        assert_eq!(pread_file(&keep_f, 2 * PAGE + 10, 100), data);
        // Message-only region.
        let sg = sg1(&dma, 0x30000, 100, PROT_RW);
        let mut buf = vec![0u8; 100];
        assert_eq!(dma.sg_access(&sg, &mut buf, false, true), Ok(false));
        assert_eq!(dma.sg_access(&sg, &mut buf, true, true), Ok(false));
        // FILE_IO past the end of the file: EIO.
        let sg = sg1(&dma, 0x20000 + PAGE, PAGE, PROT_RW);
        // SAFETY: the fd is open.
        let r = unsafe { libc::ftruncate(keep_f.as_raw_fd(), PAGE as i64) };
        assert_eq!(r, 0);
        let mut big = vec![0u8; PAGE as usize];
        assert_eq!(dma.sg_read(&sg, &mut big, true), Err(Errno::EIO));
    }

    #[test]
    fn stale_and_forged_entries() {
        let dma = DmaController::new(10);
        dma.add_region(0x10000, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
            .unwrap();
        let sg = sg1(&dma, 0x10000, PAGE, PROT_RW);
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }];
        dma.sgl_get(&[sg], &mut iov).unwrap();
        assert!(dma.sg_is_mappable(&sg));

        // Zeroed entry.
        assert_eq!(
            dma.sgl_get(&[DmaSg::default()], &mut iov),
            Err(Errno::EINVAL)
        );
        // Wrong id, out-of-bounds length, overflowing offset.
        let mut f = sg;
        f.region += 1;
        assert_eq!(dma.sgl_get(&[f], &mut iov), Err(Errno::EINVAL));
        let mut f = sg;
        f.length = PAGE + 1;
        assert_eq!(dma.sgl_get(&[f], &mut iov), Err(Errno::EINVAL));
        let mut f = sg;
        f.offset = u64::MAX;
        assert_eq!(dma.sgl_get(&[f], &mut iov), Err(Errno::EINVAL));
        let mut f = sg;
        f.dma_addr = 0x10001 as *mut c_void;
        assert_eq!(dma.sgl_get(&[f], &mut iov), Err(Errno::EINVAL));

        // Unmap, then map something new at the same address: the old entry
        // stays dead.
        dma.remove_region(0x10000, PAGE).unwrap();
        assert_eq!(dma.sgl_get(&[sg], &mut iov), Err(Errno::EINVAL));
        dma.add_region(0x10000, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
            .unwrap();
        assert_eq!(dma.sgl_get(&[sg], &mut iov), Err(Errno::EINVAL));
        assert!(!dma.sg_is_mappable(&sg));
        let mut buf = vec![0u8; PAGE as usize];
        assert_eq!(dma.sg_read(&sg, &mut buf, true), Err(Errno::EINVAL));
        assert_eq!(dma.sg_write(&sg, &buf, true), Err(Errno::EINVAL));
        dma.logging_start(PAGE, &[]).unwrap();
        dma.sgl_put(&[sg]);
        assert_eq!(bits(&report(&dma, 0x10000, PAGE, PAGE).unwrap()), 0);
        // The thread's cached translation must not outlive the table change.
        let fresh = sg1(&dma, 0x10000, PAGE, PROT_RW);
        assert_ne!(fresh.region, sg.region);
        dma.sgl_get(&[fresh], &mut iov).unwrap();
    }

    #[test]
    fn small_table_copy_follows_every_change() {
        // Up to dma_snap::CAPACITY regions the lock-free copy answers; past
        // it the other paths do. Every answer must match the table, across
        // the switch both ways, and a wrong or stale slot hint must never
        // resolve to another region.
        let n = dma_snap::CAPACITY + 2;
        let dma = DmaController::new(n);
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }];
        let iova = |i: usize| 0x100_0000 + i as u64 * 4 * PAGE;
        for i in 0..n {
            dma.add_region(iova(i), 2 * PAGE, Some(memfd(2 * PAGE)), 0, PROT_RW, false)
                .unwrap();
            // Every region so far translates and maps; the gaps do not.
            for j in 0..=i {
                let sg = sg1(&dma, iova(j) + PAGE, PAGE, PROT_RW);
                assert_eq!(sg.iova(), iova(j) + PAGE);
                dma.sgl_get(&[sg], &mut iov).unwrap();
                let mut wrong = sg;
                wrong.hint = wrong.hint.wrapping_add(1);
                dma.sgl_get(&[wrong], &mut iov).unwrap();
                let mut out = [DmaSg::default()];
                assert_eq!(
                    dma.addr_to_sgl(iova(j) + 2 * PAGE, 1, &mut out, PROT_RW),
                    Err(SglError::Errno(Errno::ENOENT))
                );
            }
        }
        // Remove from the front: the copy comes back below the capacity,
        // and entries of removed regions stay dead whatever their hint.
        for i in 0..n {
            let sg = sg1(&dma, iova(i), PAGE, PROT_RW);
            dma.remove_region(iova(i), 2 * PAGE).unwrap();
            for hint in 0..=u8::MAX {
                let mut stale = sg;
                stale.hint = hint;
                assert_eq!(dma.sgl_get(&[stale], &mut iov), Err(Errno::EINVAL));
            }
            if i + 1 < n {
                let next = sg1(&dma, iova(i + 1), PAGE, PROT_RW);
                dma.sgl_get(&[next], &mut iov).unwrap();
            }
        }
        // Read-only regions refuse writable translations on every path.
        dma.add_region(0x1000, PAGE, Some(memfd(PAGE)), 0, libc::PROT_READ, false)
            .unwrap();
        let mut out = [DmaSg::default()];
        assert_eq!(
            dma.addr_to_sgl(0x1000, PAGE, &mut out, PROT_RW),
            Err(SglError::Errno(Errno::EACCES))
        );
        let ro = sg1(&dma, 0x1000, PAGE, libc::PROT_READ);
        dma.sgl_get(&[ro], &mut iov).unwrap();
        let mut forged = ro;
        forged.writeable = true;
        assert_eq!(dma.sgl_get(&[forged], &mut iov), Err(Errno::EACCES));
    }

    #[test]
    fn small_table_copy_without_fds() {
        // The lock-free copy's paths with message-only regions (no fds, so
        // Miri runs it): translation through the copy, EFAULT from sgl_get
        // for memory that is not mapped, EINVAL once the region is gone.
        let dma = DmaController::new(8);
        for i in 0..4u64 {
            dma.add_region(i * 0x10000, 0x8000, None, 0, PROT_RW, false)
                .unwrap();
        }
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }];
        for i in 0..4u64 {
            let sg = sg1(&dma, i * 0x10000 + 0x100, 0x200, PROT_RW);
            assert_eq!((sg.dma_addr as u64, sg.offset), (i * 0x10000, 0x100));
            assert_eq!(dma.sgl_get(&[sg], &mut iov), Err(Errno::EFAULT));
            // Crossing the region's end is not the fast path's to answer.
            let mut out = [DmaSg::default(); 2];
            assert_eq!(
                dma.addr_to_sgl(i * 0x10000 + 0x7f00, 0x200, &mut out, PROT_RW),
                Err(SglError::Errno(Errno::ENOENT))
            );
        }
        let sg = sg1(&dma, 0x20000, 0x1000, PROT_RW);
        dma.remove_region(0x20000, 0x8000).unwrap();
        assert_eq!(dma.sgl_get(&[sg], &mut iov), Err(Errno::EINVAL));
        let mut out = [DmaSg::default()];
        assert_eq!(
            dma.addr_to_sgl(0x20000, 0x1000, &mut out, PROT_RW),
            Err(SglError::Errno(Errno::ENOENT))
        );
        dma.remove_all();
        assert_eq!(
            dma.addr_to_sgl(0, 0x1000, &mut out, PROT_RW),
            Err(SglError::Errno(Errno::ENOENT))
        );
    }

    #[test]
    fn hint_is_per_controller() {
        let a = DmaController::new(10);
        let b = DmaController::new(10);
        a.add_region(0, PAGE, None, 0, PROT_RW, false).unwrap();
        let sa = sg1(&a, 0, 16, PROT_RW);
        let mut one = [DmaSg::default()];
        assert_eq!(
            b.addr_to_sgl(0, 16, &mut one, PROT_RW),
            Err(SglError::Errno(Errno::ENOENT))
        );
        b.add_region(0, PAGE, None, 0, PROT_RW, false).unwrap();
        let sb = sg1(&b, 0, 16, PROT_RW);
        assert_ne!(sa.region, sb.region);
        assert_eq!(sg1(&a, 0, 16, PROT_RW).region, sa.region);
    }

    #[test]
    fn concurrent_access_while_mapping() {
        let dma = Arc::new(DmaController::new(100_000));
        // Each thread touches only its own pages (page % 3 == thread), so
        // that any race ThreadSanitizer sees is the library's.
        let stable = memfd(18 * PAGE);
        dma.add_region(0, 18 * PAGE, Some(stable), 0, PROT_RW, false)
            .unwrap();
        dma.logging_start(PAGE, &[]).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for t in 0..3u64 {
            let dma = Arc::clone(&dma);
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                let mut ops = 0u64;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) || ops < 1000 {
                    // Stable region: must always work.
                    let page = t + 3 * (i % 6);
                    let mut sgl = [DmaSg::default()];
                    assert_eq!(dma.addr_to_sgl(page * PAGE, PAGE, &mut sgl, PROT_RW), Ok(1));
                    let mut iov = [libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: 0,
                    }];
                    dma.sgl_get(&sgl, &mut iov).unwrap();
                    let src = [t as u8 + 1; 64];
                    // SAFETY: iov is a writable mapping of a whole page.
                    unsafe {
                        std::ptr::copy_nonoverlapping(src.as_ptr(), iov[0].iov_base as *mut u8, 64)
                    };
                    dma.sgl_put(&sgl);
                    // Volatile regions: may fail, must not crash.
                    let v = 0x100_0000 + (t + 3 * (i % 21)) * PAGE;
                    if let Ok(1) = dma.addr_to_sgl(v, PAGE, &mut sgl, PROT_RW) {
                        let mut buf = vec![0u8; PAGE as usize];
                        match dma.sg_write(&sgl[0], &buf, true) {
                            Ok(true) | Err(Errno::EINVAL) => {}
                            other => panic!("unexpected {other:?}"),
                        }
                        match dma.sg_read(&sgl[0], &mut buf, true) {
                            Ok(true) | Err(Errno::EINVAL) => {}
                            other => panic!("unexpected {other:?}"),
                        }
                        let _ = dma.sgl_get(&sgl, &mut iov);
                        dma.sgl_put(&sgl);
                    }
                    ops += 1;
                    i += 1;
                }
                ops
            }));
        }
        let start = Instant::now();
        let mut round = 0u64;
        while start.elapsed().as_millis() < 300 || round < 20 {
            for k in 0..64u64 {
                let iova = 0x100_0000 + k * PAGE;
                dma.add_region(iova, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
                    .unwrap();
            }
            for k in 0..64u64 {
                let iova = 0x100_0000 + k * PAGE;
                dma.remove_region(iova, PAGE).unwrap();
            }
            round += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            assert!(t.join().unwrap() >= 1000);
        }
        // Every page of the stable region was dirtied.
        let bm = report(&dma, 0, 18 * PAGE, PAGE).unwrap();
        assert_eq!(bits(&bm), 0x3ffff);
    }

    #[test]
    fn many_regions_lookup() {
        let dma = DmaController::new(300_000);
        let n = 200_000u64;
        for i in 0..n {
            dma.add_region(i * 2 * PAGE, PAGE, None, 0, PROT_RW, false)
                .unwrap();
        }
        assert_eq!(dma.region_count(), n as usize);
        let t = Instant::now();
        let mut sgl = [DmaSg::default()];
        for i in (0..n).step_by(7) {
            assert_eq!(
                dma.addr_to_sgl(i * 2 * PAGE + 8, 8, &mut sgl, PROT_RW),
                Ok(1)
            );
            assert_eq!(sgl[0].dma_addr as u64, i * 2 * PAGE);
            assert_eq!(
                dma.addr_to_sgl(i * 2 * PAGE + PAGE, 8, &mut sgl, PROT_RW),
                Err(SglError::Errno(Errno::ENOENT))
            );
        }
        eprintln!("{} lookups in {:?}", 2 * n / 7, t.elapsed());
        assert!(t.elapsed().as_secs() < 5);
    }

    /// An address other than `addr`, in another granule, that takes the same
    /// translation cache slot.
    fn colliding(addr: u64) -> u64 {
        (1..)
            .map(|i| addr + i * PAGE)
            .find(|&a| tlb_set_index(a) == tlb_set_index(addr))
            .unwrap()
    }

    #[test]
    fn translation_cache_collisions_and_misses() {
        let dma = DmaController::new(10);
        let a = 0x10_0000;
        let b = colliding(a);
        dma.add_region(a, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
            .unwrap();
        // Cached for `a`; `b` shares the slot but is not mapped.
        assert_eq!(sg1(&dma, a, 8, PROT_RW).dma_addr as u64, a);
        let mut sgl = [DmaSg::default()];
        for _ in 0..2 {
            assert_eq!(
                dma.addr_to_sgl(b, 8, &mut sgl, PROT_RW),
                Err(SglError::Errno(Errno::ENOENT))
            );
        }
        // Mapped later (no new generation): found. With a third region in
        // the same set, each translation evicts another's entry, which must
        // still translate right afterwards.
        dma.add_region(b, PAGE, Some(memfd(PAGE)), 0, libc::PROT_READ, false)
            .unwrap();
        let c = colliding(b);
        assert_eq!(tlb_set_index(c), tlb_set_index(a));
        dma.add_region(c, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
            .unwrap();
        for _ in 0..3 {
            let sc = sg1(&dma, c + 24, 8, PROT_RW);
            assert_eq!((sc.dma_addr as u64, sc.offset), (c, 24));
            assert!(dma.sg_write(&sc, &[9; 8], true).unwrap());
            let sb = sg1(&dma, b + 16, 8, libc::PROT_READ);
            assert_eq!((sb.dma_addr as u64, sb.offset), (b, 16));
            assert!(!sb.writeable);
            assert_eq!(
                dma.addr_to_sgl(b, 8, &mut sgl, PROT_RW),
                Err(SglError::Errno(Errno::EACCES))
            );
            let sa = sg1(&dma, a + 8, 8, PROT_RW);
            assert_eq!((sa.dma_addr as u64, sa.offset), (a, 8));
            // sg_read of `b`'s entry after `a` took the slot: correct data
            // through the slow path.
            let mut buf = [0u8; 8];
            assert!(dma.sg_write(&sa, &[7; 8], true).unwrap());
            assert!(dma.sg_read(&sa, &mut buf, true).unwrap());
            assert_eq!(buf, [7; 8]);
            assert!(dma.sg_read(&sb, &mut buf, true).unwrap());
            assert_eq!(buf, [0; 8]);
            assert!(dma.sg_read(&sc, &mut buf, true).unwrap());
            assert_eq!(buf, [9; 8]);
        }
    }

    #[test]
    fn lock_free_access_races_unmap() {
        // Threads read and write a region through their translation caches
        // (the lock-free path) while this thread unmaps it and maps a new
        // file at the same address, over and over. Unmapping must wait for
        // copies in progress (else: SIGSEGV, or a copy landing in whatever
        // the kernel maps there next), and every read must see one file's
        // bytes, whole. Each thread keeps to its own half of the region, so
        // that any race ThreadSanitizer sees is the library's.
        const LEN: u64 = 16 * PAGE;
        const HALF: u64 = LEN / 2;
        const IOVA: u64 = 0x4000_0000;
        let dma = Arc::new(DmaController::new(16));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for t in 0..2u64 {
            let (dma, stop, hits) = (Arc::clone(&dma), Arc::clone(&stop), Arc::clone(&hits));
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; HALF as usize];
                let mut sgl = [DmaSg::default()];
                let iova = IOVA + t * HALF;
                while !stop.load(Ordering::Relaxed) {
                    if dma.addr_to_sgl(iova, HALF, &mut sgl, PROT_RW) != Ok(1) {
                        continue;
                    }
                    if let Ok(true) = dma.sg_read(&sgl[0], &mut buf, true) {
                        let first = buf[0];
                        assert_ne!(first, 0, "read a region that was never filled");
                        assert!(buf.iter().all(|&b| b == first), "torn read");
                        hits.fetch_add(1, Ordering::Relaxed);
                        if t == 1 {
                            // Write back what was read: the next read of
                            // this region still sees one byte throughout.
                            if let Ok(true) = dma.sg_write(&sgl[0], &buf, true) {
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }));
        }
        let start = Instant::now();
        let mut round = 0u8;
        while start.elapsed() < std::time::Duration::from_millis(400)
            || hits.load(Ordering::Relaxed) < 200
        {
            round = round % 250 + 1;
            let fd = memfd(LEN);
            pwrite_file(&fd, 0, &vec![round; LEN as usize]);
            dma.add_region(IOVA, LEN, Some(fd), 0, PROT_RW, false)
                .unwrap();
            std::thread::yield_now();
            dma.remove_region(IOVA, LEN).unwrap();
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "readers made no progress"
            );
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn translation_cache_survives_adds_not_removals() {
        let dma = DmaController::new(10);
        dma.add_region(0, 2 * PAGE, Some(memfd(2 * PAGE)), 0, PROT_RW, false)
            .unwrap();
        let gen = dma.generation.load(Ordering::Relaxed);
        let before = sg1(&dma, PAGE, 8, PROT_RW);
        // Adding a neighbour right after it keeps the generation, and the
        // cached translation stays right at the boundary.
        dma.add_region(2 * PAGE, PAGE, None, 0, PROT_RW, false)
            .unwrap();
        assert_eq!(dma.generation.load(Ordering::Relaxed), gen);
        assert_eq!(sg1(&dma, PAGE, 8, PROT_RW).region, before.region);
        let mut sgl = [DmaSg::default(); 2];
        assert_eq!(dma.addr_to_sgl(2 * PAGE - 8, 16, &mut sgl, PROT_RW), Ok(2));
        assert_eq!(sgl[1].dma_addr as u64, 2 * PAGE);
        // Removing anything invalidates: the entry made before is refused,
        // and a fresh translation of the re-added range names the new region.
        dma.remove_region(0, 2 * PAGE).unwrap();
        assert_ne!(dma.generation.load(Ordering::Relaxed), gen);
        let mut buf = [0u8; 8];
        assert_eq!(dma.sg_read(&before, &mut buf, true), Err(Errno::EINVAL));
        dma.add_region(0, 2 * PAGE, Some(memfd(2 * PAGE)), 0, PROT_RW, false)
            .unwrap();
        let after = sg1(&dma, PAGE, 8, PROT_RW);
        assert_ne!(after.region, before.region);
        assert!(dma.sg_read(&after, &mut buf, true).unwrap());
    }

    #[test]
    fn bitmap_helpers() {
        assert_eq!(bitmap_size(0x10 * PAGE, PAGE), Ok(8));
        assert_eq!(bitmap_size(65 * PAGE, PAGE), Ok(16));
        assert_eq!(bitmap_size(PAGE + 1, PAGE), Ok(8));
        assert_eq!(bitmap_size(PAGE - 1, PAGE), Err(Errno::EINVAL));
        assert_eq!(bitmap_size(PAGE, 0), Err(Errno::EINVAL));
        for k in 0..=6 {
            for x in [
                0u64,
                1,
                0x8000_0000_0000_0001,
                0xdead_beef_cafe_f00d,
                u64::MAX,
            ] {
                let g = 1u64 << k;
                let mut expect = 0u64;
                for i in 0..(64 >> k) {
                    if (x >> (i * g)) & ((1u128 << g) - 1) as u64 != 0 {
                        expect |= 1 << i;
                    }
                }
                assert_eq!(squeeze(x, k as u32), expect, "squeeze {x:#x} {k}");
                let low = x & (((1u128 << (64 >> k)) - 1) as u64);
                let mut stretched = 0u64;
                for i in 0..(64 >> k) {
                    if low >> i & 1 == 1 {
                        stretched |= (((1u128 << g) - 1) as u64) << (i * g);
                    }
                }
                assert_eq!(stretch(low, k as u32), stretched, "stretch {x:#x} {k}");
            }
        }
        let words = zeroed_words(3).unwrap();
        set_bits(&words, 60, 130);
        assert_eq!(words[0].load(Ordering::Relaxed), 0xf << 60);
        assert_eq!(words[1].load(Ordering::Relaxed), u64::MAX);
        assert_eq!(words[2].load(Ordering::Relaxed), 0b11);
        set_bits(&words, 190, 1000);
        assert_eq!(words[2].load(Ordering::Relaxed), 0b11 | (0b11 << 62));
    }

    #[test]
    fn guest_slice_reads_writes_and_checks_bounds() {
        let dma = DmaController::new(8);
        let f1 = memfd(2 * PAGE);
        let f2 = memfd(2 * PAGE);
        dma.add_region(0x10000, 2 * PAGE, Some(dup(&f1)), 0, PROT_RW, false)
            .unwrap();
        // Adjacent region: a slice may span both.
        dma.add_region(0x12000, 2 * PAGE, Some(dup(&f2)), 0, PROT_RW, false)
            .unwrap();
        pwrite_file(&f1, 0x1ffe, &[1, 2]);
        pwrite_file(&f2, 0, &[3, 4]);
        let got = dma
            .with_guest(0x11ffe, 4, PROT_RW, |mem| {
                assert_eq!(mem.len(), 4);
                assert_eq!(mem.iova(), 0x11ffe);
                assert!(mem.is_writable());
                let mut b = [0u8; 4];
                mem.read_at(0, &mut b).unwrap();
                mem.write_at(1, &[9, 8]).unwrap();
                // Out of bounds, or overflowing offsets.
                assert_eq!(mem.read_at(3, &mut [0; 2]), Err(Errno::EFAULT));
                assert_eq!(mem.write_at(5, &[]), Err(Errno::EFAULT));
                assert_eq!(mem.read_at(usize::MAX, &mut [0; 2]), Err(Errno::EFAULT));
                // An empty access at the very end is fine.
                mem.read_at(4, &mut []).unwrap();
                (b, mem.to_vec().unwrap())
            })
            .unwrap();
        assert_eq!(got.0, [1, 2, 3, 4]);
        assert_eq!(got.1, [1, 9, 8, 4]);
        assert_eq!(pread_file(&f1, 0x1ffe, 2), [1, 9]);
        assert_eq!(pread_file(&f2, 0, 2), [8, 4]);

        // Read-only borrow: no writes; write-only borrow: no reads.
        dma.with_guest(0x10000, 16, PROT_READ, |mem| {
            assert!(!mem.is_writable());
            assert_eq!(mem.write_at(0, &[1]), Err(Errno::EPERM));
        })
        .unwrap();
        dma.with_guest(0x10000, 16, PROT_WRITE, |mem| {
            assert_eq!(mem.read_at(0, &mut [0]), Err(Errno::EPERM));
            assert_eq!(mem.to_vec(), Err(Errno::EPERM));
        })
        .unwrap();

        // Holes, wrapping ranges, bad prot.
        assert_eq!(
            dma.with_guest(0x13000, 2 * PAGE as usize, PROT_READ, |_| ()),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            dma.with_guest(0xf000, 0x1001, PROT_READ, |_| ()),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            dma.with_guest(u64::MAX, 2, PROT_READ, |_| ()),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            dma.with_guest(0x10000, 1, libc::PROT_EXEC, |_| ()),
            Err(Errno::EINVAL)
        );
        // An empty range needs no mapping.
        assert_eq!(dma.with_guest(0, 0, PROT_RW, |m| m.is_empty()), Ok(true));
    }

    #[test]
    fn guest_slice_refuses_unmapped_and_read_only_regions() {
        let dma = DmaController::new(8);
        // Message-only region and a file-I/O region: not in our memory.
        dma.add_region(0x1000, PAGE, None, 0, PROT_RW, false)
            .unwrap();
        let fio = memfd(PAGE);
        dma.add_region(0x4000, PAGE, Some(dup(&fio)), 0, PROT_RW, true)
            .unwrap();
        let ro = memfd(PAGE);
        dma.add_region(0x8000, PAGE, Some(dup(&ro)), 0, libc::PROT_READ, false)
            .unwrap();
        assert_eq!(
            dma.with_guest(0x1000, 4, PROT_READ, |_| ()),
            Err(Errno::EFAULT)
        );
        assert_eq!(
            dma.with_guest(0x4000, 4, PROT_READ, |_| ()),
            Err(Errno::EFAULT)
        );
        assert_eq!(
            dma.with_guest(0x8000, 4, PROT_RW, |_| ()),
            Err(Errno::EACCES)
        );
        pwrite_file(&ro, 0, &[7]);
        assert_eq!(
            dma.with_guest(0x8000, 1, PROT_READ, |m| m.to_vec()),
            Ok(Ok(vec![7]))
        );

        // read/write: file I/O works, messages do not, read-only refuses.
        dma.write(0x4ffe, &[5, 6]).unwrap();
        assert_eq!(pread_file(&fio, 0xffe, 2), [5, 6]);
        let mut b = [0u8; 2];
        dma.read(0x4ffe, &mut b).unwrap();
        assert_eq!(b, [5, 6]);
        assert_eq!(dma.read(0x1000, &mut b), Err(Errno::EFAULT));
        assert_eq!(dma.write(0x8000, &b), Err(Errno::EACCES));
        assert_eq!(dma.read(0x2000, &mut b), Err(Errno::ENOENT));
        dma.read(0x8000, &mut b[..1]).unwrap();
        assert_eq!(b[0], 7);
        // Zero-length transfers succeed anywhere.
        dma.read(0xdead_0000, &mut []).unwrap();
    }

    #[test]
    fn read_write_span_regions_and_mark_dirty() {
        let dma = DmaController::new(8);
        let f1 = memfd(2 * PAGE);
        let f2 = memfd(2 * PAGE);
        dma.add_region(0, 2 * PAGE, Some(dup(&f1)), 0, PROT_RW, false)
            .unwrap();
        dma.add_region(2 * PAGE, 2 * PAGE, Some(dup(&f2)), 0, PROT_RW, true)
            .unwrap();
        dma.logging_start(PAGE, &[]).unwrap();
        let data: Vec<u8> = (0..=255u8).cycle().take(PAGE as usize + 8).collect();
        dma.write(PAGE + PAGE / 2, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        dma.read(PAGE + PAGE / 2, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(pread_file(&f2, 0, 4), data[PAGE as usize / 2..][..4]);
        assert_eq!(bits(&report(&dma, 0, 2 * PAGE, PAGE).unwrap()), 0b10);
        assert_eq!(bits(&report(&dma, 2 * PAGE, 2 * PAGE, PAGE).unwrap()), 0b1);

        // Writes through a guest slice are logged too, reads are not.
        dma.with_guest(0, 2 * PAGE as usize, PROT_RW, |m| {
            m.read_at(0, &mut [0; 8]).unwrap();
            m.write_at(PAGE as usize + 1, &[1]).unwrap();
        })
        .unwrap();
        assert_eq!(bits(&report(&dma, 0, 2 * PAGE, PAGE).unwrap()), 0b10);
        assert_eq!(bits(&report(&dma, 0, 2 * PAGE, PAGE).unwrap()), 0);
    }

    #[test]
    fn unmap_waits_for_guest_slice() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Barrier;
        let dma = Arc::new(DmaController::new(4));
        dma.add_region(0x1000, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
            .unwrap();
        let inside = Arc::new(Barrier::new(2));
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (dma, inside, done) = (dma.clone(), inside.clone(), done.clone());
            std::thread::spawn(move || {
                dma.with_guest(0x1000, 16, PROT_RW, |m| {
                    inside.wait();
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    m.write_at(0, &[1; 16]).unwrap();
                    done.store(true, Ordering::SeqCst);
                })
                .unwrap();
            })
        };
        inside.wait();
        dma.remove_region(0x1000, PAGE).unwrap();
        assert!(done.load(Ordering::SeqCst), "unmapped under a live slice");
        t.join().unwrap();
        assert_eq!(
            dma.with_guest(0x1000, 16, PROT_RW, |_| ()),
            Err(Errno::ENOENT)
        );
    }
}
