//! The C ABI of guest memory access: address translation into
//! scatter/gather lists (`vfu_addr_to_sgl`), mapping them (`vfu_sgl_get`,
//! `vfu_sgl_put`, `vfu_sgl_mark_dirty`), copying through them
//! (`vfu_sgl_read`, `vfu_sgl_write`) and `vfu_sg_is_mappable`.

use super::*;

// The C caller's arrays, as slices (through the helpers of `boundary.rs`,
// which hold the `unsafe` conversions): NULL with a non-zero count is
// EINVAL, and a zero count never looks at the pointer.

/// The `n` scatter/gather entries at `p` (from `vfu_addr_to_sgl`).
fn sgl<'a>(p: *mut dma_sg_t, n: usize) -> Result<&'a [DmaSg]> {
    if n == 0 {
        return Ok(&[]);
    }
    // dma_sg_t is opaque to C: its arrays are of dma_sg_size() bytes per
    // entry, the size of DmaSg.
    c_slice(p as *const DmaSg, n).ok_or(Errno::EINVAL)
}

/// Room for `n` scatter/gather entries at `p`, to be filled.
fn sgl_mut<'a>(p: *mut dma_sg_t, n: usize) -> Result<&'a mut [DmaSg]> {
    if n == 0 {
        return Ok(&mut []);
    }
    c_slice_mut(p as *mut DmaSg, n).ok_or(Errno::EINVAL)
}

/// Room for `n` iovecs at `p`, to be filled.
fn iovs_mut<'a>(p: *mut iovec, n: usize) -> Result<&'a mut [iovec]> {
    if n == 0 {
        return Ok(&mut []);
    }
    c_slice_mut(p, n).ok_or(Errno::EINVAL)
}

/// The lock-free state of a context's DMA controller, for the per-I/O fast
/// paths below (`device/dma/fast.rs`), which run outside the panic guard:
/// they only compute, and cannot panic. `None` for NULL; empty (answering
/// nothing) for a context without DMA, whose full path gives the errno.
#[inline(always)]
fn fast<'a>(vfu_ctx: *mut vfu_ctx_t) -> Option<&'a Snapshot> {
    handle_ref(vfu_ctx).map(Context::dma_snapshot)
}

/// Thread-safe: may be called from any thread.
#[no_mangle]
pub extern "C" fn vfu_addr_to_sgl(
    vfu_ctx: *mut vfu_ctx_t,
    dma_addr: vfu_dma_addr_t,
    len: size_t,
    sgl: *mut dma_sg_t,
    max_nr_sgs: size_t,
    prot: c_int,
) -> c_int {
    // A range inside the one region (SPDK's usual case): no guard needed,
    // as the fast path cannot panic.
    if max_nr_sgs > 0 {
        if let (Some(snap), Ok([first, ..])) = (fast(vfu_ctx), sgl_mut(sgl, 1)) {
            let state = snap.state();
            if Snapshot::single(state) {
                if snap.translate_one(state, dma_addr as u64, len as u64, first, prot) {
                    return 1;
                }
                return addr_to_sgl_refused(vfu_ctx, len, sgl, max_nr_sgs, prot);
            }
        }
    }
    addr_to_sgl_many(vfu_ctx, dma_addr, len, sgl, max_nr_sgs, prot)
}

/// [`vfu_addr_to_sgl`] after the one-region path refused: the address
/// asked for is in the first entry (so that the fast path needs not keep
/// it in a register).
#[inline(never)]
extern "C" fn addr_to_sgl_refused(
    vfu_ctx: *mut vfu_ctx_t,
    len: size_t,
    sgl: *mut dma_sg_t,
    max_nr_sgs: size_t,
    prot: c_int,
) -> c_int {
    let dma_addr = match sgl_mut(sgl, 1) {
        Ok([first, ..]) => (first.dma_addr as u64).wrapping_add(first.offset),
        _ => 0,
    };
    addr_to_sgl_full(
        vfu_ctx,
        dma_addr as usize as vfu_dma_addr_t,
        len,
        sgl,
        max_nr_sgs,
        prot,
    )
}

