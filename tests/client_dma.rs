//! The client against a real server: DMA mappings, the server reaching
//! client memory directly (fd-backed) or through DMA_READ/DMA_WRITE messages
//! (on the main or the twin socket), unmapping, and dirty-page logging.

mod client_common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use client_common::*;
use vfio_user::client::{Client, ClientError, ClientOptions, DmaBacking, GuestMemory};
use vfio_user::device::dma_msg::{DMA_REGION_READ, DMA_REGION_WRITE};
use vfio_user::device::region;
use vfio_user::Errno;

const BAR0: u32 = region::BAR0 as u32;
const RW: u32 = DMA_REGION_READ | DMA_REGION_WRITE;
const IOVA: u64 = 0x10_0000;
const MEM: usize = 0x4000;
const PAGE: u64 = 4096;

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect()
}

fn memory() -> Arc<GuestMemory> {
    let m = Arc::new(GuestMemory::new(MEM).unwrap());
    m.write(0x100, &pattern(0x200, 1)).unwrap();
    m
}

fn scratch(c: &mut Client, len: usize) -> Vec<u8> {
    c.region_read(BAR0, SCRATCH, len).unwrap()
}

#[test]
fn fd_backed_memory_is_accessed_directly() {
    let dev = Dev::default();
    let s = Server::device("dmafd", &dev, Features::default());
    let mut c = s.connect();
    let mem = memory();
    c.dma_map_memory(IOVA, &mem, true, RW).unwrap();
    assert_eq!(dev.lock().dma_registered, vec![(IOVA, MEM as u64)]);

    // The device reads guest memory through its own mapping.
    assert_eq!(device_dma(&mut c, IOVA + 0x100, 64, OP_READ | OP_DIRECT), 0);
    assert_eq!(scratch(&mut c, 64), pattern(64, 1));
    assert_eq!(c.dma_requests_served(), 0);

    // And writes it.
    c.region_write(BAR0, SCRATCH, b"written by the device")
        .unwrap();
    assert_eq!(
        device_dma(&mut c, IOVA + 0x2000, 21, OP_WRITE | OP_DIRECT),
        0
    );
    assert_eq!(mem.read_vec(0x2000, 21).unwrap(), b"written by the device");
    assert_eq!(c.dma_requests_served(), 0);

    // Without direct access the server asks the client, even for an
    // fd-backed region.
    mem.write(0x3000, b"via messages").unwrap();
    assert_eq!(device_dma(&mut c, IOVA + 0x3000, 12, OP_READ), 0);
    assert_eq!(scratch(&mut c, 12), b"via messages");
    assert_eq!(c.dma_requests_served(), 1);
    s.finish(c);
}

#[test]
fn fdless_memory_is_served_on_the_main_socket() {
    let dev = Dev::default();
    let s = Server::device("dmamain", &dev, Features::default());
    let mut c = s.connect();
    let mem = memory();
    c.dma_map_memory(IOVA, &mem, false, RW).unwrap();
    assert_eq!(c.dma_space().len(), 1);

    assert_eq!(
        device_dma(&mut c, IOVA + 0x100, 0x200, OP_READ | OP_DIRECT),
        0
    );
    assert_eq!(scratch(&mut c, 0x200), pattern(0x200, 1));
    assert_eq!(c.dma_requests_served(), 1);

    c.region_write(BAR0, SCRATCH, &pattern(0x80, 9)).unwrap();
    assert_eq!(device_dma(&mut c, IOVA + 0x1f80, 0x80, OP_WRITE), 0);
    assert_eq!(mem.read_vec(0x1f80, 0x80).unwrap(), pattern(0x80, 9));
    assert_eq!(c.dma_requests_served(), 2);
    assert_eq!(c.dma_requests_served_on_twin(), 0);
    s.finish(c);
}

#[test]
fn fdless_memory_is_served_on_the_twin_socket() {
    let dev = Dev::default();
    let s = Server::device("dmatwin", &dev, Features::default());
    let mut c = s.connect_with(ClientOptions {
        twin_socket: true,
        ..ClientOptions::default()
    });
    assert!(c.has_twin_socket());
    let mem = memory();
    c.dma_map_memory(IOVA, &mem, false, RW).unwrap();

    assert_eq!(device_dma(&mut c, IOVA + 0x100, 0x100, OP_READ), 0);
    assert_eq!(scratch(&mut c, 0x100), pattern(0x100, 1));
    c.region_write(BAR0, SCRATCH, b"twin").unwrap();
    assert_eq!(device_dma(&mut c, IOVA, 4, OP_WRITE), 0);
    assert_eq!(mem.read_vec(0, 4).unwrap(), b"twin");
    assert_eq!(c.dma_requests_served(), 2);
    assert_eq!(c.dma_requests_served_on_twin(), 2);
    s.finish(c);
}

