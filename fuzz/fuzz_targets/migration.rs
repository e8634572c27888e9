//! Fuzz target `migration`: the migration state machine and DMA dirty page
//! logging, driven by arbitrary sequences of operations.
//!
//! Invariants checked after every operation:
//! - the device state is always one a client may ask for;
//! - every transition callback is one direct arc of the state machine, and a
//!   successful request ends in the requested state (a failed one in the
//!   last state reached);
//! - `next_step` always proposes a direct arc (or no move), and following it
//!   reaches the target in at most three steps;
//! - commands are gated exactly by state;
//! - a dirty report never panics, clears what it reported, and shows pages
//!   that were just dirtied.

#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::cell::{Cell, RefCell};

use common::Input;
use libfuzzer_sys::fuzz_target;
use vfio_user::device::dma::{bitmap_size, DmaController, DmaSg};
use vfio_user::device::dma_msg::{self, NoDmaCallbacks};
use vfio_user::device::migration::*;
use vfio_user::{Errno, Result};

const STOP: u32 = VFIO_USER_DEVICE_STATE_STOP;
const RUNNING: u32 = VFIO_USER_DEVICE_STATE_RUNNING;
const STOP_COPY: u32 = VFIO_USER_DEVICE_STATE_STOP_COPY;
const RESUMING: u32 = VFIO_USER_DEVICE_STATE_RESUMING;
const PRE_COPY: u32 = VFIO_USER_DEVICE_STATE_PRE_COPY;

/// The arcs of the state machine, written down independently.
fn is_arc(from: u32, to: u32, pre_copy: bool) -> bool {
    let arc = matches!(
        (from, to),
        (STOP, RUNNING)
            | (STOP, STOP_COPY)
            | (STOP, RESUMING)
            | (RUNNING, STOP)
            | (RUNNING, PRE_COPY)
            | (STOP_COPY, STOP)
            | (RESUMING, STOP)
            | (PRE_COPY, RUNNING)
            | (PRE_COPY, STOP_COPY)
    );
    arc && (pre_copy || (from != PRE_COPY && to != PRE_COPY))
}

fn usable(s: u32, pre_copy: bool) -> bool {
    matches!(s, STOP | RUNNING | STOP_COPY | RESUMING) || (pre_copy && s == PRE_COPY)
}

fn from_vfu(s: u32) -> u32 {
    match s {
        VFU_MIGR_STATE_STOP => STOP,
        VFU_MIGR_STATE_RUNNING => RUNNING,
        VFU_MIGR_STATE_STOP_AND_COPY => STOP_COPY,
        VFU_MIGR_STATE_PRE_COPY => PRE_COPY,
        VFU_MIGR_STATE_RESUME => RESUMING,
        _ => panic!("transition callback got vfu state {s}"),
    }
}

/// A device that records its transitions and fails when told to.
#[derive(Default)]
struct Dev {
    seen: RefCell<Vec<u32>>,
    /// Fail the n-th transition callback from now (bit n).
    fail: Cell<u8>,
    data: Cell<usize>,
}

impl MigrationCallbacks for Dev {
    fn transition(&self, state: u32) -> Result<()> {
        let f = self.fail.get();
        self.fail.set(f >> 1);
        if f & 1 != 0 {
            return Err(Errno::EBUSY);
        }
        self.seen.borrow_mut().push(from_vfu(state));
        Ok(())
    }
    fn read_data(&self, buf: &mut [u8]) -> Result<usize> {
        let n = buf.len().min(self.data.get());
        self.data.set(self.data.get() - n);
        buf[..n].fill(0x5a);
        Ok(n)
    }
    fn write_data(&self, buf: &[u8]) -> Result<usize> {
        Ok(buf.len())
    }
}

struct Log<'a>(&'a DmaController);

impl DirtyLogging for Log<'_> {
    fn start(&self, page_size: u64, ranges: &[(u64, u64)]) -> Result<()> {
        self.0.logging_start(page_size, ranges)
    }
    fn stop(&self) -> Result<()> {
        self.0.logging_stop()
    }
    fn report(&self, iova: u64, len: u64, page_size: u64, bitmap: &mut [u8]) -> Result<()> {
        self.0.logging_report(iova, len, page_size, bitmap)
    }
}

