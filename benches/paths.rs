//! Cost of the library's hot paths, each against a floor measured in the
//! same run.
//!
//! Run: `cargo bench --bench paths` (full, about two minutes), or
//! `cargo bench --bench paths -- --quick` / `BENCH_QUICK=1` (smoke run for
//! CI, well under 20 s). Options: `--no-pin` (or `BENCH_NO_PIN=1`) leaves
//! the threads wherever the scheduler puts them; `--cpu=N` (or
//! `BENCH_CPU=N`) pins to CPU N instead of the highest allowed one.
//!
//! Method:
//! - Every socket path runs a real [`Context`] on its own thread, served
//!   over a real UNIX socket. The client is a lean raw client (prebuilt
//!   request bytes, one `send` and one `recv(MSG_WAITALL)` per round trip)
//!   rather than `vfio_user::client::Client`, whose own per-call work (a
//!   `poll`, fresh reply vectors) would dominate microsecond-scale paths;
//!   rows marked "(Client)" use the library client for comparison.
//! - The floor of a socket path is a raw UNIX-socket ping-pong between two
//!   threads that moves exactly the same bytes: the same client code sends
//!   the same request and receives a byte-for-byte copy of the server's
//!   reply from a thread that does nothing but one `recvmsg` (closing any
//!   fd it receives) and one `send` per message.
//! - The floor of DMA access is a plain memcpy of the same bytes from the
//!   same guest pages in the same order.
//! - By default the client, the server and the floor thread are all pinned
//!   to one CPU (`sched_setaffinity`), so that a round trip costs the same
//!   two context switches on both sides of the comparison.
//! - Floor and subject alternate round by round (15 rounds, 5 with
//!   `--quick`); each reports the median of its rounds and the ratio is
//!   median(subject) / median(floor).
//! - Memory is measured with a counting global allocator (live heap bytes)
//!   and, for the large region table, the resident set size.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::hint::black_box;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicIsize, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfio_user::device::dma_msg::{DMA_REGION_MMAP, DMA_REGION_READ, DMA_REGION_WRITE};
use vfio_user::device::migration::{
    VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, VFIO_DEVICE_FEATURE_SET,
    VFIO_USER_DEVICE_STATE_RESUMING, VFIO_USER_DEVICE_STATE_STOP, VFIO_USER_DEVICE_STATE_STOP_COPY,
};
use vfio_user::device::{pci, region, DmaController, DmaSg, MigrationDevice, RegionSetup};
use vfio_user::protocol::{cmd, flags, Header, HEADER_SIZE};
use vfio_user::{Context, Errno};

// ---- counting allocator ------------------------------------------------------

struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping only touches atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's arguments.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE_BYTES.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
            ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's arguments.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live_bytes() -> isize {
    LIVE_BYTES.load(Ordering::SeqCst)
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * page_size() as u64
}

// ---- configuration -----------------------------------------------------------

struct Cfg {
    quick: bool,
    /// Sections to run (`--only=a,b`); empty means all.
    only: Vec<String>,
    pin: Option<usize>,
    rounds: usize,
    /// Target duration of one round of one side.
    round: Duration,
}

impl Cfg {
    fn from_env() -> Cfg {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let env_on = |k: &str| std::env::var(k).is_ok_and(|v| !v.is_empty() && v != "0");
        let quick = args.iter().any(|a| a == "--quick") || env_on("BENCH_QUICK");
        let no_pin = args.iter().any(|a| a == "--no-pin") || env_on("BENCH_NO_PIN");
        let cpu = args
            .iter()
            .find_map(|a| a.strip_prefix("--cpu="))
            .map(str::to_owned)
            .or_else(|| std::env::var("BENCH_CPU").ok())
            .and_then(|v| v.parse::<usize>().ok());
        let pin = if no_pin {
            None
        } else {
            cpu.or_else(highest_allowed_cpu)
        };
        let only = args
            .iter()
            .find_map(|a| a.strip_prefix("--only="))
            .map(|v| v.split(',').map(str::to_owned).collect())
            .unwrap_or_default();
        Cfg {
            quick,
            only,
            pin,
            rounds: if quick { 5 } else { 15 },
            round: Duration::from_millis(if quick { 8 } else { 60 }),
        }
    }
}

// ---- system helpers ------------------------------------------------------------

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

fn highest_allowed_cpu() -> Option<usize> {
    // SAFETY: cpu_set_t is plain data; zero is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid out pointer of the size given.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return None;
    }
    // SAFETY: CPU_ISSET reads the set we own.
    (0..libc::CPU_SETSIZE as usize)
        .rev()
        .find(|&c| unsafe { libc::CPU_ISSET(c, &set) })
}

/// Pins the calling thread (and the threads it spawns later) to `cpu`.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zero is a valid value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes into the set we own (cpu is bounds-checked by
    // the macro's implementation in libc).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size given.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn memfd(name: &str, size: u64) -> OwnedFd {
    let c = std::ffi::CString::new(name).expect("name");
    // SAFETY: c is a valid NUL-terminated string.
    let fd = unsafe { libc::memfd_create(c.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ftruncate on our own fd.
    let r = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    assert_eq!(r, 0, "ftruncate: {}", std::io::Error::last_os_error());
    fd
}

/// Sends all of `buf`, passing `pass` (if any) with the first byte.
fn send_all(fd: RawFd, buf: &[u8], pass: Option<RawFd>) {
    let mut done = 0;
    while done < buf.len() {
        let rest = &buf[done..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        let mut cbuf = [0u64; 4];
        // SAFETY: msghdr is plain data; zero is a valid starting value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let n = match pass {
            Some(p) if done == 0 => {
                let len = std::mem::size_of::<RawFd>() as u32;
                msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
                // SAFETY: CMSG_SPACE is a pure computation.
                msg.msg_controllen = unsafe { libc::CMSG_SPACE(len) } as _;
                // SAFETY: cbuf (32 bytes) holds one cmsg header and one fd.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&msg);
                    (*c).cmsg_level = libc::SOL_SOCKET;
                    (*c).cmsg_type = libc::SCM_RIGHTS;
                    (*c).cmsg_len = libc::CMSG_LEN(len) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut RawFd, p);
                }
                // SAFETY: msg describes live buffers.
                unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) }
            }
            // SAFETY: rest is a live buffer of rest.len() bytes.
            _ => unsafe {
                libc::send(
                    fd,
                    rest.as_ptr() as *const libc::c_void,
                    rest.len(),
                    libc::MSG_NOSIGNAL,
                )
            },
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            panic!("send: {e}");
        }
        done += n as usize;
    }
}

