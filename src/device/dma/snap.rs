//! A lock-free copy of a small DMA region table, for the per-I/O paths.
//!
//! Devices like SPDK's NVMe-oF target see a handful of large regions (the
//! guest's RAM blocks) and translate a random address inside them on every
//! I/O, from several threads. For them a translation should be a few
//! compares, touching no lock and writing no shared cache line. So, while a
//! controller has at most [`CAPACITY`] regions, it keeps this copy of what
//! the fast paths need of each (first address, length, identifier, local
//! address, protection, and what follows from them: see [`Slot`]), sorted
//! by first address, behind a sequence lock:
//!
//! * One word, `state`, holds the number of entries (low 7 bits), a
//!   "being rewritten" bit and a version above them, so that a reader learns
//!   all three with one load and one compare ([`Snapshot::begin`]).
//! * The writer (`publish`, called with the table's write lock held, after
//!   every change to the table) sets the rewriting bit, rewrites the
//!   entries, and stores the new count with the next version.
//! * A reader loads the state, reads the fields it needs, and keeps its
//!   answer only if the state has not changed by the end
//!   ([`Snapshot::valid`]). Else the caller takes its locked path, which is
//!   always right.
//!
//! Every field is an atomic read with `Relaxed` ordering (a plain load on
//! the usual targets), so a reader racing the writer reads torn values but
//! never has a data race, and discards what it read. With more than
//! [`CAPACITY`] regions the copy is marked absent and the controller's other
//! caches take over.
//!
//! What a reader gets is exactly what its locked path would have answered
//! at one instant between the reader's first and last load: the same
//! guarantee a cached translation gives (see `tlb.rs`). The local addresses
//! it hands out are never dereferenced here.
//!
//! The fast paths (`fast.rs`) load only the fields they need, in the
//! order they need them, so that they fit in the registers a C call leaves
//! free and save none: on SPDK's pattern every instruction here is paid on
//! every I/O.

use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};

/// Most regions the copy holds; with more, it is marked absent.
pub(crate) const CAPACITY: usize = 64;
// The search in `Snapshot::search` takes the steps of 64 entries, and the
// count fits in `COUNT` below.
const _: () = assert!(CAPACITY == 64);

/// Bits of `state` holding the number of entries.
const COUNT: u64 = 0x7f;
/// Bit of `state` set while the entries are rewritten.
const WRITING: u64 = 0x80;
/// One version step of `state` (the bits above the count and flag).
const VERSION: u64 = 0x100;
/// Count stored when the copy is absent (too many regions); above
/// [`CAPACITY`], so readers treat it like a copy being rewritten.
const ABSENT: u64 = COUNT;

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

/// One entry of the copy; readers load its fields one by one.
///
/// Besides the region's own fields it holds answers worked out once per
/// table change, so that each per-I/O check is one load and one compare:
/// `nowrite` and `get_len`. One slot is one cache line.
#[repr(C, align(64))]
pub(crate) struct Slot {
    pub len: AtomicU64,
    pub id: AtomicUsize,
    pub vaddr: AtomicUsize,
    pub prot: AtomicU64,
    /// `PROT_WRITE` when the region may not be written, else 0: a
    /// translation tests the `prot` it is asked for against it.
    pub nowrite: AtomicU64,
    /// The region's first address (as in the search array, which a
    /// hinted check would have to index separately); `u64::MAX` when free.
    pub start: AtomicU64,
    /// How much of the region `sgl_get` may hand out, by the entry's
    /// `writeable` (0: reading, 1: writing): its length when it is mapped
    /// (and, for writing, writable), else 0.
    pub get_len: [AtomicU64; 2],
}

impl Slot {
    const fn empty() -> Self {
        Slot {
            len: AtomicU64::new(0),
            id: AtomicUsize::new(0),
            vaddr: AtomicUsize::new(0),
            prot: AtomicU64::new(0),
            nowrite: AtomicU64::new(0),
            start: AtomicU64::new(u64::MAX),
            get_len: [const { AtomicU64::new(0) }; 2],
        }
    }

