//! A hostile client against a live server: lying sizes, overflowing
//! fields, out-of-range indexes, wrong, missing and surplus fds, replies
//! where commands belong, messages cut at every byte, clients that vanish
//! at every byte, stall, or flood without reading.
//!
//! Every case asserts the exact outcome (the errno of the reply, or that
//! the connection is dropped), then that the context still serves a fresh
//! client, and that the process has the fds it had before.

mod robust_common;

use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use robust_common::*;
use vfio_user::device::dma_msg::{
    DMA_REGION_MMAP, DMA_REGION_READ, DMA_REGION_WRITE, DMA_UNMAP_ALL, DMA_UNMAP_GET_DIRTY_BITMAP,
};
use vfio_user::device::{irq, migration};
use vfio_user::protocol::{
    cmd, flags, Header, HEADER_SIZE, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE, SERVER_MAX_MSG_SIZE,
};
use vfio_user::Errno;

const EINVAL: i32 = libc::EINVAL;
const RW: u32 = DMA_REGION_READ | DMA_REGION_WRITE;

/// Runs `f` against a fresh server, then checks that a fresh client is
/// served and that no fd leaked.
fn with_server(tag: &str, f: impl FnOnce(&Server)) {
    let _g = serial();
    let fds = open_fds();
    let s = Server::start(tag, Options::default());
    f(&s);
    s.check_fresh_client();
    s.stop();
    assert_fds_back_to(fds);
}

fn hdr(id: u16, command: u16, msg_size: u32, fl: u32) -> Header {
    Header {
        msg_id: id,
        cmd: command,
        msg_size,
        flags: fl,
        error_no: 0,
    }
}

/// The reply to `id` is an error with `errno`.
fn assert_err_reply(c: &mut Raw, id: u16, command: u16, errno: i32) {
    let r = c.reply(id, command);
    assert_eq!(r.hdr.flags & flags::ERROR, flags::ERROR, "{:?}", r.hdr);
    assert_eq!(r.hdr.error_no, errno as u32, "{:?}", r.hdr);
    assert!(r.body.is_empty());
}

#[test]
fn msg_size_lies() {
    with_server("size", |s| {
        let mut c = Raw::connect(&s.path);

        // Smaller than the payload: the server takes the 16-byte header as a
        // whole (bodiless) GET_INFO and refuses it, then reads the body as
        // the next header: id 0x1234, command 4, size 0 -> refused too.
        let id = c.id();
        let garbage = body(&[&[0x34, 0x12, 4, 0], &[0; 12]]);
        c.send_msg(&hdr(id, cmd::DEVICE_GET_INFO, 16, 0), &garbage, &[]);
        assert_err_reply(&mut c, id, cmd::DEVICE_GET_INFO, EINVAL);
        assert_err_reply(&mut c, 0x1234, cmd::DEVICE_GET_INFO, EINVAL);

        // Larger than the payload: the body swallows the next message's
        // header and that message's body becomes a header (argsz 16 ->
        // id 16, command 0, size 0).
        let id = c.id();
        c.send_msg(&hdr(id, cmd::DEVICE_GET_INFO, 48, 0), &device_info(16), &[]);
        let next = c.send(cmd::DEVICE_GET_INFO, &device_info(16), &[]);
        let r = c.reply(id, cmd::DEVICE_GET_INFO);
        assert_eq!(r.hdr.flags & flags::ERROR, 0);
        assert_eq!(r.body.len(), 16);
        assert_ne!(next, 16);
        assert_err_reply(&mut c, 16, 0, EINVAL);

        // Impossible sizes: below the header, above the largest message.
        for size in [0, 8, 15, (SERVER_MAX_MSG_SIZE + 1) as u32, u32::MAX] {
            let id = c.id();
            c.send_msg(&hdr(id, cmd::DEVICE_GET_INFO, size, 0), &[], &[]);
            assert_err_reply(&mut c, id, cmd::DEVICE_GET_INFO, EINVAL);
        }
        // Header only: refused except for DEVICE_RESET.
        let id = c.id();
        c.send_msg(&hdr(id, cmd::REGION_READ, 16, 0), &[], &[]);
        assert_err_reply(&mut c, id, cmd::REGION_READ, EINVAL);
        assert!(c.expect_ok(cmd::DEVICE_RESET, &[], &[]).is_empty());

        // Still in step.
        assert_eq!(
            c.expect_ok(cmd::DEVICE_GET_INFO, &device_info(16), &[])
                .len(),
            16
        );
    });
}

