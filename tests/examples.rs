//! The Rust example devices of `examples/` (null, gpio, migdev), run
//! in-process on server threads and driven through the crate's client, and
//! migdev migrated live between a Rust and a C device in both directions.
//!
//! The examples are compiled into this test as modules, so the code tested
//! is exactly the code `cargo run --example` runs. The C half needs `cc`,
//! `pkg-config` and `make` (as `tests/samples_devices.rs`); without them
//! those tests print why and pass without checking anything.

#[allow(dead_code)]
#[path = "../examples/gpio.rs"]
mod gpio;
#[allow(dead_code)]
#[path = "../examples/migdev.rs"]
mod migdev;
#[allow(dead_code)]
#[path = "../examples/null.rs"]
mod null;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use vfio_user::client::{Client, GuestMemory};
use vfio_user::device::log_level;
use vfio_user::device::migration::*;
use vfio_user::Errno;

mod migdev_support;
use migdev_support::*;

static SEQ: AtomicUsize = AtomicUsize::new(0);

fn sock_path(tag: &str) -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("vfu-ex-{tag}-{}-{n}.sock", std::process::id()))
}

// ---- in-process devices --------------------------------------------------------------

type Logs = Arc<Mutex<Vec<String>>>;

/// An example device served by a thread of this process.
struct Server {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    logs: Logs,
    thread: Option<JoinHandle<Result<(), Errno>>>,
}

impl Server {
    /// Runs `body(path, log sink, stop flag, ready)` on a new thread; `body`
    /// creates the device, calls `ready()` once the socket listens, then
    /// serves.
    fn start<F>(tag: &str, body: F) -> Server
    where
        F: FnOnce(&Path, Box<dyn Fn(i32, &str)>, &AtomicBool, &dyn Fn()) -> Result<(), Errno>
            + Send
            + 'static,
    {
        let path = sock_path(tag);
        let stop = Arc::new(AtomicBool::new(false));
        let logs: Logs = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let (path, stop, logs) = (path.clone(), stop.clone(), logs.clone());
            std::thread::spawn(move || {
                let sink = Box::new(move |level: i32, msg: &str| {
                    logs.lock().unwrap().push(format!("<{level}> {msg}"));
                });
                let ready = move || {
                    let _ = tx.send(());
                };
                body(&path, sink, &stop, &ready)
            })
        };
        let mut server = Server {
            path,
            stop,
            logs,
            thread: Some(thread),
        };
        if rx.recv_timeout(Duration::from_secs(10)).is_err() {
            let r = server.thread.take().map(|t| t.join());
            panic!("{tag} did not start: {r:?}");
        }
        server
    }

    fn connect(&self) -> Client {
        Client::connect(&self.path).expect("connect")
    }

    fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }

    /// Waits for the server thread to end and checks that it ended well and
    /// removed its socket.
    fn expect_clean_exit(&mut self) {
        let t = self.thread.take().expect("already joined");
        wait_until("the device thread to end", || t.is_finished());
        let r = t.join().expect("device thread panicked");
        assert_eq!(r, Ok(()), "device failed:\n{}", self.log_text());
        assert!(!self.path.exists(), "socket left behind");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = fs::remove_file(&self.path);
    }
}

fn start_null() -> Server {
    Server::start("null", |path, _log, _stop, ready| {
        let ctx = null::create(path)?;
        ready();
        null::serve(&ctx)
    })
}

fn start_gpio(level: i32) -> Server {
    Server::start("gpio", move |path, log, _stop, ready| {
        let ctx = gpio::create(path, level, log)?;
        ready();
        gpio::serve(&ctx)
    })
}

fn start_migdev() -> Server {
    Server::start("migdev", |path, log, stop, ready| {
        let dev = migdev::MigDev::create(path, log_level::DEBUG, log)?;
        ready();
        dev.serve(stop)
    })
}

// ---- register helpers ------------------------------------------------------------------

// ---- null and gpio -----------------------------------------------------------------------

