//! Soak: a million mixed requests against one live server, with the
//! process's resident memory and open fds flat from the first hundred
//! thousand requests on. Slow in a debug build, so it is ignored by default;
//! `make soak` (run by CI) runs it in release:
//! `cargo test --release --test soak -- --ignored`. SOAK_REQUESTS overrides
//! the count.

use std::os::fd::AsFd;
use std::rc::Rc;
use std::sync::mpsc;

use vfio_user::client::{Client, EventFd};
use vfio_user::device::dma_msg::{DMA_REGION_READ, DMA_REGION_WRITE};
use vfio_user::device::{irq, region, RegionSetup};
use vfio_user::{Context, Errno};

fn vm_rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
#[ignore = "slow in debug builds; `make soak` runs it in release"]
fn a_million_mixed_requests_keep_memory_and_fds_flat() {
    let total: u64 = std::env::var("SOAK_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let path = std::env::temp_dir().join(format!("vfu-soak-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let (tx, rx) = mpsc::channel();
    let p = path.clone();
    let server = std::thread::spawn(move || {
        let ctx = Context::new(&p, 0, std::ptr::null_mut()).unwrap();
        ctx.pci_init(0u32, 0, 0).unwrap();
        let regs = Rc::new(std::cell::RefCell::new([0u8; 4096]));
        let r = regs.clone();
        let bar0 = RegionSetup::new(4096, region::FLAG_RW | region::FLAG_MEM).with_callback(
            move |_, buf, off, write| {
                let mut m = r.borrow_mut();
                let at = off as usize..off as usize + buf.len();
                if write {
                    m[at].copy_from_slice(buf);
                } else {
                    buf.copy_from_slice(&m[at]);
                }
                Ok(buf.len())
            },
        );
        ctx.setup_region(region::BAR0, bar0).unwrap();
        ctx.setup_irq_count(irq::MSIX, 4).unwrap();
        ctx.setup_dma(1024, None, None).unwrap();
        ctx.realize().unwrap();
        tx.send(()).unwrap();
        ctx.attach().unwrap();
        assert_eq!(ctx.run().unwrap_err(), Errno::ENOTCONN);
    });
    rx.recv().unwrap();
    let mut c = Client::connect(&path).unwrap();
    let efd = EventFd::new().unwrap();
    let rw = DMA_REGION_READ | DMA_REGION_WRITE;
    let bar0 = region::BAR0 as u32;

    let mut baseline = None;
    let mut i = 0u64;
    while i < total {
        match i % 8 {
            0 => c
                .region_write(bar0, (i % 1000) * 4, &(i as u32).to_le_bytes())
                .unwrap(),
            1 => assert_eq!(
                c.region_read(bar0, ((i - 1) % 1000) * 4, 4).unwrap(),
                ((i - 1) as u32).to_le_bytes()
            ),
            2 => assert_eq!(c.device_info().unwrap().num_regions, 9),
            3 => assert_eq!(c.region_info(bar0).unwrap().size, 4096),
            4 => assert_eq!(c.irq_info(irq::MSIX).unwrap().count, 4),
            5 => c
                .set_irqs(irq::MSIX, (i % 4) as u32, &[efd.as_fd()])
                .unwrap(),
            6 => c
                .dma_map(0x10_0000 + (i % 64) * 0x1000, 0x1000, None, rw)
                .unwrap(),
            _ => c
                .dma_unmap(0x10_0000 + ((i - 1) % 64) * 0x1000, 0x1000, 0)
                .unwrap(),
        }
        i += 1;
        if i == total / 10 {
            baseline = Some((vm_rss_kib(), open_fds()));
        }
    }
    let (rss0, fds0) = baseline.unwrap();
    let (rss1, fds1) = (vm_rss_kib(), open_fds());
    println!("{total} requests: RSS {rss0} KiB -> {rss1} KiB, fds {fds0} -> {fds1}");
    assert!(
        rss1 <= rss0 + 2048,
        "RSS grew from {rss0} KiB to {rss1} KiB over {} requests",
        total - total / 10
    );
    assert_eq!(fds1, fds0, "fds leaked");
    c.irq_disable(irq::MSIX, 0, 4).unwrap();
    drop(c);
    server.join().unwrap();
}
