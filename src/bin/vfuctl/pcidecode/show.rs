//! Rendering a decoded config space: the `lspci -vvv`-like text and the
//! JSON of `vfuctl info --json`.

use serde_json::{json, Map, Value};

use super::super::cli::human_size;
use super::*;

// ---- text ----------------------------------------------------------------

/// The command register's bits, in the order lspci shows them.
const COMMAND_BITS: &[(&str, u16)] = &[
    ("I/O", 0x1),
    ("Mem", 0x2),
    ("BusMaster", 0x4),
    ("SpecCycle", 0x8),
    ("MemWINV", 0x10),
    ("VGASnoop", 0x20),
    ("ParErr", 0x40),
    ("Stepping", 0x80),
    ("SERR", 0x100),
    ("FastB2B", 0x200),
    ("DisINTx", 0x400),
];

/// The status register's bits shown before DEVSEL, then after it.
const STATUS_BITS_LOW: &[(&str, u16)] = &[
    ("Cap", 0x10),
    ("66MHz", 0x20),
    ("UDF", 0x40),
    ("FastB2B", 0x80),
    ("ParErr", 0x100),
];
const STATUS_BITS_HIGH: &[(&str, u16)] = &[
    (">TAbort", 0x800),
    ("<TAbort", 0x1000),
    ("<MAbort", 0x2000),
    (">SERR", 0x4000),
    ("<PERR", 0x8000),
    ("INTx", 0x8),
];

/// The error bits DevCtl (reporting enables) and DevSta (detected) share.
const EXPRESS_ERR_BITS: &[(&str, u16)] = &[
    ("CorrErr", 1),
    ("NonFatalErr", 2),
    ("FatalErr", 4),
    ("UnsupReq", 8),
];

impl Pci {
    /// The 24-bit class code.
    pub fn class_code(&self) -> u32 {
        (u32::from(self.class) << 16) | (u32::from(self.subclass) << 8) | u32::from(self.prog_if)
    }

    /// lspci-like text, each line indented by `ind`.
    pub fn render_text(&self, ind: &str) -> String {
        let mut out = Vec::new();
        let mut line = |s: String| out.push(format!("{ind}{s}"));
        line(format!(
            "{} [{:02x}{:02x}]: Vendor {:04x} Device {:04x} (rev {:02x})",
            class_name(self.class, self.subclass),
            self.class,
            self.subclass,
            self.vendor,
            self.device,
            self.revision
        ));
        line(format!(
            "Subsystem: Vendor {:04x} Device {:04x}",
            self.subsys_vendor, self.subsys
        ));
        line(format!(
            "Class code: {:06x} (prog-if {:02x})",
            self.class_code(),
            self.prog_if
        ));
        line(format!(
            "Control: {}",
            bit_flags(self.command, COMMAND_BITS)
        ));
        let s = self.status;
        let devsel = match (s >> 9) & 3 {
            0 => "fast",
            1 => "medium",
            2 => "slow",
            _ => "??",
        };
        line(format!(
            "Status: {} DEVSEL={devsel} {}",
            bit_flags(s, STATUS_BITS_LOW),
            bit_flags(s, STATUS_BITS_HIGH)
        ));
        line(format!(
            "Header type {:02x} ({}{}), cache line {} bytes, latency {}, BIST {:02x}",
            self.header_type & 0x7f,
            if self.header_type & 0x7f == 0 {
                "normal"
            } else {
                "other"
            },
            if self.header_type & 0x80 != 0 {
                ", multi-function"
            } else {
                ""
            },
            u32::from(self.cache_line) * 4,
            self.latency,
            self.bist
        ));
        line(format!(
            "Interrupt: pin {}, line {}",
            pin_name(self.int_pin),
            self.int_line
        ));
        for b in &self.bars {
            let size = if b.size == 0 {
                "size unknown".to_string()
            } else {
                format!("size={}", human_size(b.size))
            };
            if b.io {
                line(format!(
                    "Region {}: I/O ports at {:x} [{size}]",
                    b.index, b.address
                ));
            } else {
                line(format!(
                    "Region {}: Memory at {:x} ({}-bit, {}) [{size}]",
                    b.index,
                    b.address,
                    if b.is64 { 64 } else { 32 },
                    if b.prefetchable {
                        "prefetchable"
                    } else {
                        "non-prefetchable"
                    }
                ));
            }
        }
        if let Some(r) = &self.rom {
            line(format!(
                "Expansion ROM at {:x} [{}] [size={}]",
                r.address,
                if r.enabled { "enabled" } else { "disabled" },
                human_size(r.size)
            ));
        }
        if self.caps.is_empty() {
            line("Capabilities: none".into());
        }
        for cap in &self.caps {
            for (i, l) in std_cap_text(cap).into_iter().enumerate() {
                if i == 0 {
                    line(format!("Capabilities: [{:02x}] {l}", cap.offset));
                } else {
                    line(format!("        {l}"));
                }
            }
        }
        for cap in &self.ext_caps {
            for (i, l) in ext_cap_text(cap).into_iter().enumerate() {
                if i == 0 {
                    line(format!(
                        "Capabilities: [{:03x} v{}] {l}",
                        cap.offset, cap.version
                    ));
                } else {
                    line(format!("        {l}"));
                }
            }
        }
        for w in &self.warnings {
            line(format!("Warning: {w}"));
        }
        out.join("\n")
    }
}

