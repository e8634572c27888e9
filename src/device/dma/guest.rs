use super::*;

impl DmaController {
    /// Whether the entry's region is mapped into this process (so that
    /// [`Self::sgl_get`] works on it). False for invalid entries.
    pub fn sg_is_mappable(&self, sg: &DmaSg) -> bool {
        let inner = self.table();
        self.resolve_cached(&inner, sg)
            .is_ok_and(|r| r.mode == AccessMode::Mmap)
    }

    /// Reads or writes the memory of one entry on behalf of `vfu_sgl_read` /
    /// `vfu_sgl_write`; `buf` must hold at least `sg.length` bytes (only that
    /// many are transferred).
    ///
    /// As upstream, the server touches the memory itself only when `direct`
    /// (`VFU_SGL_DIRECT_ACCESS`) is given: with a memcpy for mapped regions,
    /// with `pread`/`pwrite` for FILE_IO regions. `Ok(true)` means done;
    /// `Ok(false)` means the caller must instead send VFIO_USER_DMA_READ/WRITE
    /// messages to the client. Errors: `EPERM` writing through an entry not
    /// translated for writing, `EINVAL` for an invalid entry or short buffer,
    /// `EACCES` for an access the region's protection forbids, `EIO` when
    /// file I/O fails. Direct writes mark the pages dirty while logging.
    pub fn sg_access(
        &self,
        sg: &DmaSg,
        buf: &mut [u8],
        is_write: bool,
        direct: bool,
    ) -> Result<bool> {
        if is_write {
            self.sg_write(sg, buf, direct)
        } else {
            self.sg_read(sg, buf, direct)
        }
    }

    /// The read half of [`Self::sg_access`].
    pub fn sg_read(&self, sg: &DmaSg, buf: &mut [u8], direct: bool) -> Result<bool> {
        let n = self.check_buf(sg, buf.len())?;
        if direct {
            let dst = buf.as_mut_ptr();
            let done = self.with_cached_mapping(sg, libc::PROT_READ, |src| {
                // SAFETY: `with_cached_mapping` runs this inside a read-side
                // section, with the region mapped readable at `src` for the
                // entry's `n` bytes and no unmapping possible until the
                // section ends; `buf` has at least `n` bytes. `copy`
                // tolerates a buffer that itself lies in guest memory.
                unsafe { std::ptr::copy(src, dst, n) }
            });
            if let Some(done) = done {
                return done.map(|()| true);
            }
        }
        let inner = self.table();
        let region = self.resolve_cached(&inner, sg)?;
        if !direct {
            return Ok(false);
        }
        match region.mode {
            AccessMode::Message => Ok(false),
            AccessMode::Mmap => {
                if region.prot & libc::PROT_READ == 0 {
                    return Err(Errno::EACCES);
                }
                let src = (region.vaddr + sg.offset as usize) as *const u8;
                // SAFETY: `resolve` checked that the range lies in the region,
                // which is mapped readable for as long as we hold the read
                // lock; `buf` has at least `n` bytes. `copy` tolerates a
                // buffer that itself lies in guest memory.
                unsafe { std::ptr::copy(src, buf.as_mut_ptr(), n) };
                Ok(true)
            }
            AccessMode::FileIo => {
                let fd = region.fd.clone().ok_or(Errno::EIO)?;
                let pos = file_pos(region, sg)?;
                drop(inner);
                file_io(&fd, pos, buf.as_mut_ptr(), n, false)?;
                Ok(true)
            }
        }
    }

