//! Fuzz target `session`: a whole client session against a real context.
//!
//! Each input builds a fresh non-blocking [`Context`] (regions including a
//! PCI Express config space with capabilities, DMA, IRQs, migration, quiesce
//! and reset callbacks), connects a client socket, negotiates, then writes
//! the input's messages — with fds of assorted kinds attached as the input
//! says — and runs the context after each one. A reader thread drains and
//! checks the replies, so the server never blocks on a full socket. Finally
//! the client hangs up and the context must detach cleanly.
//!
//! Checked: no panic (in the library or in the device callbacks' own
//! assertions), every reply well-formed, the context detaches and forgets
//! the client (no DMA region, no IRQ eventfd left), and the process has
//! exactly the fds it had before the input.
//!
//! Input layout: a configuration byte (bits 0-2 quiesce behaviour, 5
//! blocking context, 6 logging, 7 failing reset), the migration callback's
//! failure pattern, the version request's shape (see `version_msg`), then
//! messages, each
//! `[fd spec u8][fd kinds u16][len u16][len bytes]`; fd spec bit 7 attaches
//! `spec & 15` fds, bit 6 has the harness write the real length into the
//! header's `msg_size` (so mutated bodies stay framed).

#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::cell::{Cell, RefCell};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use common::Input;
use libfuzzer_sys::fuzz_target;
use vfio_user::device::{
    irq, pci, pci_caps, region, DmaInfo, DmaSg, IoEventFd, MigrationDevice, RegionSetup, ResetType,
};
use vfio_user::protocol::{cmd, flags, Header, HEADER_SIZE, SERVER_MAX_MSG_SIZE};
use vfio_user::{Context, Errno, Result};

/// fds the harness keeps for the whole run (region backing, ioeventfd, and
/// sources to duplicate for attachments).
struct Keep {
    bar2: OwnedFd,
    ioeventfd: OwnedFd,
    memfd: OwnedFd,
    sock: OwnedFd,
}

thread_local! {
    static KEEP: Keep = {
        let (a, _b) = UnixStream::pair().expect("socketpair");
        Keep {
            bar2: common::memfd(0x4000),
            ioeventfd: common::eventfd(),
            memfd: common::memfd(1 << 20),
            sock: OwnedFd::from(a),
        }
    };
}

/// How the device behaves, chosen by the input.
#[derive(Default)]
struct Dev {
    bar0: RefCell<Vec<u8>>,
    /// One of the `Q_*` behaviours.
    quiesce: Cell<u8>,
    /// Set once the client hung up: the device quiesces from then on (one
    /// that never does could keep the context attached forever).
    hung_up: Arc<AtomicBool>,
    reset_fails: Cell<bool>,
    mig_fails: Cell<u8>,
    /// DMA regions the device was told about.
    live: RefCell<Vec<(u64, u64)>>,
    /// The device may send DMA_READ/DMA_WRITE requests to the client (only
    /// when a thread other than the one running the context answers them).
    dma_messages: bool,
    dma_reg: Cell<usize>,
}

// Quiesce behaviours: no callback, quiesces at once (1), later (async),
// fails, later with an error.
const Q_NONE: u8 = 0;
const Q_ASYNC: u8 = 2;
const Q_FAIL: u8 = 3;
const Q_ASYNC_FAIL: u8 = 4;

