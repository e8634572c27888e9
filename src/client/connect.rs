//! Connecting and negotiating: [`ClientOptions`], the version exchange, the
//! server's capability JSON, and the negotiated state.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::TimeVal;
use serde_json::{Map, Value};

use crate::protocol::caps::ServerCaps;
use crate::protocol::{
    cmd, Wire, WireOut, DEFAULT_MAX_DATA_XFER_SIZE, VERSION_MAJOR, VERSION_MINOR,
};
use crate::transport::Conn;

use super::wire::stream_conn;
use super::*;

/// Connection settings.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Largest data the client takes in one `DMA_READ`/`DMA_WRITE` from the
    /// server (announced as `max_data_xfer_size`).
    pub max_data_xfer_size: usize,
    /// Most fds the client accepts in one message (announced as
    /// `max_msg_fds`).
    pub max_msg_fds: usize,
    /// Ask for a twin socket for server-to-client requests.
    pub twin_socket: bool,
    /// Announce that the client may send `REGION_WRITE_MULTI`.
    pub write_multiple: bool,
    /// Dirty page size to announce under `migration.pgsize`.
    pub migration_pgsize: Option<u64>,
    /// Minor protocol version to offer.
    pub version_minor: u16,
    /// Bound on every wait for the server. Must be non-zero.
    pub timeout: Duration,
    /// Capabilities JSON sent instead of the one built from the fields
    /// above (without its NUL), for tests of the server's parser.
    pub caps_json: Option<String>,
    /// Most data bytes put into one request the client sends
    /// (`MIG_DATA_WRITE`, `REGION_WRITE`), below the server's
    /// `max_data_xfer_size`: servers that take a request body with a single
    /// `recv()` (upstream libvfio-user's) only see a request whole if it
    /// arrives in one piece. See [`DEFAULT_MAX_SEND_DATA`]. Must be
    /// non-zero. Reads are not affected.
    pub max_send_data: usize,
}

/// Default [`ClientOptions::max_send_data`]: 32 KiB. On Linux an AF_UNIX
/// stream `sendmsg` is queued in pieces of at most 32 KiB of page
/// fragments plus one small head (36544 bytes in all with 4 KiB pages), so
/// a receiver that reads while the sender is still queueing gets only the
/// first piece; a request of up to 32 KiB of data (plus its headers) is
/// always one piece. Measured in docs/migration.md.
pub const DEFAULT_MAX_SEND_DATA: usize = 32 * 1024;

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            max_msg_fds: 8,
            twin_socket: false,
            write_multiple: true,
            migration_pgsize: None,
            version_minor: VERSION_MINOR,
            timeout: Duration::from_secs(10),
            caps_json: None,
            max_send_data: DEFAULT_MAX_SEND_DATA,
        }
    }
}

impl ClientOptions {
    pub(super) fn caps_json(&self) -> String {
        if let Some(s) = &self.caps_json {
            return s.clone();
        }
        let mut c = Map::new();
        c.insert("max_msg_fds".into(), Value::from(self.max_msg_fds as u64));
        c.insert(
            "max_data_xfer_size".into(),
            Value::from(self.max_data_xfer_size as u64),
        );
        if let Some(p) = self.migration_pgsize {
            let mut m = Map::new();
            m.insert("pgsize".into(), Value::from(p));
            c.insert("migration".into(), Value::Object(m));
        }
        if self.twin_socket {
            let mut t = Map::new();
            t.insert("supported".into(), Value::Bool(true));
            c.insert("twin_socket".into(), Value::Object(t));
        }
        if self.write_multiple {
            c.insert("write_multiple".into(), Value::Bool(true));
        }
        let mut top = Map::new();
        top.insert("capabilities".into(), Value::Object(c));
        Value::Object(top).to_string()
    }
}