#[test]
fn null_reads_zeroes_and_drops_writes() {
    let mut d = start_null();
    let mut c = d.connect();
    assert_eq!(rd32(&mut c, CFG, 0), 0x0010_4e58);
    assert_eq!(rd32(&mut c, CFG, 8) >> 8, 0xff_0000, "class code");
    let bar0 = c.region_info(BAR0).unwrap();
    assert_eq!(bar0.size, 0x1000);
    assert_eq!(bar0.flags & 3, 3, "readable and writable");
    assert_eq!(c.region_info(BAR2).unwrap().size, 0);
    c.region_write(BAR0, 0x10, &[0xaa; 64]).unwrap();
    assert_eq!(c.region_read(BAR0, 0, 0x1000).unwrap(), vec![0; 0x1000]);
    let e = c.region_read(BAR0, 0xffc, 8).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    drop(c);
    d.expect_clean_exit();
}

#[test]
fn gpio_outputs_latch_and_inputs_toggle() {
    let mut d = start_gpio(log_level::INFO);
    let mut c = d.connect();
    assert_eq!(rd32(&mut c, CFG, 0), 0x0dc8_494f);
    assert_eq!(c.region_info(BAR2).unwrap().size, 0x100);
    assert_eq!(c.region_info(BAR0).unwrap().size, 0);
    // BAR2 is an I/O BAR: bit 0 of its config register.
    assert_eq!(rd32(&mut c, CFG, 0x18) & 1, 1);
    // One INTx line.
    assert_eq!(c.irq_info(0).unwrap().count, 1);

    c.region_write(BAR2, 0, &[0xa5]).unwrap();
    c.region_write(BAR2, 4, &[0x3c]).unwrap();
    assert_eq!(c.region_read(BAR2, 0, 1).unwrap(), [0xa5]);
    assert_eq!(c.region_read(BAR2, 4, 1).unwrap(), [0x3c]);
    // Inputs invert on every read, each bank on its own.
    assert_eq!(c.region_read(BAR2, 1, 1).unwrap(), [0x00]);
    assert_eq!(c.region_read(BAR2, 1, 1).unwrap(), [0xff]);
    assert_eq!(c.region_read(BAR2, 5, 1).unwrap(), [0x00]);
    assert_eq!(c.region_read(BAR2, 1, 1).unwrap(), [0x00]);
    // A wide access is handled byte by byte.
    assert_eq!(
        c.region_read(BAR2, 0, 8).unwrap(),
        [0xa5, 0xff, 0, 0, 0x3c, 0xff, 0, 0]
    );
    // Input registers ignore writes; unassigned ones read 0.
    c.region_write(BAR2, 1, &[0x12]).unwrap();
    c.region_write(BAR2, 0x80, &[0x12]).unwrap();
    assert_eq!(c.region_read(BAR2, 0x80, 1).unwrap(), [0]);
    // Writing the same value again logs nothing new.
    c.region_write(BAR2, 0, &[0xa5]).unwrap();
    drop(c);
    d.expect_clean_exit();
    let log = d.log_text();
    assert!(log.contains("<6> outputs 0-7: 0x00 -> 0xa5"), "log:\n{log}");
    assert!(
        log.contains("<6> outputs 8-15: 0x00 -> 0x3c"),
        "log:\n{log}"
    );
    assert_eq!(log.matches("outputs 0-7").count(), 1, "log:\n{log}");
    // Not verbose: no input reads logged.
    assert!(!log.contains("read as"), "log:\n{log}");
    assert!(log.contains("client disconnected"), "log:\n{log}");
}

#[test]
fn gpio_verbose_logs_inputs_and_ignored_writes() {
    let mut d = start_gpio(log_level::DEBUG);
    let mut c = d.connect();
    c.region_read(BAR2, 5, 1).unwrap();
    c.region_write(BAR2, 0x20, &[0x77]).unwrap();
    drop(c);
    d.expect_clean_exit();
    let log = d.log_text();
    assert!(log.contains("inputs 8-15 read as 0x00"), "log:\n{log}");
    assert!(
        log.contains("write of 0x77 to register 0x20 ignored"),
        "log:\n{log}"
    );
}

// ---- migdev --------------------------------------------------------------------------------