fn bar0_cb(ctx: &Context, dev: &Dev, buf: &mut [u8], off: u64, w: bool) -> Result<usize> {
    let len = buf.len();
    let start = usize::try_from(off).map_err(|_| Errno::EINVAL)?;
    let end = start.checked_add(len).ok_or(Errno::EINVAL)?;
    // The context only passes in-range accesses.
    assert!(end <= 0x1000, "BAR0 access {start:#x}+{len} out of range");
    if start >= 0xf00 {
        return Err(Errno::EIO);
    }
    if start >= 0xe00 && len > 1 {
        return Ok(len - 1);
    }
    if !w {
        buf.copy_from_slice(&dev.bar0.borrow()[start..end]);
        return Ok(len);
    }
    dev.bar0.borrow_mut()[start..end].copy_from_slice(buf);
    let word = |o: usize| {
        let b = dev.bar0.borrow();
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    };
    match start {
        // Interrupts from inside a callback.
        0x100 => {
            let _ = ctx.irq_trigger((word(0x100) % 20) as u32);
            if let Some(i) = ctx.irqs() {
                let _ = i.trigger_special(irq::ERR);
                let _ = i.trigger_special(irq::REQ);
            }
        }
        // Translate guest memory (never touching it: the client decides
        // what backs it) and mark it dirty.
        0x118 => {
            if let Some(dma) = ctx.dma() {
                let (iova, len, op) = (word(0x108), word(0x110), word(0x118));
                let prot = if op & 1 != 0 {
                    libc::PROT_WRITE
                } else {
                    libc::PROT_READ
                };
                let mut sg = [DmaSg::default(); 4];
                if let Ok(n) = dma.addr_to_sgl(iova, len, &mut sg, prot) {
                    let mut iov = [libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: 0,
                    }; 4];
                    if dma.sgl_get(&sg[..n], &mut iov[..n]).is_ok() {
                        for (s, v) in sg[..n].iter().zip(&iov[..n]) {
                            assert_eq!(v.iov_len as u64, s.length);
                            assert!(!v.iov_base.is_null());
                        }
                    }
                    dma.sgl_put(&sg[..n]);
                }
                dma.mark_dirty_range(iova, len);
            }
        }
        // A DMA transfer through messages to the client (whose reader
        // thread answers), while the client keeps sending requests.
        0x128 if dev.dma_messages => {
            if let Some(dma) = ctx.dma() {
                let (iova, len, op) = (word(0x108), word(0x110).min(512), word(0x128));
                let prot = if op & 1 != 0 {
                    libc::PROT_WRITE
                } else {
                    libc::PROT_READ
                };
                let mut sg = [DmaSg::default(); 2];
                if let Ok(n) = dma.addr_to_sgl(iova, len, &mut sg, prot) {
                    for s in &sg[..n] {
                        let mut data = vec![0x3c; s.length as usize];
                        // Never direct: touching a mapping past the end
                        // of the client's file raises SIGBUS, which a
                        // client can always arrange (it may truncate the
                        // file after mapping it), and upstream's own tests
                        // map regions larger than their files.
                        let r = ctx.dma_transfer(s, &mut data, op & 1 != 0, false);
                        if r == Err(Errno::ENOTCONN) {
                            // The client is gone: the context has forgotten
                            // it, unless the device has yet to quiesce (or
                            // refuses to).
                            assert!(
                                !ctx.is_attached()
                                    || matches!(dev.quiesce.get(), Q_ASYNC | Q_FAIL | Q_ASYNC_FAIL)
                            );
                            break;
                        }
                    }
                }
            }
        }
        // Read config space from inside a callback.
        0x120 => {
            if let Some(p) = ctx.pci() {
                let mut b = [0u8; 8];
                let _ = p.read_raw((word(0x120) % 0x1000) as usize, &mut b);
                let _ = p.find_capability(false, pci_caps::CAP_ID_MSIX.into());
            }
        }
        _ => {}
    }
    Ok(len)
}

struct Mig(Rc<Dev>);

