//! migdev: a small stateful PCI device that does DMA and can be
//! live-migrated, the Rust twin of `c-tests/samples/migdev.c`.
//!
//! Same PCI ID (`494f:0dcf`), same BAR0 register map, same device behaviour
//! and the same migration state format as the C sample, so that a Rust
//! migdev and a C migdev can migrate into each other;
//! `c-tests/samples/README.md` describes all of it. In short:
//!
//! - BAR0 holds 32-bit registers: MAGIC, VERSION, COUNTER, CTRL,
//!   SCRATCH\[16\], DMA_ADDR, DMA_LEN, STATE, CHECKSUM.
//! - While CTRL bit 0 is set and the device runs, every 5 ms a tick writes
//!   the next 4 KiB page of the guest buffer (DMA_ADDR, DMA_LEN) with a
//!   pattern derived from COUNTER, and keeps CHECKSUM, the sum of the
//!   buffer's words, up to date from a shadow copy of the buffer.
//! - The registers migrate as CRC-checked records of 116 bytes: one taken
//!   when entering PRE_COPY, a final one when entering STOP_AND_COPY. The
//!   buffer is guest memory and migrates with it; the library's dirty-page
//!   logging sees the device's writes.
//!
//! The context is non-blocking and driven by an event loop
//! ([`Context::wait_ready`], [`Context::run_ready`]); the device touches
//! guest memory only from that loop, never inside a callback, with
//! [`Context::dma_read`] / [`Context::dma_write`], which work whether or not
//! the client let the device map the memory.
//!
//! ```text
//! cargo run --example migdev -- SOCKET [--log LEVEL]
//! ```
//!
//! `LEVEL` is a syslog level name (`emerg alert crit err warning notice
//! info debug`) or number (0-7), `info` by default; messages go to stderr as
//! `migdev[PID] <LEVEL>: text`. The device serves one client and exits with
//! status 0 when it disconnects.

use std::cell::RefCell;
use std::path::Path;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vfio_user::device::dma::MAX_DMA_REGIONS;
use vfio_user::device::{
    log_level, pci, region, MigrState, MigrationDevice, PciType, RegionSetup, ResetType,
};
use vfio_user::{Context, Errno, Result};

// ---- identity and register map ------------------------------------------------

/// PCI vendor ID (and subsystem vendor ID).
pub const VENDOR: u16 = 0x494f;
/// PCI device ID (and subsystem ID).
pub const DEVICE: u16 = 0x0dcf;
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x1000;

/// RO: [`MAGIC`].
pub const REG_MAGIC: u64 = 0x00;
/// RO: [`VERSION`].
pub const REG_VERSION: u64 = 0x04;
/// RO: device ticks so far (pages written).
pub const REG_COUNTER: u64 = 0x08;
/// RW: bit 0 enables the DMA writer.
pub const REG_CTRL: u64 = 0x0c;
/// RW: the first of [`NR_SCRATCH`] storage registers.
pub const REG_SCRATCH: u64 = 0x10;
/// RW: guest address of the buffer, bits 0-31.
pub const REG_DMA_ADDR_LO: u64 = 0x50;
/// RW: guest address of the buffer, bits 32-63.
pub const REG_DMA_ADDR_HI: u64 = 0x54;
/// RW: buffer length, a multiple of [`DMA_PAGE`] up to [`DMA_MAX_LEN`].
pub const REG_DMA_LEN: u64 = 0x58;
/// RO: the migration state the device last moved to (`VFU_MIGR_STATE_*`).
pub const REG_STATE: u64 = 0x5c;
/// RO: sum modulo 2^32 of the buffer's little-endian words.
pub const REG_CHECKSUM: u64 = 0x60;