#[test]
fn server_splits_dma_by_the_client_transfer_size() {
    let dev = Dev::default();
    let s = Server::device("dmasplit", &dev, Features::default());
    let mut c = s.connect_with(ClientOptions {
        max_data_xfer_size: 256,
        ..ClientOptions::default()
    });
    let mem = memory();
    c.dma_map_memory(IOVA, &mem, false, RW).unwrap();
    assert_eq!(device_dma(&mut c, IOVA + 0x100, 0x200, OP_READ), 0);
    assert_eq!(scratch(&mut c, 0x200), pattern(0x200, 1));
    assert_eq!(c.dma_requests_served(), 2);
    c.region_write(BAR0, SCRATCH, &pattern(0x300, 3)).unwrap();
    assert_eq!(device_dma(&mut c, IOVA + 0x1000, 0x300, OP_WRITE), 0);
    assert_eq!(mem.read_vec(0x1000, 0x300).unwrap(), pattern(0x300, 3));
    assert_eq!(c.dma_requests_served(), 5);
    s.finish(c);
}

#[test]
fn client_errors_reach_the_device() {
    let dev = Dev::default();
    let s = Server::device("dmaerr", &dev, Features::default());
    let mut c = s.connect();
    // Mapped on the server, but the client has no memory there.
    c.dma_map(IOVA, PAGE, None, RW).unwrap();
    assert_eq!(device_dma(&mut c, IOVA, 16, OP_READ), libc::EFAULT as u64);
    assert_eq!(c.dma_requests_served(), 1);
    // Not mapped at all: the server's translation fails.
    assert_eq!(
        device_dma(&mut c, 0x9000_0000, 16, OP_READ),
        libc::ENOENT as u64
    );
    // A read-only mapping refuses device writes.
    c.dma_map(IOVA + PAGE, PAGE, None, DMA_REGION_READ).unwrap();
    assert_eq!(
        device_dma(&mut c, IOVA + PAGE, 16, OP_WRITE),
        libc::EACCES as u64
    );
    s.finish(c);
}

#[test]
fn map_and_unmap_rules() {
    let dev = Dev::default();
    let s = Server::device("dmamap", &dev, Features::default());
    let mut c = s.connect();
    let mem = memory();
    c.dma_map_memory(IOVA, &mem, true, RW).unwrap();
    // Overlaps are refused locally (for client memory) and by the server.
    assert!(matches!(
        c.dma_map_memory(IOVA + 0x1000, &mem, true, RW),
        Err(ClientError::InvalidArgument(_))
    ));
    let e = c.dma_map(IOVA + 0x1000, PAGE, None, RW).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    // Up to the advertised number of regions.
    let max = c.server_caps().max_dma_maps as u64;
    for i in 1..max {
        c.dma_map(IOVA + i * 0x10_0000, PAGE, None, RW).unwrap();
    }
    let e = c
        .dma_map(IOVA + max * 0x10_0000, PAGE, None, RW)
        .unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));

    c.dma_unmap(IOVA, MEM as u64, 0).unwrap();
    assert_eq!(dev.lock().dma_unregistered, vec![(IOVA, MEM as u64)]);
    assert!(c.dma_space().is_empty());
    let e = c.dma_unmap(IOVA, MEM as u64, 0).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::ENOENT));
    // The device can no longer reach it.
    assert_eq!(
        device_dma(&mut c, IOVA, 16, OP_READ | OP_DIRECT),
        libc::ENOENT as u64
    );

    c.dma_unmap_all().unwrap();
    assert_eq!(dev.lock().dma_unregistered.len() as u64, max);
    // Everything can be mapped again.
    c.dma_map_memory(IOVA, &mem, false, RW).unwrap();
    s.finish(c);
    // The disconnect unmapped what was left.
    assert_eq!(
        dev.lock().dma_unregistered.last(),
        Some(&(IOVA, MEM as u64))
    );
}