    /// The write half of [`Self::sg_access`].
    pub fn sg_write(&self, sg: &DmaSg, buf: &[u8], direct: bool) -> Result<bool> {
        if !sg.writeable {
            return Err(Errno::EPERM);
        }
        let n = self.check_buf(sg, buf.len())?;
        if direct {
            let src = buf.as_ptr();
            let done = self.with_cached_mapping(sg, libc::PROT_WRITE, |dst| {
                // SAFETY: as in `sg_read`, with the region mapped writable
                // (and not logging, so there is nothing to mark dirty).
                unsafe { std::ptr::copy(src, dst, n) }
            });
            if let Some(done) = done {
                return done.map(|()| true);
            }
        }
        let inner = self.table();
        let region = self.resolve_cached(&inner, sg)?;
        if !direct {
            return Ok(false);
        }
        if region.mode != AccessMode::Message && region.prot & libc::PROT_WRITE == 0 {
            return Err(Errno::EACCES);
        }
        match region.mode {
            AccessMode::Message => Ok(false),
            AccessMode::Mmap => {
                let dst = (region.vaddr + sg.offset as usize) as *mut u8;
                // SAFETY: `resolve` checked that the range lies in the region,
                // which is mapped writable (checked above) for as long as we
                // hold the read lock; `buf` has at least `n` bytes.
                unsafe { std::ptr::copy(buf.as_ptr(), dst, n) };
                // Marked after the copy: a report taken in between must not
                // clear the bit of a write that has not landed yet.
                region.mark_dirty(sg.offset, sg.length, inner.dirty_page_size);
                Ok(true)
            }
            AccessMode::FileIo => {
                let fd = region.fd.clone().ok_or(Errno::EIO)?;
                let pos = file_pos(region, sg)?;
                drop(inner);
                // pwrite only reads from the buffer.
                file_io(&fd, pos, buf.as_ptr() as *mut u8, n, true)?;
                // After the write, for the same reason as above.
                self.mark_dirty_range(sg.iova(), sg.length);
                Ok(true)
            }
        }
    }

    pub(super) fn check_buf(&self, sg: &DmaSg, buf_len: usize) -> Result<usize> {
        let n = usize::try_from(sg.length).map_err(|_| Errno::EINVAL)?;
        if buf_len < n {
            return Err(Errno::EINVAL);
        }
        Ok(n)
    }
}

impl DmaController {
    /// Runs `f` with the guest memory at `[iova, iova + len)`, which must be
    /// mapped into this process (the client passed an fd with `DMA_MAP`) and
    /// allow `prot` (`PROT_READ`, `PROT_WRITE` or both). The range may span
    /// several adjacent regions.
    ///
    /// The controller's read lock is held while `f` runs, and unmapping a
    /// region needs the write lock, so the memory cannot go away under the
    /// [`GuestSlice`]; the slice cannot outlive the call. Keep `f` short:
    /// the client's `DMA_UNMAP` waits for it. Inside `f`, use only the
    /// slice: calling [`Context::run`](super::Context::run), or this
    /// controller again (another `with_guest`, `read`, `addr_to_sgl`...),
    /// could deadlock, since the lock is not re-entrant and an unmap may be
    /// waiting for it.
    ///
    /// Errors: `EINVAL` for unknown `prot` bits or a range that wraps the
    /// address space, `ENOENT` when part of the range is not mapped,
    /// `EACCES` when a region does not allow `prot`, `EFAULT` when a region
    /// is not mapped into this process (the client gave no fd, or asked for
    /// file I/O): use [`Self::read`] / [`Self::write`], or
    /// [`Context::dma_read`](super::Context::dma_read) /
    /// [`Context::dma_write`](super::Context::dma_write) for those.
    ///
    /// ```
    /// use vfio_user::device::dma::{DmaController, PROT_RW};
    ///
    /// let dma = DmaController::new(4);
    /// // Nothing is mapped yet.
    /// let r = dma.with_guest(0x1000, 8, PROT_RW, |mem| mem.len());
    /// assert_eq!(r, Err(vfio_user::Errno::ENOENT));
    /// ```
    pub fn with_guest<R>(
        &self,
        iova: u64,
        len: usize,
        prot: i32,
        f: impl FnOnce(GuestSlice<'_>) -> R,
    ) -> Result<R> {
        if prot & !PROT_RW != 0 {
            return Err(Errno::EINVAL);
        }
        let len64 = u64::try_from(len).map_err(|_| Errno::EINVAL)?;
        let end = iova.checked_add(len64).ok_or(Errno::EINVAL)?;
        let inner = self.table();
        let mut addr = iova;
        while addr < end {
            let region = inner.regions.containing(addr).ok_or(Errno::ENOENT)?;
            if region.prot & prot != prot {
                return Err(Errno::EACCES);
            }
            if region.mode != AccessMode::Mmap {
                return Err(Errno::EFAULT);
            }
            addr = region.end().min(end);
        }
        Ok(f(GuestSlice {
            regions: &inner.regions,
            iova,
            len,
            prot,
            dirty_page_size: inner.dirty_page_size,
        }))
    }

    /// Copies guest memory at `iova` into `buf`, from regions mapped into
    /// this process or backed by a file (`pread`). The range may span
    /// several adjacent regions.
    ///
    /// Errors: `ENOENT` when part of the range is not mapped, `EACCES` when
    /// a region is not readable, `EFAULT` when a region can only be reached
    /// through messages to the client (use
    /// [`Context::dma_read`](super::Context::dma_read) for those), `EIO` when
    /// file I/O fails. On error, `buf` may be partly filled.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<()> {
        self.for_each_sg(iova, buf.len(), PROT_READ, |sg, range| {
            let part = buf.get_mut(range).ok_or(Errno::EFAULT)?;
            match self.sg_read(sg, part, true)? {
                true => Ok(()),
                false => Err(Errno::EFAULT),
            }
        })
    }

