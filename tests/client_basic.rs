//! The client against a real server: negotiation, device/region/IRQ
//! information, region access, interrupts, reset and malformed requests.

mod client_common;

use std::os::fd::AsRawFd;
use std::time::Duration;

use client_common::*;
use vfio_user::client::{ClientError, ClientOptions, EventFd, DEFAULT_MAX_SEND_DATA};
use vfio_user::device::{irq, region, ResetType};
use vfio_user::protocol::{self, cmd, flags, Header};
use vfio_user::Errno;

const BAR0: u32 = region::BAR0 as u32;
const CFG: u32 = region::CFG as u32;

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

#[test]
fn negotiation_reports_the_server_capabilities() {
    let dev = Dev::default();
    let s = Server::device("caps", &dev, Features::default());
    let c = s.connect();
    assert_eq!(
        c.version(),
        (protocol::VERSION_MAJOR, protocol::VERSION_MINOR)
    );
    let caps = c.server_caps();
    assert_eq!(caps.max_msg_fds, protocol::SERVER_MAX_FDS);
    assert_eq!(caps.max_data_xfer_size, protocol::SERVER_MAX_DATA_XFER_SIZE);
    assert_eq!(caps.migration_pgsize, Some(page_size()));
    assert_eq!(caps.max_dma_maps, DMA_MAX_REGIONS);
    assert_eq!(caps.pgsizes, page_size());
    assert!(caps.write_multiple);
    assert_eq!(caps.twin_socket_fd_index, None);
    assert!(!c.has_twin_socket());
    assert!(c.server_caps_json().contains("max_msg_fds"));
    s.finish(c);
}

#[test]
fn negotiation_without_migration_or_dma_has_no_pgsize() {
    let dev = Dev::default();
    let s = Server::device(
        "nomig",
        &dev,
        Features {
            dma: false,
            migration: false,
            ioeventfd: None,
        },
    );
    let mut c = s.connect();
    assert_eq!(c.server_caps().migration_pgsize, None);
    // A device without DMA announces no DMA map limit at all.
    assert!(!c.server_caps_json().contains("max_dma_maps"));
    let e = c.migration_flags().unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    s.finish(c);
}

#[test]
fn twin_socket_is_negotiated_when_asked_for() {
    let dev = Dev::default();
    let s = Server::device("twin", &dev, Features::default());
    let mut c = s.connect_with(ClientOptions {
        twin_socket: true,
        ..ClientOptions::default()
    });
    assert!(c.has_twin_socket());
    assert_eq!(c.server_caps().twin_socket_fd_index, Some(0));
    // The main socket still works as before.
    assert_eq!(
        c.device_info().unwrap().num_regions,
        region::NUM_REGIONS as u32
    );
    s.finish(c);
}