impl MigrationDevice for Mig {
    fn transition(&self, _ctx: &Context, state: u32) -> Result<()> {
        assert!(state <= 4, "transition to vfu state {state}");
        let f = self.0.mig_fails.get();
        self.0.mig_fails.set(f.rotate_right(1));
        if f & 1 != 0 {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }
    fn read_data(&self, _ctx: &Context, buf: &mut [u8]) -> Result<usize> {
        let n = buf.len().min(100);
        buf[..n].fill(0x6d);
        Ok(n)
    }
    fn write_data(&self, _ctx: &Context, buf: &[u8]) -> Result<usize> {
        Ok(buf.len())
    }
}

/// The harness's fds the device's setup names (not owned).
#[derive(Clone, Copy)]
struct DevFds {
    bar2: RawFd,
    ioeventfd: RawFd,
}

fn setup(ctx: &Context, dev: &Rc<Dev>, fds: DevFds, log: bool) -> Result<()> {
    if log {
        ctx.setup_log(
            Some(Rc::new(|_c: &Context, _l: i32, m: &str| {
                std::hint::black_box(m);
            })),
            vfio_user::device::log_level::DEBUG,
        )?;
    }
    ctx.pci_init(pci::PCI_TYPE_EXPRESS, pci::PCI_HEADER_TYPE_NORMAL, 0)?;
    let p = ctx.pci().ok_or(Errno::EINVAL)?;
    p.set_id(0x4e58, 1, 0x1af4, 0x1100);
    let cap = |id: u8, len: usize| {
        let mut d = vec![0u8; len];
        d[0] = id;
        d
    };
    p.add_capability(0, 0, &cap(pci_caps::CAP_ID_PM, pci_caps::PM_SIZE))?;
    let mut msi = cap(pci_caps::CAP_ID_MSI, pci_caps::MSI_SIZE);
    msi[2] = 0x84; // 64-bit, 4 vectors capable
    p.add_capability(0, 0, &msi)?;
    let mut msix = cap(pci_caps::CAP_ID_MSIX, pci_caps::MSIX_SIZE);
    msix[2] = 15;
    p.add_capability(0, 0, &msix)?;
    let mut px = cap(pci_caps::CAP_ID_EXP, pci_caps::EXP_SIZE);
    px[4..8].copy_from_slice(&(1u32 << 28).to_le_bytes()); // FLR capable
    p.add_capability(0, 0, &px)?;
    let mut vsc = cap(pci_caps::CAP_ID_VNDR, 16);
    vsc[2] = 16;
    p.add_capability(0, pci_caps::CAP_FLAG_CALLBACK, &vsc)?;
    let mut dsn = vec![0u8; pci_caps::DSN_SIZE];
    dsn[0..2].copy_from_slice(&pci_caps::EXT_CAP_ID_DSN.to_le_bytes());
    p.add_capability(0, pci_caps::CAP_FLAG_EXTENDED, &dsn)?;
    let mut evsc = vec![0u8; 24];
    evsc[0..2].copy_from_slice(&pci_caps::EXT_CAP_ID_VNDR.to_le_bytes());
    evsc[6..8].copy_from_slice(&(24u16 << 4).to_le_bytes());
    p.add_capability(0, pci_caps::CAP_FLAG_EXTENDED, &evsc)?;

    let d = dev.clone();
    ctx.setup_region(
        0,
        RegionSetup {
            size: 0x1000,
            cb: Some(Rc::new(
                move |c: &Context, b: &mut [u8], o: u64, w: bool| bar0_cb(c, &d, b, o, w),
            )),
            flags: region::FLAG_RW | region::FLAG_MEM,
            mmap_areas: None,
            fd: None,
            offset: 0,
        },
    )?;
    ctx.setup_region(
        1,
        RegionSetup {
            size: 0x100,
            cb: Some(Rc::new(|_c: &Context, b: &mut [u8], _o: u64, _w: bool| {
                Ok(b.len())
            })),
            flags: region::FLAG_RW,
            mmap_areas: None,
            fd: None,
            offset: 0,
        },
    )?;
    ctx.setup_region(
        2,
        RegionSetup {
            size: 0x4000,
            cb: Some(Rc::new(|_c: &Context, b: &mut [u8], _o: u64, _w: bool| {
                Ok(b.len())
            })),
            flags: region::FLAG_RW | region::FLAG_MEM | region::FLAG_64_BITS,
            mmap_areas: Some(vec![(0, 0x1000), (0x2000, 0x2000)]),
            fd: Some(fds.bar2),
            offset: 0,
        },
    )?;
    ctx.setup_region(
        region::CFG,
        RegionSetup {
            size: 0x1000,
            cb: Some(Rc::new(|_c: &Context, b: &mut [u8], o: u64, _w: bool| {
                assert!(o as usize + b.len() <= 0x1000);
                Ok(b.len())
            })),
            flags: region::FLAG_RW,
            mmap_areas: None,
            fd: None,
            offset: 0,
        },
    )?;
    for (off, dm) in [(0x40u64, 1u64), (0x48, 2)] {
        ctx.create_ioeventfd(
            0,
            IoEventFd {
                gpa_offset: off,
                size: 4,
                fd: fds.ioeventfd,
                flags: 0,
                datamatch: dm,
                shadow_fd: -1,
                shadow_offset: 0,
            },
        )?;
    }
    ctx.setup_irq_count(irq::INTX, 1)?;
    ctx.setup_irq_count(irq::MSI, 4)?;
    ctx.setup_irq_count(irq::MSIX, 16)?;
    for index in [irq::INTX, irq::MSI, irq::MSIX] {
        ctx.setup_irq_state_cb(
            index,
            Some(Rc::new(
                move |c: &Context, start: u32, count: u32, _m: bool| {
                    let n = c.irqs().map_or(0, |i| i.count(index));
                    assert!(u64::from(start) + u64::from(count) <= u64::from(n));
                },
            )),
        )?;
    }
    let d = dev.clone();
    ctx.setup_reset_cb(Some(Rc::new(move |_c: &Context, _why: ResetType| {
        if d.reset_fails.get() {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    })));
    let d = dev.clone();
    ctx.setup_quiesce_cb(match dev.quiesce.get() {
        Q_NONE => None,
        _ => Some(Rc::new(move |_c: &Context| {
            let q = d.quiesce.get();
            if d.hung_up.load(Ordering::Relaxed) && matches!(q, Q_FAIL | Q_ASYNC_FAIL) {
                return Ok(());
            }
            match q {
                Q_ASYNC | Q_ASYNC_FAIL => Err(Errno::EBUSY),
                Q_FAIL => Err(Errno::EIO),
                _ => Ok(()),
            }
        })),
    });
    let (d1, d2) = (dev.clone(), dev.clone());
    ctx.setup_dma(
        4,
        Some(Rc::new(move |c: &Context, info: &DmaInfo| {
            d1.dma_reg.set(d1.dma_reg.get() + 1);
            assert!(info.iova_len() > 0);
            let dma = c.dma().expect("dma");
            // The region is usable from inside its register callback.
            assert_eq!(
                dma.find_exact(info.iova_start(), info.iova_len()).ok(),
                Some(*info)
            );
            let r = (info.iova_start(), info.iova_len());
            let mut live = d1.live.borrow_mut();
            if !live.contains(&r) {
                live.push(r);
            }
        })),
        Some(Rc::new(move |c: &Context, info: &DmaInfo| {
            let r = (info.iova_start(), info.iova_len());
            let mut live = d2.live.borrow_mut();
            assert!(live.contains(&r), "unregister of unknown region {r:x?}");
            live.retain(|x| *x != r);
            // Still usable during the callback.
            assert!(c.dma().expect("dma").find_exact(r.0, r.1).is_ok());
        })),
    )?;
    ctx.setup_migration(Rc::new(Mig(dev.clone())))?;
    ctx.realize()
}

fn sock_path() -> PathBuf {
    std::env::temp_dir().join(format!("vfu-fuzz-session-{}.sock", std::process::id()))
}

/// Sends `data` with `fds`, without blocking; returns the bytes sent.
fn send_nb(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> usize {
    if data.is_empty() {
        return 0;
    }
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = [0u64; 32];
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        // SAFETY: pure computations and writes within cbuf (256 bytes hold
        // the header and up to 15 fds).
        unsafe {
            msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
            msg.msg_controllen = libc::CMSG_SPACE(bytes as u32) as usize;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
            std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(c), bytes);
        }
    }
    // SAFETY: msg describes live buffers.
    let n = unsafe {
        libc::sendmsg(
            sock.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    n.max(0) as usize
}

/// Receives with fds, closing the fds; 0 at EOF.
fn recv_some(fd: RawFd, buf: &mut [u8], nonblock: bool) -> isize {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = vec![0u64; 160];
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = cbuf.len() * 8;
    let flags = libc::MSG_CMSG_CLOEXEC | if nonblock { libc::MSG_DONTWAIT } else { 0 };
    // SAFETY: msg describes live buffers.
    let n = unsafe { libc::recvmsg(fd, &mut msg, flags) };
    if n >= 0 {
        // SAFETY: msg was filled in by recvmsg; each SCM_RIGHTS fd is ours.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let k = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                    for i in 0..k {
                        drop(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
    }
    n
}

/// Bytes the server has not read yet.
fn inq(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes an int.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    assert_eq!(r, 0);
    n as usize
}

/// Whether the server can read its next request from `stream[pos..]`
/// without waiting (it reads a header, then the body when the header's
/// size is sane).
fn frame_ready(stream: &[u8], pos: usize) -> bool {
    let Some(rest) = stream.get(pos..) else {
        return false;
    };
    if rest.len() < HEADER_SIZE {
        return false;
    }
    let size = u32::from_le_bytes(rest[4..8].try_into().unwrap()) as usize;
    let need = if (HEADER_SIZE..=SERVER_MAX_MSG_SIZE).contains(&size) {
        size
    } else {
        HEADER_SIZE
    };
    rest.len() >= need
}

/// Whether to print every reply (set `VFU_FUZZ_TRACE` to see what a seed
/// or crash input does).
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("VFU_FUZZ_TRACE").is_some())
}

/// Answers a DMA request of the server (well-formed, with `count` bytes of
/// data for a read), holding the write lock so that the answer does not
/// interleave with a request being sent.
fn answer_dma(sock: &UnixStream, lock: &Mutex<()>, h: &Header, body: &[u8]) {
    let addr = body
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let count = body
        .get(8..16)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let mut out = Vec::new();
    out.extend_from_slice(&addr.to_le_bytes());
    out.extend_from_slice(&count.to_le_bytes());
    if h.cmd == cmd::DMA_READ {
        out.resize(16 + count.min(1 << 16) as usize, 0xd5);
    }
    let r = Header {
        msg_id: h.msg_id,
        cmd: h.cmd,
        msg_size: (HEADER_SIZE + out.len()) as u32,
        flags: flags::TYPE_REPLY,
        error_no: 0,
    };
    let mut all = r.encode().to_vec();
    all.extend_from_slice(&out);
    let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
    send_all(sock, &all, &[]);
}

/// Id of the request the blocking session ends with: once its reply is
/// back, the server has handled everything before it.
const SYNC_ID: u16 = 0xfeed;

/// What the reader tells the writer: the reply to the final request
/// arrived, or the server hung up.
#[derive(Default)]
struct Progress {
    synced: bool,
    closed: bool,
}

type Shared = Arc<(Mutex<Progress>, Condvar)>;

fn progress(p: &Shared, f: impl FnOnce(&mut Progress)) {
    let mut g = p.0.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut g);
    p.1.notify_all();
}

/// Whether the server reads `stream` as whole messages with nothing left
/// over (its framing: a header, then the body when the size is sane).
fn frame_aligned(stream: &[u8]) -> bool {
    let mut pos = 0;
    while pos + HEADER_SIZE <= stream.len() {
        let size = u32::from_le_bytes(stream[pos + 4..pos + 8].try_into().unwrap()) as usize;
        pos += if (HEADER_SIZE..=SERVER_MAX_MSG_SIZE).contains(&size) {
            size
        } else {
            HEADER_SIZE
        };
    }
    pos == stream.len()
}

/// Reads replies until EOF, checking their framing (and answering the
/// server's DMA requests when `lock` is given); returns their number.
fn reader(sock: UnixStream, lock: Option<Arc<Mutex<()>>>, prog: Option<Shared>) -> usize {
    let mut acc: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut replies = 0;
    loop {
        let n = recv_some(sock.as_raw_fd(), &mut buf, false);
        if n <= 0 {
            break;
        }
        acc.extend_from_slice(&buf[..n as usize]);
        let mut off = 0;
        while acc.len() - off >= HEADER_SIZE {
            let h = Header::decode(acc[off..off + HEADER_SIZE].try_into().unwrap());
            assert!(h.msg_size as usize >= HEADER_SIZE, "{h:?}");
            if h.msg_type() == flags::TYPE_COMMAND {
                // Only the device's DMA requests, and only when we answer.
                assert!(
                    lock.is_some() && (h.cmd == cmd::DMA_READ || h.cmd == cmd::DMA_WRITE),
                    "server sent {h:?}"
                );
                if acc.len() - off < h.msg_size as usize {
                    break;
                }
                let end = off + h.msg_size as usize;
                if trace() {
                    eprintln!(
                        "request cmd {} id {:#x} size {}",
                        h.cmd, h.msg_id, h.msg_size
                    );
                }
                if let Some(l) = &lock {
                    answer_dma(&sock, l, &h, &acc[off + HEADER_SIZE..end]);
                }
                off = end;
                continue;
            }
            assert_eq!(h.msg_type(), flags::TYPE_REPLY, "server sent {h:?}");
            if h.flags & flags::ERROR != 0 {
                assert!(h.error_no != 0 && h.error_no < 4096, "{h:?}");
                assert_eq!(h.msg_size as usize, HEADER_SIZE, "{h:?}");
            } else {
                assert_eq!(h.error_no, 0, "{h:?}");
            }
            if acc.len() - off < h.msg_size as usize {
                break;
            }
            if trace() {
                eprintln!(
                    "reply cmd {} id {:#x} errno {} size {}",
                    h.cmd, h.msg_id, h.error_no, h.msg_size
                );
            }
            if let (Some(p), SYNC_ID) = (&prog, h.msg_id) {
                progress(p, |g| g.synced = true);
            }
            off += h.msg_size as usize;
            replies += 1;
        }
        acc.drain(..off);
    }
    if let Some(p) = &prog {
        progress(p, |g| g.closed = true);
    }
    let mut rest = Vec::new();
    let _ = (&sock).read_to_end(&mut rest);
    assert!(acc.is_empty(), "server hung up mid-reply");
    replies
}

fn version_msg(input: &mut Input<'_>) -> Vec<u8> {
    let mode = input.u8();
    let body: Vec<u8> = if mode >= 0xf0 {
        // Anything at all, framed.
        input.chunk().to_vec()
    } else {
        let twin = mode & 1 != 0;
        let fds = mode >> 1 & 7;
        let xfer = 256 << (mode >> 4 & 7);
        let json = format!(
            "{{\"capabilities\":{{\"max_msg_fds\":{fds},\"max_data_xfer_size\":{xfer},\
             \"twin_socket\":{{\"supported\":{twin}}},\"migration\":{{\"pgsize\":4096}},\
             \"write_multiple\":true}}}}"
        );
        let mut b = vec![0, 0, 2, 0];
        b.extend_from_slice(json.as_bytes());
        b.push(0);
        b
    };
    let h = Header {
        msg_id: 0x7777,
        cmd: 1,
        msg_size: (HEADER_SIZE + body.len()) as u32,
        flags: 0,
        error_no: 0,
    };
    let mut m = h.encode().to_vec();
    m.extend_from_slice(&body);
    m
}

fn attachment(kind: u16, keep: &Keep) -> OwnedFd {
    match kind & 3 {
        0 => common::dup(&keep.memfd),
        1 => common::eventfd(),
        2 => common::dup(&keep.sock),
        _ => {
            if kind & 4 != 0 {
                common::pipe_end()
            } else {
                common::devnull()
            }
        }
    }
}

/// Runs the context until it has nothing it can read without waiting.
/// Returns false once the context no longer serves the client.
fn pump(ctx: &Context, dev: &Dev, stream: &[u8], written: usize) -> bool {
    let mut stalls = 0;
    loop {
        if !ctx.is_attached() {
            return false;
        }
        let pending = inq(ctx.poll_fd());
        let pos = written - pending;
        if pending > 0 && !frame_ready(stream, pos) {
            return true;
        }
        let r = ctx.run();
        if pending == 0 && r.is_ok() {
            // Nothing to read: EAGAIN, reported as 0 handled.
            assert_eq!(r, Ok(0));
            return true;
        }
        match r {
            Err(e) if e == Errno::EBUSY => {
                let err = if dev.quiesce.get() == Q_ASYNC_FAIL {
                    libc::EIO
                } else {
                    0
                };
                let _ = ctx.device_quiesced(err);
            }
            Err(e) if e == Errno::ENOTCONN => return false,
            _ => {}
        }
        if ctx.is_attached() && inq(ctx.poll_fd()) == pending {
            stalls += 1;
            if stalls > 8 {
                // The device keeps refusing (e.g. quiesce fails): give up
                // on this connection's remaining messages.
                return true;
            }
        } else {
            stalls = 0;
        }
    }
}

extern "C" fn on_sigpipe(_: libc::c_int) {
    // libFuzzer does not catch SIGPIPE; turn it into an abort so that the
    // input is saved.
    const MSG: &[u8] = b"SIGPIPE: the server wrote to a closed pipe or socket\n";
    // SAFETY: write(2) and abort(3) are async-signal-safe.
    unsafe {
        libc::write(2, MSG.as_ptr() as *const libc::c_void, MSG.len());
        libc::abort();
    }
}

fuzz_target!(|data: &[u8]| {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        // SAFETY: installs an async-signal-safe handler.
        unsafe { libc::signal(libc::SIGPIPE, on_sigpipe as *const () as libc::sighandler_t) };
    });
    let mut input = Input::new(data);
    KEEP.with(|keep| session(&mut input, keep));
});

