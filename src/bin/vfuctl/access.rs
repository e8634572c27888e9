//! `vfuctl read` and `vfuctl write`: raw region access for debugging.

use std::io::Write;

use super::cli::{connect, parse_region, parse_u64, parse_usize, region_name, At, Failure, Parsed};

/// Largest `read` length.
const MAX_READ: usize = 16 << 20;

/// Usage of `vfuctl read`.
pub const READ_USAGE: &str = "\
Usage: vfuctl read SOCKET REGION OFFSET [LEN] [--raw] [--timeout SECS]

Reads LEN bytes (default 4, at most 16 MiB) at OFFSET of REGION with
REGION_READ and prints them as a hex dump.

REGION is an index or a name: bar0..bar5, rom, config (or cfg), vga.
Numbers are decimal, or hex with 0x.

Options:
  --raw            write the bytes to standard output as they are
  --timeout SECS   bound on every wait for the server (default 10)";

/// Usage of `vfuctl write`.
pub const WRITE_USAGE: &str = "\
Usage: vfuctl write SOCKET REGION OFFSET VALUE... [--width 1|2|4|8] [--timeout SECS]

Writes each VALUE, little-endian, as one REGION_WRITE of WIDTH bytes
(default 4) at OFFSET, OFFSET + WIDTH, ... of REGION.

REGION is an index or a name: bar0..bar5, rom, config (or cfg), vga.
Values and offsets are decimal, or hex with 0x; a value must fit in WIDTH.

Options:
  --width N        bytes per value: 1, 2, 4 or 8 (default 4)
  --timeout SECS   bound on every wait for the server (default 10)";

/// Runs `vfuctl read`.
pub fn run_read(p: &Parsed) -> Result<(), Failure> {
    let (sock, reg, off, len) = match p.positionals.as_slice() {
        [s, r, o] => (s, r, o, None),
        [s, r, o, l] => (s, r, o, Some(l)),
        _ => {
            return Err(Failure::Usage(
                "read needs SOCKET REGION OFFSET [LEN]".into(),
            ))
        }
    };
    let index = parse_region(reg)?;
    let offset = parse_u64(off)?;
    let len = len.map_or(Ok(4), |l| parse_usize(l))?;
    if len == 0 || len > MAX_READ {
        return Err(Failure::Usage(format!(
            "LEN must be between 1 and {MAX_READ}"
        )));
    }
    if offset.checked_add(len as u64).is_none() {
        return Err(Failure::Usage("OFFSET + LEN overflows".into()));
    }
    let mut c = connect(sock, "device", p.timeout()?, false)?;
    let data = c.region_read(index, offset, len).at(&format!(
        "reading {len} bytes at {offset:#x} of {}",
        region_name(index)
    ))?;
    let mut out = std::io::stdout().lock();
    let r = if p.flag("raw") {
        out.write_all(&data)
    } else {
        out.write_all(hexdump(offset, &data).as_bytes())
    };
    r.and_then(|()| out.flush())
        .map_err(|e| Failure::Local(format!("writing to standard output: {e}")))
}

/// Runs `vfuctl write`.
pub fn run_write(p: &Parsed) -> Result<(), Failure> {
    let [sock, reg, off, values @ ..] = p.positionals.as_slice() else {
        return Err(Failure::Usage(
            "write needs SOCKET REGION OFFSET VALUE...".into(),
        ));
    };
    if values.is_empty() {
        return Err(Failure::Usage("write needs at least one VALUE".into()));
    }
    let index = parse_region(reg)?;
    let offset = parse_u64(off)?;
    let width = match p.value("width") {
        None => 4,
        Some(w) => match parse_usize(w)? {
            w @ (1 | 2 | 4 | 8) => w,
            _ => return Err(Failure::Usage("--width must be 1, 2, 4 or 8".into())),
        },
    };
    let mut writes = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let value = parse_u64(v)?;
        if width < 8 && value >> (8 * width) != 0 {
            return Err(Failure::Usage(format!(
                "value {v} does not fit in {width} byte(s)"
            )));
        }
        let at = (i as u64)
            .checked_mul(width as u64)
            .and_then(|d| offset.checked_add(d))
            .ok_or_else(|| Failure::Usage("OFFSET overflows".into()))?;
        writes.push((at, value.to_le_bytes()[..width].to_vec()));
    }
    let mut c = connect(sock, "device", p.timeout()?, false)?;
    for (at, bytes) in writes {
        c.region_write(index, at, &bytes).at(&format!(
            "writing {width} bytes at {at:#x} of {}",
            region_name(index)
        ))?;
    }
    Ok(())
}

/// `offset: 16 hex bytes |ascii|` lines.
pub fn hexdump(offset: u64, data: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in data.chunks(16).enumerate() {
        let at = offset.wrapping_add(16 * i as u64);
        let mut hex = String::new();
        for j in 0..16 {
            match chunk.get(j) {
                Some(b) => hex.push_str(&format!("{b:02x} ")),
                None => hex.push_str("   "),
            }
            if j == 7 {
                hex.push(' ');
            }
        }
        let ascii: String = chunk
            .iter()
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    b as char
                } else {
                    '.'
                }
            })
            .collect();
        s.push_str(&format!("{at:08x}: {hex} |{ascii}|\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hexdump_layout() {
        let d: Vec<u8> = (0x41..0x41 + 20).collect();
        let h = hexdump(0x100, &d);
        let lines: Vec<&str> = h.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            "00000100: 41 42 43 44 45 46 47 48  49 4a 4b 4c 4d 4e 4f 50  |ABCDEFGHIJKLMNOP|"
        );
        assert!(lines[1].starts_with("00000110: 51 52 53 54 "));
        assert!(lines[1].ends_with("|QRST|"));
        assert_eq!(
            hexdump(0, &[0, 0x7f]).trim_end().rsplit('|').nth(1),
            Some("..")
        );
    }
}
