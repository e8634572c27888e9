use super::*;
use std::os::fd::FromRawFd;
use std::time::Instant;

const PROT_RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
const PAGE: u64 = 4096;

fn memfd(size: u64) -> OwnedFd {
    // SAFETY: the name is a valid C string.
    let fd = unsafe { libc::memfd_create(c"dma-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: fd is a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: the fd is open.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    assert_eq!(r, 0);
    fd
}

fn dup(fd: &OwnedFd) -> OwnedFd {
    fd.try_clone().unwrap()
}

fn pread_file(fd: &OwnedFd, off: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SAFETY: v has n bytes.
    let r = unsafe { libc::pread(fd.as_raw_fd(), v.as_mut_ptr() as *mut c_void, n, off as i64) };
    assert_eq!(r, n as isize);
    v
}

fn pwrite_file(fd: &OwnedFd, off: u64, data: &[u8]) {
    // SAFETY: data is a valid buffer.
    let r = unsafe {
        libc::pwrite(
            fd.as_raw_fd(),
            data.as_ptr() as *const c_void,
            data.len(),
            off as i64,
        )
    };
    assert_eq!(r, data.len() as isize);
}

fn sg1(dma: &DmaController, iova: u64, len: u64, prot: i32) -> DmaSg {
    let mut sgl = [DmaSg::default()];
    assert_eq!(dma.addr_to_sgl(iova, len, &mut sgl, prot), Ok(1));
    sgl[0]
}

fn report(dma: &DmaController, iova: u64, len: u64, pg: u64) -> Result<Vec<u8>> {
    let mut bm = vec![0u8; bitmap_size(len, pg)?];
    dma.logging_report(iova, len, pg, &mut bm)?;
    Ok(bm)
}

fn bits(bm: &[u8]) -> u128 {
    let mut v = 0u128;
    for (i, b) in bm.iter().take(16).enumerate() {
        v |= u128::from(*b) << (8 * i);
    }
    v
}

#[test]
fn layouts_match_upstream() {
    assert_eq!(std::mem::size_of::<DmaSg>(), 40);
    assert_eq!(std::mem::offset_of!(DmaSg, dma_addr), 0);
    assert_eq!(std::mem::offset_of!(DmaSg, region), 8);
    assert_eq!(std::mem::offset_of!(DmaSg, length), 16);
    assert_eq!(std::mem::offset_of!(DmaSg, offset), 24);
    assert_eq!(std::mem::offset_of!(DmaSg, writeable), 32);
    // The lookup hint lives in what upstream leaves as padding.
    assert_eq!(std::mem::offset_of!(DmaSg, hint), 33);
    assert_eq!(std::mem::size_of::<DmaInfo>(), 56);
    assert_eq!(std::mem::offset_of!(DmaInfo, iova), 0);
    assert_eq!(std::mem::offset_of!(DmaInfo, vaddr), 16);
    assert_eq!(std::mem::offset_of!(DmaInfo, mapping), 24);
    assert_eq!(std::mem::offset_of!(DmaInfo, page_size), 40);
    assert_eq!(std::mem::offset_of!(DmaInfo, prot), 48);
    fn send_sync<T: Send + Sync>() {}
    send_sync::<DmaController>();
}

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

#[test]
fn addr_to_sgl_across_adjacent_regions() {
    let dma = DmaController::new(10);
    let fd = memfd(4 * PAGE);
    for i in 1..4u64 {
        dma.add_region(
            i * PAGE,
            PAGE,
            Some(dup(&fd)),
            (i - 1) * PAGE,
            PROT_RW,
            false,
        )
        .unwrap();
    }
    let mut sgl = [DmaSg::default(); 3];
    assert_eq!(
        dma.addr_to_sgl(PAGE + 0x800, 2 * PAGE, &mut sgl, libc::PROT_READ),
        Ok(3)
    );
    assert_eq!(sgl[0].dma_addr as u64, PAGE);
    assert_eq!((sgl[0].offset, sgl[0].length), (0x800, 0x800));
    assert_eq!(
        (sgl[1].dma_addr as u64, sgl[1].offset, sgl[1].length),
        (2 * PAGE, 0, PAGE)
    );
    assert_eq!(
        (sgl[2].dma_addr as u64, sgl[2].offset, sgl[2].length),
        (3 * PAGE, 0, 0x800)
    );
    assert!(!sgl[0].writeable);
    assert!(sgl.iter().all(|s| s.region != 0 && s.region as u32 != 0));
    assert_ne!(sgl[0].region, sgl[1].region);
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 3];
    dma.sgl_get(&sgl, &mut iov).unwrap();
    assert_eq!(
        iov.iter().map(|v| v.iov_len).collect::<Vec<_>>(),
        vec![0x800, 0x1000, 0x800]
    );
    // Shorter iov array.
    assert_eq!(dma.sgl_get(&sgl, &mut iov[..2]), Err(Errno::EINVAL));

    // Holes and unmapped addresses.
    let mut one = [DmaSg::default()];
    assert_eq!(
        dma.addr_to_sgl(0, 16, &mut one, 0),
        Err(SglError::Errno(Errno::ENOENT))
    );
    assert_eq!(
        dma.addr_to_sgl(3 * PAGE, 2 * PAGE, &mut one, 0),
        Err(SglError::Errno(Errno::ENOENT))
    );
    assert_eq!(
        dma.addr_to_sgl(PAGE, u64::MAX, &mut one, 0),
        Err(SglError::Errno(Errno::ENOENT))
    );
    // Zero length.
    assert_eq!(dma.addr_to_sgl(PAGE, 0, &mut one, 0), Ok(0));
    // A hole between two regions.
    dma.add_region(5 * PAGE, PAGE, None, 0, PROT_RW, false)
        .unwrap();
    let mut three = [DmaSg::default(); 3];
    assert_eq!(
        dma.addr_to_sgl(3 * PAGE, 3 * PAGE, &mut three, 0),
        Err(SglError::Errno(Errno::ENOENT))
    );
    assert_eq!(dma.addr_to_sgl(5 * PAGE + 1, 16, &mut three, 0), Ok(1));
}

#[test]
fn addr_to_sgl_need_more() {
    let dma = DmaController::new(10);
    for i in 0..4u64 {
        dma.add_region(i * PAGE, PAGE, None, 0, PROT_RW, false)
            .unwrap();
    }
    let mut sgl = [DmaSg::default(); 2];
    assert_eq!(
        dma.addr_to_sgl(0, 4 * PAGE, &mut sgl, 0),
        Err(SglError::NeedMore(4))
    );
    // The first entries were still filled.
    assert_eq!((sgl[1].dma_addr as u64, sgl[1].length), (PAGE, PAGE));
    assert_eq!(
        dma.addr_to_sgl(0, 3 * PAGE, &mut [], 0),
        Err(SglError::NeedMore(3))
    );
    assert_eq!(
        dma.addr_to_sgl(0, PAGE, &mut [], 0),
        Err(SglError::NeedMore(1))
    );
}

#[test]
fn prot_violations() {
    let dma = DmaController::new(10);
    let fd = memfd(2 * PAGE);
    dma.add_region(0, PAGE, Some(fd), 0, libc::PROT_READ, false)
        .unwrap();
    dma.add_region(PAGE, PAGE, None, 0, PROT_RW, false).unwrap();
    let mut sgl = [DmaSg::default(); 2];
    // Slow path, then fast path (hint now set).
    for _ in 0..2 {
        assert_eq!(
            dma.addr_to_sgl(0, 16, &mut sgl, PROT_RW),
            Err(SglError::Errno(Errno::EACCES))
        );
        assert_eq!(dma.addr_to_sgl(0, 16, &mut sgl, libc::PROT_READ), Ok(1));
    }
    assert_eq!(
        dma.addr_to_sgl(0, 2 * PAGE, &mut sgl, libc::PROT_WRITE),
        Err(SglError::Errno(Errno::EACCES))
    );
    // Reading is fine; writing through a read entry is EPERM.
    let sg = sgl[0];
    let mut buf = [0u8; 16];
    assert_eq!(dma.sg_access(&sg, &mut buf, true, true), Err(Errno::EPERM));
    assert_eq!(dma.sg_access(&sg, &mut buf, false, true), Ok(true));
    // A forged writeable entry on a read-only region is refused.
    let mut forged = sg;
    forged.writeable = true;
    assert_eq!(dma.sg_write(&forged, &buf, true), Err(Errno::EACCES));
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }];
    assert_eq!(dma.sgl_get(&[forged], &mut iov), Err(Errno::EACCES));
}

