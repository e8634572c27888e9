//! The C sample devices of `c-tests/samples` (nulldev, gpio, migdev), built
//! with their `build.sh` against an install tree of this crate's library and
//! driven as separate processes through the Rust client.
//!
//! The install tree is made with `make install NO_BUILD=1` from the library
//! this test run was built with. Without `cc`, `pkg-config` or `make` the
//! tests print why and pass without checking anything.
//!
//! `VFU_SAMPLES_CFLAGS` adds C compiler flags for the samples (for instance
//! `-fsanitize=address,undefined`). With `VFU_SAMPLES_VALGRIND=1` every device runs under valgrind, and an
//! error or a definite leak in it makes the device exit non-zero (which the
//! tests check). With `VFU_SAMPLES_KEEP_LOGS=1` the devices' stderr (and
//! valgrind's report) stays in `target/tmp/sample-*.log`; it is kept anyway
//! when a test fails.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use vfio_user::client::{Client, GuestMemory};
use vfio_user::device::migration::*;
use vfio_user::Errno;

mod migdev_support;
use migdev_support::*;

// migdev's registers (c-tests/samples/README.md).

// ---- building -----------------------------------------------------------------

/// Where the built samples are, or why there are none.
fn samples() -> Option<&'static Path> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BUILT.get_or_init(build_samples) {
        Ok(p) => Some(p),
        Err(why) => {
            eprintln!("skipping: {why}");
            None
        }
    }
}

fn build_samples() -> Result<PathBuf, String> {
    build_c_samples("samples")
}

// ---- device processes ------------------------------------------------------------

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A sample device running as a child process, with its stderr in a file.
struct Device {
    child: Child,
    sock: PathBuf,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Device {
    fn spawn(bin: &Path, prog: &str, extra: &[&str]) -> Device {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{prog}-{}-{n}", std::process::id());
        let sock = std::env::temp_dir().join(format!("vfu-sample-{tag}.sock"));
        let log = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("sample-{tag}.log"));
        let _ = fs::remove_file(&sock);
        let mut cmd = if valgrind() {
            let mut c = Command::new("valgrind");
            c.args([
                "--error-exitcode=97",
                "--leak-check=full",
                "--show-leak-kinds=definite",
                "--errors-for-leak-kinds=definite",
            ]);
            c.arg(bin.join(prog));
            c
        } else {
            Command::new(bin.join(prog))
        };
        cmd.arg(&sock).args(extra);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
        let mut d = Device {
            child,
            sock,
            log,
            exited: None,
        };
        let deadline = Instant::now() + Duration::from_secs(10) * slow();
        while !d.sock.exists() {
            if let Ok(Some(st)) = d.child.try_wait() {
                d.exited = Some(st);
                panic!("{prog} exited early ({st}):\n{}", d.log_text());
            }
            assert!(Instant::now() < deadline, "{prog} never listened");
            std::thread::sleep(Duration::from_millis(5));
        }
        d
    }

