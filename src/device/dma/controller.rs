use super::*;

pub(super) struct Inner {
    pub(super) regions: RegionTable<Region>,
    /// Logging page size, 0 when not logging.
    pub(super) dirty_page_size: u64,
}

/// The DMA controller of one device context. `Send + Sync`: every method
/// takes `&self`.
pub struct DmaController {
    pub(super) inner: RwLock<Inner>,
    pub(super) max_regions: usize,
    pub(super) max_size: u64,
    /// Current generation of the region table (see [`NEXT_GENERATION`]).
    pub(super) generation: AtomicU64,
    /// Lock-free copy of the table while it is small (`snap.rs`),
    /// republished under the write lock after every change, with a copy of
    /// `Inner::dirty_page_size` readable without the lock (so that
    /// `sgl_put` is free when not logging). Shared with the device context,
    /// whose C entry points read it directly (`fast.rs`).
    pub(super) snap: Arc<Snapshot>,
}

impl fmt::Debug for DmaController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DmaController")
            .field("regions", &self.region_count())
            .field("max_regions", &self.max_regions)
            .field(
                "logging_page_size",
                &self.snap.logging_page_size.load(Ordering::Relaxed),
            )
            .finish()
    }
}

impl DmaController {
    /// Creates an empty controller accepting at most `max_regions` regions of
    /// at most [`MAX_DMA_SIZE`] bytes each.
    pub fn new(max_regions: usize) -> Self {
        Self::with_snapshot(max_regions, Arc::default())
    }

    /// [`Self::new`], publishing its table into `snap` (which must be new:
    /// empty, with logging off).
    pub(crate) fn with_snapshot(max_regions: usize, snap: Arc<Snapshot>) -> Self {
        DmaController {
            inner: RwLock::new(Inner {
                regions: RegionTable::new(),
                dirty_page_size: 0,
            }),
            max_regions,
            max_size: MAX_DMA_SIZE,
            generation: AtomicU64::new(new_generation()),
            snap,
        }
    }

    /// Republishes the lock-free copy of the table; call with the write lock
    /// held (`inner`), after every change to the table.
    pub(super) fn publish_snapshot(&self, inner: &Inner) {
        let entries = inner.regions.values().map(|r| snap::Entry {
            start: r.iova,
            len: r.len,
            id: r.id,
            vaddr: if r.mode == AccessMode::Mmap {
                r.vaddr
            } else {
                0
            },
            prot: r.prot,
            slot: 0,
        });
        self.snap.publish(inner.regions.len(), entries);
    }

