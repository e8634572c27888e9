//! Read-ahead: a header read that takes up to 4 KiB, so that a small
//! request costs one system call, and the bookkeeping that hands each
//! message the fds sent with it.

use std::os::fd::OwnedFd;

use crate::error::{Errno, Result};
use crate::protocol::{Header, HEADER_SIZE, SERVER_MAX_MSG_SIZE};

use super::{Conn, Received};

/// How many bytes a header read may take ahead of the header.
pub(super) const READ_AHEAD: usize = 4096;

/// The read-ahead state of a connection.
///
/// With read-ahead on, a header read asks the kernel for up to
/// [`READ_AHEAD`] bytes, so that a small request arrives whole in one system
/// call; the bytes past the header are served to the reads that follow.
///
/// fds travel with the first byte of the message they were sent with, and a
/// `recvmsg` that returns fds stops right after the data they came with
/// (the kernel never carries on past an fd-carrying segment). So the fds of
/// one call belong to the last message that starts in the bytes that call
/// returned; they are kept, tagged with that message's stream offset, until
/// its header is read.
#[derive(Debug, Default)]
pub(super) struct ReadAhead {
    pub(super) on: bool,
    pub(super) buf: Vec<u8>,
    pub(super) start: usize,
    pub(super) end: usize,
    /// Stream offset of `buf[start]`.
    pub(super) pos: u64,
    /// fds received early: (stream offset of their message, the fds, whether
    /// the control data was truncated or malformed).
    pub(super) fds: std::collections::VecDeque<(u64, Vec<OwnedFd>, bool)>,
}

/// Offset in `b`, which starts at a message boundary, of the last message
/// that starts in it.
///
/// Messages are delimited as the request loop reads them: a header whose
/// size is impossible (below the header's, or above the largest message) is
/// answered on its own and the next message starts right after it. (Ending
/// the walk there instead would hand the fds of the next message to the
/// bogus one, where a connection without read-ahead gives them to the
/// message they were sent with.)
pub(super) fn last_message_start(b: &[u8]) -> usize {
    let mut at = 0usize;
    loop {
        let Some(h) = b.get(at..at + HEADER_SIZE) else {
            return at;
        };
        let mut size = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        if !(HEADER_SIZE..=SERVER_MAX_MSG_SIZE).contains(&size) {
            size = HEADER_SIZE;
        }
        match at.checked_add(size) {
            Some(next) if next < b.len() => at = next,
            _ => return at,
        }
    }
}