    /// Copies `buf` into guest memory at `iova`, like [`Self::read`] in the
    /// other direction; `EACCES` when a region is read-only. Written pages
    /// are marked dirty while the client logs dirty pages. On error, a
    /// prefix of `buf` may have been written.
    pub fn write(&self, iova: u64, buf: &[u8]) -> Result<()> {
        self.for_each_sg(iova, buf.len(), PROT_WRITE, |sg, range| {
            let part = buf.get(range).ok_or(Errno::EFAULT)?;
            match self.sg_write(sg, part, true)? {
                true => Ok(()),
                false => Err(Errno::EFAULT),
            }
        })
    }

    /// Translates `[iova, iova + len)` one region at a time and calls `f`
    /// with each entry and the part of the caller's buffer it covers.
    pub(crate) fn for_each_sg(
        &self,
        iova: u64,
        len: usize,
        prot: i32,
        mut f: impl FnMut(&DmaSg, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < len {
            let addr = iova.checked_add(done as u64).ok_or(Errno::ENOENT)?;
            let mut sgl = [DmaSg::default()];
            match self.addr_to_sgl(addr, (len - done) as u64, &mut sgl, prot) {
                Ok(_) | Err(SglError::NeedMore(_)) => {}
                Err(SglError::Errno(e)) => return Err(e),
            }
            let [sg] = sgl;
            let n = usize::try_from(sg.length).map_err(|_| Errno::EINVAL)?;
            if n == 0 || n > len - done {
                return Err(Errno::EFAULT);
            }
            f(&sg, done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

/// Guest memory lent to the closure of [`DmaController::with_guest`].
///
/// Offsets are relative to the start of the range. Every access is
/// bounds-checked and copies with [`std::ptr::copy`]: the memory is shared
/// with the client (and the guest behind it), which may change it at any
/// time, so no Rust reference to it is ever handed out. Bytes that the guest
/// writes concurrently may read back torn, as with any memory shared with a
/// guest.
pub struct GuestSlice<'a> {
    pub(super) regions: &'a RegionTable<Region>,
    pub(super) iova: u64,
    pub(super) len: usize,
    pub(super) prot: i32,
    pub(super) dirty_page_size: u64,
}

impl fmt::Debug for GuestSlice<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestSlice")
            .field("iova", &format_args!("{:#x}", self.iova))
            .field("len", &self.len)
            .field("prot", &self.prot)
            .finish()
    }
}

impl GuestSlice<'_> {
    /// Length of the range in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Guest address (IOVA) of the first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Whether [`Self::write_at`] is allowed (the range was borrowed with
    /// `PROT_WRITE`).
    pub fn is_writable(&self) -> bool {
        self.prot & PROT_WRITE != 0
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`. `EFAULT` when they
    /// are not all inside the range, `EPERM` when the range was borrowed
    /// without `PROT_READ`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        if self.prot & PROT_READ == 0 {
            return Err(Errno::EPERM);
        }
        let dst = buf.as_mut_ptr();
        self.each_piece(offset, buf.len(), |src, done, n, _, _| {
            // SAFETY: `each_piece` hands out `n` bytes at `src` inside a
            // region that is mapped readable (checked by `with_guest`) and
            // stays mapped while the table's read lock, which `'a` borrows,
            // is held; `done + n <= buf.len()`. `copy` tolerates overlap
            // (`buf` could itself be guest memory).
            unsafe { std::ptr::copy(src as *const u8, dst.add(done), n) };
        })
    }

    /// Copies `buf` into the range at `offset` and marks the pages dirty
    /// while the client logs dirty pages. `EFAULT` when the bytes are not
    /// all inside the range, `EPERM` when the range was borrowed without
    /// `PROT_WRITE`.
    pub fn write_at(&self, offset: usize, buf: &[u8]) -> Result<()> {
        if self.prot & PROT_WRITE == 0 {
            return Err(Errno::EPERM);
        }
        let src = buf.as_ptr();
        let page_size = self.dirty_page_size;
        self.each_piece(offset, buf.len(), |dst, done, n, region, region_off| {
            // SAFETY: as in `read_at`, with the region mapped writable.
            unsafe { std::ptr::copy(src.add(done), dst, n) };
            // After the copy, so that a concurrent report cannot clear the
            // bit of a write that has not landed yet.
            region.mark_dirty(region_off, n as u64, page_size);
        })
    }

    /// Copies the whole range into a new vector (`EPERM` without
    /// `PROT_READ`).
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.len];
        self.read_at(0, &mut v)?;
        Ok(v)
    }

    /// Calls `f(address, done, n, region, offset in region)` for each piece
    /// of `[offset, offset + len)` that lies in one region.
    pub(super) fn each_piece(
        &self,
        offset: usize,
        len: usize,
        mut f: impl FnMut(*mut u8, usize, usize, &Region, u64),
    ) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => {}
            _ => return Err(Errno::EFAULT),
        }
        let mut done = 0usize;
        while done < len {
            // Cannot overflow: `with_guest` checked `iova + self.len`.
            let addr = self.iova + (offset + done) as u64;
            let region = self.regions.containing(addr).ok_or(Errno::EFAULT)?;
            let in_region = addr - region.iova;
            let n = usize::try_from(region.end() - addr)
                .unwrap_or(usize::MAX)
                .min(len - done);
            // The region was validated as mapped when the slice was made, and
            // the table cannot change while the slice lives.
            if region.mode != AccessMode::Mmap || region.vaddr == 0 {
                return Err(Errno::EFAULT);
            }
            let ptr = (region.vaddr + in_region as usize) as *mut u8;
            f(ptr, done, n, region, in_region);
            done += n;
        }
        Ok(())
    }
}