/// Fills `buf`; false when the peer closed first.
fn recv_all(fd: RawFd, buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: rest is a live writable buffer of rest.len() bytes.
        let n = unsafe {
            libc::recv(
                fd,
                rest.as_mut_ptr() as *mut libc::c_void,
                rest.len(),
                libc::MSG_WAITALL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            panic!("recv: {e}");
        }
        if n == 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

/// Fills `buf` with recvmsg, closing any fds that come with it; false when
/// the peer closed first.
fn recvmsg_all(fd: RawFd, buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        let mut iov = libc::iovec {
            iov_base: rest.as_mut_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        let mut cbuf = [0u64; 16];
        // SAFETY: msghdr is plain data; zero is a valid starting value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&cbuf) as _;
        // SAFETY: msg describes live buffers.
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_WAITALL | libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            panic!("recvmsg: {e}");
        }
        // SAFETY: msg was just filled in by recvmsg; we walk its cmsgs.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(c) as *const RawFd;
                    let cnt = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                        / std::mem::size_of::<RawFd>();
                    for i in 0..cnt {
                        drop(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if n == 0 {
            return false;
        }
        done += n as usize;
    }
    true
}

// ---- messages --------------------------------------------------------------------

fn message(command: u16, msg_flags: u32, parts: &[&[u8]]) -> Vec<u8> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let h = Header {
        msg_id: 7,
        cmd: command,
        msg_size: (HEADER_SIZE + len) as u32,
        flags: flags::TYPE_COMMAND | msg_flags,
        error_no: 0,
    };
    let mut v = h.encode().to_vec();
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

fn le32(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

fn le64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

fn region_access(idx: u32, offset: u64, count: u32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&le64(offset));
    v.extend_from_slice(&le32(idx));
    v.extend_from_slice(&le32(count));
    v
}

fn dma_map_body(iova: u64, size: u64, with_fd: bool) -> Vec<u8> {
    let mut fl = DMA_REGION_READ | DMA_REGION_WRITE;
    if with_fd {
        fl |= DMA_REGION_MMAP;
    }
    let mut v = Vec::new();
    v.extend_from_slice(&le32(32));
    v.extend_from_slice(&le32(fl));
    v.extend_from_slice(&le64(0));
    v.extend_from_slice(&le64(iova));
    v.extend_from_slice(&le64(size));
    v
}

fn dma_unmap_body(iova: u64, size: u64) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&le32(24));
    v.extend_from_slice(&le32(0));
    v.extend_from_slice(&le64(iova));
    v.extend_from_slice(&le64(size));
    v
}

fn feature(argsz: u32, feature_flags: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&le32(argsz));
    v.extend_from_slice(&le32(feature_flags));
    v.extend_from_slice(data);
    message(cmd::DEVICE_FEATURE, 0, &[&v])
}

/// Checks a reply received into `rep` (the cheap check every timed round
/// trip does, on both sides of a comparison).
#[inline]
fn check_reply(rep: &[u8]) {
    let fl = u32::from_le_bytes([rep[8], rep[9], rep[10], rep[11]]);
    let size = u32::from_le_bytes([rep[4], rep[5], rep[6], rep[7]]) as usize;
    if fl & flags::ERROR != 0 || size != rep.len() {
        let e = u32::from_le_bytes([rep[12], rep[13], rep[14], rep[15]]);
        panic!(
            "bad reply: flags {fl:#x} errno {e} size {size} (expected {})",
            rep.len()
        );
    }
}

/// One connected socket on which the same client code drives either the
/// library or a floor thread.
struct Conn {
    fd: OwnedFd,
}

impl Conn {
    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A round trip whose reply size is already known.
    #[inline]
    fn call(&self, req: &[u8], pass: Option<RawFd>, rep: &mut [u8]) {
        send_all(self.raw(), req, pass);
        if !recv_all(self.raw(), rep) {
            panic!("peer closed");
        }
        check_reply(rep);
    }

    /// A round trip that learns the reply: returns its bytes.
    fn learn(&self, req: &[u8], pass: Option<RawFd>) -> Vec<u8> {
        send_all(self.raw(), req, pass);
        let mut h = [0u8; HEADER_SIZE];
        assert!(recv_all(self.raw(), &mut h), "peer closed");
        let hdr = Header::decode(&h);
        assert!(
            hdr.flags & flags::ERROR == 0,
            "command {} failed: errno {}",
            hdr.cmd,
            hdr.error_no
        );
        let mut v = h.to_vec();
        v.resize(hdr.msg_size as usize, 0);
        assert!(recv_all(self.raw(), &mut v[HEADER_SIZE..]), "peer closed");
        v
    }

    fn post(&self, req: &[u8]) {
        send_all(self.raw(), req, None);
    }
}

/// Connects a raw client to the server at `path` and negotiates.
fn raw_client(path: &Path) -> Conn {
    let s = UnixStream::connect(path).expect("connect");
    let c = Conn {
        fd: OwnedFd::from(s),
    };
    let mut body = Vec::new();
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&2u16.to_le_bytes());
    body.extend_from_slice(
        br#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"write_multiple":true}}"#,
    );
    body.push(0);
    c.learn(&message(cmd::VERSION, 0, &[&body]), None);
    c
}

// ---- servers ---------------------------------------------------------------------

/// The bench device: a 4 KiB memory-like BAR0, DMA with room for `dma_max`
/// regions, migration whose data callbacks do nothing but claim the bytes.
struct MigDev;

impl MigrationDevice for MigDev {
    fn transition(&self, _ctx: &Context, _state: u32) -> Result<(), Errno> {
        Ok(())
    }
    fn read_data(&self, _ctx: &Context, buf: &mut [u8]) -> Result<usize, Errno> {
        Ok(buf.len())
    }
    fn write_data(&self, _ctx: &Context, buf: &[u8]) -> Result<usize, Errno> {
        Ok(buf.len())
    }
}

const BAR0_SIZE: usize = 4096;

