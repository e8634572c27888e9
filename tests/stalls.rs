//! A client that does not answer the server's own requests (DMA_READ and
//! DMA_WRITE, on the main socket or the twin socket) must not block the
//! device forever: the transfer fails with `ETIMEDOUT` within the client
//! timeout (`Context::set_client_timeout`), the client is dropped, and the
//! context serves the next client with no fd left behind. A client that
//! answers slowly but in time, or sends commands while the server waits,
//! is served as before.
//!
//! The test device (see `robust_common`) runs a DMA transfer through
//! messages when BAR0's `REG_DMA_OP` is written and leaves the errno in
//! `REG_DMA_RESULT`.

mod robust_common;

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use robust_common::*;
use vfio_user::device::dma_msg::{DMA_REGION_MMAP, DMA_REGION_READ, DMA_REGION_WRITE};
use vfio_user::protocol::{cmd, flags, Header, HEADER_SIZE};
use vfio_user::Errno;

const RW: u32 = DMA_REGION_READ | DMA_REGION_WRITE;
/// The message-only DMA region the device reads and writes.
const IOVA: u64 = 0x10000;
const LEN: u64 = 16;
const SCRATCH: u64 = 0x10;

fn server(tag: &str, t: Duration) -> Server {
    Server::start(
        tag,
        Options {
            stall_timeout: t,
            client_timeout: Some(t),
        },
    )
}

const TWIN_CAPS: &str = r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"twin_socket":{"supported":true}}}"#;

/// Connects and negotiates, with a twin socket when `twin`; maps the
/// message-only region and points the device's DMA registers at it.
fn connect(s: &Server, twin: bool) -> (Raw, Option<UnixStream>) {
    let (mut c, twin) = if twin {
        let mut c = Raw::connect_only(&s.path);
        let id = c.send(cmd::VERSION, &version_body(TWIN_CAPS), &[]);
        let mut rep = c.reply(id, cmd::VERSION);
        assert_eq!(rep.hdr.flags & flags::ERROR, 0, "version refused");
        assert_eq!(rep.fds.len(), 1, "no twin socket");
        let t = UnixStream::from(rep.fds.remove(0));
        t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        (c, Some(t))
    } else {
        (Raw::connect(&s.path), None)
    };
    c.expect_ok(cmd::DMA_MAP, &dma_map(32, RW, 0, IOVA, 0x1000), &[]);
    c.expect_ok(
        cmd::REGION_WRITE,
        &access(0, REG_DMA_IOVA, 8, &le64(IOVA)),
        &[],
    );
    c.expect_ok(
        cmd::REGION_WRITE,
        &access(0, REG_DMA_LEN, 8, &le64(LEN)),
        &[],
    );
    (c, twin)
}

/// Has the device start a transfer (`write`: DMA_WRITE, else DMA_READ);
/// returns the id of the REGION_WRITE that started it.
fn start_dma(c: &mut Raw, write: bool) -> u16 {
    let op = if write { 2 } else { 1 };
    c.send(cmd::REGION_WRITE, &access(0, REG_DMA_OP, 8, &le64(op)), &[])
}

/// Reads one whole message off `s` (the twin socket); `None` at EOF.
fn recv_on(s: &mut UnixStream) -> Option<(Header, Vec<u8>)> {
    let mut h = [0u8; HEADER_SIZE];
    let mut got = 0;
    while got < HEADER_SIZE {
        let n = s.read(&mut h[got..]).expect("twin read");
        if n == 0 {
            assert_eq!(got, 0, "twin socket closed inside a header");
            return None;
        }
        got += n;
    }
    let hdr = Header::decode(&h);
    let mut body = vec![0u8; hdr.msg_size as usize - HEADER_SIZE];
    s.read_exact(&mut body).expect("twin body");
    Some((hdr, body))
}

