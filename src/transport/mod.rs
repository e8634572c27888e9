//! UNIX-socket transport: the listening socket, an accepted connection, and
//! message framing with fd passing (SCM_RIGHTS).
//!
//! Receiving is split in two steps, header then body, so that the caller can
//! validate the header before committing to read (and allocate for) a body.
//! Every read loops until it has the whole requested length: a message that
//! arrives in pieces is still received whole. A connection read by a single
//! blocking loop may turn on read-ahead ([`Conn::set_read_ahead`]), so that a
//! small request costs one system call instead of two.
//!
//! A client cannot wedge the server: an accepted connection (and the
//! server's end of a twin socket) gives up on a client that stops reading
//! what it is sent, stops sending in the middle of a message, or connects
//! and never starts its first message, for [`CLIENT_STALL_TIMEOUT`] (or what
//! [`Context::set_client_timeout`](crate::Context::set_client_timeout)
//! sets); that client is then treated as gone (`ECONNRESET`, with
//! [`Conn::stalled`] set). Waiting for the next request is not a stall: a
//! client that has talked may stay idle as long as it likes. Waiting for the
//! *reply* to a request of the server's (DMA_READ, DMA_WRITE) is different:
//! the reply is due, so the server waits for it with a deadline
//! ([`Conn::wait_readable`]) and gives up with `ETIMEDOUT`.
//!
//! The stall timeout bounds each wait, not a whole message: a client that
//! trickles one byte per timeout keeps a message coming. Sends are bounded
//! with `SO_SNDTIMEO`. Receives are bounded with poll(2), and only when a
//! receive would block where silence is a stall (in the middle of a
//! message, or before the first one): a socket receive timeout would arm a
//! kernel timer on every wait for the next request, which measured 2-3% of
//! a small request's round trip. The reply deadline is a
//! total one for the wait, checked before each message the wait reads (a
//! message that has begun is bound by the stall timeout only).

mod conn;
mod fds;
mod listener;
mod read_ahead;
mod stall;

pub use conn::{socketpair, Conn, Received, INLINE_FDS};
pub use listener::Listener;
#[cfg(test)]
pub(crate) use stall::socket_timeouts;

use std::time::Duration;

/// Most fds we are prepared to receive with one message; more are refused as
/// a truncated control message (and the ones that did arrive are closed).
pub const MAX_RECV_FDS: usize = 1024;

/// How long an accepted connection (or the server's end of a twin socket)
/// waits for a client that does not read what it is sent (a reply, a DMA
/// request), that stopped sending in the middle of a message, or that
/// connected and does not begin its first message (the version
/// negotiation, which even a non-blocking context's attach waits for),
/// before it gives up on the client (`ECONNRESET`, which the context
/// handles as a disconnect). It is also how long the context waits for the
/// client's reply to a DMA_READ/DMA_WRITE of its own (`ETIMEDOUT` to the
/// device, and the client is dropped). Upstream has no such bound, so a
/// client that floods requests without reading the replies, or never
/// answers a DMA request, blocks the server forever.
///
/// This is the default;
/// [`Context::set_client_timeout`](crate::Context::set_client_timeout)
/// changes it per context. Sends are bounded with `SO_SNDTIMEO`, which a
/// caller may also change on the connection's fd (`vfu_get_poll_fd`);
/// receives with poll(2), for the shorter of this timeout and an
/// `SO_RCVTIMEO` a caller set on the fd. The DMA reply deadline always
/// follows the context's setting.
pub const CLIENT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{cmd, Header, HEADER_SIZE};
    use nix::sys::socket::MsgFlags;

    pub(crate) fn msg(id: u16, body: &[u8]) -> (Header, Vec<u8>) {
        let h = Header {
            msg_id: id,
            cmd: cmd::REGION_WRITE,
            msg_size: (HEADER_SIZE + body.len()) as u32,
            flags: 0,
            error_no: 0,
        };
        (h, body.to_vec())
    }

    impl Conn {
        pub(crate) fn send_raw(&self, b: &[u8]) {
            let n = nix::sys::socket::send(self.as_raw_fd(), b, MsgFlags::empty()).unwrap();
            assert_eq!(n, b.len());
        }
    }
}
