//! Fuzz target `parse`: every request handler fed arbitrary bytes.
//!
//! The first input byte picks the handler, the rest is its input. Beyond
//! "never panics", each handler's reply is checked for the properties a
//! client relies on (sizes consistent with `argsz`, fds only when promised,
//! no fd leaked or consumed wrongly).

#![no_main]

#[path = "common/mod.rs"]
mod common;

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;

use common::Input;
use libfuzzer_sys::fuzz_target;
use vfio_user::device::dma::{DmaController, DmaInfo};
use vfio_user::device::dma_msg::{self, DmaCallbacks};
use vfio_user::device::migration::{self, DirtyLogging, Migration, MigrationCallbacks};
use vfio_user::device::pci::{BarInfo, PciConfig};
use vfio_user::device::{irq, pci, pci_caps, region, IoEventFd, Irqs, Region, RegionSetup};
use vfio_user::protocol::caps;
use vfio_user::{Errno, Result};

/// The harness's fds, created once: the region backing and ioeventfd fds
/// that the region tables name, and sources to duplicate for requests.
struct Fds {
    bar_mem: OwnedFd,
    ioeventfd: OwnedFd,
    memfd: OwnedFd,
}

thread_local! {
    static FDS: Fds = Fds {
        bar_mem: common::memfd(0x4000),
        ioeventfd: common::eventfd(),
        memfd: common::memfd(1 << 20),
    };
    static REGIONS: Vec<Region> = FDS.with(make_regions);
}

fn make_regions(fds: &Fds) -> Vec<Region> {
    let mut regions = vec![Region::default(); region::NUM_REGIONS];
    let mut add = |idx: usize, s: RegionSetup| {
        let r = region::validate(&regions, idx, s).expect("harness region setup");
        regions[idx] = r;
    };
    let cb: region::RegionCb =
        Rc::new(|_ctx: &vfio_user::Context, buf: &mut [u8], _off: u64, _w: bool| Ok(buf.len()));
    add(
        0,
        RegionSetup {
            size: 0x1000,
            cb: Some(cb.clone()),
            flags: region::FLAG_RW | region::FLAG_MEM,
            mmap_areas: None,
            fd: None,
            offset: 0,
        },
    );
    add(
        2,
        RegionSetup {
            size: 0x4000,
            cb: Some(cb.clone()),
            flags: region::FLAG_RW | region::FLAG_MEM | region::FLAG_64_BITS,
            mmap_areas: Some(vec![(0, 0x1000), (0x2000, 0x1000), (0x3000, 0x800)]),
            fd: Some(fds.bar_mem.as_raw_fd()),
            offset: 0x1000,
        },
    );
    add(
        4,
        RegionSetup {
            size: 0x100,
            cb: Some(cb.clone()),
            flags: region::FLAG_READ,
            mmap_areas: None,
            fd: Some(fds.bar_mem.as_raw_fd()),
            offset: 0,
        },
    );
    add(
        region::CFG,
        RegionSetup {
            size: 0x1000,
            cb: Some(cb),
            flags: region::FLAG_RW,
            mmap_areas: None,
            fd: None,
            offset: 0,
        },
    );
    for (i, off) in [0x40u64, 0x80, 0x80].into_iter().enumerate() {
        regions[0].ioeventfds.push(IoEventFd {
            gpa_offset: off,
            size: 4,
            fd: if i == 2 {
                -1
            } else {
                fds.ioeventfd.as_raw_fd()
            },
            flags: i as u32,
            datamatch: 0x1234 + i as u64,
            shadow_fd: -1,
            shadow_offset: 0,
        });
    }
    regions
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    // The harness's own fds exist before counting starts.
    REGIONS.with(|_| ());
    let before = common::open_fds();
    match input.u8() % 9 {
        0 => client_caps(input.rest()),
        1 => region_info(input.rest()),
        2 => region_io_fds(input.rest()),
        3 => irq_set(&mut input),
        4 => irq_info(&mut input),
        5 => dma(&mut input),
        6 => device_feature(&mut input),
        7 => mig_data(&mut input),
        _ => pci_access(&mut input),
    }
    assert_eq!(common::open_fds(), before, "fd leak");
});