#[test]
fn refused_negotiation_is_a_server_error() {
    let dev = Dev::default();
    let s = Server::device("badpg", &dev, Features::default());
    // Only the host page size is accepted as migration page size.
    let opts = ClientOptions {
        migration_pgsize: Some(page_size() * 2),
        ..ClientOptions::default()
    };
    let e = vfio_user::client::Client::connect_with(&s.path, opts).unwrap_err();
    match e {
        ClientError::Server { cmd: c, errno } => {
            assert_eq!(c, cmd::VERSION);
            assert_eq!(errno, Errno::EINVAL);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(s.join(), Err(Errno::EINVAL));
}

#[test]
fn connecting_to_nothing_is_an_io_error() {
    let p = sock_path("none");
    match vfio_user::client::Client::connect(&p) {
        Err(ClientError::Io(e)) => assert_eq!(e, Errno::ENOENT),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn device_and_irq_info() {
    let dev = Dev::default();
    let s = Server::device("info", &dev, Features::default());
    let mut c = s.connect();
    let d = c.device_info().unwrap();
    assert_eq!(d.argsz, protocol::DEVICE_INFO_SIZE as u32);
    assert_eq!(
        d.flags,
        protocol::DEVICE_FLAGS_PCI | protocol::DEVICE_FLAGS_RESET
    );
    assert_eq!(d.num_regions, region::NUM_REGIONS as u32);
    assert_eq!(d.num_irqs, irq::NUM_IRQ_TYPES as u32);

    let i = c.irq_info(irq::MSIX).unwrap();
    assert_eq!((i.index, i.count), (irq::MSIX, MSIX_COUNT));
    assert_ne!(i.flags & protocol::IRQ_INFO_EVENTFD, 0);
    assert_eq!(c.irq_info(irq::ERR).unwrap().count, 1);
    assert_eq!(c.irq_info(irq::INTX).unwrap().count, 0);
    let e = c.irq_info(irq::NUM_IRQ_TYPES as u32).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    s.finish(c);
}

#[test]
fn region_info_with_sparse_mmap_and_fd() {
    let dev = Dev::default();
    let s = Server::device("rinfo", &dev, Features::default());
    let mut c = s.connect();

    let r = c.region_info(BAR0).unwrap();
    assert_eq!(
        (r.index, r.size, r.argsz),
        (BAR0, BAR0_SIZE as u64, protocol::REGION_INFO_SIZE as u32)
    );
    assert_eq!(
        r.flags,
        protocol::REGION_INFO_FLAG_READ | protocol::REGION_INFO_FLAG_WRITE
    );
    assert!(r.sparse_mmap.is_none() && r.fd.is_none());

    // A 32-byte argsz gets the fixed part and the size really needed.
    let small = c
        .region_info_argsz(2, protocol::REGION_INFO_SIZE as u32)
        .unwrap();
    assert_eq!(small.argsz as usize, 32 + 16 + 2 * 16);
    assert!(small.fd.is_none() && small.sparse_mmap.is_none());
    assert_eq!(small.flags & protocol::REGION_INFO_FLAG_CAPS, 0);

    // region_info asks again and gets the capability and the fd.
    let r = c.region_info(2).unwrap();
    assert_eq!(r.size, BAR2_SIZE);
    assert_ne!(r.flags & protocol::REGION_INFO_FLAG_MMAP, 0);
    assert_ne!(r.flags & protocol::REGION_INFO_FLAG_CAPS, 0);
    assert_eq!(r.cap_offset, protocol::REGION_INFO_SIZE as u32);
    assert_eq!(r.sparse_mmap, Some(vec![(0, 0x1000), (0x2000, 0x1000)]));
    let fd = r.fd.expect("region fd");
    let mut b = [0u8; 11];
    // SAFETY: pread into a live buffer of the stated size.
    let n = unsafe {
        libc::pread(
            fd.as_raw_fd(),
            b.as_mut_ptr() as *mut libc::c_void,
            b.len(),
            (r.offset + 0x2000) as i64,
        )
    };
    assert_eq!(n, 11);
    assert_eq!(&b, b"bar2 area 1");

    let cfg = c.region_info(CFG).unwrap();
    assert_eq!(cfg.size, 256);
    assert_eq!(c.region_info(1).unwrap().size, 0);
    assert_eq!(
        c.region_info(region::NUM_REGIONS as u32)
            .unwrap_err()
            .server_errno(),
        Some(Errno::EINVAL)
    );
    s.finish(c);
}

#[test]
fn region_io_fds_lists_the_ioeventfd() {
    let efd = EventFd::new().unwrap();
    let dev = Dev::default();
    let s = Server::device(
        "iofds",
        &dev,
        Features {
            ioeventfd: Some(efd.as_raw_fd()),
            ..Features::default()
        },
    );
    let mut c = s.connect();
    let r = c.region_io_fds(BAR0).unwrap();
    assert_eq!(r.index, BAR0);
    assert_eq!(r.entries.len(), 1);
    assert_eq!(
        r.argsz as usize,
        protocol::REGION_IO_FDS_SIZE + protocol::SUB_REGION_IOEVENTFD_SIZE
    );
    assert_eq!(protocol::SUB_REGION_IOEVENTFD_SIZE, 48);
    let e = r.entries[0];
    assert_eq!(
        (e.gpa_offset, e.size, e.datamatch),
        (IOEVENTFD_OFFSET, 4, IOEVENTFD_DATAMATCH)
    );
    assert_eq!(e.kind, protocol::IO_FD_TYPE_IOEVENTFD);
    assert_eq!(r.fds.len(), 1);
    assert_eq!(e.fd_index, 0);
    // The fd passed is the device's eventfd.
    let v: u64 = 3;
    // SAFETY: writes 8 bytes from a live u64.
    let n = unsafe {
        libc::write(
            r.fds[0].as_raw_fd(),
            &v as *const u64 as *const libc::c_void,
            8,
        )
    };
    assert_eq!(n, 8);
    assert_eq!(efd.wait(Duration::from_secs(1)), Some(3));
    // A region without ioeventfds.
    let none = c.region_io_fds(CFG).unwrap();
    assert!(none.entries.is_empty() && none.fds.is_empty());
    s.finish(c);
}

/// Shadow ioeventfds (upstream: only with its shadow-ioeventfd build option;
/// here always): listed with the shadow type, the shadow memory fd passed
/// along (once, however many entries use it) and mapping the device's
/// memory, a bad fd refused.
#[test]
fn region_io_fds_lists_shadow_ioeventfds() {
    use vfio_user::client::GuestMemory;
    use vfio_user::device::IoEventFd;
    let efd = EventFd::new().unwrap();
    let shadow = GuestMemory::new(0x1000).unwrap();
    let (e_raw, s_raw) = (efd.as_raw_fd(), shadow.fd().as_raw_fd());
    let dev = Dev::default();
    let d = dev.clone();
    let s = Server::start("shadowfds", move |ctx| {
        let keep = setup_device(ctx, d, Features::default())?;
        let ioe = |off: u64, shadow_fd: i32, shadow_offset: u64| IoEventFd {
            gpa_offset: off,
            size: 4,
            fd: e_raw,
            flags: 0,
            datamatch: 0,
            shadow_fd,
            shadow_offset,
        };
        // Not an fd at all.
        assert_eq!(
            ctx.create_ioeventfd(region::BAR0, ioe(0x8, -2, 0)),
            Err(Errno::EINVAL)
        );
        ctx.create_ioeventfd(region::BAR0, ioe(0x8, s_raw, 0x10))?;
        ctx.create_ioeventfd(region::BAR0, ioe(0x20, -1, 0))?;
        ctx.create_ioeventfd(region::BAR0, ioe(0x30, s_raw, 0x40))?;
        Ok(keep)
    });
    let mut c = s.connect();
    let r = c.region_io_fds(BAR0).unwrap();
    assert_eq!(r.entries.len(), 3);
    // The eventfd and the shadow memory, each passed once.
    assert_eq!(r.fds.len(), 2);
    // Newest first.
    let (a, b, e) = (r.entries[0], r.entries[1], r.entries[2]);
    assert_eq!(
        (a.gpa_offset, b.gpa_offset, e.gpa_offset),
        (0x30, 0x20, 0x8)
    );
    assert_eq!(a.kind, protocol::IO_FD_TYPE_IOEVENTFD_SHADOW);
    assert_eq!(b.kind, protocol::IO_FD_TYPE_IOEVENTFD);
    assert_eq!(e.kind, protocol::IO_FD_TYPE_IOEVENTFD_SHADOW);
    assert_eq!(
        (a.fd_index, a.shadow_fd_index, a.shadow_offset),
        (0, 1, 0x40)
    );
    assert_eq!((b.fd_index, b.shadow_fd_index, b.shadow_offset), (0, 0, 0));
    assert_eq!(
        (e.fd_index, e.shadow_fd_index, e.shadow_offset),
        (0, 1, 0x10)
    );
    // The shadow fd maps the device's shadow memory.
    let len = 0x1000;
    // SAFETY: a fresh shared mapping of a 4 KiB memfd, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            r.fds[1].as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: offset 0x10 + 4 is inside the mapping.
    unsafe { std::ptr::write_unaligned(p.cast::<u8>().add(0x10).cast::<u32>(), 0xfeed) };
    // SAFETY: p/len is the mapping made above.
    unsafe { libc::munmap(p, len) };
    assert_eq!(shadow.read_vec(0x10, 4).unwrap(), 0xfeedu32.to_le_bytes());
    s.finish(c);
    drop(shadow);
    drop(efd);
}

#[test]
fn region_read_and_write_go_through_the_callback() {
    let dev = Dev::default();
    let s = Server::device("rw", &dev, Features::default());
    let mut c = s.connect();
    c.region_write(BAR0, 0x10, b"hello").unwrap();
    assert_eq!(c.region_read(BAR0, 0x10, 5).unwrap(), b"hello");
    assert_eq!(&dev.lock().bar0[0x10..0x15], b"hello");
    {
        let st = dev.lock();
        assert!(st.accesses.contains(&(0x10, 5, true)));
        assert!(st.accesses.contains(&(0x10, 5, false)));
    }
    // The whole region in one read.
    let all = c.region_read(BAR0, 0, BAR0_SIZE).unwrap();
    assert_eq!(all.len(), BAR0_SIZE);
    assert_eq!(&all[0x10..0x15], b"hello");
    // Past the end.
    let e = c.region_read(BAR0, BAR0_SIZE as u64 - 2, 4).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    let e = c.region_write(BAR0, BAR0_SIZE as u64, b"x").unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    s.finish(c);
}

#[test]
fn large_accesses_are_split_by_the_server_transfer_size() {
    const BIG: u64 = 4 << 20;
    let dev = Dev::default();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = Server::start("split", {
        let (dev, seen) = (dev.clone(), seen.clone());
        move |ctx| {
            let keep = setup_device(ctx, dev, Features::default())?;
            let store = std::rc::Rc::new(std::cell::RefCell::new(vec![0u8; BIG as usize]));
            let cb = move |_ctx: &vfio_user::Context, buf: &mut [u8], off: u64, w: bool| {
                seen.lock().unwrap().push((off, buf.len(), w));
                let mut m = store.borrow_mut();
                let r = off as usize..off as usize + buf.len();
                if w {
                    m[r].copy_from_slice(buf);
                } else {
                    buf.copy_from_slice(&m[r]);
                }
                Ok(buf.len())
            };
            ctx.setup_region(
                4,
                vfio_user::device::RegionSetup {
                    size: BIG,
                    cb: Some(std::rc::Rc::new(cb)),
                    flags: region::FLAG_RW | region::FLAG_MEM,
                    mmap_areas: None,
                    fd: None,
                    offset: 0,
                },
            )?;
            Ok(keep)
        }
    });
    // With no send limit of our own, writes are split like reads.
    let mut c = s.connect_with(ClientOptions {
        max_send_data: usize::MAX,
        ..ClientOptions::default()
    });
    let max = c.server_caps().max_data_xfer_size;
    let len = max + max / 2;
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    c.region_write(4, 0x100, &data).unwrap();
    assert_eq!(c.region_read(4, 0x100, len).unwrap(), data);
    let got = std::mem::take(&mut *seen.lock().unwrap());
    let m = max as u64;
    assert_eq!(
        got,
        vec![
            (0x100, max, true),
            (0x100 + m, max / 2, true),
            (0x100, max, false),
            (0x100 + m, max / 2, false)
        ]
    );
    // By default, writes go in pieces of DEFAULT_MAX_SEND_DATA (what a
    // server taking a body with one recv() gets whole); reads do not.
    c.set_max_send_data(DEFAULT_MAX_SEND_DATA).unwrap();
    c.region_write(4, 0x100, &data).unwrap();
    assert_eq!(c.region_read(4, 0x100, len).unwrap(), data);
    let got = std::mem::take(&mut *seen.lock().unwrap());
    let piece = DEFAULT_MAX_SEND_DATA;
    let writes: Vec<_> = got.iter().filter(|a| a.2).cloned().collect();
    let want: Vec<_> = (0..len.div_ceil(piece))
        .map(|i| (0x100 + (i * piece) as u64, piece.min(len - i * piece), true))
        .collect();
    assert_eq!(writes, want);
    let reads: Vec<_> = got.iter().filter(|a| !a.2).cloned().collect();
    assert_eq!(
        reads,
        vec![(0x100, max, false), (0x100 + m, max / 2, false)]
    );
    assert!(c.set_max_send_data(0).is_err());
    s.finish(c);
}

#[test]
fn posted_writes_need_no_reply() {
    let dev = Dev::default();
    let s = Server::device("posted", &dev, Features::default());
    let mut c = s.connect();
    c.region_write_posted(BAR0, 0x20, b"abcd").unwrap();
    c.region_write_posted(BAR0, 0x24, b"efgh").unwrap();
    // The next request's reply is the next message on the socket: the posted
    // writes produced none, and were executed in order before it.
    assert_eq!(c.region_read(BAR0, 0x20, 8).unwrap(), b"abcdefgh");
    // A posted write the server refuses is silent too.
    c.region_write_posted(BAR0, BAR0_SIZE as u64, b"z").unwrap();
    assert_eq!(c.region_read(BAR0, 0x20, 4).unwrap(), b"abcd");
    s.finish(c);
}

#[test]
fn write_multi_applies_every_write() {
    let dev = Dev::default();
    let s = Server::device("multi", &dev, Features::default());
    let mut c = s.connect();
    c.region_write_multi(&[
        (BAR0, 0x30, &b"12345678"[..]),
        (BAR0, 0x38, b"9"),
        (BAR0, 0x40, b"ab"),
    ])
    .unwrap();
    assert_eq!(c.region_read(BAR0, 0x30, 9).unwrap(), b"123456789");
    assert_eq!(c.region_read(BAR0, 0x40, 2).unwrap(), b"ab");
    // More than 8 bytes in one entry is refused locally.
    assert!(matches!(
        c.region_write_multi(&[(BAR0, 0, &[0u8; 9][..])]),
        Err(ClientError::InvalidArgument(_))
    ));
    // A bad entry fails the request.
    let e = c
        .region_write_multi(&[(BAR0, BAR0_SIZE as u64, &b"x"[..])])
        .unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    s.finish(c);
}

#[test]
fn config_space_has_the_ids() {
    let dev = Dev::default();
    let s = Server::device("cfg", &dev, Features::default());
    let mut c = s.connect();
    let id = c.region_read(CFG, 0, 4).unwrap();
    assert_eq!(u16::from_le_bytes([id[0], id[1]]), VENDOR);
    assert_eq!(u16::from_le_bytes([id[2], id[3]]), DEVICE);
    let sub = c.region_read(CFG, 0x2c, 4).unwrap();
    assert_eq!(u16::from_le_bytes([sub[0], sub[1]]), SUBSYS_VENDOR);
    assert_eq!(u16::from_le_bytes([sub[2], sub[3]]), SUBSYS);
    // The vendor ID is read-only.
    let _ = c.region_write(CFG, 0, &[0xff, 0xff]);
    assert_eq!(c.region_read(CFG, 0, 2).unwrap(), VENDOR.to_le_bytes());
    s.finish(c);
}

#[test]
fn interrupts_reach_the_eventfds() {
    let dev = Dev::default();
    let s = Server::device("irq", &dev, Features::default());
    let mut c = s.connect();
    let e: Vec<EventFd> = (0..MSIX_COUNT).map(|_| EventFd::new().unwrap()).collect();
    c.set_irqs(irq::MSIX, 0, &e).unwrap();

    write_reg(&mut c, REG_IRQ, 2);
    assert_eq!(read_reg(&mut c, REG_IRQ_RESULT), 0);
    assert_eq!(e[2].wait(Duration::from_secs(2)), Some(1));
    assert_eq!(e[0].try_read(), None);

    // DATA_BOOL and DATA_NONE triggers from the client.
    c.set_irqs_bool(irq::MSIX, 0, &[true, false]).unwrap();
    assert_eq!(e[0].wait(Duration::from_secs(2)), Some(1));
    assert_eq!(e[1].try_read(), None);
    c.set_irqs_none(irq::MSIX, 3, 1).unwrap();
    assert_eq!(e[3].wait(Duration::from_secs(2)), Some(1));

    // Mask and unmask reach the device's callback.
    c.irq_mask(irq::MSIX, 1, 2).unwrap();
    c.irq_unmask(irq::MSIX, 1, 2).unwrap();
    assert_eq!(dev.lock().mask_changes, vec![(1, 2, true), (1, 2, false)]);

    // Disabling one vector takes its eventfd away.
    c.irq_disable(irq::MSIX, 2, 1).unwrap();
    write_reg(&mut c, REG_IRQ, 2);
    assert_eq!(read_reg(&mut c, REG_IRQ_RESULT), libc::ENOENT as u64);
    write_reg(&mut c, REG_IRQ, 1);
    assert_eq!(read_reg(&mut c, REG_IRQ_RESULT), 0);
    assert_eq!(e[1].wait(Duration::from_secs(2)), Some(1));

    // Disabling all of them.
    c.set_irqs_none(irq::MSIX, 0, 0).unwrap();
    write_reg(&mut c, REG_IRQ, 1);
    assert_eq!(read_reg(&mut c, REG_IRQ_RESULT), libc::ENOENT as u64);

    // Out of range.
    let err = c.set_irqs(irq::MSIX, MSIX_COUNT, &e[..1]).unwrap_err();
    assert_eq!(err.server_errno(), Some(Errno::EINVAL));
    s.finish(c);
}

#[test]
fn eventfds_beyond_max_msg_fds_are_sent_in_batches() {
    const N: u32 = 20;
    let dev = Dev::default();
    let s = Server::start("irqbatch", {
        let dev = dev.clone();
        move |ctx| {
            let keep = setup_device(ctx, dev, Features::default())?;
            ctx.setup_irq_count(irq::MSI, N)?;
            Ok(keep)
        }
    });
    let mut c = s.connect();
    assert!((N as usize) > c.server_caps().max_msg_fds);
    let e: Vec<EventFd> = (0..N).map(|_| EventFd::new().unwrap()).collect();
    c.set_irqs(irq::MSI, 0, &e).unwrap();
    // The shared vector table is what vfu_irq_trigger signals.
    write_reg(&mut c, REG_IRQ, (N - 1) as u64);
    assert_eq!(read_reg(&mut c, REG_IRQ_RESULT), 0);
    assert_eq!(e[N as usize - 1].wait(Duration::from_secs(2)), Some(1));
    s.finish(c);
}

#[test]
fn reset_calls_the_device() {
    let dev = Dev::default();
    let s = Server::device("reset", &dev, Features::default());
    let mut c = s.connect();
    c.reset().unwrap();
    assert_eq!(dev.lock().resets, vec![ResetType::Device]);
    s.finish(c);
    // The disconnect is a reset too (and, as upstream, destroying the
    // context resets the device once more).
    assert!(dev
        .lock()
        .resets
        .starts_with(&[ResetType::Device, ResetType::LostConn]));
}

#[test]
fn malformed_requests_get_error_replies() {
    let dev = Dev::default();
    let s = Server::device("raw", &dev, Features::default());
    let mut c = s.connect();

    // An unknown command.
    let id = c.next_msg_id();
    let h = Header {
        msg_id: id,
        cmd: 99,
        msg_size: 20,
        flags: flags::TYPE_COMMAND,
        error_no: 0,
    };
    c.send_raw(&h, &[0; 4], &[]).unwrap();
    let r = c.recv_reply().unwrap();
    assert_eq!((r.hdr.msg_id, r.hdr.cmd), (id, 99));
    assert_eq!(
        r.hdr.flags & (flags::ERROR | flags::TYPE_MASK),
        flags::ERROR | flags::TYPE_REPLY
    );
    assert_eq!(r.hdr.error_no, libc::EINVAL as u32);

    // A REGION_READ without its body.
    let id = c.next_msg_id();
    let h = Header {
        msg_id: id,
        cmd: cmd::REGION_READ,
        msg_size: 16,
        flags: flags::TYPE_COMMAND,
        error_no: 0,
    };
    c.send_raw(&h, &[], &[]).unwrap();
    let r = c.recv_reply().unwrap();
    assert_eq!((r.hdr.msg_id, r.hdr.error_no), (id, libc::EINVAL as u32));

    // A message typed as a reply.
    let id = c.next_msg_id();
    let h = Header {
        msg_id: id,
        cmd: cmd::DEVICE_GET_INFO,
        msg_size: 32,
        flags: flags::TYPE_REPLY,
        error_no: 0,
    };
    c.send_raw(&h, &[0; 16], &[]).unwrap();
    let r = c.recv_reply().unwrap();
    assert_eq!((r.hdr.msg_id, r.hdr.error_no), (id, libc::EINVAL as u32));

    // A DEVICE_GET_INFO whose argsz is too small.
    let id = c.next_msg_id();
    let h = Header {
        msg_id: id,
        cmd: cmd::DEVICE_GET_INFO,
        msg_size: 32,
        flags: flags::TYPE_COMMAND,
        error_no: 0,
    };
    c.send_raw(&h, &[8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[])
        .unwrap();
    let r = c.recv_reply().unwrap();
    assert_eq!((r.hdr.msg_id, r.hdr.error_no), (id, libc::EINVAL as u32));

    // The connection is still in step.
    assert_eq!(c.device_info().unwrap().num_irqs, irq::NUM_IRQ_TYPES as u32);
    s.finish(c);
}

#[test]
fn short_timeout_expires_on_a_stalled_server() {
    // A "server" that accepts and negotiates, then never answers.
    let path = sock_path("stall");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (sock, _) = l.accept().unwrap();
        let conn = vfio_user::transport::Conn::from_fd(sock.into());
        let rx = conn.recv_header(false).unwrap();
        let mut body = vec![0u8; rx.hdr.body_len().unwrap()];
        conn.recv_exact(&mut body).unwrap();
        let mut out = vec![0, 0, 2, 0];
        out.extend_from_slice(b"{}\0");
        conn.send(&rx.hdr.reply(out.len(), 0), &[&out], &[])
            .unwrap();
        // Swallow requests until the client leaves.
        while conn.recv_header(false).is_ok() {}
    });
    let opts = ClientOptions {
        timeout: Duration::from_millis(200),
        ..ClientOptions::default()
    };
    let mut c = vfio_user::client::Client::connect_with(&path, opts).unwrap();
    // Defaults for a server that announced nothing.
    assert_eq!(c.server_caps().max_msg_fds, 1);
    assert!(!c.server_caps().write_multiple);
    assert!(matches!(
        c.region_write_multi(&[(0, 0, &b"x"[..])]),
        Err(ClientError::Unsupported(_))
    ));
    let start = std::time::Instant::now();
    assert!(matches!(c.device_info(), Err(ClientError::Timeout)));
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(c);
    t.join().unwrap();
    let _ = std::fs::remove_file(&path);
}
