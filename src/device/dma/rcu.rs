//! Read-side sections for the DMA fast paths, without atomic
//! read-modify-writes on the reader's side.
//!
//! A thread about to copy to or from guest memory through a cached
//! translation enters a section: a plain store to a slot of its own. It then
//! checks that the translation is still current, copies, and leaves (two
//! more plain stores). A thread about to unmap guest memory, or to change
//! something the fast paths check, first publishes the change (a new table
//! generation, logging switched on) and then calls [`synchronize`], which
//! returns once every section that might have missed the change has ended.
//!
//! The pairing fence is paid by `synchronize` alone, with
//! `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`: every running thread of
//! the process executes a full memory barrier before it returns (the
//! asymmetric fence of userspace RCU). So either the writer sees a reader's
//! slot set and waits for it, or the reader sees the writer's change and
//! takes the locked path. Where the kernel refuses `membarrier`, readers
//! execute a full fence themselves.
//!
//! What this replaces is the `RwLock` read lock on every DMA access: its
//! locked instruction also had to wait for the previous copy's stores to
//! drain, and with several device threads its counter bounced between
//! their CPUs.
//!
//! `synchronize` costs nothing when no other thread has a slot: a
//! single-threaded device (DMA from callbacks on the thread that also
//! handles DMA_UNMAP, the usual libvfio-user device) never issues a barrier.

use std::cell::{Cell, UnsafeCell};
use std::sync::atomic::{compiler_fence, fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_int = 1 << 3;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_int = 1 << 4;

/// One thread's announcement. Aligned so that no two threads' slots share a
/// cache line.
#[repr(align(128))]
struct Slot {
    /// `2 * n + 1` while the owner is inside its `n`th section, `2 * n` once
    /// it has left `n` sections. One location, so that a waiter that saw a
    /// section in progress knows for certain, from any later value, that it
    /// is over.
    state: AtomicU64,
}

/// The slots of the live threads that have a [`Reader`]. A spin lock rather
/// than a `Mutex` so that the fork handlers can hold it across `fork`.
struct Registry {
    locked: AtomicBool,
    slots: UnsafeCell<Vec<Arc<Slot>>>,
}

// SAFETY: `slots` is only touched by the holder of `locked`.
unsafe impl Sync for Registry {}

static REGISTRY: Registry = Registry {
    locked: AtomicBool::new(false),
    slots: UnsafeCell::new(Vec::new()),
};

struct RegistryGuard;

impl Registry {
    fn lock(&'static self) -> RegistryGuard {
        self.acquire();
        RegistryGuard
    }

    fn acquire(&self) {
        let mut spins = 0u32;
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    fn release(&self) {
        self.locked.store(false, Ordering::Release);
    }
}

impl RegistryGuard {
    fn slots(&mut self) -> &mut Vec<Arc<Slot>> {
        // SAFETY: a guard exists only while `locked` is held, and `&mut self`
        // makes this the only reference through it.
        unsafe { &mut *REGISTRY.slots.get() }
    }
}

impl Drop for RegistryGuard {
    fn drop(&mut self) {
        REGISTRY.release();
    }
}

/// Whether readers may leave their fence to `membarrier`. Decided once,
/// before the first [`Reader`] exists, and never changed.
static LIGHT: AtomicBool = AtomicBool::new(false);
static INIT: Once = Once::new();

thread_local! {
    /// This thread's slot, if it has a [`Reader`] (to skip it in
    /// [`synchronize`]: a thread never waits for itself).
    static MY_SLOT: Cell<*const Slot> = const { Cell::new(std::ptr::null()) };
}

#[cfg(not(miri))]
fn membarrier(cmd: libc::c_int) -> bool {
    // SAFETY: membarrier takes two integer arguments and touches no memory
    // of ours.
    unsafe {
        libc::syscall(
            libc::SYS_membarrier,
            cmd,
            0 as libc::c_uint,
            0 as libc::c_int,
        ) == 0
    }
}

/// Miri cannot run `membarrier`: there the readers fence themselves, which
/// lets Miri check that form of the protocol.
#[cfg(miri)]
fn membarrier(_cmd: libc::c_int) -> bool {
    false
}

fn init() {
    INIT.call_once(|| {
        LIGHT.store(
            membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED),
            Ordering::Relaxed,
        );
        // SAFETY: the handlers are `extern "C"` functions of this crate that
        // take no arguments; they stay valid while the library is loaded
        // (glibc forgets them when the library is unloaded).
        #[cfg(not(miri))]
        unsafe {
            libc::pthread_atfork(
                Some(before_fork),
                Some(after_fork_parent),
                Some(after_fork_child),
            );
        }
    });
}

extern "C" fn before_fork() {
    // Keep the registry consistent across fork: no other thread is halfway
    // through changing it when the address space is copied.
    REGISTRY.acquire();
}

extern "C" fn after_fork_parent() {
    REGISTRY.release();
}

extern "C" fn after_fork_child() {
    // Only the forking thread lives on in the child; the other slots belong
    // to threads that do not exist here (one of them may even have been
    // inside a section, and would be waited for forever).
    let mine = MY_SLOT.try_with(Cell::get).unwrap_or(std::ptr::null());
    // SAFETY: `before_fork` took the lock and no other thread exists.
    let slots = unsafe { &mut *REGISTRY.slots.get() };
    slots.retain(|s| Arc::as_ptr(s) == mine);
    REGISTRY.release();
}

/// A thread's handle for entering sections. Registered on creation,
/// unregistered on drop (the owning thread-local's destructor).
pub(crate) struct Reader {
    slot: Arc<Slot>,
    /// Sections left so far (only this thread writes `slot`).
    left: Cell<u64>,
}

impl Reader {
    pub(crate) fn new() -> Reader {
        init();
        let slot = Arc::new(Slot {
            state: AtomicU64::new(0),
        });
        REGISTRY.lock().slots().push(Arc::clone(&slot));
        let _ = MY_SLOT.try_with(|m| m.set(Arc::as_ptr(&slot)));
        Reader {
            slot,
            left: Cell::new(0),
        }
    }

    /// Enters a section. Checks made after this (and before the returned
    /// guard is dropped) see every change published before a
    /// [`synchronize`] that has not waited for this section.
    #[inline]
    pub(crate) fn enter(&self) -> Section<'_> {
        let n = self.left.get();
        self.slot
            .state
            .store(n.wrapping_mul(2) | 1, Ordering::Relaxed);
        if LIGHT.load(Ordering::Relaxed) {
            // The store above and the checks after this must not be
            // reordered by the compiler; the CPU's reordering is undone by
            // the writer's membarrier.
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
        Section { reader: self }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let me = Arc::as_ptr(&self.slot);
        let _ = MY_SLOT.try_with(|m| {
            if m.get() == me {
                m.set(std::ptr::null());
            }
        });
        REGISTRY.lock().slots().retain(|s| Arc::as_ptr(s) != me);
    }
}

/// An open section; leaves it when dropped.
pub(crate) struct Section<'a> {
    reader: &'a Reader,
}

