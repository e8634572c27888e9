//! Shared harness of the client tests: a real server (a `Context` built with
//! the Rust API) running in its own thread, and a small test device.
//!
//! The device's BAR0 (0x1000 bytes) is plain memory served by a callback,
//! with a few registers that make the server act:
//! - `REG_IRQ` (0x800): writing a u64 `n` triggers MSI-X vector `n`; the
//!   result (0 or errno) lands in `REG_IRQ_RESULT` (0x808).
//! - `REG_DMA_IOVA` (0x900), `REG_DMA_LEN` (0x908), then writing an op to
//!   `REG_DMA_OP` (0x910): `OP_READ` copies guest memory into the scratch
//!   area at `SCRATCH` (0xa00), `OP_WRITE` copies the scratch area to guest
//!   memory; `OP_DIRECT` lets the server touch fd-mapped memory itself. The
//!   result (0 or errno) lands in `REG_DMA_RESULT` (0x918).

#![allow(dead_code)]

use std::any::Any;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vfio_user::client::{Client, ClientOptions, GuestMemory};
use vfio_user::device::{
    irq, pci, region, DmaInfo, DmaSg, IoEventFd, MigrationDevice, RegionSetup, ResetType,
};
use vfio_user::{Context, Errno};

pub const BAR0_SIZE: usize = 0x1000;
pub const REG_IRQ: u64 = 0x800;
pub const REG_IRQ_RESULT: u64 = 0x808;
pub const REG_DMA_IOVA: u64 = 0x900;
pub const REG_DMA_LEN: u64 = 0x908;
pub const REG_DMA_OP: u64 = 0x910;
pub const REG_DMA_RESULT: u64 = 0x918;
pub const SCRATCH: u64 = 0xa00;
pub const SCRATCH_LEN: usize = 0x600;
pub const OP_READ: u64 = 1;
pub const OP_WRITE: u64 = 2;
pub const OP_DIRECT: u64 = 4;

pub const BAR2_SIZE: u64 = 0x4000;
pub const VENDOR: u16 = 0x4e58;
pub const DEVICE: u16 = 0x0001;
pub const SUBSYS_VENDOR: u16 = 0x1af4;
pub const SUBSYS: u16 = 0x1100;
pub const MSIX_COUNT: u32 = 4;
pub const DMA_MAX_REGIONS: usize = 8;
pub const IOEVENTFD_OFFSET: u64 = 0x40;
pub const IOEVENTFD_DATAMATCH: u64 = 0x1234;

/// What the device saw, shared with the test thread.
#[derive(Default)]
pub struct Shared {
    pub bar0: Vec<u8>,
    /// (offset, len, is_write) of every BAR0 access.
    pub accesses: Vec<(u64, usize, bool)>,
    pub resets: Vec<ResetType>,
    /// (start, count, masked) of every MSI-X mask change.
    pub mask_changes: Vec<(u32, u32, bool)>,
    /// (iova, len) of DMA register / unregister callbacks.
    pub dma_registered: Vec<(u64, u64)>,
    pub dma_unregistered: Vec<(u64, u64)>,
    /// `VFU_MIGR_STATE_*` values the transition callback saw.
    pub transitions: Vec<u32>,
    /// Data the device produces for MIG_DATA_READ, and a cursor in it.
    pub mig_out: Vec<u8>,
    pub mig_out_pos: usize,
    /// Data received through MIG_DATA_WRITE.
    pub mig_in: Vec<u8>,
}

/// The shared state of one test device.
#[derive(Clone, Default)]
pub struct Dev(pub Arc<Mutex<Shared>>);

impl Dev {
    pub fn lock(&self) -> MutexGuard<'_, Shared> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Which optional parts the test device has.
#[derive(Clone, Copy)]
pub struct Features {
    pub dma: bool,
    pub migration: bool,
    /// An eventfd (owned by the test) registered as ioeventfd of BAR0.
    pub ioeventfd: Option<RawFd>,
}

impl Default for Features {
    fn default() -> Self {
        Features {
            dma: true,
            migration: true,
            ioeventfd: None,
        }
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique socket path for this process.
pub fn sock_path(tag: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("vfu-client-{tag}-{}-{n}.sock", std::process::id()))
}

/// A server running in its own thread.
pub struct Server {
    pub path: PathBuf,
    handle: Option<JoinHandle<Result<usize, Errno>>>,
}

type Keep = Vec<Box<dyn Any>>;

impl Server {
    /// Creates, sets up (with `setup`), realizes and runs a context in a new
    /// thread; returns once its socket is listening.
    pub fn start<F>(tag: &str, setup: F) -> Server
    where
        F: FnOnce(&Context) -> Result<Keep, Errno> + Send + 'static,
    {
        Server::start_serving(tag, 1, setup)
    }

