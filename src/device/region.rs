//! Device regions: BARs, ROM, config space and VGA, their setup rules, and the
//! DEVICE_GET_REGION_INFO / DEVICE_GET_REGION_IO_FDS replies.

use std::os::fd::RawFd;
use std::rc::Rc;

use super::Context;
use crate::error::{Errno, Result};
use crate::protocol::*;

/// `VFU_REGION_FLAG_READ`.
pub const FLAG_READ: u32 = 1 << 0;
/// `VFU_REGION_FLAG_WRITE`.
pub const FLAG_WRITE: u32 = 1 << 1;
/// `VFU_REGION_FLAG_RW`.
pub const FLAG_RW: u32 = FLAG_READ | FLAG_WRITE;
/// `VFU_REGION_FLAG_MEM`: a memory BAR (I/O when clear).
pub const FLAG_MEM: u32 = 1 << 2;
/// `VFU_REGION_FLAG_ALWAYS_CB`: every config-space access goes to the callback.
pub const FLAG_ALWAYS_CB: u32 = 1 << 3;
/// `VFU_REGION_FLAG_64_BITS`.
pub const FLAG_64_BITS: u32 = 1 << 4;
/// `VFU_REGION_FLAG_PREFETCH`.
pub const FLAG_PREFETCH: u32 = 1 << 5;
/// Every valid region flag.
pub const FLAG_MASK: u32 = FLAG_RW | FLAG_MEM | FLAG_ALWAYS_CB | FLAG_64_BITS | FLAG_PREFETCH;

/// Region index of BAR0; BARs 0-5 are 0..=5.
pub const BAR0: usize = 0;
/// Region index of BAR1.
pub const BAR1: usize = 1;
/// Region index of BAR2.
pub const BAR2: usize = 2;
/// Region index of BAR3.
pub const BAR3: usize = 3;
/// Region index of BAR4.
pub const BAR4: usize = 4;
/// Region index of BAR5.
pub const BAR5: usize = 5;
/// Region index of the expansion ROM.
pub const ROM: usize = 6;
/// Region index of PCI config space.
pub const CFG: usize = 7;
/// Region index of the VGA region.
pub const VGA: usize = 8;
/// Number of PCI regions.
pub const NUM_REGIONS: usize = 9;

/// The device's handler for accesses to a region: `(ctx, buf, offset,
/// is_write)`, returning the number of bytes handled.
pub type RegionCb = Rc<dyn Fn(&Context, &mut [u8], u64, bool) -> Result<usize>>;

/// An ioeventfd registered with `vfu_create_ioeventfd`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoEventFd {
    /// Offset in the region of the watched access.
    pub gpa_offset: u64,
    /// Size of the watched access in bytes.
    pub size: u64,
    /// The eventfd the client signals; not owned (the device closes it).
    pub fd: RawFd,
    /// `VFU_IOEVENTFD_FLAG_*` flags (data match).
    pub flags: u32,
    /// Value to match when the data-match flag is set.
    pub datamatch: u64,
    /// Shadow memory fd, or -1 for a plain ioeventfd; not owned either.
    pub shadow_fd: RawFd,
    /// Offset in the shadow memory.
    pub shadow_offset: u64,
}

/// One region's setup.
#[derive(Clone, Default)]
pub struct Region {
    /// `FLAG_*` flags.
    pub flags: u32,
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// The access handler.
    pub cb: Option<RegionCb>,
    /// Mappable areas as (offset, length) within the region.
    pub mmap_areas: Vec<(u64, u64)>,
    /// The device's fd backing the region; not owned (the device closes it).
    pub fd: Option<RawFd>,
    /// Offset of the region in `fd`.
    pub offset: u64,
    /// The ioeventfds registered for the region.
    pub ioeventfds: Vec<IoEventFd>,
}

/// What `vfu_setup_region` is given; build it with [`RegionSetup::new`]
/// and the `with_*` methods and pass it to
/// [`Context::setup_region`](super::Context::setup_region).
pub struct RegionSetup {
    /// Size in bytes.
    pub size: u64,
    /// The access handler (see [`RegionSetup::with_callback`]).
    pub cb: Option<RegionCb>,
    /// `FLAG_*` flags: at least one of read and write; `FLAG_MEM` for a
    /// memory BAR, an I/O BAR otherwise.
    pub flags: u32,
    /// Areas the client may map, as (offset, length) pairs; `None`: all of
    /// it when there is an fd.
    pub mmap_areas: Option<Vec<(u64, u64)>>,
    /// The fd backing the region, for the client to map.
    pub fd: Option<RawFd>,
    /// Offset of the region in `fd`.
    pub offset: u64,
}