    pub(super) fn table(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn table_mut(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Must be called with the write lock held, after every removal from
    /// the table: it invalidates every thread's cached translations.
    pub(super) fn bump_generation(&self) {
        self.generation.store(new_generation(), Ordering::Release);
    }

    /// Registers a region of `len` bytes at `iova`.
    ///
    /// Without an fd the region is only reachable through DMA messages to the
    /// client. With an fd it is mapped into this process with protection
    /// `prot` (`PROT_READ`/`PROT_WRITE`) unless `file_io` is set, in which
    /// case the fd is kept for `pread`/`pwrite`. The fd is always consumed.
    ///
    /// Errors, as upstream: `ENOSPC` when `len` exceeds [`MAX_DMA_SIZE`];
    /// `EINVAL` when the range overlaps an existing region (registering an
    /// identical region again — same range, offset, file and protection — is
    /// accepted and returns the existing region), when the region limit is
    /// reached, for a zero length or a range that wraps the address space;
    /// the mmap errno when mapping fails.
    pub fn add_region(
        &self,
        iova: u64,
        len: u64,
        fd: Option<OwnedFd>,
        offset: u64,
        prot: i32,
        file_io: bool,
    ) -> Result<DmaInfo> {
        if prot & !(libc::PROT_READ | libc::PROT_WRITE) != 0 {
            return Err(Errno::EINVAL);
        }
        if len > self.max_size {
            return Err(Errno::ENOSPC);
        }
        // Upstream accepts empty regions; they can never be reached, so we
        // refuse them. Ranges ending past 2^64 are refused too.
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let end = iova.checked_add(len).ok_or(Errno::EINVAL)?;
        if file_io && fd.is_none() {
            return Err(Errno::EINVAL);
        }

        let mut inner = self.table_mut();

        // The first region ending after `iova` is the only candidate for an
        // overlap: any later one starts after it.
        let existing = inner
            .regions
            .last_starting_before(end)
            .filter(|r| r.end() > iova);
        if let Some(existing) = existing {
            if existing.iova == iova && existing.len == len {
                if existing.file_offset != offset {
                    return Err(Errno::EINVAL);
                }
                let same_file = match (&fd, existing.identity) {
                    (None, None) => true,
                    (Some(fd), Some(id)) => FileIdentity::of(fd).ok() == Some(id),
                    _ => false,
                };
                if !same_file || existing.prot != prot {
                    return Err(Errno::EINVAL);
                }
                // Identical re-registration: keep the existing region; the
                // new fd is closed when dropped.
                return Ok(existing.info());
            }
            return Err(Errno::EINVAL);
        }

        if inner.regions.len() >= self.max_regions {
            return Err(Errno::EINVAL);
        }

        let mode = match (&fd, file_io) {
            (None, _) => AccessMode::Message,
            (Some(_), true) => AccessMode::FileIo,
            (Some(_), false) => AccessMode::Mmap,
        };
        // One fstat for both the page size and the file's identity.
        let (page_size, identity) = match &fd {
            Some(fd) => {
                let st = fstat(fd)?;
                (fd_page_size(&st)?, Some(FileIdentity::from_stat(fd, &st)?))
            }
            None => (system_page_size(), None),
        };

        let dirty = if mode != AccessMode::Message && inner.dirty_page_size != 0 {
            Some(dirty_bitmap_for(len, inner.dirty_page_size)?)
        } else {
            None
        };

        let mut mapping = None;
        let mut vaddr = 0usize;
        let mut kept_fd = None;
        match (mode, fd) {
            (AccessMode::Mmap, Some(fd)) => {
                let (m, v) = map_fd(&fd, len, offset, prot, page_size)?;
                mapping = Some(m);
                vaddr = v;
                // The mapping keeps the file alive; the fd is not needed any
                // more (unlike upstream, which keeps every region's fd open
                // and needs a process-wide fd cache to keep their number down).
                drop(fd);
            }
            (AccessMode::FileIo, Some(fd)) => {
                if i64::try_from(offset).is_err() {
                    return Err(Errno::EINVAL);
                }
                kept_fd = Some(Arc::new(fd));
            }
            _ => {}
        }

        let region = Region {
            id: new_region_id(),
            iova,
            len,
            prot,
            mode,
            file_offset: offset,
            page_size,
            mapping,
            vaddr,
            fd: kept_fd,
            identity,
            dirty,
        };
        let info = region.info();
        inner.regions.insert(Box::new(region));
        self.publish_snapshot(&inner);
        // No new generation: a new region overlaps no existing one, so every
        // cached translation stays true (misses are never cached).
        Ok(info)
    }

    /// Looks up the region that starts exactly at `iova` and is exactly `len`
    /// bytes long (`ENOENT` otherwise) without removing it. The message
    /// handler uses this to run the unregister callback while the region is
    /// still usable.
    pub fn find_exact(&self, iova: u64, len: u64) -> Result<DmaInfo> {
        let inner = self.table();
        inner
            .regions
            .get(iova)
            .filter(|r| r.len == len)
            .map(|r| r.info())
            .ok_or(Errno::ENOENT)
    }

    /// The region with the lowest IOVA, if any.
    pub fn first_region(&self) -> Option<DmaInfo> {
        self.table().regions.values().next().map(|r| r.info())
    }

    /// Removes the region that starts exactly at `iova` and is exactly `len`
    /// bytes long (`ENOENT` otherwise, as upstream), unmapping it and closing
    /// its fd. The returned info describes the region as it was (its `vaddr`
    /// is no longer valid).
    pub fn remove_region(&self, iova: u64, len: u64) -> Result<DmaInfo> {
        let region = {
            let mut inner = self.table_mut();
            match inner.regions.get(iova) {
                Some(r) if r.len == len => {}
                _ => return Err(Errno::ENOENT),
            }
            let region = inner.regions.remove(iova).ok_or(Errno::ENOENT)?;
            self.publish_snapshot(&inner);
            self.bump_generation();
            region
        };
        // Unmapped here, outside the lock, once no lock-free access that
        // might still use it is in progress: nobody can reach it any more.
        rcu::synchronize();
        let info = region.info();
        drop(region);
        Ok(info)
    }

    /// Removes every region (lowest IOVA first) and returns what they were.
    pub fn remove_all(&self) -> Vec<DmaInfo> {
        let regions = {
            let mut inner = self.table_mut();
            let regions = inner.regions.take_all();
            self.publish_snapshot(&inner);
            self.bump_generation();
            regions
        };
        rcu::synchronize();
        regions.iter().map(|r| r.info()).collect()
    }

    /// Number of registered regions.
    pub fn region_count(&self) -> usize {
        self.table().regions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::dma::test_util::*;

    const PROT_RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

    #[test]
    fn map_unmap_memfd() {
        let dma = DmaController::new(10);
        let fd = memfd(4 * PAGE);
        pwrite_file(&fd, PAGE, b"hello");
        let keep = dup(&fd);
        let info = dma
            .add_region(0x10000, 2 * PAGE, Some(fd), PAGE, PROT_RW, false)
            .unwrap();
        assert_eq!(info.iova_start(), 0x10000);
        assert_eq!(info.iova_len(), 2 * PAGE);
        assert!(!info.vaddr.is_null());
        assert_eq!(info.mapping.iov_len as u64, 2 * PAGE);
        assert_eq!(info.page_size as u64, PAGE);
        assert_eq!(info.prot, PROT_RW as u32);
        // vaddr points at file offset PAGE.
        // SAFETY: the region is mapped readable and 2 pages long.
        let got = unsafe { std::slice::from_raw_parts(info.vaddr as *const u8, 5) }.to_vec();
        assert_eq!(got, b"hello");
        assert_eq!(dma.region_count(), 1);

        let removed = dma.remove_region(0x10000, 2 * PAGE).unwrap();
        assert_eq!(removed.iova_start(), 0x10000);
        assert_eq!(dma.region_count(), 0);
        assert_eq!(dma.remove_region(0x10000, 2 * PAGE), Err(Errno::ENOENT));
        drop(keep);
    }

    #[test]
    fn message_region_info() {
        let dma = DmaController::new(10);
        let info = dma
            .add_region(0x10000, PAGE, None, 0, PROT_RW, false)
            .unwrap();
        assert!(info.vaddr.is_null());
        assert!(info.mapping.iov_base.is_null());
        assert_eq!(info.mapping.iov_len, 0);
        assert_eq!(info.page_size, system_page_size());
        let sg = sg1(&dma, 0x10000, PAGE, PROT_RW);
        assert!(!dma.sg_is_mappable(&sg));
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }];
        assert_eq!(dma.sgl_get(&[sg], &mut iov), Err(Errno::EFAULT));
        // FILE_IO needs an fd.
        assert_eq!(
            dma.add_region(0x90000, PAGE, None, 0, PROT_RW, true)
                .unwrap_err(),
            Errno::EINVAL
        );
    }

    #[test]
    fn overlap_and_identical_remap() {
        let dma = DmaController::new(10);
        let fd = memfd(4 * PAGE);
        let fd2 = dup(&fd);
        let fd3 = dup(&fd);
        let a = dma
            .add_region(0x4000, 2 * PAGE, Some(fd), 0, PROT_RW, false)
            .unwrap();
        // Overlaps: upstream reports EINVAL.
        for (iova, len) in [
            (0x3000, 2 * PAGE),
            (0x5000, PAGE),
            (0x4000, PAGE),
            (0x0, 0x10000),
        ] {
            assert_eq!(
                dma.add_region(iova, len, None, 0, PROT_RW, false)
                    .unwrap_err(),
                Errno::EINVAL,
                "{iova:#x}"
            );
        }
        // Adjacent is fine.
        dma.add_region(0x2000, 2 * PAGE, None, 0, PROT_RW, false)
            .unwrap();
        dma.add_region(0x6000, PAGE, None, 0, PROT_RW, false)
            .unwrap();
        // Identical: accepted, same region.
        let b = dma
            .add_region(0x4000, 2 * PAGE, Some(fd2), 0, PROT_RW, false)
            .unwrap();
        assert_eq!(a.vaddr, b.vaddr);
        assert_eq!(dma.region_count(), 3);
        // Same range, different prot / offset / file: EINVAL.
        assert_eq!(
            dma.add_region(0x4000, 2 * PAGE, Some(fd3), 0, libc::PROT_READ, false)
                .unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            dma.add_region(0x4000, 2 * PAGE, Some(memfd(4 * PAGE)), 0, PROT_RW, false)
                .unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            dma.add_region(0x4000, 2 * PAGE, None, 0, PROT_RW, false)
                .unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(dma.region_count(), 3);
    }

    #[test]
    fn size_limits() {
        let dma = DmaController::new(3);
        assert_eq!(
            dma.add_region(0x1000, MAX_DMA_SIZE + PAGE, None, 0, PROT_RW, false)
                .unwrap_err(),
            Errno::ENOSPC
        );
        dma.add_region(1 << 50, MAX_DMA_SIZE, None, 0, PROT_RW, false)
            .unwrap();
        assert_eq!(
            dma.add_region(0x1000, 0, None, 0, PROT_RW, false)
                .unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            dma.add_region(u64::MAX - 0xfff, 0x2000, None, 0, PROT_RW, false)
                .unwrap_err(),
            Errno::EINVAL
        );
        assert_eq!(
            dma.add_region(0, PAGE, None, 0, libc::PROT_EXEC, false)
                .unwrap_err(),
            Errno::EINVAL
        );
    }

    #[test]
    fn max_regions() {
        let dma = DmaController::new(4);
        for i in 0..4 {
            dma.add_region(i * PAGE, PAGE, None, 0, PROT_RW, false)
                .unwrap();
        }
        assert_eq!(
            dma.add_region(10 * PAGE, PAGE, None, 0, PROT_RW, false)
                .unwrap_err(),
            Errno::EINVAL
        );
        // An identical re-map does not count as a new region.
        dma.add_region(0, PAGE, None, 0, PROT_RW, false).unwrap();
        dma.remove_region(0, PAGE).unwrap();
        dma.add_region(10 * PAGE, PAGE, None, 0, PROT_RW, false)
            .unwrap();
    }

    #[test]
    fn exact_match_unmap_and_remove_all() {
        let dma = DmaController::new(10);
        dma.add_region(0x1000, 0x2000, None, 0, PROT_RW, false)
            .unwrap();
        dma.add_region(0x8000, 0x1000, Some(memfd(PAGE)), 0, PROT_RW, false)
            .unwrap();
        assert_eq!(dma.remove_region(0x1000, 0x1000), Err(Errno::ENOENT));
        assert_eq!(dma.remove_region(0x2000, 0x1000), Err(Errno::ENOENT));
        assert_eq!(dma.remove_region(0x1000, 0x3000), Err(Errno::ENOENT));
        assert_eq!(dma.find_exact(0x1000, 0x2000).unwrap().iova_start(), 0x1000);
        assert_eq!(dma.find_exact(0x1000, 0x1000).unwrap_err(), Errno::ENOENT);
        assert_eq!(dma.first_region().unwrap().iova_start(), 0x1000);
        let all = dma.remove_all();
        assert_eq!(
            all.iter().map(DmaInfo::iova_start).collect::<Vec<_>>(),
            vec![0x1000, 0x8000]
        );
        assert_eq!(dma.region_count(), 0);
        assert!(dma.first_region().is_none());
    }
}