#[test]
fn sgl_get_put_dirty() {
    let dma = DmaController::new(10);
    let fd = memfd(0x20 * PAGE);
    dma.add_region(0x10 * PAGE, 0x20 * PAGE, Some(fd), 0, PROT_RW, false)
        .unwrap();
    dma.add_region(0x40 * PAGE, 0x10 * PAGE, None, 0, PROT_RW, false)
        .unwrap();
    assert!(!dma.logging_active());
    // Put while not logging: nothing recorded.
    let w = sg1(&dma, 0x10 * PAGE, PAGE, PROT_RW);
    dma.sgl_put(&[w]);
    dma.logging_start(PAGE, &[]).unwrap();
    assert!(dma.logging_active());
    assert_eq!(
        bits(&report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap()),
        0
    );

    let s1 = sg1(&dma, 0x10 * PAGE, PAGE, PROT_RW);
    let s2 = sg1(&dma, 0x11 * PAGE, PAGE, libc::PROT_READ);
    let s3 = sg1(&dma, 0x12 * PAGE, PAGE, PROT_RW);
    let s4 = sg1(&dma, 0x16 * PAGE, 4 * PAGE, PROT_RW);
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 4];
    dma.sgl_get(&[s1, s2, s3, s4], &mut iov).unwrap();
    // Write through the iovec.
    // SAFETY: iov[3] is a writable mapping of 4 pages.
    unsafe { std::ptr::write_bytes(iov[3].iov_base as *mut u8, 0xab, iov[3].iov_len) };
    assert_eq!(
        bits(&report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap()),
        0
    );
    dma.sgl_put(&[s1, s4]);
    assert_eq!(
        bits(&report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap()),
        0b11_1100_0001
    );
    // Reported bits were cleared.
    assert_eq!(
        bits(&report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap()),
        0
    );
    // Read-only entries do not dirty; mark_dirty does like put.
    dma.sgl_put(&[s2]);
    dma.sgl_mark_dirty(&[s3]);
    assert_eq!(
        bits(&report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap()),
        0b100
    );
    // Bits past `len` but within the 64-bit word are reported, as upstream.
    dma.sgl_put(&[sg1(&dma, 0x27 * PAGE, PAGE, PROT_RW)]);
    assert_eq!(
        bits(&report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap()),
        1 << 23
    );
    // Message-only region: put is harmless, report is EINVAL.
    dma.sgl_put(&[sg1(&dma, 0x40 * PAGE, PAGE, PROT_RW)]);
    assert_eq!(
        report(&dma, 0x40 * PAGE, 0x10 * PAGE, PAGE).unwrap_err(),
        Errno::EINVAL
    );
    dma.logging_stop().unwrap();
    assert!(!dma.logging_active());
    assert_eq!(
        report(&dma, 0x10 * PAGE, 0x10 * PAGE, PAGE).unwrap_err(),
        Errno::EINVAL
    );
}

