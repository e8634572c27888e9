//! Helpers shared by the DMA controller's unit tests (memfd-backed
//! regions, file reads and writes, one-entry translation, dirty reports).

use super::*;
use std::os::fd::FromRawFd;

pub(super) fn memfd(size: u64) -> OwnedFd {
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

pub(super) fn dup(fd: &OwnedFd) -> OwnedFd {
    fd.try_clone().unwrap()
}

pub(super) fn pread_file(fd: &OwnedFd, off: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    // SAFETY: v has n bytes.
    let r = unsafe { libc::pread(fd.as_raw_fd(), v.as_mut_ptr() as *mut c_void, n, off as i64) };
    assert_eq!(r, n as isize);
    v
}

pub(super) fn pwrite_file(fd: &OwnedFd, off: u64, data: &[u8]) {
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

pub(super) fn sg1(dma: &DmaController, iova: u64, len: u64, prot: i32) -> DmaSg {
    let mut sgl = [DmaSg::default()];
    assert_eq!(dma.addr_to_sgl(iova, len, &mut sgl, prot), Ok(1));
    sgl[0]
}

pub(super) fn report(dma: &DmaController, iova: u64, len: u64, pg: u64) -> Result<Vec<u8>> {
    let mut bm = vec![0u8; bitmap_size(len, pg)?];
    dma.logging_report(iova, len, pg, &mut bm)?;
    Ok(bm)
}

pub(super) fn bits(bm: &[u8]) -> u128 {
    let mut v = 0u128;
    for (i, b) in bm.iter().take(16).enumerate() {
        v |= u128::from(*b) << (8 * i);
    }
    v
}

pub(super) const PAGE: u64 = 4096;
