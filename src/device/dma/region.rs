use super::*;

/// How the server reaches a region's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum AccessMode {
    /// No fd: only through VFIO_USER_DMA_READ/WRITE messages.
    Message,
    /// The fd is mapped into this process.
    Mmap,
    /// `pread`/`pwrite` on the fd.
    FileIo,
}

/// What makes two fds "the same file" for an identical re-map: device,
/// inode and open flags (upstream's fallback criterion when `kcmp` is not
/// available; we always use it so that mmap'ed regions need not keep their
/// fd open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct FileIdentity {
    pub(super) dev: u64,
    pub(super) ino: u64,
    pub(super) flags: i32,
}

impl FileIdentity {
    pub(super) fn of(fd: &OwnedFd) -> Result<FileIdentity> {
        Self::from_stat(fd, &fstat(fd)?)
    }

    /// The identity of `fd`, whose `fstat` is `st`.
    pub(super) fn from_stat(fd: &OwnedFd, st: &libc::stat) -> Result<FileIdentity> {
        let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)?;
        Ok(FileIdentity {
            dev: st.st_dev,
            ino: st.st_ino,
            flags,
        })
    }
}

pub(super) fn fstat(fd: &OwnedFd) -> Result<libc::stat> {
    // The client sees any fstat failure as EINVAL.
    nix::sys::stat::fstat(fd).map_err(|_| Errno::EINVAL)
}

/// A private shared mapping of a region's fd; unmapped on drop.
pub(super) struct Mapping {
    pub(super) base: usize,
    pub(super) len: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what a successful mmap returned and
        // nothing else unmaps them; every user of the memory goes through the
        // region table, from which the owning region was removed first.
        unsafe {
            libc::munmap(self.base as *mut c_void, self.len);
        }
    }
}

/// One registered region. `repr(C)` to keep the fields a lookup reads
/// together at the front, in the first cache line.
#[repr(C)]
pub(super) struct Region {
    pub(super) id: usize,
    pub(super) iova: u64,
    pub(super) len: u64,
    /// Local address of the first byte (0 when not mapped).
    pub(super) vaddr: usize,
    pub(super) prot: i32,
    pub(super) mode: AccessMode,
    /// Offset of the region in its file.
    pub(super) file_offset: u64,
    pub(super) page_size: usize,
    pub(super) mapping: Option<Mapping>,
    /// Kept only for FILE_IO regions (shared so that I/O can run without the
    /// table lock held).
    pub(super) fd: Option<Arc<OwnedFd>>,
    pub(super) identity: Option<FileIdentity>,
    /// One bit per logging page while dirty page logging is on.
    pub(super) dirty: Option<Box<[AtomicU64]>>,
}

impl Span for Region {
    fn start(&self) -> u64 {
        self.iova
    }
    fn len(&self) -> u64 {
        self.len
    }
}

impl Region {
    pub(super) fn end(&self) -> u64 {
        // Cannot overflow: checked when the region was added.
        self.iova + self.len
    }

    pub(super) fn info(&self) -> DmaInfo {
        let (map_base, map_len) = match &self.mapping {
            Some(m) => (m.base, m.len),
            None => (0, 0),
        };
        DmaInfo {
            iova: libc::iovec {
                iov_base: self.iova as usize as *mut c_void,
                iov_len: self.len as usize,
            },
            vaddr: self.vaddr as *mut c_void,
            mapping: libc::iovec {
                iov_base: map_base as *mut c_void,
                iov_len: map_len,
            },
            page_size: self.page_size,
            prot: self.prot as u32,
        }
    }

    /// Sets the dirty bits of the pages touched by `[offset, offset + len)`
    /// (offsets within the region). No-op without a bitmap.
    pub(super) fn mark_dirty(&self, offset: u64, len: u64, page_size: u64) {
        let Some(bits) = &self.dirty else { return };
        if len == 0 || page_size == 0 {
            return;
        }
        let Some(end) = offset.checked_add(len) else {
            return;
        };
        let first = offset / page_size;
        let last = end.div_ceil(page_size);
        set_bits(bits, first, last);
    }
}

