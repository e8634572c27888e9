/* SPDX-License-Identifier: BSD-3-Clause */
/*
 * migdev: a small stateful PCI device that does DMA and can be live-migrated.
 *
 * The device owns a guest buffer (DMA_ADDR, DMA_LEN) and, while enabled and
 * running, writes one 4 KiB page of it per tick with a pattern derived from
 * a tick counter. It keeps a shadow copy of the buffer so that it can report
 * a checksum of the whole buffer as it believes it to be. Its state (the
 * registers) migrates through the vfio-user migration protocol in a small
 * versioned, CRC-protected format; the guest buffer itself is guest memory
 * and migrates with the guest (the library's dirty-page logging sees the
 * device's writes).
 *
 * README.md next to this file has the register map and the state format.
 *
 * Usage: migdev SOCKET [--log LEVEL] [--persist] [--bulk-kib N]
 *   LEVEL: emerg, alert, crit, err, warning, notice, info (default), debug,
 *          or a syslog level number 0-7.
 *   --bulk-kib N: N KiB of extra opaque device state (a bulk record, sent
 *          first in pre-copy), and accept bulk records of up to N KiB when
 *          resuming; for migrations with large device state.
 *
 * Serves one client with a non-blocking context driven by poll(); exits 0
 * when the client disconnects, or on SIGTERM/SIGINT.
 */

#define _GNU_SOURCE

#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "libvfio-user.h"

/* ---- identity and register map ------------------------------------------ */

#define MIGDEV_VENDOR   0x494f
#define MIGDEV_DEVICE   0x0dcf
#define MIGDEV_BAR0_SZ  0x1000

#define REG_MAGIC       0x00
#define REG_VERSION     0x04
#define REG_COUNTER     0x08
#define REG_CTRL        0x0c
#define REG_SCRATCH     0x10 /* 16 registers, up to 0x4f */
#define REG_DMA_ADDR_LO 0x50
#define REG_DMA_ADDR_HI 0x54
#define REG_DMA_LEN     0x58
#define REG_STATE       0x5c
#define REG_CHECKSUM    0x60

#define NR_SCRATCH      16
#define MIGDEV_MAGIC    0x4d494744u /* "MIGD" */
#define MIGDEV_VERSION  1u
#define CTRL_DMA_EN     (1u << 0)
#define CTRL_MASK       CTRL_DMA_EN

#define DMA_PAGE        4096u
#define DMA_MAX_LEN     (16u * 1024 * 1024)
#define PATTERN_MUL     2654435761u

/* Ticks are at least this far apart. */
#define TICK_NS         (5 * 1000 * 1000L)
/* Most requests handled between two looks at the clock. */
#define RUN_BATCH       64

/* ---- migration state format ---------------------------------------------- */

/*
 * One record: a 20-byte header, then the payload. Every field is
 * little-endian.
 *
 *   header  0  u32  record magic REC_MAGIC ("MDST")
 *           4  u16  format version (REC_VERSION)
 *           6  u16  header length (REC_HDR_LEN)
 *           8  u32  flags (REC_FLAG_FINAL: written in STOP_AND_COPY)
 *          12  u32  payload length (REC_PAYLOAD_LEN for version 1)
 *          16  u32  CRC-32 (IEEE) of header bytes 0-15 followed by the payload
 *   payload 0  u32  MAGIC register (must be MIGDEV_MAGIC)
 *           4  u32  COUNTER
 *           8  u32  CTRL
 *          12  u32  DMA_LEN
 *          16  u64  DMA_ADDR
 *          24  u32  SCRATCH[16]
 *          88  u32  CHECKSUM
 *          92  u32  reserved, 0
 *
 * Flags: REC_FLAG_FINAL (written in STOP_AND_COPY), REC_FLAG_BULK (a bulk
 * record, below).
 * The source produces one record in PRE_COPY and one (flagged final) in
 * STOP_AND_COPY; a part of the pre-copy record left unread when the device
 * moves on to STOP_AND_COPY is sent before the final one. The destination accepts one or more records back to back;
 * all must be valid, the last must be final, and it applies the last one.
 */
#define REC_MAGIC        0x5453444du /* bytes "MDST" */
#define REC_VERSION      1u
#define REC_HDR_LEN      20u
#define REC_PAYLOAD_LEN  96u
#define REC_LEN          (REC_HDR_LEN + REC_PAYLOAD_LEN)
#define REC_FLAG_FINAL   (1u << 0)
/*
 * A bulk record (--bulk-kib) carries opaque device state: any payload
 * length up to BULK_MAX, bytes (i * 131 + 7) & 0xff, CRC-checked like the
 * others and otherwise ignored when resuming. Never flagged final.
 */
#define REC_FLAG_BULK    (1u << 1)
#define BULK_MAX         (256u * 1024 * 1024)
/*
 * Incoming migration data is bounded: far more than any valid stream, plus
 * the bulk records --bulk-kib allows.
 */
#define MIG_IN_MAX       (64u * 1024)

/* ---- the device ---------------------------------------------------------- */

struct regs {
    uint32_t counter;
    uint32_t ctrl;
    uint32_t scratch[NR_SCRATCH];
    uint64_t dma_addr;
    uint32_t dma_len;
    uint32_t checksum;
};