impl Conn {
    /// [`Conn::recv_header`] with read-ahead on.
    pub(super) fn recv_header_ahead(&self, nonblocking: bool) -> Result<Received> {
        let mut guard = self.ahead.borrow_mut();
        let ra = &mut *guard;
        if ra.buf.len() < READ_AHEAD {
            ra.buf.resize(READ_AHEAD, 0);
        }
        while ra.end - ra.start < HEADER_SIZE {
            // Keep the partial header at the front, then fill the rest.
            ra.buf.copy_within(ra.start..ra.end, 0);
            ra.end -= ra.start;
            ra.start = 0;
            let had = ra.end;
            // Only a read that has nothing yet may return EAGAIN: once a
            // header has begun, the rest of it is waited for.
            let (n, fds, bad) =
                self.recvmsg_once(&mut ra.buf[had..], nonblocking && had == 0, had == 0)?;
            if n == 0 {
                return Err(Errno(if had == 0 {
                    libc::ENOMSG
                } else {
                    libc::ECONNRESET
                }));
            }
            ra.end += n;
            if !fds.is_empty() || bad {
                let at = last_message_start(&ra.buf[..ra.end]) as u64;
                ra.fds.push_back((ra.pos + at, fds, bad));
            }
        }
        self.talked.set(true);
        let mut h = [0u8; HEADER_SIZE];
        h.copy_from_slice(&ra.buf[ra.start..ra.start + HEADER_SIZE]);
        let at = ra.pos;
        ra.start += HEADER_SIZE;
        ra.pos += HEADER_SIZE as u64;
        let mut fds = Vec::new();
        let mut fds_bad = false;
        while ra.fds.front().is_some_and(|(p, _, _)| *p <= at) {
            if let Some((p, f, b)) = ra.fds.pop_front() {
                // fds tagged with an earlier offset belonged to no header
                // we read (a stream with a bogus size): they are closed.
                if p == at {
                    fds = f;
                    fds_bad = b;
                }
            }
        }
        Ok(Received {
            hdr: Header::decode(&h),
            fds,
            fds_bad,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Header;
    use crate::transport::socketpair;
    use crate::transport::tests::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn read_ahead_gives_each_pipelined_message_its_own_fds() {
        let (a, b) = socketpair().unwrap();
        let server = Conn::from_fd(a);
        server.set_read_ahead(true);
        let client = Conn::from_fd(b);
        let (x, _y) = socketpair().unwrap();
        let (h1, b1) = msg(1, &[1; 20]);
        let (h2, b2) = msg(2, &[2; 8]);
        let (h3, b3) = msg(3, &[3; 4]);
        let (h4, b4) = msg(4, &[4; 4]);
        client.send(&h1, &[&b1], &[]).unwrap();
        client
            .send(&h2, &[&b2], &[x.as_raw_fd(), x.as_raw_fd()])
            .unwrap();
        client.send(&h3, &[&b3], &[]).unwrap();
        client.send(&h4, &[&b4], &[x.as_raw_fd()]).unwrap();
        for (h, b, nfds) in [(h1, b1, 0), (h2, b2, 2), (h3, b3, 0), (h4, b4, 1)] {
            let r = server.recv_header(false).unwrap();
            assert_eq!(r.hdr, h);
            assert_eq!(r.fds.len(), nfds, "message {}", h.msg_id);
            assert!(!r.fds_bad);
            let mut body = vec![0u8; b.len()];
            server.recv_exact(&mut body).unwrap();
            assert_eq!(body, b);
        }
        drop(client);
        assert_eq!(server.recv_header(false).unwrap_err(), Errno(libc::ENOMSG));
    }

    #[test]
    fn read_ahead_handles_bodies_larger_than_its_buffer() {
        let (a, b) = socketpair().unwrap();
        let server = Conn::from_fd(a);
        server.set_read_ahead(true);
        let client = Conn::from_fd(b);
        let big: Vec<u8> = (0..3 * READ_AHEAD + 5).map(|i| i as u8).collect();
        let (h1, b1) = msg(1, &big);
        let (h2, b2) = msg(2, &[9; 4]);
        let t = std::thread::spawn(move || {
            client.send(&h1, &[&b1], &[]).unwrap();
            client.send(&h2, &[&b2], &[]).unwrap();
            client
        });
        let r = server.recv_header(false).unwrap();
        assert_eq!(r.hdr.msg_id, 1);
        let mut body = vec![0u8; big.len()];
        server.recv_exact(&mut body).unwrap();
        assert_eq!(body, big);
        let r = server.recv_header(false).unwrap();
        assert_eq!(r.hdr.msg_id, 2);
        let mut body = [0u8; 4];
        server.recv_exact(&mut body).unwrap();
        assert_eq!(body, [9; 4]);
        drop(t.join().unwrap());
    }

    #[test]
    fn read_ahead_survives_byte_by_byte_delivery_and_reports_resets() {
        let (a, b) = socketpair().unwrap();
        let server = Conn::from_fd(a);
        server.set_read_ahead(true);
        let client = Conn::from_fd(b);
        let (h1, b1) = msg(5, &[7; 6]);
        let t = std::thread::spawn(move || {
            let mut all = h1.encode().to_vec();
            all.extend_from_slice(&b1);
            // A second header, cut short.
            all.extend_from_slice(&h1.encode()[..9]);
            for byte in all {
                client.send_raw(&[byte]);
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        let r = server.recv_header(false).unwrap();
        assert_eq!(r.hdr, h1);
        let mut body = [0u8; 6];
        server.recv_exact(&mut body).unwrap();
        assert_eq!(body, [7; 6]);
        t.join().unwrap();
        assert_eq!(
            server.recv_header(false).unwrap_err(),
            Errno(libc::ECONNRESET)
        );
    }

    #[test]
    fn last_message_start_walks_whole_and_partial_messages() {
        let (h1, b1) = msg(1, &[0; 4]);
        let (h2, _) = msg(2, &[0; 100]);
        let mut b = h1.encode().to_vec();
        b.extend_from_slice(&b1);
        assert_eq!(last_message_start(&b), 0);
        b.extend_from_slice(&h2.encode()[..3]);
        assert_eq!(last_message_start(&b), 20);
        b.extend_from_slice(&h2.encode()[3..]);
        b.extend_from_slice(&[0; 10]);
        assert_eq!(last_message_start(&b), 20);
        // A header with an impossible size is a message of its own, header
        // only, as the request loop reads it.
        for size in [3, (SERVER_MAX_MSG_SIZE + 1) as u32, u32::MAX] {
            let bogus = Header {
                msg_size: size,
                ..Header::default()
            };
            let mut c = bogus.encode().to_vec();
            c.extend_from_slice(&h1.encode());
            assert_eq!(last_message_start(&c), 16, "size {size}");
            c.extend_from_slice(&b1);
            c.extend_from_slice(&bogus.encode());
            assert_eq!(last_message_start(&c), 36, "size {size}");
        }
    }

    #[test]
    fn read_ahead_gives_fds_to_the_message_after_a_bogus_header() {
        // Regression: read-ahead used to stop its walk at a header with an
        // impossible size and hand the fds of the next message to it, while
        // the request loop answers such a header on its own and reads on.
        for size in [0, 15, (SERVER_MAX_MSG_SIZE + 1) as u32] {
            let (a, b) = socketpair().unwrap();
            let server = Conn::from_fd(a);
            server.set_read_ahead(true);
            let client = Conn::from_fd(b);
            let (x, _y) = socketpair().unwrap();
            let bogus = Header {
                msg_id: 1,
                msg_size: size,
                ..Header::default()
            };
            client.send_raw(&bogus.encode());
            let (h2, b2) = msg(2, &[2; 8]);
            client.send(&h2, &[&b2], &[x.as_raw_fd()]).unwrap();
            let r = server.recv_header(false).unwrap();
            assert_eq!(r.hdr, bogus);
            assert!(
                r.fds.is_empty(),
                "size {size}: fds went to the bogus header"
            );
            let r = server.recv_header(false).unwrap();
            assert_eq!(r.hdr, h2);
            assert_eq!(r.fds.len(), 1, "size {size}");
            let mut body = [0u8; 8];
            server.recv_exact(&mut body).unwrap();
            assert_eq!(body, [2; 8]);
        }
    }
}
