//! Helpers shared by the tests that drive migdev, the stateful sample device
//! (C in c-tests/samples, Rust in examples/): its register map, the client
//! side of its registers and DMA buffer, and building the C samples against
//! an install tree of this run's library.

#![allow(dead_code)] // each test crate uses its own subset

use std::fs::{self, File};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vfio_user::client::{Client, GuestMemory};
use vfio_user::device::dma_msg::{DMA_REGION_READ, DMA_REGION_WRITE};
use vfio_user::device::migration::*;
use vfio_user::device::region;

pub const CFG: u32 = region::CFG as u32;
pub const BAR0: u32 = region::BAR0 as u32;
pub const BAR2: u32 = region::BAR2 as u32;
pub const RW: u32 = DMA_REGION_READ | DMA_REGION_WRITE;
pub const PAGE: usize = 4096;

// migdev's BAR0 registers (c-tests/samples/README.md).
pub const REG_MAGIC: u64 = 0x00;
pub const REG_VERSION: u64 = 0x04;
pub const REG_COUNTER: u64 = 0x08;
pub const REG_CTRL: u64 = 0x0c;
pub const REG_SCRATCH: u64 = 0x10;
pub const REG_DMA_ADDR_LO: u64 = 0x50;
pub const REG_DMA_ADDR_HI: u64 = 0x54;
pub const REG_DMA_LEN: u64 = 0x58;
pub const REG_STATE: u64 = 0x5c;
pub const REG_CHECKSUM: u64 = 0x60;
pub const MIGDEV_MAGIC: u32 = 0x4d49_4744;
pub const PATTERN_MUL: u32 = 2_654_435_761;
/// Length of one migration record.
pub const REC_LEN: usize = 116;

pub fn rd32(c: &mut Client, idx: u32, off: u64) -> u32 {
    let b = c.region_read(idx, off, 4).expect("register read");
    u32::from_le_bytes(b.try_into().unwrap())
}

pub fn wr32(c: &mut Client, idx: u32, off: u64, v: u32) {
    c.region_write(idx, off, &v.to_le_bytes())
        .expect("register write");
}

pub fn reg(c: &mut Client, off: u64) -> u32 {
    rd32(c, BAR0, off)
}

pub fn set_reg(c: &mut Client, off: u64, v: u32) {
    wr32(c, BAR0, off, v)
}

pub fn sum_words(b: &[u8]) -> u32 {
    b.chunks_exact(4)
        .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
        .fold(0u32, u32::wrapping_add)
}

/// The page migdev writes at tick `counter`.
pub fn page_pattern(counter: u32) -> Vec<u8> {
    (0..(PAGE / 4) as u32)
        .flat_map(|i| {
            counter
                .wrapping_mul(PATTERN_MUL)
                .wrapping_add(i)
                .to_le_bytes()
        })
        .collect()
}

/// Whether the tests run the C samples under valgrind.
pub fn valgrind() -> bool {
    std::env::var_os("VFU_SAMPLES_VALGRIND").is_some_and(|v| v != "0")
}

/// How much longer everything takes under valgrind.
pub fn slow() -> u32 {
    if valgrind() {
        20
    } else {
        1
    }
}

/// Polls `f` every 5 ms until it returns true (10 s, longer under valgrind).
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10) * slow();
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Checks that each page of the buffer holds what migdev last wrote there,
/// given that it has counted to `counter` (and that every page was written
/// since the buffer was zero).
pub fn check_pages(buf: &[u8], counter: u32) {
    let n = (buf.len() / PAGE) as u32;
    assert!(counter >= n, "every page written");
    for p in 0..n {
        let k = counter - (counter - p) % n;
        let got = &buf[p as usize * PAGE..(p as usize + 1) * PAGE];
        assert!(got == &page_pattern(k)[..], "page {p} should hold tick {k}");
    }
}

/// Programs migdev's DMA buffer and enables the writer.
pub fn program(c: &mut Client, addr: u64, len: u32) {
    set_reg(c, REG_DMA_ADDR_LO, addr as u32);
    set_reg(c, REG_DMA_ADDR_HI, (addr >> 32) as u32);
    set_reg(c, REG_DMA_LEN, len);
    set_reg(c, REG_CTRL, 1);
}