fn setup_device(ctx: &Context, dma_max: usize) -> Result<(), Errno> {
    ctx.pci_init(pci::PCI_TYPE_CONVENTIONAL, pci::PCI_HEADER_TYPE_NORMAL, 0)?;
    let mem = Rc::new(RefCell::new(vec![0u8; BAR0_SIZE]));
    ctx.setup_region(
        region::BAR0,
        RegionSetup {
            size: BAR0_SIZE as u64,
            cb: Some(Rc::new(
                move |_ctx: &Context, buf: &mut [u8], off: u64, w: bool| {
                    let mut m = mem.borrow_mut();
                    let off = usize::try_from(off).map_err(|_| Errno::EINVAL)?;
                    let area = m.get_mut(off..off + buf.len()).ok_or(Errno::EINVAL)?;
                    if w {
                        area.copy_from_slice(buf);
                    } else {
                        buf.copy_from_slice(area);
                    }
                    Ok(buf.len())
                },
            )),
            flags: region::FLAG_RW | region::FLAG_MEM,
            mmap_areas: None,
            fd: None,
            offset: 0,
        },
    )?;
    ctx.setup_dma(dma_max, None, None)?;
    ctx.setup_migration(Rc::new(MigDev))?;
    ctx.realize()
}

static SOCK_COUNTER: AtomicUsize = AtomicUsize::new(0);

struct Server {
    path: PathBuf,
    handle: Option<JoinHandle<()>>,
}

impl Server {
    fn start(dma_max: usize) -> Server {
        let n = SOCK_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vfu-bench-{}-{n}.sock", std::process::id()));
        let p = path.clone();
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::spawn(move || {
            let ctx = Context::new(&p, 0, std::ptr::null_mut()).expect("context");
            setup_device(&ctx, dma_max).expect("setup");
            tx.send(()).expect("started");
            ctx.attach().expect("attach");
            let r = ctx.run();
            assert_eq!(r, Err(Errno::ENOTCONN), "server stopped with {r:?}");
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("server did not start");
        Server {
            path,
            handle: Some(handle),
        }
    }

    fn connect(&self) -> Conn {
        raw_client(&self.path)
    }

    /// Waits for the server to see its client go.
    fn join(mut self) {
        if let Some(h) = self.handle.take() {
            h.join().expect("server thread panicked");
        }
    }
}

/// A floor thread: for each message of `steps` in turn (cyclically), receive
/// `req_len` bytes and send `reply` (when not empty).
fn floor_server(steps: Vec<(usize, Vec<u8>)>) -> (Conn, JoinHandle<()>) {
    floor_server_with(steps, false)
}

/// [`floor_server`], optionally reading each message the way a framed
/// protocol must without read-ahead: the 16-byte header, then the rest.
fn floor_server_with(steps: Vec<(usize, Vec<u8>)>, framed: bool) -> (Conn, JoinHandle<()>) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0, "socketpair");
    // SAFETY: both fds are fresh and ours.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let h = std::thread::spawn(move || {
        let max = steps.iter().map(|s| s.0).max().unwrap_or(0);
        let mut buf = vec![0u8; max];
        let fd = b.as_raw_fd();
        'outer: loop {
            for (req_len, reply) in &steps {
                let ok = if framed && *req_len > HEADER_SIZE {
                    recvmsg_all(fd, &mut buf[..HEADER_SIZE])
                        && recv_all(fd, &mut buf[HEADER_SIZE..*req_len])
                } else {
                    recvmsg_all(fd, &mut buf[..*req_len])
                };
                if !ok {
                    break 'outer;
                }
                if !reply.is_empty() {
                    send_all(fd, reply, None);
                }
            }
        }
    });
    (Conn { fd: a }, h)
}

// ---- measurement -------------------------------------------------------------------

type Op<'a> = dyn FnMut(u64) + 'a;

/// One group of paths.
type Section = fn(&Cfg, &mut Report);

fn time_n(f: &mut Op<'_>, n: u64) -> Duration {
    let t = Instant::now();
    f(n);
    t.elapsed()
}