#[test]
fn argsz_lies() {
    with_server("argsz", |s| {
        let mut c = Raw::connect(&s.path);
        c.expect_err(cmd::DEVICE_GET_INFO, &device_info(8), &[], EINVAL);
        c.expect_err(cmd::DEVICE_GET_INFO, &device_info(16)[..8], &[], EINVAL);
        // A larger argsz only says the client has room.
        let r = c.expect_ok(cmd::DEVICE_GET_INFO, &device_info(u32::MAX), &[]);
        assert_eq!(&r[..4], &16u32.to_le_bytes());

        c.expect_err(
            cmd::DEVICE_GET_REGION_INFO,
            &region_info(0, 31),
            &[],
            EINVAL,
        );
        // BAR2: 32 bytes of info, 16 of sparse-mmap header, 2 areas.
        let full = c.expect_ok(cmd::DEVICE_GET_REGION_INFO, &region_info(2, u32::MAX), &[]);
        assert_eq!(full.len(), 80);
        assert_eq!(&full[..4], &80u32.to_le_bytes());
        // Too small for the capabilities: truncated to argsz, argsz says
        // what is needed.
        let short = c.call(cmd::DEVICE_GET_REGION_INFO, &region_info(2, 40), &[]);
        assert_eq!(short.body.len(), 32);
        assert_eq!(&short.body[..4], &80u32.to_le_bytes());
        assert!(short.fds.is_empty());

        c.expect_err(
            cmd::DEVICE_GET_IRQ_INFO,
            &irq_info(irq::MSIX, 15),
            &[],
            EINVAL,
        );
        let io = |argsz: u32| body(&[&le32(argsz), &le32(0), &le32(0), &le32(0)]);
        c.expect_err(cmd::DEVICE_GET_REGION_IO_FDS, &io(15), &[], EINVAL);
        c.expect_err(cmd::DEVICE_GET_REGION_IO_FDS, &io(u32::MAX), &[], EINVAL);

        c.expect_err(
            cmd::DMA_MAP,
            &dma_map(31, RW, 0, 0x1000, 0x1000),
            &[],
            EINVAL,
        );
        c.expect_err(
            cmd::DMA_UNMAP,
            &dma_unmap(23, 0, 0x1000, 0x1000),
            &[],
            EINVAL,
        );
        c.expect_err(
            cmd::DMA_UNMAP,
            &dma_unmap(u32::MAX, 0, 0x1000, 0x1000),
            &[],
            EINVAL,
        );

        let feat = |argsz: u32, fl: u32| body(&[&le32(argsz), &le32(fl)]);
        let get_mig = migration::VFIO_DEVICE_FEATURE_GET | migration::VFIO_DEVICE_FEATURE_MIGRATION;
        c.expect_err(cmd::DEVICE_FEATURE, &feat(15, get_mig), &[], EINVAL);
        assert_eq!(
            c.expect_ok(cmd::DEVICE_FEATURE, &feat(16, get_mig), &[])
                .len(),
            16
        );

        // MIG_DATA_READ: argsz below 8 + size (in a saving state).
        let set_state = |st: u32| {
            let fl = migration::VFIO_DEVICE_FEATURE_SET
                | migration::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;
            body(&[&le32(16), &le32(fl), &le32(st), &le32(0)])
        };
        c.expect_ok(
            cmd::DEVICE_FEATURE,
            &set_state(migration::VFIO_USER_DEVICE_STATE_PRE_COPY),
            &[],
        );
        let mig = |argsz: u32, size: u32| body(&[&le32(argsz), &le32(size)]);
        c.expect_err(cmd::MIG_DATA_READ, &mig(8 + 63, 64), &[], EINVAL);
        c.expect_err(cmd::MIG_DATA_READ, &mig(u32::MAX, u32::MAX), &[], EINVAL);
        let data = c.expect_ok(cmd::MIG_DATA_READ, &mig(8 + 64, 64), &[]);
        assert_eq!(data.len(), 8 + 64);
        c.expect_ok(
            cmd::DEVICE_FEATURE,
            &set_state(migration::VFIO_USER_DEVICE_STATE_RUNNING),
            &[],
        );
    });
}

