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
//!   announces memory you can only reach through messages. Read and write
//!   it with [`Context::dma_read`] / [`Context::dma_write`] (any kind of
//!   region), or borrow mapped memory with
//!   [`DmaController::with_guest`](device::DmaController::with_guest).
//! - **Interrupts**: the client hands over eventfds; you trigger vectors
//!   with [`Context::irq_trigger`] (from any thread).
//! - **Live migration** (v2): implement [`device::MigrationDevice`]; the
//!   library runs the state machine, the data stream and dirty-page logging.
//!
//! Device code needs no `unsafe`: every callback is a closure, device state
//! lives in the closures (an `Rc<RefCell<_>>` shared between them, say), and
//! guest memory is only reached through bounds-checked copies.
//!
//! # A minimal device
//!
//! ```
//! use vfio_user::device::{pci, region, PciType, RegionSetup};
//! use vfio_user::{client::Client, Context};
//!
//! let path = std::env::temp_dir().join(format!("doc-minimal-{}.sock", std::process::id()));
//! let (ready_tx, ready) = std::sync::mpsc::channel();
//! let server_path = path.clone();
//! let server = std::thread::spawn(move || {
//!     let ctx = Context::create(&server_path, false)?;
//!     let cfg = ctx.pci_init(PciType::Conventional, pci::PCI_HEADER_TYPE_NORMAL, 0)?;
//!     cfg.set_id(0x494f, 0x0dc9, 0, 0);
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
//! # Examples
//!
//! The `examples` directory of the source tree holds three complete devices,
//! Rust twins of the C samples in `c-tests/samples` (same IDs, registers and
//! behaviour; see `c-tests/samples/README.md`):
//!
//! - `examples/null.rs`: the smallest useful device, one BAR of zeroes;
//! - `examples/gpio.rs`: an I/O BAR with device behaviour and logging;
//! - `examples/migdev.rs`: a non-blocking event loop, DMA into guest memory,
//!   dirty-page tracking and live migration, in a state format the C
//!   `migdev` reads and writes too, so each can migrate into the other.
//!
//! Run one with `cargo run --example migdev -- /tmp/migdev.sock`.
//!
//! # Errors
//!
//! Every fallible function returns [`Result`], whose error is an [`Errno`]:
//! the protocol reports failures to the client as errnos, and the C API does
//! the same, so that is the one error type. Each function documents its
//! errnos. An `Errno` your callback returns goes to the client unchanged.
//! `Errno` implements [`std::error::Error`] and converts into
//! [`std::io::Error`].
//!
//! # Blocking and non-blocking contexts
//!
//! A blocking context ([`Context::create`]`(path, false)`) is simplest:
//! [`Context::attach`] waits for a client and [`Context::run`] serves it
//! until it leaves (`Err(ENOTCONN)`); the device does everything in its
//! callbacks.
//!
//! A non-blocking context (`create(path, true)`) fits an event loop that
//! also does the device's own work: wait with [`Context::wait_ready`] (or
//! poll [`Context::poll_fd`] yourself, fetching it anew each time round),
//! attach with [`Context::try_attach`], and serve with
//! [`Context::run_ready`]. Keep calling `run_ready` after the device did
//! DMA through messages, even when the socket looks idle: requests that
//! arrived meanwhile are held in the context (`wait_ready` knows about
//! them). `examples/migdev.rs` has such a loop.
//!
//! # Threads
//!
//! A [`Context`] is neither `Send` nor `Sync`: it is created, set up and run
//! on one thread, and its callbacks run on that thread, inside
//! [`Context::run`]; they may call back into the context. Other threads use
//! two handles, both `Send + Sync`:
//!
//! - [`Context::irqs`] to trigger interrupts
//!   ([`Irqs::trigger`](device::Irqs::trigger));
//! - [`Context::dma`], the
//!   [`DmaController`](device::DmaController), to translate addresses and
//!   read and write guest memory that is mapped into the process or backed
//!   by a file. Memory the client serves through messages can only be
//!   reached from the context's thread ([`Context::dma_read`]).
//!
//! Guest memory is shared with the guest, which may change it at any time:
//! the library never hands out references to it, only copies (and, for the
//! C API, raw addresses).
//!
//! # Quiesce
//!
//! Some requests must not race with the device's own activity: DMA map and
//! unmap, device reset and function-level reset, migration state changes,
//! and tearing the connection down when the client leaves. Before handling
//! one, the library calls the quiesce callback ([`Context::on_quiesce`]).
//! Once quiesced, the device must not translate, read or write guest memory
//! except from inside the callbacks the library then makes (DMA register
//! and unregister, reset, migration transition), until it is unquiesced:
//!
//! - Return `Ok(())` when the device is quiet now; the request proceeds and
//!   the device is unquiesced when [`Context::run`] returns.
//! - Return `Err(EBUSY)` to finish asynchronously (say, once worker threads
//!   have drained their queues): `run` fails with `EBUSY` until the device
//!   calls [`Context::device_quiesced`] with 0, which carries out the
//!   request (or with an errno, which fails it); the device is unquiesced
//!   when `device_quiesced` returns.
//! - Any other error fails the request with that errno.
//!
//! Dropping the context does not call the quiesce callback: the device must
//! be quiet by then.
//!
//! Without a quiesce callback the device is taken to be always quiet, which
//! is right when it only touches guest memory from the context's thread and
//! outside `run` (as `examples/migdev.rs` does). A device whose other
//! threads use [`DmaController::with_guest`](device::DmaController::with_guest)
//! is safe anyway: unmapping waits for the borrow to end. Dropping the last
//! use of an address in the DMA unregister callback
//! ([`Context::on_dma_unregister`]) keeps the device from using memory that
//! is gone.
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
//!
//! # Versioning
//!
//! This crate's Rust API follows semver on its own. The C ABI follows the
//! SONAME `libvfio-user.so.0` of upstream libvfio-user and does not change
//! with the crate's version.

#![warn(missing_docs)]

pub mod client;
pub mod device;
pub mod error;
pub mod protocol;
pub mod transport;

mod ffi;

pub use device::Context;
pub use error::{Errno, Result};