/// [`vfu_addr_to_sgl`] with several regions (out of line): a search of
/// the lock-free copy, then the full path.
#[inline(never)]
extern "C" fn addr_to_sgl_many(
    vfu_ctx: *mut vfu_ctx_t,
    dma_addr: vfu_dma_addr_t,
    len: size_t,
    sgl: *mut dma_sg_t,
    max_nr_sgs: size_t,
    prot: c_int,
) -> c_int {
    if max_nr_sgs > 0 && translate_fast(vfu_ctx, dma_addr, len, sgl, prot) {
        return 1;
    }
    addr_to_sgl_full(vfu_ctx, dma_addr, len, sgl, max_nr_sgs, prot)
}

/// The fast path of [`vfu_addr_to_sgl`] into the first entry of `sgl`.
#[inline(always)]
fn translate_fast(
    vfu_ctx: *mut vfu_ctx_t,
    dma_addr: vfu_dma_addr_t,
    len: size_t,
    sgl: *mut dma_sg_t,
    prot: c_int,
) -> bool {
    match (fast(vfu_ctx), sgl_mut(sgl, 1)) {
        (Some(snap), Ok([first, ..])) => snap.translate(dma_addr as u64, len as u64, first, prot),
        _ => false,
    }
}

/// The C return value of a translation, setting errno.
fn sgl_result(r: std::result::Result<usize, SglError>) -> c_int {
    match r {
        Ok(n) => n as c_int,
        Err(SglError::Errno(e)) => {
            set_errno(e.0);
            -1
        }
        Err(SglError::NeedMore(n)) => {
            set_errno(0);
            -(n.min(c_int::MAX as usize - 1) as c_int) - 1
        }
    }
}

/// [`vfu_addr_to_sgl`] past its fast path (out of line).
#[inline(never)]
extern "C" fn addr_to_sgl_full(
    vfu_ctx: *mut vfu_ctx_t,
    dma_addr: vfu_dma_addr_t,
    len: size_t,
    sgl: *mut dma_sg_t,
    max_nr_sgs: size_t,
    prot: c_int,
) -> c_int {
    guard(|| {
        let r = (|| -> Result<_> {
            let dma = ctx(vfu_ctx)?.dma().ok_or(Errno::EINVAL)?;
            let out = sgl_mut(sgl, max_nr_sgs)?;
            Ok(dma.addr_to_sgl(dma_addr as u64, len as u64, out, prot))
        })();
        match r {
            Err(e) => {
                set_errno(e.0);
                -1
            }
            Ok(r) => sgl_result(r),
        }
    })
}

/// Thread-safe: may be called from any thread.
#[no_mangle]
pub extern "C" fn vfu_sgl_get(
    vfu_ctx: *mut vfu_ctx_t,
    sgl: *mut dma_sg_t,
    iov: *mut iovec,
    cnt: size_t,
    flags: c_int,
) -> c_int {
    // SPDK's case, one entry of one of few regions, checked without a
    // guard (the fast path cannot panic).
    if cnt == 1 {
        if let (Some(snap), Ok([sg]), Ok([out])) =
            (fast(vfu_ctx), self::sgl(sgl, 1), iovs_mut(iov, 1))
        {
            if let Some(base) = snap.sg_addr(sg) {
                *out = iovec {
                    iov_base: base,
                    iov_len: sg.length as usize,
                };
                return 0;
            }
        }
        // Three arguments: the fast path keeps more registers.
        return sgl_get_one(vfu_ctx, sgl, iov);
    }
    sgl_get_full(vfu_ctx, sgl, iov, cnt, flags)
}