pub fn is_set(bitmap: &[u8], page: usize) -> bool {
    bitmap
        .get(page / 8)
        .is_some_and(|b| b & (1 << (page % 8)) != 0)
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Installs this run's library into a scratch prefix and builds the C
/// samples there with `build.sh`; returns their directory. `work` names a
/// work directory under the cargo target dir, locked for the rest of this
/// process so that concurrent runs take turns. Extra C flags for the samples
/// (sanitizers, say) come from VFU_SAMPLES_CFLAGS: a CFLAGS in the
/// environment would reach the crate's own build script as well.
pub fn build_c_samples(work: &str) -> Result<PathBuf, String> {
    for tool in ["cc", "pkg-config", "make"] {
        if !have(tool) {
            return Err(format!("{tool} not found; the C samples are not tested"));
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The library of this test run lives next to the deps/ directory that
    // holds the test binary.
    let exe = std::env::current_exe().expect("current_exe");
    let profile = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary in <target>/<profile>/deps");
    let so = profile.join("libvfio_user.so");
    let a = profile.join("libvfio_user.a");
    if !so.exists() || !a.exists() {
        return Err(format!(
            "{} not built (run `cargo build` first; `make check` does)",
            so.display()
        ));
    }
    let work = Path::new(env!("CARGO_TARGET_TMPDIR")).join(work);
    fs::create_dir_all(&work).expect("create work dir");
    let lock = File::create(work.join("lock")).expect("lock file");
    // SAFETY: flock on an fd we own; the lock lasts as long as the fd.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        panic!("flock: {}", std::io::Error::last_os_error());
    }
    // Held until the process exits.
    std::mem::forget(OwnedFd::from(lock));
    let prefix = work.join("prefix");
    let bin = work.join("bin");
    let _ = fs::remove_dir_all(&prefix);
    let _ = fs::remove_dir_all(&bin);
    run(Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(src)
        .arg("install")
        .arg("NO_BUILD=1")
        .arg(format!("PREFIX={}", prefix.display()))
        .arg(format!("LIB_SO={}", so.display()))
        .arg(format!("LIB_A={}", a.display()))
        // No vfuctl: the samples do not need it.
        .arg(format!("VFUCTL={}", work.join("no-vfuctl").display())));
    run(Command::new("bash")
        .arg(src.join("c-tests/samples/build.sh"))
        .arg(&prefix)
        .arg(&bin)
        .env(
            "CFLAGS",
            std::env::var("VFU_SAMPLES_CFLAGS").unwrap_or_default(),
        ));
    Ok(bin)
}

/// Live-migrates migdev from the device behind `cs` into the one behind
/// `cd`, as a VMM would: 1 MiB of guest memory on each side, the source's
/// DMA writer running through pre-copy (all memory copied, then the pages
/// logged dirty), STOP_COPY, the records written to the destination in
/// pieces that split them, and checks of every register on both sides and
/// of the destination carrying on from the source's counter.
/// `source_gone` / `destination_gone` run after each client is dropped.
pub fn live_migrate(
    mut cs: Client,
    mut cd: Client,
    source_gone: impl FnOnce(),
    destination_gone: impl FnOnce(),
) {
    const IOVA: u64 = 0x8000_0000;
    const MEM: usize = 0x10_0000;
    const BUF_OFF: u64 = 0x1_0000;
    const BUF_LEN: u32 = 0x4_0000; // 64 pages
    let buf_range = BUF_OFF as usize..BUF_OFF as usize + BUF_LEN as usize;

    let mem1 = Arc::new(GuestMemory::new(MEM).unwrap());
    let mem2 = Arc::new(GuestMemory::new(MEM).unwrap());
    cs.dma_map_memory(IOVA, &mem1, true, RW).unwrap();
    // The destination's memory is mapped before it resumes (DMA_MAP is not
    // accepted while a device is stopped).
    cd.dma_map_memory(IOVA, &mem2, true, RW).unwrap();

    let scratch: Vec<u32> = (0..16).map(|i| 0xc0de_0000 | i).collect();
    for (i, v) in scratch.iter().enumerate() {
        set_reg(&mut cs, REG_SCRATCH + 4 * i as u64, *v);
    }
    program(&mut cs, IOVA + BUF_OFF, BUF_LEN);
    wait_until("100 ticks", || reg(&mut cs, REG_COUNTER) >= 100);

    // Pre-copy: log dirty pages, snapshot the device, copy all memory while
    // the device keeps running.
    cs.dma_logging_start(PAGE as u64, &[(IOVA, MEM as u64)])
        .unwrap();
    cs.set_mig_state(VFIO_USER_DEVICE_STATE_PRE_COPY).unwrap();
    assert_eq!(reg(&mut cs, REG_STATE), VFU_MIGR_STATE_PRE_COPY);
    let c0 = reg(&mut cs, REG_COUNTER);
    let mut stream = cs.mig_data_read_all(64).unwrap();
    assert_eq!(stream.len(), REC_LEN, "one pre-copy record");
    assert!(cs.mig_data_read(4096).unwrap().is_empty(), "then no more");
    mem2.write(0, &mem1.read_vec(0, MEM).unwrap()).unwrap();
    wait_until("ticks in pre-copy", || reg(&mut cs, REG_COUNTER) >= c0 + 20);

    // Stop-and-copy: the final record, then the pages dirtied meanwhile.
    cs.set_mig_state(VFIO_USER_DEVICE_STATE_STOP_COPY).unwrap();
    let fin = cs.mig_data_read_all(4096).unwrap();
    assert_eq!(fin.len(), REC_LEN, "one final record");
    stream.extend_from_slice(&fin);
    let bitmap = cs
        .dma_logging_report(IOVA, MEM as u64, PAGE as u64)
        .unwrap();
    let a = mem1.read_vec(0, MEM).unwrap();
    let b = mem2.read_vec(0, MEM).unwrap();
    let mut dirty = 0;
    for p in 0..MEM / PAGE {
        let differs = a[p * PAGE..(p + 1) * PAGE] != b[p * PAGE..(p + 1) * PAGE];
        assert!(
            !differs || is_set(&bitmap, p),
            "page {p} changed but is not dirty"
        );
        if is_set(&bitmap, p) {
            assert!(
                buf_range.contains(&(p * PAGE)),
                "page {p} outside the buffer is dirty"
            );
            mem2.write((p * PAGE) as u64, &a[p * PAGE..(p + 1) * PAGE])
                .unwrap();
            dirty += 1;
        }
    }
    assert!(dirty > 0, "the device dirtied pages during pre-copy");
    assert_eq!(mem2.read_vec(0, MEM).unwrap(), a, "guest memory migrated");
    cs.dma_logging_stop().unwrap();

    // The source's final registers (readable again once STOPped).
    cs.set_mig_state(VFIO_USER_DEVICE_STATE_STOP).unwrap();
    let counter = reg(&mut cs, REG_COUNTER);
    let checksum = reg(&mut cs, REG_CHECKSUM);
    assert!(counter >= c0 + 20);
    assert_eq!(checksum, sum_words(&a[buf_range.clone()]));
    assert_eq!(reg(&mut cs, REG_STATE), VFU_MIGR_STATE_STOP);
    drop(cs);
    source_gone();

    // Resume on the destination.
    cd.set_mig_state(VFIO_USER_DEVICE_STATE_RESUMING).unwrap();
    assert_eq!(reg(&mut cd, REG_STATE), VFU_MIGR_STATE_RESUME);
    for part in stream.chunks(50) {
        cd.mig_data_write(part).unwrap();
    }
    cd.set_mig_state(VFIO_USER_DEVICE_STATE_STOP).unwrap();
    assert_eq!(reg(&mut cd, REG_STATE), VFU_MIGR_STATE_STOP);
    assert_eq!(reg(&mut cd, REG_COUNTER), counter);
    assert_eq!(reg(&mut cd, REG_CHECKSUM), checksum);
    assert_eq!(reg(&mut cd, REG_CTRL), 1);
    assert_eq!(reg(&mut cd, REG_DMA_LEN), BUF_LEN);
    assert_eq!(reg(&mut cd, REG_DMA_ADDR_LO), (IOVA + BUF_OFF) as u32);
    assert_eq!(
        reg(&mut cd, REG_DMA_ADDR_HI),
        ((IOVA + BUF_OFF) >> 32) as u32
    );
    for (i, v) in scratch.iter().enumerate() {
        assert_eq!(reg(&mut cd, REG_SCRATCH + 4 * i as u64), *v);
    }
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(reg(&mut cd, REG_COUNTER), counter, "no ticks while stopped");

    // Running again: the destination carries on from the source's counter.
    cd.set_mig_state(VFIO_USER_DEVICE_STATE_RUNNING).unwrap();
    assert_eq!(reg(&mut cd, REG_STATE), VFU_MIGR_STATE_RUNNING);
    wait_until("ticks on the destination", || {
        reg(&mut cd, REG_COUNTER) >= counter + 30
    });
    set_reg(&mut cd, REG_CTRL, 0);
    let n = reg(&mut cd, REG_COUNTER);
    let buf = mem2.read_vec(BUF_OFF, BUF_LEN as usize).unwrap();
    assert_eq!(reg(&mut cd, REG_CHECKSUM), sum_words(&buf));
    check_pages(&buf, n);
    drop(cd);
    destination_gone();
}