    /// Whether the slot holds region `id` starting at `start` (never true
    /// of a cleared slot: no live region has identifier 0).
    #[inline(always)]
    pub fn is(&self, start: u64, id: usize) -> bool {
        self.start.load(Ordering::Relaxed) == start && self.id.load(Ordering::Relaxed) == id
    }

    /// Fills the slot with entry `e`, or clears it (`None`: matches no
    /// entry, contains nothing, hands out nothing).
    fn store(&self, e: Option<&Entry>) {
        let (start, len, id, vaddr, prot) = e.map_or((u64::MAX, 0, 0, 0, 0), |e| {
            (e.start, e.len, e.id, e.vaddr, e.prot)
        });
        let writable = prot & libc::PROT_WRITE != 0;
        let mapped_len = if vaddr != 0 { len } else { 0 };
        self.len.store(len, Ordering::Relaxed);
        self.id.store(id, Ordering::Relaxed);
        self.vaddr.store(vaddr, Ordering::Relaxed);
        self.prot.store(prot as u32 as u64, Ordering::Relaxed);
        let nowrite = if writable { 0 } else { libc::PROT_WRITE as u64 };
        self.nowrite.store(nowrite, Ordering::Relaxed);
        self.start.store(start, Ordering::Relaxed);
        self.get_len[0].store(mapped_len, Ordering::Relaxed);
        let write_len = if writable { mapped_len } else { 0 };
        self.get_len[1].store(write_len, Ordering::Relaxed);
    }

    /// Whether the slot's region is writable.
    #[cfg(test)]
    pub fn writable(&self) -> bool {
        self.nowrite.load(Ordering::Relaxed) == 0
    }

    #[inline(always)]
    fn entry(&self, start: u64, i: usize) -> Entry {
        Entry {
            start,
            len: self.len.load(Ordering::Relaxed),
            id: self.id.load(Ordering::Relaxed),
            vaddr: self.vaddr.load(Ordering::Relaxed),
            prot: self.prot.load(Ordering::Relaxed) as i32,
            // i < CAPACITY <= 256.
            slot: i as u8,
        }
    }
}

/// The copy of a small region table; see the module documentation.
///
/// Laid out for the caches: the state and the logging page size in the
/// first cache line, one line per slot, and the search array last.
#[repr(C, align(64))]
pub(crate) struct Snapshot {
    /// Count, rewriting bit and version; see the module documentation.
    state: AtomicU64,
    /// The dirty logging page size, 0 when not logging: whether
    /// `vfu_sgl_put` has work to do (set by `dirty.rs`, under the table's
    /// write lock). Not part of the sequence lock.
    pub logging_page_size: AtomicU64,
    slots: [Slot; CAPACITY],
    /// First addresses, ascending, for the search; `u64::MAX` past the
    /// entries, so that the search never steps onto them.
    starts: [AtomicU64; CAPACITY],
}

/// A consistent-until-checked view of the entries, handed to readers.
pub(crate) struct View<'a> {
    snap: &'a Snapshot,
    n: usize,
}

impl View<'_> {
    /// The entry containing `addr`, if any (the search the translation fast
    /// path does, returning the whole entry; for the tests).
    #[cfg(test)]
    pub fn containing(&self, addr: u64) -> Option<Entry> {
        let i = self.snap.search(self.n, addr);
        let e = self.snap.entry(i);
        // `addr - start < len` also rejects an address below the first entry.
        (addr >= e.start && addr - e.start < e.len).then_some(e)
    }

    /// The entry that starts exactly at `start` and has identifier `id`,
    /// looked for first at position `hint` (where a translation found it),
    /// then searched.
    #[inline(always)]
    pub fn named(&self, start: u64, id: usize, hint: u8) -> Option<Entry> {
        let hint = usize::from(hint);
        if hint < self.n && self.snap.is(hint, start, id) {
            return Some(self.snap.entry(hint));
        }
        let i = self.snap.search(self.n, start);
        let e = self.snap.entry(i);
        (i < self.n && e.start == start && e.id == id).then_some(e)
    }
}

