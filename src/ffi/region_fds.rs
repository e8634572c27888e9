//! The C ABI of region I/O fds: `vfu_create_ioeventfd`.

use super::*;

#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn vfu_create_ioeventfd(
    vfu_ctx: *mut vfu_ctx_t,
    region_idx: u32,
    fd: c_int,
    gpa_offset: size_t,
    size: u32,
    flags: u32,
    datamatch: u64,
    shadow_fd: c_int,
    shadow_offset: size_t,
) -> c_int {
    guard(|| {
        let r = ctx(vfu_ctx).and_then(|c| {
            if region_idx as usize >= device::region::NUM_REGIONS {
                return Err(Errno::EINVAL);
            }
            c.create_ioeventfd(
                region_idx as usize,
                IoEventFd {
                    gpa_offset: gpa_offset as u64,
                    size: size as u64,
                    fd,
                    flags,
                    datamatch,
                    shadow_fd,
                    shadow_offset: shadow_offset as u64,
                },
            )
        });
        ret(r, |_| 0)
    })
}