#[test]
fn logging_report_page_sizes() {
    let dma = DmaController::new(10);
    dma.add_region(
        0x10 * PAGE,
        0x20 * PAGE,
        Some(memfd(0x20 * PAGE)),
        0,
        PROT_RW,
        false,
    )
    .unwrap();
    dma.logging_start(PAGE, &[(0, 1 << 40)]).unwrap();
    // Idempotent at the same size; other sizes refused.
    dma.logging_start(PAGE, &[]).unwrap();
    assert_eq!(dma.logging_start(PAGE / 2, &[]), Err(Errno::EINVAL));
    assert_eq!(dma.logging_start(PAGE * 2, &[]), Err(Errno::EINVAL));
    let s1 = sg1(&dma, 0x10 * PAGE, PAGE, PROT_RW);
    let s4 = sg1(&dma, 0x16 * PAGE, 4 * PAGE, PROT_RW);
    let put = || dma.sgl_put(&[s1, s4]);
    let base = 0x10 * PAGE;
    let len = 0x10 * PAGE;

    put();
    assert_eq!(
        bits(&report(&dma, base, len, PAGE / 2).unwrap()),
        0b1111_1111_0000_0000_0011
    );
    put();
    assert_eq!(
        bits(&report(&dma, base, len, PAGE * 2).unwrap()),
        0b0001_1001
    );
    put();
    assert_eq!(bits(&report(&dma, base, len, PAGE << 4).unwrap()), 0b1);
    assert_eq!(bits(&report(&dma, base, len, PAGE << 4).unwrap()), 0b0);
    // Much smaller report pages: each logged page is 64+ bits.
    put();
    let bm = report(&dma, base, len, PAGE / 128).unwrap();
    assert_eq!(bm.len(), 16 * 128 / 8);
    assert!(bm[..16].iter().all(|&b| b == 0xff));
    assert!(bm[16..16 * 6].iter().all(|&b| b == 0));
    assert!(bm[16 * 6..16 * 10].iter().all(|&b| b == 0xff));
    assert!(bm[16 * 10..].iter().all(|&b| b == 0));
    // Much larger report pages: one bit covers several words.
    dma.sgl_put(&[sg1(&dma, 0x2f * PAGE, PAGE, PROT_RW)]);
    let bm = report(&dma, base, 0x20 * PAGE, 0x20 * PAGE).unwrap();
    assert_eq!(bits(&bm), 1);
    // Bad arguments.
    assert_eq!(
        report(&dma, 0xdead_beef, len, PAGE).unwrap_err(),
        Errno::ENOENT
    );
    assert_eq!(
        report(&dma, base + 1, 0x20 * PAGE - 1, PAGE).unwrap_err(),
        Errno::ENOTSUP
    );
    assert_eq!(
        report(&dma, base, 0x21 * PAGE, PAGE).unwrap_err(),
        Errno::ENOENT
    );
    let mut bm = vec![0u8; 8];
    assert_eq!(
        dma.logging_report(base, len, 1 << 24, &mut bm),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        dma.logging_report(base, len, 3000, &mut bm),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        dma.logging_report(base, len, PAGE, &mut bm[..4]),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        dma.logging_report(base, PAGE / 2, PAGE / 2, &mut bm),
        Err(Errno::EINVAL)
    );
    assert_eq!(dma.logging_start(0, &[]), Err(Errno::EINVAL));
}