#[test]
fn serve_dma_answers_requests_caused_by_a_posted_write() {
    let dev = Dev::default();
    let s = Server::device("dmaserve", &dev, Features::default());
    let mut c = s.connect();
    let mem = memory();
    c.dma_map_memory(IOVA, &mem, false, RW).unwrap();
    write_reg(&mut c, REG_DMA_IOVA, IOVA + 0x100);
    write_reg(&mut c, REG_DMA_LEN, 0x40);
    c.region_write_posted(BAR0, REG_DMA_OP, &OP_READ.to_le_bytes())
        .unwrap();
    // No request is outstanding: the server's DMA_READ waits for us.
    assert_eq!(c.serve_dma(Duration::from_secs(1)).unwrap(), 1);
    assert_eq!(read_reg(&mut c, REG_DMA_RESULT), 0);
    assert_eq!(scratch(&mut c, 0x40), pattern(0x40, 1));
    // Nothing more to serve.
    assert_eq!(c.serve_dma(Duration::from_millis(50)).unwrap(), 0);
    s.finish(c);
}

/// Memory computed on the fly, counting accesses.
#[derive(Default)]
struct Synthetic {
    reads: AtomicUsize,
    writes: AtomicUsize,
}

impl DmaBacking for Synthetic {
    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Errno> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (addr as u8).wrapping_add(i as u8);
        }
        Ok(())
    }
    fn dma_write(&self, _addr: u64, _data: &[u8]) -> Result<(), Errno> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        Err(Errno(libc::EROFS))
    }
}

#[test]
fn a_custom_backing_serves_instead_of_the_space() {
    let dev = Dev::default();
    let s = Server::device("dmacustom", &dev, Features::default());
    let mut c = s.connect();
    let syn = Arc::new(Synthetic::default());
    c.set_dma_backing(Some(syn.clone()));
    c.dma_map(IOVA, PAGE, None, RW).unwrap();
    assert_eq!(device_dma(&mut c, IOVA + 0x10, 8, OP_READ), 0);
    assert_eq!(
        scratch(&mut c, 8),
        vec![0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]
    );
    assert_eq!(device_dma(&mut c, IOVA, 8, OP_WRITE), libc::EROFS as u64);
    assert_eq!(
        (
            syn.reads.load(Ordering::Relaxed),
            syn.writes.load(Ordering::Relaxed)
        ),
        (1, 1)
    );
    s.finish(c);
}

#[test]
fn dirty_logging_reports_device_writes() {
    let dev = Dev::default();
    let s = Server::device("dirty", &dev, Features::default());
    let mut c = s.connect();
    let mem = memory();
    c.dma_map_memory(IOVA, &mem, true, RW).unwrap();
    // Not logging yet.
    let e = c.dma_logging_report(IOVA, MEM as u64, PAGE).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));

    c.dma_logging_start(PAGE, &[(IOVA, MEM as u64)]).unwrap();
    assert_eq!(
        c.dma_logging_report(IOVA, MEM as u64, PAGE).unwrap(),
        vec![0; 8]
    );
    // A direct write to page 1 and a message write to page 3.
    assert_eq!(
        device_dma(&mut c, IOVA + 0x1008, 16, OP_WRITE | OP_DIRECT),
        0
    );
    assert_eq!(device_dma(&mut c, IOVA + 0x3000, 16, OP_WRITE), 0);
    // Reads dirty nothing.
    assert_eq!(
        device_dma(&mut c, IOVA + 0x2000, 16, OP_READ | OP_DIRECT),
        0
    );
    let bm = c.dma_logging_report(IOVA, MEM as u64, PAGE).unwrap();
    assert_eq!(bm, vec![0b1010, 0, 0, 0, 0, 0, 0, 0]);
    // Reporting clears.
    assert_eq!(
        c.dma_logging_report(IOVA, MEM as u64, PAGE).unwrap(),
        vec![0; 8]
    );

    // Unmapping with the dirty bitmap.
    assert_eq!(
        device_dma(&mut c, IOVA + 0x2000, 1, OP_WRITE | OP_DIRECT),
        0
    );
    let bm = c.dma_unmap_dirty(IOVA, MEM as u64, PAGE).unwrap();
    assert_eq!(bm, vec![0b0100, 0, 0, 0, 0, 0, 0, 0]);
    assert!(c.dma_space().is_empty());

    c.dma_logging_stop().unwrap();
    c.dma_map_memory(IOVA, &mem, true, RW).unwrap();
    let e = c.dma_logging_report(IOVA, MEM as u64, PAGE).unwrap_err();
    assert_eq!(e.server_errno(), Some(Errno::EINVAL));
    s.finish(c);
}
