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

/// The DMA controller of a context for the per-I/O fast paths below, which
/// run outside the panic guard: they only compute, and cannot panic. `None`
/// for NULL or a context without DMA (the full path gives the errno).
#[inline(always)]
fn dma_fast<'a>(vfu_ctx: *mut vfu_ctx_t) -> Option<&'a DmaController> {
    handle_ref(vfu_ctx).and_then(|c| c.dma()).map(|d| &**d)
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
    // SPDK's case, a range inside one of few regions: no guard needed, as
    // the fast path cannot panic.
    if max_nr_sgs > 0 && !sgl.is_null() {
        if let (Some(dma), Ok([first, ..])) = (dma_fast(vfu_ctx), sgl_mut(sgl, 1)) {
            if dma.addr_to_sg_fast(dma_addr as u64, len as u64, first, prot) {
                return 1;
            }
            // The context is no longer needed (which frees a register on
            // the fast path above).
            return addr_to_sgl_dma(dma, dma_addr, len, sgl, max_nr_sgs, prot);
        }
    }
    addr_to_sgl_full(vfu_ctx, dma_addr, len, sgl, max_nr_sgs, prot)
}

/// [`vfu_addr_to_sgl`] past its fast path, for a context whose DMA
/// controller is known (out of line).
#[inline(never)]
extern "C" fn addr_to_sgl_dma(
    dma: &DmaController,
    dma_addr: vfu_dma_addr_t,
    len: size_t,
    sgl: *mut dma_sg_t,
    max_nr_sgs: size_t,
    prot: c_int,
) -> c_int {
    guard(|| match sgl_mut(sgl, max_nr_sgs) {
        Ok(out) => sgl_result(dma.addr_to_sgl(dma_addr as u64, len as u64, out, prot)),
        Err(e) => {
            set_errno(e.0);
            -1
        }
    })
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
    if cnt == 1 && !sgl.is_null() && !iov.is_null() {
        if let (Some(dma), Ok([sg]), Ok([out])) =
            (dma_fast(vfu_ctx), self::sgl(sgl, 1), iovs_mut(iov, 1))
        {
            if let Some(base) = dma.sg_addr_fast(sg) {
                *out = iovec {
                    iov_base: base,
                    iov_len: sg.length as usize,
                };
                return 0;
            }
            return sgl_get_one(dma, sg, out);
        }
    }
    sgl_get_full(vfu_ctx, sgl, iov, cnt, flags)
}

/// [`vfu_sgl_get`] of one entry past its fast path, for a context whose DMA
/// controller is known (out of line).
#[inline(never)]
extern "C" fn sgl_get_one(dma: &DmaController, sg: &DmaSg, out: &mut iovec) -> c_int {
    guard(|| {
        ret(
            dma.sgl_get(std::slice::from_ref(sg), std::slice::from_mut(out)),
            |_| 0,
        )
    })
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
    if dma_fast(vfu_ctx).is_some_and(|d| !d.logging()) {
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
