//! A lock-free copy of a small DMA region table, for the per-I/O paths.
//!
//! Devices like SPDK's NVMe-oF target see a handful of large regions (the
//! guest's RAM blocks) and translate a random address inside them on every
//! I/O, from several threads. For them a translation should be a few
//! compares, touching no lock and writing no shared cache line. So, while a
//! controller has at most [`CAPACITY`] regions, it keeps this copy of what
//! the fast paths need of each (first address, length, identifier, local
//! address, protection), sorted by first address, behind a sequence lock:
//!
//! * The writer (`publish`, called with the table's write lock held, after
//!   every change to the table) makes the sequence odd, rewrites the
//!   entries, and makes it even again.
//! * A reader loads the sequence, searches the entries, and keeps its answer
//!   only if the sequence was even and has not changed by the end. Else the
//!   caller takes its locked path, which is always right.
//!
//! Every field is an atomic read with `Relaxed` ordering (a plain load on
//! the usual targets), so a reader racing the writer reads torn values but
//! never has a data race, and discards what it read. With more than
//! [`CAPACITY`] regions the copy is marked absent and the controller's other
//! caches take over.
//!
//! What a reader gets is exactly what its locked path would have answered
//! at one instant between the reader's first and last load: the same
//! guarantee a cached translation gives (see `dma.rs`). The local addresses
//! it hands out are never dereferenced here.

use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};

/// Most regions the copy holds; with more, it is marked absent.
pub(crate) const CAPACITY: usize = 64;
// The search in `View::last_at_or_before` takes the steps of 64 entries.
const _: () = assert!(CAPACITY == 64);

/// `count` when the copy is absent (too many regions).
const ABSENT: usize = usize::MAX;

/// One region as the fast paths see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub start: u64,
    pub len: u64,
    pub id: usize,
    /// Local address of the first byte when the region is mapped, else 0.
    pub vaddr: usize,
    pub prot: i32,
    /// Position in the copy (filled in by readers; ignored by `publish`).
    pub slot: u8,
}

/// The rest of an entry beside its start (kept apart for the search).
struct Slot {
    len: AtomicU64,
    id: AtomicUsize,
    vaddr: AtomicUsize,
    prot: AtomicU64,
}

/// The copy of a small region table; see the module documentation.
pub(crate) struct Snapshot {
    /// Even: the entries are consistent. Odd: being rewritten.
    seq: AtomicU64,
    /// Number of entries, or [`ABSENT`].
    count: AtomicUsize,
    /// First addresses, ascending; only the first `count` are meaningful.
    starts: [AtomicU64; CAPACITY],
    slots: [Slot; CAPACITY],
}

/// A consistent-until-checked view of the entries, handed to readers.
pub(crate) struct View<'a> {
    snap: &'a Snapshot,
    n: usize,
}

