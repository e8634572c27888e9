//! The PCI config-space register layout shared by the header emulation
//! (`pci.rs`) and the capability code (`pci_caps.rs`), and [`CfgSpace`],
//! the raw byte access both build on. Neither of those modules imports the
//! other's internals through here; `pci_caps` depends only on this module.

use crate::error::Result;

/// Size of conventional PCI config space.
pub const CFG_SPACE_SIZE: usize = 256;
/// Size of PCI Express (and PCI-X mode 2) extended config space.
pub const CFG_SPACE_EXP_SIZE: usize = 4096;
/// Size of the standard (type 0) header at the start of config space.
pub const STD_HEADER_SIZE: usize = 64;

/// `VFU_PCI_TYPE_CONVENTIONAL`.
pub const PCI_TYPE_CONVENTIONAL: u32 = 0;
/// `VFU_PCI_TYPE_PCI_X_1`.
pub const PCI_TYPE_PCI_X_1: u32 = 1;
/// `VFU_PCI_TYPE_PCI_X_2`.
pub const PCI_TYPE_PCI_X_2: u32 = 2;
/// `VFU_PCI_TYPE_EXPRESS`.
pub const PCI_TYPE_EXPRESS: u32 = 3;

/// Offset of the capability list pointer in the standard header.
pub const OFF_CAP_PTR: usize = 0x34;
/// Status register: capabilities list present.
pub const STATUS_CAP_LIST: u16 = 0x10;

/// The device-side callback for the config-space region, as
/// [`PciConfig::access`](super::pci::PciConfig::access) calls it: `(data, offset, is_write)`, returning the
/// number of bytes handled.
pub type CfgCallback<'a> = dyn FnMut(&mut [u8], u64, bool) -> Result<usize> + 'a;

/// Raw (non-emulated) little-endian access to a config-space buffer.
pub(crate) trait CfgSpace {
    /// Config space size in bytes.
    fn size(&self) -> usize;
    /// The `PCI_TYPE_*` of the function.
    fn pci_type(&self) -> u32;
    /// Copies bytes at `off` into `dst`; `EINVAL` outside config space.
    fn read_raw(&self, off: usize, dst: &mut [u8]) -> Result<()>;
    /// Copies `src` to `off`; `EINVAL` outside config space.
    fn write_raw(&self, off: usize, src: &[u8]) -> Result<()>;

    fn rd8(&self, off: usize) -> Result<u8> {
        let mut b = [0u8; 1];
        self.read_raw(off, &mut b)?;
        Ok(b[0])
    }

    fn rd16(&self, off: usize) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read_raw(off, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    fn rd32(&self, off: usize) -> Result<u32> {
        let mut b = [0u8; 4];
        self.read_raw(off, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn wr8(&self, off: usize, v: u8) -> Result<()> {
        self.write_raw(off, &[v])
    }

    fn wr16(&self, off: usize, v: u16) -> Result<()> {
        self.write_raw(off, &v.to_le_bytes())
    }

    fn wr32(&self, off: usize, v: u32) -> Result<()> {
        self.write_raw(off, &v.to_le_bytes())
    }
}
