//! Helpers shared by the DMA controller's unit tests (memfd-backed
//! regions, file reads and writes, one-entry translation, dirty reports).

use super::*;
use nix::sys::memfd::{memfd_create, MFdFlags};

pub(super) fn memfd(size: u64) -> OwnedFd {
    let fd = memfd_create(c"dma-test", MFdFlags::MFD_CLOEXEC).expect("memfd_create failed");
    nix::unistd::ftruncate(&fd, size as libc::off_t).unwrap();
    fd
}

pub(super) fn dup(fd: &OwnedFd) -> OwnedFd {
    fd.try_clone().unwrap()
}

pub(super) fn pread_file(fd: &OwnedFd, off: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    assert_eq!(nix::sys::uio::pread(fd, &mut v, off as i64), Ok(n));
    v
}

pub(super) fn pwrite_file(fd: &OwnedFd, off: u64, data: &[u8]) {
    assert_eq!(nix::sys::uio::pwrite(fd, data, off as i64), Ok(data.len()));
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