/// Receives the device's DMA request, on the twin socket when there is
/// one, and checks it.
fn dma_request(c: &mut Raw, twin: &mut Option<UnixStream>, write: bool) -> Header {
    let (hdr, body) = match twin {
        Some(t) => recv_on(t).expect("DMA request on the twin socket"),
        None => {
            let r = c.recv().expect("DMA request");
            (r.hdr, r.body)
        }
    };
    let command = if write { cmd::DMA_WRITE } else { cmd::DMA_READ };
    assert_eq!(hdr.cmd, command, "{hdr:?}");
    assert_eq!(hdr.msg_type(), flags::TYPE_COMMAND);
    assert_eq!(
        &body[..16],
        &robust_common::body(&[&le64(IOVA), &le64(LEN)])[..]
    );
    hdr
}

/// The bytes of a good answer to the device's request `req`.
fn answer_bytes(req: Header) -> Vec<u8> {
    let data: Vec<u8> = if req.cmd == cmd::DMA_READ {
        robust_common::body(&[&le64(IOVA), &le64(LEN), &[7; LEN as usize]])
    } else {
        robust_common::body(&[&le64(IOVA), &le64(LEN)])
    };
    let h = Header {
        msg_id: req.msg_id,
        cmd: req.cmd,
        msg_size: (HEADER_SIZE + data.len()) as u32,
        flags: flags::TYPE_REPLY,
        error_no: 0,
    };
    let mut all = h.encode().to_vec();
    all.extend_from_slice(&data);
    all
}

/// Sends `bytes` on the twin socket when there is one, else on the main
/// one.
fn send_answer(c: &Raw, twin: &Option<UnixStream>, bytes: &[u8]) {
    let sock = twin.as_ref().unwrap_or(&c.sock);
    let n = sendmsg(sock, bytes, &[]).expect("answer");
    assert_eq!(n, bytes.len());
}

/// Answers the device's request `req` (on the twin socket when there is
/// one).
fn answer(c: &mut Raw, twin: &mut Option<UnixStream>, req: Header) {
    send_answer(c, twin, &answer_bytes(req));
}

/// The errno the device's last transfer returned.
fn dma_result(c: &mut Raw) -> u64 {
    let v = c.expect_ok(cmd::REGION_READ, &access(0, REG_DMA_RESULT, 8, &[]), &[]);
    u64::from_le_bytes(v[16..24].try_into().unwrap())
}

/// Reads the device's last transfer result with a new client (the one that
/// timed out is gone), which it must serve.
fn result_seen_by_a_new_client(s: &Server) -> u64 {
    let mut c = Raw::connect(&s.path);
    let e = dma_result(&mut c);
    drop(c);
    e
}

/// The device is stuck waiting for our answer: we never give it, or stop
/// in the middle of it. The transfer fails with ETIMEDOUT after the
/// timeout, the client is dropped (both sockets closed, the DMA region
/// unmapped, the command we sent with an fd while the server waited closed
/// unhandled), and the next client is served.
#[test]
fn unanswered_dma_requests_time_out_and_drop_the_client() {
    let t = Duration::from_millis(200);
    let _g = serial();
    let fds = open_fds();
    let s = server("silent", t);
    let base = open_fds();
    let mut ended = 0;
    for (twin, write, cut) in [
        (false, false, false),
        (true, false, false),
        (false, true, false),
        (true, true, false),
        (false, false, true),
        (true, false, true),
    ] {
        let what = format!("twin {twin}, write {write}, answer cut short {cut}");
        let (mut c, mut tw) = connect(&s, twin);
        assert_eq!(s.stats().dma_live, 1);
        let start = Instant::now();
        let id = start_dma(&mut c, write);
        let req = dma_request(&mut c, &mut tw, write);
        // A command, with an fd, while the server waits: kept (on the main
        // socket, in the context) but never handled, the client being
        // dropped first.
        let mem = memfd_64k();
        let map = dma_map(32, RW | DMA_REGION_MMAP, 0, 0x20000, 0x1000);
        c.send(cmd::DMA_MAP, &map, &[mem.as_raw_fd()]);
        drop(mem);
        if cut {
            // The answer begins, then stops inside its header.
            send_answer(&c, &tw, &answer_bytes(req)[..9]);
        }
        // No reply to the REGION_WRITE (nor to the DMA_MAP): the
        // connection is closed.
        let r = c.recv();
        let took = start.elapsed();
        assert!(
            r.is_none(),
            "{what}: server answered {:?} (id {id})",
            r.map(|r| r.hdr)
        );
        assert!(took >= t, "{what}: dropped after {took:?}");
        assert!(
            took < Duration::from_secs(3),
            "{what}: dropped after {took:?}"
        );
        if let Some(tw) = tw.as_mut() {
            assert!(recv_on(tw).is_none(), "{what}: twin socket still open");
        }
        ended += 1;
        assert_eq!(s.wait_ended(ended), Errno::ENOTCONN, "{what}");
        assert_eq!(s.stats().dma_live, 0, "{what}: DMA region not unmapped");
        drop(c);
        drop(tw);
        assert_eq!(
            result_seen_by_a_new_client(&s),
            libc::ETIMEDOUT as u64,
            "{what}"
        );
        ended += 1;
        s.wait_ended(ended);
        s.check_fresh_client();
        ended += 1;
        // Every fd of the session is closed while the server lives on.
        assert_fds_back_to(base);
    }
    s.stop();
    assert_fds_back_to(fds);
}