#[test]
fn migdev_record_format() {
    // zlib's crc32 of "123456789".
    assert_eq!(migdev::crc32_update(0, b"123456789"), 0xcbf4_3926);
    let mut r = migdev::Regs {
        counter: 77,
        ctrl: 1,
        dma_addr: 0x1234_5678_9000,
        dma_len: 0x4000,
        checksum: 0xdead_beef,
        ..Default::default()
    };
    r.scratch[3] = 0x5151;
    let rec = r.encode(migdev::REC_FLAG_FINAL);
    assert_eq!(rec.len(), REC_LEN);
    assert_eq!(&rec[0..4], b"MDST");
    assert_eq!(
        &rec[20..24],
        b"DGIM",
        "payload starts with MAGIC, little-endian"
    );
    assert_eq!(rec[20 + 24 + 12], 0x51, "SCRATCH[3] at payload offset 36");
    assert_eq!(migdev::Regs::decode(&rec), Ok((r, migdev::REC_FLAG_FINAL)));
    assert_eq!(migdev::decode_stream(&rec), Ok((r, 1)));
    let pre = migdev::Regs::default().encode(0);
    assert_eq!(
        migdev::decode_stream(&[&pre[..], &rec[..]].concat()),
        Ok((r, 2))
    );
    for (what, data) in [
        ("nothing", vec![]),
        ("pre-copy only", pre.to_vec()),
        ("truncated", rec[..REC_LEN - 1].to_vec()),
        ("final twice", [rec, rec].concat()),
        ("trailing byte", [&rec[..], &[0]].concat()),
    ] {
        assert!(migdev::decode_stream(&data).is_err(), "{what}");
    }
    let mut bad = rec;
    bad[20 + 4] ^= 1;
    assert!(migdev::Regs::decode(&bad).unwrap_err().contains("CRC"));
}

#[test]
fn migdev_registers() {
    let mut d = start_migdev();
    let mut c = d.connect();
    assert_eq!(rd32(&mut c, CFG, 0), 0x0dcf_494f);
    assert_eq!(rd32(&mut c, CFG, 0x2c), 0x0dcf_494f, "subsystem IDs");
    assert_eq!(rd32(&mut c, CFG, 8) >> 8, 0xff_0000, "class code");
    assert_eq!(c.region_info(BAR0).unwrap().size, 0x1000);
    assert_eq!(reg(&mut c, REG_MAGIC), migdev::MAGIC);
    assert_eq!(reg(&mut c, REG_VERSION), 1);
    assert_eq!(reg(&mut c, REG_COUNTER), 0);
    assert_eq!(reg(&mut c, REG_STATE), VFU_MIGR_STATE_RUNNING);
    // Read-only registers ignore writes.
    set_reg(&mut c, REG_MAGIC, 7);
    set_reg(&mut c, REG_COUNTER, 7);
    set_reg(&mut c, REG_STATE, 7);
    assert_eq!(reg(&mut c, REG_MAGIC), migdev::MAGIC);
    assert_eq!(reg(&mut c, REG_COUNTER), 0);
    assert_eq!(reg(&mut c, REG_STATE), 1);
    // Scratch registers, one at a time and in one wide write.
    for i in 0..16u64 {
        set_reg(&mut c, REG_SCRATCH + 4 * i, 0x1000 + i as u32);
    }
    assert_eq!(reg(&mut c, REG_SCRATCH + 60), 0x100f);
    let wide: Vec<u8> = (0..16u32).flat_map(|i| (i * 3).to_le_bytes()).collect();
    c.region_write(BAR0, REG_SCRATCH, &wide).unwrap();
    assert_eq!(c.region_read(BAR0, REG_SCRATCH, 64).unwrap(), wide);
    // CTRL keeps only bit 0.
    set_reg(&mut c, REG_CTRL, 0xfffe);
    assert_eq!(reg(&mut c, REG_CTRL), 0);
    // DMA_LEN: page multiples up to 16 MiB.
    set_reg(&mut c, REG_DMA_LEN, 0x10000);
    for bad in [0x800u32, 0x1001, 0x100_1000] {
        let e = c
            .region_write(BAR0, REG_DMA_LEN, &bad.to_le_bytes())
            .unwrap_err();
        assert_eq!(e.server_errno(), Some(Errno::EINVAL), "DMA_LEN {bad:#x}");
    }
    assert_eq!(reg(&mut c, REG_DMA_LEN), 0x10000);
    // 64-bit DMA address through one 8-byte access.
    c.region_write(
        BAR0,
        REG_DMA_ADDR_LO,
        &0x1234_5678_9abc_d000u64.to_le_bytes(),
    )
    .unwrap();
    assert_eq!(reg(&mut c, REG_DMA_ADDR_HI), 0x1234_5678);
    assert_eq!(reg(&mut c, REG_DMA_ADDR_LO), 0x9abc_d000);
    // Unaligned or partial accesses are refused; unassigned space reads 0.
    let e = c.region_read(BAR0, 2, 4).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    let e = c.region_read(BAR0, 0, 2).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    assert_eq!(c.region_read(BAR0, 0x100, 8).unwrap(), [0; 8]);
    // Nothing is mapped: enabling the writer makes no progress.
    set_reg(&mut c, REG_CTRL, 1);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(reg(&mut c, REG_COUNTER), 0);
    // A device reset clears the registers.
    c.reset().unwrap();
    assert_eq!(reg(&mut c, REG_CTRL), 0);
    assert_eq!(reg(&mut c, REG_DMA_LEN), 0);
    assert_eq!(reg(&mut c, REG_SCRATCH), 0);
    drop(c);
    d.expect_clean_exit();
    let log = d.log_text();
    assert!(log.contains("DMA_LEN 0x800 refused"), "log:\n{log}");
    assert!(log.contains("failed: "), "DMA failure logged:\n{log}");
    assert_eq!(
        log.matches("(retrying every tick)").count(),
        1,
        "once:\n{log}"
    );
}

