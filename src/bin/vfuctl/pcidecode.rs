//! Decoding of a PCI configuration space image, in the spirit of
//! `lspci -vvv`: the type 0 header, BARs, the standard capability chain
//! from 0x34 and the extended chain from 0x100.
//!
//! The image comes from a server, so every read is bounds-checked and both
//! chain walks are bounded and loop-proof; anything odd becomes a warning.

#[path = "pcidecode/show.rs"]
mod show;

/// Size of the type 0 header.
const HEADER_SIZE: usize = 0x40;
/// Start of extended config space.
const EXT_START: usize = 0x100;
/// Most standard capabilities walked (as lspci: 256 bytes hold at most 48).
const MAX_STD_CAPS: usize = 48;

/// One BAR as config space and the region info describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bar {
    /// BAR number (0..=5).
    pub index: usize,
    /// I/O space rather than memory.
    pub io: bool,
    /// A 64-bit memory BAR (spans this and the next register).
    pub is64: bool,
    /// Prefetchable memory.
    pub prefetchable: bool,
    /// The address programmed in the register(s).
    pub address: u64,
    /// The region's size from DEVICE_GET_REGION_INFO (0 if unknown).
    pub size: u64,
}

/// The expansion ROM BAR.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rom {
    /// The address bits of the ROM BAR.
    pub address: u32,
    /// The enable bit.
    pub enabled: bool,
    /// The ROM region's size.
    pub size: u64,
}

/// What a decoded capability says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Body {
    /// Power Management.
    Pm { pmc: u16, pmcs: u16 },
    /// MSI.
    Msi {
        control: u16,
        address: u64,
        data: u16,
        mask: Option<u32>,
    },
    /// MSI-X.
    Msix { control: u16, table: u32, pba: u32 },
    /// PCI Express.
    Express {
        flags: u16,
        devcap: u32,
        devctl: u16,
        devsta: u16,
        lnkcap: u32,
        lnksta: u16,
    },
    /// Vendor-specific (standard): its length byte.
    Vendor { len: u8 },
    /// Device Serial Number.
    Dsn { serial: u64 },
    /// Vendor-specific (extended): VSEC ID, revision and length.
    ExtVendor { vsec_id: u16, rev: u8, len: u16 },
    /// A capability this decoder only names.
    Other,
    /// The capability runs past the end of config space.
    Truncated,
}

/// One capability of either chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cap {
    /// Offset in config space.
    pub offset: usize,
    /// Capability ID.
    pub id: u16,
    /// Capability version (extended capabilities only).
    pub version: u8,
    /// The decoded contents.
    pub body: Body,
}

/// The decoded configuration space.
#[derive(Clone, Debug)]
pub struct Pci {
    pub size: usize,
    pub vendor: u16,
    pub device: u16,
    pub command: u16,
    pub status: u16,
    pub revision: u8,
    pub prog_if: u8,
    pub subclass: u8,
    pub class: u8,
    pub cache_line: u8,
    pub latency: u8,
    pub header_type: u8,
    pub bist: u8,
    pub subsys_vendor: u16,
    pub subsys: u16,
    pub cap_ptr: u8,
    pub int_line: u8,
    pub int_pin: u8,
    pub bars: Vec<Bar>,
    pub rom: Option<Rom>,
    pub caps: Vec<Cap>,
    pub ext_caps: Vec<Cap>,
    /// Oddities met while decoding (bad pointers, loops).
    pub warnings: Vec<String>,
}

fn r8(b: &[u8], o: usize) -> Option<u8> {
    b.get(o).copied()
}

