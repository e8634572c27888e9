//! The table behind the DMA controller: non-overlapping regions owned in
//! IOVA order, with an index that finds the region containing an address
//! without walking a tree in the common case.
//!
//! * `by_start` owns every region and keeps them ordered by first IOVA: for
//!   overlap checks, iteration, and ranges that cross regions.
//! * Small regions (at most [`SMALL_PAGES`] 4 KiB pages, which is what a
//!   vIOMMU maps: one page or a few at a time, often tens of thousands of
//!   them) are also entered in a hash table under every page they touch, so
//!   that finding the region of an address costs one hash probe, not a tree
//!   walk through cold memory.
//! * Larger regions are few in practice (guest RAM blocks, ROMs) and are kept
//!   in a second, small ordered map for predecessor search.
//!
//! Regions are heap-allocated once and never move until removed, so the
//! index refers to them by pointer. This module is pure data-structure code
//! (no system calls), so it runs under Miri.

use std::collections::BTreeMap;
use std::ops::RangeBounds;
use std::ptr::NonNull;

/// What the table needs to know of a region: its first address and length
/// (non-zero, `start + len` not wrapping). Both must stay the same while the
/// region is in the table.
pub(crate) trait Span {
    /// First address.
    fn start(&self) -> u64;
    /// Length in bytes.
    fn len(&self) -> u64;
}

/// Granule of the page index.
const PAGE_SHIFT: u32 = 12;
/// Regions that touch at most this many pages are indexed page by page.
pub(crate) const SMALL_PAGES: u64 = 16;

/// Range of pages `[first, last]` a region touches.
fn pages_of<R: Span>(r: &R) -> (u64, u64) {
    let start = r.start();
    // `len > 0` and no wrap: guaranteed by the table's users.
    let last = start + (r.len() - 1);
    (start >> PAGE_SHIFT, last >> PAGE_SHIFT)
}

fn contains<R: Span>(r: &R, addr: u64) -> bool {
    addr >= r.start() && addr - r.start() < r.len()
}

/// Regions ordered by first address, with a fast containing-address lookup.
pub(crate) struct RegionTable<R> {
    by_start: BTreeMap<u64, NonNull<R>>,
    large: BTreeMap<u64, NonNull<R>>,
    pages: PageIndex<R>,
}

// SAFETY: the table owns its regions exactly like a `BTreeMap<u64, Box<R>>`
// would (every pointer comes from `Box::into_raw` and is freed once, by
// `remove`, `take_all` or `drop`); shared access only hands out `&R` and
// exclusive access `&mut R`. So it may cross and be shared between threads
// whenever `R` may.
unsafe impl<R: Send> Send for RegionTable<R> {}
// SAFETY: as above.
unsafe impl<R: Sync> Sync for RegionTable<R> {}

impl<R: Span> Default for RegionTable<R> {
    fn default() -> Self {
        Self::new()
    }
}

impl<R: Span> RegionTable<R> {
    /// An empty table.
    pub(crate) const fn new() -> Self {
        RegionTable {
            by_start: BTreeMap::new(),
            large: BTreeMap::new(),
            pages: PageIndex::new(),
        }
    }

    /// Number of regions.
    pub(crate) fn len(&self) -> usize {
        self.by_start.len()
    }

    fn region(&self, p: NonNull<R>) -> &R {
        // SAFETY: every pointer in the table's maps and index points to a
        // live region the table owns (see `insert`/`remove`); the `&self`
        // borrow keeps it alive and unchanged.
        unsafe { p.as_ref() }
    }

    /// Adds a region. The caller guarantees it overlaps no region already
    /// in the table (which also means no region starts at the same address).
    pub(crate) fn insert(&mut self, region: Box<R>) {
        let start = region.start();
        let (first, last) = pages_of(&*region);
        let p = NonNull::from(Box::leak(region));
        let old = self.by_start.insert(start, p);
        debug_assert!(old.is_none(), "overlapping DMA regions");
        if last - first < SMALL_PAGES {
            for page in first..=last {
                self.pages.insert(page, p);
            }
        } else {
            self.large.insert(start, p);
        }
    }