/// What the input asks of the device.
#[derive(Clone, Copy)]
struct Behaviour {
    quiesce: u8,
    reset_fails: bool,
    mig_fails: u8,
    log: bool,
}

fn new_device(b: Behaviour, hung_up: &Arc<AtomicBool>, dma_messages: bool) -> Rc<Dev> {
    let dev = Rc::new(Dev {
        hung_up: hung_up.clone(),
        dma_messages,
        ..Dev::default()
    });
    dev.bar0.borrow_mut().resize(0x1000, 0);
    dev.quiesce.set(b.quiesce);
    dev.reset_fails.set(b.reset_fails);
    dev.mig_fails.set(b.mig_fails);
    dev
}

fn new_context(path: &std::path::Path, nonblocking: bool) -> Context {
    let _ = std::fs::remove_file(path);
    let flags = if nonblocking {
        vfio_user::device::FLAG_ATTACH_NB
    } else {
        0
    };
    Context::new(path, flags, std::ptr::null_mut()).expect("context")
}

/// After the hang-up: the context forgot everything about the client.
fn check_forgotten(ctx: &Context, dev: &Dev) {
    assert!(!ctx.is_attached());
    assert_eq!(ctx.run(), Err(Errno::ENOTCONN));
    assert_eq!(ctx.dma().expect("dma").region_count(), 0);
    assert!(dev.live.borrow().is_empty(), "device still has DMA regions");
    let irqs = ctx.irqs().expect("irqs");
    for index in 0..irq::NUM_IRQ_TYPES as u32 {
        for sub in 0..16 {
            assert!(!irqs.has_eventfd(index, sub), "eventfd kept after hang-up");
        }
    }
}