fn std_cap_text(cap: &Cap) -> Vec<String> {
    let name = std_cap_name(cap.id);
    match &cap.body {
        Body::Pm { pmc, pmcs } => {
            let aux = [0, 55, 100, 160, 220, 270, 320, 375][usize::from((pmc >> 6) & 7)];
            vec![
                format!("Power Management version {}", pmc & 7),
                format!(
                    "Flags: {} {} {} {} AuxCurrent={aux}mA PME(D0{},D1{},D2{},D3hot{},D3cold{})",
                    pm("PMEClk", pmc & 0x8 != 0),
                    pm("DSI", pmc & 0x20 != 0),
                    pm("D1", pmc & 0x200 != 0),
                    pm("D2", pmc & 0x400 != 0),
                    sign(pmc & 0x0800 != 0),
                    sign(pmc & 0x1000 != 0),
                    sign(pmc & 0x2000 != 0),
                    sign(pmc & 0x4000 != 0),
                    sign(pmc & 0x8000 != 0)
                ),
                format!(
                    "Status: D{} {} {} DSel={} DScale={} {}",
                    pmcs & 3,
                    pm("NoSoftRst", pmcs & 0x8 != 0),
                    pm("PME-Enable", pmcs & 0x100 != 0),
                    (pmcs >> 9) & 0xf,
                    (pmcs >> 13) & 3,
                    pm("PME", pmcs & 0x8000 != 0)
                ),
            ]
        }
        Body::Msi {
            control,
            address,
            data,
            mask,
        } => {
            let mut v = vec![
                format!(
                    "MSI: {} Count={}/{} {} {}",
                    pm("Enable", control & 1 != 0),
                    1u32 << ((control >> 4) & 7),
                    1u32 << ((control >> 1) & 7),
                    pm("Maskable", control & 0x100 != 0),
                    pm("64bit", control & 0x80 != 0)
                ),
                format!("Address: {address:016x}  Data: {data:04x}"),
            ];
            if let Some(m) = mask {
                v.push(format!("Masking: {m:08x}"));
            }
            v
        }
        Body::Msix {
            control,
            table,
            pba,
        } => vec![
            format!(
                "MSI-X: {} Count={} {}",
                pm("Enable", control & 0x8000 != 0),
                (control & 0x7ff) + 1,
                pm("Masked", control & 0x4000 != 0)
            ),
            format!("Vector table: BAR={} offset={:08x}", table & 7, table & !7),
            format!("PBA: BAR={} offset={:08x}", pba & 7, pba & !7),
        ],
        Body::Express {
            flags,
            devcap,
            devctl,
            devsta,
            lnkcap,
            lnksta,
        } => vec![
            format!(
                "Express (v{}) {}, MSI {:02x}",
                flags & 0xf,
                express_type_name(((flags >> 4) & 0xf) as u8),
                (flags >> 9) & 0x1f
            ),
            format!(
                "DevCap: MaxPayload {} bytes, PhantFunc {}, ExtTag{} {}",
                128u32 << (devcap & 7),
                (devcap >> 3) & 3,
                sign(devcap & 0x20 != 0),
                pm("FLReset", devcap & (1 << 28) != 0)
            ),
            format!(
                "DevCtl: {} MaxPayload {} bytes, MaxReadReq {} bytes",
                bit_flags(*devctl, EXPRESS_ERR_BITS),
                128u32 << ((devctl >> 5) & 7),
                128u32 << ((devctl >> 12) & 7)
            ),
            format!(
                "DevSta: {} {}",
                bit_flags(*devsta, EXPRESS_ERR_BITS),
                bit_flags(*devsta, &[("AuxPwr", 0x10), ("TransPend", 0x20)])
            ),
            format!(
                "LnkCap: Port #{}, Speed {}, Width x{}",
                lnkcap >> 24,
                link_speed(lnkcap & 0xf),
                (lnkcap >> 4) & 0x3f
            ),
            format!(
                "LnkSta: Speed {}, Width x{}",
                link_speed(u32::from(lnksta & 0xf)),
                (lnksta >> 4) & 0x3f
            ),
        ],
        Body::Vendor { len } => vec![format!("{name}: Len={len:02x}")],
        Body::Truncated => vec![format!("{name} (ID {:02x}): truncated", cap.id)],
        _ => vec![format!("{name} (ID {:02x})", cap.id)],
    }
}