struct migdev {
    vfu_ctx_t *ctx;
    struct regs r;
    vfu_migr_state_t state; /* as the transition callback last saw it */

    /* The buffer as the device believes it is (dma_len bytes). */
    uint32_t *shadow;
    size_t shadow_len;
    bool shadow_valid;
    /* The state was restored and the shadow is not rebuilt yet. */
    bool restored;

    /* Room for one dma_sg_t (its size is only known at run time). */
    dma_sg_t *sg;

    /*
     * Outgoing migration data and read cursor: the pre-copy record, or the
     * unread rest of it followed by the final record.
     */
    uint8_t *out;
    size_t out_cap;
    size_t out_len;
    size_t out_pos;

    /* Bulk record payload length (--bulk-kib), 0 for none. */
    size_t bulk_len;

    /* Incoming migration data, and its bound. */
    uint8_t *in;
    size_t in_len;
    size_t in_max;
    /*
     * The leading bulk records already checked as they came in (bytes of
     * the incoming data, and their payload bytes).
     */
    size_t in_checked;
    size_t in_bulk;

    /* Logging of DMA failures: once per run of failures. */
    bool dma_failing;
    struct timespec next_tick;
};

static volatile sig_atomic_t stop_requested;

static void
on_signal(int sig)
{
    (void)sig;
    stop_requested = 1;
}

static void
log_stderr(vfu_ctx_t *ctx, int level, const char *msg)
{
    (void)ctx;
    fprintf(stderr, "migdev[%ld] <%d>: %s\n", (long)getpid(), level, msg);
}

static struct migdev *
dev_of(vfu_ctx_t *ctx)
{
    return vfu_get_private(ctx);
}

/* ---- little helpers ------------------------------------------------------ */

static void
put16(uint8_t *p, uint16_t v)
{
    v = htole16(v);
    memcpy(p, &v, sizeof(v));
}

static void
put32(uint8_t *p, uint32_t v)
{
    v = htole32(v);
    memcpy(p, &v, sizeof(v));
}

static void
put64(uint8_t *p, uint64_t v)
{
    v = htole64(v);
    memcpy(p, &v, sizeof(v));
}

static uint16_t
get16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, sizeof(v));
    return le16toh(v);
}

static uint32_t
get32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return le32toh(v);
}

static uint64_t
get64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return le64toh(v);
}

/* CRC-32 (IEEE 802.3, reflected, as in zlib), continued from `crc`. */
static uint32_t
crc32_update(uint32_t crc, const uint8_t *p, size_t len)
{
    size_t i;
    int b;

    crc = ~crc;
    for (i = 0; i < len; i++) {
        crc ^= p[i];
        for (b = 0; b < 8; b++) {
            crc = (crc >> 1) ^ (0xedb88320u & (0u - (crc & 1u)));
        }
    }
    return ~crc;
}

/* Sum of the little-endian u32 words of `len` bytes (len % 4 == 0). */
static uint32_t
sum_words(const uint32_t *w, size_t len)
{
    uint32_t s = 0;
    size_t i;

    for (i = 0; i < len / 4; i++) {
        s += le32toh(w[i]);
    }
    return s;
}

static bool
dma_len_ok(uint32_t len)
{
    return len % DMA_PAGE == 0 && len <= DMA_MAX_LEN;
}

static const char *
state_name(vfu_migr_state_t s)
{
    switch (s) {
    case VFU_MIGR_STATE_STOP:          return "STOP";
    case VFU_MIGR_STATE_RUNNING:       return "RUNNING";
    case VFU_MIGR_STATE_STOP_AND_COPY: return "STOP_AND_COPY";
    case VFU_MIGR_STATE_PRE_COPY:      return "PRE_COPY";
    case VFU_MIGR_STATE_RESUME:        return "RESUME";
    }
    return "?";
}

/* ---- DMA ----------------------------------------------------------------- */

/*
 * Moves `len` bytes between `buf` and guest memory at `addr`, in one
 * scatter-gather entry: through a direct mapping when the region has one
 * (vfu_sgl_get/put, which also marks written pages dirty while the client
 * logs them), else with vfu_sgl_read/write. A range that spans two DMA
 * regions is split in halves until each part fits one entry.
 */
static int
dma_xfer_one(struct migdev *d, uint64_t addr, void *buf, size_t len,
             bool write)
{
    int prot = write ? PROT_WRITE : PROT_READ;
    struct iovec iov;
    int n;

    n = vfu_addr_to_sgl(d->ctx, (vfu_dma_addr_t)(uintptr_t)addr, len, d->sg,
                        1, prot);
    if (n < -1 && len > 1) {
        /* Needs more than one entry: the range crosses a region boundary. */
        size_t half = len / 2;

        if (dma_xfer_one(d, addr, buf, half, write) < 0) {
            return -1;
        }
        return dma_xfer_one(d, addr + half, (uint8_t *)buf + half, len - half,
                            write);
    }
    if (n != 1) {
        if (n >= 0 || errno == 0) {
            errno = EFAULT;
        }
        return -1;
    }
    if (vfu_sgl_get(d->ctx, d->sg, &iov, 1, 0) == 0) {
        if (write) {
            memcpy(iov.iov_base, buf, len);
        } else {
            memcpy(buf, iov.iov_base, len);
        }
        vfu_sgl_put(d->ctx, d->sg, &iov, 1);
        return 0;
    }
    if (write) {
        return vfu_sgl_write(d->ctx, d->sg, 1, buf, VFU_SGL_DIRECT_ACCESS);
    }
    return vfu_sgl_read(d->ctx, d->sg, 1, buf, VFU_SGL_DIRECT_ACCESS);
}

