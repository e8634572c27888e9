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

mod memory;

pub use memory::{DmaBacking, DmaSpace, EventFd, GuestMemory};

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::device::dma_msg::{
    BITMAP_HEADER_SIZE, DMA_MAP_SIZE, DMA_UNMAP_ALL, DMA_UNMAP_GET_DIRTY_BITMAP, DMA_UNMAP_SIZE,
};
use crate::device::migration::{
    dirty_bitmap_size, DEVICE_FEATURE_HDR_SIZE, MIG_DATA_HDR_SIZE,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIGRATION,
    VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET,
};
use crate::error::Errno;
use crate::protocol::caps::ServerCaps;
use crate::protocol::{
    cmd, flags, Header, Wire, WireOut, DEFAULT_MAX_DATA_XFER_SIZE, DEVICE_INFO_SIZE,
    DMA_REGION_ACCESS_SIZE, HEADER_SIZE, IRQ_INFO_SIZE, IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE, IRQ_SET_SIZE, REGION_ACCESS_SIZE, REGION_INFO_CAP_SPARSE_MMAP,
    REGION_INFO_FLAG_CAPS, REGION_INFO_SIZE, REGION_IO_FDS_SIZE, SPARSE_MMAP_AREA_SIZE,
    SPARSE_MMAP_HDR_SIZE, SUB_REGION_IOEVENTFD_SIZE, VERSION_MAJOR, VERSION_MINOR,
    WRITE_MULTI_DATA_MAX, WRITE_MULTI_ENTRY_SIZE, WRITE_MULTI_MAX,
};
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

fn proto<T>(msg: impl Into<String>) -> Result<T> {
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
    fn caps_json(&self) -> String {
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

/// One message as received: header, body and the fds that came with it.
#[derive(Debug)]
pub struct RawMessage {
    /// The header as received.
    pub hdr: Header,
    /// The `msg_size - 16` bytes after the header.
    pub body: Vec<u8>,
    /// The fds passed with the message (owned; closed when dropped).
    pub fds: Vec<OwnedFd>,
}

/// `DEVICE_GET_INFO` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size of the reply.
    pub argsz: u32,
    /// `DEVICE_FLAGS_*` bits (PCI, reset supported).
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of interrupt indexes.
    pub num_irqs: u32,
}

/// `DEVICE_GET_REGION_INFO` reply, with its sparse-mmap capability and fd.
#[derive(Debug)]
pub struct RegionInfo {
    /// The size the server says the full reply needs.
    pub argsz: u32,
    /// `REGION_INFO_FLAG_*` bits.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability in the reply, 0 for none.
    pub cap_offset: u32,
    /// Region size in bytes.
    pub size: u64,
    /// Offset to map the region at in the fd.
    pub offset: u64,
    /// Mappable areas `(offset, size)` of the sparse-mmap capability, when
    /// the reply carried one.
    pub sparse_mmap: Option<Vec<(u64, u64)>>,
    /// The fd passed with the reply (the region's backing file).
    pub fd: Option<OwnedFd>,
}

/// One ioeventfd of a `DEVICE_GET_REGION_IO_FDS` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoEventFdInfo {
    /// Offset in the region of the watched access.
    pub gpa_offset: u64,
    /// Size of the watched access.
    pub size: u64,
    /// Index into [`RegionIoFds::fds`].
    pub fd_index: u32,
    /// `IO_FD_TYPE_IOEVENTFD` or `IO_FD_TYPE_IOEVENTFD_SHADOW`.
    pub kind: u32,
    /// Data-match flags.
    pub flags: u32,
    /// Index of the shadow memory fd, for shadow ioeventfds.
    pub shadow_fd_index: u32,
    /// Offset in the shadow memory.
    pub shadow_offset: u64,
    /// Value matched when data match is on.
    pub datamatch: u64,
}

/// `DEVICE_GET_REGION_IO_FDS` reply.
#[derive(Debug)]
pub struct RegionIoFds {
    /// The size the server says the full reply needs.
    pub argsz: u32,
    /// Region index.
    pub index: u32,
    /// The ioeventfds.
    pub entries: Vec<IoEventFdInfo>,
    /// The fds passed with the reply.
    pub fds: Vec<OwnedFd>,
}

/// `DEVICE_GET_IRQ_INFO` reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// `IRQ_INFO_*` bits.
    pub flags: u32,
    /// Interrupt index.
    pub index: u32,
    /// Number of vectors.
    pub count: u32,
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
enum Sock {
    Main,
    Twin,
}

/// Why reading a message failed, and whether the stream is out of step.
struct ReadFail {
    err: ClientError,
    desync: bool,
}

fn stream_conn(fd: OwnedFd, timeout: Duration) -> Result<Conn> {
    let s = UnixStream::from(fd);
    s.set_read_timeout(Some(timeout))
        .map_err(|e| ClientError::Io(e.into()))?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| ClientError::Io(e.into()))?;
    Ok(Conn::from_fd(OwnedFd::from(s)))
}

/// Reads one whole message, refusing bodies above `limit`.
fn read_msg(conn: &Conn, limit: usize) -> std::result::Result<RawMessage, ReadFail> {
    let rx = conn.recv_header(false).map_err(|e| {
        let err = io_err(e);
        // A timeout after poll said readable means a partial header.
        let desync = !matches!(err, ClientError::Disconnected);
        ReadFail { err, desync }
    })?;
    let hdr = rx.hdr;
    let Some(len) = hdr.body_len() else {
        return Err(ReadFail {
            err: ClientError::Protocol(format!(
                "message size {} below the header size",
                hdr.msg_size
            )),
            desync: true,
        });
    };
    if len > limit {
        return Err(ReadFail {
            err: ClientError::Protocol(format!("message body of {len} bytes exceeds {limit}")),
            desync: true,
        });
    }
    let mut body = vec![0u8; len];
    conn.recv_exact(&mut body).map_err(|e| ReadFail {
        err: io_err(e),
        desync: true,
    })?;
    if rx.fds_bad {
        return Err(ReadFail {
            err: ClientError::Protocol("truncated or malformed fd list".into()),
            desync: false,
        });
    }
    Ok(RawMessage {
        hdr,
        body,
        fds: rx.fds,
    })
}

/// Waits until one of `fds` is readable (or hung up); returns its position,
/// or `Timeout` at the deadline.
fn poll_any(fds: &[RawFd], deadline: Instant) -> Result<usize> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        let left = deadline
            .checked_duration_since(Instant::now())
            .ok_or(ClientError::Timeout)?;
        let ms =
            libc::c_int::try_from(left.as_millis().saturating_add(1)).unwrap_or(libc::c_int::MAX);
        // SAFETY: `p` is a live array of `p.len()` pollfds.
        let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
        if n < 0 {
            let e = Errno::last();
            if e.0 == libc::EINTR {
                continue;
            }
            return Err(ClientError::Io(e));
        }
        if let Some(i) = p.iter().position(|x| x.revents != 0) {
            return Ok(i);
        }
        if Instant::now() >= deadline {
            return Err(ClientError::Timeout);
        }
    }
}