impl View<'_> {
    /// The entry at index `i` (`i < n`).
    #[inline(always)]
    fn entry(&self, i: usize) -> Entry {
        let s = &self.snap.slots[i];
        Entry {
            start: self.snap.starts[i].load(Ordering::Relaxed),
            len: s.len.load(Ordering::Relaxed),
            id: s.id.load(Ordering::Relaxed),
            vaddr: s.vaddr.load(Ordering::Relaxed),
            prot: s.prot.load(Ordering::Relaxed) as i32,
            // i < CAPACITY <= 256.
            slot: i as u8,
        }
    }

    /// Index of the last entry starting at or before `addr` (0 when none
    /// does): a binary search in a fixed number of steps, without branches
    /// on the data (random addresses would mispredict them). `n > 0`.
    #[inline(always)]
    fn last_at_or_before(&self, addr: u64) -> usize {
        let n = self.n;
        if n == 1 {
            return 0;
        }
        // Straight-line steps, not a loop: in a loop the compiler turns the
        // conditional moves back into branches.
        let mut i = 0usize;
        macro_rules! step {
            ($s:expr) => {
                let j = i + $s;
                // `j % CAPACITY` only spares a bounds check: a `j` past the
                // entries is refused by `j < n` anyway.
                let start = self.snap.starts[j % CAPACITY].load(Ordering::Relaxed);
                let take = j < n && start <= addr;
                i += $s & usize::from(take).wrapping_neg();
            };
        }
        // Steps no smaller than `n` could never be taken: skipped, on a
        // branch that goes the same way for every lookup in a table.
        if n > 32 {
            step!(32);
        }
        if n > 16 {
            step!(16);
        }
        if n > 8 {
            step!(8);
        }
        if n > 4 {
            step!(4);
        }
        if n > 2 {
            step!(2);
        }
        step!(1);
        i
    }

    /// The entry containing `addr`, if any.
    #[inline(always)]
    pub fn containing(&self, addr: u64) -> Option<Entry> {
        if self.n == 0 {
            return None;
        }
        let e = self.entry(self.last_at_or_before(addr));
        // `addr - start < len` also rejects an address below the first entry.
        (addr >= e.start && addr - e.start < e.len).then_some(e)
    }

    /// The entry that starts exactly at `start` and has identifier `id`,
    /// looked for first at position `hint` (where a translation found it),
    /// then searched.
    #[inline(always)]
    pub fn named(&self, start: u64, id: usize, hint: u8) -> Option<Entry> {
        let hint = usize::from(hint);
        if hint < self.n {
            let e = self.entry(hint % CAPACITY);
            if e.start == start && e.id == id {
                return Some(e);
            }
        }
        if self.n == 0 {
            return None;
        }
        let e = self.entry(self.last_at_or_before(start));
        (e.start == start && e.id == id).then_some(e)
    }
}

impl Snapshot {
    /// An empty copy (no regions: consistent and present).
    pub fn new() -> Self {
        Snapshot {
            seq: AtomicU64::new(0),
            count: AtomicUsize::new(0),
            starts: std::array::from_fn(|_| AtomicU64::new(0)),
            slots: std::array::from_fn(|_| Slot {
                len: AtomicU64::new(0),
                id: AtomicUsize::new(0),
                vaddr: AtomicUsize::new(0),
                prot: AtomicU64::new(0),
            }),
        }
    }

    /// Replaces the copy with the `n` regions `entries` yields (in ascending
    /// order of start), or marks it absent when `n` exceeds [`CAPACITY`]
    /// (then `entries` is not consumed). The caller must exclude other
    /// writers (it holds the table's write lock).
    pub fn publish(&self, n: usize, entries: impl Iterator<Item = Entry>) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        // Readers that see any store below also see the odd sequence.
        fence(Ordering::Release);
        if n > CAPACITY {
            self.count.store(ABSENT, Ordering::Relaxed);
        } else {
            let mut written = 0;
            for (i, e) in entries.take(n).enumerate() {
                self.starts[i].store(e.start, Ordering::Relaxed);
                let slot = &self.slots[i];
                slot.len.store(e.len, Ordering::Relaxed);
                slot.id.store(e.id, Ordering::Relaxed);
                slot.vaddr.store(e.vaddr, Ordering::Relaxed);
                slot.prot.store(e.prot as u32 as u64, Ordering::Relaxed);
                written += 1;
            }
            self.count.store(written, Ordering::Relaxed);
        }
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// Runs `f` on a view of the entries and returns its answer if the view
    /// was consistent throughout; `None` when the copy is absent or was being
    /// rewritten (the caller then takes its locked path). `f` may run on
    /// torn entries: it must only compute, and its answer is thrown away
    /// unless the check afterwards passes.
    #[inline(always)]
    pub fn read<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> Option<R> {
        let s = self.seq.load(Ordering::Acquire);
        if s & 1 != 0 {
            return None;
        }
        let n = self.count.load(Ordering::Relaxed);
        if n > CAPACITY {
            return None;
        }
        let r = f(&View { snap: self, n });
        // Orders the loads above before the check below (seqlock reader).
        fence(Ordering::Acquire);
        (self.seq.load(Ordering::Relaxed) == s).then_some(r)
    }
}

impl Snapshot {
    /// [`Self::read`], also returning the sequence the answer holds for,
    /// for [`Self::unchanged`] to check later.
    #[inline(always)]
    pub fn read_at<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> Option<(R, u64)> {
        let s = self.seq.load(Ordering::Acquire);
        self.read(f).map(|r| (r, s))
    }