/// Parses the JSON of the server's VERSION reply (without its NUL). Missing
/// keys take the protocol's defaults; a known key of the wrong type is a
/// protocol error.
pub fn parse_server_caps(json: &[u8]) -> Result<ServerCaps> {
    let mut caps = ServerCaps {
        max_msg_fds: 1,
        max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
        migration_pgsize: None,
        twin_socket_fd_index: None,
        pgsizes: 4096,
        max_dma_maps: 65535,
        write_multiple: false,
    };
    let top: Value = serde_json::from_slice(json)
        .map_err(|e| ClientError::Protocol(format!("capabilities: {e}")))?;
    let Some(c) = top.get("capabilities") else {
        return Ok(caps);
    };
    let c = c
        .as_object()
        .ok_or_else(|| ClientError::Protocol("capabilities is not an object".into()))?;
    let uint = |key: &str, v: &Value| -> Result<u64> {
        v.as_u64()
            .ok_or_else(|| ClientError::Protocol(format!("{key} is not an unsigned integer")))
    };
    let size = |key: &str, v: &Value| -> Result<usize> {
        usize::try_from(uint(key, v)?)
            .map_err(|_| ClientError::Protocol(format!("{key} is too large")))
    };
    if let Some(v) = c.get("max_msg_fds") {
        caps.max_msg_fds = size("max_msg_fds", v)?;
    }
    if let Some(v) = c.get("max_data_xfer_size") {
        caps.max_data_xfer_size = size("max_data_xfer_size", v)?;
        if caps.max_data_xfer_size == 0 {
            return proto("max_data_xfer_size is zero");
        }
    }
    if let Some(v) = c.get("pgsizes") {
        caps.pgsizes = uint("pgsizes", v)?;
    }
    if let Some(v) = c.get("max_dma_maps") {
        caps.max_dma_maps = size("max_dma_maps", v)?;
    }
    if let Some(v) = c.get("migration") {
        let m = v
            .as_object()
            .ok_or_else(|| ClientError::Protocol("migration is not an object".into()))?;
        if let Some(p) = m.get("pgsize") {
            caps.migration_pgsize = Some(uint("migration.pgsize", p)?);
        }
    }
    if let Some(v) = c.get("twin_socket") {
        let t = v
            .as_object()
            .ok_or_else(|| ClientError::Protocol("twin_socket is not an object".into()))?;
        let supported = match t.get("supported") {
            Some(s) => s.as_bool().ok_or_else(|| {
                ClientError::Protocol("twin_socket.supported is not a boolean".into())
            })?,
            None => false,
        };
        if supported {
            let i = t
                .get("fd_index")
                .ok_or_else(|| ClientError::Protocol("twin_socket without fd_index".into()))?;
            caps.twin_socket_fd_index = Some(size("twin_socket.fd_index", i)?);
        }
    }
    if let Some(v) = c.get("write_multiple") {
        caps.write_multiple = v
            .as_bool()
            .ok_or_else(|| ClientError::Protocol("write_multiple is not a boolean".into()))?;
    }
    Ok(caps)
}

