use super::*;

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

/// Atomically sets bits `[first, last)` of `words`, clipped to its size.
pub(super) fn set_bits(words: &[AtomicU64], first: u64, last: u64) {
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
pub(super) fn zeroed_words(n: usize) -> Result<Box<[AtomicU64]>> {
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

pub(super) fn dirty_bitmap_for(len: u64, page_size: u64) -> Result<Box<[AtomicU64]>> {
    let pages = len.div_ceil(page_size);
    let words = usize::try_from(pages.div_ceil(64)).map_err(|_| Errno::ENOMEM)?;
    zeroed_words(words)
}

/// Takes (and clears) a server bitmap word; words past the end read as 0.
pub(super) fn take_word(words: &[AtomicU64], i: usize) -> u64 {
    match words.get(i) {
        // Skipping the swap for clean words is racy but harmless: a bit set
        // just after the load is reported next time.
        Some(w) if w.load(Ordering::Relaxed) != 0 => w.swap(0, Ordering::Acquire),
        _ => 0,
    }
}

/// Gathers bits 0, 2, 4, ... of `x` into bits 0..32.
pub(super) fn compress_even(mut x: u64) -> u64 {
    x &= 0x5555_5555_5555_5555;
    x = (x | (x >> 1)) & 0x3333_3333_3333_3333;
    x = (x | (x >> 2)) & 0x0f0f_0f0f_0f0f_0f0f;
    x = (x | (x >> 4)) & 0x00ff_00ff_00ff_00ff;
    x = (x | (x >> 8)) & 0x0000_ffff_0000_ffff;
    (x | (x >> 16)) & 0x0000_0000_ffff_ffff
}

/// Spreads bits 0..32 of `x` to bits 0, 2, 4, ....
pub(super) fn spread_even(mut x: u64) -> u64 {
    x &= 0x0000_0000_ffff_ffff;
    x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
    x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
    x = (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    x = (x | (x << 2)) & 0x3333_3333_3333_3333;
    (x | (x << 1)) & 0x5555_5555_5555_5555
}

/// ORs each group of `2^k` adjacent bits into one bit (`64 >> k` results).
pub(super) fn squeeze(mut x: u64, k: u32) -> u64 {
    for _ in 0..k {
        x = compress_even(x | (x >> 1));
    }
    x
}

/// Repeats each of the low `64 >> k` bits `2^k` times.
pub(super) fn stretch(mut x: u64, k: u32) -> u64 {
    for _ in 0..k {
        let s = spread_even(x);
        x = s | (s << 1);
    }
    x
}

/// Produces the report bitmap `out` (a multiple of 8 bytes) from the
/// server bitmap `words` (logging page `server`, report page `client`, both
/// powers of two), clearing the server bits it consumes.
pub(super) fn harvest(words: &[AtomicU64], out: &mut [u8], server: u64, client: u64) {
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

impl DmaController {
    /// Marks the pages of `[iova, iova + len)` dirty in every logged region
    /// the range touches (for writes the server performs by other means).
    pub fn mark_dirty_range(&self, iova: u64, len: u64) {
        if len == 0 || !self.snap.logging() {
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
        self.snap
            .logging_page_size
            .store(page_size, Ordering::Release);
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
        self.snap.logging_page_size.store(0, Ordering::Release);
        Ok(())
    }

    /// Whether dirty page logging is on.
    pub fn logging_active(&self) -> bool {
        self.snap.logging()
    }

    /// The logging page size, when logging.
    pub fn logging_page_size(&self) -> Option<u64> {
        match self.snap.logging_page_size.load(Ordering::Acquire) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::dma::test_util::*;
    use std::time::Instant;

    const PROT_RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

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
        // The floor, timed in the same run and build: one pass writing each
        // byte of the bitmap (a report that did work per page, 8 per byte,
        // would cost several times more). A ratio, not a time, so that a
        // loaded machine slows both alike.
        let mut floor = std::time::Duration::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            for b in bm.iter_mut() {
                *b = std::hint::black_box(0xff);
            }
            floor = floor.min(t.elapsed());
        }
        let ratio = best.as_secs_f64() / floor.as_secs_f64();
        eprintln!(
            "64 GiB report: full {best:?}, empty {empty:?}, byte pass {floor:?}, ratio {ratio:.2}"
        );
        assert!(ratio < 2.0, "{best:?} against {floor:?}");
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
}