pub(super) fn system_page_size() -> usize {
    let v = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(0);
    if v > 0 {
        v as usize
    } else {
        4096
    }
}

/// The page size for a region backed by a file whose `fstat` is `st`: the larger of the system page
/// size and the file's block size (hugetlbfs reports its huge page size), as
/// upstream. A block size that is not a multiple of the system page size
/// cannot be used to align a mapping, so it is ignored.
pub(super) fn fd_page_size(st: &libc::stat) -> Result<usize> {
    let sys = system_page_size();
    let blk = usize::try_from(st.st_blksize).map_err(|_| Errno::EINVAL)?;
    if blk > sys && blk % sys == 0 {
        Ok(blk)
    } else {
        Ok(sys)
    }
}

/// Process-wide source of region table generations, so that a generation
/// identifies one shape of one controller's table and a thread's cached
/// translation can never be mistaken for another controller's.
pub(super) static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);
/// Process-wide source of region identifiers.
pub(super) static NEXT_REGION_ID: AtomicUsize = AtomicUsize::new(1);

pub(super) fn new_generation() -> u64 {
    NEXT_GENERATION.fetch_add(1, Ordering::Relaxed)
}

pub(super) fn new_region_id() -> usize {
    loop {
        let id = NEXT_REGION_ID.fetch_add(1, Ordering::Relaxed);
        // C callers (and upstream's Python bindings) may read the field as a
        // 32-bit int; keep that part non-zero too.
        if id as u32 != 0 {
            return id;
        }
    }
}

/// Maps `len` bytes of `fd` at `offset` shared with protection `prot`.
/// Returns the mapping and the local address of byte `offset`.
pub(super) fn map_fd(
    fd: &OwnedFd,
    len: u64,
    offset: u64,
    prot: i32,
    page_size: usize,
) -> Result<(Mapping, usize)> {
    let page = page_size as u64;
    let aligned = offset - offset % page;
    let delta = offset - aligned;
    // Upstream maps round_up(len) bytes from the rounded-down offset, which
    // falls short of the region's end when the offset is not page aligned;
    // we include the leading slack.
    let map_len = len
        .checked_add(delta)
        .and_then(|l| l.checked_next_multiple_of(page))
        .and_then(|l| usize::try_from(l).ok())
        .ok_or(Errno::EINVAL)?;
    let file_off = libc::off_t::try_from(aligned).map_err(|_| Errno::EINVAL)?;
    if !offset
        .checked_add(len)
        .is_some_and(|e| i64::try_from(e).is_ok())
    {
        return Err(Errno::EINVAL);
    }
    // SAFETY: a fresh mapping at an address of the kernel's choosing; it does
    // not alias any Rust object.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            map_len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            file_off,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(Errno::last());
    }
    // Keep guest memory out of core dumps, as upstream. Failure is harmless.
    // SAFETY: the range is the mapping just created.
    unsafe {
        libc::madvise(base, map_len, libc::MADV_DONTDUMP);
    }
    let base = base as usize;
    Ok((Mapping { base, len: map_len }, base + delta as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::dma::test_util::*;

    const PROT_RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

    #[test]
    fn unaligned_offset_mapping_covers_region() {
        let dma = DmaController::new(10);
        let fd = memfd(4 * PAGE);
        let keep = dup(&fd);
        pwrite_file(&keep, 0x1800 + PAGE - 1, b"Z");
        let info = dma
            .add_region(0x0, PAGE, Some(fd), 0x1800, PROT_RW, false)
            .unwrap();
        assert_eq!(info.mapping.iov_len as u64, 2 * PAGE);
        // SAFETY: the last byte of the region lies inside the mapping.
        let last = unsafe { *(info.vaddr as *const u8).add(PAGE as usize - 1) };
        assert_eq!(last, b'Z');
    }
}