/// Executes one server-to-client command and answers it (unless it asked
/// for no reply). Errors are only local send failures.
fn serve_command(
    conn: &Conn,
    msg: &RawMessage,
    backing: &dyn DmaBacking,
    max_xfer: usize,
) -> Result<()> {
    let hdr = &msg.hdr;
    let b = &msg.body[..];
    let res: std::result::Result<Vec<u8>, Errno> = (|| {
        let addr = b.u64_at(0)?;
        let count = b.u64_at(8)?;
        let count = usize::try_from(count).map_err(|_| Errno::EINVAL)?;
        if count > max_xfer {
            return Err(Errno::EINVAL);
        }
        let mut out = Vec::with_capacity(DMA_REGION_ACCESS_SIZE + count);
        out.put_u64(addr);
        out.put_u64(count as u64);
        match hdr.cmd {
            cmd::DMA_READ => {
                if b.len() != DMA_REGION_ACCESS_SIZE {
                    return Err(Errno::EINVAL);
                }
                out.resize(DMA_REGION_ACCESS_SIZE + count, 0);
                backing.dma_read(addr, &mut out[DMA_REGION_ACCESS_SIZE..])?;
            }
            cmd::DMA_WRITE => {
                let data = b.get(DMA_REGION_ACCESS_SIZE..).ok_or(Errno::EINVAL)?;
                if data.len() != count {
                    return Err(Errno::EINVAL);
                }
                backing.dma_write(addr, data)?;
            }
            _ => return Err(Errno::EINVAL),
        }
        Ok(out)
    })();
    if hdr.no_reply() {
        return Ok(());
    }
    let sent = match res {
        Ok(out) => conn.send(&hdr.reply(out.len(), 0), &[&out], &[]),
        Err(e) => conn.send(&hdr.reply(0, e.0), &[], &[]),
    };
    sent.map_err(io_err)
}

