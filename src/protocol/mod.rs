//! The vfio-user wire format: message header, command numbers, flag values and
//! the fixed-size request/reply structures, with explicit, bounds-checked
//! little-endian encoding and decoding.
//!
//! Nothing here does I/O; [`crate::transport`] moves bytes, this module gives
//! them meaning.

pub mod caps;

use crate::error::{Errno, Result};

/// Protocol version this library speaks.
pub const VERSION_MAJOR: u16 = 0;
/// Highest minor version we accept from a client.
pub const VERSION_MINOR: u16 = 2;

/// Size of [`Header`] on the wire.
pub const HEADER_SIZE: usize = 16;

/// Largest data transfer we accept in one message (REGION_WRITE, MIG_DATA_WRITE...).
pub const SERVER_MAX_DATA_XFER_SIZE: usize = 1024 * 1024;
/// Largest message we accept: a REGION_WRITE of [`SERVER_MAX_DATA_XFER_SIZE`].
pub const SERVER_MAX_MSG_SIZE: usize = SERVER_MAX_DATA_XFER_SIZE + HEADER_SIZE + 16;
/// Number of fds we accept in one message, advertised to the client.
pub const SERVER_MAX_FDS: usize = 8;
/// Upper bound of `max_msg_fds` a client may announce.
pub const CLIENT_MAX_FDS_LIMIT: i64 = 1024;
/// Default `max_data_xfer_size` when the client announces none.
pub const DEFAULT_MAX_DATA_XFER_SIZE: usize = 1024 * 1024;
/// Largest errno we accept in an error reply from the client.
pub const MAX_ERROR_NO: u32 = 4096;

/// Command numbers.
pub mod cmd {
    /// `VFIO_USER_VERSION`: version and capability negotiation.
    pub const VERSION: u16 = 1;
    /// `VFIO_USER_DMA_MAP`: the client adds a DMA region.
    pub const DMA_MAP: u16 = 2;
    /// `VFIO_USER_DMA_UNMAP`: the client removes DMA regions.
    pub const DMA_UNMAP: u16 = 3;
    /// `VFIO_USER_DEVICE_GET_INFO`.
    pub const DEVICE_GET_INFO: u16 = 4;
    /// `VFIO_USER_DEVICE_GET_REGION_INFO`.
    pub const DEVICE_GET_REGION_INFO: u16 = 5;
    /// `VFIO_USER_DEVICE_GET_REGION_IO_FDS`: the ioeventfds of a region.
    pub const DEVICE_GET_REGION_IO_FDS: u16 = 6;
    /// `VFIO_USER_DEVICE_GET_IRQ_INFO`.
    pub const DEVICE_GET_IRQ_INFO: u16 = 7;
    /// `VFIO_USER_DEVICE_SET_IRQS`: eventfds and masks of interrupts.
    pub const DEVICE_SET_IRQS: u16 = 8;
    /// `VFIO_USER_REGION_READ`.
    pub const REGION_READ: u16 = 9;
    /// `VFIO_USER_REGION_WRITE`.
    pub const REGION_WRITE: u16 = 10;
    /// `VFIO_USER_DMA_READ`: the server reads guest memory through the client.
    pub const DMA_READ: u16 = 11;
    /// `VFIO_USER_DMA_WRITE`: the server writes guest memory through the client.
    pub const DMA_WRITE: u16 = 12;
    /// `VFIO_USER_DEVICE_RESET`.
    pub const DEVICE_RESET: u16 = 13;
    /// `VFIO_USER_REGION_WRITE_MULTI`: several small posted writes in one message.
    pub const REGION_WRITE_MULTI: u16 = 15;
    /// `VFIO_USER_DEVICE_FEATURE`: migration and dirty-page logging features.
    pub const DEVICE_FEATURE: u16 = 16;
    /// `VFIO_USER_MIG_DATA_READ`: the client pulls migration data.
    pub const MIG_DATA_READ: u16 = 17;
    /// `VFIO_USER_MIG_DATA_WRITE`: the client pushes migration data.
    pub const MIG_DATA_WRITE: u16 = 18;
}

