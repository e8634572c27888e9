//! `vfuctl save` and `vfuctl load`: device state to and from a file, through
//! the migration protocol (STOP_COPY to save, RESUMING to load).
//!
//! File format (all integers little-endian), 32-byte header then the data:
//!
//! | offset | size | field                                                |
//! |--------|------|------------------------------------------------------|
//! | 0      | 8    | magic `VFUCKPT\0`                                    |
//! | 8      | 4    | format version, 1                                    |
//! | 12     | 4    | header size, 32                                      |
//! | 16     | 8    | data length in bytes                                 |
//! | 24     | 4    | CRC-32 (IEEE) of the data                            |
//! | 28     | 2    | PCI vendor ID of the saved device (0: unknown)       |
//! | 30     | 2    | PCI device ID of the saved device (0: unknown)       |
//!
//! A file is refused unless every field checks out and the data is exactly
//! `data length` bytes with the right CRC.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use vfio_user::client::Client;
use vfio_user::device::migration::*;
use vfio_user::device::region;

use super::cli::{connect, describe, state_name, At, Failure, Parsed};

/// Magic at the start of a checkpoint file.
pub const MAGIC: [u8; 8] = *b"VFUCKPT\0";
/// Current format version.
pub const VERSION: u32 = 1;
/// Header size.
pub const HEADER_SIZE: usize = 32;
/// Largest checkpoint accepted.
const MAX_DATA: u64 = 1 << 30;

/// Usage of `vfuctl save`.
pub const SAVE_USAGE: &str = "\
Usage: vfuctl save SOCKET FILE [--stop] [--timeout SECS]

