//! Recognising calls made by binaries built against the 2025 header.
//!
//! The 2025 `vfu_setup_device_dma(ctx, dma_register, dma_unregister)` had
//! no `max_regions`. A binary compiled with that prototype and run against
//! this library passes its register callback where `max_regions` is read,
//! its unregister callback as `dma_register`, and whatever the fourth
//! argument register holds as `dma_unregister`. Source code is fine (the
//! header maps the old call forms, see src/ffi/header_trailer.h); only old
//! *binaries* hit this, and for them no call could be made safe: the fourth
//! argument is garbage. So `vfu_setup_device_dma` refuses the call (EINVAL)
//! when `max_regions` is an address inside executable code, which no
//! meaningful region count is. A 2025 call with a NULL register callback
//! reads as `max_regions == 0`; that is accepted as upstream accepts it (no
//! region can then ever be mapped, so neither stored callback is ever
//! called) and logged as a warning through the device's log function. See
//! docs/api-2025.md.

use std::ffi::c_int;
use std::io::Write;

use crate::device::{log_level, Context};

/// Lowest address that can hold code on Linux: the kernel refuses mappings
/// below `vm.mmap_min_addr`, 64 KiB by default. Counts below it are taken
/// as counts without looking further.
const MIN_CODE_ADDR: usize = 0x1_0000;

/// Whether `v`, read as an address, lies inside an executable mapping of
/// this process: an executable `PT_LOAD` segment of a loaded ELF object, or
/// any mapping `/proc/self/maps` shows with `x` permission (code made at run
/// time, such as a JIT's).
pub(super) fn is_code_address(v: usize) -> bool {
    v >= MIN_CODE_ADDR && (in_loaded_object(v) || in_exec_mapping(v))
}

fn in_loaded_object(v: usize) -> bool {
    struct Query {
        addr: usize,
        found: bool,
    }

    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> c_int {
        // SAFETY: `data` is the `Query` passed to dl_iterate_phdr below,
        // alive and not otherwise borrowed during the iteration.
        let q = unsafe { &mut *(data as *mut Query) };
        // SAFETY: the dynamic linker passes a valid `dl_phdr_info` for the
        // duration of the callback.
        let info = unsafe { &*info };
        if info.dlpi_phdr.is_null() {
            return 0;
        }
        // SAFETY: `dlpi_phdr` points at `dlpi_phnum` program headers of a
        // loaded object, which stay mapped during the callback.
        let phdrs =
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
        for p in phdrs {
            if p.p_type != libc::PT_LOAD || p.p_flags & libc::PF_X == 0 {
                continue;
            }
            let Some(start) = (info.dlpi_addr as usize).checked_add(p.p_vaddr as usize) else {
                continue;
            };
            let end = start.saturating_add(p.p_memsz as usize);
            if (start..end).contains(&q.addr) {
                q.found = true;
                return 1;
            }
        }
        0
    }

    let mut q = Query {
        addr: v,
        found: false,
    };
    // SAFETY: `visit` matches the callback type and only uses `data` as the
    // `Query` it is given here, which outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), &mut q as *mut Query as *mut libc::c_void) };
    q.found
}

fn in_exec_mapping(v: usize) -> bool {
    // Without /proc (some chroots) only the loaded objects are known.
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return false;
    };
    maps.lines().any(|line| {
        let mut f = line.split_ascii_whitespace();
        let (Some(range), Some(perms)) = (f.next(), f.next()) else {
            return false;
        };
        let Some((lo, hi)) = range.split_once('-') else {
            return false;
        };
        let (Ok(lo), Ok(hi)) = (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
        else {
            return false;
        };
        perms.as_bytes().get(2) == Some(&b'x') && (lo..hi).contains(&v)
    })
}

/// Logs `msg` at `level` through the context's log function, or on stderr
/// when the device set up no log function that would show it (for the
/// refusal, which a device should not miss).
pub(super) fn report(c: &Context, level: i32, msg: &str) {
    if c.log_enabled(level) {
        c.log(level, msg);
    } else {
        // Nothing to do if stderr itself is gone.
        let _ = writeln!(std::io::stderr(), "libvfio-user: {msg}");
    }
}

/// The check `vfu_setup_device_dma` makes of its `max_regions`: `Err` with
/// the message to log when the call must be refused.
pub(super) fn check_max_regions(c: &Context, max_regions: usize) -> Result<(), &'static str> {
    if is_code_address(max_regions) {
        return Err(concat!(
            "vfu_setup_device_dma: max_regions is the address of code, not a count: ",
            "called with the 2025 3-argument signature (a program built against ",
            "the 2025 header); rebuild it against the current header"
        ));
    }
    if max_regions == 0 {
        // Only through the device's log function: 0 is also a legal count.
        c.log(
            log_level::WARNING,
            "vfu_setup_device_dma: max_regions is 0, so the client cannot map any DMA \
             region (a program built against the 2025 header that passes a NULL \
             dma_register callback also gets here: rebuild it)",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn local_fn() {}

    #[test]
    fn counts_are_not_code() {
        for v in [0, 1, 64, 4096, 1_000_000, usize::MAX] {
            assert!(!is_code_address(v), "{v:#x}");
        }
    }

    #[test]
    fn function_addresses_are_code() {
        // In this test binary, in libc, and in the middle of a function.
        let here = local_fn as *const () as usize;
        assert!(in_loaded_object(here));
        assert!(in_exec_mapping(here));
        assert!(is_code_address(here + 1));
        let libc_fn = libc::getpid as *const () as usize;
        assert!(is_code_address(libc_fn));
    }

    #[test]
    fn data_addresses_are_not_code() {
        let heap = Box::new(0u64);
        let stack = 0u64;
        assert!(!is_code_address(&*heap as *const u64 as usize));
        assert!(!is_code_address(&stack as *const u64 as usize));
    }
}
