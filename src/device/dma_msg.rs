//! Handlers for the `VFIO_USER_DMA_MAP` and `VFIO_USER_DMA_UNMAP` commands:
//! decode the request body, drive the [`DmaController`], call the device's
//! register/unregister callbacks, and build the reply body.
//!
//! Wire layouts (little-endian, packed):
//!
//! * map:   `argsz u32, flags u32, offset u64, addr u64, size u64` (32 bytes)
//! * unmap: `argsz u32, flags u32, addr u64, size u64` (24 bytes), followed,
//!   with `GET_DIRTY_BITMAP`, by `pgsize u64, size u64` (16 bytes) and, in
//!   the reply only, `size` bytes of bitmap.

use std::os::fd::OwnedFd;

use crate::device::dma::{DmaController, DmaInfo};
use crate::error::{Errno, Result};

/// `VFIO_USER_F_DMA_REGION_READ`: the client allows the device to read.
pub const DMA_REGION_READ: u32 = 1 << 0;
/// `VFIO_USER_F_DMA_REGION_WRITE`: the client allows the device to write.
pub const DMA_REGION_WRITE: u32 = 1 << 1;
/// `VFIO_USER_F_DMA_REGION_MMAP`: the fd is to be mapped.
pub const DMA_REGION_MMAP: u32 = 1 << 2;
/// `VFIO_USER_F_DMA_REGION_FILE_IO`: the fd is to be accessed with
/// `pread`/`pwrite`.
pub const DMA_REGION_FILE_IO: u32 = 1 << 3;

/// `VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`.
pub const DMA_UNMAP_GET_DIRTY_BITMAP: u32 = 1 << 0;
/// `VFIO_DMA_UNMAP_FLAG_ALL`.
pub const DMA_UNMAP_ALL: u32 = 1 << 1;

/// Size of `struct vfio_user_dma_map`.
pub const DMA_MAP_SIZE: usize = 32;
/// Size of `struct vfio_user_dma_unmap` without its bitmap.
pub const DMA_UNMAP_SIZE: usize = 24;
/// Size of `struct vfio_user_bitmap` without its data.
pub const BITMAP_HEADER_SIZE: usize = 16;

/// Largest `argsz` accepted in an unmap request (upstream's
/// `SERVER_MAX_DATA_XFER_SIZE`, 1 MiB); it bounds the reply we allocate.
const MAX_UNMAP_ARGSZ: u64 = 1024 * 1024;

/// The device's DMA callbacks, as registered with `vfu_setup_device_dma`.
///
/// They are called with no internal lock held, so they may call back into the
/// controller (translate, `sgl_get`, ...).
pub trait DmaCallbacks {
    /// Called after a region was added (and again when a client re-maps an
    /// identical region, as upstream does).
    fn register(&self, info: &DmaInfo);
    /// Called before a region is removed; the region is still fully usable
    /// during the call and the device must drop every reference to its
    /// memory before returning.
    fn unregister(&self, info: &DmaInfo);
    /// Whether an unregister callback is set.
    fn has_unregister(&self) -> bool;
    /// Whether a register callback is set.
    fn has_register(&self) -> bool;
}

/// Callbacks that do nothing, for contexts that set none.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoDmaCallbacks;