/// The next message of the input, with its fds.
fn next_message(input: &mut Input<'_>, keep: &Keep) -> (Vec<u8>, Vec<OwnedFd>) {
    let spec = input.u8();
    let kinds = input.u16();
    let mut msg = input.chunk().to_vec();
    if spec & 0x40 != 0 && msg.len() >= 8 {
        let len = msg.len() as u32;
        msg[4..8].copy_from_slice(&len.to_le_bytes());
    }
    let fds = if spec & 0x80 != 0 {
        (0..spec & 15)
            .map(|i| attachment(kinds >> (i % 5 * 3), keep))
            .collect()
    } else {
        Vec::new()
    };
    (msg, fds)
}

/// Checks the version reply (its fds, the twin socket, are closed).
fn version_reply(client: &UnixStream, nonblocking: bool) {
    let mut buf = vec![0u8; 4096];
    let n = recv_some(client.as_raw_fd(), &mut buf, nonblocking);
    if n > 0 {
        assert!(n >= HEADER_SIZE as isize);
        let h = Header::decode(buf[..HEADER_SIZE].try_into().unwrap());
        assert_eq!(h.msg_id, 0x7777);
        assert_eq!(h.msg_type(), flags::TYPE_REPLY);
        assert_eq!(h.msg_size as isize, n);
    }
}