/* dma_xfer_one() over a range of any length, page by page. */
static int
dma_xfer(struct migdev *d, uint64_t addr, void *buf, size_t len, bool write)
{
    uint8_t *p = buf;

    while (len > 0) {
        size_t chunk = DMA_PAGE - (size_t)(addr % DMA_PAGE);

        if (chunk > len) {
            chunk = len;
        }
        if (addr + chunk < addr) {
            errno = EFAULT;
            return -1;
        }
        if (dma_xfer_one(d, addr, p, chunk, write) < 0) {
            return -1;
        }
        addr += chunk;
        p += chunk;
        len -= chunk;
    }
    return 0;
}

static void
dma_failed(struct migdev *d, const char *what)
{
    if (!d->dma_failing) {
        vfu_log(d->ctx, LOG_WARNING,
                "%s of buffer %#" PRIx64 "+%#" PRIx32 " failed: %s "
                "(retrying every tick)",
                what, d->r.dma_addr, d->r.dma_len, strerror(errno));
        d->dma_failing = true;
    }
}

/*
 * Reads the whole guest buffer into the shadow and recomputes CHECKSUM from
 * it. Done before the first write after the buffer was (re)programmed,
 * enabled, unmapped or restored by migration.
 */
static int
rebuild_shadow(struct migdev *d)
{
    uint32_t sum;

    if (d->shadow_len != d->r.dma_len) {
        uint32_t *p = realloc(d->shadow, d->r.dma_len);

        if (p == NULL) {
            return -1;
        }
        d->shadow = p;
        d->shadow_len = d->r.dma_len;
    }
    if (dma_xfer(d, d->r.dma_addr, d->shadow, d->shadow_len, false) < 0) {
        dma_failed(d, "read");
        return -1;
    }
    sum = sum_words(d->shadow, d->shadow_len);
    if (d->restored && sum != d->r.checksum) {
        vfu_log(d->ctx, LOG_WARNING,
                "guest buffer sums to %#" PRIx32 ", not to the migrated "
                "CHECKSUM %#" PRIx32 ": was guest memory migrated?",
                sum, d->r.checksum);
    }
    vfu_log(d->ctx, LOG_INFO, "shadow of %#" PRIx64 "+%#" PRIx32
            " rebuilt, checksum %#" PRIx32, d->r.dma_addr, d->r.dma_len, sum);
    d->r.checksum = sum;
    d->restored = false;
    d->shadow_valid = true;
    return 0;
}

/* One device tick: maybe write the next page of the buffer. */
static void
tick(struct migdev *d)
{
    uint32_t page[DMA_PAGE / 4];
    uint32_t next, idx, old_sum, new_sum;
    uint32_t *shadow_page;
    size_t i;

    if (!(d->r.ctrl & CTRL_DMA_EN) || d->r.dma_len == 0) {
        return;
    }
    if (d->state != VFU_MIGR_STATE_RUNNING &&
        d->state != VFU_MIGR_STATE_PRE_COPY) {
        return;
    }
    if (!d->shadow_valid && rebuild_shadow(d) < 0) {
        return;
    }

    next = d->r.counter + 1;
    idx = next % (d->r.dma_len / DMA_PAGE);
    for (i = 0; i < DMA_PAGE / 4; i++) {
        page[i] = htole32(next * PATTERN_MUL + (uint32_t)i);
    }
    if (dma_xfer(d, d->r.dma_addr + (uint64_t)idx * DMA_PAGE, page,
                 sizeof(page), true) < 0) {
        dma_failed(d, "write");
        return;
    }
    if (d->dma_failing) {
        vfu_log(d->ctx, LOG_INFO, "DMA works again");
        d->dma_failing = false;
    }

    shadow_page = d->shadow + (size_t)idx * (DMA_PAGE / 4);
    old_sum = sum_words(shadow_page, DMA_PAGE);
    new_sum = sum_words(page, DMA_PAGE);
    memcpy(shadow_page, page, DMA_PAGE);
    d->r.checksum += new_sum - old_sum;
    d->r.counter = next;
}

static void
dma_register(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
    vfu_log(ctx, LOG_DEBUG, "DMA region %p+%#zx mapped%s",
            info->iova.iov_base, info->iova.iov_len,
            info->vaddr != NULL ? "" : " (without direct mapping)");
}

static void
dma_unregister(vfu_ctx_t *ctx, vfu_dma_info_t *info)
{
    struct migdev *d = dev_of(ctx);
    uint64_t start = (uint64_t)(uintptr_t)info->iova.iov_base;
    uint64_t end = start + info->iova.iov_len;

    vfu_log(ctx, LOG_DEBUG, "DMA region %p+%#zx unmapped",
            info->iova.iov_base, info->iova.iov_len);
    /* Whatever comes back at these addresses may hold other data. */
    if (d->r.dma_len != 0 && start < d->r.dma_addr + d->r.dma_len &&
        d->r.dma_addr < end) {
        d->shadow_valid = false;
    }
}