/// Ops per round so that one round of `f` lasts about `target`.
fn calibrate(f: &mut Op<'_>, target: Duration) -> u64 {
    f(2);
    let mut n = 1u64;
    loop {
        let d = time_n(f, n);
        if d >= target / 8 || n >= 1 << 30 {
            let per = d.as_secs_f64() / n as f64;
            return ((target.as_secs_f64() / per) as u64).max(1);
        }
        n *= 4;
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Interleaved rounds of `floor` and `subject`; returns the median seconds
/// per op of each.
fn compare(cfg: &Cfg, floor: &mut Op<'_>, subject: &mut Op<'_>) -> (f64, f64) {
    let n = calibrate(subject, cfg.round);
    floor(2);
    let (mut fs, mut ss) = (Vec::new(), Vec::new());
    for _ in 0..cfg.rounds {
        fs.push(time_n(floor, n).as_secs_f64() / n as f64);
        ss.push(time_n(subject, n).as_secs_f64() / n as f64);
    }
    (median(&mut fs), median(&mut ss))
}

/// Rounds of `subject` alone; median seconds per op.
fn measure(cfg: &Cfg, subject: &mut Op<'_>) -> f64 {
    let n = calibrate(subject, cfg.round);
    let mut ss: Vec<f64> = (0..cfg.rounds)
        .map(|_| time_n(subject, n).as_secs_f64() / n as f64)
        .collect();
    median(&mut ss)
}

fn fmt_time(s: f64) -> String {
    if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else if s >= 1e-6 {
        format!("{:.2} µs", s * 1e6)
    } else {
        format!("{:.1} ns", s * 1e9)
    }
}

fn fmt_bytes(b: f64) -> String {
    if b.abs() >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b.abs() >= 1024.0 {
        format!("{:.1} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn gib_s(bytes: usize, secs: f64) -> String {
    format!("{:.2} GiB/s", bytes as f64 / secs / (1u64 << 30) as f64)
}

#[derive(Clone, Copy)]
enum Target {
    None,
    /// ratio <= x
    AtMost(f64),
    /// ratio >= x
    AtLeast(f64),
    /// absolute seconds < x
    Below(f64),
}

struct Row {
    path: String,
    cost: String,
    floor: String,
    ratio: String,
    target: String,
    verdict: String,
}

struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn row(&mut self, path: &str, cost: String, floor: String, value: Option<f64>, t: Target) {
        let ratio = match (value, t) {
            (Some(v), Target::Below(_)) => fmt_time(v),
            (Some(v), _) => format!("{v:.2}x"),
            (None, _) => "-".into(),
        };
        let (target, verdict) = match (t, value) {
            (Target::None, _) | (_, None) => ("-".to_string(), "-".to_string()),
            (Target::AtMost(x), Some(v)) => (format!("<= {x:.2}x"), pass(v <= x)),
            (Target::AtLeast(x), Some(v)) => (format!(">= {x:.2}x"), pass(v >= x)),
            (Target::Below(x), Some(v)) => (format!("< {}", fmt_time(x)), pass(v < x)),
        };
        let r = Row {
            path: path.into(),
            cost,
            floor,
            ratio,
            target,
            verdict,
        };
        println!(
            "{:<58} {:>22} {:>22} {:>9} {:>10} {:>5}",
            r.path, r.cost, r.floor, r.ratio, r.target, r.verdict
        );
        let _ = std::io::stdout().flush();
        self.rows.push(r);
    }

    /// A floor/subject comparison row.
    fn cmp(&mut self, path: &str, (floor, subj): (f64, f64), t: Target) -> f64 {
        let ratio = subj / floor;
        self.row(path, fmt_time(subj), fmt_time(floor), Some(ratio), t);
        ratio
    }

    fn markdown(&self) -> String {
        let mut s = String::from(
            "| path | cost | floor | ratio | target | result |\n|---|---:|---:|---:|---:|:---:|\n",
        );
        for r in &self.rows {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.path, r.cost, r.floor, r.ratio, r.target, r.verdict
            ));
        }
        s
    }
}

fn pass(ok: bool) -> String {
    if ok { "PASS" } else { "MISS" }.into()
}

// ---- the paths ------------------------------------------------------------------------

const BAR0: u32 = region::BAR0 as u32;

/// A request/reply path of the library against its ping-pong floor.
fn socket_pair_cmp(cfg: &Cfg, lib: &Conn, req: &[u8], pass: Option<RawFd>) -> (f64, f64) {
    let reply = lib.learn(req, pass);
    let (floor, fh) = floor_server(vec![(req.len(), reply.clone())]);
    let mut rep = vec![0u8; reply.len()];
    let mut rep2 = vec![0u8; reply.len()];
    let r = compare(
        cfg,
        &mut |n| {
            for _ in 0..n {
                floor.call(req, pass, &mut rep);
            }
        },
        &mut |n| {
            for _ in 0..n {
                lib.call(req, pass, &mut rep2);
            }
        },
    );
    drop(floor);
    fh.join().expect("floor thread");
    r
}

fn bench_region(cfg: &Cfg, rep: &mut Report) {
    let server = Server::start(16);
    let c = server.connect();
    // 4-byte read and write.
    let read = message(cmd::REGION_READ, 0, &[&region_access(BAR0, 0x40, 4)]);
    rep.cmp(
        "REGION_READ 4 B round trip",
        socket_pair_cmp(cfg, &c, &read, None),
        Target::AtMost(1.10),
    );
    // The same read against a floor that reads header and body separately
    // (what the server does): how much of the gap is that one recv.
    {
        let reply = c.learn(&read, None);
        let (plain, h1) = floor_server(vec![(read.len(), reply.clone())]);
        let (framed, h2) = floor_server_with(vec![(read.len(), reply.clone())], true);
        let mut r1 = vec![0u8; reply.len()];
        let mut r2 = vec![0u8; reply.len()];
        let res = compare(
            cfg,
            &mut |n| {
                for _ in 0..n {
                    plain.call(&read, None, &mut r1);
                }
            },
            &mut |n| {
                for _ in 0..n {
                    framed.call(&read, None, &mut r2);
                }
            },
        );
        drop((plain, framed));
        h1.join().expect("floor thread");
        h2.join().expect("floor thread");
        rep.cmp(
            "  floor reading header then body (REGION_READ sizes)",
            res,
            Target::None,
        );
    }
    let write = message(
        cmd::REGION_WRITE,
        0,
        &[&region_access(BAR0, 0x40, 4), &[1, 2, 3, 4]],
    );
    let (wf, ws) = socket_pair_cmp(cfg, &c, &write, None);
    rep.cmp(
        "REGION_WRITE 4 B round trip",
        (wf, ws),
        Target::AtMost(1.05),
    );

    // Posted writes: batches of K posted writes closed by one round-trip
    // write, against the same stream of bytes through the floor.
    const K: usize = 256;
    let posted = message(
        cmd::REGION_WRITE,
        flags::NO_REPLY,
        &[&region_access(BAR0, 0x44, 4), &[5, 6, 7, 8]],
    );
    let wreply = c.learn(&write, None);
    let mut steps: Vec<(usize, Vec<u8>)> = (0..K).map(|_| (posted.len(), Vec::new())).collect();
    steps.push((write.len(), wreply.clone()));
    let (floor, fh) = floor_server(steps);
    let mut r1 = vec![0u8; wreply.len()];
    let mut r2 = vec![0u8; wreply.len()];
    let (pf, ps) = compare(
        cfg,
        &mut |n| {
            for _ in 0..n {
                for _ in 0..K {
                    floor.post(&posted);
                }
                floor.call(&write, None, &mut r1);
            }
        },
        &mut |n| {
            for _ in 0..n {
                for _ in 0..K {
                    c.post(&posted);
                }
                c.call(&write, None, &mut r2);
            }
        },
    );
    drop(floor);
    fh.join().expect("floor thread");
    let per = ps / (K + 1) as f64;
    let per_floor = pf / (K + 1) as f64;
    rep.row(
        "REGION_WRITE 4 B posted (NO_REPLY), per write",
        fmt_time(per),
        fmt_time(per_floor),
        Some(per / per_floor),
        Target::None,
    );
    rep.row(
        "posted write rate / round-trip write rate",
        format!("{:.2} M/s", 1e-6 / per),
        format!("rt {:.2} M/s", 1e-6 / ws),
        Some(ws / per),
        Target::AtLeast(2.0),
    );

    // WRITE_MULTI with 8 and 200 entries of 4 bytes.
    for n in [8usize, 200] {
        let mut body = Vec::new();
        body.extend_from_slice(&le64(n as u64));
        for i in 0..n {
            body.extend_from_slice(&le64(0x100 + 8 * (i as u64 % 64)));
            body.extend_from_slice(&le32(BAR0));
            body.extend_from_slice(&le32(4));
            body.extend_from_slice(&[9, 9, 9, 9, 0, 0, 0, 0]);
        }
        let req = message(cmd::REGION_WRITE_MULTI, 0, &[&body]);
        let (f, s) = socket_pair_cmp(cfg, &c, &req, None);
        rep.cmp(
            &format!("REGION_WRITE_MULTI x{n} (4 B each)"),
            (f, s),
            Target::None,
        );
        rep.row(
            &format!("  per write in WRITE_MULTI x{n} vs one round-trip write"),
            fmt_time(s / n as f64),
            fmt_time(ws),
            Some((s / n as f64) / ws),
            Target::None,
        );
    }
    drop(c);
    server.join();

    // The same 4-byte read through the library's client, for comparison.
    let server = Server::start(16);
    let mut client = vfio_user::client::Client::connect(&server.path).expect("client");
    let probe = server_probe_read_reply();
    let (floor, fh) = floor_server(vec![(read.len(), probe)]);
    let mut r = vec![0u8; 36];
    let res = compare(
        cfg,
        &mut |n| {
            for _ in 0..n {
                floor.call(&read, None, &mut r);
            }
        },
        &mut |n| {
            for _ in 0..n {
                black_box(client.region_read(BAR0, 0x40, 4).expect("read"));
            }
        },
    );
    drop(floor);
    fh.join().expect("floor thread");
    rep.cmp("REGION_READ 4 B round trip (Client)", res, Target::None);
    drop(client);
    server.join();
}

/// The 36-byte reply of a 4-byte REGION_READ of zeros at 0x40.
fn server_probe_read_reply() -> Vec<u8> {
    let h = Header {
        msg_id: 7,
        cmd: cmd::REGION_READ,
        msg_size: 36,
        flags: flags::TYPE_REPLY,
        error_no: 0,
    };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(&region_access(BAR0, 0x40, 4));
    v.extend_from_slice(&[0; 4]);
    v
}

fn bench_dma_map(cfg: &Cfg, rep: &mut Report) {
    let sizes: &[usize] = &[1, 1024, 65536];
    let server = Server::start(65536 + 16);
    let c = server.connect();
    let page = page_size() as u64;
    let mem = memfd("bench-map", page);
    let target_iova = 1u64 << 40;
    let map_fd = message(cmd::DMA_MAP, 0, &[&dma_map_body(target_iova, page, true)]);
    let map_nofd = message(cmd::DMA_MAP, 0, &[&dma_map_body(target_iova, page, false)]);
    let unmap = message(cmd::DMA_UNMAP, 0, &[&dma_unmap_body(target_iova, page)]);
    let mut existing = 0usize;
    for &n in sizes {
        // Grow the table with fd-less regions (one page each, a page apart).
        while existing < n {
            let iova = existing as u64 * 2 * page;
            let m = message(cmd::DMA_MAP, 0, &[&dma_map_body(iova, page, false)]);
            c.learn(&m, None);
            existing += 1;
        }
        for (with_fd, map) in [(true, &map_fd), (false, &map_nofd)] {
            let pass = with_fd.then(|| mem.as_raw_fd());
            let map_reply = c.learn(map, pass);
            let unmap_reply = c.learn(&unmap, None);
            let (floor, fh) = floor_server(vec![
                (map.len(), map_reply.clone()),
                (unmap.len(), unmap_reply.clone()),
            ]);
            let mut a = vec![0u8; map_reply.len()];
            let mut b = vec![0u8; unmap_reply.len()];
            let (mut a2, mut b2) = (a.clone(), b.clone());
            let res = compare(
                cfg,
                &mut |k| {
                    for _ in 0..k {
                        floor.call(map, pass, &mut a);
                        floor.call(&unmap, None, &mut b);
                    }
                },
                &mut |k| {
                    for _ in 0..k {
                        c.call(map, pass, &mut a2);
                        c.call(&unmap, None, &mut b2);
                    }
                },
            );
            drop(floor);
            fh.join().expect("floor thread");
            let what = if with_fd { "fd, mmap" } else { "no fd" };
            rep.cmp(
                &format!("DMA_MAP+DMA_UNMAP ({what}), {n} regions mapped"),
                res,
                Target::AtMost(1.5),
            );
        }
    }
    drop(c);
    server.join();
}

fn bench_migration(cfg: &Cfg, rep: &mut Report) {
    let server = Server::start(16);
    let c = server.connect();
    let set_state = |s: u32| {
        let mut d = Vec::new();
        d.extend_from_slice(&le32(s));
        d.extend_from_slice(&le32(0));
        c.learn(
            &feature(
                16,
                VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                &d,
            ),
            None,
        );
    };
    set_state(VFIO_USER_DEVICE_STATE_STOP);
    set_state(VFIO_USER_DEVICE_STATE_STOP_COPY);
    let mut reads = Vec::new();
    for chunk in [32usize << 10, 1 << 20] {
        let mut b = Vec::new();
        b.extend_from_slice(&le32(8 + chunk as u32));
        b.extend_from_slice(&le32(chunk as u32));
        let req = message(cmd::MIG_DATA_READ, 0, &[&b]);
        let (f, s) = socket_pair_cmp(cfg, &c, &req, None);
        let bytes = HEADER_SIZE + 8 + chunk;
        let t = if chunk == 1 << 20 {
            Target::AtMost(1.25)
        } else {
            Target::None
        };
        rep.row(
            &format!("MIG_DATA_READ {} KiB chunks", chunk >> 10),
            format!("{} ({})", fmt_time(s), gib_s(bytes, s)),
            format!("{} ({})", fmt_time(f), gib_s(bytes, f)),
            Some(s / f),
            t,
        );
        reads.push(s / f);
    }
    set_state(VFIO_USER_DEVICE_STATE_STOP);
    set_state(VFIO_USER_DEVICE_STATE_RESUMING);
    for chunk in [32usize << 10, 1 << 20] {
        let mut b = Vec::new();
        b.extend_from_slice(&le32(8 + chunk as u32));
        b.extend_from_slice(&le32(chunk as u32));
        let data = vec![0x5au8; chunk];
        let req = message(cmd::MIG_DATA_WRITE, 0, &[&b, &data]);
        let (f, s) = socket_pair_cmp(cfg, &c, &req, None);
        let bytes = HEADER_SIZE + 8 + chunk;
        let t = if chunk == 1 << 20 {
            Target::AtMost(1.15)
        } else {
            Target::None
        };
        rep.row(
            &format!("MIG_DATA_WRITE {} KiB chunks", chunk >> 10),
            format!("{} ({})", fmt_time(s), gib_s(bytes, s)),
            format!("{} ({})", fmt_time(f), gib_s(bytes, f)),
            Some(s / f),
            t,
        );
    }
    drop(c);
    server.join();
}

fn bench_dirty(cfg: &Cfg, rep: &mut Report) {
    let server = Server::start(16);
    let c = server.connect();
    let len = 64u64 << 30;
    let pg = 4096u64;
    let iova = 1u64 << 40;
    let mem = memfd("bench-64g", len);
    c.learn(
        &message(cmd::DMA_MAP, 0, &[&dma_map_body(iova, len, true)]),
        Some(mem.as_raw_fd()),
    );
    drop(mem);
    let mut d = Vec::new();
    d.extend_from_slice(&le64(pg));
    d.extend_from_slice(&le32(1));
    d.extend_from_slice(&le32(0));
    d.extend_from_slice(&le64(iova));
    d.extend_from_slice(&le64(len));
    c.learn(
        &feature(
            (8 + d.len()) as u32,
            VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            &d,
        ),
        None,
    );
    let bitmap = (len / pg / 8) as usize;
    let mut r = Vec::new();
    r.extend_from_slice(&le64(iova));
    r.extend_from_slice(&le64(len));
    r.extend_from_slice(&le64(pg));
    let req = feature(
        (8 + 24 + bitmap) as u32,
        VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
        &r,
    );
    let res = socket_pair_cmp(cfg, &c, &req, None);
    rep.row(
        "DMA_LOGGING_REPORT 64 GiB @ 4 KiB pages (2 MiB bitmap)",
        fmt_time(res.1),
        fmt_time(res.0),
        Some(res.1),
        Target::Below(5e-3),
    );
    drop(c);
    server.join();
}

/// A table of `n` one-page regions a page apart; `k` of them (evenly
/// spread) are backed by pages of one memfd and mapped, the rest have no fd.
/// Returns the controller and the IOVAs of the mapped ones.
/// n one-page regions a page apart, of which `k` are backed by pages of
/// `mem`: evenly spread, or (`scatter`) at random places.
fn dma_table(n: usize, k: usize, mem: &OwnedFd, scatter: bool) -> (DmaController, Vec<u64>) {
    let page = page_size() as u64;
    let dma = DmaController::new(n);
    let step = n / k;
    let mut chosen = std::collections::HashSet::new();
    let mut seed = 0x1234_5678_9abc_def1u64;
    while scatter && chosen.len() < k {
        chosen.insert((xorshift(&mut seed) % n as u64) as usize);
    }
    let mut mapped = Vec::new();
    for i in 0..n {
        let iova = i as u64 * 2 * page;
        let backed = if scatter {
            chosen.contains(&i)
        } else {
            i % step == 0
        };
        if backed && mapped.len() < k {
            let fd = mem.try_clone().expect("dup");
            let off = mapped.len() as u64 * page;
            dma.add_region(
                iova,
                page,
                Some(fd),
                off,
                libc::PROT_READ | libc::PROT_WRITE,
                false,
            )
            .expect("add mapped region");
            mapped.push(iova);
        } else {
            dma.add_region(
                iova,
                page,
                None,
                0,
                libc::PROT_READ | libc::PROT_WRITE,
                false,
            )
            .expect("add region");
        }
    }
    (dma, mapped)
}

/// The local address of each of `iovas` (mapped one-page regions), each
/// page touched once so that neither side of a comparison takes faults.
fn mapped_vaddrs(dma: &DmaController, iovas: &[u64]) -> Vec<usize> {
    let page = page_size();
    let mut vaddrs = Vec::new();
    for &iova in iovas {
        let mut sg = [DmaSg::default()];
        dma.addr_to_sgl(
            iova,
            page as u64,
            &mut sg,
            libc::PROT_READ | libc::PROT_WRITE,
        )
        .expect("sgl");
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }];
        dma.sgl_get(&sg, &mut iov).expect("sgl_get");
        // Touch every page so that neither side takes page faults.
        // SAFETY: the region is mapped read/write for a page.
        unsafe { std::ptr::write_bytes(iov[0].iov_base as *mut u8, 0x11, page) };
        vaddrs.push(iov[0].iov_base as usize);
    }
    vaddrs
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// `ops` translations of a 4 KiB range (cycling through `seq`) with
/// `sgl_get` and `sgl_put`, no copy.
fn get_put(dma: &DmaController, iovas: &[u64], seq: &[usize], ops: u64) {
    let page = page_size() as u64;
    let mut sg = [DmaSg::default()];
    let mut iov = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }];
    for i in 0..ops as usize {
        let j = seq[i % seq.len()];
        dma.addr_to_sgl(iovas[j], page, &mut sg, libc::PROT_READ | libc::PROT_WRITE)
            .expect("sgl");
        dma.sgl_get(&sg, &mut iov).expect("get");
        black_box(&iov);
        dma.sgl_put(&sg);
    }
}