/// Header flag bits.
pub mod flags {
    /// Bits holding the message type.
    pub const TYPE_MASK: u32 = 0xf;
    /// Message type: a command.
    pub const TYPE_COMMAND: u32 = 0x0;
    /// Message type: a reply.
    pub const TYPE_REPLY: u32 = 0x1;
    /// The sender wants no reply.
    pub const NO_REPLY: u32 = 0x10;
    /// The reply reports an error, in `error_no`.
    pub const ERROR: u32 = 0x20;
}

/// `struct vfio_user_header`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Message id; a reply carries its command's.
    pub msg_id: u16,
    /// Command number (`cmd::*`).
    pub cmd: u16,
    /// Size of the whole message, header included.
    pub msg_size: u32,
    /// `flags::*` bits.
    pub flags: u32,
    /// The errno of an error reply.
    pub error_no: u32,
}

impl Header {
    /// Decodes a header from its 16 wire bytes.
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        Header {
            msg_id: u16::from_le_bytes([b[0], b[1]]),
            cmd: u16::from_le_bytes([b[2], b[3]]),
            msg_size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            error_no: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    /// Encodes the header into its 16 wire bytes.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        b[2..4].copy_from_slice(&self.cmd.to_le_bytes());
        b[4..8].copy_from_slice(&self.msg_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error_no.to_le_bytes());
        b
    }

    /// The message type bits.
    pub fn msg_type(&self) -> u32 {
        self.flags & flags::TYPE_MASK
    }

    /// Whether the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & flags::NO_REPLY != 0
    }

    /// Body length announced by the header, or `None` when `msg_size` is
    /// smaller than the header itself.
    pub fn body_len(&self) -> Option<usize> {
        (self.msg_size as usize).checked_sub(HEADER_SIZE)
    }

    /// A reply header for this command.
    pub fn reply(&self, body_len: usize, errno: i32) -> Header {
        let mut flags = flags::TYPE_REPLY;
        if errno != 0 {
            flags |= flags::ERROR;
        }
        Header {
            msg_id: self.msg_id,
            cmd: self.cmd,
            msg_size: (HEADER_SIZE + body_len) as u32,
            flags,
            error_no: errno as u32,
        }
    }
}

/// Little-endian field access into a byte slice, failing with `EINVAL` rather
/// than panicking when the slice is too short.
pub trait Wire {
    /// The byte at `off`.
    fn u8_at(&self, off: usize) -> Result<u8>;
    /// The little-endian u16 at `off`.
    fn u16_at(&self, off: usize) -> Result<u16>;
    /// The little-endian u32 at `off`.
    fn u32_at(&self, off: usize) -> Result<u32>;
    /// The little-endian u64 at `off`.
    fn u64_at(&self, off: usize) -> Result<u64>;
}

fn arr<const N: usize>(b: &[u8], off: usize) -> Result<[u8; N]> {
    let end = off.checked_add(N).ok_or(Errno::EINVAL)?;
    let s = b.get(off..end).ok_or(Errno::EINVAL)?;
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    Ok(a)
}

impl Wire for [u8] {
    fn u8_at(&self, off: usize) -> Result<u8> {
        self.get(off).copied().ok_or(Errno::EINVAL)
    }
    fn u16_at(&self, off: usize) -> Result<u16> {
        arr::<2>(self, off).map(u16::from_le_bytes)
    }
    fn u32_at(&self, off: usize) -> Result<u32> {
        arr::<4>(self, off).map(u32::from_le_bytes)
    }
    fn u64_at(&self, off: usize) -> Result<u64> {
        arr::<8>(self, off).map(u64::from_le_bytes)
    }
}

/// Appends little-endian fields to a reply buffer.
pub trait WireOut {
    /// Appends a little-endian u16.
    fn put_u16(&mut self, v: u16);
    /// Appends a little-endian u32.
    fn put_u32(&mut self, v: u32);
    /// Appends a little-endian u64.
    fn put_u64(&mut self, v: u64);
}

impl WireOut for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
}

