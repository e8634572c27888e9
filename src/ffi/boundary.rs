//! The panic boundary and handle casting shared by every `extern "C"` entry
//! point.
//!
//! Every exported function runs its body through [`guard`], so that a panic
//! inside the library becomes an error return with `errno = EIO` instead of
//! unwinding into C. Handles are converted with the [`Castable`] trait, which
//! ties each opaque C type to the Rust type it stands for.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::Errno;

/// Sets the calling thread's errno.
pub fn set_errno(e: i32) {
    // SAFETY: __errno_location always returns a valid thread-local pointer.
    unsafe { *libc::__errno_location() = e };
}

/// Reads the calling thread's errno.
pub fn errno() -> i32 {
    // SAFETY: as above.
    unsafe { *libc::__errno_location() }
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
pub fn guard<R: FailValue>(f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            set_errno(libc::EIO);
            R::fail()
        }
    }
}

/// Maps a `Result` to the C convention: the value, or `fail()` with errno.
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

/// Borrows the Rust object behind a C handle; `None` for NULL.
///
/// # Safety
/// `p` must be NULL or a handle this library handed out (via [`into_handle`])
/// that has not been freed, and the object must not be mutably aliased.
pub unsafe fn from_handle<'a, C: Castable>(p: *const C) -> Option<&'a C::RustType> {
    // SAFETY: per the caller's contract p is NULL or points at a live RustType.
    unsafe { (p as *const C::RustType).as_ref() }
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
}
