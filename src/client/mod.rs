//! A blocking vfio-user client: what a VMM does on its side of the socket,
//! for tests and tools that drive a server.
//!
//! [`Client::connect`] connects to a server's socket and negotiates the
//! protocol version; each method then sends one request and waits for its
//! reply. Every wait is bounded by [`ClientOptions::timeout`] (the socket's
//! `SO_RCVTIMEO`/`SO_SNDTIMEO` and the poll while waiting for a reply), and a
//! misbehaving server yields a [`ClientError`], never a panic.
//!
//! While waiting for a reply the client also serves the server's own
//! requests, `DMA_READ` and `DMA_WRITE`, on the main socket and on the twin
//! socket when one was negotiated: a server whose device reads guest memory
//! while handling a request (`vfu_sgl_read` on a region mapped without an fd)
//! gets its answer from the client's [`DmaSpace`] (filled in by
//! [`Client::dma_map_memory`]) or from a [`DmaBacking`] set with
//! [`Client::set_dma_backing`]. [`Client::serve_dma`] does the same when no
//! request is outstanding (after a posted write, say).
//!
//! The server is typically run in another thread (or process): the client is
//! `Send` and has no shared state with it.

mod connect;
mod dma;
mod irq;
mod memory;
mod migration;
mod regions;
mod wire;

pub use connect::{parse_server_caps, ClientOptions, DEFAULT_MAX_SEND_DATA};
pub use irq::IrqInfo;
pub use memory::{DmaBacking, DmaSpace, EventFd, GuestMemory};
pub use regions::{DeviceInfo, IoEventFdInfo, RegionInfo, RegionIoFds};
pub use wire::RawMessage;

use std::fmt;
use std::sync::Arc;

use crate::error::Errno;
use crate::protocol::caps::ServerCaps;
use crate::transport::Conn;

/// Largest `argsz` the client follows when the server asks for a bigger
/// region-info or io-fds buffer.
const MAX_INFO_ARGSZ: u32 = 1 << 20;

/// Most abandoned (timed-out) request ids remembered, so that their late
/// replies can be skipped.
const MAX_ABANDONED: usize = 64;

/// Why a client operation failed.
#[derive(Debug)]
pub enum ClientError {
    /// A local system call failed (socket, memfd, ...).
    Io(Errno),
    /// The server answered the command with an error reply.
    Server {
        /// The command that failed.
        cmd: u16,
        /// The errno the server reported.
        errno: Errno,
    },
    /// The server sent something that does not follow the protocol.
    Protocol(String),
    /// No (complete) answer within the configured timeout.
    Timeout,
    /// The server closed the connection.
    Disconnected,
    /// The server did not negotiate what the operation needs.
    Unsupported(String),
    /// The caller's arguments cannot be sent as asked.
    InvalidArgument(String),
}

impl ClientError {
    /// The errno of an error reply from the server, if this is one.
    pub fn server_errno(&self) -> Option<Errno> {
        match self {
            ClientError::Server { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "I/O error: {e}"),
            ClientError::Server { cmd, errno } => {
                write!(f, "server refused command {cmd}: {errno}")
            }
            ClientError::Protocol(s) => write!(f, "protocol error: {s}"),
            ClientError::Timeout => write!(f, "timed out waiting for the server"),
            ClientError::Disconnected => write!(f, "the server closed the connection"),
            ClientError::Unsupported(s) => write!(f, "not supported by the server: {s}"),
            ClientError::InvalidArgument(s) => write!(f, "invalid argument: {s}"),
        }
    }
}

impl std::error::Error for ClientError {}

/// Result of client operations.
pub type Result<T> = std::result::Result<T, ClientError>;

pub(crate) fn proto<T>(msg: impl Into<String>) -> Result<T> {
    Err(ClientError::Protocol(msg.into()))
}

fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(ClientError::InvalidArgument(msg.into()))
}

/// Maps a transport errno to a client error.
fn io_err(e: Errno) -> ClientError {
    match e.0 {
        libc::EAGAIN | libc::ETIMEDOUT => ClientError::Timeout,
        libc::ENOMSG | libc::ECONNRESET | libc::EPIPE => ClientError::Disconnected,
        _ => ClientError::Io(e),
    }
}

/// A wire field missing from a reply.
fn short(what: &str) -> ClientError {
    ClientError::Protocol(format!("{what}: reply too short"))
}

/// A connected, negotiated vfio-user client.
pub struct Client {
    conn: Conn,
    twin: Option<Conn>,
    opts: ClientOptions,
    caps: ServerCaps,
    caps_json: String,
    version: (u16, u16),
    next_id: u16,
    abandoned: Vec<u16>,
    broken: Option<String>,
    space: DmaSpace,
    backing: Option<Arc<dyn DmaBacking + Send + Sync>>,
    dma_served: u64,
    dma_served_twin: u64,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("fd", &self.conn.as_raw_fd())
            .field("twin", &self.twin.as_ref().map(|t| t.as_raw_fd()))
            .field("caps", &self.caps)
            .field("version", &self.version)
            .field("broken", &self.broken)
            .finish()
    }
}

/// Which socket a message came in on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Sock {
    Main,
    Twin,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Header, WireOut};
    use crate::transport::socketpair;
    use std::time::Duration;

    #[test]
    fn client_can_move_to_another_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Client>();
        assert_send::<ClientError>();
    }

    /// A fake server on a socketpair, scripted per test.
    pub(super) fn fake_server(
        script: impl FnOnce(Conn) + Send + 'static,
    ) -> (Client, std::thread::JoinHandle<()>) {
        let (a, b) = socketpair().unwrap();
        let t = std::thread::spawn(move || {
            let conn = Conn::from_fd(a);
            let rx = conn.recv_header(false).unwrap();
            let mut body = vec![0u8; rx.hdr.body_len().unwrap()];
            conn.recv_exact(&mut body).unwrap();
            let mut out = Vec::new();
            out.put_u16(0);
            out.put_u16(2);
            out.extend_from_slice(br#"{"capabilities":{"max_msg_fds":4}}"#);
            out.push(0);
            conn.send(&rx.hdr.reply(out.len(), 0), &[&out], &[])
                .unwrap();
            script(conn);
        });
        let opts = ClientOptions {
            timeout: Duration::from_millis(300),
            ..ClientOptions::default()
        };
        let c = Client::from_fd(b, opts).unwrap();
        (c, t)
    }

    pub(super) fn recv(conn: &Conn) -> (Header, Vec<u8>) {
        let rx = conn.recv_header(false).unwrap();
        let mut body = vec![0u8; rx.hdr.body_len().unwrap()];
        conn.recv_exact(&mut body).unwrap();
        (rx.hdr, body)
    }
}