    fn connect(&self) -> Client {
        let deadline = Instant::now() + Duration::from_secs(10) * slow();
        loop {
            match Client::connect(&self.sock) {
                Ok(c) => return c,
                Err(e) => {
                    // Between bind() and listen() a connect is refused.
                    assert!(
                        Instant::now() < deadline,
                        "connect: {e}\n{}",
                        self.log_text()
                    );
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to end and returns its status.
    fn wait(&mut self) -> ExitStatus {
        if let Some(st) = self.exited {
            return st;
        }
        let deadline = Instant::now() + Duration::from_secs(10) * slow();
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(st);
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "device did not exit:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for a clean exit (status 0) and checks that the socket is gone.
    fn expect_clean_exit(&mut self) {
        let st = self.wait();
        assert_eq!(st.code(), Some(0), "device exit {st}:\n{}", self.log_text());
        assert!(!self.sock.exists(), "socket left behind");
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as libc::pid_t, sig) },
            0
        );
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_file(&self.sock);
        if !std::thread::panicking() && std::env::var_os("VFU_SAMPLES_KEEP_LOGS").is_none() {
            let _ = fs::remove_file(&self.log);
        }
    }
}

// ---- helpers ---------------------------------------------------------------------

// ---- nulldev -----------------------------------------------------------------------

#[test]
fn nulldev_reads_zeroes_and_drops_writes() {
    let Some(bin) = samples() else { return };
    let mut d = Device::spawn(bin, "nulldev", &[]);
    let mut c = d.connect();
    assert_eq!(rd32(&mut c, CFG, 0), 0x0010_4e58);
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

// ---- gpio --------------------------------------------------------------------------

#[test]
fn gpio_outputs_latch_and_inputs_toggle() {
    let Some(bin) = samples() else { return };
    let mut d = Device::spawn(bin, "gpio", &[]);
    let mut c = d.connect();
    assert_eq!(rd32(&mut c, CFG, 0), 0x0dc8_494f);
    assert_eq!(c.region_info(BAR2).unwrap().size, 0x100);
    assert_eq!(c.region_info(BAR0).unwrap().size, 0);
    // BAR2 is an I/O BAR: bit 0 of its config register.
    assert_eq!(rd32(&mut c, CFG, 0x18) & 1, 1);

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
    drop(c);
    d.expect_clean_exit();
    let log = d.log_text();
    assert!(log.contains("outputs 0-7: 0x00 -> 0xa5"), "log:\n{log}");
    assert!(log.contains("outputs 8-15: 0x00 -> 0x3c"), "log:\n{log}");
}

// ---- migdev ------------------------------------------------------------------------

#[test]
fn migdev_registers() {
    let Some(bin) = samples() else { return };
    let mut d = Device::spawn(bin, "migdev", &["--log", "debug"]);
    let mut c = d.connect();
    assert_eq!(rd32(&mut c, CFG, 0), 0x0dcf_494f);
    assert_eq!(rd32(&mut c, CFG, 8) >> 8, 0xff_0000, "class code");
    assert_eq!(c.region_info(BAR0).unwrap().size, 0x1000);
    assert_eq!(reg(&mut c, REG_MAGIC), MIGDEV_MAGIC);
    assert_eq!(reg(&mut c, REG_VERSION), 1);
    assert_eq!(reg(&mut c, REG_COUNTER), 0);
    assert_eq!(reg(&mut c, REG_STATE), VFU_MIGR_STATE_RUNNING);
    // Read-only registers ignore writes.
    set_reg(&mut c, REG_MAGIC, 7);
    set_reg(&mut c, REG_COUNTER, 7);
    set_reg(&mut c, REG_STATE, 7);
    assert_eq!(reg(&mut c, REG_MAGIC), MIGDEV_MAGIC);
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
    set_reg(&mut c, REG_DMA_LEN, 0x100_0000);
    // 64-bit DMA address through both halves and one 8-byte access.
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
    assert!(d.log_text().contains("refused"));
}

/// The DMA writer against fd-backed (directly mapped) guest memory.
#[test]
fn migdev_writes_pages_and_keeps_the_checksum() {
    let Some(bin) = samples() else { return };
    let mut d = Device::spawn(bin, "migdev", &[]);
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
    let expect = sum_words(&mem.read_vec(0x4000, 0x8000).unwrap());
    let before = reg(&mut c, REG_CHECKSUM);
    assert_ne!(before, expect);
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

/// The DMA writer against memory mapped without an fd: the device falls back
/// to vfu_sgl_read/write, which the client serves with DMA messages.
#[test]
fn migdev_dma_through_messages() {
    let Some(bin) = samples() else { return };
    let mut d = Device::spawn(bin, "migdev", &[]);
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
    assert!(c.dma_requests_served() >= 12 + 16);
    drop(c);
    d.expect_clean_exit();
}

/// Live migration of a running migdev into a second one, guest memory
/// included (pre-copied while the source runs, then its dirty pages).
#[test]
fn migdev_live_migration() {
    let Some(bin) = samples() else { return };
    let mut src = Device::spawn(bin, "migdev", &["--log", "debug"]);
    let mut dst = Device::spawn(bin, "migdev", &["--log", "debug"]);
    let (cs, cd) = (src.connect(), dst.connect());
    live_migrate(
        cs,
        cd,
        || src.expect_clean_exit(),
        || dst.expect_clean_exit(),
    );
    assert!(
        !dst.log_text().contains("not to the migrated"),
        "destination saw a checksum mismatch:\n{}",
        dst.log_text()
    );
}

/// Through the C ABI: a client leaving migdev (`--persist`) in any migration
/// state. The library walks the device back to RUNNING, the transition
/// callback logging each arc, and the next client finds it running with
/// working registers.
#[test]
fn migdev_lost_connection_returns_to_running() {
    let Some(bin) = samples() else { return };
    let mut d = Device::spawn(bin, "migdev", &["--persist", "--log", "info"]);
    // (state to leave the device in, the arcs logged once the client left)
    let cases: [(u32, &[&str]); 4] = [
        (VFIO_USER_DEVICE_STATE_STOP, &["STOP -> RUNNING"]),
        (
            VFIO_USER_DEVICE_STATE_STOP_COPY,
            &["STOP_AND_COPY -> STOP", "STOP -> RUNNING"],
        ),
        (VFIO_USER_DEVICE_STATE_PRE_COPY, &["PRE_COPY -> RUNNING"]),
        // Leaving RESUME with half a record fails in the device; its reset
        // callback (LOST_CONN) then starts it afresh.
        (VFIO_USER_DEVICE_STATE_RESUMING, &["RESUME -> STOP"]),
    ];
    for (i, (state, arcs)) in cases.iter().enumerate() {
        let mut c = d.connect();
        assert_eq!(reg(&mut c, REG_STATE), VFU_MIGR_STATE_RUNNING);
        c.set_mig_state(*state).unwrap();
        if *state == VFIO_USER_DEVICE_STATE_RESUMING {
            c.mig_data_write(&[0x42; 10]).unwrap();
        }
        let logged = d.log_text().len();
        drop(c);

        let mut c = d.connect();
        assert_eq!(
            reg(&mut c, REG_STATE),
            VFU_MIGR_STATE_RUNNING,
            "after leaving in state {state}:\n{}",
            d.log_text()
        );
        assert_eq!(c.mig_state().unwrap(), VFIO_USER_DEVICE_STATE_RUNNING);
        set_reg(&mut c, REG_SCRATCH, 0x7700 + i as u32);
        assert_eq!(reg(&mut c, REG_SCRATCH), 0x7700 + i as u32);
        let log = d.log_text();
        let after = &log[logged..];
        let mut pos = 0;
        for arc in arcs.iter() {
            let line = format!("migration state {arc}");
            let at = after[pos..]
                .find(&line)
                .unwrap_or_else(|| panic!("state {state}: no '{line}' in order in:\n{after}"));
            pos += at + line.len();
        }
        drop(c);
    }
    d.signal(libc::SIGTERM);
    d.expect_clean_exit();
}

/// Saves the state of a device with some registers set; returns the
/// pre-copy and final records.
fn saved_state(bin: &Path) -> (Vec<u8>, Vec<u8>) {
    let mut src = Device::spawn(bin, "migdev", &[]);
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

/// Resumes a fresh migdev from `data`; returns the error of the move to
/// STOP, if any, with the client (still connected).
fn resume(bin: &Path, data: &[u8]) -> (Device, Client, Option<Errno>) {
    let d = Device::spawn(bin, "migdev", &[]);
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
    let Some(bin) = samples() else { return };
    let (pre, fin) = saved_state(bin);

    let mut corrupt = fin.clone();
    corrupt[20 + 4] ^= 1; // COUNTER
    let mut bad_magic = fin.clone();
    bad_magic[0] ^= 0x80;
    let mut bad_version = fin.clone();
    bad_version[4] = 2;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("nothing", vec![]),
        ("corrupted", corrupt),
        ("bad record magic", bad_magic),
        ("unknown version", bad_version),
        ("truncated", fin[..REC_LEN - 1].to_vec()),
        ("pre-copy record only", pre.clone()),
        ("final record twice", [fin.clone(), fin.clone()].concat()),
        ("trailing garbage", [fin.clone(), vec![0]].concat()),
    ];
    for (what, data) in cases {
        let (mut d, mut c, r) = resume(bin, &data);
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
    }

    // Incomplete data can be completed and the move retried.
    let (mut d, mut c, r) = resume(bin, &pre);
    assert_eq!(r, Some(Errno::EINVAL));
    c.mig_data_write(&fin[..10]).unwrap();
    let e = c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    c.mig_data_write(&fin[10..]).unwrap();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP).unwrap();
    assert_eq!(reg(&mut c, REG_SCRATCH), 0x5151);
    assert_eq!(reg(&mut c, REG_DMA_LEN), 0x2000);
    drop(c);
    d.expect_clean_exit();

    // The final record alone is a complete state.
    let (mut d, mut c, r) = resume(bin, &fin);
    assert_eq!(r, None);
    assert_eq!(reg(&mut c, REG_SCRATCH), 0x5151);
    drop(c);
    d.expect_clean_exit();
}

/// Pre-copy data left unread when the source stops comes before the final
/// record, so the stream stays made of whole records.
#[test]
fn migdev_precopy_rest_precedes_final_record() {
    let Some(bin) = samples() else { return };
    let mut src = Device::spawn(bin, "migdev", &[]);
    let mut c = src.connect();
    set_reg(&mut c, REG_SCRATCH + 8, 0x77);
    c.set_mig_state(VFIO_USER_DEVICE_STATE_PRE_COPY).unwrap();
    let mut stream = c.mig_data_read(30).unwrap();
    assert_eq!(stream.len(), 30);
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP_COPY).unwrap();
    stream.extend_from_slice(&c.mig_data_read_all(1000).unwrap());
    assert_eq!(stream.len(), 2 * REC_LEN);
    // Leaving STOP_COPY drops what was not read.
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP).unwrap();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_RUNNING).unwrap();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP_COPY).unwrap();
    assert_eq!(c.mig_data_read_all(1000).unwrap().len(), REC_LEN);
    drop(c);
    src.expect_clean_exit();

    let (mut d, mut c, r) = resume(bin, &stream);
    assert_eq!(r, None);
    assert_eq!(reg(&mut c, REG_SCRATCH + 8), 0x77);
    drop(c);
    d.expect_clean_exit();
}