    /// Like [`Server::start`], serving `clients` clients one after the
    /// other (attach, run until the client goes, again); the thread's
    /// result is the first error other than the `ENOTCONN` of a client
    /// that left, or the last client's.
    pub fn start_serving<F>(tag: &str, clients: usize, setup: F) -> Server
    where
        F: FnOnce(&Context) -> Result<Keep, Errno> + Send + 'static,
    {
        let path = sock_path(tag);
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        let handle = std::thread::spawn(move || {
            let ctx = match Context::new(&p, 0, std::ptr::null_mut()) {
                Ok(c) => c,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Err(e);
                }
            };
            let keep = match setup(&ctx).and_then(|k| ctx.realize().map(|()| k)) {
                Ok(k) => k,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return Err(e);
                }
            };
            let _ = tx.send(Ok(()));
            let mut r = Err(Errno::ENOTCONN);
            for _ in 0..clients {
                r = ctx.attach().and_then(|()| ctx.run());
                if r != Err(Errno::ENOTCONN) {
                    break;
                }
            }
            // The context goes before what it borrowed fds from.
            drop(ctx);
            drop(keep);
            r
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("server thread did not start")
            .expect("server setup failed");
        Server {
            path,
            handle: Some(handle),
        }
    }

    /// Starts the standard test device.
    pub fn device(tag: &str, dev: &Dev, features: Features) -> Server {
        let dev = dev.clone();
        Server::start(tag, move |ctx| setup_device(ctx, dev, features))
    }

    /// Starts the standard test device, serving `clients` clients in turn.
    pub fn device_serving(tag: &str, dev: &Dev, features: Features, clients: usize) -> Server {
        let dev = dev.clone();
        Server::start_serving(tag, clients, move |ctx| setup_device(ctx, dev, features))
    }

    pub fn connect(&self) -> Client {
        Client::connect(&self.path).expect("connect")
    }

    pub fn connect_with(&self, opts: ClientOptions) -> Client {
        Client::connect_with(&self.path, opts).expect("connect")
    }

    /// Waits (at most 10 s) for the server thread and returns what its
    /// attach/run returned.
    pub fn join(mut self) -> Result<usize, Errno> {
        let h = self.handle.take().expect("joined twice");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !h.is_finished() {
            assert!(Instant::now() < deadline, "server thread did not stop");
            std::thread::sleep(Duration::from_millis(5));
        }
        h.join().expect("server thread panicked")
    }

