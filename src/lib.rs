//! A vfio-user server library: the protocol, a device context with a safe
//! Rust API, a client, and a C ABI compatible with libvfio-user.so.0.
//!
//! # The model
//!
//! vfio-user lets a device emulator (the *server*) live in its own process
//! while a VMM such as QEMU (the *client*) drives it over a UNIX socket,
//! exactly as it would drive a VFIO device in the kernel:
//!
//! - **Regions** are the device's BARs, expansion ROM, PCI config space and
//!   VGA window. The client reads and writes them with messages (each access
//!   runs a callback of yours), or maps them directly when you give an fd.
//! - **PCI config space** is emulated by the library: header, BAR sizing and
//!   capability lists (PM, MSI, MSI-X, PCIe, vendor-specific, DSN...).
//! - **DMA**: the client maps guest memory into your process (with an fd) or
//!   announces memory you can only reach through messages. Translate guest
//!   addresses with [`device::DmaController`] and copy in and out of guest
//!   memory with its safe `sg_read` / `sg_write`.
//! - **Interrupts**: the client hands over eventfds; you trigger vectors
//!   with [`Context::irq_trigger`] (from any thread).
//! - **Live migration** (v2): implement [`device::MigrationDevice`]; the
//!   library runs the state machine, the data stream and dirty-page logging.
//!
//! # A minimal device
//!
//! ```
//! use vfio_user::device::{region, RegionSetup};
//! use vfio_user::{client::Client, Context};
//!
//! let path = std::env::temp_dir().join(format!("doc-minimal-{}.sock", std::process::id()));
//! let (ready_tx, ready) = std::sync::mpsc::channel();
//! let server_path = path.clone();
//! let server = std::thread::spawn(move || {
//!     let ctx = Context::new(&server_path, 0, std::ptr::null_mut())?;
//!     ctx.pci_init(0, 0, 0)?;
//!     ctx.pci().unwrap().set_id(0x494f, 0x0dc9, 0, 0);
//!     // BAR0: 16 bytes that read back as their offset.
//!     let bar0 = RegionSetup::new(16, region::FLAG_RW | region::FLAG_MEM)
//!         .with_callback(|_ctx, buf, offset, _is_write| {
//!             buf.iter_mut().enumerate().for_each(|(i, b)| *b = offset as u8 + i as u8);
//!             Ok(buf.len())
//!         });
//!     ctx.setup_region(region::BAR0, bar0)?;
//!     ctx.realize()?;
//!     ready_tx.send(()).unwrap();
//!     ctx.attach()?;
//!     ctx.run().map(|_| ()) // returns Err(ENOTCONN) when the client leaves
//! });
//! ready.recv().unwrap();
//! let mut client = Client::connect(&path).unwrap();
//! assert_eq!(client.region_read(region::BAR0 as u32, 4, 4).unwrap(), [4, 5, 6, 7]);
//! drop(client);
//! assert_eq!(server.join().unwrap(), Err(vfio_user::Errno::ENOTCONN));
//! ```
//!
//! # Threads
//!
//! A [`Context`] is set up and run on one thread; callbacks run on that
//! thread, inside [`Context::run`], and may call back into the context. The
//! DMA controller ([`Context::dma`]) and the interrupt table
//! ([`Context::irqs`]) are `Send + Sync` handles that any thread may use; the
//! client only maps and unmaps DMA while the device is quiesced (see
//! [`Context::setup_quiesce_cb`]).
//!
//! # Layers
//!
//! Each layer depends only on the ones before it:
//! - [`protocol`]: wire structures and capability JSON;
//! - [`transport`]: the UNIX socket, framing and fd passing;
//! - [`device`]: the device context (dispatch, regions, PCI config space,
//!   IRQs, DMA, migration);
//! - `ffi`: the `extern "C"` functions of the C library, a thin adapter over
//!   [`device`];
//! - [`client`]: a client for tests, tools and benchmarks.

pub mod client;
pub mod device;
pub mod error;
pub mod protocol;
pub mod transport;

mod ffi;

pub use device::Context;
pub use error::{Errno, Result};
