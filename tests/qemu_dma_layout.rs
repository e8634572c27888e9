//! Server-to-client DMA messages in QEMU's layout: a client that announces
//! QEMU's capability keys (`pgsizes`, `max_dma_maps`) gets DMA_WRITE requests
//! with a 32-bit count and data at offset 12, and may answer DMA_READ with
//! QEMU's reply layout and DMA_WRITE with a bare header.

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::mpsc;

use vfio_user::device::{region, DmaSg, RegionSetup};
use vfio_user::protocol::{cmd, flags, Header, Wire, HEADER_SIZE};
use vfio_user::{Context, Errno};

const IOVA: u64 = 0x1000;

fn sock_path(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vfu-qemu-{tag}-{}.sock", std::process::id()))
}

fn serve(path: PathBuf, ready: mpsc::Sender<()>) {
    let ctx = Context::new(&path, 0, std::ptr::null_mut()).unwrap();
    ctx.setup_dma(16, None, None).unwrap();
    let stored = Rc::new(RefCell::new([0u8; 8]));
    let st = stored.clone();
    let cb = Rc::new(move |c: &Context, buf: &mut [u8], off: u64, write: bool| {
        let dma = c.dma().unwrap().clone();
        let mut sg = [DmaSg::default()];
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        match (off, write) {
            (0, true) => {
                dma.addr_to_sgl(IOVA, 8, &mut sg, prot)
                    .map_err(|_| Errno::EFAULT)?;
                let mut data = *b"ABCDEFGH";
                c.dma_transfer(&sg[0], &mut data, true, false)?;
            }
            (4, true) => {
                dma.addr_to_sgl(IOVA, 8, &mut sg, prot)
                    .map_err(|_| Errno::EFAULT)?;
                let mut data = [0u8; 8];
                c.dma_transfer(&sg[0], &mut data, false, false)?;
                *st.borrow_mut() = data;
            }
            (8, false) => buf.copy_from_slice(&st.borrow()[..buf.len()]),
            _ => return Err(Errno::EINVAL),
        }
        Ok(buf.len())
    }) as region::RegionCb;
    ctx.setup_region(
        0,
        RegionSetup {
            size: 4096,
            cb: Some(cb),
            flags: region::FLAG_RW | region::FLAG_MEM,
            mmap_areas: None,
            fd: None,
            offset: 0,
        },
    )
    .unwrap();
    ctx.realize().unwrap();
    ready.send(()).unwrap();
    ctx.attach().unwrap();
    assert_eq!(ctx.run().unwrap_err(), Errno::ENOTCONN);
}

fn send(s: &mut UnixStream, id: u16, command: u16, body: &[u8], reply: bool) {
    let h = Header {
        msg_id: id,
        cmd: command,
        msg_size: (HEADER_SIZE + body.len()) as u32,
        flags: if reply {
            flags::TYPE_REPLY
        } else {
            flags::TYPE_COMMAND
        },
        error_no: 0,
    };
    s.write_all(&h.encode()).unwrap();
    s.write_all(body).unwrap();
}

fn recv(s: &mut UnixStream) -> (Header, Vec<u8>) {
    let mut h = [0u8; HEADER_SIZE];
    s.read_exact(&mut h).unwrap();
    let h = Header::decode(&h);
    let mut body = vec![0u8; h.msg_size as usize - HEADER_SIZE];
    s.read_exact(&mut body).unwrap();
    (h, body)
}

fn region_write(off: u64, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&off.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(data);
    b
}