fn raw_fds<F: AsFd>(fds: &[F]) -> Vec<RawFd> {
    fds.iter().map(|f| f.as_fd().as_raw_fd()).collect()
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

    fn negotiate(conn: Conn, opts: ClientOptions) -> Result<Client> {
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
        for fd in
            std::iter::once(self.conn.as_raw_fd()).chain(self.twin.as_ref().map(|t| t.as_raw_fd()))
        {
            let tv = libc::timeval {
                tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
                tv_usec: timeout.subsec_micros() as libc::suseconds_t,
            };
            for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
                // SAFETY: setsockopt reads a live timeval of the stated size.
                let r = unsafe {
                    libc::setsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        opt,
                        &tv as *const libc::timeval as *const libc::c_void,
                        std::mem::size_of::<libc::timeval>() as libc::socklen_t,
                    )
                };
                if r != 0 {
                    return Err(ClientError::Io(Errno::last()));
                }
            }
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

    // ---- raw messages ------------------------------------------------------

    /// A fresh message id.
    pub fn next_msg_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    fn usable(&self) -> Result<()> {
        match &self.broken {
            Some(why) => proto(format!("connection out of step: {why}")),
            None => Ok(()),
        }
    }

    fn send_on_main(&mut self, hdr: &Header, parts: &[&[u8]], fds: &[RawFd]) -> Result<()> {
        self.usable()?;
        match self.conn.send(hdr, parts, fds) {
            Ok(()) => Ok(()),
            Err(e) => {
                let err = io_err(e);
                if matches!(err, ClientError::Timeout) {
                    self.broken = Some("send timed out".into());
                }
                Err(err)
            }
        }
    }

    /// Sends `hdr` and `body` as they are (the header is not adjusted), with
    /// `fds`: for tests of the server's handling of malformed requests.
    pub fn send_raw(&mut self, hdr: &Header, body: &[u8], fds: &[RawFd]) -> Result<()> {
        self.send_on_main(hdr, &[body], fds)
    }

    /// Waits for the next reply on the main socket, serving server requests
    /// meanwhile, and returns it whatever its id or error state.
    pub fn recv_reply(&mut self) -> Result<RawMessage> {
        let limit = self.reply_limit(0);
        self.next_reply(limit)
    }

    /// A body limit for replies: `extra` above the general allowance.
    fn reply_limit(&self, extra: usize) -> usize {
        self.opts
            .max_data_xfer_size
            .max(self.caps.max_data_xfer_size)
            .saturating_add(64 * 1024)
            .saturating_add(extra)
    }

    fn cmd_limit(&self) -> usize {
        DMA_REGION_ACCESS_SIZE.saturating_add(self.opts.max_data_xfer_size)
    }

    /// Reads one message from `which`, marking the stream broken when the
    /// failure leaves it out of step.
    fn read_from(&mut self, which: Sock, limit: usize) -> Result<RawMessage> {
        let conn = match which {
            Sock::Main => &self.conn,
            Sock::Twin => self.twin.as_ref().ok_or(ClientError::Disconnected)?,
        };
        match read_msg(conn, limit) {
            Ok(m) => Ok(m),
            Err(f) => {
                if f.desync {
                    self.broken = Some(f.err.to_string());
                }
                Err(f.err)
            }
        }
    }

    /// Serves one server command that arrived on `which`.
    fn serve(&mut self, which: Sock, msg: &RawMessage) -> Result<()> {
        let conn = match which {
            Sock::Main => &self.conn,
            Sock::Twin => self.twin.as_ref().ok_or(ClientError::Disconnected)?,
        };
        let backing: &dyn DmaBacking = match &self.backing {
            Some(b) => b.as_ref(),
            None => &self.space,
        };
        let r = serve_command(conn, msg, backing, self.opts.max_data_xfer_size);
        if r.is_ok() && matches!(msg.hdr.cmd, cmd::DMA_READ | cmd::DMA_WRITE) {
            self.dma_served += 1;
            if which == Sock::Twin {
                self.dma_served_twin += 1;
            }
        }
        r
    }

    /// Waits for one message that is not a server command, serving commands
    /// (on both sockets) as they come; each served command restarts the
    /// timeout.
    fn next_reply(&mut self, limit: usize) -> Result<RawMessage> {
        self.usable()?;
        let limit_main = limit.max(self.cmd_limit());
        let mut deadline = Instant::now() + self.opts.timeout;
        loop {
            let mut fds = vec![self.conn.as_raw_fd()];
            if let Some(t) = &self.twin {
                fds.push(t.as_raw_fd());
            }
            let which = if poll_any(&fds, deadline)? == 0 {
                Sock::Main
            } else {
                Sock::Twin
            };
            let msg = match which {
                Sock::Main => self.read_from(Sock::Main, limit_main)?,
                Sock::Twin => {
                    let l = self.cmd_limit();
                    match self.read_from(Sock::Twin, l) {
                        Ok(m) => m,
                        // The server may drop the twin socket; keep waiting
                        // on the main one.
                        Err(ClientError::Disconnected) => {
                            self.twin = None;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
            };
            if msg.hdr.msg_type() == flags::TYPE_COMMAND {
                self.serve(which, &msg)?;
                deadline = Instant::now() + self.opts.timeout;
                continue;
            }
            if which == Sock::Twin {
                return proto(format!(
                    "unexpected message type {} on the twin socket",
                    msg.hdr.msg_type()
                ));
            }
            if msg.body.len() > limit {
                return proto(format!(
                    "reply body of {} bytes exceeds {limit}",
                    msg.body.len()
                ));
            }
            return Ok(msg);
        }
    }

    /// Waits for the reply to request `id`, skipping late replies to
    /// requests that timed out.
    fn wait_reply(&mut self, id: u16, command: u16, limit: usize) -> Result<RawMessage> {
        loop {
            let msg = match self.next_reply(limit) {
                Ok(m) => m,
                Err(ClientError::Timeout) => {
                    if self.abandoned.len() >= MAX_ABANDONED {
                        self.abandoned.remove(0);
                    }
                    self.abandoned.push(id);
                    return Err(ClientError::Timeout);
                }
                Err(e) => return Err(e),
            };
            if msg.hdr.msg_id != id {
                if let Some(p) = self.abandoned.iter().position(|&a| a == msg.hdr.msg_id) {
                    self.abandoned.remove(p);
                    continue;
                }
                return proto(format!(
                    "reply id {:#x} while waiting for {id:#x}",
                    msg.hdr.msg_id
                ));
            }
            if msg.hdr.msg_type() != flags::TYPE_REPLY {
                return proto(format!(
                    "message type {} is not a reply",
                    msg.hdr.msg_type()
                ));
            }
            if msg.hdr.cmd != command {
                return proto(format!(
                    "reply for command {} to command {command}",
                    msg.hdr.cmd
                ));
            }
            if msg.hdr.flags & flags::ERROR != 0 {
                let e = msg.hdr.error_no;
                if e == 0 || e > i32::MAX as u32 {
                    return proto(format!("error reply with errno {e}"));
                }
                return Err(ClientError::Server {
                    cmd: command,
                    errno: Errno(e as i32),
                });
            }
            return Ok(msg);
        }
    }

    /// Sends a command and waits for its successful reply, whose body may
    /// not exceed `limit` bytes.
    fn request(
        &mut self,
        command: u16,
        parts: &[&[u8]],
        fds: &[RawFd],
        limit: usize,
    ) -> Result<RawMessage> {
        let id = self.next_msg_id();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let size = u32::try_from(HEADER_SIZE + len)
            .map_err(|_| ClientError::InvalidArgument("message too large".into()))?;
        let hdr = Header {
            msg_id: id,
            cmd: command,
            msg_size: size,
            flags: flags::TYPE_COMMAND,
            error_no: 0,
        };
        self.send_on_main(&hdr, parts, fds)?;
        self.wait_reply(id, command, limit)
    }

    /// Sends a command with `NO_REPLY`.
    fn post(&mut self, command: u16, parts: &[&[u8]], fds: &[RawFd]) -> Result<()> {
        let id = self.next_msg_id();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let size = u32::try_from(HEADER_SIZE + len)
            .map_err(|_| ClientError::InvalidArgument("message too large".into()))?;
        let hdr = Header {
            msg_id: id,
            cmd: command,
            msg_size: size,
            flags: flags::TYPE_COMMAND | flags::NO_REPLY,
            error_no: 0,
        };
        self.send_on_main(&hdr, parts, fds)
    }

    /// Serves the server's DMA requests until none arrives for `idle`;
    /// returns how many were served. A reply arriving meanwhile (to nothing
    /// outstanding) is a protocol error.
    pub fn serve_dma(&mut self, idle: Duration) -> Result<usize> {
        self.usable()?;
        let mut served = 0;
        loop {
            let mut fds = vec![self.conn.as_raw_fd()];
            if let Some(t) = &self.twin {
                fds.push(t.as_raw_fd());
            }
            let which = match poll_any(&fds, Instant::now() + idle) {
                Ok(0) => Sock::Main,
                Ok(_) => Sock::Twin,
                Err(ClientError::Timeout) => return Ok(served),
                Err(e) => return Err(e),
            };
            let l = self.cmd_limit();
            let msg = self.read_from(which, l)?;
            if msg.hdr.msg_type() != flags::TYPE_COMMAND {
                return proto(format!(
                    "unexpected message (cmd {}, id {:#x}) with no request outstanding",
                    msg.hdr.cmd, msg.hdr.msg_id
                ));
            }
            self.serve(which, &msg)?;
            served += 1;
        }
    }

    // ---- device information -------------------------------------------------

    /// `DEVICE_GET_INFO`.
    pub fn device_info(&mut self) -> Result<DeviceInfo> {
        let mut req = Vec::with_capacity(DEVICE_INFO_SIZE);
        req.put_u32(DEVICE_INFO_SIZE as u32);
        req.put_u32(0);
        req.put_u32(0);
        req.put_u32(0);
        let rep = self.request(cmd::DEVICE_GET_INFO, &[&req], &[], DEVICE_INFO_SIZE)?;
        let b = &rep.body[..];
        let f = |o| b.u32_at(o).map_err(|_| short("DEVICE_GET_INFO"));
        Ok(DeviceInfo {
            argsz: f(0)?,
            flags: f(4)?,
            num_regions: f(8)?,
            num_irqs: f(12)?,
        })
    }

    /// `DEVICE_GET_REGION_INFO`, asking again with a larger `argsz` when the
    /// server needs one for the capabilities.
    pub fn region_info(&mut self, index: u32) -> Result<RegionInfo> {
        let mut argsz = REGION_INFO_SIZE as u32;
        for _ in 0..3 {
            let info = self.region_info_argsz(index, argsz)?;
            if info.argsz <= argsz {
                return Ok(info);
            }
            if info.argsz > MAX_INFO_ARGSZ {
                return proto(format!("region info argsz {} is unreasonable", info.argsz));
            }
            argsz = info.argsz;
        }
        proto("server keeps asking for a larger region info argsz")
    }

    /// `DEVICE_GET_REGION_INFO` with the given `argsz`, parsed without
    /// asking again.
    pub fn region_info_argsz(&mut self, index: u32, argsz: u32) -> Result<RegionInfo> {
        let mut req = Vec::with_capacity(REGION_INFO_SIZE);
        req.put_u32(argsz);
        req.put_u32(0);
        req.put_u32(index);
        req.put_u32(0);
        req.put_u64(0);
        req.put_u64(0);
        let limit = (argsz as usize).max(REGION_INFO_SIZE);
        let rep = self.request(cmd::DEVICE_GET_REGION_INFO, &[&req], &[], limit)?;
        let b = &rep.body[..];
        let f32 = |o| b.u32_at(o).map_err(|_| short("DEVICE_GET_REGION_INFO"));
        let f64 = |o| b.u64_at(o).map_err(|_| short("DEVICE_GET_REGION_INFO"));
        let mut info = RegionInfo {
            argsz: f32(0)?,
            flags: f32(4)?,
            index: f32(8)?,
            cap_offset: f32(12)?,
            size: f64(16)?,
            offset: f64(24)?,
            sparse_mmap: None,
            fd: None,
        };
        if info.index != index {
            return proto(format!(
                "region info for index {} when {index} was asked",
                info.index
            ));
        }
        if info.flags & REGION_INFO_FLAG_CAPS != 0 && info.argsz <= argsz {
            info.sparse_mmap = parse_region_caps(b, info.cap_offset)?;
        }
        info.fd = rep.fds.into_iter().next();
        Ok(info)
    }

    /// `DEVICE_GET_REGION_IO_FDS`: the region's ioeventfds and their fds.
    pub fn region_io_fds(&mut self, index: u32) -> Result<RegionIoFds> {
        let first = self.region_io_fds_argsz(index, REGION_IO_FDS_SIZE as u32)?;
        if first.1 == 0 {
            return Ok(first.0);
        }
        let need = (first.1 as usize)
            .checked_mul(SUB_REGION_IOEVENTFD_SIZE)
            .and_then(|n| n.checked_add(REGION_IO_FDS_SIZE))
            .and_then(|n| u32::try_from(n).ok())
            .filter(|&n| n <= MAX_INFO_ARGSZ)
            .ok_or_else(|| {
                ClientError::Protocol(format!("{} ioeventfds is unreasonable", first.1))
            })?;
        let (r, count) = self.region_io_fds_argsz(index, need)?;
        if r.entries.len() != count as usize {
            return proto(format!(
                "io fds reply lists {} of {count} entries",
                r.entries.len()
            ));
        }
        Ok(r)
    }

    /// `DEVICE_GET_REGION_IO_FDS` with the given `argsz`; also returns the
    /// total count the server reported.
    pub fn region_io_fds_argsz(&mut self, index: u32, argsz: u32) -> Result<(RegionIoFds, u32)> {
        let mut req = Vec::with_capacity(REGION_IO_FDS_SIZE);
        req.put_u32(argsz);
        req.put_u32(0);
        req.put_u32(index);
        req.put_u32(0);
        let limit = (argsz as usize).max(REGION_IO_FDS_SIZE);
        let rep = self.request(cmd::DEVICE_GET_REGION_IO_FDS, &[&req], &[], limit)?;
        let b = &rep.body[..];
        let f32 = |o| b.u32_at(o).map_err(|_| short("DEVICE_GET_REGION_IO_FDS"));
        let rargsz = f32(0)?;
        let rindex = f32(8)?;
        let count = f32(12)?;
        if rindex != index {
            return proto(format!("io fds for index {rindex} when {index} was asked"));
        }
        let rest = b.get(REGION_IO_FDS_SIZE..).unwrap_or(&[]);
        let mut entries = Vec::new();
        if !rest.is_empty() {
            if rest.len() % SUB_REGION_IOEVENTFD_SIZE != 0
                || rest.len() / SUB_REGION_IOEVENTFD_SIZE != count as usize
            {
                return proto(format!(
                    "{} bytes of ioeventfd entries for a count of {count}",
                    rest.len()
                ));
            }
            for e in rest.chunks_exact(SUB_REGION_IOEVENTFD_SIZE) {
                let g32 = |o| e.u32_at(o).map_err(|_| short("ioeventfd entry"));
                let g64 = |o| e.u64_at(o).map_err(|_| short("ioeventfd entry"));
                entries.push(IoEventFdInfo {
                    gpa_offset: g64(0)?,
                    size: g64(8)?,
                    fd_index: g32(16)?,
                    kind: g32(20)?,
                    flags: g32(24)?,
                    shadow_fd_index: g32(28)?,
                    shadow_offset: g64(32)?,
                    datamatch: g64(40)?,
                });
            }
        }
        Ok((
            RegionIoFds {
                argsz: rargsz,
                index,
                entries,
                fds: rep.fds,
            },
            count,
        ))
    }

    /// `DEVICE_GET_IRQ_INFO`.
    pub fn irq_info(&mut self, index: u32) -> Result<IrqInfo> {
        let mut req = Vec::with_capacity(IRQ_INFO_SIZE);
        req.put_u32(IRQ_INFO_SIZE as u32);
        req.put_u32(0);
        req.put_u32(index);
        req.put_u32(0);
        let rep = self.request(cmd::DEVICE_GET_IRQ_INFO, &[&req], &[], IRQ_INFO_SIZE)?;
        let b = &rep.body[..];
        let f = |o| b.u32_at(o).map_err(|_| short("DEVICE_GET_IRQ_INFO"));
        let info = IrqInfo {
            flags: f(4)?,
            index: f(8)?,
            count: f(12)?,
        };
        if info.index != index {
            return proto(format!(
                "irq info for index {} when {index} was asked",
                info.index
            ));
        }
        Ok(info)
    }

    // ---- region access --------------------------------------------------------

    fn xfer_chunk(&self) -> usize {
        self.caps.max_data_xfer_size.max(1)
    }

    /// Most data bytes in one request we send: the server's limit, and
    /// what arrives whole at a server reading it with one `recv()`.
    fn send_chunk(&self) -> usize {
        self.xfer_chunk().min(self.opts.max_send_data).max(1)
    }

    fn region_access_head(index: u32, offset: u64, count: usize) -> Result<Vec<u8>> {
        let count = u32::try_from(count)
            .map_err(|_| ClientError::InvalidArgument("access too large".into()))?;
        let mut h = Vec::with_capacity(REGION_ACCESS_SIZE);
        h.put_u64(offset);
        h.put_u32(index);
        h.put_u32(count);
        Ok(h)
    }

    /// `REGION_READ` of `len` bytes at `offset`, split by the server's
    /// `max_data_xfer_size`. A zero length sends nothing.
    pub fn region_read(&mut self, index: u32, offset: u64, len: usize) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        let chunk = self.xfer_chunk();
        while out.len() < len {
            let n = (len - out.len()).min(chunk);
            let off = offset
                .checked_add(out.len() as u64)
                .ok_or_else(|| ClientError::InvalidArgument("offset overflows".into()))?;
            let head = Client::region_access_head(index, off, n)?;
            let rep = self.request(cmd::REGION_READ, &[&head], &[], REGION_ACCESS_SIZE + n)?;
            let b = &rep.body[..];
            let got_off = b.u64_at(0).map_err(|_| short("REGION_READ"))?;
            let got_idx = b.u32_at(8).map_err(|_| short("REGION_READ"))?;
            let got_n = b.u32_at(12).map_err(|_| short("REGION_READ"))? as usize;
            if got_off != off || got_idx != index || got_n != n || b.len() != REGION_ACCESS_SIZE + n
            {
                return proto(format!(
                    "REGION_READ reply ({got_off:#x}, {got_idx}, {got_n}, {} bytes) for ({off:#x}, {index}, {n})",
                    b.len()
                ));
            }
            out.extend_from_slice(&b[REGION_ACCESS_SIZE..]);
        }
        Ok(out)
    }

    /// `REGION_WRITE` of `data` at `offset`, split by the server's
    /// `max_data_xfer_size` and our `max_send_data`. Empty data sends
    /// nothing.
    pub fn region_write(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.region_write_impl(index, offset, data, false)
    }

    /// `REGION_WRITE` with `NO_REPLY`: returns once the request is sent.
    pub fn region_write_posted(&mut self, index: u32, offset: u64, data: &[u8]) -> Result<()> {
        self.region_write_impl(index, offset, data, true)
    }

    fn region_write_impl(
        &mut self,
        index: u32,
        offset: u64,
        data: &[u8],
        posted: bool,
    ) -> Result<()> {
        let chunk = self.send_chunk();
        let mut done = 0;
        while done < data.len() {
            let n = (data.len() - done).min(chunk);
            let off = offset
                .checked_add(done as u64)
                .ok_or_else(|| ClientError::InvalidArgument("offset overflows".into()))?;
            let head = Client::region_access_head(index, off, n)?;
            let part = &data[done..done + n];
            if posted {
                self.post(cmd::REGION_WRITE, &[&head, part], &[])?;
            } else {
                let rep =
                    self.request(cmd::REGION_WRITE, &[&head, part], &[], REGION_ACCESS_SIZE)?;
                let b = &rep.body[..];
                let ok = b.u64_at(0).ok() == Some(off)
                    && b.u32_at(8).ok() == Some(index)
                    && b.u32_at(12).ok() == Some(n as u32);
                if !ok {
                    return proto("REGION_WRITE reply does not echo the request");
                }
            }
            done += n;
        }
        Ok(())
    }

    /// `REGION_WRITE_MULTI`: several small writes `(index, offset, data)` in
    /// one message (split every `WRITE_MULTI_MAX` entries). Each data must be
    /// at most 8 bytes. Needs the server's `write_multiple`.
    pub fn region_write_multi(&mut self, writes: &[(u32, u64, &[u8])]) -> Result<()> {
        if !self.caps.write_multiple {
            return Err(ClientError::Unsupported("write_multiple".into()));
        }
        if writes.is_empty() {
            return invalid("no writes");
        }
        for batch in writes.chunks(WRITE_MULTI_MAX) {
            let mut body = Vec::with_capacity(8 + batch.len() * WRITE_MULTI_ENTRY_SIZE);
            body.put_u64(batch.len() as u64);
            for (index, offset, data) in batch {
                if data.len() > WRITE_MULTI_DATA_MAX {
                    return invalid(format!(
                        "write of {} bytes in REGION_WRITE_MULTI",
                        data.len()
                    ));
                }
                body.put_u64(*offset);
                body.put_u32(*index);
                body.put_u32(data.len() as u32);
                let mut d = [0u8; WRITE_MULTI_DATA_MAX];
                d[..data.len()].copy_from_slice(data);
                body.extend_from_slice(&d);
            }
            self.request(cmd::REGION_WRITE_MULTI, &[&body], &[], self.reply_limit(0))?;
        }
        Ok(())
    }

    // ---- DMA ------------------------------------------------------------------

    /// `DMA_MAP` of `[iova, iova + size)`, backed by `fd` at `offset` when
    /// given, with `flags` (`DMA_REGION_READ`/`WRITE`/`MMAP`/`FILE_IO` of
    /// `device::dma_msg`).
    pub fn dma_map(
        &mut self,
        iova: u64,
        size: u64,
        fd: Option<(BorrowedFd<'_>, u64)>,
        flags: u32,
    ) -> Result<()> {
        let mut body = Vec::with_capacity(DMA_MAP_SIZE);
        body.put_u32(DMA_MAP_SIZE as u32);
        body.put_u32(flags);
        body.put_u64(fd.map_or(0, |(_, o)| o));
        body.put_u64(iova);
        body.put_u64(size);
        let fds: Vec<RawFd> = fd.iter().map(|(f, _)| f.as_raw_fd()).collect();
        self.request(cmd::DMA_MAP, &[&body], &fds, self.reply_limit(0))?;
        Ok(())
    }

    /// Maps all of `mem` at `iova` (with its fd when `with_fd`, else
    /// reachable only through DMA messages) and serves the server's DMA
    /// messages for it from then on.
    pub fn dma_map_memory(
        &mut self,
        iova: u64,
        mem: &Arc<GuestMemory>,
        with_fd: bool,
        flags: u32,
    ) -> Result<()> {
        let len = mem.len() as u64;
        let mut staged = self.space.clone();
        staged
            .insert(iova, len, mem.clone(), 0)
            .map_err(|_| ClientError::InvalidArgument("overlaps a mapped range".into()))?;
        let fd = with_fd.then(|| (mem.fd(), 0));
        self.dma_map(iova, len, fd, flags)?;
        self.space = staged;
        Ok(())
    }

    /// `DMA_UNMAP` with `flags` (0 or `DMA_UNMAP_ALL`); forgets the client
    /// memory of the range on success.
    pub fn dma_unmap(&mut self, iova: u64, size: u64, flags: u32) -> Result<()> {
        let mut body = Vec::with_capacity(DMA_UNMAP_SIZE);
        body.put_u32(DMA_UNMAP_SIZE as u32);
        body.put_u32(flags);
        body.put_u64(iova);
        body.put_u64(size);
        let rep = self.request(cmd::DMA_UNMAP, &[&body], &[], self.reply_limit(0))?;
        if rep.body.get(8..DMA_UNMAP_SIZE) != body.get(8..DMA_UNMAP_SIZE) {
            return proto("DMA_UNMAP reply does not echo the request");
        }
        if flags & DMA_UNMAP_ALL != 0 {
            self.space.clear();
        } else {
            self.space.remove(iova, size);
        }
        Ok(())
    }

    /// `DMA_UNMAP` of every mapping.
    pub fn dma_unmap_all(&mut self) -> Result<()> {
        self.dma_unmap(0, 0, DMA_UNMAP_ALL)
    }

    /// `DMA_UNMAP` with `GET_DIRTY_BITMAP`: unmaps and returns the region's
    /// dirty bitmap at `pgsize` granularity.
    pub fn dma_unmap_dirty(&mut self, iova: u64, size: u64, pgsize: u64) -> Result<Vec<u8>> {
        let bm = dirty_bitmap_size(size, pgsize)
            .map_err(|_| ClientError::InvalidArgument("bad bitmap geometry".into()))?;
        let bm = usize::try_from(bm)
            .map_err(|_| ClientError::InvalidArgument("bitmap too large".into()))?;
        let total = DMA_UNMAP_SIZE + BITMAP_HEADER_SIZE + bm;
        let argsz = u32::try_from(total)
            .map_err(|_| ClientError::InvalidArgument("bitmap too large".into()))?;
        let mut body = Vec::with_capacity(DMA_UNMAP_SIZE + BITMAP_HEADER_SIZE);
        body.put_u32(argsz);
        body.put_u32(DMA_UNMAP_GET_DIRTY_BITMAP);
        body.put_u64(iova);
        body.put_u64(size);
        body.put_u64(pgsize);
        body.put_u64(bm as u64);
        let rep = self.request(cmd::DMA_UNMAP, &[&body], &[], total)?;
        if rep.body.len() != total
            || rep
                .body
                .get(..DMA_UNMAP_SIZE + BITMAP_HEADER_SIZE)
                .map(|h| &h[8..])
                != Some(&body[8..])
        {
            return proto("DMA_UNMAP dirty reply has the wrong shape");
        }
        self.space.remove(iova, size);
        Ok(rep.body[DMA_UNMAP_SIZE + BITMAP_HEADER_SIZE..].to_vec())
    }

    // ---- interrupts -------------------------------------------------------------

    /// `DEVICE_SET_IRQS` with raw fields and data; `argsz` is computed.
    pub fn set_irqs_raw(
        &mut self,
        flags: u32,
        index: u32,
        start: u32,
        count: u32,
        data: &[u8],
        fds: &[RawFd],
    ) -> Result<()> {
        let argsz = u32::try_from(IRQ_SET_SIZE + data.len())
            .map_err(|_| ClientError::InvalidArgument("data too large".into()))?;
        let mut body = Vec::with_capacity(IRQ_SET_SIZE + data.len());
        body.put_u32(argsz);
        body.put_u32(flags);
        body.put_u32(index);
        body.put_u32(start);
        body.put_u32(count);
        body.extend_from_slice(data);
        self.request(cmd::DEVICE_SET_IRQS, &[&body], fds, self.reply_limit(0))?;
        Ok(())
    }

    /// Hands eventfds for vectors `start..start + fds.len()` of `index` to
    /// the server (ACTION_TRIGGER, DATA_EVENTFD), in as many messages as the
    /// server's `max_msg_fds` requires.
    pub fn set_irqs<F: AsFd>(&mut self, index: u32, start: u32, eventfds: &[F]) -> Result<()> {
        if eventfds.is_empty() {
            return invalid("no eventfds (use set_irqs_none or irq_disable)");
        }
        let raw = raw_fds(eventfds);
        let per = self.caps.max_msg_fds.max(1);
        for (i, batch) in raw.chunks(per).enumerate() {
            let first = u32::try_from(i * per)
                .ok()
                .and_then(|o| start.checked_add(o))
                .ok_or_else(|| ClientError::InvalidArgument("vector range overflows".into()))?;
            self.set_irqs_raw(
                IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
                index,
                first,
                batch.len() as u32,
                &[],
                batch,
            )?;
        }
        Ok(())
    }

    /// ACTION_TRIGGER with DATA_NONE: `count` 0 (with `start` 0) disables
    /// every vector of `index`; otherwise the server signals the vectors.
    pub fn set_irqs_none(&mut self, index: u32, start: u32, count: u32) -> Result<()> {
        self.set_irqs_raw(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE,
            index,
            start,
            count,
            &[],
            &[],
        )
    }

    /// ACTION_TRIGGER with DATA_BOOL: the server signals the vectors whose
    /// flag is set.
    pub fn set_irqs_bool(&mut self, index: u32, start: u32, which: &[bool]) -> Result<()> {
        let data: Vec<u8> = which.iter().map(|&b| u8::from(b)).collect();
        let count = u32::try_from(data.len())
            .map_err(|_| ClientError::InvalidArgument("too many vectors".into()))?;
        self.set_irqs_raw(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_BOOL,
            index,
            start,
            count,
            &data,
            &[],
        )
    }

    /// Takes the eventfds of vectors `start..start + count` of `index` away
    /// (DATA_EVENTFD with no fds).
    pub fn irq_disable(&mut self, index: u32, start: u32, count: u32) -> Result<()> {
        self.set_irqs_raw(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
            index,
            start,
            count,
            &[],
            &[],
        )
    }

    /// Masks vectors `start..start + count` of `index`.
    pub fn irq_mask(&mut self, index: u32, start: u32, count: u32) -> Result<()> {
        self.set_irqs_raw(
            IRQ_SET_ACTION_MASK | IRQ_SET_DATA_NONE,
            index,
            start,
            count,
            &[],
            &[],
        )
    }

    /// Unmasks vectors `start..start + count` of `index`.
    pub fn irq_unmask(&mut self, index: u32, start: u32, count: u32) -> Result<()> {
        self.set_irqs_raw(
            IRQ_SET_ACTION_UNMASK | IRQ_SET_DATA_NONE,
            index,
            start,
            count,
            &[],
            &[],
        )
    }

    /// `DEVICE_RESET`.
    pub fn reset(&mut self) -> Result<()> {
        self.request(cmd::DEVICE_RESET, &[], &[], self.reply_limit(0))?;
        Ok(())
    }

    // ---- migration ----------------------------------------------------------------

    /// `DEVICE_FEATURE` with an explicit `argsz`; returns the whole reply
    /// body (its 8-byte `argsz`/`flags` header included).
    pub fn device_feature_raw(
        &mut self,
        argsz: u32,
        feature_flags: u32,
        data: &[u8],
    ) -> Result<Vec<u8>> {
        let mut head = Vec::with_capacity(DEVICE_FEATURE_HDR_SIZE);
        head.put_u32(argsz);
        head.put_u32(feature_flags);
        let limit = (argsz as usize).max(DEVICE_FEATURE_HDR_SIZE + data.len());
        let rep = self.request(cmd::DEVICE_FEATURE, &[&head, data], &[], limit)?;
        if rep.body.len() < DEVICE_FEATURE_HDR_SIZE {
            return Err(short("DEVICE_FEATURE"));
        }
        Ok(rep.body)
    }

    /// `DEVICE_FEATURE` with `flags` (operation | feature index) and `data`;
    /// returns the reply's data (after its 8-byte header). `argsz` covers the
    /// request and at least 8 bytes of reply data.
    pub fn device_feature(&mut self, feature_flags: u32, data: &[u8]) -> Result<Vec<u8>> {
        let argsz = DEVICE_FEATURE_HDR_SIZE + data.len().max(8);
        let argsz = u32::try_from(argsz)
            .map_err(|_| ClientError::InvalidArgument("data too large".into()))?;
        let mut b = self.device_feature_raw(argsz, feature_flags, data)?;
        Ok(b.split_off(DEVICE_FEATURE_HDR_SIZE))
    }

    /// The device's migration capability flags (`VFIO_MIGRATION_*`).
    pub fn migration_flags(&mut self) -> Result<u64> {
        let d =
            self.device_feature(VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION, &[])?;
        d[..].u64_at(0).map_err(|_| short("migration flags"))
    }

    /// The device's migration state (`VFIO_USER_DEVICE_STATE_*`).
    pub fn mig_state(&mut self) -> Result<u32> {
        let d = self.device_feature(
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &[],
        )?;
        d[..].u32_at(0).map_err(|_| short("migration state"))
    }

    /// Moves the device to migration state `state`.
    pub fn set_mig_state(&mut self, state: u32) -> Result<()> {
        let mut data = Vec::with_capacity(8);
        data.put_u32(state);
        data.put_u32(0);
        self.device_feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            &data,
        )?;
        Ok(())
    }

    /// `MIG_DATA_READ` of at most `max` bytes (capped by the negotiated
    /// transfer sizes); an empty result means the device has no more data.
    pub fn mig_data_read(&mut self, max: usize) -> Result<Vec<u8>> {
        let size = max
            .min(self.opts.max_data_xfer_size)
            .min(self.caps.max_data_xfer_size);
        let size32 = u32::try_from(size)
            .map_err(|_| ClientError::InvalidArgument("size too large".into()))?;
        let mut req = Vec::with_capacity(MIG_DATA_HDR_SIZE);
        req.put_u32(size32.saturating_add(MIG_DATA_HDR_SIZE as u32));
        req.put_u32(size32);
        let rep = self.request(cmd::MIG_DATA_READ, &[&req], &[], MIG_DATA_HDR_SIZE + size)?;
        let b = &rep.body[..];
        let n = b.u32_at(4).map_err(|_| short("MIG_DATA_READ"))? as usize;
        if n > size {
            return proto(format!("MIG_DATA_READ returned {n} bytes for {size} asked"));
        }
        let data = b
            .get(MIG_DATA_HDR_SIZE..MIG_DATA_HDR_SIZE + n)
            .ok_or_else(|| short("MIG_DATA_READ"))?;
        Ok(data.to_vec())
    }

    /// Reads migration data in `chunk`-sized requests until the device has
    /// no more.
    pub fn mig_data_read_all(&mut self, chunk: usize) -> Result<Vec<u8>> {
        if chunk == 0 {
            return invalid("zero chunk");
        }
        let mut all = Vec::new();
        loop {
            let d = self.mig_data_read(chunk)?;
            if d.is_empty() {
                return Ok(all);
            }
            all.extend_from_slice(&d);
        }
    }

    /// `MIG_DATA_WRITE` of `data`, split by the smaller of the two
    /// negotiated transfer sizes (servers check migration data against the
    /// client's `max_data_xfer_size`, as upstream does) and by our
    /// `max_send_data`.
    pub fn mig_data_write(&mut self, data: &[u8]) -> Result<()> {
        let chunk = self.send_chunk().min(self.opts.max_data_xfer_size).max(1);
        for part in data.chunks(chunk) {
            let n = u32::try_from(part.len())
                .map_err(|_| ClientError::InvalidArgument("chunk too large".into()))?;
            let mut req = Vec::with_capacity(MIG_DATA_HDR_SIZE);
            req.put_u32(n.saturating_add(MIG_DATA_HDR_SIZE as u32));
            req.put_u32(n);
            self.request(cmd::MIG_DATA_WRITE, &[&req, part], &[], self.reply_limit(0))?;
        }
        Ok(())
    }

    /// Starts dirty-page logging at `page_size` over `ranges` `(iova, len)`.
    pub fn dma_logging_start(&mut self, page_size: u64, ranges: &[(u64, u64)]) -> Result<()> {
        let n = u32::try_from(ranges.len())
            .map_err(|_| ClientError::InvalidArgument("too many ranges".into()))?;
        let mut data = Vec::with_capacity(16 + ranges.len() * 16);
        data.put_u64(page_size);
        data.put_u32(n);
        data.put_u32(0);
        for &(iova, len) in ranges {
            data.put_u64(iova);
            data.put_u64(len);
        }
        self.device_feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            &data,
        )?;
        Ok(())
    }

    /// Stops dirty-page logging.
    pub fn dma_logging_stop(&mut self) -> Result<()> {
        self.device_feature(
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
            &[],
        )?;
        Ok(())
    }

    /// Reports (and clears) the dirty bitmap of `[iova, iova + len)` at
    /// `page_size` granularity: one bit per page, in 64-bit words.
    pub fn dma_logging_report(&mut self, iova: u64, len: u64, page_size: u64) -> Result<Vec<u8>> {
        let bm = dirty_bitmap_size(len, page_size)
            .map_err(|_| ClientError::InvalidArgument("bad bitmap geometry".into()))?;
        let total = u64::try_from(DEVICE_FEATURE_HDR_SIZE + 24)
            .ok()
            .and_then(|h| h.checked_add(bm))
            .and_then(|t| u32::try_from(t).ok())
            .ok_or_else(|| ClientError::InvalidArgument("bitmap too large".into()))?;
        let mut data = Vec::with_capacity(24);
        data.put_u64(iova);
        data.put_u64(len);
        data.put_u64(page_size);
        let b = self.device_feature_raw(
            total,
            VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            &data,
        )?;
        let start = DEVICE_FEATURE_HDR_SIZE + 24;
        if b.len() != total as usize || b.get(DEVICE_FEATURE_HDR_SIZE..start) != Some(&data[..]) {
            return proto("DMA_LOGGING_REPORT reply has the wrong shape");
        }
        Ok(b[start..].to_vec())
    }
}

/// Walks the capability chain of a region-info reply; returns the sparse
/// mmap areas if the chain has that capability.
fn parse_region_caps(b: &[u8], first: u32) -> Result<Option<Vec<(u64, u64)>>> {
    let mut off = first as usize;
    let mut areas = None;
    // Each capability must lie after the previous one, which bounds the walk.
    let mut min = REGION_INFO_SIZE;
    while off != 0 {
        if off < min {
            return proto(format!("capability at {off} overlaps what precedes it"));
        }
        let id = b.u16_at(off).map_err(|_| short("region capability"))?;
        let next = b.u32_at(off + 4).map_err(|_| short("region capability"))? as usize;
        if id == REGION_INFO_CAP_SPARSE_MMAP {
            let nr = b
                .u32_at(off + 8)
                .map_err(|_| short("sparse mmap capability"))? as usize;
            let mut v = Vec::new();
            for i in 0..nr {
                let a = i
                    .checked_mul(SPARSE_MMAP_AREA_SIZE)
                    .and_then(|x| x.checked_add(off + SPARSE_MMAP_HDR_SIZE))
                    .ok_or_else(|| short("sparse mmap capability"))?;
                let o = b.u64_at(a).map_err(|_| short("sparse mmap area"))?;
                let s = b.u64_at(a + 8).map_err(|_| short("sparse mmap area"))?;
                v.push((o, s));
            }
            areas = Some(v);
        }
        min = off + 8;
        off = next;
    }
    Ok(areas)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::socketpair;

    #[test]
    fn client_can_move_to_another_thread() {
        fn assert_send<T: Send>() {}
        assert_send::<Client>();
        assert_send::<ClientError>();
    }

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

    #[test]
    fn region_caps_walk_is_bounded() {
        let mut b = vec![0u8; 32];
        b.put_u16(REGION_INFO_CAP_SPARSE_MMAP);
        b.put_u16(1);
        b.put_u32(0);
        b.put_u32(1);
        b.put_u32(0);
        b.put_u64(0x1000);
        b.put_u64(0x2000);
        assert_eq!(
            parse_region_caps(&b, 32).unwrap(),
            Some(vec![(0x1000, 0x2000)])
        );
        // A chain pointing back at itself is refused, not looped on.
        b[36..40].copy_from_slice(&32u32.to_le_bytes());
        assert!(parse_region_caps(&b, 32).is_err());
        // Areas running past the reply.
        let mut c = b.clone();
        c[36..40].copy_from_slice(&0u32.to_le_bytes());
        c[40..44].copy_from_slice(&9u32.to_le_bytes());
        assert!(parse_region_caps(&c, 32).is_err());
        assert!(parse_region_caps(&b, 8).is_err());
    }

    /// A fake server on a socketpair, scripted per test.
    fn fake_server(
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

    fn recv(conn: &Conn) -> (Header, Vec<u8>) {
        let rx = conn.recv_header(false).unwrap();
        let mut body = vec![0u8; rx.hdr.body_len().unwrap()];
        conn.recv_exact(&mut body).unwrap();
        (rx.hdr, body)
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run sendmsg/recvmsg with fds")]
    fn misbehaving_server_gives_errors_not_panics() {
        let (mut c, t) = fake_server(|conn| {
            // 1: a reply with the wrong id.
            let (h, _) = recv(&conn);
            let mut bad = h.reply(0, 0);
            bad.msg_id = bad.msg_id.wrapping_add(7);
            conn.send(&bad, &[], &[]).unwrap();
            // 2: a short DEVICE_GET_INFO reply.
            let (h, _) = recv(&conn);
            conn.send(&h.reply(4, 0), &[&[16, 0, 0, 0]], &[]).unwrap();
            // 3: an error reply.
            let (h, _) = recv(&conn);
            conn.send(&h.reply(0, libc::EBUSY), &[], &[]).unwrap();
            // 4: silence, then a late reply, then the reply to 5.
            let (h4, _) = recv(&conn);
            let (h5, _) = recv(&conn);
            conn.send(&h4.reply(0, 0), &[], &[]).unwrap();
            conn.send(&h5.reply(0, 0), &[], &[]).unwrap();
            // 6: a header claiming less than itself.
            let (h, _) = recv(&conn);
            let mut bad = h.reply(0, 0);
            bad.msg_size = 3;
            conn.send(&bad, &[], &[]).unwrap();
            // Keep the socket open until the client is done.
            let _ = conn.recv_header(false);
        });
        assert!(matches!(c.reset(), Err(ClientError::Protocol(_))));
        assert!(matches!(c.device_info(), Err(ClientError::Protocol(_))));
        let e = c.reset().unwrap_err();
        assert_eq!(e.server_errno(), Some(Errno::EBUSY));
        assert!(matches!(c.reset(), Err(ClientError::Timeout)));
        // The late reply to the timed-out request is skipped.
        c.reset().unwrap();
        assert!(matches!(c.reset(), Err(ClientError::Protocol(_))));
        // The stream is now out of step: every later call says so.
        assert!(matches!(c.reset(), Err(ClientError::Protocol(_))));
        drop(c);
        t.join().unwrap();
    }

    #[test]
    #[cfg_attr(miri, ignore = "Miri cannot run sendmsg/recvmsg with fds")]
    fn serves_dma_requests_while_waiting_for_a_reply() {
        let (mut c, t) = fake_server(|conn| {
            let (h, body) = recv(&conn);
            assert_eq!(h.cmd, cmd::REGION_WRITE);
            // Ask the client to read 4 bytes at 0x1002, then to write.
            let mut q = Vec::new();
            q.put_u64(0x1002);
            q.put_u64(4);
            let rh = Header {
                msg_id: 100,
                cmd: cmd::DMA_READ,
                msg_size: 32,
                flags: 0,
                error_no: 0,
            };
            conn.send(&rh, &[&q], &[]).unwrap();
            let (a, data) = recv(&conn);
            assert_eq!((a.msg_id, a.msg_type()), (100, flags::TYPE_REPLY));
            assert_eq!(&data[16..], b"cdef");
            let mut w = Vec::new();
            w.put_u64(0x1000);
            w.put_u64(2);
            w.extend_from_slice(b"XY");
            let wh = Header {
                msg_id: 101,
                cmd: cmd::DMA_WRITE,
                msg_size: 34,
                flags: 0,
                error_no: 0,
            };
            conn.send(&wh, &[&w], &[]).unwrap();
            let (a, data) = recv(&conn);
            assert_eq!((a.msg_id, a.flags & flags::ERROR, data.len()), (101, 0, 16));
            // Outside the memory: an error reply.
            let mut q = Vec::new();
            q.put_u64(0x9000);
            q.put_u64(4);
            let rh = Header {
                msg_id: 102,
                cmd: cmd::DMA_READ,
                msg_size: 32,
                flags: 0,
                error_no: 0,
            };
            conn.send(&rh, &[&q], &[]).unwrap();
            let (a, _) = recv(&conn);
            assert_eq!(a.error_no, libc::EFAULT as u32);
            conn.send(&h.reply(16, 0), &[&body[..16]], &[]).unwrap();
            let _ = conn.recv_header(false);
        });
        let mem = Arc::new(GuestMemory::new(4096).unwrap());
        mem.write(0, b"abcdefgh").unwrap();
        c.dma_space_mut()
            .insert(0x1000, 4096, mem.clone(), 0)
            .unwrap();
        c.region_write(0, 0, b"go").unwrap();
        assert_eq!(mem.read_vec(0, 4).unwrap(), b"XYcd");
        assert_eq!(c.dma_requests_served(), 3);
        drop(c);
        t.join().unwrap();
    }
}