/// `--bulk-kib`: a bulk record of opaque state leads the pre-copy data; a
/// destination started with the option takes it (checked as it arrives,
/// a corrupted one refused at once), one without it has no room for it.
#[test]
fn migdev_bulk_state() {
    let Some(bin) = samples() else { return };
    let mut src = Device::spawn(bin, "migdev", &["--bulk-kib", "256"]);
    let mut c = src.connect();
    set_reg(&mut c, REG_SCRATCH, 0x6262);
    c.set_mig_state(VFIO_USER_DEVICE_STATE_PRE_COPY).unwrap();
    let pre = c.mig_data_read_all(100_000).unwrap();
    assert_eq!(pre.len(), 20 + 256 * 1024 + REC_LEN);
    assert_eq!(&pre[8..12], &2u32.to_le_bytes()); // REC_FLAG_BULK
    assert_eq!(pre[20 + 5], (5u32 * 131 + 7) as u8);
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP_COPY).unwrap();
    let fin = c.mig_data_read_all(100_000).unwrap();
    assert_eq!(fin.len(), REC_LEN);
    drop(c);
    src.expect_clean_exit();
    let mut stream = pre.clone();
    stream.extend_from_slice(&fin);

    // Into a destination with room for it: restored.
    let mut d = Device::spawn(bin, "migdev", &["--bulk-kib", "256"]);
    let mut c = d.connect();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_RESUMING).unwrap();
    c.mig_data_write(&stream).unwrap();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_STOP).unwrap();
    assert_eq!(reg(&mut c, REG_SCRATCH), 0x6262);
    drop(c);
    d.expect_clean_exit();
    assert!(
        d.log_text().contains("262144 bytes of bulk state"),
        "{}",
        d.log_text()
    );

    // A corrupted bulk record is refused as soon as it is complete.
    let mut d = Device::spawn(bin, "migdev", &["--bulk-kib", "256"]);
    let mut c = d.connect();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_RESUMING).unwrap();
    let mut bad = pre.clone();
    bad[20 + 1000] ^= 1;
    let e = c.mig_data_write(&bad).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    drop(c);
    d.expect_clean_exit();

    // A destination without the option has no room for it.
    let mut d = Device::spawn(bin, "migdev", &[]);
    let mut c = d.connect();
    c.set_mig_state(VFIO_USER_DEVICE_STATE_RESUMING).unwrap();
    let e = c.mig_data_write(&stream).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::ENOSPC));
    drop(c);
    d.expect_clean_exit();
}