fn sign(on: bool) -> char {
    if on {
        '+'
    } else {
        '-'
    }
}

fn ext_cap_text(cap: &Cap) -> Vec<String> {
    let name = ext_cap_name(cap.id);
    match &cap.body {
        Body::Dsn { serial } => vec![format!("{name} {}", format_serial(*serial))],
        Body::ExtVendor { vsec_id, rev, len } => {
            vec![format!("{name}: ID={vsec_id:04x} Rev={rev} Len={len:03x}")]
        }
        Body::Truncated => vec![format!("{name} (ID {:04x}): truncated", cap.id)],
        _ => vec![format!("{name} (ID {:04x})", cap.id)],
    }
}

// ---- JSON ------------------------------------------------------------------

fn cap_json(cap: &Cap, extended: bool) -> Value {
    let mut m = Map::new();
    m.insert("offset".into(), json!(cap.offset));
    m.insert("id".into(), json!(cap.id));
    let name = if extended {
        ext_cap_name(cap.id)
    } else {
        std_cap_name(cap.id)
    };
    m.insert("name".into(), json!(name));
    if extended {
        m.insert("version".into(), json!(cap.version));
    }
    match &cap.body {
        Body::Pm { pmc, pmcs } => {
            m.insert("pm_version".into(), json!(pmc & 7));
            m.insert("pmc".into(), json!(pmc));
            m.insert("pmcs".into(), json!(pmcs));
            m.insert("power_state".into(), json!(pmcs & 3));
        }
        Body::Msi {
            control,
            address,
            data,
            mask,
        } => {
            m.insert("enabled".into(), json!(control & 1 != 0));
            m.insert(
                "vectors_capable".into(),
                json!(1u32 << ((control >> 1) & 7)),
            );
            m.insert(
                "vectors_enabled".into(),
                json!(1u32 << ((control >> 4) & 7)),
            );
            m.insert("is_64bit".into(), json!(control & 0x80 != 0));
            m.insert("maskable".into(), json!(control & 0x100 != 0));
            m.insert("address".into(), json!(address));
            m.insert("data".into(), json!(data));
            m.insert("mask".into(), json!(mask));
        }
        Body::Msix {
            control,
            table,
            pba,
        } => {
            m.insert("enabled".into(), json!(control & 0x8000 != 0));
            m.insert("function_masked".into(), json!(control & 0x4000 != 0));
            m.insert("table_size".into(), json!((control & 0x7ff) + 1));
            m.insert("table_bir".into(), json!(table & 7));
            m.insert("table_offset".into(), json!(table & !7));
            m.insert("pba_bir".into(), json!(pba & 7));
            m.insert("pba_offset".into(), json!(pba & !7));
        }
        Body::Express {
            flags,
            devcap,
            devctl,
            devsta,
            lnkcap,
            lnksta,
        } => {
            let t = ((flags >> 4) & 0xf) as u8;
            m.insert("express_version".into(), json!(flags & 0xf));
            m.insert("device_type".into(), json!(t));
            m.insert("device_type_name".into(), json!(express_type_name(t)));
            m.insert("devcap".into(), json!(devcap));
            m.insert("max_payload".into(), json!(128u32 << (devcap & 7)));
            m.insert("flr".into(), json!(devcap & (1 << 28) != 0));
            m.insert("devctl".into(), json!(devctl));
            m.insert("devsta".into(), json!(devsta));
            m.insert("lnkcap".into(), json!(lnkcap));
            m.insert("lnksta".into(), json!(lnksta));
        }
        Body::Vendor { len } => {
            m.insert("length".into(), json!(len));
        }
        Body::Dsn { serial } => {
            m.insert("serial".into(), json!(serial));
            m.insert("serial_text".into(), json!(format_serial(*serial)));
        }
        Body::ExtVendor { vsec_id, rev, len } => {
            m.insert("vsec_id".into(), json!(vsec_id));
            m.insert("vsec_rev".into(), json!(rev));
            m.insert("vsec_length".into(), json!(len));
        }
        Body::Truncated => {
            m.insert("truncated".into(), json!(true));
        }
        Body::Other => {}
    }
    Value::Object(m)
}