impl Client {
    /// Connects to the server socket at `path` with default options.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client> {
        Client::connect_with(path, ClientOptions::default())
    }

    /// Connects to the server socket at `path` and negotiates the version.
    pub fn connect_with(path: impl AsRef<Path>, opts: ClientOptions) -> Result<Client> {
        if opts.timeout.is_zero() {
            return invalid("timeout must be non-zero");
        }
        if opts.max_send_data == 0 {
            return invalid("max_send_data must be non-zero");
        }
        let stream = UnixStream::connect(path.as_ref()).map_err(|e| ClientError::Io(e.into()))?;
        let conn = stream_conn(OwnedFd::from(stream), opts.timeout)?;
        Client::negotiate(conn, opts)
    }

    /// Negotiates over an already connected socket (a socketpair, say).
    pub fn from_fd(fd: OwnedFd, opts: ClientOptions) -> Result<Client> {
        if opts.timeout.is_zero() {
            return invalid("timeout must be non-zero");
        }
        if opts.max_send_data == 0 {
            return invalid("max_send_data must be non-zero");
        }
        let conn = stream_conn(fd, opts.timeout)?;
        Client::negotiate(conn, opts)
    }

    pub(super) fn negotiate(conn: Conn, opts: ClientOptions) -> Result<Client> {
        let mut c = Client {
            conn,
            twin: None,
            caps: parse_server_caps(b"{}")?,
            caps_json: String::new(),
            version: (VERSION_MAJOR, 0),
            next_id: 0,
            abandoned: Vec::new(),
            broken: None,
            space: DmaSpace::new(),
            backing: None,
            dma_served: 0,
            dma_served_twin: 0,
            opts,
        };
        let mut body = Vec::new();
        body.put_u16(VERSION_MAJOR);
        body.put_u16(c.opts.version_minor);
        body.extend_from_slice(c.opts.caps_json().as_bytes());
        body.push(0);
        let mut rep = c.request(cmd::VERSION, &[&body], &[], 64 * 1024)?;
        let b = &rep.body[..];
        let major = b.u16_at(0).map_err(|_| short("VERSION"))?;
        let minor = b.u16_at(2).map_err(|_| short("VERSION"))?;
        if major != VERSION_MAJOR {
            return proto(format!("server speaks major version {major}"));
        }
        if minor > c.opts.version_minor {
            return proto(format!("server chose minor version {minor} above ours"));
        }
        let json = b.get(4..).unwrap_or(&[]);
        let json = &json[..json.iter().position(|&x| x == 0).unwrap_or(json.len())];
        if !json.is_empty() {
            c.caps = parse_server_caps(json)?;
            c.caps_json = String::from_utf8_lossy(json).into_owned();
        }
        c.version = (major, minor);
        if let Some(i) = c.caps.twin_socket_fd_index {
            if !c.opts.twin_socket {
                return proto("server offered a twin socket we did not ask for");
            }
            if i >= rep.fds.len() {
                return proto(format!(
                    "twin socket fd_index {i} but {} fds passed",
                    rep.fds.len()
                ));
            }
            let fd = rep.fds.swap_remove(i);
            c.twin = Some(stream_conn(fd, c.opts.timeout)?);
        }
        Ok(c)
    }

    // ---- negotiated state ------------------------------------------------

    /// The server's capabilities.
    pub fn server_caps(&self) -> &ServerCaps {
        &self.caps
    }

    /// The server's capabilities JSON, as sent (empty when it sent none).
    pub fn server_caps_json(&self) -> &str {
        &self.caps_json
    }

    /// The negotiated `(major, minor)` version.
    pub fn version(&self) -> (u16, u16) {
        self.version
    }

    /// Whether a twin socket is in use.
    pub fn has_twin_socket(&self) -> bool {
        self.twin.is_some()
    }

    /// The options the client was connected with.
    pub fn options(&self) -> &ClientOptions {
        &self.opts
    }

    /// Changes [`ClientOptions::max_send_data`] from now on.
    pub fn set_max_send_data(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return invalid("max_send_data must be non-zero");
        }
        self.opts.max_send_data = n;
        Ok(())
    }

    /// Changes the bound on waits from now on (socket timeouts included).
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        if timeout.is_zero() {
            return invalid("timeout must be non-zero");
        }
        let tv = TimeVal::new(
            libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            timeout.subsec_micros().into(),
        );
        for conn in std::iter::once(&self.conn).chain(self.twin.as_ref()) {
            let set = |r: nix::Result<()>| r.map_err(|e| ClientError::Io(e.into()));
            set(setsockopt(conn, sockopt::ReceiveTimeout, &tv))?;
            set(setsockopt(conn, sockopt::SendTimeout, &tv))?;
        }
        self.opts.timeout = timeout;
        Ok(())
    }

    /// Number of `DMA_READ`/`DMA_WRITE` requests served so far (answered,
    /// successfully or with an error reply).
    pub fn dma_requests_served(&self) -> u64 {
        self.dma_served
    }

    /// How many of [`Client::dma_requests_served`] came on the twin socket.
    pub fn dma_requests_served_on_twin(&self) -> u64 {
        self.dma_served_twin
    }

    /// The memory served to the server's DMA requests when no custom
    /// backing is set.
    pub fn dma_space(&self) -> &DmaSpace {
        &self.space
    }

    /// Mutable access to the default DMA memory.
    pub fn dma_space_mut(&mut self) -> &mut DmaSpace {
        &mut self.space
    }

    /// Serves the server's DMA requests from `backing` instead of the
    /// client's [`DmaSpace`] (`None` goes back to the space).
    pub fn set_dma_backing(&mut self, backing: Option<Arc<dyn DmaBacking + Send + Sync>>) {
        self.backing = backing;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_caps_defaults_and_types() {
        let c = parse_server_caps(b"{}").unwrap();
        assert_eq!(c.max_msg_fds, 1);
        assert_eq!(c.max_data_xfer_size, DEFAULT_MAX_DATA_XFER_SIZE);
        assert_eq!(c.twin_socket_fd_index, None);
        let c = parse_server_caps(
            br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":4096,"pgsizes":4096,
                "max_dma_maps":12,"migration":{"pgsize":8192},
                "twin_socket":{"supported":true,"fd_index":0},"write_multiple":true}}"#,
        )
        .unwrap();
        assert_eq!(
            (c.max_msg_fds, c.max_data_xfer_size, c.max_dma_maps),
            (8, 4096, 12)
        );
        assert_eq!(c.migration_pgsize, Some(8192));
        assert_eq!(c.twin_socket_fd_index, Some(0));
        assert!(c.write_multiple);
        for bad in [
            &b"{"[..],
            br#"{"capabilities":1}"#,
            br#"{"capabilities":{"max_msg_fds":-1}}"#,
            br#"{"capabilities":{"max_data_xfer_size":0}}"#,
            br#"{"capabilities":{"twin_socket":{"supported":true}}}"#,
            br#"{"capabilities":{"write_multiple":"yes"}}"#,
        ] {
            assert!(
                matches!(parse_server_caps(bad), Err(ClientError::Protocol(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn options_json_round_trips_through_the_server_parser() {
        let o = ClientOptions {
            max_data_xfer_size: 4096,
            twin_socket: true,
            migration_pgsize: Some(4096),
            ..ClientOptions::default()
        };
        let c = crate::protocol::caps::parse_client(o.caps_json().as_bytes()).unwrap();
        assert_eq!(c.max_data_xfer_size, 4096);
        assert_eq!(c.max_msg_fds, 8);
        assert!(c.twin_socket && c.write_multiple);
        assert_eq!(c.migration_pgsize, Some(4096));
    }
}
