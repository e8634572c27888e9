#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/.

Each seed is a small, valid input in the layout its target's harness reads
(see the doc comment at the top of each fuzz_targets/*.rs), so that the
fuzzers start from real protocol messages instead of having to discover the
framing. Re-running the script rewrites the same files.
"""

import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# Commands.
VERSION, DMA_MAP, DMA_UNMAP, GET_INFO, REGION_INFO, IO_FDS, IRQ_INFO, SET_IRQS = range(1, 9)
REGION_READ, REGION_WRITE, DMA_READ, DMA_WRITE, RESET = 9, 10, 11, 12, 13
WRITE_MULTI, FEATURE, MIG_READ, MIG_WRITE = 15, 16, 17, 18

# Device feature flags.
GET, SET, PROBE = 1 << 16, 1 << 17, 1 << 18
F_MIGRATION, F_STATE, F_LOG_START, F_LOG_STOP, F_LOG_REPORT = 1, 2, 6, 7, 8
STOP, RUNNING, STOP_COPY, RESUMING, PRE_COPY = 1, 2, 3, 4, 6

# IRQ set flags.
D_NONE, D_BOOL, D_EVENTFD = 1, 2, 4
A_MASK, A_UNMASK, A_TRIGGER = 8, 16, 32
INTX, MSI, MSIX, ERR, REQ = range(5)

# Config space layout of the session target's device (capabilities added
# back to back from 0x40, rounded up to 4 bytes).
CAP_PM, CAP_MSI, CAP_MSIX, CAP_PX, CAP_VSC = 0x40, 0x48, 0x60, 0x6C, 0xA8
EXT_DSN, EXT_VSC = 0x100, 0x10C
CFG = 7


def u16(v):
    return struct.pack("<H", v & 0xFFFF)


def u32(v):
    return struct.pack("<I", v & 0xFFFFFFFF)


def u64(v):
    return struct.pack("<Q", v & 0xFFFFFFFFFFFFFFFF)


def hdr(cmd, body, msg_id=1, flags=0):
    return u16(msg_id) + u16(cmd) + u32(16 + len(body)) + u32(flags) + u32(0)


def msg(cmd, body, msg_id=1, flags=0):
    return hdr(cmd, body, msg_id, flags) + body


# ---- request bodies ----------------------------------------------------------

def device_info(argsz=16):
    return u32(argsz) + bytes(12)


def region_info(index, argsz=32):
    return u32(argsz) + u32(0) + u32(index) + u32(0) + u64(0) + u64(0)


def io_fds(index, argsz=16 + 3 * 48):
    return u32(argsz) + u32(0) + u32(index) + u32(0)


def irq_info(index):
    return u32(16) + u32(0) + u32(index) + u32(0)


def set_irqs(flags, index, start, count, data=b""):
    return u32(20 + len(data)) + u32(flags) + u32(index) + u32(start) + u32(count) + data


def access(index, offset, count, data=b""):
    return u64(offset) + u32(index) + u32(count) + data


def write_multi(entries):
    b = u64(len(entries))
    for index, offset, data in entries:
        b += u64(offset) + u32(index) + u32(len(data)) + data.ljust(8, b"\0")
    return b


def dma_map(iova, size, flags, offset=0, argsz=32):
    return u32(argsz) + u32(flags) + u64(offset) + u64(iova) + u64(size)


def dma_unmap(iova, size, flags=0, argsz=24, bitmap=None):
    b = u32(argsz) + u32(flags) + u64(iova) + u64(size)
    if bitmap is not None:
        b += u64(bitmap[0]) + u64(bitmap[1])
    return b


def feature(flags, data=b"", argsz=None):
    if argsz is None:
        argsz = 8 + len(data)
    return u32(argsz) + u32(flags) + data


def set_state(state):
    return feature(SET | F_STATE, u32(state) + u32(0))


def log_start(page, ranges):
    d = u64(page) + u32(len(ranges)) + u32(0)
    for iova, length in ranges:
        d += u64(iova) + u64(length)
    return feature(SET | F_LOG_START, d)


def log_report(iova, length, page, bitmap):
    return feature(GET | F_LOG_REPORT, u64(iova) + u64(length) + u64(page), argsz=32 + bitmap)


def mig_data(size, data=b""):
    return u32(8 + size) + u32(size) + data


# ---- session target -------------------------------------------------------------

# fd kinds (3 bits each): 0 memfd, 1 eventfd, 2 socket, 3 /dev/null, 7 pipe.
MEMFD, EVENTFD, SOCK, NULL, PIPE = 0, 1, 2, 3, 7


def smsg(cmd, body, fds=(), fix_size=True, raw=None, msg_id=1, flags=0):
    """One message of a session input: [spec][kinds u16][len u16][bytes]."""
    data = raw if raw is not None else msg(cmd, body, msg_id, flags)
    spec = 0x40 if fix_size else 0
    kinds = 0
    if fds:
        spec |= 0x80 | len(fds)
        for i, k in enumerate(fds):
            kinds |= k << (3 * (i % 5))
    return bytes([spec]) + u16(kinds) + u16(len(data)) + data


def session(msgs, quiesce=1, mig_fails=0, version=0x4E, log=False, blocking=False):
    cfg = quiesce | (0x40 if log else 0) | (0x20 if blocking else 0)
    return bytes([cfg, mig_fails, version]) + b"".join(msgs)


def session_seeds():
    rw = 3
    mmap = 4
    seeds = {}
    seeds["info"] = session(
        [smsg(GET_INFO, device_info())]
        + [smsg(REGION_INFO, region_info(i, 32)) for i in range(9)]
        + [smsg(REGION_INFO, region_info(2, 80)), smsg(IO_FDS, io_fds(0))]
        + [smsg(IRQ_INFO, irq_info(i)) for i in range(5)]
    )
    seeds["irqs"] = session(
        [
            smsg(SET_IRQS, set_irqs(D_EVENTFD | A_TRIGGER, MSIX, 0, 2), fds=[EVENTFD, EVENTFD]),
            smsg(REGION_WRITE, access(0, 0x100, 8, u64(1))),
            smsg(SET_IRQS, set_irqs(D_NONE | A_TRIGGER, MSIX, 0, 2)),
            smsg(SET_IRQS, set_irqs(D_BOOL | A_TRIGGER, MSIX, 0, 2, b"\x01\x00")),
            smsg(SET_IRQS, set_irqs(D_NONE | A_MASK, MSIX, 1, 1)),
            smsg(SET_IRQS, set_irqs(D_NONE | A_UNMASK, MSIX, 1, 1)),
            smsg(SET_IRQS, set_irqs(D_EVENTFD | A_TRIGGER, ERR, 0, 1), fds=[EVENTFD]),
            smsg(SET_IRQS, set_irqs(D_EVENTFD | A_TRIGGER, MSIX, 0, 0)),
            smsg(SET_IRQS, set_irqs(D_NONE | A_TRIGGER, MSIX, 0, 0)),
        ]
    )
    seeds["irqs-wrong-fds"] = session(
        [
            smsg(SET_IRQS, set_irqs(D_EVENTFD | A_TRIGGER, MSI, 0, 2), fds=[MEMFD, SOCK]),
            smsg(SET_IRQS, set_irqs(D_EVENTFD | A_TRIGGER, MSIX, 0, 3), fds=[EVENTFD] * 9),
            smsg(SET_IRQS, set_irqs(D_NONE | A_TRIGGER, MSIX, 0, 1), fds=[EVENTFD]),
        ]
    )
    # Regression: a socket (its peer closed) as an interrupt eventfd used to
    # kill the server with SIGPIPE on the first trigger.
    seeds["irqs-socket"] = session(
        [
            smsg(SET_IRQS, set_irqs(D_EVENTFD | A_TRIGGER, MSIX, 0, 2), fds=[SOCK, PIPE]),
            smsg(SET_IRQS, set_irqs(D_EVENTFD | A_TRIGGER, ERR, 0, 1), fds=[SOCK]),
            smsg(REGION_WRITE, access(0, 0x100, 8, u64(0))),
            smsg(REGION_WRITE, access(0, 0x100, 8, u64(1))),
        ]
    )
    seeds["bar0"] = session(
        [
            smsg(REGION_WRITE, access(0, 0x10, 4, b"abcd")),
            smsg(REGION_READ, access(0, 0, 0x40)),
            smsg(REGION_READ, access(0, 0xF00, 4)),
            smsg(REGION_READ, access(0, 0xE00, 4)),
            smsg(REGION_WRITE, access(0, 0x120, 8, u64(0x40))),
            smsg(REGION_READ, access(1, 0, 4)),
            smsg(REGION_WRITE, access(2, 0x10, 4, b"wxyz")),
            smsg(REGION_READ, access(0, 0xFFC, 8)),
            smsg(WRITE_MULTI, write_multi([(0, 0, b"12345678"), (0, 8, b"abcd")])),
        ],
        log=True,
    )
    seeds["config"] = session(
        [
            smsg(REGION_READ, access(CFG, 0, 256)),
            smsg(REGION_READ, access(CFG, 0x100, 64)),
            smsg(REGION_WRITE, access(CFG, 4, 2, u16(0x0406))),
            smsg(REGION_WRITE, access(CFG, 0x10, 4, u32(0xFFFFFFFF))),
            smsg(REGION_READ, access(CFG, 0x10, 4)),
            smsg(REGION_WRITE, access(CFG, 0x30, 4, u32(0xFFFFF800))),
            smsg(REGION_WRITE, access(CFG, CAP_PM + 4, 2, u16(3))),
            smsg(REGION_WRITE, access(CFG, CAP_MSI + 2, 2, u16(0x21))),
            smsg(REGION_WRITE, access(CFG, CAP_MSI + 4, 4, u32(0xFEE00000))),
            smsg(REGION_WRITE, access(CFG, CAP_MSIX + 2, 2, u16(0xC000))),
            smsg(REGION_WRITE, access(CFG, CAP_VSC + 4, 4, b"vsc!")),
            smsg(REGION_READ, access(CFG, CAP_VSC, 16)),
            smsg(REGION_WRITE, access(CFG, EXT_VSC + 8, 8, b"extvsc!!")),
            smsg(REGION_WRITE, access(CFG, EXT_DSN + 4, 4, u32(1))),
            smsg(REGION_WRITE, access(CFG, CAP_PX + 8, 2, u16(0x8000))),
            smsg(REGION_READ, access(CFG, 0x34, 1)),
        ]
    )
    seeds["dma"] = session(
        [
            smsg(DMA_MAP, dma_map(0x10000, 0x10000, rw | mmap), fds=[MEMFD]),
            smsg(DMA_MAP, dma_map(0x40000, 0x4000, rw)),
            smsg(DMA_MAP, dma_map(0x80000, 0x1000, 1 | 8, offset=0x1000), fds=[MEMFD]),
            smsg(REGION_WRITE, access(0, 0x108, 8, u64(0x10000))),
            smsg(REGION_WRITE, access(0, 0x110, 8, u64(0x100))),
            smsg(REGION_WRITE, access(0, 0x118, 8, u64(1))),
            smsg(DMA_UNMAP, dma_unmap(0x40000, 0x4000)),
            smsg(DMA_MAP, dma_map(0x10000, 0x10000, rw | mmap), fds=[MEMFD]),
            smsg(DMA_MAP, dma_map(0x100000, 0x1000, rw | mmap), fds=[EVENTFD]),
            smsg(DMA_UNMAP, dma_unmap(0, 0, flags=2)),
        ]
    )
    seeds["migration"] = session(
        [
            smsg(FEATURE, feature(GET | F_MIGRATION, argsz=16)),
            smsg(FEATURE, feature(GET | F_STATE, argsz=16)),
            smsg(FEATURE, feature(PROBE | SET | F_STATE, u32(0) + u32(0))),
            smsg(DMA_MAP, dma_map(0x10000, 0x10000, rw | mmap), fds=[MEMFD]),
            smsg(FEATURE, log_start(4096, [(0x10000, 0x10000)])),
            smsg(REGION_WRITE, access(0, 0x108, 8, u64(0x10000))),
            smsg(REGION_WRITE, access(0, 0x110, 8, u64(0x3000))),
            smsg(REGION_WRITE, access(0, 0x118, 8, u64(1))),
            smsg(FEATURE, set_state(PRE_COPY)),
            smsg(MIG_READ, mig_data(64)),
            smsg(FEATURE, log_report(0x10000, 0x10000, 4096, 8)),
            smsg(DMA_UNMAP, dma_unmap(0x10000, 0x10000, flags=1, argsz=40 + 8, bitmap=(4096, 8))),
            smsg(FEATURE, set_state(STOP_COPY)),
            smsg(MIG_READ, mig_data(256)),
            smsg(REGION_READ, access(0, 0, 4)),
            smsg(FEATURE, set_state(STOP)),
            smsg(GET_INFO, device_info()),
            smsg(FEATURE, feature(SET | F_LOG_STOP)),
            smsg(FEATURE, set_state(RESUMING)),
            smsg(MIG_WRITE, mig_data(8, b"restored")),
            smsg(FEATURE, set_state(RUNNING)),
        ]
    )
    seeds["migration-async"] = session(
        [
            smsg(FEATURE, set_state(STOP)),
            smsg(FEATURE, set_state(RUNNING)),
            smsg(DMA_MAP, dma_map(0x10000, 0x1000, rw)),
            smsg(RESET, b""),
            smsg(REGION_WRITE, access(CFG, CAP_PX + 8, 2, u16(0x8000))),
        ],
        quiesce=2,
        mig_fails=0x24,
    )
    seeds["quiesce-fails"] = session(
        [
            smsg(DMA_MAP, dma_map(0x10000, 0x1000, rw)),
            smsg(RESET, b""),
            smsg(FEATURE, set_state(STOP)),
        ],
        quiesce=3,
    )
    seeds["malformed"] = session(
        [
            smsg(GET_INFO, device_info(8)),
            smsg(99, b"\0" * 4),
            smsg(REGION_READ, b""),
            smsg(GET_INFO, device_info(), flags=1),
            smsg(GET_INFO, device_info(), flags=0x10),
            smsg(REGION_READ, access(0, 0, 4), fix_size=False, raw=hdr(REGION_READ, b"")[:4] + u32(8) + bytes(8)),
            smsg(REGION_WRITE, access(0, 0, 8, b"abcd")),
            smsg(REGION_READ, access(9, 0, 4)),
            smsg(REGION_READ, access(0, 0xFFFFFFFFFFFFFFFF, 4)),
            smsg(DMA_UNMAP, dma_unmap(0x10000, 0x1000, flags=1, argsz=0xFFFFFFFF, bitmap=(4096, 1 << 62))),
            smsg(GET_INFO, device_info(), fds=[EVENTFD, MEMFD]),
            smsg(GET_INFO, device_info()),
        ]
    )
    seeds["twin-split"] = session(
        [
            smsg(0, b"", fix_size=False, raw=msg(GET_INFO, device_info())[:10]),
            smsg(0, b"", fix_size=False, raw=msg(GET_INFO, device_info())[10:]),
            smsg(GET_INFO, device_info()),
        ],
        version=0x4F,
    )
    # Blocking context: the device transfers through DMA messages (answered
    # by the harness) while requests keep coming (deferred meanwhile).
    seeds["dma-messages-blocking"] = session(
        [
            smsg(DMA_MAP, dma_map(0x10000, 0x4000, rw)),
            smsg(DMA_MAP, dma_map(0x14000, 0x4000, rw | mmap), fds=[MEMFD]),
            smsg(REGION_WRITE, access(0, 0x108, 8, u64(0x13f00))),
            smsg(REGION_WRITE, access(0, 0x110, 8, u64(0x200))),
            smsg(REGION_WRITE, access(0, 0x128, 8, u64(0))),
            smsg(GET_INFO, device_info()),
            smsg(REGION_WRITE, access(0, 0x128, 8, u64(1))),
            smsg(GET_INFO, device_info()),
            smsg(REGION_WRITE, access(0, 0x128, 8, u64(3))),
            smsg(DMA_UNMAP, dma_unmap(0, 0, flags=2)),
        ],
        blocking=True,
    )
    seeds["dma-messages-twin"] = session(
        [
            smsg(DMA_MAP, dma_map(0x10000, 0x4000, rw)),
            smsg(REGION_WRITE, access(0, 0x108, 8, u64(0x10000))),
            smsg(REGION_WRITE, access(0, 0x110, 8, u64(0x10))),
            smsg(REGION_WRITE, access(0, 0x128, 8, u64(0))),
            smsg(GET_INFO, device_info()),
        ],
        blocking=True,
        version=0x4F,
    )
    # The same sequences against a blocking context (with read-ahead).
    for name in ("info", "irqs", "dma", "migration", "malformed", "config"):
        d = seeds[name]
        seeds[name + "-blocking"] = bytes([d[0] | 0x20]) + d[1:]
    seeds["version-raw"] = bytes([1, 0, 0xF0]) + u16(4) + u16(2) + u16(0)
    seeds["partial-at-end"] = session([smsg(0, b"", fix_size=False, raw=msg(REGION_WRITE, access(0, 0, 4, b"abcd"))[:20])])
    return seeds


# ---- parse target ------------------------------------------------------------------

def chunk(b):
    return u16(len(b)) + b


def parse_seeds():
    s = {}
    s["caps-full"] = b"\x00" + (
        b'{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,'
        b'"migration":{"pgsize":4096},"twin_socket":{"supported":true},'
        b'"write_multiple":true,"pgsizes":4096,"max_dma_maps":65535}}'
    )
    s["caps-empty"] = b"\x00{}"
    for i in (0, 2, 4, 7, 8):
        s[f"region-info-{i}"] = b"\x01" + region_info(i, 80)
    s["io-fds"] = b"\x02" + io_fds(0)
    s["io-fds-small"] = b"\x02" + io_fds(0, 16)
    # irq_set: counts (3), err, req, rounds, then per round fds n/kinds + chunk.
    s["irq-set"] = (
        b"\x03" + bytes([2, 4, 8, 1, 1, 2])
        + bytes([2, 0x00]) + chunk(set_irqs(D_EVENTFD | A_TRIGGER, MSIX, 0, 2))
        + bytes([0, 0]) + chunk(set_irqs(D_NONE | A_MASK, MSIX, 0, 2))
        + bytes([0, 0]) + chunk(set_irqs(D_BOOL | A_TRIGGER, MSIX, 0, 2, b"\x01\x01"))
    )
    s["irq-set-err"] = b"\x03" + bytes([1, 1, 1, 1, 1, 0, 1, 0]) + chunk(set_irqs(D_EVENTFD | A_TRIGGER, ERR, 0, 1))
    s["irq-info"] = b"\x04" + irq_info(2)
    # dma: max, rounds, ops (0 map: fds n, kinds, chunk; 2 unmap: chunk; 4 log start: shift; 5 stop).
    s["dma"] = (
        b"\x05" + bytes([3, 6])
        + b"\x00" + bytes([1, 0x01]) + chunk(dma_map(0x10000, 0x10000, 3 | 4))
        + b"\x00" + bytes([0, 0]) + chunk(dma_map(0x40000, 0x1000, 3))
        + b"\x04" + bytes([12])
        + b"\x02" + chunk(dma_unmap(0x10000, 0x10000, flags=1, argsz=48, bitmap=(4096, 8)))
        + b"\x02" + chunk(dma_unmap(0x40000, 0x1000))
        + b"\x05"
    )
    # device_feature: with_mig, pre_copy, fake dev (fail, chunk, claim), dma (logging, 2x u16), rounds, chunks.
    dev = bytes([0]) + chunk(b"data") + bytes([0])
    s["feature"] = (
        b"\x06" + bytes([1, 1]) + dev + bytes([1]) + u16(0) + u16(0x1000) + bytes([3])
        + chunk(feature(GET | F_MIGRATION, argsz=16))
        + chunk(set_state(STOP))
        + chunk(log_report(0x10000, 0x10000, 4096, 8))
        + chunk(log_start(4096, [(0, 0x100000)]))
    )
    # mig_data: target index, fake dev, max (u16), rounds, (chunk, bool)*.
    s["mig-read"] = b"\x07" + bytes([1]) + dev + u16(16) + bytes([1]) + chunk(mig_data(64)) + b"\x01" + chunk(mig_data(8)) + b"\x01"
    s["mig-write"] = b"\x07" + bytes([3]) + dev + u16(16) + bytes([0]) + chunk(mig_data(4, b"abcd")) + b"\x00"
    # pci: type, ncaps, caps (pos, flags, kind...), bars (7), intx, cb mode, with_cb, always_cb, rounds, accesses.
    caps = bytes([0, 0, 0]) + bytes([0, 0, 2]) + bytes([0, 0, 3, 1]) + bytes([0, 1, 5]) + bytes([0, 0, 4, 16])
    bars = bytes([0x8C, 4 | 3, 0, 0x8C, 3, 0, 0, 0, 0])
    accesses = b""
    for off, ln, w, data in ((0, 64, 0, b""), (0x10, 4, 1, u32(0xFFFFFFFF)), (0x48, 8, 1, bytes(8)), (0x6C + 8, 2, 1, u16(0x8000)), (0x100, 16, 0, b"")):
        accesses += bytes([0]) + u16(off) + u16(ln) + bytes([w]) + data.ljust(ln, b"\0")
    s["pci"] = b"\x08" + bytes([3, 5]) + caps + bars + bytes([1, 0, 1, 0, 5]) + accesses
    return s


# ---- migration target --------------------------------------------------------------

def migration_seeds():
    s = {}
    s["states"] = bytes([1]) + b"".join(
        bytes([0, t, 0]) for t in (STOP, STOP_COPY, STOP, RESUMING, STOP, RUNNING, PRE_COPY, STOP_COPY, RUNNING)
    )
    s["feature-states"] = bytes([1]) + b"".join(bytes([1, t, f]) for t, f in ((STOP_COPY, 0), (RESUMING, 2), (PRE_COPY, 0), (RUNNING, 1)))
    s["next-step"] = bytes([0]) + b"".join(bytes([2, a, b]) for a in range(8) for b in (1, 3, 6))
    s["logging"] = bytes([1]) + bytes([3, 0, 0]) + bytes([6, 0]) + u32(0x1234) + bytes([0]) + bytes([6, 2]) + u32(0x8000) + bytes([1]) + bytes([4, 0])
    s["report"] = bytes([0]) + bytes([3, 0, 1]) + bytes([7, 0, 0, 1]) + u16(0x3000) + bytes([1]) + bytes([8, 0, 0, 0, 0, 0, 12, 0]) + u16(0x100) + bytes([9, 2, 1])
    s["mig-data"] = bytes([1]) + bytes([0, PRE_COPY, 0]) + bytes([10]) + u16(64) + u16(32) + bytes([0, RESUMING, 0]) + bytes([10]) + u16(8) + u16(0)
    return s


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(data)


def main():
    write("session", session_seeds())
    write("parse", parse_seeds())
    write("migration", migration_seeds())
    return 0


if __name__ == "__main__":
    sys.exit(main())
