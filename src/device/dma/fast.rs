//! The per-I/O fast paths: what SPDK's target calls on every I/O
//! (`vfu_addr_to_sgl`, `vfu_sgl_get`, `vfu_sgl_put` of one entry), answered
//! from the lock-free copy of a small table (`snap.rs`) alone.
//!
//! The context keeps a pointer to the copy (`Context::dma_snapshot`: a
//! static empty copy until DMA is set up, then its controller's), so the C
//! entry points reach it with one load from the handle, before the panic
//! guard and whether or not DMA is set up: an empty copy answers nothing,
//! and the caller then takes the controller's full path, which is always
//! right and gives the errno.
//!
//! These paths never panic, never dereference a local address and load
//! each field only when it is needed, in the order it is needed, so that
//! they fit in the registers a C call leaves free: on SPDK's pattern every
//! instruction here is paid on every I/O.

use super::snap::Snapshot;
use super::*;

impl Snapshot {
    /// The fastest translation: a non-empty range inside one region that
    /// allows `prot` is a search of a small sorted array, without lock or
    /// hashing. Fills `sg` and returns true; false when the full path
    /// (`DmaController::addr_to_sgl`) must answer, errors included (`sg` may
    /// then hold anything).
    #[inline(always)]
    pub fn translate(&self, iova: u64, len: u64, sg: &mut DmaSg, prot: i32) -> bool {
        let Some((state, n)) = self.begin() else {
            return false;
        };
        let i = self.search(n, iova);
        // `sg` is filled as the values arrive, so that each dies at once
        // (a C call leaves few registers); on a failed check the full path
        // fills it again.
        sg.hint = i as u8; // i < CAPACITY <= 256
        let start = self.start(i);
        sg.dma_addr = start as usize as *mut c_void;
        // One compare for both ends: an address below `start` wraps to at
        // least 2^64 - start, which no entry's length reaches (a region
        // never wraps the address space). Past the entries a slot has
        // length 0, so it contains nothing.
        let off = iova.wrapping_sub(start);
        sg.offset = off;
        let slot = self.slot(i);
        let room = match slot.len.load(Ordering::Relaxed).checked_sub(off) {
            Some(r) if r > 0 => r,
            _ => return false,
        };
        // 1 <= len <= room; a zero length wraps to u64::MAX.
        if len.wrapping_sub(1) >= room {
            return false;
        }
        sg.length = len;
        // Asking for write access to a region without it: one test.
        let write = prot & libc::PROT_WRITE;
        if write as u64 & !slot.prot.load(Ordering::Relaxed) != 0 {
            return false;
        }
        sg.writeable = write != 0;
        sg.region = slot.id.load(Ordering::Relaxed);
        self.valid(state)
    }

    /// The fastest `sgl_get` of one entry: the local address of an entry
    /// that names a live mapped region at the position its hint gives
    /// (where [`Self::translate`] found it), fits it and asks for no access
    /// it forbids. `None` when a longer path must answer
    /// ([`Self::sg_addr_searched`], then `DmaController::sgl_get`, which
    /// also gives the errno of a stale or made-up entry).
    #[inline(always)]
    pub fn sg_addr(&self, sg: &DmaSg) -> Option<*mut c_void> {
        // No count needed: every slot past the entries (all of them in an
        // empty or absent copy) is cleared by `publish` (start u64::MAX,
        // identifier 0, not mapped), and no live entry has identifier 0, so
        // a wrong hint finds a slot whose identity check below fails, or
        // one that is not mapped.
        let state = self.stable()?;
        let i = usize::from(sg.hint);
        if !self.is(i, sg.dma_addr as usize as u64, sg.region) {
            return None;
        }
        let slot = self.slot(i);
        // offset + length <= the region's length, without overflow.
        let room = slot.len.load(Ordering::Relaxed).checked_sub(sg.length)?;
        if sg.offset > room {
            return None;
        }
        if sg.writeable && !slot.writable() {
            return None;
        }
        // Loaded last, as it is needed last (registers again).
        let vaddr = slot.vaddr.load(Ordering::Relaxed);
        if vaddr == 0 {
            return None;
        }
        if !self.valid(state) {
            return None;
        }
        // In bounds: offset + length <= the region's length, and the
        // mapping covers the whole region.
        Some(vaddr.wrapping_add(sg.offset as usize) as *mut c_void)
    }

    /// [`Self::sg_addr`] for an entry whose hint is wrong (the table changed
    /// since the translation, or another path made the entry): the entry's
    /// region is searched for in the copy.
    #[inline(never)]
    pub fn sg_addr_searched(&self, sg: &DmaSg) -> Option<*mut c_void> {
        if sg.region == 0 {
            return None;
        }
        #[inline(always)]
        fn local(v: &snap::View<'_>, sg: &DmaSg) -> Option<usize> {
            let e = v.named(sg.dma_addr as usize as u64, sg.region, sg.hint)?;
            if e.vaddr == 0 || check_range(e.len, e.prot, sg).is_err() {
                return None;
            }
            // In bounds: offset + length <= the region's length, and the
            // mapping covers the whole region.
            Some(e.vaddr.wrapping_add(sg.offset as usize))
        }
        let addr = self.read(
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
}