impl Drop for Section<'_> {
    #[inline]
    fn drop(&mut self) {
        let n = self.reader.left.get().wrapping_add(1);
        self.reader.left.set(n);
        // Release: everything done in the section (the copy) happens before
        // a waiter sees it over. A plain store: only this thread writes it.
        self.reader
            .slot
            .state
            .store(n.wrapping_mul(2), Ordering::Release);
    }
}

/// Waits until every section of another thread that may have missed a
/// change published before this call has ended. Call it after publishing
/// and before acting on the change (unmapping memory).
pub(crate) fn synchronize() {
    let mine = MY_SLOT.try_with(Cell::get).unwrap_or(std::ptr::null());
    // The other threads' slots, taken out of the registry so that it is not
    // held while waiting (threads come and go, and `fork` takes it). A
    // thread that registers after this sees the change: its registration
    // takes the registry lock after the change was published.
    let others: Vec<Arc<Slot>> = {
        let mut reg = REGISTRY.lock();
        if reg.slots().iter().all(|s| Arc::as_ptr(s) == mine) {
            return;
        }
        reg.slots()
            .iter()
            .filter(|s| Arc::as_ptr(s) != mine)
            .cloned()
            .collect()
    };
    heavy_barrier();
    for slot in &others {
        let seen = slot.state.load(Ordering::Acquire);
        if seen & 1 == 0 {
            continue;
        }
        // Any later value means that section is over.
        let mut spins = 0u32;
        while slot.state.load(Ordering::Acquire) == seen {
            spins += 1;
            if spins < 128 {
                std::hint::spin_loop();
            } else {
                // The reader may be preempted, maybe on this very CPU.
                std::thread::yield_now();
            }
        }
    }
}