/* ---- BAR0 ---------------------------------------------------------------- */

static uint32_t
reg_read(struct migdev *d, uint32_t off)
{
    switch (off) {
    case REG_MAGIC:       return MIGDEV_MAGIC;
    case REG_VERSION:     return MIGDEV_VERSION;
    case REG_COUNTER:     return d->r.counter;
    case REG_CTRL:        return d->r.ctrl;
    case REG_DMA_ADDR_LO: return (uint32_t)d->r.dma_addr;
    case REG_DMA_ADDR_HI: return (uint32_t)(d->r.dma_addr >> 32);
    case REG_DMA_LEN:     return d->r.dma_len;
    case REG_STATE:       return (uint32_t)d->state;
    case REG_CHECKSUM:    return d->r.checksum;
    }
    if (off >= REG_SCRATCH && off < REG_SCRATCH + 4 * NR_SCRATCH) {
        return d->r.scratch[(off - REG_SCRATCH) / 4];
    }
    return 0;
}

static int
reg_write(struct migdev *d, uint32_t off, uint32_t v)
{
    switch (off) {
    case REG_CTRL:
        v &= CTRL_MASK;
        if ((v & CTRL_DMA_EN) && !(d->r.ctrl & CTRL_DMA_EN)) {
            /* The guest may have changed the buffer while we were off. */
            d->shadow_valid = false;
        }
        d->r.ctrl = v;
        return 0;
    case REG_DMA_ADDR_LO:
        d->r.dma_addr = (d->r.dma_addr & ~(uint64_t)UINT32_MAX) | v;
        d->shadow_valid = false;
        return 0;
    case REG_DMA_ADDR_HI:
        d->r.dma_addr = (d->r.dma_addr & UINT32_MAX) | ((uint64_t)v << 32);
        d->shadow_valid = false;
        return 0;
    case REG_DMA_LEN:
        if (!dma_len_ok(v)) {
            vfu_log(d->ctx, LOG_WARNING, "DMA_LEN %#" PRIx32 " refused", v);
            errno = EINVAL;
            return -1;
        }
        d->r.dma_len = v;
        d->shadow_valid = false;
        return 0;
    }
    if (off >= REG_SCRATCH && off < REG_SCRATCH + 4 * NR_SCRATCH) {
        d->r.scratch[(off - REG_SCRATCH) / 4] = v;
        return 0;
    }
    /* Read-only and unassigned registers ignore writes. */
    return 0;
}

/*
 * Accesses are made of whole, aligned 32-bit registers (a 64-bit access
 * covers two of them); anything else is refused with EINVAL.
 */
static ssize_t
bar0_access(vfu_ctx_t *ctx, char *buf, size_t count, loff_t offset,
            bool is_write)
{
    struct migdev *d = dev_of(ctx);
    size_t i;

    if (offset < 0 || offset % 4 != 0 || count % 4 != 0 || count == 0 ||
        (uint64_t)offset + count > MIGDEV_BAR0_SZ) {
        errno = EINVAL;
        return -1;
    }
    for (i = 0; i < count; i += 4) {
        uint32_t off = (uint32_t)offset + (uint32_t)i;

        if (is_write) {
            if (reg_write(d, off, get32((uint8_t *)buf + i)) < 0) {
                return -1;
            }
        } else {
            put32((uint8_t *)buf + i, reg_read(d, off));
        }
    }
    return (ssize_t)count;
}

/* ---- migration ----------------------------------------------------------- */

static void
encode_record(const struct migdev *d, uint8_t *rec, uint32_t flags)
{
    uint8_t *pl = rec + REC_HDR_LEN;
    uint32_t crc;
    int i;

    memset(rec, 0, REC_LEN);
    put32(rec + 0, REC_MAGIC);
    put16(rec + 4, REC_VERSION);
    put16(rec + 6, REC_HDR_LEN);
    put32(rec + 8, flags);
    put32(rec + 12, REC_PAYLOAD_LEN);

    put32(pl + 0, MIGDEV_MAGIC);
    put32(pl + 4, d->r.counter);
    put32(pl + 8, d->r.ctrl);
    put32(pl + 12, d->r.dma_len);
    put64(pl + 16, d->r.dma_addr);
    for (i = 0; i < NR_SCRATCH; i++) {
        put32(pl + 24 + 4 * i, d->r.scratch[i]);
    }
    put32(pl + 88, d->r.checksum);
    put32(pl + 92, 0);

    crc = crc32_update(0, rec, 16);
    crc = crc32_update(crc, pl, REC_PAYLOAD_LEN);
    put32(rec + 16, crc);
}

