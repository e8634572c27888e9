//! Device threads using the DMA API while the context thread maps, unmaps
//! and reports dirty pages: the thread-safety promise of `vfu_addr_to_sgl`,
//! `vfu_sgl_get`/`put`, `vfu_sgl_mark_dirty`, `vfu_sg_is_mappable` and
//! direct `sg_read`/`sg_write` (README, "Thread safety").
//!
//! Written for ThreadSanitizer (`scripts/sanitizers.sh` runs it with
//! `-Zsanitizer=thread`): every worker touches only guest pages of its own,
//! so the one thing shared between threads is the library's own state (the
//! region table, its translation caches, the dirty bitmaps). A race report
//! is therefore a race in the library, not in the guest memory a test
//! happens to write from two threads at once. It also runs, faster, in the
//! ordinary `cargo test`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use vfio_user::device::dma::{bitmap_size, DmaController, DmaSg, SglError, PROT_RW};
use vfio_user::Errno;

const PAGE: u64 = 4096;
const WORKERS: u64 = 3;
/// Pages of the long-lived region that each worker owns.
const OWN_PAGES: u64 = 4;
/// One-page regions the main thread maps and unmaps over and over; worker
/// `t` uses those with `k % WORKERS == t`.
const VOLATILE: u64 = 24;
const VOLATILE_BASE: u64 = 0x100_0000;
/// Operations each worker completes at least.
const MIN_OPS: u64 = 300;

fn memfd(size: u64) -> OwnedFd {
    // SAFETY: the name is a valid C string.
    let fd = unsafe { libc::memfd_create(c"dma-threads".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the fd is open; ftruncate has no memory-safety preconditions.
    assert_eq!(
        unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) },
        0
    );
    fd
}

fn one_sg(dma: &DmaController, iova: u64, len: u64) -> Result<DmaSg, Errno> {
    let mut sgl = [DmaSg::default()];
    match dma.addr_to_sgl(iova, len, &mut sgl, PROT_RW) {
        Ok(1) => Ok(sgl[0]),
        Ok(n) => panic!("{n} entries for one page"),
        Err(SglError::Errno(e)) => Err(e),
        Err(e) => panic!("addr_to_sgl: {e:?}"),
    }
}

/// What worker `t` writes in its `n`th operation: never zero, and different
/// from what the operation before wrote at the same offset.
fn pattern(t: u64, n: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .map(|i| (t * 0x35 + n * 7 + i) as u8 | 1)
        .collect()
}

/// One worker: translate, get, write through the pointer, put, then read
/// back through `sg_read` and `with_guest`, on its own long-lived pages;
/// and the same through `sg_write`/`sg_read` on its volatile regions, which
/// may vanish at any moment (then an error, never a crash or wrong bytes).
fn worker(
    dma: &DmaController,
    t: u64,
    stop: &AtomicBool,
    start: &Barrier,
    hits: &AtomicU64,
) -> u64 {
    start.wait();
    let mut ops = 0u64;
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }];
    while !stop.load(Ordering::Relaxed) || ops < MIN_OPS {
        let page = t * OWN_PAGES + ops % OWN_PAGES;
        let iova = page * PAGE + (ops % 8) * 64;
        let want = pattern(t, ops, 64);

        let sg = one_sg(dma, iova, 64).expect("the long-lived region is mapped");
        assert!(dma.sg_is_mappable(&sg));
        dma.sgl_get(&[sg], &mut iov).unwrap();
        assert_eq!(iov[0].iov_len, 64);
        // SAFETY: sgl_get handed out a writable mapping of 64 bytes of a
        // region that stays mapped for the whole test; only this thread
        // touches these bytes.
        unsafe { std::ptr::copy_nonoverlapping(want.as_ptr(), iov[0].iov_base as *mut u8, 64) };
        dma.sgl_put(&[sg]);
        let mut got = vec![0u8; 64];
        assert_eq!(dma.sg_read(&sg, &mut got, true), Ok(true));
        assert_eq!(got, want, "worker {t} page {page}");
        let seen = dma
            .with_guest(iova, 64, PROT_RW, |m| {
                let mut b = vec![0u8; 64];
                m.read_at(0, &mut b).unwrap();
                b
            })
            .unwrap();
        assert_eq!(seen, want);

        let k = t + WORKERS * (ops % (VOLATILE / WORKERS));
        let v = VOLATILE_BASE + k * PAGE;
        match one_sg(dma, v, PAGE) {
            Ok(sg) => {
                // Either answer is right while the main thread may unmap.
                let _ = dma.sg_is_mappable(&sg);
                let data = pattern(t, ops, PAGE as usize);
                match dma.sg_write(&sg, &data, true) {
                    Ok(true) => {
                        let mut back = vec![0u8; PAGE as usize];
                        match dma.sg_read(&sg, &mut back, true) {
                            Ok(true) => {
                                assert!(back == data, "volatile page {k} read back wrong");
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                            // Unmapped in between: the entry is stale.
                            Err(Errno::EINVAL) => {}
                            other => panic!("sg_read: {other:?}"),
                        }
                    }
                    Err(Errno::EINVAL) => {}
                    other => panic!("sg_write: {other:?}"),
                }
                if dma.sgl_get(&[sg], &mut iov).is_ok() {
                    dma.sgl_put(&[sg]);
                }
                dma.sgl_mark_dirty(&[sg]);
            }
            Err(Errno::ENOENT) => {}
            Err(e) => panic!("addr_to_sgl of a volatile region: {e:?}"),
        }
        dma.mark_dirty_range(iova, 64);
        ops += 1;
    }
    ops
}