#[test]
fn counts_and_offsets_overflowing_64_bits() {
    with_server("overflow", |s| {
        let mut c = Raw::connect(&s.path);
        for (off, count) in [(u64::MAX, 1), (u64::MAX - 3, 8), (0xff8, 16), (0, u32::MAX)] {
            c.expect_err(cmd::REGION_READ, &access(0, off, count, &[]), &[], EINVAL);
        }
        c.expect_err(
            cmd::REGION_WRITE,
            &access(0, u64::MAX - 3, 8, &[1; 8]),
            &[],
            EINVAL,
        );
        // The data must be exactly `count` bytes.
        c.expect_err(cmd::REGION_WRITE, &access(0, 0, 8, &[1; 4]), &[], EINVAL);
        c.expect_err(cmd::REGION_WRITE, &access(0, 0, 4, &[1; 8]), &[], EINVAL);

        // DMA: a range wrapping the address space, a size past the limit,
        // an empty one.
        let wrap = dma_map(32, RW, 0, u64::MAX - 0xfff, 0x2000);
        c.expect_err(cmd::DMA_MAP, &wrap, &[], EINVAL);
        c.expect_err(
            cmd::DMA_MAP,
            &dma_map(32, RW, 0, 0, u64::MAX),
            &[],
            libc::ENOSPC,
        );
        c.expect_err(cmd::DMA_MAP, &dma_map(32, RW, 0, 0x1000, 0), &[], EINVAL);
        let mem = memfd_64k();
        let huge_off = dma_map(32, RW | DMA_REGION_MMAP, u64::MAX - 0xfff, 0x1_0000, 0x1000);
        c.expect_err(cmd::DMA_MAP, &huge_off, &[mem.as_raw_fd()], EINVAL);
        c.expect_err(
            cmd::DMA_UNMAP,
            &dma_unmap(24, 0, u64::MAX, u64::MAX),
            &[],
            libc::ENOENT,
        );
        // A dirty bitmap whose size overflows argsz arithmetic.
        let bm = body(&[
            &dma_unmap(u32::MAX, DMA_UNMAP_GET_DIRTY_BITMAP, 0x1000, 0x1000),
            &le64(4096),
            &le64(u64::MAX),
        ]);
        c.expect_err(cmd::DMA_UNMAP, &bm, &[], EINVAL);

        // IRQs: start + count past u32.
        let set = set_irqs(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE,
            irq::MSIX,
            1,
            u32::MAX,
            &[],
        );
        c.expect_err(cmd::DEVICE_SET_IRQS, &set, &[], EINVAL);

        // REGION_WRITE_MULTI: a count that would overflow the size check.
        let wm = body(&[&le64(u64::MAX), &[0; 24]]);
        c.expect_err(cmd::REGION_WRITE_MULTI, &wm, &[], EINVAL);
        let wm = body(&[&le64(2), &le64(0), &le32(0), &le32(4), &[0; 8]]);
        c.expect_err(cmd::REGION_WRITE_MULTI, &wm, &[], EINVAL);

        // Dirty page report of a range wrapping the address space: nothing
        // is mapped there.
        let rep = body(&[
            &le32(u32::MAX),
            &le32(
                migration::VFIO_DEVICE_FEATURE_GET
                    | migration::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            ),
            &le64(u64::MAX - 0xfff),
            &le64(0x2000),
            &le64(4096),
        ]);
        c.expect_err(cmd::DEVICE_FEATURE, &rep, &[], libc::ENOENT);
    });
}

#[test]
fn regions_and_indexes_out_of_range() {
    with_server("range", |s| {
        let mut c = Raw::connect(&s.path);
        for idx in [9, 10, 0x8000_0000, u32::MAX] {
            c.expect_err(cmd::REGION_READ, &access(idx, 0, 4, &[]), &[], EINVAL);
            c.expect_err(cmd::REGION_WRITE, &access(idx, 0, 4, &[0; 4]), &[], EINVAL);
            c.expect_err(
                cmd::DEVICE_GET_REGION_INFO,
                &region_info(idx, 32),
                &[],
                EINVAL,
            );
        }
        // An unimplemented BAR has size 0: nothing is in range.
        c.expect_err(cmd::REGION_READ, &access(3, 0, 1, &[]), &[], EINVAL);
        // One byte past the end of BAR0.
        c.expect_err(cmd::REGION_READ, &access(0, 0xffd, 4, &[]), &[], EINVAL);
        assert_eq!(
            c.expect_ok(cmd::REGION_READ, &access(0, 0xffc, 4, &[]), &[])
                .len(),
            20
        );
        for idx in [5, 6, u32::MAX] {
            c.expect_err(cmd::DEVICE_GET_IRQ_INFO, &irq_info(idx, 16), &[], EINVAL);
        }
        let set = set_irqs(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE,
            irq::MSIX,
            MSIX_COUNT,
            1,
            &[],
        );
        c.expect_err(cmd::DEVICE_SET_IRQS, &set, &[], EINVAL);
        // Unknown commands, including the server-to-client ones.
        for command in [
            0,
            14,
            19,
            cmd::DMA_READ,
            cmd::DMA_WRITE,
            cmd::VERSION,
            u16::MAX,
        ] {
            c.expect_err(command, &[0; 8], &[], EINVAL);
        }
    });
}