fn client_caps(json: &[u8]) {
    if let Ok(c) = caps::parse_client(json) {
        assert!(c.max_msg_fds <= 1024);
        assert!(c.max_data_xfer_size > 0);
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

fn region_info(payload: &[u8]) {
    REGIONS.with(|regions| {
        let Ok((body, fds)) = region::get_region_info(regions, payload) else {
            return;
        };
        let argsz = u32_at(payload, 0) as usize;
        let needed = u32_at(&body, 0) as usize;
        assert!(needed >= 32);
        // The capabilities come whole when argsz has room for them; else
        // only the fixed part does, and argsz says what is needed.
        let with_caps = u32_at(&body, 4) & vfio_user::protocol::REGION_INFO_FLAG_CAPS != 0;
        assert_eq!(with_caps, needed > 32 && argsz >= needed);
        assert_eq!(body.len(), if with_caps { needed } else { 32 });
        assert!(fds.is_empty() || with_caps);
    });
}

fn region_io_fds(payload: &[u8]) {
    REGIONS.with(|regions| {
        let Ok((body, fds)) = region::get_region_io_fds(regions, payload) else {
            return;
        };
        let argsz = u32_at(payload, 0) as usize;
        assert!(body.len() >= 16);
        let count = u32_at(&body, 12) as usize;
        let listed = (body.len() - 16) / 48;
        assert_eq!((body.len() - 16) % 48, 0);
        assert!(listed == 0 || listed == count);
        assert!(body.len() <= argsz || listed == 0);
        // Every fd_index points into the fds passed.
        for i in 0..listed {
            let idx = u32_at(&body, 16 + i * 48 + 16);
            assert!(idx == u32::MAX || (idx as usize) < fds.len());
        }
    });
}

/// Up to `n` fds of assorted kinds, as a client might attach them.
fn some_fds(input: &mut Input<'_>, max: u32) -> Vec<OwnedFd> {
    let n = input.below(max + 1);
    let kinds = input.u8();
    (0..n)
        .map(|i| match (kinds >> (2 * (i % 4))) & 3 {
            0 => common::eventfd(),
            1 => FDS.with(|f| common::dup(&f.memfd)),
            2 => common::pipe_end(),
            _ => common::devnull(),
        })
        .collect()
}

fn irq_set(input: &mut Input<'_>) {
    let mut counts = [0u32; irq::NUM_IRQ_TYPES];
    for c in counts.iter_mut().take(3) {
        *c = input.below(9);
    }
    counts[irq::ERR as usize] = input.below(2);
    counts[irq::REQ as usize] = input.below(2);
    let irqs = Irqs::new(counts);
    let rounds = input.below(4) + 1;
    for _ in 0..rounds {
        let mut fds = some_fds(input, 10);
        let given = fds.len();
        let payload = input.chunk();
        match irqs.handle_set(payload, &mut fds) {
            // Either all fds were taken or none.
            Ok(_) => assert!(fds.is_empty() || fds.len() == given),
            Err(e) => {
                // A refused request, or a trigger whose write to an
                // installed fd failed (the client gave /dev/null, say).
                assert!(e == Errno::EINVAL || given == 0, "{e:?}");
                assert_eq!(fds.len(), given);
            }
        }
        for sub in 0..10 {
            let _ = irqs.trigger(sub);
        }
        let _ = irqs.trigger_special(irq::ERR);
        let _ = irqs.trigger_special(irq::REQ);
    }
    irqs.reset();
    for index in 0..irq::NUM_IRQ_TYPES as u32 {
        for sub in 0..10 {
            assert!(!irqs.has_eventfd(index, sub));
        }
    }
}

fn irq_info(input: &mut Input<'_>) {
    let irqs = Irqs::new([1, 2, 3, 1, 1]);
    let payload = input.rest();
    if let Ok(out) = irqs.handle_get_info(payload) {
        assert_eq!(out.len(), 16);
        let index = u32_at(&out, 8);
        assert!((index as usize) < irq::NUM_IRQ_TYPES);
        assert_eq!(u32_at(&out, 12), irqs.count(index));
    }
}

#[derive(Default)]
struct DmaCbs {
    registered: Cell<usize>,
    unregistered: Cell<usize>,
    /// Regions the device believes are mapped.
    live: RefCell<Vec<(u64, u64)>>,
}

impl DmaCallbacks for DmaCbs {
    fn register(&self, info: &DmaInfo) {
        self.registered.set(self.registered.get() + 1);
        assert!(info.iova_len() > 0);
        let r = (info.iova_start(), info.iova_len());
        let mut live = self.live.borrow_mut();
        if !live.contains(&r) {
            live.push(r);
        }
    }
    fn unregister(&self, info: &DmaInfo) {
        self.unregistered.set(self.unregistered.get() + 1);
        let r = (info.iova_start(), info.iova_len());
        let mut live = self.live.borrow_mut();
        let pos = live.iter().position(|x| *x == r);
        assert!(pos.is_some(), "unregister of a region never registered");
        live.retain(|x| *x != r);
    }
    fn has_unregister(&self) -> bool {
        true
    }
    fn has_register(&self) -> bool {
        true
    }
}

fn dma(input: &mut Input<'_>) {
    let max = input.below(8) as usize + 1;
    let dma = DmaController::new(max);
    let cbs = DmaCbs::default();
    let rounds = input.below(16) + 1;
    for _ in 0..rounds {
        match input.u8() % 6 {
            0 | 1 => {
                let mut fds = some_fds(input, 2);
                let given = fds.len();
                let payload = input.chunk();
                if let Ok(reply) = dma_msg::handle_dma_map(&dma, &cbs, payload, &mut fds) {
                    assert!(reply.is_empty());
                }
                // The first fd, and only it, is consumed once the request
                // got past its size checks.
                assert!(fds.len() == given || fds.len() + 1 == given.max(1));
            }
            2 | 3 => {
                let mut fds = Vec::new();
                let payload = input.chunk();
                if let Ok(reply) = dma_msg::handle_dma_unmap(&dma, &cbs, payload, &mut fds) {
                    assert!(reply.len() >= 24);
                    assert_eq!(&reply[..24], &payload[..24]);
                }
            }
            4 => {
                let page = 1u64 << input.below(24);
                let _ = dma.logging_start(page, &[]);
            }
            _ => {
                let _ = dma.logging_stop();
            }
        }
        assert!(dma.region_count() <= max);
        assert_eq!(dma.region_count(), cbs.live.borrow().len());
    }
    let n = dma.region_count();
    let before = cbs.unregistered.get();
    dma_msg::unmap_all(&dma, &cbs);
    assert_eq!(dma.region_count(), 0);
    assert_eq!(cbs.unregistered.get() - before, n);
    assert!(cbs.live.borrow().is_empty());
}

/// Migration callbacks that obey the input.
struct FakeDev {
    fail: Cell<u8>,
    data: Vec<u8>,
    claim: Cell<Option<usize>>,
}

impl MigrationCallbacks for FakeDev {
    fn transition(&self, _state: u32) -> Result<()> {
        let f = self.fail.get();
        self.fail.set(f >> 1);
        if f & 1 != 0 {
            Err(Errno::EIO)
        } else {
            Ok(())
        }
    }
    fn read_data(&self, buf: &mut [u8]) -> Result<usize> {
        if self.fail.get() & 1 != 0 {
            return Err(Errno::EAGAIN);
        }
        let n = self.data.len().min(buf.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        Ok(self.claim.get().unwrap_or(n))
    }
    fn write_data(&self, buf: &[u8]) -> Result<usize> {
        if self.fail.get() & 1 != 0 {
            return Err(Errno::EAGAIN);
        }
        Ok(self.claim.get().unwrap_or(buf.len()))
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

fn fake_dev(input: &mut Input<'_>) -> FakeDev {
    let fail = input.u8();
    let data = input.chunk().to_vec();
    let claim = match input.u8() {
        0..=200 => None,
        n => Some(n as usize * 64),
    };
    FakeDev {
        fail: Cell::new(fail),
        data,
        claim: Cell::new(claim),
    }
}

/// A controller with one fd-backed and one message-only region, logging or
/// not as the input says.
fn dma_with_regions(input: &mut Input<'_>) -> DmaController {
    let dma = DmaController::new(4);
    let fd = FDS.with(|f| common::dup(&f.memfd));
    dma.add_region(
        0x10000,
        0x10000,
        Some(fd),
        0,
        libc::PROT_READ | libc::PROT_WRITE,
        false,
    )
    .expect("harness map");
    dma.add_region(0x40000, 0x4000, None, 0, libc::PROT_READ, false)
        .expect("harness map");
    if input.bool() {
        dma.logging_start(4096, &[]).expect("harness logging");
        dma.mark_dirty_range(0x10000 + u64::from(input.u16()), u64::from(input.u16()));
    }
    dma
}

fn device_feature(input: &mut Input<'_>) {
    let with_mig = input.u8() % 4 != 0;
    let pre_copy = input.bool();
    let mig = Migration::with_pre_copy(migration::VFU_MIGR_CALLBACKS_VERS, pre_copy).unwrap();
    let dev = fake_dev(input);
    let dma = dma_with_regions(input);
    let rounds = input.below(4) + 1;
    for _ in 0..rounds {
        let payload = input.chunk();
        let r =
            migration::handle_device_feature(with_mig.then_some(&mig), &dev, &Log(&dma), payload);
        if let Ok(reply) = r {
            assert!(reply.len() >= 8);
            let argsz = u32_at(payload, 0) as usize;
            assert!(reply.len() <= argsz.max(payload.len()));
        }
        assert!(is_valid_state(mig.state(), pre_copy));
    }
}

fn is_valid_state(s: u32, pre_copy: bool) -> bool {
    use migration::*;
    matches!(
        s,
        VFIO_USER_DEVICE_STATE_STOP
            | VFIO_USER_DEVICE_STATE_RUNNING
            | VFIO_USER_DEVICE_STATE_STOP_COPY
            | VFIO_USER_DEVICE_STATE_RESUMING
    ) || (pre_copy && s == VFIO_USER_DEVICE_STATE_PRE_COPY)
}

fn mig_data(input: &mut Input<'_>) {
    use migration::*;
    let mig = Migration::new(VFU_MIGR_CALLBACKS_VERS).unwrap();
    let ok = FakeDev {
        fail: Cell::new(0),
        data: Vec::new(),
        claim: Cell::new(None),
    };
    let target = [
        VFIO_USER_DEVICE_STATE_RUNNING,
        VFIO_USER_DEVICE_STATE_PRE_COPY,
        VFIO_USER_DEVICE_STATE_STOP_COPY,
        VFIO_USER_DEVICE_STATE_RESUMING,
        VFIO_USER_DEVICE_STATE_STOP,
    ][input.below(5) as usize];
    mig.set_state(&ok, target).expect("harness transition");
    let dev = fake_dev(input);
    let max = (input.u16() as usize + 1) * 16;
    let rounds = input.below(4) + 1;
    for _ in 0..rounds {
        let payload = input.chunk();
        if input.bool() {
            let mut reply = vec![0xaa; 3];
            match handle_mig_data_read(Some(&mig), &dev, payload, max, &mut reply) {
                Ok(()) => {
                    let size = u32_at(payload, 4) as usize;
                    assert!(size <= max);
                    assert_eq!(reply.len(), 8 + size);
                    let n = u32_at(&reply, 4) as usize;
                    assert!(n <= size);
                    assert_eq!(u32_at(&reply, 0) as usize, 8 + n);
                }
                Err(_) => assert!(reply.is_empty()),
            }
        } else if let Ok(reply) = handle_mig_data_write(Some(&mig), &dev, payload, max) {
            assert!(reply.is_empty());
        }
    }
}

fn pci_access(input: &mut Input<'_>) {
    let ty = input.below(4);
    let Ok(cfg) = PciConfig::new(ty, pci::PCI_HEADER_TYPE_NORMAL, 0) else {
        return;
    };
    let size = cfg.size();
    // Capabilities: mostly well-formed ones at fuzzed positions and flags.
    let ncaps = input.below(6);
    for _ in 0..ncaps {
        let pos = match input.u8() {
            0..=127 => 0,
            n => usize::from(n) * 4 + usize::from(input.u8() & 3) * 256,
        };
        let flags = i32::from(input.u8() & 0x0f);
        let data = match input.below(8) {
            0 => cap_bytes(pci_caps::CAP_ID_PM, pci_caps::PM_SIZE),
            1 => {
                let mut d = cap_bytes(pci_caps::CAP_ID_MSI, pci_caps::MSI_SIZE);
                d[2] = input.u8();
                d
            }
            2 => cap_bytes(pci_caps::CAP_ID_MSIX, pci_caps::MSIX_SIZE),
            3 => {
                let mut d = cap_bytes(pci_caps::CAP_ID_EXP, pci_caps::EXP_SIZE);
                // Device capabilities: FLR capable or not.
                d[4..8].copy_from_slice(&(u32::from(input.bool()) << 28).to_le_bytes());
                d
            }
            4 => {
                let len = input.u8();
                let mut d = cap_bytes(pci_caps::CAP_ID_VNDR, usize::from(len).max(3));
                d[2] = len;
                d
            }
            5 => {
                let mut d = vec![0u8; pci_caps::DSN_SIZE];
                d[0..2].copy_from_slice(&pci_caps::EXT_CAP_ID_DSN.to_le_bytes());
                d
            }
            6 => {
                let len = input.u16() & 0xfff;
                let mut d = vec![0u8; usize::from(len).max(8)];
                d[0..2].copy_from_slice(&pci_caps::EXT_CAP_ID_VNDR.to_le_bytes());
                d[6..8].copy_from_slice(&(len << 4).to_le_bytes());
                d
            }
            _ => input.chunk().to_vec(),
        };
        if let Ok(off) = cfg.add_capability(pos, flags, &data) {
            assert!(off < size);
        }
    }
    let mut bars = [BarInfo::default(); 7];
    for b in bars.iter_mut() {
        let s = input.u8();
        if s & 0x80 != 0 {
            *b = BarInfo {
                size: 1u64 << (s & 0x3f),
                flags: u32::from(input.u8()) & region::FLAG_MASK,
            };
        }
    }
    cfg.realize(&bars, input.bool());
    let cb_mode = input.u8();
    let mut cb = |buf: &mut [u8], _off: u64, _w: bool| -> Result<usize> {
        match cb_mode % 4 {
            0 => Ok(buf.len()),
            1 => Ok(buf.len() / 2),
            2 => Err(Errno::EIO),
            // Claims more than it was given.
            _ => Ok(buf.len() + 1),
        }
    };
    let with_cb = input.bool();
    let always_cb = input.u8() == 0xff;
    let rounds = input.below(16) + 1;
    for _ in 0..rounds {
        let offset = match input.u8() {
            0..=250 => u64::from(input.u16()),
            _ => input.u64(),
        };
        let len = usize::from(input.u16() % 0x1100);
        let is_write = input.bool();
        let mut buf = input.bytes(len).to_vec();
        buf.resize(len, 0);
        let before_size = cfg.size();
        let cbr: Option<&mut pci::CfgCallback<'_>> = if with_cb { Some(&mut cb) } else { None };
        if let Ok(n) = cfg.access(&mut buf, offset, is_write, cbr, always_cb, &bars) {
            assert!(n <= len, "access claims {n} of {len} bytes");
        }
        assert_eq!(cfg.size(), before_size);
        let _ = cfg.take_flr_request();
        let _ = cfg.write_needs_quiesce(offset);
        let _ = cfg.msix_state();
        let _ = cfg.msi_state();
        for id in [1, 5, 9, 0x10, 0x11] {
            if let Ok(off) = cfg.find_capability(false, id) {
                assert!(off < size);
                let _ = cfg.find_next_capability(false, off, id);
            }
        }
        for id in [3, 0xb] {
            if let Ok(off) = cfg.find_capability(true, id) {
                assert!(off < size);
                let _ = cfg.find_next_capability(true, off, id);
            }
        }
    }
}

fn cap_bytes(id: u8, len: usize) -> Vec<u8> {
    let mut d = vec![0u8; len];
    d[0] = id;
    d
}
