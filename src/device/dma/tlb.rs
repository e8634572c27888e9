use super::*;

/// A region as a thread's translation cache remembers it.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
pub(super) struct Hint {
    pub(super) generation: u64,
    pub(super) start: u64,
    pub(super) len: u64,
    pub(super) id: usize,
    pub(super) prot: i32,
    /// Local address of the region when it is mmap'ed, else 0.
    pub(super) vaddr: usize,
    /// The region itself. Only dereferenced with the table's read lock held
    /// and `generation` current, which proves the region is still there.
    pub(super) region: *const Region,
}

impl Hint {
    pub(super) const EMPTY: Hint = Hint {
        generation: 0,
        start: 0,
        len: 0,
        id: 0,
        prot: 0,
        vaddr: 0,
        region: std::ptr::null(),
    };

    pub(super) fn of(region: &Region, generation: u64) -> Hint {
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
pub(super) const TLB_SET_BITS: u32 = 10;
/// Addresses in the same 4 KiB granule share a cache set.
pub(super) const TLB_GRANULE_SHIFT: u32 = 12;

/// One set of the translation cache: two entries, the most recently filled
/// first, in two adjacent cache lines.
#[repr(C, align(128))]
pub(super) struct TlbSet([Cell<Hint>; 2]);

/// What each thread keeps for DMA: its translation cache and its handle for
/// entering the read-side sections of the lock-free access paths.
pub(super) struct ThreadCache {
    pub(super) sets: Box<[TlbSet]>,
    pub(super) reader: rcu::Reader,
}

thread_local! {
    /// Each thread's translation cache: a two-way set-associative table of
    /// the regions it translated into recently, indexed by a hash of the
    /// address's granule (a software TLB). Allocated on a thread's first
    /// translation, so threads that never do DMA pay nothing.
    pub(super) static TLB: ThreadCache = ThreadCache {
        sets: (0..1usize << TLB_SET_BITS)
            .map(|_| TlbSet([Cell::new(Hint::EMPTY), Cell::new(Hint::EMPTY)]))
            .collect(),
        reader: rcu::Reader::new(),
    };
}

pub(super) fn tlb_set_index(iova: u64) -> usize {
    // Fibonacci hashing: regions laid out with any power-of-two stride still
    // spread over the whole table.
    ((iova >> TLB_GRANULE_SHIFT).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - TLB_SET_BITS))
        as usize
}

impl ThreadCache {
    /// The entry of `iova`'s set that satisfies `hit`, if any. Both entries
    /// are read before either is tested, so that their loads overlap.
    #[inline]
    pub(super) fn find(&self, iova: u64, hit: impl Fn(&Hint) -> bool) -> Option<Hint> {
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
    pub(super) fn insert(&self, iova: u64, hint: Hint) {
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
pub(super) fn tlb_find(iova: u64, hit: impl Fn(&Hint) -> bool) -> Option<Hint> {
    TLB.try_with(|t| t.find(iova, hit)).ok().flatten()
}

pub(super) fn tlb_set(iova: u64, hint: Hint) {
    // During thread teardown the cache may be gone: then nothing is cached.
    let _ = TLB.try_with(|t| t.insert(iova, hint));
}

impl DmaController {
    /// This thread's cached translation of `sg`'s region, when current. Call
    /// with the table's read lock held.
    pub(super) fn cached(&self, sg: &DmaSg) -> Option<Hint> {
        TLB.try_with(|t| self.cached_in(t, sg)).ok().flatten()
    }

    /// [`Self::cached`] in the cache `t` (this thread's).
    #[inline]
    pub(super) fn cached_in(&self, t: &ThreadCache, sg: &DmaSg) -> Option<Hint> {
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
    pub(super) fn cached_mapping(&self, sg: &DmaSg) -> Option<Result<(usize, i32, u64)>> {
        TLB.try_with(|t| self.cached_mapping_in(t, sg))
            .ok()
            .flatten()
    }

    /// [`Self::cached_mapping`] in the cache `t` (this thread's).
    #[inline]
    pub(super) fn cached_mapping_in(
        &self,
        t: &ThreadCache,
        sg: &DmaSg,
    ) -> Option<Result<(usize, i32, u64)>> {
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
    pub(super) fn with_cached_mapping(
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
                            && self.snap.logging_page_size.load(Ordering::Relaxed) != 0)
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
                    && self.snap.logging_page_size.load(Ordering::Relaxed) != 0)
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
    pub(super) fn resolve_cached<'a>(&self, inner: &'a Inner, sg: &DmaSg) -> Result<&'a Region> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::dma::test_util::*;

    const PROT_RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

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
}
