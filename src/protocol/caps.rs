//! The JSON capabilities exchanged in VFIO_USER_VERSION.
//!
//! The client's string is validated with the same strictness as upstream
//! libvfio-user: a known key with the wrong JSON type, or an out-of-range
//! `max_msg_fds`, refuses the negotiation with `EINVAL`; unknown keys are
//! ignored.

use serde_json::{Map, Value};

use super::{CLIENT_MAX_FDS_LIMIT, DEFAULT_MAX_DATA_XFER_SIZE};
use crate::error::{Errno, Result};

/// What a client announced. Missing keys take the protocol's defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientCaps {
    /// Most fds the client accepts in one message from us.
    pub max_msg_fds: usize,
    /// Largest data the client accepts in one DMA_READ/DMA_WRITE.
    pub max_data_xfer_size: usize,
    /// Migration dirty-page granularity, when the client named one.
    pub migration_pgsize: Option<u64>,
    /// Whether the client can take a second socket for server-to-client commands.
    pub twin_socket: bool,
    /// Whether the client said it may send REGION_WRITE_MULTI.
    pub write_multiple: bool,
    /// The client is QEMU's (it announces `pgsizes` / `max_dma_maps`, which
    /// only QEMU's client sends). QEMU lays out DMA_READ/DMA_WRITE with a
    /// 32-bit count, unlike the spec and upstream libvfio-user's 64-bit one,
    /// so server-to-client DMA messages follow its layout.
    pub qemu_dma_layout: bool,
}

impl Default for ClientCaps {
    fn default() -> Self {
        ClientCaps {
            max_msg_fds: 1,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            migration_pgsize: None,
            twin_socket: false,
            write_multiple: false,
            qemu_dma_layout: false,
        }
    }
}

fn int(v: &Value) -> Result<i64> {
    match v {
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|_| i64::MAX))
            .ok_or(Errno::EINVAL),
        _ => Err(Errno::EINVAL),
    }
}

fn object(v: &Value) -> Result<&Map<String, Value>> {
    v.as_object().ok_or(Errno::EINVAL)
}

/// Parses the JSON text of a client's VERSION message (without its NUL).
pub fn parse_client(json: &[u8]) -> Result<ClientCaps> {
    let mut caps = ClientCaps::default();
    let top: Value = serde_json::from_slice(json).map_err(|_| Errno::EINVAL)?;
    // Like upstream, a top level that is not an object simply has no
    // capabilities.
    let Some(c) = top.as_object().and_then(|o| o.get("capabilities")) else {
        return Ok(caps);
    };
    let c = object(c)?;
    if let Some(v) = c.get("max_msg_fds") {
        let n = int(v)?;
        if !(0..=CLIENT_MAX_FDS_LIMIT).contains(&n) {
            return Err(Errno::EINVAL);
        }
        caps.max_msg_fds = n as usize;
    }
    if let Some(v) = c.get("max_data_xfer_size") {
        let n = int(v)?;
        // Upstream accepts zero and negative sizes, which would later make a
        // server-side DMA transfer loop forever; refuse them.
        if n <= 0 {
            return Err(Errno::EINVAL);
        }
        caps.max_data_xfer_size = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(v) = c.get("migration") {
        let m = object(v)?;
        if let Some(p) = m.get("pgsize") {
            let n = int(p)?;
            caps.migration_pgsize = Some(u64::try_from(n).map_err(|_| Errno::EINVAL)?);
        }
    }
    if let Some(v) = c.get("twin_socket") {
        let t = object(v)?;
        if let Some(s) = t.get("supported") {
            caps.twin_socket = s.as_bool().ok_or(Errno::EINVAL)?;
        }
    }
    caps.qemu_dma_layout = c.contains_key("pgsizes") || c.contains_key("max_dma_maps");
    if let Some(v) = c.get("write_multiple") {
        caps.write_multiple = v.as_bool().ok_or(Errno::EINVAL)?;
    }
    Ok(caps)
}

/// Largest `max_dma_maps` we announce: QEMU's client refuses a server that
/// announces more.
pub const MAX_ANNOUNCED_DMA_MAPS: usize = 65535;

/// What the server announces back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerCaps {
    /// Most fds the server accepts in one message.
    pub max_msg_fds: usize,
    /// Largest data transfer the server accepts in one message.
    pub max_data_xfer_size: usize,
    /// Dirty page size, present when the device supports migration.
    pub migration_pgsize: Option<u64>,
    /// Index of the twin socket in the reply's fds, when one is passed.
    pub twin_socket_fd_index: Option<usize>,
    /// Page sizes supported for DMA mappings (a bit mask).
    pub pgsizes: u64,
    /// Most DMA regions the client may map.
    pub max_dma_maps: usize,
    /// Whether REGION_WRITE_MULTI is accepted.
    pub write_multiple: bool,
}