#[test]
fn logging_new_regions_and_reports_across_words() {
    let dma = DmaController::new(10);
    dma.logging_start(PAGE, &[]).unwrap();
    // A region added while logging gets a bitmap.
    dma.add_region(0, 1024 * PAGE, Some(memfd(1024 * PAGE)), 0, PROT_RW, false)
        .unwrap();
    dma.mark_dirty_range(130 * PAGE + 5, 300 * PAGE);
    // And a range touching two regions plus a hole.
    dma.add_region(
        2048 * PAGE,
        64 * PAGE,
        Some(memfd(64 * PAGE)),
        0,
        PROT_RW,
        false,
    )
    .unwrap();
    dma.mark_dirty_range(1000 * PAGE, 2000 * PAGE);
    let bm = report(&dma, 0, 1024 * PAGE, PAGE).unwrap();
    let is_set = |p: usize| bm[p / 8] >> (p % 8) & 1 == 1;
    for p in 0..1024 {
        let expected = (130..=430).contains(&p) || p >= 1000;
        assert_eq!(is_set(p), expected, "page {p}");
    }
    let bm2 = report(&dma, 2048 * PAGE, 64 * PAGE, PAGE).unwrap();
    assert_eq!(u64::from_le_bytes(bm2[..8].try_into().unwrap()), u64::MAX);
    // Combine 4 logged pages per report bit over many words.
    dma.mark_dirty_range(512 * PAGE, PAGE);
    let bm = report(&dma, 0, 1024 * PAGE, 4 * PAGE).unwrap();
    assert_eq!(bm.len(), 32);
    let set: Vec<usize> = (0..256).filter(|p| bm[p / 8] >> (p % 8) & 1 == 1).collect();
    assert_eq!(set, vec![128]);
}