/// `struct vfio_user_device_info` size.
pub const DEVICE_INFO_SIZE: usize = 16;
/// `VFIO_DEVICE_FLAGS_RESET`.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `VFIO_DEVICE_FLAGS_PCI`.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `struct vfio_region_info` size.
pub const REGION_INFO_SIZE: usize = 32;
/// `VFIO_REGION_INFO_FLAG_READ`.
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_MMAP`: the client may map the region.
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// `VFIO_REGION_INFO_FLAG_CAPS`: capabilities follow the region info.
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
/// Size of the sparse-mmap capability without its areas.
pub const SPARSE_MMAP_HDR_SIZE: usize = 16;
/// Size of one sparse-mmap area.
pub const SPARSE_MMAP_AREA_SIZE: usize = 16;

/// `struct vfio_user_region_access` size (without data).
pub const REGION_ACCESS_SIZE: usize = 16;

/// `struct vfio_user_region_io_fds_request` size; the reply has the same head.
pub const REGION_IO_FDS_SIZE: usize = 16;
/// Size of one `vfio_user_sub_region_ioeventfd`.
pub const SUB_REGION_IOEVENTFD_SIZE: usize = 48;
/// `VFIO_USER_IO_FD_TYPE_IOEVENTFD`.
pub const IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// `VFIO_USER_IO_FD_TYPE_IOEVENTFD_SHADOW`.
pub const IO_FD_TYPE_IOEVENTFD_SHADOW: u32 = 2;

/// `struct vfio_irq_info` size.
pub const IRQ_INFO_SIZE: usize = 16;
/// `VFIO_IRQ_INFO_EVENTFD`.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// `VFIO_IRQ_INFO_MASKABLE`.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// `VFIO_IRQ_INFO_AUTOMASKED`.
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// `VFIO_IRQ_INFO_NORESIZE`.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// `struct vfio_irq_set` size.
pub const IRQ_SET_SIZE: usize = 20;
/// `VFIO_IRQ_SET_DATA_NONE`.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// `VFIO_IRQ_SET_DATA_BOOL`.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// `VFIO_IRQ_SET_DATA_EVENTFD`.
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// `VFIO_IRQ_SET_DATA_TYPE_MASK`.
pub const IRQ_SET_DATA_TYPE_MASK: u32 = 0x7;
/// `VFIO_IRQ_SET_ACTION_MASK`.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// `VFIO_IRQ_SET_ACTION_UNMASK`.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// `VFIO_IRQ_SET_ACTION_TRIGGER`.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
/// `VFIO_IRQ_SET_ACTION_TYPE_MASK`.
pub const IRQ_SET_ACTION_TYPE_MASK: u32 = 0x38;

/// `struct vfio_user_dma_region_access` size (without data).
pub const DMA_REGION_ACCESS_SIZE: usize = 16;

/// Size of one entry of a REGION_WRITE_MULTI request.
pub const WRITE_MULTI_ENTRY_SIZE: usize = 8 + 4 + 4 + 8;
/// Largest number of entries in a REGION_WRITE_MULTI request.
pub const WRITE_MULTI_MAX: usize = 200;
/// Largest data of one REGION_WRITE_MULTI entry.
pub const WRITE_MULTI_DATA_MAX: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            msg_id: 0x1234,
            cmd: cmd::REGION_READ,
            msg_size: 40,
            flags: flags::NO_REPLY,
            error_no: 7,
        };
        let b = h.encode();
        assert_eq!(b[0], 0x34);
        assert_eq!(Header::decode(&b), h);
        assert!(h.no_reply());
        assert_eq!(h.body_len(), Some(24));
        let short = Header { msg_size: 3, ..h };
        assert_eq!(short.body_len(), None);
    }

    #[test]
    fn wire_reads_are_bounds_checked() {
        let b = [1u8, 0, 0, 0, 2, 0, 0, 0];
        assert_eq!(b[..].u32_at(0), Ok(1));
        assert_eq!(b[..].u32_at(4), Ok(2));
        assert_eq!(b[..].u32_at(5), Err(Errno::EINVAL));
        assert_eq!(b[..].u64_at(usize::MAX - 2), Err(Errno::EINVAL));
        assert_eq!(b[..].u64_at(0), Ok(0x0000_0002_0000_0001));
    }

    #[test]
    fn reply_header_carries_errno() {
        let h = Header {
            msg_id: 9,
            cmd: 4,
            msg_size: 32,
            flags: 0,
            error_no: 0,
        };
        let r = h.reply(0, libc::EINVAL);
        assert_eq!(r.flags, flags::TYPE_REPLY | flags::ERROR);
        assert_eq!(r.error_no, libc::EINVAL as u32);
        assert_eq!(r.msg_size, 16);
        assert_eq!(h.reply(8, 0).flags, flags::TYPE_REPLY);
    }
}
