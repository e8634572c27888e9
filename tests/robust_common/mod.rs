//! Shared harness of the robustness tests (`hostile.rs`,
//! `random_protocol.rs`): a server thread that serves one client after
//! another with a small test device, and a raw client that can send
//! anything at all.
//!
//! The device: BAR0 (0x1000 bytes of memory, a callback) with registers
//! that make the server act: writing a u64 `n` at `REG_IRQ` triggers
//! vector `n`; `REG_DMA_IOVA`, `REG_DMA_LEN`, then an op (1 read, 2 write)
//! at `REG_DMA_OP` runs a DMA transfer through messages to the client, its
//! result (0 or errno) landing in `REG_DMA_RESULT`. BAR2 is fd-backed and
//! mappable; config space is PCI Express; 8 MSI-X vectors; DMA (8 regions)
//! and migration are on.

#![allow(dead_code)]

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfio_user::device::{
    irq, migration, pci, region, DmaInfo, DmaSg, MigrationDevice, RegionSetup,
};
use vfio_user::protocol::{cmd, flags, Header, HEADER_SIZE};
use vfio_user::{Context, Errno};

pub const REG_IRQ: u64 = 0x800;
pub const REG_DMA_IOVA: u64 = 0x900;
pub const REG_DMA_LEN: u64 = 0x908;
pub const REG_DMA_OP: u64 = 0x910;
pub const REG_DMA_RESULT: u64 = 0x918;
pub const MSIX_COUNT: u32 = 8;

/// Tests of one binary share the process's fd table: those that count fds
/// run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// Number of fds this process has open.
pub fn open_fds() -> usize {
    // read_dir's own fd is listed too.
    std::fs::read_dir("/proc/self/fd").unwrap().count() - 1
}