#[test]
fn dma_messages_use_qemu_layout_for_a_qemu_client() {
    let path = sock_path("layout");
    let _ = std::fs::remove_file(&path);
    let (tx, rx) = mpsc::channel();
    let p = path.clone();
    let server = std::thread::spawn(move || serve(p, tx));
    rx.recv().unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();

    let mut v = vec![0u8, 0, 2, 0];
    v.extend_from_slice(br#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535}}"#);
    v.push(0);
    send(&mut s, 1, cmd::VERSION, &v, false);
    let (h, _) = recv(&mut s);
    assert_eq!(h.flags & flags::ERROR, 0);

    // Map guest memory without an fd: reachable only through messages.
    let mut m = Vec::new();
    m.extend_from_slice(&32u32.to_le_bytes());
    m.extend_from_slice(&3u32.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&IOVA.to_le_bytes());
    m.extend_from_slice(&4096u64.to_le_bytes());
    send(&mut s, 2, cmd::DMA_MAP, &m, false);
    let (h, _) = recv(&mut s);
    assert_eq!(h.flags & flags::ERROR, 0, "map failed: {}", h.error_no);

    // The device writes 8 bytes: DMA_WRITE {addr u64, count u32, data, pad}.
    send(
        &mut s,
        3,
        cmd::REGION_WRITE,
        &region_write(0, &[1, 0, 0, 0]),
        false,
    );
    let (h, body) = recv(&mut s);
    assert_eq!(h.cmd, cmd::DMA_WRITE);
    assert_eq!(
        h.msg_size as usize,
        32 + 8,
        "QEMU expects sizeof(VFIOUserDMARW) + count"
    );
    assert_eq!(body[..].u64_at(0), Ok(IOVA));
    assert_eq!(body[..].u32_at(8), Ok(8));
    assert_eq!(&body[12..20], b"ABCDEFGH");
    send(&mut s, h.msg_id, cmd::DMA_WRITE, &[], true);
    let (h, _) = recv(&mut s);
    assert_eq!((h.cmd, h.flags & flags::ERROR), (cmd::REGION_WRITE, 0));

    // The device reads 8 bytes; QEMU answers {addr u64, count u32, data, pad}.
    send(
        &mut s,
        4,
        cmd::REGION_WRITE,
        &region_write(4, &[1, 0, 0, 0]),
        false,
    );
    let (h, body) = recv(&mut s);
    assert_eq!(h.cmd, cmd::DMA_READ);
    assert_eq!(body.len(), 16);
    assert_eq!(body[..].u32_at(8), Ok(8));
    let mut r = Vec::new();
    r.extend_from_slice(&IOVA.to_le_bytes());
    r.extend_from_slice(&8u32.to_le_bytes());
    r.extend_from_slice(b"qemu-mem");
    r.extend_from_slice(&[0; 4]);
    send(&mut s, h.msg_id, cmd::DMA_READ, &r, true);
    let (h, _) = recv(&mut s);
    assert_eq!((h.cmd, h.flags & flags::ERROR), (cmd::REGION_WRITE, 0));

    let mut rd = Vec::new();
    rd.extend_from_slice(&8u64.to_le_bytes());
    rd.extend_from_slice(&0u32.to_le_bytes());
    rd.extend_from_slice(&8u32.to_le_bytes());
    send(&mut s, 5, cmd::REGION_READ, &rd, false);
    let (h, body) = recv(&mut s);
    assert_eq!(h.flags & flags::ERROR, 0);
    assert_eq!(&body[16..24], b"qemu-mem");

    drop(s);
    server.join().unwrap();
}

/// A command the client sends while the server waits on the main socket for
/// the reply to its own DMA_WRITE is kept and handled afterwards, not
/// mistaken for the reply (no twin socket, spec layout).
#[test]
fn command_sent_during_server_dma_is_deferred() {
    let path = sock_path("defer");
    let _ = std::fs::remove_file(&path);
    let (tx, rx) = mpsc::channel();
    let p = path.clone();
    let server = std::thread::spawn(move || serve(p, tx));
    rx.recv().unwrap();
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut v = vec![0u8, 0, 2, 0];
    v.extend_from_slice(br#"{"capabilities":{"max_msg_fds":8}}"#);
    v.push(0);
    send(&mut s, 1, cmd::VERSION, &v, false);
    recv(&mut s);
    let mut m = Vec::new();
    m.extend_from_slice(&32u32.to_le_bytes());
    m.extend_from_slice(&3u32.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    m.extend_from_slice(&IOVA.to_le_bytes());
    m.extend_from_slice(&4096u64.to_le_bytes());
    send(&mut s, 2, cmd::DMA_MAP, &m, false);
    recv(&mut s);

    send(
        &mut s,
        3,
        cmd::REGION_WRITE,
        &region_write(0, &[1, 0, 0, 0]),
        false,
    );
    let (dma, body) = recv(&mut s);
    assert_eq!(dma.cmd, cmd::DMA_WRITE);
    assert_eq!(body[..].u64_at(8), Ok(8), "spec layout: 64-bit count");
    assert_eq!(&body[16..24], b"ABCDEFGH");
    // Before answering, ask for device info.
    let mut info = Vec::new();
    info.extend_from_slice(&16u32.to_le_bytes());
    info.extend_from_slice(&[0; 12]);
    send(&mut s, 4, cmd::DEVICE_GET_INFO, &info, false);
    let mut r = Vec::new();
    r.extend_from_slice(&IOVA.to_le_bytes());
    r.extend_from_slice(&8u64.to_le_bytes());
    send(&mut s, dma.msg_id, cmd::DMA_WRITE, &r, true);
    let (h, _) = recv(&mut s);
    assert_eq!(
        (h.msg_id, h.cmd, h.flags & flags::ERROR),
        (3, cmd::REGION_WRITE, 0)
    );
    let (h, body) = recv(&mut s);
    assert_eq!(
        (h.msg_id, h.cmd, h.flags & flags::ERROR),
        (4, cmd::DEVICE_GET_INFO, 0)
    );
    assert_eq!(body[..].u32_at(8), Ok(9));
    drop(s);
    server.join().unwrap();
}