/// Number of scratch registers.
pub const NR_SCRATCH: usize = 16;
/// Value of the MAGIC register ("MIGD").
pub const MAGIC: u32 = 0x4d49_4744;
/// Value of the VERSION register.
pub const VERSION: u32 = 1;
/// CTRL bit 0: the DMA writer is on.
pub const CTRL_DMA_EN: u32 = 1 << 0;
/// Every valid CTRL bit.
pub const CTRL_MASK: u32 = CTRL_DMA_EN;
/// The device writes the buffer one page of this size per tick.
pub const DMA_PAGE: u32 = 4096;
/// Largest DMA_LEN.
pub const DMA_MAX_LEN: u32 = 16 * 1024 * 1024;
/// Word `i` of the page written at tick `n` is `n * PATTERN_MUL + i`.
pub const PATTERN_MUL: u32 = 2_654_435_761;

/// Ticks are at least this far apart.
const TICK: Duration = Duration::from_millis(5);
/// Most requests handled between two looks at the clock.
const RUN_BATCH: usize = 64;

// ---- migration state format ---------------------------------------------------

/// Record magic (the bytes "MDST").
pub const REC_MAGIC: u32 = 0x5453_444d;
/// Record format version.
pub const REC_VERSION: u16 = 1;
/// Record header length.
pub const REC_HDR_LEN: usize = 20;
/// Payload length of a version 1 record.
pub const REC_PAYLOAD_LEN: usize = 96;
/// Length of a whole record.
pub const REC_LEN: usize = REC_HDR_LEN + REC_PAYLOAD_LEN;
/// Record flag: the STOP_AND_COPY snapshot, the last record of a stream.
pub const REC_FLAG_FINAL: u32 = 1 << 0;
/// Most incoming migration data accepted, far more than any valid stream.
const MIG_IN_MAX: usize = 64 * 1024;

/// The registers that migrate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// COUNTER.
    pub counter: u32,
    /// CTRL.
    pub ctrl: u32,
    /// SCRATCH\[0..16\].
    pub scratch: [u32; NR_SCRATCH],
    /// DMA_ADDR (both halves).
    pub dma_addr: u64,
    /// DMA_LEN.
    pub dma_len: u32,
    /// CHECKSUM.
    pub checksum: u32,
}

fn dma_len_ok(len: u32) -> bool {
    len % DMA_PAGE == 0 && len <= DMA_MAX_LEN
}

/// CRC-32 (IEEE 802.3, reflected, as zlib's `crc32`) continued from `crc`
/// (start with 0).
pub fn crc32_update(crc: u32, data: &[u8]) -> u32 {
    let mut crc = !crc;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & 0u32.wrapping_sub(crc & 1));
        }
    }
    !crc
}

/// Sum of the little-endian u32 words of `b`.
fn sum_words(b: &[u8]) -> u32 {
    b.chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .fold(0, u32::wrapping_add)
}

fn le16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[off..off + 2]);
    u16::from_le_bytes(a)
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

