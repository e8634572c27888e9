//! Randomized protocol test: 10 000 random but correctly framed
//! messages (random commands, flags, field values, lengths and fds) sent
//! to a live server. Every reply must be well-formed — a reply to the same
//! id and command, with an errno in range when it is an error — or the
//! connection must close cleanly at a message boundary. The device's own
//! requests (DMA_READ/DMA_WRITE, which random register writes provoke) are
//! answered, randomly well or badly. Afterwards a fresh client must be
//! served and no fd may have leaked.
//!
//! The generator is a xorshift PRNG with a fixed seed; set
//! `VFU_RANDOM_SEED` to try others (the seed is printed on failure).

mod robust_common;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use robust_common::*;
use vfio_user::protocol::{cmd, flags, Header, HEADER_SIZE, MAX_ERROR_NO};

/// xorshift64* (the state in a `Cell`, so that draws can nest:
/// `r.pick(&[1, r.next()])`).
struct Rng(std::cell::Cell<u64>);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(std::cell::Cell::new(seed | 1))
    }
    fn next(&self) -> u64 {
        let mut x = self.0.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&self, v: &[T]) -> T {
        v[self.below(v.len() as u64) as usize]
    }
    /// A value that is usually small or a boundary, sometimes anything.
    fn u64ish(&self) -> u64 {
        match self.below(6) {
            0 => self.below(16),
            1 => self.below(0x2000),
            2 => self.pick(&[0x1000, 0x10000, 0x20000, 0x100000]),
            3 => u64::MAX - self.below(0x1000),
            4 => 1 << self.below(64),
            _ => self.next(),
        }
    }
    fn u32ish(&self) -> u32 {
        match self.below(4) {
            0 => self.below(64) as u32,
            1 => self.pick(&[0, 8, 16, 20, 24, 32, 40, 48, 0x1000]),
            2 => u32::MAX - self.below(4) as u32,
            _ => self.next() as u32,
        }
    }
    fn bytes(&self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

const GET: u32 = 1 << 16;
const SET: u32 = 1 << 17;
const PROBE: u32 = 1 << 18;

/// A random body for `command`, mostly shaped like the real structure.
fn random_body(r: &Rng, command: u16) -> Vec<u8> {
    if r.chance(10) {
        let n = r.below(80) as usize;
        return r.bytes(n);
    }
    let argsz = |r: &Rng, real: u32| if r.chance(80) { real } else { r.u32ish() };
    let mut b = match command {
        cmd::DMA_MAP => dma_map(
            argsz(r, 32),
            r.below(16) as u32,
            r.pick(&[0, 0, 0x1000, r.u64ish()]),
            r.pick(&[0x10000, 0x20000, 0x40000, r.u64ish() & !0xfff, r.u64ish()]),
            r.pick(&[0x1000, 0x2000, 0x10000, r.u64ish()]),
        ),
        cmd::DMA_UNMAP => {
            let fl = r.pick(&[0, 0, 1, 2, 3, r.u32ish()]);
            let mut b = dma_unmap(
                argsz(r, if fl == 1 { 48 } else { 24 }),
                fl,
                r.pick(&[0x10000, 0x20000, 0, r.u64ish()]),
                r.pick(&[0x1000, 0x10000, 0, r.u64ish()]),
            );
            if fl == 1 || r.chance(20) {
                b.extend_from_slice(&le64(r.pick(&[4096, 8192, r.u64ish()])));
                b.extend_from_slice(&le64(r.pick(&[8, 16, r.u64ish()])));
            }
            b
        }
        cmd::DEVICE_GET_INFO => device_info(argsz(r, 16)),
        cmd::DEVICE_GET_REGION_INFO => {
            region_info(r.below(11) as u32, argsz(r, r.pick(&[32, 80, 256])))
        }
        cmd::DEVICE_GET_REGION_IO_FDS => body(&[
            &le32(argsz(r, r.pick(&[16, 64, 256]))),
            &le32(if r.chance(90) { 0 } else { r.u32ish() }),
            &le32(r.below(11) as u32),
            &le32(if r.chance(90) { 0 } else { r.u32ish() }),
        ]),
        cmd::DEVICE_GET_IRQ_INFO => irq_info(r.below(7) as u32, argsz(r, 16)),
        cmd::DEVICE_SET_IRQS => {
            let data_type = r.pick(&[1, 2, 4, r.below(8) as u32]);
            let action = r.pick(&[8, 16, 32, r.below(8) as u32 * 8]);
            let count = r.pick(&[0, 1, 2, r.u32ish()]);
            let data = if data_type == 2 {
                let n = if r.chance(90) {
                    count.min(16)
                } else {
                    r.below(8) as u32
                };
                (0..n).map(|_| r.below(3) as u8).collect()
            } else {
                Vec::new()
            };
            let mut b = set_irqs(
                data_type | action,
                r.below(6) as u32,
                r.below(10) as u32,
                count,
                &data,
            );
            if r.chance(10) {
                b[0..4].copy_from_slice(&le32(r.u32ish()));
            }
            b
        }
        cmd::REGION_READ | cmd::REGION_WRITE => {
            let index = r.pick(&[0, 0, 0, 1, 2, 7, 7, 8, r.below(12) as u32]);
            let count = r.pick(&[1, 2, 4, 8, r.below(64) as u32, r.u32ish()]);
            // BAR0 registers, the rest of BAR0, config space, anything.
            let offset = match r.below(5) {
                0 => r.pick(&[
                    REG_IRQ,
                    REG_DMA_IOVA,
                    REG_DMA_LEN,
                    REG_DMA_OP,
                    REG_DMA_RESULT,
                ]),
                1 | 2 => r.below(0x1000) & !3,
                3 => r.below(0x100),
                _ => r.u64ish(),
            };
            let data = if command == cmd::REGION_WRITE {
                let n = if r.chance(90) {
                    count.min(64) as usize
                } else {
                    r.below(16) as usize
                };
                // Keep DMA lengths and addresses sensible most of the time.
                if offset == REG_DMA_LEN && n == 8 {
                    le64(r.pick(&[8, 16, 64, r.u64ish()])).to_vec()
                } else if offset == REG_DMA_IOVA && n == 8 {
                    le64(r.pick(&[0x10000, 0x20000, r.u64ish()])).to_vec()
                } else if offset == REG_DMA_OP && n == 8 {
                    le64(r.below(3)).to_vec()
                } else if offset == REG_IRQ && n == 8 {
                    le64(r.below(10)).to_vec()
                } else {
                    r.bytes(n)
                }
            } else {
                Vec::new()
            };
            access(index, offset, count, &data)
        }
        cmd::REGION_WRITE_MULTI => {
            let n = r.pick(&[1, 2, 3, r.below(300), r.next()]);
            let mut b = le64(n).to_vec();
            for _ in 0..n.min(4) {
                let count = r.pick(&[1, 4, 8, r.below(16) as u32]);
                b.extend_from_slice(&le64(r.below(0x1000)));
                b.extend_from_slice(&le32(r.pick(&[0, 7, r.below(10) as u32])));
                b.extend_from_slice(&le32(count));
                b.extend_from_slice(&r.bytes(8));
            }
            b
        }
        cmd::DEVICE_FEATURE => {
            let feature = r.pick(&[1, 2, 6, 7, 8, r.below(16) as u32]);
            let ops = r.pick(&[GET, SET, PROBE, PROBE | GET, PROBE | SET, GET | SET, 0]);
            let data = match feature {
                2 => body(&[&le32(r.pick(&[1, 2, 3, 4, 6, r.below(9) as u32])), &le32(0)]),
                6 => {
                    let n = r.pick(&[0, 1, 2, r.u32ish()]);
                    let mut d = body(&[
                        &le64(r.pick(&[4096, 8192, 1, 0, r.u64ish()])),
                        &le32(n),
                        &le32(0),
                    ]);
                    for _ in 0..n.min(3) {
                        d.extend_from_slice(&le64(r.u64ish()));
                        d.extend_from_slice(&le64(r.u64ish()));
                    }
                    d
                }
                8 => body(&[
                    &le64(r.pick(&[0x10000, 0x20000, r.u64ish()])),
                    &le64(r.pick(&[0x1000, 0x10000, r.u64ish()])),
                    &le64(r.pick(&[4096, 8192, r.u64ish()])),
                ]),
                _ => r.bytes(r.below(16) as usize),
            };
            let real = 8 + data.len() as u32 + if ops & GET != 0 { 64 } else { 0 };
            body(&[&le32(argsz(r, real)), &le32(ops | feature), &data])
        }
        cmd::MIG_DATA_READ | cmd::MIG_DATA_WRITE => {
            let size = r.pick(&[0, 8, 64, 1024, r.u32ish()]);
            let n = if command == cmd::MIG_DATA_WRITE {
                size.min(2048) as usize
            } else {
                0
            };
            body(&[
                &le32(argsz(r, 8u32.wrapping_add(size))),
                &le32(size),
                &r.bytes(n),
            ])
        }
        cmd::DEVICE_RESET => Vec::new(),
        _ => {
            let n = r.below(64) as usize;
            r.bytes(n)
        }
    };
    if r.chance(5) && !b.is_empty() {
        // Cut or extend the well-shaped body.
        let n = r.below(b.len() as u64 + 16) as usize;
        b.resize(n, 0);
    }
    b
}

/// Answers a DMA request of the server, randomly well or badly.
fn answer_dma(r: &Rng, c: &mut Raw, req: &Header, body: &[u8]) {
    let addr = body
        .get(..8)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let len = body
        .get(8..16)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    let mut h = Header {
        msg_id: req.msg_id,
        cmd: req.cmd,
        msg_size: HEADER_SIZE as u32,
        flags: flags::TYPE_REPLY,
        error_no: 0,
    };
    match r.below(4) {
        0 => {
            h.flags |= flags::ERROR;
            h.error_no = r.pick(&[0, 5, 14, 4097, u32::MAX]);
            c.send_msg(&h, &[], &[]);
        }
        1 => {
            h.msg_id = h.msg_id.wrapping_add(r.below(3) as u16);
            let b = r.bytes(r.below(40) as usize);
            h.msg_size = (HEADER_SIZE + b.len()) as u32;
            c.send_msg(&h, &b, &[]);
        }
        _ => {
            let mut b = body_of(addr, len);
            if req.cmd == cmd::DMA_READ {
                b.resize(b.len() + len.min(4096) as usize, 0x42);
            }
            h.msg_size = (HEADER_SIZE + b.len()) as u32;
            c.send_msg(&h, &b, &[]);
        }
    }
}

fn body_of(addr: u64, len: u64) -> Vec<u8> {
    body(&[&le64(addr), &le64(len)])
}

const COMMANDS: [u16; 16] = [
    cmd::DMA_MAP,
    cmd::DMA_UNMAP,
    cmd::DEVICE_GET_INFO,
    cmd::DEVICE_GET_REGION_INFO,
    cmd::DEVICE_GET_REGION_IO_FDS,
    cmd::DEVICE_GET_IRQ_INFO,
    cmd::DEVICE_SET_IRQS,
    cmd::REGION_READ,
    cmd::REGION_WRITE,
    cmd::REGION_WRITE,
    cmd::REGION_READ,
    cmd::DEVICE_RESET,
    cmd::REGION_WRITE_MULTI,
    cmd::DEVICE_FEATURE,
    cmd::MIG_DATA_READ,
    cmd::MIG_DATA_WRITE,
];

fn random_fds(r: &Rng) -> Vec<OwnedFd> {
    if !r.chance(10) {
        return Vec::new();
    }
    (0..1 + r.below(3))
        .map(|_| if r.chance(50) { eventfd() } else { memfd_64k() })
        .collect()
}

#[test]
fn random_framed_messages_get_well_formed_replies() {
    let _g = serial();
    let seed = std::env::var("VFU_RANDOM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_1e55_f00d_cafe_u64);
    let before = open_fds();
    let s = Server::start("random", Options::default());
    let r = Rng::new(seed);
    let mut c = Raw::connect(&s.path);
    let (mut replies, mut errors, mut closed, mut dma_requests) = (0, 0, 0, 0);
    let mut seen_errnos = std::collections::BTreeSet::new();
    for i in 0..10_000 {
        if i % 100 == 0 {
            // Keep a region the device can reach with DMA messages, and
            // its registers pointing into it (random traffic undoes both).
            let _ = c.call(cmd::DMA_MAP, &dma_map(32, 3, 0, 0x10000, 0x1000), &[]);
            let _ = c.call(
                cmd::REGION_WRITE,
                &access(0, REG_DMA_IOVA, 8, &le64(0x10000)),
                &[],
            );
            let _ = c.call(
                cmd::REGION_WRITE,
                &access(0, REG_DMA_LEN, 8, &le64(16)),
                &[],
            );
        }
        let command = if i % 50 == 25 {
            // The device transfers: its request comes before our reply.
            cmd::REGION_WRITE
        } else if r.chance(90) {
            r.pick(&COMMANDS)
        } else {
            r.next() as u16
        };
        let fl = match if i % 50 == 25 { 2 } else { r.below(20) } {
            0 => flags::NO_REPLY,
            1 => r.below(16) as u32,
            _ => flags::TYPE_COMMAND,
        };
        let b = if i % 50 == 25 {
            access(0, REG_DMA_OP, 8, &le64(1 + r.below(2)))
        } else {
            random_body(&r, command)
        };
        let fds = random_fds(&r);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let id = c.id();
        let h = Header {
            msg_id: id,
            cmd: command,
            msg_size: (HEADER_SIZE + b.len()) as u32,
            flags: fl,
            error_no: if r.chance(5) { r.next() as u32 } else { 0 },
        };
        c.send_msg(&h, &b, &raw);
        drop(fds);
        if fl == flags::NO_REPLY {
            continue;
        }
        // The reply, answering the device's requests meanwhile.
        let reply = loop {
            let Some(m) = c.recv() else { break None };
            if m.hdr.msg_type() == flags::TYPE_COMMAND {
                assert!(
                    m.hdr.cmd == cmd::DMA_READ || m.hdr.cmd == cmd::DMA_WRITE,
                    "seed {seed:#x} message {i}: server sent command {:?}",
                    m.hdr
                );
                dma_requests += 1;
                answer_dma(&r, &mut c, &m.hdr, &m.body);
                continue;
            }
            break Some(m);
        };
        let Some(m) = reply else {
            // Closed cleanly (at a message boundary): start over.
            closed += 1;
            c = Raw::connect(&s.path);
            continue;
        };
        let ctx = format!("seed {seed:#x} message {i}: sent {h:?}, got {:?}", m.hdr);
        assert_eq!(m.hdr.msg_type(), flags::TYPE_REPLY, "{ctx}");
        assert_eq!((m.hdr.msg_id, m.hdr.cmd), (id, command), "{ctx}");
        assert_eq!(m.hdr.msg_size as usize, HEADER_SIZE + m.body.len(), "{ctx}");
        if m.hdr.flags & flags::ERROR != 0 {
            assert!(
                m.hdr.error_no > 0 && m.hdr.error_no <= MAX_ERROR_NO,
                "{ctx}"
            );
            assert!(m.body.is_empty(), "{ctx}");
            seen_errnos.insert(m.hdr.error_no);
            errors += 1;
        } else {
            assert_eq!(m.hdr.error_no, 0, "{ctx}");
            replies += 1;
        }
    }
    // The run exercised both outcomes and the device's own requests.
    assert!(
        replies > 500 && errors > 1000,
        "{replies} ok, {errors} errors"
    );
    assert!(dma_requests > 0);
    assert!(closed < 10, "{closed} connections closed");
    eprintln!(
        "seed {seed:#x}: {replies} ok, {errors} errors {seen_errnos:?}, {dma_requests} DMA requests, {closed} closed"
    );
    drop(c);
    s.check_fresh_client();
    s.stop();
    assert_fds_back_to(before);
}
