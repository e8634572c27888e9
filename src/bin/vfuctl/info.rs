//! `vfuctl info`: everything a client can learn about a device without
//! changing it.

use serde_json::{json, Value};

use vfio_user::client::Client;
use vfio_user::device::migration::*;
use vfio_user::device::region;
use vfio_user::protocol::{
    DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE,
    IRQ_INFO_NORESIZE, REGION_INFO_FLAG_CAPS, REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
};

use super::cli::{
    client_failure, connect, describe, human_size, irq_name, region_name, state_name, At, Failure,
    Parsed,
};
use super::pcidecode::{self, Pci};

/// Most config space read (PCI Express extended space).
const MAX_CONFIG: u64 = 4096;

/// Usage of `vfuctl info`.
pub const USAGE: &str = "\
Usage: vfuctl info SOCKET [--json] [--timeout SECS]

Shows what the vfio-user server at SOCKET offers: protocol version and
capabilities, device flags, every region (flags R/W/MMAP/CAPS, size, offset,
sparse mmap areas, whether an fd came with it), every IRQ type, migration
support (DEVICE_FEATURE MIGRATION) and the PCI configuration space decoded
like `lspci -vvv` (IDs, class, command/status, BARs, interrupt pin, the
capability chain from 0x34 and, with 4 KiB config space, the extended chain
from 0x100).

Nothing is changed on the device.

Options:
  --json           print one JSON object with the same facts
  --timeout SECS   bound on every wait for the server (default 10)";

struct RegionFacts {
    index: u32,
    flags: u32,
    size: u64,
    offset: u64,
    sparse: Option<Vec<(u64, u64)>>,
    fd: bool,
    ioeventfds: Option<usize>,
}

struct IrqFacts {
    index: u32,
    flags: u32,
    count: u32,
}

struct MigFacts {
    /// `None` when the device refused the MIGRATION feature.
    flags: Option<u64>,
    refusal: Option<String>,
    state: Option<u32>,
}

/// Runs `vfuctl info`.
pub fn run(p: &Parsed) -> Result<(), Failure> {
    let [sock] = p.positionals.as_slice() else {
        return Err(Failure::Usage(
            "info needs exactly one argument: SOCKET".into(),
        ));
    };
    let mut c = connect(sock, "device", p.timeout()?, false)?;
    let dev = match c.device_info() {
        Ok(d) => d,
        Err(e) => {
            // Stopped devices refuse DEVICE_GET_INFO: say why.
            let mut f = client_failure("DEVICE_GET_INFO", &e);
            if let Ok(s) = c.mig_state() {
                f = f.with_note(&format!(
                    "the device is in migration state {}",
                    state_name(s)
                ));
            }
            return Err(f);
        }
    };

    let mut regions = Vec::new();
    for i in 0..dev.num_regions {
        let r = c
            .region_info(i)
            .at(&format!("DEVICE_GET_REGION_INFO {}", region_name(i)))?;
        // Only ask for ioeventfds of regions that exist; a server without
        // any answers with an error, which just means none.
        let ioeventfds = if r.size > 0 {
            c.region_io_fds(i).ok().map(|io| io.entries.len())
        } else {
            None
        };
        regions.push(RegionFacts {
            index: i,
            flags: r.flags,
            size: r.size,
            offset: r.offset,
            sparse: r.sparse_mmap.clone(),
            fd: r.fd.is_some(),
            ioeventfds,
        });
    }
    let mut irqs = Vec::new();
    for i in 0..dev.num_irqs {
        let q = c
            .irq_info(i)
            .at(&format!("DEVICE_GET_IRQ_INFO {}", irq_name(i)))?;
        irqs.push(IrqFacts {
            index: i,
            flags: q.flags,
            count: q.count,
        });
    }
    let mig = migration_facts(&mut c)?;
    let (pci, pci_error) = read_pci(&mut c, &regions)?;

    if p.flag("json") {
        let v = to_json(
            sock,
            &c,
            &dev,
            &regions,
            &irqs,
            &mig,
            pci.as_ref(),
            pci_error,
        );
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string())
        );
    } else {
        print_text(
            sock,
            &c,
            &dev,
            &regions,
            &irqs,
            &mig,
            pci.as_ref(),
            pci_error,
        );
    }
    Ok(())
}

fn migration_facts(c: &mut Client) -> Result<MigFacts, Failure> {
    match c.migration_flags() {
        Ok(f) => {
            let state = c.mig_state().at("reading the migration state")?;
            Ok(MigFacts {
                flags: Some(f),
                refusal: None,
                state: Some(state),
            })
        }
        Err(e) if e.server_errno().is_some() => Ok(MigFacts {
            flags: None,
            refusal: Some(describe(&e)),
            state: None,
        }),
        Err(e) => Err(client_failure("DEVICE_FEATURE MIGRATION", &e)),
    }
}