impl Regs {
    /// Encodes the registers as one record with `flags`.
    pub fn encode(&self, flags: u32) -> [u8; REC_LEN] {
        let mut rec = [0u8; REC_LEN];
        rec[0..4].copy_from_slice(&REC_MAGIC.to_le_bytes());
        rec[4..6].copy_from_slice(&REC_VERSION.to_le_bytes());
        rec[6..8].copy_from_slice(&(REC_HDR_LEN as u16).to_le_bytes());
        rec[8..12].copy_from_slice(&flags.to_le_bytes());
        rec[12..16].copy_from_slice(&(REC_PAYLOAD_LEN as u32).to_le_bytes());
        let pl = &mut rec[REC_HDR_LEN..];
        pl[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        pl[4..8].copy_from_slice(&self.counter.to_le_bytes());
        pl[8..12].copy_from_slice(&self.ctrl.to_le_bytes());
        pl[12..16].copy_from_slice(&self.dma_len.to_le_bytes());
        pl[16..24].copy_from_slice(&self.dma_addr.to_le_bytes());
        for (i, v) in self.scratch.iter().enumerate() {
            pl[24 + 4 * i..28 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        pl[88..92].copy_from_slice(&self.checksum.to_le_bytes());
        // Bytes 92..96 are reserved and stay 0.
        let crc = crc32_update(crc32_update(0, &rec[..16]), &rec[REC_HDR_LEN..]);
        rec[16..20].copy_from_slice(&crc.to_le_bytes());
        rec
    }

    /// Checks and decodes the record at the start of `data`: the registers
    /// and the record's flags, or why the record is not acceptable.
    pub fn decode(data: &[u8]) -> std::result::Result<(Regs, u32), String> {
        if data.len() < REC_HDR_LEN {
            return Err("truncated record header".into());
        }
        if le32(data, 0) != REC_MAGIC {
            return Err(format!("bad record magic {:#x}", le32(data, 0)));
        }
        let (version, hdr_len, payload_len) = (le16(data, 4), le16(data, 6), le32(data, 12));
        if version != REC_VERSION
            || usize::from(hdr_len) != REC_HDR_LEN
            || payload_len as usize != REC_PAYLOAD_LEN
        {
            return Err(format!(
                "unsupported record version {version} (header {hdr_len}, payload {payload_len} bytes)"
            ));
        }
        if data.len() < REC_LEN {
            return Err(format!(
                "truncated record ({} of {REC_LEN} bytes)",
                data.len()
            ));
        }
        let pl = &data[REC_HDR_LEN..REC_LEN];
        let crc = crc32_update(crc32_update(0, &data[..16]), pl);
        if crc != le32(data, 16) {
            return Err(format!(
                "CRC mismatch ({crc:#x} computed, {:#x} stored)",
                le32(data, 16)
            ));
        }
        let flags = le32(data, 8);
        if flags & !REC_FLAG_FINAL != 0 {
            return Err(format!("unknown flags {flags:#x}"));
        }
        if le32(pl, 0) != MAGIC {
            return Err("not a migdev state".into());
        }
        let mut r = Regs {
            counter: le32(pl, 4),
            ctrl: le32(pl, 8),
            dma_len: le32(pl, 12),
            dma_addr: le64(pl, 16),
            checksum: le32(pl, 88),
            ..Regs::default()
        };
        for (i, v) in r.scratch.iter_mut().enumerate() {
            *v = le32(pl, 24 + 4 * i);
        }
        if r.ctrl & !CTRL_MASK != 0 || !dma_len_ok(r.dma_len) || le32(pl, 92) != 0 {
            return Err("register values out of range".into());
        }
        Ok((r, flags))
    }
}

/// Validates a whole incoming stream: one or more valid records, the last
/// one (and only it) final. Returns the last record's registers and the
/// number of records.
pub fn decode_stream(data: &[u8]) -> std::result::Result<(Regs, usize), String> {
    if data.is_empty() {
        return Err("nothing was received".into());
    }
    let mut rest = data;
    let mut last = None;
    let mut count = 0;
    while !rest.is_empty() {
        if matches!(last, Some((_, flags)) if flags & REC_FLAG_FINAL != 0) {
            return Err("data after the final record".into());
        }
        last = Some(Regs::decode(rest)?);
        rest = &rest[REC_LEN..];
        count += 1;
    }
    match last {
        Some((regs, flags)) if flags & REC_FLAG_FINAL != 0 => Ok((regs, count)),
        _ => Err("incomplete, no final record".into()),
    }
}

fn state_name(s: MigrState) -> &'static str {
    match s {
        MigrState::Stop => "STOP",
        MigrState::Running => "RUNNING",
        MigrState::StopAndCopy => "STOP_AND_COPY",
        MigrState::PreCopy => "PRE_COPY",
        MigrState::Resume => "RESUME",
    }
}

// ---- the device -------------------------------------------------------------------

/// The device's state, shared by its callbacks and its loop.
#[derive(Debug)]
struct Dev {
    r: Regs,
    /// The state the transition callback last saw.
    state: MigrState,
    /// The buffer as the device believes it is (DMA_LEN bytes).
    shadow: Vec<u8>,
    shadow_valid: bool,
    /// The state was restored and the shadow is not rebuilt yet.
    restored: bool,
    /// Outgoing migration data and the client's read position in it.
    out: Vec<u8>,
    out_pos: usize,
    /// Incoming migration data.
    input: Vec<u8>,
    /// DMA failures are logged once per run of failures.
    dma_failing: bool,
}

impl Dev {
    fn reg_read(&self, off: u64) -> u32 {
        match off {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_COUNTER => self.r.counter,
            REG_CTRL => self.r.ctrl,
            REG_DMA_ADDR_LO => self.r.dma_addr as u32,
            REG_DMA_ADDR_HI => (self.r.dma_addr >> 32) as u32,
            REG_DMA_LEN => self.r.dma_len,
            REG_STATE => u32::from(self.state),
            REG_CHECKSUM => self.r.checksum,
            _ => scratch_index(off).map_or(0, |i| self.r.scratch[i]),
        }
    }

    fn reg_write(&mut self, ctx: &Context, off: u64, v: u32) -> Result<()> {
        match off {
            REG_CTRL => {
                let v = v & CTRL_MASK;
                if v & CTRL_DMA_EN != 0 && self.r.ctrl & CTRL_DMA_EN == 0 {
                    // The guest may have changed the buffer while we were off.
                    self.shadow_valid = false;
                }
                self.r.ctrl = v;
            }
            REG_DMA_ADDR_LO => {
                self.r.dma_addr = (self.r.dma_addr & !0xffff_ffff) | u64::from(v);
                self.shadow_valid = false;
            }
            REG_DMA_ADDR_HI => {
                self.r.dma_addr = (self.r.dma_addr & 0xffff_ffff) | (u64::from(v) << 32);
                self.shadow_valid = false;
            }
            REG_DMA_LEN => {
                if !dma_len_ok(v) {
                    ctx.log(log_level::WARNING, &format!("DMA_LEN {v:#x} refused"));
                    return Err(Errno::EINVAL);
                }
                self.r.dma_len = v;
                self.shadow_valid = false;
            }
            // Read-only and unassigned registers ignore writes.
            _ => {
                if let Some(i) = scratch_index(off) {
                    self.r.scratch[i] = v;
                }
            }
        }
        Ok(())
    }

    fn dma_failed(&mut self, ctx: &Context, what: &str, e: Errno) {
        if !self.dma_failing {
            ctx.log(
                log_level::WARNING,
                &format!(
                    "{what} of buffer {:#x}+{:#x} failed: {e} (retrying every tick)",
                    self.r.dma_addr, self.r.dma_len
                ),
            );
            self.dma_failing = true;
        }
    }

    /// The migration transition callback's work.
    fn transition(&mut self, ctx: &Context, to: MigrState) -> Result<()> {
        let from = self.state;
        ctx.log(
            log_level::INFO,
            &format!("migration state {} -> {}", state_name(from), state_name(to)),
        );
        if from == MigrState::Resume && to != MigrState::Resume {
            match decode_stream(&self.input) {
                Ok((regs, count)) => {
                    self.r = regs;
                    self.shadow_valid = false;
                    self.restored = true;
                    self.dma_failing = false;
                    self.input = Vec::new();
                    ctx.log(
                        log_level::INFO,
                        &format!(
                            "state restored from {count} record(s): counter {}, ctrl {:#x}, \
                             buffer {:#x}+{:#x}, checksum {:#x}",
                            regs.counter, regs.ctrl, regs.dma_addr, regs.dma_len, regs.checksum
                        ),
                    );
                }
                Err(why) => {
                    // Stay in RESUME: the client may send the rest and retry.
                    ctx.log(log_level::ERR, &format!("migration data: {why}"));
                    return Err(Errno::EINVAL);
                }
            }
        }
        match to {
            MigrState::PreCopy => {
                self.out = self.r.encode(0).to_vec();
            }
            MigrState::StopAndCopy => {
                // The stream goes on from pre-copy: what the client has not
                // read of the pre-copy record comes first, so that the
                // destination always gets whole records.
                let mut out = if from == MigrState::PreCopy {
                    self.out.split_off(self.out_pos.min(self.out.len()))
                } else {
                    Vec::new()
                };
                out.extend_from_slice(&self.r.encode(REC_FLAG_FINAL));
                self.out = out;
            }
            MigrState::Resume => {
                self.out.clear();
                self.input.clear();
            }
            MigrState::Stop | MigrState::Running => self.out.clear(),
        }
        self.out_pos = 0;
        self.state = to;
        Ok(())
    }
}

fn scratch_index(off: u64) -> Option<usize> {
    let i = usize::try_from(off.checked_sub(REG_SCRATCH)? / 4).ok()?;
    (i < NR_SCRATCH).then_some(i)
}

/// The migration callbacks, over the shared device state.
struct Migration(Rc<RefCell<Dev>>);

impl MigrationDevice for Migration {
    fn transition(&self, ctx: &Context, state: u32) -> Result<()> {
        let to = MigrState::try_from(state)?;
        self.0.borrow_mut().transition(ctx, to)
    }

    fn read_data(&self, _ctx: &Context, buf: &mut [u8]) -> Result<usize> {
        let mut d = self.0.borrow_mut();
        let rest = d.out.get(d.out_pos..).unwrap_or_default();
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        d.out_pos += n;
        Ok(n)
    }

    fn write_data(&self, ctx: &Context, buf: &[u8]) -> Result<usize> {
        let mut d = self.0.borrow_mut();
        if buf.len() > MIG_IN_MAX - d.input.len() {
            ctx.log(
                log_level::ERR,
                &format!("migration data: more than {MIG_IN_MAX} bytes"),
            );
            return Err(Errno::ENOSPC);
        }
        d.input.extend_from_slice(buf);
        Ok(buf.len())
    }
}

/// A migdev: its context and its state.
pub struct MigDev {
    ctx: Context,
    dev: Rc<RefCell<Dev>>,
}

impl MigDev {
    /// Creates the device on a non-blocking context listening at `path`.
    /// Messages at `level` (a [`log_level`] value) or more severe go to
    /// `log`.
    pub fn create(path: &Path, level: i32, log: impl Fn(i32, &str) + 'static) -> Result<MigDev> {
        let ctx = Context::create(path, true)?;
        ctx.on_log(level, move |_ctx, level, msg| log(level, msg))?;
        let cfg = ctx.pci_init(PciType::Conventional, pci::PCI_HEADER_TYPE_NORMAL, 0)?;
        cfg.set_id(VENDOR, DEVICE, VENDOR, DEVICE);
        cfg.set_class(0xff, 0x00, 0x00);

        let dev = Rc::new(RefCell::new(Dev {
            r: Regs::default(),
            state: MigrState::Running,
            shadow: Vec::new(),
            shadow_valid: false,
            restored: false,
            out: Vec::new(),
            out_pos: 0,
            input: Vec::new(),
            dma_failing: false,
        }));

        // BAR0: whole, aligned 32-bit registers (an 8-byte access covers
        // two); anything else is refused.
        let d = dev.clone();
        let bar0 = RegionSetup::new(BAR0_SIZE, region::FLAG_RW | region::FLAG_MEM).with_callback(
            move |ctx, buf, offset, is_write| {
                let in_bar = offset
                    .checked_add(buf.len() as u64)
                    .is_some_and(|end| end <= BAR0_SIZE);
                if offset % 4 != 0 || buf.len() % 4 != 0 || buf.is_empty() || !in_bar {
                    return Err(Errno::EINVAL);
                }
                let mut d = d.borrow_mut();
                for (off, word) in (offset..).step_by(4).zip(buf.chunks_exact_mut(4)) {
                    if is_write {
                        let v = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                        d.reg_write(ctx, off, v)?;
                    } else {
                        word.copy_from_slice(&d.reg_read(off).to_le_bytes());
                    }
                }
                Ok(buf.len())
            },
        );
        ctx.setup_region(region::BAR0, bar0)?;

        ctx.setup_dma(MAX_DMA_REGIONS, None, None)?;
        ctx.on_dma_register(|ctx, info| {
            let how = if info.vaddr.is_null() {
                " (without direct mapping)"
            } else {
                ""
            };
            ctx.log(
                log_level::DEBUG,
                &format!(
                    "DMA region {:#x}+{:#x} mapped{how}",
                    info.iova_start(),
                    info.iova_len()
                ),
            );
        })?;
        let d = dev.clone();
        ctx.on_dma_unregister(move |ctx, info| {
            let (start, len) = (info.iova_start(), info.iova_len());
            ctx.log(
                log_level::DEBUG,
                &format!("DMA region {start:#x}+{len:#x} unmapped"),
            );
            // Whatever comes back at these addresses may hold other data.
            let mut d = d.borrow_mut();
            let (addr, blen) = (d.r.dma_addr, u64::from(d.r.dma_len));
            if blen != 0 && start < addr.saturating_add(blen) && addr < start.saturating_add(len) {
                d.shadow_valid = false;
            }
        })?;

        let d = dev.clone();
        ctx.on_reset(move |ctx, why| {
            if why == ResetType::LostConn {
                return Ok(());
            }
            ctx.log(log_level::INFO, "device reset");
            let mut d = d.borrow_mut();
            d.r = Regs::default();
            d.shadow_valid = false;
            d.restored = false;
            d.dma_failing = false;
            Ok(())
        });
        // The device only touches guest memory from its own loop, never
        // inside `run`, so it is always quiet when asked.
        ctx.on_quiesce(|_ctx| Ok(()));
        ctx.setup_migration(Rc::new(Migration(dev.clone())))?;
        ctx.realize()?;
        Ok(MigDev { ctx, dev })
    }

    /// The device's context.
    pub fn context(&self) -> &Context {
        &self.ctx
    }

    /// Waits for a client and serves it, running the device's ticks, until
    /// the client disconnects or `stop` is set.
    pub fn serve(&self, stop: &AtomicBool) -> Result<()> {
        let ctx = &self.ctx;
        ctx.log(
            log_level::INFO,
            &format!("waiting for a client on {}", ctx.path().display()),
        );
        loop {
            if stop.load(Ordering::Relaxed) {
                ctx.log(log_level::INFO, "stopping");
                return Ok(());
            }
            if ctx.try_attach()? {
                break;
            }
            ctx.wait_ready(Some(Duration::from_millis(200)))?;
        }
        ctx.log(log_level::INFO, "client attached");
        let mut next_tick = Instant::now() + TICK;
        while !stop.load(Ordering::Relaxed) {
            ctx.wait_ready(Some(next_tick.saturating_duration_since(Instant::now())))?;
            // Run even when the socket looked idle: requests that arrived
            // while the device waited for a DMA reply are held in the
            // context.
            match ctx.run_ready(RUN_BATCH) {
                Ok(_) => {}
                Err(Errno::ENOTCONN) => {
                    ctx.log(log_level::INFO, "client disconnected");
                    return Ok(());
                }
                Err(e) => {
                    ctx.log(log_level::ERR, &format!("run: {e}"));
                    return Err(e);
                }
            }
            if Instant::now() >= next_tick {
                self.tick();
                next_tick = Instant::now() + TICK;
            }
        }
        ctx.log(log_level::INFO, "stopping");
        Ok(())
    }

    /// One device tick: maybe write the next page of the buffer.
    ///
    /// No borrow of the state is held across DMA: when the client serves
    /// DMA through messages and goes away meanwhile, the library runs the
    /// reset and unregister callbacks from inside the transfer.
    fn tick(&self) {
        let ctx = &self.ctx;
        let (addr, len, valid) = {
            let d = self.dev.borrow();
            let on = d.r.ctrl & CTRL_DMA_EN != 0 && d.r.dma_len != 0;
            if !on || !d.state.is_running() {
                return;
            }
            (d.r.dma_addr, d.r.dma_len, d.shadow_valid)
        };
        if !valid && !self.rebuild_shadow(addr, len) {
            return;
        }
        let counter = self.dev.borrow().r.counter;
        let next = counter.wrapping_add(1);
        let idx = next % (len / DMA_PAGE);
        let page: Vec<u8> = (0..DMA_PAGE / 4)
            .flat_map(|i| next.wrapping_mul(PATTERN_MUL).wrapping_add(i).to_le_bytes())
            .collect();
        let r = addr
            .checked_add(u64::from(idx * DMA_PAGE))
            .ok_or(Errno::EFAULT)
            .and_then(|a| ctx.dma_write(a, &page));
        let mut d = self.dev.borrow_mut();
        if let Err(e) = r {
            d.dma_failed(ctx, "write", e);
            return;
        }
        if d.dma_failing {
            ctx.log(log_level::INFO, "DMA works again");
            d.dma_failing = false;
        }
        let start = (idx * DMA_PAGE) as usize;
        let Some(shadow_page) = d.shadow.get_mut(start..start + DMA_PAGE as usize) else {
            return;
        };
        let old_sum = sum_words(shadow_page);
        shadow_page.copy_from_slice(&page);
        d.r.checksum =
            d.r.checksum
                .wrapping_add(sum_words(&page).wrapping_sub(old_sum));
        d.r.counter = next;
    }

    /// Reads the whole buffer into the shadow and recomputes CHECKSUM from
    /// it. Done before the first write after the buffer was (re)programmed,
    /// enabled, unmapped or restored by migration.
    fn rebuild_shadow(&self, addr: u64, len: u32) -> bool {
        let ctx = &self.ctx;
        let mut shadow = vec![0u8; len as usize];
        if let Err(e) = ctx.dma_read(addr, &mut shadow) {
            self.dev.borrow_mut().dma_failed(ctx, "read", e);
            return false;
        }
        let sum = sum_words(&shadow);
        let mut d = self.dev.borrow_mut();
        if d.restored && sum != d.r.checksum {
            ctx.log(
                log_level::WARNING,
                &format!(
                    "guest buffer sums to {sum:#x}, not to the migrated CHECKSUM {:#x}: \
                     was guest memory migrated?",
                    d.r.checksum
                ),
            );
        }
        ctx.log(
            log_level::INFO,
            &format!("shadow of {addr:#x}+{len:#x} rebuilt, checksum {sum:#x}"),
        );
        d.shadow = shadow;
        d.r.checksum = sum;
        d.restored = false;
        d.shadow_valid = true;
        true
    }
}

// ---- main ------------------------------------------------------------------------

fn parse_level(s: &str) -> Option<i32> {
    let named = [
        ("emerg", log_level::EMERG),
        ("alert", log_level::ALERT),
        ("crit", log_level::CRIT),
        ("err", log_level::ERR),
        ("error", log_level::ERR),
        ("warning", log_level::WARNING),
        ("warn", log_level::WARNING),
        ("notice", log_level::NOTICE),
        ("info", log_level::INFO),
        ("debug", log_level::DEBUG),
    ];
    named
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
        .map(|&(_, l)| l)
        .or_else(|| {
            s.parse::<i32>()
                .ok()
                .filter(|l| (0..=7).contains(l) && s.len() == 1)
        })
}

fn usage() -> ExitCode {
    eprintln!(
        "usage: migdev SOCKET [--log LEVEL]\n  LEVEL: emerg alert crit err warning notice info debug, or 0-7"
    );
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut level = log_level::INFO;
    while let Some(arg) = args.next() {
        if arg == "--log" {
            let Some(name) = args.next() else {
                return usage();
            };
            let Some(l) = parse_level(&name) else {
                eprintln!("migdev: unknown log level {name}");
                return usage();
            };
            level = l;
        } else if !arg.starts_with('-') && path.is_none() {
            path = Some(arg);
        } else {
            return usage();
        }
    }
    let Some(path) = path else {
        return usage();
    };
    let pid = std::process::id();
    let log = move |level: i32, msg: &str| eprintln!("migdev[{pid}] <{level}>: {msg}");
    let stop = AtomicBool::new(false);
    match MigDev::create(Path::new(&path), level, log).and_then(|d| d.serve(&stop)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migdev: {path}: {e}");
            ExitCode::FAILURE
        }
    }
}
