//! null: about the smallest vfio-user device that is still useful, the Rust
//! twin of `c-tests/samples/nulldev.c`.
//!
//! A conventional PCI function (ID `4e58:0010`, class `ff0000`) with one
//! 4 KiB memory BAR (BAR0) that reads as zeroes and ignores writes. It
//! serves a single client and exits with status 0 once that client
//! disconnects.
//!
//! ```text
//! cargo run --example null -- SOCKET
//! ```

use std::path::Path;
use std::process::ExitCode;

use vfio_user::device::{log_level, pci, region, PciType, RegionSetup};
use vfio_user::{Context, Errno, Result};

/// PCI vendor ID.
pub const VENDOR: u16 = 0x4e58;
/// PCI device ID.
pub const DEVICE: u16 = 0x0010;
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 0x1000;

/// Creates the device on a blocking context listening at `path`, ready to
/// attach a client. Library errors are logged to stderr.
pub fn create(path: &Path) -> Result<Context> {
    let ctx = Context::create(path, false)?;
    ctx.on_log(log_level::ERR, |_ctx, level, msg| {
        eprintln!("null[{level}]: {msg}")
    })?;
    let cfg = ctx.pci_init(PciType::Conventional, pci::PCI_HEADER_TYPE_NORMAL, 0)?;
    cfg.set_id(VENDOR, DEVICE, 0, 0);
    cfg.set_class(0xff, 0x00, 0x00);
    // The library has checked offset and length against the BAR already.
    let bar0 = RegionSetup::new(BAR0_SIZE, region::FLAG_RW | region::FLAG_MEM).with_callback(
        |_ctx, buf, _offset, is_write| {
            if !is_write {
                buf.fill(0);
            }
            Ok(buf.len())
        },
    );
    ctx.setup_region(region::BAR0, bar0)?;
    ctx.realize()?;
    Ok(ctx)
}

/// Waits for a client and serves it until it disconnects.
pub fn serve(ctx: &Context) -> Result<()> {
    ctx.attach()?;
    loop {
        // A blocking context handles requests until something goes wrong.
        match ctx.run() {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(Errno::ENOTCONN) => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, path] = &args[..] else {
        eprintln!("usage: null SOCKET");
        return ExitCode::FAILURE;
    };
    match create(Path::new(path)).and_then(|ctx| serve(&ctx)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("null: {path}: {e}");
            ExitCode::FAILURE
        }
    }
}
