//! The panic boundary and handle casting shared by every `extern "C"` entry
//! point.
//!
//! Every exported function runs its body through [`guard`], so that a panic
//! inside the library becomes an error return with `errno = EIO` instead of
//! unwinding into C. Handles are converted with the [`Castable`] trait, which
//! ties each opaque C type to the Rust type it stands for.
//!
//! Pointer arguments from C are turned into references here, by [`c_ref`],
//! [`c_str`], [`c_slice`] and [`c_slice_mut`]: each holds the one `unsafe` block that takes
//! the C API's pointer contract on trust, so the entry points need none of
//! their own for it.

use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::Errno;

/// Sets the calling thread's errno.
#[inline]
pub fn set_errno(e: i32) {
    nix::errno::Errno::set_raw(e);
}

/// Reads the calling thread's errno.
pub fn errno() -> i32 {
    nix::errno::Errno::last_raw()
}

/// What an entry point returns when it fails: -1, NULL, 0...
pub trait FailValue {
    fn fail() -> Self;
}

impl FailValue for libc::c_int {
    fn fail() -> Self {
        -1
    }
}
impl FailValue for libc::ssize_t {
    fn fail() -> Self {
        -1
    }
}
impl FailValue for libc::size_t {
    fn fail() -> Self {
        0
    }
}
impl FailValue for bool {
    fn fail() -> Self {
        false
    }
}
impl FailValue for () {
    fn fail() -> Self {}
}
impl<T> FailValue for *mut T {
    fn fail() -> Self {
        std::ptr::null_mut()
    }
}

/// Runs `f`, turning a panic into `fail()` with `errno = EIO`.
///
/// Always inlined: on the path that does not panic this is `f`'s body plus
/// an unwind table entry, no call and no copy of the result; the landing pad
/// (the `Err` arm) sits out of line.
#[inline(always)]
pub fn guard<R: FailValue>(f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => panicked(),
    }
}

/// The landing of [`guard`] after a panic, kept out of the callers' code.
#[cold]
#[inline(never)]
fn panicked<R: FailValue>() -> R {
    set_errno(libc::EIO);
    R::fail()
}

/// Maps a `Result` to the C convention: the value, or `fail()` with errno.
#[inline(always)]
pub fn ret<T, R: FailValue>(r: Result<T, Errno>, ok: impl FnOnce(T) -> R) -> R {
    match r {
        Ok(v) => ok(v),
        Err(e) => {
            set_errno(e.0);
            R::fail()
        }
    }
}

/// Ties an opaque C handle type to the Rust type behind it.
pub trait Castable {
    type RustType;
}

// ---- pointers from C --------------------------------------------------------
//
// The C API's contract, which every caller of an entry point accepts (as with
// any C library): a pointer argument is NULL or points at what the API
// documents for it (a live handle this library gave out, a NUL-terminated
// string, an array of the stated length), and that memory stays valid and is
// not written by anyone else while the call runs. The helpers below rely on
// it and must only be given pointers that come from a C caller, or from this
// library's own handles. They are `pub(super)`: nothing outside `ffi` sees
// them.

/// Borrows the `T` a C caller passed by pointer; `None` for NULL. The
/// reference must not outlive the entry point's call (or, for a handle,
/// the object).
pub(super) fn c_ref<'a, T>(p: *const T) -> Option<&'a T> {
    // SAFETY: the C API's pointer contract above: NULL or a valid, live `T`
    // that nothing writes during the call.
    unsafe { p.as_ref() }
}

/// Borrows a NUL-terminated string a C caller passed; `None` for NULL.
pub(super) fn c_str<'a>(p: *const c_char) -> Option<&'a CStr> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the C API's pointer contract above: a non-NULL string argument
    // is NUL-terminated and valid during the call.
    Some(unsafe { CStr::from_ptr(p) })
}

/// Borrows an array of `n` `T` a C caller passed; `None` for NULL.
pub(super) fn c_slice<'a, T>(p: *const T, n: usize) -> Option<&'a [T]> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the C API's pointer contract above: a non-NULL array argument
    // holds the `n` elements its length argument gives, valid during the
    // call. (`n * size_of::<T>()` fits in `isize` because the array exists.)
    Some(unsafe { std::slice::from_raw_parts(p, n) })
}

/// Borrows an array of room for `n` `T` a C caller passed, to be filled;
/// `None` for NULL.
pub(super) fn c_slice_mut<'a, T>(p: *mut T, n: usize) -> Option<&'a mut [T]> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the C API's pointer contract above: a non-NULL output array
    // argument has room for the `n` elements its length argument gives,
    // valid during the call, and nothing else reads or writes it meanwhile.
    Some(unsafe { std::slice::from_raw_parts_mut(p, n) })
}

/// Borrows the Rust object behind a C handle; `None` for NULL.
///
/// Under the C API's pointer contract above, `p` is NULL or a handle this
/// library handed out (via [`into_handle`]) that has not been freed.
pub(super) fn handle_ref<'a, C: Castable>(p: *const C) -> Option<&'a C::RustType> {
    c_ref(p as *const C::RustType)
}

/// Gives ownership of a boxed object to C.
pub fn into_handle<C: Castable>(b: Box<C::RustType>) -> *mut C {
    Box::into_raw(b) as *mut C
}

/// Takes back ownership of an object given to C.
///
/// # Safety
/// `p` must come from [`into_handle`] and must not be used afterwards.
pub unsafe fn take_handle<C: Castable>(p: *mut C) -> Option<Box<C::RustType>> {
    if p.is_null() {
        None
    } else {
        // SAFETY: per the caller's contract p came from Box::into_raw.
        Some(unsafe { Box::from_raw(p as *mut C::RustType) })
    }
}