impl RegionSetup {
    /// A region of `size` bytes with `FLAG_*` flags, no callback and no fd.
    pub fn new(size: u64, flags: u32) -> RegionSetup {
        RegionSetup {
            size,
            cb: None,
            flags,
            mmap_areas: None,
            fd: None,
            offset: 0,
        }
    }

    /// Handles accesses with `f(ctx, buf, offset, is_write)`, which returns
    /// the number of bytes it handled (anything short is an error). For a
    /// read, `f` fills `buf`; for a write, `buf` holds the data. The library
    /// has checked that `offset + buf.len()` lies inside the region. An error
    /// goes back to the client as the access's errno.
    pub fn with_callback(
        mut self,
        f: impl Fn(&Context, &mut [u8], u64, bool) -> Result<usize> + 'static,
    ) -> RegionSetup {
        self.cb = Some(Rc::new(f));
        self
    }

    /// Lets the client map the region from `fd` at `offset` (the whole
    /// region, or only `areas` given as (offset, length) pairs). The fd stays
    /// the caller's: keep it open while the context lives.
    pub fn with_fd(
        mut self,
        fd: RawFd,
        offset: u64,
        areas: Option<Vec<(u64, u64)>>,
    ) -> RegionSetup {
        self.fd = Some(fd);
        self.offset = offset;
        self.mmap_areas = areas;
        self
    }
}

fn is_bar(idx: usize) -> bool {
    (BAR0..=BAR5).contains(&idx)
}

/// Checks `vfu_setup_region`'s arguments against the rules upstream applies
/// and returns the region to store.
pub fn validate(regions: &[Region], idx: usize, s: RegionSetup) -> Result<Region> {
    let flags = s.flags;
    if flags & !FLAG_MASK != 0 || flags & FLAG_RW == 0 {
        return Err(Errno::EINVAL);
    }
    if flags & FLAG_ALWAYS_CB != 0 && s.cb.is_none() {
        return Err(Errno::EINVAL);
    }
    if let Some(a) = &s.mmap_areas {
        if a.is_empty() || s.fd.is_none() {
            return Err(Errno::EINVAL);
        }
    }
    if idx >= NUM_REGIONS {
        return Err(Errno::EINVAL);
    }
    if is_bar(idx) {
        if s.size > 0 {
            if !s.size.is_power_of_two() {
                return Err(Errno::EINVAL);
            }
            let min = if flags & FLAG_MEM != 0 { 16 } else { 4 };
            if s.size < min {
                return Err(Errno::EINVAL);
            }
        }
        let bar = idx - BAR0;
        if bar % 2 == 1 {
            if flags & FLAG_64_BITS != 0 || regions[idx - 1].flags & FLAG_64_BITS != 0 {
                return Err(Errno::EINVAL);
            }
        } else if flags & FLAG_64_BITS != 0 && regions[idx + 1].size > 0 {
            return Err(Errno::EINVAL);
        }
    }
    if idx == CFG && (flags & FLAG_RW != FLAG_RW || flags & FLAG_MEM != 0) {
        return Err(Errno::EINVAL);
    }
    if let Some(a) = &s.mmap_areas {
        for &(off, len) in a {
            match off.checked_add(len) {
                Some(end) if end <= s.size => {}
                _ => return Err(Errno::EINVAL),
            }
        }
    }
    let mmap_areas = match (s.mmap_areas, s.fd) {
        (Some(a), _) => a,
        (None, Some(_)) => vec![(0, s.size)],
        (None, None) => Vec::new(),
    };
    Ok(Region {
        flags,
        size: s.size,
        cb: s.cb,
        mmap_areas,
        fd: s.fd,
        offset: s.offset,
        ioeventfds: Vec::new(),
    })
}

