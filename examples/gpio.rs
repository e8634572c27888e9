//! gpio: a 16-in/16-out GPIO card in the manner of the ACCES PCI-IDIO-16,
//! the Rust twin of `c-tests/samples/gpio.c`.
//!
//! PCI ID `494f:0dc8`, one 256-byte I/O BAR (BAR2) and one INTx line. All
//! registers are 8 bits wide; an access of several bytes is handled byte by
//! byte:
//!
//! | offset | access | meaning |
//! |--------|--------|---------|
//! | `0x0`  | RW | outputs 0-7 (reads return the last value written) |
//! | `0x1`  | RO | inputs 0-7 |
//! | `0x4`  | RW | outputs 8-15 |
//! | `0x5`  | RO | inputs 8-15 |
//! | other  | -  | reads 0, writes ignored |
//!
//! The inputs are simulated: each read of an input register returns the
//! bank's current state and then inverts its eight lines, so a bank reads
//! `0x00`, `0xff`, `0x00`, ... Output changes are logged at `INFO`
//! (`gpio: outputs 0-7: 0x00 -> 0xa5`); `-v` also logs input reads and
//! ignored writes. The device serves one client and exits with status 0
//! once it disconnects.
//!
//! ```text
//! cargo run --example gpio -- [-v] SOCKET
//! ```

use std::cell::RefCell;
use std::path::Path;
use std::process::ExitCode;

use vfio_user::device::{log_level, pci, region, IrqType, PciType, RegionSetup};
use vfio_user::{Context, Errno, Result};

/// PCI vendor ID.
pub const VENDOR: u16 = 0x494f;
/// PCI device ID.
pub const DEVICE: u16 = 0x0dc8;
/// Size of BAR2, an I/O BAR.
pub const BAR2_SIZE: u64 = 0x100;

/// Outputs 0-7.
pub const REG_OUT_LO: u64 = 0x0;
/// Inputs 0-7.
pub const REG_IN_LO: u64 = 0x1;
/// Outputs 8-15.
pub const REG_OUT_HI: u64 = 0x4;
/// Inputs 8-15.
pub const REG_IN_HI: u64 = 0x5;

/// The card's state: output latches and simulated input lines, one byte per
/// bank of eight.
#[derive(Debug, Default)]
struct Card {
    outputs: [u8; 2],
    inputs: [u8; 2],
}

impl Card {
    fn read(&mut self, ctx: &Context, reg: u64) -> u8 {
        match reg {
            REG_OUT_LO | REG_OUT_HI => self.outputs[usize::from(reg == REG_OUT_HI)],
            REG_IN_LO | REG_IN_HI => {
                let bank = usize::from(reg == REG_IN_HI);
                let v = self.inputs[bank];
                self.inputs[bank] = !v;
                ctx.log(
                    log_level::DEBUG,
                    &format!("inputs {}-{} read as {v:#04x}", bank * 8, bank * 8 + 7),
                );
                v
            }
            _ => 0,
        }
    }

    fn write(&mut self, ctx: &Context, reg: u64, v: u8) {
        if reg != REG_OUT_LO && reg != REG_OUT_HI {
            ctx.log(
                log_level::DEBUG,
                &format!("write of {v:#04x} to register {reg:#x} ignored"),
            );
            return;
        }
        let bank = usize::from(reg == REG_OUT_HI);
        let old = self.outputs[bank];
        if old != v {
            ctx.log(
                log_level::INFO,
                &format!(
                    "outputs {}-{}: {old:#04x} -> {v:#04x}",
                    bank * 8,
                    bank * 8 + 7
                ),
            );
        }
        self.outputs[bank] = v;
    }
}

/// Creates the device on a blocking context listening at `path`. Messages
/// at `level` (a [`log_level`] value) or more severe go to `log`.
pub fn create(path: &Path, level: i32, log: impl Fn(i32, &str) + 'static) -> Result<Context> {
    let ctx = Context::create(path, false)?;
    ctx.on_log(level, move |_ctx, level, msg| log(level, msg))?;
    let cfg = ctx.pci_init(PciType::Conventional, pci::PCI_HEADER_TYPE_NORMAL, 0)?;
    cfg.set_id(VENDOR, DEVICE, 0, 0);
    let card = RefCell::new(Card::default());
    // Flags without FLAG_MEM make this an I/O BAR. The library has checked
    // offset and length against the BAR already.
    let bar2 = RegionSetup::new(BAR2_SIZE, region::FLAG_RW).with_callback(
        move |ctx, buf, offset, is_write| {
            let mut card = card.borrow_mut();
            for (reg, b) in (offset..).zip(buf.iter_mut()) {
                if is_write {
                    card.write(ctx, reg, *b);
                } else {
                    *b = card.read(ctx, reg);
                }
            }
            Ok(buf.len())
        },
    );
    ctx.setup_region(region::BAR2, bar2)?;
    ctx.setup_irq_count(IrqType::Intx, 1)?;
    ctx.realize()?;
    Ok(ctx)
}

/// Waits for a client and serves it until it disconnects.
pub fn serve(ctx: &Context) -> Result<()> {
    ctx.log(
        log_level::INFO,
        &format!("waiting for a client on {}", ctx.path().display()),
    );
    ctx.attach()?;
    ctx.log(log_level::INFO, "client attached");
    loop {
        match ctx.run() {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::ENOTCONN) => {
                ctx.log(log_level::INFO, "client disconnected");
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
}

fn main() -> ExitCode {
    let mut level = log_level::INFO;
    let mut path = None;
    let mut bad = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "-v" => level = log_level::DEBUG,
            a if !a.starts_with('-') && path.is_none() => path = Some(arg),
            _ => bad = true,
        }
    }
    let (Some(path), false) = (path, bad) else {
        eprintln!("usage: gpio [-v] SOCKET");
        return ExitCode::FAILURE;
    };
    let log = |_level: i32, msg: &str| eprintln!("gpio: {msg}");
    match create(Path::new(&path), level, log).and_then(|ctx| serve(&ctx)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpio: {path}: {e}");
            ExitCode::FAILURE
        }
    }
}