/// The DMA writer against fd-backed (directly mapped) guest memory.
#[test]
fn migdev_writes_pages_and_keeps_the_checksum() {
    let mut d = start_migdev();
    let mut c = d.connect();
    const IOVA: u64 = 0x1_0000_0000;
    let mem = Arc::new(GuestMemory::new(0x20000).unwrap());
    // Pre-existing content of the buffer counts in the checksum.
    mem.write(0x4000, &[1, 0, 0, 0, 2, 0, 0, 0]).unwrap();
    c.dma_map_memory(IOVA, &mem, true, RW).unwrap();
    program(&mut c, IOVA + 0x4000, 0x8000);
    wait_until("20 ticks", || reg(&mut c, REG_COUNTER) >= 20);
    set_reg(&mut c, REG_CTRL, 0);
    let n = reg(&mut c, REG_COUNTER);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(reg(&mut c, REG_COUNTER), n, "stopped");
    let buf = mem.read_vec(0x4000, 0x8000).unwrap();
    assert_eq!(reg(&mut c, REG_CHECKSUM), sum_words(&buf));
    check_pages(&buf, n);
    // Nothing outside the buffer was touched.
    assert!(mem.read_vec(0, 0x4000).unwrap().iter().all(|&b| b == 0));
    assert!(mem
        .read_vec(0xc000, 0x14000)
        .unwrap()
        .iter()
        .all(|&b| b == 0));

    // Re-enabling re-reads the buffer: a change made by the guest meanwhile
    // shows in the checksum.
    mem.write(0x4000, &100u32.to_le_bytes()).unwrap();
    set_reg(&mut c, REG_CTRL, 1);
    wait_until("more ticks", || reg(&mut c, REG_COUNTER) >= n + 10);
    set_reg(&mut c, REG_CTRL, 0);
    let n2 = reg(&mut c, REG_COUNTER);
    let buf = mem.read_vec(0x4000, 0x8000).unwrap();
    assert_eq!(reg(&mut c, REG_CHECKSUM), sum_words(&buf));
    check_pages(&buf, n2);

    // Unmapping the memory stops the writer without losing the device.
    set_reg(&mut c, REG_CTRL, 1);
    c.dma_unmap(IOVA, 0x20000, 0).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    let n3 = reg(&mut c, REG_COUNTER);
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(reg(&mut c, REG_COUNTER), n3);
    drop(c);
    d.expect_clean_exit();
}