/// DEVICE_GET_REGION_INFO: the reply payload and the fds to pass with it.
pub fn get_region_info(regions: &[Region], payload: &[u8]) -> Result<(Vec<u8>, Vec<RawFd>)> {
    if payload.len() < REGION_INFO_SIZE {
        return Err(Errno::EINVAL);
    }
    let argsz = payload.u32_at(0)? as usize;
    if argsz < REGION_INFO_SIZE {
        return Err(Errno::EINVAL);
    }
    let index = payload.u32_at(8)?;
    let r = regions.get(index as usize).ok_or(Errno::EINVAL)?;
    let caps_size = if r.size > 0 && !r.mmap_areas.is_empty() {
        SPARSE_MMAP_HDR_SIZE + r.mmap_areas.len() * SPARSE_MMAP_AREA_SIZE
    } else {
        0
    };
    let full = REGION_INFO_SIZE + caps_size;
    let mut flags = 0;
    if r.flags & FLAG_READ != 0 {
        flags |= REGION_INFO_FLAG_READ;
    }
    if r.flags & FLAG_WRITE != 0 {
        flags |= REGION_INFO_FLAG_WRITE;
    }
    if r.fd.is_some() {
        flags |= REGION_INFO_FLAG_MMAP;
    }
    let with_caps = caps_size > 0 && argsz >= full;
    if with_caps {
        flags |= REGION_INFO_FLAG_CAPS;
    }
    let mut out = Vec::with_capacity(full.min(argsz));
    out.put_u32(full as u32);
    out.put_u32(flags);
    out.put_u32(index);
    out.put_u32(if with_caps {
        REGION_INFO_SIZE as u32
    } else {
        0
    });
    out.put_u64(r.size);
    out.put_u64(r.offset);
    let mut fds = Vec::new();
    if with_caps {
        out.put_u16(REGION_INFO_CAP_SPARSE_MMAP);
        out.put_u16(1);
        out.put_u32(0);
        out.put_u32(r.mmap_areas.len() as u32);
        out.put_u32(0);
        for &(off, len) in &r.mmap_areas {
            out.put_u64(off);
            out.put_u64(len);
        }
        if let Some(fd) = r.fd {
            fds.push(fd);
        }
    }
    // Like upstream, a small argsz truncates the reply to what the client can
    // take; argsz in the reply says how much it needs.
    out.truncate(full.min(argsz));
    Ok((out, fds))
}