/// The C handle for a borrowed Rust object (for passing to callbacks).
pub fn as_handle<C: Castable>(r: &C::RustType) -> *mut C {
    r as *const C::RustType as *mut C
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_eio() {
        set_errno(0);
        let r: libc::c_int = guard(|| panic!("boom"));
        assert_eq!(r, -1);
        assert_eq!(errno(), libc::EIO);
        let p: *mut u8 = guard(|| panic!("boom"));
        assert!(p.is_null());
        assert_eq!(guard(|| 7 as libc::c_int), 7);
    }

    #[test]
    fn errors_set_errno() {
        let r: libc::c_int = ret(Err::<(), _>(Errno::ENOENT), |_| 0);
        assert_eq!(r, -1);
        assert_eq!(errno(), libc::ENOENT);
    }

    mod through_the_c_abi {
        //! A device callback that panics while the context runs inside a
        //! real C entry point (`vfu_run_ctx`): the panic must come out as
        //! -1/EIO, not abort the process, and the context must go on
        //! serving the client.

        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        use std::rc::Rc;

        use super::super::super::{vfu_attach_ctx, vfu_ctx, vfu_destroy_ctx, vfu_run_ctx};
        use super::*;
        use crate::device::{region, Context, DmaInfo, RegionSetup};
        use crate::protocol::{cmd, flags, Header, HEADER_SIZE};

        fn send(s: &mut UnixStream, id: u16, command: u16, body: &[u8]) {
            let h = Header {
                msg_id: id,
                cmd: command,
                msg_size: (HEADER_SIZE + body.len()) as u32,
                flags: flags::TYPE_COMMAND,
                error_no: 0,
            };
            s.write_all(&h.encode()).unwrap();
            s.write_all(body).unwrap();
        }

        fn recv(s: &mut UnixStream) -> (Header, Vec<u8>) {
            let mut h = [0u8; HEADER_SIZE];
            s.read_exact(&mut h).unwrap();
            let h = Header::decode(&h);
            let mut b = vec![0u8; h.msg_size as usize - HEADER_SIZE];
            s.read_exact(&mut b).unwrap();
            (h, b)
        }

        #[test]
        #[cfg_attr(miri, ignore = "Miri cannot open AF_UNIX sockets")]
        fn a_panicking_callback_does_not_cross_vfu_run_ctx() {
            let path =
                std::env::temp_dir().join(format!("vfu-ffi-panic-{}.sock", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let ctx = Context::create(&path, true).unwrap();
            ctx.setup_region(
                region::BAR0,
                RegionSetup {
                    size: 0x100,
                    cb: Some(Rc::new(|_c: &Context, b: &mut [u8], off: u64, w: bool| {
                        if w && off == 0x10 {
                            panic!("device bug in a region callback");
                        }
                        b.fill(0x11);
                        Ok(b.len())
                    })),
                    flags: region::FLAG_RW | region::FLAG_MEM,
                    mmap_areas: None,
                    fd: None,
                    offset: 0,
                },
            )
            .unwrap();
            ctx.setup_dma(
                4,
                Some(Rc::new(|_c: &Context, _i: &DmaInfo| {
                    panic!("device bug in a DMA callback")
                })),
                None,
            )
            .unwrap();
            ctx.realize().unwrap();
            let h = into_handle::<vfu_ctx>(Box::new(ctx));

            // One thread plays both sides: the client's bytes are queued on
            // the socket before each C call reads them.
            let mut c = UnixStream::connect(&path).unwrap();
            let mut v = vec![0, 0, 2, 0];
            v.extend_from_slice(b"{}\0");
            send(&mut c, 1, cmd::VERSION, &v);
            assert_eq!(vfu_attach_ctx(h), 0);
            assert_eq!(recv(&mut c).0.error_no, 0);

            // A write reaching the panicking callback.
            let mut w = Vec::new();
            w.extend_from_slice(&0x10u64.to_le_bytes());
            w.extend_from_slice(&0u32.to_le_bytes());
            w.extend_from_slice(&4u32.to_le_bytes());
            w.extend_from_slice(&[1, 2, 3, 4]);
            send(&mut c, 2, cmd::REGION_WRITE, &w);
            set_errno(0);
            assert_eq!(vfu_run_ctx(h), -1);
            assert_eq!(errno(), libc::EIO);

            // A DMA map whose register callback panics.
            let mut m = Vec::new();
            m.extend_from_slice(&32u32.to_le_bytes());
            m.extend_from_slice(&3u32.to_le_bytes());
            m.extend_from_slice(&0u64.to_le_bytes());
            m.extend_from_slice(&0x1000u64.to_le_bytes());
            m.extend_from_slice(&0x1000u64.to_le_bytes());
            send(&mut c, 3, cmd::DMA_MAP, &m);
            set_errno(0);
            assert_eq!(vfu_run_ctx(h), -1);
            assert_eq!(errno(), libc::EIO);

            // The context still serves: the next requests are answered (the
            // panicked ones never were).
            let mut r = Vec::new();
            r.extend_from_slice(&0u64.to_le_bytes());
            r.extend_from_slice(&0u32.to_le_bytes());
            r.extend_from_slice(&4u32.to_le_bytes());
            send(&mut c, 4, cmd::REGION_READ, &r);
            assert_eq!(vfu_run_ctx(h), 1);
            let (rh, rb) = recv(&mut c);
            assert_eq!((rh.msg_id, rh.error_no), (4, 0));
            assert_eq!(&rb[16..], &[0x11; 4]);
            drop(c);
            set_errno(0);
            assert_eq!(vfu_run_ctx(h), -1);
            assert_eq!(errno(), libc::ENOTCONN);
            vfu_destroy_ctx(h);
            assert!(!path.exists());
        }
    }
}