#[test]
fn sgl_users_race_with_map_unmap_and_dirty_reports() {
    let dma = Arc::new(DmaController::new(1024));
    let stable_len = WORKERS * OWN_PAGES * PAGE;
    dma.add_region(0, stable_len, Some(memfd(stable_len)), 0, PROT_RW, false)
        .unwrap();
    dma.logging_start(PAGE, &[]).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(WORKERS as usize + 1));
    let threads: Vec<_> = (0..WORKERS)
        .map(|t| {
            let (dma, stop, start, hits) = (dma.clone(), stop.clone(), start.clone(), hits.clone());
            std::thread::spawn(move || worker(&dma, t, &stop, &start, &hits))
        })
        .collect();

    start.wait();
    let begin = Instant::now();
    let mut dirty = vec![0u8; bitmap_size(stable_len, PAGE).unwrap()];
    let mut rounds = 0u64;
    while rounds < 20 || begin.elapsed() < Duration::from_millis(200) {
        for k in 0..VOLATILE {
            let iova = VOLATILE_BASE + k * PAGE;
            dma.add_region(iova, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
                .unwrap();
        }
        // Give the workers a moment to reach the new regions (an unmap
        // racing a worker mid-access is the point, but so is some access
        // getting through).
        let before = hits.load(Ordering::Relaxed);
        let wait = Instant::now();
        while hits.load(Ordering::Relaxed) == before && wait.elapsed() < Duration::from_millis(20) {
            std::thread::yield_now();
        }
        // Reports race with the workers marking pages dirty.
        let mut bm = vec![0u8; dirty.len()];
        dma.logging_report(0, stable_len, PAGE, &mut bm).unwrap();
        for (d, b) in dirty.iter_mut().zip(&bm) {
            *d |= b;
        }
        let mut vbm = vec![0u8; bitmap_size(PAGE, PAGE).unwrap()];
        dma.logging_report(VOLATILE_BASE, PAGE, PAGE, &mut vbm)
            .unwrap();
        for k in 0..VOLATILE {
            let iova = VOLATILE_BASE + k * PAGE;
            dma.remove_region(iova, PAGE).unwrap();
        }
        assert_eq!(dma.region_count(), 1);
        rounds += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        assert!(t.join().unwrap() >= MIN_OPS);
    }
    let volatile_ok = hits.load(Ordering::Relaxed);
    assert!(
        volatile_ok > 0,
        "no access to a volatile region got through"
    );
    let mut bm = vec![0u8; dirty.len()];
    dma.logging_report(0, stable_len, PAGE, &mut bm).unwrap();
    for (d, b) in dirty.iter_mut().zip(&bm) {
        *d |= b;
    }
    // Every page some worker wrote was reported dirty at some point.
    let pages = (WORKERS * OWN_PAGES) as usize;
    for p in 0..pages {
        assert!(dirty[p / 8] & (1 << (p % 8)) != 0, "page {p} never dirty");
    }
    eprintln!("{rounds} map/unmap rounds, {volatile_ok} volatile write+read pairs");
}