#[test]
fn migdev_exits_cleanly_on_sigterm() {
    let Some(bin) = samples() else { return };
    // While waiting for a client.
    let mut d = Device::spawn(bin, "migdev", &[]);
    d.signal(libc::SIGTERM);
    d.expect_clean_exit();

    // While serving one, with DMA going on.
    let mut d = Device::spawn(bin, "migdev", &[]);
    let mut c = d.connect();
    let mem = Arc::new(GuestMemory::new(0x4000).unwrap());
    c.dma_map_memory(0x10000, &mem, true, RW).unwrap();
    program(&mut c, 0x10000, 0x4000);
    wait_until("ticks", || reg(&mut c, REG_COUNTER) >= 5);
    d.signal(libc::SIGTERM);
    d.expect_clean_exit();
    drop(c);
}

#[test]
fn migdev_usage_errors() {
    let Some(bin) = samples() else { return };
    for args in [
        &[][..],
        &["--log"][..],
        &["/tmp/x", "--log", "loud"][..],
        &["a", "b"][..],
        &["a", "--bulk-kib", "x"][..],
        &["a", "--bulk-kib", "262145"][..],
        &["a", "--bulk-kib"][..],
    ] {
        let st = Command::new(bin.join("migdev"))
            .args(args)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert_eq!(st.code(), Some(1), "{args:?}");
    }
}