impl Pci {
    /// The decoded facts as JSON.
    pub fn to_json(&self) -> Value {
        let bars: Vec<Value> = self
            .bars
            .iter()
            .map(|b| {
                json!({
                    "index": b.index,
                    "kind": if b.io { "io" } else { "memory" },
                    "bits": if b.io { 32 } else if b.is64 { 64 } else { 32 },
                    "prefetchable": b.prefetchable,
                    "address": b.address,
                    "size": b.size,
                })
            })
            .collect();
        let rom = self
            .rom
            .as_ref()
            .map(|r| json!({"address": r.address, "enabled": r.enabled, "size": r.size}));
        json!({
            "config_size": self.size,
            "vendor_id": self.vendor,
            "device_id": self.device,
            "subsystem_vendor_id": self.subsys_vendor,
            "subsystem_id": self.subsys,
            "revision": self.revision,
            "class_code": self.class_code(),
            "class": self.class,
            "subclass": self.subclass,
            "prog_if": self.prog_if,
            "class_name": class_name(self.class, self.subclass),
            "command": self.command,
            "status": self.status,
            "header_type": self.header_type & 0x7f,
            "multifunction": self.header_type & 0x80 != 0,
            "interrupt_pin": self.int_pin,
            "interrupt_line": self.int_line,
            "capabilities_pointer": self.cap_ptr,
            "bars": bars,
            "rom": rom,
            "capabilities": self.caps.iter().map(|c| cap_json(c, false)).collect::<Vec<_>>(),
            "extended_capabilities":
                self.ext_caps.iter().map(|c| cap_json(c, true)).collect::<Vec<_>>(),
            "warnings": self.warnings,
        })
    }
}