Saves the device's migration state to FILE ('-' for standard output): moves
the device to STOP, then STOP_COPY, reads all its migration data, and moves
it back through STOP to the state it was in (RUNNING or STOP), as a
snapshot. With --stop it stays in STOP, so that its state cannot move on
from what was saved (a server on this library returns its device to
RUNNING once vfuctl disconnects; upstream's servers keep it stopped). The file is written to a temporary name and renamed
into place, with a header (magic, version, length, CRC-32, PCI IDs).

Options:
  --stop           leave the device in STOP after saving
  --timeout SECS   bound on every wait for the server (default 10)";

/// Usage of `vfuctl load`.
pub const LOAD_USAGE: &str = "\
Usage: vfuctl load SOCKET FILE [--stop] [--force] [--timeout SECS]

Restores a state saved by `vfuctl save` into the device: checks the whole
file first (a corrupted or truncated file is refused before the device is
touched), then moves the device to RESUMING, writes the data, and moves it
to STOP and RUNNING.

Options:
  --stop           leave the device in STOP after loading (until vfuctl
                   disconnects, for a server on this library)
  --force          load even if the file was saved from a device with other
                   PCI vendor/device IDs
  --timeout SECS   bound on every wait for the server (default 10)";

/// CRC-32 (IEEE 802.3, reflected, as zlib computes it).
pub fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, e) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *e = c;
    }
    let mut crc = u32::MAX;
    for &b in data {
        crc = table[((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// A parsed checkpoint.
#[derive(Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// `(vendor, device)` of the saved device, when known.
    pub ids: Option<(u16, u16)>,
    /// The migration data.
    pub data: Vec<u8>,
}

/// Serializes a checkpoint.
pub fn encode(ids: Option<(u16, u16)>, data: &[u8]) -> Vec<u8> {
    let (v, d) = ids.unwrap_or((0, 0));
    let mut out = Vec::with_capacity(HEADER_SIZE + data.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(HEADER_SIZE as u32).to_le_bytes());
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&v.to_le_bytes());
    out.extend_from_slice(&d.to_le_bytes());
    out.extend_from_slice(data);
    out
}

/// Parses and checks a checkpoint; the error says what is wrong.
pub fn decode(file: &[u8]) -> Result<Checkpoint, String> {
    let Some(h) = file.get(..HEADER_SIZE) else {
        return Err(format!(
            "too short for a checkpoint header ({} bytes)",
            file.len()
        ));
    };
    if h[..8] != MAGIC {
        return Err("not a vfuctl checkpoint (bad magic)".into());
    }
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let version = u32_at(8);
    if version != VERSION {
        return Err(format!("unsupported checkpoint version {version}"));
    }
    let hsize = u32_at(12);
    if hsize as usize != HEADER_SIZE {
        return Err(format!("bad header size {hsize}"));
    }
    let mut l = [0u8; 8];
    l.copy_from_slice(&h[16..24]);
    let len = u64::from_le_bytes(l);
    let data = &file[HEADER_SIZE..];
    if len != data.len() as u64 {
        return Err(format!(
            "the header announces {len} bytes of data but the file holds {} (truncated or extended)",
            data.len()
        ));
    }
    let crc = u32_at(24);
    let actual = crc32(data);
    if crc != actual {
        return Err(format!(
            "checksum mismatch (header {crc:#010x}, data {actual:#010x}): the file is corrupted"
        ));
    }
    let v = u16::from_le_bytes([h[28], h[29]]);
    let d = u16::from_le_bytes([h[30], h[31]]);
    Ok(Checkpoint {
        ids: (v != 0 || d != 0).then_some((v, d)),
        data: data.to_vec(),
    })
}

fn pci_ids(c: &mut Client) -> Option<(u16, u16)> {
    let b = c.region_read(region::CFG as u32, 0, 4).ok()?;
    Some((
        u16::from_le_bytes([*b.first()?, *b.get(1)?]),
        u16::from_le_bytes([*b.get(2)?, *b.get(3)?]),
    ))
}

fn require_migration(c: &mut Client) -> Result<u32, Failure> {
    match c.migration_flags() {
        Ok(f) if f & VFIO_MIGRATION_STOP_COPY != 0 => {}
        Ok(f) => {
            return Err(Failure::Refused(format!(
                "the device does not support STOP_COPY migration (flags {f:#x})"
            )))
        }
        Err(e) if e.server_errno().is_some() => {
            return Err(Failure::Refused(format!(
                "the device does not support migration (DEVICE_FEATURE MIGRATION: {})",
                describe(&e)
            )))
        }
        Err(e) => return Err(super::cli::client_failure("DEVICE_FEATURE MIGRATION", &e)),
    }
    let s = c.mig_state().at("reading the migration state")?;
    if s != VFIO_USER_DEVICE_STATE_RUNNING && s != VFIO_USER_DEVICE_STATE_STOP {
        return Err(Failure::Refused(format!(
            "the device is in migration state {}; this needs RUNNING or STOP",
            state_name(s)
        )));
    }
    Ok(s)
}

fn set(c: &mut Client, from: u32, to: u32) -> Result<(), Failure> {
    c.set_mig_state(to).at(&format!(
        "moving from {} to {}",
        state_name(from),
        state_name(to)
    ))
}

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename), or
/// to standard output for `-`.
fn write_file(path: &str, bytes: &[u8]) -> Result<(), Failure> {
    let err = |e: std::io::Error| Failure::Local(format!("writing {path}: {e}"));
    if path == "-" {
        let mut out = std::io::stdout().lock();
        return out.write_all(bytes).and_then(|()| out.flush()).map_err(err);
    }
    let tmp = format!("{path}.tmp.{}", std::process::id());
    let r = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r.map_err(err)
}

fn read_file(path: &str) -> Result<Vec<u8>, Failure> {
    let err = |e: std::io::Error| Failure::Local(format!("reading {path}: {e}"));
    let mut buf = Vec::new();
    let limit = MAX_DATA + HEADER_SIZE as u64 + 1;
    if path == "-" {
        std::io::stdin()
            .lock()
            .take(limit)
            .read_to_end(&mut buf)
            .map_err(err)?;
    } else {
        if !Path::new(path).is_file() {
            return Err(Failure::Local(format!("{path}: no such file")));
        }
        File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut buf))
            .map_err(err)?;
    }
    if buf.len() as u64 >= limit {
        return Err(Failure::Local(format!(
            "{path}: larger than any checkpoint"
        )));
    }
    Ok(buf)
}

fn two_args(p: &Parsed, cmd: &str) -> Result<(String, String), Failure> {
    match p.positionals.as_slice() {
        [s, f] => Ok((s.clone(), f.clone())),
        _ => Err(Failure::Usage(format!("{cmd} needs SOCKET FILE"))),
    }
}