/// Position in the region's file of an entry's first byte.
pub(super) fn file_pos(region: &Region, sg: &DmaSg) -> Result<i64> {
    region
        .file_offset
        .checked_add(sg.offset)
        .and_then(|p| i64::try_from(p).ok())
        .ok_or(Errno::EINVAL)
}

/// Transfers exactly `n` bytes between `buf` and the file at `pos`, retrying
/// short transfers; any failure or end of file is `EIO`, as upstream.
pub(super) fn file_io(fd: &OwnedFd, pos: i64, buf: *mut u8, n: usize, write: bool) -> Result<()> {
    let mut done = 0usize;
    while done < n {
        let off = pos.checked_add(done as i64).ok_or(Errno::EIO)?;
        // SAFETY: `buf` points to at least `n` bytes owned by the caller (for
        // writes they are only read); the fd is open while we hold the Arc.
        let r = unsafe {
            let p = buf.add(done) as *mut c_void;
            if write {
                libc::pwrite(fd.as_raw_fd(), p, n - done, off)
            } else {
                libc::pread(fd.as_raw_fd(), p, n - done, off)
            }
        };
        if r < 0 {
            if Errno::last() == Errno(libc::EINTR) {
                continue;
            }
            return Err(Errno::EIO);
        }
        if r == 0 {
            return Err(Errno::EIO);
        }
        done += r as usize;
    }
    Ok(())
}
