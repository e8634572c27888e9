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
    /// hashing. Fills `sg` and returns
    /// true; false when the full path (`DmaController::addr_to_sgl`) must
    /// answer, errors included (`sg` may then hold anything).
    #[inline(always)]
    pub fn translate(&self, iova: u64, len: u64, sg: &mut DmaSg, prot: i32) -> bool {
        let Some((state, n)) = self.begin() else {
            return false;
        };
        let i = self.search(n, iova);
        self.translate_in(i, state, iova, len, sg, prot)
    }

    /// [`Self::translate`] in a copy of one entry (SPDK's usual case), read
    /// at `state`, for which [`Snapshot::single`] holds: no search. When it
    /// returns false, the address asked for is `sg.dma_addr + sg.offset`
    /// (wrapping), so that the caller needs not keep it in a register.
    #[inline(always)]
    pub fn translate_one(
        &self,
        state: u64,
        iova: u64,
        len: u64,
        sg: &mut DmaSg,
        prot: i32,
    ) -> bool {
        self.translate_in(0, state, iova, len, sg, prot)
    }

    /// [`Self::translate`] in entry `i` (`i < CAPACITY`), the one whose
    /// start is the last at or below `iova`, of a copy read at `state`.
    #[inline(always)]
    fn translate_in(
        &self,
        i: usize,
        state: u64,
        iova: u64,
        len: u64,
        sg: &mut DmaSg,
        prot: i32,
    ) -> bool {
        // `sg` is filled as the values arrive, so that each dies at once
        // (a C call leaves few registers); on a failed check the full path
        // fills it again. The first address and the offset are stored
        // before any check (see `translate_one`).
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
        if prot as u64 & slot.nowrite.load(Ordering::Relaxed) != 0 {
            return false;
        }
        sg.writeable = prot & libc::PROT_WRITE != 0;
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
        // identifier 0, nothing to hand out), and no live entry has
        // identifier 0, so a wrong hint finds a slot whose identity check
        // below fails.
        let state = self.stable()?;
        let slot = self.slot(usize::from(sg.hint));
        if !slot.is(sg.dma_addr as usize as u64, sg.region) {
            return None;
        }
        // What the entry may be handed: 0 when the region is not mapped,
        // or the entry asks to write and the region is read-only; so one
        // bounds check covers all three.
        let have = slot.get_len[usize::from(sg.writeable)].load(Ordering::Relaxed);
        // offset < have and 1 <= length <= have - offset (a zero length
        // wraps to u64::MAX), without overflow.
        let room = match have.checked_sub(sg.offset) {
            Some(r) if r > 0 => r,
            _ => return None,
        };
        if sg.length.wrapping_sub(1) >= room {
            return None;
        }
        // Loaded last, as it is needed last (registers again).
        let vaddr = slot.vaddr.load(Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::snap::Entry;
    use super::*;

    const W: i32 = libc::PROT_WRITE;
    const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

    fn entry(start: u64, len: u64, id: usize, vaddr: usize, prot: i32) -> Entry {
        Entry {
            start,
            len,
            id,
            vaddr,
            prot,
            slot: 0,
        }
    }

    /// `Snapshot::translate`'s answer; for a copy of one entry, checked
    /// against `translate_one`'s, which must leave the address asked for in
    /// the entry when it refuses.
    fn translated(snap: &Snapshot, iova: u64, len: u64, prot: i32) -> Option<DmaSg> {
        let mut sg = DmaSg::default();
        let found = snap.translate(iova, len, &mut sg, prot);
        let state = snap.state();
        if Snapshot::single(state) {
            let mut one = DmaSg::default();
            assert_eq!(snap.translate_one(state, iova, len, &mut one, prot), found);
            if found {
                assert_eq!(format!("{one:?}"), format!("{sg:?}"));
            } else {
                assert_eq!((one.dma_addr as u64).wrapping_add(one.offset), iova);
            }
        }
        found.then_some(sg)
    }

    #[test]
    fn one_entry_and_several_answer_alike_on_the_fast_path() {
        // The single-entry path (slot 0, no search) and the searched one
        // answer every case themselves, and refuse the same ones (the
        // helper compares the two with one entry).
        let a = entry(0x1_0000, 0x4000, 7, 0x7000_0000, libc::PROT_READ);
        let below = entry(0x1000, 0x1000, 3, 0x6000_0000, RW);
        for table in [vec![a], vec![below, a]] {
            let snap = Snapshot::new();
            snap.publish(table.len(), table.iter().copied());
            let sg = translated(&snap, 0x1_3ff8, 8, libc::PROT_READ).expect("inside");
            assert_eq!(
                (sg.dma_addr as u64, sg.region, sg.offset, sg.length),
                (0x1_0000, 7, 0x3ff8, 8)
            );
            assert_eq!(usize::from(sg.hint), table.len() - 1);
            assert!(!sg.writeable);
            assert_eq!(snap.sg_addr(&sg), Some(0x7000_3ff8 as *mut c_void));
            for (iova, len, prot) in [
                (0x1_3ff8, 9, libc::PROT_READ), // crosses the end
                (0x1_4000, 1, libc::PROT_READ), // past the end
                (0x1_0000, 0, libc::PROT_READ), // empty
                (0x1_0000, 8, W),               // read-only
            ] {
                assert!(translated(&snap, iova, len, prot).is_none(), "{iova:#x}");
            }
            // Below the region: nothing with one entry, the lower one
            // with two.
            let low = translated(&snap, 0x1ff8, 8, RW).map(|sg| sg.region);
            assert_eq!(low, (table.len() == 2).then_some(3));
            // Each field of the entry is checked by sgl_get's fast path.
            for bad in [
                DmaSg {
                    writeable: true,
                    ..sg
                },
                DmaSg { length: 0, ..sg },
                DmaSg { length: 9, ..sg },
                DmaSg {
                    offset: 0x4000,
                    length: 1,
                    ..sg
                },
                DmaSg {
                    offset: u64::MAX,
                    ..sg
                },
                DmaSg { region: 8, ..sg },
                DmaSg {
                    dma_addr: 0x1_0001 as *mut c_void,
                    ..sg
                },
                DmaSg {
                    hint: sg.hint ^ 1,
                    ..sg
                },
            ] {
                assert_eq!(snap.sg_addr(&bad), None, "{bad:?}");
            }
        }
    }

    #[test]
    fn unmapped_and_read_only_regions_hand_out_nothing_to_write() {
        // A region without a local mapping translates, but its entries get
        // no address; a read-only one gives addresses only to readers.
        let snap = Snapshot::new();
        let table = [
            entry(0x1000, 0x1000, 1, 0, RW),
            entry(0x2000, 0x1000, 2, 0x5000_0000, libc::PROT_READ),
            entry(0x3000, 0x1000, 3, 0x6000_0000, RW),
        ];
        snap.publish(3, table.iter().copied());
        let unmapped = translated(&snap, 0x1000, 8, RW).unwrap();
        assert_eq!(snap.sg_addr(&unmapped), None);
        let ro = translated(&snap, 0x2010, 8, libc::PROT_READ).unwrap();
        assert_eq!(snap.sg_addr(&ro), Some(0x5000_0010 as *mut c_void));
        assert_eq!(
            snap.sg_addr(&DmaSg {
                writeable: true,
                ..ro
            }),
            None
        );
        let rw = translated(&snap, 0x3ff0, 16, RW).unwrap();
        assert!(rw.writeable);
        assert_eq!(snap.sg_addr(&rw), Some(0x6000_0ff0 as *mut c_void));
        // A table where the region moved: its slot is cleared, and the
        // hint finds nothing (the searched path then finds it).
        snap.publish(2, table[1..].iter().copied());
        assert_eq!(snap.sg_addr(&rw), None);
    }
}