impl Snapshot {
    /// An empty copy (no regions: consistent and present).
    pub const fn new() -> Self {
        Snapshot {
            state: AtomicU64::new(0),
            logging_page_size: AtomicU64::new(0),
            slots: [const { Slot::empty() }; CAPACITY],
            starts: [const { AtomicU64::new(u64::MAX) }; CAPACITY],
        }
    }

    /// An empty copy shared by every context without DMA (never published
    /// to: it answers nothing, and logging is off).
    pub fn empty() -> &'static Snapshot {
        static EMPTY: Snapshot = Snapshot::new();
        &EMPTY
    }

    /// Replaces the copy with the `n` regions `entries` yields (in ascending
    /// order of start), or marks it absent when `n` exceeds [`CAPACITY`]
    /// (then `entries` is not consumed and every slot is cleared). The
    /// caller must exclude other writers (it holds the table's write lock).
    pub fn publish(&self, n: usize, entries: impl Iterator<Item = Entry>) {
        let s = self.state.load(Ordering::Relaxed);
        if n > CAPACITY && s & (COUNT | WRITING) == ABSENT {
            // Absent and staying so: every slot is already cleared, and no
            // reader can tell one absent copy from another. (A table of
            // many regions changes on every map and unmap: this spares
            // each of them a rewrite of all the slots.)
            return;
        }
        self.state.store(s | WRITING, Ordering::Relaxed);
        // Readers that see any store below also see the rewriting bit.
        fence(Ordering::Release);
        let mut written = 0;
        if n <= CAPACITY {
            for (i, e) in entries.take(n).enumerate() {
                self.starts[i].store(e.start, Ordering::Relaxed);
                self.slots[i].store(Some(&e));
                written += 1;
            }
        }
        // Past the entries (all of them when the copy is absent): never
        // stepped onto, never matched.
        for i in written..CAPACITY {
            self.starts[i].store(u64::MAX, Ordering::Relaxed);
            self.slots[i].store(None);
        }
        let count = if n > CAPACITY { ABSENT } else { written as u64 };
        let version = (s & !(COUNT | WRITING)).wrapping_add(VERSION);
        self.state.store(version | count, Ordering::Release);
    }

    /// The state word, as [`Self::begin`] loads it.
    #[inline(always)]
    pub fn state(&self) -> u64 {
        self.state.load(Ordering::Acquire)
    }

    /// Whether `state` (loaded by [`Self::state`]) is of a copy of exactly
    /// one entry, not being rewritten (the case with no search).
    #[inline(always)]
    pub fn single(state: u64) -> bool {
        state & (COUNT | WRITING) == 1
    }

    /// Starts a read: the state to check with [`Self::valid`] at the end,
    /// and the number of entries, which is at least 1. `None` when the copy
    /// is empty, absent or being rewritten (the caller then takes its
    /// locked path).
    #[inline(always)]
    pub fn begin(&self) -> Option<(u64, usize)> {
        let s = self.state();
        // One compare: a count of 0, the rewriting bit and the absent count
        // all fall outside 1..=CAPACITY.
        let n = (s & (COUNT | WRITING)) as usize;
        (n.wrapping_sub(1) < CAPACITY).then_some((s, n))
    }

    /// Starts a read that needs no count (of a slot named by a hint): the
    /// state to check with [`Self::valid`] at the end, `None` while the
    /// copy is being rewritten. An empty or absent copy has every slot
    /// cleared, so a hint finds nothing there.
    #[inline(always)]
    pub fn stable(&self) -> Option<u64> {
        let s = self.state();
        (s & WRITING == 0).then_some(s)
    }

    /// Whether nothing changed since [`Self::begin`] (or [`Self::stable`])
    /// returned `state`: then
    /// every field read in between belongs to one consistent table.
    #[inline(always)]
    pub fn valid(&self, state: u64) -> bool {
        // Orders the loads before it ahead of the check (seqlock reader).
        fence(Ordering::Acquire);
        self.state.load(Ordering::Relaxed) == state
    }

    /// Entry `i` (taken modulo [`CAPACITY`]: readers pass indexes below it).
    #[inline(always)]
    pub fn slot(&self, i: usize) -> &Slot {
        &self.slots[i % CAPACITY]
    }

    /// First address of entry `i` (modulo [`CAPACITY`]); `u64::MAX` past the
    /// entries.
    #[inline(always)]
    pub fn start(&self, i: usize) -> u64 {
        self.starts[i % CAPACITY].load(Ordering::Relaxed)
    }

    /// Whether entry `i` (modulo [`CAPACITY`]) is region `id` starting at
    /// `start` ([`Slot::is`]).
    #[inline(always)]
    pub fn is(&self, i: usize, start: u64, id: usize) -> bool {
        self.slot(i).is(start, id)
    }

    /// The whole of entry `i` (modulo [`CAPACITY`]).
    #[inline(always)]
    fn entry(&self, i: usize) -> Entry {
        self.slot(i).entry(self.start(i), i)
    }

    /// Index of the last of the first `n` entries starting at or before
    /// `addr` (0 when none does): a binary search in a fixed number of
    /// steps, without branches on the data (random addresses would
    /// mispredict them). `1 <= n <= CAPACITY`.
    #[inline(always)]
    pub fn search(&self, n: usize, addr: u64) -> usize {
        // Straight-line steps, not a loop: in a loop the compiler turns the
        // conditional moves back into branches. Past the entries every
        // start is u64::MAX, so a step lands there only for an address of
        // u64::MAX, whose entry then contains nothing.
        let mut i = 0usize;
        macro_rules! step {
            ($s:expr) => {
                let j = (i + $s) % CAPACITY;
                if self.starts[j].load(Ordering::Relaxed) <= addr {
                    i = j;
                }
            };
        }
        // Steps no smaller than `n` could never be taken: skipped, on
        // branches that go the same way for every lookup in a table, nested
        // so that a table of one entry costs one compare.
        if n > 1 {
            if n > 2 {
                if n > 4 {
                    if n > 8 {
                        if n > 16 {
                            if n > 32 {
                                step!(32);
                            }
                            step!(16);
                        }
                        step!(8);
                    }
                    step!(4);
                }
                step!(2);
            }
            step!(1);
        }
        i
    }

    /// Runs `f` on a view of the entries and returns its answer if the view
    /// was consistent throughout; `None` when the copy is absent, empty or
    /// was being rewritten (the caller then takes its locked path). `f` may
    /// run on torn entries: it must only compute, and its answer is thrown
    /// away unless the check afterwards passes.
    #[inline(always)]
    pub fn read<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> Option<R> {
        self.read_at(f).map(|(r, _)| r)
    }

    /// [`Self::read`], also returning the state the answer holds for, for
    /// [`Self::unchanged`] to check later.
    #[inline(always)]
    pub fn read_at<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> Option<(R, u64)> {
        let (s, n) = self.begin()?;
        let r = f(&View { snap: self, n });
        self.valid(s).then_some((r, s))
    }

    /// Whether the copy is still as it was at state `seq` (from
    /// [`Self::read_at`]). Inside a read-side section (`rcu.rs`), a true
    /// answer means that no change published since `seq` (a removal) can
    /// complete its `synchronize` before the section ends.
    #[inline(always)]
    pub fn unchanged(&self, seq: u64) -> bool {
        self.state.load(Ordering::Relaxed) == seq
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
        // Empty: no answer, so that callers take their locked path.
        assert_eq!(snap.read(|v| v.containing(0)), None);
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
    fn shrinking_clears_every_slot_past_the_entries() {
        // The fast paths index slots by an unchecked hint: every slot past
        // the entries must be empty (start u64::MAX, identifier 0, length
        // 0, not mapped), whatever was there before.
        let snap = Snapshot::new();
        let big: Vec<Entry> = (0..CAPACITY as u64)
            .map(|i| e(i * 0x10000, 0x8000, i as usize + 1))
            .collect();
        snap.publish(CAPACITY, big.iter().copied());
        snap.publish(2, big.iter().copied());
        let (state, n) = snap.begin().unwrap();
        assert_eq!(n, 2);
        for (i, b) in big.iter().enumerate() {
            let slot = snap.slot(i);
            if i < 2 {
                assert!(snap.is(i, b.start, b.id));
                continue;
            }
            assert!(!snap.is(i, b.start, b.id), "slot {i}");
            assert_eq!(snap.start(i), u64::MAX);
            assert_eq!(slot.id.load(Ordering::Relaxed), 0);
            assert_eq!(slot.len.load(Ordering::Relaxed), 0);
            assert_eq!(slot.vaddr.load(Ordering::Relaxed), 0);
            assert!(!slot.writable());
            assert_eq!(slot.start.load(Ordering::Relaxed), u64::MAX);
            for get_len in &slot.get_len {
                assert_eq!(get_len.load(Ordering::Relaxed), 0);
            }
        }
        assert!(snap.valid(state));
        // The search never leaves the entries, even for the largest address.
        assert!(snap.search(n, u64::MAX - 1) < n);
        // Each publish changes the state; absent and rewriting states are
        // refused by `begin`.
        snap.publish(2, big.iter().copied());
        assert!(!snap.valid(state));
        snap.publish(CAPACITY + 1, std::iter::empty());
        assert_eq!(snap.begin(), None);
        snap.publish(0, std::iter::empty());
        assert_eq!(snap.begin(), None);
    }

    #[test]
    fn every_protection_and_the_largest_length() {
        // Every protection a DMA region can have, with the largest length
        // one can have, comes back whole.
        let snap = Snapshot::new();
        let big = super::super::MAX_DMA_SIZE;
        let regions: Vec<Entry> = [0, libc::PROT_READ, libc::PROT_WRITE, super::super::PROT_RW]
            .iter()
            .enumerate()
            .map(|(i, &prot)| Entry {
                prot,
                slot: i as u8,
                ..e(i as u64 * (big + 0x1000), big, i + 1)
            })
            .collect();
        snap.publish(regions.len(), regions.iter().copied());
        for r in &regions {
            assert_eq!(
                snap.read(|v| v.containing(r.start + big - 1)),
                Some(Some(*r))
            );
            let slot = snap.slot(usize::from(r.slot));
            assert_eq!(slot.len.load(Ordering::Relaxed), big);
            assert_eq!(slot.writable(), r.prot & libc::PROT_WRITE != 0);
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
        // Going absent clears every slot (hints index them unchecked), and
        // the copy is then stable, not being rewritten.
        snap.publish(3, (1..4).map(|i| e(i * 0x1000, 0x800, i as usize)));
        snap.publish(CAPACITY + 1, std::iter::empty());
        assert!(snap.stable().is_some());
        // Staying absent rewrites nothing (not even the state).
        let absent = snap.state();
        snap.publish(CAPACITY + 2, std::iter::empty());
        assert_eq!(snap.state(), absent);
        for i in 0..CAPACITY {
            assert!(!snap.is(i, (i as u64 + 1) * 0x1000, i + 1));
            assert_eq!(snap.slot(i).vaddr.load(Ordering::Relaxed), 0);
            assert_eq!(snap.slot(i).len.load(Ordering::Relaxed), 0);
        }
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
