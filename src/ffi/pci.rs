//! The C ABI of PCI configuration space: `vfu_pci_init`, IDs and class,
//! the config space pointer, and capabilities.

use super::*;

#[no_mangle]
pub extern "C" fn vfu_pci_init(
    vfu_ctx: *mut vfu_ctx_t,
    pci_type: vfu_pci_type_t,
    hdr_type: c_int,
    revision: c_int,
) -> c_int {
    guard(|| {
        let r = ctx(vfu_ctx).and_then(|c| {
            let t = u32::try_from(pci_type).map_err(|_| Errno::EINVAL)?;
            c.pci_init(t, hdr_type, revision)
        });
        ret(r, |_| 0)
    })
}

#[no_mangle]
pub extern "C" fn vfu_pci_set_id(
    vfu_ctx: *mut vfu_ctx_t,
    vid: u16,
    did: u16,
    ssvid: u16,
    ssid: u16,
) {
    guard(|| {
        if let Some(p) = ctx(vfu_ctx).ok().and_then(|c| c.pci()) {
            p.set_id(vid, did, ssvid, ssid);
        }
    })
}

#[no_mangle]
pub extern "C" fn vfu_pci_set_class(vfu_ctx: *mut vfu_ctx_t, base: u8, sub: u8, pi: u8) {
    guard(|| {
        if let Some(p) = ctx(vfu_ctx).ok().and_then(|c| c.pci()) {
            p.set_class(base, sub, pi);
        }
    })
}

#[no_mangle]
pub extern "C" fn vfu_pci_get_config_space(vfu_ctx: *mut vfu_ctx_t) -> *mut vfu_pci_config_space_t {
    guard(|| match ctx(vfu_ctx).ok().and_then(|c| c.pci()) {
        Some(p) => p.as_ptr() as *mut vfu_pci_config_space_t,
        None => {
            set_errno(libc::EINVAL);
            std::ptr::null_mut()
        }
    })
}

#[no_mangle]
pub extern "C" fn vfu_pci_add_capability(
    vfu_ctx: *mut vfu_ctx_t,
    pos: size_t,
    flags: c_int,
    data: *mut c_void,
) -> ssize_t {
    guard(|| {
        let r = (|| {
            let c = ctx(vfu_ctx)?;
            let p = c.pci().ok_or(Errno::EINVAL)?;
            if data.is_null() {
                return Err(Errno::EINVAL);
            }
            let data = data as *const u8;
            let mut rd = |off: usize, dst: &mut [u8]| -> Result<()> {
                // SAFETY: the C contract is that `data` holds a whole
                // capability; the reader is only asked for bytes within the
                // size the capability's own header gives.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.add(off), dst.as_mut_ptr(), dst.len())
                };
                Ok(())
            };
            let has_cb = c.regions.borrow()[device::region::CFG].cb.is_some();
            p.add_capability_raw(pos, flags, has_cb, &mut rd)
        })();
        ret(r, |off| off as ssize_t)
    })
}

#[no_mangle]
pub extern "C" fn vfu_pci_find_capability(
    vfu_ctx: *mut vfu_ctx_t,
    extended: bool,
    cap_id: c_int,
) -> size_t {
    guard(|| {
        let r = ctx(vfu_ctx).and_then(|c| {
            c.pci()
                .ok_or(Errno::EINVAL)?
                .find_capability(extended, cap_id)
        });
        ret(r, |o| o)
    })
}

#[no_mangle]
pub extern "C" fn vfu_pci_find_next_capability(
    vfu_ctx: *mut vfu_ctx_t,
    extended: bool,
    pos: size_t,
    cap_id: c_int,
) -> size_t {
    guard(|| {
        let r = ctx(vfu_ctx).and_then(|c| {
            c.pci()
                .ok_or(Errno::EINVAL)?
                .find_next_capability(extended, pos, cap_id)
        });
        ret(r, |o| o)
    })
}