    /// Removes and returns the region starting at `start`.
    pub(crate) fn remove(&mut self, start: u64) -> Option<Box<R>> {
        let p = self.by_start.remove(&start)?;
        let (first, last) = pages_of(self.region(p));
        if last - first < SMALL_PAGES {
            for page in first..=last {
                self.pages.remove(page, p);
            }
        } else {
            self.large.remove(&start);
        }
        // SAFETY: `p` came from `Box::leak` in `insert` and is no longer
        // reachable from the table, so ownership goes back to a Box once.
        Some(unsafe { Box::from_raw(p.as_ptr()) })
    }

    /// Removes every region, returned in address order.
    pub(crate) fn take_all(&mut self) -> Vec<Box<R>> {
        self.large.clear();
        self.pages = PageIndex::new();
        std::mem::take(&mut self.by_start)
            .into_values()
            // SAFETY: as in `remove`: each pointer is owned by the table
            // once and no longer reachable from it.
            .map(|p| unsafe { Box::from_raw(p.as_ptr()) })
            .collect()
    }

    /// The region starting exactly at `start`.
    pub(crate) fn get(&self, start: u64) -> Option<&R> {
        self.by_start.get(&start).map(|&p| self.region(p))
    }

    /// The region starting exactly at `start`, for changes that keep its
    /// start and length.
    pub(crate) fn get_mut(&mut self, start: u64) -> Option<&mut R> {
        let p = *self.by_start.get(&start)?;
        // SAFETY: the table owns the region and `&mut self` makes this the
        // only reference to it for the borrow's duration.
        Some(unsafe { &mut *p.as_ptr() })
    }

    /// The region that contains `addr`.
    pub(crate) fn containing(&self, addr: u64) -> Option<&R> {
        if let Some(p) = self.pages.find(addr, |p| contains(self.region(p), addr)) {
            return Some(self.region(p));
        }
        let (_, &p) = self.large.range(..=addr).next_back()?;
        let r = self.region(p);
        contains(r, addr).then_some(r)
    }

    /// The region with the highest start below `end`, if any.
    pub(crate) fn last_starting_before(&self, end: u64) -> Option<&R> {
        self.by_start
            .range(..end)
            .next_back()
            .map(|(_, &p)| self.region(p))
    }

    /// Regions whose start lies in `range`, in order.
    pub(crate) fn range<B: RangeBounds<u64>>(&self, range: B) -> impl Iterator<Item = &R> + '_ {
        self.by_start.range(range).map(|(_, &p)| self.region(p))
    }

    /// All regions in order.
    pub(crate) fn values(&self) -> impl Iterator<Item = &R> + '_ {
        self.by_start.values().map(|&p| self.region(p))
    }

    /// All regions in order, for changes that keep their starts and lengths.
    pub(crate) fn values_mut(&mut self) -> impl Iterator<Item = &mut R> + '_ {
        self.by_start.values().map(|&p| {
            // SAFETY: the table owns each region, each appears once in
            // `by_start`, and `&mut self` is held for the iterator's life:
            // the references handed out are unique.
            unsafe { &mut *p.as_ptr() }
        })
    }
}

impl<R> Drop for RegionTable<R> {
    fn drop(&mut self) {
        for p in std::mem::take(&mut self.by_start).into_values() {
            // SAFETY: as in `remove`.
            drop(unsafe { Box::from_raw(p.as_ptr()) });
        }
    }
}

/// One slot of the page index: a page number and a region touching it.
struct Slot<R> {
    page: u64,
    region: Option<NonNull<R>>,
}

impl<R> Clone for Slot<R> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<R> Copy for Slot<R> {}

/// An open-addressing hash multimap from page number to the regions that
/// touch the page (usually one; several small unaligned regions may share a
/// page). Linear probing, kept at most half full, with backward-shift
/// deletion (no tombstones, so lookups never slow down with churn).
struct PageIndex<R> {
    slots: Vec<Slot<R>>,
    used: usize,
}

const MIN_SLOTS: usize = 16;

impl<R> PageIndex<R> {
    const fn new() -> Self {
        PageIndex {
            slots: Vec::new(),
            used: 0,
        }
    }