/// Formats the server's capabilities as the JSON text of the VERSION reply
/// (the caller appends the NUL).
pub fn format_server(s: &ServerCaps) -> String {
    let mut c = Map::new();
    c.insert("max_msg_fds".into(), Value::from(s.max_msg_fds as u64));
    c.insert(
        "max_data_xfer_size".into(),
        Value::from(s.max_data_xfer_size as u64),
    );
    c.insert("pgsizes".into(), Value::from(s.pgsizes));
    // Only when the device takes DMA at all; QEMU also refuses values above
    // 65535, so larger limits are announced as 65535 (the device still
    // accepts up to its own limit).
    if s.max_dma_maps > 0 {
        let n = s.max_dma_maps.min(MAX_ANNOUNCED_DMA_MAPS);
        c.insert("max_dma_maps".into(), Value::from(n as u64));
    }
    if let Some(p) = s.migration_pgsize {
        let mut m = Map::new();
        m.insert("pgsize".into(), Value::from(p));
        c.insert("migration".into(), Value::Object(m));
    }
    if let Some(i) = s.twin_socket_fd_index {
        let mut t = Map::new();
        t.insert("supported".into(), Value::Bool(true));
        t.insert("fd_index".into(), Value::from(i as u64));
        c.insert("twin_socket".into(), Value::Object(t));
    }
    if s.write_multiple {
        c.insert("write_multiple".into(), Value::Bool(true));
    }
    let mut top = Map::new();
    top.insert("capabilities".into(), Value::Object(c));
    Value::Object(top).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_without_capabilities() {
        assert_eq!(parse_client(b"{}"), Ok(ClientCaps::default()));
        assert_eq!(parse_client(b"23"), Ok(ClientCaps::default()));
    }

    #[test]
    fn rejects_malformed_json_and_types() {
        for bad in [
            &b"{"[..],
            b"\"",
            b"{ \"capabilities\": \"23\" }",
            b"{ \"capabilities\": { \"max_msg_fds\": \"foo\" } }",
            b"{ \"capabilities\": { \"max_msg_fds\": -1 } }",
            b"{ \"capabilities\": { \"max_msg_fds\": 1025 } }",
            b"{ \"capabilities\": { \"max_msg_fds\": 1.5 } }",
            b"{ \"capabilities\": { \"migration\": \"23\" } }",
            b"{ \"capabilities\": { \"migration\": { \"pgsize\": \"foo\" } } }",
            b"{ \"capabilities\": { \"twin_socket\": { \"supported\": 1 } } }",
            b"{ \"capabilities\": { \"max_data_xfer_size\": 0 } }",
        ] {
            assert_eq!(
                parse_client(bad),
                Err(Errno::EINVAL),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn parses_all_known_keys() {
        let c = parse_client(
            br#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":65536,
                "migration":{"pgsize":4096},"twin_socket":{"supported":true},
                "write_multiple":true,"unknown":[1,2]}}"#,
        )
        .unwrap();
        assert_eq!(c.max_msg_fds, 16);
        assert_eq!(c.max_data_xfer_size, 65536);
        assert_eq!(c.migration_pgsize, Some(4096));
        assert!(c.twin_socket);
        assert!(c.write_multiple);
        assert!(!c.qemu_dma_layout);
        let q = parse_client(br#"{"capabilities":{"pgsizes":4096,"max_dma_maps":65535}}"#).unwrap();
        assert!(q.qemu_dma_layout);
    }

    #[test]
    fn server_caps_round_trip_through_json() {
        let s = ServerCaps {
            max_msg_fds: 8,
            max_data_xfer_size: 1 << 20,
            migration_pgsize: Some(4096),
            twin_socket_fd_index: Some(0),
            pgsizes: 4096,
            max_dma_maps: 1000,
            write_multiple: true,
        };
        let text = format_server(&s);
        let v: Value = serde_json::from_str(&text).unwrap();
        let c = &v["capabilities"];
        assert_eq!(c["max_msg_fds"], 8);
        assert_eq!(c["max_data_xfer_size"], 1 << 20);
        assert_eq!(c["migration"]["pgsize"], 4096);
        assert_eq!(c["twin_socket"]["supported"], true);
        assert_eq!(c["twin_socket"]["fd_index"], 0);
        assert_eq!(c["max_dma_maps"], 1000);
        let big = format_server(&ServerCaps {
            max_dma_maps: 1_000_000,
            ..s.clone()
        });
        assert!(big.contains("\"max_dma_maps\":65535"), "{big}");
        let none = format_server(&ServerCaps {
            max_dma_maps: 0,
            ..s.clone()
        });
        assert!(!none.contains("max_dma_maps"), "{none}");
        let none = format_server(&ServerCaps {
            migration_pgsize: None,
            twin_socket_fd_index: None,
            ..s
        });
        assert!(!none.contains("migration"));
        assert!(!none.contains("twin_socket"));
    }
}
