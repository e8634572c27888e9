//! Client-side memory: shared guest memory the client owns and hands to the
//! server, the address space the client serves `DMA_READ` / `DMA_WRITE`
//! from, and an eventfd helper for interrupts.

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::EfdFlags;
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
use nix::unistd::ftruncate;

use crate::error::Errno;

/// Memory the server may reach through `DMA_READ` / `DMA_WRITE` messages.
///
/// Implementations are called on the client's thread while it waits for a
/// reply (or in [`super::Client::serve_dma`]); an error is sent back to the
/// server as the errno of the reply.
pub trait DmaBacking {
    /// Fills `buf` with the bytes at IOVA `addr`.
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno>;
    /// Stores `data` at IOVA `addr`.
    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), Errno>;
}

/// Anonymous shared memory (a memfd mapped `MAP_SHARED`) owned by the
/// client. Its fd can be passed to the server with `DMA_MAP`, so that both
/// processes (or threads) see the same bytes; the client reads and writes it
/// with [`GuestMemory::read`] and [`GuestMemory::write`].
///
/// The memory is shared with a peer that may write it at any time, so it is
/// never exposed as a Rust slice: every access is a bounds-checked copy.
#[derive(Debug)]
pub struct GuestMemory {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only accessed through raw
// copies (never through references), so moving it to or sharing it with
// another thread cannot create aliasing references; concurrent copies race
// only on the bytes, exactly as with the server process sharing the memory.
unsafe impl Send for GuestMemory {}
// SAFETY: see `Send`: all accesses take `&self` and are raw byte copies.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Creates `len` bytes of zeroed shared memory. `EINVAL` for a zero
    /// length.
    pub fn new(len: usize) -> Result<GuestMemory, Errno> {
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let size = libc::off_t::try_from(len).map_err(|_| Errno::EINVAL)?;
        let length = NonZeroUsize::new(len).ok_or(Errno::EINVAL)?;
        let fd = memfd_create(c"vfio-user-guest", MFdFlags::MFD_CLOEXEC)?;
        ftruncate(&fd, size)?;
        // SAFETY: a fresh shared mapping of our own fd, at an address the
        // kernel picks, so it cannot replace any existing mapping.
        let ptr = unsafe {
            mmap(
                None,
                length,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )
        }?;
        Ok(GuestMemory {
            fd,
            ptr: ptr.as_ptr().cast::<u8>(),
            len,
        })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (zero-sized memory cannot be created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The memfd, to pass with `DMA_MAP` (or to back a server region).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, Errno> {
        let off = usize::try_from(offset).map_err(|_| Errno::EFAULT)?;
        match off.checked_add(len) {
            Some(end) if end <= self.len => Ok(off),
            _ => Err(Errno::EFAULT),
        }
    }

    /// Copies `buf.len()` bytes at `offset` into `buf`; `EFAULT` when the
    /// range is outside the memory.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let off = self.check(offset, buf.len())?;
        // SAFETY: `check` proved off + buf.len() <= len, so the source lies
        // in our live mapping; `copy` tolerates overlap should `buf` itself
        // live in this memory.
        unsafe { std::ptr::copy(self.ptr.add(off), buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Reads `len` bytes at `offset` into a new vector.
    pub fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let mut v = vec![0u8; len];
        self.read(offset, &mut v)?;
        Ok(v)
    }

    /// Copies `data` to `offset`; `EFAULT` when the range is outside the
    /// memory.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let off = self.check(offset, data.len())?;
        // SAFETY: as in `read`, the destination range lies in our live,
        // writable mapping.
        unsafe { std::ptr::copy(data.as_ptr(), self.ptr.add(off), data.len()) };
        Ok(())
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        if let Some(p) = NonNull::new(self.ptr.cast::<libc::c_void>()) {
            // SAFETY: `ptr`/`len` describe the mapping made in `new`, which
            // no reference outlives (accesses are copies).
            let _ = unsafe { munmap(p, self.len) };
        }
    }
}

/// One range of guest memory placed at an IOVA.
#[derive(Clone, Debug)]
struct Mapping {
    iova: u64,
    len: u64,
    mem: Arc<GuestMemory>,
    mem_offset: u64,
}

/// An IOVA space made of [`GuestMemory`] ranges: the default memory the
/// client serves the server's DMA messages from.
///
/// An access must fall inside one range (the server never sends a DMA
/// message crossing a mapping); anything else is `EFAULT`.
#[derive(Clone, Debug, Default)]
pub struct DmaSpace {
    maps: Vec<Mapping>,
}

impl DmaSpace {
    /// An empty space.
    pub fn new() -> DmaSpace {
        DmaSpace::default()
    }

    /// Places `len` bytes of `mem`, starting at `mem_offset`, at `iova`.
    /// `EINVAL` for an empty or out-of-bounds range, or one overlapping a
    /// range already placed.
    pub fn insert(
        &mut self,
        iova: u64,
        len: u64,
        mem: Arc<GuestMemory>,
        mem_offset: u64,
    ) -> Result<(), Errno> {
        let end = iova.checked_add(len).ok_or(Errno::EINVAL)?;
        let mem_end = mem_offset.checked_add(len).ok_or(Errno::EINVAL)?;
        if len == 0 || mem_end > mem.len() as u64 {
            return Err(Errno::EINVAL);
        }
        if self
            .maps
            .iter()
            .any(|m| iova < m.iova + m.len && m.iova < end)
        {
            return Err(Errno::EINVAL);
        }
        self.maps.push(Mapping {
            iova,
            len,
            mem,
            mem_offset,
        });
        Ok(())
    }

    /// Removes the range placed exactly at `iova` with length `len`;
    /// returns whether there was one.
    pub fn remove(&mut self, iova: u64, len: u64) -> bool {
        let before = self.maps.len();
        self.maps.retain(|m| !(m.iova == iova && m.len == len));
        before != self.maps.len()
    }

    /// Removes every range.
    pub fn clear(&mut self) {
        self.maps.clear();
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether no range is placed.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// The memory and offset in it that hold `[addr, addr + len)`.
    fn locate(&self, addr: u64, len: usize) -> Result<(&GuestMemory, u64), Errno> {
        let end = addr.checked_add(len as u64).ok_or(Errno::EFAULT)?;
        let m = self
            .maps
            .iter()
            .find(|m| addr >= m.iova && end <= m.iova + m.len)
            .ok_or(Errno::EFAULT)?;
        Ok((&m.mem, m.mem_offset + (addr - m.iova)))
    }
}

impl DmaBacking for DmaSpace {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let (mem, off) = self.locate(addr, buf.len())?;
        mem.read(off, buf)
    }

    fn dma_write(&self, addr: u64, data: &[u8]) -> Result<(), Errno> {
        let (mem, off) = self.locate(addr, data.len())?;
        mem.write(off, data)
    }
}

/// An eventfd, to hand to the server with `DEVICE_SET_IRQS` (or
/// `vfu_create_ioeventfd`) and to observe interrupts on.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// A new non-blocking eventfd with a zero counter.
    pub fn new() -> Result<EventFd, Errno> {
        let fd = nix::sys::eventfd::EventFd::from_value_and_flags(
            0,
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?;
        Ok(EventFd { fd: fd.into() })
    }

    /// Reads and resets the counter; `None` when it is zero.
    pub fn try_read(&self) -> Option<u64> {
        let mut v = [0u8; 8];
        let n = nix::unistd::read(&self.fd, &mut v).ok()?;
        (n == 8).then_some(u64::from_ne_bytes(v))
    }

    /// Waits up to `timeout` for the counter to become non-zero, then reads
    /// and resets it; `None` on timeout.
    pub fn wait(&self, timeout: Duration) -> Option<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(v) = self.try_read() {
                return Some(v);
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut p = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            let _ = poll(
                &mut p,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            );
        }
    }

    /// Adds `v` to the counter (as a device would).
    pub fn signal(&self, v: u64) -> Result<(), Errno> {
        match nix::unistd::write(&self.fd, &v.to_ne_bytes()) {
            Ok(8) => Ok(()),
            Ok(_) => Err(Errno::EAGAIN),
            Err(e) => Err(e.into()),
        }
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run memfd_create or file-backed mmap")]
    fn guest_memory_is_bounds_checked_and_shared_through_its_fd() {
        let m = GuestMemory::new(8192).unwrap();
        m.write(4090, b"abcdef").unwrap();
        assert_eq!(m.read_vec(4090, 6).unwrap(), b"abcdef");
        assert_eq!(m.write(8190, b"xyz"), Err(Errno::EFAULT));
        assert_eq!(m.read(u64::MAX, &mut [0u8; 1]), Err(Errno::EFAULT));
        // The same bytes through the fd.
        let mut b = [0u8; 6];
        let n = nix::sys::uio::pread(m.fd(), &mut b, 4090).unwrap();
        assert_eq!(n, 6);
        assert_eq!(&b, b"abcdef");
        assert_eq!(GuestMemory::new(0).err(), Some(Errno::EINVAL));
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run memfd_create or file-backed mmap")]
    fn dma_space_translates_and_refuses_overlaps() {
        let m = Arc::new(GuestMemory::new(0x3000).unwrap());
        let mut s = DmaSpace::new();
        s.insert(0x10000, 0x1000, m.clone(), 0x2000).unwrap();
        assert_eq!(s.insert(0x10800, 0x1000, m.clone(), 0), Err(Errno::EINVAL));
        assert_eq!(
            s.insert(0x20000, 0x2000, m.clone(), 0x2000),
            Err(Errno::EINVAL)
        );
        s.dma_write(0x10ff0, &[7; 16]).unwrap();
        assert_eq!(m.read_vec(0x2ff0, 16).unwrap(), vec![7; 16]);
        assert_eq!(s.dma_write(0x10ff8, &[7; 16]), Err(Errno::EFAULT));
        assert_eq!(s.dma_read(0x0, &mut [0; 1]), Err(Errno::EFAULT));
        assert!(s.remove(0x10000, 0x1000));
        assert!(s.is_empty());
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run poll(2)")]
    fn eventfd_counts() {
        let e = EventFd::new().unwrap();
        assert_eq!(e.try_read(), None);
        e.signal(2).unwrap();
        e.signal(3).unwrap();
        assert_eq!(e.wait(Duration::from_millis(10)), Some(5));
        assert_eq!(e.wait(Duration::from_millis(10)), None);
    }
}