    fn mask(&self) -> usize {
        self.slots.len() - 1
    }

    fn home(&self, page: u64) -> usize {
        // Fibonacci hashing, top bits: any stride of pages spreads out.
        let bits = self.slots.len().trailing_zeros();
        (page.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - bits)) as usize
    }

    /// A region indexed under the page of `addr` for which `pick` says yes.
    fn find(&self, addr: u64, mut pick: impl FnMut(NonNull<R>) -> bool) -> Option<NonNull<R>> {
        if self.slots.is_empty() {
            return None;
        }
        let page = addr >> PAGE_SHIFT;
        let mask = self.mask();
        let mut i = self.home(page);
        loop {
            let s = self.slots[i];
            let region = s.region?;
            if s.page == page && pick(region) {
                return Some(region);
            }
            i = (i + 1) & mask;
        }
    }

    fn insert(&mut self, page: u64, region: NonNull<R>) {
        if (self.used + 1) * 2 > self.slots.len() {
            self.resize((self.slots.len() * 2).max(MIN_SLOTS));
        }
        self.place(page, region);
        self.used += 1;
    }

    /// Puts an entry in the first free slot of its probe sequence (there is
    /// always one: the table is at most half full).
    fn place(&mut self, page: u64, region: NonNull<R>) {
        let mask = self.mask();
        let mut i = self.home(page);
        while self.slots[i].region.is_some() {
            i = (i + 1) & mask;
        }
        self.slots[i] = Slot {
            page,
            region: Some(region),
        };
    }

    fn remove(&mut self, page: u64, region: NonNull<R>) {
        if self.slots.is_empty() {
            return;
        }
        let mask = self.mask();
        let mut i = self.home(page);
        loop {
            let s = self.slots[i];
            match s.region {
                None => return, // not present (cannot happen for a table entry)
                Some(r) if r == region && s.page == page => break,
                Some(_) => i = (i + 1) & mask,
            }
        }
        // Backward-shift deletion: pull later entries of the same cluster
        // into the hole when their home slot allows it.
        let mut hole = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let s = self.slots[j];
            if s.region.is_none() {
                break;
            }
            let home = self.home(s.page);
            // `s` may move to `hole` if `hole` lies cyclically in [home, j).
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = s;
                hole = j;
            }
        }
        self.slots[hole].region = None;
        self.used -= 1;
        if self.slots.len() > MIN_SLOTS && self.used * 8 < self.slots.len() {
            self.resize(self.slots.len() / 2);
        }
    }

    fn resize(&mut self, n: usize) {
        let old = std::mem::replace(
            &mut self.slots,
            vec![
                Slot {
                    page: 0,
                    region: None,
                };
                n
            ],
        );
        for s in old {
            if let Some(r) = s.region {
                self.place(s.page, r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq)]
    struct R {
        start: u64,
        len: u64,
        tag: u32,
    }

    impl Span for R {
        fn start(&self) -> u64 {
            self.start
        }
        fn len(&self) -> u64 {
            self.len
        }
    }

    fn r(start: u64, len: u64, tag: u32) -> Box<R> {
        Box::new(R { start, len, tag })
    }

    fn tag(t: &RegionTable<R>, addr: u64) -> Option<u32> {
        t.containing(addr).map(|r| r.tag)
    }

    const P: u64 = 4096;

    #[test]
    fn small_large_and_shared_pages() {
        let mut t: RegionTable<R> = RegionTable::new();
        assert_eq!(tag(&t, 0), None);
        // Two small regions sharing one page, one crossing a page boundary,
        // one large region, one at the very top of the address space.
        t.insert(r(0x1000, 0x800, 1));
        t.insert(r(0x1800, 0x1000, 2));
        t.insert(r(0x10_0000, SMALL_PAGES * P + 1, 3));
        t.insert(r(u64::MAX - P + 1, P, 4));
        t.insert(r(0x4000, SMALL_PAGES * P, 5));
        assert_eq!(t.len(), 5);
        for (addr, want) in [
            (0xfff, None),
            (0x1000, Some(1)),
            (0x17ff, Some(1)),
            (0x1800, Some(2)),
            (0x2000, Some(2)),
            (0x27ff, Some(2)),
            (0x2800, None),
            (0x4000, Some(5)),
            (0x4000 + SMALL_PAGES * P - 1, Some(5)),
            (0x4000 + SMALL_PAGES * P, None),
            (0xf_ffff, None),
            (0x10_0000, Some(3)),
            (0x10_0000 + SMALL_PAGES * P, Some(3)),
            (0x10_0000 + SMALL_PAGES * P + 1, None),
            (u64::MAX, Some(4)),
            (u64::MAX - P, None),
        ] {
            assert_eq!(tag(&t, addr), want, "{addr:#x}");
        }
        let order: Vec<u32> = t.values().map(|r| r.tag).collect();
        assert_eq!(order, [1, 2, 5, 3, 4]);
        assert_eq!(t.last_starting_before(0x1800).map(|r| r.tag), Some(1));
        assert_eq!(t.range(0x1800..0x10_0001).count(), 3);
        assert_eq!(t.get(0x1800).map(|r| r.tag), Some(2));
        assert!(t.get(0x1801).is_none());

        assert_eq!(t.remove(0x1000).map(|r| r.tag), Some(1));
        assert_eq!(tag(&t, 0x1000), None);
        assert_eq!(tag(&t, 0x1800), Some(2));
        assert_eq!(t.remove(0x10_0000).map(|r| r.tag), Some(3));
        assert_eq!(tag(&t, 0x10_0000), None);
        assert!(t.remove(0x10_0000).is_none());
        t.get_mut(0x1800).unwrap().tag = 20;
        for r in t.values_mut() {
            r.tag += 100;
        }
        assert_eq!(tag(&t, 0x2000), Some(120));
        let all: Vec<u32> = t.take_all().into_iter().map(|r| r.tag).collect();
        assert_eq!(all, [120, 105, 104]);
        assert_eq!(t.len(), 0);
        assert_eq!(tag(&t, 0x2000), None);
    }

    #[test]
    fn churn_matches_a_model() {
        // Random inserts and removals of small and large regions on a grid
        // of slots (so they never overlap), checked against a plain list.
        let mut t: RegionTable<R> = RegionTable::new();
        let mut model: Vec<Option<(u64, u64)>> = vec![None; 64];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let steps = if cfg!(miri) { 300 } else { 20_000 };
        for step in 0..steps {
            let slot = (next() % 64) as usize;
            let base = slot as u64 * 64 * P;
            match model[slot] {
                Some((start, _)) => {
                    assert_eq!(t.remove(start).map(|r| r.start), Some(start));
                    model[slot] = None;
                }
                None => {
                    let start = base + next() % (8 * P);
                    let len = 1 + next() % (if step % 3 == 0 { 40 * P } else { 3 * P });
                    t.insert(r(start, len, slot as u32));
                    model[slot] = Some((start, len));
                }
            }
            for _ in 0..8 {
                let addr = next() % (64 * 64 * P);
                let want = model
                    .iter()
                    .enumerate()
                    .find(|(_, m)| m.is_some_and(|(s, l)| addr >= s && addr - s < l))
                    .map(|(i, _)| i as u32);
                assert_eq!(tag(&t, addr), want, "step {step} addr {addr:#x}");
            }
        }
        assert_eq!(t.len(), model.iter().flatten().count());
        // Dropping the table frees what is left (Miri checks for leaks).
    }

    #[test]
    fn index_grows_and_shrinks() {
        let mut t: RegionTable<R> = RegionTable::new();
        let n = if cfg!(miri) { 200 } else { 5000 };
        for i in 0..n {
            t.insert(r(i * 2 * P, P, i as u32));
        }
        let grown = t.pages.slots.len();
        assert!(grown >= 2 * n as usize);
        for i in 0..n {
            assert_eq!(tag(&t, i * 2 * P + 7), Some(i as u32));
            assert_eq!(tag(&t, i * 2 * P + P), None);
        }
        for i in 0..n - 1 {
            assert!(t.remove(i * 2 * P).is_some());
        }
        assert!(t.pages.slots.len() < grown / 8);
        assert_eq!(tag(&t, (n - 1) * 2 * P), Some(n as u32 - 1));
    }
}
