//! The server's region access path allocates nothing per message once warm.
//!
//! A counting global allocator counts the allocations made on the server's
//! thread (marked with a thread-local flag) while a global switch is on. The
//! client (the library's own, which allocates freely on its own thread)
//! warms the server up, turns counting on, sends region reads and writes,
//! turns counting off after the last reply, and the test asserts that the
//! server thread allocated nothing in between.
//!
//! Everything runs in one test function: the allocator state is global.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use vfio_user::client::{Client, ClientOptions};
use vfio_user::device::{pci, region, RegionSetup};
use vfio_user::{Context, Errno};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static SERVER_ALLOCS: AtomicUsize = AtomicUsize::new(0);
static SERVER_BYTES: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    // Const-initialised and without a destructor, so reading it from inside
    // the allocator never allocates.
    static IS_SERVER: Cell<bool> = const { Cell::new(false) };
}

fn note(size: usize) {
    if COUNTING.load(Ordering::Relaxed) && IS_SERVER.with(Cell::get) {
        SERVER_ALLOCS.fetch_add(1, Ordering::Relaxed);
        SERVER_BYTES.fetch_add(size, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping only touches atomics and a const thread-local.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: forwarded with the caller's arguments.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's arguments.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BAR0: u32 = region::BAR0 as u32;
const CFG: u32 = region::CFG as u32;
const BAR0_SIZE: usize = 0x1000;
/// The device fails every access at this BAR0 offset.
const FAULTY: u64 = 0xf00;

/// Starts a device with a 4 KiB memory-like BAR0 on its own thread; returns
/// the socket path and the thread.
fn start_server(
    tag: &str,
) -> (
    std::path::PathBuf,
    std::thread::JoinHandle<Result<usize, Errno>>,
) {
    let path =
        std::env::temp_dir().join(format!("vfu-allocfree-{tag}-{}.sock", std::process::id()));
    let (tx, rx) = mpsc::channel();
    let p = path.clone();
    let h = std::thread::spawn(move || {
        IS_SERVER.with(|s| s.set(true));
        let ctx = Context::new(&p, 0, std::ptr::null_mut())?;
        ctx.pci_init(pci::PCI_TYPE_CONVENTIONAL, pci::PCI_HEADER_TYPE_NORMAL, 0)?;
        let mem = Rc::new(RefCell::new([0u8; BAR0_SIZE]));
        ctx.setup_region(
            region::BAR0,
            RegionSetup {
                size: BAR0_SIZE as u64,
                cb: Some(Rc::new(
                    move |_ctx: &Context, buf: &mut [u8], off: u64, w: bool| {
                        if off == FAULTY {
                            return Err(Errno(libc::EIO));
                        }
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
        ctx.realize()?;
        let _ = tx.send(());
        ctx.attach()?;
        ctx.run()
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("server did not start");
    (path, h)
}

/// One round of the traffic under test. Every reply is awaited (posted
/// writes are followed by a read), so when this returns the server has
/// handled all of it.
fn traffic(c: &mut Client, i: u64) {
    let off = (i % 64) * 8;
    c.region_write(BAR0, off, &(i as u32).to_le_bytes())
        .unwrap();
    let r = c.region_read(BAR0, off, 4).unwrap();
    assert_eq!(r, (i as u32).to_le_bytes());
    c.region_write(BAR0, 0x800 + off, &i.to_le_bytes()).unwrap();
    assert_eq!(
        c.region_read(BAR0, 0x800 + off, 8).unwrap(),
        i.to_le_bytes()
    );
    c.region_write_posted(BAR0, 0x400, &[i as u8; 4]).unwrap();
    assert_eq!(c.region_read(BAR0, 0x400, 1).unwrap(), [i as u8]);
    // A larger read and a config space read (PCI emulation path).
    assert_eq!(c.region_read(BAR0, 0, 256).unwrap().len(), 256);
    assert_eq!(c.region_read(CFG, 0, 4).unwrap().len(), 4);
}

/// Counts the server's allocations over `rounds` rounds of `f` after
/// `warm` rounds of warm-up.
fn count_allocs(c: &mut Client, warm: u64, rounds: u64, f: fn(&mut Client, u64)) -> (usize, usize) {
    for i in 0..warm {
        f(c, i);
    }
    SERVER_ALLOCS.store(0, Ordering::SeqCst);
    SERVER_BYTES.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    for i in 0..rounds {
        f(c, warm + i);
    }
    COUNTING.store(false, Ordering::SeqCst);
    (
        SERVER_ALLOCS.load(Ordering::SeqCst),
        SERVER_BYTES.load(Ordering::SeqCst),
    )
}

fn write_multi(c: &mut Client, i: u64) {
    let a = (i as u32).to_le_bytes();
    let b = i.to_le_bytes();
    c.region_write_multi(&[(BAR0, 0x100, &a[..]), (BAR0, 0x108, &b[..])])
        .unwrap();
    assert_eq!(c.region_read(BAR0, 0x108, 8).unwrap(), b);
}

fn failing_access(c: &mut Client, i: u64) {
    // Out of range, and refused by the device: answered with an error.
    assert!(c.region_read(BAR0, BAR0_SIZE as u64, 4).is_err());
    assert!(c.region_read(BAR0, FAULTY, 4).is_err());
    assert!(c.region_write(BAR0, FAULTY, &[1; 4]).is_err());
    assert_eq!(c.region_read(BAR0, 0x800, 4).unwrap().len(), 4);
    let _ = i;
}

#[test]
fn region_access_path_allocates_nothing_after_warm_up() {
    let (path, server) = start_server("main");
    let mut c = Client::connect_with(&path, ClientOptions::default()).expect("connect");

    // 1000 iterations x 7 messages of reads and writes.
    let (n, bytes) = count_allocs(&mut c, 100, 1000, traffic);
    assert_eq!(
        n, 0,
        "server allocated {n} times ({bytes} bytes) over 7000 region accesses"
    );

    // Write-multi interleaved with reads: the empty write-multi reply must
    // not cost the next read its reply buffer.
    let (n, bytes) = count_allocs(&mut c, 10, 500, write_multi);
    assert_eq!(
        n, 0,
        "server allocated {n} times ({bytes} bytes) over 500 write-multi + read"
    );

    // Refused accesses interleaved with good ones.
    let (n, bytes) = count_allocs(&mut c, 10, 500, failing_access);
    assert_eq!(
        n, 0,
        "server allocated {n} times ({bytes} bytes) over 500 refused + good reads"
    );

    drop(c);
    assert_eq!(
        server.join().expect("server panicked"),
        Err(Errno::ENOTCONN)
    );
}