/// The DMA writer against memory mapped without an fd: `Context::dma_read`
/// and `dma_write` go through DMA messages the client answers.
#[test]
fn migdev_dma_through_messages() {
    let mut d = start_migdev();
    let mut c = d.connect();
    const IOVA: u64 = 0x20_0000;
    let mem = Arc::new(GuestMemory::new(0x10000).unwrap());
    c.dma_map_memory(IOVA, &mem, false, RW).unwrap();
    program(&mut c, IOVA, 0x10000);
    wait_until("12 ticks", || {
        let _ = c.serve_dma(Duration::from_millis(5));
        reg(&mut c, REG_COUNTER) >= 12
    });
    set_reg(&mut c, REG_CTRL, 0);
    // Answer a write the device may have started before CTRL was cleared.
    let _ = c.serve_dma(Duration::from_millis(20));
    let n = reg(&mut c, REG_COUNTER);
    let buf = mem.read_vec(0, 0x10000).unwrap();
    assert_eq!(reg(&mut c, REG_CHECKSUM), sum_words(&buf));
    let pages = 16;
    for k in n.saturating_sub(pages - 1).max(1)..=n {
        let p = (k % pages) as usize;
        assert!(
            buf[p * PAGE..(p + 1) * PAGE] == page_pattern(k)[..],
            "page {p} holds tick {k}"
        );
    }
    // 12 page writes and one read of the whole buffer, at least.
    assert!(c.dma_requests_served() >= 13);
    drop(c);
    d.expect_clean_exit();
}

/// Saves the state of a Rust migdev with some registers set; returns the
/// pre-copy and final records.
fn saved_state() -> (Vec<u8>, Vec<u8>) {
    let mut src = start_migdev();
    let mut c = src.connect();
    set_reg(&mut c, REG_SCRATCH, 0x5151);
    set_reg(&mut c, REG_DMA_LEN, 0x2000);
    c.set_mig_state(VFIO_USER_DEVICE_STATE_PRE_COPY).unwrap();
    let pre = c.mig_data_read_all(1024).unwrap();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP_COPY).unwrap();
    let fin = c.mig_data_read_all(1024).unwrap();
    drop(c);
    src.expect_clean_exit();
    assert_eq!(pre.len(), REC_LEN);
    assert_eq!(fin.len(), REC_LEN);
    (pre, fin)
}

/// Resumes a fresh Rust migdev from `data`; returns the error of the move
/// to STOP, if any, with the client (still connected).
fn resume(data: &[u8]) -> (Server, Client, Option<Errno>) {
    let d = start_migdev();
    let mut c = d.connect();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_RESUMING).unwrap();
    if !data.is_empty() {
        c.mig_data_write(data).unwrap();
    }
    let r = c
        .set_mig_state(VFIO_USER_DEVICE_STATE_STOP)
        .err()
        .map(|e| e.server_errno().expect("an error reply"));
    (d, c, r)
}

#[test]
fn migdev_rejects_bad_state() {
    let (pre, fin) = saved_state();
    let mut corrupt = fin.clone();
    corrupt[20 + 4] ^= 1; // COUNTER
    let mut bad_version = fin.clone();
    bad_version[4] = 2;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("nothing", vec![]),
        ("corrupted", corrupt),
        ("unknown version", bad_version),
        ("truncated", fin[..REC_LEN - 1].to_vec()),
        ("pre-copy record only", pre.clone()),
        ("final record twice", [fin.clone(), fin.clone()].concat()),
    ];
    for (what, data) in cases {
        let (mut d, mut c, r) = resume(&data);
        assert_eq!(r, Some(Errno::EINVAL), "{what}");
        assert_eq!(
            c.mig_state().unwrap(),
            VFIO_USER_DEVICE_STATE_RESUMING,
            "{what}"
        );
        assert_eq!(reg(&mut c, REG_STATE), VFU_MIGR_STATE_RESUME, "{what}");
        assert_eq!(reg(&mut c, REG_SCRATCH), 0, "{what}: nothing applied");
        drop(c);
        d.expect_clean_exit();
        assert!(d.log_text().contains("migration data: "), "{what}");
    }

    // Incomplete data can be completed and the move retried.
    let (mut d, mut c, r) = resume(&pre);
    assert_eq!(r, Some(Errno::EINVAL));
    c.mig_data_write(&fin).unwrap();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP).unwrap();
    assert_eq!(reg(&mut c, REG_SCRATCH), 0x5151);
    assert_eq!(reg(&mut c, REG_DMA_LEN), 0x2000);
    drop(c);
    d.expect_clean_exit();

    // Too much data is refused.
    let (mut d, mut c, _) = resume(&fin);
    c.set_mig_state(VFIO_USER_DEVICE_STATE_RESUMING).unwrap();
    let e = c.mig_data_write(&vec![0u8; 65 * 1024]).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::ENOSPC));
    drop(c);
    d.expect_clean_exit();
}