/* Writes the bulk record (REC_HDR_LEN + d->bulk_len bytes) at `rec`. */
static void
encode_bulk(const struct migdev *d, uint8_t *rec)
{
    uint8_t *pl = rec + REC_HDR_LEN;
    uint32_t crc;
    size_t i;

    memset(rec, 0, REC_HDR_LEN);
    put32(rec + 0, REC_MAGIC);
    put16(rec + 4, REC_VERSION);
    put16(rec + 6, REC_HDR_LEN);
    put32(rec + 8, REC_FLAG_BULK);
    put32(rec + 12, (uint32_t)d->bulk_len);
    for (i = 0; i < d->bulk_len; i++) {
        pl[i] = (uint8_t)(i * 131 + 7);
    }
    crc = crc32_update(0, rec, 16);
    crc = crc32_update(crc, pl, d->bulk_len);
    put32(rec + 16, crc);
}

/*
 * Checks one record at `p` (`avail` bytes left in the stream). On success
 * returns its length and decodes it into `out` and `flags`; else -1 with a
 * reason logged.
 */
static ssize_t
decode_record(vfu_ctx_t *ctx, const uint8_t *p, size_t avail,
              struct regs *out, uint32_t *flags)
{
    const uint8_t *pl;
    uint32_t crc;
    int i;

    if (avail < REC_HDR_LEN) {
        vfu_log(ctx, LOG_ERR, "migration data: truncated record header");
        return -1;
    }
    if (get32(p) != REC_MAGIC) {
        vfu_log(ctx, LOG_ERR, "migration data: bad record magic %#" PRIx32,
                get32(p));
        return -1;
    }
    if (get16(p + 4) == REC_VERSION && get16(p + 6) == REC_HDR_LEN &&
        get32(p + 8) == REC_FLAG_BULK) {
        uint32_t len = get32(p + 12);

        if (len > BULK_MAX || avail - REC_HDR_LEN < len) {
            vfu_log(ctx, LOG_ERR, "migration data: truncated bulk record (%"
                    PRIu32 " bytes)", len);
            return -1;
        }
        crc = crc32_update(0, p, 16);
        crc = crc32_update(crc, p + REC_HDR_LEN, len);
        if (crc != get32(p + 16)) {
            vfu_log(ctx, LOG_ERR, "migration data: bulk record CRC mismatch");
            return -1;
        }
        *flags = REC_FLAG_BULK;
        return (ssize_t)(REC_HDR_LEN + len);
    }
    if (get16(p + 4) != REC_VERSION || get16(p + 6) != REC_HDR_LEN ||
        get32(p + 12) != REC_PAYLOAD_LEN) {
        vfu_log(ctx, LOG_ERR, "migration data: unsupported record version %u "
                "(header %u, payload %" PRIu32 " bytes)", get16(p + 4),
                get16(p + 6), get32(p + 12));
        return -1;
    }
    if (avail < REC_LEN) {
        vfu_log(ctx, LOG_ERR, "migration data: truncated record (%zu of %u "
                "bytes)", avail, REC_LEN);
        return -1;
    }
    pl = p + REC_HDR_LEN;
    crc = crc32_update(0, p, 16);
    crc = crc32_update(crc, pl, REC_PAYLOAD_LEN);
    if (crc != get32(p + 16)) {
        vfu_log(ctx, LOG_ERR, "migration data: CRC mismatch (%#" PRIx32
                " computed, %#" PRIx32 " stored)", crc, get32(p + 16));
        return -1;
    }
    *flags = get32(p + 8);
    if ((*flags & ~REC_FLAG_FINAL) != 0) {
        vfu_log(ctx, LOG_ERR, "migration data: unknown flags %#" PRIx32,
                *flags);
        return -1;
    }
    if (get32(pl) != MIGDEV_MAGIC) {
        vfu_log(ctx, LOG_ERR, "migration data: not a migdev state");
        return -1;
    }
    memset(out, 0, sizeof(*out));
    out->counter = get32(pl + 4);
    out->ctrl = get32(pl + 8);
    out->dma_len = get32(pl + 12);
    out->dma_addr = get64(pl + 16);
    for (i = 0; i < NR_SCRATCH; i++) {
        out->scratch[i] = get32(pl + 24 + 4 * i);
    }
    out->checksum = get32(pl + 88);
    if ((out->ctrl & ~CTRL_MASK) != 0 || !dma_len_ok(out->dma_len) ||
        get32(pl + 92) != 0) {
        vfu_log(ctx, LOG_ERR, "migration data: register values out of range");
        return -1;
    }
    return REC_LEN;
}

/* Validates everything written in RESUME and applies the last record. */
static int
restore_state(struct migdev *d)
{
    struct regs last;
    size_t pos = d->in_checked, bulk = d->in_bulk;
    bool final = false;
    int nr = 0;

    memset(&last, 0, sizeof(last));
    if (d->in_len == 0) {
        vfu_log(d->ctx, LOG_ERR, "migration data: nothing was received");
        errno = EINVAL;
        return -1;
    }
    while (pos < d->in_len) {
        uint32_t flags = 0;
        ssize_t n;

        if (final) {
            vfu_log(d->ctx, LOG_ERR, "migration data: data after the final "
                    "record");
            errno = EINVAL;
            return -1;
        }
        n = decode_record(d->ctx, d->in + pos, d->in_len - pos, &last, &flags);
        if (n < 0) {
            errno = EINVAL;
            return -1;
        }
        pos += (size_t)n;
        if (flags == REC_FLAG_BULK) {
            bulk += (size_t)n - REC_HDR_LEN;
            continue;
        }
        final = (flags & REC_FLAG_FINAL) != 0;
        nr++;
    }
    if (!final) {
        vfu_log(d->ctx, LOG_ERR, "migration data: incomplete, no final record");
        errno = EINVAL;
        return -1;
    }

    d->r = last;
    d->shadow_valid = false;
    d->restored = true;
    d->dma_failing = false;
    vfu_log(d->ctx, LOG_INFO, "state restored from %d record(s): counter %"
            PRIu32 ", ctrl %#" PRIx32 ", buffer %#" PRIx64 "+%#" PRIx32
            ", checksum %#" PRIx32 "; %zu bytes of bulk state", nr,
            d->r.counter, d->r.ctrl, d->r.dma_addr, d->r.dma_len,
            d->r.checksum, bulk);
    return 0;
}