fn session(input: &mut Input<'_>, keep: &Keep) {
    let before = common::open_fds();
    let cfg = input.u8();
    let b = Behaviour {
        quiesce: (cfg & 7) % 5,
        reset_fails: cfg & 0x80 != 0,
        mig_fails: input.u8(),
        log: cfg & 0x40 != 0,
    };
    let fds = DevFds {
        bar2: keep.bar2.as_raw_fd(),
        ioeventfd: keep.ioeventfd.as_raw_fd(),
    };
    if cfg & 0x20 != 0 {
        blocking_session(input, keep, b, fds);
    } else {
        nonblocking_session(input, keep, b, fds);
    }
    assert_eq!(common::open_fds(), before, "fd leak");
}

/// A non-blocking context run by this thread, message by message.
fn nonblocking_session(input: &mut Input<'_>, keep: &Keep, b: Behaviour, fds: DevFds) {
    let hung_up = Arc::new(AtomicBool::new(false));
    let dev = new_device(b, &hung_up, false);
    let path = sock_path();
    let ctx = new_context(&path, true);
    setup(&ctx, &dev, fds, b.log).expect("device setup");

    let client = UnixStream::connect(&path).expect("connect");
    let version = version_msg(input);
    assert_eq!(send_nb(&client, &version, &[]), version.len());
    let attached = ctx.attach();
    version_reply(&client, true);

    let rsock = client.try_clone().expect("dup");
    let reader = std::thread::spawn(move || reader(rsock, None, None));

    let mut stream: Vec<u8> = Vec::new();
    let mut alive = attached.is_ok();
    let mut count = 0;
    while alive && !input.is_empty() && count < 64 {
        count += 1;
        let (msg, fds) = next_message(input, keep);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let sent = send_nb(&client, &msg, &raw);
        // The kernel holds its own references to fds in flight.
        drop(fds);
        stream.extend_from_slice(&msg[..sent]);
        if sent < msg.len() {
            // The socket is full of an unfinished request: stop here.
            break;
        }
        alive = pump(&ctx, &dev, &stream, stream.len());
    }

    // Hang up; the context must notice and forget the client.
    // SAFETY: plain shutdown(2) of our socket.
    unsafe { libc::shutdown(client.as_raw_fd(), libc::SHUT_WR) };
    hung_up.store(true, Ordering::Relaxed);
    let mut rounds = 0;
    while ctx.is_attached() {
        rounds += 1;
        assert!(rounds < 100_000, "context never noticed the hang-up");
        if ctx.run() == Err(Errno::EBUSY) {
            ctx.device_quiesced(0).expect("device_quiesced");
        }
    }
    std::hint::black_box(reader.join().expect("reply reader"));
    check_forgotten(&ctx, &dev);
    drop(client);
}