/// Reads and decodes config space. A server refusal is reported, not fatal.
fn read_pci(
    c: &mut Client,
    regions: &[RegionFacts],
) -> Result<(Option<Pci>, Option<String>), Failure> {
    let Some(cfg) = regions
        .iter()
        .find(|r| r.index == region::CFG as u32 && r.size > 0)
    else {
        return Ok((None, Some("the device has no config space region".into())));
    };
    let len = cfg.size.min(MAX_CONFIG) as usize;
    let bytes = match c.region_read(region::CFG as u32, 0, len) {
        Ok(b) => b,
        Err(e) if e.server_errno().is_some() => {
            return Ok((
                None,
                Some(format!("reading config space: {}", describe(&e))),
            ))
        }
        Err(e) => return Err(client_failure("reading config space", &e)),
    };
    let mut sizes = [0u64; 7];
    for r in regions.iter().filter(|r| r.index <= region::ROM as u32) {
        sizes[r.index as usize] = r.size;
    }
    match pcidecode::decode(&bytes, &sizes) {
        Some(p) => Ok((Some(p), None)),
        None => Ok((
            None,
            Some(format!(
                "config space of {len} bytes is too short to decode"
            )),
        )),
    }
}

fn region_flag_words(flags: u32) -> Vec<&'static str> {
    let mut v = Vec::new();
    for (bit, name) in [
        (REGION_INFO_FLAG_READ, "R"),
        (REGION_INFO_FLAG_WRITE, "W"),
        (REGION_INFO_FLAG_MMAP, "MMAP"),
        (REGION_INFO_FLAG_CAPS, "CAPS"),
    ] {
        if flags & bit != 0 {
            v.push(name);
        }
    }
    v
}

fn irq_flag_words(flags: u32) -> Vec<&'static str> {
    let mut v = Vec::new();
    for (bit, name) in [
        (IRQ_INFO_EVENTFD, "EVENTFD"),
        (IRQ_INFO_MASKABLE, "MASKABLE"),
        (IRQ_INFO_AUTOMASKED, "AUTOMASKED"),
        (IRQ_INFO_NORESIZE, "NORESIZE"),
    ] {
        if flags & bit != 0 {
            v.push(name);
        }
    }
    v
}

fn mig_flag_words(flags: u64) -> Vec<&'static str> {
    let mut v = Vec::new();
    for (bit, name) in [
        (VFIO_MIGRATION_STOP_COPY, "STOP_COPY"),
        (VFIO_MIGRATION_P2P, "P2P"),
        (VFIO_MIGRATION_PRE_COPY, "PRE_COPY"),
    ] {
        if flags & bit != 0 {
            v.push(name);
        }
    }
    v
}

#[allow(clippy::too_many_arguments)]
fn print_text(
    sock: &str,
    c: &Client,
    dev: &vfio_user::client::DeviceInfo,
    regions: &[RegionFacts],
    irqs: &[IrqFacts],
    mig: &MigFacts,
    pci: Option<&Pci>,
    pci_error: Option<String>,
) {
    let (maj, min) = c.version();
    let caps = c.server_caps();
    println!("Device at {sock}: vfio-user protocol {maj}.{min}");
    println!(
        "  Server: max_data_xfer_size {}, max_msg_fds {}, max_dma_maps {}, pgsizes {:#x}, migration pgsize {}, write_multiple {}, twin socket {}",
        caps.max_data_xfer_size,
        caps.max_msg_fds,
        caps.max_dma_maps,
        caps.pgsizes,
        caps.migration_pgsize
            .map_or_else(|| "none".to_string(), |p| p.to_string()),
        if caps.write_multiple { "yes" } else { "no" },
        if caps.twin_socket_fd_index.is_some() { "offered" } else { "no" },
    );
    let mut df = Vec::new();
    if dev.flags & DEVICE_FLAGS_RESET != 0 {
        df.push("RESET");
    }
    if dev.flags & DEVICE_FLAGS_PCI != 0 {
        df.push("PCI");
    }
    println!(
        "  Flags: {} ({:#x}); {} regions, {} IRQ types",
        if df.is_empty() {
            "none".into()
        } else {
            df.join(" ")
        },
        dev.flags,
        dev.num_regions,
        dev.num_irqs
    );

    println!("Regions:");
    let mut any = false;
    for r in regions.iter().filter(|r| r.size > 0) {
        any = true;
        let mut line = format!(
            "  {:<8} size {:#x} [{}]  offset {:#x}  flags {}",
            region_name(r.index),
            r.size,
            human_size(r.size),
            r.offset,
            region_flag_words(r.flags).join(" ")
        );
        if r.fd {
            line.push_str("  fd");
        }
        if let Some(n) = r.ioeventfds.filter(|&n| n > 0) {
            line.push_str(&format!("  ioeventfds {n}"));
        }
        println!("{line}");
        if let Some(areas) = &r.sparse {
            let a: Vec<String> = areas
                .iter()
                .map(|(o, s)| format!("{o:#x}+{s:#x}"))
                .collect();
            println!("           sparse mmap: {}", a.join(" "));
        }
    }
    if !any {
        println!("  none");
    }

    println!("IRQs:");
    for q in irqs {
        let words = irq_flag_words(q.flags);
        println!(
            "  {:<6} count {:<4} flags {}",
            irq_name(q.index),
            q.count,
            if words.is_empty() {
                "none".into()
            } else {
                words.join(" ")
            }
        );
    }

    match (mig.flags, &mig.refusal) {
        (Some(f), _) => println!(
            "Migration: supported ({}), state {}",
            mig_flag_words(f).join(" "),
            mig.state.map_or_else(|| "unknown".into(), state_name)
        ),
        (None, Some(why)) => println!("Migration: not supported ({why})"),
        (None, None) => println!("Migration: not supported"),
    }

    match pci {
        Some(p) => {
            println!("PCI configuration space ({} bytes):", p.size);
            println!("{}", p.render_text("  "));
        }
        None => println!(
            "PCI configuration space: {}",
            pci_error.unwrap_or_else(|| "unavailable".into())
        ),
    }
}