static int
migr_transition(vfu_ctx_t *ctx, vfu_migr_state_t state)
{
    struct migdev *d = dev_of(ctx);
    vfu_migr_state_t from = d->state;

    vfu_log(ctx, LOG_INFO, "migration state %s -> %s", state_name(from),
            state_name(state));

    if (from == VFU_MIGR_STATE_RESUME && state != VFU_MIGR_STATE_RESUME) {
        if (restore_state(d) < 0) {
            /* Stay in RESUME; the client may send the rest and retry. */
            return -1;
        }
        free(d->in);
        d->in = NULL;
        d->in_len = 0;
        d->in_checked = 0;
        d->in_bulk = 0;
    }

    switch (state) {
    case VFU_MIGR_STATE_PRE_COPY:
        d->out_len = 0;
        if (d->bulk_len > 0) {
            encode_bulk(d, d->out);
            d->out_len = REC_HDR_LEN + d->bulk_len;
        }
        encode_record(d, d->out + d->out_len, 0);
        d->out_len += REC_LEN;
        d->out_pos = 0;
        break;
    case VFU_MIGR_STATE_STOP_AND_COPY:
        /*
         * The stream goes on from pre-copy: whatever the client has not read
         * of the pre-copy record comes first, so that the destination always
         * gets whole records.
         */
        if (from == VFU_MIGR_STATE_PRE_COPY) {
            memmove(d->out, d->out + d->out_pos, d->out_len - d->out_pos);
            d->out_len -= d->out_pos;
        } else if (d->bulk_len > 0) {
            encode_bulk(d, d->out);
            d->out_len = REC_HDR_LEN + d->bulk_len;
        } else {
            d->out_len = 0;
        }
        d->out_pos = 0;
        encode_record(d, d->out + d->out_len, REC_FLAG_FINAL);
        d->out_len += REC_LEN;
        break;
    case VFU_MIGR_STATE_RESUME:
        d->out_len = 0;
        d->out_pos = 0;
        free(d->in);
        d->in = NULL;
        d->in_len = 0;
        d->in_checked = 0;
        d->in_bulk = 0;
        break;
    default:
        d->out_len = 0;
        d->out_pos = 0;
        break;
    }
    d->state = state;
    return 0;
}

static ssize_t
migr_read_data(vfu_ctx_t *ctx, void *buf, uint64_t size)
{
    struct migdev *d = dev_of(ctx);
    size_t n = d->out_len - d->out_pos;

    if (n > size) {
        n = (size_t)size;
    }
    memcpy(buf, d->out + d->out_pos, n);
    d->out_pos += n;
    return (ssize_t)n;
}

static ssize_t
migr_write_data(vfu_ctx_t *ctx, void *buf, uint64_t size)
{
    struct migdev *d = dev_of(ctx);
    uint8_t *p;

    if (size > d->in_max - d->in_len) {
        vfu_log(ctx, LOG_ERR, "migration data: more than %zu bytes", d->in_max);
        errno = ENOSPC;
        return -1;
    }
    if (size == 0) {
        return 0;
    }
    p = realloc(d->in, d->in_len + size);
    if (p == NULL) {
        errno = ENOMEM;
        return -1;
    }
    memcpy(p + d->in_len, buf, size);
    d->in = p;
    d->in_len += size;
    /*
     * Check bulk records as soon as they are complete, so that the move out
     * of RESUME (inside the downtime) only has the small records left.
     */
    while (d->in_len - d->in_checked >= REC_HDR_LEN &&
           get32(d->in + d->in_checked + 8) == REC_FLAG_BULK &&
           d->in_len - d->in_checked - REC_HDR_LEN >=
               get32(d->in + d->in_checked + 12)) {
        struct regs unused;
        uint32_t flags = 0;
        ssize_t n = decode_record(ctx, d->in + d->in_checked,
                                  d->in_len - d->in_checked, &unused, &flags);

        if (n < 0 || flags != REC_FLAG_BULK) {
            errno = EINVAL;
            return -1;
        }
        d->in_checked += (size_t)n;
        d->in_bulk += (size_t)n - REC_HDR_LEN;
    }
    return (ssize_t)size;
}

/* ---- other callbacks ----------------------------------------------------- */

/*
 * The device only touches guest memory from its own loop, never while the
 * library is inside vfu_run_ctx(), so it is always quiescent when asked.
 */
