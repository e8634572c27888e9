//! The debug line logged for every region access when the context's log
//! level is `LOG_DEBUG`, in the reference implementation's wording (its debug
//! builds print these lines; device authors read them and scripts grep them):
//!
//! * `region0: wrote 0x1234 to (0x10:4)` / `region0: read 0 from (0x10:4)`
//!   for 1, 2, 4 and 8-byte accesses (the value in host byte order);
//! * `region0: wrote 16 bytes at 0x10` for other sizes;
//! * `region0: write to (0x10:4) failed: Invalid argument` when the access
//!   fails.
//!
//! Numbers are printed as C's `%#llx` does: `0` for zero, else `0x` and
//! lowercase hex digits. The caller checks the log level first (one load),
//! so the formatting code stays out of the access path.

use std::fmt;

use super::{log_level, Context};
use crate::error::{Errno, Result};

/// A number printed the way C's `%#llx` prints it.
pub(crate) struct CHex(pub u64);

impl fmt::Display for CHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == 0 {
            f.write_str("0")
        } else {
            write!(f, "{:#x}", self.0)
        }
    }
}

/// `strerror(e)`: the message without Rust's " (os error N)" suffix.
pub(crate) struct StrError(pub Errno);

impl fmt::Display for StrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = std::io::Error::from_raw_os_error(self.0 .0).to_string();
        let msg = s.rfind(" (os error ").map_or(&s[..], |i| &s[..i]);
        f.write_str(msg)
    }
}

/// The value of an access of 1, 2, 4 or 8 bytes, in host byte order.
fn value(buf: &[u8]) -> Option<u64> {
    Some(match buf.len() {
        1 => u64::from(buf[0]),
        2 => u64::from(u16::from_ne_bytes(buf.try_into().ok()?)),
        4 => u64::from(u32::from_ne_bytes(buf.try_into().ok()?)),
        8 => u64::from_ne_bytes(buf.try_into().ok()?),
        _ => return None,
    })
}

/// Formats the line for an access of `buf` (the data written, or read) at
/// `offset` of region `idx` that ended with `res`.
pub(crate) fn line(
    idx: usize,
    buf: &[u8],
    offset: u64,
    is_write: bool,
    res: &Result<()>,
) -> String {
    let count = buf.len();
    let off = CHex(offset);
    match (res, value(buf)) {
        (Err(e), _) => {
            let verb = if is_write { "write to" } else { "read from" };
            format!(
                "region{idx}: {verb} ({off}:{count}) failed: {}",
                StrError(*e)
            )
        }
        (Ok(()), Some(v)) if is_write => {
            format!("region{idx}: wrote {} to ({off}:{count})", CHex(v))
        }
        (Ok(()), Some(v)) => format!("region{idx}: read {} from ({off}:{count})", CHex(v)),
        (Ok(()), None) => {
            let verb = if is_write { "wrote" } else { "read" };
            format!("region{idx}: {verb} {count} bytes at {off}")
        }
    }
}

impl Context {
    /// Logs the access at `LOG_DEBUG`. Call only when the level is DEBUG.
    #[cold]
    #[inline(never)]
    pub(crate) fn log_region_access(
        &self,
        idx: usize,
        buf: &[u8],
        offset: u64,
        is_write: bool,
        res: &Result<()>,
    ) {
        if self.log_enabled(log_level::DEBUG) {
            self.log(log_level::DEBUG, &line(idx, buf, offset, is_write, res));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_match_the_reference_wording() {
        let ok = Ok(());
        assert_eq!(
            line(0, &0x1234u32.to_ne_bytes(), 0x10, true, &ok),
            "region0: wrote 0x1234 to (0x10:4)"
        );
        assert_eq!(
            line(7, &[0, 0], 0, false, &ok),
            "region7: read 0 from (0:2)"
        );
        assert_eq!(
            line(2, &[0xab], 0x3, false, &ok),
            "region2: read 0xab from (0x3:1)"
        );
        assert_eq!(
            line(1, &u64::MAX.to_ne_bytes(), 0x8, true, &ok),
            "region1: wrote 0xffffffffffffffff to (0x8:8)"
        );
        assert_eq!(
            line(0, &[0; 16], 0x20, true, &ok),
            "region0: wrote 16 bytes at 0x20"
        );
        assert_eq!(
            line(0, &[0; 3], 0, false, &ok),
            "region0: read 3 bytes at 0"
        );
        assert_eq!(
            line(0, &[0; 4], 0xffc, true, &Err(Errno::EINVAL)),
            "region0: write to (0xffc:4) failed: Invalid argument"
        );
        assert_eq!(
            line(9, &[0; 2], 0, false, &Err(Errno::EIO)),
            "region9: read from (0:2) failed: Input/output error"
        );
    }
}