/// memcpy of a page from `vaddrs[seq[i]]` (the floor) against
/// `addr_to_sgl` + `sg_read` of the same page.
fn read_vs_memcpy(
    cfg: &Cfg,
    dma: &DmaController,
    iovas: &[u64],
    vaddrs: &[usize],
    seq: &[usize],
) -> (f64, f64) {
    let page = page_size();
    let mut buf = vec![0u8; page];
    let mut buf2 = vec![0u8; page];
    compare(
        cfg,
        &mut |ops| {
            for i in 0..ops as usize {
                let j = seq[i % seq.len()];
                // SAFETY: vaddrs[j] is a mapped page; buf has a page.
                unsafe {
                    std::ptr::copy_nonoverlapping(vaddrs[j] as *const u8, buf.as_mut_ptr(), page)
                };
                black_box(&mut buf);
            }
        },
        &mut |ops| {
            let mut sg = [DmaSg::default()];
            for i in 0..ops as usize {
                let j = seq[i % seq.len()];
                dma.addr_to_sgl(iovas[j], page as u64, &mut sg, libc::PROT_READ)
                    .expect("sgl");
                assert!(dma.sg_read(&sg[0], &mut buf2, true).expect("read"));
                black_box(&mut buf2);
            }
        },
    )
}

fn bench_dma_lookup(cfg: &Cfg, rep: &mut Report) {
    // Mapped regions per table: kept at 1 Ki whatever the table size (each
    // is an mmap, and the kernel caps a process at ~64 Ki mappings); the
    // other regions have no fd but sit in the same lookup structure.
    const K: usize = 1024;
    let page = page_size();
    let mem = memfd("bench-sgl", (K * page) as u64);
    let mut sizes = vec![1usize << 10, 1 << 16];
    if !cfg.quick {
        sizes.push(1 << 20);
    }
    // Cold: a random walk over the 1 Ki mapped regions (defeats the
    // per-thread translation cache, and at large sizes the CPU caches).
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let cold: Vec<usize> = (0..8192)
        .map(|_| (xorshift(&mut seed) % K as u64) as usize)
        .collect();
    // Warm: 8 regions spread over the table in turn (defeats the
    // translation cache, but the lookup paths stay in the CPU caches): the
    // algorithmic cost of the lookup.
    let warm: Vec<usize> = (0..8).map(|i| (i * 131 + 17) % K).collect();
    let mut cold_gp = Vec::new();
    let mut warm_gp = Vec::new();
    for &n in &sizes {
        let (dma, iovas) = dma_table(n, K, &mem, false);
        let vaddrs = mapped_vaddrs(&dma, &iovas);
        let label = match n {
            1024 => "1 Ki",
            65536 => "64 Ki",
            _ => "1 Mi",
        };
        let t = if n == 65536 {
            Target::AtMost(1.30)
        } else {
            Target::None
        };
        let res = read_vs_memcpy(cfg, &dma, &iovas, &vaddrs, &cold);
        rep.cmp(
            &format!("addr_to_sgl+sg_read 4 KiB, {label} regions, random region"),
            res,
            t,
        );
        let res = read_vs_memcpy(cfg, &dma, &iovas, &vaddrs, &warm);
        rep.cmp(
            &format!("addr_to_sgl+sg_read 4 KiB, {label} regions, 8 regions in turn"),
            res,
            t,
        );
        if n == 65536 {
            // The same region every time: the translation cache hits.
            let res = read_vs_memcpy(cfg, &dma, &iovas, &vaddrs, &warm[..1]);
            rep.cmp(
                &format!("addr_to_sgl+sg_read 4 KiB, {label} regions, same region"),
                res,
                t,
            );
            // The mapped regions at random places instead of evenly spread:
            // their addresses collide in the translation cache as random
            // keys do (evenly spread ones hash without collisions).
            let (sdma, siovas) = dma_table(n, K, &mem, true);
            let svaddrs = mapped_vaddrs(&sdma, &siovas);
            let res = read_vs_memcpy(cfg, &sdma, &siovas, &svaddrs, &cold);
            rep.cmp(
                &format!(
                    "addr_to_sgl+sg_read 4 KiB, {label} regions, random region, scattered layout"
                ),
                res,
                Target::None,
            );
        }
        // The lookup structure itself: translations of random regions out
        // of all n (mostly no fd), far more than the per-thread translation
        // cache holds, so most of them miss it.
        let mut s2 = 0x2545_f491_4f6c_dd1du64;
        let any: Vec<u64> = (0..8192)
            .map(|_| (xorshift(&mut s2) % n as u64) * 2 * page as u64)
            .collect();
        let t = measure(cfg, &mut |ops| {
            let mut sg = [DmaSg::default()];
            for i in 0..ops as usize {
                dma.addr_to_sgl(any[i % any.len()], 8, &mut sg, libc::PROT_READ)
                    .expect("sgl");
                black_box(&sg);
            }
        });
        rep.row(
            &format!("addr_to_sgl alone, {label} regions, random over all (cache misses)"),
            fmt_time(t),
            "-".into(),
            None,
            Target::None,
        );
        let c = measure(cfg, &mut |ops| get_put(&dma, &iovas, &cold, ops));
        let w = measure(cfg, &mut |ops| get_put(&dma, &iovas, &warm, ops));
        rep.row(
            &format!("addr_to_sgl+sgl_get+sgl_put, {label} regions (random / in turn)"),
            format!("{} / {}", fmt_time(c), fmt_time(w)),
            "-".into(),
            None,
            Target::None,
        );
        cold_gp.push((n, c));
        warm_gp.push((n, w));
        drop(dma);
    }
    // Growth against log n, from 1 Ki regions.
    for (kind, v, t) in [("in turn", &warm_gp, true), ("random", &cold_gp, false)] {
        let (n0, g0) = v[0];
        for &(n, g) in v.iter().skip(1) {
            let allowed = (n as f64).log2() / (n0 as f64).log2();
            let grow = g / g0;
            let label = if n == 65536 { "64 Ki" } else { "1 Mi" };
            rep.row(
                &format!("  sgl_get/put growth 1 Ki -> {label}, {kind} (log n: {allowed:.2}x)"),
                format!("{grow:.2}x"),
                format!("{allowed:.2}x"),
                Some(grow / allowed),
                if t { Target::AtMost(1.0) } else { Target::None },
            );
        }
    }
}

