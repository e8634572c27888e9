//! Helpers shared by the fuzz targets: a reader that turns the fuzz input
//! into values (running out of input yields zeros, never an error), makers
//! for the kinds of fds a client can send, and an open-fd counter.

#![allow(dead_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Consumes the fuzz input front to back.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Up to `n` bytes (fewer when the input runs out).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (a, b) = self.data.split_at(n);
        self.data = b;
        a
    }

    /// A length-prefixed (u16) chunk.
    pub fn chunk(&mut self) -> &'a [u8] {
        let n = self.u16() as usize;
        self.bytes(n)
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }

    /// A small number `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u32) -> u32 {
        if n == 0 {
            0
        } else {
            u32::from(self.u8()) % n
        }
    }
}

fn owned(raw: RawFd) -> OwnedFd {
    assert!(
        raw >= 0,
        "fd creation failed: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: a fresh descriptor returned by the kernel to us.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

/// A memfd of `size` bytes (sparse).
pub fn memfd(size: u64) -> OwnedFd {
    // SAFETY: the name is a valid NUL-terminated string.
    let fd = owned(unsafe { libc::memfd_create(c"vfu-fuzz".as_ptr(), libc::MFD_CLOEXEC) });
    // SAFETY: plain ftruncate on our fd.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    assert_eq!(r, 0);
    fd
}

/// An eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: plain eventfd(2).
    owned(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })
}

/// A pipe's write end whose read end is closed (writing to it raises
/// SIGPIPE).
pub fn pipe_end() -> OwnedFd {
    let mut p = [0 as RawFd; 2];
    // SAFETY: p has room for the two fds.
    assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    drop(owned(p[0]));
    owned(p[1])
}

/// `/dev/null`, read-only.
pub fn devnull() -> OwnedFd {
    // SAFETY: the path is a valid NUL-terminated string.
    owned(unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) })
}

/// Duplicates `fd`.
pub fn dup(fd: &OwnedFd) -> OwnedFd {
    fd.try_clone().expect("dup")
}

/// Number of fds this process has open.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
        // read_dir's own fd is listed too.
        - 1
}