static int
quiesce(vfu_ctx_t *ctx)
{
    (void)ctx;
    return 0;
}

static int
reset(vfu_ctx_t *ctx, vfu_reset_type_t type)
{
    struct migdev *d = dev_of(ctx);

    if (type == VFU_RESET_LOST_CONN) {
        /*
         * The library has walked the migration state back to RUNNING. A
         * transition it could not make (leaving RESUME with an incomplete
         * stream fails) still counts as made: drop what came in.
         */
        if (d->state != VFU_MIGR_STATE_RUNNING) {
            vfu_log(ctx, LOG_INFO, "client left in state %s: now RUNNING",
                    state_name(d->state));
            free(d->in);
            d->in = NULL;
            d->in_len = 0;
            d->out_len = 0;
            d->out_pos = 0;
            d->state = VFU_MIGR_STATE_RUNNING;
        }
        return 0;
    }
    vfu_log(ctx, LOG_INFO, "device reset");
    memset(&d->r, 0, sizeof(d->r));
    d->shadow_valid = false;
    d->restored = false;
    d->dma_failing = false;
    return 0;
}

/* ---- main ---------------------------------------------------------------- */

static int
parse_level(const char *s)
{
    static const struct { const char *name; int level; } names[] = {
        { "emerg", LOG_EMERG }, { "alert", LOG_ALERT }, { "crit", LOG_CRIT },
        { "err", LOG_ERR }, { "error", LOG_ERR }, { "warning", LOG_WARNING },
        { "warn", LOG_WARNING }, { "notice", LOG_NOTICE },
        { "info", LOG_INFO }, { "debug", LOG_DEBUG },
    };
    size_t i;

    for (i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (strcasecmp(s, names[i].name) == 0) {
            return names[i].level;
        }
    }
    if (s[0] >= '0' && s[0] <= '7' && s[1] == '\0') {
        return s[0] - '0';
    }
    return -1;
}

static void
usage(const char *prog)
{
    fprintf(stderr, "usage: %s SOCKET [--log LEVEL] [--persist] [--bulk-kib N]\n"
            "  LEVEL: emerg alert crit err warning notice info debug, or 0-7\n"
            "  --persist: serve one client after another instead of exiting\n"
            "             when the first disconnects\n"
            "  --bulk-kib N: N KiB (at most 262144) of extra device state sent\n"
            "             in pre-copy; as a destination, accept that much\n",
            prog);
}

static long
ns_until(const struct timespec *t)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    return (t->tv_sec - now.tv_sec) * 1000000000L + (t->tv_nsec - now.tv_nsec);
}

static void
schedule_next_tick(struct migdev *d)
{
    struct timespec now;

    clock_gettime(CLOCK_MONOTONIC, &now);
    d->next_tick.tv_sec = now.tv_sec;
    d->next_tick.tv_nsec = now.tv_nsec + TICK_NS;
    if (d->next_tick.tv_nsec >= 1000000000L) {
        d->next_tick.tv_sec++;
        d->next_tick.tv_nsec -= 1000000000L;
    }
}

/* Waits for a client; 0 once attached, 1 if asked to stop, -1 on error. */
static int
wait_for_client(vfu_ctx_t *ctx)
{
    while (!stop_requested) {
        struct pollfd pfd = { .fd = vfu_get_poll_fd(ctx), .events = POLLIN };

        if (vfu_attach_ctx(ctx) == 0) {
            return 0;
        }
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            return -1;
        }
        if (poll(&pfd, 1, 200) < 0 && errno != EINTR) {
            return -1;
        }
    }
    return 1;
}

/* Serves the client; 0 when it disconnected or we were asked to stop. */
static int
serve(struct migdev *d)
{
    schedule_next_tick(d);
    while (!stop_requested) {
        struct pollfd pfd = { .fd = vfu_get_poll_fd(d->ctx), .events = POLLIN };
        long ns = ns_until(&d->next_tick);
        int timeout = ns <= 0 ? 0 : (int)((ns + 999999) / 1000000);
        int i, r;

        r = poll(&pfd, 1, timeout);
        if (r < 0 && errno != EINTR) {
            vfu_log(d->ctx, LOG_ERR, "poll: %s", strerror(errno));
            return -1;
        }
        /*
         * vfu_run_ctx() runs even when poll() saw nothing: a request that
         * arrived while the device waited for the client's answer to a DMA
         * message (regions mapped without an fd) has already been read off
         * the socket, so poll() would not report it.
         */
        for (i = 0; i < RUN_BATCH; i++) {
            int n = vfu_run_ctx(d->ctx);

            if (n < 0) {
                if (errno == ENOTCONN) {
                    vfu_log(d->ctx, LOG_INFO, "client disconnected");
                    return 0;
                }
                if (errno == EINTR || errno == EAGAIN || errno == EBUSY) {
                    break;
                }
                vfu_log(d->ctx, LOG_ERR, "vfu_run_ctx: %s", strerror(errno));
                return -1;
            }
            if (n == 0) {
                break;
            }
        }
        if (ns_until(&d->next_tick) <= 0) {
            tick(d);
            schedule_next_tick(d);
        }
    }
    vfu_log(d->ctx, LOG_INFO, "stopping on signal");
    return 0;
}