    /// Whether the copy is still as it was at sequence `seq` (from
    /// [`Self::read_at`]). Inside a read-side section (`rcu.rs`), a true
    /// answer means that no change published since `seq` (a removal) can
    /// complete its `synchronize` before the section ends.
    #[inline(always)]
    pub fn unchanged(&self, seq: u64) -> bool {
        self.seq.load(Ordering::Relaxed) == seq
    }
}

impl Default for Snapshot {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(start: u64, len: u64, id: usize) -> Entry {
        Entry {
            start,
            len,
            id,
            vaddr: start as usize + 1,
            prot: 3,
            slot: 0,
        }
    }

    #[test]
    fn lookups_in_every_size() {
        let snap = Snapshot::new();
        assert_eq!(snap.read(|v| v.containing(0)), Some(None));
        for n in [1usize, 2, 3, 4, 7, 63, 64] {
            let regions: Vec<Entry> = (0..n as u64)
                .map(|i| Entry {
                    slot: i as u8,
                    ..e(0x1000 + i * 0x10_0000, 0x1000 * (i + 1), i as usize + 1)
                })
                .collect();
            snap.publish(n, regions.iter().copied());
            for r in &regions {
                for a in [r.start, r.start + r.len / 2, r.start + r.len - 1] {
                    assert_eq!(
                        snap.read(|v| v.containing(a)),
                        Some(Some(*r)),
                        "n={n} a={a:#x}"
                    );
                }
                assert_eq!(snap.read(|v| v.containing(r.start + r.len)), Some(None));
                // Found with the right hint, a wrong one, or one out of range.
                for hint in [r.slot, r.slot.wrapping_add(1), 200] {
                    assert_eq!(snap.read(|v| v.named(r.start, r.id, hint)), Some(Some(*r)));
                    assert_eq!(
                        snap.read(|v| v.named(r.start, r.id + 1000, hint)),
                        Some(None)
                    );
                    assert_eq!(snap.read(|v| v.named(r.start + 1, r.id, hint)), Some(None));
                }
            }
            assert_eq!(snap.read(|v| v.containing(0xfff)), Some(None));
            assert_eq!(snap.read(|v| v.containing(u64::MAX)), Some(None));
        }
    }

    #[test]
    fn too_many_regions_make_it_absent() {
        let snap = Snapshot::new();
        snap.publish(
            CAPACITY + 1,
            std::iter::from_fn(|| -> Option<Entry> { panic!("must not be consumed") }),
        );
        assert_eq!(snap.read(|v| v.containing(0)), None);
        snap.publish(1, [e(0, 0x1000, 9)].into_iter());
        assert_eq!(
            snap.read(|v| v.containing(5)).flatten().map(|x| x.id),
            Some(9)
        );
    }

    #[test]
    fn readers_racing_a_writer_see_whole_tables_or_nothing() {
        // Two alternating tables; every consistent answer must come from one
        // of them, never a mix.
        let snap = std::sync::Arc::new(Snapshot::new());
        let a: Vec<Entry> = (0..4)
            .map(|i| Entry {
                slot: i as u8,
                ..e(i * 0x10000, 0x8000, 10 + i as usize)
            })
            .collect();
        let b: Vec<Entry> = (0..4)
            .map(|i| Entry {
                slot: i as u8,
                ..e(i * 0x10000, 0x4000, 20 + i as usize)
            })
            .collect();
        snap.publish(4, a.iter().copied());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let w = {
            let (snap, stop, a, b) = (snap.clone(), stop.clone(), a.clone(), b.clone());
            std::thread::spawn(move || {
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) && i < if cfg!(miri) { 50 } else { 200_000 } {
                    let t = if i % 2 == 0 { &b } else { &a };
                    snap.publish(4, t.iter().copied());
                    i += 1;
                }
            })
        };
        let rounds = if cfg!(miri) { 50 } else { 200_000 };
        for k in 0..rounds {
            let addr = (k % 4) as u64 * 0x10000 + 0x100;
            if let Some(found) = snap.read(|v| v.containing(addr)) {
                let x = found.expect("the address is in both tables");
                assert!(a.contains(&x) || b.contains(&x), "torn entry {x:?}");
            }
        }
        stop.store(true, Ordering::Relaxed);
        w.join().unwrap();
    }
}
