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
            if self.snap.translate(iova, len, first, prot) {
                return Ok(1);
            }
        }
        self.addr_to_sgl_cached(iova, len, sgl, prot)
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
            let Some(addr) = self
                .snap
                .sg_addr(sg)
                .or_else(|| self.snap.sg_addr_searched(sg))
            else {
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
        if self.snap.logging() {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::dma::test_util::*;
    use std::time::Instant;

    const PROT_RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

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
        // Up to snap::CAPACITY regions the lock-free copy answers; past
        // it the other paths do. Every answer must match the table, across
        // the switch both ways, and a wrong or stale slot hint must never
        // resolve to another region.
        let n = snap::CAPACITY + 2;
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
        // Entries made up to match an empty slot (identifier 0, start
        // u64::MAX) find nothing, at every hint.
        for hint in 0..=u8::MAX {
            let empty = DmaSg {
                dma_addr: usize::MAX as *mut c_void,
                hint,
                ..DmaSg::default()
            };
            assert_eq!(dma.snap.sg_addr(&empty), None);
            assert_eq!(dma.sgl_get(&[empty], &mut iov), Err(Errno::EINVAL));
        }
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
}