// ---- the safe API from other threads -------------------------------------------------

/// `DmaController::with_guest`, `read` and `write` used from other threads
/// while the context serves its client on its own thread; unmapping waits
/// for borrows to end and makes the memory unreachable.
#[test]
fn guest_memory_from_other_threads() {
    use vfio_user::device::dma::PROT_RW;
    use vfio_user::Context;

    let (dma_tx, dma_rx) = std::sync::mpsc::channel();
    let mut server = Server::start("guest", move |path, _log, stop, ready| {
        let ctx = Context::create(path, true)?;
        ctx.setup_dma(8, None, None)?;
        ctx.realize()?;
        dma_tx.send(ctx.dma().cloned()).unwrap();
        ready();
        while !ctx.try_attach()? {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            ctx.wait_ready(Some(Duration::from_millis(50)))?;
        }
        loop {
            ctx.wait_ready(Some(Duration::from_millis(20)))?;
            match ctx.run_ready(16) {
                Ok(_) => {}
                Err(Errno::ENOTCONN) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let dma = dma_rx.recv().unwrap().expect("DMA set up");
    let mut c = server.connect();
    const IOVA: u64 = 0x10_0000;
    let mem = Arc::new(GuestMemory::new(4 * PAGE).unwrap());
    c.dma_map_memory(IOVA, &mem, true, RW).unwrap();
    mem.write(0, b"guest").unwrap();

    let d = dma.clone();
    let r = std::thread::spawn(move || {
        d.with_guest(IOVA + PAGE as u64, 8, PROT_RW, |m| {
            m.write_at(0, b"from dev")?;
            let mut b = [0u8; 4];
            m.read_at(4, &mut b)?;
            Ok::<_, Errno>(b)
        })
    })
    .join()
    .unwrap();
    assert_eq!(r, Ok(Ok(*b" dev")));
    assert_eq!(mem.read_vec(PAGE as u64, 8).unwrap(), b"from dev");
    let mut b = [0u8; 5];
    dma.read(IOVA, &mut b).unwrap();
    assert_eq!(&b, b"guest");
    dma.write(IOVA + 2 * PAGE as u64 - 2, b"span").unwrap();
    assert_eq!(mem.read_vec(2 * PAGE as u64 - 2, 4).unwrap(), b"span");

    // A thread keeps borrowing the memory while the client unmaps it.
    let d = dma.clone();
    let writer = std::thread::spawn(move || {
        let mut writes = 0u32;
        loop {
            let r = d.with_guest(IOVA, 4 * PAGE, PROT_RW, |m| {
                m.write_at(3 * PAGE, &writes.to_le_bytes())
            });
            match r {
                Ok(Ok(())) => writes += 1,
                Ok(Err(e)) | Err(e) => return (writes, e),
            }
        }
    });
    wait_until("some writes", || {
        mem.read_vec(3 * PAGE as u64, 4).unwrap() != [0; 4]
    });
    c.dma_unmap(IOVA, 4 * PAGE as u64, 0).unwrap();
    let (writes, e) = writer.join().unwrap();
    assert!(writes > 0);
    assert_eq!(e, Errno::ENOENT);
    assert_eq!(dma.read(IOVA, &mut b), Err(Errno::ENOENT));
    drop(c);
    server.expect_clean_exit();
}

// ---- C devices -----------------------------------------------------------------------

/// Where the C samples are, built as `tests/samples_devices.rs` builds them
/// (an install tree of this run's library, then `build.sh`), or `None` with
/// the reason printed.
fn c_samples() -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build_c_samples) {
        Ok(p) => Some(p),
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

fn build_c_samples() -> Result<PathBuf, String> {
    migdev_support::build_c_samples("samples-examples")
}

/// A C migdev process, its stderr in a file.
struct CDevice {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
}

impl CDevice {
    fn spawn(bin: &Path) -> CDevice {
        let sock = sock_path("c-migdev");
        let log = sock.with_extension("log");
        let child = Command::new(bin.join("migdev"))
            .arg(&sock)
            .args(["--log", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn migdev");
        let d = CDevice { child, sock, log };
        wait_until("the C migdev to listen", || d.sock.exists());
        d
    }
}

impl Drop for CDevice {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_file(&self.sock);
        let _ = fs::remove_file(&self.log);
    }
}

/// A migdev written in Rust (in-process) or C (a child process).
enum Migdev {
    Rust(Server),
    C(CDevice),
}

impl Migdev {
    fn connect(&self) -> Client {
        match self {
            Migdev::Rust(s) => s.connect(),
            Migdev::C(d) => {
                let mut tries = 0;
                loop {
                    // Between bind() and listen() a connect is refused.
                    match Client::connect(&d.sock) {
                        Ok(c) => return c,
                        Err(e) if tries < 500 => {
                            tries += 1;
                            let _ = e;
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(e) => panic!("connect: {e}"),
                    }
                }
            }
        }
    }

    fn log_text(&self) -> String {
        match self {
            Migdev::Rust(s) => s.log_text(),
            Migdev::C(d) => fs::read_to_string(&d.log).unwrap_or_default(),
        }
    }

    fn expect_clean_exit(&mut self) {
        match self {
            Migdev::Rust(s) => s.expect_clean_exit(),
            Migdev::C(d) => {
                let mut status = None;
                wait_until("the C migdev to exit", || {
                    status = d.child.try_wait().expect("try_wait");
                    status.is_some()
                });
                let st = status.unwrap();
                assert_eq!(
                    st.code(),
                    Some(0),
                    "C migdev exit {st}:\n{}",
                    fs::read_to_string(&d.log).unwrap_or_default()
                );
                assert!(!d.sock.exists(), "socket left behind");
            }
        }
    }
}

/// Live migration of a running migdev `src` into `dst`, guest memory
/// included (pre-copied while the source runs, then its dirty pages), with
/// the checks of `tests/samples_devices.rs`.
fn live_migrate(mut src: Migdev, mut dst: Migdev) {
    let (cs, cd) = (src.connect(), dst.connect());
    migdev_support::live_migrate(
        cs,
        cd,
        || src.expect_clean_exit(),
        || dst.expect_clean_exit(),
    );
    let log = dst.log_text();
    assert!(log.contains("state restored from 2 record(s)"), "{log}");
    assert!(
        !log.contains("not to the migrated"),
        "destination saw a checksum mismatch:\n{log}"
    );
}

#[test]
fn migdev_live_migration_rust_to_rust() {
    live_migrate(Migdev::Rust(start_migdev()), Migdev::Rust(start_migdev()));
}

#[test]
fn migdev_live_migration_rust_to_c() {
    let Some(bin) = c_samples() else { return };
    live_migrate(Migdev::Rust(start_migdev()), Migdev::C(CDevice::spawn(bin)));
}

#[test]
fn migdev_live_migration_c_to_rust() {
    let Some(bin) = c_samples() else { return };
    live_migrate(Migdev::C(CDevice::spawn(bin)), Migdev::Rust(start_migdev()));
}

/// Both implementations produce the same bytes for the same registers, and
/// refuse the same damaged streams.
#[test]
fn migdev_rust_and_c_records_are_identical() {
    let Some(bin) = c_samples() else { return };
    let mut devs = [Migdev::Rust(start_migdev()), Migdev::C(CDevice::spawn(bin))];
    let mut streams = Vec::new();
    for d in &mut devs {
        let mut c = d.connect();
        for i in 0..16u64 {
            set_reg(&mut c, REG_SCRATCH + 4 * i, 0xab00 + i as u32);
        }
        set_reg(&mut c, REG_DMA_LEN, 0x2000);
        c.region_write(BAR0, REG_DMA_ADDR_LO, &0x1_2345_6000u64.to_le_bytes())
            .unwrap();
        c.set_mig_state(VFIO_USER_DEVICE_STATE_PRE_COPY).unwrap();
        // Leave part of the pre-copy record unread: it must come first.
        let mut s = c.mig_data_read(30).unwrap();
        c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP_COPY).unwrap();
        s.extend_from_slice(&c.mig_data_read_all(1000).unwrap());
        assert_eq!(s.len(), 2 * REC_LEN);
        streams.push(s);
        drop(c);
        d.expect_clean_exit();
    }
    assert_eq!(streams[0], streams[1], "Rust and C records differ");
}