    /// Drops the client and checks that the server saw it go.
    pub fn finish(self, client: Client) {
        drop(client);
        assert_eq!(self.join(), Err(Errno::ENOTCONN));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.handle.is_some() {
            // Unblock a server still waiting in attach; never join here (the
            // test is failing already).
            let _ = std::os::unix::net::UnixStream::connect(&self.path);
        }
    }
}

fn rd64(b: &[u8], off: u64) -> u64 {
    let o = off as usize;
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

fn wr64(b: &mut [u8], off: u64, v: u64) {
    let o = off as usize;
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Runs the DMA op the client just wrote.
fn do_dma(ctx: &Context, iova: u64, len: u64, op: u64, data: &mut [u8]) -> Result<(), Errno> {
    let dma = ctx.dma().ok_or(Errno::EINVAL)?.clone();
    let write = op & OP_WRITE != 0;
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
    ctx.dma_transfer(&sg[0], data, write, op & OP_DIRECT != 0)
}

fn bar0_access(
    ctx: &Context,
    dev: &Dev,
    buf: &mut [u8],
    off: u64,
    is_write: bool,
) -> Result<usize, Errno> {
    let end = off as usize + buf.len();
    let mut st = dev.lock();
    st.accesses.push((off, buf.len(), is_write));
    if end > BAR0_SIZE {
        return Err(Errno::EINVAL);
    }
    if !is_write {
        buf.copy_from_slice(&st.bar0[off as usize..end]);
        return Ok(buf.len());
    }
    st.bar0[off as usize..end].copy_from_slice(buf);
    if off == REG_IRQ && buf.len() == 8 {
        let v = rd64(&st.bar0, REG_IRQ);
        drop(st);
        let r = ctx.irq_trigger(v as u32).err().map_or(0, |e| e.0 as u64);
        wr64(&mut dev.lock().bar0, REG_IRQ_RESULT, r);
    } else if off == REG_DMA_OP && buf.len() == 8 {
        let iova = rd64(&st.bar0, REG_DMA_IOVA);
        let len = rd64(&st.bar0, REG_DMA_LEN).min(SCRATCH_LEN as u64);
        let op = rd64(&st.bar0, REG_DMA_OP);
        let s = SCRATCH as usize;
        let mut data = st.bar0[s..s + len as usize].to_vec();
        // Never hold the lock while the client is being asked for memory.
        drop(st);
        let r = do_dma(ctx, iova, len, op, &mut data);
        let mut st = dev.lock();
        if r.is_ok() && op & OP_READ != 0 {
            st.bar0[s..s + len as usize].copy_from_slice(&data);
        }
        wr64(
            &mut st.bar0,
            REG_DMA_RESULT,
            r.err().map_or(0, |e| e.0 as u64),
        );
    }
    Ok(buf.len())
}

struct Mig(Dev);

impl MigrationDevice for Mig {
    fn transition(&self, _ctx: &Context, state: u32) -> Result<(), Errno> {
        self.0.lock().transitions.push(state);
        Ok(())
    }
    fn read_data(&self, _ctx: &Context, buf: &mut [u8]) -> Result<usize, Errno> {
        let mut st = self.0.lock();
        let pos = st.mig_out_pos;
        let n = buf.len().min(st.mig_out.len() - pos);
        buf[..n].copy_from_slice(&st.mig_out[pos..pos + n]);
        st.mig_out_pos += n;
        Ok(n)
    }
    fn write_data(&self, _ctx: &Context, buf: &[u8]) -> Result<usize, Errno> {
        self.0.lock().mig_in.extend_from_slice(buf);
        Ok(buf.len())
    }
}

/// Sets up the standard test device on `ctx`.
pub fn setup_device(ctx: &Context, dev: Dev, f: Features) -> Result<Keep, Errno> {
    let mut keep: Keep = Vec::new();
    dev.lock().bar0 = vec![0; BAR0_SIZE];
    ctx.pci_init(pci::PCI_TYPE_CONVENTIONAL, pci::PCI_HEADER_TYPE_NORMAL, 0)?;
    ctx.pci()
        .ok_or(Errno::EINVAL)?
        .set_id(VENDOR, DEVICE, SUBSYS_VENDOR, SUBSYS);

    let d = dev.clone();
    ctx.setup_region(
        region::BAR0,
        RegionSetup {
            size: BAR0_SIZE as u64,
            cb: Some(Rc::new(
                move |ctx: &Context, buf: &mut [u8], off: u64, w: bool| {
                    bar0_access(ctx, &d, buf, off, w)
                },
            )),
            flags: region::FLAG_RW | region::FLAG_MEM,
            mmap_areas: None,
            fd: None,
            offset: 0,
        },
    )?;

    // BAR2: file-backed, two mappable areas with a hole between them.
    let mem = GuestMemory::new(BAR2_SIZE as usize)?;
    mem.write(0x2000, b"bar2 area 1")?;
    ctx.setup_region(
        2,
        RegionSetup {
            size: BAR2_SIZE,
            cb: Some(Rc::new(
                |_ctx: &Context, buf: &mut [u8], _off: u64, _w: bool| Ok(buf.len()),
            )),
            flags: region::FLAG_RW | region::FLAG_MEM,
            mmap_areas: Some(vec![(0, 0x1000), (0x2000, 0x1000)]),
            fd: Some(std::os::fd::AsRawFd::as_raw_fd(&mem.fd())),
            offset: 0,
        },
    )?;
    keep.push(Box::new(mem));

    if let Some(fd) = f.ioeventfd {
        ctx.create_ioeventfd(
            region::BAR0,
            IoEventFd {
                gpa_offset: IOEVENTFD_OFFSET,
                size: 4,
                fd,
                flags: 0,
                datamatch: IOEVENTFD_DATAMATCH,
                shadow_fd: -1,
                shadow_offset: 0,
            },
        )?;
    }

    ctx.setup_irq_count(irq::MSIX, MSIX_COUNT)?;
    let d = dev.clone();
    ctx.setup_irq_state_cb(
        irq::MSIX,
        Some(Rc::new(
            move |_ctx: &Context, start: u32, count: u32, masked: bool| {
                d.lock().mask_changes.push((start, count, masked))
            },
        )),
    )?;
    let d = dev.clone();
    ctx.setup_reset_cb(Some(Rc::new(move |_ctx: &Context, why: ResetType| {
        d.lock().resets.push(why);
        Ok(())
    })));

    if f.dma {
        let (d1, d2) = (dev.clone(), dev.clone());
        ctx.setup_dma(
            DMA_MAX_REGIONS,
            Some(Rc::new(move |_ctx: &Context, info: &DmaInfo| {
                d1.lock()
                    .dma_registered
                    .push((info.iova_start(), info.iova_len()))
            })),
            Some(Rc::new(move |_ctx: &Context, info: &DmaInfo| {
                d2.lock()
                    .dma_unregistered
                    .push((info.iova_start(), info.iova_len()))
            })),
        )?;
    }
    if f.migration {
        ctx.setup_migration(Rc::new(Mig(dev.clone())))?;
    }
    Ok(keep)
}

/// Writes a u64 register of BAR0.
pub fn write_reg(c: &mut Client, reg: u64, v: u64) {
    c.region_write(region::BAR0 as u32, reg, &v.to_le_bytes())
        .expect("register write");
}

/// Reads a u64 register of BAR0.
pub fn read_reg(c: &mut Client, reg: u64) -> u64 {
    let b = c
        .region_read(region::BAR0 as u32, reg, 8)
        .expect("register read");
    u64::from_le_bytes(b.try_into().unwrap())
}

/// Asks the device to run a DMA op; returns the errno it got (0 = success).
pub fn device_dma(c: &mut Client, iova: u64, len: u64, op: u64) -> u64 {
    write_reg(c, REG_DMA_IOVA, iova);
    write_reg(c, REG_DMA_LEN, len);
    write_reg(c, REG_DMA_OP, op);
    read_reg(c, REG_DMA_RESULT)
}