#[allow(clippy::too_many_arguments)]
fn to_json(
    sock: &str,
    c: &Client,
    dev: &vfio_user::client::DeviceInfo,
    regions: &[RegionFacts],
    irqs: &[IrqFacts],
    mig: &MigFacts,
    pci: Option<&Pci>,
    pci_error: Option<String>,
) -> Value {
    let (maj, min) = c.version();
    let caps = c.server_caps();
    let regions: Vec<Value> = regions
        .iter()
        .map(|r| {
            json!({
                "index": r.index,
                "name": region_name(r.index),
                "flags": r.flags,
                "flag_names": region_flag_words(r.flags),
                "readable": r.flags & REGION_INFO_FLAG_READ != 0,
                "writable": r.flags & REGION_INFO_FLAG_WRITE != 0,
                "mmap": r.flags & REGION_INFO_FLAG_MMAP != 0,
                "caps": r.flags & REGION_INFO_FLAG_CAPS != 0,
                "size": r.size,
                "offset": r.offset,
                "sparse_mmap": r.sparse.as_ref().map(|a| a
                    .iter()
                    .map(|(o, s)| json!({"offset": o, "size": s}))
                    .collect::<Vec<_>>()),
                "fd": r.fd,
                "ioeventfds": r.ioeventfds,
            })
        })
        .collect();
    let irqs: Vec<Value> = irqs
        .iter()
        .map(|q| {
            json!({
                "index": q.index,
                "name": irq_name(q.index),
                "count": q.count,
                "flags": q.flags,
                "flag_names": irq_flag_words(q.flags),
            })
        })
        .collect();
    let migration = match mig.flags {
        Some(f) => json!({
            "supported": true,
            "flags": f,
            "stop_copy": f & VFIO_MIGRATION_STOP_COPY != 0,
            "pre_copy": f & VFIO_MIGRATION_PRE_COPY != 0,
            "p2p": f & VFIO_MIGRATION_P2P != 0,
            "state": mig.state.map(state_name),
            "pgsize": caps.migration_pgsize,
        }),
        None => json!({"supported": false, "error": mig.refusal}),
    };
    json!({
        "socket": sock,
        "version": {"major": maj, "minor": min},
        "server": {
            "max_data_xfer_size": caps.max_data_xfer_size,
            "max_msg_fds": caps.max_msg_fds,
            "max_dma_maps": caps.max_dma_maps,
            "pgsizes": caps.pgsizes,
            "migration_pgsize": caps.migration_pgsize,
            "write_multiple": caps.write_multiple,
            "twin_socket": caps.twin_socket_fd_index.is_some(),
        },
        "device": {
            "flags": dev.flags,
            "reset": dev.flags & DEVICE_FLAGS_RESET != 0,
            "pci": dev.flags & DEVICE_FLAGS_PCI != 0,
            "num_regions": dev.num_regions,
            "num_irqs": dev.num_irqs,
        },
        "regions": regions,
        "irqs": irqs,
        "migration": migration,
        "pci": pci.map(Pci::to_json),
        "pci_error": pci_error,
    })
}