int
main(int argc, char *argv[])
{
    const vfu_migration_callbacks_t migr = {
        .version = VFU_MIGR_CALLBACKS_VERS,
        .transition = migr_transition,
        .read_data = migr_read_data,
        .write_data = migr_write_data,
    };
    struct sigaction sa;
    const char *path = NULL;
    bool persist = false;
    unsigned long bulk_kib = 0;
    int level = LOG_INFO;
    struct migdev d;
    int i, ret = -1;

    for (i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--log") == 0 && i + 1 < argc) {
            level = parse_level(argv[++i]);
            if (level < 0) {
                fprintf(stderr, "migdev: unknown log level %s\n", argv[i]);
                usage(argv[0]);
                return EXIT_FAILURE;
            }
        } else if (strcmp(argv[i], "--persist") == 0) {
            persist = true;
        } else if (strcmp(argv[i], "--bulk-kib") == 0 && i + 1 < argc) {
            char *end;

            errno = 0;
            bulk_kib = strtoul(argv[++i], &end, 0);
            if (errno != 0 || *end != '\0' || argv[i][0] == '-' ||
                bulk_kib > BULK_MAX / 1024) {
                fprintf(stderr, "migdev: bad --bulk-kib %s\n", argv[i]);
                usage(argv[0]);
                return EXIT_FAILURE;
            }
        } else if (argv[i][0] != '-' && path == NULL) {
            path = argv[i];
        } else {
            usage(argv[0]);
            return EXIT_FAILURE;
        }
    }
    if (path == NULL) {
        usage(argv[0]);
        return EXIT_FAILURE;
    }

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    /* No SA_RESTART: poll() must return early. */
    if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0) {
        perror("migdev: sigaction");
        return EXIT_FAILURE;
    }

    memset(&d, 0, sizeof(d));
    d.state = VFU_MIGR_STATE_RUNNING;
    d.bulk_len = bulk_kib * 1024;
    d.in_max = MIG_IN_MAX + (d.bulk_len > 0 ? REC_HDR_LEN + d.bulk_len : 0);
    d.out_cap = 2 * REC_LEN + (d.bulk_len > 0 ? REC_HDR_LEN + d.bulk_len : 0);
    d.out = malloc(d.out_cap);
    d.sg = calloc(1, dma_sg_size());
    if (d.sg == NULL || d.out == NULL) {
        perror("migdev: calloc");
        free(d.sg);
        free(d.out);
        return EXIT_FAILURE;
    }

    d.ctx = vfu_create_ctx(VFU_TRANS_SOCK, path, LIBVFIO_USER_FLAG_ATTACH_NB,
                           &d, VFU_DEV_TYPE_PCI);
    if (d.ctx == NULL) {
        fprintf(stderr, "migdev: cannot create context on %s: %s\n", path,
                strerror(errno));
        free(d.sg);
        free(d.out);
        return EXIT_FAILURE;
    }

#define SETUP(call)                                                         \
    do {                                                                    \
        if ((call) < 0) {                                                   \
            fprintf(stderr, "migdev: %s: %s\n", #call, strerror(errno));    \
            goto out;                                                       \
        }                                                                   \
    } while (0)

    SETUP(vfu_setup_log(d.ctx, log_stderr, level));
    SETUP(vfu_pci_init(d.ctx, VFU_PCI_TYPE_CONVENTIONAL,
                       PCI_HEADER_TYPE_NORMAL, 0));
    vfu_pci_set_id(d.ctx, MIGDEV_VENDOR, MIGDEV_DEVICE, MIGDEV_VENDOR,
                   MIGDEV_DEVICE);
    vfu_pci_set_class(d.ctx, 0xff, 0x00, 0x00);
    SETUP(vfu_setup_region(d.ctx, VFU_PCI_DEV_BAR0_REGION_IDX, MIGDEV_BAR0_SZ,
                           bar0_access,
                           VFU_REGION_FLAG_RW | VFU_REGION_FLAG_MEM,
                           NULL, 0, -1, 0));
    SETUP(vfu_setup_device_dma(d.ctx, LIBVFIO_USER_MAX_DMA_REGIONS,
                               dma_register, dma_unregister));
    SETUP(vfu_setup_device_reset_cb(d.ctx, reset));
    vfu_setup_device_quiesce_cb(d.ctx, quiesce);
    SETUP(vfu_setup_device_migration_callbacks(d.ctx, &migr));
    SETUP(vfu_realize_ctx(d.ctx));
#undef SETUP

    do {
        vfu_log(d.ctx, LOG_INFO, "waiting for a client on %s", path);
        ret = wait_for_client(d.ctx);
        if (ret < 0) {
            fprintf(stderr, "migdev: vfu_attach_ctx: %s\n", strerror(errno));
            goto out;
        }
        if (ret == 0) {
            vfu_log(d.ctx, LOG_INFO, "client attached");
            ret = serve(&d);
        } else {
            vfu_log(d.ctx, LOG_INFO, "stopping on signal");
            ret = 0;
        }
    } while (persist && ret == 0 && !stop_requested);

out:
    vfu_destroy_ctx(d.ctx);
    free(d.shadow);
    free(d.in);
    free(d.sg);
    free(d.out);
    return ret == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