fn r16(b: &[u8], o: usize) -> Option<u16> {
    let s = b.get(o..o.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn r32(b: &[u8], o: usize) -> Option<u32> {
    let s = b.get(o..o.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// Decodes `cfg`; `sizes[i]` is the size of region `i` (BAR0..BAR5, ROM)
/// as the server reported it, 0 when absent. `None` when `cfg` is shorter
/// than the standard header.
pub fn decode(cfg: &[u8], sizes: &[u64; 7]) -> Option<Pci> {
    if cfg.len() < HEADER_SIZE {
        return None;
    }
    // The header is there, so these reads cannot fail.
    let h8 = |o| r8(cfg, o).unwrap_or(0);
    let h16 = |o| r16(cfg, o).unwrap_or(0);
    let h32 = |o| r32(cfg, o).unwrap_or(0);
    let mut pci = Pci {
        size: cfg.len(),
        vendor: h16(0x00),
        device: h16(0x02),
        command: h16(0x04),
        status: h16(0x06),
        revision: h8(0x08),
        prog_if: h8(0x09),
        subclass: h8(0x0a),
        class: h8(0x0b),
        cache_line: h8(0x0c),
        latency: h8(0x0d),
        header_type: h8(0x0e),
        bist: h8(0x0f),
        subsys_vendor: h16(0x2c),
        subsys: h16(0x2e),
        cap_ptr: h8(0x34),
        int_line: h8(0x3c),
        int_pin: h8(0x3d),
        bars: Vec::new(),
        rom: None,
        caps: Vec::new(),
        ext_caps: Vec::new(),
        warnings: Vec::new(),
    };
    if pci.header_type & 0x7f != 0 {
        pci.warnings.push(format!(
            "header type {:#04x} is not a normal (type 0) header; BARs decoded as type 0",
            pci.header_type & 0x7f
        ));
    }

    let mut i = 0;
    while i < 6 {
        let raw = h32(0x10 + 4 * i);
        let size = sizes[i];
        // Not implemented: nothing there, or (upstream's realize rule, which
        // this library follows) only the I/O-space bit of a BAR without a
        // memory region.
        if size == 0 && raw & !1 == 0 {
            i += 1;
            continue;
        }
        let io = raw & 1 != 0;
        let is64 = !io && (raw >> 1) & 3 == 2;
        let mut address = if io {
            u64::from(raw & !3)
        } else {
            u64::from(raw & !0xf)
        };
        if is64 {
            if i == 5 {
                pci.warnings
                    .push("BAR5 claims to be 64-bit but has no upper half".into());
            } else {
                address |= u64::from(h32(0x14 + 4 * i)) << 32;
            }
        }
        pci.bars.push(Bar {
            index: i,
            io,
            is64,
            prefetchable: !io && raw & 8 != 0,
            address,
            size,
        });
        i += if is64 { 2 } else { 1 };
    }
    let rom_raw = h32(0x30);
    if sizes[6] != 0 || rom_raw != 0 {
        pci.rom = Some(Rom {
            address: rom_raw & 0xffff_f800,
            enabled: rom_raw & 1 != 0,
            size: sizes[6],
        });
    }

    if pci.status & 0x10 != 0 {
        walk_std(cfg, &mut pci);
    } else if pci.cap_ptr != 0 {
        pci.warnings.push(format!(
            "capability pointer {:#04x} set but the status register has no capability list",
            pci.cap_ptr
        ));
    }
    if cfg.len() > EXT_START {
        walk_ext(cfg, &mut pci);
    }
    Some(pci)
}

fn walk_std(cfg: &[u8], pci: &mut Pci) {
    let limit = cfg.len().min(EXT_START);
    let mut seen = [false; EXT_START];
    let mut ptr = usize::from(pci.cap_ptr & !3);
    while ptr != 0 {
        if pci.caps.len() >= MAX_STD_CAPS {
            pci.warnings
                .push("more than 48 capabilities; stopped walking".into());
            return;
        }
        if ptr < HEADER_SIZE || ptr + 2 > limit {
            pci.warnings
                .push(format!("capability pointer {ptr:#04x} is out of range"));
            return;
        }
        if seen[ptr] {
            pci.warnings
                .push(format!("capability chain loops back to {ptr:#04x}"));
            return;
        }
        seen[ptr] = true;
        let id = cfg[ptr];
        let next = usize::from(cfg[ptr + 1] & !3);
        pci.caps.push(Cap {
            offset: ptr,
            id: u16::from(id),
            version: 0,
            body: std_body(cfg, ptr, id).unwrap_or(Body::Truncated),
        });
        ptr = next;
    }
}

fn std_body(cfg: &[u8], p: usize, id: u8) -> Option<Body> {
    Some(match id {
        0x01 => Body::Pm {
            pmc: r16(cfg, p + 2)?,
            pmcs: r16(cfg, p + 4)?,
        },
        0x05 => {
            let control = r16(cfg, p + 2)?;
            let is64 = control & 0x80 != 0;
            let maskable = control & 0x100 != 0;
            let lo = u64::from(r32(cfg, p + 4)?);
            let (address, data_off) = if is64 {
                (lo | (u64::from(r32(cfg, p + 8)?) << 32), p + 12)
            } else {
                (lo, p + 8)
            };
            let data = r16(cfg, data_off)?;
            let mask = if maskable {
                Some(r32(cfg, data_off + 4)?)
            } else {
                None
            };
            Body::Msi {
                control,
                address,
                data,
                mask,
            }
        }
        0x10 => Body::Express {
            flags: r16(cfg, p + 2)?,
            devcap: r32(cfg, p + 4)?,
            devctl: r16(cfg, p + 8)?,
            devsta: r16(cfg, p + 0x0a)?,
            lnkcap: r32(cfg, p + 0x0c)?,
            lnksta: r16(cfg, p + 0x12)?,
        },
        0x11 => Body::Msix {
            control: r16(cfg, p + 2)?,
            table: r32(cfg, p + 4)?,
            pba: r32(cfg, p + 8)?,
        },
        0x09 => Body::Vendor {
            len: r8(cfg, p + 2)?,
        },
        _ => Body::Other,
    })
}

fn walk_ext(cfg: &[u8], pci: &mut Pci) {
    let max = (cfg.len() - EXT_START) / 4;
    let mut seen = vec![false; cfg.len()];
    let mut off = EXT_START;
    loop {
        if pci.ext_caps.len() >= max {
            pci.warnings
                .push("too many extended capabilities; stopped walking".into());
            return;
        }
        let Some(hdr) = r32(cfg, off) else {
            pci.warnings
                .push(format!("extended capability at {off:#x} is out of range"));
            return;
        };
        // An empty or all-ones first header means there are none.
        if off == EXT_START && (hdr == 0 || hdr == u32::MAX) {
            return;
        }
        seen[off] = true;
        let id = (hdr & 0xffff) as u16;
        let body = match id {
            0x03 => match (r32(cfg, off + 4), r32(cfg, off + 8)) {
                (Some(lo), Some(hi)) => Body::Dsn {
                    serial: (u64::from(hi) << 32) | u64::from(lo),
                },
                _ => Body::Truncated,
            },
            0x0b => match r32(cfg, off + 4) {
                Some(v) => Body::ExtVendor {
                    vsec_id: (v & 0xffff) as u16,
                    rev: ((v >> 16) & 0xf) as u8,
                    len: (v >> 20) as u16,
                },
                None => Body::Truncated,
            },
            _ => Body::Other,
        };
        pci.ext_caps.push(Cap {
            offset: off,
            id,
            version: ((hdr >> 16) & 0xf) as u8,
            body,
        });
        let next = (hdr >> 20) as usize & 0xffc;
        if next == 0 {
            return;
        }
        if next < EXT_START || next + 4 > cfg.len() {
            pci.warnings.push(format!(
                "extended capability pointer {next:#x} is out of range"
            ));
            return;
        }
        if seen[next] {
            pci.warnings
                .push(format!("extended capability chain loops back to {next:#x}"));
            return;
        }
        off = next;
    }
}

// ---- names -------------------------------------------------------------

/// The name of a standard capability ID.
pub fn std_cap_name(id: u16) -> &'static str {
    match id {
        0x01 => "Power Management",
        0x02 => "AGP",
        0x03 => "Vital Product Data",
        0x04 => "Slot Identification",
        0x05 => "MSI",
        0x06 => "CompactPCI hot-swap",
        0x07 => "PCI-X",
        0x08 => "HyperTransport",
        0x09 => "Vendor Specific Information",
        0x0a => "Debug port",
        0x0b => "CompactPCI central resource control",
        0x0c => "PCI Hot-plug",
        0x0d => "Subsystem",
        0x0e => "AGP3",
        0x0f => "Secure device",
        0x10 => "Express",
        0x11 => "MSI-X",
        0x12 => "SATA HBA",
        0x13 => "PCI Advanced Features",
        0x14 => "Enhanced Allocation",
        0x15 => "Flattening Portal Bridge",
        _ => "Unknown",
    }
}

/// The name of an extended capability ID.
pub fn ext_cap_name(id: u16) -> &'static str {
    match id {
        0x01 => "Advanced Error Reporting",
        0x02 | 0x09 => "Virtual Channel",
        0x03 => "Device Serial Number",
        0x04 => "Power Budgeting",
        0x05 => "Root Complex Link",
        0x06 => "Root Complex Internal Link",
        0x07 => "Root Complex Event Collector",
        0x08 => "Multi-Function Virtual Channel",
        0x0a => "Root Complex Register Block",
        0x0b => "Vendor Specific Information",
        0x0d => "Access Control Services",
        0x0e => "Alternative Routing-ID Interpretation",
        0x0f => "Address Translation Service",
        0x10 => "Single Root I/O Virtualization",
        0x11 => "Multi-Root I/O Virtualization",
        0x12 => "Multicast",
        0x13 => "Page Request Interface",
        0x15 => "Resizable BAR",
        0x16 => "Dynamic Power Allocation",
        0x17 => "TPH Requester",
        0x18 => "Latency Tolerance Reporting",
        0x19 => "Secondary PCI Express",
        0x1b => "Process Address Space ID",
        0x1d => "Downstream Port Containment",
        0x1e => "L1 PM Substates",
        0x1f => "Precision Time Measurement",
        0x23 => "Designated Vendor-Specific",
        0x25 => "Data Link Feature",
        0x26 => "Physical Layer 16.0 GT/s",
        _ => "Unknown",
    }
}

/// The name of a class (`class`, `subclass`), as precise as known.
pub fn class_name(class: u8, subclass: u8) -> String {
    let sub = match (class, subclass) {
        (0x01, 0x00) => Some("SCSI storage controller"),
        (0x01, 0x01) => Some("IDE interface"),
        (0x01, 0x04) => Some("RAID bus controller"),
        (0x01, 0x06) => Some("SATA controller"),
        (0x01, 0x07) => Some("Serial Attached SCSI controller"),
        (0x01, 0x08) => Some("Non-Volatile memory controller"),
        (0x02, 0x00) => Some("Ethernet controller"),
        (0x03, 0x00) => Some("VGA compatible controller"),
        (0x03, 0x02) => Some("3D controller"),
        (0x04, 0x01) => Some("Multimedia audio controller"),
        (0x04, 0x03) => Some("Audio device"),
        (0x06, 0x00) => Some("Host bridge"),
        (0x06, 0x04) => Some("PCI bridge"),
        (0x08, 0x80) => Some("System peripheral"),
        (0x0c, 0x03) => Some("USB controller"),
        (0x0c, 0x05) => Some("SMBus"),
        _ => None,
    };
    if let Some(s) = sub {
        return s.into();
    }
    let base = match class {
        0x00 => "Unclassified device",
        0x01 => "Mass storage controller",
        0x02 => "Network controller",
        0x03 => "Display controller",
        0x04 => "Multimedia controller",
        0x05 => "Memory controller",
        0x06 => "Bridge",
        0x07 => "Communication controller",
        0x08 => "Generic system peripheral",
        0x09 => "Input device controller",
        0x0a => "Docking station",
        0x0b => "Processor",
        0x0c => "Serial bus controller",
        0x0d => "Wireless controller",
        0x0e => "Intelligent controller",
        0x0f => "Satellite communications controller",
        0x10 => "Encryption controller",
        0x11 => "Signal processing controller",
        0x12 => "Processing accelerators",
        0x13 => "Non-Essential Instrumentation",
        0x40 => "Coprocessor",
        0xff => "Unassigned class",
        _ => "Unknown class",
    };
    base.into()
}

/// The device/port type of a PCI Express capability.
pub fn express_type_name(t: u8) -> String {
    match t {
        0 => "Endpoint".into(),
        1 => "Legacy Endpoint".into(),
        4 => "Root Port".into(),
        5 => "Upstream Port".into(),
        6 => "Downstream Port".into(),
        7 => "PCI-Express to PCI/PCI-X Bridge".into(),
        8 => "PCI/PCI-X to PCI-Express Bridge".into(),
        9 => "Root Complex Integrated Endpoint".into(),
        10 => "Root Complex Event Collector".into(),
        t => format!("Unknown type {t}"),
    }
}

fn link_speed(s: u32) -> String {
    match s {
        1 => "2.5GT/s".into(),
        2 => "5GT/s".into(),
        3 => "8GT/s".into(),
        4 => "16GT/s".into(),
        5 => "32GT/s".into(),
        6 => "64GT/s".into(),
        0 => "unknown".into(),
        s => format!("unknown ({s})"),
    }
}

/// `Name+` / `Name-` for a bit.
fn pm(name: &str, on: bool) -> String {
    format!("{name}{}", if on { '+' } else { '-' })
}

/// [`pm`] for each `(name, mask)` of register value `v`, space-separated.
fn bit_flags(v: u16, bits: &[(&str, u16)]) -> String {
    let each: Vec<String> = bits.iter().map(|&(n, m)| pm(n, v & m != 0)).collect();
    each.join(" ")
}

fn pin_name(pin: u8) -> String {
    match pin {
        0 => "none".into(),
        1..=4 => format!("{}", (b'A' + pin - 1) as char),
        p => format!("invalid ({p})"),
    }
}

/// The serial number the way lspci prints it: bytes from most to least
/// significant, dash-separated.
pub fn format_serial(serial: u64) -> String {
    serial
        .to_be_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join("-")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w16(b: &mut [u8], o: usize, v: u16) {
        b[o..o + 2].copy_from_slice(&v.to_le_bytes());
    }

    fn w32(b: &mut [u8], o: usize, v: u32) {
        b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// An Express endpoint with PM, MSI, MSI-X, Express and vendor caps, a
    /// DSN and an extended vendor cap, a 32-bit BAR0 and a 64-bit
    /// prefetchable BAR2.
    fn sample() -> Vec<u8> {
        let mut c = vec![0u8; 4096];
        w16(&mut c, 0, 0x4e58);
        w16(&mut c, 2, 0x0001);
        w16(&mut c, 6, 0x0010);
        c[0x08] = 3;
        c[0x0b] = 0x02;
        w32(&mut c, 0x18, 0xc);
        w32(&mut c, 0x1c, 0x1);
        w16(&mut c, 0x2c, 0x1af4);
        w16(&mut c, 0x2e, 0x1100);
        c[0x34] = 0x40;
        c[0x3d] = 1;
        // PM at 0x40 -> MSI at 0x48.
        c[0x40] = 0x01;
        c[0x41] = 0x48;
        w16(&mut c, 0x42, 0x0003);
        // MSI (64-bit, maskable, 4 vectors capable) -> MSI-X at 0x60.
        c[0x48] = 0x05;
        c[0x49] = 0x60;
        w16(&mut c, 0x4a, 0x0184);
        w32(&mut c, 0x4c, 0xfee0_0000);
        w16(&mut c, 0x54, 0x4321);
        // MSI-X, 4 vectors, table in BAR0 at 0x800, PBA BAR0 0xc00.
        c[0x60] = 0x11;
        c[0x61] = 0x70;
        w16(&mut c, 0x62, 3);
        w32(&mut c, 0x64, 0x800);
        w32(&mut c, 0x68, 0xc00);
        // Express v2 endpoint with FLR -> vendor cap at 0xb0.
        c[0x70] = 0x10;
        c[0x71] = 0xb0;
        w16(&mut c, 0x72, 0x0002);
        w32(&mut c, 0x74, 1 << 28);
        c[0xb0] = 0x09;
        c[0xb1] = 0;
        c[0xb2] = 8;
        // DSN at 0x100 -> ext vendor at 0x10c.
        w32(&mut c, 0x100, 0x0003 | (1 << 16) | (0x10c << 20));
        w32(&mut c, 0x104, 0x0506_0708);
        w32(&mut c, 0x108, 0x0102_0304);
        w32(&mut c, 0x10c, 0x000b | (1 << 16));
        w32(&mut c, 0x110, 0x1234 | (2 << 16) | (0x18 << 20));
        c
    }

    #[test]
    fn decodes_header_bars_and_both_chains() {
        let sizes = [0x1000, 0, 0x4000, 0, 0, 0, 0];
        let p = decode(&sample(), &sizes).unwrap();
        assert_eq!((p.vendor, p.device), (0x4e58, 0x0001));
        assert_eq!((p.subsys_vendor, p.subsys), (0x1af4, 0x1100));
        assert_eq!(p.class_code(), 0x020000);
        assert_eq!(p.int_pin, 1);
        assert_eq!(p.bars.len(), 2);
        assert_eq!(
            p.bars[1],
            Bar {
                index: 2,
                io: false,
                is64: true,
                prefetchable: true,
                address: 1 << 32,
                size: 0x4000
            }
        );
        assert!(!p.bars[0].is64 && p.bars[0].size == 0x1000);
        let ids: Vec<u16> = p.caps.iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![0x01, 0x05, 0x11, 0x10, 0x09]);
        assert_eq!(
            p.caps[1].body,
            Body::Msi {
                control: 0x0184,
                address: 0xfee0_0000,
                data: 0x4321,
                mask: Some(0)
            }
        );
        assert_eq!(p.ext_caps.len(), 2);
        assert_eq!(
            p.ext_caps[0].body,
            Body::Dsn {
                serial: 0x0102_0304_0506_0708
            }
        );
        assert_eq!(
            p.ext_caps[1].body,
            Body::ExtVendor {
                vsec_id: 0x1234,
                rev: 2,
                len: 0x18
            }
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);

        let text = p.render_text("");
        assert!(text.contains("Ethernet controller [0200]: Vendor 4e58 Device 0001"));
        assert!(text.contains("Region 2: Memory at 100000000 (64-bit, prefetchable) [size=16K]"));
        assert!(text.contains("MSI-X: Enable- Count=4 Masked-"));
        assert!(text.contains("Vector table: BAR=0 offset=00000800"));
        assert!(text.contains("Express (v2) Endpoint"));
        assert!(text.contains("FLReset+"));
        assert!(text.contains("Device Serial Number 01-02-03-04-05-06-07-08"));
        assert!(text.contains("Count=1/4 Maskable+ 64bit+"));

        let j = p.to_json();
        assert_eq!(j["vendor_id"], 0x4e58);
        assert_eq!(j["capabilities"][2]["table_size"], 4);
        assert_eq!(j["capabilities"][2]["pba_offset"], 0xc00);
        assert_eq!(j["capabilities"][3]["device_type_name"], "Endpoint");
        assert_eq!(
            j["extended_capabilities"][0]["serial"],
            0x0102_0304_0506_0708u64
        );
        assert_eq!(j["bars"][1]["bits"], 64);
    }

    #[test]
    fn flag_lines_render_every_bit() {
        // Command, status, DevCtl and DevSta with bits both set and clear.
        let mut c = sample();
        w16(&mut c, 4, 0x0546);
        w16(&mut c, 6, 0x0010 | 0x4a28);
        w16(&mut c, 0x78, 0x2 | 0x8 | (1 << 5) | (2 << 12));
        w16(&mut c, 0x7a, 0x21);
        let text = decode(&c, &[0; 7]).unwrap().render_text("");
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| {
                ["Control:", "Status:", "DevCtl:", "DevSta:"]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .collect();
        assert_eq!(
            lines,
            [
                "Control: I/O- Mem+ BusMaster+ SpecCycle- MemWINV- VGASnoop- ParErr+ \
                 Stepping- SERR+ FastB2B- DisINTx+",
                "Status: Cap+ 66MHz+ UDF- FastB2B- ParErr- DEVSEL=medium >TAbort+ <TAbort- \
                 <MAbort- >SERR+ <PERR- INTx+",
                "Status: D0 NoSoftRst- PME-Enable- DSel=0 DScale=0 PME-",
                "DevCtl: CorrErr- NonFatalErr+ FatalErr- UnsupReq+ MaxPayload 256 bytes, \
                 MaxReadReq 512 bytes",
                "DevSta: CorrErr+ NonFatalErr- FatalErr- UnsupReq- AuxPwr- TransPend+",
            ]
        );
    }

    #[test]
    fn hostile_chains_terminate_with_warnings() {
        let sizes = [0; 7];
        // A standard chain looping onto itself.
        let mut c = sample();
        c[0xb1] = 0x40;
        let p = decode(&c, &sizes).unwrap();
        assert_eq!(p.caps.len(), 5);
        assert!(p.warnings.iter().any(|w| w.contains("loops")));
        // A pointer into the header.
        let mut c = sample();
        c[0x34] = 0x10;
        let p = decode(&c, &sizes).unwrap();
        assert!(p.caps.is_empty());
        assert!(p.warnings.iter().any(|w| w.contains("out of range")));
        // An extended chain looping back to its start.
        let mut c = sample();
        w32(&mut c, 0x10c, 0x000b | (1 << 16) | (0x100 << 20));
        let p = decode(&c, &sizes).unwrap();
        assert_eq!(p.ext_caps.len(), 2);
        assert!(p.warnings.iter().any(|w| w.contains("loops")));
        // A cap at the very end of 256-byte space is truncated, not read past.
        let mut c = sample();
        c.truncate(256);
        c[0xb1] = 0xfc;
        c[0xfc] = 0x10;
        c[0xfd] = 0;
        let p = decode(&c, &sizes).unwrap();
        assert_eq!(p.caps.last().unwrap().body, Body::Truncated);
        assert!(p.ext_caps.is_empty());
        // Too short for a header.
        assert!(decode(&[0u8; 63], &sizes).is_none());
        // No capability list bit: the chain is not walked.
        let mut c = sample();
        w16(&mut c, 6, 0);
        let p = decode(&c, &sizes).unwrap();
        assert!(p.caps.is_empty());
        assert_eq!(p.warnings.len(), 1);
    }
}