#[test]
fn report_64gib_is_fast() {
    let dma = DmaController::new(10);
    let len = 64u64 << 30;
    dma.add_region(0, len, None, 0, PROT_RW, false).unwrap();
    // An fd-backed region is needed for a bitmap; use FILE_IO so nothing
    // is mapped.
    dma.add_region(len, len, Some(memfd(PAGE)), 0, PROT_RW, true)
        .unwrap();
    dma.logging_start(PAGE, &[]).unwrap();
    dma.mark_dirty_range(len, len);
    let mut bm = vec![0u8; bitmap_size(len, PAGE).unwrap()];
    let mut best = std::time::Duration::MAX;
    for _ in 0..3 {
        dma.mark_dirty_range(len, len);
        let t = Instant::now();
        dma.logging_report(len, len, PAGE, &mut bm).unwrap();
        best = best.min(t.elapsed());
        assert!(bm.iter().all(|&b| b == 0xff));
    }
    // Empty reports are cheaper still.
    let t = Instant::now();
    dma.logging_report(len, len, PAGE, &mut bm).unwrap();
    let empty = t.elapsed();
    assert!(bm.iter().all(|&b| b == 0));
    eprintln!("64 GiB report: full {best:?}, empty {empty:?}");
    // Generous for debug builds on a loaded machine; release is ~0.3 ms.
    assert!(best.as_millis() < 50, "{best:?}");
}

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
    // SAFETY: the fd is open.
    let r = unsafe { libc::ftruncate(keep_f.as_raw_fd(), PAGE as i64) };
    assert_eq!(r, 0);
    let mut big = vec![0u8; PAGE as usize];
    assert_eq!(dma.sg_read(&sg, &mut big, true), Err(Errno::EIO));
}

#[test]
fn stale_and_forged_entries() {
    let dma = DmaController::new(10);
    dma.add_region(0x10000, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
        .unwrap();
    let sg = sg1(&dma, 0x10000, PAGE, PROT_RW);
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }];
    dma.sgl_get(&[sg], &mut iov).unwrap();
    assert!(dma.sg_is_mappable(&sg));

    // Zeroed entry.
    assert_eq!(
        dma.sgl_get(&[DmaSg::default()], &mut iov),
        Err(Errno::EINVAL)
    );
    // Wrong id, out-of-bounds length, overflowing offset.
    let mut f = sg;
    f.region += 1;
    assert_eq!(dma.sgl_get(&[f], &mut iov), Err(Errno::EINVAL));
    let mut f = sg;
    f.length = PAGE + 1;
    assert_eq!(dma.sgl_get(&[f], &mut iov), Err(Errno::EINVAL));
    let mut f = sg;
    f.offset = u64::MAX;
    assert_eq!(dma.sgl_get(&[f], &mut iov), Err(Errno::EINVAL));
    let mut f = sg;
    f.dma_addr = 0x10001 as *mut c_void;
    assert_eq!(dma.sgl_get(&[f], &mut iov), Err(Errno::EINVAL));

    // Unmap, then map something new at the same address: the old entry
    // stays dead.
    dma.remove_region(0x10000, PAGE).unwrap();
    assert_eq!(dma.sgl_get(&[sg], &mut iov), Err(Errno::EINVAL));
    dma.add_region(0x10000, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
        .unwrap();
    assert_eq!(dma.sgl_get(&[sg], &mut iov), Err(Errno::EINVAL));
    assert!(!dma.sg_is_mappable(&sg));
    let mut buf = vec![0u8; PAGE as usize];
    assert_eq!(dma.sg_read(&sg, &mut buf, true), Err(Errno::EINVAL));
    assert_eq!(dma.sg_write(&sg, &buf, true), Err(Errno::EINVAL));
    dma.logging_start(PAGE, &[]).unwrap();
    dma.sgl_put(&[sg]);
    assert_eq!(bits(&report(&dma, 0x10000, PAGE, PAGE).unwrap()), 0);
    // The thread's cached translation must not outlive the table change.
    let fresh = sg1(&dma, 0x10000, PAGE, PROT_RW);
    assert_ne!(fresh.region, sg.region);
    dma.sgl_get(&[fresh], &mut iov).unwrap();
}