/// A client that sends commands all the time but never answers is given
/// up on too: the reply deadline is a total one.
#[test]
fn commands_without_an_answer_do_not_hold_the_device() {
    let t = Duration::from_millis(300);
    let _g = serial();
    let fds = open_fds();
    let s = server("trickle", t);
    for twin in [false, true] {
        let (mut c, mut tw) = connect(&s, twin);
        let start = Instant::now();
        start_dma(&mut c, false);
        dma_request(&mut c, &mut tw, false);
        let mut m = Header {
            msg_id: 0x4000,
            cmd: cmd::DEVICE_GET_INFO,
            msg_size: (HEADER_SIZE + 16) as u32,
            flags: flags::TYPE_COMMAND,
            error_no: 0,
        }
        .encode()
        .to_vec();
        m.extend_from_slice(&device_info(16));
        // Far more than the timeout of commands, 40 ms apart, each a sign
        // of life: the server still gives up at its deadline and closes the
        // connection, which makes our sends fail.
        let gave_up = loop {
            let sent = sendmsg(&c.sock, &m, &[]);
            if sent.is_err() {
                break start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(6),
                "twin {twin}: the server is still waiting"
            );
            std::thread::sleep(Duration::from_millis(40));
        };
        assert!(gave_up >= t, "twin {twin}: gave up after {gave_up:?}");
        assert!(
            gave_up < Duration::from_secs(3),
            "twin {twin}: gave up after {gave_up:?}"
        );
        drop(c);
        drop(tw);
        assert_eq!(result_seen_by_a_new_client(&s), libc::ETIMEDOUT as u64);
    }
    s.check_fresh_client();
    s.stop();
    assert_fds_back_to(fds);
}

/// Answers that take a good part of the timeout, several in a row (longer
/// than the timeout in all): each transfer has its own deadline.
#[test]
fn slow_answers_within_the_timeout_are_accepted() {
    let t = Duration::from_millis(1000);
    let _g = serial();
    let fds = open_fds();
    let s = server("slow", t);
    for twin in [false, true] {
        let (mut c, mut tw) = connect(&s, twin);
        let start = Instant::now();
        for (i, write) in [false, true, false].into_iter().enumerate() {
            let id = start_dma(&mut c, write);
            let req = dma_request(&mut c, &mut tw, write);
            std::thread::sleep(Duration::from_millis(400));
            answer(&mut c, &mut tw, req);
            let r = c.reply(id, cmd::REGION_WRITE);
            assert_eq!(r.hdr.flags & flags::ERROR, 0, "twin {twin}, transfer {i}");
            assert_eq!(dma_result(&mut c), 0, "twin {twin}, transfer {i}");
        }
        assert!(start.elapsed() > t);
        // Idle for longer than the timeout between requests: still fine.
        std::thread::sleep(t + Duration::from_millis(200));
        c.expect_ok(cmd::REGION_WRITE, &access(0, SCRATCH, 4, b"slow"), &[]);
        assert_eq!(
            &c.expect_ok(cmd::REGION_READ, &access(0, SCRATCH, 4, &[]), &[])[16..],
            b"slow"
        );
        drop(c);
        drop(tw);
        assert_eq!(s.wait_ended(1 + twin as usize), Errno::ENOTCONN);
    }
    s.check_fresh_client();
    s.stop();
    assert_fds_back_to(fds);
}