/// Regions of the controller: (iova, len, fd-backed).
const REGIONS: [(u64, u64, bool); 3] = [
    (0x0, 0x20000, true),
    (0x20000, 0x8000, false),
    (0x100000, 0x40000, true),
];

fn feature(flags: u32, argsz: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + data.len());
    v.extend_from_slice(&argsz.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(data);
    v
}

fn check_set_state(mig: &Migration, dev: &Dev, target: u32, r: Result<()>, before: u32) {
    let pre_copy = mig.pre_copy();
    let seen = std::mem::take(&mut *dev.seen.borrow_mut());
    let mut cur = before;
    for &s in &seen {
        assert!(is_arc(cur, s, pre_copy), "illegal arc {cur} -> {s}");
        cur = s;
    }
    assert_eq!(mig.state(), cur, "state is not the last state reached");
    assert!(seen.len() <= 3);
    match r {
        Ok(()) => assert_eq!(mig.state(), target),
        Err(e) if e == Errno::EINVAL => {
            // Refused up front: nothing happened.
            assert!(seen.is_empty());
            assert!(
                !usable(target, pre_copy) || (before == STOP_COPY && target == PRE_COPY),
                "{before} -> {target} refused"
            );
        }
        Err(e) => assert_eq!(e, Errno::EBUSY),
    }
    assert!(usable(mig.state(), pre_copy));
}

fn check_next_step(from: u32, to: u32, pre_copy: bool) {
    let r = next_step(from, to, pre_copy);
    if !usable(from, pre_copy) || !usable(to, pre_copy) || (from == STOP_COPY && to == PRE_COPY) {
        assert_eq!(r, None, "{from} -> {to}");
        return;
    }
    let mut cur = from;
    for _ in 0..3 {
        if cur == to {
            break;
        }
        let n = next_step(cur, to, pre_copy).expect("path broke off");
        assert!(is_arc(cur, n, pre_copy), "next_step {cur} -> {n} is no arc");
        // Interior states of a path never save.
        assert!(n == to || (n != PRE_COPY && n != STOP_COPY));
        cur = n;
    }
    assert_eq!(cur, to, "{from} -> {to} takes more than 3 steps");
}