/// `ops` translations and 64-byte direct reads of `iova`.
fn read_small(dma: &DmaController, iova: u64, ops: u64) {
    let mut buf = [0u8; 64];
    let mut sg = [DmaSg::default()];
    for _ in 0..ops {
        dma.addr_to_sgl(black_box(iova), 64, &mut sg, libc::PROT_READ)
            .expect("sgl");
        assert!(dma.sg_read(&sg[0], &mut buf, true).expect("read"));
        black_box(&mut buf);
    }
}

fn bench_dma_threads(cfg: &Cfg, rep: &mut Report) {
    // Device threads doing DMA at the same time, each on a CPU of its own:
    // the cost per access per thread with two threads against one. 1.0x
    // is perfect scaling; a lock word shared by the threads shows up here.
    let Some(top) = highest_allowed_cpu().filter(|&c| c >= 1) else {
        rep.row(
            "addr_to_sgl+sg_read 64 B: 2 threads on 2 CPUs vs 1 thread",
            "skipped: one CPU".into(),
            "-".into(),
            None,
            Target::None,
        );
        return;
    };
    let page = page_size() as u64;
    let dma = DmaController::new(4);
    let mem = memfd("bench-threads", 4 * page);
    dma.add_region(1 << 30, 4 * page, Some(mem), 0, libc::PROT_READ, false)
        .expect("region");
    let cpus = [top - 1, top];
    let mut one = |ops: u64| read_small(&dma, 1 << 30, ops);
    let mut two = |ops: u64| {
        std::thread::scope(|s| {
            for (t, &cpu) in cpus.iter().enumerate() {
                let dma = &dma;
                s.spawn(move || {
                    let _ = pin_to(cpu);
                    // Each thread its own page of the region.
                    read_small(dma, (1 << 30) + 2 * t as u64 * page, ops);
                });
            }
        });
    };
    let res = compare(cfg, &mut one, &mut two);
    rep.cmp(
        "addr_to_sgl+sg_read 64 B, per access per thread: 2 threads on 2 CPUs vs 1 thread",
        res,
        Target::None,
    );
}