/// [`vfu_sgl_get`] of one entry past its fast path (out of line).
#[inline(never)]
extern "C" fn sgl_get_one(vfu_ctx: *mut vfu_ctx_t, sgl: *mut dma_sg_t, iov: *mut iovec) -> c_int {
    sgl_get_full(vfu_ctx, sgl, iov, 1, 0)
}

/// [`vfu_sgl_get`] past its fast path (out of line).
#[inline(never)]
extern "C" fn sgl_get_full(
    vfu_ctx: *mut vfu_ctx_t,
    sgl: *mut dma_sg_t,
    iov: *mut iovec,
    cnt: size_t,
    flags: c_int,
) -> c_int {
    guard(|| {
        let r = (|| {
            // Like upstream's release build, `flags` is not checked.
            let _ = flags;
            let dma = ctx(vfu_ctx)?.dma().ok_or(Errno::EINVAL)?;
            let s = self::sgl(sgl, cnt)?;
            dma.sgl_get(s, iovs_mut(iov, cnt)?)
        })();
        ret(r, |_| 0)
    })
}

/// Thread-safe: may be called from any thread.
#[no_mangle]
pub extern "C" fn vfu_sgl_mark_dirty(vfu_ctx: *mut vfu_ctx_t, sgl: *mut dma_sg_t, cnt: size_t) {
    guard(|| {
        if let (Ok(c), Ok(s)) = (ctx(vfu_ctx), self::sgl(sgl, cnt)) {
            if let Some(d) = c.dma() {
                d.sgl_mark_dirty(s);
            }
        }
    })
}

/// Thread-safe: may be called from any thread.
#[no_mangle]
pub extern "C" fn vfu_sgl_put(
    vfu_ctx: *mut vfu_ctx_t,
    sgl: *mut dma_sg_t,
    iov: *mut iovec,
    cnt: size_t,
) {
    // The iovecs from vfu_sgl_get() need no release: the mappings live as
    // long as their DMA regions.
    let _ = iov;
    // Without dirty page logging there is nothing to do (no guard needed).
    if fast(vfu_ctx).is_some_and(|s| !s.logging()) {
        return;
    }
    sgl_put_full(vfu_ctx, sgl, cnt);
}

/// [`vfu_sgl_put`] past its fast path (out of line): marks written pages
/// dirty while logging.
#[inline(never)]
extern "C" fn sgl_put_full(vfu_ctx: *mut vfu_ctx_t, sgl: *mut dma_sg_t, cnt: size_t) {
    guard(|| {
        if let (Ok(c), Ok(s)) = (ctx(vfu_ctx), self::sgl(sgl, cnt)) {
            if let Some(d) = c.dma() {
                d.sgl_put(s);
            }
        }
    })
}

fn sgl_rw(
    vfu_ctx: *mut vfu_ctx_t,
    sg: *mut dma_sg_t,
    sg_cnt: size_t,
    data: *mut c_void,
    flags: c_int,
    write: bool,
) -> c_int {
    guard(|| {
        let r = (|| {
            let c = ctx(vfu_ctx)?;
            if flags & !1 != 0 {
                return Err(Errno::EINVAL);
            }
            if sg_cnt != 1 {
                return Err(Errno::ENOTSUP);
            }
            let s = &self::sgl(sg, 1)?[0];
            let len = usize::try_from(s.length).map_err(|_| Errno::EINVAL)?;
            if len > 0 && data.is_null() {
                return Err(Errno::EINVAL);
            }
            // The caller provides a buffer of the entry's length.
            let buf: &mut [u8] = if len == 0 {
                &mut []
            } else {
                c_slice_mut(data as *mut u8, len).ok_or(Errno::EINVAL)?
            };
            c.dma_transfer(s, buf, write, flags & 1 != 0)
        })();
        ret(r, |_| 0)
    })
}

#[no_mangle]
pub extern "C" fn vfu_sgl_read(
    vfu_ctx: *mut vfu_ctx_t,
    sg: *mut dma_sg_t,
    sg_cnt: size_t,
    data: *mut c_void,
    flags: c_int,
) -> c_int {
    sgl_rw(vfu_ctx, sg, sg_cnt, data, flags, false)
}