/// Commands the client sends while the server waits for its answer
/// (including one carrying an fd) are all handled, in order, after the
/// transfer; the transfer itself succeeds.
#[test]
fn commands_sent_during_the_wait_are_handled_after_it() {
    let t = Duration::from_millis(1000);
    let _g = serial();
    let fds = open_fds();
    let s = server("during", t);
    for twin in [false, true] {
        let (mut c, mut tw) = connect(&s, twin);
        let id = start_dma(&mut c, false);
        let req = dma_request(&mut c, &mut tw, false);
        let info = c.send(cmd::DEVICE_GET_INFO, &device_info(16), &[]);
        let write = c.send(cmd::REGION_WRITE, &access(0, SCRATCH, 6, b"during"), &[]);
        let mem = memfd_64k();
        let map = c.send(
            cmd::DMA_MAP,
            &dma_map(32, RW | DMA_REGION_MMAP, 0, 0x20000, 0x1000),
            &[mem.as_raw_fd()],
        );
        drop(mem);
        std::thread::sleep(Duration::from_millis(150));
        answer(&mut c, &mut tw, req);
        assert_eq!(c.reply(id, cmd::REGION_WRITE).hdr.flags & flags::ERROR, 0);
        assert_eq!(c.reply(info, cmd::DEVICE_GET_INFO).body.len(), 16);
        assert_eq!(
            c.reply(write, cmd::REGION_WRITE).hdr.flags & flags::ERROR,
            0
        );
        assert_eq!(c.reply(map, cmd::DMA_MAP).hdr.flags & flags::ERROR, 0);
        assert_eq!(dma_result(&mut c), 0, "twin {twin}");
        assert_eq!(
            &c.expect_ok(cmd::REGION_READ, &access(0, SCRATCH, 6, &[]), &[])[16..],
            b"during"
        );
        assert_eq!(s.stats().dma_live, 2, "twin {twin}");
        drop(c);
        drop(tw);
        assert_eq!(s.wait_ended(1 + twin as usize), Errno::ENOTCONN);
    }
    s.check_fresh_client();
    s.stop();
    assert_fds_back_to(fds);
}

/// An error answer carrying ETIMEDOUT, ECONNRESET or ENOMSG is the
/// client's answer: the transfer fails with it and the client stays
/// connected (such an answer used to be taken for a hang-up).
#[test]
fn error_answers_are_not_mistaken_for_timeouts_or_hang_ups() {
    let t = Duration::from_millis(1000);
    let _g = serial();
    let fds = open_fds();
    let s = server("errans", t);
    for twin in [false, true] {
        let (mut c, mut tw) = connect(&s, twin);
        for e in [libc::ETIMEDOUT, libc::ECONNRESET, libc::ENOMSG] {
            let id = start_dma(&mut c, false);
            let req = dma_request(&mut c, &mut tw, false);
            let h = Header {
                msg_id: req.msg_id,
                cmd: req.cmd,
                msg_size: HEADER_SIZE as u32,
                flags: flags::TYPE_REPLY | flags::ERROR,
                error_no: e as u32,
            };
            send_answer(&c, &tw, &h.encode());
            assert_eq!(c.reply(id, cmd::REGION_WRITE).hdr.flags & flags::ERROR, 0);
            assert_eq!(dma_result(&mut c), e as u64, "twin {twin}");
        }
        // Still the same session, and it still transfers.
        let id = start_dma(&mut c, false);
        let req = dma_request(&mut c, &mut tw, false);
        answer(&mut c, &mut tw, req);
        c.reply(id, cmd::REGION_WRITE);
        assert_eq!(dma_result(&mut c), 0);
        assert_eq!(s.stats().ended.len(), twin as usize);
        drop(c);
        drop(tw);
        assert_eq!(s.wait_ended(1 + twin as usize), Errno::ENOTCONN);
    }
    s.check_fresh_client();
    s.stop();
    assert_fds_back_to(fds);
}
