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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::dma::test_util::*;
    use std::time::Instant;

    const PROT_RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

    #[test]
    fn sg_access_modes() {
        let dma = DmaController::new(10);
        let fd_m = memfd(4 * PAGE);
        let fd_f = memfd(4 * PAGE);
        let keep_m = dup(&fd_m);
        let keep_f = dup(&fd_f);
        dma.add_region(0x10000, 2 * PAGE, Some(fd_m), PAGE, PROT_RW, false)
            .unwrap();
        dma.add_region(0x20000, 2 * PAGE, Some(fd_f), PAGE, PROT_RW, true)
            .unwrap();
        dma.add_region(0x30000, 2 * PAGE, None, 0, PROT_RW, false)
            .unwrap();
        dma.logging_start(PAGE, &[]).unwrap();

        let data: Vec<u8> = (0..100u8).collect();
        for base in [0x10000u64, 0x20000] {
            let sg = sg1(&dma, base + PAGE + 10, 100, PROT_RW);
            // Without the direct flag everything goes to the client.
            let mut tmp = data.clone();
            assert_eq!(dma.sg_access(&sg, &mut tmp, true, false), Ok(false));
            assert_eq!(dma.sg_write(&sg, &data, true), Ok(true));
            let mut back = vec![0u8; 100];
            assert_eq!(dma.sg_read(&sg, &mut back, true), Ok(true));
            assert_eq!(back, data);
            // Short buffer.
            assert_eq!(dma.sg_read(&sg, &mut back[..99], true), Err(Errno::EINVAL));
            // Dirty page: second page of the region.
            assert_eq!(bits(&report(&dma, base, 2 * PAGE, PAGE).unwrap()), 0b10);
        }
        // The bytes landed in the files at offset PAGE + PAGE + 10.
        assert_eq!(pread_file(&keep_m, 2 * PAGE + 10, 100), data);
        assert_eq!(pread_file(&keep_f, 2 * PAGE + 10, 100), data);
        // Message-only region.
        let sg = sg1(&dma, 0x30000, 100, PROT_RW);
        let mut buf = vec![0u8; 100];
        assert_eq!(dma.sg_access(&sg, &mut buf, false, true), Ok(false));
        assert_eq!(dma.sg_access(&sg, &mut buf, true, true), Ok(false));
        // FILE_IO past the end of the file: EIO.
        let sg = sg1(&dma, 0x20000 + PAGE, PAGE, PROT_RW);
        nix::unistd::ftruncate(&keep_f, PAGE as i64).unwrap();
        let mut big = vec![0u8; PAGE as usize];
        assert_eq!(dma.sg_read(&sg, &mut big, true), Err(Errno::EIO));
    }

    #[test]
    fn concurrent_access_while_mapping() {
        let dma = Arc::new(DmaController::new(100_000));
        // Each thread touches only its own pages (page % 3 == thread), so
        // that any race ThreadSanitizer sees is the library's.
        let stable = memfd(18 * PAGE);
        dma.add_region(0, 18 * PAGE, Some(stable), 0, PROT_RW, false)
            .unwrap();
        dma.logging_start(PAGE, &[]).unwrap();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut threads = Vec::new();
        for t in 0..3u64 {
            let dma = Arc::clone(&dma);
            let stop = Arc::clone(&stop);
            threads.push(std::thread::spawn(move || {
                let mut ops = 0u64;
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) || ops < 1000 {
                    // Stable region: must always work.
                    let page = t + 3 * (i % 6);
                    let mut sgl = [DmaSg::default()];
                    assert_eq!(dma.addr_to_sgl(page * PAGE, PAGE, &mut sgl, PROT_RW), Ok(1));
                    let mut iov = [libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: 0,
                    }];
                    dma.sgl_get(&sgl, &mut iov).unwrap();
                    let src = [t as u8 + 1; 64];
                    // SAFETY: iov is a writable mapping of a whole page.
                    unsafe {
                        std::ptr::copy_nonoverlapping(src.as_ptr(), iov[0].iov_base as *mut u8, 64)
                    };
                    dma.sgl_put(&sgl);
                    // Volatile regions: may fail, must not crash.
                    let v = 0x100_0000 + (t + 3 * (i % 21)) * PAGE;
                    if let Ok(1) = dma.addr_to_sgl(v, PAGE, &mut sgl, PROT_RW) {
                        let mut buf = vec![0u8; PAGE as usize];
                        match dma.sg_write(&sgl[0], &buf, true) {
                            Ok(true) | Err(Errno::EINVAL) => {}
                            other => panic!("unexpected {other:?}"),
                        }
                        match dma.sg_read(&sgl[0], &mut buf, true) {
                            Ok(true) | Err(Errno::EINVAL) => {}
                            other => panic!("unexpected {other:?}"),
                        }
                        let _ = dma.sgl_get(&sgl, &mut iov);
                        dma.sgl_put(&sgl);
                    }
                    ops += 1;
                    i += 1;
                }
                ops
            }));
        }
        let start = Instant::now();
        let mut round = 0u64;
        while start.elapsed().as_millis() < 300 || round < 20 {
            for k in 0..64u64 {
                let iova = 0x100_0000 + k * PAGE;
                dma.add_region(iova, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
                    .unwrap();
            }
            for k in 0..64u64 {
                let iova = 0x100_0000 + k * PAGE;
                dma.remove_region(iova, PAGE).unwrap();
            }
            round += 1;
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            assert!(t.join().unwrap() >= 1000);
        }
        // Every page of the stable region was dirtied.
        let bm = report(&dma, 0, 18 * PAGE, PAGE).unwrap();
        assert_eq!(bits(&bm), 0x3ffff);
    }

    #[test]
    fn lock_free_access_races_unmap() {
        // Threads read and write a region through their translation caches
        // (the lock-free path) while this thread unmaps it and maps a new
        // file at the same address, over and over. Unmapping must wait for
        // copies in progress (else: SIGSEGV, or a copy landing in whatever
        // the kernel maps there next), and every read must see one file's
        // bytes, whole. Each thread keeps to its own half of the region, so
        // that any race ThreadSanitizer sees is the library's.
        const LEN: u64 = 16 * PAGE;
        const HALF: u64 = LEN / 2;
        const IOVA: u64 = 0x4000_0000;
        let dma = Arc::new(DmaController::new(16));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for t in 0..2u64 {
            let (dma, stop, hits) = (Arc::clone(&dma), Arc::clone(&stop), Arc::clone(&hits));
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; HALF as usize];
                let mut sgl = [DmaSg::default()];
                let iova = IOVA + t * HALF;
                while !stop.load(Ordering::Relaxed) {
                    if dma.addr_to_sgl(iova, HALF, &mut sgl, PROT_RW) != Ok(1) {
                        continue;
                    }
                    if let Ok(true) = dma.sg_read(&sgl[0], &mut buf, true) {
                        let first = buf[0];
                        assert_ne!(first, 0, "read a region that was never filled");
                        assert!(buf.iter().all(|&b| b == first), "torn read");
                        hits.fetch_add(1, Ordering::Relaxed);
                        if t == 1 {
                            // Write back what was read: the next read of
                            // this region still sees one byte throughout.
                            if let Ok(true) = dma.sg_write(&sgl[0], &buf, true) {
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }));
        }
        let start = Instant::now();
        let mut round = 0u8;
        while start.elapsed() < std::time::Duration::from_millis(400)
            || hits.load(Ordering::Relaxed) < 200
        {
            round = round % 250 + 1;
            let fd = memfd(LEN);
            pwrite_file(&fd, 0, &vec![round; LEN as usize]);
            dma.add_region(IOVA, LEN, Some(fd), 0, PROT_RW, false)
                .unwrap();
            std::thread::yield_now();
            dma.remove_region(IOVA, LEN).unwrap();
            assert!(
                start.elapsed() < std::time::Duration::from_secs(60),
                "readers made no progress"
            );
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn guest_slice_reads_writes_and_checks_bounds() {
        let dma = DmaController::new(8);
        let f1 = memfd(2 * PAGE);
        let f2 = memfd(2 * PAGE);
        dma.add_region(0x10000, 2 * PAGE, Some(dup(&f1)), 0, PROT_RW, false)
            .unwrap();
        // Adjacent region: a slice may span both.
        dma.add_region(0x12000, 2 * PAGE, Some(dup(&f2)), 0, PROT_RW, false)
            .unwrap();
        pwrite_file(&f1, 0x1ffe, &[1, 2]);
        pwrite_file(&f2, 0, &[3, 4]);
        let got = dma
            .with_guest(0x11ffe, 4, PROT_RW, |mem| {
                assert_eq!(mem.len(), 4);
                assert_eq!(mem.iova(), 0x11ffe);
                assert!(mem.is_writable());
                let mut b = [0u8; 4];
                mem.read_at(0, &mut b).unwrap();
                mem.write_at(1, &[9, 8]).unwrap();
                // Out of bounds, or overflowing offsets.
                assert_eq!(mem.read_at(3, &mut [0; 2]), Err(Errno::EFAULT));
                assert_eq!(mem.write_at(5, &[]), Err(Errno::EFAULT));
                assert_eq!(mem.read_at(usize::MAX, &mut [0; 2]), Err(Errno::EFAULT));
                // An empty access at the very end is fine.
                mem.read_at(4, &mut []).unwrap();
                (b, mem.to_vec().unwrap())
            })
            .unwrap();
        assert_eq!(got.0, [1, 2, 3, 4]);
        assert_eq!(got.1, [1, 9, 8, 4]);
        assert_eq!(pread_file(&f1, 0x1ffe, 2), [1, 9]);
        assert_eq!(pread_file(&f2, 0, 2), [8, 4]);

        // Read-only borrow: no writes; write-only borrow: no reads.
        dma.with_guest(0x10000, 16, PROT_READ, |mem| {
            assert!(!mem.is_writable());
            assert_eq!(mem.write_at(0, &[1]), Err(Errno::EPERM));
        })
        .unwrap();
        dma.with_guest(0x10000, 16, PROT_WRITE, |mem| {
            assert_eq!(mem.read_at(0, &mut [0]), Err(Errno::EPERM));
            assert_eq!(mem.to_vec(), Err(Errno::EPERM));
        })
        .unwrap();

        // Holes, wrapping ranges, bad prot.
        assert_eq!(
            dma.with_guest(0x13000, 2 * PAGE as usize, PROT_READ, |_| ()),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            dma.with_guest(0xf000, 0x1001, PROT_READ, |_| ()),
            Err(Errno::ENOENT)
        );
        assert_eq!(
            dma.with_guest(u64::MAX, 2, PROT_READ, |_| ()),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            dma.with_guest(0x10000, 1, libc::PROT_EXEC, |_| ()),
            Err(Errno::EINVAL)
        );
        // An empty range needs no mapping.
        assert_eq!(dma.with_guest(0, 0, PROT_RW, |m| m.is_empty()), Ok(true));
    }

    #[test]
    fn guest_slice_refuses_unmapped_and_read_only_regions() {
        let dma = DmaController::new(8);
        // Message-only region and a file-I/O region: not in our memory.
        dma.add_region(0x1000, PAGE, None, 0, PROT_RW, false)
            .unwrap();
        let fio = memfd(PAGE);
        dma.add_region(0x4000, PAGE, Some(dup(&fio)), 0, PROT_RW, true)
            .unwrap();
        let ro = memfd(PAGE);
        dma.add_region(0x8000, PAGE, Some(dup(&ro)), 0, libc::PROT_READ, false)
            .unwrap();
        assert_eq!(
            dma.with_guest(0x1000, 4, PROT_READ, |_| ()),
            Err(Errno::EFAULT)
        );
        assert_eq!(
            dma.with_guest(0x4000, 4, PROT_READ, |_| ()),
            Err(Errno::EFAULT)
        );
        assert_eq!(
            dma.with_guest(0x8000, 4, PROT_RW, |_| ()),
            Err(Errno::EACCES)
        );
        pwrite_file(&ro, 0, &[7]);
        assert_eq!(
            dma.with_guest(0x8000, 1, PROT_READ, |m| m.to_vec()),
            Ok(Ok(vec![7]))
        );

        // read/write: file I/O works, messages do not, read-only refuses.
        dma.write(0x4ffe, &[5, 6]).unwrap();
        assert_eq!(pread_file(&fio, 0xffe, 2), [5, 6]);
        let mut b = [0u8; 2];
        dma.read(0x4ffe, &mut b).unwrap();
        assert_eq!(b, [5, 6]);
        assert_eq!(dma.read(0x1000, &mut b), Err(Errno::EFAULT));
        assert_eq!(dma.write(0x8000, &b), Err(Errno::EACCES));
        assert_eq!(dma.read(0x2000, &mut b), Err(Errno::ENOENT));
        dma.read(0x8000, &mut b[..1]).unwrap();
        assert_eq!(b[0], 7);
        // Zero-length transfers succeed anywhere.
        dma.read(0xdead_0000, &mut []).unwrap();
    }

    #[test]
    fn read_write_span_regions_and_mark_dirty() {
        let dma = DmaController::new(8);
        let f1 = memfd(2 * PAGE);
        let f2 = memfd(2 * PAGE);
        dma.add_region(0, 2 * PAGE, Some(dup(&f1)), 0, PROT_RW, false)
            .unwrap();
        dma.add_region(2 * PAGE, 2 * PAGE, Some(dup(&f2)), 0, PROT_RW, true)
            .unwrap();
        dma.logging_start(PAGE, &[]).unwrap();
        let data: Vec<u8> = (0..=255u8).cycle().take(PAGE as usize + 8).collect();
        dma.write(PAGE + PAGE / 2, &data).unwrap();
        let mut back = vec![0u8; data.len()];
        dma.read(PAGE + PAGE / 2, &mut back).unwrap();
        assert_eq!(back, data);
        assert_eq!(pread_file(&f2, 0, 4), data[PAGE as usize / 2..][..4]);
        assert_eq!(bits(&report(&dma, 0, 2 * PAGE, PAGE).unwrap()), 0b10);
        assert_eq!(bits(&report(&dma, 2 * PAGE, 2 * PAGE, PAGE).unwrap()), 0b1);

        // Writes through a guest slice are logged too, reads are not.
        dma.with_guest(0, 2 * PAGE as usize, PROT_RW, |m| {
            m.read_at(0, &mut [0; 8]).unwrap();
            m.write_at(PAGE as usize + 1, &[1]).unwrap();
        })
        .unwrap();
        assert_eq!(bits(&report(&dma, 0, 2 * PAGE, PAGE).unwrap()), 0b10);
        assert_eq!(bits(&report(&dma, 0, 2 * PAGE, PAGE).unwrap()), 0);
    }

    #[test]
    fn unmap_waits_for_guest_slice() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Barrier;
        let dma = Arc::new(DmaController::new(4));
        dma.add_region(0x1000, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
            .unwrap();
        let inside = Arc::new(Barrier::new(2));
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (dma, inside, done) = (dma.clone(), inside.clone(), done.clone());
            std::thread::spawn(move || {
                dma.with_guest(0x1000, 16, PROT_RW, |m| {
                    inside.wait();
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    m.write_at(0, &[1; 16]).unwrap();
                    done.store(true, Ordering::SeqCst);
                })
                .unwrap();
            })
        };
        inside.wait();
        dma.remove_region(0x1000, PAGE).unwrap();
        assert!(done.load(Ordering::SeqCst), "unmapped under a live slice");
        t.join().unwrap();
        assert_eq!(
            dma.with_guest(0x1000, 16, PROT_RW, |_| ()),
            Err(Errno::ENOENT)
        );
    }
}