#[test]
fn fds_too_many_wrong_and_missing() {
    with_server("fds", |s| {
        let mut c = Raw::connect(&s.path);
        // Surplus fds on a command that takes none are closed.
        let evs: Vec<_> = (0..64).map(|_| eventfd()).collect();
        let raw: Vec<RawFd> = evs.iter().map(|e| e.as_raw_fd()).collect();
        assert_eq!(
            c.expect_ok(cmd::DEVICE_GET_INFO, &device_info(16), &raw)
                .len(),
            16
        );

        // DMA_MAP: no fd for an mmap, an fd that cannot be mapped, extra fds.
        let map = dma_map(32, RW | DMA_REGION_MMAP, 0, 0x10000, 0x1000);
        c.expect_err(cmd::DMA_MAP, &map, &[], EINVAL);
        c.expect_err(cmd::DMA_MAP, &map, &[raw[0]], libc::ENODEV);
        let (sock, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        c.expect_err(cmd::DMA_MAP, &map, &[sock.as_raw_fd()], libc::ENODEV);
        let mem = memfd_64k();
        c.expect_ok(cmd::DMA_MAP, &map, &[mem.as_raw_fd(), raw[1], raw[2]]);
        assert_eq!(s.stats().dma_live, 1);
        c.expect_ok(cmd::DMA_UNMAP, &dma_unmap(24, DMA_UNMAP_ALL, 0, 0), &[]);
        assert_eq!(s.stats().dma_live, 0);

        // SET_IRQS: more fds than vectors, fds with a non-eventfd data type,
        // a socket or a pipe where an eventfd belongs (regression: SIGPIPE).
        let ev = |n: u32| {
            set_irqs(
                IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_EVENTFD,
                irq::MSIX,
                0,
                n,
                &[],
            )
        };
        c.expect_err(cmd::DEVICE_SET_IRQS, &ev(2), &raw[..3], EINVAL);
        c.expect_err(cmd::DEVICE_SET_IRQS, &ev(2), &raw[..1], EINVAL);
        let none = set_irqs(
            IRQ_SET_ACTION_TRIGGER | IRQ_SET_DATA_NONE,
            irq::MSIX,
            0,
            1,
            &[],
        );
        c.expect_err(cmd::DEVICE_SET_IRQS, &none, &raw[..1], EINVAL);
        c.expect_err(
            cmd::DEVICE_SET_IRQS,
            &ev(2),
            &[raw[0], sock.as_raw_fd()],
            EINVAL,
        );
        let mut p = [0; 2];
        // SAFETY: p has room for two fds.
        assert_eq!(unsafe { libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: closing the read end we own.
        unsafe { libc::close(p[0]) };
        c.expect_err(cmd::DEVICE_SET_IRQS, &ev(1), &[p[1]], EINVAL);
        // SAFETY: closing the write end we own.
        unsafe { libc::close(p[1]) };
        // Right ones work, and triggering them does not hurt.
        c.expect_ok(cmd::DEVICE_SET_IRQS, &ev(2), &raw[..2]);
        c.expect_ok(cmd::REGION_WRITE, &access(0, REG_IRQ, 8, &le64(1)), &[]);
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into v.
        let n = unsafe { libc::read(raw[1], &mut v as *mut u64 as *mut libc::c_void, 8) };
        assert_eq!((n, v), (8, 1));
        drop(c);
        assert_eq!(s.wait_ended(1), Errno::ENOTCONN);
    });
}

#[test]
fn replies_where_commands_belong_and_odd_flags() {
    with_server("flags", |s| {
        let mut c = Raw::connect(&s.path);
        for ty in [flags::TYPE_REPLY, 2, 0xf] {
            let id = c.id();
            c.send_msg(
                &hdr(id, cmd::DEVICE_GET_INFO, 32, ty),
                &device_info(16),
                &[],
            );
            assert_err_reply(&mut c, id, cmd::DEVICE_GET_INFO, EINVAL);
        }
        // An error number (even out of range) on a command means nothing.
        let id = c.id();
        let mut h = hdr(id, cmd::DEVICE_GET_INFO, 32, flags::ERROR);
        h.error_no = u32::MAX;
        c.send_msg(&h, &device_info(16), &[]);
        let r = c.reply(id, cmd::DEVICE_GET_INFO);
        assert_eq!((r.hdr.flags & flags::ERROR, r.hdr.error_no), (0, 0));
        // NO_REPLY: not even an error comes back; the next reply is the
        // next command's.
        let id = c.id();
        c.send_msg(
            &hdr(id, cmd::REGION_READ, 32, flags::NO_REPLY),
            &access(99, 0, 4, &[]),
            &[],
        );
        let id2 = c.send(cmd::DEVICE_GET_INFO, &device_info(16), &[]);
        assert_eq!(c.reply(id2, cmd::DEVICE_GET_INFO).hdr.error_no, 0);
    });
}

/// Maps a message-only DMA region and has the device read it: the server
/// sends DMA_READ to us and we answer with `answer`; returns the errno the
/// device got.
fn device_dma(c: &mut Raw, answer: impl FnOnce(&mut Raw, Header)) -> u64 {
    c.expect_ok(
        cmd::REGION_WRITE,
        &access(0, REG_DMA_IOVA, 8, &le64(0x10000)),
        &[],
    );
    c.expect_ok(
        cmd::REGION_WRITE,
        &access(0, REG_DMA_LEN, 8, &le64(16)),
        &[],
    );
    let id = c.send(cmd::REGION_WRITE, &access(0, REG_DMA_OP, 8, &le64(1)), &[]);
    let req = c.recv().expect("DMA request");
    assert_eq!(req.hdr.cmd, cmd::DMA_READ);
    assert_eq!(req.hdr.msg_type(), flags::TYPE_COMMAND);
    assert_eq!(&req.body[..16], &body(&[&le64(0x10000), &le64(16)])[..]);
    answer(c, req.hdr);
    let r = c.reply(id, cmd::REGION_WRITE);
    assert_eq!(r.hdr.error_no, 0);
    let v = c.expect_ok(cmd::REGION_READ, &access(0, REG_DMA_RESULT, 8, &[]), &[]);
    u64::from_le_bytes(v[16..24].try_into().unwrap())
}

#[test]
fn bad_replies_to_server_requests() {
    with_server("dmareply", |s| {
        let mut c = Raw::connect(&s.path);
        c.expect_ok(cmd::DMA_MAP, &dma_map(32, RW, 0, 0x10000, 0x1000), &[]);
        let reply_hdr = |h: Header, fl: u32, e: u32, size: usize| Header {
            msg_id: h.msg_id,
            cmd: h.cmd,
            msg_size: (HEADER_SIZE + size) as u32,
            flags: flags::TYPE_REPLY | fl,
            error_no: e,
        };
        let good = body(&[&le64(0x10000), &le64(16), &[7; 16]]);
        // A proper answer.
        let e = device_dma(&mut c, |c, h| {
            c.send_msg(&reply_hdr(h, 0, 0, 32), &good, &[])
        });
        assert_eq!(e, 0);
        // Error numbers: in range, zero, out of range.
        let e = device_dma(&mut c, |c, h| {
            c.send_msg(&reply_hdr(h, flags::ERROR, 5, 0), &[], &[])
        });
        assert_eq!(e, libc::EIO as u64);
        for bad in [0, 4097, u32::MAX] {
            let e = device_dma(&mut c, |c, h| {
                c.send_msg(&reply_hdr(h, flags::ERROR, bad, 0), &[], &[])
            });
            assert_eq!(e, EINVAL as u64, "error_no {bad}");
        }
        // Wrong id, wrong command, short data.
        let e = device_dma(&mut c, |c, h| {
            let mut r = reply_hdr(h, 0, 0, 32);
            r.msg_id = r.msg_id.wrapping_add(1);
            c.send_msg(&r, &good, &[]);
        });
        assert_eq!(e, EINVAL as u64);
        let e = device_dma(&mut c, |c, h| {
            let mut r = reply_hdr(h, 0, 0, 32);
            r.cmd = cmd::DMA_WRITE;
            c.send_msg(&r, &good, &[]);
        });
        assert_eq!(e, EINVAL as u64);
        let e = device_dma(&mut c, |c, h| {
            c.send_msg(&reply_hdr(h, 0, 0, 20), &good[..20], &[])
        });
        assert_eq!(e, EINVAL as u64);
        // A command sent while the server waits for our answer is kept
        // and served right after the request that was waiting.
        c.expect_ok(
            cmd::REGION_WRITE,
            &access(0, REG_DMA_RESULT, 8, &le64(99)),
            &[],
        );
        let id = c.send(cmd::REGION_WRITE, &access(0, REG_DMA_OP, 8, &le64(1)), &[]);
        let req = c.recv().expect("DMA request");
        assert_eq!(req.hdr.cmd, cmd::DMA_READ);
        let later = c.send(cmd::DEVICE_GET_INFO, &device_info(16), &[]);
        c.send_msg(&reply_hdr(req.hdr, 0, 0, 32), &good, &[]);
        assert_eq!(c.reply(id, cmd::REGION_WRITE).hdr.error_no, 0);
        assert_eq!(c.reply(later, cmd::DEVICE_GET_INFO).body.len(), 16);
        let v = c.expect_ok(cmd::REGION_READ, &access(0, REG_DMA_RESULT, 8, &[]), &[]);
        assert_eq!(&v[16..24], &le64(0));
    });
}

#[test]
fn messages_split_at_every_byte_with_delays() {
    with_server("split", |s| {
        let mut c = Raw::connect(&s.path);
        for k in 1..40usize {
            let data = (k as u64).to_le_bytes();
            let id = c.id();
            let h = hdr(id, cmd::REGION_WRITE, 40, 0);
            let mut m = h.encode().to_vec();
            m.extend_from_slice(&access(0, 0x20, 8, &data));
            assert_eq!(m.len(), 40);
            c.send_bytes(&m[..k], &[]);
            std::thread::sleep(Duration::from_millis(2));
            c.send_bytes(&m[k..], &[]);
            assert_eq!(c.reply(id, cmd::REGION_WRITE).hdr.error_no, 0);
            let v = c.expect_ok(cmd::REGION_READ, &access(0, 0x20, 8, &[]), &[]);
            assert_eq!(&v[16..], &data);
        }
        // A DMA_MAP with its fd, split after its first byte (the fd travels
        // with that byte).
        let mem = memfd_64k();
        let id = c.id();
        let h = hdr(id, cmd::DMA_MAP, 48, 0);
        let mut m = h.encode().to_vec();
        m.extend_from_slice(&dma_map(32, RW | DMA_REGION_MMAP, 0, 0x20000, 0x1000));
        c.send_bytes(&m[..1], &[mem.as_raw_fd()]);
        std::thread::sleep(Duration::from_millis(2));
        c.send_bytes(&m[1..], &[]);
        assert_eq!(c.reply(id, cmd::DMA_MAP).hdr.error_no, 0);
        // Byte by byte.
        let id = c.id();
        let mut m = hdr(id, cmd::DEVICE_GET_INFO, 32, 0).encode().to_vec();
        m.extend_from_slice(&device_info(16));
        for b in &m {
            c.send_bytes(std::slice::from_ref(b), &[]);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(c.reply(id, cmd::DEVICE_GET_INFO).body.len(), 16);
    });
}

#[test]
fn disconnect_at_every_point_of_a_message() {
    with_server("cut", |s| {
        let mut sessions = 0;
        // During negotiation: the attach fails with the exact reason.
        let version = {
            let b = version_body(CAPS);
            let mut m = hdr(1, cmd::VERSION, (HEADER_SIZE + b.len()) as u32, 0)
                .encode()
                .to_vec();
            m.extend_from_slice(&b);
            m
        };
        for k in 0..version.len() {
            let mut c = Raw::connect_only(&s.path);
            c.send_bytes(&version[..k], &[]);
            drop(c);
            sessions += 1;
            let want = match k {
                0 | HEADER_SIZE => libc::ENOMSG,
                _ => libc::ECONNRESET,
            };
            assert_eq!(s.wait_ended(sessions), Errno(want), "cut at {k}");
        }
        // During a request: the session ends, and the write happened only
        // when the whole message arrived.
        let mut m = hdr(9, cmd::REGION_WRITE, 40, 0).encode().to_vec();
        m.extend_from_slice(&access(0, 0x40, 8, &[0xab; 8]));
        for k in 0..=m.len() {
            let writes = s.stats().bar0_writes;
            let mut c = Raw::connect(&s.path);
            // An fd rides along, to be closed whatever happens.
            let ev = eventfd();
            let fds = [ev.as_raw_fd()];
            c.send_bytes(&m[..k], if k > 0 { &fds } else { &[] });
            drop(c);
            sessions += 1;
            assert_eq!(s.wait_ended(sessions), Errno::ENOTCONN, "cut at {k}");
            let done = s.stats().bar0_writes - writes;
            assert_eq!(done, usize::from(k == m.len()), "cut at {k}");
        }
    });
}

#[test]
fn stalled_clients_are_dropped_idle_ones_are_not() {
    with_server("stall", |s| {
        // Idle for longer than the stall timeout: still served.
        let mut c = Raw::connect(&s.path);
        std::thread::sleep(Duration::from_millis(1500));
        assert_eq!(
            c.expect_ok(cmd::DEVICE_GET_INFO, &device_info(16), &[])
                .len(),
            16
        );
        drop(c);
        assert_eq!(s.wait_ended(1), Errno::ENOTCONN);
        // Stops in the middle of a header, then of a body: dropped after
        // the timeout (1 s here), the server serves others again.
        let m = {
            let mut m = hdr(5, cmd::REGION_WRITE, 40, 0).encode().to_vec();
            m.extend_from_slice(&access(0, 0x40, 8, &[1; 8]));
            m
        };
        let mut n = 1;
        for cut in [7, 30] {
            let mut c = Raw::connect(&s.path);
            let start = Instant::now();
            c.send_bytes(&m[..cut], &[]);
            c.expect_closed();
            let t = start.elapsed();
            assert!(t >= Duration::from_millis(900), "dropped after {t:?}");
            assert!(t < Duration::from_secs(5), "dropped after {t:?}");
            n += 1;
            assert_eq!(s.wait_ended(n), Errno::ENOTCONN);
        }
    });
}

#[test]
fn flooding_without_reading_replies() {
    with_server("flood", |s| {
        let mut c = Raw::connect(&s.path);
        let mut m = hdr(1, cmd::DEVICE_GET_INFO, 32, 0).encode().to_vec();
        m.extend_from_slice(&device_info(16));
        let batch: Vec<u8> = m.iter().copied().cycle().take(m.len() * 256).collect();
        let start = Instant::now();
        // A server that blocks forever would block us too.
        c.sock
            .set_write_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // The server stops reading once its replies fill the socket, then
        // gives up on us; our sends then fail.
        let err = loop {
            match sendmsg(&c.sock, &batch, &[]) {
                Ok(_) => {}
                Err(e) => break e,
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "server never gave up"
            );
        };
        assert_ne!(err, Errno::EAGAIN, "server blocked and never gave up");
        assert!(
            err == Errno(libc::EPIPE) || err == Errno(libc::ECONNRESET),
            "send failed with {err:?}"
        );
        assert_eq!(s.wait_ended(1), Errno::ENOTCONN);
        c.expect_closed();
    });
}

#[test]
fn a_flood_of_100k_commands_is_served_in_order() {
    with_server("flood100k", |s| {
        const N: usize = 100_000;
        let mut c = Raw::connect(&s.path);
        let sock = c.sock.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut buf = Vec::with_capacity(32 * 512);
            let mut id: u16 = 1000;
            for i in 0..N {
                let h = hdr(id, cmd::DEVICE_GET_INFO, 32, 0);
                buf.extend_from_slice(&h.encode());
                buf.extend_from_slice(&device_info(16));
                id = id.wrapping_add(1);
                if buf.len() >= 32 * 512 || i == N - 1 {
                    let mut done = 0;
                    while done < buf.len() {
                        done += sendmsg(&sock, &buf[done..], &[]).expect("send");
                    }
                    buf.clear();
                }
            }
        });
        let mut id: u16 = 1000;
        for _ in 0..N {
            let r = c.recv().expect("reply");
            assert_eq!(
                (r.hdr.msg_id, r.hdr.cmd, r.hdr.error_no),
                (id, cmd::DEVICE_GET_INFO, 0)
            );
            assert_eq!(r.body.len(), 16);
            id = id.wrapping_add(1);
        }
        writer.join().unwrap();
    });
}