#[test]
fn small_table_copy_follows_every_change() {
    // Up to snap::CAPACITY regions the lock-free copy answers; past
    // it the other paths do. Every answer must match the table, across
    // the switch both ways, and a wrong or stale slot hint must never
    // resolve to another region.
    let n = snap::CAPACITY + 2;
    let dma = DmaController::new(n);
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }];
    let iova = |i: usize| 0x100_0000 + i as u64 * 4 * PAGE;
    for i in 0..n {
        dma.add_region(iova(i), 2 * PAGE, Some(memfd(2 * PAGE)), 0, PROT_RW, false)
            .unwrap();
        // Every region so far translates and maps; the gaps do not.
        for j in 0..=i {
            let sg = sg1(&dma, iova(j) + PAGE, PAGE, PROT_RW);
            assert_eq!(sg.iova(), iova(j) + PAGE);
            dma.sgl_get(&[sg], &mut iov).unwrap();
            let mut wrong = sg;
            wrong.hint = wrong.hint.wrapping_add(1);
            dma.sgl_get(&[wrong], &mut iov).unwrap();
            let mut out = [DmaSg::default()];
            assert_eq!(
                dma.addr_to_sgl(iova(j) + 2 * PAGE, 1, &mut out, PROT_RW),
                Err(SglError::Errno(Errno::ENOENT))
            );
        }
    }
    // Remove from the front: the copy comes back below the capacity,
    // and entries of removed regions stay dead whatever their hint.
    for i in 0..n {
        let sg = sg1(&dma, iova(i), PAGE, PROT_RW);
        dma.remove_region(iova(i), 2 * PAGE).unwrap();
        for hint in 0..=u8::MAX {
            let mut stale = sg;
            stale.hint = hint;
            assert_eq!(dma.sgl_get(&[stale], &mut iov), Err(Errno::EINVAL));
        }
        if i + 1 < n {
            let next = sg1(&dma, iova(i + 1), PAGE, PROT_RW);
            dma.sgl_get(&[next], &mut iov).unwrap();
        }
    }
    // Read-only regions refuse writable translations on every path.
    dma.add_region(0x1000, PAGE, Some(memfd(PAGE)), 0, libc::PROT_READ, false)
        .unwrap();
    let mut out = [DmaSg::default()];
    assert_eq!(
        dma.addr_to_sgl(0x1000, PAGE, &mut out, PROT_RW),
        Err(SglError::Errno(Errno::EACCES))
    );
    let ro = sg1(&dma, 0x1000, PAGE, libc::PROT_READ);
    dma.sgl_get(&[ro], &mut iov).unwrap();
    let mut forged = ro;
    forged.writeable = true;
    assert_eq!(dma.sgl_get(&[forged], &mut iov), Err(Errno::EACCES));
}

#[test]
fn small_table_copy_without_fds() {
    // The lock-free copy's paths with message-only regions (no fds, so
    // Miri runs it): translation through the copy, EFAULT from sgl_get
    // for memory that is not mapped, EINVAL once the region is gone.
    let dma = DmaController::new(8);
    for i in 0..4u64 {
        dma.add_region(i * 0x10000, 0x8000, None, 0, PROT_RW, false)
            .unwrap();
    }
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }];
    for i in 0..4u64 {
        let sg = sg1(&dma, i * 0x10000 + 0x100, 0x200, PROT_RW);
        assert_eq!((sg.dma_addr as u64, sg.offset), (i * 0x10000, 0x100));
        assert_eq!(dma.sgl_get(&[sg], &mut iov), Err(Errno::EFAULT));
        // Crossing the region's end is not the fast path's to answer.
        let mut out = [DmaSg::default(); 2];
        assert_eq!(
            dma.addr_to_sgl(i * 0x10000 + 0x7f00, 0x200, &mut out, PROT_RW),
            Err(SglError::Errno(Errno::ENOENT))
        );
    }
    let sg = sg1(&dma, 0x20000, 0x1000, PROT_RW);
    dma.remove_region(0x20000, 0x8000).unwrap();
    assert_eq!(dma.sgl_get(&[sg], &mut iov), Err(Errno::EINVAL));
    let mut out = [DmaSg::default()];
    assert_eq!(
        dma.addr_to_sgl(0x20000, 0x1000, &mut out, PROT_RW),
        Err(SglError::Errno(Errno::ENOENT))
    );
    dma.remove_all();
    assert_eq!(
        dma.addr_to_sgl(0, 0x1000, &mut out, PROT_RW),
        Err(SglError::Errno(Errno::ENOENT))
    );
}