fn bench_memory(cfg: &Cfg, rep: &mut Report) {
    // One context: created, PCI config space, BAR0 callback, DMA and
    // migration set up, realized (device memory excluded: the BAR0 backing
    // below is the device's).
    let path = std::env::temp_dir().join(format!("vfu-bench-mem-{}.sock", std::process::id()));
    let before = live_bytes();
    let ctx = Context::new(&path, 0, std::ptr::null_mut()).expect("context");
    setup_device(&ctx, 16).expect("setup");
    let after = live_bytes();
    drop(ctx);
    let per_ctx = (after - before) as f64 - BAR0_SIZE as f64;
    rep.row(
        "memory per context (set up and realized, heap)",
        fmt_bytes(per_ctx),
        "-".into(),
        None,
        Target::None,
    );
    // The same context attached to a client, after one region read: adds
    // the connection's receive buffers and the request/reply spares (and
    // the server thread's own small bookkeeping).
    let before = live_bytes();
    let server = Server::start(16);
    let c = server.connect();
    c.learn(
        &message(cmd::REGION_READ, 0, &[&region_access(BAR0, 0, 4)]),
        None,
    );
    let after = live_bytes();
    drop(c);
    server.join();
    rep.row(
        "memory per context (attached, after one request, heap)",
        fmt_bytes((after - before) as f64 - BAR0_SIZE as f64),
        "-".into(),
        None,
        Target::None,
    );
    let path2 = std::env::temp_dir().join(format!("vfu-bench-mem2-{}.sock", std::process::id()));
    let before = live_bytes();
    let ctx = Context::new(&path2, 0, std::ptr::null_mut()).expect("context");
    ctx.realize().expect("realize");
    let after = live_bytes();
    drop(ctx);
    rep.row(
        "memory per context (bare: new + realize, heap)",
        fmt_bytes((after - before) as f64),
        "-".into(),
        None,
        Target::None,
    );

    let n = if cfg.quick { 1 << 16 } else { 1 << 20 };
    let page = page_size() as u64;
    // Give freed heap (earlier sections) back to the kernel first, so that
    // the RSS growth below is the table's.
    // SAFETY: malloc_trim has no preconditions.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
    let rss0 = rss_bytes();
    let before = live_bytes();
    let dma = DmaController::new(n);
    for i in 0..n {
        dma.add_region(i as u64 * 2 * page, page, None, 0, libc::PROT_READ, false)
            .expect("add");
    }
    let after = live_bytes();
    let rss1 = rss_bytes();
    drop(dma);
    rep.row(
        &format!("memory per DMA region (no fd, {} regions, heap)", n),
        fmt_bytes((after - before) as f64 / n as f64),
        format!(
            "RSS {}",
            fmt_bytes((rss1.saturating_sub(rss0)) as f64 / n as f64)
        ),
        None,
        Target::None,
    );
    let k = 1024;
    let mem = memfd("bench-mem", k as u64 * page);
    let before = live_bytes();
    let (dma, _) = dma_table(k, k, &mem, false);
    let after = live_bytes();
    drop(dma);
    rep.row(
        "memory per DMA region (fd, mmap'ed, 1 Ki regions, heap)",
        fmt_bytes((after - before) as f64 / k as f64),
        "+ 1 kernel VMA".into(),
        None,
        Target::None,
    );
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "?".into());
    // SAFETY: sysconf has no memory-safety preconditions.
    let ncpu = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "cpus {ncpu}, {model}, kernel {}, load average {}",
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    )
}

