use super::*;

/// Resolves a scatter/gather entry to its region, rejecting entries that do
/// not name a live region or that reach outside it.
pub(super) fn resolve<'a>(regions: &'a RegionTable<Region>, sg: &DmaSg) -> Result<&'a Region> {
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
pub(super) fn check_sg<'a>(region: &'a Region, sg: &DmaSg) -> Result<&'a Region> {
    check_range(region.len, region.prot, sg).map(|()| region)
}

/// Whether `sg` fits a region of `len` bytes and protection `prot`.
#[inline]
pub(super) fn check_range(len: u64, prot: i32, sg: &DmaSg) -> Result<()> {
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
pub(super) fn names_region(h: &Hint, sg: &DmaSg, generation: u64) -> bool {
    h.generation != 0
        && h.generation == generation
        && h.id == sg.region
        && h.start == sg.dma_addr as usize as u64
}

#[inline]
pub(super) fn fill_sg(
    sg: &mut DmaSg,
    region_start: u64,
    id: usize,
    addr: u64,
    len: u64,
    prot: i32,
) {
    fill_sg_hinted(sg, region_start, id, addr, len, prot, 0);
}

#[inline]
pub(super) fn fill_sg_hinted(
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
    /// table, `snap.rs`), a non-empty range inside one region that
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
        fn local(v: &snap::View<'_>, sg: &DmaSg) -> Option<usize> {
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
    pub(super) fn addr_to_sgl_cached(
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
    pub(super) fn sgl_get_cached(&self, sgl: &[DmaSg], iov: &mut [libc::iovec]) -> Result<()> {
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
    pub(super) fn sgl_mark_dirty_logging(&self, sgl: &[DmaSg]) {
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
}

/// Walks the regions covering `[iova, iova + len)`, filling `sgl` as far as
/// it goes, and returns the number of entries the whole range needs.
pub(super) fn translate(
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