impl DmaCallbacks for NoDmaCallbacks {
    fn register(&self, _info: &DmaInfo) {}
    fn unregister(&self, _info: &DmaInfo) {}
    fn has_unregister(&self) -> bool {
        false
    }
    fn has_register(&self) -> bool {
        false
    }
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    let bytes = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    let bytes = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// Handles one `VFIO_USER_DMA_MAP` request body (the payload after the
/// 16-byte header). The first of `fds`, if any, is taken (and owned by the
/// region or closed); the caller closes the others. Returns the (empty)
/// reply body.
///
/// Errors, as upstream: `EINVAL` for a body or `argsz` shorter than the
/// structure, for MMAP/FILE_IO without an fd, for unknown flags, and the
/// controller's errnos (`ENOSPC` too big, `EINVAL` overlap or too many
/// regions, mmap failures). The register callback runs after the region was
/// added.
pub fn handle_dma_map(
    dma: &DmaController,
    cbs: &dyn DmaCallbacks,
    payload: &[u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<Vec<u8>> {
    if payload.len() < DMA_MAP_SIZE {
        return Err(Errno::EINVAL);
    }
    let field = |off| u64_at(payload, off).ok_or(Errno::EINVAL);
    let argsz = u32_at(payload, 0).ok_or(Errno::EINVAL)?;
    let mut flags = u32_at(payload, 4).ok_or(Errno::EINVAL)?;
    let offset = field(8)?;
    let addr = field(16)?;
    let size = field(24)?;
    if (argsz as usize) < DMA_MAP_SIZE {
        return Err(Errno::EINVAL);
    }

    // As upstream, the first fd is consumed whatever the flags say.
    let fd = if fds.is_empty() {
        None
    } else {
        Some(fds.remove(0))
    };

    let mut prot = 0;
    if flags & DMA_REGION_READ != 0 {
        prot |= libc::PROT_READ;
        flags &= !DMA_REGION_READ;
    }
    if flags & DMA_REGION_WRITE != 0 {
        prot |= libc::PROT_WRITE;
        flags &= !DMA_REGION_WRITE;
    }
    let file_io = if flags & DMA_REGION_MMAP != 0 {
        if fd.is_none() {
            return Err(Errno::EINVAL);
        }
        flags &= !DMA_REGION_MMAP;
        false
    } else if flags & DMA_REGION_FILE_IO != 0 {
        if fd.is_none() {
            return Err(Errno::EINVAL);
        }
        flags &= !DMA_REGION_FILE_IO;
        true
    } else {
        // Without an access flag an fd means mmap (older clients).
        false
    };
    // Anything left (including MMAP and FILE_IO together) is invalid.
    if flags != 0 {
        return Err(Errno::EINVAL);
    }

    let info = dma.add_region(addr, size, fd, offset, prot, file_io)?;
    if cbs.has_register() {
        cbs.register(&info);
    }
    Ok(Vec::new())
}

/// Removes one region, calling the unregister callback first while the
/// region is still usable.
fn unmap_one(dma: &DmaController, cbs: &dyn DmaCallbacks, info: &DmaInfo) -> Result<()> {
    if cbs.has_unregister() {
        cbs.unregister(info);
    }
    dma.remove_region(info.iova_start(), info.iova_len())
        .map(|_| ())
}

/// Removes every region, calling the unregister callback for each (lowest
/// IOVA first) before it goes away. For `VFIO_DMA_UNMAP_FLAG_ALL`, and for
/// the context to use on reset, disconnect and destroy.
pub fn unmap_all(dma: &DmaController, cbs: &dyn DmaCallbacks) {
    while let Some(info) = dma.first_region() {
        if unmap_one(dma, cbs, &info).is_err() {
            // Only possible if the region vanished during the callback; make
            // sure we still make progress.
            if dma
                .first_region()
                .is_some_and(|next| next.iova_start() == info.iova_start())
            {
                break;
            }
        }
    }
}

/// Handles one `VFIO_USER_DMA_UNMAP` request body (the payload after the
/// 16-byte header). `fds` are not used (the caller closes them). Returns the
/// reply body: the request's unmap structure echoed back, plus, with
/// `GET_DIRTY_BITMAP`, the bitmap structure and the bitmap.
///
/// Errors, as upstream: `EINVAL` for a short body, unknown or combined flags,
/// `ALL` with a non-zero address or size, an `argsz` smaller than the
/// structure (plus the bitmap it announces) or above 1 MiB, and the dirty
/// report's errnos (`EINVAL` when not logging, ...); `ENOENT` when no region
/// matches the range exactly.
pub fn handle_dma_unmap(
    dma: &DmaController,
    cbs: &dyn DmaCallbacks,
    payload: &[u8],
    fds: &mut Vec<OwnedFd>,
) -> Result<Vec<u8>> {
    let _ = fds;
    if payload.len() < DMA_UNMAP_SIZE {
        return Err(Errno::EINVAL);
    }
    let argsz = u32_at(payload, 0).ok_or(Errno::EINVAL)?;
    let flags = u32_at(payload, 4).ok_or(Errno::EINVAL)?;
    let addr = u64_at(payload, 8).ok_or(Errno::EINVAL)?;
    let size = u64_at(payload, 16).ok_or(Errno::EINVAL)?;

    let mut struct_size = DMA_UNMAP_SIZE;
    let mut min_argsz = DMA_UNMAP_SIZE as u64;
    let mut bitmap = None;
    match flags {
        0 => {}
        DMA_UNMAP_ALL => {
            if addr != 0 || size != 0 {
                return Err(Errno::EINVAL);
            }
        }
        DMA_UNMAP_GET_DIRTY_BITMAP => {
            struct_size += BITMAP_HEADER_SIZE;
            let pgsize = u64_at(payload, DMA_UNMAP_SIZE).ok_or(Errno::EINVAL)?;
            let bm_size = u64_at(payload, DMA_UNMAP_SIZE + 8).ok_or(Errno::EINVAL)?;
            // Saturation turns an overflow into "larger than any allowed
            // argsz".
            min_argsz = (struct_size as u64).saturating_add(bm_size);
            bitmap = Some((pgsize, bm_size));
        }
        _ => return Err(Errno::EINVAL),
    }
    let argsz = u64::from(argsz);
    if payload.len() < struct_size || argsz < min_argsz || argsz > MAX_UNMAP_ARGSZ {
        return Err(Errno::EINVAL);
    }

    let header = payload.get(..DMA_UNMAP_SIZE).ok_or(Errno::EINVAL)?;
    let mut reply = Vec::with_capacity(struct_size);
    reply.extend_from_slice(header);

    if flags == DMA_UNMAP_ALL {
        unmap_all(dma, cbs);
        return Ok(reply);
    }

    if let Some((pgsize, bm_size)) = bitmap {
        // Bounded by argsz <= 1 MiB above.
        let bm_len = usize::try_from(bm_size).map_err(|_| Errno::EINVAL)?;
        let bm_header = payload
            .get(DMA_UNMAP_SIZE..DMA_UNMAP_SIZE + BITMAP_HEADER_SIZE)
            .ok_or(Errno::EINVAL)?;
        reply.extend_from_slice(bm_header);
        let start = reply.len();
        reply.resize(start + bm_len, 0);
        let out = reply.get_mut(start..).ok_or(Errno::EINVAL)?;
        // Checks, in upstream's order, that the range is one region's start,
        // that logging is on and that `bm_len` fits `size` and `pgsize`.
        dma.logging_report(addr, size, pgsize, out)?;
    }

    let info = dma.find_exact(addr, size)?;
    unmap_one(dma, cbs, &info)?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::dma::DmaSg;
    use nix::sys::memfd::{memfd_create, MFdFlags};
    use std::cell::RefCell;

    const PAGE: u64 = 4096;
    const RW: u32 = DMA_REGION_READ | DMA_REGION_WRITE;

    fn memfd(size: u64) -> OwnedFd {
        let fd = memfd_create(c"dma-msg-test", MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, size as libc::off_t).unwrap();
        fd
    }

    fn map_body(argsz: u32, flags: u32, offset: u64, addr: u64, size: u64) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&argsz.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&offset.to_le_bytes());
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&size.to_le_bytes());
        v
    }