/// Runs `vfuctl save`.
pub fn run_save(p: &Parsed) -> Result<(), Failure> {
    let (sock, path) = two_args(p, "save")?;
    let stay_stopped = p.flag("stop");
    let mut c = connect(&sock, "device", p.timeout()?, true)?;
    let initial = require_migration(&mut c)?;
    let ids = pci_ids(&mut c);
    if initial == VFIO_USER_DEVICE_STATE_RUNNING {
        set(
            &mut c,
            VFIO_USER_DEVICE_STATE_RUNNING,
            VFIO_USER_DEVICE_STATE_STOP,
        )?;
    }
    let saved = (|| {
        set(
            &mut c,
            VFIO_USER_DEVICE_STATE_STOP,
            VFIO_USER_DEVICE_STATE_STOP_COPY,
        )?;
        let mut data = Vec::new();
        let chunk = c
            .options()
            .max_data_xfer_size
            .min(c.server_caps().max_data_xfer_size)
            .max(1);
        loop {
            let d = c.mig_data_read(chunk).at("STOP_COPY: MIG_DATA_READ")?;
            if d.is_empty() {
                break;
            }
            if (data.len() + d.len()) as u64 > MAX_DATA {
                return Err(Failure::Refused(
                    "the device produced more than 1 GiB of migration data".into(),
                ));
            }
            data.extend_from_slice(&d);
        }
        set(
            &mut c,
            VFIO_USER_DEVICE_STATE_STOP_COPY,
            VFIO_USER_DEVICE_STATE_STOP,
        )?;
        Ok(data)
    })();
    // Write what was saved before restarting the device, so a failure to
    // restart does not lose it; then restart even if writing failed.
    let written = match &saved {
        Ok(data) => write_file(&path, &encode(ids, data)),
        Err(_) => Ok(()),
    };
    let restart = if !stay_stopped && initial == VFIO_USER_DEVICE_STATE_RUNNING {
        c.set_mig_state(VFIO_USER_DEVICE_STATE_RUNNING)
            .at("moving back to RUNNING")
    } else {
        Ok(())
    };
    let data = saved?;
    written?;
    restart?;
    eprintln!(
        "saved {} bytes of device state to {path}{}",
        data.len(),
        if stay_stopped {
            "; the device is stopped"
        } else {
            ""
        }
    );
    Ok(())
}

/// Runs `vfuctl load`.
pub fn run_load(p: &Parsed) -> Result<(), Failure> {
    let (sock, path) = two_args(p, "load")?;
    let bytes = read_file(&path)?;
    let ckpt = decode(&bytes).map_err(|e| Failure::Local(format!("{path}: {e}")))?;
    let mut c = connect(&sock, "device", p.timeout()?, true)?;
    let initial = require_migration(&mut c)?;
    if !p.flag("force") {
        if let (Some(saved), Some(here)) = (ckpt.ids, pci_ids(&mut c)) {
            if saved != here {
                return Err(Failure::Refused(format!(
                    "{path} was saved from PCI device {:04x}:{:04x} but this device is {:04x}:{:04x} (use --force to load anyway)",
                    saved.0, saved.1, here.0, here.1
                )));
            }
        }
    }
    set(&mut c, initial, VFIO_USER_DEVICE_STATE_RESUMING)?;
    c.mig_data_write(&ckpt.data)
        .at(&format!(
            "RESUMING: MIG_DATA_WRITE of {} bytes",
            ckpt.data.len()
        ))
        .map_err(|f| f.with_note("the device was left in RESUMING"))?;
    set(
        &mut c,
        VFIO_USER_DEVICE_STATE_RESUMING,
        VFIO_USER_DEVICE_STATE_STOP,
    )?;
    if !p.flag("stop") {
        set(
            &mut c,
            VFIO_USER_DEVICE_STATE_STOP,
            VFIO_USER_DEVICE_STATE_RUNNING,
        )?;
    }
    eprintln!(
        "loaded {} bytes of device state from {path}; the device is {}",
        ckpt.data.len(),
        if p.flag("stop") { "stopped" } else { "running" }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_values() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414f_a339
        );
    }

    #[test]
    fn round_trip_and_every_corruption_refused() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let f = encode(Some((0x4e58, 1)), &data);
        assert_eq!(f.len(), HEADER_SIZE + data.len());
        let c = decode(&f).unwrap();
        assert_eq!(c.ids, Some((0x4e58, 1)));
        assert_eq!(c.data, data);
        assert_eq!(decode(&encode(None, &[])).unwrap().ids, None);

        // Any flipped byte in the data, magic, version, size, length or CRC.
        for pos in [0, 8, 12, 16, 24, 25, HEADER_SIZE, HEADER_SIZE + 999] {
            let mut bad = f.clone();
            bad[pos] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at {pos}");
        }
        // Truncated or extended.
        assert!(decode(&f[..f.len() - 1]).is_err());
        let mut longer = f.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        assert!(decode(&f[..10]).is_err());
        assert!(decode(b"").is_err());
        let e = decode(&f[..f.len() - 1]).unwrap_err();
        assert!(e.contains("announces 1000 bytes"), "{e}");
    }
}