fn check_gating(mig: &Migration) {
    let stopped = matches!(mig.state(), STOP | STOP_COPY);
    for cmd in 1u16..=18 {
        let allowed = command_allowed(Some(mig), cmd).is_ok();
        let always = matches!(cmd, 9 | 10 | 16 | 17);
        assert_eq!(allowed, !stopped || always, "cmd {cmd} in {}", mig.state());
    }
    assert_eq!(
        device_is_stopped_and_copying(Some(mig)),
        mig.state() == STOP_COPY
    );
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    let pre_copy = input.bool();
    let mig = Migration::with_pre_copy(VFU_MIGR_CALLBACKS_VERS, pre_copy).unwrap();
    let dev = Dev::default();
    let dma = DmaController::new(8);
    for &(iova, len, fd) in &REGIONS {
        let fd = fd.then(|| common::memfd(len));
        dma.add_region(iova, len, fd, 0, libc::PROT_READ | libc::PROT_WRITE, false)
            .expect("harness map");
    }
    let log = Log(&dma);
    let mut ops = 0;
    while !input.is_empty() && ops < 256 {
        ops += 1;
        match input.u8() % 12 {
            0 => {
                let target = input.below(10);
                dev.fail.set(input.u8() & 0x0f);
                let before = mig.state();
                let r = mig.set_state(&dev, target);
                check_set_state(&mig, &dev, target, r, before);
            }
            1 => {
                let target = input.below(10);
                dev.fail.set(input.u8() & 0x0f);
                let before = mig.state();
                let payload = feature(
                    VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
                    16,
                    &[target.to_le_bytes(), [0; 4]].concat(),
                );
                let r = handle_device_feature(Some(&mig), &dev, &log, &payload).map(|reply| {
                    assert_eq!(reply, payload);
                });
                check_set_state(&mig, &dev, target, r, before);
            }
            2 => {
                let (from, to) = (input.below(10), input.below(10));
                check_next_step(from, to, pre_copy);
            }
            3 => {
                // Logging start, through the feature or directly.
                let page = match input.u8() {
                    0..=200 => 4096,
                    n => 1u64 << (n % 20),
                };
                let r = if input.bool() {
                    let mut d = Vec::new();
                    d.extend_from_slice(&page.to_le_bytes());
                    d.extend_from_slice(&1u32.to_le_bytes());
                    d.extend_from_slice(&[0; 4]);
                    d.extend_from_slice(&0u64.to_le_bytes());
                    d.extend_from_slice(&0x200000u64.to_le_bytes());
                    let p = feature(
                        VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
                        8 + d.len() as u32,
                        &d,
                    );
                    handle_device_feature(Some(&mig), &dev, &log, &p).map(|_| ())
                } else {
                    dma.logging_start(page, &[])
                };
                if r.is_ok() {
                    assert_eq!(dma.logging_page_size(), Some(page));
                }
            }
            4 => {
                if input.bool() {
                    let p = feature(
                        VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
                        8,
                        &[],
                    );
                    handle_device_feature(Some(&mig), &dev, &log, &p).expect("logging stop");
                } else {
                    dma.logging_stop().expect("logging stop");
                }
                assert!(!dma.logging_active());
            }
            5 => {
                // Arbitrary report request.
                let iova = pick_addr(&mut input);
                let len = pick_len(&mut input);
                let page = 1u64 << input.below(24);
                let bm_len = match input.u8() {
                    0..=200 => bitmap_size(len, page).unwrap_or(8).min(1 << 16),
                    n => usize::from(n),
                };
                let mut bm = vec![0u8; bm_len];
                let _ = dma.logging_report(iova, len, page, &mut bm);
            }
            6 => {
                // Dirty a page, then a report must show it and a second report
                // must come back clean.
                let (iova, len, fd) = REGIONS[input.below(3) as usize];
                let Some(page) = dma.logging_page_size() else {
                    continue;
                };
                let off = u64::from(input.u32()) % len;
                dma.mark_dirty_range(iova + off, 1);
                let report_page = 1u64 << (12 + input.below(4));
                let Ok(n) = bitmap_size(len, report_page) else {
                    continue;
                };
                let mut bm = vec![0u8; n];
                match dma.logging_report(iova, len, report_page, &mut bm) {
                    Ok(()) => {
                        assert!(fd);
                        let _ = page;
                        let bit = (off / report_page) as usize;
                        assert!(
                            bm[bit / 8] & (1 << (bit % 8)) != 0,
                            "dirty page not reported"
                        );
                        let mut again = vec![0u8; n];
                        dma.logging_report(iova, len, report_page, &mut again)
                            .expect("second report");
                        assert!(again.iter().all(|&b| b == 0), "report did not clear");
                    }
                    Err(_) => assert!(!fd || len < page),
                }
            }
            7 => {
                // Device-side writes through scatter/gather entries.
                let iova = pick_addr(&mut input);
                let len = pick_len(&mut input) % 0x10000;
                let prot = if input.bool() {
                    libc::PROT_WRITE
                } else {
                    libc::PROT_READ
                };
                let mut sg = [DmaSg::default(); 3];
                if let Ok(n) = dma.addr_to_sgl(iova, len, &mut sg, prot) {
                    dma.sgl_put(&sg[..n]);
                }
                dma.mark_dirty_range(iova, len);
            }
            8 => {
                // Report through the feature, argsz and geometry fuzzed.
                let mut d = Vec::new();
                d.extend_from_slice(&pick_addr(&mut input).to_le_bytes());
                d.extend_from_slice(&pick_len(&mut input).to_le_bytes());
                d.extend_from_slice(&(1u64 << input.below(24)).to_le_bytes());
                let argsz = match input.u8() {
                    0..=127 => 32 + u32::from(input.u16()),
                    _ => input.u32() % (1 << 20),
                };
                let p = feature(
                    VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
                    argsz,
                    &d,
                );
                if let Ok(reply) = handle_device_feature(Some(&mig), &dev, &log, &p) {
                    assert!(reply.len() >= 32 && reply.len() <= argsz as usize);
                    assert_eq!(
                        u32::from_le_bytes(reply[..4].try_into().unwrap()) as usize,
                        reply.len()
                    );
                }
            }
            9 => {
                // Unmap with a dirty bitmap, then map the region again.
                let (iova, len, fd) = REGIONS[input.below(3) as usize];
                let page = 1u64 << (12 + input.below(3));
                let bm = bitmap_size(len, page).unwrap() as u64;
                let mut p = Vec::new();
                p.extend_from_slice(&(40 + bm as u32).to_le_bytes());
                p.extend_from_slice(&dma_msg::DMA_UNMAP_GET_DIRTY_BITMAP.to_le_bytes());
                p.extend_from_slice(&iova.to_le_bytes());
                p.extend_from_slice(&len.to_le_bytes());
                p.extend_from_slice(&page.to_le_bytes());
                p.extend_from_slice(&bm.to_le_bytes());
                let r = dma_msg::handle_dma_unmap(&dma, &NoDmaCallbacks, &p, &mut Vec::new());
                if let Ok(reply) = &r {
                    assert_eq!(reply.len(), 40 + bm as usize);
                }
                if r.is_ok() || dma.find_exact(iova, len).is_err() {
                    let f = fd.then(|| common::memfd(len));
                    dma.add_region(iova, len, f, 0, libc::PROT_READ | libc::PROT_WRITE, false)
                        .expect("remap");
                }
            }
            10 => {
                // Migration data in whatever state we are.
                let size = u32::from(input.u16());
                dev.data.set(usize::from(input.u16()));
                let mut p = Vec::new();
                p.extend_from_slice(&(8 + size).to_le_bytes());
                p.extend_from_slice(&size.to_le_bytes());
                let mut reply = Vec::new();
                let r = handle_mig_data_read(Some(&mig), &dev, &p, 1 << 20, &mut reply);
                assert_eq!(
                    r.is_ok(),
                    matches!(mig.state(), PRE_COPY | STOP_COPY),
                    "read in {}",
                    mig.state()
                );
                p.resize(8 + size as usize, 0);
                let r = handle_mig_data_write(Some(&mig), &dev, &p, 1 << 20);
                assert_eq!(r.is_ok(), mig.state() == RESUMING);
            }
            _ => {
                // Device reset; arbitrary feature request.
                if input.bool() {
                    let before = mig.state();
                    mig.reset();
                    assert_eq!(mig.state(), before);
                } else {
                    let p = input.chunk();
                    let before = mig.state();
                    let _ = handle_device_feature(Some(&mig), &dev, &log, p);
                    let seen = std::mem::take(&mut *dev.seen.borrow_mut());
                    let mut cur = before;
                    for s in seen {
                        assert!(is_arc(cur, s, pre_copy));
                        cur = s;
                    }
                    assert_eq!(cur, mig.state());
                }
            }
        }
        assert!(usable(mig.state(), pre_copy));
        check_gating(&mig);
        assert!(dma.region_count() <= REGIONS.len());
    }
});

fn pick_addr(input: &mut Input<'_>) -> u64 {
    match input.u8() % 4 {
        0 => REGIONS[input.below(3) as usize].0,
        1 => REGIONS[input.below(3) as usize].0 + u64::from(input.u16()),
        2 => u64::from(input.u32()),
        _ => input.u64(),
    }
}

fn pick_len(input: &mut Input<'_>) -> u64 {
    match input.u8() % 4 {
        0 => REGIONS[input.below(3) as usize].1,
        1 => u64::from(input.u16()),
        2 => u64::from(input.u32()),
        _ => input.u64(),
    }
}