/// Waits (at most 5 s) for the fd count to come back to `n`: the server
/// thread closes a connection's fds a moment after the client sees it go.
pub fn assert_fds_back_to(n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = open_fds();
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fd leak: {n} fds before, {now} after"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// What the server saw.
#[derive(Default, Debug)]
pub struct Stats {
    /// How each client session ended (attach failure or `run` result).
    pub ended: Vec<Errno>,
    /// Number of BAR0 writes the device performed.
    pub bar0_writes: usize,
    /// DMA regions the device currently knows about.
    pub dma_live: usize,
}

/// A server thread serving one client after another.
pub struct Server {
    pub path: PathBuf,
    pub stats: Arc<Mutex<Stats>>,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

/// The server's options.
#[derive(Clone, Copy)]
pub struct Options {
    /// Applied as SO_SNDTIMEO/SO_RCVTIMEO to each accepted connection.
    pub stall_timeout: Duration,
    /// Given to `Context::set_client_timeout` (`None`: the library's
    /// default is kept).
    pub client_timeout: Option<Duration>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            stall_timeout: Duration::from_secs(1),
            client_timeout: None,
        }
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn sock_path(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("vfu-robust-{tag}-{}-{n}.sock", std::process::id()))
}

fn set_timeouts(fd: RawFd, t: Duration) {
    let tv = libc::timeval {
        tv_sec: t.as_secs() as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    for opt in [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO] {
        // SAFETY: tv is a valid timeval of the stated size.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
    }
}

fn rd64(b: &[u8], off: u64) -> u64 {
    let o = off as usize;
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn bar0(
    ctx: &Context,
    mem: &RefCell<Vec<u8>>,
    st: &Mutex<Stats>,
    buf: &mut [u8],
    off: u64,
    w: bool,
) -> Result<usize, Errno> {
    let o = off as usize;
    let end = o + buf.len();
    assert!(end <= 0x1000, "out-of-range access reached the device");
    if !w {
        buf.copy_from_slice(&mem.borrow()[o..end]);
        return Ok(buf.len());
    }
    mem.borrow_mut()[o..end].copy_from_slice(buf);
    st.lock().unwrap().bar0_writes += 1;
    if off == REG_IRQ && buf.len() == 8 {
        let n = rd64(&mem.borrow(), REG_IRQ);
        let _ = ctx.irq_trigger(n as u32);
    } else if off == REG_DMA_OP && buf.len() == 8 {
        let (iova, len, op) = {
            let m = mem.borrow();
            (
                rd64(&m, REG_DMA_IOVA),
                rd64(&m, REG_DMA_LEN),
                rd64(&m, REG_DMA_OP),
            )
        };
        let r = dma_op(ctx, iova, len.min(256), op == 2);
        let v = r.err().map_or(0, |e| e.0 as u64);
        mem.borrow_mut()[REG_DMA_RESULT as usize..][..8].copy_from_slice(&v.to_le_bytes());
    }
    Ok(buf.len())
}

fn dma_op(ctx: &Context, iova: u64, len: u64, write: bool) -> Result<(), Errno> {
    let dma = ctx.dma().ok_or(Errno::EINVAL)?.clone();
    let prot = if write {
        libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    let mut sg = [DmaSg::default()];
    match dma.addr_to_sgl(iova, len, &mut sg, prot) {
        Ok(1) => {}
        Ok(_) => return Err(Errno::EINVAL),
        Err(vfio_user::device::dma::SglError::Errno(e)) => return Err(e),
        Err(_) => return Err(Errno::E2BIG),
    }
    let mut data = vec![0x5a; len as usize];
    ctx.dma_transfer(&sg[0], &mut data, write, false)
}

struct Mig;

impl MigrationDevice for Mig {
    fn transition(&self, _ctx: &Context, _state: u32) -> Result<(), Errno> {
        Ok(())
    }
    fn read_data(&self, _ctx: &Context, buf: &mut [u8]) -> Result<usize, Errno> {
        let n = buf.len().min(64);
        buf[..n].fill(0x6d);
        Ok(n)
    }
    fn write_data(&self, _ctx: &Context, buf: &[u8]) -> Result<usize, Errno> {
        Ok(buf.len())
    }
}

fn memfd(size: u64) -> OwnedFd {
    // SAFETY: the name is a valid NUL-terminated string.
    let fd = unsafe { libc::memfd_create(c"robust".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain ftruncate on our fd.
    assert_eq!(
        unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) },
        0
    );
    fd
}

/// An eventfd.
pub fn eventfd() -> OwnedFd {
    // SAFETY: plain eventfd(2).
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0);
    // SAFETY: fresh fd we own.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// A memfd of 64 KiB.
pub fn memfd_64k() -> OwnedFd {
    memfd(0x10000)
}

fn setup(ctx: &Context, st: &Arc<Mutex<Stats>>, bar2: &OwnedFd) -> Result<(), Errno> {
    let cfg = ctx.pci_init(pci::PCI_TYPE_EXPRESS, pci::PCI_HEADER_TYPE_NORMAL, 0)?;
    cfg.set_id(0x4e58, 0x0002, 0, 0);
    let mem = Rc::new(RefCell::new(vec![0u8; 0x1000]));
    let s = st.clone();
    ctx.setup_region(
        region::BAR0,
        RegionSetup {
            size: 0x1000,
            cb: Some(Rc::new(
                move |c: &Context, b: &mut [u8], o: u64, w: bool| bar0(c, &mem, &s, b, o, w),
            )),
            flags: region::FLAG_RW | region::FLAG_MEM,
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
            flags: region::FLAG_RW | region::FLAG_MEM,
            mmap_areas: Some(vec![(0, 0x1000), (0x2000, 0x2000)]),
            fd: Some(bar2.as_raw_fd()),
            offset: 0,
        },
    )?;
    ctx.setup_irq_count(irq::MSIX, MSIX_COUNT)?;
    let (s1, s2) = (st.clone(), st.clone());
    ctx.setup_dma(
        8,
        Some(Rc::new(move |_c: &Context, _i: &DmaInfo| {
            s1.lock().unwrap().dma_live += 1;
        })),
        Some(Rc::new(move |_c: &Context, _i: &DmaInfo| {
            s2.lock().unwrap().dma_live -= 1;
        })),
    )?;
    ctx.setup_migration(Rc::new(Mig))?;
    ctx.realize()
}

impl Server {
    /// Starts a server thread; returns once it listens.
    pub fn start(tag: &str, opts: Options) -> Server {
        let path = sock_path(tag);
        let stats = Arc::new(Mutex::new(Stats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel();
        let handle = {
            let (path, stats, stop) = (path.clone(), stats.clone(), stop.clone());
            std::thread::spawn(move || {
                let bar2 = memfd(0x4000);
                let ctx = Context::create(&path, false).expect("context");
                if let Some(t) = opts.client_timeout {
                    ctx.set_client_timeout(Some(t)).expect("client timeout");
                }
                setup(&ctx, &stats, &bar2).expect("setup");
                tx.send(()).unwrap();
                while !stop.load(Ordering::SeqCst) {
                    let r = ctx.attach();
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let end = match r {
                        Err(e) => e,
                        Ok(()) => {
                            set_timeouts(ctx.poll_fd(), opts.stall_timeout);
                            loop {
                                let e = ctx.run().expect_err("blocking run returned Ok");
                                if !ctx.is_attached() {
                                    break e;
                                }
                            }
                        }
                    };
                    stats.lock().unwrap().ended.push(end);
                }
                drop(ctx);
                drop(bar2);
            })
        };
        rx.recv_timeout(Duration::from_secs(10))
            .expect("server start");
        Server {
            path,
            stats,
            stop,
            handle: Some(handle),
        }
    }

    pub fn stats(&self) -> MutexGuard<'_, Stats> {
        self.stats.lock().unwrap()
    }

    /// Waits (at most 10 s) until `n` sessions have ended; returns how the
    /// last one did.
    pub fn wait_ended(&self, n: usize) -> Errno {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            {
                let s = self.stats();
                if s.ended.len() >= n {
                    return s.ended[n - 1];
                }
            }
            assert!(Instant::now() < deadline, "session {n} did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A fresh client (the library's) and a check that it is served.
    pub fn check_fresh_client(&self) {
        let mut c = vfio_user::client::Client::connect(&self.path).expect("fresh client");
        // The migration state outlives a client (as upstream's does): one
        // that left the device stopped leaves it stopped for the next.
        c.set_mig_state(migration::VFIO_USER_DEVICE_STATE_RUNNING)
            .expect("set RUNNING");
        let info = c.device_info().expect("device info");
        assert_eq!(info.num_regions, region::NUM_REGIONS as u32);
        c.region_write(0, 0x10, b"fresh!").expect("region write");
        assert_eq!(c.region_read(0, 0x10, 6).expect("region read"), b"fresh!");
        let n = self.stats().ended.len();
        drop(c);
        assert_eq!(self.wait_ended(n + 1), Errno::ENOTCONN);
    }

    /// Stops the thread (the context is destroyed).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(h) = self.handle.take() {
            h.join().expect("server thread panicked");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.handle.is_some() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = UnixStream::connect(&self.path);
        }
    }
}

/// A reply as received.
#[derive(Debug)]
pub struct Reply {
    pub hdr: Header,
    pub body: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

/// A raw client: sends whatever it is told.
pub struct Raw {
    pub sock: UnixStream,
    next_id: u16,
}

/// The body of a VERSION request with a capabilities string.
pub fn version_body(json: &str) -> Vec<u8> {
    let mut b = vec![0, 0, 2, 0];
    b.extend_from_slice(json.as_bytes());
    b.push(0);
    b
}

pub const CAPS: &str = r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576}}"#;

impl Raw {
    /// Connects without negotiating.
    pub fn connect_only(path: &Path) -> Raw {
        let sock = UnixStream::connect(path).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Raw { sock, next_id: 1 }
    }

    /// Connects and negotiates.
    pub fn connect(path: &Path) -> Raw {
        let mut r = Raw::connect_only(path);
        let id = r.send(cmd::VERSION, &version_body(CAPS), &[]);
        let rep = r.recv().expect("version reply");
        assert_eq!(rep.hdr.msg_id, id);
        assert_eq!(rep.hdr.flags & flags::ERROR, 0, "version refused");
        r
    }

    pub fn id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    /// Sends a correctly framed command; returns its id.
    pub fn send(&mut self, command: u16, body: &[u8], fds: &[RawFd]) -> u16 {
        let id = self.id();
        let h = Header {
            msg_id: id,
            cmd: command,
            msg_size: (HEADER_SIZE + body.len()) as u32,
            flags: flags::TYPE_COMMAND,
            error_no: 0,
        };
        self.send_msg(&h, body, fds);
        id
    }

    /// Sends `hdr` and `body` as they are.
    pub fn send_msg(&mut self, hdr: &Header, body: &[u8], fds: &[RawFd]) {
        let mut all = hdr.encode().to_vec();
        all.extend_from_slice(body);
        self.send_bytes(&all, fds);
    }

    /// Sends raw bytes with `fds`; panics on failure.
    pub fn send_bytes(&mut self, bytes: &[u8], fds: &[RawFd]) {
        let n = sendmsg(&self.sock, bytes, fds).expect("send");
        if n < bytes.len() {
            self.sock.write_all(&bytes[n..]).expect("send");
        }
    }

    /// Receives one message (None when the server closed the connection).
    pub fn recv(&mut self) -> Option<Reply> {
        let mut h = [0u8; HEADER_SIZE];
        let (n, fds) = recvmsg(&self.sock, &mut h);
        if n == 0 {
            return None;
        }
        if n < HEADER_SIZE {
            self.sock.read_exact(&mut h[n..]).expect("reply header");
        }
        let hdr = Header::decode(&h);
        assert!(
            hdr.msg_size as usize >= HEADER_SIZE,
            "bad reply size {hdr:?}"
        );
        let mut body = vec![0u8; hdr.msg_size as usize - HEADER_SIZE];
        self.sock.read_exact(&mut body).expect("reply body");
        Some(Reply { hdr, body, fds })
    }

    /// Receives the reply to `id` and checks that it is well-formed.
    pub fn reply(&mut self, id: u16, command: u16) -> Reply {
        let r = self.recv().expect("connection closed");
        assert_eq!(r.hdr.msg_id, id, "reply out of order: {:?}", r.hdr);
        assert_eq!(r.hdr.cmd, command);
        assert_eq!(r.hdr.msg_type(), flags::TYPE_REPLY);
        r
    }

    /// Sends a command and returns its reply.
    pub fn call(&mut self, command: u16, body: &[u8], fds: &[RawFd]) -> Reply {
        let id = self.send(command, body, fds);
        self.reply(id, command)
    }

    /// Sends a command that must fail with `errno`.
    pub fn expect_err(&mut self, command: u16, body: &[u8], fds: &[RawFd], errno: i32) {
        let r = self.call(command, body, fds);
        assert_eq!(
            (r.hdr.flags & flags::ERROR != 0, r.hdr.error_no),
            (true, errno as u32),
            "command {command} body {body:02x?}"
        );
        assert!(r.body.is_empty());
    }

    /// Sends a command that must succeed; returns the reply body.
    pub fn expect_ok(&mut self, command: u16, body: &[u8], fds: &[RawFd]) -> Vec<u8> {
        let r = self.call(command, body, fds);
        assert_eq!(
            r.hdr.flags & flags::ERROR,
            0,
            "command {command} failed: {}",
            r.hdr.error_no
        );
        r.body
    }

    /// Waits for the server to close the connection, skipping replies.
    pub fn expect_closed(&mut self) {
        while self.recv().is_some() {}
    }
}

/// One sendmsg; returns the bytes sent.
pub fn sendmsg(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> Result<usize, Errno> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = vec![0u64; 8 + fds.len()];
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let bytes = std::mem::size_of_val(fds);
        // SAFETY: cbuf holds the cmsg header and the fds; pure computations
        // and writes within it.
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
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        Err(Errno::last())
    } else {
        Ok(n as usize)
    }
}

/// One recvmsg into `buf`; returns the bytes and the fds received.
pub fn recvmsg(sock: &UnixStream, buf: &mut [u8]) -> (usize, Vec<OwnedFd>) {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let mut cbuf = vec![0u64; 64];
    // SAFETY: msghdr is plain old data.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = cbuf.len() * 8;
    // SAFETY: msg describes live buffers.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        let e = Errno::last();
        if e.0 == libc::ECONNRESET {
            return (0, Vec::new());
        }
        panic!("recvmsg: {e}");
    }
    let mut fds = Vec::new();
    // SAFETY: msg was filled in by recvmsg; each SCM_RIGHTS fd is ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let k = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                for i in 0..k {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    (n as usize, fds)
}

// ---- request bodies ----------------------------------------------------------

pub fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

pub fn le64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

/// Concatenates fields.
pub fn body(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

pub fn device_info(argsz: u32) -> Vec<u8> {
    body(&[&le32(argsz), &[0; 12]])
}

pub fn region_info(index: u32, argsz: u32) -> Vec<u8> {
    body(&[&le32(argsz), &le32(0), &le32(index), &le32(0), &[0; 16]])
}

pub fn access(index: u32, offset: u64, count: u32, data: &[u8]) -> Vec<u8> {
    body(&[&le64(offset), &le32(index), &le32(count), data])
}

pub fn irq_info(index: u32, argsz: u32) -> Vec<u8> {
    body(&[&le32(argsz), &le32(0), &le32(index), &le32(0)])
}

pub fn set_irqs(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> Vec<u8> {
    body(&[
        &le32(20 + data.len() as u32),
        &le32(flags),
        &le32(index),
        &le32(start),
        &le32(count),
        data,
    ])
}

pub fn dma_map(argsz: u32, flags: u32, offset: u64, iova: u64, size: u64) -> Vec<u8> {
    body(&[
        &le32(argsz),
        &le32(flags),
        &le64(offset),
        &le64(iova),
        &le64(size),
    ])
}

pub fn dma_unmap(argsz: u32, flags: u32, iova: u64, size: u64) -> Vec<u8> {
    body(&[&le32(argsz), &le32(flags), &le64(iova), &le64(size)])
}