/// The writer's half of the asymmetric fence.
fn heavy_barrier() {
    fence(Ordering::SeqCst);
    if !LIGHT.load(Ordering::Relaxed) {
        // Readers fence themselves.
        return;
    }
    if membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) {
        return;
    }
    // Refused: maybe a child of fork whose registration did not carry over.
    if membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)
        && membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)
    {
        return;
    }
    // The slow, registration-free form (an RCU grace period of the kernel).
    if membarrier(MEMBARRIER_CMD_GLOBAL) {
        return;
    }
    // No form of membarrier is left (a seccomp filter installed after the
    // first reader registered). A reader's store is visible to other CPUs
    // within nanoseconds of being issued; wait far longer than that before
    // reading the slots.
    std::thread::sleep(Duration::from_millis(1));
    fence(Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::{kill, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use nix::unistd::{fork, ForkResult};
    use std::sync::atomic::AtomicUsize;
    use std::sync::mpsc;
    use std::time::Instant;

    #[test]
    fn synchronize_does_not_wait_for_its_own_thread() {
        // A thread never waits for its own section (it cannot be inside one
        // while it removes a region); idle slots of others are not waited
        // for either.
        let idle = std::thread::spawn(|| {
            let r = Reader::new();
            drop(r.enter());
            std::thread::park_timeout(Duration::from_millis(200));
        });
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let r = Reader::new();
            let _section = r.enter();
            synchronize();
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("synchronize waited for its own thread's section");
        idle.join().unwrap();
    }

    #[test]
    fn synchronize_waits_for_an_open_section() {
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let left = Arc::new(AtomicBool::new(false));
        let left2 = Arc::clone(&left);
        let reader = std::thread::spawn(move || {
            let r = Reader::new();
            let section = r.enter();
            entered_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            left2.store(true, Ordering::SeqCst);
            drop(section);
        });
        entered_rx.recv().unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let done2 = Arc::clone(&done);
        let writer = std::thread::spawn(move || {
            synchronize();
            done2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "synchronize returned while a section was open"
        );
        release_tx.send(()).unwrap();
        writer.join().unwrap();
        assert!(left.load(Ordering::SeqCst));
        reader.join().unwrap();
    }

    #[test]
    fn sections_see_changes_or_are_waited_for() {
        // Readers copy `value` only when `current` is set; the writer clears
        // `current`, synchronizes, then poisons `value`. No reader may ever
        // copy the poison.
        let current = Arc::new(AtomicBool::new(true));
        let value = Arc::new(AtomicU64::new(7));
        let seen_poison = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let sections = Arc::new(AtomicUsize::new(0));
        let mut readers = Vec::new();
        for _ in 0..2 {
            let (current, value, seen_poison, stop, sections) = (
                Arc::clone(&current),
                Arc::clone(&value),
                Arc::clone(&seen_poison),
                Arc::clone(&stop),
                Arc::clone(&sections),
            );
            readers.push(std::thread::spawn(move || {
                let r = Reader::new();
                while !stop.load(Ordering::Relaxed) {
                    let s = r.enter();
                    // Acquire: a `true` from a later round must bring that
                    // round's restored value with it (in the DMA paths the
                    // generation never repeats, so no such later value
                    // exists there).
                    if current.load(Ordering::Acquire) {
                        // A long section, so that a writer that did not
                        // wait would poison the value under it.
                        for _ in 0..200 {
                            if value.load(Ordering::Relaxed) == u64::MAX {
                                seen_poison.fetch_add(1, Ordering::Relaxed);
                            }
                            std::hint::spin_loop();
                        }
                    }
                    drop(s);
                    sections.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        while sections.load(Ordering::Relaxed) < 100 {
            std::thread::yield_now();
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(200) {
            current.store(false, Ordering::Release);
            synchronize();
            value.store(u64::MAX, Ordering::Relaxed);
            for _ in 0..500 {
                std::hint::spin_loop();
            }
            // Undo, with the same discipline, for the next round.
            value.store(7, Ordering::Relaxed);
            current.store(true, Ordering::Release);
        }
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(seen_poison.load(Ordering::Relaxed), 0);
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot fork")]
    fn fork_child_does_not_wait_for_the_parents_threads() {
        // A thread of the parent is inside a section when the process forks.
        // That thread does not exist in the child, so its section never
        // ends there: the child's synchronize must not wait for it.
        let (entered_tx, entered_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let reader = std::thread::spawn(move || {
            let r = Reader::new();
            let section = r.enter();
            entered_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            drop(section);
        });
        entered_rx.recv().unwrap();
        // SAFETY: the child only calls synchronize (no allocation, no locks
        // other threads could hold: the fork handlers took care of the
        // registry's) and then _exit, which ends it without running the
        // parent's exit code.
        let pid = unsafe {
            match fork().unwrap() {
                ForkResult::Child => {
                    synchronize();
                    libc::_exit(0)
                }
                ForkResult::Parent { child } => child,
            }
        };
        let start = Instant::now();
        let (done, status) = loop {
            let s = waitpid(pid, Some(WaitPidFlag::WNOHANG)).unwrap();
            if s != WaitStatus::StillAlive {
                break (true, s);
            }
            if start.elapsed() > Duration::from_secs(10) {
                kill(pid, Signal::SIGKILL).unwrap();
                break (false, waitpid(pid, None).unwrap());
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        release_tx.send(()).unwrap();
        reader.join().unwrap();
        assert!(done, "the child waited for a thread it does not have");
        assert_eq!(status, WaitStatus::Exited(pid, 0));
        // In the parent, the reader's slot is still registered until it exits.
    }

    #[test]
    fn exited_threads_leave_the_registry() {
        let slot = std::thread::spawn(|| {
            let r = Reader::new();
            Arc::downgrade(&r.slot)
        })
        .join()
        .unwrap();
        // Neither the thread nor the registry holds the slot any more.
        assert!(slot.upgrade().is_none());
    }
}