/// DEVICE_GET_REGION_IO_FDS: the reply payload and the fds to pass with it.
pub fn get_region_io_fds(regions: &[Region], payload: &[u8]) -> Result<(Vec<u8>, Vec<RawFd>)> {
    if payload.len() < REGION_IO_FDS_SIZE {
        return Err(Errno::EINVAL);
    }
    let argsz = payload.u32_at(0)? as usize;
    let flags = payload.u32_at(4)?;
    let index = payload.u32_at(8)?;
    let count = payload.u32_at(12)?;
    if flags != 0 || count != 0 {
        return Err(Errno::EINVAL);
    }
    let r = regions.get(index as usize).ok_or(Errno::EINVAL)?;
    if r.flags & FLAG_MASK == 0 {
        return Err(Errno::EINVAL);
    }
    if !(REGION_IO_FDS_SIZE..=SERVER_MAX_DATA_XFER_SIZE).contains(&argsz) {
        return Err(Errno::EINVAL);
    }
    let n = r.ioeventfds.len();
    let fits = (argsz - REGION_IO_FDS_SIZE) / SUB_REGION_IOEVENTFD_SIZE;
    let full = REGION_IO_FDS_SIZE + n * SUB_REGION_IOEVENTFD_SIZE;
    let mut out = Vec::with_capacity(full);
    out.put_u32(full as u32);
    out.put_u32(0);
    out.put_u32(index);
    out.put_u32(n as u32);
    let mut fds: Vec<RawFd> = Vec::new();
    // An ioeventfd without an fd (-1) is listed with fd_index -1.
    let fd_index = |fd: RawFd, fds: &mut Vec<RawFd>| -> u32 {
        if fd < 0 {
            return u32::MAX;
        }
        match fds.iter().position(|&f| f == fd) {
            Some(i) => i as u32,
            None => {
                fds.push(fd);
                (fds.len() - 1) as u32
            }
        }
    };
    if n > 0 && fits >= n {
        // Newest first, as upstream lists them.
        for e in r.ioeventfds.iter().rev() {
            out.put_u64(e.gpa_offset);
            out.put_u64(e.size);
            out.put_u32(fd_index(e.fd, &mut fds));
            if e.shadow_fd >= 0 {
                out.put_u32(IO_FD_TYPE_IOEVENTFD_SHADOW);
                out.put_u32(e.flags);
                out.put_u32(fd_index(e.shadow_fd, &mut fds));
            } else {
                out.put_u32(IO_FD_TYPE_IOEVENTFD);
                out.put_u32(e.flags);
                out.put_u32(0);
            }
            out.put_u64(e.shadow_offset);
            out.put_u64(e.datamatch);
        }
    }
    Ok((out, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(size: u64, flags: u32) -> RegionSetup {
        RegionSetup {
            size,
            cb: None,
            flags,
            mmap_areas: None,
            fd: None,
            offset: 0,
        }
    }

    fn regions() -> Vec<Region> {
        vec![Region::default(); NUM_REGIONS]
    }

    #[test]
    fn bar_rules() {
        let mut r = regions();
        assert!(validate(&r, 0, setup(4096, FLAG_RW | FLAG_MEM)).is_ok());
        assert_eq!(
            validate(&r, 0, setup(3000, FLAG_RW)).err(),
            Some(Errno::EINVAL)
        );
        assert_eq!(
            validate(&r, 0, setup(8, FLAG_RW | FLAG_MEM)).err(),
            Some(Errno::EINVAL)
        );
        assert!(validate(&r, 0, setup(4, FLAG_RW)).is_ok());
        assert_eq!(
            validate(&r, 1, setup(16, FLAG_RW | FLAG_MEM | FLAG_64_BITS)).err(),
            Some(Errno::EINVAL)
        );
        r[0] = validate(&r, 0, setup(16, FLAG_RW | FLAG_MEM | FLAG_64_BITS)).unwrap();
        assert_eq!(
            validate(&r, 1, setup(16, FLAG_RW | FLAG_MEM)).err(),
            Some(Errno::EINVAL)
        );
        r[3].size = 16;
        assert_eq!(
            validate(&r, 2, setup(16, FLAG_RW | FLAG_MEM | FLAG_64_BITS)).err(),
            Some(Errno::EINVAL)
        );
        assert_eq!(
            validate(&r, 9, setup(16, FLAG_RW)).err(),
            Some(Errno::EINVAL)
        );
        assert_eq!(
            validate(&r, CFG, setup(256, FLAG_READ)).err(),
            Some(Errno::EINVAL)
        );
        assert_eq!(validate(&r, 4, setup(16, 0)).err(), Some(Errno::EINVAL));
        assert_eq!(
            validate(&r, 4, setup(16, FLAG_RW | FLAG_ALWAYS_CB)).err(),
            Some(Errno::EINVAL)
        );
    }

    #[test]
    fn mmap_areas_checked_and_defaulted() {
        let r = regions();
        let mut s = setup(0x2000, FLAG_RW | FLAG_MEM);
        s.mmap_areas = Some(vec![(0x1000, 0x1001)]);
        s.fd = Some(5);
        assert_eq!(validate(&r, 0, s).err(), Some(Errno::EINVAL));
        let mut s = setup(0x2000, FLAG_RW | FLAG_MEM);
        s.mmap_areas = Some(vec![(u64::MAX, 2)]);
        s.fd = Some(5);
        assert_eq!(validate(&r, 0, s).err(), Some(Errno::EINVAL));
        let mut s = setup(0x2000, FLAG_RW | FLAG_MEM);
        s.mmap_areas = Some(vec![(0, 0x1000)]);
        assert_eq!(
            validate(&r, 0, s).err(),
            Some(Errno::EINVAL),
            "areas need an fd"
        );
        let mut s = setup(0x2000, FLAG_RW | FLAG_MEM);
        s.fd = Some(5);
        assert_eq!(validate(&r, 0, s).unwrap().mmap_areas, vec![(0, 0x2000)]);
    }

    #[test]
    fn region_info_with_sparse_caps() {
        let mut r = regions();
        let mut s = setup(0x2000, FLAG_RW | FLAG_MEM);
        s.mmap_areas = Some(vec![(0, 0x1000), (0x1000, 0x1000)]);
        s.fd = Some(7);
        r[2] = validate(&r, 2, s).unwrap();
        let mut req = Vec::new();
        req.put_u32(32);
        req.put_u32(0);
        req.put_u32(2);
        req.put_u32(0);
        req.put_u64(0);
        req.put_u64(0);
        let (out, fds) = get_region_info(&r, &req).unwrap();
        assert_eq!(out.len(), 32);
        assert_eq!(out[..].u32_at(0), Ok(32 + 16 + 32));
        assert_eq!(
            out[..].u32_at(4),
            Ok(REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE | REGION_INFO_FLAG_MMAP)
        );
        assert!(fds.is_empty());
        req[0..4].copy_from_slice(&80u32.to_le_bytes());
        let (out, fds) = get_region_info(&r, &req).unwrap();
        assert_eq!(out.len(), 80);
        assert_eq!(
            out[..].u32_at(4).unwrap() & REGION_INFO_FLAG_CAPS,
            REGION_INFO_FLAG_CAPS
        );
        assert_eq!(out[..].u32_at(12), Ok(32));
        assert_eq!(out[..].u32_at(32 + 8), Ok(2));
        assert_eq!(out[..].u64_at(32 + 16 + 16), Ok(0x1000));
        assert_eq!(fds, vec![7]);
        req[8] = 9;
        assert!(get_region_info(&r, &req).is_err());
        assert!(get_region_info(&r, &req[..31]).is_err());
    }
}