    fn map(addr: u64, size: u64, flags: u32) -> Vec<u8> {
        map_body(32, flags, 0, addr, size)
    }

    fn unmap_body(argsz: u32, flags: u32, addr: u64, size: u64) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&argsz.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&addr.to_le_bytes());
        v.extend_from_slice(&size.to_le_bytes());
        v
    }

    /// Records calls; the register callback also translates and maps the
    /// new region, the unregister callback checks the region is still usable.
    #[derive(Default)]
    struct Recorder<'a> {
        dma: Option<&'a DmaController>,
        log: RefCell<Vec<(char, u64, u64, bool)>>,
    }

    impl DmaCallbacks for Recorder<'_> {
        fn register(&self, info: &DmaInfo) {
            let usable = self.usable(info);
            self.log
                .borrow_mut()
                .push(('r', info.iova_start(), info.iova_len(), usable));
        }
        fn unregister(&self, info: &DmaInfo) {
            let usable = self.usable(info);
            self.log
                .borrow_mut()
                .push(('u', info.iova_start(), info.iova_len(), usable));
        }
        fn has_unregister(&self) -> bool {
            true
        }
        fn has_register(&self) -> bool {
            true
        }
    }

    impl Recorder<'_> {
        fn usable(&self, info: &DmaInfo) -> bool {
            let Some(dma) = self.dma else { return false };
            let mut sgl = [DmaSg::default()];
            if dma.addr_to_sgl(
                info.iova_start(),
                info.iova_len(),
                &mut sgl,
                libc::PROT_READ,
            ) != Ok(1)
            {
                return false;
            }
            let mut iov = [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }];
            dma.sgl_get(&sgl, &mut iov).is_ok() && iov[0].iov_base == info.vaddr
        }
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run memfd_create or file-backed mmap")]
    fn map_and_unmap_with_callbacks() {
        let dma = DmaController::new(10);
        let cbs = Recorder {
            dma: Some(&dma),
            ..Default::default()
        };
        let mut fds = vec![memfd(2 * PAGE), memfd(PAGE)];
        let reply = handle_dma_map(&dma, &cbs, &map(0x10000, 2 * PAGE, RW), &mut fds).unwrap();
        assert!(reply.is_empty());
        // Only the first fd is taken.
        assert_eq!(fds.len(), 1);
        assert_eq!(*cbs.log.borrow(), vec![('r', 0x10000, 2 * PAGE, true)]);

        let body = unmap_body(24, 0, 0x10000, 2 * PAGE);
        let reply = handle_dma_unmap(&dma, &cbs, &body, &mut Vec::new()).unwrap();
        assert_eq!(reply, body);
        assert_eq!(cbs.log.borrow()[1], ('u', 0x10000, 2 * PAGE, true));
        assert_eq!(dma.region_count(), 0);
        // Unknown region.
        assert_eq!(
            handle_dma_unmap(&dma, &cbs, &body, &mut Vec::new()),
            Err(Errno::ENOENT)
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run memfd_create or file-backed mmap")]
    fn map_without_fd_and_flag_rules() {
        let dma = DmaController::new(10);
        let cbs = NoDmaCallbacks;
        let mut none = Vec::new();
        handle_dma_map(&dma, &cbs, &map(0x1000, PAGE, RW), &mut none).unwrap();
        let info = dma.find_exact(0x1000, PAGE).unwrap();
        assert!(info.vaddr.is_null());
        assert_eq!(info.prot, (libc::PROT_READ | libc::PROT_WRITE) as u32);
        // MMAP / FILE_IO need an fd.
        assert_eq!(
            handle_dma_map(
                &dma,
                &cbs,
                &map(0x4000, PAGE, RW | DMA_REGION_MMAP),
                &mut none
            ),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            handle_dma_map(
                &dma,
                &cbs,
                &map(0x4000, PAGE, RW | DMA_REGION_FILE_IO),
                &mut none
            ),
            Err(Errno::EINVAL)
        );
        // Both access flags, or unknown flags.
        let mut fds = vec![memfd(PAGE)];
        assert_eq!(
            handle_dma_map(
                &dma,
                &cbs,
                &map(0x4000, PAGE, RW | DMA_REGION_MMAP | DMA_REGION_FILE_IO),
                &mut fds
            ),
            Err(Errno::EINVAL)
        );
        assert!(fds.is_empty(), "the fd was consumed (and closed)");
        assert_eq!(
            handle_dma_map(&dma, &cbs, &map(0x4000, PAGE, RW | 0x10), &mut none),
            Err(Errno::EINVAL)
        );
        // FILE_IO region: not mappable.
        let mut fds = vec![memfd(PAGE)];
        handle_dma_map(
            &dma,
            &cbs,
            &map(0x4000, PAGE, RW | DMA_REGION_FILE_IO),
            &mut fds,
        )
        .unwrap();
        let mut sgl = [DmaSg::default()];
        dma.addr_to_sgl(0x4000, 16, &mut sgl, libc::PROT_READ)
            .unwrap();
        assert!(!dma.sg_is_mappable(&sgl[0]));
        // Read-only mapping.
        let mut fds = vec![memfd(PAGE)];
        handle_dma_map(&dma, &cbs, &map(0x8000, PAGE, DMA_REGION_READ), &mut fds).unwrap();
        assert_eq!(
            dma.find_exact(0x8000, PAGE).unwrap().prot,
            libc::PROT_READ as u32
        );
        assert_eq!(
            dma.addr_to_sgl(0x8000, 16, &mut sgl, libc::PROT_WRITE),
            Err(crate::device::dma::SglError::Errno(Errno::EACCES))
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run memfd_create or file-backed mmap")]
    fn map_bad_payloads() {
        let dma = DmaController::new(2);
        let cbs = NoDmaCallbacks;
        let mut none = Vec::new();
        let good = map(0x1000, PAGE, RW);
        // Short body.
        assert_eq!(
            handle_dma_map(&dma, &cbs, &good[..31], &mut none),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            handle_dma_map(&dma, &cbs, &[], &mut none),
            Err(Errno::EINVAL)
        );
        // argsz lies (too small); a too-large argsz is tolerated, as upstream.
        assert_eq!(
            handle_dma_map(&dma, &cbs, &map_body(31, RW, 0, 0x1000, PAGE), &mut none),
            Err(Errno::EINVAL)
        );
        handle_dma_map(&dma, &cbs, &map_body(4096, RW, 0, 0x1000, PAGE), &mut none).unwrap();
        // Overflowing addr + size.
        assert_eq!(
            handle_dma_map(&dma, &cbs, &map(u64::MAX - 0xfff, 0x2000, RW), &mut none),
            Err(Errno::EINVAL)
        );
        // Too big.
        assert_eq!(
            handle_dma_map(
                &dma,
                &cbs,
                &map(0x10_0000, crate::device::dma::MAX_DMA_SIZE + PAGE, RW),
                &mut none
            ),
            Err(Errno::ENOSPC)
        );
        // Overlap.
        assert_eq!(
            handle_dma_map(&dma, &cbs, &map(0x1800, PAGE, RW), &mut none),
            Err(Errno::EINVAL)
        );
        // Too many.
        handle_dma_map(&dma, &cbs, &map(0x4000, PAGE, RW), &mut none).unwrap();
        assert_eq!(
            handle_dma_map(&dma, &cbs, &map(0x8000, PAGE, RW), &mut none),
            Err(Errno::EINVAL)
        );
        // mmap failure (fd not mappable: a pipe) fails the map.
        let (r, _w) = nix::unistd::pipe().unwrap();
        dma.remove_region(0x4000, PAGE).unwrap();
        let mut fds = vec![r];
        assert!(handle_dma_map(&dma, &cbs, &map(0x8000, PAGE, RW), &mut fds).is_err());
        assert_eq!(dma.region_count(), 1);
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run memfd_create or file-backed mmap")]
    fn identical_remap_calls_register_again() {
        let dma = DmaController::new(10);
        let cbs = Recorder {
            dma: Some(&dma),
            ..Default::default()
        };
        let fd = memfd(PAGE);
        let mut fds = vec![fd.try_clone().unwrap()];
        handle_dma_map(&dma, &cbs, &map(0x1000, PAGE, RW), &mut fds).unwrap();
        let mut fds = vec![fd.try_clone().unwrap()];
        handle_dma_map(&dma, &cbs, &map(0x1000, PAGE, RW), &mut fds).unwrap();
        assert_eq!(cbs.log.borrow().len(), 2);
        assert_eq!(dma.region_count(), 1);
    }

    #[test]
    fn unmap_bad_payloads() {
        let dma = DmaController::new(10);
        let cbs = NoDmaCallbacks;
        let mut none = Vec::new();
        handle_dma_map(&dma, &cbs, &map(PAGE, PAGE, RW), &mut none).unwrap();
        // Short.
        assert_eq!(
            handle_dma_unmap(&dma, &cbs, &[0u8; 8], &mut none),
            Err(Errno::EINVAL)
        );
        // argsz too small / too large.
        assert_eq!(
            handle_dma_unmap(&dma, &cbs, &unmap_body(8, 0, PAGE, PAGE), &mut none),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            handle_dma_unmap(
                &dma,
                &cbs,
                &unmap_body(1024 * 1024 + 8, 0, PAGE, PAGE),
                &mut none
            ),
            Err(Errno::EINVAL)
        );
        // Bad flags.
        assert_eq!(
            handle_dma_unmap(&dma, &cbs, &unmap_body(24, 4, PAGE, PAGE), &mut none),
            Err(Errno::EINVAL)
        );
        assert_eq!(
            handle_dma_unmap(&dma, &cbs, &unmap_body(24, 3, 0, 0), &mut none),
            Err(Errno::EINVAL)
        );
        // ALL with an address.
        assert_eq!(
            handle_dma_unmap(
                &dma,
                &cbs,
                &unmap_body(24, DMA_UNMAP_ALL, 0x10000, PAGE),
                &mut none
            ),
            Err(Errno::EINVAL)
        );
        // Dirty bitmap: header missing, argsz overflowing with the bitmap size.
        let body = unmap_body(40, DMA_UNMAP_GET_DIRTY_BITMAP, PAGE, PAGE);
        assert_eq!(
            handle_dma_unmap(&dma, &cbs, &body, &mut none),
            Err(Errno::EINVAL)
        );
        let mut body = unmap_body(40, DMA_UNMAP_GET_DIRTY_BITMAP, PAGE, PAGE);
        body.extend_from_slice(&PAGE.to_le_bytes());
        body.extend_from_slice(&(u64::MAX - 40 + 8).to_le_bytes());
        assert_eq!(
            handle_dma_unmap(&dma, &cbs, &body, &mut none),
            Err(Errno::EINVAL)
        );
        // Not logging.
        let mut body = unmap_body(48, DMA_UNMAP_GET_DIRTY_BITMAP, PAGE, PAGE);
        body.extend_from_slice(&PAGE.to_le_bytes());
        body.extend_from_slice(&8u64.to_le_bytes());
        body.extend_from_slice(&[0u8; 8]);
        assert_eq!(
            handle_dma_unmap(&dma, &cbs, &body, &mut none),
            Err(Errno::EINVAL)
        );
        // Partial range of an existing region.
        assert_eq!(
            handle_dma_unmap(&dma, &cbs, &unmap_body(24, 0, PAGE, PAGE / 2), &mut none),
            Err(Errno::ENOENT)
        );
        assert_eq!(dma.region_count(), 1);
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run memfd_create or file-backed mmap")]
    fn unmap_all_calls_unregister_for_each() {
        let dma = DmaController::new(100);
        let cbs = Recorder {
            dma: Some(&dma),
            ..Default::default()
        };
        for i in 0..5u64 {
            let mut fds = vec![memfd(PAGE)];
            handle_dma_map(&dma, &cbs, &map(i * PAGE, PAGE, RW), &mut fds).unwrap();
        }
        let body = unmap_body(24, DMA_UNMAP_ALL, 0, 0);
        let reply = handle_dma_unmap(&dma, &cbs, &body, &mut Vec::new()).unwrap();
        assert_eq!(reply, body);
        assert_eq!(dma.region_count(), 0);
        let log = cbs.log.borrow();
        let unregs: Vec<_> = log.iter().filter(|e| e.0 == 'u').collect();
        assert_eq!(unregs.len(), 5);
        assert!(
            unregs.iter().all(|e| e.3),
            "regions usable during unregister"
        );
        assert_eq!(
            unregs.iter().map(|e| e.1).collect::<Vec<_>>(),
            (0..5).map(|i| i * PAGE).collect::<Vec<_>>()
        );
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run memfd_create or file-backed mmap")]
    fn unmap_with_dirty_bitmap() {
        let dma = DmaController::new(10);
        let cbs = NoDmaCallbacks;
        let mut fds = vec![memfd(16 * PAGE)];
        handle_dma_map(&dma, &cbs, &map(0x10 * PAGE, 16 * PAGE, RW), &mut fds).unwrap();
        dma.logging_start(PAGE, &[]).unwrap();
        dma.mark_dirty_range(0x11 * PAGE, 2 * PAGE);
        let mut body = unmap_body(48, DMA_UNMAP_GET_DIRTY_BITMAP, 0x10 * PAGE, 16 * PAGE);
        body.extend_from_slice(&PAGE.to_le_bytes());
        body.extend_from_slice(&8u64.to_le_bytes());
        // Wrong bitmap size for the range.
        let mut bad = body.clone();
        bad[32..40].copy_from_slice(&16u64.to_le_bytes());
        bad[0..4].copy_from_slice(&56u32.to_le_bytes());
        assert_eq!(
            handle_dma_unmap(&dma, &cbs, &bad, &mut Vec::new()),
            Err(Errno::EINVAL)
        );
        assert_eq!(dma.region_count(), 1);

        let reply = handle_dma_unmap(&dma, &cbs, &body, &mut Vec::new()).unwrap();
        assert_eq!(reply.len(), 24 + 16 + 8);
        assert_eq!(&reply[..40], &body[..40]);
        assert_eq!(u64::from_le_bytes(reply[40..48].try_into().unwrap()), 0b110);
        assert_eq!(dma.region_count(), 0);
    }
}