#[test]
fn hint_is_per_controller() {
    let a = DmaController::new(10);
    let b = DmaController::new(10);
    a.add_region(0, PAGE, None, 0, PROT_RW, false).unwrap();
    let sa = sg1(&a, 0, 16, PROT_RW);
    let mut one = [DmaSg::default()];
    assert_eq!(
        b.addr_to_sgl(0, 16, &mut one, PROT_RW),
        Err(SglError::Errno(Errno::ENOENT))
    );
    b.add_region(0, PAGE, None, 0, PROT_RW, false).unwrap();
    let sb = sg1(&b, 0, 16, PROT_RW);
    assert_ne!(sa.region, sb.region);
    assert_eq!(sg1(&a, 0, 16, PROT_RW).region, sa.region);
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
fn many_regions_lookup() {
    let dma = DmaController::new(300_000);
    let n = 200_000u64;
    for i in 0..n {
        dma.add_region(i * 2 * PAGE, PAGE, None, 0, PROT_RW, false)
            .unwrap();
    }
    assert_eq!(dma.region_count(), n as usize);
    let t = Instant::now();
    let mut sgl = [DmaSg::default()];
    for i in (0..n).step_by(7) {
        assert_eq!(
            dma.addr_to_sgl(i * 2 * PAGE + 8, 8, &mut sgl, PROT_RW),
            Ok(1)
        );
        assert_eq!(sgl[0].dma_addr as u64, i * 2 * PAGE);
        assert_eq!(
            dma.addr_to_sgl(i * 2 * PAGE + PAGE, 8, &mut sgl, PROT_RW),
            Err(SglError::Errno(Errno::ENOENT))
        );
    }
    eprintln!("{} lookups in {:?}", 2 * n / 7, t.elapsed());
    assert!(t.elapsed().as_secs() < 5);
}

/// An address other than `addr`, in another granule, that takes the same
/// translation cache slot.
fn colliding(addr: u64) -> u64 {
    (1..)
        .map(|i| addr + i * PAGE)
        .find(|&a| tlb_set_index(a) == tlb_set_index(addr))
        .unwrap()
}

#[test]
fn translation_cache_collisions_and_misses() {
    let dma = DmaController::new(10);
    let a = 0x10_0000;
    let b = colliding(a);
    dma.add_region(a, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
        .unwrap();
    // Cached for `a`; `b` shares the slot but is not mapped.
    assert_eq!(sg1(&dma, a, 8, PROT_RW).dma_addr as u64, a);
    let mut sgl = [DmaSg::default()];
    for _ in 0..2 {
        assert_eq!(
            dma.addr_to_sgl(b, 8, &mut sgl, PROT_RW),
            Err(SglError::Errno(Errno::ENOENT))
        );
    }
    // Mapped later (no new generation): found. With a third region in
    // the same set, each translation evicts another's entry, which must
    // still translate right afterwards.
    dma.add_region(b, PAGE, Some(memfd(PAGE)), 0, libc::PROT_READ, false)
        .unwrap();
    let c = colliding(b);
    assert_eq!(tlb_set_index(c), tlb_set_index(a));
    dma.add_region(c, PAGE, Some(memfd(PAGE)), 0, PROT_RW, false)
        .unwrap();
    for _ in 0..3 {
        let sc = sg1(&dma, c + 24, 8, PROT_RW);
        assert_eq!((sc.dma_addr as u64, sc.offset), (c, 24));
        assert!(dma.sg_write(&sc, &[9; 8], true).unwrap());
        let sb = sg1(&dma, b + 16, 8, libc::PROT_READ);
        assert_eq!((sb.dma_addr as u64, sb.offset), (b, 16));
        assert!(!sb.writeable);
        assert_eq!(
            dma.addr_to_sgl(b, 8, &mut sgl, PROT_RW),
            Err(SglError::Errno(Errno::EACCES))
        );
        let sa = sg1(&dma, a + 8, 8, PROT_RW);
        assert_eq!((sa.dma_addr as u64, sa.offset), (a, 8));
        // sg_read of `b`'s entry after `a` took the slot: correct data
        // through the slow path.
        let mut buf = [0u8; 8];
        assert!(dma.sg_write(&sa, &[7; 8], true).unwrap());
        assert!(dma.sg_read(&sa, &mut buf, true).unwrap());
        assert_eq!(buf, [7; 8]);
        assert!(dma.sg_read(&sb, &mut buf, true).unwrap());
        assert_eq!(buf, [0; 8]);
        assert!(dma.sg_read(&sc, &mut buf, true).unwrap());
        assert_eq!(buf, [9; 8]);
    }
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
fn translation_cache_survives_adds_not_removals() {
    let dma = DmaController::new(10);
    dma.add_region(0, 2 * PAGE, Some(memfd(2 * PAGE)), 0, PROT_RW, false)
        .unwrap();
    let gen = dma.generation.load(Ordering::Relaxed);
    let before = sg1(&dma, PAGE, 8, PROT_RW);
    // Adding a neighbour right after it keeps the generation, and the
    // cached translation stays right at the boundary.
    dma.add_region(2 * PAGE, PAGE, None, 0, PROT_RW, false)
        .unwrap();
    assert_eq!(dma.generation.load(Ordering::Relaxed), gen);
    assert_eq!(sg1(&dma, PAGE, 8, PROT_RW).region, before.region);
    let mut sgl = [DmaSg::default(); 2];
    assert_eq!(dma.addr_to_sgl(2 * PAGE - 8, 16, &mut sgl, PROT_RW), Ok(2));
    assert_eq!(sgl[1].dma_addr as u64, 2 * PAGE);
    // Removing anything invalidates: the entry made before is refused,
    // and a fresh translation of the re-added range names the new region.
    dma.remove_region(0, 2 * PAGE).unwrap();
    assert_ne!(dma.generation.load(Ordering::Relaxed), gen);
    let mut buf = [0u8; 8];
    assert_eq!(dma.sg_read(&before, &mut buf, true), Err(Errno::EINVAL));
    dma.add_region(0, 2 * PAGE, Some(memfd(2 * PAGE)), 0, PROT_RW, false)
        .unwrap();
    let after = sg1(&dma, PAGE, 8, PROT_RW);
    assert_ne!(after.region, before.region);
    assert!(dma.sg_read(&after, &mut buf, true).unwrap());
}

#[test]
fn bitmap_helpers() {
    assert_eq!(bitmap_size(0x10 * PAGE, PAGE), Ok(8));
    assert_eq!(bitmap_size(65 * PAGE, PAGE), Ok(16));
    assert_eq!(bitmap_size(PAGE + 1, PAGE), Ok(8));
    assert_eq!(bitmap_size(PAGE - 1, PAGE), Err(Errno::EINVAL));
    assert_eq!(bitmap_size(PAGE, 0), Err(Errno::EINVAL));
    for k in 0..=6 {
        for x in [
            0u64,
            1,
            0x8000_0000_0000_0001,
            0xdead_beef_cafe_f00d,
            u64::MAX,
        ] {
            let g = 1u64 << k;
            let mut expect = 0u64;
            for i in 0..(64 >> k) {
                if (x >> (i * g)) & ((1u128 << g) - 1) as u64 != 0 {
                    expect |= 1 << i;
                }
            }
            assert_eq!(squeeze(x, k as u32), expect, "squeeze {x:#x} {k}");
            let low = x & (((1u128 << (64 >> k)) - 1) as u64);
            let mut stretched = 0u64;
            for i in 0..(64 >> k) {
                if low >> i & 1 == 1 {
                    stretched |= (((1u128 << g) - 1) as u64) << (i * g);
                }
            }
            assert_eq!(stretch(low, k as u32), stretched, "stretch {x:#x} {k}");
        }
    }
    let words = zeroed_words(3).unwrap();
    set_bits(&words, 60, 130);
    assert_eq!(words[0].load(Ordering::Relaxed), 0xf << 60);
    assert_eq!(words[1].load(Ordering::Relaxed), u64::MAX);
    assert_eq!(words[2].load(Ordering::Relaxed), 0b11);
    set_bits(&words, 190, 1000);
    assert_eq!(words[2].load(Ordering::Relaxed), 0b11 | (0b11 << 62));
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