/// A blocking context run by its own thread (with read-ahead), the
/// messages written as fast as it takes them.
fn blocking_session(input: &mut Input<'_>, keep: &Keep, b: Behaviour, fds: DevFds) {
    let hung_up = Arc::new(AtomicBool::new(false));
    let path = sock_path();
    let (tx, rx) = std::sync::mpsc::channel();
    let server = {
        let hung_up = hung_up.clone();
        let path = path.clone();
        std::thread::spawn(move || {
            let dev = new_device(b, &hung_up, true);
            let ctx = new_context(&path, false);
            setup(&ctx, &dev, fds, b.log).expect("device setup");
            tx.send(()).expect("ready");
            if ctx.attach().is_err() {
                return;
            }
            loop {
                match ctx.run() {
                    Err(e) if e == Errno::EBUSY => {
                        let err = if dev.quiesce.get() == Q_ASYNC_FAIL
                            && !dev.hung_up.load(Ordering::Relaxed)
                        {
                            libc::EIO
                        } else {
                            0
                        };
                        let _ = ctx.device_quiesced(err);
                    }
                    _ if !ctx.is_attached() => break,
                    // A blocking run only returns with an error; one that
                    // leaves the client attached (a failing quiesce) is
                    // retried.
                    _ => {}
                }
            }
            check_forgotten(&ctx, &dev);
        })
    };
    rx.recv().expect("server setup");
    let client = UnixStream::connect(&path).expect("connect");
    let version = version_msg(input);
    send_all(&client, &version, &[]);
    version_reply(&client, false);
    let rsock = client.try_clone().expect("dup");
    let lock = Arc::new(Mutex::new(()));
    let prog: Shared = Arc::default();
    let reader = {
        let (lock, prog) = (lock.clone(), prog.clone());
        std::thread::spawn(move || reader(rsock, Some(lock), Some(prog)))
    };
    let mut count = 0;
    let mut stream = Vec::new();
    let mut sent_all = true;
    while !input.is_empty() && count < 64 {
        count += 1;
        let (msg, fds) = next_message(input, keep);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
        if !send_all(&client, &msg, &raw) {
            sent_all = false;
            break;
        }
        stream.extend_from_slice(&msg);
    }
    // Before hanging up, let the server finish (it may still want to ask
    // us for DMA): a last request whose reply says everything before it
    // was handled. Only when the stream is in step, else the server would
    // take that request as the rest of an unfinished one.
    if sent_all && frame_aligned(&stream) {
        let h = Header {
            msg_id: SYNC_ID,
            cmd: cmd::DEVICE_GET_INFO,
            msg_size: (HEADER_SIZE + 16) as u32,
            flags: flags::TYPE_COMMAND,
            error_no: 0,
        };
        let mut m = h.encode().to_vec();
        m.extend_from_slice(&[16, 0, 0, 0]);
        m.resize(HEADER_SIZE + 16, 0);
        let sent = {
            let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
            send_all(&client, &m, &[])
        };
        if sent {
            let (lk, cv) = &*prog;
            let g = lk.lock().unwrap_or_else(|e| e.into_inner());
            let (g, t) = cv
                .wait_timeout_while(g, std::time::Duration::from_secs(20), |p| {
                    !p.synced && !p.closed
                })
                .unwrap_or_else(|e| e.into_inner());
            assert!(!t.timed_out(), "server stuck before the end of the session");
            drop(g);
        }
    }
    hung_up.store(true, Ordering::Relaxed);
    // SAFETY: plain shutdown(2) of our socket.
    unsafe { libc::shutdown(client.as_raw_fd(), libc::SHUT_WR) };
    server.join().expect("server thread");
    std::hint::black_box(reader.join().expect("reply reader"));
    drop(client);
}

/// Sends all of `data` (fds with the first byte), waiting as needed; false
/// once the server is gone.
fn send_all(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> bool {
    let mut done = 0;
    while done < data.len() {
        let f = if done == 0 { fds } else { &[] };
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        // SAFETY: pfd is a valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        let n = send_nb(sock, &data[done..], f);
        if n == 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
            return false;
        }
        done += n;
    }
    true
}