#[no_mangle]
pub extern "C" fn vfu_sgl_write(
    vfu_ctx: *mut vfu_ctx_t,
    sg: *mut dma_sg_t,
    sg_cnt: size_t,
    data: *mut c_void,
    flags: c_int,
) -> c_int {
    sgl_rw(vfu_ctx, sg, sg_cnt, data, flags, true)
}

/// Thread-safe: may be called from any thread.
#[no_mangle]
pub extern "C" fn vfu_sg_is_mappable(vfu_ctx: *mut vfu_ctx_t, sg: *mut dma_sg_t) -> bool {
    guard(|| {
        let (Ok(c), Ok(s)) = (ctx(vfu_ctx), self::sgl(sg, 1)) else {
            return false;
        };
        c.dma().is_some_and(|d| d.sg_is_mappable(&s[0]))
    })
}

#[cfg(test)]
mod tests {
    //! The per-I/O entry points as C calls them, fast paths and fallbacks
    //! alike: results, errnos, and entries that are stale, made up or
    //! passed with NULL pointers.

    use std::os::fd::OwnedFd;

    use nix::sys::memfd::{memfd_create, MFdFlags};

    use super::super::{vfu_ctx, vfu_destroy_ctx};
    use super::*;
    use crate::device::dma::{bitmap_size, DmaController, PROT_RW};
    use crate::ffi::boundary::errno;

    const PAGE: u64 = 4096;

    fn memfd(size: u64) -> OwnedFd {
        let fd = memfd_create(c"ffi-dma", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, size as libc::off_t).unwrap();
        fd
    }