fn main() {
    let cfg = Cfg::from_env();
    let machine_at_start = machine();
    if let Some(cpu) = cfg.pin {
        if let Err(e) = pin_to(cpu) {
            eprintln!("cannot pin to CPU {cpu}: {e}; running unpinned");
        }
    }
    let start = Instant::now();
    println!(
        "vfio-user paths benchmark ({})",
        if cfg.quick { "quick" } else { "full" }
    );
    println!("machine: {machine_at_start}");
    println!(
        "pinned: {}; {} interleaved rounds of ~{} ms per side",
        cfg.pin
            .map_or("no".to_string(), |c| format!("all threads on CPU {c}")),
        cfg.rounds,
        cfg.round.as_millis()
    );
    println!(
        "{:<58} {:>22} {:>22} {:>9} {:>10} {:>5}",
        "path", "cost", "floor", "ratio", "target", ""
    );
    let mut rep = Report { rows: Vec::new() };
    let sections: [(&str, Section); 7] = [
        ("region", bench_region),
        ("map", bench_dma_map),
        ("lookup", bench_dma_lookup),
        ("threads", bench_dma_threads),
        ("migration", bench_migration),
        ("dirty", bench_dirty),
        ("memory", bench_memory),
    ];
    for (name, f) in sections {
        if cfg.only.is_empty() || cfg.only.iter().any(|o| o == name) {
            f(&cfg, &mut rep);
        }
    }
    println!();
    println!("machine at end: {}", machine());
    println!("elapsed: {:.1} s", start.elapsed().as_secs_f64());
    println!();
    print!("{}", rep.markdown());
    let misses = rep.rows.iter().filter(|r| r.verdict == "MISS").count();
    println!("\n{misses} target(s) missed");
}
