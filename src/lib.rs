//! A vfio-user server library: the protocol, a device context with a safe
//! Rust API, and a C ABI compatible with libvfio-user.so.0.
//!
//! Layers, each depending only on the ones before it:
//! - [`protocol`]: wire structures and capability JSON;
//! - [`transport`]: the UNIX socket, framing and fd passing;
//! - [`device`]: the device context (dispatch, regions, PCI config space,
//!   IRQs, DMA, migration);
//! - `ffi`: the `extern "C"` functions of the C library.

pub mod client;
pub mod device;
pub mod error;
pub mod protocol;
pub mod transport;

mod ffi;

pub use device::Context;
pub use error::{Errno, Result};