    /// A context (DMA set up when `max_regions` is given) as a C handle.
    fn handle(tag: &str, max_regions: Option<usize>) -> *mut vfu_ctx {
        let path =
            std::env::temp_dir().join(format!("vfu-ffi-dma-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let c = Context::create(&path, true).unwrap();
        let _ = std::fs::remove_file(&path);
        if let Some(n) = max_regions {
            c.setup_dma(n, None, None).unwrap();
        }
        into_handle::<vfu_ctx>(Box::new(c))
    }

    fn dma<'a>(h: *mut vfu_ctx) -> &'a DmaController {
        handle_ref(h).unwrap().dma().unwrap()
    }

    /// Maps `len` bytes of a new memfd at `iova`, read-write.
    fn map(h: *mut vfu_ctx, iova: u64, len: u64) {
        dma(h)
            .add_region(iova, len, Some(memfd(len)), 0, PROT_RW, false)
            .unwrap();
    }

    /// `vfu_sgl_put` of one entry.
    fn put(h: *mut vfu_ctx, sg: &DmaSg) {
        vfu_sgl_put(h, sg as *const DmaSg as *mut dma_sg_t, &mut no_iov(), 1);
    }

    fn no_iov() -> iovec {
        iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }
    }

    /// `vfu_addr_to_sgl` of one entry: the return value, the entry and errno.
    fn translate(h: *mut vfu_ctx, iova: u64, len: u64, prot: i32) -> (c_int, DmaSg, i32) {
        let mut sg = DmaSg::default();
        set_errno(0);
        let r = vfu_addr_to_sgl(
            h,
            iova as usize as vfu_dma_addr_t,
            len as size_t,
            &mut sg as *mut DmaSg as *mut dma_sg_t,
            1,
            prot,
        );
        (r, sg, errno())
    }

    /// `vfu_sgl_get` of one entry: the return value, the iovec and errno.
    fn get(h: *mut vfu_ctx, sg: &DmaSg) -> (c_int, iovec, i32) {
        let mut sg = *sg;
        let mut iov = no_iov();
        set_errno(0);
        let r = vfu_sgl_get(h, &mut sg as *mut DmaSg as *mut dma_sg_t, &mut iov, 1, 0);
        (r, iov, errno())
    }

    #[test]
    fn translation_and_get_of_a_few_regions() {
        let h = handle("few", Some(8));
        let fds: Vec<OwnedFd> = (0..4).map(|_| memfd(4 * PAGE)).collect();
        for (i, fd) in fds.iter().enumerate() {
            let prot = if i == 3 { libc::PROT_READ } else { PROT_RW };
            dma(h)
                .add_region(
                    0x10_0000 * (i as u64 + 1),
                    4 * PAGE,
                    Some(fd.try_clone().unwrap()),
                    0,
                    prot,
                    false,
                )
                .unwrap();
        }
        for i in 0..3u64 {
            let iova = 0x10_0000 * (i + 1) + PAGE + 8;
            let (r, sg, _) = translate(h, iova, 16, PROT_RW);
            assert_eq!(r, 1);
            assert_eq!(
                (sg.dma_addr as u64, sg.offset, sg.length),
                (iova - PAGE - 8, PAGE + 8, 16)
            );
            assert!(sg.writeable);
            let (r, iov, _) = get(h, &sg);
            assert_eq!((r, iov.iov_len), (0, 16));
            // The address is the region's memory: a write shows in its file.
            // SAFETY: the iovec covers 16 mapped, writable bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    b"0123456789abcdef".as_ptr(),
                    iov.iov_base as *mut u8,
                    16,
                )
            };
            let mut back = [0u8; 16];
            nix::sys::uio::pread(&fds[i as usize], &mut back, (PAGE + 8) as i64).unwrap();
            assert_eq!(&back, b"0123456789abcdef");
            // Every hint gives the same answer (the right one is searched
            // for when the hint is wrong).
            for hint in 0..=u8::MAX {
                let (r, other, _) = get(h, &DmaSg { hint, ..sg });
                assert_eq!((r, other.iov_base), (0, iov.iov_base), "hint {hint}");
            }
            put(h, &sg);
        }
        // Errors, each from the full path.
        let r1 = 0x10_0000u64;
        assert_eq!(translate(h, r1 + 4 * PAGE - 8, 16, PROT_RW).0, -1); // crosses the end
        assert_eq!(translate(h, r1 + 4 * PAGE - 8, 16, PROT_RW).2, libc::ENOENT);
        assert_eq!(translate(h, r1 - 1, 1, PROT_RW).2, libc::ENOENT); // below
        assert_eq!(translate(h, 0x40_0000, 8, PROT_RW).2, libc::EACCES); // read-only
        assert_eq!(translate(h, r1, 0, PROT_RW).0, 0); // empty
        let (_, sg, _) = translate(h, r1, 64, PROT_RW);
        let bad = [
            (
                DmaSg {
                    offset: 4 * PAGE - 63,
                    ..sg
                },
                libc::EINVAL,
            ),
            (
                DmaSg {
                    offset: u64::MAX,
                    ..sg
                },
                libc::EINVAL,
            ),
            (
                DmaSg {
                    length: u64::MAX,
                    ..sg
                },
                libc::EINVAL,
            ),
            (
                DmaSg {
                    region: sg.region + 1,
                    ..sg
                },
                libc::EINVAL,
            ),
            (
                DmaSg {
                    dma_addr: (r1 + PAGE) as usize as *mut c_void,
                    ..sg
                },
                libc::EINVAL,
            ),
        ];
        for (b, e) in bad {
            for hint in [sg.hint, sg.hint.wrapping_add(1), 255] {
                let (r, _, err) = get(h, &DmaSg { hint, ..b });
                assert_eq!((r, err), (-1, e), "{b:?}");
            }
        }
        // Writing through an entry of the read-only region.
        let (r, ro, _) = translate(h, 0x40_0000, 8, libc::PROT_READ);
        assert_eq!(r, 1);
        assert_eq!(get(h, &ro).0, 0);
        assert_eq!(
            get(
                h,
                &DmaSg {
                    writeable: true,
                    ..ro
                }
            )
            .2,
            libc::EACCES
        );
        // NULL pointers and counts.
        let mut out = DmaSg::default();
        let sgp = &mut out as *mut DmaSg as *mut dma_sg_t;
        set_errno(0);
        assert_eq!(
            vfu_addr_to_sgl(std::ptr::null_mut(), r1 as usize as _, 8, sgp, 1, PROT_RW),
            -1
        );
        assert_eq!(errno(), libc::EINVAL);
        set_errno(0);
        assert_eq!(
            vfu_addr_to_sgl(h, r1 as usize as _, 8, std::ptr::null_mut(), 1, PROT_RW),
            -1
        );
        assert_eq!(errno(), libc::EINVAL);
        // No room: the number needed, as upstream (-(n) - 1).
        assert_eq!(vfu_addr_to_sgl(h, r1 as usize as _, 8, sgp, 0, PROT_RW), -2);
        let mut sg2 = sg;
        let sg2p = &mut sg2 as *mut DmaSg as *mut dma_sg_t;
        let mut iov = no_iov();
        set_errno(0);
        assert_eq!(vfu_sgl_get(std::ptr::null_mut(), sg2p, &mut iov, 1, 0), -1);
        assert_eq!(errno(), libc::EINVAL);
        assert_eq!(vfu_sgl_get(h, std::ptr::null_mut(), &mut iov, 1, 0), -1);
        assert_eq!(vfu_sgl_get(h, sg2p, std::ptr::null_mut(), 1, 0), -1);
        assert_eq!(vfu_sgl_get(h, sg2p, &mut iov, 0, 0), 0);
        vfu_sgl_put(std::ptr::null_mut(), sg2p, &mut iov, 1);
        vfu_sgl_put(h, std::ptr::null_mut(), &mut iov, 1);
        // An entry of a region that is gone, at every hint.
        dma(h).remove_region(r1, 4 * PAGE).unwrap();
        for hint in 0..=u8::MAX {
            assert_eq!(get(h, &DmaSg { hint, ..sg }).2, libc::EINVAL, "hint {hint}");
        }
        vfu_destroy_ctx(h);
    }

    #[test]
    fn one_region_on_its_own_path() {
        // One region is translated without a search, at slot 0's fixed
        // place: the same answers and errnos as with several.
        let h = handle("one", Some(8));
        let base = 0x20_0000u64;
        let fd = memfd(4 * PAGE);
        dma(h)
            .add_region(base, 4 * PAGE, Some(fd), 0, libc::PROT_READ, false)
            .unwrap();
        let (r, sg, _) = translate(h, base + 4 * PAGE - 8, 8, libc::PROT_READ);
        assert_eq!((r, sg.dma_addr as u64, sg.offset), (1, base, 4 * PAGE - 8));
        assert!(!sg.writeable);
        let (r, iov, _) = get(h, &sg);
        assert_eq!((r, iov.iov_len), (0, 8));
        assert_eq!(
            translate(h, base + 4 * PAGE - 8, 9, libc::PROT_READ).2,
            libc::ENOENT
        );
        assert_eq!(translate(h, base - 1, 1, libc::PROT_READ).2, libc::ENOENT);
        assert_eq!(
            translate(h, base + 4 * PAGE, 1, libc::PROT_READ).2,
            libc::ENOENT
        );
        assert_eq!(translate(h, base, 8, PROT_RW).2, libc::EACCES);
        assert_eq!(translate(h, base, 0, libc::PROT_READ).0, 0);
        // What sgl_get checks in one load: the writeable bit of a read-only
        // region, the length and the offset.
        for (b, e) in [
            (
                DmaSg {
                    writeable: true,
                    ..sg
                },
                libc::EACCES,
            ),
            (DmaSg { length: 9, ..sg }, libc::EINVAL),
            (
                DmaSg {
                    offset: 4 * PAGE,
                    length: 1,
                    ..sg
                },
                libc::EINVAL,
            ),
        ] {
            assert_eq!(get(h, &b).0, -1, "{b:?}");
            assert_eq!(get(h, &b).2, e, "{b:?}");
        }
        // An empty entry is handed out empty (by the full path), as
        // upstream does.
        let (r, iov, _) = get(h, &DmaSg { length: 0, ..sg });
        assert_eq!((r, iov.iov_len), (0, 0));
        // A region without a mapping in this process is translated, and
        // sgl_get gives EFAULT.
        dma(h)
            .add_region(0x30_0000, PAGE, None, 0, PROT_RW, false)
            .unwrap();
        dma(h).remove_region(base, 4 * PAGE).unwrap();
        let (r, unmapped, _) = translate(h, 0x30_0008, 8, PROT_RW);
        assert_eq!((r, unmapped.offset), (1, 8));
        assert_eq!(get(h, &unmapped).2, libc::EFAULT);
        assert_eq!(get(h, &sg).2, libc::EINVAL);
        // A second region below the first moves it out of slot 0: its entry
        // is found by search, and new translations search too.
        let fd = memfd(PAGE);
        dma(h)
            .add_region(0x10_0000, PAGE, Some(fd), 0, PROT_RW, false)
            .unwrap();
        assert_eq!(get(h, &unmapped).2, libc::EFAULT);
        let (r, low, _) = translate(h, 0x10_0010, 16, PROT_RW);
        assert_eq!((r, low.dma_addr as u64, low.offset), (1, 0x10_0000, 16));
        assert_eq!(get(h, &low).0, 0);
        vfu_destroy_ctx(h);
    }

    #[test]
    fn a_context_without_dma() {
        // The fast paths read an empty copy and leave the answer to the
        // full path: EINVAL, as upstream.
        let h = handle("nodma", None);
        let (r, sg, e) = translate(h, 0x1000, 8, PROT_RW);
        assert_eq!((r, e), (-1, libc::EINVAL));
        for hint in 0..=u8::MAX {
            let forged = DmaSg {
                hint,
                dma_addr: usize::MAX as *mut c_void,
                length: 1,
                ..sg
            };
            assert_eq!(get(h, &forged).2, libc::EINVAL);
        }
        put(h, &sg);
        vfu_destroy_ctx(h);
    }

    #[test]
    fn too_many_regions_for_the_copy() {
        // With more regions than the lock-free copy holds, every slot of
        // the copy is cleared: entries made while it held them go the full
        // path, and stay right, or dead once their region is gone.
        let h = handle("many", Some(100));
        let fd = memfd(PAGE);
        let add = |i: u64| {
            dma(h)
                .add_region(
                    i * 0x10000,
                    PAGE,
                    Some(fd.try_clone().unwrap()),
                    0,
                    PROT_RW,
                    false,
                )
                .unwrap()
        };
        for i in 0..64 {
            add(i);
        }
        let sgs: Vec<DmaSg> = (0..64)
            .map(|i| translate(h, i * 0x10000 + 8, 8, PROT_RW).1)
            .collect();
        let addrs: Vec<usize> = sgs
            .iter()
            .map(|sg| get(h, sg).1.iov_base as usize)
            .collect();
        add(64);
        add(65);
        for (i, sg) in sgs.iter().enumerate() {
            assert_eq!(get(h, sg).1.iov_base as usize, addrs[i]);
        }
        // Still more than the copy holds after this.
        dma(h).remove_region(5 * 0x10000, PAGE).unwrap();
        for hint in 0..=u8::MAX {
            assert_eq!(get(h, &DmaSg { hint, ..sgs[5] }).2, libc::EINVAL);
            assert_eq!(
                get(h, &DmaSg { hint, ..sgs[6] }).1.iov_base as usize,
                addrs[6]
            );
        }
        vfu_destroy_ctx(h);
    }

    #[test]
    fn put_marks_written_pages_while_logging() {
        let h = handle("dirty", Some(4));
        let base = 0x10_0000u64;
        map(h, base, 16 * PAGE);
        let report = || {
            let mut bm = vec![0u8; bitmap_size(16 * PAGE, PAGE).unwrap()];
            dma(h)
                .logging_report(base, 16 * PAGE, PAGE, &mut bm)
                .unwrap();
            u16::from_le_bytes([bm[0], bm[1]])
        };
        // Not logging: put has nothing to do.
        put(h, &translate(h, base, 8, PROT_RW).1);
        dma(h).logging_start(PAGE, &[]).unwrap();
        assert_eq!(report(), 0);
        put(h, &translate(h, base + 3 * PAGE, 8, PROT_RW).1);
        put(h, &translate(h, base + 5 * PAGE, 8, libc::PROT_READ).1);
        put(h, &translate(h, base + 7 * PAGE - 4, 8, PROT_RW).1);
        assert_eq!(report(), 1 << 3 | 1 << 6 | 1 << 7);
        dma(h).logging_stop().unwrap();
        put(h, &translate(h, base + 9 * PAGE, 8, PROT_RW).1);
        dma(h).logging_start(PAGE, &[]).unwrap();
        assert_eq!(report(), 0);
        vfu_destroy_ctx(h);
    }

    #[test]
    fn threads_use_the_entry_points_while_regions_come_and_go() {
        // The thread-safety promise of the per-I/O entry points, through
        // the C ABI (and under ThreadSanitizer, which runs these tests):
        // while the main thread maps and unmaps regions, a region that
        // stays always translates, and its address never changes; entries
        // of regions that come and go get an answer or an errno.
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;

        let h = handle("threads", Some(16));
        // Above the regions that come and go, so that its position in the
        // lock-free copy moves as they do (its slot is rewritten under the
        // readers).
        let base = 0x1000_0000u64;
        map(h, base, 4 * PAGE);
        let want = get(h, &translate(h, base + 8, 8, PROT_RW).1).1.iov_base as usize;
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = if cfg!(debug_assertions) {
            2_000
        } else {
            20_000
        };
        // The handle crosses threads as a number, as a C program's would.
        let hs = h as usize;
        let workers: Vec<_> = (0..2u64)
            .map(|t| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let h = hs as *mut vfu_ctx;
                    let mut n = 0u64;
                    while n < rounds || !stop.load(Ordering::Relaxed) {
                        let (r, sg, _) = translate(h, base + 8, 8, PROT_RW);
                        assert_eq!(r, 1);
                        let (r, iov, _) = get(h, &sg);
                        assert_eq!((r, iov.iov_base as usize), (0, want));
                        put(h, &sg);
                        let churn = 0x100_0000 + ((n + t) % 8) * 0x1_0000;
                        let (r, sg, e) = translate(h, churn, 8, PROT_RW);
                        if r == 1 {
                            let (r, _, e) = get(h, &sg);
                            assert!(r == 0 || (r == -1 && e == libc::EINVAL), "{r} {e}");
                        } else {
                            assert_eq!((r, e), (-1, libc::ENOENT));
                        }
                        n += 1;
                    }
                })
            })
            .collect();
        let fd = memfd(PAGE);
        let until = std::time::Instant::now() + std::time::Duration::from_millis(300);
        let mut k = 0u64;
        while k < 200 || std::time::Instant::now() < until {
            k += 1;
            let iova = 0x100_0000 + (k % 8) * 0x1_0000;
            let _ = dma(h).add_region(iova, PAGE, Some(fd.try_clone().unwrap()), 0, PROT_RW, false);
            if k % 3 != 0 {
                let _ = dma(h).remove_region(iova, PAGE);
            }
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        vfu_destroy_ctx(h);
    }
}
